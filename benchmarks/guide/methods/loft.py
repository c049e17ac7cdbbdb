"""loft's part of the method guide: its spec's small-scale headline claim."""

from __future__ import annotations

from ..measures import Verdict, late_loss

ORDER = 10


def claims(pairs, better) -> list[Verdict]:
    out = []
    v = Verdict("loft", "closer to full fine-tuning than LoRA: lower loss than LoRA; each at its best lr")
    for task, (loft, lora, full) in pairs("loft", "lora", "full"):
        v.add(late_loss(loft) < late_loss(lora), f"{task.name}: late train loss LoFT {late_loss(loft):.4f}, LoRA "
              f"{late_loss(lora):.4f} (full FT {late_loss(full):.4f})")
    out.append(v)
    return out
