"""dora's part of the method guide: the paper's headline claim at small scale. Its abstract's claim is a better
downstream result than LoRA at the same rank; its analysis adds that the magnitude/direction split learns more like
full fine-tuning, which at this scale reads as a lower late train loss. Two rows, so one can hold without the other."""

from __future__ import annotations

from ..measures import Verdict, _fmt_metric, final_metric, late_loss

ORDER = 12


def claims(pairs, better) -> list[Verdict]:
    metric = Verdict("dora", "at least LoRA's final metric at the same rank; each at its best lr")
    loss = Verdict("dora", "lower late train loss than LoRA at the same rank (learns closer to full FT); each at "
                   "its best lr")
    for task, (dora, lora) in pairs("dora", "lora"):
        ours, theirs = final_metric(task, dora), final_metric(task, lora)
        metric.add(better(task, ours, theirs), f"{task.name}: {task.metric} {_fmt_metric(task, ours)} vs LoRA "
                   f"{_fmt_metric(task, theirs)}")
        loss.add(late_loss(dora) < late_loss(lora),
                 f"{task.name}: late train loss {late_loss(dora):.4f} vs LoRA {late_loss(lora):.4f}")
    return [metric, loss]
