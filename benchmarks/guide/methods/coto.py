"""coto's part of the method guide: its spec's small-scale headline claim and its hooks."""

from __future__ import annotations

import math

from ..measures import Verdict, _mean, drop_half, retained

ORDER = 8


def claims(pairs, better) -> list[Verdict]:
    out = []
    v = Verdict("coto", "more robust than LoRA when half of the adapters are dropped")
    for task, (coto, lora) in pairs("coto", "lora"):
        if coto["analysis"].get("drop_check") != "active_adapters":
            # Switched off through gated_off, which CoTo's eval-mode hook reopens: the check did not happen.
            v.skip(f"{task.name}: not checked (this cell predates the fix of the drop check; rerun it with "
                   "--force --contenders coto)")
            continue
        ours, theirs = retained(task, coto), retained(task, lora)
        if math.isnan(ours) or math.isnan(theirs):
            zero = "CoTo's" if math.isnan(ours) else "LoRA's"
            v.skip(f"{task.name}: not checked ({zero} final {task.metric} is 0: there is nothing to keep)")
            continue
        v.add(ours > theirs, f"{task.name}: keeps {100 * ours:.1f} % of its {task.metric} vs LoRA {100 * theirs:.1f} %")
    out.append(v)
    v = Verdict("coto", "stage 1 (adapters switched off at random) costs less time per step than LoRA")
    for task, (coto, lora) in pairs("coto", "lora"):
        stage1 = max(2, round(coto["analysis"].get("stage1_ratio", 0.0) * coto["steps"]))
        mine, theirs = _mean(coto["step_seconds_all"][1:stage1]), _mean(lora["step_seconds_all"][1:stage1])
        v.add(mine < theirs, f"{task.name}: {mine / theirs:.2f}× LoRA's step time over steps 2–{stage1}")
    out.append(v)
    return out


def analyse(run) -> dict:
    """Robustness to dropping adapters; and how long stage 1 lasts (of any contender with CoTo's schedule)."""
    out = drop_half(run.names, run.metric_with) if run.contender.name == "coto" else {}
    if run.schedule is not None and hasattr(run.schedule, "stage1_ratio"):
        out["stage1_ratio"] = float(run.schedule.stage1_ratio)
    return out
