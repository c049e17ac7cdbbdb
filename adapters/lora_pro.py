"""LoRA-Pro (Wang et al., ICLR 2025): LoRA factor gradients adjusted so that the weight change is the closest
point of the LoRA tangent space to the full gradient (lora-pro.md).

With g_A = s·Bᵀ·M and g_B = s·M·Aᵀ the LoRA gradients of a full-space matrix M (m×n; autograd gives them for
M = G), the adjusted gradients

    g^A = (1/s²)(BᵀB)⁺ g_A + X·A,      g^B = (1/s²)(I − P_B) g_B (AAᵀ)⁺ − B·X

move W by s(B·g^A + g^B·A) = P_B·M + (I − P_B)·M·P_A for every r×r X: the least-squares optimum. X solves the
Sylvester equation (BᵀB)X + X(AAᵀ) = −(1/s²)(BᵀB)⁺ g_A Aᵀ (closest to the plain LoRA gradients), through the
eigendecompositions of the two r×r Gram matrices. (I − P_B)·M is formed as M − B((BᵀB)⁺(BᵀM)): no m×m
projector ever exists.

Modes: ``full`` (the paper's algorithm: Adam moments M, V of the equivalent gradient in the full m×n space, the
adjustment applied to the Adam direction D) and ``efficient`` (the adjustment applied to the raw gradients,
then AdamW per factor: r×(m+n) moments). The frozen base is never touched; weight decay is decoupled, on the
factors. s is each layer's own (rank_pattern, alpha_pattern, rsLoRA).

``reference_code=True`` (full mode) reproduces the conventions of the official DeepSpeed code, so its curves
can be reproduced: Adam's bias correction at t + 1 (its step counter is incremented before the adjustment,
which then adds 1 again: the first direction is 0.744× the standard one), and clipping whose factor
min(1, c/(‖raw gradients‖ + 1e-6)) comes from the raw gradients but scales the adjusted factor gradients
(the moments see the unclipped g̃), and the damping δ = 1e-8 of its inverses, pinv(BᵀB + δI) and
pinv(AAᵀ + δI) (``adjusted_gradients``; from B = 0 at the authors' lr 2e-5, BᵀB stays below δ for the first
steps, and the damped projector changes the update by O(1)). Not reproduced: its hard-coded s = 2 and its bf16 moments
(``moment_dtype="bfloat16"`` gives those); tensors outside the pairs keep AdamW (the official code would
mis-pair them, lora-pro.md pitfall 3).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from peftkit import registry
from peftkit.errors import ConfigError
from peftkit.optim import FactorPair, PairOptimizer, adamw_update, loraplus_ratios, pinv_from_eig, sym_eig, work_dtype
from peftkit.validation import option

MODES = ("full", "efficient")
X_MODES = ("sylvester", "zero", "symmetry")
MOMENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
# The official code inverts BᵀB + δI and AAᵀ + δI (``jitter``) with this δ (reference_code=True).
REFERENCE_DAMPING = 1e-8


@dataclass
class LoraProOptions:
    mode: str = option("full", choices=MODES)  # "full": m×n Adam moments (paper); "efficient": per-factor moments
    x_mode: str = option("sylvester", choices=X_MODES)  # the free r×r matrix: "sylvester" (default), "zero", "symmetry"
    weight_decay: float = option(0.0, ge=0)
    betas: tuple[float, float] = option((0.9, 0.999), ge=0, lt=1)
    eps: float = option(1e-8, ge=0)
    loraplus_lr_ratio: float = option(1.0, gt=0)  # lr(B) / lr(A), LoRA+ composition
    max_grad_norm: float | None = option(None, gt=0)  # clip the unscaled raw gradients before the adjustment
    # full mode: dtype of M and V (None: fp32, fp64 for fp64 factors)
    moment_dtype: str | None = option(None, choices=(None, *MOMENT_DTYPES))
    reference_code: bool = option(False)  # full mode: the official code's bias correction (t + 1) and clipping order
    # full mode under torch.distributed: each process keeps the moments of the whole pairs it owns (~1/N of
    # them), updates those pairs and broadcasts their factors (PairOptimizer.pair_owners). None: off, unless a
    # loop whose checkpoints call state_dict() on every process turns it on (peftkit's CLI does); True: on.
    shard_moments: bool | None = option(None)


def solve_sylvester(gram_b: tuple[torch.Tensor, torch.Tensor], gram_a: tuple[torch.Tensor, torch.Tensor],
                    rhs: torch.Tensor) -> torch.Tensor:
    """X (r×r) with (BᵀB)X + X(AAᵀ) = rhs, from eigh of both Grams: (λ, Q_B) and (μ, Q_A).

    Y = Q_Bᵀ·rhs·Q_A / (λᵢ + μⱼ), entries whose denominator is at round-off level set to 0 (the minimum-norm
    solution when both Grams are singular), X = Q_B·Y·Q_Aᵀ.
    """
    (lam, q_b), (mu, q_a) = gram_b, gram_a
    denom = lam[:, None] + mu[None, :]
    cutoff = denom.shape[0] * torch.finfo(denom.dtype).eps * denom.max()
    f = q_b.T @ rhs @ q_a
    y = torch.where(denom > cutoff, f / denom.clamp_min(torch.finfo(denom.dtype).tiny), torch.zeros_like(f))
    return q_b @ y @ q_a.T


def damped_pinv(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """pinv(gram + δ·I) as the official code forms it (torch.linalg.pinv, its default cutoff r·eps·λ_max)."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.pinv(gram + damping * eye)


def adjusted_gradients(a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor, s: float,
                       x_mode: str = "sylvester", damping: float = 0.0,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g^A (r×n), g^B (m×r), X (r×r)) from A (r×n), B (m×r) and the LoRA gradients g_A = s·BᵀM (r×n),
    g_B = s·M·Aᵀ (m×r) of a full-space M; all in the dtype of the inputs. O(r²(m+n) + r³).

    ``damping`` δ > 0 (``reference_code``): (BᵀB)⁺ and (AAᵀ)⁺ become pinv(BᵀB + δI) and pinv(AAᵀ + δI), in
    g^A, in the projector I − P_B and in the Sylvester right-hand side, while the Sylvester operator keeps the
    undamped Grams: the official code's choices. Near B = 0 (BᵀB ≲ δ, the first steps at lr 2e-5) the damped
    P_B is a shrunken projector, so the update differs from the exact one by O(1), not by O(δ)."""
    gram_b = sym_eig(b.T @ b)
    gram_a = sym_eig(a @ a.T)
    if damping > 0:
        btb_pinv, aat_pinv = damped_pinv(b.T @ b, damping), damped_pinv(a @ a.T, damping)
    else:
        btb_pinv, aat_pinv = pinv_from_eig(*gram_b), pinv_from_eig(*gram_a)
    inv_s2 = 1.0 / (s * s)
    g_a0 = (btb_pinv @ grad_a) * inv_s2
    outside_b = grad_b - b @ (btb_pinv @ (b.T @ grad_b))  # (I − P_B)·g_B without the m×m projector
    g_b0 = (outside_b @ aat_pinv) * inv_s2
    if x_mode == "sylvester":
        x = solve_sylvester(gram_b, gram_a, -(g_a0 @ a.T))
    elif x_mode == "zero":
        x = torch.zeros(a.shape[0], a.shape[0], dtype=a.dtype, device=a.device)
    elif x_mode == "symmetry":
        x = -0.5 * inv_s2 * (btb_pinv @ (b.T @ grad_b) @ (a @ a.T))
    else:
        raise ConfigError(f"x_mode: expected one of {list(X_MODES)}, got {x_mode!r}")
    return g_a0 + x @ a, g_b0 - b @ x, x


def equivalent_gradient(a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor,
                        s: float, damping: float = 0.0) -> torch.Tensor:
    """g̃ = s(B·g^A + g^B·A) (m×n) = P_B·M + (I − P_B)·M·P_A, as one GEMM of inner size 2r (X = 0); ``damping``
    as in ``adjusted_gradients``."""
    g_a0, g_b0, _ = adjusted_gradients(a, b, grad_a, grad_b, s, x_mode="zero", damping=damping)
    return (torch.cat([b, g_b0], 1) @ torch.cat([g_a0, a], 0)) * s


class LoraProOptimizer(PairOptimizer):
    """LoRA-Pro; see the module docstring. State per pair (in ``state[A]``): ``step`` and, in full mode,
    ``exp_avg`` / ``exp_avg_sq`` (m×n, ``moment_dtype``); in efficient mode AdamW moments of each factor."""

    optimizer_name = "lora-pro"

    def __init__(self, model: nn.Module, lr: float, *, mode: str = "full", x_mode: str = "sylvester",
                 moment_dtype: str | None = None, reference_code: bool = False,
                 shard_moments: bool | None = None, **kwargs: Any) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode: expected one of {list(MODES)} for LoRA-Pro, got {mode!r}")
        if not isinstance(reference_code, bool):
            raise ConfigError(f"reference_code: expected True or False, got {reference_code!r}")
        if reference_code and mode != "full":
            raise ConfigError(f"reference_code: the official code's conventions exist for mode='full' only, got "
                              f"mode={mode!r}; set mode='full' or reference_code=False")
        if x_mode not in X_MODES:
            raise ConfigError(f"x_mode: expected one of {list(X_MODES)}, got {x_mode!r}")
        if moment_dtype is not None and moment_dtype not in MOMENT_DTYPES:
            raise ConfigError(f"moment_dtype: expected None or one of {list(MOMENT_DTYPES)}, got {moment_dtype!r}")
        super().__init__(model, lr, **kwargs)
        self.mode = mode
        self.x_mode = x_mode
        self.moment_dtype = moment_dtype
        self.reference_code = reference_code
        self.shard_pairs = mode == "full" and bool(shard_moments)
        self.can_shard_pairs = mode == "full" and shard_moments is not False
        # reference_code with clipping: this step's clip factor, applied to the adjusted factor gradients.
        self._adjusted_clip: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if not (self.reference_code and self.max_grad_norm is not None):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # The official order: the norm of the raw gradients, the adjustment (moments) on the unclipped ones, and
        # the factor applied to the adjusted pair gradients; tensors outside the pairs are clipped raw.
        total = torch.zeros((), dtype=torch.float64)
        for pair, grad_a, grad_b in self._pair_grads():
            total = total + self.clip_norm_sq(pair, grad_a, grad_b)
        others = [p for p in self._others if p.grad is not None]
        for param in others:
            total = total + param.grad.double().square().sum()
        norm = total.sqrt()
        coef = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        for param in others:
            param.grad.mul_(coef.to(param.grad.dtype))
        max_grad_norm, self.max_grad_norm = self.max_grad_norm, None
        self._adjusted_clip = coef
        try:
            super().step()
        finally:
            self.max_grad_norm, self._adjusted_clip = max_grad_norm, None
        self.last_grad_norm = norm
        return loss

    def pair_state_size(self, pair: FactorPair) -> int:
        return pair.b.shape[0] * pair.a.shape[1] if self.mode == "full" else pair.a.numel() + pair.b.numel()

    def update_pair(self, pair: FactorPair, grad_a: torch.Tensor, grad_b: torch.Tensor, group_a: dict[str, Any],
                    group_b: dict[str, Any]) -> None:
        a, b, s = pair.a, pair.b, pair.scaling
        dtype = work_dtype(a)
        a_w, b_w = a.detach().to(dtype), b.detach().to(dtype)
        if self.mode == "efficient":
            g_a, g_b, _ = adjusted_gradients(a_w, b_w, grad_a.to(dtype), grad_b.to(dtype), s, self.x_mode)
            adamw_update(a, g_a.to(a.dtype), self.state[a], group_a)
            adamw_update(b, g_b.to(b.dtype), self.state[b], group_b)
            return
        state = self.state[a]
        if not state:
            moment = MOMENT_DTYPES[self.moment_dtype] if self.moment_dtype else dtype
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros(b.shape[0], a.shape[1], dtype=moment, device=a.device)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        state["step"] += 1
        # The official code corrects the bias at t + 1 (lora-pro.md pitfall 4).
        step = int(state["step"].item()) + (1 if self.reference_code else 0)
        beta1, beta2 = group_a["betas"]
        damping = REFERENCE_DAMPING if self.reference_code else 0.0
        direction = equivalent_gradient(a_w, b_w, grad_a.to(dtype), grad_b.to(dtype), s, damping)  # g̃, m×n
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        moment_grad = direction.to(exp_avg.dtype)
        exp_avg.lerp_(moment_grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(moment_grad, moment_grad, value=1 - beta2)
        # D = (M / (1 − β₁ᵗ)) / (√(V / (1 − β₂ᵗ)) + ε), written into g̃'s buffer (one m×n temporary per layer).
        if exp_avg_sq.dtype == dtype:
            torch.sqrt(exp_avg_sq, out=direction)
        else:
            direction.copy_(exp_avg_sq.sqrt())
        direction.div_((1 - beta2 ** step) ** 0.5).add_(group_a["eps"])
        torch.div(exp_avg, direction, out=direction).div_(1 - beta1 ** step)
        g_a, g_b, _ = adjusted_gradients(a_w, b_w, (b_w.T @ direction) * s, (direction @ a_w.T) * s, s, self.x_mode,
                                         damping)
        if self._adjusted_clip is not None:
            g_a, g_b = g_a * self._adjusted_clip.to(g_a.dtype), g_b * self._adjusted_clip.to(g_b.dtype)
        a.mul_(1 - group_a["lr"] * group_a["weight_decay"]).add_(g_a.to(a.dtype), alpha=-group_a["lr"])
        b.mul_(1 - group_b["lr"] * group_b["weight_decay"]).add_(g_b.to(b.dtype), alpha=-group_b["lr"])


@registry.optimizer("lora-pro", options=LoraProOptions, architectures=("lora",),
                    description="LoRA-Pro: gradients adjusted to the closest low-rank equivalent of full AdamW")
def build_lora_pro(model: nn.Module, lr: float, config: Any, **options: Any) -> torch.optim.Optimizer:
    opts = dataclasses.asdict(config.axis_options("optimizer", **options))
    ratios = loraplus_ratios(opts.pop("loraplus_lr_ratio"))
    return LoraProOptimizer(model, lr, lr_ratios=ratios, **opts)


registry.register_method(
    "lora-pro", architecture="lora", optimizer="lora-pro",
    lr_convention=registry.LRConvention(
        "full-ft", 0.1, "official scripts: lr 2e-5, the full-FT lr, since the update is full-space Adam; LoRA's "
        "2e-4 (lora-pro.md, Defaults)"),
    description="LoRA-Pro (Wang et al. 2025): LoRA with gradients adjusted towards full fine-tuning",
)
