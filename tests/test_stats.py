"""peftkit.stats: hook gradients equal autograd's, weighted means, the sketch SVD, the incremental PCA, the
sign convention, and the data errors of the data-driven inits."""

from __future__ import annotations

import pytest
import torch
from helpers import make_batches, tiny_gpt2, tiny_llama
from inits_fixtures import LinearToy

import peftkit
from peftkit.errors import ConfigError
from peftkit.gradient_passes import gradient_triplets
from peftkit.inject import adapter_layers
from peftkit.linalg import IncrementalPCA, sign_fix, signed_svd
from peftkit.stats import gradient_statistics


def _autograd_weight_grads(model, batches, weights):
    """Σ_b w_b ∂L_b/∂W / Σ w_b for every linear weight, via weight.grad on a plain model in train mode."""
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    total = sum(weights)
    for batch, w in zip(batches, weights):
        (model(**batch).loss * (w / total)).backward()
    return model


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_hook_gradient_equals_autograd_of_the_token_mean(factory):
    """G is the gradient of the mean over every target token of all batches (the training step's loss), not a
    mean of batch means weighted by examples: answers of different lengths (labels -100 on each row's prompt)."""
    batches = make_batches(factory(dtype=torch.float64) if factory is tiny_llama else factory(), n=2) + \
        make_batches(factory(), n=1, batch_size=5, seed=7)  # uneven batch sizes
    for b, batch in enumerate(batches):
        for row in range(batch["labels"].shape[0]):
            batch["labels"][row, : 1 + (3 * b + row) % 6] = -100  # prompts of 1 to 6 tokens
    targets = [int((batch["labels"][:, 1:] != -100).sum()) for batch in batches]
    assert len({t / batch["labels"].shape[0] for t, batch in zip(targets, batches)}) > 1  # per example: unequal
    reference = _autograd_weight_grads(factory(dtype=torch.float64), batches, targets)
    model = peftkit.wrap(factory(dtype=torch.float64), "lora", r=2)
    layers = adapter_layers(model)
    stats = gradient_statistics(model, layers, batches)
    modules = dict(reference.named_modules())
    assert sorted(stats) == sorted(layers) and len(layers) >= 7  # every adapted layer, not some of them
    for name, g in stats.items():
        expected = modules[name].weight.grad
        expected = expected.t() if factory is tiny_gpt2 else expected  # Conv1D stores (in, out)
        # fp64 model, but Llama's softmax runs in fp32: the loss weighting before/after backward rounds apart.
        torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    assert not model.training  # modes restored


def test_one_pass_stream_gives_the_exact_signed_triplets_of_a_low_rank_gradient():
    """The default sketch's triplets (one pass: the stream's own top triplets, signed as the exact SVD) on a G of
    rank 6 below the stream's rank: the exact SVD's signed factors, not only their spans; of −G with negate."""
    model = peftkit.wrap(LinearToy(40, 60), "lora", r=2)
    layers = adapter_layers(model)
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    batches = [{"x": torch.randn(32, 6, generator=gen, dtype=torch.float64) @ mix,
                "target": torch.randn(32, 60, generator=gen, dtype=torch.float64)} for _ in range(3)]
    g = gradient_statistics(model, layers, batches)["lin"]
    options = {"gradient_sketch": 16, "sketch_passes": 1, "gradient_groups": None, "gradient_memory": "auto",
               "gradient_device": "model", "svd": "auto", "svd_iterations": 8, "svd_tolerance": None}
    for negate in (False, True):
        [(_, u, s, vh)] = list(gradient_triplets(model, layers, batches, {"lin": 6}, options, negate=negate))
        ue, se, vhe = signed_svd(-g if negate else g)
        torch.testing.assert_close(s, se[:6], rtol=1e-10, atol=0)
        torch.testing.assert_close(u, ue[:, :6], rtol=0, atol=1e-9)
        torch.testing.assert_close(vh, vhe[:6], rtol=0, atol=1e-9)


def test_signed_svd_sign_convention():
    """Each pair's sign is fixed by the largest-|·| entry of uᵢ being positive, whatever signs LAPACK returns: so
    −G gives the same U and −Vh, and any ±1 flip of the pairs is undone by sign_fix."""
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(9, 7, generator=gen, dtype=torch.float64)
    u, s, vh = signed_svd(g)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, g)
    columns = torch.arange(7)
    assert (u[u.abs().argmax(0), columns] > 0).all()
    u2, s2, vh2 = signed_svd(-g)
    torch.testing.assert_close(s2, s)
    torch.testing.assert_close(u2, u)  # the singular values are distinct: each pair is unique up to its sign
    torch.testing.assert_close(vh2, -vh)
    flips = torch.tensor([1.0, -1, -1, 1, -1, 1, -1], dtype=torch.float64)  # both signs, in every other pair
    u3, vh3 = sign_fix(u * flips, vh * flips[:, None])
    torch.testing.assert_close(u3, u, rtol=0, atol=0)
    torch.testing.assert_close(vh3, vh, rtol=0, atol=0)


def test_incremental_pca_equals_pca_of_all_rows():
    gen = torch.Generator().manual_seed(2)
    d = 10
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen))[0]
    data = (torch.randn(600, d, generator=gen) * torch.linspace(3, 0.1, d)) @ basis.t() + 5.0
    pca = IncrementalPCA(d)  # k = d: the incremental update is exact
    for chunk in data.split(150):
        pca.partial_fit(chunk)
    centred = (data - data.mean(0)).double()
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    torch.testing.assert_close(pca.singular_values.double(), s, rtol=1e-4, atol=1e-4)
    cos = (pca.components.double() * vh).sum(1).abs()
    assert cos[:8].min() > 1 - 1e-4
    torch.testing.assert_close(pca.explained_variance_ratio, s ** 2 / (centred ** 2).sum(), rtol=1e-4, atol=0)


def test_short_wide_svd_matches_lapack():
    from peftkit.linalg import _short_wide_svd

    gen = torch.Generator().manual_seed(3)
    for m, d, dtype in ((40, 300, torch.float64), (273, 576, torch.float32), (17, 1536, torch.float64)):
        z = torch.randn(m, d, generator=gen, dtype=torch.float64) * torch.linspace(4, 0.01, d, dtype=torch.float64)
        z = z.to(dtype)
        s, vh = _short_wide_svd(z, 12)
        _, s_ref, vh_ref = torch.linalg.svd(z.double(), full_matrices=False)
        assert s.dtype == vh.dtype == dtype and s.shape == (12,) and vh.shape == (12, d)
        torch.testing.assert_close(s.double(), s_ref[:12], rtol=1e-5, atol=0)
        cos = (vh.double() * vh_ref[:12]).sum(1).abs()  # a singular vector's sign is free
        assert cos.min() > 1 - 1e-6


def test_incremental_pca_short_wide_batches_equal_pca_of_all_rows():
    # EVA's case: batches with fewer rows than features take the Gram-matrix path after the first.
    gen = torch.Generator().manual_seed(4)
    d, k = 64, 6
    data = torch.randn(240, d,
                       generator=gen) * torch.cat([torch.tensor([9.0, 7, 5, 4, 3, 2.5]), torch.full((d - 6,), 0.2)])
    pca = IncrementalPCA(k)
    for chunk in data.split(40):
        pca.partial_fit(chunk)
    _, s, vh = torch.linalg.svd((data - data.mean(0)).double(), full_matrices=False)
    cos = (pca.components.double() * vh[:k]).sum(1).abs()
    assert cos.min() > 0.99
    torch.testing.assert_close(pca.singular_values.double(), s[:k], rtol=2e-2, atol=0)


@pytest.mark.parametrize("method", ["lora-ga", "lora-one", "eva"])
def test_data_errors_are_clear_and_leave_the_model_unwrapped(method):
    model = tiny_llama()
    batch = make_batches(model, n=1)[0]
    cases = [(None, "pass data="), ([], "is empty"), (batch, "single batch"), (torch.ones(2, 3), "iterable of batches"),
             ([torch.ones(2, 3)], "expected a dict of tensors")]
    for data, message in cases:
        with pytest.raises(ConfigError, match=message):
            peftkit.wrap(model, method, data=data)
        assert not adapter_layers(model) and "peftkit" not in model.__dict__
    if method != "eva":
        no_labels = [{k: v for k, v in batch.items() if k != "labels"}]
        with pytest.raises(ConfigError, match="no loss"):
            peftkit.wrap(model, method, data=no_labels)
        assert not adapter_layers(model)
