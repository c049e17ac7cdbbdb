"""lora-one's part of the method guide: its spec's small-scale headline claim."""

from __future__ import annotations

from ..measures import Verdict, _mean, late_loss

ORDER = 4


def claims(pairs, better) -> list[Verdict]:
    out = []
    v = Verdict("lora-one", "below LoRA at a fixed budget; its preconditioner speeds convergence further")
    for task, (one, lora, pre) in pairs("lora-one", "lora", "lora-one+preconditioner"):
        v.add(late_loss(one) < late_loss(lora) and _mean(pre["train_loss"]) < _mean(one["train_loss"]),
              f"{task.name}: late train loss {late_loss(one):.4f} vs LoRA {late_loss(lora):.4f}; "
              f"mean loss over the run "
              f"with the preconditioner {_mean(pre['train_loss']):.4f} vs without {_mean(one['train_loss']):.4f}")
    out.append(v)
    return out
