"""Adapter checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors``, in PEFT's format where the
architecture has one, with atomic writes and verified reads.

Keys are PEFT's: ``base_model.model.<module path>.<suffix>`` (e.g. ``…q_proj.lora_A.weight``), with the
adapter name stripped; the adapter ``default`` goes to ``dir/`` and any other to ``dir/<name>/``. The config
holds PEFT's fields only, so PEFT reads it without a warning; peftkit's own metadata (the full peftkit config,
the method that trained it, and the sha256 of the weights and config files, so files from different saves are
caught on load) is the sidecar ``peftkit.json`` beside it. Files written before the sidecar carry that section
under the config's ``peftkit`` key, which is still read.

This module saves, loads and exports; the schema it writes is :mod:`peftkit.peft_format`.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import registry
from .config import AdapterConfig, _name_matches, parameter_candidates
from .errors import CheckpointError, ConfigError
from .expert_layer import ExpertParameterLayer

# The folder's schema, file IO, provenance and labels live in their own modules (peftkit.peft_format, .fileio,
# .provenance, .labels); their names stay importable from here, where callers have always found them.
# isort: off
from .fileio import (atomic_save_tensors, atomic_write_bytes, atomic_write_json, dir_mode, file_mode,  # noqa: F401
                     fsync_dir, json_bytes, serialize_tensors, sha256_file, stage_bytes)
# isort: on
from .inject import (
    adapter_layers,
    drop_adapter,
    inject,
    parameter_flags,
    probe_adapter,
    remove,
    restore_parameter_flags,
    saved_modules,
    state_of,
)
from .labels import apply_class_names, check_labels, label_fields, model_labels, task_type  # noqa: F401
from .layer import AdapterLayer
from .peft_format import (  # noqa: F401
    CONFIG_NAME,
    METADATA_NAME,
    PREFIX,
    VERSION,
    WEIGHTS_NAME,
    AdapterFolder,
    PeftFields,
    PeftkitFields,
    peft_rewritten_targets,
    read_adapter,
    read_config,
    read_metadata,
    read_tensors,
    saved_patterns,
    target_list,
)
from .provenance import (  # noqa: F401
    BASE_REF_ATTR,
    PKG_PREFIX,
    base_reference,
    package_reference,
    plugin_modules,
    record_base_reference,
)
from .validation import check_output_dir, pattern_suffix_match

# ------------------------------------------------------------------------------------------ saving
EXPORT_TARGETS = ("peft", "lora", "gguf")


def adapter_state(model: nn.Module, adapter_name: str, *,
                  export: bool | str = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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
    exported_lora = False
    for name, layer in layers.items():
        if name in parameter_layers:
            for suffix, tensor in layer.saved_tensors(adapter_name).items():
                tensors[f"{PREFIX}{name}.{suffix}"] = tensor
            per_layer[layer.target_name] = layer.saved_rank_alpha(adapter_name)
            peft_types.add(getattr(layer, "peft_type", None) or "PEFTKIT")
            continue
        peft_type = getattr(layer, "peft_type", None)
        # A LoRA-format layer that is not a LoRA (DoRA) also declares export_lora: to="lora" writes that form.
        if export and (peft_type is None or (to_lora and (peft_type != "LORA" or hasattr(layer, "export_lora")))):
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
            exported_lora = True
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
    r, alpha, rank_pattern, alpha_pattern = saved_patterns(config, per_layer)
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
        if peft_type == "LORA":  # a LoRA-format architecture (lora; dora with use_dora), no init options
            saved_config["architecture"] = "lora" if exported_lora else next(iter(layers.values())).architecture_name
            saved_config["options"] = {}
    module_layers = sorted(n for n in layers if n not in parameter_layers)
    target_parameters = sorted(l.target_name for l in parameter_layers.values()) or None
    rewritten = peft_rewritten_targets(model, module_layers) if peft_type == "LORA" else []
    if rewritten:
        warnings.warn(
            f"{adapter_name}: PEFT 0.21 reads {rewritten[0]} ({len(rewritten)} such layers) as a transformers-v4 "
            "expert "
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
        "target_modules": target_list(module_layers, all_names),
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
        "task_type": task_type(model),
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
    if extra is not None and not exported_lora:  # the fields PEFT needs beyond LoRA's (HRA's; DoRA's use_dora)
        peft.update(extra(adapter_name, config))
    return tensors, peft


def save(model: nn.Module, directory: str | os.PathLike, adapter_names: list[str] | None = None,
         *, export: bool | str = False) -> list[Path]:
    """Save adapters (all by default): ``default`` into ``directory``, others into ``directory/<name>``."""
    state = state_of(model)
    names = adapter_names or list(state.configs)
    if Path(directory).exists() and not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: exists and is not a folder; save the adapter into a folder (new or "
                              "existing)")
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



def _resolve(directory: str | os.PathLike, what: str = "adapter", **hub: Any) -> Path:
    """A folder, or a Hub id resolved to its local snapshot (offline: the cache); ``hub``: revision, token,
    local_files_only (``peftkit.resolve.resolve_folder``)."""
    from .resolve import resolve_folder

    return resolve_folder(directory, what, **hub)


def _config_from_peft(data: dict[str, Any], module_names: list[str],
                      section: dict[str, Any] | None = None) -> AdapterConfig:
    if section is None:
        section = data.get("peftkit")
    if isinstance(section, dict) and isinstance(section.get("config"), dict):
        for key, module in (section.get("plugins") or {}).items():
            axis, _, name = str(key).partition(":")
            registry.note_plugin(axis, name, str(module))
        config = AdapterConfig.from_dict(section["config"])
    else:
        arch = registry.architecture_for_peft_type(data.get("peft_type"), data)
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
    check_labels(model, section or {}, directory)
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
    apply_class_names(model, section or {})
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
    low-rank form, ``export_lora``). ``to="gguf"`` (a llama.cpp LoRA adapter) is :func:`peftkit.gguf.export_gguf`,
    reached through ``peftkit.export``. ``format`` is the former name of ``to``."""
    if format is not None:
        to = format
    if to not in EXPORT_TARGETS:
        raise ConfigError(f"to: expected one of {list(EXPORT_TARGETS)}, got {to!r}")
    if to == "gguf":  # peftkit.export writes it (peftkit.gguf, which builds on this module)
        raise ConfigError("to: 'gguf' is a file, not an adapter folder: write it with peftkit.export(..., to='gguf')")
    check_output_dir(directory, "directory")
    if isinstance(model_or_dir, nn.Module):
        return save(model_or_dir, directory, adapter_names=["default"], export=to)[0]
    source = _resolve(model_or_dir)
    if Path(directory).resolve() == source.resolve():
        raise ConfigError(f"export: the output folder {directory} is the adapter's own folder; exporting there would "
                          "replace the adapter it reads. Choose another folder")
    folder = read_adapter(source)
    data, arch = folder.config, folder.architecture
    saved_type = data.get("peft_type")
    arch_cls = getattr(registry.components("architecture").get(arch), "obj", None)
    arch_type = getattr(arch_cls, "peft_type", None)
    # The saved files are already the export when they are the architecture's PEFT format and that format is the
    # one asked for (any PEFT format for "peft", LoRA only for "lora", not DoRA: its plain LoRA is export_lora).
    plain_lora = saved_type == "LORA" and not hasattr(arch_cls, "export_lora")
    if arch_type is not None and arch_type == saved_type and (to == "peft" or plain_lora):
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
