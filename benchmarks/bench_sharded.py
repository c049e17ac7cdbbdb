"""Per-process memory and step time of the sharded engines, side by side: LoRA and LoRA-Pro (full) under ddp,
fsdp2, zero2 and zero3 (DeepSpeed) at N = 1 and 2 processes, on a Llama built from a config (hidden 1024), as
ratios to ddp at the same N.

    python benchmarks/bench_sharded.py [--steps 3] [--layers 2] [--rounds 2]

Each cell is its own launch (``torchrun --nproc-per-node N`` of this file with ``--cell``), so a process's peak
resident memory belongs to one cell; the cells run in rounds (every contender once per round, interleaved) and
the step time is the median over rounds of each cell's median step. Memory per process, measured on rank 0:
- ``weights MB``: the model's parameters this process stores (a DTensor counts its local shard, a ZeRO-3
  parameter its partition ``ds_tensor``: between uses the weight itself holds 0 elements);
- ``pair state MB``: the optimizer state of the (A, B) pairs (LoRA-Pro full: its m×n moments);
- ``peak RSS MB``: the process's peak resident memory (``ru_maxrss``), which includes building the whole model
  before it is sharded (CUDA: ``max_memory_allocated`` over the training steps only);
- ``RSS after MB``: the resident memory after the steps (what the process keeps while training).
- ``time / ddp``: the median over rounds of the step-time ratio, with its range over the rounds.
At N = 1 every engine runs the one-process path (nothing to shard across), as the CLI does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16,
              vocab_size=4096, max_position_embeddings=256, tie_word_embeddings=False)
METHODS = {"lora": {}, "lora-pro": {"mode": "full", "shard_moments": True}}
ENGINES = ("ddp", "fsdp2", "zero2", "zero3")
BATCH, SEQ = 2, 64  # per process
_ALIVE: list = []


def cell(method: str, engine: str, steps: int, layers: int) -> dict:
    """Run ``steps`` steps (+1 warm-up) of one cell on this process; rank 0's measurements."""
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import peftkit
    from peftkit import distributed
    from peftkit.train.engines import shard_frozen_base, wrap_deepspeed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **CONFIG))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftkit.wrap(model, method, r=8, alpha=16, targets="all-linear")
    model.train()
    opt = peftkit.optimizer(model, 1e-4, **METHODS[method])
    trainable = [p for p in model.parameters() if p.requires_grad]
    trained = model
    if world > 1 and engine == "ddp":
        trained = torch.nn.parallel.DistributedDataParallel(model)
    elif world > 1 and engine == "fsdp2":
        shard_frozen_base(model, torch.device("cpu"))
    elif world > 1 and engine in ("zero2", "zero3"):
        _ALIVE.append(wrap_deepspeed(model, int(engine[-1])))  # DeepSpeed's engine: its module hooks refer to it
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator().manual_seed(distributed.rank())
    times = []
    for step in range(steps + 1):
        ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=gen)
        start = time.perf_counter()
        trained(input_ids=ids, labels=ids).loss.backward()
        if engine != "ddp":
            distributed.average_gradients(trainable)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:
            dist.barrier()
        if step:  # the first step allocates the optimizer state
            times.append(time.perf_counter() - start)

    def local_numel(p) -> int:
        if hasattr(p, "ds_tensor"):
            return p.ds_tensor.numel()
        return p.to_local().numel() if hasattr(p, "to_local") else p.numel()

    weights = sum(local_numel(p) * p.element_size() for p in model.parameters())
    pair_state = sum(v.numel() * v.element_size() for pair in getattr(opt, "pairs", [])
                     for t in (pair.a, pair.b) for v in opt.state.get(t, {}).values() if isinstance(v, torch.Tensor))
    if not getattr(opt, "pairs", None):  # AdamW: its state for the adapter tensors
        pair_state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                         if isinstance(v, torch.Tensor) and v.dim() > 0)
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    import gc

    gc.collect()
    rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    row = {"method": method, "engine": engine, "processes": world, "step_s": statistics.median(times),
           "weights_mb": weights / 2**20, "pair_state_mb": pair_state / 2**20, "peak_mb": peak / 2**20,
           "rss_mb": rss / 2**20}
    if world > 1:
        dist.destroy_process_group()
    return row


def launch(method: str, engine: str, processes: int, steps: int, layers: int) -> dict:
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_sharded_{os.getpid()}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = [str(Path(__file__).resolve()), "--cell", method, engine, str(steps), str(layers), str(out)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)] if processes > 1
           else [sys.executable]) + args
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{method} {engine} N={processes} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    row = json.loads(out.read_text())
    out.unlink()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cell", nargs=5, metavar=("METHOD", "ENGINE", "STEPS", "LAYERS", "OUT"))
    args = parser.parse_args()
    if args.cell:
        torch.set_num_threads(1)
        method, engine, steps, layers, out = args.cell
        row = cell(method, engine, int(steps), int(layers))
        if int(os.environ.get("RANK", "0")) == 0:
            Path(out).write_text(json.dumps(row))
        return
    rows: dict[tuple, list[dict]] = {}
    for _ in range(args.rounds):
        for processes in (1, 2):
            for method in METHODS:
                for engine in ENGINES:
                    row = launch(method, engine, processes, args.steps, args.layers)
                    rows.setdefault((method, engine, processes), []).append(row)
    print(f"Llama hidden {CONFIG['hidden_size']}, {args.layers} layers, all-linear r=8, batch {BATCH}x{SEQ} per "
          f"process, fp32, CPU gloo; median of {args.rounds} rounds x {args.steps} steps\n")
    print("| method | N | engine | weights MB/proc | pair state MB/proc | peak RSS MB/proc | RSS after MB/proc | "
          "step s | weights / ddp | peak / ddp | RSS after / ddp | time / ddp (range over rounds) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for processes in (1, 2):
        for method in METHODS:
            ddp = _median_row(rows[(method, "ddp", processes)])
            for engine in ENGINES:
                r = _median_row(rows[(method, engine, processes)])
                ratios = [mine["step_s"] / base["step_s"]
                          for mine, base in zip(rows[(method, engine, processes)], rows[(method, "ddp", processes)])]
                print(f"| {method} | {processes} | {engine} | {r['weights_mb']:.0f} | {r['pair_state_mb']:.1f} | "
                      f"{r['peak_mb']:.0f} | {r['rss_mb']:.0f} | {r['step_s']:.2f} | "
                      f"{r['weights_mb'] / ddp['weights_mb']:.2f} | {r['peak_mb'] / ddp['peak_mb']:.2f} | "
                      f"{r['rss_mb'] / ddp['rss_mb']:.2f} | {statistics.median(ratios):.2f} "
                      f"({min(ratios):.2f}-{max(ratios):.2f}) |")


def _median_row(rows: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in rows) if isinstance(rows[0][key], float) else rows[0][key]
            for key in rows[0]}


if __name__ == "__main__":
    main()
