"""LoRA+ (Hayou, Ghosh, Yu; ICML 2024): B learns λ times faster than A (lora-plus.md).

Explicit classification (not PEFT's 1-D rule): ``lora_B`` factors get λη, ``lora_A`` factors η, embedding
LoRA factors an absolute lr (``loraplus_lr_embedding``, default 1e-6), every other trainable tensor (heads,
biases, norms) the base η; the user's ``weight_decay`` reaches every decay
parameter (PEFT drops it), never biases or norms. The groups carry ``role`` and ``lr_ratio`` so the
rule travels with the optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from peftkit import registry
from peftkit.errors import ConfigError
from peftkit.optim import param_groups
from peftkit.validation import option


@dataclass
class LoraPlusOptions:
    loraplus_lr_ratio: float = option(16.0, ge=1)
    # Embedding LoRA factors (role "embedding"): an absolute lr, not scaled by λ nor by the base lr, as in the
    # authors' code and PEFT (PEFT inits embedding LoRA reversed, so "which factor gets λ" is ill-defined).
    loraplus_lr_embedding: float = option(1e-6, gt=0)
    weight_decay: float = option(0.0, ge=0)
    betas: tuple[float, float] = option((0.9, 0.999), ge=0, lt=1)
    eps: float = option(1e-8, ge=0)


@registry.optimizer("lora-plus", options=LoraPlusOptions, architectures=("lora", "dora"),
                    description="AdamW with lr(B) = λ·lr(A) (LoRA+)")
def build_lora_plus(model: nn.Module, lr: float, config: Any, **options: Any) -> torch.optim.Optimizer:
    opts = config.axis_options("optimizer", **options)
    ratio = opts.loraplus_lr_ratio  # types and ranges: LoraPlusOptions
    lr_embedding = opts.loraplus_lr_embedding
    # The embedding group's lr_ratio makes its lr the absolute value; the LR scheduler scales it like the rest.
    groups = param_groups(model, lr, opts.weight_decay,
                          lr_ratios={"B": float(ratio), "embedding": float(lr_embedding) / lr})
    for group in groups:
        if group["role"] == "embedding":
            group["lr"] = float(lr_embedding)
    if not any(g["role"] == "B" for g in groups):
        raise ConfigError(
            "optimizer 'lora-plus' found no trainable LoRA B factor; it needs a LoRA-shaped adapter "
            "(lora, lora-ga, lora-one, eva, coto)"
        )
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(opts.betas), eps=opts.eps)


registry.register_method(
    "lora-plus", architecture="lora", optimizer="lora-plus",
    lr_convention=registry.LRConvention(
        "lora", 0.5, "authors' README: with a larger λ, a lower η, e.g. ÷2 from a vanilla-LoRA lr (lora-plus.md, "
        "Defaults)"),
    description="LoRA+ (Hayou et al. 2024): LoRA with lr(B) = 16·lr(A)",
)
