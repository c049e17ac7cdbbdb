"""Property tests of issue 14: recipes and overrides drawn from the schema and mutated (wrong types, out-of-range
and non-finite numbers, strings for booleans, unknown keys) through ``peftkit validate``; adapter folders
mutated (config fields, tensor shapes, truncation, bit flips) through ``info`` / ``merge`` / ``export`` and
``peftkit.load``. Every run ends in exit 0, or exit 2 with one ``peftkit: error:`` line and no traceback, and a
refused command writes nothing. The CLI runs in-process (``main(argv)``) for speed."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import peftkit  # noqa: E402
from peftkit import registry  # noqa: E402
from peftkit.checkpoint import PeftFields  # noqa: E402
from peftkit.config import AdapterConfig  # noqa: E402
from peftkit.errors import PeftkitError  # noqa: E402
from peftkit.train.cli import main  # noqa: E402
from peftkit.train.recipe import SECTIONS  # noqa: E402
from peftkit.validation import schema  # noqa: E402

from train_fixtures import llama_text_recipe  # noqa: E402

# PEFTKIT_PROPERTY_EXAMPLES=500 runs a longer, randomised soak (the suite runs 30 fixed examples per test).
SOAK = int(os.environ.get("PEFTKIT_PROPERTY_EXAMPLES", "0"))
PROPERTY = settings(max_examples=SOAK or 30, deadline=None, derandomize=not SOAK,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Keys that name files, folders, models or hub ids: a mutation there tests the file system or the hub, not the
# schema (and output_dir would be written by a valid run's trackers).
SKIPPED = {"model.name", "model.config", "model.tokenizer", "data.train", "data.eval", "data.subset",
           "data.train_split", "data.eval_split", "training.output_dir", "description"}


def schema_keys() -> list[tuple[str, str, typing.Any, typing.Any]]:
    """(method, dotted recipe key, type hint, rule) of every recipe key and of every option of each method's
    four components (architecture / init / schedule options go in ``adapter``, optimizer options in
    ``optimizer``)."""
    keys = []
    for section, cls in SECTIONS.items():
        for name, (hint, rule, _) in schema(cls).items():
            if name != "options" and f"{section}.{name}" not in SKIPPED:
                keys.append(("lora", f"{section}.{name}", hint, rule))
    skip_common = {"method", "architecture", "init", "optimizer", "schedule", "options", "targets", "exclude",
                   "modules_to_save"}
    for name, (hint, rule, _) in schema(AdapterConfig).items():
        if name not in skip_common:
            keys.append(("lora", f"adapter.{name}", hint, rule))
    for method_name in registry.methods():
        method = registry.get_method(method_name)
        for axis in registry.AXES:
            options = registry.get_component(axis, getattr(method, axis)).options
            section = "optimizer" if axis == "optimizer" else "adapter"
            for name, (hint, rule, _) in (schema(options).items() if options else []):
                keys.append((method_name, f"{section}.{name}", hint, rule))
    return keys


KEYS = schema_keys()


def valid_values(hint, rule) -> st.SearchStrategy:
    """Values the schema accepts, kept small so that a valid recipe validates in well under a second."""
    if rule.choices is not None:
        return st.sampled_from(rule.choices)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType")) else hint
    optional = type(None) in typing.get_args(hint)
    low = rule.ge if rule.ge is not None else (rule.gt if rule.gt is not None else 0)
    if base is bool:
        strategy = st.booleans()
    elif base is int:
        strategy = st.integers(int(low) + (1 if rule.gt is not None else 0), int(low) + 8)
    elif base is float:
        high = rule.le if rule.le is not None else (rule.lt if rule.lt is not None else low + 4)
        strategy = st.floats(low, high, exclude_min=rule.gt is not None, exclude_max=rule.lt is not None)
    elif typing.get_origin(base) is tuple:
        strategy = st.tuples(*[st.floats(0, 0.99) for _ in typing.get_args(base)]).map(list)
    elif typing.get_origin(base) is dict:
        strategy = st.just({})
    elif typing.get_origin(base) is list:
        strategy = st.just([])
    else:
        strategy = st.text("abc_", min_size=1, max_size=4)
    return st.one_of(st.none(), strategy) if optional else strategy


BAD_VALUES = st.sampled_from([
    math.inf, -math.inf, math.nan, -1, 0, -1e-3, 1e12, 2.5, "false", "true", "no", "0", "1e-4", "inf", ".nan",
    "abc", None, [1, "a"], {"k": 1}, [], True, False,
])


@st.composite
def mutation(draw) -> list[str]:
    """Overrides: the method, and a key of its schema with a valid or a bad value, or an unknown (typo) key."""
    method, key, hint, rule = draw(st.sampled_from(KEYS))
    kind = draw(st.sampled_from(["valid", "bad", "bad", "unknown"]))
    if kind == "unknown":
        section, name = key.split(".", 1)
        key = f"{section}.{name[:-1] if len(name) > 2 and draw(st.booleans()) else name + 'x'}"
        value = draw(valid_values(hint, rule))
    else:
        value = draw(valid_values(hint, rule)) if kind == "valid" else draw(BAD_VALUES)
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    text = text[: -len("...")].strip() if text.endswith("...") else text
    return [f"adapter.method={method}", f"{key}={text}"]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() or p.is_dir()}


def assert_exit_0_or_one_error(argv: list[str], capsys) -> int:
    from accelerate.state import AcceleratorState

    try:
        code = main(argv)  # any exception other than a PeftkitError escapes main: a traceback, so the test fails
    finally:
        # One CLI call is one process: Accelerate's process-wide state (mixed precision) must not carry over.
        AcceleratorState._reset_state()
    captured = capsys.readouterr()
    assert code in (0, 2), (argv, code, captured.err[-2000:])
    assert "Traceback" not in captured.err, captured.err
    if code == 2:
        errors = [line for line in captured.err.splitlines() if line.startswith("peftkit: error:")]
        assert len(errors) == 1, (argv, captured.err)
    return code


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("prop-recipe")
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(llama_text_recipe(root)))
    return root, str(path)


@PROPERTY
@given(mutations=st.lists(mutation(), min_size=1, max_size=2))
def test_validate_on_mutated_recipes_is_ok_or_one_error_and_writes_nothing(recipe_file, capsys, mutations):
    root, path = recipe_file
    overrides = [text for pair in mutations for text in pair]  # the last method wins
    before = tree(root)
    hypothesis.event(f"validate: exit {assert_exit_0_or_one_error(['validate', path, *overrides], capsys)}")
    assert tree(root) == before  # validate writes nothing, whether it passes or not


# ------------------------------------------------------------------------------------------ adapter folders
SOURCE_METHODS = ("lora", "hydra")  # PEFT's LoRA format, and a peftkit-only format


@pytest.fixture(scope="module")
def adapter_source(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """(base model folder, {method: adapter folder saved from it, r=2 on q_proj / v_proj, with its sha256})."""
    from transformers import LlamaForCausalLM

    from helpers import tiny_llama

    root = tmp_path_factory.mktemp("prop-adapter")
    tiny_llama(0).save_pretrained(root / "base")
    folders = {}
    for method in SOURCE_METHODS:
        model = LlamaForCausalLM.from_pretrained(root / "base")
        peftkit.wrap(model, method, r=2, targets=["q_proj", "v_proj"])
        peftkit.save(model, root / method)
        folders[method] = root / method
    return root / "base", folders


JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10 ** 7), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["false", "inf", "8", "LORA", "HRA", "lora", "", "q_proj"]),
    st.lists(st.sampled_from(["q_proj", 1, None]), max_size=2), st.dictionaries(st.sampled_from(["q_proj", "x"]),
                                                                                 st.sampled_from([0, 4, -1, "a", 1.5]),
                                                                                 max_size=2),
)
PEFT_KEYS = [f.name for f in dataclasses.fields(PeftFields) if f.name != "peftkit"] + ["lora_bias", "bias"]
PEFTKIT_CONFIG_KEYS = [f.name for f in dataclasses.fields(AdapterConfig)]


@st.composite
def folder_damage(draw):
    kind = draw(st.sampled_from(["peft_field", "peftkit_field", "shape", "truncate", "bitflip", "bitflip_no_sha"]))
    if kind == "peft_field":
        return kind, draw(st.sampled_from(PEFT_KEYS)), draw(JSON_VALUES)
    if kind == "peftkit_field":
        return kind, draw(st.sampled_from(PEFTKIT_CONFIG_KEYS)), draw(JSON_VALUES)
    if kind == "shape":
        return kind, draw(st.integers(0, 3)), (draw(st.integers(-1, 1)), draw(st.integers(-1, 1)))
    return kind, draw(st.floats(0, 1, exclude_max=True)), draw(st.integers(0, 7))


def damage(folder: Path, kind: str, a, b) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    config = json.loads(config_path.read_text())
    meta_path = folder / "peftkit.json"  # peftkit's metadata sidecar
    meta = json.loads(meta_path.read_text())
    if kind == "peft_field":
        config[a] = b
        meta.pop("config_sha256", None)  # else the edit is caught as a mixed save before the field is read
    elif kind == "peftkit_field":
        meta["config"][a] = b
    elif kind == "shape":
        tensors = load_file(str(weights_path))
        key = sorted(tensors)[a % len(tensors)]
        shape = list(tensors[key].shape)
        shape[0] = max(shape[0] + b[0], 1)
        shape[-1] = max(shape[-1] + b[1], 1)
        tensors[key] = torch.zeros(shape)
        save_file(tensors, str(weights_path))
        meta.pop("weights_sha256")  # as a plain PEFT adapter, so the shapes themselves are checked
    else:
        data = bytearray(weights_path.read_bytes())
        position = int(a * len(data))
        if kind == "truncate":
            del data[position:]
        else:
            data[position] ^= 1 << b
            if kind == "bitflip_no_sha":
                meta.pop("weights_sha256")
        weights_path.write_bytes(bytes(data))
    config_path.write_text(json.dumps(config))
    meta_path.write_text(json.dumps(meta))


@pytest.fixture()
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prop-run")


@PROPERTY
@given(hurt=folder_damage(), command=st.sampled_from(["info", "merge", "export", "load"]),
       method=st.sampled_from(SOURCE_METHODS))
def test_commands_on_mutated_adapter_folders_are_ok_or_one_error(adapter_source, scratch, capsys, hurt, command,
                                                                 method):
    import shutil

    from transformers import LlamaForCausalLM

    base, sources = adapter_source
    source = sources[method]
    work = scratch / f"case{len(os.listdir(scratch))}"
    shutil.copytree(source, work / "adapter")
    damage(work / "adapter", *hurt)
    out = work / "out"
    if command == "load":
        model = LlamaForCausalLM.from_pretrained(base)
        try:
            peftkit.load(model, work / "adapter")
            hypothesis.event(f"load {hurt[0]}: ok")
        except PeftkitError as exc:
            hypothesis.event(f"load {hurt[0]}: refused")
            assert "\n" not in str(exc)
        return
    argv = {"info": ["info", str(work / "adapter")],
            "merge": ["merge", str(work / "adapter"), "--base", str(base), "--out", str(out)],
            "export": ["export", str(work / "adapter"), "--out", str(out), "--base", str(base)]}[command]
    before = tree(work)
    code = assert_exit_0_or_one_error(argv, capsys)
    hypothesis.event(f"{command} {hurt[0]}: exit {code}")
    if code == 2:
        assert tree(work) == before  # a refused command writes nothing
