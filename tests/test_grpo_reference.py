"""Issue 28 item 2: TRL's GRPOTrainer with a peftkit model and no reference copy. ``peftkit.reference_free_trainer``
builds it so that TRL loads nothing (its copy would be ``create_model_from_path(name_or_path)``), and the KL
term's reference log-probabilities are the base model's: the policy with its adapters off."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import tiny_llama

import peftkit
from peftkit.integrations import ReferenceModel


def _length_reward(completions, **kwargs):
    """A tiny reward: shorter completions are better."""
    return [-float(len(c)) for c in completions]


def test_grpo_trains_against_the_adapters_off_reference_without_a_copy(tmp_path, monkeypatch):
    import trl.trainer.grpo_trainer as grpo
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from peftkit.train.data import byte_tokenizer

    def no_copy(*args, **kwargs):
        raise AssertionError("TRL loaded a reference copy of the base")

    monkeypatch.setattr(grpo, "create_model_from_path", no_copy)
    model = peftkit.wrap(tiny_llama(vocab_size=259), "lora", r=4)
    with torch.no_grad():  # the policy differs from the base: the KL term and the reference are not trivial
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=6, max_steps=2, beta=0.2, logging_steps=1, report_to=[], use_cpu=True,
                      disable_tqdm=True, save_strategy="no", learning_rate=1e-3)
    prompts = Dataset.from_dict({"prompt": [f"count {n}:" for n in range(8)]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = peftkit.reference_free_trainer(GRPOTrainer, model, args, reward_funcs=_length_reward,
                                                 train_dataset=prompts, processing_class=byte_tokenizer())
    assert isinstance(trainer.ref_model, ReferenceModel) and trainer.beta == 0.2 and args.beta == 0.2
    assert sum(p.numel() for p in trainer.ref_model.parameters()) == 0  # no copy, no parameters of its own

    # The reference's per-token log-probs are the base model's, both through TRL's own function and fused head
    # (which TRL adds to the base the way it adds it to a reference copy).
    from trl.trainer.utils import add_fused_lm_head

    base = tiny_llama(vocab_size=259)
    add_fused_lm_head(base, temperature=trainer.temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
    ids = torch.tensor([[5, 70, 80, 90, 100, 110, 120, 3]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, mask, 4, batch_size=1)
        policy, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 4, batch_size=1)
        expected, _, _ = trainer._get_per_token_logps_and_entropies(base, ids, mask, 4, batch_size=1)
        by_hand = base(ids).logits[:, -5:-1].float().log_softmax(-1).gather(2, ids[:, -4:, None]).squeeze(-1)
    torch.testing.assert_close(ref, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ref, by_hand, rtol=1e-3, atol=1e-3)  # TRL's kernel sums in its own order
    assert (policy - expected).abs().max() > 1e-2  # the policy is not the reference

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    logged = [r for r in trainer.state.log_history if "kl" in r]
    assert logged and all(r["kl"] > 0 for r in logged)  # the KL term ran, against a reference != the policy
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():  # after training the reference is still the base
        ref_after, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, mask, 4, batch_size=1)
    torch.testing.assert_close(ref_after, expected, rtol=1e-5, atol=1e-5)


def test_dpo_trainer_gets_the_reference_as_its_ref_model(tmp_path):
    from test_preference import _pairs_dataset
    from trl import DPOConfig, DPOTrainer

    from peftkit.train.data import byte_tokenizer

    model = peftkit.wrap(tiny_llama(vocab_size=259), "lora", r=4)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True,
                     disable_tqdm=True, save_strategy="no")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = peftkit.reference_free_trainer(DPOTrainer, model, args, train_dataset=_pairs_dataset(),
                                                 processing_class=byte_tokenizer())
    assert isinstance(trainer.ref_model, ReferenceModel) and trainer.ref_model.policy is model


def test_a_following_reference_is_refused(tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), beta=0.1, sync_ref_model=True, report_to=[], use_cpu=True)
    model = peftkit.wrap(tiny_llama(vocab_size=259), "lora", r=4)
    with pytest.raises(peftkit.ConfigError, match="sync_ref_model"):
        peftkit.reference_free_trainer(GRPOTrainer, model, args, reward_funcs=_length_reward)
