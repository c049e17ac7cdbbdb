"""HRA: Householder Reflection Adaptation (Yuan, Liu, Xu; NeurIPS 2024), PEFT's semantics and format (hra.md).

W' = W·Q with Q = H₁H₂⋯H_r, Hᵢ = I − 2ûᵢûᵢᵀ, ûᵢ = uᵢ/‖uᵢ‖, U = [u₁ … u_r] (in, r) saved as ``hra_u``. The bias is
unchanged. The forward never builds an in×in matrix nor W·Q: with the compact WY form Q = I − V T Vᵀ
(V = [û₁ … û_r], T upper-triangular with T⁻¹ = ½I + striu(VᵀV)), the activation is transformed as
z = x Qᵀ = x − ((x V) Tᵀ) Vᵀ in fp32 and then passed through the unchanged base layer, so any base works,
bitsandbytes 4/8-bit included. Several active adapters compose as W·Q_{a1}·Q_{a2}⋯ (the activation meets the
last adapter first), as PEFT.

``apply_GS=True`` orthonormalises U by modified Gram-Schmidt in column order (PEFT's order); then
Q = I − 2VVᵀ (T = 2I), which is never the identity (hra.md, "PEFT bug"). The orthogonality regulariser
λ·‖I − ÛᵀÛ‖_F (Frobenius, not squared, Û column-normalised U) is returned by ``regularization()``; the
training loop adds ``peftkit.regularization_loss(model)`` to the loss.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit import registry
from peftkit.errors import ConfigError, StateError
from peftkit.layer import AdapterLayer, adapter_dtype
from peftkit.validation import option


@dataclass
class HraOptions:
    # PEFT's HRAConfig fields (same names, so a PEFT config reads as is).
    apply_GS: bool = False
    # True: paired init U = [h₁, h₁, h₂, h₂, …] (Q = I; needs an even r and no GS); False: Kaiming-uniform columns.
    init_weights: bool = True
    # λ of the orthogonality regulariser λ·Σ_layers ‖I − ÛᵀÛ‖_F; 0 (PEFT's behaviour) switches it off.
    orth_reg_weight: float = option(0.0, ge=0)


class HraBranch(nn.Module):
    """One HRA adapter: U (in, r) as ``hra_u`` (PEFT's key and layout)."""

    def __init__(self, in_features: int, r: int, dtype: torch.dtype, device: torch.device, paired: bool) -> None:
        super().__init__()
        self.hra_u = nn.Parameter(torch.empty(in_features, r, dtype=dtype, device=device))
        self.reset(paired)

    @torch.no_grad()
    def reset(self, paired: bool) -> None:
        """Paired columns [h₁, h₁, h₂, h₂, …] (needs an even r), or Kaiming-uniform (a = √5) columns."""
        r = self.hra_u.shape[1]
        if paired:
            # Each adjacent pair of equal columns gives H·H = I, so Q = I exactly.
            half = torch.empty(self.hra_u.shape[0], r // 2, dtype=self.hra_u.dtype, device=self.hra_u.device)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            self.hra_u.copy_(torch.repeat_interleave(half, 2, dim=1))
        else:
            nn.init.kaiming_uniform_(self.hra_u, a=math.sqrt(5))


def modified_gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns (in, r) from U (in, r), column by column in order (PEFT's apply_GS)."""
    columns: list[torch.Tensor] = []
    for i in range(u.shape[1]):
        v = u[:, i]
        for q in columns:
            v = v - (q @ v) * q
        columns.append(v / v.norm())
    return torch.stack(columns, dim=1)


@registry.architecture("hra", options=HraOptions,
                       description="orthogonal input-side update W·H₁⋯H_r by Householder reflections (PEFT's HRA)",
                       peft_type="HRA")
class HraLayer(AdapterLayer):
    saved_suffixes = ("hra_u",)

    def __init__(self, base_layer: nn.Module, module_name: str) -> None:
        super().__init__(base_layer, module_name)
        self.hra_options: dict[str, dict[str, Any]] = {}

    def make_branch(self, name: str, r: int, alpha: float, config: Any) -> nn.Module:
        options = config.axis_options("architecture")
        # The paired init is the identity only for even r without Gram-Schmidt: GS turns a pair into an arbitrary
        # (or NaN, for an exactly zero residual) second direction, and I − 2VVᵀ is never I. Otherwise the
        # columns are Kaiming-uniform and the adapter changes the output at init.
        reason = ("apply_GS=True (I − 2VVᵀ is never the identity)" if options.apply_GS
                  else "init_weights=False" if not options.init_weights
                  else f"r = {r} is odd (use an even r)" if r % 2 else None)
        if reason is not None:
            warnings.warn(f"hra: adapter '{name}' starts away from the base model because {reason}; U is "
                          "Kaiming-initialised", stacklevel=4)
        self.hra_options[name] = dataclasses.asdict(options)
        return HraBranch(self.in_features, r, adapter_dtype(self.base_layer), self.base_layer.weight.device,
                         paired=reason is None)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.hra_options.pop(name, None)

    # ------------------------------------------------------------------ the reflections
    def reflections(self, name: str, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(V (in, r), T (r, r)) with Q = H₁⋯H_r = I − V T Vᵀ, in ``dtype`` (default: fp32, fp64 for fp64 U)."""
        u = self.adapters[name].hra_u
        work = dtype or torch.promote_types(u.dtype, torch.float32)
        u = u.to(work)
        r = u.shape[1]
        eye = torch.eye(r, dtype=work, device=u.device)
        if self.hra_options[name]["apply_GS"]:
            return modified_gram_schmidt(u), 2.0 * eye
        v = u / u.norm(dim=0)
        t_inverse = 0.5 * eye + torch.triu(v.t() @ v, diagonal=1)
        return v, torch.linalg.solve_triangular(t_inverse, eye, upper=True)

    def transform_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x Qᵀ = x − ((x V) Tᵀ) Vᵀ for x (..., in), in the reflection dtype: O(N·r·in), no in×in tensor."""
        v, t = self.reflections(name)
        # Row layout (r, in) for the skinny GEMMs: on CPU, x·V with V (in, r) and its gradient Xᵀ·(N, r) run
        # several times slower than F.linear(x, Vᵀ) and (N, r)ᵀ·X (measured 946 vs 508 µs, 1372 vs 183 µs).
        v_rows = v.t().contiguous()
        flat = x.reshape(-1, self.in_features).to(v.dtype)
        projected = F.linear(flat, t @ v_rows)  # x V Tᵀ, (N, r)
        return torch.addmm(flat, projected, v_rows, alpha=-1.0).view(*x.shape[:-1], self.in_features)

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        z = x
        # W' = W Q_{a1} Q_{a2} ⋯ ⇒ x W'ᵀ = x ⋯ Q_{a2}ᵀ Q_{a1}ᵀ Wᵀ: the last active adapter acts first.
        for name in reversed(self.active_adapters):
            if not self.gated(name):
                z = self.transform_input(name, z)
        return self.base_layer(z.to(x.dtype), *args, **kwargs)

    # ------------------------------------------------------------------ merge
    def _check_nonzero_columns(self, name: str) -> None:
        norms = self.adapters[name].hra_u.detach().norm(dim=0)
        if not bool((norms > 0).all()):
            raise StateError(
                f"{self.module_name}: HRA adapter '{name}' has a zero column in hra_u (columns "
                f"{torch.nonzero(norms == 0).flatten().tolist()}), which defines no reflection; re-initialise or "
                "reload the adapter")

    def merge_weights(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        """W ← W Q = W − (W V) T Vᵀ (bias unchanged); W (out, in) in fp32/fp64."""
        self._check_nonzero_columns(name)
        v, t = self.reflections(name, weight.dtype)
        return weight - ((weight @ v) @ t) @ v.t(), bias

    def unmerge_weights(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        """W ← W Qᵀ = W − (W V) Tᵀ Vᵀ, the exact inverse (Q orthogonal)."""
        v, t = self.reflections(name, weight.dtype)
        return weight - ((weight @ v) @ t.t()) @ v.t(), bias

    # ------------------------------------------------------------------ export as a LoRA
    def export_lora(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A = Vᵀ (r, in), B = −W₀ V T (out, r), 1.0): W₀ Q − W₀ = −W₀ V T Vᵀ has rank ≤ r, so
        base(x) + x Aᵀ Bᵀ is this adapter exactly, on the weight the forward computes with (dequantized on a
        quantized base). The bias is unchanged by HRA."""
        if self.merged_adapters:
            raise StateError(f"export: {self.module_name} is merged; call peftkit.unmerge(model) before exporting")
        self._check_nonzero_columns(name)
        dtype = self.adapters[name].hra_u.dtype
        with torch.no_grad():
            weight = self.base_weight(torch.promote_types(dtype, torch.float32))
            v, t = self.reflections(name, weight.dtype)
            lora_b = -((weight @ v) @ t)
        return v.t().to(dtype).contiguous(), lora_b.to(dtype), 1.0

    # ------------------------------------------------------------------ regulariser
    def regularization(self) -> torch.Tensor | None:
        """λ·Σ_adapters ‖I − ÛᵀÛ‖_F over the active, gated-on adapters with λ > 0 (a 0-dim tensor), or None."""
        total = None
        for name in self.active_adapters:
            weight = self.hra_options[name]["orth_reg_weight"]
            if self.gated(name) or weight == 0:
                continue
            u = self.adapters[name].hra_u
            u_hat = u / u.norm(dim=0)
            eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
            term = weight * torch.linalg.matrix_norm(eye - u_hat.t() @ u_hat)
            total = term if total is None else total + term
        return total

    # ------------------------------------------------------------------ PEFT's HRA format
    def load_saved_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        super().load_saved_tensors(name, tensors)
        self._check_nonzero_columns(name)

    @staticmethod
    def options_from_peft(peft_config: dict[str, Any]) -> dict[str, Any]:
        """HRA options from a PEFT ``HRAConfig`` dict (``apply_GS``, ``init_weights``)."""
        return {"apply_GS": bool(peft_config.get("apply_GS", False)),
                "init_weights": bool(peft_config.get("init_weights", True)),
                "orth_reg_weight": 0.0}

    @staticmethod
    def options_from_peft_config(peft_config: Any) -> dict[str, Any]:
        """The options of a PEFT ``HRAConfig`` object (r, apply_GS, init_weights); its options peftkit's HRA does
        not implement are one ConfigError."""
        if (getattr(peft_config, "layers_to_transform", None) is not None
                or getattr(peft_config, "bias", "none") != "none"):
            raise ConfigError(f"{type(peft_config).__name__}: layers_to_transform and bias are not supported by "
                              "peftkit's HRA; leave them unset")
        return dict(r=peft_config.r, apply_GS=bool(peft_config.apply_GS), init_weights=bool(peft_config.init_weights))

    def peft_config_fields(self, adapter_name: str, config: Any) -> dict[str, Any]:
        """The ``HRAConfig`` keys PEFT needs beside the common ones."""
        options = config.axis_options("architecture")
        return {"apply_GS": bool(options.apply_GS), "init_weights": bool(options.init_weights),
                "bias": "none", "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None}


registry.register_method(
    "hra", architecture="hra",
    lr_convention=registry.LRConvention(
        "lora", 3.0,
        "authors' GLUE scripts (DeBERTaV3-base, the input-side form peftkit implements; HRA repo "
        "nlu/experiments/glue/*.sh): lr 4e-3 (RTE), 5.5e-3 (MRPC), 6e-3 (SST-2), 1e-2 (MNLI), about 10x the LoRA "
        "paper's GLUE rates (4e-4 to 5e-4); method guide: within 2 points of LoRA's best at 3x on all four tasks; "
        "best at 9x on MiniLM, 27x collapses"),
    description="HRA (Yuan et al. 2024): W·H₁⋯H_r, orthogonal input-side reflections; PEFT's HRA semantics and format",
)
