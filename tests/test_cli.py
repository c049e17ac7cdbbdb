"""The ``peftkit`` command line: every subcommand, and every bad input of issue 3 ending in exit code 2 with
one message, no traceback, and nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import one_error, write_recipe
from multiproc import HANG_GUARD_S, REPO
from train_fixtures import TINY_CONFIGS, llama_text_recipe, write_jsonl

import peftkit
from peftkit.train.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run shared by the subcommand tests: (recipe file, run dir)."""
    tmp = tmp_path_factory.mktemp("cli")
    recipe = write_recipe(tmp / "recipe.yaml", llama_text_recipe(tmp, training__max_steps=3))
    assert main(["train", recipe]) == 0
    return recipe, tmp / "run"


BAD_OVERRIDES = [
    (["adapter.method=lorra"], ["unknown method 'lorra'", "Did you mean 'lora'"]),
    (["training.max_stpes=3"], ["training.max_stpes", "Did you mean 'training.max_steps'"]),
    (["trainig.max_steps=3"], ["trainig", "Did you mean 'training'"]),
    (["adapter.rr=4"], ["unknown option 'rr'"]),
    (["adapter.r=0"], ["r: expected a positive integer rank"]),
    (["adapter.targets=[nope_proj]"], ["targets", "nope_proj", "match no module"]),
    (["optimizer.lr=-1"], ["optimizer.lr", "positive"]),
    (["training.batch_size=two"], ["training.batch_size", "integer"]),
    (["data.format=images"], ["data.format", "expected one of"]),
    (["model.task=causal"], ["model.task"]),
    (["oops"], ["override 'oops'"]),
]


@pytest.mark.parametrize("overrides,needles", BAD_OVERRIDES, ids=[o[0] for o, _ in BAD_OVERRIDES])
def test_bad_recipe_values_exit_2_and_write_nothing(tmp_path, capsys, overrides, needles):
    recipe = write_recipe(tmp_path / "r.yaml", llama_text_recipe(tmp_path))
    one_error(capsys, ["train", recipe, *overrides], *needles)
    assert not (tmp_path / "run").exists()


def test_missing_recipe_and_malformed_yaml(tmp_path, capsys):
    one_error(capsys, ["train", str(tmp_path / "missing.yaml")], "file not found", "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: x\n data: [oops\n")
    one_error(capsys, ["validate", str(bad)], "bad.yaml line 3", "malformed YAML")


def test_dataset_missing_or_without_the_needed_columns(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", llama_text_recipe(tmp_path))
    one_error(capsys, ["train", recipe, f"data.train={tmp_path / 'nope.jsonl'}"], "data.train", "file not found")
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"question": "q", "answer": "a"}] * 8)
    one_error(capsys, ["train", recipe, f"data.train={wrong}", "data.format=instruction"],
              "['prompt', 'response']", "data.prompt_column", "Found: ['question', 'answer']")
    assert not (tmp_path / "run").exists()


def test_info_on_a_corrupt_adapter(trained, tmp_path, capsys):
    _, run = trained
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (broken / name).write_bytes((run / "adapter" / name).read_bytes())
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    one_error(capsys, ["info", str(broken)], "adapter_model.safetensors")
    one_error(capsys, ["info", str(tmp_path / "nothing")], "adapter_config.json", "not found")


def test_bad_input_from_a_fresh_process_has_no_traceback(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", llama_text_recipe(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "peftkit", "train", recipe, "adapter.method=nope"],
                          capture_output=True, text=True, cwd=REPO, timeout=HANG_GUARD_S)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("peftkit: error: unknown method 'nope'") and "Traceback" not in proc.stderr


def test_train_writes_the_run(trained):
    _, run = trained
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(records[0])
    assert "eval_perplexity" in records[-1]
    assert (run / "loss.png").is_file() and (run / "recipe.yaml").is_file()
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4


def test_validate_prints_the_resolved_recipe(trained, capsys):
    recipe, _ = trained
    assert main(["validate", recipe, "adapter.r=2", "training.max_steps=9"]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out.split("# ok")[0])
    assert printed["adapter"]["r"] == 2 and printed["training"]["max_steps"] == 9
    assert printed["training"]["lr_schedule"] == "cosine"  # defaults are filled in
    assert "# ok:" in out and "train examples" in out


def test_info_methods_plot_export_merge(trained, tmp_path, capsys):
    _, run = trained
    assert main(["info", str(run / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "method:     lora" in out and "r=4" in out and "verified" in out

    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    for name in peftkit.methods():
        assert name in listing

    (run / "loss.png").unlink()
    assert main(["plot", str(run)]) == 0 and (run / "loss.png").stat().st_size > 1000

    assert main(["export", str(run / "adapter"), "--out", str(tmp_path / "peft")]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    # merge: a full model that from_pretrained loads and that computes what base + adapter computes
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(TINY_CONFIGS["llama"])
    base_dir = tmp_path / "base"
    torch.manual_seed(3)  # the run's seed: the config-built base is the same model
    AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields)).save_pretrained(base_dir)
    assert main(["merge", str(run / "adapter"), "--base", str(base_dir), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    adapted = peftkit.load(AutoModelForCausalLM.from_pretrained(base_dir), run / "adapter")
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    one_error(capsys, ["merge", str(run / "adapter"), "--out", str(tmp_path / "m2")], "--base")
    assert not (tmp_path / "m2").exists()


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_report_to_tensorboard_writes_event_files(tmp_path):
    """tensorboard is a test dependency, so this runs the real tracker."""
    recipe = write_recipe(tmp_path / "r.yaml", llama_text_recipe(tmp_path, training__max_steps=2))
    assert main(["train", recipe, "logging.report_to=[tensorboard]"]) == 0
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))


def test_report_to_tensorboard_without_the_package_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # makes `import tensorboard` raise ImportError
    recipe = write_recipe(tmp_path / "r.yaml", llama_text_recipe(tmp_path, training__max_steps=2))
    one_error(capsys, ["train", recipe, "logging.report_to=[tensorboard]"], "peftkit[tensorboard]")
    assert not (tmp_path / "run").exists()


# Recipes whose every key is valid on its own but whose combination would silently do nothing or the wrong thing.
INCOHERENT = [
    (["training.eval_metrics=[accuracy]"], ["training.eval_metrics", "'accuracy'", "data.format", "'text'"]),
    (["training.eval_metrics=[exact_match]"], ["training.eval_metrics", "'exact_match'", "'text'"]),
    (["training.eval_metrics=[my_module:fn]", "data.eval=null"], ["training.eval_metrics", "set data.eval"]),
    (["training.lr_schedule=cosine_with_min_lr", "training.min_lr=0.5", "optimizer.lr=1e-3"],
     ["training.min_lr", "above the peak", "0.001"]),
    (["training.lr_schedule=polynomial", "training.min_lr=2e-3", "optimizer.lr=1e-3"],
     ["training.min_lr", "min_lr <= lr"]),
]


@pytest.mark.parametrize("overrides,needles", INCOHERENT, ids=[" ".join(o) for o, _ in INCOHERENT])
def test_incoherent_combinations_exit_2_before_step_1(tmp_path, capsys, overrides, needles):
    recipe = write_recipe(tmp_path / "r.yaml", llama_text_recipe(tmp_path))
    one_error(capsys, ["train", recipe, *overrides], *needles)
    assert not (tmp_path / "run").exists()


def test_min_lr_under_auto_lr_is_checked_against_the_resolved_rate(tmp_path, capsys):
    """optimizer.lr: auto resolves per method (plain LoRA: base_lr itself); the floor is checked against that."""
    recipe = write_recipe(tmp_path / "r.yaml", llama_text_recipe(tmp_path))
    one_error(capsys, ["train", recipe, "optimizer.lr=auto", "optimizer.base_lr=1e-4",
                       "training.lr_schedule=cosine_with_min_lr", "training.min_lr=1e-3"], "training.min_lr", "0.0001")


@pytest.mark.parametrize("spelling", ["null", "none", "None", "[]"])
def test_report_to_none_means_no_tracker(tmp_path, spelling):
    from peftkit.train.recipe import load_recipe

    recipe = write_recipe(tmp_path / "r.yaml", llama_text_recipe(tmp_path))
    assert load_recipe(recipe, [f"logging.report_to={spelling}"]).logging.report_to == []
