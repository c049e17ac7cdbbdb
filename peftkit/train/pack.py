"""The pack stage: tokenized examples over ``data.max_length`` counted and handled (``data.overlong``), text cut
into blocks, chat rows packed; and the checks that the examples fit the model.

With ``packing`` text documents are joined (EOS between them) and cut into blocks of exactly ``max_length``
tokens, so no token is padding; whole conversations are packed into rows of at most ``max_length`` tokens, each
with its own position ids, so attention (transformers' packed-sequence masks) and the loss see them apart.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..errors import ConfigError
from .examples import IGNORE_INDEX, MAP_BATCH, Tokenized, hash_parts, is_eval_key
from .recipe import DataSection


def packs(data: DataSection) -> bool:
    """Whether data.train is packed: ``data.packing`` true, or null (the default) for the text format."""
    return data.packing is True or (data.packing is None and data.format == "text")


def finish(table, data: DataSection, *, key: str = "data.train", pack: bool = False, batch_size: int | None = None,
           label_names: list[str] | None = None) -> Tokenized:
    """``encode``'s table (a ``datasets.Dataset``, or a dict of column lists) as Tokenized: overlong examples
    counted and handled, chat rows packed if asked."""
    listed = isinstance(table, dict)
    if data.format == "text":
        return _finish_text(table, data, pack)
    if data.format == "classification":
        names = table if listed else table.column_names
        return Tokenized(table["input_ids"], table["labels"],
                         table["token_type_ids"] if "token_type_ids" in names else None, label_names)
    table = _apply_overlong(table, data, key)
    if data.format == "preference":
        return Tokenized(table["input_ids"], table["labels"], rejected_ids=table["rejected_ids"],
                         rejected_labels=table["rejected_labels"])
    if not pack:
        return Tokenized(table["input_ids"], table["labels"], prompt_lengths=table["prompt_length"],
                         references=table["reference"])
    lengths = _lengths(table)
    if listed:
        packed = _map_columns(table, _pack_function(data.max_length))
    else:
        packed = table.map(_pack_function(data.max_length), batched=True, batch_size=MAP_BATCH,
                           remove_columns=table.column_names, num_proc=data.num_proc,
                           new_fingerprint=hash_parts(table._fingerprint, "pack", data.max_length),
                           desc=f"packing {key}")
    rows = _lengths(packed)
    stats = packing_report(lengths, rows, data.max_length, batch_size or 1)
    return Tokenized(packed["input_ids"], packed["labels"], position_ids=packed["position_ids"], stats=stats)


def _map_columns(table: dict[str, list], function) -> dict[str, list]:
    """A batched map (batches of MAP_BATCH rows) over a dict of column lists, as ``Dataset.map`` runs it."""
    out: dict[str, list] = {}
    for start in range(0, len(table["input_ids"]), MAP_BATCH):
        for name, values in function({name: column[start:start + MAP_BATCH] for name, column in table.items()}).items():
            out.setdefault(name, []).extend(values)
    return out


def _lengths(table) -> list[int]:
    """Token counts of a table's rows, read from the Arrow offsets (no row is materialised)."""
    if isinstance(table, dict):
        return [len(ids) for ids in table["input_ids"]]
    import pyarrow.compute as pc

    lengths = pc.list_value_length(table.data.column("input_ids"))
    if table._indices is not None:  # a filtered table (dropped examples) keeps every row, with an index mapping
        lengths = lengths.take(table._indices.column(0))
    return lengths.to_pylist()


def packing_report(lengths: list[int], rows: list[int], max_length: int, batch_size: int) -> dict[str, Any]:
    """Padded positions with and without packing, with batches of ``batch_size`` padded to their longest
    member taken in order (an estimate of what random batches pad: the same distribution of lengths)."""

    def padding(sizes: list[int]) -> int:
        return sum(len(chunk) * max(chunk) - sum(chunk)
                   for chunk in (sizes[i:i + batch_size] for i in range(0, len(sizes), batch_size)))

    before, after = padding(lengths), padding(rows)
    return {"examples": len(lengths), "rows": len(rows), "tokens": sum(lengths), "padding_unpacked": before,
            "padding_packed": after, "padding_saved": 1.0 - after / before if before else 0.0}

def _finish_text(table, data: DataSection, pack: bool) -> Tokenized:
    import numpy as np

    n = data.max_length
    listed = isinstance(table, dict)
    if not pack:
        if listed:
            ids = [x[:n] for x in table.get("input_ids", [])]
            return Tokenized(ids, ids)
        ids = table.map(lambda b: {"input_ids": [x[:n] for x in b["input_ids"]]}, batched=True,
                        new_fingerprint=hash_parts(table._fingerprint, "cut", n))
        return Tokenized(ids["input_ids"], ids["input_ids"])
    # Joined documents cut into blocks, without Python lists: the flattened column as one int array.
    if listed:
        documents = table.get("input_ids", [])
        stream = np.fromiter((t for ids in documents for t in ids), dtype=np.int64, count=sum(map(len, documents)))
    else:
        column = table.data.column("input_ids").combine_chunks()
        stream = np.asarray(column.flatten()) if len(column) else np.zeros(0, dtype=np.int64)
    blocks = len(stream) // n
    if not blocks:
        raise ConfigError(f"data.max_length: the text has only {len(stream)} tokens, fewer than one block of "
                          f"{n}; lower data.max_length or add text")
    if listed:
        ids = stream[: blocks * n].reshape(blocks, n).tolist()
        return Tokenized(ids, ids)
    import datasets
    import pyarrow as pa

    flat = pa.array(stream[: blocks * n].astype(np.int64))
    ids = pa.FixedSizeListArray.from_arrays(flat, n).cast(pa.list_(pa.int64()))
    packed = datasets.Dataset(pa.table({"input_ids": ids}))
    return Tokenized(packed["input_ids"], packed["input_ids"])


def _apply_overlong(table, data: DataSection, key: str):
    """Count the overlong examples, warn with the numbers, remove the emptied ones."""
    listed = isinstance(table, dict)
    lengths = table["length"] if listed else table.data.column("length").to_pylist()
    overlong = [x for x in lengths if x > data.max_length]
    if not overlong:
        return table
    if listed:
        rows = [i for i, ids in enumerate(table["input_ids"]) if len(ids) > 0]
        kept = {name: [column[i] for i in rows] for name, column in table.items()}
        total, left = len(lengths), len(rows)
    else:
        kept = table.filter(lambda ids: len(ids) > 0, input_columns="input_ids",
                            new_fingerprint=hash_parts(table._fingerprint, "kept"))
        total, left = len(table), len(kept)
    dropped = total - left
    if not left:
        raise ConfigError(f"{key}: all {total} examples are longer than data.max_length={data.max_length} "
                          f"tokens (longest {max(overlong)}) and none is left to train on; raise data.max_length")
    mode = "truncate_left" if data.overlong == "drop" and is_eval_key(key) else data.overlong
    action = {"drop": "dropped them",
              "truncate_left": "cut them from the left (the answer's end stays)"}[mode]
    if mode != data.overlong:
        action += " (evaluation rows are never dropped: metrics cover every row)"
    lost = f"; {dropped} lost every labelled token and were dropped" if mode != "drop" and dropped else ""
    warnings.warn(f"{key}: {len(overlong)} of {total} examples are longer than data.max_length="
                  f"{data.max_length} tokens (longest {max(overlong)}); data.overlong={data.overlong} {action}{lost}. "
                  "Raise data.max_length, or set data.overlong (drop, truncate_left, error)", stacklevel=2)
    return kept


def _pack_function(max_length: int):
    """Next-fit packing of whole conversations into rows of at most max_length tokens. Each conversation's
    positions restart at 0, and its first label is ignored: unpacked, no token predicts it either."""

    def function(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for example_ids, example_labels in zip(batch["input_ids"], batch["labels"]):
            if ids and len(ids) + len(example_ids) > max_length:
                out["input_ids"].append(ids)
                out["labels"].append(labels)
                out["position_ids"].append(positions)
                ids, labels, positions = [], [], []
            ids = ids + list(example_ids)
            labels = labels + [IGNORE_INDEX] + list(example_labels[1:])
            positions = positions + list(range(len(example_ids)))
        if ids:
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["position_ids"].append(positions)
        return out

    return function


def check_packed_attention(model, max_positions: int = 8) -> bool:
    """Whether ``model`` keeps packed documents apart: the logits of two short documents packed into one
    row with restarting position ids equal those of each document alone (transformers builds a block mask
    from the position ids when no attention mask is given, for the models on its shared masking code)."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab, (1, n), generator=generator) for n in (max_positions // 2, max_positions))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(second.to(device), use_cache=False).logits
            positions = torch.cat([torch.arange(first.shape[1]), torch.arange(second.shape[1])])[None].to(device)
            packed = model(torch.cat([first, second], 1).to(device), position_ids=positions, use_cache=False).logits
    finally:
        model.train(was_training)
    return torch.allclose(packed[:, first.shape[1]:].float(), alone.float(), atol=1e-3, rtol=1e-3)


def check_lengths(examples: Any, model_config: Any, data: DataSection) -> None:
    """The longest tokenized example must fit the model's positions (``max_position_embeddings`` or
    ``n_positions``), so a run fails before step 1 instead of mid-training."""
    positions = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if not isinstance(positions, int):
        return
    for split_key, split in (("data.train", examples.train), ("data.eval", examples.eval)):
        if split is None or not len(split):
            continue
        longest = max(len(ids) for ids in split.input_ids)
        if longest > positions:
            raise ConfigError(
                f"data.max_length: {split_key} has examples of {longest} tokens, more than the model's {positions} "
                f"positions (max_position_embeddings); set data.max_length to at most {positions}"
            )
