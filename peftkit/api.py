"""The public API (re-exported by ``peftkit``): module-level functions on the user's own model object."""

from __future__ import annotations

import contextlib
import difflib
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn

from . import checkpoint, registry

# The generic components (adamw, the default init, the schedule none) register on import.
from . import components as _components  # noqa: F401
from . import lr as lr_rules
from .config import AdapterConfig, check_component_options, resolve_config
from .errors import ConfigError, StateError
from .inject import (
    GATE_ATTR,
    adapter_layers,
    drop_adapter,
    inject,
    parameter_flags,
    remove,
    restore_parameter_flags,
    set_active,
    state_of,
)
from .inject import disabled as disabled  # public: peftkit.disabled
from .optim import check_lr
from .report import trainable_parameters as trainable_parameters  # public: peftkit.trainable_parameters
from .schedule import Schedule
from .validation import Rule, check_value


def wrap(model: nn.Module, method_or_config: str | AdapterConfig = "lora", *, data: Iterable | None = None,
         adapter_name: str = "default", **options: Any) -> nn.Module:
    """Inject adapters into ``model`` in place, freeze the base, run the init; returns the same model.

    ``method_or_config`` is a method name, an ``AdapterConfig``, or PEFT's ``LoraConfig`` / ``HRAConfig``.
    ``options`` are the common options (``r``, ``alpha``, ``targets``, ``exclude``, ``dropout``, ``rslora``,
    ``rank_pattern``, ``alpha_pattern``, ``modules_to_save``, ``seed``; PEFT's names ``lora_alpha``,
    ``target_modules``, ``lora_dropout``, ``use_rslora``, ``exclude_modules`` too), an axis override (``init=``,
    ``optimizer=``, ``schedule=``, ``architecture=``) or an option of one of the selected components.
    ``data`` (an iterable of batches, dicts of tensors as the model takes them: ``input_ids``, ``attention_mask``,
    ``labels`` of shape ``(batch, seq)``) is needed by data-driven inits.

    Returns:
        The same ``model``, its targets replaced by adapter layers, the base frozen, the adapter trainable
            and initialised (LoRA forms: ``A`` ``(r, in)``, ``B`` ``(out, r)``).

    Raises:
        ConfigError: an unknown method, option or axis component, a value of the wrong type or range, targets that
            match no module, a component not defined for the selected architecture, or ``data`` missing for a
            data-driven init; one message names the field. Nothing is injected then.
        StateError: the model already holds HF PEFT adapters, or an adapter called ``adapter_name`` exists.
    """
    pending = inject_adapters(model, method_or_config, adapter_name=adapter_name, data_given=data is not None,
                              **options)
    pending.run(data)
    return model


class PendingInit:
    """The init of adapters already injected, to run later (``run(data)``), e.g. once the base is sharded and on
    its device: the init's forwards then go through the sharded model and its statistics are reduced where the
    model trains. It draws from the random stream ``wrap`` would have given it, so the adapters are the ones
    ``wrap`` builds in one call."""

    def __init__(self, model: nn.Module, layers: dict, config: AdapterConfig, adapter_name: str, init: Any,
                 flags: Any, rng_state: torch.Tensor) -> None:
        self.model, self.layers, self.config, self.adapter_name = model, layers, config, adapter_name
        self.init, self.flags, self.rng_state = init, flags, rng_state
        self.needs_data = init.needs_data

    def run(self, data: Iterable | None = None) -> nn.Module:
        if self.init.needs_data and data is None:
            self.abandon()
            raise ConfigError(
                f"data: the '{self.config.init}' initialisation estimates from batches; pass data=<an iterable of "
                "batches (dicts of input_ids, attention_mask, labels)> to peftkit.wrap")
        torch_state = torch.random.get_rng_state()
        torch.random.set_rng_state(self.rng_state)
        try:
            self.init.obj(self.model, self.layers, self.config, data)
        except BaseException:
            self.abandon()
            raise
        finally:
            torch.random.set_rng_state(torch_state)
        _weight_gate(self.model)
        from .report import log_summary

        log_summary(self.model, self.adapter_name)  # never a silent attention-only adapter: what was adapted, skipped
        return self.model

    def abandon(self) -> None:
        """Remove the injected adapter and restore the base's parameter flags."""
        drop_adapter(self.model, self.adapter_name)
        restore_parameter_flags(self.flags)


def inject_adapters(model: nn.Module, method_or_config: str | AdapterConfig = "lora", *,
                    adapter_name: str = "default", data_given: bool | None = None, **options: Any) -> PendingInit:
    """The first half of :func:`wrap`: inject the adapters (initialised as the method's init starts them) and
    freeze the base; returns the :class:`PendingInit` whose ``run(data)`` completes ``wrap``."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"wrap: expected a torch.nn.Module (a Hugging Face model), got {type(model).__name__}")
    foreign = next(((n, m) for n, m in model.named_modules() if type(m).__module__.split(".")[0] == "peft"), None)
    if foreign is not None:
        # peftkit's layers would nest inside PEFT's lora_A / lora_B and train those instead of the base.
        name, module = foreign
        raise StateError(f"wrap: the model already holds HF PEFT adapters ({type(module).__name__} at "
                         f"'{name or 'the top'}'); wrap the plain base model, or fold PEFT's adapters in first "
                         "(model = model.merge_and_unload()), or read a saved PEFT adapter with peftkit.load")
    from .aliases import apply_aliases
    from .peft_config import from_peft_config, is_peft_config

    if is_peft_config(method_or_config):  # PEFT's LoraConfig / HRAConfig: the adapter get_peft_model builds
        method_or_config = from_peft_config(method_or_config)
    options = apply_aliases(options)  # PEFT's option names (target_modules, lora_alpha ...) are ours too
    config = resolve_config(method_or_config, **options)
    if config.modules_to_save is None and "modules_to_save" not in options:
        # A classification model's head is new and random: it must train in full (PEFT does this for
        # task_type SEQ_CLS). Pass modules_to_save=[] to keep it frozen.
        heads = classification_heads(model)
        if heads:
            config.modules_to_save = heads
    init = registry.get_component("init", config.init)
    if init.needs_data and data_given is False:
        raise ConfigError(
            f"data: the '{config.init}' initialisation estimates from batches; pass data=<an iterable of batches "
            "(dicts of input_ids, attention_mask, labels)> to peftkit.wrap"
        )
    if not init.needs_data and data_given:
        warnings.warn(f"wrap: the '{config.init}' initialisation uses no data; the data argument is ignored",
                      stacklevel=3)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)  # adapters are reproducible and identical on every process by construction
    flags = parameter_flags(model)
    try:
        layers = inject(model, config, adapter_name)
        after_inject = torch.random.get_rng_state()
    finally:
        torch.random.set_rng_state(torch_state)
    return PendingInit(model, layers, config, adapter_name, init, flags, after_inject)


def classification_heads(model: nn.Module) -> list[str]:
    """The head of a ``*ForSequenceClassification`` / ``*ForTokenClassification`` model (``score`` or
    ``classifier``)."""
    if not type(model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification")):
        return []
    from .config import CLASSIFIER_HEAD_NAMES

    return [name for name in CLASSIFIER_HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)][:1]


def _active_config(model: nn.Module) -> AdapterConfig:
    state = state_of(model)
    return state.configs[state.active[0]]


def optimizer(model: nn.Module, lr: float | str | None = None, *, base_lr: float | None = None,
              **options: Any) -> torch.optim.Optimizer:
    """The adapter-aware optimizer of the model's method (a ``torch.optim.Optimizer``).

    ``lr`` left out (or ``"auto"``): the method's convention times ``base_lr``, the rate you would give plain
    LoRA (default ``peftkit.lr.DEFAULT_BASE_LR`` = 2e-4); compositions are capped so the first step stays
    bounded (peftkit/lr.py). An explicit ``lr`` far from that convention warns (``LRConventionWarning``).
    The choice is kept on the optimizer as ``optimizer.peftkit_lr`` (a ``peftkit.lr.LRChoice``).
    ``options`` override the optimizer's own options (e.g. ``weight_decay``, ``loraplus_lr_ratio``);
    ``name=`` picks another registered optimizer for this call.

    Returns:
        A ``torch.optim.Optimizer`` over every trainable tensor (groups carry ``role`` and ``lr_ratio``).

    Raises:
        ConfigError: a non-positive or non-finite ``lr`` / ``base_lr``, an unknown optimizer or option, an option
            out of range, an optimizer not defined for the model's architecture, or no trainable parameter.
        StateError: the model holds no peftkit adapter.
    """
    auto = lr is None or lr == "auto"
    if not auto:
        lr = check_lr(lr)
    if base_lr is not None:
        try:
            check_lr(base_lr)
        except ConfigError:
            raise ConfigError(f"base_lr: expected a positive learning rate (the rate you would give plain LoRA), "
                              f"got {base_lr!r}; e.g. base_lr=2e-4") from None
    config = _active_config(model)
    name = check_value("name", options.pop("name", None), str | None,
                       Rule(expect="a registered optimizer name or None")) or config.optimizer
    component = registry.get_component("optimizer", name)
    valid = set(component.option_names())
    unknown = [k for k in options if k not in valid]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(valid), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"optimizer: unknown option '{unknown[0]}' for the '{name}' optimizer.{hint} "
            f"Valid options: {', '.join(sorted(valid)) or 'none'}."
        )
    # Types, ranges and finiteness, before the optimizer allocates any state.
    options = check_component_options(component, options)
    if component.architectures is not None and config.architecture not in component.architectures:
        raise ConfigError(
            f"optimizer '{name}' is defined for {list(component.architectures)} adapters, not '{config.architecture}'"
        )
    if name != config.optimizer:
        config = AdapterConfig.from_dict({**config.to_dict(), "optimizer": name,
                                          "options": {**config.options, "optimizer": component.default_options()}})
    def build(rate: float) -> torch.optim.Optimizer:
        return component.obj(model, rate, config, **options)

    if auto:
        built, choice = lr_rules.auto_lr(model, config, build, base_lr)
    else:
        built = build(lr)
        choice = lr_rules.check_convention(model, config, built, float(lr), base_lr)
        choice.explicit = float(lr)
    built.peftkit_lr = choice
    return built


def callbacks(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Schedule:
    """The method's schedule: ``on_step(step, total_steps)``; also a transformers ``TrainerCallback``.

    Pass the training ``optimizer`` (or call ``attach_optimizer`` later) for schedules that edit its state
    (ElaLoRA resets the moments of the slots it prunes or grows); the Trainer passes it by itself.

    Returns:
        The schedule, to call as ``on_step(step, total_steps)`` after each optimizer step (``step`` from 1)
            or to pass as ``Trainer(callbacks=[...])``; its ``state_dict()`` belongs in a training checkpoint.

    Raises:
        ConfigError: the schedule's options do not fit the model.
        StateError: the model holds no peftkit adapter.
    """
    config = _active_config(model)
    schedule = registry.get_component("schedule", config.schedule).obj(model, config)
    if optimizer is not None:
        schedule.attach_optimizer(optimizer)
    return schedule


def save(model: nn.Module, directory: str | os.PathLike, adapter_names: list[str] | None = None) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's format where the method allows),
    peftkit's sidecar ``peftkit.json`` and a model card ``README.md`` (kept as it is if the user wrote it).

    Each file is written atomically; tensors in the adapter's dtype, with PEFT's key names; an adapter other
    than ``default`` goes to ``directory/<name>/`` (as PEFT). ``adapter_names``: None saves all.

    Raises:
        ConfigError: an adapter name the model does not hold, or an adapter mixing saved formats.
        CheckpointError: ``directory`` exists and is not a folder, or it cannot be written.
        StateError: the model holds no peftkit adapter.
    """
    from .hub import write_model_card

    checkpoint.save(model, directory, adapter_names)
    write_model_card(model, directory)


def load(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
         trainable: bool = False, *, revision: str | None = None, token: bool | str | None = None) -> nn.Module:
    """Inject and fill the adapter saved in ``directory`` (by peftkit or by PEFT; a folder or a Hub id, read at
    ``revision`` with ``token``) into a plain base model.

    ``trainable=True`` keeps training it; False leaves it frozen. Returns the same ``model``.

    Raises:
        CheckpointError: the folder is missing or unreadable, the saved tensors do not fit this model (a missing
            key, a wrong shape, parameters the model lacks), or the saved format is one peftkit does not read.
        ConfigError: the saved config names an unknown method, component or plugin (the message names the plugin
            module to install), or holds an invalid value.
        StateError: ``adapter_name`` already exists in ``model``.
    """
    checkpoint.load(model, directory, adapter_name=adapter_name, trainable=trainable, revision=revision, token=token)
    _weight_gate(model)
    return model


def export(model_or_dir: nn.Module | str | os.PathLike, directory: str | os.PathLike, to: str = "peft",
           base_model: nn.Module | None = None, *, format: str | None = None) -> Path:
    """Write the adapter for a serving engine: ``to="peft"`` (default) PEFT's own format of the method (LoRA, HRA),
    ``to="lora"`` a plain PEFT LoRA for every method (vLLM, SGLang, llama.cpp's converter), ``to="gguf"`` a
    llama.cpp / Ollama LoRA adapter file. Exporting a saved folder of a method that is not a LoRA already needs
    ``base_model`` (its low-rank form depends on the base weights). ``format`` is the former name of ``to``.

    Returns:
        The path written (the folder, or the ``.gguf`` file for ``to="gguf"``).

    Raises:
        ConfigError: an unknown ``to``, the output folder being the adapter's own folder, or ``base_model``
            missing where the LoRA form needs the base weights.
        CheckpointError: the input folder is unreadable or the output cannot be written.
    """
    if format is not None:
        to = format
    if to == "gguf":  # a file format of its own (peftkit.gguf builds on checkpoint's LoRA export)
        from .gguf import export_gguf
        from .validation import check_output_dir

        check_output_dir(directory, "directory")
        return export_gguf(model_or_dir, directory, base_model=base_model)
    return checkpoint.export(model_or_dir, directory, to, base_model=base_model)


class _WeightGate:
    """Makes merge / unmerge atomic to forward passes in other threads (a model serving requests while another
    thread merges): a forward of the wrapped model waits while the base weights change, and merge / unmerge wait
    until the forwards in flight have returned. A merge from inside a forward of the same thread is refused
    (it would wait for itself). Forwards of a submodule called directly are not counted."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._forwards: dict[int, int] = {}  # thread id -> forwards in flight
        self._changing: int | None = None  # the thread changing the weights

    def enter(self, module, args):
        me = threading.get_ident()
        with self._cond:
            while self._changing is not None and self._changing != me:
                self._cond.wait()
            self._forwards[me] = self._forwards.get(me, 0) + 1

    def leave(self, module, args, output):
        me = threading.get_ident()
        with self._cond:
            left = self._forwards.get(me, 1) - 1
            if left:
                self._forwards[me] = left
            else:
                self._forwards.pop(me, None)
            self._cond.notify_all()

    @contextlib.contextmanager
    def changing(self, what: str) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if me in self._forwards:
                raise StateError(f"{what}: called during a forward pass of this model in the same thread; call it "
                                 "before or after the forward")
            while self._changing is not None or self._forwards:
                self._cond.wait()
            self._changing = me
        try:
            yield
        finally:
            with self._cond:
                self._changing = None
                self._cond.notify_all()

    def __deepcopy__(self, memo) -> "_WeightGate":  # a copied model gets its own gate (locks do not copy)
        return _WeightGate()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def _weight_gate(model: nn.Module) -> _WeightGate:
    """The model's gate, its hooks registered on first use (wrap and load register it)."""
    gate = model.__dict__.get(GATE_ATTR)
    if gate is None:
        gate = model.__dict__[GATE_ATTR] = _WeightGate()
        model.register_forward_pre_hook(gate.enter)
        model.register_forward_hook(gate.leave, always_call=True)
    return gate


def merge(model: nn.Module, safe: bool = False) -> nn.Module:
    """Fold the active adapters into the base weights (the adapters stay, ready to ``unmerge``).

    Thread-safe against forward passes of ``model`` in other threads: they wait while the weights change, and
    the merge waits for those in flight (see ``docs/errors.md``). Each base weight ``W`` ``(out, in)`` becomes
    ``W + ΔW`` (or the architecture's own fold, e.g. HRA's ``W·Q``) and is stored back in ``W``'s dtype (a quantized
    weight is dequantized, updated and re-quantized: lossy, with a warning).

    ``safe=True`` checks every merged weight for NaN / inf before writing any. Returns the same ``model``.

    Raises:
        StateError: the adapters are already merged, the call comes from inside a forward of the same thread, or
            the model holds no peftkit adapter.
        MergeError: with ``safe``, a merged weight would not be finite (nothing is changed then).
    """
    with _weight_gate(model).changing("merge"):
        return _merge(model, safe)


def _merge(model: nn.Module, safe: bool) -> nn.Module:
    layers = adapter_layers(model)
    state_of(model)
    if any(layer.merged_adapters for layer in layers.values()):
        raise StateError("merge: the adapters are already merged; call peftkit.unmerge(model) first")
    if safe:
        for layer in layers.values():
            layer.check_merge()
    done = []
    try:
        for layer in layers.values():
            layer.merge(safe=safe)
            done.append(layer)
    except BaseException:
        for layer in done:
            layer.unmerge()
        raise
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract merged adapters from the base weights again (thread-safe as :func:`merge`); returns ``model``.

    Raises:
        StateError: the model holds no peftkit adapter, or the call comes from inside a forward of the same thread.
    """
    state_of(model)
    with _weight_gate(model).changing("unmerge"):
        for layer in adapter_layers(model).values():
            layer.unmerge()
    return model


def unwrap(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove the adapter layers (merging them first unless ``merge=False``); returns the plain model.

    The plain model is the same object, its adapter layers replaced by their base layers, no peftkit hooks left.

    Raises:
        StateError: the model holds no peftkit adapter, or the call comes from inside a forward of the same thread.
    """
    gate = model.__dict__.get(GATE_ATTR)
    if gate is None:
        return remove(model, merge=merge)
    with gate.changing("unwrap"):
        plain = remove(model, merge=merge)
    # The plain model keeps no hook of peftkit's (found by owner: a deep-copied model's hooks have no handles)
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key, hook in list(hooks.items()):
            if getattr(hook, "__self__", None) is gate:
                del hooks[key]
                model._forward_hooks_always_called.pop(key, None)
    model.__dict__.pop(GATE_ATTR, None)
    return plain


def delete_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Remove adapters by name everywhere (PEFT's ``delete_adapter``). The active set loses them; deleting the
    last active adapter activates the first one left (PEFT does the same); deleting the last adapter leaves the
    plain model (it then saves as a full model).

    Raises:
        ConfigError: a name the model does not hold.
        StateError: an adapter to delete is merged (unmerge first).
    """
    state = state_of(model)
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise ConfigError(f"delete_adapter: {unknown} not found; the model has {sorted(state.configs)}")
    merged = [n for layer in adapter_layers(model).values() for n in layer.merged_adapters if n in names]
    if merged:
        raise StateError(f"delete_adapter: {sorted(set(merged))} is merged into the base weights; call "
                         "peftkit.unmerge(model) first")
    remaining_active = [n for n in state.active if n not in names]
    for name in names:
        drop_adapter(model, name)
    left = state_of(model, required=False)
    if left is not None:
        set_active(model, remaining_active or [next(iter(left.configs))])


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make ``names`` the active (and only trainable) adapters; several active adapters add up.

    Raises:
        ConfigError: a name the model does not hold.
        StateError: the model holds no peftkit adapter.
    """
    set_active(model, [names] if isinstance(names, str) else list(names))


def summary(model: nn.Module, adapter_name: str | None = None):
    """What the adapter adapted: ``str()`` is the one line ``wrap`` logs; the object (``AdapterSummary``: counts
    by kind of base layer, expert matrices, trainable parameters, skipped targets with reasons; ``to_dict()``).

    Raises:
        StateError: the model holds no peftkit adapter.
    """
    from .report import summary as build

    return build(model, adapter_name)


def methods() -> list[str]:
    """The registered method names."""
    return registry.methods()


def load_model(name_or_path: str | os.PathLike, *, gguf_file: str | None = None, task: str = "causal-lm",
               dtype: torch.dtype | str = torch.float32, **from_pretrained: Any) -> nn.Module:
    """A base model to wrap: a hub id, a folder, ``pkg:<module>/<folder>``, or with ``gguf_file`` a GGUF file in
    that folder, loaded through transformers' GGUF support (dequantized to ``dtype``) and rebuilt as a plain model
    once; the rebuilt folder is cached (``$PEFTKIT_CACHE`` or ``~/.cache/peftkit``), so later loads are plain
    ``from_pretrained`` calls. Adapters saved from it record ``<name>/<gguf_file>`` as their base, which
    ``peftkit merge`` / ``export`` and ``peftkit.export(..., to="gguf")`` resolve the same way.
    ``task``: "causal-lm", "sequence-classification" or "image-text-to-text" (a vision-language model: wrap it
    with ``peftkit.train.vision.adapter_options``, see docs/recipes.md); other keyword arguments go to
    ``from_pretrained``.

    Raises:
        ConfigError: an unknown ``task``, or a reference that does not resolve (no such folder, package or file).
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSequenceClassification

    from .resolve import resolve_model_ref

    autos = {"causal-lm": AutoModelForCausalLM, "sequence-classification": AutoModelForSequenceClassification,
             "image-text-to-text": AutoModelForImageTextToText}
    if task not in autos:
        raise ConfigError(f"task: expected one of {sorted(autos)}, got {task!r}")
    ref = str(name_or_path)
    if gguf_file is not None:
        ref = f"{ref.rstrip('/')}/{gguf_file}"
    model = autos[task].from_pretrained(resolve_model_ref(ref, "gguf_file" if gguf_file else "name_or_path"),
                                        dtype=dtype, **from_pretrained)
    checkpoint.record_base_reference(model, ref)
    return model
