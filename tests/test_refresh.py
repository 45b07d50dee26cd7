"""Scheduled refresh (issue 11; contract: notes/REFRESH.md) end to end on a real local Ray and on moto S3.

Every scenario compares the refreshed snapshot, read through `rayembed files`, with a clean backfill of the new input
into a fresh prefix and with the official Qwen3-Embedding procedure: the same ids once each, vectors within 1e-4, the
same pass-through values and content hashes. Counts, delta contents and file lists are asserted exactly.

One local chain of versions carries most scenarios (each step a module fixture that depends on the one before, so
they run in this order): v1 backfill of 6 shards x 50 docs -> v2 same names, 6 texts changed (2%) -> an unchanged
rerun -> v3 Spark-style rewrite into 4 shards -> files/vacuum on copies -> v4 a shard removed upstream -> a refused
60% delete. Duplicate ids, the driver SIGKILLs and S3 use corpora of their own.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from operators import storage
from pipelines import versions
from pipelines.lease import lease_url
from tests.conftest import REPO
from tests.refresh_checks import (
    Reference,
    Shards,
    all_docs,
    blake,
    check_record,
    check_snapshot,
    cli_run,
    delta_rows,
    digests,
    doc,
    embed_args,
    embed_ok,
    files_urls,
    read_table,
    same_rows,
    snapshot,
    so_args,
    text,
    tree,
    write_shards,
)


@pytest.fixture(scope="module")
def ref(qwen_model_dir) -> Reference:
    return Reference(qwen_model_dir)


def _bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _tail(log: str) -> str:
    return _bytes(log).decode(errors="replace")[-3000:]


def _counts(rows: int, embedded: int, reused: int, upserted: int, deleted: int, quarantined: int = 0) -> dict:
    return dict(
        rows=rows, embedded=embedded, reused=reused, upserted=upserted, deleted=deleted, quarantined=quarantined
    )


def _clean_backfill(root: str, name: str, shards_dir: str, model: str, rows_per_block: int) -> dict:
    """A backfill of a copy of ``shards_dir`` (same file names, so the same stems) into a fresh prefix."""
    inp, out = os.path.join(root, f"{name}-in"), os.path.join(root, f"{name}-out")
    shutil.copytree(shards_dir, inp)
    stdout = embed_ok(embed_args(inp, out, model, rows_per_block=rows_per_block))
    rows = len(snapshot(out))
    check_record(versions.latest(out), 1, _counts(rows, rows, 0, rows, 0), stdout)
    return snapshot(out)


# ------------------------------------------------------------------------------------------------ the local chain

MAIN_SHARDS, MAIN_ROWS = 6, 50
CHANGED_V2 = {"s1": [55, 70], "s3": [160, 175], "s4": [210, 240]}  # 6 of 300 texts (2%), in 3 of the 6 shards
UNTOUCHED_V2 = ["s0", "s2", "s5"]
DELETED_V3 = [3, 17, 64, 99, 101, 150, 199, 222, 260, 299]
CHANGED_V3 = [0, 55, 88, 120, 161, 230, 271, 298]  # 55 changed in v2 already
PT_ONLY_V3 = [10, 110, 175, 205, 280]  # pass-through values change, texts do not (175's text changed in v2)
NEW_V3 = list(range(300, 307))
SPARK_SIZES = [100, 75, 75, 47]  # 297 rows; v4 drops the 47, the refusal then the two 75s (150 of 250: 60%)
SPARK_UUID = "3f1c2b9a-5d4e-4f60-8a71-92b3c4d5e6f7"
SPARK_STEMS = [f"part-{k:05d}-{SPARK_UUID}-c000.snappy" for k in range(len(SPARK_SIZES))]
# rows, embedded, reused, upserted, deleted per version of the chain: reused = the snapshot's rows not embedded;
# upserted adds the pass-through-only rows to the embedded ones (REFRESH.md "Record").
CHAIN_COUNTS = {
    1: _counts(300, 300, 0, 300, 0),
    2: _counts(300, 6, 294, 6, 0),
    3: _counts(297, 15, 282, 20, 10),
    4: _counts(250, 0, 250, 0, 47),
}


class Chain:
    def __init__(self, root: str, model: str):
        self.root, self.model = root, model
        self.inp, self.out = os.path.join(root, "in"), os.path.join(root, "out")
        self.shards: Shards = {}
        self.docs: dict[int, dict] = {}  # version -> id -> doc
        self.records: dict[int, dict] = {}
        self.stdout: dict[int, str] = {}
        self.snap: dict[int, dict] = {}
        self.clean: dict[int, dict] = {}
        self.trees: dict[int, dict] = {}  # the output's files right after version N committed
        self.status: dict[int, str] = {}  # `rayembed status OUT` right after version N committed
        self.match_log: list[str] = []  # each commit's "match: ... buckets, <where>" line

    def args(self, *extra: str) -> list[str]:
        return embed_args(self.inp, self.out, self.model, *extra, rows_per_block=16)

    def commit(self, version: int, clean: bool | int = True) -> None:
        """Run the command, keep what version ``version`` committed; ``clean``: True runs a clean backfill of the
        input, a version number takes that version's clean backfill (an input whose rows are a subset of its input,
        unchanged: the same vectors and values), False none (a backfill is its own)."""
        with _match_lines() as lines:
            stdout = embed_ok(self.args())
        self.match_log += [m for m in lines if " buckets, " in m]
        record = versions.latest(self.out)
        assert record["version"] == version, stdout
        self.stdout[version], self.records[version] = stdout, record
        self.docs[version] = copy.deepcopy(all_docs(self.shards))
        self.snap[version] = snapshot(self.out)
        self.trees[version] = tree(self.out)
        rc, self.status[version], err = cli_run(["status", self.out])
        assert rc == 0, err
        if clean is True:
            self.clean[version] = _clean_backfill(self.root, f"clean-v{version}", self.inp, self.model, 16)
        elif clean:
            assert all(self.docs[version][i] == self.docs[clean][i] for i in self.docs[version])
            self.clean[version] = {i: self.clean[clean][i] for i in self.docs[version]}


INLINE_ENV = "RAYEMBED_MATCH_INLINE_BYTES"  # pipelines/jobs/refresh.py: 0 runs the match pass on Ray Data


@contextlib.contextmanager
def _match_lines():
    """The messages the rayembed logger emits meanwhile (where the match pass ran is logged, not printed)."""
    import logging

    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda r: lines.append(r.getMessage()) if r.getMessage().startswith("match:") else None
    log = logging.getLogger("rayembed")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


@pytest.fixture(scope="module")
def chain_v1(qwen_model_dir, ray_local, tmp_path_factory) -> Chain:
    ch = Chain(str(tmp_path_factory.mktemp("refresh-chain")), qwen_model_dir)
    ch.shards = {f"s{k}": [doc(MAIN_ROWS * k + j) for j in range(MAIN_ROWS)] for k in range(MAIN_SHARDS)}
    write_shards(ch.inp, ch.shards)
    ch.commit(1, clean=False)  # a backfill is its own clean backfill
    return ch


@pytest.fixture(scope="module")
def chain_v2(chain_v1) -> Chain:
    ch = chain_v1
    ch.shards = copy.deepcopy(ch.shards)
    for stem, ids in CHANGED_V2.items():
        for d in ch.shards[stem]:
            if d["id"] in ids:
                d["text"] = text(d["id"], 1)
    write_shards(ch.inp, ch.shards, only=list(CHANGED_V2))  # the other three files are left as they are
    ch.commit(2)
    return ch


@pytest.fixture(scope="module")
def chain_rerun(chain_v2) -> tuple[Chain, dict, dict, bytes, bytes, str]:
    ch = chain_v2
    before = tree(ch.out)
    manifest = _bytes(os.path.join(ch.out, "_manifest.json"))
    stdout = embed_ok(ch.args())
    after_manifest = _bytes(os.path.join(ch.out, "_manifest.json"))
    return ch, before, tree(ch.out), manifest, after_manifest, stdout


@pytest.fixture(scope="module")
def chain_v3(chain_rerun) -> Chain:
    ch = chain_rerun[0]
    cur = copy.deepcopy(ch.docs[2])
    for i in DELETED_V3:
        del cur[i]
    for i in CHANGED_V3:
        cur[i]["text"] = text(i, 2)
    for i in PT_ONLY_V3:
        cur[i]["score"] += 1000.5
    cur[205]["lang"] = "xx"
    for i in NEW_V3:
        cur[i] = doc(i)
    rows = list(cur.values())
    random.Random(3).shuffle(rows)
    assert len(rows) == sum(SPARK_SIZES)
    ch.shards, start = {}, 0
    for stem, size in zip(SPARK_STEMS, SPARK_SIZES):
        ch.shards[stem], start = rows[start : start + size], start + size
    for k in range(MAIN_SHARDS):
        os.remove(os.path.join(ch.inp, f"s{k}.parquet"))
    write_shards(ch.inp, ch.shards, compression="snappy")
    # The richest refresh of the chain (renames, changes, pass-through-only changes, deletes, new ids) runs its match
    # pass on Ray Data; the others run it in the driver, as every small input does by default.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(INLINE_ENV, "0")
        ch.commit(3)
    assert "on Ray Data" in ch.match_log[-1] and all("in the driver" in m for m in ch.match_log[:-1])
    return ch


@pytest.fixture(scope="module")
def chain_v4(chain_v3) -> Chain:
    ch = chain_v3
    os.remove(os.path.join(ch.inp, f"{SPARK_STEMS[3]}.parquet"))
    ch.shards = {s: d for s, d in ch.shards.items() if s != SPARK_STEMS[3]}
    ch.commit(4, clean=3)  # the input is version 3's less one shard: its clean backfill less that shard
    return ch


def test_backfill_is_version_1(chain_v1, ref):
    ch = chain_v1
    record = ch.records[1]
    n = MAIN_SHARDS * MAIN_ROWS
    check_record(record, 1, CHAIN_COUNTS[1], ch.stdout[1])
    assert (
        f"rayembed embed: {MAIN_SHARDS} shards ({MAIN_SHARDS} processed, 0 already committed), {n} docs"
        in (ch.stdout[1])
    )
    assert not os.path.exists(os.path.join(ch.out, "_deltas", "00000001"))
    assert sorted(record["shards"]) == [f"s{k}" for k in range(MAIN_SHARDS)]
    assert all(f.endswith("-v00000001.parquet") for f in record["files"])
    # 50 rows per shard in parts of 16 rows, each named by its first row offset.
    for k in range(MAIN_SHARDS):
        assert record["shards"][f"s{k}"]["files"] == [
            f"data/s{k}-{off:012d}-v00000001.parquet" for off in (0, 16, 32, 48)
        ]
    assert versions.load_version(ch.out, 1) == record
    check_snapshot(ch.snap[1], ch.docs[1], ref)


def test_same_names_2_percent_changed_embeds_only_those(chain_v2, ref):
    ch = chain_v2
    r1, r2 = ch.records[1], ch.records[2]
    changed = sorted(i for ids in CHANGED_V2.values() for i in ids)
    check_record(r2, 2, CHAIN_COUNTS[2], ch.stdout[2])
    assert "rayembed embed: 6 shards (3 processed, 3 already committed), " in ch.stdout[2], ch.stdout[2]
    check_snapshot(ch.snap[2], ch.docs[2], ref, ch.clean[2])

    # Unchanged shards are not rewritten: the record lists the parent's files for them, and they are untouched.
    for stem in UNTOUCHED_V2:
        assert r2["shards"][stem]["files"] == r1["shards"][stem]["files"], stem
        for f in r1["shards"][stem]["files"]:
            assert ch.trees[2][f] == ch.trees[1][f], f"{f} was rewritten"
    # Changed shards get new parts named by the new version; the parent's parts stay, byte for byte.
    for stem in CHANGED_V2:
        new, old = r2["shards"][stem]["files"], r1["shards"][stem]["files"]
        assert new and all(f.endswith("-v00000002.parquet") for f in new) and not set(new) & set(old), new
        for f in old:
            assert ch.trees[2][f] == ch.trees[1][f], f"{f} (referenced by version 1) was overwritten"
    # Reused rows carry the parent's vector itself, not a recomputed one.
    for i in set(ch.snap[2]) - set(changed):
        assert np.array_equal(ch.snap[2][i]["embedding"], ch.snap[1][i]["embedding"]), i

    # The deltas: exactly the changed rows, with their new values; nothing deleted.
    upserts = delta_rows(ch.out, r2, "upserts")
    assert sorted(upserts) == changed
    for i in changed:
        assert upserts[i]["content_hash"] == blake(text(i, 1))
        assert np.abs(upserts[i]["embedding"] - ch.clean[2][i]["embedding"]).max() <= 1e-4
    assert delta_rows(ch.out, r2, "deletes") == []


def test_unchanged_rerun_commits_nothing(chain_rerun):
    ch, before, after, manifest, after_manifest, stdout = chain_rerun
    lines = stdout.splitlines()
    assert any(
        line.startswith("rayembed embed: 6 shards (0 processed, 6 already committed), 0 docs") for line in lines
    )
    assert "version 2 is current: nothing changed" in lines, stdout
    assert versions.list_versions(ch.out) == [1, 2]
    assert after_manifest == manifest
    assert after == before, "an unchanged rerun wrote files: " + str(sorted(set(after.items()) ^ set(before.items())))


def test_spark_style_rewrite(chain_v3, ref):
    ch = chain_v3
    r3 = ch.records[3]
    # embedded = changed + new; upserted adds the pass-through-only rows; reused = the rest of the snapshot.
    check_record(r3, 3, CHAIN_COUNTS[3], ch.stdout[3])
    assert "rayembed embed: 4 shards (4 processed, 0 already committed), " in ch.stdout[3], ch.stdout[3]
    assert sorted(r3["shards"]) == SPARK_STEMS
    assert all(f.startswith("data/part-0000") and f.endswith("-v00000003.parquet") for f in r3["files"])
    check_snapshot(ch.snap[3], ch.docs[3], ref, ch.clean[3])

    upserts = delta_rows(ch.out, r3, "upserts")
    assert sorted(upserts) == sorted(CHANGED_V3 + NEW_V3 + PT_ONLY_V3)
    check_snapshot(upserts, {i: ch.docs[3][i] for i in upserts}, ref, {i: ch.clean[3][i] for i in upserts})
    assert delta_rows(ch.out, r3, "deletes") == sorted(DELETED_V3)
    # Moved rows whose text is unchanged (pass-through-only ones included) keep the parent's vector itself.
    for i in set(ch.snap[3]) - set(CHANGED_V3) - set(NEW_V3):
        assert np.array_equal(ch.snap[3][i]["embedding"], ch.snap[2][i]["embedding"]), i
    assert ch.snap[3][205]["lang"] == "xx" and ch.snap[3][10]["score"] == 10 / 7 + 1000.5

    # Versions share data/: the older versions' files are all still there; `files` returns only version 3's.
    older = set(ch.records[1]["files"]) | set(ch.records[2]["files"])
    assert not older & set(r3["files"])
    on_disk = {f"data/{n}" for n in os.listdir(os.path.join(ch.out, "data"))}
    assert older | set(r3["files"]) <= on_disk
    for f in older:
        assert ch.trees[3][f] == ch.trees[2][f], f"{f} changed after its version committed"
    assert files_urls(ch.out) == [os.path.join(os.path.abspath(ch.out), f) for f in r3["files"]]


def _vacuum_copy(ch: Chain, root: str, name: str) -> str:
    dst = os.path.join(root, name)
    shutil.copytree(ch.out, dst)
    return dst


def test_files_version_1_after_two_refreshes_and_vacuum(chain_v3, ref, tmp_path):
    ch = chain_v3
    assert versions.latest(ch.out)["version"] == 3, "this test runs on the chain at version 3"
    # `files --version N` returns exactly version N's rows (vectors bit for bit as they were when N committed).
    for n in (1, 2, 3):
        same_rows(snapshot(ch.out, n), ch.snap[n])
    check_snapshot(snapshot(ch.out, 1), ch.docs[1], ref)
    rc, _, err = cli_run(["files", ch.out, "--version", "4"])
    assert rc == 2 and "has no version 4 (it holds versions 1..3" in err, err

    # Under a live lease (another job's), vacuum is refused and removes nothing.
    leased = _vacuum_copy(ch, str(tmp_path), "leased")
    lease = {"holder": {"host": "other-host", "pid": 4242, "job_id": "abc123"}, "heartbeat_at": time.time()}
    storage.write_json(lease_url(leased), {**lease, "ttl_s": 600})
    before = tree(leased)
    rc, _, err = cli_run(["vacuum", leased, "--keep", "1"])
    assert rc == 2 and "is leased by job abc123 (pid 4242 on other-host): vacuum refuses while a job runs" in err
    assert tree(leased) == before and versions.list_versions(leased) == [1, 2, 3]

    # --keep 2: version 1's files that version 2 shares (its three unchanged shards) stay, the others go.
    keep2 = _vacuum_copy(ch, str(tmp_path), "keep2")
    r1, r2, r3 = (ch.records[n] for n in (1, 2, 3))
    retained = set(r2["files"]) | set(r3["files"])
    gone = sorted(set(r1["files"]) - retained)
    assert len(gone) == 4 * len(CHANGED_V2)  # the parts of the three shards version 2 rewrote
    rc, stdout, err = cli_run(["vacuum", keep2, "--keep", "2"])
    assert rc == 0, err
    assert stdout.startswith(
        f"vacuum: kept versions 2..3; removed 1 version record(s), {len(gone)} data/error file(s), 0 delta file(s)"
    ), stdout
    assert versions.list_versions(keep2) == [2, 3]
    assert sorted(f"data/{n}" for n in os.listdir(os.path.join(keep2, "data"))) == sorted(retained)
    for rel in r2["deltas"]["upserts"] + r2["deltas"]["deletes"] + r3["deltas"]["upserts"] + r3["deltas"]["deletes"]:
        assert os.path.exists(os.path.join(keep2, rel)), rel
    same_rows(snapshot(keep2, 2), ch.snap[2])
    same_rows(snapshot(keep2), ch.snap[3])

    # --keep 1 (on the copy that was leased, once the lease is released): only version 3 and its files remain.
    storage.write_json(lease_url(leased), {**lease, "ttl_s": 600, "released_at": time.time()})
    rc, stdout, err = cli_run(["vacuum", leased, "--keep", "1"])
    assert rc == 0, err
    removed = set(r1["files"]) | set(r2["files"])
    deltas2 = r2["deltas"]["upserts"] + r2["deltas"]["deletes"]
    assert stdout.startswith(
        f"vacuum: kept version 3; removed 2 version record(s), {len(removed)} data/error file(s), "
        f"{len(deltas2)} delta file(s)"
    ), stdout
    assert versions.list_versions(leased) == [3]
    assert sorted(f"data/{n}" for n in os.listdir(os.path.join(leased, "data"))) == r3["files"]
    assert os.listdir(os.path.join(leased, "_deltas")) == ["00000003"]
    same_rows(snapshot(leased), ch.snap[3])
    check_snapshot(snapshot(leased), ch.docs[3], ref, ch.clean[3])
    rc, _, err = cli_run(["files", leased, "--version", "1"])
    assert rc == 2 and "has no version 1" in err


def test_shard_removed_upstream_then_mass_delete_refused(chain_v4, ref):
    ch = chain_v4
    r3, r4 = ch.records[3], ch.records[4]
    removed_ids = sorted(d["id"] for d in _removed_v4(ch))
    assert len(removed_ids) == SPARK_SIZES[3]
    check_record(r4, 4, CHAIN_COUNTS[4], ch.stdout[4])
    assert "rayembed embed: 3 shards (0 processed, 3 already committed), " in ch.stdout[4], ch.stdout[4]
    assert delta_rows(ch.out, r4, "deletes") == removed_ids
    assert delta_rows(ch.out, r4, "upserts") == {}
    assert r4["files"] == sorted(set(r3["files"]) - set(r3["shards"][SPARK_STEMS[3]]["files"]))
    assert not set(removed_ids) & set(ch.snap[4])
    check_snapshot(ch.snap[4], ch.docs[4], ref, ch.clean[4])

    # Two of the three shards gone: 150 of 250 rows (60%) would be deleted, above the default 0.5. Refused.
    def state() -> tuple:
        """What a refused run must leave as it was: the commit point, the records, data/ and _errors/, and every
        delta file of the committed versions (a new version's scratch, uncommitted, is not part of it)."""
        listed = {d: sorted(os.listdir(os.path.join(ch.out, d))) for d in ("data", "_versions")}
        errors = sorted(os.listdir(os.path.join(ch.out, "_errors"))) if os.path.isdir(ch.out + "/_errors") else []
        committed_deltas = {
            rel: _bytes(os.path.join(ch.out, rel))
            for n in (2, 3, 4)
            for rel in ch.records[n]["deltas"]["upserts"] + ch.records[n]["deltas"]["deletes"]
        }
        delta_dirs = {n: sorted(os.listdir(os.path.join(ch.out, "_deltas", f"{n:08d}"))) for n in (2, 3, 4)}
        return _bytes(os.path.join(ch.out, "_manifest.json")), listed, errors, committed_deltas, delta_dirs

    before = state()
    for stem in SPARK_STEMS[1:3]:
        os.remove(os.path.join(ch.inp, f"{stem}.parquet"))
    rc, stdout, err = cli_run(ch.args())
    line = re.compile(
        r"(?:rayembed: error: )?refresh would delete 150 of 250 rows \((?P<p>[0-9.]+)%\) of version 4, above "
        r"--max-delete-ratio (?P<r>[0-9.]+%?); nothing committed"
    )
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and line.fullmatch(lines[0]), err
    m = line.fullmatch(lines[0])
    assert float(m["p"]) == 60 and m["r"] in ("0.5", "0.50", "50%", "50.0%", "50.00%"), lines[0]
    assert "Traceback" not in err and "version 5" not in stdout
    assert state() == before, "a refused refresh committed something"
    assert versions.latest(ch.out)["version"] == 4 and versions.list_versions(ch.out) == [1, 2, 3, 4]
    same_rows(snapshot(ch.out), ch.snap[4])
    assert rc == 2, f"exit code {rc}: a refused mass delete exits 2, as a refused error ratio does"


def test_status_prints_the_version_counts(chain_v4):
    for n, c in CHAIN_COUNTS.items():
        line = (
            f"version: {n} ({c['rows']} rows, {c['embedded']} embedded, {c['reused']} reused, {c['upserted']} "
            f"upserted, {c['deleted']} deleted, {c['quarantined']} quarantined)"
        )
        assert line in chain_v4.status[n], f"version {n}: {chain_v4.status[n]}"


def _removed_v4(ch: Chain) -> list[dict]:
    """The docs of the shard removed for version 4 (in version 3's input)."""
    return [ch.docs[3][i] for i in ch.docs[3] if i not in ch.docs[4]]


# ---------------------------------------------------------------------------------------------------- duplicates


@pytest.mark.parametrize("executor", ["driver", "engine"])
def test_duplicate_ids_in_a_backfill_keep_the_first_in_shard_then_offset_order(
    executor, qwen_model_dir, ray_local, ref, tmp_path, monkeypatch
):
    """The same decisions whether the match pass runs in the driver (a small input, the default here) or on Ray
    Data (forced with RAYEMBED_MATCH_INLINE_BYTES=0)."""
    if executor == "engine":
        monkeypatch.setenv(INLINE_ENV, "0")
    ids = {
        "a": [0, 1, 2, 3, 4, 5, 2, 7, 8, 9],  # 2 twice within a
        "b": [7, 11, 12, 11, 14, 15, 30, 17],  # 7 first in a (a later offset, an earlier shard); 11 twice; 30 null
        "c": [2, 21, 22, 15, 24, 30],  # 2 a third time; 15 of b; 30 here is the first with a valid text
    }
    shards: Shards = {}
    for k, (stem, col) in enumerate(ids.items()):
        shards[stem] = [
            {"id": i, "text": f"{stem}@{off}: {text(i)}", "lang": stem, "score": 10.0 * k + off}
            for off, i in enumerate(col)
        ]
    shards["b"][6]["text"] = None
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    write_shards(inp, shards)

    # The policy, modelled here: among valid texts, the first in sorted shard order, then by row offset.
    kept: dict[int, tuple[str, int, dict]] = {}
    errors = []
    for stem in sorted(shards):
        for off, d in enumerate(shards[stem]):
            if d["text"] is None:
                errors.append((str(d["id"]), stem, off, "InvalidText", "text is null"))
            elif d["id"] in kept:
                ks, ko, _ = kept[d["id"]]
                errors.append(
                    (str(d["id"]), stem, off, "DuplicateId", f"duplicate id: kept the row at {ks} offset {ko}")
                )
            else:
                kept[d["id"]] = (stem, off, d)
    assert len(kept) == 18 and len(errors) == 6 and sum(e[3] == "DuplicateId" for e in errors) == 5

    with _match_lines() as lines:
        stdout = embed_ok(embed_args(inp, out, qwen_model_dir, "--max-error-ratio", "0.5"))
    where = "in the driver" if executor == "driver" else "on Ray Data"
    assert where in [m for m in lines if " buckets, " in m][0], lines
    record = versions.latest(out)
    assert record["error_files"] and all(
        re.fullmatch(r"_errors/[abc]-\d{12}-v00000001\.parquet", f) for f in record["error_files"]
    ), record["error_files"]
    got = [r for f in record["error_files"] for r in read_table(storage.join(out, f)).to_pylist()]
    got = sorted(
        ((r["id"], r["shard"], r["row_offset"], r["error_type"], r["message"]) for r in got), key=lambda e: e[1:3]
    )
    assert got == errors
    check_snapshot(snapshot(out), {i: d for i, (_, _, d) in kept.items()}, ref)
    check_record(record, 1, _counts(18, 18, 0, 18, 0, quarantined=6), stdout)
    assert record["totals"]["errors"] == 6


# ------------------------------------------------------------------------------ small corpus: SIGKILLs and S3

SMALL_SHARDS, SMALL_ROWS = 6, 8
SMALL_CHANGED = [100 * k + 3 for k in range(5)]  # offset 3 of s0..s4; s5 is left untouched
SMALL_DELETED = [205]  # s2 offset 5
SMALL_NEW = [1000]  # appended to s4
SMALL_PT_ONLY = [106]  # s1 offset 6: score only
SMALL_REWRITTEN = [f"s{k}" for k in range(5)]


def small_v1() -> Shards:
    return {f"s{k}": [doc(100 * k + j) for j in range(SMALL_ROWS)] for k in range(SMALL_SHARDS)}


def small_v2() -> Shards:
    shards = small_v1()
    for docs in shards.values():
        for d in docs:
            if d["id"] in SMALL_CHANGED:
                d["text"] = text(d["id"], 1)
            if d["id"] in SMALL_PT_ONLY:
                d["score"] += 500.25
    shards["s2"] = [d for d in shards["s2"] if d["id"] not in SMALL_DELETED]
    shards["s4"].append(doc(SMALL_NEW[0]))
    return shards


SMALL_COUNTS = _counts(48, 6, 42, 7, 1)  # 48 - 1 + 1 rows; 5 changed + 1 new embedded; + 1 pass-through-only


@pytest.fixture(scope="module")
def small_clean(qwen_model_dir, ray_local, tmp_path_factory) -> dict:
    root = str(tmp_path_factory.mktemp("refresh-small"))
    write_shards(os.path.join(root, "v2"), small_v2())
    return _clean_backfill(root, "clean", os.path.join(root, "v2"), qwen_model_dir, 4)


def _check_small_v2(out: str, record: dict, ref, clean: dict, so=None) -> None:
    docs = all_docs(small_v2())
    check_snapshot(snapshot(out, so=so), docs, ref, clean)
    upserts = delta_rows(out, record, "upserts", so)
    assert sorted(upserts) == sorted(SMALL_CHANGED + SMALL_NEW + SMALL_PT_ONLY)
    check_snapshot(upserts, {i: docs[i] for i in upserts}, ref, {i: clean[i] for i in upserts})
    assert delta_rows(out, record, "deletes", so) == SMALL_DELETED


def _v2_markers(out: str) -> set[str]:
    """Stems whose `_state/` marker belongs to a run targeting version 2 (committed by an attempt at it)."""
    found = set()
    d = os.path.join(out, "_state")
    for name in os.listdir(d) if os.path.isdir(d) else []:
        with contextlib.suppress(OSError, ValueError):
            m = json.loads(_bytes(os.path.join(d, name)))
            if m.get("target") == 2:
                found.add(m.get("stem", name[: -len(".json")]))
    return found & set(SMALL_REWRITTEN)


def test_driver_sigkill_at_three_points_of_a_refresh(qwen_model_dir, ray_local, ref, small_clean, tmp_path):
    """One refresh, killed three times over (after the match pass; after its first shard commit; before the version
    record), each attempt a rerun of the one before: version 1 stays the latest and intact after each kill, and the
    last rerun (in process) ends equal to a clean backfill of the new input."""
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    argv = embed_args(inp, out, qwen_model_dir, "--lease-ttl", "60", "--lease-heartbeat", "1")
    write_shards(inp, small_v1())
    embed_ok(argv)
    v1_urls = files_urls(out, 1)
    v1_bytes, v1_rows = digests(v1_urls), snapshot(out, 1)
    manifest = _bytes(os.path.join(out, "_manifest.json"))
    write_shards(inp, small_v2(), only=SMALL_REWRITTEN)

    def spawn(name: str, hooks: dict) -> tuple[subprocess.Popen, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAYEMBED_TEST_")}
        env.update(PYTHONPATH=REPO, **hooks)
        env.pop("RAY_ADDRESS", None)
        log = str(tmp_path / f"{name}.log")
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipelines.embed", *argv[1:]],
                cwd=REPO,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the kill reaches this job (and its Ray) alone
            )
        return proc, log

    def reap(proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the driver, or what it left of its Ray after os._exit
        proc.wait()

    def v1_intact(after: str) -> None:
        assert versions.latest(out)["version"] == 1, after
        assert versions.list_versions(out) == [1], after
        assert _bytes(os.path.join(out, "_manifest.json")) == manifest, after
        assert files_urls(out) == files_urls(out, 1) == v1_urls, after
        assert all(os.path.exists(u) for u in v1_urls), after
        assert digests(v1_urls) == v1_bytes, f"{after}: a file of version 1 was overwritten"
        same_rows(snapshot(out, 1), v1_rows)

    def startup_failed(rc: int | None, log: str) -> bool:
        """The attempt died in ray.init, before doing anything (Ray's 30 s raylet start-up limit on a loaded
        machine): not a kill, so the attempt is made again (the same command, as a scheduler would rerun it)."""
        return rc not in (None, 137) and "timed out during startup" in _tail(log)

    def kill_at(point: str, committed: int) -> None:
        """The hook exits the driver at ``point`` (os._exit(137), as a SIGKILL leaves it)."""
        for attempt in range(3):
            proc, log = spawn(f"{point}-{attempt}", {"RAYEMBED_TEST_KILL_AT": point})
            try:
                rc = proc.wait(timeout=300)
            finally:
                reap(proc)
            if not startup_failed(rc, log):
                break
        assert rc == 137, f"the {point} hook never fired (rc {rc}): " + _tail(log)
        assert len(_v2_markers(out)) == committed, (point, _v2_markers(out))
        v1_intact(f"after a kill at {point}")

    # 1. Killed once the match pass is done, before the main pass: no shard of version 2 committed.
    kill_at("refresh.after_match", 0)

    # 2. SIGKILLed right after its first shard commit (the driver sleeps 3 s after each one).
    for attempt in range(3):
        proc, log = spawn(f"commit-{attempt}", {"RAYEMBED_TEST_COMMIT_DELAY": "3"})
        try:
            deadline = time.time() + 300
            while not _v2_markers(out) and time.time() < deadline and proc.poll() is None:
                time.sleep(0.2)
        finally:
            reap(proc)
        if not startup_failed(proc.returncode, log):
            break
    committed = _v2_markers(out)
    assert 1 <= len(committed) < len(SMALL_REWRITTEN), (committed, _tail(log))
    v1_intact("after a SIGKILL after the first shard commit")

    # 3. This attempt resumes (the committed shards stay), commits the rest, and dies before the version record.
    kill_at("runner.before_manifest", len(SMALL_REWRITTEN))

    # The rerun, in process: every shard was committed by the interrupted attempts; it writes the version.
    stdout = embed_ok(argv)
    assert "rayembed embed: 6 shards (0 processed, 6 already committed), " in stdout, stdout
    record = versions.latest(out)
    assert record["version"] == 2 and versions.list_versions(out) == [1, 2]
    # Counts of the whole version, exactly as an uninterrupted refresh has them: `embedded` counts the rows this
    # version's run sent to the model, over its interrupted attempts too (the same run resumed).
    check_record(record, 2, SMALL_COUNTS, stdout)
    _check_small_v2(out, record, ref, small_clean)
    assert digests(v1_urls) == v1_bytes, "a file of version 1 was overwritten"
    same_rows(snapshot(out, 1), v1_rows)


def test_s3_refresh_on_moto(s3_server, qwen_model_dir, ray_local, ref, small_clean, tmp_path):
    bucket = s3_server.new_bucket("refresh")
    so = s3_server.storage_options
    fs = s3_server.fs()
    local = str(tmp_path / "shards")
    inp, out = f"s3://{bucket}/in/", f"s3://{bucket}/out"
    argv = embed_args(inp, out, qwen_model_dir, *so_args(so))

    def upload(stems: list[str]) -> None:
        for stem in stems:
            fs.put_file(os.path.join(local, f"{stem}.parquet"), f"{bucket}/in/{stem}.parquet")
        fs.invalidate_cache()

    write_shards(local, small_v1())
    upload([f"s{k}" for k in range(SMALL_SHARDS)])
    stdout = embed_ok(argv)
    r1 = versions.latest(out, so)
    check_record(r1, 1, _counts(48, 48, 0, 48, 0), stdout)
    v1_rows = snapshot(out, 1, so)
    check_snapshot(v1_rows, all_docs(small_v1()), ref)

    write_shards(local, small_v2(), only=SMALL_REWRITTEN)
    upload(SMALL_REWRITTEN)  # s5 keeps its object (and ETag)
    stdout = embed_ok(argv)
    r2 = versions.latest(out, so)
    check_record(r2, 2, SMALL_COUNTS, stdout)
    assert "rayembed embed: 6 shards (5 processed, 1 already committed), " in stdout, stdout
    assert r2["shards"]["s5"]["files"] == r1["shards"]["s5"]["files"]
    assert all(u.startswith(f"s3://{bucket}/out/data/") for u in files_urls(out, so=so))
    _check_small_v2(out, r2, ref, small_clean, so)
    same_rows(snapshot(out, 1, so), v1_rows)  # version 1 stays readable, unchanged
    assert not s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads")
