"""hra's part of the method guide: its spec's small-scale headline claim."""

from __future__ import annotations

from ..measures import Verdict, _fmt_count, _fmt_metric, final_metric

ORDER = 6


def claims(pairs, better) -> list[Verdict]:
    out = []
    v = Verdict("hra", "less forgetting than LoRA r = 4 (same parameter count) at no worse task quality")
    for task, (hra, lora4) in pairs("hra", "lora-r4"):
        forget = {n: r["analysis"]["general_loss_after"] - r["analysis"]["general_loss_before"] for n, r in
                  (("hra", hra), ("lora", lora4))}
        m_hra, m_lora = final_metric(task, hra), final_metric(task, lora4)
        # "At similar task quality" guards against forgetting less by learning less: HRA may not be worse than
        # LoRA r = 4 by more than 5 % (perplexity) or 5 points (accuracy, exact match); better is allowed.
        if task.metric == "perplexity":
            not_worse = m_hra <= 1.05 * m_lora
        else:
            not_worse = m_hra >= m_lora - 0.05
        v.add(forget["hra"] < forget["lora"] and not_worse,
              f"{task.name}: general-text loss change {forget['hra']:+.4f} vs LoRA r=4 {forget['lora']:+.4f}; "
              f"{task.metric} {_fmt_metric(task, m_hra)} vs {_fmt_metric(task, m_lora)} "
              f"({_fmt_count(hra['trainable'])} vs {_fmt_count(lora4['trainable'])} trainable)")
    out.append(v)
    return out
