"""GGUF files as base models: a reference to a ``.gguf`` file (``<folder>/<name>.gguf``) and the plain model
folder rebuilt from it once and cached. Below :mod:`peftkit.resolve` (which resolves such references) and
:mod:`peftkit.gguf` (adapters out to llama.cpp), so neither needs the other to read a GGUF base.

``plain_model_folder(source, gguf_file)`` loads a GGUF file through transformers' GGUF support (it dequantizes
the weights) once, rebuilds it as a plain model (the loaded one keeps a ``quantization_config`` of ``gguf``, which
blocks ``save_pretrained`` and adapter libraries) and caches that folder with the tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from .errors import ConfigError

GGUF_SUFFIX = ".gguf"


def cache_root() -> Path:
    """Where rebuilt GGUF bases are cached: ``$PEFTKIT_CACHE`` or ``~/.cache/peftkit``."""
    return Path(os.environ.get("PEFTKIT_CACHE") or Path.home() / ".cache" / "peftkit")


def plain_model_folder(source: str | os.PathLike, gguf_file: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A plain fp32 model folder (config, safetensors, tokenizer) rebuilt from ``source/gguf_file`` through
    transformers' GGUF loading, once: later calls return the cached folder (keyed by the file's path, size and
    modification time, so a changed file is rebuilt)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    file = Path(source) / gguf_file
    if not file.is_file():
        raise ConfigError(f"model.gguf_file: {file} is not a file; give the name of a .gguf file inside model.name")
    stat = file.stat()
    key = hashlib.sha256(f"{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = Path(cache_dir or cache_root() / "gguf") / f"{Path(gguf_file).stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=gguf_file)
                loaded = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=gguf_file, dtype=torch.float32)
            except Exception as exc:
                raise ConfigError(f"model.gguf_file: transformers could not load {file} ({str(exc).splitlines()[0]}); "
                                  "it reads the GGUF architectures listed in its GGUF docs") from None
        fields = loaded.config.to_dict()
        fields.pop("quantization_config", None)
        plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields))
        plain.load_state_dict(loaded.state_dict(), strict=False)
        plain.tie_weights()
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, folder)  # appears whole or not at all
        except OSError:
            if not (folder / "config.json").is_file():  # not another process that rebuilt it first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def split_reference(ref: str) -> tuple[str, str] | None:
    """``(folder reference, file name)`` for a reference to a .gguf file (``pkg:mod/file.gguf``, a path); else None."""
    if not str(ref).endswith(GGUF_SUFFIX):
        return None
    head, _, tail = str(ref).rpartition("/")
    return (head or ".", tail)
