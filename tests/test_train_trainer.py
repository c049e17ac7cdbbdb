"""transformers' Trainer drives a peftkit model: the method's optimizer, its schedule as a TrainerCallback
(on_step once per optimizer step), and peftkit.save on the result."""

from __future__ import annotations

import pytest
import torch
from helpers import base_state_dict, make_batches, output, tiny_llama
from transformers import Trainer, TrainingArguments

import peftkit


def test_trainer_trains_and_saves_a_peftkit_model(tmp_path):
    wrapped = peftkit.wrap(tiny_llama(), "lora", r=4, alpha=8)
    base_before = {k: v for k, v in base_state_dict(wrapped).items() if ".adapters." not in k}
    examples = [{k: v[i] for k, v in batch.items()} for batch in make_batches(wrapped, n=8, batch_size=2)
                for i in range(2)]
    schedule = peftkit.callbacks(wrapped)
    steps = []
    original_on_step = schedule.on_step
    schedule.on_step = lambda step, total: (steps.append((step, total)), original_on_step(step, total))
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=4, per_device_train_batch_size=2,
                             learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                             logging_steps=1, use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=wrapped, args=args, train_dataset=examples,
                      optimizers=(peftkit.optimizer(wrapped, 1e-2), None), callbacks=[schedule])
    result = trainer.train()
    assert result.global_step == 4 and steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))

    after = base_state_dict(wrapped)
    for key, value in base_before.items():  # the base stayed frozen
        assert torch.equal(after[key], value), key
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in after.items())  # B moved off 0

    peftkit.save(wrapped, tmp_path / "adapter")
    reloaded = peftkit.load(tiny_llama(), tmp_path / "adapter")
    batch = make_batches(wrapped, n=1)[0]
    wrapped.eval()
    torch.testing.assert_close(output(reloaded, batch), output(wrapped, batch))


def test_import_peftkit_leaves_the_trainer_and_peft_unimported():
    # A schedule is a Trainer callback by duck typing: subclassing transformers.TrainerCallback imports
    # transformers.trainer_utils and, through it, all of PEFT (two thirds of `import peftkit`'s time).
    import subprocess
    import sys

    code = "import sys, peftkit; print(sorted(m for m in ('peft', 'transformers.trainer_utils') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_schedule_answers_every_trainer_event():
    from transformers import TrainerCallback

    schedule = peftkit.callbacks(peftkit.wrap(tiny_llama(), "lora", r=2))
    events = [name for name in vars(TrainerCallback) if name.startswith("on_")]
    assert len(events) >= 15
    for name in events:
        assert callable(getattr(schedule, name))
    assert schedule.on_log(None, None, None, logs={}) is None and schedule.on_future_event() is None
    try:
        schedule.missing_attribute
    except AttributeError as error:
        assert "missing_attribute" in str(error)
    else:
        raise AssertionError("only on_* hooks default to no-ops")


def _trainer(tmp_path, wrapped, **kwargs):
    examples = [{k: v[i] for k, v in batch.items()} for batch in make_batches(wrapped, n=2, batch_size=2)
                for i in range(2)]
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=1, per_device_train_batch_size=2,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    return Trainer(model=wrapped, args=args, train_dataset=examples, **kwargs)


def test_a_method_optimizer_replaced_by_the_trainers_default_is_refused_before_step_1(tmp_path):
    """LoRA+ under the Trainer's default AdamW would be plain LoRA, silently: refused at on_train_begin, nothing
    moved."""
    import pytest

    from peftkit.errors import ConfigError

    wrapped = peftkit.wrap(tiny_llama(), "lora-plus", r=4)
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    trainer = peftkit.attach(_trainer(tmp_path, wrapped))
    with pytest.raises(ConfigError, match=r"optimizer 'lora-plus'.*optimizers=\(peftkit.optimizer\(model\), None\)"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in wrapped.state_dict().items())
    # the method's own optimizer is accepted, and it is LoRA+'s: B's rate is ratio × A's
    optimizer = peftkit.optimizer(wrapped, 1e-3)
    _trainer(tmp_path, wrapped, optimizers=(optimizer, None), callbacks=[peftkit.callbacks(wrapped)]).train()
    # the peak rates (the schedule decays to 0)
    rates = sorted({group["initial_lr"] for group in optimizer.param_groups})
    assert len(rates) == 2 and rates[1] / rates[0] > 1


def test_plain_lora_keeps_the_trainers_default_optimizer(tmp_path):
    wrapped = peftkit.wrap(tiny_llama(), "lora", r=4)
    trainer = _trainer(tmp_path, wrapped, callbacks=[peftkit.callbacks(wrapped)])
    assert trainer.train().global_step == 1


def test_the_trainer_passes_num_items_in_batch_to_a_peftkit_model(tmp_path):
    """transformers' Trainer normalises by the global batch's target tokens through ``num_items_in_batch``; a
    peftkit model takes it unchanged (it is the transformers model, forward and all), so batch 1 x accumulation 4
    ends where batch 4 x 1 does on labels of different lengths (fp64: to round-off)."""
    def run(name, batch, accum):
        model = peftkit.wrap(tiny_llama(dtype=torch.float64), "lora", r=4, alpha=8)
        rows = []
        for b in make_batches(model, n=4, batch_size=2, seq_len=10, seed=3):
            for i in range(2):
                labels = b["labels"][i].clone()
                labels[: 1 + 2 * len(rows) % 9] = -100  # prompts of 1 to 9 tokens: answers of 9 to 1 targets
                rows.append({"input_ids": b["input_ids"][i], "attention_mask": b["attention_mask"][i],
                             "labels": labels})
        seen = []
        model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("num_items_in_batch")),
                                        with_kwargs=True)
        args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accum, learning_rate=1e-2, lr_scheduler_type="constant",
                                 report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
                                 seed=5, data_seed=5)
        trainer = Trainer(model=model, args=args, train_dataset=rows, optimizers=(peftkit.optimizer(model, 1e-2), None))
        assert trainer.model_accepts_loss_kwargs
        trainer.train()
        targets = sorted(int((r["labels"][1:] != -100).sum()) for r in rows)
        return model, seen, targets, [r["loss"] for r in trainer.state.log_history if "loss" in r]

    whole, seen_whole, targets, losses_whole = run("whole", 4, 1)
    split, seen_split, _, losses_split = run("split", 1, 4)
    assert len(set(targets)) > 3  # the examples hold different numbers of target tokens
    assert all(n is not None for n in seen_whole + seen_split)
    assert [int(n) for n in seen_split[::4]] == [int(n) for n in seen_whole]  # the step's count, on every micro
    assert losses_split == pytest.approx(losses_whole, rel=1e-6)  # transformers rounds its loss to fp32
    ours, theirs = base_state_dict(whole), base_state_dict(split)
    moved = [k for k in ours if "lora_B" in k and ours[k].abs().max() > 1e-4]
    assert moved
    for key in moved:
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-10, atol=1e-13)
