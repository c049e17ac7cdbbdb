"""Toy models for the data-driven init tests: plain modules whose forward takes a batch dict and returns a loss."""

from __future__ import annotations

import torch
import torch.nn as nn


class LinearToy(nn.Module):
    """y = x Wᵀ (fp64), loss = mean squared error against ``target``: G is known in closed form."""

    def __init__(self, n_in: int = 12, n_out: int = 10, seed: int = 0, dtype=torch.float64) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(n_in, n_out, bias=False, dtype=dtype)

    def forward(self, x, target):
        y = self.lin(x)
        return {"loss": ((y - target) ** 2).mean(), "logits": y}


def linear_batches(n_in=12, n_out=10, n=3, rows=16, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n_out, n_in, generator=gen, dtype=dtype)
    out = []
    for _ in range(n):
        x = torch.randn(rows, n_in, generator=gen, dtype=dtype)
        out.append({"x": x, "target": x @ teacher.t()})
    return out


def full_gradient(model: LinearToy, batches) -> torch.Tensor:
    """G = mean over (equal-size) batches of ∂L_b/∂W, by autograd on a copy of W."""
    w = model.lin.weight.detach().clone().requires_grad_(True)
    total = 0
    for batch in batches:
        y = batch["x"] @ w.t()
        total = total + ((y - batch["target"]) ** 2).mean()
    (total / len(batches)).backward()
    return w.grad


def sgd_step(model, batches, lr: float) -> None:
    """One full-batch SGD step on the trainable parameters (mean loss over the batches)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = sum(model(**b)["loss"] for b in batches) / len(batches)
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(lr * g)


class ThreeInputs(nn.Module):
    """Three parallel layers, each fed its own input (EVA allocation tests); loss-free."""

    def __init__(self, d: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(d, d, bias=False)
        self.b = nn.Linear(d, d, bias=False)
        self.c = nn.Linear(d, d, bias=False)

    def forward(self, xa, xb, xc):
        return {"logits": self.a(xa) + self.b(xb) + self.c(xc)}


def spectrum_inputs(spectra: list[torch.Tensor], n: int, rows: int, seed: int = 0, mean: float = 3.0):
    """Batches for ThreeInputs: layer i's inputs have per-direction std spectra[i] in a random basis, mean ≠ 0."""
    gen = torch.Generator().manual_seed(seed)
    d = spectra[0].numel()
    bases = [torch.linalg.qr(torch.randn(d, d, generator=gen))[0] for _ in spectra]
    means = [mean * torch.randn(d, generator=gen) for _ in spectra]
    batches = []
    for _ in range(n):
        batch = {}
        for key, spec, basis, mu in zip(("xa", "xb", "xc"), spectra, bases, means):
            batch[key] = (torch.randn(rows, d, generator=gen) * spec) @ basis.t() + mu
        batches.append(batch)
    return batches
