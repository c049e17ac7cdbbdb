"""The guide's tables, the claim checks (each method's own, from :mod:`guide.methods`), the plot and the docs
block."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

import torch

import peftkit
import peftkit.lr

from .cell import factor_tag
from .contenders import Contender, contenders_for
from .data import _atomic_write
from .grid import missing_cells, read_cells, rekey_cells
from .measures import (
    Verdict,
    _fmt_count,
    _fmt_factor,
    _fmt_metric,
    _fmt_spread,
    _mean,
    best_cell,
    best_cells,
    final_metric,
    late_loss,
    sensitivity,
)
from .methods import method_modules
from .tasks import EXTEND_LIMIT, FACTORS, MARKERS, SWEEP, Task


def task_table(task: Task, contenders: list[Contender], sweeps: dict[str, dict[float, dict]]) -> str:
    """One row per contender: every sweep point, the best cell (its lr, metric, curve, costs), the spread."""
    best = {name: best_cell(task, sweep) for name, sweep in sweeps.items()}
    lora = best.get("lora")
    unit = "" if task.metric == "perplexity" else " (%)"
    steps = next((", ".join(str(p["step"]) for p in r["curve"]) for r in best.values() if r), "?")
    points = " | ".join(f"{_fmt_factor(f)}× conv." for f in SWEEP)
    lines = [(f"| contender | architecture / init / optimizer / schedule | conventional lr | "
              f"{task.metric}{unit} at {points} | "
              f"past the edge | best: lr (× conv.) | spread over the sweep | "
              f"best: eval {task.metric}{unit} at steps {steps} | "
              f"best: train loss, last quarter | trainable | init (s) | s / step | step × LoRA | peak RSS (MiB) | "
              f"sweep cells (s) |"),
             "|---|---|---|" + "---|" * len(SWEEP) + "---|---|---|---|---|---|---|---|---|---|---|"]
    for contender in contenders:
        sweep = sweeps.get(contender.name, {})
        note = f" ({contender.note})" if contender.note else ""
        if not sweep:
            lines.append(f"| {contender.label}{note} | not run yet |" + " |" * (len(SWEEP) + 12))
            continue
        record = best[contender.name]
        any_cell = record or next(iter(sweep.values()))
        axes = " / ".join(any_cell["axes"].values())
        values = []
        for factor in SWEEP:
            cell = sweep.get(factor)
            if cell is None:
                values.append("missing")
            elif cell["status"] != "done":
                values.append(f"{cell['status']} (lr {cell['lr']:.2g})")
            else:
                values.append(f"{_fmt_metric(task, final_metric(task, cell))} (lr {cell['lr']:.2g})")
        beyond = "; ".join(f"{_fmt_factor(f)}×: " + (f"{_fmt_metric(task, final_metric(task, c))} (lr {c['lr']:.2g})"
                                                       if c["status"] == "done" else c["status"])
                           for f, c in sorted(sweep.items()) if f not in SWEEP) or "—"
        values.append(beyond)
        conventional = f"{any_cell['lr_conventional']:.2g}"
        if record is None:
            lines.append(f"| {contender.label}{note} | {axes} | {conventional} | {' | '.join(values)} | "
                         f"none finished | "
                         f"{_fmt_spread(task, sweep)} |" + " |" * 8)
            continue
        edge = ""
        if all(f in sweep for f in SWEEP) and record["lr_factor"] in (min(sweep), max(sweep)):
            last = record["lr_factor"] in (FACTORS[0], FACTORS[-1])
            edge = " (edge of the extended sweep)" if last else " (edge: the optimum may lie beyond)"
        curve = " → ".join(_fmt_metric(task, p.get(task.metric, float("nan"))) for p in record["curve"])
        ratio = record["step_seconds"] / lora["step_seconds"] if lora else float("nan")
        wall = [c.get("wall_seconds") for c in sweep.values()]
        walls = "—" if None in wall else f"{sum(wall):.0f}"
        lines.append(f"| {contender.label}{note} | {axes} | {conventional} | {' | '.join(values)} | "
                     f"{record['lr']:.2g} ({_fmt_factor(record['lr_factor'])}×){edge} | {_fmt_spread(task, sweep)} | "
                     f"{curve} | {late_loss(record):.4f} | {_fmt_count(record['trainable'])} "
                     f"({100 * record['trainable'] / record['total']:.2f} %) | {record['init_seconds']:.1f} | "
                     f"{record['step_seconds']:.3f} | {ratio:.2f} | {record['peak_rss_mib']:.0f} | {walls} |")
    return "\n".join(lines)


def _fmt_seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def grid_time(tasks: list[Task], cells: dict[str, dict[str, dict[float, dict]]]) -> str:
    """The summed wall time of the finished cells, per task and in all, the threads they ran on, and an
    estimate for the cells not run yet (each at the mean finished-cell time of its task)."""
    records = {t.name: [r for sweep in cells[t.name].values() for r in sweep.values()] for t in tasks}
    walls = {name: [r["wall_seconds"] for r in rs if r.get("wall_seconds") is not None] for name, rs in records.items()}
    total = sum(sum(v) for v in walls.values())
    parts = ", ".join(f"{name} {sum(v) / 60:.1f} min for {len(v)} cell{'' if len(v) == 1 else 's'}"
                      for name, v in walls.items())
    threads = sorted({r.get("threads") for rs in records.values() for r in rs if r.get("threads")})
    on = (f"{'/'.join(map(str, threads))} thread{'s' if threads != [1] else ''} per cell" if threads
          else "threads unknown")
    text = (f"The finished cells took {total / 60:.1f} min of wall time in all ({parts}), one process each, "
            f"{on}; preparing the data and converting SmolLM2 once are not counted.")
    missing = missing_cells(tasks, cells)
    if missing:
        estimate = unknown = 0.0
        for task, _, _ in missing:
            if walls[task.name]:
                estimate += statistics.mean(walls[task.name])
            else:
                unknown += 1
        text += (f" {len(missing)} of {sum(len(contenders_for(t)) * len(SWEEP) for t in tasks)} cells are not run yet;"
                 f" at their task's mean cell time they would take about {estimate / 3600:.1f} h more")
        text += f" (plus {int(unknown)} cells of tasks with no finished cell to time)." if unknown else "."
    return text


def summary_table(tasks: list[Task], cells: dict[str, dict[str, dict[float, dict]]]) -> str:
    """One row per contender: per task its best final metric, the lr of that cell and the sweep's spread."""
    best = best_cells(tasks, cells)
    contenders: list[Contender] = []
    for task in tasks:
        for contender in contenders_for(task):
            if contender.name not in {c.name for c in contenders}:
                contenders.append(contender)
    header = " | ".join(f"{t.name} {t.metric}{'' if t.metric == 'perplexity' else ' (%)'}: best (lr; spread)"
                        for t in tasks)
    lines = [f"| contender | {header} | mean rank of the best |", "|---|" + "---|" * len(tasks) + "---|"]
    ranks: dict[str, list[int]] = {c.name: [] for c in contenders}
    for task in tasks:
        scored = sorted(((final_metric(task, r), n) for n, r in best[task.name].items()),
                        key=lambda item: -item[0] if task.higher_is_better else item[0])
        for position, (_, name) in enumerate(scored, 1):
            ranks[name].append(position)
    for contender in contenders:
        values = []
        for task in tasks:
            if contender.name not in {c.name for c in contenders_for(task)}:
                values.append("n/a")
                continue
            sweep = cells[task.name].get(contender.name, {})
            record = best[task.name].get(contender.name)
            if not sweep:
                values.append("not run yet")
            elif record is None:
                values.append(f"none finished ({_fmt_spread(task, sweep)})")
            else:
                done = sum(f in sweep for f in SWEEP)
                partial = "" if done == len(SWEEP) else f"; {done}/{len(SWEEP)} lrs"
                partial += "".join(f"; +{_fmt_factor(f)}×" for f in sorted(sweep) if f not in SWEEP)
                values.append(f"{_fmt_metric(task, final_metric(task, record))} ({record['lr']:.2g}; "
                              f"{_fmt_spread(task, sweep)}{partial})")
        mean_rank = f"{_mean(ranks[contender.name]):.1f}" if ranks[contender.name] else "—"
        lines.append(f"| {contender.label} | {' | '.join(values)} | {mean_rank} |")
    return "\n".join(lines)


AUTO_TOLERANCE = 0.02  # "within 2 points": accuracy and exact match as fractions; perplexity in its own unit


def auto_rate_table(tasks: list[Task], cells: dict[str, dict[str, dict[float, dict]]]) -> str:
    """What a user who sets no lr gets: each registered method at 1× its convention (its auto lr), against
    plain LoRA at its best cell, with ✓ when within 2 points (accuracy, exact match) or 2 perplexity points."""
    header = " | ".join(f"{t.name} {t.metric}" for t in tasks)
    lines = [f"| method | {header} |", "|---|" + "---|" * len(tasks)]
    for name in peftkit.methods():
        values = []
        for task in tasks:
            lora = best_cell(task, cells[task.name].get("lora", {}))
            auto = cells[task.name].get(name, {}).get(1.0)
            if lora is None or auto is None or not math.isfinite(final_metric(task, auto)):
                values.append("—" if auto is None or lora is None else auto["status"])
                continue
            value, reference = final_metric(task, auto), final_metric(task, lora)
            gap = value - reference if task.higher_is_better else reference - value
            tolerance = AUTO_TOLERANCE if task.metric != "perplexity" else 100 * AUTO_TOLERANCE
            mark = "✓" if gap >= -tolerance else "✗"
            values.append(f"{mark} {_fmt_metric(task, value)} vs {_fmt_metric(task, reference)} (lr {auto['lr']:.2g})")
        lines.append(f"| {name} | {' | '.join(values)} |")
    return "\n".join(lines)


def missing_table(tasks: list[Task], cells: dict[str, dict[str, dict[float, dict]]]) -> str:
    """The cells not run yet, per task and contender (empty when the grid is complete)."""
    missing: dict[tuple[str, str], list[float]] = {}
    for task, contender, factor in missing_cells(tasks, cells):
        missing.setdefault((task.name, contender.label), []).append(factor)
    if not missing:
        return ""
    lines = ["| task | contender | lr multipliers not run yet |", "|---|---|---|"]
    for (task, label), factors in missing.items():
        lines.append(f"| {task} | {label} | {', '.join(f'{_fmt_factor(f)}×' for f in sorted(factors))} |")
    return "\n".join(lines)


def plot(tasks: list[Task], cells: dict[str, dict[str, dict]], path: Path) -> None:
    """Eval metric against the step, one line per contender (``cells``: its best cell), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 2 if len(tasks) > 1 else 1
    rows = math.ceil(len(tasks) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(7 * columns, 5.5 * rows), squeeze=False)
    colours = plt.get_cmap("tab20")
    names = sorted({n for t in tasks for n in cells[t.name]})
    for index, task in enumerate(tasks):
        ax = axes[index // columns][index % columns]
        for name, record in cells[task.name].items():
            points = [(p["step"], p[task.metric]) for p in record["curve"] if task.metric in p]
            style = "--" if record["kind"] != "adapter" or "+" in name else "-"
            ax.plot(*zip(*points), style, marker="o", markersize=3, color=colours(names.index(name) % 20),
                    label=f"{record['label']} (lr {record['lr']:.2g})")
        ax.set_title(task.name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"eval {task.metric}")
        if task.metric == "perplexity":
            ax.set_yscale("log")
            # A diverged contender (perplexity in the thousands) would flatten every other line: the axis stops
            # at twice the worst starting perplexity, and the text names what left the panel.
            start = max(r["curve"][0][task.metric] for r in cells[task.name].values())
            low = min(p[task.metric] for r in cells[task.name].values() for p in r["curve"])
            ax.set_ylim(low * 0.9, start * 2)
            off = [r["label"] for r in cells[task.name].values() if max(p[task.metric] for p in r["curve"]) > start * 2]
            if off:
                ax.text(0.98, 0.98, "off the scale: " + ", ".join(off), transform=ax.transAxes, ha="right",
                        va="top", fontsize=8)
        ax.grid(alpha=0.3)
        # One legend per panel: each line is a contender's best cell, whose lr differs from task to task.
        ax.legend(fontsize=6, ncol=2, loc="best")
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    figure.suptitle("the best cell of each contender's learning-rate sweep", fontsize=10)
    figure.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(tmp, dpi=90)
    plt.close(figure)
    tmp.replace(path)


def write_docs(path: Path, block: str) -> None:
    """Put ``block`` between the quality markers of ``path`` (the docs page), creating the page with the
    markers if it does not exist; the rest of the page is left as it is."""
    begin, end = MARKERS
    if path.is_file():
        text = path.read_text()
        if begin not in text or end not in text or text.index(begin) > text.index(end):
            raise SystemExit(f"--docs: {path} lacks the markers {begin} ... {end} (in that order); add them where "
                             "the generated tables go, or pass another --docs page")
    else:
        text = ("# Method guide: which method, and what it costs\n\n"
                "The tables below are generated by `python benchmarks/quality.py` (see its docstring).\n\n"
                f"{begin}\n{end}\n")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    _atomic_write(path, f"{head}{begin}\n{block.rstrip()}\n{end}{tail}")


def report(tasks: list[Task], out: Path, command: str, quick: bool = False, docs: Path | None = None) -> str:
    """Write results.md, results.json and the plot (and the docs page's block) from the finished cells;
    partial grids are fine: the tables say which cells are missing. Returns the markdown."""
    for line in rekey_cells(out, tasks, quick):
        print(f"quality: re-keyed {line} (its method's lr convention changed)", flush=True)
    cells = read_cells(out, tasks, quick)
    every = tasks  # the time estimate and the list of missing cells cover the tasks not started yet too
    tasks = [t for t in tasks if cells[t.name]]
    if not tasks:
        raise SystemExit(f"quality: no finished cells of the current recipes in {out / 'cells'}; run the grid first")
    best = best_cells(tasks, cells)
    plot_path = docs.parent / "assets" / "quality.png" if docs else out / "quality.png"
    sweep = ", ".join(f"{_fmt_factor(f)}×" for f in SWEEP)
    parts = [f"Made by `{command}` (torch {torch.__version__}). {grid_time(every, cells)}", "",
             f"Each contender ran at {sweep} its conventional learning rate (the task's base LoRA rate times the "
             "method's `LRConvention` ratio, capped for compositions by `peftkit.lr`; full fine-tuning a tenth of "
             "the base; PEFT's LoRA the base); it is reported at its best cell (final eval metric), with the spread "
             "over the sweep: best − worst in points, or worst / best for perplexity. A contender whose best cell was "
             "at an end of the sweep also ran past that edge, a factor 3 at a time (`--extend`: \"past the edge\"; "
             f"at most {EXTEND_LIMIT} points beyond either end), until its best cell was inside. "
             "The cells of one run are "
             "not timed side by side: on a shared machine a cell's step time reflects the load while it ran, so "
             "the cost columns (s / step, step × LoRA) are indicative only.", "",
             "### Final eval metric, each contender at its best learning rate", "", summary_table(tasks, cells), ""]
    if docs:
        parts += [f"![eval metric against the optimizer step, the best cell of each contender, one panel per task]"
                  f"({os.path.relpath(plot_path, docs.parent)})", ""]
    for task in tasks:
        parts += [f"### {task.name}", "", task_table(task, contenders_for(task), cells[task.name]), ""]
        warned = sorted({f"{r['label']}: {message}" for sweep_ in cells[task.name].values() for r in sweep_.values()
                         for message in r.get("init_warnings", [])})
        if warned:
            parts += ["Warnings at init: " + "; ".join(warned), ""]
    parts += ["### Each method at its auto lr (1× its convention) against LoRA at its best", "",
              "What a user who leaves the lr out gets (`peftkit.optimizer(model, base_lr=<the task's LoRA rate>)`), "
              "against plain LoRA at its best cell; ✓ within 2 points (perplexity: 2 perplexity points).", "",
              auto_rate_table(tasks, cells), ""]
    parts += ["### Headline claims at this scale (best cells)", "", "| method | claim | result | evidence |",
              "|---|---|---|---|"]
    for verdict in claims(tasks, best):
        evidence = "<br>".join(verdict.evidence) or "—"
        parts.append(f"| {verdict.method} | {verdict.claim} | {verdict.result} | {evidence} |")
    missing = missing_table(every, cells)
    if missing:
        parts += ["", "### Cells not run yet", "", missing]
    text = "\n".join(parts) + "\n"
    _atomic_write(out / "results.md", text)
    summary = {}
    for task in tasks:
        summary[task.name] = {}
        for name, sweep_ in cells[task.name].items():
            spread, diverged = sensitivity(task, sweep_)
            record = best[task.name].get(name)
            summary[task.name][name] = {
                "best": factor_tag(record["lr_factor"]) if record else None,
                "best_lr": record["lr"] if record else None,
                "best_metric": final_metric(task, record) if record else None,
                "spread": spread if math.isfinite(spread) else None, "diverged": [factor_tag(f) for f in diverged],
                "cells": {factor_tag(f): {k: v for k, v in r.items() if k != "step_seconds_all"} for f,
                          r in sweep_.items()}}
    _atomic_write(out / "results.json", json.dumps(summary, indent=1))
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot(tasks, best, plot_path)
    if docs:
        write_docs(docs, text)
    return text


# ------------------------------------------------------------------------------------------ main


def claims(tasks: list[Task], cells: dict[str, dict[str, dict]]) -> list[Verdict]:
    """Each spec's small-scale headline claim, checked per task with a fixed rule (one seed: noisy); each
    method's rule is its module's ``claims`` (:mod:`guide.methods`), in the methods' ``ORDER``.

    ``cells`` is {task: {contender: record}}: the guide passes each contender's best cell of its sweep, so a
    claim compares methods each at its own best learning rate."""
    def pairs(*names: str):
        for task in tasks:
            records = cells[task.name]
            if all(n in records and records[n]["status"] == "done" for n in names):
                yield task, [records[n] for n in names]

    def better(task: Task, a: float, b: float) -> bool:
        return a >= b if task.higher_is_better else a <= b

    return [verdict for method in method_modules() for verdict in method.claims(pairs, better)]
