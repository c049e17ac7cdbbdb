"""Bounded-memory gradient inits (peftkit.stats.gradient_triplets): layer groups, one pass each, give the very same
factors as all layers at once (fp64, bit-equal), dropout masks included; the group planner; the randomized
truncated solver against the exact SVD; the option errors."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.errors import ConfigError
from peftkit.inject import adapter_layers
from peftkit.stats import (checked_svd, gradient_bytes, plan_groups, randomized_svd, signed_svd, solver_for,
                           subspace_cosines, top_singular_triplets)

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


def test_auto_solver_is_exact_on_small_and_checked_on_wide_layers():
    assert solver_for("auto", (32, 48), 4) == "exact"
    assert solver_for("auto", (576, 1536), 16) == "checked"
    assert solver_for("auto", (2048, 5632), 16) == "checked"
    assert solver_for("exact", (2048, 5632), 16) == "exact"
    assert solver_for("randomized", (32, 48), 4) == "randomized"


def _spectrum(sigma: torch.Tensor, m: int = 300, n: int = 500, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))[0]
    return (u * sigma) @ v.t()


def _worst_cos(u, vh, g, k):
    eu, _, evh = signed_svd(g)
    return min(float(subspace_cosines(u, eu[:, :k]).min()), float(subspace_cosines(vh.t(), evh[:k].t()).min()))


def test_checked_svd_certifies_a_decaying_spectrum_and_its_bound_holds():
    m, k = 300, 16
    g = _spectrum(0.9 ** torch.arange(m, dtype=torch.float64))
    report = {}
    u, s, vh = checked_svd(g, k, tolerance=1e-6, seed=1, report=report)
    eu, es, evh = signed_svd(g)
    assert report["certified"] and report["bound"] <= 1e-6 and report["iterations"] >= 2
    torch.testing.assert_close(s, es[:k], rtol=1e-10, atol=0)
    torch.testing.assert_close(u, eu[:, :k], rtol=0, atol=1e-6)  # signed like the exact path
    torch.testing.assert_close(vh, evh[:k], rtol=0, atol=1e-6)
    # a loose tolerance stops earlier, and the true angle is within the certified bound (Wedin)
    report = {}
    u, _, vh = checked_svd(g, k, tolerance=3e-2, seed=1, report=report)
    sin = (1 - _worst_cos(u, vh, g, k) ** 2) ** 0.5
    assert report["certified"] and sin <= report["bound"] <= 3e-2, (sin, report)


@pytest.mark.parametrize("decay", [1.0, 0.999, 0.995, 0.99, 0.97, 0.95])
def test_auto_is_never_silently_wrong_on_flat_spectra(decay):
    # on flat spectra the fixed 8-iteration solver misses the subspace; "auto" either certifies
    # cos >= 0.9995 or falls back to the exact SVD (then bit-equal to it)
    m, k = 300, 16
    g = _spectrum(decay ** torch.arange(m, dtype=torch.float64) * (1 + 1e-3 * torch.rand(m, generator=torch.Generator().manual_seed(2), dtype=torch.float64)).sort(descending=True).values)
    report = {}
    u, s, vh = top_singular_triplets(g, k, "auto", report=report)
    assert report["solver"] in ("checked", "exact (fallback)")
    if report["solver"] == "checked":
        assert report["certified"] and _worst_cos(u, vh, g, k) >= 0.9995
    else:
        eu, es, evh = signed_svd(g)
        assert torch.equal(u, eu[:, :k]) and torch.equal(s, es[:k]) and torch.equal(vh, evh[:k])
    if decay >= 0.995:
        assert report["solver"] == "exact (fallback)"  # no gap to certify in the cost budget
        assert _worst_cos(*randomized_svd(g, k, iterations=8)[::2], g, k) < 0.999  # what "randomized" returns


def test_checked_svd_refuses_a_closed_interior_gap():
    # sigma_r = sigma_{r+1}: the top-2r subspace is well defined, the split of it at r is not
    m, r = 300, 4
    sigma = 0.8 ** torch.arange(m, dtype=torch.float64)
    sigma[r] = sigma[r - 1]
    g = _spectrum(sigma)
    assert checked_svd(g, 2 * r, boundaries=(2 * r,)) is not None
    assert checked_svd(g, 2 * r, boundaries=(r, 2 * r)) is None


def test_lora_ga_auto_on_a_wide_layer_matches_exact_and_peft_compat_stays_exact():
    def build():
        torch.manual_seed(0)
        return tiny_llama(dtype=torch.float64, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=4)

    batches = make_batches(build(), n=2)
    factors = {svd: _factors(peftkit.wrap(build(), "lora-ga", r=2, data=batches, svd=svd, targets=["up_proj"]))
               for svd in ("auto", "exact")}
    name = next(k for k in factors["exact"] if k.endswith("lora_B.weight"))
    assert solver_for("auto", (512, 256), 4) == "checked"
    for key, value in factors["exact"].items():  # certified to sin θ <= 3e-2 (here 7e-3), about 1e-3 in fact
        torch.testing.assert_close(factors["auto"][key], value, rtol=0, atol=1e-2 * float(value.abs().max()), msg=key)
    compat = {svd: _factors(peftkit.wrap(build(), "lora-ga", r=2, data=batches, svd=svd, peft_compat=True,
                                         targets=["up_proj"])) for svd in ("auto", "exact")}
    assert all(torch.equal(compat["auto"][k], v) for k, v in compat["exact"].items()) and name in compat["auto"]
    with pytest.raises(ConfigError, match="svd"):
        peftkit.wrap(build(), "lora-ga", r=2, data=batches, svd="randomized", peft_compat=True)


@pytest.mark.parametrize("option,value", [("gradient_groups", 0), ("gradient_memory", -1), ("gradient_device", "gpu"),
                                          ("svd", "lanczos"), ("svd_iterations", -1), ("svd_tolerance", 0),
                                          ("svd_tolerance", 1.5)])
def test_bad_gradient_options_name_the_option(option, value):
    model = tiny_llama()
    with pytest.raises(ConfigError, match=option):
        peftkit.wrap(model, "lora-ga", r=2, data=make_batches(model, n=1), **{option: value})
