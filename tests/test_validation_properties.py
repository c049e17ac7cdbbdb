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
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from train_fixtures import llama_text_recipe  # noqa: E402

import peftkit  # noqa: E402
from peftkit import registry  # noqa: E402
from peftkit.checkpoint import PeftFields  # noqa: E402
from peftkit.config import AdapterConfig  # noqa: E402
from peftkit.errors import PeftkitError  # noqa: E402
from peftkit.train.cli import main  # noqa: E402
from peftkit.train.recipe import SECTIONS  # noqa: E402
from peftkit.validation import schema  # noqa: E402

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
    from helpers import tiny_llama
    from transformers import LlamaForCausalLM

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


# ------------------------------------------------------------------------------------------ issue 25's classes
from peftkit.train import checkpointing  # noqa: E402
from peftkit.train.recipe import read_yaml  # noqa: E402
from peftkit.validation import MAX_INT, MAX_NODES, InputTooLarge, check_value, compile_pattern, size_of, yaml_load  # noqa: E402

KEY_NAMES = st.text("abcdefgh_", min_size=1, max_size=6)


@st.composite
def yaml_with_duplicate(draw) -> tuple[str, str, int, int]:
    """(YAML text of nested mappings with one key repeated in one mapping, the key, its two line numbers)."""
    depth = draw(st.integers(0, 3))
    lines, indent = [], ""
    for level in range(depth):
        for key in draw(st.lists(KEY_NAMES, unique=True, max_size=2)):
            lines.append(f"{indent}{key}x{level}: {draw(st.integers(0, 9))}")
        lines.append(f"{indent}nest{level}:")
        indent += "  "
    keys = draw(st.lists(KEY_NAMES, unique=True, min_size=1, max_size=5))
    repeated = draw(st.sampled_from(keys))
    body = [f"{indent}{key}: {draw(st.integers(0, 9))}" for key in keys]
    at = draw(st.integers(keys.index(repeated) + 1, len(keys)))
    body.insert(at, f"{indent}{repeated}: {draw(st.sampled_from(['1', 'x', '[1, 2]', '{a: 1}']))}")
    first = len(lines) + keys.index(repeated) + 1
    return "\n".join(lines + body) + "\n", repeated, first, len(lines) + at + 1


@PROPERTY
@given(case=yaml_with_duplicate())
def test_a_repeated_key_at_any_depth_is_refused_with_both_lines(tmp_path_factory, case):
    text, key, first, second = case
    path = tmp_path_factory.mktemp("dup") / "r.yaml"
    path.write_text(text)
    with pytest.raises(PeftkitError) as info:
        read_yaml(path)
    message = str(info.value)
    assert f"duplicate key '{key}' (first at line {first})" in message and f"line {second}," in message, (text, message)


@PROPERTY
@given(levels=st.integers(1, 12), width=st.integers(1, 12), where=st.sampled_from(["top", "list", "map"]))
def test_alias_bombs_are_refused_exactly_when_their_expansion_is_too_large(levels, width, where):
    """A chain of anchors, each level repeating the previous one ``width`` times: refused (quickly, whatever
    its expansion) iff the expanded value would hold MAX_NODES values or more; size_of counts what a walk visits."""
    lines = ["l0: &l0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    text = "\n".join(lines) + "\n"
    if where == "list":
        text = "outer:\n" + "".join(f"  {line}\n" for line in lines)
    elif where == "map":
        text = "outer: {" + ", ".join(lines) + "}\n"

    def expanded(level: int) -> int:  # a list at `level` holding `width` copies of the previous level
        return 1 + width * (1 if level == 0 else expanded(level - 1))

    total = 1 + sum(1 + expanded(i) for i in range(levels)) + (2 if where != "top" else 0)
    if total >= MAX_NODES:
        with pytest.raises(InputTooLarge, match="aliases"):
            yaml_load(text, "recipe")
    else:
        value = yaml_load(text, "recipe")
        assert size_of(value) == total


REGEX_TOKENS = ["a", "b", ".", "\\.", "*", "+", "?", "|", "(", ")", "[ab]", "{2}", "{1,3}", "^", "$", "_proj", "q",
                "(?:", "\\d", "(?P<n>", "\\1", "(?=", "[", "]"]


@PROPERTY
@given(tokens=st.lists(st.sampled_from(REGEX_TOKENS), min_size=1, max_size=8),
       names=st.lists(st.text("abq._proj0123", max_size=10), min_size=1, max_size=5))
def test_patterns_compile_with_one_error_or_match_as_pythons_re(tokens, names):
    """Any pattern is one ConfigError or a compiled RE2; where Python's re takes it too (no backreferences or
    look-arounds), both engines agree on every name, for targets (fullmatch) and rank_pattern (PEFT's suffix rule)."""
    import re

    from peftkit.config import pattern_key

    pattern = "".join(tokens)
    try:
        compiled = compile_pattern(pattern, "targets")
    except PeftkitError as exc:
        assert "targets" in str(exc) and "\n" not in str(exc)
        return
    try:
        python = re.compile(pattern)
    except re.error:
        return
    for name in names:
        assert (compiled.fullmatch(name) is not None) == (python.fullmatch(name) is not None), (pattern, name)
        ours = pattern_key({pattern: 4}, name) is not None
        assert ours == (re.match(rf"(.*\.)?({pattern})$", name) is not None), (pattern, name)


INT_KEYS = [(key, hint, rule) for _, key, hint, rule in KEYS if "int" in str(hint)]


@PROPERTY
@given(case=st.sampled_from(INT_KEYS) if INT_KEYS else st.nothing(),
       value=st.one_of(st.integers(MAX_INT + 1, 2 ** 64), st.integers(-(2 ** 64), -(MAX_INT + 1)),
                       st.integers(10 ** 100, 10 ** 4000), st.sampled_from([2 ** 63, 1e300, -1e300, 2.0 ** 63])))
def test_every_integer_field_refuses_a_huge_integer_in_one_short_error(case, value):
    key, hint, rule = case
    with pytest.raises(PeftkitError) as info:
        check_value(key, value, hint, rule)
    assert key in str(info.value) and len(str(info.value)) < 600


@PROPERTY
@given(digits=st.integers(4301, 20000), where=st.sampled_from(["training:\n  seed: {}\n", "x: [{}]\n", "{}\n"]))
def test_an_integer_literal_too_long_to_read_is_one_error(digits, where):
    with pytest.raises(PeftkitError) as info:
        yaml_load(where.format("7" * digits), "recipe")
    assert len(str(info.value)) < 600


USER_NAMES = [*checkpointing.RUN_FILES, "notes.txt", "data.jsonl", "checkpoints", "adapter", ".peftkit.lock"]


@PROPERTY
@given(entries=st.dictionaries(st.sampled_from(USER_NAMES), st.sampled_from(["file", "folder"]), max_size=5),
       resume=st.booleans())
def test_a_run_folder_check_refuses_or_passes_and_never_changes_the_folder(tmp_path_factory, entries, resume):
    """check_run_folder on any mix of the user's files and folders: a non-run folder holding a name a run writes
    is refused naming it; a run folder without --resume is refused; nothing in the folder changes either way."""
    root = tmp_path_factory.mktemp("runfolder")
    for name, kind in entries.items():
        (root / name).mkdir() if kind == "folder" else (root / name).write_text(f"user's {name}\n")
    before = tree(root)
    is_run = entries.get("checkpoints") == "folder" or entries.get("adapter") == "folder"
    clash = [n for n in checkpointing.RUN_FILES if n in entries]
    try:
        checkpointing.check_run_folder(root, resume)
        outcome = None
    except PeftkitError as exc:
        outcome = str(exc)
    assert tree(root) == before
    if resume:  # no folder here holds a complete checkpoint
        assert outcome is not None and "--resume" in outcome
    elif "adapter" in entries:
        assert outcome is not None and "already holds a run" in outcome
    elif not is_run and clash:
        assert outcome is not None and all(n in outcome for n in clash), outcome
    else:
        assert outcome is None, outcome
