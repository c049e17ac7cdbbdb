"""Preference objectives on a peftkit model: DPO against the same model with its adapters off (no reference
copy) and the reference-free SimPO.

A preference batch holds pairs: rows ``[chosen_0 .. chosen_{n-1}, rejected_0 .. rejected_{n-1}]`` of prompt +
completion tokens, with ``completion_mask`` 1 on the completion tokens (TRL's layout). The unit of the loss is
the pair: a step's loss is the mean over the preference pairs of its global batch, so each micro-batch
contributes ``sum of its pairs' losses / global pair count`` (:func:`pair_loss_share`), whatever the split into
micro-batches and processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .api import disabled

OBJECTIVES = ("sft", "dpo", "simpo")


def completion_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each row's completion tokens and their count.

    ``logits`` (B, T, V), ``input_ids`` and ``completion_mask`` (B, T). Token t is predicted by position
    t − 1. Returns ``(sum log p, count)``, each (B,), in ``logits``' dtype (fp64 on an fp64 model)."""
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(logits.dtype)
    per_token = torch.gather(logits[:, :-1].log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    return (per_token * mask).sum(1), mask.sum(1)


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               beta: float) -> torch.Tensor:
    """DPO's per-pair loss (Rafailov et al. 2023, the sigmoid form; TRL's ``loss_type="sigmoid"``):
    −log σ(β · ((log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)))), each (n,)."""
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))


def simpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
                 rejected_tokens: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO's per-pair loss (Meng et al. 2024, eq. 6), reference-free:
    −log σ(β/|y_w| · log π(y_w) − β/|y_l| · log π(y_l) − γ)."""
    margin = beta * (chosen / chosen_tokens.clamp(min=1) - rejected / rejected_tokens.clamp(min=1)) - gamma
    return -F.logsigmoid(margin)


@dataclass
class PairStats:
    """Per-pair rewards of one micro-batch (detached): DPO's β · log-ratio, SimPO's β · mean log-prob."""

    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def pair_losses(model, batch: dict[str, torch.Tensor], objective: str, beta: float, gamma: float = 0.0
                ) -> tuple[torch.Tensor, PairStats]:
    """Per-pair losses (n,) of a preference micro-batch on ``model`` (for DPO the reference is ``model`` inside
    ``peftkit.disabled``, under ``torch.no_grad``). ``batch``: input_ids, attention_mask, completion_mask
    (2n, T), chosen rows first."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    logits = model(**inputs, use_cache=False).logits
    logits = logits if logits.dtype == torch.float64 else logits.float()
    logps, tokens = completion_logps(logits, batch["input_ids"], batch["completion_mask"])
    chosen, rejected = logps.chunk(2)
    if objective == "dpo":
        with torch.no_grad(), disabled(model):
            ref_logits = model(**inputs, use_cache=False).logits
            ref_logits = ref_logits if ref_logits.dtype == torch.float64 else ref_logits.float()
            ref, _ = completion_logps(ref_logits, batch["input_ids"], batch["completion_mask"])
        ref_chosen, ref_rejected = ref.chunk(2)
        losses = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, beta)
        stats = PairStats((beta * (chosen - ref_chosen)).detach(), (beta * (rejected - ref_rejected)).detach())
    elif objective == "simpo":
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        losses = simpo_losses(chosen, rejected, chosen_tokens, rejected_tokens, beta, gamma)
        stats = PairStats((beta * chosen / chosen_tokens.clamp(min=1)).detach(),
                          (beta * rejected / rejected_tokens.clamp(min=1)).detach())
    else:
        raise ValueError(f"objective: expected one of {OBJECTIVES[1:]}, got {objective!r}")
    return losses, stats


def pair_loss_share(model, batch: dict[str, torch.Tensor], global_pairs: int, objective: str, beta: float,
                    gamma: float = 0.0) -> tuple[torch.Tensor, PairStats]:
    """This micro-batch's share of the step's loss: the sum of its pairs' losses / the global batch's pairs."""
    losses, stats = pair_losses(model, batch, objective, beta, gamma)
    return losses.sum() / global_pairs, stats
