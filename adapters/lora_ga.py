"""LoRA-GA (lora-ga.md): (A₀, B₀) from the SVD of the full-weight gradient G, function kept by a frozen offset.

With G = U Σ Vᵀ and disjoint index sets I_A ∪ I_B = {0..2r−1} (``direction``): A₀ = c·V_{I_A}ᵀ, B₀ = c·U_{I_B},
so that the first SGD step moves W by −η s² c² [G]_{2r} (the authors' semantics, cos = 1). The frozen offset pair
(``LoraBranch.set_offset(A₀, B₀)``) gives ΔW = s(B·A − B₀A₀) = 0 at init on any base, quantized included,
and the saved adapter is the exact rank-2r PEFT LoRA [A; A₀], [B, −B₀] valid on the original base.

``peft_compat=True`` reproduces PEFT 0.21.2's variant instead (B·diag(σ_{I_B}), ``stable`` on B only with
out = weight.shape[0] as stored, ``random`` with the same indices for A and B, ``weight_svd``, ``gd`` on both).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from peftkit import registry
from peftkit.errors import ConfigError
from peftkit.expert_stats import ExpertMatrix, expert_gradient_triplets, expert_layers
from peftkit.gradient_passes import GradientStatisticsOptions, check_gradient_options, gradient_triplets
from peftkit.stats import adapter_name_of, check_batches, check_double_rank
from peftkit.validation import option

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "gd", "unit", "weightS", "weight_svd")


@dataclass
class _LoraGAFactorOptions:
    direction: str = option("ArB2r", choices=DIRECTIONS)  # which of the top-2r singular vectors go to A and to B
    # (lora-ga.md table)
    # stable: c = out^{1/4}/√γ; gd: 1/s; unit: 1; weightS: mean √(σᵢ(W)/s), i < r
    scale: str = option("stable", choices=SCALES)
    stable_gamma: float = option(16.0, gt=0)  # γ of the stable scale
    norm_clip: bool = False  # shrink the init when max|s·B₀A₀| > max|W| (authors' option)
    peft_compat: bool = False  # PEFT 0.21.2's variant (module docstring), for parity


@dataclass
class LoraGAOptions(GradientStatisticsOptions, _LoraGAFactorOptions):
    """LoRA-GA's options: how the triplets become (A₀, B₀), then the gradient-statistics options
    (``peftkit.gradient_passes.GradientStatisticsOptions``: sketch, passes, groups, memory, device, solver)."""


def _split(direction: str, r: int, peft_compat: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(I_A, I_B): indices into the top-2r singular triplets."""
    if direction == "ArB2r":
        return torch.arange(r), torch.arange(r, 2 * r)
    if direction == "A2rBr":
        return torch.arange(r, 2 * r), torch.arange(r)
    if direction == "ArBr":
        return torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    perm = torch.randperm(2 * r)  # the wrap's seeded RNG: identical on every process
    return (perm[:r], perm[:r]) if peft_compat else (perm[:r], perm[r:])


def _check(options: dict) -> None:
    """Across options (each option's own type and range is declared on LoraGAOptions)."""
    if options["scale"] == "weight_svd" and not options["peft_compat"]:
        raise ConfigError("scale: 'weight_svd' is PEFT's variant; pass peft_compat=True, or use scale='weightS'")
    check_gradient_options(options)
    if options["peft_compat"] and options["gradient_sketch"] not in ("auto", None):
        raise ConfigError(f"gradient_sketch: peft_compat=True reproduces PEFT's SVD of the whole G; got "
                          f"gradient_sketch={options['gradient_sketch']!r}, leave it at 'auto' (exact under "
                          "peft_compat) or pass None")
    if options["peft_compat"] and options["svd"] == "randomized":
        raise ConfigError("svd: peft_compat=True reproduces PEFT's exact SVD; got svd='randomized', use svd='exact' "
                          "(or 'auto', which is exact under peft_compat)")


def _boundaries(direction: str):
    """The j whose top-j singular subspaces the certified solver must get right, for ``rank`` = 2r triplets:
    every j. A₀ and B₀ are single singular vectors (rows of Vᵀ, columns of U), not only spans, so each vector
    must be the exact SVD's to round-off; a vector is pinned by the top-(j − 1) and top-j subspaces around it.
    (ΔW of the first step would need only the halves r and 2r; the factors AdamW trains need every j.)"""
    return lambda rank: range(1, rank + 1)


def lora_ga_factors(grad_u: torch.Tensor, grad_s: torch.Tensor, grad_vh: torch.Tensor, r: int, s: float,
                    layer, options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀ (r, in), B₀ (out, r)) in fp32 from the top-2r signed triplets of G (out × in)."""
    idx_a, idx_b = _split(options["direction"], r, options["peft_compat"])
    a0 = grad_vh[idx_a]
    b0 = grad_u[:, idx_b]
    out_features = layer.out_features
    scale = options["scale"]
    if options["peft_compat"]:
        b0 = b0 * grad_s[idx_b]
        stored_out = layer.base_layer.weight.shape[0] if layer.kind == "conv1d" else out_features
        if scale == "stable":
            b0 = b0 * (stored_out ** 0.25 / math.sqrt(options["stable_gamma"]))
        elif scale == "weight_svd":
            sigma_w = torch.linalg.svdvals(layer.base_weight())[0]
            if grad_s[idx_b][0] > 0:
                b0 = b0 * (sigma_w / grad_s[idx_b][0])
        elif scale == "gd":
            a0, b0 = a0 / s, b0 / s
        elif scale == "weightS":
            raise ConfigError("scale: 'weightS' is the authors' option; PEFT's is 'weight_svd' (peft_compat=True)")
        return a0, b0
    if scale == "stable":
        c = out_features ** 0.25 / math.sqrt(options["stable_gamma"])
    elif scale == "gd":
        c = 1.0 / s  # s²·c_A·c_B = 1: the first step is −η·[G]_2r (the full-FT step size)
    elif scale == "unit":
        c = 1.0
    else:  # weightS
        sigma_w = torch.linalg.svdvals(layer.base_weight())[:r]
        c = float(torch.sqrt(sigma_w / s).mean())
    return a0 * c, b0 * c


@registry.init("lora-ga", options=LoraGAOptions, needs_data=True, architectures=("lora", "dora"),
               expert_parameters=True,
               description="A₀, B₀ from the SVD of the full-weight gradient, frozen offset keeps the function")
def lora_ga_init(model, layers, config, data) -> None:
    options = dict(vars(config.axis_options("init")))
    _check(options)
    if options["peft_compat"]:
        options["svd"] = "exact"  # PEFT's parity: its (effectively exact) SVD, whatever "auto" would pick
        options["gradient_sketch"] = None  # of the whole G
    batches = check_batches(data, "lora-ga")
    adapter = adapter_name_of(model, config)
    check_double_rank(layers, adapter, 2, "LoRA-GA")
    layers, experts = expert_layers(layers)
    ranks = {name: 2 * layer.ranks[adapter] for name, layer in layers.items()}
    for name, u, sv, vh in gradient_triplets(model, layers, batches, ranks, options, seed=config.seed,
                                             boundaries=_boundaries(options["direction"])) if layers else ():
        layer = layers[name]
        r = layer.ranks[adapter]
        s = layer.scaling[adapter]
        branch = layer.adapters[adapter]
        if not sv[0] > 0:
            warnings.warn(f"lora-ga: {name} got a zero gradient on the given batches; it keeps the standard LoRA "
                          "init (B = 0)", stacklevel=2)
            continue
        a0, b0 = lora_ga_factors(u, sv, vh, r, s, layer, options)
        if options["norm_clip"] and not options["peft_compat"]:
            ratio = float(layer.base_weight().abs().max() / (s * (b0 @ a0)).abs().max())
            if ratio < 1.0:
                a0, b0 = a0 * math.sqrt(ratio), b0 * math.sqrt(ratio)
        dtype = branch.lora_A.weight.dtype
        with torch.no_grad():
            # Cast first, then offset from the cast values: ΔW = s(BA − B₀A₀) is zero in the adapter dtype.
            branch.lora_A.weight.copy_(a0.to(dtype))
            branch.lora_B.weight.copy_(b0.to(dtype))
        # Copies: the frozen pair must not share storage with the trainable one.
        branch.set_offset(branch.lora_A.weight.detach().clone(), branch.lora_B.weight.detach().clone())
    if experts:
        _init_experts(model, experts, batches, options, adapter, config.seed)


def _init_experts(model, experts, batches, options, adapter: str, seed: int) -> None:
    """LoRA-GA per expert matrix: (A₀_e, B₀_e) from the SVD of the expert's own gradient G_e, offset per expert."""
    ranks = {name: 2 * layer.ranks[adapter] for name, layer in experts.items()}
    factors: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {name: {} for name in experts}
    for name, e, u, sv, vh in expert_gradient_triplets(model, experts, batches, ranks, options, seed=seed,
                                                       boundaries=_boundaries(options["direction"])):
        layer = experts[name]
        r, s = layer.ranks[adapter], layer.scaling[adapter]
        if not sv[0] > 0:
            # An expert no token of the batches was routed to: it keeps the standard init (B = 0, A random).
            warnings.warn(f"lora-ga: expert {e} of {layer.target_name} got a zero gradient on the given batches (no "
                          "token routed to it); it keeps the standard LoRA init (B = 0)", stacklevel=3)
            continue
        matrix = ExpertMatrix(layer, e)
        a0, b0 = lora_ga_factors(u, sv, vh, r, s, matrix, options)
        if options["norm_clip"] and not options["peft_compat"]:
            ratio = float(matrix.base_weight().abs().max() / (s * (b0 @ a0)).abs().max())
            if ratio < 1.0:
                a0, b0 = a0 * math.sqrt(ratio), b0 * math.sqrt(ratio)
        factors[name][e] = (a0, b0)
    for name, layer in experts.items():
        branch = layer.adapters[adapter]
        with torch.no_grad():
            for e, (a0, b0) in factors[name].items():
                branch.lora_A[e].copy_(a0.to(branch.lora_A[e].dtype))
                branch.lora_B[e].copy_(b0.to(branch.lora_B[e].dtype))
        # Every expert gets an offset (zero-gradient experts: their own random A and B = 0, so B₀A₀ = 0).
        branch.set_offset(torch.stack([a.detach() for a in branch.lora_A]),
                          torch.stack([b.detach() for b in branch.lora_B]))


registry.register_method(
    "lora-ga", architecture="lora", init="lora-ga", defaults={"rslora": True, "alpha": 16.0},
    lr_convention=registry.LRConvention("full-ft", 0.1, "AdamW at about the full-FT lr; the author: tune LoRA-GA's lr "
                                        "like full FT; repo 2e-5 on Llama-2-7B vs LoRA's 2e-4 (lora-ga.md)"),
    description="LoRA-GA (Wang et al. 2024): gradient-SVD init whose first step follows the rank-2r full-FT step; "
                "rsLoRA, stable scale, function kept by a frozen offset; saved as an exact rank-2r PEFT LoRA",
)
