"""Run control on evaluation metrics: ``training.best`` (keep the best adapter as ``<output_dir>/best/``) and
``training.early_stopping`` (stop after ``patience`` evaluations without improvement), both off unless set.

    training:
      eval_every: 50
      best: {metric: eval_loss}                                   # mode: min for losses, else max
      early_stopping: {metric: eval_accuracy, patience: 3, min_delta: 0.002}

Both judge the evaluations at ``eval_every`` steps and the final one. Their state (the best value and its step,
the evaluations without improvement) is part of ``TrainState.monitors``, so a resumed run continues it exactly;
every checkpoint holds a copy of ``best/`` as it was at that step, which a resume puts back (a run interrupted
after a later best would otherwise keep an adapter of steps the resumed run does not retrace).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..validation import check_fields, option

MODES = ("min", "max")
# Built-in metric names whose better direction is known; any other (a hook's) needs an explicit mode.
LOWER_IS_BETTER = ("eval_loss", "eval_perplexity")
HIGHER_IS_BETTER = ("eval_accuracy", "eval_f1", "eval_exact_match", "eval_rewards/accuracies", "eval_rewards/margins")


@dataclass
class BestSettings:
    metric: str = "eval_loss"
    mode: str | None = option(None, choices=(None, *MODES))  # null: min for eval_loss / eval_perplexity, else max


@dataclass
class EarlyStoppingSettings:
    metric: str = "eval_loss"
    patience: int = option(3, gt=0, le=10**6)  # evaluations in a row without improvement before the run stops
    min_delta: float = option(0.0, ge=0)  # an improvement must beat the best by more than this (metric units)
    mode: str | None = option(None, choices=(None, *MODES))


def _settings(cls: type, value: Any, key: str, example: str):
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping such as {example}, got {value!r:.80}")
    settings = cls(**check_fields(cls, value, prefix=f"{key}.", kind="key"))
    metric = settings.metric if settings.metric.startswith("eval_") else f"eval_{settings.metric}"
    settings.metric = metric
    if settings.mode is None:
        if metric in LOWER_IS_BETTER:
            settings.mode = "min"
        elif metric in HIGHER_IS_BETTER:
            settings.mode = "max"
        else:
            # A hook's metric: guessing its direction would keep the worst adapter without a word.
            raise ConfigError(f"{key}.mode: '{metric}' is not a built-in metric, so its better direction is unknown; "
                              "set mode: min (lower is better) or mode: max")
    return settings


def best_settings(value: Any) -> BestSettings | None:
    """``training.best``, checked; None when absent."""
    return _settings(BestSettings, value, "training.best", "{metric: eval_loss, mode: min}")


def early_stopping_settings(value: Any) -> EarlyStoppingSettings | None:
    """``training.early_stopping``, checked; None when absent."""
    return _settings(EarlyStoppingSettings, value, "training.early_stopping",
                     "{metric: eval_loss, patience: 3, min_delta: 0.0, mode: min}")


def available_metrics(classification: bool, eval_metrics: list[str], pairs: bool = False) -> tuple[set[str], bool]:
    """The ``eval_*`` names an evaluation of this task reports, and whether a hook may add names of its own
    (a hook returning a dict). ``pairs``: a pair objective (DPO, SimPO), evaluated on pairs (the pair loss and
    TRL's reward metrics, no perplexity)."""
    from ..preference import REWARD_METRICS

    if pairs:
        names = {"eval_loss", *(f"eval_{name}" for name in REWARD_METRICS)}
    else:
        names = {"eval_loss", "eval_accuracy" if classification else "eval_perplexity"}
    hooks = False
    for metric in eval_metrics:
        if ":" in metric:
            names.add(f"eval_{metric.partition(':')[2]}")
            hooks = True
        else:
            names.add(f"eval_{metric}")
    return names, hooks


def check_recipe(training, data, task: str) -> None:
    """What ``training.best`` / ``training.early_stopping`` need, checked before anything is built."""
    for key, settings in (("training.best", best_settings(training.best)),
                          ("training.early_stopping", early_stopping_settings(training.early_stopping))):
        if settings is None:
            continue
        if data.eval is None:
            raise ConfigError(f"{key}: judges evaluations, and this recipe has no evaluation data; set data.eval or "
                              f"remove {key}")
        if not training.eval_every:
            raise ConfigError(f"{key}: judges the evaluations every training.eval_every steps, and this recipe "
                              f"evaluates only at the end; set training.eval_every (e.g. 50) or remove {key}")
        names, hooks = available_metrics(task == "sequence-classification", training.eval_metrics,
                                         pairs=training.objective != "sft")
        if settings.metric not in names and not hooks:
            raise ConfigError(f"{key}.metric: '{settings.metric}' is not reported by this run's evaluation (it "
                              f"reports {sorted(names)}); choose one of those, or add the metric to "
                              "training.eval_metrics")


@dataclass
class Monitors:
    """The best and early-stopping bookkeeping of one run (``state`` is what ``TrainState.monitors`` holds)."""

    best: BestSettings | None
    early_stopping: EarlyStoppingSettings | None

    @classmethod
    def from_recipe(cls, training) -> "Monitors":
        return cls(best_settings(training.best), early_stopping_settings(training.early_stopping))

    @property
    def active(self) -> bool:
        return self.best is not None or self.early_stopping is not None

    @staticmethod
    def _better(value: float, than: float | None, mode: str, delta: float = 0.0) -> bool:
        if not math.isfinite(value):
            return False
        if than is None:
            return True
        return value < than - delta if mode == "min" else value > than + delta

    def observe(self, state: dict, step: int, values: dict[str, float]) -> tuple[bool, bool]:
        """Record the evaluation of ``step`` in ``state`` (in place); returns (a new best, stop now). An
        evaluation of a step already recorded (a resumed run evaluating its last step again) changes nothing."""
        if state.get("evaluated_step") == step:
            return False, self.stopped(state)
        state["evaluated_step"] = step
        new_best = False
        for name, settings in (("best", self.best), ("early_stopping", self.early_stopping)):
            if settings is None:
                continue
            if settings.metric not in values:
                key = f"training.{name}.metric"
                raise ConfigError(f"{key}: '{settings.metric}' is not among the evaluation's metrics "
                                  f"({sorted(values)}); set {key} to one of them")
            value = float(values[settings.metric])
            record = state.setdefault(name, {"value": None, "step": None, "bad": 0})
            delta = getattr(settings, "min_delta", 0.0)
            if self._better(value, record["value"], settings.mode, delta):
                record.update(value=value, step=step, bad=0)
                new_best = new_best or name == "best"
            else:
                record["bad"] += 1
        return new_best, self.stopped(state)

    def stopped(self, state: dict) -> bool:
        """Whether early stopping has ended the run (patience evaluations in a row without improvement)."""
        record = state.get("early_stopping")
        return bool(self.early_stopping and record and record["bad"] >= self.early_stopping.patience)


def check_state(monitors: Any) -> None:
    """``TrainState.monitors`` as read from a checkpoint: a mapping of plain records (ValueError otherwise)."""
    if not isinstance(monitors, dict):
        raise ValueError("'monitors' is not a JSON object")
    step = monitors.get("evaluated_step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ValueError(f"'monitors.evaluated_step' is {step!r:.40}, expected a step")
    for name in ("best", "early_stopping"):
        record = monitors.get(name)
        if record is None:
            continue
        if not isinstance(record, dict) or set(record) != {"value", "step", "bad"}:
            raise ValueError(f"'monitors.{name}' is not a record of value, step and bad")
        value, step, bad = record["value"], record["step"], record["bad"]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"'monitors.{name}.value' is {value!r:.40}, expected a number")
        for what, number in (("step", step), ("bad", bad)):
            if number is not None and (isinstance(number, bool) or not isinstance(number, int) or number < 0):
                raise ValueError(f"'monitors.{name}.{what}' is {number!r:.40}, expected a non-negative integer")
