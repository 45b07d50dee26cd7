"""Retrieve, then rerank: embed the queries, exact top-k over an embed job's vectors, rerank the top k.

The job drives its own Ray work (``execute``): the queries are embedded by the search actors, retrieval runs as Ray
tasks over groups of vector files (merged on the driver), the candidates' texts come from corpus tasks, and the same
actors rerank (through the shared poison bisection). It yields one record per written part, so listing, the lease,
markers, commits, the error gate, the manifest and the summary are pipelines/runner.py's, as for every job.

- One actor, both models: each search actor holds an ``Embedder`` and a ``Reranker`` on one device; its start logs
  both models' bytes.
- Exact retrieval: inner product (cosine for the unit vectors the embed job writes) over every vector file the embed
  job's ``_manifest.json`` lists. Ties are broken by id ascending (``operators.topk``). ``--k`` above the corpus size
  is clamped to it, with a warning.
- The reranked document is ``(title + " " + text).strip()``, as BEIR's rerankers build it from corpus.jsonl.
- Metrics (``operators.metrics``) are computed from the committed output files, so a rerun that skips every query
  shard still writes them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from operators import DEFAULT_INSTRUCTION, storage
from operators.errors import ConfigError, RayembedError
from operators.metrics import parse_qrels
from operators.storage import Shard
from operators.topk import TopK, merge_topk
from pipelines import commit
from pipelines.config import SearchJobConfig
from pipelines.jobs.rerank import check_rerank_model, reranker_kwargs
from pipelines.jobs.search_work import (
    Query,
    SearchActor,
    compute_metrics,
    load_texts,
    read_queries,
    scan_vectors,
    write_part,
)
from pipelines.runner import Plan, RunStats
from pipelines.runtime import cluster_cpus, gpus_per_actor

MANIFEST_FORMATS = (commit.MANIFEST_FORMAT, "rayembed.version/1")


def warn(message: str) -> None:
    print(f"rayembed search: warning: {message}", file=sys.stderr, flush=True)


def _embed_model_info(cfg: SearchJobConfig, vcfg: dict[str, Any], vmodel: dict[str, Any]) -> dict[str, Any]:
    model = cfg.embed_model or vcfg.get("model")
    revision = cfg.revision if cfg.embed_model else vcfg.get("revision")
    if not model:
        raise ConfigError("--vectors manifest names no model; pass --embed-model")
    if cfg.embed_model and cfg.embed_model != vcfg.get("model"):
        warn(f"--embed-model {cfg.embed_model!r} differs from the model of the corpus vectors {vcfg.get('model')!r}")
    from operators.loading import inspect_model_dir, resolve_model_dir

    path = resolve_model_dir(model, revision=revision, storage_options=cfg.options, metadata_only=True)
    spec = inspect_model_dir(path, source=model, require_weights=False)
    dim = int(vmodel.get("dim") or spec.hidden_size)
    if not 32 <= dim <= spec.hidden_size:
        raise ConfigError(
            f"the corpus vectors have dim {dim}, which model {model!r} (hidden {spec.hidden_size}) lacks"
        )
    with open(os.path.join(path, "config.json"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    return {
        "source": model,
        "revision": revision,
        "dim": dim,
        "max_length": int(cfg.max_length or vcfg.get("max_length") or 8192),
        "instruction": cfg.instruction or DEFAULT_INSTRUCTION,
        "config_sha256": digest,
    }


def _read_vectors_manifest(cfg: SearchJobConfig) -> dict[str, Any]:
    url = storage.join(cfg.vectors, "_manifest.json")
    try:
        manifest = storage.read_json(url, cfg.options)
    except RayembedError:
        raise
    except Exception as e:
        raise RayembedError(f"cannot read {url}: {storage.describe_error(e)}") from None
    if manifest is None:
        raise ConfigError(
            f"--vectors {cfg.vectors!r} has no _manifest.json; "
            "give the output prefix of a finished `rayembed embed` job"
        )
    if manifest.get("format") not in MANIFEST_FORMATS:
        raise ConfigError(f"{url} is not a rayembed embed manifest (format {manifest.get('format')!r})")
    if manifest.get("model", {}).get("kind") == "rerank" or "dim" not in manifest.get("model", {}):
        raise ConfigError(f"{url} is not the manifest of an embed job (no vector dim)")
    return manifest


def _read_qrels(cfg: SearchJobConfig) -> dict[str, dict[str, int]] | None:
    if not cfg.qrels:
        return None
    try:
        raw = storage.read_bytes(cfg.qrels, cfg.options)
    except FileNotFoundError:
        raise ConfigError(f"--qrels {cfg.qrels!r} does not exist") from None
    except Exception as e:
        raise RayembedError(f"cannot read --qrels {cfg.qrels!r}: {storage.describe_error(e)}") from None
    if cfg.qrels.endswith(".gz"):
        import gzip

        raw = gzip.decompress(raw)
    qrels = parse_qrels(raw.decode("utf-8"), source=f"--qrels {cfg.qrels}")
    if not qrels:
        raise ConfigError(f"--qrels {cfg.qrels!r} holds no judgements")
    return qrels


def _groups(items: list[Any], n: int) -> list[list[Any]]:
    n = max(1, min(n, len(items)))
    return [items[i::n] for i in range(n)] if items else []


def _scan(
    cfg: SearchJobConfig, files: list[str], queries: np.ndarray | None, k: int, wanted: frozenset[str]
) -> tuple[TopK | None, set[str], int]:
    import ray

    task = ray.remote(scan_vectors).options(num_cpus=1, max_retries=3)
    qref = ray.put(queries)
    wref = ray.put(wanted)
    n = cfg.retrieval_tasks or 2 * cluster_cpus()
    pending = [task.remote(g, qref, k, wref, cfg.options) for g in _groups(files, n)]
    result: TopK | None = None
    present: set[str] = set()
    rows = 0
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        part, found, count = ray.get(done[0])
        present |= found
        rows += count
        if part is not None:
            result = part if result is None else merge_topk([result, part], k)  # merged as they arrive
    return result, present, rows


def _texts(cfg: SearchJobConfig, needed: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    import ray

    shards = storage.list_shards(cfg.corpus, cfg.options)
    task = ray.remote(load_texts).options(num_cpus=1, max_retries=3)
    ref = ray.put(frozenset(needed))
    cols = (cfg.corpus_id_column, cfg.corpus_title_column, cfg.corpus_text_column)
    refs = [task.remote(dataclasses.asdict(s), ref, cols, cfg.options) for s in shards]
    texts: dict[str, str] = {}
    bad: dict[str, str] = {}
    for t, b in ray.get(refs):
        texts.update(t)
        bad.update(b)
    return texts, {k: v for k, v in bad.items() if k not in texts}


def _search_key(
    cfg: SearchJobConfig,
    embed: dict[str, Any],
    rerank: dict[str, Any],
    manifest: dict[str, Any],
    k: int,
    corpus: list[Shard],
) -> str:
    return commit.output_key(
        {
            "kind": "search",
            "embed": embed,
            "rerank": rerank,
            "rerank_instruction": cfg.rerank_instruction or DEFAULT_INSTRUCTION,
            "rerank_max_length": cfg.rerank_max_length,
            "k": k,
            "vectors": [manifest.get("written_at"), hashlib.sha256("\0".join(manifest["files"]).encode()).hexdigest()],
            "corpus": [s.fingerprint for s in corpus],
            "columns": [
                cfg.query_id_column,
                cfg.query_text_column,
                cfg.corpus_id_column,
                cfg.corpus_title_column,
                cfg.corpus_text_column,
            ],
        }
    )


class SearchJob:
    name = "search"

    def __init__(self, cfg: SearchJobConfig):
        self.cfg = cfg

    def inputs(self) -> dict[str, tuple[str, ...]]:
        return {"--queries": self.cfg.queries, "--corpus": self.cfg.corpus, "--vectors": (self.cfg.vectors,)}

    def plan(self, shards: list[Shard]) -> Plan:
        cfg = self.cfg
        manifest = _read_vectors_manifest(cfg)
        vcfg, vmodel = manifest.get("config", {}), manifest.get("model", {})
        files = [storage.join(cfg.vectors, f) for f in manifest["files"]]
        n_corpus = int(manifest.get("totals", {}).get("rows", 0))
        if not files or n_corpus == 0:
            raise ConfigError(f"--vectors {cfg.vectors!r} holds no vectors (its manifest lists no rows)")
        if vcfg.get("instruction"):
            warn("the corpus vectors were embedded with an instruction (query mode); documents usually take none")
        embed_model = _embed_model_info(cfg, vcfg, vmodel)
        rerank_model = check_rerank_model(cfg.rerank_model, cfg.rerank_revision, cfg.options)
        k = cfg.k
        if k > n_corpus:
            warn(f"--k {cfg.k} is larger than the corpus ({n_corpus} documents); using k={n_corpus}")
            k = n_corpus
        cshards = storage.list_shards(cfg.corpus, cfg.options)
        qrels = _read_qrels(cfg)
        key = _search_key(cfg, embed_model, rerank_model, manifest, k, cshards)
        config = cfg.public()
        config.update(
            k=k,
            requested_k=cfg.k,
            instruction=embed_model["instruction"],
            rerank_instruction=cfg.rerank_instruction or DEFAULT_INSTRUCTION,
        )
        model = {
            "kind": "search",
            "embed": embed_model,
            "rerank": rerank_model,
            "vectors": {"prefix": cfg.vectors, "written_at": manifest.get("written_at"), "rows": n_corpus},
        }
        queries = read_queries(shards, cfg)
        extra = {"files": files, "k": k, "qrels": qrels, "queries": queries, "n_corpus": n_corpus, "present": set()}
        extra["wanted"] = frozenset(d for j in (qrels or {}).values() for d in j)
        return Plan(key=key, model=model, config=config, extra=extra)

    def stages(self, plan: Plan) -> list:
        return []  # search drives its own Ray work: see execute

    def execute(self, plan: Plan, pending: list[Shard]) -> Iterator[dict[str, Any]]:
        import ray

        x = plan.extra
        stems = {s.stem for s in pending}
        todo = [q for q in x["queries"] if q.shard in stems]
        valid = [q for q in todo if q.error is None]
        x["searched"] = len(valid)
        actors = self._actors(plan)
        try:
            b = ray.get(actors[0].model_bytes.remote())
            plan.model["bytes_per_actor"] = x["model_bytes"] = b
            yield from self._search(plan, actors, pending, todo, valid)
        finally:
            for a in actors:  # also on failure: a shared cluster gets its CPUs/GPUs back
                ray.kill(a)

    def _actors(self, plan: Plan) -> list:
        import ray

        cfg, em = self.cfg, plan.model["embed"]
        actor_cls = ray.remote(SearchActor).options(
            num_gpus=gpus_per_actor(cfg.num_gpus), num_cpus=cfg.num_cpus, max_restarts=2, max_task_retries=2
        )
        embed_kwargs = {
            "model": em["source"],
            "revision": em["revision"],
            "dim": em["dim"],
            "instruction": em["instruction"],
            "max_length": em["max_length"],
            "batch_tokens": cfg.batch_tokens,
            "device": cfg.device,
            "dtype": cfg.dtype,
            "trust_remote_code": cfg.trust_remote_code,
            "impl": cfg.model_impl,
            "storage_options": cfg.options,
        }
        rk = reranker_kwargs(cfg, cfg.rerank_model, cfg.rerank_revision, cfg.rerank_instruction, cfg.rerank_max_length)
        rk.pop("device")  # the reranker shares the embedder's device
        return [actor_cls.remote(embed_kwargs, rk) for _ in range(cfg.concurrency[1])]

    def _search(
        self, plan: Plan, actors: list, pending: list[Shard], todo: list[Query], valid: list[Query]
    ) -> Iterator[dict[str, Any]]:
        from ray.util import ActorPool

        cfg, x = self.cfg, plan.extra
        pool = ActorPool(actors)
        qpb = cfg.queries_per_block
        # 1. embed the queries
        blocks = [valid[i : i + qpb] for i in range(0, len(valid), qpb)]
        qvecs = np.zeros((len(valid), plan.model["embed"]["dim"]), dtype=np.float32)
        for index, vecs, _trunc in pool.map_unordered(
            lambda a, b: a.embed.remote(b[0], [q.text for q in b[1]]), list(enumerate(blocks))
        ):
            qvecs[index * qpb : index * qpb + len(vecs)] = vecs
        # 2. exact top-k over the corpus vectors
        top, x["present"], _rows = _scan(cfg, x["files"], qvecs if len(valid) else None, x["k"], x["wanted"])
        top = top if top is not None else TopK.empty(len(valid))
        cand_ids, cand_scores = top.ids.tolist(), top.scores.tolist()
        # 3. the candidates' texts
        needed = {str(d) for row in cand_ids for d in row}
        texts, bad_texts = _texts(cfg, needed) if needed else ({}, {})
        # 4. rerank, block by block of query rows (valid or not, so each part carries its own quarantine records)
        row_of = {id(q): i for i, q in enumerate(valid)}
        by_shard: dict[str, list[Query]] = {}
        for q in todo:
            by_shard.setdefault(q.shard, []).append(q)
        work: list[tuple[str, list[Query]]] = []
        for stem in sorted(by_shard):
            qs = sorted(by_shard[stem], key=lambda q: q.offset)
            work.extend((stem, qs[i : i + qpb]) for i in range(0, len(qs), qpb))

        def payload(index: int) -> tuple[int, list[str], list[str]]:
            qs, ds = [], []
            for q in work[index][1]:
                if q.error is None:
                    for d in cand_ids[row_of[id(q)]]:
                        if str(d) in texts:
                            qs.append(q.text)
                            ds.append(texts[str(d)])
            return index, qs, ds

        done: dict[str, list[dict[str, Any]]] = {s.stem: [] for s in pending}
        remaining = {stem: sum(1 for s, _ in work if s == stem) for stem in done}
        for index, scores, errors, tokens, truncated in pool.map_unordered(
            lambda a, i: a.rerank.remote(*payload(i)), list(range(len(work)))
        ):
            stem, qs = work[index]
            rec = write_part(cfg, stem, qs, row_of, cand_ids, cand_scores, texts, bad_texts, scores, errors)
            rec.update(tokens=tokens, truncated=truncated, pairs=len(scores))
            done[stem].append(rec)
            remaining[stem] -= 1
            if remaining[stem] == 0:  # the shard's last part: its total lets the runner commit it now
                rec["shard_rows"] = sum(r["rows"] + r["errors"] for r in done[stem])
            yield rec

    def finish(self, plan: Plan, markers: list[dict[str, Any]], stats: RunStats) -> None:
        x = plan.extra
        if x["qrels"] is None:
            return
        if not stats.processed:
            from pipelines.runtime import init_ray

            init_ray(self.cfg.address)
            _, x["present"], _ = _scan(self.cfg, x["files"], None, x["k"], x["wanted"])
        x["metrics"] = compute_metrics(self.cfg, markers, x["queries"], x["qrels"], x["present"], x["k"])
        self.cfg.location().write_json("metrics.json", x["metrics"])

    def summary(self, stats: RunStats, plan: Plan) -> list[str]:
        x, c = plan.extra, stats.counts
        out = [
            f"rayembed search: {len(x['queries'])} queries ({x.get('searched', 0)} searched, "
            f"{stats.quarantined_total} rows quarantined, {stats.skipped} of {stats.shards} query shards already "
            f"committed), corpus {x['n_corpus']} docs in {len(x['files'])} vector files, k={x['k']}, {c['pairs']} "
            f"pairs reranked, {c['tokens']} tokens, {c['files']} files written, {stats.elapsed:.1f}s -> "
            f"{stats.output}"
        ]
        if x.get("model_bytes"):
            b = x["model_bytes"]
            out.append(
                f"rayembed search: per actor on {b['device']}: embedder {b['embedder'] / 2**20:.1f} MB + reranker "
                f"{b['reranker'] / 2**20:.1f} MB of weights"
            )
        if x.get("metrics"):
            m = x["metrics"]
            for stage, label in (("retrieval", "retrieval"), ("rerank", "reranked ")):
                values = "  ".join(f"{name} {m[stage][name]:.4f}" for name in m["names"])
                out.append(f"rayembed search: {label} {values} ({m['queries_evaluated']} queries)")
            out.append("rayembed search: " + m["qrels_line"])
        return out
