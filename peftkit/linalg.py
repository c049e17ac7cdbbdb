"""The model-free linear algebra of the data-driven inits: deterministic SVD solvers and the incremental PCA.

- ``signed_svd`` / ``randomized_svd`` / ``checked_svd``: deterministic SVDs (full, truncated with fixed power
  iterations, truncated with an a-posteriori error bound whose tail rests
  on an independent random probe, or None) with the sign convention (largest-|·| entry of each uᵢ positive,
  vᵢ flipped with it), so every process computes the same factors; ``top_singular_triplets`` picks one
  (``solver_for``).
- ``GradientSketch``: the products Y = G·Ω and Z = Gᵀ·Ψ of a gradient G that is never formed, for given blocks Ω,
  Ψ (``peftkit.stats`` fills it);
  ``StreamingSVD``: a rank-k truncated SVD of such a G, updated token chunk by token chunk in one pass.
- ``IncrementalPCA``: centred incremental PCA of layer inputs (activations fp32, mean/variance sums fp64).

Nothing here knows a model, a layer or a process group: matrices in, factors out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch


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


STREAM_CHUNK = 128


class StreamingSVD:
    """A rank-``rank`` truncated SVD Ĝ = U·diag(s)·Vᵀ of a gradient G = Σ aᵢ·bᵢᵀ that arrives once, as terms
    (a (m, c), b (n, c): a layer's output gradients and inputs of c tokens), never forming G.

    Each chunk of tokens updates Ĝ to the best rank-``rank`` approximation of Ĝ + a·bᵀ
    (incremental SVD, Brand 2006): orthonormal bases of [U, a] and [V, b] from the eigendecomposition of their
    Gram matrices (a direction whose eigenvalue is below the Gram's rounding lies in the span of the others and
    is dropped; in the state's dtype: U and V are only the start of an exact Rayleigh–Ritz pass), the
    SVD of the small core, truncation. Unlike a Gaussian range G·Ω (error ~ σ_{k+1}/σᵢ, poor on the flat spectra
    of real gradients), the subspace adapts to the data as it streams: on all-MiniLM-L6-v2's and SmolLM2's
    gradients its top-2r span, followed by one exact product GᵀU (Rayleigh–Ritz, ``gradient_passes``), keeps
    LoRA-GA's first step to cos ≥ 0.999 at rank = 6·2r. Costs about 8·rank·(m + n) FLOPs per token. Not linear in
    G: under several processes the per-process states are merged (``merged``), not summed.
    """

    def __init__(self, m: int, n: int, rank: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.rank = rank
        self.u = torch.zeros(m, 0, dtype=dtype, device=device)
        self.v = torch.zeros(n, 0, dtype=dtype, device=device)
        self.s = torch.zeros(0, dtype=torch.float64, device=device)

    def add(self, a: torch.Tensor, b: torch.Tensor, weight: float = 1.0) -> None:
        """Ĝ += weight·a·bᵀ for a (m, c), b (n, c), in chunks of ``STREAM_CHUNK`` tokens (at least ``rank``: per
        token the small factorizations cost ~rank³/chunk, the projections ~chunk)."""
        chunk = max(self.rank, STREAM_CHUNK)
        for start in range(0, a.shape[1], chunk):
            self._update(a[:, start:start + chunk], b[:, start:start + chunk], weight)

    @staticmethod
    def _orthonormal_factor(basis: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(X (K, K'), F (K', K)) with [basis, new]·X orthonormal and [basis, new] = ([basis, new]·X)·F."""
        # basis has orthonormal columns (the previous update's output): its own Gram block is I.
        cross = basis.mT @ new
        eye = torch.eye(basis.shape[1], dtype=new.dtype, device=new.device)
        gram = torch.cat([torch.cat([eye, cross], 1), torch.cat([cross.mT, new.mT @ new], 1)], 0)
        values, vectors = torch.linalg.eigh(gram)
        # Below the rounding of an fp32 (fp64) Gram matrix an eigenvalue is noise: its direction is dropped.
        keep = values > values[-1] * (1e-12 if basis.dtype == torch.float64 else 1e-6)
        values, vectors = values[keep], vectors[:, keep]
        return vectors / values.sqrt(), values.sqrt()[:, None] * vectors.mT

    def _update(self, a: torch.Tensor, b: torch.Tensor, weight: float) -> None:
        a, b = a.to(self.u.dtype), b.to(self.u.dtype)
        norm_a, norm_b = torch.linalg.vector_norm(a, dim=0), torch.linalg.vector_norm(b, dim=0)
        live = (norm_a > 0) & (norm_b > 0)  # padding: a zero output gradient adds nothing
        if not bool(live.all()):
            if not bool(live.any()):
                return
            a, b, norm_a, norm_b = a[:, live], b[:, live], norm_a[live], norm_b[live]
        # Unit columns on both sides (their scales go into the core), so that a small eigenvalue of a Gram matrix
        # means a direction in the span of the others, never a small scale.
        a, b, weights = a / norm_a, b / norm_b, (norm_a * norm_b).double() * weight
        kept = self.s.shape[0]
        x_left, f_left = self._orthonormal_factor(self.u, a)
        x_right, f_right = self._orthonormal_factor(self.v, b)
        middle = torch.cat([self.s, weights]).to(a.dtype)
        w, s, zh = torch.linalg.svd((f_left * middle) @ f_right.mT, full_matrices=False)
        k = min(self.rank, s.shape[0])
        left, right = x_left @ w[:, :k], x_right @ zh[:k].mT
        self.u = torch.addmm(a @ left[kept:], self.u, left[:kept])
        self.v = torch.addmm(b @ right[kept:], self.v, right[:kept])
        self.s = s[:k].double()

    def scale(self, factor: float) -> None:
        self.s = self.s * factor

    def merged(self, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> StreamingSVD:
        """The rank-``rank`` truncated SVD of the sum of several states (u, s, v), fed in the given order."""
        out = StreamingSVD(self.u.shape[0], self.v.shape[0], self.rank, self.u.dtype, self.u.device)
        for u, s, v in parts:
            out.add(u * s.to(u.dtype), v)  # zero-padded columns are skipped as tokens without gradient
        return out

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U (m, k), s (k,) fp64, V (n, k)), σ descending."""
        return self.u, self.s, self.v


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
    the optimistic bound (α_j = σ̃_{j+1}, never more than the sound one) is within ``tolerance``. It returns
    once every bound is ≤ ``tolerance`` (default ``default_tolerance``: 1e-6 for fp32 G, 1e-11 for fp64:
    round-off), and gives up (None) when a gap closes (the top-j subspace is then ill-determined
    and only the exact SVD reproduces LAPACK's choice; a gap below the rounding level eps·√max(m, n)·σ̃₁ of G·v
    counts as closed; the bound includes eps·√rank for storing the factors in G's dtype), when the sound bound
    stops improving between probes (a tail the block cannot absorb, or a direction it never captured), or after
    ``max_iterations`` (default: as many as cost the FLOPs of the exact SVD, ``_exact_flops``). Ω and the probes come
    from CPU generators seeded by ``seed``: every process gets the same factors. ``report`` (a dict) receives
    ``iterations``, ``bound`` (the largest sin θ bound at the end; with the probe once it ran), ``certified`` and
    ``probes`` (how many probes ran).
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



def stream_bytes(k: int, m: int, n: int, element: int = 4) -> int:
    """Bytes one layer holds on the streamed path: U (m, k) and V (n, k) in the streamed pass, then a basis and
    its product, (m, k) and (n, k), in each further pass (``sketch_passes`` ≥ 2)."""
    k = min(k, m, n)
    return (m + n) * k * element


def top_singular_triplets(stat: torch.Tensor, rank: int, solver: str = "exact", *,
                          iterations: int = 8, seed: int = 0, tolerance: float | None = None,
                          boundaries: Iterable[int] | None = None,
                          report: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (m, rank), S (rank,), Vh (rank, n)) of a gradient G (m, n), signed, in G's dtype.

    ``solver``: ``"exact"`` (LAPACK's full thin SVD), ``"randomized"`` (``randomized_svd`` with ``iterations``
    power iterations, unchecked) or ``"auto"`` (``solver_for``: on wide layers ``checked_svd`` to ``tolerance``
    (None: round-off, ``default_tolerance``) at ``boundaries``, the exact SVD wherever that cannot certify its
    answer). ``report`` (a dict) receives ``solver`` (what ran) and, for the checked solver, its
    ``iterations``, ``bound`` and ``certified``."""
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


def orthonormal(block: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of ``block`` (thin QR in fp64), in ``block``'s dtype."""
    return torch.linalg.qr(block.double())[0].to(block.dtype)


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
    its Gram matrix (the same top components, 3–5× faster); ``"lowrank"``: ``torch.svd_lowrank(q=2k, niter=4)``
    under a forked RNG seeded with ``seed`` (PEFT's EVA), for parity. Components (k, d) are sign-fixed on their
    largest-|·| entry.
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
