"""elalora's part of the method guide: its spec's small-scale headline claim and its hooks."""

from __future__ import annotations

from ..measures import Verdict, _fmt_metric

ORDER = 7


def claims(pairs, better) -> list[Verdict]:
    out = []
    v = Verdict("elalora",
                "a non-uniform rank distribution at constant total rank; removing high-rank layers hurts more")
    for (task, (ela,)) in pairs("elalora"):
        a = ela["analysis"]
        ranks = list(a["ranks"].values())
        low, high = a["metric_without_lowest_rank_quarter"], a["metric_without_highest_rank_quarter"]
        # Strictly: a tie is no evidence that the high-rank layers matter more.
        v.add(len(set(ranks)) > 1 and (low > high if task.higher_is_better else low < high),
              f"{task.name}: ranks {min(ranks)}–{max(ranks)} (total {sum(ranks)} over {len(ranks)} layers); "
              f"{task.metric} without the lowest-rank quarter {_fmt_metric(task, low)}, "
              f"without the highest {_fmt_metric(task, high)}")
    out.append(v)
    return out


def schedule_options(config, total_steps: int) -> dict:
    """ElaLoRA's phases are step counts: its recipe's (t_init 300, t_final 400, delta_t 50 of 1150 steps)
    scaled to this budget, so the ranks move during the run as they do in the paper's."""
    if config.schedule != "elalora":
        return {}
    return {"t_init": max(1, round(total_steps * 300 / 1150)), "t_final": max(1, round(total_steps * 400 / 1150)),
            "delta_t": max(1, round(total_steps * 50 / 1150))}


def analyse(run) -> dict:
    """The final ranks, and the metric without the lowest-rank and without the highest-rank quarter of layers."""
    if run.axes[0] != "elalora":
        return {}
    ranks = {n: int(run.layers[n].adapters["default"].lora_mask.sum()) for n in run.names}
    by_rank = sorted(run.names, key=lambda n: (ranks[n], n))
    quarter = max(1, len(run.names) // 4)
    return {"ranks": ranks, "metric_without_lowest_rank_quarter": run.metric_with(by_rank[:quarter]),
            "metric_without_highest_rank_quarter": run.metric_with(by_rank[-quarter:])}
