"""LoFT (Tastan et al., ICLR 2026): LoRA trained so that its weight change follows AdamW in the full space
(loft.md). At full rank it is AdamW on W exactly.

Per pair, with B̃ = s·B (s folded into the preconditioner, so α does not matter):
- preconditioned gradients ĝ_A = (B̃ᵀB̃ + δ_A I)⁻¹ g_A (r×n, B̃ĝ_A = P_B̃·G) and ĝ_B = (g_B/s)(AAᵀ + δ_B I)⁻¹
  (m×r, ĝ_B·A = G·P_A);
- first moments m_A (r×n), m_B (m×r) and second moments as one r×r PSD matrix per column of A (P^A, n×r²) and
  per row of B (P^B, m×r²), reprojected whenever the partner factor changed: R_A = (B̃ᵀB̃ + δI)⁻¹B̃ᵀB̃_old,
  m_A ← R_A m_A, P^A_j ← R_A P^A_j R_Aᵀ; R_B = A_old Aᵀ(AAᵀ + δI)⁻¹, m_B ← m_B R_B, P^B_i ← R_Bᵀ P^B_i R_B;
- the full-space Adam direction U = M̂ ⊘ (√V̂ + ε) with V_ij = b̃ᵢᵀ P^A_j b̃ᵢ (A-step) computed as ONE GEMM
  (row outer products of B̃ times P^A, both in the symmetric r(r+1)/2 packing), never an (n, r, m) tensor;
- alternation: odd global steps update B (ΔW = −η·U·P_A), even steps A (ΔW = −η·P_B̃·U); both factors'
  moments are updated every step, bias correction uses the global step.

``reference_code=True`` reproduces the official code's conventions instead: the transposed second-moment
reprojection (Rᵀ P R for A, R P Rᵀ for B), sequential processing (A's step first, then B's gradient rescaled
with the updated A), weight decay p ← p − wd·p not scaled by lr, and s not in the preconditioner. Tensors
outside the pairs (heads, biases, norms) then take the official optimizer's AdamW branch: p ← p − wd·p with
the optimizer's weight_decay on every one of them (its callers pass ``model.parameters()`` as one group, so
nothing is exempt from decay), then torch's bias-corrected Adam step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from peftkit import registry
from peftkit.errors import ConfigError
from peftkit.optim import FactorPair, PairOptimizer, adamw_update, damped_inverse, loraplus_ratios, work_dtype
from peftkit.validation import option


@dataclass
class LoftOptions:
    weight_decay: float = option(0.0, ge=0)
    betas: tuple[float, float] = option((0.9, 0.999), ge=0, lt=1)
    eps: float = option(1e-4, ge=0)  # the official default; LoFT's U is a full-space Adam direction, 1e-8 is too small
    damping_a: float = option(1e-6, ge=0)  # δ_A in (B̃ᵀB̃ + δ_A I)⁻¹
    damping_b: float = option(1e-8, ge=0)  # δ_B in (AAᵀ + δ_B I)⁻¹
    alternate: bool = True  # False: update both factors every step (an ablation)
    reference_code: bool = False  # the official code's conventions (see the module docstring)
    loraplus_lr_ratio: float = option(1.0, gt=0)  # lr(B) / lr(A)
    max_grad_norm: float | None = option(None, gt=0)  # clip on the norm of the projected gradients (loft.md (f))


def row_outer(rows: torch.Tensor) -> torch.Tensor:
    """(k, r) -> (k, r²): the flattened outer product xᵢxᵢᵀ of every row."""
    return (rows[:, :, None] * rows[:, None, :]).reshape(rows.shape[0], -1)


def _packed(rows: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetric r(r+1)/2 packing of xᵢxᵢᵀ (rows (k, r)) and of P_j (second (j, r²)), off-diagonal entries of
    P doubled, so that packed_rows @ packed_secondᵀ = [xᵢᵀ P_j xᵢ]: about half the FLOPs of the r² form."""
    r = rows.shape[1]
    upper = torch.triu_indices(r, r, device=rows.device)
    flat = upper[0] * r + upper[1]
    weight = torch.where(upper[0] == upper[1], 1.0, 2.0).to(second.dtype)
    packed_rows = torch.index_select(rows, 1, upper[0]) * torch.index_select(rows, 1, upper[1])
    return packed_rows, torch.index_select(second, 1, flat) * weight


def full_second_moment(rows: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """V (k×j) with V_ij = xᵢᵀ P_j xᵢ, from rows x (k, r) and P as (j, r²): one GEMM of inner size r(r+1)/2,
    clamped at 0 (the A-step's V with x = B̃'s rows and P = P^A)."""
    packed_rows, packed_second = _packed(rows, second)
    return (packed_rows @ packed_second.T).clamp_min_(0)


def reproject_second(second: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Every P_j (the rows of ``second``, (j, r²)) replaced by left·P_j·right, as two (j·r × r) @ (r × r) GEMMs:
    X_j = P_j·right, then (left·X_j)ᵀ = X_jᵀ·leftᵀ."""
    count, r = second.shape[0], left.shape[0]
    right_done = second.reshape(count * r, r) @ right
    both_transposed = right_done.view(count, r, r).transpose(1, 2).reshape(count * r, r) @ left.T
    return both_transposed.view(count, r, r).transpose(1, 2).reshape(count, r * r)


class LoftOptimizer(PairOptimizer):
    """LoFT; see the module docstring. State: ``state[A]`` holds m_A (``exp_avg``), P^A (``second``) and
    B̃_old (``partner_old``); ``state[B]`` holds m_B, P^B and A_old. The phase is the global step."""

    optimizer_name = "loft"

    def __init__(self, model: nn.Module, lr: float, *, damping_a: float = 1e-6, damping_b: float = 1e-8,
                 alternate: bool = True, reference_code: bool = False, **kwargs: Any) -> None:
        for name, value in (("damping_a", damping_a), ("damping_b", damping_b)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name}: expected a number >= 0 (the damping δ of the r×r inverse), got {value!r}")
        super().__init__(model, lr, **kwargs)
        self.damping_a = float(damping_a)
        self.damping_b = float(damping_b)
        self.alternate = bool(alternate)
        self.reference_code = bool(reference_code)

    # ------------------------------------------------------------------ phase
    def updates(self) -> tuple[bool, bool]:
        """(update A, update B) at the current global step: step 1 updates B, step 2 A, and so on."""
        if not self.alternate:
            return True, True
        return self.global_step % 2 == 0, self.global_step % 2 == 1

    def _s_pre(self, pair: FactorPair) -> float:
        return 1.0 if self.reference_code else pair.scaling

    # ------------------------------------------------------------------ pieces
    def _precondition_a(self, b_tilde: torch.Tensor, grad_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_b = damped_inverse(b_tilde.T @ b_tilde, self.damping_a)
        return inv_b, inv_b @ grad_a

    def _precondition_b(self, a: torch.Tensor, grad_b: torch.Tensor, s_pre: float) -> tuple[torch.Tensor, torch.Tensor]:
        inv_a = damped_inverse(a @ a.T, self.damping_b)
        return inv_a, (grad_b / s_pre) @ inv_a

    def clip_norm_sq(self, pair: FactorPair, grad_a: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor:
        """‖P_B̃·G‖² if A updates this step, plus ‖G·P_A‖² if B updates (loft.md (f))."""
        dtype = work_dtype(pair.a)
        update_a, update_b = self.updates()
        total = torch.zeros((), dtype=torch.float64)
        if update_a:
            b_tilde = pair.b.detach().to(dtype) * self._s_pre(pair)
            _, g_hat = self._precondition_a(b_tilde, grad_a.to(dtype))
            total = total + ((b_tilde.T @ b_tilde @ g_hat) * g_hat).sum().double()
        if update_b:
            a = pair.a.detach().to(dtype)
            _, g_hat = self._precondition_b(a, grad_b.to(dtype), self._s_pre(pair))
            total = total + ((g_hat @ (a @ a.T)) * g_hat).sum().double()
        return total

    def _moments_a(self, state: dict[str, Any], inv_b: torch.Tensor, b_tilde: torch.Tensor, g_hat: torch.Tensor,
                   betas: tuple[float, float]) -> None:
        if "exp_avg" not in state:
            r, n = g_hat.shape
            state["exp_avg"] = torch.zeros_like(g_hat)
            state["second"] = torch.zeros(n, r * r, dtype=g_hat.dtype, device=g_hat.device)
        else:  # reproject onto the current B̃: B̃·m_A keeps representing P_B̃·(B̃_old·m_A)
            rot = inv_b @ (b_tilde.T @ state["partner_old"])
            state["exp_avg"] = rot @ state["exp_avg"]
            left, right = (rot.T, rot) if self.reference_code else (rot, rot.T)
            state["second"] = reproject_second(state["second"], left, right)
        state["partner_old"] = b_tilde.clone()
        state["exp_avg"].lerp_(g_hat, 1 - betas[0])
        state["second"].mul_(betas[1]).add_(row_outer(g_hat.T), alpha=1 - betas[1])

    def _moments_b(self, state: dict[str, Any], inv_a: torch.Tensor, a: torch.Tensor, g_hat: torch.Tensor,
                   betas: tuple[float, float]) -> None:
        if "exp_avg" not in state:
            m, r = g_hat.shape
            state["exp_avg"] = torch.zeros_like(g_hat)
            state["second"] = torch.zeros(m, r * r, dtype=g_hat.dtype, device=g_hat.device)
        else:  # reproject onto the current A: m_B·A keeps representing (m_B·A_old)·P_A
            rot = state["partner_old"] @ a.T @ inv_a
            state["exp_avg"] = state["exp_avg"] @ rot
            left, right = (rot, rot.T) if self.reference_code else (rot.T, rot)
            state["second"] = reproject_second(state["second"], left, right)
        state["partner_old"] = a.clone()
        state["exp_avg"].lerp_(g_hat, 1 - betas[0])
        state["second"].mul_(betas[1]).add_(row_outer(g_hat), alpha=1 - betas[1])

    def _direction(self, first: torch.Tensor, second: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """U = M̂ ⊘ (√V̂ + ε) from the full-space first moment (m×n) and the second moment V (m×n), in place."""
        beta1, beta2 = group["betas"]
        t = self.global_step
        second.div_(1 - beta2 ** t).sqrt_().add_(group["eps"])
        return first.div_(1 - beta1 ** t).div_(second)

    def _decay(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        wd = group["weight_decay"]
        param.mul_(1 - (wd if self.reference_code else group["lr"] * wd))

    def update_other(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        if not self.reference_code:
            super().update_other(param, group)
            return
        # The official LoFTAdamW's non-LoRA branch: p ← p − wd·p (the decay does not touch the moments, so
        # applying it before them is the same), then Adam with no further decay.
        param.add_(param, alpha=-self.defaults["weight_decay"])
        adamw_update(param, param.grad, self.state[param], {**group, "weight_decay": 0.0})

    def _step_a(self, pair: FactorPair, inv_b: torch.Tensor, b_tilde: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[pair.a]
        direction = self._direction(b_tilde @ state["exp_avg"], full_second_moment(b_tilde, state["second"]), group)
        self._decay(pair.a, group)
        pair.a.add_((inv_b @ (b_tilde.T @ direction)).to(pair.a.dtype), alpha=-group["lr"])

    def _step_b(self, pair: FactorPair, inv_a: torch.Tensor, a: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[pair.b]
        # V_ij = a_jᵀ P^B_i a_j: packed P^B (m×r(r+1)/2) times the packed outer products of Aᵀ's rows, one GEMM.
        packed_columns, packed_second = _packed(a.T, state["second"])
        second = (packed_second @ packed_columns.T).clamp_min_(0)
        direction = self._direction(state["exp_avg"] @ a, second, group)
        self._decay(pair.b, group)
        pair.b.add_((direction @ a.T @ inv_a).to(pair.b.dtype), alpha=-group["lr"] / self._s_pre(pair))

    def update_pair(self, pair: FactorPair, grad_a: torch.Tensor, grad_b: torch.Tensor, group_a: dict[str, Any],
                    group_b: dict[str, Any]) -> None:
        dtype = work_dtype(pair.a)
        s_pre = self._s_pre(pair)
        update_a, update_b = self.updates()
        b_tilde = pair.b.detach().to(dtype) * s_pre
        inv_b, g_hat_a = self._precondition_a(b_tilde, grad_a.to(dtype))
        self._moments_a(self.state[pair.a], inv_b, b_tilde, g_hat_a, group_a["betas"])
        if self.reference_code and update_a:
            # Sequential, as the official code: A moves first, B's gradient is then rescaled with the new A.
            self._step_a(pair, inv_b, b_tilde, group_a)
        a = pair.a.detach().to(dtype)
        inv_a, g_hat_b = self._precondition_b(a, grad_b.to(dtype), s_pre)
        self._moments_b(self.state[pair.b], inv_a, a, g_hat_b, group_b["betas"])
        if update_a and not self.reference_code:
            self._step_a(pair, inv_b, b_tilde, group_a)
        if update_b:
            self._step_b(pair, inv_a, a, group_b)


@registry.optimizer("loft", options=LoftOptions, architectures=("lora",),
                    description="LoFT: alternating LoRA updates that follow full-space AdamW (exact at full rank)")
def build_loft(model: nn.Module, lr: float, config: Any, **options: Any) -> torch.optim.Optimizer:
    opts = dataclasses.asdict(config.axis_options("optimizer", **options))
    ratios = loraplus_ratios(opts.pop("loraplus_lr_ratio"))
    return LoftOptimizer(model, lr, lr_ratios=ratios, **opts)


registry.register_method(
    "loft", architecture="lora", optimizer="loft",
    lr_convention=registry.LRConvention(
        "full-ft", 0.3, "behaves like full FT (full-space AdamW moments); the spec gives no ratio (the authors' "
        "demo lr 1e-4-3e-4); the method guide's sweep (issue 24) put its best at 0.3x LoRA's rate on 3 of 4 tasks "
        "(0.1x: 58.0 % on TREC against 90.8 %), the demo's upper end"),
    description="LoFT (Tastan et al. 2026): LoRA whose updates follow full-space AdamW",
)
