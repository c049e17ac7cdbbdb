"""LoRA against its spec (shared/methods/lora.md, "Tests that must pass" 1-10) and against HF PEFT 0.21.2."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import make_batches, output, randomize_adapters, tiny_gpt2, tiny_llama
from safetensors.torch import load_file

import peftkit
from peftkit.errors import ConfigError, StateError
from peftkit.inject import adapter_layers


class Toy(nn.Module):
    """Two linears, an embedding and a conv: every base type LoRA wraps, small enough for fp64 checks."""

    def __init__(self, conv: nn.Module | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.q_proj = nn.Linear(6, 5)
        self.k_proj = nn.Linear(5, 6)
        self.conv = conv if conv is not None else nn.Conv2d(3, 4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.k_proj(self.q_proj(self.emb(ids)))


def _branch_factors(layer, name="default"):
    branch = layer.adapters[name]
    return branch.lora_A.weight, branch.lora_B.weight


def _randomize(model, seed=1, std=0.3):
    randomize_adapters(model, std=std, seed=seed)


# 1. forward formula ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_formula_fp64(rslora):
    model = Toy().double()
    peftkit.wrap(model, "lora", r=4, alpha=8, targets=["q_proj", "k_proj"], rslora=rslora,
                 rank_pattern={"k_proj": 2}, alpha_pattern={"k_proj": 3})
    _randomize(model)
    x = torch.randn(7, 6, dtype=torch.float64)
    for name, r, alpha in (("q_proj", 4, 8.0), ("k_proj", 2, 3.0)):
        layer = getattr(model, name)
        inp = x if name == "q_proj" else torch.randn(7, 5, dtype=torch.float64)
        a, b = _branch_factors(layer)
        assert a.shape[0] == r
        s = alpha / math.sqrt(r) if rslora else alpha / r
        base = layer.base_layer
        want = inp @ base.weight.T + base.bias + s * (inp @ a.T) @ b.T
        torch.testing.assert_close(layer(inp), want, atol=1e-12, rtol=0)


# 2. init --------------------------------------------------------------------------------------------------------
def test_init_b_zero_a_bounded_output_bit_exact():
    model = tiny_llama()
    batch = make_batches(model, n=1)[0]
    before = output(model, batch)
    peftkit.wrap(model, "lora", r=4, alpha=8)
    layers = adapter_layers(model)
    assert layers
    for layer in layers.values():
        a, b = _branch_factors(layer)
        assert torch.count_nonzero(b) == 0
        assert a.abs().max() <= 1 / math.sqrt(layer.in_features)
        assert a.abs().max() > 0.5 / math.sqrt(layer.in_features)  # Kaiming-uniform, not a tiny std
    assert torch.equal(output(model, batch), before)


# 3. merge / unmerge, Conv1D -------------------------------------------------------------------------------------
def test_merge_unmerge_gpt2_conv1d_delta_shape():
    model = tiny_gpt2()
    peftkit.wrap(model, "lora", r=4, alpha=8, targets=["c_attn", "c_fc"])
    _randomize(model, std=0.1)
    batch = make_batches(model, n=1)[0]
    unmerged = output(model, batch)
    layer = model.transformer.h[0].attn.c_attn
    w0 = layer.base_layer.weight.detach().clone()
    a, b = _branch_factors(layer)
    peftkit.merge(model)
    delta = layer.base_layer.weight.detach() - w0
    assert delta.shape == (layer.in_features, layer.out_features) == w0.shape
    torch.testing.assert_close(delta, (2.0 * b @ a).T.detach(), atol=1e-6, rtol=1e-5)
    merged = output(model, batch)
    assert (merged - unmerged).abs().max() <= 1e-6 * unmerged.abs().max()
    peftkit.unmerge(model)
    assert (layer.base_layer.weight - w0).abs().max() <= 1e-6 * w0.abs().max()


# 4. safe merge --------------------------------------------------------------------------------------------------
def test_safe_merge_nan_raises_and_keeps_weights():
    model = tiny_llama()
    peftkit.wrap(model, "lora", r=2, targets=["q_proj"])
    _randomize(model)
    layer = model.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        layer.adapters["default"].lora_B.weight[0, 0] = float("nan")
    weights = {n: m.base_layer.weight.detach().clone() for n, m in adapter_layers(model).items()}
    with pytest.raises(ValueError, match="NaN"):
        peftkit.merge(model, safe=True)
    for n, m in adapter_layers(model).items():
        assert torch.equal(m.base_layer.weight, weights[n])
        assert not m.merged_adapters


# 5. embedding ---------------------------------------------------------------------------------------------------
def test_embedding_lora_init_formula_and_no_dropout():
    model = Toy().double()
    ids = torch.tensor([[0, 3, 5, 10, 3]])
    before = model(ids)
    peftkit.wrap(model, "lora", r=3, alpha=6, targets=["emb"], dropout=0.5)
    branch = model.emb.adapters["default"]
    assert branch.lora_embedding_A.shape == (3, 11) and branch.lora_embedding_B.shape == (6, 3)
    assert torch.count_nonzero(branch.lora_embedding_A) == 0
    assert branch.lora_embedding_B.std() > 0.3  # B ~ N(0, 1)
    assert torch.equal(model(ids), before)
    _randomize(model)
    a, b = branch.lora_embedding_A.detach(), branch.lora_embedding_B.detach()
    table = model.emb.base_layer.weight.detach().clone()
    want = torch.stack([table[t] + 2.0 * (b @ a[:, t]) for t in ids[0].tolist()])
    torch.testing.assert_close(model.emb(ids)[0], want, atol=1e-12, rtol=0)
    model.train()  # no dropout on an embedding's branch (PEFT's Embedding has none): the eval formula, in train mode
    torch.testing.assert_close(model.emb(ids)[0], want, atol=1e-12, rtol=0)
    # Merge folds ΔE = s·(B A)ᵀ into the table.
    peftkit.merge(model)
    torch.testing.assert_close(model.emb.base_layer.weight.detach(), table + 2.0 * (b @ a).T, atol=1e-12, rtol=0)
    peftkit.unmerge(model)
    torch.testing.assert_close(model.emb.base_layer.weight.detach(), table, atol=1e-12, rtol=0)


def test_all_linear_skips_embeddings_and_convs():
    model = Toy()
    peftkit.wrap(model, "lora", r=2)
    assert sorted(adapter_layers(model)) == ["k_proj", "q_proj"]


# 6. conv --------------------------------------------------------------------------------------------------------
def _conv_reference(base, x, a, b, s):
    """Hand-built conv with the merged kernel K + s·B·A, padding applied explicitly in the base's mode."""
    dims = base.weight.ndim - 2
    kernel = base.weight + s * (b.flatten(1) @ a.flatten(1)).reshape(base.weight.shape)
    pads = [p for p in reversed(base.padding) for _ in range(2)]
    padded = F.pad(x, pads, mode=base.padding_mode) if base.padding_mode != "zeros" else F.pad(x, pads)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    return conv(padded, kernel, base.bias, base.stride, 0, base.dilation)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_lora_fp64_formula_and_merge(dims):
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    base = conv_cls(3, 4, 3, stride=2, dilation=2, padding=2, padding_mode="reflect")
    model = Toy(base).double()
    peftkit.wrap(model, "lora", r=2, alpha=5, targets=["conv"])
    layer = model.conv
    a, b = layer.adapters["default"].lora_A, layer.adapters["default"].lora_B
    assert (a.kernel_size, a.stride, a.padding, a.dilation, a.padding_mode) == (
        base.kernel_size, base.stride, base.padding, base.dilation, "reflect")
    assert b.weight.shape == (4, 2) + (1,) * dims
    assert torch.count_nonzero(b.weight) == 0
    assert a.weight.abs().max() <= 1 / math.sqrt(3 * 3 ** dims)
    x = torch.randn((2, 3) + (9,) * dims, dtype=torch.float64)
    assert torch.equal(layer(x), base(x))
    _randomize(model)
    unmerged = layer(x)
    torch.testing.assert_close(unmerged, _conv_reference(base, x, a.weight, b.weight, 2.5), atol=1e-12, rtol=0)
    branch = b(a(x))
    assert branch.shape == base(x).shape
    peftkit.merge(model)
    merged = layer(x)
    assert (merged - unmerged).abs().max() <= 1e-12 * unmerged.abs().max()


def test_conv2d_fp32_merge_stride_dilation_reflect():
    """Spec test 6 as written: Conv2d 3x3, stride 2, dilation 2, reflect padding, fp32."""
    base = nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=1, padding_mode="reflect")
    model = Toy(base)
    peftkit.wrap(model, "lora", r=4, alpha=8, targets=["conv"])
    _randomize(model, std=0.2)
    x = torch.randn(2, 4, 16, 16)
    unmerged = model.conv(x)
    assert model.conv.adapters["default"].lora_B(model.conv.adapters["default"].lora_A(x)).shape == unmerged.shape
    peftkit.merge(model)
    assert (model.conv(x) - unmerged).abs().max() <= 1e-5 * unmerged.abs().max()


def test_conv_groups():
    with pytest.raises(ConfigError, match="groups"):
        peftkit.wrap(Toy(nn.Conv2d(4, 4, 3, groups=2)), "lora", r=3, targets=["conv"])
    model = Toy(nn.Conv2d(4, 4, 3, groups=2))
    peftkit.wrap(model, "lora", r=2, targets=["conv"])
    assert model.conv.adapters["default"].lora_B.weight.shape == (4, 1, 1, 1)
    weight = model.conv.base_layer.weight.detach().clone()
    with pytest.raises(StateError, match="groups"):
        peftkit.merge(model)
    assert torch.equal(model.conv.base_layer.weight, weight)


# 7. save format, PEFT interop -----------------------------------------------------------------------------------
def test_save_keys_shapes_roundtrip_and_peft_load(tmp_path):
    from peft import PeftModel

    model = tiny_llama()
    peftkit.wrap(model, "lora", r=4, alpha=8, targets=["q_proj", "v_proj", "embed_tokens"],
                 rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16})
    _randomize(model)
    batch = make_batches(model, n=1)[0]
    want = output(model, batch)
    peftkit.save(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    expected = {"base_model.model.model.embed_tokens.lora_embedding_A": (4, 97),
                "base_model.model.model.embed_tokens.lora_embedding_B": (32, 4)}
    for i in range(2):
        p = f"base_model.model.model.layers.{i}.self_attn"
        expected |= {f"{p}.q_proj.lora_A.weight": (4, 32), f"{p}.q_proj.lora_B.weight": (32, 4),
                     f"{p}.v_proj.lora_A.weight": (2, 32), f"{p}.v_proj.lora_B.weight": (16, 2)}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["rank_pattern"] == {"v_proj": 2}
    assert cfg["alpha_pattern"] == {"q_proj": 16}

    fresh = tiny_llama()
    peftkit.load(fresh, tmp_path)
    assert torch.equal(output(fresh, batch), want)
    peftkit.save(fresh, tmp_path / "again")  # re-saving gives the same tensors and patterns
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    cfg_again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert (cfg_again["rank_pattern"], cfg_again["alpha_pattern"]) == ({"v_proj": 2}, {"q_proj": 16})
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    got = output(peft_model, batch)
    assert (got - want).abs().max() <= 1e-6


def test_conv_and_embedding_checkpoint_both_ways_with_peft(tmp_path):
    """PEFT 0.21.2 drops dilation and padding_mode (huggingface/peft#3697), so this conv has neither."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    proto = Toy(nn.Conv2d(3, 4, 3, stride=2, padding=1))
    state = {k: v.clone() for k, v in proto.state_dict().items()}

    def fresh():
        m = Toy(nn.Conv2d(3, 4, 3, stride=2, padding=1))
        m.load_state_dict(state)
        return m

    x = torch.randn(2, 3, 8, 8)
    ids = torch.tensor([[1, 4, 0, 9]])
    ours = fresh()
    peftkit.wrap(ours, "lora", r=2, alpha=4, targets=["conv", "emb", "q_proj"])
    _randomize(ours)
    peftkit.save(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(fresh(), tmp_path / "ours")
    assert torch.equal(theirs.base_model.model.conv(x), ours.conv(x))
    assert torch.equal(theirs(ids), ours(ids))

    peft_model = get_peft_model(fresh(), LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "emb", "k_proj"]))
    randomize_peft = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=randomize_peft) * 0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = fresh()
    peftkit.load(loaded, tmp_path / "peft")
    assert torch.equal(loaded.conv(x), peft_model.base_model.model.conv(x))
    assert torch.equal(loaded(ids), peft_model(ids))


# 8. multiple adapters -------------------------------------------------------------------------------------------
def test_multiple_adapters_toggle_and_sum():
    model = Toy().double()
    peftkit.wrap(model, "lora", r=2, alpha=4, targets=["q_proj"])
    peftkit.wrap(model, "lora", adapter_name="b", r=3, alpha=3, targets=["q_proj"])
    layer = model.q_proj
    assert layer.active_adapters == ["default"]
    assert all(not p.requires_grad for p in layer.adapters["b"].parameters())
    assert all(p.requires_grad for p in layer.adapters["default"].parameters())
    peftkit.set_adapter(model, "b")
    assert all(p.requires_grad for p in layer.adapters["b"].parameters())
    assert all(not p.requires_grad for p in layer.adapters["default"].parameters())
    _randomize(model)
    peftkit.set_adapter(model, ["default", "b"])
    x = torch.randn(4, 6, dtype=torch.float64)
    a1, b1 = _branch_factors(layer, "default")
    a2, b2 = _branch_factors(layer, "b")
    base = layer.base_layer
    want = x @ base.weight.T + base.bias + 2.0 * x @ a1.T @ b1.T + 1.0 * x @ a2.T @ b2.T
    torch.testing.assert_close(layer(x), want, atol=1e-12, rtol=0)


# 9. target errors -----------------------------------------------------------------------------------------------
def test_target_errors_name_the_culprit():
    model = tiny_llama()
    with pytest.raises(ConfigError, match="v_prj"):
        peftkit.wrap(model, "lora", targets=["q_proj", "v_prj"])
    with pytest.raises(ConfigError, match="rank_pattern"):
        peftkit.wrap(model, "lora", targets=["q_proj"], rank_pattern={"o_proj": 2})
    assert not adapter_layers(model)


# 10. first-order update -----------------------------------------------------------------------------------------
def _first_order_error(eta: float) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6)).double()
    peftkit.wrap(model, "lora", r=3, alpha=6, targets=["0"])
    _randomize(model, std=0.5)
    layer = model[0]
    a, b = _branch_factors(layer)
    s = 2.0
    x = torch.randn(10, 8, dtype=torch.float64)
    target = torch.randn(10, 6, dtype=torch.float64)
    w_before = layer.base_weight() + layer.delta_weight("default").detach()
    # L = ½‖x W_effᵀ + b − target‖²  =>  G = ∂L/∂W_eff = (x W_effᵀ + b − target)ᵀ x, by hand.
    residual = x @ w_before.T + layer.base_layer.bias.detach() - target
    grad_w = residual.T @ x
    loss = 0.5 * (model(x) - target).pow(2).sum()
    loss.backward()
    with torch.no_grad():
        for p in (a, b):
            p -= eta * p.grad
    w_after = layer.base_weight() + layer.delta_weight("default").detach()
    a0, b0 = a + eta * a.grad, b + eta * b.grad
    predicted = -eta * s * s * (b0 @ b0.T @ grad_w + grad_w @ a0.T @ a0)
    return ((w_after - w_before - predicted).norm() / predicted.norm()).item()


def test_first_order_update_sgd():
    errors = [_first_order_error(eta) for eta in (1e-3, 5e-4, 2.5e-4)]
    assert errors[0] < 0.1
    for big, small in zip(errors, errors[1:]):
        assert 0.4 < small / big < 0.6


# Parity with PEFT: same config, same initial values, 20 AdamW steps -----------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_parity_with_peft(family, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

    build = tiny_gpt2 if family == "gpt2" else tiny_llama
    targets = ["c_attn", "c_proj", "c_fc"] if family == "gpt2" else ["q_proj", "v_proj", "o_proj", "down_proj"]
    peft_model = get_peft_model(build(), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                    use_rslora=True, rank_pattern={targets[1]: 2}))
    ours = build()
    peftkit.wrap(ours, "lora", r=4, alpha=8, targets=targets, rslora=True, rank_pattern={targets[1]: 2})
    # Same initial adapter values in both: ours, loaded into PEFT by key.
    _randomize(ours, std=0.02)
    peftkit.save(ours, tmp_path / "init")
    set_peft_model_state_dict(peft_model, load_file(tmp_path / "init" / "adapter_model.safetensors"))
    batches = make_batches(ours, n=4, batch_size=2, seq_len=8)
    initial = output(ours, batches[0])
    opt_ours = peftkit.optimizer(ours, lr=1e-3, weight_decay=0.0)
    opt_peft = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    for model, opt in ((ours, opt_ours), (peft_model, opt_peft)):
        torch.manual_seed(7)  # GPT-2's own dropouts draw the same masks in both runs
        model.train()
        for step in range(20):
            model(**batches[step % 4]).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
    assert (output(ours, batches[0]) - initial).abs().max() > 1e-3  # training moved the function
    for batch in batches[:2]:
        assert (output(ours, batch) - output(peft_model, batch)).abs().max() <= 1e-6
    peftkit.save(ours, tmp_path / "ours")
    peft_model.save_pretrained(tmp_path / "peft")
    mine = load_file(tmp_path / "ours/adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft/adapter_model.safetensors")
    assert set(mine) == set(theirs)
    assert max((mine[k] - theirs[k]).abs().max().item() for k in mine) <= 1e-6
    cfg_ours = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    cfg_peft = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "use_rslora", "rank_pattern", "lora_dropout"):
        assert cfg_ours[key] == cfg_peft[key], key
    assert sorted(cfg_ours["target_modules"]) == sorted(cfg_peft["target_modules"])
    # Each library loads the other's checkpoint with identical outputs.
    batch = batches[0]
    ours_from_peft = peftkit.load(build(), tmp_path / "peft")
    assert (output(ours_from_peft, batch) - output(peft_model, batch)).abs().max() <= 1e-6
    peft_from_ours = PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    assert (output(peft_from_ours, batch) - output(ours, batch)).abs().max() <= 1e-6
