"""Hydra (Kim et al., arXiv 2309.06922): a parallel and a sequential low-rank branch (hydra.md).

For a base layer y₀ = x W₀ᵀ + b₀ (the pre-trained output, bias included):
    y = y₀ + s_p·((D(x A_pᵀ + a_p)) B_pᵀ + b_p) + s_s·((D(y₀ A_sᵀ + a_s)) B_sᵀ + b_s)
A_p (r_p, in), B_p (out, r_p): the parallel branch, a LoRA on the input; A_s (r_s, out), B_s (out, r_s): the
sequential branch, a square out→out low-rank map on the pre-trained output. B_p = B_s = 0 at init (exact no-op).
The branch biases a_*, b_* exist only with ``branch_bias=True`` (the vtab code); D is dropout between the down
and up projections. The scales s_p, s_s are the code's ``scale`` (``alpha`` and ``rslora`` are not used).

Merge (exact): W' = (I + s_s B_s A_s) W₀ + s_p B_p A_p, b' = (I + s_s B_s A_s) b₀ + c with
c = s_p (B_p a_p + b_p) + s_s (B_s a_s + b_s); unmerge inverts it with the Woodbury identity (an r_s×r_s solve).
Several active adapters compose in order: adapter k's sequential branch reads the output of the layer adapted
by adapters 1…k−1, which is what merging them one after the other gives.

Save: native format (``parallel_A.weight`` …). ``peftkit.export`` writes the exact PEFT LoRA of rank r_p + r_s:
lora_A = [A_p; A_s W₀], lora_B = [s_p B_p, s_s B_s], scaling 1, and ``lora_B.bias`` = the bias change c' = b' − b₀
whenever it is non-zero (branch biases, or a biased base: the sequential branch reads y₀ = x W₀ᵀ + b₀).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from peftkit import registry
from peftkit.errors import ConfigError, StateError
from peftkit.layer import AdapterLayer, adapter_dtype
from peftkit.validation import option

DOWN_INITS = ("kaiming", "xavier", "normal")


@dataclass
class HydraOptions:
    # r_s, the rank of the sequential branch; None: the layer's r (r is r_p, rank_pattern applies to it).
    sequential_r: int | None = option(None, gt=0)
    # s_p (the reference code's ``scale``) and s_s (None: equal to s_p, as the code).
    scale: float = 1.0
    sequential_scale: float | None = None
    # The down/up projection biases a_p, b_p, a_s, b_s (zero-initialised), as the vtab code.
    branch_bias: bool = False
    # Init of A_p, A_s: "kaiming" (uniform, a = √5; nlu code), "xavier" (uniform; vtab), "normal" (std 0.02; elevater).
    down_init: str = option("kaiming", choices=DOWN_INITS)


def _options(config: Any) -> HydraOptions:
    options = config.axis_options("architecture")
    r_s = options.sequential_r
    if r_s is not None and (isinstance(r_s, bool) or not isinstance(r_s, int) or r_s <= 0):
        raise ConfigError(f"sequential_r: expected a positive integer rank or None (= r), got {r_s!r}")
    for key in ("scale", "sequential_scale"):
        value = getattr(options, key)
        if value is None and key == "sequential_scale":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number (the Hydra branch scale), got {value!r}")
    if not isinstance(options.branch_bias, bool):
        raise ConfigError(f"branch_bias: expected True or False, got {options.branch_bias!r}")
    if options.down_init not in DOWN_INITS:
        raise ConfigError(f"down_init: expected one of {list(DOWN_INITS)}, got {options.down_init!r}")
    if config.rslora:
        raise ConfigError("rslora: Hydra has no alpha/r scaling (its scales are 'scale' and 'sequential_scale'); "
                          "remove rslora=True")
    return options


class HydraBranch(nn.Module):
    """One Hydra adapter: ``parallel_A`` (r_p, in), ``parallel_B`` (out, r_p), ``sequential_A`` (r_s, out),
    ``sequential_B`` (out, r_s) as ``nn.Linear`` modules (with biases a_p, b_p, a_s, b_s when ``branch_bias``)."""

    def __init__(self, in_features: int, out_features: int, r_p: int, r_s: int, options: HydraOptions,
                 dropout: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        bias = options.branch_bias
        kwargs = dict(bias=bias, dtype=dtype, device=device)
        self.parallel_A = nn.Linear(in_features, r_p, **kwargs)
        self.parallel_B = nn.Linear(r_p, out_features, **kwargs)
        self.sequential_A = nn.Linear(out_features, r_s, **kwargs)
        self.sequential_B = nn.Linear(r_s, out_features, **kwargs)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.parallel_scale = float(options.scale)
        seq = options.sequential_scale
        self.sequential_scale = float(options.scale if seq is None else seq)
        self.reset(options.down_init)

    @torch.no_grad()
    def reset(self, down_init: str) -> None:
        for down in (self.parallel_A, self.sequential_A):
            if down_init == "kaiming":
                nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            elif down_init == "xavier":
                nn.init.xavier_uniform_(down.weight)
            else:
                nn.init.normal_(down.weight, std=0.02)
        for module in (self.parallel_A, self.parallel_B, self.sequential_A, self.sequential_B):
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.parallel_B.weight)
        nn.init.zeros_(self.sequential_B.weight)

    def bias_change(self, b0: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """c = s_p (B_p a_p + b_p) + s_s (B_s A_s b₀ + B_s a_s + b_s), (out,); None without biases anywhere."""
        terms = []
        if self.parallel_A.bias is not None:
            terms.append(self.parallel_scale * (self.parallel_B.weight.to(dtype) @ self.parallel_A.bias.to(dtype)
                                                + self.parallel_B.bias.to(dtype)))
            terms.append(self.sequential_scale * (self.sequential_B.weight.to(dtype) @ self.sequential_A.bias.to(dtype)
                                                  + self.sequential_B.bias.to(dtype)))
        if b0 is not None:
            terms.append(self.sequential_scale * (self.sequential_B.weight.to(dtype)
                                                  @ (self.sequential_A.weight.to(dtype) @ b0.to(dtype))))
        return sum(terms) if terms else None


@registry.architecture("hydra", options=HydraOptions,
                       description="parallel LoRA on x plus a sequential low-rank map on the pre-trained output")
class HydraLayer(AdapterLayer):
    peft_type = None  # native format; peftkit.export writes a PEFT LoRA
    saved_suffixes = tuple(f"{module}.{kind}" for module in ("parallel_A", "parallel_B", "sequential_A", "sequential_B")
                           for kind in ("weight", "bias"))

    def make_branch(self, name: str, r: int, alpha: float, config: Any) -> nn.Module:
        options = _options(config)
        r_s = options.sequential_r or r
        if r_s > self.out_features:
            raise ConfigError(
                f"sequential_r: the sequential rank {r_s} of {self.module_name} exceeds its out_features "
                f"{self.out_features}; lower sequential_r (or r)")
        return HydraBranch(self.in_features, self.out_features, r, r_s, options, config.dropout,
                           adapter_dtype(self.base_layer), self.base_layer.weight.device)

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name, branch in self.live_branches():
            dtype = branch.parallel_A.weight.dtype
            # The sequential branch reads the output before this adapter's own change (y₀ for the first one).
            previous = result.to(dtype)
            # Both up projections in one GEMM added to the output: [s_p h_p, s_s h_s] · [B_p, B_s]ᵀ (the scales
            # go on the small N×r hidden states, not on N×out tensors).
            hidden = torch.cat([branch.parallel_A(x.to(dtype)) * branch.parallel_scale,
                                branch.sequential_A(previous) * branch.sequential_scale], dim=-1)
            if branch.dropout is not None:
                hidden = branch.dropout(hidden)
            # (r_p + r_s, out) rows: the layout in which the skinny GEMMs and their gradients are fast on CPU
            # (see adapters/hra.py).
            up_rows = torch.cat([branch.parallel_B.weight.t(), branch.sequential_B.weight.t()], dim=0)
            flat = torch.addmm(previous.reshape(-1, self.out_features), hidden.reshape(-1, hidden.shape[-1]), up_rows)
            if branch.parallel_B.bias is not None:
                flat = flat + (branch.parallel_scale * branch.parallel_B.bias
                               + branch.sequential_scale * branch.sequential_B.bias)
            result = flat.view(result.shape).to(result.dtype)
        return result

    # ------------------------------------------------------------------ merge
    def merge_weights(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        """W' = (I + s_s B_s A_s) W + s_p B_p A_p; b' = (I + s_s B_s A_s) b + c (W (out, in), fp32/fp64)."""
        branch = self.adapters[name]
        dtype = weight.dtype
        a_p, b_p = branch.parallel_A.weight.to(dtype), branch.parallel_B.weight.to(dtype)
        a_s, b_s = branch.sequential_A.weight.to(dtype), branch.sequential_B.weight.to(dtype)
        merged = weight + branch.sequential_scale * (b_s @ (a_s @ weight)) + branch.parallel_scale * (b_p @ a_p)
        change = branch.bias_change(bias, dtype)
        if change is not None and bias is None:
            raise StateError(
                f"{self.module_name}: Hydra adapter '{name}' has branch biases but the base layer has no bias to "
                "merge them into; keep the adapter unmerged, or export it (peftkit.export) and serve the LoRA")
        return merged, (bias if change is None else bias + change)

    def unmerge_weights(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        """The exact inverse: (I + s B_s A_s)⁻¹ M = M − s B_s (I + s A_s B_s)⁻¹ A_s M (Woodbury, r_s×r_s)."""
        branch = self.adapters[name]
        dtype = weight.dtype
        s = branch.sequential_scale
        a_p, b_p = branch.parallel_A.weight.to(dtype), branch.parallel_B.weight.to(dtype)
        a_s, b_s = branch.sequential_A.weight.to(dtype), branch.sequential_B.weight.to(dtype)
        small = torch.eye(a_s.shape[0], dtype=dtype, device=weight.device) + s * (a_s @ b_s)

        def inverse(m: torch.Tensor) -> torch.Tensor:
            return m - s * (b_s @ torch.linalg.solve(small, a_s @ m))

        restored = inverse(weight - branch.parallel_scale * (b_p @ a_p))
        if bias is None:
            return restored, None
        constant = branch.bias_change(None, dtype)
        shifted = bias if constant is None else bias - constant
        return restored, inverse(shifted.unsqueeze(1)).squeeze(1)

    # ------------------------------------------------------------------ export
    def export_lora(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
        """(A (r_p + r_s, in), B (out, r_p + r_s), 1.0, bias (out,) or None): the exact PEFT LoRA of this adapter
        on the original base, y = base(x) + x Aᵀ Bᵀ (+ bias). W₀ is the weight the forward computes with
        (dequantized on quantized bases). The bias is c = s_p (B_p a_p + b_p) + s_s (B_s A_s b₀ + B_s a_s + b_s):
        the sequential branch reads y₀ = x W₀ᵀ + b₀, so a biased base gives a constant even without branch
        biases. It is returned whenever it is non-zero (None when it is exactly zero, so the LoRA has no bias)."""
        if self.merged_adapters:
            raise StateError(f"export: {self.module_name} is merged; call peftkit.unmerge(model) before exporting")
        branch = self.adapters[name]
        dtype = branch.parallel_A.weight.dtype
        with torch.no_grad():
            weight = self.base_weight(torch.promote_types(dtype, torch.float32))
            a_s = branch.sequential_A.weight.to(weight.dtype)
            lora_a = torch.cat([branch.parallel_A.weight.to(weight.dtype), a_s @ weight], 0)
            lora_b = torch.cat([branch.parallel_scale * branch.parallel_B.weight.to(weight.dtype),
                                branch.sequential_scale * branch.sequential_B.weight.to(weight.dtype)], 1)
            base_bias = None if self.bias is None else self.bias.detach().to(weight.dtype)
            bias = branch.bias_change(base_bias, weight.dtype)
            if bias is not None and not bool(bias.abs().max() > 0):
                bias = None  # zero biases and b₀ = 0 (or B_s = 0): a plain LoRA, which PEFT merges on any base
        return lora_a.to(dtype), lora_b.to(dtype), 1.0, None if bias is None else bias.to(dtype)


registry.register_method(
    "hydra", architecture="hydra",
    lr_convention=registry.LRConvention("lora", 1.0,
                                        "authors' settings: lr 5e-4-5e-3 (vtab), 6e-4 (nlu), LoRA rates (hydra.md)"),
    description="Hydra (Kim et al. 2023): parallel + sequential low-rank branches; exact merge, exports to PEFT LoRA",
)
