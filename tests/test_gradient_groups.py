"""Bounded-memory gradient inits (peftkit.gradient_passes.gradient_triplets): layer groups, one pass each, give the
very same factors as all layers at once (fp64, bit-equal), dropout masks included; the group planner; the randomized
truncated solver against the exact SVD; the option errors."""

from __future__ import annotations

import pytest
import torch
from helpers import make_batches, tiny_gpt2, tiny_llama

import peftkit
from peftkit.errors import ConfigError
from peftkit.gradient_passes import gradient_bytes, plan_groups
from peftkit.inject import adapter_layers
from peftkit.linalg import (
    FAST_PATH_MIN,
    checked_svd,
    complement_norm_bound,
    randomized_svd,
    signed_svd,
    solver_for,
    subspace_cosines,
    top_singular_triplets,
)
from peftkit.stats import gradient_statistics


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
    assert solver_for("auto", (384, 1536), 16) == "exact"  # MiniLM: below FAST_PATH_MIN, LAPACK bit for bit
    assert solver_for("auto", (FAST_PATH_MIN - 1, 4096), 16) == "exact"
    assert solver_for("auto", (FAST_PATH_MIN, 4096), 16) == "checked"
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
    noise = torch.rand(m, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g = _spectrum(decay ** torch.arange(m, dtype=torch.float64) * (1 + 1e-3 * noise).sort(descending=True).values)
    report = {}
    u, s, vh = top_singular_triplets(g, k, "checked", tolerance=5e-4, report=report)  # what "auto" runs on wide layers
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
    # The exact path (a 512 × 256 layer is sketched by default: the streamed sketch holds fewer bytes than G there).
    factors = {svd: _factors(peftkit.wrap(build(), "lora-ga", r=2, data=batches, svd=svd, targets=["up_proj"],
                                          gradient_sketch=None)) for svd in ("auto", "exact")}
    name = next(k for k in factors["exact"] if k.endswith("lora_B.weight"))
    assert solver_for("auto", (512, 256), 4) == "exact"  # below FAST_PATH_MIN: the default is LAPACK itself
    assert all(torch.equal(factors["auto"][k], v) for k, v in factors["exact"].items())
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


def _sin(a: torch.Tensor, b: torch.Tensor) -> float:
    """sin of the largest principal angle between span(a) and span(b) (columns), as ‖(I − P_b)·Q_a‖₂: accurate
    down to rounding, where √(1 − cos²) loses everything below 1e-8."""
    qa, qb = torch.linalg.qr(a.double())[0], torch.linalg.qr(b.double())[0]
    return float(torch.linalg.matrix_norm(qa - qb @ (qb.T @ qa), ord=2))


def _blind_start(m: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """G (m, n) whose top-k right singular vectors are orthogonal to the Gaussian start block Ω that checked_svd
    draws from ``seed``, and whose other singular directions lie in span(Ω): the block captures the tail exactly
    (zero residuals) and never sees the top (σ 10 against ≤ 1)."""
    width = k + max(k, 10)
    omega = torch.randn(n, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q_omega = torch.linalg.qr(omega)[0]
    gen = torch.Generator().manual_seed(seed + 1)
    outside = torch.randn(n, k, generator=gen, dtype=torch.float64)
    top = torch.linalg.qr(outside - q_omega @ (q_omega.T @ outside))[0]
    left = torch.linalg.qr(torch.randn(m, k + width, generator=gen, dtype=torch.float64))[0]
    return ((left[:, :k] * (10 * 0.9 ** torch.arange(k, dtype=torch.float64))) @ top.T
            + (left[:, k:] * 0.5 ** torch.arange(width, dtype=torch.float64)) @ q_omega.T)


def test_checked_svd_does_not_certify_a_start_block_blind_to_the_top_directions():
    # Issue 24: the Ritz values of such a block are the tail's, its residuals are zero, and a bound whose
    # σ_{j+1} came from the block certified sin θ ≤ 2e-7 where the true sin θ was 1.0. The independent probe
    # of the complement sees σ₁ = 10 there, so the first iteration is not certified.
    m, n, k = 300, 500, 8
    g = _blind_start(m, n, k)
    exact = signed_svd(g)[0][:, :k]
    report = {}
    assert checked_svd(g, k, tolerance=3e-2, max_iterations=1, seed=0, report=report) is None
    assert not report["certified"] and report["probes"] == 1  # the block's own bound passed; the probe refused
    for dtype in (torch.float64, torch.float32):
        report = {}
        found = checked_svd(g.to(dtype), k, seed=0, report=report)  # full budget, round-off tolerance
        if found is not None:  # rounding lets the power steps find the top later: then it is right
            sin = _sin(found[0], exact)
            # fp32: G itself is rounded, the bound is about the rounded G (LAPACK's fp64 SVD of it as the truth)
            truth = signed_svd(g.to(dtype).double())[0][:, :k]
            assert report["certified"] and _sin(found[0], truth) <= report["bound"] + 1e-12, (dtype, report)
            assert sin <= 1e-5
    # the probe bounds ‖(I − QQᵀ)G‖ from above: here the complement of the block is the top, norm 10
    q_omega = torch.linalg.qr(torch.randn(n, k + 10, generator=torch.Generator().manual_seed(0),
                                          dtype=torch.float64))[0]
    block = torch.linalg.qr(g @ q_omega)[0]
    assert 10.0 <= complement_norm_bound(g, block, seed=123) <= 10.0 * 10


def test_checked_svd_default_tolerance_is_round_off():
    # the default certifies sin θ ≤ 1e-6 (fp32 G) and the factors equal LAPACK's signed ones to round-off
    m, k = 300, 16
    g = _spectrum(0.8 ** torch.arange(m, dtype=torch.float64)).float()
    report = {}
    u, s, vh = checked_svd(g, k, seed=1, report=report)
    assert report["certified"] and report["bound"] <= 1e-6 and u.dtype == torch.float32
    eu, es, evh = signed_svd(g.double())
    torch.testing.assert_close(s.double(), es[:k], rtol=1e-6, atol=0)
    torch.testing.assert_close(u.double(), eu[:, :k], rtol=0, atol=1e-5)
    torch.testing.assert_close(vh.double(), evh[:k], rtol=0, atol=1e-5)


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def _spectra(draw):
    """(G fp64, rank, boundaries, tolerance, seed): random sizes and spectra (geometric decay, power law, flat
    with clusters, gaps at random places, exact ties, rank-deficient tails) and, one time in four, a start
    block blind to the top directions."""
    k = draw(st.integers(1, 6))
    width = k + max(k, 10)
    m = draw(st.integers(width + k, 90))
    n = draw(st.integers(max(m, 2 * width + k), 110))  # m ≤ n, as _spectrum builds it
    seed = draw(st.integers(0, 2**16))
    tolerance = draw(st.sampled_from([3e-1, 3e-2, 1e-3, 1e-6, None]))
    short = min(m, n)
    kind = draw(st.sampled_from(["geometric", "power", "clusters", "blind"]))
    if kind == "blind":
        g = _blind_start(m, n, k, seed)
    else:
        i = torch.arange(short, dtype=torch.float64)
        if kind == "geometric":
            sigma = draw(st.floats(0.3, 0.999)) ** i
        elif kind == "power":
            sigma = (1 + i) ** -draw(st.floats(0.1, 3.0))
        else:
            levels = draw(st.lists(st.floats(1e-3, 1.0), min_size=1, max_size=6))
            sigma = torch.tensor(sorted(levels, reverse=True), dtype=torch.float64).repeat_interleave(
                short // len(levels) + 1)[:short]
        zero_tail = draw(st.integers(0, short // 2))
        if zero_tail:
            sigma[short - zero_tail:] = 0
        g = _spectrum(sigma, m, n, seed)
    boundaries = sorted(set(draw(st.lists(st.integers(1, k), max_size=3))) | {k})
    return g, k, boundaries, tolerance, seed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_spectra())
def test_whenever_checked_svd_certifies_the_true_angle_is_within_its_bound(case):
    g, k, boundaries, tolerance, seed = case
    report = {}
    found = checked_svd(g, k, tolerance=tolerance, boundaries=boundaries, seed=seed, report=report)
    hypothesis.event("certified" if found is not None else "not certified")
    if found is None:
        assert not report["certified"]
        return
    assert report["certified"] and report["bound"] <= (tolerance or 1e-11)
    u, s, vh = found
    eu, es, evh = signed_svd(g)
    for j in boundaries:
        # the exact top-j subspaces are defined (the bound certified a gap σ_j > σ_{j+1}); LAPACK's own error
        # there is about eps·σ₁/gap, far below any bound it could certify
        sin = max(_sin(u[:, :j], eu[:, :j]), _sin(vh[:j].T, evh[:j].T))
        assert sin <= report["bound"] + 1e-12, (j, sin, report)


_TARGETS = ["q_proj", "up_proj", "down_proj"]


def _llama_of_width(hidden: int):
    torch.manual_seed(0)
    return tiny_llama(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4)


def test_default_init_is_the_exact_svd_init_below_the_fast_path_and_round_off_above():
    # Issue 24: the default (svd="auto") must reproduce the authors' exact-SVD init to round-off. At the sizes of
    # users' tests (min(m, n) < FAST_PATH_MIN) it is LAPACK itself, bit for bit, for both methods.
    for method in ("lora-ga", "lora-one"):
        batches = make_batches(_llama_of_width(64), n=2, seq_len=32)
        default = _factors(peftkit.wrap(_llama_of_width(64), method, r=2, data=batches, targets=_TARGETS))
        exact = _factors(peftkit.wrap(_llama_of_width(64), method, r=2, data=batches, targets=_TARGETS, svd="exact"))
        assert default.keys() == exact.keys() and all(torch.equal(default[k], v) for k, v in exact.items()), method
    # From FAST_PATH_MIN on (512 × 512, 1024 × 512, 512 × 1024, fp32 G) the certified solver runs, to sin θ ≤ 1e-6
    # at every j (LoRA-GA: 2r = 4 vectors, LoRA-One: r = 2), and against the truth (the fp64 SVD of the same G)
    # its vectors are closer than fp32 LAPACK's.
    model = peftkit.wrap(_llama_of_width(FAST_PATH_MIN), "lora", r=2, targets=_TARGETS)
    batches = make_batches(model, n=2, seq_len=32)
    for name, g in gradient_statistics(model, adapter_layers(model), batches).items():
        tu, _, tvh = signed_svd(g.double())
        lu, _, lvh = signed_svd(g)
        for rank in (4, 2):
            report = {}
            u, _, vh = top_singular_triplets(g, rank, "auto", boundaries=range(1, rank + 1), report=report)
            assert report["solver"] == "checked" and report["certified"] and report["bound"] <= 1e-6, (name, report)
            for got, lapack, truth in ((u, lu, tu), (vh.T, lvh.T, tvh.T)):
                error = float((got.double() - truth[:, :rank]).abs().max())
                assert error <= 1e-6 * float(truth[:, :rank].abs().max()), (name, error)
                assert error <= float((lapack[:, :rank].double() - truth[:, :rank]).abs().max()) + 1e-7, name


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora-ga", "lora-one"])
def test_default_init_equals_the_exact_svd_init_on_the_fast_path(method):
    # The whole init (factors and LoRA-GA's offsets) at FAST_PATH_MIN: within fp32 LAPACK's own rounding of the
    # exact init (which is 1.2e-5 of max from the fp64 SVD here, single-threaded; the default is 5e-8 from it).
    # The default solver on the exact gradient path: at this width the default init sketches G instead (issue 26),
    # whose accuracy tests/test_gradient_sketch.py checks.
    batches = make_batches(_llama_of_width(FAST_PATH_MIN), n=2, seq_len=32)
    default = _factors(peftkit.wrap(_llama_of_width(FAST_PATH_MIN), method, r=2, data=batches, targets=_TARGETS,
                                    gradient_sketch=None))
    exact = _factors(peftkit.wrap(_llama_of_width(FAST_PATH_MIN), method, r=2, data=batches, targets=_TARGETS,
                                  svd="exact"))
    for key, value in exact.items():
        torch.testing.assert_close(default[key], value, rtol=0, atol=3e-5 * float(value.abs().max()), msg=key)
