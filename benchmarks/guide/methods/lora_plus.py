"""lora-plus's part of the method guide: its spec's small-scale headline claim."""

from __future__ import annotations

from ..measures import Verdict, late_loss

ORDER = 2


def claims(pairs, better) -> list[Verdict]:
    out = []
    v = Verdict("lora-plus", "λ = 16 beats λ = 1 at equal η_A: lower loss at a fixed step budget")
    for task, (plus, lora) in pairs("lora-plus", "lora"):
        v.add(late_loss(plus) < late_loss(lora),
              f"{task.name}: late train loss {late_loss(plus):.4f} vs LoRA {late_loss(lora):.4f}")
    out.append(v)
    return out
