"""peftkit.unpad: with the encoder's linear layers (and adapters) on the attended positions only, a padded batch's
loss and every adapter and head gradient equal the padded forward's to round-off in fp64, for BERT, RoBERTa and
DeBERTa-v2 (relative attention through the shared key projection); the layers do see fewer rows; and a model whose
output reads padded positions is detected at the start check and left padded."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)
from transformers.modeling_outputs import SequenceClassifierOutput

import peftkit
from peftkit.unpad import unpad_linears_if_exact

SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=97,
             max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
FAMILIES = {
    "bert": lambda: BertForSequenceClassification(BertConfig(**SIZES)),
    "roberta": lambda: RobertaForSequenceClassification(RobertaConfig(**SIZES, pad_token_id=1)),
    "deberta-v2": lambda: DebertaV2ForSequenceClassification(DebertaV2Config(
        **SIZES, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8,
        max_relative_positions=16, share_att_key=True)),
}


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_unpadded_linears_give_the_padded_loss_and_gradients(family):
    torch.manual_seed(0)
    model = peftkit.wrap(FAMILIES[family]().double(), "lora", r=2)
    with torch.no_grad():  # B = 0 at init would leave the gradients w.r.t. A zero
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(5, 97, (4, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for row, length in ((1, 5), (2, 8), (3, 2)):
        mask[row, length:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}
    loss_padded, grads_padded = _loss_and_grads(model, batch)
    unpadding = unpad_linears_if_exact(model)
    assert unpadding is not None
    rows_seen = []
    probe = model.get_submodule(next(n for n, m in model.named_modules() if n.endswith("intermediate.dense")))
    handle = probe.register_forward_pre_hook(lambda m, args: rows_seen.append(args[0].shape[0]))
    # The feed-forward's second linear reads the intermediate activation as rows, never padded in between.
    second = model.get_submodule(next(n for n, m in model.named_modules()
                                      if n.endswith("0.output.dense") and "attention" not in n))
    shapes_seen = []
    handle_second = second.register_forward_pre_hook(lambda m, args: shapes_seen.append(tuple(args[0].shape)))
    loss, grads = _loss_and_grads(model, batch)
    handle.remove()
    handle_second.remove()
    assert rows_seen == [int(mask.sum())]  # 12 + 5 + 8 + 2 real tokens, not 4 x 12 positions
    assert shapes_seen == [(int(mask.sum()), SIZES["intermediate_size"])]
    torch.testing.assert_close(loss, loss_padded, rtol=1e-12, atol=0)
    assert grads.keys() == grads_padded.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_padded[name], rtol=1e-10, atol=1e-14, msg=name)
    unpadding.remove()


class _ReadsPadding(nn.Module):
    """A toy classifier whose logits sum every position, padded ones included: unpadding changes them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.encoder = nn.Sequential(nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids, attention_mask=None):
        return SequenceClassifierOutput(logits=self.head(self.encoder(self.embed(input_ids)).sum(1)))


def test_a_model_that_reads_padded_positions_keeps_its_padded_forward():
    model = _ReadsPadding()
    assert unpad_linears_if_exact(model) is None
    assert not model.encoder[0]._forward_pre_hooks and not model._forward_pre_hooks
