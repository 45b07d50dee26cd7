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
import io
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
from pipelines import parts, versions

PASSTHROUGH = ["title", "n", "score", "flag", "published", "tags"]
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
DELETE_BUCKETS = 2  # the match pass's buckets: one deletes file per bucket that has deletes


class VersionedOutput:
    """A chain of versions in the embed job's layout (notes/REFRESH.md): input shards ``shardNN`` (rows sorted by id)
    as parts ``data/<stem>-<offset:012d>-v<version:08d>.parquet`` of ``rows_per_part`` rows; the upserted rows of each
    rewritten part in ``_deltas/<version>/upserts/<stem>-<offset:012d>.parquet``; the deleted ids in ``_deltas/
    <version>/deletes/b<bucket:05d>.parquet``; records with the job's counts, totals and shards map.

    ``delta_parts=False`` writes each version's upserts as one file (``all-000000000000.parquet``), as earlier
    fixtures did: tests/test_versions.py counts the files vacuum removes."""

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
        rows_per_part: int = 1024,
        delta_parts: bool = False,
    ):
        self.output, self.dim, self.dtype, self.id_type = output, dim, dtype, id_type
        self.shards, self.output_key, self.rows_per_part, self.delta_parts = (
            shards,
            output_key,
            rows_per_part,
            delta_parts,
        )
        self.rng = np.random.default_rng(seed)
        self.rows: dict[Any, dict[str, Any]] = {}  # the latest snapshot: id -> row
        self.history: dict[int, dict[Any, dict[str, Any]]] = {}  # version -> its snapshot
        self.shard_entries: dict[str, dict[str, Any]] = {}  # stem -> its entry in the record's shards map
        self.version = 0
        self.schema = pa.schema(
            [
                pa.field("id", pa.int64() if id_type == "int64" else pa.string()),
                pa.field("embedding", pa.list_(pa.float32() if dtype == "float32" else pa.float16(), dim)),
                pa.field("content_hash", pa.binary(16)),
                pa.field("title", pa.string()),
                pa.field("n", pa.int32()),
                pa.field("score", pa.float64()),
                pa.field("flag", pa.bool_()),
                pa.field("published", pa.timestamp("us", tz="UTC")),
                pa.field("tags", pa.list_(pa.string())),
            ],
            metadata={  # what the embed job writes in every part's footer
                b"rayembed.version": b"0.1.0",
                b"rayembed.model": b"fixture",
                b"rayembed.revision": b"",
                b"rayembed.dim": str(dim).encode(),
                b"rayembed.normalized": b"l2",
                b"rayembed.pooling": b"lasttoken",
                b"rayembed.instruction": b"",
                b"rayembed.max_length": b"8192",
                b"rayembed.dtype": dtype.encode(),
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
            "content_hash": hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest(),
            "title": f"title {id_} / {title_rev}",
            "n": None if i % 7 == 0 else i * 3 + title_rev,
            "score": i / 9 + rev,
            "flag": bool((i + rev) % 2),
            "published": EPOCH + dt.timedelta(seconds=i, microseconds=rev),
            "tags": [f"t{i % 3}", f"r{rev}"] if i % 5 else [],
            "_rev": rev,
            "_title_rev": title_rev,
            "_tokens": 6,
        }

    def _table(self, rows: list[dict[str, Any]]) -> pa.Table:
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
        return self._commit(set(range(self.shards)), set(), [], embedded=n)

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
        upserts = {*changed, *passthrough_only, *new}
        touched = {self.shard_of(i) for i in (*upserts, *deleted)}
        return self._commit(touched, upserts, list(deleted), embedded=len({*changed, *new}))

    def _write_shard(self, s: int, n: int, upserts: set[Any]) -> tuple[dict[str, Any], list[dict], list[str]]:
        """Shard ``s``'s parts of version ``n``: its entry in the record, its upserted rows and their delta files."""
        stem = f"shard{s:02d}"
        rows = sorted((r for i, r in self.rows.items() if self.shard_of(i) == s), key=lambda r: r["id"])
        files, ups, rels = [], [], []
        for first in range(0, len(rows), self.rows_per_part):
            part = rows[first : first + self.rows_per_part]
            files.append(self._write(f"data/{stem}-{first:012d}-v{n:08d}.parquet", self._table(part)))
            up = [r for r in part if r["id"] in upserts]
            if up and n > 1 and self.delta_parts:
                rels.append(self._write(f"_deltas/{n:08d}/upserts/{stem}-{first:012d}.parquet", self._table(up)))
            ups += up
        digest = zlib.crc32(repr([(r["id"], r["_rev"], r["_title_rev"]) for r in rows]).encode())
        entry = {
            "shard": f"/input/{stem}.parquet",
            "fingerprint": f"{len(rows) * 100}:{digest}.0",  # the job's is "<size>:<mtime>" of the input file
            "rows": len(rows),
            "errors": 0,
            "tokens": sum(r["_tokens"] for r in rows),
            "files": files,
            "error_files": [],
            "duplicates": 0,
        }
        return entry, ups, rels

    def _commit(self, touched: set[int], upserts: set[Any], deleted: list[Any], embedded: int) -> dict[str, Any]:
        n = self.version + 1
        ups, delta_up = [], []
        for s in sorted(touched):
            self.shard_entries[f"shard{s:02d}"], up, rels = self._write_shard(s, n, upserts)
            ups, delta_up = ups + up, delta_up + rels
        up_dir, del_dir = f"_deltas/{n:08d}/upserts", f"_deltas/{n:08d}/deletes"
        if n > 1 and ups and not self.delta_parts:
            table = self._table(sorted(ups, key=lambda r: r["id"]))
            delta_up.append(self._write(f"{up_dir}/all-000000000000.parquet", table))
        delta_del = []
        if deleted:
            keys = pa.array([str(i) for i in deleted])
            for b in sorted(set(parts.key_buckets(keys, DELETE_BUCKETS).tolist())):
                ids = [i for i, k in zip(deleted, parts.key_buckets(keys, DELETE_BUCKETS)) if k == b]
                rel = f"{del_dir}/b{b:05d}.parquet"
                delta_del.append(self._write(rel, pa.table({"id": pa.array(ids, self.schema.field("id").type)})))
        entries = dict(sorted(self.shard_entries.items()))
        files = sorted(f for e in entries.values() for f in e["files"])
        rows = len(self.rows)
        record = versions.make_record(
            n,
            self.output_key,
            files,
            config={"model": "fixture", "output_dtype": self.dtype, "passthrough": PASSTHROUGH, "id_column": "id"},
            model={
                "source": "fixture",
                "revision": None,
                "config_sha256": "0" * 16,
                "dim": self.dim,
                "family": "fixture",
                "hidden_size": self.dim,
                "pooling": "lasttoken",
            },
            upserts=delta_up,
            deletes=delta_del,
            counts={
                "rows": rows,
                "embedded": embedded,
                "reused": rows - embedded if n > 1 else 0,
                "upserted": rows if n == 1 else len(upserts),
                "deleted": len(deleted),
            },
            totals={
                "shards": len(entries),
                "rows": rows,
                "errors": 0,
                "tokens": sum(e["tokens"] for e in entries.values()),
                "files": len(files),
            },
        )
        record["shards"] = entries
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


def files_urls(output: str, version: int | None = None) -> list[str]:
    """The URLs ``rayembed files OUTPUT [--version N]`` prints."""
    from pipelines import cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["files", output, *(["--version", str(version)] if version is not None else [])])
    assert rc == 0, f"rayembed files {output} exited {rc}"
    return buf.getvalue().split()


def other_writer(schema: pa.Schema) -> pa.Schema:
    """The same columns as another writer types them (polars, pandas 3): large strings and lists, int64, ns."""
    wider = {
        pa.string(): pa.large_string(),
        pa.int32(): pa.int64(),
        pa.list_(pa.string()): pa.large_list(pa.large_string()),
        pa.timestamp("us", tz="UTC"): pa.timestamp("ns", tz="UTC"),
    }
    return pa.schema([pa.field(f.name, wider.get(f.type, f.type), f.nullable) for f in schema], schema.metadata)


def read_snapshot(output: str, version: int | None = None) -> pa.Table:
    """A version's rows read the way a user reads them: the files ``rayembed files`` prints."""
    tables = [pq.read_table(u).replace_schema_metadata(None) for u in files_urls(output, version)]
    # A snapshot's parts may type a column differently (an input rewritten by another writer): promote to one type.
    return pa.concat_tables(tables, promote_options="permissive").sort_by("id") if tables else None


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
        """Every column of every row; the embedding (vector or halfvec) as a list of floats."""
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(self.to, row_factory=dict_row) as conn:
            rows = conn.execute(f"SELECT *, embedding::real[] AS _embedding FROM {table}").fetchall()
        return [{**{k: v for k, v in r.items() if k != "_embedding"}, "embedding": r["_embedding"]} for r in rows]

    def column_types(self, table: str) -> dict[str, str]:
        rows = self.query(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
            "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped",
            (table,),
        )
        return dict(rows)

    def primary_key(self, table: str) -> list[str]:
        rows = self.query(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary",
            (table,),
        )
        return [r[0] for r in rows]

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
    """The store holds exactly the version's snapshot, read through ``rayembed files``."""
    check_rows(target.rows(table), read_snapshot(out, version))


def check_rows(rows: list[dict], snapshot: pa.Table) -> None:
    """``rows`` (a store's, as the targets read them) are exactly the snapshot's: each id once and of the same Python
    type, vectors within 1e-6, the same content hash and pass-through values, and no other column."""
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id is in the store twice"
    expected = {r["id"]: r for r in snapshot.to_pylist()}
    assert sorted(ids) == sorted(expected), (
        f"missing {sorted(set(expected) - set(ids))[:20]}, extra {sorted(set(ids) - set(expected))[:20]}"
    )
    columns = [c for c in snapshot.column_names if c not in ("id", "embedding")]
    for row in rows:
        want = expected[row["id"]]
        assert type(row["id"]) is type(want["id"]), f"id {row['id']!r} comes back as {type(row['id']).__name__}"
        assert set(row) == set(snapshot.column_names), f"the store has columns {sorted(row)}"
        worst = np.abs(np.asarray(row["embedding"], np.float32) - np.asarray(want["embedding"], np.float32)).max()
        assert worst <= 1e-6, f"id {row['id']!r}: vector {worst:.2e} from the snapshot's"
        assert {c: row[c] for c in columns} == {c: want[c] for c in columns}, f"id {row['id']!r}"


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
