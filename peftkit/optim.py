"""Adapter-aware optimizer machinery: parameter roles, (A, B) pairs by module name, param groups.

Every trainable parameter of a wrapped model gets a role:
- ``"A"`` / ``"B"``: the down / up factor of a LoRA-shaped adapter (ΔW = s·B·A), found through
  ``AdapterLayer.factor_pairs()``, so pairing is by module name, never by position;
- a role a layer declares through ``AdapterLayer.tensor_roles()`` (e.g. ``"A"`` / ``"B"`` for conv factors,
  ``"embedding"`` for embedding factors);
- ``"adapter"``: any other adapter tensor (HRA's U, Hydra's factors, ElaLoRA's P, E, Q ...);
- ``"other"``: everything else that trains (classification heads, biases, norms).
and a decay flag: weight decay applies to tensors of 2 or more dimensions that are not biases and not
norm weights. Param groups carry ``role``, ``names`` and ``lr_ratio`` so that a resume can check them.

The shared pieces of every pair optimizer (``PairOptimizer``, ``adamw_update``, the Gram inverses) live here; this
module registers nothing and does not know the registry: the plain ``adamw`` is registered in
``peftkit/components.py``, method optimizers in ``adapters/``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from . import distributed
from .errors import ConfigError, StateError
from .layer import AdapterLayer
from .validation import Rule, check_fields, check_value, option


@dataclass
class FactorPair:
    """The (A, B) pair of one adapter in one layer: ΔW = scaling · B · A."""

    module_name: str
    adapter_name: str
    a: nn.Parameter  # (r, in)
    b: nn.Parameter  # (out, r)
    scaling: float
    layer: AdapterLayer
    # Which matrix of the layer, for layers that hold several (an expert parameter: one pair per expert).
    index: int | None = None

    @property
    def key(self) -> str:
        """Unique per pair: ``module:adapter``, with ``[expert]`` for a layer of several matrices."""
        return f"{self.module_name}:{self.adapter_name}" + ("" if self.index is None else f"[{self.index}]")


def factor_pairs(model: nn.Module) -> list[FactorPair]:
    """Every trainable (A, B) pair of the model, keyed by module and adapter name."""
    pairs = []
    for module_name, layer in model.named_modules():
        if isinstance(layer, AdapterLayer):
            for adapter_name, a, b, s, *index in layer.factor_pairs():
                if a.requires_grad and b.requires_grad:
                    pairs.append(FactorPair(module_name, adapter_name, a, b, s, layer, index[0] if index else None))
    return pairs


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)) or "Norm" in type(module).__name__


def parameter_roles(model: nn.Module) -> dict[str, tuple[str, bool]]:
    """Trainable parameter name -> (role, decays)."""
    ids_a = {}
    ids_b = {}
    for pair in factor_pairs(model):
        ids_a[id(pair.a)] = pair
        ids_b[id(pair.b)] = pair
    adapter_ids = set()
    declared: dict[int, str] = {}
    norm_ids = set()
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            adapter_ids |= {id(p) for p in module.adapters.parameters()}
            declared.update({id(p): role for p, role in module.tensor_roles()})
        if _is_norm(module):
            norm_ids |= {id(p) for p in module.parameters(recurse=False)}
    roles = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in ids_a:
            role = "A"
        elif id(param) in ids_b:
            role = "B"
        elif id(param) in declared:
            role = declared[id(param)]
        elif id(param) in adapter_ids:
            role = "adapter"
        else:
            role = "other"
        decays = param.ndim >= 2 and not name.endswith("bias") and id(param) not in norm_ids
        roles[name] = (role, decays)
    return roles


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                 lr_ratios: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Groups by (role, decays); group lr = lr · lr_ratios[role] (default 1)."""
    lr = check_lr(lr)
    weight_decay = check_fields(AdamWOptions, {"weight_decay": weight_decay})["weight_decay"]
    lr_ratios = lr_ratios or {}
    named = dict(model.named_parameters())
    buckets: dict[tuple[str, bool], list[str]] = {}
    for name, (role, decays) in parameter_roles(model).items():
        buckets.setdefault((role, decays), []).append(name)
    if not buckets:
        raise ConfigError("optimizer: the model has no trainable parameters; wrap it with peftkit.wrap, or load "
                          "the adapter with peftkit.load(model, dir, trainable=True)")
    groups = []
    for (role, decays), names in sorted(buckets.items()):
        ratio = float(lr_ratios.get(role, 1.0))
        groups.append({
            "params": [named[n] for n in names],
            "names": names,
            "role": role,
            "lr": lr * ratio,
            "lr_ratio": ratio,
            "weight_decay": weight_decay if decays else 0.0,
        })
    return groups


def check_lr(lr: float, name: str = "lr") -> float:
    """The learning rate as a float: a finite number > 0, else one ConfigError naming ``name``."""
    return check_value(name, lr, float, Rule(gt=0, expect="a positive learning rate (finite)", example=2e-4))


@dataclass
class AdamWOptions:
    """The options of torch's AdamW as peftkit's ``adamw`` takes them (also ElaLoRA's optimizer's)."""

    weight_decay: float = option(0.0, ge=0)
    betas: tuple[float, float] = option((0.9, 0.999), ge=0, lt=1)
    eps: float = option(1e-8, ge=0)


# ------------------------------------------------------------------------------------------ pair optimizers

def work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype the r×r algebra runs in: fp64 for fp64 factors, fp32 otherwise (bf16 factors included)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def sym_eig(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ ascending, Q) of a symmetric PSD r×r matrix, λ clamped at 0 (round-off can make it negative)."""
    evals, evecs = torch.linalg.eigh((gram + gram.T) / 2)
    return evals.clamp_min(0), evecs


def pinv_from_eig(evals: torch.Tensor, evecs: torch.Tensor) -> torch.Tensor:
    """The pseudo-inverse Q·diag(1/λ)·Qᵀ of a PSD Gram matrix, dropping λ ≤ r·eps·λ_max (round-off level of a
    Gram matrix). A zero matrix (B = 0 at the LoRA init) gives the zero matrix."""
    cutoff = evals.shape[0] * torch.finfo(evals.dtype).eps * evals.max()
    inv = torch.where(evals > cutoff, 1.0 / evals.clamp_min(torch.finfo(evals.dtype).tiny), torch.zeros_like(evals))
    return (evecs * inv) @ evecs.T


def damped_inverse(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """(gram + δI)⁻¹ for δ > 0; the pseudo-inverse for δ = 0 (exact inverse when gram is invertible)."""
    if damping > 0:
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        return torch.linalg.inv(gram + damping * eye)
    return pinv_from_eig(*sym_eig(gram))


def loraplus_ratios(ratio: Any) -> dict[str, float]:
    """The ``lr_ratios`` of a pair optimizer's ``loraplus_lr_ratio`` option (LoRA+ composition: lr_B = ratio·lr)."""
    ratio = check_value("loraplus_lr_ratio", ratio, float,
                        Rule(gt=0, expect="a positive number (lr_B / lr_A, 1 = plain)"))
    return {"B": ratio}


def check_betas_eps(betas: Any, eps: Any) -> tuple[tuple[float, float], float]:
    fields = check_fields(AdamWOptions, {"betas": betas, "eps": eps})
    return fields["betas"], fields["eps"]


class PairOptimizer(torch.optim.Optimizer):
    """Base of the optimizers that transform each LoRA pair's gradients as a pair (LoRA-Pro, LoFT, the
    preconditioner). Every other trainable tensor (heads, biases, norms, embedding LoRA, any adapter tensor
    that is not an (A, B) pair) gets AdamW, with torch's formula, inside the same optimizer.

    Pairs come from :func:`factor_pairs` (by module name, with each layer's own scaling s). Param groups are
    :func:`param_groups` (role / decay / ``lr_ratio``), so LoRA+ ratios compose: a pair's A moves with its
    group's lr, its B with B's group lr, and an LR scheduler acts on all groups alike.

    ``step()`` runs, per optimizer step (README §4.1 of the specs):
    accumulate (the caller) -> unscale (GradScaler.unscale_, the caller) -> all-reduce (DDP, during backward)
    -> clip (``max_grad_norm``, here, on the unscaled gradients; the norm comes from :meth:`clip_norm_sq`, so a
    method can measure it on projected gradients) -> transform and update (:meth:`update_pair`) -> the caller
    zeroes the gradients. A pair whose A and B both have no gradient (a CoTo-gated branch) is skipped entirely.

    ``state_dict()`` holds every tensor a method keeps (in ``state`` of the pair's parameters), the global step
    and the pair names, so a resume is exact and a resume onto a different model is refused.
    """

    optimizer_name = "pair"

    def __init__(self, model: nn.Module, lr: float, *, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 lr_ratios: dict[str, float] | None = None, max_grad_norm: float | None = None) -> None:
        betas, eps = check_betas_eps(betas, eps)
        max_grad_norm = check_value("max_grad_norm", max_grad_norm, float | None,
                                    Rule(gt=0, expect="a positive finite number or None (no clipping)"))
        groups = param_groups(model, lr, weight_decay, lr_ratios)
        self.pairs = factor_pairs(model)
        if not self.pairs:
            raise ConfigError(
                f"optimizer '{self.optimizer_name}' found no trainable LoRA (A, B) pair; it needs a LoRA-shaped "
                "adapter (lora, lora-ga, lora-one, eva, coto), not HRA, Hydra or ElaLoRA"
            )
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.global_step = 0
        # The clip norm of the last step (before clipping), for logging; None when not clipping.
        self.last_grad_norm: torch.Tensor | None = None
        self._group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        paired = {id(pair.a) for pair in self.pairs} | {id(pair.b) for pair in self.pairs}
        self._others = [p for group in self.param_groups for p in group["params"] if id(p) not in paired]
        # A subclass whose per-pair state is large sets these: see :meth:`pair_owners`. ``can_shard_pairs``: the
        # state may be sharded once the caller promises to call state_dict() on every process.
        self.shard_pairs = False
        self.can_shard_pairs = False
        self._owners: dict[str, int] | None = None

    # ------------------------------------------------------------------ subclass API
    def clip_norm_sq(self, pair: FactorPair, grad_a: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor:
        """This pair's contribution to the squared clip norm: by default the raw gradients'."""
        return grad_a.double().square().sum() + grad_b.double().square().sum()

    def update_pair(self, pair: FactorPair, grad_a: torch.Tensor, grad_b: torch.Tensor, group_a: dict[str, Any],
                    group_b: dict[str, Any]) -> None:
        """Transform the pair's (already clipped) gradients and update A and B in place."""
        raise NotImplementedError

    def pair_state_size(self, pair: FactorPair) -> int:
        """Elements of state this pair keeps (balances :meth:`pair_owners`); by default its factors'."""
        return pair.a.numel() + pair.b.numel()

    # ------------------------------------------------------------------ the step
    def pair_key(self, pair: FactorPair) -> str:
        return pair.key

    def pair_owners(self) -> dict[str, int]:
        """Pair key -> the process that owns it, when ``shard_pairs`` and torch.distributed runs several
        processes (else empty). Whole pairs are dealt largest first to the least-loaded process, the same on every
        process. The owner alone keeps the pair's state and computes its update; the new factors are then
        broadcast, so every process ends the step with the same factors and per-process state memory is ~1/N.
        This needs the gradients to be identical on every process at ``step()`` (DDP, or peftkit's engines,
        which average them first)."""
        if self._owners is None:
            world = distributed.world_size()
            self._owners = {}
            if self.shard_pairs and world > 1:
                load = [0] * world
                for pair in sorted(self.pairs, key=lambda p: -self.pair_state_size(p)):  # stable: same order
                    owner = min(range(world), key=lambda r: load[r])
                    self._owners[self.pair_key(pair)] = owner
                    load[owner] += self.pair_state_size(pair)
        return self._owners

    def enable_pair_sharding(self) -> bool:
        """Called by a loop whose checkpoints call ``state_dict()`` on every process (a collective under
        sharding; a loop that saves from rank 0 alone would wait forever): shard the pairs' state if this
        optimizer can. Before the first step and before a resume's ``load_state_dict``. Returns whether it does."""
        if self.can_shard_pairs and not self.shard_pairs:
            if self.state:
                raise StateError("enable_pair_sharding: call it before the first optimizer step")
            self.shard_pairs, self._owners = True, None
        return self.shard_pairs

    def _owns(self, pair: FactorPair) -> bool:
        owners = self.pair_owners()
        return not owners or owners[self.pair_key(pair)] == distributed.rank()

    def _pair_grads(self) -> list[tuple[FactorPair, torch.Tensor, torch.Tensor]]:
        out = []
        for pair in self.pairs:
            ga, gb = pair.a.grad, pair.b.grad
            if ga is None and gb is None:
                continue
            out.append((pair, torch.zeros_like(pair.a) if ga is None else ga,
                        torch.zeros_like(pair.b) if gb is None else gb))
        return out

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.global_step += 1
        pairs = self._pair_grads()
        others = [p for p in self._others if p.grad is not None]
        if self.max_grad_norm is not None:
            total = sum((self.clip_norm_sq(pair, ga, gb) for pair, ga, gb in pairs),
                        torch.zeros((), dtype=torch.float64))
            for p in others:
                total = total + p.grad.double().square().sum()
            norm = total.sqrt()
            self.last_grad_norm = norm
            coef = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            for _, ga, gb in pairs:
                ga.mul_(coef.to(ga.dtype))
                gb.mul_(coef.to(gb.dtype))
            for p in others:
                p.grad.mul_(coef.to(p.grad.dtype))
        for pair, ga, gb in pairs:
            if self._owns(pair):
                self.update_pair(pair, ga, gb, self._group_of[id(pair.a)], self._group_of[id(pair.b)])
        owners = self.pair_owners()
        if owners:
            for source in range(distributed.world_size()):
                distributed.broadcast_tensors([t for pair, _, _ in pairs if owners[self.pair_key(pair)] == source
                                               for t in (pair.a, pair.b)], source)
        for p in others:
            self.update_other(p, self._group_of[id(p)])
        return loss

    def update_other(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        """One step on a trainable tensor outside the pairs (its gradient clipped): torch's AdamW by default."""
        adamw_update(param, param.grad, self.state[param], group)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Under pair sharding a collective (every process calls it): rank 0 gets the whole state, as one
        process would have it; the other processes get their own part."""
        state = super().state_dict()
        if self.pair_owners():
            state["state"] = self._gather_pair_states(state["state"])
        state["peftkit"] = {"optimizer": self.optimizer_name, "global_step": self.global_step,
                            "pairs": [self.pair_key(pair) for pair in self.pairs]}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("peftkit")
        if extra is None or extra.get("optimizer") != self.optimizer_name:
            found = None if extra is None else extra.get("optimizer")
            raise StateError(
                f"optimizer state: expected a '{self.optimizer_name}' state dict saved by peftkit, got one from "
                f"{found or 'another optimizer'}; resume with the optimizer that saved it"
            )
        expected = [self.pair_key(pair) for pair in self.pairs]
        if list(extra["pairs"]) != expected:
            missing = sorted(set(expected) ^ set(extra["pairs"]))[:4]
            raise StateError(
                f"optimizer state: the saved (A, B) pairs differ from this model's ({missing} ...); resume on the "
                "model (targets, adapter names) the state was saved from"
            )
        # torch casts loaded state tensors to their parameter's dtype; a method may keep other dtypes (bf16
        # moments of fp32 factors, fp32 algebra on bf16 factors), so restore the saved ones.
        saved_dtypes = {index: {key: value.dtype for key, value in entry.items() if isinstance(value, torch.Tensor)}
                        for index, entry in state_dict["state"].items()}
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "peftkit"})
        params = [p for group in self.param_groups for p in group["params"]]
        for index, dtypes in saved_dtypes.items():
            entry = self.state[params[int(index)]]
            for key, dtype in dtypes.items():
                entry[key] = entry[key].to(dtype)
        self.global_step = int(extra["global_step"])
        for pair in self.pairs:  # every process read the whole state; it keeps the pairs it owns
            if not self._owns(pair):
                self.state.pop(pair.a, None)
                self.state.pop(pair.b, None)

    def _gather_pair_states(self, states: dict[int, Any]) -> dict[int, Any]:
        """The state entries of every process's pairs, merged on rank 0 (moved through the CPU)."""
        import torch.distributed as dist

        index = {id(p): i for i, p in enumerate(p for group in self.param_groups for p in group["params"])}
        foreign = {index[id(t)] for pair in self.pairs if not self._owns(pair) for t in (pair.a, pair.b)}
        owned = {index[id(t)] for pair in self.pairs if self._owns(pair) for t in (pair.a, pair.b)}
        mine = {i: {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in entry.items()}
                for i, entry in states.items() if i in owned}
        gathered: list[Any] | None = [None] * distributed.world_size() if distributed.rank() == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if gathered is None:
            return states
        merged = {i: entry for i, entry in states.items() if i not in foreign}
        for part in gathered:
            for i, entry in part.items():
                merged.setdefault(i, entry)
        return dict(sorted(merged.items()))


def adamw_update(param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    """One torch-AdamW step on one tensor (decoupled decay, bias-corrected moments; torch's formula)."""
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    state["step"] += 1
    step = int(state["step"].item())
    param.mul_(1 - lr * group["weight_decay"])
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias1 = 1 - beta1 ** step
    bias2_sqrt = math.sqrt(1 - beta2 ** step)
    denom = (state["exp_avg_sq"].sqrt() / bias2_sqrt).add_(group["eps"])
    param.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)
