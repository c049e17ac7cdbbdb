"""Init wall time and peak memory of the data-driven inits (LoRA-GA, EVA) against PEFT's, on the issue-2 model.

    OMP_NUM_THREADS=1 python benchmarks/bench_init.py --rounds 2 --timeout 150   # about 7 minutes on one CPU core

Model: Llama config (hidden 512, intermediate 1408, 4 layers, 8 heads, vocab 8000; ``benchmarks/common.py``),
fp32, adapters r=8 on every linear layer but the LM head; the same 4 batches of 4 x 128 tokens for everyone.

Data: real text, not random ids (on random ids EVA's incremental PCA hardly converges). The batches are cut from
tiny-shakespeare (``../shared/data/tinyshakespeare/input.txt`` beside the checkout, or ``--text PATH``; read in place, never
copied, nothing downloaded) with a byte-level tokenizer: token id = byte value (the file is ASCII, so every id is
below 128 < vocab 8000). Batch b, row i is the 128 bytes starting at offset (4·b + i)·128, i.e. the first
4·4·128 bytes of the file in order; labels = input_ids, attention_mask = 1. A missing file is an error (exit 2).
Contenders:

- ``peft-ga``: PEFT 0.21.2 ``preprocess_loraga`` (weight.grad of every target) + ``get_peft_model``;
- ``ga-exact``: ``peftkit.wrap(model, "lora-ga")`` (default options) with the exact SVD of G (hook G = ΔᵀX);
- ``ga-sketch``: the same with ``gradient_sketch=32`` (single-pass randomized SVD from G·Ω, Gᵀ·Ψ; never forms G);
- ``peft-eva``: PEFT ``get_peft_model`` + ``initialize_lora_eva_weights``; ``eva``: ``peftkit.wrap(model, "eva")``
  (both rho=2, tau=0.9, label mask on with value -100, no whitening; peftkit's svd="lowrank" so that both run
  the same incremental PCA; PEFT's EVA has no cap on forward passes, so peftkit's max_batches is set out of reach).

Every measurement runs under ``--timeout`` seconds; a contender past it is reported as timed out (its time as
"> timeout", no ratio) and the other contenders are still measured.

Each measurement is one fresh subprocess (model and batches built first, then the kernel's high-water mark is
reset through /proc/self/clear_refs, then the init alone runs): the init's wall time and its peak resident
memory above what was resident before it. Rounds are interleaved (every contender once per round, rotated);
the script prints medians, the medians of the per-round ratios to PEFT, and the number of forward passes of the
base model during the init (for EVA: how many batches its incremental PCA needed to converge). ``ga-sketch``
also reports the subspace error of its top-2r singular vectors against the exact SVD (smallest principal-angle
cosine per layer, worst and median over layers). Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

CONTENDERS = ["peft-ga", "ga-exact", "ga-sketch", "peft-eva", "eva"]
RANK, SKETCH = 8, 32
N_BATCHES, BATCH_SIZE, SEQ_LEN = 4, 4, 128
# The project's shared data folder sits beside the checkout (never inside the repository).
DEFAULT_TEXT = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def text_batches(path: str) -> list[dict]:
    """``N_BATCHES`` causal-LM batches, each (BATCH_SIZE, SEQ_LEN) int64, of consecutive byte ids from ``path``."""
    import torch

    with open(path, "rb") as text:
        data = text.read(N_BATCHES * BATCH_SIZE * SEQ_LEN)
    if len(data) < N_BATCHES * BATCH_SIZE * SEQ_LEN:
        raise SystemExit(f"{path}: {len(data)} bytes, need {N_BATCHES * BATCH_SIZE * SEQ_LEN}")
    ids = torch.tensor(list(data), dtype=torch.int64).view(N_BATCHES, BATCH_SIZE, SEQ_LEN)
    return [{"input_ids": b.clone(), "attention_mask": torch.ones_like(b), "labels": b.clone()} for b in ids]


def run_one(name: str, text: str) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import LLAMA_BENCH, llama_model

    import peftkit

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = llama_model(0).eval()
    batches = text_batches(text)
    assert max(int(b["input_ids"].max()) for b in batches) < LLAMA_BENCH["vocab_size"]
    peftkit.methods()  # registry discovery outside the measurement
    import peft  # noqa: F401  (imports outside the measurement, for everyone alike)
    from peft import EvaConfig, LoraConfig, LoraGAConfig, get_peft_model, initialize_lora_eva_weights
    from peft.tuners.lora.loraga import preprocess_loraga

    forward_passes = [0]  # forwards of the base model during the init (EVA: how long its PCA took to converge)
    model.register_forward_pre_hook(lambda module, args: forward_passes.__setitem__(0, forward_passes[0] + 1))
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _rss_kib("VmRSS:")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "peft-ga":
            config = LoraConfig(r=RANK, lora_alpha=16, target_modules=TARGETS, init_lora_weights="lora_ga",
                                lora_ga_config=LoraGAConfig())

            def train_step():
                for batch in batches:
                    model(**batch).loss.backward()

            preprocess_loraga(model, config, train_step)
            get_peft_model(model, config)
        elif name in ("ga-exact", "ga-sketch"):
            peftkit.wrap(model, "lora-ga", r=RANK, alpha=16.0, rslora=False, targets=TARGETS, data=batches,
                         gradient_sketch=SKETCH if name == "ga-sketch" else None)
        elif name == "peft-eva":
            config = LoraConfig(r=RANK, lora_alpha=16, target_modules=TARGETS, init_lora_weights="eva",
                                eva_config=EvaConfig(rho=2.0, tau=0.9, use_label_mask=True, label_mask_value=-100,
                                                     whiten=False))
            initialize_lora_eva_weights(get_peft_model(model, config), batches, show_progress_bar=False)
        else:
            peftkit.wrap(model, "eva", r=RANK, alpha=16.0, targets=TARGETS, data=batches, rho=2.0, tau=0.9,
                         use_label_mask=True, label_mask_value=-100, whiten=False, svd="lowrank",
                         max_batches=1_000_000)
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "peak_mib": (_rss_kib("VmHWM:") - before) / 1024, "forwards": forward_passes[0]}
    if name == "ga-sketch":
        result["subspace"] = _sketch_error(model, batches)
    return result


def _sketch_error(model, batches) -> dict:
    """Smallest principal-angle cosine between the sketch's and the exact top-2r singular subspaces (U and V)."""
    from peftkit.inject import adapter_layers
    from peftkit.stats import gradient_statistics, signed_svd, sketch_svd, subspace_cosines

    layers = adapter_layers(model)
    exact = gradient_statistics(model, layers, batches)
    sketches = gradient_statistics(model, layers, batches, sketch_size=SKETCH)
    worst = []
    for name in layers:
        u, _, vh = signed_svd(exact[name])
        su, _, svh = sketch_svd(sketches[name], 2 * RANK)
        worst.append(min(float(subspace_cosines(su, u[:, :2 * RANK]).min()),
                         float(subspace_cosines(svh.t(), vh[:2 * RANK].t()).min())))
    return {"worst_cos": min(worst), "median_cos": statistics.median(worst)}


def _median_ratio(results: dict[str, list[dict | None]], name: str, reference: str, key: str) -> str:
    """Median over the rounds where both finished of ``name``'s ``key`` / ``reference``'s; "n/a" if none."""
    pairs = [(a[key], b[key]) for a, b in zip(results[name], results[reference]) if a and b]
    return f"{statistics.median(a / b for a, b in pairs):.2f}" if pairs else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per measurement (whole subprocess)")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="plain-text corpus the batches are cut from")
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, default=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not os.path.isfile(args.text):
        print(f"error: the text corpus {args.text} does not exist; the benchmark needs tiny-shakespeare "
              "(plain ASCII) there, or pass --text PATH to another plain-text file", file=sys.stderr)
        raise SystemExit(2)
    if args.one:
        print(json.dumps(run_one(args.one, args.text)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    names = [name for name in CONTENDERS if name in args.only]
    results: dict[str, list[dict | None]] = {name: [] for name in names}  # None: timed out
    for round_index in range(args.rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            command = [sys.executable, __file__, "--one", name, "--text", args.text]
            try:
                proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"round {round_index + 1}: {name} timed out after {args.timeout:.0f} s", file=sys.stderr)
                results[name].append(None)
                continue
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {round_index + 1}: {name} {results[name][-1]['seconds']:.2f} s, "
                  f"{results[name][-1]['forwards']} forward passes", file=sys.stderr)
    print(f"rounds: {args.rounds}; threads: {env['OMP_NUM_THREADS']}; r={RANK}; {N_BATCHES} batches of "
          f"{BATCH_SIZE}x{SEQ_LEN} byte tokens of {os.path.basename(args.text)}; timeout {args.timeout:.0f} s\n")
    print("| contender | init time (s, median) | time / PEFT (median of rounds) | peak memory above start "
          "(MiB, median) | memory / PEFT | forward passes | timed out |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        reference = "peft-ga" if "ga" in name else "peft-eva"
        done = [r for r in results[name] if r]
        timed_out = len(results[name]) - len(done)
        seconds = f"{statistics.median(r['seconds'] for r in done):.2f}" if done else f"> {args.timeout:.0f}"
        peak = f"{statistics.median(r['peak_mib'] for r in done):.0f}" if done else "n/a"
        t_ratio = _median_ratio(results, name, reference, "seconds") if reference in results else "n/a"
        m_ratio = _median_ratio(results, name, reference, "peak_mib") if reference in results else "n/a"
        forwards = "/".join(sorted({str(r["forwards"]) for r in done})) or "n/a"
        print(f"| {name} | {seconds} | {t_ratio} | {peak} | {m_ratio} | {forwards} | "
              f"{timed_out}/{len(results[name])} |")
    sketches = [r for r in results.get("ga-sketch", []) if r]
    if sketches:
        sub = sketches[0]["subspace"]
        print(f"\nga-sketch (k={SKETCH}) vs exact SVD, top-{2 * RANK} subspaces: smallest principal-angle cosine "
              f"worst layer {sub['worst_cos']:.4f}, median layer {sub['median_cos']:.4f}")


if __name__ == "__main__":
    main()
