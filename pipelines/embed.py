"""The embedding backfill job: ``python -m pipelines.embed`` (what ``ray job submit`` runs) and ``rayembed embed``.

plan -> read (CPU tasks) -> tokenize (CPU tasks) -> embed (actor pool) -> write parts (CPU tasks) -> commit markers
-> manifest. The driver only sees one small record per written part, so its memory does not grow with the corpus.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

from operators import __version__, storage
from operators.errors import ConfigError, RayembedError
from operators.loading import inspect_model_dir, resolve_model_dir
from operators.storage import Shard
from pipelines import commit
from pipelines.config import DEFAULT_EMBED_BLOCKS_PER_CALL, EmbedJobConfig
from pipelines.lease import Lease
from pipelines.stages import READY_FILE_ENV, EmbedStage, read_shards, shard_items, tokenize_block, write_parts

log = logging.getLogger("rayembed")


@dataclass
class EmbedSummary:
    shards: int
    processed: int
    skipped: int
    docs: int
    tokens: int
    files: int
    quarantined: int
    truncated: int
    elapsed: float
    output: str
    retries: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0

    def line(self) -> str:
        return (
            f"rayembed embed: {self.shards} shards ({self.processed} processed, {self.skipped} already committed), "
            f"{self.docs} docs, {self.tokens} tokens, {self.tokens_per_s:,.0f} tokens/s, {self.files} files written, "
            f"{self.quarantined} rows quarantined, {self.truncated} truncated, {self.retries} storage retries, "
            f"{self.elapsed:.1f}s -> {self.output}"
        )


def _model_info(cfg: EmbedJobConfig) -> dict[str, Any]:
    """Validate the model on the driver from its configs alone (no weights), so bad options fail before Ray work."""
    path = resolve_model_dir(cfg.model, revision=cfg.revision, storage_options=cfg.storage_options, metadata_only=True)
    spec = inspect_model_dir(path, source=cfg.model, require_weights=False)
    dim = cfg.dim or spec.hidden_size
    if not 32 <= dim <= spec.hidden_size:
        raise ConfigError(f"--dim must be in 32..{spec.hidden_size} (the model's hidden size), got {dim}")
    with open(os.path.join(path, "config.json"), "rb") as f:
        config_digest = hashlib.sha256(f.read()).hexdigest()[:16]
    return {
        "source": cfg.model,
        "revision": cfg.revision,
        "family": spec.family,
        "pooling": spec.pooling,
        "hidden_size": spec.hidden_size,
        "dim": dim,
        "config_sha256": config_digest,
    }


def _file_metadata(cfg: EmbedJobConfig, model: dict[str, Any]) -> dict[str, str]:
    return {
        "rayembed.version": __version__,
        "rayembed.model": cfg.model,
        "rayembed.revision": cfg.revision or "",
        "rayembed.dim": str(model["dim"]),
        "rayembed.normalized": "l2",
        "rayembed.pooling": model["pooling"],
        "rayembed.instruction": cfg.instruction or "",
        "rayembed.max_length": str(cfg.max_length),
        "rayembed.dtype": cfg.output_dtype,
    }


def _check_columns(shard: Shard, cfg: EmbedJobConfig) -> None:
    """Fail fast on a missing id/text column, from the first shard's schema or first line."""
    import pyarrow.parquet as pq

    try:
        with storage.open_input(shard, cfg.storage_options) as f:
            if shard.fmt == "parquet":
                names = pq.ParquetFile(f).schema_arrow.names
            else:
                line = b""
                for line in f:
                    if line.strip():
                        break
                names = list(json.loads(line).keys()) if line.strip() else None
    except Exception:
        return  # an unreadable shard is quarantined per shard by the reader, not fatal here
    if names is None:
        return
    for role, col in (("--id-column", cfg.id_column), ("--text-column", cfg.text_column)):
        if col not in names:
            raise ConfigError(f"{role} {col!r} not found in {shard.url} (columns: {', '.join(names)})")
    missing = [c for c in cfg.passthrough if c not in names]
    if missing:
        raise ConfigError(f"--passthrough column(s) {', '.join(missing)} not found in {shard.url}")


def _init_ray(address: str | None) -> None:
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


def _num_gpus(cfg: EmbedJobConfig) -> float:
    import ray

    if cfg.num_gpus is not None:
        return cfg.num_gpus
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _local_mode(cfg: EmbedJobConfig) -> bool:
    """Ray runs on this machine alone: no address given (the job started Ray, or its caller did) and one node."""
    import ray

    if cfg.address or os.environ.get("RAY_ADDRESS"):
        return False
    return sum(1 for n in ray.nodes() if n.get("Alive")) == 1


def _machine_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class EmbedResources:
    num_gpus: float
    num_cpus: float
    threads: int
    batch_rows: int


def embed_resources(cfg: EmbedJobConfig) -> EmbedResources:
    """What each model actor books from Ray, the torch threads it runs, and the rows it takes per call.

    Ray books ``--num-cpus`` (1) logical CPUs per actor and sets OMP_NUM_THREADS, hence torch's threads, to that
    number. On a GPU that is right: the host only feeds the device. A CPU actor in local mode instead runs
    ``--threads`` = this machine's cores / max actors, while booking only ``--num-cpus``: the remaining logical CPUs
    keep the read, tokenize and write tasks schedulable (booking every CPU for the actor would stall them), and those
    tasks need little CPU next to the model's forward passes (about 5% for the 2-layer test model, far less for a
    real one). On a CPU cluster, raise ``--num-cpus`` to give each actor more threads.
    """
    import ray

    num_gpus = _num_gpus(cfg)
    on_gpu = num_gpus > 0 and cfg.device not in ("cpu",)
    threads = cfg.threads
    if threads is None:
        if not on_gpu and _local_mode(cfg):
            cpus = min(_machine_cpus(), max(1, int(ray.cluster_resources().get("CPU", 1))))
            threads = max(1, cpus // cfg.concurrency[1])
        else:
            threads = max(1, int(cfg.num_cpus))
    blocks = DEFAULT_EMBED_BLOCKS_PER_CALL["gpu" if num_gpus > 0 else "cpu"]
    batch_rows = cfg.embed_batch_rows or blocks * cfg.rows_per_block
    return EmbedResources(num_gpus=num_gpus, num_cpus=cfg.num_cpus, threads=threads, batch_rows=batch_rows)


def storage_options(cfg: EmbedJobConfig) -> dict[str, Any]:
    """fsspec options for every storage call of the job: the user's, plus the S3 retry budget."""
    return {"retry_budget": cfg.retry_budget, **cfg.storage_options}


def plan_job(
    cfg: EmbedJobConfig, lease: Lease | None = None
) -> tuple[list[Shard], list[Shard], dict[str, dict[str, Any]], str, dict[str, Any]]:
    """List and validate; then take the lease (if given) before reading the markers, so the plan is ours alone."""
    so = storage_options(cfg)
    shards = storage.list_shards(cfg.input, so)
    for item in cfg.input:
        root = item.split("*")[0].split("?")[0].split("[")[0]
        if storage.is_within(cfg.output, root):
            raise ConfigError(f"--output {cfg.output!r} is inside --input {item!r}; write outputs to another prefix")
    model = _model_info(cfg)
    _check_columns(shards[0], cfg)
    key = commit.output_key(
        {
            "model": model["source"],
            "revision": cfg.revision,
            "config_sha256": model["config_sha256"],
            "dim": model["dim"],
            "instruction": cfg.instruction,
            "max_length": cfg.max_length,
            "output_dtype": cfg.output_dtype,
            "id_column": cfg.id_column,
            "text_column": cfg.text_column,
            "passthrough": list(cfg.passthrough),
        }
    )
    if lease is not None:
        lease.acquire()
        # Ours alone now: abort multipart uploads that killed writers of earlier attempts left unfinished.
        aborted = storage.abort_uploads(cfg.output, so)
        if aborted:
            log.info("aborted %d unfinished uploads left by earlier attempts", aborted)
    markers = commit.load_markers(cfg.output, so)
    pending, _done = commit.plan(shards, markers, key)
    return shards, pending, markers, key, model


def build_dataset(cfg: EmbedJobConfig, pending: list[Shard], model: dict[str, Any]):
    import ray
    import ray.data

    items = shard_items(pending)
    so = storage_options(cfg)
    # Fault-injection hooks (RAYEMBED_TEST_*) set in the driver's environment reach the stages' workers too.
    hooks = {k: v for k, v in os.environ.items() if k.startswith("RAYEMBED_TEST_")}
    remote: dict[str, Any] = {"runtime_env": {"env_vars": hooks}} if hooks else {}
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        read_shards,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={
            "id_column": cfg.id_column,
            "text_column": cfg.text_column,
            "passthrough": cfg.passthrough,
            "rows_per_block": cfg.rows_per_block,
            "storage_options": so,
        },
        **remote,
    )
    ds = ds.map_batches(
        tokenize_block,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs={
            "model": cfg.model,
            "revision": cfg.revision,
            "max_length": cfg.max_length,
            "instruction": cfg.instruction,
            "text_column": cfg.text_column,
            "drop_text": cfg.text_column not in cfg.passthrough,
            "storage_options": so,
        },
        **remote,
    )
    res = embed_resources(cfg)
    log.info(
        "embed stage: %s actors, %g GPUs and %g CPUs booked each, %d torch threads, %d rows per call",
        "..".join(map(str, dict.fromkeys(cfg.concurrency))),
        res.num_gpus,
        res.num_cpus,
        res.threads,
        res.batch_rows,
    )
    # OMP_NUM_THREADS in the actor's environment, for torch and any other OpenMP code there. The actor's remote
    # arguments then differ from the tasks', which also keeps Ray Data from fusing the read and tokenize tasks into
    # the actor (it fuses task -> actor maps with equal remote arguments, as on CPU): fused, every shard was read and
    # tokenized inside the actor, one after the other, all behind its start-up.
    embed_env = {**hooks, "OMP_NUM_THREADS": str(res.threads)}
    if os.environ.get(READY_FILE_ENV):
        embed_env[READY_FILE_ENV] = os.environ[READY_FILE_ENV]
    ds = ds.map_batches(
        EmbedStage,
        # Ray Data requires an explicit batch size for GPU stages. A batch may join rows of several shards or split
        # a block; the writer cuts each shard's rows back into parts of at most rows_per_block rows, named by their
        # first row offset.
        batch_size=res.batch_rows,
        batch_format="pyarrow",
        fn_constructor_kwargs={
            "model": cfg.model,
            "dim": model["dim"],
            "instruction": cfg.instruction,
            "max_length": cfg.max_length,
            "batch_tokens": cfg.batch_tokens,
            "device": cfg.device,
            "dtype": cfg.dtype,
            "output_dtype": cfg.output_dtype,
            "revision": cfg.revision,
            "trust_remote_code": cfg.trust_remote_code,
            "storage_options": so,
            "compile": cfg.compile,
            "packing": cfg.packing,
            "threads": res.threads,
        },
        compute=ray.data.ActorPoolStrategy(min_size=cfg.concurrency[0], max_size=cfg.concurrency[1]),
        # Ray Data's defaults restart dead actors and retry their tasks forever (max_restarts=-1,
        # max_task_retries=-1): at-least-once execution, made exactly-once by deterministic names and markers.
        num_gpus=res.num_gpus,
        num_cpus=res.num_cpus,
        runtime_env={"env_vars": embed_env},
    )
    return ds.map_batches(
        write_parts,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs={
            "output": cfg.output,
            "id_column": cfg.id_column,
            "passthrough": cfg.passthrough,
            "metadata": _file_metadata(cfg, model),
            "storage_options": so,
            "rows_per_part": cfg.rows_per_block,
        },
        **remote,
    )


def _worker_cause(e: BaseException) -> Exception | None:
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


# Test hook: the driver sleeps this many seconds after each shard commit (driver-kill tests need a slow job).
COMMIT_DELAY_ENV = "RAYEMBED_TEST_COMMIT_DELAY"


def run_embed(cfg: EmbedJobConfig) -> EmbedSummary:
    t0 = time.time()
    storage.take_retries()  # the driver's retry counter is per process: start this job's count from zero
    lease = Lease(
        cfg.output,
        ttl=cfg.lease_ttl,
        heartbeat=cfg.lease_heartbeat,
        storage_options=storage_options(cfg),
        info={"input": list(cfg.input)},
    )
    shards, pending, markers, key, model = plan_job(cfg, lease)
    try:
        try:
            summary = _run_planned(cfg, lease, shards, pending, markers, key, model, t0)
        except Exception as e:
            cause = _worker_cause(e)
            if cause is None:
                raise
            raise cause from None  # the worker traceback is in the Ray logs above
    except BaseException as e:
        with contextlib.suppress(Exception):
            storage.abort_uploads(cfg.output, storage_options(cfg))
        lease.release(f"failed: {e if isinstance(e, RayembedError) else storage.describe_error(e)}")
        raise
    lease.release("succeeded")
    return summary


def _run_planned(
    cfg: EmbedJobConfig,
    lease: Lease,
    shards: list[Shard],
    pending: list[Shard],
    markers: dict[str, dict[str, Any]],
    key: str,
    model: dict[str, Any],
    t0: float,
) -> EmbedSummary:
    so = storage_options(cfg)
    log.info(
        "planned %d shards: %d pending, %d already committed", len(shards), len(pending), len(shards) - len(pending)
    )
    progress = {s.stem: commit.ShardProgress(s) for s in pending}
    docs = tokens = files = quarantined = truncated = retries = 0
    delay = float(os.environ.get(COMMIT_DELAY_ENV) or 0)
    if pending:
        _init_ray(cfg.address)
        ds = build_dataset(cfg, pending, model)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            lease.check()
            for rec in batch.to_pylist():
                p = progress[rec["shard"]]
                p.add(rec)
                docs += rec["rows"]
                tokens += rec["tokens"]
                files += int(rec["file"] is not None)
                quarantined += rec["errors"]
                truncated += rec["truncated"]
                retries += rec.get("retries") or 0
                if p.complete:
                    markers[p.shard.stem] = commit.commit_shard(cfg.output, p, key, so)
                    if delay:
                        time.sleep(delay)
        # The run finished without error, so every shard was read to its end: commit the rest (empty shards).
        for p in progress.values():
            if p.shard.stem not in markers or markers[p.shard.stem].get("fingerprint") != p.shard.fingerprint:
                p.total = p.seen
                markers[p.shard.stem] = commit.commit_shard(cfg.output, p, key, so)
    lease.check()
    current = [markers[s.stem] for s in shards]
    total_rows = sum(m["rows"] + m["errors"] for m in current)
    total_errors = sum(m["errors"] for m in current)
    if total_rows and total_errors / total_rows > cfg.max_error_ratio:
        # Shards stay committed (a rerun does not redo them) but no manifest vouches for this output.
        raise RayembedError(
            f"{total_errors} of {total_rows} rows ({total_errors / total_rows:.2%}) were quarantined, above "
            f"--max-error-ratio {cfg.max_error_ratio:.2%}; no manifest written; "
            f"see {storage.join(cfg.output, '_errors')}"
        )
    commit.write_manifest(cfg.output, current, cfg.public(), model, so)
    return EmbedSummary(
        shards=len(shards),
        processed=len(pending),
        skipped=len(shards) - len(pending),
        docs=docs,
        tokens=tokens,
        files=files,
        quarantined=quarantined,
        truncated=truncated,
        elapsed=time.time() - t0,
        output=cfg.output,
        retries=retries + storage.take_retries(),
    )


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import main as cli_main

    return cli_main(["embed", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
