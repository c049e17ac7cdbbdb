"""LoRA on a Llama-3.2-1B-shaped base (random bf16 weights; no real 1B model is available offline here): peak
memory of ``peftkit train`` against PEFT + transformers' Trainer doing the same, and the per-process memory
formula checked against the measurements at several depths.

    python benchmarks/bench_1b.py [--layers 4,8,16] [--steps 3] [--seq 256]

The base: hidden 2048, intermediate 8192, 32 heads (8 KV), vocabulary 128256, tied embeddings (Llama-3.2-1B's
shape; 16 layers = 1.24B parameters), random weights in bf16 written once per depth into ``$TMPDIR`` (never the
repository). Both trainers: LoRA r = 16, alpha 32 on all seven projections, fp32 adapters, AdamW, gradient
checkpointing (non-reentrant), batch 1 × ``--seq`` tokens, ``--steps`` steps, one process, CPU. Each run is its
own process; its peak is ``ru_maxrss`` (loading included); ``import`` is the resident memory after the imports,
before the model (the interpreter, torch, transformers: what every process pays).

The formula per process, N processes sharing the base (fsdp2 / zero3; N = 1 here), in bytes:

    base / N                          the frozen weights this process holds (bf16: 2 per parameter)
  + 16 · adapter parameters           fp32 adapters (4) + their gradients (4) + AdamW's two moments (8)
  + activations                       checkpointed: L · b·s·h · 2 (each block's bf16 input kept)
                                      + one block recomputed: b·s·(10·h + 5·f) · 4 (its fp32-sized temporaries)
                                      + logits: 3 · b·s·V · 4 (fp32 logits, their log-softmax and gradient)
  + gathered                          under fsdp2/zero3: one or two blocks all-gathered (12·h² + 6·h·f bytes in bf16)

``import`` is added to the formula's total for the comparison with RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
              num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048, tie_word_embeddings=True,
              rope_theta=500000.0, head_dim=64)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R = 16


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def folder_for(layers: int) -> Path:
    import torch
    from common import random_model_folder

    return random_model_folder("peftkit_bench_llama1b", CONFIG, layers, dtype=torch.bfloat16)


def rows(n: int, seq: int) -> list[dict]:
    words = "the quick brown fox jumps over a lazy dog while seven small birds sing in tall green trees".split()
    return [{"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(seq))} for i in range(n)]


def run_peftkit(folder: Path, steps: int, seq: int, out: Path) -> dict:
    imported = rss_mib()
    from peftkit.train import from_dict, train

    imported = max(imported, rss_mib())
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(16, seq)))
    recipe = {"model": {"name": str(folder), "tokenizer": "bytes", "task": "causal-lm", "dtype": "bfloat16"},
              "data": {"train": str(data), "format": "text", "max_length": seq},
              "adapter": {"method": "lora", "r": R, "alpha": 2 * R, "targets": TARGETS},
              "optimizer": {"lr": 2e-4},
              "training": {"max_steps": steps, "batch_size": 1, "log_every": 1, "gradient_checkpointing": True,
                           "output_dir": str(out / "run"), "seed": 0},
              "logging": {"progress_bar": False}}
    result = train(from_dict(recipe))
    assert result.status == "done", result
    return {"import_mib": imported, "seconds": result.seconds}


def run_peft_trainer(folder: Path, steps: int, seq: int, out: Path) -> dict:
    imported = rss_mib()
    import time

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    imported = max(imported, rss_mib())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=2 * R, target_modules=TARGETS, lora_dropout=0.0))
    ids = [[(b % 250) + 3 for b in r["text"].encode()][:seq] for r in rows(16, seq)]
    dataset = [{"input_ids": torch.tensor(x), "labels": torch.tensor(x)} for x in ids]
    args = TrainingArguments(output_dir=str(out / "trainer"), max_steps=steps, per_device_train_batch_size=1,
                             learning_rate=2e-4, gradient_checkpointing=True,
                             gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0)
    started = time.perf_counter()
    Trainer(model=model, args=args, train_dataset=dataset).train()
    model.save_pretrained(out / "peft_adapter")
    return {"import_mib": imported, "seconds": time.perf_counter() - started}


def cell(kind: str, layers: int, steps: int, seq: int, out: str) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    folder = folder_for(layers)
    with tempfile.TemporaryDirectory() as tmp:
        row = (run_peftkit if kind == "peftkit" else run_peft_trainer)(folder, steps, seq, Path(tmp))
    row["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps(row))


def formula(layers: int, seq: int, processes: int = 1) -> dict:
    """The per-process terms of the module docstring's formula, in MiB."""
    h, f, v, kv = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"], 512
    per_block = h * h * 2 + h * kv * 2 + 3 * h * f  # q, o (h×h); k, v (h×512); gate, up, down
    params = layers * (per_block + 2 * h) + v * h + h
    adapter = layers * R * ((h + h) * 2 + (h + kv) * 2 + (h + f) * 3)
    base = params * 2 / processes
    states = adapter * 16
    b = 1
    activations = layers * b * seq * h * 2 + b * seq * (10 * h + 5 * f) * 4 + 3 * b * seq * v * 4
    return {"params": params, "adapter": adapter, "base_mib": base / 2**20, "states_mib": states / 2**20,
            "act_mib": activations / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="4,8,16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--only", default="peftkit,peft", help="which trainers to run")
    parser.add_argument("--cell", nargs=5, metavar=("KIND", "LAYERS", "STEPS", "SEQ", "OUT"))
    args = parser.parse_args()
    if args.cell:
        kind, layers, steps, seq, out = args.cell
        cell(kind, int(layers), int(steps), int(seq), out)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    print(f"Llama-3.2-1B shape (random bf16 weights), LoRA r={R} on 7 projections, fp32 adapters, AdamW, gradient "
          f"checkpointing, batch 1 x {args.seq}, {args.steps} steps, 1 process, CPU\n")
    print("| layers | parameters | trainer | peak RSS MiB | import MiB | formula MiB (base + states + act + import) "
          "| measured / formula | s |")
    print("|---|---|---|---|---|---|---|---|")
    for layers in [int(x) for x in args.layers.split(",")]:
        folder_for(layers)
        terms = formula(layers, args.seq)
        for kind in args.only.split(","):
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                proc = subprocess.run([sys.executable, __file__, "--cell", kind, str(layers), str(args.steps),
                                       str(args.seq), out.name], env=env, capture_output=True, text=True)
                if proc.returncode:
                    raise RuntimeError(f"{kind} {layers} layers failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
                row = json.loads(Path(out.name).read_text())
            predicted = terms["base_mib"] + terms["states_mib"] + terms["act_mib"] + row["import_mib"]
            print(f"| {layers} | {terms['params'] / 1e9:.2f}B | {kind} | {row['peak_mib']:.0f} | "
                  f"{row['import_mib']:.0f} | {predicted:.0f} ({terms['base_mib']:.0f} + {terms['states_mib']:.0f} + "
                  f"{terms['act_mib']:.0f} + {row['import_mib']:.0f}) | {row['peak_mib'] / predicted:.2f} | "
                  f"{row['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
