"""dora's part of the method guide: the paper's headline claim at small scale (DoRA over LoRA at equal rank)."""

from __future__ import annotations

from ..measures import Verdict, late_loss

ORDER = 12


def claims(pairs, better) -> list[Verdict]:
    v = Verdict("dora", "beats LoRA at the same rank: lower late train loss, each at its best lr")
    for task, (dora, lora) in pairs("dora", "lora"):
        v.add(late_loss(dora) < late_loss(lora),
              f"{task.name}: late train loss {late_loss(dora):.4f} vs LoRA {late_loss(lora):.4f}")
    return [v]
