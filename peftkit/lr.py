"""Learning-rate conventions: the automatic lr of a preset or a composition, and the out-of-convention warning.

Every preset declares an :class:`~peftkit.registry.LRConvention`: lr = ratio · base_lr, where ``base_lr`` is the
rate the user would give plain LoRA (default :data:`DEFAULT_BASE_LR`). LoRA-GA, LoRA-Pro and LoFT run at about the
full fine-tuning rate (ratio 0.1); the others like LoRA.

**Compositions** (an init with another optimizer, e.g. LoRA+'s ratio on LoRA-GA's scaled factors) take the
smallest ratio of the presets whose components they use, and then a cap that keeps the first step bounded.
The cap comes from the size of Adam's first step: at t = 1, m̂/√v̂ = sign(g) for |g| ≫ ε, so each factor entry
moves by its group's lr (η_A for A, η_B for B), whatever the gradient's scale. To first order
ΔW₁ = s·(ΔB·A₀ + B₀·ΔA), and with sign-like steps

    ‖ΔB·A₀‖_F ≈ η_B·√m·‖A₀‖_F,   ‖B₀·ΔA‖_F ≈ η_A·√n·‖B₀‖_F        (A₀: r×n, B₀: m×r)

(exact when A₀'s rows are orthogonal with equal norms, as LoRA-GA's; the random-sign expectation otherwise).
Summed over layers in quadrature (dropping the cross term, which changes ‖ΔW₁‖ by at most √2):

    ‖ΔW₁‖ ≈ σ·lr,   σ² = Σ_layers s²·(ρ_B²·m·‖A₀‖_F² + ρ_A²·n·‖B₀‖_F²)

with ρ_A, ρ_B the optimizer's per-factor lr multipliers. Plain LoRA (B₀ = 0, Kaiming-uniform A₀ with
E‖A₀‖_F² = r/3, s = α/r) gives σ_LoRA² = Σ s²·m·r/3. The composition's lr is then capped so that
σ·lr ≤ :data:`STEP_BOUND`·σ_LoRA·base_lr. Presets themselves are not capped: their authors tuned them.
Optimizers that step in the full m×n space (LoRA-Pro, LoFT) are covered by their ratio, not by σ.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from . import registry
from .optim import factor_pairs

DEFAULT_BASE_LR = 2e-4  # the LoRA rate assumed when the user gives none (unitless, per optimizer step)
STEP_BOUND = 2.0  # a composition's predicted first step is at most this many times plain LoRA's at base_lr
WARN_FACTOR = 8.0  # an lr more than this factor away from the method's auto lr is warned about


class LRConventionWarning(UserWarning):
    """The chosen lr is far outside the method's learning-rate convention."""


@dataclass
class LRChoice:
    """How an lr was (or would be) chosen: ``lr = base_lr · ratio · step_cap``."""

    lr: float
    base_lr: float
    ratio: float
    step_cap: float
    reason: str
    explicit: float | None = None  # the lr the user gave instead (None: the auto lr is used)

    def describe(self) -> str:
        if self.explicit is not None:
            return f"lr {self.explicit:.3g} (given; the method's auto lr would be {self.lr:.3g})"
        cap = f" · step cap {self.step_cap:.3g}" if self.step_cap < 1 else ""
        return f"lr {self.lr:.3g} = base_lr {self.base_lr:.3g} · {self.ratio:g} ({self.reason}){cap}"


def convention(config: Any) -> tuple[float, str, bool]:
    """(ratio, reason, is_composition) for an adapter config: the preset's ratio, or for a composition the
    smallest ratio among the presets that introduce its init and optimizer (the cautious choice)."""
    if config.method not in registry.methods():  # a plugin's adapter loaded without its package
        return 1.0, f"'{config.method}' is not registered: LoRA-like assumed", False
    preset = registry.get_method(config.method)
    if config.init != preset.init or config.optimizer != preset.optimizer:
        # Axis overrides that spell another preset (lora + optimizer lora-plus) are that preset.
        same = [registry.get_method(n) for n in registry.methods()]
        same = [m for m in same if (m.architecture, m.init, m.optimizer) ==
                (config.architecture, config.init, config.optimizer)]
        if same:
            preset = same[0]
    composition = config.init != preset.init or config.optimizer != preset.optimizer
    if not composition:
        conv = preset.lr_convention
        like = "full-fine-tuning-like" if conv.kind == "full-ft" else "LoRA-like"
        return conv.ratio, f"'{preset.name}': {like}", False
    candidates = [(preset.lr_convention.ratio, preset.name)]
    for name in registry.methods():
        other = registry.get_method(name)
        if (config.init != "default" and other.init == config.init) or \
                (config.optimizer != "adamw" and other.optimizer == config.optimizer):
            candidates.append((other.lr_convention.ratio, other.name))
    ratio, source = min(candidates)
    used = " + ".join(sorted({n for _, n in candidates}))
    return ratio, f"composition of {used}: the smallest ratio, '{source}''s", True


def first_step_scale(model: nn.Module, optimizer: torch.optim.Optimizer, lr: float) -> float | None:
    """σ of the module docstring: the predicted ‖ΔW₁‖_F (all layers, in quadrature) per unit base lr, from
    the current factors and the optimizer's per-parameter lr multipliers (group lr / ``lr``). None without
    (A, B) pairs."""
    multiplier = {id(p): group["lr"] / lr for group in optimizer.param_groups for p in group["params"]}
    total = 0.0
    pairs = factor_pairs(model)
    if not pairs:
        return None
    for pair in pairs:
        a, b = pair.a.detach().double(), pair.b.detach().double()
        m, n = b.shape[0], a.shape[1]
        rho_a, rho_b = multiplier.get(id(pair.a), 1.0), multiplier.get(id(pair.b), 1.0)
        total += pair.scaling ** 2 * (rho_b ** 2 * m * float(a.square().sum())
                                      + rho_a ** 2 * n * float(b.square().sum()))
    return math.sqrt(total)


def lora_first_step_scale(model: nn.Module, config: Any) -> float | None:
    """σ_LoRA: the same prediction for plain LoRA on the same layers (B₀ = 0, E‖A₀‖_F² = r/3, s = α/r)."""
    pairs = factor_pairs(model)
    if not pairs:
        return None
    total = 0.0
    for pair in pairs:
        r, m = pair.a.shape[0], pair.b.shape[0]
        scaling = pair.scaling / math.sqrt(r) if config.rslora else pair.scaling  # α/√r -> α/r
        total += scaling ** 2 * m * r / 3.0
    return math.sqrt(total)


def step_cap(model: nn.Module, config: Any, optimizer: torch.optim.Optimizer, lr: float, base_lr: float,
             ratio: float) -> float:
    """κ ≤ 1 with base_lr·ratio·κ·σ ≤ STEP_BOUND·base_lr·σ_LoRA (1 where σ cannot be predicted)."""
    sigma = first_step_scale(model, optimizer, lr)
    sigma_lora = lora_first_step_scale(model, config)
    if not sigma or not sigma_lora:
        return 1.0
    return min(1.0, STEP_BOUND * sigma_lora / (ratio * sigma))


def auto_lr(model: nn.Module, config: Any, build: Callable[[float], torch.optim.Optimizer],
            base_lr: float | None) -> tuple[torch.optim.Optimizer, LRChoice]:
    """Build the optimizer at the method's automatic lr (``build(lr)`` makes one); returns it and the choice."""
    base = DEFAULT_BASE_LR if base_lr is None else float(base_lr)
    ratio, reason, composition = convention(config)
    lr = base * ratio
    optimizer = build(lr)
    cap = step_cap(model, config, optimizer, lr, base, ratio) if composition else 1.0
    if cap < 1.0:
        lr = base * ratio * cap
        optimizer = build(lr)
    return optimizer, LRChoice(lr, base, ratio, cap, reason)


def check_convention(model: nn.Module, config: Any, optimizer: torch.optim.Optimizer, lr: float,
                     base_lr: float | None) -> LRChoice:
    """Warn (:class:`LRConventionWarning`) when ``lr`` is more than WARN_FACTOR away from the auto lr."""
    base = DEFAULT_BASE_LR if base_lr is None else float(base_lr)
    ratio, reason, composition = convention(config)
    cap = step_cap(model, config, optimizer, lr, base, ratio) if composition else 1.0
    choice = LRChoice(base * ratio * cap, base, ratio, cap, reason)
    factor = lr / choice.lr
    if factor > WARN_FACTOR or factor < 1.0 / WARN_FACTOR:
        way = f"{factor:.3g}× above" if factor > 1 else f"{1 / factor:.3g}× below"
        warnings.warn(LRConventionWarning(
            f"optimizer: lr {lr:.3g} is {way} the convention of '{config.method}' "
            f"({choice.describe()}{'' if base_lr is not None else ', default base_lr'}); use lr={choice.lr:.2g} "
            "(or leave lr out / optimizer.lr: auto, with base_lr = your LoRA rate)"), stacklevel=3)
    return choice
