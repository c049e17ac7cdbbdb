"""The evaluation pass over data.eval: loss and accuracy or perplexity, a pair objective's loss and rewards, and
the metrics on generated answers (:mod:`peftkit.train.evaluation`); every process reads its share, the sums are
all-reduced."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..preference import PAIR_OBJECTIVES, REWARD_METRICS, pair_losses, reward_sums
from . import engines, evaluation
from .data import Tokenized, collate_pairs
from .parked_tokenizer import live
from .recipe import objective_settings
from .run_setup import Run
from .stop_signals import StopSignals
from .vision import collate  # data.collate, plus the pixel values of conversations with images


@torch.no_grad()
def evaluate(run: Run, model, signals: StopSignals | None = None, metrics: list[str] | None = None) -> dict[str, float]:
    """Loss (mean over examples for classification, over target tokens for LM), accuracy for classification,
    perplexity for LM; each process reads every num_processes-th example and the sums are all-reduced.
    ``metrics`` (default ``training.eval_metrics``) adds F1, exact match on generated answers and hooks.
    On one process a received stop signal ends it early ({} is returned: the caller checkpoints and exits)."""
    examples: Tokenized | None = run.examples.eval
    if examples is None:
        return {}
    accelerator = run.accelerator
    engine = run.engine or engines.make("ddp", accelerator)
    unwrapped = engine.eval_model(model)  # under a sharded engine: the prepared model, which gathers the base
    if run.recipe.training.objective in PAIR_OBJECTIVES:
        return _evaluate_pairs(run, unwrapped, engine, signals)
    was_training = unwrapped.training
    unwrapped.eval()
    mine = list(range(accelerator.process_index, len(examples), accelerator.num_processes))
    size = run.recipe.training.eval_batch_size or run.recipe.training.batch_size
    starts = list(range(0, len(mine), size))
    if engine.collective_forward:
        # Every forward all-gathers shards: every process runs as many batches as the busiest one; the
        # extra batches repeat example 0 and count for nothing.
        busiest = math.ceil(math.ceil(len(examples) / accelerator.num_processes) / size)
        starts += [None] * (busiest - len(starts))
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, count, correct
    metrics = list(run.recipe.training.eval_metrics if metrics is None else metrics)
    predictions: list = []
    for start in starts:
        if signals is not None and signals.received is not None and accelerator.num_processes == 1:
            unwrapped.train(was_training)
            return {}
        indices = [0] if start is None else mine[start:start + size]
        batch = collate(examples, indices, run.tokenizer.pad_token_id, run.classification)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with accelerator.autocast():
            logits = unwrapped(**batch).logits
            logits = logits if logits.dtype == torch.float64 else logits.float()
        if start is None:
            continue
        if run.classification:
            totals[0] += F.cross_entropy(logits, labels, reduction="sum")
            totals[1] += labels.numel()
            totals[2] += (logits.argmax(-1) == labels).sum()
            predictions.extend(zip(logits.argmax(-1).tolist(), labels.tolist()))
        else:
            shifted = labels[:, 1:]
            totals[0] += F.cross_entropy(logits[:, :-1].flatten(0, 1), shifted.flatten(), ignore_index=-100,
                                         reduction="sum")
            totals[1] += (shifted != -100).sum()
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    if was_training:
        unwrapped.train()
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    if run.classification:
        values = {"eval_loss": loss, "eval_accuracy": (totals[2] / totals[1].clamp(min=1)).item()}
    else:
        values = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}
    extra = [m for m in metrics if m != "accuracy"]
    if run.classification and extra:
        pairs = _gathered(accelerator, predictions)
        values.update(evaluation.compute(extra, [p for p, _ in pairs], [r for _, r in pairs]))
    elif evaluation.needs_generation(extra, run.recipe.data.format):
        with live(run.tokenizer) as tokenizer:  # a parked tokenizer is loaded for the generation only
            answers = evaluation.generate_answers(unwrapped, tokenizer, examples, mine,
                                                  max_new_tokens=run.recipe.training.eval_max_new_tokens,
                                                  batch_size=size, autocast=accelerator.autocast)
        pairs = _gathered(accelerator, list(zip(*answers)))
        values.update(evaluation.compute(extra, [p for p, _ in pairs], [r for _, r in pairs],
                                         run.recipe.training.answer_extraction, run.recipe.training.answer_pattern))
        unwrapped.train(was_training)
    return values


def _evaluate_pairs(run: Run, unwrapped, engine, signals: StopSignals | None) -> dict[str, float]:
    """A pair objective's evaluation: the mean over data.eval's pairs of the pair loss (``eval_loss``) and of
    TRL's rewards (``eval_rewards/accuracies`` ...); each process reads every num_processes-th pair, the sums are
    all-reduced."""
    examples, accelerator, training = run.examples.eval, run.accelerator, run.recipe.training
    beta, gamma = objective_settings(training)
    was_training = unwrapped.training
    unwrapped.eval()
    mine = list(range(accelerator.process_index, len(examples), accelerator.num_processes))
    size = training.eval_batch_size or training.batch_size
    starts: list = list(range(0, len(mine), size))
    if engine.collective_forward:  # every process runs as many forwards as the busiest one (see evaluate)
        busiest = math.ceil(math.ceil(len(examples) / accelerator.num_processes) / size)
        starts += [None] * (busiest - len(starts))
    # the loss sum, the pairs, the reward sums
    totals = torch.zeros(2 + len(REWARD_METRICS), dtype=torch.float64, device=accelerator.device)
    for start in starts:
        if signals is not None and signals.received is not None and accelerator.num_processes == 1:
            unwrapped.train(was_training)
            return {}
        indices = [0] if start is None else mine[start:start + size]
        batch = collate_pairs(examples, indices, run.tokenizer.pad_token_id, run.padding_free)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            losses, stats = pair_losses(unwrapped, batch, training.objective, beta, gamma, pairs=len(indices))
        if start is None:
            continue
        totals[0] += losses.double().sum()
        totals[1] += len(indices)
        totals[2:] += reward_sums(stats).to(totals.device)
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    unwrapped.train(was_training)
    means = (totals / totals[1].clamp(min=1)).tolist()
    return {"eval_loss": means[0], **{f"eval_{name}": value for name, value in zip(REWARD_METRICS, means[2:])}}


def _gathered(accelerator, items: list) -> list:
    """Every process's items, concatenated (a no-op on one process)."""
    if accelerator.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)

