"""The training engine under many processes, chosen by ``training.distributed`` (or by the launcher's own
Accelerate config): ``ddp`` (default), ``fsdp2``, ``zero2``, ``zero3``.

The design every engine follows: **adapters stay whole, the frozen base is sharded.** Adapter tensors are ~1 %
of a model; keeping them out of the shards means every optimizer (AdamW, LoRA+, the pair optimizers LoRA-Pro,
LoFT and the LoRA-One preconditioner), every schedule (CoTo's gates, ElaLoRA's scores) and ``peftkit.save`` see
whole (A, B) pairs and whole gradients, and the update is the single-process one:

- ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on every transformer block (the model's
  ``_no_split_modules``) and on the root, with every adapter tensor and every trainable tensor in
  ``ignored_params``. Only frozen weights become DTensors; they are all-gathered for the forward and the
  backward and never get a gradient, so FSDP reduces nothing. The trainable tensors' gradients are averaged by
  :func:`peftkit.distributed.average_gradients` (one flat all-reduce per step, on the last micro-batch), so
  clipping, NaN checks and the optimizer run on identical, global gradients on every process and the optimizer
  state is whole and identical everywhere (rank 0's checkpoint is the one-process checkpoint).
- ``zero2`` / ``zero3``: refused before step 1 (see :func:`refusal`). What blocks them (DeepSpeed 0.19.8):
  its ZeRO-1/2 optimizer hands the client optimizer flat fp32 partitions
  (``runtime/zero/stage_1_and_2.py``: ``param_group['params'] = [self.single_partition_of_fp32_groups[i]]``)
  and sets ``p.grad = None``; ZeRO-3 empties the param groups (``stage3.py``: ``param_group['params'] = []``).
  A pair optimizer then finds no (A, B) gradient and skips every pair (LoRA-Pro after 3 ZeRO-2 steps equals its
  init), ElaLoRA's scores read no gradient, and a CoTo-gated adapter's None gradient becomes a zero that still
  moves AdamW's moments. The exact alternative, DeepSpeed sharding only the frozen base while peftkit's optimizer
  runs on whole adapters kept outside it, is refused by DeepSpeed itself: an engine without its own optimizer
  partitions and gathers the base for the forward (measured: 512 of 1024 elements of a q_proj weight per
  process), but ``engine.backward`` asserts "must provide optimizer during init in order to use backward" and
  ``loss.backward()`` raises "Direct calls to tensor.backward() are not supported in this configuration". Making
  it run needs a fork of DeepSpeed's ZeRO optimizers (what the LoRA-Pro authors did for 0.15.1); ``fsdp2`` shards
  the base as ZeRO-3 does and runs every method exactly.

The engine is picked once, in :func:`select`; an unsupported combination (FSDP1, a DeepSpeed config, a
recipe and a launcher that disagree) is one ``ConfigError`` naming it and the supported alternative.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.nn as nn

from .. import distributed
from ..errors import ConfigError
from ..inject import adapter_layers
from .recipe import DISTRIBUTED, Recipe


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def launcher_engine() -> str | None:
    """The engine an ``accelerate launch --config_file F`` asked for (Accelerate passes its config to the
    processes as environment variables), or None for a plain launcher (torchrun, python)."""
    if _flag("ACCELERATE_USE_FSDP"):
        version = os.environ.get("FSDP_VERSION", "1").strip()
        if version != "2":
            raise ConfigError(
                f"accelerate config: FSDP{version} (fsdp_version: {version}) is not supported: FSDP1 flattens the "
                "adapter tensors into 1-D shards, so the (A, B) pair math cannot run on them, and it cannot "
                "flatten fp32 adapters with a bf16 base. Set fsdp_version: 2 in your accelerate config, or drop "
                "the FSDP section and set training.distributed: fsdp2 in the recipe")
        return "fsdp2"
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip()
        config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "").strip()
        if config_file and not stage:
            stage = str(_deepspeed_file_stage(config_file))
        return f"zero{stage}" if stage in ("2", "3") else f"deepspeed-stage-{stage or '?'}"
    return None


def _deepspeed_file_stage(path: str) -> int | str:
    import json

    try:
        config = json.loads(open(path).read())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"accelerate config: deepspeed_config_file {path} is unreadable ({exc})") from None
    if "optimizer" in config:
        raise ConfigError(
            f"accelerate config: the DeepSpeed config {path} brings its own optimizer ({config['optimizer'].get('type')}); "
            "peftkit builds the method's adapter-aware optimizer itself. Remove the 'optimizer' section and set "
            "optimizer.* in the recipe, and train with training.distributed: fsdp2")
    return config.get("zero_optimization", {}).get("stage", "?")


def select(recipe: Recipe) -> str:
    """The engine of this run: the recipe's ``training.distributed``, or the launcher's when the recipe keeps
    the default; a conflict, FSDP1 or an unsupported engine is a ConfigError before anything is built."""
    chosen = recipe.training.distributed
    launched = launcher_engine()
    if launched is not None and chosen != "ddp" and launched != chosen:
        raise ConfigError(f"training.distributed: the recipe asks for '{chosen}' but the accelerate config launches "
                          f"'{launched}'; make them agree (or leave training.distributed at ddp to follow the launcher)")
    engine = launched or chosen
    reason = refusal(engine)
    if reason:
        raise ConfigError(reason)
    return engine


def refusal(engine: str) -> str | None:
    """Why an engine cannot run peftkit's methods exactly (None when it can)."""
    if engine in ("ddp", "fsdp2"):
        return None
    if engine in ("zero2", "zero3"):
        return (f"training.distributed: '{engine}' (DeepSpeed ZeRO) is refused: its ZeRO optimizer replaces the param "
                "groups with flat fp32 partitions and frees p.grad, so LoRA-Pro, LoFT, the LoRA-One preconditioner and "
                "ElaLoRA's scores would silently see no gradient and a CoTo-gated adapter's missing gradient would "
                "become a zero that still moves AdamW; DeepSpeed refuses to train without its own optimizer. Use "
                "training.distributed: fsdp2 (FSDP2 shards the frozen base as ZeRO-3 does and runs every method "
                "exactly), or ddp")
    return (f"training.distributed: '{engine}' is not an engine peftkit runs; expected one of {list(DISTRIBUTED)} "
            "(FSDP2 or DeepSpeed ZeRO stage 2/3 in an accelerate config)")


def share_optimizer_state(optimizer: Any) -> None:
    """The loop's checkpoints call ``optimizer.state_dict()`` on every process, so an optimizer that can shard
    its state across processes (LoRA-Pro full's m×n moments, by whole pairs) does so."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps it
    if hasattr(inner, "enable_pair_sharding"):
        inner.enable_pair_sharding()


class Engine:
    """DDP through Accelerate: ``accelerator.prepare`` wraps the model; the loop's hooks are Accelerate's."""

    name = "ddp"
    # True where every forward is a collective (sharded weights are all-gathered): evaluation must then run
    # the same number of batches on every process.
    collective_forward = False

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        share_optimizer_state(optimizer)
        return self.accelerator.prepare(model, optimizer)

    def no_sync(self, model: nn.Module, last_micro_batch: bool):
        """Gradients are reduced once per step, on the last micro-batch."""
        return contextlib.nullcontext() if last_micro_batch else self.accelerator.no_sync(model)

    def reduce_gradients(self, params: list[torch.Tensor]) -> None:
        """After the last micro-batch's backward: make the trainable gradients global (DDP did it already)."""

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        return self.accelerator.clip_grad_norm_(params, max_norm)

    def eval_model(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)


class FSDP2Engine(Engine):
    """FSDP2 over the frozen base; adapters and other trainable tensors whole on every process."""

    name = "fsdp2"
    collective_forward = True

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        share_optimizer_state(optimizer)
        model = model.to(self.accelerator.device)
        if distributed.world_size() == 1:  # one process: nothing to shard across, the same numbers
            return model, self.accelerator.prepare_optimizer(optimizer)
        shard_frozen_base(model, self.accelerator.device, offload=_flag("FSDP_OFFLOAD_PARAMS"),
                          reshard_after_forward=os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
                          not in ("false", "0", "no"))
        # The optimizer was built on the unsharded model; it stays valid because every tensor it updates was kept
        # out of the shards (the same Parameter objects, plain tensors, whole).
        from torch.distributed.tensor import DTensor

        sharded = [p for group in optimizer.param_groups for p in group["params"] if isinstance(p, DTensor)]
        if sharded:  # pragma: no cover - a guard for the invariant above
            raise RuntimeError(f"fsdp2: {len(sharded)} optimizer tensors were sharded; adapters must stay whole")
        return model, self.accelerator.prepare_optimizer(optimizer)

    def no_sync(self, model: nn.Module, last_micro_batch: bool):
        return contextlib.nullcontext()  # our own all-reduce runs once per step, after the last micro-batch

    def reduce_gradients(self, params: list[torch.Tensor]) -> None:
        distributed.average_gradients(params)

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        # The gradients are already global and identical on every process: the local norm is the global norm.
        self.accelerator.unscale_gradients()
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def eval_model(self, model: nn.Module) -> nn.Module:
        return model  # the sharded model: its forward all-gathers the base


ENGINES = {"ddp": Engine, "fsdp2": FSDP2Engine}


def make(name: str, accelerator: Any) -> Engine:
    return ENGINES[name](accelerator)


def whole_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The tensors kept out of the shards: every adapter tensor (trainable or not: LoRA-GA's offset pair, ElaLoRA's
    slots, gated branches) and every other trainable tensor (heads, norms, biases)."""
    whole = {p for p in model.parameters() if p.requires_grad}
    for layer in adapter_layers(model).values():
        whole |= set(layer.adapters.parameters())
    return whole


def shard_frozen_base(model: nn.Module, device: torch.device, *, offload: bool = False,
                      reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` every transformer block (``model._no_split_modules``, the classes Accelerate's
    transformer wrap policy uses) and the root, in place, over all processes; :func:`whole_parameters` stay
    plain tensors. A model that names no blocks is sharded as one unit (the root)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    ignored = whole_parameters(model)
    # Packed quantized weights (bitsandbytes' uint8 storage) cannot become DTensors: they stay whole, unsharded.
    ignored |= {p for p in model.parameters() if not (p.is_floating_point() or p.is_complex())}
    options = dict(mesh=mesh, ignored_params=ignored, offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_classes]
    for block in blocks:
        if any(not p.requires_grad and p not in ignored for p in block.parameters()):
            fully_shard(block, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(model, **options)
    return model
