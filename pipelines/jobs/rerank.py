"""The rerank job: read + group by query (CPU tasks) -> tokenize pairs (CPU tasks) -> score (Reranker actor pool)
-> rank + write parts (CPU tasks). The output contract is the embed job's; pipelines/runner.py does the rest.

A query id found in several shards (or candidate rows) is ranked separately in each; the job counts such ids on the
engine after the run (a group-by over the query ids it wrote, never an id set in the driver) and warns.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from typing import Any

from operators import DEFAULT_INSTRUCTION, __version__, rows
from operators.errors import ConfigError, ModelLoadError
from operators.storage import Shard
from pipelines import commit
from pipelines.config import RerankJobConfig
from pipelines.jobs.rerank_read import Columns, read_rerank_shards
from pipelines.jobs.rerank_stages import RerankStage, tokenize_pairs, write_ranked
from pipelines.runner import Plan, RunStats, Stage
from pipelines.runtime import actor_threads, gpus_per_actor

log = logging.getLogger("rayembed")


def check_rerank_model(model: str, revision: str | None, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Validate the reranker on the driver from its configs (no weights), before any Ray work."""
    from operators.loading import inspect_model_dir, resolve_model_dir
    from operators.reranker import check_reranker_dir

    path = resolve_model_dir(model, revision=revision, storage_options=storage_options, metadata_only=True)
    spec = inspect_model_dir(path, source=model, require_weights=False)
    if any(f.endswith(".safetensors") for f in os.listdir(path)):
        check_reranker_dir(spec)  # a local directory: the full check, lm_head included
    elif not spec.is_qwen3 or (spec.architectures and not any(a.endswith("ForCausalLM") for a in spec.architectures)):
        raise ModelLoadError(
            f"model {model!r} ({', '.join(spec.architectures) or spec.model_type}) is not a Qwen3 causal LM; the "
            "reranker needs a Qwen3-Reranker checkpoint, e.g. Qwen/Qwen3-Reranker-0.6B"
        )
    with open(os.path.join(path, "config.json"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    return {"source": model, "revision": revision, "family": spec.family, "config_sha256": digest}


def check_columns(shard: Shard, cfg: RerankJobConfig) -> None:
    names = rows.first_columns(shard, cfg.options)
    if names is None:
        return
    need = [("--query-id-column", cfg.query_id_column), ("--query-column", cfg.query_column)]
    if cfg.candidates_column not in names:
        need += [("--doc-id-column", cfg.doc_id_column), ("--doc-column", cfg.doc_column)]
    for role, col in need:
        if col not in names:
            raise ConfigError(
                f"{role} {col!r} not found in {shard.url} (columns: {', '.join(names)}); rerank input is either "
                f"pairs ({cfg.query_id_column}, {cfg.query_column}, {cfg.doc_id_column}, {cfg.doc_column}) or "
                f"candidate lists ({cfg.query_id_column}, {cfg.query_column}, {cfg.candidates_column})"
            )


def reranker_kwargs(cfg: Any, model: str, revision: str | None, instruction: str | None, max_length: int) -> dict:
    """The model actor's Reranker arguments (the search job's rerank step uses them too)."""
    return {
        "model": model,
        "instruction": instruction,
        "max_length": max_length,
        "batch_tokens": cfg.batch_tokens,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "revision": revision,
        "trust_remote_code": cfg.trust_remote_code,
        "impl": cfg.model_impl,
        "storage_options": cfg.options,
    }


class RerankJob:
    name = "rerank"

    def __init__(self, cfg: RerankJobConfig):
        self.cfg = cfg
        self.instruction = cfg.instruction or DEFAULT_INSTRUCTION

    def inputs(self) -> dict[str, tuple[str, ...]]:
        return {"--input": self.cfg.input}

    def plan(self, shards: list[Shard]) -> Plan:
        cfg = self.cfg
        model = check_rerank_model(cfg.model, cfg.revision, cfg.options)
        check_columns(shards[0], cfg)
        columns = [cfg.query_id_column, cfg.query_column, cfg.doc_id_column, cfg.doc_column, cfg.candidates_column]
        key = commit.output_key(
            {
                "kind": "rerank",
                "model": cfg.model,
                "revision": cfg.revision,
                "config_sha256": model["config_sha256"],
                "instruction": self.instruction,
                "max_length": cfg.max_length,
                "columns": columns,
            }
        )
        config = {**cfg.public(), "instruction": self.instruction}
        return Plan(key=key, model={**model, "kind": "rerank"}, config=config)

    def stages(self, plan: Plan) -> list[Stage]:
        cfg, so = self.cfg, self.cfg.options
        cols = Columns(cfg.query_id_column, cfg.query_column, cfg.doc_id_column, cfg.doc_column, cfg.candidates_column)
        num_gpus = gpus_per_actor(cfg.num_gpus)
        threads = actor_threads(cfg.threads, cfg.num_cpus, num_gpus > 0, cfg.address, cfg.concurrency[1])
        metadata = {
            "rayembed.version": __version__,
            "rayembed.kind": "rerank",
            "rayembed.model": cfg.model,
            "rayembed.revision": cfg.revision or "",
            "rayembed.instruction": self.instruction,
            "rayembed.max_length": str(cfg.max_length),
            "rayembed.config_sha256": plan.model["config_sha256"],
        }
        tokenize = {
            "model": cfg.model,
            "revision": cfg.revision,
            "instruction": cfg.instruction,
            "max_length": cfg.max_length,
            "storage_options": so,
        }
        read = {"columns": cols, "rows_per_block": cfg.rows_per_block, "storage_options": so}
        return [
            Stage("read", read_rerank_shards, batch_size=1, batch_format="numpy", kwargs=read),
            Stage("tokenize", tokenize_pairs, batch_size=1, kwargs=tokenize),
            Stage(
                "score",
                RerankStage,
                batch_size=1,  # one packed reader block per call (Ray Data requires an explicit batch size with GPUs)
                kwargs=reranker_kwargs(cfg, cfg.model, cfg.revision, cfg.instruction, cfg.max_length),
                actors=cfg.concurrency,
                num_gpus=num_gpus,
                num_cpus=cfg.num_cpus,
                # Own threads, as the embed actor; a distinct environment also keeps Ray Data from fusing the CPU
                # tasks into the actor.
                env={"OMP_NUM_THREADS": str(threads)},
            ),
            Stage("write", write_ranked, kwargs={"output": cfg.output, "metadata": metadata, "storage_options": so}),
        ]

    def finish(self, plan: Plan, markers: list[dict[str, Any]], stats: RunStats) -> None:
        """Count the distinct query ids this run ranked, and those ranked more than once, on the engine."""
        if not stats.processed or not stats.counts["queries"]:
            return
        import ray.data

        mine = set(stats.committed)
        urls = [self.cfg.location().join(f) for m in markers if m["stem"] in mine for f in m["files"]]
        ds = ray.data.from_items([{"url": u} for u in urls]).flat_map(
            _rankings, fn_kwargs={"storage_options": self.cfg.options}
        )
        counts = ds.groupby("query_id").count().rename_columns({"count()": "rankings"}).materialize()
        repeated = counts.filter(expr="rankings > 1").materialize()
        stats.counts["distinct_queries"] = counts.count()
        n = repeated.count()
        if n:
            examples = ", ".join(sorted(r["query_id"] for r in repeated.take(5)))
            print(
                f"rayembed rerank: warning: {n} query ids appear in more than one shard or candidate row and were "
                f"ranked separately in each (e.g. {examples}); put all of a query's pairs in one shard",
                file=sys.stderr,
                flush=True,
            )

    def summary(self, stats: RunStats, plan: Plan) -> list[str]:
        c = stats.counts
        rate = c["pairs"] / stats.elapsed if stats.elapsed > 0 else 0.0
        return [
            f"rayembed rerank: {stats.shards} shards ({stats.processed} processed, {stats.skipped} already "
            f"committed), {c['distinct_queries']} queries, {c['pairs']} pairs scored, {rate:,.1f} pairs/s, "
            f"{c['tokens']} tokens, {c['files']} files written, {c['errors']} rows quarantined, {c['truncated']} "
            f"truncated, {stats.elapsed:.1f}s -> {stats.output}"
        ]


def _rankings(row: dict[str, Any], storage_options: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per ranking in a written part: its rank-1 row, or the null row of a query without candidates."""
    import io

    import pyarrow.parquet as pq

    from operators import storage

    t = pq.read_table(io.BytesIO(storage.read_bytes(row["url"], storage_options)), columns=["query_id", "rank"])
    return [{"query_id": str(q)} for q, r in zip(t["query_id"].to_pylist(), t["rank"].to_pylist()) if r in (1, None)]
