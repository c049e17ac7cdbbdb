"""ElaLoRA (Chang et al., arXiv 2504.00254): an SVD-form adapter whose ranks are pruned and grown during
training at constant total rank (elalora.md).

Per layer, with a fixed capacity r_max (no parameter is ever re-created, so DDP buckets, FSDP shards and
optimizer state stay valid) and a boolean active mask m:
    y = x Wᵀ + b + s · (D(x) (Q ⊙ (E ⊙ m))ᵀ) Pᵀ,   ΔW = s · P diag(E ⊙ m) Q,   s = α / (r_0 + 1e-5)
Q (r_max, in) is ``lora_A``, E (r_max,) ``lora_E``, P (out, r_max) ``lora_B``, m (r_max,) the buffer ``lora_mask``;
r_0 = the initial rank (the first r_0 slots are active), frozen in s for the whole run as in the reference.
Init: E = 0, P, Q ~ N(0, 0.02²) (a no-op). Masked slots contribute exactly 0 and get zero gradients.

The orthogonality regulariser γ/(2L) · Σ_l (‖(Q Qᵀ − I)[m, m]‖_F + ‖(Pᵀ P − I)[m, m]‖_F) (norms not squared,
active sub-matrices only) is each layer's ``regularization()``; ``peftkit.regularization_loss`` sums it.

The schedule ``elalora`` (``ElaloraSchedule``) keeps AdaLoRA's importance EMAs and, every ΔT steps in the
dynamic phase, prunes the b(t) weakest rank-1 triplets and grows b(t) new ones (cubic budget b(t)). It resets
the optimizer moments of exactly the slots it touches, so it needs the optimizer (``attach_optimizer``).

The optimizer ``elalora-adamw`` (``SlotAdamW``, the preset's) is torch's AdamW with one step count per slot
for P, E, Q: Adam's bias correction 1 − βᵗ uses the slot's own t, so a slot the schedule just reset (grown)
takes exactly the steps of a fresh Adam on that slot. With one count per tensor (torch's AdamW) the zeroed
moments of a grown slot are corrected with the tensor's t instead: its first update is
lr·(1 − β₁)/(1 − β₁ᵗ)·√((1 − β₂ᵗ)/(1 − β₂)), not fresh Adam's lr (0.48·lr at t = 10, 3.16·lr for large t).

Save: native format (P, E, Q at capacity and the mask). ``peftkit.export`` writes a PEFT LoRA with per-layer
ranks: lora_A = diag(E) Q and lora_B = P over the active slots, s kept through ``alpha_pattern``.
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
from peftkit.inject import adapter_layers, state_of
from peftkit.layer import AdapterLayer, adapter_dtype
from peftkit.optim import AdamWOptions, adamw_update, check_betas_eps, param_groups
from peftkit.schedule import Schedule
from peftkit.validation import option

SCALING_EPS = 1e-5  # the reference's s = α / (ranknum + 1e-5)
INIT_STD = 0.02
NEW_E_CAP = 1e-13  # a grown triplet starts at e = min(min|E|, 1e-13): the output is unchanged
# From E = 0 and P, Q ~ N(0, 0.02²), Adam moves every entry of P, E, Q by about lr per step, so ΔW grows about
# as s·(lr·t)·‖p‖‖q‖ at first, then as (lr·t)³ once lr·t passes INIT_STD: the adapter learns only after Σ lr
# has reached several INIT_STD. Measured (docs/methods/elalora.md): peak lr × steps = 0.018 (SmolLM2, 12 steps)
# learns nothing, 0.13 (MiniLM, 128 steps at 1e-3) is chance on TREC-6, 0.38 matches LoRA; a run below this
# product is warned about at train begin.
MIN_LR_STEPS = 10 * INIT_STD


@dataclass
class ElaloraOptions:
    # r_max per layer, the fixed capacity the ranks can grow into; None: 2·r_0, capped at min(in, out).
    capacity: int | None = option(None, gt=0)
    # γ of the orthogonality regulariser (0 switches it off).
    orth_reg_weight: float = option(0.1, ge=0)


def _arch_options(config: Any) -> ElaloraOptions:
    options = config.axis_options("architecture")
    cap = options.capacity
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0):
        raise ConfigError("capacity: expected a positive integer (the per-layer rank capacity) or None (= 2·r), "
                          f"got {cap!r}")
    weight = options.orth_reg_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
        raise ConfigError(f"orth_reg_weight: expected a number >= 0 (γ of the ElaLoRA regulariser), got {weight!r}")
    if config.rslora:
        raise ConfigError("rslora: ElaLoRA's scaling is α/(r_0 + 1e-5) (the reference's); remove rslora=True")
    return options


class ElaloraBranch(nn.Module):
    """One ElaLoRA adapter at capacity r_max: ``lora_A`` = Q (r_max, in), ``lora_E`` = E (r_max,),
    ``lora_B`` = P (out, r_max), and the boolean buffer ``lora_mask`` (r_max,) of active slots."""

    def __init__(self, in_features: int, out_features: int, r0: int, capacity: int, dropout: float,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(capacity, in_features, dtype=dtype, device=device))
        self.lora_E = nn.Parameter(torch.zeros(capacity, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, capacity, dtype=dtype, device=device))
        mask = torch.zeros(capacity, dtype=torch.bool, device=device)
        mask[:r0] = True
        self.register_buffer("lora_mask", mask)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.orth_weight = 0.0
        self.num_layers = 1  # L of the adapter, set after injection (the regulariser's 1/(2L))
        with torch.no_grad():
            nn.init.normal_(self.lora_A, std=INIT_STD)
            nn.init.normal_(self.lora_B, std=INIT_STD)

    @property
    def rank(self) -> int:
        return int(self.lora_mask.sum())

    def masked_e(self) -> torch.Tensor:
        return self.lora_E * self.lora_mask.to(self.lora_E.dtype)


@registry.architecture("elalora", options=ElaloraOptions,
                       description="SVD-form s·P·diag(E)·Q at a fixed capacity with active-slot masks (ElaLoRA)")
class ElaloraLayer(AdapterLayer):
    peft_type = None  # native format; ``peftkit.export`` writes a per-layer-rank PEFT LoRA
    saved_suffixes = ("lora_A", "lora_E", "lora_B", "lora_mask")

    def add_adapter(self, name: str, r: int, alpha: float, config: Any) -> None:
        super().add_adapter(name, r, alpha, config)
        # s = α/(r_0 + 1e-5) with r_0 the initial rank, whatever the rank becomes (the reference's ranknum).
        self.scaling[name] = float(alpha) / (r + SCALING_EPS)

    def make_branch(self, name: str, r: int, alpha: float, config: Any) -> nn.Module:
        options = _arch_options(config)
        cap = options.capacity
        if cap is None:
            cap = max(r, min(2 * r, self.in_features, self.out_features))
        if cap < r:
            raise ConfigError(f"capacity: {cap} is below the initial rank r = {r} of {self.module_name}; "
                              "set capacity >= r (or None for 2·r)")
        branch = ElaloraBranch(self.in_features, self.out_features, r, cap, config.dropout,
                               adapter_dtype(self.base_layer), self.base_layer.weight.device)
        branch.orth_weight = float(options.orth_reg_weight)
        return branch

    @classmethod
    def after_inject(cls, layers: dict[str, AdapterLayer], adapter_name: str) -> None:
        for layer in layers.values():
            layer.adapters[adapter_name].num_layers = len(layers)

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name, branch in self.live_branches():
            q = branch.lora_A
            x_a = x if x.dtype == q.dtype else x.to(q.dtype)
            if branch.dropout is not None:
                x_a = branch.dropout(x_a)
            hidden = F.linear(x_a, q) * branch.masked_e()
            delta = F.linear(hidden, branch.lora_B) * self.scaling[name]
            result = result + delta.to(result.dtype)
        return result

    def delta_weight(self, name: str) -> torch.Tensor:
        branch = self.adapters[name]
        return (branch.lora_B * branch.masked_e()) @ branch.lora_A * self.scaling[name]

    def regularization(self) -> torch.Tensor | None:
        """γ/(2L) · (‖(QQᵀ − I)[m, m]‖_F + ‖(PᵀP − I)[m, m]‖_F) over the active, gated-on adapters, or None."""
        total = None
        for name in self.active_adapters:
            branch = self.adapters[name]
            if self.gated(name) or branch.orth_weight == 0:
                continue
            # The [m, m] block as a product with the mask's outer product, not by boolean indexing: the same norm
            # and gradient (zero on inactive slots), no data-dependent shape, so no host sync in the step.
            q, p = branch.lora_A, branch.lora_B
            active = branch.lora_mask.to(q.dtype)
            block = active[:, None] * active[None, :]
            eye = torch.eye(q.shape[0], dtype=q.dtype, device=q.device)
            term = (torch.linalg.matrix_norm((q @ q.t() - eye) * block)
                    + torch.linalg.matrix_norm((p.t() @ p - eye) * block))
            term = term * (branch.orth_weight / (2 * branch.num_layers))
            total = term if total is None else total + term
        return total

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        branch = self.adapters[name]
        return {key: getattr(branch, key).detach() for key in self.saved_suffixes}

    def load_saved_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        branch = self.adapters[name]
        mask = tensors["lora_mask"].to(torch.bool)
        if not bool(mask.any()):
            raise StateError(f"{self.module_name}: the saved ElaLoRA mask has no active slot; the checkpoint is broken")
        with torch.no_grad():
            for key in ("lora_A", "lora_E", "lora_B"):
                getattr(branch, key).copy_(tensors[key])
            branch.lora_mask.copy_(mask)

    def export_lora(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A = diag(E) Q (r_l, in), B = P (out, r_l), s) over the r_l active slots: ΔW = s·B·A exactly."""
        branch = self.adapters[name]
        active = branch.lora_mask
        a = branch.lora_A.detach()[active] * branch.lora_E.detach()[active, None]
        return a, branch.lora_B.detach()[:, active].clone(), self.scaling[name]

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.adapters[n].rank}/{self.adapters[n].lora_E.numel()}" for n in self.adapters)
        return f"{self.architecture_name}[{ranks}] on {self.kind} ({self.out_features}x{self.in_features})"


# ------------------------------------------------------------------------------------------ the optimizer
# The axis of each ElaLoRA tensor along which its slots run: Q rows, E entries, P columns.
SLOT_AXES = {"lora_A": 0, "lora_E": 0, "lora_B": 1}


class SlotAdamW(torch.optim.Optimizer):
    """torch's AdamW (decoupled decay p ← p(1 − lr·wd), bias-corrected moments, torch's formula) with one step
    count per slot for ElaLoRA's Q (r_max, in), E (r_max,) and P (out, r_max).

    The state of such a tensor holds ``slot_step`` (r_max,), fp64, besides torch's ``step``, ``exp_avg`` and
    ``exp_avg_sq``; the bias corrections 1 − β₁ᵏ, 1 − β₂ᵏ use each slot's own k. :meth:`reset_slot` (the schedule
    calls it on every slot it prunes or grows) zeroes the slot's moments and its count, so its next steps are
    exactly those of a fresh AdamW on that slot. Every other slot, and every other tensor, steps exactly as
    under torch's AdamW. A tensor without a gradient (a CoTo-gated branch) is skipped with its counts.
    """

    def __init__(self, groups: list[dict[str, Any]], slot_axes: dict[int, int], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        betas, eps = check_betas_eps(betas, eps)
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0))
        self.slot_axes = dict(slot_axes)  # id(param) -> slot axis

    def _slot_steps(self, param: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        if "slot_step" not in state:
            # State from a per-tensor AdamW (or none yet): every slot has taken the tensor's steps.
            steps = float(state["step"]) if "step" in state else 0.0
            state["slot_step"] = torch.full((param.shape[self.slot_axes[id(param)]],), steps, dtype=torch.float64,
                                            device=param.device)
        return state["slot_step"]

    def _per_slot(self, param: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """A (r_max,) vector shaped to broadcast over ``param`` along its slot axis, in the param's dtype."""
        shape = [1] * param.ndim
        shape[self.slot_axes[id(param)]] = -1
        return vector.to(param.dtype).view(shape)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if id(param) not in self.slot_axes:
                    adamw_update(param, param.grad, state, group)
                    continue
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                slot_step = self._slot_steps(param, state)
                beta1, beta2 = group["betas"]
                lr = group["lr"]
                state["step"] += 1
                slot_step += 1
                grad = param.grad
                param.mul_(1 - lr * group["weight_decay"])
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                # torch's ops in torch's order, with the step size lr/(1 − β₁ᵏ) and √(1 − β₂ᵏ) per slot (fp64).
                step_size = self._per_slot(param, lr / (1 - beta1 ** slot_step))
                bias2_sqrt = self._per_slot(param, (1 - beta2 ** slot_step).sqrt())
                denom = (state["exp_avg_sq"].sqrt() / bias2_sqrt).add_(group["eps"])
                param.sub_(state["exp_avg"] / denom * step_size)
        return loss

    @torch.no_grad()
    def reset_slot(self, param: torch.Tensor, slot: int) -> None:
        """Zero the moments of ``slot`` of an ElaLoRA tensor and restart its step count (a fresh AdamW there)."""
        state = self.state.get(param)
        if not state:
            return
        index = [slice(None)] * param.ndim
        index[self.slot_axes[id(param)]] = slot
        for key in ("exp_avg", "exp_avg_sq"):
            state[key][tuple(index)] = 0
        self._slot_steps(param, state)[slot] = 0

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts every loaded state tensor but ``step`` to its parameter's dtype; the slot counts stay fp64.
        slot_steps = {index: entry["slot_step"] for index, entry in state_dict["state"].items() if "slot_step" in entry}
        state = {index: {k: v for k, v in entry.items() if k != "slot_step"}
                 for index, entry in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": state})
        params = [p for group in self.param_groups for p in group["params"]]
        for index, steps in slot_steps.items():
            param = params[int(index)]
            self.state[param]["slot_step"] = steps.to(dtype=torch.float64, device=param.device).clone()


def slot_optimizer(optimizer: Any) -> SlotAdamW | None:
    """The :class:`SlotAdamW` inside ``optimizer`` (itself, or wrapped by Accelerate and the like), or None."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, SlotAdamW) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, SlotAdamW) else None


@registry.optimizer("elalora-adamw", options=AdamWOptions, architectures=("elalora",),
                    description="AdamW with one step count per ElaLoRA slot (a grown slot starts a fresh Adam)")
def build_slot_adamw(model: nn.Module, lr: float, config: Any, **options: Any) -> SlotAdamW:
    opts = config.axis_options("optimizer", **options)
    groups = param_groups(model, lr, opts.weight_decay)
    slot_axes = {}
    for layer in adapter_layers(model).values():
        if isinstance(layer, ElaloraLayer):
            for branch in layer.adapters.values():
                for key, axis in SLOT_AXES.items():
                    slot_axes[id(getattr(branch, key))] = axis
    return SlotAdamW(groups, slot_axes, lr, betas=tuple(opts.betas), eps=opts.eps)


# ------------------------------------------------------------------------------------------ the schedule
@dataclass
class ElaloraScheduleOptions:
    # Phases in optimizer steps (t = completed steps − 1): scores only while t <= t_init; no score update and
    # no change once t >= T − t_final; a reallocation when (t − t_init) % delta_t == 0 in between.
    t_init: int = option(300, ge=0)
    t_final: int = option(400, ge=0)
    delta_t: int = option(50, gt=0)
    # b_0, the moves per reallocation (decaying as b_0·(1 − p³) with the scheduler), and k, the per-layer cap.
    budget: int = option(4, ge=0)
    k: int = option(2, ge=0)
    budget_scheduler: bool = True
    beta1: float = option(0.85, ge=0, lt=1)
    beta2: float = option(0.85, ge=0, lt=1)
    # New vectors: "reference" (g − Qᵀ(Qg), the official rule) or "qr" (exactly orthogonal to the active rows).
    new_vectors: str = option("reference", choices=("reference", "qr"))


def budget_at(t: int, total_steps: int, options: dict[str, Any]) -> int:
    """b(t) = round(b_0 · (1 − p³)), p = clip((t − t_init)/(T − t_final − t_init), 0, 1); b_0 without the scheduler."""
    b0 = int(options["budget"])
    if not options["budget_scheduler"]:
        return b0
    span = total_steps - options["t_final"] - options["t_init"]
    p = 1.0 if span <= 0 else min(max((t - options["t_init"]) / span, 0.0), 1.0)
    return int(round(b0 * (1.0 - p ** 3)))


def _schedule_options(config: Any) -> dict[str, Any]:
    # A dict: budget_at and the schedule read it by key (the tests pass their own dicts to budget_at).
    options = dataclasses.asdict(config.axis_options("schedule"))
    for key in ("t_init", "t_final", "budget", "k"):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{key}: expected an integer >= 0 (ElaLoRA schedule), got {value!r}")
    if isinstance(options["delta_t"], bool) or not isinstance(options["delta_t"], int) or options["delta_t"] <= 0:
        raise ConfigError("delta_t: expected a positive number of steps between reallocations, "
                          f"got {options['delta_t']!r}")
    for key in ("beta1", "beta2"):
        if not isinstance(options[key], (int, float)) or not 0 <= options[key] < 1:
            raise ConfigError(f"{key}: expected an EMA factor in [0, 1), got {options[key]!r}")
    if options["new_vectors"] not in ("reference", "qr"):
        raise ConfigError(f"new_vectors: expected 'reference' or 'qr', got {options['new_vectors']!r}")
    return options


def peak_lr(optimizer: Any) -> float | None:
    """The largest starting lr of the optimizer's groups (``initial_lr``, which torch's LR schedulers set, else
    ``lr``); None for an object without param groups."""
    groups = getattr(optimizer, "param_groups", None)
    if not groups:
        return None
    return max(float(g.get("initial_lr", g["lr"])) for g in groups)


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded by (seed, step): the same stream on every process, the global RNG untouched."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2 ** 63))


def _unit_orthogonal(rows: torch.Tensor, g: torch.Tensor, method: str) -> torch.Tensor:
    """normalize(g − proj(g)) with proj onto the span of ``rows`` (k, n); fp64 in, fp64 out."""
    if rows.shape[0]:
        if method == "qr":
            basis, _ = torch.linalg.qr(rows.t())
            for _ in range(2):  # twice: orthogonal to working precision
                g = g - basis @ (basis.t() @ g)
        else:
            g = g - rows.t() @ (rows @ g)
    return g / g.norm()


class ElaloraSchedule(Schedule):
    """AdaLoRA's importance EMAs, prune/expand at constant total rank, optimizer state of untouched slots kept.

    ``on_step(step, T)`` runs after ``optimizer.step()`` and the LR-scheduler step, before ``zero_grad``, and reads
    the (all-reduced, unscaled) gradients. It changes parameters in place and zeroes the optimizer moments of
    the slots it prunes or grows, so it needs the optimizer: ``peftkit.callbacks(model, optimizer=opt)``,
    ``attach_optimizer(opt)`` or the Trainer's callback arguments. Every decision is a function of the
    gradients, the parameters, (seed, step) and this object's state: identical on every process.
    """

    def __init__(self, model: nn.Module, config: Any) -> None:
        super().__init__(model, config)
        self.options = _schedule_options(config)
        state = state_of(model)
        self.adapter_name = next(n for n, c in state.configs.items() if c is config)
        self.layers = [(name, layer) for name, layer in adapter_layers(model).items()
                       if self.adapter_name in layer.adapters]
        # Per layer and tensor ("lora_A", "lora_E", "lora_B"): the sensitivity EMA Ī and the uncertainty EMA Ū.
        self.ema: dict[str, dict[str, torch.Tensor]] = {}
        for name, layer in self.layers:
            branch = layer.adapters[self.adapter_name]
            for key in ("lora_A", "lora_E", "lora_B"):
                param = getattr(branch, key)
                self.ema[f"{name}.{key}.ipt"] = torch.zeros_like(param, requires_grad=False)
                self.ema[f"{name}.{key}.unc"] = torch.zeros_like(param, requires_grad=False)
        self.step = 0
        self.history: list[dict[str, Any]] = []  # one record per reallocation (step, pruned, grown)

    def attach_optimizer(self, optimizer: Any) -> None:
        super().attach_optimizer(optimizer)
        if optimizer is not None and slot_optimizer(optimizer) is None:
            warnings.warn(
                f"ElaLoRA schedule: the attached optimizer ({type(optimizer).__name__}) keeps one Adam step count "
                "per tensor, so a grown slot's first updates are not fresh-Adam steps (its zeroed moments are "
                "bias-corrected with the tensor's count: 0.48·lr at step 10, up to 3.16·lr later); use "
                "peftkit.optimizer(model, lr) (the 'elalora-adamw' optimizer, one count per slot)", stacklevel=2)

    def on_train_begin_(self, total_steps: int) -> None:
        """Warn when the run is too short for its lr to grow the adapter from E = 0 (MIN_LR_STEPS)."""
        lr = peak_lr(self.optimizer) if self.optimizer is not None else None
        if lr is not None and lr * total_steps < MIN_LR_STEPS:
            warnings.warn(
                f"ElaLoRA: lr {lr:.3g} × {total_steps} steps = {lr * total_steps:.3g}, below {MIN_LR_STEPS:g}: from "
                f"E = 0 and P, Q ~ N(0, {INIT_STD}²) the update grows about as (lr·t)³ until lr·t passes {INIT_STD}, "
                f"so this run will barely change the model (12 steps at 1.5e-3 left SmolLM2's perplexity at 110.55 "
                f"from 111.11, where LoRA reached 59.45); train at least {math.ceil(MIN_LR_STEPS / lr)} steps at "
                "this lr, raise the lr, or use LoRA for so short a run (docs/methods/elalora.md)", stacklevel=2)

    def branch(self, layer: AdapterLayer) -> ElaloraBranch:
        return layer.adapters[self.adapter_name]

    # ---------------------------------------------------------------- scores
    def update_scores(self) -> None:
        """One EMA update from the current gradients: I = |w·g|, Ī ← β1Ī + (1−β1)I, Ū ← β2Ū + (1−β2)|I − Ī|.
        Layers whose adapter got no gradient this step (gated off by a schedule) are skipped; inactive slots
        keep 0."""
        beta1, beta2 = self.options["beta1"], self.options["beta2"]
        with torch.no_grad():
            for name, layer in self.layers:
                branch = self.branch(layer)
                params = {key: getattr(branch, key) for key in ("lora_A", "lora_E", "lora_B")}
                if any(p.grad is None for p in params.values()):
                    continue
                mask = branch.lora_mask
                for key, param in params.items():
                    ipt_avg, unc = self.ema[f"{name}.{key}.ipt"], self.ema[f"{name}.{key}.unc"]
                    ipt = (param * param.grad).abs()
                    ipt_avg.mul_(beta1).add_(ipt, alpha=1 - beta1)
                    unc.mul_(beta2).add_((ipt - ipt_avg).abs(), alpha=1 - beta2)
                    slot_off = _slot_view(~mask, key, param.shape)
                    ipt_avg.masked_fill_(slot_off, 0.0)
                    unc.masked_fill_(slot_off, 0.0)

    def triplet_scores(self, name: str) -> torch.Tensor:
        """S_i = S(E_i) + mean_j S(Q_ij) + mean_j S(P_ji), S = Ī·Ū; (r_max,) in the adapter dtype."""
        score = {key: self.ema[f"{name}.{key}.ipt"] * self.ema[f"{name}.{key}.unc"]
                 for key in ("lora_A", "lora_E", "lora_B")}
        return score["lora_E"] + score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0)

    # ---------------------------------------------------------------- the step
    def on_step(self, step: int, total_steps: int) -> None:
        self.step = step
        t = step - 1
        if t >= total_steps - self.options["t_final"]:
            return  # stabilisation: no score update, no change
        self.update_scores()
        t_init = self.options["t_init"]
        if t > t_init and (t - t_init) % self.options["delta_t"] == 0:
            budget = budget_at(t, total_steps, self.options)
            if budget > 0:
                self.reallocate(budget, step)

    def plan(self, budget: int) -> tuple[list[tuple[int, int]], list[int]]:
        """(prune list [(layer index, slot)], expand list [layer index, one entry per appearance, best first]).

        Candidates: each layer's k_l = min(k, r_l − 1) lowest-scored active slots. Prune: the b lowest pooled
        candidates; expand: the pooled candidates' layers from the highest score down (the caller skips
        layers at capacity). b is clamped to the pool size; ties are broken by (score, layer, slot)."""
        pool = []
        for li, (name, layer) in enumerate(self.layers):
            branch = self.branch(layer)
            active = torch.nonzero(branch.lora_mask).flatten().tolist()
            k_l = min(self.options["k"], len(active) - 1)
            if k_l <= 0:
                continue
            scores = self.triplet_scores(name).tolist()
            ranked = sorted(active, key=lambda i: (scores[i], i))[:k_l]
            pool.extend((scores[i], li, i) for i in ranked)
        pool.sort()
        budget = min(budget, len(pool))
        prune = [(li, i) for _, li, i in pool[:budget]]
        expand = [li for _, li, _ in sorted(pool, key=lambda c: (-c[0], c[1], c[2]))]
        return prune, expand

    def reallocate(self, budget: int, step: int) -> dict[str, Any]:
        """Prune b triplets, then grow b (decided before pruning). Returns the record also kept in ``history``."""
        if self.optimizer is None:
            raise StateError(
                "ElaLoRA schedule: a reallocation must reset the optimizer moments of the changed slots, but no "
                "optimizer is attached; build it with peftkit.callbacks(model, optimizer=opt) or call "
                "schedule.attach_optimizer(opt) before training"
            )
        prune, expand = self.plan(budget)
        gen = step_generator(self.config.seed, step)
        record = {"step": step, "pruned": [], "grown": []}
        with torch.no_grad():
            for li, slot in prune:
                name, layer = self.layers[li]
                branch = self.branch(layer)
                branch.lora_mask[slot] = False
                branch.lora_E[slot] = 0.0
                self._reset_slot(name, branch, slot)
                record["pruned"].append((name, slot))
            grown = 0
            for li in expand:
                if grown == len(prune):
                    break
                name, layer = self.layers[li]
                branch = self.branch(layer)
                free = torch.nonzero(~branch.lora_mask).flatten()
                if free.numel() == 0:
                    continue  # at capacity: the next candidate of the expand list takes the move
                slot = int(free[0])
                self._grow(branch, slot, gen)
                self._reset_slot(name, branch, slot)
                record["grown"].append((name, slot))
                grown += 1
        self.history.append(record)
        return record

    def _grow(self, branch: ElaloraBranch, slot: int, gen: torch.Generator) -> None:
        """q = normalize(g − Qᵀ(Qg)), p = normalize(g' − P(Pᵀg')) over the active slots, e = min(min|E|, 1e-13)."""
        method = self.options["new_vectors"]
        active = branch.lora_mask
        q_rows = branch.lora_A[active].double()
        p_cols = branch.lora_B[:, active].double()
        g = torch.randn(branch.lora_A.shape[1], generator=gen, dtype=torch.float64)
        g_out = torch.randn(branch.lora_B.shape[0], generator=gen, dtype=torch.float64)
        q_new = _unit_orthogonal(q_rows, g, method)
        p_new = _unit_orthogonal(p_cols.t(), g_out, method)
        e_active = branch.lora_E[active].abs()
        e_new = min(float(e_active.min()) if e_active.numel() else NEW_E_CAP, NEW_E_CAP)
        branch.lora_A[slot] = q_new.to(branch.lora_A.dtype)
        branch.lora_B[:, slot] = p_new.to(branch.lora_B.dtype)
        branch.lora_E[slot] = e_new
        branch.lora_mask[slot] = True

    def _reset_slot(self, name: str, branch: ElaloraBranch, slot: int) -> None:
        """Zero the score EMAs and the optimizer state at this slot only: the moments and the slot's step count
        with :class:`SlotAdamW`; with another optimizer, every state tensor shaped like the parameter."""
        slots = slot_optimizer(self.optimizer)
        for key in ("lora_A", "lora_E", "lora_B"):
            param = getattr(branch, key)
            index = _slot_index(key, slot)
            for suffix in ("ipt", "unc"):
                self.ema[f"{name}.{key}.{suffix}"][index] = 0.0
            if slots is not None and id(param) in slots.slot_axes:
                slots.reset_slot(param, slot)
                continue
            for value in self.optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value[index] = 0

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ema": {k: v.clone() for k, v in self.ema.items()},
                "history": [dict(r) for r in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.ema) - set(state.get("ema", {})))
        if missing:
            raise StateError(f"ElaLoRA schedule state: no score EMAs for {missing[:3]}; the checkpoint belongs to "
                             "another model or adapter")
        for key, value in state["ema"].items():
            if key in self.ema:
                self.ema[key].copy_(value)
        self.step = int(state.get("step", 0))
        self.history = [dict(r) for r in state.get("history", [])]

    def ranks(self) -> dict[str, int]:
        """Module name -> current active rank."""
        return {name: self.branch(layer).rank for name, layer in self.layers}


def _slot_index(key: str, slot: int):
    return (slice(None), slot) if key == "lora_B" else slot


def _slot_view(off: torch.Tensor, key: str, shape: torch.Size) -> torch.Tensor:
    """The (r_max,) slot mask broadcast to a tensor of ``shape`` (Q rows, E entries, P columns)."""
    if key == "lora_A":
        return off[:, None].expand(shape)
    if key == "lora_B":
        return off[None, :].expand(shape)
    return off


@registry.schedule("elalora", options=ElaloraScheduleOptions, architectures=("elalora",),
                   description="ElaLoRA prune/expand at constant total rank (cubic budget)")
def build_elalora_schedule(model: nn.Module, config: Any) -> ElaloraSchedule:
    return ElaloraSchedule(model, config)


registry.register_method(
    "elalora", architecture="elalora", optimizer="elalora-adamw", schedule="elalora", defaults={"r": 10, "alpha": 16},
    lr_convention=registry.LRConvention(
        "lora", 3.0,
        "authors' scripts: lr 1e-3 (MRPC), 8e-4 (CoLA), 5e-4 (XSum) with E = 0 and P, Q ~ N(0, 0.02^2) "
        "(elalora.md, Defaults), 2-2.5x the LoRA paper's GLUE rates (4e-4 to 5e-4); from E = 0 the update grows "
        "about as (lr*t)^3 "
        "until lr*t exceeds 0.02, so it needs the higher rate and ~0.05/lr steps (docs/methods/elalora.md); method "
        "guide: within 2 points of LoRA's best at 3x on both MiniLM tasks; best at 9x, 27x worse"),
    description="ElaLoRA (Chang et al. 2025): SVD-form adapter, ranks pruned and grown at constant total rank",
)
