"""The gradient inits' passes over the data (LoRA-GA, LoRA-One): their shared options, the plan of sketches and
layer groups that bounds the memory, and the top-r triplets of every layer's full-weight gradient.

- ``GradientStatisticsOptions``: the options every gradient-statistics init declares (sketch, passes, groups,
  memory, device, solver); a method's options dataclass inherits it.
- ``sketch_plan`` / ``gradient_groups_of``: per layer a sketch size or G itself; groups of layers, one pass each,
  so that at most one group's G is held (groups from a memory budget or a count).
- ``gradient_triplets``: the top-r triplets of every layer's G (``peftkit.stats.gradient_statistics`` measures,
  ``peftkit.linalg`` decomposes), by one pass per group, a single-pass sketch, or subspace iteration over the data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import ConfigError
from .layer import AdapterLayer
from .linalg import SOLVERS, orthonormal, sign_fix, stream_bytes, top_singular_triplets
from .stats import device_of, distributed, gradient_statistics
from .validation import option

MAX_SKETCH_PASSES = 16


@dataclass
class GradientStatisticsOptions:
    """The options of an init that decomposes each layer's full-weight gradient G (``gradient_triplets``).

    A method's options dataclass inherits it; its own fields come first (``dataclasses`` orders a base's fields
    before a subclass's, so the method declares its fields in a dataclass listed after this one among its bases).
    """

    # auto: per layer a streamed rank-k truncated SVD of G (sketch_plan: k = max(192, 12·triplets) in one pass,
    # max(96, 6·triplets) with more passes), never forming G, an approximation (accuracy:
    # docs/methods/data-driven-inits.md); k: that rank; None: the exact path (whole G)
    gradient_sketch: int | str | None = "auto"
    # passes over the data of the sketch path: 1 = the streamed truncated SVD alone; p >= 2 = the streamed SVD,
    # then p - 1 exact products on its span (Rayleigh–Ritz, subspace iteration)
    sketch_passes: int = option(1, ge=1, le=MAX_SKETCH_PASSES)
    # Bounded memory (gradient_triplets): layers in groups, one pass over the batches each.
    gradient_groups: int | None = option(None, gt=0)  # k groups (None: from gradient_memory)
    gradient_memory: float | str | None = "auto"  # MiB of G held at once; auto: 1/4 of the free memory
    gradient_device: str = option("model", choices=("model", "cpu"))  # "cpu": G accumulated in host memory
    # auto: exact SVD below min(m, n) = 512, on wider layers the certified truncated solver
    # (peftkit.linalg.checked_svd), the exact SVD wherever it cannot certify sin θ ≤ svd_tolerance; exact: LAPACK;
    # randomized: fixed iterations, unchecked
    svd: str = option("auto", choices=("exact", "randomized", "auto"))
    svd_iterations: int = option(8, ge=0)  # power iterations of svd="randomized"
    # svd="auto": the largest certified sin of the principal angles; None: round-off (1e-6 for an fp32 G, 1e-11
    # fp64), so that the default init is the exact-SVD init to round-off (the authors' formula is an exact SVD)
    svd_tolerance: float | None = option(None, gt=0, lt=1)


GRADIENT_OPTION_HELP = {
    "sketch_passes": f"an integer from 1 to {MAX_SKETCH_PASSES} (passes over the data of the sketch path: 1 is the "
                     "streamed truncated SVD alone, p >= 2 the streamed SVD then p - 1 exact products on its span)",
    "gradient_sketch": "'auto' (a streamed truncated SVD per layer of rank max(192, 12 x the triplets) in one pass, "
                       "max(96, 6 x the triplets) with more passes), a positive integer k (that rank), or None "
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


def gradient_groups_of(model: nn.Module, layers: dict[str, AdapterLayer],
                       options: Mapping[str, Any]) -> list[list[str]]:
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
        store = torch.device("cpu") if options["gradient_device"] == "cpu" else device_of(model)
        budget = free_memory_bytes(store) // 4
    else:
        budget = int(float(memory) * 2**20)
    return plan_groups(sizes, budget=budget)


# (minimum k, k per triplet) of the streamed SVD by number of passes: what keeps LoRA-GA's first step to
# cos >= 0.999 on real MiniLM/SmolLM2 gradients (docs/methods/data-driven-inits.md). One pass: k = 12·2r (192 at
# r = 8; worst layer 0.9994 / 0.9997, 96: 0.9973 / 0.9954); with the exact Rayleigh–Ritz pass after it 6·2r is
# enough (0.9990 / 0.9995; 64: 0.9975-0.9987), at a second pass over the data.
SKETCH_RANKS = {1: (192, 12), 2: (96, 6)}
# Options that ask for the exact path: with any of them, gradient_sketch="auto" keeps G.
EXACT_PATH_OPTIONS = {"gradient_groups": lambda v: v is not None, "gradient_device": lambda v: v == "cpu",
                      "svd": lambda v: v in ("exact", "randomized")}


def sketch_plan(layers: dict[str, AdapterLayer], ranks: Mapping[str, int],
                options: Mapping[str, Any]) -> dict[str, int | None]:
    """Per layer the rank k of the streamed truncated SVD ``gradient_statistics`` takes, or None where it keeps G.

    ``gradient_sketch``: None: G everywhere (the exact path); an int k: max(k, triplets); ``"auto"`` (the
    default): k = max(minimum, per-triplet × triplets) of ``SKETCH_RANKS`` for ``sketch_passes`` (one pass, or
    more), unless an option of the exact path is set (``EXACT_PATH_OPTIONS``: ``gradient_groups``,
    ``gradient_device="cpu"``, ``svd="exact"`` or ``"randomized"``), which keeps G. A layer whose stream would
    hold at least as many bytes as its G (``stream_bytes``) keeps G: there the exact statistic is also the
    smaller one."""
    choice = options.get("gradient_sketch", "auto")
    minimum, per_triplet = SKETCH_RANKS[min(options.get("sketch_passes", 1), 2)]
    if choice == "auto" and any(test(options.get(key)) for key, test in EXACT_PATH_OPTIONS.items()):
        choice = None
    plan: dict[str, int | None] = {}
    for name, layer in layers.items():
        m, n, triplets = layer.out_features, layer.in_features, ranks[name]
        if choice is None:
            plan[name] = None
            continue
        k = max(minimum, per_triplet * triplets) if choice == "auto" else max(int(choice), triplets)
        plan[name] = k if stream_bytes(k, m, n) < m * n * 4 else None
    return plan


def rng_states() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.random.get_rng_state(), cuda


def set_rng_states(states: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.random.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state_all(states[1])


def gradient_triplets(model: nn.Module, layers: dict[str, AdapterLayer], batches: list[Mapping],
                      ranks: Mapping[str, int], options: Mapping[str, Any], *, seed: int = 0,
                      negate: bool = False, boundaries: Callable[[int], Iterable[int]] | None = None,
                      ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(name, U (m, r), S (r,), Vh (r, n)) of every layer's full-weight gradient G (−G with ``negate``),
    r = ranks[name], in G's dtype (fp32; fp64 on fp64 bases), in the order of ``layers``' groups.

    The layers are split into groups (``gradient_groups_of``); each group costs one pass over ``batches`` in
    which only its layers accumulate G, then each of its G is decomposed and freed before the next group's
    pass. So at most one group's G is held, and the factors are the same as with one group (G of a layer does
    not depend on which other layers are measured: bit-equal in fp64). The backward of a pass stops at the
    group's first layer. The default ``options["gradient_sketch"]="auto"`` (or an int k) instead streams a rank-k
    truncated SVD of every layer's G in one pass (``sketch_plan``; a layer whose G is smaller than its stream
    keeps G) and takes its top triplets; with ``sketch_passes`` ≥ 2, exact products on its span follow
    (``_subspace_iteration``).
    ``boundaries(rank)``: the j whose top-j subspaces the method uses separately (``checked_svd``; default: rank).
    """
    sizes = sketch_plan(layers, ranks, options)
    store_on = "cpu" if options["gradient_device"] == "cpu" else None
    solve_on = device_of(model)
    passes = options.get("sketch_passes", 1)
    streams = None
    if any(k is not None for k in sizes.values()):
        # One group: the streamed layers hold O((m + n)·k), the rest (whose G is smaller than a stream) hold G.
        plan = [list(layers)]
        streams = {name: k for name, k in sizes.items() if k is not None}
    else:
        plan = gradient_groups_of(model, layers, options)
    # Every pass draws the same dropout masks as the first (the state at the start), and the draws made between
    # passes (e.g. LoRA-GA's random split) continue as after one pass: the same numbers as with one group.
    start = rng_states()
    for index, group in enumerate(plan):
        resume = rng_states() if index else None
        if resume is not None:
            set_rng_states(start)
        stats = gradient_statistics(model, {name: layers[name] for name in group}, batches, store_on=store_on,
                                    streams=streams)
        if resume is not None:
            set_rng_states(resume)
        iterated = {}
        for name in streams or ():
            u, sv, v = stats.pop(name).factors()
            if passes == 1:  # the stream's own top triplets (−G = U·diag(s)·(−V)ᵀ)
                rank = ranks[name]
                if u.shape[1] < rank:  # fewer tokens than rank reached the layer: G's rank is lower; complete
                    u, v = _completed(u, rank), _completed(v, rank)  # with σ = 0
                u, vh = sign_fix(u[:, :rank], (-v if negate else v)[:, :rank].mT)
                yield name, u, _padded_values(sv, rank).to(u.dtype), vh
            else:
                # Only the left basis U goes on, zero-padded to k columns where fewer tokens than k reached the
                # layer (QR completes it to an orthonormal basis; G is exact on it).
                iterated[name] = _padded(u, streams[name])
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


def _padded(block: torch.Tensor, columns: int) -> torch.Tensor:
    return torch.cat([block, block.new_zeros(block.shape[0], max(columns - block.shape[1], 0))], 1)


def _completed(basis: torch.Tensor, columns: int) -> torch.Tensor:
    """``basis`` (m, c), orthonormal columns, completed to ``columns`` orthonormal columns. Its own columns stay as
    they are: QR may flip their signs, and a left and a right factor flipped apart would no longer be pairs."""
    out = orthonormal(_padded(basis, columns))
    out[:, :basis.shape[1]] = basis
    return out


def _padded_values(values: torch.Tensor, count: int) -> torch.Tensor:
    return torch.cat([values[:count], values.new_zeros(max(count - values.shape[0], 0))])


def _subspace_iteration(model: nn.Module, layers: dict[str, AdapterLayer], batches: list[Mapping],
                        ranks: Mapping[str, int], first: dict[str, torch.Tensor], passes: int,
                        start: tuple, negate: bool) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Top triplets of each layer's G (−G with ``negate``) by subspace iteration over the data (Halko,
    Martinsson & Tropp 2011, alg. 4.3 with the products taken in backward hooks), started from ``first``: the
    left basis U (m, k) of the first pass's streamed truncated SVD (``peftkit.linalg.StreamingSVD``). Every
    further pass multiplies an orthonormal basis of the last block by Gᵀ or G (alternately: Gᵀ·orth(U), then
    G·orth(Gᵀ·Q), ...), each replaying the first pass's dropout masks (``start``). After ``passes`` passes the
    last product B = Gᵀ·Q (or G·P) gives G ≈ Q·Bᵀ (or B·Pᵀ) exactly on that basis: the SVD of the small B is
    the Rayleigh–Ritz step. Two passes: the streamed span, exact on it (the default); each further pass shrinks
    the error of direction i by about σ_{k+1}/σᵢ."""
    products = first  # the caller's dict: emptied below, so no pass holds the previous pass's block
    side = {name: "left" for name in first}  # "left": the product is G·R (its columns span a left range)
    bases: dict[str, torch.Tensor] = {}
    resume = rng_states()
    for _ in range(passes - 1):
        blocks = {}
        for name, product in products.items():
            bases[name] = orthonormal(product)
            blocks[name] = (None, bases[name]) if side[name] == "left" else (bases[name], None)
        products.clear()
        set_rng_states(start)
        stats = gradient_statistics(model, {name: layers[name] for name in blocks}, batches, products=blocks)
        for name, sketch in stats.items():
            products[name] = sketch.z if side[name] == "left" else sketch.y
            side[name] = "right" if side[name] == "left" else "left"
        del stats, blocks
    set_rng_states(resume)
    for name, product in products.items():
        rank, dtype = ranks[name], product.dtype
        work = product.double()
        if negate:
            work = -work  # −G ≈ Q·(−B)ᵀ: the products are linear in G
        if side[name] == "right":  # B = Gᵀ·Q (n, k): G ≈ Q·Bᵀ
            small_u, sv, vh = torch.linalg.svd(work.mT, full_matrices=False)
            u = bases[name].double() @ small_u
        else:  # B = G·P (m, k): G ≈ B·Pᵀ, P an orthonormal basis (sketch_passes 3, 5, ...)
            u, sv, small_vh = torch.linalg.svd(work, full_matrices=False)
            vh = small_vh @ bases[name].double().mT
        u, vh = sign_fix(u[:, :rank], vh[:rank])
        yield name, u.to(dtype), sv[:rank].to(dtype), vh.to(dtype)
