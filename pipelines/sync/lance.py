"""LanceDB (embedded; a local directory or ``s3://``) as a sync target: ``--to lancedb://<dir>``.

The table keeps the output's rows as they are (``embedding`` stays ``fixed_size_list<float32|float16>[dim]``).
What the table holds is recorded in the table itself:

- schema metadata written atomically with the bulk load: ``rayembed.sync.output_key`` and
  ``rayembed.sync.loaded_version`` (the version bulk-loaded);
- a tag ``rayembed-v<version:08d>`` on the table version that holds the output version (after the bulk load and after
  each applied version; the tag wins over the metadata). Only the newest tag is kept, since tagged table versions are
  exempt from ``cleanup_old_versions``; ``table.checkout(tag)`` reads exactly that output version.

A version is applied as ``delete("id IN (...)")`` (chunks of ``DELETE_CHUNK`` ids) then one
``merge_insert(on="id").when_matched_update_all().when_not_matched_insert_all()``, then the tag. Killed in between,
the tag is still the old one and the next sync re-applies the version, which is idempotent: the deleted ids stay
deleted and the upserted rows are written again with the same values. One committer at a time: a lease
(pipelines/lease.py) at ``<dir>/_rayembed_sync/<table>/_lease.json``, beside the table.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from operators import storage
from operators.errors import ConfigError
from pipelines.lease import Lease, LeaseHeldError, describe_holder, lease_url
from pipelines.sync.base import StoreState, SyncError, castable

SYNC_FORMAT = "rayembed.sync/1"
KEY_META = b"rayembed.sync.output_key"
LOADED_META = b"rayembed.sync.loaded_version"
FORMAT_META = b"rayembed.sync.format"
TAG_PREFIX = "rayembed-v"
_TAG = re.compile(r"^rayembed-v(\d{8})$")
DELETE_CHUNK = 10_000  # ids per delete predicate: one table version each, and a predicate the parser takes quickly


def _sql_literal(value: Any) -> str:
    if isinstance(value, bool):
        raise SyncError("boolean ids are not supported")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise SyncError(f"ids of Python type {type(value).__name__} are not supported by the LanceDB sync")


def conformed(expected: pa.Schema, actual: pa.Schema) -> tuple[pa.Schema | None, str | None]:
    """The output's columns with the table's types (where a safe cast takes the output's values there), or the first
    difference between them as words. The vectors must match exactly: dim and element type."""
    have = {f.name: f.type for f in actual}
    fields = []
    for f in expected:
        if f.name not in have:
            return None, f"the table has no column {f.name!r}"
        if have[f.name] != f.type and (f.name == "embedding" or not castable(f.type, have[f.name])):
            return None, f"column {f.name!r} is {have[f.name]} in the table, {f.type} in the output"
        fields.append(pa.field(f.name, have[f.name], f.nullable))
    extra = sorted(set(have) - set(expected.names))
    if extra:
        return None, f"the table has columns the output lacks: {', '.join(extra)}"
    return pa.schema(fields), None


class LanceStore:
    def __init__(self, to: str, table: str):
        self.uri = to.split("://", 1)[1]
        if not self.uri:
            raise ConfigError("--to lancedb:// needs a directory: lancedb://<dir> or lancedb://s3://bucket/dir")
        self.name = table
        self.description = f"LanceDB table {table!r} in {self.uri}"
        self._db: Any = None
        self._lease: Lease | None = None

    # ---------------------------------------------------------------------------------------------- connection
    def __enter__(self) -> LanceStore:
        import lancedb

        try:
            self._db = lancedb.connect(self.uri)
        except Exception as e:
            raise SyncError(f"cannot open LanceDB at {self.uri!r}: {storage.describe_error(e)}") from None
        where = storage.join(self.uri, "_rayembed_sync", self.name)
        lease = Lease(where, info={"kind": "sync", "table": self.name})
        try:
            self._lease = lease.acquire()
        except LeaseHeldError:
            holder = storage.read_json(lease_url(where)) or {}
            raise SyncError(
                f"{self.description} is being synced by {describe_holder(holder)}: one sync at a time per table; "
                "retry when it has finished"
            ) from None
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._lease is not None:
            self._lease.release("succeeded" if exc_type is None else f"failed: {exc_type.__name__}")

    def _open(self) -> Any | None:
        try:
            return self._db.open_table(self.name)
        except ValueError as e:
            if "not found" in str(e).lower():
                return None
            raise

    # ---------------------------------------------------------------------------------------------------- state
    def state(self) -> StoreState | None:
        table = self._open()
        meta = (table.schema.metadata or {}) if table is not None else {}
        if KEY_META not in meta:
            return None  # absent, or not made by a sync: bulk_load decides whether it may fill it
        tagged = [int(m.group(1)) for t in table.tags.list() if (m := _TAG.match(t))]
        version = max(tagged) if tagged else int(meta[LOADED_META])
        return StoreState(meta[KEY_META].decode(), version)

    def check_schema(self, schema: pa.Schema) -> pa.Schema:
        """The schema the output's batches take into this table: its own, or the existing table's column types."""
        table = self._open()
        if table is None:
            return schema
        target, diff = conformed(schema, table.schema)
        if diff is not None:
            raise SyncError(f"{self.description} exists with an incompatible schema: {diff}")
        return target

    # ----------------------------------------------------------------------------------------------------- load
    def bulk_load(self, record: dict[str, Any], schema: pa.Schema, batches: Iterator[pa.RecordBatch]) -> int:
        existing = self._open()
        if existing is not None and existing.count_rows() > 0:
            raise SyncError(
                f"{self.description} exists with {existing.count_rows():,} rows and no rayembed sync state: "
                "drop it or sync into a new --table"
            )
        meta = {
            FORMAT_META: SYNC_FORMAT.encode(),
            KEY_META: record["output_key"].encode(),
            LOADED_META: str(record["version"]).encode(),
        }
        counted = _Counter(batches)
        reader = pa.RecordBatchReader.from_batches(schema.with_metadata(meta), counted)
        # One commit: the rows and the metadata that records them appear together or not at all (a bulk load killed
        # half-way leaves no table, only unreferenced files). "overwrite" replaces an existing empty table.
        with counted.reraise():
            table = self._db.create_table(self.name, data=reader, mode="create" if existing is None else "overwrite")
        _tag(table, record["version"])  # the metadata already records the version; the tag names its table version
        return counted.rows

    def begin_version(self, record: dict[str, Any], schema: pa.Schema | None) -> None:
        pass  # nothing to prepare: each write below is its own commit, and re-applying a version is idempotent

    def delete(self, ids: Iterator[pa.Array]) -> int:
        table, n, chunk = self._open(), 0, []
        for array in ids:
            for value in array.to_pylist():
                chunk.append(_sql_literal(value))
                if len(chunk) >= DELETE_CHUNK:
                    table.delete(f"id IN ({', '.join(chunk)})")
                    n, chunk = n + len(chunk), []
        if chunk:
            table.delete(f"id IN ({', '.join(chunk)})")
            n += len(chunk)
        return n

    def upsert(self, batches: Iterator[pa.RecordBatch]) -> int:
        table = self._open()
        counted = _Counter(batches)
        first = counted.peek()
        if first is None:
            return 0
        reader = pa.RecordBatchReader.from_batches(first.schema, counted)
        with counted.reraise():
            table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(reader)
        return counted.rows

    def finish_version(self, record: dict[str, Any]) -> None:
        _tag(self._open(), record["version"])

    def build_index(self, kind: str) -> None:
        from lancedb.index import HnswSq

        table = self._open()
        if any("embedding" in (ix.columns or []) for ix in table.list_indices()):
            return
        table.create_index("embedding", config=HnswSq(distance_type="cosine"))


def _tag(table: Any, version: int) -> None:
    """Tag the table's current version ``rayembed-v<version>``, then drop the older rayembed tags (a crash in
    between leaves two; the newer one wins)."""
    tag = f"{TAG_PREFIX}{version:08d}"
    tags = table.tags.list()
    if tag in tags:
        table.tags.update(tag, table.version)
    else:
        table.tags.create(tag, table.version)
    for old in tags:
        if _TAG.match(old) and old != tag:
            table.tags.delete(old)


class _Counter:
    """An iterator of record batches that counts the rows it hands out and can look at the first one. An error of
    the batches (a file that does not fit the table, a storage error) reaches LanceDB's reader in Rust, which turns
    it into a RuntimeError with a traceback in its text: ``reraise`` raises the original instead."""

    def __init__(self, batches: Iterator[pa.RecordBatch]):
        self._it = iter(batches)
        self._head: list[pa.RecordBatch] = []
        self.rows = 0
        self.error: BaseException | None = None

    @contextlib.contextmanager
    def reraise(self) -> Iterator[None]:
        try:
            yield
        except Exception:
            if self.error is not None:
                raise self.error from None
            raise

    def peek(self) -> pa.RecordBatch | None:
        if not self._head:
            nxt = next(self._it, None)
            if nxt is None:
                return None
            self._head.append(nxt)
        return self._head[0]

    def __iter__(self) -> _Counter:
        return self

    def __next__(self) -> pa.RecordBatch:
        try:
            batch = self._head.pop() if self._head else next(self._it)
        except StopIteration:
            raise
        except Exception as e:
            self.error = e
            raise
        self.rows += batch.num_rows
        return batch
