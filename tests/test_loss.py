"""peftkit.loss: a micro-batch's share of the global batch's mean loss, by each of its three ways, equals the
sum of its units' losses over the global count computed by hand; and the summed shares of a split batch equal
the whole batch's mean (the property gradient accumulation and several processes rest on)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import make_batch, tiny_bert, tiny_gpt2, tiny_llama

import peftkit
from peftkit.loss import batch_loss_units, loss_mode, share_of_global_mean, takes_item_count


def _answers_of_different_lengths(model, seed=0):
    batch = make_batch(model, batch_size=4, seq_len=12, seed=seed)
    for row, prompt in enumerate((2, 9, 5, 12)):  # targets: 10, 3, 7 and 0 tokens after the shift
        batch["labels"][row, :prompt] = -100
    return batch


def _by_hand(model, batch, total):
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100,
                           reduction="sum") / total


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_mode_is_the_sum_over_the_global_count(factory, dtype):
    model = peftkit.wrap(factory(dtype=dtype), "lora", r=2)  # the peftkit model keeps transformers' forward
    batch = _answers_of_different_lengths(model)
    local = batch_loss_units(model, batch)
    assert local == 20 and takes_item_count(model)
    assert loss_mode(model, causal_lm=True) == ("summed" if dtype == torch.float64 else "item_count")
    expected = _by_hand(model, batch, 40)
    for mode in ("item_count", "summed", "rescaled"):
        got = share_of_global_mean(model, batch, local, 40, mode)
        # transformers' cross-entropy runs in fp32 whatever the logits: only the summed mode keeps fp64.
        exact = dtype == torch.float64 and mode == "summed"
        torch.testing.assert_close(got.double(), expected, rtol=1e-12 if exact else 2e-6, atol=0, msg=mode)
    got = share_of_global_mean(model, batch, local, 40, "summed")
    assert got.dtype == dtype  # an fp64 model's loss stays fp64 (transformers' own rounds it to fp32)


def test_the_shares_of_a_split_batch_add_up_to_its_mean_and_an_empty_one_adds_zero():
    model = tiny_llama(dtype=torch.float64)
    batch = _answers_of_different_lengths(model, seed=1)
    whole = share_of_global_mean(model, batch, batch_loss_units(model, batch), batch_loss_units(model, batch),
                                 "summed")
    parts = [{k: v[rows] for k, v in batch.items()} for rows in ([0, 1], [2], [3])]
    total = batch_loss_units(model, batch)
    for mode in ("summed", "rescaled"):
        shares = [share_of_global_mean(model, p, batch_loss_units(model, p), total, mode) for p in parts]
        assert batch_loss_units(model, parts[2]) == 0 and float(shares[2]) == 0.0  # no targets: 0, not 0/0
        torch.testing.assert_close(sum(shares), whole, rtol=1e-13 if mode == "summed" else 2e-6, atol=0, msg=mode)
    # A mean of the parts' means is not the batch's loss: the defect a token mean removes.
    means = [model(**p).loss for p in parts[:2]]
    assert abs(float(sum(means) / 2 - whole)) > 1e-3


def test_classification_counts_examples_and_rescales_its_mean():
    model = tiny_bert(dtype=torch.float64)
    batch = make_batch(model, batch_size=3)
    assert batch_loss_units(model, batch) == 3 and loss_mode(model, causal_lm=False) == "rescaled"
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    expected = F.cross_entropy(logits, batch["labels"], reduction="sum") / 8
    torch.testing.assert_close(share_of_global_mean(model, batch, 3, 8, "rescaled"), expected, rtol=1e-13, atol=0)


def test_an_moe_model_with_its_router_loss_keeps_its_own_loss_in_fp64():
    """With ``output_router_logits`` the model's loss adds the router's auxiliary loss, which a cross-entropy
    summed from the logits would drop: such a model keeps its own loss (num_items_in_batch) even in fp64."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=64, num_local_experts=4, num_experts_per_tok=2,
                           output_router_logits=True)
    model = MixtralForCausalLM(config).double()
    assert loss_mode(model, causal_lm=True) == "item_count"
    config.output_router_logits = False
    assert loss_mode(model, causal_lm=True) == "summed"
