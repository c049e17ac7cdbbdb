"""GGUF both ways: LoRA adapters for llama.cpp and Ollama out, GGUF files as base models in.

Out: ``export_gguf`` writes the adapter's exact plain-LoRA form (``export(to="lora")``) as a llama.cpp LoRA adapter
with the ``gguf`` package's own writer: ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``,
and per adapted module ``<gguf name>.weight.lora_a`` (r, in) and ``.lora_b`` (out, r), the names from ``gguf``'s
tensor-name map of the base architecture. llama.cpp scales every pair by alpha / r (r from the tensor), so a
per-layer rank or scale (rank_pattern, alpha_pattern, rsLoRA) is folded into ``lora_b``: the written pairs give
s·B·A exactly. Where llama.cpp's converter reorders a weight's output rows (Llama's q/k rotary layout), the same
permutation is applied to ``lora_b``'s rows. Architectures that ``gguf`` does not map, modules without a GGUF name,
and LoRA parts llama.cpp cannot apply (a bias on ``lora_B``, embedding LoRAs, trained heads) are refused.

In (:mod:`peftkit.gguf_base`, re-exported here): ``plain_model_folder(source, gguf_file)`` loads a GGUF file
through transformers' GGUF support (it dequantizes the weights) once, rebuilds it as a plain model (the loaded one
keeps a ``quantization_config`` of ``gguf``, which blocks ``save_pretrained`` and adapter libraries) and caches
that folder with the tokenizer; ``load_model`` and a recipe's ``model.gguf_file`` read it from there.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import ConfigError
from .gguf_base import GGUF_SUFFIX, cache_root, plain_model_folder, split_reference  # noqa: F401 - re-exported

ADAPTER_FILE = "adapter.gguf"
# transformers' model_type -> llama.cpp's architecture name, where they differ (llama.cpp's converter converts
# Mistral checkpoints as "llama"; the others are spelled differently).
MODEL_TYPE_TO_ARCH = {"mistral": "llama", "cohere": "command-r", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
                      "gemma3_text": "gemma3", "gpt_oss": "gpt-oss", "minimax_m2": "minimax-m2"}
# Architectures whose converter reshapes fused weights in a way not reproduced here: refused, never written wrong.
UNSUPPORTED = {"bloom": "llama.cpp's converter interleaves Bloom's fused query_key_value rows per head",
               "baichuan": "llama.cpp's converter splits and permutes Baichuan's fused W_pack rows",
               "internlm2": "llama.cpp's converter reorders InternLM2's fused wqkv rows",
               "deci": "llama.cpp's converter permutes q/k rows with per-layer head counts"}
# Architectures whose q/k rows llama.cpp's converter permutes for its rotary layout (its LlamaModel and subclasses).
ROPE_PERMUTED = ("llama", "granite")


# ------------------------------------------------------------------------------------------ names
def gguf_architecture(config: Any) -> str:
    """llama.cpp's architecture name for a transformers config (``general.architecture`` of its GGUF files)."""
    import gguf

    model_type = getattr(config, "model_type", None)
    arch = MODEL_TYPE_TO_ARCH.get(model_type, model_type)
    if arch in UNSUPPORTED:
        raise ConfigError(f"to: gguf: the '{model_type}' architecture is not supported ({UNSUPPORTED[arch]}); export "
                          "to='lora' and convert it with llama.cpp's convert_lora_to_gguf.py")
    if arch not in gguf.MODEL_ARCH_NAMES.values():
        raise ConfigError(f"to: gguf: the gguf package maps no architecture '{model_type}' (llama.cpp cannot load "
                          "this base model); export to='lora' for PEFT, vLLM or SGLang instead")
    return arch


def _arch_enum(arch: str):
    import gguf

    return next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)


def _rope_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter's reordering of a q/k projection's output rows (HF's half-split rotary layout ->
    GGUF's interleaved pairs), applied to ``rows`` (out, ...)."""
    head_dim_half = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, 2, head_dim_half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _row_permutation(arch: str, gguf_name: str, config: Any):
    if arch not in ROPE_PERMUTED:
        return None
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if gguf_name.endswith(".attn_q"):
        return lambda rows: _rope_permute(rows, heads)
    if gguf_name.endswith(".attn_k"):
        return lambda rows: _rope_permute(rows, kv_heads)
    return None


def _pattern_value(patterns: dict[str, Any] | None, name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern rule: the first key that matches the end of the module path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# ------------------------------------------------------------------------------------------ writing
def lora_pairs(tensors: dict[str, torch.Tensor],
               peft_config: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Module path -> (A (r, in), B (out, r), s) of a plain PEFT LoRA's tensors and config, ΔW = s·B·A."""
    from .peft_format import PREFIX

    if peft_config.get("peft_type") != "LORA":
        raise ConfigError(f"to: gguf: expected a LoRA, got peft_type {peft_config.get('peft_type')}")
    if peft_config.get("use_dora"):
        raise ConfigError("to: gguf: llama.cpp applies no DoRA magnitudes; merge the adapter instead (peftkit merge)")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    refused = []
    for key, tensor in tensors.items():
        path = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix, role in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
            if path.endswith(suffix):
                pairs.setdefault(path[: -len(suffix)], {})[role] = tensor
                break
        else:
            refused.append(path)
    if refused:
        raise ConfigError(
            f"to: gguf: llama.cpp LoRA adapters hold only lora_a/lora_b pairs of linear layers; this adapter also has "
            f"{refused[:3]}{' ...' if len(refused) > 3 else ''} (a bias change such as Hydra's with biased branches, "
            "an embedding LoRA or a trained head). Serve it with PEFT (export to='lora'), or merge it")
    rslora = bool(peft_config.get("use_rslora"))
    out = {}
    for name, pair in pairs.items():
        r = int(_pattern_value(peft_config.get("rank_pattern"), name, peft_config["r"]))
        alpha = float(_pattern_value(peft_config.get("alpha_pattern"), name, peft_config["lora_alpha"]))
        out[name] = (pair["A"], pair["B"], alpha / (r ** 0.5 if rslora else r))
    return out


def write_adapter(path: str | os.PathLike, pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
                  config: Any, name: str | None = None) -> Path:
    """Write ``pairs`` (module path -> (A (r, in), B (out, r), s)) as a llama.cpp LoRA adapter for the base whose
    transformers ``config`` is given; atomic (temporary file, then rename)."""
    import gguf

    from .fileio import file_mode

    arch = gguf_architecture(config)
    n_blocks = int(getattr(config, "num_hidden_layers", 0) or 0)
    name_map = gguf.get_tensor_name_map(_arch_enum(arch), n_blocks)
    named, unmapped = {}, []
    for module, pair in pairs.items():
        gguf_name = name_map.get_name(module)
        if gguf_name is None:
            unmapped.append(module)
        else:
            named[gguf_name] = pair
    if unmapped:
        raise ConfigError(f"to: gguf: modules without a name in gguf's '{arch}' tensor map: {unmapped[:4]}"
                          f"{' ...' if len(unmapped) > 4 else ''}; target only the transformer blocks' linear layers "
                          "(e.g. targets: all-linear without the head) or export to='lora'")
    if not named:
        raise ConfigError("to: gguf: the adapter holds no LoRA pairs")
    # llama.cpp multiplies each pair by alpha / rank(lora_a): one alpha for the file, the rest folded into lora_b.
    alpha = Counter(round(s * a.shape[0], 12) for a, _, s in named.values()).most_common(1)[0][0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        if name:
            writer.add_name(name)
        for gguf_name, (a, b, s) in sorted(named.items()):
            b = b.detach().double() * (s * a.shape[0] / alpha)
            permute = _row_permutation(arch, gguf_name, config)
            if permute is not None:
                b = permute(b)
            writer.add_tensor(f"{gguf_name}.weight.lora_a", a.detach().float().cpu().contiguous().numpy())
            writer.add_tensor(f"{gguf_name}.weight.lora_b", b.float().cpu().contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def export_gguf(model_or_dir: nn.Module | str | os.PathLike, directory: str | os.PathLike,
                base_model: nn.Module | None = None) -> Path:
    """``directory/adapter.gguf``: the adapter (a wrapped model, or a saved folder with ``base_model`` where its
    method is not a LoRA already) as a llama.cpp LoRA adapter. Returns the folder."""
    from . import checkpoint

    if isinstance(model_or_dir, nn.Module):
        tensors, peft_config = checkpoint.adapter_state(model_or_dir, "default", export="lora")
        config = model_or_dir.config
        label = checkpoint.base_reference(model_or_dir)
    else:
        with tempfile.TemporaryDirectory() as staging:
            lora = checkpoint.export(model_or_dir, Path(staging) / "lora", to="lora", base_model=base_model)
            tensors = checkpoint.read_tensors(lora / checkpoint.WEIGHTS_NAME)
            peft_config = checkpoint.read_config(lora)
        config = base_model.config if base_model is not None else _recorded_config(peft_config, model_or_dir)
        label = peft_config.get("base_model_name_or_path")
    if peft_config.get("modules_to_save"):
        raise ConfigError("to: gguf: the adapter trains whole modules too (modules_to_save), which a llama.cpp LoRA "
                          "adapter cannot hold; merge it (peftkit merge) or export to='lora'")
    folder = Path(directory)
    write_adapter(folder / ADAPTER_FILE, lora_pairs(tensors, peft_config), config,
                  name=f"peftkit LoRA for {label}" if label else None)
    return folder


def _recorded_config(peft_config: dict[str, Any], source: Any):
    from transformers import AutoConfig

    from .resolve import resolve_model_ref

    ref = peft_config.get("base_model_name_or_path")
    if not ref:
        raise ConfigError(f"to: gguf: {source} records no base model; pass base_model=<the base model> (CLI: --base)")
    try:
        return AutoConfig.from_pretrained(resolve_model_ref(ref, "base_model_name_or_path"))
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"to: gguf: could not read the config of the recorded base '{ref}' ({exc}); pass "
                          "base_model=<the base model> (CLI: --base)") from None
