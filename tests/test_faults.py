"""Fault injection with real processes: a dying actor, a SIGKILLed driver, a write that crashes half-way, a finished
job rerun on S3 (PUTs counted at the server), a throttling bucket (503 SlowDown at 30% and 100%) and a bucket whose
connections reset (30%).

Every scenario must end in the output of a clean run: the same ids once each, vectors within 1e-6.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pipelines import cli
from tests.conftest import REPO
from tests.corpus import make_docs, write_parquet
from tests.pipeline_checks import read_output
from tests.s3_proxy import S3Proxy

N_SHARDS = 6


def _docs(k: int) -> list[dict]:
    docs = make_docs(8, seed=10 + k, start_id=100 * k)
    for d in docs:
        d["text"] = d["text"][:400]  # short texts: these tests are about failures, not throughput
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("faults-in")
    for k in range(N_SHARDS):
        write_parquet(_docs(k), str(root / f"s{k}.parquet"))
    return str(root)


def _args(inp: str, out: str, model: str, *extra: str) -> list[str]:
    flags = ["--rows-per-block", "4", "--part-rows", "4", "-q"]
    return ["embed", "--input", inp, "--output", out, "--model", model, *flags, *extra]


def _embed(capsys, *argv: str, rc: int = 0) -> tuple[str, str]:
    got = cli.main(list(argv))
    out = capsys.readouterr()
    assert got == rc, out.err[-3000:]
    return out.out, out.err


def _vectors(out: str, so: dict | None = None) -> dict[int, np.ndarray]:
    _manifest, table = read_output(out, so)  # also: no data file outside the manifest
    ids = table["id"].to_pylist()
    assert len(set(ids)) == len(ids), "duplicate ids in the output"
    vecs = np.asarray(table["embedding"].combine_chunks().values.to_numpy()).reshape(len(ids), -1)
    return dict(zip(ids, vecs))


def _assert_same(got: dict, clean: dict) -> None:
    assert sorted(got) == sorted(clean)
    assert max(float(np.abs(got[i] - clean[i]).max()) for i in clean) <= 1e-6


@pytest.fixture(scope="module")
def clean(corpus, qwen_model_dir, ray_local, tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("faults-clean") / "out")
    assert cli.main(_args(corpus, out, qwen_model_dir)) == 0
    return _vectors(out)


def test_actor_death_output_equals_clean_run(corpus, clean, qwen_model_dir, tmp_path, monkeypatch, capsys):
    flag = tmp_path / "actor-exited"
    # Forwarded to the Ray workers by the driver; fires once per job (the flag file), so the restarted actor finishes.
    monkeypatch.setenv("RAYEMBED_TEST_ACTOR_EXIT_AFTER", f"2:{flag}")
    out = str(tmp_path / "out")
    stdout, _ = _embed(capsys, *_args(corpus, out, qwen_model_dir))
    assert flag.exists(), "the actor-exit hook never fired"
    assert f"{N_SHARDS} shards ({N_SHARDS} processed, 0 already committed), {8 * N_SHARDS} docs" in stdout
    _assert_same(_vectors(out), clean)


def _markers(out: str) -> list[str]:
    d = os.path.join(out, "_state")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def test_driver_sigkill_then_rerun_resumes(corpus, clean, qwen_model_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    env = {**os.environ, "RAYEMBED_TEST_COMMIT_DELAY": "4", "PYTHONPATH": REPO}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "job.log", "w")  # noqa: SIM115 (closed below)
    argv = _args(corpus, out, qwen_model_dir, "--lease-ttl", "60", "--lease-heartbeat", "1")[1:]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.embed", *argv],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill below reaches this job (and its Ray) alone
    )
    try:
        deadline = time.time() + 150
        while len(_markers(out)) < 2 and time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            time.sleep(0.3)
        assert len(_markers(out)) >= 2, (tmp_path / "job.log").read_text()[-3000:]

        # While it runs: a second job on the same output is refused and names the holder; status reports progress.
        _, err = _embed(capsys, *_args(corpus, out, qwen_model_dir), rc=2)
        assert "is leased by job" in err and f"(pid {proc.pid} on " in err
        stdout, _ = _embed(capsys, "status", out)
        assert "lease: live, held by job" in stdout and f"pid {proc.pid}" in stdout
        assert f"{N_SHARDS} in the input" in stdout and "manifest: none" in stdout
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    committed = len(_markers(out))
    assert 2 <= committed < N_SHARDS, "the job finished before the kill; make it slower"

    # The rerun takes over the dead driver's lease at once (same host, pid gone) and redoes only the rest.
    stdout, _ = _embed(capsys, *_args(corpus, out, qwen_model_dir))
    assert f"({N_SHARDS - committed} processed, {committed} already committed)" in stdout
    _assert_same(_vectors(out), clean)
    stdout, _ = _embed(capsys, "status", out)
    # Every count of the status line, the failed one included: none may be left out or reported wrong.
    line = f"shards: {N_SHARDS} done, 0 failed, 0 pending, 0 stale (input changed), {N_SHARDS} in the input"
    assert line in stdout and "succeeded" in stdout, stdout


@pytest.fixture()
def proxy(s3_server):
    p = S3Proxy(s3_server.endpoint, seed=1234).start()
    yield p
    p.stop()


def _s3_corpus(s3_server, corpus: str) -> str:
    bucket = s3_server.new_bucket("faults")
    fs = s3_server.fs()
    for name in sorted(os.listdir(corpus)):
        fs.put_file(os.path.join(corpus, name), f"{bucket}/in/{name}")
    return bucket


def _s3_keys(s3_server, bucket: str, prefix: str) -> list[str]:
    resp = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def test_atomic_write_crash_leaves_nothing_on_s3(s3_server):
    from operators import storage

    bucket = s3_server.new_bucket("crash")
    url = f"s3://{bucket}/data/part.parquet"
    so = {**s3_server.storage_options, "default_block_size": 5 * 2**20}
    with pytest.raises(RuntimeError, match="injected"), storage.atomic_write(url, so) as f:
        f.write(os.urandom(6 * 2**20))  # more than a block: one part is really uploaded before the crash
        f.flush()
        raise RuntimeError("injected crash mid-write")
    assert _s3_keys(s3_server, bucket, "") == []
    assert not s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_s3_crash_mid_write_then_rerun_and_finished_rerun_puts_nothing(
    s3_server, proxy, corpus, clean, qwen_model_dir, monkeypatch, capsys
):
    bucket = _s3_corpus(s3_server, corpus)
    so = json.dumps({**s3_server.storage_options, "endpoint_url": proxy.endpoint})
    argv = _args(f"s3://{bucket}/in/", f"s3://{bucket}/out", qwen_model_dir, "--storage-options", so)

    # A data part of shard s2 raises half-way through its write: the job fails, s2 has no marker, no object and no
    # multipart upload left behind.
    monkeypatch.setenv("RAYEMBED_TEST_FAIL_WRITE", "s2")
    _, err = _embed(capsys, *argv, rc=1)
    assert "write of" in err and "failed half-way" in err
    monkeypatch.delenv("RAYEMBED_TEST_FAIL_WRITE")
    assert "out/_state/s2.json" not in _s3_keys(s3_server, bucket, "out/_state/")
    assert not [k for k in _s3_keys(s3_server, bucket, "out/data/") if "/s2-" in k]
    assert "out/_manifest.json" not in _s3_keys(s3_server, bucket, "out/")

    # The rerun (holding the lease) also aborts uploads that writers killed with the failed job left unfinished.
    stdout, _ = _embed(capsys, *argv)
    assert "already committed)" in stdout
    assert not s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads")
    _assert_same(_vectors(f"s3://{bucket}/out", s3_server.storage_options), clean)

    # A rerun of the finished job: nothing processed, and not one PUT (or multipart POST) under data/ at the server.
    proxy.reset_counts()
    stdout, _ = _embed(capsys, *argv)
    assert f"({0} processed, {N_SHARDS} already committed), 0 docs" in stdout
    assert proxy.count("PUT", r"/out/data/") == 0 and proxy.count("POST", r"/out/data/") == 0
    assert proxy.count("GET", r"/out/_state") > 0  # the proxy did see the rerun's traffic


def test_throttled_bucket_30_percent_completes_with_retries(
    s3_server, proxy, corpus, clean, qwen_model_dir, ray_local, capsys
):
    bucket = _s3_corpus(s3_server, corpus)
    so = json.dumps({**s3_server.storage_options, "endpoint_url": proxy.endpoint})
    proxy.fault(0.3, methods=("GET", "PUT", "POST", "HEAD"), path=rf"^/{bucket}")
    stdout, _ = _embed(
        capsys, *_args(f"s3://{bucket}/in/", f"s3://{bucket}/out", qwen_model_dir, "--storage-options", so)
    )
    proxy.fault(0)
    assert proxy.injected["503"] > 10
    retries = int(stdout.split(" storage retries")[0].rsplit(" ", 1)[-1])
    assert retries > 0, stdout
    _assert_same(_vectors(f"s3://{bucket}/out", s3_server.storage_options), clean)
    assert not s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_connection_resets_30_percent_complete_with_retries(
    s3_server, proxy, corpus, clean, qwen_model_dir, ray_local, capsys
):
    """The whole job on a bucket whose connections reset (RST, no answer) on 30% of requests: every S3 call of
    every stage and of the driver (listing, reads, multipart writes, markers, lease, manifest) retries them."""
    bucket = _s3_corpus(s3_server, corpus)
    so = json.dumps({**s3_server.storage_options, "endpoint_url": proxy.endpoint})
    proxy.fault(0.3, methods=("GET", "PUT", "POST", "HEAD"), path=rf"^/{bucket}", kind="reset")
    stdout, _ = _embed(
        capsys, *_args(f"s3://{bucket}/in/", f"s3://{bucket}/out", qwen_model_dir, "--storage-options", so)
    )
    proxy.fault(0)
    retries = int(stdout.split(" storage retries")[0].rsplit(" ", 1)[-1])
    print(f"\nresets: {proxy.injected['reset']} injected, {retries} storage retries counted")
    assert proxy.injected["reset"] > 10 and not proxy.injected["503"]
    assert retries > 0, stdout
    _assert_same(_vectors(f"s3://{bucket}/out", s3_server.storage_options), clean)
    assert not s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_throttled_bucket_100_percent_fails_within_budget(s3_server, proxy, corpus, qwen_model_dir, ray_local, capsys):
    bucket = _s3_corpus(s3_server, corpus)
    so = json.dumps({**s3_server.storage_options, "endpoint_url": proxy.endpoint})
    proxy.fault(1.0, methods=("PUT",), path=rf"^/{bucket}/out/data/")
    t0 = time.time()
    _, err = _embed(
        capsys,
        *_args(
            f"s3://{bucket}/in/", f"s3://{bucket}/out", qwen_model_dir, "--storage-options", so, "--retry-budget", "3"
        ),
        rc=2,
    )
    elapsed = time.time() - t0
    proxy.fault(0)
    assert "SlowDown" in err and "3s retry budget (--retry-budget)" in err, err[-2000:]
    assert elapsed < 120
    assert _s3_keys(s3_server, bucket, "out/_state/") == []
    assert _s3_keys(s3_server, bucket, "out/data/") == []
    assert "out/_manifest.json" not in _s3_keys(s3_server, bucket, "out/")
    lease = json.loads(io.BytesIO(s3_server.fs().cat_file(f"{bucket}/out/_lease.json")).read())
    assert lease["outcome"].startswith("failed") and lease["released_at"]


def test_storage_retries_slowdown_and_resets(s3_server, proxy):
    """The retry loop itself: throttling and resets (before and after the server acts) are retried and counted; a
    dead bucket fails within budget."""
    from operators import storage

    bucket = s3_server.new_bucket("retry")
    so = {**s3_server.storage_options, "endpoint_url": proxy.endpoint}
    storage.take_retries()
    proxy.fault(0.5, methods=("PUT", "POST", "GET"))
    for i in range(10):
        storage.write_bytes(f"s3://{bucket}/k{i}", b"x" * 10, so)
        assert storage.read_bytes(f"s3://{bucket}/k{i}", so) == b"x" * 10
    assert storage.take_retries() >= proxy.injected["503"] > 0
    # Resets before the request reaches the server, and after it was carried out (the answer is lost: the retry
    # meets its own effect, e.g. a completed multipart upload). aiohttp silently retries an idempotent request once
    # on a reused connection, so fewer retries are counted than resets injected (but every POST's).
    for kind in ("reset", "reset-after"):
        proxy.reset_counts()
        proxy.fault(0.5, methods=("PUT", "POST", "GET", "HEAD"), kind=kind)
        for i in range(6):
            data = f"{kind} {i}".encode()
            storage.write_bytes(f"s3://{bucket}/{kind}/k{i}", data, so)
            assert storage.read_bytes(f"s3://{bucket}/{kind}/k{i}", so) == data
            assert storage.exists(f"s3://{bucket}/{kind}/k{i}", so)
        assert proxy.injected[kind] > 5 and storage.take_retries() > 0, proxy.injected
    proxy.fault(1.0, methods=("GET",), kind="reset")
    t0 = time.time()
    with pytest.raises(storage.StorageError, match=r"retry budget.*connection error"):
        storage.read_bytes(f"s3://{bucket}/k0", {**so, "retry_budget": 1.5})
    assert time.time() - t0 < 15 and proxy.injected["reset"] > 1
    storage.take_retries()  # this process's count: leave none to the next job summary in this pytest process
