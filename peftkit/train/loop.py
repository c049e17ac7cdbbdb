"""The training loop, on Accelerate: ``train(recipe)`` runs a :class:`TrainingRun`, whose phases read top to
bottom: ``setup`` (the run folder, the pieces of :func:`~peftkit.train.run_setup.prepare`, the engine, a resume),
``train_steps`` (one optimizer step after another, each then logged, evaluated, saved), ``wrap_up`` (the final
evaluation and checkpoint, the adapter in PEFT's format) and ``end``, the one place a run ends, whatever the exit
(max_steps, epochs, early stopping, the divergence guard, a non-finite loss or state, a signal).

One step = ``grad_accum`` micro-batches of ``batch_size`` examples on each process, one backward each, then
gradient clipping, ``optimizer.step()``, the LR scheduler step, the method's ``schedule.on_step`` and
``zero_grad`` (the order ../shared/methods/README.md §4.1 fixes). A micro-batch's loss is
:mod:`peftkit.train.objectives`'. Only the main process writes files.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import peftkit

from .. import distributed
from ..fileio import atomic_write_bytes
from ..inject import state_of
from ..preference import REWARD_METRICS
from . import checkpointing
from .best import restore_best, write_best
from .data import BatchPlan, example_lengths
from .eval_loop import evaluate
from .guard import DivergenceGuard, GuardSettings
from .lr_schedule import lr_lambda, make_scheduler
from .metrics import MetricsLog, plot
from .monitor import Monitors
from .objectives import StepObjective
from .parked_tokenizer import ParkedTokenizer
from .recipe import Recipe
from .run_setup import Run, make_accelerator, prepare, with_steps
from .stop_signals import StopSignals, stop_requested

# The loop's public names (callers import them from here; they live in the modules above).
__all__ = ["ADAPTER_DIR", "Run", "RunResult", "StepHook", "StopSignals", "TrainingRun", "evaluate", "lr_lambda",
           "make_accelerator", "make_scheduler", "prepare", "train", "with_steps"]

ADAPTER_DIR = "adapter"

# A hook is called on every process after each optimizer step with (step, record of that step).
StepHook = Callable[[int, dict[str, Any]], None]


@dataclass
class RunResult:
    """How a run ended: ``status`` is "done", "interrupted" (SIGINT/SIGTERM: a checkpoint was written),
    "nan" (a non-finite loss: nothing was written for the bad step) or "diverged" (training.divergence_guard)."""

    status: str
    step: int
    output_dir: Path
    eval_metrics: dict[str, float] = field(default_factory=dict)
    signal_number: int | None = None
    checkpoint: Path | None = None
    seconds: float = 0.0
    best: Path | None = None  # <output_dir>/best/ (training.best): the adapter at the best evaluation
    best_step: int | None = None
    stopped_early: bool = False  # training.early_stopping ended the run before max_steps



def train(recipe: Recipe, resume: bool = False, hooks: list[StepHook] | None = None) -> RunResult:
    """Run a recipe to ``training.max_steps`` (or to the first signal or non-finite loss).

    The main process holds the run folder's lock (``checkpointing.RunLock``) for the whole run; SIGINT/SIGTERM
    are handled from the first step until this function returns, and torch's thread count is the caller's again
    after it.
    """
    accelerator = make_accelerator(recipe)
    signals = StopSignals(keep=True)
    threads = torch.get_num_threads()  # the run sets its own (training.threads); the caller's come back after it
    try:
        with checkpointing.RunLock(recipe.training.output_dir, accelerator):
            return TrainingRun(recipe, resume, hooks, accelerator, signals).run()
    finally:
        signals.restore()
        torch.set_num_threads(threads)


class TrainingRun:
    """One run of a recipe, phase by phase (see the module's docstring); ``run()`` calls them in order."""

    def __init__(self, recipe: Recipe, resume: bool, hooks: list[StepHook] | None, accelerator,
                 signals: StopSignals) -> None:
        self.started = time.perf_counter()
        self.given, self.resume, self.hooks = recipe, resume, hooks or []
        self.accelerator, self.signals = accelerator, signals
        self.main = accelerator.is_main_process
        self.output_dir = Path(recipe.training.output_dir)
        self.ending_note: str | None = None  # what the main process prints when the run ends other than "done"

    def run(self) -> RunResult:
        """setup, the steps, wrap_up (unless the steps ended the run), end: the run's result."""
        try:
            self.setup()
            try:
                result = self.train_steps() or self.wrap_up()
            except checkpointing.NonFiniteStateError as exc:  # a checkpoint about to be written is not finite
                result = self.nonfinite(f"the training state is not finite ({exc})")
            return self.end(result)
        finally:
            if isinstance(getattr(getattr(self, "parts", None), "tokenizer", None), ParkedTokenizer):
                self.parts.tokenizer.close()  # its temporary folder, now rather than when garbage collected

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Check the run folder, build the run (``prepare``), claim the folder, prepare the engine, resume."""
        accelerator, output_dir, main = self.accelerator, self.output_dir, self.main
        last = checkpointing.check_run_folder(output_dir, self.resume)
        run = self.parts = prepare(self.given, accelerator)
        recipe = self.recipe = run.recipe  # run.recipe: training.max_steps is the run's length (training.epochs)
        training = self.training = recipe.training
        self.monitors = Monitors.from_recipe(training)
        guard_settings = GuardSettings.from_recipe(training.divergence_guard)
        self.guard = DivergenceGuard(guard_settings) if guard_settings else None
        self._announce()
        if main:
            checkpointing.claim_run_folder(output_dir)
            atomic_write_bytes(output_dir / "recipe.yaml", self.given.dump().encode())
        engine = self.engine = run.engine
        self.model, self.optimizer = engine.prepare(run.model, run.optimizer)
        self.lr_scheduler = make_scheduler(recipe, self.optimizer)
        self.schedule = run.schedule
        self.schedule.on_train_begin_(training.max_steps)
        self.fingerprint = {"method": recipe.adapter.method, "seed": training.seed,
                            "batch_size": training.batch_size, "processes": accelerator.num_processes,
                            "grad_accum": training.grad_accum, "train_examples": len(run.examples.train)}
        if recipe.data.group_by_length:  # another batch order: a run without it cannot resume into one with it
            self.fingerprint["group_by_length"] = True
        self.state = checkpointing.TrainState(fingerprint=self.fingerprint)
        if self.resume:
            self.state = checkpointing.load(last, accelerator, self.model, self.optimizer, self.lr_scheduler,
                                            self.schedule, self.fingerprint)
            checkpointing.restore_rng(last, accelerator.process_index)  # last: nothing may draw random numbers after
            if main:
                restore_best(output_dir, last, self.state.monitors)
                print(f"peftkit: resumed from {last} (step {self.state.step})", flush=True)
        self.metrics = MetricsLog(output_dir, enabled=main)
        stopped = self.monitors.stopped(self.state.monitors)
        finished = self.state.step >= training.max_steps or stopped
        self.metrics.truncate_after(self.state.step, evals_at_step=not finished or stopped)
        if recipe.logging.report_to:
            accelerator.init_trackers("peftkit", config=_flat(recipe.to_dict()))

        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.objective = StepObjective(run, self.model, engine, accelerator)
        self.lengths = example_lengths(run.examples.train)
        self.progress = _progress_bar(main and recipe.logging.progress_bar, training.max_steps, self.state.step)
        self.window = {"loss": 0.0, "steps": 0, "time": time.perf_counter(), "tokens_at_start": self.state.tokens,
                       "rewards": [0.0] * len(REWARD_METRICS), "reward_steps": 0}
        self.pending_losses: list[torch.Tensor] = []  # per-step losses on the device, not read yet
        # pair objectives: per-step reward means (REWARD_METRICS) on the device, not read yet
        self.pending_rewards: list[torch.Tensor] = []
        self.last_eval: tuple[int, dict[str, float]] | None = None  # (step, values) of this process's newest one

    def _announce(self) -> None:
        run, training, accelerator = self.parts, self.training, self.accelerator
        choice = getattr(run.optimizer, "peftkit_lr", None)
        if self.main:
            print(f"peftkit: {run.threads_note}", flush=True)
        if self.main and choice is not None:
            processes = accelerator.num_processes
            print(f"peftkit: {choice.describe()}", flush=True)
            print(f"peftkit: {self.recipe.adapter.method} on "
                  f"{self.recipe.model.name or self.recipe.model.config.get('model_type')} | "
                  f"{peftkit.trainable_parameters(run.model)} | {processes} process(es), "
                  f"global batch {training.batch_size * training.grad_accum * processes}"
                  f"{'' if processes == 1 else ', engine ' + run.engine.name} | {training.max_steps} steps "
                  f"= {_epochs(run.plan, training.max_steps * training.grad_accum):g} epochs of "
                  f"{len(run.examples.train)} examples", flush=True)

    # ------------------------------------------------------------------------------------------------ steps
    def train_steps(self) -> RunResult | None:
        """Optimizer steps to ``max_steps`` or early stopping (then None: ``wrap_up`` follows), or the ending of a
        run cut short: the divergence guard's stop, a non-finite loss, a signal."""
        training = self.training
        self.model.train()
        with self.signals:
            while self.state.step < training.max_steps and not self.monitors.stopped(self.state.monitors):
                step_loss, step_rewards = self.forward_backward()
                self.engine.reduce_gradients(self.trainable)
                # The losses stay on the device until a step that needs them (logging, evaluation, saving, the
                # last step, a received signal, the divergence guard): one host sync (and one collective) there,
                # none on the steps between. The guard judges every step's loss, so a run with it on reads every
                # step.
                self.pending_losses.append(step_loss)
                if step_rewards is not None:
                    self.pending_rewards.append(step_rewards)
                losses = None
                if (self.guard is not None or _reads_losses(self.state.step + 1, training)
                        or (self.accelerator.num_processes == 1 and self.signals.received)):
                    losses = self.read_losses()
                    bad = next((i for i, value in enumerate(losses) if not math.isfinite(value)), None)
                    if self.guard is not None:  # halve: a non-finite loss restarts too (guard.check)
                        verdict = self.consult_guard(losses[-1] if bad is None else losses[bad])
                        if verdict == "restarted":
                            continue
                        if verdict == "stop":
                            return self.diverged()
                    if bad is not None:
                        return self.nonfinite_loss(losses, bad)
                lr_used, grad_norm = self.optimizer_step()
                ending = self.log_and_save(losses, lr_used, grad_norm)
                if ending is not None:
                    return ending
        return None

    def forward_backward(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ``grad_accum`` micro-batches of one step, one backward each; the step's loss (in the loss's dtype:
        fp64 on an fp64 model) and, for pair objectives, this process's share of its mean rewards."""
        run, state, objective, accelerator = self.parts, self.state, self.objective, self.accelerator
        step_loss = step_rewards = None
        step_units = objective.step_units(run.plan, state.position)
        for micro in range(self.training.grad_accum):
            indices = run.plan.indices(state.position)
            batch, positions = objective.batch(indices)
            # Every process's tokens, counted on the host from the batch plan: no read of a device tensor.
            state.tokens += int(self.lengths[run.plan.global_indices(state.position)].sum())
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            state.position += 1
            # Gradients are all-reduced once per step, on the last micro-batch.
            with self.engine.no_sync(self.model, micro == self.training.grad_accum - 1):
                with accelerator.autocast():
                    loss, rewards = objective.loss(self.model, batch, indices, step_units, positions)
                    if rewards is not None:
                        step_rewards = rewards if step_rewards is None else step_rewards + rewards
                self.engine.backward(loss)
            step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
        return step_loss, step_rewards

    def read_losses(self) -> list[float]:
        """The per-step losses since the last read (and the rewards into the logging window), one host sync."""
        losses = _read_losses(self.pending_losses, self.accelerator)
        if self.pending_rewards:  # each process's share scaled by their number: the mean over processes is global
            for values in _read_losses(self.pending_rewards, self.accelerator):
                self.window["rewards"] = [a + b for a, b in zip(self.window["rewards"], values)]
                self.window["reward_steps"] += 1
        return losses

    def consult_guard(self, loss: float) -> str:
        """training.divergence_guard on this step's loss: "restarted" (from an earlier checkpoint at a lower
        learning rate: the abandoned steps leave the metrics, the logging window and the progress bar), "stop"
        or "ok"."""
        verdict, self.state = self.guard.check(self.state, loss, dict(
            accelerator=self.accelerator, model=self.model, optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler, schedule=self.schedule, fingerprint=self.fingerprint), self.output_dir)
        if verdict == "restarted":
            self.optimizer.zero_grad(set_to_none=True)
            if self.main:
                restore_best(self.output_dir, self.guard.restarted_from, self.state.monitors)
            self.metrics.truncate_after(self.state.step)
            self.window.update(loss=0.0, steps=0, time=time.perf_counter(), tokens_at_start=self.state.tokens,
                               rewards=[0.0] * len(REWARD_METRICS), reward_steps=0)
            self.pending_rewards.clear()
            self.progress.n = self.state.step
        return verdict

    def optimizer_step(self) -> tuple[float, Any]:
        """Clip, step the optimizer, the LR scheduler and the method's schedule, zero the gradients; the base LR
        the step used and the gradient norm (None without training.max_grad_norm)."""
        training, optimizer = self.training, self.optimizer
        grad_norm = None
        if training.max_grad_norm is not None:
            grad_norm = self.engine.clip_grad_norm_(self.trainable, training.max_grad_norm)
        lr_used = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_ratio", 1.0)
        optimizer.step()
        self.lr_scheduler.step()
        self.state.step += 1
        self.schedule.on_step(self.state.step, training.max_steps)
        optimizer.zero_grad(set_to_none=True)
        return lr_used, grad_norm

    # ------------------------------------------------------------------------------------------ log / save
    def log_and_save(self, losses: list[float] | None, lr_used: float, grad_norm) -> RunResult | None:
        """After a step: log, evaluate, checkpoint, call the hooks; a received signal ends the run here (after a
        checkpoint of this step)."""
        run, state, training, accelerator = self.parts, self.state, self.training, self.accelerator
        record: dict[str, Any] = {"step": state.step}  # "loss" only where it was read
        if losses is not None:
            self.window["loss"] += sum(losses)
            self.window["steps"] += len(losses)
            record["loss"] = losses[-1]
        if state.step % training.log_every == 0 or state.step == training.max_steps:
            rewards = _window_rewards(self.window) if self.objective.pairs else {}
            record = {**_log_record(state, self.window, lr_used, grad_norm, run.plan), **rewards}
            self.metrics.write(record)
            if self.recipe.logging.report_to:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.step)
            self.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                      tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        self.progress.update(1)
        if training.eval_every and state.step % training.eval_every == 0 and state.step < training.max_steps:
            values = evaluate(run, self.model)
            self.write_eval(values, self.progress)
            self.last_eval = (state.step, values)
            self.judge(values, self.progress)
        if training.save_every and state.step % training.save_every == 0:
            self.save()
        for hook in self.hooks:
            hook(state.step, record)
        if (stop_requested(self.signals, accelerator, collective=losses is not None)
                and state.step < training.max_steps and not self.monitors.stopped(state.monitors)):
            path = self.save()
            self.ending_note = (f"peftkit: stopped by signal {self.signals.received} at step {state.step}; "
                                f"checkpoint {path}. Continue with --resume.")
            return RunResult("interrupted", state.step, self.output_dir,
                             signal_number=self.signals.received or signal.SIGTERM, checkpoint=path)
        return None

    def save(self) -> Path:
        """A checkpoint of this step (``checkpointing.NonFiniteStateError`` where the state is not finite)."""
        self.state.elapsed_s = time.perf_counter() - self.started
        return checkpointing.save(self.accelerator, self.model, self.optimizer, self.lr_scheduler, self.schedule,
                                  self.state, self.output_dir, self.training.keep_checkpoints)

    def write_eval(self, values: dict[str, float], progress) -> None:
        _write_eval(values, self.state.step, _epochs(self.parts.plan, self.state.position), self.metrics,
                    self.accelerator, self.recipe, progress)

    def judge(self, values: dict[str, float], progress) -> None:
        """Feed one evaluation to training.best / training.early_stopping; a new best writes best/ (main
        process)."""
        if not self.monitors.active:
            return
        state, monitors = self.state, self.monitors
        new_best, _ = monitors.observe(state.monitors, state.step, values)
        if new_best and self.main:
            record = state.monitors["best"]
            path = write_best(self.output_dir, distributed.unwrap_model(self.accelerator, self.model),
                              self.parts.tokenizer, monitors.best.metric, record["value"], state.step)
            (progress.write if progress is not None else print)(
                f"step {state.step}: best {monitors.best.metric} {record['value']:.4f}: {path}")

    # ------------------------------------------------------------------------------------------------ wrap up
    def wrap_up(self) -> RunResult:
        """After the last step (max_steps, or early stopping): the final evaluation, the final checkpoint, the
        adapter in PEFT's format and the plot. A signal during the final evaluation ends the run "interrupted"."""
        run, state, training, accelerator = self.parts, self.state, self.training, self.accelerator
        output_dir = self.output_dir
        self.progress.close()
        stopped_early = self.monitors.stopped(state.monitors)
        if self.last_eval is not None and self.last_eval[0] == state.step:
            eval_metrics, evaluated_here = self.last_eval[1], True  # early stopping evaluated this step already
        else:
            eval_metrics = evaluate(run, self.model, self.signals) if run.examples.eval is not None else {}
            evaluated_here = stopped_early  # a resumed run that had stopped early: its record is in metrics.jsonl
        final_checkpoint = None
        saved_here = bool(training.save_every and state.step % training.save_every == 0)
        if stop_requested(self.signals, accelerator):
            # Stopped during the final evaluation: the checkpoint of the last step lets --resume evaluate and finish.
            path = checkpointing.latest(output_dir) if saved_here else self.save()
            self.ending_note = (f"peftkit: stopped by signal {self.signals.received} during the final evaluation "
                                f"(step {state.step}); checkpoint {path}. Finish with --resume.")
            return RunResult("interrupted", state.step, output_dir,
                             signal_number=self.signals.received or signal.SIGTERM, checkpoint=path)
        if eval_metrics and not evaluated_here:
            self.write_eval(eval_metrics, None)
        if eval_metrics:
            self.judge(eval_metrics, None)
        self.schedule.on_train_end_()
        if not saved_here:
            final_checkpoint = self.save()
        if self.main:
            # What the adapter folder's model card reports about the run.
            unwrapped = distributed.unwrap_model(accelerator, self.model)
            state_of(unwrapped).training.update(data=self.recipe.data.train, recipe=self.recipe.dump(),
                                                metrics=dict(eval_metrics))
            peftkit.save(unwrapped, output_dir / ADAPTER_DIR)
            run.tokenizer.save_pretrained(output_dir / ADAPTER_DIR)
            plot(output_dir)
        accelerator.wait_for_everyone()
        best = state.monitors.get("best") if self.monitors.best else None
        best_path = output_dir / "best" if best and best.get("step") is not None else None
        return RunResult("done", state.step, output_dir, eval_metrics,
                         checkpoint=final_checkpoint or checkpointing.latest(output_dir), best=best_path,
                         best_step=best.get("step") if best_path else None, stopped_early=stopped_early)

    # --------------------------------------------------------------------------------------- the end of a run
    def diverged(self) -> RunResult:
        good = checkpointing.latest(self.output_dir)
        self.ending_note = self.guard.message(self.state.step + 1, good)
        return RunResult("diverged", self.state.step, self.output_dir, checkpoint=good)

    def nonfinite_loss(self, losses: list[float], bad: int) -> RunResult:
        """Stop before this optimizer step; an earlier bad step (since the last read) was applied, but nothing has
        been saved since: every checkpoint step reads first, and checkpoints are checked finite before they are
        written."""
        bad_step = self.state.step + 1 - len(losses) + 1 + bad
        result = self.nonfinite(f"the loss is {losses[bad]} at step {bad_step}")
        result.step = bad_step - 1
        return result

    def nonfinite(self, what: str) -> RunResult:
        # The weights and every checkpoint on disk stay finite: checkpoints are checked before they are written.
        good = checkpointing.latest(self.output_dir)
        self.ending_note = (f"peftkit: {what}; training stopped. The last good checkpoint is "
                            f"{good or 'none (no checkpoint was saved yet)'}; lower optimizer.lr, set "
                            f"training.max_grad_norm, or check the data, then train again"
                            f"{' with --resume' if good else ''}.")
        return RunResult("nan", self.state.step, self.output_dir, checkpoint=good)

    def end(self, result: RunResult) -> RunResult:
        """The one place a run ends, whatever the exit: say how (main process), close the trackers, time it."""
        if self.main and self.ending_note is not None:
            self.progress.close()
            print(self.ending_note, flush=True)
        self.accelerator.end_training()
        result.seconds = time.perf_counter() - self.started
        if self.main and result.status == "done":
            summary = ", ".join(f"{k} {v:.4f}" for k, v in result.eval_metrics.items())
            early = self.monitors.early_stopping
            how = (f"stopped early at step {result.step} (training.early_stopping: {early.metric} did not improve "
                   f"in {early.patience} evaluations)" if result.stopped_early else f"{result.step} steps")
            best = self.state.monitors.get("best")
            best_text = (f" Best: {result.best} ({self.monitors.best.metric} {best['value']:.4f} at step "
                         f"{best['step']})." if result.best else "")
            print(f"peftkit: done: {how} in {result.seconds:.1f} s. "
                  f"{('Final eval: ' + summary + '. ') if summary else ''}"
                  f"Adapter: {self.output_dir / ADAPTER_DIR}.{best_text}", flush=True)
        return result


def _reads_losses(step: int, training) -> bool:
    """Whether optimizer step ``step`` (1-based) reads the losses to the host: it logs, evaluates, saves, or is last."""
    return (step % training.log_every == 0 or step == training.max_steps
            or bool(training.eval_every and step % training.eval_every == 0)
            or bool(training.save_every and step % training.save_every == 0))


def _read_losses(pending: list[torch.Tensor], accelerator) -> list[float]:
    """The per-step losses since the last read, in one host sync; ``pending`` is emptied. Each process holds
    its backward losses (its share of the global token mean, times the number of processes, plus the
    regularization term): their mean over processes is the step's loss."""
    values = torch.stack(pending)
    pending.clear()
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="mean")
    return values.tolist()


def _log_record(state, window, lr: float, grad_norm, plan: BatchPlan) -> dict[str, Any]:
    """The mean loss of the steps since the last record, the base LR of this step, throughput."""
    now = time.perf_counter()
    seconds = max(now - window["time"], 1e-9)
    record = {
        "step": state.step,
        "loss": window["loss"] / window["steps"],
        "lr": lr,
        "epoch": _epochs(plan, state.position),
        "tokens": state.tokens,
        "tokens_per_s": (state.tokens - window["tokens_at_start"]) / seconds,
    }
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    window.update(loss=0.0, steps=0, time=now, tokens_at_start=state.tokens)
    return record


def _window_rewards(window: dict[str, Any]) -> dict[str, float]:
    """The mean over the steps since the last record of each step's mean rewards (TRL's names); resets them."""
    steps = max(window["reward_steps"], 1)
    values = {name: total / steps for name, total in zip(REWARD_METRICS, window["rewards"])}
    window.update(rewards=[0.0] * len(REWARD_METRICS), reward_steps=0)
    return values


def _epochs(plan: BatchPlan, position: int) -> float:
    """Passes over data.train after ``position`` global micro-batches (4 decimals, as logged)."""
    return round(plan.epoch(position), 4)


def _write_eval(values: dict[str, float], step: int, epoch: float, metrics: MetricsLog, accelerator, recipe,
                progress) -> None:
    metrics.write({"step": step, "epoch": epoch, **values})
    if recipe.logging.report_to:
        accelerator.log(values, step=step)
    if accelerator.is_main_process:
        text = " ".join(f"{k}={v:.4f}" for k, v in values.items())
        (progress.write if progress is not None else print)(f"step {step}: {text}")


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
