"""Autoscaling from zero: on a fake multi-node autoscaling cluster (a CPU head, GPU worker nodes 0..2 with logical
GPUs), an embed job with ``--concurrency 1,2 --num-gpus 1`` makes the autoscaler add a GPU node for the first model
actor, Ray Data grows the pool to a second actor while input waits (the autoscaler adds a second node for it), the
output equals a clean run, and both nodes are released after the idle timeout.

How the pool grows (Ray 2.60, read from ray/data/_internal): the actor autoscaler scales up when the pool's tasks in
flight reach 1.75x its actors (an actor holds at most 2 tasks), but only within the operator's resource budget, which
is what Ray Data's cluster autoscaler (RAY_DATA_CLUSTER_AUTOSCALER, RATE_BASED by default) has reserved; that one asks
the Ray autoscaler (``request_resources``) for 2x the current throughput, at most every 10 s, once the actor has
finished tasks. So the job needs many model calls waiting: small calls (``--embed-batch-rows``), and a model slow
enough that the queue outlasts node and actor start-up. The model here is the random Qwen3 fixture with a forward that
sleeps until the test has seen two actors alive (``SLOW_ENV``), then runs at full speed: the job is as long as the
scale-up takes on this machine, no longer. A state watcher runs as a subprocess (the cluster's auth token stays out
of this process, which may hold the session's own Ray).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.corpus import make_docs, write_parquet
from tests.pipeline_checks import check_embed_output

# "<seconds>:<flag file>": every forward of the slow model sleeps <seconds> while <flag file> does not exist. The
# runner forwards RAYEMBED_TEST_* variables to the stages' workers, so it reaches the model actors.
SLOW_ENV = "RAYEMBED_TEST_SLOW_MODEL"
# Each forward appends the actor's pid to this file: which actors embedded rows.
CALLS_ENV = "RAYEMBED_TEST_SLOW_MODEL_CALLS"
IDLE_TIMEOUT_S = 6
# Ray Data coalesces a task's output up to 1 MiB blocks (target_min_block_size), so a small shard is one block and one
# model-actor task: the queue of waiting model calls is the number of shards.
SHARDS = 32

SLOW_MODEL_PY = f'''
import os
import time

from transformers import Qwen3Model


class SlowQwen3Model(Qwen3Model):
    """Qwen3Model whose forward sleeps first (a slow accelerator), for the autoscaling test."""

    def forward(self, *args, **kwargs):
        seconds, _, flag = os.environ.get("{SLOW_ENV}", "0:").partition(":")
        if float(seconds) and not os.path.exists(flag):
            time.sleep(float(seconds))
        calls = os.environ.get("{CALLS_ENV}")
        if calls:
            with open(calls, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
        return super().forward(*args, **kwargs)
'''


def make_slow_model_dir(src: str, dst: str) -> str:
    """The model of ``src`` (same weights and tokenizer) loaded as ``SlowQwen3Model`` (``--trust-remote-code``)."""
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "slow_qwen3.py"), "w") as f:
        f.write(SLOW_MODEL_PY)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["auto_map"] = {"AutoModel": "slow_qwen3.SlowQwen3Model"}
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    return dst


def watch(address: str, log: str, flag: str) -> None:
    """Poll the cluster's GCS every 0.5 s; write each change of (alive GPU nodes, model actors) as a JSON line, and
    create ``flag`` once two model actors are alive. Runs in its own process (``--watch``), with the cluster's env."""
    from ray._private.state import GlobalState
    from ray._raylet import GcsClientOptions

    state = GlobalState()
    state._initialize_global_state(
        GcsClientOptions.create(address, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False)
    )
    last = None
    with open(log, "a") as f:
        while True:
            time.sleep(0.5)
            try:
                nodes = sorted(n["NodeID"] for n in state.node_table() if n["Alive"] and n["Resources"].get("GPU"))
                actors = sorted(
                    [a["ActorID"], a["State"], (a.get("Address") or {}).get("NodeID")]
                    for a in state.actor_table(None).values()
                    if "EmbedStage" in a.get("ActorClassName", "")
                )
            except Exception:  # a slow GCS answer on a loaded machine: ask again
                continue
            if (nodes, actors) != last:
                f.write(json.dumps({"t": time.time(), "gpu_nodes": nodes, "actors": actors}) + "\n")
                f.flush()
                last = (nodes, actors)
            if sum(a[1] == "ALIVE" for a in actors) >= 2 and not os.path.exists(flag):
                open(flag, "w").close()


def _history(log: str) -> list[dict]:
    with open(log) as f:
        return [json.loads(line) for line in f]


@pytest.fixture()
def autoscaling_cluster():
    from cluster.local_cluster import start_autoscaling_cluster

    # 2 CPUs per GPU node: with 1 (the actor's own), Ray Data's CPU budget never admits the second actor.
    cluster = start_autoscaling_cluster(
        head_cpus=1, worker_cpus=2, worker_gpus=1, max_workers=2, idle_timeout_s=IDLE_TIMEOUT_S
    )
    try:
        yield cluster
    finally:
        cluster.shutdown()


def test_gpu_nodes_from_zero_pool_grows_to_two_then_released(tmp_path, qwen_model_dir, autoscaling_cluster):
    from operators.embedder import Embedder

    cluster = autoscaling_cluster
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    docs = []
    for k in range(SHARDS):
        chunk = make_docs(12, seed=k, start_id=1000 * k)
        write_parquet(chunk, str(inp / f"part-{k:02d}.parquet"))
        docs += chunk
    model = make_slow_model_dir(qwen_model_dir, str(tmp_path / "slow-qwen3"))
    log, flag, calls = str(tmp_path / "watch.jsonl"), str(tmp_path / "two-alive"), str(tmp_path / "calls")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(cluster.env)
    watcher = subprocess.Popen(
        [sys.executable, "-m", "tests.test_autoscaling", "--watch", cluster.address, log, flag], cwd=REPO, env=env
    )
    try:
        # Before the flag, the 32 model calls (one per shard) take >= 96 s on one actor: room for the second.
        env.update({SLOW_ENV: f"3:{flag}", CALLS_ENV: calls})
        args = "--num-gpus 1 --concurrency 1,2 --device cpu --embed-batch-rows 12 --passthrough lang,score --quiet"
        res = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "embed", "--input", str(inp), "--output", str(out)]
            + ["--model", model, "--trust-remote-code", "--address", cluster.address, *args.split()],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, res.stderr[-4000:]
        assert f"{SHARDS} shards ({SHARDS} processed, 0 already committed), {len(docs)} docs" in res.stdout
        job_end = time.time()
        deadline = job_end + IDLE_TIMEOUT_S + 60
        while (not os.path.exists(log) or _history(log)[-1]["gpu_nodes"]) and time.time() < deadline:
            assert watcher.poll() is None, "the state watcher died"
            time.sleep(1)
    finally:
        watcher.kill()
        watcher.wait()
    history = _history(log)
    assert history[0]["gpu_nodes"] == [], "the cluster must start without GPU nodes"
    assert max(len(h["gpu_nodes"]) for h in history) == 2
    alive = {a[0]: a[2] for h in history for a in h["actors"] if a[1] == "ALIVE"}
    assert len(alive) == 2, f"the pool must grow to two model actors: {history}"
    assert len(set(alive.values())) == 2, "one actor per GPU node"
    with open(calls) as f:
        assert len(set(f.read().split())) == 2, "both actors must embed rows"
    assert history[-1]["gpu_nodes"] == [], f"GPU nodes not released after the idle timeout: {history[-1]}"
    ref = Embedder(qwen_model_dir).embed([d["text"] for d in docs])
    check_embed_output(str(out), docs, {d["id"]: v for d, v in zip(docs, ref)}, dim=128)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--watch"]:
        watch(*sys.argv[2:5])
