"""Collectives the machinery shares, GPU-safe: every tensor handed to a collective lives on the device of the
tensors it describes (a CUDA tensor under NCCL, a CPU tensor under gloo), never a CPU tensor by default.

Engines that keep adapters out of the shards (``peftkit.train.engines``) average the adapters' gradients here,
as one flat bucket per dtype and device: one all-reduce per step instead of one per tensor.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn


def world_size() -> int:
    """Processes in the default group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def average_gradients(params: Iterable[torch.Tensor]) -> int:
    """Average ``p.grad`` over all processes for every param that has one, in place; returns how many tensors
    were reduced. Every process must hold gradients for the same params (a schedule that gates an adapter off
    decides the same on every process, so its None gradients agree). The average is a sum divided by the world
    size, exactly what DDP computes, so two processes at batch B equal one process at batch 2B."""
    world = world_size()
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return len(grads)
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for grad in grads:
        buckets.setdefault((grad.dtype, grad.device), []).append(grad)
    for bucket in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for grad in bucket:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()
    return len(grads)


def broadcast_tensors(tensors: list[torch.Tensor], source: int) -> None:
    """Overwrite ``tensors`` on every process with rank ``source``'s values (one flat broadcast per dtype)."""
    if world_size() == 1 or not tensors:
        return
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        buckets.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for bucket in buckets.values():
        flat = torch.cat([t.detach().reshape(-1) for t in bucket])
        dist.broadcast(flat, source)
        offset = 0
        for tensor in bucket:
            tensor.data.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def unwrap_model(accelerator: Any, model: nn.Module) -> nn.Module:
    """``accelerator.unwrap_model(model)`` without importing DeepSpeed into a run that has not: Accelerate's unwrap
    imports it whenever it is installed, to test for its engine (≈ 22 MiB resident in every process of a ddp or
    fsdp2 run, from the first evaluation or checkpoint on); no DeepSpeed engine exists where DeepSpeed was never
    imported, so peeling the torch wrappers is all it would do."""
    if "deepspeed" in sys.modules or "_orig_mod" in model.__dict__:  # DeepSpeed's engine; a compiled model
        return accelerator.unwrap_model(model)
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel, FullyShardedDataParallel)):
        model = model.module
    return model
