"""Preference objectives on a peftkit model: DPO against the same model with its adapters off (no reference
copy) and the reference-free SimPO.

A preference batch holds pairs: sequences ``[chosen_0 .. chosen_{n-1}, rejected_0 .. rejected_{n-1}]`` of prompt +
completion tokens, either one per row with ``completion_mask`` 1 on the completion tokens (TRL's layout), or with
``labels`` (the token id on completion tokens, -100 elsewhere) and, for padding-free batches where several
sequences share a row with restarting ``position_ids``, ``sequence_ids`` (B, T): the sequence each token belongs to,
-1 on padding (``peftkit.train.data.collate_pairs``). The unit of the loss is
the pair: a step's loss is the mean over the preference pairs of its global batch, so each micro-batch
contributes ``sum of its pairs' losses / global pair count`` (:func:`pair_loss_share`), whatever the split into
micro-batches and processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .chunked_loss import head_of, target_logits, target_positions
from .inject import disabled

OBJECTIVES = ("sft", "dpo", "simpo")
PAIR_OBJECTIVES = ("dpo", "simpo")  # the objectives that read pairs (data.format: preference)
IGNORE_INDEX = -100
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


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


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, sequence_ids: torch.Tensor | None, sequences: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each sequence's labelled tokens and their count, each (``sequences``,).

    ``logits`` (B, T, V); ``labels`` (B, T), -100 where a token is not scored (prompt, padding, the first token of
    every packed sequence); ``sequence_ids`` (B, T), the sequence index of each token (None: row b is sequence b).
    Token t is predicted by position t − 1 of the same row."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    log_softmax = logits[:, :-1].log_softmax(-1)
    per_token = torch.gather(log_softmax, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_token = torch.where(keep, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    weight = keep.to(per_token.dtype)
    if sequence_ids is None:
        return per_token.sum(1), weight.sum(1)
    index = sequence_ids[:, 1:].clamp(min=0).flatten()
    sums = per_token.new_zeros(sequences).index_add(0, index, per_token.flatten())
    counts = weight.new_zeros(sequences).index_add(0, index, weight.flatten())
    return sums, counts


@dataclass
class PairStats:
    """Per-pair rewards of one micro-batch (detached): DPO's β · log-ratio, SimPO's β · mean log-prob."""

    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def pair_losses(model, batch: dict[str, torch.Tensor], objective: str, beta: float, gamma: float = 0.0,
                reference=None, pairs: int | None = None, chunked: bool = True,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, PairStats]:
    """Per-pair losses (n,) of a preference micro-batch on ``model``. For DPO the reference is the same model
    with its adapters off (``peftkit.disabled``, under ``torch.no_grad``): ``reference`` is the module to call for
    it (default ``model``; a training loop passes the unwrapped model where ``model`` is an engine's wrapper).
    ``batch``: input_ids and attention_mask or position_ids, and completion_mask (2n, T, chosen rows first) or
    labels (+ sequence_ids for padding-free rows, see the module docstring; then ``pairs``, the batch's pair
    count, is needed: rows are no longer sequences). ``chunked``: where the model's logits are
    ``head(base(...))`` (``peftkit.chunked_loss.head_of``; not through an engine's wrapper), the head runs on the
    completion tokens only, never on every position's [tokens × vocab] logits; ``positions`` are those tokens'
    ``target_positions`` computed on the host (else computed here from ``labels``)."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if "labels" in batch:
        labels, sequence_ids = batch["labels"], batch.get("sequence_ids")
    else:
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
        sequence_ids = None
    if sequence_ids is not None and pairs is None:
        raise ValueError("pair_losses: a batch with sequence_ids (padding-free rows) needs pairs=<its pair count>")
    sequences = 2 * pairs if pairs is not None else labels.shape[0]

    def logps(module) -> tuple[torch.Tensor, torch.Tensor]:
        if chunked and head_of(module) is not None:
            # The head on the completion tokens only: never the [tokens × vocab] logits of every position.
            where = target_positions(labels) if positions is None else positions
            logits, targets = target_logits(module, {**inputs, "use_cache": False}, labels, where)
            per_token = torch.gather(logits.log_softmax(-1), 1, targets.unsqueeze(1)).squeeze(1)
            owners = (sequence_ids[:, 1:] if sequence_ids is not None else
                      torch.arange(labels.shape[0], device=labels.device)[:, None].expand(-1, labels.shape[1] - 1))
            owners = owners.reshape(-1).index_select(0, where.to(owners.device)).to(per_token.device)
            sums = per_token.new_zeros(sequences).index_add(0, owners, per_token)
            counts = per_token.new_zeros(sequences).index_add(0, owners, torch.ones_like(per_token))
            return sums, counts
        logits = module(**inputs, use_cache=False).logits
        logits = logits if logits.dtype == torch.float64 else logits.float()
        return sequence_logps(logits, labels, sequence_ids, sequences)

    if objective == "dpo":
        reference = model if reference is None else reference
        # The reference is the frozen base, so it runs without dropout (as TRL's reference model, in eval mode);
        # the policy keeps the mode the loop set.
        was_training = reference.training
        reference.eval()
        try:
            with torch.no_grad(), disabled(reference):
                ref, _ = logps(reference)
        finally:
            reference.train(was_training)
        ref_chosen, ref_rejected = ref.chunk(2)
    elif objective != "simpo":
        raise ValueError(f"objective: expected one of {PAIR_OBJECTIVES}, got {objective!r}")
    summed, tokens = logps(model)
    chosen, rejected = summed.chunk(2)
    if objective == "dpo":
        losses = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, beta)
        stats = PairStats((beta * (chosen - ref_chosen)).detach(), (beta * (rejected - ref_rejected)).detach())
    else:
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        losses = simpo_losses(chosen, rejected, chosen_tokens, rejected_tokens, beta, gamma)
        stats = PairStats((beta * chosen / chosen_tokens.clamp(min=1)).detach(),
                          (beta * rejected / rejected_tokens.clamp(min=1)).detach())
    return losses, stats


def pair_loss_share(model, batch: dict[str, torch.Tensor], global_pairs: int, objective: str, beta: float,
                    gamma: float = 0.0, reference=None, pairs: int | None = None, chunked: bool = True,
                    positions: torch.Tensor | None = None) -> tuple[torch.Tensor, PairStats]:
    """This micro-batch's share of the step's loss: the sum of its pairs' losses / the global batch's pairs
    (TRL's DPO loss is the mean over the pairs of its batch: summed shares over micro-batches and processes give
    the one-process, one-batch mean)."""
    losses, stats = pair_losses(model, batch, objective, beta, gamma, reference, pairs, chunked, positions)
    return losses.sum() / max(int(global_pairs), 1), stats


def reward_sums(stats: PairStats) -> torch.Tensor:
    """(4,) sums over a micro-batch's pairs of the logged rewards, in TRL's names and order
    (``REWARD_METRICS``): chosen reward, rejected reward, chosen > rejected, margin. Divided by the global pair
    count they are the step's means."""
    chosen, rejected = stats.chosen_rewards.double(), stats.rejected_rewards.double()
    return torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).double().sum(), (chosen - rejected).sum()])


REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
