"""A shard commit costs a bounded number of storage requests, however many parts the output already holds.

Counted at tests/s3_proxy.py in front of moto: committing 40 one-row shards beside 6,000 existing data parts (and
600 quarantine parts) makes at most 3 requests per shard plus a small constant, and as many as beside 0 parts. The
stale-part cleanup that the commit does with its prefix listing still removes exactly the shard's own leftovers.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from operators.storage import Shard
from pipelines import commit, parts
from tests.s3_proxy import S3Proxy

N_EXISTING = 6_000  # data parts of other shards already in the output (6 LIST pages of 1,000 each)
N_EXISTING_ERRORS = 600
N_SHARDS = 40
PER_SHARD = 3  # the marker PUT and one prefix listing each of data/ and _errors/
SLACK = 4  # the "small constant": client start-up, a retried request


@pytest.fixture(scope="module")
def proxy(s3_server):
    p = S3Proxy(s3_server.endpoint).start()
    yield p
    p.stop()


def _seed(bucket: str, keys: list[str]) -> None:
    """Put tiny objects straight into moto's in-process backend (ThreadedMotoServer serves the same one): thousands
    of them in a second, where as many PUTs over HTTP take a minute on 2 cores. None of them reach the proxy."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for key in keys:
        backend.put_object(bucket, key, b"x")


def _keys(s3_server, bucket: str, prefix: str) -> set[str]:
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def _progress(bucket: str, stem: str, files: list[str], errors_files: list[str | None] | None = None):
    """The driver's view of a shard whose parts (``files``, relative to the output) are written."""
    p = commit.ShardProgress(Shard(f"s3://{bucket}/in/{stem}.parquet", stem, "parquet", None, 100, f"etag-{stem}"))
    errors_files = errors_files or [None] * len(files)
    for i, (f, e) in enumerate(zip(files, errors_files)):
        last = i == len(files) - 1
        p.add(parts.record(stem, i, file=f, errors_file=e, rows=1, shard_rows=len(files) if last else -1))
    assert p.complete
    return p


def _commit_shards(s3_server, proxy, n_existing: int) -> list[list[tuple[str, str]]]:
    """A fresh output holding ``n_existing`` parts of other shards; commit 40 one-row shards one by one. Returns the
    requests the proxy saw for each commit."""
    bucket = s3_server.new_bucket("cost")
    out = f"s3://{bucket}/out"
    _seed(bucket, [f"out/data/old{i:05d}-000000000000.parquet" for i in range(n_existing)])
    _seed(bucket, [f"out/_errors/old{i:05d}-000000000000.parquet" for i in range(n_existing // 10)])
    stems = [f"s{i:03d}" for i in range(N_SHARDS)]
    one_row = pa.table({"id": ["x"], "embedding": pa.array([[0.0, 1.0]], pa.list_(pa.float32(), 2))})
    for stem in stems:  # the shards' own parts, written directly to moto (not counted)
        parts.write_parquet(one_row, f"{out}/data/{parts.part_name(stem, 0)}", s3_server.storage_options)
    so = {**s3_server.storage_options, "endpoint_url": proxy.endpoint}
    per_commit = []
    for stem in stems:
        proxy.reset_counts()
        marker = commit.commit_shard(out, _progress(bucket, stem, [f"data/{parts.part_name(stem, 0)}"]), "k", so)
        per_commit.append(list(proxy.requests))
        assert marker["files"] == [f"data/{stem}-000000000000.parquet"] and marker["rows"] == 1
    # Nothing was deleted: no part of another shard is stale for these ones.
    assert len(_keys(s3_server, bucket, "out/data/")) == n_existing + N_SHARDS
    assert len(_keys(s3_server, bucket, "out/_errors/")) == n_existing // 10
    assert len(_keys(s3_server, bucket, "out/_state/")) == N_SHARDS
    return per_commit


def test_commit_requests_do_not_grow_with_the_output(s3_server, proxy):
    beside_0 = _commit_shards(s3_server, proxy, 0)
    beside_6k = _commit_shards(s3_server, proxy, N_EXISTING)
    n0, n6k = sum(map(len, beside_0)), sum(map(len, beside_6k))
    print(f"\n{N_SHARDS} shard commits: {n0} requests beside 0 parts, {n6k} beside {N_EXISTING} parts")
    detail = f"one commit beside {N_EXISTING} parts: {[m for m, _ in beside_6k[-1]]} {beside_6k[-1]}"
    assert n6k <= PER_SHARD * N_SHARDS + SLACK, detail
    assert abs(n6k - n0) <= SLACK, detail


def test_commit_deletes_only_the_shards_own_stale_parts(s3_server, proxy):
    """Shard ``a`` rewritten with other part boundaries: its earlier attempt's parts go, its own current part and
    the parts of ``a-1`` and ``ab`` (stems that merely start with the same letters) stay."""
    bucket = s3_server.new_bucket("stale")
    out = f"s3://{bucket}/out"
    current = "out/data/a-000000000000.parquet"
    stale = ["out/data/a-000000001024.parquet", "out/_errors/a-000000000512.parquet"]
    others = [
        "out/data/a-1-000000000000.parquet",
        "out/data/a-1-000000001024.parquet",
        "out/_errors/a-1-000000000000.parquet",
        "out/data/ab-000000000000.parquet",
        "out/data/a-000000000000.parquet.tmp",  # not a part name at all
    ]
    _seed(bucket, [current, *stale, *others, *[f"out/data/old{i:05d}-000000000000.parquet" for i in range(1_500)]])
    so = {**s3_server.storage_options, "endpoint_url": proxy.endpoint}
    proxy.reset_counts()
    marker = commit.commit_shard(out, _progress(bucket, "a", ["data/a-000000000000.parquet"]), "k", so)
    assert marker["files"] == ["data/a-000000000000.parquet"] and marker["error_files"] == []
    left = _keys(s3_server, bucket, "out/") - {f"out/data/old{i:05d}-000000000000.parquet" for i in range(1_500)}
    assert left == {current, *others, "out/_state/a.json"}
    # Deleting its 2 stale parts costs 2 requests more than a clean commit, even beside 1,500 other parts.
    assert proxy.count("DELETE") == len(stale) and len(proxy.requests) <= PER_SHARD + len(stale) + SLACK


def test_commit_keeps_parts_of_a_stem_that_ends_with_the_same_name(s3_server, proxy):
    """``docs.parquet`` and ``docs-v2/docs.parquet`` are stems ``docs`` and ``docs-v2__docs``: the second one's parts
    start with ``docs-`` (so the prefix listing returns them) and end with ``docs-<offset>.parquet``. Committing
    ``docs`` must not take them for its own stale parts."""
    bucket = s3_server.new_bucket("suffix")
    out = f"s3://{bucket}/out"
    mine, theirs = "out/data/docs-000000000000.parquet", "out/data/docs-v2__docs-000000000000.parquet"
    their_errors = "out/_errors/docs-v2__docs-000000001024.parquet"
    _seed(bucket, [mine, theirs, their_errors])
    so = {**s3_server.storage_options, "endpoint_url": proxy.endpoint}
    commit.commit_shard(out, _progress(bucket, "docs", ["data/docs-000000000000.parquet"]), "k", so)
    assert _keys(s3_server, bucket, "out/") == {mine, theirs, their_errors, "out/_state/docs.json"}
