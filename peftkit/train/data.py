"""Data for the training loop: read examples, tokenize them by format, plan the batch order, collate.

Formats (``data.format``):
- ``text``: causal LM on raw text; with ``packing`` the documents are joined (EOS between them) and cut into
  blocks of exactly ``max_length`` tokens, so no token is padding.
- ``instruction``, ``alpaca``, ``messages``, ``sharegpt``: conversations (see ``chat.py``) rendered with a chat
  template; the loss is on the assistant turns only (every one, or the last with ``data.assistant_turns``).
  Single-turn data on a tokenizer without a template is laid out as ``prompt\\n`` + ``response`` + EOS. With
  ``packing`` whole conversations are packed into rows of at most ``max_length`` tokens, each with its own
  position ids, so attention (transformers' packed-sequence masks) and the loss see them apart.
- ``classification``: a text, an optional text pair, and a label (an integer or a class name).
- ``preference``: a prompt and two completions, ``chosen`` and ``rejected`` (strings, or lists of turns rendered
  with the chat template); an example is the pair, each side labelled on its completion only (``collate_pairs``).

Tokenizing runs through ``datasets.Dataset.map`` (batched, ``data.num_proc`` workers); the result is an Arrow
table (memory-mapped from datasets' cache for files and hub sets, keyed by the tokenizer and the data
section), so no process holds the examples as Python lists.

The batch order is a pure function of (seed, position), so a resumed run reads exactly the batches the
uninterrupted run would have read, and 2 processes at batch B read the same examples as 1 process at 2B.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from . import chat
from .recipe import DataSection

LOCAL_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
GENERATED_PREFIX = "generated:"
IGNORE_INDEX = chat.IGNORE_INDEX
MAP_BATCH = 1000  # rows per datasets.map call: conversations are packed within one such batch
CACHE_VERSION = "peftkit-data-2"  # bump when tokenization changes, so old cache files are not reused


# ------------------------------------------------------------------------------------------ reading rows
def read_rows(spec: str, split: str, data: DataSection, key: str):
    """The examples of one dataset as a ``datasets.Dataset`` (memory-mapped for files and hub sets).
    ``key`` (``data.train``/``data.eval``/``data.mix``) names errors."""
    import datasets

    if spec.startswith(GENERATED_PREFIX):
        name = spec[len(GENERATED_PREFIX):]
        if name not in GENERATED:
            raise ConfigError(f"{key}: unknown generated dataset '{name}'; available: {', '.join(sorted(GENERATED))}")
        return datasets.Dataset.from_list(GENERATED[name](split))

    path = Path(spec)
    is_local = path.suffix.lower() in LOCAL_EXTENSIONS or path.exists() or spec.startswith((".", "/", "~"))
    datasets.disable_progress_bars()
    if is_local:
        path = path.expanduser()
        if not path.is_file():
            raise ConfigError(f"{key}: file not found: {path}; give a .json/.jsonl/.csv/.parquet/.txt file or a hub dataset id")
        builder = LOCAL_EXTENSIONS.get(path.suffix.lower())
        if builder is None:
            raise ConfigError(f"{key}: {path} has an unsupported extension; expected one of {sorted(LOCAL_EXTENSIONS)}")
        if builder != "parquet":
            check_utf8(path, key)
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as exc:
            raise ConfigError(f"{key}: could not read {path} as {builder} ({_first_line(exc)}); check the file") from None
    else:
        try:
            table = datasets.load_dataset(spec, data.subset, split=split)
        except Exception as exc:
            raise ConfigError(
                f"{key}: could not load the hub dataset '{spec}' (subset {data.subset!r}, split '{split}'): "
                f"{_first_line(exc)}. Check the id, data.subset and the split, or give a local file"
            ) from None
    return table


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def required_columns(data: DataSection) -> dict[str, str]:
    """Column -> the recipe key that names it, for the chosen format."""
    if data.format == "text":
        return {data.text_column: "data.text_column"}
    if data.format in chat.CHAT_FORMATS or data.format == "preference":
        return chat.required_columns(data)
    columns = {data.text_column: "data.text_column", data.label_column: "data.label_column"}
    if data.text_pair_column:
        columns[data.text_pair_column] = "data.text_pair_column"
    return columns


def check_columns(rows, data: DataSection, key: str, spec: str) -> None:
    """``rows``: a ``datasets.Dataset`` or a list of dicts."""
    if len(rows) == 0:
        raise ConfigError(f"{key}: {spec} has no examples")
    needed = required_columns(data)
    found = list(rows.column_names) if hasattr(rows, "column_names") else list(rows[0])
    missing = [c for c in needed if c not in found]
    if missing:
        raise ConfigError(
            f"{key}: {spec} lacks the column(s) {missing} that format '{data.format}' needs; expected columns "
            f"{list(needed)} (rename them with {', '.join(needed[c] for c in missing)}). Found: {found}"
        )


# ------------------------------------------------------------------------------------------ row validation
# Checks on the rows as read, before tokenizing: nothing is silently turned into the string "None", dropped,
# or given another label id than the one it has in data.train.
def check_utf8(path: Path, key: str) -> None:
    """A text data file (.json/.jsonl/.csv/.txt) must be UTF-8; else one ConfigError naming file and offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise ConfigError(
                    f"{key}: {path} is not UTF-8 text (byte {offset + exc.start}: {exc.reason}); peftkit reads data "
                    "files as UTF-8: convert it (e.g. iconv -f latin1 -t utf-8 IN > OUT) and point the recipe at it"
                ) from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not UTF-8 text (it ends inside a multi-byte character); convert it "
                          "to UTF-8") from None


def _label_kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return "integer"
    if isinstance(value, str):
        return "string"
    return None


MAX_VALUE_BYTES = 1 << 20  # one text value tokenized in one piece (the tokenizer's time grows with it)


def _longest_value(array) -> tuple[int, int | None]:
    """(bytes of the longest string inside an Arrow column, its row when the column is flat strings)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind):
        lengths = pc.binary_length(array)
        longest = pc.max(lengths).as_py() or 0
        row = pc.index(lengths, longest).as_py() if longest > MAX_VALUE_BYTES else None
        return longest, row
    chunks = array.chunks if isinstance(array, pa.ChunkedArray) else [array]
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _longest_value(pa.chunked_array([c.flatten() for c in chunks], type=kind.value_type))[0], None
    if pa.types.is_struct(kind):
        return max((_longest_value(pa.chunked_array([c.field(i) for c in chunks], type=kind.field(i).type))[0]
                    for i in range(kind.num_fields)), default=0), None
    return 0, None


def _check_text_sizes(rows, data: DataSection, key: str, spec: str) -> None:
    """No text value over MAX_VALUE_BYTES (a 50 MB line would tokenize for minutes), read from the Arrow
    columns without materialising a row."""
    if not hasattr(rows, "data"):
        return
    for column in required_columns(data):
        if column not in rows.column_names:
            continue
        longest, row = _longest_value(rows.data.column(column))
        if longest > MAX_VALUE_BYTES:
            where = f"row {row + 1}" if row is not None else "a row"
            raise ConfigError(f"{key}: {spec} {where} holds {longest:,} bytes of text in '{column}', more than the "
                              f"{MAX_VALUE_BYTES:,} peftkit tokenizes as one value; split it into several rows (text "
                              "rows are packed together anyway) or shorten it")


def check_rows(rows: list[dict[str, Any]], data: DataSection, key: str, spec: str,
               train_rows: list[dict[str, Any]] | None = None) -> None:
    """Every row has a value (not null, not missing) in each column the format reads, and classification
    labels are all integers (class ids) or all strings (class names), of the same kind as data.train's
    (``train_rows``, given for data.eval). One ConfigError naming the file, the first bad row and the column."""
    _check_text_sizes(rows, data, key, spec)
    for column, recipe_key in required_columns(data).items():
        bad = [i for i, row in enumerate(rows) if row.get(column) is None]
        if bad:
            raise ConfigError(
                f"{key}: {spec} row {bad[0] + 1} has no value (null or missing) in the column '{column}' "
                f"({recipe_key}), and {len(bad) - 1} more rows neither; fill them in or remove those rows"
            )
    if data.format == "text":
        empty = sum(1 for row in rows if row[data.text_column] == "")
        if empty and empty == len(rows):
            raise ConfigError(f"{key}: {spec}: all {len(rows)} rows have an empty '{data.text_column}'; there is "
                              "nothing to train on - point the recipe at the right file or column")
        if empty:
            warnings.warn(f"{key}: {spec}: skipping {empty} of {len(rows)} rows whose '{data.text_column}' is an "
                          "empty string", stacklevel=2)
    if data.format != "classification":
        return
    column = data.label_column
    kinds = {}
    for i, row in enumerate(rows):
        kind = _label_kind(row[column])
        if kind is None:
            raise ConfigError(f"{key}: {spec} row {i + 1}: label {row[column]!r} in '{column}' is neither an integer "
                              "class id nor a string class name; fix that row")
        kinds.setdefault(kind, i)
    if len(kinds) > 1:
        raise ConfigError(
            f"{key}: {spec} mixes integer and string labels in '{column}' (row {kinds['integer'] + 1}: "
            f"{rows[kinds['integer']][column]!r}, row {kinds['string'] + 1}: {rows[kinds['string']][column]!r}); "
            "use integer class ids everywhere or class names everywhere"
        )
    if train_rows:
        train_kind = _label_kind(train_rows[0][column])
        (kind,) = kinds
        if kind != train_kind:
            raise ConfigError(
                f"{key}: {spec} has {kind} labels but data.train has {train_kind} labels; eval labels must use the "
                "same kind (class ids or class names) as data.train so that each class keeps its id"
            )


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


# ------------------------------------------------------------------------------------------ tokenizing
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


def packs(data: DataSection) -> bool:
    """Whether data.train is packed: ``data.packing`` true, or null (the default) for the text format."""
    return data.packing is True or (data.packing is None and data.format == "text")


def tokenize(rows, tokenizer, data: DataSection, label_names: list[str] | None = None, *, key: str = "data.train",
             pack: bool | None = None, batch_size: int | None = None) -> Tokenized:
    """Tokenize ``rows`` (a ``datasets.Dataset`` or a list of dicts) by ``data.format``. ``pack`` (default:
    ``packs(data)``) packs chat data; ``batch_size`` only sizes the padding report of packing."""
    table = encode(rows, tokenizer, data, label_names, key=key)
    return finish(table, data, key=key, pack=packs(data) if pack is None else pack, batch_size=batch_size,
                  label_names=_label_names(rows, data, label_names) if data.format == "classification" else None)


def encode(rows, tokenizer, data: DataSection, label_names: list[str] | None = None, *, key: str = "data.train"):
    """The tokenized rows as a ``datasets.Dataset`` (columns by format, unpacked), through a batched,
    cached ``map``. Chat rows are checked here: a bad one is one ConfigError naming file, row and field."""
    import datasets

    datasets.disable_progress_bars()
    table = rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(list(rows))
    if data.format == "text":
        function = _text_function(tokenizer, data)
    elif data.format == "classification":
        function = _classification_function(tokenizer, data, _label_names(table, data, label_names), key)
    elif data.format == "preference":
        function = _preference_function(tokenizer, data, key)
    else:
        function = _chat_function(tokenizer, data, key)
    fingerprint = _fingerprint(table, tokenizer, data, key, label_names)
    return table.map(function, batched=True, batch_size=MAP_BATCH, with_indices=True, num_proc=data.num_proc,
                     remove_columns=table.column_names, new_fingerprint=fingerprint, desc=f"tokenizing {key}")


def finish(table, data: DataSection, *, key: str = "data.train", pack: bool = False, batch_size: int | None = None,
           label_names: list[str] | None = None) -> Tokenized:
    """``encode``'s table as Tokenized: overlong examples counted and handled, chat rows packed if asked."""
    if data.format == "text":
        return _finish_text(table, data, pack)
    if data.format == "classification":
        return Tokenized(table["input_ids"], table["labels"],
                         table["token_type_ids"] if "token_type_ids" in table.column_names else None, label_names)
    table = _apply_overlong(table, data, key)
    if data.format == "preference":
        return Tokenized(table["input_ids"], table["labels"], rejected_ids=table["rejected_ids"],
                         rejected_labels=table["rejected_labels"])
    if not pack:
        return Tokenized(table["input_ids"], table["labels"], prompt_lengths=table["prompt_length"],
                         references=table["reference"])
    lengths = _lengths(table)
    packed = table.map(_pack_function(data.max_length), batched=True, batch_size=MAP_BATCH,
                       remove_columns=table.column_names, num_proc=data.num_proc,
                       new_fingerprint=_hash(table._fingerprint, "pack", data.max_length), desc=f"packing {key}")
    rows = _lengths(packed)
    stats = packing_report(lengths, rows, data.max_length, batch_size or 1)
    return Tokenized(packed["input_ids"], packed["labels"], position_ids=packed["position_ids"], stats=stats)


def _lengths(table) -> list[int]:
    """Token counts of a table's rows, read from the Arrow offsets (no row is materialised)."""
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


def _label_names(rows, data: DataSection, label_names: list[str] | None) -> list[str] | None:
    if data.format != "classification":
        return None
    raw = rows[data.label_column] if hasattr(rows, "column_names") else [r[data.label_column] for r in rows]
    raw = list(raw)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
        return label_names
    if label_names is None:
        label_names = sorted({str(v) for v in raw})
    unknown = sorted({str(v) for v in raw} - set(label_names))
    if unknown:
        raise ConfigError(f"data.eval: labels {unknown[:5]} do not occur in data.train (classes {label_names})")
    return label_names


def tokenizer_hash(tokenizer) -> str:
    """What identifies a tokenizer's output: its vocabulary and rules, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        from datasets.fingerprint import Hasher

        body = Hasher.hash(tokenizer)
    extra = json.dumps([type(tokenizer).__name__, tokenizer.special_tokens_map, str(tokenizer.chat_template)],
                       sort_keys=True, default=str)
    return _hash(body, extra)


def _fingerprint(table, tokenizer, data: DataSection, key: str, label_names) -> str:
    settings = json.dumps(dataclasses.asdict(data), sort_keys=True, default=str)
    return _hash(CACHE_VERSION, table._fingerprint, tokenizer_hash(tokenizer), settings, key, str(label_names))


def _hash(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(str(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def _text_function(tokenizer, data: DataSection):
    column, eos = data.text_column, ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])

    def function(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        texts = [str(t) for t in batch[column] if t]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return {"input_ids": [ids + eos for ids in encoded]}

    return function


def _finish_text(table, data: DataSection, pack: bool) -> Tokenized:
    import datasets
    import numpy as np
    import pyarrow as pa

    n = data.max_length
    if not pack:
        ids = table.map(lambda b: {"input_ids": [x[:n] for x in b["input_ids"]]}, batched=True,
                        new_fingerprint=_hash(table._fingerprint, "cut", n))
        return Tokenized(ids["input_ids"], ids["input_ids"])
    # Joined documents cut into blocks, without Python lists: the flattened Arrow column as one int array.
    column = table.data.column("input_ids").combine_chunks()
    stream = np.asarray(column.flatten()) if len(column) else np.zeros(0, dtype=np.int64)
    blocks = len(stream) // n
    if not blocks:
        raise ConfigError(f"data.max_length: the text has only {len(stream)} tokens, fewer than one block of "
                          f"{n}; lower data.max_length or add text")
    flat = pa.array(stream[: blocks * n].astype(np.int64))
    ids = pa.FixedSizeListArray.from_arrays(flat, n).cast(pa.list_(pa.int64()))
    packed = datasets.Dataset(pa.table({"input_ids": ids}))
    return Tokenized(packed["input_ids"], packed["input_ids"])


def _classification_function(tokenizer, data: DataSection, label_names: list[str] | None, key: str):
    index = {name: i for i, name in enumerate(label_names)} if label_names else None

    def function(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        texts = [str(t) for t in batch[data.text_column]]
        pairs = [str(t) for t in batch[data.text_pair_column]] if data.text_pair_column else None
        encoded = tokenizer(texts, pairs, truncation=True, max_length=data.max_length)
        raw = batch[data.label_column]
        out = {"input_ids": encoded["input_ids"], "labels": [index[str(v)] for v in raw] if index else list(raw)}
        if "token_type_ids" in encoded:
            out["token_type_ids"] = encoded["token_type_ids"]
        return out

    return function


def _chat_function(tokenizer, data: DataSection, key: str):
    """The batched map function of the chat formats: rows -> input_ids, labels, prompt_length (tokens before
    the last answer), reference (its text) and length (tokens before any truncation)."""
    import numpy as np

    template = chat.resolve_template(tokenizer, data)
    last_only = data.assistant_turns == "last"
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    where = key

    def function(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        names = list(batch)
        out: dict[str, list] = {"input_ids": [], "labels": [], "prompt_length": [], "reference": [], "length": []}
        texts, spans, references = [], [], []
        for index, values in zip(indices, zip(*(batch[c] for c in names))):
            row = dict(zip(names, values))
            turns, tools = chat.conversation(row, data, where, index)
            if template is None:
                # Plain single-turn layout: the prompt with BOS and a newline, then the response and EOS.
                prompt = "\n\n".join(t["content"] for t in turns[:-1])
                prompt_ids = tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"]
                response_ids = tokenizer(turns[-1]["content"], add_special_tokens=False)["input_ids"] + eos
                _append(out, prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids,
                        len(prompt_ids), turns[-1]["content"])
                continue
            full, labelled, reference = chat.assistant_spans(template, tokenizer, turns, tools, where, index, last_only)
            texts.append(full)
            spans.append(labelled)
            references.append(reference)
        if texts:
            for ids, offsets, labelled, reference in zip(*_encode_with_offsets(tokenizer, texts), spans, references):
                starts = np.array([s for s, _ in offsets], dtype=np.int64)
                keep = np.zeros(len(ids), dtype=bool)
                for a, b in labelled:
                    keep |= (starts >= a) & (starts < b)
                labels = np.where(keep, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()
                prompt_length = int(np.searchsorted(starts, labelled[-1][0], side="left"))
                _append(out, list(ids), labels, prompt_length, reference)
        return _cut(out, data, where, indices)

    return function


def _preference_function(tokenizer, data: DataSection, key: str):
    """The batched map function of preference rows -> input_ids / labels (prompt + chosen), rejected_ids /
    rejected_labels (prompt + rejected), labelled on the completion only, and length (the longer side, before
    any truncation). With a chat template (the tokenizer's, ``data.chat_template``, or chatml for rows given as
    turns) the completion is what rendering prompt + completion adds to the prompt rendered with the generation
    prompt; without one, plain strings are laid out as ``prompt\n`` + completion + EOS (as instruction data)."""
    template = chat.resolve_template(tokenizer, data)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    where = key

    def side(prompt, completion, plain, index) -> tuple[list[int], list[int]]:
        if template is None and plain:
            prompt_ids = tokenizer("\n\n".join(t["content"] for t in prompt) + "\n",
                                   add_special_tokens=True)["input_ids"]
            answer = tokenizer("".join(t["content"] for t in completion), add_special_tokens=False)["input_ids"] + eos
            return prompt_ids + answer, [IGNORE_INDEX] * len(prompt_ids) + answer
        chosen_template = template or chat.BUILTIN_TEMPLATES[chat.FALLBACK_TEMPLATE]
        head = chat.render(chosen_template, tokenizer, prompt, None, where, index, generation_prompt=True)
        full = chat.render(chosen_template, tokenizer, prompt + completion, None, where, index)
        if not full.startswith(head):
            raise chat.row_error(where, index, "data.chat_template", "the template does not render the prompt as a "
                                 "prefix of prompt + completion, so the completion tokens cannot be isolated; use "
                                 "another template (data.chat_template)")
        (ids,), (offsets,) = _encode_with_offsets(tokenizer, [full])
        labels = [t if start >= len(head) else IGNORE_INDEX for t, (start, _) in zip(ids, offsets)]
        return list(ids), labels

    def function(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        names = list(batch)
        out: dict[str, list] = {"input_ids": [], "labels": [], "rejected_ids": [], "rejected_labels": [],
                                "length": []}
        for index, values in zip(indices, zip(*(batch[c] for c in names))):
            prompt, chosen, rejected, plain = chat.preference_turns(dict(zip(names, values)), data, where, index)
            sides = [side(prompt, chosen, plain, index), side(prompt, rejected, plain, index)]
            out["length"].append(max(len(ids) for ids, _ in sides))
            sides = [_cut_side(ids, labels, data, where, index) for ids, labels in sides]
            if any(not ids for ids, _ in sides):
                sides = [([], []), ([], [])]  # dropped (or nothing labelled left): the pair goes, and is counted
            (out_ids, out_labels), (rejected_ids, rejected_labels) = sides
            out["input_ids"].append(out_ids)
            out["labels"].append(out_labels)
            out["rejected_ids"].append(rejected_ids)
            out["rejected_labels"].append(rejected_labels)
        return out

    return function


def _cut_side(ids: list[int], labels: list[int], data: DataSection, where: str, index: int
              ) -> tuple[list[int], list[int]]:
    """One side of a preference pair over data.max_length, by ``data.overlong`` (as ``_cut``): error, drop
    (returned empty), or truncate_left (the prompt's start goes; emptied if no completion token is left)."""
    n = data.max_length
    if len(ids) <= n:
        return ids, labels
    mode = "truncate_left" if data.overlong == "drop" and is_eval_key(where) else data.overlong
    if mode == "error":
        raise chat.row_error(where, index, "data.max_length", f"the prompt and a completion have {len(ids)} tokens, "
                             f"more than data.max_length={n}; raise data.max_length, or set data.overlong to drop or "
                             "truncate_left")
    if mode == "drop":
        return [], []
    ids, labels = ids[len(ids) - n:], labels[len(ids) - n:]
    return (ids, labels) if any(y != IGNORE_INDEX for y in labels[1:]) else ([], [])


def _encode_with_offsets(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Token ids and character offsets of ``texts`` (no special tokens added). A fast tokenizer without
    truncation or padding configured is called directly: the Python wrapper's per-text conversion costs
    as much as the encoding itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings], [e.offsets for e in encodings]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return encoded["input_ids"], encoded["offset_mapping"]


def _append(out: dict[str, list], ids: list[int], labels: list[int], prompt_length: int, reference: str) -> None:
    out["input_ids"].append(ids)
    out["labels"].append(labels)
    out["prompt_length"].append(prompt_length)
    out["reference"].append(reference)
    out["length"].append(len(ids))


def _cut(out: dict[str, list], data: DataSection, where: str, indices: list[int]) -> dict[str, list]:
    """Examples longer than max_length, by ``data.overlong``: ``error`` stops naming the row; ``truncate_left``
    keeps the last max_length tokens (the answer's end and EOS stay); ``drop`` empties the example (removed,
    and counted, afterwards)."""
    n = data.max_length
    # Evaluation never shrinks: under `drop` its overlong rows are cut from the left (and _apply_overlong says so).
    mode = "truncate_left" if data.overlong == "drop" and is_eval_key(where) else data.overlong
    for i, ids in enumerate(out["input_ids"]):
        if len(ids) <= n:
            continue
        if mode == "error":
            raise chat.row_error(where, indices[i], "data.max_length", f"the example has {len(ids)} tokens, more "
                                 f"than data.max_length={n}; raise data.max_length, or set data.overlong to "
                                 "drop or truncate_left")
        if mode == "drop":
            out["input_ids"][i], out["labels"][i] = [], []
            continue
        cut = len(ids) - n
        out["input_ids"][i], out["labels"][i] = ids[cut:], out["labels"][i][cut:]
        out["prompt_length"][i] = max(0, out["prompt_length"][i] - cut)
        if all(y == IGNORE_INDEX for y in out["labels"][i]):
            out["input_ids"][i], out["labels"][i] = [], []  # nothing labelled is left: dropped, and counted
    return out


def is_eval_key(key: str) -> bool:
    return key.startswith("data.eval")


def _apply_overlong(table, data: DataSection, key: str):
    """Count the overlong examples, warn with the numbers, remove the emptied ones."""
    lengths = table.data.column("length").to_pylist()
    overlong = [x for x in lengths if x > data.max_length]
    if not overlong:
        return table
    kept = table.filter(lambda ids: len(ids) > 0, input_columns="input_ids",
                        new_fingerprint=_hash(table._fingerprint, "kept"))
    dropped = len(table) - len(kept)
    if not len(kept):
        raise ConfigError(f"{key}: all {len(table)} examples are longer than data.max_length={data.max_length} "
                          f"tokens (longest {max(overlong)}) and none is left to train on; raise data.max_length")
    mode = "truncate_left" if data.overlong == "drop" and is_eval_key(key) else data.overlong
    action = {"drop": "dropped them",
              "truncate_left": "cut them from the left (the answer's end stays)"}[mode]
    if mode != data.overlong:
        action += " (evaluation rows are never dropped: metrics cover every row)"
    lost = f"; {dropped} lost every labelled token and were dropped" if mode != "drop" and dropped else ""
    warnings.warn(f"{key}: {len(overlong)} of {len(table)} examples are longer than data.max_length="
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


# ------------------------------------------------------------------------------------------ batches
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


# ------------------------------------------------------------------------------------------ tokenizers
def byte_tokenizer():
    """A byte-level tokenizer with no merges (vocabulary 259: <pad>=0, <s>=1, </s>=2, then the 256 bytes),
    built in memory: offline tests and config-built models need no downloaded tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


# ------------------------------------------------------------------------------------------ generated data
TOPIC_NOUNS = {
    # (train nouns, held-out eval nouns): eval sentences use nouns never seen in training, so accuracy
    # measures what the pretrained model knows about the topic, not memorised words.
    "sports": (["football", "basketball", "the marathon", "tennis", "the referee", "a penalty kick", "the stadium",
                "the goalkeeper", "swimming", "the league table", "a slam dunk", "the cycling race"],
               ["hockey", "the world cup", "a home run", "the boxing match", "the quarterback", "volleyball"]),
    "food": (["pasta", "the bakery", "chocolate cake", "a spicy curry", "fresh bread", "the sushi bar", "pancakes",
              "the recipe for soup", "grilled cheese", "the farmers market", "vanilla ice cream", "roast chicken"],
             ["pizza", "the dumplings", "a fruit salad", "the barbecue", "noodles", "apple pie"]),
    "weather": (["the thunderstorm", "heavy rain", "the heat wave", "snowfall", "the forecast", "a hurricane",
                 "strong winds", "the fog", "hail", "the drought", "a rainbow", "freezing temperatures"],
                ["the blizzard", "a tornado warning", "the humidity", "drizzle", "the cold front", "sunshine"]),
    "technology": (["the new smartphone", "a software update", "the laptop", "artificial intelligence",
                    "the computer virus", "a faster processor", "the robot", "cloud storage", "the web browser",
                    "the video game console", "a programming language", "the wifi router"],
                   ["the tablet", "a microchip", "the search engine", "cybersecurity", "the app store",
                    "quantum computing"]),
}
TOPIC_TEMPLATES = [
    "I read an article about {} yesterday.", "{} was all anyone talked about at lunch.",
    "My neighbour would not stop complaining about {}.", "Have you heard the latest news on {}?",
    "We spent the whole evening discussing {}.", "The documentary about {} was surprisingly good.",
    "Everyone at the office has an opinion on {}.", "She wrote a long blog post about {}.",
    "There was a question about {} on the quiz show.", "He keeps sending me videos about {}.",
    "The podcast this week covered {}.", "My grandmother asked me to explain {}.",
]


def topics(split: str) -> list[dict[str, Any]]:
    """The quickstart task: 4-way topic classification (sports, food, weather, technology) of template
    sentences. ``train``: 512 sentences from 12 nouns per topic; any other split: 192 sentences from 6
    held-out nouns per topic. Deterministic (a fixed seed per split)."""
    held_out = split != "train"
    rng = random.Random(1 if held_out else 0)
    count = 192 if held_out else 512
    rows = []
    labels = sorted(TOPIC_NOUNS)
    for i in range(count):
        label = labels[i % len(labels)]
        noun = rng.choice(TOPIC_NOUNS[label][1 if held_out else 0])
        sentence = rng.choice(TOPIC_TEMPLATES).format(noun)
        rows.append({"text": sentence[0].upper() + sentence[1:], "label": label})
    rng.shuffle(rows)
    return rows


GENERATED = {"topics": topics}
