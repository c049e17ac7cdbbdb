"""lora-pro's part of the method guide: its spec's small-scale headline claim."""

from __future__ import annotations

from ..measures import Verdict, late_loss

ORDER = 9


def claims(pairs, better) -> list[Verdict]:
    out = []
    v = Verdict("lora-pro", "full FT ≤ LoRA-Pro < LoRA in loss at the same budget; each at its best lr")
    for task, (pro, lora, full) in pairs("lora-pro", "lora", "full"):
        v.add(late_loss(full) <= late_loss(pro) < late_loss(lora), f"{task.name}: late train loss full FT "
              f"{late_loss(full):.4f}, LoRA-Pro {late_loss(pro):.4f}, LoRA {late_loss(lora):.4f}")
    out.append(v)
    return out
