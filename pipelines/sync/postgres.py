"""PostgreSQL + pgvector as a sync target: ``--to`` any libpq URI (``postgresql://user@host:5432/db?sslmode=...``).

The table: ``id`` (the input's id type) as primary key, ``embedding vector(dim)`` (``halfvec(dim)`` for a float16
output on pgvector >= 0.7), ``content_hash bytea`` and the pass-through columns with mapped types. The state table
``rayembed_sync_state`` (same schema) records, per table, the output key and the version it holds.

Rows travel by binary ``COPY`` into a temporary staging table, then ``INSERT ... ON CONFLICT (id) DO UPDATE``. The
bulk load (with the table's creation), and each later version's deletes, upserts and version bump, are one
transaction each: a sync killed anywhere leaves the old version or the new one. One sync per table at a time: a
session advisory lock. Credentials come from the URI, ``PGPASSWORD`` or ``~/.pgpass``; no message shows the password.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from operators.errors import ConfigError
from pipelines.sync import pgtypes
from pipelines.sync.base import StoreState, SyncError

STATE_TABLE = "rayembed_sync_state"
CONNECT_TIMEOUT_S = 10  # libpq waits forever by default; an unreachable host must fail in seconds
LOCK_GRACE_S = 5.0  # how long a sync waits for another one's lock before refusing


def redact(uri: str) -> str:
    """The URI with any password replaced by ***."""
    uri = re.sub(r"(://[^/?#@:]*:)[^@/?#]+@", r"\1***@", uri)
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", uri)


def _secrets(uri: str) -> list[str]:
    parts = urllib.parse.urlsplit(uri)
    found = [parts.password, os.environ.get("PGPASSWORD")]
    found += urllib.parse.parse_qs(parts.query).get("password", [])
    return [s for s in found if s]


def _sqlerrors(what: str):
    """Turn a psycopg error inside the method into one line naming the step, with every secret scrubbed."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(self: PostgresStore, *args: Any, **kwargs: Any) -> Any:
            import psycopg

            try:
                return fn(self, *args, **kwargs)
            except psycopg.Error as e:
                raise SyncError(f"{self.description}: {what} failed: {self.scrub(e)}") from None

        return inner

    return wrap


class PostgresStore:
    def __init__(self, to: str, table: str):
        parts = table.split(".")
        if len(parts) > 2 or not all(parts):
            raise ConfigError(f"--table {table!r}: give NAME or SCHEMA.NAME")
        self.uri = to
        self.schema_name = parts[0] if len(parts) == 2 else None
        self.name = parts[-1]
        self.qualified = table
        self.description = f"PostgreSQL table {table!r} at {redact(to)}"
        self._secrets = _secrets(to)
        self.conn: Any = None
        self.vec_type = "vector"
        self.pgvector: tuple[int, ...] = (0,)
        self._cols: list[pgtypes.PgColumn] | None = None

    def scrub(self, e: BaseException) -> str:
        msg = " ".join(str(e).split()) or type(e).__name__
        for s in self._secrets:
            msg = msg.replace(s, "***")
        return msg

    def _ident(self, name: str) -> Any:
        from psycopg import sql

        return sql.Identifier(self.schema_name, name) if self.schema_name else sql.Identifier(name)

    # ------------------------------------------------------------------------------------------------ connection
    def __enter__(self) -> PostgresStore:
        import psycopg

        kwargs: dict[str, Any] = {"application_name": "rayembed-sync"}
        if "connect_timeout" not in self.uri:
            kwargs["connect_timeout"] = CONNECT_TIMEOUT_S
        try:
            self.conn = psycopg.connect(self.uri, **kwargs)
        except psycopg.Error as e:
            raise SyncError(f"cannot connect to PostgreSQL at {redact(self.uri)}: {self.scrub(e)}") from None
        try:
            self._setup()
            self._lock()
        except BaseException:
            self.conn.close()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.conn is not None:
            self.conn.rollback()  # an unfinished version's transaction; the advisory lock goes with the session
            self.conn.close()

    @_sqlerrors("checking pgvector")
    def _setup(self) -> None:
        from psycopg.types import TypeInfo

        row = self.conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        if row is None:
            try:
                self.conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                self.conn.commit()
            except Exception as e:
                raise SyncError(
                    f"{self.description}: pgvector is not installed in this database and CREATE EXTENSION vector "
                    f"failed ({self.scrub(e)}); ask an administrator to install it"
                ) from None
            row = self.conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        self.pgvector = tuple(int(p) for p in re.findall(r"\d+", row[0])[:3])
        for name in ("vector", "halfvec") if self.pgvector >= (0, 7) else ("vector",):
            info = TypeInfo.fetch(self.conn, name)
            if info is not None:
                info.register(self.conn)  # COPY's set_types finds the type by name
                self.conn.adapters.register_dumper(None, pgtypes.vector_dumper(info.oid))
        self.conn.commit()

    @_sqlerrors("taking the sync lock")
    def _lock(self) -> None:
        key = self.conn.execute("SELECT hashtextextended(%s, 0)", (f"rayembed.sync:{self._regname()}",)).fetchone()[0]
        # A sync killed a moment ago holds the lock until its backend notices the closed connection: a rerun right
        # after the kill (a restarted job) waits that long rather than being refused.
        deadline = time.monotonic() + LOCK_GRACE_S
        while True:
            if self.conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
                self.conn.commit()
                return
            self.conn.commit()
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        holder = self.conn.execute(
            "SELECT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.classid::bigint = %s "
            "AND l.objid::bigint = %s LIMIT 1",
            ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF),
        ).fetchone()
        who = f"backend pid {holder[0]} ({holder[1] or 'no application name'})" if holder else "another session"
        raise SyncError(f"{self.description} is being synced by {who}: one sync at a time per table")

    def _regname(self) -> str:
        schema = self.schema_name or self.conn.execute("SELECT current_schema()").fetchone()[0]
        return f"{schema}.{self.name}"

    # ----------------------------------------------------------------------------------------------------- state
    def _reg(self, name: str) -> str:
        """The quoted, schema-qualified name, for ``to_regclass`` and ``::regclass``."""
        return self._ident(name).as_string(self.conn)

    def _exists(self, name: str) -> bool:
        return self.conn.execute("SELECT to_regclass(%s)", (self._reg(name),)).fetchone()[0] is not None

    @_sqlerrors("reading the sync state")
    def state(self) -> StoreState | None:
        from psycopg import sql

        try:
            if not (self._exists(STATE_TABLE) and self._exists(self.name)):
                return None
            row = self.conn.execute(
                sql.SQL("SELECT output_key, version FROM {} WHERE table_name = %s").format(self._ident(STATE_TABLE)),
                (self.name,),
            ).fetchone()
            return None if row is None else StoreState(row[0], int(row[1]))
        finally:
            self.conn.commit()

    def _table_columns(self) -> dict[str, tuple[str, bool, bool]]:
        """name -> (format_type, not null, has default) of the existing table."""
        rows = self.conn.execute(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.atthasdef FROM pg_attribute a "
            "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped",
            (self._reg(self.name),),
        ).fetchall()
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    @_sqlerrors("checking the table")
    def check_schema(self, schema: pa.Schema) -> pa.Schema:
        """The schema the output's batches take into this table: its own, or with the existing table's numeric
        column types where a safe cast takes the output's values there (an input rewritten with other int widths)."""
        dim = schema.field("embedding").type.list_size
        half_ok = self.pgvector >= (0, 7) and schema.field("embedding").type.value_type == pa.float16()
        try:
            if not self._exists(self.name):
                self.vec_type = "halfvec" if half_ok else "vector"
                self._cols = pgtypes.columns_for(schema, self.vec_type)
                return schema
            have = self._table_columns()
            emb = have.get("embedding", ("",))[0]
            self.vec_type = "halfvec" if emb.startswith("halfvec(") else "vector"
            schema = pgtypes.conformed(schema, {name: t[0] for name, t in have.items()})
            self._cols = pgtypes.columns_for(schema, self.vec_type)
            diff = _diff(self._cols, have) or self._pk_diff()
        finally:
            self.conn.commit()
        if diff:
            raise SyncError(f"{self.description} exists with an incompatible schema: {diff} (dim {dim})")
        return schema

    def _pk_diff(self) -> str | None:
        rows = self.conn.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND (i.indisprimary OR i.indisunique) "
            "AND i.indnatts = 1",
            (self._reg(self.name),),
        ).fetchall()
        return None if any(r[0] == "id" for r in rows) else "column 'id' is not its primary key"

    # ------------------------------------------------------------------------------------------------------ load
    def _create(self) -> None:
        from psycopg import sql

        cols = [sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.pg_type)) for c in self._cols]
        self.conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY (id))").format(
                self._ident(self.name), sql.SQL(", ").join(cols)
            )
        )
        self.conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (table_name text PRIMARY KEY, output_key text NOT NULL, "
                "version bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(self._ident(STATE_TABLE))
        )

    def _stage(self) -> None:
        from psycopg import sql

        self.conn.execute(
            sql.SQL("CREATE TEMP TABLE rayembed_stage (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP").format(
                self._ident(self.name)
            )
        )

    def _copy(self, table: str, cols: list[pgtypes.PgColumn], batches: Iterator[pa.RecordBatch]) -> int:
        from psycopg import sql

        names = sql.SQL(", ").join(sql.Identifier(c.name) for c in cols)
        n = 0
        with (
            self.conn.cursor() as cur,
            cur.copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(sql.Identifier(table), names)) as copy,
        ):
            copy.set_types([c.copy_type for c in cols])
            for batch in batches:
                for row in pgtypes.rows(batch, cols):
                    copy.write_row(row)
                n += batch.num_rows
        return n

    def _merge_stage(self) -> None:
        from psycopg import sql

        names = [sql.Identifier(c.name) for c in self._cols]
        sets = [sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(c.name), sql.Identifier(c.name)) for c in self._cols]
        sets = [s for s, c in zip(sets, self._cols) if c.name != "id"]
        self.conn.execute(
            sql.SQL("INSERT INTO {t} ({c}) SELECT {c} FROM rayembed_stage ON CONFLICT (id) DO UPDATE SET {s}").format(
                t=self._ident(self.name), c=sql.SQL(", ").join(names), s=sql.SQL(", ").join(sets)
            )
        )

    def _record(self, version: int, output_key: str) -> None:
        from psycopg import sql

        self.conn.execute(
            sql.SQL(
                "INSERT INTO {} (table_name, output_key, version) VALUES (%s, %s, %s) ON CONFLICT (table_name) "
                "DO UPDATE SET output_key = EXCLUDED.output_key, version = EXCLUDED.version, updated_at = now()"
            ).format(self._ident(STATE_TABLE)),
            (self.name, output_key, version),
        )

    @_sqlerrors("the bulk load")
    def bulk_load(self, record: dict[str, Any], schema: pa.Schema, batches: Iterator[pa.RecordBatch]) -> int:
        from psycopg import sql

        self._create()
        if self.conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(self._ident(self.name))).fetchone()[0]:
            self.conn.rollback()
            raise SyncError(
                f"{self.description} exists with rows and no rayembed sync state: drop it or use a new --table"
            )
        self._stage()
        n = self._copy("rayembed_stage", self._cols, batches)
        self._merge_stage()
        self._record(record["version"], record["output_key"])
        self.conn.commit()
        return n

    @_sqlerrors("starting a version")
    def begin_version(self, record: dict[str, Any], schema: pa.Schema | None) -> None:
        from psycopg import sql

        # The row lock holds the version bump to this transaction even if the advisory lock was bypassed.
        row = self.conn.execute(
            sql.SQL("SELECT version FROM {} WHERE table_name = %s FOR UPDATE").format(self._ident(STATE_TABLE)),
            (self.name,),
        ).fetchone()
        if row is None or int(row[0]) != record["version"] - 1:
            raise SyncError(f"{self.description} moved under this sync (now at {row and row[0]}); run it again")

    @_sqlerrors("applying deletes")
    def delete(self, ids: Iterator[pa.Array]) -> int:
        from psycopg import sql

        ids = iter(ids)
        first = next(ids, None)
        if first is None:
            return 0
        id_col = pgtypes.column_for(pa.field("id", first.type))  # the delete files' own id type
        self.conn.execute(sql.SQL(f"CREATE TEMP TABLE rayembed_stage_deletes (id {id_col.pg_type}) ON COMMIT DROP"))
        batches = (pa.record_batch([a], names=["id"]) for a in itertools.chain([first], ids))
        n = self._copy("rayembed_stage_deletes", [id_col], batches)
        self.conn.execute(
            sql.SQL("DELETE FROM {} t USING rayembed_stage_deletes d WHERE t.id = d.id").format(self._ident(self.name))
        )
        return n

    @_sqlerrors("applying upserts")
    def upsert(self, batches: Iterator[pa.RecordBatch]) -> int:
        self._stage()
        n = self._copy("rayembed_stage", self._cols, batches)
        self._merge_stage()
        return n

    @_sqlerrors("committing the version")
    def finish_version(self, record: dict[str, Any]) -> None:
        self._record(record["version"], record["output_key"])
        self.conn.commit()

    @_sqlerrors("building the HNSW index")
    def build_index(self, kind: str) -> None:
        from psycopg import sql

        ops = "halfvec_cosine_ops" if self.vec_type == "halfvec" else "vector_cosine_ops"
        index = sql.Identifier(f"{self.name}_embedding_hnsw"[:63])
        self.conn.execute(
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING hnsw (embedding {})").format(
                index, self._ident(self.name), sql.SQL(ops)
            )
        )
        self.conn.commit()


def _diff(cols: list[pgtypes.PgColumn], have: dict[str, tuple[str, bool, bool]]) -> str | None:
    for c in cols:
        if c.name not in have:
            return f"the table has no column {c.name!r}"
        if have[c.name][0] != c.pg_type:
            return f"column {c.name!r} is {have[c.name][0]} in the table, the output needs {c.pg_type}"
    wanted = {c.name for c in cols}
    for name, (_t, notnull, hasdef) in have.items():
        if name not in wanted and notnull and not hasdef:
            return f"column {name!r} is NOT NULL without a default, and the output has no such column"
    return None
