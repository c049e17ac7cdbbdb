"""LoRA+ against its spec (shared/methods/lora-plus.md, "Tests that must pass" 1-4)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from helpers import make_batches, randomize_adapters, tiny_llama

import peftkit
from peftkit.errors import ConfigError


class Net(nn.Module):
    """Embedding -> Linear (with bias) -> LayerNorm -> head: every kind of parameter LoRA+ must classify."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 8)
        self.proj = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.proj(self.emb(ids))))


def _lr_wd_by_name(model, opt):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}


# 1. grouping ----------------------------------------------------------------------------------------------------
def test_grouping_lr_and_weight_decay_per_parameter():
    model = Net()
    peftkit.wrap(model, "lora-plus", r=2, targets=["proj", "emb"], modules_to_save=["head"])
    model.ln.weight.requires_grad_(True)
    model.ln.bias.requires_grad_(True)
    model.proj.base_layer.bias.requires_grad_(True)
    eta, lam, wd = 1e-3, 16.0, 0.1
    got = _lr_wd_by_name(model, peftkit.optimizer(model, lr=eta, weight_decay=wd))
    expected = {
        "proj.adapters.default.lora_A.weight": (eta, wd),
        "proj.adapters.default.lora_B.weight": (lam * eta, wd),
        "emb.adapters.default.lora_embedding_A": (1e-6, wd),
        "emb.adapters.default.lora_embedding_B": (1e-6, wd),
        "proj.base_layer.bias": (eta, 0.0),
        "ln.weight": (eta, 0.0),
        "ln.bias": (eta, 0.0),
        "head.modules_to_save.default.weight": (eta, wd),
        "head.modules_to_save.default.bias": (eta, 0.0),
    }
    assert set(got) == set(expected)
    for name, (lr, decay) in expected.items():
        assert math.isclose(got[name][0], lr, rel_tol=1e-12), name
        assert got[name][1] == decay, name
    custom = _lr_wd_by_name(model, peftkit.optimizer(model, lr=eta, loraplus_lr_ratio=4, loraplus_lr_embedding=3e-5))
    assert math.isclose(custom["proj.adapters.default.lora_B.weight"][0], 4 * eta)
    assert custom["emb.adapters.default.lora_embedding_A"][0] == 3e-5
    with pytest.raises(ConfigError, match="loraplus_lr_embedding"):
        peftkit.optimizer(model, lr=eta, loraplus_lr_embedding=0)


def test_conv_lora_factors_get_a_and_b_roles():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    peftkit.wrap(model, "lora-plus", r=2, targets=["0"])
    got = _lr_wd_by_name(model, peftkit.optimizer(model, lr=1e-3))
    assert math.isclose(got["0.adapters.default.lora_A.weight"][0], 1e-3)
    assert math.isclose(got["0.adapters.default.lora_B.weight"][0], 16e-3)


# 2. first AdamW steps -------------------------------------------------------------------------------------------
def test_first_adamw_step_moves_only_b_by_lambda_eta():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 7))
    peftkit.wrap(model, "lora-plus", r=3, targets=["0"])
    branch = model[0].adapters["default"]
    eta, lam = 1e-3, 16.0
    opt = peftkit.optimizer(model, lr=eta, weight_decay=0.0, eps=1e-12)
    betas = opt.param_groups[0]["betas"]
    x, y = torch.randn(12, 10), torch.randn(12, 7)

    def step():
        a0, b0 = branch.lora_A.weight.detach().clone(), branch.lora_B.weight.detach().clone()
        (model(x) - y).pow(2).mean().backward()
        grad_a = branch.lora_A.weight.grad.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return branch.lora_A.weight.detach() - a0, branch.lora_B.weight.detach() - b0, grad_a

    delta_a, delta_b, grad_a = step()
    assert torch.count_nonzero(grad_a) == 0 and torch.count_nonzero(delta_a) == 0
    moved = delta_b != 0
    assert moved.all()
    torch.testing.assert_close(delta_b.abs(), torch.full_like(delta_b, lam * eta), rtol=1e-6, atol=0)
    # Step 2: A's first non-zero gradient, at torch's per-parameter t = 2 with m1 = v1 = 0, moves it by
    # η·√(1+β₂)/(1+β₁) (about 0.74η), not λη.
    delta_a, _, grad_a = step()
    assert torch.count_nonzero(grad_a) == grad_a.numel()
    want = eta * math.sqrt(1 + betas[1]) / (1 + betas[0])
    torch.testing.assert_close(delta_a.abs(), torch.full_like(delta_a, want), rtol=1e-5, atol=0)


# 3. λ = 1 is plain LoRA -----------------------------------------------------------------------------------------
def test_lambda_one_bit_identical_to_plain_lora():
    results = []
    for method, extra in (("lora", {}), ("lora-plus", {"loraplus_lr_ratio": 1.0})):
        model = tiny_llama()
        peftkit.wrap(model, method, r=4, alpha=8, seed=0)
        batches = make_batches(model, n=3)
        opt = peftkit.optimizer(model, lr=1e-2, weight_decay=0.01, **extra)
        model.train()
        for batch in batches:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in results[0].items() if "lora_B" in k)


# 4. first-order SGD update with the LoRA+ learning rates -------------------------------------------------------
def _first_order_error(eta: float, lam: float = 16.0) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6)).double()
    peftkit.wrap(model, "lora-plus", r=3, alpha=6, targets=["0"])
    randomize_adapters(model, std=0.5)
    layer = model[0]
    a, b = layer.adapters["default"].lora_A.weight, layer.adapters["default"].lora_B.weight
    groups = peftkit.optimizer(model, lr=eta, loraplus_lr_ratio=lam).param_groups
    s = 2.0
    x, target = torch.randn(10, 8, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
    w_before = layer.base_weight() + layer.delta_weight("default").detach()
    grad_w = (x @ w_before.T + layer.base_layer.bias.detach() - target).T @ x  # G of ½‖y − target‖², by hand
    (0.5 * (model(x) - target).pow(2).sum()).backward()
    a0, b0 = a.detach().clone(), b.detach().clone()
    with torch.no_grad():  # one plain SGD step with each group's LoRA+ learning rate
        for group in groups:
            for p in group["params"]:
                p -= group["lr"] * p.grad
    w_after = layer.base_weight() + layer.delta_weight("default").detach()
    predicted = -eta * s * s * (b0 @ b0.T @ grad_w + lam * grad_w @ a0.T @ a0)
    return ((w_after - w_before - predicted).norm() / predicted.norm()).item()


def test_first_order_update_sgd_with_lambda():
    errors = [_first_order_error(eta) for eta in (1e-4, 5e-5, 2.5e-5)]
    assert errors[0] < 0.1
    for big, small in zip(errors, errors[1:]):
        assert 0.4 < small / big < 0.6
