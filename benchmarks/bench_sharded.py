"""Per-process memory and step time of the sharded engines, side by side: LoRA and LoRA-Pro (full) under ddp,
fsdp2, zero2 and zero3 (DeepSpeed) at N = 1 and 2 processes, on a Llama built from a config (hidden 1024), as
ratios to ddp at the same N.

    python benchmarks/bench_sharded.py [--steps 3] [--layers 2] [--rounds 2]
    python benchmarks/bench_sharded.py --load [--layers 8] [--peftkit-from DIR]   # loading a pretrained folder
    python benchmarks/bench_sharded.py --formula 2048:8,1024:4,1536:6   # the memory formula vs measured

``--load``: ``peftkit train`` (LoRA, 2 steps, one adapter checkpoint) from a Llama folder of random fp32 weights
(hidden 2048, intermediate 6144, ``--layers`` blocks, byte vocabulary; 437M parameters at 8 layers), written
once into ``$TMPDIR`` (never the repository), at N = 1 and under fsdp2 and zero3 at N = 2. Per process: the
bytes of base weights it holds after loading (``peftkit.sharded.held_base_bytes``), its resident memory before
the model is built (imports, the tokenized data), and its peak resident memory over the whole run
(``ru_maxrss``: loading, the init, 2 steps, the checkpoint), each rank's, and the worst rank's peak as a ratio
to one process. ``--peftkit-from DIR`` runs another checkout's peftkit (e.g.
the main branch, for a before/after on the same machine).

``--formula H:L,...``: the ``--load`` cells (N = 1, fsdp2 and zero3 at N = 2) from a folder of that shape at each
hidden size H (intermediate 3H, heads of 128) and depth L, with the per-process memory formula of
docs/distributed.md (:func:`formula`) printed term by term next to each rank's measured peak.

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
import math
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


LOAD_CONFIG = dict(model_type="llama", hidden_size=2048, intermediate_size=6144, num_attention_heads=16,
                   num_key_value_heads=16, vocab_size=259, max_position_embeddings=256, tie_word_embeddings=False)


def write_folder(layers: int, hidden: int = 2048) -> Path:
    """A Llama folder of random fp32 weights in ``$TMPDIR`` (written once; reused by later runs): the ``--load``
    shape at ``hidden`` (intermediate 3 × hidden, heads of 128)."""
    from common import random_model_folder

    if hidden == LOAD_CONFIG["hidden_size"]:
        return random_model_folder("peftkit_bench_llama_h2048", LOAD_CONFIG, layers)
    config = dict(LOAD_CONFIG, hidden_size=hidden, intermediate_size=3 * hidden,
                  num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128)
    return random_model_folder(f"peftkit_bench_llama_h{hidden}", config, layers)


def load_recipe(folder: Path, root: Path, engine: str, processes: int) -> dict:
    words = "the quick brown fox jumps over a lazy dog while seven small birds sing".split()
    rows = [{"text": " ".join(words[(i + j) % len(words)] for j in range(24))} for i in range(32)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"model": {"name": str(folder), "tokenizer": "bytes", "task": "causal-lm", "dtype": "float32"},
            "data": {"train": str(data), "format": "text", "max_length": 64},
            "adapter": {"method": "lora", "r": 8, "alpha": 16},
            "optimizer": {"lr": 2e-4},
            "training": {"max_steps": 2, "batch_size": 2 // processes, "log_every": 1, "save_every": 2,
                         "distributed": engine, "output_dir": str(root / f"run_{engine}_{processes}"), "seed": 0,
                         # Equal work on every cell: "auto" checkpoints a one-process causal-LM run but not fsdp2/zero3.
                         "gradient_checkpointing": False},
            "logging": {"progress_bar": False}}


def load_cell(recipe_path: str, out: str) -> None:
    """One process of a ``--load`` run: train the recipe, then write this rank's held base bytes and peak RSS."""
    from peftkit.train import from_dict, loop, run_setup, train

    built = {}
    prepare, load_model = loop.prepare, run_setup.load_model

    def before_model(*args, **kwargs):
        import transformers.modeling_utils  # noqa: F401 - the modeling code building the model imports: a fixed cost

        built["process_mib"] = _rss_mib()  # what the process holds before the model: imports, data
        return load_model(*args, **kwargs)

    def capture(*args, **kwargs):
        run = prepare(*args, **kwargs)
        built["model"] = run.model  # sharded in place by the engine (at load, or before step 1)
        return run

    loop.prepare, run_setup.load_model = capture, before_model
    result = train(from_dict(json.loads(Path(recipe_path).read_text())))
    assert result.status == "done", result
    held = _held_bytes(built["model"])
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{out}.rank{rank}").write_text(json.dumps({
        "held_mb": held / 2**20, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "process_mib": built["process_mib"]}))


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _held_bytes(model) -> int:
    """Bytes of base weights this process stores (a DTensor: its local shard; a ZeRO-3 parameter: its partition)."""
    from peftkit.sharded import held_base_bytes

    return held_base_bytes(model, frozen_only=True)


# The sharded engines' CPU allocator setting (peftkit.train.engines.MMAP_THRESHOLD), given to a one-process
# cell through glibc's own variable for a like-for-like baseline: peftkit's one-process run keeps glibc's default.
SAME_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(64 << 10)}


def launch_load(folder: Path, engine: str, processes: int, peftkit_from: str | None = None,
                extra_env: dict | None = None) -> list[dict]:
    """One ``--load`` cell (``peftkit train`` from ``folder``): each rank's held base MiB, peak RSS MiB and the RSS
    it had before the model."""
    import tempfile

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (peftkit_from, str(REPO)) if p), **(extra_env or {})}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        recipe_path = root / "recipe.json"
        recipe_path.write_text(json.dumps(load_recipe(folder, root, engine, processes)))
        out = root / "cell"
        args = [str(Path(__file__).resolve()), "--load-cell", str(recipe_path), str(out)]
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
               if processes > 1 else [sys.executable]) + args
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{engine} N={processes} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(processes)]


def folder_parameters(folder: Path) -> int:
    from safetensors import safe_open

    from peftkit.sharded import checkpoint_files

    params = 0
    for name, file in checkpoint_files(str(folder)).items():
        with safe_open(file, framework="pt") as f:
            params += math.prod(f.get_slice(name).get_shape())
    return params


def load_benchmark(layers: int, peftkit_from: str | None) -> None:
    folder = write_folder(layers)
    params = folder_parameters(folder)
    print(f"Llama hidden 2048, {layers} layers, {params / 1e6:.0f}M parameters, fp32 safetensors; peftkit train, "
          f"LoRA r=8, 2 steps, batch 2 globally, seq 64, CPU gloo; peftkit from {peftkit_from or REPO}\n")
    print("| N | engine | base weights MiB/proc | RSS before the model MiB | peak RSS MiB per rank | "
          "worst peak / N=1 |")
    print("|---|---|---|---|---|---|")
    one = None
    cells = ((1, "ddp", None), (1, "ddp, mmap threshold 64 KiB", SAME_ALLOCATOR), (2, "fsdp2", None),
             (2, "zero3", None))
    for processes, label, extra in cells:
        ranks = launch_load(folder, label.split(",")[0], processes, peftkit_from, extra)
        worst = max(r["peak_mib"] for r in ranks)
        one = one or worst
        peaks = " / ".join(f"{r['peak_mib']:.0f}" for r in ranks)
        print(f"| {processes} | {label} | {ranks[0]['held_mb']:.0f} | {ranks[0]['process_mib']:.0f} | {peaks} | "
              f"{worst / one:.2f} |", flush=True)


# The formula's constants (docs/distributed.md, "Memory per process: the formula"), bytes per element of fp32.
# Activations kept for the backward of one block, per token: ~14 hidden-sized tensors (norm inputs and outputs,
# q/k/v before and after RoPE, the attention output, the residuals, the adapters' inputs) and 5 of the MLP's
# width (gate, up, their activation and product, down's input); the logits 3 times (logits, log-softmax, gradient).
ACT_HIDDEN, ACT_MLP, ACT_LOGITS = 14, 5, 3
# Under fsdp2 / zero3 a unit all-gathered for its forward or backward: the whole weight and the all-gather's
# buffer beside it, the largest unit (one linear weight by default) twice.
GATHERED_UNITS = 2


def formula(folder: Path, engine: str, processes: int, batch: int, seq: int, r: int = 8) -> dict:
    """The per-process terms of the memory formula for ``peftkit train`` (LoRA r on every linear of the blocks,
    AdamW, fp32, no gradient checkpointing) from ``folder`` at ``processes`` processes, in MiB (without the
    process's own memory before the model, which the run measures)."""
    from safetensors import safe_open

    from peftkit.sharded import checkpoint_files

    config = json.loads((folder / "config.json").read_text())
    h, f, v, layers = (config["hidden_size"], config["intermediate_size"], config["vocab_size"],
                       config["num_hidden_layers"])
    base = adapter = largest = 0
    for name, file in checkpoint_files(str(folder)).items():
        with safe_open(file, framework="pt") as fh:
            shape = fh.get_slice(name).get_shape()
        base += math.prod(shape) * 4
        if ".layers." in name and name.endswith("proj.weight"):
            adapter += r * (shape[0] + shape[1])
            largest = max(largest, math.prod(shape) * 4)
    sharded = processes > 1 and engine in ("fsdp2", "zero3")
    activations = layers * batch * seq * (ACT_HIDDEN * h + ACT_MLP * f) * 4 + ACT_LOGITS * batch * seq * v * 4
    terms = {"base": base / (processes if sharded else 1), "states": 16 * adapter, "activations": activations,
             "gathered": GATHERED_UNITS * largest if sharded else 0}
    return {key: value / 2**20 for key, value in terms.items()}


def formula_benchmark(sizes: list[tuple[int, int]]) -> None:
    """Predicted against measured peak RSS per process at each (hidden, layers): N = 1 (with the sharded engines'
    allocator setting, like for like), and N = 2 under fsdp2 and zero3."""
    print("peftkit train, LoRA r=8 on every block linear, AdamW, fp32, 2 steps, batch 2 globally, seq 64, CPU gloo; "
          "process = RSS before the model (measured); MiB per process, worst rank\n")
    print("| hidden | layers | parameters | N | engine | base held (measured) | process | base | adapters+AdamW | "
          "activations | gathered | predicted | measured peak per rank | measured / predicted | worst / N=1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for hidden, layers in sizes:
        folder = write_folder(layers, hidden)
        params = folder_parameters(folder)
        one = None
        for processes, engine in ((1, "ddp"), (2, "fsdp2"), (2, "zero3")):
            ranks = launch_load(folder, engine, processes, extra_env=SAME_ALLOCATOR if processes == 1 else None)
            worst = max(ranks, key=lambda row: row["peak_mib"])
            one = one or worst["peak_mib"]
            terms = formula(folder, engine, processes, batch=2 // processes, seq=64)
            predicted = worst["process_mib"] + sum(terms.values())
            peaks = " / ".join(f"{r['peak_mib']:.0f}" for r in ranks)
            print(f"| {hidden} | {layers} | {params / 1e6:.0f}M | {processes} | {engine} | {ranks[0]['held_mb']:.0f} | "
                  f"{worst['process_mib']:.0f} | {terms['base']:.0f} | {terms['states']:.0f} | "
                  f"{terms['activations']:.0f} | {terms['gathered']:.0f} | {predicted:.0f} | {peaks} | "
                  f"{worst['peak_mib'] / predicted:.2f} | {worst['peak_mib'] / one:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cell", nargs=5, metavar=("METHOD", "ENGINE", "STEPS", "LAYERS", "OUT"))
    parser.add_argument("--load", action="store_true", help="peftkit train from a pretrained folder (above)")
    parser.add_argument("--peftkit-from", default=None, help="with --load: the checkout whose peftkit runs")
    parser.add_argument("--load-cell", nargs=2, metavar=("RECIPE", "OUT"))
    parser.add_argument("--formula", default=None, metavar="H:L,H:L,...",
                        help="predicted vs measured memory per process at these (hidden, layers), e.g. "
                             "1024:4,1536:6,2048:8")
    args = parser.parse_args()
    if args.load_cell:
        torch.set_num_threads(1)
        load_cell(*args.load_cell)
        return
    if args.formula:
        formula_benchmark([tuple(int(x) for x in size.split(":")) for size in args.formula.split(",")])
        return
    if args.load:
        load_benchmark(args.layers or 8, args.peftkit_from)
        return
    args.layers = args.layers or 2
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
