"""milora's part of the method guide: its paper's headline claim (a better result than LoRA and PiSSA at LoRA's
settings)."""

from __future__ import annotations

from ..measures import Verdict, _fmt_metric, final_metric

ORDER = 14


def claims(pairs, better) -> list[Verdict]:
    v = Verdict("milora", "at least LoRA's and PiSSA's final metric; each at its best lr")
    for task, (milora, lora, pissa) in pairs("milora", "lora", "pissa"):
        ours, theirs, pissa_metric = (final_metric(task, r) for r in (milora, lora, pissa))
        v.add(better(task, ours, theirs) and better(task, ours, pissa_metric),
              f"{task.name}: {task.metric} {_fmt_metric(task, ours)} vs LoRA {_fmt_metric(task, theirs)}, "
              f"PiSSA {_fmt_metric(task, pissa_metric)}")
    return [v]
