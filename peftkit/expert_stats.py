"""Gradient statistics of fused expert parameters, one matrix per expert, for the gradient-based inits.

An expert's full-weight gradient G_e cannot come from hooks on a linear layer (``peftkit.stats``): the experts
run inside one module, each on the tokens routed to it. Here the parameter itself takes the gradient: for one
pass over the batches the targeted stacks (E, out, in) require grad, the adapters are off (the base model's
gradient, as ``stats.gradient_statistics`` measures it), and G_e is the slice e of the accumulated gradient,
with the same batch weighting and the same reduction across processes as the linear layers' statistics. A
stack is as large as the experts' weights, so the stacks are measured in groups under the same memory options
(``gradient_groups`` / ``gradient_memory`` / ``gradient_device``), one pass over the batches per group.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from . import gradient_passes, linalg, stats
from .errors import ConfigError
from .expert_layer import ExpertParameterLayer
from .loss import batch_loss_units


def expert_layers(layers: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, ExpertParameterLayer]]:
    """(linear-style layers, expert-parameter layers) of an init's ``layers``."""
    experts = {n: l for n, l in layers.items() if isinstance(l, ExpertParameterLayer)}
    return {n: l for n, l in layers.items() if n not in experts}, experts


class ExpertMatrix:
    """One expert's matrix of an expert-parameter layer, seen as a linear layer by an init's helpers
    (``out_features``, ``in_features``, ``kind``, ``base_weight()`` (out, in))."""

    def __init__(self, layer: ExpertParameterLayer, index: int) -> None:
        self.layer, self.index = layer, index
        self.out_features, self.in_features = layer.out_features, layer.in_features
        self.kind = layer.kind
        self.module_name = f"{layer.target_name}[{index}]"

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.layer.base_weight(dtype)[self.index]


def _stack_bytes(layer: ExpertParameterLayer) -> int:
    size = 8 if layer.weight.dtype == torch.float64 else 4
    return layer.num_experts * layer.out_features * layer.in_features * size


def _groups(model: nn.Module, layers: dict[str, ExpertParameterLayer], options: Mapping[str, Any]) -> list[list[str]]:
    sizes = {name: _stack_bytes(layer) for name, layer in layers.items()}
    if options.get("gradient_groups") is not None:
        return gradient_passes.plan_groups(sizes, groups=options["gradient_groups"])
    memory = options.get("gradient_memory", "auto")
    if memory is None:
        return gradient_passes.plan_groups(sizes)
    if memory == "auto":
        budget = gradient_passes.free_memory_bytes(next(model.parameters()).device) // 4
    else:
        budget = int(float(memory) * 2**20)
    return gradient_passes.plan_groups(sizes, budget=budget)


def expert_gradients(model: nn.Module, layers: dict[str, ExpertParameterLayer], batches: list[Mapping]
                     ) -> dict[str, torch.Tensor]:
    """Per layer, G = Σ_b n_b·G_b / Σ_b n_b as an (E, out, in) stack (fp32; fp64 on fp64 bases), G_b the
    gradient of batch b's loss with the adapters off, n_b its loss units (target tokens for a causal LM,
    ``peftkit.loss.batch_loss_units``: ``stats.gradient_statistics``' weighting, so G is the token-mean gradient
    of all the batches together); summed across processes, so every process returns the same stacks."""
    device = next(model.parameters()).device
    weights = {name: layer.weight for name, layer in layers.items()}
    sharded = next((layer.target_name for layer, weight in zip(layers.values(), weights.values())
                    if hasattr(weight, "ds_id") or type(weight).__name__ == "DTensor"), None)
    if sharded is not None:
        # The statistic is the stack's own gradient, which FSDP2 reduce-scatters and ZeRO-3 keeps in its partitions:
        # refused before step 1 rather than initialised from a partial gradient.
        raise ConfigError(f"adapter.method: a gradient-based init of fused expert parameters ({sharded}) cannot run on "
                          "a base sharded across processes (training.distributed fsdp2/zero3): use "
                          "training.distributed: ddp, an init that reads no data, or targets without expert stacks")
    flags = {name: (w.requires_grad, w.grad) for name, w in weights.items()}
    total = 0.0
    try:
        for weight in weights.values():
            weight.grad = None
            weight.requires_grad_(True)
        with stats.base_model(model, train=True), torch.enable_grad():
            for batch in batches:
                count = float(batch_loss_units(model, batch))  # the token-mean gradient the step trains with
                out = model(**stats._to_device(batch, device))
                loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
                if loss is None:
                    raise ConfigError("data: the model returned no loss for a batch; gradient-based inits need "
                                      "batches with labels (e.g. labels = input_ids for causal LM)")
                (loss * count).backward()
                total += count
        grads = {}
        for name, layer in layers.items():
            weight = weights[name]
            dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            grad = torch.zeros_like(weight, dtype=dtype) if weight.grad is None else weight.grad.to(dtype)
            grad = grad if layer.stacked else grad.unsqueeze(0)
            grads[name] = grad.transpose(1, 2).contiguous() if layer.transposed else grad
    finally:
        for name, weight in weights.items():
            weight.requires_grad_(flags[name][0])
            weight.grad = flags[name][1]
    reduced = torch.tensor([total], dtype=torch.float64, device=device)
    if stats.distributed():
        dist.all_reduce(reduced)
        for grad in grads.values():
            dist.all_reduce(grad)
    for grad in grads.values():
        grad.div_(float(reduced))
    return grads


def expert_gradient_triplets(model: nn.Module, layers: dict[str, ExpertParameterLayer], batches: list[Mapping],
                             ranks: Mapping[str, int], options: Mapping[str, Any], *, seed: int = 0,
                             negate: bool = False, boundaries: Callable[[int], Iterable[int]] | None = None,
                             ) -> Iterator[tuple[str, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(name, expert e, U (m, r), S (r,), Vh (r, n)) of every expert's gradient G_e (−G_e with ``negate``): the
    counterpart of ``gradient_passes.gradient_triplets`` (same solver options, same replay of the RNG across passes)."""
    start = gradient_passes.rng_states()
    for index, group in enumerate(_groups(model, layers, options)):
        resume = gradient_passes.rng_states() if index else None
        if resume is not None:
            gradient_passes.set_rng_states(start)
        grads = expert_gradients(model, {name: layers[name] for name in group}, batches)
        if resume is not None:
            gradient_passes.set_rng_states(resume)
        for name in group:
            stack = grads.pop(name)
            if negate:
                stack.neg_()
            rank = ranks[name]
            for e in range(stack.shape[0]):
                u, s, vh = linalg.top_singular_triplets(
                    stack[e].contiguous(), rank, options["svd"], iterations=options["svd_iterations"], seed=seed,
                    tolerance=options.get("svd_tolerance", 3e-2),
                    boundaries=None if boundaries is None else boundaries(rank))
                yield name, e, u, s, vh
            del stack
