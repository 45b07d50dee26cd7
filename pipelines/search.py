"""Retrieve, then rerank: ``python -m pipelines.search`` and ``rayembed search``.

plan -> read the queries (driver) -> embed them (search actors) -> exact top-k over the corpus vectors that an embed
job wrote (Ray tasks, one group of vector files each, merged on the driver) -> fetch the candidates' texts from the
corpus (Ray tasks) -> rerank (the same actors) -> write ranked parts + markers -> metrics.json (with --qrels) ->
manifest last.

- One actor, both models: each search actor holds an ``Embedder`` and a ``Reranker`` on one device, and serves the
  query embedding and the reranking; its start logs both models' bytes.
- Exact retrieval: inner product (cosine for the unit vectors the embed job writes) over every vector file the embed
  job's ``_manifest.json`` lists. Ties are broken by id ascending (``operators.topk``). ``--k`` above the corpus size
  is clamped to it, with a warning.
- The reranked document is ``(title + " " + text).strip()``, as BEIR's rerankers build it from corpus.jsonl.
- The output has one row per (query, retrieved doc): ``query_id, doc_id, retrieval_score, retrieval_rank,
  rerank_score, rank`` (rank 1 = best after reranking; ties by doc id). A retrieved doc whose text is missing from
  ``--corpus`` (or null) keeps its retrieval columns, has null rerank_score and rank, and is quarantined.
- Metrics (``operators.metrics``) are computed from the committed output files, so a rerun that skips every query
  shard still writes them.

Sized for evaluation: the driver holds the queries, their vectors, the top-k lists and the candidates' texts
(queries x k); the corpus itself is only streamed by tasks.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators import DEFAULT_INSTRUCTION, __version__, storage
from operators.errors import ConfigError, RayembedError
from operators.loading import inspect_model_dir, resolve_model_dir
from operators.metrics import DEFAULT_METRICS, evaluate, metric_name, parse_qrels, qrels_coverage
from operators.storage import Shard
from operators.tokenization import text_error
from operators.topk import DEFAULT_CHUNK_ROWS, TopK, merge_topk, topk_block
from pipelines import commit
from pipelines.config import SearchJobConfig
from pipelines.embed import _init_ray, _num_gpus
from pipelines.rerank import check_rerank_model, error_table, write_parquet
from pipelines.stages import part_name

log = logging.getLogger("rayembed")

OUTPUT_COLUMNS = ("query_id", "doc_id", "retrieval_score", "retrieval_rank", "rerank_score", "rank")


def warn(message: str) -> None:
    print(f"rayembed search: warning: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------ records


def iter_records(
    shard: Shard, columns: list[str], storage_options: dict[str, Any] | None, batch_rows: int = 4096
) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(row offset, row, error) for every row of a Parquet / JSONL shard; absent columns read as null."""
    with storage.open_input(shard, storage_options) as f:
        if shard.fmt == "parquet":
            pf = pq.ParquetFile(f)
            present = [c for c in columns if c in pf.schema_arrow.names]
            offset = 0
            for batch in pf.iter_batches(batch_size=batch_rows, columns=present):
                for row in batch.to_pylist():
                    yield offset, row, None
                    offset += 1
            return
        for offset, raw in enumerate(f):
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield offset, None, "line is not valid UTF-8"
                continue
            except json.JSONDecodeError as e:
                if not raw.strip():
                    continue  # blank lines (a trailing newline) carry nothing
                yield offset, None, f"malformed JSON: {e.msg} at column {e.colno}"
                continue
            if not isinstance(obj, dict):
                yield offset, None, f"line is a JSON {type(obj).__name__}, not an object"
                continue
            yield offset, obj, None


@dataclass
class Query:
    shard: str
    offset: int
    query_id: Any
    text: str | None
    error_type: str | None = None
    error: str | None = None


def read_queries(shards: list[Shard], cfg: SearchJobConfig) -> list[Query]:
    """Every query row of the shards; bad rows (null id or text, duplicate id, malformed line) carry their error."""
    out: list[Query] = []
    first: dict[str, tuple[str, int]] = {}
    for shard in shards:
        try:
            rows = list(iter_records(shard, [cfg.query_id_column, cfg.query_text_column], cfg.storage_options))
        except Exception as e:
            raise RayembedError(f"cannot read --queries shard {shard.url}: {storage.describe_error(e)}") from None
        for offset, row, err in rows:
            if err is not None:
                out.append(Query(shard.stem, offset, None, None, "MalformedJSON", err))
                continue
            qid, text = row.get(cfg.query_id_column), row.get(cfg.query_text_column)
            q = Query(shard.stem, offset, qid, text)
            if qid is None or isinstance(qid, (dict, list, float, bool)):
                q.error_type, q.error = (
                    "InvalidId",
                    f"{cfg.query_id_column} is {'null' if qid is None else 'not a string or integer'}",
                )
            elif (e := text_error(text)) is not None:
                q.error_type, q.error = "InvalidText", e.replace("text", "query text", 1)
            elif str(qid) in first:
                where = first[str(qid)]
                q.error_type, q.error = (
                    "DuplicateId",
                    f"duplicate query id {qid!r} (first at row {where[1]} of {where[0]})",
                )
            else:
                first[str(qid)] = (shard.stem, offset)
            out.append(q)
    return out


def doc_text(row: dict[str, Any], title_column: str, text_column: str) -> tuple[str | None, str | None]:
    """BEIR's reranker input: ``(title + " " + text).strip()``; (text, None) or (None, why not)."""
    title, text = row.get(title_column), row.get(text_column)
    if text is None:
        return None, "doc text is null"
    if not isinstance(text, str):
        return None, f"doc text is a {type(text).__name__}, not a string"
    if title is not None and not isinstance(title, str):
        return None, f"doc title is a {type(title).__name__}, not a string"
    return ((title or "") + " " + text).strip(), None


# -------------------------------------------------------------------------------------------------- Ray workers


def scan_vectors(
    files: list[str],
    queries: np.ndarray | None,
    k: int,
    wanted: frozenset[str],
    storage_options: dict[str, Any] | None,
) -> tuple[TopK | None, set[str], int]:
    """A retrieval task: exact top-k of ``queries`` over a group of vector files, which of the ``wanted`` ids
    (qrels doc ids) these files hold, and their row count. Files are scored in chunks of several files."""
    result: TopK | None = None
    present: set[str] = set()
    rows = 0
    buf_vectors: list[np.ndarray] = []
    buf_ids: list[np.ndarray] = []
    chunk = DEFAULT_CHUNK_ROWS

    def score() -> None:
        nonlocal result, buf_vectors, buf_ids
        if buf_vectors:
            part = topk_block(queries, np.concatenate(buf_vectors), np.concatenate(buf_ids), k)
            result = part if result is None else merge_topk([result, part], k)
            buf_vectors, buf_ids = [], []

    for url in files:
        table = pq.read_table(io.BytesIO(storage.read_bytes(url, storage_options)), columns=["id", "embedding"])
        ids = table["id"].to_numpy(zero_copy_only=False)
        rows += len(ids)
        if wanted:
            present.update(s for s in map(str, ids.tolist()) if s in wanted)
        if queries is None or not len(ids):
            continue
        emb = table["embedding"].combine_chunks()
        dim = emb.type.list_size
        if dim != queries.shape[1]:
            raise ConfigError(f"vector file {url} has dim {dim}, the query vectors {queries.shape[1]}")
        buf_vectors.append(emb.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False))
        buf_ids.append(ids)
        if sum(len(x) for x in buf_ids) >= chunk:
            score()
    score()
    return result, present, rows


def load_texts(
    shard: dict[str, Any],
    needed: frozenset[str],
    columns: tuple[str, str, str],
    storage_options: dict[str, Any] | None,
) -> tuple[dict[str, str], dict[str, str]]:
    """A corpus task: the reranker texts of the ``needed`` doc ids found in one corpus shard, and why others failed."""
    id_col, title_col, text_col = columns
    texts: dict[str, str] = {}
    bad: dict[str, str] = {}
    for _offset, row, err in iter_records(Shard(**shard), [id_col, title_col, text_col], storage_options):
        if err is not None or row is None:
            continue
        did = row.get(id_col)
        if did is None or str(did) not in needed:
            continue
        text, why = doc_text(row, title_col, text_col)
        if text is None:
            bad[str(did)] = why or "invalid doc"
        else:
            texts[str(did)] = text
    return texts, bad


class SearchActor:
    """One actor, both models: the query embedder and the reranker on one device."""

    def __init__(self, embed_kwargs: dict[str, Any], rerank_kwargs: dict[str, Any]):
        from operators.embedder import Embedder
        from operators.reranker import Reranker

        self.embedder = Embedder(**embed_kwargs)
        self.reranker = Reranker(**rerank_kwargs, device=str(self.embedder.device))
        b = self.model_bytes()
        log.info(
            "search actor ready on %s: embedder %s %.1f MB + reranker %s %.1f MB = %.1f MB of weights",
            self.embedder.device,
            self.embedder.spec.source,
            b["embedder"] / 2**20,
            self.reranker.spec.source,
            b["reranker"] / 2**20,
            (b["embedder"] + b["reranker"]) / 2**20,
        )

    def model_bytes(self) -> dict[str, Any]:
        return {
            "embedder": int(self.embedder.model_bytes),
            "reranker": int(self.reranker.model_bytes),
            "device": str(self.embedder.device),
        }

    def embed(self, index: int, texts: list[str]) -> tuple[int, np.ndarray, int]:
        enc = self.embedder.encoder.encode(texts)
        enc.raise_first_error()
        return index, self.embedder.embed_ids(enc.ids), int(enc.truncated.sum())

    def rerank(self, index: int, queries: list[str], docs: list[str]) -> tuple[int, np.ndarray, int, int]:
        enc = self.reranker.encode(queries, docs)
        enc.raise_first_error()
        scores = self.reranker.score_ids(enc.ids)
        return index, scores, int(enc.lengths.sum()), int(enc.truncated.sum())


# -------------------------------------------------------------------------------------------------------- driver


@dataclass
class SearchSummary:
    queries: int = 0
    embedded: int = 0
    quarantined: int = 0
    shards: int = 0
    skipped: int = 0
    corpus: int = 0
    vector_files: int = 0
    k: int = 0
    pairs: int = 0
    tokens: int = 0
    files: int = 0
    elapsed: float = 0.0
    output: str = ""
    model_bytes: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None

    def lines(self) -> list[str]:
        out = [
            f"rayembed search: {self.queries} queries ({self.embedded} searched, {self.quarantined} rows quarantined, "
            f"{self.skipped} of {self.shards} query shards already committed), corpus {self.corpus} docs in "
            f"{self.vector_files} vector files, k={self.k}, {self.pairs} pairs reranked, {self.tokens} tokens, "
            f"{self.files} files written, {self.elapsed:.1f}s -> {self.output}"
        ]
        if self.model_bytes:
            b = self.model_bytes
            out.append(
                f"rayembed search: per actor on {b['device']}: embedder {b['embedder'] / 2**20:.1f} MB + reranker "
                f"{b['reranker'] / 2**20:.1f} MB of weights"
            )
        if self.metrics:
            m = self.metrics
            for stage, label in (("retrieval", "retrieval"), ("rerank", "reranked ")):
                values = "  ".join(f"{name} {m[stage][name]:.4f}" for name in m["names"])
                out.append(f"rayembed search: {label} {values} ({m['queries_evaluated']} queries)")
            out.append("rayembed search: " + m["qrels_line"])
        return out


def _embed_model_info(cfg: SearchJobConfig, vcfg: dict[str, Any], vmodel: dict[str, Any]) -> dict[str, Any]:
    model = cfg.embed_model or vcfg.get("model")
    revision = cfg.revision if cfg.embed_model else vcfg.get("revision")
    if not model:
        raise ConfigError("--vectors manifest names no model; pass --embed-model")
    if cfg.embed_model and cfg.embed_model != vcfg.get("model"):
        warn(f"--embed-model {cfg.embed_model!r} differs from the model of the corpus vectors {vcfg.get('model')!r}")
    path = resolve_model_dir(model, revision=revision, storage_options=cfg.storage_options, metadata_only=True)
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
        manifest = storage.read_json(url, cfg.storage_options)
    except RayembedError:
        raise
    except Exception as e:
        raise RayembedError(f"cannot read {url}: {storage.describe_error(e)}") from None
    if manifest is None:
        raise ConfigError(
            f"--vectors {cfg.vectors!r} has no _manifest.json; "
            "give the output prefix of a finished `rayembed embed` job"
        )
    if manifest.get("format") != commit.MANIFEST_FORMAT:
        raise ConfigError(f"{url} is not a rayembed embed manifest (format {manifest.get('format')!r})")
    if manifest.get("model", {}).get("kind") == "rerank" or "dim" not in manifest.get("model", {}):
        raise ConfigError(f"{url} is not the manifest of an embed job (no vector dim)")
    return manifest


def _read_qrels(cfg: SearchJobConfig) -> dict[str, dict[str, int]] | None:
    if not cfg.qrels:
        return None
    try:
        raw = storage.read_bytes(cfg.qrels, cfg.storage_options)
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


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _scan(
    cfg: SearchJobConfig, files: list[str], queries: np.ndarray | None, k: int, wanted: frozenset[str]
) -> tuple[TopK | None, set[str], int]:
    import ray

    task = ray.remote(scan_vectors).options(num_cpus=1, max_retries=3)
    qref = ray.put(queries)
    wref = ray.put(wanted)
    n = cfg.retrieval_tasks or 2 * _cluster_cpus()
    pending = [task.remote(g, qref, k, wref, cfg.storage_options) for g in _groups(files, n)]
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

    shards = storage.list_shards(cfg.corpus, cfg.storage_options)
    task = ray.remote(load_texts).options(num_cpus=1, max_retries=3)
    ref = ray.put(frozenset(needed))
    cols = (cfg.corpus_id_column, cfg.corpus_title_column, cfg.corpus_text_column)
    refs = [
        task.remote(
            {
                "url": s.url,
                "stem": s.stem,
                "fmt": s.fmt,
                "compression": s.compression,
                "size": s.size,
                "version": s.version,
            },
            ref,
            cols,
            cfg.storage_options,
        )
        for s in shards
    ]
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


def _rank(scores: list[float], ids: list[Any]) -> list[int]:
    return sorted(range(len(scores)), key=lambda j: (-scores[j], ids[j]))


def run_search(cfg: SearchJobConfig) -> SearchSummary:
    t0 = time.time()
    so = cfg.storage_options
    summary = SearchSummary(output=cfg.output)
    manifest = _read_vectors_manifest(cfg)
    vcfg, vmodel = manifest.get("config", {}), manifest.get("model", {})
    files = [storage.join(cfg.vectors, f) for f in manifest["files"]]
    n_corpus = int(manifest.get("totals", {}).get("rows", 0))
    if not files or n_corpus == 0:
        raise ConfigError(f"--vectors {cfg.vectors!r} holds no vectors (its manifest lists no rows)")
    if vcfg.get("instruction"):
        warn("the corpus vectors were embedded with an instruction (query mode); documents usually take none")
    for name, items in (("--queries", cfg.queries), ("--corpus", cfg.corpus), ("--vectors", (cfg.vectors,))):
        for item in items:
            root = item.split("*")[0].split("?")[0].split("[")[0]
            if storage.is_within(cfg.output, root):
                raise ConfigError(
                    f"--output {cfg.output!r} is inside {name} {item!r}; write outputs to another prefix"
                )
    embed_model = _embed_model_info(cfg, vcfg, vmodel)
    rerank_model = check_rerank_model(cfg.rerank_model, cfg.rerank_revision, so)
    k = cfg.k
    if k > n_corpus:
        warn(f"--k {cfg.k} is larger than the corpus ({n_corpus} documents); using k={n_corpus}")
        k = n_corpus
    qshards = storage.list_shards(cfg.queries, so)
    cshards = storage.list_shards(cfg.corpus, so)
    qrels = _read_qrels(cfg)
    key = _search_key(cfg, embed_model, rerank_model, manifest, k, cshards)
    markers = commit.load_markers(cfg.output, so)
    for s in qshards:
        m = markers.get(s.stem)
        if m is not None and m.get("output_key") != key:
            raise ConfigError(
                f"output prefix {cfg.output!r} already holds query shard {s.stem!r} searched with different settings "
                "(models, k, instructions, vectors or corpus); write to a new --output"
            )
    pending = [s for s in qshards if not (s.stem in markers and markers[s.stem].get("fingerprint") == s.fingerprint)]
    queries = read_queries(qshards, cfg)
    summary.queries, summary.shards, summary.skipped = len(queries), len(qshards), len(qshards) - len(pending)
    summary.corpus, summary.vector_files, summary.k = n_corpus, len(files), k
    wanted = frozenset(d for j in (qrels or {}).values() for d in j)
    present: set[str] = set()

    if pending:
        _init_ray(cfg.address)
        present = _search(cfg, pending, queries, files, k, wanted, embed_model, rerank_model, key, markers, summary)
    elif qrels:
        _init_ray(cfg.address)
        _, present, _ = _scan(cfg, files, None, k, wanted)

    current = [markers[s.stem] for s in qshards]
    total_rows = sum(m["rows"] + m["errors"] for m in current)
    total_errors = sum(m["errors"] for m in current)
    summary.quarantined = total_errors
    if total_rows and total_errors / total_rows > cfg.max_error_ratio:
        raise RayembedError(
            f"{total_errors} of {total_rows} rows ({total_errors / total_rows:.2%}) were quarantined, above "
            f"--max-error-ratio {cfg.max_error_ratio:.2%}; no manifest written; "
            f"see {storage.join(cfg.output, '_errors')}"
        )
    if qrels is not None:
        summary.metrics = _metrics(cfg, current, queries, qrels, present, k)
        storage.write_json(storage.join(cfg.output, "metrics.json"), summary.metrics, so)
    public = cfg.public()
    public.update(
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
    if summary.model_bytes:
        model["bytes_per_actor"] = summary.model_bytes
    commit.write_manifest(cfg.output, current, public, model, so)
    summary.elapsed = time.time() - t0
    return summary


def _search(
    cfg: SearchJobConfig,
    pending: list[Shard],
    queries: list[Query],
    files: list[str],
    k: int,
    wanted: frozenset[str],
    embed_model: dict[str, Any],
    rerank_model: dict[str, Any],
    key: str,
    markers: dict[str, dict[str, Any]],
    summary: SearchSummary,
) -> set[str]:
    import ray
    from ray.util import ActorPool

    so = cfg.storage_options
    stems = {s.stem for s in pending}
    todo = [q for q in queries if q.shard in stems]
    valid = [q for q in todo if q.error is None]
    summary.embedded = len(valid)

    actor_cls = ray.remote(SearchActor).options(
        num_gpus=_num_gpus(cfg), num_cpus=cfg.num_cpus, max_restarts=2, max_task_retries=2
    )
    embed_kwargs = {
        "model": embed_model["source"],
        "revision": embed_model["revision"],
        "dim": embed_model["dim"],
        "instruction": embed_model["instruction"],
        "max_length": embed_model["max_length"],
        "batch_tokens": cfg.batch_tokens,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "trust_remote_code": cfg.trust_remote_code,
        "storage_options": so,
    }
    rerank_kwargs = {
        "model": cfg.rerank_model,
        "revision": cfg.rerank_revision,
        "instruction": cfg.rerank_instruction,
        "max_length": cfg.rerank_max_length,
        "batch_tokens": cfg.batch_tokens,
        "dtype": cfg.dtype,
        "trust_remote_code": cfg.trust_remote_code,
        "storage_options": so,
    }
    actors = [actor_cls.remote(embed_kwargs, rerank_kwargs) for _ in range(cfg.concurrency)]
    try:
        summary.model_bytes = ray.get(actors[0].model_bytes.remote())
        pool = ActorPool(actors)

        # 1. embed the queries
        qpb = cfg.queries_per_block
        blocks = [valid[i : i + qpb] for i in range(0, len(valid), qpb)]
        qvecs = np.zeros((len(valid), embed_model["dim"]), dtype=np.float32)
        for index, vecs, _trunc in pool.map_unordered(
            lambda a, b: a.embed.remote(b[0], [q.text for q in b[1]]), list(enumerate(blocks))
        ):
            qvecs[index * qpb : index * qpb + len(vecs)] = vecs

        # 2. exact top-k over the corpus vectors
        top, present, _rows = _scan(cfg, files, qvecs if len(valid) else None, k, wanted)
        if top is None:
            top = TopK.empty(len(valid))
        cand_ids = top.ids.tolist()
        cand_scores = top.scores.tolist()

        # 3. the candidates' texts
        needed = {str(d) for row in cand_ids for d in row}
        texts, bad_texts = _texts(cfg, needed) if needed else ({}, {})

        # 4. rerank, block by block of query rows (valid or not, so each part carries its own quarantine records)
        row_of = {id(q): i for i, q in enumerate(valid)}
        by_shard: dict[str, list[Query]] = {}
        for q in todo:
            by_shard.setdefault(q.shard, []).append(q)
        parts: list[tuple[str, list[Query]]] = []
        for stem in sorted(by_shard):
            rows = sorted(by_shard[stem], key=lambda q: q.offset)
            parts.extend((stem, rows[i : i + qpb]) for i in range(0, len(rows), qpb))

        def payload(index: int) -> tuple[int, list[str], list[str]]:
            qs, ds = [], []
            for q in parts[index][1]:
                if q.error is None:
                    for d in cand_ids[row_of[id(q)]]:
                        if str(d) in texts:
                            qs.append(q.text)
                            ds.append(texts[str(d)])
            return index, qs, ds

        records: dict[str, list[dict[str, Any]]] = {s.stem: [] for s in pending}
        remaining = {stem: sum(1 for s, _ in parts if s == stem) for stem in records}
        progress = {s.stem: s for s in pending}
        for index, scores, tokens, truncated in pool.map_unordered(
            lambda a, i: a.rerank.remote(*payload(i)), list(range(len(parts)))
        ):
            stem, rows = parts[index]
            rec = _write_part(cfg, stem, rows, row_of, cand_ids, cand_scores, texts, bad_texts, scores)
            rec.update(tokens=tokens, truncated=truncated)
            summary.pairs += len(scores)
            summary.tokens += tokens
            summary.files += int(rec["file"] is not None)
            records[stem].append(rec)
            remaining[stem] -= 1
            if remaining[stem] == 0:
                p = commit.ShardProgress(progress[stem], parts=records[stem], total=None)
                markers[stem] = commit.commit_shard(cfg.output, p, key, so)
        for stem, recs in records.items():  # query shards with no rows at all
            if stem not in markers or markers[stem].get("fingerprint") != progress[stem].fingerprint:
                markers[stem] = commit.commit_shard(
                    cfg.output, commit.ShardProgress(progress[stem], parts=recs), key, so
                )
    finally:
        for a in actors:  # also on failure: a shared cluster gets its CPUs/GPUs back
            ray.kill(a)
    return present


def _write_part(
    cfg: SearchJobConfig,
    stem: str,
    rows: list[Query],
    row_of: dict[int, int],
    cand_ids: list[list[Any]],
    cand_scores: list[list[float]],
    texts: dict[str, str],
    bad_texts: dict[str, str],
    scores: np.ndarray,
) -> dict[str, Any]:
    first = rows[0].offset
    out: dict[str, list[Any]] = {c: [] for c in OUTPUT_COLUMNS}
    errors: list[dict[str, Any]] = []
    pos = 0
    for q in rows:
        if q.error is not None:
            errors.append(
                {
                    "id": None if q.query_id is None else str(q.query_id),
                    "doc_id": None,
                    "shard": stem,
                    "row_offset": q.offset,
                    "error_type": q.error_type,
                    "message": q.error,
                }
            )
            continue
        ids, rscores = cand_ids[row_of[id(q)]], cand_scores[row_of[id(q)]]
        have = [j for j, d in enumerate(ids) if str(d) in texts]
        rr = {j: float(s) for j, s in zip(have, scores[pos : pos + len(have)])}
        pos += len(have)
        order = _rank([rr[j] for j in have], [ids[j] for j in have])
        rank = {have[o]: r for r, o in enumerate(order, start=1)}
        for j in sorted(range(len(ids)), key=lambda j: (rank.get(j, len(ids) + 1), j)):
            out["query_id"].append(q.query_id)
            out["doc_id"].append(ids[j])
            out["retrieval_score"].append(rscores[j])
            out["retrieval_rank"].append(j + 1)
            out["rerank_score"].append(rr.get(j))
            out["rank"].append(rank.get(j))
            if j not in rr:
                why = bad_texts.get(str(ids[j]), "doc id not found in --corpus")
                errors.append(
                    {
                        "id": str(q.query_id),
                        "doc_id": str(ids[j]),
                        "shard": stem,
                        "row_offset": q.offset,
                        "error_type": "MissingDocText",
                        "message": f"retrieved doc {ids[j]!r}: {why}; not reranked",
                    }
                )
    rec = {
        "shard": stem,
        "part": first,
        "file": None,
        "rows": len(out["query_id"]),
        "errors": len(errors),
        "errors_file": None,
        "tokens": 0,
        "truncated": 0,
        "shard_rows": -1,
    }
    if out["query_id"]:
        table = pa.table(
            {
                "query_id": pa.array(out["query_id"]),
                "doc_id": pa.array(out["doc_id"]),
                "retrieval_score": pa.array(out["retrieval_score"], pa.float32()),
                "retrieval_rank": pa.array(out["retrieval_rank"], pa.int32()),
                "rerank_score": pa.array(out["rerank_score"], pa.float32()),
                "rank": pa.array(out["rank"], pa.int32()),
            }
        )
        meta = {b"rayembed.kind": b"search", b"rayembed.version": __version__.encode()}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
        rel = f"data/{part_name(stem, first)}"
        write_parquet(table, storage.join(cfg.output, rel), cfg.storage_options)
        rec["file"] = rel
    if errors:
        rel = f"_errors/{part_name(stem, first)}"
        write_parquet(error_table(errors), storage.join(cfg.output, rel), cfg.storage_options)
        rec["errors_file"] = rel
    return rec


def _metrics(
    cfg: SearchJobConfig,
    markers: list[dict[str, Any]],
    queries: list[Query],
    qrels: dict[str, dict[str, int]],
    present: set[str],
    k: int,
) -> dict[str, Any]:
    """Metrics from the committed output files: retrieval order (retrieval_rank) and reranked order (rank)."""
    retrieval: dict[str, list[tuple[int, str]]] = {}
    reranked: dict[str, list[tuple[int, str]]] = {}
    for m in markers:
        for f in m["files"]:
            t = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(cfg.output, f), cfg.storage_options)))
            for qid, did, rr, r in zip(
                t["query_id"].to_pylist(),
                t["doc_id"].to_pylist(),
                t["retrieval_rank"].to_pylist(),
                t["rank"].to_pylist(),
            ):
                retrieval.setdefault(str(qid), []).append((rr, str(did)))
                reranked.setdefault(str(qid), [])
                if r is not None:
                    reranked[str(qid)].append((r, str(did)))
    run_r = {q: [d for _, d in sorted(v)] for q, v in retrieval.items()}
    run_x = {q: [d for _, d in sorted(v)] for q, v in reranked.items()}
    # Queries searched with no result rows cannot exist (k >= 1); quarantined queries are not in the run.
    coverage = qrels_coverage(qrels, [str(q.query_id) for q in queries if q.query_id is not None], present)
    m_r, m_x = evaluate(run_r, qrels, DEFAULT_METRICS), evaluate(run_x, qrels, DEFAULT_METRICS)
    names = [metric_name(n, kk) for n, kk in DEFAULT_METRICS]
    return {
        "names": names,
        "k": k,
        "queries_evaluated": m_r.pop("queries"),
        "retrieval": m_r,
        "rerank": {n: v for n, v in m_x.items() if n != "queries"},
        "qrels": {"path": cfg.qrels, **coverage.as_dict()},
        "qrels_line": coverage.line(),
        "definitions": "operators/metrics.py: linear-gain nDCG as trec_eval/pytrec_eval (BEIR), recall and MRR over "
        "relevance > 0; mean over queries with a relevant judgement",
    }


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import main as cli_main

    return cli_main(["search", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
