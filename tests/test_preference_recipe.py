"""Issue 28 item 2 / issue 29 item 1: preference training from a recipe (``data.format: preference``,
``training.objective: dpo | simpo``).

- the recipe-driven DPO loss of a step equals TRL's DPOTrainer loss on the same pairs and the same adapter (fp64);
- padding-free pair batches (chosen and rejected sequences of different lengths sharing rows with restarting
  position ids) give the padded batch's per-pair losses and gradients to round-off (fp64);
- the loss is the mean over the global batch's pairs: batch 8 equals batch 4 × grad_accum 2 (one padded, the
  other padding-free), and 2 processes equal 1 (slow);
- every bad recipe or row is refused before step 1 with one message naming the field.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_gpt2, tiny_llama
from train_fixtures import adapter_tensors, llama_preference_recipe, read_metrics, write_jsonl

import peftkit
from peftkit.errors import ConfigError
from peftkit.preference import pair_losses
from peftkit.train import from_dict, train
from peftkit.train.data import Tokenized, check_packed_attention, collate_pairs, tokenize
from peftkit.train.recipe import DataSection

IGNORE = -100


def _pairs(seed: int, count: int = 5, vocab: int = 97) -> Tokenized:
    """Pairs sharing a prompt, completions of different lengths on each side and across pairs."""
    g = torch.Generator().manual_seed(seed)
    chosen, chosen_labels, rejected, rejected_labels = [], [], [], []
    for _ in range(count):
        prompt = torch.randint(3, vocab, (int(torch.randint(1, 6, (), generator=g)),), generator=g).tolist()
        for ids, labels in ((chosen, chosen_labels), (rejected, rejected_labels)):
            answer = torch.randint(3, vocab, (int(torch.randint(1, 12, (), generator=g)),), generator=g).tolist()
            ids.append(prompt + answer)
            labels.append([IGNORE] * len(prompt) + answer)
    return Tokenized(chosen, chosen_labels, rejected_ids=rejected, rejected_labels=rejected_labels)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_padding_free_pairs_have_the_padded_pairs_losses_and_gradients(factory):
    model = peftkit.wrap(factory(dtype=torch.float64), "lora", r=2)
    model.config.use_cache = False
    assert check_packed_attention(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # the policy differs from its reference
    examples = _pairs(seed=4)
    indices = [3, 0, 4, 1]
    padded = collate_pairs(examples, indices, 0)
    free = collate_pairs(examples, indices, 0, padding_free=True)
    lengths = [len(examples.input_ids[i]) for i in indices] + [len(examples.rejected_ids[i]) for i in indices]
    assert len(set(lengths)) > 3  # a real test: the layouts differ
    assert "attention_mask" not in free and free["input_ids"].numel() < padded["input_ids"].numel()
    assert free["input_ids"].shape[1] <= padded["input_ids"].shape[1]
    full_logits = {}
    for objective, chunked in (("dpo", False), ("simpo", False), ("dpo", True)):
        results = []
        for batch in (padded, free):  # chunked: the head on the completion tokens only
            model.zero_grad(set_to_none=True)
            losses, stats = pair_losses(model, batch, objective, beta=0.5, gamma=0.3, pairs=len(indices),
                                        chunked=chunked)
            losses.sum().backward()
            results.append((losses.detach(), stats.chosen_rewards, stats.rejected_rewards,
                            [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        (la, ca, ra, ga), (lb, cb, rb, gb) = results
        assert (la - math.log(2)).abs().max() > 1e-3  # not the trivial policy == reference point
        torch.testing.assert_close(lb, la, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(cb, ca, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(rb, ra, rtol=1e-12, atol=1e-14)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-14)
        if not chunked:
            full_logits[objective] = la
        else:  # the head on the completion tokens only == the full logits
            torch.testing.assert_close(la, full_logits[objective], rtol=1e-12, atol=1e-14)


def _fp64_recipe(tmp_path: Path, **overrides) -> dict:
    settings = dict(model__dtype="float64", data__max_train_samples=8, data__eval=None, training__batch_size=8,
                    training__lr_schedule="constant", training__warmup=0, training__max_grad_norm=None,
                    optimizer__lr=2e-2, training__beta=0.3)
    settings.update(overrides)
    return llama_preference_recipe(tmp_path, "dpo", **settings)


def test_the_recipe_dpo_loss_equals_trls_dpo_loss_on_the_same_pairs(tmp_path):
    """Step 2 of a recipe run (the adapter after step 1: policy != reference) against TRL's DPOTrainer.compute_loss
    on the same 8 pairs (the run's whole batch: the pair mean does not depend on their order) with the adapter a
    1-step run saved, reference = the same model with adapters off (peftkit.reference_model)."""
    from test_preference import _fp64_fused_forward, _pairs_dataset
    from trl import DPOConfig, DPOTrainer

    from peftkit.train.build import load_examples, load_model, load_tokenizer

    two = from_dict(_fp64_recipe(tmp_path / "two", training__max_steps=2))
    assert train(two).status == "done"
    one = from_dict(_fp64_recipe(tmp_path / "one", training__max_steps=1))
    assert train(one).status == "done"
    logged = read_metrics(tmp_path / "two" / "run")[1]
    assert logged["step"] == 2

    tokenizer = load_tokenizer(one)
    examples = load_examples(one, tokenizer).train
    model = load_model(one.model, tokenizer, seed=one.training.seed)
    peftkit.load(model, tmp_path / "one" / "run" / "adapter")
    assert model.dtype == torch.float64
    batch = collate_pairs(examples, list(range(len(examples))), tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != IGNORE).long()}
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, beta=0.3, report_to=[],
                     use_cpu=True, disable_tqdm=True, save_strategy="no")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=model, ref_model=peftkit.reference_model(model), args=args,
                             train_dataset=_pairs_dataset(), processing_class=tokenizer)
    model.eval()
    with torch.no_grad():
        model.forward = _fp64_fused_forward(model, reference=False)
        trainer.ref_model.forward = _fp64_fused_forward(model, reference=True)
        theirs = trainer.compute_loss(model, inputs)
    assert theirs.dtype == torch.float64
    assert abs(logged["loss"] - theirs.item()) <= 1e-6, (logged["loss"], theirs.item())
    assert abs(logged["loss"] - math.log(2)) > 1e-4  # the policy is not the reference: a real comparison
    metrics = trainer._metrics["eval"]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert logged[name] == pytest.approx(metrics[name][-1], abs=1e-9), name


def test_a_step_is_the_mean_over_the_global_batchs_pairs_whatever_its_split(tmp_path):
    """Batch 8 in one padded micro-batch == batch 4 × grad_accum 2 in padding-free ones: the same adapter and
    logged loss and rewards in fp64, over 3 steps (SimPO, whose pair loss depends on each side's token count)."""
    settings = dict(training__max_steps=3, data__max_train_samples=24)
    one = _fp64_recipe(tmp_path / "one", data__padding_free=False, **settings)
    split = _fp64_recipe(tmp_path / "split", training__batch_size=4, training__grad_accum=2, **settings)
    for recipe in (one, split):
        recipe["training"].update(objective="simpo", beta=2.0, simpo_gamma=0.5)
        assert train(from_dict(recipe)).status == "done"
    expected, got = adapter_tensors(tmp_path / "one" / "run"), adapter_tensors(tmp_path / "split" / "run")
    assert expected.keys() == got.keys() and expected
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-10, atol=1e-13)
    for a, b in zip(read_metrics(tmp_path / "one" / "run"), read_metrics(tmp_path / "split" / "run")):
        for key in ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies"):
            assert abs(a[key] - b[key]) <= 1e-10, (key, a, b)
    first = read_metrics(tmp_path / "one" / "run")[0]
    assert first["rewards/accuracies"] not in (0.0, 1.0)  # rewards measured on real, mixed pairs


@pytest.mark.parametrize("change, field", [
    ({"data": {"format": "instruction"}}, "training.objective"),
    ({"training": {"objective": "sft", "beta": 0.2}}, "training.beta"),
    ({"training": {"simpo_gamma": 0.5}}, "training.simpo_gamma"),
    ({"data": {"packing": True}}, "data.packing"),
    ({"training": {"objective": "orpo"}}, "training.objective"),
    ({"training": {"beta": -1}}, "training.beta"),
    ({"training": {"eval_every": 1, "best": {"metric": "eval_perplexity"}}}, "training.best.metric"),
])
def test_a_bad_preference_recipe_is_refused_naming_the_field(tmp_path, change, field):
    recipe = llama_preference_recipe(tmp_path)
    for section, values in change.items():
        recipe[section].update(values)
    with pytest.raises(ConfigError) as info:
        from_dict(recipe)
    assert str(info.value).startswith(field), str(info.value)


def test_the_reward_metrics_can_choose_the_best_checkpoint(tmp_path):
    recipe = llama_preference_recipe(tmp_path)
    recipe["training"].update(eval_every=2, best={"metric": "eval_rewards/accuracies"})
    assert from_dict(recipe).training.best == {"metric": "eval_rewards/accuracies"}
    from peftkit.train.monitor import best_settings

    assert best_settings(recipe["training"]["best"]).mode == "max"


@pytest.mark.parametrize("row, field", [
    ({"prompt": "q", "chosen": None, "rejected": "b"}, "chosen"),
    ({"prompt": "q", "chosen": {"text": "a"}, "rejected": "b"}, "chosen"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "chosen"),
    ({"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "text": "b"}]}, "rejected[0]"),
    ({"prompt": [{"role": "narrator", "content": "q"}], "chosen": "a", "rejected": "b"}, "prompt[0].role"),
    ({"prompt": "q", "chosen": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
      "rejected": "b"}, "chosen"),
])
def test_a_bad_preference_row_is_one_error_naming_row_and_field(row, field):
    from peftkit.train.data import byte_tokenizer

    rows = [dict(row), dict(row), row]  # a column holds one type (Arrow): the same shape, the third row is bad
    with pytest.raises(ConfigError) as info:
        tokenize(rows, byte_tokenizer(), DataSection(train="x", format="preference"), key="data.train f")
    assert str(info.value).startswith(f"data.train f: row 1, field '{field}'"), str(info.value)


def test_message_list_pairs_are_rendered_with_the_template_and_labelled_on_the_completion_only():
    from peftkit.train.data import byte_tokenizer

    tokenizer = byte_tokenizer()
    rows = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
             "chosen": [{"role": "assistant", "content": "hello"}],
             "rejected": [{"role": "assistant", "content": "go away now"}]}]
    data = DataSection(train="x", format="preference", chat_template="chatml")
    pairs = tokenize(rows, tokenizer, data)
    for ids, labels, answer in ((pairs.input_ids[0], pairs.labels[0], "hello"),
                                (pairs.rejected_ids[0], pairs.rejected_labels[0], "go away now")):
        text = tokenizer.decode(ids)
        assert text.startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                               "<|im_start|>assistant\n")
        labelled = tokenizer.decode([t for t in labels if t != IGNORE])
        assert labelled == f"{answer}<|im_end|>\n"
    plain = tokenize([{"prompt": "hi", "chosen": "yo", "rejected": "no"}], tokenizer,
                     DataSection(train="x", format="preference"))
    assert tokenizer.decode([t for t in plain.labels[0] if t != IGNORE]) == "yo" + tokenizer.eos_token


@pytest.mark.slow
@pytest.mark.parametrize("method, engine", [("lora", "ddp"), ("lora-pro", "ddp"), ("loft", "ddp"), ("lora", "fsdp2"),
                                            ("lora", "zero3")])
def test_two_processes_train_the_one_process_dpo_adapter(tmp_path, method, engine):
    """2 processes at batch 4 == 1 process at batch 8 (DPO, padding-free pairs where the engine allows them; under
    DDP the reference forward runs outside DDP's wrapper); the pair optimizers (LoRA-Pro, LoFT) included; the
    sharded engines FSDP2 and ZeRO-3 with LoRA."""
    from multiproc import HANG_GUARD_S, REPO, run_distributed

    settings = dict(training__max_steps=2, data__max_train_samples=16, data__eval=None,
                    adapter__method=method, optimizer__lr=1e-2)
    reference = train(from_dict(_fp64_recipe(tmp_path / "one", **settings)))
    assert reference.status == "done"
    two = _fp64_recipe(tmp_path / "two", training__batch_size=4, training__distributed=engine, **settings)
    recipe_file = tmp_path / "two.yaml"
    recipe_file.write_text(yaml.safe_dump(two))
    proc = run_distributed(REPO / "peftkit" / "__main__.py", 2, tmp_path / "out", "train", str(recipe_file),
                           timeout=HANG_GUARD_S)
    assert "2 process(es), global batch 8" in proc.stdout
    expected, got = adapter_tensors(tmp_path / "one" / "run"), adapter_tensors(tmp_path / "two" / "run")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-9, atol=1e-12)
    for a, b in zip(read_metrics(tmp_path / "one" / "run"), read_metrics(tmp_path / "two" / "run")):
        for key in ("loss", "rewards/margins", "rewards/accuracies"):
            assert abs(a[key] - b[key]) <= 1e-9, (key, a, b)


def test_the_preference_recipe_validates_and_trains_two_steps_on_a_tiny_model(tmp_path):
    """recipes/preference/dpo-smollm2.yaml as written, then 2 steps with a tiny config-built model and local rows
    under the recipe's own column names."""
    from multiproc import REPO
    from train_fixtures import TINY_CONFIGS, preference_rows

    from peftkit.train.recipe import apply_overrides, read_yaml

    raw = read_yaml(REPO / "recipes" / "preference" / "dpo-smollm2.yaml")
    recipe = from_dict(raw)
    assert recipe.training.objective == "dpo" and recipe.data.format == "preference"
    d = recipe.data
    rows = [{d.prompt_column: r["prompt"], d.chosen_column: r["chosen"], d.rejected_column: r["rejected"]}
            for r in preference_rows(16, seed=3)]
    small = apply_overrides(raw, [f"data.train={write_jsonl(tmp_path / 'pairs.jsonl', rows)}", "model.name=null",
                                  "model.gguf_file=null", "model.tokenizer=bytes", "data.max_train_samples=null",
                                  "training.max_steps=2", "training.warmup=0", "training.log_every=1",
                                  f"training.output_dir={tmp_path / 'run'}", "logging.progress_bar=false"])
    small["model"]["config"] = dict(TINY_CONFIGS["llama"])
    assert train(from_dict(small)).status == "done"
    logged = read_metrics(tmp_path / "run")
    assert [r["step"] for r in logged] == [1, 2] and all("rewards/margins" in r for r in logged)
