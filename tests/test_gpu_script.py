"""benchmarks/gpu.sh skips cleanly without CUDA; the CPU parts of what it runs (benchmarks/gpu_bench.py) run here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from multiproc import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the no-CUDA path")
def test_gpu_sh_skips_with_a_message_and_status_0_without_cuda():
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh")], capture_output=True, text=True, env=env,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout and "skipped" in proc.stdout


@pytest.mark.slow  # imports PEFT, builds a few tiny models, runs dynamo: about 30-60 s on 2 busy cores
def test_gpu_bench_dry_run_on_cpu_runs_every_part():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_bench.py"), "--device", "cpu", "--dry-run",
                           "--dtype", "float32", "--only", "init", "compile", "sync", "train"],
                          capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    init = {r["contender"]: r for r in rows if r["part"] == "init"}
    assert set(init) == {"peft-ga", "ga-k1", "ga-k4", "ga-k1-offload", "one-k4"}
    compiled = {r["method"]: r for r in rows if r["part"] == "compile"}
    assert set(compiled) == {"lora", "hra", "hydra", "coto"}
    assert all(isinstance(r["graph_breaks"], int) and r["compilations"] >= 1 for r in compiled.values())
    assert {m: compiled[m]["graph_breaks"] for m in ("lora", "hra", "hydra")} == {"lora": 0, "hra": 0, "hydra": 0}
    # CoTo: many gate patterns, a bounded number of graphs (regional compilation; test_coto.py checks the numbers)
    assert compiled["coto"]["gate_patterns"] >= 12 and compiled["coto"]["compilations"] <= 8
    assert [r for r in rows if r["part"] == "sync"][0]["skipped"]
