"""ElaLoRA and CoTo under two processes (torchrun, gloo on CPU, DDP with find_unused_parameters) equal one
process with the same global batch: every step's decisions (ElaLoRA masks, CoTo gates) agree across processes
and with the single process, and so do the final adapters and AdamW moments (≤ 1e-9).

The model runs in fp64: in fp32 the two runs differ by the all-reduce's summation order (~1e-7 relative),
which Adam's normalisation amplifies on near-zero gradient entries to ~3e-5 after 8 steps at lr 2e-2, for
plain LoRA as much as for these schedules (measured); fp64 makes the comparison tight.

This file is also the script torchrun runs (one launch for both methods); the test runs the same function
in-process for the single-process reference.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from multiproc import HANG_GUARD_S

STEPS = 8
GLOBAL_BATCH = 4
TARGETS = ["q_proj", "v_proj", "down_proj"]
OPTIONS = {
    "elalora": dict(r=4, alpha=8, capacity=8, t_init=1, t_final=1, delta_t=2, budget=2, k=2),
    "coto": dict(initial_p=0.3),
}


def run(method: str, rank: int, world: int) -> dict:
    """STEPS optimizer steps of ``method`` on the tiny Llama, this process's share of each global batch."""
    from helpers import make_batch, tiny_llama

    import peftkit
    from peftkit.inject import adapter_layers

    model = peftkit.wrap(tiny_llama(num_hidden_layers=4, dtype=torch.float64), method, targets=TARGETS,
                         **OPTIONS[method]).train()
    opt = peftkit.optimizer(model, lr=2e-2, weight_decay=0.01)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.3 * step))
    schedule = peftkit.callbacks(model, optimizer=opt)
    trained = model
    if world > 1:
        # Skipped (gated-off) adapters get no gradient: DDP must allow unused parameters.
        trained = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    schedule.on_train_begin_(STEPS)
    decisions = []
    share = GLOBAL_BATCH // world
    for step in range(1, STEPS + 1):
        batch = make_batch(model, batch_size=GLOBAL_BATCH, seq_len=8, seed=step)
        local = {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}
        loss = trained(**local).loss + peftkit.regularization_loss(model)
        loss.backward()
        opt.step()
        lr_scheduler.step()
        schedule.on_step(step, STEPS)
        opt.zero_grad(set_to_none=True)
        if method == "coto":
            decisions.append(tuple(schedule.gates))
        else:
            decisions.append(tuple(tuple(l.adapters["default"].lora_mask.tolist())
                                   for l in adapter_layers(model).values()))
    named = dict(model.named_parameters())
    params = {n: p.detach().clone() for n, p in named.items() if p.requires_grad}
    moments = {}
    for n, p in named.items():
        for key, value in opt.state.get(p, {}).items():
            moments[f"{n}.{key}"] = value.clone()
    return {"decisions": decisions, "params": params, "moments": moments,
            "history": getattr(schedule, "history", None)}


def main() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {method: run(method, rank, world) for method in OPTIONS}
    torch.save(results, Path(os.environ["PEFTKIT_TEST_OUT"]) / f"rank{rank}.pt")
    from multiproc import leave_process_group

    leave_process_group()


def test_two_processes_equal_one_process(tmp_path):
    from multiproc import run_distributed

    run_distributed(Path(__file__), 2, tmp_path, timeout=HANG_GUARD_S)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for method in OPTIONS:
        reference = run(method, 0, 1)
        two = ranks[0][method]
        assert ranks[1][method]["decisions"] == two["decisions"]  # identical on every process, every step
        assert two["decisions"] == reference["decisions"]
        if method == "coto":
            assert len(set(two["decisions"])) > 1 and any(not all(gates) for gates in two["decisions"])
        else:
            assert len(reference["history"]) == 2 and all(r["pruned"] for r in reference["history"])
            assert two["decisions"][-1] != two["decisions"][0]
        for table in ("params", "moments"):
            assert two[table].keys() == reference[table].keys() and two[table]
            for key, value in reference[table].items():
                torch.testing.assert_close(two[table][key], value, atol=1e-9, rtol=0, msg=f"{method}: {key}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
