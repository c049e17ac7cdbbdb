"""Bad input (issue 2's list): each ends in one clear peftkit error that names the field or file, and leaves the
model exactly as it was (same modules, same requires_grad flags, same weights)."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from helpers import make_batch, output, randomize_adapters, tiny_bert, tiny_llama

import peftkit
from peftkit import checkpoint, registry
from peftkit.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from peftkit.errors import CheckpointError, ConfigError, StateError
from peftkit.inject import adapter_layers, state_of


def fingerprint(model) -> tuple:
    """Everything an error must leave unchanged: module tree, requires_grad flags, every tensor's value."""
    modules = [(name, type(module).__name__) for name, module in model.named_modules()]
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    tensors = {name: t.detach().clone() for name, t in model.state_dict().items()}
    state = state_of(model, required=False)
    adapters = None if state is None else (sorted(state.configs), list(state.active))
    return modules, flags, tensors, adapters


def assert_unchanged(model, before) -> None:
    after = fingerprint(model)
    assert after[0] == before[0], "modules changed"
    assert after[1] == before[1], "requires_grad flags changed"
    assert after[2].keys() == before[2].keys()
    for name, tensor in before[2].items():
        assert torch.equal(after[2][name], tensor), f"{name} changed"
    assert after[3] == before[3], "adapter state changed"


def raises_unchanged(model, error, pattern, fn, *args, **kwargs):
    before = fingerprint(model)
    with pytest.raises(error, match=pattern) as info:
        fn(*args, **kwargs)
    assert_unchanged(model, before)
    return str(info.value)


# ------------------------------------------------------------------------------------------ wrap
def test_unknown_method_lists_registered_names():
    model = tiny_llama()
    message = raises_unchanged(model, ConfigError, "unknown method 'lroa'", peftkit.wrap, model, "lroa")
    assert "Did you mean 'lora'" in message
    for name in peftkit.methods():
        assert name in message


def test_one_unmatched_target_among_several_is_named():
    model = tiny_llama()
    message = raises_unchanged(model, ConfigError, r"^targets: \['v_prj'\] match no module", peftkit.wrap, model,
                               "lora", targets=["q_proj", "v_prj"])
    assert "v_proj" in message  # a close module name is shown
    raises_unchanged(model, ConfigError, "targets: the regex", peftkit.wrap, model, "lora", targets=r".*\.qproj")


@pytest.mark.parametrize("r", [0, -2, 2.5, True])
def test_rank_must_be_a_positive_integer(r):
    model = tiny_llama()
    raises_unchanged(model, ConfigError, r"^r: expected a positive integer", peftkit.wrap, model, "lora", r=r)


def test_rank_larger_than_the_layer_is_refused_and_rolled_back():
    model = tiny_llama()  # k_proj / v_proj are 16x32 (2 KV heads of 8): r = 17 fits q_proj, not k_proj
    message = raises_unchanged(model, ConfigError, r"^r: rank 17 for model\.layers\.0\.self_attn\.k_proj exceeds",
                               peftkit.wrap, model, "lora", r=17)
    assert "min(in, out) = 16" in message
    raises_unchanged(model, ConfigError, r"^r: rank 20 .*k_proj", peftkit.wrap, model, "lora", r=4,
                     rank_pattern={"k_proj": 20})


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan")])
def test_alpha_must_be_positive(alpha):
    model = tiny_llama()
    raises_unchanged(model, ConfigError, r"^alpha: expected a positive number", peftkit.wrap, model, "lora",
                     alpha=alpha)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_dropout_must_be_in_unit_interval(dropout):
    model = tiny_llama()
    raises_unchanged(model, ConfigError, r"^dropout: expected a probability in \[0, 1\)", peftkit.wrap, model, "lora",
                     dropout=dropout)


def test_unknown_option_suggests_the_closest():
    model = tiny_llama()
    message = raises_unchanged(model, ConfigError, "unknown option 'dropuot'", peftkit.wrap, model, "lora", dropuot=0.1)
    assert "Did you mean 'dropout'?" in message
    peftkit.wrap(model, "lora")
    raises_unchanged(model, ConfigError, "optimizer: unknown option 'weight_decai'.*Did you mean 'weight_decay'",
                     peftkit.optimizer, model, 1e-3, weight_decai=0.1)


def test_wrapping_a_wrapped_model_is_refused():
    model = peftkit.wrap(tiny_llama(), "lora", r=4)
    randomize_adapters(model)
    message = raises_unchanged(model, StateError, "already wrapped with an adapter named 'default'", peftkit.wrap,
                               model, "lora", r=4)
    assert "adapter_name=" in message and "unwrap" in message


def test_merging_twice_is_refused():
    model = peftkit.wrap(tiny_llama(), "lora", r=4)
    randomize_adapters(model)
    batch = make_batch(model)
    out = output(model, batch)
    peftkit.merge(model)
    raises_unchanged(model, StateError, r"^merge: the adapters are already merged.*unmerge", peftkit.merge, model)
    peftkit.unmerge(model)
    torch.testing.assert_close(output(model, batch), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_pattern_key_matching_no_module_is_an_error_at_wrap(field):
    model = tiny_llama()
    raises_unchanged(model, ConfigError, rf"^{field}: key 'v_prj' matches no adapted module", peftkit.wrap, model,
                     "lora", targets=["q_proj", "v_proj"], **{field: {"q_proj": 2, "v_prj": 2}})
    # A key naming a real module that is not adapted is just as unmatched.
    raises_unchanged(model, ConfigError, rf"^{field}: key 'o_proj' matches", peftkit.wrap, model, "lora",
                     targets=["q_proj"], **{field: {"o_proj": 2}})


def test_pattern_key_matching_no_module_warns_when_loading_a_peft_checkpoint(tmp_path):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                         rank_pattern={"v_proj": 2}, init_lora_weights=False)).eval()
    batch = make_batch(theirs)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = theirs(**inputs).logits
    theirs.save_pretrained(str(tmp_path))
    model = tiny_llama()
    with pytest.warns(UserWarning,
                      match="rank_pattern: key 'v_proj' of the loaded checkpoint matches no adapted module"):
        peftkit.load(model, tmp_path)
    torch.testing.assert_close(output(model, batch), expected, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------ load
@pytest.fixture
def saved(tmp_path):
    model = peftkit.wrap(tiny_llama(), "lora", r=4, targets=["q_proj", "up_proj", "down_proj"])
    randomize_adapters(model)
    peftkit.save(model, tmp_path)
    return tmp_path


def test_adapter_that_does_not_fit_the_base_lists_the_mismatches(saved):
    other = tiny_llama(intermediate_size=64)  # up_proj (64, 32) and down_proj (32, 64) differ, q_proj fits
    message = raises_unchanged(other, CheckpointError, "shapes do not fit this model", peftkit.load, other, saved)
    assert "(4 mismatches)" in message
    for layer in (0, 1):
        assert f"model.layers.{layer}.mlp.up_proj.lora_B.weight: saved (48, 4), model needs (64, 4)" in message
        assert f"model.layers.{layer}.mlp.down_proj.lora_A.weight: saved (4, 48), model needs (4, 64)" in message
    assert "q_proj" not in message


def test_adapter_for_modules_the_base_lacks(saved):
    other = tiny_llama(num_hidden_layers=1)
    raises_unchanged(other, CheckpointError, r"targets modules this model does not have: \['model\.layers\.1\.",
                     peftkit.load, other, saved)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_or_truncated_weights(saved, damage):
    path = saved / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x07" * 64, "empty": b""}[damage])
    model = tiny_llama()
    raises_unchanged(model, CheckpointError, re.escape(str(path)) + ": not a readable safetensors file", peftkit.load,
                     model, saved)


def test_corrupt_config(saved):
    (saved / CONFIG_NAME).write_text('{"peft_type": "LORA", "r": ')
    model = tiny_llama()
    raises_unchanged(model, CheckpointError, re.escape(CONFIG_NAME) + ": not valid JSON", peftkit.load, model, saved)


def test_missing_folder(tmp_path):
    model = tiny_llama()
    raises_unchanged(model, CheckpointError, re.escape(CONFIG_NAME) + ": file not found", peftkit.load, model,
                     tmp_path / "nowhere")


def test_peft_checkpoint_of_an_unread_type(tmp_path):
    from peft import IA3Config, LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(tiny_llama(),
                       IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
                       ).save_pretrained(str(tmp_path / "ia3"))
        get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True)
                       ).save_pretrained(str(tmp_path / "lora-bias"))
    model = tiny_llama()
    raises_unchanged(model, CheckpointError, "peft_type 'IA3' is not a format peftkit reads", peftkit.load, model,
                     tmp_path / "ia3")
    # (DoRA, once refused here, is read since issue 31: tests/test_dora.py)
    raises_unchanged(model, CheckpointError, "this LoRA uses lora_bias, which peftkit does not read", peftkit.load,
                     model, tmp_path / "lora-bias")


def test_failed_load_into_a_wrapped_model_keeps_its_adapter(saved):
    model = peftkit.wrap(tiny_llama(intermediate_size=64), "lora", r=2, targets=["q_proj"])
    randomize_adapters(model)
    raises_unchanged(model, CheckpointError, "shapes do not fit", peftkit.load, model, saved, adapter_name="other")
    assert json.loads((saved / CONFIG_NAME).read_text())["peft_type"] == "LORA"
    assert all(list(layer.adapters) == ["default"] for layer in adapter_layers(model).values())


def test_failing_init_leaves_the_model_as_it_was(monkeypatch):
    """An init that raises (e.g. a data-driven init meeting bad batches) after injection: everything undone."""

    def broken_init(model, layers, config, data):
        raise ConfigError("data: the batches hold no input_ids")

    monkeypatch.setitem(registry._components["init"], "test-broken",
                        registry.Component("init", "test-broken", broken_init))
    model = tiny_llama()
    raises_unchanged(model, ConfigError, "^data: the batches hold no input_ids", peftkit.wrap, model, "lora",
                     init="test-broken")
    wrapped = peftkit.wrap(tiny_llama(), "lora", r=4, targets=["q_proj"])
    randomize_adapters(wrapped)
    raises_unchanged(wrapped, ConfigError, "^data:", peftkit.wrap, wrapped, "lora", init="test-broken",
                     adapter_name="second", targets=["q_proj", "o_proj"])


def test_pickled_peft_weights_are_not_loaded(saved):
    (saved / WEIGHTS_NAME).rename(saved / "adapter_model.bin")
    model = tiny_llama()
    raises_unchanged(model, CheckpointError, "only adapter_model.bin \\(a pickle, which peftkit never loads\\)",
                     peftkit.load, model, saved)


def test_bit_flip_in_the_tensor_data_is_caught(saved):
    """safetensors cannot see a flipped bit in the data region; the sha256 recorded at save time does."""
    path = saved / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    assert len(checkpoint.read_tensors(path)) == 12  # still parses
    model = tiny_llama()
    raises_unchanged(model, CheckpointError, "sha256 differs .* it was corrupted", peftkit.load, model, saved)


def test_unmatched_modules_to_save_entry_is_named():
    model = tiny_bert()
    message = raises_unchanged(model, ConfigError, r"^modules_to_save: \['clasifier'\] match no module", peftkit.wrap,
                               model, "lora", modules_to_save=["clasifier"])
    assert "classifier" in message
    raises_unchanged(model, ConfigError, r"^modules_to_save: expected a list of module names", peftkit.wrap, model,
                     "lora", modules_to_save="classifier")


def test_config_from_another_peftkit_is_one_checkpoint_error(saved):
    path = saved / "peftkit.json"  # peftkit's metadata sidecar
    data = json.loads(path.read_text())
    data["config"]["architecture"] = "lora-from-a-plugin"
    path.write_text(json.dumps(data))
    model = tiny_llama()
    raises_unchanged(model, CheckpointError, "architecture is not registered here .*unknown architecture "
                     "'lora-from-a-plugin'", peftkit.load, model, saved)
    data["config"].update(architecture="lora", field_from_the_future=1)
    path.write_text(json.dumps(data))
    raises_unchanged(model, CheckpointError, "unreadable adapter config .*field_from_the_future", peftkit.load, model,
                     saved)


def test_save_into_a_path_that_is_a_file(tmp_path):
    from peftkit.errors import CheckpointError

    model = tiny_llama()
    peftkit.wrap(model, "lora", r=2)
    target = tmp_path / "not-a-folder"
    target.write_text("keep me")
    with pytest.raises(CheckpointError, match="not a folder"):
        peftkit.save(model, target)
    assert target.read_text() == "keep me"


def test_unsafe_adapter_merge_is_a_peftkit_error_and_changes_nothing():
    from peftkit.errors import MergeError, PeftkitError
    from peftkit.inject import adapter_layers

    model = tiny_llama()
    peftkit.wrap(model, "lora", r=2)
    layer = next(iter(adapter_layers(model).values()))
    with torch.no_grad():
        layer.adapters["default"].lora_B.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match="NaN or inf") as err:
        peftkit.merge(model, safe=True)
    assert isinstance(err.value, PeftkitError) and isinstance(err.value, ValueError)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) or (before[k].isnan() == after[k].isnan()).all() for k in before)
