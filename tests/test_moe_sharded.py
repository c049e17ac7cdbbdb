"""Two processes equal one on a mixture-of-experts model: LoRA (and LoRA-GA under ddp; refused under the sharding
engines, whose sharded expert gradients it cannot read) with the fused expert stacks adapted per expert, under ddp,
fsdp2 (the stacks are DTensors sharded over the experts' dimension, gathered for each block) and zero3 (partitioned,
gathered by DeepSpeed's hooks before the adapter adds its update): torchrun, gloo, CPU, fp64. One launch for all
engines (tests/moe_sharded.py); the one-process reference runs in a thread meanwhile.
"""

from __future__ import annotations

import json

import pytest
import torch
from moe_sharded import CONFIGS, REFUSED_SHARDED
from moe_sharded import main as run_configs
from multiproc import REPO, run_distributed_beside
from train_fixtures import adapter_tensors, read_metrics

ENGINES = ["ddp", "fsdp2", "zero3"]


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    run_distributed_beside(lambda: run_configs("ddp", 4, one),
                           REPO / "tests" / "moe_sharded.py", 2, two / "out", ",".join(ENGINES), "2", str(two))
    return one / "ddp", two


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_two_processes_equal_one_on_an_moe_model(moe_runs, config, engine):
    one, two = moe_runs
    if config in REFUSED_SHARDED and engine != "ddp":  # refused before step 1, naming the field and the way out
        message = (two / engine / config / "refused.txt").read_text()
        assert "adapter.method" in message and "training.distributed: ddp" in message, message
        assert not (two / engine / config / "run" / "adapter").exists()
        return
    reference, sharded = adapter_tensors(one / config / "run"), adapter_tensors(two / engine / config / "run")
    experts = [k for k in reference if ".experts." in k]
    assert experts and reference.keys() == sharded.keys()
    for key, value in reference.items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-8, atol=1e-12, msg=f"{config} {engine}: {key}")
    for key in experts:  # the experts trained (B moved from 0 on every expert of every stack)
        if ".lora_B." in key:
            assert (reference[key].reshape(reference[key].shape[0], -1, 4).abs().amax(dim=(0, 1)) > 0).all(), key
    # The frozen expert stacks are really sharded under fsdp2 and zero3 (half per process), whole under ddp.
    held, full = json.loads((two / engine / config / "experts_rank0.json").read_text())
    assert full > 0 and held == (full if engine == "ddp" else full // 2), (engine, held, full)
    ref_metrics, metrics = read_metrics(one / config / "run"), read_metrics(two / engine / config / "run")
    for ref, got in zip(ref_metrics, metrics):
        for key in ("loss", "eval_loss"):
            if key in ref:
                # the dense grid's tolerance (tests/test_train_sharded.py): logged losses are reduced in fp32
                assert abs(ref[key] - got[key]) <= 1e-5 * max(1.0, abs(ref[key])), (config, engine, key, ref, got)
