"""olora's part of the method guide: its paper's headline claim (faster convergence than LoRA)."""

from __future__ import annotations

from ..measures import Verdict, early_loss

ORDER = 15


def claims(pairs, better) -> list[Verdict]:
    v = Verdict("olora", "faster convergence than LoRA (lower early train loss); each at its best lr")
    for task, (olora, lora) in pairs("olora", "lora"):
        v.add(early_loss(olora) < early_loss(lora),
              f"{task.name}: first-quarter train loss {early_loss(olora):.4f} vs LoRA {early_loss(lora):.4f}")
    return [v]
