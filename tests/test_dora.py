"""DoRA against PEFT 0.21's ``use_dora`` (fp64): forward, gradients (the detached norm), both directions of the
on-disk format, merge; GPT-2's Conv1D; composition refusals."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import make_batch, output, tiny_gpt2, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model

import peftkit
from peftkit.errors import ConfigError

TARGETS = ["q_proj", "v_proj", "down_proj"]


def peft_dora(base, targets=TARGETS, dropout=0.0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                                lora_dropout=dropout, fan_in_fan_out=False))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B ≠ 0 and m ≠ ‖W + ΔW‖, so every term of the formula shows
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return model


def key(name: str) -> str:
    """A parameter's module path and tensor name, the same for PEFT's and peftkit's models."""
    for part in ("base_model.model.", ".adapters", ".default"):
        name = name.replace(part, "")
    return name.removesuffix(".weight")


def loss_and_grads(model, batch, names):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    params = dict(model.named_parameters())
    return loss.detach(), [params[n].grad.clone() for n in names]


def test_peft_folder_loads_and_matches_forward_and_gradients(tmp_path):
    peft_model = peft_dora(tiny_llama(dtype=torch.float64))
    peft_model.save_pretrained(tmp_path)
    model = peftkit.load(tiny_llama(dtype=torch.float64), tmp_path, trainable=True)
    batch = make_batch(model)
    ref = output(peft_model, batch)
    assert (ref - output(tiny_llama(dtype=torch.float64), batch)).abs().max() > 1e-3
    assert (output(model, batch) - ref).abs().max() <= 1e-10
    # Gradients w.r.t. A, B and m equal PEFT's: the norm is detached in both.
    peft_names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    mine = {key(n): n for n, p in model.named_parameters() if p.requires_grad}
    assert len(peft_names) == len(mine) == 3 * 2 * 3
    loss_ref, grads_ref = loss_and_grads(peft_model, batch, peft_names)
    ours = [mine[key(n)] for n in peft_names]
    loss, grads = loss_and_grads(model, batch, ours)
    assert abs(loss - loss_ref) <= 1e-10
    for n, g, g_ref in zip(peft_names, grads, grads_ref):
        assert (g - g_ref).abs().max() <= 1e-10 * max(1.0, g_ref.abs().max().item()), n


def test_peftkit_save_is_peft_dora_and_peft_reads_it(tmp_path):
    from safetensors.torch import load_file

    peft_model = peft_dora(tiny_llama(dtype=torch.float64))
    peft_model.save_pretrained(tmp_path / "peft")
    model = peftkit.load(tiny_llama(dtype=torch.float64), tmp_path / "peft")
    peftkit.save(model, tmp_path / "mine")
    import json

    config = json.loads((tmp_path / "mine" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    mine = load_file(tmp_path / "mine" / "adapter_model.safetensors")
    assert set(mine) == set(theirs)
    assert any(k.endswith(".lora_magnitude_vector") for k in mine)
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key
    reloaded = PeftModel.from_pretrained(tiny_llama(dtype=torch.float64), str(tmp_path / "mine")).eval()
    batch = make_batch(model)
    assert (output(reloaded, batch) - output(model, batch)).abs().max() <= 1e-10


def test_wrap_starts_at_base_and_magnitude_is_row_norm():
    base = tiny_llama(dtype=torch.float64)
    batch = make_batch(base)
    ref = output(base, batch)
    weight = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = peftkit.wrap(base, "dora", r=4, targets=TARGETS)
    assert (output(model, batch) - ref).abs().max() <= 1e-12
    m = model.model.layers[0].self_attn.q_proj.adapters["default"].lora_magnitude_vector
    assert torch.allclose(m, weight.norm(dim=1), rtol=0, atol=1e-14)


def test_merge_is_exact_and_unmerge_restores(tmp_path):
    peft_model = peft_dora(tiny_llama(dtype=torch.float64))
    peft_model.save_pretrained(tmp_path)
    model = peftkit.load(tiny_llama(dtype=torch.float64), tmp_path)
    batch = make_batch(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    ref = output(model, batch)
    peftkit.merge(model)
    assert (output(model, batch) - ref).abs().max() <= 1e-10
    merged_ref = output(peft_model.merge_and_unload(), batch)
    assert (output(model, batch) - merged_ref).abs().max() <= 1e-10
    peftkit.unmerge(model)
    for k, v in model.state_dict().items():
        if k in before:
            assert (v - before[k]).abs().max() <= 1e-12, k
    assert (output(model, batch) - ref).abs().max() <= 1e-10


def peft_two_doras(order):
    """PEFT's model with two DoRA adapters (random A, B, m) on the same layers, both active in ``order``."""
    model = peft_dora(tiny_llama(dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                               use_dora=True, fan_in_fan_out=False))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and ".second" in name:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    model.base_model.set_adapter(list(order))
    return model


@pytest.mark.parametrize("order", [("default", "second"), ("second", "default")])
def test_several_dora_adapters_merge_to_their_unmerged_forward(tmp_path, order):
    """Two DoRA adapters on the same layers, merged in turn: each norm is ‖W₀ + ΔWᵢ‖ on the ORIGINAL base W₀ (as
    the forward takes it), each gain scales the weight as it stands (the forward's running output); so the merged
    model equals the unmerged forward with both active, and PEFT's merge_and_unload (which recovers W₀ for the
    norm the same way). Before, the second norm was taken on the weight holding the first merge (5e-2 off here)."""
    peft_model = peft_two_doras(order)
    peft_model.save_pretrained(tmp_path)
    model = peftkit.load(tiny_llama(dtype=torch.float64), tmp_path)
    peftkit.load(model, tmp_path / "second", adapter_name="second")
    peftkit.set_adapter(model, list(order))
    batch = make_batch(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    ref = output(model, batch)
    assert (output(peft_model, batch) - ref).abs().max() <= 1e-10  # the same forward with both active
    peftkit.set_adapter(model, [order[0]])
    assert (output(model, batch) - ref).abs().max() > 1e-3  # the second adapter counts
    peftkit.set_adapter(model, list(order))
    peftkit.merge(model)
    assert (output(model, batch) - ref).abs().max() <= 1e-10
    assert (output(peft_model.merge_and_unload(), batch) - ref).abs().max() <= 1e-10
    peftkit.unmerge(model)
    for k, v in model.state_dict().items():
        if k in before:
            assert (v - before[k]).abs().max() <= 1e-12, k
    assert (output(model, batch) - ref).abs().max() <= 1e-10
    # merged one call at a time (each layer's merge(names)), in the forward's order: the same weights
    from peftkit.inject import adapter_layers

    for name in order:
        for layer in adapter_layers(model).values():
            layer.merge([name])
    assert (output(model, batch) - ref).abs().max() <= 1e-10
    peftkit.unmerge(model)
    for k, v in model.state_dict().items():
        if k in before:
            assert (v - before[k]).abs().max() <= 1e-12, k


def test_dropout_in_training_matches_peft(tmp_path):
    peft_model = peft_dora(tiny_llama(dtype=torch.float64), dropout=0.3)
    peft_model.save_pretrained(tmp_path)
    model = peftkit.load(tiny_llama(dtype=torch.float64), tmp_path, trainable=True)
    peft_model.train()
    model.train()
    batch = make_batch(model)
    torch.manual_seed(7)
    ref = peft_model(**batch).logits
    torch.manual_seed(7)
    mine = model(**batch).logits
    assert (mine - ref).abs().max() <= 1e-10


def test_gpt2_conv1d_matches_peft(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(tiny_gpt2(dtype=torch.float64),
                                    LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True,
                                               fan_in_fan_out=True))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    model = peftkit.load(tiny_gpt2(dtype=torch.float64), tmp_path / "peft")
    batch = make_batch(model)
    assert (output(model, batch) - output(peft_model, batch)).abs().max() <= 1e-10
    peftkit.save(model, tmp_path / "mine")
    reloaded = PeftModel.from_pretrained(tiny_gpt2(dtype=torch.float64), str(tmp_path / "mine")).eval()
    assert (output(reloaded, batch) - output(model, batch)).abs().max() <= 1e-10


def test_peft_config_object_with_use_dora_wraps_as_dora():
    model = peftkit.wrap(tiny_llama(dtype=torch.float64), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "DoraLayer"


@pytest.mark.parametrize("optimizer", ["lora-pro", "loft"])
def test_pair_optimizers_that_assume_plain_lora_are_refused(optimizer):
    base = tiny_llama()
    with pytest.raises(ConfigError, match=optimizer):
        peftkit.wrap(base, "dora", r=4, targets=["q_proj"], optimizer=optimizer)


@pytest.mark.parametrize("components", [dict(init="lora-ga"), dict(init="eva"), dict(optimizer="lora-plus"),
                                        dict(schedule="coto")])
def test_composes_with_inits_optimizers_and_schedules(components):
    """The inits that keep ΔW = 0 at init (LoRA-GA's offset pair, EVA's B = 0) start at the base output with m = ‖W‖;
    LoRA+ gives B λ·lr (m is an "adapter" tensor at lr); CoTo gates whole branches."""
    from helpers import make_batches, wrap_with_data

    base = tiny_llama(dtype=torch.float64)
    batches = make_batches(base)
    ref = output(base, batches[0])
    model = wrap_with_data(base, batches, "dora", r=2, targets=["q_proj", "v_proj"], **components)
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "DoraLayer"
    assert (output(model, batches[0]) - ref).abs().max() <= 1e-10
    opt = peftkit.optimizer(model, lr=1e-3)
    model.train()
    model(**batches[0]).loss.backward()
    before = layer.adapters["default"].lora_magnitude_vector.detach().clone()
    opt.step()
    assert not torch.equal(layer.adapters["default"].lora_magnitude_vector, before)


def test_nf4_base_matches_peft_on_the_unpacked_path(tmp_path, monkeypatch):
    """bitsandbytes NF4 on CPU: W dequantized for the norm. On the unpacked kernel path PEFT reads W right, and the
    two agree; (on the packed path PEFT's dequantize misreads the packed layout: see docs/methods/dora.md)."""
    import bnb_paths
    from helpers import randomize_adapters, tiny_llama_4bit

    bnb_paths.force("unpacked", monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peftkit.wrap(tiny_llama_4bit(), "dora", r=4, targets=["q_proj", "down_proj"])
        randomize_adapters(model, std=0.3)
        peftkit.save(model, tmp_path)
        theirs = PeftModel.from_pretrained(tiny_llama_4bit(), str(tmp_path)).eval()
    batch = make_batch(model)
    ours, ref = output(model, batch), output(theirs, batch)
    assert (ours - output(tiny_llama_4bit(), batch)).abs().max() > 1e-2
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_users_own_fsdp2_and_zero3_from_python_equal_one_process(tmp_path):
    """``peftkit.wrap(model, "dora")`` (or ``peftkit.load`` of a DoRA folder), then the user's own engine from Python
    with the calls Accelerate's plugins make (tests/dora_user_sharded.py): FSDP2 with decoder-layer units, FSDP2
    with every base linear layer its own unit (DoRA's norm then finds a DTensor shard and gathers it; before, the
    forward failed on mixed Tensor and DTensor), DeepSpeed ZeRO-3 through its engine. Two processes at batch 2
    each equal one process at batch 4: losses and every DoRA tensor after 3 AdamW steps (fp32). With dropout in
    training (one process, the same masks), FSDP2 per-linear units and ZeRO-3 equal no engine."""
    from multiproc import REPO, run_distributed, run_distributed_beside

    script = REPO / "tests" / "dora_user_sharded.py"
    modes = ["fsdp2-blocks", "fsdp2-linears", "zero3", "fsdp2-linears+loaded", "zero3+loaded"]
    dropout = ["none+dropout", "fsdp2-linears+dropout", "zero3+dropout"]  # one process: the same masks
    run_distributed_beside(lambda: run_distributed(script, 1, tmp_path / "one", ",".join(["none", *dropout])),
                           script, 2, tmp_path / "two", ",".join(modes))
    ref = torch.load(tmp_path / "one" / "none.pt")
    assert ref["tensors"].keys() == ref["initial"].keys() and len(ref["tensors"]) == 3 * 2 * 3
    for name, value in ref["tensors"].items():  # A, B and m all train
        assert (value - ref["initial"][name]).abs().max() > 1e-3, name
    for mode in modes:
        got = torch.load(tmp_path / "two" / f"{mode}.pt")
        assert got["world"] == 2 and got["sharded"] > 0, mode  # the engine held shards
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
        assert got["tensors"].keys() == ref["tensors"].keys(), mode
        for name, value in ref["tensors"].items():
            torch.testing.assert_close(got["tensors"][name], value, rtol=1e-4, atol=1e-5, msg=f"{mode}: {name}")
    ref = torch.load(tmp_path / "one" / "none+dropout.pt")
    assert any((ref["tensors"][n] - v).abs().max() > 1e-4 for n, v in torch.load(tmp_path / "one" / "none.pt")[
        "tensors"].items())  # the dropout changed the run
    for mode in dropout[1:]:
        got = torch.load(tmp_path / "one" / f"{mode}.pt")
        assert got["world"] == 1 and got["sharded"] > 0, mode
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
        for name, value in ref["tensors"].items():
            torch.testing.assert_close(got["tensors"][name], value, rtol=1e-4, atol=1e-5, msg=f"{mode}: {name}")


def test_a_lora_adapter_on_a_dora_layer_is_refused():
    """A peftkit layer holds one architecture. DoRA's layer subclasses LoRA's, and the check used to be a subclass
    test: a second adapter asked for as plain LoRA silently became a DoRA branch."""
    model = peftkit.wrap(tiny_llama(), "dora", targets=["q_proj"])
    with pytest.raises(ConfigError, match="already holds a 'dora' adapter.*not 'lora'"):
        peftkit.wrap(model, "lora", targets=["q_proj"], adapter_name="second")
    assert list(model.model.layers[0].self_attn.q_proj.adapters) == ["default"]
