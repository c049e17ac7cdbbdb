"""Mixture-of-experts models: fused expert parameters adapted per expert (PEFT's target_parameters), on tiny fp64
configs of every MoE family transformers ships (tests/moe_models.py)."""

from __future__ import annotations

import copy
import json
import logging
import warnings

import pytest
import torch
from moe_models import FAMILIES, HIDDEN, WRAP_OPTIONS, moe_batch, tiny_moe

import peftkit
from peftkit.expert_layer import ExpertParameterLayer
from peftkit.inject import adapter_layers
from peftkit.optim import factor_pairs

# Families whose experts store (E, in, out) and run x @ W[e] (read in transformers' forward: gpt-oss declares
# is_transposed; Llama 4 runs torch.bmm(x, W) without declaring it). All others store (E, out, in), F.linear.
STORED_IN_OUT = {"gpt_oss", "llama4_text"}


def _loss(model, batch):
    return model(**batch, use_cache=False).loss


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], use_cache=False).logits


def _expert_layers(model):
    return {n: l for n, l in adapter_layers(model).items() if isinstance(l, ExpertParameterLayer) and l.stacked}


def _stacks(model):
    """Full names of the model's fused expert stacks (3-D parameters of non-torch modules)."""
    return sorted(n for n, p in model.named_parameters() if p.ndim == 3 and "conv" not in n)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_all_linear_adapts_every_expert_and_each_expert_gets_its_own_gradient(family):
    base = tiny_moe(family)
    batch = moe_batch(batch=8, length=16)  # 128 tokens, top-2 of 4 experts: every expert is routed some
    model = peftkit.wrap(copy.deepcopy(base), "lora", r=2, **WRAP_OPTIONS.get(family, {}))
    layers = _expert_layers(model)
    assert sorted(l.target_name for l in layers.values()) == _stacks(base)
    summary = peftkit.summary(model)
    assert summary.adapted["expert parameters"] == len(_stacks(base))
    assert summary.expert_matrices == sum(l.num_experts for l in layers.values())
    # The full-weight gradient of every stack on the base model, in its stored layout.
    reference = copy.deepcopy(base).train()
    stacks = dict(reference.named_parameters())
    for name in _stacks(base):
        stacks[name].requires_grad_(True)
    _loss(reference, batch).backward()
    model.train()
    _loss(model, batch).backward()
    for layer in layers.values():
        grad = stacks[layer.target_name].grad
        # B = 0 at init, so the model is the base model and dL/dB_e = s·G_e·A_eᵀ, G_e = dL/dW_e as (out, in).
        g = grad.transpose(1, 2) if family in STORED_IN_OUT else grad
        assert (layer.out_features, layer.in_features) == tuple(g.shape[1:])
        branch = layer.adapters["default"]
        s = layer.scaling["default"]
        for e in range(layer.num_experts):
            assert g[e].abs().max() > 0, f"{layer.target_name}: expert {e} got no token"
            expected = s * g[e] @ branch.lora_A[e].detach().t()
            torch.testing.assert_close(branch.lora_B[e].grad, expected, rtol=1e-10, atol=1e-14)


def test_orientation_follows_the_forward_hidden_side():
    """The first stack of a block reads the hidden state, the last writes it (in/out against the config)."""
    for family in ("qwen3_moe", "gpt_oss", "llama4_text", "mixtral", "jetmoe"):
        model = peftkit.wrap(tiny_moe(family), "lora", r=2)
        for layer in _expert_layers(model).values():
            name = layer.target_name.rsplit(".", 2)
            writes_hidden = name[-1].startswith("down") or name[-2].startswith("output")
            assert (layer.out_features if writes_hidden else layer.in_features) == HIDDEN, (family, layer.target_name)


def _trained(family, **options):
    """A wrapped model whose every adapter (B included) is non-zero."""
    model = peftkit.wrap(tiny_moe(family), "lora", r=2, init_lora_weights=False,
                         **{**WRAP_OPTIONS.get(family, {}), **options})
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merge_unmerge_save_load_export_and_peft_give_the_same_logits(family, tmp_path):
    from peft import PeftModel

    base = tiny_moe(family)
    batch = moe_batch()
    model = _trained(family)
    weights = {n: p.detach().clone() for n, p in base.named_parameters()}
    out = _logits(model, batch)
    assert (out - _logits(base, batch)).abs().max() > 1e-3  # the adapters change the function
    tol = dict(rtol=1e-10, atol=1e-10)
    peftkit.merge(model)
    torch.testing.assert_close(_logits(model, batch), out, **tol)
    peftkit.unmerge(model)
    torch.testing.assert_close(_logits(model, batch), out, **tol)
    for name, param in peftkit.unwrap(copy.deepcopy(model), merge=False).named_parameters():
        torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-14)
    peftkit.save(model, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == _stacks(base)
    loaded = peftkit.load(copy.deepcopy(base), tmp_path / "saved")
    torch.testing.assert_close(_logits(loaded, batch), out, **tol)
    from peftkit.checkpoint import peft_rewritten_targets

    rewritten = peft_rewritten_targets(model, list(adapter_layers(model)))
    if rewritten:
        # PEFT rewrites dense gate_proj/up_proj/down_proj on these model types (peft_rewritten_targets): said at
        # export; PEFT is compared on an adapter without them.
        with pytest.warns(UserWarning, match="not in PEFT's PeftModel.from_pretrained"):
            peftkit.export(model, tmp_path / "with-dense")
        model = peftkit.wrap(copy.deepcopy(base), "lora", r=2, init_lora_weights=False,
                             exclude=sorted({n.rsplit(".", 1)[-1] for n in rewritten}))
        out = _logits(model, batch)
    peftkit.export(model, tmp_path / "exported")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "exported")
    torch.testing.assert_close(_logits(peft_model, batch), out, **tol)
    # PEFT builds its own ParamWrappers at the same module paths: the keys are PEFT's.
    peft_keys = {k.replace(".default", "") for k in peft_model.state_dict() if "lora_" in k}
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "exported" / "adapter_model.safetensors")) == peft_keys


def test_peft_trained_expert_adapter_loads_into_peftkit(tmp_path):
    """The other direction: PEFT's own target_parameters adapter (random B), read by peftkit."""
    from peft import LoraConfig, get_peft_model

    base = tiny_moe("qwen3_moe")
    batch = moe_batch()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    peft_model.save_pretrained(tmp_path)
    loaded = peftkit.load(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_logits(loaded, batch), _logits(peft_model, batch), rtol=1e-10, atol=1e-10)
    assert peftkit.summary(loaded).adapted == {"Linear": 2, "expert parameters": 4}


# ----------------------------------------------------------------------------------------------- targets
def test_targets_by_leaf_full_name_regex_and_target_parameters():
    base = tiny_moe("qwen3_moe")

    def adapted(**options):
        model = peftkit.wrap(copy.deepcopy(base), "lora", r=2, **options)
        names = set()
        for name, layer in adapter_layers(model).items():
            names.add(layer.target_name if isinstance(layer, ExpertParameterLayer) else name)
        return names

    experts = set(_stacks(base))
    assert adapted(targets=["gate_up_proj", "down_proj"]) == experts
    assert adapted(targets=["model.layers.0.mlp.experts.down_proj"]) == {"model.layers.0.mlp.experts.down_proj"}
    assert adapted(targets=r".*\.experts\.gate_up_proj") == {n for n in experts if "gate_up" in n}
    assert adapted(targets=["q_proj"], target_parameters=["mlp.experts.down_proj"]) == {
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
        "model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj"}
    all_linear = adapted()
    assert experts <= all_linear and not any(".gate" in n and "gate_up" not in n for n in all_linear)
    assert not experts & adapted(exclude=["gate_up_proj", "down_proj"])
    # A router named in targets is adapted through its weight, frozen otherwise.
    assert adapted(targets=["gate"]) == {"model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"}


def test_router_adapter_changes_routing_and_round_trips_through_peft(tmp_path):
    from peft import PeftModel

    for family, router in (("qwen3_moe", "gate"), ("llama4_text", "router"), ("mixtral", "gate")):
        base = tiny_moe(family)
        batch = moe_batch()
        model = peftkit.wrap(copy.deepcopy(base), "lora", r=2, targets=[router], init_lora_weights=False)
        assert peftkit.summary(model).adapted == {"router weights": 2}
        out = _logits(model, batch)
        assert (out - _logits(base, batch)).abs().max() > 1e-6
        peftkit.export(model, tmp_path / family)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / family)
        torch.testing.assert_close(_logits(peft_model, batch), out, rtol=1e-10, atol=1e-10)


def test_target_errors_name_the_field():
    base = tiny_moe("qwen3_moe")
    with pytest.raises(peftkit.ConfigError, match=r"target_parameters: \['mlp.experts.up_proj'\] match no parameter"):
        peftkit.wrap(copy.deepcopy(base), "lora", target_parameters=["mlp.experts.up_proj"])
    with pytest.raises(peftkit.ConfigError, match=r"dropout: 0.1 cannot apply to the fused expert parameter"):
        peftkit.wrap(copy.deepcopy(base), "lora", dropout=0.1)
    model = peftkit.wrap(copy.deepcopy(base), "lora", r=2, targets=["gate_up_proj"])
    with pytest.raises(peftkit.ConfigError, match="must target the same parameters"):
        peftkit.wrap(model, "lora", r=2, targets=["down_proj", "gate_up_proj"], adapter_name="second")
    peftkit.wrap(model, "lora", r=4, targets=["gate_up_proj"], adapter_name="second")  # the same set: fine
    assert len(_expert_layers(model)) == 2


# ----------------------------------------------------------------------------------------------- summary
def test_summary_is_logged_after_wrap_and_names_what_was_skipped(caplog):
    base = tiny_moe("qwen3_moe")
    with caplog.at_level(logging.INFO, logger="peftkit"):
        model = peftkit.wrap(copy.deepcopy(base), "lora", r=2, exclude=["down_proj"])
    lines = [r.getMessage() for r in caplog.records if r.name == "peftkit"]
    assert len(lines) == 1 and lines[0] == str(peftkit.summary(model))
    summary = peftkit.summary(model)
    assert summary.adapted == {"Linear": 8, "expert parameters": 2}
    assert summary.expert_matrices == 8
    assert summary.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # r = 2: per layer q, o (16x16) and k, v (8x16, one kv head), and a gate_up_proj stack of 4 experts (16x16).
    assert summary.trainable == 2 * (2 * 2 * (16 + 16) + 2 * 2 * (16 + 8)) + 2 * 4 * 2 * (16 + 16)
    reasons = dict(summary.skipped)
    assert reasons["model.layers.0.mlp.experts.down_proj"] == "excluded by exclude"
    assert reasons["model.layers.1.mlp.gate"].startswith("router: stays frozen")
    assert reasons["lm_head"].startswith("output embeddings")
    assert "8 Linear, 2 expert parameters (8 expert matrices)" in lines[0]
    assert json.loads(json.dumps(summary.to_dict()))["adapted"] == summary.adapted


# ----------------------------------------------------------------------------------------------- methods
WORKS = ["lora", "lora-plus", "lora-pro", "loft", "coto", "lora-ga", "lora-one"]
REFUSES = {"dora": "architecture 'dora'", "eva": "init 'eva'", "hra": "architecture 'hra'",
           "hydra": "architecture 'hydra'", "elalora": "architecture 'elalora'", "pissa": "init 'pissa'",
           "milora": "init 'milora'", "olora": "init 'olora'"}


def test_every_registered_method_is_classified():
    assert sorted(WORKS + list(REFUSES)) == peftkit.methods()


@pytest.mark.parametrize("method", sorted(REFUSES))
def test_methods_that_cannot_adapt_experts_refuse_at_wrap(method):
    base = tiny_moe("qwen3_moe")
    model = copy.deepcopy(base)
    with pytest.raises(peftkit.ConfigError) as err:
        peftkit.wrap(model, method, r=2, data=[moe_batch()] if method == "eva" else None)
    message = str(err.value)
    assert f"method '{method}'" in message and REFUSES[method] in message
    assert "model.layers.0.mlp.experts.gate_up_proj" in message
    assert not adapter_layers(model) and not hasattr(model, "peftkit")
    # Naming modules only, the method works on the same model.
    peftkit.wrap(model, method, r=2, targets=["q_proj", "v_proj"], data=[moe_batch()] if method == "eva" else None)


@pytest.mark.parametrize("method", WORKS)
def test_methods_that_adapt_experts_train_every_expert(method):
    model = tiny_moe("qwen3_moe")
    batch = moe_batch()
    data = [moe_batch(seed=s) for s in (2, 3)] if method in ("lora-ga", "lora-one") else None
    peftkit.wrap(model, method, r=2, data=data)
    layers = _expert_layers(model)
    pairs = factor_pairs(model)
    # One (A, B) pair per expert matrix, each with its own key (what the pair optimizers and LoRA+ see).
    assert len(pairs) == 8 + sum(l.num_experts for l in layers.values())
    assert len({p.key for p in pairs}) == len(pairs)
    before = {id(p): p.detach().clone() for l in layers.values() for p in l.parameters() if p.requires_grad}
    optimizer = peftkit.optimizer(model)
    schedule = peftkit.callbacks(model, optimizer)
    model.train()
    for step in range(3):
        _loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.on_step(step + 1, 3)
    for layer in layers.values():
        branch = layer.adapters["default"]
        for e in range(layer.num_experts):
            assert not torch.equal(branch.lora_B[e], before[id(branch.lora_B[e])]), (method, layer.target_name, e)


def _expert_gradient(base, batch_list, name):
    """The gradient of the token-mean loss of all the batches as ONE batch (what training steps on)."""
    reference = copy.deepcopy(base).train()
    param = dict(reference.named_parameters())[name]
    param.requires_grad_(True)
    whole = {key: torch.cat([batch[key] for batch in batch_list]) for key in batch_list[0]}
    _loss(reference, whole).backward()
    return param.grad


def test_lora_ga_and_lora_one_use_each_experts_own_gradient():
    base = tiny_moe("qwen3_moe")
    # Responses of different lengths: weighting the batches by examples (not target tokens) would fail this.
    data = [moe_batch(seed=2, answers=True), moe_batch(seed=3, batch=2, answers=True)]
    assert (data[0]["labels"] != -100).sum() * 2 != (data[1]["labels"] != -100).sum() * 4
    name = "model.layers.1.mlp.experts.down_proj"
    g = _expert_gradient(base, data, name)
    one = peftkit.wrap(copy.deepcopy(base), "lora-one", r=2, data=data)
    layer = next(l for l in _expert_layers(one).values() if l.target_name == name)
    s, gamma = layer.scaling["default"], 128.0
    for e in range(layer.num_experts):
        u, sv, vh = torch.linalg.svd(-g[e])
        expected = (s / (gamma * sv[0])) * (u[:, :2] * sv[:2]) @ vh[:2]  # s·B₀A₀ = −(s/(γσ₁))·[G]_r
        branch = layer.adapters["default"]
        # rtol 1e-5: transformers computes a causal LM's loss on fp32 logits even for an fp64 model, so the one-batch
        # reference and the per-batch statistics round differently; example weighting is off by ~1e-1 here.
        torch.testing.assert_close(s * branch.lora_B[e] @ branch.lora_A[e], expected, rtol=1e-5, atol=1e-10)
    ga = peftkit.wrap(copy.deepcopy(base), "lora-ga", r=2, data=data)
    layer = next(l for l in _expert_layers(ga).values() if l.target_name == name)
    with torch.no_grad():
        torch.testing.assert_close(layer.delta_weight("default"), torch.zeros_like(g), rtol=0, atol=1e-14)
    for e in range(layer.num_experts):
        _, _, vh = torch.linalg.svd(g[e])
        a = layer.adapters["default"].lora_A[e].detach()
        # ArB2r: A₀'s rows span the top-r right singular vectors of G_e.
        projection = a @ vh[:2].t() @ vh[:2]
        torch.testing.assert_close(projection, a, rtol=1e-5, atol=1e-7)  # fp32 loss, as above


def test_coto_gates_a_block_experts_off():
    model = peftkit.wrap(tiny_moe("qwen3_moe"), "coto", r=2)
    schedule = peftkit.callbacks(model)
    schedule.set_gates([False, True])
    model.train()
    _loss(model, moe_batch()).backward()
    for layer in _expert_layers(model).values():
        gated = ".layers.0." in layer.target_name
        grads = [b.grad for b in layer.adapters["default"].lora_B]
        assert all((g is None) == gated for g in grads), layer.target_name


def test_expert_adapter_runs_under_accelerates_module_hooks():
    """device_map offload puts Accelerate's hook on the experts module (it replaces the instance's forward): the
    hook still runs on every call, stays installed, and the adapted output is unchanged."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    calls = []

    class Record(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(module)
            return args, kwargs

    model = _trained("qwen3_moe")
    batch = moe_batch()
    out = _logits(model, batch)
    owner = model.model.layers[0].mlp.experts.base_layer.base_layer
    add_hook_to_module(owner, Record())
    for expected in (1, 2):
        torch.testing.assert_close(_logits(model, batch), out, rtol=0, atol=0)
        assert len(calls) == expected and "_old_forward" in owner.__dict__
    remove_hook_from_module(owner)
    torch.testing.assert_close(_logits(model, batch), out, rtol=0, atol=0)


def test_summary_on_dense_models_counts_by_kind():
    """The summary is every wrap's, not MoE's only: Linear and Conv1D bases counted, a named head skipped."""
    from helpers import tiny_gpt2, tiny_llama

    llama = peftkit.wrap(tiny_llama(), "lora", r=2)
    summary = peftkit.summary(llama)
    assert summary.adapted == {"Linear": 14} and summary.expert_matrices == 0
    assert [name for name, _ in summary.skipped] == ["lm_head"]
    assert summary.trainable == sum(p.numel() for p in llama.parameters() if p.requires_grad)
    gpt2 = peftkit.wrap(tiny_gpt2(), "lora", r=2, exclude=["c_proj"])
    summary = peftkit.summary(gpt2)
    assert summary.adapted == {"Conv1D": 4}
    reasons = dict(summary.skipped)
    assert {n for n, r in reasons.items() if r == "excluded by exclude"} == {
        f"transformer.h.{i}.{m}.c_proj" for i in (0, 1) for m in ("attn", "mlp")}
    assert reasons["lm_head"].startswith("output embeddings")


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_every_experts_implementation_sees_the_update(implementation):
    """transformers' other experts kernels read the stacks themselves (fp32: they take no fp64): the same adapted
    logits as the eager loop, and every adapter tensor gets a gradient."""
    from moe_models import moe_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(moe_config("qwen3_moe")).float().eval()
    other = copy.deepcopy(eager)
    other.config._experts_implementation = implementation
    for model in (eager, other):
        peftkit.wrap(model, "lora", r=2, init_lora_weights=False)
    other.load_state_dict(eager.state_dict())
    batch = moe_batch()
    adapted = _logits(eager, batch)
    assert (adapted - _logits(peftkit.unwrap(copy.deepcopy(eager), merge=False), batch)).abs().max() > 1e-3
    torch.testing.assert_close(_logits(other, batch), adapted, rtol=1e-5, atol=1e-5)
    other.train()
    _loss(other, batch).backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in other.parameters() if p.requires_grad)


def test_weighted_combination_of_expert_adapters_is_refused():
    model = peftkit.wrap(tiny_moe("qwen3_moe"), "lora", r=2)
    peftkit.wrap(model, "lora", r=2, adapter_name="other")
    with pytest.raises(peftkit.ConfigError, match=r"add_weighted_adapter: model.layers.0.mlp.experts.\w+ is a fused"):
        peftkit.add_weighted_adapter(model, ["default", "other"], [1.0, 1.0], "mix")
    assert "mix" not in model.peftkit.configs


def test_a_shared_experts_scalar_gate_is_a_router_under_all_linear():
    """Qwen2-MoE's mlp.shared_expert_gate (hidden -> 1) gates the shared expert: all-linear leaves it frozen like
    the router (before, r > 1 stopped the wrap with a rank error on it); naming it still adapts it."""
    model = peftkit.wrap(tiny_moe("qwen2_moe"), "lora", r=4, targets="all-linear")
    adapted = set(adapter_layers(model))
    assert not any(name.endswith("shared_expert_gate") for name in adapted)
    assert any(name.endswith("shared_expert.down_proj") for name in adapted)
    assert "shared_expert_gate" in str(peftkit.summary(model)) or "router" in str(peftkit.summary(model))
    named = peftkit.wrap(tiny_moe("qwen2_moe"), "lora", r=1, targets=["shared_expert_gate"])
    names = list(adapter_layers(named))
    assert names and all(n.removesuffix(".weight").endswith("shared_expert_gate") for n in names), names
