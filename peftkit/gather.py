"""Whole weights for a read, under an engine that shards them (FSDP2, ZeRO-3): below the adapter layers, which
read their base weight through it, and below :mod:`peftkit.sharded`, which loads such bases."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn


def held_as_shard(param: torch.Tensor) -> str | None:
    """``"fsdp2"`` or ``"zero3"`` where an engine holds only a shard of ``param`` at this moment (an FSDP2 DTensor;
    a ZeRO-3 parameter not gathered), else None (a plain tensor, or one gathered whole for its module's forward)."""
    if type(param).__name__ == "DTensor":
        return "fsdp2"
    status = getattr(param, "ds_status", None)
    if hasattr(param, "ds_id") and getattr(status, "name", None) != "AVAILABLE":
        return "zero3"
    return None


@contextlib.contextmanager
def whole_weights(module: nn.Module) -> Iterator[bool]:
    """Within the block, ``module``'s own parameters are whole (gathered) where an engine shards them: ZeRO-3
    parameters through DeepSpeed's ``GatheredParameters``, FSDP2 DTensors swapped for their ``full_tensor()``
    (a bitsandbytes 4-bit weight keeps its ``quant_state`` on the module). Yields whether anything was gathered.
    A collective: every process must enter it for the same module."""
    own = dict(module.named_parameters(recurse=False))
    # A ZeRO-3 parameter gathered already (inside its module's forward) is whole; GatheredParameters would
    # partition it again on exit, under DeepSpeed's feet.
    zero = [p for p in own.values() if held_as_shard(p) == "zero3"]
    sharded = {name: p for name, p in own.items() if type(p).__name__ == "DTensor"}
    if not zero and not sharded:
        yield False
        return
    with contextlib.ExitStack() as stack:
        if zero:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(zero))
        try:
            for name, param in sharded.items():
                module._parameters[name] = nn.Parameter(param.full_tensor(), requires_grad=False)
            yield True
        finally:
            for name, param in sharded.items():
                module._parameters[name] = param
