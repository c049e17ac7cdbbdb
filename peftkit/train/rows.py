"""The first stages of the data pipeline: read a dataset's rows and check them (columns, values, sizes, label
kinds), before anything is tokenized. Nothing is silently turned into the string "None", dropped, or given
another label id than the one it has in data.train."""

from __future__ import annotations

import codecs
import warnings
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import chat, local_rows
from .demo_data import GENERATED
from .recipe import DataSection

LOCAL_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
GENERATED_PREFIX = "generated:"


def read_rows(spec: str, split: str, data: DataSection, key: str):
    """The examples of one dataset: a list of row dicts for generated data and for local JSON, JSON Lines and CSV
    files of one regular schema (:mod:`.local_rows`: the rows ``datasets`` gives, without importing it), else a
    ``datasets.Dataset`` (memory-mapped for files and hub sets). ``key`` (``data.train``/``data.eval``/``data.mix``)
    names errors."""
    if spec.startswith(GENERATED_PREFIX):
        name = spec[len(GENERATED_PREFIX):]
        if name not in GENERATED:
            raise ConfigError(f"{key}: unknown generated dataset '{name}'; available: {', '.join(sorted(GENERATED))}")
        rows = GENERATED[name](split)
        regular = local_rows.from_list(rows)
        return regular if regular is not None else _datasets().Dataset.from_list(rows)

    path = Path(spec)
    is_local = path.suffix.lower() in LOCAL_EXTENSIONS or path.exists() or spec.startswith((".", "/", "~"))
    if is_local:
        path = path.expanduser()
        if not path.is_file():
            raise ConfigError(f"{key}: file not found: {path}; give a .json/.jsonl/.csv/.parquet/.txt file or a hub "
                              "dataset id")
        builder = LOCAL_EXTENSIONS.get(path.suffix.lower())
        if builder is None:
            raise ConfigError(f"{key}: {path} has an unsupported extension; expected one of {sorted(LOCAL_EXTENSIONS)}")
        if builder != "parquet":
            check_utf8(path, key)
        if builder in LOCAL_READERS:
            rows = LOCAL_READERS[builder](path)
            if rows is not None:
                return rows
        datasets = _datasets()
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as exc:
            raise ConfigError(f"{key}: could not read {path} as {builder} ({_first_line(exc)}); "
                              "check the file") from None
    else:
        datasets = _datasets()
        try:
            table = datasets.load_dataset(spec, data.subset, split=split)
        except Exception as exc:
            raise ConfigError(
                f"{key}: could not load the hub dataset '{spec}' (subset {data.subset!r}, split '{split}'): "
                f"{_first_line(exc)}. Check the id, data.subset and the split, or give a local file"
            ) from None
    return table


LOCAL_READERS = {"json": local_rows.read_json, "csv": local_rows.read_csv}


def _datasets():
    import datasets

    datasets.disable_progress_bars()
    return datasets


def head(rows, cap: int | None):
    """The first ``cap`` rows (all with None) of a list of rows or a ``datasets.Dataset``."""
    if not cap:
        return rows
    return type(rows)(rows[:cap]) if isinstance(rows, list) else rows.select(range(min(cap, len(rows))))


def as_list(rows) -> list[dict[str, Any]]:
    """The rows as a list of dicts (a ``datasets.Dataset`` materialised)."""
    return rows if isinstance(rows, list) else rows.to_list()


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
    columns without materialising a row (or from the rows of a list)."""
    for column in required_columns(data):
        if isinstance(rows, list):
            longest, row = _longest_listed(rows, column)
        elif hasattr(rows, "data") and column in rows.column_names:
            longest, row = _longest_value(rows.data.column(column))
        else:
            continue
        if longest > MAX_VALUE_BYTES:
            where = f"row {row + 1}" if row is not None else "a row"
            raise ConfigError(f"{key}: {spec} {where} holds {longest:,} bytes of text in '{column}', more than the "
                              f"{MAX_VALUE_BYTES:,} peftkit tokenizes as one value; split it into several rows (text "
                              "rows are packed together anyway) or shorten it")


def _longest_listed(rows: list[dict[str, Any]], column: str) -> tuple[int, int | None]:
    """``_longest_value`` of a column of row dicts: the UTF-8 bytes of its longest string, and its row where the
    column holds flat strings (the first row of that length)."""
    longest, at, flat = 0, None, True
    for i, row in enumerate(rows):
        value = row.get(column)
        flat = flat and (value is None or isinstance(value, str))
        size = _text_bytes(value)
        if size > longest:
            longest, at = size, i
    return longest, (at if flat and longest > MAX_VALUE_BYTES else None)


def _text_bytes(value: Any) -> int:
    if isinstance(value, str):
        return len(value) if len(value) * 4 <= MAX_VALUE_BYTES else len(value.encode("utf-8"))
    if isinstance(value, list):
        return max((_text_bytes(item) for item in value), default=0)
    if isinstance(value, dict):
        return max((_text_bytes(item) for item in value.values()), default=0)
    return 0


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
