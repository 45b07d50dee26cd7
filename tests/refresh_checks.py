"""Helpers of tests/test_refresh.py: corpora as shard dicts, CLI calls, snapshots read through `rayembed files`, and
the checks every refresh scenario shares (built on notes/REFRESH.md, the refresh contract).

A snapshot is read the way a user reads it: the URLs `rayembed files OUT [--version N]` prints (checked against the
record's ``files``), never a glob over data/. Expected values come from outside the code under test: the input docs
(ids, pass-through values, blake2b content hashes), the official Qwen3-Embedding procedure (tests/
test_embedder_reference.py) and a clean backfill of the same input into a fresh prefix.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators import storage
from pipelines import cli, versions
from tests.corpus import CODE, EN, ZH

ATOL = 1e-4  # vectors against the official reference and against a clean backfill
DIM = 128  # qwen_model_dir's hidden size
PASSTHROUGH = ("lang", "score")
COUNT_KEYS = ("rows", "embedded", "reused", "upserted", "deleted", "quarantined")
PART_NAME = re.compile(r"^data/(?P<stem>.+)-(?P<offset>\d{12})-v(?P<version>\d{8})\.parquet$")

Shards = dict[str, list[dict[str, Any]]]  # stem -> docs in row order


# ---------------------------------------------------------------------------------------------------------- corpora


def text(i: int, rev: int = 0) -> str:
    """A short text, unique per (id, revision): a swap of two rows' vectors never goes unnoticed."""
    base = (EN, ZH, CODE)[i % 3]
    return f"doc {i} rev {rev}: {base[: 10 + (i * 37) % 90]}"


def doc(i: int, rev: int = 0) -> dict[str, Any]:
    return {"id": i, "text": text(i, rev), "lang": ("en", "zh", "code")[i % 3], "score": i / 7}


def write_shards(root: str, shards: Shards, only: list[str] | None = None, compression: str = "zstd") -> None:
    """Write ``shards`` as ``<root>/<stem>.parquet`` (only the stems in ``only`` when given)."""
    os.makedirs(root, exist_ok=True)
    for stem, docs in shards.items():
        if only is None or stem in only:
            table = pa.Table.from_pylist(docs, schema=DOC_SCHEMA)
            pq.write_table(table, os.path.join(root, f"{stem}.parquet"), compression=compression)


DOC_SCHEMA = pa.schema([("id", pa.int64()), ("text", pa.string()), ("lang", pa.string()), ("score", pa.float64())])


def all_docs(shards: Shards) -> dict[int, dict[str, Any]]:
    """id -> doc over every shard (the input has no duplicate ids)."""
    out: dict[int, dict[str, Any]] = {}
    for docs in shards.values():
        for d in docs:
            assert d["id"] not in out, f"fixture bug: duplicate id {d['id']}"
            out[d["id"]] = d
    return out


def blake(t: str) -> bytes:
    return hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest()


# ------------------------------------------------------------------------------------------------------------- CLI


def cli_run(argv: list[str]) -> tuple[int, str, str]:
    """``cli.main(argv)`` with its stdout and stderr (what the CLI prints; log records go to pytest's handler)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def embed_args(inp: str, out: str, model: str, *extra: str, rows_per_block: int = 4) -> list[str]:
    return [
        "embed",
        "--input",
        inp,
        "--output",
        out,
        "--model",
        model,
        "--passthrough",
        ",".join(PASSTHROUGH),
        "--rows-per-block",
        str(rows_per_block),
        "--part-rows",
        str(rows_per_block),
        "-q",
        *extra,
    ]


def embed_ok(argv: list[str]) -> str:
    rc, stdout, err = cli_run(argv)
    assert rc == 0, f"rc {rc}: {err[-3000:]}"
    return stdout


def so_args(so: dict[str, Any] | None) -> list[str]:
    import json

    return ["--storage-options", json.dumps(so)] if so else []


def files_urls(out: str, version: int | None = None, so: dict[str, Any] | None = None) -> list[str]:
    """The URLs `rayembed files OUT [--version N]` prints; they must be the record's ``files``, in full."""
    argv = ["files", out, *(["--version", str(version)] if version is not None else []), *so_args(so)]
    rc, stdout, err = cli_run(argv)
    assert rc == 0, err
    urls = stdout.split()
    record = versions.latest(out, so) if version is None else versions.load_version(out, version, so)
    assert urls == [versions.absolute(out, f) for f in record["files"]], "files prints another list than the record"
    if storage.is_local(out):
        assert all(os.path.isabs(u) for u in urls)
    return urls


def read_table(url: str, so: dict[str, Any] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(url, so)))


def rows_of(tables: list[pa.Table]) -> dict[int, dict[str, Any]]:
    """id -> row (embedding as a float32 array) over ``tables``; every id once."""
    got: dict[int, dict[str, Any]] = {}
    for t in tables:
        assert t.schema.field("embedding").type == pa.list_(pa.float32(), DIM), t.schema
        assert t.schema.field("content_hash").type == pa.binary(16), t.schema
        vecs = np.asarray(t["embedding"].combine_chunks().values.to_numpy()).reshape(t.num_rows, DIM)
        for k, row in enumerate(t.drop_columns(["embedding"]).to_pylist()):
            assert row["id"] not in got, f"id {row['id']} twice in the snapshot"
            got[row["id"]] = {**row, "embedding": vecs[k]}
    return got


def snapshot(out: str, version: int | None = None, so: dict[str, Any] | None = None) -> dict[int, dict[str, Any]]:
    """A version's rows, read through the URLs `rayembed files` prints."""
    urls = files_urls(out, version, so)
    tables = [read_table(u, so) for u in urls]
    for t in tables:
        assert t.column_names[:3] == ["id", "embedding", "content_hash"], t.column_names
        assert t.schema.field("id").type == pa.int64()
        assert all(c in t.column_names for c in PASSTHROUGH)
    return rows_of(tables)


# ------------------------------------------------------------------------------------------------------- reference


class Reference:
    """Vectors of the official Qwen3-Embedding procedure (transformers, left padding, last token, L2), by text."""

    def __init__(self, model_dir: str):
        from tests.test_embedder_reference import OfficialQwen3Embedding

        self.model = OfficialQwen3Embedding(model_dir)
        self.vectors: dict[str, np.ndarray] = {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        missing = sorted(set(texts) - self.vectors.keys())
        if missing:
            self.vectors.update(zip(missing, self.model.embed(missing)))
        return np.stack([self.vectors[t] for t in texts])


# ---------------------------------------------------------------------------------------------------------- checks


def check_snapshot(
    got: dict[int, dict[str, Any]],
    docs: dict[int, dict[str, Any]],
    ref: Reference,
    clean: dict[int, dict[str, Any]] | None = None,
) -> None:
    """``got`` holds exactly the docs' ids, once each, with the docs' pass-through values and content hashes, and
    vectors within ATOL of the official reference and of the clean backfill ``clean`` of the same input."""
    assert sorted(got) == sorted(docs), (
        f"ids differ: missing {sorted(set(docs) - set(got))[:20]}, extra {sorted(set(got) - set(docs))[:20]}"
    )
    ids = sorted(docs)
    for i in ids:
        row, d = got[i], docs[i]
        assert row["content_hash"] == blake(d["text"]), f"id {i}: content_hash is not blake2b-16 of its text"
        for c in PASSTHROUGH:
            assert row[c] == d[c], f"id {i}: pass-through {c} is {row[c]!r}, the input has {d[c]!r}"
    vecs = np.stack([got[i]["embedding"] for i in ids])
    want = ref([docs[i]["text"] for i in ids])
    worst = np.abs(vecs - want).max(axis=1)
    assert worst.max() <= ATOL, f"id {ids[int(worst.argmax())]}: {worst.max():.2e} from the official reference"
    if clean is not None:
        assert sorted(clean) == ids, "the clean backfill holds other ids"
        cvecs = np.stack([clean[i]["embedding"] for i in ids])
        worst = np.abs(vecs - cvecs).max(axis=1)
        assert worst.max() <= ATOL, f"id {ids[int(worst.argmax())]}: {worst.max():.2e} from the clean backfill"
        for i in ids:
            for c in (*PASSTHROUGH, "content_hash"):
                assert got[i][c] == clean[i][c], f"id {i}: {c} differs from the clean backfill"


def counts_line(version: int, c: dict[str, int]) -> str:
    return (
        f"version {version}: {c['rows']} rows, {c['embedded']} embedded, {c['reused']} reused, {c['upserted']} "
        f"upserted, {c['deleted']} deleted, {c['quarantined']} quarantined"
    )


def check_record(record: dict[str, Any], version: int, counts: dict[str, int], stdout: str | None = None) -> None:
    """The record's shape (REFRESH.md "Record") and its counts, exactly; the summary's version line when given."""
    assert record["format"] == "rayembed.version/1" and record["kind"] == "embed"
    assert record["version"] == version and record["parent"] == (version - 1 if version > 1 else None)
    assert {k: record["counts"][k] for k in COUNT_KEYS} == {k: counts[k] for k in COUNT_KEYS}, record["counts"]
    assert record["files"] == sorted(record["files"]) and len(set(record["files"])) == len(record["files"])
    for f in record["files"]:
        assert PART_NAME.match(f), f"data part {f!r} is not named data/<stem>-<offset:012d>-v<version:08d>.parquet"
        assert int(PART_NAME.match(f)["version"]) <= version
    assert record["totals"]["rows"] == counts["rows"] and record["totals"]["files"] == len(record["files"])
    per_shard = sorted(f for s in record["shards"].values() for f in s["files"])
    assert per_shard == record["files"], "the shards' file lists are not the snapshot's files"
    assert sum(s["rows"] for s in record["shards"].values()) == counts["rows"]
    if version == 1:
        assert record["deltas"] == {"upserts": [], "deletes": []}
    else:
        n = f"{version:08d}"
        for rel in record["deltas"]["upserts"]:
            assert re.fullmatch(rf"_deltas/{n}/upserts/.+-\d{{12}}\.parquet", rel), rel
        for rel in record["deltas"]["deletes"]:
            assert re.fullmatch(rf"_deltas/{n}/deletes/b\d{{5}}\.parquet", rel), rel
    if stdout is not None:
        assert counts_line(version, counts) in stdout.splitlines(), stdout


def delta_rows(
    out: str, record: dict[str, Any], kind: str, so: dict[str, Any] | None = None
) -> dict[int, dict[str, Any]] | list[int]:
    """The rows of the record's upserts delta (id -> row), or the ids of its deletes delta (sorted, each once)."""
    tables = [read_table(storage.join(out, rel), so) for rel in record["deltas"][kind]]
    if kind == "upserts":
        return rows_of(tables)
    ids: list[int] = []
    for t in tables:
        assert t.column_names == ["id"] and t.schema.field("id").type == pa.int64(), t.schema
        ids += t["id"].to_pylist()
    assert len(set(ids)) == len(ids), "an id twice in the deletes delta"
    return sorted(ids)


def tree(root: str, skip: tuple[str, ...] = ("_lease.json",)) -> dict[str, tuple[int, int]]:
    """Every file under a local output: relative path -> (size, mtime_ns)."""
    found = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            if rel not in skip:
                st = os.stat(os.path.join(dirpath, f))
                found[rel] = (st.st_size, st.st_mtime_ns)
    return found


def digests(urls: list[str], so: dict[str, Any] | None = None) -> dict[str, str]:
    return {u: hashlib.sha256(storage.read_bytes(u, so)).hexdigest() for u in urls}


def same_rows(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> None:
    """Exactly the same rows (vectors bit for bit)."""
    assert sorted(a) == sorted(b)
    for i in a:
        assert np.array_equal(a[i]["embedding"], b[i]["embedding"]), f"id {i}: vector differs"
        assert {k: v for k, v in a[i].items() if k != "embedding"} == {
            k: v for k, v in b[i].items() if k != "embedding"
        }, f"id {i}"
