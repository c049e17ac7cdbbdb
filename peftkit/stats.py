"""What data-driven inits measure (methods README §4.2): full-weight gradients and activation statistics.

- ``gradient_statistics``: per target layer, the full-weight gradient G = Δᵀ X (out × in, fp32) of the
  mean loss over every target token of all batches on all processes (the training step's token mean,
  ``peftkit.loss``), from forward/tensor hooks on the base layer (no ``weight.grad``, so bitsandbytes 4/8-bit
  bases and Conv1D work), on the base model (adapters disabled) in train mode, all-reduced across processes.
  Optionally a sketch (Y = G·Ω, Z = Gᵀ·Ψ) instead of G:
  O((m + n)·k) memory per layer, never forming G.
- ``IncrementalPCA``: centred incremental PCA of layer inputs (activations fp32, mean/variance sums fp64).
- ``signed_svd`` / ``sketch_svd`` / ``randomized_svd`` / ``checked_svd``: deterministic SVDs (full, from
  sketches, truncated with fixed power iterations, truncated with an a-posteriori error bound whose tail rests
  on an independent random probe, or None) with the sign convention (largest-|·| entry of each uᵢ positive, vᵢ flipped with it), so
  every process computes the same factors.
- ``gradient_triplets``: the top-r triplets of every layer's G, one group of layers per pass over the batches,
  so that at most one group's G is held (groups from a memory budget or a count).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import ConfigError
from .inject import set_enabled
from .layer import AdapterLayer
from .loss import batch_loss_units


# ---------------------------------------------------------------------------------------------- data
def check_batches(data: Any, init_name: str) -> list[Mapping]:
    """The batches of ``data`` as a list of dicts of tensors; one ConfigError for a wrong form or no batches."""
    hint = "pass data=<a list (or DataLoader) of dicts with input_ids, attention_mask and labels>"
    if data is None:
        raise ConfigError(f"data: the '{init_name}' initialisation estimates from batches; {hint}")
    if isinstance(data, Mapping):
        raise ConfigError(f"data: got a single batch (a dict) for '{init_name}'; expected an iterable of batches, "
                          "e.g. data=[batch]")
    if isinstance(data, (torch.Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise ConfigError(f"data: expected an iterable of batches for '{init_name}', got {type(data).__name__}; {hint}")
    batches = list(data)
    if not batches:
        raise ConfigError(f"data: the iterable of batches for '{init_name}' is empty; {hint}")
    for index, batch in enumerate(batches):
        if not isinstance(batch, Mapping) or not any(isinstance(v, torch.Tensor) for v in batch.values()):
            raise ConfigError(f"data: batch {index} for '{init_name}' is a {type(batch).__name__}, expected a dict of "
                              f"tensors as the model's forward takes them; {hint}")
    return batches


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def base_model(model: nn.Module, train: bool) -> Iterator[nn.Module]:
    """The unmodified base model (adapters disabled) in train or eval mode; modes and flags restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(train)
    set_enabled(model, False)
    try:
        yield model
    finally:
        set_enabled(model, True)
        for module, mode in modes:
            module.training = mode


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ---------------------------------------------------------------------------------------------- SVD
def sign_fix(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each (uᵢ, vᵢ) so that the largest-|·| entry of uᵢ is positive. u (m, k), vh (k, n)."""
    rows = u.abs().argmax(dim=0)
    signs = torch.sign(u[rows, torch.arange(u.shape[1])])
    signs[signs == 0] = 1
    return u * signs, vh * signs[:, None]


def signed_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic thin SVD (LAPACK, fp32 or fp64) with the sign convention: (U (m,k), S (k,), Vh (k,n))."""
    work = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    u, vh = sign_fix(u, vh)
    return u, s, vh


@dataclass
class GradientSketch:
    """Y = G·Ω (m, k) and Z = Gᵀ·Ψ (n, l) of one layer's gradient, with the blocks Ω (n, k), Ψ (m, l) they were
    taken with; a product whose block is None is not taken (a pass of ``sketch_passes`` needs one of them)."""

    y: torch.Tensor | None
    z: torch.Tensor | None
    omega: torch.Tensor | None
    psi: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.y, self.z) if t is not None]


def sketch_svd(sketch: GradientSketch, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Single-pass randomized SVD (Tropp et al. 2017) of G from its two sketches; top ``rank`` triplets, signed.

    Q = orth(Y); G ≈ Q·X with X = (ΨᵀQ)⁺·Zᵀ, solved by least squares; SVD of the small X (k × n).
    """
    y = sketch.y.double()
    q, _ = torch.linalg.qr(y)
    core = torch.linalg.lstsq(sketch.psi.double().t() @ q, sketch.z.double().t()).solution
    u_small, s, vh = torch.linalg.svd(core, full_matrices=False)
    u = q @ u_small
    u, vh = sign_fix(u[:, :rank], vh[:rank])
    return u.float(), s[:rank].float(), vh.float()


def subspace_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(a) and span(b) (columns), ascending."""
    qa, _ = torch.linalg.qr(a.double())
    qb, _ = torch.linalg.qr(b.double())
    return torch.linalg.svdvals(qa.t() @ qb).flip(0).clamp(max=1.0)


SOLVERS = ("auto", "exact", "randomized")


def randomized_svd(matrix: torch.Tensor, rank: int, *, iterations: int = 8, oversample: int | None = None,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` triplets (U (m, rank), S (rank,), Vh (rank, n)) of ``matrix`` (m, n), signed, in its dtype.

    Randomized range finder with ``iterations`` steps of subspace iteration (Halko, Martinsson & Tropp 2011,
    alg. 4.4): Q = orth(G·Ω) with Gaussian Ω (n, l), l = rank + oversample (default: oversample = max(rank, 8)),
    then Q ← orth(G·orth(Gᵀ·Q)) per iteration, re-orthonormalised every half-step so that the power of the
    spectrum never loses the small directions to rounding; finally the exact SVD of the small l × n matrix
    Qᵀ·G. Only (m, l) and (n, l) blocks are formed, never G·Gᵀ; the cost is about 2·(2·iterations + 2)·m·n·l
    FLOPs against O(m·n·min(m, n)) for the full SVD. The subspace error of direction i shrinks like
    (σ_{l+1}/σ_i)^(2·iterations + 1); Ω comes from a CPU generator seeded by ``seed``, so every process (and
    every run) gets the same factors.
    """
    m, n = matrix.shape
    width = min(rank + (max(rank, 8) if oversample is None else oversample), m, n)
    work = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()
    omega = torch.randn(n, width, generator=torch.Generator().manual_seed(seed), dtype=work.dtype).to(work.device)
    q, _ = torch.linalg.qr(work @ omega)
    for _ in range(iterations):
        p, _ = torch.linalg.qr(work.mT @ q)
        q, _ = torch.linalg.qr(work @ p)
    u_small, s, vh = torch.linalg.svd(q.mT @ work, full_matrices=False)
    u, vh = sign_fix(q @ u_small[:, :rank], vh[:rank])
    return u, s[:rank], vh


def _exact_flops(m: int, n: int) -> float:
    """FLOPs of LAPACK's thin SVD with vectors of an (m, n) matrix (Golub & Van Loan's R-SVD count)."""
    short, long = min(m, n), max(m, n)
    return 4.0 * short * short * long + 22.0 * short ** 3


# The default sin θ that svd="auto" certifies, per dtype of G: the round-off of the exact SVD in that dtype (LAPACK's
# own subspace error is about eps·σ₁/gap, 1e-7–1e-6 in fp32 on real gradients), so that the default init equals
# the exact-SVD init to round-off.
ROUND_OFF_TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-11}
# The independent probe of the complement (checked_svd): p Gaussian vectors fail to see ‖E‖ with probability
# ≤ 10^-p (Halko, Martinsson & Tropp 2011, lemma 4.1); q power steps shrink the lemma's factor 10·√(2/π) to its
# (2q + 1)-th root.
PROBES, PROBE_POWER = 8, 4


def default_tolerance(dtype: torch.dtype) -> float:
    """The sin θ ``svd="auto"`` certifies by default for a G of ``dtype``: its round-off (``ROUND_OFF_TOLERANCE``)."""
    return ROUND_OFF_TOLERANCE.get(dtype, ROUND_OFF_TOLERANCE[torch.float32])


def complement_norm_bound(matrix: torch.Tensor, left: torch.Tensor, right: torch.Tensor | None = None, *, seed: int,
                          probes: int = PROBES, power: int = PROBE_POWER) -> float:
    """An upper bound on ‖(I − L·Lᵀ)·G·(I − R·Rᵀ)‖₂ (G = ``matrix`` (m, n); ``left`` L (m, l), ``right`` R (n, l')
    orthonormal; R = None: no right projection) that holds with probability ≥ 1 − 10^-``probes`` over a
    Gaussian probe drawn from ``seed``, independently of L and R.

    With K = (EEᵀ)^q·E for that E and Gaussian ωᵢ: ‖K‖ ≤ 10·√(2/π)·maxᵢ ‖K·ωᵢ‖ except with probability 10^-p
    (Halko, Martinsson & Tropp 2011, lemma 4.1), and ‖K‖ = ‖E‖^(2q+1). Costs 2q + 1 products of G or Gᵀ with p
    columns. It sees what L and R missed, however they were found: it rests on the probe alone."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(matrix.shape[1], probes, generator=generator, dtype=matrix.dtype).to(matrix.device)
    log_norm = torch.zeros(probes, dtype=torch.float64, device=matrix.device)
    tiny = torch.finfo(matrix.dtype).tiny

    def apply(x: torch.Tensor) -> torch.Tensor:  # E·x
        if right is not None:
            x = x - right @ (right.mT @ x)
        y = matrix @ x
        return y - left @ (left.mT @ y)

    def apply_t(y: torch.Tensor) -> torch.Tensor:  # Eᵀ·y, y already orthogonal to L
        x = matrix.mT @ y
        return x if right is None else x - right @ (right.mT @ x)

    y = apply(x)
    for _ in range(power):
        # Renormalised every step (the log of the scale kept): (2q + 1)-th powers of σ over- or underflow.
        scale = torch.linalg.vector_norm(y, dim=0).clamp_min(tiny)
        log_norm += scale.log().double()
        y = apply(apply_t(y / scale))
    log_norm += torch.linalg.vector_norm(y, dim=0).clamp_min(tiny).log().double()
    log_k = math.log(10.0 * math.sqrt(2.0 / math.pi)) + float(log_norm.max())
    return math.exp(log_k / (2 * power + 1))


def _norm_of_block_triangle(a: float, c: float, d: float) -> float:
    """The largest singular value of [[a, 0], [c, d]]: a bound on ‖[[A, 0], [C, D]]‖ for blocks of norms a, c, d."""
    t = a * a + c * c + d * d
    return math.sqrt((t + math.sqrt(max(t * t - 4 * a * a * d * d, 0.0))) / 2)


def checked_svd(matrix: torch.Tensor, rank: int, *, tolerance: float | None = None,
                boundaries: Iterable[int] | None = None, oversample: int | None = None,
                max_iterations: int | None = None, seed: int = 0,
                report: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Top-``rank`` triplets (U (m, rank), S (rank,), Vh (rank, n)) of ``matrix`` (m, n), signed, in its dtype, or
    None when their accuracy could not be certified (the caller then takes the exact SVD).

    Subspace iteration with a Rayleigh–Ritz step after every half-iteration pair (Halko, Martinsson & Tropp 2011,
    alg. 4.4 + 5.1), in fp64 whatever G's dtype (so that the residuals' rounding, about eps·√n·σ₁, sits far below
    the tolerance; one fp64 copy of G, about the workspace LAPACK's SVD takes): Q = orth(G·Ω), Gaussian Ω (n, l),
    l = rank + oversample (default oversample = max(rank, 10)); per iteration Z = GᵀQ (n, l), the thin SVD
    Z = V·Σ·Wᵀ gives the Ritz triplets (U = Q·W, Σ, V) of QᵀG, and Y = G·V (m, l) is both the next power step
    (Q ← orth(Y)) and the residual R = Y − U·Σ (the other residual, GᵀU − VΣ, is zero by construction). Only
    (m, l) and (n, l) blocks are formed, never G·Gᵀ.

    The check (Wedin's sin Θ theorem): for each boundary j (the top-j subspaces that must be right; default:
    only j = rank) the largest principal angle θ_j between the computed and the exact top-j singular subspaces
    (left and right) satisfies sin θ_j ≤ ‖R_{:, :j}‖_F / (σ̃_j − α_j) for any α_j ≥ σ_{j+1}(G). The block's own
    Ritz values cannot give α_j (they never see a direction the block missed), so α_j rests on an independent
    probe. By Courant–Fischer σ_{j+1}(G) ≤ ‖G·(I − VⱼVⱼᵀ)‖, and in the bases [U, Q⊥] (left) and [V_{j+1..l}, V⊥]
    (right) that matrix is block lower-triangular, [[Σ̃_{j+1..l}, 0], [R_{j+1..l}, E]] (UᵀG = Σ̃Vᵀ exactly for
    Ritz vectors), with E = (I − QQᵀ)·G·(I − VVᵀ), the part of G the block never saw. Hence
    α_j = ‖[[σ̃_{j+1}, 0], [‖R_{:, j+1..l}‖_F, ‖E‖]]‖₂, where ‖E‖ is bounded by ``complement_norm_bound``
    with a Gaussian probe drawn independently of Ω (wrong with probability ≤ 1e-8). The probe runs only once
    the optimistic bound (α_j = σ̃_{j+1}, never more than the sound one) is within ``tolerance``. It returns once every bound is ≤ ``tolerance`` (default ``default_tolerance``: 1e-6 for fp32 G,
    1e-11 for fp64: round-off), and gives up (None) when a gap closes (the top-j subspace is then ill-determined
    and only the exact SVD reproduces LAPACK's choice; a gap below the rounding level eps·√max(m, n)·σ̃₁ of G·v
    counts as closed; the bound includes eps·√rank for storing the factors in G's dtype), when the sound bound
    stops improving between probes (a tail the block cannot absorb, or a direction it never captured), or after ``max_iterations`` (default: as many as cost the FLOPs of the exact
    SVD, ``_exact_flops``). Ω and the probes come from CPU generators seeded by ``seed``: every process gets the
    same factors. ``report`` (a dict) receives ``iterations``, ``bound`` (the largest sin θ bound at the end; with
    the probe once it ran), ``certified`` and ``probes`` (how many probes ran).
    """
    m, n = matrix.shape
    short = min(m, n)
    width = min(rank + (max(rank, 10) if oversample is None else oversample), short)
    cuts = sorted({rank} if boundaries is None else {int(j) for j in boundaries} | {rank})
    if width <= rank or cuts[0] < 1 or cuts[-1] > rank:
        return None  # no oversampled tail to estimate σ_{rank+1} from (or nonsense boundaries): exact
    if tolerance is None:
        tolerance = default_tolerance(matrix.dtype)
    work = matrix.double()
    if max_iterations is None:
        per_iteration = 4.0 * m * n * width + 6.0 * (m + n) * width * width
        max_iterations = max(2, int(_exact_flops(m, n) / per_iteration))
    omega = torch.randn(n, width, generator=torch.Generator().manual_seed(seed), dtype=work.dtype).to(work.device)
    q, _ = torch.linalg.qr(work @ omega)
    # The rounding level of G·v relative to σ̃₁ (G's own dtype: G is only known to its rounding): a gap below it
    # is noise (LAPACK's vectors there are noise too, and only the exact SVD reproduces them).
    eps = torch.finfo(matrix.dtype if matrix.dtype in (torch.float32, torch.float64) else torch.float32).eps
    floor_factor = eps * max(m, n) ** 0.5
    # The factors are returned in G's dtype: storing unit vectors there moves their span by up to eps·√rank.
    stored = eps * rank ** 0.5
    bound, probes, last_sound = float("inf"), 0, float("inf")
    for iteration in range(1, max_iterations + 1):
        v, s, wh = torch.linalg.svd(work.mT @ q, full_matrices=False)  # Z = V Σ Wᵀ, Z = GᵀQ (n, l)
        u = q @ wh.mT  # left Ritz vectors (m, l)
        y = work @ v  # G·V (m, l): next power step and residual
        residual = torch.linalg.vector_norm(y - u * s, dim=0)  # ‖G vᵢ − σ̃ᵢ uᵢ‖ (l,)
        floor = floor_factor * float(s[0])
        sq = (residual ** 2).cumsum(0)

        def wedin(alpha: Callable[[int], float]) -> float:
            worst = 0.0
            for j in cuts:
                gap = float(s[j - 1]) - alpha(j)
                worst = max(worst, float(sq[j - 1].sqrt()) / gap if gap > floor else float("inf"))
            return worst + stored

        bound = wedin(lambda j: float(s[j]))  # optimistic: α_j = σ̃_{j+1} ≤ the sound α_j below
        if bound <= tolerance:
            probes += 1
            tail = complement_norm_bound(work, u, v, seed=seed + 7919 * probes)
            below = (residual.flip(0) ** 2).cumsum(0).flip(0).sqrt()  # below[i] = ‖R_{:, i..l}‖_F
            bound = wedin(lambda j: _norm_of_block_triangle(float(s[j]), float(below[j]), tail))
            if bound <= tolerance:
                if report is not None:
                    report.update(iterations=iteration, bound=bound, certified=True, probes=probes)
                uu, vh = sign_fix(u[:, :rank], v[:, :rank].mT)
                return uu.to(matrix.dtype), s[:rank].to(matrix.dtype), vh.to(matrix.dtype)
            if bound > 0.9 * last_sound:
                break  # the sound bound no longer improves: what the block misses, it will not capture
            last_sound = bound
        q, _ = torch.linalg.qr(y)
    if report is not None:
        report.update(iterations=iteration, bound=bound, certified=False, probes=probes)
    return None


# The smallest min(m, n) at which svd="auto" takes the certified truncated solver; below it LAPACK's exact SVD
# costs about as much as the certified iterations (≤ 0.4 s per layer at 384 × 1536 on 2 CPU cores), so the
# default there is the exact SVD itself, bit for bit.
FAST_PATH_MIN = 512


def solver_for(solver: str, shape: tuple[int, int], rank: int) -> str:
    """The solver ``"auto"`` picks for an (m, n) matrix and ``rank`` triplets: ``"checked"`` (``checked_svd``, the
    exact SVD where it cannot certify its answer) once the matrix is wide enough that a truncated solve pays
    (min(m, n) ≥ ``FAST_PATH_MIN`` and ≥ 4·l, l = rank + max(rank, 8)), else ``"exact"``; other solvers as given."""
    if solver != "auto":
        return solver
    short = min(shape)
    return "checked" if short >= FAST_PATH_MIN and short >= 4 * (rank + max(rank, 8)) else "exact"


# ------------------------------------------------------------------------------------- gradients
def sketch_widths(k: int, m: int, n: int) -> tuple[int, int]:
    """(k, l) of the sketches of an (m, n) gradient for a requested k: k ≤ min(m, n) and l = min(2k + 1, m, n)
    (Tropp et al. 2017's choice for the co-range sketch)."""
    k = min(k, m, n)
    return k, min(2 * k + 1, m, n)


def sketch_bytes(k: int, m: int, n: int, element: int = 4) -> int:
    """Bytes one layer's sketch holds: Y (m, k), Z (n, l) and the test matrices Ω (n, k), Ψ (m, l) (counted
    whole, though the layers of one shape share them)."""
    k, l = sketch_widths(k, m, n)
    return 2 * (m * k + n * l) * element


# The default sketch (gradient_sketch="auto"): k = SKETCH_OVERSAMPLING × the triplets a layer needs, at least
# SKETCH_MIN, and sketch_passes = 2 (the adapters' default): on the wide bench model 0.28× PEFT's memory at 0.98× its
# CPU time; LoRA-GA's first-step cosine on real MiniLM / SmolLM2 gradients worst 0.967 / 0.964, median 0.99
# (more passes: more accuracy, each about half of PEFT's init time; docs/methods/data-driven-inits.md).
SKETCH_OVERSAMPLING, SKETCH_MIN = 4, 64
# Options that ask for the exact path: with any of them, gradient_sketch="auto" keeps G.
EXACT_PATH_OPTIONS = {"gradient_groups": lambda v: v is not None, "gradient_device": lambda v: v == "cpu",
                      "svd": lambda v: v in ("exact", "randomized")}


def sketch_plan(layers: dict[str, AdapterLayer], ranks: Mapping[str, int],
                options: Mapping[str, Any]) -> dict[str, int | None]:
    """Per layer the sketch size k ``gradient_statistics`` takes, or None where it keeps G itself.

    ``gradient_sketch``: None: G everywhere (the exact path); an int k: max(k, triplets); ``"auto"`` (the
    default): k = max(``SKETCH_MIN``, ``SKETCH_OVERSAMPLING`` × triplets), unless an option of the exact path
    is set (``EXACT_PATH_OPTIONS``: ``gradient_groups``, ``gradient_device="cpu"``, ``svd="exact"`` or
    ``"randomized"``), which keeps G. A layer whose sketch (with its test matrices) would hold at least as many
    bytes as its G keeps G: there the exact statistic is also the smaller one."""
    choice = options.get("gradient_sketch", "auto")
    if choice == "auto" and any(test(options.get(key)) for key, test in EXACT_PATH_OPTIONS.items()):
        choice = None
    plan: dict[str, int | None] = {}
    for name, layer in layers.items():
        m, n, triplets = layer.out_features, layer.in_features, ranks[name]
        if choice is None:
            plan[name] = None
            continue
        k = max(SKETCH_MIN, SKETCH_OVERSAMPLING * triplets) if choice == "auto" else max(int(choice), triplets)
        plan[name] = k if sketch_bytes(k, m, n) < m * n * 4 else None
    return plan


def gradient_statistics(model: nn.Module, layers: dict[str, AdapterLayer], batches: list[Mapping], *,
                        sketch_size: int | Mapping[str, int | None] | None = None, seed: int = 0,
                        store_on: torch.device | str | None = None,
                        products: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]] | None = None,
                        ) -> dict[str, torch.Tensor | GradientSketch]:
    """Per layer, G = Σ_b n_b·G_b / Σ_b n_b (out × in, fp32; fp64 on fp64 bases), or its sketch when ``sketch_size`` = k is given.

    G_b = Δᵀ X of batch b's mean loss, from hooks on the base layers of the adapters-disabled model in train
    mode; n_b is batch b's loss units (``peftkit.loss.batch_loss_units``: target tokens after the causal shift,
    or examples), so G is the gradient of the mean over every target token of all batches, the loss a training
    step on the same examples takes, however they are split into batches and processes. A batch without units
    adds nothing. Sums (and the unit count) are all-reduced across processes, so every process returns the same
    statistics. ``sketch_size``: one k for every layer, or per layer name a k (a sketch) or None (G itself).
    A sketch is Y = G·Ω (out × k) and Z = Gᵀ·Ψ (in × l), l = 2k + 1, accumulated per token as
    Y += δₜ(xₜᵀΩ), Z += xₜ(δₜᵀΨ) without forming G, with Gaussian Ω (in × k) and Ψ (out × l) drawn from CPU
    generators seeded by ``seed`` and their shape (one per shape, shared by the layers of that shape; identical
    on every process: the sketches, not G, are all-reduced). ``products``: per layer name given blocks
    (R (n, k) or None, L (m, l) or None) instead; its sketch holds G·R and Gᵀ·L (one pass of subspace iteration,
    ``sketched_triplets``). ``store_on`` (e.g. ``"cpu"``) keeps
    the full G there instead of on the model's device: each batch's Δᵀ X is formed on the device and added in
    (one layer's m × n temporary on the device at a time).
    """
    device = _device(model)
    store = device if store_on is None else torch.device(store_on)
    stats: dict[str, Any] = {}
    tests: dict[tuple, torch.Tensor] = {}

    def test_matrix(rows: int, cols: int, dtype: torch.dtype, role: int) -> torch.Tensor:
        # One Gaussian test matrix per shape, shared by the layers of that shape (each layer's sketch is still a
        # sketch with a Gaussian Ω; the guarantees are per layer): the model's few distinct widths hold them, not
        # every layer. Seeded by the shape alone, so identical on every process and whichever layers are sketched.
        key = (rows, cols, dtype, role)
        if key not in tests:
            gen = torch.Generator().manual_seed((seed * 1_000_003 + role * 7919 + rows) * 1_000_003 + cols)
            tests[key] = torch.randn(rows, cols, generator=gen, dtype=dtype).to(device)
        return tests[key]

    for name, layer in layers.items():
        m, n = layer.out_features, layer.in_features
        # fp32 sums (fp64 on an fp64 base), whatever the model dtype.
        dtype = torch.float64 if layer.base_layer.weight.dtype == torch.float64 else torch.float32
        size = sketch_size.get(name) if isinstance(sketch_size, Mapping) else sketch_size
        if products is not None and name in products:
            right, left = products[name]
            stats[name] = GradientSketch(
                None if right is None else torch.zeros(m, right.shape[1], dtype=dtype, device=device),
                None if left is None else torch.zeros(n, left.shape[1], dtype=dtype, device=device),
                None if right is None else right.to(device, dtype), None if left is None else left.to(device, dtype))
        elif size is None:
            stats[name] = torch.zeros(m, n, dtype=dtype, device=store)
        else:
            k, l = sketch_widths(size, m, n)
            omega, psi = test_matrix(n, k, dtype, 0), test_matrix(m, l, dtype, 1)
            stats[name] = GradientSketch(torch.zeros(m, k, dtype=dtype, device=device),
                                         torch.zeros(n, l, dtype=dtype, device=device), omega, psi)
    weight = [0.0]

    def make_hook(name: str):
        def forward_hook(module, args, output):
            x = args[0].detach()

            def grad_hook(delta: torch.Tensor) -> None:
                target = stats[name]
                dtype = target.tensors()[0].dtype if isinstance(target, GradientSketch) else target.dtype
                d = delta.reshape(-1, delta.shape[-1]).to(dtype)
                xs = x.reshape(-1, x.shape[-1]).to(dtype)
                if isinstance(target, GradientSketch):
                    if target.y is not None:
                        target.y.addmm_(d.t(), xs @ target.omega, alpha=weight[0])
                    if target.z is not None:
                        target.z.addmm_(xs.t(), d @ target.psi, alpha=weight[0])
                elif target.device == d.device:
                    target.addmm_(d.t(), xs, alpha=weight[0])
                else:  # offloaded: the product on the device, the sum where it is kept
                    target.add_((d.t() @ xs).to(target.device), alpha=weight[0])

            if not output.requires_grad:
                # Nothing upstream needs a gradient: a leaf here makes Δ of this layer (and of every layer
                # downstream, through its input) reach the hooks without any weight requiring grad.
                output = output.detach().requires_grad_(True)
            output.register_hook(grad_hook)
            return output

        return forward_hook

    handles = [layer.base_layer.register_forward_hook(make_hook(name)) for name, layer in layers.items()]
    total = 0.0
    try:
        with base_model(model, train=True), torch.enable_grad():
            for batch in batches:
                weight[0] = float(batch_loss_units(model, batch))
                if not weight[0]:
                    continue  # its mean loss is 0/0; its tokens are not in the global mean either
                inputs = _to_device(batch, device)
                out = model(**inputs)
                loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
                if loss is None:
                    raise ConfigError("data: the model returned no loss for a batch; gradient-based inits need "
                                      "batches with labels (e.g. labels = input_ids for causal LM)")
                loss.backward()
                total += weight[0]
    finally:
        for handle in handles:
            handle.remove()
    # On the statistics' device: NCCL rejects a CPU tensor, gloo takes the CPU tensors a CPU model has.
    count = torch.tensor([total], dtype=torch.float64, device=device)
    if distributed():
        dist.all_reduce(count)
        for value in stats.values():
            for tensor in (value.tensors() if isinstance(value, GradientSketch) else [value]):
                dist.all_reduce(tensor)
    if not count.item():
        raise ConfigError("data: the batches hold no target tokens (every label is -100); gradient-based inits "
                          "need labelled tokens: pass batches whose labels mark the tokens to learn")
    for value in stats.values():
        for tensor in (value.tensors() if isinstance(value, GradientSketch) else [value]):
            tensor.div_(float(count))
    return stats


# ---------------------------------------------------------------------------------------- PCA
def _short_wide_svd(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` singular values (k,) and right singular vectors (k, d) of a short, wide ``z`` (m, d), m < d.

    Through the fp64 eigendecomposition of the (m, m) Gram matrix z·zᵀ: 3–5× faster than LAPACK's SVD of z
    for EVA's stacks (m = k + batch tokens + 1 ≈ 270 rows against d = 576–1536 features). The squared
    condition number costs nothing the components can see: in fp64 a component's error is about
    1e-16·σ₁²/(σᵢ² − σᵢ₊₁²), far below the 0.99 cosine that decides convergence. Directions with σ ≈ 0 (a
    rank-deficient stack) come out as noise, as any basis of a null space would.
    """
    z64 = z.double()
    eigenvalues, u = torch.linalg.eigh(z64 @ z64.mT)  # ascending
    keep = min(k, z.shape[0])
    eigenvalues, u = eigenvalues.flip(0)[:keep], u.flip(1)[:, :keep]
    s = eigenvalues.clamp_min(0).sqrt()
    floor = max(float(s[0]) * 1e-12, torch.finfo(torch.float64).tiny)
    vh = (u.mT @ z64) / s.clamp_min(floor)[:, None]
    return s.to(z.dtype), vh.to(z.dtype)


class IncrementalPCA:
    """Centred incremental PCA (sklearn's / PEFT's update): activations fp32, mean/variance fp64, SVDs after the
    first batch in fp64.

    ``svd="exact"``: LAPACK SVD, or for a stack with fewer rows than features the fp64 eigendecomposition of
    its Gram matrix (the same top components, 3–5× faster); ``"lowrank"``: ``torch.svd_lowrank(q=2k, niter=4)`` under a forked RNG seeded
    with ``seed`` (PEFT's EVA), for parity. Components (k, d) are sign-fixed on their largest-|·| entry.
    """

    def __init__(self, n_components: int, svd: str = "exact", seed: int = 42) -> None:
        self.n_components = n_components
        self.svd = svd
        self.seed = seed
        self.n_seen = 0
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self.components: torch.Tensor | None = None
        self.singular_values: torch.Tensor | None = None
        self.explained_variance_ratio: torch.Tensor | None = None

    def _svd(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.svd == "lowrank":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                u, s, v = torch.svd_lowrank(z, q=2 * self.n_components, niter=4)
            vh = v.mH
        elif z.shape[0] < z.shape[1]:
            s, vh = _short_wide_svd(z, self.n_components)
        else:
            _, s, vh = torch.linalg.svd(z, full_matrices=False)
        cols = vh.abs().argmax(dim=1)
        signs = torch.sign(vh[torch.arange(vh.shape[0]), cols])
        return s, vh * signs[:, None]

    @torch.no_grad()
    def partial_fit(self, x: torch.Tensor) -> None:
        """One update with the rows of ``x`` (N, d)."""
        x = x.float()
        n_new = x.shape[0]
        new_sum = x.sum(0, dtype=torch.float64)
        total = self.n_seen + n_new
        batch_mean64 = new_sum / n_new
        centred = x - batch_mean64
        new_uvar = centred.square().sum(0, dtype=torch.float64) - centred.sum(0, dtype=torch.float64).square() / n_new
        if self.mean is None:
            mean = new_sum / total
            var = new_uvar / total
            z = (x - mean).float()
        else:
            last_sum = self.mean * self.n_seen
            ratio = self.n_seen / n_new
            var = (self.var * self.n_seen + new_uvar + ratio / total * (last_sum / ratio - new_sum).square()) / total
            mean = (last_sum + new_sum) / total
            batch_mean = x.mean(0)
            correction = ((self.n_seen / total) * n_new) ** 0.5 * (self.mean - batch_mean)
            # The fp64 mean correction promotes the stacked matrix (and so every later SVD) to fp64, as in PEFT.
            z = torch.vstack([self.singular_values[:, None] * self.components, x - batch_mean, correction[None]])
        s, vh = self._svd(z)
        self.n_seen = total
        self.mean, self.var = mean, var
        self.components = vh[: self.n_components]
        self.singular_values = s[: self.n_components]
        self.explained_variance_ratio = (s.double().square() / torch.sum(var * total))[: self.n_components]


def selected_token_mask(batch: Mapping, use_label_mask: bool, label_mask_value: int) -> torch.Tensor | None:
    """(batch, seq) bool mask of the tokens EVA uses: attention_mask == 1 and (optionally) labels != -100."""
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        return None
    mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
    labels = batch.get("labels")
    if use_label_mask and isinstance(labels, torch.Tensor) and labels.shape == ids.shape:
        mask = mask & (labels != label_mask_value)
    return mask


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows from every process concatenated in rank order (padded all_gather); ``rows`` itself alone."""
    if not distributed():
        return rows
    world = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], dtype=torch.long, device=rows.device)  # NCCL: no CPU tensors
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros(longest, rows.shape[1], dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(c.item())] for part, c in zip(parts, counts)], 0)


def top_singular_triplets(stat: torch.Tensor | GradientSketch, rank: int, solver: str = "exact", *,
                          iterations: int = 8, seed: int = 0, tolerance: float | None = None,
                          boundaries: Iterable[int] | None = None,
                          report: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (m, rank), S (rank,), Vh (rank, n)) of a gradient from ``gradient_statistics``, signed, in G's dtype.

    ``solver``: ``"exact"`` (LAPACK's full thin SVD), ``"randomized"`` (``randomized_svd`` with ``iterations``
    power iterations, unchecked) or ``"auto"`` (``solver_for``: on wide layers ``checked_svd`` to ``tolerance``
    (None: round-off, ``default_tolerance``) at ``boundaries``, the exact SVD wherever that cannot certify its
    answer); a sketch always takes
    ``sketch_svd``. ``report`` (a dict) receives ``solver`` (what ran) and, for the checked solver, its
    ``iterations``, ``bound`` and ``certified``."""
    if isinstance(stat, GradientSketch):
        return sketch_svd(stat, rank)
    chosen = solver_for(solver, tuple(stat.shape), rank)
    if report is not None:
        report["solver"] = chosen
    if chosen == "randomized":
        return randomized_svd(stat, rank, iterations=iterations, seed=seed)
    if chosen == "checked":
        found = checked_svd(stat, rank, tolerance=tolerance, boundaries=boundaries, seed=seed, report=report)
        if found is not None:
            return found
        if report is not None:
            report["solver"] = "exact (fallback)"
    u, s, vh = signed_svd(stat)
    return u[:, :rank], s[:rank], vh[:rank]


# ----------------------------------------------------------------- bounded-memory gradient passes
MAX_SKETCH_PASSES = 16
GRADIENT_OPTION_HELP = {
    "sketch_passes": f"an integer from 1 to {MAX_SKETCH_PASSES} (passes over the data of the sketch path: 1 is the "
                     "single-pass sketch, p >= 2 subspace iteration with p - 1 products after G·Ω)",
    "gradient_sketch": "'auto' (a sketch of k = max(64, 4 x the triplets) per layer), a positive integer k, or None "
                       "(the exact path: each layer's whole G)",
    "gradient_groups": "None (from gradient_memory) or a positive number of layer groups, one pass each",
    "gradient_memory": "'auto' (a quarter of the memory free where G is kept), None (all layers at once) or a "
                       "positive number of MiB",
    "gradient_device": "'model' (G on the model's device) or 'cpu' (G offloaded to host memory)",
    "svd": f"one of {SOLVERS}",
    "svd_iterations": "a non-negative integer (power iterations of the randomized solver)",
    "svd_tolerance": "None (round-off: 1e-6 for an fp32 G, 1e-11 for fp64) or a number in (0, 1) (the largest sin "
                     "of the principal angle svd='auto' certifies)",
}


def check_gradient_options(options: Mapping[str, Any]) -> None:
    """One ConfigError naming the option for a bad value of the options ``gradient_triplets`` reads."""
    def bad(key: str) -> ConfigError:
        return ConfigError(f"{key}: expected {GRADIENT_OPTION_HELP[key]}, got {options[key]!r}")

    def positive_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    if options["gradient_groups"] is not None and not positive_int(options["gradient_groups"]):
        raise bad("gradient_groups")
    passes = options.get("sketch_passes", 1)
    if not positive_int(passes) or passes > MAX_SKETCH_PASSES:
        raise bad("sketch_passes")
    sketch = options.get("gradient_sketch", "auto")
    if not (sketch is None or sketch == "auto" or positive_int(sketch)):
        raise bad("gradient_sketch")
    if positive_int(sketch):
        for key, test in EXACT_PATH_OPTIONS.items():
            if test(options[key]):
                raise ConfigError(f"{key}: {options[key]!r} is an option of the exact path, which forms each layer's "
                                  f"G, but gradient_sketch={sketch} never forms G; pass gradient_sketch=None for the "
                                  f"exact path, or leave {key} at its default")
    memory = options["gradient_memory"]
    if not (memory is None or memory == "auto" or (isinstance(memory, (int, float)) and not isinstance(memory, bool)
                                                  and memory > 0)):
        raise bad("gradient_memory")
    if options["gradient_device"] not in ("model", "cpu"):
        raise bad("gradient_device")
    if options["svd"] not in SOLVERS:
        raise bad("svd")
    iterations = options["svd_iterations"]
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise bad("svd_iterations")
    tolerance = options.get("svd_tolerance")
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not 0 < tolerance < 1):
        raise bad("svd_tolerance")


def gradient_bytes(layer: AdapterLayer) -> int:
    """Bytes of one layer's full-weight gradient as ``gradient_statistics`` keeps it (fp32, fp64 on fp64 bases)."""
    size = 8 if layer.base_layer.weight.dtype == torch.float64 else 4
    return layer.out_features * layer.in_features * size


def free_memory_bytes(device: torch.device) -> int:
    """Memory available now on ``device``: CUDA's free memory, or the host's MemAvailable (/proc/meminfo).

    Under torch.distributed the minimum over processes, so that every process plans the same groups."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            with open("/proc/meminfo") as info:
                free = next(int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            import psutil

            free = psutil.virtual_memory().available
    if distributed():
        value = torch.tensor([float(free)], dtype=torch.float64,
                             device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        free = int(value.item())
    return int(free)


def plan_groups(sizes: dict[str, int], groups: int | None = None, budget: int | None = None) -> list[list[str]]:
    """Contiguous groups of layer names (in ``sizes``' order, the model's forward order) for one pass each.

    ``groups`` = k: k groups of about equal bytes; else ``budget`` (bytes): as few groups as keep each group's
    total ≤ budget (a layer larger than the budget alone); neither: one group of all layers."""
    names = list(sizes)
    if groups is not None:
        groups = min(groups, len(names))
        total = sum(sizes.values())
        out: list[list[str]] = [[] for _ in range(groups)]
        running = 0
        for name in names:
            # The group whose share of the bytes this layer's midpoint falls into, but never leaving one empty.
            index = min(int((running + sizes[name] / 2) * groups / max(total, 1)), groups - 1)
            out[index].append(name)
            running += sizes[name]
        out = [g for g in out if g]
        while len(out) < groups:  # a few huge layers: split the largest group until there are k
            largest = max(range(len(out)), key=lambda i: len(out[i]))
            half = len(out[largest]) // 2
            out[largest:largest + 1] = [out[largest][:half], out[largest][half:]]
        return out
    if budget is None:
        return [names] if names else []
    out, current, held = [], [], 0
    for name in names:
        if current and held + sizes[name] > budget:
            out.append(current)
            current, held = [], 0
        current.append(name)
        held += sizes[name]
    return out + ([current] if current else [])


def gradient_groups_of(model: nn.Module, layers: dict[str, AdapterLayer], options: Mapping[str, Any]) -> list[list[str]]:
    """The groups ``gradient_triplets`` makes from the options ``gradient_groups`` / ``gradient_memory`` /
    ``gradient_device``: an explicit k, or the fewest groups that fit the budget (``"auto"``: a quarter of
    the memory free where G is kept)."""
    sizes = {name: gradient_bytes(layer) for name, layer in layers.items()}
    if options["gradient_groups"] is not None:
        return plan_groups(sizes, groups=options["gradient_groups"])
    memory = options["gradient_memory"]
    if memory is None:
        return plan_groups(sizes)
    if memory == "auto":
        store = torch.device("cpu") if options["gradient_device"] == "cpu" else _device(model)
        budget = free_memory_bytes(store) // 4
    else:
        budget = int(float(memory) * 2**20)
    return plan_groups(sizes, budget=budget)


def _rng_states() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.random.get_rng_state(), cuda


def _set_rng_states(states: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.random.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state_all(states[1])


def gradient_triplets(model: nn.Module, layers: dict[str, AdapterLayer], batches: list[Mapping],
                      ranks: Mapping[str, int], options: Mapping[str, Any], *, seed: int = 0,
                      negate: bool = False, boundaries: Callable[[int], Iterable[int]] | None = None,
                      ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(name, U (m, r), S (r,), Vh (r, n)) of every layer's full-weight gradient G (−G with ``negate``), r = ranks[name],
    in G's dtype (fp32; fp64 on fp64 bases), in the order of ``layers``' groups.

    The layers are split into groups (``gradient_groups_of``); each group costs one pass over ``batches`` in
    which only its layers accumulate G, then each of its G is decomposed and freed before the next group's
    pass. So at most one group's G is held, and the factors are the same as with one group (G of a layer does
    not depend on which other layers are measured: bit-equal in fp64). The backward of a pass stops at the
    group's first layer. The default ``options["gradient_sketch"]="auto"`` (or an int k) instead streams
    sketches of all layers in one pass (``sketch_plan``; a layer whose G is smaller than its sketch keeps G).
    ``boundaries(rank)``: the j whose top-j subspaces the method uses separately (``checked_svd``; default: rank).
    """
    sizes = sketch_plan(layers, ranks, options)
    store_on = "cpu" if options["gradient_device"] == "cpu" else None
    solve_on = _device(model)
    passes = options.get("sketch_passes", 1)
    products = None
    if any(k is not None for k in sizes.values()):
        # One group: the sketched layers hold O((m + n)·k), the rest (whose G is smaller than a sketch) hold G.
        plan = [list(layers)]
        if passes > 1:  # subspace iteration: the first pass takes G·Ω only
            products = {name: (_test_block(layers[name].in_features, k, _stat_dtype(layers[name]), seed, solve_on),
                               None) for name, k in sizes.items() if k is not None}
    else:
        sizes, plan = None, gradient_groups_of(model, layers, options)
    # Every pass draws the same dropout masks as the first (the state at the start), and the draws made between
    # passes (e.g. LoRA-GA's random split) continue as after one pass: the same numbers as with one group.
    start = _rng_states()
    for index, group in enumerate(plan):
        resume = _rng_states() if index else None
        if resume is not None:
            _set_rng_states(start)
        stats = gradient_statistics(model, {name: layers[name] for name in group}, batches, sketch_size=sizes,
                                    seed=seed, store_on=store_on, products=products)
        if resume is not None:
            _set_rng_states(resume)
        iterated = {name: stats.pop(name) for name in products} if products is not None else {}
        for name in [name for name in group if name in stats]:
            stat = stats.pop(name)  # freed after its layer
            if isinstance(stat, torch.Tensor) and stat.device != solve_on:
                stat = stat.to(solve_on)  # one layer's G back on the device for its decomposition
            if negate:
                for tensor in ([stat] if isinstance(stat, torch.Tensor) else stat.tensors()):
                    tensor.neg_()  # the SVD of −G (its sketches are linear in G)
            rank = ranks[name]
            u, s, vh = top_singular_triplets(stat, rank, options["svd"], iterations=options["svd_iterations"],
                                             seed=seed, tolerance=options.get("svd_tolerance"),
                                             boundaries=None if boundaries is None else boundaries(rank))
            del stat
            yield name, u, s, vh
        if iterated:
            yield from _subspace_iteration(model, layers, batches, ranks, iterated, passes, start, negate)


def _stat_dtype(layer: AdapterLayer) -> torch.dtype:
    return torch.float64 if layer.base_layer.weight.dtype == torch.float64 else torch.float32


def _test_block(rows: int, cols: int, dtype: torch.dtype, seed: int, device: torch.device) -> torch.Tensor:
    """The Gaussian (rows, cols) start block of subspace iteration: seeded by ``seed`` and the shape alone, so the
    same on every process and shared by the layers of one width."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + 2 * 7919 + rows) * 1_000_003 + cols)
    return torch.randn(rows, cols, generator=gen, dtype=dtype).to(device)


def _orthonormal(block: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of ``block`` (thin QR in fp64), in ``block``'s dtype."""
    return torch.linalg.qr(block.double())[0].to(block.dtype)


def _subspace_iteration(model: nn.Module, layers: dict[str, AdapterLayer], batches: list[Mapping],
                        ranks: Mapping[str, int], first: dict[str, GradientSketch], passes: int,
                        start: tuple, negate: bool) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Top triplets of each layer's G (−G with ``negate``) by randomized subspace iteration over the data
    (Halko, Martinsson & Tropp 2011, alg. 4.3 with the products taken in backward hooks): ``first`` holds
    Y = G·Ω from the first pass; every further pass multiplies an orthonormal basis of the last product by Gᵀ
    or G (alternately: Gᵀ·orth(Y), then G·orth(Gᵀ·Q), ...), each replaying the first pass's dropout masks
    (``start``). After ``passes`` passes the last product B = Gᵀ·Q (or G·P) gives G ≈ Q·Bᵀ (or B·Pᵀ) exactly
    on that basis: the SVD of the small B is the Rayleigh–Ritz step. The subspace error of direction i shrinks
    like (σ_{k+1}/σᵢ)^(passes − 1) (two passes: the basis of G·Ω, exact on it)."""
    products = {name: sketch.y for name, sketch in first.items()}
    side = {name: "left" for name in first}  # "left": the product is G·R (its columns span a left range)
    bases: dict[str, torch.Tensor] = {}
    resume = _rng_states()
    for _ in range(passes - 1):
        blocks = {}
        for name, product in products.items():
            bases[name] = _orthonormal(product)
            blocks[name] = (None, bases[name]) if side[name] == "left" else (bases[name], None)
        products.clear()
        _set_rng_states(start)
        stats = gradient_statistics(model, {name: layers[name] for name in blocks}, batches, products=blocks)
        for name, sketch in stats.items():
            products[name] = sketch.z if side[name] == "left" else sketch.y
            side[name] = "right" if side[name] == "left" else "left"
        del stats, blocks
    _set_rng_states(resume)
    for name, product in products.items():
        rank, dtype = ranks[name], product.dtype
        work = product.double()
        if negate:
            work = -work  # −G ≈ Q·(−B)ᵀ: the products are linear in G
        if side[name] == "right":  # B = Gᵀ·Q (n, k): G ≈ Q·Bᵀ
            small_u, sv, vh = torch.linalg.svd(work.mT, full_matrices=False)
            u = bases[name].double() @ small_u
        else:  # B = G·P (m, k): G ≈ B·Pᵀ (after one pass: P = Ω, not orthonormal; passes ≥ 2 never end here then)
            u, sv, small_vh = torch.linalg.svd(work, full_matrices=False)
            vh = small_vh @ bases[name].double().mT
        u, vh = sign_fix(u[:, :rank], vh[:rank])
        yield name, u.to(dtype), sv[:rank].to(dtype), vh.to(dtype)


def check_double_rank(layers: dict[str, AdapterLayer], adapter_name: str, factor: int, option: str) -> None:
    """ConfigError (before any forward) when factor·r exceeds min(out, in) of a layer."""
    for name, layer in layers.items():
        r = layer.ranks[adapter_name]
        limit = min(layer.out_features, layer.in_features)
        if factor * r > limit:
            raise ConfigError(
                f"r: {option} needs {factor}·r <= min(out, in); {name} ({layer.out_features}x{layer.in_features}) "
                f"has r = {r}, the largest allowed r there is {limit // factor}; lower r or set rank_pattern for it"
            )


def adapter_name_of(model: nn.Module, config: Any) -> str:
    """The name of the adapter an init is filling (the one whose config object is ``config``)."""
    from .inject import state_of

    return next(name for name, c in state_of(model).configs.items() if c is config)
