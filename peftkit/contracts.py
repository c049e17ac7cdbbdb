"""The four axes' contracts as typed Protocols: what a component registered on each axis must provide.

A method is one component per axis (``peftkit/registry.py``). The registry's decorators are typed against these
Protocols, and ``tests/test_registry.py`` checks every registered component against its axis's contract
(:func:`contract_problems`): a component with the wrong call shape fails there, not at step 1 of a user's run.

Shapes use the base layer's weight shape ``(out, in)`` (``out_features``, ``in_features``), the adapter rank
``r`` and, for activations, ``(..., in)`` / ``(..., out)`` with any number of leading (batch, sequence) dimensions.

This module imports nothing of peftkit: the registry imports it, and the layer, config and schedule modules it
describes sit above the registry. Their types appear here by their documented names; ``nn.Module`` stands for
``peftkit.layer.AdapterLayer``, ``Any`` for ``peftkit.config.AdapterConfig`` where an import would close a
circle.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable, Iterator, Mapping, Protocol, runtime_checkable

import torch
import torch.nn as nn

AXES = ("architecture", "init", "optimizer", "schedule")


@runtime_checkable
class Architecture(Protocol):
    """An architecture: a subclass of ``peftkit.layer.AdapterLayer`` (the class is what is registered) that
    wraps one base layer (``base_layer``, weight ``(out, in)``) and holds its adapters by name.

    A subclass provides ``make_branch``, ``adapted_forward`` and either ``delta_weight`` (an additive update:
    merge is ``W ± ΔW``) or both ``merge_weights`` and ``unmerge_weights`` (another form, e.g. HRA's ``W·Q``); the
    rest has working defaults in ``AdapterLayer`` (save the branch's ``state_dict``) that a subclass overrides
    where its form differs. ``architecture_name`` is set by ``@registry.architecture``.
    """

    architecture_name: str
    merge_is_lossless: bool
    expert_layer: type | None

    def make_branch(self, name: str, r: int, alpha: float, config: Any) -> nn.Module:
        """Adapter ``name``'s tensors as one module, initialised as the architecture starts them (rank ``r``,
        scaling numerator ``alpha``; ``config`` an ``AdapterConfig``, read options with
        ``config.axis_options("architecture")``). Raises ``ConfigError`` for options the layer cannot take."""
        ...

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base output ``(..., out)`` of input ``x`` ``(..., in)`` plus every live (active, gated-on) adapter's
        contribution, in ``x``'s dtype."""
        ...

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of adapter ``name``, ``(out, in)``, in the adapter dtype: what ``merge`` adds to the base weight.
        Raises ``NotImplementedError`` in a layer whose update is not additive (it overrides ``merge_weights``)."""
        ...

    def merge_weights(self, name: str, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W, b) -> (W', b')`` with adapter ``name`` folded in; ``W`` is ``(out, in)`` in fp32 or fp64."""
        ...

    def unmerge_weights(self, name: str, weight: torch.Tensor,
                        bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The inverse of ``merge_weights``: ``(W', b') -> (W, b)``."""
        ...

    def factor_pairs(self) -> Iterator[tuple]:
        """``(adapter name, A (r, in), B (out, r), s)`` per LoRA-shaped adapter (ΔW = s·B·A), for optimizers that
        act on factor pairs; empty for other forms."""
        ...

    def regularization(self) -> torch.Tensor | None:
        """This layer's weighted term added to the loss (a 0-dim tensor), or None."""
        ...

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors saved for adapter ``name``, keyed by the suffix after the module path."""
        ...

    def load_saved_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a saved form (``saved_tensors``' keys) into adapter ``name``. Raises ``CheckpointError`` (or
        ``KeyError`` from the default) when a key is missing."""
        ...

    def saved_rank_alpha(self, name: str) -> tuple[int, float]:
        """``(r, alpha)`` of the saved form (LoRA-GA saves rank 2r)."""
        ...


@runtime_checkable
class Init(Protocol):
    """An initialisation: ``fn(model, layers, config, data) -> None``, run once by ``wrap`` after injection.

    ``model`` is the wrapped model (base frozen); ``layers`` maps module name -> ``AdapterLayer`` of the adapter
    being built; ``config`` its ``AdapterConfig`` (options: ``config.axis_options("init")``); ``data`` an
    iterable of batches (dicts of tensors as the model takes them: ``input_ids`` / ``attention_mask`` /
    ``labels`` of shape ``(batch, seq)``), or None for an init registered without ``needs_data``. It writes the
    adapters' tensors in place and returns None; it may raise ``ConfigError`` (bad options or data) and must
    leave the base weights unchanged.
    """

    def __call__(self, model: nn.Module, layers: Mapping[str, nn.Module], config: Any,
                 data: Iterable[Mapping[str, torch.Tensor]] | None) -> None: ...


@runtime_checkable
class OptimizerFactory(Protocol):
    """An optimizer: ``build(model, lr, config, **options) -> torch.optim.Optimizer``.

    ``lr`` is the base learning rate (a positive float, per step); ``config`` the adapter's ``AdapterConfig``;
    ``options`` are call-site overrides of the component's own options (already checked against its options
    class): read the merged values with ``config.axis_options("optimizer", **options)``. The optimizer covers
    every trainable tensor of ``model``; its param groups carry ``role`` / ``lr_ratio`` where they differ
    (see ``peftkit.optim.param_groups``). Raises ``ConfigError`` when the model's adapters do not fit it.
    """

    def __call__(self, model: nn.Module, lr: float, config: Any, **options: Any) -> torch.optim.Optimizer: ...


@runtime_checkable
class Schedule(Protocol):
    """What a schedule factory returns (``peftkit.schedule.Schedule`` provides it all; subclass it).

    ``on_step(step, total_steps)`` runs after optimizer step ``step`` (1-based, counted in optimizer steps, not
    micro-batches) and before gradients are zeroed; ``state_dict`` / ``load_state_dict`` carry its state through
    a training checkpoint so a resumed run continues the same trajectory.
    """

    def attach_optimizer(self, optimizer: Any) -> None: ...

    def on_train_begin_(self, total_steps: int) -> None: ...

    def on_step(self, step: int, total_steps: int) -> None: ...

    def on_train_end_(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class ScheduleFactory(Protocol):
    """A schedule: ``build(model, config) -> Schedule`` (a :class:`Schedule`), called by ``peftkit.callbacks``
    and the training loop once per run; options: ``config.axis_options("schedule")``. Raises ``ConfigError``
    for options or models it cannot take."""

    def __call__(self, model: nn.Module, config: Any) -> Schedule: ...


CONTRACTS: dict[str, type] = {"architecture": Architecture, "init": Init, "optimizer": OptimizerFactory,
                              "schedule": ScheduleFactory}

# The arguments each axis's caller passes (peftkit/api.py): positionally, then the options by keyword.
_CALL_ARITY = {"init": 4, "optimizer": 3, "schedule": 2}


def contract_problems(axis: str, obj: Any, option_names: Iterable[str] = (), *,
                      base: type | None = None) -> list[str]:
    """What ``obj`` lacks to be a component of ``axis`` (empty: it conforms).

    Architecture: the class has every member of :class:`Architecture`; with ``base`` (``AdapterLayer``) it is a
    subclass of it that overrides ``make_branch``, ``adapted_forward`` and ``delta_weight`` (or both
    ``merge_weights`` and ``unmerge_weights``), whose versions in ``base`` are placeholders. Init, optimizer and
    schedule: ``obj`` is callable and its signature accepts the call its axis makes
    (``init(model, layers, config, data)``, ``build(model, lr, config, **options)`` with each of
    ``option_names`` by keyword, ``build(model, config)``).
    """
    if axis not in CONTRACTS:
        return [f"unknown axis {axis!r}; expected one of {AXES}"]
    if axis == "architecture":
        if not isinstance(obj, type):
            return [f"an architecture is a class (an AdapterLayer subclass), got {type(obj).__name__}"]
        members = [m for m in ("architecture_name", "merge_is_lossless", "expert_layer")
                   if not hasattr(obj, m)]
        members += [m for m in _protocol_methods(Architecture) if not callable(getattr(obj, m, None))]
        problems = [f"missing {m}" for m in members]
        if base is not None and not members:
            if not issubclass(obj, base):
                return [f"not a subclass of {base.__name__}"]
            own = [m for m in ("make_branch", "adapted_forward", "delta_weight", "merge_weights", "unmerge_weights")
                   if getattr(obj, m) is not getattr(base, m)]
            needed = ["make_branch", "adapted_forward"]
            if not {"merge_weights", "unmerge_weights"} <= set(own):
                needed.append("delta_weight")
            problems += [f"{m} not overridden (the {base.__name__} version is a placeholder)" for m in needed
                         if m not in own]
        return problems
    if not callable(obj):
        return [f"expected a callable, got {type(obj).__name__}"]
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError) as exc:
        return [f"no readable signature ({exc})"]
    args = [object()] * _CALL_ARITY[axis]
    kwargs = {name: object() for name in option_names} if axis == "optimizer" else {}
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        return [f"signature {signature} does not accept the {axis} call: {exc}"]
    return []


def _protocol_methods(protocol: type) -> list[str]:
    return [name for name, value in vars(protocol).items() if inspect.isfunction(value) and not name.startswith("_")]
