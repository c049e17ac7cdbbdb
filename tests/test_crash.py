"""The crash test (issue 14): kill training with SIGKILL and SIGTERM at random points, then check that every
checkpoint left on disk loads, is finite and complete, and that resuming reaches exactly the uninterrupted result.

A "zygote" process imports torch and peftkit once and forks one child per run, so each kill costs no interpreter
start (it never runs a tensor op itself, so forking it is safe). The kill times are drawn from a seeded generator
as fractions of the measured uninterrupted run, so they land in model building, steps, evaluations and checkpoint
writes. Each run after a kill resumes from the newest checkpoint the previous ones left: the final result can only
equal the uninterrupted one if every checkpoint resumed from on the way was complete and exact.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from multiproc import REPO
from safetensors.torch import load_file
from train_fixtures import TINY_CONFIGS, adapter_tensors, llama_text_recipe, read_metrics

import peftkit
from peftkit.train import checkpointing

ZYGOTE = r"""
import json, os, sys, time
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: F401  (what the children would import lazily, loaded once here)
import torch  # this process runs no tensor op, so its forks start clean
import accelerate  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
import peftkit.train.loop
from peftkit import registry
from peftkit.train import checkpointing
from peftkit.train.cli import main

registry.methods()


def child(argv, log):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        code = main(argv)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def logged_step(metrics):
    try:
        lines = open(metrics).read().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError):
            continue
    return 0


for line in sys.stdin:
    job = json.loads(line)
    latest = checkpointing.latest(job["run_dir"])
    start_step = int(latest.name.split("-")[1]) if latest else 0
    argv = ["train", job["recipe"]] + (["--resume"] if latest else [])
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        child(argv, job["log"])
    killed_at, status = None, None
    if job["signal"]:
        # The kill point: after the metrics line of a drawn step among the next three, plus a drawn delay
        # (a step's bookkeeping: evaluation, checkpoint writes), or at once if the run gets there first.
        target = start_step + 1 + int(job["fraction"] * min(3, job["max_steps"] - start_step))
        metrics = os.path.join(job["run_dir"], "metrics.jsonl")
        while logged_step(metrics) < target:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            status = None
            time.sleep(0.002)
        if status is None:
            time.sleep(job["delay"])
            os.kill(pid, job["signal"])  # a finished child stays a zombie until waited for: never a stranger
            killed_at = logged_step(metrics)
    if status is None:
        _, status = os.waitpid(pid, 0)
    print(json.dumps({"start": start_step, "killed_at": killed_at, "exit": os.waitstatus_to_exitcode(status),
                      "seconds": time.perf_counter() - started}), flush=True)
"""

TRIALS = 6  # alternating SIGKILL and SIGTERM
SEED = 14
MAX_STEPS = 10


def crash_recipe(folder: Path) -> str:
    recipe = llama_text_recipe(folder, training__max_steps=MAX_STEPS, training__save_every=2,
                               training__keep_checkpoints=2,
                               training__eval_every=5)
    recipe["adapter"]["dropout"] = 0.1  # the resumed run must also continue the RNG streams
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def check_checkpoints(run: Path) -> int:
    """Every step folder is complete, finite, and its adapter loads into a fresh base model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(TINY_CONFIGS["llama"])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    folders = checkpointing.checkpoint_dirs(run)
    for folder in folders:
        json.loads((folder / checkpointing.STATE_FILE).read_text())
        for name in ("rng-0.safetensors", "rng-0.json"):
            assert (folder / name).is_file(), folder / name
        for key, tensor in load_file(str(folder / "trainable.safetensors")).items():
            assert torch.isfinite(tensor).all(), (folder, key)
        states = torch.load(folder / "optimizer.pt", weights_only=True)
        for tensor in checkpointing._state_tensors(states).values():
            assert not tensor.is_floating_point() or torch.isfinite(tensor).all(), folder
        model = peftkit.load(AutoModelForCausalLM.from_config(config), folder / "adapter")
        assert all(torch.isfinite(p).all() for p in model.parameters()), folder
    return len(folders)


def comparable(run: Path) -> list[dict]:
    """metrics.jsonl without its timings."""
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s",)} for r in read_metrics(run)]


@pytest.mark.slow
def test_random_kills_leave_good_checkpoints_and_resume_to_the_uninterrupted_result(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE], cwd=REPO, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    deadline = time.monotonic() + 240

    def run(recipe: str, run_dir: Path, number: int = 0, fraction: float = 0.0, delay: float = 0.0) -> dict:
        assert time.monotonic() < deadline, "the crash test ran out of time"
        zygote.stdin.write(json.dumps({"recipe": recipe, "run_dir": str(run_dir), "signal": int(number),
                                       "fraction": fraction, "delay": delay, "max_steps": MAX_STEPS,
                                       "log": str(tmp_path / "log.txt")}) + "\n")
        zygote.stdin.flush()
        return json.loads(zygote.stdout.readline())

    try:
        reference_recipe = crash_recipe(tmp_path / "reference")
        reference = run(reference_recipe, tmp_path / "reference" / "run")
        assert reference["exit"] == 0, (tmp_path / "log.txt").read_text()[-3000:]
        print(f"uninterrupted run: {reference['seconds']:.1f} s")

        crash = tmp_path / "crash"
        recipe = crash_recipe(crash)
        rng = random.Random(SEED)
        outcomes = []
        for trial in range(TRIALS):
            number = signal.SIGKILL if trial % 2 == 0 else signal.SIGTERM
            fraction, delay = rng.random(), rng.uniform(0.0, 0.1)
            result = run(recipe, crash / "run", number, fraction, delay)
            # killed, handled (128 + 15 after writing a checkpoint), or finished before the signal came
            allowed = {0, -signal.SIGKILL} if number == signal.SIGKILL else {0, 128 + signal.SIGTERM, -signal.SIGTERM}
            assert result["exit"] in allowed, (trial, result, (tmp_path / "log.txt").read_text()[-3000:])
            outcomes.append((int(number), result["start"], result["killed_at"], round(delay, 3), result["exit"],
                             check_checkpoints(crash / "run"), round(result["seconds"], 1)))
        print("kills (signal, resumed at, killed after step, delay s, exit code, checkpoints on disk, s):", outcomes)
        final = run(recipe, crash / "run")
        assert final["exit"] == 0, (tmp_path / "log.txt").read_text()[-3000:]
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=60)

    check_checkpoints(crash / "run")
    want = adapter_tensors(tmp_path / "reference" / "run")
    got = adapter_tensors(crash / "run")
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), (key, outcomes)
    assert comparable(crash / "run") == comparable(tmp_path / "reference" / "run"), outcomes
    assert not [p for p in (crash / "run").rglob("*") if p.name.endswith(".tmp")], outcomes
