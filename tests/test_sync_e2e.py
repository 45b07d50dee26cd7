"""`rayembed sync` on real embed outputs: the embed job (a real local Ray, the random-weight Qwen3 of conftest.py)
writes the versions, `rayembed sync` loads them into LanceDB and into PostgreSQL + pgvector (pgserver).

Each store must hold exactly the snapshot read through `rayembed files` (the same ids once each and of the same
type, vectors within 1e-6, the same content hashes and pass-through values), anchored to the input as well (ids,
pass-through values, blake2b-16 of the texts). Two chains of versions, each step a module fixture that depends on the
one before and keeps what the stores held right after it (so the tests read the same whatever their order):

- int64 ids, float32: v1 backfill (3 shards x 8 docs) -> sync tables "main" and "lag" -> v2 (changed texts, deleted
  docs, new docs, pass-through-only changes) -> sync "main", then again (nothing applied; LanceDB: the table version
  does not move) -> v3 (a deleted id comes back, a new one goes, a changed text changes again, ...) -> sync "lag",
  which applies 2 and 3 in one sync, and "main" (3 only).
- string ids with quotes, float16 vectors: v1 backfill (2 shards x 8 docs) -> sync -> v2 -> sync.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import cli, versions
from tests.version_fixtures import LanceTarget, PgTarget, check_rows, other_writer, read_snapshot, start_pg

PASSTHROUGH = ("lang", "score", "n", "tags", "published")
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
KINDS = ("lance", "pg")
TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "北京是中华人民共和国的首都。",
    "def add(a, b):\n    return a + b\n",
)


def _schema(id_type: pa.DataType) -> pa.Schema:
    return pa.schema(
        [
            ("id", id_type),
            ("text", pa.string()),
            ("lang", pa.string()),
            ("score", pa.float64()),
            ("n", pa.int32()),
            ("tags", pa.list_(pa.string())),
            ("published", pa.timestamp("us", tz="UTC")),
        ]
    )


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue().strip(), err.getvalue().strip()


# ---------------------------------------------------------------------------------------------------------- corpus


class Corpus:
    """Input shards (stem -> docs) under ``<root>/in``, embedded into ``<root>/out``; ``docs[v]`` is version v's
    input as id -> doc."""

    def __init__(self, root: str, model: str, *, string_ids: bool = False, dtype: str = "float32"):
        self.inp, self.out, self.model = os.path.join(root, "in"), os.path.join(root, "out"), model
        self.string_ids, self.dtype = string_ids, dtype
        self.shards: dict[str, list[dict[str, Any]]] = {}
        self.docs: dict[int, dict[Any, dict[str, Any]]] = {}
        self.records: dict[int, dict[str, Any]] = {}
        self.schema = _schema(pa.string() if string_ids else pa.int64())
        self.writers: dict[str, pa.Schema] = {}  # stem -> the schema its input file is written with, if not the usual

    def id(self, i: int) -> Any:
        return f"doc'{i}" if self.string_ids else i  # a quote in every string id: SQL literals must cope

    def doc(self, i: int, rev: int = 0, pt: int = 0) -> dict[str, Any]:
        """Doc ``i`` with text revision ``rev`` and pass-through revision ``pt``."""
        return {
            "id": self.id(i),
            "text": f"doc {i} rev {rev}: {TEXTS[i % 3]}",
            "lang": ("en", "zh", "code")[i % 3],
            "score": i / 7 + pt,
            "n": None if i % 5 == 0 else i * 3 + pt,
            "tags": [f"t{i % 3}", f"p{pt}"] if i % 4 else [],
            "published": EPOCH + dt.timedelta(seconds=i, microseconds=pt),
        }

    def find(self, id_: Any) -> tuple[str, int]:
        for stem, docs in self.shards.items():
            for k, d in enumerate(docs):
                if d["id"] == id_:
                    return stem, k
        raise KeyError(id_)

    def write(self, stems: list[str]) -> None:
        """Rewrite only these shards: the others keep their fingerprints (and their committed files)."""
        os.makedirs(self.inp, exist_ok=True)
        for stem in stems:
            table = pa.Table.from_pylist(self.shards[stem], self.writers.get(stem, self.schema))
            pq.write_table(table, os.path.join(self.inp, f"{stem}.parquet"))

    def embed(self) -> dict[str, Any]:
        argv = ["embed", "--input", self.inp, "--output", self.out, "--model", self.model]
        argv += [
            "--passthrough",
            ",".join(PASSTHROUGH),
            "--rows-per-block",
            "4",
            "--part-rows",
            "4",
            "--output-dtype",
            self.dtype,
            "-q",
        ]
        rc, stdout, err = _cli(argv)
        assert rc == 0, f"embed exited {rc}: {err[-3000:]}"
        record = versions.latest(self.out)
        assert f"version {record['version']}: " in stdout, stdout
        self.records[record["version"]] = record
        self.docs[record["version"]] = {d["id"]: d for docs in self.shards.values() for d in docs}
        return record

    def backfill(self, shards: int, per_shard: int) -> dict[str, Any]:
        self.shards = {f"s{k}": [self.doc(k * per_shard + j) for j in range(per_shard)] for k in range(shards)}
        self.write(list(self.shards))
        return self.embed()

    def refresh(self, *, changed=(), deleted=(), new=(), passthrough_only=()) -> dict[str, Any]:
        """Texts changed (rev + 1), docs deleted, docs new (appended to shard ``stem``: ``new`` holds (i, stem)),
        pass-through values changed with the same text; then the same embed command."""
        touched = set()
        for i in changed:
            stem, k = self.find(self.id(i))
            old = self.shards[stem][k]
            rev = int(re.match(r"doc \d+ rev (\d+)", old["text"]).group(1))
            self.shards[stem][k] = {**self.doc(i, rev + 1), **{c: old[c] for c in PASSTHROUGH}}
            touched.add(stem)
        for i in passthrough_only:
            stem, k = self.find(self.id(i))
            old = self.shards[stem][k]
            pt = round(old["score"] - i / 7) + 1
            self.shards[stem][k] = {**self.doc(i, 0, pt), "text": old["text"]}
            touched.add(stem)
        for i in deleted:
            stem, k = self.find(self.id(i))
            del self.shards[stem][k]
            touched.add(stem)
        for i, stem in new:
            self.shards[stem].append(self.doc(i))
            touched.add(stem)
        self.write(sorted(touched))
        return self.embed()


# ---------------------------------------------------------------------------------------------------------- stores


@dataclass
class Synced:
    """One ``rayembed sync`` CLI call and what its table held right after it."""

    rc: int
    line: str
    err: str
    rows: list[dict] = field(default_factory=list)
    marker: Any = None


def _sync(target, out: str, table: str) -> Synced:
    rc, line, err = _cli(["sync", out, "--to", target.to, "--table", table])
    if rc != 0:
        return Synced(rc, line, err)
    return Synced(rc, line, err, target.rows(table), target.marker(table))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    with start_pg() as srv:
        yield {"lance": LanceTarget(str(tmp_path_factory.mktemp("lancedb"))), "pg": PgTarget(srv.get_uri())}


def _check(s: Synced, corpus: Corpus, version: int) -> None:
    """The store's rows are the snapshot's (``rayembed files``), and the snapshot is the input's."""
    assert s.rc == 0, s.err
    snap = read_snapshot(corpus.out, version)
    check_rows(s.rows, snap)
    docs = corpus.docs[version]
    assert sorted(r["id"] for r in s.rows) == sorted(docs)
    for r in s.rows:
        d = docs[r["id"]]
        assert r["content_hash"] == hashlib.blake2b(d["text"].encode(), digest_size=16).digest()
        assert {c: r[c] for c in PASSTHROUGH} == {c: d[c] for c in PASSTHROUGH}, f"id {r['id']!r}"


def _vectors(s: Synced) -> dict[Any, np.ndarray]:
    return {r["id"]: np.asarray(r["embedding"], np.float32) for r in s.rows}


def _applied(record: dict[str, Any], *more: dict[str, Any]) -> str:
    """The sync line's middle for applying these versions: the counts come from the records."""
    recs = [record, *more]
    span = str(recs[0]["version"]) if not more else f"{recs[0]['version']}..{recs[-1]['version']}"
    deleted, upserted = (sum(r["counts"][k] for r in recs) for k in ("deleted", "upserted"))
    return f": applied version{'s' if more else ''} {span} ({deleted:,} deleted, {upserted:,} upserted) in "


# ------------------------------------------------------------------------------------------- the int64 / float32 chain


@pytest.fixture(scope="module")
def chain(tmp_path_factory, qwen_model_dir, ray_local) -> Corpus:
    return Corpus(str(tmp_path_factory.mktemp("sync-e2e-int")), qwen_model_dir)


@pytest.fixture(scope="module")
def v1(chain, stores) -> dict[str, dict[str, Synced]]:
    chain.backfill(3, 8)
    return {table: {k: _sync(t, chain.out, table) for k, t in stores.items()} for table in ("main", "lag")}


@pytest.fixture(scope="module")
def v2(v1, chain, stores) -> dict[str, Synced]:
    chain.refresh(changed=[1, 9], deleted=[2, 17], new=[(24, "s0"), (25, "s2")], passthrough_only=[3, 18])
    synced = {k: _sync(t, chain.out, "main") for k, t in stores.items()}
    again = {f"{k}-again": _sync(t, chain.out, "main") for k, t in stores.items()}
    return {**synced, **again}


@pytest.fixture(scope="module")
def v3(v2, chain, stores) -> dict[str, Synced]:
    # 2 (deleted in v2) comes back, 24 (new in v2) goes, 1 (changed in v2) changes again, 9 (changed in v2) changes
    # its pass-through values only, 10 goes: applied out of order, versions 2 and 3 would leave other rows. And s1
    # comes from another writer now (large_string, int64, ns): the same output key, other column types in its parts.
    chain.writers["s1"] = other_writer(chain.schema)
    chain.refresh(changed=[1], deleted=[24, 10], new=[(2, "s1")], passthrough_only=[9])
    lag = {f"{k}-lag": _sync(t, chain.out, "lag") for k, t in stores.items()}
    main = {k: _sync(t, chain.out, "main") for k, t in stores.items()}
    fresh = {f"{k}-fresh": _sync(t, chain.out, "fresh") for k, t in stores.items()}  # the mixed snapshot, bulk
    return {**lag, **main, **fresh}


@pytest.mark.parametrize("kind", KINDS)
def test_backfill_then_sync(v1, chain, kind):
    for table in ("main", "lag"):
        s = v1[table][kind]
        assert s.rc == 0, s.err
        assert re.fullmatch(r"sync: .*: bulk-loaded version 1 \(24 rows\) in [\d.]+s; store at version 1", s.line)
        _check(s, chain, 1)
    if kind == "lance":
        assert v1["main"][kind].marker[1] == ["rayembed-v00000001"]


def test_v2_record_as_sync_reads_it(v2, chain):
    rec = chain.records[2]
    assert {k: rec["counts"][k] for k in ("rows", "embedded", "reused", "upserted", "deleted")} == {
        "rows": 24,
        "embedded": 4,  # 1 and 9 changed, 24 and 25 new
        "reused": 20,
        "upserted": 6,  # ... and 3 and 18 with new pass-through values
        "deleted": 2,
    }
    assert rec["deltas"]["upserts"] and rec["deltas"]["deletes"]
    ups = pa.concat_tables([pq.read_table(versions.absolute(chain.out, f)) for f in rec["deltas"]["upserts"]])
    dels = pa.concat_tables([pq.read_table(versions.absolute(chain.out, f)) for f in rec["deltas"]["deletes"]])
    assert sorted(ups["id"].to_pylist()) == [1, 3, 9, 18, 24, 25] and sorted(dels["id"].to_pylist()) == [2, 17]
    assert dels.schema.field("id").type == pa.int64()


@pytest.mark.parametrize("kind", KINDS)
def test_refresh_then_sync_then_nothing(v1, v2, chain, kind):
    s = v2[kind]
    assert s.rc == 0 and _applied(chain.records[2]) in s.line and s.line.endswith("; store at version 2"), s.line
    _check(s, chain, 2)
    before, after = _vectors(v1["main"][kind]), _vectors(s)
    for i in (3, 18, 0, 8):  # pass-through-only and untouched rows keep their vectors exactly
        assert np.array_equal(after[i], before[i]), i
    for i in (1, 9):
        assert not np.allclose(after[i], before[i]), f"id {i}: the changed text kept its old vector"
    again = v2[f"{kind}-again"]
    assert again.rc == 0 and again.line.endswith(": already at version 2; nothing to apply"), again.line
    assert again.marker == s.marker  # LanceDB: the table version (and its tags) did not move; PG: no row written
    if kind == "lance":
        assert s.marker[1] == ["rayembed-v00000002"]
    _check(again, chain, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_two_refreshes_then_one_sync(v3, chain, kind):
    lag = v3[f"{kind}-lag"]
    assert lag.rc == 0 and _applied(chain.records[2], chain.records[3]) in lag.line, lag.line
    assert lag.line.endswith("; store at version 3")
    _check(lag, chain, 3)
    main = v3[kind]
    assert main.rc == 0 and _applied(chain.records[3]) in main.line, main.line
    _check(main, chain, 3)
    assert 2 in _vectors(lag) and 24 not in _vectors(lag) and 10 not in _vectors(lag)
    fresh = v3[f"{kind}-fresh"]
    assert fresh.rc == 0 and "bulk-loaded version 3 (23 rows)" in fresh.line, fresh.err
    _check(fresh, chain, 3)


def test_v3_another_writer_keeps_the_vectors(v3, chain):
    """The rewritten shard's rows keep their vectors and are not upserted for their new column types."""
    rec = chain.records[3]
    assert {k: rec["counts"][k] for k in ("rows", "embedded", "upserted", "deleted")} == {
        "rows": 23,
        "embedded": 2,  # 1 changed, 2 new
        "upserted": 3,  # ... and 9's pass-through values
        "deleted": 2,
    }
    s1 = [f for f in rec["files"] if f.startswith("data/s1-")]
    assert s1 and all(pq.read_schema(versions.absolute(chain.out, f)).field("n").type == pa.int64() for f in s1)


def test_types_in_the_stores(v3, stores):
    """id keeps its type (int64 / bigint primary key), content_hash is fixed_size_binary(16) / bytea."""
    lance = stores["lance"]._table("main").schema
    assert lance.field("id").type == pa.int64()
    assert lance.field("embedding").type == pa.list_(pa.float32(), 128)
    assert lance.field("content_hash").type == pa.binary(16)
    assert [lance.field(c).type for c in PASSTHROUGH] == [
        pa.string(),
        pa.float64(),
        pa.int32(),
        pa.list_(pa.string()),
        pa.timestamp("us", tz="UTC"),
    ]
    pg = stores["pg"]
    assert pg.column_types("main") == {
        "id": "bigint",
        "embedding": "vector(128)",
        "content_hash": "bytea",
        "lang": "text",
        "score": "double precision",
        "n": "integer",
        "tags": "jsonb",
        "published": "timestamp with time zone",
    }
    assert pg.primary_key("main") == ["id"]
    assert pg.query("SELECT DISTINCT length(content_hash) FROM main") == [(16,)]


# ----------------------------------------------------------------------------------- string ids, float16 vectors


@pytest.fixture(scope="module")
def strings(tmp_path_factory, qwen_model_dir, ray_local, stores) -> tuple[Corpus, dict[str, Synced]]:
    corpus = Corpus(str(tmp_path_factory.mktemp("sync-e2e-str")), qwen_model_dir, string_ids=True, dtype="float16")
    corpus.backfill(2, 8)
    done = {f"{k}-v1": _sync(t, corpus.out, "strs") for k, t in stores.items()}
    corpus.refresh(changed=[1], deleted=[2, 9], new=[(16, "s1")], passthrough_only=[11])
    return corpus, {**done, **{k: _sync(t, corpus.out, "strs") for k, t in stores.items()}}


@pytest.mark.parametrize("kind", KINDS)
def test_string_ids_and_float16(strings, stores, kind):
    corpus, synced = strings
    first = synced[f"{kind}-v1"]
    assert first.rc == 0 and "bulk-loaded version 1 (16 rows)" in first.line, first.err
    _check(first, corpus, 1)
    s = synced[kind]
    assert s.rc == 0 and _applied(corpus.records[2]) in s.line, s.line
    assert corpus.records[2]["counts"]["deleted"] == 2 and corpus.records[2]["counts"]["upserted"] == 3
    _check(s, corpus, 2)
    if kind == "lance":
        schema = stores["lance"]._table("strs").schema
        assert schema.field("id").type == pa.string()
        assert schema.field("embedding").type == pa.list_(pa.float16(), 128)
        assert schema.field("content_hash").type == pa.binary(16)
    else:
        pg = stores["pg"]
        pgvector = pg.query("SELECT extversion FROM pg_extension WHERE extname = 'vector'")[0][0]
        half = tuple(int(p) for p in pgvector.split(".")[:2]) >= (0, 7)
        types = pg.column_types("strs")
        assert types["id"] == "text" and types["content_hash"] == "bytea"
        assert types["embedding"] == ("halfvec(128)" if half else "vector(128)")
        assert pg.primary_key("strs") == ["id"]
