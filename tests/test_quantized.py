"""Quantized bases on both of bitsandbytes' CPU kernel paths (tests/bnb_paths.py) and 8-bit bases.

Every test runs on the standard ("unpacked") path and on the AVX512-BF16 "packed" path, forced on any machine by
the ``bnb_cpu_path`` fixture. Each first runs an eval forward without grad, which is when bitsandbytes repacks a
4-bit weight, and then compares what peftkit reads, merges, exports or initialises with a reference computed from
the weight as dequantized before any forward (bitsandbytes' own ``dequantize_4bit`` on the standard layout).

The model tests round the 4-bit absmax to bf16 first (``exact_llama_4bit``): packing then loses nothing, so the
reference is exact on both paths, also for a model packed before peftkit wrapped it (whose fp32 absmax bitsandbytes
has dropped).
"""

from __future__ import annotations

import warnings

import bnb_paths
import pytest
import torch
from helpers import make_batch, make_batches, output, randomize_adapters, tiny_llama_4bit, tiny_llama_8bit

import peftkit
from peftkit import quantized
from peftkit.inject import adapter_layers

bnb = pytest.importorskip("bitsandbytes")


def quiet_wrap(model, method, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peftkit.wrap(model, method, **options)


def four_bit_layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}


def exact_llama_4bit(path: str):
    """The tiny 4-bit Llama with bf16-representable absmax, on ``path``; and {layer name: dense reference}."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_llama_4bit()
    refs = {}
    for name, module in four_bit_layers(model).items():
        state = module.weight.quant_state
        assert not state.nested  # transformers' default (bnb_4bit_use_double_quant=False)
        state.absmax = state.absmax.to(torch.bfloat16).float()
        module.support_avx512bf16_for_cpu = path == "packed"
        refs[name] = bnb.functional.dequantize_4bit(module.weight.data, state).float().clone()
    return model, refs


def eval_forward(model, batch) -> torch.Tensor:
    """An eval forward without grad: bitsandbytes repacks its 4-bit weights here on the packed path."""
    out = output(model, batch)
    layers = four_bit_layers(model)
    assert all(bnb_paths.is_packed(m) == m.support_avx512bf16_for_cpu for m in layers.values())
    return out


def nf4_roundtrip(module, dense: torch.Tensor) -> torch.Tensor:
    """``dense`` quantized with ``module``'s settings by bitsandbytes directly, then dequantized (fp32)."""
    weight = module.weight
    codes, state = bnb.functional.quantize_4bit(dense.float().contiguous(), blocksize=weight.blocksize,
                                                compress_statistics=weight.compress_statistics,
                                                quant_type=weight.quant_type, quant_storage=weight.quant_storage)
    return bnb.functional.dequantize_4bit(codes, state).float()


# ------------------------------------------------------------------------------------------ one layer
def one_layer(nested: bool, quant_type: str) -> tuple[torch.nn.Module, torch.Tensor]:
    layer = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, compress_statistics=nested,
                              quant_type=quant_type)
    dense = torch.randn(64, 128)
    layer.weight = bnb.nn.Params4bit(dense, requires_grad=False, compress_statistics=nested, quant_type=quant_type,
                                     module=layer)
    layer.weight._quantize("cpu")
    with torch.no_grad():
        layer.bias.copy_(torch.randn(64) * 0.1)
    ref = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float().clone()
    return layer.eval(), ref


@pytest.mark.parametrize("nested", [False, True], ids=["plain-absmax", "nested-absmax"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_one_layer_reads_trains_and_saves_on_each_path(bnb_cpu_path, nested, quant_type):
    layer, ref = one_layer(nested, quant_type)
    quantized.track_layouts(layer)
    x = torch.randn(5, 128)
    with torch.no_grad():
        y = layer(x)
    assert bnb_paths.is_packed(layer) == (bnb_cpu_path == "packed")
    # Tracked before the repack: the standard layout comes back bit for bit.
    assert torch.equal(quantized.dense_weight(layer).float(), ref)
    bnb_paths.assert_linear(y, x, ref, layer.bias.detach(), layer, atol=1e-5, rtol=1e-5)
    # A training forward after eval: the gradient reaches the input (the packed kernel alone gives none).
    layer.train()
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    assert xg.grad is not None
    torch.testing.assert_close(xg.grad, ref.sum(0).expand_as(x), atol=1e-4, rtol=1e-5)
    assert not bnb_paths.is_packed(layer)
    # A state dict taken while packed holds the standard layout (bitsandbytes 0.50's own inverse leaves a
    # plain absmax transposed: the reloaded weight would be wrong).
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert bnb_paths.is_packed(layer) == (bnb_cpu_path == "packed")
    state = layer.state_dict()
    stats = {k[len("weight."):]: v for k, v in state.items() if k.startswith("weight.")}
    reloaded = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, device="cpu")
    assert torch.equal(bnb.functional.dequantize_4bit(reloaded.data, reloaded.quant_state).float(), ref)


@pytest.mark.parametrize("nested", [False, True], ids=["plain-absmax", "nested-absmax"])
def test_one_layer_packed_before_peftkit_is_read_as_the_kernel_computes(bnb_cpu_path, nested):
    """Packed before peftkit saw it: bitsandbytes kept only a bf16 copy of absmax, so the read weight is within one
    bf16 rounding of the original (relative 2^-8), and it is the weight the packed kernel multiplies by."""
    layer, ref = one_layer(nested, "nf4")
    x = torch.randn(5, 128)
    with torch.no_grad():
        y = layer(x)
    quantized.track_layouts(layer)
    dense = quantized.dense_weight(layer).float()
    if bnb_cpu_path == "packed":
        assert bnb_paths.is_packed(layer)
        assert float(((dense - ref).abs() - 2.0 ** -8 * ref.abs()).max()) <= 0
        assert not torch.equal(dense, ref)  # the bf16 absmax is really what is read
    else:
        assert torch.equal(dense, ref)
    bnb_paths.assert_linear(y, x, dense, layer.bias.detach(), layer, atol=1e-5, rtol=1e-5)
    # Unpacked in place (a training forward): the weight the layer then computes with is the one read.
    layer.train()
    quantized.unpack_in_place(layer)
    assert torch.equal(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float(), dense)


# ------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("wrap_first", [False, True], ids=["eval-then-wrap", "wrap-then-eval"])
def test_merge_and_unmerge_on_each_path(bnb_cpu_path, wrap_first):
    model, refs = exact_llama_4bit(bnb_cpu_path)
    batch = make_batch(model)
    if not wrap_first:
        eval_forward(model, batch)
    base_out = output(model, batch)
    quiet_wrap(model, "lora", r=4)
    randomize_adapters(model, std=0.05)
    unmerged = eval_forward(model, batch)
    effect = float((unmerged - base_out).norm() / base_out.norm())
    layers = adapter_layers(model)
    assert layers and all(layer.kind == "bnb4" for layer in layers.values())
    deltas = {}
    for name, layer in layers.items():
        assert torch.equal(layer.base_weight(), refs[name]), name
        deltas[name] = layer.delta_weight("default").detach().float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftkit.merge(model)
    merged = {}
    for name, layer in layers.items():
        merged[name] = nf4_roundtrip(layer.base_layer, refs[name] + deltas[name])
        assert torch.equal(layer.base_weight(), merged[name]), name
    # The merged model computes with the merged weights (repacked on the packed path): it moves by the NF4
    # rounding of W + ΔW through every layer, measured 0.145 on both paths for adapters that move the output by
    # 0.99; a merge onto a misread base moves it by about as much as the adapter does.
    merged_out = eval_forward(model, batch)
    gap = float((merged_out - unmerged).norm() / unmerged.norm())
    assert gap <= 0.25 * effect, (gap, effect)
    for name, layer in layers.items():
        assert torch.equal(layer.base_weight(), merged[name]), name  # read back after the repack
    peftkit.unmerge(model)
    for name, layer in layers.items():
        assert torch.equal(layer.base_weight(), nf4_roundtrip(layer.base_layer, merged[name] - deltas[name])), name


def test_hydra_export_on_each_path(bnb_cpu_path):
    model, refs = exact_llama_4bit(bnb_cpu_path)
    batch = make_batch(model)
    eval_forward(model, batch)
    quiet_wrap(model, "hydra", r=2)
    randomize_adapters(model, std=0.1)
    eval_forward(model, batch)
    for name, layer in adapter_layers(model).items():
        branch = layer.adapters["default"]
        a, b, scale, _ = layer.export_lora("default")
        # ΔW = s_p B_p A_p + s_s B_s A_s W₀, with W₀ the weight dequantized before any forward.
        expected = (branch.parallel_scale * branch.parallel_B.weight @ branch.parallel_A.weight
                    + branch.sequential_scale * branch.sequential_B.weight @ branch.sequential_A.weight
                    @ refs[name]).detach()
        torch.testing.assert_close(scale * b @ a, expected, atol=1e-5 * float(expected.abs().max()), rtol=0,
                                   msg=name)


def unpacked_twin():
    """The reference: the same exact model on the standard path."""
    model, _ = exact_llama_4bit("unpacked")
    return model


@pytest.mark.parametrize("method", ["lora-ga", "lora-one"])
def test_gradient_inits_on_each_path(bnb_cpu_path, method):
    """Data-driven inits after an eval forward: the same adapters as on the standard path (their gradient passes
    run in train mode, where peftkit puts a packed weight back in the standard layout)."""
    model, _ = exact_llama_4bit(bnb_cpu_path)
    reference = unpacked_twin()
    batches = make_batches(model, n=2)
    eval_forward(model, batches[0])
    quiet_wrap(model, method, r=2, data=batches)
    quiet_wrap(reference, method, r=2, data=batches)
    ours, theirs = adapter_layers(model), adapter_layers(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        for key, value in theirs[name].adapters["default"].state_dict().items():
            got = ours[name].adapters["default"].state_dict()[key]
            torch.testing.assert_close(got, value, atol=1e-5 * float(value.abs().max()) + 1e-12, rtol=0,
                                       msg=f"{name} {key}")


def test_eva_init_on_each_path(bnb_cpu_path):
    """EVA's data pass is an eval forward (bitsandbytes' inference path, bf16 on the packed kernel): the inputs of
    the first block's projections meet no 4-bit layer and give the standard path's components; the others agree
    to bf16 (principal angles between the spans)."""
    model, _ = exact_llama_4bit(bnb_cpu_path)
    reference = unpacked_twin()
    batches = make_batches(model, n=4)
    eval_forward(model, batches[0])
    quiet_wrap(model, "eva", r=2, data=batches)
    quiet_wrap(reference, "eva", r=2, data=batches)
    ours, theirs = adapter_layers(model), adapter_layers(reference)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"):
        torch.testing.assert_close(ours[name].adapters["default"].lora_A.weight,
                                   theirs[name].adapters["default"].lora_A.weight, atol=1e-5, rtol=1e-5)
    for name in ours:
        a, b = ours[name].adapters["default"].lora_A.weight, theirs[name].adapters["default"].lora_A.weight
        assert torch.isfinite(a).all() and a.shape == b.shape, name
        cosines = torch.linalg.svdvals(torch.linalg.qr(a.detach().t())[0].t() @ torch.linalg.qr(b.detach().t())[0])
        assert float(cosines.min()) >= 0.9, (name, cosines.tolist())


def test_training_after_eval_on_each_path(bnb_cpu_path):
    """An eval forward, then training steps: the gradients are the standard path's, exactly."""
    model, _ = exact_llama_4bit(bnb_cpu_path)
    reference = unpacked_twin()
    batch = make_batch(model)
    for m in (model, reference):
        eval_forward(m, batch)
        quiet_wrap(m, "lora", r=2)
        randomize_adapters(m, std=0.2)
        m.train()
        m(**batch).loss.backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
            torch.testing.assert_close(param.grad, grads[name], atol=0, rtol=0, msg=name)


# ------------------------------------------------------------------------------------------ 8-bit
def test_eight_bit_base_reads_merges_and_unmerges():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_llama_8bit()
    batch = make_batch(model)
    quiet_wrap(model, "lora", r=4)
    randomize_adapters(model, std=0.2)
    unmerged = output(model, batch)
    layers = adapter_layers(model)
    assert layers and all(layer.kind == "bnb8" for layer in layers.values())
    refs, deltas = {}, {}
    for name, layer in layers.items():
        weight = layer.base_layer.weight
        scb = weight.SCB if weight.SCB is not None else layer.base_layer.state.SCB
        refs[name] = weight.data.float() * scb.float().view(-1, 1) / 127.0  # LLM.int8 row scales
        torch.testing.assert_close(layer.base_weight(), refs[name], atol=0, rtol=1e-6, msg=name)
        deltas[name] = layer.delta_weight("default").detach().float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftkit.merge(model)
    merged = {}
    for name, layer in layers.items():
        target = refs[name] + deltas[name]
        merged[name] = layer.base_weight()
        assert float(within_int8(merged[name], target, [target])) <= 0, name
    gap = float((output(model, batch) - unmerged).norm() / unmerged.norm())
    assert gap <= 0.05, gap
    peftkit.unmerge(model)
    for name, layer in layers.items():
        # Two roundings: merge (of W + ΔW), then unmerge (of the merged weight − ΔW).
        assert float(within_int8(layer.base_weight(), refs[name], [refs[name] + deltas[name],
                                                                   merged[name] - deltas[name]])) <= 0, name


def within_int8(weight: torch.Tensor, target: torch.Tensor, rounded: list[torch.Tensor]) -> torch.Tensor:
    """max(|W − T| − bound) for W obtained from T through bitsandbytes' 8-bit roundings of the ``rounded`` dense
    weights: each rounds to fp16 (relative 2^-11), then to row-wise int8 (half a step, row absmax / 127)."""
    bound = sum(0.5 * d.abs().amax(dim=1, keepdim=True) / 127.0 * (1 + 1e-3) + 2.0 ** -11 * d.abs() for d in rounded)
    return ((weight - target).abs() - bound - 1e-6).max()
