"""The grid of cells: their files, fingerprints and order, running them (each in its own process), the sweep's
extension past its edge."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import peftkit
import peftkit.lr
from peftkit.config import resolve_config

from .cell import factor_tag, run_cell
from .contenders import Contender, contenders_for, schedule_options
from .data import _atomic_write
from .measures import best_cell
from .tasks import CACHE, FACTORS, FULL_FT_RATIO, PRIORITY, SCRIPT, SWEEP, Task, recipe_fingerprint, task_recipe


def cell_path(out: Path, task: str, contender: str, factor: float) -> Path:
    return out / "cells" / task / f"{contender}@{factor_tag(factor)}.json"


def grid_order(tasks: list[Task], names: list[str] | None) -> list[tuple[Task, Contender, float]]:
    """Every (task, contender, lr multiplier) cell, in the order the grid runs them.

    ``names`` given: those contenders in that order, task by task. Otherwise the MiniLM tasks come before the
    SmolLM2 ones (minutes against tens of minutes per cell), task by task, and within a task the contenders of
    ``PRIORITY`` first; within a contender its sweep. Task by task: a partial run then holds complete
    comparisons (a method, LoRA and full FT, each swept) on its first task rather than halves on two."""
    cells = []
    for task in tasks:
        candidates = contenders_for(task)
        if names:
            candidates = [c for name in names for c in candidates if c.name == name]
        for position, contender in enumerate(candidates):
            for index, factor in enumerate(SWEEP):
                cells.append((task, contender, factor, position, index))
    if names:
        return [(t, c, f) for t, c, f, _, _ in cells]
    order = {t.name: i for i, t in enumerate(tasks)}

    def key(cell):
        task, contender, _, position, index = cell
        rank = PRIORITY.index(contender.name) if contender.name in PRIORITY else len(PRIORITY) + position
        return (task.uses_smollm2, order[task.name], rank, index)

    return [(t, c, f) for t, c, f, _, _ in sorted(cells, key=key)]


def cell_is_current(path: Path, task: Task, quick: bool) -> bool:
    """A finished cell of the task's current recipe (not a stale one, nor a half-written file)."""
    try:
        return json.loads(path.read_text()).get("recipe_fingerprint") == recipe_fingerprint(task, quick)
    except (OSError, ValueError):
        return False


def run_grid(tasks: list[Task], names: list[str] | None, out: Path, cache: Path, quick: bool, force: bool,
             isolate: bool, threads: int | None = None, stop_at: float | None = None, extend: bool = False) -> None:
    """Run the missing cells (all with ``force``); ``threads`` sets each cell's torch / OpenMP threads;
    ``stop_at`` (a time.time()) starts no cell after it, so a run can end on time with every cell whole;
    ``extend`` then runs, for each contender whose best cell is at an end of its points, the next point
    past that end (:func:`next_factor`), until its best is inside or EXTEND_LIMIT points are run there."""
    rekey_cells(out, tasks, quick)

    def past_stop() -> bool:
        if stop_at is not None and time.time() >= stop_at:
            print("quality: --stop-at reached; the remaining cells are left for the next run", flush=True)
            return True
        return False

    for task, contender, factor in grid_order(tasks, names):
        path = cell_path(out, task.name, contender.name, factor)
        if not force and cell_is_current(path, task, quick):
            continue
        if past_stop():
            return
        run_one_cell(task, contender, factor, out, cache, quick, isolate, threads)
    if not extend:
        return
    for task, contender in dict.fromkeys((t, c) for t, c, _ in grid_order(tasks, names)):
        while (factor := next_factor(task, read_cells(out, [task], quick)[task.name].get(contender.name, {}))):
            if past_stop():
                return
            run_one_cell(task, contender, factor, out, cache, quick, isolate, threads)


def run_one_cell(task: Task, contender: Contender, factor: float, out: Path, cache: Path, quick: bool, isolate: bool,
                 threads: int | None) -> None:
    """Run one cell (in its own process with ``isolate``) and add its wall time to its record."""
    path = cell_path(out, task.name, contender.name, factor)
    started = time.perf_counter()
    print(f"quality: {task.name} / {contender.name} @ {factor_tag(factor)} ...", end=" ", flush=True)
    if isolate:
        command = [sys.executable, str(SCRIPT), "--cell", task.name, contender.name, repr(factor), "--out", str(out),
                   "--cache", str(cache)] + (["--quick"] if quick else [])
        env = dict(os.environ)
        if threads is not None:
            command += ["--threads", str(threads)]
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            print("FAILED")
            raise SystemExit(f"quality: the cell {task.name}/{contender.name}@{factor_tag(factor)} failed:\n"
                             f"{done.stderr[-4000:]}")
    else:
        write_cell(out, run_cell(task, contender, cache, quick, factor))
    record = json.loads(path.read_text())
    # The whole cell as a user waits for it: interpreter start, imports, loading, init, steps, evals.
    record["wall_seconds"] = time.perf_counter() - started
    write_cell(out, record)
    final = record["curve"][-1].get(task.metric, float("nan"))
    print(f"lr {record['lr']:.3g}: {task.metric} {final:.4f}, {record['wall_seconds']:.0f} s", flush=True)


def canonical_factor(factor: float) -> float | None:
    """The entry of FACTORS equal to ``factor`` up to round-off (a ratio of two lrs), or None."""
    return next((f for f in FACTORS if math.isclose(f, factor, rel_tol=1e-6)), None)


def next_factor(task: Task, sweep: dict[float, dict]) -> float | None:
    """The point past the edge a contender needs (``--extend``): once its SWEEP cells are all finished, a
    factor 3 beyond the end of its points where its best cell sits, within FACTORS; None when its best is
    inside its points, at the end of FACTORS, or not decided yet."""
    if any(f not in sweep for f in SWEEP):
        return None
    best = best_cell(task, sweep)
    if best is None:
        return None
    points = sorted(sweep)
    if best["lr_factor"] == points[-1]:
        return canonical_factor(points[-1] * 3)
    if best["lr_factor"] == points[0]:
        return canonical_factor(points[0] / 3)
    return None


def conventional_lr(task: Task, contender: Contender, quick: bool) -> tuple[float, str] | None:
    """(the contender's conventional lr, how it is chosen) where it follows from the registry alone: a
    preset's ``LRConvention`` ratio times the task's base rate, full fine-tuning's tenth, PEFT's base. None
    for a composition, whose cap depends on the wrapped factors."""
    base = task_recipe(task, CACHE, quick).optimizer.lr
    if contender.kind == "full":
        return base * FULL_FT_RATIO, f"base_lr {base:.3g} · {FULL_FT_RATIO:g} (full fine-tuning)"
    if contender.kind == "peft":
        return base, f"base_lr {base:.3g} (LoRA)"
    config = resolve_config(contender.method, **{**dict(contender.options), **schedule_options(contender, 1000)})
    ratio, reason, composition = peftkit.lr.convention(config)
    if composition:
        return None
    return base * ratio, f"lr {base * ratio:.3g} = base_lr {base:.3g} · {ratio:g} ({reason})"


def rekey_cells(out: Path, tasks: list[Task], quick: bool = False) -> list[str]:
    """Re-file the cells of a contender whose convention changed since they ran: a cell's numbers depend on
    its recipe and its lr, not on how that lr was labelled, so a cell run at 3× an old convention of ratio 1
    is the 1× cell of a new ratio 3 (same lr, not run again). Each moved record keeps its lr, gets the new
    ``lr_factor``, ``lr_conventional`` and ``lr_convention`` and says where it came from (``rekeyed``).
    A cell whose lr lands on no point of FACTORS is moved aside to ``cells/<task>/stale/``, never reported.
    Returns one line per moved cell."""
    moved = []
    for task in tasks:
        fingerprint = recipe_fingerprint(task, quick)
        for contender in contenders_for(task):
            records = {path: record for path, record in _current_cells(out, task, contender, fingerprint).values()}
            current = conventional_lr(task, contender, quick) if records else None
            if current is None:
                continue
            conventional, how = current
            stale = {p: r for p,
                     r in records.items() if not math.isclose(r["lr_conventional"], conventional, rel_tol=1e-6)}
            if not stale:
                continue
            keep = {p for p in records if p not in stale}
            for path, record in stale.items():
                factor = canonical_factor(record["lr"] / conventional)
                target = cell_path(out, task.name, contender.name, factor) if factor is not None else None
                old = f"{factor_tag(record['lr_factor'])} of {record['lr_conventional']:.3g}"
                if target is None or target in keep:
                    target = path.parent / "stale" / path.name
                else:
                    record = {**record, "lr_factor": factor, "lr_conventional": conventional, "lr_convention": how,
                              "rekeyed": f"ran as {old} (an earlier convention); same lr and recipe, not rerun"}
                    keep.add(target)
                _atomic_write(target, json.dumps(record, indent=1))
                moved.append(f"{task.name}/{contender.name}: {path.name} -> "
                             f"{target.relative_to(out / 'cells' / task.name)}")
            for path in stale:
                if path not in keep:
                    path.unlink()
    return moved


def write_cell(out: Path, record: dict[str, Any]) -> None:
    _atomic_write(cell_path(out, record["task"], record["contender"], record["lr_factor"]),
                  json.dumps(record, indent=1))


def _current_cells(out: Path, task: Task, contender: Contender, fingerprint: str) -> dict[float, tuple[Path, dict]]:
    """{multiplier: (path, record)} of ``contender``'s readable cells on ``task`` made under the recipe whose
    fingerprint is given (a cell of another recipe is stale and left out)."""
    found = {}
    for factor in FACTORS:
        path = cell_path(out, task.name, contender.name, factor)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("recipe_fingerprint") == fingerprint:
            found[factor] = (path, record)
    return found


def read_cells(out: Path, tasks: list[Task], quick: bool = False) -> dict[str, dict[str, dict[float, dict]]]:
    """{task: {contender: {multiplier: record}}} of the finished cells of the current recipes, in the
    contenders' table order; stale cells (another recipe) and files of no known cell are left out."""
    cells: dict[str, dict[str, dict[float, dict]]] = {}
    for task in tasks:
        fingerprint = recipe_fingerprint(task, quick)
        cells[task.name] = {}
        for contender in contenders_for(task):
            sweep = {factor: record for factor,
                     (_, record) in _current_cells(out, task, contender, fingerprint).items()}
            if sweep:
                cells[task.name][contender.name] = sweep
    return cells


def missing_cells(tasks: list[Task],
                  cells: dict[str, dict[str, dict[float, dict]]]) -> list[tuple[Task, Contender, float]]:
    return [(t, c, f) for t, c, f in grid_order(tasks, None) if f not in cells[t.name].get(c.name, {})]


# ------------------------------------------------------------------------------------------ the report
