"""The last stage of the data pipeline: the batch plan (which examples each process reads at each micro-batch)
and collation into tensors (padded, padding-free, preference pairs), with the per-example counts the loss and
the length grouping read.

The batch order is a pure function of (seed, position), so a resumed run reads exactly the batches the
uninterrupted run would have read, and 2 processes at batch B read the same examples as 1 process at 2B.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from .examples import IGNORE_INDEX, Tokenized

GROUP_BATCHES = 50  # data.group_by_length sorts each run of this many global batches by length


class BatchPlan:
    """The examples each process reads at each micro-batch.

    Epoch e is a permutation of the examples drawn from a generator seeded with (seed, e); it is cut into
    global batches of ``batch_size · world_size`` examples (the incomplete tail is dropped) and process
    ``rank`` takes the ``rank``-th slice of ``batch_size``. ``position`` counts global micro-batches from 0.
    """

    def __init__(self, num_examples: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 lengths: np.ndarray | None = None) -> None:
        self.lengths = lengths  # data.group_by_length: per-example token counts (see _group_by_length)
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.batches_per_epoch = num_examples // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"training.batch_size: data.train has {num_examples} examples, fewer than one global batch "
                f"({batch_size} x {world_size} processes); lower training.batch_size or add data"
            )
        self._epoch = -1
        self._order: list[int] = []

    def _order_at(self, position: int) -> tuple[list[int], int]:
        epoch, k = divmod(position, self.batches_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(self.num_examples, generator=generator).tolist()
            if self.lengths is not None:
                self._order = self._group_by_length(self._order)
            self._epoch = epoch
        return self._order, k

    def _group_by_length(self, order: list[int]) -> list[int]:
        """The epoch's permutation cut into groups of ``GROUP_BATCHES`` global batches, each group sorted by
        length (longest first): the examples of a batch have similar lengths, so padded batches pad less. It
        changes which examples share a batch (not which examples an epoch reads), as transformers'
        ``group_by_length`` does; still a pure function of (seed, epoch)."""
        group = GROUP_BATCHES * self.batch_size * self.world_size
        lengths = self.lengths
        return [i for start in range(0, len(order), group)
                for i in sorted(order[start:start + group], key=lambda i: -int(lengths[i]))]

    def indices(self, position: int) -> list[int]:
        order, k = self._order_at(position)
        start = (k * self.world_size + self.rank) * self.batch_size
        return order[start:start + self.batch_size]

    def global_indices(self, position: int) -> list[int]:
        """Every process's examples at ``position``, in rank order (this process's are ``indices(position)``):
        known on every host, so the global batch's loss units need no collective."""
        order, k = self._order_at(position)
        start = k * self.world_size * self.batch_size
        return order[start:start + self.world_size * self.batch_size]

    def epoch(self, position: int) -> float:
        return position / self.batches_per_epoch


def collate(examples: Tokenized, indices: list[int], pad_id: int, classification: bool,
            padding_free: bool = False) -> dict[str, torch.Tensor]:
    """Pad the chosen examples to the longest one: input_ids, attention_mask, labels (-100 on padding).

    Packed rows get ``position_ids`` instead of an attention mask (transformers then keeps the packed
    conversations apart); the padding at a row's end is one more segment of its own, labelled -100.

    ``padding_free`` (causal LM, unpacked examples): the same examples, packed into as few rows as fit the
    longest of them (first-fit decreasing), with restarting ``position_ids`` instead of an attention mask and each
    example's first label -100 (nothing predicts it, as in its own padded row). The batch holds the same
    examples and the same targets, so its summed loss is the padded batch's, to round-off; its rows carry
    almost no padding, and no row is longer than the padded batch's (attention costs no more)."""
    if padding_free and not classification and examples.position_ids is None:
        return _collate_padding_free(examples, indices, pad_id)
    length = max(len(examples.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), length), dtype=torch.long)
    packed = examples.position_ids is not None
    batch: dict[str, torch.Tensor] = {"input_ids": ids}
    if packed:
        positions = torch.arange(length).repeat(len(indices), 1)
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = mask
    if examples.token_type_ids is not None:
        batch["token_type_ids"] = torch.zeros((len(indices), length), dtype=torch.long)
    labels = torch.full((len(indices), length), IGNORE_INDEX, dtype=torch.long) if not classification else None
    for row, i in enumerate(indices):
        n = len(examples.input_ids[i])
        ids[row, :n] = torch.tensor(examples.input_ids[i])
        mask[row, :n] = 1
        if packed:
            positions[row, :n] = torch.tensor(examples.position_ids[i])
            positions[row, n:] = torch.arange(length - n)
        if examples.token_type_ids is not None:
            batch["token_type_ids"][row, :n] = torch.tensor(examples.token_type_ids[i])
        if labels is not None:
            labels[row, :n] = torch.tensor(examples.labels[i])
    batch["labels"] = torch.tensor([examples.labels[i] for i in indices]) if classification else labels
    return batch


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the positions of ``lengths`` grouped into rows whose lengths sum to at most
    ``capacity`` (every length must be <= capacity). Deterministic: ties keep their order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for k in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        row = next((r for r, free in enumerate(room) if free >= lengths[k]), None)
        if row is None:
            rows.append([k])
            room.append(capacity - lengths[k])
        else:
            rows[row].append(k)
            room[row] -= lengths[k]
    return rows


def _collate_padding_free(examples: Tokenized, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    lengths = [len(examples.input_ids[i]) for i in indices]
    length = max(lengths)
    rows = pack_rows(lengths, length)
    width = max(sum(lengths[k] for k in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.arange(width).repeat(len(rows), 1)
    for r, row in enumerate(rows):
        start = 0
        for k in row:
            i, n = indices[k], lengths[k]
            ids[r, start:start + n] = torch.tensor(examples.input_ids[i])
            labels[r, start + 1:start + n] = torch.tensor(examples.labels[i][1:])
            positions[r, start:start + n] = torch.arange(n)
            start += n
        positions[r, start:] = torch.arange(width - start)  # the tail padding: a segment of its own
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def collate_pairs(examples: Tokenized, indices: list[int], pad_id: int, padding_free: bool = False
                  ) -> dict[str, torch.Tensor]:
    """A preference micro-batch: the chosen sides of ``indices`` then their rejected sides (2n sequences), with
    ``labels`` on each completion (-100 elsewhere), as ``peftkit.preference.pair_losses`` reads them.

    Padded: one sequence per row, right-padded, with ``attention_mask``. ``padding_free``: the 2n sequences packed
    into as few rows as fit the longest of them (first-fit decreasing, as ``collate``), with restarting
    ``position_ids``, no attention mask, each sequence's first label -100 (nothing of its own predicts it) and
    ``sequence_ids`` (the sequence of each token, -1 on the tail padding): the same sequences and targets, so
    the same per-sequence log-probabilities to round-off."""
    sequences = ([examples.input_ids[i] for i in indices] + [examples.rejected_ids[i] for i in indices])
    targets = ([examples.labels[i] for i in indices] + [examples.rejected_labels[i] for i in indices])
    lengths = [len(ids) for ids in sequences]
    if not padding_free:
        width = max(lengths)
        ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
        for row, (seq, target) in enumerate(zip(sequences, targets)):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
            labels[row, 1:len(seq)] = torch.tensor(list(target)[1:], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    rows = pack_rows(lengths, max(lengths))
    width = max(sum(lengths[k] for k in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.arange(width).repeat(len(rows), 1)
    owner = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for k in row:
            n = lengths[k]
            ids[r, start:start + n] = torch.tensor(sequences[k])
            labels[r, start + 1:start + n] = torch.tensor(list(targets[k])[1:], dtype=torch.long)
            positions[r, start:start + n] = torch.arange(n)
            owner[r, start:start + n] = k
            start += n
        positions[r, start:] = torch.arange(width - start)  # the tail padding: a segment of its own
    return {"input_ids": ids, "position_ids": positions, "labels": labels, "sequence_ids": owner}


def _list_chunks(column, rows: int = 1 << 16):
    """An Arrow-backed ``datasets`` column as pyarrow list arrays of at most ``rows`` rows each, in row order
    (through a filter's or select's indices mapping): bounded memory on data sets of any size."""
    table = column.source.with_format("arrow")
    for start in range(0, len(table), rows):
        yield from table[start:start + rows][column.column_name].chunks


def _offsets(chunk) -> np.ndarray:
    return chunk.offsets.to_numpy().astype(np.int64)  # absolute positions in chunk.values


def loss_units(examples: Tokenized, classification: bool, pairs: bool = False) -> np.ndarray:
    """Per example, the units the model's loss averages over (``peftkit.loss``): 1 for classification, else its
    target tokens, ``labels[1:] != -100`` (the causal shift: a row's first label is predicted by nothing; packed
    rows label no conversation's first token either). Read once, vectorised over the Arrow column. ``pairs``: a
    pair objective (DPO, SimPO), whose loss is a mean over preference pairs: 1 per example."""
    if classification or pairs:
        return np.ones(len(examples), dtype=np.int64)
    column = examples.labels
    if getattr(column, "source", None) is None:
        return np.array([sum(1 for y in list(labels)[1:] if y != IGNORE_INDEX) for labels in column], dtype=np.int64)
    parts = []
    for chunk in _list_chunks(column):
        offsets = _offsets(chunk)
        labelled = chunk.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]] != IGNORE_INDEX
        offsets = offsets - offsets[0]
        before = np.concatenate([[0], np.cumsum(labelled, dtype=np.int64)])
        counts = before[offsets[1:]] - before[offsets[:-1]]
        nonempty = offsets[1:] > offsets[:-1]
        counts[nonempty] -= labelled[offsets[:-1][nonempty]]
        parts.append(counts)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def example_lengths(examples: Tokenized) -> np.ndarray:
    """Per example, its tokens (``len(input_ids)``; a preference pair's both sides), read once from the Arrow
    offsets (no row materialised)."""
    total = _column_lengths(examples.input_ids)
    if examples.rejected_ids is not None:
        total = total + _column_lengths(examples.rejected_ids)
    return total


def _column_lengths(column) -> np.ndarray:
    if getattr(column, "source", None) is None:
        return np.array([len(ids) for ids in column], dtype=np.int64)
    parts = [np.diff(_offsets(chunk)) for chunk in _list_chunks(column)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens in a batch: attended positions, or every position of packed rows (whose tail padding is
    small: less than one conversation per row)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()
