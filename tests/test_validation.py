"""Issue 14's validation half: one validation layer (peftkit/validation.py) for recipe keys, overrides, wrap /
optimizer options and adapter_config.json fields; data rows checked before tokenizing; the errors that were
tracebacks end in one ``peftkit: error:`` line with exit code 2."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import helpers
import pytest
import torch
import yaml
from helpers import tiny_llama, write_recipe
from train_fixtures import (
    TINY_CONFIGS,
    classification_rows,
    instruction_rows,
    llama_text_recipe,
    text_rows,
    write_jsonl,
)

import peftkit
from peftkit.errors import CheckpointError, ConfigError
from peftkit.train.recipe import from_dict

# Other lines (warnings) may come with the error line.
one_error = functools.partial(helpers.one_error, alone=False)


# ------------------------------------------------------------------------------------------ wrap / optimizer
@pytest.mark.parametrize("options,field", [
    ({"alpha": math.inf}, "alpha"),
    ({"alpha": "16"}, "alpha"),
    ({"rslora": "false"}, "rslora"),  # used to turn rsLoRA on (a non-empty string is truthy)
    ({"rslora": 1}, "rslora"),
    ({"rank_pattern": {"q_proj": math.nan}}, "rank_pattern"),
    ({"seed": "0"}, "seed"),
    ({"init": ["eva"]}, "init"),  # was a TypeError (unhashable list) from the registry lookup
])
def test_wrap_refuses_strings_for_booleans_and_numbers_and_non_finite_values(options, field):
    model = tiny_llama()
    with pytest.raises(ConfigError, match=rf"^{field}: expected .*, got "):
        peftkit.wrap(model, "lora", **options)
    assert peftkit.trainable_parameters(model).trainable == sum(p.numel() for p in model.parameters())


def test_component_options_are_checked_by_their_declared_rules():
    model = tiny_llama()
    with pytest.raises(ConfigError,
                       match=r"^init_lora_weights: expected one of true, false, 'gaussian'.*did you mean 'gaussian'"):
        peftkit.wrap(model, "lora", init_lora_weights="gausian")
    with pytest.raises(ConfigError, match=r"^orth_reg_weight: expected a finite number >= 0"):
        peftkit.wrap(model, "hra", r=2, orth_reg_weight=math.nan)


@pytest.mark.parametrize("lr,options,field", [
    (math.inf, {}, "lr"),
    (1e-3, {"weight_decay": math.nan}, "weight_decay"),
    (1e-3, {"betas": (0.9, 1.5)}, "betas"),  # was torch's ValueError from AdamW, not a peftkit error
    (1e-3, {"betas": ("a", 0.9)}, "betas"),
    (1e-3, {"eps": -1e-8}, "eps"),
    (1e-3, {"eps": math.inf}, "eps"),
])
def test_optimizer_options_are_finite_and_in_range(lr, options, field):
    model = peftkit.wrap(tiny_llama(), "lora", r=2)
    with pytest.raises(ConfigError, match=rf"^{field}: expected"):
        peftkit.optimizer(model, lr, **options)


def test_pair_optimizer_refuses_a_nan_clip_norm():
    model = peftkit.wrap(tiny_llama(), "lora-pro", r=2)
    with pytest.raises(ConfigError, match=r"^max_grad_norm: expected"):
        peftkit.optimizer(model, 1e-3, max_grad_norm=math.nan)


# ------------------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("section,key,value,needle", [
    ("optimizer", "lr", math.inf, "optimizer.lr: expected a positive learning rate"),
    ("optimizer", "weight_decay", math.nan, "optimizer.weight_decay: expected a finite number >= 0"),
    ("training", "max_grad_norm", math.nan, "training.max_grad_norm: expected a finite number > 0 or null"),
    ("training", "warmup", math.inf, "training.warmup"),
    ("data", "packing", "false", "data.packing: expected true or false or null, got the string 'false'"),
    ("adapter", "alpha", math.inf, "adapter.alpha: expected a positive number"),
    ("adapter", "rslora", "false", "adapter.rslora: expected true or false"),
    ("optimizer", "betas", [0.9, 1.0], "optimizer.betas: expected 2 finite numbers in [0, 1)"),
    ("optimizer", "eps", -1.0, "optimizer.eps"),
    ("optimizer", "epss", 1e-8, "Did you mean 'optimizer.eps'"),
])
def test_recipe_values_pass_the_same_rules(tmp_path, section, key, value, needle):
    recipe = llama_text_recipe(tmp_path)
    recipe[section][key] = value
    with pytest.raises(ConfigError) as info:
        from_dict(recipe)
    assert needle in str(info.value), str(info.value)


def test_yaml_exponent_numbers_are_numbers_and_quoted_numbers_are_refused(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    recipe = llama_text_recipe(tmp_path)
    text = yaml.safe_dump(recipe).replace("lr: 0.01", "lr: 1e-2")
    assert "lr: 1e-2" in text
    path.write_text(text)
    from peftkit.train.recipe import load_recipe

    assert load_recipe(path).optimizer.lr == 1e-2
    assert load_recipe(path, ["optimizer.lr=3e-4"]).optimizer.lr == 3e-4
    one_error(capsys, ["validate", str(path), "optimizer.lr='1e-4'"], "optimizer.lr", "(unquoted)")


def test_a_recipe_in_another_encoding_is_one_error(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_bytes(yaml.safe_dump(llama_text_recipe(tmp_path)).encode() + "description: caf\xe9\n".encode("latin-1"))
    one_error(capsys, ["validate", str(path)], str(path), "not UTF-8")


# ------------------------------------------------------------------------------------------ CLI errors
def test_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    recipe = write_recipe(tmp_path / "r.yaml", llama_text_recipe(tmp_path))
    one_error(capsys, ["train", recipe, f"training.output_dir={tmp_path / 'afile'}"], "training.output_dir",
              "is a file")
    one_error(capsys, ["train", recipe, f"training.output_dir={tmp_path / 'afile' / 'run'}"], "training.output_dir")
    assert (tmp_path / "afile").read_text() == "mine"


def test_export_out_that_is_a_file(tmp_path, capsys):
    model = peftkit.wrap(tiny_llama(), "lora", r=2)
    peftkit.save(model, tmp_path / "adapter")
    (tmp_path / "afile").write_text("mine")
    one_error(capsys, ["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "afile")], "--out", "is a file")
    assert (tmp_path / "afile").read_text() == "mine"


def test_data_file_in_another_encoding(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", llama_text_recipe(tmp_path))
    bad = tmp_path / "latin1.jsonl"
    row = json.dumps({"text": "x"}).replace("x", "caf\xe9 " * 20)
    bad.write_bytes("".join(row + "\n" for _ in range(40)).encode("latin-1"))
    one_error(capsys, ["validate", recipe, f"data.train={bad}"], "data.train", str(bad), "is not UTF-8 text")


def test_sequences_longer_than_the_model_positions_fail_before_training(tmp_path, capsys):
    recipe = llama_text_recipe(tmp_path)
    recipe["model"]["config"] = dict(TINY_CONFIGS["gpt2"])  # learned positions: 64
    recipe["data"]["max_length"] = 80
    path = write_recipe(tmp_path / "r.yaml", recipe)
    one_error(capsys, ["validate", path], "data.max_length", "64 positions")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ data rows
def classification_recipe(tmp_path: Path, train_rows: list[dict], eval_rows: list[dict] | None = None) -> dict:
    recipe = llama_text_recipe(tmp_path)
    recipe["model"] = {"config": dict(TINY_CONFIGS["bert"]), "tokenizer": "bytes", "task": "sequence-classification"}
    recipe["data"] = {"train": write_jsonl(tmp_path / "data" / "ctrain.jsonl", train_rows), "format": "classification",
                      "max_length": 32}
    if eval_rows is not None:
        recipe["data"]["eval"] = write_jsonl(tmp_path / "data" / "ceval.jsonl", eval_rows)
    return recipe


def test_null_labels_are_not_a_class_named_none(tmp_path, capsys):
    rows = [{"text": s["text"], "label": ["a", "b", None][i % 3]} for i, s in enumerate(classification_rows(24))]
    path = write_recipe(tmp_path / "r.yaml", classification_recipe(tmp_path, rows))
    one_error(capsys, ["validate", path], "data.train", "row 3", "'label'", "7 more rows")


def test_integer_train_labels_with_string_eval_labels_are_refused(tmp_path, capsys):
    train = classification_rows(24)  # labels 0 / 1
    evaluation = [{"text": r["text"], "label": "pos" if r["label"] else "neg"} for r in classification_rows(8, seed=5)]
    path = write_recipe(tmp_path / "r.yaml", classification_recipe(tmp_path, train, evaluation))
    one_error(capsys, ["validate", path], "data.eval", "string labels but data.train has integer labels")


def test_mixed_label_kinds_in_one_dataset_are_refused():
    from peftkit.train.data import check_rows
    from peftkit.train.recipe import DataSection

    # (a JSON file's column is cast to one type by the reader; rows from a hub dataset or a generator are not)
    rows = [{"text": r["text"], "label": r["label"] if i % 2 else str(r["label"])}
            for i, r in enumerate(classification_rows(24))]
    data = DataSection(train="x", format="classification")
    with pytest.raises(ConfigError,
                       match=r"^data.train: x mixes integer and string labels in 'label' \(row 2: 1, row 1: '0'\)"):
        check_rows(rows, data, "data.train", "x")
    rows[0]["label"] = True
    with pytest.raises(ConfigError, match=r"row 1: label True in 'label' is neither an integer"):
        check_rows(rows, data, "data.train", "x")


@pytest.mark.parametrize("fmt,column", [("text", "text"), ("instruction", "prompt"), ("instruction", "response")])
def test_null_or_missing_text_is_not_trained_on_as_none(tmp_path, capsys, fmt, column):
    rows = text_rows(64, seed=1) if fmt == "text" else instruction_rows(64, seed=1)
    rows[5][column] = None
    del rows[9][column]  # a row without the column at all
    recipe = llama_text_recipe(tmp_path)
    recipe["data"] = {"train": write_jsonl(tmp_path / "data" / "t.jsonl", rows), "format": fmt, "max_length": 16}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    one_error(capsys, ["validate", path], "data.train", "row 6", f"'{column}'", "1 more rows")


# ------------------------------------------------------------------------------------------ adapter configs
@pytest.fixture()
def peft_lora_dir(tmp_path) -> Path:
    """A plain PEFT-style LoRA folder (no peftkit section, so no sha256 guards the config)."""
    model = peftkit.wrap(tiny_llama(), "lora", r=2, targets=["q_proj"])
    folder = tmp_path / "adapter"
    peftkit.save(model, folder)
    (folder / "peftkit.json").unlink()  # peftkit's metadata sidecar
    return folder


def edit_config(folder: Path, **fields) -> None:
    data = json.loads((folder / "adapter_config.json").read_text())
    data.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(data))


@pytest.mark.parametrize("fields,needle", [
    ({"lora_alpha": "inf"}, "lora_alpha: expected a finite number > 0, got the string 'inf'"),
    ({"lora_alpha": float("inf")}, "lora_alpha"),
    ({"r": "2"}, "r: expected an integer > 0, got the string '2'"),
    ({"use_rslora": "false"}, "use_rslora: expected true or false"),
    ({"modules_to_save": 3}, "modules_to_save"),
    ({"rank_pattern": []}, "rank_pattern"),
    ({"peft_type": ["LORA"]}, "peft_type"),
])
def test_adapter_config_fields_of_the_wrong_json_type(peft_lora_dir, fields, needle):
    edit_config(peft_lora_dir, **fields)
    for action in (lambda: peftkit.load(tiny_llama(), peft_lora_dir),
                   lambda: peftkit.checkpoint.describe(peft_lora_dir)):
        with pytest.raises(CheckpointError) as info:
            action()
        assert needle in str(info.value) and "adapter_config.json" in str(info.value), str(info.value)


def test_peftkit_section_fields_are_checked(tmp_path):
    model = peftkit.wrap(tiny_llama(), "lora", r=2, targets=["q_proj"])
    peftkit.save(model, tmp_path / "a")
    data = json.loads((tmp_path / "a" / "peftkit.json").read_text())
    data["config"]["alpha"] = "inf"
    (tmp_path / "a" / "peftkit.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"peftkit.json: config.alpha: expected a positive number"):
        peftkit.load(tiny_llama(), tmp_path / "a")


def test_an_absurd_rank_is_refused_before_anything_is_allocated(peft_lora_dir, monkeypatch):
    import peftkit.adapters.lora as lora

    created = []
    original = lora.LoraBranch.__init__

    def recording(self, in_features, out_features, r, dropout, dtype, device, init=True):
        created.append((r, torch.device(device).type if device is not None else "default"))
        original(self, in_features, out_features, r, dropout, dtype, device, init)

    monkeypatch.setattr(lora.LoraBranch, "__init__", recording)
    absurd = 100_000
    edit_config(peft_lora_dir, r=absurd, lora_alpha=4.0)
    model = tiny_llama()
    # Issue 25: the adapter-folder reader compares the config's rank with the tensors before any model is involved
    with pytest.raises(CheckpointError, match=rf"disagree with the tensors.*config rank {absurd}"):
        peftkit.load(model, peft_lora_dir)
    assert all(device == "meta" for r, device in created if r == absurd), created
    assert not any(isinstance(m, peftkit.layer.AdapterLayer) for m in model.modules())


def test_peftkit_config_fields_are_typed_before_use(tmp_path, capsys):
    """Found by the property test: a list as the architecture name was a TypeError from the registry lookup."""
    model = peftkit.wrap(tiny_llama(), "lora", r=2, targets=["q_proj"])
    peftkit.save(model, tmp_path / "a")
    data = json.loads((tmp_path / "a" / "peftkit.json").read_text())
    data["config"]["architecture"] = ["lora"]
    (tmp_path / "a" / "peftkit.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"config.architecture: expected a string, got list"):
        peftkit.load(tiny_llama(), tmp_path / "a")
    one_error(capsys, ["info", str(tmp_path / "a")], "config.architecture")


@pytest.mark.parametrize("method,options", [("elalora", {"capacity": 10 ** 9})])
def test_absurd_size_options_are_refused_before_allocation(method, options):
    """Found by the property test: ElaLoRA's capacity=1e12 tried to allocate 128 TB (1e12 is now refused as over
    MAX_INT; 1e9 still is absurd). Sizes are measured on the meta device against the layer's own weight before
    anything is allocated."""
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"adapter would hold .* values, more than 8x the layer's own"):
        peftkit.wrap(model, method, r=2, **options)
    assert not any(isinstance(m, peftkit.layer.AdapterLayer) for m in model.modules())
