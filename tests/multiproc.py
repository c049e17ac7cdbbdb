"""Run a script under ``torchrun`` on CPU (gloo) from a test, and read back what rank 0 saved.

Pattern: a test writes (or points at) a script whose ``__main__`` initialises ``torch.distributed`` (through
Accelerate or ``init_process_group("gloo")``), does the work, and has rank 0 ``torch.save`` its results into
the folder given by the ``PEFTKIT_TEST_OUT`` environment variable. The same script run with ``nproc=1``
gives the reference. Launches are expensive (each process imports torch and transformers): put all the
checks of one test file into one launch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_distributed(script: str | os.PathLike, nproc: int, out_dir: str | os.PathLike, *args: str,
                    timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
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
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
