"""The LoRA-One / Riemannian preconditioner (lora-one.md, tests 4 and 6) and its AdamW / reference forms."""

from __future__ import annotations

import warnings

import torch
from helpers import make_batch, randomize_adapters, rel, tiny_llama
from optim_fixtures import effective_weight, quadratic_grad, quadratic_loss, quadratic_problem, single_linear

import peftkit
from peftkit.adapters.lora_one_preconditioner import preconditioned_gradients
from peftkit.optim import factor_pairs

NAME = "lora-one-preconditioner"
M, N, R = 7, 5, 2


def sgd_step(lr: float, **options):
    model, layer = single_linear(M, N, R, alpha=3.0)
    pair = factor_pairs(model)[0]
    x, y = quadratic_problem(M, N)
    w0 = effective_weight(layer)
    a, b, s = pair.a.detach().clone(), pair.b.detach().clone(), pair.scaling
    g = quadratic_grad(w0, x, y)
    quadratic_loss(model, x, y).backward()
    peftkit.optimizer(model, lr, name=NAME, **options).step()
    p_b = b @ torch.linalg.pinv(b)
    p_a = torch.linalg.pinv(a) @ a
    return effective_weight(layer) - w0, -lr * s**2 * (p_b @ g + g @ p_a)


def test_sgd_first_order_update():
    errors = []
    for lr in (1e-4, 5e-5, 2.5e-5):
        delta, expected = sgd_step(lr, update="sgd", damping=0.0)
        errors.append(rel(delta, expected))
    assert errors[0] < 1e-2
    for big, small in zip(errors, errors[1:]):
        assert 0.4 < small / big < 0.6, errors


def authors_adamwr(a, b, grads, s, lr, use_updated_a: bool, steps: int = 3, lam: float = 1e-6,
                   betas=(0.9, 0.999), eps=1e-8, wd=0.01):
    """The authors' AdamWr by hand: A then B, B's preconditioner from the updated (or the pre-step) A."""
    state = {k: torch.zeros_like(v) for k, v in (("ma", a), ("va", a), ("mb", b), ("vb", b))}
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    for step in range(steps):
        g = grads(s * b @ a)
        g_a, g_b = s * b.T @ g, s * g @ a.T
        a_pre = a
        ghat_a = torch.linalg.inv(b.T @ b + lam * eye) @ g_a
        state["ma"] = betas[0] * state["ma"] + (1 - betas[0]) * ghat_a
        state["va"] = betas[1] * state["va"] + (1 - betas[1]) * ghat_a**2
        a = a - lr * state["ma"] / (state["va"].sqrt() + eps)
        a = a - lr * wd * a
        a_for_b = a if use_updated_a else a_pre
        ghat_b = g_b @ torch.linalg.inv(a_for_b @ a_for_b.T + lam * eye)
        state["mb"] = betas[0] * state["mb"] + (1 - betas[0]) * ghat_b
        state["vb"] = betas[1] * state["vb"] + (1 - betas[1]) * ghat_b**2
        b = b - lr * state["mb"] / (state["vb"].sqrt() + eps)
        b = b - lr * wd * b
    return s * b @ a


def test_reference_mode_is_the_authors_adamwr():
    model, layer = single_linear(M, N, R, alpha=3.0)
    pair = factor_pairs(model)[0]
    a, b, s = pair.a.detach().clone(), pair.b.detach().clone(), pair.scaling
    w_base = layer.base_layer.weight.detach()
    x, y = quadratic_problem(M, N)
    opt = peftkit.optimizer(model, 1e-2, name=NAME, reference_code=True, weight_decay=0.01)
    for _ in range(3):
        quadratic_loss(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    got = layer.delta_weight("default").detach()

    def grads(delta):
        return quadratic_grad(w_base + delta, x, y)

    want = authors_adamwr(a, b, grads, s, 1e-2, use_updated_a=True)
    assert rel(got, want) <= 1e-12
    assert rel(got, authors_adamwr(a, b, grads, s, 1e-2, use_updated_a=False)) > 1e-6  # the order matters


def test_reference_mode_has_no_bias_correction():
    model, layer = single_linear(M, N, R)
    pair = factor_pairs(model)[0]
    a = pair.a.detach().clone()
    x, y = quadratic_problem(M, N)
    quadratic_loss(model, x, y).backward()
    peftkit.optimizer(model, 1e-3, name=NAME, reference_code=True, eps=1e-14).step()
    step = (pair.a.detach() - a).abs()
    torch.testing.assert_close(step, torch.full_like(step, 1e-3 * 0.1 / 0.001**0.5), rtol=1e-9, atol=0)


def test_adamw_on_preconditioned_gradients():
    model, layer = single_linear(M, N, R, alpha=4.0)
    pair = factor_pairs(model)[0]
    x, y = quadratic_problem(M, N)
    quadratic_loss(model, x, y).backward()
    g_a, g_b = preconditioned_gradients(pair.a.detach(), pair.b.detach(), pair.a.grad, pair.b.grad, 1e-6)
    torch.testing.assert_close(g_a, torch.linalg.solve(pair.b.T @ pair.b + 1e-6 * torch.eye(R, dtype=torch.float64),
                                                       pair.a.grad), rtol=1e-12, atol=0)
    copies = [pair.a.detach().clone().requires_grad_(True), pair.b.detach().clone().requires_grad_(True)]
    copies[0].grad, copies[1].grad = g_a, g_b
    torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.05).step()
    peftkit.optimizer(model, 1e-2, name=NAME, weight_decay=0.05).step()
    torch.testing.assert_close(pair.a.detach(), copies[0].detach(), atol=1e-14, rtol=0)
    torch.testing.assert_close(pair.b.detach(), copies[1].detach(), atol=1e-14, rtol=0)


def wrapped_llama(extra_trainable: bool):
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftkit.wrap(model, "lora", r=4)
    randomize_adapters(model)
    if extra_trainable:  # a trainable non-LoRA tensor sits between the pairs in named_parameters()
        model.model.layers[0].post_attention_layernorm.weight.requires_grad_(True)
    return model.train()


def test_pairing_by_name_ignores_extra_parameters():
    batch = make_batch(tiny_llama(), seed=2)
    results = []
    for extra in (False, True):
        model = wrapped_llama(extra)
        opt = peftkit.optimizer(model, 1e-2, name=NAME)
        model(**batch).loss.backward()  # one step: afterwards the extra tensor itself changes the function
        opt.step()
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


def test_conformance_style_step_on_llama():
    model = wrapped_llama(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = peftkit.optimizer(model, 1e-2, name=NAME)
    model(**make_batch(model, seed=4)).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    opt.step()
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), before[name]) != (name in trainable), name
