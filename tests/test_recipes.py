"""Every recipe in recipes/: it validates as written (schema, method and its options), and it trains for 2
steps with overrides that swap in a tiny config-built model of the same family and local data with the
recipe's own columns. The quickstart itself (real model, real run) is the slow test at the end."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from multiproc import HANG_GUARD_S, REPO
from train_fixtures import TINY_CONFIGS, classification_rows, instruction_rows, text_rows, write_jsonl

from peftkit import registry
from peftkit.config import resolve_config
from peftkit.train import from_dict, train
from peftkit.train.recipe import apply_overrides, read_yaml

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_there_is_a_recipe_per_method_and_a_quickstart(monkeypatch):
    """One recipe per registered method (the registry, not a list kept by hand), named after it, and the
    quickstart; a method registered without a recipe fails the check."""
    names = {p.stem for p in RECIPES}
    assert len(registry.methods()) >= 11 and names == set(registry.methods()) | {"quickstart"}
    monkeypatch.setitem(registry._methods, "a-method-without-recipe", registry.get_method("lora"))
    assert names != set(registry.methods()) | {"quickstart"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_as_written(path):
    recipe = from_dict(read_yaml(path))
    assert path.stem == "quickstart" or recipe.adapter.method == path.stem
    config = resolve_config(recipe.adapter.method, **recipe.adapter.options)  # method + its options exist
    name = recipe.optimizer.name or config.optimizer
    valid = set(registry.get_component("optimizer", name).option_names())
    assert set(recipe.optimizer.options) <= valid, f"unknown optimizer options {set(recipe.optimizer.options) - valid}"
    assert recipe.model.name and recipe.data.train  # a real model and dataset, not a tiny stand-in


def tiny_family(recipe) -> str:
    name = (recipe.model.name or "").lower()
    for family in ("gpt2", "qwen", "roberta"):
        if family in name:
            return "qwen2" if family == "qwen" else family
    return "bert" if recipe.model.task == "sequence-classification" else "llama"


def local_data(recipe, folder: Path) -> list[str]:
    """Overrides pointing data.train / data.eval at local files with the columns the recipe names."""
    d = recipe.data
    if d.format == "text":
        make = lambda n, seed: text_rows(n, seed, d.text_column)  # noqa: E731
    elif d.format == "instruction":
        make = lambda n, seed: instruction_rows(n, seed, d.prompt_column, d.response_column)  # noqa: E731
    else:
        make = lambda n, seed: classification_rows(n, seed, d.text_column, d.label_column, d.text_pair_column)  # noqa: E731
    overrides = [f"data.train={write_jsonl(folder / 'train.jsonl', make(24, 1))}", "data.max_train_samples=null"]
    if d.eval:
        overrides.append(f"data.eval={write_jsonl(folder / 'eval.jsonl', make(8, 2))}")
    return overrides


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_two_steps_on_a_tiny_model(path, tmp_path):
    raw = read_yaml(path)
    recipe = from_dict(raw)
    family = tiny_family(recipe)
    config = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_CONFIGS[family].items()) + "}"
    overrides = [
        "model.name=null", f"model.config={config}", "model.tokenizer=bytes", "model.dtype=float32",
        "model.quantize=null", "data.subset=null", "data.max_length=60", "data.max_eval_samples=null",
        *local_data(recipe, tmp_path / "data"),
        "adapter.init_batches=2", "training.max_steps=2", "training.batch_size=2", "training.grad_accum=1",
        "training.save_every=null", "training.eval_every=null", "training.mixed_precision=no",
        f"training.output_dir={tmp_path / 'run'}", "logging.progress_bar=false", "logging.report_to=[]",
    ]
    if family == "gpt2":
        overrides.append("model.config.n_positions=64")
    tiny = from_dict(apply_overrides(raw, overrides))
    result = train(tiny)
    assert result.status == "done" and result.step == 2
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    if tiny.data.eval:
        assert result.eval_metrics and all(math.isfinite(v) for v in result.eval_metrics.values())


@pytest.mark.slow
def test_quickstart_learns(tmp_path):
    """The README's quickstart command, as a user runs it: real all-MiniLM-L6-v2, 2 CPU threads. (Its wall
    time is measured and quoted in README.md, not asserted here: timings stay out of tests.)"""
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "peftkit", "train", str(REPO / "recipes" / "quickstart.yaml"),
                           f"training.output_dir={tmp_path / 'quickstart'}", "logging.progress_bar=false"],
                          capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    accuracy = float(re.search(r"eval_accuracy ([0-9]+\.[0-9]+)", proc.stdout).group(1))
    loss = float(re.search(r"eval_loss ([0-9]+\.[0-9]+)", proc.stdout).group(1))
    print(f"quickstart: {seconds:.0f} s, eval loss {loss:.4f}, eval accuracy {accuracy:.4f}")
    # The band README.md and getting-started promise, not one CPU's digits (0.1528 / 0.9583 here, 0.1398 /
    # 0.9792 on another CPU: float32 kernels sum in a CPU-dependent order).
    assert 0.94 <= accuracy <= 1.0 and 0.10 <= loss <= 0.20, (loss, accuracy)
