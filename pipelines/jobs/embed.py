"""The embed job: read (CPU tasks) -> tokenize (CPU tasks) -> embed (model actor pool) -> write parts (CPU tasks).

Everything else (listing, lease, markers, commits, the error gate, the manifest) is pipelines/runner.py's.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

from operators import MIN_DIM, __version__, rows, storage
from operators.errors import ConfigError
from operators.storage import Shard
from pipelines import commit, testhooks, versions
from pipelines.config import DEFAULT_EMBED_BLOCKS_PER_CALL, DEFAULT_PART_BYTES, PART_ROW_OVERHEAD, EmbedJobConfig
from pipelines.jobs import refresh_plan
from pipelines.jobs.embed_model import EmbedStage
from pipelines.jobs.embed_stages import read_shards, tokenize_parts
from pipelines.jobs.embed_write import write_parts
from pipelines.runner import Plan, RunStats, Stage
from pipelines.runtime import actor_threads, gpus_per_actor

log = logging.getLogger("rayembed")


def model_info(cfg: EmbedJobConfig) -> dict[str, Any]:
    """Validate the model on the driver from its configs alone (no weights), so bad options fail before Ray work."""
    from operators.loading import inspect_model_dir, resolve_model_dir

    path = resolve_model_dir(cfg.model, revision=cfg.revision, storage_options=cfg.options, metadata_only=True)
    spec = inspect_model_dir(path, source=cfg.model, require_weights=False)
    dim = cfg.dim or spec.hidden_size
    if not MIN_DIM <= dim <= spec.hidden_size:
        raise ConfigError(f"--dim must be in {MIN_DIM}..{spec.hidden_size} (the model's hidden size), got {dim}")
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


def check_columns(shard: Shard, cfg: EmbedJobConfig) -> None:
    """Fail fast on a missing id/text column, from the first shard's schema or first line."""
    names = rows.first_columns(shard, cfg.options)
    if names is None:
        return  # an unreadable shard is quarantined per shard by the reader, not fatal here
    for role, col in (("--id-column", cfg.id_column), ("--text-column", cfg.text_column)):
        if col not in names:
            raise ConfigError(f"{role} {col!r} not found in {shard.url} (columns: {', '.join(names)})")
    missing = [c for c in cfg.passthrough if c not in names]
    if missing:
        raise ConfigError(f"--passthrough column(s) {', '.join(missing)} not found in {shard.url}")


@dataclass(frozen=True)
class EmbedResources:
    num_gpus: float
    num_cpus: float
    threads: int
    batch_rows: int  # rows the model should see per call
    part_rows: int  # rows per output part (and per packed block through the graph)
    parts_per_call: int  # the model stage's Ray Data batch size, in packed parts


def part_rows(cfg: EmbedJobConfig, dim: int) -> int:
    """--part-rows, or about DEFAULT_PART_BYTES of vectors per part."""
    itemsize = 2 if cfg.output_dtype == "float16" else 4
    return cfg.part_rows or max(1, DEFAULT_PART_BYTES // (dim * itemsize + PART_ROW_OVERHEAD))


def embed_resources(cfg: EmbedJobConfig, dim: int) -> EmbedResources:
    """What each model actor books from Ray, the torch threads it runs, and the rows it takes per call: a call is
    one part, or as many parts as fit in ``batch_rows`` when parts are smaller (a shard smaller than a part is one
    part, so many small shards still make calls of many rows only when --part-rows is small)."""
    num_gpus = gpus_per_actor(cfg.num_gpus)
    on_gpu = num_gpus > 0 and cfg.device not in ("cpu",)
    threads = actor_threads(cfg.threads, cfg.num_cpus, on_gpu, cfg.address, cfg.concurrency[1])
    blocks = DEFAULT_EMBED_BLOCKS_PER_CALL["gpu" if num_gpus > 0 else "cpu"]
    batch_rows = cfg.embed_batch_rows or blocks * cfg.rows_per_block
    rows = part_rows(cfg, dim)
    return EmbedResources(
        num_gpus=num_gpus,
        num_cpus=cfg.num_cpus,
        threads=threads,
        batch_rows=batch_rows,
        part_rows=rows,
        parts_per_call=max(1, batch_rows // rows),
    )


class EmbedJob:
    name = "embed"

    def __init__(self, cfg: EmbedJobConfig):
        self.cfg = cfg

    def inputs(self) -> dict[str, tuple[str, ...]]:
        return {"--input": self.cfg.input}

    def plan(self, shards: list[Shard]) -> Plan:
        cfg = self.cfg
        model = model_info(cfg)
        check_columns(shards[0], cfg)
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
        parent = versions.latest(cfg.output, cfg.options)
        if parent is not None and parent["output_key"] != key:
            raise ConfigError(
                f"output prefix {cfg.output!r} holds version {parent['version']} embedded with different settings "
                "(model, dim, instruction, max length or dtype); write to a new --output"
            )
        vr = refresh_plan.start(key, parent, shards, model["dim"], cfg.output_dtype)
        extra = {"version": vr, "id_type": _id_type(cfg.output, parent, cfg.options)}
        return Plan(key=key, model=model, config=cfg.public(), extra=extra)

    def prepare(self, plan: Plan, shards: list[Shard], markers: dict[str, dict[str, Any]]) -> list[Shard]:
        return refresh_plan.prepare(self, plan, shards, markers)

    def commit(self, plan: Plan, markers: list[dict[str, Any]], stats: RunStats) -> None:
        plan.extra["record"] = refresh_plan.commit_version(self, plan, markers)

    def metadata(self, model: dict[str, Any]) -> dict[str, str]:
        cfg = self.cfg
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

    def stages(self, plan: Plan) -> list[Stage]:
        cfg, so = self.cfg, self.cfg.options
        res = embed_resources(cfg, plan.model["dim"])
        log.info(
            "embed stage: %s actors, %g GPUs and %g CPUs booked each, %d torch threads, %d part(s) of up to %d rows "
            "per call",
            *("..".join(map(str, dict.fromkeys(cfg.concurrency))), res.num_gpus, res.num_cpus, res.threads),
            *(res.parts_per_call, res.part_rows),
        )
        # OMP_NUM_THREADS in the actor's environment, for torch and any other OpenMP code there. The actor's remote
        # arguments then differ from the tasks', which also keeps Ray Data from fusing the read and tokenize tasks into
        # the actor (it fuses task -> actor maps with equal remote arguments, as on CPU): fused, every shard was read
        # and tokenized inside the actor, one after the other, all behind its start-up.
        actor_env = {"OMP_NUM_THREADS": str(res.threads)}
        if os.environ.get(testhooks.READY_FILE_ENV):
            actor_env[testhooks.READY_FILE_ENV] = os.environ[testhooks.READY_FILE_ENV]
        read = {
            "id_column": cfg.id_column,
            "text_column": cfg.text_column,
            "passthrough": cfg.passthrough,
            "rows_per_block": cfg.rows_per_block,
            "part_rows": res.part_rows,
            "storage_options": so,
            "vec_width": plan.extra["version"].width,
        }
        tokenize = {
            "model": cfg.model,
            "revision": cfg.revision,
            "max_length": cfg.max_length,
            "instruction": cfg.instruction,
            "text_column": cfg.text_column,
            "drop_text": cfg.text_column not in cfg.passthrough,
            "storage_options": so,
        }
        embed = {
            "model": cfg.model,
            "dim": plan.model["dim"],
            "instruction": cfg.instruction,
            "max_length": cfg.max_length,
            "batch_tokens": cfg.batch_tokens,
            "device": cfg.device,
            "dtype": cfg.dtype,
            "output_dtype": cfg.output_dtype,
            "revision": cfg.revision,
            "trust_remote_code": cfg.trust_remote_code,
            "impl": cfg.model_impl,
            "storage_options": so,
            "compile": cfg.compile,
            "packing": cfg.packing,
            "threads": res.threads,
            "tokenizer": False,  # the tokenize stage sends ids: loading a tokenizer here only delays the actor's start
        }
        write = {
            "output": cfg.output,
            "id_column": cfg.id_column,
            "passthrough": cfg.passthrough,
            "metadata": self.metadata(plan.model),
            "storage_options": so,
            "version": plan.extra["version"].version,
            "refresh": plan.extra["version"].refresh,
        }
        return [
            Stage("read", read_shards, batch_size=1, batch_format="numpy", kwargs=read),
            Stage("tokenize", tokenize_parts, kwargs=tokenize),
            # Ray Data requires an explicit batch size for GPU stages, and it re-batches rows across blocks and shards
            # to meet it: each part travels packed into one row, so a batch is whole parts, and each becomes one file.
            Stage(
                "embed",
                EmbedStage,
                batch_size=res.parts_per_call,
                kwargs=embed,
                actors=cfg.concurrency,
                num_gpus=res.num_gpus,
                num_cpus=res.num_cpus,
                env=actor_env,
            ),
            Stage("write", write_parts, kwargs=write),
        ]

    def summary(self, stats: RunStats, plan: Plan) -> list[str]:
        c = stats.counts
        rate = c["tokens"] / stats.elapsed if stats.elapsed > 0 else 0.0
        return [
            f"rayembed embed: {stats.shards} shards ({stats.processed} processed, {stats.skipped} already committed), "
            f"{c['rows']} docs, {c['tokens']} tokens, {rate:,.0f} tokens/s, {c['files']} files written, "
            f"{c['errors']} rows quarantined, {c['truncated']} truncated, {c['retries']} storage retries, "
            f"{stats.elapsed:.1f}s -> {stats.output}",
            version_line(plan),
        ]


def version_line(plan: Plan) -> str:
    vr, rec = plan.extra["version"], plan.extra.get("record")
    if rec is None:
        return f"version {vr.version - 1} is current: nothing changed"
    c = rec["counts"]
    return (
        f"version {rec['version']}: {c['rows']} rows, {c['embedded']} embedded, {c['reused']} reused, "
        f"{c['upserted']} upserted, {c['deleted']} deleted, {c['quarantined']} quarantined"
    )


def _id_type(output: str, parent: dict[str, Any] | None, so: dict[str, Any] | None) -> str | None:
    """The snapshot's id type (from one file's footer), so the deletes delta keeps the input's id type."""
    if not parent or not parent["files"]:
        return None
    import pyarrow.parquet as pq

    fs, path = storage.get_fs(storage.join(output, parent["files"][0]), so)
    with fs.open(path, "rb") as f:
        return str(pq.read_schema(f).field("id").type)
