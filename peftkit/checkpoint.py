"""Adapter checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors``, in PEFT's format where the
architecture has one, with atomic writes and verified reads.

Keys are PEFT's: ``base_model.model.<module path>.<suffix>`` (e.g. ``…q_proj.lora_A.weight``), with the
adapter name stripped; the adapter ``default`` goes to ``dir/`` and any other to ``dir/<name>/``. The config
holds PEFT's fields only, so PEFT reads it without a warning; peftkit's own metadata (the full peftkit config,
the method that trained it, and the sha256 of the weights and config files, so files from different saves are
caught on load) is the sidecar ``peftkit.json`` beside it. Files written before the sidecar carry that section
under the config's ``peftkit`` key, which is still read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import registry
from .config import AdapterConfig, _name_matches, parameter_candidates
from .errors import CheckpointError, ConfigError
from .inject import (adapter_layers, drop_adapter, inject, parameter_flags, probe_adapter, remove,
                     restore_parameter_flags, saved_modules, state_of)
from .layer import AdapterLayer
from .expert_layer import ExpertParameterLayer
from .validation import MAX_INT, check_fields, check_output_dir, json_loads, option, pattern_suffix_match

CONFIG_NAME = "adapter_config.json"
METADATA_NAME = "peftkit.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
VERSION = "0.1.0"


# ------------------------------------------------------------------------------------------ atomic IO
def _umask() -> int:
    """The process umask: from /proc on Linux (reading it there changes nothing, so no other thread can create a
    file under a wrong mask meanwhile), else set and reset at once."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def file_mode() -> int:
    """The mode ``open`` gives a new file under the process umask. mkstemp's 0600 would hide checkpoints from
    the group and others that the user's umask lets read them."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode ``mkdir`` gives a new folder under the process umask (mkdtemp's is 0700)."""
    return 0o777 & ~_umask()


def stage_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to a fsynced temporary file in ``path``'s folder; returns the temporary file's path.

    Renaming it over ``path`` (``os.replace``) is then the atomic step; the caller removes it on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), file_mode())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    tmp = stage_bytes(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (the folder's entry, not only the file, reaches the disk)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def _json_default(value: Any):
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, torch.dtype):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Save safetensors atomically; returns the file's sha256."""
    data = serialize_tensors(tensors, metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def serialize_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors bytes of ``tensors`` (moved to CPU, contiguous)."""
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _check_header(path: Path) -> None:
    """Parse and check a safetensors header before any tensor is read: its length, JSON, and that every
    tensor's offsets lie inside the file and fit its shape and dtype (a crafted or truncated file is refused
    without reading the rest of it, however large)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, shorter than a safetensors header")
        length = int.from_bytes(head, "little")
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"the header claims {length:,} bytes; the file has {size:,}")
        raw = handle.read(length)
    try:
        header = json_loads(raw, "header")
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    data_bytes = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"tensor '{name}': no dtype, shape and offsets")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if (dtype not in _DTYPE_BYTES or not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise ValueError(f"tensor '{name}': a malformed entry")
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes or end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise ValueError(f"tensor '{name}': offsets {offsets} do not fit its shape {shape} or the file")


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or corrupt file is one CheckpointError. The header is
    checked before anything else is read (:func:`_check_header`)."""
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
        _check_header(path)
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
        raise CheckpointError(f"{path}: file not found; expected an adapter folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
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


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ saving
BASE_REF_ATTR = "_peftkit_base_model_ref"
PKG_PREFIX = "pkg:"


def record_base_reference(model: nn.Module, reference: str | None) -> None:
    """Remember how the user named ``model``'s weights (a hub id, a folder, ``pkg:<module>/<folder>``), so a
    saved adapter records that name as ``base_model_name_or_path`` instead of the path it resolved to."""
    if reference:
        model.__dict__[BASE_REF_ATTR] = str(reference)


def base_reference(model: nn.Module) -> str | None:
    """The name a saved adapter records for its base: the user's reference when known; else the model's
    ``name_or_path``, where a folder inside an installed package becomes ``pkg:<module>/<folder>`` (an
    absolute site-packages path would not resolve on another machine)."""
    recorded = model.__dict__.get(BASE_REF_ATTR)
    if recorded:
        return recorded
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return package_reference(name) if name else None


def package_reference(path: str) -> str:
    """``pkg:<module>/<sub folder>`` for a folder inside an installed regular package; ``path`` otherwise."""
    folder = Path(path)
    if not folder.is_absolute() or not folder.is_dir():
        return path
    folder = folder.resolve()
    for entry in sys.path:
        if not entry or not Path(entry).is_absolute():
            continue  # the current folder is no installed location
        try:
            parts = folder.relative_to(Path(entry).resolve()).parts
        except (ValueError, OSError):
            continue
        if len(parts) < 2 or not parts[0].isidentifier():
            continue
        try:
            spec = importlib.util.find_spec(parts[0])
        except (ImportError, ValueError):
            continue
        origin = getattr(spec, "origin", None) if spec is not None else None
        # A regular package whose __init__ lies in this very folder (a namespace package would resolve anywhere).
        if origin and Path(origin).resolve().parent == Path(entry).resolve() / parts[0]:
            return f"{PKG_PREFIX}{parts[0]}/{'/'.join(parts[1:])}"
    return path


def plugin_modules(config: dict[str, Any]) -> dict[str, str]:
    """``{"axis:name": module}`` for every component of a saved config registered by a module outside peftkit
    (a plugin): what ``load`` names when that component is not registered where the adapter is read."""
    found = {}
    for axis in registry.AXES:
        name = config.get(axis)
        table = registry.components(axis)
        if isinstance(name, str) and name in table:
            module = getattr(table[name].obj, "__module__", "") or ""
            if module and module != "peftkit" and not module.startswith("peftkit."):
                found[f"{axis}:{name}"] = module
    return found


def label_fields(model: nn.Module) -> dict[str, Any]:
    """``num_labels``, ``id2label`` and ``label2id`` of a classification model (its head's shape and class
    names), so the base can be rebuilt with a head of the same shape for load / merge / export."""
    config = getattr(model, "config", None)
    if _task_type(model) not in ("SEQ_CLS", "TOKEN_CLS") or config is None or not getattr(config, "num_labels", None):
        return {}
    id2label = {str(int(k)): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    return {"num_labels": int(config.num_labels), "id2label": id2label, "label2id": label2id}


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None


def _target_list(names: list[str], all_names: list[str]) -> list[str]:
    """Leaf names when they select exactly ``names``; full module paths otherwise."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {n for n in all_names if n.rsplit(".", 1)[-1] in leaves}
    return leaves if selected == set(names) else sorted(names)


def _patterns(config: AdapterConfig, per_layer: dict[str, tuple[int, float]]) -> tuple[int, float, dict, dict]:
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
        from peft.utils.transformers_weight_conversion import (_MODEL_TO_CONVERSION_PATTERN,
                                                               _MOE_TARGET_MODULE_MAPPING)
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except Exception:  # noqa: BLE001 - another PEFT version: nothing known to warn about
        return []
    pattern = _MODEL_TO_CONVERSION_PATTERN.get(model_type)
    mapping = _MOE_TARGET_MODULE_MAPPING.get(pattern) if pattern else None
    if not mapping or get_checkpoint_conversion_mapping(model_type) is None:
        return []
    return [n for n in module_names if n.rsplit(".", 1)[-1] in mapping and n.rsplit(".", 1)[-1] != "gate"]


EXPORT_TARGETS = ("peft", "lora", "gguf")


def adapter_state(model: nn.Module, adapter_name: str, *, export: bool | str = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, PEFT-style config dict) of one adapter, in its saved or exported form.

    ``export``: False (the saved form), True or ``"peft"`` (PEFT's format of the architecture where it has one, a
    LoRA otherwise), ``"lora"`` (a plain LoRA for every layer, from the architecture's ``export_lora``)."""
    to_lora = export == "lora"
    state = state_of(model)
    if adapter_name not in state.configs:
        raise ConfigError(f"adapter_name: '{adapter_name}' not found; the model has {sorted(state.configs)}")
    config = state.configs[adapter_name]
    layers = {n: l for n, l in adapter_layers(model).items() if adapter_name in l.adapters}
    tensors: dict[str, torch.Tensor] = {}
    per_layer: dict[str, tuple[int, float]] = {}
    peft_types = set()
    conv1d = False
    # export_lora may return a 4th item, a bias change (out,) or None; PEFT stores it as lora_B.bias
    # (lora_bias=True, scaled by s like the rest of lora_B's output) and then needs it on every layer.
    lora_biases: dict[str, torch.Tensor | None] = {}
    # Fused expert parameters are PEFT's target_parameters (full names); their layers' module paths are only keys.
    parameter_layers = {n: l for n, l in layers.items() if isinstance(l, ExpertParameterLayer)}
    for name, layer in layers.items():
        if name in parameter_layers:
            for suffix, tensor in layer.saved_tensors(adapter_name).items():
                tensors[f"{PREFIX}{name}.{suffix}"] = tensor
            per_layer[layer.target_name] = layer.saved_rank_alpha(adapter_name)
            peft_types.add(getattr(layer, "peft_type", None) or "PEFTKIT")
            continue
        peft_type = getattr(layer, "peft_type", None)
        if export and (peft_type is None or (to_lora and peft_type != "LORA")):
            if not hasattr(layer, "export_lora"):
                raise ConfigError(
                    f"to: the '{layer.architecture_name}' adapter of {name} declares no low-rank form (export_lora), "
                    "so it cannot be written as a plain LoRA; export it in its own format (to='peft')")
            a, b, scale, *bias_change = layer.export_lora(adapter_name)
            r = a.shape[0]
            alpha = scale * (r ** 0.5 if config.rslora else r)
            tensors[f"{PREFIX}{name}.lora_A.weight"] = a
            tensors[f"{PREFIX}{name}.lora_B.weight"] = b
            lora_biases[name] = bias_change[0] / scale if bias_change and bias_change[0] is not None else None
            per_layer[name] = (r, alpha)
            peft_types.add("LORA")
        else:
            for suffix, tensor in layer.saved_tensors(adapter_name).items():
                tensors[f"{PREFIX}{name}.{suffix}"] = tensor
            per_layer[name] = layer.saved_rank_alpha(adapter_name)
            peft_types.add(getattr(layer, "peft_type", None) or "PEFTKIT")
        conv1d = conv1d or layer.kind == "conv1d"
    lora_bias = any(bias is not None for bias in lora_biases.values())
    if lora_bias:
        for name, bias in lora_biases.items():
            b = tensors[f"{PREFIX}{name}.lora_B.weight"]
            tensors[f"{PREFIX}{name}.lora_B.bias"] = bias if bias is not None else b.new_zeros(b.shape[0])
    saved_heads = []
    for name, wrapper in saved_modules(model).items():
        if adapter_name in wrapper.modules_to_save:
            saved_heads.append(name)
            for pname, tensor in wrapper.modules_to_save[adapter_name].state_dict().items():
                tensors[f"{PREFIX}{name}.{pname}"] = tensor
    if len(peft_types) != 1:
        raise ConfigError(f"adapter '{adapter_name}' mixes saved formats {sorted(peft_types)}; cannot save it as one")
    peft_type = peft_types.pop()
    r, alpha, rank_pattern, alpha_pattern = _patterns(config, per_layer)
    all_names = [n for n, _ in model.named_modules()]
    base_name = base_reference(model)
    saved_config = config.to_dict()
    # The saved config describes the saved tensors: they are final, so no init runs again on load (the
    # method that trained them stays in peftkit.method), and ranks/alphas are those of the saved form.
    saved_config.update(init="default", rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, r=r, alpha=alpha)
    saved_config["options"] = {k: v for k, v in config.options.items() if k != "init"}
    if export:
        # An export is for inference elsewhere: no optimizer or schedule. Layers exported as LoRA are a LoRA;
        # layers with a PEFT format of their own (HRA) keep their architecture and its options.
        saved_config.update(optimizer="adamw", schedule="none")
        saved_config["options"] = {k: v for k, v in saved_config["options"].items() if k == "architecture"}
        if peft_type == "LORA":
            saved_config["architecture"] = "lora"
            saved_config["options"] = {}
    module_layers = sorted(n for n in layers if n not in parameter_layers)
    target_parameters = sorted(l.target_name for l in parameter_layers.values()) or None
    rewritten = peft_rewritten_targets(model, module_layers) if peft_type == "LORA" else []
    if rewritten:
        warnings.warn(
            f"{adapter_name}: PEFT 0.21 reads {rewritten[0]} ({len(rewritten)} such layers) as a transformers-v4 expert "
            f"name on a '{model.config.model_type}' model and rewrites it onto the fused experts, so this adapter "
            "loads in peftkit (exact) but not in PEFT's PeftModel.from_pretrained. To serve it with PEFT, leave those "
            "dense/shared-expert layers out (exclude=[...]) or merge it (peftkit.unwrap)", stacklevel=3)
    saved_config["targets"] = module_layers
    saved_config["target_parameters"] = target_parameters
    saved_config["modules_to_save"] = saved_heads or None
    peft = {
        "peft_type": peft_type,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": _target_list(module_layers, all_names),
        "target_parameters": target_parameters,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": bool(config.rslora),
        "lora_dropout": float(config.dropout),
        "fan_in_fan_out": conv1d,
        "bias": "none",
        "lora_bias": lora_bias,
        "use_dora": False,
        "modules_to_save": saved_heads or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "task_type": _task_type(model),
        "base_model_name_or_path": base_name,
        "revision": None,
        "inference_mode": True,
        "peftkit": {"version": VERSION, "method": config.method, "config": saved_config, **label_fields(model)},
    }
    plugins = plugin_modules(saved_config)
    if plugins:  # only then: the sidecars of built-in methods are unchanged
        peft["peftkit"]["plugins"] = plugins
    if peft_type != "LORA":
        peft.pop("target_parameters", None)
        for key in ("lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout", "fan_in_fan_out",
                    "lora_bias", "use_dora", "init_lora_weights"):
            peft.pop(key, None)
        extra = getattr(next(iter(layers.values())), "peft_config_fields", None)
        if extra is not None:
            peft.update(extra(adapter_name, config))
    return tensors, peft


def save(model: nn.Module, directory: str | os.PathLike, adapter_names: list[str] | None = None,
         *, export: bool | str = False) -> list[Path]:
    """Save adapters (all by default): ``default`` into ``directory``, others into ``directory/<name>``."""
    state = state_of(model)
    names = adapter_names or list(state.configs)
    if Path(directory).exists() and not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: exists and is not a folder; save the adapter into a folder (new or existing)")
    written = []
    staged = [(name, *adapter_state(model, name, export=export)) for name in names]
    for name, tensors, _ in staged:
        empty = [key for key, tensor in tensors.items() if tensor.numel() == 0]
        if empty:  # a sharded engine's placeholder (ZeRO-3, FSDP) read where the full tensor was meant
            raise CheckpointError(
                f"save: adapter '{name}' has {len(empty)} empty tensors ({empty[:3]}): its parameters are sharded or "
                "released placeholders, not the trained values; save through peftkit's loop (training.distributed) or "
                "gather the adapter's parameters first. Nothing was written")
    files: list[tuple[str, Path]] = []  # (temporary file, final path)
    try:
        for name, tensors, peft in staged:
            folder = Path(directory) if name == "default" else Path(directory) / name
            data = serialize_tensors(tensors, metadata={"format": "pt"})
            metadata = peft.pop("peftkit")  # PEFT warns on keys it does not know: peftkit's go to the sidecar
            config_bytes = json_bytes(peft)
            metadata["weights_sha256"] = hashlib.sha256(data).hexdigest()
            metadata["config_sha256"] = hashlib.sha256(config_bytes).hexdigest()
            files.append((stage_bytes(folder / WEIGHTS_NAME, data), folder / WEIGHTS_NAME))
            files.append((stage_bytes(folder / METADATA_NAME, json_bytes(metadata)), folder / METADATA_NAME))
            files.append((stage_bytes(folder / CONFIG_NAME, config_bytes), folder / CONFIG_NAME))
            written.append(folder)
        # Every file is complete on disk before the first rename, so a failure up to here leaves the previous
        # checkpoint as it was. The renames follow back to back; a crash between two of them leaves a sidecar
        # whose recorded sha256s do not match the files beside it, which load refuses.
        for tmp, path in files:
            os.replace(tmp, path)
    finally:
        for tmp, _ in files:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return written


# ------------------------------------------------------------------------------------------ loading
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
        arch_name = {"LORA": "lora", "HRA": "hra"}.get(peft_type)
    if arch_name is None:
        raise CheckpointError(
            f"{directory / CONFIG_NAME}: peft_type '{peft_type}' is not a format peftkit reads (it reads PEFT's "
            "LORA and HRA adapters and its own); convert it with PEFT or retrain it with peftkit"
        )
    if peft_type == "LORA" and (data.get("use_dora") or data.get("lora_bias") or data.get("bias", "none") != "none"):
        raise CheckpointError(
            f"{directory / CONFIG_NAME}: this LoRA uses "
            f"{'DoRA' if data.get('use_dora') else 'lora_bias' if data.get('lora_bias') else 'bias=' + str(data.get('bias'))}, "
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
            if not in_head and peft_type in ("LORA", "HRA") and arch_name in ("lora", "hra"):
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



def _resolve(directory: str | os.PathLike, what: str = "adapter", **hub: Any) -> Path:
    """A folder, or a Hub id resolved to its local snapshot (offline: the cache); ``hub``: revision, token,
    local_files_only (``peftkit.hub.resolve_folder``)."""
    from .hub import resolve_folder

    return resolve_folder(directory, what, **hub)


def _config_from_peft(data: dict[str, Any], module_names: list[str], section: dict[str, Any] | None = None) -> AdapterConfig:
    if section is None:
        section = data.get("peftkit")
    if isinstance(section, dict) and isinstance(section.get("config"), dict):
        for key, module in (section.get("plugins") or {}).items():
            axis, _, name = str(key).partition(":")
            registry.note_plugin(axis, name, str(module))
        config = AdapterConfig.from_dict(section["config"])
    else:
        arch = {"LORA": "lora", "HRA": "hra"}.get(data.get("peft_type"))
        config = AdapterConfig(method=arch, architecture=arch)
        config.r = int(data.get("r", 8))
        config.alpha = float(data.get("lora_alpha", config.r if arch == "lora" else 8))
        config.rslora = bool(data.get("use_rslora", False))
        config.dropout = float(data.get("lora_dropout", 0.0) or 0.0)
        config.rank_pattern = dict(data.get("rank_pattern") or {})
        config.alpha_pattern = dict(data.get("alpha_pattern") or {})
        config.modules_to_save = list(data.get("modules_to_save") or []) or None
        comp = registry.get_component("architecture", arch)
        reader = getattr(comp.obj, "options_from_peft", None)
        if reader is not None:
            config.options = {"architecture": reader(data)}
    config.targets = sorted(module_names)
    return config


def _split_keys(tensors: dict[str, torch.Tensor], suffixes: tuple[str, ...], heads: list[str]):
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    head_tensors: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        path = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix in suffixes:
            if path.endswith("." + suffix):
                per_module.setdefault(path[: -len(suffix) - 1], {})[suffix] = tensor
                break
        else:
            head = next((h for h in heads if path.startswith(h + ".") or ("." + h + ".") in ("." + path)), None)
            if head is not None:
                module, _, pname = path.rpartition(".")
                head_tensors.setdefault(module, {})[pname] = tensor
            else:
                unknown.append(key)
    return per_module, head_tensors, unknown


def load(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
         trainable: bool = False, *, revision: str | None = None, token: bool | str | None = None,
         local_files_only: bool = False) -> nn.Module:
    """Inject the adapter saved in ``directory`` into ``model`` and fill it (peftkit or PEFT checkpoints).

    ``directory`` may be a Hub id, read at ``revision`` (branch, tag or commit) with ``token``.
    A non-default ``adapter_name`` is read from ``directory/<adapter_name>/`` when that folder exists (where
    ``save`` and PEFT's ``save_pretrained`` put it). On any error the model is left as it was.
    """
    directory = _resolve(directory, revision=revision, token=token, local_files_only=local_files_only)
    if adapter_name != "default" and (directory / adapter_name / CONFIG_NAME).is_file():
        # A non-default adapter lives in dir/<name>/ (save's layout and PEFT's save_pretrained's); dir/ itself
        # may hold the adapter "default" of the same save.
        directory = directory / adapter_name
    folder = read_adapter(directory)
    data, section, tensors, arch_name = folder.config, folder.metadata, folder.tensors, folder.architecture
    try:
        layer_cls = registry.get_component("architecture", arch_name).obj
    except ConfigError as exc:
        raise CheckpointError(
            f"{directory / CONFIG_NAME}: the adapter was saved by a peftkit method whose architecture is not "
            f"registered here ({exc}); install the package that provides it"
        ) from None
    heads = list(data.get("modules_to_save") or [])
    per_module, head_tensors, unknown = _split_keys(tensors, layer_cls.saved_suffixes, heads)
    if unknown:
        raise CheckpointError(
            f"{directory / WEIGHTS_NAME}: keys peftkit does not know for a '{arch_name}' adapter: {unknown[:4]}"
            f"{' ...' if len(unknown) > 4 else ''} (DoRA and trainable biases are not read)"
        )
    if not per_module:
        raise CheckpointError(
            f"{directory / WEIGHTS_NAME}: holds no adapter weights ({len(tensors)} tensors"
            f"{', only heads' if head_tensors else ''}; a '{arch_name}' adapter needs "
            f"{'/'.join(layer_cls.saved_suffixes)} tensors): the file is empty or was replaced - save the adapter again"
        )
    _check_labels(model, section or {}, directory)
    modules = dict(model.named_modules())
    missing = [n for n in per_module if n not in modules and re.sub(r"(\.base_layer)+$", "", n.replace(
        "base_layer.", "")) not in modules]
    if missing:
        raise CheckpointError(
            f"{directory}: the adapter targets modules this model does not have: {missing[:4]}; load it into the "
            f"base model it was trained on ({data.get('base_model_name_or_path')})"
        )
    try:
        config = _config_from_peft(data, list(per_module), section)
        module_keys, target_parameters = _split_parameter_keys(model, list(per_module), config, data, directory)
        config.targets, config.target_parameters = sorted(module_keys), target_parameters
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / CONFIG_NAME}: unreadable adapter config ({exc})") from None
    adapted_names = list(module_keys) + list(target_parameters or [])
    if config.modules_to_save:
        # Only the heads saved in the file (PEFT lists every head name of the task, e.g. classifier and score).
        config.modules_to_save = [h for h in config.modules_to_save
                                  if any(_name_matches(m, h) for m in head_tensors)] or None
    # The rank limit guards wrap's options. Saved ranks may exceed min(in, out) legitimately: PEFT does not check
    # them (and peftkit re-saves what it loaded), and an offset init saves the exact rank-2r form. The tensors'
    # shapes are checked against the layers below.
    object.__setattr__(config, "_allow_large_rank", True)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        _warn_unmatched_patterns(config, adapted_names)
        config_for_inject = _strip_patterns(config, adapted_names)
    try:
        # The shapes the config implies, against the saved tensors, before inject allocates anything (a crafted
        # config with an absurd rank is refused here, not after allocating it).
        _raise_on_mismatch(directory, per_module, _expected_shapes(model, layer_cls, config_for_inject,
                                                                   list(per_module), adapter_name))
    except ConfigError as exc:
        raise CheckpointError(f"{directory}: the adapter does not fit this model: {exc}") from None
    had_state = state_of(model, required=False) is not None
    flags = parameter_flags(model)
    try:
        touched = inject(model, config_for_inject, adapter_name)
    except ConfigError as exc:
        raise CheckpointError(f"{directory}: the adapter does not fit this model: {exc}") from None
    state_of(model).configs[adapter_name] = config
    try:
        _raise_on_mismatch(directory, per_module, {
            name: {k: tuple(v.shape) for k, v in layer.saved_tensors(adapter_name).items()}
            for name, layer in touched.items()})
        # A float tensor of the layer must come as a float tensor (an integer one would be cast silently).
        wrong_kind = [f"{name}.{k}" for name, layer in touched.items()
                      for k, v in layer.saved_tensors(adapter_name).items()
                      if v.is_floating_point() and not per_module[name][k].is_floating_point()]
        if wrong_kind:
            raise CheckpointError(f"{directory / WEIGHTS_NAME}: {wrong_kind[:3]} are integer or boolean tensors where "
                                  "the adapter holds floating point weights; the file is broken - save it again")
        for name, layer in touched.items():
            layer.load_saved_tensors(adapter_name, per_module[name])
        for name, wrapper in saved_modules(model).items():
            if name in head_tensors and adapter_name in wrapper.modules_to_save:
                target = wrapper.modules_to_save[adapter_name]
                try:
                    target.load_state_dict(head_tensors[name], strict=True)
                except RuntimeError as exc:
                    raise CheckpointError(f"{directory}: the saved head '{name}' does not fit: {exc}") from None
    except BaseException:
        drop_adapter(model, adapter_name)
        restore_parameter_flags(flags)
        raise
    _apply_class_names(model, section or {})
    state = state_of(model)
    if had_state:
        # Loading one more adapter leaves the flags of everything already there as they were.
        restore_parameter_flags(flags)
    train_new = trainable and adapter_name in state.active
    for layer in touched.values():
        for p in layer.adapters[adapter_name].parameters():
            p.requires_grad_(train_new)
    for wrapper in saved_modules(model).values():
        if adapter_name in wrapper.modules_to_save:
            for p in wrapper.modules_to_save[adapter_name].parameters():
                p.requires_grad_(train_new)
    return model


def _split_parameter_keys(model: nn.Module, keys: list[str], config: AdapterConfig, data: dict[str, Any],
                          directory: Path) -> tuple[list[str], list[str] | None]:
    """(module keys, full names of the targeted parameters) of a file's module keys: a key ``X`` or
    ``X.base_layer…`` whose module X owns a parameter listed in ``target_parameters`` (peftkit's config or PEFT's
    field, full names or suffixes) belongs to that parameter's layer."""
    listed = list(config.target_parameters or data.get("target_parameters") or [])
    if not listed:
        return keys, None
    candidates = [p for p, _ in parameter_candidates(model)]
    resolved = [p for p in candidates if any(_name_matches(p, entry) for entry in listed)]
    unmatched = [e for e in listed if not any(_name_matches(p, e) for p in candidates)]
    if unmatched:
        raise CheckpointError(f"{directory}: the adapter targets parameters this model does not have: {unmatched[:4]}; "
                              "load it into the base model it was trained on")
    owners = {p.rsplit(".", 1)[0] for p in resolved}
    module_keys = []
    for key in keys:
        path = key
        while path.endswith(".base_layer"):
            path = path[: -len(".base_layer")]
        if path not in owners:
            module_keys.append(key)
    return module_keys, resolved


def _check_labels(model: nn.Module, section: dict[str, Any], directory: Path) -> None:
    """A classification adapter fits only a base whose head has as many classes as the one it trained."""
    saved = section.get("num_labels")
    have = getattr(getattr(model, "config", None), "num_labels", None)
    if saved is None or have is None or _task_type(model) not in ("SEQ_CLS", "TOKEN_CLS") or int(saved) == int(have):
        return
    names = [name for _, name in sorted((section.get("id2label") or {}).items(), key=lambda kv: int(kv[0]))]
    raise CheckpointError(
        f"{directory / CONFIG_NAME}: the adapter was trained with num_labels={saved}"
        f"{f' (classes {names})' if names else ''}, but this {type(model).__name__} has num_labels={have}; build "
        f"the base with from_pretrained(..., num_labels={saved}, id2label=..., label2id=...) (peftkit merge and "
        "export do this from the adapter's config)"
    )


def _apply_class_names(model: nn.Module, section: dict[str, Any]) -> None:
    """Give the model the adapter's class names when it has transformers' placeholders (LABEL_0, ...)."""
    config = getattr(model, "config", None)
    id2label = section.get("id2label")
    if not id2label or config is None or _task_type(model) not in ("SEQ_CLS", "TOKEN_CLS"):
        return
    current = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    if all(v == f"LABEL_{k}" for k, v in current.items()):
        config.id2label = {int(k): v for k, v in id2label.items()}
        config.label2id = {k: int(v) for k, v in (section.get("label2id") or {v: int(k) for k, v in id2label.items()}).items()}


def model_labels(directory: str | os.PathLike) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments (num_labels, id2label, label2id, and ignore_mismatched_sizes when the
    adapter saves its own head) that give a base model the head shape and class names the adapter in
    ``directory`` was trained with; {} when it records none."""
    data = read_config(directory)
    section = read_metadata(directory, data)
    if not isinstance(section, dict) or not section.get("num_labels"):
        return {}
    out: dict[str, Any] = {"num_labels": int(section["num_labels"])}
    if data.get("modules_to_save"):
        # The adapter brings its head: a base whose saved head has another class count gets a placeholder.
        out["ignore_mismatched_sizes"] = True
    if section.get("id2label"):
        out["id2label"] = {int(k): v for k, v in section["id2label"].items()}
        out["label2id"] = {k: int(v) for k, v in (section.get("label2id") or {}).items()} or {
            v: int(k) for k, v in section["id2label"].items()}
    return out


def _expected_shapes(model: nn.Module, layer_cls: type, config: AdapterConfig, names: list[str],
                     adapter_name: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """Module -> {suffix: shape} of the tensors ``config`` gives each module, built on the meta device.

    A base the meta copy cannot stand in for is left out: the same shapes are checked again after inject."""
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        module = modules.get(name, modules.get(name.replace("base_layer.", "")))
        if module is None:
            continue
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        r, alpha = config.rank_alpha(name)
        probe = probe_adapter(layer_cls, base, name, adapter_name, r, alpha, config)
        if probe is None:
            continue
        try:
            with torch.device("meta"):
                out[name] = {k: tuple(v.shape) for k, v in probe.saved_tensors(adapter_name).items()}
        except Exception:  # noqa: BLE001 - checked again after inject
            continue
    return out


def _raise_on_mismatch(directory: Path, per_module: dict[str, dict[str, torch.Tensor]],
                       expected: dict[str, dict[str, tuple[int, ...]]]) -> None:
    mismatches = []
    for name, want in expected.items():
        got = per_module[name]
        if set(got) != set(want):
            mismatches.append(f"{name}: keys {sorted(got)} != expected {sorted(want)}")
            continue
        for key, shape in want.items():
            if tuple(got[key].shape) != tuple(shape):
                mismatches.append(f"{name}.{key}: saved {tuple(got[key].shape)}, model needs {tuple(shape)}")
    if mismatches:
        raise CheckpointError(
            f"{directory}: the adapter's shapes do not fit this model ({len(mismatches)} mismatches): "
            + "; ".join(mismatches[:6]) + (" ..." if len(mismatches) > 6 else "")
            + ". Load it into the base model it was trained on."
        )


def _warn_unmatched_patterns(config: AdapterConfig, names: list[str]) -> None:
    for field_name in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field_name):
            if not any(pattern_suffix_match(key, n, field_name, CheckpointError) for n in names):
                warnings.warn(f"{field_name}: key '{key}' of the loaded checkpoint matches no adapted module; ignored")


def _strip_patterns(config: AdapterConfig, names: list[str]) -> AdapterConfig:
    import copy

    out = copy.deepcopy(config)
    for field_name in ("rank_pattern", "alpha_pattern"):
        pattern = getattr(out, field_name)
        setattr(out, field_name, {k: v for k, v in pattern.items()
                                  if any(pattern_suffix_match(k, n, field_name, CheckpointError) for n in names)})
    if getattr(config, "_allow_large_rank", False):
        object.__setattr__(out, "_allow_large_rank", True)
    return out


def describe(directory: str | os.PathLike) -> dict[str, Any]:
    """Verify an adapter folder and summarise it (method, ranks, targets, size, base model)."""
    directory = _resolve(directory)
    folder = read_adapter(directory)
    data, tensors, section = folder.config, folder.tensors, folder.metadata or {}
    expected = section.get("weights_sha256")
    ranks = {}
    for key, tensor in tensors.items():
        if key.endswith("lora_A.weight"):
            ranks[key[len(PREFIX):-len(".lora_A.weight")]] = int(tensor.shape[0])
    return {
        "method": section.get("method", data.get("peft_type", "?").lower()),
        "peft_type": data.get("peft_type"),
        "r": data.get("r"),
        "alpha": data.get("lora_alpha"),
        "targets": data.get("target_modules"),
        "ranks": ranks,
        "tensors": len(tensors),
        "parameters": int(sum(t.numel() for t in tensors.values())),
        "bytes": (directory / WEIGHTS_NAME).stat().st_size,
        "base_model": data.get("base_model_name_or_path"),
        # True: the weights file is the one saved with this config; False: no sha256 was recorded (PEFT's own
        # adapters), so only its readability was checked.
        "sha256_verified": bool(expected),
    }


def export(model_or_dir: nn.Module | str | os.PathLike, directory: str | os.PathLike, to: str = "peft",
           base_model: nn.Module | None = None, *, format: str | None = None) -> Path:
    """Write the adapter for serving: ``to="peft"`` PEFT's own format of the architecture (LoRA, HRA) or an exact
    PEFT LoRA where PEFT has none; ``to="lora"`` a plain PEFT LoRA for every architecture (each declares its
    low-rank form, ``export_lora``); ``to="gguf"`` a llama.cpp LoRA adapter (``directory/adapter.gguf``, see
    :mod:`peftkit.gguf`). ``format`` is the former name of ``to``."""
    if format is not None:
        to = format
    if to not in EXPORT_TARGETS:
        raise ConfigError(f"to: expected one of {list(EXPORT_TARGETS)}, got {to!r}")
    check_output_dir(directory, "directory")
    if to == "gguf":
        from .gguf import export_gguf

        return export_gguf(model_or_dir, directory, base_model=base_model)
    if isinstance(model_or_dir, nn.Module):
        return save(model_or_dir, directory, adapter_names=["default"], export=to)[0]
    source = _resolve(model_or_dir)
    if Path(directory).resolve() == source.resolve():
        raise ConfigError(f"export: the output folder {directory} is the adapter's own folder; exporting there would "
                          "replace the adapter it reads. Choose another folder")
    folder = read_adapter(source)
    data, arch = folder.config, folder.architecture
    saved_type = data.get("peft_type")
    try:
        arch_type = getattr(registry.get_component("architecture", arch).obj, "peft_type", None)
    except ConfigError:
        arch_type = None
    # The saved files are already the export when they are the architecture's PEFT format and that format is
    # the one asked for (any PEFT format for "peft", LoRA only for "lora").
    if arch_type is not None and arch_type == saved_type and (to == "peft" or saved_type == "LORA"):
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        # The export is a plain PEFT adapter: PEFT's fields only (an old file's peftkit key is dropped).
        config = {k: v for k, v in data.items() if k != "peftkit"}
        weights, config_bytes = (source / WEIGHTS_NAME).read_bytes(), json_bytes(config)
        metadata = folder.metadata
        atomic_write_bytes(target / WEIGHTS_NAME, weights)
        if metadata is not None:  # the sidecar follows the files it describes (a stale one would refuse to load)
            metadata = {**metadata, "weights_sha256": hashlib.sha256(weights).hexdigest(),
                        "config_sha256": hashlib.sha256(config_bytes).hexdigest()}
            atomic_write_bytes(target / METADATA_NAME, json_bytes(metadata))
        elif (target / METADATA_NAME).is_file():
            (target / METADATA_NAME).unlink()  # an earlier peftkit save's sidecar: it describes other files
        atomic_write_bytes(target / CONFIG_NAME, config_bytes)
        return target
    if base_model is None:
        raise ConfigError(
            f"export: the '{arch}' adapter in {source} needs its base model's weights to become a LoRA; pass "
            "base_model=<the base model> (CLI: --base MODEL)"
        )
    flags = parameter_flags(base_model)
    load(base_model, source)
    try:
        return save(base_model, directory, adapter_names=["default"], export=to)[0]
    finally:
        remove(base_model, merge=False)
        restore_parameter_flags(flags)  # the caller's model comes back as it was
