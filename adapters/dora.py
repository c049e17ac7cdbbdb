"""DoRA (Liu et al., ICML 2024): weight-decomposed LoRA, W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_c.

The norm is taken per output row in the (out, in) convention (PEFT's ``torch.linalg.norm(W + ΔW, dim=1)``: the
paper's column norm of its (in, out) V), and it is detached from the graph as the paper's section 4.3 prescribes,
so m, A and B get the gradients PEFT's DoRA gives. m (out,) starts at that norm, so the output is the base output
at init; A and B are LoRA's (inits and offsets compose). On-disk it is PEFT's format: ``peft_type: LORA``,
``use_dora: true`` and a ``lora_magnitude_vector`` (out,) per module.

Forward, as PEFT (including its dropout rule): with g = m / ‖W + ΔW‖ (out,),
y = base(x) + (g − 1)·(x Wᵀ) + g·s·(D(x) Aᵀ) Bᵀ, where x Wᵀ is the base output minus its bias (no dropout) or
D(x) Wᵀ recomputed (dropout in training). Faster than PEFT: ΔW is B·A (one matmul, not an identity-matrix forward)
and the norm is computed without building a graph.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit import registry
from peftkit.adapters.lora import LoraBranch, LoraLayer, LoraOptions
from peftkit.errors import StateError
from peftkit.gather import held_as_shard
from peftkit.layer import adapter_dtype, linear_types


class DoraBranch(LoraBranch):
    """A LoRA branch plus the magnitude ``lora_magnitude_vector`` (out,) (PEFT's saved key)."""

    def __init__(self, in_features: int, out_features: int, r: int, dropout: float,
                 dtype: torch.dtype, device: torch.device, init: bool | str = True) -> None:
        super().__init__(in_features, out_features, r, dropout, dtype, device, init)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features, dtype=dtype, device=device))


@registry.architecture("dora", options=LoraOptions, peft_type="LORA", peft_flag="use_dora",
                       description="weight-decomposed LoRA m·(W + s·B·A)/‖W + s·B·A‖ (PEFT's use_dora)")
class DoraLayer(LoraLayer):
    """DoRA on a linear base (nn.Linear, Conv1D, bnb 4/8-bit: W dequantized for the norm)."""

    saved_suffixes = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    supported_types = linear_types()
    expert_layer = None  # a fused expert stack has no per-row norm PEFT defines: refused at wrap

    @classmethod
    def for_base(cls, base_layer: nn.Module) -> type:
        return cls

    @staticmethod
    def options_from_peft_config(peft_config: Any) -> dict[str, Any]:
        """A PEFT ``LoraConfig(use_dora=True)``'s options: LoRA's reader, with use_dora the selector, not a refusal."""
        plain = copy.copy(peft_config)
        plain.use_dora = False
        return LoraLayer.options_from_peft_config(plain)

    def make_branch(self, name: str, r: int, alpha: float, config: Any) -> nn.Module:
        init = config.options.get("architecture", {}).get("init_lora_weights", True)
        branch = DoraBranch(self.in_features, self.out_features, r, config.dropout,
                            adapter_dtype(self.base_layer), self.base_layer.weight.device, init)
        a, b = branch.effective_factors()
        with torch.no_grad():
            weight = self.base_weight(a.dtype if a.dtype == torch.float64 else torch.float32)
            scale = config.scaling(r, alpha)
            norm = torch.linalg.vector_norm(weight + (b @ a).to(weight.dtype) * scale, dim=1)
            branch.lora_magnitude_vector.copy_(norm.to(branch.lora_magnitude_vector.dtype))
        return branch

    def weight_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """‖W + ΔW‖ per output row (out,), detached; ``weight`` is the dense base weight (out, in)."""
        a, b = self.adapters[name].effective_factors()
        with torch.no_grad():
            b, a = b.detach().to(weight.dtype), a.detach().to(weight.dtype)
            return torch.linalg.vector_norm(torch.addmm(weight.detach(), b, a, alpha=self.scaling[name]), dim=1)

    def _dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole (out, in) base weight, detached. The norm needs every row whole, so where an engine holds
        only a shard at this point (an FSDP2 DTensor outside its unit's forward, a ZeRO-3 partition not gathered)
        it is gathered for the read (``base_weight``: a collective, in forward order on every process)."""
        weight = self.base_layer.weight
        if self.kind in ("linear", "conv1d") and not held_as_shard(weight):
            weight = weight.detach()
            return (weight.t() if self.kind == "conv1d" else weight).to(dtype)
        return self.base_weight(dtype)  # dequantized (bnb) and/or gathered

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        bias = self.bias
        for name, branch in self.live_branches():
            a, b = branch.effective_factors()
            weight = self._dense_weight(a.dtype)
            gain = branch.lora_magnitude_vector / self.weight_norm(name, weight)  # (out,), grad to m only
            x_a = x if x.dtype == a.dtype else x.to(a.dtype)
            if branch.dropout is not None and self.training:
                x_a = branch.dropout(x_a)
                base_out = F.linear(x_a, weight)
            else:
                base_out = result if bias is None else result - bias
                base_out = base_out.to(a.dtype)
            # (g − 1)·base + g·s·lora, as g·(base + s·lora) − base: two passes over the output, not four
            lora_out = F.linear(F.linear(x_a, a), b)
            delta = gain * torch.add(base_out, lora_out, alpha=self.scaling[name]) - base_out
            result = result + delta.to(result.dtype)
        return result

    def _merged(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Each adapter's norm is ‖W₀ + ΔW‖ on the ORIGINAL base W₀, as in the forward (and PEFT's), while its gain
        # scales the weight as it stands (the forward's running output, which holds the adapters before it). From
        # the second adapter on, the weight merge_weights gets holds earlier merges: W₀ is kept here for the call.
        self.__dict__["_norm_base"] = self._original_weight()
        try:
            return super()._merged(names)
        finally:
            self.__dict__.pop("_norm_base", None)

    def _original_weight(self) -> torch.Tensor:
        """W₀ (out, in): the stored base weight with the adapters merged into it undone, newest first, each with
        the values it was merged with (the records ``unmerge`` uses)."""
        weight = self.base_weight()
        with torch.no_grad():
            for name in reversed(self.merged_adapters):
                weight, _ = self.merge_undone(name, weight, None)
        return weight

    def merge_weights(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        base = self.__dict__.get("_norm_base")
        norm = self.weight_norm(name, weight if base is None else base.to(weight.dtype))
        # Unmerge divides by the gain of the merge, so keep this norm (the weight it came from is overwritten).
        self.__dict__.setdefault("_merge_norms", {})[name] = norm
        gain = (self.adapters[name].lora_magnitude_vector.detach().to(weight.dtype) / norm).unsqueeze(1)
        return gain * (weight + self.delta_weight(name).to(weight.dtype)), bias

    def unmerge_weights(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        norm = self.__dict__.get("_merge_norms", {}).get(name)  # kept: a check may replay the unmerge
        if norm is None:
            raise StateError(f"unmerge: {self.module_name} has no record of merging DoRA adapter '{name}'; reload "
                             "the base model")
        gain = (self.adapters[name].lora_magnitude_vector.detach().to(weight.dtype) / norm).unsqueeze(1)
        return weight / gain - self.delta_weight(name).to(weight.dtype), bias

    def export_lora(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """W' − W as an exact LoRA (A (k, in), B (out, k), s = 1), k = min(out, in): DoRA's update
        (g − 1)·W + g·s·B·A is full rank in general (``export(to="lora")``)."""
        a = self.adapters[name].lora_A.weight
        weight = self.base_weight(torch.float64)
        branch = self.adapters[name]
        a64, b64 = (t.detach().to(torch.float64) for t in branch.effective_factors())
        moved = weight + (b64 @ a64) * self.scaling[name]
        gain = branch.lora_magnitude_vector.detach().to(torch.float64) / torch.linalg.vector_norm(moved, dim=1)
        update = gain[:, None] * moved - weight
        out_features, in_features = update.shape
        # An identity factor on the smaller side: exact, rank min(out, in), and continuous in W (an SVD's factors
        # would rotate with rounding-level changes of the base between two exports).
        if out_features <= in_features:
            return update.to(a.dtype), torch.eye(out_features, dtype=a.dtype, device=a.device), 1.0
        return torch.eye(in_features, dtype=a.dtype, device=a.device), update.to(a.dtype), 1.0

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        tensors = super().saved_tensors(name)
        tensors["lora_magnitude_vector"] = self.adapters[name].lora_magnitude_vector.detach()
        return tensors

    def load_saved_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        super().load_saved_tensors(name, tensors)
        with torch.no_grad():
            self.adapters[name].lora_magnitude_vector.copy_(tensors["lora_magnitude_vector"])

    def peft_config_fields(self, adapter_name: str, config: Any) -> dict[str, Any]:
        return {"use_dora": True}


registry.register_method(
    "dora", architecture="dora",
    lr_convention=registry.LRConvention("lora", 1.0, "the paper trains DoRA at LoRA's learning rate"),
    description="DoRA (Liu et al. 2024): LoRA with a learned per-row magnitude, PEFT's use_dora format",
)
