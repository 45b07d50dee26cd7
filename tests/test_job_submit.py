"""`ray job submit` against a real head started on 127.0.0.1, with the repo as the working dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, _free_port
from tests.corpus import make_mixed_corpus
from tests.pipeline_checks import check_embed_output

BIN = os.path.dirname(sys.executable)


@pytest.fixture()
def ray_head(tmp_path, monkeypatch):
    """`ray start --head --block` in its own process group; stopped by its own pid, never `ray stop`."""
    port, dash = _free_port(), _free_port()
    # Ray >= 2.52 heads require a token (~/.ray/auth_token); clients send it only in token mode.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "head.log", "w")  # noqa: SIM115 (closed in the finally below)
    # Every listening port is a free one: another Ray on this machine (the session's in-process one, a developer's)
    # already holds the defaults, and a dashboard agent that cannot bind leaves the head unable to run jobs.
    ports = {
        flag: str(_free_port())
        for flag in (
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--metrics-export-port",
            "--runtime-env-agent-port",
            "--ray-client-server-port",
            "--node-manager-port",
            "--object-manager-port",
        )
    }
    proc = subprocess.Popen(
        [
            os.path.join(BIN, "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--include-dashboard",
            "true",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash),
            "--num-cpus",
            "2",
            "--disable-usage-stats",
            *[x for kv in ports.items() for x in kv],
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        from ray.job_submission import JobSubmissionClient

        client, deadline = None, time.time() + 120
        while client is None and time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "head.log").read_text()
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{dash}")
            except Exception:
                time.sleep(1)
        assert client is not None, "dashboard did not come up"
        yield f"http://127.0.0.1:{dash}", client, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the group is this head's alone (start_new_session)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_ray_job_submit(tmp_path, qwen_model_dir, ray_head):
    from operators.embedder import Embedder

    address, client, env = ray_head
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    docs = make_mixed_corpus(str(inp), per_shard=10)
    sub_id = f"rayembed-test-{os.getpid()}-{int(time.time())}"
    cmd = [
        os.path.join(BIN, "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--submission-id",
        sub_id,
        "--no-wait",
        "--working-dir",
        REPO,
        "--",
        "python",
        "-m",
        "pipelines.embed",
        "--input",
        str(inp),
        "--output",
        str(out),
        "--model",
        qwen_model_dir,
        "--passthrough",
        "lang,score",
        "--quiet",
    ]
    for _ in range(30):  # the head's job agent comes up a few seconds after the dashboard
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if res.returncode == 0 or "No available agent" not in res.stderr:
            break
        time.sleep(3)
    assert res.returncode == 0, res.stdout + res.stderr

    deadline, status = time.time() + 420, None
    while time.time() < deadline:
        status = str(client.get_job_status(sub_id))
        if status.endswith(("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(2)
    logs = client.get_job_logs(sub_id)
    assert status.endswith("SUCCEEDED"), logs[-4000:]
    assert f"5 shards (5 processed, 0 already committed), {len(docs)} docs" in logs
    ref = Embedder(qwen_model_dir).embed([d["text"] for d in docs])
    check_embed_output(str(out), docs, {d["id"]: v for d, v in zip(docs, ref)}, dim=128)
