"""What data-driven inits measure (methods README §4.2): full-weight gradients and activation statistics, from
hooks on the model.

- ``gradient_statistics``: per target layer, the full-weight gradient G = Δᵀ X (out × in, fp32) of the
  mean loss over every target token of all batches on all processes (the training step's token mean,
  ``peftkit.loss``), from forward/tensor hooks on the base layer (no ``weight.grad``, so bitsandbytes 4/8-bit
  bases and Conv1D work), on the base model (adapters disabled) in train mode, all-reduced across processes.
  Optionally a sketch (Y = G·Ω, Z = Gᵀ·Ψ) instead of G: O((m + n)·k) memory per layer, never forming G.
- ``selected_token_mask`` / ``gather_rows``: the tokens EVA's PCA sees, gathered from every process.
- The batches an init is given (``check_batches``) and the base model it measures (``base_model``).

The solvers that decompose these statistics are model-free (``peftkit.linalg``); the passes over the data that
bound the gradient inits' memory, and their options, are ``peftkit.gradient_passes``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import ConfigError
from .inject import set_enabled
from .layer import AdapterLayer
from .linalg import GradientSketch, StreamingSVD
from .loss import batch_loss_units


# ---------------------------------------------------------------------------------------------- data
def check_batches(data: Any, init_name: str) -> list[Mapping]:
    """The batches of ``data`` as a list of dicts of tensors; one ConfigError for a wrong form or no batches."""
    hint = "pass data=<a list (or DataLoader) of dicts with input_ids, attention_mask and labels>"
    if data is None:
        raise ConfigError(f"data: the '{init_name}' initialisation estimates from batches; {hint}")
    if isinstance(data, Mapping):
        raise ConfigError(f"data: got a single batch (a dict) for '{init_name}'; expected an iterable of batches, "
                          "e.g. data=[batch]")
    if isinstance(data, (torch.Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise ConfigError(f"data: expected an iterable of batches for '{init_name}', got {type(data).__name__}; {hint}")
    batches = list(data)
    if not batches:
        raise ConfigError(f"data: the iterable of batches for '{init_name}' is empty; {hint}")
    for index, batch in enumerate(batches):
        if not isinstance(batch, Mapping) or not any(isinstance(v, torch.Tensor) for v in batch.values()):
            raise ConfigError(f"data: batch {index} for '{init_name}' is a {type(batch).__name__}, expected a dict of "
                              f"tensors as the model's forward takes them; {hint}")
    return batches


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def base_model(model: nn.Module, train: bool) -> Iterator[nn.Module]:
    """The unmodified base model (adapters disabled) in train or eval mode; modes and flags restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(train)
    set_enabled(model, False)
    try:
        yield model
    finally:
        set_enabled(model, True)
        for module, mode in modes:
            module.training = mode


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gradient_statistics(model: nn.Module, layers: dict[str, AdapterLayer], batches: list[Mapping], *,
                        store_on: torch.device | str | None = None,
                        products: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]] | None = None,
                        streams: Mapping[str, int] | None = None,
                        ) -> dict[str, torch.Tensor | GradientSketch | StreamingSVD]:
    """Per layer, G = Σ_b n_b·G_b / Σ_b n_b (out × in, fp32; fp64 on fp64 bases), or what ``products`` or
    ``streams`` ask of it instead.

    G_b = Δᵀ X of batch b's mean loss, from hooks on the base layers of the adapters-disabled model in train
    mode; n_b is batch b's loss units (``peftkit.loss.batch_loss_units``: target tokens after the causal shift,
    or examples), so G is the gradient of the mean over every target token of all batches, the loss a training
    step on the same examples takes, however they are split into batches and processes. A batch without units
    adds nothing. Sums (and the unit count) are all-reduced across processes, so every process returns the same
    statistics. ``products``: per layer name given blocks (R (n, k) or None, L (m, l) or None); its
    ``GradientSketch`` holds G·R and Gᵀ·L, accumulated per token as δₜ(xₜᵀR) and xₜ(δₜᵀL) without forming G
    and all-reduced (one pass of subspace iteration, ``peftkit.gradient_passes.gradient_triplets``).
    ``streams``: per layer name a rank k: a ``StreamingSVD`` of rank k of G, fed each batch's tokens in the
    backward hook (under several processes the per-process states are all-gathered and merged in rank order,
    identically on every process). ``store_on`` (e.g. ``"cpu"``) keeps the full G there instead of on the
    model's device: each batch's Δᵀ X is formed on the device and added in (one layer's m × n temporary on the
    device at a time).
    """
    device = device_of(model)
    store = device if store_on is None else torch.device(store_on)
    stats: dict[str, Any] = {}

    for name, layer in layers.items():
        m, n = layer.out_features, layer.in_features
        # fp32 sums (fp64 on an fp64 base), whatever the model dtype.
        dtype = torch.float64 if layer.base_layer.weight.dtype == torch.float64 else torch.float32
        if streams is not None and name in streams:
            stats[name] = StreamingSVD(m, n, streams[name], dtype, device)
        elif products is not None and name in products:
            right, left = products[name]
            stats[name] = GradientSketch(
                None if right is None else torch.zeros(m, right.shape[1], dtype=dtype, device=device),
                None if left is None else torch.zeros(n, left.shape[1], dtype=dtype, device=device),
                None if right is None else right.to(device, dtype), None if left is None else left.to(device, dtype))
        else:
            stats[name] = torch.zeros(m, n, dtype=dtype, device=store)
    weight = [0.0]

    def make_hook(name: str):
        def forward_hook(module, args, output):
            x = args[0].detach()

            def grad_hook(delta: torch.Tensor) -> None:
                target = stats[name]
                if isinstance(target, StreamingSVD):
                    target.add(delta.reshape(-1, delta.shape[-1]).mT, x.reshape(-1, x.shape[-1]).mT, weight[0])
                    return
                dtype = target.tensors()[0].dtype if isinstance(target, GradientSketch) else target.dtype
                d = delta.reshape(-1, delta.shape[-1]).to(dtype)
                xs = x.reshape(-1, x.shape[-1]).to(dtype)
                if isinstance(target, GradientSketch):
                    if target.y is not None:
                        target.y.addmm_(d.t(), xs @ target.omega, alpha=weight[0])
                    if target.z is not None:
                        target.z.addmm_(xs.t(), d @ target.psi, alpha=weight[0])
                elif target.device == d.device:
                    target.addmm_(d.t(), xs, alpha=weight[0])
                else:  # offloaded: the product on the device, the sum where it is kept
                    target.add_((d.t() @ xs).to(target.device), alpha=weight[0])

            if not output.requires_grad:
                # Nothing upstream needs a gradient: a leaf here makes Δ of this layer (and of every layer
                # downstream, through its input) reach the hooks without any weight requiring grad.
                output = output.detach().requires_grad_(True)
            output.register_hook(grad_hook)
            return output

        return forward_hook

    handles = [layer.base_layer.register_forward_hook(make_hook(name)) for name, layer in layers.items()]
    total = 0.0
    try:
        with base_model(model, train=True), torch.enable_grad():
            for batch in batches:
                weight[0] = float(batch_loss_units(model, batch))
                if not weight[0]:
                    continue  # its mean loss is 0/0; its tokens are not in the global mean either
                inputs = _to_device(batch, device)
                out = model(**inputs)
                loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
                if loss is None:
                    raise ConfigError("data: the model returned no loss for a batch; gradient-based inits need "
                                      "batches with labels (e.g. labels = input_ids for causal LM)")
                loss.backward()
                total += weight[0]
                # The output (logits) is freed before the next batch's forward, not after it: one batch's working
                # set at a time (the wide model of bench_init: 155 -> 139 MiB above the model at the default).
                del out, loss
    finally:
        for handle in handles:
            handle.remove()
    # On the statistics' device: NCCL rejects a CPU tensor, gloo takes the CPU tensors a CPU model has.
    count = torch.tensor([total], dtype=torch.float64, device=device)
    if distributed():
        dist.all_reduce(count)
        for name, value in stats.items():
            if isinstance(value, StreamingSVD):
                stats[name] = value.merged(_gathered_states(value))
                continue
            for tensor in (value.tensors() if isinstance(value, GradientSketch) else [value]):
                dist.all_reduce(tensor)
    if not count.item():
        raise ConfigError("data: the batches hold no target tokens (every label is -100); gradient-based inits "
                          "need labelled tokens: pass batches whose labels mark the tokens to learn")
    for value in stats.values():
        if isinstance(value, StreamingSVD):
            value.scale(1.0 / float(count))
            continue
        for tensor in (value.tensors() if isinstance(value, GradientSketch) else [value]):
            tensor.div_(float(count))
    return stats


def _gathered_states(state: StreamingSVD) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every process's (U, s, V) of one layer's stream, in rank order (zero-padded to the stream's rank)."""
    u, s, v = state.factors()
    k = state.rank
    padded = [torch.zeros(t.shape[0], k, dtype=t.dtype, device=t.device) for t in (u, v)]
    padded[0][:, :u.shape[1]], padded[1][:, :v.shape[1]] = u, v
    values = torch.zeros(k, dtype=torch.float64, device=s.device)
    values[:s.shape[0]] = s
    out = []
    for tensor in (padded[0], values, padded[1]):
        parts = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        out.append(parts)
    return list(zip(*out))


def selected_token_mask(batch: Mapping, use_label_mask: bool, label_mask_value: int) -> torch.Tensor | None:
    """(batch, seq) bool mask of the tokens EVA uses: attention_mask == 1 and (optionally) labels != -100."""
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        return None
    mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
    labels = batch.get("labels")
    if use_label_mask and isinstance(labels, torch.Tensor) and labels.shape == ids.shape:
        mask = mask & (labels != label_mask_value)
    return mask


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows from every process concatenated in rank order (padded all_gather); ``rows`` itself alone."""
    if not distributed():
        return rows
    world = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], dtype=torch.long, device=rows.device)  # NCCL: no CPU tensors
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros(longest, rows.shape[1], dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(c.item())] for part, c in zip(parts, counts)], 0)


def check_double_rank(layers: dict[str, AdapterLayer], adapter_name: str, factor: int, option: str) -> None:
    """ConfigError (before any forward) when factor·r exceeds min(out, in) of a layer."""
    for name, layer in layers.items():
        r = layer.ranks[adapter_name]
        limit = min(layer.out_features, layer.in_features)
        if factor * r > limit:
            raise ConfigError(
                f"r: {option} needs {factor}·r <= min(out, in); {name} ({layer.out_features}x{layer.in_features}) "
                f"has r = {r}, the largest allowed r there is {limit // factor}; lower r or set rank_pattern for it"
            )


def adapter_name_of(model: nn.Module, config: Any) -> str:
    """The name of the adapter an init is filling (the one whose config object is ``config``)."""
    from .inject import state_of

    return next(name for name, c in state_of(model).configs.items() if c is config)
