"""Checkpoints in PEFT's format, both ways, the exact save layout, atomic writes and mismatched pairs.

- peftkit's save is read by ``peft.PeftModel.from_pretrained`` and by transformers' ``model.load_adapter``
  with the same outputs (rsLoRA, rank_pattern, alpha_pattern, Conv1D, a modules_to_save head);
- adapters saved by PEFT 0.21 (rsLoRA, rank_pattern, alpha_pattern, GPT-2 Conv1D, a modules_to_save head, a
  non-default adapter name in a subfolder, a minimal config with an unknown key) load with the same outputs;
- the saved key set and shapes are exactly PEFT's;
- a failure while saving leaves the previous checkpoint intact and no temporary file; a crash between the two
  renames, or a config and weights from different saves, is refused on load.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
import torch.nn as nn
from helpers import make_batch, output, quiet, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama

import peftkit
from peftkit import checkpoint
from peftkit.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from peftkit.errors import CheckpointError

TOL = dict(atol=1e-6, rtol=1e-6)


def logits(model, batch) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


def perturb_heads(model, seed: int = 5) -> None:
    """Move every trainable head copy away from the original (so a lost head shows in the output)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


# ------------------------------------------------------------------------------------------ peftkit -> PEFT
OUR_SAVES = {
    "llama-rslora-patterns": (tiny_llama,
                              dict(r=4, alpha=8, rslora=True, rank_pattern={"q_proj": 2, r"layers\.1\..*up_proj": 6},
                                               alpha_pattern={"v_proj": 3.0})),
    "gpt2-conv1d": (tiny_gpt2, dict(r=4, alpha=16)),
    "bert-head": (tiny_bert, dict(r=4, alpha=8, modules_to_save=["classifier"])),
}


@pytest.mark.parametrize("case", list(OUR_SAVES))
def test_our_save_reads_in_peft_and_transformers(case, tmp_path):
    factory, options = OUR_SAVES[case]
    model = peftkit.wrap(factory(), "lora", **options)
    randomize_adapters(model)
    perturb_heads(model)
    batch = make_batch(model)
    ours = output(model, batch)
    assert (ours - output(factory(), batch)).abs().max() > 1e-3
    peftkit.save(model, tmp_path)

    from peft import PeftModel

    with quiet():
        peft_model = PeftModel.from_pretrained(factory(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model, batch), ours, **TOL)

    plain = factory()
    with quiet():
        plain.load_adapter(str(tmp_path))
    torch.testing.assert_close(logits(plain, batch), ours, **TOL)


# ------------------------------------------------------------------------------------------ PEFT -> peftkit
def peft_wrapped(factory, adapter_name: str = "default", **lora_options):
    """A PEFT LoRA model with random A and B (init_lora_weights=False), so the adapter changes the output."""
    from peft import LoraConfig, get_peft_model

    base = factory()
    config = LoraConfig(init_lora_weights=False, **lora_options)
    with quiet():
        model = get_peft_model(base, config, adapter_name=adapter_name)
    perturb_heads(model)
    return model.eval()


PEFT_SAVES = {
    "rslora": (tiny_llama, dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
    "rank-alpha-pattern": (tiny_llama, dict(r=4, lora_alpha=8, target_modules="all-linear",
                                            rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.up_proj": 8},
                                            alpha_pattern={"k_proj": 2, "down_proj": 32})),
    "gpt2-conv1d": (tiny_gpt2,
                    dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "bert-head": (tiny_bert, dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS",
                                  modules_to_save=["classifier"])),
}


@pytest.mark.parametrize("case", list(PEFT_SAVES))
def test_peft_saved_adapter_loads(case, tmp_path):
    factory, options = PEFT_SAVES[case]
    theirs = peft_wrapped(factory, **options)
    batch = make_batch(theirs)
    expected = logits(theirs, batch)
    assert (expected - output(factory(), batch)).abs().max() > 1e-3
    theirs.save_pretrained(str(tmp_path))
    model = factory()
    with quiet():
        peftkit.load(model, tmp_path)
    torch.testing.assert_close(output(model, batch), expected, **TOL)
    config = peftkit.inject.state_of(model).configs["default"]
    assert config.rslora == options.get("use_rslora", False)
    assert config.rank_pattern == options.get("rank_pattern", {})


def test_peft_non_default_adapter_name_in_subfolder(tmp_path):
    theirs = peft_wrapped(tiny_llama, adapter_name="other", r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"])
    batch = make_batch(theirs)
    expected = logits(theirs, batch)
    theirs.save_pretrained(str(tmp_path))
    assert (tmp_path / "other" / CONFIG_NAME).is_file() and not (tmp_path / CONFIG_NAME).exists()
    model = tiny_llama()
    peftkit.load(model, tmp_path, adapter_name="other")
    assert list(peftkit.inject.state_of(model).configs) == ["other"]
    torch.testing.assert_close(output(model, batch), expected, **TOL)


def test_minimal_peft_config_with_unknown_key(tmp_path):
    """lora.md's minimal valid file: four keys plus an unknown one, loaded against a hand-computed forward."""
    torch.manual_seed(3)
    model = tiny_llama()
    names = [n for n, m in model.named_modules() if n.endswith("q_proj")]
    tensors = {}
    expected = tiny_llama()
    for name in names:
        module = model.get_submodule(name)
        a = torch.randn(2, module.in_features) * 0.3
        b = torch.randn(module.out_features, 2) * 0.3
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
        with torch.no_grad():
            expected.get_submodule(name).weight.add_((4 / 2) * (b.double() @ a.double()).float())
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    (tmp_path / CONFIG_NAME).write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "some_unknown_key": 1}))
    peftkit.load(model, tmp_path)
    batch = make_batch(model)
    torch.testing.assert_close(output(model, batch), output(expected, batch), atol=1e-5, rtol=1e-5)
    assert sorted(peftkit.inject.adapter_layers(model)) == names


# ------------------------------------------------------------------------------------------ layout
def expected_layout(model, ranks) -> dict[str, tuple[int, ...]]:
    """PEFT's keys and shapes for LoRA on ``ranks`` {module name: r}: A (r, in), B (out, r), Conv1D included."""
    from transformers.pytorch_utils import Conv1D

    layout = {}
    for name, r in ranks.items():
        module = model.get_submodule(name)
        n_in, n_out = module.weight.shape if isinstance(module, Conv1D) else (module.in_features, module.out_features)
        layout[f"base_model.model.{name}.lora_A.weight"] = (r, n_in)
        layout[f"base_model.model.{name}.lora_B.weight"] = (n_out, r)
    return layout


def test_save_layout_llama_with_rank_pattern(tmp_path):
    base = tiny_llama()
    linear = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    model = peftkit.wrap(tiny_llama(), "lora", r=4, alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={"o_proj": 5})
    peftkit.save(model, tmp_path)
    tensors = checkpoint.read_tensors(tmp_path / WEIGHTS_NAME)
    ranks = {n: 2 if n.endswith("q_proj") else 4 for n in linear}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_layout(base, ranks)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["rank_pattern"] == {"q_proj": 2} and config["alpha_pattern"] == {"o_proj": 5}
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    assert config["fan_in_fan_out"] is False and config["use_rslora"] is False and config["bias"] == "none"
    assert config["task_type"] == "CAUSAL_LM" and config["modules_to_save"] is None
    assert not any(n.startswith(".") for n in os.listdir(tmp_path)), "temporary files left behind"


def test_save_layout_gpt2_conv1d_and_bert_head(tmp_path):
    base = tiny_gpt2()
    model = peftkit.wrap(tiny_gpt2(), "lora", r=4, targets=["c_attn"])
    peftkit.save(model, tmp_path / "gpt2")
    tensors = checkpoint.read_tensors(tmp_path / "gpt2" / WEIGHTS_NAME)
    layout = expected_layout(base, {f"transformer.h.{i}.attn.c_attn": 4 for i in range(2)})
    assert {k: tuple(v.shape) for k, v in tensors.items()} == layout
    assert layout["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"] == (96, 4)  # (out, r), as for Linear
    assert json.loads((tmp_path / "gpt2" / CONFIG_NAME).read_text())["fan_in_fan_out"] is True

    bert = peftkit.wrap(tiny_bert(), "lora", r=4, targets=["query"], modules_to_save=["classifier"])
    peftkit.save(bert, tmp_path / "bert")
    tensors = checkpoint.read_tensors(tmp_path / "bert" / WEIGHTS_NAME)
    expected = expected_layout(tiny_bert(), {f"bert.encoder.layer.{i}.attention.self.query": 4 for i in range(2)})
    expected["base_model.model.classifier.weight"] = (3, 32)
    expected["base_model.model.classifier.bias"] = (3,)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    config = json.loads((tmp_path / "bert" / CONFIG_NAME).read_text())
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"


def test_two_adapters_save_to_folder_and_subfolder(tmp_path):
    model = peftkit.wrap(tiny_llama(), "lora", r=4, targets=["q_proj", "v_proj"])
    peftkit.wrap(model, "lora", adapter_name="other", r=2, targets=["o_proj"])
    randomize_adapters(model)
    batch = make_batch(model)
    outs = {}
    for name in ("default", "other"):
        peftkit.set_adapter(model, name)
        outs[name] = output(model, batch)
    assert (outs["default"] - outs["other"]).abs().max() > 1e-3
    peftkit.save(model, tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file() and (tmp_path / "other" / WEIGHTS_NAME).is_file()
    fresh = tiny_llama()
    peftkit.load(fresh, tmp_path)
    peftkit.load(fresh, tmp_path, adapter_name="other")
    for name in ("default", "other"):
        peftkit.set_adapter(fresh, name)
        torch.testing.assert_close(output(fresh, batch), outs[name], **TOL)


# ------------------------------------------------------------------------------------------ atomic writes
def saved_lora(tmp_path):
    model = peftkit.wrap(tiny_llama(), "lora", r=4, targets=["q_proj"])
    randomize_adapters(model, seed=1)
    peftkit.save(model, tmp_path)
    snapshot = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}  # the sidecar and card too
    randomize_adapters(model, seed=2)  # the next save would write different bytes
    return model, snapshot


def assert_intact(tmp_path, snapshot) -> None:
    assert sorted(os.listdir(tmp_path)) == sorted(snapshot), f"left behind: {os.listdir(tmp_path)}"
    for name, data in snapshot.items():
        assert (tmp_path / name).read_bytes() == data, f"{name} changed"
    checkpoint.load(tiny_llama(), tmp_path)  # and it still loads


def test_serializer_failure_keeps_old_checkpoint(tmp_path, monkeypatch):
    model, snapshot = saved_lora(tmp_path)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save", broken)
    with pytest.raises(OSError, match="disk full"):
        peftkit.save(model, tmp_path)
    assert_intact(tmp_path, snapshot)


def test_failure_while_writing_keeps_old_checkpoint(tmp_path, monkeypatch):
    model, snapshot = saved_lora(tmp_path)
    real_fsync = os.fsync
    calls = []

    def crash_on_second_file(fd):
        calls.append(fd)
        if len(calls) == 2:  # the config's temporary file, after the weights' was written completely
            raise OSError("I/O error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", crash_on_second_file)
    with pytest.raises(OSError, match="I/O error"):
        peftkit.save(model, tmp_path)
    assert_intact(tmp_path, snapshot)


def test_failure_at_first_rename_keeps_old_checkpoint(tmp_path, monkeypatch):
    model, snapshot = saved_lora(tmp_path)

    def broken(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="rename failed"):
        peftkit.save(model, tmp_path)
    monkeypatch.undo()
    assert_intact(tmp_path, snapshot)


def test_crash_between_renames_is_refused_on_load(tmp_path, monkeypatch):
    model, snapshot = saved_lora(tmp_path)
    real_replace = os.replace
    renames = []

    def crash_on_second(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise OSError("power loss")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(OSError, match="power loss"):
        peftkit.save(model, tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == sorted(snapshot), "a temporary file was left behind"
    fresh = tiny_llama()
    modules = [n for n, _ in fresh.named_modules()]
    with pytest.raises(CheckpointError, match="sha256"):
        peftkit.load(fresh, tmp_path)
    assert [n for n, _ in fresh.named_modules()] == modules


def test_config_and_weights_from_two_saves_are_refused(tmp_path):
    first = peftkit.wrap(tiny_llama(), "lora", r=4, targets=["q_proj"])
    randomize_adapters(first, seed=1)
    peftkit.save(first, tmp_path / "a")
    randomize_adapters(first, seed=2)
    peftkit.save(first, tmp_path / "b")
    shutil.copy(tmp_path / "b" / WEIGHTS_NAME, tmp_path / "a" / WEIGHTS_NAME)
    fresh = tiny_llama()
    with pytest.raises(CheckpointError, match=re.escape(WEIGHTS_NAME) + " is not the file saved with this"):
        peftkit.load(fresh, tmp_path / "a")
    assert peftkit.inject.state_of(fresh, required=False) is None and not peftkit.inject.adapter_layers(fresh)


def test_loading_another_adapter_keeps_the_other_flags(tmp_path):
    source = peftkit.wrap(tiny_llama(), "lora", r=4, targets=["q_proj"])
    peftkit.save(source, tmp_path / "a")
    peftkit.save(source, tmp_path / "b")
    model = peftkit.wrap(tiny_llama(), "lora", r=2, targets=["v_proj"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    peftkit.load(model, tmp_path / "a", adapter_name="frozen")
    peftkit.load(model, tmp_path / "b", adapter_name="inactive", trainable=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # still only "default"
    peftkit.set_adapter(model, "inactive")
    now = [n for n, p in model.named_parameters() if p.requires_grad]
    assert now and all(".adapters.inactive." in n for n in now)


def test_peft_rank_above_layer_size_still_loads(tmp_path):
    """PEFT does not check r against min(in, out); peftkit refuses it at wrap but must read such checkpoints."""
    theirs = peft_wrapped(tiny_llama, r=20, lora_alpha=8, target_modules=["k_proj"])  # k_proj is 16x32
    batch = make_batch(theirs)
    expected = logits(theirs, batch)
    theirs.save_pretrained(str(tmp_path))
    model = tiny_llama()
    peftkit.load(model, tmp_path)
    torch.testing.assert_close(output(model, batch), expected, **TOL)
    peftkit.save(model, tmp_path / "again")  # and peftkit's own save of it loads again
    again = tiny_llama()
    peftkit.load(again, tmp_path / "again")
    torch.testing.assert_close(output(again, batch), expected, **TOL)
