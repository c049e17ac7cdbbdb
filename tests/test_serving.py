"""Serving: merges at serving precision (``peftkit merge --dtype``, the QLoRA merge, ``--quantize nf4``), export to
a plain LoRA from the CLI, and the engines table that ``peftkit info`` prints.

The merged weights are checked against a hand-computed reference: W₀ (dequantized for a 4-bit base) + ΔW in fp64,
then rounded once to the written dtype. A merge that rounded W₀ or ΔW to bf16 first, or that merged into the
re-quantized weight, is off by more than the one rounding the reference allows.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import QUANTIZED_LLAMA, _saved_llama_dir, make_batch, randomize_adapters, tiny_llama, tiny_llama_4bit
from transformers import AutoModelForCausalLM

import peftkit
from peftkit.inject import adapter_layers
from peftkit.train.cli import main


def _adapter(tmp_path, model, method="lora", **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftkit.wrap(model, method, **options)
    randomize_adapters(model, std=0.1)
    expected = {}
    for name, layer in adapter_layers(model).items() if method == "lora" else ():
        weight = layer.base_weight(torch.float64)
        delta = layer.delta_weight("default").detach().double()
        expected[name + ".weight"] = weight + delta
    peftkit.save(model, tmp_path / "adapter")
    return expected


def _report(capsys) -> str:
    out = capsys.readouterr().out
    assert "merge error" in out and "relative error" in out and "argmax agreement" in out, out
    return out


@pytest.mark.parametrize("dtype,torch_dtype",
                         [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_merge_writes_the_requested_dtype(tmp_path, capsys, dtype, torch_dtype):
    base_dir = _saved_llama_dir(0)
    model = tiny_llama(0)
    expected = _adapter(tmp_path, model)
    assert main(["merge", str(tmp_path / "adapter"), "--base", base_dir, "--out", str(tmp_path / "m"),
                 "--dtype", dtype]) == 0
    _report(capsys)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype="auto")
    state = merged.state_dict()
    for key, reference in expected.items():
        got = state[key]
        assert got.dtype == torch_dtype, (key, got.dtype)
        # One rounding of the fp64 result to the written dtype (the merge itself runs in fp32).
        eps = torch.finfo(torch_dtype).eps
        torch.testing.assert_close(got.double(), reference, rtol=eps if torch_dtype != torch.float32 else 1e-6,
                                   atol=1e-7)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == str(torch_dtype).replace("torch.", "")


def test_merge_default_keeps_the_base_dtype(tmp_path, capsys):
    base = tiny_llama(0, dtype=torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    model = tiny_llama(0, dtype=torch.bfloat16)
    _adapter(tmp_path, model)
    assert main(["merge", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), "--out",
                 str(tmp_path / "m")]) == 0
    assert "bf16" in _report(capsys)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype="auto")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_qlora_merge_dequantizes_and_merges_in_fp32(tmp_path, capsys):
    """--qlora: the merged weight is dequant(W₄) + ΔW rounded once to bf16, and the merged model's logits follow the
    unmerged 4-bit model with its adapter (the report says by how much)."""
    base_dir = _saved_llama_dir(0, QUANTIZED_LLAMA)
    model = tiny_llama_4bit(0)
    expected = _adapter(tmp_path, model)
    batch = {k: v for k, v in make_batch(model).items() if k != "labels"}
    with torch.no_grad():
        adapted = model(**batch).logits
    assert main(["merge", str(tmp_path / "adapter"), "--base", base_dir, "--out", str(tmp_path / "m"), "--qlora"]) == 0
    report = _report(capsys)
    assert "bf16:" in report
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype="auto")
    state = merged.state_dict()
    for key, reference in expected.items():
        assert state[key].dtype == torch.bfloat16
        torch.testing.assert_close(state[key].double(), reference, rtol=torch.finfo(torch.bfloat16).eps, atol=1e-7)
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    with torch.no_grad():
        served = merged.float()(**batch).logits
    assert float((served - adapted).norm() / adapted.norm()) < 2e-2


def test_qlora_merge_requantized_to_nf4(tmp_path, capsys):
    """--quantize nf4: the written model is a bitsandbytes NF4 checkpoint whose weights are the NF4 quantization of
    the merged bf16 weights."""
    import bitsandbytes as bnb

    from peftkit import quantized

    base_dir = _saved_llama_dir(0, QUANTIZED_LLAMA)
    model = tiny_llama_4bit(0)
    expected = _adapter(tmp_path, model)
    assert main(["merge", str(tmp_path / "adapter"), "--base", base_dir, "--out", str(tmp_path / "m"), "--qlora",
                 "--quantize", "nf4"]) == 0
    assert "bf16 + nf4" in _report(capsys)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        served = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    modules = dict(served.named_modules())
    for key, reference in expected.items():
        layer = modules[key[: -len(".weight")]]
        assert quantized.is_4bit(layer)
        bf16 = reference.to(torch.bfloat16)
        packed, state = bnb.functional.quantize_4bit(bf16.contiguous(), blocksize=layer.weight.blocksize,
                                                     quant_type="nf4")
        want = bnb.functional.dequantize_4bit(packed, state).float()
        torch.testing.assert_close(quantized.dense_weight(layer).float(), want, rtol=0, atol=0)


def test_export_to_lora_from_the_cli(tmp_path, capsys):
    """peftkit export --to lora: an HRA adapter (PEFT format HRA by default) becomes a PEFT LoRA with the base."""
    base_dir = _saved_llama_dir(0)
    model = tiny_llama(0)
    _adapter(tmp_path, model, "hra")
    assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "peft")]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "HRA"
    err = main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "lora"), "--to", "lora"])
    assert err == 2 and "--base" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "lora"), "--to", "lora",
                 "--base", base_dir]) == 0
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_info_says_which_engines_serve_the_adapter(tmp_path, capsys):
    for method, needle in (("lora", "vLLM and SGLang (multi-LoRA) as it is"), ("hra", "PEFT (nn.Linear layers only)"),
                           ("hydra", "peftkit only (native format)")):
        model = tiny_llama(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peftkit.wrap(model, method)
        peftkit.save(model, tmp_path / method)
        capsys.readouterr()
        assert main(["info", str(tmp_path / method)]) == 0
        line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("serve with:"))
        assert needle in line, line


def test_export_to_gguf_from_the_cli(tmp_path, capsys):
    """--to gguf on a saved LoRA: the base's config comes from the recorded base (no weights needed)."""
    base_dir = _saved_llama_dir(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    _adapter(tmp_path, model)
    assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "g"), "--to", "gguf"]) == 0
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["adapter.gguf"]
