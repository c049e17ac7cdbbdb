"""What the tables and the claims read off a cell's record: its losses, its final metric, the best cell of a
sweep; and a claim's verdict."""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field
from typing import Any

from .tasks import SWEEP, Task


def _mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def early_loss(record: dict) -> float:
    """Mean training loss over the first quarter of the steps."""
    losses = record["train_loss"]
    return _mean(losses[: max(1, len(losses) // 4)])


def late_loss(record: dict) -> float:
    """Mean training loss over the last quarter of the steps (the fixed-budget figure)."""
    losses = record["train_loss"]
    return _mean(losses[-max(1, len(losses) // 4):])


def final_metric(task: Task, record: dict) -> float:
    return record["curve"][-1].get(task.metric, float("nan")) if record["status"] == "done" else float("nan")


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _fmt_metric(task: Task, value: float) -> str:
    if math.isnan(value):
        return "—"
    return f"{value:.2f}" if task.metric == "perplexity" else f"{100 * value:.1f}"


def best_cell(task: Task, sweep: dict[float, dict]) -> dict | None:
    """The sweep's best finished cell: the best final eval metric; ties go to the lower late train loss, then
    to the multiplier nearer the convention (1×). None when no cell finished with a finite metric."""
    scored = [r for r in sweep.values() if math.isfinite(final_metric(task, r))]
    if not scored:
        return None
    sign = -1.0 if task.higher_is_better else 1.0
    return min(scored, key=lambda r: (sign * final_metric(task, r), late_loss(r), abs(math.log(r["lr_factor"]))))


def sensitivity(task: Task, sweep: dict[float, dict]) -> tuple[float, list[float]]:
    """(spread, diverged multipliers): best − worst final metric over the sweep's finished cells (accuracy,
    exact match: in the metric's own unit, a fraction), or worst / best for perplexity (≥ 1); NaN below two
    finished cells. Cells that diverged (or ended non-finite) are listed apart: they are worse than any spread.
    Only the SWEEP points count (not those past the edge), so every contender's spread spans the same 9×."""
    sweep = {f: r for f, r in sweep.items() if f in SWEEP}
    values = [final_metric(task, r) for r in sweep.values()]
    finite = [v for v in values if math.isfinite(v)]
    diverged = sorted(f for f, r in sweep.items() if not math.isfinite(final_metric(task, r)))
    if len(finite) < 2:
        return float("nan"), diverged
    if task.metric == "perplexity":
        return max(finite) / min(finite), diverged
    return max(finite) - min(finite), diverged


def best_cells(tasks: list[Task], cells: dict[str, dict[str, dict[float, dict]]]) -> dict[str, dict[str, dict]]:
    """{task: {contender: its best cell}}: what the summary, the claims and the plot use."""
    out: dict[str, dict[str, dict]] = {}
    for task in tasks:
        out[task.name] = {}
        for name, sweep in cells[task.name].items():
            best = best_cell(task, sweep)
            if best is not None:
                out[task.name][name] = best
    return out


def _fmt_factor(factor: float) -> str:
    """1/3 -> "1/3", 1/9 -> "1/9", 3 -> "3" (the multipliers are powers of 3)."""
    return f"1/{1 / factor:.0f}" if factor < 1 else f"{factor:g}"


def _fmt_spread(task: Task, sweep: dict[float, dict]) -> str:
    spread, diverged = sensitivity(task, sweep)
    parts = []
    if math.isfinite(spread):
        parts.append(f"×{spread:.2f}" if task.metric == "perplexity" else f"{100 * spread:.1f} pts")
    if diverged:
        parts.append("diverged at " + ", ".join(f"{_fmt_factor(f)}×" for f in diverged))
    return "; ".join(parts) or "—"


@dataclass
class Verdict:
    method: str
    claim: str
    evidence: list[str] = field(default_factory=list)
    passed: list[bool] = field(default_factory=list)

    def add(self, ok: bool, text: str) -> None:
        self.passed.append(bool(ok))
        self.evidence.append(("✓ " if ok else "✗ ") + text)

    def skip(self, text: str) -> None:
        self.evidence.append("– " + text)

    @property
    def result(self) -> str:
        if not self.passed:
            return "not checked (no data)"
        hits = sum(self.passed)
        word = "reproduced" if hits == len(self.passed) else "not reproduced" if hits == 0 else "partly reproduced"
        return f"{word} ({hits}/{len(self.passed)})"


def retained(task: Task, record: dict) -> float:
    """The share of the final metric kept with a random half of the adapters off (1 = unharmed)."""
    full, half = final_metric(task, record), record["analysis"]["metric_half_adapters_dropped"]
    kept, whole = (half, full) if task.higher_is_better else (full, half)
    return kept / whole if whole else float("nan")


def drop_half(names: list[str], metric_with) -> dict[str, Any]:
    """Robustness to dropping adapters: the metric with a random half of the adapted layers off, three draws."""
    draws = [metric_with(random.Random(seed).sample(names, len(names) // 2)) for seed in range(3)]
    return {"metric_half_adapters_dropped": statistics.mean(draws),
            "drop_check": "active_adapters",  # cells from before the CoTo-hook fix lack this mark
            "metric_half_adapters_dropped_draws": draws}
