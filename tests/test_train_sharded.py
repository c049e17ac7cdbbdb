"""Engines (``training.distributed``): DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 with 2 processes (torchrun, gloo,
CPU) at batch 1 with gradient accumulation 2 equal one process at batch 4, and so does one process at batch 1
with accumulation 4, for every registered method and the method guide's three compositions, on instruction data
whose answers differ in length (response-only labels: every micro-batch holds another number of target tokens):
adapter tensors, losses, eval losses, the checkpoints' trainable tensors and optimizer state;
LoRA-Pro full's per-process moment memory is half of one process's; the frozen base is really sharded (FSDP2,
ZeRO-3: half of it per process) and the adapters not; every trainable tensor has moved after 2 steps; SIGTERM +
resume reproduces the uninterrupted run (fsdp2, zero3); the saved adapter loads into PEFT with the outputs
peftkit gives. FSDP1 and a DeepSpeed config with its own optimizer, scheduler or clipping stop before step 1.

The grid is one launch for the three engines (tests/sharded_grid.py loops over engines and configs); the
one-process reference runs in this process at the same time, in a thread, so the two overlap on the cores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from multiproc import HANG_GUARD_S, REPO, _free_port, run_distributed_beside
from safetensors.torch import load_file
from sharded_grid import CONFIGS, NOT_IN_GRID, PER_MICRO_BATCH, RESUMED, RESUMED_ENGINES, STEPS, recipe
from sharded_grid import main as run_grid
from train_fixtures import adapter_tensors, llama_text_recipe, read_metrics

RTOL, ATOL = 1e-4, 1e-6  # tests/test_train_multiproc.py's tolerance (the models here are fp64)
# ddp first: a DDP run after the DeepSpeed runs of a launch once aborted rank 1 in teardown.
ENGINES = ["ddp", "fsdp2", "zero2", "zero3"]
ACCUMULATED = [c for c in CONFIGS if c not in PER_MICRO_BATCH]  # also run in one process at batch 1 x accumulation 4


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
def sharded_grid(tmp_path_factory):
    """(one-process root, two-process root): ``two/<engine>`` holds every config's run under that engine (batch 1,
    accumulation 2); ``one`` the reference (batch 4), ``one/accumulated`` batch 1 with accumulation 4."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")

    def reference():
        run_grid("ddp", 4, one, resume=False)
        with pytest.MonkeyPatch.context() as patch:
            # PEFTKIT_GRID_ONLY=a,b (set for a quick run of some configs, with -k) narrows this side too
            only = [c for c in os.environ.get("PEFTKIT_GRID_ONLY", "").split(",") if c]
            patch.setenv("PEFTKIT_GRID_ONLY", ",".join(c for c in ACCUMULATED if not only or c in only))
            run_grid("ddp", 1, one / "accumulated", resume=False, accum=4)

    run_distributed_beside(reference, REPO / "tests" / "sharded_grid.py", 2, two / "out", ",".join(ENGINES), "1", "2",
                           str(two), "resume", timeout=HANG_GUARD_S)
    return one, two


def test_every_registered_method_and_component_is_in_the_grid():
    """Every registered method, architecture, init, optimizer and schedule runs in some grid config (as its
    method's preset or named in it), or is in NOT_IN_GRID with the reason: a new method cannot miss the grid
    silently (DoRA, MiLoRA and OLoRA did: CONFIGS is a hand list)."""
    from peftkit import registry
    from peftkit.config import resolve_config

    registry.discover()
    covered = set()
    for adapter, optimizer in CONFIGS.values():
        config = resolve_config(adapter["method"], **{k: v for k, v in adapter.items() if k != "method"})
        covered |= {("method", adapter["method"]), ("architecture", config.architecture), ("init", config.init),
                    ("optimizer", optimizer.get("name", config.optimizer)), ("schedule", config.schedule)}
    registered = {("method", name) for name in registry.methods()}
    for axis in ("architecture", "init", "optimizer", "schedule"):
        registered |= {(axis, name) for name in registry.components(axis)}
    missing = registered - covered - set(NOT_IN_GRID)
    assert not missing, f"add these to tests/sharded_grid.py CONFIGS (or to NOT_IN_GRID with the reason): {missing}"
    assert all(NOT_IN_GRID.values()), "NOT_IN_GRID: every entry needs its reason"


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_two_processes_equal_one(sharded_grid, config, engine):
    one, two = sharded_grid
    two = two / engine
    _equal_runs(one / config / "run", two / config / "run", f"{config} {engine}")


@pytest.mark.slow
@pytest.mark.parametrize("config", ACCUMULATED)
def test_accumulation_equals_one_batch(sharded_grid, config):
    """Batch 1 x grad_accum 4 in one process ends where batch 4 does: the step's loss is the mean over the
    global batch's target tokens, not the mean of four micro-batch means (measured before: 2e-2 max abs in
    LoRA's adapter after 3 steps, where B itself moved 2e-2)."""
    one, _ = sharded_grid
    _equal_runs(one / config / "run", one / "accumulated" / config / "run", f"{config} accumulation 4")


def _equal_runs(reference: Path, other: Path, what: str) -> None:
    # The trainable tensors before step 1: the data-driven inits (LoRA-GA, LoRA-One, EVA) read the same
    # examples and average the same token-mean gradient (before: LoRA-GA's init differed by 0.5 between 1 and 2
    # processes on this data).
    _close(load_file(reference.parent / "init.safetensors"), load_file(other.parent / "init.safetensors"),
           f"{what} init")
    _close(adapter_tensors(reference), adapter_tensors(other), what)
    last = f"checkpoints/step-{STEPS:06d}"
    _close(load_file(reference / last / "trainable.safetensors"), load_file(other / last / "trainable.safetensors"),
           f"{what} checkpoint")
    # The whole optimizer state (moments of every pair, not one rank's shard), as one process saves it.
    _close(_optimizer_tensors(reference / last), _optimizer_tensors(other / last), f"{what} optimizer",
           rtol=1e-4, atol=1e-5)
    ref_metrics, metrics = read_metrics(reference), read_metrics(other)
    assert [r["step"] for r in metrics] == [r["step"] for r in ref_metrics]
    assert any("eval_loss" in r for r in metrics)
    # fp64 sums (the model's dtype), not fp32's 5e-7; LoRA-GA's 3e-9: its init reads the fp32 loss.
    tolerance = 1e-8
    for ref, got in zip(ref_metrics, metrics):
        for key in ("loss", "eval_loss", "tokens"):
            if key in ref:
                assert abs(ref[key] - got[key]) <= tolerance * max(1.0, abs(ref[key])), (what, key, ref, got)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_trainable_tensor_moves_in_two_steps(sharded_grid, config, engine):
    _, two = sharded_grid
    two = two / engine
    init = load_file(two / config / "init.safetensors")
    after = load_file(two / config / "run" / "checkpoints" / "step-000002" / "trainable.safetensors")
    trains = json.loads((two / config / "init.json").read_text())
    assert trains
    unmoved = [name for name in trains if torch.equal(init[name], after[name])]
    assert not unmoved, f"{config}: unchanged after 2 {engine} steps: {unmoved}"


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_lora_pro_full_moment_memory_halves_at_two_processes(sharded_grid, engine):
    """The CLI shards LoRA-Pro full's m×n moments by whole pairs: each process keeps half of them."""
    one, two = sharded_grid
    two = two / engine
    for config in ("lora-pro-full", "eva+coto+lora-pro"):
        whole = json.loads((one / config / "pair_state_rank0.json").read_text())
        per_rank = [json.loads((two / config / f"pair_state_rank{r}.json").read_text()) for r in (0, 1)]
        assert whole > 0 and per_rank == [whole // 2, whole // 2], (config, whole, per_rank)


@pytest.mark.slow
@pytest.mark.parametrize("engine", [e for e in ENGINES if e != "ddp"])  # DDP replicates the base
def test_the_frozen_base_is_sharded_and_the_adapters_are_not(sharded_grid, engine):
    """Per process after training: FSDP2 and ZeRO-3 hold half of the frozen base (ZeRO-3 pads each partition to
    the process count), ZeRO-2 all of it (it partitions optimizer state and gradients, which are the adapters')."""
    one, two = sharded_grid
    held = [json.loads((two / engine / "lora" / f"base_elements_rank{r}.json").read_text()) for r in (0, 1)]
    whole = json.loads((one / "lora" / "base_elements_rank0.json").read_text())
    assert whole[0] == whole[1] and [h[1] for h in held] == [whole[1]] * 2, (whole, held)
    if engine == "zero2":
        assert [h[0] for h in held] == [whole[1]] * 2, held
    else:
        assert sum(h[0] for h in held) - whole[1] in range(0, 64), held  # each tensor's shards: at most 1 pad
        assert all(abs(h[0] - whole[1] / 2) <= 32 for h in held), held


@pytest.mark.slow
@pytest.mark.parametrize("engine", [e for e in ENGINES if RESUMED_ENGINES.get(e)])
@pytest.mark.parametrize("config", RESUMED)
def test_sigterm_and_resume_reproduce_the_run(sharded_grid, config, engine):
    _, two = sharded_grid
    two = two / engine
    whole, resumed = two / config / "run", two / config / "resumed"
    _close(adapter_tensors(whole), adapter_tensors(resumed), f"{config} resumed", rtol=0, atol=0)
    last = f"checkpoints/step-{STEPS:06d}"
    _close(_optimizer_tensors(whole / last), _optimizer_tensors(resumed / last), f"{config} resumed optimizer", 0, 0)

    def timeless(records):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]

    assert timeless(read_metrics(resumed)) == timeless(read_metrics(whole))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("config", ["lora", "lora-ga", "eva", "dora"])
def test_adapter_loads_in_peft_with_the_same_outputs(sharded_grid, config, engine):
    """LoRA-GA's is the exact rank-2r form against the original base, EVA's has per-layer ranks."""
    from peft import PeftModel

    import peftkit
    from peftkit.train import from_dict
    from peftkit.train.build import load_model

    _, two = sharded_grid
    two = two / engine
    spec = from_dict(recipe(two, config, engine, 2))
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


@pytest.mark.slow
def test_a_checkpoint_write_failure_on_one_process_stops_every_process(sharded_grid):
    """Rank 0's disk is full at the first checkpoint: it raises its OSError, rank 1 a CheckpointWriteError that
    points at it (before, rank 1 waited in a barrier until the process group's timeout); nothing is published."""
    _, two = sharded_grid
    outcomes = [json.loads((two / f"write_failure_rank{r}.json").read_text()) for r in (0, 1)]
    assert outcomes[0][0] == "OSError" and "No space left" in outcomes[0][1], outcomes
    assert outcomes[1][0] == "CheckpointWriteError" and "other process(es) failed" in outcomes[1][1], outcomes
    checkpoints = two / "write-failure" / "lora" / "run" / "checkpoints"
    assert not checkpoints.exists() or not list(checkpoints.iterdir())


@pytest.mark.slow
def test_accelerate_launch_with_a_users_deepspeed_zero3_config(sharded_grid, tmp_path):
    """``accelerate launch --config_file F -m peftkit train R`` where F names the user's own DeepSpeed file (stage 3,
    Accelerate's "auto" values, no optimizer): the recipe keeps training.distributed at its default, the launcher's
    ZeRO-3 is followed, and two processes at batch B equal one process at 2B."""
    import subprocess
    import sys

    import yaml

    one, _ = sharded_grid
    (tmp_path / "ds.json").write_text(json.dumps({
        "zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"}}))
    (tmp_path / "accelerate.yaml").write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED", "num_processes": 2,
        "num_machines": 1, "machine_rank": 0, "use_cpu": True,
        "deepspeed_config": {"deepspeed_config_file": str(tmp_path / "ds.json"), "zero3_init_flag": False}}))
    spec = recipe(tmp_path, "lora", "ddp", 2)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(spec))
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(tmp_path / "accelerate.yaml"), "-m", "peftkit", "train", str(tmp_path / "recipe.yaml"),
                           "logging.progress_bar=false"], env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "2 process(es), global batch 4, engine zero3" in proc.stdout
    run = Path(spec["training"]["output_dir"])
    _close(adapter_tensors(one / "lora" / "run"), adapter_tensors(run), "accelerate launch zero3")
    ref_metrics, metrics = read_metrics(one / "lora" / "run"), read_metrics(run)
    evals = [r["eval_loss"] for r in metrics if "eval_loss" in r]
    expected = [r["eval_loss"] for r in ref_metrics if "eval_loss" in r]
    assert len(evals) == 2 and evals == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------- refusals, no launch
def _recipe(tmp_path, **training):
    from peftkit.train import from_dict

    return from_dict(llama_text_recipe(tmp_path, **{f"training__{k}": v for k, v in training.items()}))


def test_deepspeed_engines_without_deepspeed_installed_name_the_extra(tmp_path, monkeypatch):
    import importlib.util

    from peftkit.errors import ConfigError
    from peftkit.train.loop import prepare

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    for engine in ("zero2", "zero3"):
        with pytest.raises(ConfigError, match=rf"'{engine}' needs DeepSpeed.*peftkit\[deepspeed\].*fsdp2"):
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


def test_fsdp1_is_refused_before_accelerate_builds_anything(tmp_path, monkeypatch):
    """Under ``accelerate launch`` with ``fsdp_version: 1`` on a CPU machine, Accelerate's own FSDP plugin fails in
    the Accelerator's constructor ("no available devices found"): peftkit's FSDP1 message must come first, from
    train() and from the evaluate command (both build an Accelerator)."""
    import accelerate
    import yaml

    from peftkit.errors import ConfigError
    from peftkit.train import from_dict, train
    from peftkit.train.session import evaluate_run

    def accelerate_fails(self, *args, **kwargs):
        raise RuntimeError("There are currently no available devices found (Accelerate's FSDP plugin)")

    monkeypatch.setattr(accelerate.Accelerator, "__init__", accelerate_fails)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    spec = llama_text_recipe(tmp_path)
    with pytest.raises(ConfigError, match="FSDP1.*fsdp_version: 2"):
        train(from_dict(spec))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="FSDP1.*fsdp_version: 2"):
        evaluate_run(str(tmp_path / "recipe.yaml"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("section, match", [
    ({"optimizer": {"type": "AdamW"}}, "brings its own optimizer \\(AdamW\\).*optimizer\\.\\* in the recipe"),
    ({"scheduler": {"type": "WarmupLR"}}, "brings its own scheduler \\(WarmupLR\\).*training.lr_scheduler"),
    ({"gradient_clipping": 1.0}, "gradient_clipping: 1.0.*training.max_grad_norm"),
])
def test_a_deepspeed_config_with_its_own_optimizer_scheduler_or_clipping_is_refused(tmp_path, monkeypatch, section,
                                                                                      match):
    from peftkit.errors import ConfigError
    from peftkit.train import engines

    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, **section}))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    with pytest.raises(ConfigError, match=match):
        engines.select(_recipe(tmp_path))


def test_a_users_deepspeed_config_picks_the_stage_and_keeps_peftkits_settings(tmp_path, monkeypatch):
    """The launcher's stage is followed; DeepSpeed gets the user's ZeRO settings with accumulation, clipping and
    the batch sizes that peftkit owns forced ("auto" everywhere in an accelerate-generated config)."""
    from peftkit.train import engines

    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 123},
                                  "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                                  "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                                  "bf16": {"enabled": "auto"}}))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    assert engines.select(_recipe(tmp_path)) == "zero3"
    with pytest.raises(Exception, match="recipe asks for 'zero2'.*launches 'zero3'"):
        engines.select(_recipe(tmp_path, distributed="zero2"))
    built = engines._deepspeed_config(3)
    assert built["zero_optimization"] == {"stage": 3, "stage3_prefetch_bucket_size": 123}
    assert (built["train_micro_batch_size_per_gpu"], built["gradient_accumulation_steps"], built["gradient_clipping"],
            built["bf16"]) == (1, 1, 0.0, {"enabled": False})
    assert "train_batch_size" not in built


def test_a_module_holding_frozen_and_trained_tensors_is_refused_under_zero(tmp_path):
    """ZeRO converts whole modules; a trained bias next to a frozen weight cannot stay out of it."""
    from peftkit.errors import ConfigError
    from peftkit.train import engines

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    for p in model.parameters():
        p.requires_grad_(False)
    model[1].requires_grad_(True)  # a whole trained module: hidden from DeepSpeed
    assert [(name, type(m)) for _, name, m in engines.hidden_modules(model)] == [("1", torch.nn.Linear)]
    model[0].bias.requires_grad_(True)
    with pytest.raises(ConfigError, match=r"cannot keep 0\.bias whole.*fsdp2"):
        engines.hidden_modules(model)


def test_an_unknown_engine_names_the_choices(tmp_path):
    from peftkit.errors import ConfigError

    with pytest.raises(ConfigError, match="training.distributed.*fsdp2"):
        _recipe(tmp_path, distributed="fsdp")


ZERO3_FP64 = r'''
import os, sys, torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from helpers import make_batch, tiny_llama
import peftkit
from peftkit.train import engines

dist.init_process_group("gloo", rank=0, world_size=1)
deepspeed = engines._import_deepspeed()
from deepspeed.accelerator import get_accelerator
answer = sys.argv[1] == "fp16"
type(get_accelerator()).is_fp16_supported = lambda self: answer  # what this CPU's oneDNN would say
model = peftkit.wrap(tiny_llama(dtype=torch.float64), "lora", r=2, targets=["q_proj", "v_proj"])
batch = make_batch(model)
want = model(**batch).loss.item()
engine = engines.wrap_deepspeed(model, 3)
assert "_peftkit_zero_placeholder" not in dict(model.named_parameters())
assert next(model.parameters()).dtype == torch.float64
got = model(**batch).loss
got.backward()
assert abs(got.item() - want) < 1e-12, (got.item(), want)
assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
print("ok")
'''


@pytest.mark.parametrize("onednn", ["fp16", "no-fp16"])
def test_zero3_takes_an_fp64_model_whatever_the_cpu(tmp_path, onednn):
    """ZeRO-3's Init refuses an fp64 dtype only on CPUs whose oneDNN has fp16 (its fallback hides it elsewhere):
    the same run passed on one machine and failed on another. Both answers, on any machine: the fp64 model
    initialises, keeps its dtype and its loss (to 1e-12), and trains."""
    import os
    import subprocess
    import sys

    script = tmp_path / "zero3_fp64.py"
    script.write_text(ZERO3_FP64)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    proc = subprocess.run([sys.executable, str(script), onednn, str(REPO / "tests")], capture_output=True,
                          text=True, timeout=HANG_GUARD_S, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]
