"""Regularisation terms that architectures add to the training loss (HRA's and ElaLoRA's orthogonality terms).

Each ``AdapterLayer`` may return its own weighted term from ``regularization()`` (the weight is one of the
architecture's options, so a weight of 0 costs nothing); ``regularization_loss`` sums them over the model. A
training loop adds it to every micro-batch loss before backward:

    loss = model(**batch).loss + peftkit.regularization_loss(model)
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
