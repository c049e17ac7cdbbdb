"""Small fixtures shared by the pair-optimizer tests (test_optim_base, test_lora_pro, test_loft,
test_preconditioner, test_optim_distributed): one wrapped Linear with set factors, a quadratic loss whose
full-weight gradient G is known in closed form, and a recorder of every tensor an operation allocates."""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import peftkit
from peftkit.inject import adapter_layers


def single_linear(m: int, n: int, r: int, alpha: float | None = None, dtype: torch.dtype = torch.float64,
                  method: str = "lora", seed: int = 0, a: torch.Tensor | None = None, b: torch.Tensor | None = None,
                  **options):
    """(model, layer): nn.Sequential(Linear(n -> m)) wrapped with LoRA rank r on "0"; A, B random unless given."""
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(n, m, bias=False)).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peftkit.wrap(base, method, r=r, alpha=r if alpha is None else alpha, targets=["0"], **options)
    layer = adapter_layers(model)["0"]
    gen = torch.Generator().manual_seed(seed + 1)
    branch = layer.adapters["default"]
    with torch.no_grad():
        branch.lora_A.weight.copy_(torch.randn(r, n, generator=gen, dtype=torch.float64) if a is None else a)
        branch.lora_B.weight.copy_(torch.randn(m, r, generator=gen, dtype=torch.float64) if b is None else b)
    return model, layer


def effective_weight(layer) -> torch.Tensor:
    """W_eff = W₀ + s·B·A, (out, in), detached."""
    return (layer.base_layer.weight + layer.delta_weight("default")).detach().clone()


def quadratic_problem(m: int, n: int, k: int = 16, seed: int = 3, dtype: torch.dtype = torch.float64):
    """(X (k×n), Y (k×m)) for L = ½‖X W_effᵀ − Y‖², whose gradient is G = (X W_effᵀ − Y)ᵀ X."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(k, n, generator=gen, dtype=torch.float64).to(dtype),
            torch.randn(k, m, generator=gen, dtype=torch.float64).to(dtype))


def quadratic_loss(model, x, y) -> torch.Tensor:
    return ((model(x) - y) ** 2).sum() / 2


def quadratic_grad(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ weight.T - y).T @ x


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor produced by an aten op while active."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out
