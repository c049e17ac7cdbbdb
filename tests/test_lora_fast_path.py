"""LoRA's fused forward (``LoraLayer.adapted_forward``) against a plain reference, in fp64.

The reference is the formula of lora.md written with plain ops: y = x Wᵀ + b + s·(D(x) A'ᵀ) B'ᵀ, with
(A', B') = ([A; A0], [B, −B0]) when an offset pair is set. Outputs and the gradients of x, A and B must agree
to fp64 rounding, with dropout off and on (same RNG seed), on nn.Linear with and without bias and on
transformers' Conv1D; a gated-off adapter leaves the base output and gets no gradient; a bf16 base with fp32
adapters matches the reference computed from the bf16 base output.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

import peftkit

IN, OUT, R, ALPHA = 12, 10, 4, 12.0  # s = alpha / r = 3


class OneLayer(nn.Module):
    def __init__(self, kind: str, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        if kind == "conv1d":
            self.proj = Conv1D(OUT, IN).to(dtype)
            if not bias:
                raise ValueError("Conv1D always has a bias")
        else:
            self.proj = nn.Linear(IN, OUT, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def wrapped(kind: str, bias: bool, dropout: float, offset: bool, dtype=torch.float64):
    torch.manual_seed(0)
    model = OneLayer(kind, bias, dtype)
    with torch.no_grad():  # a bias large enough to matter
        if model.proj.bias is not None:
            model.proj.bias.normal_()
    peftkit.wrap(model, "lora", r=R, alpha=ALPHA, targets=["proj"], dropout=dropout)
    layer = model.proj
    branch = layer.adapters["default"]
    with torch.no_grad():  # B = 0 at init would hide every error in the branch
        branch.lora_A.weight.normal_()
        branch.lora_B.weight.normal_()
    if offset:
        branch.set_offset(torch.randn(2, IN, dtype=torch.float64), torch.randn(OUT, 2, dtype=torch.float64))
    return model.train(), layer, branch


def reference(x, weight_out_in, bias, branch, scale, dropout):
    """The plain formula; ``weight_out_in`` (out, in) in the base dtype."""
    base = F.linear(x, weight_out_in, bias)
    a, b = branch.lora_A.weight, branch.lora_B.weight
    if branch.offset_A is not None:
        a = torch.cat([a, branch.offset_A], 0)
        b = torch.cat([b, -branch.offset_B], 1)
    x_a = x.to(a.dtype)
    if dropout > 0:
        x_a = F.dropout(x_a, dropout, training=True)
    return base + (scale * ((x_a @ a.t()) @ b.t())).to(base.dtype)


def grads(output, tensors):
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(1), dtype=output.dtype)
    return torch.autograd.grad(output, tensors, upstream)


CASES = [("linear", True), ("linear", False), ("conv1d", True)]


@pytest.mark.parametrize("kind,bias", CASES, ids=["linear-bias", "linear-nobias", "conv1d"])
@pytest.mark.parametrize("dropout", [0.0, 0.5], ids=["nodrop", "drop"])
@pytest.mark.parametrize("offset", [False, True], ids=["plain", "offset"])
def test_fp64_output_and_gradients_match_plain_formula(kind, bias, dropout, offset):
    model, layer, branch = wrapped(kind, bias, dropout, offset)
    x = torch.randn(3, 5, IN, dtype=torch.float64, requires_grad=True)
    a, b = branch.lora_A.weight, branch.lora_B.weight
    torch.manual_seed(7)
    got = model(x)
    got_grads = grads(got, [x, a, b])
    weight = layer.base_weight(torch.float64)
    torch.manual_seed(7)
    want = reference(x, weight, layer.bias, branch, layer.scaling["default"], dropout)
    want_grads = grads(want, [x, a, b])
    assert got.shape == (3, 5, OUT)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name, g, w in zip(("x", "A", "B"), got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=f"gradient of {name}")
    # the gradient must really flow through the branch (a zero branch would pass the checks above trivially)
    assert got_grads[1].abs().sum() > 0 and got_grads[2].abs().sum() > 0


def test_dropout_is_off_in_eval_mode():
    model, layer, branch = wrapped("linear", True, 0.5, False)
    model.eval()
    x = torch.randn(4, IN, dtype=torch.float64)
    want = reference(x, layer.base_weight(torch.float64), layer.bias, branch, layer.scaling["default"], 0.0)
    torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)


def test_gated_off_adapter_gives_base_output_and_no_gradient():
    model, layer, branch = wrapped("linear", True, 0.0, False)
    layer.gated_off.add("default")
    x = torch.randn(4, IN, dtype=torch.float64, requires_grad=True)
    out = model(x)
    torch.testing.assert_close(out, layer.base_layer(x), rtol=0, atol=0)
    out.sum().backward()
    assert branch.lora_A.weight.grad is None and branch.lora_B.weight.grad is None
    assert x.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_base_with_fp32_adapters(dtype):
    model, layer, branch = wrapped("linear", True, 0.0, False, dtype=dtype)
    assert branch.lora_A.weight.dtype == torch.float32
    x = torch.randn(6, IN).to(dtype).requires_grad_(True)
    a, b = branch.lora_A.weight, branch.lora_B.weight
    got = model(x)
    assert got.dtype == dtype
    got_grads = grads(got, [x, a, b])
    want = reference(x, layer.base_layer.weight, layer.bias, branch, layer.scaling["default"], 0.0)
    want_grads = grads(want, [x, a, b])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for name, g, w in zip(("x", "A", "B"), got_grads, want_grads):
        assert g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-2, msg=f"gradient of {name}")
