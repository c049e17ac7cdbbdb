"""The training loop, on Accelerate. Read ``train`` top to bottom: set up, (resume), step, evaluate, save.

One step = ``grad_accum`` micro-batches of ``batch_size`` examples on each process, one backward each, then
gradient clipping, ``optimizer.step()``, the LR scheduler step, the method's ``schedule.on_step`` and
``zero_grad`` (the order ../shared/methods/README.md §4.1 fixes). Only the main process writes files.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import peftkit

from .. import registry
from ..config import resolve_config
from ..errors import ConfigError
from ..inject import adapter_layers
from . import checkpointing
from .build import Examples, load_examples, load_model, load_tokenizer, num_labels
from .data import BatchPlan, Tokenized, collate
from .metrics import MetricsLog, plot
from .recipe import Recipe, warmup_steps

ADAPTER_DIR = "adapter"

# A hook is called on every process after each optimizer step with (step, record of that step).
StepHook = Callable[[int, dict[str, Any]], None]


@dataclass
class RunResult:
    """How a run ended: ``status`` is "done", "interrupted" (SIGINT/SIGTERM: a checkpoint was written) or
    "nan" (a non-finite loss: nothing was written for the bad step)."""

    status: str
    step: int
    output_dir: Path
    eval_metrics: dict[str, float] = field(default_factory=dict)
    signal_number: int | None = None
    checkpoint: Path | None = None
    seconds: float = 0.0


@dataclass
class Run:
    """Everything ``prepare`` builds: the pieces the loop works with, before Accelerate wraps them."""

    recipe: Recipe
    accelerator: Any
    tokenizer: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any
    examples: Examples
    plan: BatchPlan
    classification: bool


def make_accelerator(recipe: Recipe):
    """The Accelerator: mixed precision, trackers, and DDP told about schedules that skip adapters."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    adapter = resolve_config(recipe.adapter.method, **recipe.adapter.options)  # also checks the options early
    # A schedule may switch adapters off for a step (their parameters get no gradient); DDP must allow that.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=adapter.schedule != "none")
    trackers = list(recipe.logging.report_to)
    if "tensorboard" in trackers:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("logging.report_to: 'tensorboard' needs the tensorboard package; "
                              "pip install 'peftkit[tensorboard]' or remove it from logging.report_to") from None
    # Under torchrun on a machine without GPUs, Accelerate only forms the gloo process group when told cpu=True.
    cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(mixed_precision=recipe.training.mixed_precision, log_with=trackers or None,
                       project_dir=recipe.training.output_dir, kwargs_handlers=[ddp], cpu=cpu_processes or None)


def prepare(recipe: Recipe, accelerator=None) -> Run:
    """Build tokenizer, data, model, adapter, optimizer and schedule; checks everything short of training."""
    accelerator = accelerator or make_accelerator(recipe)
    training = recipe.training
    tokenizer = load_tokenizer(recipe)
    examples = load_examples(recipe, tokenizer)
    classification = recipe.model.task == "sequence-classification"
    model = load_model(recipe.model, tokenizer, labels=num_labels(recipe, examples) if classification else None,
                       label_names=examples.train.label_names, seed=training.seed)
    if classification:
        _check_labels(examples, model.config.num_labels)
    plan = BatchPlan(len(examples.train), training.batch_size, accelerator.num_processes,
                     accelerator.process_index, training.seed)

    adapter = recipe.adapter
    config = resolve_config(adapter.method, **adapter.options)
    init_data = None
    if registry.get_component("init", config.init).needs_data:
        # Each process reads its shard of the first init_batches global batches; the init reduces its
        # statistics across processes, so every process starts from the same adapter.
        pad = tokenizer.pad_token_id
        init_data = [collate(examples.train, plan.indices(i), pad, classification)
                     for i in range(adapter.init_batches)]
    model = peftkit.wrap(model, adapter.method, data=init_data, **adapter.options)

    options = dict(recipe.optimizer.options)
    name = recipe.optimizer.name or config.optimizer
    if "weight_decay" in registry.get_component("optimizer", name).option_names():
        options["weight_decay"] = recipe.optimizer.weight_decay
    elif recipe.optimizer.weight_decay:
        raise ConfigError(f"optimizer.weight_decay: the '{name}' optimizer has no weight decay; set it to 0")
    if recipe.optimizer.name:
        options["name"] = recipe.optimizer.name
    optimizer = peftkit.optimizer(model, recipe.optimizer.lr, **options)
    schedule = peftkit.callbacks(model, optimizer=optimizer)
    return Run(recipe, accelerator, tokenizer, model, optimizer, schedule, examples, plan, classification)


def _check_labels(examples: Examples, labels: int) -> None:
    for key, split in (("data.train", examples.train), ("data.eval", examples.eval)):
        if split is not None and any(not 0 <= y < labels for y in split.labels):
            raise ConfigError(f"{key}: labels must lie in [0, {labels}) (model.num_labels); found {sorted(set(split.labels))[:8]}")


def lr_lambda(recipe: Recipe) -> Callable[[int], float]:
    """The LR multiplier after ``step`` optimizer steps: linear warmup, then constant / linear / cosine to 0."""
    total = recipe.training.max_steps
    warmup = warmup_steps(recipe.training)
    kind = recipe.training.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (then it checkpoints and exits)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        for number in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread: signals stay with the host program
                pass
        return self

    def _handle(self, number, frame) -> None:
        self.received = number

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def train(recipe: Recipe, resume: bool = False, hooks: list[StepHook] | None = None) -> RunResult:
    """Run a recipe to ``training.max_steps`` (or to the first signal or non-finite loss)."""
    started = time.perf_counter()
    training = recipe.training
    output_dir = Path(training.output_dir)
    last = checkpointing.latest(output_dir)
    if resume and last is None:
        raise ConfigError(f"--resume: no checkpoint in {output_dir / checkpointing.CHECKPOINTS}; start without --resume")
    if not resume and (last is not None or (output_dir / ADAPTER_DIR).exists()):
        raise ConfigError(f"training.output_dir: {output_dir} already holds a run; pass --resume to continue it, or "
                          "choose another output_dir")
    run = prepare(recipe)
    accelerator = run.accelerator
    main = accelerator.is_main_process

    if main:
        print(f"peftkit: {recipe.adapter.method} on {recipe.model.name or recipe.model.config.get('model_type')} | "
              f"{peftkit.trainable_parameters(run.model)} | {accelerator.num_processes} process(es), "
              f"global batch {training.batch_size * training.grad_accum * accelerator.num_processes}", flush=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe.yaml").write_text(recipe.dump())
    model, optimizer = accelerator.prepare(run.model, run.optimizer)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe))
    schedule = run.schedule
    schedule.on_train_begin_(training.max_steps)
    fingerprint = {"method": recipe.adapter.method, "seed": training.seed, "batch_size": training.batch_size,
                   "processes": accelerator.num_processes, "grad_accum": training.grad_accum,
                   "train_examples": len(run.examples.train)}
    state = checkpointing.TrainState(fingerprint=fingerprint)
    if resume:
        state = checkpointing.load(last, accelerator, model, optimizer, lr_scheduler, schedule, fingerprint)
        checkpointing.restore_rng(last, accelerator.process_index)  # last: nothing may draw random numbers after
        if main:
            print(f"peftkit: resumed from {last} (step {state.step})", flush=True)
    metrics = MetricsLog(output_dir, enabled=main)
    metrics.truncate_after(state.step)
    if recipe.logging.report_to:
        accelerator.init_trackers("peftkit", config=_flat(recipe.to_dict()))

    trainable = [p for p in model.parameters() if p.requires_grad]
    # Architectures with a loss term of their own (HRA's, ElaLoRA's orthogonality); looked up once.
    regularized = any(layer.regularization() is not None for layer in adapter_layers(run.model).values())
    pad_id = run.tokenizer.pad_token_id
    progress = _progress_bar(main and recipe.logging.progress_bar, training.max_steps, state.step)
    window = {"loss": 0.0, "steps": 0, "time": time.perf_counter(), "tokens_at_start": state.tokens}
    pending_losses: list[torch.Tensor] = []  # per-step losses on the device, not read yet
    result = None
    model.train()
    with StopSignals() as signals:
        while state.step < training.max_steps:
            # ---- one optimizer step: grad_accum micro-batches, each with its own backward
            step_loss = torch.zeros((), device=accelerator.device)
            for micro in range(training.grad_accum):
                indices = run.plan.indices(state.position)
                batch = collate(run.examples.train, indices, pad_id, run.classification)
                # Counted on the host, from the examples themselves: no read of a device tensor.
                state.tokens += sum(len(run.examples.train.input_ids[i]) for i in indices) * accelerator.num_processes
                batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
                state.position += 1
                # Gradients are all-reduced once per step, on the last micro-batch.
                sync = contextlib.nullcontext() if micro == training.grad_accum - 1 else accelerator.no_sync(model)
                with sync:
                    with accelerator.autocast():
                        loss = model(**batch).loss
                        if regularized:
                            loss = loss + peftkit.regularization_loss(run.model)
                        loss = loss / training.grad_accum
                    accelerator.backward(loss)
                step_loss += loss.detach()
            # The losses stay on the device until a step that needs them (logging, evaluation, saving, the last
            # step, a received signal): one host sync (and one collective) there, none on the steps between.
            pending_losses.append(step_loss)
            losses = None
            if _reads_losses(state.step + 1, training) or (accelerator.num_processes == 1 and signals.received):
                losses = _read_losses(pending_losses, accelerator)
                bad = next((i for i, value in enumerate(losses) if not math.isfinite(value)), None)
                if bad is not None:
                    # Stop before this optimizer step; an earlier bad step (since the last read) was applied, but
                    # nothing has been saved since: every checkpoint step reads first.
                    bad_step = state.step + 1 - len(losses) + 1 + bad
                    good = checkpointing.latest(output_dir)
                    if main:
                        progress.close()
                        print(f"peftkit: the loss is {losses[bad]} at step {bad_step}; training stopped. "
                              f"The last good checkpoint is {good or 'none (no checkpoint was saved yet)'}; lower "
                              "optimizer.lr, set training.max_grad_norm, or check the data, then train again"
                              f"{' with --resume' if good else ''}.", flush=True)
                    result = RunResult("nan", bad_step - 1, output_dir, checkpoint=good)
                    break
            grad_norm = None
            if training.max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(trainable, training.max_grad_norm)
            lr_used = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_ratio", 1.0)
            optimizer.step()
            lr_scheduler.step()
            state.step += 1
            schedule.on_step(state.step, training.max_steps)
            optimizer.zero_grad(set_to_none=True)

            # ---- bookkeeping: log, evaluate, checkpoint, hooks, signals
            record: dict[str, Any] = {"step": state.step}  # "loss" only where it was read
            if losses is not None:
                window["loss"] += sum(losses)
                window["steps"] += len(losses)
                record["loss"] = losses[-1]
            if state.step % training.log_every == 0 or state.step == training.max_steps:
                record = _log_record(state, window, lr_used, grad_norm, run.plan)
                metrics.write(record)
                if recipe.logging.report_to:
                    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.step)
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                     tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            progress.update(1)
            if training.eval_every and state.step % training.eval_every == 0 and state.step < training.max_steps:
                _write_eval(evaluate(run, model), state.step, metrics, accelerator, recipe, progress)
            if training.save_every and state.step % training.save_every == 0:
                checkpointing.save(accelerator, model, optimizer, lr_scheduler, schedule, _timed(state, started),
                                   output_dir, training.keep_checkpoints)
            for hook in hooks or []:
                hook(state.step, record)
            if _stop_requested(signals, accelerator, collective=losses is not None) and state.step < training.max_steps:
                path = checkpointing.save(accelerator, model, optimizer, lr_scheduler, schedule,
                                          _timed(state, started), output_dir, training.keep_checkpoints)
                if main:
                    progress.close()
                    print(f"peftkit: stopped by signal {signals.received} at step {state.step}; checkpoint {path}. "
                          "Continue with --resume.", flush=True)
                result = RunResult("interrupted", state.step, output_dir, signal_number=signals.received or
                                   signal.SIGTERM, checkpoint=path)
                break
    if result is not None:
        accelerator.end_training()
        result.seconds = time.perf_counter() - started
        return result

    # ---- the end: final evaluation, final checkpoint, the adapter in PEFT's format, the plot
    progress.close()
    eval_metrics = evaluate(run, model) if run.examples.eval is not None else {}
    if eval_metrics:
        _write_eval(eval_metrics, state.step, metrics, accelerator, recipe, None)
    schedule.on_train_end_()
    final_checkpoint = None
    if not (training.save_every and state.step % training.save_every == 0):
        final_checkpoint = checkpointing.save(accelerator, model, optimizer, lr_scheduler, schedule,
                                              _timed(state, started), output_dir, training.keep_checkpoints)
    if main:
        peftkit.save(accelerator.unwrap_model(model), output_dir / ADAPTER_DIR)
        run.tokenizer.save_pretrained(output_dir / ADAPTER_DIR)
        plot(output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    seconds = time.perf_counter() - started
    if main:
        summary = ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items())
        print(f"peftkit: done: {state.step} steps in {seconds:.1f} s. {('Final eval: ' + summary + '. ') if summary else ''}"
              f"Adapter: {output_dir / ADAPTER_DIR}", flush=True)
    return RunResult("done", state.step, output_dir, eval_metrics, checkpoint=final_checkpoint or
                     checkpointing.latest(output_dir), seconds=seconds)


def _timed(state: checkpointing.TrainState, started: float) -> checkpointing.TrainState:
    state.elapsed_s = time.perf_counter() - started
    return state


def _reads_losses(step: int, training) -> bool:
    """Whether optimizer step ``step`` (1-based) reads the losses to the host: it logs, evaluates, saves, or is last."""
    return (step % training.log_every == 0 or step == training.max_steps
            or bool(training.eval_every and step % training.eval_every == 0)
            or bool(training.save_every and step % training.save_every == 0))


def _read_losses(pending: list[torch.Tensor], accelerator) -> list[float]:
    """The per-step losses since the last read (mean over processes), in one host sync; ``pending`` is emptied."""
    values = torch.stack(pending)
    pending.clear()
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="mean")
    return values.tolist()


def _stop_requested(signals: StopSignals, accelerator, collective: bool = True) -> bool:
    """Every process must stop at the same step: under several processes the flag is all-reduced, on the steps
    that read the losses (``collective``) only, so that no other step waits on a collective; one process checks
    its flag every step."""
    if accelerator.num_processes == 1:
        return signals.received is not None
    if not collective:
        return False
    flag = torch.tensor(float(signals.received or 0), device=accelerator.device)
    flag = accelerator.reduce(flag, reduction="sum")
    if flag.item() and signals.received is None:
        signals.received = signal.SIGTERM
    return bool(flag.item())


def _log_record(state, window, lr: float, grad_norm, plan: BatchPlan) -> dict[str, Any]:
    """The mean loss of the steps since the last record, the base LR of this step, throughput."""
    now = time.perf_counter()
    seconds = max(now - window["time"], 1e-9)
    record = {
        "step": state.step,
        "loss": window["loss"] / window["steps"],
        "lr": lr,
        "epoch": round(plan.epoch(state.position), 4),
        "tokens": state.tokens,
        "tokens_per_s": (state.tokens - window["tokens_at_start"]) / seconds,
    }
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    window.update(loss=0.0, steps=0, time=now, tokens_at_start=state.tokens)
    return record


def _write_eval(values: dict[str, float], step: int, metrics: MetricsLog, accelerator, recipe, progress) -> None:
    metrics.write({"step": step, **values})
    if recipe.logging.report_to:
        accelerator.log(values, step=step)
    if accelerator.is_main_process:
        text = " ".join(f"{k}={v:.4f}" for k, v in values.items())
        (progress.write if progress is not None else print)(f"step {step}: {text}")


@torch.no_grad()
def evaluate(run: Run, model) -> dict[str, float]:
    """Loss (mean over examples for classification, over target tokens for LM), accuracy for classification,
    perplexity for LM; each process reads every num_processes-th example and the sums are all-reduced."""
    examples: Tokenized | None = run.examples.eval
    if examples is None:
        return {}
    accelerator = run.accelerator
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    mine = list(range(accelerator.process_index, len(examples), accelerator.num_processes))
    size = run.recipe.training.eval_batch_size or run.recipe.training.batch_size
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, count, correct
    for start in range(0, len(mine), size):
        batch = collate(examples, mine[start:start + size], run.tokenizer.pad_token_id, run.classification)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with accelerator.autocast():
            logits = unwrapped(**batch).logits.float()
        if run.classification:
            totals[0] += F.cross_entropy(logits, labels, reduction="sum")
            totals[1] += labels.numel()
            totals[2] += (logits.argmax(-1) == labels).sum()
        else:
            shifted = labels[:, 1:]
            totals[0] += F.cross_entropy(logits[:, :-1].flatten(0, 1), shifted.flatten(), ignore_index=-100, reduction="sum")
            totals[1] += (shifted != -100).sum()
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    if was_training:
        unwrapped.train()
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    if run.classification:
        return {"eval_loss": loss, "eval_accuracy": (totals[2] / totals[1].clamp(min=1)).item()}
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}


def _progress_bar(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested recipe -> {"training.lr": ...} with values trackers accept (numbers, strings, booleans)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = str(value)
    return out
