"""peftkit inside transformers' Trainer, TRL's SFTTrainer / DPOTrainer, transformers' adapter API and the Hub."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from helpers import make_batches, randomize_adapters, tiny_llama
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from transformers.integrations.peft import PeftAdapterMixin

import peftkit
from peftkit import checkpoint
from peftkit.errors import CheckpointError, ConfigError, StateError

VOCAB = 259  # peftkit's byte-level tokenizer


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama saved as a real folder, so adapters record a base that from_pretrained can load."""
    folder = tmp_path_factory.mktemp("base")
    tiny_llama(vocab_size=VOCAB).save_pretrained(folder)
    from peftkit.train.data import byte_tokenizer

    byte_tokenizer().save_pretrained(folder)
    return str(folder)


def base(base_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(base_dir).eval()


def examples(model, n=8):
    return [{k: v[i] for k,
             v in batch.items()} for batch in make_batches(model, n=n // 2, batch_size=2) for i in range(2)]


def logits(model, batch):
    with torch.no_grad():
        return type(model).forward(model, **batch).logits  # the class's forward: TRL patches the instance's


def trainer_args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                  lr_scheduler_type="constant", report_to=[], save_strategy="steps", save_steps=2, logging_steps=1,
                  use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
    values.update(overrides)
    return TrainingArguments(**values)


def adapter_tensors(model):
    return {k: v.clone() for k, v in model.get_adapter_state_dict().items()}


# --------------------------------------------------------------------------- 1. the model's own save path
@pytest.mark.parametrize("method", ["lora-pro", pytest.param("coto", marks=pytest.mark.slow)])
def test_trainer_checkpoints_are_peft_adapters_and_resume_exactly(method, base_dir, tmp_path):
    from peft import PeftModel

    def run(resume=None):
        model = peftkit.wrap(base(base_dir), method, r=4, alpha=8)
        trainer = Trainer(model=model, args=trainer_args(tmp_path), train_dataset=examples(model),
                          optimizers=(peftkit.optimizer(model, 1e-2), None), callbacks=[peftkit.callbacks(model)])
        peftkit.attach(trainer).train(resume_from_checkpoint=resume)
        return model, trainer

    model, trainer = run()
    ckpt = tmp_path / "out" / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors", "peftkit.json", "README.md", "optimizer.pt"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}  # no full model with wrapped keys
    trainer.save_model(str(tmp_path / "final"))
    batch = make_batches(model, n=1)[0]
    reference = logits(model.eval(), batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        via_transformers = AutoModelForCausalLM.from_pretrained(tmp_path / "final")  # base + adapter, through PEFT
        via_peft = PeftModel.from_pretrained(base(base_dir), tmp_path / "final")
    via_peftkit = peftkit.load(base(base_dir), tmp_path / "final")
    for reloaded in (via_transformers, via_peft, via_peftkit):
        torch.testing.assert_close(logits(reloaded.eval(), batch) if reloaded is not via_peft
                                   else via_peft(**batch).logits.detach(), reference, atol=0, rtol=0)
    assert (reference - logits(base(base_dir), batch)).abs().max() > 1e-4  # the adapter is not a no-op

    # Resumed from step 2 (adapter, LoRA-Pro's optimizer state, CoTo's schedule state, RNG, data position), the
    # run ends where the uninterrupted one did.
    final = adapter_tensors(model)
    resumed, _ = run(resume=str(ckpt))
    for key, value in adapter_tensors(resumed).items():
        torch.testing.assert_close(value, final[key], atol=1e-6, rtol=1e-5)


def test_resume_refuses_a_checkpoint_without_peftkit_state(base_dir, tmp_path):
    model = peftkit.wrap(base(base_dir), "lora", r=2)
    peftkit.save(model, tmp_path / "checkpoint-1")
    trainer = peftkit.attach(Trainer(model=model, args=trainer_args(tmp_path), train_dataset=examples(model)))
    with pytest.raises(CheckpointError, match="peftkit_training_state.safetensors: file not found.*callbacks"):
        trainer._load_from_checkpoint(str(tmp_path / "checkpoint-1"))


def test_unwrapped_model_saves_as_a_plain_full_model(base_dir, tmp_path):
    model = peftkit.wrap(base(base_dir), "lora", r=4)
    randomize_adapters(model, seed=3)
    batch = make_batches(model, n=1)[0]
    expected = logits(model, batch)
    plain = peftkit.unwrap(model, merge=True)
    assert "save_pretrained" not in plain.__dict__ and not plain._hf_peft_config_loaded
    plain.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), batch), expected,
                               atol=1e-5, rtol=1e-5)


def test_saving_a_model_without_adapters_is_one_error_and_writes_nothing(tmp_path):
    with pytest.raises(StateError, match="has no peftkit adapters; call peftkit.wrap"):
        peftkit.save(tiny_llama(), tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


# ------------------------------------------------------------------------------------- 2. TRL and DPO
def sft_trainer(model, tmp_path, tokenizer, **overrides):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    texts = [f"{a} plus {b} is {a + b}." for a in range(4) for b in range(2)]
    values = dict(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                  report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, max_length=24)
    values.update(overrides)
    return SFTTrainer(model=model, args=SFTConfig(**values), train_dataset=Dataset.from_dict({"text": texts}),
                      processing_class=tokenizer, optimizers=(peftkit.optimizer(model, 1e-2), None),
                      callbacks=[peftkit.callbacks(model)])


@pytest.mark.parametrize("method", ["lora", pytest.param("lora-pro", marks=pytest.mark.slow),
                                    pytest.param("hra", marks=pytest.mark.slow),
                                    pytest.param("coto", marks=pytest.mark.slow)])
def test_sft_trainer_trains_and_saves_a_peft_adapter(method, base_dir, tmp_path):
    from peft import PeftModel

    from peftkit.train.data import byte_tokenizer

    model = peftkit.wrap(base(base_dir), method, r=4)
    before = adapter_tensors(model)
    trainer = sft_trainer(model, tmp_path, byte_tokenizer())
    trainer.train()
    after = adapter_tensors(model)
    assert any(not torch.equal(after[k], before[k]) for k in after)  # it trained
    trainer.save_model(str(tmp_path / "adapter"))
    batch = make_batches(model, n=1)[0]
    reloaded = peftkit.load(base(base_dir), tmp_path / "adapter")
    for key, value in adapter_tensors(reloaded).items():
        assert torch.equal(value, after[key])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        via_peft = PeftModel.from_pretrained(base(base_dir), tmp_path / "adapter")
    # PEFT reads the config with no "Unexpected keyword arguments ... upgrade PEFT" warning (transformers' own
    # deprecation notices about gradient checkpointing are not about the file).
    assert not [w for w in caught if "nexpected" in str(w.message) or "PEFT" in str(w.message)], caught
    torch.testing.assert_close(via_peft(**batch).logits.detach(), logits(reloaded, batch), atol=1e-5, rtol=1e-5)


def dpo_trainer(model, reference, tmp_path, tokenizer, max_steps=2):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pairs = Dataset.from_dict({"prompt": [f"is {n} even?" for n in range(8)],
                               "chosen": [" yes" if n % 2 == 0 else " no" for n in range(8)],
                               "rejected": [" no" if n % 2 == 0 else " yes" for n in range(8)]})
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=max_steps, per_device_train_batch_size=4,
                     learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                     disable_tqdm=True)
    return DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=pairs, processing_class=tokenizer,
                      optimizers=(peftkit.optimizer(model, 1e-2), None), callbacks=[peftkit.callbacks(model)])


@pytest.mark.parametrize("method", ["lora", pytest.param("lora-pro", marks=pytest.mark.slow),
                                    pytest.param("hra", marks=pytest.mark.slow),
                                    pytest.param("coto", marks=pytest.mark.slow)])
def test_dpo_reference_is_the_model_with_adapters_off_and_no_copy(method, base_dir, tmp_path):
    from peftkit.train.data import byte_tokenizer

    model = peftkit.wrap(base(base_dir), method, r=4)
    reference = peftkit.reference_model(model)
    trainer = dpo_trainer(model, reference, tmp_path, byte_tokenizer())
    trainer.train()
    assert list(reference.parameters()) == [] and list(reference.buffers()) == []  # nothing copied
    batch = make_batches(model, n=1)[0]
    plain = base(base_dir)
    # After training the reference still computes the base model (adapters off), and the policy is trained.
    with torch.no_grad():
        ref_out = reference(**batch).logits
        policy_out = model(**batch).logits
        with peftkit.disabled(model):
            off = model(**batch).logits
    torch.testing.assert_close(ref_out, off, atol=0, rtol=0)
    # (TRL patches the policy's forward; the class's forward with adapters off is the plain base exactly.)
    with peftkit.disabled(model):
        torch.testing.assert_close(logits(model, batch), logits(plain, batch), atol=0, rtol=0)
    if method != "coto":  # CoTo may gate every adapter off at step 2
        assert (policy_out - ref_out).abs().max() > 1e-5
    # The first DPO loss is ln 2: at step 0 the policy equals the reference (B = 0 / HRA's identity init).
    first = trainer.state.log_history[0]["loss"]
    assert abs(first - 0.6931472) < 1e-4


def test_regulariser_gradient_is_in_the_trainer_objective(base_dir, tmp_path):
    """HRA's orthogonality term: the gradient the optimizer steps on = ∇loss + ∇regulariser."""
    from transformers import TrainerCallback

    model = peftkit.wrap(base(base_dir), "hra", r=4, init_weights=False, orth_reg_weight=0.5)
    data = examples(model, n=2)
    captured = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            captured.update({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})

    args = trainer_args(tmp_path, max_steps=1, save_strategy="no", max_grad_norm=0.0, per_device_train_batch_size=2)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(peftkit.optimizer(model, 1e-2), None),
                      callbacks=[peftkit.callbacks(model), Capture()])
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    # The same gradients by hand, at the parameters before the step.
    manual = peftkit.wrap(base(base_dir), "hra", r=4, init_weights=False, orth_reg_weight=0.5)
    with torch.no_grad():
        for n, p in manual.named_parameters():
            if n in snapshot:
                p.copy_(snapshot[n])
    batch = {k: torch.stack([row[k] for row in data]) for k in data[0]}
    manual.train()
    params = {n: p for n, p in manual.named_parameters() if p.requires_grad}
    loss_grads = torch.autograd.grad(manual(**batch).loss, list(params.values()))
    reg_grads = torch.autograd.grad(peftkit.regularization_loss(manual), list(params.values()))
    some_term = False
    for (name, _), g_loss, g_reg in zip(params.items(), loss_grads, reg_grads):
        torch.testing.assert_close(captured[name], g_loss + g_reg, atol=1e-6, rtol=1e-4)
        some_term = some_term or g_reg.abs().max() > 1e-4
    assert some_term


def test_schedules_act_under_the_trainer(base_dir, tmp_path):
    """Under transformers' Trainer, CoTo draws the gates of step t+1 from (seed, t) with p(t) of T = max_steps, one
    mask per optimizer step, and they act: no adapter of a block gated off in a step is updated in it, every B of a
    block on is; after training every adapter is on."""
    from transformers import TrainerCallback

    from adapters.coto import activation_probability, draw_gates

    steps = 3
    model = peftkit.wrap(base(base_dir), "coto", r=4, initial_p=0.3, seed=4)
    schedule = peftkit.callbacks(model)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    snapshots = [{n: p.detach().clone() for n, p in trained.items()}]

    class Snapshot(TrainerCallback):  # after the schedule's own on_step_end: the parameters after each step
        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append({n: p.detach().clone() for n, p in trained.items()})

    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=steps, save_strategy="no"),
                      train_dataset=examples(model), optimizers=(peftkit.optimizer(model, 1e-2), None),
                      callbacks=[schedule, Snapshot()])
    draws = []
    original = schedule.set_gates
    schedule.set_gates = lambda gates: (draws.append(list(gates)), original(gates))[1]
    trainer.train()

    groups = len(schedule.groups)
    expected = [draw_gates(torch.Generator().manual_seed(4 * 1_000_003 + t), groups,
                           activation_probability(t, steps, 0.3, 0.75)) for t in range(steps)]
    assert draws[:steps] == expected and all(all(d) for d in draws[steps:]), (draws, expected)
    assert any(not all(d) for d in expected) and any(any(d) for d in expected)  # both states occur
    assert len(snapshots) == steps + 1
    block_of = {n: i for i, group in enumerate(schedule.group_names) for n in trained for layer in group
                if n.startswith(layer + ".")}
    assert set(block_of) == set(trained)
    for t in range(steps):
        for name, block in block_of.items():
            moved = not torch.equal(snapshots[t + 1][name], snapshots[t][name])
            if not expected[t][block]:
                assert not moved, (t + 1, name, expected[t])
            elif "lora_B" in name:  # on: B always has a gradient (A has none while B is still 0, at step 1)
                assert moved, (t + 1, name, expected[t])
    assert schedule.gates == [True] * groups


# ------------------------------------------------------------------------------- 3. PeftAdapterMixin
def test_every_peft_adapter_mixin_method_acts_on_peftkit_adapters(base_dir, tmp_path):
    from peft import LoraConfig

    public = [n for n, v in vars(PeftAdapterMixin).items() if callable(v) and not n.startswith("_")]
    model = peftkit.wrap(base(base_dir), "lora", r=4)
    randomize_adapters(model, seed=1)
    for name in public:
        assert name in model.__dict__, f"{name} is transformers' own on a peftkit model"
    batch = make_batches(model, n=1)[0]
    plain_out = logits(base(base_dir), batch)
    default_out = logits(model, batch)
    assert model.active_adapters() == ["default"] and model._hf_peft_config_loaded

    model.disable_adapters()
    torch.testing.assert_close(logits(model, batch), plain_out, atol=1e-6, rtol=1e-6)
    model.enable_adapters()
    torch.testing.assert_close(logits(model, batch), default_out)

    other = peftkit.wrap(base(base_dir), "lora", r=2, targets=["v_proj"])
    randomize_adapters(other, seed=2)
    other_out = logits(other, batch)
    peftkit.save(other, tmp_path / "other")
    model.load_adapter(str(tmp_path / "other"), adapter_name="other")
    assert model.active_adapters() == ["default"]  # loaded inactive, as PEFT does
    model.set_adapter("other")
    torch.testing.assert_close(logits(model, batch), other_out, atol=1e-6, rtol=1e-6)

    model.add_adapter(LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), adapter_name="third")
    assert model.active_adapters() == ["third"]  # add_adapter activates the new one (transformers' semantics)

    state = model.get_adapter_state_dict("default")
    from peftkit.inject import adapter_layers

    expected = {f"{name}.lora_{f}.weight": getattr(layer.adapters["default"], f"lora_{f}").weight
                for name, layer in adapter_layers(model).items() if "default" in layer.adapters for f in "AB"}
    assert sorted(state) == sorted(expected) and len(expected) >= 4  # every tensor of "default", PEFT's names
    for key, value in expected.items():
        assert torch.equal(state[key], value.detach()), key

    model.delete_adapter(["third", "other"])
    assert model.active_adapters() == ["default"]
    torch.testing.assert_close(logits(model, batch), default_out)
    with pytest.raises(ConfigError, match="peftkit.load"):
        model.enable_peft_hotswap()
    with pytest.raises(ConfigError, match="peftkit.wrap"):
        model.load_adapter(peft_config={"r": 2})
    with model.disable_adapter():  # PeftModel's context manager
        torch.testing.assert_close(logits(model, batch), plain_out, atol=1e-6, rtol=1e-6)
    model.delete_adapter("default")  # the last one: a plain model again, with transformers' methods
    assert "peftkit" not in model.__dict__ and not any(n in model.__dict__ for n in public)


# ---------------------------------------------------------------------------- 4. clean files, model card
def test_adapter_config_is_pure_peft_and_old_files_still_load(base_dir, tmp_path):
    model = peftkit.wrap(base(base_dir), "lora-plus", r=4)
    randomize_adapters(model, seed=4)
    peftkit.save(model, tmp_path / "new")
    config = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    assert "peftkit" not in config
    sidecar = json.loads((tmp_path / "new" / "peftkit.json").read_text())
    assert sidecar["method"] == "lora-plus" and sidecar["weights_sha256"] and sidecar["config_sha256"]
    # A folder from before the sidecar: the section inside adapter_config.json.
    old = tmp_path / "old"
    old.mkdir()
    (old / "adapter_model.safetensors").write_bytes((tmp_path / "new" / "adapter_model.safetensors").read_bytes())
    (old / "adapter_config.json").write_text(json.dumps({**config, "peftkit": sidecar}))
    batch = make_batches(model, n=1)[0]
    loaded = peftkit.load(base(base_dir), old)
    assert loaded.peftkit.configs["default"].method == "lora-plus"
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch))
    # A sidecar from another save is caught.
    (tmp_path / "new" / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(CheckpointError, match="mixes two saves"):
        peftkit.load(base(base_dir), tmp_path / "new")


def test_model_card_describes_the_adapter_and_keeps_a_users_readme(base_dir, tmp_path):
    from huggingface_hub import ModelCard

    model = peftkit.wrap(base(base_dir), "hra", r=4)
    model.peftkit.training.update(data="my/dataset", metrics={"eval_loss": 1.25}, recipe="adapter:\n  method: hra\n")
    model.save_pretrained(tmp_path / "a")
    card = ModelCard.load(tmp_path / "a" / "README.md")
    assert card.data.library_name == "peft" and "peftkit" in card.data.tags and "hra" in card.data.tags
    assert card.data.base_model is None  # a local path is not a Hub id; the text names it
    for text in (base_dir, "| method | `hra` |", "| rank r | 4", "`q_proj`", "my/dataset", "eval_loss | 1.25",
                 "method: hra"):
        assert text in card.text, text
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "README.md").write_text("# mine\n")
    model.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "README.md").read_text() == "# mine\n"


# ------------------------------------------------------------------------------------------ 5. the Hub
def populate_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """The layout huggingface_hub's cache has after a download (refs/main -> snapshots/<commit>/files)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_ids_resolve_from_the_offline_cache(base_dir, tmp_path, monkeypatch, capsys):
    from peftkit.train.cli import main

    model = peftkit.wrap(base(base_dir), "lora", r=4)
    randomize_adapters(model, seed=5)
    peftkit.save(model, tmp_path / "adapter")
    cache = tmp_path / "hub"
    populate_cache(cache, "someone/tiny-lora", tmp_path / "adapter")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    batch = make_batches(model, n=1)[0]
    loaded = peftkit.load(base(base_dir), "someone/tiny-lora")
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch))
    assert main(["info", "someone/tiny-lora"]) == 0 and "method:     lora" in capsys.readouterr().out
    assert main(["export", "someone/tiny-lora", "--out", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "adapter_model.safetensors").is_file()
    assert main(["merge", "someone/tiny-lora", "--base", base_dir, "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged, batch), logits(model, batch), atol=1e-5, rtol=1e-5)
    # Not cached while offline: one error, nothing created.
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CheckpointError,
                       match="'someone/missing' is not a local folder.*not in the local cache.*offline"):
        peftkit.load(base(base_dir), "someone/missing")
    assert main(["info", "someone/missing"]) == 2
    assert "not in the local cache" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


class FakeHfApi:
    """Records what would be uploaded; never touches the network."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs))
        return type("Repo", (), {"repo_id": repo_id})()

    def upload_folder(self, folder_path, repo_id, **kwargs):
        FakeHfApi.calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path))))
        return type("Info", (), {"commit_url": f"https://hub.invalid/{repo_id}/commit/1"})()


def test_push_uploads_a_run_or_adapter_and_needs_credentials(base_dir, tmp_path, monkeypatch, capsys):
    from peftkit.train.cli import main

    monkeypatch.setattr("peftkit.hub.HfApi", FakeHfApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))  # no stored login
    FakeHfApi.calls = []
    model = peftkit.wrap(base(base_dir), "lora", r=2)
    peftkit.save(model, tmp_path / "run" / "adapter")  # a `peftkit train` run folder holds adapter/
    assert main(["push", str(tmp_path / "run"), "me/tiny"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err and FakeHfApi.calls == []
    with pytest.raises(ConfigError, match="no Hugging Face token"):
        model.push_to_hub("me/tiny")
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    assert main(["push", str(tmp_path / "run"), "me/tiny"]) == 0
    assert FakeHfApi.calls[0][:2] == ("create_repo", "me/tiny")
    assert FakeHfApi.calls[1] == ("upload_folder", "me/tiny",
                                  ["README.md", "adapter_config.json", "adapter_model.safetensors", "peftkit.json"])
    model.push_to_hub("me/tiny2")
    assert FakeHfApi.calls[-1][:2] == ("upload_folder", "me/tiny2")


# ------------------------------------------------------------------------- 6. several adapters vs PEFT
@pytest.mark.parametrize("combination", ["cat", "svd"])
def test_weighted_adapter_matches_peft(combination, base_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(base(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False))
    peft_model.add_adapter("other", LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = peftkit.load(base(base_dir), tmp_path / "peft")
    peftkit.load(ours, tmp_path / "peft", adapter_name="other")
    options = dict(combination_type=combination, svd_rank=3) if combination == "svd" else dict(combination_type="cat")
    peft_model.add_weighted_adapter(["default", "other"], [0.7, -1.3], "mix", **options)
    peftkit.add_weighted_adapter(ours, ["default", "other"], [0.7, -1.3], "mix", **options)
    peft_model.set_adapter("mix")
    peftkit.set_adapter(ours, "mix")
    batch = make_batches(ours, n=1)[0]
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, batch), peft_model(**batch).logits, atol=1e-5, rtol=1e-5)
    if combination == "cat":  # exact: ΔW_mix = 0.7·ΔW_default − 1.3·ΔW_other
        layer = ours.model.layers[0].self_attn.q_proj
        expected = 0.7 * layer.delta_weight("default") - 1.3 * layer.delta_weight("other")
        torch.testing.assert_close(layer.delta_weight("mix"), expected, atol=1e-6, rtol=1e-6)
        assert layer.ranks["mix"] == 6
    with pytest.raises(StateError, match="already has an adapter 'mix'"):
        peftkit.add_weighted_adapter(ours, ["default"], [1.0], "mix")
    # delete_adapter as PEFT's: the active one goes, the first remaining becomes active.
    peftkit.delete_adapter(ours, "mix")
    peft_model.delete_adapter("mix")
    assert ours.active_adapters() == ["default"] and peft_model.active_adapters == ["default"]


def test_hra_adapters_are_not_combined(base_dir):
    model = peftkit.wrap(base(base_dir), "hra", r=2)
    with pytest.raises(ConfigError, match="not LoRA-shaped"):
        peftkit.add_weighted_adapter(model, ["default"], [1.0], "mix")


# ------------------------------------------------------------------------------- 7. moving from PEFT
@pytest.mark.parametrize("kind", ["lora", "hra"])
def test_wrap_with_a_peft_config_builds_get_peft_models_adapter(kind, base_dir, tmp_path):
    from peft import HRAConfig, LoraConfig, get_peft_model

    if kind == "lora":
        config = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "down_proj"], lora_dropout=0.0,
                            use_rslora=True)
    else:
        config = HRAConfig(r=4, target_modules=["q_proj", "down_proj"], init_weights=False)
    peft_model = get_peft_model(base(base_dir), config)
    ours = peftkit.wrap(base(base_dir), config)
    assert peftkit.trainable_parameters(ours).trainable == peft_model.get_nb_trainable_parameters()[0]
    # The same adapter: PEFT's tensors saved and read into peftkit give PEFT's outputs, key for key.
    peft_model.save_pretrained(tmp_path / "peft")
    peftkit.save(ours, tmp_path / "ours")
    peft_keys = set(checkpoint.read_tensors(tmp_path / "peft" / "adapter_model.safetensors"))
    our_keys = set(checkpoint.read_tensors(tmp_path / "ours" / "adapter_model.safetensors"))
    assert peft_keys == our_keys
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("peft_type", "r", "lora_alpha", "use_rslora", "apply_GS"):
        assert our_config.get(key) == peft_config.get(key), key
    filled = peftkit.load(base(base_dir), tmp_path / "peft")
    batch = make_batches(ours, n=1)[0]
    with torch.no_grad():
        torch.testing.assert_close(logits(filled, batch), peft_model(**batch).logits, atol=1e-5, rtol=1e-5)
    if kind == "lora":
        layer = ours.model.layers[0].self_attn.q_proj
        peft_layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.scaling["default"] == pytest.approx(peft_layer.scaling["default"])


def test_peft_option_names_are_aliases_in_wrap_and_recipes(base_dir, tmp_path):
    from peftkit.train.recipe import load_recipe

    peft_named = peftkit.wrap(base(base_dir), "lora", r=4, target_modules=["q_proj"], lora_alpha=16,
                              lora_dropout=0.1, use_rslora=True, init_lora_weights="gaussian",
                              modules_to_save=["lm_head"])
    ours = peftkit.wrap(base(base_dir), "lora", r=4, targets=["q_proj"], alpha=16, dropout=0.1, rslora=True,
                        init_lora_weights="gaussian", modules_to_save=["lm_head"])
    assert peft_named.peftkit.configs["default"] == ours.peftkit.configs["default"]
    for a, b in zip(adapter_tensors(peft_named).values(), adapter_tensors(ours).values()):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="both were given"):
        peftkit.wrap(base(base_dir), "lora", alpha=8, lora_alpha=16)
    with pytest.raises(ConfigError, match="unknown option 'rank'.*Did you mean 'r'\\?"):
        peftkit.wrap(base(base_dir), "lora", rank=8)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: {base_dir}}}\ndata: {{train: generated:topics}}\n"
                      "adapter: {method: lora, r: 2, target_modules: [q_proj], lora_alpha: 4}\n")
    options = load_recipe(recipe, []).adapter.options
    assert options["targets"] == ["q_proj"] and "target_modules" not in options  # normalised to peftkit's names
    wrapped = peftkit.wrap(base(base_dir), "lora", **options)
    assert wrapped.peftkit.configs["default"].targets == ["q_proj"] and wrapped.peftkit.configs["default"].alpha == 4


# ------------------------------------------------------------------------- review fixes
def test_push_uploads_only_the_adapter_files(base_dir, tmp_path, monkeypatch):
    """A folder that also holds a run's checkpoints or the user's files uploads the adapter alone."""
    seen = {}

    class Recording(FakeHfApi):
        def upload_folder(self, folder_path, repo_id, **kwargs):
            seen.update(kwargs)
            return super().upload_folder(folder_path, repo_id, **kwargs)

    monkeypatch.setattr("peftkit.hub.HfApi", Recording)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    model = peftkit.wrap(base(base_dir), "lora", r=2)
    peftkit.save(model, tmp_path / "out")
    (tmp_path / "out" / "optimizer.pt").write_bytes(b"private")
    peftkit.hub.push_folder(tmp_path / "out", "me/tiny3")
    assert seen["allow_patterns"] == peftkit.hub.ADAPTER_FILES
    assert not any(p in ("*", "optimizer.pt") for p in seen["allow_patterns"])


def test_weighted_adapter_of_an_rslora_adapter_keeps_its_delta(base_dir):
    """cat of one adapter with weight 1 is that adapter: the new adapter's scaling is 1, never alpha / sqrt(r)."""
    model = peftkit.wrap(base(base_dir), "lora", r=4, alpha=8, rslora=True)
    randomize_adapters(model, seed=3)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    peftkit.add_weighted_adapter(model, ["default"], [1.0], "copy", combination_type="cat")
    peftkit.set_adapter(model, "copy")
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_export_of_a_folder_into_an_earlier_save_loads(base_dir, tmp_path):
    """The target's sidecar describes the exported files, not an earlier save's (which load would refuse)."""
    first = peftkit.wrap(base(base_dir), "lora", r=8)
    peftkit.save(first, tmp_path / "target")
    second = peftkit.wrap(base(base_dir), "lora", r=2)
    randomize_adapters(second, seed=1)
    peftkit.save(second, tmp_path / "source")
    peftkit.export(tmp_path / "source", tmp_path / "target")
    loaded = peftkit.load(base(base_dir), tmp_path / "target")
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, second(input_ids=ids).logits, atol=1e-6)


def test_saving_empty_adapter_tensors_is_refused(base_dir, tmp_path):
    """A sharded engine's placeholders (ZeRO-3 leaves 0-element tensors) are never written as an adapter."""
    model = peftkit.wrap(base(base_dir), "lora", r=2, targets=["q_proj"])
    layer = next(iter(peftkit.inject.adapter_layers(model).values()))
    layer.adapters["default"].lora_A.weight.data = torch.empty(0)
    with pytest.raises(CheckpointError, match="empty tensors"):
        peftkit.save(model, tmp_path / "empty")
    assert not (tmp_path / "empty" / "adapter_model.safetensors").exists()


def test_a_missing_local_path_is_not_a_hub_id(tmp_path, monkeypatch):
    from peftkit.hub import is_hub_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    assert not is_hub_id("outputs/run1")  # a mistyped local path: never downloaded
    assert is_hub_id("someone/adapter")


def test_load_adapter_reads_the_revision_it_is_given(base_dir, tmp_path, monkeypatch):
    """transformers' ``load_adapter(id, revision=..., token=...)``: the revision is the one loaded (a tag here),
    never silently main; other loading keywords are refused rather than ignored."""
    first = peftkit.wrap(base(base_dir), "lora", r=4)
    randomize_adapters(first, seed=1)
    peftkit.save(first, tmp_path / "v1")
    second = peftkit.wrap(base(base_dir), "lora", r=4)
    randomize_adapters(second, seed=2)
    peftkit.save(second, tmp_path / "v2")
    cache = tmp_path / "hub"
    populate_cache(cache, "someone/tiny-lora", tmp_path / "v1")  # main
    repo = cache / "models--someone--tiny-lora"
    tagged = "fedcba9876543210fedcba9876543210fedcba98"
    (repo / "snapshots" / tagged).mkdir()
    for path in (tmp_path / "v2").iterdir():
        (repo / "snapshots" / tagged / path.name).write_bytes(path.read_bytes())
    (repo / "refs" / "v2").write_text(tagged)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    batch = make_batches(first, n=1)[0]
    model = peftkit.wrap(base(base_dir), "lora", r=4)
    model.load_adapter("someone/tiny-lora", adapter_name="tagged", revision="v2")
    model.load_adapter("someone/tiny-lora", adapter_name="main", adapter_kwargs={"token": "hf_unused_offline"})
    model.set_adapter("tagged")
    torch.testing.assert_close(logits(model, batch), logits(second, batch))
    model.set_adapter("main")
    torch.testing.assert_close(logits(model, batch), logits(first, batch))
    assert not torch.allclose(logits(first, batch), logits(second, batch))
    loaded = peftkit.load(base(base_dir), "someone/tiny-lora", revision="v2")
    torch.testing.assert_close(logits(loaded, batch), logits(second, batch))
    with pytest.raises(CheckpointError, match="at revision 'v9'"):
        peftkit.load(base(base_dir), "someone/tiny-lora", revision="v9")
    with pytest.raises(ConfigError, match=r"load_adapter: \['subfolder'\] are not supported"):
        model.load_adapter("someone/tiny-lora", adapter_name="x", subfolder="sub")
    with pytest.raises(ConfigError, match="revision='v2' applies to a Hub id"):
        peftkit.load(base(base_dir), tmp_path / "v1", revision="v2")
