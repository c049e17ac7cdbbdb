"""Bounded-memory gradient inits (peftkit.stats.gradient_triplets): layer groups, one pass each, give the very same
factors as all layers at once (fp64, bit-equal), dropout masks included; the group planner; the randomized
truncated solver against the exact SVD; the option errors."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.errors import ConfigError
from peftkit.inject import adapter_layers
from peftkit.stats import gradient_bytes, plan_groups, randomized_svd, signed_svd, solver_for, subspace_cosines

from helpers import make_batches, tiny_gpt2, tiny_llama


def _factors(model) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.detach().clone() for name, layer in adapter_layers(model).items()
            for key, value in layer.adapters["default"].state_dict().items()}


def _wrap(factory, method, **options):
    torch.manual_seed(5)  # the wrap's RNG: dropout masks of the passes, LoRA-GA's random split
    model = factory(dtype=torch.float64)
    return peftkit.wrap(model, method, r=2, data=make_batches(model, n=3), **options)


@pytest.mark.parametrize("method,options", [
    ("lora-ga", {}), ("lora-ga", {"direction": "random"}), ("lora-one", {}),
    ("lora-ga", {"svd": "randomized"}), ("lora-one", {"svd": "randomized"}),
], ids=["ga", "ga-random-split", "one", "ga-randomized", "one-randomized"])
def test_groups_give_bit_equal_factors_fp64(method, options):
    # attention dropout on: every pass must draw the masks of the single pass
    factory = lambda dtype: tiny_llama(dtype=dtype, attention_dropout=0.3)  # noqa: E731
    reference = _factors(_wrap(factory, method, gradient_groups=1, **options))
    assert sum(key.endswith("lora_A.weight") for key in reference) == 14
    for grouping in ({"gradient_groups": 3}, {"gradient_memory": 1e-6}):  # 3 groups; one layer per group
        got = _factors(_wrap(factory, method, **grouping, **options))
        assert got.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=f"{grouping} {key}")


def test_groups_on_conv1d_and_cpu_store_keep_the_function():
    batches = make_batches(tiny_gpt2(), n=2)
    reference = peftkit.wrap(tiny_gpt2(dtype=torch.float64), "lora-ga", r=2, data=batches, gradient_groups=1)
    grouped = peftkit.wrap(tiny_gpt2(dtype=torch.float64), "lora-ga", r=2, data=batches, gradient_groups=4,
                           gradient_device="cpu")
    a, b = _factors(reference), _factors(grouped)
    for key in a:
        # the CPU store adds each batch's product separately (not fused into addmm): equal to rounding
        torch.testing.assert_close(b[key], a[key], rtol=1e-9, atol=1e-12)


def test_plan_groups_by_count_and_by_budget():
    sizes = {"a": 4, "b": 4, "c": 8, "d": 2, "e": 2}
    assert plan_groups(sizes) == [["a", "b", "c", "d", "e"]]
    assert plan_groups(sizes, budget=8) == [["a", "b"], ["c"], ["d", "e"]]
    assert plan_groups(sizes, budget=3) == [["a"], ["b"], ["c"], ["d"], ["e"]]  # a layer above the budget: alone
    assert plan_groups(sizes, groups=2) == [["a", "b"], ["c", "d", "e"]]  # 8 and 12 bytes
    assert plan_groups(sizes, groups=5) == [["a"], ["b"], ["c"], ["d"], ["e"]]
    assert plan_groups(sizes, groups=9) == [["a"], ["b"], ["c"], ["d"], ["e"]]
    groups = plan_groups({"big": 100, "x": 1, "y": 1}, groups=3)
    assert [n for g in groups for n in g] == ["big", "x", "y"] and len(groups) == 3


def test_memory_budget_bounds_the_group_size():
    model = peftkit.wrap(tiny_llama(), "lora", r=2)
    layers = adapter_layers(model)
    sizes = {n: gradient_bytes(l) for n, l in layers.items()}
    assert sizes["model.layers.0.mlp.down_proj"] == 32 * 48 * 4
    budget = 3 * max(sizes.values())
    groups = plan_groups(sizes, budget=budget)
    assert all(sum(sizes[n] for n in g) <= budget for g in groups) and len(groups) > 1


def test_randomized_svd_matches_the_exact_top_triplets_on_a_decaying_spectrum():
    gen = torch.Generator().manual_seed(0)
    m, n, k = 300, 500, 16
    u = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))[0]
    sigma = 0.8 ** torch.arange(m, dtype=torch.float64)
    g = (u * sigma) @ v.t()
    ru, rs, rvh = randomized_svd(g, k, seed=3)
    eu, es, evh = signed_svd(g)
    assert ru.shape == (m, k) and rs.shape == (k,) and rvh.shape == (k, n)
    torch.testing.assert_close(rs, es[:k], rtol=1e-10, atol=0)
    # the same signed vectors, not only the same spans (the sign convention of the exact path)
    torch.testing.assert_close(ru, eu[:, :k], rtol=0, atol=1e-8)
    torch.testing.assert_close(rvh, evh[:k], rtol=0, atol=1e-8)
    # power iterations matter: none leaves a measurable error on a flatter spectrum
    flat = (u * 0.97 ** torch.arange(m, dtype=torch.float64)) @ v.t()
    exact = signed_svd(flat)[0][:, :k]
    zero = subspace_cosines(randomized_svd(flat, k, iterations=0)[0], exact).min()
    six = subspace_cosines(randomized_svd(flat, k, iterations=6)[0], exact).min()
    assert zero < 0.99 < six, (zero, six)


def test_auto_solver_is_exact_on_small_and_randomized_on_wide_layers():
    assert solver_for("auto", (32, 48), 4) == "exact"
    assert solver_for("auto", (576, 1536), 16) == "randomized"
    assert solver_for("auto", (2048, 5632), 16) == "randomized"
    assert solver_for("exact", (2048, 5632), 16) == "exact"


@pytest.mark.parametrize("option,value", [("gradient_groups", 0), ("gradient_memory", -1), ("gradient_device", "gpu"),
                                          ("svd", "lanczos"), ("svd_iterations", -1)])
def test_bad_gradient_options_name_the_option(option, value):
    model = tiny_llama()
    with pytest.raises(ConfigError, match=option):
        peftkit.wrap(model, "lora-ga", r=2, data=make_batches(model, n=1), **{option: value})
