"""The sharded-engine grid: every registered method and the method guide's three compositions, trained by the
CLI's loop (``peftkit.train.train``) one after another in ONE launch (a launch costs more than a run).

    torchrun --nproc-per-node 2 tests/sharded_grid.py ENGINE[,ENGINE...] BATCH ACCUM ROOT [resume]

With several engines (``fsdp2,zero2,zero3``: one launch for all of them, the imports are paid once), each
engine's runs go under ``ROOT/<engine>``; with one, under ``ROOT``. Each config writes ``ROOT/<config>/run``
(adapter, metrics, checkpoints at every step) and rank 0 writes
``ROOT/<config>/init.safetensors`` (the trainable tensors before step 1, for the "every tensor moved" check)
and ``init.json`` (which of them train). With ``resume``, the SIGTERM configs are also run twice more: stopped by
SIGTERM after step 2 (each process signals itself, as a scheduler's kill does), then ``--resume``d to the end.
The data is instruction data whose answers differ in length, with response-only labels
(``train_fixtures.llama_chat_recipe``): micro-batches and processes hold different numbers of target tokens,
so only a loss that is the mean over the global batch's target tokens makes the splits agree. ACCUM is
``training.grad_accum``. The test (tests/test_train_sharded.py) runs the same configs in one process at batch
2·BATCH·ACCUM (no accumulation) as the reference, and at batch 1 with accumulation 4.
With several engines the launch starts with :func:`write_failure` (rank 0 cannot write a checkpoint).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

TARGETS = ["q_proj", "v_proj", "down_proj"]
STEPS = 3
# name: (adapter section, optimizer section); small settings that still exercise each method's machinery
# (ElaLoRA prunes and grows at every step from step 1; CoTo with p₀ = 0.6 and seed 3 has both blocks on for
# steps 1-2, so every tensor has moved after 2 steps, and switches block 1 off at step 3).
CONFIGS: dict[str, tuple[dict, dict]] = {
    "lora": ({"method": "lora"}, {}),
    "lora-plus": ({"method": "lora-plus"}, {}),
    "lora-ga": ({"method": "lora-ga"}, {}),
    "lora-one": ({"method": "lora-one"}, {}),
    "lora-pro-full": ({"method": "lora-pro"}, {}),
    "lora-pro-efficient": ({"method": "lora-pro"}, {"mode": "efficient", "eps": 1e-3}),  # eps: see below
    "eva": ({"method": "eva"}, {}),
    "hra": ({"method": "hra"}, {}),
    "elalora": ({"method": "elalora", "capacity": 8, "t_init": 1, "t_final": 1, "delta_t": 1, "budget": 2, "k": 2}, {}),
    "coto": ({"method": "coto", "initial_p": 0.6, "seed": 3}, {}),
    "loft": ({"method": "loft"}, {}),
    "hydra": ({"method": "hydra"}, {}),
    "pissa": ({"method": "pissa"}, {}),
    "milora": ({"method": "milora"}, {}),
    "olora": ({"method": "olora"}, {}),
    "dora": ({"method": "dora"}, {}),
    "eva+coto+lora-pro": ({"method": "lora", "init": "eva", "schedule": "coto", "optimizer": "lora-pro",
                           "initial_p": 0.6, "seed": 3}, {}),
    "lora-ga+lora-plus": ({"method": "lora-ga", "optimizer": "lora-plus"}, {}),
    "lora-one+preconditioner": ({"method": "lora-one", "optimizer": "lora-one-preconditioner"}, {}),
}
# Registered methods and components the grid does not run, each with the reason (none today); a new one must go
# into CONFIGS or here (tests/test_train_sharded.py::test_every_registered_method_and_component_is_in_the_grid).
NOT_IN_GRID: dict[tuple[str, str], str] = {}
# EVA's incremental PCA takes one update per micro-batch (gathered over processes), as PEFT's EVA takes one per
# dataloader batch: its init depends on the micro-batch size, so its configs run without accumulation (the
# global batch unchanged); across processes it is exact.
PER_MICRO_BATCH = {"eva", "eva+coto+lora-pro"}
RESUMED = ["eva+coto+lora-pro", "elalora"]
RESUMED_ENGINES = {"fsdp2": True, "zero3": True}  # SIGTERM + --resume runs under these (zero2 shares zero3's path)
# LoRA-Pro efficient at AdamW's default eps 1e-8 is not decidable here: the first step (B = 0) moves B by
# lr·g/(|g| + eps), i.e. ±lr up to eps/|g| ≈ 1e-6, and two of layer 1 v_proj's 4 columns get the same sign
# pattern (16 rows), so at step 2 BᵀB has λ_min/λ_max = 3e-14 (condition number 3e13, 35x above pinv's cutoff
# r·eps·λ_max): inputs equal to 7e-16 relative (1 process vs 2) gave adjusted gradients (up to 5e5) that differed
# by 6e-3 relative, which flipped the sign of an AdamW update: 1.5e-2 = 1.5·lr max abs in the adapter after 3
# steps (with padding-free batches; 2.5e-4 without, equally round-off decided: the packing only changes the
# round-off). eps 1e-3 keeps B's columns from being sign-like: λ_min/λ_max ≥ 3.6e-4 at steps 2-3, and 1 vs 2
# processes and accumulation 4 agree to 3e-14 (adapter), 1.5e-12 (optimizer state), 1e-15 (losses): the plain
# tolerances hold.


def recipe(root: Path, config: str, engine: str, batch: int, run: str = "run", accum: int = 1) -> dict:
    from train_fixtures import llama_chat_recipe

    adapter, optimizer = CONFIGS[config]
    if config in PER_MICRO_BATCH:
        batch, accum = batch * accum, 1
    out = llama_chat_recipe(root / config, training__batch_size=batch, training__max_steps=STEPS,
                            training__grad_accum=accum,
                            training__save_every=1, training__keep_checkpoints=None, training__eval_every=2,
                            training__eval_batch_size=3, training__distributed=engine,
                            training__warmup=0)  # warmup ramps from lr 0 (transformers): every step must move
    # fp64: Adam divides by √v, so an fp32 all-reduce's rounding on a near-zero gradient entry becomes an
    # update difference of up to lr (measured 1e-5 on EVA's factors after 3 steps); fp64 keeps it at 1e-12.
    out["model"]["dtype"] = "float64"
    out["adapter"] = {"r": 4, "alpha": 8, "targets": TARGETS, **adapter}
    out["optimizer"] = {"lr": 1e-2, **optimizer}
    out["training"]["output_dir"] = str(root / config / run)
    return out


def pair_state_bytes(optimizer) -> int:
    """Bytes of optimizer state this process keeps for the (A, B) pairs (LoRA-Pro full: the m×n moments)."""
    return sum(v.numel() * v.element_size() for pair in getattr(optimizer, "pairs", []) for t in (pair.a, pair.b)
               for v in optimizer.state.get(t, {}).values() if isinstance(v, torch.Tensor))


def frozen_base_elements(model) -> list[int]:
    """[elements this process holds, elements in full] of the frozen base weights after training
    (:func:`multiproc.held_and_full`)."""
    from multiproc import held_and_full

    if hasattr(model, "reshard"):  # FSDP2 keeps the root's weights gathered after a forward (the final eval)
        model.reshard()
    return held_and_full(param for param in model.parameters() if not param.requires_grad)


def save_init(recipe, run) -> None:
    """Record each run's trainable tensors right after ``prepare`` (rank 0), for the moved check."""
    from peftkit.checkpoint import atomic_save_tensors
    from peftkit.train.checkpointing import trainable_state

    folder = Path(recipe.training.output_dir).parent
    if run.accelerator.is_main_process and not (folder / "init.safetensors").exists():
        atomic_save_tensors(folder / "init.safetensors", trainable_state(run.model))
        trains = [n for n, p in run.model.named_parameters() if p.requires_grad]
        (folder / "init.json").write_text(json.dumps(trains))


def main(engine: str, batch: int, root: Path, resume: bool, accum: int = 1) -> None:
    """The grid (:func:`multiproc.runs_in_one_launch`: every patch is undone before returning)."""
    from multiproc import runs_in_one_launch

    engines = engine.split(",")
    if len(engines) > 1:  # first: run after the DeepSpeed runs it hung once (rank 1 in an unmatched collective)
        write_failure(root, batch)
    with runs_in_one_launch(on_prepare=save_init) as last:
        for name in engines:
            _grid(name, batch, root / name if len(engines) > 1 else root, resume, last, accum)


def write_failure(root: Path, batch: int) -> None:
    """Rank 0 cannot write its checkpoint (a full disk): every process must raise, none may wait in a barrier.
    Each writes ``root/write_failure_rank<r>.json``: [error class, message]."""
    from peftkit import distributed, fileio
    from peftkit.train import from_dict, train

    original = fileio.atomic_write_bytes

    def full_disk(*args, **kwargs):
        if distributed.rank() == 0:
            raise OSError(28, "No space left on device (simulated)")
        return original(*args, **kwargs)

    fileio.atomic_write_bytes = full_disk
    try:
        train(from_dict(recipe(root / "write-failure", "lora", "ddp", batch)))
        outcome = ["none", "training finished"]
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        outcome = [type(exc).__name__, str(exc)]
    finally:
        fileio.atomic_write_bytes = original
    (root / f"write_failure_rank{distributed.rank()}.json").write_text(json.dumps(outcome))
    # Both processes finish the failure before either exits: a process that exits while its peer is still
    # reading the last all-reduce's bytes makes gloo report "connection closed by peer" there instead.
    import torch.distributed as dist

    dist.barrier()


def _grid(engine: str, batch: int, root: Path, resume: bool, last: dict, accum: int = 1) -> None:
    """The configs under one engine; ``last`` holds the last run's prepared model and optimizer."""
    from peftkit.train import from_dict, train

    only = [c for c in os.environ.get("PEFTKIT_GRID_ONLY", "").split(",") if c]
    for config in only or CONFIGS:
        result = train(from_dict(recipe(root, config, engine, batch, accum=accum)))
        assert result.status == "done", (config, result)
        from peftkit import distributed

        (root / config / f"pair_state_rank{distributed.rank()}.json").write_text(
            json.dumps(pair_state_bytes(last["optimizer"])))
        (root / config / f"base_elements_rank{distributed.rank()}.json").write_text(
            json.dumps(frozen_base_elements(last["model"])))
    if not resume:
        return

    def stop_after_two(step, record):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    for config in [c for c in RESUMED if not only or c in only] if RESUMED_ENGINES.get(engine) else []:
        spec = from_dict(recipe(root, config, engine, batch, run="resumed", accum=accum))
        first = train(spec, hooks=[stop_after_two])
        assert first.status == "interrupted" and first.step == 2, (config, first)
        second = train(spec, resume=True)
        assert second.status == "done" and second.step == STEPS, (config, second)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[4]), len(sys.argv) > 5 and sys.argv[5] == "resume",
         accum=int(sys.argv[3]))
