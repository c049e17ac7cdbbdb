"""hydra's part of the method guide: its spec's small-scale headline claim and its hooks."""

from __future__ import annotations

import dataclasses

from ..measures import Verdict, _fmt_count, _fmt_metric, final_metric

ORDER = 11


def claims(pairs, better) -> list[Verdict]:
    out = []
    v = Verdict("hydra", "at least as good as LoRA at a similar parameter count")
    for task, (hydra, lora) in pairs("hydra", "lora"):
        v.add(better(task, final_metric(task, hydra), final_metric(task, lora)),
              f"{task.name}: {task.metric} {_fmt_metric(task, final_metric(task, hydra))} vs LoRA "
              f"{_fmt_metric(task, final_metric(task, lora))} ({_fmt_count(hydra['trainable'])} vs "
              f"{_fmt_count(lora['trainable'])} trainable)")
    out.append(v)
    return out


def contender(task, contender):
    """Hydra splits LoRA's rank between its branches (r_p + r_s = r, its paper's equal-budget comparison)."""
    if contender.name != "hydra" or contender.kind != "adapter":
        return contender
    return dataclasses.replace(contender, options=(("r", 4), ("sequential_r", 4)), note="r_p = r_s = 4")
