"""LoRA-One's init (lora-one.md, tests 1, 2, 3, 5): one normalised rank-r step along −G, balanced factors, no
offset. Tests 4 and 6 belong to the preconditioner (its own test file); two processes: test_inits_distributed."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import make_batches, output, tiny_gpt2, tiny_llama, wrap_with_data
from inits_fixtures import LinearToy, full_gradient, linear_batches

import peftkit
from peftkit import registry
from peftkit.inject import adapter_layers

_wrap = functools.partial(wrap_with_data, method="lora-one")


def test_init_identity_norm_and_balance_fp64():
    model = LinearToy(n_in=12, n_out=10)
    batches = linear_batches()
    g = full_gradient(model, batches)
    gamma, r = 128.0, 3
    _wrap(model, batches, r=r)
    layer = adapter_layers(model)["lin"]
    a, b = layer.adapters["default"].lora_A.weight.detach(), layer.adapters["default"].lora_B.weight.detach()
    s = layer.scaling["default"]
    assert s == pytest.approx(16 / r ** 0.5)  # rsLoRA, α = 16 by default
    u, sv, vh = torch.linalg.svd(g)
    expected = -(s / (gamma * sv[0])) * (u[:, :r] @ torch.diag(sv[:r]) @ vh[:r])
    torch.testing.assert_close(s * b @ a, expected, rtol=0, atol=1e-10 * float(expected.abs().max()))
    assert torch.linalg.matrix_norm(s * b @ a, ord=2) == pytest.approx(s / gamma, rel=1e-10)
    torch.testing.assert_close(a.norm(dim=1), b.norm(dim=0), rtol=1e-10, atol=0)
    # Test 3: span(B) = U_r of −G, span(Aᵀ) = V_r (principal-angle cosines 1).
    from peftkit.linalg import subspace_cosines

    assert subspace_cosines(b, u[:, :r]).min() >= 1 - 1e-10
    assert subspace_cosines(a.t(), vh[:r].t()).min() >= 1 - 1e-10


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_descent_at_init_and_not_function_preserving(factory):
    model = factory()
    batches = make_batches(model, n=2)
    base_loss = sum(float(model(**b).loss) for b in batches)
    ref = output(model, batches[0])
    _wrap(model, batches)  # the defaults: γ = 128, r = 8, α = 16, rsLoRA
    assert registry.get_method("lora-one").changes_output_at_init
    with torch.no_grad():
        loss = sum(float(model(**b).loss) for b in batches)
    assert loss < base_loss
    assert (output(model, batches[0]) - ref).abs().max() > 1e-4
    assert all(l.adapters["default"].offset_A is None for l in adapter_layers(model).values())


def test_zero_gradient_layer_falls_back_without_nan():
    class TwoHeads(LinearToy):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Linear(12, 10, bias=False, dtype=torch.float64)

        def forward(self, x, target):
            self.unused(x)
            return super().forward(x, target)

    model = TwoHeads()
    with pytest.warns(UserWarning, match="unused got a zero gradient"):
        peftkit.wrap(model, "lora-one", r=2, data=linear_batches())
    layers = adapter_layers(model)
    for layer in layers.values():
        assert all(torch.isfinite(p).all() for p in layer.adapters.parameters())
    assert layers["unused"].adapters["default"].lora_B.weight.abs().max() == 0
    assert layers["lin"].adapters["default"].lora_B.weight.abs().max() > 0


def test_init_axis_composes_and_optimizer_is_adamw():
    batches = make_batches(tiny_llama(), n=2)
    a = _wrap(tiny_llama(), batches, r=4)
    b = peftkit.wrap(tiny_llama(), "lora", init="lora-one", data=batches, r=4, rslora=True, alpha=16.0)
    for la, lb in zip(adapter_layers(a).values(), adapter_layers(b).values()):
        for key, value in la.adapters["default"].state_dict().items():
            torch.testing.assert_close(lb.adapters["default"].state_dict()[key], value, rtol=0, atol=0)
    assert registry.get_method("lora-one").optimizer == "adamw"
