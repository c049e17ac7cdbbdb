"""Whole weights for a read, under an engine that shards them (FSDP2, ZeRO-3): below the adapter layers, which
read their base weight through it, and below :mod:`peftkit.sharded`, which loads such bases."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn


@contextlib.contextmanager
def whole_weights(module: nn.Module) -> Iterator[bool]:
    """Within the block, ``module``'s own parameters are whole (gathered) where an engine shards them: ZeRO-3
    parameters through DeepSpeed's ``GatheredParameters``, FSDP2 DTensors swapped for their ``full_tensor()``
    (a bitsandbytes 4-bit weight keeps its ``quant_state`` on the module). Yields whether anything was gathered.
    A collective: every process must enter it for the same module."""
    own = dict(module.named_parameters(recurse=False))
    zero = [p for p in own.values() if hasattr(p, "ds_id")]
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
