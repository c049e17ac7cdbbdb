"""LoRA, with PEFT's semantics (lora.md): y = x Wᵀ + b + s·(D(x) Aᵀ) Bᵀ, s = α/r (α/√r with rsLoRA).

A ~ Kaiming-uniform(a=√5) (bound 1/√in), B = 0, dropout only on the branch input, adapters in fp32 on
half-precision and quantized bases. The delta is added with one fused ``addmm_`` into the base output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit import registry
from peftkit.errors import ConfigError
from peftkit.layer import AdapterLayer, adapter_dtype


@dataclass
class LoraOptions:
    # PEFT's init_lora_weights: True (A Kaiming-uniform, B = 0), "gaussian" (A ~ N(0, 1/r)), False (debug:
    # B random too, so the model changes at init).
    init_lora_weights: bool | str = True


class LoraBranch(nn.Module):
    """One LoRA adapter: A (r, in) as ``lora_A.weight``, B (out, r) as ``lora_B.weight`` (PEFT's keys)."""

    def __init__(self, in_features: int, out_features: int, r: int, dropout: float,
                 dtype: torch.dtype, device: torch.device, init: bool | str = True) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(r, out_features, bias=False, dtype=dtype, device=device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        # An optional frozen pair (A0 (r0, in), B0 (out, r0)) subtracted from the update, so that
        # ΔW = s·(B·A − B0·A0). Data-driven inits (LoRA-GA) use it to start from non-zero factors while
        # keeping the function, without touching (possibly quantized) base weights.
        self.register_buffer("offset_A", None)
        self.register_buffer("offset_B", None)
        self.reset(init)

    def set_offset(self, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """Freeze (A0, B0) as the offset pair: A0 (r0, in), B0 (out, r0), in the branch dtype."""
        dtype = self.lora_A.weight.dtype
        device = self.lora_A.weight.device
        self.offset_A = a0.detach().to(device, dtype).contiguous()
        self.offset_B = b0.detach().to(device, dtype).contiguous()

    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B') with ΔW = s·B'·A': the trainable pair, stacked with the negated offset pair if any."""
        a = self.lora_A.weight
        b = self.lora_B.weight
        if self.offset_A is None:
            return a, b
        return torch.cat([a, self.offset_A], 0), torch.cat([b, -self.offset_B], 1)

    @torch.no_grad()
    def reset(self, init: bool | str = True) -> None:
        if init is True:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.lora_A.weight.shape[0])
            nn.init.zeros_(self.lora_B.weight)
        elif init is False:
            self.lora_A.reset_parameters()
            self.lora_B.reset_parameters()
        else:
            raise ConfigError(f"init_lora_weights: expected True, False or 'gaussian', got {init!r}")


@registry.architecture("lora", options=LoraOptions, description="low-rank update s·B·A (PEFT's LoRA)")
class LoraLayer(AdapterLayer):
    peft_type = "LORA"
    saved_suffixes = ("lora_A.weight", "lora_B.weight")

    def make_branch(self, name: str, r: int, alpha: float, config: Any) -> nn.Module:
        init = config.options.get("architecture", {}).get("init_lora_weights", True)
        return LoraBranch(self.in_features, self.out_features, r, config.dropout,
                          adapter_dtype(self.base_layer), self.base_layer.weight.device, init)

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self.gated_off:
                continue
            branch = self.adapters[name]
            a, b = branch.effective_factors()
            x_a = x if x.dtype == a.dtype else x.to(a.dtype)
            if branch.dropout is not None:
                x_a = branch.dropout(x_a)
            hidden = F.linear(x_a, a)
            scale = self.scaling[name]
            if result.dtype == b.dtype and result.is_contiguous():
                flat = result.view(-1, self.out_features)
                hidden = hidden.reshape(-1, hidden.shape[-1])
                if self.kind in ("linear", "conv1d"):
                    # One fused op into the base output: no pass for the scaling, no new output tensor. (The
                    # base matmul saves its input, not its output, so writing into the output is safe.)
                    flat.addmm_(hidden, b.t(), alpha=scale)
                else:
                    # bitsandbytes outputs come from custom autograd Functions: no in-place writes there.
                    result = torch.addmm(flat, hidden, b.t(), alpha=scale).view(result.shape)
            else:
                result = result + (F.linear(hidden, b) * scale).to(result.dtype)
        return result

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.adapters[name].effective_factors()
        return (b @ a) * self.scaling[name]

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        # With an offset pair the saved adapter is the exact rank-(r + r0) LoRA [A; A0], [B, −B0], which is
        # valid on the original base weights (PEFT reads it as plain LoRA).
        a, b = self.adapters[name].effective_factors()
        return {"lora_A.weight": a.detach(), "lora_B.weight": b.detach()}

    def load_saved_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        branch = self.adapters[name]
        if branch.offset_A is not None:
            raise ValueError(f"{self.module_name}: cannot load saved tensors into an adapter with an offset pair")
        with torch.no_grad():
            branch.lora_A.weight.copy_(tensors["lora_A.weight"])
            branch.lora_B.weight.copy_(tensors["lora_B.weight"])

    def saved_rank_alpha(self, name: str) -> tuple[int, float]:
        branch = self.adapters[name]
        if branch.offset_A is None:
            return self.ranks[name], self.alphas[name]
        # Same scaling s at the saved rank r' = r + r0: α' = s·r' (s·√r' with rsLoRA).
        r_saved = self.ranks[name] + branch.offset_A.shape[0]
        s = self.scaling[name]
        rslora = abs(self.alphas[name] / self.ranks[name] ** 0.5 - s) < abs(self.alphas[name] / self.ranks[name] - s)
        return r_saved, s * (r_saved ** 0.5 if rslora else r_saved)

    def factor_pairs(self) -> Iterator[tuple[str, nn.Parameter, nn.Parameter, float]]:
        for name in self.active_adapters:
            branch = self.adapters[name]
            yield name, branch.lora_A.weight, branch.lora_B.weight, self.scaling[name]


registry.register_method(
    "lora", architecture="lora",
    description="LoRA (Hu et al. 2021): trainable low-rank update s·B·A, PEFT's semantics and format",
)
