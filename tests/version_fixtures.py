"""Versioned embed outputs built without Ray or a model, through pipelines/versions.py (the rayembed.version/1
contract): a backfill, then refreshes with changed, deleted, new and pass-through-only rows.

Rows are spread over ``shards`` by id. A version rewrites only the data files of the shards it touched, under new
names, and shares the others with its parent, as the refresh does; its deltas list exactly the upserted rows and the
deleted ids. ``VersionedOutput.snapshot`` (the expected rows) is kept beside the files for the tests to compare to.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import re
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators import storage
from pipelines import versions

EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
COLUMNS = ["content_hash", "title", "n", "score", "flag", "published", "tags"]  # compared besides id, embedding


class VersionedOutput:
    def __init__(
        self,
        output: str,
        *,
        dim: int = 16,
        dtype: str = "float32",
        id_type: str = "int64",
        shards: int = 4,
        output_key: str = "key-a",
        seed: int = 0,
        rows_per_delta_file: int = 50,
    ):
        self.output, self.dim, self.dtype, self.id_type = output, dim, dtype, id_type
        self.shards, self.output_key, self.rows_per_delta_file = shards, output_key, rows_per_delta_file
        self.rng = np.random.default_rng(seed)
        self.rows: dict[Any, dict[str, Any]] = {}  # the latest snapshot: id -> row
        self.history: dict[int, dict[Any, dict[str, Any]]] = {}  # version -> its snapshot
        self.shard_files: dict[int, list[str]] = {}
        self.version = 0
        self.schema = pa.schema(
            [
                pa.field("id", pa.int64() if id_type == "int64" else pa.string(), nullable=False),
                pa.field("embedding", pa.list_(pa.float32() if dtype == "float32" else pa.float16(), dim)),
                pa.field("content_hash", pa.binary(16)),
                pa.field("title", pa.string()),
                pa.field("n", pa.int32()),
                pa.field("score", pa.float64()),
                pa.field("flag", pa.bool_()),
                pa.field("published", pa.timestamp("us", tz="UTC")),
                pa.field("tags", pa.list_(pa.string())),
            ],
            metadata={
                b"rayembed.model": b"fixture",
                b"rayembed.dim": str(dim).encode(),
                b"rayembed.dtype": dtype.encode(),
                b"rayembed.output_key": output_key.encode(),
            },
        )

    # ------------------------------------------------------------------------------------------------------ rows
    def make_id(self, i: int) -> Any:
        return i if self.id_type == "int64" else f"doc'{i}"  # a quote in every string id: SQL literals must cope

    def shard_of(self, id_: Any) -> int:
        return (id_ if isinstance(id_, int) else zlib.crc32(id_.encode())) % self.shards

    def _vector(self) -> list[float]:
        v = self.rng.standard_normal(self.dim).astype(np.float32)
        v /= np.linalg.norm(v)
        return v.astype(np.float16 if self.dtype == "float16" else np.float32).astype(np.float32).tolist()

    def _row(self, id_: Any, rev: int, title_rev: int = 0) -> dict[str, Any]:
        i = int(id_) if isinstance(id_, int) else int(id_.split("'")[1])
        text = f"text of {id_} revision {rev}"
        return {
            "id": id_,
            "embedding": self._vector(),
            "content_hash": hashlib.md5(text.encode()).digest(),
            "title": f"title {id_} / {title_rev}",
            "n": None if i % 7 == 0 else i * 3 + title_rev,
            "score": i / 9 + rev,
            "flag": bool((i + rev) % 2),
            "published": EPOCH + dt.timedelta(seconds=i, microseconds=rev),
            "tags": [f"t{i % 3}", f"r{rev}"] if i % 5 else [],
            "_rev": rev,
            "_title_rev": title_rev,
        }

    def _table(self, rows: list[dict[str, Any]]) -> pa.Table:
        rows = sorted(rows, key=lambda r: r["id"])
        return pa.Table.from_pylist([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], self.schema)

    def _write(self, rel: str, table: pa.Table) -> str:
        with storage.atomic_write(storage.join(self.output, rel)) as f:
            pq.write_table(table, f)
        return rel

    # --------------------------------------------------------------------------------------------------- versions
    def backfill(self, n: int) -> dict[str, Any]:
        assert self.version == 0
        for i in range(n):
            id_ = self.make_id(i)
            self.rows[id_] = self._row(id_, 0)
        return self._commit(set(range(self.shards)), [], [])

    def refresh(
        self,
        *,
        changed: list[Any] = (),
        deleted: list[Any] = (),
        new: list[Any] = (),
        passthrough_only: list[Any] = (),
    ) -> dict[str, Any]:
        """A version in which the given ids' texts changed (new vector), disappeared, appeared, or only their
        pass-through columns changed (same vector and content hash)."""
        touched, upserts = set(), []
        for id_ in changed:
            old = self.rows[id_]
            self.rows[id_] = self._row(id_, old["_rev"] + 1, old["_title_rev"])
        for id_ in passthrough_only:
            old = self.rows[id_]
            title_rev = old["_title_rev"] + 1
            self.rows[id_] = {
                **old,
                "title": f"title {id_} / {title_rev}",
                "n": (old["n"] or 0) + 1,
                "_title_rev": title_rev,
            }
        for id_ in new:
            assert id_ not in self.rows
            self.rows[id_] = self._row(id_, 0)
        for id_ in deleted:
            del self.rows[id_]
        for id_ in (*changed, *passthrough_only, *new):
            upserts.append(self.rows[id_])
        touched = {self.shard_of(i) for i in (*changed, *passthrough_only, *new, *deleted)}
        return self._commit(touched, upserts, list(deleted))

    def _commit(self, touched: set[int], upserts: list[dict[str, Any]], deleted: list[Any]) -> dict[str, Any]:
        n = self.version + 1
        for s in sorted(touched):
            rows = [r for i, r in self.rows.items() if self.shard_of(i) == s]
            self.shard_files[s] = (
                [self._write(f"data/shard{s:02d}-v{n:04d}-000000000000.parquet", self._table(rows))] if rows else []
            )
        delta_up, delta_del = [], []
        if n > 1:
            up_dir, del_dir = f"_deltas/{n:08d}/upserts", f"_deltas/{n:08d}/deletes"
            step = self.rows_per_delta_file
            for k in range(0, len(upserts), step):
                delta_up.append(
                    self._write(f"{up_dir}/part-{k // step:06d}.parquet", self._table(upserts[k : k + step]))
                )
            if deleted:
                ids = pa.table({"id": pa.array(sorted(deleted), self.schema.field("id").type)})
                delta_del.append(self._write(f"{del_dir}/part-000000.parquet", ids))
        files = sorted(f for fs in self.shard_files.values() for f in fs)
        record = versions.make_record(
            n,
            self.output_key,
            files,
            config={"fixture": True},
            model={"source": "fixture", "dim": self.dim, "dtype": self.dtype},
            upserts=delta_up,
            deletes=delta_del,
            counts={"rows": len(self.rows), "upserted": len(upserts), "deleted": len(deleted)},
            totals={"rows": len(self.rows), "files": len(files)},
        )
        versions.commit_version(self.output, record)
        self.version = n
        self.history[n] = dict(self.rows)
        return record

    # ------------------------------------------------------------------------------------------------ expectations
    def snapshot(self, version: int | None = None) -> dict[Any, dict[str, Any]]:
        """The expected rows of a version (default: the latest), without the fixture's bookkeeping keys."""
        rows = self.history[version or self.version]
        return {i: {k: v for k, v in r.items() if not k.startswith("_")} for i, r in rows.items()}

    def ids(self) -> list[Any]:
        return sorted(self.rows)


def read_snapshot(output: str, version: int | None = None) -> pa.Table:
    """A version's rows read the way a user reads them: through the record's files (``rayembed files``)."""
    record = versions.latest(output) if version is None else versions.load_version(output, version)
    tables = [pq.read_table(u) for u in versions.snapshot_urls(output, record)]
    return pa.concat_tables(tables).sort_by("id") if tables else None


# ---------------------------------------------------------------------------------------- stores, as tests see them


class LanceTarget:
    kind = "lance"

    def __init__(self, root: str):
        self.dir = root
        self.to = f"lancedb://{root}"

    def _table(self, table: str):
        import lancedb

        return lancedb.connect(self.dir).open_table(table)

    def rows(self, table: str) -> list[dict]:
        return self._table(table).to_arrow().to_pylist()

    def marker(self, table: str):
        """Anything that moves when the table is written: its version and its tags."""
        t = self._table(table)
        return t.version, sorted(t.tags.list())

    def make_incompatible(self, table: str) -> None:
        import lancedb
        import pyarrow as pa

        schema = pa.schema([pa.field("id", pa.int64()), pa.field("embedding", pa.list_(pa.float32(), 8))])
        lancedb.connect(self.dir).create_table(table, schema=schema)

    def has_index(self, table: str) -> bool:
        return any("embedding" in ix.columns for ix in self._table(table).list_indices())

    def forget_state(self, table: str) -> None:
        """Rewrite the table with the same rows and no rayembed metadata (and no rayembed tag)."""
        t = self._table(table)
        for tag in t.tags.list():
            t.tags.delete(tag)
        rows = t.to_arrow()
        t.add(rows.replace_schema_metadata(None), mode="overwrite")


class PgTarget:
    kind = "pg"

    def __init__(self, uri: str):
        self.to = uri

    def query(self, q: str, params=()):
        import psycopg

        with psycopg.connect(self.to) as conn:
            cur = conn.execute(q, params)
            return cur.fetchall() if cur.description else None

    def rows(self, table: str) -> list[dict]:
        import psycopg
        from psycopg.rows import dict_row

        cols = ", ".join(COLUMNS)
        with psycopg.connect(self.to, row_factory=dict_row) as conn:
            return conn.execute(f"SELECT id, embedding::real[] AS embedding, {cols} FROM {table}").fetchall()

    def marker(self, table: str):
        """The state row and the newest row version (xmin): any write moves one of them."""
        state = self.query("SELECT version, updated_at FROM rayembed_sync_state WHERE table_name = %s", (table,))
        return state, self.query(f"SELECT max(xmin::text::bigint), count(*) FROM {table}")

    def make_incompatible(self, table: str) -> None:
        self.query(f"CREATE TABLE {table} (id bigint PRIMARY KEY, embedding vector(8))")

    def forget_state(self, table: str) -> None:
        self.query("DELETE FROM rayembed_sync_state WHERE table_name = %s", (table,))

    def has_index(self, table: str) -> bool:
        rows = self.query("SELECT indexdef FROM pg_indexes WHERE tablename = %s", (table,))
        return any("USING hnsw (embedding vector_cosine_ops)" in r[0] for r in rows)


def assert_matches(target, table: str, out: str, version: int | None = None) -> None:
    """The store holds exactly the version's snapshot (read through its record): each id once, vectors within
    1e-6, the same content hash and pass-through values."""
    rows = target.rows(table)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id is in the store twice"
    expected = {r["id"]: r for r in read_snapshot(out, version).to_pylist()}
    assert sorted(ids) == sorted(expected)
    for row in rows:
        want = expected[row["id"]]
        assert np.abs(np.asarray(row["embedding"]) - np.asarray(want["embedding"])).max() <= 1e-6
        assert {c: row[c] for c in COLUMNS} == {c: want[c] for c in COLUMNS}


@contextlib.contextmanager
def start_pg() -> Iterator[Any]:
    """PostgreSQL 16 + pgvector 0.6 from pgserver, running as its own user. Not under pytest's tmp_path: pytest
    resets its base directory to 0700 at every session start (other pytest runs on this machine too), which would
    lock the server out of its data directory."""
    import pgserver

    base = tempfile.mkdtemp(prefix="rayembed-pg-")
    try:
        with pgserver.get_server(os.path.join(base, "pgdata"), cleanup_mode="stop") as srv:
            yield srv
    finally:
        shutil.rmtree(base, ignore_errors=True)


def add_password_role(server: Any, user: str, password: str) -> str:
    """A role that must log in with ``password`` over the server's socket, owning schema ``pwschema`` (where its
    state table goes); pgvector is created by the superuser, as an administrator would. Returns the socket dir."""
    import psycopg

    hba = os.path.join(str(server.pgdata), "pg_hba.conf")
    with open(hba) as f:
        rules = f.read()
    with open(hba, "w") as f:
        f.write(f"local all {user} scram-sha-256\n" + rules)
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'")
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(f"CREATE SCHEMA pwschema AUTHORIZATION {user}")
        conn.execute("SELECT pg_reload_conf()")
    host = re.search(r"host=([^&]+)", server.get_uri()).group(1)
    for _ in range(50):  # the reload is asynchronous: wait until a wrong password is refused
        try:
            psycopg.connect(f"postgresql://{user}:wrong@/postgres?host={host}").close()
        except psycopg.OperationalError:
            break
        time.sleep(0.1)
    psycopg.connect(f"postgresql://{user}:{password}@/postgres?host={host}").close()
    return host
