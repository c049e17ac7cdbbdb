"""Run a script under ``torchrun`` on CPU (gloo) from a test, and read back what rank 0 saved.

Pattern: a test writes (or points at) a script whose ``__main__`` initialises ``torch.distributed`` (through
Accelerate or ``init_process_group("gloo")``), does the work, and has rank 0 ``torch.save`` its results into
the folder given by the ``PEFTKIT_TEST_OUT`` environment variable. The same script run with ``nproc=1``
gives the reference. Launches are expensive (each process imports torch and transformers): put all the
checks of one test file into one launch. The launched scripts share :func:`runs_in_one_launch` (many training
runs in one process group), :func:`held_and_full` (what a sharded engine keeps on this process) and
:func:`leave_process_group` (their last line).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# Every subprocess a test starts waits this long at most: a guard against a hang, never a budget. It is far above any
# run's time on a loaded 2-core machine (one quickstart run took over 600 s under a load of 14), and below CI's limit.
HANG_GUARD_S = 2700


def leave_process_group() -> None:
    """The end of a launched script: every rank waits for the others, then leaves the gloo group. A rank that left
    while a peer was still saving its results aborted at exit now and then ("terminate called without an active
    exception", seen in CI on the DoRA launch and once on the CLI's); the barrier keeps the ranks together."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def run_distributed(script: str | os.PathLike, nproc: int, out_dir: str | os.PathLike, *args: str,
                    timeout: float = HANG_GUARD_S, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node nproc script args``; raises with the output on failure."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    full_env.update({
        "PEFTKIT_TEST_OUT": str(out_dir),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), full_env.get("PYTHONPATH", "")]),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    })
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(_free_port()), str(script), *args]
    # On a timeout torchrun gets SIGTERM, which it passes on to its workers (each runs in a session of its own, so
    # killing torchrun alone would leave them running and holding the output pipes open).
    with subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGTERM)
            try:
                stdout, stderr = child.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                stdout, stderr = "", "(torchrun did not stop within 60 s of SIGTERM; killed)"
            raise AssertionError(f"{' '.join(cmd)} timed out after {timeout} s:\n{stdout[-4000:]}\n"
                                 f"{stderr[-8000:]}") from None
    proc = subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc



def run_distributed_beside(reference: Callable[[], object], script: str | os.PathLike, nproc: int,
                           out_dir: str | os.PathLike, *args: str, **kwargs) -> None:
    """:func:`run_distributed` in a thread while ``reference()`` (the one-process side) runs in this one; after both
    have finished, the launch's error (if any) is raised here, in the test's thread."""
    failure: list[BaseException] = []

    def launch():
        try:
            run_distributed(script, nproc, out_dir, *args, **kwargs)
        except BaseException as exc:  # re-raised below, in the test's thread
            failure.append(exc)

    thread = threading.Thread(target=launch)
    thread.start()
    try:
        reference()
    finally:
        thread.join()
    if failure:
        raise failure[0]

def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def held_and_full(tensors: Iterable[torch.Tensor]) -> list[int]:
    """[elements this process holds, elements in full] of ``tensors``: FSDP2's DTensor shards (the local shard),
    ZeRO-3's partitions (``ds_tensor``; between forwards the weight itself has 0 elements), whole tensors
    otherwise."""
    held = full = 0
    for tensor in tensors:
        if hasattr(tensor, "to_local"):  # a DTensor (FSDP2 subclasses the parameter's own class)
            held, full = held + tensor.to_local().numel(), full + tensor.numel()
        elif hasattr(tensor, "ds_tensor"):
            held, full = held + tensor.ds_tensor.numel(), full + tensor.ds_numel
        else:
            held, full = held + tensor.numel(), full + tensor.numel()
    return [held, full]


@contextlib.contextmanager
def runs_in_one_launch(on_prepare: Callable | None = None) -> Iterator[dict]:
    """Several ``peftkit.train.train`` runs, one after another, in this launch's process group (a launch costs
    more than a run), each on one intra-op thread. Yields a dict that holds the last run's prepared ``model`` and
    ``optimizer`` (to measure what this process keeps); ``on_prepare(recipe, run)`` is called after each prepare.
    The one-process side runs inside a pytest worker: every patch is undone on exit, so the tests that run after it
    in that process see the real loop (and their own thread count)."""
    from accelerate import Accelerator

    import peftkit.train.loop as loop

    threads, end_training, prepare = torch.get_num_threads(), Accelerator.end_training, loop.prepare
    last: dict = {}

    def keep_prepared(recipe, accelerator=None):
        run = prepare(recipe, accelerator)
        last["model"], last["optimizer"] = run.model, run.optimizer
        if on_prepare is not None:
            on_prepare(recipe, run)
        return run

    torch.set_num_threads(1)
    # Accelerate's end_training would destroy the shared process group after the first run.
    Accelerator.end_training = lambda self: [tracker.finish() for tracker in self.trackers] and None
    loop.prepare = keep_prepared
    try:
        yield last
    finally:
        torch.set_num_threads(threads)
        Accelerator.end_training, loop.prepare = end_training, prepare
