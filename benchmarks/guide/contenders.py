"""The contenders of the guide: every registered method (as each method's module of :mod:`guide.methods`
adjusts it), full fine-tuning, cross-axis compositions, and PEFT's LoRA or LoRA at r = 4 as references."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import peftkit
from peftkit.config import resolve_config

from .methods import method_modules
from .tasks import Task


@dataclass(frozen=True)
class Contender:
    """One column of the guide: ``kind`` "adapter" (peftkit.wrap(method, **options)), "full" or "peft"."""

    name: str
    label: str
    kind: str = "adapter"
    method: str = "lora"
    options: tuple = ()  # (key, value) pairs for peftkit.wrap
    optimizer_options: tuple = ()
    note: str = ""


COMPOSITIONS = [
    Contender("eva+coto+lora-pro", "EVA init + CoTo + LoRA-Pro", method="lora",
              options=(("init", "eva"), ("schedule", "coto"), ("optimizer", "lora-pro"))),
    Contender("lora-ga+lora-plus", "LoRA-GA init + LoRA+", method="lora-ga", options=(("optimizer", "lora-plus"),)),
    Contender("lora-one+preconditioner", "LoRA-One + its preconditioner", method="lora-one",
              options=(("optimizer", "lora-one-preconditioner"),)),
]


def contenders_for(task: Task) -> list[Contender]:
    """The contenders of ``task``, in the guide's column order. A method's module may adjust any contender
    (``contender(task, contender)``: Hydra's equal-budget ranks, EVA's label mask on instruction data)."""
    out = [Contender(name, name, method=name) for name in peftkit.methods()]
    out.append(Contender("full", "full fine-tuning", kind="full"))
    out += COMPOSITIONS
    for method in method_modules():
        adjust = getattr(method, "contender", None)
        if adjust is not None:
            out = [adjust(task, c) for c in out]
    if task.kind == "classification":
        out.append(Contender("peft-lora", "PEFT 0.21.2 LoRA", kind="peft"))
    else:
        out.append(Contender("lora-r4", "LoRA r = 4", options=(("r", 4), ("alpha", 4))))
    return out


def schedule_options(contender: Contender, total_steps: int) -> dict[str, Any]:
    """Schedule options that depend on the run's step budget, from the method modules' ``schedule_options``
    hooks (ElaLoRA's phases are step counts); {} for most."""
    config = resolve_config(contender.method, **dict(contender.options))
    out: dict[str, Any] = {}
    for method in method_modules():
        hook = getattr(method, "schedule_options", None)
        if hook is not None:
            out.update(hook(config, total_steps))
    return out
