"""The Ray side every job shares: starting or joining Ray, what the cluster offers, and errors from workers."""

from __future__ import annotations

import contextlib
import os
import re

from operators import storage
from operators.errors import RayembedError

_LOCAL_RAY: list[bool] = []  # holds True while a local Ray that init_ray started in this process runs


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Local mode: Ray starts in-process and stops with the driver. address="local" forces a new instance:
        # a bare ray.init() attaches to whatever cluster /tmp/ray records (another user's, or a dead one).
        ray.init(address="local", include_dashboard=False, log_to_driver=True)
        _LOCAL_RAY.append(True)


def stop_local_ray() -> None:
    """Stop the local Ray that init_ray started here, if any, now rather than in Ray's exit hook, which first sleeps
    half a second for log lines and runs after the interpreter's other teardown (2.7 s from the summary line to the
    exit of the example job, 1.5 s this way). A Ray this process joined or a caller started is left alone."""
    if not _LOCAL_RAY:
        return
    import ray

    _LOCAL_RAY.clear()
    if ray.is_initialized():
        ray.shutdown()


def gpus_per_actor(requested: float | None) -> float:
    """``--num-gpus``, or 1 when the cluster has GPUs and 0 when it has none."""
    import ray

    if requested is not None:
        return requested
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def local_mode(address: str | None) -> bool:
    """Ray runs on this machine alone: no address given (the job started Ray, or its caller did) and one node."""
    import ray

    if address or os.environ.get("RAY_ADDRESS"):
        return False
    return sum(1 for n in ray.nodes() if n.get("Alive")) == 1


def machine_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def actor_threads(threads: int | None, num_cpus: float, on_gpu: bool, address: str | None, max_actors: int) -> int:
    """Torch threads of a model actor. Ray books ``num_cpus`` logical CPUs per actor and sets OMP_NUM_THREADS to
    that; on a GPU that is right (the host only feeds the device). A CPU actor in local mode instead runs this
    machine's cores / max actors while booking only ``num_cpus``: the other logical CPUs keep the read, tokenize and
    write tasks schedulable, and those need little CPU next to the model's forward passes."""
    if threads is not None:
        return threads
    if not on_gpu and local_mode(address):
        return max(1, min(machine_cpus(), cluster_cpus()) // max_actors)
    return max(1, int(num_cpus))


def worker_cause(e: BaseException) -> Exception | None:
    """The storage or user-facing error a Ray worker raised, from the chain Ray wraps it in (where the chain is
    lost in transit, from the worker traceback's text), so the CLI prints one line naming the cause."""
    if not type(e).__module__.startswith("ray"):
        return None
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if x is not e and isinstance(x, (RayembedError, OSError)):
            return x
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
    for line in str(e).splitlines():
        m = re.match(r"^\s*(?:[\w.]+\.)?(StorageError|OSError): (.+)$", line)
        if m:
            return (storage.StorageError if m.group(1) == "StorageError" else OSError)(m.group(2))
    return None


def kill_graph_actors() -> int:
    """Kill this driver's Ray Data map actors that are still alive; returns how many. Called when a graph failed:
    Ray Data 2.60 then only drops its references to a pool's actors (a shutdown without force), and a reference
    cycle (a pending task's callback, a logged traceback) can keep them alive, each booking its CPUs/GPUs, until the
    garbage collector runs: the next job of this process would wait for them. The runner runs one graph at a time,
    so a live ``MapWorker`` of this driver's job belongs to the graph that just failed."""
    import ray
    from ray._private import state, worker

    try:
        job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
        table = state.actors(job_id=job)
    except Exception:  # noqa: BLE001 (best effort: a debugging API of Ray's)
        return 0
    killed = 0
    for actor_id, info in table.items():
        live = info.get("State") in ("ALIVE", "PENDING_CREATION", "RESTARTING", "DEPENDENCIES_UNREADY")
        if live and str(info.get("ActorClassName", "")).startswith("MapWorker("):
            with contextlib.suppress(Exception):
                worker.global_worker.core_worker.kill_actor(ray.ActorID.from_hex(actor_id), True)
                killed += 1
    return killed
