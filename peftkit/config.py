"""The adapter config: common options, per-axis component options, target matching and per-layer ranks.

A config is a plain dataclass that round-trips through JSON (it is stored in every checkpoint). Option
resolution routes each keyword a user passes to the common fields or to the one component (of the four
selected axes) that declares it, so ``wrap(model, "lora", init="eva", rho=2)`` sends ``rho`` to EVA.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Iterable

import torch.nn as nn

from . import registry
from .errors import ConfigError
from .validation import (
    Rule,
    check_fields,
    check_instance,
    check_value,
    compile_pattern,
    option,
    pattern_suffix_match,
    unknown_key,
)

ALL_LINEAR = "all-linear"
# Classification heads that "all-linear" never adapts (they are new, randomly initialised layers).
CLASSIFIER_HEAD_NAMES = ("score", "classifier")


@dataclass
class AdapterConfig:
    """Everything needed to rebuild an adapter: the preset, the four axes, common and component options.

    Shapes and units: ``r`` is the rank (a positive int, per layer overridable by ``rank_pattern``);
    ``alpha`` the LoRA scaling numerator (s = alpha / r, or alpha / sqrt(r) with ``rslora``).
    """

    method: str = "lora"
    architecture: str = "lora"
    init: str = "default"
    optimizer: str = "adamw"
    schedule: str = "none"
    r: int = option(8, gt=0, expect="a positive integer rank", example=8)
    alpha: float = option(8.0, gt=0, expect="a positive number (finite)", example=16)
    targets: str | list[str] = option(ALL_LINEAR, expect="'all-linear', a regex string or a list of module names")
    exclude: str | list[str] | None = None
    # PEFT's target_parameters: parameter names (full, or a suffix such as "mlp.experts.gate_up_proj") adapted in
    # place, one adapter per expert matrix of a fused (experts, out, in) parameter.
    target_parameters: list[str] | None = option(None, expect="a list of parameter names such as "
                                                 "['mlp.experts.gate_up_proj', 'mlp.experts.down_proj'], or null")
    dropout: float = option(0.0, ge=0, lt=1, expect="a probability in [0, 1)", example=0.05)
    rslora: bool = False
    rank_pattern: dict[str, int] = option(default_factory=dict, gt=0,
                                          expect="a mapping {module regex: positive integer rank}")
    alpha_pattern: dict[str, float] = option(default_factory=dict, gt=0,
                                             expect="a mapping {module regex: positive number}")
    modules_to_save: list[str] | None = option(None, expect="a list of module names such as ['classifier'], or null")
    seed: int = option(0, ge=0)
    # Per axis: {"architecture": {...}, "init": {...}, "optimizer": {...}, "schedule": {...}}
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    # ------------------------------------------------------------------ helpers
    def axis_options(self, axis: str, **overrides: Any) -> Any:
        """The options of the component selected on ``axis``, filled: an instance of its registered options
        dataclass whose fields are the dataclass's defaults, overridden by the values this config stores
        (``options[axis]``) and then by ``overrides`` (a call site's own, e.g. ``peftkit.optimizer(model,
        weight_decay=0.1)``). A component that declares no options class gets a ``SimpleNamespace`` of the stored
        values and overrides.

        Raises:
            ConfigError: ``axis`` is not one of ``registry.AXES``, or the selected component is not registered.
        """
        if axis not in registry.AXES:
            raise ConfigError(unknown_key(axis, registry.AXES, "axis"))
        values = {**self.options.get(axis, {}), **overrides}
        options_class = registry.get_component(axis, getattr(self, axis)).options
        if options_class is None:
            return SimpleNamespace(**values)
        names = {f.name for f in dataclasses.fields(options_class) if f.init}
        # Values were checked against the class on the way in (from_dict, resolve_options, peftkit.optimizer).
        return options_class(**{k: v for k, v in values.items() if k in names})

    def option(self, name: str, default: Any = None) -> Any:
        """A component option by name, from whichever selected axis declares it."""
        for axis in registry.AXES:
            if name in self.options.get(axis, {}):
                return self.options[axis][name]
        return default

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """A config from its JSON form; every field is type- and range-checked, component options included."""
        if not isinstance(data, dict):
            raise ConfigError(f"adapter config: expected a JSON object of fields, got {type(data).__name__}")
        values = check_fields(cls, copy.deepcopy(data), kind="adapter config field")
        config = cls(**values)
        for axis, opts in config.options.items():
            if axis not in registry.AXES:
                raise ConfigError(unknown_key(f"options.{axis}", [f"options.{a}" for a in registry.AXES], "axis"))
            component = registry.get_component(axis, getattr(config, axis))
            config.options[axis] = check_component_options(component, opts, prefix=f"options.{axis}.")
        return config

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def rank_alpha(self, module_name: str) -> tuple[int, float]:
        """(r, alpha) of one module, with PEFT's pattern rule (first matching key in dict order wins)."""
        r = self.r
        alpha = self.alpha
        key = pattern_key(self.rank_pattern, module_name)
        if key is not None:
            r = int(self.rank_pattern[key])
        key = pattern_key(self.alpha_pattern, module_name)
        if key is not None:
            alpha = float(self.alpha_pattern[key])
        return r, alpha


COMMON_FIELDS = [f.name for f in dataclasses.fields(AdapterConfig) if f.name not in ("options", "method")]


def pattern_key(pattern: dict[str, Any], module_name: str) -> str | None:
    """PEFT's rank_pattern / alpha_pattern rule: the first key whose regex ``(.*\\.)?(KEY)$`` matches."""
    for key in pattern:
        if pattern_suffix_match(key, module_name):
            return key
    return None


def check_component_options(component: registry.Component, values: dict[str, Any], *,
                            prefix: str = "") -> dict[str, Any]:
    """A component's options checked against its options dataclass (types, ranges, choices); normalised copy."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or component.axis}: expected a mapping of {component.axis} options, "
                          f"got {type(values).__name__}")
    if component.options is None:
        if values:
            raise ConfigError(unknown_key(f"{prefix}{next(iter(values))}", [], f"{component.axis} option",
                                          f" (the {component.axis} '{component.name}' takes no options)"))
        return {}
    return check_fields(component.options, values, prefix=prefix, kind=f"{component.axis} option",
                        context=f" for the {component.axis} '{component.name}'")


def resolve_config(method_or_config: str | AdapterConfig, **options: Any) -> AdapterConfig:
    """Build a validated config from a method name (or a config) and keyword overrides."""
    return resolve_options(method_or_config, options)


def resolve_options(method_or_config: str | AdapterConfig, options: dict[str, Any], *,
                    prefix: str = "") -> AdapterConfig:
    """:func:`resolve_config` with the options as a dict; ``prefix`` (e.g. ``"adapter."``) goes in front of the
    option names in error messages (a recipe's section)."""
    if isinstance(method_or_config, AdapterConfig):
        base = copy.deepcopy(method_or_config)
        preset_defaults: dict[str, Any] = {}
        selected = {axis: getattr(base, axis) for axis in registry.AXES}
        component_values = {axis: dict(base.options.get(axis, {})) for axis in registry.AXES}
    elif isinstance(method_or_config, str):
        preset = registry.get_method(method_or_config)
        base = AdapterConfig(method=preset.name)
        preset_defaults = dict(preset.defaults)
        selected = {axis: getattr(preset, axis) for axis in registry.AXES}
        component_values = {axis: {} for axis in registry.AXES}
    else:
        raise ConfigError(
            f"wrap: expected a method name (one of {registry.methods()}) or an AdapterConfig, "
            f"got {type(method_or_config).__name__}"
        )

    options = dict(options)
    for axis in registry.AXES:
        if axis in options:
            value = options.pop(axis)
            value = "none" if value is None and axis == "schedule" else value
            value = "default" if value is None and axis == "init" else value
            value = check_value(f"{prefix}{axis}", value, str, Rule(expect=f"a registered {axis} name"))
            if value != selected[axis]:
                component_values[axis] = {}
            selected[axis] = value
    comps = {axis: registry.get_component(axis, selected[axis]) for axis in registry.AXES}
    for axis in registry.AXES:
        setattr(base, axis, selected[axis])
        component_values[axis] = {**comps[axis].default_options(), **component_values[axis]}

    def route(key: str, value: Any, *, from_preset: bool) -> None:
        if key in COMMON_FIELDS:
            setattr(base, key, copy.deepcopy(value))
            return
        owners = [axis for axis in registry.AXES if key in comps[axis].option_names()]
        if owners:
            for axis in owners:
                component_values[axis][key] = copy.deepcopy(value)
            return
        if from_preset:  # a preset default for a component the user swapped out
            return
        valid = sorted(set(COMMON_FIELDS) | {n for c in comps.values() for n in c.option_names()})
        from .aliases import suggestion  # 'rank' -> 'r': too short for difflib to propose

        close = [suggestion(key)] if suggestion(key) in valid else difflib.get_close_matches(key, valid, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"{prefix.rstrip('.') + ': ' if prefix else ''}unknown option '{key}' for method '{base.method}' "
            f"({', '.join(f'{a}={selected[a]}' for a in registry.AXES)}).{hint} Valid options: {', '.join(valid)}."
        )

    for key, value in preset_defaults.items():
        route(key, value, from_preset=True)
    for key, value in options.items():
        route(key, value, from_preset=False)
    base.options = {axis: component_values[axis] for axis in registry.AXES if component_values[axis]}
    validate(base, comps, prefix=prefix)
    return base


def validate(config: AdapterConfig, comps: dict[str, registry.Component] | None = None, *, prefix: str = "") -> None:
    """Check every field (types, ranges, finiteness: :mod:`peftkit.validation`), each selected component's
    options, and axis compatibility; raise one ConfigError naming the field. Normalises ``config`` in place."""
    comps = comps or {axis: registry.get_component(axis, getattr(config, axis)) for axis in registry.AXES}
    check_instance(config, prefix=prefix)
    for axis in registry.AXES:
        if config.options.get(axis):
            config.options[axis] = check_component_options(comps[axis], config.options[axis], prefix=prefix)
    for name in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, name):
            compile_pattern(key, f"{prefix}{name}: key")
    if not isinstance(config.targets, str) and not config.targets and not config.target_parameters:
        raise ConfigError(f"{prefix}targets: expected 'all-linear', a regex string or a non-empty list of module "
                          "names, got an empty list")
    arch = config.architecture
    for axis in ("init", "optimizer", "schedule"):
        allowed = comps[axis].architectures
        if allowed is not None and arch not in allowed:
            raise ConfigError(
                f"{axis} '{getattr(config, axis)}' is defined for the architectures {list(allowed)}, not for "
                f"'{arch}'; choose one of those architectures or another {axis}"
            )


# ---------------------------------------------------------------------- target matching
def _as_list(value: str | Iterable[str] | None) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    return list(value)


def _name_matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _matches(name: str, spec: str | list[str]) -> bool:
    if isinstance(spec, str):
        return compile_pattern(spec, "exclude").fullmatch(name) is not None
    return any(_name_matches(name, entry) for entry in spec)


def _close_names(entry: str, names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n})
    close = difflib.get_close_matches(entry.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.5)
    sample = close or leaves[:8]
    return ", ".join(sample)


def _class_name(model) -> str:
    """The user's model class, also through inject's view of a model (which is no model class of theirs)."""
    return getattr(model, "model_class_name", None) or type(model).__name__


def select_targets(model: nn.Module, config: AdapterConfig, supported: tuple[type, ...]) -> list[str]:
    """Names of the modules to adapt. Every requested entry (and the regex) must match something."""
    names = [n for n, _ in model.named_modules() if n]
    modules = dict(model.named_modules())
    skip = set()
    for keep in config.modules_to_save or []:
        skip |= {n for n in names
                 if _name_matches(n, keep) or any(n.startswith(m + ".") for m in names if _name_matches(m, keep))}
    unmatched_heads = [e for e in config.modules_to_save or [] if not any(_name_matches(n, e) for n in names)]
    if unmatched_heads:
        raise ConfigError(
            f"modules_to_save: {unmatched_heads} match no module of {_class_name(model)}. Close module names: "
            f"{_close_names(unmatched_heads[0], names)}. Fix or remove the unmatched entries."
        )
    targets = _as_list(config.targets)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        excluded = set()
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for n, m in modules.items():
            if output is not None and m is output:
                excluded.add(n)
        for head in CLASSIFIER_HEAD_NAMES:
            if isinstance(getattr(model, head, None), nn.Module):
                excluded |= {n for n in names if n == head or n.startswith(head + ".")}
        from .layer import linear_types  # "all-linear" means linear layers even for architectures that wrap more

        chosen = [n for n in names if isinstance(modules[n], supported) and isinstance(modules[n], linear_types())
                  and n not in excluded]
    elif isinstance(targets, str):
        regex = compile_pattern(targets, "targets")
        chosen = [n for n in names if regex.fullmatch(n)]
        if not chosen and not any(regex.fullmatch(p) for p, _ in parameter_candidates(model)):
            raise ConfigError(
                f"targets: the regex '{targets}' matches no module (it must match the whole dotted name). "
                f"Module names look like: {', '.join(names[:3] + names[-3:])}"
            )
    else:
        params = [p for p, _ in parameter_candidates(model)]
        unmatched = [e for e in targets if not any(_name_matches(n, e) for n in names)
                     and not any(_name_matches(p, e) for p in params)]
        if unmatched:
            raise ConfigError(
                f"targets: {unmatched} match no module of {_class_name(model)}. Close module names: "
                f"{_close_names(unmatched[0], names)}. Fix or remove the unmatched entries."
            )
        chosen = [n for n in names if any(_name_matches(n, e) for e in targets)]
    if config.exclude:
        exclude = _as_list(config.exclude)
        if not isinstance(exclude, str):
            param_names = [p for p, _ in parameter_candidates(model)]
            unmatched = [e for e in exclude if not any(_name_matches(n, e) for n in names)
                         and not any(_name_matches(p, e) for p in param_names)]
            if unmatched:
                raise ConfigError(
                    f"exclude: {unmatched} match no module or parameter. Close module names: "
                    f"{_close_names(unmatched[0], names)}"
                )
        chosen = [n for n in chosen if not _matches(n, exclude)]
    # A router (of an MoE block) and a module whose own weight is one 2-D matrix but that is no linear layer are
    # adapted through that weight, as a parameter (select_parameters, PEFT's target_parameters): whatever their
    # forward returns (Llama 4's router returns a tuple), the update reaches the weight it reads.
    routers = router_names(model)
    chosen = [n for n in chosen if n not in skip and n not in routers]
    wrong_type = [n for n in chosen if not isinstance(modules[n], supported) and not _bare_weight(modules[n])]
    if wrong_type:
        kinds = sorted({type(modules[n]).__name__ for n in wrong_type})
        raise ConfigError(
            f"targets: {wrong_type[:4]} are {kinds}, which the '{config.architecture}' architecture cannot wrap "
            f"(it wraps {[t.__name__ for t in supported]}). Narrow the targets to those layers."
        )
    chosen = [n for n in chosen if isinstance(modules[n], supported)]
    chosen_params = select_parameters(model, config)
    if not chosen and not chosen_params:
        raise ConfigError("targets: nothing left to adapt after exclusions; widen targets or shrink exclude")
    adapted = chosen + [p for p, _ in chosen_params]
    for name, pattern in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        for key in pattern:
            if not any(pattern_suffix_match(key, n, name) for n in adapted):
                raise ConfigError(
                    f"{name}: key '{key}' matches no adapted module (keys are regexes matched against the end of "
                    f"the module name, e.g. 'q_proj' or 'layers\\.1\\..*q_proj'). Adapted modules look like: "
                    f"{', '.join(adapted[:3])}"
                )
    return chosen


# ---------------------------------------------------------------------- parameter targets (fused experts)
_VIEW_SKIP = ("base_layer", "adapters", "original_module", "modules_to_save")


def _bare_weight(module: nn.Module) -> bool:
    """A module that is no linear layer but whose own ``weight`` is one 2-D matrix (a router's)."""
    from .layer import linear_types

    if isinstance(module, linear_types() + (nn.Embedding, nn.modules.conv._ConvNd)) or hasattr(module, "adapters"):
        return False
    weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    return (weight is not None and weight.is_floating_point()
            and len(getattr(weight, "ds_shape", weight.shape)) == 2 and not list(module.children()))


def _is_expert_parameter(module: nn.Module, param: nn.Parameter) -> bool:
    """A fused expert stack: a 3-D floating-point parameter (experts, out, in)."""
    if isinstance(module, nn.modules.conv._ConvNd) or type(module).__module__.startswith("torch.nn"):
        return False  # a 1-D convolution's kernel (out, in, k) is no expert stack
    return param is not None and param.is_floating_point() and len(getattr(param, "ds_shape", param.shape)) == 3


def parameter_candidates(model: nn.Module) -> list[tuple[str, str]]:
    """(full parameter name, owner module name) of every parameter that can be adapted as a parameter: fused 3-D
    expert stacks, and the 2-D weight of bare-weight modules (routers), in model order."""
    out = []
    routers = router_names(model)
    for name, module in model.named_modules():
        if name and any(seg in _VIEW_SKIP for seg in name.split(".")):
            continue
        owner = module
        while hasattr(owner, "base_layer") and hasattr(owner, "adapters"):  # an adapter layer: look through it
            owner = owner.base_layer
        for pname, param in owner._parameters.items():
            if _is_expert_parameter(owner, param) or (pname == "weight" and (_bare_weight(owner) or name in routers)):
                out.append((f"{name}.{pname}" if name else pname, name))
    return out


def moe_blocks(model: nn.Module) -> dict[str, int]:
    """Path of every block that holds a fused expert stack (the stack owner's parent) -> its number of experts."""
    blocks = {}
    for name, module in model.named_modules():
        if name and any(seg in _VIEW_SKIP for seg in name.split(".")):
            continue
        owner = _unwrapped(module)
        for param in owner._parameters.values():
            if _is_expert_parameter(owner, param):
                blocks[name.rpartition(".")[0]] = int(getattr(param, "ds_shape", param.shape)[0])
    return blocks


def router_names(model: nn.Module) -> set[str]:
    """The routers of the model's MoE blocks: inside a block that holds a fused expert stack of E experts, a linear
    layer or bare 2-D weight with E outputs (Qwen3-MoE's ``mlp.gate``, Llama 4's ``feed_forward.router``, JetMoE's
    ``mlp.router.layer``), or with one output: the scalar gate of a shared expert (Qwen2-MoE's
    ``mlp.shared_expert_gate``, which no rank above 1 fits). ``all-linear`` leaves them frozen (a router is no
    expert); naming one adapts its weight."""
    blocks = moe_blocks(model)
    if not blocks:
        return set()
    found = set()
    for name, module in model.named_modules():
        if not name or any(seg in _VIEW_SKIP for seg in name.split(".")):
            continue
        module = _unwrapped(module)
        weight = module._parameters.get("weight")
        if weight is None or len(getattr(weight, "ds_shape", weight.shape)) != 2:
            continue
        if isinstance(module, (nn.Embedding, nn.modules.conv._ConvNd)) or module._parameters.get("weight") is None:
            continue
        rows = int(getattr(weight, "ds_shape", weight.shape)[0])
        if any((not block or name.startswith(block + ".")) and rows in (experts, 1)
               for block, experts in blocks.items()):
            found.add(name)
    return found


def select_parameters(model: nn.Module, config: AdapterConfig) -> list[tuple[str, str]]:
    """(full parameter name, owner module name) of the parameters to adapt, in model order: those named in
    ``target_parameters`` (PEFT's rule: the full name or a dotted suffix), those ``targets`` names (a list entry or
    the regex matching the parameter's full name), the 2-D weight of a bare-weight module ``targets`` selected (a
    router), and every fused expert stack under ``all-linear``; minus ``exclude`` and ``modules_to_save``."""
    candidates = parameter_candidates(model)
    full_names = [p for p, _ in candidates]
    picked: set[str] = set()
    explicit = list(config.target_parameters or [])
    unmatched = [e for e in explicit if not any(_name_matches(p, e) for p in full_names)]
    if unmatched:
        shown = ", ".join(full_names[:4]) or "none (the model has no fused expert parameters)"
        raise ConfigError(f"target_parameters: {unmatched} match no parameter of {_class_name(model)}; parameters that "
                          f"can be targeted look like: {shown}. Fix or remove the unmatched entries.")
    picked |= {p for p in full_names if any(_name_matches(p, e) for e in explicit)}
    targets = _as_list(config.targets)
    modules = dict(model.named_modules())
    all_linear = isinstance(targets, str) and targets.lower() == ALL_LINEAR
    if all_linear:  # every fused expert stack; routers' weights (the other candidates) stay frozen
        for full, owner in candidates:
            module = _unwrapped(modules[owner])
            if _is_expert_parameter(module, module._parameters[full.rsplit(".", 1)[-1]]):
                picked.add(full)
    elif isinstance(targets, str):
        regex = compile_pattern(targets, "targets")
        picked |= {p for p in full_names if regex.fullmatch(p)}
    else:
        picked |= {p for p in full_names if any(_name_matches(p, e) for e in targets)}
    if not all_linear:
        selected = ([n for n in modules if n and compile_pattern(targets, "targets").fullmatch(n)]
                    if isinstance(targets, str)
                    else [n for n in modules if n and any(_name_matches(n, e) for e in targets)])
        routers = router_names(model)
        for name in selected:
            if name in routers or _bare_weight(_unwrapped(modules[name])):
                picked.add(f"{name}.weight")
    if config.exclude:
        exclude = _as_list(config.exclude)
        picked = {p for p in picked if not _matches(p, exclude) and not _matches(p.rsplit(".", 1)[0], exclude)}
    for keep in config.modules_to_save or []:
        picked = {p for p in picked if not any(_name_matches(m, keep) for m in _prefixes(p))}
    return [(p, owner) for p, owner in candidates if p in picked]


def _unwrapped(module: nn.Module) -> nn.Module:
    while hasattr(module, "base_layer") and hasattr(module, "adapters"):
        module = module.base_layer
    return module


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]
