"""The contract between the data stages: tokenized examples (:class:`Tokenized`), the train/eval pair the
pipeline hands the loop (:class:`Examples`), and the few constants the stages share.

The stages (each one module, the rows pass through them once, in this order): :mod:`.rows` reads and checks
the rows, :mod:`.chat` renders conversations, :mod:`.tokenize` tokenizes by format, :mod:`.pack` handles
overlong examples and packs, :mod:`.batches` plans the batch order and collates. :func:`.build.load_examples`
calls them top to bottom.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from .chat import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "MAP_BATCH", "Examples", "Tokenized", "hash_parts", "is_eval_key"]

MAP_BATCH = 1000  # rows per datasets.map call: conversations are packed within one such batch


@dataclass
class Tokenized:
    """Tokenized examples: ``input_ids`` (int lists), ``labels`` (int lists for LM, ints for classification),
    for classification the class names (index = label id). Each column is a Python list or an Arrow-backed
    ``datasets`` column (indexing reads one row). Packed chat rows add ``position_ids`` (restarting at 0 for
    every conversation); unpacked chat rows add ``prompt_lengths`` (tokens before the last assistant answer)
    and ``references`` (that answer's text), which generation-based metrics use."""

    input_ids: Any
    labels: Any
    token_type_ids: Any = None
    label_names: list[str] | None = None
    position_ids: Any = None
    prompt_lengths: Any = None
    references: Any = None
    stats: dict[str, Any] = field(default_factory=dict)
    # preference pairs: input_ids / labels are the chosen side, these the rejected side (labels on the completion)
    rejected_ids: Any = None
    rejected_labels: Any = None

    def __len__(self) -> int:
        return len(self.input_ids)



@dataclass
class Examples:
    train: Tokenized
    eval: Tokenized | None


def is_eval_key(key: str) -> bool:
    return key.startswith("data.eval")


def hash_parts(*parts: Any) -> str:
    """A short hex digest of ``parts`` (each as text): the fingerprint of a datasets cache entry."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(str(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]
