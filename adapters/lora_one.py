"""LoRA-One's init (lora-one.md, the authors' final code): one normalised rank-r gradient step, no offset.

With −G = Ũ Σ Ṽᵀ: B₀ = Ũ_{:, :r}·Σ_r^{1/2}/√(γσ₁) and A₀ = Σ_r^{1/2}·Ṽ_{:r}ᵀ/√(γσ₁), so that
s·B₀A₀ = −(s/(γσ₁))·[G]_r: the model at init has already taken a step of spectral norm s/γ. The factors are
balanced (‖A₀[i]‖ = ‖B₀[:, i]‖). The preset trains with AdamW; the preconditioned optimizer is the separate
optimizer component ``lora-one-preconditioner`` (``peftkit.wrap(model, "lora-one", optimizer=...)``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from peftkit import registry
from peftkit.expert_stats import expert_gradient_triplets, expert_layers
from peftkit.gradient_passes import GradientStatisticsOptions, check_gradient_options, gradient_triplets
from peftkit.stats import adapter_name_of, check_batches
from peftkit.validation import option


@dataclass
class _LoraOneStepOptions:
    gamma: float = option(128.0, gt=0)  # γ: the init step has spectral norm s/γ


@dataclass
class LoraOneOptions(GradientStatisticsOptions, _LoraOneStepOptions):
    """LoRA-One's options: γ, then the gradient-statistics options
    (``peftkit.gradient_passes.GradientStatisticsOptions``: sketch, passes, groups, memory, device, solver), as
    LoRA-GA's."""


def lora_one_factors(u: torch.Tensor, sv: torch.Tensor, vh: torch.Tensor,
                     gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀ (r, in), B₀ (out, r)) from the top-r signed triplets (u, sv, vh) of −G; sv[0] = σ₁ > 0."""
    root = (sv / (gamma * sv[0])).sqrt()
    return root[:, None] * vh, u * root


@registry.init("lora-one", options=LoraOneOptions, needs_data=True, architectures=("lora",), expert_parameters=True,
               description="A₀, B₀ from the top-r SVD of −G with √σ weights and 1/√(γσ₁): one normalised step")
def lora_one_init(model, layers, config, data) -> None:
    options = vars(config.axis_options("init"))  # a fresh filled instance: its __dict__ is ours
    gamma = options["gamma"]  # types and ranges: LoraOneOptions
    check_gradient_options(options)
    batches = check_batches(data, "lora-one")
    adapter = adapter_name_of(model, config)
    layers, experts = expert_layers(layers)
    ranks = {name: layer.ranks[adapter] for name, layer in layers.items()}
    # Every j: A₀ and B₀ are single singular vectors (√σᵢ-weighted), each of which must be the exact SVD's.
    for name, u, sv, vh in gradient_triplets(model, layers, batches, ranks, options, seed=config.seed, negate=True,
                                             boundaries=lambda rank: range(1, rank + 1)) if layers else ():
        branch = layers[name].adapters[adapter]
        if not sv[0] > 0:
            warnings.warn(f"lora-one: {name} got a zero gradient on the given batches; it keeps the standard LoRA "
                          "init (B = 0)", stacklevel=2)
            continue
        a0, b0 = lora_one_factors(u, sv, vh, float(gamma))
        with torch.no_grad():
            branch.lora_A.weight.copy_(a0.to(branch.lora_A.weight.dtype))
            branch.lora_B.weight.copy_(b0.to(branch.lora_B.weight.dtype))
    # Per expert matrix: the same step along the expert's own −G_e (every expert's step measured before any moves).
    ranks = {name: layer.ranks[adapter] for name, layer in experts.items()}
    steps = []
    for name, e, u, sv, vh in expert_gradient_triplets(model, experts, batches, ranks, options, seed=config.seed,
                                                       negate=True) if experts else ():
        if not sv[0] > 0:
            warnings.warn(f"lora-one: expert {e} of {experts[name].target_name} got a zero gradient on the given "
                          "batches (no token routed to it); it keeps the standard LoRA init (B = 0)", stacklevel=2)
            continue
        steps.append((name, e, *lora_one_factors(u, sv, vh, float(gamma))))
    with torch.no_grad():
        for name, e, a0, b0 in steps:
            branch = experts[name].adapters[adapter]
            branch.lora_A[e].copy_(a0.to(branch.lora_A[e].dtype))
            branch.lora_B[e].copy_(b0.to(branch.lora_B[e].dtype))


registry.register_method(
    "lora-one", architecture="lora", init="lora-one", defaults={"rslora": True, "alpha": 16.0},
    lr_convention=registry.LRConvention("lora", 1.0, "authors' configs: lr 2e-4 (math), 5e-5 (commonsense), LoRA's "
                                        "rates (lora-one.md, Defaults)"),
    changes_output_at_init=True,
    description="LoRA-One (Zhang et al. 2025): init = one normalised rank-r step along −G (rsLoRA, γ = 128); "
                "AdamW by default, optimizer='lora-one-preconditioner' for the preconditioned form",
)
