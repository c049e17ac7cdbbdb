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
- ``zero2`` / ``zero3``: DeepSpeed's engine (``deepspeed.initialize``) over the model with every whole tensor
  hidden from it while it is built: each module whose own parameters are all whole (an adapter layer's
  ``adapters`` dict, a trained head) is swapped for an empty module during ``initialize`` and put back after,
  so DeepSpeed never converts, partitions, flattens or hooks an adapter tensor. Under ``zero3`` it partitions
  every frozen base weight (``DeepSpeedZeRoOffload``, what DeepSpeed builds for a stage-3 engine without an
  optimizer: 0 elements of a weight held between uses, gathered by its module hooks for the forward and the
  backward, released after). Under ``zero2`` DeepSpeed's ZeRO-2 optimizer owns only a 1-element placeholder
  (the frozen base is replicated under ZeRO-1/2 anyway: they partition optimizer state and gradients, and
  those are the adapters'). The forward calls the model itself, not ``engine(...)``: DeepSpeed's gather and
  release hooks sit on the modules, while ``engine.forward`` only adds hooks on its output that route the
  backward into its ZeRO optimizer (and, with none, refuse ``loss.backward()``: "Direct calls to
  tensor.backward() are not supported in this configuration"). The backward is a plain ``loss.backward()``,
  so adapter gradients accumulate in ``p.grad`` and everything after is the ``fsdp2`` path: one flat
  all-reduce, global clipping, peftkit's optimizer on whole pairs, whole checkpoints, evaluation through the
  hooked model. DeepSpeed's ``backward``/``step``/``zero_grad``/clipping are never called. What does not work
  and why (DeepSpeed 0.19.8): handing peftkit's optimizer to DeepSpeed (its ZeRO-1/2 optimizer replaces the
  param groups with flat fp32 partitions and sets ``p.grad = None``: ``stage_1_and_2.py``; ZeRO-3 empties
  them: ``stage3.py``; a pair optimizer then skips every pair), and ``engine.backward`` without an optimizer
  ("must provide optimizer during init in order to use backward").

A 4-bit (bitsandbytes) base under ``zero3`` stays in bitsandbytes' standard layout (:func:`keep_quantized_layouts`):
ZeRO-3 gathers each weight's data again from its partition, so bitsandbytes' in-place CPU repack (AVX512-BF16) would
be undone under a quant_state that still says packed, and the layer would compute with garbled codes (issue 24).

The engine is picked once, in :func:`select`, called before the Accelerator is built (Accelerate's own plugins fail
first on some refused configs, e.g. FSDP1 on a CPU machine); an unsupported combination (FSDP1; a DeepSpeed config
that brings its own optimizer, scheduler or clipping; DeepSpeed not installed; a recipe and a launcher that
disagree) is one ``ConfigError`` naming it and the supported alternative, before anything is built.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.nn as nn

from .. import distributed
from ..errors import ConfigError
from ..expert_layer import ExpertParameterLayer
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
    return user_deepspeed_config(path).get("zero_optimization", {}).get("stage", "?")


def user_deepspeed_config(path: str) -> dict:
    """A user's DeepSpeed config (``deepspeed_config_file`` of an accelerate config), checked: peftkit builds the
    method's optimizer and schedule and clips itself, so a config that brings an optimizer, a scheduler or its own
    clipping is refused here, before anything is built."""
    import json

    try:
        config = json.loads(open(path).read())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"accelerate config: deepspeed_config_file {path} is unreadable ({exc})") from None
    for section, field in (("optimizer", "optimizer.*"), ("scheduler", "training.lr_scheduler / training.warmup")):
        if section in config:
            kind = config[section].get("type") if isinstance(config[section], dict) else config[section]
            raise ConfigError(
                f"accelerate config: the DeepSpeed config {path} brings its own {section} ({kind}); peftkit builds "
                f"the method's adapter-aware {section} itself (LoRA-Pro, LoFT, LoRA+ and the schedules need it). "
                f"Remove the '{section}' section and set {field} in the recipe")
    clip = config.get("gradient_clipping", 0)
    if clip not in (0, 0.0, "auto", None):
        raise ConfigError(f"accelerate config: the DeepSpeed config {path} sets gradient_clipping: {clip}; peftkit "
                          "clips the adapters' global gradient norm itself. Remove it and set training.max_grad_norm")
    return config


def select(recipe: Recipe) -> str:
    """The engine of this run: the recipe's ``training.distributed``, or the launcher's when the recipe keeps
    the default; a conflict, FSDP1 or an unsupported engine is a ConfigError before anything is built."""
    chosen = recipe.training.distributed
    launched = launcher_engine()
    if launched is not None and chosen != "ddp" and launched != chosen:
        raise ConfigError(f"training.distributed: the recipe asks for '{chosen}' but the accelerate config launches "
                          f"'{launched}'; make them agree (or leave training.distributed at ddp to follow the "
                          "launcher)")
    engine = launched or chosen
    reason = refusal(engine)
    if reason:
        raise ConfigError(reason)
    return engine


def load_sharded(engine: str, processes: int) -> str | None:
    """The engine whose shards each process loads on its own (:mod:`peftkit.sharded`), or None to load the base
    whole: ``fsdp2`` and ``zero3`` on several processes, unless the launcher's Accelerate config turned its
    sharded loading off (``fsdp_cpu_ram_efficient_loading: false``, ``zero3_init_flag: false``)."""
    if processes < 2 or engine not in ("fsdp2", "zero3"):
        return None
    switch = "FSDP_CPU_RAM_EFFICIENT_LOADING" if engine == "fsdp2" else "ACCELERATE_DEEPSPEED_ZERO3_INIT"
    if os.environ.get(switch, "true").strip().lower() in ("0", "false", "no"):
        return None
    return engine


def refusal(engine: str) -> str | None:
    """Why an engine cannot run peftkit's methods exactly (None when it can)."""
    if engine in ("ddp", "fsdp2"):
        return None
    if engine in ("zero2", "zero3"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            return (f"training.distributed: '{engine}' needs DeepSpeed, which is not installed; install it with "
                    "pip install 'peftkit[deepspeed]', or use training.distributed: fsdp2 (FSDP2 shards the frozen "
                    "base as ZeRO-3 does, with no extra package)")
        return None
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
    # Every engine averages the trainable gradients over processes (DDP's all-reduce divides by the world size,
    # as does distributed.average_gradients), so the loop scales each process's share of the global token mean
    # by the number of processes.
    averages_gradients = True

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    # True where the frozen base is sharded before the adapters' init and the optimizer (``shard``), so a
    # data-driven init runs on the sharded model, on the training device.
    shards_before_init = False
    # Whether 4-bit layers must stay in bitsandbytes' standard layout (keep_quantized_layouts): the loop pins them
    # right after loading, before any forward (a no-grad forward repacks them in place on AVX512-BF16 CPUs, and the
    # repack rounds absmax to bf16, so the one-process run would train on other weights than the sharded one).
    pins_quantized_layouts = False

    def shard(self, model: nn.Module) -> nn.Module:
        """Shard the frozen base (engines that do); DDP replicates it in ``prepare``."""
        return model

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
        return distributed.unwrap_model(self.accelerator, model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)


class WholeAdaptersEngine(Engine):
    """What every engine that shards only the frozen base shares: the trainable tensors stay whole and outside
    the engine, their gradients are averaged by peftkit (one flat all-reduce per step, after the last
    micro-batch), and evaluation runs through the model the engine hooked (its forward gathers the base)."""

    def no_sync(self, model: nn.Module, last_micro_batch: bool):
        return contextlib.nullcontext()  # our own all-reduce runs once per step, after the last micro-batch

    def reduce_gradients(self, params: list[torch.Tensor]) -> None:
        distributed.average_gradients(params)

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        # The gradients are already global and identical on every process: the local norm is the global norm.
        self.accelerator.unscale_gradients()
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def eval_model(self, model: nn.Module) -> nn.Module:
        return model


class FSDP2Engine(WholeAdaptersEngine):
    """FSDP2 over the frozen base; adapters and other trainable tensors whole on every process."""

    name = "fsdp2"
    collective_forward = True
    shards_before_init = True
    pins_quantized_layouts = True  # 4-bit codes sharded as stored: no in-place repack may differ from them

    def shard(self, model: nn.Module) -> nn.Module:
        """``fully_shard`` the frozen base (unless :mod:`peftkit.sharded` loaded it sharded), then move what stays
        whole (adapters, trainable tensors) to the device. The whole model is never moved to the device: FSDP2
        moves each block's tensors as it shards them."""
        device = self.accelerator.device
        if distributed.world_size() == 1:  # one process: nothing to shard across, the same numbers
            return model.to(device)
        if getattr(model, "peftkit_sharded", None) != "fsdp2":
            shard_frozen_base(model, device, offload=_flag("FSDP_OFFLOAD_PARAMS"),
                              reshard_after_forward=os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
                              not in ("false", "0", "no"))
            model.peftkit_sharded = "fsdp2"
        move_whole_tensors(model, device)
        return model

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        share_optimizer_state(optimizer)
        model = self.shard(model)
        # The optimizer's tensors were kept out of the shards (the same Parameter objects, plain tensors, whole).
        from torch.distributed.tensor import DTensor

        sharded = [p for group in optimizer.param_groups for p in group["params"] if isinstance(p, DTensor)]
        if sharded:  # pragma: no cover - a guard for the invariant above
            raise RuntimeError(f"fsdp2: {len(sharded)} optimizer tensors were sharded; adapters must stay whole")
        return model, self.accelerator.prepare_optimizer(optimizer)


class DeepSpeedZeroEngine(WholeAdaptersEngine):
    """DeepSpeed ZeRO-2/3 over the frozen base; adapters and other trainable tensors whole on every process,
    hidden from DeepSpeed (module docstring)."""

    name = "zero3"
    shards_before_init = True

    def __init__(self, accelerator: Any, stage: int) -> None:
        super().__init__(accelerator)
        self.stage = stage
        self.name = f"zero{stage}"
        # Under ZeRO-3 every forward gathers partitioned weights: a collective, as under FSDP2.
        self.collective_forward = stage == 3
        self.pins_quantized_layouts = stage == 3  # see keep_quantized_layouts
        self.deepspeed_engine = None  # kept alive: its module hooks refer to it

    def shard(self, model: nn.Module) -> nn.Module:
        """``deepspeed.initialize`` over the model (once), whole tensors hidden (:func:`wrap_deepspeed`). A base
        that :mod:`peftkit.sharded` built under ``zero.Init`` is partitioned already and stays where it is;
        DeepSpeed moves any other one to the device itself."""
        if self.stage == 3:  # at any process count, so that one process computes what two do
            keep_quantized_layouts(model)
        if distributed.world_size() == 1:  # one process: nothing to shard across, the same numbers
            return model.to(self.accelerator.device)
        if self.deepspeed_engine is None:
            move_whole_tensors(model, self.accelerator.device)
            self.deepspeed_engine = wrap_deepspeed(model, self.stage)
        return model

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        share_optimizer_state(optimizer)
        model = self.shard(model)
        sharded = [p for group in optimizer.param_groups for p in group["params"] if hasattr(p, "ds_id")]
        if sharded:  # pragma: no cover - a guard for the invariant of wrap_deepspeed
            raise RuntimeError(f"{self.name}: {len(sharded)} optimizer tensors were taken by DeepSpeed; adapters must "
                               "stay whole")
        return model, self.accelerator.prepare_optimizer(optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()  # the adapters' gradients land in p.grad (DeepSpeed's own backward drives only its optimizer)


def move_whole_tensors(model: nn.Module, device: torch.device) -> None:
    """Move the tensors no engine shards (:func:`whole_parameters`, with their gradients) to ``device``, in
    place: the adapters are small, the sharded base is moved by its engine, shard by shard."""
    for param in whole_parameters(model):
        if param.device != device and not param.is_meta:
            param.data = param.data.to(device)


ENGINES = {"ddp": Engine, "fsdp2": FSDP2Engine, "zero2": lambda acc: DeepSpeedZeroEngine(acc, 2),
           "zero3": lambda acc: DeepSpeedZeroEngine(acc, 3)}


def make(name: str, accelerator: Any) -> Engine:
    if name in ("fsdp2", "zero3") and distributed.world_size() > 1 and accelerator.device.type == "cpu":
        _return_freed_memory()  # before the sharded base is loaded: its buffers too go back to the system
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
    """``fully_shard`` every frozen linear layer inside a transformer block (unless the launcher's Accelerate
    config asks for ``TRANSFORMER_BASED_WRAP``), every transformer block (``model._no_split_modules``, the classes
    Accelerate's transformer wrap policy uses) and the root, in place, over all processes; :func:`whole_parameters`
    stay plain tensors. A model that names no blocks is sharded as one unit (the root). On CPU processes glibc is
    told to return freed all-gather buffers to the system (:func:`_return_freed_memory`)."""
    if device.type == "cpu":
        _return_freed_memory()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    ignored = whole_parameters(model)
    prepare_quantized_for_fsdp2(model)
    # Integer storage (bitsandbytes' int8 weights, 4-bit weights stored as uint8) cannot become DTensors: whole.
    whole_quantized = {p for p in model.parameters() if not (p.is_floating_point() or p.is_complex())}
    if whole_quantized and distributed.rank() == 0:
        size = sum(p.numel() * p.element_size() for p in whole_quantized)
        print(f"peftkit: fsdp2 keeps {len(whole_quantized)} quantized weights ({size / 2**20:.1f} MiB) whole on every "
              "process: their integer storage cannot be sharded (bitsandbytes 8-bit, or 4-bit without a float "
              "quant_storage; peftkit train loads 4-bit bases with quant_storage = model.dtype under fsdp2)",
              flush=True)
    ignored |= whole_quantized
    options = dict(mesh=mesh, ignored_params=ignored, offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_classes]
    if os.environ.get("FSDP_AUTO_WRAP_POLICY", "").strip().upper() != "TRANSFORMER_BASED_WRAP":
        # Each frozen linear weight is its own unit (peftkit's default): the base trains no gradient, so the unit
        # size decides only what one all-gather holds whole, and a per-block unit holds a whole block (plus the
        # all-gather's input and output buffers). An Accelerate config's TRANSFORMER_BASED_WRAP keeps blocks.
        for block in blocks:
            for module in block.modules():
                if isinstance(module, nn.Linear) and any(not p.requires_grad and p not in ignored
                                                         for p in module.parameters(recurse=False)):
                    fully_shard(module, reshard_after_forward=reshard_after_forward, **options)
    for block in blocks:
        if any(not p.requires_grad and p not in ignored for p in block.parameters()):
            fully_shard(block, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(model, **options)
    if device.type == "cpu":
        _gather_one_unit_at_a_time(model)
    return model


def _gather_one_unit_at_a_time(model: nn.Module) -> None:
    """On CPU processes an all-gather does not overlap with compute (no streams), so FSDP2's overlap costs memory
    and gains nothing: in forward it keeps each unit's all-gather buffer until the next unit's copy-out (unless
    the unshard is an ``async_op``), and in backward it prefetches the next unit while the current one is whole.
    Here each unit frees its buffer at once and prefetches nothing (a unit that names itself as its backward
    prefetch replaces the default, and unsharding an unsharded unit does nothing). Measured on the 437M Llama
    at N = 2 (benchmarks/bench_sharded.py --load): see docs/distributed.md."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_modules_to_backward_prefetch([module])
    if hasattr(model, "_set_unshard_async_op"):  # torch >= 2.6; a private switch of FSDPModule
        model._set_unshard_async_op(True)


def _return_freed_memory() -> None:
    """glibc serves allocations below its mmap threshold from its heap, raises that threshold (up to 32 MiB) each
    time a larger block is freed, and keeps what is freed in the heap resident. On CPU processes a training
    step's activations and all-gather buffers, freed after every use, then stay resident: measured, the
    all-gather buffers of a sharded base grew a process's memory by ~400 MiB per step (437M Llama, N = 2), and
    with the threshold fixed at 1 MiB the steps' sub-MiB activations still left ~120 MiB of freed heap per
    process. Fixing it at 64 KiB serves every tensor of 64 KiB or more by its own mapping, returned to the
    system when it is freed. It costs CPU time (each such tensor's pages are mapped and zeroed anew: measured
    +17-25 % per step on a 1024-hidden Llama at batch 2 x 64), so only the sharded engines' CPU processes, run
    for their memory, set it; one process and ddp keep glibc's defaults. A no-op off glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


MMAP_THRESHOLD = 64 << 10  # bytes: glibc's mmap threshold on CPU training processes (_return_freed_memory)


def prepare_quantized_for_fsdp2(model: nn.Module) -> None:
    """Make every bitsandbytes 4-bit layer shardable by FSDP2: its weight in the standard layout for good (FSDP2
    re-creates the weight from its shards at every all-gather, so bitsandbytes' in-place CPU repack would be
    undone: ``keep_standard_layout``), and its quant_state kept on the module, where bitsandbytes' forward finds
    it when the weight it gets is the plain all-gathered tensor (``Linear4bit.quant_state``). A weight with a float
    ``quant_storage`` is then sharded like any other frozen weight (FSDP-QLoRA)."""
    from .. import quantized

    for module in model.modules():
        if quantized.is_4bit(module):
            quantized.keep_standard_layout(module)
            if getattr(module, "quant_state", None) is None:
                module.quant_state = module.weight.quant_state


# ZeRO-3's limits on gathered weights, in elements, that peftkit sets where the user's config does not.
LIVE_LIMITS = ("stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_prefetch_bucket_size")


def bound_live_parameters(zero: dict, model: nn.Module) -> None:
    """Bound what ZeRO-3 keeps gathered to two of the model's largest weights (where the user's config sets
    nothing): DeepSpeed's defaults (10⁹ live elements, reuse distance 10⁹, prefetch 5·10⁷) keep every weight of a
    model under 10⁹ parameters gathered from its forward to its backward, i.e. the whole base on every process.
    A weight is still gathered whole while its module runs."""
    largest = max((getattr(p, "ds_numel", None) or p.numel() for p in model.parameters()), default=0)
    for key in LIVE_LIMITS:
        if zero.get(key) in (None, "auto"):
            # On CPU a gather does not overlap with compute: prefetching gains nothing and holds more weights.
            on_cpu = not torch.cuda.is_available()
            zero[key] = 0 if key == "stage3_prefetch_bucket_size" and on_cpu else int(2 * largest)


def _deepspeed_config(stage: int) -> dict:
    """DeepSpeed's config for a ``zero2``/``zero3`` engine: the user's own (an accelerate ``deepspeed_config_file``,
    checked by :func:`user_deepspeed_config`) or the defaults, with what peftkit owns forced: gradient
    accumulation (the loop's), clipping (peftkit's global norm), the batch sizes (the loop feeds the batches, so
    DeepSpeed's micro-batch size is only bookkeeping: 1)."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "").strip()
    config = dict(user_deepspeed_config(path)) if path else {}
    zero = dict(config.get("zero_optimization", {}))
    zero["stage"] = stage
    if not path:
        offload = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none").strip().lower()
        if stage == 3 and offload in ("cpu", "nvme"):
            zero["offload_param"] = {"device": offload}
    # Persistence would keep small frozen weights gathered; the default is kept, a user's setting too.
    config.update(zero_optimization=zero, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1,
                  gradient_clipping=0.0, steps_per_print=2 ** 62, zero_allow_untested_optimizer=True)
    config.pop("train_batch_size", None)
    for key in ("bf16", "fp16"):  # "auto" (Accelerate's default) means: follow the recipe, i.e. peftkit's autocast
        if isinstance(config.get(key), dict) and config[key].get("enabled") == "auto":
            config[key] = {**config[key], "enabled": False}
    return config


def _import_deepspeed():
    """``import deepspeed`` set up for this machine: its CPU accelerator where there is no GPU (it falls back to
    gloo when oneCCL is absent), and without JIT-building its shared-memory all-reduce kernel, which only its
    inference all-reduce uses and which costs minutes of compilation on the first run of every machine."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import importlib

        import deepspeed

        # importlib, not ``import deepspeed.comm.torch as``: that name resolves to the torch module that
        # deepspeed.comm imports.
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    except ImportError as exc:  # pragma: no cover - refusal() checks first
        raise ConfigError(f"training.distributed: zero2/zero3 need DeepSpeed ({exc}); pip install 'peftkit[deepspeed]'")
    if not torch.cuda.is_available():
        ds_torch_comm.build_shm_op = lambda: None
    return deepspeed


def hidden_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, module) of the outermost modules whose own parameters are all :func:`whole_parameters`:
    what DeepSpeed must not see. A module holding both (a frozen weight and a trained bias) cannot be split
    between DeepSpeed and peftkit: ConfigError."""
    whole = whole_parameters(model)
    found: list[tuple[nn.Module, str, nn.Module]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            own = list(child.parameters(recurse=False))
            inside = list(child.parameters())
            if inside and all(p in whole for p in inside):
                found.append((module, name, child))
                continue
            mixed = [n for n, p in child.named_parameters(recurse=False) if p in whole]
            if mixed and len(mixed) < len(own):
                raise ConfigError(
                    f"training.distributed: DeepSpeed ZeRO cannot keep {path}.{mixed[0]} whole: its module also holds "
                    "frozen weights that ZeRO shards. Freeze it, or use training.distributed: fsdp2 (FSDP2 keeps "
                    "single tensors out of its shards)")
            visit(child, path)

    visit(model, "")
    return found


def keep_quantized_layouts(model: nn.Module) -> None:
    """Pin every bitsandbytes 4-bit layer of ``model`` to the standard layout (``quantized.keep_standard_layout``):
    ZeRO-3 re-creates a weight's data from its partition at every gather, so bitsandbytes' in-place CPU repack
    would be undone under a quant_state that still says packed (the layer then computes with garbled codes)."""
    from .. import quantized

    quantized.keep_standard_layouts(model)


def wrap_deepspeed(model: nn.Module, stage: int) -> Any:
    """``deepspeed.initialize`` over ``model`` in place with every whole tensor hidden (module docstring); returns
    DeepSpeed's engine. The forward runs ``model`` itself (DeepSpeed's hooks are on its modules)."""
    deepspeed = _import_deepspeed()
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else None,
                               verbose=False, dist_init_required=not dist.is_initialized())
    if stage == 3:
        keep_quantized_layouts(model)
    hidden = hidden_modules(model)
    for parent, name, _ in hidden:  # an empty stand-in, so code that looks the attribute up keeps working
        parent._modules[name] = nn.ModuleDict() if isinstance(parent._modules[name], nn.ModuleDict) else nn.Module()
    placeholder = None
    kwargs: dict[str, Any] = {}
    if stage < 3:
        # ZeRO-1/2 need an optimizer over a module parameter; this 1-element one never gets a gradient and
        # DeepSpeed's step is never called.
        placeholder = nn.Parameter(torch.zeros(1, device=next(model.parameters()).device))
        model.register_parameter("_peftkit_zero_placeholder", placeholder)
        optimizer = torch.optim.AdamW([placeholder], lr=0.0)
        kwargs = dict(optimizer=optimizer, model_parameters=[placeholder])
    elif next(model.parameters()).dtype not in (torch.float16, torch.bfloat16, torch.float32):
        # ZeRO-3 passes the model's first parameter's dtype to its Init context, which accepts only fp16/bf16/fp32,
        # but only on CPUs whose oneDNN has fp16 (elsewhere its fallback hides the fp64 dtype): an fp64 model
        # failed on some machines and not on others. That dtype only types tensors created inside the context,
        # none here, so a 1-element fp32 stand-in goes first, for initialize only.
        placeholder = nn.Parameter(torch.zeros(1, device=next(model.parameters()).device), requires_grad=False)
        model._parameters = {"_peftkit_zero_placeholder": placeholder, **model._parameters}
    config = _deepspeed_config(stage)
    if stage == 3 and any(isinstance(layer, ExpertParameterLayer) for layer in adapter_layers(model).values()):
        # DeepSpeed makes some MoE blocks (Qwen3-MoE's, Mixtral's) ZeRO-3 "leaf modules" by default: one gather of
        # every parameter under the block, adapters included (whole tensors it never converted: it fails on them).
        # transformers' fused experts run as one module call, which its own hooks gather; no leaf is needed.
        config["zero_optimization"].setdefault("leaf_module", {"classes": [], "names": [], "name_suffixes": []})
    if stage == 3:
        bound_live_parameters(config["zero_optimization"], model)
        if not torch.cuda.is_available():
            _return_freed_memory()
    try:
        engine, *_ = deepspeed.initialize(model=model, config=config, **kwargs)
    finally:
        if placeholder is not None:
            del model._parameters["_peftkit_zero_placeholder"]
        for parent, name, module in hidden:
            parent._modules[name] = module
    return engine
