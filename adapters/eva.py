"""EVA (eva.md): A of each layer = top principal directions of its inputs (centred incremental PCA), B = 0,
ranks redistributed across layers by explained variance.

Per layer l with configured rank r_l: k_l = min(round(r_l·ρ), in_l) components are tracked; the budget
R = Σ r_l goes to the top-R pooled explained-variance ratios (at most k_l per layer). A layer is converged when
its first r_l^new components moved by cos ≥ τ in the last update; the loop stops when all are, or after
``max_batches`` forward passes (with a warning naming the others). Layers that receive the very same input
tensor (q/k/v, gate/up) share one PCA, the representative holding the group's largest rank (PEFT's rule).
Inputs are gathered from every process, so all processes run the identical PCA and agree on ranks and A.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import Counter
from dataclasses import dataclass

import torch

from peftkit import registry
from peftkit.errors import ConfigError
from peftkit.inject import _set_child, set_active, state_of
from peftkit.linalg import IncrementalPCA
from peftkit.stats import adapter_name_of, base_model, check_batches, gather_rows, selected_token_mask
from peftkit.validation import option

ALPHA_RULES = ("peft", "keep_scaling", "constant")


@dataclass
class EvaOptions:
    rho: float = option(2.0, ge=1)  # per-layer cap: at most round(r·ρ) components (ρ = 1: no redistribution)
    tau: float = option(0.99, gt=0, le=1)  # convergence: cos(component, previous component) ≥ τ
    use_label_mask: bool = True  # only tokens with labels != label_mask_value (and attention_mask == 1)
    label_mask_value: int = -100
    whiten: bool = False  # A rows divided by √σᵢ
    # peft: α_l = α·r_new/r (s = α/r kept without rsLoRA); keep_scaling: the α that keeps s under either rule
    # (α·√(r_new/r) with rsLoRA); constant: α unchanged (the authors' repo).
    alpha_rule: str = option("peft", choices=ALPHA_RULES)
    max_batches: int = option(100, gt=0)  # cap on forward passes (the reference loops have none)
    # "exact" (LAPACK) or "lowrank" (seeded svd_lowrank, q = 2k: PEFT's EVA, for parity)
    svd: str = option("exact", choices=("exact", "lowrank"))


def allocate(ratios: dict[str, torch.Tensor], caps: dict[str, int], budget: int) -> dict[str, int]:
    """Top-``budget`` of the pooled ratios (at most caps[l] per layer, layer order breaks ties): ranks per layer."""
    keys = [name for name in ratios for _ in range(min(caps[name], ratios[name].numel()))]
    values = torch.cat([ratios[name][: caps[name]].double() for name in ratios])
    order = torch.argsort(values, descending=True, stable=True)
    counts = Counter(keys[i] for i in order[:budget].tolist())
    return {name: counts.get(name, 0) for name in ratios}


def eva_components(model, layers, config, batches, adapter: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """({layer: A (r_new, in)}, {layer: r_new}) from the incremental PCA of every target layer's inputs."""
    options = vars(config.axis_options("init"))  # a fresh filled instance: its __dict__ is ours
    ranks = {name: layer.ranks[adapter] for name, layer in layers.items()}
    caps = {name: min(round(ranks[name] * options["rho"]), layer.in_features) for name, layer in layers.items()}
    current: dict[str, torch.Tensor | None] = {"mask": None}
    device = next(model.parameters()).device

    def rows_of(x: torch.Tensor) -> torch.Tensor:
        mask = current["mask"]
        if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
            return x[mask]
        return x.reshape(-1, x.shape[-1])

    def set_batch(batch) -> dict:
        current["mask"] = selected_token_mask(batch, options["use_label_mask"], options["label_mask_value"])
        if current["mask"] is not None:
            current["mask"] = current["mask"].to(device)
        # Labels only choose the tokens (the mask above): without them the model skips its loss, which for a
        # causal LM is a cross-entropy over the whole vocabulary at every position.
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "labels"}

    with base_model(model, train=False), torch.no_grad():
        # Equal-input detection: layers fed the very same tensor (references held, so storage is not reused).
        seen: dict[str, torch.Tensor] = {}
        handles = [layer.base_layer.register_forward_hook(
            lambda module, args, out, name=name: seen.__setitem__(name, args[0])) for name, layer in layers.items()]
        try:
            model(**set_batch(batches[0]))
        finally:
            for handle in handles:
                handle.remove()
        representative: dict[str, str] = {}
        for name in layers:
            key = (seen[name].data_ptr(), tuple(seen[name].shape), tuple(seen[name].stride()))
            first = next((other for other in representative if representative[other] == other and (
                seen[other].data_ptr(), tuple(seen[other].shape), tuple(seen[other].stride())) == key), None)
            representative[name] = first or name
        seen.clear()  # frees the held inputs (the hooks that filled it are removed)
        groups = {rep: [n for n in layers if representative[n] == rep] for rep in set(representative.values())}
        for members in groups.values():
            top = max(caps[n] for n in members)
            for n in members:
                caps[n] = top
        reps = [n for n in layers if representative[n] == n]
        pcas = {rep: IncrementalPCA(caps[rep], options["svd"]) for rep in reps}
        converged = {rep: torch.zeros(caps[rep], dtype=torch.bool) for rep in reps}
        done = {rep: False for rep in reps}
        active = set(reps)

        def make_hook(rep: str):
            def hook(module, args, output):
                if rep not in active:
                    return
                rows = gather_rows(rows_of(args[0]).float())
                pca = pcas[rep]
                if rows.shape[0] < pca.n_components:
                    return  # too few selected tokens for k components (PEFT skips the batch likewise)
                previous = pca.components
                pca.partial_fit(rows)
                if previous is not None:
                    converged[rep] = torch.nn.functional.cosine_similarity(pca.components, previous) >= options["tau"]
            return hook

        handles = [layers[rep].base_layer.register_forward_hook(make_hook(rep)) for rep in reps]
        allocation = dict(caps)
        fallback: set[str] = set()
        passes = 0
        try:
            for batch in itertools.cycle(batches):
                for rep in reps:
                    ok = bool(converged[rep][: allocation[rep]].all())
                    if not done[rep] and ok:
                        done[rep] = True
                        active.discard(rep)
                    elif done[rep] and not ok:
                        done[rep] = False
                        active.add(rep)
                if all(done.values()):
                    break
                if passes == options["max_batches"]:
                    late = sorted(n for n in layers if not done[representative[n]])
                    warnings.warn(f"eva: max_batches={passes} reached before convergence (tau={options['tau']}) of "
                                  f"{late}; their current components are used", stacklevel=3)
                    break
                model(**set_batch(batch))
                passes += 1
                if passes == len(batches):
                    # A whole pass without k selected rows in any batch (e.g. BERT's pooler sees one row per
                    # sample): that layer keeps the standard init and its rank, outside the redistribution.
                    for rep in reps:
                        if pcas[rep].components is None and rep not in fallback:
                            fallback.add(rep)
                            done[rep] = True
                            active.discard(rep)
                            converged[rep] = torch.ones(caps[rep], dtype=torch.bool)
                pooled = [n for n in layers if representative[n] not in fallback]
                if pooled and all(pcas[representative[n]].components is not None for n in pooled):
                    ratios = {n: pcas[representative[n]].explained_variance_ratio for n in pooled}
                    allocation.update(allocate(ratios, caps, sum(ranks[n] for n in pooled)))
                    for n, rep in representative.items():  # the representative holds its group's largest rank
                        if n != rep and allocation[n] > allocation[rep]:
                            allocation[n], allocation[rep] = allocation[rep], allocation[n]
        finally:
            for handle in handles:
                handle.remove()
    missing = [n for n in layers if pcas[representative[n]].components is None]
    if len(missing) == len(layers):
        raise ConfigError("data: no batch had at least k = round(r·rho) selected tokens for any target layer; pass "
                          "larger batches, or check attention_mask/labels (use_label_mask=False keeps all tokens)")
    if missing:
        warnings.warn(f"eva: no batch had at least k = round(r·rho) selected rows for {missing}; they keep the "
                      "standard LoRA init and their configured rank", stacklevel=3)
    components = {}
    for name in layers:
        if name in missing:
            components[name] = None
            allocation[name] = ranks[name]
            continue
        pca = pcas[representative[name]]
        a = pca.components[: allocation[name]].clone()
        if options["whiten"]:
            a = a / pca.singular_values[: allocation[name]].sqrt()[:, None]
        components[name] = a
    return components, allocation


@registry.init("eva", options=EvaOptions, needs_data=True, architectures=("lora", "dora"), per_step_batches=True,
               description="A = top principal directions of each layer's inputs, B = 0, ranks by explained variance")
def eva_init(model, layers, config, data) -> None:
    options = vars(config.axis_options("init"))  # a fresh filled instance: its __dict__ is ours
    batches = check_batches(data, "eva")
    adapter = adapter_name_of(model, config)
    components, allocation = eva_components(model, layers, config, batches, adapter)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    dropped = []
    for name, layer in layers.items():
        r, alpha = layer.ranks[adapter], layer.alphas[adapter]
        r_new = allocation[name]
        if r_new == 0:
            layer.delete_adapter(adapter)
            if not len(layer.adapters):
                _set_child(model, name, layer.base_layer)
            dropped.append(name)
            continue
        if r_new != r:
            if options["alpha_rule"] == "peft":
                alpha = alpha * r_new / r
            elif options["alpha_rule"] == "keep_scaling":
                alpha = alpha * (math.sqrt(r_new / r) if config.rslora else r_new / r)
            layer.recreate_adapter(adapter, r_new, alpha, config)
        branch = layer.adapters[adapter]
        if components[name] is None:  # the standard init, from the injection
            continue
        with torch.no_grad():
            branch.lora_A.weight.copy_(components[name].to(branch.lora_A.weight.dtype))
            branch.lora_B.weight.zero_()
        if r_new != config.r:
            rank_pattern[name] = r_new
        if alpha != config.alpha:
            alpha_pattern[name] = alpha
    # Per-layer entries first: the first matching pattern key wins.
    config.rank_pattern = {**rank_pattern, **config.rank_pattern}
    config.alpha_pattern = {**alpha_pattern, **config.alpha_pattern}
    if dropped:
        config.targets = [name for name in layers if name not in dropped]
    set_active(model, state_of(model).active)


registry.register_method(
    "eva", architecture="lora", init="eva",
    lr_convention=registry.LRConvention("lora", 1.0, "authors' README: lr 5e-4, a LoRA rate (eva.md, Defaults)"),
    description="EVA (Paischer et al. 2024): A from the centred incremental PCA of layer inputs, B = 0, ranks "
                "redistributed by explained variance (rho, tau); PEFT LoRA format with rank/alpha patterns",
)
