"""Adapter-aware optimizer machinery: parameter roles, (A, B) pairs by module name, param groups.

Every trainable parameter of a wrapped model gets a role:
- ``"A"`` / ``"B"``: the down / up factor of a LoRA-shaped adapter (ΔW = s·B·A), found through
  ``AdapterLayer.factor_pairs()``, so pairing is by module name, never by position;
- ``"adapter"``: any other adapter tensor (HRA's U, Hydra's factors, ElaLoRA's P, E, Q ...);
- ``"other"``: everything else that trains (classification heads, biases, norms).
and a decay flag: weight decay applies to tensors of 2 or more dimensions that are not biases and not
norm weights. Param groups carry ``role``, ``names`` and ``lr_ratio`` so that a resume can check them.

The plain optimizer ``adamw`` is registered here; method optimizers live in ``adapters/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from . import registry
from .errors import ConfigError
from .layer import AdapterLayer


@dataclass
class FactorPair:
    """The (A, B) pair of one adapter in one layer: ΔW = scaling · B · A."""

    module_name: str
    adapter_name: str
    a: nn.Parameter  # (r, in)
    b: nn.Parameter  # (out, r)
    scaling: float
    layer: AdapterLayer


def factor_pairs(model: nn.Module) -> list[FactorPair]:
    """Every trainable (A, B) pair of the model, keyed by module and adapter name."""
    pairs = []
    for module_name, layer in model.named_modules():
        if isinstance(layer, AdapterLayer):
            for adapter_name, a, b, s in layer.factor_pairs():
                if a.requires_grad and b.requires_grad:
                    pairs.append(FactorPair(module_name, adapter_name, a, b, s, layer))
    return pairs


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)) or "Norm" in type(module).__name__


def parameter_roles(model: nn.Module) -> dict[str, tuple[str, bool]]:
    """Trainable parameter name -> (role, decays)."""
    ids_a = {}
    ids_b = {}
    for pair in factor_pairs(model):
        ids_a[id(pair.a)] = pair
        ids_b[id(pair.b)] = pair
    adapter_ids = set()
    norm_ids = set()
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            adapter_ids |= {id(p) for p in module.adapters.parameters()}
        if _is_norm(module):
            norm_ids |= {id(p) for p in module.parameters(recurse=False)}
    roles = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in ids_a:
            role = "A"
        elif id(param) in ids_b:
            role = "B"
        elif id(param) in adapter_ids:
            role = "adapter"
        else:
            role = "other"
        decays = param.ndim >= 2 and not name.endswith("bias") and id(param) not in norm_ids
        roles[name] = (role, decays)
    return roles


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                 lr_ratios: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Groups by (role, decays); group lr = lr · lr_ratios[role] (default 1)."""
    check_lr(lr)
    if weight_decay < 0:
        raise ConfigError(f"weight_decay: expected >= 0, got {weight_decay}")
    lr_ratios = lr_ratios or {}
    named = dict(model.named_parameters())
    buckets: dict[tuple[str, bool], list[str]] = {}
    for name, (role, decays) in parameter_roles(model).items():
        buckets.setdefault((role, decays), []).append(name)
    if not buckets:
        raise ConfigError("optimizer: the model has no trainable parameters; wrap it with peftkit.wrap, or load the adapter with peftkit.load(model, dir, trainable=True)")
    groups = []
    for (role, decays), names in sorted(buckets.items()):
        ratio = float(lr_ratios.get(role, 1.0))
        groups.append({
            "params": [named[n] for n in names],
            "names": names,
            "role": role,
            "lr": lr * ratio,
            "lr_ratio": ratio,
            "weight_decay": weight_decay if decays else 0.0,
        })
    return groups


def check_lr(lr: float) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"lr: expected a positive learning rate, got {lr!r}")


@dataclass
class AdamWOptions:
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@registry.optimizer("adamw", options=AdamWOptions, description="torch AdamW; no decay on biases and norms")
def build_adamw(model: nn.Module, lr: float, config: Any, **options: Any) -> torch.optim.Optimizer:
    opts = {**AdamWOptions().__dict__, **config.axis_options("optimizer"), **options}
    groups = param_groups(model, lr, opts["weight_decay"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(opts["betas"]), eps=opts["eps"])


@registry.init("default", description="the architecture's own initialisation (no data)")
def default_init(model: nn.Module, layers: dict[str, AdapterLayer], config: Any, data: Any) -> None:
    return None


def iter_adapter_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, param in model.named_parameters():
        if param.requires_grad:
            yield name, param
