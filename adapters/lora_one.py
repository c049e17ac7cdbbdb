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
from peftkit.errors import ConfigError
from peftkit.stats import adapter_name_of, check_batches, check_gradient_options, gradient_triplets


@dataclass
class LoraOneOptions:
    gamma: float = 128.0  # γ: the init step has spectral norm s/γ
    gradient_sketch: int | None = None  # k: single-pass randomized SVD from sketches (None: exact SVD)
    # Bounded memory and the truncated solver: as LoRA-GA's options (peftkit.stats.gradient_triplets).
    gradient_groups: int | None = None
    gradient_memory: float | str | None = "auto"
    gradient_device: str = "model"
    svd: str = "auto"
    svd_iterations: int = 8


def lora_one_factors(u: torch.Tensor, sv: torch.Tensor, vh: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀ (r, in), B₀ (out, r)) from the top-r signed triplets (u, sv, vh) of −G; sv[0] = σ₁ > 0."""
    root = (sv / (gamma * sv[0])).sqrt()
    return root[:, None] * vh, u * root


@registry.init("lora-one", options=LoraOneOptions, needs_data=True, architectures=("lora",),
               description="A₀, B₀ from the top-r SVD of −G with √σ weights and 1/√(γσ₁): one normalised step")
def lora_one_init(model, layers, config, data) -> None:
    options = config.axis_options("init")
    gamma = options["gamma"]
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise ConfigError(f"gamma: expected a positive number, got {gamma!r}; the authors use gamma=128")
    sketch = options["gradient_sketch"]
    if sketch is not None and (isinstance(sketch, bool) or not isinstance(sketch, int) or sketch <= 0):
        raise ConfigError(f"gradient_sketch: expected None or a positive sketch size k, got {sketch!r}")
    check_gradient_options(options)
    batches = check_batches(data, "lora-one")
    adapter = adapter_name_of(model, config)
    ranks = {name: layer.ranks[adapter] for name, layer in layers.items()}
    for name, u, sv, vh in gradient_triplets(model, layers, batches, ranks, options, seed=config.seed, negate=True):
        branch = layers[name].adapters[adapter]
        if not sv[0] > 0:
            warnings.warn(f"lora-one: {name} got a zero gradient on the given batches; it keeps the standard LoRA "
                          "init (B = 0)", stacklevel=2)
            continue
        a0, b0 = lora_one_factors(u, sv, vh, float(gamma))
        with torch.no_grad():
            branch.lora_A.weight.copy_(a0.to(branch.lora_A.weight.dtype))
            branch.lora_B.weight.copy_(b0.to(branch.lora_B.weight.dtype))


registry.register_method(
    "lora-one", architecture="lora", init="lora-one", defaults={"rslora": True, "alpha": 16.0},
    changes_output_at_init=True,
    description="LoRA-One (Zhang et al. 2025): init = one normalised rank-r step along −G (rsLoRA, γ = 128); "
                "AdamW by default, optimizer='lora-one-preconditioner' for the preconditioned form",
)
