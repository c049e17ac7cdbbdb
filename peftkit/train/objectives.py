"""The loss of one micro-batch under the recipe's ``training.objective``, as its share of the step's loss.

The loss of a step is the mean over the global batch's loss units (target tokens or examples for ``sft``, the
preference pairs for ``dpo`` / ``simpo``), whatever its split into micro-batches and processes
(:mod:`peftkit.loss`, :mod:`peftkit.preference`). Every host knows every example's units from the batch plan, so
the global count needs no collective. Engines average gradients over processes: each process's share is scaled
back up by their number.
"""

from __future__ import annotations

import torch

import peftkit

from ..chunked_loss import target_positions
from ..inject import adapter_layers
from ..loss import loss_mode, share_of_global_mean
from ..preference import PAIR_OBJECTIVES, pair_loss_share, reward_sums
from .data import BatchPlan, collate_pairs, loss_units
from .recipe import objective_settings
from .run_setup import Run
from .vision import VISION_TASK, collate  # collate: data.collate, plus the pixel values of images


class StepObjective:
    """Builds a micro-batch's batch and computes its loss share; set up once per run.

    ``model`` is the engine-prepared model the step runs (``run.model`` is the unwrapped one)."""

    def __init__(self, run: Run, model: torch.nn.Module, engine, accelerator) -> None:
        training = run.recipe.training
        self.run, self.accelerator = run, accelerator
        self.grad_accum = training.grad_accum
        self.objective = training.objective
        self.chunked = training.chunked_loss
        # Architectures with a loss term of their own (HRA's, ElaLoRA's orthogonality); looked up once.
        self.regularized = any(layer.regularization() is not None for layer in adapter_layers(run.model).values())
        self.pairs = training.objective in PAIR_OBJECTIVES  # DPO / SimPO: the loss unit is the preference pair
        self.beta, self.gamma = objective_settings(training)
        # The reference of DPO: the same model with its adapters off, called outside an engine's wrapper (DDP's
        # forward would prepare a gradient synchronisation for a forward that has no backward).
        self.reference = engine.eval_model(model)
        self.units = loss_units(run.examples.train, run.classification, pairs=self.pairs)
        # The chunked head (peftkit.chunked_loss) calls the model's base itself: not through a DDP wrapper, whose
        # forward is what synchronises gradients (head_of also refuses FSDP2 and ZeRO-3 heads, hooks, adapters).
        self.mode = loss_mode(run.model, causal_lm=not run.classification,
                              chunked=training.chunked_loss and model is run.model
                              and run.recipe.model.task != VISION_TASK)
        self.process_scale = accelerator.num_processes if engine.averages_gradients else 1
        self.pad_id = run.tokenizer.pad_token_id

    def step_units(self, plan: BatchPlan, position: int) -> int:
        """The loss units of the global batch of the optimizer step whose first micro-batch is ``position``."""
        return int(sum(self.units[plan.global_indices(position + m)].sum() for m in range(self.grad_accum)))

    def batch(self, indices: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The micro-batch of ``indices`` (on the host) and, for a chunked loss, its target positions."""
        run = self.run
        if self.pairs:
            batch = collate_pairs(run.examples.train, indices, self.pad_id, run.padding_free)
        else:
            batch = collate(run.examples.train, indices, self.pad_id, run.classification, run.padding_free)
        positions = (target_positions(batch["labels"]) if (self.mode == "chunked" or self.pairs and self.chunked)
                     else None)  # on the host
        return batch, positions

    def loss(self, model, batch: dict[str, torch.Tensor], indices: list[int], step_units: int,
             positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This micro-batch's share of the step's loss, ready for backward (times the process scale, plus its part
        of the regularization term), and for pair objectives its share of the step's mean rewards
        (``REWARD_METRICS``; None otherwise). Call under the accelerator's autocast."""
        rewards = None
        if self.pairs:
            loss, stats = pair_loss_share(model, batch, step_units, self.objective, self.beta, self.gamma,
                                          reference=self.reference, pairs=len(indices), chunked=self.chunked,
                                          positions=positions)
            rewards = reward_sums(stats) * (self.accelerator.num_processes / max(step_units, 1))
        else:
            loss = share_of_global_mean(model, batch, int(self.units[indices].sum()), step_units, self.mode,
                                        positions)
        loss = loss * self.process_scale
        if self.regularized:
            # A per-step term, not a per-token one: once per step in the gradient average, as in the one-batch
            # run (each micro-batch on each process adds 1/grad_accum of it).
            loss = loss + peftkit.regularization_loss(self.run.model) / self.grad_accum
        return loss, rewards
