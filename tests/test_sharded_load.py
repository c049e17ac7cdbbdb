"""Sharded loading (``peftkit.sharded``; what ``peftkit train`` does under fsdp2 / zero3 on several processes):
each of 2 processes (torchrun, gloo, CPU) holds exactly its rows (FSDP2) or flat range (ZeRO-3) of every weight
of a pretrained folder, i.e. half of the base, read from the file; and training from that folder (LoRA, and the
data-driven inits LoRA-GA and EVA, which now run after sharding) equals one process at twice the batch."""

from __future__ import annotations

import pytest
import torch
from multiproc import REPO, run_distributed_beside
from safetensors.torch import load_file
from sharded_load import CONFIGS
from sharded_load import main as run_one
from train_fixtures import TINY_CONFIGS, adapter_tensors, read_metrics

ENGINES = ["fsdp2", "zero3"]
RTOL, ATOL = 1e-4, 1e-5  # fp32 models: the 2-process gradient all-reduce adds in another order


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("base")
    fields = dict(TINY_CONFIGS["llama"], hidden_size=64, intermediate_size=96)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    model.save_pretrained(folder)
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    run_distributed_beside(lambda: run_one(folder, one),
                           REPO / "tests" / "sharded_load.py", 2, two / "out", str(folder), str(two))
    return folder, one, two


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_each_process_holds_its_shard_read_from_the_file(runs, engine):
    folder, _, two = runs
    whole = load_file(str(folder / "model.safetensors"))
    saved = torch.load(two / engine / "shards.pt", weights_only=False)
    total = sum(t.numel() * t.element_size() for t in whole.values())
    for name, (kind, local, start, stop) in saved["shards"].items():
        full = whole[name]
        expected = full[start:stop] if kind == "rows" else full.reshape(-1)[start:stop]
        assert torch.equal(local, expected), f"{engine}: {name} [{start}, {stop})"
    assert saved.keys() and len(saved["shards"]) == len(whole)
    # Rank 0 holds half of the base (FSDP2's row chunks and ZeRO-3's partitions round up: within one row each).
    assert abs(saved["held"] - total / 2) <= 0.01 * total, (saved["held"], total)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_training_from_the_shards_equals_one_process(runs, engine, config):
    _, one, two = runs
    expected, got = adapter_tensors(one / "ddp" / config / "run"), adapter_tensors(two / engine / config / "run")
    assert expected.keys() == got.keys() and expected
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=RTOL, atol=ATOL, msg=f"{engine} {config}: {key}")
    losses = [r["loss"] for r in read_metrics(one / "ddp" / config / "run") if "loss" in r]
    sharded = [r["loss"] for r in read_metrics(two / engine / config / "run") if "loss" in r]
    assert len(losses) == 2 and sharded == pytest.approx(losses, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_saving_and_resuming_gather_no_base_weight(runs, engine):
    """A resumed run (checkpoint load, one step, checkpoint save, adapter export) runs no all-gather outside its
    forwards and backwards: the checkpoint holds the adapters' and the optimizer's tensors, read from the modules
    that hold them, so no process ever holds the whole base for a save or a resume. The steps' count is the
    positive control (the counter sees the engine's gathers); the resumed run ends where an uninterrupted one
    does."""
    import json

    _, _, two = runs
    counts = json.loads((two / engine / "gathers.json").read_text())
    assert counts.get("steps", 0) > 0, counts
    assert {phase: counts.get(phase, 0) for phase in ("save", "resume load", "adapter export")} == {
        "save": 0, "resume load": 0, "adapter export": 0}, counts
    records = read_metrics(two / engine / "lora-resumed" / "run")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]


# ---------------------------------------------------------------------------------------- no launch
@pytest.mark.parametrize("engine, switch", [("fsdp2", "FSDP_CPU_RAM_EFFICIENT_LOADING"),
                                            ("zero3", "ACCELERATE_DEEPSPEED_ZERO3_INIT")])
def test_sharded_loading_follows_the_accelerate_config(monkeypatch, engine, switch):
    """``accelerate launch`` passes fsdp_cpu_ram_efficient_loading / zero3_init_flag as these variables: true or
    unset loads each process's shard only; false loads the base whole (then the engine shards it)."""
    from peftkit.train.engines import load_sharded

    monkeypatch.delenv(switch, raising=False)
    assert load_sharded(engine, 2) == engine
    monkeypatch.setenv(switch, "true")
    assert load_sharded(engine, 2) == engine
    monkeypatch.setenv(switch, "false")
    assert load_sharded(engine, 2) is None
    monkeypatch.delenv(switch)
    assert load_sharded(engine, 1) is None and load_sharded("ddp", 2) is None and load_sharded("zero2", 2) is None
