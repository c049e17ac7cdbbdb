"""Padding-free causal-LM batches (data.collate with padding_free): the same examples sharing rows with restarting
position ids give the padded batch's summed loss and gradients to round-off in fp64 (Llama's RoPE, GPT-2's learned
positions), with prompt-masked examples of different lengths; and first-fit packing places every example once,
within the longest one's length."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_gpt2, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

import peftkit
from peftkit.loss import IGNORE_INDEX, batch_loss_units, share_of_global_mean
from peftkit.train.data import Tokenized, check_packed_attention, collate, pack_rows


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=24))
def test_pack_rows_places_every_example_once_within_the_longest(lengths):
    rows = pack_rows(lengths, max(lengths))
    assert sorted(k for row in rows for k in row) == list(range(len(lengths)))
    assert all(sum(lengths[k] for k in row) <= max(lengths) for row in rows)
    assert len(rows) <= len(lengths)


def _examples(seed: int, count: int = 7, vocab: int = 97) -> Tokenized:
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(count):
        n = int(torch.randint(2, 15, (), generator=g))
        prompt = int(torch.randint(0, n, (), generator=g))
        row = torch.randint(3, vocab, (n,), generator=g).tolist()
        ids.append(row)
        labels.append([IGNORE_INDEX] * prompt + row[prompt:])
    return Tokenized(ids, labels)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["summed", "chunked"])
def test_a_padding_free_batch_has_the_padded_batchs_loss_and_gradients(factory, mode):
    model = peftkit.wrap(factory(dtype=torch.float64), "lora", r=2)
    model.config.use_cache = False
    assert check_packed_attention(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    examples = _examples(seed=3)
    indices = [4, 0, 6, 2, 5, 1]
    padded = collate(examples, indices, 0, False)
    free = collate(examples, indices, 0, False, padding_free=True)
    assert "attention_mask" not in free and free["input_ids"].numel() < padded["input_ids"].numel()
    assert free["input_ids"].shape[1] <= padded["input_ids"].shape[1]  # no row longer: attention costs no more
    units = batch_loss_units(model, padded)
    assert batch_loss_units(model, free) == units  # the same targets
    results = []
    for batch in (padded, free):
        model.zero_grad(set_to_none=True)
        loss = share_of_global_mean(model, batch, units, 50, mode)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=0)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-14)


def test_packed_examples_and_classification_keep_their_layout():
    examples = _examples(seed=1, count=3)
    examples.position_ids = [list(range(len(x))) for x in examples.input_ids]
    assert torch.equal(collate(examples, [0, 1], 0, False, padding_free=True)["input_ids"],
                       collate(examples, [0, 1], 0, False)["input_ids"])
    pairs = Tokenized([[5, 6, 7], [8]], [0, 1])
    assert "attention_mask" in collate(pairs, [0, 1], 0, True, padding_free=True)


def test_group_by_length_reads_every_example_once_per_epoch_in_batches_of_similar_length():
    import numpy as np

    from peftkit.train.data import GROUP_BATCHES, BatchPlan
    lengths = np.random.default_rng(0).integers(1, 200, size=1000)
    plain = BatchPlan(1000, 4, world_size=2, rank=0, seed=3)
    grouped = [BatchPlan(1000, 4, world_size=2, rank=r, seed=3, lengths=lengths) for r in (0, 1)]
    per_epoch = grouped[0].batches_per_epoch
    for epoch in range(2):
        read = [i for p in range(epoch * per_epoch, (epoch + 1) * per_epoch) for i in grouped[0].global_indices(p)]
        assert len(set(read)) == len(read) == per_epoch * 8
        for start in range(0, per_epoch - GROUP_BATCHES + 1, GROUP_BATCHES):  # sorted within a group
            group = read[start * 8:(start + GROUP_BATCHES) * 8]
            assert all(lengths[a] >= lengths[b] for a, b in zip(group, group[1:]))
    padding = {}
    for name, plan in (("plain", plain), ("grouped", grouped[0])):
        padding[name] = sum(int(lengths[plan.global_indices(p)].max() * 8 - lengths[plan.global_indices(p)].sum())
                            for p in range(per_epoch))
    assert padding["grouped"] < padding["plain"] / 5
    assert grouped[0].indices(7) + grouped[1].indices(7) == grouped[0].global_indices(7)


def test_the_loop_trains_the_same_adapter_with_and_without_the_shortcuts(tmp_path, monkeypatch):
    """A chat run in fp64 with the defaults (padding-free batches, the chunked head + cross-entropy) and with both
    off ends with the same adapter to round-off; the defaults did take the shortcuts."""
    from train_fixtures import adapter_tensors, llama_chat_recipe

    import peftkit.chunked_loss as chunked_loss
    from peftkit.train import batches as data_module
    from peftkit.train.loop import train
    from peftkit.train.recipe import from_dict

    calls = {"chunked": 0, "free": 0}
    original_loss, original_free = chunked_loss.chunked_causal_loss, data_module._collate_padding_free
    monkeypatch.setattr(chunked_loss, "chunked_causal_loss",
                        lambda *a, **k: calls.__setitem__("chunked", calls["chunked"] + 1) or original_loss(*a, **k))
    monkeypatch.setattr(data_module, "_collate_padding_free",
                        lambda *a, **k: calls.__setitem__("free", calls["free"] + 1) or original_free(*a, **k))

    def run(name, shortcuts):
        spec = llama_chat_recipe(tmp_path / name, training__batch_size=4, training__max_steps=3,
                                 training__warmup=0, training__chunked_loss=shortcuts, data__padding_free=shortcuts)
        spec["model"]["dtype"] = "float64"
        assert train(from_dict(spec)).status == "done"
        return tmp_path / name / "run"

    fast = run("fast", True)
    assert calls == {"chunked": 3, "free": 3}
    plain = run("plain", False)
    assert calls == {"chunked": 3, "free": 3}
    a, b = adapter_tensors(fast), adapter_tensors(plain)
    assert any(v.abs().max() > 1e-3 for k, v in a.items() if "lora_B" in k)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-13)
