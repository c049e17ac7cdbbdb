"""The runnable examples in examples/ run as a user runs them (real all-MiniLM-L6-v2, offline) and learn."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from multiproc import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, tmp_path: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(REPO / "examples" / script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_own_loop_example_learns(tmp_path):
    out = _run("own_loop.py", tmp_path)
    accuracy = float(re.search(r"held-out accuracy: ([0-9.]+)", out).group(1))
    assert accuracy >= 0.9  # 4 balanced classes: chance is 0.25


@pytest.mark.slow
def test_trainer_example_trains_and_saves_a_peft_adapter(tmp_path):
    _run("trainer.py", tmp_path)
    adapter = tmp_path / "runs" / "trainer-example" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    import peftkit.checkpoint as checkpoint

    summary = checkpoint.describe(adapter)
    assert summary["peft_type"] == "LORA" and summary["parameters"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora-pro", "hra"])
def test_trl_sft_example_trains_and_reloads(method, tmp_path):
    out = _run_args("trl_sft.py", tmp_path, method)
    assert f"{method}: loss" in out and "the reloaded adapter equals the trained one: True" in out
    first, last = map(float, re.search(r"loss ([0-9.]+) -> ([0-9.]+)", out).groups())
    assert last < first
    assert (tmp_path / "runs" / "trl-sft" / "checkpoint-6" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_trl_dpo_example_uses_no_reference_copy(tmp_path):
    out = _run_args("trl_dpo.py", tmp_path, "lora")
    assert "reference model's own parameter bytes: 0 " in out
    assert (tmp_path / "runs" / "trl-dpo" / "adapter" / "adapter_config.json").is_file()


def _run_args(script: str, tmp_path: Path, *args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(REPO / "examples" / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
