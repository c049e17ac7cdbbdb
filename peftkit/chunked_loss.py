"""The causal-LM loss without the [tokens × vocab] logits: the output head and the cross-entropy fused and
applied in chunks of tokens.

A step's plain loss materialises ``logits = hidden @ W.T`` for every position (SmolLM2: 49,152 wide; Gemma-3:
262,144), an fp32 copy for the cross-entropy, and the same again for their gradient. Here the head is applied
only at the target positions (labels != -100 after the shift: a prompt-masked SFT batch skips its prompts), in
chunks of ``chunk_tokens`` rows; each chunk's gradients w.r.t. the hidden states and the head (when it trains)
are computed in the forward, and the chunk's logits freed. The backward only scales the saved gradients by
the incoming one (the loss is a scalar), so nothing is recomputed. Peak extra memory: one chunk's logits.

The math is the plain loss's, to round-off: logits in the head's dtype upcast to at least fp32 (fp64 stays
fp64), an optional ``softcap · tanh(z / softcap)`` (Gemma's ``final_logit_softcapping``), log-sum-exp and the
target logit per row, summed and divided by the global batch's target count (peftkit.loss's contract).

On a GPU with Liger's fused kernel installed (``liger_kernel``), its ``LigerFusedLinearCrossEntropyFunction``
takes the same role; it is used only where its result is the same sum (see :func:`fused_kernel`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from .inject import GATE_ATTR

# The label of a token that is no target (transformers' ignore_index); peftkit.loss, above this module, uses it too.
IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 1024
# One chunk's fp32 logits at most this many bytes: a chunk of a fixed 1,024 rows is 192 MiB of logits at
# SmolLM2's 49,152-wide head but 1 GiB at Gemma-3's 262,144 (and the step holds two or three such arrays).
CHUNK_LOGITS_BYTES = 64 * 2**20
# Config fields that scale or transform the logits beyond softcapping: a model with one of these set is left to
# its own forward (its loss is not lm_head + cross-entropy).
_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "output_multiplier_scale", "lm_head_multiplier")


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ_rows CE(softcap(hidden @ weight.T + bias), targets) / divisor, chunked over rows.

    hidden: (N, H); weight: (V, H); bias: (V,) or None; targets: (N,) int64 (``-100`` rows count nothing);
    softcap: float or None; divisor: the global target count. Returns a 0-dim tensor in the logits' precision
    (at least fp32)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                softcap: float | None, divisor: float, chunk_tokens: int) -> torch.Tensor:
        acc = torch.promote_types(hidden.dtype, torch.float32)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_bias = bias is not None and ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if want_bias else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = hidden[start:start + chunk_tokens]
            target = targets[start:start + chunk_tokens]
            # One (rows, V) array per chunk (two with a softcap), worked on in place: the logits become the
            # shifted logits, their exponentials, the softmax and the gradient in turn.
            logits = rows @ weight.T
            if bias is not None:
                logits += bias
            logits = logits.to(acc)
            slope = None
            if softcap is not None:
                logits.div_(softcap).tanh_()
                # d softcap·tanh(x/softcap) / dx = 1 - tanh²
                slope = torch.square(logits).neg_().add_(1) if (want_hidden or want_weight or want_bias) else None
                logits.mul_(softcap)
            valid = target != IGNORE_INDEX
            safe = torch.where(valid, target, 0)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            peak = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(peak).exp_()
            del logits
            sums = exps.sum(dim=-1, keepdim=True)
            lse = (sums.log() + peak).squeeze(1)  # log Σ exp(z): z's maximum taken out before the exponential
            total += torch.where(valid, lse - picked, 0).sum()
            if not (want_hidden or want_weight or want_bias):
                del exps  # before the next chunk's logits: one (rows, V) array alive at a time
                continue
            # d(loss)/d(logits) = softmax - onehot(target), zero on ignored rows, over the divisor.
            grad = exps.div_(sums)
            del exps
            grad.scatter_add_(1, safe[:, None], -torch.ones_like(lse)[:, None])
            grad *= (valid.to(acc) / divisor)[:, None]
            if slope is not None:
                grad *= slope
                del slope
            if want_hidden:
                grad_hidden[start:start + chunk_tokens] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
            if want_weight:
                grad_weight += grad.T @ rows.to(acc)
            if want_bias:
                grad_bias += grad.sum(0)
            del grad  # before the next chunk's logits: one (rows, V) array alive at a time, not two
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output
        out = []
        for grad, dtype in ((grad_hidden, None), (grad_weight, ctx.dtypes[0]), (grad_bias, ctx.dtypes[1])):
            if grad is None:
                out.append(None)
                continue
            scaled = grad * scale.to(grad.dtype)
            out.append(scaled if dtype is None else scaled.to(dtype))
        return (*out, None, None, None, None)


def chunk_rows(hidden: torch.Tensor, weight: torch.Tensor) -> int:
    """Rows per chunk for a head ``weight`` (V, H): at most DEFAULT_CHUNK_TOKENS, and at most CHUNK_LOGITS_BYTES
    of logits in the accumulation dtype (at least fp32), so the peak does not grow with the vocabulary."""
    row_bytes = weight.shape[0] * torch.promote_types(hidden.dtype, torch.float32).itemsize
    return max(1, min(DEFAULT_CHUNK_TOKENS, CHUNK_LOGITS_BYTES // row_bytes))


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 targets: torch.Tensor, divisor: float, softcap: float | None = None,
                                 chunk_tokens: int | None = None) -> torch.Tensor:
    """Σ over rows of ``hidden`` (N, H) of the cross-entropy of ``hidden @ weight.T (+ bias)`` (softcapped
    where ``softcap`` is set) at ``targets`` (N,), over ``divisor``; never more than ``chunk_tokens`` rows of
    logits at once (default: :func:`chunk_rows`, sized by bytes)."""
    kernel = fused_kernel(hidden, softcap, bias)
    if kernel is not None:
        return kernel(hidden, weight, targets, bias) / divisor
    if chunk_tokens is None:
        chunk_tokens = chunk_rows(hidden, weight)
    return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, softcap, float(divisor), int(chunk_tokens))


def fused_kernel(hidden: torch.Tensor, softcap: float | None, bias: torch.Tensor | None):
    """Liger's fused linear cross-entropy (a Triton kernel) on a CUDA device where ``liger_kernel`` is installed,
    as a function returning the *summed* loss; else None (the chunked autograd above)."""
    if hidden.device.type != "cuda":
        return None
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except ImportError:
        return None

    def summed(hidden, weight, targets, bias):
        # Liger's positional arguments: input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
        # label_smoothing, reduction, softcap.
        out = LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets, bias, None, IGNORE_INDEX, 0.0,
                                                         0.0, "sum", softcap)
        return out[0] if isinstance(out, tuple) else out
    return summed


def head_of(model: nn.Module) -> tuple[nn.Module, nn.Linear, float | None] | None:
    """(the base that returns hidden states, the output head, its softcap) when ``model``'s causal-LM logits
    are exactly ``head(base(...).last_hidden_state)`` (softcapped): a transformers ``*ForCausalLM`` with a plain
    ``nn.Linear`` head whose weight is a whole local tensor (not an adapter layer, not a DTensor or a DeepSpeed
    partition, no hooks), no logit scaling and no MoE router loss. None otherwise: the caller keeps the model's
    own forward."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings"):
        return None
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings()
    if base is None or base is model or type(head) is not nn.Linear:
        return None
    if head._forward_hooks or head._forward_pre_hooks or _foreign_hooks(model) \
            or type(head.weight) is not nn.Parameter \
            or hasattr(head.weight, "ds_id") or head.weight.numel() == 0:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for conf in {id(config): config, id(text): text}.values():
        if any(getattr(conf, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
            return None
        if getattr(conf, "output_router_logits", False):
            return None
    softcap = getattr(text, "final_logit_softcapping", None)
    return base, head, (float(softcap) if softcap else None)


def _foreign_hooks(model: nn.Module) -> bool:
    """Whether ``model`` has forward hooks other than peftkit's weight gate (FSDP2's unshard, a user's): calling
    its base directly would skip them."""
    gate = model.__dict__.get(GATE_ATTR)
    hooks = list(model._forward_pre_hooks.values()) + list(model._forward_hooks.values())
    return any(getattr(hook, "__self__", None) is not gate or gate is None for hook in hooks)


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """The flat positions (into ``labels[..., 1:]``, row-major) of the target tokens, a 1-D int64 tensor. Computed
    from the host's copy of the labels before they move to the device: a mask on the device would need a host sync
    to size the selection."""
    return (labels[..., 1:] != IGNORE_INDEX).reshape(-1).nonzero().squeeze(1)


def base_hidden_states(model: nn.Module, base: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """The last hidden states (batch, seq, H) of ``base`` (the model under its head), run as one of the model's
    forwards for peftkit's merge/unmerge gate, as ``model(...)`` would be."""
    gate = model.__dict__.get(GATE_ATTR)
    if gate is not None:
        gate.enter(model, ())
    try:
        return base(**inputs).last_hidden_state
    finally:
        if gate is not None:
            gate.leave(model, (), None)


def target_logits(model: nn.Module, inputs: Mapping[str, Any], labels: torch.Tensor, positions: torch.Tensor,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, V) at the target positions only, softcapped where the model does, at least fp32; the targets
    (N,)): the model's logits at ``positions`` (:func:`target_positions` of ``labels``) without the full
    [tokens × vocab] logits. ``model`` must pass :func:`head_of`."""
    found = head_of(model)
    if found is None:
        raise ValueError("target_logits: the model's logits are not head(base(...)); use its own forward")
    base, head, softcap = found
    hidden = base_hidden_states(model, base, inputs)
    positions = positions.to(hidden.device, non_blocking=True)
    rows = hidden[..., :-1, :].reshape(-1, hidden.shape[-1]).index_select(0, positions)
    logits = head(rows)
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits, labels.to(hidden.device)[..., 1:].reshape(-1).index_select(0, positions)


def chunked_causal_loss(model: nn.Module, batch: Mapping[str, Any], global_units: int,
                        chunk_tokens: int | None = None,
                        positions: torch.Tensor | None = None) -> torch.Tensor:
    """Σ of the causal cross-entropy of ``batch``'s target tokens over ``global_units``, as the ``summed`` mode
    of peftkit.loss computes it, without the full logits. ``model`` must pass :func:`head_of`. ``positions``:
    :func:`target_positions` of the labels, from the host (else a boolean mask selects them, a host sync)."""
    found = head_of(model)
    if found is None:
        raise ValueError("chunked_causal_loss: the model's logits are not head(base(...)); use its own loss")
    base, head, softcap = found
    hidden = base_hidden_states(model, base, {k: v for k, v in batch.items() if k != "labels"})
    labels = batch["labels"].to(hidden.device)
    targets = labels[..., 1:]
    if positions is None:
        keep = targets != IGNORE_INDEX
        rows, wanted = hidden[..., :-1, :][keep], targets[keep]  # only the target positions go through the head
    else:
        positions = positions.to(hidden.device, non_blocking=True)
        rows = hidden[..., :-1, :].reshape(-1, hidden.shape[-1]).index_select(0, positions)
        wanted = targets.reshape(-1).index_select(0, positions)
    return chunked_linear_cross_entropy(rows, head.weight, head.bias, wanted, max(int(global_units), 1),
                                        softcap, chunk_tokens)
