"""What a training loss averages over, so that every split of a global batch (micro-batches under gradient
accumulation, processes) trains the adapter the whole batch would.

The loss of an optimizer step is the mean over the global batch's **loss units**: its target tokens for a
causal LM (labels != -100 after the shift: a row's first label is predicted by nothing), its labelled tokens for
other token-level heads, its examples for sequence classification. A micro-batch therefore contributes the sum of
its units' losses divided by the global count, never its own mean: with answers of different lengths, a mean of
per-batch means weights a token of a short batch more than a token of a long one. transformers' Trainer does the
same with ``num_items_in_batch``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .chunked_loss import IGNORE_INDEX

# transformers' model classes whose loss is ForCausalLMLoss (loss_type None falls back to it, e.g. GPT-2's).
CAUSAL_LOSS_TYPES = (None, "ForCausalLM")


def shifts_labels(model: nn.Module) -> bool:
    """Whether ``model``'s loss predicts ``labels[t + 1]`` at position t (transformers' causal-LM loss)."""
    return getattr(model, "loss_type", None) in CAUSAL_LOSS_TYPES and "_loss_function" not in vars(model)


def batch_loss_units(model: nn.Module, batch: Mapping[str, Any]) -> int:
    """The units ``model(**batch).loss`` averages over: labelled tokens (after the causal shift where the model
    shifts) when ``labels`` has the shape of ``input_ids``, else examples (rows of ``labels`` or ``input_ids``)."""
    labels, ids = batch.get("labels"), batch.get("input_ids")
    if isinstance(labels, torch.Tensor) and isinstance(ids, torch.Tensor) and labels.dim() >= 2 \
            and labels.shape == ids.shape:
        if shifts_labels(model):
            labels = labels[..., 1:]
        return int((labels != IGNORE_INDEX).sum())
    rows = labels if isinstance(labels, torch.Tensor) else ids
    return int(rows.shape[0]) if isinstance(rows, torch.Tensor) else 1


def takes_item_count(model: nn.Module) -> bool:
    """Whether ``model(..., num_items_in_batch=N).loss`` is the sum of its token losses divided by N: a
    transformers causal LM whose forward passes loss kwargs on to ForCausalLMLoss (what the Trainer checks too)."""
    if not getattr(model, "accepts_loss_kwargs", True) or not shifts_labels(model):
        return False
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind == p.VAR_KEYWORD or p.name == "num_items_in_batch" for p in parameters)


# How a micro-batch's share of the global mean is computed (``loss_mode``):
# "item_count": the model divides its summed cross-entropy by the global count (num_items_in_batch);
# "summed": the causal cross-entropy summed here from the logits, in their precision (fp64 logits stay fp64,
#           where transformers' loss rounds them to fp32), divided by the global count;
# "rescaled": the model's mean loss times local units / global units (any mean-reduced head: CE, MSE, BCE);
# "chunked": the "summed" loss with the output head fused into a chunked cross-entropy at the target positions
#            only, never the [tokens × vocab] logits (peftkit.chunked_loss).
LOSS_MODES = ("item_count", "summed", "rescaled", "chunked")


def loss_mode(model: nn.Module, causal_lm: bool, chunked: bool = False) -> str:
    """The exact way to take ``model``'s share of a global mean: with ``chunked``, the fused chunked head and
    cross-entropy where the model's logits are ``head(base(...))`` (peftkit.chunked_loss.head_of); else its own
    ``num_items_in_batch`` where it has it and its logits are at most fp32 (or it adds an MoE router loss, which
    only its own loss holds), the causal sum here for other causal LMs, a rescaled mean otherwise."""
    if not causal_lm:
        return "rescaled"
    if chunked and shifts_labels(model):
        from .chunked_loss import head_of  # looked up per call: tests patch chunked_loss
        if head_of(model) is not None:
            return "chunked"
    if takes_item_count(model) and (getattr(model, "dtype", None) != torch.float64
                                    or getattr(getattr(model, "config", None), "output_router_logits", False)):
        return "item_count"  # an MoE router's auxiliary loss is only in the model's own loss
    return "summed"


def summed_causal_loss(logits: torch.Tensor, labels: torch.Tensor, global_units: int) -> torch.Tensor:
    """Σ cross-entropy of ``logits`` (batch, seq, vocab) at the targets ``labels[..., 1:] != -100``, over
    ``global_units``; in the logits' precision, at least fp32."""
    logits = logits[..., :-1, :]
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    targets = labels[..., 1:].to(logits.device)
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum") / max(int(global_units), 1)


def share_of_global_mean(forward: nn.Module, batch: Mapping[str, Any], local_units: int, global_units: int,
                         mode: str, positions: torch.Tensor | None = None) -> torch.Tensor:
    """This micro-batch's part of the global batch's mean loss: Σ (its units' losses) / ``global_units``.

    ``forward`` is the model to call (or an engine's wrapper of it); ``mode`` is ``loss_mode`` of the model.
    A micro-batch without units contributes 0 with a zero gradient (its own mean would be 0/0). ``positions``: the
    chunked mode's target positions from the host (``chunked_loss.target_positions``), so it reads nothing back."""
    total = max(int(global_units), 1)
    if mode == "item_count":
        return forward(**batch, num_items_in_batch=total).loss
    if mode == "chunked":
        from .chunked_loss import chunked_causal_loss  # looked up per call: tests patch chunked_loss
        return chunked_causal_loss(forward, batch, total, positions=positions)
    if mode == "summed":
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return summed_causal_loss(forward(**inputs).logits, batch["labels"], total)
    out = forward(**batch)
    if local_units == 0:
        return out.logits.sum() * 0.0  # keeps every process's backward in the graph (DDP, sharded gathers)
    return out.loss * (local_units / total)
