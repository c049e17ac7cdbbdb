"""How many CPU threads a training process uses (``training.threads``), chosen before the model is built.

PyTorch's default is one thread per core of the whole machine. Two cases make that slow: a container or job
limited to fewer cores (an affinity mask, a cgroup CPU quota: ``docker --cpus 2`` on a 64-core host still gets 64
threads, which wait on each other), and several processes on one machine (each takes every core). ``null`` (the
default) takes the cores this process may run on (affinity mask and cgroup quota) divided by the processes on this
machine (``LOCAL_WORLD_SIZE``); ``OMP_NUM_THREADS`` set in the environment (torchrun sets 1 for several processes)
wins over that choice. An integer is used as given. The choice depends on the machine, not on its load, so a run
repeats its numbers; when the load average says other jobs hold the cores, the log says so and suggests fewer
threads (on a busy 2-core machine one thread ran a step about 5x faster than two).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def cgroup_cores(v2: Path = CGROUP_V2, v1: tuple[Path, Path] = CGROUP_V1) -> int | None:
    """The cgroup's CPU quota in whole cores (rounded up), or None without a quota ("max", -1, no file)."""
    try:
        quota, period = v2.read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota, period = (int(path.read_text()) for path in v1)
        return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cores()
    return max(1, min(cores, quota) if quota else cores)


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(text) if text is not None else None
    except ValueError:
        return None
    return value if value and value > 0 else None


def choose_threads(setting: int | None, cores: int, processes: int, omp_num_threads: str | None) -> tuple[int, str]:
    """(threads per process, why). ``setting``: training.threads (None: choose); ``cores``: usable cores of this
    machine; ``processes``: training processes on this machine; ``omp_num_threads``: the environment's value."""
    if setting is not None:
        return setting, "training.threads"
    from_env = _positive_int(omp_num_threads)
    if from_env is not None:
        return from_env, "OMP_NUM_THREADS"
    processes = max(1, processes)
    return max(1, cores // processes), f"{cores} usable cores / {processes} process(es) on this machine"


def load_hint(threads: int, cores: int, load_average: float) -> str | None:
    """A suggestion when other jobs hold the cores: the 1-minute load average (before this run starts) above the
    cores left after this process's threads."""
    if threads <= 1 or load_average <= cores - threads + 0.5:
        return None
    free = max(1, int(cores - load_average + 0.5))
    return (f"the load average is {load_average:.1f} on {cores} cores: other jobs are running; if steps are slow, "
            f"try training.threads={min(free, threads - 1)}")


def apply(setting: int | None) -> tuple[int, str, str | None]:
    """Set torch's intra-op threads for this process; returns (threads, why, load hint or None)."""
    cores = usable_cores()
    processes = _positive_int(os.environ.get("LOCAL_WORLD_SIZE")) or 1
    threads, why = choose_threads(setting, cores, processes, os.environ.get("OMP_NUM_THREADS"))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return threads, why, load_hint(threads, cores, load)
