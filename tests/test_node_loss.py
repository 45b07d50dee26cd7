"""Node loss: a GPU worker node dies (``remove_node``, not graceful: its raylet, object store and the model actor are
killed, as when a machine is lost) while its actor is embedding; a replacement node joins; the job finishes and its
output equals a clean run: every id once, vectors as a local run's.

The cluster is cluster/local_cluster.py's (``ray.cluster_utils.Cluster``, owned by this process, so the test can
remove and add nodes), with one GPU worker node: after the loss no GPU is left, the job waits for the replacement, and
Ray restarts the actor there (Ray Data's actors restart and retry their tasks forever). Blocks held in the lost node's
object store are rebuilt from lineage. The model is tests/test_autoscaling.py's slow Qwen3: each forward sleeps until
the test has replaced the node, so the loss lands mid-job whatever the machine's speed, and then the job runs at full
speed.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

from tests.conftest import REPO
from tests.corpus import make_docs, write_parquet
from tests.pipeline_checks import check_embed_output
from tests.test_autoscaling import CALLS_ENV, SLOW_ENV, make_slow_model_dir

SHARDS = 16
# The GCS marks a node dead after health_check_failure_threshold failed checks, health_check_period_ms apart (defaults
# 5 x 3 s); a killed raylet fails each check at once, so 3 x 1 s. A live but busy one still has
# health_check_timeout_ms (10 s) per check to answer.
HEALTH_CHECK = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


def _lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


def test_worker_node_lost_mid_job_then_replaced(tmp_path, qwen_model_dir):
    from cluster.local_cluster import start_local_cluster
    from operators.embedder import Embedder

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    docs = []
    for k in range(SHARDS):
        chunk = make_docs(12, seed=k, start_id=1000 * k)
        write_parquet(chunk, str(inp / f"part-{k:02d}.parquet"))
        docs += chunk
    model = make_slow_model_dir(qwen_model_dir, str(tmp_path / "slow-qwen3"))
    flag, calls = str(tmp_path / "replaced"), str(tmp_path / "calls")
    # One CPU per GPU node: the model actor fills it, so the read, tokenize and write tasks run on the head.
    cluster = start_local_cluster(
        workers=1, gpus_per_worker=1, cpus_per_worker=1, head_cpus=1, system_config=HEALTH_CHECK
    )
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update({SLOW_ENV: f"1:{flag}", CALLS_ENV: calls})
        args = "--num-gpus 1 --concurrency 1 --device cpu --embed-batch-rows 12 --passthrough lang,score --quiet"
        log = open(tmp_path / "job.log", "w")  # noqa: SIM115 (closed below)
        job = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "embed", "--input", str(inp), "--output", str(out)]
            + ["--model", model, "--trust-remote-code", "--address", cluster.address, *args.split()],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            # Mid-job: the actor has embedded some shards and some are committed, most are still to come.
            deadline = time.time() + 300
            while len(_lines(calls)) < 4 or not glob.glob(str(out / "_state" / "*.json")):
                assert job.poll() is None, (tmp_path / "job.log").read_text()[-4000:]
                assert time.time() < deadline, "the job did not start embedding"
                time.sleep(0.5)
            committed_before = len(glob.glob(str(out / "_state" / "*.json")))
            (worker,) = cluster.worker_nodes
            cluster.remove_node(worker, allow_graceful=False)
            cluster.add_worker()
            open(flag, "w").close()
            assert job.wait(timeout=300) == 0, (tmp_path / "job.log").read_text()[-4000:]
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
            log.close()
    finally:
        cluster.shutdown()
    summary = (tmp_path / "job.log").read_text()
    assert f"{SHARDS} shards ({SHARDS} processed, 0 already committed), {len(docs)} docs" in summary
    assert committed_before < SHARDS, "the node must be lost mid-job"
    pids = list(dict.fromkeys(_lines(calls)))
    assert len(pids) == 2, f"the model actor must be restarted once, on the new node: {pids}"
    ref = Embedder(qwen_model_dir).embed([d["text"] for d in docs])
    check_embed_output(str(out), docs, {d["id"]: v for d, v in zip(docs, ref)}, dim=128)
