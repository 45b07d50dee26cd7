"""The one job runner: everything a job does not declare itself.

A job (pipelines/jobs/) declares its config, its input shards, its plan (model checks, output key, what the manifest
records), its stages and its summary line. The runner owns the rest, the same way for every job:

    list + validate inputs -> output-inside-input check -> job.plan -> lease (+ abort unfinished uploads)
    -> marker diff (or the job's prepare hook: the embed job's match pass) -> Ray Data graph from the declared
    stages (or the job's own execute hook) -> record loop with shard commits beside it -> error-ratio gate
    -> job.finish -> manifest (or the job's commit hook: the embed job's version record) -> lease release -> summary

The driver sees one small record per written part (pipelines/parts.py RECORD_SCHEMA), so its memory does not grow
with the corpus; commits run on a small thread pool, so a slow store does not stall the loop that consumes the graph.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from operators import storage
from operators.errors import ConfigError, RayembedError
from operators.storage import Shard
from pipelines import commit, telemetry, testhooks
from pipelines.config import JobConfig
from pipelines.lease import Lease
from pipelines.parts import shard_items
from pipelines.progress import Progress
from pipelines.runtime import init_ray, kill_graph_actors, worker_cause

log = logging.getLogger("rayembed")

UNSUMMED = ("part", "shard_rows")  # record fields that are not counts
COMMIT_THREADS = 4  # shard commits in flight beside the record loop (each is a handful of small requests)


@dataclass(frozen=True)
class Stage:
    """One ``map_batches`` step of a job's graph. With ``actors`` it is an actor pool (min, max) of ``fn``, a class
    whose ``__init__`` loads and whose ``__call__(batch)`` computes; otherwise ``fn`` runs as Ray tasks."""

    name: str
    fn: Any
    batch_size: int | None = None
    batch_format: str = "pyarrow"
    kwargs: dict[str, Any] = field(default_factory=dict)  # fn_kwargs, or fn_constructor_kwargs for an actor pool
    actors: tuple[int, int] | None = None
    num_gpus: float = 0.0
    num_cpus: float | None = None
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the stage's workers


@dataclass
class Plan:
    """What a job's plan step settles before any Ray work: the output key (a digest of everything that changes the
    output) and what the manifest records."""

    key: str
    model: dict[str, Any]
    config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # job-private state between plan, stages and finish
    stamp: dict[str, Any] = field(default_factory=dict)  # written into every shard marker (a version's run id)


@dataclass
class RunStats:
    """What the runner measured, for the job's summary line."""

    output: str
    shards: int = 0
    processed: int = 0
    skipped: int = 0
    counts: Counter = field(default_factory=Counter)  # summed numeric record fields: rows, errors, tokens, ...
    quarantined_total: int = 0  # over the whole output (committed shards included)
    committed: list[str] = field(default_factory=list)  # stems of the shards this run committed
    elapsed: float = 0.0
    t0: float = field(default_factory=time.time)


class Job(Protocol):
    name: str
    cfg: JobConfig

    def inputs(self) -> dict[str, tuple[str, ...]]:
        """Input prefixes by flag, for the output-inside-input check; the first one lists the committed shards."""

    def plan(self, shards: list[Shard]) -> Plan: ...

    def stages(self, plan: Plan) -> list[Stage]: ...

    def summary(self, stats: RunStats, plan: Plan) -> list[str]: ...


def build_graph(job: Job, plan: Plan, pending: list[Shard]):
    """The Ray Data graph: one row per pending shard, then the job's stages in order."""
    import ray.data

    items = shard_items(pending, plan.extra.get("work"))
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    hooks = testhooks.forwarded_env()
    wrap = bool(hooks) or bool(os.environ.get(testhooks.READY_FILE_ENV))  # benchmarks' ready file is a hook too
    for st in job.stages(plan):
        fn = telemetry.bind(testhooks.wrap(st.fn) if wrap else st.fn, job.cfg.output)  # one series per job
        kw: dict[str, Any] = {"batch_size": st.batch_size, "batch_format": st.batch_format}
        if st.actors is not None:
            kw.update(
                fn_constructor_kwargs=st.kwargs,
                compute=ray.data.ActorPoolStrategy(min_size=st.actors[0], max_size=st.actors[1]),
                # Ray Data's defaults restart dead actors and retry their tasks forever (max_restarts=-1,
                # max_task_retries=-1): at-least-once execution, made exactly-once by deterministic names and markers.
                num_gpus=st.num_gpus,
            )
        else:
            kw["fn_kwargs"] = st.kwargs
        if st.num_cpus is not None:
            kw["num_cpus"] = st.num_cpus
        env = {**hooks, **st.env}
        if env:
            kw["runtime_env"] = {"env_vars": env}
        ds = ds.map_batches(fn, **kw)
    return ds


def _records(job: Job, plan: Plan, pending: list[Shard]) -> Iterator[dict[str, Any]]:
    execute = getattr(job, "execute", None)
    if execute is not None:  # a job that drives its own Ray work (search) still yields part records
        yield from execute(plan, pending)
        return
    batches = iter(build_graph(job, plan, pending).iter_batches(batch_format="pyarrow", batch_size=None))
    try:
        for batch in batches:
            yield from batch.to_pylist()
    except Exception as e:
        # The graph failed (a task raised). Ray Data then shuts its executor down without force: its pools' actors
        # are only unreferenced, not killed, and the executor sits in reference cycles (through this exception's
        # traceback too), so they live on, each booking its CPUs/GPUs, until the garbage collector happens to run;
        # the next job in this process waits for them (on a small local Ray, for ever). Release them now: clear the
        # locals of the traceback's finished frames, then collect; the actors exit once unreferenced.
        import gc
        import traceback

        seen, todo = set(), [e]
        while todo:
            x = todo.pop()
            if x is not None and id(x) not in seen:
                seen.add(id(x))
                traceback.clear_frames(x.__traceback__)
                todo += [x.__cause__, x.__context__]
        gc.collect()
        # And where something else still holds them (a log record's traceback, under pytest's log capture): kill.
        killed = kill_graph_actors()
        if killed:
            log.debug("killed %d actors of the failed graph", killed)
        raise
    finally:
        # A record loop that stops early (it raised, or lost the lease) closes this generator: shut the executor
        # down now, with force (its actors are killed), not whenever the garbage collector reaches it.
        batches.close()


class Runner:
    def __init__(self, job: Job):
        self.job = job
        self.cfg = job.cfg
        self.so = job.cfg.options

    def run(self) -> list[str]:
        stats = RunStats(output=self.cfg.output)
        storage.take_retries()  # the driver's retry counter is per process: start this job's count from zero
        shards, plan = self._plan()
        lease = Lease(
            self.cfg.output,
            ttl=self.cfg.lease_ttl,
            heartbeat=self.cfg.lease_heartbeat,
            storage_options=self.so,
            info={"input": list(next(iter(self.job.inputs().values()))), "job": self.job.name},
        )
        lease.acquire()
        try:
            try:
                self._run_leased(lease, shards, plan, stats)
            except Exception as e:
                cause = worker_cause(e)
                if cause is None:
                    raise
                raise cause from None  # the worker traceback is in the Ray logs above
        except BaseException as e:
            with contextlib.suppress(Exception):
                storage.abort_uploads(self.cfg.output, self.so)
            lease.release(f"failed: {e if isinstance(e, RayembedError) else storage.describe_error(e)}")
            raise
        # A lost CreateMultipartUpload answer can leave an upload no writer completes: abort before releasing.
        with contextlib.suppress(Exception):
            storage.abort_uploads(self.cfg.output, self.so)
        lease.release("succeeded")
        stats.elapsed = time.time() - stats.t0
        return self.job.summary(stats, plan)

    def _plan(self) -> tuple[list[Shard], Plan]:
        """List and validate the inputs, the job's own checks, then refuse an output inside an input."""
        inputs = self.job.inputs()
        shards = storage.list_shards(inputs[next(iter(inputs))], self.so)
        plan = self.job.plan(shards)
        for flag, items in inputs.items():
            for item in items:
                root = item.split("*")[0].split("?")[0].split("[")[0]
                if storage.is_within(self.cfg.output, root):
                    raise ConfigError(
                        f"--output {self.cfg.output!r} is inside {flag} {item!r}; write outputs to another prefix"
                    )
        return shards, plan

    def _run_leased(self, lease: Lease, shards: list[Shard], plan: Plan, stats: RunStats) -> None:
        # Ours alone now: abort multipart uploads that killed writers of earlier attempts left unfinished.
        aborted = storage.abort_uploads(self.cfg.output, self.so)
        if aborted:
            log.info("aborted %d unfinished uploads left by earlier attempts", aborted)
        markers = commit.load_markers(self.cfg.output, self.so)
        pending, _done = commit.plan(shards, markers, plan.key)
        prepare = getattr(self.job, "prepare", None)
        if prepare is not None:  # a versioned job decides itself (the match pass) what to read again
            pending = prepare(plan, shards, markers)
        stats.shards, stats.processed, stats.skipped = len(shards), len(pending), len(shards) - len(pending)
        log.info("planned %d shards: %d pending, %d already committed", len(shards), len(pending), stats.skipped)
        if pending:
            init_ray(self.cfg.address)
            progress = Progress(self.job.name, pending, len(shards))
            lease.progress = progress.snapshot
            self._consume(lease, plan, pending, markers, stats, progress)
            lease.progress = None
        lease.check()
        current = [markers[s.stem] for s in shards]
        self._gate(current, stats)
        finish = getattr(self.job, "finish", None)
        if finish is not None:
            finish(plan, current, stats)
        testhooks.point("runner.before_manifest")
        commit_output = getattr(self.job, "commit", None)
        if commit_output is not None:  # a versioned output commits a version record
            commit_output(plan, current, stats)
        else:
            commit.write_manifest(self.cfg.output, current, plan.config, plan.model, self.so)
        stats.counts["retries"] += storage.take_retries()

    def _consume(
        self,
        lease: Lease,
        plan: Plan,
        pending: list[Shard],
        markers: dict[str, dict[str, Any]],
        stats: RunStats,
        progress: Progress,
    ) -> None:
        shards = {s.stem: commit.ShardProgress(s) for s in pending}
        telemetry.record(telemetry.SHARDS_PLANNED, len(pending), stage="driver", job=self.cfg.output)
        futures: dict[str, Future] = {}
        records = _records(self.job, plan, pending)
        # Closed on any exit, before the pool waits for its commits: a graph that failed or was abandoned frees its
        # Ray resources at once (see _records).
        with (
            ThreadPoolExecutor(COMMIT_THREADS, thread_name_prefix="rayembed-commit") as pool,
            contextlib.closing(records),
        ):

            def submit(p: commit.ShardProgress) -> None:
                futures[p.shard.stem] = pool.submit(self._commit, p, plan, progress)

            for rec in records:
                lease.check()
                p = shards[rec["shard"]]
                p.add(rec)
                progress.update(rec)
                stats.counts.update({k: v for k, v in rec.items() if isinstance(v, int) and k not in UNSUMMED})
                stats.counts["files"] += int(rec["file"] is not None)
                if p.complete and p.shard.stem not in futures:
                    submit(p)
            # The run finished without error, so every shard was read to its end: commit the rest (empty shards).
            for p in shards.values():
                if p.shard.stem not in futures:
                    p.total = p.seen
                    submit(p)
            for stem, fut in futures.items():
                markers[stem] = fut.result()  # re-raises a failed commit: no manifest without every marker
                stats.committed.append(stem)
        # Set again at the end: a gauge set in the first moments after ray.init can miss the first export.
        telemetry.record(telemetry.SHARDS_PLANNED, len(pending), stage="driver", job=self.cfg.output)

    def _commit(self, p: commit.ShardProgress, plan: Plan, progress: Progress) -> dict[str, Any]:
        marker = commit.commit_shard(self.cfg.output, p, plan.key, self.so, plan.stamp)
        p.parts = []  # the marker holds what the manifest needs: the driver keeps no part records of a done shard
        progress.shard_done(p.shard.stem)
        telemetry.record(telemetry.SHARDS_COMMITTED, 1, stage="commit", job=self.cfg.output)
        testhooks.after_commit()
        return marker

    def _gate(self, current: list[dict[str, Any]], stats: RunStats) -> None:
        total_rows = sum(m["rows"] + m["errors"] for m in current)
        total_errors = sum(m["errors"] for m in current)
        stats.quarantined_total = total_errors
        if total_rows and total_errors / total_rows > self.cfg.max_error_ratio:
            # Shards stay committed (a rerun does not redo them) but no manifest vouches for this output.
            raise RayembedError(
                f"{total_errors} of {total_rows} rows ({total_errors / total_rows:.2%}) were quarantined, above "
                f"--max-error-ratio {self.cfg.max_error_ratio:.2%}; no manifest written; "
                f"see {storage.join(self.cfg.output, '_errors')}"
            )


def run(job: Job) -> list[str]:
    """Run a job to its end; returns its summary lines."""
    return Runner(job).run()
