"""Sharded engines (``training.distributed``): FSDP2 with 2 processes (torchrun, gloo, CPU) at batch B equals one
process at batch 2B for every registered method and the method guide's three compositions: adapter tensors,
losses, eval losses, the checkpoints' trainable tensors and optimizer state; LoRA-Pro full's per-process moment
memory is half of one process's; every trainable tensor has moved
after 2 steps; SIGTERM + resume reproduces the uninterrupted run; the saved adapter loads into PEFT with the
outputs peftkit gives. DeepSpeed ZeRO, FSDP1 and a DeepSpeed config with its own optimizer stop before step 1.

The grid is one launch (tests/sharded_grid.py loops over the configs); the one-process reference runs in this
process at the same time, in a thread, so the two overlap on the machine's cores.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from multiproc import REPO, run_distributed
from sharded_grid import CONFIGS, RESUMED, STEPS, main as run_grid, recipe
from train_fixtures import adapter_tensors, llama_text_recipe, read_metrics

RTOL, ATOL = 1e-4, 1e-6  # tests/test_train_multiproc.py's tolerance (the models here are fp64)


def _close(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str, rtol=RTOL, atol=ATOL) -> None:
    assert expected.keys() == got.keys() and expected, what
    for key, value in expected.items():
        if value.dtype == torch.bool:
            assert torch.equal(got[key], value), f"{what}: {key}"
        else:
            torch.testing.assert_close(got[key], value, rtol=rtol, atol=atol, msg=f"{what}: {key}")


def _optimizer_tensors(path: Path) -> dict[str, torch.Tensor]:
    states = torch.load(path / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    return {f"{index}/{field}": value for index, state in states.items() for field, value in state.items()
            if isinstance(value, torch.Tensor)}


@pytest.fixture(scope="module")
def fsdp2_grid(tmp_path_factory):
    """(one-process root, two-process fsdp2 root), both holding every config's run."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    failure: list[BaseException] = []

    def launch():
        try:
            run_distributed(REPO / "tests" / "sharded_grid.py", 2, two / "out", "fsdp2", "2", str(two), "resume",
                            timeout=420)
        except BaseException as exc:  # re-raised below, in the test's thread
            failure.append(exc)

    thread = threading.Thread(target=launch)
    thread.start()
    try:
        run_grid("ddp", 4, one, resume=False)
    finally:
        thread.join()
    if failure:
        raise failure[0]
    return one, two


@pytest.mark.slow
@pytest.mark.parametrize("config", list(CONFIGS))
def test_fsdp2_two_processes_equal_one(fsdp2_grid, config):
    one, two = fsdp2_grid
    reference, sharded = one / config / "run", two / config / "run"
    if config == "lora-pro-efficient":
        # Against DDP with the same two processes: identical; against one process: DDP's own deviation.
        _close(adapter_tensors(two / config / "ddp"), adapter_tensors(sharded), f"{config} fsdp2 vs ddp", 1e-12, 1e-14)
        _close(adapter_tensors(reference), adapter_tensors(sharded), config, rtol=1e-2, atol=1e-4)
    else:
        _close(adapter_tensors(reference), adapter_tensors(sharded), config)
        last = f"checkpoints/step-{STEPS:06d}"
        _close(load_file(reference / last / "trainable.safetensors"), load_file(sharded / last / "trainable.safetensors"),
               f"{config} checkpoint")
        # The whole optimizer state (moments of every pair, not one rank's shard), as one process saves it.
        _close(_optimizer_tensors(reference / last), _optimizer_tensors(sharded / last), f"{config} optimizer",
               rtol=1e-4, atol=1e-5)
    ref_metrics, metrics = read_metrics(reference), read_metrics(sharded)
    assert [r["step"] for r in metrics] == [r["step"] for r in ref_metrics]
    assert any("eval_loss" in r for r in metrics)
    for ref, got in zip(ref_metrics, metrics):
        for key in ("loss", "eval_loss", "tokens"):
            if key in ref:
                assert abs(ref[key] - got[key]) <= 1e-5 * max(1.0, abs(ref[key])), (config, key, ref, got)


@pytest.mark.slow
@pytest.mark.parametrize("config", list(CONFIGS))
def test_fsdp2_every_trainable_tensor_moves_in_two_steps(fsdp2_grid, config):
    _, two = fsdp2_grid
    init = load_file(two / config / "init.safetensors")
    after = load_file(two / config / "run" / "checkpoints" / "step-000002" / "trainable.safetensors")
    trains = json.loads((two / config / "init.json").read_text())
    assert trains
    unmoved = [name for name in trains if torch.equal(init[name], after[name])]
    assert not unmoved, f"{config}: unchanged after 2 fsdp2 steps: {unmoved}"


@pytest.mark.slow
def test_lora_pro_full_moment_memory_halves_at_two_processes(fsdp2_grid):
    """The CLI shards LoRA-Pro full's m×n moments by whole pairs: each process keeps half of them."""
    one, two = fsdp2_grid
    for config in ("lora-pro-full", "eva+coto+lora-pro"):
        whole = json.loads((one / config / "pair_state_rank0.json").read_text())
        per_rank = [json.loads((two / config / f"pair_state_rank{r}.json").read_text()) for r in (0, 1)]
        assert whole > 0 and per_rank == [whole // 2, whole // 2], (config, whole, per_rank)


@pytest.mark.slow
@pytest.mark.parametrize("config", RESUMED)
def test_fsdp2_sigterm_and_resume_reproduce_the_run(fsdp2_grid, config):
    _, two = fsdp2_grid
    whole, resumed = two / config / "run", two / config / "resumed"
    _close(adapter_tensors(whole), adapter_tensors(resumed), f"{config} resumed", rtol=0, atol=0)
    last = f"checkpoints/step-{STEPS:06d}"
    _close(_optimizer_tensors(whole / last), _optimizer_tensors(resumed / last), f"{config} resumed optimizer", 0, 0)

    def timeless(records):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]

    assert timeless(read_metrics(resumed)) == timeless(read_metrics(whole))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["lora", "lora-ga", "eva"])
def test_fsdp2_adapter_loads_in_peft_with_the_same_outputs(fsdp2_grid, config):
    """LoRA-GA's is the exact rank-2r form against the original base, EVA's has per-layer ranks."""
    from peft import PeftModel

    import peftkit
    from peftkit.train import from_dict
    from peftkit.train.build import load_model

    _, two = fsdp2_grid
    spec = from_dict(recipe(two, config, "fsdp2", 2))
    adapter_dir = two / config / "run" / "adapter"
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = peftkit.load(load_model(spec.model, None, seed=spec.training.seed), adapter_dir)
    theirs = PeftModel.from_pretrained(load_model(spec.model, None, seed=spec.training.seed), adapter_dir)
    with torch.no_grad():
        expected = ours.eval()(input_ids=ids).logits
        got = theirs.eval()(input_ids=ids).logits
        base = load_model(spec.model, None, seed=spec.training.seed).eval()(input_ids=ids).logits
    assert not torch.allclose(expected, base)  # the adapter changes the outputs
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------- refusals, no launch
def _recipe(tmp_path, **training):
    from peftkit.train import from_dict

    return from_dict(llama_text_recipe(tmp_path, **{f"training__{k}": v for k, v in training.items()}))


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_deepspeed_engines_are_refused_before_anything_is_built(tmp_path, engine):
    from peftkit.errors import ConfigError
    from peftkit.train.loop import prepare

    with pytest.raises(ConfigError, match=rf"'{engine}'.*fsdp2"):
        prepare(_recipe(tmp_path, distributed=engine))


def test_fsdp1_from_an_accelerate_config_is_refused(tmp_path, monkeypatch):
    from peftkit.errors import ConfigError
    from peftkit.train import engines

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP1.*fsdp_version: 2"):
        engines.select(_recipe(tmp_path))
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert engines.select(_recipe(tmp_path)) == "fsdp2"  # the launcher's FSDP2 config is followed
    with pytest.raises(ConfigError, match="recipe asks for 'zero3'.*launches 'fsdp2'"):
        engines.select(_recipe(tmp_path, distributed="zero3"))


def test_a_deepspeed_config_with_its_own_optimizer_is_refused(tmp_path, monkeypatch):
    from peftkit.errors import ConfigError
    from peftkit.train import engines

    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    with pytest.raises(ConfigError, match="brings its own optimizer.*fsdp2"):
        engines.select(_recipe(tmp_path))
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="'zero3'.*fsdp2"):
        engines.select(_recipe(tmp_path))


def test_an_unknown_engine_names_the_choices(tmp_path):
    from peftkit.errors import ConfigError

    with pytest.raises(ConfigError, match="training.distributed.*fsdp2"):
        _recipe(tmp_path, distributed="fsdp")
