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
half-written checkpoint; ``latest`` only ever sees complete ones. A checkpoint is written only when every
tensor in it is finite, so each one is a good one to resume from.

``<output_dir>/.peftkit.lock`` (``RunLock``) keeps a second run out of a folder that a live run writes.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import random
import re
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .. import checkpoint as adapter_io
from .. import distributed, fileio
from ..errors import CheckpointError, ConfigError, StateError
from ..inject import adapter_layers
from .best import BEST_DIR, BEST_FILE  # best/ is kept out of keep_checkpoints pruning

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
LOCK_FILE = ".peftkit.lock"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_STAGING_DIR = re.compile(r"^\.step-(\d+)\.tmp$")
_OLD_DIR = re.compile(r"^\.step-(\d+)\.old$")


ADAPTER_DIR = "adapter"
# The files peftkit writes at the top of a run folder (besides checkpoints/, adapter/ and the lock).
RUN_FILES = ("recipe.yaml", "metrics.jsonl", "loss.png")


def check_run_folder(output_dir: str | Path, resume: bool) -> Path | None:
    """The one check of a run folder before a run writes into it; returns the checkpoint to resume from.

    A folder is a peftkit run when it holds ``checkpoints/`` or ``adapter/`` (a run creates ``checkpoints/``
    before its first file). Without ``--resume`` a run folder is refused (it would mix two runs); a folder that is
    no run but holds files of the names a run writes (``recipe.yaml``, ``metrics.jsonl``, ``loss.png``) is refused
    too, naming them: they are the user's, and a run would replace or extend them."""
    output_dir = Path(output_dir)
    last = latest(output_dir)
    if resume and last is None:
        raise ConfigError(f"--resume: no checkpoint in {output_dir / CHECKPOINTS}; start without --resume")
    if not resume and (last is not None or (output_dir / ADAPTER_DIR).exists()):
        raise ConfigError(f"training.output_dir: {output_dir} already holds a run; pass --resume to continue it, or "
                          "choose another output_dir")
    is_run = (output_dir / CHECKPOINTS).is_dir() or (output_dir / ADAPTER_DIR).is_dir()
    if not is_run and output_dir.is_dir():
        clash = [name for name in RUN_FILES if os.path.lexists(output_dir / name)]
        if clash:
            raise ConfigError(
                f"training.output_dir: {output_dir} is not a peftkit run (no checkpoints/ or adapter/) but holds "
                f"{', '.join(clash)}, which a run would replace or append to; move those files, or choose a new or "
                "empty output_dir")
    return last


def claim_run_folder(output_dir: str | Path) -> None:
    """Mark ``output_dir`` as a run (``checkpoints/``) before the run writes its first file there."""
    (Path(output_dir) / CHECKPOINTS).mkdir(parents=True, exist_ok=True)


class NonFiniteStateError(StateError):
    """The training state holds NaN or inf: no checkpoint was written (the previous ones stay good)."""


class RunLock:
    """An exclusive lock on a run folder, held by the main process while it trains.

    ``flock`` on ``<output_dir>/.peftkit.lock``: the kernel drops it when its holder dies, so the lock file a
    killed run leaves behind is simply taken over. The file holds the holder's pid, host and start time for the
    message a second run gets. Under several processes only the main one locks; all agree on the outcome.
    """

    def __init__(self, output_dir: str | Path, accelerator=None) -> None:
        self.folder = Path(output_dir)
        self.path = self.folder / LOCK_FILE
        self.accelerator = accelerator
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> "RunLock":
        main = self.accelerator is None or self.accelerator.is_main_process
        error = self._acquire() if main else None
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            flag = torch.tensor(float(error is not None), device=self.accelerator.device)
            if self.accelerator.reduce(flag, reduction="sum").item() and error is None:
                self.release()
                error = ConfigError(f"training.output_dir: {self.folder} is in use by another run (see the main "
                                    "process's message)")
        if error is not None:
            raise error
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _acquire(self) -> ConfigError | None:
        if self.folder.exists() and not self.folder.is_dir():
            return ConfigError(f"training.output_dir: {self.folder} is a file, not a folder; choose a folder")
        if not self.folder.exists():
            missing = [self.folder, *(p for p in self.folder.parents if not p.exists())]
            self.folder.mkdir(parents=True)
            self._created = missing  # removed again on release if the run leaves them empty
        if os.path.lexists(self.path) and (os.path.islink(self.path) or not self.path.is_file()):
            return ConfigError(f"training.output_dir: {self.path} is not a lock file peftkit wrote (it is a "
                               f"{'link' if os.path.islink(self.path) else 'folder or special file'}); move it away "
                               "or choose another output_dir")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, fileio.file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    os.close(fd)
                    raise
                holder = _read_holder(fd)
                os.close(fd)
                return ConfigError(
                    f"training.output_dir: {self.folder} is in use by another peftkit run ({holder}); two runs in one "
                    "folder would mix their metrics and checkpoints. Wait for it to finish (or stop it), or choose "
                    "another output_dir")
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file while we waited for it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        self._fd = fd
        remove_stale_staging(self.folder)
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # before unlocking: a waiter then sees a new file, never a removed one locked
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        for folder in self._created:  # only folders this lock created that stayed empty (a run that failed early)
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "pid unknown: it is starting"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"])) if info.get("since") else "?"
    return f"pid {info['pid']} on {info.get('host', '?')}, since {since}"


def remove_stale_staging(output_dir: str | Path) -> None:
    """Clean up after a killed run (only under the run lock, so these folders are ours): remove its
    ``checkpoints/.step-N.tmp`` folders, and put back a ``.step-N.old`` that a swap left without its successor."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if _STAGING_DIR.match(entry.name) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif (m := _OLD_DIR.match(entry.name)) and entry.is_dir():
            final = root / f"step-{m.group(1)}"
            if final.exists():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.rename(final)


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _state_tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors inside a (nested) state dict, by dotted path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    out: dict[str, torch.Tensor] = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        out.update(_state_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


@dataclass
class TrainState:
    """Where the run is. ``position``: global micro-batches consumed (the data position)."""

    step: int = 0
    position: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    # Must match on resume, or the data order and the schedule would silently differ.
    fingerprint: dict[str, Any] = field(default_factory=dict)
    # training.best / training.early_stopping: the best values, their steps, evaluations without improvement
    # (peftkit.train.monitor.Monitors)
    monitors: dict[str, Any] = field(default_factory=dict)


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
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
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
    unwrapped = distributed.unwrap_model(accelerator, model)
    bad: list[str] = []
    # Every process: an optimizer that shards its state across processes gathers it here onto rank 0.
    optimizer_state = optimizer.state_dict()
    if accelerator.is_main_process:
        tensors = trainable_state(unwrapped)
        states = {"optimizer": optimizer_state, "lr_scheduler": lr_scheduler.state_dict(),
                  "schedule": schedule.state_dict()}
        bad = nonfinite_tensors(tensors) + [f"optimizer state {k}" for k in nonfinite_tensors(_state_tensors(states))]
    if accelerator.num_processes > 1:  # every process must take the same branch
        flag = accelerator.reduce(torch.tensor(float(bool(bad)), device=accelerator.device), reduction="sum")
        bad = bad or (["(see the main process)"] if flag.item() else [])
    if bad:
        raise NonFiniteStateError(f"step {state.step}: NaN or inf in {bad[:3]}{' ...' if len(bad) > 3 else ''}; "
                                  "no checkpoint was written")
    def write_shared() -> None:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            adapter_io.save(unwrapped, staging / "adapter")
            fileio.atomic_save_tensors(staging / "trainable.safetensors", tensors)
            buffer = io.BytesIO()
            torch.save(states, buffer)
            fileio.atomic_write_bytes(staging / "optimizer.pt", buffer.getvalue())
            best = Path(output_dir) / BEST_DIR
            if (best / BEST_FILE).is_file():
                # best/ as it is at this step: a resume from here puts it back (training.best)
                shutil.copytree(best, staging / BEST_DIR)

    def publish() -> None:
        if accelerator.is_main_process:
            fileio.atomic_write_json(staging / STATE_FILE, asdict(state))
            fileio.fsync_dir(staging)
            if final.exists():  # the same step again (a resume at its last step): swap, never a gap
                previous = root / f".step-{state.step:06d}.old"
                shutil.rmtree(previous, ignore_errors=True)
                final.rename(previous)
                staging.rename(final)
                shutil.rmtree(previous, ignore_errors=True)
            else:
                staging.rename(final)
            fileio.fsync_dir(root)

    try:
        # Each phase ends in a collective that tells every process whether any failed, so a process that cannot
        # write (a full disk, an I/O error) makes all of them raise instead of leaving the others in a barrier.
        for phase in (write_shared, lambda: _save_rng(staging, accelerator.process_index), publish):
            _all_succeed(accelerator, phase, state.step)
    except BaseException:
        # A failed write leaves no temporary folder; the older checkpoints stay.
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if accelerator.is_main_process and keep is not None:
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class CheckpointWriteError(RuntimeError):
    """Another process failed to write its part of a checkpoint (its own error is in its output)."""


def _all_succeed(accelerator, phase, step: int) -> None:
    """Run ``phase`` on this process, then agree with every process on whether all succeeded (one all-reduce):
    this process's own error is re-raised; a failure elsewhere raises :class:`CheckpointWriteError` here."""
    error: Exception | None = None
    try:
        phase()
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the others have heard of it
        error = exc
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), reduction="sum")
        if error is None and failed.item():
            raise CheckpointWriteError(f"step {step}: {int(failed.item())} other process(es) failed to write the "
                                       "checkpoint (see their output); no checkpoint was written")
    if error is not None:
        raise error


def load(path: Path, accelerator, model: nn.Module, optimizer, lr_scheduler, schedule, fingerprint: dict) -> TrainState:
    """Restore a checkpoint into the (already built and prepared) run; RNG states last, by the caller."""
    required = ["trainable.safetensors", "optimizer.pt", f"rng-{accelerator.process_index}.safetensors",
                f"rng-{accelerator.process_index}.json"]
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: {', '.join(missing)} missing; this checkpoint is incomplete (files were "
                              "removed or it was copied in part). Restore the files, or delete this step folder to "
                              "resume from the one before")
    state = _read_state(path / STATE_FILE)
    changed = {k: (state.fingerprint.get(k), v) for k, v in fingerprint.items() if state.fingerprint.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise CheckpointError(f"--resume: the recipe changed since {path} was written ({detail}); a resumed run needs "
                              "the same data order and global batch. Restore those settings or start a new output_dir")
    unwrapped = distributed.unwrap_model(accelerator, model)
    tensors = adapter_io.read_tensors(path / "trainable.safetensors")
    expected = trainable_state(unwrapped)
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
        raise CheckpointError(f"{path}: its adapter tensors do not fit the model this recipe builds; resume with the "
                              "recipe that wrote it")
    bad = [k for k, t in tensors.items() if not t.is_floating_point() and expected[k].is_floating_point()]
    bad += nonfinite_tensors(tensors)
    if bad:
        raise CheckpointError(f"{path / 'trainable.safetensors'}: {bad[:3]} are not finite float tensors (checkpoints "
                              "are written finite): the file was changed. Resume from another checkpoint")
    try:
        states = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path / 'optimizer.pt'}: unreadable ({exc}); resume from another checkpoint") from None
    if not isinstance(states, dict) or not {"optimizer", "lr_scheduler", "schedule"} <= set(states):
        raise CheckpointError(f"{path / 'optimizer.pt'}: not a peftkit optimizer state (expected the optimizer, "
                              "lr_scheduler and schedule states); resume from another checkpoint")
    load_trainable_state(unwrapped, tensors)
    try:
        optimizer.load_state_dict(states["optimizer"])
        _check_optimizer_shapes(optimizer)
        lr_scheduler.load_state_dict(states["lr_scheduler"])
        schedule.load_state_dict(states["schedule"])
    except Exception as exc:  # noqa: BLE001 - a state the optimizer cannot take: the file was changed
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path / 'optimizer.pt'}: does not fit this run's optimizer ({first[:200]}); resume "
                              "from another checkpoint, with the recipe that wrote it") from None
    return state


def _read_state(path: Path) -> TrainState:
    """trainer_state.json, bounded and with every field's type checked (a tampered file is one error)."""
    from ..validation import json_loads

    try:
        values = json_loads(path.read_bytes(), str(path))
        if not isinstance(values, dict):
            raise ValueError(f"expected a JSON object, got {type(values).__name__}")
        unknown = set(values) - {f for f in TrainState.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)[:3]}")
        for key in ("step", "position", "tokens"):
            value = values.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
                raise ValueError(f"'{key}' is {value!r:.40}, expected a non-negative integer")
        elapsed = values.get("elapsed_s", 0.0)
        if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not 0 <= elapsed < 1e12:
            raise ValueError(f"'elapsed_s' is {elapsed!r:.40}, expected a non-negative number of seconds")
        if not isinstance(values.get("fingerprint", {}), dict):
            raise ValueError("'fingerprint' is not a JSON object")
        from .monitor import check_state

        check_state(values.get("monitors", {}))
        return TrainState(**values)
    except (OSError, ValueError) as exc:  # CheckpointError and ConfigError are ValueErrors
        raise CheckpointError(f"{path}: unreadable trainer state ({exc}); resume from another checkpoint") from None


def _check_optimizer_shapes(optimizer) -> None:
    """Every per-parameter state tensor with as many values as its parameter has its shape (a reshaped moment
    would fail, or broadcast, at the first step)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if (isinstance(value, torch.Tensor) and value.dim() and value.numel() == p.numel()
                        and value.shape != p.shape):
                    raise ValueError(f"optimizer state '{key}' has shape {tuple(value.shape)}, its parameter "
                                          f"{tuple(p.shape)}")


def _save_rng(folder: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    fileio.atomic_save_tensors(folder / f"rng-{rank}.safetensors", tensors)
    fileio.atomic_write_json(folder / f"rng-{rank}.json", {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
    })


def restore_rng(path: Path, rank: int) -> None:
    """Set this process's RNGs to what they were when the checkpoint was written."""
    for name in (f"rng-{rank}.safetensors", f"rng-{rank}.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: file not found; the random-number state of process {rank} is "
                                  "missing, so the resumed run could not continue the same trajectory. Restore the "
                                  "file, or delete this step folder to resume from the one before")
    tensors = adapter_io.read_tensors(path / f"rng-{rank}.safetensors")
    from ..validation import json_loads

    try:
        values = json_loads((path / f"rng-{rank}.json").read_bytes(), str(path / f"rng-{rank}.json"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / f'rng-{rank}.json'}: unreadable ({exc}); restore the file or resume from "
                              "an earlier checkpoint") from None
    # Every state is checked and built before any RNG is set: a tampered file changes nothing.
    try:
        torch_state = tensors["torch"]
        if torch_state.dtype != torch.uint8 or torch_state.dim() != 1:
            raise ValueError(f"the torch state is {torch_state.dtype} {tuple(torch_state.shape)}, expected uint8 (N,)")
        numpy_keys = tensors["numpy"]
        if numpy_keys.is_floating_point() or tuple(numpy_keys.shape) != (624,):
            raise ValueError(f"the numpy key is {numpy_keys.dtype} {tuple(numpy_keys.shape)}, expected integers (624,)")
        version, internal, gauss = values["python"]
        python_state = (version, tuple(internal), gauss)
        kind, pos, has_gauss, cached = values["numpy"]
        numpy_state = (kind, numpy_keys.numpy().astype(np.uint32), pos, has_gauss, cached)
        probe_python, probe_numpy = random.Random(), np.random.RandomState()
        probe_python.setstate(python_state)
        probe_numpy.set_state(numpy_state)
        torch.Generator().set_state(torch_state)
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(f"{path}: the random-number state of process {rank} is damaged ({str(exc)[:200]}); "
                              "restore rng files from a good copy, or delete this step folder to resume from the one "
                              "before") from None
    torch.set_rng_state(torch_state)
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"cuda{i}"] for i in range(torch.cuda.device_count())
                                      if f"cuda{i}" in tensors])
    random.setstate(python_state)
    np.random.set_state(numpy_state)
