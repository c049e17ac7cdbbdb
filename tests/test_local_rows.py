"""Local JSON, JSON Lines and CSV files read without ``datasets`` (peftkit/train/local_rows.py): the same rows, in
the same column order, as ``datasets.load_dataset`` gives, or None (then the file goes through ``datasets``, as
before); the same tokens through the whole data pipeline; and a plain ``peftkit train`` run on local data imports
neither ``datasets`` nor PEFT, bitsandbytes or DeepSpeed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from train_fixtures import TINY_CONFIGS, varied_instruction_rows, write_jsonl

from peftkit.train import from_dict
from peftkit.train.build import load_examples, load_tokenizer
from peftkit.train.local_rows import RegularRows, from_list, read_csv, read_json

MESSAGES = [{"role": "system", "content": "Réponds en une phrase ✓"}, {"role": "user", "content": "2 + 2 ?"},
            {"role": "assistant", "content": "4 — vier, 四"}]
REGULAR = {  # read here: must equal datasets' rows
    "text.jsonl": '{"text": "héllo wörld ✓ 😀"}\n{"text": ""}\n\n{"text": "a\\nb"}\n',
    "missing.jsonl": '{"a": "x", "b": 1}\n{"b": 2, "c": "z"}\n{"a": null, "b": 3}\n',
    "int_float.jsonl": '{"x": 1, "y": "a"}\n{"x": 2.5, "y": "b"}\n',
    "messages.jsonl": "".join(json.dumps({"messages": m}) + "\n" for m in (MESSAGES, MESSAGES[1:], [])),
    "reordered_keys.jsonl": '{"messages": [{"role": "user", "content": "q"}]}\n'
                            '{"messages": [{"content": "a", "role": "assistant"}]}\n',
    "nested.jsonl": '{"messages": [{"role": "user", "content": "q", '
                    '"tool_calls": [{"name": "f", "args": {"a": 1}}]}]}\n',
    "lists.jsonl": '{"tags": [1, 2], "text": "a"}\n{"tags": [], "text": "b"}\n{"tags": null, "text": "c"}\n',
    "bool_null.jsonl": '{"t": true, "text": "a", "u": null}\n{"t": false, "text": "b", "u": null}\n',
    "bom_crlf.jsonl": '\ufeff{"text": "a"}\r\n{"text": "b"}\r\n',
    "array.json": json.dumps([{"text": "a", "label": 0}, {"text": "b ✓", "label": 1}], ensure_ascii=False),
    "strings.json": json.dumps(["a", "b ✓"]),
    "one_object.json": json.dumps({"text": ["a", "b"]}),
    "text.csv": 'text,label\nhéllo ✓,0\n"with, comma",1\n"multi\nline",2\n\n"quoted ""x""",3\n',
    "names.csv": 'tëxt,label\nä,pos\nb,neg\n',
    "bom_crlf.csv": '\ufefftext,label\r\n"a\r\nb",0\r\nc,1\r\n',
}
IRREGULAR = {  # left to datasets: its own rules (JSON-encoded mixed fields, pandas' NA and number parsing)
    "mixed_kinds.jsonl": '{"label": 1, "text": "a"}\n{"label": "pos", "text": "b"}\n',
    "differing_nested_keys.jsonl": '{"m": [{"role": "user"}, {"role": "assistant", "name": "b"}]}\n',
    "big_int.jsonl": '{"x": 99999999999999999999, "text": "a"}\n',
    "nan.jsonl": '{"x": NaN, "text": "a"}\n',
    "leading_space.json": " " + json.dumps([{"text": "a"}]),
    "empty_field.csv": 'text,label\n,0\nb,1\n',
    "na.csv": 'text,label\nNA,0\nb,1\n',
    "float.csv": 'text,label\na,0.5\nb,1\n',
    "bool.csv": 'text,flag\na,True\nb,False\n',
    "padded.csv": 'text,label\n a,0\n',
    "zero_padded.csv": 'text,label\na,007\n',
    "ragged.csv": 'text,label\na,0,extra\n',
}


def _ours(path):
    return (read_csv if path.suffix == ".csv" else read_json)(path)


def _theirs(path, tmp_path):
    datasets.disable_progress_bars()
    table = datasets.load_dataset("csv" if path.suffix == ".csv" else "json", data_files=str(path), split="train",
                                  cache_dir=str(tmp_path / "cache"))
    return table.to_list(), table.column_names


def _same(ours, theirs) -> bool:  # key order too (column names, struct fields)
    return json.dumps(ours, ensure_ascii=False) == json.dumps(theirs, ensure_ascii=False)


@pytest.mark.parametrize("name", sorted(REGULAR))
def test_regular_files_give_datasets_rows(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(REGULAR[name].encode())
    ours = _ours(path)
    assert isinstance(ours, RegularRows)
    rows, columns = _theirs(path, tmp_path)
    assert _same(ours, rows), (ours, rows)
    assert list(ours[0]) == columns


@pytest.mark.parametrize("name", sorted(IRREGULAR))
def test_other_files_are_left_to_datasets(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(IRREGULAR[name].encode())
    assert _ours(path) is None


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
ROW = st.fixed_dictionaries({"text": TEXT}, optional={
    "label": st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": TEXT}),
                         max_size=3)})


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(ROW, min_size=1, max_size=6))
def test_json_lines_of_one_schema_give_datasets_rows(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    ours = read_json(path)
    theirs, columns = _theirs(path, tmp_path)
    assert ours is not None and _same(ours, theirs) and list(ours[0]) == columns
    listed = from_list(rows)
    assert listed is None or _same(listed, datasets.Dataset.from_list(rows).to_list())


def _tokens(examples):
    split = examples.train
    columns = ("input_ids", "labels", "position_ids", "prompt_lengths", "references", "token_type_ids")
    return {c: None if getattr(split, c) is None else [v if isinstance(v, (int, str)) else list(v)
                                                       for v in getattr(split, c)] for c in columns}


@pytest.mark.parametrize("kind", ["text", "instruction", "instruction_packed", "messages", "classification_csv",
                                  "overlong_drop"])
def test_the_pipeline_gives_the_same_tokens_from_both_readers(tmp_path, kind, monkeypatch):
    data = {"max_length": 48}
    if kind in ("text", "overlong_drop"):
        rows = [{"text": " ".join(["wörd ✓"] * (i % 7 + 1))} for i in range(40)] + [{"text": ""}]
        data.update(format="text", packing=kind == "text", overlong="drop")
        if kind == "overlong_drop":
            rows = varied_instruction_rows(30, seed=4)
            data.update(format="instruction", max_length=24, overlong="drop")
    elif kind.startswith("instruction"):
        rows = varied_instruction_rows(30, seed=3)
        data.update(format="instruction", packing=kind.endswith("packed"), max_length=96)
    elif kind == "messages":
        rows = [{"messages": MESSAGES[:2] + [{"role": "assistant", "content": str(i) * (i % 5 + 1)}]}
                for i in range(20)]
        data.update(format="messages", chat_template="chatml", max_length=160)
    if kind == "classification_csv":
        path = tmp_path / "train.csv"
        path.write_text("text,label\n" + "".join(f"exemple ✓ {i},{i % 3}\n" for i in range(20)), encoding="utf-8")
        data.update(format="classification", train=str(path))
    else:
        data["train"] = write_jsonl(tmp_path / "train.jsonl", rows)
    task = "sequence-classification" if kind == "classification_csv" else "causal-lm"
    recipe = from_dict({"model": {"config": dict(TINY_CONFIGS["llama"], max_position_embeddings=160),
                                  "tokenizer": "bytes", "task": task}, "data": data,
                        "training": {"output_dir": str(tmp_path / "run")}})
    tokenizer = load_tokenizer(recipe)
    ours = load_examples(recipe, tokenizer)
    assert isinstance(ours.train.input_ids, list)  # read and tokenized without datasets
    monkeypatch.setattr("peftkit.train.rows.LOCAL_READERS", {})  # every file through datasets, as before
    theirs = load_examples(recipe, tokenizer)
    assert not isinstance(theirs.train.input_ids, list)
    assert _tokens(ours) == _tokens(theirs)
    assert ours.train.stats == theirs.train.stats and ours.train.label_names == theirs.train.label_names


RUN = """
import json, sys
from pathlib import Path
from peftkit.train import from_dict, train
root = Path(sys.argv[1])
recipe = {"model": {"name": str(root / "model"), "tokenizer": "bytes"},
          "data": {"train": sys.argv[2], "eval": sys.argv[2], "format": "text", "max_length": 16},
          "adapter": {"method": "lora", "r": 4}, "optimizer": {"lr": 1e-2},
          "training": {"max_steps": 2, "batch_size": 2, "save_every": 1, "eval_every": 1,
                       "output_dir": str(root / "run")}, "logging": {"progress_bar": False}}
assert train(from_dict(recipe)).status == "done"
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_a_plain_run_imports_no_datasets_peft_bitsandbytes_or_deepspeed(tmp_path):
    """``peftkit train`` of a LoRA on a non-quantized base from local JSON Lines (one process, an eval, two
    checkpoints): none of these is imported (each ≈ 20-80 MiB resident in every process)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(TINY_CONFIGS["llama"])
    AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields)).save_pretrained(
        tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": f"row {i} of plain text"} for i in range(16)])
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(RUN))
    done = subprocess.run([sys.executable, str(script), str(tmp_path), data], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    imported = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "peftkit" in imported and "transformers" in imported  # the run did run here
    assert not imported & {"datasets", "pandas", "pyarrow", "peft", "bitsandbytes", "deepspeed"}
