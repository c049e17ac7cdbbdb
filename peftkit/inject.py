"""Find targets, swap adapter layers into a model in place, and undo it.

The model keeps its own class; what peftkit knows about it lives in ``model.peftkit`` (a small plain
object, not a module, so it never enters the model's state dict).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn

from . import quantized, registry
from .config import AdapterConfig, _name_matches, select_parameters, select_targets
from .errors import ConfigError, PeftkitError, StateError
from .expert_layer import ExpertParameterLayer
from .layer import AdapterLayer, ModulesToSave, innermost_module, linear_types

# What layers above injection do when a model gets its first adapter and when it loses its last one (the
# transformers integration puts its adapter-API methods on the instance and takes them off again). Injection
# only fires them, so it knows nothing of what sits above it.
_ATTACH_HOOKS: list = []
_DETACH_HOOKS: list = []


def on_adapters_attached(hook) -> None:
    """Call ``hook(model)`` whenever a model gets its first peftkit adapter (``wrap`` / ``load``)."""
    if hook not in _ATTACH_HOOKS:
        _ATTACH_HOOKS.append(hook)


def on_adapters_detached(hook) -> None:
    """Call ``hook(model)`` whenever a model loses its last peftkit adapter (``unwrap`` / ``delete_adapter``)."""
    if hook not in _DETACH_HOOKS:
        _DETACH_HOOKS.append(hook)

STATE_ATTR = "peftkit"
# The attribute of a wrapped model that holds its weight gate (``api.merge`` and the forwards it waits for).
GATE_ATTR = "_peftkit_weight_gate"


@dataclass
class PeftkitState:
    """What peftkit records on a wrapped model."""

    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    # What the model card reports about training: "data", "recipe", "metrics" (set by the loop or the Trainer callback).
    training: dict = field(default_factory=dict)


def state_of(model: nn.Module, *, required: bool = True) -> PeftkitState | None:
    state = model.__dict__.get(STATE_ATTR)
    if state is None and required:
        raise StateError(
            f"{type(model).__name__} has no peftkit adapters; call peftkit.wrap(model, method) or "
            "peftkit.load(model, dir) first"
        )
    return state


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Module name -> AdapterLayer, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def saved_modules(model: nn.Module) -> dict[str, ModulesToSave]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ModulesToSave)}


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> dict[str, AdapterLayer]:
    """Insert the adapter ``adapter_name`` into every target of ``config``; returns the touched layers.

    The first adapter of a model becomes active and trainable; a later one is added inactive and frozen
    (PEFT's semantics: ``set_adapter`` activates it).
    """
    state = state_of(model, required=False)
    if state is not None and adapter_name in state.configs:
        raise StateError(
            f"the model is already wrapped with an adapter named '{adapter_name}'; call peftkit.unwrap(model) "
            "first, or pass adapter_name='<new name>' to add a second adapter"
        )
    layer_cls = registry.get_component("architecture", config.architecture).obj
    supported = getattr(layer_cls, "supported_types", None) or linear_types()
    # Already-wrapped layers are matched by their own name; look through them for the base types.
    names = select_targets(_BaseView(model), config, supported)
    existing = adapter_layers(model)
    touched: dict[str, AdapterLayer] = {}
    created: list[tuple[str, nn.Module]] = []
    try:
        for name in names:
            layer = existing.get(name)
            if layer is None:
                base = model.get_submodule(name)
                layer = layer_cls.for_base(base)(base, name)
                layer.train(base.training)  # a new module takes the train/eval mode of the one it replaces
                _set_child(model, name, layer)
                created.append((name, base))
            elif not isinstance(layer, layer_cls) or layer.architecture_name != layer_cls.architecture_name:
                # (a subclass is another architecture: a LoRA adapter added to a DoRA layer got a DoRA branch)
                raise ConfigError(
                    f"{name} already holds a '{layer.architecture_name}' adapter; a second adapter on the same "
                    f"layer must use the same architecture, not '{config.architecture}'"
                )
            r, alpha = config.rank_alpha(name)
            if not getattr(config, "_allow_large_rank", False):  # load checks shapes against the file instead
                _check_size(layer_cls, layer.base_layer, name, adapter_name, r, alpha, config)
            layer.add_adapter(adapter_name, r, alpha, config)
            touched[name] = layer
        for name, layer in _inject_parameters(model, config, adapter_name, layer_cls, created).items():
            touched[name] = layer
        layer_cls.after_inject(touched, adapter_name)
        for keep in config.modules_to_save or []:
            for name, module in list(model.named_modules()):
                if name and _name_matches(name, keep) and not isinstance(module, (AdapterLayer,)):
                    wrapper = module if isinstance(module, ModulesToSave) else None
                    if wrapper is None:
                        if any(isinstance(p, ModulesToSave) for p in _parents(model, name)):
                            continue
                        wrapper = ModulesToSave(module, name)
                        wrapper.train(module.training)
                        _set_child(model, name, wrapper)
                        created.append((name, module))
                    wrapper.add_adapter(adapter_name)
    except Exception:
        # Leave the model exactly as it was.
        for name, base in reversed(created):
            _set_child(model, name, base)
        for layer in touched.values():
            if adapter_name in layer.adapters:
                layer.delete_adapter(adapter_name)
        raise
    # bitsandbytes may repack 4-bit weights for its CPU kernel on an eval forward: keep reads, gradients and
    # state dicts of every 4-bit layer (targeted or not) right on that layout.
    quantized.track_layouts(model)
    if state is None:
        state = PeftkitState()
        model.__dict__[STATE_ATTR] = state
        for hook in _ATTACH_HOOKS:
            hook(model)
    state.configs[adapter_name] = config
    if not state.active:
        state.active = [adapter_name]
    set_active(model, state.active)
    return touched


def expert_chain(module: nn.Module) -> list[ExpertParameterLayer]:
    """The expert-parameter layers stacked on one module, outermost first."""
    chain = []
    while isinstance(module, ExpertParameterLayer):
        chain.append(module)
        module = module.base_layer
    return chain


def expert_methods() -> list[str]:
    """The registered methods whose four components all apply per expert matrix."""
    names = []
    for name in registry.methods():
        method = registry.get_method(name)
        if getattr(registry.get_component("architecture", method.architecture).obj, "expert_layer", None) is None:
            continue
        if all(registry.get_component(axis, getattr(method, axis)).expert_parameters
               for axis in ("init", "optimizer", "schedule")):
            names.append(name)
    return names


def _inject_parameters(model: nn.Module, config: AdapterConfig, adapter_name: str, layer_cls: type,
                       created: list[tuple[str, nn.Module]]) -> dict[str, AdapterLayer]:
    """Adapt the parameters ``config`` selects (fused expert stacks; routers' bare weights), one nested
    ExpertParameterLayer per parameter, the first of a module's parameters innermost (PEFT's nesting, hence its
    keys ``experts.lora_A.weight`` / ``experts.base_layer.lora_A.weight``). Returns module path -> layer."""
    selected = select_parameters(_BaseView(model), config)
    if not selected:
        return {}
    expert_cls = getattr(layer_cls, "expert_layer", None)
    if expert_cls is None:
        raise ConfigError(
            f"targets: method '{config.method}' (architecture '{config.architecture}') cannot adapt the fused "
            f"parameter {selected[0][0]} ({len(selected)} such parameters selected): its adapter is defined on one "
            "linear layer, not per expert matrix. Use a method that adapts expert parameters "
            f"({', '.join(expert_methods())}), "
            "or leave the expert parameters out (targets=[...] naming modules only, or exclude=[...])")
    for axis in ("init", "optimizer", "schedule"):
        component = registry.get_component(axis, getattr(config, axis))
        if not component.expert_parameters:
            raise ConfigError(
                f"{axis}: method '{config.method}' uses the {axis} '{component.name}', which does not apply per "
                f"expert matrix, and {selected[0][0]} is a fused expert parameter ({len(selected)} selected). "
                "Leave the expert parameters out (targets=[...] naming modules only, or exclude=[...]), or use a "
                f"method that adapts them ({', '.join(expert_methods())})")
    config_of = getattr(model, "config", None)
    text_config = config_of.get_text_config() if hasattr(config_of, "get_text_config") else config_of
    hidden_size = getattr(text_config, "hidden_size", None)
    by_owner: dict[str, list[str]] = {}
    for full, owner in selected:
        by_owner.setdefault(owner, []).append(full.rsplit(".", 1)[-1])
    touched: dict[str, AdapterLayer] = {}
    for owner_name, params in by_owner.items():
        chain = expert_chain(model.get_submodule(owner_name))
        held = [layer.parameter_name for layer in reversed(chain)]
        if chain and held != params:
            raise ConfigError(
                f"target_parameters: {owner_name} already holds adapters on {held}; every adapter on a model must "
                f"target the same parameters of a module (PEFT's rule: they share one nesting), not {params}")
        for depth, pname in enumerate(params):
            if chain:
                layer = chain[len(chain) - 1 - depth]
            else:
                current = model.get_submodule(owner_name)
                layer = expert_cls(current, owner_name, pname, hidden_size)
                layer.train(current.training)
                _set_child(model, owner_name, layer)
                created.append((owner_name, current))
            r, alpha = config.rank_alpha(f"{owner_name}.{pname}")
            layer.add_adapter(adapter_name, r, alpha, config)
        for depth, layer in enumerate(expert_chain(model.get_submodule(owner_name))):
            touched[owner_name + ".base_layer" * depth] = layer
    return touched


# An adapter holding more than this many times its layer's own weight is a mistake (an absurd rank or capacity),
# refused before it is allocated; the largest legitimate adapters (full-rank factors) hold about 2x.
MAX_SIZE_RATIO = 8


def meta_shadow(base: nn.Module) -> nn.Module:
    """A shallow copy of a base layer whose parameters and buffers are meta tensors of the same shapes and
    dtypes: an adapter built on it (under ``torch.device("meta")``) allocates nothing."""
    shadow = copy.copy(base)
    shadow._parameters = {k: None if p is None else nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                                  requires_grad=False)
                          for k, p in base._parameters.items()}
    shadow._buffers = {k: None if b is None else torch.empty(b.shape, dtype=b.dtype, device="meta")
                       for k, b in base._buffers.items()}
    shadow._modules = dict(base._modules)
    return shadow


def probe_adapter(layer_cls: type, base: nn.Module, name: str, adapter_name: str, r: int, alpha: float,
                  config: Any) -> AdapterLayer | None:
    """The adapter layer ``config`` gives ``base``, built on the meta device (shapes only, nothing allocated);
    None for a base the meta copy cannot stand in for (a quantized layer whose init reads its values)."""
    try:
        shadow = meta_shadow(base)
        with torch.device("meta"):
            layer = layer_cls.for_base(shadow)(shadow, name)
            layer.add_adapter(adapter_name, r, alpha, config)
        return layer
    except PeftkitError:
        raise
    except Exception:  # noqa: BLE001 - only a pre-check: the real build below raises whatever is wrong
        return None


def _check_size(layer_cls: type, base: nn.Module, name: str, adapter_name: str, r: int, alpha: float,
                config: Any) -> None:
    probe = probe_adapter(layer_cls, base, name, adapter_name, r, alpha, config)
    if probe is None:
        return
    size = sum(t.numel() for t in probe.adapters[adapter_name].state_dict().values())
    weight = probe.out_features * probe.in_features + probe.out_features + probe.in_features
    if size > MAX_SIZE_RATIO * weight:
        raise ConfigError(
            f"{name}: the '{config.architecture}' adapter would hold {size:,} values, more than {MAX_SIZE_RATIO}x the "
            f"layer's own {probe.out_features}x{probe.in_features} weight; lower r (or rank_pattern) or the method's "
            "size options (e.g. capacity, sequential_r)"
        )


def _parents(model: nn.Module, name: str) -> Iterator[nn.Module]:
    parts = name.split(".")
    for i in range(1, len(parts)):
        yield model.get_submodule(".".join(parts[:i]))


class _BaseView:
    """Presents a model to target matching with adapter layers seen as their base layers."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self.model_class_name = type(model).__name__  # what messages name (select_targets)

    def named_modules(self):
        for name, module in self._model.named_modules():
            if any(seg in ("base_layer", "adapters", "original_module", "modules_to_save") for seg in name.split(".")):
                continue
            if isinstance(module, AdapterLayer):
                module = innermost_module(module)
            yield name, module

    def get_output_embeddings(self):
        get = getattr(self._model, "get_output_embeddings", None)
        return get() if get else None

    def __getattr__(self, item):
        return getattr(self._model, item)


def set_active(model: nn.Module, names: list[str]) -> None:
    """Activate ``names`` (their parameters trainable, all else frozen)."""
    state = state_of(model)
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise ConfigError(f"adapter_name: {unknown} not found; the model has {sorted(state.configs)}")
    layers = adapter_layers(model).values()
    if any(layer.merged_adapters and set(layer.merged_adapters) != set(names) for layer in layers):
        warnings.warn(f"set_adapter: unmerging the merged adapters to activate {list(names)} (the base weights hold "
                      "the merged ones); call peftkit.merge(model) again to merge the new selection", stacklevel=3)
    state.active = list(names)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers:
        layer.set_active(names)
        for name in layer.active_adapters:
            for p in layer.adapters[name].parameters():
                p.requires_grad_(True)
    for wrapper in saved_modules(model).values():
        wrapper.set_active(names)
        for name in wrapper.active_adapters:
            for p in wrapper.modules_to_save[name].parameters():
                p.requires_grad_(True)


def set_enabled(model: nn.Module, enabled: bool) -> None:
    for module in list(adapter_layers(model).values()) + list(saved_modules(model).values()):
        module.disabled = not enabled


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``with peftkit.disabled(model):`` runs the base model (adapters off, merged ones unmerged)."""
    set_enabled(model, False)
    try:
        yield model
    finally:
        set_enabled(model, True)


def remove(model: nn.Module, merge: bool) -> nn.Module:
    """Replace every adapter layer by its base layer (merging first if asked) and forget peftkit's state."""
    state = state_of(model)
    for name, layer in _innermost_first(adapter_layers(model)):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        _set_child(model, name, layer.base_layer)
    for name, wrapper in saved_modules(model).items():
        keep = (wrapper.modules_to_save[state.active[0]] if merge and wrapper.active_adapters
                else wrapper.original_module)
        _set_child(model, name, keep)
    _forget(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _innermost_first(layers: dict[str, AdapterLayer]) -> list[tuple[str, AdapterLayer]]:
    """Nested layers (expert parameters of one module: ``experts``, ``experts.base_layer``) deepest first, so that
    replacing each by its base leaves every path valid."""
    return sorted(layers.items(), key=lambda item: -item[0].count(".base_layer"))


def parameter_flags(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    """Every parameter with its ``requires_grad`` flag, to put back with ``restore_parameter_flags``."""
    return [(param, param.requires_grad) for param in model.parameters()]


def restore_parameter_flags(flags: list[tuple[nn.Parameter, bool]]) -> None:
    for param, flag in flags:
        param.requires_grad_(flag)


def drop_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one (unmerged) adapter everywhere. Layers and heads left without any adapter become their base
    module again, and a model whose last adapter this was forgets peftkit (used to undo a failed wrap/load)."""
    state = state_of(model)
    for name, layer in _innermost_first(adapter_layers(model)):
        if adapter_name in layer.adapters:
            layer.delete_adapter(adapter_name)
            if not len(layer.adapters):
                _set_child(model, name, layer.base_layer)
    for name, wrapper in saved_modules(model).items():
        if adapter_name in wrapper.modules_to_save:
            wrapper.delete_adapter(adapter_name)
            if not len(wrapper.modules_to_save):
                _set_child(model, name, wrapper.original_module)
    state.configs.pop(adapter_name, None)
    if adapter_name in state.active:
        state.active.remove(adapter_name)
    if not state.configs:
        _forget(model)


def _forget(model: nn.Module) -> None:
    """The model has no peftkit adapters any more: drop the state and run the detach hooks."""
    del model.__dict__[STATE_ATTR]
    for hook in _DETACH_HOOKS:
        hook(model)
