"""AdapterLayer: the one wrapper every architecture builds on.

It wraps a base module (``nn.Linear``, transformers' ``Conv1D``, bitsandbytes ``Linear4bit`` /
``Linear8bitLt``) and holds, once for every method: named adapters (``self.adapters[name]``, each a small
module of trainable tensors), which are active, enable/disable, a per-adapter gate for schedules,
merge/unmerge bookkeeping (with quantized bases), and the dtype rules (adapters in fp32 on half-precision
or quantized bases, in the base dtype otherwise).

An architecture subclasses it and provides:
- ``make_branch(name, r, alpha, config) -> nn.Module``: the adapter's tensors, already initialised;
- ``adapted_forward(x, *args, **kwargs)``: the output with the active, gated-on adapters;
- ``delta_weight(name) -> Tensor (out, in)`` for additive adapters, or override ``merge_weights`` /
  ``unmerge_weights`` for others (e.g. a multiplicative W·Q);
- optionally ``saved_tensors`` / ``load_saved_tensors`` / ``saved_rank_alpha`` when the on-disk form
  differs from the branch's state dict, and ``factor_pairs`` when the adapter is LoRA-shaped (ΔW = s·B·A);
- optionally, for bases other than linear ones (embeddings, convolutions): ``supported_types`` on the registered
  class, ``for_base(module)`` picking the class to build per base module, and ``describe_base`` /
  ``base_weight`` / ``write_base_weight`` exchanging the base weight as an (out, in) matrix; ``tensor_roles()``
  gives optimizer roles to adapter tensors that are not ``factor_pairs`` (optim.parameter_roles);
- optionally ``regularization()``: a weighted loss term (0-dim tensor) or None, summed over layers by
  ``peftkit.regularization_loss(model)`` (HRA's orthogonality term, ElaLoRA's);
- for a native format (``peft_type = None``): ``export_lora(name) -> (A (r', in), B (out, r'), s[, bias (out,)
  or None])`` with ΔW = s·B·A, which ``peftkit.export`` writes as a PEFT LoRA (the bias as ``lora_B.bias``).

Weights are always exchanged in the (out, in) convention; Conv1D's stored (in, out) is handled here.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Iterator

import torch
import torch.nn as nn

from . import quantized
from .errors import MergeError, StateError

try:  # transformers' GPT-2 style layer: weight stored as (in, out)
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment]


def linear_types() -> tuple[type, ...]:
    """The base layer types every linear architecture wraps (bnb layers subclass ``nn.Linear``)."""
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def base_kind(module: nn.Module) -> str:
    """'linear', 'conv1d', 'bnb4' or 'bnb8'."""
    cls_name = type(module).__name__
    if cls_name == "Linear4bit":
        return "bnb4"
    if cls_name == "Linear8bitLt":
        return "bnb8"
    if Conv1D is not None and isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    raise TypeError(f"cannot wrap a {type(module).__name__}: expected nn.Linear, Conv1D or a bitsandbytes linear")


def base_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear-like base."""
    if base_kind(module) == "conv1d":
        n_in, n_out = module.weight.shape
        return n_out, n_in
    return module.out_features, module.in_features


def adapter_dtype(module: nn.Module) -> torch.dtype:
    """fp32 on half-precision or quantized bases (PEFT's autocast_adapter_dtype); the base dtype otherwise."""
    dtype = module.weight.dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class AdapterLayer(nn.Module):
    """Base wrapper. See the module docstring for what a subclass provides; the contract it satisfies is
    ``peftkit.contracts.Architecture`` (checked for every registered architecture by tests/test_contracts.py)."""

    architecture_name = "?"
    merge_is_lossless = True
    # The ExpertParameterLayer subclass an architecture builds on a fused expert parameter (one adapter per expert
    # matrix); None: the architecture cannot adapt expert parameters, and wrap refuses them.
    expert_layer: type | None = None

    def __init__(self, base_layer: nn.Module, module_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name
        self.kind, (self.out_features, self.in_features) = self.describe_base(base_layer)
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # Gates belong to schedules (CoTo): a gated-off adapter's branch is skipped in the training forward, so
        # its parameters get no gradient and the optimizer leaves them (and their moments) untouched. The set is
        # written between steps, never from a forward hook: torch.compile then guards on its contents only, and
        # blocks with the same gate share one compiled graph (see ``gated``).
        self.gated_off: set[str] = set()
        self.ranks: dict[str, int] = {}
        self.alphas: dict[str, float] = {}
        self.scaling: dict[str, float] = {}

    # --------------------------------------------------------------- subclass API
    @classmethod
    def for_base(cls, base_layer: nn.Module) -> type["AdapterLayer"]:
        """The class to build for ``base_layer``: an architecture registers one class and may hand other base
        types (embeddings, convolutions) to subclasses that declare them in ``supported_types``."""
        return cls

    @classmethod
    def describe_base(cls, base_layer: nn.Module) -> tuple[str, tuple[int, int]]:
        """(kind, (out, in)) of the base, where (out, in) is the shape of ``base_weight()``. Subclasses for
        non-linear bases override it together with ``base_weight`` / ``write_base_weight``."""
        return base_kind(base_layer), base_shape(base_layer)

    def tensor_roles(self) -> Iterator[tuple[nn.Parameter, str]]:
        """(parameter, optimizer role) for adapter tensors whose role is not given by ``factor_pairs`` (e.g.
        ``"A"`` / ``"B"`` for conv factors, ``"embedding"`` for embedding factors); see optim.parameter_roles."""
        return iter(())

    def make_branch(self, name: str, r: int, alpha: float, config: Any) -> nn.Module:
        """The adapter ``name``'s tensors as a module, already initialised (rank ``r``, ``alpha``); subclasses
        provide it."""
        raise NotImplementedError

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer's output plus every live (active, gated-on) adapter's contribution; subclasses provide it."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of one adapter, (out, in), in the adapter dtype."""
        raise NotImplementedError

    def merge_weights(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        """(W, b) -> (W', b') with the adapter folded in; W is (out, in) in fp32 or fp64."""
        return weight + self.delta_weight(name).to(weight.dtype), bias

    def unmerge_weights(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        """(W', b') -> (W, b): the inverse of ``merge_weights`` (here: subtract ΔW); W is (out, in) in fp32 or fp64."""
        return weight - self.delta_weight(name).to(weight.dtype), bias

    def factor_pairs(self) -> Iterator[tuple]:
        """(adapter name, A (r, in), B (out, r), s) for LoRA-shaped adapters, so that ΔW = s·B·A; a layer holding
        several matrices (one per expert) yields (adapter name, A, B, s, matrix index) for each."""
        return iter(())

    def regularization(self) -> torch.Tensor | None:
        """This layer's weighted regularisation term for the loss (0-dim tensor), or None when it has none."""
        return None

    @classmethod
    def after_inject(cls, layers: dict[str, "AdapterLayer"], adapter_name: str) -> None:
        """Called once after ``adapter_name`` was added to all its target ``layers`` (module name -> layer), by
        wrap and load alike: for per-adapter facts that need every layer (e.g. a mean over the L layers)."""

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors written for one adapter, keyed by suffix after the module path."""
        return {k: v for k, v in self.adapters[name].state_dict().items()}

    def load_saved_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a saved form (``saved_tensors``' keys) into adapter ``name``'s tensors, in their dtypes."""
        branch = self.adapters[name]
        expected = branch.state_dict()
        with torch.no_grad():
            for key, value in tensors.items():
                expected[key].copy_(value.to(expected[key].dtype))

    def saved_rank_alpha(self, name: str) -> tuple[int, float]:
        """(r, alpha) of the saved form (may differ from the live form, e.g. LoRA-GA's rank 2r)."""
        return self.ranks[name], self.alphas[name]

    # --------------------------------------------------------------- adapters
    def add_adapter(self, name: str, r: int, alpha: float, config: Any) -> None:
        """Build adapter ``name`` (rank ``r``, ``alpha``, scaling from ``config``) inactive; r ≤ min(in, out)
        unless allowed."""
        if name in self.adapters:
            raise StateError(f"adapter '{name}' already exists in {self.module_name}; pick another adapter name")
        max_rank = min(self.in_features, self.out_features)
        if r > max_rank and not getattr(config, "_allow_large_rank", False):
            from .errors import ConfigError

            raise ConfigError(
                f"r: rank {r} for {self.module_name} exceeds min(in, out) = {max_rank} of that "
                f"({self.out_features}x{self.in_features}) layer; lower r or set a smaller rank_pattern entry"
            )
        self.ranks[name] = r
        self.alphas[name] = float(alpha)
        self.scaling[name] = config.scaling(r, alpha)
        self.adapters[name] = self.make_branch(name, r, alpha, config)
        # In the layer's train/eval mode: a branch added to a model in eval mode must not run its dropout.
        self.adapters[name].train(self.training)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` and its rank, alpha, scaling and gate; a merged adapter is a StateError."""
        if name in self.merged_adapters:
            raise StateError(f"adapter '{name}' is merged into {self.module_name}; unmerge it before deleting it")
        del self.adapters[name]
        for table in (self.ranks, self.alphas, self.scaling):
            table.pop(name, None)
        self.gated_off.discard(name)
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def recreate_adapter(self, name: str, r: int, alpha: float, config: Any) -> None:
        """Replace adapter ``name`` by a fresh one of rank ``r`` and ``alpha`` (new Parameters, so build any
        optimizer afterwards); it keeps its place among the active adapters and its trainable flag."""
        active = list(self.active_adapters)
        trainable = all(p.requires_grad for p in self.adapters[name].parameters())
        self.delete_adapter(name)
        self.add_adapter(name, r, alpha, config)
        self.active_adapters = [n for n in active if n in self.adapters]
        for param in self.adapters[name].parameters():
            param.requires_grad_(trainable)

    def set_active(self, names: list[str]) -> None:
        """Make ``names`` (those this layer holds) the active adapters, unmerging first if other adapters are merged."""
        active = [n for n in names if n in self.adapters]
        if self.merged_adapters and set(self.merged_adapters) != set(active):
            # The base weight holds the merged adapters: switching without unmerging would run them, not ``names``.
            self.unmerge()
        self.active_adapters = active

    def gated(self, name: str) -> bool:
        """Whether a schedule's gate skips adapter ``name`` in this forward: gates hold in training mode only (in
        eval mode every active adapter runs)."""
        return self.training and name in self.gated_off

    def live_branches(self) -> Iterator[tuple[str, nn.Module]]:
        """(name, branch) of every active adapter whose gate is open, in activation order: what a forward adds."""
        for name in self.active_adapters:
            if not self.gated(name):
                yield name, self.adapters[name]

    # --------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base output when disabled or merged (guarded against training through a merge), else
        ``adapted_forward``."""
        if self.disabled or not self.active_adapters:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged_adapters:
            out = self.base_layer(x, *args, **kwargs)
            if torch.is_grad_enabled():
                trainable = [p for n in self.merged_adapters for p in self.adapters[n].parameters() if p.requires_grad]
                if trainable:  # a backward through this output means training merged adapters
                    out = _MergedGuard.apply(out, self.module_name, list(self.merged_adapters), *trainable)
            return out
        return self.adapted_forward(x, *args, **kwargs)

    # --------------------------------------------------------------- base weights
    @property
    def weight(self) -> torch.Tensor:
        """The base weight as stored (so code that reads ``module.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight as a dense (out, in) tensor (dequantized for bnb, in any of its layouts), detached.
        A weight an engine shards (FSDP2, ZeRO-3) is gathered whole for the read: a collective, so every process
        reads the same layers in the same order (as data-driven inits do)."""
        from .gather import whole_weights

        with whole_weights(self.base_layer) as gathered:
            weight = self.base_layer.weight
            if self.kind in ("bnb4", "bnb8"):
                dense = quantized.dense_weight(self.base_layer)
            elif self.kind == "conv1d":
                dense = weight.detach().t()
            else:
                dense = weight.detach()
            work = dtype or (torch.float64 if dense.dtype == torch.float64 else torch.float32)
            dense = dense.to(work)
            return dense.clone() if gathered and dense.data_ptr() == weight.data_ptr() else dense

    def write_base_weight(self, dense: torch.Tensor) -> None:
        """Store an (out, in) dense weight back into the base layer (re-quantizing bnb weights)."""
        if self.kind in ("bnb4", "bnb8"):
            quantized.write_dense_weight(self.base_layer, dense)
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            if self.kind == "conv1d":
                weight.copy_(dense.t().to(weight.dtype))
            else:
                weight.copy_(dense.to(weight.dtype))

    # --------------------------------------------------------------- merge / unmerge
    def merge(self, names: list[str] | None = None, safe: bool = False) -> list[str]:
        """Fold adapters into the base weight (W ← merge_weights(W)); returns the names merged."""
        names = list(self.active_adapters if names is None else names)
        todo = [n for n in names if n in self.adapters and n not in self.merged_adapters]
        if not todo:
            return []
        if self.kind in ("bnb4", "bnb8"):
            warnings.warn(
                f"merging into the quantized {self.module_name} is lossy: the weight is dequantized, updated and "
                "re-quantized, so outputs change by the quantization error", stacklevel=3)
        weight, bias = self._merged(todo)
        if safe:
            self._check_finite(weight, bias, todo)
        self._store(weight, bias)
        for name in todo:
            self._merged_state[name] = self._branch_state(name)
        self.merged_adapters.extend(todo)
        return todo

    @property
    def _merged_state(self) -> dict[str, tuple[list[int], dict[str, torch.Tensor]]]:
        """Per merged adapter: its tensors' version counters and values when merged (see ``unmerge``)."""
        if "_merged_snapshots" not in self.__dict__:
            self.__dict__["_merged_snapshots"] = {}
        return self.__dict__["_merged_snapshots"]

    def _versions(self, name: str) -> list[int]:
        """In-place writes (optimizer steps, loads) bump a tensor's version counter."""
        return [t._version for t in self.adapters[name].state_dict(keep_vars=True).values()]

    def _branch_state(self, name: str) -> tuple[list[int], dict[str, torch.Tensor]]:
        values = {k: t.detach().clone() for k, t in self.adapters[name].state_dict().items()}
        return self._versions(name), values

    def check_merge(self, names: list[str] | None = None) -> None:
        """Raise MergeError if merging ``names`` (default: the active adapters) would put NaN or inf into the
        base weights; changes nothing. ``peftkit.merge(model, safe=True)`` checks every layer before merging
        any, so a failure leaves all base weights bit-identical (no merge-then-unmerge rounding)."""
        names = list(self.active_adapters if names is None else names)
        todo = [n for n in names if n in self.adapters and n not in self.merged_adapters]
        if todo:
            self._check_finite(*self._merged(todo), todo)

    def _merged(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', b'): the dense base weight (out, in) and bias with ``names`` folded in; the layer is unchanged."""
        weight = self.base_weight()
        bias = self.bias.detach().to(weight.dtype) if self.bias is not None else None
        with torch.no_grad():
            for name in names:
                weight, bias = self.merge_weights(name, weight, bias)
        return weight, bias

    def _check_finite(self, weight: torch.Tensor, bias: torch.Tensor | None, names: list[str]) -> None:
        if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
            raise MergeError(
                f"merge: NaN or inf in the merged weights of {self.module_name} (adapter {names}); the adapter is "
                "broken, the base weights were left unchanged"
            )

    def unmerge(self) -> list[str]:
        """Subtract exactly what ``merge`` added to the base weight; returns the names unmerged (empty if none)."""
        if not self.merged_adapters:
            return []
        weight = self.base_weight()
        bias = self.bias.detach().to(weight.dtype) if self.bias is not None else None
        undone = []
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                weight, bias = self.merge_undone(name, weight, bias)
                self._merged_state.pop(name, None)
                undone.append(name)
        self._store(weight, bias)
        return undone

    def merge_undone(self, name: str, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) with adapter ``name``'s merge subtracted, with the values it was merged with (its merge
        record), whatever it holds now; the record itself is kept. Under ``torch.no_grad()``."""
        versions, merged_values = self._merged_state.get(name, (None, None))
        if versions is None or versions == self._versions(name):
            return self.unmerge_weights(name, weight, bias)
        # The adapter changed while merged (a step, a load): subtract what was added, not what is there.
        branch = self.adapters[name]
        current = {k: t.detach().clone() for k, t in branch.state_dict().items()}
        branch.load_state_dict(merged_values)
        try:
            return self.unmerge_weights(name, weight, bias)
        finally:
            branch.load_state_dict(current)

    def _store(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.write_base_weight(weight)
        if bias is not None and self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(bias.to(self.bias.dtype))

    def extra_repr(self) -> str:
        """The architecture, each adapter's rank and the base layer's kind and shape, for ``print(model)``."""
        ranks = ", ".join(f"{n}: r={self.ranks[n]}" for n in self.adapters)
        return f"{self.architecture_name}[{ranks}] on {self.kind} ({self.out_features}x{self.in_features})"


class _MergedGuard(torch.autograd.Function):
    """The identity, whose backward raises: a merged adapter is part of the base weight, so it would get no
    gradient (torch's own error then names no cause), and changing it would make unmerge subtract a delta that
    was never added. Forward passes (inference without ``no_grad``) are unaffected."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, module_name: str, names: list[str], *params: torch.Tensor) -> torch.Tensor:
        ctx.module_name, ctx.names = module_name, names
        return output.view_as(output)  # the identity without a copy

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise StateError(
            f"{ctx.module_name}: adapters {ctx.names} are merged into the base weights, so they cannot train; call "
            "peftkit.unmerge(model) before training")


class ModulesToSave(nn.Module):
    """A module trained in full (e.g. a classification head): the original stays frozen and a trainable copy
    per adapter is used while adapters are enabled (PEFT's ``modules_to_save``)."""

    def __init__(self, original: nn.Module, module_name: str) -> None:
        super().__init__()
        self.original_module = original
        self.module_name = module_name
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False

    def add_adapter(self, name: str) -> None:

        copy_ = copy.deepcopy(self.original_module)
        for p in copy_.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = copy_

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.modules_to_save]

    def forward(self, *args: Any, **kwargs: Any):
        if self.disabled or not self.active_adapters:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapters[0]](*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Code that reads attributes of the wrapped head (e.g. ``classifier.out_features``) keeps working.
            return getattr(super().__getattr__("original_module"), name)


# ------------------------------------------------------------------------------------------ fused expert parameters
def innermost_module(module: nn.Module) -> nn.Module:
    """The real module under any adapter layers (expert-parameter layers nest, one per targeted parameter)."""
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    return module
