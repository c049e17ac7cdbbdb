"""``metrics.jsonl`` (one JSON object per logged step, with ``step``) and the loss plot drawn from it."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from ..errors import ConfigError

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLog:
    """Appends records to ``<run_dir>/metrics.jsonl`` (main process only)."""

    def __init__(self, run_dir: str | Path, enabled: bool) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled

    def truncate_after(self, step: int, evals_at_step: bool = True) -> None:
        """On resume: drop records newer than the checkpoint, which the resumed run writes again (and the
        evaluation records of ``step`` itself when ``evals_at_step`` is False: a resume at the last step
        evaluates again)."""
        if not self.enabled or not self.path.is_file():
            return
        from ..fileio import atomic_write_bytes

        kept = [r for r in read(self.path.parent) if r.get("step", 0) < step or r.get("step", 0) == step and (
            evals_at_step or not any(k.startswith("eval_") for k in r))]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def read(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ConfigError(f"plot: {path} not found; give the output_dir of a training run")
    records = []
    lines = path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                record = json.loads(line)
            except RecursionError:
                raise ConfigError(f"{path}: line {number} is nested too deeply; the file is damaged - fix or remove "
                                  "that line") from None
            except ValueError:  # JSONDecodeError, an integer literal too long to read
                if number == len(lines):
                    # A run killed during an append leaves its last line torn: that record is lost, not the file.
                    warnings.warn(f"{path}: the last line is incomplete (a run was killed while writing it); "
                                  "it is ignored", stacklevel=2)
                    continue
                raise ConfigError(f"{path}: line {number} is not JSON; the file is damaged - fix or remove "
                                  "that line") from None
            bad = _bad_record(record)
            if bad:
                raise ConfigError(f"{path}: line {number}: {bad}; the file is damaged or not a peftkit metrics "
                                  "file - fix or remove that line")
            records.append(record)
    return records


def _bad_record(record: Any) -> str | None:
    """What is wrong with one metrics record (a JSON object with an integer step and numbers), or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    step = record.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int):
        return f"'step' is {step!r:.40}, expected an integer"
    for key in ("loss", "eval_loss"):
        value = record.get(key)
        if key in record and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"'{key}' is {value!r:.40}, expected a number"
    return None


def plot(run_dir: str | Path) -> Path:
    """Draw train loss and eval loss against the step into ``<run_dir>/loss.png``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train), label="train loss")
    if evals:
        axes.plot(*zip(*evals), marker="o", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(Path(run_dir).resolve().name)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    out = Path(run_dir) / PLOT_FILE
    tmp = out.with_name("." + PLOT_FILE + ".tmp.png")
    try:
        figure.savefig(tmp, dpi=100)
        tmp.replace(out)
    finally:
        plt.close(figure)
        tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves no temporary file
    return out
