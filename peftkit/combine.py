"""A new adapter from a weighted combination of LoRA-shaped ones (PEFT's ``add_weighted_adapter`` semantics).

For adapters i with weights wᵢ, scalings sᵢ and factors (Aᵢ (rᵢ, in), Bᵢ (out, rᵢ)), the new adapter has
rank r and alpha = r (scaling 1, as PEFT sets it), and:

- ``"cat"`` (exact): A = [w₁s₁A₁; w₂s₂A₂; …], B = [B₁, B₂, …], r = Σ rᵢ, so B·A = Σ wᵢ·ΔWᵢ exactly;
- ``"svd"``: ΔW = Σ wᵢ·ΔWᵢ truncated to rank r (``svd_rank``, default max rᵢ): B = U_r·diag(S_r), A = V_rᵀ, with
  ``svd_clamp`` clipping both to the given quantile of their entries (PEFT's option).

A layer exposes its adapter as a LoRA through its saved form (``lora_A``/``lora_B`` tensors and its scaling) or,
for a native format, ``export_lora`` (exact, ΔW = s·B·A). The new adapter is added inactive and frozen, as
PEFT does; ``peftkit.set_adapter(model, name)`` activates it.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn as nn

from .errors import ConfigError, StateError
from .expert_layer import ExpertParameterLayer
from .inject import adapter_layers, inject, state_of

PAIR_KEYS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))


def _as_lora(layer, name: str) -> tuple[str, str, torch.Tensor, torch.Tensor, float]:
    """(A key, B key, A, B, s) of one adapter of one layer, with ΔW = s·B·A."""
    if getattr(layer, "peft_type", None) is None and hasattr(layer, "export_lora"):
        a, b, scale, *bias = layer.export_lora(name)
        if bias and bias[0] is not None:
            raise ConfigError(f"add_weighted_adapter: {layer.module_name}: adapter '{name}' changes the bias, which a "
                              "LoRA combination cannot hold")
        return "lora_A.weight", "lora_B.weight", a.detach(), b.detach(), float(scale)
    saved = layer.saved_tensors(name)
    for a_key, b_key in PAIR_KEYS:
        if a_key in saved and b_key in saved:
            return a_key, b_key, saved[a_key], saved[b_key], float(layer.scaling[name])
    raise ConfigError(
        f"add_weighted_adapter: adapter '{name}' on {layer.module_name} is a '{layer.architecture_name}' adapter, "
        "not LoRA-shaped (ΔW = s·B·A); combine LoRA-family adapters, or export this one first (peftkit.export)")


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "cat", svd_rank: int | None = None,
                         svd_clamp: float | None = None) -> nn.Module:
    """Add adapter ``adapter_name`` = Σ wᵢ·adapterᵢ (see the module docstring); returns the model."""
    state = state_of(model)
    adapters, weights = list(adapters), list(weights)
    for i, w in enumerate(weights):
        try:
            value = None if isinstance(w, (bool, str)) else float(w)
        except (TypeError, ValueError, RuntimeError):
            value = None
        if value is None or not math.isfinite(value):
            raise ConfigError(f"add_weighted_adapter: weights[{i}] must be a finite number, got {w!r}; a NaN or inf "
                              "weight would write a NaN adapter")
        weights[i] = value
    if not adapters or len(adapters) != len(weights):
        raise ConfigError(f"add_weighted_adapter: expected one weight per adapter, got {len(adapters)} adapters and "
                          f"{len(weights)} weights")
    unknown = [a for a in adapters if a not in state.configs]
    if unknown:
        raise ConfigError(f"add_weighted_adapter: adapters {unknown} not found; the model has {sorted(state.configs)}")
    if adapter_name in state.configs:
        raise StateError(f"add_weighted_adapter: the model already has an adapter '{adapter_name}'; pick a new name "
                         "or peftkit.delete_adapter it first")
    if combination_type not in ("cat", "svd"):
        raise ConfigError(f"combination_type: expected 'cat' (exact) or 'svd' (truncated), got {combination_type!r}")
    layers = {n: layer for n, layer in adapter_layers(model).items() if any(a in layer.adapters for a in adapters)}
    experts = [layer.target_name for layer in layers.values() if isinstance(layer, ExpertParameterLayer)]
    if experts:
        raise ConfigError(
            f"add_weighted_adapter: {experts[0]} is a fused expert parameter ({len(experts)} adapted); combining "
            "adapters per expert is not supported. Combine adapters that target modules only, or merge them one after "
            "another (peftkit.merge)")
    if any(set(layer.merged_adapters) & set(adapters) for layer in layers.values()):
        raise StateError("add_weighted_adapter: some of these adapters are merged; call peftkit.unmerge(model) first")
    # Per layer: (adapter, weight, A key, B key, A, B, s) of every adapter it holds.
    parts = {n: [(a, w, *_as_lora(layer, a)) for a, w in zip(adapters, weights) if a in layer.adapters]
             for n, layer in layers.items()}
    ranks = {a: max(item[4].shape[0] for items in parts.values() for item in items if item[0] == a) for a in adapters}
    if combination_type == "cat":
        new_rank = sum(ranks.values())
    else:
        new_rank = int(svd_rank) if svd_rank is not None else max(ranks.values())
        if new_rank <= 0:
            raise ConfigError(f"svd_rank: expected a positive integer, got {svd_rank!r}")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name, items in parts.items():
        a_key, b_key = items[0][2], items[0][3]
        if combination_type == "cat":
            a = torch.cat([w * s * a for _, w, _, _, a, _, s in items], 0)
            b = torch.cat([b for _, _, _, _, _, b, _ in items], 1)
            pad = new_rank - a.shape[0]  # a layer that some adapters do not target: zero rows, as PEFT leaves them
            if pad:
                a = torch.cat([a, a.new_zeros((pad,) + tuple(a.shape[1:]))], 0)
                b = torch.cat([b, b.new_zeros((b.shape[0], pad) + tuple(b.shape[2:]))], 1)
        else:
            if items[0][4].ndim != 2:
                raise ConfigError(f"add_weighted_adapter: 'svd' needs matrix factors; {name} is a convolution "
                                  "(use 'cat')")
            delta = sum(w * s * (b @ a) for _, w, _, _, a, b, s in items)
            u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
            rank = min(new_rank, sv.shape[0])
            b = u[:, :rank] @ torch.diag(sv[:rank])
            a = vh[:rank]
            if svd_clamp is not None:
                high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), svd_clamp)
                a, b = a.clamp(-high, high), b.clamp(-high, high)
            if rank < new_rank:
                a = torch.cat([a, a.new_zeros(new_rank - rank, a.shape[1])], 0)
                b = torch.cat([b, b.new_zeros(b.shape[0], new_rank - rank)], 1)
        tensors[name] = {a_key: a, b_key: b}
    config = copy.deepcopy(state.configs[adapters[0]])
    config.method = config.method if config.architecture == "lora" else "lora"
    config.architecture, config.init, config.schedule = "lora", "default", "none"
    config.r, config.alpha, config.rank_pattern, config.alpha_pattern = new_rank, float(new_rank), {}, {}
    config.rslora = False  # the weights above already carry each source's scaling: the new one's must be 1
    config.targets, config.exclude, config.modules_to_save = sorted(layers), None, None
    config.options = {}
    object.__setattr__(config, "_allow_large_rank", True)  # a concatenation may exceed min(in, out), as in PEFT
    flags = [(p, p.requires_grad) for p in model.parameters()]
    touched = inject(model, config, adapter_name)
    for name, layer in touched.items():
        layer.load_saved_tensors(adapter_name, tensors[name])
        for p in layer.adapters[adapter_name].parameters():
            p.requires_grad_(False)
    for param, flag in flags:
        param.requires_grad_(flag)
    return model
