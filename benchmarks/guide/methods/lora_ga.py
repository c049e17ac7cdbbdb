"""lora-ga's part of the method guide: its spec's small-scale headline claim."""

from __future__ import annotations

from ..measures import Verdict, early_loss

ORDER = 3


def claims(pairs, better) -> list[Verdict]:
    out = []
    v = Verdict("lora-ga", "faster early convergence than LoRA (loss closer to full FT early on); each at its best lr")
    for task, (ga, lora, full) in pairs("lora-ga", "lora", "full"):
        v.add(early_loss(ga) < early_loss(lora), f"{task.name}: first-quarter train loss {early_loss(ga):.4f} vs LoRA "
              f"{early_loss(lora):.4f} (full FT {early_loss(full):.4f})")
    out.append(v)
    return out
