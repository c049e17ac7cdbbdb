"""Force either of bitsandbytes' two CPU kernel paths for 4-bit layers, on any machine.

bitsandbytes 0.50 picks its CPU 4-bit kernel by CPU feature: where the CPU has AVX512-BF16, a ``Linear4bit``
created there (``support_avx512bf16_for_cpu``, read once in ``__init__``) repacks its weight in place on its first
eval forward without grad (``quant_state.packing_format_for_cpu``: nibbles reordered in 32-row tiles, absmax
transposed to (in/blocksize, out) bf16) and from then on every CPU forward runs ``bitsandbytes::gemv_4bit`` on that
layout, a kernel with no autograd formula. Elsewhere the weight stays in the standard layout.

``force(path)`` makes layers built afterwards take ``path`` ("packed" or "unpacked"). Where the CPU lacks
AVX512-BF16, bitsandbytes' packed kernel is not registered (and its native code dies with SIGILL here), so
"packed" registers an emulation of it for CPU tensors: it decodes the packed layout independently of peftkit
(from the layout bitsandbytes' ``_convert_weight_packed_for_cpu`` writes), multiplies in bf16 like the real
kernel, and, like it, is opaque to autograd. The repack itself is bitsandbytes' own code, unchanged.

The whole 4-bit test set takes one path with ``PEFTKIT_TEST_BNB_CPU_PATH=packed`` (or ``unpacked``); see conftest.
"""

from __future__ import annotations

import torch

PATHS = ("unpacked", "packed")
_emulation_library = None


def native_packed_kernel() -> bool:
    """Whether this CPU runs bitsandbytes' own packed 4-bit kernel (AVX512-BF16)."""
    import bitsandbytes.functional as F

    return bool(F.has_avx512bf16())


def _decode_packed(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(out, in) 4-bit codes (int64) from the packed (out, in/2) uint8 layout: each run of 32 bytes holds a
    tile of 32 output rows × 2 inputs, rows 0-15 in the low nibbles and rows 16-31 in the high ones."""
    n_out, n_in = shape
    tile = 32
    flat = packed.reshape(-1, tile)
    codes = torch.cat([flat & 0xF, flat >> 4], dim=-1).long()  # (tiles, 64): row-major over (32 rows, 2 inputs)
    codes = codes.reshape(n_out // tile, n_in // 2, tile, 2).transpose(1, 2)
    return codes.reshape(n_out, n_in)


def _emulated_gemv_4bit(A: torch.Tensor, B: torch.Tensor, shapeB, absmax: torch.Tensor, code: torch.Tensor,
                        blocksize: int) -> torch.Tensor:
    """What bitsandbytes' AVX512-BF16 kernel computes: A (…, in) @ Wᵀ in bf16, W decoded from the packed layout
    with absmax (in/blocksize, out); returns (…, out) in A's dtype."""
    with torch.no_grad():  # the real kernel writes into a fresh tensor: no graph behind its output
        n_out, n_in = int(shapeB[0]), int(shapeB[1])
        codes = _decode_packed(B.contiguous().view(torch.uint8), (n_out, n_in))
        scale = absmax.float().t().repeat_interleave(blocksize, dim=1)  # (out, in)
        weight = (code.float()[codes] * scale).to(torch.bfloat16)
        return torch.nn.functional.linear(A.to(torch.bfloat16), weight).to(A.dtype)


def _register_emulation() -> None:
    global _emulation_library
    if _emulation_library is None and not native_packed_kernel():
        _emulation_library = torch.library.Library("bitsandbytes", "IMPL")
        torch.library.register_kernel("bitsandbytes::gemv_4bit", "cpu", _emulated_gemv_4bit, lib=_emulation_library)


def force(path: str, monkeypatch) -> None:
    """Make every ``Linear4bit`` created from now on (until ``monkeypatch`` undoes it) take ``path``."""
    import bitsandbytes.nn.modules as modules

    if path not in PATHS:
        raise ValueError(f"bnb CPU path {path!r}: expected one of {PATHS}")
    if path == "packed":
        # Registered once per process and left in place: it only ever serves packed-layout weights.
        _register_emulation()
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: path == "packed")


def is_packed(module: torch.nn.Module) -> bool:
    return bool(getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False))


# ------------------------------------------------------------------------------------------ tolerances
# The packed kernel multiplies bf16-rounded inputs by bf16-rounded weights (unit roundoff u = 2^-8) and rounds its
# output to bf16. Two computations that agree to fp32 rounding can then differ by a bf16 step wherever a rounding
# flips, and a base packed before peftkit saw it is read with its bf16 absmax: so on that path outputs are compared
# by relative norm gap, at 4u (about three flipped roundings, amplified through the tiny model's two blocks).
PACKED_GAP = 4 * 2.0 ** -8


def takes_packed_path(model: torch.nn.Module) -> bool:
    """Whether some 4-bit layer of ``model`` runs (or will run, on its next eval forward) the packed kernel."""
    return any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules()
               if type(m).__name__ == "Linear4bit")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, model: torch.nn.Module, **fp32_tol) -> None:
    """``torch.testing.assert_close(actual, expected, **fp32_tol)``, or on the packed path a relative norm gap
    of at most ``PACKED_GAP``."""
    if not takes_packed_path(model):
        torch.testing.assert_close(actual, expected, **fp32_tol)
        return
    gap = float((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))
    assert gap <= PACKED_GAP, f"relative gap {gap:.3g} > {PACKED_GAP:.3g} on the packed bitsandbytes path"


def assert_linear(layer_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  model: torch.nn.Module, **fp32_tol) -> None:
    """``layer_out`` (…, out) is x Wᵀ + b: to ``fp32_tol``, or on the packed path elementwise within the bf16
    bound 2u·(|x| |W|ᵀ) + u·|x Wᵀ + b| (inputs and weights rounded once each, the output once), u = 2^-8."""
    expected = torch.nn.functional.linear(x, weight, bias)
    if not takes_packed_path(model):
        torch.testing.assert_close(layer_out, expected, **fp32_tol)
        return
    u = 2.0 ** -8
    bound = 2 * u * (x.abs() @ weight.abs().t()) + u * expected.abs() + 1e-5
    excess = (layer_out - expected).abs() - bound
    assert float(excess.max()) <= 0, f"packed path: off by {float(excess.max()):.3g} beyond the bf16 bound"
