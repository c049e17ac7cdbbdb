"""Training checkpoints: everything a resumed run needs to continue the same trajectory.

``<output_dir>/checkpoints/step-000050/`` holds
- ``adapter/``: the adapter in PEFT's format (``peftkit.save``), usable on its own;
- ``trainable.safetensors``: the exact training tensors (every adapter parameter and buffer, trainable heads),
  which ``adapter/`` may hold in an export form (e.g. an init's offset pair folded into a larger rank);
- ``optimizer.pt``: optimizer, LR scheduler and method-schedule state dicts (tensors and plain values only,
  read back with ``torch.load(weights_only=True)``);
- ``rng-<rank>.safetensors`` + ``rng-<rank>.json``: each process's torch / numpy / Python RNG states;
- ``trainer_state.json``: step, data position, tokens seen, and what must match on resume.

The folder is written as ``.step-000050.tmp`` and renamed when complete, so a crash never leaves a
half-written checkpoint; ``latest`` only ever sees complete ones.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .. import checkpoint as adapter_io
from ..errors import CheckpointError
from ..inject import adapter_layers

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """Where the run is. ``position``: global micro-batches consumed (the data position)."""

    step: int = 0
    position: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    # Must match on resume, or the data order and the schedule would silently differ.
    fingerprint: dict[str, Any] = field(default_factory=dict)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (parameters and buffers of each AdapterLayer's branches) and every other
    trainable parameter, by state-dict key, cloned (safetensors refuses shared storage)."""
    # Read from the modules that hold them, never through the whole model's state_dict: under FSDP2 that
    # reshards the root on the calling process only, and the processes' next all-gathers would disagree.
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for layer_name, layer in adapter_layers(model).items():
        tensors.update({f"{layer_name}.adapters.{k}": v for k, v in layer.adapters.state_dict().items()})
    return {k: v.detach().clone().contiguous() for k, v in sorted(tensors.items())}


@torch.no_grad()
def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy :func:`trainable_state` tensors back into the model's own parameters and buffers, in place."""
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    for layer_name, layer in adapter_layers(model).items():
        targets.update({f"{layer_name}.adapters.{k}": v for k, v in layer.adapters.state_dict(keep_vars=True).items()})
    for key, value in tensors.items():
        targets[key].copy_(value)


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete step checkpoints, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def save(accelerator, model: nn.Module, optimizer, lr_scheduler, schedule, state: TrainState,
         output_dir: str | Path, keep: int | None) -> Path:
    """Write a checkpoint of step ``state.step`` (collective: every process calls it; rank 0 writes the shared
    files, each process its RNG state). Returns the checkpoint folder."""
    root = Path(output_dir) / CHECKPOINTS
    final = root / f"step-{state.step:06d}"
    staging = root / f".step-{state.step:06d}.tmp"
    # Every process: an optimizer that shards its state across processes gathers it here onto rank 0.
    optimizer_state = optimizer.state_dict()
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        unwrapped = accelerator.unwrap_model(model)
        adapter_io.save(unwrapped, staging / "adapter")
        adapter_io.atomic_save_tensors(staging / "trainable.safetensors", trainable_state(unwrapped))
        torch.save({"optimizer": optimizer_state, "lr_scheduler": lr_scheduler.state_dict(),
                    "schedule": schedule.state_dict()}, staging / "optimizer.pt")
    accelerator.wait_for_everyone()
    _save_rng(staging, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        adapter_io.atomic_write_json(staging / STATE_FILE, asdict(state))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        if keep is not None:
            for old in checkpoint_dirs(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(path: Path, accelerator, model: nn.Module, optimizer, lr_scheduler, schedule, fingerprint: dict) -> TrainState:
    """Restore a checkpoint into the (already built and prepared) run; RNG states last, by the caller."""
    try:
        state = TrainState(**json.loads((path / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable trainer state ({exc}); resume from another checkpoint") from None
    changed = {k: (state.fingerprint.get(k), v) for k, v in fingerprint.items() if state.fingerprint.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise CheckpointError(f"--resume: the recipe changed since {path} was written ({detail}); a resumed run needs "
                              "the same data order and global batch. Restore those settings or start a new output_dir")
    unwrapped = accelerator.unwrap_model(model)
    tensors = adapter_io.read_tensors(path / "trainable.safetensors")
    expected = trainable_state(unwrapped)
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
        raise CheckpointError(f"{path}: its adapter tensors do not fit the model this recipe builds; resume with the "
                              "recipe that wrote it")
    load_trainable_state(unwrapped, tensors)
    try:
        states = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path / 'optimizer.pt'}: unreadable ({exc}); resume from another checkpoint") from None
    optimizer.load_state_dict(states["optimizer"])
    lr_scheduler.load_state_dict(states["lr_scheduler"])
    schedule.load_state_dict(states["schedule"])
    return state


def _save_rng(folder: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    adapter_io.atomic_save_tensors(folder / f"rng-{rank}.safetensors", tensors)
    adapter_io.atomic_write_json(folder / f"rng-{rank}.json", {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
    })


def restore_rng(path: Path, rank: int) -> None:
    """Set this process's RNGs to what they were when the checkpoint was written."""
    tensors = adapter_io.read_tensors(path / f"rng-{rank}.safetensors")
    values = json.loads((path / f"rng-{rank}.json").read_text())
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in tensors])
    version, internal, gauss = values["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, pos, has_gauss, cached = values["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
