"""What the sync's stores and its planner share: the error, the recorded state, the store protocol, and streaming
reads of an output's Parquet files (one file open at a time, ``ParquetFile.iter_batches``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from operators import storage
from operators.errors import RayembedError

BATCH_BYTES = 4 << 20  # the default batch: about this many bytes of rows, whatever the dim (memory stays flat)
ID_BATCH_ROWS = 65536  # delete files hold ids only


class SyncError(RayembedError):
    pass


@dataclass(frozen=True)
class StoreState:
    output_key: str
    version: int


class Store(Protocol):
    """A vector store. ``__enter__`` connects and takes the one-committer lock; ``__exit__`` releases both."""

    description: str  # for messages: the store and table, never a password

    def __enter__(self) -> Store: ...
    def __exit__(self, *exc: Any) -> None: ...
    def state(self) -> StoreState | None: ...
    def check_schema(self, schema: pa.Schema) -> pa.Schema: ...  # the schema to cast batches to; SyncError if none
    def bulk_load(self, record: dict[str, Any], schema: pa.Schema, batches: Iterator[pa.RecordBatch]) -> int: ...
    def begin_version(self, record: dict[str, Any], schema: pa.Schema | None) -> None: ...
    def delete(self, ids: Iterator[pa.Array]) -> int: ...
    def upsert(self, batches: Iterator[pa.RecordBatch]) -> int: ...
    def finish_version(self, record: dict[str, Any]) -> None: ...  # records the version (PG: commits)
    def build_index(self, kind: str) -> None: ...


def iter_batches(
    urls: list[str], storage_options: dict[str, Any] | None, batch_rows: int, schema: pa.Schema | None = None
) -> Iterator[pa.RecordBatch]:
    """The files' rows, batch by batch, one file open at a time; cast to ``schema`` (no metadata) when given, column
    by column and only where the values fit (``castable``; a value that does not fit is a one-line SyncError)."""
    import pyarrow.parquet as pq

    from pipelines import testhooks

    for url in urls:
        fs, path = storage.get_fs(url, storage_options)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if schema is not None:
                _check_file(url, pf.schema_arrow, schema)
            for batch in pf.iter_batches(batch_size=batch_rows, columns=schema.names if schema else None):
                yield conform(batch, schema, url) if schema is not None else batch
        testhooks.point("sync.file_read")  # once per file: a test kills a bulk load half-way here


def _kind(t: pa.DataType) -> Any:
    """What a value is, whatever its width or encoding: types of one kind cast into each other, values allowing."""
    if pa.types.is_dictionary(t):
        return _kind(t.value_type)
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return "number"  # int32 / int64 / float64 (pandas' ints with nulls): a cast checks each value
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "binary"
    if pa.types.is_fixed_size_binary(t):
        return ("binary", t.byte_width)
    if pa.types.is_timestamp(t):
        return ("timestamp", t.tz is not None)  # a unit changes only where no value would lose precision
    if pa.types.is_fixed_size_list(t):
        return ("fixed_size_list", t.list_size, _kind(t.value_type))
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
        return ("list", _kind(t.value_type))
    if pa.types.is_struct(t):
        return ("struct", tuple((f.name, _kind(f.type)) for f in t))
    return str(t)


def castable(src: pa.DataType, dst: pa.DataType) -> bool:
    """Whether values of ``src`` go into a column of ``dst`` by a safe cast: the same type, or another width or
    encoding of the same kind of value (an input rewritten by another writer: large_string for string, int64 for
    int32, ...). Binary never becomes fixed-width (or back) unless the widths match."""
    return src == dst or _kind(src) == _kind(dst)


def _check_file(url: str, have: pa.Schema, want: pa.Schema) -> None:
    for f in want:
        if f.name not in have.names:
            raise SyncError(f"{url} has no column {f.name!r}: not like the output's other data files")
        src = have.field(f.name).type
        if not castable(src, f.type):
            raise SyncError(f"{url}: column {f.name!r} is {src}, which does not fit the store's {f.type}")


def conform(batch: pa.RecordBatch, schema: pa.Schema, where: str) -> pa.RecordBatch:
    """``batch`` with ``schema``'s columns and types; a safe cast per column that needs one."""
    if batch.schema == schema:
        return batch
    cols = []
    for f in schema:
        col = batch.column(f.name)
        if col.type != f.type:
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                msg = " ".join(str(e).split())
                raise SyncError(
                    f"{where}: column {f.name!r} ({col.type}) does not fit the store's {f.type}: {msg}"
                ) from None
        cols.append(col)
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def iter_ids(urls: list[str], storage_options: dict[str, Any] | None, batch_rows: int) -> Iterator[pa.Array]:
    for batch in iter_batches(urls, storage_options, batch_rows):
        yield batch.column("id")


def batch_rows_for(schema: pa.Schema, requested: int | None) -> int:
    """``--batch-rows``, else about BATCH_BYTES of rows: 3,800 rows at dim 256, 1,000 at dim 1024, 256 at 4096."""
    if requested:
        return requested
    emb = schema.field("embedding").type
    row_bytes = emb.list_size * emb.value_type.bit_width // 8 + 16 + 32 * (len(schema.names) - 2)
    return max(256, min(8192, BATCH_BYTES // row_bytes))


def data_schema(urls: list[str], storage_options: dict[str, Any] | None) -> pa.Schema:
    """The snapshot's row schema (id, embedding, content_hash, pass-through), without Parquet metadata."""
    import pyarrow.parquet as pq

    fs, path = storage.get_fs(urls[0], storage_options)
    with fs.open(path, "rb") as f:
        schema = pq.read_schema(f)
    for name in ("id", "embedding"):
        if name not in schema.names:
            raise SyncError(f"{urls[0]} has no {name!r} column: not an embed output's data file")
    emb = schema.field("embedding").type
    if not pa.types.is_fixed_size_list(emb) or emb.value_type not in (pa.float32(), pa.float16()):
        raise SyncError(f"{urls[0]}: embedding must be fixed_size_list<float32|float16>, got {emb}")
    return schema.remove_metadata()
