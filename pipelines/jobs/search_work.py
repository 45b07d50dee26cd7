"""The search job's work: reading queries, the retrieval and corpus tasks, the search actor, writing ranked parts
and the metrics. pipelines/jobs/search.py declares the job and drives these; pipelines/runner.py does the rest.

Sized for evaluation: the driver holds the queries, their vectors, the top-k lists and the candidates' texts
(queries x k); the corpus itself is only streamed by tasks.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators import __version__, rows, storage
from operators.errors import ConfigError, RayembedError
from operators.metrics import DEFAULT_METRICS, evaluate, metric_name, qrels_coverage
from operators.storage import Shard
from operators.tokenization import text_error
from operators.topk import DEFAULT_CHUNK_ROWS, TopK, merge_topk, topk_block
from pipelines import parts
from pipelines.config import SearchJobConfig
from pipelines.jobs.rerank_stages import rank_order, score_bisecting

log = logging.getLogger("rayembed")

OUTPUT_COLUMNS = ("query_id", "doc_id", "retrieval_score", "retrieval_rank", "rerank_score", "rank")


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
            records = list(rows.iter_records(shard, [cfg.query_id_column, cfg.query_text_column], cfg.options))
        except Exception as e:
            raise RayembedError(f"cannot read --queries shard {shard.url}: {storage.describe_error(e)}") from None
        for offset, row, err_type, err in records:
            if row is None:
                if err_type != "EmptyLine":  # blank lines (a trailing newline) carry no query
                    out.append(Query(shard.stem, offset, None, None, err_type, err))
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
    for _offset, row, _type, _err in rows.iter_records(Shard(**shard), [id_col, title_col, text_col], storage_options):
        if row is None:
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

    def model_call(self, ids: list[np.ndarray]) -> np.ndarray:
        return self.reranker.score_ids(ids)

    def rerank(self, index: int, queries: list[str], docs: list[str]) -> tuple[int, np.ndarray, list, int, int]:
        """Scores of the pairs; a pair the model fails on is bisected out: NaN score and its error."""
        enc = self.reranker.encode(queries, docs)
        enc.raise_first_error()
        scores, errors = score_bisecting(self.model_call, enc.ids)
        return index, scores, errors, int(enc.lengths.sum()), int(enc.truncated.sum())


def write_part(
    cfg: SearchJobConfig,
    stem: str,
    rows: list[Query],
    row_of: dict[int, int],
    cand_ids: list[list[Any]],
    cand_scores: list[list[float]],
    texts: dict[str, str],
    bad_texts: dict[str, str],
    scores: np.ndarray,
    pair_errors: list[str | None],
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
        failed = {j: e for j, e in zip(have, pair_errors[pos : pos + len(have)]) if e is not None}
        rr = {j: float(s) for j, s in zip(have, scores[pos : pos + len(have)]) if j not in failed}
        pos += len(have)
        have = [j for j in have if j not in failed]
        order = rank_order([rr[j] for j in have], [ids[j] for j in have])
        rank = {have[o]: r for r, o in enumerate(order, start=1)}
        for j in sorted(range(len(ids)), key=lambda j: (rank.get(j, len(ids) + 1), j)):
            out["query_id"].append(q.query_id)
            out["doc_id"].append(ids[j])
            out["retrieval_score"].append(rscores[j])
            out["retrieval_rank"].append(j + 1)
            out["rerank_score"].append(rr.get(j))
            out["rank"].append(rank.get(j))
            if j not in rr:
                kind, why = ("ModelError", failed[j]) if j in failed else ("MissingDocText", bad_texts.get(
                    str(ids[j]), "doc id not found in --corpus"))
                errors.append(
                    {
                        "id": str(q.query_id),
                        "doc_id": str(ids[j]),
                        "shard": stem,
                        "row_offset": q.offset,
                        "error_type": kind,
                        "message": f"retrieved doc {ids[j]!r}: {why}; not reranked",
                    }
                )
    rec = parts.record(stem, first, rows=len(out["query_id"]), errors=len(errors))
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
        rel = f"data/{parts.part_name(stem, first)}"
        parts.write_parquet(table, storage.join(cfg.output, rel), cfg.options)
        rec["file"] = rel
    if errors:
        rel = f"_errors/{parts.part_name(stem, first)}"
        parts.write_parquet(parts.error_table(errors), storage.join(cfg.output, rel), cfg.options)
        rec["errors_file"] = rel
    return rec


def compute_metrics(
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
            t = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(cfg.output, f), cfg.options)))
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
