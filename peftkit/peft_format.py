"""The on-disk schema of an adapter folder: ``adapter_config.json`` (PEFT's fields, typed), peftkit's sidecar
``peftkit.json``, ``adapter_model.safetensors`` keyed ``base_model.model.<module path>.<suffix>``; and the one
reader of such a folder (:func:`read_adapter`), which checks everything that needs no model.

Which registered architecture reads a PEFT ``peft_type`` is each architecture's own declaration
(``@registry.architecture(..., peft_type=...)``), never a table here.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import registry
from .config import AdapterConfig
from .errors import CheckpointError
from .fileio import check_safetensors_header, sha256_file
from .validation import check_fields, json_loads, option, pattern_suffix_match

CONFIG_NAME = "adapter_config.json"
METADATA_NAME = "peftkit.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
VERSION = "0.1.0"


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or corrupt file is one CheckpointError. The header is
    checked before anything else is read (:func:`peftkit.fileio.check_safetensors_header`)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        if (path.parent / "adapter_model.bin").is_file():
            raise CheckpointError(
                f"{path}: file not found, only adapter_model.bin (a pickle, which peftkit never loads); convert it "
                "with PEFT (load it, then save_pretrained(dir, safe_serialization=True))"
            )
        raise CheckpointError(f"{path}: file not found; expected the adapter weights ({WEIGHTS_NAME}) here")
    try:
        check_safetensors_header(path)
        return load_file(path)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc}); the file is corrupt or truncated - save the "
            "adapter again or restore it from a good copy"
        ) from None


@dataclass
class PeftFields:
    """The fields of ``adapter_config.json`` that peftkit reads, with their JSON types and ranges. Other PEFT
    fields are kept and not read (PEFT adds fields between versions)."""

    peft_type: str = "LORA"
    r: int = option(8, gt=0)
    lora_alpha: float = option(8.0, gt=0)
    use_rslora: bool = False
    lora_dropout: float | None = option(0.0, ge=0, lt=1)
    rank_pattern: dict[str, int] | None = option(None, gt=0)
    alpha_pattern: dict[str, float] | None = option(None, gt=0)
    target_modules: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    use_dora: bool = False
    lora_bias: bool = False
    bias: str = "none"
    apply_GS: bool = False  # HRA
    init_weights: bool = True  # HRA
    peftkit: dict[str, Any] | None = None


@dataclass
class PeftkitFields:
    """The ``peftkit`` section of ``adapter_config.json`` (its ``config`` is an AdapterConfig, checked by
    ``AdapterConfig.from_dict``)."""

    version: str | None = None
    method: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str | None = option(None, expect="a hex sha256 string")
    # "axis:name" -> the module that registered a component from outside peftkit (a plugin), so that loading
    # where the plugin is missing can say which package to install
    plugins: dict[str, Any] = field(default_factory=dict)
    # A classification adapter's head: the base is rebuilt with these (merge, export, chat)
    num_labels: int | None = option(None, gt=0, le=100_000)
    id2label: dict[str, str] | None = None
    label2id: dict[str, int] | None = option(None, ge=0, le=100_000)


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """``adapter_config.json`` of an adapter folder, every field peftkit reads checked for its JSON type and
    range (:mod:`peftkit.validation`); a bad field is one CheckpointError naming the file and the field."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; expected an adapter folder holding {CONFIG_NAME} and "
                              f"{WEIGHTS_NAME}")
    data = _read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    data = check_fields(PeftFields, data, prefix=f"{path}: ", unknown="ignore", error=CheckpointError)
    if data.get("peftkit") is not None:  # a folder saved before the peftkit.json sidecar
        data["peftkit"] = _check_section(data["peftkit"], f"{path}: peftkit.")
    return data


def _read_json(path: Path) -> Any:
    """A JSON file of an adapter folder, bounded (:func:`peftkit.validation.json_loads`); else one
    CheckpointError naming the file."""
    try:
        return json_loads(path.read_bytes(), str(path))
    except ValueError as exc:  # ConfigError from json_loads, UnicodeDecodeError
        raise CheckpointError(f"{exc}; the file is corrupt - save the adapter again" if str(path) in str(exc) else
                              f"{path}: not valid JSON ({exc}); the file is corrupt - save the adapter again") from None


def _check_section(section: dict[str, Any], prefix: str) -> dict[str, Any]:
    """peftkit's metadata (the sidecar, or an old config's ``peftkit`` key) with its field types checked, its
    config's too: the architecture name is read before the config is built."""
    section = check_fields(PeftkitFields, section, prefix=prefix, unknown="ignore", error=CheckpointError)
    section["config"] = check_fields(AdapterConfig, section["config"], prefix=f"{prefix}config.", unknown="ignore",
                                     error=CheckpointError)
    id2label, num_labels = section.get("id2label"), section.get("num_labels")
    if id2label:
        count = num_labels if num_labels is not None else len(id2label)
        bad = [k for k in id2label if not (k.isdigit() and len(k) < 7 and int(k) < count)]
        if bad:
            raise CheckpointError(f"{prefix}id2label: keys must be the class indices 0..{count - 1} as strings, got "
                                  f"{[k[:20] for k in bad[:3]]}; fix the file or save the adapter again")
    return section


# ------------------------------------------------------------------------------------------ writing the schema
def target_list(names: list[str], all_names: list[str]) -> list[str]:
    """Leaf names when they select exactly ``names``; full module paths otherwise."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {n for n in all_names if n.rsplit(".", 1)[-1] in leaves}
    return leaves if selected == set(names) else sorted(names)


def saved_patterns(config: AdapterConfig, per_layer: dict[str, tuple[int, float]]) -> tuple[int, float, dict, dict]:
    """(r, alpha, rank_pattern, alpha_pattern) that give every layer its saved (r, alpha) under PEFT's rule."""
    if all(config.rank_alpha(n) == ra for n, ra in per_layer.items()):
        return config.r, config.alpha, dict(config.rank_pattern), dict(config.alpha_pattern)
    r_common = Counter(r for r, _ in per_layer.values()).most_common(1)[0][0]
    a_common = Counter(a for _, a in per_layer.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(n): r for n, (r, _) in per_layer.items() if r != r_common}
    alpha_pattern = {re.escape(n): a for n, (_, a) in per_layer.items() if a != a_common}
    return r_common, a_common, rank_pattern, alpha_pattern


def peft_rewritten_targets(model: nn.Module, module_names: list[str]) -> list[str]:
    """The adapted modules PEFT 0.21's loader would take for transformers-v4 expert names and rewrite.

    On the model types transformers converts from v4 checkpoints (Mixtral, Qwen3-MoE, DeepSeek-V2/V3, OLMoE ...),
    ``PeftModel.from_pretrained`` maps every ``target_modules`` entry named like a v4 expert projection
    (``gate_proj``/``up_proj``/``down_proj``, Mixtral's ``w1``/``w2``/``w3``) onto the fused expert parameters, also
    when it names a dense or shared-expert linear layer (peft/utils/transformers_weight_conversion.py). Such an
    adapter is exact in peftkit but does not load in PEFT (its own adapters on those layers neither)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        if get_checkpoint_conversion_mapping(model_type) is None:
            return []  # nothing converted: PEFT (≈ 55 MiB with bitsandbytes) is not imported into a training run
        from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING
    except Exception:  # noqa: BLE001 - another PEFT version: nothing known to warn about
        return []
    pattern = _MODEL_TO_CONVERSION_PATTERN.get(model_type)
    mapping = _MOE_TARGET_MODULE_MAPPING.get(pattern) if pattern else None
    if not mapping:
        return []
    return [n for n in module_names if n.rsplit(".", 1)[-1] in mapping and n.rsplit(".", 1)[-1] != "gate"]


# ------------------------------------------------------------------------------------------ reading a folder
def read_metadata(directory: str | os.PathLike, data: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """peftkit's section of an adapter folder: the sidecar ``peftkit.json``, or the ``peftkit`` key of an
    ``adapter_config.json`` written before the sidecar (``data``); None for a plain PEFT adapter."""
    path = Path(directory) / METADATA_NAME
    if path.is_file():
        section = _read_json(path)
        if not isinstance(section, dict):
            raise CheckpointError(f"{path}: expected a JSON object, got {type(section).__name__}")
        expected = section.get("config_sha256")
        if expected and sha256_file(Path(directory) / CONFIG_NAME) != expected:
            raise CheckpointError(
                f"{directory}: {CONFIG_NAME} is not the file saved with this {METADATA_NAME} (its sha256 differs from "
                "the one recorded at save time): the folder mixes two saves - save the adapter again")
        return _check_section(section, f"{path}: ")
    if data is None:
        data = read_config(directory)
    section = data.get("peftkit")
    return section if isinstance(section, dict) else None


@dataclass
class AdapterFolder:
    """An adapter folder as read and checked by :func:`read_adapter`."""

    directory: Path
    config: dict[str, Any]  # adapter_config.json, its fields checked
    metadata: dict[str, Any] | None  # peftkit's sidecar (or an old config's peftkit key); None for plain PEFT
    tensors: dict[str, torch.Tensor]
    architecture: str  # the registered architecture that reads the tensors


def read_adapter(directory: str | os.PathLike) -> AdapterFolder:
    """The one reader of adapter folders (``load``, ``info``, ``export``, ``merge``, ``chat``, ``push``): every
    check that needs no model, so no command takes a folder that another refuses.

    The config and sidecar are bounded JSON with typed fields; the weights file's header is checked before it is
    read, and its sha256 against the one the sidecar recorded; the format is one peftkit reads; every tensor has
    at least one dimension and one value, is finite, and is floating point in PEFT's formats (a saved head may
    hold integer buffers; a peftkit format's masks are checked against its layers by ``load``);
    and a LoRA's tensors have the rank its config gives each module (``r`` / ``rank_pattern``, PEFT's rule).
    Raises one CheckpointError naming the file and what is wrong."""
    directory = Path(directory)
    data = read_config(directory)
    peft_type = data.get("peft_type")
    section = read_metadata(directory, data)
    if section is not None and section.get("config", {}).get("architecture"):
        arch_name = section["config"]["architecture"]
    else:
        arch_name = registry.architecture_for_peft_type(peft_type, data)
    if arch_name is None:
        raise CheckpointError(
            f"{directory / CONFIG_NAME}: peft_type '{peft_type}' is not a format peftkit reads (it reads PEFT's "
            f"{' and '.join(sorted(registry.peft_architectures()))} adapters and its own); convert it with PEFT or "
            "retrain it with peftkit"
        )
    # An architecture not registered here (a plugin's) is reported by the loader with its own error.
    component = registry.components("architecture").get(arch_name)
    dora_read = getattr(component, "peft_flag", None) == "use_dora"
    if peft_type == "LORA" and ((data.get("use_dora") and not dora_read) or data.get("lora_bias")
                                or data.get("bias", "none") != "none"):
        feature = ("DoRA" if data.get("use_dora") and not dora_read else "lora_bias" if data.get("lora_bias")
                   else "bias=" + str(data.get("bias")))
        raise CheckpointError(
            f"{directory / CONFIG_NAME}: this LoRA uses "
            f"{feature}, "
            "which peftkit does not read; merge it with PEFT (merge_and_unload) and use the merged model as the base"
        )
    tensors = read_tensors(directory / WEIGHTS_NAME)
    expected = section.get("weights_sha256") if section else None
    if expected and sha256_file(directory / WEIGHTS_NAME) != expected:
        raise CheckpointError(
            f"{directory}: {WEIGHTS_NAME} is not the file saved with this {CONFIG_NAME} (its sha256 differs from the "
            "one recorded at save time): it was corrupted, or the folder mixes two saves - save the adapter again"
        )
    if not tensors:
        raise CheckpointError(f"{directory / WEIGHTS_NAME}: holds no adapter weights (no tensors at all); the file is "
                              "empty or was replaced - save the adapter again")
    heads = list(data.get("modules_to_save") or [])
    problems = []
    for key, tensor in tensors.items():
        path = key[len(PREFIX):] if key.startswith(PREFIX) else key
        in_head = any(path.startswith(h + ".") or ("." + h + ".") in ("." + path) for h in heads)
        if tensor.dim() == 0 or tensor.numel() == 0:
            problems.append(f"{key} has shape {tuple(tensor.shape)} (an adapter tensor needs at least one value in "
                            "at least one dimension)")
        elif not tensor.is_floating_point():
            # PEFT's formats hold float weights only; a peftkit format may hold masks (ElaLoRA's lora_mask is
            # bool), whose kinds load checks against the layer's own tensors.
            peft_formats = registry.peft_architectures()
            if not in_head and peft_type in peft_formats and arch_name in peft_formats.values():
                problems.append(f"{key} is {tensor.dtype}, not floating point (adapter weights are float tensors)")
        elif not bool(torch.isfinite(tensor).all()):
            problems.append(f"{key} holds NaN or inf")
    if problems:
        raise CheckpointError(f"{directory / WEIGHTS_NAME}: {len(problems)} bad tensors: {'; '.join(problems[:3])}"
                              f"{' ...' if len(problems) > 3 else ''}; the adapter is broken - save it again from a "
                              "good run (a trained adapter is finite float tensors)")
    if peft_type == "LORA" and arch_name == "lora":
        _check_lora_ranks(directory, data, tensors)
    return AdapterFolder(directory, data, section, tensors, arch_name)


def _check_lora_ranks(directory: Path, data: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Each module's lora_A rows and lora_B columns equal the rank the config gives it (PEFT reads the rank
    from the config, so a mismatch would load as another adapter or fail inside PEFT)."""
    r = int(data.get("r", 8))
    pattern = data.get("rank_pattern") or {}
    # PEFT's target_parameters: a fused expert stack's lora_A holds experts x rank rows (one rank-r block per
    # expert), at the owner module's path, nested in '.base_layer' once per further parameter of that module.
    owners = [e.rsplit(".", 1)[0] if "." in e else "" for e in data.get("target_parameters") or []]
    wrong = []
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        name = module[len(PREFIX):] if module.startswith(PREFIX) else module
        b = tensors.get(f"{module}.lora_B.weight")
        rank = next((int(v) for k, v in pattern.items() if pattern_suffix_match(k, name, "rank_pattern",
                                                                               CheckpointError)), r)
        owner = name
        while owner.endswith(".base_layer"):
            owner = owner[: -len(".base_layer")]
        stacked = any(not o or owner == o or owner.endswith("." + o) for o in owners)
        got = {int(a.shape[0]), *([int(b.shape[1])] if b is not None and b.dim() >= 2 else [])}
        if stacked and len(got) == 1 and rank > 0 and next(iter(got)) % rank == 0:
            got = {rank}  # E blocks of rank r
        if b is None or b.dim() < 2 or a.dim() < 2 or got != {rank}:
            wrong.append(f"{name}: config rank {rank}, lora_A {tuple(a.shape)}, lora_B "
                         f"{tuple(b.shape) if b is not None else 'missing'}")
    if wrong:
        raise CheckpointError(f"{directory}: the ranks in {CONFIG_NAME} (r={r}, rank_pattern) disagree with the "
                              f"tensors in {WEIGHTS_NAME} ({len(wrong)} modules): {'; '.join(wrong[:3])}"
                              f"{' ...' if len(wrong) > 3 else ''}; the files come from different saves - save the "
                              "adapter again")

