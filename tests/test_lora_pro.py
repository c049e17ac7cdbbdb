"""LoRA-Pro (lora-pro.md, "Tests that must pass" 1-6, 8, 9; 7 is in test_optim_distributed.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
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
from peftkit.adapters.lora_pro import adjusted_gradients, equivalent_gradient
from peftkit.optim import factor_pairs

M, N, R = 7, 5, 2


def random_case(seed: int = 0, m: int = M, n: int = N, r: int = R, zero_b: bool = False):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(r, n, generator=gen, dtype=torch.float64)
    b = torch.zeros(m, r, dtype=torch.float64) if zero_b else torch.randn(m, r, generator=gen, dtype=torch.float64)
    g = torch.randn(m, n, generator=gen, dtype=torch.float64)
    return a, b, g


def closest_tangent(a, b, g):
    """P_B G + (I − P_B) G P_A with explicit projectors (fine at test sizes)."""
    p_b = b @ torch.linalg.pinv(b)
    p_a = torch.linalg.pinv(a) @ a
    return p_b @ g + (torch.eye(b.shape[0], dtype=g.dtype) - p_b) @ g @ p_a


def test_equivalent_gradient_is_the_least_squares_optimum():
    s = 1.7
    a, b, g = random_case()
    # The map (g^A, g^B) -> s(B g^A + g^B A) as a matrix on row-major vectors, solved by lstsq. It is rank
    # deficient (X invariance: rank 20 of 24 columns): the default driver (gelsy) returned a wrong projection in
    # some runs (up to 7e-2 in 30 tries); the SVD-based gelsd is exact there.
    jac = s * torch.cat([torch.kron(b, torch.eye(N, dtype=torch.float64)),
                         torch.kron(torch.eye(M, dtype=torch.float64), a.T.contiguous())], 1)
    best = (jac @ torch.linalg.lstsq(jac, g.reshape(-1, 1), driver="gelsd").solution).reshape(M, N)
    tilde = equivalent_gradient(a, b, s * b.T @ g, s * g @ a.T, s)
    assert rel(tilde, best) <= 1e-12
    assert rel(tilde, closest_tangent(a, b, g)) <= 1e-12
    # test 6: a wrong s breaks it
    wrong = equivalent_gradient(a, b, s * b.T @ g, s * g @ a.T, 2 * s)
    assert rel(wrong, best) > 0.1


def test_x_invariance_sylvester_residual_and_minimality():
    s = 0.8
    a, b, g = random_case(1)
    grad_a, grad_b = s * b.T @ g, s * g @ a.T
    g_a, g_b, x = adjusted_gradients(a, b, grad_a, grad_b, s)
    tilde = equivalent_gradient(a, b, grad_a, grad_b, s)
    assert rel(s * (b @ g_a + g_b @ a), tilde) <= 1e-12
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):  # any X gives the same weight change
        other = torch.randn(R, R, generator=gen, dtype=torch.float64)
        moved = s * (b @ (g_a + (other - x) @ a) + (g_b - b @ (other - x)) @ a)
        assert rel(moved, tilde) <= 1e-12
    rhs = -(torch.linalg.inv(b.T @ b) @ grad_a @ a.T) / s**2
    residual = (b.T @ b) @ x + x @ (a @ a.T) - rhs
    assert residual.norm() / rhs.norm() <= 1e-12

    def deviation(x_):
        g_a0, g_b0 = g_a - x @ a, g_b + b @ x
        return ((g_a0 + x_ @ a - grad_a) ** 2).sum() + ((g_b0 - b @ x_ - grad_b) ** 2).sum()

    best = deviation(x)
    for _ in range(20):
        assert deviation(x + 1e-3 * torch.randn(R, R, generator=gen, dtype=torch.float64)) > best
    zero_x = adjusted_gradients(a, b, grad_a, grad_b, s, x_mode="zero")[2]
    assert zero_x.abs().max() == 0 and deviation(zero_x) > best


def test_zero_b_gives_g_times_p_a():
    a, b, g = random_case(2, zero_b=True)
    tilde = equivalent_gradient(a, b, b.T @ g, g @ a.T, 1.0)
    assert rel(tilde, g @ torch.linalg.pinv(a) @ a) <= 1e-12


def one_full_step(lr: float):
    model, layer = single_linear(M, N, R, alpha=3.0, method="lora-pro")
    x, y = quadratic_problem(M, N)
    w0 = effective_weight(layer)
    pair = factor_pairs(model)[0]
    a, b, s = pair.a.detach().clone(), pair.b.detach().clone(), pair.scaling
    g = quadratic_grad(w0, x, y)
    quadratic_loss(model, x, y).backward()
    opt = peftkit.optimizer(model, lr, eps=1e-8)
    opt.step()
    tilde = equivalent_gradient(a, b, s * b.T @ g, s * g @ a.T, s)
    direction = tilde / (tilde.abs() + 1e-8)  # bias-corrected Adam direction at step 1
    expected = -lr * closest_tangent(a, b, direction)
    return rel(effective_weight(layer) - w0, expected)


def test_one_step_end_to_end_first_order():
    errors = [one_full_step(lr) for lr in (1e-3, 5e-4, 2.5e-4)]
    assert errors[0] < 1e-2
    for big, small in zip(errors, errors[1:]):
        assert 0.4 < small / big < 0.6, errors  # O(η): halves with η


def full_rank_deviation(lr: float, steps: int = 5) -> float:
    m, n = 8, 5
    model, layer = single_linear(m, n, n, method="lora-pro")  # r = n: P_A = I, g̃ = G
    x, y = quadratic_problem(m, n)
    opt = peftkit.optimizer(model, lr)
    w = effective_weight(layer).requires_grad_(True)
    adamw = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)
    w_start = w.detach().clone()
    for _ in range(steps):
        quadratic_loss(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        quadratic_loss(lambda inp: inp @ w.T, x, y).backward()
        adamw.step()
        adamw.zero_grad()
    return rel(effective_weight(layer), w.detach()) * w.norm().item() / (w.detach() - w_start).norm().item()


def test_full_rank_tracks_adamw_to_second_order():
    big, small = full_rank_deviation(1e-3), full_rank_deviation(5e-4)
    assert big < 1e-2 and 0.4 < small / big < 0.6  # relative to the displacement: O(η), i.e. O(η²) per step


def test_per_layer_scaling_reaches_the_adjustment():
    """rsLoRA + alpha_pattern + rank_pattern: each pair's s (from factor_pairs) makes g̃ the optimum."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 9, bias=False), nn.Tanh(), nn.Linear(9, 4, bias=False)).double()
    model = peftkit.wrap(base, "lora-pro", r=2, alpha=5.0, rslora=True, targets=["0", "2"],
                         alpha_pattern={"2": 1.5}, rank_pattern={"0": 3})
    for pair in factor_pairs(model):
        with torch.no_grad():
            pair.b.normal_()
        pair.layer.base_layer.weight.requires_grad_(True)  # autograd then gives G itself
    x = torch.randn(11, 6, dtype=torch.float64)
    (model(x) ** 2).sum().backward()
    scalings = []
    for pair in factor_pairs(model):
        g = pair.layer.base_layer.weight.grad
        tilde = equivalent_gradient(pair.a.detach(), pair.b.detach(), pair.a.grad, pair.b.grad, pair.scaling)
        assert rel(tilde, closest_tangent(pair.a.detach(), pair.b.detach(), g)) <= 1e-12
        scalings.append(pair.scaling)
    assert scalings == pytest.approx([5.0 / 3**0.5, 1.5 / 2**0.5])


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_no_square_projector_and_state_shapes(mode):
    m, n, r = 11, 7, 3  # 2r, r, m and n all differ, so an (m, m) or (n, n) shape can only be a projector
    model, layer = single_linear(m, n, r, dtype=torch.float32, method="lora-pro", mode=mode,
                                 moment_dtype="bfloat16")
    x, y = quadratic_problem(m, n, dtype=torch.float32)
    opt = peftkit.optimizer(model, 1e-3)
    for _ in range(2):
        quadratic_loss(model, x, y).backward()
        with ShapeRecorder() as recorder:
            opt.step()
        opt.zero_grad()
        assert (m, m) not in recorder.shapes and (n, n) not in recorder.shapes
    state = opt.state[factor_pairs(model)[0].a]
    if mode == "full":
        assert state["exp_avg"].shape == (m, n) and state["exp_avg_sq"].shape == (m, n)
        assert state["exp_avg"].dtype == torch.bfloat16
    else:
        assert state["exp_avg"].shape == (r, n)


def test_efficient_mode_is_adamw_on_the_adjusted_gradients():
    model, layer = single_linear(M, N, R, method="lora-pro", mode="efficient", alpha=4.0)
    pair = factor_pairs(model)[0]
    x, y = quadratic_problem(M, N)
    quadratic_loss(model, x, y).backward()
    g_a, g_b, _ = adjusted_gradients(pair.a.detach(), pair.b.detach(), pair.a.grad, pair.b.grad, pair.scaling)
    copies = [pair.a.detach().clone().requires_grad_(True), pair.b.detach().clone().requires_grad_(True)]
    copies[0].grad, copies[1].grad = g_a, g_b
    reference = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.1)
    reference.step()
    peftkit.optimizer(model, 1e-2, weight_decay=0.1).step()
    torch.testing.assert_close(pair.a.detach(), copies[0].detach(), atol=1e-14, rtol=0)
    torch.testing.assert_close(pair.b.detach(), copies[1].detach(), atol=1e-14, rtol=0)


def run_pro(scale: float | None, max_grad_norm: float | None = None):
    """Three LoRA-Pro steps, plain or through a GradScaler with ``scale``; (W_eff, clip norms seen)."""
    model, layer = single_linear(M, N, R, dtype=torch.float32, method="lora-pro", max_grad_norm=max_grad_norm)
    x, y = quadratic_problem(M, N, dtype=torch.float32)
    opt = peftkit.optimizer(model, 1e-2)
    norms = []
    for _ in range(3):
        loss = quadratic_loss(model, x, y)
        if scale is None:
            loss.backward()
            opt.step()
        else:
            scaler = torch.amp.GradScaler("cpu", init_scale=scale)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            scaler.step(opt)
        if opt.last_grad_norm is not None:
            norms.append(opt.last_grad_norm.item())
        opt.zero_grad()
    return effective_weight(layer), norms


def test_clipping_order_with_loss_scaling():
    plain, _ = run_pro(None)
    scaled, _ = run_pro(2.0**12)
    torch.testing.assert_close(scaled, plain, atol=1e-6, rtol=1e-6)
    # max_grad_norm clips the unscaled raw gradients by min(1, c/‖raw‖) before the adjustment.
    clipped, norms = run_pro(2.0**12, max_grad_norm=0.5)
    model, layer = single_linear(M, N, R, dtype=torch.float32, method="lora-pro")
    x, y = quadratic_problem(M, N, dtype=torch.float32)
    opt = peftkit.optimizer(model, 1e-2)
    for step in range(3):
        quadratic_loss(model, x, y).backward()
        raw = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).norm()
        assert raw.item() == pytest.approx(norms[step], rel=1e-5)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(min(1.0, 0.5 / (raw.item() + 1e-6)))
        opt.step()
        opt.zero_grad()
    assert max(norms) > 0.5  # the clip was active
    torch.testing.assert_close(clipped, effective_weight(layer), atol=1e-6, rtol=1e-6)


def authors_step(a, b, grad_a, grad_b, state, s, lr, wd, max_norm, reference_code, betas=(0.9, 0.999), eps=1e-8,
                 damping=None):
    """One full-mode LoRA-Pro step written out from the formulas (not peftkit's code): exact inverses, X from the
    Kronecker form of the Sylvester equation. ``reference_code``: the official DeepSpeed conventions, bias
    correction at t + 1 and the raw-gradient clip factor applied to the adjusted gradients; otherwise the
    standard ones, bias correction at t and the raw gradients clipped before everything; with ``reference_code`` the
    inverses are damped, (BᵀB + δI)⁻¹ and (AAᵀ + δI)⁻¹ with δ = 1e-8, and the Sylvester operator is not."""
    m, r = b.shape
    coef = min(1.0, max_norm / ((grad_a.square().sum() + grad_b.square().sum()).sqrt().item() + 1e-6))
    if not reference_code:
        grad_a, grad_b = grad_a * coef, grad_b * coef
    damping = (1e-8 if reference_code else 0.0) if damping is None else damping
    eye_r = torch.eye(r, dtype=a.dtype)
    inverse = torch.linalg.inv if damping > 0 else torch.linalg.pinv  # undamped at B = 0: the pseudo-inverse
    btb_inv, aat_inv = inverse(b.T @ b + damping * eye_r), inverse(a @ a.T + damping * eye_r)
    outside = torch.eye(m, dtype=a.dtype) - b @ btb_inv @ b.T
    g_tilde = s * (b @ (btb_inv @ grad_a) + (outside @ grad_b @ aat_inv) @ a) / s ** 2
    state["t"] += 1
    k = state["t"] + (1 if reference_code else 0)
    state["m"] = betas[0] * state["m"] + (1 - betas[0]) * g_tilde
    state["v"] = betas[1] * state["v"] + (1 - betas[1]) * g_tilde ** 2
    d = (state["m"] / (1 - betas[0] ** k)) / ((state["v"] / (1 - betas[1] ** k)).sqrt() + eps)
    ga_d, gb_d = s * b.T @ d, s * d @ a.T
    # (BᵀB)X + X(AAᵀ) = C  <=>  (I ⊗ BᵀB + (AAᵀ)ᵀ ⊗ I) vec(X) = vec(C), column-major vec.
    c = -(btb_inv @ ga_d @ a.T) / s ** 2
    eye = torch.eye(r, dtype=a.dtype)
    vec_x = torch.linalg.solve(torch.kron(eye, b.T @ b) + torch.kron((a @ a.T).T.contiguous(), eye), c.T.reshape(-1))
    x = vec_x.reshape(r, r).T
    new_ga = btb_inv @ ga_d / s ** 2 + x @ a
    new_gb = outside @ gb_d @ aat_inv / s ** 2 - b @ x
    if reference_code:
        new_ga, new_gb = new_ga * coef, new_gb * coef
    return a * (1 - lr * wd) - lr * new_ga, b * (1 - lr * wd) - lr * new_gb, coef


@pytest.mark.parametrize("reference_code", [False, True])
def test_reference_code_matches_the_authors_update(reference_code):
    """reference_code=True equals a hand-written copy of the official update over 5 steps (fp64, ≤ 1e-10),
    with active clipping and weight decay; the default equals the standard form, and the two differ."""
    lr, wd, max_norm, alpha = 1e-2, 0.05, 0.5, 3.0
    x, y = quadratic_problem(M, N)
    model, layer = single_linear(M, N, R, alpha=alpha, method="lora-pro")
    pair = factor_pairs(model)[0]
    # The default without naming the option: it is the optimizer peftkit had before reference_code existed.
    opt = peftkit.optimizer(model, lr, weight_decay=wd, max_grad_norm=max_norm,
                            **({"reference_code": True} if reference_code else {}))
    a, b = pair.a.detach().clone(), pair.b.detach().clone()
    state = {"t": 0, "m": torch.zeros(M, N, dtype=torch.float64), "v": torch.zeros(M, N, dtype=torch.float64)}
    other = {"t": 0, "m": state["m"].clone(), "v": state["v"].clone()}
    a_other, b_other = a.clone(), b.clone()
    for _ in range(5):
        quadratic_loss(model, x, y).backward()
        a, b, coef = authors_step(a, b, pair.a.grad.clone(), pair.b.grad.clone(), state, pair.scaling, lr, wd,
                                  max_norm, reference_code)
        a_other, b_other, _ = authors_step(a_other, b_other, pair.a.grad.clone(), pair.b.grad.clone(), other,
                                           pair.scaling, lr, wd, max_norm, not reference_code)
        assert coef < 1  # the clip is active
        opt.step()
        opt.zero_grad()
        assert rel(pair.a.detach(), a) <= 1e-10 and rel(pair.b.detach(), b) <= 1e-10
    assert rel(pair.a.detach(), a_other) > 1e-3  # the other convention is a different trajectory


def test_reference_code_damps_the_inverses_like_the_authors_from_b_zero():
    """From B = 0 at the authors' lr 2e-5, BᵀB stays below their damping δ = 1e-8 for the first steps:
    reference_code=True equals a hand-written update with (BᵀB + δI)⁻¹ and (AAᵀ + δI)⁻¹ (fp64, ≤ 1e-9), and the
    same update without the damping moves W in a clearly different direction (negative control)."""
    m, n, r, lr = 16, 12, 4, 2e-5
    gen = torch.Generator().manual_seed(7)
    a0 = torch.randn(r, n, generator=gen, dtype=torch.float64) / n ** 0.5  # LoRA's A scale: AAᵀ = O(1)
    model, layer = single_linear(m, n, r, alpha=2 * r, method="lora-pro", a=a0, b=torch.zeros(m, r))
    pair = factor_pairs(model)[0]
    x, y = quadratic_problem(m, n)
    opt = peftkit.optimizer(model, lr, reference_code=True)
    start = effective_weight(layer)
    states = {d: {"t": 0, "m": torch.zeros(m, n, dtype=torch.float64), "v": torch.zeros(m, n, dtype=torch.float64)}
              for d in (1e-8, 0.0)}
    factors = {d: (a0.clone(), torch.zeros(m, r, dtype=torch.float64)) for d in states}
    for step in range(3):
        quadratic_loss(model, x, y).backward()
        if step == 1:
            b = pair.b.detach()
            assert torch.linalg.eigvalsh(b.T @ b).max() < 1e-8  # B has moved, but BᵀB is still below δ
        for d, state in states.items():
            a, b = factors[d]
            factors[d] = authors_step(a, b, pair.a.grad.clone(), pair.b.grad.clone(), state, pair.scaling, lr, 0.0,
                                      float("inf"), True, damping=d)[:2]
        opt.step()
        opt.zero_grad()
        damped_a, damped_b = factors[1e-8]
        assert rel(pair.a.detach(), damped_a) <= 1e-9 and rel(pair.b.detach(), damped_b) <= 1e-9, step
    moved = effective_weight(layer) - start
    undamped_a, undamped_b = factors[0.0]
    undamped = pair.scaling * undamped_b @ undamped_a
    cosine = float((moved * undamped).sum() / (moved.norm() * undamped.norm()))
    assert cosine < 0.99, cosine  # without the damping: another update


def test_reference_code_needs_full_mode():
    model, _ = single_linear(M, N, R, method="lora-pro")
    with pytest.raises(peftkit.ConfigError, match="reference_code"):
        peftkit.optimizer(model, 1e-2, mode="efficient", reference_code=True)
