"""training.gradient_checkpointing (issue 29 item 3): ``auto``, the default, checkpoints causal-LM training and not
classification; a checkpointed run trains the plain run's adapter (fp64, dropout in the adapters and the
attention, so the recompute must replay the RNG) through the loop's defaults: padding-free rows, the chunked loss,
DPO's reference forward."""

from __future__ import annotations

import pytest
import torch
from train_fixtures import (
    TINY_CONFIGS,
    adapter_tensors,
    classification_rows,
    llama_chat_recipe,
    llama_preference_recipe,
    read_metrics,
    write_jsonl,
)

from peftkit.errors import ConfigError
from peftkit.train import from_dict, run_setup, train
from peftkit.train.loop import prepare


def _fp64_with_dropout(recipe: dict) -> dict:
    recipe["model"].update(dtype="float64", config=dict(recipe["model"]["config"], attention_dropout=0.2))
    recipe["adapter"]["dropout"] = 0.2
    recipe["training"].update(max_steps=2, warmup=1, batch_size=2)
    recipe["data"].pop("eval")
    return recipe


def _checkpointed(model) -> bool:
    return bool(getattr(model, "is_gradient_checkpointing", False))


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("make", [llama_chat_recipe, llama_preference_recipe], ids=["sft", "dpo"])
def test_a_checkpointed_run_trains_the_plain_runs_adapter(tmp_path, make, reentrant, monkeypatch):
    # One process picks the reentrant variant; several processes (and zero2) the non-reentrant one: both here.
    monkeypatch.setattr(run_setup, "reentrant_checkpointing", lambda *args: reentrant)
    runs = {}
    for setting in (False, "auto"):
        recipe = _fp64_with_dropout(make(tmp_path / str(setting)))
        if setting is False:
            recipe["training"]["gradient_checkpointing"] = False
        assert train(from_dict(recipe)).status == "done"
        runs[setting] = tmp_path / str(setting) / "run"
    plain, checked = (adapter_tensors(runs[s]) for s in (False, "auto"))
    losses = {s: [r["loss"] for r in read_metrics(runs[s]) if "loss" in r] for s in runs}
    assert len(losses[False]) == 2 and losses[False] == pytest.approx(losses["auto"], rel=1e-12, abs=0)
    assert plain.keys() == checked.keys() and plain
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], rtol=1e-10, atol=1e-12)
    moved = max(float(t.abs().max()) for n, t in plain.items() if "lora_B" in n)
    assert moved > 1e-4  # LoRA's B starts at zero: equal tensors are trained ones, not two untouched inits


def _variant(model) -> bool:
    """Whether the model's layers checkpoint through run_setup.checkpoint_layer (reentrant where exact)."""
    return model.model.layers[0]._gradient_checkpointing_func is run_setup.checkpoint_layer


def test_auto_checkpoints_causal_lm_training_and_not_classification(tmp_path):
    chat = prepare(from_dict(llama_chat_recipe(tmp_path / "chat")))
    assert _checkpointed(chat.model) and chat.padding_free
    assert _variant(chat.model) is True  # one process: reentrant
    recipe = chat.recipe
    assert run_setup.reentrant_checkpointing(recipe, "ddp", 1)
    assert not run_setup.reentrant_checkpointing(recipe, "ddp", 2)  # DDP's hooks: non-reentrant
    assert not run_setup.reentrant_checkpointing(recipe, "zero2", 1)
    off = llama_chat_recipe(tmp_path / "off")
    off["training"]["gradient_checkpointing"] = False
    assert not _checkpointed(prepare(from_dict(off)).model)
    rows = write_jsonl(tmp_path / "data" / "cls.jsonl", classification_rows(16))
    classify = {"model": {"config": dict(TINY_CONFIGS["roberta"]), "tokenizer": "bytes",
                          "task": "sequence-classification"},
                "data": {"train": rows, "format": "classification", "max_length": 32},
                "training": {"max_steps": 1, "output_dir": str(tmp_path / "cls" / "run")},
                "logging": {"progress_bar": False}}
    assert not _checkpointed(prepare(from_dict(classify)).model)
    classify["training"]["gradient_checkpointing"] = True  # asked for: honoured whatever the task
    assert _checkpointed(prepare(from_dict(classify)).model)


def test_a_bad_gradient_checkpointing_value_names_the_key(tmp_path):
    recipe = llama_chat_recipe(tmp_path)
    recipe["training"]["gradient_checkpointing"] = "sometimes"
    with pytest.raises(ConfigError, match=r"training\.gradient_checkpointing: expected one of true, false, 'auto'"):
        from_dict(recipe)


def test_a_layer_call_is_reentrant_only_where_that_gives_the_same_gradients(monkeypatch):
    """checkpoint_layer: reentrant when a positional input requires grad and no bound keyword tensor does; else
    non-reentrant, where torch's reentrant variant would give the layer's weights no gradient at all."""
    import functools

    import torch.utils.checkpoint as torch_checkpoint

    used = []
    original = torch_checkpoint.checkpoint
    monkeypatch.setattr(torch_checkpoint, "checkpoint",
                        lambda *args, use_reentrant, **kw: used.append(use_reentrant) or original(
                            *args, use_reentrant=use_reentrant, **kw))
    weight = torch.nn.Parameter(torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64))
    scale_source = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def layer(x, scale=None):
        return torch.tanh(x @ weight.T) * (1.0 if scale is None else scale)

    x = torch.tensor([[1.0, 2.0], [-0.5, 0.3]], dtype=torch.float64)
    cases = [(x.clone().requires_grad_(), None, True),  # the usual case: the hidden states need a gradient
             (x.clone(), None, False),  # nothing positional needs one (the reentrant backward never runs)
             (x.clone().requires_grad_(), "scale", False)]  # a bound keyword tensor needs one
    for inputs, keyword, reentrant in cases:
        for p in (weight, scale_source):
            p.grad = None
        def bound():  # the keyword tensor made anew for each call (its graph is freed by each backward)
            return functools.partial(layer, scale=scale_source * 2) if keyword else layer

        expected = torch.autograd.grad(bound()(inputs).sum(), [weight, scale_source], allow_unused=True)
        used.clear()
        run_setup.checkpoint_layer(bound(), inputs).sum().backward()
        assert used == [reentrant]
        assert weight.grad is not None
        torch.testing.assert_close(weight.grad, expected[0], rtol=1e-12, atol=0)
        if keyword:
            torch.testing.assert_close(scale_source.grad, expected[1], rtol=1e-12, atol=0)
    # What the fallback avoids: torch's reentrant variant with no positional input needing a gradient.
    with pytest.warns(UserWarning):
        assert not original(layer, x.clone(), use_reentrant=True).requires_grad  # no path back to the weight


@pytest.mark.parametrize("method", ["lora-ga", "lora-one", "eva"])
def test_data_driven_inits_under_checkpointing_equal_the_plain_init(tmp_path, method, monkeypatch):
    """The inits run after checkpointing is on (prepare): their hooks see each checkpointed layer twice in the
    reentrant variant (the no-grad forward, then the recompute), and must count it once. Chat answers of different
    lengths, fp64, attention dropout 0.2: the init with checkpointing (either variant) equals the one without."""
    inits = {}
    for setting in (False, True, "reentrant"):
        monkeypatch.setattr(run_setup, "reentrant_checkpointing", lambda *args, on=setting == "reentrant": on)
        recipe = _fp64_with_dropout(llama_chat_recipe(tmp_path / str(setting)))
        recipe["adapter"].update(method=method, init_batches=2, dropout=0.0)
        recipe["training"]["gradient_checkpointing"] = setting is not False
        run = prepare(from_dict(recipe))
        assert _checkpointed(run.model) is (setting is not False)
        inits[setting] = {n: t.detach().clone() for n, t in run.model.state_dict().items() if ".adapters." in n}
    assert inits[False] and any(float(t.abs().max()) > 0 for n, t in inits[False].items() if "lora_B" in n
                                or method == "eva")
    for setting in (True, "reentrant"):
        assert inits[setting].keys() == inits[False].keys()
        for name, value in inits[False].items():
            torch.testing.assert_close(inits[setting][name], value, rtol=1e-10, atol=1e-12, msg=f"{setting} {name}")
