"""The learning-rate schedule of a recipe (``training.lr_schedule``, ``warmup``, ``min_lr``): the names and
formulas of transformers' ``get_scheduler``.

The common schedules (constant, constant_with_warmup, linear, cosine, cosine_with_restarts) are computed here
as ``LambdaLR`` multipliers equal to transformers' at every step (tests/test_lr_schedule.py compares them):
``transformers.optimization`` imports ``transformers.trainer_utils`` and, through it, PEFT and bitsandbytes
(≈ 55 MiB resident in every process of a run that uses neither). The others (polynomial, inverse_sqrt, the
min_lr cosines, warmup_stable_decay) still come from ``transformers.get_scheduler``, imported only for them.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..errors import ConfigError
from .recipe import Recipe, warmup_steps

# Where training.min_lr goes: the keyword each of transformers' schedules takes its floor as (a rate: min_lr / lr).
MIN_LR_KEYWORDS = {"cosine_with_min_lr": "min_lr_rate", "cosine_warmup_with_min_lr": "min_lr_rate",
                   "warmup_stable_decay": "min_lr_ratio", "polynomial": "lr_end"}


def _warmup(step: int, warmup: int) -> float:
    return float(step) / float(max(1, warmup))


def _constant(step: int) -> float:
    return 1.0


def _constant_with_warmup(step: int, *, warmup: int) -> float:
    return _warmup(step, warmup) if step < warmup else 1.0


def _linear(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def _progress(step: int, warmup: int, total: int) -> float:
    return float(step - warmup) / float(max(1, total - warmup))


def _cosine(step: int, *, warmup: int, total: int, num_cycles: float) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * _progress(step, warmup, total))))


def _cosine_with_restarts(step: int, *, warmup: int, total: int, num_cycles: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = _progress(step, warmup, total)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))


def _linear_lambda(warmup: int, total: int) -> Callable[[int], float]:
    return partial(_linear, warmup=warmup, total=total)


def _cosine_lambda(warmup: int, total: int, num_cycles: float = 0.5) -> Callable[[int], float]:
    return partial(_cosine, warmup=warmup, total=total, num_cycles=num_cycles)


def _restarts_lambda(warmup: int, total: int, num_cycles: int = 1) -> Callable[[int], float]:
    return partial(_cosine_with_restarts, warmup=warmup, total=total, num_cycles=num_cycles)


# name -> (warmup steps, training steps, options) -> the multiplier after a step. transformers' get_scheduler
# passes no options to the constant schedules (it ignores them), and the others' options as keywords.
OWN_SCHEDULES: dict[str, Callable[..., Callable[[int], float]]] = {
    "constant": lambda warmup, total: _constant,
    "constant_with_warmup": lambda warmup, total: partial(_constant_with_warmup, warmup=warmup),
    "linear": _linear_lambda,
    "cosine": _cosine_lambda,
    "cosine_with_restarts": _restarts_lambda,
}
IGNORES_OPTIONS = ("constant", "constant_with_warmup")


def make_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer):
    """``training.lr_schedule`` as transformers' ``get_scheduler`` builds it: warmup (``training.warmup``), the
    schedule over ``max_steps``, the floor ``training.min_lr`` where the schedule has one, and
    ``training.lr_schedule_options`` (num_cycles, power, num_decay_steps ...) as its other arguments."""
    training = recipe.training
    name = training.lr_schedule
    if name == "constant" and warmup_steps(training):
        name = "constant_with_warmup"  # training.warmup applies to every schedule (transformers' constant has none)
    options = dict(training.lr_schedule_options)
    if training.min_lr is not None:
        keyword = MIN_LR_KEYWORDS.get(name)
        if keyword is None:
            raise ConfigError(f"training.min_lr: the '{name}' schedule has no floor; use one of "
                              f"{sorted(MIN_LR_KEYWORDS)} or set training.min_lr=null")
        # optimizer.lr: auto resolves per method: the floor is relative to the rate the optimizer was built with
        choice = getattr(optimizer, "peftkit_lr", None)
        peak = recipe.optimizer.lr if recipe.optimizer.lr is not None else (
            choice.lr if choice is not None else optimizer.param_groups[0]["lr"])
        if training.min_lr > peak:
            # A floor above the peak would make the schedule rise as it "decays" (a rate ratio above 1).
            raise ConfigError(f"training.min_lr: the floor {training.min_lr:g} is above the peak learning rate "
                              f"{peak:g} (optimizer.lr); expected min_lr <= lr: lower training.min_lr (e.g. "
                              f"{peak / 10:g}) or raise optimizer.lr")
        options[keyword] = training.min_lr if keyword == "lr_end" else training.min_lr / peak
    elif name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        raise ConfigError(f"training.min_lr: the '{name}' schedule needs its floor; set training.min_lr (e.g. 1e-5)")
    if name == "warmup_stable_decay":
        options.setdefault("num_decay_steps", max(1, round(0.1 * training.max_steps)))  # the last 10 %
    warmup = warmup_steps(training)
    try:
        if name in OWN_SCHEDULES:
            if name in IGNORES_OPTIONS:
                multiplier = OWN_SCHEDULES[name](warmup, training.max_steps)
            else:
                multiplier = OWN_SCHEDULES[name](warmup, training.max_steps, **options)
            return LambdaLR(optimizer, multiplier)
        from transformers import get_scheduler

        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=training.max_steps,
                             scheduler_specific_kwargs=options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"training.lr_schedule_options: the '{name}' schedule rejects {options} ({exc}); see "
                          "transformers.get_scheduler's schedules for their arguments") from None


def lr_lambda(recipe: Recipe) -> Callable[[int], float]:
    """The LR multiplier after ``step`` optimizer steps, as ``make_scheduler`` applies it."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=recipe.optimizer.lr or recipe.optimizer.base_lr)
    return make_scheduler(recipe, probe).lr_lambdas[0]
