"""A multi-node Ray cluster on one machine, with logical GPUs, for trying cluster behaviour without a cloud.

    python cluster/local_cluster.py --workers 2 --gpus-per-worker 1              # prints the address, Ctrl-C stops
    python cluster/local_cluster.py --workers 2 --gpus-per-worker 1 --dashboard  # also a job-submission endpoint
    python cluster/local_cluster.py --workers 2 --gpus-per-worker 1 --check      # start, connect, print, stop

Then, in another shell, run a job against it (the model runs on CPU: a "GPU" here is a logical resource that Ray
schedules, not a device):

    RAY_ADDRESS=<address> rayembed embed --input examples/corpus --output /tmp/out --model <dir> \\
        --concurrency 1,2 --num-gpus 1 --device cpu

From Python (tests)::

    from cluster.local_cluster import start_local_cluster
    cluster = start_local_cluster(workers=2, gpus_per_worker=1)
    ray.init(address=cluster.address)
    ...
    ray.shutdown()
    cluster.shutdown()

Every node is a set of real Ray processes started by ``ray.cluster_utils.Cluster`` and owned by this process;
``cluster.shutdown()`` stops exactly those. Never use ``ray stop`` here: it kills every Ray on the machine.
All listening ports are free ones picked at start, so several such clusters (and other Ray instances) coexist.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from ray._common.utils import get_ray_address_file
from ray.cluster_utils import Cluster

DEFAULT_OBJECT_STORE_BYTES = 256 * 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_args() -> dict[str, Any]:
    """Free ports for every listener a node opens, so that no fixed default (52365, 8080, ...) can collide."""
    return {
        "dashboard_agent_listen_port": _free_port(),
        "metrics_export_port": _free_port(),
        "metrics_agent_port": _free_port(),
        "runtime_env_agent_port": _free_port(),
        "object_manager_port": _free_port(),
        "min_worker_port": 0,
        "max_worker_port": 0,
    }


@contextlib.contextmanager
def _keep_address_file() -> Iterator[None]:
    """Leave the machine's default ``/tmp/ray/ray_current_cluster`` as it was.

    ``Cluster`` writes its head's address there when the head starts and deletes the file on shutdown. A plain
    ``ray.init()`` anywhere on this machine (the local mode of every other tool and test) would then connect to this
    cluster instead of starting its own, or fail on an address that no longer answers. This cluster records its
    address in its own temp dir instead (see ``start_local_cluster``), and clients pass the address explicitly.
    """
    path = get_ray_address_file(None)
    try:
        with open(path) as f:
            before: str | None = f.read()
    except OSError:
        before = None
    try:
        yield
    finally:
        try:
            if before is None:
                if os.path.exists(path):
                    os.remove(path)
            else:
                with open(path, "w") as f:
                    f.write(before)
        except OSError:
            pass


class LocalCluster(Cluster):
    """``ray.cluster_utils.Cluster`` that keeps to its own temp dir and leaves the machine's default address alone."""

    dashboard_url: str | None = None
    temp_dir: str | None = None

    def shutdown(self) -> None:
        with _keep_address_file():
            super().shutdown()


def start_local_cluster(
    workers: int = 2,
    gpus_per_worker: float = 1,
    cpus_per_worker: int = 2,
    head_cpus: int = 1,
    head_gpus: float = 0,
    object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES,
    dashboard: bool = False,
    worker_resources: dict[str, float] | None = None,
    temp_dir: str | None = None,
) -> LocalCluster:
    """Start a head plus ``workers`` worker nodes and wait until all of them are alive; returns the cluster.

    The head takes ``head_cpus`` CPUs and no GPU (like a CPU head on a real cluster); each worker node has
    ``cpus_per_worker`` CPUs and ``gpus_per_worker`` logical GPUs. ``dashboard=True`` starts the dashboard on a free
    port (needed for ``ray job submit``); its URL is ``cluster.dashboard_url``. The caller owns the cluster and must
    call ``cluster.shutdown()`` (and ``ray.shutdown()`` first if it connected).

    Sessions, logs and sockets live under ``temp_dir`` (default: a new ``/tmp/rayc-*`` directory, kept after
    shutdown for its logs), which also holds this cluster's ``ray_current_cluster``: jobs submitted to the dashboard
    find their cluster through it, while the machine-wide ``/tmp/ray/ray_current_cluster`` stays untouched.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    # Short on purpose: Unix socket paths under <temp_dir>/session_*/sockets/ must stay below ~107 bytes.
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="rayc-", dir="/tmp")
    head_args: dict[str, Any] = {
        "num_cpus": head_cpus,
        "num_gpus": head_gpus,
        "object_store_memory": object_store_bytes,
        "include_dashboard": dashboard,
        "temp_dir": temp_dir,
        **_port_args(),
    }
    if dashboard:
        head_args.update(dashboard_host="127.0.0.1", dashboard_port=_free_port())
    with _keep_address_file():
        cluster = LocalCluster(initialize_head=True, head_node_args=head_args)
    cluster.temp_dir = temp_dir
    try:
        # The job supervisor resolves its own cluster ("auto") through this file in the node's temp dir.
        with open(get_ray_address_file(temp_dir), "w") as f:
            f.write(cluster.address)
        if dashboard:
            cluster.dashboard_url = f"http://{head_args['dashboard_host']}:{head_args['dashboard_port']}"
        for _ in range(workers):
            cluster.add_node(
                num_cpus=cpus_per_worker,
                num_gpus=gpus_per_worker,
                resources=dict(worker_resources or {}),
                object_store_memory=object_store_bytes,
                temp_dir=temp_dir,
                **_port_args(),
            )
        cluster.wait_for_nodes()
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


def _check(cluster: LocalCluster) -> dict[str, float]:
    """Connect as a driver, print what the cluster offers, disconnect."""
    import ray

    ray.init(address=cluster.address, log_to_driver=False)
    try:
        resources = ray.cluster_resources()
        alive = [n for n in ray.nodes() if n["Alive"]]
        print(f"nodes alive: {len(alive)}")
        print(f"cluster_resources: { {k: v for k, v in sorted(resources.items()) if not k.startswith('node:')} }")
        return resources
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Start a local multi-node Ray cluster with logical GPUs.")
    p.add_argument("--workers", type=int, default=2, help="worker nodes (default: 2)")
    p.add_argument("--gpus-per-worker", type=float, default=1, help="logical GPUs per worker node (default: 1)")
    p.add_argument("--cpus-per-worker", type=int, default=2, help="CPUs per worker node (default: 2)")
    p.add_argument("--head-cpus", type=int, default=1, help="CPUs on the head node (default: 1)")
    p.add_argument(
        "--object-store-mb",
        type=int,
        default=DEFAULT_OBJECT_STORE_BYTES // 2**20,
        help="object store per node in MiB (default: 256)",
    )
    p.add_argument("--dashboard", action="store_true", help="start the dashboard (for `ray job submit`)")
    p.add_argument("--check", action="store_true", help="connect, print the cluster resources, shut down, exit")
    args = p.parse_args(argv)

    t0 = time.time()
    cluster = start_local_cluster(
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        head_cpus=args.head_cpus,
        object_store_bytes=args.object_store_mb * 2**20,
        dashboard=args.dashboard,
    )
    try:
        print(
            f"local Ray cluster up in {time.time() - t0:.1f}s: head + {args.workers} worker node(s), "
            f"{args.gpus_per_worker:g} logical GPU(s) each",
            flush=True,
        )
        print(f"address: {cluster.address}   (logs: {cluster.temp_dir})")
        print(f"  export RAY_ADDRESS={cluster.address}    # rayembed embed ... / ray.init(address=...)")
        if cluster.dashboard_url:
            print(f"  ray job submit --address {cluster.dashboard_url} --working-dir . -- python -m pipelines.embed")
        sys.stdout.flush()
        if args.check:
            _check(cluster)
            return 0
        # Ctrl-C, `kill -INT <pid>` (even when started in the background) and `kill <pid>` all stop the nodes cleanly.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        print("Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.shutdown()
        print("local Ray cluster stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
