"""eva's part of the method guide: its spec's small-scale headline claim and its hooks."""

from __future__ import annotations

import dataclasses

from ..measures import Verdict, early_loss

ORDER = 5


def claims(pairs, better) -> list[Verdict]:
    out = []
    v = Verdict("eva", "lower training loss than LoRA early on; ranks redistributed (non-uniform)")
    for task, (eva, lora) in pairs("eva", "lora"):
        ranks = list(eva["analysis"].get("ranks", {}).values())
        spread = f"ranks {min(ranks)}–{max(ranks)} over {len(ranks)} layers" if ranks else "no ranks"
        v.add(early_loss(eva) < early_loss(lora) and len(set(ranks)) > 1,
              f"{task.name}: first-quarter train loss {early_loss(eva):.4f} vs LoRA {early_loss(lora):.4f}; {spread}")
    out.append(v)
    return out


def contender(task, contender):
    """EVA's default label mask keeps only the answer tokens: on instruction data a few per batch, fewer than the
    r·ρ components it estimates. Its authors' recipe keeps every token (use_label_mask false); so do we, for
    every contender whose init is EVA."""
    if task.kind != "instruction" or not (contender.method == "eva" or ("init", "eva") in contender.options):
        return contender
    return dataclasses.replace(contender, options=contender.options + (("use_label_mask", False),), note="all tokens")


def analyse(run) -> dict:
    """The ranks EVA gave each layer."""
    if run.axes[0] == "lora" and run.axes[1] == "eva":
        return {"ranks": {n: int(run.layers[n].ranks["default"]) for n in run.names}}
    return {}
