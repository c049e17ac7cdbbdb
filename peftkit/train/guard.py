"""The divergence guard (recipe key ``training.divergence_guard``), off unless the recipe turns it on.

    training:
      divergence_guard: {action: stop, factor: 3.0, window: 10}   # or action: halve, max_halvings: 3

After each step's loss, before the optimizer step, the guard compares the mean loss of the last ``window``
steps with the lowest such mean seen so far. When it exceeds ``factor`` times that best mean, the run has
diverged: ``stop`` ends it (``RunResult.status == "diverged"``, CLI exit code 4); ``halve`` halves the lr of
every parameter group (and the LR schedule's base rates, so a resume keeps the halved rate) and restarts from
the newest checkpoint saved before the best window's end (so set ``training.save_every``); after
``max_halvings`` halvings, or when there is no such checkpoint, it stops as ``stop`` does. A non-finite loss
counts as diverged for ``halve``; otherwise the loop's non-finite stop (exit code 1) handles it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..validation import check_fields, option
from . import checkpointing

ACTIONS = ("stop", "halve")
EXIT_DIVERGED = 4


@dataclass
class GuardSettings:
    action: str = option("stop", choices=ACTIONS)
    factor: float = option(3.0, gt=1)  # the window mean may rise to factor × the best window mean (unitless, finite)
    window: int = option(10, gt=0)  # steps per window mean
    max_halvings: int = option(3, ge=0)

    @classmethod
    def from_recipe(cls, value: dict[str, Any] | None) -> "GuardSettings | None":
        """The ``training.divergence_guard`` mapping, checked; None when it is absent (guard off)."""
        if value is None:
            return None
        key = "training.divergence_guard"
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping such as {{action: stop, factor: 3.0, window: 10}}, "
                              f"got {value!r}")
        return cls(**check_fields(cls, value, prefix=f"{key}.", kind="key"))  # the one validation layer


@dataclass
class DivergenceGuard:
    """Watches the per-step loss; ``observe`` says whether the run diverged at this step."""

    settings: GuardSettings
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    best_mean: float = float("inf")
    best_step: int = 0  # the step at which the best window ended
    halvings: int = 0
    last_rise: float = 0.0
    start_base_lrs: list[float] | None = None
    restarted_from: Path | None = None  # the checkpoint of the latest restart

    def observe(self, step: int, loss: float) -> bool:
        """Record ``loss`` of ``step`` (1-based); True when the window mean exceeds factor × the best mean."""
        self.losses.append((step, loss))
        window = self.settings.window
        if len(self.losses) < window:
            return False
        mean = sum(value for _, value in self.losses[-window:]) / window
        if mean < self.best_mean:
            self.best_mean, self.best_step = mean, step
        self.last_rise = mean / self.best_mean if self.best_mean > 0 else float("inf")
        return mean > self.settings.factor * self.best_mean

    def restart_point(self, output_dir: Path) -> Path | None:
        """The newest checkpoint before the best window's end, or None (then the guard stops). The loss of
        step k is measured on the weights after step k − 1, so checkpoint k is vouched for only by a later loss:
        the best window's last loss vouches for checkpoint best_step − 1, no later one."""
        if self.settings.action != "halve" or self.halvings >= self.settings.max_halvings:
            return None
        good = [path for path in checkpointing.checkpoint_dirs(output_dir) if _step_of(path) < self.best_step]
        return good[-1] if good else None

    def halve(self, optimizer, lr_scheduler, restored_step: int) -> None:
        """Set the lr to 0.5^halvings × the rates the run started with (whatever the restored checkpoint held),
        in every group and in the schedule's base rates; forget the losses after ``restored_step``."""
        if self.start_base_lrs is None:
            self.start_base_lrs = list(lr_scheduler.base_lrs)
        self.halvings += 1
        target = [rate * 0.5 ** self.halvings for rate in self.start_base_lrs]
        for group, loaded, new in zip(optimizer.param_groups, lr_scheduler.base_lrs, target):
            group["lr"] *= new / loaded
            if "initial_lr" in group:
                group["initial_lr"] = new
        lr_scheduler.base_lrs = target
        self.losses = [(s, v) for s, v in self.losses if s <= restored_step]
        self.best_mean, self.best_step = float("inf"), 0
        window = self.settings.window
        for end in range(window, len(self.losses) + 1):
            mean = sum(v for _, v in self.losses[end - window:end]) / window
            if mean < self.best_mean:
                self.best_mean, self.best_step = mean, self.losses[end - 1][0]

    def check(self, state, loss: float, run_parts: dict[str, Any], output_dir: Path):
        """The loop's hook, called with each step's loss before the optimizer step. Returns (verdict, state):
        "ok"; "restarted" (the state of the restored checkpoint, lr halved); "stop" (diverged, nothing more to
        try). ``run_parts``: accelerator, model, optimizer, lr_scheduler, schedule, fingerprint."""
        if not math.isfinite(loss):
            # A non-finite loss is an infinite rise: ``halve`` restarts from it; otherwise (or with nothing to
            # restart from) the loop's own non-finite stop (exit code 1) handles it.
            self.last_rise = math.inf
            restart = self.restart_point(output_dir)
            if restart is None:
                return "ok", state
        else:
            if not self.observe(state.step + 1, loss):
                return "ok", state
            restart = self.restart_point(output_dir)
            if restart is None:
                return "stop", state
        parts = run_parts
        if self.start_base_lrs is None:
            self.start_base_lrs = list(parts["lr_scheduler"].base_lrs)
        self.restarted_from = restart
        restored = checkpointing.load(restart, parts["accelerator"], parts["model"], parts["optimizer"],
                                      parts["lr_scheduler"], parts["schedule"], parts["fingerprint"])
        checkpointing.restore_rng(restart, parts["accelerator"].process_index)
        rise, step = self.last_rise, state.step + 1
        self.halve(parts["optimizer"], parts["lr_scheduler"], restored.step)
        if parts["accelerator"].is_main_process:
            print(f"peftkit: the loss diverged at step {step} ({rise:.3g}× the best window mean); lr halved "
                  f"({self.halvings}/{self.settings.max_halvings}), restarting from {restart}", flush=True)
        return "restarted", restored

    def message(self, step: int, checkpoint: Path | None) -> str:
        what = (f"after {self.halvings} lr halving(s)" if self.halvings else "")
        return (f"peftkit: the loss diverged at step {step}: the mean of the last {self.settings.window} steps is "
                f"{self.last_rise:.3g}× the best ({self.best_mean:.4g}, at step {self.best_step}), above "
                f"training.divergence_guard.factor {self.settings.factor:g}{'; ' + what if what else ''}. Training "
                f"stopped; the last good checkpoint is {checkpoint or 'none'}. Lower optimizer.lr (or use "
                "optimizer.lr: auto), or set divergence_guard.action: halve with training.save_every.")


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[-1])
