"""One cell of the grid: one contender fine-tuned on one task at one learning rate, and its record."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import resource
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import peftkit
from peftkit import registry
from peftkit.config import resolve_config
from peftkit.inject import adapter_layers
from peftkit.train.build import load_examples, load_model, load_tokenizer
from peftkit.train.data import BatchPlan, Tokenized, collate, tokenize
from peftkit.train.loop import lr_lambda
from peftkit.train.recipe import DataSection, Recipe

from .contenders import Contender, schedule_options
from .data import _atomic_write
from .methods import method_modules
from .tasks import FULL_FT_RATIO, OWN_CODE, TASKS, Task, recipe_fingerprint, task_recipe


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
    key = json.dumps({"model": dataclasses.asdict(recipe.model), "text": general.input_ids}, sort_keys=True,
                     default=str)
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


def factor_tag(factor: float) -> str:
    """The file-name tag of a sweep multiplier: 1/3 -> "x0.333", 1 -> "x1", 3 -> "x3"."""
    return f"x{factor:.3g}"


def build_contender(contender: Contender, model, recipe: Recipe, examples, pad_id: int, classification: bool,
                    factor: float = 1.0):
    """Wrap (or not) the model and build its optimizer at ``factor`` × the contender's conventional lr.

    Returns (model, optimizer, schedule, the resolved axes, the lr used, the conventional lr, how that was
    chosen). The base rate is the recipe's ``optimizer.lr`` (plain LoRA's)."""
    base = recipe.optimizer.lr
    steps = recipe.training.max_steps
    if contender.kind == "full":
        model.requires_grad_(True)
        conventional = base * FULL_FT_RATIO
        optimizer = torch.optim.AdamW(model.parameters(), lr=factor * conventional, weight_decay=0.0)
        return (model, optimizer, None, ("full", "-", "adamw", "-"), factor * conventional, conventional,
                f"base_lr {base:.3g} · {FULL_FT_RATIO:g} (full fine-tuning)")
    if contender.kind == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS")
        torch.manual_seed(recipe.training.seed)
        model = get_peft_model(model, config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=factor * base, weight_decay=0.0)
        return (model, optimizer, None, ("lora", "default", "adamw", "none"), factor * base, base,
                f"base_lr {base:.3g} (LoRA)")
    options = {**dict(contender.options), **schedule_options(contender, steps)}
    config = resolve_config(contender.method, **options)
    data = None
    if registry.get_component("init", config.init).needs_data:
        plan = BatchPlan(len(examples.train), recipe.training.batch_size, 1, 0, recipe.training.seed)
        data = [collate(examples.train, plan.indices(i), pad_id,
                        classification) for i in range(recipe.adapter.init_batches)]
    model = peftkit.wrap(model, contender.method, data=data, **options)
    # The convention as a user gets it (lr left out): the preset's ratio, or a composition's capped rate,
    # which depends on the wrapped factors; the probe optimizer is discarded (it holds no state yet).
    choice = peftkit.optimizer(model, base_lr=base, **dict(contender.optimizer_options)).peftkit_lr
    lr = factor * choice.lr
    optimizer = peftkit.optimizer(model, lr, base_lr=base, **dict(contender.optimizer_options))
    schedule = peftkit.callbacks(model, optimizer=optimizer)
    return (model, optimizer, schedule, (config.architecture, config.init, config.optimizer, config.schedule), lr,
            choice.lr, choice.describe())


@functools.lru_cache(maxsize=None)
def task_data(task: Task, cache: Path, quick: bool) -> tuple[Recipe, Any, Any]:
    """(recipe, tokenizer, tokenized examples) of a task: the same for all its cells, so a process that runs
    several (``--in-process``, ``--quick``) reads and tokenizes them once. Read-only for the cells."""
    recipe = task_recipe(task, cache, quick)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = load_tokenizer(recipe)
        return recipe, tokenizer, load_examples(recipe, tokenizer)


def run_cell(task: Task, contender: Contender, cache: Path, quick: bool, factor: float = 1.0) -> dict[str, Any]:
    """Fine-tune one contender on one task at ``factor`` × its conventional lr; the record of the run (curves,
    costs, the claim checks' data)."""
    cell_started = time.perf_counter()
    eval_seconds = 0.0

    def timed_evaluate(*args) -> dict[str, float]:
        nonlocal eval_seconds
        tick = time.perf_counter()
        try:
            return evaluate(*args)
        finally:
            eval_seconds += time.perf_counter() - tick

    recipe, tokenizer, examples = task_data(task, cache, quick)
    training = recipe.training
    classification = task.kind == "classification"
    torch.manual_seed(training.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
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
        model, optimizer, schedule, axes, lr, conventional, how = build_contender(
            contender, model, recipe, examples, pad_id, classification, factor)
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
        "status": status, "steps": training.max_steps, "lr": lr, "lr_factor": factor, "lr_conventional": conventional,
        "lr_convention": how, "base_lr": recipe.optimizer.lr, "recipe_fingerprint": recipe_fingerprint(task, quick),
        "threads": torch.get_num_threads(),
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


@dataclass
class Analysis:
    """What a method's ``analyse`` hook (:mod:`guide.methods`) reads of a finished adapter cell."""

    task: Task
    contender: Contender
    axes: tuple  # (architecture, init, optimizer, schedule) as resolved
    schedule: Any  # the schedule callback, or None
    layers: dict  # module name -> adapter layer
    names: list[str]  # the adapted module names, sorted
    metric_with: Callable[[list[str]], float]  # the task's metric with these modules' adapters switched off


def analyse(task: Task, contender: Contender, model, evaluation, pad_id: int, eval_batch: int, axes, schedule,
            measure=evaluate) -> dict:
    """What the headline claims need beyond the curves (ranks, the metric with some adapters switched off): each
    method's ``analyse`` hook adds its own, in the guide's method order."""
    layers = adapter_layers(model)
    metric = TASKS[task.name].metric

    def metric_with(gated: list[str]) -> float:
        saved = _gate(model, gated)
        try:
            return measure(model, evaluation, task.kind, pad_id, eval_batch)[metric]
        finally:
            _ungate(model, saved)

    run = Analysis(task, contender, tuple(axes), schedule, layers, sorted(layers), metric_with)
    out: dict[str, Any] = {}
    for method in method_modules():
        hook = getattr(method, "analyse", None)
        if hook is not None:
            out.update(hook(run))
    return out
