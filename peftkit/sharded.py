"""Load a pretrained base that no process holds whole: each process reads only its own shard of every weight.

Under FSDP2 or ZeRO-3 the frozen base is split across N processes; loading it whole on every process first (as
``from_pretrained`` then sharding does) costs each process the whole model at its peak. Here the model is built
without its weights (Accelerate's ``init_empty_weights`` for FSDP2: parameters on the meta device, buffers real;
DeepSpeed's ``zero.Init`` for ZeRO-3: every parameter partitioned as its module is built), sharded, and then each
process reads from the safetensors files exactly the elements its shard holds, by slice:

- FSDP2 (``fully_shard``, a 1-D mesh, ``Shard(0)``): process k holds rows ``[k·c, min((k+1)·c, m))`` of an
  (m, ...) weight, c = ceil(m / N) (``torch.chunk``'s split);
- ZeRO-3: process k holds elements ``[k·p, min((k+1)·p, numel))`` of the row-major flattened weight, p its
  partition size; the rows that cover that range are read and cut.

A process's peak is then its shard plus one file slice at a time (safetensors maps the file; only the pages of the
rows read are touched). Three lines in your own loop::

    model = peftkit.sharded.from_pretrained("path/or/hub-id", engine="fsdp2")  # or "zero3"; under torchrun
    peftkit.wrap(model, "lora", data=batches)                                   # adapters whole, on the device
    optimizer = peftkit.optimizer(model)

Only safetensors checkpoints whose tensor names are the model's parameter names are read this way (Llama,
Mistral, Qwen, Gemma, GPT-2 ...); anything else stops with an error naming the tensor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import distributed
from .errors import ConfigError
from .gather import whole_weights  # noqa: F401 - also peftkit.sharded.whole_weights

SHARDED_ENGINES = ("fsdp2", "zero3")


def checkpoint_files(ref: str) -> dict[str, str] | None:
    """{tensor name: safetensors file} of a model folder or hub id; None where it has no safetensors weights."""
    folder = Path(ref)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors"]))
        except Exception:  # noqa: BLE001 - not a hub id we can reach: the caller loads it the usual way
            return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: str(folder / file) for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: str(single) for name in f.keys()}


class _Reader:
    """Slices of checkpoint tensors by name. Each read opens its file and closes it after: safetensors maps the
    file, and every page a read touched stays resident (and counted in the process's memory) until the map is
    closed, so a reader kept open would end up holding this process's share of the file besides its shards."""

    def __init__(self, files: dict[str, str], prefix: str) -> None:
        self.files = files
        self.prefix = prefix

    def key(self, name: str) -> str:
        """The checkpoint's name for the model's parameter ``name`` (a base model's file has no head prefix)."""
        if name in self.files:
            return name
        if self.prefix and name.startswith(self.prefix + ".") and name[len(self.prefix) + 1:] in self.files:
            return name[len(self.prefix) + 1:]
        raise ConfigError(
            f"model.name: the checkpoint has no tensor '{name}', so its shard cannot be read by name (the model "
            "renames or converts its checkpoint's tensors); train it with training.distributed: ddp, or convert "
            "the checkpoint with save_pretrained first")

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the tensor (all of a 0-d one), a copy in the file's dtype."""
        from safetensors import safe_open

        key = self.key(name)
        with safe_open(self.files[key], framework="pt", device="cpu") as f:
            part = f.get_slice(key)
            return (part[start:stop] if len(part.get_shape()) else part[...]).clone()

    def whole(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        key = self.key(name)
        with safe_open(self.files[key], framework="pt", device="cpu") as f:
            return f.get_slice(key)[...].clone()

    def close(self) -> None:
        """Nothing stays open between reads."""


def _config_and_class(ref: str, auto_class: Any, **config_kwargs: Any):
    from transformers import AutoConfig, AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    config = AutoConfig.from_pretrained(ref, **config_kwargs)
    return config, auto_class


def from_pretrained(ref: str, *, engine: str = "fsdp2", dtype: torch.dtype = torch.float32, auto_class: Any = None,
                    device: torch.device | str | None = None, files: dict[str, str] | None = None,
                    **config_kwargs: Any) -> nn.Module:
    """The pretrained model ``ref`` (a folder or hub id), sharded across the processes of the default group
    under ``engine`` (``fsdp2``: ``fully_shard`` on every transformer block and the root; ``zero3``: partitioned
    by DeepSpeed's ``zero.Init``), each process having read only its shard. ``config_kwargs`` go to the config
    (``num_labels`` ...). The model is in ``dtype``; its shards live on ``device`` (default: this process's
    accelerator, or the CPU)."""
    if engine not in SHARDED_ENGINES:
        raise ConfigError(f"engine: expected one of {SHARDED_ENGINES}, got '{engine}'")
    files = files if files is not None else checkpoint_files(ref)
    if files is None:
        raise ConfigError(f"model.name: '{ref}' has no safetensors weights, which sharded loading reads by slice; "
                          "convert it with save_pretrained(safe_serialization=True), or load it whole")
    config, auto_class = _config_and_class(ref, auto_class, **config_kwargs)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if engine == "fsdp2":
        return _fsdp2(auto_class, config, dtype, device, files)
    return _zero3(auto_class, config, dtype, files)


def _built(auto_class: Any, config: Any, dtype: torch.dtype) -> nn.Module:
    # the pretrained config's dtype would otherwise decide; the weights are cast to ``dtype`` as they are read
    return auto_class.from_config(config, dtype=dtype)


def _fsdp2(auto_class: Any, config: Any, dtype: torch.dtype, device: torch.device, files: dict[str, str]) -> nn.Module:
    from accelerate import init_empty_weights
    from torch.distributed.tensor import DTensor, Shard

    from .train.engines import shard_frozen_base

    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (RoPE's inv_freq) computed
        model = _built(auto_class, config, dtype)
    model.requires_grad_(False)
    shard_frozen_base(model, device)
    reader = _Reader(files, getattr(model, "base_model_prefix", ""))
    persistent = {name for name, _ in model.state_dict(keep_vars=True).items()}
    buffers = {name: b.clone() for name, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)
    world, rank = distributed.world_size(), distributed.rank()
    try:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                source = buffers.get(name)
                if name in persistent and name in reader.files:
                    source = reader.whole(name)
                if source is None:
                    raise ConfigError(f"model.name: the buffer '{name}' is neither in the checkpoint nor computed by "
                                      "the model; load this model with training.distributed: ddp")
                buffer.copy_(source)
            for name, param in model.named_parameters():
                if isinstance(param, DTensor):
                    if tuple(param.placements) != (Shard(0),) or param.device_mesh.ndim != 1:
                        raise RuntimeError(f"{name}: expected a Shard(0) DTensor on a 1-D mesh, got {param.placements}")
                    local = param.to_local()
                    chunk = math.ceil(param.shape[0] / world)
                    start = min(rank * chunk, param.shape[0])
                    stop = start + local.shape[0]
                    if local.numel():
                        local.copy_(reader.rows(name, start, stop))
                else:
                    param.copy_(reader.whole(name))
    finally:
        reader.close()
    model.tie_weights()
    model.eval()
    model.peftkit_sharded = "fsdp2"  # the engine must not shard it again
    return model


def _zero3(auto_class: Any, config: Any, dtype: torch.dtype, files: dict[str, str]) -> nn.Module:
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    from .train.engines import _deepspeed_config, _import_deepspeed

    deepspeed = _import_deepspeed()
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else None,
                               verbose=False, dist_init_required=not dist.is_initialized())
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ConfigError(f"model.dtype: ZeRO-3 partitions at load only fp16/bf16/fp32 weights, got {dtype}")
    # zero.Init partitions each module's parameters as soon as the module is built; no_init_weights skips the
    # random init of the (empty) partitions, which the checkpoint overwrites below.
    # The partitions' dtype comes from the config's fp16/bf16 switches: DeepSpeed 0.19's zero.Init reads an explicit
    # ``dtype`` as ``(dtype or fp16) if fp16 else (bf16 if bf16 else fp32)``, so on a CPU without fp16 an fp32
    # model would be partitioned in bf16.
    init_config = _deepspeed_config(3)
    init_config["bf16"] = {"enabled": dtype == torch.bfloat16}
    init_config["fp16"] = {"enabled": dtype == torch.float16}
    with no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=init_config):
        model = _built(auto_class, config, dtype)
    model.requires_grad_(False)
    reader = _Reader(files, getattr(model, "base_model_prefix", ""))
    persistent = {name for name, _ in model.state_dict(keep_vars=True).items()}
    rank = distributed.rank()
    try:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in persistent and name in reader.files:
                    buffer.copy_(reader.whole(name))
            for name, param in model.named_parameters():
                part = param.ds_tensor
                numel = param.ds_numel
                size = part.ds_numel if hasattr(part, "ds_numel") else part.numel()
                start, stop = min(rank * size, numel), min((rank + 1) * size, numel)
                if stop <= start:
                    continue
                shape = tuple(param.ds_shape)
                row = math.prod(shape[1:]) if len(shape) > 1 else 1
                first, last = start // row, -(-stop // row)
                flat = reader.rows(name, first, last).reshape(-1)
                part.data[:stop - start].copy_(flat[start - first * row:stop - first * row])
    finally:
        reader.close()
    model.eval()
    return model


def held_base_bytes(model: nn.Module, frozen_only: bool = False) -> int:
    """Bytes of base weights this process stores: a DTensor counts its local shard, a ZeRO-3 parameter its
    partition (between uses the parameter itself holds 0 elements), a plain tensor all of it. ``frozen_only``:
    parameters that do not train (the base, not the adapters)."""
    total = 0
    for param in model.parameters():
        if frozen_only and param.requires_grad:
            continue
        if hasattr(param, "ds_tensor"):
            total += param.ds_tensor.numel() * param.ds_tensor.element_size()
        elif hasattr(param, "to_local"):
            total += param.to_local().numel() * param.element_size()
        else:
            total += param.numel() * param.element_size()
    return total
