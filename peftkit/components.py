"""The generic components of the four axes, which are no method's own: the optimizer ``adamw``, the init
``default`` (the architecture's own initialisation) and the schedule ``none``.

They are registered here, not in ``peftkit/optim.py`` or ``peftkit/schedule.py``, so that the registry knows
neither of those modules and neither of them imports the registry: the imports run one way,
``components -> registry, optim, schedule``. ``peftkit.api`` imports this module, so the three components are
registered as soon as ``peftkit`` (or any of its submodules) is imported; method components live in
``adapters/``, one file per method.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from . import registry
from .layer import AdapterLayer
from .optim import AdamWOptions, param_groups
from .schedule import Schedule


@registry.optimizer("adamw", options=AdamWOptions, description="torch AdamW; no decay on biases and norms")
def build_adamw(model: nn.Module, lr: float, config: Any, **options: Any) -> torch.optim.Optimizer:
    """torch's AdamW over ``param_groups(model, lr, weight_decay)`` (no decay on biases and norms)."""
    opts = config.axis_options("optimizer", **options)
    groups = param_groups(model, lr, opts.weight_decay)
    # On CPU torch picks the per-tensor loop (a Python iteration per parameter); the foreach kernels give the
    # same bits there with one call per group. Elsewhere torch's own choice (foreach on CUDA already).
    on_cpu = all(p.device.type == "cpu" for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(opts.betas), eps=opts.eps, foreach=True if on_cpu else None)


@registry.init("default", description="the architecture's own initialisation (no data)")
def default_init(model: nn.Module, layers: dict[str, AdapterLayer], config: Any, data: Any) -> None:
    """Nothing to do: each adapter layer was initialised by its architecture when it was built."""
    return None


@registry.schedule("none", description="nothing changes during training")
def build_no_schedule(model: nn.Module, config: Any) -> Schedule:
    """A schedule whose events do nothing (it still saves and restores its empty state)."""
    return Schedule(model, config)
