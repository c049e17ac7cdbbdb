"""EVA (eva.md, tests 1-7) and parity with PEFT 0.21.2's EVA. Two processes: test_inits_distributed.py."""

from __future__ import annotations

import functools
import json
import math
import warnings

import pytest
import torch
from helpers import make_batches, output, tiny_llama, wrap_with_data
from inits_fixtures import ThreeInputs, spectrum_inputs

import peftkit
from peftkit.inject import adapter_layers
from peftkit.layer import AdapterLayer
from peftkit.linalg import subspace_cosines

D = 16
STRONG = torch.tensor([8.0, 6, 4, 3, 2, 1.5] + [0.3] * 10)
FLAT = torch.ones(D)
MILD = torch.linspace(2.0, 0.5, D)


_wrap = functools.partial(wrap_with_data, method="eva")


def _centred_pcs(batches, key):
    x = torch.cat([b[key] for b in batches]).double()
    centred = x - x.mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    return centred, s, vh


def test_principal_subspace_of_centred_inputs_b_zero_output_unchanged():
    batches = spectrum_inputs([STRONG, STRONG, STRONG], n=4, rows=500, mean=5.0)
    model = ThreeInputs()
    ref = model(**batches[0])["logits"]
    _wrap(model, batches, r=3, rho=1.0, tau=0.999)
    a = adapter_layers(model)["a"].adapters["default"]
    A = a.lora_A.weight.detach().double()
    torch.testing.assert_close(A @ A.t(), torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    assert a.lora_B.weight.abs().max() == 0
    assert torch.equal(model(**batches[0])["logits"], ref)
    centred, _, vh = _centred_pcs(batches, "xa")
    assert subspace_cosines(A.t(), vh[:3].t()).min() >= 0.99
    # Negative control: the uncentred top-3 subspace (inputs have a large mean) is not what EVA finds.
    x = torch.cat([b["xa"] for b in batches]).double()
    _, _, vh_raw = torch.linalg.svd(x, full_matrices=False)
    assert subspace_cosines(A.t(), vh_raw[:3].t()).min() < 0.9


def test_allocation_is_top_budget_of_pooled_ratios():
    batches = spectrum_inputs([STRONG, FLAT, MILD], n=4, rows=1000)
    model = _wrap(ThreeInputs(), batches, r=4, rho=2.0, tau=0.999)
    layers = adapter_layers(model)
    ranks = {n: (l.ranks["default"] if isinstance(l, AdapterLayer) and "default" in l.adapters else 0)
             for n, l in layers.items()}
    assert sum(ranks.values()) == 12 and max(ranks.values()) <= 8
    assert ranks["b"] == min(ranks.values())
    pooled = []
    for key, name in (("xa", "a"), ("xb", "b"), ("xc", "c")):
        centred, s, _ = _centred_pcs(batches, key)
        ratios = s ** 2 / (centred ** 2).sum()
        pooled += [(float(v), name) for v in ratios[:8]]
    top = sorted(pooled, reverse=True)[:12]
    expected = {n: sum(1 for _, m in top if m == n) for n in "abc"}
    assert ranks == expected, (ranks, expected)


def test_scaling_patterns_save_and_reload(tmp_path):
    batches = spectrum_inputs([STRONG, FLAT, MILD], n=4, rows=1000)
    model = _wrap(ThreeInputs(), batches, r=4, alpha=8.0, rho=2.0, tau=0.999)
    config = model.peftkit.configs["default"]
    for name, layer in adapter_layers(model).items():
        r_new = layer.ranks["default"]
        assert layer.alphas["default"] == pytest.approx(8.0 * r_new / 4)
        assert layer.scaling["default"] == pytest.approx(2.0)
        if r_new != 4:
            assert config.rank_pattern[name] == r_new and config.alpha_pattern[name] == pytest.approx(2.0 * r_new)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.adapters["default"].lora_B.weight.normal_()
    expected = model(**batches[0])["logits"]
    peftkit.save(model, tmp_path / "eva")
    saved = json.loads((tmp_path / "eva" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] and saved["alpha_pattern"]
    reloaded = peftkit.load(ThreeInputs(), tmp_path / "eva")
    torch.testing.assert_close(reloaded(**batches[0])["logits"], expected, rtol=1e-6, atol=1e-6)
    # rsLoRA: PEFT's rule gives s = (α/r)·√r_new; keep_scaling keeps s = α/√r.
    for rule, scaling in (("peft", lambda r_new: 8.0 / 4 * math.sqrt(r_new)), ("keep_scaling", lambda r_new: 8.0 / 2)):
        model = _wrap(ThreeInputs(), batches, r=4, alpha=8.0, rslora=True, alpha_rule=rule, tau=0.999)
        for layer in adapter_layers(model).values():
            assert layer.scaling["default"] == pytest.approx(scaling(layer.ranks["default"]))
    model = _wrap(ThreeInputs(), batches, r=4, alpha=8.0, alpha_rule="constant", tau=0.999)
    assert {l.alphas["default"] for l in adapter_layers(model).values()} == {8.0}


def test_rank_zero_layer_is_removed_and_leaves_targets(tmp_path):
    two_dirs = torch.tensor([5.0, 5.0] + [0.01] * (D - 2))  # ratios 0.5, 0.5
    four_dirs = torch.tensor([5.0] * 4 + [0.01] * (D - 4))  # ratios 0.25 x 4; the flat layer's are ~1/16
    batches = spectrum_inputs([four_dirs, FLAT, two_dirs], n=3, rows=800)
    model = _wrap(ThreeInputs(), batches, r=2, rho=4.0, tau=0.99)
    layers = adapter_layers(model)
    assert "b" not in layers and type(model.b) is torch.nn.Linear
    assert model.peftkit.configs["default"].targets == ["a", "c"]
    peftkit.save(model, tmp_path / "x")
    saved = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["a", "c"]


def test_determinism_and_data_order():
    batches = make_batches(tiny_llama(), n=6, batch_size=4, seq_len=16)
    first = _wrap(tiny_llama(), batches, r=4, tau=0.9)
    second = _wrap(tiny_llama(), batches, r=4, tau=0.9)
    assert first.peftkit.configs["default"].rank_pattern == second.peftkit.configs["default"].rank_pattern
    for la, lb in zip(adapter_layers(first).values(), adapter_layers(second).values()):
        assert torch.equal(la.adapters["default"].lora_A.weight, lb.adapters["default"].lora_A.weight)
    # Another data order: the same components up to sign (PEFT's own test idea), mean |cos| >= 0.9.
    data = spectrum_inputs([STRONG, MILD, STRONG], n=6, rows=300)
    one = _wrap(ThreeInputs(), data, r=3, rho=1.0, tau=0.99)
    other = _wrap(ThreeInputs(), data[::-1], r=3, rho=1.0, tau=0.99)
    cosines = torch.cat([torch.nn.functional.cosine_similarity(la.adapters["default"].lora_A.weight,
                                                               lb.adapters["default"].lora_A.weight, dim=1).abs()
                         for la, lb in zip(adapter_layers(one).values(), adapter_layers(other).values())])
    assert cosines.mean() >= 0.9, cosines


def test_gradient_signal_property():
    batches = spectrum_inputs([MILD, MILD, MILD], n=2, rows=2000)
    model = _wrap(ThreeInputs(), batches, r=4, rho=1.0, tau=0.999)
    a = adapter_layers(model)["a"].adapters["default"].lora_A.weight.detach().double()
    centred, s, _ = _centred_pcs(batches, "xa")
    signal = (a @ centred.t()).square().sum()
    assert signal == pytest.approx(float((s[:4] ** 2).sum()), rel=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        q = torch.linalg.qr(torch.randn(D, 4, generator=gen, dtype=torch.float64))[0]
        assert (q.t() @ centred.t()).square().sum() <= signal


def test_batch_cap_stops_with_a_warning_naming_layers():
    batches = spectrum_inputs([FLAT, FLAT, FLAT], n=2, rows=40)
    with pytest.warns(UserWarning, match=r"max_batches=3 reached .*\['a', 'b', 'c'\]"):
        peftkit.wrap(ThreeInputs(), "eva", data=batches, r=2, tau=1.0, max_batches=3)


def test_parity_with_peft_eva_components_and_ranks():
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

    batches = make_batches(tiny_llama(), n=6, batch_size=4, seq_len=16)
    batches[0]["labels"][:, :3] = -100  # label masking
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="eva",
                        eva_config=EvaConfig(rho=2.0, tau=0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(tiny_llama(), config)
        initialize_lora_eva_weights(peft_model, batches, show_progress_bar=False)
    for svd, tol in (("lowrank", 1e-6), ("exact", None)):
        ours = _wrap(tiny_llama(), batches, r=4, alpha=8.0, tau=0.9, svd=svd)
        if svd == "lowrank":
            assert ours.peftkit.configs["default"].rank_pattern == peft_model.peft_config["default"].rank_pattern
            peft_pattern = peft_model.peft_config["default"].alpha_pattern
            assert ours.peftkit.configs["default"].alpha_pattern == pytest.approx(peft_pattern)
        for name, layer in adapter_layers(ours).items():
            a = layer.adapters["default"].lora_A.weight
            a_peft = peft_model.base_model.model.get_submodule(name).lora_A["default"].weight
            if svd == "lowrank":
                signs = torch.sign((a * a_peft).sum(1, keepdim=True))
                torch.testing.assert_close(a * signs, a_peft, rtol=0, atol=tol)
            else:  # exact SVD: the leading component agrees (seeded low-rank vs LAPACK differ in the tail)
                assert torch.nn.functional.cosine_similarity(a[:1], a_peft[:1], dim=1).abs() >= 0.98


def test_init_axis_composes_with_lora_and_llama_output_unchanged():
    batches = make_batches(tiny_llama(), n=4, batch_size=4, seq_len=16)
    ref = output(tiny_llama(), batches[0])
    a = _wrap(tiny_llama(), batches, r=4, tau=0.9)
    b = _wrap(tiny_llama(), batches, method="lora", init="eva", r=4, tau=0.9)
    assert a.peftkit.configs["default"].rank_pattern == b.peftkit.configs["default"].rank_pattern
    for la, lb in zip(adapter_layers(a).values(), adapter_layers(b).values()):
        for key, value in la.adapters["default"].state_dict().items():
            assert torch.equal(lb.adapters["default"].state_dict()[key], value)
    assert torch.equal(output(a, batches[0]), ref)
