"""Atomic, durable file IO: every file peftkit writes (adapters, training checkpoints, metrics, GGUF files) goes
through here, so a crash leaves the previous file or the new one, never a torn one; and the safetensors header
check that runs before a tensor file is read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .validation import json_loads


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


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> str:
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


def check_safetensors_header(path: Path) -> None:
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


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
