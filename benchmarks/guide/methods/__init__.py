"""Each method's part of the guide, one module per method, found here by name (a new method adds a module; the
guide's code stays as it is). A module declares:

- ``ORDER``: its place in the claims table (the order the methods were published in the specs);
- ``claims(pairs, better) -> list[Verdict]``: its spec's small-scale headline claim, checked per task on the best
  cells (``pairs("a", "b")`` yields ``(task, [record_a, record_b])`` for every task where all of them finished;
  ``better(task, x, y)``: x at least as good as y in the task's metric);

and, where the method needs one, a hook: ``contender(task, contender) -> Contender`` (adjust a contender: a rank
budget, an option for some data), ``schedule_options(config, total_steps) -> dict`` (options that scale with the
budget), ``analyse(run) -> dict`` (what its claim reads beyond the curves; ``run``: :class:`guide.cell.Analysis`).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from types import ModuleType


@functools.lru_cache(maxsize=None)
def _discovered() -> tuple[ModuleType, ...]:
    found = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)]
    return tuple(sorted(found, key=lambda module: (getattr(module, "ORDER", 1_000), module.__name__)))


def method_modules() -> tuple[ModuleType, ...]:
    """The method modules, in ``ORDER``."""
    return _discovered()
