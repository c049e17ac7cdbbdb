"""The conformance suite: every registered method, on every tiny model, passes the same checks.

The parameter list is ``peftkit.methods()`` at collection time, so a method file dropped into ``adapters/``
is tested here with no new test code. Models (tests/helpers.py): Llama (nn.Linear), GPT-2 (transformers'
Conv1D), BERT sequence classification (with ``modules_to_save=["classifier"]``) and the Llama on a
bitsandbytes 4-bit NF4 base.

Checks, per (method, model):
- wrap returns the same object, every module in the model's eval mode; only adapter (and modules_to_save)
  parameters train; the output at init is the base output (or, for methods registered with
  ``changes_output_at_init``, differs from it);
- two steps of ``peftkit.optimizer`` on the loss plus ``peftkit.regularization_loss`` (then the schedule's
  ``on_step``): gradients reach only trainable adapter and head parameters, the steps change those and nothing
  else (base weights and buffers bit-identical);
- merge gives the unmerged output, unmerge restores the base weights, ``peftkit.disabled`` gives the base
  output (also while merged);
- save -> load into a fresh base gives the same outputs; export -> PEFT (``PeftModel.from_pretrained``) gives
  the same outputs where PEFT reads the exported format on that base, and export -> ``peftkit.load`` otherwise;
  exporting a saved folder (with the base model) writes the same tensors as exporting the model.

Before the checks the adapters get non-trivial values (``randomize_adapters`` and a perturbed head copy), so
merge/save/export are not vacuous: each test first asserts that the adapter changes the output.

Quantized base: merge and unmerge re-quantize, so they are lossy and the whole model's output after a
merge moves by the NF4 rounding, amplified through the layers (measured for LoRA: 10% relative, for an
adapter that changes the output by 57%). So there the checks are per layer, where the quantization error is
known: the stored 4-bit weight equals, bit for bit, an independent NF4 quantization of the layer's own
``merge_weights`` result W' (and of ``unmerge_weights`` after unmerge); the merged layer's output on a probe x
moves by at most ||x||·||Q(W') − W'|| (the rounding's own bound); after unmerge the weight is back within
2.5x the merge rounding of W0 (two roundings; measured ratio 1.26), checked without ``unmerge_weights``.
On every base, each unmerged layer's forward equals x W'ᵀ + b' (fp32 tolerance), which ties the layer's
merge to its forward independently of the model-level checks.
"""

from __future__ import annotations

import json
import warnings

import bnb_paths
import pytest
import torch
from helpers import MODEL_FACTORIES, make_batch, make_batches, output, randomize_adapters

import peftkit
from peftkit import checkpoint, registry
from peftkit.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from peftkit.inject import adapter_layers, saved_modules, state_of

METHODS = peftkit.methods()
MODELS = ["llama", "gpt2", "bert", "llama-4bit"]
CASES = [pytest.param(m, k, id=f"{m}-{k}") for m in METHODS for k in MODELS]
FP32_TOL = dict(atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ helpers
def build(kind: str, seed: int = 0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MODEL_FACTORIES[kind](seed)


def wrap(method: str, model):
    """Wrap with the method's defaults; data-driven inits get batches, the BERT head trains in full."""
    options = {}
    if type(model).__name__.endswith("ForSequenceClassification"):
        options["modules_to_save"] = ["classifier"]
    init = registry.get_component("init", registry.get_method(method).init)
    if init.needs_data:
        options["data"] = make_batches(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peftkit.wrap(model, method, **options)


def make_nontrivial(model, seed: int = 1) -> None:
    """Random values on top of every adapter tensor and every trainable head copy."""
    randomize_adapters(model, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for wrapper in saved_modules(model).values():
            for p in wrapper.modules_to_save.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.05)


def adapter_parameter_names(model) -> set[str]:
    """Names of the parameters that belong to adapters or to modules_to_save copies."""
    ids = set()
    for layer in adapter_layers(model).values():
        ids |= {id(p) for p in layer.adapters.parameters()}
    for wrapper in saved_modules(model).values():
        ids |= {id(p) for p in wrapper.modules_to_save.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def is_quantized(kind: str) -> bool:
    return kind.endswith("bit")


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def nf4_roundtrip(layer, dense: torch.Tensor) -> torch.Tensor:
    """``dense`` (out, in) quantized the way the layer's 4-bit weight is, then dequantized (fp32)."""
    import bitsandbytes as bnb

    weight = layer.base_layer.weight
    state = weight.quant_state
    packed, new_state = bnb.functional.quantize_4bit(
        dense.to(state.dtype).contiguous(), blocksize=weight.blocksize, compress_statistics=weight.compress_statistics,
        quant_type=weight.quant_type, quant_storage=weight.quant_storage)
    return bnb.functional.dequantize_4bit(packed, new_state).float()


def adapted_output(method, kind, model=None):
    """(base output, model wrapped with non-trivial adapters, batch, adapted output); ``model``: a base to use
    instead of ``build(kind)``."""
    model = build(kind) if model is None else model
    batch = make_batch(model)
    base_out = output(model, batch)
    wrap(method, model)
    make_nontrivial(model)
    out = output(model, batch)
    assert relative_gap(out, base_out) > 1e-3, "the randomized adapter does not change the output: the test is vacuous"
    return base_out, model, batch, out


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("method,kind", CASES)
def test_wrap_freezes_base_and_preserves_output(method, kind):
    model = build(kind)
    batch = make_batch(model)
    base_out = output(model, batch)
    modules_before = {n for n, _ in model.named_modules()}
    assert wrap(method, model) is model
    assert state_of(model).configs["default"].method == method
    layers = adapter_layers(model)
    assert layers and {n for n, _ in model.named_modules()} > modules_before
    # The model was in eval mode: the new modules are too (no adapter dropout at inference), and a data-driven
    # init that ran the model in train mode put it back.
    assert not [n for n, m in model.named_modules() if m.training]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable <= adapter_parameter_names(model), sorted(trainable - adapter_parameter_names(model))
    for name, layer in layers.items():
        assert any(p.requires_grad for p in layer.adapters.parameters()), f"{name}: no trainable adapter tensor"
    if kind == "bert":
        head = model.classifier
        assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())
        assert not any(p.requires_grad for p in head.original_module.parameters())
    counts = peftkit.trainable_parameters(model)
    assert counts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = output(model, batch)
    if registry.get_method(method).changes_output_at_init:
        assert relative_gap(out, base_out) > 1e-6, f"{method} says its init changes the output, but it does not"
    else:
        bnb_paths.assert_close(out, base_out, model, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method,kind", CASES)
def test_training_steps_change_only_adapter_parameters(method, kind):
    """Two steps, because an optimizer may update only some factors per step (LoFT alternates B and A)."""
    model = build(kind)
    wrap(method, model)
    make_nontrivial(model)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= adapter_parameter_names(model)
    before = {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}
    opt = peftkit.optimizer(model, lr=1e-2)
    schedule = peftkit.callbacks(model)
    nonzero = set()
    for step in (1, 2):
        batch = make_batch(model, seed=2 + step)
        (model(**batch).loss + peftkit.regularization_loss(model)).backward()  # the loss a training loop uses
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad <= trainable, f"gradients reached frozen parameters: {sorted(with_grad - trainable)[:4]}"
        step_nonzero = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        for name, layer in adapter_layers(model).items():
            prefix = name + ".adapters."
            if any(a not in layer.gated_off for a in layer.active_adapters):
                assert any(n.startswith(prefix) for n in step_nonzero), f"{name}: no adapter tensor got a gradient"
        nonzero |= step_nonzero
        opt.step()
        schedule.on_step(step, 10)
        opt.zero_grad(set_to_none=True)
    after = model.state_dict(keep_vars=True)
    adapter_names = adapter_parameter_names(model)
    changed = set()
    for key, old in before.items():
        new = after[key].detach()
        if old.shape != new.shape or old.dtype != new.dtype or not torch.equal(old, new):
            changed.add(key)
    base_changed = {k for k in changed if k not in adapter_names and ".adapters." not in k}
    assert not base_changed, f"the step changed base weights or buffers: {sorted(base_changed)[:4]}"
    assert nonzero <= changed, f"tensors with a gradient did not change: {sorted(nonzero - changed)[:4]}"
    if kind == "bert":
        assert "classifier.modules_to_save.default.weight" in changed


@pytest.mark.parametrize("method,kind", CASES)
def test_merge_unmerge_disable(method, kind):
    base_out, model, batch, out = adapted_output(method, kind)
    with peftkit.disabled(model):
        torch.testing.assert_close(output(model, batch), base_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(output(model, batch), out, atol=0, rtol=0)
    layers = adapter_layers(model)
    weights = {n: (l.base_weight(), None if l.bias is None else l.bias.detach().clone()) for n, l in layers.items()}
    expected_merged = {}
    with torch.no_grad():
        for name, layer in layers.items():
            w, b = weights[name]
            for adapter in layer.active_adapters:
                w, b = layer.merge_weights(adapter, w, b)
            expected_merged[name] = (w, b)
    # Each adapted layer, unmerged, computes with its dense merged weight: layer(x) == x W'^T + b'.
    gen = torch.Generator().manual_seed(7)
    probes = {n: torch.randn(3, l.in_features, generator=gen) for n, l in layers.items()}
    with torch.no_grad():
        unmerged = {n: layer(probes[n]) for n, layer in layers.items()}
    for name in layers:
        w, b = expected_merged[name]
        bnb_paths.assert_linear(unmerged[name], probes[name], w, b, model, **FP32_TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftkit.merge(model)
    assert all(l.merged_adapters == l.active_adapters for l in layers.values())
    if not is_quantized(kind):
        torch.testing.assert_close(output(model, batch), out, **FP32_TOL)
        for name, layer in layers.items():
            torch.testing.assert_close(layer.base_weight(), expected_merged[name][0], atol=1e-6, rtol=1e-6)
    else:
        merge_rounding = {}
        for name, layer in layers.items():
            requantized = nf4_roundtrip(layer, expected_merged[name][0])
            torch.testing.assert_close(layer.base_weight(), requantized, atol=0, rtol=0)
            merge_rounding[name] = float((requantized - expected_merged[name][0]).norm())
            # The merged layer's output moves by at most what the NF4 rounding of W' allows:
            # ||x (Q(W') - W')^T||_F <= ||x||_F ||Q(W') - W'||_F.
            with torch.no_grad():
                moved = float((layer(probes[name]) - unmerged[name]).norm())
            bound = float(probes[name].norm()) * merge_rounding[name]
            assert moved <= bound * (1 + 1e-4) + 1e-6, f"{name}: merged output moved {moved:.4f} > {bound:.4f}"
    merged_weights = {n: l.base_weight() for n, l in layers.items()}
    peftkit.unmerge(model)
    assert not any(l.merged_adapters for l in layers.values())
    for name, layer in layers.items():
        if is_quantized(kind):
            w, b = merged_weights[name], expected_merged[name][1]
            for adapter in reversed(layer.active_adapters):
                w, b = layer.unmerge_weights(adapter, w, b)
            torch.testing.assert_close(layer.base_weight(), nf4_roundtrip(layer, w), atol=0, rtol=0)
            # Independent of unmerge_weights: back near W0, within the two roundings (merge, unmerge) of
            # similar size; an unmerge that left the delta in would be off by the whole delta.
            drift = float((layer.base_weight() - weights[name][0]).norm())
            assert drift <= 2.5 * merge_rounding[name], f"{name}: unmerge left |W - W0| = {drift:.4f}"
        else:
            torch.testing.assert_close(layer.base_weight(), weights[name][0], atol=1e-6, rtol=1e-5)
            if layer.bias is not None:
                torch.testing.assert_close(layer.bias.detach(), weights[name][1], atol=1e-6, rtol=1e-5)
    if not is_quantized(kind):
        torch.testing.assert_close(output(model, batch), out, **FP32_TOL)
        # Disabling a merged model runs the base (it unmerges first, PEFT's semantics); on a quantized base
        # that round trip is lossy, which the weight-level checks above already bound.
        peftkit.merge(model)
        with peftkit.disabled(model):
            torch.testing.assert_close(output(model, batch), base_out, **FP32_TOL)
        torch.testing.assert_close(output(model, batch), out, **FP32_TOL)


@pytest.mark.parametrize("method,kind", CASES)
def test_save_load_round_trip(method, kind, tmp_path):
    _, model, batch, out = adapted_output(method, kind)
    peftkit.save(model, tmp_path)
    saved = json.loads((tmp_path / "peftkit.json").read_text())  # peftkit's metadata, beside PEFT's config
    assert saved["method"] == method and "peftkit" not in json.loads((tmp_path / CONFIG_NAME).read_text())
    fresh = build(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert peftkit.load(fresh, tmp_path) is fresh
    bnb_paths.assert_close(output(fresh, batch), out, model, atol=1e-6, rtol=1e-6)
    assert not any(p.requires_grad for p in fresh.parameters())
    # Loaded trainable, it trains the same tensors as the original wrap.
    retrain = build(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftkit.load(retrain, tmp_path, trainable=True)
    assert {n for n, p in retrain.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


def peft_reads(exported: dict, kind: str, model) -> bool:
    """Whether PEFT 0.21 reads the exported format on this base: LoRA everywhere (Linear, Conv1D, bnb 4-bit);
    HRA only on nn.Linear (PEFT's HRA has no Conv1D nor bitsandbytes layer). DoRA on a 4-bit base on the packed
    CPU layout (AVX512-BF16 CPUs) is read wrongly by PEFT: its DoRA norm dequantizes W with bitsandbytes'
    ``dequantize_4bit``, which does not undo the packing (x·Wᵀ off by up to 0.76 here against the base layer's
    own 0.0017); peftkit reads it back there, and tests/test_dora.py compares with PEFT on the unpacked path."""
    if exported.get("use_dora") and bnb_paths.takes_packed_path(model):
        return False
    return exported["peft_type"] == "LORA" or (exported["peft_type"] == "HRA" and kind in ("llama", "bert"))


@pytest.mark.parametrize("method,kind", CASES)
def test_export_matches_peft(method, kind, tmp_path):
    _, model, batch, out = adapted_output(method, kind)
    peftkit.export(model, tmp_path)
    exported = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert exported["peft_type"] in ("LORA", "HRA")
    fresh = build(kind)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if peft_reads(exported, kind, model):
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
        with torch.no_grad():
            theirs = peft_model(**inputs).logits
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peftkit.load(fresh, tmp_path)
        theirs = output(fresh, batch)
    bnb_paths.assert_close(theirs, out, model, **FP32_TOL)


@pytest.mark.parametrize("method,kind", CASES)
def test_export_from_a_saved_folder(method, kind, tmp_path):
    """export(folder, out, base_model=...) writes what export(model, out) writes; the base model comes back as it
    was."""
    _, model, _, _ = adapted_output(method, kind)
    peftkit.export(model, tmp_path / "from-model")
    peftkit.save(model, tmp_path / "saved")
    base = build(kind)
    flags = [p.requires_grad for p in base.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftkit.export(tmp_path / "saved", tmp_path / "from-folder", base_model=base)
    assert state_of(base, required=False) is None and not adapter_layers(base)
    assert [p.requires_grad for p in base.parameters()] == flags
    ours, theirs = (checkpoint.read_tensors(tmp_path / d / WEIGHTS_NAME) for d in ("from-model", "from-folder"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        bnb_paths.assert_close(theirs[key], ours[key], model, atol=1e-6, rtol=1e-6)
    configs = [json.loads((tmp_path / d / CONFIG_NAME).read_text()) for d in ("from-model", "from-folder")]
    for field in ("peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "modules_to_save"):
        assert configs[0].get(field) == configs[1].get(field), field


# ------------------------------------------------------------------------------------------ export to a plain LoRA
def _fp64(factory):
    return lambda seed=0: factory(seed, dtype=torch.float64)


LORA_EXPORT_MODELS = {"llama-fp64": _fp64(MODEL_FACTORIES["llama"]), "gpt2-fp64": _fp64(MODEL_FACTORIES["gpt2"]),
                      "llama-4bit": MODEL_FACTORIES["llama-4bit"]}
LORA_EXPORT_CASES = [pytest.param(m, k, id=f"{m}-{k}") for m in METHODS for k in LORA_EXPORT_MODELS]


@pytest.mark.parametrize("method,kind", LORA_EXPORT_CASES)
def test_export_to_lora_is_served_by_peft(method, kind, tmp_path):
    """export(to="lora") writes ``peft_type: LORA`` for every method, and PEFT's LoRA on a fresh base gives the
    adapted logits: within 1e-6 relative in fp64 (Linear and GPT-2's Conv1D), and on the 4-bit base within the
    kernels' tolerance (the export is exact with respect to the dequantized weights). The same export from a
    saved folder (with the base model) writes the same tensors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LORA_EXPORT_MODELS[kind]()
    base_out, model, batch, out = adapted_output(method, kind, model)
    peftkit.export(model, tmp_path / "lora", to="lora")
    exported = json.loads((tmp_path / "lora" / CONFIG_NAME).read_text())
    assert exported["peft_type"] == "LORA"
    tensors = checkpoint.read_tensors(tmp_path / "lora" / WEIGHTS_NAME)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight", ".lora_B.bias")) for k in tensors), sorted(tensors)[:4]
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = LORA_EXPORT_MODELS[kind]()
        peft_model = PeftModel.from_pretrained(fresh, str(tmp_path / "lora")).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        theirs = peft_model(**inputs).logits
    if kind.endswith("fp64"):
        assert relative_gap(theirs, out) <= 1e-6, relative_gap(theirs, out)
    else:
        bnb_paths.assert_close(theirs, out, model, **FP32_TOL)
    peftkit.save(model, tmp_path / "saved")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = LORA_EXPORT_MODELS[kind]()
        peftkit.export(tmp_path / "saved", tmp_path / "from-folder", to="lora", base_model=base)
    again = checkpoint.read_tensors(tmp_path / "from-folder" / WEIGHTS_NAME)
    assert again.keys() == tensors.keys()
    for key in tensors:
        bnb_paths.assert_close(again[key], tensors[key], model, atol=1e-6, rtol=1e-6)
