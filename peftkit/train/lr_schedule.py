"""The learning-rate schedule of a recipe (``training.lr_schedule``, ``warmup``, ``min_lr``) through
transformers' schedules."""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import ConfigError
from .recipe import Recipe, warmup_steps

# Where training.min_lr goes: the keyword each of transformers' schedules takes its floor as (a rate: min_lr / lr).
MIN_LR_KEYWORDS = {"cosine_with_min_lr": "min_lr_rate", "cosine_warmup_with_min_lr": "min_lr_rate",
                   "warmup_stable_decay": "min_lr_ratio", "polynomial": "lr_end"}


def make_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer):
    """``training.lr_schedule`` through ``transformers.get_scheduler``: warmup (``training.warmup``), the
    schedule over ``max_steps``, the floor ``training.min_lr`` where the schedule has one, and
    ``training.lr_schedule_options`` (num_cycles, power, num_decay_steps ...) as its other arguments."""
    from transformers import get_scheduler

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
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(training),
                             num_training_steps=training.max_steps, scheduler_specific_kwargs=options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"training.lr_schedule_options: the '{name}' schedule rejects {options} ({exc}); see "
                          "transformers.get_scheduler's schedules for their arguments") from None


def lr_lambda(recipe: Recipe) -> Callable[[int], float]:
    """The LR multiplier after ``step`` optimizer steps, as ``make_scheduler`` applies it."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=recipe.optimizer.lr or recipe.optimizer.base_lr)
    return make_scheduler(recipe, probe).lr_lambdas[0]

