"""The output-prefix lease, `rayembed status`, the new options, and the duplicate-id policy."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators import storage
from operators.errors import ConfigError
from pipelines import cli
from pipelines.config import build_embed_config
from pipelines.lease import Lease, LeaseHeldError, lease_state, lease_url
from tests.corpus import make_docs, write_parquet


def _lease_file(out, *, host="other-host", pid=4242, job="abc123", age=0.0, ttl=30.0, **extra) -> None:
    os.makedirs(out, exist_ok=True)
    rec = {"holder": {"host": host, "pid": pid, "job_id": job}, "heartbeat_at": time.time() - age, "ttl_s": ttl}
    storage.write_json(lease_url(str(out)), {**rec, **extra})


def test_live_lease_refuses_and_names_holder(tmp_path):
    _lease_file(tmp_path / "out", age=2)
    with pytest.raises(LeaseHeldError, match=r"leased by job abc123 \(pid 4242 on other-host\), last heartbeat 2s"):
        Lease(str(tmp_path / "out")).acquire()


@pytest.mark.parametrize(
    "kind, lease",
    [
        ("expired", dict(age=31, ttl=30)),
        ("dead", dict(host=socket.gethostname(), pid=2**22 + 12345)),  # above pid_max: never alive
        ("released", dict(released_at=1.0, outcome="succeeded")),
    ],
)
def test_stale_lease_is_taken_over(kind, lease, tmp_path):
    out = tmp_path / "out"
    _lease_file(out, **lease)
    assert lease_state(storage.read_json(lease_url(str(out)))) == kind
    held = Lease(str(out), ttl=5, heartbeat=0.2).acquire()
    try:
        first = storage.read_json(lease_url(str(out)))
        assert first["holder"] == {"host": socket.gethostname(), "pid": os.getpid(), "job_id": held.job_id}
        time.sleep(0.7)
        assert storage.read_json(lease_url(str(out)))["heartbeat_at"] > first["heartbeat_at"]  # the driver thread
        with pytest.raises(LeaseHeldError, match=held.job_id):
            Lease(str(out)).acquire()  # a second job while this one lives
    finally:
        held.release("succeeded")
    rec = storage.read_json(lease_url(str(out)))
    assert rec["outcome"] == "succeeded" and lease_state(rec) == "released"


def test_lease_lost_to_another_job_stops_the_holder(tmp_path):
    out = tmp_path / "out"
    held = Lease(str(out), ttl=5, heartbeat=0.2).acquire()
    _lease_file(out, job="intruder")
    time.sleep(0.8)
    with pytest.raises(LeaseHeldError, match="taken by job intruder"):
        held.check()
    held.release()
    assert storage.read_json(lease_url(str(out)))["holder"]["job_id"] == "intruder"  # not overwritten


def test_options_validated_and_documented(capsys):
    base = {"input": "x", "output": "y"}
    with pytest.raises(ConfigError, match="--lease-heartbeat must be positive and below --lease-ttl"):
        build_embed_config({**base, "lease_ttl": 5, "lease_heartbeat": 5})
    with pytest.raises(ConfigError, match="--retry-budget"):
        build_embed_config({**base, "retry_budget": -1})
    cfg = build_embed_config({**base, "lease_ttl": 30, "lease_heartbeat": 3, "retry_budget": 10})
    assert (cfg.lease_ttl, cfg.lease_heartbeat, cfg.retry_budget) == (30, 3, 10)
    with pytest.raises(SystemExit):
        cli.main(["embed", "--help"])
    helptext = capsys.readouterr().out
    for flag in ("--lease-ttl", "--lease-heartbeat", "--retry-budget"):
        assert flag in helptext
    with pytest.raises(SystemExit):
        cli.main(["status", "--help"])
    assert "pending" in capsys.readouterr().out


def test_status_failed_shard_duplicates_and_released_lease(tmp_path, qwen_model_dir, ray_local, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    docs = make_docs(6, seed=1)
    docs.append({**docs[0], "text": "a different text under the same id"})  # duplicate id 0
    write_parquet(docs, str(inp / "a.parquet"))
    write_parquet(make_docs(4, seed=2, start_id=50), str(inp / "b.parquet"))
    broken = make_docs(5, seed=5, start_id=70)
    write_parquet(broken, str(inp / "broken.parquet"))
    data = (inp / "broken.parquet").read_bytes()
    (inp / "broken.parquet").write_bytes(data[: len(data) // 2])  # a truncated shard: one shard-level record
    args = ["embed", "--input", str(inp), "--output", str(out), "--model", qwen_model_dir, "-q"]
    assert cli.main([*args, "--max-error-ratio", "1"]) == 0
    assert "0 storage retries" in capsys.readouterr().out

    # Ids are keys: the second row with id 0 is quarantined as DuplicateId, the first one is written.
    from tests.pipeline_checks import read_output

    _, table = read_output(str(out))
    assert sorted(table["id"].to_pylist()) == sorted([d["id"] for d in docs[:6]] + list(range(50, 54)))
    dup = pq.read_table(out / "_errors" / "a-000000000000-v00000001.parquet").to_pylist()
    assert [(r["row_offset"], r["error_type"]) for r in dup] == [(6, "DuplicateId")]

    assert cli.main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "shards: 2 done, 1 failed, 0 pending, 0 stale (input changed), 3 in the input" in text
    assert "rows: 10 written, 2 quarantined, 0 truncated" in text
    assert "\n    broken: CorruptShard at row 0: shard unreadable after 0 rows: ArrowInvalid: " in text
    assert "lease: released; last job" in text and "succeeded" in text
    assert "manifest: written" in text and "3 shards, 10 rows, 2 quarantined" in text
    assert "version: 1 (10 rows, 10 embedded, 0 reused, 10 upserted, 0 deleted, 2 quarantined)" in text
    assert cli.main(["status", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (failed,) = report["failed"]
    assert (failed["shard"], failed["error_type"], failed["row_offset"]) == ("broken", "CorruptShard", 0)
    assert failed["message"].startswith("shard unreadable after 0 rows: ArrowInvalid")
    assert report["done"] == 2 and report["shards_with_quarantined_rows"] == ["a", "broken"]

    # While a job runs (markers, no manifest, input unknown), failed shards show the same way; a shard with only
    # row-level errors is not failed.
    mid = tmp_path / "mid"
    shutil.copytree(out / "_state", mid / "_state")
    shutil.copytree(out / "_errors", mid / "_errors")
    b_marker = storage.read_json(str(mid / "_state" / "b.json"))
    storage.write_json(
        str(mid / "_state" / "b.json"), {**b_marker, "errors": 1, "error_files": ["_errors/b-000000000001.parquet"]}
    )
    pq.write_table(
        pa.table({"id": ["51"], "shard": ["b"], "row_offset": [1], "error_type": ["InvalidText"], "message": ["x"]}),
        mid / "_errors" / "b-000000000001.parquet",
    )
    assert cli.main(["status", str(mid)]) == 0
    text = capsys.readouterr().out
    assert "shards: 2 done, 1 failed (input unknown" in text and "    broken: CorruptShard at row 0" in text
    assert "shards with quarantined rows: a, b, broken" in text and "manifest: none" in text

    # A new shard is pending; a rewritten one is stale. --json gives the same report as data.
    write_parquet(make_docs(3, seed=3, start_id=90), str(inp / "c.parquet"))
    time.sleep(0.01)
    write_parquet(make_docs(5, seed=4, start_id=50), str(inp / "b.parquet"))
    assert cli.main(["status", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pending"] == ["c"] and report["stale"] == ["b"] and report["done"] == 1
    assert report["lease"]["state"] == "released" and report["manifest"]["totals"]["rows"] == 10
    # A failed shard whose input was fixed since is stale (a rerun redoes it), no longer failed.
    write_parquet(broken, str(inp / "broken.parquet"))
    assert cli.main(["status", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stale"] == ["b", "broken"] and report["failed"] == [] and report["done"] == 1

    assert cli.main(["status", str(tmp_path / "nothing")]) == 2
    assert "holds no rayembed embed output" in capsys.readouterr().err


def test_status_shows_progress_of_a_running_job(tmp_path, qwen_model_dir):
    """While a job runs, `rayembed status` shows shards done of total, rates and an ETA from the lease record; with
    stdout not a terminal the driver logs progress lines (every RAYEMBED_PROGRESS_EVERY seconds)."""
    import os
    import subprocess
    import sys

    from pipelines.status import collect_status, format_status

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for i in range(4):
        write_parquet(make_docs(5, seed=i, start_id=10 * i), str(inp / f"s{i}.parquet"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "RAYEMBED_TEST_COMMIT_DELAY": "3", "RAYEMBED_PROGRESS_EVERY": "1"}
    env.pop("RAY_ADDRESS", None)
    argv = ["--input", str(inp), "--output", str(out), "--model", qwen_model_dir, "--lease-heartbeat", "0.5", "-q"]
    job = subprocess.Popen(
        [sys.executable, "-m", "pipelines.embed", *argv],
        env=env,
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = None
    try:
        deadline = time.time() + 180
        while time.time() < deadline and job.poll() is None:
            lease = storage.read_json(lease_url(str(out)))
            p = (lease or {}).get("progress")
            if p and p["shards_done"] >= 1 and lease_state(lease) == "live":
                seen = collect_status(str(out))
                break
            time.sleep(0.3)
        _, stderr = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, stderr
    assert seen is not None, "no progress seen in the lease while the job ran"
    p = seen["lease"]["progress"]
    assert (p["shards_pending"], p["shards_total"]) == (4, 4) and 1 <= p["shards_done"] <= 4
    assert p["rows"] > 0 and p["docs_per_s"] > 0 and p["tokens_per_s"] > 0 and p["eta_s"] is not None
    text = format_status(seen)
    assert f"progress (embed): {p['shards_done']} of 4 pending shards done (4 in the input)" in text and "ETA" in text
    assert "rayembed embed progress: " in stderr
    # Finished: the lease is released and carries no progress any more.
    assert collect_status(str(out))["lease"]["progress"] is None
