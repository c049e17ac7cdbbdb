"""Regularisation terms that architectures add to the training loss (HRA's and ElaLoRA's orthogonality terms).

Each ``AdapterLayer`` may return its own weighted term from ``regularization()`` (the weight is one of the
architecture's options, so a weight of 0 costs nothing); ``regularization_loss`` sums them over the model. It
is a per-step term: a training loop adds it once per optimizer step, i.e. divided by the number of micro-batches
it accumulates (peftkit's loop and its Trainer callback both do):

    loss = model(**batch).loss + peftkit.regularization_loss(model) / grad_accum
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .inject import adapter_layers


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """Σ over adapter layers of ``layer.regularization()`` (a 0-dim tensor; 0 when no layer has a term)."""
    total: torch.Tensor | None = None
    for layer in adapter_layers(model).values():
        term = layer.regularization()
        if term is not None:
            total = term if total is None else total + term
    return total if total is not None else torch.zeros(())
