"""Training-step time of the structural adapters (HRA, Hydra, ElaLoRA when registered) on the issue-2 model.

    OMP_NUM_THREADS=1 python benchmarks/bench_structural.py            # about 2 minutes on one CPU core
    python benchmarks/bench_structural.py --device cuda --threads 16   # on a GPU

Model: Llama config, hidden 512, intermediate 1408, 4 layers, 8 heads, vocab 8000; batch 4 x 256 tokens;
adapters on every linear layer but the LM head; fp32; AdamW (lr 1e-4). One step = forward, backward,
optimizer step, zero_grad. Variants, all built from the same base weights:

- floor: the frozen model's forward and backward (activation gradients only, no optimizer);
- peftkit HRA r=8 and PEFT's HRA r=8 (PEFT builds Q (in x in) and W·Q in every forward);
- peftkit LoRA r=8, Hydra r_p = r_s = 4 (equal trainable parameters on square layers: 16·d per layer),
  and ElaLoRA r=8 if ``adapters/elalora.py`` is registered when the script runs.

The variants run interleaved, one step each per round, so machine noise hits all of them alike; the script
reports the median step time and the medians of the per-round ratios (to the floor, to PEFT's HRA, to LoRA).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit


def benchmark_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=8000, max_position_embeddings=512,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def make_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None
              ) -> Callable[[], None]:
    def step() -> None:
        model(**batch).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_variants(device: str, batch: dict[str, torch.Tensor]) -> dict[str, tuple[Callable[[], None], int]]:
    from peft import HRAConfig, get_peft_model

    variants: dict[str, tuple[Callable[[], None], int]] = {}
    floor = benchmark_model().to(device).train()
    for p in floor.parameters():
        p.requires_grad_(False)
    floor.enable_input_require_grads()  # the backward runs through every layer, as with adapters
    variants["floor (frozen fwd+bwd)"] = (make_step(floor, batch, None), 0)

    def ours(method: str, **options) -> tuple[Callable[[], None], int]:
        model = benchmark_model().to(device).train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peftkit.wrap(model, method, **options)
        return make_step(model, batch, peftkit.optimizer(model, lr=1e-4)), trainable(model)

    variants["peftkit HRA r=8"] = ours("hra", r=8)
    peft_model = get_peft_model(benchmark_model().to(device), HRAConfig(r=8, target_modules="all-linear")).train()
    variants["PEFT HRA r=8"] = (make_step(peft_model, batch, torch.optim.AdamW(
        [p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)), trainable(peft_model))
    variants["peftkit LoRA r=8"] = ours("lora", r=8, alpha=16)
    variants["peftkit Hydra r_p=r_s=4"] = ours("hydra", r=4, sequential_r=4)
    if "elalora" in peftkit.methods():
        try:
            variants["peftkit ElaLoRA r=8"] = ours("elalora", r=8)
        except Exception as exc:  # a method still under construction must not cost the other figures
            print(f"ElaLoRA skipped: {type(exc).__name__}: {exc}")
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8000, (4, 256), generator=gen).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    variants = build_variants(args.device, batch)
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for round_index in range(args.warmup + args.rounds):
        for name in names:
            sync()
            start = time.perf_counter()
            variants[name][0]()
            sync()
            if round_index >= args.warmup:
                times[name].append(time.perf_counter() - start)

    def ratio(name: str, reference: str) -> float:
        return statistics.median(a / b for a, b in zip(times[name], times[reference]))

    floor, peft_hra, lora = names[0], "PEFT HRA r=8", "peftkit LoRA r=8"
    print(f"torch {torch.__version__}, device {args.device}, threads {args.threads}, "
          f"{args.rounds} interleaved rounds (+{args.warmup} warm-up), batch 4x256\n")
    print("| variant | trainable params | median step (ms) | x floor | PEFT HRA / this | x LoRA |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        step_ms = 1e3 * statistics.median(times[name])
        print(f"| {name} | {variants[name][1]:,} | {step_ms:.1f} | {ratio(name, floor):.2f} | "
              f"{ratio(peft_hra, name):.2f} | {ratio(name, lora):.2f} |")


if __name__ == "__main__":
    main()
