"""Issue 28 item 3: the preference objectives. DPO's loss equals TRL 1.16's DPOTrainer loss on the same batch
(fp64, reference = the same model with its adapters off), SimPO against its formula, and the loss unit (the
mean over the global batch's pairs) independent of the split into micro-batches."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import tiny_llama

import peftkit
from peftkit.preference import completion_logps, pair_loss_share, pair_losses


def _policy(seed: int = 0):
    torch.manual_seed(seed)
    model = peftkit.wrap(tiny_llama(vocab_size=259).double(), "lora", r=4)
    with torch.no_grad():  # B != 0: the policy differs from its reference
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def _pairs_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"is {n} even?" for n in range(8)],
                              "chosen": [" yes" if n % 2 == 0 else " no, it is odd" for n in range(8)],
                              "rejected": [" no" if n % 2 == 0 else " yes it is" for n in range(8)]})


def _fp64_fused_forward(model, reference: bool):
    """TRL's fused LM head returns float32 log-probs whatever the model's dtype: for an fp64 comparison of the
    loss, the patched forward returns the same fields computed from the fp64 logits (the log-probs themselves
    are checked against TRL's kernel below, at fp32 round-off)."""
    from trl.trainer.utils import FusedCausalLMOutput

    def forward(input_ids=None, attention_mask=None, labels=None, fused_lm_head=False, **kwargs):
        kwargs.pop("use_cache", None)
        if reference:
            with peftkit.disabled(model):
                logits = type(model).forward(model, input_ids=input_ids, attention_mask=attention_mask,
                                             use_cache=False).logits
        else:
            logits = type(model).forward(model, input_ids=input_ids, attention_mask=attention_mask,
                                         use_cache=False).logits
        targets = labels[:, 1:]
        keep = (targets != -100).to(logits.dtype)
        log_softmax = logits[:, :-1].log_softmax(-1)
        log_probs = torch.gather(log_softmax, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
        entropy = -(log_softmax.exp() * log_softmax).sum(-1) * keep
        return FusedCausalLMOutput(loss=None, log_probs=log_probs, entropy=entropy,
                                   mean_logits=logits[:, :-1].mean(-1) * keep,
                                   is_top1=(logits[:, :-1].argmax(-1) == targets) & keep.bool())
    return forward


def test_dpo_loss_equals_trl_dpo_trainer_loss_in_fp64(tmp_path):
    from trl import DPOConfig, DPOTrainer

    from peftkit.train.data import byte_tokenizer

    model = _policy()
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, beta=0.3, report_to=[],
                     use_cpu=True, disable_tqdm=True, save_strategy="no")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=model, ref_model=peftkit.reference_model(model), args=args,
                             train_dataset=_pairs_dataset(), processing_class=byte_tokenizer())
    inputs = next(iter(trainer.get_train_dataloader()))
    model.eval()  # no dropout: both sides see the same function
    batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    with torch.no_grad():
        losses, stats = pair_losses(model, batch, "dpo", beta=0.3)
        # TRL's own kernel (float32 log-probs): equal to fp32 round-off
        trl_fp32 = trainer.compute_loss(model, inputs).item()
        model.forward = _fp64_fused_forward(model, reference=False)
        trainer.ref_model.forward = _fp64_fused_forward(model, reference=True)
        theirs = trainer.compute_loss(model, inputs)
    assert theirs.dtype == torch.float64
    assert abs(losses.mean().item() - theirs.item()) <= 1e-6, (losses.mean().item(), theirs.item())
    assert abs(losses.mean().item() - trl_fp32) <= 1e-3
    assert abs(losses.mean().item() - math.log(2)) > 1e-3  # the policy is not the reference: a real comparison
    logged = trainer._metrics["eval"]  # the model is in eval mode (no dropout)
    assert logged["rewards/accuracies"][-1] == pytest.approx((stats.chosen_rewards > stats.rejected_rewards)
                                                             .double().mean().item(), abs=1e-9)
    assert logged["rewards/margins"][-1] == pytest.approx((stats.chosen_rewards - stats.rejected_rewards)
                                                          .mean().item(), abs=1e-9)


def test_completion_logps_by_hand():
    logits = torch.randn(1, 4, 5, dtype=torch.float64)
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1]])
    total, count = completion_logps(logits, ids, mask)
    expected = logits[0, 1].log_softmax(-1)[3] + logits[0, 2].log_softmax(-1)[4]
    assert count.item() == 2 and abs(total.item() - expected.item()) < 1e-12


def _batch(rows: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    """(token ids, prompt length) rows, right-padded; chosen rows first, then rejected."""
    width = max(len(ids) for ids, _ in rows)
    out = {k: torch.zeros(len(rows), width,
                          dtype=torch.long) for k in ("input_ids", "attention_mask", "completion_mask")}
    for i, (ids, prompt) in enumerate(rows):
        out["input_ids"][i, :len(ids)] = torch.tensor(ids)
        out["attention_mask"][i, :len(ids)] = 1
        out["completion_mask"][i, prompt:len(ids)] = 1
    return out


def test_simpo_loss_by_hand_and_the_pair_mean_is_split_independent():
    model = _policy(1)
    model.eval()
    g = torch.Generator().manual_seed(0)
    pairs = []
    for n in range(4):  # completions of different lengths
        prompt = torch.randint(3, 200, (3,), generator=g).tolist()
        pairs.append((prompt + torch.randint(3, 200, (1 + n,), generator=g).tolist(),
                      prompt + torch.randint(3, 200, (4 - n,), generator=g).tolist()))
    whole = _batch([(c, 3) for c, _ in pairs] + [(r, 3) for _, r in pairs])
    beta, gamma = 2.0, 0.5
    with torch.no_grad():
        losses, _ = pair_losses(model, whole, "simpo", beta, gamma)
        for i, (c, r) in enumerate(pairs):  # one pair at a time, unpadded, from the formula
            lc, nc = completion_logps(model(torch.tensor([c])).logits, torch.tensor([c]),
                                      torch.tensor([[0] * 3 + [1] * (len(c) - 3)]))
            lr, nr = completion_logps(model(torch.tensor([r])).logits, torch.tensor([r]),
                                      torch.tensor([[0] * 3 + [1] * (len(r) - 3)]))
            expected = -math.log(1 / (1 + math.exp(-(beta * (lc.item() / nc.item() - lr.item() / nr.item()) - gamma))))
            assert abs(losses[i].item() - expected) < 1e-9
        for objective in ("dpo", "simpo"):
            one, _ = pair_loss_share(model, whole, 4, objective, beta, gamma)
            halves = sum(pair_loss_share(model,
                                         _batch([(pairs[i][0], 3) for i in part] + [(pairs[i][1], 3) for i in part]),
                                         4, objective, beta, gamma)[0] for part in ([0, 1], [2, 3]))
            assert abs(one.item() - halves.item()) < 1e-12


def test_the_dpo_reference_runs_without_dropout_and_the_policy_keeps_its_mode():
    """The reference is the frozen base: it runs in eval mode (no dropout, as TRL's reference model), the policy in
    the mode the loop set; the model is left in that mode."""
    model = _policy(1)
    model.train()
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append((module.training, torch.is_grad_enabled())))
    batch = _batch([([5, 6, 7, 8], 2), ([5, 6, 9], 2)])
    pair_losses(model, batch, "dpo", beta=0.1, chunked=False)
    assert modes == [(False, False), (True, True)], modes  # reference (no grad, eval), then the policy
    assert model.training
