"""The one reader of input rows, for every job: Parquet and JSONL (.gz, .zst) shards, with one error taxonomy.

Row-level errors (the row is quarantined, the shard goes on): ``InvalidUTF8``, ``EmptyLine``, ``MalformedJSON``.
Shard-level errors (reading stops there; one record says where): ``CorruptShard`` (unreadable or truncated),
``MissingColumn``, ``InvalidColumn`` (a text column that is not a string column). Jobs add their own row-level
types for values (``InvalidText``, ``MissingId``, ``InvalidId``, ``DuplicateId``, ...).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from operators import storage
from operators.storage import Shard

SHARD_ERROR_TYPES = frozenset({"CorruptShard", "MissingColumn", "InvalidColumn"})

# (row offset in the shard, the row as a dict or None, error type or None, message or None)
Record = tuple[int, "dict[str, Any] | None", "str | None", "str | None"]


class MissingColumn(KeyError):
    """A column the job needs is absent from a Parquet shard."""


class InvalidColumn(TypeError):
    """A Parquet column of the wrong type (a text column that is not a string): one shard-level record."""


def shard_error(e: BaseException, rows_read: int) -> tuple[str, str]:
    """(error type, message) of the shard-level record for a shard that failed after ``rows_read`` rows."""
    kind = "MissingColumn" if isinstance(e, KeyError) else "InvalidColumn" if isinstance(e, InvalidColumn) else None
    return kind or "CorruptShard", f"shard unreadable after {rows_read} rows: {storage.describe_error(e)}"


def jsonl_records(f) -> Iterator[Record]:
    """Every line of a JSONL stream: the parsed object, or why it is not one."""
    for offset, raw in enumerate(f):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield offset, None, "InvalidUTF8", f"line is not valid UTF-8 ({e.reason} at byte {e.start})"
            continue
        if not line.strip():
            yield offset, None, "EmptyLine", "blank line"
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield offset, None, "MalformedJSON", f"malformed JSON: {e.msg} at column {e.colno}"
            continue
        if not isinstance(obj, dict):
            yield offset, None, "MalformedJSON", f"line is a JSON {type(obj).__name__}, not an object"
            continue
        yield offset, obj, None, None


def parquet_tables(
    f, columns: Sequence[str], rows_per_block: int, *, string_columns: Sequence[str] = (), optional: bool = False
) -> Iterator[pa.Table]:
    """Blocks of at most ``rows_per_block`` rows of ``columns``. A missing column raises MissingColumn (with
    ``optional``, absent columns are left out instead); a ``string_columns`` column of another type raises
    InvalidColumn: its blocks would not combine with other shards' string blocks."""
    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing and not optional:
        raise MissingColumn(f"column(s) {missing} not in shard (has {names})")
    present = [c for c in columns if c in names]
    for c in string_columns:
        t = pf.schema_arrow.field(c).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
            raise InvalidColumn(f"column {c!r} is {t}, not a string")
    for b in pf.iter_batches(batch_size=rows_per_block, columns=present):
        yield pa.Table.from_batches([b])


def parquet_schema(f) -> pa.Schema:
    return pq.ParquetFile(f).schema_arrow


def iter_records(
    shard: Shard, columns: Sequence[str], storage_options: dict[str, Any] | None = None, batch_rows: int = 4096
) -> Iterator[Record]:
    """Every row of a shard as a dict (absent Parquet columns read as null), or the row-level error of a JSONL line.
    A shard that cannot be opened or read to its end raises; callers turn that into a shard-level record."""
    with storage.open_input(shard, storage_options) as f:
        if shard.fmt != "parquet":
            yield from jsonl_records(f)
            return
        offset = 0
        for table in parquet_tables(f, columns, batch_rows, optional=True):
            for row in table.to_pylist():
                yield offset, row, None, None
                offset += 1


def first_columns(shard: Shard, storage_options: dict[str, Any] | None = None) -> list[str] | None:
    """The column names of a shard (Parquet: its schema; JSONL: the first object's keys), or None when the shard is
    unreadable or empty: the reader quarantines such a shard, so a driver-side check must not fail on it."""
    try:
        with storage.open_input(shard, storage_options) as f:
            if shard.fmt == "parquet":
                return parquet_schema(f).names
            for _offset, obj, _err, _msg in jsonl_records(f):
                if obj is not None:
                    return list(obj)
    except Exception:
        return None
    return None
