"""DoRA step time: peftkit's ``dora`` against HF PEFT's ``LoraConfig(use_dora=True)`` (issue 31).

    python benchmarks/bench_dora.py                  # the benchmark Llama (hidden 512, 4 layers), batch 4x128
    python benchmarks/bench_dora.py --rounds 20 --seq 64

Both wrap every linear layer but the LM head at r=16, alpha=32, dropout 0, from the same base weights, and step
on the same batch: forward + backward (gradients dropped; no optimizer, whose cost is the same for both). The
contenders run in interleaved rounds (the order rotates each round) on ONE thread, and each step is timed in CPU
time of this process (``time.process_time``): on a shared machine wall time swings several-fold, CPU time much
less. Reported: the median per-round ratio peftkit / PEFT with its min..max, and plain peftkit LoRA for scale.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import llama_batch, llama_model  # noqa: E402

import peftkit  # noqa: E402

RANK, ALPHA = 16, 32


def build_peft():
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(llama_model(), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear",
                                                        use_dora=True)).train()


def build_peftkit(method: str):
    def build():
        model = llama_model()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peftkit.wrap(model, method, r=RANK, alpha=ALPHA)
        return model.train()

    return build


CONTENDERS = {"peft-dora": build_peft, "peftkit-dora": build_peftkit("dora"), "peftkit-lora": build_peftkit("lora")}


def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    batch = llama_batch(4, args.seq)
    models = {name: build() for name, build in CONTENDERS.items()}
    names = list(models)
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for index in range(args.rounds + 1):  # round 0 warms up
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.process_time()
            step(models[name], batch)
            if index:
                cpu[name].append(time.process_time() - start)
        if index:
            print(f"round {index}/{args.rounds}: " + ", ".join(f"{n} {1e3 * cpu[n][-1]:.0f} ms" for n in names),
                  file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, 1 thread, CPU time, {args.rounds} interleaved rounds, batch 4x{args.seq}, "
          f"r={RANK} on all linear layers\n")
    print("| contender | median step (CPU ms) | ratio to peft-dora (median, min..max) |")
    print("|---|---|---|")
    for name in names:
        ratios = [a / b for a, b in zip(cpu[name], cpu["peft-dora"])]
        print(f"| {name} | {1e3 * statistics.median(cpu[name]):.0f} | {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}..{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
