"""`rayembed sync` into LanceDB (embedded) and PostgreSQL + pgvector (a real server from pgserver), on versioned
fixture outputs in the embed job's layout (tests/version_fixtures.py; tests/test_sync_e2e.py runs the embed job
itself). Every check compares the store with the snapshot read through `rayembed files`."""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

from operators import storage
from pipelines import cli, versions
from pipelines.lease import lease_state, lease_url
from pipelines.sync import SyncError, sync
from tests import version_fixtures
from tests.version_fixtures import (
    LanceTarget,
    PgTarget,
    add_password_role,
    assert_matches,
    other_writer,
    start_pg,
)

# Outputs in the embed job's layout, one upserts file per rewritten part (several files per version's delta).
VersionedOutput = functools.partial(version_fixtures.VersionedOutput, delta_parts=True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSWORD = "s3cr3t-Pw-for-the-test"


# ------------------------------------------------------------------------------------------------------ the stores


@pytest.fixture(scope="module")
def pg_server():
    with start_pg() as srv:
        yield srv


@pytest.fixture(params=["lance", "pg"])
def target(request, tmp_path):
    if request.param == "lance":
        return LanceTarget(str(tmp_path / "lancedb"))
    return PgTarget(request.getfixturevalue("pg_server").get_uri())


@pytest.fixture
def table(request) -> str:
    """A table name unique to the test (PostgreSQL tables share one database)."""
    return re.sub(r"\W+", "_", request.node.name).strip("_").lower()[-50:]


def _refresh(vo: VersionedOutput, k: int = 0) -> dict:
    """Changed, deleted, new and pass-through-only rows, 2-3 of each; offsets k that differ by 5 or more touch
    disjoint ids."""
    ids = lambda *xs: [vo.make_id(x + k) for x in xs]  # noqa: E731
    return vo.refresh(changed=ids(1, 11, 21), deleted=ids(2, 12), new=ids(1000, 1001), passthrough_only=ids(3, 13))


def _run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out.strip(), err.strip()


# ----------------------------------------------------------------------------------------------------- behaviour


def test_backfill_refresh_then_nothing(target, table, tmp_path, capsys):
    out = str(tmp_path / "out")
    vo = VersionedOutput(out)
    vo.backfill(120)
    rc, line, _ = _run_cli(["sync", out, "--to", target.to, "--table", table, "--batch-rows", "16"], capsys)
    assert rc == 0 and re.fullmatch(
        r"sync: .*: bulk-loaded version 1 \(120 rows\) in [\d.]+s; store at version 1", line
    )
    assert_matches(target, table, out)

    _refresh(vo)
    rc, line, _ = _run_cli(["sync", out, "--to", target.to, "--table", table], capsys)
    assert rc == 0 and re.search(r"applied version 2 \(2 deleted, 7 upserted\) in [\d.]+s; store at version 2$", line)
    assert_matches(target, table, out)

    before = target.marker(table)
    if target.kind == "lance":  # the newest tag names the table version that holds output version 2; only that one
        assert before[1] == ["rayembed-v00000002"]
    rc, line, _ = _run_cli(["sync", out, "--to", target.to, "--table", table], capsys)
    assert rc == 0 and line.endswith(": already at version 2; nothing to apply")
    assert target.marker(table) == before  # LanceDB: the table version does not move
    assert_matches(target, table, out)


def test_two_refreshes_one_sync_in_order(target, table, tmp_path):
    out = str(tmp_path / "out")
    vo = VersionedOutput(out)
    vo.backfill(60)
    sync(out, target.to, table)
    vo.refresh(changed=[1, 5], deleted=[2, 7], passthrough_only=[9])
    vo.refresh(changed=[1], deleted=[5], new=[2, 500], passthrough_only=[9])  # 2 comes back; 1 and 9 change again
    result = sync(out, target.to, table)
    assert result.applied == [2, 3] and result.version == 3 and (result.deleted, result.upserted) == (3, 7)
    assert_matches(target, table, out)


def test_sync_to_a_given_version_then_on(target, table, tmp_path):
    out = str(tmp_path / "out")
    vo = VersionedOutput(out)
    vo.backfill(40)
    _refresh(vo)
    _refresh(vo, 5)
    assert sync(out, target.to, table, version=2).loaded == 2
    assert_matches(target, table, out, 2)
    assert sync(out, target.to, table).applied == [3]
    assert_matches(target, table, out, 3)
    with pytest.raises(
        SyncError, match=r"is at version 3, ahead of the requested --version 2: a store is never rolled"
    ):
        sync(out, target.to, table, version=2)


def _sync_process(out: str, to: str, table: str, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipelines.cli", "sync", out, "--to", to, "--table", table]
    return subprocess.Popen(
        cmd, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_killed_between_deletes_and_upserts_then_rerun(target, table, tmp_path):
    out = str(tmp_path / "out")
    vo = VersionedOutput(out)
    vo.backfill(80)
    sync(out, target.to, table)
    _refresh(vo)
    proc = _sync_process(out, target.to, table, RAYEMBED_TEST_KILL_AT="sync.after_deletes")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 137, err
    if target.kind == "pg":
        assert_matches(target, table, out, 1)  # the version's transaction never committed
    else:
        assert len(target.rows(table)) == 80 - 2  # the deletes landed; the recorded version did not move
    result = sync(out, target.to, table)
    assert result.applied == [2]
    assert_matches(target, table, out)
    sync(out, target.to, table + "_clean")  # an uninterrupted sync ends in the same rows
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(target.rows(table), key=key) == sorted(target.rows(table + "_clean"), key=key)


def test_killed_during_the_bulk_load_then_rerun(target, table, tmp_path):
    out = str(tmp_path / "out")
    VersionedOutput(out, shards=4).backfill(80)  # 4 data files: the kill comes after the first one was sent
    proc = _sync_process(out, target.to, table, RAYEMBED_TEST_KILL_AT="sync.file_read")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 137, err
    result = sync(out, target.to, table)  # nothing was committed: the rerun loads the snapshot from scratch
    assert result.loaded == 1 and result.rows == 80
    assert_matches(target, table, out)


def test_a_version_without_changes_only_moves_the_recorded_version(target, table, tmp_path):
    out = str(tmp_path / "out")
    vo = VersionedOutput(out)
    vo.backfill(20)
    sync(out, target.to, table)
    vo.refresh()
    result = sync(out, target.to, table)
    assert result.applied == [2] and (result.deleted, result.upserted) == (0, 0)
    assert sync(out, target.to, table).applied == []
    assert_matches(target, table, out)


def test_refuses_a_filled_table_without_sync_state(target, table, tmp_path):
    out = str(tmp_path / "out")
    VersionedOutput(out).backfill(12)
    sync(out, target.to, table)
    target.forget_state(table)  # the same rows, loaded by hand: rayembed does not know what they are
    with pytest.raises(SyncError, match=r"exists with (12 )?rows and no rayembed sync state: drop it"):
        sync(out, target.to, table)


def test_float16_vectors_and_string_ids(target, table, tmp_path):
    out = str(tmp_path / "out")
    vo = VersionedOutput(out, dtype="float16", id_type="string")
    vo.backfill(50)
    sync(out, target.to, table)
    _refresh(vo)  # string ids with quotes in them, deleted and upserted
    assert sync(out, target.to, table).applied == [2]
    assert_matches(target, table, out)


def test_a_refresh_from_another_writer_keeps_the_store_types(target, table, tmp_path):
    """A refresh whose input was rewritten by another writer (large_string, int64, ns: the same output key) applies,
    cast to the store's column types; a value that does not fit them is refused with one line."""
    out = str(tmp_path / "out")
    vo = VersionedOutput(out)
    vo.backfill(40)
    sync(out, target.to, table)
    vo.schema = other_writer(vo.schema)
    _refresh(vo)
    assert sync(out, target.to, table).applied == [2]
    assert_matches(target, table, out)
    if target.kind == "pg":
        types = target.column_types(table)
        assert (types["n"], types["title"], types["tags"]) == ("integer", "text", "jsonb")
    else:
        schema = target._table(table).schema
        assert (schema.field("n").type, schema.field("title").type) == (pa.int32(), pa.string())
    vo.rows[5]["n"] = 2**40  # the store's column is int32
    vo.refresh(changed=[1, 21], passthrough_only=[5])  # one upserts file: 1, 5, 21
    with pytest.raises(SyncError, match=r"column 'n' \(int64\) does not fit the store's int32: Integer value 10"):
        sync(out, target.to, table, batch_rows=1)  # the second batch: LanceDB's reader is reading when it fails
    assert sync(out, target.to, table, version=2).applied == []  # still at version 2


def test_castable_kinds():
    """Another width or encoding of the same kind of value casts (values allowing); another kind never does."""
    from pipelines.sync.base import castable

    ts = pa.timestamp
    for src, dst in [
        (pa.large_string(), pa.string()),
        (pa.int64(), pa.int32()),
        (pa.float64(), pa.int64()),  # pandas' ints with nulls: each value is checked by the cast
        (ts("ns", tz="UTC"), ts("us", tz="UTC")),
        (pa.large_list(pa.large_string()), pa.list_(pa.string())),
        (pa.dictionary(pa.int32(), pa.string()), pa.string()),
    ]:
        assert castable(src, dst), (src, dst)
    for src, dst in [
        (pa.string(), pa.int64()),
        (pa.binary(), pa.binary(16)),
        (ts("us"), ts("us", tz="UTC")),
        (pa.list_(pa.float32(), 8), pa.list_(pa.float32(), 16)),
        (pa.list_(pa.string()), pa.string()),
    ]:
        assert not castable(src, dst), (src, dst)


def test_index_hnsw_after_the_bulk_load(target, table, tmp_path):
    out = str(tmp_path / "out")
    VersionedOutput(out).backfill(300)
    sync(out, target.to, table, index="hnsw")
    assert target.has_index(table)
    assert_matches(target, table, out)


def test_pgvector_wire_format():
    """pgvector's binary input: int16 dim, int16 0, then big-endian float4 (vector) or float2 (halfvec) values."""
    import pyarrow as pa

    from pipelines.sync.pgtypes import vector_bytes

    rows = np.array([[1.0, -2.5, 0.125], [3.0, 0.0, -1.0]], np.float32)
    array = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), 3)
    for half, elem in ((False, ">f4"), (True, ">f2")):
        for got, want in zip(vector_bytes(array, 3, half), rows):
            assert np.frombuffer(got[:4], ">i2").tolist() == [3, 0]
            assert np.frombuffer(got[4:], elem).tolist() == want.tolist()
    with_null = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), 3, mask=pa.array([False, True]))
    assert vector_bytes(with_null, 3, False)[1] is None


# ------------------------------------------------------------------------------------------------------- refusals


def test_refuses_a_store_of_another_output_key(target, table, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    VersionedOutput(a).backfill(30)
    VersionedOutput(b, output_key="key-b").backfill(30)
    sync(a, target.to, table)
    with pytest.raises(SyncError, match=r"holds vectors of output key key-a, this output has key key-b \(another"):
        sync(b, target.to, table)
    assert_matches(target, table, a)


def test_refuses_a_store_ahead_of_the_output(target, table, tmp_path):
    out, backup = str(tmp_path / "out"), str(tmp_path / "backup")
    vo = VersionedOutput(out)
    vo.backfill(30)
    _refresh(vo)
    shutil.copytree(out, backup)  # the output as a backup holds it at version 2
    _refresh(vo, 5)
    sync(out, target.to, table)
    with pytest.raises(SyncError, match=r"is at version 3, ahead of the output's version 2 \(was the output restored"):
        sync(backup, target.to, table)
    assert_matches(target, table, out)


def test_refuses_when_needed_deltas_were_vacuumed(target, table, tmp_path):
    out = str(tmp_path / "out")
    vo = VersionedOutput(out)
    vo.backfill(30)
    sync(out, target.to, table)
    _refresh(vo)
    _refresh(vo, 5)
    versions.vacuum(out, 1)
    with pytest.raises(SyncError, match=r"is at version 1, but version 2's record and deltas are gone"):
        sync(out, target.to, table)


def test_refuses_a_second_concurrent_sync(target, table, tmp_path):
    out = str(tmp_path / "out")
    VersionedOutput(out).backfill(20)
    proc = _sync_process(out, target.to, table, RAYEMBED_TEST_SLEEP_AT="sync.locked:60")
    try:
        lease = os.path.join(target.dir, "_rayembed_sync", table) if target.kind == "lance" else None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if lease and lease_state(storage.read_json(lease_url(lease))) == "live":
                break
            if not lease and target.query("SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"):
                break
            time.sleep(0.2)
        holder = rf"job \w+ \(pid {proc.pid} on " if lease else r"backend pid \d+ \(rayembed-sync\)"
        with pytest.raises(SyncError, match=rf"is being synced by {holder}.*one sync at a time per table"):
            sync(out, target.to, table)
    finally:
        proc.kill()
        proc.communicate()
    # The killed holder's lease is dead at once (its pid is gone); its PostgreSQL backend ends when it reads EOF.
    while target.kind == "pg" and target.query("SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"):
        time.sleep(0.1)
    assert sync(out, target.to, table).loaded == 1


def test_refuses_an_incompatible_table(target, table, tmp_path, capsys):
    out = str(tmp_path / "out")
    VersionedOutput(out).backfill(10)
    target.make_incompatible(table)
    rc, _, err = _run_cli(["sync", out, "--to", target.to, "--table", table], capsys)
    assert rc == 2 and err.count("\n") == 0
    needs = "vector(16)" if target.kind == "pg" else "fixed_size_list<element: float>[16]"
    assert re.search(
        rf"exists with an incompatible schema: column 'embedding' is .*8.* in the table, .*{re.escape(needs)}", err
    )


# -------------------------------------------------------------------------------------------------- bad arguments


def test_unknown_scheme(tmp_path, capsys):
    VersionedOutput(str(tmp_path / "out")).backfill(5)
    rc, _, err = _run_cli(
        ["sync", str(tmp_path / "out"), "--to", f"mongodb://u:{PASSWORD}@h/db", "--table", "t"], capsys
    )
    assert rc == 2 and err == (
        "rayembed: error: --to 'mongodb://...': unknown store scheme; use lancedb://<dir or s3://bucket/dir> or "
        "postgresql://user@host:5432/db"
    )


def test_missing_table_and_to(tmp_path, capsys):
    VersionedOutput(str(tmp_path / "out")).backfill(5)
    rc, _, err = _run_cli(["sync", str(tmp_path / "out"), "--to", f"lancedb://{tmp_path}/db"], capsys)
    assert rc == 2 and err == "rayembed: error: --table is required: the table to create or update in the store"
    rc, _, err = _run_cli(["sync", str(tmp_path / "out"), "--table", "t"], capsys)
    assert rc == 2 and err == "rayembed: error: --to is required: lancedb://DIR or a postgresql:// URI"


def test_unreachable_postgres_fails_fast(tmp_path, capsys):
    VersionedOutput(str(tmp_path / "out")).backfill(5)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/postgres"
    t0 = time.monotonic()
    rc, _, err = _run_cli(["sync", str(tmp_path / "out"), "--to", uri, "--table", "t"], capsys)
    assert time.monotonic() - t0 < 30  # libpq's default is to wait forever; a refused port answers at once
    assert rc == 2 and err.startswith(
        f"rayembed: error: cannot connect to PostgreSQL at postgresql://postgres:***@127.0.0.1:{port}/postgres: "
        "connection failed: "
    )
    assert "Connection refused" in err and PASSWORD not in err and err.count("\n") == 0


def test_silent_postgres_times_out(tmp_path, capsys, monkeypatch):
    """A host that accepts the connection and never answers (a blackholed port, a hung server): libpq alone would
    wait forever; the sync gives up after the connect timeout."""
    from pipelines.sync import postgres

    monkeypatch.setattr(postgres, "CONNECT_TIMEOUT_S", 2)
    VersionedOutput(str(tmp_path / "out")).backfill(5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()  # the kernel completes the handshake; nobody ever reads or writes
        port = s.getsockname()[1]
        t0 = time.monotonic()
        rc, _, err = _run_cli(
            ["sync", str(tmp_path / "out"), "--to", f"postgresql://u@127.0.0.1:{port}/db", "--table", "t"], capsys
        )
    assert time.monotonic() - t0 < 30  # 2 s here; without a connect timeout libpq waits for the kernel (minutes)
    assert rc == 2 and "cannot connect to PostgreSQL" in err and "timeout expired" in err, err


@pytest.fixture(scope="module")
def password_user(pg_server):
    """A role that must authenticate with a password (the test server trusts local connections otherwise)."""
    return add_password_role(pg_server, "pwuser", PASSWORD)


def test_wrong_password_is_not_shown(password_user, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    VersionedOutput(out).backfill(5)
    wrong = PASSWORD + "-wrong"
    for uri, env in [
        (f"postgresql://pwuser:{wrong}@/postgres?host={password_user}", None),
        (f"postgresql://pwuser@/postgres?host={password_user}", wrong),  # PGPASSWORD
    ]:
        if env:
            monkeypatch.setenv("PGPASSWORD", env)
        rc, stdout, err = _run_cli(["sync", out, "--to", uri, "--table", "t"], capsys)
        assert rc == 2 and err.count("\n") == 0
        assert 'password authentication failed for user "pwuser"' in err
        assert err.startswith("rayembed: error: cannot connect to PostgreSQL at postgresql://pwuser")
        assert wrong not in err + stdout and PASSWORD not in err + stdout
    # The right password through PGPASSWORD works.
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    rc, stdout, err = _run_cli(
        ["sync", out, "--to", f"postgresql://pwuser@/postgres?host={password_user}", "--table", "pwschema.docs"],
        capsys,
    )
    assert rc == 0, err
    assert "bulk-loaded version 1 (5 rows)" in stdout and PASSWORD not in stdout


def test_help_imports_no_store_client():
    code = (
        "import sys\nfrom pipelines import cli\n"
        "for argv in (['sync', '--help'], ['files', '--help'], ['vacuum', '--help']):\n"
        "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
        "bad = [m for m in ('torch', 'lancedb', 'psycopg', 'ray') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--to TO" in proc.stdout and "--table TABLE" in proc.stdout
