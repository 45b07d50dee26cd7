"""The GPU path of the embed job on a multi-node local cluster with logical GPUs (the model itself runs on CPU).

Ray Data treats a stage that requests GPUs differently (it requires an explicit batch size, and actors are placed by
GPU), so this runs the job with --num-gpus 1 and an autoscaling pool of 1..2 actors over two GPU worker nodes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.conftest import REPO
from tests.corpus import make_mixed_corpus
from tests.pipeline_checks import check_embed_output


def test_num_gpus_pool_on_multinode_cluster(tmp_path, qwen_model_dir):
    from operators.embedder import Embedder

    log = tmp_path / "cluster.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [
                sys.executable,
                os.path.join(REPO, "cluster", "local_cluster.py"),
                "--workers",
                "2",
                "--gpus-per-worker",
                "1",
                "--cpus-per-worker",
                "1",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPO,
        )
    try:
        address, deadline = None, time.time() + 180
        while address is None and time.time() < deadline:
            assert proc.poll() is None, log.read_text()
            for line in log.read_text().splitlines():
                if line.startswith("address: "):
                    address = line.split()[1]
            time.sleep(1)
        assert address, log.read_text()
        inp, out = tmp_path / "in", tmp_path / "out"
        inp.mkdir()
        docs = make_mixed_corpus(str(inp), per_shard=12)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipelines.embed",
                "--input",
                str(inp),
                "--output",
                str(out),
                "--model",
                qwen_model_dir,
                "--address",
                address,
                "--num-gpus",
                "1",
                "--concurrency",
                "1,2",
                "--device",
                "cpu",
                "--rows-per-block",
                "8",
                "--passthrough",
                "lang,score",
                "--quiet",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, res.stderr[-4000:]
        assert f"5 shards (5 processed, 0 already committed), {len(docs)} docs" in res.stdout
        ref = Embedder(qwen_model_dir).embed([d["text"] for d in docs])
        check_embed_output(str(out), docs, {d["id"]: v for d, v in zip(docs, ref)}, dim=128)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # local_cluster.py stops exactly its own nodes on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
