"""The tokenize stage: rows (rendered by :mod:`.chat` for the chat formats) become token ids and labels, by
``data.format``, through a batched, cached ``datasets.Dataset.map``.

- ``text``: the documents' ids with EOS (cut or packed into blocks by :mod:`.pack`).
- ``instruction``, ``alpaca``, ``messages``, ``sharegpt``: conversations rendered with a chat template; the labels
  are the assistant turns' tokens (every one, or the last with ``data.assistant_turns``). Single-turn data on a
  tokenizer without a template is laid out as ``prompt\\n`` + ``response`` + EOS.
- ``classification``: a text, an optional text pair, and a label id (class names mapped to ids).
- ``preference``: a prompt and two completions, each side labelled on its completion only.

The result is an Arrow table (memory-mapped from datasets' cache for files and hub sets, keyed by the tokenizer
and the data section), so no process holds the examples as Python lists.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..errors import ConfigError
from . import chat, local_rows
from .examples import IGNORE_INDEX, MAP_BATCH, Tokenized, hash_parts, is_eval_key
from .pack import finish, packs
from .recipe import DataSection

CACHE_VERSION = "peftkit-data-2"  # bump when tokenization changes, so old cache files are not reused


def tokenize(rows, tokenizer, data: DataSection, label_names: list[str] | None = None, *, key: str = "data.train",
             pack: bool | None = None, batch_size: int | None = None) -> Tokenized:
    """Tokenize ``rows`` (a ``datasets.Dataset`` or a list of dicts) by ``data.format``. ``pack`` (default:
    ``packs(data)``) packs chat data; ``batch_size`` only sizes the padding report of packing."""
    table = encode(rows, tokenizer, data, label_names, key=key)
    return finish(table, data, key=key, pack=packs(data) if pack is None else pack, batch_size=batch_size,
                  label_names=_label_names(rows, data, label_names) if data.format == "classification" else None)


def encode(rows, tokenizer, data: DataSection, label_names: list[str] | None = None, *, key: str = "data.train"):
    """The tokenized rows (columns by format, unpacked): of a ``datasets.Dataset``, a ``datasets.Dataset``
    through a batched, cached ``map``; of a list of row dicts (local files, :mod:`.local_rows`), a dict of
    column lists, through the same function over the same batches of MAP_BATCH rows, without ``datasets``.
    Chat rows are checked here: a bad one is one ConfigError naming file, row and field."""
    if data.format == "text":
        function = _text_function(tokenizer, data)
    elif data.format == "classification":
        function = _classification_function(tokenizer, data, _label_names(rows, data, label_names), key)
    elif data.format == "preference":
        function = _preference_function(tokenizer, data, key)
    else:
        function = _chat_function(tokenizer, data, key)
    if isinstance(rows, list):
        regular = rows if isinstance(rows, local_rows.RegularRows) else local_rows.from_list(rows)
        if regular is not None:
            return map_rows(regular, function)
    import datasets

    datasets.disable_progress_bars()
    table = rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(list(rows))
    fingerprint = _fingerprint(table, tokenizer, data, key, label_names)
    return table.map(function, batched=True, batch_size=MAP_BATCH, with_indices=True, num_proc=data.num_proc,
                     remove_columns=table.column_names, new_fingerprint=fingerprint, desc=f"tokenizing {key}")


def map_rows(rows: list[dict[str, Any]], function) -> dict[str, list]:
    """``Dataset.map(function, batched=True, batch_size=MAP_BATCH, with_indices=True, remove_columns=...)`` over
    a list of row dicts: the function's output columns, batch after batch."""
    names = list(rows[0]) if rows else []
    columns: dict[str, list] = {}
    for start in range(0, len(rows), MAP_BATCH):
        chunk = rows[start:start + MAP_BATCH]
        out = function({name: [row[name] for row in chunk] for name in names}, list(range(start, start + len(chunk))))
        for name, values in out.items():
            columns.setdefault(name, []).extend(values)
    return columns


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
    return hash_parts(body, extra)


def _fingerprint(table, tokenizer, data: DataSection, key: str, label_names) -> str:
    settings = json.dumps(dataclasses.asdict(data), sort_keys=True, default=str)
    return hash_parts(CACHE_VERSION, table._fingerprint, tokenizer_hash(tokenizer), settings, key, str(label_names))

def _text_function(tokenizer, data: DataSection):
    column, eos = data.text_column, ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])

    def function(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        texts = [str(t) for t in batch[column] if t]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return {"input_ids": [ids + eos for ids in encoded]}

    return function


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
