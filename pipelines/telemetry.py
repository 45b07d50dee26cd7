"""Job metrics for operators, through ``ray.util.metrics``: each node's Ray metrics agent exports them to Prometheus
(``http://<node>:<metrics_export_port>/metrics``; Ray's Prometheus service discovery file lists every node).

Ray exports a metric named ``rayembed_x`` as ``ray_rayembed_x`` (counters as ``ray_rayembed_x_total``), tagged
``rayembed_job`` (the job: its output prefix) and ``stage``, plus Ray's own tags (``NodeAddress``, ``WorkerId``, ...):
one series per worker process, so dashboards sum by ``rayembed_job`` and ``stage``. Counters count work done, retries
and re-executions included (a restarted actor redoes its lost calls); the job's summary line counts what was
committed. Names, meanings and where each is recorded: cluster/README.md, "Metrics".

Metric objects are created lazily, once per process; with Ray not initialised (unit tests, the driver before
``ray.init``) every call is a no-op, and no call ever raises into the job. Stage code does not pass the job:
``bind(fn, job)`` wraps a stage so that its calls are tagged with the job it runs for (``job_scope`` in the driver).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("rayembed")

# Not "job": Prometheus sets that label on every scraped series itself (the scrape config's job_name) and would rename
# ours to exported_job.
JOB_TAG = "rayembed_job"
TAG_KEYS = (JOB_TAG, "stage")


@dataclass(frozen=True)
class Metric:
    name: str  # the ray.util.metrics name
    kind: str  # counter, gauge or histogram
    description: str
    boundaries: tuple[float, ...] = ()  # histogram bucket upper bounds

    @property
    def exported(self) -> str:
        """The sample name in Prometheus (a histogram adds _bucket, _sum and _count)."""
        return f"ray_{self.name}_total" if self.kind == "counter" else f"ray_{self.name}"


ROWS_READ = Metric("rayembed_rows_read", "counter", "Input rows read, bad rows included (stage read).")
ROWS_EMBEDDED = Metric("rayembed_rows_embedded", "counter", "Rows the model embedded or scored (stage embed).")
TOKENS = Metric("rayembed_tokens", "counter", "Real tokens of the rows the model ran on, padding excluded.")
TOKEN_SLOTS = Metric("rayembed_token_slots", "counter", "Token positions the model computed, padding included.")
ROWS_QUARANTINED = Metric("rayembed_rows_quarantined", "counter", "Rows written to _errors/ (stage write).")
STORAGE_RETRIES = Metric("rayembed_storage_retries", "counter", "Storage requests retried after a transient error.")
SHARDS_COMMITTED = Metric("rayembed_shards_committed", "counter", "Shards committed (marker written) by the driver.")
SHARDS_PLANNED = Metric("rayembed_shards_planned", "gauge", "Shards this run has to commit (pending at planning).")
MODEL_CALL_SECONDS = Metric(
    "rayembed_model_call_seconds",
    "histogram",
    "Wall time of one model-actor call (one Ray Data batch, all its micro-batches).",
    (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
PADDING_EFFICIENCY = Metric(
    "rayembed_padding_efficiency", "gauge", "Real tokens / token positions computed, in the actor's last model call."
)
METRICS = (
    ROWS_READ,
    ROWS_EMBEDDED,
    TOKENS,
    TOKEN_SLOTS,
    ROWS_QUARANTINED,
    STORAGE_RETRIES,
    SHARDS_COMMITTED,
    SHARDS_PLANNED,
    MODEL_CALL_SECONDS,
    PADDING_EFFICIENCY,
)

_lock = threading.Lock()
_objects: dict[str, Any] = {}
_job = ""  # the job this process works for: set by bind()'s wrappers in stages, by set_job() in the driver
_warned = False


def set_job(job: str) -> None:
    global _job
    _job = job


def _ray_ready() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _object(m: Metric) -> Any:
    obj = _objects.get(m.name)
    if obj is None:
        from ray.util import metrics

        with _lock:
            obj = _objects.get(m.name)
            if obj is None:
                if m.kind == "counter":
                    obj = metrics.Counter(m.name, m.description, tag_keys=TAG_KEYS)
                elif m.kind == "gauge":
                    obj = metrics.Gauge(m.name, m.description, tag_keys=TAG_KEYS)
                else:
                    obj = metrics.Histogram(m.name, m.description, list(m.boundaries), tag_keys=TAG_KEYS)
                _objects[m.name] = obj
    return obj


def record(m: Metric, value: float, *, stage: str, job: str | None = None) -> None:
    """Add ``value`` to a counter, set a gauge, or observe a histogram sample; tagged ``job`` and ``stage``."""
    global _warned
    value = float(value)  # Ray takes int or float only: not numpy's scalars
    if m.kind == "counter" and value <= 0:
        return  # Ray refuses a zero increment; nothing to count
    if not _ray_ready():
        return
    try:
        obj = _object(m)
        tags = {JOB_TAG: job if job is not None else _job, "stage": stage}
        if m.kind == "counter":
            obj.inc(value, tags=tags)
        elif m.kind == "gauge":
            obj.set(value, tags=tags)
        else:
            obj.observe(value, tags=tags)
    except Exception as e:  # metrics must never fail a job
        if not _warned:
            _warned = True
            log.warning("metrics disabled in this process: %s: %s", type(e).__name__, e)


def model_call(seconds: float, *, rows: int, tokens: int, slots: int, stage: str = "embed", job: str | None = None):
    """One model-actor call: its latency, the rows and real tokens it embedded, the token positions it computed."""
    record(MODEL_CALL_SECONDS, seconds, stage=stage, job=job)
    record(ROWS_EMBEDDED, rows, stage=stage, job=job)
    record(TOKENS, tokens, stage=stage, job=job)
    record(TOKEN_SLOTS, slots, stage=stage, job=job)
    if slots:
        record(PADDING_EFFICIENCY, tokens / slots, stage=stage, job=job)


def bind(fn: Any, job: str) -> Any:
    """``fn`` (a Ray Data stage: a function, or a class for an actor pool) tagging its metrics with ``job``."""
    if isinstance(fn, type):

        class Bound(fn):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any):
                set_job(job)
                super().__init__(*args, **kwargs)

            def __call__(self, batch: Any) -> Any:
                set_job(job)
                return super().__call__(batch)

        Bound.__name__ = Bound.__qualname__ = fn.__name__
        return Bound

    def bound(batch: Any, **kwargs: Any) -> Any:
        set_job(job)
        return fn(batch, **kwargs)

    bound.__name__ = bound.__qualname__ = getattr(fn, "__name__", "stage")
    return bound


@contextlib.contextmanager
def job_scope(job: str):
    """The driver's metrics inside the block are tagged ``job`` (the runner wraps a run in it)."""
    before = _job
    set_job(job)
    try:
        yield
    finally:
        set_job(before)
