"""What an adapter adapted, in one line and in structured form (``peftkit.summary``), logged after every wrap.

A wrap that adapts less than the user meant (an MoE model whose experts were left out, a head kept out of
"all-linear") must say so: the summary counts the adapted layers by kind of base (Linear, Conv1D, 4-bit, expert
parameters ...), the trainable parameters, and names what ``targets`` matched but was skipped, with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.nn as nn

from . import distributed
from .config import (
    ALL_LINEAR,
    CLASSIFIER_HEAD_NAMES,
    _as_list,
    _matches,
    _name_matches,
    parameter_candidates,
    router_names,
)
from .expert_layer import ExpertParameterLayer
from .inject import _BaseView, adapter_layers, state_of
from .layer import linear_types
from .validation import compile_pattern

logger = logging.getLogger("peftkit")

KIND_LABELS = {"linear": "Linear", "conv1d": "Conv1D", "bnb4": "4-bit", "bnb8": "8-bit", "embedding": "Embedding",
               "conv": "Conv"}


@dataclass
class AdapterSummary:
    """``adapted``: kind of base -> how many layers (or parameters) carry the adapter; ``expert_matrices``: the
    expert matrices those expert parameters hold (one adapter each); ``trainable`` / ``total``: parameter counts;
    ``skipped``: (name, reason) of what the targets matched and left out."""

    method: str
    adapter_name: str
    model_class: str
    adapted: dict[str, int] = field(default_factory=dict)
    expert_matrices: int = 0
    trainable: int = 0
    total: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        parts = []
        for kind, count in self.adapted.items():
            text = f"{count} {kind}"
            if kind == "expert parameters":
                text += f" ({self.expert_matrices} expert matrices)"
            parts.append(text)
        percent = 100.0 * self.trainable / max(self.total, 1)
        line = (f"peftkit: '{self.method}' adapter '{self.adapter_name}' on {self.model_class}: adapted "
                f"{', '.join(parts) or 'nothing'}; trainable {self.trainable:,} of {self.total:,} parameters "
                f"({percent:.3f}%)")
        if self.skipped:
            reasons: dict[str, list[str]] = {}
            for name, reason in self.skipped:
                reasons.setdefault(reason, []).append(name)
            shown = "; ".join(f"{names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''} ({reason})"
                              for reason, names in reasons.items())
            line += f"; skipped: {shown}"
        return line


@dataclass
class TrainableParameters:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """Trainable and total parameter counts (4-bit weights count two parameters per stored byte; a ZeRO-3
    partitioned weight counts its whole size, not the 0 elements it holds between uses)."""
    trainable = total = 0
    for param in model.parameters():
        count = getattr(param, "ds_numel", None) or param.numel()
        if type(param).__name__ == "Params4bit":
            count *= 2
        total += count
        if param.requires_grad:
            trainable += count
    return TrainableParameters(trainable, total)


def summary(model: nn.Module, adapter_name: str | None = None) -> AdapterSummary:
    """The summary of one adapter (default: the first active one); ``str()`` of it is the one line wrap logs."""
    state = state_of(model)
    name = adapter_name or state.active[0]
    config = state.configs[name]
    layers = {n: l for n, l in adapter_layers(model).items() if name in l.adapters}
    adapted: dict[str, int] = {}
    experts = 0
    for layer in layers.values():
        if isinstance(layer, ExpertParameterLayer):
            kind = "expert parameters" if layer.stacked else "router weights"
            experts += layer.num_experts if layer.stacked else 0
        else:
            kind = KIND_LABELS.get(layer.kind, layer.kind)
        adapted[kind] = adapted.get(kind, 0) + 1
    heads = sum(1 for _ in _saved_heads(model, name))
    if heads:
        adapted["trained heads (modules_to_save)"] = heads
    counts = trainable_parameters(model)
    adapted_names = set(layers) | {l.target_name for l in layers.values() if isinstance(l, ExpertParameterLayer)}
    return AdapterSummary(config.method, name, type(model).__name__, adapted, experts, counts.trainable, counts.total,
                          skipped_targets(model, config, adapted_names))


def _saved_heads(model: nn.Module, adapter_name: str):
    from .inject import saved_modules

    for name, wrapper in saved_modules(model).items():
        if adapter_name in wrapper.modules_to_save:
            yield name


def skipped_targets(model: nn.Module, config: Any, adapted: set[str]) -> list[tuple[str, str]]:
    """(name, reason) of the linear layers and parameters ``config.targets`` matched but that carry no adapter."""
    view = _BaseView(model)
    modules = dict(view.named_modules())
    targets = _as_list(config.targets)
    all_linear = isinstance(targets, str) and targets.lower() == ALL_LINEAR
    exclude = _as_list(config.exclude) if config.exclude else None
    keep = list(config.modules_to_save or [])
    output = view.get_output_embeddings()

    def matched(name: str) -> bool:
        if all_linear:
            return True
        if isinstance(targets, str):
            return compile_pattern(targets, "targets").fullmatch(name) is not None
        return any(_name_matches(name, e) for e in targets)

    def reason(name: str, module: nn.Module | None) -> str:
        if exclude is not None and (_matches(name, exclude) or _matches(name.rsplit(".", 1)[0], exclude)):
            return "excluded by exclude"
        if any(_name_matches(p, k) for k in keep for p in _and_parents(name)):
            return "trained in full (modules_to_save)"
        if output is not None and module is output:
            return "output embeddings: all-linear leaves them out, as PEFT does; name them in targets to adapt them"
        if any(name == h or name.startswith(h + ".") for h in CLASSIFIER_HEAD_NAMES):
            return "classification head: all-linear leaves it out"
        if name in routers:
            return "router: stays frozen by default; name it in targets to adapt it"
        return "not adaptable by this method"

    routers = router_names(view)
    skipped = []
    for name, module in modules.items():
        if not name or name in adapted or f"{name}.weight" in adapted:
            continue
        is_linear = isinstance(module, linear_types())
        if (is_linear and matched(name)) or (all_linear and name in routers):
            skipped.append((name, reason(name, module)))
    for full, owner in parameter_candidates(view):
        if full in adapted or owner in routers or not matched(full) and not (
                config.target_parameters and any(_name_matches(full, e) for e in config.target_parameters)):
            continue
        skipped.append((full, reason(full, None)))
    return skipped


def _and_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def log_summary(model: nn.Module, adapter_name: str) -> AdapterSummary:
    """Log the adapter's one-line summary on the ``peftkit`` logger (INFO; rank 0 only under torch.distributed)."""
    result = summary(model, adapter_name)
    if distributed.rank() == 0:
        _ensure_handler()
        logger.info(str(result))
    return result


def _ensure_handler() -> None:
    """A library logger prints nothing unless configured: give ``peftkit`` one stderr handler at INFO (as
    transformers does for its own logger) when neither it nor the root logger has a handler. An application that
    configured logging decides itself (``logging.getLogger("peftkit").setLevel(logging.INFO)`` shows the line,
    ``setLevel(logging.WARNING)`` silences it)."""
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
