"""Issue 16's training keys and commands: gradient checkpointing (adapter gradients equal to the unchecked
run), LR schedules through transformers.get_scheduler with min_lr, trackers through Accelerate, eval metric
hooks and exact match on generated answers, ``peftkit chat`` / ``peftkit eval`` / ``--version``, and one
recipe per chat format trained for 2 steps on a tiny model. Tiny config-built models, the byte tokenizer."""

from __future__ import annotations

import io
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from multiproc import REPO
from train_fixtures import TINY_CONFIGS, classification_rows, read_metrics, write_jsonl

from peftkit.errors import ConfigError
from peftkit.train import from_dict, train
from peftkit.train.cli import main
from peftkit.train.data import collate
from peftkit.train.loop import evaluate, lr_lambda, prepare
from peftkit.train.recipe import LR_SCHEDULES, apply_overrides, read_yaml
from peftkit.train.session import load_chat_model, prompt_ids

FORMAT_RECIPES = sorted((REPO / "recipes" / "formats").glob("*.yaml"))


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "Answer with one digit."},
                          {"role": "user", "content": f"What is {i % 7} + {seed}?"},
                          {"role": "assistant", "content": str((i % 7 + seed) % 10)}]} for i in range(n)]


def chat_recipe(tmp_path: Path, **sections) -> dict:
    recipe = {
        "model": {"config": dict(TINY_CONFIGS["llama"], max_position_embeddings=160), "tokenizer": "bytes"},
        "data": {"train": write_jsonl(tmp_path / "data" / "train.jsonl", chat_rows(16)),
                 "eval": write_jsonl(tmp_path / "data" / "eval.jsonl", chat_rows(4, seed=1)),
                 "format": "messages", "max_length": 160, "chat_template": "chatml"},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "optimizer": {"lr": 1e-2},
        "training": {"max_steps": 2, "batch_size": 2, "log_every": 1, "output_dir": str(tmp_path / "run"), "seed": 1},
        "logging": {"progress_bar": False},
    }
    for section, values in sections.items():
        recipe[section].update(values)
    return recipe


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A 2-step messages run shared by the chat/eval tests."""
    tmp = tmp_path_factory.mktemp("chat")
    assert train(from_dict(chat_recipe(tmp))).status == "done"
    return tmp / "run"


# ------------------------------------------------------------------------------------------ training keys
def _adapter_grads(recipe: dict) -> tuple[dict[str, torch.Tensor], int]:
    run = prepare(from_dict(recipe))
    model = run.model
    inner = model.model.layers[0].mlp  # runs inside the checkpointed forward (module hooks do not rerun)
    calls = []
    forward = inner.forward
    inner.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    model.train()
    batch = collate(run.examples.train, [0, 1, 2], run.tokenizer.pad_token_id, False)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)


def test_gradient_checkpointing_gives_the_unchecked_adapter_gradients(tmp_path):
    plain, plain_calls = _adapter_grads(chat_recipe(tmp_path / "a", training={"gradient_checkpointing": False}))
    checked, checked_calls = _adapter_grads(chat_recipe(tmp_path / "b", training={"gradient_checkpointing": True}))
    assert plain_calls == 1 and checked_calls == 2  # the checkpointed layer ran again in the backward
    assert plain.keys() == checked.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], rtol=1e-5, atol=1e-7)


def _factor(tmp_path, **training):
    base = {"max_steps": 10, "warmup": 2, **training}
    return lr_lambda(from_dict(chat_recipe(tmp_path, training=base)))


def test_lr_schedules_through_get_scheduler_with_min_lr(tmp_path):
    for name in LR_SCHEDULES:  # every name builds, warms up and is 1 after the warmup
        extra = {"min_lr": 1e-3} if "min_lr" in name else {}
        factor = _factor(tmp_path, lr_schedule=name, **extra)
        if name == "cosine_warmup_with_min_lr":  # its warmup reaches the peak one step earlier, then min_lr / lr
            assert factor(0) == pytest.approx(0.5) and factor(1) == pytest.approx(1.0)
            assert min(factor(s) for s in range(12)) == pytest.approx(0.1)  # never below min_lr / lr
        else:
            assert [factor(0), factor(1), factor(2)] == pytest.approx([0.0, 0.5, 1.0]), name
    lr = 1e-2
    cosine = _factor(tmp_path, lr_schedule="cosine_with_min_lr", min_lr=1e-3)
    rate = 1e-3 / lr  # cosine from 1 down to min_lr / lr over the 8 steps after warmup
    assert cosine(6) == pytest.approx(rate + (1 - rate) * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert cosine(10) == pytest.approx(rate)
    wsd = _factor(tmp_path, lr_schedule="warmup_stable_decay", min_lr=1e-3,
                  lr_schedule_options={"num_decay_steps": 4, "decay_type": "linear"})
    assert [wsd(s) for s in (3, 5)] == pytest.approx([1.0, 1.0])  # stable until the last 4 steps
    assert wsd(10) == pytest.approx(rate)
    poly = _factor(tmp_path, lr_schedule="polynomial", min_lr=1e-4, lr_schedule_options={"power": 2.0})
    assert poly(6) == pytest.approx(((lr - 1e-4) * (1 - 4 / 8) ** 2 + 1e-4) / lr)
    restarts = _factor(tmp_path, lr_schedule="cosine_with_restarts", lr_schedule_options={"num_cycles": 2})
    assert restarts(6) == pytest.approx(1.0)  # the second cycle starts at half of the decay steps

    with pytest.raises(ConfigError, match="training.min_lr: the 'linear' schedule has no floor"):
        _factor(tmp_path, lr_schedule="linear", min_lr=1e-3)
    with pytest.raises(ConfigError, match="cosine_with_min_lr' schedule needs its floor"):
        _factor(tmp_path, lr_schedule="cosine_with_min_lr")
    with pytest.raises(ConfigError, match="training.lr_schedule: expected one of"):
        _factor(tmp_path, lr_schedule="reduce_lr_on_plateau")
    with pytest.raises(ConfigError, match="lr_schedule_options: the 'cosine' schedule rejects"):
        _factor(tmp_path, lr_schedule="cosine", lr_schedule_options={"power": 2})


def test_the_loop_steps_the_chosen_schedule(tmp_path):
    recipe = chat_recipe(tmp_path, training={"max_steps": 4, "warmup": 1, "lr_schedule": "cosine_with_min_lr",
                                             "min_lr": 1e-3})
    assert train(from_dict(recipe)).status == "done"
    factor = lr_lambda(from_dict(recipe))
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run") if "lr" in r]
    assert lrs == pytest.approx([1e-2 * factor(s) for s in range(4)])


def test_unknown_trackers_missing_packages_and_bad_schedules_are_one_error(tmp_path, capsys, monkeypatch):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(chat_recipe(tmp_path)))
    assert main(["train", str(path), "logging.report_to=[neptune]"]) == 2
    assert "logging.report_to: expected one of" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "mlflow", None)  # find_spec sees no package, installed or not
    assert main(["train", str(path), "logging.report_to=[mlflow]"]) == 2
    assert "logging.report_to: 'mlflow' needs the mlflow package" in capsys.readouterr().err
    assert main(["train", str(path), "training.lr_schedule=linear", "training.min_lr=1e-3"]) == 2
    assert "training.min_lr: the 'linear' schedule has no floor" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_report_to_wandb_offline_writes_a_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = chat_recipe(tmp_path, logging={"report_to": ["wandb"], "progress_bar": False})
    assert train(from_dict(recipe)).status == "done"
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))


# ------------------------------------------------------------------------------------------ eval metrics
HOOK = '''
SEEN = []

def record(predictions, references):
    SEEN.append((list(predictions), list(references)))
    return {"hook_count": len(references)}
'''


def test_eval_metric_hooks_and_f1_on_classification(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(HOOK)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = {
        "model": {"config": dict(TINY_CONFIGS["bert"]), "tokenizer": "bytes", "task": "sequence-classification"},
        "data": {"train": write_jsonl(tmp_path / "train.jsonl", classification_rows(16)),
                 "eval": write_jsonl(tmp_path / "eval.jsonl", classification_rows(10, seed=4)),
                 "format": "classification", "max_length": 48},
        "adapter": {"method": "lora", "r": 4},
        "training": {"max_steps": 1, "batch_size": 4, "output_dir": str(tmp_path / "run"),
                     "eval_metrics": ["f1", "my_metrics:record"]},
        "logging": {"progress_bar": False},
    }
    run = prepare(from_dict(recipe))
    values = evaluate(run, run.model)
    import my_metrics

    predictions, references = my_metrics.SEEN[-1]
    assert references == list(run.examples.eval.labels) and values["eval_hook_count"] == 10
    assert values["eval_accuracy"] == pytest.approx(sum(p == r for p, r in zip(predictions, references)) / 10)
    f1s = []
    for c in sorted(set(predictions) | set(references)):
        tp = sum(p == c == r for p, r in zip(predictions, references))
        precision = tp / max(1, predictions.count(c))
        recall = tp / max(1, references.count(c))
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    assert values["eval_f1"] == pytest.approx(sum(f1s) / len(f1s))
    with pytest.raises(ConfigError, match="training.eval_metrics: unknown metric 'bleu'"):
        from_dict({**recipe, "training": {**recipe["training"], "eval_metrics": ["bleu"]}})


def _greedy(model, tokenizer, turns: list[dict], max_new_tokens: int) -> str:
    ids = torch.tensor([prompt_ids(tokenizer, turns)])
    out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("<|im_end|>")[0].strip()


def test_exact_match_compares_generated_answers(chat_run, tmp_path, monkeypatch):
    (tmp_path / "gen_metrics.py").write_text(HOOK)
    monkeypatch.syspath_prepend(str(tmp_path))
    model, tokenizer = load_chat_model(chat_run)
    rows = chat_rows(3, seed=2)
    # Row 0's reference is what the model itself answers: exact match must count it, and only it.
    rows[0]["messages"][-1]["content"] = _greedy(model, tokenizer, rows[0]["messages"][:-1], 6) or "x"
    evaluation = write_jsonl(tmp_path / "eval.jsonl", rows)
    recipe = chat_recipe(tmp_path, training={"eval_metrics": ["exact_match", "gen_metrics:record"],
                                             "eval_max_new_tokens": 6, "eval_batch_size": 2})
    recipe["data"]["eval"] = evaluation
    run = prepare(from_dict(recipe))
    run.model.load_state_dict(model.state_dict())
    values = evaluate(run, run.model)
    import gen_metrics

    predictions, references = gen_metrics.SEEN[-1]
    expected = [_greedy(model, tokenizer, r["messages"][:-1], 6) for r in rows]
    assert predictions == expected and references == [r["messages"][-1]["content"] for r in rows]
    assert values["eval_exact_match"] == pytest.approx(sum(p == r for p, r in zip(expected, references)) / 3)
    assert values["eval_exact_match"] >= 1 / 3


# ------------------------------------------------------------------------------------------ commands
def test_chat_one_shot_streams_the_greedy_answer(chat_run, capsys):
    model, tokenizer = load_chat_model(chat_run)
    expected = _greedy(model, tokenizer, [{"role": "user", "content": "What is 2 + 1?"}], 12)
    capsys.readouterr()
    assert main(["chat", str(chat_run), "--prompt", "What is 2 + 1?", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip() == expected
    # an adapter folder with --base a saved copy of the base model gives the same answer
    base = chat_run.parent / "base"
    from peftkit.train.build import load_model
    from peftkit.train.recipe import load_recipe

    recipe = load_recipe(chat_run / "recipe.yaml")
    load_model(recipe.model, tokenizer, seed=recipe.training.seed).save_pretrained(base)
    capsys.readouterr()  # transformers' save_pretrained may import DeepSpeed, whose first use logs to stdout
    assert main(["chat", str(chat_run / "adapter"), "--base", str(base), "--prompt", "What is 2 + 1?",
                 "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip() == expected


def test_chat_interactive_keeps_the_history_until_reset(chat_run, monkeypatch, capsys):
    model, tokenizer = load_chat_model(chat_run)
    first = _greedy(model, tokenizer, [{"role": "user", "content": "hi"}], 8)
    second = _greedy(model, tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
                                        {"role": "user", "content": "again"}], 8)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nagain\n/reset\nhi\n/exit\n"))
    capsys.readouterr()
    assert main(["chat", str(chat_run), "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    replies = [re.sub(r"^(> )+", "", line).strip() for line in out.split("\n") if line.startswith("> ")]
    replies = [r for r in replies if r]
    assert replies == [first, second, first]


def test_eval_command_on_a_run_and_on_a_recipe(chat_run, capsys):
    capsys.readouterr()
    assert main(["eval", str(chat_run), "training.eval_max_new_tokens=4", "--json"]) == 0
    values = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    final = [r for r in read_metrics(chat_run) if "eval_loss" in r][-1]
    assert values["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-5)  # the trained adapter, same eval set
    assert values["eval_perplexity"] == pytest.approx(math.exp(values["eval_loss"]))
    assert 0.0 <= values["eval_exact_match"] <= 1.0
    # A recipe alone evaluates its base model: another loss; --no-generate skips exact match.
    assert main(["eval", str(chat_run / "recipe.yaml"), "--json", "--no-generate"]) == 0
    base = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "eval_exact_match" not in base and base["eval_loss"] != pytest.approx(values["eval_loss"], rel=1e-6)


def test_version_and_usage(capsys):
    import peftkit

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"peftkit {peftkit.__version__}"
    assert main([]) == 2
    out = capsys.readouterr().err  # a bare `peftkit` is a usage error (exit 2): its usage goes to stderr
    assert out.startswith("usage: peftkit") and "chat" in out and "eval" in out


# ------------------------------------------------------------------------------------------ recipes
def test_there_is_a_recipe_per_chat_format():
    assert {p.stem for p in FORMAT_RECIPES} == {"messages", "sharegpt", "alpaca"}


def format_rows(recipe, n: int, seed: int) -> list[dict]:
    d = recipe.data
    rows = chat_rows(n, seed)
    if d.format == "alpaca":
        return [{d.instruction_column: r["messages"][1]["content"], d.input_column: "now",
                 d.output_column: r["messages"][2]["content"]} for r in rows]
    column = d.conversation_column or ("messages" if d.format == "messages" else "conversations")
    role, content = d.role_key or ("role" if d.format == "messages" else "from"), d.content_key or \
        ("content" if d.format == "messages" else "value")
    names = {"messages": {}, "sharegpt": {"user": "human", "assistant": "gpt"}}[d.format]
    return [{column: [{role: names.get(t["role"], t["role"]), content: t["content"]} for t in r["messages"]]}
            for r in rows]


@pytest.mark.parametrize("path", FORMAT_RECIPES, ids=lambda p: p.stem)
def test_format_recipe_trains_two_steps_on_a_tiny_model(path, tmp_path):
    raw = read_yaml(path)
    recipe = from_dict(raw)
    assert recipe.model.name and recipe.data.train and recipe.data.format == path.stem
    config = "{" + ", ".join(f"{k}: {v}" for k,
                             v in dict(TINY_CONFIGS["llama"], max_position_embeddings=256).items()) + "}"
    overrides = [
        "model.name=null", f"model.config={config}", "model.tokenizer=bytes", "model.dtype=float32",
        f"data.train={write_jsonl(tmp_path / 'train.jsonl', format_rows(recipe, 12, 1))}", "data.max_length=256",
        "data.max_train_samples=null", "data.max_eval_samples=null", "data.num_proc=null",
        "training.max_steps=2", "training.batch_size=2", "training.grad_accum=1", "training.save_every=null",
        "training.eval_every=null", f"training.output_dir={tmp_path / 'run'}", "logging.progress_bar=false",
        "training.eval_max_new_tokens=4",
    ]
    if recipe.data.eval:
        overrides.append(f"data.eval={write_jsonl(tmp_path / 'eval.jsonl', format_rows(recipe, 4, 2))}")
    if recipe.data.chat_template == "tokenizer":  # the byte tokenizer has none: the built-in stands in
        overrides.append("data.chat_template=chatml")
    result = train(from_dict(apply_overrides(raw, overrides)))
    assert result.status == "done" and result.step == 2
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
