"""Hydra (hydra.md): every numbered test of the spec against hand formulas in fp64, and the PEFT LoRA export."""

from __future__ import annotations

import functools
import json

import bnb_paths
import pytest
import torch
import torch.nn as nn
from helpers import (
    make_batch,
    output,
    quiet,
    randomize_adapter,
    randomize_adapters,
    tiny_gpt2,
    tiny_llama,
    tiny_llama_4bit,
)

import peftkit
from peftkit import registry
from peftkit.adapters.hydra import HydraLayer
from peftkit.adapters.lora import LoraLayer
from peftkit.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_tensors
from peftkit.config import resolve_config
from peftkit.errors import ConfigError, StateError
from peftkit.inject import adapter_layers

PAIR_OPTIMIZERS = [name for name in ("lora-plus", "lora-pro", "loft", "lora-one-preconditioner")
                   if name in registry.components("optimizer")]

F64 = dict(atol=1e-12, rtol=0)

randomize = functools.partial(randomize_adapter, std=0.3)


def hydra_layer(in_features=12, out_features=8, r=3, bias=True, seed=0, dtype=torch.float64, **options) -> HydraLayer:
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    config = resolve_config("hydra", r=r, **options)
    layer = HydraLayer(base, "layer")
    layer.add_adapter("default", r, config.alpha, config)
    layer.set_active(["default"])
    return layer


def factors(layer: HydraLayer, name: str = "default"):
    br = layer.adapters[name]
    get = lambda m: (m.weight.detach(), None if m.bias is None else m.bias.detach())  # noqa: E731
    return get(br.parallel_A), get(br.parallel_B), get(br.sequential_A), get(br.sequential_B), br


def hand_forward(layer: HydraLayer, x: torch.Tensor) -> torch.Tensor:
    """y = y₀ + s_p((x A_pᵀ + a_p) B_pᵀ + b_p) + s_s((y₀ A_sᵀ + a_s) B_sᵀ + b_s), y₀ = x W₀ᵀ + b₀."""
    (a_p, ap), (b_p, bp), (a_s, as_), (b_s, bs), br = factors(layer)
    w0 = layer.base_layer.weight.detach()
    b0 = layer.base_layer.bias
    y0 = x @ w0.t() + (0 if b0 is None else b0.detach())
    z = lambda v: 0 if v is None else v  # noqa: E731
    p = (x @ a_p.t() + z(ap)) @ b_p.t() + z(bp)
    q = (y0 @ a_s.t() + z(as_)) @ b_s.t() + z(bs)
    return y0 + br.parallel_scale * p + br.sequential_scale * q


# ------------------------------------------------------------------------------------------ 1. init
def test_init_output_is_the_base_output_exactly():
    layer = hydra_layer(branch_bias=True, dtype=torch.float32)
    x = torch.randn(4, 12)
    assert torch.equal(layer(x), layer.base_layer(x))


# ------------------------------------------------------------------------------------------ 2. forward and merge
@pytest.mark.parametrize("branch_bias", [False, True])
def test_forward_and_merge_match_the_hand_formula(branch_bias):
    layer = hydra_layer(r=3, sequential_r=2, scale=0.7, sequential_scale=1.3, branch_bias=branch_bias)
    randomize(layer)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    expected = hand_forward(layer, x)
    torch.testing.assert_close(layer(x), expected, **F64)
    w0 = layer.base_layer.weight.detach().clone()
    b0 = layer.base_layer.bias.detach().clone()
    merged_w, merged_b = layer.merge_weights("default", w0.clone(), b0.clone())
    torch.testing.assert_close(x @ merged_w.t() + merged_b, expected, **F64)
    assert torch.linalg.matrix_rank(merged_w - w0).item() <= 3 + 2
    # Through the layer's own merge / unmerge.
    layer.merge()
    torch.testing.assert_close(layer.base_layer(x), expected, **F64)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight.detach(), w0, **F64)
    torch.testing.assert_close(layer.base_layer.bias.detach(), b0, **F64)


def test_two_adapters_compose_in_order_and_unmerge_exactly():
    layer = hydra_layer(r=2, dtype=torch.float32)
    config = resolve_config("hydra", r=3, sequential_r=1)
    layer.add_adapter("second", 3, config.alpha, config)
    randomize(layer)
    randomize(layer, "second", seed=2)
    layer.set_active(["default", "second"])
    x = torch.randn(6, 12)
    w0, b0 = layer.base_weight().clone(), layer.bias.detach().clone()
    # Adapter 2's sequential branch reads the output adapted by adapter 1.
    y1 = hand_forward(layer, x)
    (a_p, _), (b_p, _), (a_s, _), (b_s, _), br = factors(layer, "second")
    expected = y1 + br.parallel_scale * (x @ a_p.t()) @ b_p.t() + br.sequential_scale * (y1 @ a_s.t()) @ b_s.t()
    both = layer(x)
    torch.testing.assert_close(both, expected, atol=1e-5, rtol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer(x), both, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert (layer.base_weight() - w0).norm() <= 1e-6 * w0.norm()
    assert (layer.bias.detach() - b0).norm() <= 1e-6 * b0.norm()


# ------------------------------------------------------------------------------------------ 3. PEFT export
@pytest.mark.parametrize("branch_bias", [False, True])
def test_export_loads_in_peft_with_equal_outputs(tmp_path, branch_bias):
    from peft import PeftModel

    make = lambda: tiny_llama(attention_bias=True, mlp_bias=True)  # noqa: E731 - b₀ ≠ 0 everywhere
    model = make()
    batch = make_batch(model)
    peftkit.wrap(model, "hydra", r=2, sequential_r=3, scale=0.8, branch_bias=branch_bias,
                 rank_pattern={"down_proj": 4})
    randomize_adapters(model, std=0.1)
    ours = output(model, batch)
    assert (ours - output(make(), batch)).abs().max() > 1e-3
    peftkit.export(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["lora_bias"] is branch_bias and not config["use_rslora"]
    tensors = read_tensors(tmp_path / WEIGHTS_NAME)
    q_a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    down_a = tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"]
    assert q_a.shape[0] == 2 + 3 and down_a.shape[0] == 4 + 3  # rank r_p + r_s per layer
    assert any(k.endswith("lora_B.bias") for k in tensors) is branch_bias
    with quiet():
        peft_model = PeftModel.from_pretrained(make(), str(tmp_path)).eval()
    theirs = output(peft_model, batch)
    assert (theirs - ours).norm() / ours.norm() <= 1e-6
    # From a saved native checkpoint plus the base model: the same LoRA.
    peftkit.save(model, tmp_path / "native")
    peftkit.export(tmp_path / "native", tmp_path / "again", base_model=make())
    again = read_tensors(tmp_path / "again" / WEIGHTS_NAME)
    assert again.keys() == tensors.keys() and all(torch.allclose(again[k], tensors[k], atol=1e-7) for k in tensors)


@pytest.mark.parametrize("branch_bias", [False, True])
def test_export_lora_is_exact_fp64(branch_bias):
    """On a biased base the export carries s_s·B_s·A_s·b₀ (and the branch biases' change) as its bias."""
    layer = hydra_layer(r=3, sequential_r=2, scale=0.5, sequential_scale=2.0, branch_bias=branch_bias)
    randomize(layer)
    a, b, scale, bias = layer.export_lora("default")
    assert a.shape == (5, 12) and b.shape == (8, 5) and scale == 1.0 and bias is not None
    x = torch.randn(7, 12, dtype=torch.float64)
    torch.testing.assert_close(layer.base_layer(x) + x @ a.t() @ b.t() + bias, hand_forward(layer, x), **F64)
    # No bias anywhere (b₀ absent, no branch biases): a plain LoRA without lora_B.bias.
    plain = hydra_layer(r=3, sequential_r=2, bias=False)
    randomize(plain)
    a, b, _, bias = plain.export_lora("default")
    assert bias is None
    torch.testing.assert_close(plain.base_layer(x) + x @ a.t() @ b.t(), hand_forward(plain, x), **F64)
    with pytest.raises(StateError, match="unmerge"):
        layer.merge()
        layer.export_lora("default")


class OneLinear(nn.Module):
    """A bare Linear(48→40) with a bias, as a model (peftkit and PEFT both wrap any nn.Module)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(48, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def biased_gpt2() -> nn.Module:
    """The tiny GPT-2 (Conv1D) with non-zero biases everywhere, as pretrained GPT-2 has (HF's init zeroes them)."""
    model = tiny_gpt2()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def test_export_on_a_biased_linear_base_after_training(tmp_path):
    """Default branch_bias=False on Linear(48→40) with b₀ ≠ 0: the exported LoRA (lora_B.bias = s_s·B_s·A_s·b₀)
    loaded in PEFT gives the trained Hydra model's output, also after PEFT's merge_and_unload."""
    from peft import PeftModel

    def make() -> OneLinear:
        torch.manual_seed(0)
        return OneLinear()

    model = make()
    peftkit.wrap(model, "hydra", r=4, sequential_r=4, scale=0.9, targets=["proj"])
    opt = peftkit.optimizer(model, lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    x, target = torch.randn(16, 48, generator=gen), torch.randn(16, 40, generator=gen)
    for _ in range(10):
        ((model(x) - target) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        ours, base = model(x), make()(x)
    assert (ours - base).norm() / base.norm() > 1e-2  # the branches are trained
    peftkit.export(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["lora_bias"] is True
    with quiet():
        peft_model = PeftModel.from_pretrained(make(), str(tmp_path)).eval()
    with torch.no_grad():
        theirs = peft_model(x)
        merged = peft_model.merge_and_unload()(x)
    assert (theirs - ours).norm() / ours.norm() <= 1e-6
    assert (merged - ours).norm() / ours.norm() <= 1e-6


@pytest.mark.parametrize("branch_bias", [False, True])
def test_export_on_gpt2_with_nonzero_biases(tmp_path, branch_bias):
    """GPT-2's Conv1D layers with b₀ ≠ 0: PEFT's LoRA (fan_in_fan_out, lora_bias) equals the Hydra model."""
    from peft import PeftModel

    model = biased_gpt2()
    batch = make_batch(model)
    peftkit.wrap(model, "hydra", r=2, sequential_r=3, scale=0.8, branch_bias=branch_bias)
    randomize_adapters(model, std=0.1)
    ours = output(model, batch)
    assert (ours - output(biased_gpt2(), batch)).abs().max() > 1e-3
    peftkit.export(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["lora_bias"] is True and config["fan_in_fan_out"] is True
    with quiet():
        peft_model = PeftModel.from_pretrained(biased_gpt2(), str(tmp_path)).eval()
    theirs = output(peft_model, batch)
    assert (theirs - ours).norm() / ours.norm() <= 1e-6
    merged = output(peft_model.merge_and_unload(), batch)
    assert (merged - ours).norm() / ours.norm() <= 1e-6


def test_export_on_a_base_with_some_biased_targets(tmp_path):
    """Biased attention projections, bias-free MLP (a Qwen-like mix): PEFT's one lora_bias flag puts a zero
    lora_B.bias on the MLP layers, and the loaded LoRA still equals the Hydra model."""
    from peft import PeftModel

    def make():
        model = tiny_llama(attention_bias=True)
        gen = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        return model

    model = make()
    batch = make_batch(model)
    peftkit.wrap(model, "hydra", r=2, sequential_r=2)
    randomize_adapters(model, std=0.1)
    ours = output(model, batch)
    peftkit.export(model, tmp_path)
    tensors = read_tensors(tmp_path / WEIGHTS_NAME)
    mlp_bias = tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.bias"]
    assert torch.equal(mlp_bias, torch.zeros_like(mlp_bias))
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"].abs().max() > 0
    with quiet():
        peft_model = PeftModel.from_pretrained(make(), str(tmp_path)).eval()
    assert (output(peft_model, batch) - ours).norm() / ours.norm() <= 1e-6


# ------------------------------------------------------------------------------------------ 4. sequential branch
def test_sequential_branch_vanishes_on_the_null_space_of_w0():
    layer = hydra_layer(in_features=12, out_features=5, r=2, bias=False)
    randomize(layer)
    with torch.no_grad():
        layer.adapters["default"].parallel_B.weight.zero_()
    w0 = layer.base_layer.weight.detach()
    null = torch.linalg.svd(w0).Vh[5:]  # rows span the null space of W₀ (in > out)
    x = torch.randn(4, 7, dtype=torch.float64) @ null
    torch.testing.assert_close(layer(x), torch.zeros(4, 5, dtype=torch.float64), **F64)
    generic = torch.randn(4, 12, dtype=torch.float64)
    assert (layer(generic) - layer.base_layer(generic)).norm() > 1e-3  # the branch is not trivially zero


# ------------------------------------------------------------------------------------------ 5. ablations
def test_parallel_only_is_lora_and_sequential_only_stays_in_span_of_w0x():
    layer = hydra_layer(r=3, scale=0.6, bias=False)
    randomize(layer)
    with torch.no_grad():
        layer.adapters["default"].sequential_B.weight.zero_()
    lora = LoraLayer(layer.base_layer, "layer")
    config = resolve_config("lora", r=3, alpha=1.8)  # s = α/r = 0.6
    lora.add_adapter("default", 3, 1.8, config)
    lora.set_active(["default"])
    with torch.no_grad():
        lora.adapters["default"].lora_A.weight.copy_(layer.adapters["default"].parallel_A.weight)
        lora.adapters["default"].lora_B.weight.copy_(layer.adapters["default"].parallel_B.weight)
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), lora(x), **F64)
    # Sequential only (b₀ = 0): the change is a linear function of y₀ = W₀x alone. Over a batch X, its
    # columns lie in the column span of Y₀ = X W₀ᵀ (least-squares residual 0), and ΔW = s_s B_s A_s W₀ lies in
    # the row space of W₀ (5-dimensional in ℝ¹²: a parallel branch would leave it).
    layer = hydra_layer(in_features=12, out_features=5, r=3, bias=False)
    randomize(layer, seed=3)
    with torch.no_grad():
        layer.adapters["default"].parallel_B.weight.zero_()
    w0 = layer.base_layer.weight.detach()
    xs = torch.randn(20, 12, dtype=torch.float64)
    change = layer(xs) - layer.base_layer(xs)
    y0 = xs @ w0.t()
    coefficients = torch.linalg.lstsq(y0, change).solution
    torch.testing.assert_close(y0 @ coefficients, change, **F64)
    assert change.norm() > 1e-3
    delta = layer.merge_weights("default", w0.clone(), None)[0] - w0
    row_space = torch.linalg.pinv(w0) @ w0
    torch.testing.assert_close(delta @ row_space, delta, **F64)


# ------------------------------------------------------------------------------------------ 6. bias path
def test_sequential_branch_reads_the_base_bias():
    layer = hydra_layer(r=2, sequential_scale=1.7)
    randomize(layer)
    (_, _), (_, _), (a_s, _), (b_s, _), _ = factors(layer)
    b0 = layer.base_layer.bias.detach()
    x = torch.zeros(1, 12, dtype=torch.float64)
    change = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(change[0], 1.7 * b_s @ (a_s @ b0), **F64)


# ------------------------------------------------------------------------------------------ 7. first-order update
@pytest.mark.parametrize("base_bias", [False, True])
def test_first_order_update(base_bias):
    torch.manual_seed(4)
    x = torch.randn(30, 12, dtype=torch.float64)
    c = torch.randn(30, 8, dtype=torch.float64)  # L = Σ y ⊙ c ⇒ Δ = c, G = cᵀ x, g_b = cᵀ 1
    grad, grad_b = c.t() @ x, c.sum(0)

    def step(eta):
        layer = hydra_layer(r=3, sequential_r=2, scale=0.7, sequential_scale=1.4, bias=base_bias, seed=6)
        randomize(layer)
        w0 = layer.base_layer.weight.detach().clone()
        b0 = None if layer.bias is None else layer.bias.detach().clone()
        before, _ = layer.merge_weights("default", w0.clone(), None if b0 is None else b0.clone())
        (layer(x) * c).sum().backward()
        params = list(layer.adapters["default"].parameters())
        (a_p, _), (b_p, _), (a_s, _), (b_s, _), _ = factors(layer)
        snapshot = [t.clone() for t in (a_p, b_p, a_s, b_s)]
        with torch.no_grad():
            for p in params:
                p -= eta * p.grad
        after, _ = layer.merge_weights("default", w0.clone(), None if b0 is None else b0.clone())
        return after - before, w0, b0, snapshot

    errors = []
    for eta in (1e-4, 5e-5):
        delta, w0, b0, (a_p, b_p, a_s, b_s) = step(eta)
        g_tilde = grad @ w0.t() + (0 if b0 is None else torch.outer(grad_b, b0))
        predicted = 0.7 ** 2 * (b_p @ b_p.t() @ grad + grad @ a_p.t() @ a_p) \
            + 1.4 ** 2 * (b_s @ b_s.t() @ g_tilde @ w0 + g_tilde @ a_s.t() @ a_s @ w0)
        predicted = -eta * predicted
        errors.append(((delta - predicted).norm() / predicted.norm()).item())
    assert errors[0] < 1e-2
    assert 1.7 < errors[0] / errors[1] < 2.3, errors


# ------------------------------------------------------------------------------------------ quantized base
def test_four_bit_base_trains_and_exports_exactly(tmp_path):
    with quiet():
        model = tiny_llama_4bit()
    batch = make_batch(model)
    peftkit.wrap(model, "hydra", r=2)
    randomize_adapters(model, std=0.1)
    layer = adapter_layers(model)["model.layers.1.mlp.up_proj"]
    assert layer.kind == "bnb4"
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        y0 = layer.base_layer(x)
        got = layer(x)
    (a_p, _), (b_p, _), (a_s, _), (b_s, _), br = factors(layer)
    expected = y0 + (x @ a_p.t()) @ b_p.t() + (y0 @ a_s.t()) @ b_s.t()
    assert (got - expected).norm() / expected.norm() <= 1e-5
    a, b, _, _ = layer.export_lora("default")
    # Exact w.r.t. the dequantized base (to bf16 on bitsandbytes' packed CPU path, whose kernel computes in bf16).
    bnb_paths.assert_close(y0 + x @ a.t() @ b.t(), got, model, atol=1e-5 * float(got.abs().max()), rtol=0)
    model.train()
    model(**batch).loss.backward()
    assert br.sequential_A.weight.grad.abs().sum() > 0 and br.parallel_B.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("name", PAIR_OPTIMIZERS)
def test_pair_optimizers_are_rejected(name):
    """The (A, B)-pair optimizers are not defined for hydra: refused at wrap or, at the latest, at optimizer()."""
    with pytest.raises(ConfigError, match=name):
        model = tiny_llama()
        peftkit.wrap(model, "hydra", optimizer=name)
        peftkit.optimizer(model, lr=1e-3)


def test_bad_options_are_rejected():
    with pytest.raises(ConfigError, match="sequential_r"):
        peftkit.wrap(tiny_llama(), "hydra", sequential_r=0)
    with pytest.raises(ConfigError, match="sequential_r"):
        peftkit.wrap(tiny_llama(), "hydra", r=2, sequential_r=1000)
    with pytest.raises(ConfigError, match="down_init"):
        peftkit.wrap(tiny_llama(), "hydra", down_init="orthogonal")
    with pytest.raises(ConfigError, match="rslora"):
        peftkit.wrap(tiny_llama(), "hydra", rslora=True)
    # Branch biases cannot merge into a bias-less base: refused, base untouched.
    layer = hydra_layer(bias=False, branch_bias=True)
    randomize(layer)
    weight = layer.base_weight().clone()
    with pytest.raises(StateError, match="no bias"):
        layer.merge()
    assert torch.equal(layer.base_weight(), weight) and not layer.merged_adapters
