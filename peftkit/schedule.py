"""Schedules as callbacks: one object usable from any loop (``on_step``) and from transformers' Trainer.

Order (../shared/methods/README.md §4.1): ``on_step(step, total_steps)`` runs after ``optimizer.step()``
(and the LR scheduler step) and before ``zero_grad``, once per optimizer step, ``step`` counting from 1.
Schedule state goes through ``state_dict`` / ``load_state_dict`` so a resumed run continues the same
trajectory.

The base class ``Schedule`` lives here; it registers nothing and does not know the registry (the schedule
``none`` is registered in ``peftkit/components.py``, method schedules in ``adapters/``).
"""

from __future__ import annotations

import os
from typing import Any

import torch.nn as nn

from .trainer_state import add_regularization_gradient, check_trainer_optimizer, save_training_state


def _no_event(*args: Any, **kwargs: Any) -> None:
    return None


class Schedule:
    """Base schedule. Subclasses override ``on_step`` (and ``on_train_begin`` / ``on_train_end``). It provides
    ``peftkit.contracts.Schedule``, what a schedule factory returns.

    A schedule is also a transformers Trainer callback (``Trainer(..., callbacks=[schedule])``) by duck typing,
    not by subclassing ``transformers.TrainerCallback``: importing that class imports
    ``transformers.trainer_utils`` and, through it, all of PEFT when PEFT is installed, which tripled the time
    of ``import peftkit`` (≈ 6 s of ≈ 9.6 s on this project's CPU machine).
    """

    def __init__(self, model: nn.Module, config: Any) -> None:
        self.model = model
        self.config = config
        # Schedules that edit optimizer state (ElaLoRA resets the moments of the slots it changes) need the
        # optimizer: ``peftkit.callbacks(model, optimizer=opt)``, ``attach_optimizer(opt)``, or, under the
        # Trainer, the ``optimizer`` its callback hooks pass.
        self.optimizer: Any = None

    def attach_optimizer(self, optimizer: Any) -> None:
        """Give the schedule the training optimizer (a torch optimizer or one wrapping it, e.g. Accelerate's)."""
        self.optimizer = optimizer

    # ---- the loop-independent API
    def on_train_begin_(self, total_steps: int) -> None:
        """Called once before the first step."""

    def on_step(self, step: int, total_steps: int) -> None:
        """Called after optimizer step ``step`` (1-based), before gradients are zeroed."""

    def on_train_end_(self) -> None:
        """Called once after the last step."""

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state for a training checkpoint (empty for a stateless schedule)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned, so a resumed run continues the same trajectory."""
        return None

    # ---- transformers.TrainerCallback hooks
    def __getattr__(self, name: str) -> Any:
        # The Trainer calls every event hook (on_log, on_save, ...) on every callback, and later transformers
        # versions add events: any ``on_*`` hook not defined here does nothing, as TrainerCallback's do.
        if name.startswith("on_"):
            return _no_event
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D401 - Trainer API
        """Trainer hook: take the Trainer's optimizer, then ``on_train_begin_(max_steps)``."""
        if kwargs.get("optimizer") is not None:
            check_trainer_optimizer(self.config, kwargs["optimizer"])
            self.attach_optimizer(kwargs["optimizer"])
        self.on_train_begin_(state.max_steps)

    def on_optimizer_step(self, args, state, control, **kwargs):
        """Trainer hook, after ``optimizer.step()`` and before ``zero_grad``: ``on_step(global_step + 1,
        max_steps)``."""
        if kwargs.get("optimizer") is not None and self.optimizer is None:
            self.attach_optimizer(kwargs["optimizer"])
        # The Trainer calls this after optimizer.step() and before zero_grad; global_step is the number of
        # steps completed before this one.
        self.on_step(state.global_step + 1, state.max_steps)

    def on_train_end(self, args, state, control, **kwargs):
        """Trainer hook: ``on_train_end_()``."""
        self.on_train_end_()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """Trainer hook: add the architecture's regulariser gradient to the accumulated gradients before the step."""
        # The architecture's regulariser (HRA's, ElaLoRA's orthogonality terms) is part of the objective the
        # Trainer and TRL optimise: its gradient joins the final, accumulated gradients before the step.
        add_regularization_gradient(self.model, kwargs.get("optimizer") or self.optimizer)

    def on_save(self, args, state, control, **kwargs):
        """Trainer hook: write the exact training tensors and this schedule's state into ``checkpoint-N``."""
        # Next to the PEFT adapter the Trainer wrote through model.save_pretrained: what resume needs exactly.
        if getattr(args, "should_save", True):
            save_training_state(self.model, self, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Trainer hook: keep the last logged metrics for the model card of the next save."""
        # The last logged metrics go into the model card of the next save.
        from .inject import state_of

        peftkit_state = state_of(self.model, required=False)
        if peftkit_state is not None and logs:
            peftkit_state.training.setdefault("metrics", {}).update(
                {k: v for k, v in logs.items() if isinstance(v, (int, float))})
