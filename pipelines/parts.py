"""What every job's write stage shares: part names, the quarantine schema, the record each part reports to the
driver, the retry count carried along blocks, and the shard items the read stage starts from."""

from __future__ import annotations

import hashlib
import io
import json
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
        # embed: rows sent to the model, rows whose vector was copied from the parent version, rows in the
        # upserts delta (and its file), rows quarantined as DuplicateId
        ("embedded", pa.int64()),
        ("reused", pa.int64()),
        ("upserted", pa.int64()),
        ("upserts_file", pa.string()),
        ("duplicates", pa.int64()),
    ]
)


def part_name(stem: str, first_offset: int, version: int | None = None) -> str:
    """``<stem>-<offset>.parquet``; with a version, ``<stem>-<offset>-v<version>.parquet``: a versioned output never
    rewrites a name an earlier version committed (a changed shard's new parts get new names)."""
    tag = "" if version is None else f"-v{int(version):08d}"
    return f"{stem}-{first_offset:012d}{tag}.parquet"


def part_pattern(stem: str, version: int | None = None) -> re.Pattern[str]:
    """Matches exactly the part files of ``stem`` (of one version, when given) in a path or URL: not those of a stem
    that merely starts with it (``a-1``), nor of one that ends with it (``docs-v2__docs`` for ``docs``), hence the
    anchor at the name's start."""
    tag = r"(?:-v\d{8})?" if version is None else re.escape(f"-v{int(version):08d}")
    return re.compile(r"(?:^|/)" + re.escape(stem) + r"-\d{12}" + tag + r"\.parquet$")


def record(shard: str, part: int, **values: Any) -> dict[str, Any]:
    """A part record with every field of RECORD_SCHEMA (zeros and nulls where a job has nothing to say)."""
    rec: dict[str, Any] = {f.name: None if f.name.endswith("file") else 0 for f in RECORD_SCHEMA}
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


# ------------------------------------------------------------------------------------------------- packed blocks

PACKED = "_block"  # the one column of a packed block: an Arrow IPC stream of rows


def pack(table: pa.Table) -> pa.Table:
    """One table of rows as one opaque row. Ray Data re-batches rows to a stage's ``batch_size`` (required for GPU
    stages) across blocks and shards; a packed table travels whole, so ``batch_size=1`` is exactly one reader
    block (embed: one output part), and tables of different column types never have to be concatenated by Ray."""
    return pack_all([table])


def pack_all(tables: list[pa.Table]) -> pa.Table:
    """Each table as one packed row."""
    blobs = []
    for t in tables:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, t.schema) as writer:
            writer.write_table(t)
        blobs.append(sink.getvalue().to_pybytes())
    return pa.table({PACKED: pa.array(blobs, pa.large_binary())})


def unpack(batch: pa.Table) -> list[pa.Table]:
    return [pa.ipc.open_stream(pa.py_buffer(b)).read_all() for b in batch[PACKED].to_pylist()]


def concat_blocks(tables: list[pa.Table]) -> pa.Table:
    """One shard's consecutive blocks as one table. Types are unified (a column all null in one block); a column
    whose JSON values are numbers in one block and text in another becomes text, as it does within one block."""
    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        names = tables[0].column_names
        types = {
            n: {str(t.schema.field(n).type) for t in tables if not pa.types.is_null(t.schema.field(n).type)}
            for n in names
        }
        loose = [n for n, ts in types.items() if len(ts) > 1]
        return pa.concat_tables([_as_text(t, loose) for t in tables], promote_options="permissive")


def _as_text(table: pa.Table, columns: list[str]) -> pa.Table:
    for c in columns:
        vals = [None if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in table[c].to_pylist()]
        table = table.set_column(table.schema.get_field_index(c), c, pa.array(vals, pa.string()))
    return table


def shard_items(shards: list[Shard], work: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The rows of the dataset that drives the read stage: one per shard, as ``shard_from_item`` reads them, with the
    URL of the shard's refresh work file (pipelines/jobs/refresh.py) where it has one."""
    return [
        {
            "url": s.url,
            "stem": s.stem,
            "fmt": s.fmt,
            "compression": s.compression or "",
            "size": s.size,
            "version": s.version,
            "work": (work or {}).get(s.stem, ""),
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


# ---------------------------------------------------------------------------------------------- refresh digests

# What the match pass (pipelines/jobs/refresh.py) decides for an input row: embed it (new or changed text), reuse the
# parent version's vector, reuse it and upsert the row (pass-through values changed), or quarantine it as a
# duplicate id. BUCKET marks a per-bucket record (its deletes).
EMBED, REUSE, UPSERT, DUPLICATE, BUCKET = 0, 1, 2, 3, 9
HASH_TYPE = pa.binary(16)  # fixed_size_binary(16): the data schema's content_hash


def content_hashes(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """blake2b-128 of each text's UTF-8 bytes (null for a null text): the ``content_hash`` column, and the key the
    refresh matches a row's text by."""
    digest = hashlib.blake2b
    values = [None if t is None else digest(t.encode("utf-8"), digest_size=16).digest() for t in texts.to_pylist()]
    return pa.array(values, HASH_TYPE)


def row_digests(table: pa.Table, columns: tuple[str, ...] | list[str]) -> pa.Array:
    """A digest of each row's pass-through values (null without pass-through columns): a refresh rewrites a row whose
    text is unchanged but whose pass-through values differ (an upsert with its old vector). The same values read
    from the input and from a written part give the same digest (JSON of the Python values)."""
    if not columns:
        return pa.nulls(len(table), HASH_TYPE)
    cols = [table[c].to_pylist() for c in columns]
    out = []
    for vals in zip(*cols):
        blob = json.dumps(vals, default=str, sort_keys=True, ensure_ascii=False).encode("utf-8")
        out.append(hashlib.blake2b(blob, digest_size=16).digest())
    return pa.array(out, HASH_TYPE)


def key_buckets(keys: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """A stable bucket of each id (its string form), the same in every process: Python's ``hash`` is salted."""
    if buckets <= 1:
        return np.zeros(len(keys), dtype=np.int32)
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(k.encode("utf-8"), digest_size=4).digest(), "little") % buckets
            for k in keys.to_pylist()
        ),
        dtype=np.int32,
        count=len(keys),
    )
