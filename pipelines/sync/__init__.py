"""``rayembed sync``: bring a vector store to a version of an embed output, exactly once.

The store records the output key and the version it holds. The first sync bulk-loads the snapshot; later syncs apply
each later version in order: its deletes, then its upserts, then the recorded version. A store from another output
key, or ahead of the output, is refused. Files stream batch by batch (``ParquetFile.iter_batches``): memory does not
grow with the snapshot.

The rows go in with the store's column types: those of the snapshot's first file for a new table, the existing
table's afterwards. A refresh of an input rewritten by another writer keeps its output key but may type a column
otherwise (large_string for string, int64 for int32, ns timestamps): its files are cast column by column where the
values fit (``base.castable``), and a value that does not fit is a one-line error naming the file and the column.

Stores (``--to``): ``lancedb://<dir or s3://...>`` (pipelines/sync/lance.py) and any libpq URI
``postgresql://...`` (pipelines/sync/postgres.py). Each store implements the small protocol of ``Store`` below.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from operators.errors import ConfigError
from pipelines import testhooks, versions
from pipelines.sync.base import (
    ID_BATCH_ROWS,
    Store,
    StoreState,
    SyncError,
    batch_rows_for,
    data_schema,
    iter_batches,
    iter_ids,
)

log = logging.getLogger("rayembed")

INDEX_KINDS = ("hnsw",)
SCHEMES = {"lancedb": "lancedb://<dir or s3://bucket/dir>", "postgresql": "postgresql://user@host:5432/db"}


@dataclass
class SyncResult:
    store: str
    loaded: int | None = None  # the version bulk-loaded, if any
    applied: list[int] = field(default_factory=list)
    version: int = 0  # the store's version afterwards
    rows: int = 0
    deleted: int = 0
    upserted: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        if self.loaded is not None:
            return (
                f"sync: {self.store}: bulk-loaded version {self.loaded} ({self.rows:,} rows) in {self.seconds:.1f}s; "
                f"store at version {self.version}"
            )
        if not self.applied:
            return f"sync: {self.store}: already at version {self.version}; nothing to apply"
        span = f"{self.applied[0]}" if len(self.applied) == 1 else f"{self.applied[0]}..{self.applied[-1]}"
        return (
            f"sync: {self.store}: applied version{'s' if len(self.applied) > 1 else ''} {span} "
            f"({self.deleted:,} deleted, {self.upserted:,} upserted) in {self.seconds:.1f}s; "
            f"store at version {self.version}"
        )


# --------------------------------------------------------------------------------------------------------- planning


def open_store(to: str, table: str) -> Store:
    """The store for ``--to``; a one-line error for an unknown scheme."""
    scheme = to.split("://", 1)[0].lower() if "://" in to else ""
    if scheme == "lancedb":
        from pipelines.sync.lance import LanceStore

        return LanceStore(to, table)
    if scheme in ("postgresql", "postgres"):
        from pipelines.sync.postgres import PostgresStore

        return PostgresStore(to, table)
    # Only the scheme is echoed: the rest of a URI may hold a password.
    shown = f"{scheme}://..." if scheme else to
    raise ConfigError(f"--to {shown!r}: unknown store scheme; use {' or '.join(SCHEMES.values())}")


def _target(output: str, version: int | None, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    head = versions.latest(output, storage_options)
    if head is None:
        raise ConfigError(f"output {output!r} has no committed version (no _manifest.json): nothing to sync")
    if head.get("kind", "embed") != "embed":
        raise ConfigError(f"output {output!r} is a {head['kind']!r} output; only embed outputs sync to a vector store")
    if version is None or version == head["version"]:
        return head
    if version > head["version"]:
        raise ConfigError(f"--version {version}: output {output!r} holds versions up to {head['version']}")
    return versions.load_version(output, version, storage_options)


def plan(
    store: Store, state: StoreState | None, target: dict[str, Any], available: list[int], requested: bool = False
) -> list[int]:
    """The versions to apply after the store's, in order; [] when it is current. Refusals as one line."""
    if state is None:
        return []
    if state.output_key != target["output_key"]:
        raise SyncError(
            f"{store.description} holds vectors of output key {state.output_key}, this output has key "
            f"{target['output_key']} (another model, dim, instruction or dtype): sync into a new --table"
        )
    if state.version > target["version"]:
        raise SyncError(
            f"{store.description} is at version {state.version}, ahead of "
            + (
                f"the requested --version {target['version']}: a store is never rolled back"
                if requested
                else f"the output's version {target['version']} (was the output restored from a backup?): refusing "
                "to roll the store back; sync into a new --table"
            )
        )
    needed = list(range(state.version + 1, target["version"] + 1))
    missing = [n for n in needed if n not in available]
    if missing:
        raise SyncError(
            f"{store.description} is at version {state.version}, but version {missing[0]}'s record and deltas are "
            "gone from the output (vacuumed?): sync into a new --table, or vacuum with a larger --keep"
        )
    return needed


def sync(
    output: str,
    to: str,
    table: str,
    *,
    version: int | None = None,
    index: str | None = None,
    batch_rows: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> SyncResult:
    """Bring table ``table`` of store ``to`` to ``version`` (default: the latest) of embed output ``output``."""
    if not table:
        raise ConfigError("--table is required: the table to create or update in the store")
    if index is not None and index not in INDEX_KINDS:
        raise ConfigError(f"--index must be one of {', '.join(INDEX_KINDS)}, got {index!r}")
    if batch_rows is not None and batch_rows < 1:
        raise ConfigError(f"--batch-rows must be >= 1, got {batch_rows}")
    target = _target(output, version, storage_options)
    store = open_store(to, table)
    t0 = time.monotonic()
    result = SyncResult(store=store.description)
    with store:
        testhooks.point("sync.locked")
        state = store.state()
        todo = plan(store, state, target, versions.list_versions(output, storage_options), version is not None)
        if state is None:
            _bulk(store, output, target, batch_rows, storage_options, result)
        for n in todo:
            record = versions.load_version(output, n, storage_options)
            _apply(store, output, record, batch_rows, storage_options, result)
        result.version = target["version"] if state is None or todo else state.version
        if index is not None:
            store.build_index(index)
    result.seconds = time.monotonic() - t0
    return result


def _bulk(
    store: Store, output: str, record: dict[str, Any], batch_rows: int | None, so: Any, result: SyncResult
) -> None:
    urls = versions.snapshot_urls(output, record)
    if not urls:
        raise SyncError(f"version {record['version']} of {output!r} has no rows: nothing to create the table from")
    # The first file's schema stands for the snapshot's (reading every footer would cost a request per file); the
    # other files' columns are cast to it where their values fit, and a file that does not fit is a one-line error.
    schema = store.check_schema(data_schema(urls, so))
    batches = iter_batches(urls, so, batch_rows_for(schema, batch_rows), schema)
    result.rows = store.bulk_load(record, schema, batches)
    result.loaded = record["version"]
    log.info("sync: %s: loaded version %d (%d rows)", store.description, record["version"], result.rows)


def _apply(
    store: Store, output: str, record: dict[str, Any], batch_rows: int | None, so: Any, result: SyncResult
) -> None:
    """One version: its deletes, then its upserts, then the recorded version (PG: all in one transaction)."""
    upserts = versions.delta_urls(output, record, "upserts")
    # The store's column types win where the output's values fit them: a refresh of an input rewritten by another
    # writer (large_string for string, int64 for int32) keeps its output key, so its upserts must still apply.
    schema = store.check_schema(data_schema(upserts, so)) if upserts else None
    store.begin_version(record, schema)
    deletes = versions.delta_urls(output, record, "deletes")
    result.deleted += store.delete(iter_ids(deletes, so, batch_rows or ID_BATCH_ROWS))
    testhooks.point("sync.after_deletes")
    if upserts:
        result.upserted += store.upsert(iter_batches(upserts, so, batch_rows_for(schema, batch_rows), schema))
    store.finish_version(record)
    result.applied.append(record["version"])
    log.info("sync: %s: applied version %d", store.description, record["version"])
