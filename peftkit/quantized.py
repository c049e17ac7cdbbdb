"""bitsandbytes base weights, read and written in every layout bitsandbytes keeps them in.

Every place in peftkit that reads or writes a quantized base weight goes through ``dense_weight`` /
``write_dense_weight`` (AdapterLayer.base_weight / write_base_weight call them; merge, unmerge, exports and
data-driven inits read the base through those).

Layouts of a 4-bit ``Linear4bit`` weight:
- standard: ``(out·in/2, 1)`` bytes of NF4/FP4 codes, row-major over (out, in), absmax per ``blocksize`` inputs
  (optionally itself 8-bit quantized, ``nested``); on CPU and GPU alike;
- CPU-packed (bitsandbytes ≥ 0.49 on CPUs with AVX512-BF16): on a layer's first eval forward without grad,
  bitsandbytes repacks the weight in place for its fused kernel (``quant_state.packing_format_for_cpu``): codes
  reordered in tiles of 32 output rows, absmax de-nested, transposed to (in/blocksize, out) and rounded to bf16.
  Its kernel has no autograd formula, and bitsandbytes' own inverse (used when saving a state dict) leaves a
  non-nested absmax transposed in 0.50.

A weight whose storage a sharding engine owns must keep one layout: DeepSpeed ZeRO-3 treats ``param.data`` as a
copy of its partition, frees it after each use and gathers it again from the partition, so a repack written into
``param.data`` is lost while the packed ``quant_state`` (a Python object ZeRO never sees) stays: the next forward
reads standard-layout codes as packed ones (issue 24: a 4-bit base silently corrupted from the first evaluation
after a step that changed ZeRO's gather order). ``keep_standard_layout`` pins a layer to the standard layout (the
ZeRO-3 engine calls ``keep_standard_layouts`` on the model), and the forward hook refuses a layer that could repack a
weight a sharding engine owns (a ZeRO-3 ``ds_id``, an FSDP2 DTensor) instead of computing with a garbled one.

``track_layouts(model)`` (called by ``inject``) hooks every ``Linear4bit``: before bitsandbytes repacks a weight it
remembers the standard-layout statistics (references, no copy), and a training forward (train mode, or a gradient
through the layer) or a ``state_dict`` call first puts the weight back in the standard layout, bit for bit. A weight
packed before peftkit saw it is read from its packed statistics (bf16 absmax: what the packed kernel multiplies by).
8-bit ``Linear8bitLt`` weights have one layout (int8 rows with one scale each).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

_STANDARD_STATS = "_peftkit_standard_stats"
_HOOKED = "_peftkit_layout_hooks"


def _bnb() -> Any:
    import bitsandbytes as bnb

    return bnb


def _class_names(module: nn.Module) -> set[str]:
    # FSDP2's fully_shard swaps a module's class for a subclass ("FSDPLinear4bit"): look through the bases.
    return {cls.__name__ for cls in type(module).__mro__}


def is_4bit(module: nn.Module) -> bool:
    return "Linear4bit" in _class_names(module) or type(getattr(module, "weight", None)).__name__ == "Params4bit"


def is_8bit(module: nn.Module) -> bool:
    return "Linear8bitLt" in _class_names(module)


def quant_state(module: nn.Module) -> Any:
    """A 4-bit layer's quant_state: on its weight, or, where an engine re-created the weight from its shards (a
    plain tensor: FSDP2), the copy bitsandbytes keeps on the module (``Linear4bit.quant_state``)."""
    return getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)


def is_cpu_packed(module: nn.Module) -> bool:
    """Whether ``module``'s 4-bit weight is in bitsandbytes' CPU-packed (AVX512-BF16) layout."""
    return bool(getattr(quant_state(module), "packing_format_for_cpu", False))


# ------------------------------------------------------------------------------------------ reading
def standard_layout(module: nn.Module) -> tuple[torch.Tensor, Any]:
    """(codes, quant_state) of a 4-bit weight in the standard layout, the module unchanged: the stored ones when
    the weight is not packed, else new ones (packed codes unpacked by bitsandbytes' own inverse, absmax
    restored from what ``track_layouts`` remembered, or else from the packed bf16 absmax)."""
    weight = module.weight
    state = quant_state(module)
    if not is_cpu_packed(module):
        return weight.data, state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    unpacked = copy.copy(state)  # the inverse reassigns fields of the state it gets: never the layer's own
    unpacked.original_nested = False  # absmax is restored below, exactly where it can be
    codes, unpacked = _convert_weight_packed_for_cpu_inverse(weight.data, unpacked)
    remembered = getattr(module, _STANDARD_STATS, None)
    if remembered is not None and remembered["state"] is state:
        device = weight.device  # the layer may have moved since (Params4bit.to keeps the packed layout)
        state2 = remembered["state2"]
        if state2 is not None and state2.absmax.device != device:
            state2 = copy.copy(state2)
            state2.to(device)
        offset = remembered["offset"]
        unpacked.absmax = remembered["absmax"].to(device)
        unpacked.state2, unpacked.nested, unpacked.dtype = state2, remembered["nested"], remembered["dtype"]
        unpacked.offset = offset.to(device) if isinstance(offset, torch.Tensor) else offset
    else:
        # Packed absmax is (in/blocksize, out) bf16; the standard layout's is one float per block, row-major.
        unpacked.absmax = state.absmax.t().reshape(-1).float().contiguous()
        unpacked.state2, unpacked.offset, unpacked.nested = None, None, False
    return codes, unpacked


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The dense (out, in) weight a bitsandbytes 4-bit or 8-bit linear layer stores, whatever its layout (CPU
    standard or packed, GPU); float32 or the quantization dtype; the module is unchanged."""
    bnb = _bnb()
    weight = module.weight
    if is_4bit(module):
        codes, state = standard_layout(module)
        return bnb.functional.dequantize_4bit(codes, state)
    if is_8bit(module):
        scb = module.state.SCB if module.state.SCB is not None else getattr(weight, "SCB", None)
        if scb is None:  # not yet quantized (has_fp16_weights): the stored data is dense
            return weight.data.float()
        if hasattr(bnb.functional, "int8_vectorwise_dequant"):
            return bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device))
        return weight.data.float() * scb.to(weight.device).view(-1, 1) / 127.0
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes 4-bit or 8-bit linear layer")


# ------------------------------------------------------------------------------------------ writing
def unpack_in_place(module: nn.Module) -> None:
    """Put a CPU-packed 4-bit weight back in the standard layout (bit for bit when ``track_layouts`` saw the
    repack); bitsandbytes repacks it again on the next eval forward without grad."""
    if not is_cpu_packed(module):
        return
    codes, unpacked = standard_layout(module)
    state = module.weight.quant_state
    # Fields set on the layer's own state object, so every reference to it (module.quant_state too) follows.
    for key in ("absmax", "state2", "offset", "nested", "dtype"):
        setattr(state, key, getattr(unpacked, key))
    state.packing_format_for_cpu = False
    module.weight.data = codes
    if hasattr(module, _STANDARD_STATS):
        delattr(module, _STANDARD_STATS)


def write_dense_weight(module: nn.Module, dense: torch.Tensor) -> None:
    """Quantize the dense (out, in) ``dense`` into ``module``'s weight with the layer's own settings. The result is
    in the standard layout; bitsandbytes repacks it on the next eval forward where its CPU kernel wants that."""
    bnb = _bnb()
    weight = module.weight
    with torch.no_grad():
        if is_4bit(module):
            unpack_in_place(module)
            weight = module.weight
            kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_")}
            kwargs.pop("data", None)
            kwargs["bnb_quantized"] = False
            kwargs["requires_grad"] = False
            quant_dtype = getattr(weight.quant_state, "dtype", torch.float32) or torch.float32
            param = bnb.nn.Params4bit(dense.to("cpu", quant_dtype).contiguous(), **kwargs)
            module.weight = param.to(weight.device)
            if not getattr(module.weight, "bnb_quantized", True):
                module.weight._quantize(weight.device)
        elif is_8bit(module):
            module.weight = bnb.nn.Int8Params(
                dense.to("cpu", torch.float16).contiguous(), requires_grad=False,
                has_fp16_weights=weight.has_fp16_weights,
            ).to(weight.device)
            module.state.SCB = None
            module.state.reset_grads()
            module.state.SCB = module.weight.SCB
        else:
            raise TypeError(f"{type(module).__name__} is not a bitsandbytes 4-bit or 8-bit linear layer")


def keep_standard_layout(module: nn.Module) -> None:
    """Put ``module``'s 4-bit weight in the standard layout and keep it there: bitsandbytes' CPU forward then never
    repacks it (it computes in the compute dtype, as on a CPU without AVX512-BF16). For weights whose storage a
    sharding engine owns (module docstring)."""
    if not is_4bit(module):
        return
    unpack_in_place(module)
    module.support_avx512bf16_for_cpu = False  # read by bitsandbytes' Linear4bit.forward on every call
    if hasattr(module, _STANDARD_STATS):
        delattr(module, _STANDARD_STATS)


def keep_standard_layouts(model: nn.Module) -> None:
    """:func:`keep_standard_layout` on every bitsandbytes 4-bit layer of ``model`` (a no-op without any)."""
    for module in model.modules():
        if is_4bit(module):
            keep_standard_layout(module)


def engine_owned(param: torch.Tensor) -> str | None:
    """The sharding engine that owns ``param``'s storage (re-creating ``param.data`` from its shards whenever it
    likes), or None for a plain tensor."""
    if hasattr(param, "ds_id"):
        return "DeepSpeed ZeRO-3"
    if type(param).__name__ == "DTensor" or type(getattr(param, "data", None)).__name__ == "DTensor":
        return "FSDP2"
    return None


# ------------------------------------------------------------------------------------------ hooks
def _before_forward(module: nn.Module, args: tuple) -> None:
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor):
        return
    if getattr(module, "support_avx512bf16_for_cpu", False):
        owner = engine_owned(module.weight)
        if owner is not None:
            from .errors import StateError

            raise StateError(
                f"a bitsandbytes 4-bit weight partitioned by {owner} may be repacked in place by bitsandbytes' CPU "
                "kernel, which the engine would undo at its next gather while the packed quant_state stays: the "
                "layer would compute with a garbled weight. Call peftkit.quantized.keep_standard_layouts(model) "
                "before the engine wraps the model (peftkit's training.distributed: zero3 does)")
    if is_cpu_packed(module):
        # The packed kernel is bitsandbytes' inference path: its output has no graph (a gradient would silently
        # stop at this layer) and it computes in bf16. Training forwards take the standard path, as before eval;
        # so does a layer moved off the CPU (bitsandbytes' ``.to`` keeps the packed bytes, its GPU kernels do not
        # read them).
        if module.training or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            unpack_in_place(module)
    elif x.device.type == "cpu" and getattr(module, "support_avx512bf16_for_cpu", False):
        # bitsandbytes may repack in this forward, replacing absmax (and dropping nested stats) by a bf16
        # copy: keep references to the exact ones so the standard layout comes back bit for bit.
        state = module.weight.quant_state
        if state is not None:
            setattr(module, _STANDARD_STATS, {"state": state, "absmax": state.absmax,
                                               "state2": getattr(state, "state2", None),
                                               "offset": getattr(state, "offset", None),
                                               "nested": state.nested, "dtype": state.dtype})


def _before_state_dict(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    unpack_in_place(module)  # exact, where bitsandbytes' own inverse garbles a non-nested absmax


def track_layouts(model: nn.Module) -> None:
    """Hook every bitsandbytes 4-bit linear layer of ``model`` (once) so peftkit reads and trains it correctly on
    bitsandbytes' CPU-packed path; a no-op on models without 4-bit layers."""
    for module in model.modules():
        if is_4bit(module) and isinstance(module, nn.Linear) and not getattr(module, _HOOKED, False):
            module.register_forward_pre_hook(_before_forward)
            module.register_state_dict_pre_hook(_before_state_dict)
            setattr(module, _HOOKED, True)
