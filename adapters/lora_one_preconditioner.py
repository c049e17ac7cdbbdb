"""The LoRA-One / Riemannian preconditioner (lora-one.md, "Preconditioned optimizer"), an optimizer for any
LoRA-shaped adapter (LoRA, LoRA-GA's trainable pair, LoRA-One, EVA, CoTo-scheduled LoRA).

Per pair, on the unscaled, clipped gradients and before the base update:
ĝ_A = (BᵀB + λI)⁻¹ g_A and ĝ_B = g_B (AAᵀ + λI)⁻¹, both from the pre-step factors (simultaneous), λ = 1e-6;
then AdamW (bias-corrected, decoupled weight decay) on ĝ per factor, or plain SGD (``update="sgd"``). Under SGD
and λ → 0 one step moves W by −η s²(P_B G + G P_A). s is not folded in (as both reference codes).

``reference_code=True`` reproduces the authors' ``AdamWr``: B preconditioned with the A already updated this
step, no bias correction, weight decay p ← p − η·wd·p after the update, identity when the inverse fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from peftkit import registry
from peftkit.errors import ConfigError
from peftkit.optim import FactorPair, PairOptimizer, adamw_update, damped_inverse, loraplus_ratios, work_dtype
from peftkit.validation import check_fields, option

UPDATES = ("adamw", "sgd")


@dataclass
class PreconditionerOptions:
    damping: float = option(1e-6, ge=0)  # λ in (BᵀB + λI)⁻¹ and (AAᵀ + λI)⁻¹
    update: str = option("adamw", choices=UPDATES)  # the base update on the preconditioned gradients: "adamw" or "sgd"
    reference_code: bool = False  # the authors' AdamWr conventions (module docstring)
    weight_decay: float = option(0.0, ge=0)
    betas: tuple[float, float] = option((0.9, 0.999), ge=0, lt=1)
    eps: float = option(1e-8, ge=0)
    loraplus_lr_ratio: float = option(1.0, gt=0)  # lr(B) / lr(A)
    max_grad_norm: float | None = option(None, gt=0)  # clip the unscaled raw gradients before preconditioning


def preconditioned_gradients(a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor,
                             damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ĝ_A (r×n), ĝ_B (m×r)) = ((BᵀB + λI)⁻¹ g_A, g_B (AAᵀ + λI)⁻¹); λ = 0 uses the pseudo-inverse."""
    return damped_inverse(b.T @ b, damping) @ grad_a, grad_b @ damped_inverse(a @ a.T, damping)


def _reference_inverse(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """(gram + λI)⁻¹, or I when the inverse fails (the authors' fallback)."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    inverse, info = torch.linalg.inv_ex(gram + damping * eye)
    return inverse if int(info) == 0 and torch.isfinite(inverse).all() else eye


def _adam_without_bias_correction(param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any],
                                  group: dict[str, Any]) -> None:
    """The authors' AdamWr step: m/(√v + ε) with no bias correction, then p ← p − η·wd·p."""
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(param)
        state["exp_avg_sq"] = torch.zeros_like(param)
    beta1, beta2 = group["betas"]
    state["step"] += 1
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    param.addcdiv_(state["exp_avg"], state["exp_avg_sq"].sqrt().add_(group["eps"]), value=-group["lr"])
    param.add_(param, alpha=-group["lr"] * group["weight_decay"])


class PreconditionedOptimizer(PairOptimizer):
    """The preconditioner; AdamW state of each factor in ``state[A]`` / ``state[B]`` (torch's keys)."""

    optimizer_name = "lora-one-preconditioner"

    def __init__(self, model: nn.Module, lr: float, *, damping: float = 1e-6, update: str = "adamw",
                 reference_code: bool = False, **kwargs: Any) -> None:
        fields = check_fields(PreconditionerOptions, {"damping": damping, "update": update})
        damping, update = fields["damping"], fields["update"]
        if reference_code and update != "adamw":
            raise ConfigError("update: reference_code=True reproduces the authors' AdamWr; use update='adamw' with it")
        super().__init__(model, lr, **kwargs)
        self.damping = float(damping)
        self.update = update
        self.reference_code = bool(reference_code)

    def _apply(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        if self.update == "sgd":
            param.mul_(1 - group["lr"] * group["weight_decay"]).add_(grad, alpha=-group["lr"])
        else:
            adamw_update(param, grad, self.state[param], group)

    def update_pair(self, pair: FactorPair, grad_a: torch.Tensor, grad_b: torch.Tensor, group_a: dict[str, Any],
                    group_b: dict[str, Any]) -> None:
        dtype = work_dtype(pair.a)
        a, b = pair.a.detach().to(dtype), pair.b.detach().to(dtype)
        if self.reference_code:
            g_a = _reference_inverse(b.T @ b, self.damping) @ grad_a.to(dtype)
            _adam_without_bias_correction(pair.a, g_a.to(pair.a.dtype), self.state[pair.a], group_a)
            a = pair.a.detach().to(dtype)  # B is preconditioned with the updated A
            g_b = grad_b.to(dtype) @ _reference_inverse(a @ a.T, self.damping)
            _adam_without_bias_correction(pair.b, g_b.to(pair.b.dtype), self.state[pair.b], group_b)
            return
        g_a, g_b = preconditioned_gradients(a, b, grad_a.to(dtype), grad_b.to(dtype), self.damping)
        self._apply(pair.a, g_a.to(pair.a.dtype), group_a)
        self._apply(pair.b, g_b.to(pair.b.dtype), group_b)


@registry.optimizer("lora-one-preconditioner", options=PreconditionerOptions, architectures=("lora",),
                    description="AdamW on Riemannian-preconditioned LoRA gradients (LoRA-One, Zhang et al.)")
def build_preconditioner(model: nn.Module, lr: float, config: Any, **options: Any) -> torch.optim.Optimizer:
    opts = vars(config.axis_options("optimizer", **options))
    ratios = loraplus_ratios(opts.pop("loraplus_lr_ratio"))
    return PreconditionedOptimizer(model, lr, lr_ratios=ratios, **opts)
