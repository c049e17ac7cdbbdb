"""Base-model provenance: the name a saved adapter records for its base (``base_model_name_or_path``), and the
plugin modules that registered its components, so a folder read on another machine names what to install.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch.nn as nn

from . import registry

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
