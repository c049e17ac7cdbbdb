"""Peak memory and time of a causal-LM LoRA step with the full logits (peftkit.loss "item_count": the model's own
loss, what ``training.chunked_loss: false`` runs) against the fused chunked head + cross-entropy
(peftkit.chunked_loss, the default) on a SmolLM2-135M-sized model (issue 29, item 1).

    python benchmarks/bench_chunked_loss.py --threads 1 --rounds 3

Model: SmolLM2-135M's shape (Llama: hidden 576, intermediate 1536, 30 layers, 9 heads, 3 KV heads, vocab
49,152, tied embeddings), random weights, fp32 (no download). Batch 8 × 256 tokens; ``--prompt`` of every row is
masked out of the labels (an SFT batch: only the answers are targets; 0 for a pre-training batch). LoRA r=8 on
every linear layer but the head, torch AdamW. Both contenders start from the same weights and step on the same
batch; the loss of a step is the sum of its target tokens' losses over the global target count either way.
Peak memory: one fresh subprocess per contender (common.py); times: interleaved rounds, ratios of CPU time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MEMORY_FLAG, llama_model, peak_memory_in_subprocesses, report_step_memory  # noqa: E402

import peftkit  # noqa: E402
from peftkit.loss import batch_loss_units, share_of_global_mean  # noqa: E402

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
MODES = {"full_logits": "item_count", "chunked": "chunked"}


def build(name: str, args: argparse.Namespace):
    model = peftkit.wrap(llama_model(**{**SMOLLM2, "num_hidden_layers": args.layers}), "lora", r=8, alpha=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SMOLLM2["vocab_size"], (args.batch, args.seq), generator=generator)
    labels = ids.clone()
    labels[:, :args.prompt] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    units = batch_loss_units(model, batch)

    def step() -> None:
        share_of_global_mean(model, batch, units, units, MODES[name]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=SMOLLM2["num_hidden_layers"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument(MEMORY_FLAG, dest="memory_of", choices=list(MODES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        report_step_memory(build(args.memory_of, args), warmup=1)
        return
    extra = ["--layers", str(args.layers), "--batch", str(args.batch), "--seq", str(args.seq),
             "--prompt", str(args.prompt)]
    memory = peak_memory_in_subprocesses(__file__, list(MODES), threads=args.threads, extra_args=extra)
    steps = {name: build(name, args) for name in MODES}
    cpu: dict[str, list[float]] = {name: [] for name in MODES}
    names = list(MODES)
    for index in range(args.rounds + 1):  # the first round warms up
        for name in names[index % 2:] + names[:index % 2]:
            start = time.process_time()
            steps[name]()
            if index:
                cpu[name].append(time.process_time() - start)
    ratios = sorted(c / f for c, f in zip(cpu["chunked"], cpu["full_logits"]))
    print(f"SmolLM2-135M shape ({args.layers} layers), batch {args.batch} x {args.seq}, prompt {args.prompt} "
          f"masked, {args.threads} thread(s), {args.rounds} rounds")
    print("| loss | peak RSS (MiB) | step adds (MiB) | CPU s / step (median) |")
    print("|---|---:|---:|---:|")
    for name in MODES:
        print(f"| {name} | {memory[name]['peak_mib']:.0f} | {memory[name]['step_mib']:.0f} | "
              f"{sorted(cpu[name])[len(cpu[name]) // 2]:.2f} |")
    print(f"chunked / full_logits CPU time per round: median {ratios[len(ratios) // 2]:.3f} "
          f"(min {ratios[0]:.3f}, max {ratios[-1]:.3f})")


if __name__ == "__main__":
    main()
