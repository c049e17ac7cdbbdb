"""pissa's part of the method guide: its paper's headline claim (faster convergence and a better result than LoRA
under identical setups)."""

from __future__ import annotations

from ..measures import Verdict, _fmt_metric, early_loss, final_metric

ORDER = 13


def claims(pairs, better) -> list[Verdict]:
    v = Verdict("pissa", "faster convergence than LoRA and at least its final metric; each at its best lr")
    for task, (pissa, lora) in pairs("pissa", "lora"):
        ours, theirs = final_metric(task, pissa), final_metric(task, lora)
        v.add(early_loss(pissa) < early_loss(lora) and better(task, ours, theirs),
              f"{task.name}: first-quarter train loss {early_loss(pissa):.4f} vs LoRA {early_loss(lora):.4f}; "
              f"{task.metric} {_fmt_metric(task, ours)} vs LoRA {_fmt_metric(task, theirs)}")
    return [v]
