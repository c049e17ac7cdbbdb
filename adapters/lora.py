"""LoRA, with PEFT's semantics (lora.md): y = x Wᵀ + b + s·(D(x) Aᵀ) Bᵀ, s = α/r (α/√r with rsLoRA).

A ~ Kaiming-uniform(a=√5) (bound 1/√in), B = 0, dropout only on the branch input, adapters in fp32 on
half-precision and quantized bases. The delta is added with one fused ``addmm_`` into the base output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit import registry
from peftkit.errors import ConfigError, StateError
from peftkit.expert_layer import ExpertParameterLayer
from peftkit.layer import AdapterLayer, adapter_dtype, linear_types
from peftkit.validation import option


@dataclass
class LoraOptions:
    # PEFT's init_lora_weights: True (A Kaiming-uniform, B = 0), "gaussian" (A ~ N(0, 1/r)), False (debug:
    # B random too, so the model changes at init).
    init_lora_weights: bool | str = option(True, choices=(True, False, "gaussian"), expect=(
        "one of true, false, 'gaussian' (PEFT's 'pissa', 'pissa_niter_K', 'olora', 'milora' are peftkit methods: "
        "peftkit.wrap(model, 'pissa', niter=K), 'olora', 'milora', or init='pissa' on another preset)"))


def _weight_init_method(init: Any) -> dict[str, Any] | None:
    """PEFT's ``init_lora_weights`` values that factorize W ("pissa", "pissa_niter_K", "olora", "milora") as the
    peftkit method (and its options) that implements them; None for any other value."""
    if not isinstance(init, str):
        return None
    if init in ("pissa", "olora", "milora"):
        return {"method": init}
    prefix = "pissa_niter_"
    if init.startswith(prefix):
        if not init[len(prefix):].isdigit() or int(init[len(prefix):]) < 1:
            raise ConfigError(f"init_lora_weights: expected 'pissa_niter_K' with an integer K >= 1, got {init!r}")
        return {"method": "pissa", "niter": int(init[len(prefix):])}
    return None


class LoraBranch(nn.Module):
    """One LoRA adapter: A (r, in) as ``lora_A.weight``, B (out, r) as ``lora_B.weight`` (PEFT's keys)."""

    def __init__(self, in_features: int, out_features: int, r: int, dropout: float,
                 dtype: torch.dtype, device: torch.device, init: bool | str = True) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(r, out_features, bias=False, dtype=dtype, device=device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        # An optional frozen pair (A0 (r0, in), B0 (out, r0)) subtracted from the update, so that
        # ΔW = s·(B·A − B0·A0). Data-driven inits (LoRA-GA) use it to start from non-zero factors while
        # keeping the function, without touching (possibly quantized) base weights.
        self.register_buffer("offset_A", None)
        self.register_buffer("offset_B", None)
        self.reset(init)

    def set_offset(self, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """Freeze (A0, B0) as the offset pair: A0 (r0, in), B0 (out, r0), in the branch dtype."""
        dtype = self.lora_A.weight.dtype
        device = self.lora_A.weight.device
        # Always a copy: the offset must not move when the tensors it was built from (e.g. the live
        # trainable factors at init) are updated.
        self.offset_A = a0.detach().to(device, dtype).clone(memory_format=torch.contiguous_format)
        self.offset_B = b0.detach().to(device, dtype).clone(memory_format=torch.contiguous_format)

    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B') with ΔW = s·B'·A': the trainable pair, stacked with the negated offset pair if any."""
        a = self.lora_A.weight
        b = self.lora_B.weight
        if self.offset_A is None:
            return a, b
        return torch.cat([a, self.offset_A], 0), torch.cat([b, -self.offset_B], 1)

    @torch.no_grad()
    def reset(self, init: bool | str = True) -> None:
        if init is True:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.lora_A.weight.shape[0])
            nn.init.zeros_(self.lora_B.weight)
        elif init is False:
            self.lora_A.reset_parameters()
            self.lora_B.reset_parameters()
        else:
            raise ConfigError(f"init_lora_weights: expected True, False or 'gaussian', got {init!r}")


@registry.architecture("lora", options=LoraOptions, description="low-rank update s·B·A (PEFT's LoRA)",
                       peft_type="LORA")
class LoraLayer(AdapterLayer):
    """LoRA on a linear base (nn.Linear, Conv1D, bnb 4/8-bit); ``for_base`` hands embeddings and ConvNd bases to
    LoraEmbeddingLayer and LoraConvLayer."""

    # Every suffix a PEFT LoRA file can hold for the layers above (embeddings have no ".weight").
    saved_suffixes = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")
    supported_types = linear_types() + (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)

    @staticmethod
    def options_from_peft_config(peft_config: Any) -> dict[str, Any]:
        """The options of a PEFT ``LoraConfig`` object (r, alpha, dropout, rslora, init_lora_weights); a PEFT
        option peftkit's LoRA does not implement is one ConfigError naming it."""
        kind = type(peft_config).__name__
        unsupported = {
            "use_dora": False, "bias": "none", "layers_to_transform": None, "layers_pattern": None,
            "lora_bias": False, "megatron_config": None,
        }
        for field_name, neutral in unsupported.items():
            value = getattr(peft_config, field_name, neutral)
            if value not in (neutral, [], ()):
                raise ConfigError(f"{kind}.{field_name}={value!r} is not supported by peftkit's LoRA; leave it at "
                                  f"{neutral!r} (or merge such an adapter with PEFT and use the merged model)")
        init = peft_config.init_lora_weights
        options = dict(r=peft_config.r, alpha=float(peft_config.lora_alpha), dropout=float(peft_config.lora_dropout),
                       rslora=bool(peft_config.use_rslora))
        weight_init = _weight_init_method(init)
        if weight_init is not None:  # PEFT's weight-factorizing inits are peftkit methods (adapters/pissa.py)
            return {**options, **weight_init}
        if init not in (True, False, "gaussian"):
            raise ConfigError(f"{kind}.init_lora_weights={init!r}: peftkit reads True, False, 'gaussian', 'pissa', "
                              "'pissa_niter_K', 'olora' and 'milora'; its data-driven inits are methods of their own "
                              "(peftkit.wrap(model, 'lora-ga' / 'eva' ...))")
        return {**options, "init_lora_weights": init}

    @classmethod
    def for_base(cls, base_layer: nn.Module) -> type[AdapterLayer]:
        if isinstance(base_layer, nn.Embedding):
            return LoraEmbeddingLayer
        if isinstance(base_layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return LoraConvLayer
        return cls

    def make_branch(self, name: str, r: int, alpha: float, config: Any) -> nn.Module:
        init = config.options.get("architecture", {}).get("init_lora_weights", True)
        return LoraBranch(self.in_features, self.out_features, r, config.dropout,
                          adapter_dtype(self.base_layer), self.base_layer.weight.device, init)

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name, branch in self.live_branches():
            a, b = branch.effective_factors()
            x_a = x if x.dtype == a.dtype else x.to(a.dtype)
            if branch.dropout is not None:
                x_a = branch.dropout(x_a)
            hidden = F.linear(x_a, a)
            scale = self.scaling[name]
            if result.dtype == b.dtype and result.is_contiguous():
                flat = result.view(-1, self.out_features)
                hidden = hidden.reshape(-1, hidden.shape[-1])
                if self.kind in ("linear", "conv1d"):
                    # One fused op into the base output: no pass for the scaling, no new output tensor. (The
                    # base matmul saves its input, not its output, so writing into the output is safe.)
                    flat.addmm_(hidden, b.t(), alpha=scale)
                else:
                    # bitsandbytes outputs come from custom autograd Functions: no in-place writes there.
                    result = torch.addmm(flat, hidden, b.t(), alpha=scale).view(result.shape)
            else:
                result = result + (F.linear(hidden, b) * scale).to(result.dtype)
        return result

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.adapters[name].effective_factors()
        return (b @ a) * self.scaling[name]

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        # With an offset pair the saved adapter is the exact rank-(r + r0) LoRA [A; A0], [B, −B0], which is
        # valid on the original base weights (PEFT reads it as plain LoRA).
        a, b = self.adapters[name].effective_factors()
        return {"lora_A.weight": a.detach(), "lora_B.weight": b.detach()}

    def load_saved_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        branch = self.adapters[name]
        if branch.offset_A is not None:
            raise StateError(f"{self.module_name}: cannot load saved tensors into an adapter with a frozen offset "
                             "pair; load the checkpoint into a plain base model (peftkit.load) instead")
        with torch.no_grad():
            branch.lora_A.weight.copy_(tensors["lora_A.weight"])
            branch.lora_B.weight.copy_(tensors["lora_B.weight"])

    def saved_rank_alpha(self, name: str) -> tuple[int, float]:
        branch = self.adapters[name]
        if getattr(branch, "offset_A", None) is None:  # embedding and conv branches have no offset pair
            return self.ranks[name], self.alphas[name]
        # Same scaling s at the saved rank r' = r + r0: α' = s·r' (s·√r' with rsLoRA).
        r_saved = self.ranks[name] + branch.offset_A.shape[-2]
        s = self.scaling[name]
        rslora = abs(self.alphas[name] / self.ranks[name] ** 0.5 - s) < abs(self.alphas[name] / self.ranks[name] - s)
        return r_saved, s * (r_saved ** 0.5 if rslora else r_saved)

    def factor_pairs(self) -> Iterator[tuple[str, nn.Parameter, nn.Parameter, float]]:
        for name in self.active_adapters:
            branch = self.adapters[name]
            yield name, branch.lora_A.weight, branch.lora_B.weight, self.scaling[name]


class LoraEmbeddingBranch(nn.Module):
    """Embedding LoRA: ``lora_embedding_A`` (r, V) and ``lora_embedding_B`` (d, r), plain parameters (PEFT's
    keys, no ".weight"). PEFT's init is reversed w.r.t. linear LoRA: A = 0, B ~ N(0, 1)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int, dtype: torch.dtype,
                 device: torch.device, init: bool | str = True) -> None:
        super().__init__()
        self.lora_embedding_A = nn.Parameter(torch.empty(r, num_embeddings, dtype=dtype, device=device))
        self.lora_embedding_B = nn.Parameter(torch.empty(embedding_dim, r, dtype=dtype, device=device))
        with torch.no_grad():
            if init is False:  # debug: both random, the model changes at init
                nn.init.normal_(self.lora_embedding_A)
            elif init is True or init == "gaussian":
                nn.init.zeros_(self.lora_embedding_A)
            else:
                raise ConfigError(f"init_lora_weights: expected True, False or 'gaussian', got {init!r}")
            nn.init.normal_(self.lora_embedding_B)


class LoraEmbeddingLayer(LoraLayer):
    """LoRA on ``nn.Embedding(V, d)``: out[t] = E[t] + s·(B A[:, t])ᵀ, no dropout (PEFT's Embedding).

    The base weight is exchanged in the (out, in) = (d, V) convention, i.e. Eᵀ, so that ΔW = s·B·A (d, V) and
    the merge machinery of AdapterLayer applies unchanged.
    """

    @classmethod
    def describe_base(cls, base_layer: nn.Module) -> tuple[str, tuple[int, int]]:
        return "embedding", (base_layer.embedding_dim, base_layer.num_embeddings)

    def make_branch(self, name: str, r: int, alpha: float, config: Any) -> nn.Module:
        init = config.options.get("architecture", {}).get("init_lora_weights", True)
        return LoraEmbeddingBranch(self.in_features, self.out_features, r, adapter_dtype(self.base_layer),
                                   self.base_layer.weight.device, init)

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.base_layer
        result = base(x, *args, **kwargs)
        # A scaled embedding (e.g. Gemma's embed_scale) scales the adapter's output too, as PEFT does.
        embed_scale = getattr(base, "embed_scale", None)
        for name, branch in self.live_branches():
            rows = F.embedding(x, branch.lora_embedding_A.t(), base.padding_idx, base.max_norm, base.norm_type,
                               base.scale_grad_by_freq, base.sparse)  # (..., r)
            delta = (rows @ branch.lora_embedding_B.t()) * self.scaling[name]
            if embed_scale is not None:
                delta = delta * embed_scale.to(delta.dtype)
            result = result + delta.to(result.dtype)
        return result

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dense = self.base_layer.weight.detach().t()
        return dense.to(dtype or (torch.float64 if dense.dtype == torch.float64 else torch.float32))

    def write_base_weight(self, dense: torch.Tensor) -> None:
        with torch.no_grad():
            self.base_layer.weight.copy_(dense.t().to(self.base_layer.weight.dtype))

    def delta_weight(self, name: str) -> torch.Tensor:
        branch = self.adapters[name]
        return (branch.lora_embedding_B @ branch.lora_embedding_A) * self.scaling[name]

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        branch = self.adapters[name]
        return {"lora_embedding_A": branch.lora_embedding_A.detach(),
                "lora_embedding_B": branch.lora_embedding_B.detach()}

    def load_saved_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        branch = self.adapters[name]
        with torch.no_grad():
            branch.lora_embedding_A.copy_(tensors["lora_embedding_A"])
            branch.lora_embedding_B.copy_(tensors["lora_embedding_B"])

    def factor_pairs(self) -> Iterator[tuple[str, nn.Parameter, nn.Parameter, float]]:
        # Not offered as a LoRA pair: gradient-hook methods (G = Δᵀ X) and LoRA+'s λ do not apply to lookups.
        return iter(())

    def tensor_roles(self) -> Iterator[tuple[nn.Parameter, str]]:
        for branch in self.adapters.values():
            yield branch.lora_embedding_A, "embedding"
            yield branch.lora_embedding_B, "embedding"


class LoraConvBranch(nn.Module):
    """Conv LoRA: ``lora_A`` = Conv(in → r) with the base's kernel_size, stride, padding, dilation and
    padding_mode (PEFT drops the last two, huggingface/peft#3697); ``lora_B`` = Conv(r → out, 1×…, groups)."""

    def __init__(self, base: nn.Module, r: int, dropout: float, dtype: torch.dtype, init: bool | str = True) -> None:
        super().__init__()
        conv = type(base) if type(base) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) else {
            1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[base.weight.ndim - 2]
        ones = (1,) * (base.weight.ndim - 2)
        device = base.weight.device
        self.lora_A = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                           bias=False, padding_mode=base.padding_mode, dtype=dtype, device=device)
        self.lora_B = conv(r, base.out_channels, ones, ones, groups=base.groups, bias=False, dtype=dtype,
                           device=device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        with torch.no_grad():
            if init is True:  # fan_in = in·∏k, so the bound is 1/√(in·∏k)
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B.weight)
            elif init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1.0 / r)
                nn.init.zeros_(self.lora_B.weight)
            elif init is not False:  # False keeps the Conv defaults for both (debug)
                raise ConfigError(f"init_lora_weights: expected True, False or 'gaussian', got {init!r}")


class LoraConvLayer(LoraLayer):
    """LoRA on nn.Conv1d/2d/3d: y = conv(x) + s·lora_B(lora_A(D(x))).

    The base weight is exchanged flattened, (out, in/g·∏k), so ΔK = s·B·A (PEFT's delta for g = 1) merges
    through AdapterLayer. Groups g > 1 need r % g == 0 and cannot be merged (as in PEFT).
    """

    @classmethod
    def describe_base(cls, base_layer: nn.Module) -> tuple[str, tuple[int, int]]:
        return "conv", (base_layer.out_channels, base_layer.weight[0].numel())

    def make_branch(self, name: str, r: int, alpha: float, config: Any) -> nn.Module:
        groups = self.base_layer.groups
        if r % groups:
            raise ConfigError(
                f"r: rank {r} for {self.module_name} is not divisible by the conv's groups={groups}; choose r as a "
                "multiple of groups (rank_pattern can set it for this layer)")
        init = config.options.get("architecture", {}).get("init_lora_weights", True)
        return LoraConvBranch(self.base_layer, r, config.dropout, adapter_dtype(self.base_layer), init)

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name, branch in self.live_branches():
            x_a = x if x.dtype == branch.lora_A.weight.dtype else x.to(branch.lora_A.weight.dtype)
            if branch.dropout is not None:
                x_a = branch.dropout(x_a)
            result = result + (branch.lora_B(branch.lora_A(x_a)) * self.scaling[name]).to(result.dtype)
        return result

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dense = self.base_layer.weight.detach().flatten(1)
        return dense.to(dtype or (torch.float64 if dense.dtype == torch.float64 else torch.float32))

    def write_base_weight(self, dense: torch.Tensor) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.copy_(dense.reshape(weight.shape).to(weight.dtype))

    def delta_weight(self, name: str) -> torch.Tensor:
        if self.base_layer.groups > 1:
            raise StateError(
                f"merge: {self.module_name} is a conv with groups={self.base_layer.groups}, whose LoRA cannot be "
                "folded into the kernel (as in PEFT); keep the adapter unmerged")
        branch = self.adapters[name]
        return (branch.lora_B.weight.flatten(1) @ branch.lora_A.weight.flatten(1)) * self.scaling[name]

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        branch = self.adapters[name]
        return {"lora_A.weight": branch.lora_A.weight.detach(), "lora_B.weight": branch.lora_B.weight.detach()}

    def load_saved_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        branch = self.adapters[name]
        with torch.no_grad():
            branch.lora_A.weight.copy_(tensors["lora_A.weight"])
            branch.lora_B.weight.copy_(tensors["lora_B.weight"])

    def factor_pairs(self) -> Iterator[tuple[str, nn.Parameter, nn.Parameter, float]]:
        # Conv factors are not (r, in) / (out, r) matrices; they get their A/B roles through tensor_roles.
        return iter(())

    def tensor_roles(self) -> Iterator[tuple[nn.Parameter, str]]:
        for branch in self.adapters.values():
            yield branch.lora_A.weight, "A"
            yield branch.lora_B.weight, "B"


class ExpertLoraBranch(nn.Module):
    """LoRA on E expert matrices: ``lora_A[e]`` (r, in) and ``lora_B[e]`` (out, r), one trainable pair per expert,
    each initialised as linear LoRA's (A Kaiming-uniform with bound 1/√in, B = 0)."""

    def __init__(self, experts: int, in_features: int, out_features: int, r: int, dtype: torch.dtype,
                 device: torch.device, init: bool | str = True) -> None:
        super().__init__()
        self.lora_A = nn.ParameterList(
            [nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device)) for _ in range(experts)])
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.empty(out_features, r, dtype=dtype, device=device)) for _ in range(experts)])
        with torch.no_grad():
            for a, b in zip(self.lora_A, self.lora_B):
                if init is True:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                    nn.init.zeros_(b)
                elif init == "gaussian":
                    nn.init.normal_(a, std=1.0 / r)
                    nn.init.zeros_(b)
                elif init is False:  # debug: B random too (nn.Linear's defaults), the model changes at init
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                    nn.init.kaiming_uniform_(b, a=math.sqrt(5))
                else:
                    raise ConfigError(f"init_lora_weights: expected True, False or 'gaussian', got {init!r}")
        # As LoraBranch's offset pair, per expert: A0 (E, r0, in), B0 (E, out, r0), ΔW_e = s·(B_e·A_e − B0_e·A0_e).
        self.register_buffer("offset_A", None)
        self.register_buffer("offset_B", None)

    def set_offset(self, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """Freeze (A0 (E, r0, in), B0 (E, out, r0)) as the offset pairs, copied, in the branch dtype."""
        ref = self.lora_A[0]
        self.offset_A = a0.detach().to(ref.device, ref.dtype).clone(memory_format=torch.contiguous_format)
        self.offset_B = b0.detach().to(ref.device, ref.dtype).clone(memory_format=torch.contiguous_format)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (E, r', in), B (E, out, r')) with ΔW_e = s·B_e·A_e: the trainable pairs, with the negated offset
        pairs appended when there are any (r' = r + r0)."""
        a, b = torch.stack(list(self.lora_A)), torch.stack(list(self.lora_B))
        if self.offset_A is None:
            return a, b
        return torch.cat([a, self.offset_A], 1), torch.cat([b, -self.offset_B], 2)


class ExpertLoraLayer(ExpertParameterLayer, LoraLayer):
    """LoRA on a fused expert parameter: ΔW_e = s·B_e·A_e for every expert e (PEFT's ``ParamWrapper``).

    Saved in PEFT's layout: ``lora_A.weight`` (E·r, in) with expert e in rows e·r … e·r + r − 1, and
    ``lora_B.weight`` (out, r·E) with expert e in columns e, E + e, 2E + e, … (PEFT reshapes A to (E, r, in) and B
    to (out, r, E)). No dropout: x cannot be factored out of W_e + ΔW_e (PEFT refuses it too)."""

    saved_suffixes = ("lora_A.weight", "lora_B.weight")

    def make_branch(self, name: str, r: int, alpha: float, config: Any) -> nn.Module:
        if config.dropout:
            raise ConfigError(
                f"dropout: {config.dropout} cannot apply to the fused expert parameter {self.target_name} (the "
                "update is added to the weight, so there is no branch input to drop); set dropout=0, or exclude the "
                "expert parameters from targets")
        init = config.options.get("architecture", {}).get("init_lora_weights", True)
        weight = self.weight
        return ExpertLoraBranch(self.num_experts, self.in_features, self.out_features, r,
                                adapter_dtype(self), weight.device, init)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.adapters[name].stacked()
        return torch.bmm(b, a) * self.scaling[name]

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        a, b = self.adapters[name].stacked()
        if self.transposed != self.peft_transposed:
            # PEFT reads this stack the other way round (Llama 4: (E, in, out), undeclared): its ΔP_e = s·B'·A' in
            # the stored layout is ΔW_eᵀ = s·A_eᵀ·B_eᵀ, so A' = B_eᵀ and B' = A_eᵀ (exact, the same update).
            a, b = b.transpose(1, 2), a.transpose(1, 2)
        experts, rows, r = b.shape
        return {"lora_A.weight": a.detach().reshape(experts * r, -1),
                "lora_B.weight": b.detach().permute(1, 2, 0).reshape(rows, r * experts)}

    def load_saved_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        branch = self.adapters[name]
        if branch.offset_A is not None:
            raise StateError(f"{self.target_name}: cannot load saved tensors into an adapter with a frozen offset "
                             "pair; load the checkpoint into a plain base model (peftkit.load) instead")
        experts = self.num_experts
        file_a, file_b = tensors["lora_A.weight"], tensors["lora_B.weight"]
        a = file_a.reshape(experts, -1, file_a.shape[-1])
        b = file_b.reshape(file_b.shape[0], -1, experts).permute(2, 0, 1)
        if self.transposed != self.peft_transposed:
            a, b = b.transpose(1, 2), a.transpose(1, 2)
        with torch.no_grad():
            for e in range(experts):
                branch.lora_A[e].copy_(a[e])
                branch.lora_B[e].copy_(b[e])

    def factor_pairs(self) -> Iterator[tuple]:
        for name in self.active_adapters:
            branch = self.adapters[name]
            for e, (a, b) in enumerate(zip(branch.lora_A, branch.lora_B)):
                yield name, a, b, self.scaling[name], e


LoraLayer.expert_layer = ExpertLoraLayer


registry.register_method(
    "lora", architecture="lora",
    lr_convention=registry.LRConvention("lora", 1.0, "the reference rate: base_lr is LoRA's"),
    description="LoRA (Hu et al. 2021): trainable low-rank update s·B·A, PEFT's semantics and format",
)
