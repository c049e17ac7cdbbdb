"""Training-step time of the pair optimizers (LoRA-Pro full and efficient, LoFT, the preconditioned AdamW)
against plain LoRA with AdamW, on the issue-2 benchmark model, and the optimizer-state memory of each.

    OMP_NUM_THREADS=1 python benchmarks/bench_optimizers.py             # about 3-4 minutes on one CPU core
    python benchmarks/bench_optimizers.py --device cuda --threads 16    # on a GPU

Model: Llama config, hidden 512, intermediate 1408, 4 layers, 8 heads, vocab 8000; batch 4 x 256 tokens;
LoRA r=16, alpha=32 on every linear layer but the LM head; fp32; lr 1e-4. One step = forward, backward,
optimizer step, zero_grad. Every variant has its own copy of the same wrapped model. The variants run
interleaved, one step each per round in a rotating order, so machine noise hits all of them alike; the script
reports the median step time, the median of the per-round ratios to the LoRA-AdamW step, and the optimizer
state size (LoRA-Pro full's extra memory is its m×n moments: 2·Σ m·n floats).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from common import llama_batch, llama_model  # benchmarks/common.py: the issue-2 model and batch

import peftkit

VARIANTS = {
    "lora-adamw": ("adamw", {}),
    "lora-pro-full": ("lora-pro", {"mode": "full"}),
    "lora-pro-efficient": ("lora-pro", {"mode": "efficient"}),
    "loft": ("loft", {}),
    "preconditioned-adamw": ("lora-one-preconditioner", {}),
}


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = {k: v.to(device) for k, v in llama_batch().items()}

    steps, optimizers = {}, {}
    for label, (name, options) in VARIANTS.items():
        model = llama_model().to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peftkit.wrap(model, "lora", r=16, alpha=32)
        opt = peftkit.optimizer(model, 1e-4, name=name, **options)
        optimizers[label] = opt

        def step(model=model, opt=opt) -> None:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[label] = step

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    times = {label: [] for label in steps}
    labels = list(steps)
    for round_index in range(args.rounds):
        # rotate the order each round, so no variant always runs first (after the others' cache traffic)
        for label in labels[round_index % len(labels):] + labels[:round_index % len(labels)]:
            times[label].append(timed(steps[label]))
    base = times["lora-adamw"]
    print(f"device {args.device}, threads {args.threads}, {args.rounds} interleaved rounds, batch 4x256, r=16")
    print(f"{'variant':<22}{'median step (s)':>16}{'ratio to LoRA':>15}{'optimizer state (MiB)':>23}")
    for label, values in times.items():
        ratio = statistics.median(v / b for v, b in zip(values, base))
        print(f"{label:<22}{statistics.median(values):>16.4f}{ratio:>15.3f}"
              f"{state_bytes(optimizers[label]) / 2**20:>23.1f}")
    extra = state_bytes(optimizers["lora-pro-full"]) - state_bytes(optimizers["lora-adamw"])
    print(f"LoRA-Pro full: extra optimizer memory over LoRA-AdamW {extra / 2**20:.1f} MiB (m×n moments)")


if __name__ == "__main__":
    main()
