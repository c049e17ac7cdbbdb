"""The registry: the four axes (architecture, init, optimizer, schedule) and the method presets.

A method is a preset: one component per axis plus default option values. Components register under a
name on their axis; a preset names one component per axis. Third-party packages register through the
entry-point group ``peftkit.adapters`` (each entry point names a module; importing it registers).

``adapters/`` (shipped as ``peftkit.adapters``) is scanned once, lazily, on first lookup, so a new file
dropped there is found without editing any list.

What a component on each axis provides is stated as typed Protocols in :mod:`peftkit.contracts`; a component
reads its options as the filled dataclass ``config.axis_options(axis)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from .contracts import AXES, Init, OptimizerFactory, ScheduleFactory
from .errors import ConfigError

# What each decorator takes and gives back unchanged (its contract: peftkit/contracts.py).
ArchitectureT = TypeVar("ArchitectureT", bound=type)
InitT = TypeVar("InitT", bound=Init)
OptimizerT = TypeVar("OptimizerT", bound=OptimizerFactory)
ScheduleT = TypeVar("ScheduleT", bound=ScheduleFactory)


@dataclass(frozen=True)
class Component:
    """One point on one axis.

    ``options`` is a dataclass type whose fields are the component's own options (with defaults; a config's
    filled instance: ``AdapterConfig.axis_options(axis)``); ``obj`` is what the axis needs, as the Protocols of
    ``peftkit/contracts.py`` state it: a layer class (``Architecture``: an ``AdapterLayer`` subclass), a function
    ``init(model, layers, config, data)`` (``Init``), a factory ``build(model, lr, config, **options)``
    (``OptimizerFactory``), a factory ``build(model, config) -> Schedule`` (``ScheduleFactory``).
    """

    axis: str
    name: str
    obj: Any
    options: type | None = None
    description: str = ""
    needs_data: bool = False
    # For optimizers and schedules: the architectures they are defined for (None: any).
    architectures: tuple[str, ...] | None = None
    # Whether it applies per expert matrix of a fused expert parameter (inject refuses such targets otherwise).
    expert_parameters: bool = True
    # For data-driven inits whose statistic depends on how the examples are grouped into batches (an incremental
    # PCA, not a token-weighted sum): the training loop hands them one batch per optimizer step, the step's
    # micro-batches together, so every grad_accum split of the same global batch starts from the same adapter.
    per_step_batches: bool = False
    # For architectures with a PEFT on-disk format: PEFT's ``peft_type`` ("LORA", "HRA"); saved adapters of that
    # type are read by this architecture, and its layers save in that format. None: peftkit's own format.
    peft_type: str | None = None
    # A boolean field of PEFT's config that selects this architecture among those of the same ``peft_type``
    # ("use_dora": a LORA folder with use_dora true is DoRA); None: the type's plain reader.
    peft_flag: str | None = None

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.options)] if self.options else []

    def default_options(self) -> dict[str, Any]:
        if self.options is None:
            return {}
        out = {}
        for f in dataclasses.fields(self.options):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
        return out


@dataclass(frozen=True)
class LRConvention:
    """A preset's learning-rate convention, as a ratio to the rate one would give plain LoRA.

    ``kind`` is ``"lora"`` (tuned like LoRA) or ``"full-ft"`` (its first steps move like full fine-tuning, so it
    runs at about the full fine-tuning rate); ``ratio`` is lr / lr_LoRA from its paper or authors' settings
    (unitless); ``source`` says where the number comes from (or that the spec is silent).
    """

    kind: str = "lora"
    ratio: float = 1.0
    source: str = "the spec gives no rate relative to LoRA's; LoRA-like assumed"

    def __post_init__(self) -> None:
        if self.kind not in ("lora", "full-ft"):
            raise ConfigError(f"lr_convention.kind: expected 'lora' or 'full-ft', got {self.kind!r}")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not self.ratio > 0:
            raise ConfigError(f"lr_convention.ratio: expected a positive number (lr / LoRA's lr), got {self.ratio!r}")


@dataclass(frozen=True)
class Method:
    """A preset: a component per axis and default values for common or component options."""

    name: str
    architecture: str
    init: str = "default"
    optimizer: str = "adamw"
    schedule: str = "none"
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    # True for methods whose init is itself a step (LoRA-One): the conformance suite then does not expect
    # the wrapped model to reproduce the base model's output at init.
    changes_output_at_init: bool = False
    lr_convention: LRConvention = field(default_factory=LRConvention)


_components: dict[str, dict[str, Component]] = {axis: {} for axis in AXES}
_methods: dict[str, Method] = {}
_discovered = False


def _register_component(component: Component) -> None:
    table = _components[component.axis]
    if component.name in table and table[component.name].obj is not component.obj:
        existing = table[component.name].obj
        # Re-importing the same module (e.g. editable reloads) re-registers the same qualified object.
        if getattr(existing, "__qualname__", None) != getattr(component.obj, "__qualname__", None):
            raise ConfigError(
                f"{component.axis} '{component.name}' is already registered by {existing!r}; "
                "choose another name for the new one"
            )
    table[component.name] = component


def architecture(name: str, *, options: type | None = None, description: str = "",
                 peft_type: str | None = None,
                 peft_flag: str | None = None) -> Callable[[ArchitectureT], ArchitectureT]:
    """Class decorator: register an ``AdapterLayer`` subclass as an architecture (contract:
    ``peftkit.contracts.Architecture``).

    ``peft_type``: PEFT's name of the format the layer saves in, when PEFT has one ("LORA", "HRA"); the class
    then carries it as ``peft_type``, and folders of that type load into this architecture. ``peft_flag``: the
    boolean config field that selects this architecture among readers of the same type (DoRA: "use_dora").

    Raises:
        ConfigError: another architecture is already registered under ``name``.
    """

    def deco(cls: ArchitectureT) -> ArchitectureT:
        cls.architecture_name = name
        if peft_type is not None:
            cls.peft_type = peft_type
        _register_component(Component("architecture", name, cls, options, description, peft_type=peft_type,
                                      peft_flag=peft_flag))
        return cls

    return deco


def peft_architectures() -> dict[str, str]:
    """``{peft_type: architecture name}`` for every registered architecture that declares a PEFT format, in
    registration order (the first to declare a type reads it)."""
    discover()
    out: dict[str, str] = {}
    for name, component in _components["architecture"].items():
        if component.peft_type is not None and component.peft_flag is None:
            out.setdefault(component.peft_type, name)
    return out


def architecture_for_peft_type(peft_type: Any, peft_config: Any = None) -> str | None:
    """The registered architecture that reads PEFT adapters of ``peft_type`` (e.g. "LORA" -> "lora"); with the
    folder's config (a dict or PEFT's config object), one whose ``peft_flag`` is set there ("use_dora" -> "dora")
    comes first. None when no architecture declares that format."""
    if not isinstance(peft_type, str):
        return None
    readers = peft_architectures()  # discovers the adapters
    if peft_config is not None:
        for name, component in _components["architecture"].items():
            if component.peft_type == peft_type and component.peft_flag is not None:
                flag = (peft_config.get(component.peft_flag) if isinstance(peft_config, dict)
                        else getattr(peft_config, component.peft_flag, None))
                if flag:
                    return name
    return readers.get(peft_type)


def init(name: str, *, options: type | None = None, description: str = "", needs_data: bool = False,
         architectures: tuple[str, ...] | None = None, expert_parameters: bool | None = None,
         per_step_batches: bool = False) -> Callable[[InitT], InitT]:
    """Function decorator: register ``fn(model, layers, config, data) -> None`` as an initialization (contract:
    ``peftkit.contracts.Init``).

    ``expert_parameters``: whether it handles expert-parameter layers (``peftkit.expert_layer.ExpertParameterLayer``,
    several matrices per layer); by default only an init that reads no data (it only sees the layers' own
    factors) is taken to. ``per_step_batches``: its result depends on the grouping of examples into batches, so
    ``peftkit train`` gives it one batch per optimizer step (see ``Component.per_step_batches``).

    Raises:
        ConfigError: another init is already registered under ``name``.
    """

    def deco(fn: InitT) -> InitT:
        experts = (not needs_data) if expert_parameters is None else expert_parameters
        _register_component(Component("init", name, fn, options, description, needs_data, architectures, experts,
                                      per_step_batches))
        return fn

    return deco


def optimizer(name: str, *, options: type | None = None, description: str = "",
              architectures: tuple[str, ...] | None = None) -> Callable[[OptimizerT], OptimizerT]:
    """Function decorator: register ``build(model, lr, config, **options) -> torch.optim.Optimizer`` (contract:
    ``peftkit.contracts.OptimizerFactory``); ``architectures``: the ones it is defined for (None: any).

    Raises:
        ConfigError: another optimizer is already registered under ``name``.
    """

    def deco(fn: OptimizerT) -> OptimizerT:
        _register_component(Component("optimizer", name, fn, options, description, False, architectures))
        return fn

    return deco


def schedule(name: str, *, options: type | None = None, description: str = "",
             architectures: tuple[str, ...] | None = None,
             expert_parameters: bool = True) -> Callable[[ScheduleT], ScheduleT]:
    """Function decorator: register ``build(model, config) -> Schedule`` as a schedule (contract:
    ``peftkit.contracts.ScheduleFactory``; ``expert_parameters``: whether it works on expert-parameter layers).

    Raises:
        ConfigError: another schedule is already registered under ``name``.
    """

    def deco(fn: ScheduleT) -> ScheduleT:
        _register_component(Component("schedule", name, fn, options, description, False, architectures,
                                      expert_parameters))
        return fn

    return deco


# The optimizer a method gets when it names none: AdamW on every trainable tensor, which is also what an outside
# loop (transformers' Trainer) builds when it is given no optimizer.
PLAIN_OPTIMIZER = "adamw"


def register_method(name: str, *, architecture: str, init: str = "default", optimizer: str = PLAIN_OPTIMIZER,
                    schedule: str = "none", defaults: dict[str, Any] | None = None,
                    description: str = "", changes_output_at_init: bool = False,
                    lr_convention: LRConvention | None = None) -> Method:
    """Register a preset (a registered method name); ``lr_convention`` (default: LoRA-like) is what
    ``peftkit.optimizer(model)`` without ``lr`` uses."""
    method = Method(name, architecture, init, optimizer, schedule, dict(defaults or {}), description,
                    changes_output_at_init, lr_convention or LRConvention())
    if name in _methods and _methods[name] != method:
        raise ConfigError(f"method '{name}' is already registered; choose another name")
    _methods[name] = method
    return method


def discover() -> None:
    """Import every module of ``peftkit.adapters`` and every ``peftkit.adapters`` entry point, once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    # The generic components (adamw, the default init, no schedule) are registered by peftkit/components.py,
    # which ``import peftkit`` (and so any import of this module) has already run: the registry imports neither
    # the optimizer nor the schedule machinery.
    import peftkit.adapters as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")
    try:
        from importlib.metadata import entry_points

        for entry in entry_points(group="peftkit.adapters"):
            try:
                entry.load()
            except Exception as exc:  # a broken plugin must not break the library
                warnings.warn(f"peftkit: could not load the plugin '{entry.name}' ({entry.value}): {exc}")
    except Exception:  # pragma: no cover - very old importlib.metadata
        pass


def methods() -> list[str]:
    """The registered method names, sorted."""
    discover()
    return sorted(_methods)


def method_descriptions() -> dict[str, str]:
    """Each registered method's one-line description (what ``peftkit methods`` prints), by name."""
    discover()
    return {name: _methods[name].description for name in sorted(_methods)}


def get_method(name: str) -> Method:
    """The preset registered as ``name``; an unknown name is a ConfigError with a did-you-mean."""
    discover()
    if not isinstance(name, str) or name not in _methods:
        raise ConfigError(_unknown("method", name, list(_methods)))
    return _methods[name]


# (axis, name) -> the module that registered that component where a loaded adapter was saved (its peftkit.json
# "plugins"): an unknown-component error then names the plugin to install.
_noted_plugins: dict[tuple[str, str], str] = {}


def note_plugin(axis: str, name: str, module: str) -> None:
    """Remember that component ``name`` on ``axis`` came from the plugin module ``module`` (read from a checkpoint)."""
    _noted_plugins[(axis, name)] = module


def get_component(axis: str, name: str) -> Component:
    """The component ``name`` on ``axis`` (one of ``AXES``); an unknown name is a ConfigError with a did-you-mean,
    or naming the plugin module that registered it when a loaded adapter was saved."""
    discover()
    table = _components[axis]
    if not isinstance(name, str) or name not in table:
        module = _noted_plugins.get((axis, name)) if isinstance(name, str) else None
        if module is not None:
            raise ConfigError(
                f"{axis} '{name}' was registered by the Python module '{module}' (a peftkit plugin) when this adapter "
                f"was saved, and it is not loaded here: install the package that provides it (plugins register "
                f"through the 'peftkit.adapters' entry point) or import {module} first")
        raise ConfigError(_unknown(axis, name, list(table)))
    return table[name]


def components(axis: str) -> dict[str, Component]:
    """Every component registered on ``axis``, by name (a copy)."""
    discover()
    return dict(_components[axis])


def _unknown(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown {kind} '{name}'.{hint} Registered: {', '.join(sorted(known))}."
