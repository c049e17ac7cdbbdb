"""Issue 25: a second adversarial sweep. One test per listed case, grouped by class: data loss and mixed state
(non-run folders, merge/export --force into partly conflicting folders, a full disk), silent wrong results
(duplicate keys, the one adapter-folder reader, PEFT-wrapped models, list prompts, evaluation never dropped,
NaN combination weights, warmup past max_steps, merge against concurrent forwards), hangs (alias bombs, regexes,
huge integers, a huge weights header, a 50 MB line) and tracebacks where the docs promise exit 2. The CLI runs
in-process; every refused command is one ``peftkit: error:`` line and writes nothing."""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import threading
from pathlib import Path

import helpers
import pytest
import torch
import yaml
from helpers import tiny_llama, write_llama_recipe
from safetensors.torch import load_file, save_file
from train_fixtures import llama_text_recipe, write_jsonl
from transformers import AutoModelForCausalLM

import peftkit
from peftkit import checkpoint
from peftkit.errors import CheckpointError, ConfigError, StateError
from peftkit.train import checkpointing, cli
from peftkit.train import rows as data_module
from peftkit.train.cli import EXIT_WRITE_FAILED, main
from peftkit.train.recipe import from_dict, read_yaml


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path below root with its content (None for folders)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# Other lines (warnings) may come with the error line; no input is echoed in full (a bomb, a huge number).
one_error = functools.partial(helpers.one_error, alone=False, max_chars=2000, reset_accelerate=True)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """(base folder, adapter folder) of a tiny Llama with a non-zero LoRA (r=4)."""
    root = tmp_path_factory.mktemp("hostile-lm")
    tiny_llama().save_pretrained(root / "base")
    model = peftkit.wrap(AutoModelForCausalLM.from_pretrained(root / "base"), "lora", r=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    peftkit.save(model, root / "adapter")
    from peftkit.train.data import byte_tokenizer

    byte_tokenizer().save_pretrained(root / "adapter")  # chat reads the tokenizer beside the adapter
    return root / "base", root / "adapter"


@pytest.fixture()
def adapter(lm, tmp_path) -> Path:
    """A private copy of the adapter, to damage."""
    shutil.copytree(lm[1], tmp_path / "adapter")
    return tmp_path / "adapter"


def edit_tensors(folder: Path, change) -> None:
    """Rewrite the weights with ``change(tensors)`` and drop the recorded sha256 (as a plain PEFT adapter)."""
    tensors = load_file(str(folder / checkpoint.WEIGHTS_NAME))
    change(tensors)
    save_file(tensors, str(folder / checkpoint.WEIGHTS_NAME))
    meta = json.loads((folder / checkpoint.METADATA_NAME).read_text())
    meta.pop("weights_sha256", None)
    (folder / checkpoint.METADATA_NAME).write_text(json.dumps(meta))


def edit_json(path: Path, change) -> None:
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values))
    meta = path.parent / checkpoint.METADATA_NAME
    if path.name == checkpoint.CONFIG_NAME and meta.is_file():  # else caught as a mixed save first
        edit_json(meta, lambda m: m.pop("config_sha256", None))


def first_key(folder: Path, suffix: str) -> str:
    return next(k for k in sorted(load_file(str(folder / checkpoint.WEIGHTS_NAME))) if k.endswith(suffix))


# ------------------------------------------------------------------------------ 1. data loss and mixed state
@pytest.mark.parametrize("name", checkpointing.RUN_FILES)
def test_train_into_a_non_run_folder_holding_a_file_of_peftkits_names_is_refused(tmp_path, capsys, name):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text("the user's own file\n")
    (out / "notes.txt").write_text("also the user's\n")
    before = tree(out)
    recipe = write_llama_recipe(tmp_path, training__max_steps=1)
    one_error(capsys, ["train", recipe], name, "not a peftkit run", "move those files")
    assert tree(out) == before


def test_a_run_marks_its_folder_so_a_restart_after_an_early_kill_is_not_refused(tmp_path, capsys):
    """A run killed before its first checkpoint leaves recipe.yaml (and metrics) beside checkpoints/: the folder
    stays a run, and training again (without --resume) starts over in it."""
    recipe = write_llama_recipe(tmp_path, training__max_steps=1)
    out = tmp_path / "run"
    (out / checkpointing.CHECKPOINTS).mkdir(parents=True)
    (out / "recipe.yaml").write_text("from the killed run\n")
    assert main(["train", recipe]) == 0
    assert (out / "adapter").is_dir()


def test_a_lock_path_that_is_a_folder_is_one_error(tmp_path, capsys):
    out = tmp_path / "run"
    (out / checkpointing.LOCK_FILE).mkdir(parents=True)
    one_error(capsys, ["train", write_llama_recipe(tmp_path, training__max_steps=1)], ".peftkit.lock",
              "not a lock file")


@pytest.mark.parametrize("command", ["merge", "export"])
def test_force_into_a_folder_where_a_written_name_is_a_folder_changes_nothing(lm, tmp_path, capsys, command):
    base, adapter = lm
    out = tmp_path / "out"
    taken = {"merge": "model.safetensors", "export": checkpoint.WEIGHTS_NAME}[command]
    (out / taken).mkdir(parents=True)
    (out / "config.json").write_text("user config\n")
    (out / checkpoint.CONFIG_NAME).write_text("user adapter config\n")
    before = tree(out)
    argv = [command, str(adapter), "--out", str(out), "--force"] + (["--base", str(base)] if command == "merge" else [])
    one_error(capsys, argv, taken, "a folder where the output writes a file", "nothing was written")
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or aside folder is left


@pytest.mark.parametrize("fail_at", [1, 2, 3])
@pytest.mark.parametrize("command", ["merge", "export"])
def test_a_swap_that_fails_midway_puts_every_replaced_file_back(lm, tmp_path, capsys, monkeypatch, command, fail_at):
    """Crash test of --force into a partly conflicting folder: the n-th rename into --out fails (a full disk, an
    I/O error); the folder is then exactly as before - old files back, new ones gone, the user's untouched."""
    base, adapter = lm
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old config\n")  # replaced by merge
    (out / checkpoint.CONFIG_NAME).write_text("old adapter config\n")  # replaced by export
    (out / "notes.txt").write_text("the user's\n")
    before = tree(out)
    real_replace, calls = os.replace, []

    def replace(source, target, *args, **kwargs):
        if Path(target).parent == out and not Path(source).name.startswith("."):  # a swap into --out
            calls.append(target)
            if len(calls) == fail_at:
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(target))
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(cli.os, "replace", replace)
    argv = [command, str(adapter), "--out", str(out), "--force"] + (["--base", str(base)] if command == "merge" else [])
    one_error(capsys, argv, "could not write", code=EXIT_WRITE_FAILED)
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.setattr(cli.os, "replace", real_replace)
    capsys.readouterr()
    assert main(argv) == 0  # and the same command then succeeds, keeping the user's file
    assert (out / "notes.txt").read_text() == "the user's\n"


def test_merge_on_a_full_disk_exits_3_like_train(lm, tmp_path, capsys, monkeypatch):
    """safetensors' Rust writer reports the OS error in its message, not as an OSError."""
    import safetensors.torch

    base, adapter = lm

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full)
    one_error(capsys, ["merge", str(adapter), "--base", str(base), "--out", str(tmp_path / "m")], "could not write",
              "errno 28", code=EXIT_WRITE_FAILED)
    assert not (tmp_path / "m").exists() and [p.name for p in tmp_path.iterdir()] == []


# ------------------------------------------------------------------------------ 2. silent wrong results
@pytest.mark.parametrize("text,needle", [
    ("training:\n  max_steps: 5\n  max_steps: 6\n", "duplicate key 'max_steps' (first at line 2)"),
    ("training:\n  output_dir: a\n  seed: 3\nmodel: {}\ntraining:\n  max_steps: 2\n",
     "duplicate key 'training' (first at line 1)"),
    ("data: {train: a, train: b}\n", "duplicate key 'train'"),
])
def test_duplicate_keys_and_sections_are_refused_with_their_lines(tmp_path, text, needle):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="line") as info:
        read_yaml(path)
    assert needle in str(info.value)


def test_yaml_merge_keys_still_override(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("base: &b {max_steps: 5, seed: 1}\ntraining: {<<: *b, seed: 2}\n")
    assert read_yaml(path)["training"] == {"max_steps": 5, "seed": 2}


def test_every_reader_refuses_a_lora_whose_config_rank_disagrees_with_its_tensors(lm, adapter, tmp_path, capsys):
    edit_json(adapter / checkpoint.CONFIG_NAME, lambda c: c.update(r=8))
    edit_json(adapter / checkpoint.METADATA_NAME, lambda m: m["config"].update(r=8))
    for argv in (["info", str(adapter)], ["export", str(adapter), "--out", str(tmp_path / "e")],
                 ["merge", str(adapter), "--base", str(lm[0]), "--out", str(tmp_path / "m")]):
        one_error(capsys, argv, "disagree with the tensors", "config rank 8")
    with pytest.raises(CheckpointError, match="disagree"):
        peftkit.load(AutoModelForCausalLM.from_pretrained(lm[0]), adapter)
    assert not (tmp_path / "e").exists() and not (tmp_path / "m").exists()


@pytest.mark.parametrize("command", ["chat", "info", "export", "merge"])
def test_a_non_finite_adapter_is_refused_by_every_command(lm, adapter, tmp_path, capsys, command):
    key = first_key(adapter, "lora_B.weight")
    edit_tensors(adapter, lambda t: t[key].view(-1).__setitem__(0, float("inf")))
    argv = {"chat": ["chat", str(adapter), "--base", str(lm[0]), "--prompt", "hi", "--max-new-tokens", "2"],
            "info": ["info", str(adapter)], "export": ["export", str(adapter), "--out", str(tmp_path / "o")],
            "merge": ["merge", str(adapter), "--base", str(lm[0]), "--out", str(tmp_path / "o")]}[command]
    one_error(capsys, argv, key, "NaN or inf")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_integer_adapter_tensors_are_refused_not_cast(lm, adapter, tmp_path, capsys, dtype):
    key = first_key(adapter, "lora_A.weight")
    edit_tensors(adapter, lambda t: t.__setitem__(key, t[key].to(dtype)))
    one_error(capsys, ["merge", str(adapter), "--base", str(lm[0]), "--out", str(tmp_path / "o")], key,
              "not floating point")


def saved_adapter(method: str, folder: Path) -> torch.nn.Module:
    from peftkit import registry

    data = None
    if registry.get_component("init", registry.get_method(method).init).needs_data:
        ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
        data = [{"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}] * 2
    model = peftkit.wrap(tiny_llama(), method, r=2, targets=["q_proj", "v_proj"], data=data)
    peftkit.save(model, folder)
    return model


@pytest.mark.parametrize("method", peftkit.methods())
def test_every_methods_saved_adapter_passes_the_one_reader_and_loads(tmp_path, capsys, method):
    """The reader's checks hold for what every method saves (ElaLoRA saves a boolean mask)."""
    saved_adapter(method, tmp_path / "a")
    checkpoint.read_adapter(tmp_path / "a")
    peftkit.load(tiny_llama(), tmp_path / "a")
    assert main(["info", str(tmp_path / "a")]) == 0


def test_an_integer_tensor_where_a_peftkit_format_holds_floats_is_refused_at_load(tmp_path):
    saved_adapter("elalora", tmp_path / "a")
    key = next(k for k in sorted(load_file(str(tmp_path / "a" / checkpoint.WEIGHTS_NAME))) if k.endswith("lora_E"))
    edit_tensors(tmp_path / "a", lambda t: t.__setitem__(key, t[key].to(torch.int64)))
    with pytest.raises(CheckpointError, match="integer or boolean tensors where the adapter holds floating point"):
        peftkit.load(tiny_llama(), tmp_path / "a")


def test_wrap_refuses_a_model_peft_already_wrapped():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(StateError, match="HF PEFT adapters"):
        peftkit.wrap(model, "lora", r=2)
    assert not any(type(m).__module__.startswith("peftkit") for m in model.modules())


@pytest.mark.parametrize("value", [["a", "b"], {"x": 1}, True])
def test_a_prompt_that_is_not_text_is_refused(tmp_path, capsys, value):
    rows = [{"prompt": value if i == 3 else f"q{i}", "response": f"a{i}"} for i in range(8)]
    recipe = llama_text_recipe(tmp_path, data__format="instruction", data__eval=None,
                               data__train=write_jsonl(tmp_path / "chat.jsonl", rows))
    one_error(capsys, ["validate", write_llama_recipe(tmp_path, recipe)], "row 4", "prompt", "expected text")


def test_overlong_drop_never_shrinks_evaluation(tmp_path):
    """data.overlong: drop removes overlong training examples, but every evaluation row stays (cut from the left),
    and the warning says so."""
    from peftkit.train.build import load_examples
    from peftkit.train.data import byte_tokenizer

    rows = [{"prompt": "q" * (40 if i % 2 else 3), "response": f"a{i}"} for i in range(10)]
    recipe = from_dict(llama_text_recipe(
        tmp_path, data__format="instruction", data__overlong="drop", data__max_length=24,
        data__train=write_jsonl(tmp_path / "train.jsonl", rows), data__eval=write_jsonl(tmp_path / "eval.jsonl", rows)))
    with pytest.warns(UserWarning) as caught:
        examples = load_examples(recipe, byte_tokenizer())
    assert len(examples.train.input_ids) == 5  # the 5 overlong training rows dropped
    assert len(examples.eval.input_ids) == 10  # no evaluation row dropped
    assert all(len(ids) <= 24 for ids in examples.eval.input_ids)
    assert any("evaluation rows are never dropped" in str(w.message) for w in caught)
    packed = from_dict(llama_text_recipe(
        tmp_path, data__format="instruction", data__overlong="drop", data__max_length=24, data__packing=True,
        data__train=write_jsonl(tmp_path / "train.jsonl", rows), data__eval=None))
    with pytest.warns(UserWarning):
        stats = load_examples(packed, byte_tokenizer()).train.stats
    assert stats["examples"] == 5  # the packing report counts the examples kept, not the dropped ones


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), "1", None])
def test_add_weighted_adapter_refuses_a_non_finite_weight(weight):
    model = peftkit.wrap(tiny_llama(), "lora", r=2)
    from peftkit.combine import add_weighted_adapter

    with pytest.raises(ConfigError, match=r"weights\[1\] must be a finite number"):
        add_weighted_adapter(model, ["default", "default"], [1.0, weight], "mix")


def test_warmup_longer_than_max_steps_is_refused(tmp_path, capsys):
    one_error(capsys, ["validate", write_llama_recipe(tmp_path, training__max_steps=4, training__warmup=5)],
              "training.warmup", "max_steps=4")


def test_merge_and_unmerge_are_atomic_to_forwards_in_other_threads():
    """A reader thread runs forwards while the main thread merges and unmerges: every output equals the
    adapted model's (merged or not, the function is the same); none sees a half-merged model."""
    model = peftkit.wrap(tiny_llama(), "lora", r=4, targets=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
                                                              "down_proj", "gate_proj"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3)
    ids = torch.tensor([[5, 9, 3, 17, 40, 2, 8, 11]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    stop, worst, errors = threading.Event(), [0.0], []

    def reader():
        try:
            with torch.no_grad():
                while not stop.is_set():
                    worst[0] = max(worst[0], float((model(input_ids=ids).logits - want).abs().max()))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    for _ in range(30):
        peftkit.merge(model)
        peftkit.unmerge(model)
    stop.set()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert worst[0] < 1e-4, worst[0]  # a half-merged model differs by the adapter's whole delta (~1)


def test_merge_inside_a_forward_of_the_same_thread_is_refused():
    model = peftkit.wrap(tiny_llama(), "lora", r=2)
    seen = []

    def hook(module, args, output):
        with pytest.raises(StateError, match="during a forward pass"):
            peftkit.merge(model)
        seen.append(1)

    handle = model.model.layers[0].register_forward_hook(hook)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    handle.remove()
    assert seen == [1]
    peftkit.merge(model)  # and outside a forward it works


# ------------------------------------------------------------------------------ 3. hangs and unbounded resources
def bomb(levels: int = 9, width: int = 9) -> str:
    """A YAML billion-laughs: ``width ** levels`` values once expanded, a few hundred bytes of text."""
    lines = ["    l0: &l0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines)


@pytest.mark.parametrize("where", ["model.config", "training.lr_schedule_options", "data.mix"])
def test_alias_bombs_in_nested_values_are_refused_before_anything_walks_them(tmp_path, capsys, where):
    recipe = llama_text_recipe(tmp_path)
    section, key = where.split(".")
    text = yaml.safe_dump({k: v for k, v in recipe.items() if k != section})
    body = yaml.safe_dump({k: v for k,
                           v in recipe[section].items() if k != key and not (key == "mix" and k == "train")})
    text += f"{section}:\n" + "".join(f"  {line}\n" for line in body.splitlines()) + f"  {key}:\n{bomb()}\n"
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    one_error(capsys, ["validate", str(path)], "aliases", "expanded")


@pytest.mark.parametrize("override,needle", [
    ("training.grad_accum=9223372036854775808", "training.grad_accum"),
    ("training.seed=18446744073709551616", "training.seed"),
    ("training.seed=4294967296", "training.seed"),
    ("training.max_steps=" + "9" * 5000, "could not be read"),
    ("training.batch_size=1e300", "training.batch_size"),
    ("model.num_labels=1000000000", "model.num_labels"),
    ("adapter.r=3000000000", "adapter.r"),
])
def test_absurd_integers_are_one_error(tmp_path, capsys, override, needle):
    one_error(capsys, ["validate", write_llama_recipe(tmp_path), override], needle)


def test_an_absurd_num_labels_in_an_adapter_sidecar_is_refused_before_allocation(lm, adapter, tmp_path, capsys):
    edit_json(adapter / checkpoint.METADATA_NAME, lambda m: m.update(num_labels=10 ** 9))
    one_error(capsys, ["merge", str(adapter), "--base", str(lm[0]), "--out", str(tmp_path / "o")], "num_labels")


@pytest.mark.parametrize("pattern", ["(a+)+$", "(a|aa)*c", "(.*){30}x", "((((.*)*)*)*)*!"])
def test_backtracking_regexes_from_an_adapter_config_match_in_linear_time(lm, adapter, pattern):
    """Python's re takes minutes on these against a long name; RE2 answers at once. The patterns match no module,
    so loading warns and ignores them (PEFT's rule)."""
    edit_json(adapter / checkpoint.CONFIG_NAME, lambda c: c.update(rank_pattern={pattern: 4}))
    edit_json(adapter / checkpoint.METADATA_NAME, lambda m: m["config"].update(rank_pattern={pattern: 4}))
    with pytest.warns(UserWarning, match="matches no adapted module"):
        peftkit.load(AutoModelForCausalLM.from_pretrained(lm[0]), adapter)
    from peftkit.validation import pattern_suffix_match

    assert not pattern_suffix_match(pattern, "a" * 100_000 + "b")


def test_a_backtracking_targets_regex_in_a_recipe_answers_at_once(tmp_path, capsys):
    one_error(capsys, ["validate", write_llama_recipe(tmp_path), "adapter.targets=(.*a){40}$"], "matches no module")


def test_a_weights_header_is_checked_before_the_file_is_read(adapter, capsys):
    """A header claiming more bytes than the file has is refused from its first 8 bytes (a 6 GiB file is not
    read); so is an entry whose offsets leave the file."""
    weights = adapter / checkpoint.WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes((6 << 30).to_bytes(8, "little") + data[8:])
    one_error(capsys, ["info", str(adapter)], "the header claims")
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 1 << 30
    raw = json.dumps(header).encode()
    weights.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + length:])
    one_error(capsys, ["info", str(adapter)], "offsets")


def test_a_huge_single_line_of_data_is_refused_before_tokenizing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data_module, "MAX_VALUE_BYTES", 10_000)  # the same check as at 1 MiB, with a small file
    rows = [{"text": "word " * 100}] * 8 + [{"text": "x" * 20_000}]
    one_error(capsys,
              ["validate", write_llama_recipe(tmp_path), f"data.train={write_jsonl(tmp_path / 'big.jsonl', rows)}"],
              "row 9", "20,000 bytes", "split it")


# ------------------------------------------------------------------------------ 4. tracebacks -> exit 2
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run with a checkpoint at step 2 (recipe path, run folder)."""
    root = tmp_path_factory.mktemp("hostile-run")
    recipe = write_llama_recipe(root, training__max_steps=2, data__eval=None)
    assert main(["train", recipe]) == 0
    return root


def tamper_rng_empty(step: Path) -> None:
    save_file({}, str(step / "rng-0.safetensors"))


def tamper_rng_float(step: Path) -> None:
    tensors = load_file(str(step / "rng-0.safetensors"))
    tensors["torch"] = tensors["torch"].float()
    save_file(tensors, str(step / "rng-0.safetensors"))


def tamper_rng_json(step: Path) -> None:
    (step / "rng-0.json").write_text(json.dumps({"python": [3, "x", None], "numpy": [1]}))


def tamper_step_string(step: Path) -> None:
    path = step / checkpointing.STATE_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), "step": "two"}))


def tamper_optimizer_reshaped(step: Path) -> None:
    states = torch.load(step / "optimizer.pt", weights_only=True)
    for value in states["optimizer"]["state"].values():
        value["exp_avg"] = value["exp_avg"].reshape(-1)
    torch.save(states, step / "optimizer.pt")


def tamper_optimizer_junk(step: Path) -> None:
    torch.save({"optimizer": 3}, step / "optimizer.pt")


@pytest.mark.parametrize("tamper,needle", [
    (tamper_rng_empty, "random-number state"), (tamper_rng_float, "random-number state"),
    (tamper_rng_json, "random-number state"), (tamper_step_string, "trainer state"),
    (tamper_optimizer_reshaped, "optimizer.pt"), (tamper_optimizer_junk, "optimizer.pt"),
])
def test_tampered_resume_state_is_one_error(trained, tmp_path, capsys, tamper, needle):
    shutil.copytree(trained / "run", tmp_path / "run")
    recipe = yaml.safe_load((trained / "recipe.yaml").read_text())
    recipe["training"]["output_dir"] = str(tmp_path / "run")
    tamper(checkpointing.latest(tmp_path / "run"))
    one_error(capsys, ["train", write_llama_recipe(tmp_path, recipe), "training.max_steps=3", "--resume"], needle)


def zero_dim(adapter: Path) -> None:
    key = first_key(adapter, "lora_A.weight")
    edit_tensors(adapter, lambda t: t.__setitem__(key, torch.tensor(1.0)))


def bad_rank_regex(adapter: Path) -> None:
    edit_json(adapter / checkpoint.CONFIG_NAME, lambda c: c.update(rank_pattern={"(": 4}))


def deep_json(adapter: Path) -> None:
    (adapter / checkpoint.CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000)


def bad_id2label(adapter: Path) -> None:
    edit_json(adapter / checkpoint.METADATA_NAME, lambda m: m.update(num_labels=2, id2label={"zero": "a", "-1": "b"}))


@pytest.mark.parametrize("damage,needle", [
    (zero_dim, "has shape ()"), (bad_rank_regex, "not a valid regex"), (deep_json, "nested"),
    (bad_id2label, "id2label"),
])
@pytest.mark.parametrize("command", ["info", "merge"])
def test_damaged_adapter_folders_are_one_error(lm, adapter, tmp_path, capsys, damage, needle, command):
    damage(adapter)
    argv = ["info", str(adapter)] if command == "info" else ["merge", str(adapter), "--base", str(lm[0]), "--out",
                                                               str(tmp_path / "o")]
    one_error(capsys, argv, needle)


@pytest.mark.parametrize("override,needle", [
    ("model.name=pkg:os", "is a module, not a package"),
    ("model.name=pkg:json/../../etc", "no '..'"),
    ("model.config.hidden_size=-16", "model.config"),
    ("model.config.id2label={x: a}", "model.config"),
    ("model.config.hidden_size=4000000", "memory"),
])
def test_bad_model_references_and_configs_are_one_error(tmp_path, capsys, override, needle):
    argv = ["validate", write_llama_recipe(tmp_path)]
    if override.startswith("model.name"):
        argv.append("model.config=null")
    one_error(capsys, argv + [override], needle)


def test_a_5000_deep_yaml_list_is_one_error(tmp_path, capsys):
    path = tmp_path / "deep.yaml"
    path.write_text("training:\n  lr_schedule_options: " + "[" * 5000 + "]" * 5000 + "\n")
    one_error(capsys, ["validate", str(path)], "nested more than", "line 2")


def test_a_data_file_whose_rows_are_all_empty_is_one_error(tmp_path, capsys):
    path = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}] * 5)
    one_error(capsys, ["validate", write_llama_recipe(tmp_path), f"data.train={path}"],
              "all 5 rows have an empty 'text'")


@pytest.mark.parametrize("line", ['{"step": 1, "loss": "high"}', '{"step": "one", "loss": 1.0}', '[1, 2]'])
def test_plot_on_metrics_that_are_not_numbers_is_one_error(tmp_path, capsys, line):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 2.0}\n' + line + "\n" + '{"step": 2, "loss": 1.0}\n')
    one_error(capsys, ["plot", str(tmp_path)], "line 2")
    assert not (tmp_path / "loss.png").exists()


@pytest.mark.parametrize("repo", ["not a repo", "a/b/c", "x-", "me/" + "y" * 200])
def test_push_to_an_invalid_repo_id_is_one_error(adapter, capsys, monkeypatch, repo):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    one_error(capsys, ["push", str(adapter), repo], "not a valid Hub repo id")


def test_push_with_a_refused_token_is_one_error(adapter, capsys, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError

    from peftkit import hub

    class Response:
        status_code = 401
        headers: dict = {}
        url = "https://huggingface.co/api/repos/create"
        request = None

        def json(self):
            return {}

    class RefusingApi:
        def __init__(self, *args, **kwargs):
            pass

        def create_repo(self, *args, **kwargs):
            raise HfHubHTTPError("401 Client Error: Unauthorized (Invalid credentials in Authorization header)",
                                 response=Response())

    monkeypatch.setenv("HF_TOKEN", "hf_bad")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HfApi", RefusingApi)
    one_error(capsys, ["push", str(adapter), "me/adapter"], "401", "token was refused")


@pytest.mark.parametrize("copied", [False, True])
def test_the_merge_gate_follows_a_copied_model_and_unwrap_removes_it(copied):
    import copy

    model = peftkit.wrap(tiny_llama(), "lora", r=2)
    model = copy.deepcopy(model) if copied else model
    peftkit.merge(model)
    peftkit.unmerge(model)
    plain = peftkit.unwrap(model)
    assert not plain._forward_hooks and not plain._forward_pre_hooks and not plain._forward_hooks_always_called
