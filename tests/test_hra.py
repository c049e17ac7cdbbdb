"""HRA (hra.md): every numbered test of the spec, against dense fp64 references built here from U, and PEFT.

The dense reference Q = H₁⋯H_r is a plain product of in×in reflections, independent of the layer's WY form.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
from helpers import make_batch, output, quiet, randomize_adapters, tiny_llama, tiny_llama_4bit
from helpers import randomize_adapter as randomize
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import peftkit
from peftkit import registry
from peftkit.adapters.hra import HraLayer
from peftkit.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_tensors
from peftkit.config import resolve_config
from peftkit.errors import ConfigError, StateError
from peftkit.inject import adapter_layers

PAIR_OPTIMIZERS = [name for name in ("lora-plus", "lora-pro", "loft", "lora-one-preconditioner")
                   if name in registry.components("optimizer")]


def hra_layer(in_features=16, out_features=12, r=4, dtype=torch.float64, bias=True, seed=0, **options) -> HraLayer:
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    config = resolve_config("hra", r=r, **options)
    layer = HraLayer(base, "layer")
    layer.add_adapter("default", r, config.alpha, config)
    layer.set_active(["default"])
    return layer


def dense_q(u: torch.Tensor) -> torch.Tensor:
    """Q = H₁ H₂ ⋯ H_r in fp64, Hᵢ = I − 2ûᵢûᵢᵀ, as explicit in×in products."""
    u = u.detach().double()
    q = torch.eye(u.shape[0], dtype=torch.float64)
    for i in range(u.shape[1]):
        h = u[:, i] / u[:, i].norm()
        q = q @ (torch.eye(u.shape[0], dtype=torch.float64) - 2 * torch.outer(h, h))
    return q


def linear_ref(x, weight, bias):
    return x @ weight.t() + (0 if bias is None else bias)


# ------------------------------------------------------------------------------------------ 1. init
def test_paired_init_is_identity_and_keeps_output():
    layer = hra_layer(in_features=32, out_features=24, r=8, dtype=torch.float32)
    u = layer.adapters["default"].hra_u
    assert torch.equal(u[:, 0::2], u[:, 1::2]), "paired init: columns 2j and 2j+1 must be equal"
    assert u.abs().min() > 0
    torch.testing.assert_close(dense_q(u), torch.eye(32, dtype=torch.float64), atol=1e-6, rtol=0)
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("options", [dict(r=3), dict(r=4, init_weights=False), dict(r=4, apply_GS=True)])
def test_non_identity_inits_change_the_output(options):
    """Odd r, init_weights=False and Gram-Schmidt start away from the identity (PEFT behaviour, documented)."""
    r = options.pop("r")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = hra_layer(r=r, **options)
    assert any("starts away from the base model" in str(w.message) for w in caught)
    u = layer.adapters["default"].hra_u
    assert not torch.equal(u[:, 0::2], u[:, 1::2]) and torch.isfinite(u).all()
    x = torch.randn(5, 16, dtype=torch.float64)
    assert (layer(x) - layer.base_layer(x)).norm() > 1e-3 * layer.base_layer(x).norm()


# ------------------------------------------------------------------------------------------ 2. forward
def test_forward_equals_dense_reference_fp64():
    layer = hra_layer(r=4)
    randomize(layer)
    u = layer.adapters["default"].hra_u
    q = dense_q(u)
    weight, bias = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    expected = linear_ref(x, weight @ q, bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=0)
    # Weight side (the merge) == activation side.
    merged, merged_bias = layer.merge_weights("default", weight.clone(), bias.clone())
    torch.testing.assert_close(merged, weight @ q, atol=1e-12, rtol=0)
    assert torch.equal(merged_bias, bias)
    # WY form == the dense product.
    v, t = layer.reflections("default")
    torch.testing.assert_close(torch.eye(16, dtype=torch.float64) - v @ t @ v.t(), q, atol=1e-12, rtol=0)
    # The order is PEFT's: the reversed chain is a different model.
    reversed_q = dense_q(u.flip(1))
    assert (reversed_q - q).abs().max() > 1e-3


def test_half_precision_base_keeps_fp32_reflections():
    layer = hra_layer(r=4, dtype=torch.bfloat16)
    assert layer.adapters["default"].hra_u.dtype == torch.float32
    randomize(layer)
    x = torch.randn(4, 16).to(torch.bfloat16)
    weight, bias = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    expected = linear_ref(x.double(), weight @ dense_q(layer.adapters["default"].hra_u), bias)
    got = layer(x)
    assert got.dtype == torch.bfloat16
    assert (got.double() - expected).norm() / expected.norm() <= 2e-2


# ------------------------------------------------------------------------------------------ 3. orthogonality
def test_orthogonality_singular_values_and_rank():
    for r in (3, 4):
        layer = hra_layer(in_features=24, out_features=20, r=r, seed=r)
        randomize(layer, seed=r)
        q = dense_q(layer.adapters["default"].hra_u)
        v, t = layer.reflections("default")
        q_wy = torch.eye(24, dtype=torch.float64) - v @ t @ v.t()
        torch.testing.assert_close(q_wy, q, atol=1e-12, rtol=0)  # the WY form is the explicit reflection product
        torch.testing.assert_close(q_wy.t() @ q_wy, torch.eye(24, dtype=torch.float64), atol=1e-12, rtol=0)
        assert abs(torch.linalg.det(q_wy).item() - (-1) ** r) < 1e-10
        weight = layer.base_layer.weight.detach()
        merged, _ = layer.merge_weights("default", weight.clone(), None)
        assert torch.linalg.matrix_rank(merged - weight).item() <= r
    # Singular values preserved, fp32.
    layer = hra_layer(in_features=24, out_features=20, r=8, dtype=torch.float32)
    randomize(layer)
    weight = layer.base_layer.weight.detach()
    merged, _ = layer.merge_weights("default", weight.clone(), None)
    assert (merged - weight).norm() > 1e-2 * weight.norm()
    sv, sv_merged = torch.linalg.svdvals(weight), torch.linalg.svdvals(merged)
    assert ((sv_merged - sv).abs() / sv.max()).max() <= 1e-5


# ------------------------------------------------------------------------------------------ 4. merge / unmerge
def test_merge_unmerge_round_trip_and_two_adapters():
    layer = hra_layer(in_features=32, out_features=24, r=8, dtype=torch.float32)
    randomize(layer)
    config = resolve_config("hra", r=6)
    layer.add_adapter("second", 6, config.alpha, config)
    randomize(layer, "second", seed=2)
    weight = layer.base_weight().clone()
    x = torch.randn(4, 32)
    layer.set_active(["default"])
    single = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), single, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert (layer.base_weight() - weight).norm() / weight.norm() <= 1e-6
    # Two adapters: W Q₁ Q₂ in the forward and in the merge; unmerging both restores W.
    layer.set_active(["default", "second"])
    q = dense_q(layer.adapters["default"].hra_u) @ dense_q(layer.adapters["second"].hra_u)
    expected = linear_ref(x.double(), weight.double() @ q, layer.bias.detach().double())
    both = layer(x)
    torch.testing.assert_close(both.double(), expected, atol=1e-5, rtol=1e-5)
    layer.merge()
    assert layer.merged_adapters == ["default", "second"]
    torch.testing.assert_close(layer(x), both, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert (layer.base_weight() - weight).norm() / weight.norm() <= 1e-6


def test_zero_column_is_refused_on_merge():
    layer = hra_layer()
    with torch.no_grad():
        layer.adapters["default"].hra_u[:, 1] = 0
    weight = layer.base_weight().clone()
    with pytest.raises(StateError, match="zero column"):
        layer.merge()
    assert torch.equal(layer.base_weight(), weight) and not layer.merged_adapters


# ------------------------------------------------------------------------------------------ 5. GS and regulariser
def test_gram_schmidt_mode_is_householder_of_the_qr_basis():
    layer = hra_layer(r=4, apply_GS=True)
    randomize(layer)
    u = layer.adapters["default"].hra_u.detach()
    basis = torch.linalg.qr(u).Q
    expected_q = torch.eye(16, dtype=torch.float64) - 2 * basis @ basis.t()
    v, t = layer.reflections("default")
    torch.testing.assert_close(torch.eye(16, dtype=torch.float64) - v @ t @ v.t(), expected_q, atol=1e-12, rtol=0)
    x = torch.randn(6, 16, dtype=torch.float64)
    weight, bias = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    torch.testing.assert_close(layer(x), linear_ref(x, weight @ expected_q, bias), atol=1e-12, rtol=0)


def test_regularizer_is_the_unsquared_frobenius_norm():
    layer = hra_layer(r=4, orth_reg_weight=0.5)
    u = layer.adapters["default"].hra_u.detach()
    u_hat = u / u.norm(dim=0)
    norm = torch.linalg.norm(torch.eye(4, dtype=torch.float64) - u_hat.t() @ u_hat)
    assert norm >= 2.0 - 1e-12  # ≥ √r at the paired init
    torch.testing.assert_close(layer.regularization(), 0.5 * norm, atol=1e-12, rtol=0)
    # Orthonormal (here scaled) columns: 0.
    with torch.no_grad():
        layer.adapters["default"].hra_u.copy_(3.0 * torch.linalg.qr(torch.randn(16, 4, dtype=torch.float64)).Q)
    assert abs(layer.regularization().item()) <= 1e-12
    # λ = 0 (the default): no term at all.
    assert hra_layer(r=4).regularization() is None


def test_regularization_loss_sums_layers_and_trains_u():
    model = tiny_llama()
    peftkit.wrap(model, "hra", r=4, orth_reg_weight=1e-2)
    layers = adapter_layers(model)
    expected = 0.0
    for layer in layers.values():
        u = layer.adapters["default"].hra_u.detach().double()
        u_hat = u / u.norm(dim=0)
        expected += 1e-2 * torch.linalg.norm(torch.eye(4, dtype=torch.float64) - u_hat.t() @ u_hat).item()
    loss = peftkit.regularization_loss(model)
    assert abs(loss.item() - expected) <= 1e-5 * expected
    loss.backward()
    assert all(layer.adapters["default"].hra_u.grad.abs().sum() > 0 for layer in layers.values())
    plain = tiny_llama()
    peftkit.wrap(plain, "hra", r=4)
    assert peftkit.regularization_loss(plain).item() == 0.0


# ------------------------------------------------------------------------------------------ 6. first-order update
def test_first_order_update_at_the_paired_init():
    torch.manual_seed(3)
    x = torch.randn(20, 10, dtype=torch.float64)
    c = torch.randn(20, 8, dtype=torch.float64)  # L = Σ y ⊙ c, so Δ = c and G = cᵀ x

    def step(eta):
        layer = hra_layer(in_features=10, out_features=8, r=4, bias=False, seed=5)
        weight = layer.base_layer.weight.detach().clone()
        u = layer.adapters["default"].hra_u
        (layer(x) * c).sum().backward()
        with torch.no_grad():
            u -= eta * u.grad
        merged, _ = layer.merge_weights("default", weight.clone(), None)
        return merged - weight, weight, u.detach() + eta * u.grad  # ΔW, W, U at init

    grad = c.t() @ x
    errors = []
    for eta in (1e-4, 5e-5):
        delta, weight, u0 = step(eta)
        s = weight.t() @ grad - grad.t() @ weight
        predicted = torch.zeros(10, 10, dtype=torch.float64)
        for j in range(0, 4, 2):
            h = u0[:, j]
            p = torch.outer(h, h) / (h @ h)
            predicted += 8 / (h @ h) * (s @ p + p @ s)
        predicted = -eta * weight @ predicted
        errors.append(((delta - predicted).norm() / predicted.norm()).item())
    assert errors[0] < 1e-2
    assert 1.7 < errors[0] / errors[1] < 2.3, errors  # O(η): halves with η


# ------------------------------------------------------------------------------------------ 7. PEFT format
@pytest.mark.parametrize("apply_gs", [False, True])
def test_peftkit_checkpoint_loads_in_peft(tmp_path, apply_gs):
    from peft import PeftModel

    model = tiny_llama()
    batch = make_batch(model)
    peftkit.wrap(model, "hra", r=4, apply_GS=apply_gs, targets=["q_proj", "v_proj", "down_proj"])
    randomize_adapters(model, std=0.3)
    ours = output(model, batch)
    peftkit.save(model, tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["peft_type"] == "HRA" and saved["apply_GS"] is apply_gs and saved["init_weights"] is True
    assert saved["r"] == 4 and sorted(saved["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    keys = read_tensors(tmp_path / WEIGHTS_NAME)
    assert all(k.startswith("base_model.model.") and k.endswith(".hra_u") for k in keys) and len(keys) == 6
    with quiet():
        peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    torch.testing.assert_close(output(peft_model, batch), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("apply_gs", [False, True])
def test_peft_checkpoint_loads_in_peftkit(tmp_path, apply_gs):
    from peft import HRAConfig, get_peft_model

    reference = tiny_llama()
    batch = make_batch(reference)
    peft_model = get_peft_model(reference, HRAConfig(r=4, apply_GS=apply_gs, target_modules=["q_proj", "up_proj"]))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "hra_u" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    peft_model.eval()
    theirs = output(peft_model, batch)
    assert (theirs - output(tiny_llama(), batch)).abs().max() > 1e-3
    peft_model.save_pretrained(str(tmp_path))
    fresh = tiny_llama()
    with quiet():
        peftkit.load(fresh, tmp_path, trainable=True)
    torch.testing.assert_close(output(fresh, batch), theirs, atol=1e-5, rtol=1e-5)
    # Training parity: the same loss gives the same gradient of every U.
    peft_model(**batch).loss.backward()
    fresh(**batch).loss.backward()
    peft_grads = {n.removeprefix("base_model.model.").removesuffix(".hra_u.default"): p.grad
                  for n, p in peft_model.named_parameters() if "hra_u" in n}
    ours_grads = {n: l.adapters["default"].hra_u.grad for n, l in adapter_layers(fresh).items()}
    assert peft_grads.keys() == ours_grads.keys() and len(ours_grads) == 4
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, peft_grads[name], atol=1e-6, rtol=1e-4)
    assert all(l.hra_options["default"]["apply_GS"] is apply_gs for l in adapter_layers(fresh).values())
    # Saving it again gives PEFT's own key set and shapes.
    peftkit.save(fresh, tmp_path / "again")
    ours = read_tensors(tmp_path / "again" / WEIGHTS_NAME)
    theirs_keys = read_tensors(tmp_path / WEIGHTS_NAME)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs_keys.items()}


# ------------------------------------------------------------------------------------------ 8. quantized base
def test_four_bit_base_transforms_the_activation():
    with quiet():
        model = tiny_llama_4bit()
    batch = make_batch(model)
    peftkit.wrap(model, "hra", r=4)
    randomize_adapters(model, std=0.3)
    layer = adapter_layers(model)["model.layers.0.mlp.down_proj"]
    assert layer.kind == "bnb4"
    x = torch.randn(2, 5, layer.in_features)
    q = dense_q(layer.adapters["default"].hra_u).float()
    with torch.no_grad():
        expected = layer.base_layer(x @ q.t())
        got = layer(x)
    assert (got - expected).norm() / expected.norm() <= 1e-5
    # It trains: U gets a gradient through the quantized base.
    model.train()
    model(**batch).loss.backward()
    assert layer.adapters["default"].hra_u.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ 9. speed
class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_activation_side_is_cheap_and_never_builds_an_in_by_in_matrix():
    n_in, n_out, r, tokens = 4096, 16, 8, 64
    layer = hra_layer(in_features=n_in, out_features=n_out, r=r, dtype=torch.float32, bias=False)
    randomize(layer)
    weight = layer.base_layer.weight.detach()
    x = torch.randn(tokens, n_in, requires_grad=True)

    def ours():
        layer(x).sum().backward()

    def dense():  # the weight-side implementation at its cheapest: Q = I − V T Vᵀ (in×in), then W·Q
        v, t = layer.reflections("default")
        q = torch.eye(n_in) - v @ t @ v.t()
        torch.nn.functional.linear(x, weight @ q).sum().backward()

    with _LargestTensor() as probe:
        ours()
    assert probe.largest < n_in * n_in / 8, probe.largest  # the largest is x (tokens×in), far from in×in
    # "Fast" as a count, not a clock: the FLOPs of a forward + backward (deterministic, unlike timings on a shared
    # machine). The dense path's in×in product alone is 2·in²·r-ish; ours stays linear in in.
    flops = {}
    for name, fn in (("ours", ours), ("dense", dense)):
        with FlopCounterMode(display=False) as counter:
            fn()
        flops[name] = counter.get_total_flops()
    assert flops["dense"] >= 3 * flops["ours"], flops


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("name", PAIR_OPTIMIZERS)
def test_pair_optimizers_are_rejected(name):
    """The (A, B)-pair optimizers are not defined for hra: refused at wrap or, at the latest, at optimizer()."""
    with pytest.raises(ConfigError, match=name):
        model = tiny_llama()
        peftkit.wrap(model, "hra", r=4, optimizer=name)
        peftkit.optimizer(model, lr=1e-3)


def test_bad_options_are_rejected():
    with pytest.raises(ConfigError, match="orth_reg_weight"):
        peftkit.wrap(tiny_llama(), "hra", orth_reg_weight=-1.0)
    with pytest.raises(ConfigError, match="apply_GS"):
        peftkit.wrap(tiny_llama(), "hra", apply_GS="yes")
