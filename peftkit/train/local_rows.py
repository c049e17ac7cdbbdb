"""Local JSON, JSON Lines and CSV files read with the standard library, as the rows ``datasets.load_dataset``
gives for them, so a run on local files does not import ``datasets`` (with pyarrow and pandas: ≈ 80 MiB resident
in every process).

Only files whose rows have one regular schema are read here, the schema Arrow infers for them: every row gets
every column (None where a row lacks it), a column of integers and floats becomes floats, nested objects keep
their keys in first-seen order. A file where ``datasets`` would do something else (a column mixing strings and
numbers, nested objects with differing keys, which it stores as JSON text; a JSON object at the top; a CSV value
pandas would read as a number, a date or a missing value in a text column ...) returns None, and the caller
reads it through ``datasets`` as before: the same rows, the same errors. tests/test_local_rows.py compares both
readers on the same files.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any

# Larger files go through datasets: tokenized once (cached on disk, shared by the processes of a run) and
# memory-mapped (≈ 8 bytes a token), where the examples of a file read here are Python lists in every process
# (≈ 40 bytes a token): at 16 MiB of text (≈ 4M tokens) the lists cost about what importing datasets costs.
MAX_BYTES = 16 << 20
INT64 = 1 << 63


class RegularRows(list):
    """Rows of one regular schema, as ``datasets`` would give them back (what this module returns)."""


class Irregular(Exception):
    """The file is not one regular schema: leave it to ``datasets``."""


# ------------------------------------------------------------------------------------------------ JSON
def read_json(path: Path) -> RegularRows | None:
    """The rows of a JSON Lines file, or of a JSON array of objects (or of strings: a ``text`` column), as
    ``datasets``' json builder reads them; None where it reads them otherwise (or the file is over MAX_BYTES)."""
    if path.stat().st_size > MAX_BYTES:
        return None
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        text = raw.decode("utf-8")
        if raw.startswith(b"["):  # datasets' test: an array only where the file's first byte opens one
            items = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
            if not isinstance(items, list) or not items:
                return None
            if all(isinstance(item, str) for item in items):
                rows = [{"text": item} for item in items]
            elif all(isinstance(item, dict) for item in items):
                rows = items
            else:
                return None
        else:
            rows = [json.loads(line, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
                    for line in text.split("\n") if line.strip()]
            if not rows or not all(isinstance(row, dict) for row in rows):
                return None
        return _regular(rows)
    except (ValueError, RecursionError, Irregular):
        return None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise Irregular("a key repeated in one object")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise Irregular(f"{name} is not JSON")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        if not -INT64 <= value < INT64:
            raise Irregular("an integer beyond int64")
        return "int"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Irregular("a number beyond float64")
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list"
    return "dict"


def _schema(values: list[Any], root: bool = False) -> Any:
    """Arrow's type for ``values`` (None skipped): a scalar kind, ("list", element schema) or ("dict", {key:
    schema} in first-seen order). Raises Irregular where datasets would not infer one plain type."""
    kinds = {_kind(v) for v in values} - {"null"}
    if not kinds:
        return "null"
    if kinds <= {"int", "float"}:
        return "float" if "float" in kinds else "int"
    if len(kinds) > 1:
        raise Irregular(f"mixed kinds {sorted(kinds)}")
    (kind,) = kinds
    if kind == "list":
        return ("list", _schema([item for v in values if v is not None for item in v]))
    if kind == "dict":
        present = [v for v in values if v is not None]
        keys = list(dict.fromkeys(key for v in present for key in v))
        if not root and (not keys or any(len(v) != len(keys) for v in present)):
            raise Irregular("nested objects with differing keys")  # datasets stores those as JSON text
        return ("dict", {key: _schema([v.get(key) for v in present]) for key in keys})
    return kind


def _conform(value: Any, schema: Any) -> Any:
    if value is None:
        return None
    if schema == "float":
        return float(value)
    if isinstance(schema, tuple) and schema[0] == "list":
        return [_conform(item, schema[1]) for item in value]
    if isinstance(schema, tuple):
        return {key: _conform(value.get(key), sub) for key, sub in schema[1].items()}
    return value


def from_list(rows: list[dict[str, Any]]) -> RegularRows | None:
    """``rows`` as ``datasets.Dataset.from_list(rows)`` gives them back, or None where they have no one schema or
    not every row has the first row's keys (``from_list`` takes its columns from the first row)."""
    if not rows or not all(isinstance(row, dict) and row.keys() == rows[0].keys() for row in rows):
        return None
    try:
        return _regular(rows)
    except Irregular:
        return None


def _regular(rows: list[dict[str, Any]]) -> RegularRows:
    if not rows or not all(isinstance(row, dict) for row in rows):
        raise Irregular("not a list of objects")
    schema = _schema(rows, root=True)
    if schema == "null" or not schema[1]:
        raise Irregular("no columns")
    return RegularRows(_conform(row, schema) for row in rows)


# ------------------------------------------------------------------------------------------------ CSV
# What pandas.read_csv (datasets' csv builder) reads as a missing value, a boolean or a number: a column holding
# any of them is left to datasets, except columns of plain integers.
NA_VALUES = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
             "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
BOOLEANS = {"true", "false"}
PLAIN_INT = re.compile(r"-?(0|[1-9][0-9]*)")


def _numeric_looking(value: str) -> bool:
    try:
        float(value.replace("_", "!"))  # pandas does not read 1_000 as a number
    except ValueError:
        return False
    return True


def read_csv(path: Path) -> RegularRows | None:
    """The rows of a CSV file whose columns are plain text or plain integers, as ``datasets``' csv builder
    (pandas) reads them; None for anything pandas would read otherwise (or a file over MAX_BYTES)."""
    if path.stat().st_size > MAX_BYTES:
        return None
    with open(path, encoding="utf-8-sig", newline="") as handle:
        text = handle.read()
    if text.count("\r") != text.count("\r\n") or "\x00" in text:
        return None  # lone carriage returns and NULs: pandas' parser has its own rules
    try:
        records = [record for record in csv.reader(io.StringIO(text, newline=""), strict=True) if record]
    except csv.Error:
        return None
    if len(records) < 2:
        return None
    header, body = records[0], records[1:]
    if len(set(header)) != len(header) or any(not name.strip() or name != name.strip() for name in header):
        return None  # pandas renames repeated and unnamed columns
    if any(len(record) != len(header) for record in body):
        return None
    columns = []
    for index in range(len(header)):
        values = [record[index] for record in body]
        if all(PLAIN_INT.fullmatch(v) for v in values) and all(-INT64 <= int(v) < INT64 for v in values):
            columns.append([int(v) for v in values])
        elif any(v in NA_VALUES or v.strip() != v or v.lower() in BOOLEANS or _numeric_looking(v) for v in values):
            return None
        else:
            columns.append(values)
    return RegularRows(dict(zip(header, values)) for values in zip(*columns))
