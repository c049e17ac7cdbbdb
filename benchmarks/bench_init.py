"""Init wall time and peak memory of the data-driven inits (LoRA-GA, EVA) against PEFT's, on the issue-2 model.

    OMP_NUM_THREADS=1 python benchmarks/bench_init.py --rounds 3     # about 4 minutes on one CPU core

Model: Llama config (hidden 512, intermediate 1408, 4 layers, 8 heads, vocab 8000; ``benchmarks/common.py``),
fp32, adapters r=8 on every linear layer but the LM head; the same 4 batches of 4 x 128 tokens for everyone.
Contenders:

- ``peft-ga``: PEFT 0.21.2 ``preprocess_loraga`` (weight.grad of every target) + ``get_peft_model``;
- ``ga-exact``: ``peftkit.wrap(model, "lora-ga", peft_compat=...)`` with the exact SVD of G (hook G = ΔᵀX);
- ``ga-sketch``: the same with ``gradient_sketch=32`` (single-pass randomized SVD from G·Ω, Gᵀ·Ψ; never forms G);
- ``peft-eva``: PEFT ``get_peft_model`` + ``initialize_lora_eva_weights``; ``eva``: ``peftkit.wrap(model, "eva")``
  (both rho=2, tau=0.9; EVA's svd="lowrank" so that both run the same incremental PCA).

Each measurement is one fresh subprocess (model and batches built first, then the kernel's high-water mark is
reset through /proc/self/clear_refs, then the init alone runs): the init's wall time and its peak resident
memory above what was resident before it. Rounds are interleaved (every contender once per round, rotated);
the script prints medians and the medians of the per-round ratios to PEFT. ``ga-sketch`` also reports the
subspace error of its top-2r singular vectors against the exact SVD (smallest principal-angle cosine per
layer, worst and median over layers). Linux only.
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

CONTENDERS = ["peft-ga", "ga-exact", "ga-sketch", "peft-eva", "eva"]
RANK, SKETCH = 8, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def run_one(name: str) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import llama_batch, llama_model

    import peftkit

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = llama_model(0).eval()
    batches = [llama_batch(4, 128, seed=i) for i in range(4)]
    peftkit.methods()  # registry discovery outside the measurement
    import peft  # noqa: F401  (imports outside the measurement, for everyone alike)
    from peft import EvaConfig, LoraConfig, LoraGAConfig, get_peft_model, initialize_lora_eva_weights
    from peft.tuners.lora.loraga import preprocess_loraga

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
                                eva_config=EvaConfig(rho=2.0, tau=0.9))
            initialize_lora_eva_weights(get_peft_model(model, config), batches, show_progress_bar=False)
        else:
            peftkit.wrap(model, "eva", r=RANK, alpha=16.0, targets=TARGETS, data=batches, tau=0.9, svd="lowrank",
                         max_batches=10_000)
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "peak_mib": (_rss_kib("VmHWM:") - before) / 1024}
    if name == "ga-sketch":
        result["subspace"] = _sketch_error(model, batches)
    return result


def _sketch_error(model, batches) -> dict:
    """Smallest principal-angle cosine between the sketch's and the exact top-2r singular subspaces (U and V)."""
    import peftkit
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    results: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
    for round_index in range(args.rounds):
        order = CONTENDERS[round_index % len(CONTENDERS):] + CONTENDERS[:round_index % len(CONTENDERS)]
        for name in order:
            proc = subprocess.run([sys.executable, __file__, "--one", name], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"rounds: {args.rounds}; threads: {env['OMP_NUM_THREADS']}; r={RANK}; 4 batches of 4x128 tokens\n")
    print("| contender | init time (s, median) | time / PEFT (median of rounds) | peak memory above start (MiB, median) | memory / PEFT |")
    print("|---|---|---|---|---|")
    for name in CONTENDERS:
        reference = "peft-ga" if "ga" in name else "peft-eva"
        times = [r["seconds"] for r in results[name]]
        peaks = [r["peak_mib"] for r in results[name]]
        t_ratio = statistics.median(a["seconds"] / b["seconds"] for a, b in zip(results[name], results[reference]))
        m_ratio = statistics.median(a["peak_mib"] / b["peak_mib"] for a, b in zip(results[name], results[reference]))
        print(f"| {name} | {statistics.median(times):.2f} | {t_ratio:.2f} | {statistics.median(peaks):.0f} | {m_ratio:.2f} |")
    sub = results["ga-sketch"][0]["subspace"]
    print(f"\nga-sketch (k={SKETCH}) vs exact SVD, top-{2 * RANK} subspaces: smallest principal-angle cosine "
          f"worst layer {sub['worst_cos']:.4f}, median layer {sub['median_cos']:.4f}")


if __name__ == "__main__":
    main()
