"""Two CPU processes (gloo, DDP) with half the global batch each end where one process with the whole batch
ends, for every pair optimizer (lora-pro.md test 7, loft.md pitfall 8, README §4.3): factors, the AdamW
tensor and every optimizer state tensor (moments, LoFT's old factors), after 3 steps, ≤ 1e-6.

In fp64: full-space Adam (LoRA-Pro full) normalises every element of the m×n direction, so an element of g̃
near 0 turns the all-reduce's rounding (about 1e-7 of the largest gradient in fp32) into an update change of
up to 1/ε times that rounding; measured 1.4e-5 on the factors in fp32, which is rounding, not a bug.

LoRA-Pro full shards its m×n moments by whole pairs across the processes: each of the 2 keeps exactly half of
the one-process moment bytes, and ``state_dict()`` gathers the whole state onto rank 0.

One ``torchrun`` launch covers all optimizers; the one-process reference runs inside the test. Run as a
script, this file is what each process executes.
"""

from __future__ import annotations

import os
import warnings

import torch
from multiproc import HANG_GUARD_S

CONFIGS = {
    "lora-pro-full": ("lora-pro", {"shard_moments": True}),
    "lora-pro-efficient": ("lora-pro", {"mode": "efficient"}),
    "loft": ("loft", {"max_grad_norm": 0.5}),
    "preconditioner": ("lora-one-preconditioner", {"weight_decay": 0.01}),
}
STEPS = 3
GLOBAL_BATCH = 4


def run(rank: int, world: int) -> dict[str, dict[str, torch.Tensor]]:
    """{config: {tensor name: value}} after STEPS steps on this process's share of each global batch."""
    from helpers import make_batch, randomize_adapters, tiny_llama

    import peftkit

    results = {}
    memory: dict[str, int] = {}
    for key, (name, options) in CONFIGS.items():
        model = tiny_llama(dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peftkit.wrap(model, "lora", r=4, alpha=8)
        randomize_adapters(model)
        model.model.norm.weight.requires_grad_(True)  # a non-pair tensor: AdamW inside the same optimizer
        model.train()
        opt = peftkit.optimizer(model, 1e-2, name=name, **options)
        trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        for step in range(STEPS):
            batch = make_batch(model, batch_size=GLOBAL_BATCH, seed=10 + step)
            share = {k: v.chunk(world)[rank] for k, v in batch.items()}
            trained(**share).loss.backward()  # DDP averages the gradients over the processes
            opt.step()
            opt.zero_grad(set_to_none=True)
        out = {f"param/{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        # Bytes of state this process keeps for the (A, B) pairs (LoRA-Pro full: the m×n moments).
        memory[key] = sum(v.numel() * v.element_size() for pair in opt.pairs for t in (pair.a, pair.b)
                          for v in opt.state.get(t, {}).values() if isinstance(v, torch.Tensor))
        for index, state in opt.state_dict()["state"].items():
            for field, value in state.items():
                out[f"state/{index}/{field}"] = value.detach().clone()
        results[key] = out
    results["memory"] = {key: torch.tensor(value) for key, value in memory.items()}
    return results


def test_two_processes_equal_one(tmp_path):
    from multiproc import REPO, run_distributed

    run_distributed(REPO / "tests" / "test_optim_distributed.py", 2, tmp_path, timeout=HANG_GUARD_S)
    reference = run(0, 1)
    reference_memory = reference.pop("memory")
    memory = []
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        memory.append(got.pop("memory"))
        assert got.keys() == reference.keys()
        for key, tensors in reference.items():
            if rank == 1 and key == "lora-pro-full":
                # Sharded moments: state_dict() gathers the whole state onto rank 0 only; rank 1 holds its pairs.
                tensors = {name: value for name, value in tensors.items() if name.startswith("param/")}
                got[key] = {name: value for name, value in got[key].items() if name.startswith("param/")}
            assert got[key].keys() == tensors.keys(), key
            assert any(name.endswith("/partner_old") for name in tensors) == (key == "loft")
            for name, value in tensors.items():
                torch.testing.assert_close(got[key][name], value, atol=1e-6, rtol=1e-6,
                                           msg=f"{key} {name} (rank {rank})")
    # LoRA-Pro full's moments are sharded by whole pairs: each of 2 processes holds half of them (the tiny
    # Llama's pairs split evenly); the other pair optimizers keep small state and are not sharded.
    full = int(reference_memory["lora-pro-full"])
    assert [int(m["lora-pro-full"]) for m in memory] == [full // 2, full // 2]
    for key in ("lora-pro-efficient", "loft", "preconditioner"):
        assert [int(m[key]) for m in memory] == [int(reference_memory[key])] * 2


if __name__ == "__main__":
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = run(dist.get_rank(), dist.get_world_size())
    torch.save(results, os.path.join(os.environ["PEFTKIT_TEST_OUT"], f"rank{dist.get_rank()}.pt"))
    from multiproc import leave_process_group

    leave_process_group()
