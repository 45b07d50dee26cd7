"""What every job's write stage shares: part names, the quarantine schema, the record each part reports to the
driver, the retry count carried along blocks, and the shard items the read stage starts from."""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators import storage
from operators.storage import Shard

# Quarantined rows. Jobs over pairs (rerank, search) also name the document of the pair.
ERROR_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("shard", pa.string()),
        ("row_offset", pa.int64()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)
PAIR_ERROR_SCHEMA = pa.schema([ERROR_SCHEMA.field("id"), ("doc_id", pa.string()), *list(ERROR_SCHEMA)[1:]])

# One record per written part, the only thing the driver sees of the data. ``shard_rows`` is the shard's row count
# on its last part (-1 on the others), so the driver knows when a shard is complete.
RECORD_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("part", pa.int64()),
        ("file", pa.string()),
        ("rows", pa.int64()),
        ("errors", pa.int64()),
        ("errors_file", pa.string()),
        ("tokens", pa.int64()),
        ("truncated", pa.int64()),
        ("shard_rows", pa.int64()),
        ("retries", pa.int64()),
        ("pairs", pa.int64()),
        ("queries", pa.int64()),
        ("repeated", pa.list_(pa.string())),
    ]
)


def part_name(stem: str, first_offset: int) -> str:
    return f"{stem}-{first_offset:012d}.parquet"


def part_pattern(stem: str) -> re.Pattern[str]:
    """Matches exactly the part files of ``stem`` in a path or URL: not those of a stem that merely starts with it
    (``a-1``), nor of one that ends with it (``docs-v2__docs`` for ``docs``), hence the anchor at the name's start."""
    return re.compile(r"(?:^|/)" + re.escape(stem) + r"-\d{12}\.parquet$")


def record(shard: str, part: int, **values: Any) -> dict[str, Any]:
    """A part record with every field of RECORD_SCHEMA (zeros and nulls where a job has nothing to say)."""
    rec: dict[str, Any] = {f.name: None if f.name in ("file", "errors_file") else 0 for f in RECORD_SCHEMA}
    rec.update({"shard": shard, "part": part, "shard_rows": -1, "repeated": [], **values})
    return rec


def records_table(records: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)


def write_parquet(table: pa.Table, url: str, storage_options: dict[str, Any] | None) -> None:
    """One immutable part, written atomically (see storage.atomic_write)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(url, buf.getvalue(), storage_options)


def error_table(records: list[dict[str, Any]], schema: pa.Schema = PAIR_ERROR_SCHEMA) -> pa.Table:
    return pa.Table.from_pylist(records, schema=schema)


def with_metadata(table: pa.Table, metadata: dict[str, str]) -> pa.Table:
    kv = {k.encode(): v.encode() for k, v in metadata.items()}
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **kv})


def add_retries(table: pa.Table) -> pa.Table:
    """Carry this process's storage retries (since the last call) on the block's first row to the driver."""
    n = storage.take_retries()
    if "_retries" not in table.column_names:
        return table.append_column("_retries", pa.array([n] + [0] * (len(table) - 1), pa.int64()))
    if n and len(table):
        vals = table["_retries"].to_pylist()
        vals[0] += n
        table = table.set_column(table.schema.get_field_index("_retries"), "_retries", pa.array(vals, pa.int64()))
    return table


def shard_items(shards: list[Shard]) -> list[dict[str, Any]]:
    """The rows of the dataset that drives the read stage: one per shard, as ``shard_from_item`` reads them."""
    return [
        {
            "url": s.url,
            "stem": s.stem,
            "fmt": s.fmt,
            "compression": s.compression or "",
            "size": s.size,
            "version": s.version,
        }
        for s in shards
    ]


def shard_from_item(batch: dict[str, np.ndarray], i: int) -> Shard:
    """Row ``i`` of a ``shard_items`` batch back as a Shard."""
    return Shard(
        url=str(batch["url"][i]),
        stem=str(batch["stem"][i]),
        fmt=str(batch["fmt"][i]),
        compression=batch["compression"][i] or None,
        size=int(batch["size"][i]),
        version=str(batch["version"][i]),
    )
