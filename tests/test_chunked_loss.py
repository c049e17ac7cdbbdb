"""peftkit.chunked_loss: the fused, chunked head + cross-entropy equals the plain loss (logits, then
cross-entropy summed over the global target count) to round-off in fp64, in value and in the gradients w.r.t.
the hidden states, a trained head (weight and bias), tied embeddings and the adapters; with ignored targets,
chunks that do not divide the rows, and Gemma's final-logit softcapping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import make_batch, tiny_gpt2, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Gemma2Config, Gemma2ForCausalLM

import peftkit
from peftkit.chunked_loss import chunked_linear_cross_entropy, head_of
from peftkit.loss import batch_loss_units, loss_mode, share_of_global_mean


def _plain(hidden, weight, bias, targets, divisor, softcap):
    logits = hidden @ weight.T + (0 if bias is None else bias)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / divisor


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 17), vocab=st.integers(2, 40), chunk=st.integers(1, 9), with_bias=st.booleans(),
       softcap=st.sampled_from([None, 0.7, 30.0]), seed=st.integers(0, 2**16))
def test_the_function_is_the_plain_loss_in_value_and_every_gradient(rows, vocab, chunk, with_bias, softcap, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 6, generator=g, dtype=torch.float64) * 2
    weight = torch.randn(vocab, 6, generator=g, dtype=torch.float64)
    bias = torch.randn(vocab, generator=g, dtype=torch.float64) if with_bias else None
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[torch.rand(rows, generator=g) < 0.3] = -100
    divisor = 23.0
    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    got = chunked_linear_cross_entropy(leaves[0], leaves[1], leaves[2] if with_bias else None, targets, divisor,
                                       softcap, chunk_tokens=chunk)
    (got * 1.7).backward()  # the incoming gradient is not 1 in the loop (process scale, autocast)
    refs = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    expected = _plain(refs[0], refs[1], refs[2] if with_bias else None, targets, divisor, softcap)
    (expected * 1.7).backward()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    for mine, ref in zip(leaves, refs):
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-11, atol=1e-13)


def _prompt_masked(model, seed=0):
    batch = make_batch(model, batch_size=4, seq_len=12, seed=seed)
    for row, prompt in enumerate((2, 9, 5, 12)):
        batch["labels"][row, :prompt] = -100
    return batch


def _loss_and_grads(model, batch, mode, total=40):
    model.zero_grad(set_to_none=True)
    loss = share_of_global_mean(model, batch, batch_loss_units(model, batch), total, mode)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _gemma2(dtype=torch.float64):
    torch.manual_seed(0)
    cfg = Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, vocab_size=128, max_position_embeddings=64,
                       final_logit_softcapping=0.5, attn_logit_softcapping=50.0, sliding_window=8)
    return Gemma2ForCausalLM(cfg).to(dtype)


@pytest.mark.parametrize("case", ["lora", "trained_head", "tied_trained", "gpt2_tied", "gemma2_softcap"])
def test_the_chunked_mode_is_the_summed_mode_on_a_model(case):
    if case == "gpt2_tied":
        model = peftkit.wrap(tiny_gpt2(dtype=torch.float64), "lora", r=2)
    elif case == "gemma2_softcap":
        model = peftkit.wrap(_gemma2(), "lora", r=2, target_modules=["q_proj", "v_proj"])
    else:
        model = peftkit.wrap(tiny_llama(dtype=torch.float64, tie_word_embeddings=case == "tied_trained"), "lora",
                             r=2)
    peftkit_layers = [p for n, p in model.named_parameters() if p.requires_grad]
    assert peftkit_layers
    with torch.no_grad():  # B = 0 at init would leave the adapters' gradients w.r.t. A zero
        for p in peftkit_layers:
            p.add_(torch.randn_like(p) * 0.1)
    if case in ("trained_head", "tied_trained"):
        model.get_output_embeddings().weight.requires_grad_(True)
    assert loss_mode(model, causal_lm=True, chunked=True) == "chunked"
    batch = _prompt_masked(model)
    if case == "gemma2_softcap":
        assert head_of(model)[2] == 0.5  # a cap small enough that the logits are bent
    got, got_grads = _loss_and_grads(model, batch, "chunked")
    expected, expected_grads = _loss_and_grads(model, batch, "summed")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert got_grads.keys() == expected_grads.keys()
    for name in got_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-10, atol=1e-13, msg=name)


def test_a_head_that_is_not_a_plain_linear_keeps_the_models_own_loss():
    model = peftkit.wrap(tiny_llama(), "lora", r=2, target_modules=["q_proj", "lm_head"])
    assert head_of(model) is None
    assert loss_mode(model, causal_lm=True, chunked=True) == "item_count"
    scaled = tiny_llama()
    scaled.config.logit_scale = 0.5  # Cohere-style logit scaling is not lm_head + cross-entropy
    assert loss_mode(scaled, causal_lm=True, chunked=True) == "item_count"
    assert loss_mode(tiny_llama(), causal_lm=True, chunked=False) == "item_count"
    assert loss_mode(tiny_llama(), causal_lm=True, chunked=True) == "chunked"


def test_the_default_chunk_is_sized_by_bytes_so_a_wide_vocabulary_holds_no_more_logits(monkeypatch):
    """Chunks hold at most CHUNK_LOGITS_BYTES of logits: 1,024 rows at a narrow head, far fewer at Gemma-3's
    262,144-wide one (1 GiB of fp32 logits per 1,024 rows); the default-sized loss equals the plain one."""
    from peftkit import chunked_loss

    assert chunked_loss.chunk_rows(torch.zeros(1, 8), torch.zeros(32_000, 8)) == 524
    assert chunked_loss.chunk_rows(torch.zeros(1, 8), torch.zeros(262_144, 8)) == 64
    assert chunked_loss.chunk_rows(torch.zeros(1, 8, dtype=torch.float64), torch.zeros(262_144, 8)) == 32
    assert chunked_loss.chunk_rows(torch.zeros(1, 8), torch.zeros(100, 8)) == chunked_loss.DEFAULT_CHUNK_TOKENS
    # A budget of 3 rows of a 40-wide head: the default runs 7 chunks over 20 rows, and still equals the plain loss.
    monkeypatch.setattr(chunked_loss, "CHUNK_LOGITS_BYTES", 3 * 40 * 8)
    seen = []
    original = chunked_loss.ChunkedLinearCrossEntropy.apply
    monkeypatch.setattr(chunked_loss.ChunkedLinearCrossEntropy, "apply",
                        lambda *args: seen.append(args[-1]) or original(*args))
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(20, 6, generator=g, dtype=torch.float64), torch.randn(40, 6, generator=g,
                                                                                         dtype=torch.float64)
    targets = torch.randint(0, 40, (20,), generator=g)
    got = chunked_linear_cross_entropy(hidden, weight, None, targets, 20.0)
    assert seen == [3]
    torch.testing.assert_close(got, _plain(hidden, weight, None, targets, 20.0, None), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("with_grad", [True, False])
def test_one_chunk_of_logits_is_alive_at_a_time(with_grad):
    """The peak is one (rows, V) array: a chunk's logits (worked on in place up to its gradient) are freed before
    the next chunk's are computed (two alive at once cost Gemma-3's run 64 MiB of peak RSS)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    vocab, chunk = 40, 3

    class WideArrays(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.alive, self.most = [], 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[-1] == vocab and out.shape[0] <= chunk:
                self.alive = [ref for ref in self.alive if ref() is not None and ref() is not out]
                self.alive.append(weakref.ref(out))
                self.most = max(self.most, len(self.alive))
            return out

    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(20, 6, generator=g, dtype=torch.float64, requires_grad=with_grad)
    weight = torch.randn(vocab, 6, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (20,), generator=g)
    arrays = WideArrays()
    with arrays, torch.set_grad_enabled(with_grad):
        got = chunked_linear_cross_entropy(hidden, weight, None, targets, 20.0, chunk_tokens=chunk)
    assert arrays.most == 1
    torch.testing.assert_close(got, _plain(hidden, weight, None, targets, 20.0, None), rtol=1e-12, atol=1e-14)
