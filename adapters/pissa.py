"""PiSSA, MiLoRA and OLoRA: LoRA started from a factorization of the base weight W itself (no data).

- PiSSA (Meng, Wang, Zhang; NeurIPS 2024, arXiv 2404.02948): the principal r singular triplets of W = U S Vᵀ,
  A = √(S_r/s)·V_rᵀ, B = U_r·√(S_r/s), so that s·B·A = [W]_r, the rank-r truncation (PEFT 0.21.2's ``pissa``;
  ``niter`` = K is PEFT's ``pissa_niter_K``, torch.svd_lowrank with K subspace iterations).
- MiLoRA (Wang et al.; NAACL 2025, arXiv 2406.09044): the same with the r *minor* triplets (smallest singular
  values), s·B·A = U_m S_m V_mᵀ. PEFT 0.21.2 has no MiLoRA; the authors' svd_init.py uses PiSSA's scaling (S divided
  by s, then √S on each factor), so s·B·A is the minor part whatever α is.
- OLoRA (Büyükakyüz; arXiv 2406.01775): W = Q R, B = Q[:, :r], A = R[:r] (PEFT 0.21.2's ``olora``: no division by s,
  so s·B·A = s·Q_r R_r).

W is the (out, in) weight (Conv1D's stored (in, out) weight transposed). The residual W − s·B₀·A₀ is not written into
the base: as LoRA-GA's offset, the frozen pair (A₀, B₀) = the init factors gives ΔW = s(B·A − B₀·A₀), so the layer
computes (W − s·B₀A₀) + s·B·A, the papers' residual model, exactly at init on any base (4-bit included: a 4-bit
weight cannot hold W − s·B₀A₀ without a second rounding), and the saved adapter is the exact rank-2r PEFT LoRA
[A; A₀], [B, −B₀] on the original base.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from peftkit import registry
from peftkit.errors import ConfigError
from peftkit.stats import adapter_name_of
from peftkit.validation import option


@dataclass
class PissaOptions:
    # None: the exact SVD (PEFT's "pissa"); K ≥ 1: torch.svd_lowrank with K iterations (PEFT's "pissa_niter_K")
    niter: int | None = option(None, ge=1)


def svd_factors(weight: torch.Tensor, r: int, s: float, which: str,
                niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) with s·B·A = the r principal (``which="major"``) or minor (``"minor"``) singular
    components of ``weight`` (out, in); √S split evenly between the factors, as PEFT's PiSSA."""
    if niter is not None:
        u, sv, v = torch.svd_lowrank(weight, r, niter=niter)
        vh = v.T
    else:
        u, sv, vh = torch.linalg.svd(weight, full_matrices=False)
        keep = slice(0, r) if which == "major" else slice(sv.shape[0] - r, sv.shape[0])
        u, sv, vh = u[:, keep], sv[keep], vh[keep]
    root = torch.sqrt(sv / s)
    return root[:, None] * vh, u * root[None, :]


def qr_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A = R[:r] (r, in), B = Q[:, :r] (out, r)) from the reduced QR of ``weight`` (out, in) (PEFT's OLoRA)."""
    q, rr = torch.linalg.qr(weight)
    return rr[:r].contiguous(), q[:, :r].contiguous()


def _linear_branch(name: str, layer: Any, adapter: str, method: str) -> nn.Module:
    branch = layer.adapters[adapter]
    if not (isinstance(getattr(branch, "lora_A", None), nn.Linear) and hasattr(branch, "set_offset")):
        raise ConfigError(f"targets: {method} factorizes a 2-D (out, in) weight; {name} is a "
                          f"{type(layer.base_layer).__name__}; exclude it (exclude=[...]) or use 'lora' there")
    return branch


def _start_from_weight(layers: dict, config: Any, model: nn.Module, method: str, factorize) -> None:
    """Each layer's (A, B) = ``factorize(W, r, s)``, frozen as the offset pair too, so the output is unchanged."""
    adapter = adapter_name_of(model, config)
    branches = {name: _linear_branch(name, layer, adapter, method) for name, layer in layers.items()}
    for name, layer in layers.items():
        r = layer.ranks[adapter]
        if r > min(layer.out_features, layer.in_features):
            raise ConfigError(f"r: {method} takes r <= min(out, in); {name} ({layer.out_features}x"
                              f"{layer.in_features}) has r = {r}; lower r or set rank_pattern for it")
    for name, layer in layers.items():
        branch = branches[name]
        weight = layer.base_weight()  # fp32 (fp64 for an fp64 base), dequantized, (out, in)
        a0, b0 = factorize(weight, layer.ranks[adapter], layer.scaling[adapter])
        if not torch.isfinite(a0).all() or not torch.isfinite(b0).all():
            warnings.warn(f"{method}: {name} gave non-finite factors (a zero singular value with a non-positive "
                          "scale?); it keeps the standard LoRA init (B = 0)", stacklevel=3)
            continue
        with torch.no_grad():
            # Cast first, then offset from the cast values: ΔW = s(BA − B₀A₀) is zero in the adapter dtype.
            branch.lora_A.weight.copy_(a0.to(branch.lora_A.weight.dtype))
            branch.lora_B.weight.copy_(b0.to(branch.lora_B.weight.dtype))
        branch.set_offset(branch.lora_A.weight.detach().clone(), branch.lora_B.weight.detach().clone())


@registry.init("pissa", options=PissaOptions, architectures=("lora",), expert_parameters=False,
               description="A, B from the principal r singular components of W; residual kept by a frozen offset")
def pissa_init(model, layers, config, data) -> None:
    niter = config.axis_options("init").niter
    _start_from_weight(layers, config, model, "pissa",
                       lambda w, r, s: svd_factors(w, r, s, "major", niter))


@registry.init("milora", architectures=("lora",), expert_parameters=False,
               description="A, B from the minor r singular components of W; residual kept by a frozen offset")
def milora_init(model, layers, config, data) -> None:
    _start_from_weight(layers, config, model, "milora", lambda w, r, s: svd_factors(w, r, s, "minor"))


@registry.init("olora", architectures=("lora",), expert_parameters=False,
               description="A = R[:r], B = Q[:, :r] from the QR of W; residual kept by a frozen offset")
def olora_init(model, layers, config, data) -> None:
    _start_from_weight(layers, config, model, "olora", lambda w, r, s: qr_factors(w, r))


registry.register_method(
    "pissa", architecture="lora", init="pissa",
    lr_convention=registry.LRConvention("lora", 1.0, "PiSSA paper: compared with LoRA under identical setups (one "
                                        "lr for both); LoRA-like"),
    description="PiSSA (Meng et al. 2024): LoRA started from the principal singular components of W, the residual "
                "frozen; saved as an exact rank-2r PEFT LoRA on the original base",
)
registry.register_method(
    "milora", architecture="lora", init="milora",
    lr_convention=registry.LRConvention("lora", 1.0, "authors' repo: LLM-Adapters' LoRA settings unchanged, "
                                        "only the init swapped (their math logs: lr 3e-4, LoRA's)"),
    description="MiLoRA (Wang et al. 2024): LoRA started from the minor singular components of W, the residual "
                "frozen; saved as an exact rank-2r PEFT LoRA on the original base",
)
registry.register_method(
    "olora", architecture="lora", init="olora",
    lr_convention=registry.LRConvention("lora", 1.0, "OLoRA paper: compared with LoRA at one shared rate; LoRA-like"),
    description="OLoRA (Büyükakyüz 2024): LoRA started from the QR factors of W, the residual frozen; saved as an "
                "exact rank-2r PEFT LoRA on the original base",
)
