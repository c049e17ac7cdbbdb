"""The training loop: LR schedule, batch order, data formats, resume == uninterrupted, signals, NaN stop,
gradient accumulation, metrics and plot. Tiny config-built models and the byte tokenizer: no downloads."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from train_fixtures import adapter_tensors, llama_text_recipe, read_metrics

import peftkit
from peftkit.errors import ConfigError
from peftkit.inject import adapter_layers
from peftkit.train import checkpointing, from_dict, train
from peftkit.train.data import IGNORE_INDEX, BatchPlan, byte_tokenizer, collate, tokenize, topics
from peftkit.train.loop import lr_lambda
from peftkit.train.recipe import DataSection


def test_lr_schedule_warmup_then_cosine_and_linear(tmp_path):
    recipe = from_dict(llama_text_recipe(tmp_path, training__max_steps=10, training__warmup=4))
    factor = lr_lambda(recipe)
    assert [factor(s) for s in range(4)] == pytest.approx([0, 1 / 4, 2 / 4, 3 / 4])  # transformers' warmup
    assert factor(4) == pytest.approx(1.0)
    assert factor(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert factor(10) == pytest.approx(0.0, abs=1e-12)
    linear = lr_lambda(from_dict(llama_text_recipe(tmp_path, training__max_steps=10, training__warmup=0.2,
                                                   training__lr_schedule="linear")))
    assert linear(2) == pytest.approx(1.0) and linear(6) == pytest.approx(0.5)


def test_batch_plan_two_processes_read_what_one_process_reads_at_twice_the_batch():
    one = BatchPlan(40, 6, world_size=1, rank=0, seed=5)
    ranks = [BatchPlan(40, 3, world_size=2, rank=r, seed=5) for r in range(2)]
    assert one.batches_per_epoch == 6 and ranks[0].batches_per_epoch == 6
    for position in range(15):  # crosses two epoch boundaries
        assert one.indices(position) == ranks[0].indices(position) + ranks[1].indices(position)
    epoch = [i for p in range(6) for i in one.indices(p)]
    assert len(set(epoch)) == 36 and one.indices(6) != one.indices(0)  # no repeats; a new order next epoch
    assert BatchPlan(40, 6, seed=5).indices(7) == one.indices(7)  # a pure function of (seed, position)


def test_instruction_labels_cover_only_the_response():
    tokenizer = byte_tokenizer()
    data = DataSection(train="x", format="instruction", max_length=64)
    out = tokenize([{"prompt": "ab", "response": "xyz"}], tokenizer, data)
    ids, labels = out.input_ids[0], out.labels[0]
    prompt = tokenizer("ab\n")["input_ids"]
    response = tokenizer("xyz", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids == prompt + response
    assert labels == [IGNORE_INDEX] * len(prompt) + response

    # With a chat template: the user turn is the prompt, the assistant turn is the only labelled part.
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    out = tokenize([{"prompt": "ab", "response": "xyz"}], tokenizer, data)
    text = tokenizer.decode(out.input_ids[0])
    assert text == "<user>ab<assistant>xyz"
    labelled = [t for t, y in zip(out.input_ids[0], out.labels[0]) if y != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "xyz"


def test_text_packing_and_classification_pairs():
    tokenizer = byte_tokenizer()
    packed = tokenize([{"text": "abcdef"}, {"text": "ghij"}], tokenizer, DataSection(train="x", max_length=4))
    eos = tokenizer.eos_token_id
    stream = tokenizer("abcdef")["input_ids"] + [eos] + tokenizer("ghij")["input_ids"] + [eos]
    assert packed.input_ids == [stream[0:4], stream[4:8], stream[8:12]] and packed.labels == packed.input_ids

    data = DataSection(train="x", format="classification", text_pair_column="other", max_length=16)
    rows = [{"text": "ab", "other": "cd", "label": "yes"}, {"text": "e", "other": "f", "label": "no"}]
    out = tokenize(rows, tokenizer, data)
    assert out.label_names == ["no", "yes"] and out.labels == [1, 0]
    assert out.input_ids[0] == tokenizer("ab", "cd")["input_ids"]
    batch = collate(out, [0, 1], tokenizer.pad_token_id, classification=True)
    assert batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"].sum(1).tolist() == [len(out.input_ids[0]), len(out.input_ids[1])]


def test_generated_quickstart_task_is_deterministic_and_balanced():
    train_rows, eval_rows = topics("train"), topics("validation")
    assert train_rows == topics("train") and len(train_rows) == 512 and len(eval_rows) == 192
    labels = [r["label"] for r in train_rows]
    assert {labels.count(c) for c in set(labels)} == {128}
    assert not {r["text"] for r in train_rows} & {r["text"] for r in eval_rows}


def test_resume_after_sigint_gives_the_uninterrupted_adapter(tmp_path):
    # Adapter dropout (RNG), grad accumulation, warmup + cosine and epoch boundaries (8 texts pack into ~22
    # blocks of 16 tokens: 5 micro-batches of 4 per epoch, 16 micro-batches in the run) must all line up.
    settings = dict(adapter__dropout=0.1, training__grad_accum=2, training__max_steps=8, data__max_train_samples=8)
    reference = train(from_dict(llama_text_recipe(tmp_path / "a", **settings)))
    assert reference.status == "done"

    def interrupt(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    recipe = from_dict(llama_text_recipe(tmp_path / "b", **settings))
    stopped = train(recipe, hooks=[interrupt])
    assert (stopped.status, stopped.step, stopped.signal_number) == ("interrupted", 3, signal.SIGINT)
    assert [p.name for p in checkpointing.checkpoint_dirs(recipe.training.output_dir)] == ["step-000003"]
    assert not (tmp_path / "b" / "run" / "adapter").exists()
    resumed = train(recipe, resume=True)
    assert resumed.status == "done" and resumed.step == 8
    assert read_metrics(tmp_path / "b" / "run")[-2]["epoch"] > 3  # crossed epoch boundaries

    expected, got = adapter_tensors(tmp_path / "a" / "run"), adapter_tensors(tmp_path / "b" / "run")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    # metrics.jsonl: every step once, the same losses as the uninterrupted run
    ref_losses = [r["loss"] for r in read_metrics(tmp_path / "a" / "run") if "loss" in r]
    got_losses = [r["loss"] for r in read_metrics(tmp_path / "b" / "run") if "loss" in r]
    assert got_losses == ref_losses and len(ref_losses) == 8
    assert reference.eval_metrics == resumed.eval_metrics
    assert (tmp_path / "b" / "run" / "loss.png").stat().st_size > 1000


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    recipe = from_dict(llama_text_recipe(tmp_path, training__save_every=2, training__max_steps=8))
    model_holder = {}

    def poison(step, record):
        if step == 3:  # corrupt an adapter weight: the loss of step 4 is NaN
            layer = next(iter(adapter_layers(model_holder["model"]).values()))
            with torch.no_grad():
                next(layer.adapters.parameters()).fill_(float("nan"))

    from peftkit.train import loop

    original = loop.prepare

    def capture(recipe, accelerator=None):
        run = original(recipe, accelerator)
        model_holder["model"] = run.model
        return run

    loop.prepare = capture
    try:
        result = train(recipe, hooks=[poison])
    finally:
        loop.prepare = original
    assert result.status == "nan" and result.step == 3
    assert "the loss is nan at step 4" in capsys.readouterr().out
    dirs = checkpointing.checkpoint_dirs(recipe.training.output_dir)
    assert [p.name for p in dirs] == ["step-000002"] and result.checkpoint == dirs[0]
    saved = checkpointing.adapter_io.read_tensors(dirs[0] / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert not (tmp_path / "run" / "adapter").exists()


def test_grad_accumulation_equals_the_larger_batch(tmp_path):
    # Packed text: every micro-batch has the same token count, so mean(mean of halves) == mean of the whole.
    big = train(from_dict(llama_text_recipe(tmp_path / "big", training__batch_size=4, training__max_steps=4)))
    accumulated = train(from_dict(llama_text_recipe(tmp_path / "acc", training__batch_size=2,
                                                    training__grad_accum=2, training__max_steps=4)))
    assert big.status == accumulated.status == "done"
    a, b = adapter_tensors(tmp_path / "big" / "run"), adapter_tensors(tmp_path / "acc" / "run")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)  # it trained


def test_existing_run_needs_resume_and_resume_needs_a_run(tmp_path):
    recipe = from_dict(llama_text_recipe(tmp_path, training__max_steps=1))
    with pytest.raises(ConfigError, match="--resume: no checkpoint"):
        train(recipe, resume=True)
    train(recipe)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(recipe)
    changed = from_dict(llama_text_recipe(tmp_path, training__max_steps=2, training__batch_size=2))
    with pytest.raises(peftkit.CheckpointError, match="batch_size"):
        train(changed, resume=True)


@pytest.mark.parametrize("method,options", [
    ("coto", {"initial_p": 0.3, "stage1_ratio": 0.75}),
    ("elalora", {"r": 4, "t_init": 1, "t_final": 1, "delta_t": 1, "budget": 2, "k": 1}),
])
def test_resume_restores_schedule_state(tmp_path, method, options):
    """Schedules with state (CoTo's gates, ElaLoRA's scores, masks and reallocations, which also reset
    optimizer moments): interrupted at step 3 and resumed == uninterrupted, on a tiny BERT classifier."""
    from train_fixtures import TINY_CONFIGS, classification_rows, write_jsonl

    def recipe(folder):
        train_file = write_jsonl(folder / "train.jsonl", classification_rows(32, seed=1, pair="pair"))
        return from_dict({
            "model": {"config": dict(TINY_CONFIGS["bert"]), "tokenizer": "bytes", "task": "sequence-classification"},
            "data": {"train": train_file, "format": "classification", "text_pair_column": "pair", "max_length": 48},
            "adapter": {"method": method, **options},
            "optimizer": {"lr": 1e-2},
            "training": {"max_steps": 7, "batch_size": 4, "log_every": 1, "warmup": 1,
                         "output_dir": str(folder / "run"), "seed": 1},
            "logging": {"progress_bar": False},
        })

    assert train(recipe(tmp_path / "a")).status == "done"
    stopped = train(recipe(tmp_path / "b"), hooks=[lambda step, _: step == 3 and os.kill(os.getpid(), signal.SIGTERM)])
    assert (stopped.status, stopped.step, stopped.signal_number) == ("interrupted", 3, signal.SIGTERM)
    assert train(recipe(tmp_path / "b"), resume=True).status == "done"
    expected, got = adapter_tensors(tmp_path / "a" / "run"), adapter_tensors(tmp_path / "b" / "run")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    if method == "elalora":  # the run really reallocated ranks (and the history survived the resume)
        states = torch.load(checkpointing.latest(tmp_path / "b" / "run") / "optimizer.pt", weights_only=True)
        assert states["schedule"]["history"]


def test_two_runs_with_different_mixed_precision_in_one_process(tmp_path):
    """Accelerate's process-wide state would refuse the second run ("restart your runtime completely"): a notebook
    that trains in bf16 and then in fp32 gets both runs, each with its own precision."""
    from accelerate.state import AcceleratorState

    first = train(from_dict(llama_text_recipe(tmp_path / "a", training__max_steps=1, training__mixed_precision="bf16")))
    assert AcceleratorState().mixed_precision == "bf16"
    second = train(from_dict(llama_text_recipe(tmp_path / "b", training__max_steps=1)))
    assert AcceleratorState().mixed_precision == "no"
    assert (first.status, first.step, second.status, second.step) == ("done", 1, "done", 1)
    losses = [r["loss"] for run in (first, second) for r in read_metrics(run.output_dir) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_a_run_from_python_gives_the_callers_thread_count_back(tmp_path):
    """training.threads is the run's: a notebook that calls train() keeps its own torch thread count after it."""
    before = torch.get_num_threads()
    during = []
    try:
        torch.set_num_threads(1)
        recipe = from_dict(llama_text_recipe(tmp_path, training__max_steps=1, training__threads=2))
        result = train(recipe, hooks=[lambda step, record: during.append(torch.get_num_threads())])
        assert result.status == "done" and during == [2]
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_grad_accumulation_equals_the_larger_batch_on_answers_of_different_lengths(tmp_path):
    """Instruction data with answers of 1 to 6 words and response-only labels: each micro-batch holds another
    number of target tokens, so only the mean over the step's tokens makes batch 1 x 4 equal batch 4 x 1 (a mean
    of micro-batch means differed by 2e-2 in the adapter, as much as B moved). fp64: equal to round-off,
    adapters, optimizer moments and the logged losses (fp64 sums, not fp32)."""
    from train_fixtures import llama_chat_recipe

    def run(name, batch, accum):
        spec = llama_chat_recipe(tmp_path / name, training__batch_size=batch, training__grad_accum=accum,
                                 training__max_steps=3, training__save_every=3, training__warmup=0)
        spec["model"]["dtype"] = "float64"
        assert train(from_dict(spec)).status == "done"
        return tmp_path / name / "run"

    whole, split = run("whole", 4, 1), run("split", 1, 4)
    a, b = adapter_tensors(whole), adapter_tensors(split)
    assert any(v.abs().max() > 1e-3 for k, v in a.items() if "lora_B" in k)  # it trained
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-10, atol=1e-13)
    moments = [torch.load(run / "checkpoints" / "step-000003" / "optimizer.pt", weights_only=True)["optimizer"]["state"]
               for run in (whole, split)]
    for index, state in moments[0].items():
        torch.testing.assert_close(moments[1][index]["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-9, atol=1e-20)
    losses = [[r["loss"] for r in read_metrics(run) if "loss" in r] for run in (whole, split)]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-13, abs=0)
    tokens = [[r["tokens"] for r in read_metrics(run) if "loss" in r] for run in (whole, split)]
    assert tokens[0] == tokens[1]  # every micro-batch's own tokens, not one micro-batch's times a count


def test_loss_units_read_from_arrow_and_from_lists():
    """Per example: target tokens after the causal shift (labels[1:] != -100), from an Arrow column (through a
    filter's indices mapping) and from Python lists alike; classification counts examples."""
    import datasets

    from peftkit.train.data import Tokenized, example_lengths, loss_units

    rows = [[-100, -100, 5, 6], [7, 8], [-100, 3, -100, 4, 5], [1]]
    expected = [2, 1, 3, 0]  # the first label of a row predicts nothing
    assert loss_units(Tokenized(rows, rows), False).tolist() == expected
    table = datasets.Dataset.from_dict({"input_ids": [[0] * len(r) for r in [[9]] + rows], "labels": [[9]] + rows})
    table = table.filter(lambda labels: labels != [9], input_columns="labels")  # an indices mapping over the table
    assert loss_units(Tokenized(table["input_ids"], table["labels"]), False).tolist() == expected
    assert loss_units(Tokenized(rows, [0, 1, 0, 1]), True).tolist() == [1, 1, 1, 1]
    assert example_lengths(Tokenized(table["input_ids"], table["labels"])).tolist() == [4, 2, 5, 1]


def test_loss_units_are_read_in_bounded_chunks(monkeypatch):
    """The Arrow columns are read a slice of rows at a time (a data set of any size): chunks of 2 rows give the
    counts of one pass."""
    import datasets

    from peftkit.train import batches
    from peftkit.train.data import Tokenized, example_lengths, loss_units

    rows = [[-100, 4, 5], [1, -100], [-100, -100, -100, 7], [3, 3, 3, 3, 3]]
    table = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    whole = loss_units(Tokenized(table["input_ids"], table["labels"]), False).tolist()
    original = batches._list_chunks
    monkeypatch.setattr(batches, "_list_chunks", lambda column: original(column, rows=2))
    assert loss_units(Tokenized(table["input_ids"], table["labels"]), False).tolist() == whole == [2, 0, 1, 4]
    assert example_lengths(Tokenized(table["input_ids"], table["labels"])).tolist() == [3, 2, 4, 5]


def test_eva_starts_from_the_same_adapter_whatever_grad_accum_splits_the_batch_into(tmp_path):
    """EVA's incremental PCA depends on how examples are grouped into batches (unlike the token-weighted gradient
    inits), so the loop hands it each step's micro-batches as one batch: batch 2 x accum 2 then starts where 4 x 1
    does (fed micro-batch by micro-batch, its A differed by 0.85). Answers of different lengths, fp64."""
    from train_fixtures import llama_chat_recipe

    def run(name, batch, accum):
        spec = llama_chat_recipe(tmp_path / name, training__batch_size=batch, training__grad_accum=accum,
                                 training__max_steps=1, training__save_every=1, training__warmup=0)
        spec["adapter"]["method"] = "eva"
        spec["model"]["dtype"] = "float64"
        assert train(from_dict(spec)).status == "done"
        return adapter_tensors(tmp_path / name / "run")

    whole, split = run("whole", 4, 1), run("split", 2, 2)
    assert whole.keys() == split.keys()
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=1e-9, atol=1e-12)
