"""The pair-optimizer base (peftkit.optim.PairOptimizer) through its three optimizers: exact resume, AdamW for
non-pair tensors, LoRA+ composition, gated-off pairs, errors, transformers' Trainer."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from helpers import make_batch, randomize_adapters, tiny_llama
from optim_fixtures import quadratic_loss, quadratic_problem, single_linear

import peftkit
from peftkit.errors import ConfigError, StateError
from peftkit.optim import PairOptimizer, factor_pairs

OPTIMIZERS = [
    pytest.param("lora-pro", {}, id="lora-pro-full"),
    pytest.param("lora-pro", {"mode": "efficient"}, id="lora-pro-efficient"),
    pytest.param("loft", {"max_grad_norm": 0.5}, id="loft"),
    pytest.param("lora-one-preconditioner", {}, id="preconditioner"),
]


def llama(extra_trainable: bool = True):
    """Tiny Llama with LoRA r=4 (non-trivial B) and, optionally, a trainable norm (an AdamW tensor)."""
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftkit.wrap(model, "lora", r=4, alpha=8)
    randomize_adapters(model)
    if extra_trainable:
        model.model.norm.weight.requires_grad_(True)
    return model.train()


def train(model, opt, steps: int, seed: int = 0) -> None:
    for step in range(steps):
        model(**make_batch(model, seed=seed + step)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name,options", OPTIMIZERS + [
    pytest.param("lora-pro", {"moment_dtype": "bfloat16"}, id="lora-pro-full-bf16-moments")])
def test_resume_mid_run_is_bit_identical(name, options):
    straight = llama()
    train(straight, peftkit.optimizer(straight, 1e-2, name=name, **options), 4)

    first = llama()
    opt = peftkit.optimizer(first, 1e-2, name=name, **options)
    train(first, opt, 2)
    buffer = io.BytesIO()
    torch.save({"model": trainable_state(first), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = llama()
    with torch.no_grad():
        for n, p in resumed.named_parameters():
            if p.requires_grad:
                p.copy_(saved["model"][n])
    opt = peftkit.optimizer(resumed, 1e-2, name=name, **options)
    opt.load_state_dict(saved["optimizer"])
    assert all(v.dtype == torch.bfloat16 for k, v in opt.state[factor_pairs(resumed)[0].a].items()
               if k.startswith("exp_avg")) == (options.get("moment_dtype") == "bfloat16")
    train(resumed, opt, 2, seed=2)
    want = trainable_state(straight)
    for key, value in trainable_state(resumed).items():
        assert torch.equal(value, want[key]), key


def test_state_dict_refuses_another_optimizer_or_model():
    model = llama()
    opt = peftkit.optimizer(model, 1e-2, name="loft")
    train(model, opt, 1)
    with pytest.raises(StateError, match="'lora-pro' state dict"):
        peftkit.optimizer(model, 1e-2, name="lora-pro").load_state_dict(opt.state_dict())
    other = tiny_llama()
    peftkit.wrap(other, "lora", r=4, targets=["q_proj", "v_proj"])
    with pytest.raises(StateError, match="pairs differ"):
        peftkit.optimizer(other, 1e-2, name="loft").load_state_dict(opt.state_dict())


@pytest.mark.parametrize("name,options", OPTIMIZERS)
def test_non_pair_tensors_get_torch_adamw(name, options):
    model = llama()
    norm = model.model.norm.weight
    copy = norm.detach().clone().requires_grad_(True)
    opt = peftkit.optimizer(model, 1e-2, name=name, **{k: v for k, v in options.items() if k != "max_grad_norm"})
    # the optimizer's eps for every tensor (LoFT's default is 1e-4)
    reference = torch.optim.AdamW([copy], lr=1e-2, weight_decay=0.0, eps=opt.defaults["eps"], foreach=False)
    for step in range(3):
        model(**make_batch(model, seed=step)).loss.backward()
        copy.grad = norm.grad.clone()
        opt.step()
        reference.step()
        opt.zero_grad()
        torch.testing.assert_close(norm.detach(), copy.detach(), rtol=0, atol=1e-7)
    assert {g["role"] for g in opt.param_groups} == {"A", "B", "other"}


def test_loraplus_ratio_composes():
    steps = {}
    for ratio in (1.0, 4.0):
        model, layer = single_linear(7, 5, 2)
        pair = factor_pairs(model)[0]
        a, b = pair.a.detach().clone(), pair.b.detach().clone()
        x, y = quadratic_problem(7, 5)
        quadratic_loss(model, x, y).backward()
        opt = peftkit.optimizer(model, 1e-3, name="lora-one-preconditioner", update="sgd", loraplus_lr_ratio=ratio)
        assert {g["role"]: g["lr"] for g in opt.param_groups} == {"A": 1e-3, "B": ratio * 1e-3}
        opt.step()
        steps[ratio] = (pair.a.detach() - a, pair.b.detach() - b)
    assert torch.equal(steps[1.0][0], steps[4.0][0])
    torch.testing.assert_close(steps[4.0][1], 4 * steps[1.0][1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name,options", OPTIMIZERS)
def test_gated_off_pair_is_skipped_with_its_state(name, options):
    model = llama(extra_trainable=False)
    layers = {pair.module_name: pair for pair in factor_pairs(model)}
    gated = layers["model.layers.0.self_attn.q_proj"]
    gated.layer.gated_off.add("default")
    before = (gated.a.detach().clone(), gated.b.detach().clone())
    opt = peftkit.optimizer(model, 1e-2, name=name, **options)
    train(model, opt, 2)
    assert torch.equal(gated.a.detach(), before[0]) and torch.equal(gated.b.detach(), before[1])
    assert not opt.state[gated.a] and not opt.state[gated.b]
    moved = layers["model.layers.0.self_attn.k_proj"]
    assert opt.state[moved.a] or opt.state[moved.b]


def test_errors_name_the_field():
    model = llama()
    with pytest.raises(ConfigError, match="mode"):
        peftkit.optimizer(model, 1e-2, name="lora-pro", mode="fast")
    with pytest.raises(ConfigError, match="max_grad_norm"):
        peftkit.optimizer(model, 1e-2, name="loft", max_grad_norm=-1)
    with pytest.raises(ConfigError, match="loraplus_lr_ratio"):
        peftkit.optimizer(model, 1e-2, name="loft", loraplus_lr_ratio=0)
    with pytest.raises(ConfigError, match="betas"):
        peftkit.optimizer(model, 1e-2, name="lora-pro", betas=(0.9, 1.5))
    hra = tiny_llama()
    peftkit.wrap(hra, "hra", r=2)
    with pytest.raises(ConfigError, match="lora"):
        peftkit.optimizer(hra, 1e-2, name="lora-pro")
    with pytest.raises(ConfigError, match="no trainable LoRA"):
        PairOptimizer(hra, 1e-2)
    with pytest.raises(ConfigError):
        peftkit.wrap(tiny_llama(), "hra", optimizer="loft")


def test_transformers_trainer_with_optimizer_clipping(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = llama(extra_trainable=False)
    rows = [{k: v[0] for k, v in make_batch(model, batch_size=1, seed=i).items()} for i in range(6)]
    before = trainable_state(model)
    # LoFT clips on projected gradients, inside the optimizer: the Trainer's own clipping is switched off.
    opt = peftkit.optimizer(model, 1e-2, name="loft", max_grad_norm=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                                 max_grad_norm=0.0, report_to=[], save_strategy="no", logging_strategy="no",
                                 use_cpu=True, dataloader_num_workers=0)
        Trainer(model=model, args=args, train_dataset=rows, optimizers=(opt, None)).train()
    assert opt.global_step == 3 and opt.last_grad_norm is not None
    after = trainable_state(model)
    assert all(not torch.equal(after[n], before[n]) for n in before)


def test_adamw_on_cpu_runs_foreach_with_the_per_tensor_loop_bits():
    """peftkit's ``adamw`` asks torch for the foreach kernels on CPU (torch would pick its per-tensor loop there):
    the same bits as that loop after several steps with weight decay, on LoRA factors, a bias and a norm."""
    model = llama()
    reference_model = llama()
    reference_model.load_state_dict(model.state_dict())
    opt = peftkit.optimizer(model, 1e-2, name="adamw", weight_decay=0.1)
    assert all(group["foreach"] for group in opt.param_groups)
    reference = torch.optim.AdamW([{**{k: v for k, v in g.items() if k != "params"},
                                    "params": [dict(reference_model.named_parameters())[n] for n in names],
                                    "foreach": False}
                                   for g, names in zip(opt.param_groups, _group_names(model, opt))])
    train(model, opt, 4)
    train(reference_model, reference, 4)
    for name, value in trainable_state(model).items():
        assert torch.equal(value, dict(reference_model.named_parameters())[name].detach()), name


def _group_names(model, opt) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in opt.param_groups]
