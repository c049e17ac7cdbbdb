"""training.threads (peftkit/train/threads.py): the choice as a pure function of the setting, the usable cores,
the processes on the machine and OMP_NUM_THREADS; the cgroup quota read; the load hint; the key applied by a run."""

from __future__ import annotations

import pytest
import torch
from train_fixtures import llama_text_recipe

from peftkit.errors import ConfigError
from peftkit.train import from_dict, train
from peftkit.train.threads import cgroup_cores, choose_threads, load_hint


@pytest.mark.parametrize("setting, cores, processes, env, expected", [
    (None, 2, 1, None, 2),        # one process: every usable core
    (None, 16, 4, None, 4),       # four processes on 16 cores: 4 each, 16 in all
    (None, 6, 4, None, 1),        # more processes than cores fit: at least one thread
    (None, 7, 2, None, 3),        # rounded down: processes x threads <= cores
    (None, 64, 1, "1", 1),        # OMP_NUM_THREADS set by the user (or torchrun) wins
    (None, 8, 2, "junk", 4),      # ... unless it is not a positive integer
    (None, 8, 2, "0", 4),
    (3, 2, 1, "1", 3),            # training.threads as given, over everything
])
def test_the_thread_choice(setting, cores, processes, env, expected):
    threads, why = choose_threads(setting, cores, processes, env)
    assert threads == expected
    if setting is None and env in (None, "junk", "0"):
        assert threads * processes <= cores or threads == 1
    assert why


def test_the_cgroup_quota(tmp_path):
    v2 = tmp_path / "cpu.max"
    v2.write_text("150000 100000\n")
    assert cgroup_cores(v2, (tmp_path / "no", tmp_path / "no")) == 2  # 1.5 cores: rounded up
    v2.write_text("max 100000\n")
    assert cgroup_cores(v2, (tmp_path / "no", tmp_path / "no")) is None
    quota, period = tmp_path / "quota", tmp_path / "period"
    quota.write_text("400000")
    period.write_text("100000")
    assert cgroup_cores(tmp_path / "none", (quota, period)) == 4
    quota.write_text("-1")
    assert cgroup_cores(tmp_path / "none", (quota, period)) is None


def test_the_load_hint():
    assert load_hint(2, 2, 0.3) is None                      # quiet
    assert load_hint(1, 2, 9.0) is None                      # one thread already
    assert "training.threads=1" in load_hint(2, 2, 5.0)      # busy 2-core machine
    assert "training.threads=4" in load_hint(8, 8, 4.0)      # 4 cores free
    assert load_hint(4, 16, 10.0) is None                    # 12 cores left for 4 threads


def test_a_run_uses_the_recipes_threads(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        train(from_dict(llama_text_recipe(tmp_path, training__max_steps=1)
                        | {"training": {**llama_text_recipe(tmp_path)["training"], "max_steps": 1, "warmup": 0,
                                        "threads": 1}}))
        assert torch.get_num_threads() == 1
        assert "peftkit: 1 CPU thread(s) per process (training.threads)" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="training.threads"):
        from_dict(llama_text_recipe(tmp_path) | {"training": {"threads": 0}})
