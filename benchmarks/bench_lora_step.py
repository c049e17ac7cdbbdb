"""LoRA training-step time and peak memory: peftkit against HF PEFT and the frozen-model floor (issue 2, item 8).

    OMP_NUM_THREADS=2 python benchmarks/bench_lora_step.py            # 4-5 minutes on 2 busy shared CPU cores
    python benchmarks/bench_lora_step.py --rounds 30 --threads 1      # more rounds, one thread

Model: Llama config (hidden 512, intermediate 1408, 4 layers, 8 heads, vocab 8000), random weights, fp32;
batch 4 x 256 tokens. Contenders, all from the same base weights, stepping on the same batch:

- ``floor``: the frozen model, only the input embedding trainable, so the backward runs through every layer;
  forward + backward, gradients dropped (no optimizer: the floor is the model's own forward and backward);
- ``peft``: HF PEFT LoRA r=16, alpha=32, dropout 0, ``target_modules="all-linear"``; forward, backward,
  ``torch.optim.AdamW`` step, zero_grad;
- ``peftkit``: ``peftkit.wrap(model, "lora", r=16, alpha=32)`` (all linear layers but the LM head, the same
  448 factors); the same torch AdamW step (what ``peftkit.optimizer`` builds for LoRA).

The contenders run in interleaved rounds (see common.py) with the same thread count; ratios are medians of
per-round ratios with their min..max. Peak memory comes from one fresh subprocess per contender.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    MEMORY_FLAG,
    freeze_all_but_input_embedding,
    interleaved_rounds,
    llama_batch,
    llama_model,
    markdown_table,
    peak_memory_in_subprocesses,
    report_step_memory,
    summarize,
    trainable_count,
    training_step,
)

import peftkit  # noqa: E402

RANK, ALPHA, LR = 16, 32, 1e-4


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def build_floor(batch):
    model = freeze_all_but_input_embedding(llama_model())
    return model, training_step(model, batch, None)


def build_peft(batch):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(llama_model(), LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                     target_modules="all-linear")).train()
    return model, training_step(model, batch, adamw(model))


def build_peftkit(batch):
    model = llama_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftkit.wrap(model, "lora", r=RANK, alpha=ALPHA)
    return model, training_step(model, batch, adamw(model))


CONTENDERS = {"floor": build_floor, "peft": build_peft, "peftkit": build_peftkit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(MEMORY_FLAG, dest="memory_of", choices=list(CONTENDERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = llama_batch(4, 256)
    if args.memory_of:
        report_step_memory(CONTENDERS[args.memory_of](batch)[1])
        return
    built = {name: build(batch) for name, build in CONTENDERS.items()}
    params = {name: trainable_count(model) for name, (model, _) in built.items()}
    times = interleaved_rounds({name: step for name, (_, step) in built.items()}, rounds=args.rounds,
                               warmup=args.warmup, progress=lambda line: print(line, file=sys.stderr, flush=True))
    del built
    memory = None if args.no_memory else peak_memory_in_subprocesses(__file__, list(CONTENDERS), args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} interleaved rounds "
          f"(+{args.warmup} warm-up), batch 4x256, LoRA r={RANK} alpha={ALPHA} on all linear layers\n")
    print(markdown_table(summarize(times, ["floor", "peft"]), memory, params))


if __name__ == "__main__":
    main()
