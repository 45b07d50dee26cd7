"""Versioned outputs (pipelines/versions.py), `rayembed files` and `rayembed vacuum`: Ray-free, on fixture outputs."""

from __future__ import annotations

import os
import socket
import time

import pyarrow.parquet as pq
import pytest

from operators import storage
from operators.errors import ConfigError
from pipelines import cli, versions
from pipelines.lease import LeaseHeldError, lease_url
from tests.version_fixtures import VersionedOutput, read_snapshot


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _three_versions(out: str) -> VersionedOutput:
    vo = VersionedOutput(out, shards=4)
    vo.backfill(60)
    vo.refresh(changed=[1, 2], deleted=[3], new=[100], passthrough_only=[5])  # shards 1, 2, 3 (5 % 4 = 1, 100 % 4 = 0)
    vo.refresh(changed=[1], deleted=[2])  # shards 1 and 2 only: shards 0 and 3 stay shared with version 2
    return vo


def _rows(table) -> dict:
    return {r["id"]: r for r in table.to_pylist()}


def test_commit_order_and_reads(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    assert versions.latest(out) is None and versions.list_versions(out) == []
    written: list[str] = []
    real = storage.write_json
    monkeypatch.setattr(storage, "write_json", lambda url, obj, so=None: (written.append(url), real(url, obj, so)))
    vo = VersionedOutput(out)
    rec1 = vo.backfill(20)
    assert [os.path.relpath(u, out) for u in written] == ["_versions/00000001.json", "_manifest.json"]
    rec2 = vo.refresh(changed=[1], deleted=[2])
    assert versions.list_versions(out) == [1, 2]
    assert versions.latest(out) == versions.load_version(out, 2) == storage.read_json(versions.version_url(out, 2))
    assert versions.load_version(out, 1) == rec1 and rec1["parent"] is None and rec2["parent"] == 1
    assert rec1["deltas"] == {"upserts": [], "deletes": []}
    assert versions.delta_dir(out, 2, "deletes") == os.path.join(out, "_deltas", "00000002", "deletes")
    assert versions.snapshot_urls(out, rec2) == [os.path.join(out, f) for f in rec2["files"]]
    with pytest.raises(ConfigError, match=r"has no version 7 \(it holds versions 1\.\.2"):
        versions.load_version(out, 7)


def test_interrupted_commit_is_not_a_version(tmp_path):
    """_versions/N.json written, _manifest.json not yet: N is not committed, and the rerun may write N again."""
    out = str(tmp_path / "out")
    vo = VersionedOutput(out)
    vo.backfill(10)
    orphan = versions.make_record(2, "key-a", ["data/x.parquet"], upserts=["_deltas/00000002/upserts/x.parquet"])
    storage.write_json(versions.version_url(out, 2), orphan)
    assert versions.list_versions(out) == [1] and versions.latest(out)["version"] == 1
    with pytest.raises(ConfigError, match="has no version 2"):
        versions.load_version(out, 2)
    vo.refresh(changed=[1])  # the rerun commits version 2 over the orphan record
    assert versions.load_version(out, 2)["files"] != ["data/x.parquet"]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(version=3, parent=2), "cannot commit version 3 .* latest committed version is 1"),
        (dict(parent=None), "version 2 must have parent 1"),
        (dict(output_key="key-b"), "another output key"),
        (dict(files=["/abs/data/a.parquet"]), "files must be a list of paths relative to the output"),
        (dict(format="rayembed.manifest/1"), "has format 'rayembed.manifest/1'"),
    ],
)
def test_commit_refusals(tmp_path, change, message):
    out = str(tmp_path / "out")
    VersionedOutput(out).backfill(5)
    record = {**versions.make_record(2, "key-a", ["data/a.parquet"]), **change}
    with pytest.raises(ConfigError, match=message):
        versions.commit_version(out, record)
    assert versions.latest(out)["version"] == 1


def test_backfill_has_no_deltas(tmp_path):
    with pytest.raises(ConfigError, match="version 1 is a backfill"):
        versions.commit_version(str(tmp_path), versions.make_record(1, "k", [], upserts=["_deltas/00000001/x"]))


def test_pre_versioning_manifest_is_named(tmp_path):
    storage.write_json(str(tmp_path / "_manifest.json"), {"format": "rayembed.manifest/1", "files": []})
    with pytest.raises(ConfigError, match="format 'rayembed.manifest/1', not 'rayembed.version/1'"):
        versions.latest(str(tmp_path))


def test_files_prints_one_version(tmp_path, capsys, monkeypatch):
    """`rayembed files --version 1` after two refreshes returns exactly version 1's rows, as absolute URLs."""
    monkeypatch.chdir(tmp_path)
    vo = _three_versions("out")  # a relative output: the printed URLs are absolute all the same
    for version in (1, 3, None):
        rc, stdout, _ = _run(["files", "out", *(["--version", str(version)] if version else [])], capsys)
        urls = stdout.split()
        assert rc == 0 and urls and all(os.path.isabs(u) for u in urls)
        rows = _rows(pq.ParquetDataset(urls).read())
        expected = vo.snapshot(version)
        assert sorted(rows) == sorted(expected)
        for id_, row in expected.items():
            assert rows[id_] == row
    rc, _, err = _run(["files", "out", "--version", "9"], capsys)
    assert rc == 2 and err.strip() == (
        "rayembed: error: output 'out' has no version 9 (it holds versions 1..3; older ones may have been vacuumed)"
    )
    rc, _, err = _run(["files", str(tmp_path / "empty")], capsys)
    assert rc == 2 and "has no committed version (no _manifest.json)" in err


def _leftovers(out: str) -> list[str]:
    """What an interrupted run leaves: an unreferenced part, a killed writer's temp file, a delta directory and an
    uncommitted record of the version it was writing, and the marker of its shard."""
    rels = [
        "data/shard01-v0004-000000000000.parquet",
        "data/.tmp-abc.shard02-v0004-000000000000.parquet",
        "_deltas/00000004/upserts/part-000000.parquet",
        "_errors/shard01-v0004-000000000000.parquet",
    ]
    for rel in rels:
        storage.write_bytes(storage.join(out, rel), b"partial")
    storage.write_json(versions.version_url(out, 4), versions.make_record(4, "key-a", [rels[0]]))
    storage.write_json(storage.join(out, "_state", "shard01.json"), {"stem": "shard01", "files": [rels[0]]})
    return rels


def test_vacuum_keep_1(tmp_path, capsys):
    out = str(tmp_path / "out")
    vo = _three_versions(out)
    latest_files = versions.latest(out)["files"]
    old_only = set(versions.load_version(out, 1)["files"]) | set(versions.load_version(out, 2)["files"])
    old_only -= set(latest_files)
    assert old_only and set(latest_files) & set(versions.load_version(out, 2)["files"])  # shared parts exist
    leftovers = _leftovers(out)
    storage.write_json(storage.join(out, "_state", "shard00.json"), {"stem": "shard00", "files": latest_files[:1]})
    storage.write_bytes(storage.join(out, "metrics.json"), b"{}")  # not vacuum's business

    rc, stdout, _ = _run(["vacuum", out, "--keep", "1"], capsys)
    assert rc == 0
    assert stdout.strip() == (
        "vacuum: kept version 3; removed 3 version record(s), 9 data/error file(s), 3 delta file(s), 1 stale marker(s)"
    )
    assert versions.list_versions(out) == [3]
    assert sorted(os.listdir(os.path.join(out, "_versions"))) == ["00000003.json"]
    assert sorted(os.listdir(os.path.join(out, "data"))) == sorted(os.path.basename(f) for f in latest_files)
    assert sorted(os.listdir(os.path.join(out, "_deltas"))) == ["00000003"]  # its own deltas stay
    for rel in leftovers:
        assert not os.path.exists(os.path.join(out, rel))
    assert os.listdir(os.path.join(out, "_state")) == ["shard00.json"]  # its file is retained
    assert os.path.exists(os.path.join(out, "metrics.json"))
    assert _rows(read_snapshot(out)) == vo.snapshot()  # the latest snapshot is intact
    with pytest.raises(ConfigError, match="has no version 1"):
        versions.load_version(out, 1)
    rc, stdout, _ = _run(["vacuum", out, "--keep", "1"], capsys)  # nothing left to do
    assert "removed 0 version record(s), 0 data/error file(s), 0 delta file(s)" in stdout


def test_vacuum_keep_2_keeps_what_version_2_references(tmp_path, capsys):
    out = str(tmp_path / "out")
    vo = _three_versions(out)
    rc, stdout, _ = _run(["vacuum", out, "--keep", "2", "--dry-run"], capsys)
    assert rc == 0 and stdout.startswith("vacuum: kept versions 2..3; would remove 1 version record(s)")
    assert versions.list_versions(out) == [1, 2, 3]  # a dry run removes nothing
    summary = versions.vacuum(out, 2)
    assert summary.removed_versions == [1]
    for n in (2, 3):
        record = versions.load_version(out, n)
        for rel in record["files"] + record["deltas"]["upserts"] + record["deltas"]["deletes"]:
            assert os.path.exists(os.path.join(out, rel)), rel
        assert _rows(read_snapshot(out, n)) == vo.snapshot(n)
    assert not os.path.exists(os.path.join(out, "_deltas", "00000001"))


def test_vacuum_refuses_under_a_live_lease(tmp_path):
    out = str(tmp_path / "out")
    _three_versions(out)
    lease = {
        "holder": {"host": "other-host", "pid": 4242, "job_id": "abc123"},
        "heartbeat_at": time.time(),
        "ttl_s": 60,
    }
    storage.write_json(lease_url(out), lease)
    with pytest.raises(LeaseHeldError) as e:
        versions.vacuum(out, 1)
    assert str(e.value) == (
        f"output {out!r} is leased by job abc123 (pid 4242 on other-host): vacuum refuses while a job runs on it; "
        "retry when the job has finished"
    )
    assert versions.list_versions(out) == [1, 2, 3]
    # A dead holder (its pid is gone on this host) does not block: vacuum takes the lease over.
    storage.write_json(lease_url(out), {**lease, "holder": {"host": socket.gethostname(), "pid": 2**22 + 1}})
    assert versions.vacuum(out, 1).removed_versions == [1, 2]
    assert storage.read_json(lease_url(out))["released_at"]


def test_vacuum_bad_keep_and_empty_output(tmp_path):
    with pytest.raises(ConfigError, match="--keep must be an integer >= 1"):
        versions.vacuum(str(tmp_path), 0)
    with pytest.raises(ConfigError, match="has no committed version"):
        versions.vacuum(str(tmp_path / "nothing"), 1)
    assert not os.path.exists(tmp_path / "nothing")  # no lease file written on an empty prefix
