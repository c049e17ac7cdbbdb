"""Sharded loading (peftkit.sharded) under torchrun: each process reads only its shard of a pretrained folder.

    torchrun --nproc-per-node N tests/sharded_load.py FOLDER ROOT

For each engine (fsdp2, zero3): rank 0 saves ``ROOT/<engine>/shards.pt`` (every parameter's local shard as this
process holds it, with the rows or flat range it covers, and the bytes of base weights held), and every config
of :data:`CONFIGS` is trained by the CLI's loop from the folder (``model.name``) into ``ROOT/<engine>/<config>``.
The ``lora`` run is then resumed for one more step (``ROOT/<engine>/lora-resumed``), and rank 0 writes
``ROOT/<engine>/gathers.json``: how many all-gathers each phase ran (checkpoint saves, the checkpoint load of the
resume, the adapter export, and the training steps as the positive control).
With N = 1 the same runs are the one-process reference (under ``ddp``).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

# lora-ga-weight reads the base weight in its init (σ(W) scale, max|W| clip): after sharding, a gathered read.
CONFIGS = {"lora": {"method": "lora"}, "lora-ga": {"method": "lora-ga"}, "eva": {"method": "eva"},
           "lora-ga-weight": {"method": "lora-ga", "scale": "weightS", "norm_clip": True}}
STEPS = 2


def recipe(folder: Path, out: Path, config: str, engine: str, batch: int) -> dict:
    from train_fixtures import llama_text_recipe

    result = llama_text_recipe(out, training__batch_size=batch, training__max_steps=STEPS, training__save_every=1,
                               training__distributed=engine, training__warmup=0, training__eval_every=STEPS,
                               training__eval_batch_size=3)
    result["model"] = {"name": str(folder), "tokenizer": "bytes", "task": "causal-lm", "dtype": "float32"}
    result["adapter"] = {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"], **CONFIGS[config]}
    result["training"]["output_dir"] = str(out / "run")
    return result


def local_shards(model: torch.nn.Module) -> dict:
    """{name: (kind, local tensor, start, stop)}: rows [start, stop) of an FSDP2 shard; flat elements [start,
    stop) of a ZeRO-3 partition."""
    from peftkit import distributed

    world, rank = distributed.world_size(), distributed.rank()
    found = {}
    for name, param in model.named_parameters():
        if hasattr(param, "ds_tensor"):
            size = param.ds_tensor.ds_numel if hasattr(param.ds_tensor, "ds_numel") else param.ds_tensor.numel()
            start, stop = min(rank * size, param.ds_numel), min((rank + 1) * size, param.ds_numel)
            found[name] = ("flat", param.ds_tensor.detach()[:stop - start].clone(), start, stop)
        else:
            local = param.to_local()
            start = min(rank * math.ceil(param.shape[0] / world), param.shape[0])
            found[name] = ("rows", local.detach().clone(), start, start + local.shape[0])
    return found


class GatherCounter:
    """Counts the all-gathers the engines run (FSDP2's ``foreach_all_gather``, DeepSpeed's all-gather entry
    points: every ZeRO-3 gather of a partitioned weight goes through one of them), per phase: the phase is the
    outermost wrapped function on the stack (:meth:`count_in`), and "steps" is everything else."""

    def __init__(self) -> None:
        import deepspeed.comm as ds_comm
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group

        self.counts: dict[str, int] = {}
        self.phase = "steps"
        self._wrap(_fsdp_param_group, "foreach_all_gather")
        for name in ("allgather_fn", "all_gather_into_tensor", "all_gather"):
            self._wrap(ds_comm, name)

    def _wrap(self, owner, name: str) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.counts[self.phase] = self.counts.get(self.phase, 0) + 1
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    def count_in(self, owner, name: str, phase: str) -> None:
        original = getattr(owner, name)

        def in_phase(*args, **kwargs):
            outer, self.phase = self.phase, phase if self.phase == "steps" else self.phase
            try:
                return original(*args, **kwargs)
            finally:
                self.phase = outer

        setattr(owner, name, in_phase)


def main(folder: Path, root: Path) -> None:
    from accelerate import Accelerator, PartialState

    from peftkit import distributed, sharded
    from peftkit.train import from_dict, train

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    PartialState(cpu=processes > 1 and not torch.cuda.is_available())  # the process group (gloo on CPU)
    # Many runs share this launch's process group; Accelerate's end_training would destroy it after the first.
    Accelerator.end_training = lambda self: [tracker.finish() for tracker in self.trackers] and None
    engines = ["ddp"] if processes == 1 else ["fsdp2", "zero3"]
    counter = None
    if processes > 1:
        import json

        import peftkit
        from peftkit.train import checkpointing

        counter = GatherCounter()
        counter.count_in(checkpointing, "save", "save")
        counter.count_in(checkpointing, "load", "resume load")
        counter.count_in(peftkit, "save", "adapter export")
    for engine in engines:
        if processes > 1:
            model = sharded.from_pretrained(str(folder), engine=engine)
            shards = {"shards": local_shards(model), "held": sharded.held_base_bytes(model)}
            if distributed.rank() == 0:
                (root / engine).mkdir(parents=True, exist_ok=True)
                torch.save(shards, root / engine / "shards.pt")
            del model
        for config in CONFIGS:
            out = root / engine / config
            assert train(from_dict(recipe(folder, out, config, engine, 4 // processes))).status == "done"
        if counter is not None:
            # Resume the lora run for one more step: the base is loaded sharded again, the checkpoint's tensors
            # are the adapters' and the optimizer's only.
            import shutil

            resumed = root / engine / "lora-resumed"
            if distributed.rank() == 0:
                shutil.copytree(root / engine / "lora", resumed)
            torch.distributed.barrier()
            again = recipe(folder, resumed, "lora", engine, 4 // processes)
            again["training"]["max_steps"] = STEPS + 1
            counter.counts.clear()
            assert train(from_dict(again), resume=True).status == "done"
            if distributed.rank() == 0:
                (root / engine / "gathers.json").write_text(json.dumps(counter.counts))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
