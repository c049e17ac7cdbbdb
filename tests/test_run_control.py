"""Issue 28 item 1: training.epochs, the epoch in every record, training.best (best/) and
training.early_stopping, each exact under resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import adapter_tensors, llama_text_recipe, read_metrics

from peftkit.errors import ConfigError
from peftkit.train import checkpointing, from_dict, train
from peftkit.train.monitor import Monitors, best_settings, early_stopping_settings
from peftkit.train.recipe import TrainingSection, total_steps

# 8 texts pack into 19 blocks of 16 tokens: 4 micro-batches of 4 per epoch (the tail of 3 is dropped).
SMALL = dict(data__max_train_samples=8, training__warmup=0)
BATCHES_PER_EPOCH = 4


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _equal(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


@pytest.mark.parametrize("max_steps, epochs, grad_accum, expected", [
    (None, None, 1, 100),  # neither: the default
    (7, None, 1, 7),
    (None, 2, 1, 8),  # 2 epochs × 4 micro-batches
    (None, 1.5, 2, 3),  # 6 micro-batches in steps of 2
    (None, 1, 3, 2),  # 4 micro-batches in steps of 3: rounded up, every example of the epoch is read
    (None, 0.3, 1, 2),  # 1.2 micro-batches: 2 steps
    (5, 2, 1, 5),  # both: the fewer steps win
    (20, 2, 1, 8),
])
def test_the_run_length_from_max_steps_and_epochs(max_steps, epochs, grad_accum, expected):
    training = TrainingSection(max_steps=max_steps, epochs=epochs, grad_accum=grad_accum)
    assert total_steps(training, BATCHES_PER_EPOCH) == expected


def test_epochs_set_the_run_length_the_schedule_and_the_logged_epoch(tmp_path):
    recipe = from_dict(llama_text_recipe(tmp_path, training__max_steps=None, training__epochs=1.5,
                                         training__grad_accum=2, training__lr_schedule="linear",
                                         training__eval_every=2, **SMALL))
    result = train(recipe)
    assert result.status == "done" and result.step == 3
    assert recipe.training.max_steps is None  # the caller's recipe is left as given
    records = read_metrics(tmp_path / "run")
    steps = [r for r in records if "loss" in r]
    # the linear schedule decays over the 3 steps of the run: step k is taken at lr · (1 - (k-1)/3)
    assert [r["lr"] for r in steps] == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3])
    assert [r["epoch"] for r in steps] == [0.5, 1.0, 1.5]  # 2 micro-batches of the 4 per epoch each step
    evals = [r for r in records if "eval_loss" in r]
    assert [(r["step"], r["epoch"]) for r in evals] == [(2, 1.0), (3, 1.5)]


def test_monitors_against_a_hand_worked_sequence():
    # min mode, min_delta 0.1, patience 2: 1.0 (best), 0.95 (not 0.1 better: 1), 0.85 (best: 0), 0.9 (1), 0.86 (2: stop)
    monitors = Monitors(best_settings({"metric": "loss"}),
                        early_stopping_settings({"metric": "eval_loss", "patience": 2, "min_delta": 0.1}))
    state: dict = {}
    seen = [monitors.observe(state, step, {"eval_loss": value})
            for step, value in enumerate([1.0, 0.95, 0.85, 0.9, 0.86], 1)]
    assert seen == [(True, False), (True, False), (True, False), (False, False), (False, True)]
    assert state["best"] == {"value": 0.85, "step": 3, "bad": 2}
    assert state["early_stopping"] == {"value": 0.85, "step": 3, "bad": 2}
    assert monitors.observe(state, 5, {"eval_loss": 0.1}) == (False, True)  # step 5 again: no change
    # max mode (accuracy's default), NaN never improves
    up = Monitors(best_settings({"metric": "eval_accuracy"}), None)
    state = {}
    for step, value in enumerate([0.5, float("nan"), 0.75, 0.6], 1):
        up.observe(state, step, {"eval_accuracy": value})
    assert state["best"]["step"] == 3 and state["best"]["value"] == 0.75


@pytest.mark.parametrize("training, message", [
    ({"best": {"metric": "eval_accuracy"}, "eval_every": 2}, "training.best.metric: 'eval_accuracy' is not reported"),
    ({"early_stopping": {"metric": "exact_match"}, "eval_every": 2}, "training.early_stopping.metric"),
    ({"best": {"metric": "eval_loss"}}, "training.eval_every"),
    ({"best": {"metric": "eval_loss", "mode": "up"}, "eval_every": 2}, "training.best.mode"),
    ({"early_stopping": {"patience": 0}, "eval_every": 2}, "training.early_stopping.patience"),
    ({"early_stopping": {"patiense": 2}, "eval_every": 2}, "training.early_stopping.patiense"),
    ({"best": "eval_loss", "eval_every": 2}, "training.best: expected a mapping"),
    ({"best": {"metric": "mymodule:score"}, "eval_every": 2, "eval_metrics": ["mymodule:score"]}, "training.best.mode"),
    ({"epochs": 0}, "training.epochs"),
    ({"max_steps": None, "epochs": 1, "warmup": 1000}, "training.warmup"),
])
def test_a_metric_or_setting_the_run_cannot_use_is_refused_before_step_1(tmp_path, training, message):
    recipe = llama_text_recipe(tmp_path, **SMALL)
    recipe["training"].update(training)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        train(from_dict(recipe))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_best_needs_evaluation_data(tmp_path):
    recipe = llama_text_recipe(tmp_path, training__best={"metric": "eval_loss"}, training__eval_every=1)
    recipe["data"]["eval"] = None
    with pytest.raises(ConfigError, match="training.best: judges evaluations"):
        from_dict(recipe)


def test_best_is_the_adapter_of_the_best_evaluation_and_survives_pruning(tmp_path):
    # mode max on eval_loss: the worst evaluation (the first, as the loss falls) is "best", a step before the end
    settings = dict(training__max_steps=4, training__eval_every=1, training__save_every=1,
                    training__best={"metric": "eval_loss", "mode": "max"}, **SMALL)
    kept = train(from_dict(llama_text_recipe(tmp_path / "all", training__keep_checkpoints=None, **settings)))
    evals = [r for r in read_metrics(tmp_path / "all" / "run") if "eval_loss" in r]
    best_step = max(evals, key=lambda r: r["eval_loss"])["step"]
    assert kept.best_step == best_step and kept.best == tmp_path / "all" / "run" / "best"
    assert best_step < 4
    checkpoint = tmp_path / "all" / "run" / "checkpoints" / f"step-{best_step:06d}"
    _equal(_tensors(checkpoint / "adapter"), _tensors(kept.best))
    assert json.loads((kept.best / "best.json").read_text())["step"] == best_step

    train(from_dict(llama_text_recipe(tmp_path / "pruned", training__keep_checkpoints=1, **settings)))
    run = tmp_path / "pruned" / "run"
    assert [p.name for p in checkpointing.checkpoint_dirs(run)] == ["step-000004"]
    _equal(_tensors(kept.best), _tensors(run / "best"))
    _equal(adapter_tensors(tmp_path / "all" / "run"), adapter_tensors(run))


def test_early_stopping_and_best_resumed_mid_epoch_equal_the_uninterrupted_run(tmp_path):
    # min_delta 1.0 (nats): no evaluation after the first improves enough, so patience 2 stops the run at the
    # third evaluation (step 6 of 8); the interruption at step 3 is mid-epoch (0.75) and between evaluations.
    settings = dict(training__max_steps=None, training__epochs=2, training__eval_every=2, adapter__dropout=0.1,
                    training__best={"metric": "eval_loss"},
                    training__early_stopping={"metric": "eval_loss", "patience": 2, "min_delta": 1.0}, **SMALL)
    reference = train(from_dict(llama_text_recipe(tmp_path / "a", **settings)))
    assert (reference.status, reference.step, reference.stopped_early) == ("done", 6, True)

    def interrupt(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    recipe = from_dict(llama_text_recipe(tmp_path / "b", **settings))
    stopped = train(recipe, hooks=[interrupt])
    assert (stopped.status, stopped.step) == ("interrupted", 3)
    assert read_metrics(tmp_path / "b" / "run")[-1]["epoch"] == 0.75
    resumed = train(recipe, resume=True)
    assert (resumed.status, resumed.step, resumed.stopped_early) == ("done", 6, True)
    assert resumed.best_step == reference.best_step and resumed.eval_metrics == reference.eval_metrics
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    _equal(adapter_tensors(a), adapter_tensors(b))
    _equal(_tensors(a / "best"), _tensors(b / "best"))

    def strip(records):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]

    assert strip(read_metrics(a)) == strip(read_metrics(b))
    # resuming the finished run changes nothing: it does not train on past the early stop
    again = train(recipe, resume=True)
    assert (again.step, again.stopped_early) == (6, True)
    assert strip(read_metrics(b)) == strip(read_metrics(a))


def test_a_resume_puts_back_the_best_of_its_checkpoint(tmp_path):
    """A run killed after a later best/ was written but before its next checkpoint: the resume must not keep
    that best/ (from steps it retraces, or not at all); it starts from the checkpoint's copy."""
    settings = dict(training__max_steps=4, training__eval_every=1, training__save_every=2,
                    training__keep_checkpoints=None, training__lr_schedule="constant",
                    training__best={"metric": "eval_loss"}, **SMALL)
    reference = train(from_dict(llama_text_recipe(tmp_path / "a", **settings)))
    recipe = from_dict(llama_text_recipe(tmp_path / "b", **settings))
    train(recipe)
    run = tmp_path / "b" / "run"
    # The crash: after step 3's best, before checkpoint 4 and the final adapter.
    shutil.rmtree(run / "checkpoints" / "step-000004")
    shutil.rmtree(run / "adapter")
    best_of_step_2 = _tensors(run / "checkpoints" / "step-000002" / "best")
    assert not all(torch.equal(v, _tensors(run / "best")[k]) for k, v in best_of_step_2.items())
    # Resumed to step 2 only: best/ is the one of the steps up to the checkpoint, not the abandoned steps' one.
    short = train(from_dict(llama_text_recipe(tmp_path / "b", **{**settings, "training__max_steps": 2})), resume=True)
    assert short.step == 2 and json.loads((run / "best" / "best.json").read_text())["step"] == short.best_step
    _equal(best_of_step_2, _tensors(run / "best"))
    # On to the end: the same run as the uninterrupted one.
    finished = train(recipe, resume=True)
    assert finished.best_step == reference.best_step
    _equal(_tensors(tmp_path / "a" / "run" / "best"), _tensors(run / "best"))
    _equal(adapter_tensors(tmp_path / "a" / "run"), adapter_tensors(run))


CONTROL_RECIPES = [Path(__file__).parent.parent / "recipes" / "control" / "epochs-best-early-stopping.yaml"]


@pytest.mark.parametrize("path", CONTROL_RECIPES, ids=lambda p: p.stem)
def test_run_control_recipe_validates_and_runs_on_a_tiny_model(path, tmp_path):
    from train_fixtures import TINY_CONFIGS, classification_rows, write_jsonl

    from peftkit.train.recipe import apply_overrides, read_yaml

    raw = read_yaml(path)
    recipe = from_dict(raw)
    assert recipe.training.epochs and recipe.training.best and recipe.training.early_stopping
    config = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_CONFIGS["bert"].items()) + "}"
    tiny = from_dict(apply_overrides(raw, [
        "model.name=null", f"model.config={config}", "model.tokenizer=bytes",
        f"data.train={write_jsonl(tmp_path / 'train.jsonl', classification_rows(24, 1))}",
        f"data.eval={write_jsonl(tmp_path / 'eval.jsonl', classification_rows(8, 2))}",
        "training.batch_size=4", "training.eval_every=2", "training.save_every=2", "training.epochs=0.5",
        f"training.output_dir={tmp_path / 'run'}", "logging.progress_bar=false"]))
    result = train(tiny)  # 0.5 epochs of 6 micro-batches: 3 steps, evaluated at 2 and 3
    assert (result.status, result.step) == ("done", 3)
    assert result.best == tmp_path / "run" / "best" and result.best_step in (2, 3)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
