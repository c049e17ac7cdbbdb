"""milora's part of the method guide: its paper's headline claim (a better result than LoRA and PiSSA at LoRA's
settings)."""

from __future__ import annotations

from ..measures import Verdict, final_metric

ORDER = 14


def claims(pairs, better) -> list[Verdict]:
    v = Verdict("milora", "at least LoRA's and PiSSA's final metric; each at its best lr")
    for task, (milora, lora, pissa) in pairs("milora", "lora", "pissa"):
        ours = final_metric(task, milora)
        v.add(better(task, ours, final_metric(task, lora)) and better(task, ours, final_metric(task, pissa)),
              f"{task.name}: final {ours:.4f} vs LoRA {final_metric(task, lora):.4f}, PiSSA "
              f"{final_metric(task, pissa):.4f}")
    return [v]
