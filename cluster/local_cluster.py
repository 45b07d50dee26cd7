"""A multi-node Ray cluster on one machine, with logical GPUs, for trying cluster behaviour without a cloud.

    python cluster/local_cluster.py --workers 2 --gpus-per-worker 1              # prints the address, Ctrl-C stops
    python cluster/local_cluster.py --workers 2 --gpus-per-worker 1 --dashboard  # also a job-submission endpoint
    python cluster/local_cluster.py --workers 2 --gpus-per-worker 1 --check      # start, connect, print, stop

Then, in another shell, run a job against it (the model runs on CPU: a "GPU" here is a logical resource that Ray
schedules, not a device):

    RAY_ADDRESS=<address> rayembed embed --input examples/corpus --output /tmp/out --model <dir> \\
        --concurrency 1,2 --num-gpus 1 --device cpu

From Python (tests): ``cluster = start_local_cluster(workers=2, gpus_per_worker=1)``, then
``ray.init(address=cluster.address)`` ... ``ray.shutdown()``, ``cluster.shutdown()``.

Every node is a set of real Ray processes started by ``ray.cluster_utils.Cluster`` and owned by this process;
``cluster.shutdown()`` stops exactly those. Never use ``ray stop`` here: it kills every Ray on the machine.
All listening ports are free ones picked at start, so several such clusters (and other Ray instances) coexist.

An autoscaling cluster (a CPU head; GPU worker nodes that the autoscaler adds from zero and removes when idle):
``python cluster/local_cluster.py --autoscaling --max-workers 2``, or ``start_autoscaling_cluster(max_workers=2)``
(clients need ``cluster.env`` in their environment).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ray._common.utils import get_ray_address_file
from ray.cluster_utils import Cluster

DEFAULT_OBJECT_STORE_BYTES = 256 * 1024 * 1024


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


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
    before: str | None = None
    with contextlib.suppress(OSError):
        before = _read(path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if before is None:
                if os.path.exists(path):
                    os.remove(path)
            else:
                with open(path, "w") as f:
                    f.write(before)


class LocalCluster(Cluster):
    """``ray.cluster_utils.Cluster`` that keeps to its own temp dir and leaves the machine's default address alone."""

    dashboard_url: str | None = None
    temp_dir: str | None = None
    worker_args: dict[str, Any] = {}

    def add_worker(self, **overrides: Any) -> Any:
        """Add one worker node like the ones ``start_local_cluster`` made (free ports); returns its ``Node``. With
        ``remove_node(node, allow_graceful=False)`` a test loses a node the way a crashed machine is lost."""
        return self.add_node(**{**self.worker_args, **overrides, "temp_dir": self.temp_dir, **_port_args()})

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
    system_config: dict[str, Any] | None = None,
) -> LocalCluster:
    """Start a head plus ``workers`` worker nodes and wait until all of them are alive; returns the cluster.

    The head takes ``head_cpus`` CPUs and no GPU (like a CPU head on a real cluster); each worker node has
    ``cpus_per_worker`` CPUs and ``gpus_per_worker`` logical GPUs. ``dashboard=True`` starts the dashboard on a free
    port (needed for ``ray job submit``); its URL is ``cluster.dashboard_url``. ``system_config``: Ray's internal
    settings for the whole cluster (e.g. ``metrics_report_interval_ms``). The caller owns the cluster and must call
    ``cluster.shutdown()`` (and ``ray.shutdown()`` first if it connected).

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
    if system_config:
        head_args["_system_config"] = system_config
    if dashboard:
        head_args.update(dashboard_host="127.0.0.1", dashboard_port=_free_port())
    with _keep_address_file():
        cluster = LocalCluster(initialize_head=True, head_node_args=head_args)
    cluster.temp_dir = temp_dir
    cluster.worker_args = {
        "num_cpus": cpus_per_worker,
        "num_gpus": gpus_per_worker,
        "resources": dict(worker_resources or {}),
        "object_store_memory": object_store_bytes,
    }
    try:
        # The job supervisor resolves its own cluster ("auto") through this file in the node's temp dir.
        with open(get_ray_address_file(temp_dir), "w") as f:
            f.write(cluster.address)
        if dashboard:
            cluster.dashboard_url = f"http://{head_args['dashboard_host']}:{head_args['dashboard_port']}"
        for _ in range(workers):
            cluster.add_worker()
        cluster.wait_for_nodes()
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


# The fake multi-node provider (ray/autoscaler/_private/fake_multi_node/node_provider.py) starts each node it launches
# as a ray._private.node.Node (a raylet and agents, with its type's resources) inside the head's autoscaler process.
# It names the head's type "ray.head.default" itself.
FAKE_HEAD_TYPE = "ray.head.default"
FAKE_GPU_TYPE = "ray.worker.gpu"
# Ray 2.60's AutoscalingCluster merged these keys in from fake_multi_node/example.yaml, which the wheel lacks; the
# v1 autoscaler reads them (file mounts, setup and start commands) even though this provider runs none of them.
_EMPTY_LAUNCHER_KEYS: dict[str, Any] = {
    **{k: {} for k in ("auth", "docker", "file_mounts")},
    **{k: [] for k in ("cluster_synced_files", "rsync_exclude", "rsync_filter")},
    **{f"{k}_commands": [] for k in ("initialization", "setup", "head_setup", "worker_setup")},
    **{f"{k}_start_ray_commands": [] for k in ("head", "worker")},
    "file_mounts_sync_continuously": False,
}


def autoscaling_config(
    gcs_address: str,
    head_cpus: int = 1,
    worker_cpus: int = 2,
    worker_gpus: float = 1,
    max_workers: int = 2,
    idle_timeout_s: float = 6,
    object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES,
) -> dict[str, Any]:
    """The cluster config of a fake multi-node autoscaling cluster: a CPU head and a GPU worker type, 0..max."""
    return {
        "cluster_name": "rayembed-local",
        "max_workers": max_workers,
        # gcs_address: launched nodes join the head's GCS (the provider's default is port 6379).
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address}
        | dict.fromkeys(["use_node_id_as_ip", "disable_node_updaters", "disable_launch_config_check"], True),
        "head_node_type": FAKE_HEAD_TYPE,
        "available_node_types": {
            FAKE_HEAD_TYPE: {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            FAKE_GPU_TYPE: {
                "resources": {"CPU": worker_cpus, "GPU": worker_gpus, "object_store_memory": object_store_bytes},
                **{"node_config": {}, "min_workers": 0, "max_workers": max_workers},
            },
        },
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60,
        **_EMPTY_LAUNCHER_KEYS,
    }


def _session_pids(sid: int) -> list[int]:
    """Every live process of the session ``sid``. ``ray start`` runs as a session leader here (start_new_session),
    and every process of its cluster stays in that session: the head's, the fake provider's nodes (children of the
    autoscaler) and all their workers (which move to process groups of their own, so a group kill misses them)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                zombie = _read(f"/proc/{name}/stat").rpartition(")")[2].split()[0] == "Z"
                if os.getsid(int(name)) == sid and int(name) != os.getpid() and not zombie:
                    pids.append(int(name))
    return pids


@dataclass
class AutoscalingLocalCluster:
    """A ``ray start --head`` with the fake multi-node autoscaler; the caller owns it and calls ``shutdown()``."""

    address: str
    temp_dir: str
    config_path: str
    env: dict[str, str]  # what a client (driver, `ray` CLI) needs in its environment: the cluster's auth token
    proc: subprocess.Popen = field(repr=False)

    def shutdown(self, timeout: float = 30) -> None:
        """Stop exactly this cluster: SIGTERM to ``ray start`` (it stops the head's processes), then SIGKILL to what
        is left of its session. The fake provider's nodes are not the head's children, so SIGTERM misses them."""
        sid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(sid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _session_pids(sid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.time() + 5
            while _session_pids(sid) and time.time() < deadline:
                time.sleep(0.2)


def start_autoscaling_cluster(
    head_cpus: int = 1,
    worker_cpus: int = 2,
    worker_gpus: float = 1,
    max_workers: int = 2,
    idle_timeout_s: float = 6,
    object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES,
    temp_dir: str | None = None,
    extra_env: dict[str, str] | None = None,
    timeout: float = 120,
) -> AutoscalingLocalCluster:
    """Start a CPU head whose autoscaler adds GPU worker nodes (0..``max_workers``) on demand and removes them after
    ``idle_timeout_s`` idle; returns once the head is up (with no worker node yet). Not Ray's AutoscalingCluster: in
    Ray 2.60 its base config is missing from the wheel, and its start() and shutdown() run ``ray stop --force``, which
    kills every Ray on the machine. This one has free ports, its own temp dir and auth token, and stops only itself.
    """
    from ray._private.services import get_node_ip_address

    temp_dir = temp_dir or tempfile.mkdtemp(prefix="rayas-", dir="/tmp")
    port, ip = _free_port(), get_node_ip_address()
    config_path = os.path.join(temp_dir, "autoscaling.json")  # YAML is a superset of JSON
    with open(config_path, "w") as f:
        sizes = (head_cpus, worker_cpus, worker_gpus, max_workers, idle_timeout_s, object_store_bytes)
        json.dump(autoscaling_config(f"{ip}:{port}", *sizes), f)
    token_path = os.path.join(temp_dir, "auth_token")
    with open(os.open(token_path, os.O_CREAT | os.O_WRONLY, 0o600), "w") as f:
        f.write(os.urandom(32).hex())
    client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path}
    # The autoscaler polls every AUTOSCALER_UPDATE_INTERVAL_S (default 5 s); RAY_FAKE_CLUSTER enables the provider.
    # No drain on SIGTERM: it waits up to 30 s for actors that outlive jobs (Ray Data's autoscaling coordinator).
    env = {**os.environ, **client_env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    env.update(extra_env or {})
    env.pop("RAY_ADDRESS", None)
    ports = [
        "--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
        "--runtime-env-agent-port", "--ray-client-server-port", "--node-manager-port", "--object-manager-port",
    ]  # fmt: skip
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
        f"--autoscaling-config={config_path}", "--port", str(port), "--temp-dir", temp_dir,
        "--num-cpus", str(head_cpus), "--num-gpus", "0", "--object-store-memory", str(object_store_bytes),
        "--include-dashboard", "false", "--disable-usage-stats",
        *[x for flag in ports for x in (flag, str(_free_port()))],
    ]  # fmt: skip
    log_path = os.path.join(temp_dir, "head.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cluster = AutoscalingLocalCluster(f"{ip}:{port}", temp_dir, config_path, client_env, proc)
    deadline = time.time() + timeout
    while "Ray runtime started" not in _read(log_path):
        if proc.poll() is not None or time.time() > deadline:
            cluster.shutdown()
            raise RuntimeError(f"the autoscaling head did not start; see {log_path}")
        time.sleep(0.5)
    return cluster


def _check(cluster: LocalCluster) -> dict[str, float]:
    """Connect as a driver, print what the cluster offers, disconnect."""
    import ray

    ray.init(address=cluster.address, log_to_driver=False)
    try:
        resources = ray.cluster_resources()
        print(f"nodes alive: {sum(bool(n['Alive']) for n in ray.nodes())}")
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
    mb = DEFAULT_OBJECT_STORE_BYTES // 2**20
    p.add_argument("--object-store-mb", type=int, default=mb, help=f"object store per node in MiB (default: {mb})")
    p.add_argument("--dashboard", action="store_true", help="start the dashboard (for `ray job submit`)")
    p.add_argument("--check", action="store_true", help="connect, print the cluster resources, shut down, exit")
    p.add_argument(
        "--autoscaling", action="store_true", help="no worker nodes at start: the autoscaler adds GPU nodes on demand"
    )
    p.add_argument("--max-workers", type=int, default=2, help="--autoscaling: most GPU nodes (default: 2)")
    p.add_argument("--idle-timeout-s", type=float, default=60, help="--autoscaling: idle node removal (default: 60)")
    args = p.parse_args(argv)

    t0 = time.time()
    size = dict(head_cpus=args.head_cpus, object_store_bytes=args.object_store_mb * 2**20)
    if args.autoscaling:
        cluster: Any = start_autoscaling_cluster(
            worker_cpus=args.cpus_per_worker,
            worker_gpus=args.gpus_per_worker,
            max_workers=args.max_workers,
            idle_timeout_s=args.idle_timeout_s,
            **size,
        )
        what = f"head; 0..{args.max_workers} GPU nodes ({args.gpus_per_worker:g} logical GPUs each) on demand"
    else:
        cluster = start_local_cluster(
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker,
            dashboard=args.dashboard,
            **size,
        )
        what = f"head + {args.workers} worker node(s), {args.gpus_per_worker:g} logical GPU(s) each"
    try:
        print(f"local Ray cluster up in {time.time() - t0:.1f}s: {what}", flush=True)
        print(f"address: {cluster.address}   (logs: {cluster.temp_dir})")
        env = " ".join(f"{k}={v}" for k, v in getattr(cluster, "env", {}).items())
        print(f"  export RAY_ADDRESS={cluster.address} {env}   # rayembed embed ... / ray.init(address=...)")
        if getattr(cluster, "dashboard_url", None):
            print(f"  ray job submit --address {cluster.dashboard_url} --working-dir . -- python -m pipelines.embed")
        sys.stdout.flush()
        if args.check and not args.autoscaling:
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
