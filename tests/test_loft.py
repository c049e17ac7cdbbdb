"""LoFT (loft.md, "Tests that must pass" 1-8; resume is also in test_optim_base.py, DDP in
test_optim_distributed.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import rel
from optim_fixtures import (
    ShapeRecorder,
    effective_weight,
    quadratic_grad,
    quadratic_loss,
    quadratic_problem,
    single_linear,
)

import peftkit
from peftkit.adapters.loft import full_second_moment, row_outer
from peftkit.optim import factor_pairs

EXACT = dict(damping_a=0.0, damping_b=0.0, eps=1e-8)


def trajectory(model, layer, x, y, steps: int, lr: float = 1e-2, **options) -> list[torch.Tensor]:
    opt = peftkit.optimizer(model, lr, **options)
    out = []
    for _ in range(steps):
        quadratic_loss(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        out.append(effective_weight(layer))
    return out


def adamw_deviation(betas, **options) -> float:
    n = 6
    model, layer = single_linear(n, n, n, method="loft")  # r = m = n, s = 1, A and B invertible
    x, y = quadratic_problem(n, n, k=32)
    w = effective_weight(layer).requires_grad_(True)
    adamw = torch.optim.AdamW([w], lr=1e-2, eps=1e-8, betas=betas, weight_decay=0.0)
    worst = 0.0
    for weight in trajectory(model, layer, x, y, 40, betas=betas, **{**EXACT, **options}):
        quadratic_loss(lambda inp: inp @ w.T, x, y).backward()
        adamw.step()
        adamw.zero_grad()
        worst = max(worst, rel(weight, w.detach()))
    return worst


def test_full_rank_is_adamw():
    assert adamw_deviation((0.9, 0.999)) <= 1e-6
    # negative control: the official conventions pass only with β = (0, 0)
    assert adamw_deviation((0.9, 0.999), reference_code=True) > 1e-3
    assert adamw_deviation((0.0, 0.0), reference_code=True) <= 1e-6


def test_reparametrisation_and_alpha_invariance():
    m, n, r = 7, 5, 3
    x, y = quadratic_problem(m, n)
    model, layer = single_linear(m, n, r, method="loft")
    a0, b0 = (p.detach().clone() for p in (factor_pairs(model)[0].a, factor_pairs(model)[0].b))
    reference = trajectory(model, layer, x, y, 10, **EXACT)
    t = torch.eye(r, dtype=torch.float64) + 0.3 * torch.randn(r, r, generator=torch.Generator().manual_seed(9),
                                                              dtype=torch.float64)
    model, layer = single_linear(m, n, r, method="loft", a=t @ a0, b=b0 @ torch.linalg.inv(t))
    for got, want in zip(trajectory(model, layer, x, y, 10, **EXACT), reference):
        assert rel(got, want) <= 1e-12
    for alpha in (r / 4, 4 * r):  # same s·B₀, so the same W; s folded into the preconditioner
        model, layer = single_linear(m, n, r, alpha=alpha, method="loft", a=a0, b=b0 * r / alpha)
        for got, want in zip(trajectory(model, layer, x, y, 10, **EXACT), reference):
            assert rel(got, want) <= 1e-12
    # negative control: without s in the preconditioner, α changes the trajectory
    model, layer = single_linear(m, n, r, alpha=4 * r, method="loft", a=a0, b=b0 / 4)
    assert rel(trajectory(model, layer, x, y, 10, reference_code=True, **EXACT)[-1], reference[-1]) > 1e-3


def test_alternating_subspace_steps_and_states():
    m, n, r = 7, 5, 2
    model, layer = single_linear(m, n, r, alpha=3.0, method="loft")
    pair = factor_pairs(model)[0]
    x, y = quadratic_problem(m, n)
    opt = peftkit.optimizer(model, 1e-2, **EXACT)
    for step in range(1, 5):
        a, b, w = pair.a.detach().clone(), pair.b.detach().clone(), effective_weight(layer)
        states = {k: v.clone() for p in (pair.a, pair.b) for k, v in opt.state[p].items() if k != "partner_old"}
        quadratic_loss(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        delta = effective_weight(layer) - w
        if step % 2 == 1:  # B-step: row(ΔW) ⊆ span(A), A untouched
            assert torch.equal(pair.a.detach(), a) and not torch.equal(pair.b.detach(), b)
            outside = delta - delta @ torch.linalg.pinv(a) @ a
        else:  # A-step: col(ΔW) ⊆ span(B̃)
            assert torch.equal(pair.b.detach(), b) and not torch.equal(pair.a.detach(), a)
            outside = delta - b @ torch.linalg.pinv(b) @ delta
        assert outside.norm() <= 1e-12 * delta.norm()
        for p in (pair.a, pair.b):  # both factors' moments move every step
            for key in ("exp_avg", "second"):
                assert key not in states or not torch.equal(opt.state[p][key], states[key])


def test_second_moment_rows_equal_brute_force_ema():
    gen = torch.Generator().manual_seed(4)
    m, n, r, beta2 = 6, 5, 3, 0.9
    b_tilde = torch.randn(m, r, generator=gen, dtype=torch.float64)
    second = torch.zeros(n, r * r, dtype=torch.float64)
    brute = torch.zeros(m, n, dtype=torch.float64)
    for _ in range(4):
        g_hat = torch.randn(r, n, generator=gen, dtype=torch.float64)
        second = beta2 * second + (1 - beta2) * row_outer(g_hat.T)
        brute = beta2 * brute + (1 - beta2) * (b_tilde @ g_hat) ** 2
    assert rel(full_second_moment(b_tilde, second), brute) <= 1e-12


def test_clipping_norm_on_projected_gradients():
    m, n, r = 7, 5, 2
    model, layer = single_linear(m, n, r, alpha=2.0, method="loft", max_grad_norm=0.05, damping_a=0.0, damping_b=0.0)
    pair = factor_pairs(model)[0]
    x, y = quadratic_problem(m, n)
    opt = peftkit.optimizer(model, 1e-2)
    for step in (1, 2):
        g = quadratic_grad(effective_weight(layer), x, y)
        a, b_tilde = pair.a.detach(), pair.scaling * pair.b.detach()
        projected = (g @ torch.linalg.pinv(a) @ a) if step == 1 else (b_tilde @ torch.linalg.pinv(b_tilde) @ g)
        quadratic_loss(model, x, y).backward()
        raw = [pair.a.grad.clone(), pair.b.grad.clone()]
        opt.step()
        norm = projected.norm()
        assert opt.last_grad_norm.item() == pytest.approx(norm.item(), rel=1e-12)
        coef = min(1.0, 0.05 / (norm.item() + 1e-6))
        assert coef < 1
        for got, want in zip((pair.a.grad, pair.b.grad), raw):
            torch.testing.assert_close(got, want * coef, rtol=1e-12, atol=0)
        opt.zero_grad()


def test_no_rmn_transient():
    m, n, r = 20, 12, 4
    model, layer = single_linear(m, n, r, dtype=torch.float32, method="loft")
    x, y = quadratic_problem(m, n, dtype=torch.float32)
    opt = peftkit.optimizer(model, 1e-3)
    for _ in range(3):
        quadratic_loss(model, x, y).backward()
        with ShapeRecorder() as recorder:
            opt.step()
        opt.zero_grad()
        largest = max(torch.Size(s).numel() for s in recorder.shapes)
        # the largest tensors are U, V (m×n) and P^B (m×r²); never an (n, r, m) one (r·m·n = 960)
        assert largest == max(m * n, m * r * r, n * r * r) < r * m * n


def test_reference_code_decays_tensors_outside_the_pairs_as_the_authors():
    """reference_code=True: a trainable bias and a trainable head (outside the (A, B) pairs) follow the official
    LoFTAdamW's AdamW branch, p ← p − wd·p then the bias-corrected Adam step, written out by hand here; the
    default keeps torch's AdamW (lr-scaled decay, none on the bias)."""
    m, n, r, lr, wd, eps = 6, 5, 2, 1e-2, 0.1, 1e-4

    def build():
        model, layer = single_linear(m, n, r, method="loft")
        head = torch.nn.Linear(m, 3, dtype=torch.float64)
        model.append(head)
        layer.base_layer.bias = torch.nn.Parameter(torch.randn(m, dtype=torch.float64,
                                                               generator=torch.Generator().manual_seed(5)))
        return model, layer, head

    x, y = quadratic_problem(3, n)
    for reference_code in (True, False):
        model, layer, head = build()
        others = [layer.base_layer.bias, head.weight, head.bias]
        opt = peftkit.optimizer(model, lr, weight_decay=wd, reference_code=reference_code)
        hand = [p.detach().clone() for p in others]
        moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in hand]
        start_bias = hand[0].clone()
        for step in range(1, 11):
            quadratic_loss(model, x, y).backward()
            for i, p in enumerate(others):
                g = p.grad
                exp_avg, exp_avg_sq = moments[i]
                exp_avg.mul_(0.9).add_(g, alpha=0.1)
                exp_avg_sq.mul_(0.999).addcmul_(g, g, value=0.001)
                denom = (exp_avg_sq.sqrt() / (1 - 0.999 ** step) ** 0.5).add_(eps)
                if reference_code:
                    hand[i] = hand[i] - wd * hand[i]
                elif p.ndim >= 2:  # torch's AdamW; biases are exempt from decay in peftkit's groups
                    hand[i] = hand[i] * (1 - lr * wd)
                hand[i] = hand[i] - lr / (1 - 0.9 ** step) * exp_avg / denom
            opt.step()
            opt.zero_grad()
            for p, want in zip(others, hand):
                torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)
        if reference_code:  # the decay is not lr-scaled: the bias shrinks by about (1 − wd)¹⁰
            assert (others[0].detach() - start_bias).norm() > 0.5 * start_bias.norm()
