"""lora's part of the method guide: its spec's small-scale headline claim and its hooks."""

from __future__ import annotations

from ..measures import Verdict, _fmt_metric, drop_half, final_metric

ORDER = 1


def claims(pairs, better) -> list[Verdict]:
    out = []
    v = Verdict("lora", "same quality as PEFT's LoRA on the same data, at least PEFT's speed (exact parity: tests)")
    for task, (ours, theirs) in pairs("lora", "peft-lora"):
        gap = final_metric(task, ours) - final_metric(task, theirs)
        speed = ours["step_seconds"] / theirs["step_seconds"]
        v.add(abs(gap) <= 0.02 and speed <= 1.05,
              f"{task.name}: {task.metric} {_fmt_metric(task, final_metric(task, ours))} vs "
              f"{_fmt_metric(task, final_metric(task, theirs))}, step time {speed:.2f}× PEFT")
    out.append(v)
    return out


def analyse(run) -> dict:
    """Robustness to dropping adapters, the reference for CoTo's claim."""
    return drop_half(run.names, run.metric_with) if run.contender.name == "lora" else {}
