"""Merged models at the precision they are served in, with the error the merge costs measured.

``merge_for_serving(model)`` takes a model holding loaded adapters (``peftkit.load``) and returns the plain merged
model: every bitsandbytes base layer is first dequantized to an fp32 ``nn.Linear`` (the adapter is exact with
respect to those dequantized weights: it trained on them), the whole model is merged in fp32 (so the update is
never rounded to the base's dtype before it is added), and only then cast to the dtype it is written in.
``quantize="nf4"`` then quantizes the merged weights again (bitsandbytes NF4, as QLoRA training loads them).

The error is measured on a fixed probe batch (random token ids, seeded, the same on every run): the logits of the
written model against the logits of the unmerged model with its adapters, as the relative Frobenius error, the
largest absolute difference and the share of positions whose argmax (greedy token or class) is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from . import quantized
from .errors import ConfigError
from .layer import AdapterLayer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTIZE = ("nf4",)


@dataclass
class MergeError:
    """How far the written model's logits are from the unmerged model's on the probe batch."""

    relative: float  # ‖Δ‖_F / ‖logits‖_F
    max_abs: float
    argmax_agreement: float  # share of positions (or rows) with the same argmax, 0..1
    dtype: str
    quantize: str | None = None

    def __str__(self) -> str:
        what = f"{self.dtype}{' + ' + self.quantize if self.quantize else ''}"
        return (f"{what}: logits vs the unmerged model: relative error {self.relative:.2e}, max |Δ| "
                f"{self.max_abs:.3g}, argmax agreement {100 * self.argmax_agreement:.2f} %")


def dtype_from_name(name: str | None, key: str = "--dtype") -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"{key}: expected one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))


def probe_batch(model: nn.Module, batch_size: int = 4, seq_len: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random token ids (batch_size, seq_len) within the model's vocabulary, with an attention mask."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab <= 1:
        raise ConfigError("merge: the model's config has no vocab_size to draw a probe batch from")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch_size, seq_len), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    finally:
        model.train(was_training)


def compare(ours: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype, quantize: str | None) -> MergeError:
    diff = (ours - reference).double()
    return MergeError(relative=float(diff.norm() / reference.double().norm().clamp_min(1e-30)),
                      max_abs=float(diff.abs().max()),
                      argmax_agreement=float((ours.argmax(-1) == reference.argmax(-1)).double().mean()),
                      dtype=dtype_name(dtype), quantize=quantize)


def dequantize(model: nn.Module) -> int:
    """Replace every bitsandbytes 4/8-bit linear layer (adapter bases included) by an fp32 ``nn.Linear`` holding its
    dequantized weight; returns how many were replaced and drops the model's quantization config."""
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            # An AdapterLayer shows its base's weight: its base_layer child is the one replaced.
            if isinstance(child, AdapterLayer) or not (quantized.is_4bit(child) or quantized.is_8bit(child)):
                continue
            dense = quantized.dense_weight(child).float()
            linear = nn.Linear(dense.shape[1], dense.shape[0], bias=child.bias is not None, device=dense.device)
            with torch.no_grad():
                linear.weight.copy_(dense)
                if child.bias is not None:
                    linear.bias.copy_(child.bias.detach().float())
            linear.requires_grad_(False)
            setattr(parent, child_name, linear)
            if isinstance(parent, AdapterLayer) and child_name == "base_layer":
                parent.kind, _ = parent.describe_base(linear)  # merges now write the dense weight
            replaced += 1
    quantizer = getattr(model, "hf_quantizer", None)
    if replaced and quantizer is not None:
        quantizer.remove_quantization_config(model)  # transformers' own: config, quantizer, flags
    return replaced


def base_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the base model's weights are stored in: the config's for a quantized model (its compute dtype
    otherwise), else the dtype of its floating-point parameters."""
    if getattr(model.config, "quantization_config", None) is not None:
        return torch.bfloat16  # a QLoRA base: bf16 is what it came from in practice
    for param in model.parameters():
        if param.is_floating_point() and type(param).__name__ not in ("Params4bit", "Int8Params"):
            return param.dtype
    return torch.float32


def merge_for_serving(model: nn.Module, dtype: torch.dtype | None = None, quantize: str | None = None,
                      probe: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(the plain merged model in ``dtype``, the unmerged model's probe logits, the merged model's probe logits).

    ``model`` holds its adapters (``peftkit.load``); it is changed in place. ``dtype`` defaults to the base's
    own dtype (bf16 for a 4-bit base). With ``quantize`` the returned model is still dense: the caller writes it
    and reloads it quantized (see ``quantized_copy``), which is what a server loads."""
    from .api import merge, unwrap

    if quantize is not None and quantize not in QUANTIZE:
        raise ConfigError(f"--quantize: expected one of {list(QUANTIZE)}, got {quantize!r}")
    target = dtype or base_dtype(model)
    probe = probe if probe is not None else probe_batch(model)
    reference = logits(model, probe)
    dequantize(model)
    model.float()
    merge(model, safe=True)  # a MergeError (nothing written) when a merged weight would be NaN or inf
    model = unwrap(model, merge=True)
    model.to(target)
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        raise ConfigError(f"merge: the merged model has NaN or inf in {bad[:4]} (in {dtype_name(target)}); the "
                          "adapter is broken, or the weights overflow this dtype (try --dtype bf16 or fp32) - nothing "
                          "was written")
    model.config.dtype = target
    return model, reference, logits(model, probe)


def quantized_kwargs(quantize: str, compute_dtype: torch.dtype) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that load a folder quantized the way ``quantize`` names."""
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize,
                                                      bnb_4bit_compute_dtype=compute_dtype)}


# ------------------------------------------------------------------------------------------ who serves what
def engines(peft_type: str | None) -> str:
    """One line: which engines load an adapter saved in ``peft_type``, and the export that serves it elsewhere."""
    if peft_type == "LORA":
        return ("PEFT, transformers (load_adapter), vLLM and SGLang (multi-LoRA) as it is; llama.cpp and Ollama after "
                "`peftkit export ADAPTER --to gguf`")
    if peft_type == "HRA":
        return ("PEFT (nn.Linear layers only); vLLM, SGLang, transformers after `peftkit export ADAPTER --to lora "
                "--base MODEL`; llama.cpp and Ollama after `--to gguf --base MODEL`")
    return ("peftkit only (native format); PEFT, vLLM, SGLang, transformers after `peftkit export ADAPTER --to lora "
            "--base MODEL`; llama.cpp and Ollama after `--to gguf --base MODEL`")
