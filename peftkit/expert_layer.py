"""ExpertParameterLayer: an adapter on one fused expert parameter (E, out, in) of a mixture-of-experts block.

PEFT's ``target_parameters``: one adapter per expert matrix, added to the stacked parameter while the block runs.
``expert_layout`` reads a stack's orientation; the layer itself builds on ``AdapterLayer`` (``peftkit.layer``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from .layer import AdapterLayer, innermost_module

OUTPUT_SIDE_NAMES = ("down", "output", "w2", "wo")


def expert_layout(owner: nn.Module, parameter_name: str, hidden_size: int | None = None,
                  path: str = "") -> tuple[int, int, int, bool, bool]:
    """(experts E, out, in, transposed, peft_transposed) of a fused expert parameter of ``owner``.

    transformers stores most experts as (E, out, in) and runs ``F.linear(x, W[e])`` (Qwen3-MoE, Mixtral, OLMoE,
    DeepSeek-V3 ...); classes declared ``is_transposed`` (``@use_experts_implementation``: gpt-oss) store
    (E, in, out) and run ``x @ W[e]``. PEFT 0.21's ``ParamWrapper`` reads only that flag (``peft_transposed``),
    so a class that stores (E, in, out) without declaring it (Llama 4's ``torch.bmm(x, W)``) is one PEFT reads
    the wrong way round. Where the flag is absent, the model's hidden size decides: it is the input side of the
    first projection (gate/up) and the output side of the last (down/output) - ``path`` (the parameter's full
    name) says which. A 2-D weight (a router's) is one (out, in) matrix, E = 1."""
    param = owner._parameters[parameter_name]
    shape = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitions leave an empty .shape
    if len(shape) == 2:
        return 1, shape[0], shape[1], False, False
    if len(shape) != 3:
        from .errors import ConfigError

        raise ConfigError(f"targets: {parameter_name} of {type(owner).__name__} has shape {list(shape)}; only fused "
                          "3-D expert parameters (experts, out, in) and 2-D weights can be targeted as parameters")
    declared = getattr(owner, "is_transposed", None)
    experts, d1, d2 = shape
    if declared is not None:
        transposed = bool(declared)
    elif hidden_size is not None and (d1 == hidden_size) != (d2 == hidden_size):
        segments = (path or parameter_name).lower().split(".")[-2:]
        output_side = any(segment.startswith(OUTPUT_SIDE_NAMES) for segment in segments)
        hidden_first = d1 == hidden_size
        # (E, out, in): hidden is d1 for the output side, d2 for the input side.
        transposed = hidden_first != output_side
    else:
        transposed = False
    out, inp = (d2, d1) if transposed else (d1, d2)
    return experts, out, inp, transposed, bool(declared)


class ExpertParameterLayer(AdapterLayer):
    """An adapter on one fused expert parameter (E, out, in) of a mixture-of-experts block: one adapter per
    expert matrix, added to the parameter while the block runs (PEFT's ``target_parameters``).

    The experts module keeps its class and its forward (any of transformers' experts implementations: the
    loop, ``grouped_mm``, ``batched_mm``). The module is called as usual (its hooks run: DeepSpeed ZeRO-3 gathers W,
    Accelerate moves it), and for that call its forward runs on a shallow copy whose stacks are W + ΔW
    (``adapted_forward``). Two parameters of one module are two nested layers, the first parameter (in the
    module's order) innermost: the module paths ``experts`` / ``experts.base_layer`` are PEFT's keys for them;
    the outermost live layer applies the updates of the whole nest in one call.

    Weights are exchanged as (E, out, in) stacks; a subclass gives ``delta_weight(name) -> (E, out, in)``.
    """

    merge_is_lossless = True

    def __init__(self, base_layer: nn.Module, module_name: str, parameter_name: str,
                 hidden_size: int | None = None) -> None:
        self.parameter_name = parameter_name
        self.hidden_size = hidden_size
        super().__init__(base_layer, module_name)

    def describe_base(self, base_layer: nn.Module) -> tuple[str, tuple[int, int]]:  # type: ignore[override]
        """('experts', (out, in)) of one expert matrix; sets ``num_experts`` and ``transposed``."""
        owner = innermost_module(base_layer)
        experts, out, inp, transposed, peft_transposed = expert_layout(
            owner, self.parameter_name, self.hidden_size, self.target_name)
        # transposed: stored (E, in, out); peft_transposed: how PEFT reads it (they differ for Llama 4)
        self.num_experts, self.transposed, self.peft_transposed = experts, transposed, peft_transposed
        param = owner._parameters[self.parameter_name]
        self.stacked = len(getattr(param, "ds_shape", param.shape)) == 3  # False: a 2-D weight, held as E = 1
        return "experts", (out, inp)

    @property
    def owner(self) -> nn.Module:
        """The experts module that holds the parameter."""
        return innermost_module(self.base_layer)

    @property
    def target_name(self) -> str:
        """The parameter's full name in the model (what ``target_parameters`` lists)."""
        path = self.module_name
        while path.endswith(".base_layer"):
            path = path[: -len(".base_layer")]
        return f"{path}.{self.parameter_name}"

    @property
    def weight(self) -> torch.Tensor:
        return self.owner._parameters[self.parameter_name]

    @property
    def bias(self) -> torch.Tensor | None:
        return None

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The parameter as a dense (E, out, in) stack, detached."""
        dense = self.weight.detach()
        if not self.stacked:
            dense = dense.unsqueeze(0)
        if self.transposed:
            dense = dense.transpose(1, 2)
        return dense.to(dtype or (torch.float64 if dense.dtype == torch.float64 else torch.float32))

    def write_base_weight(self, dense: torch.Tensor) -> None:
        weight = self.weight
        with torch.no_grad():
            dense = dense.transpose(1, 2) if self.transposed else dense
            weight.copy_((dense if self.stacked else dense[0]).to(weight.dtype))

    def live_delta(self) -> torch.Tensor | None:
        """The sum of the live adapters' ΔW, (E, out, in), or None when none is live."""
        total = None
        for name, _ in self.live_branches():
            delta = self.delta_weight(name)
            total = delta if total is None else total + delta
        return total

    def stored_delta(self) -> torch.Tensor | None:
        """``live_delta`` in the parameter's stored layout ((E, in, out) when transposed; 2-D for a router)."""
        delta = self.live_delta()
        if delta is None:
            return None
        delta = delta.transpose(1, 2) if self.transposed else delta
        return delta if self.stacked else delta[0]

    def chain_deltas(self) -> dict[str, torch.Tensor]:
        """Parameter name -> stored-layout ΔW of this layer and of the live layers nested under it (the other
        stacks of the same module), which one call of the module applies together."""
        deltas: dict[str, torch.Tensor] = {}
        layer: nn.Module = self
        while isinstance(layer, ExpertParameterLayer):
            if layer is self or (not layer.disabled and layer.active_adapters and not layer.merged_adapters):
                delta = layer.stored_delta()
                if delta is not None:
                    deltas[layer.parameter_name] = delta
            layer = layer.base_layer
        return deltas

    def adapted_forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        deltas = self.chain_deltas()
        if not deltas:
            return self.base_layer(x, *args, **kwargs)
        owner = self.owner

        def forward_with_updates(*call_args: Any, **call_kwargs: Any) -> Any:
            # Runs inside the module's own call, after its pre-hooks: W is what they left there (gathered by
            # ZeRO-3, unsharded by FSDP2, moved by Accelerate). The module's parameters are not touched: engines
            # that track them (ZeRO-3's parameter dict and release look-ahead) see only their own tensors. The
            # class's forward runs on a shallow copy whose parameters are W + ΔW (new tensors: W stays out of the
            # graph's saved tensors); its submodules (the activation) are the module's own.
            proxy = copy.copy(owner)
            proxy._parameters = dict(owner._parameters.items())
            for name, delta in deltas.items():
                weight = owner._parameters[name]
                proxy._parameters[name] = weight + delta.to(weight.dtype)
            return type(owner).forward(proxy, *call_args, **call_kwargs)

        # Accelerate's hooks (device_map offload) replace the instance's forward and call ``_old_forward`` after
        # moving the weights: the class forward they call is the one to stand in for.
        slot = "_old_forward" if "_old_forward" in owner.__dict__ else "forward"
        previous = owner.__dict__.get(slot)
        setattr(owner, slot, forward_with_updates)
        try:
            return owner(x, *args, **kwargs)
        finally:
            if previous is None:
                delattr(owner, slot)
            else:
                setattr(owner, slot, previous)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.ranks[n]}" for n in self.adapters)
        return (f"{self.architecture_name}[{ranks}] on {self.parameter_name} ({self.num_experts} experts x "
                f"{self.out_features}x{self.in_features})")
