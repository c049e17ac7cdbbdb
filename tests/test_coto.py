"""CoTo (adapters/coto.py): the numbered tests of coto.md (5, two processes, is in
test_schedules_distributed.py), CoTo on Hydra/HRA, resume mid-run, and the transformers Trainer path."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
from helpers import make_batch, output, tiny_llama

import peftkit
from adapters.coto import activation_probability, block_groups, draw_gates  # noqa: E402
from peftkit import registry
from peftkit.inject import adapter_layers

TARGETS = ["q_proj", "v_proj", "down_proj"]


def coto_llama(layers: int = 4, **options):
    model = tiny_llama(num_hidden_layers=layers)
    return peftkit.wrap(model, "coto", targets=TARGETS, **options)


def adapter_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train(model, steps, schedule, opt, total=None, accum=1, seed=0, record=None):
    total = total or steps
    schedule.on_train_begin_(total)
    model.train()
    for step in range(1, steps + 1):
        for micro in range(accum):
            if record is not None:
                record.append((step, tuple(schedule.gates)))
            batch = make_batch(model, seed=seed + 10 * step + micro)
            (model(**batch).loss / accum).backward()
        opt.step()
        schedule.on_step(step, total)
        opt.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------ 1. schedule
def test_probability_schedule_and_p_one_equals_lora():
    values = [activation_probability(t, 1000, 0.1, 0.75) for t in (0, 250, 500, 749, 750)]
    for got, want in zip(values, [0.1, 0.4, 0.7, 0.1 + 0.9 * 749 / 750, 1.0]):
        assert abs(got - want) <= 1e-12
    assert abs(values[3] - 0.9988) < 1e-4
    assert all(activation_probability(t, 1000, 0.1, 0.75) == 1.0 for t in range(750, 1000, 37))
    # With p ≡ 1 the run is plain LoRA, bit for bit.
    runs = []
    for method, options in (("coto", {"initial_p": 1.0}), ("lora", {})):
        model = peftkit.wrap(tiny_llama(), method, targets=TARGETS, **options)
        opt = peftkit.optimizer(model, lr=1e-2)
        train(model, 3, peftkit.callbacks(model), opt)
        runs.append(adapter_params(model))
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_stage_one_boundary():
    # ⌈0.75·10⌉ = 8: p(7) = 0.1 + 0.9·7/8 < 1, p(8) = 1.
    assert abs(activation_probability(7, 10, 0.1, 0.75) - (0.1 + 0.9 * 7 / 8)) <= 1e-12
    assert activation_probability(7, 10, 0.1, 0.75) < 1.0 and activation_probability(8, 10, 0.1, 0.75) == 1.0


# ------------------------------------------------------------------------------------------ 2. draws
@pytest.mark.slow  # 10⁵ draws each: ~5 s per case on the shared machine
@pytest.mark.parametrize("groups", [2, 32])
def test_draw_frequency_and_at_least_one(groups):
    p, draws = 0.1, 100_000
    gen = torch.Generator().manual_seed(groups)
    on = [0] * groups
    for _ in range(draws):
        gates = draw_gates(gen, groups, p)
        assert any(gates)
        on = [count + gate for count, gate in zip(on, gates)]
    expected = p / (1 - (1 - p) ** groups)  # the marginal under the at-least-one resampling
    assert max(abs(count / draws - expected) for count in on) <= 0.01, ([c / draws for c in on], expected)


def test_groups_are_blocks_by_parsed_index():
    model = coto_llama(layers=3)
    schedule = peftkit.callbacks(model)
    assert schedule.group_names == [[f"model.layers.{i}.{m}" for m in
                                     ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")] for i in range(3)]
    assert block_groups(["a.10.x", "a.2.x", "head"]) == [["a.2.x"], ["a.10.x"], ["head"]]
    # Two stacks with the same indices are two sets of blocks, stack by stack in first-appearance order.
    assert block_groups(["enc.block.1.x", "enc.block.0.x", "dec.block.0.y", "dec.block.0.z", "head"]) == \
        [["enc.block.0.x"], ["enc.block.1.x"], ["dec.block.0.y", "dec.block.0.z"], ["head"]]


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(config).eval()


def test_t5_encoder_and_decoder_blocks_are_separate_groups():
    """encoder.block.i and decoder.block.i are different blocks (one gate each), whose gates act apart."""
    model = peftkit.wrap(tiny_t5(), "coto", targets=["q", "v"])
    schedule = peftkit.callbacks(model)
    encoder = [[f"encoder.block.{i}.layer.0.SelfAttention.{m}" for m in "qv"] for i in range(2)]
    decoder = [[f"decoder.block.{i}.layer.{j}.{attention}.{m}" for j, attention in
                ((0, "SelfAttention"), (1, "EncDecAttention")) for m in "qv"] for i in range(2)]
    assert schedule.group_names == encoder + decoder
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.adapters["default"].lora_B.weight.normal_(0, 0.1, generator=gen)
    model.train()
    gates = [True, False, False, True]  # encoder block 0 on, decoder block 0 off, and the reverse
    schedule.set_gates(gates)
    ids = torch.randint(1, 97, (2, 6), generator=gen)
    model(input_ids=ids, labels=ids).loss.backward()
    layers = adapter_layers(model)
    for names, gate in zip(schedule.group_names, gates):
        for name in names:
            grad = layers[name].adapters["default"].lora_A.weight.grad
            assert (grad is not None and grad.abs().sum() > 0) if gate else grad is None, name


# ------------------------------------------------------------------------------------------ 3. gated-off layer
def test_gated_off_layer_is_base_and_untouched_by_adamw():
    model = coto_llama(layers=2)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    opt = peftkit.optimizer(model, lr=1e-2, weight_decay=0.1)
    schedule = peftkit.callbacks(model, optimizer=opt)
    schedule.on_train_begin_(100)
    model.train()
    train_step = lambda: (model(**make_batch(model, seed=3)).loss.backward(), opt.step())  # noqa: E731
    schedule.set_gates([True, True])
    train_step()
    opt.zero_grad(set_to_none=True)
    schedule.set_gates([False, True])
    off = [l for n, l in adapter_layers(model).items() if ".layers.0." in n]
    x = torch.randn(3, off[0].in_features)
    assert torch.equal(off[0](x), off[0].base_layer(x))  # the gated-off layer is its base, exactly
    before = adapter_params(model)
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in opt.state}
    model(**make_batch(model, seed=4)).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad and ".layers.0." in name:
            assert p.grad is None, name
        elif p.requires_grad:
            assert p.grad is not None, name
    opt.step()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".layers.0." in name:
            assert torch.equal(p.detach(), before[name]), name  # no step, no weight decay
            for key, value in opt.state[p].items():
                assert torch.equal(value, state[id(p)][key]), (name, key)  # moments and step count
        else:
            assert not torch.equal(p.detach(), before[name]), name


# ------------------------------------------------------------------------------------------ 4. accumulation, eval
def test_one_mask_per_step_under_accumulation_and_all_on_in_eval():
    model = coto_llama(layers=4)
    opt = peftkit.optimizer(model, lr=1e-2)
    schedule = peftkit.callbacks(model)
    record = []
    train(model, 6, schedule, opt, total=40, accum=3, record=record)
    per_step = {}
    for step, gates in record:
        per_step.setdefault(step, set()).add(gates)
    assert all(len(g) == 1 for g in per_step.values())  # every micro-batch of a step used the same mask
    assert len({next(iter(g)) for g in per_step.values()}) > 1  # and masks change between steps
    # The masks are the draws of a generator seeded by (seed, step): reproducible, the global RNG untouched.
    state = torch.random.get_rng_state()
    assert list(per_step[3])[0] == tuple(schedule.draw(2))
    assert torch.equal(state, torch.random.get_rng_state())
    schedule.set_gates([False, True, False, False])
    batch = make_batch(model, seed=9)
    model.eval()
    with_all = output(model, batch)
    schedule.on_train_end_()
    torch.testing.assert_close(output(model, batch), with_all, atol=0, rtol=0)  # eval: every adapter on
    assert all(schedule.gates)


# ------------------------------------------------------------------------------------------ 6. format, 7. scaling
def test_saved_adapter_loads_in_peft(tmp_path):
    from peft import PeftModel

    model = coto_llama(layers=2)
    opt = peftkit.optimizer(model, lr=5e-2)
    schedule = peftkit.callbacks(model)
    train(model, 4, schedule, opt)
    schedule.on_train_end_()
    model.eval()
    batch = make_batch(model, seed=11)
    ours = output(model, batch)
    peftkit.save(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(tiny_llama(num_hidden_layers=2), str(tmp_path)).eval()
    with torch.no_grad():
        got = theirs(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(got, ours, atol=1e-6, rtol=1e-5)


def test_scaling_untouched():
    model = nn.Sequential(nn.Linear(6, 5, dtype=torch.float64), nn.Linear(5, 4, dtype=torch.float64))
    peftkit.wrap(model, "coto", r=2, alpha=7.0)
    schedule = peftkit.callbacks(model)
    schedule.on_train_begin_(100)
    model.train()
    x = torch.randn(3, 6, dtype=torch.float64)
    for layer in adapter_layers(model).values():
        with torch.no_grad():
            layer.adapters["default"].lora_B.weight.normal_()
    schedule.set_gates([True, False])
    layer = adapter_layers(model)["0"]
    branch = layer.adapters["default"]
    s = 7.0 / 2
    assert layer.scaling["default"] == s
    with torch.no_grad():
        got = layer(x) - layer.base_layer(x)
        torch.testing.assert_close(got, s * x @ (branch.lora_B.weight @ branch.lora_A.weight).t(), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------ other architectures
@pytest.mark.parametrize("architecture", ["hydra", "hra"])
def test_coto_on_other_architectures(architecture):
    if architecture not in registry.components("architecture"):
        pytest.fail(f"the {architecture} architecture is not registered")
    model = peftkit.wrap(tiny_llama(), architecture, schedule="coto", targets=TARGETS)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    opt = peftkit.optimizer(model, lr=1e-2)
    schedule = peftkit.callbacks(model, optimizer=opt)
    schedule.on_train_begin_(50)
    model.train()
    schedule.set_gates([False, True])
    for name, layer in adapter_layers(model).items():
        if ".layers.0." in name:
            x = torch.randn(2, layer.in_features)
            assert torch.equal(layer(x), layer.base_layer(x)), name
    before = adapter_params(model)
    model(**make_batch(model)).loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert (p.grad is None) == (".layers.0." in name), name
            assert torch.equal(p.detach(), before[name]) == (".layers.0." in name), name


# ------------------------------------------------------------------------------------------ resume
def test_resume_mid_run_equals_uninterrupted(tmp_path):
    full = coto_llama(layers=4)
    opt = peftkit.optimizer(full, lr=1e-2)
    schedule = peftkit.callbacks(full)
    record_full = []
    train(full, 6, schedule, opt, total=12, record=record_full)

    first = coto_llama(layers=4)
    opt = peftkit.optimizer(first, lr=1e-2)
    schedule = peftkit.callbacks(first)
    train(first, 3, schedule, opt, total=12)
    peftkit.save(first, tmp_path)
    torch.save({"optimizer": opt.state_dict(), "schedule": schedule.state_dict()}, tmp_path / "state.pt")

    resumed = peftkit.load(tiny_llama(num_hidden_layers=4), tmp_path, trainable=True).train()
    states = torch.load(tmp_path / "state.pt")
    opt = peftkit.optimizer(resumed, lr=1e-2)
    opt.load_state_dict(states["optimizer"])
    schedule = peftkit.callbacks(resumed)
    schedule.load_state_dict(states["schedule"])
    record = []
    for step in range(4, 7):
        record.append((step, tuple(schedule.gates)))
        model_batch = make_batch(resumed, seed=10 * step)
        resumed(**model_batch).loss.backward()
        opt.step()
        schedule.on_step(step, 12)
        opt.zero_grad(set_to_none=True)
    assert record == record_full[3:]
    got = dict(resumed.named_parameters())
    for name, p in full.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[name], p, atol=1e-6, rtol=0, msg=name)


# ------------------------------------------------------------------------------------------ the Trainer
def test_trainer_drives_the_gates(tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Batches(Dataset):
        def __init__(self, model):
            self.items = [{k: v[0] for k, v in make_batch(model, batch_size=1, seed=i).items()} for i in range(16)]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    model = coto_llama(layers=4)
    schedule = peftkit.callbacks(model)
    seen = []
    original = schedule.on_step

    def spy(step, total):
        # Inside the optimizer step: the gates in force are those the previous step drew.
        seen.append((step, total, tuple(schedule.gates),
                     {n for n, p in model.named_parameters() if p.grad is not None}))
        original(step, total)

    schedule.on_step = spy
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=args, train_dataset=Batches(model), callbacks=[schedule])
        trainer.train()
    assert [s[0] for s in seen] == [1, 2, 3, 4, 5] and all(s[1] == 5 for s in seen)
    gates_in_force = [tuple(schedule.draw(0))] + [tuple(schedule.draw(step)) for step in range(1, 5)]
    assert [s[2] for s in seen] == gates_in_force
    for _, _, gates, with_grad in seen:
        for block, on in enumerate(gates):
            has = any(f".layers.{block}." in n for n in with_grad)
            assert has == on
    assert schedule.optimizer is trainer.optimizer  # the Trainer handed its optimizer over
    assert all(schedule.gates) and not any(l.gated_off for l in adapter_layers(model).values() if l.training)
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


# ------------------------------------------------------------------------------------------ torch.compile
def test_regional_compile_does_not_recompile_per_gate_pattern():
    """Under Accelerate's regional compilation (``compile_regions``: one compiled graph shared by the repeated
    blocks) CoTo's gates cost a bounded number of graphs (gate on/off × whether the block's input needs grad),
    however many gate patterns the run draws; each compiled step equals the eager one (loss and every adapter
    gradient), so the skipped branches are really skipped (grad None) and the others trained."""
    import torch._dynamo as dynamo
    from accelerate.utils import compile_regions

    eager, compiled_model = coto_llama(layers=6), coto_llama(layers=6)
    compiled_model.load_state_dict(eager.state_dict())
    schedules = peftkit.callbacks(eager), peftkit.callbacks(compiled_model)
    graphs = [0]

    def counting_backend(graph_module,
                         example_inputs):  # no inductor on CPU CI: count dynamo's graphs, run them as traced
        graphs[0] += 1
        return graph_module.forward

    dynamo.reset()
    compiled = compile_regions(compiled_model, backend=counting_backend)
    batch = make_batch(eager, seq_len=8, seed=3)
    patterns = set()
    try:
        for step in range(24):
            for schedule in schedules:
                schedule.on_train_begin_(100) if step == 0 else schedule.on_step(step * 3, 100)
            patterns.add(tuple(schedules[0].gates))
            assert schedules[0].gates == schedules[1].gates
            for model in (eager, compiled_model):
                model.train()
                model.zero_grad(set_to_none=True)
            want = eager(**batch, use_cache=False).loss
            want.backward()
            got = compiled(**batch, use_cache=False).loss
            got.backward()
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            for (name, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
                if a.requires_grad:
                    assert (a.grad is None) == (b.grad is None), name
                    if a.grad is not None:
                        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)
    finally:
        dynamo.reset()
    assert len(patterns) >= 12  # many distinct gate patterns were drawn ...
    assert graphs[0] <= 8  # ... and the graphs stayed bounded (8 measured: 2 gates × 2 input kinds × fwd+tail)
