"""A training run's tokenizer once its data is tokenized: saved once, freed, and loaded again only for the few
moments something needs the whole of it.

After the data pipeline a run needs little of its tokenizer: the pad id (collate, the model config), its files
beside every adapter it writes (``best/``, the final ``adapter/``), and, for generation-based evaluation, the
real object (decode, chat template, stop strings). Keeping the object costs memory for the whole run: Gemma-3's
(262,144 tokens, 514,906 merges) holds about 300 MiB resident, Python copies of its vocabulary and merges plus the
Rust tokenizer. A :class:`ParkedTokenizer` holds instead the folder ``save_pretrained`` wrote once into a private
temporary folder, copies its files wherever a save asks (the same bytes ``save_pretrained`` writes), and loads the
tokenizer from it, with the class it had, for a ``with live(tokenizer)`` block.

Every process parks its own (generation-based evaluation runs on every process; saves happen where they did).
The temporary folder is removed by :meth:`ParkedTokenizer.close`, when the holder is garbage collected, or at
interpreter exit, whichever comes first (an error between them included).
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STAGING_PREFIX = "peftkit-tokenizer-"


class ParkedTokenizer:
    """Stands in for a tokenizer where a run needs only ``pad_token_id`` and ``save_pretrained``; the caller must
    drop its own references to the tokenizer for the memory to be freed."""

    def __init__(self, tokenizer: Any) -> None:
        self.kind = type(tokenizer)
        self.pad_token_id: int | None = tokenizer.pad_token_id
        self.pad_token: str | None = tokenizer.pad_token
        self.eos_token_id: int | None = tokenizer.eos_token_id
        self.chat_template = getattr(tokenizer, "chat_template", None)
        self._staging = tempfile.TemporaryDirectory(prefix=STAGING_PREFIX)
        try:
            tokenizer.save_pretrained(self._staging.name)
        except BaseException:
            self._staging.cleanup()
            raise

    @property
    def staging(self) -> Path:
        """The private folder the tokenizer was saved to (removed by :meth:`close`)."""
        return Path(self._staging.name)

    def save_pretrained(self, directory: str | Path) -> tuple[str, ...]:
        """Copy the saved files into ``directory`` (created if missing; files of the same name are replaced, as
        ``save_pretrained`` replaces them); returns their paths, as ``save_pretrained`` does."""
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        written = []
        for item in sorted(self.staging.iterdir()):
            if item.is_dir():
                shutil.copytree(item, target / item.name, dirs_exist_ok=True)
            else:
                shutil.copyfile(item, target / item.name)
            written.append(str(target / item.name))
        return tuple(written)

    @contextmanager
    def loaded(self) -> Iterator[Any]:
        """The tokenizer, loaded from the saved folder with its own class, for the ``with`` block; freed after it."""
        tokenizer = self.kind.from_pretrained(str(self.staging))
        try:
            yield tokenizer
        finally:
            del tokenizer
            gc.collect()  # a tokenizer's Python objects may sit in reference cycles; this frees them now

    def close(self) -> None:
        """Remove the saved folder (the holder cannot save or load afterwards)."""
        self._staging.cleanup()


@contextmanager
def live(tokenizer: Any) -> Iterator[Any]:
    """A real tokenizer for the ``with`` block: a parked one is loaded for it, any other is itself."""
    if isinstance(tokenizer, ParkedTokenizer):
        with tokenizer.loaded() as loaded:
            yield loaded
    else:
        yield tokenizer
