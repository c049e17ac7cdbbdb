"""DoRA wrapped by ``peftkit.wrap`` and then sharded by the user's own engine from Python, outside ``peftkit train``:
the calls Accelerate's plugins make in ``accelerator.prepare`` (and so transformers' Trainer and TRL): FSDP2's
``fully_shard`` on the wrap policy's units and the root; DeepSpeed's ``deepspeed.initialize`` with the user's
optimizer, then the engine's forward, backward and step. (Accelerate itself runs neither plugin on a machine
without GPUs: it picks MULTI_CPU there, so the calls are made here directly.)

    torchrun --nproc-per-node N tests/dora_user_sharded.py MODE[,MODE...]

MODE: ``fsdp2-blocks`` (the transformer policy: a decoder layer is a unit, so the base weight is whole in DoRA's
forward), ``fsdp2-linears`` (a size-based policy that makes every base linear layer its own unit: DoRA finds a
DTensor shard after the base layer's forward and gathers it), ``zero3`` (DeepSpeed's engine forward gathers a
partitioned weight when a module reads it); ``none`` (one process, no engine: the reference). Rank 0 saves
``<MODE>.pt`` under ``PEFTKIT_TEST_OUT``: the losses of STEPS steps, every DoRA tensor after them (gathered whole),
and how many parameters the engine held as shards at rest. ``MODE+loaded`` first saves the adapter and reads it
back with ``peftkit.load`` into a fresh model (the other way to a DoRA model); ``MODE+dropout``: adapter dropout
0.2 in training, where DoRA computes x·Wᵀ again from the dropped input with the weight it read (run in one process,
where every mode draws the same masks). N processes read N equal slices of the same global batch of equal-length
rows (every token a target), so the mean of the processes' losses is the one-process loss: the claim here is DoRA's
norm under sharding, not the loss weighting (tests/sharded_grid.py covers that).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

STEPS = 3
GLOBAL_BATCH = 4


def run(mode: str) -> dict:
    import torch.distributed as dist
    from helpers import make_batch, tiny_llama

    import peftkit
    from peftkit.gather import held_as_shard

    mode, *flags = mode.split("+")
    torch.manual_seed(0)  # the dropout masks: every mode draws the same ones in one process
    model = tiny_llama(seed=1).train()
    peftkit.wrap(model, "dora", r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"],
                 dropout=0.2 if "dropout" in flags else 0.0)
    with torch.no_grad():  # B ≠ 0 from the start, so the norm depends on B·A at every step
        gen = torch.Generator().manual_seed(2)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    world, rank = dist.get_world_size(), dist.get_rank()
    if "loaded" in flags:  # the same adapter, saved and read back by peftkit.load into a fresh model
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            peftkit.save(model, folder)
            model = peftkit.load(tiny_llama(seed=1).train(), folder, trainable=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    engine = None
    if mode.startswith("fsdp2"):
        # Accelerate's FSDP2 plugin (fsdp2_prepare_model) calls fully_shard on the modules its wrap policy picks,
        # children first, then on the root; adapters are sharded with the rest (no ignored params).
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from peftkit.inject import adapter_layers

        mesh = init_device_mesh("cpu", (world,))
        if mode == "fsdp2-linears":  # a size-based policy that picks each base linear layer (not the small factors)
            for layer in adapter_layers(model).values():
                fully_shard(layer.base_layer, mesh=mesh)
        for block in model.model.layers:  # the transformer policy's units
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # fully_shard replaced the parameters by DTensor ones: the optimizer takes those (Accelerate swaps them in)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    elif mode == "zero3":
        # Accelerate's DeepSpeed plugin hands the model and optimizer to deepspeed.initialize and then calls the
        # engine's forward, backward and step.
        from peftkit.train.engines import _import_deepspeed

        deepspeed = _import_deepspeed()  # DeepSpeed's CPU accelerator, without its JIT-built kernel
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config={
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
            "zero_allow_untested_optimizer": True, "bf16": {"enabled": False}, "fp16": {"enabled": False}})
    sharded = sum(held_as_shard(p) is not None for p in model.parameters())  # at rest, outside any forward
    losses = []
    for step in range(STEPS):
        batch = make_batch(model, batch_size=GLOBAL_BATCH, seq_len=8, seed=10 + step)
        part = GLOBAL_BATCH // world
        batch = {k: v[rank * part:(rank + 1) * part] for k, v in batch.items()}
        if engine is not None:
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
        else:
            loss = model(**batch).loss
            loss.backward()
            if mode == "none" and world > 1:
                raise SystemExit("mode none is the one-process reference")
            optimizer.step()
            optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    return {"losses": losses, "tensors": whole_dora_tensors(model, mode), "initial": initial, "sharded": sharded,
            "world": world}


def whole_dora_tensors(model, mode: str) -> dict[str, torch.Tensor]:
    """Every DoRA tensor (lora_A, lora_B, lora_magnitude_vector) whole, keyed by its name in the unwrapped model."""
    import contextlib

    module = getattr(model, "module", model)  # DeepSpeed's engine wraps the model
    params = {n: p for n, p in module.named_parameters() if "lora_" in n}
    gather = contextlib.nullcontext()
    if mode == "zero3":
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(params.values()))
    with gather:
        return {n.replace("_fsdp_wrapped_module.", ""): (p.full_tensor() if hasattr(p, "full_tensor") else p)
                .detach().clone() for n, p in params.items()}


if __name__ == "__main__":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    out = Path(os.environ.get("PEFTKIT_TEST_OUT", "."))
    for mode in sys.argv[1].split(","):
        result = run(mode)
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(result, out / f"{mode}.pt")
    from multiproc import leave_process_group

    leave_process_group()
