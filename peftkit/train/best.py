"""``<output_dir>/best/`` on disk (``training.best``, judged by :mod:`peftkit.train.monitor`): the adapter at the
best evaluation, written and swapped in whole, and put back from a checkpoint's copy on resume. Below both the
monitor and :mod:`peftkit.train.checkpointing` (which copies best/ into every checkpoint).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

BEST_DIR, BEST_FILE = "best", "best.json"  # best/ and its best.json: {"metric", "value", "step"}


def best_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / BEST_DIR


def read_best(folder: Path) -> dict | None:
    """best.json of a best/ folder (None when absent or unreadable)."""
    try:
        values = json.loads((folder / BEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) else None


def replace_folder(source_writer, target: Path) -> None:
    """Write a folder through ``source_writer(staging)`` and swap it in for ``target`` (never a gap: the old
    folder is renamed aside first, then removed)."""
    from .. import fileio as adapter_io

    staging = target.with_name(f".{target.name}.tmp")
    previous = target.with_name(f".{target.name}.old")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    source_writer(staging)
    adapter_io.fsync_dir(staging)
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        target.rename(previous)
    staging.rename(target)
    shutil.rmtree(previous, ignore_errors=True)
    adapter_io.fsync_dir(target.parent)


def write_best(output_dir: str | Path, model, tokenizer, metric: str, value: float, step: int) -> Path:
    """The adapter of ``model`` (unwrapped) as ``<output_dir>/best/`` (PEFT's format, the tokenizer, best.json)."""
    import peftkit

    from .. import fileio as adapter_io

    def write(staging: Path) -> None:
        peftkit.save(model, staging)
        tokenizer.save_pretrained(staging)
        adapter_io.atomic_write_json(staging / BEST_FILE, {"metric": metric, "value": value, "step": step})

    target = best_dir(output_dir)
    replace_folder(write, target)
    return target


def restore_best(output_dir: str | Path, checkpoint: Path, monitors_state: dict) -> None:
    """After a resume (or a divergence-guard restart) from ``checkpoint``: make ``<output_dir>/best/`` the best of
    the steps up to it, from the copy the checkpoint holds (no best yet at that step: no best/)."""
    target = best_dir(output_dir)
    record = monitors_state.get("best")
    step = record.get("step") if record else None
    on_disk = read_best(target) if target.is_dir() else None
    if step is None:
        if target.exists():
            shutil.rmtree(target)  # written by the abandoned steps after this checkpoint
        return
    if on_disk is not None and on_disk.get("step") == step:
        return
    saved = checkpoint / BEST_DIR
    if not (saved / BEST_FILE).is_file():
        from ..errors import CheckpointError

        raise CheckpointError(f"{checkpoint}: the best adapter of step {step} (training.best) is missing from the "
                              f"checkpoint ({saved}); restore it, or remove training.best to resume without it")
    replace_folder(lambda staging: _copy_into(saved, staging), target)


def _copy_into(source: Path, staging: Path) -> None:
    for item in source.iterdir():
        if item.is_file():
            shutil.copy2(item, staging / item.name)
        else:
            shutil.copytree(item, staging / item.name)
