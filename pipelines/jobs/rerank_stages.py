"""The rerank job's compute and write steps: tokenize pairs (CPU tasks), score them (Reranker actor pool), rank and
write parts (CPU tasks). Blocks travel packed (pipelines/jobs/rerank_read.py), one reader block per row.

A pair that makes the tokenizer or the model raise is bisected out (operators/bisect.py) and quarantined as
TokenizerError / ModelError; the query's other candidates are scored and ranked as in a clean run.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import storage
from operators.bisect import bisect_call, describe
from operators.tokenization import Encoded, PairEncoder, ids_from_arrow, ids_to_arrow
from pipelines import parts, telemetry
from pipelines.jobs.rerank_read import loose_array, pack, unpack

log = logging.getLogger("rayembed")
QWEN_ANSWER_IDS = (2152, 9693)  # "no", "yes" in the Qwen vocabulary: what the actor's two-row head reads

_ENCODERS: dict[tuple, PairEncoder] = {}


def _encoder(model: str, revision: str | None, instruction: str | None, max_length: int, so: Any) -> PairEncoder:
    key = (model, revision, instruction, max_length)
    if key not in _ENCODERS:  # one tokenizer per worker process: Ray reuses workers across tasks
        # One thread per task: Ray runs one tokenize task per booked CPU; the Rust tokenizer's own thread pool
        # (one thread per core by default) would oversubscribe the machine.
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
        enc = PairEncoder.from_model(
            model, instruction=instruction, max_length=max_length, revision=revision, storage_options=so
        )
        if tuple(enc.answer_ids) != QWEN_ANSWER_IDS:
            raise ValueError(f"model {model!r}: the tokenizer's (no, yes) ids are {enc.answer_ids}, not the Qwen ids")
        _ENCODERS[key] = enc
    return _ENCODERS[key]


def _nested(lists: list[list[Any]], value_type: pa.DataType) -> pa.Array:
    return pa.array(lists, pa.list_(value_type))


def _encode_pairs(enc: PairEncoder, queries: list[str], docs: list[str]) -> Encoded:
    def merge(a: Encoded, b: Encoded) -> Encoded:
        return Encoded(a.ids + b.ids, np.concatenate([a.truncated, b.truncated]), a.errors + b.errors)

    def fail_one(batch: tuple[list[str], list[str]], e: Exception) -> Encoded:
        return Encoded([np.zeros(0, dtype=np.int32)], np.zeros(1, dtype=bool), [describe(e, "tokenizer")])

    return bisect_call(
        lambda b: enc.encode(*b),
        (queries, docs),
        size=lambda b: len(b[0]),
        split=lambda b, i: ((b[0][:i], b[1][:i]), (b[0][i:], b[1][i:])),
        merge=merge,
        fail_one=fail_one,
    )


def tokenize_pairs(
    batch: pa.Table,
    *,
    model: str,
    revision: str | None,
    instruction: str | None,
    max_length: int,
    storage_options: dict[str, Any] | None = None,
) -> pa.Table:
    """``map_batches`` entry: the token ids of every (query, candidate) pair of each packed block."""
    enc = _encoder(model, revision, instruction, max_length, storage_options)
    return pa.concat_tables([pack(_tokenize_block(enc, t)) for t in unpack(batch)])


def _tokenize_block(enc: PairEncoder, table: pa.Table) -> pa.Table:
    queries, docs = table["query"].to_pylist(), table["docs"].to_pylist()
    counts = [len(d) for d in docs]
    flat_q = [q for q, d in zip(queries, docs) for _ in d]
    flat_d = [x for d in docs for x in d]
    out = _encode_pairs(enc, flat_q, flat_d) if flat_q else Encoded([], np.zeros(0, dtype=bool), [])
    kinds = [None if e is None else "TokenizerError" if e.startswith("tokenizer failed") else "InvalidText"
             for e in out.errors]
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])

    def per_row(values: list[Any]) -> list[list[Any]]:
        return [values[offsets[i] : offsets[i + 1]] for i in range(len(counts))]

    lengths = np.fromiter((len(x) for x in out.ids), dtype=np.int64, count=len(out.ids))
    row_of = np.repeat(np.arange(len(counts)), counts)
    ids = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), ids_to_arrow(out.ids))
    return (
        table.drop_columns(["query", "docs"])
        .append_column("pair_ids", ids)
        .append_column("pair_error_types", _nested(per_row(kinds), pa.string()))
        .append_column("pair_errors", _nested(per_row(out.errors), pa.string()))
        .append_column("_tokens", pa.array(np.bincount(row_of, lengths, len(counts)).astype(np.int64)))
        .append_column("_truncated", pa.array(np.bincount(row_of, out.truncated, len(counts)).astype(np.int64)))
    )


def score_bisecting(model_call, ids: list[np.ndarray]) -> tuple[np.ndarray, list[str | None]]:
    """Scores of token-id rows; a row the model fails on is bisected out: NaN score and its error message."""

    def fail_one(rows: list[np.ndarray], e: Exception) -> tuple[np.ndarray, list[str | None]]:
        log.warning("quarantining a pair the model fails on: %s: %s", type(e).__name__, str(e)[:200])
        return np.full(1, np.nan, dtype=np.float32), [describe(e, "model")]

    return bisect_call(
        lambda rows: (model_call(rows), [None] * len(rows)),
        ids,
        size=len,
        split=lambda rows, i: (rows[:i], rows[i:]),
        merge=lambda a, b: (np.concatenate([a[0], b[0]]), a[1] + b[1]),
        fail_one=fail_one,
    )


class RerankStage:
    """The model actor: scores every tokenized (query, candidate) pair of a packed block, one list per query row."""

    def __init__(self, **reranker_kwargs: Any):
        from operators.reranker import Reranker

        self.reranker = Reranker(**reranker_kwargs, tokenizer=False, answer_ids=QWEN_ANSWER_IDS)
        r = self.reranker
        log.info("rerank actor ready: %s on %s/%s, %.1f MB of weights", r.spec.source, r.device, r.dtype,
                 r.model_bytes / 2**20)

    def model_call(self, ids: list[np.ndarray]) -> np.ndarray:
        return self.reranker.score_ids(ids)

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0, st = time.perf_counter(), self.reranker.stats
        before = (st.rows, st.tokens, st.padded_tokens)
        out = pa.concat_tables([pack(self._score_block(t)) for t in unpack(batch)])
        rows, tokens, slots = st.rows - before[0], st.tokens - before[1], st.padded_tokens - before[2]
        telemetry.model_call(time.perf_counter() - t0, rows=rows, tokens=tokens, slots=slots, stage="score")
        return out

    def _score_block(self, table: pa.Table) -> pa.Table:
        column = table["pair_ids"].combine_chunks()
        flat = ids_from_arrow(column.flatten())
        kinds = [k for row in table["pair_error_types"].to_pylist() for k in row]
        errors = [e for row in table["pair_errors"].to_pylist() for e in row]
        todo = [i for i, k in enumerate(kinds) if k is None]
        scores = np.full(len(flat), np.nan, dtype=np.float32)
        if todo:
            got, failed = score_bisecting(self.model_call, [flat[i] for i in todo])
            scores[todo] = got
            for i, err in zip(todo, failed):
                if err is not None:
                    kinds[i], errors[i] = "ModelError", err
        offsets = column.offsets
        out = table.drop_columns(["pair_ids", "pair_error_types", "pair_errors"])
        return (
            out.append_column("scores", pa.ListArray.from_arrays(offsets, pa.array(scores, pa.float32())))
            .append_column("pair_error_types", pa.ListArray.from_arrays(offsets, pa.array(kinds, pa.string())))
            .append_column("pair_errors", pa.ListArray.from_arrays(offsets, pa.array(errors, pa.string())))
        )


# ----------------------------------------------------------------------------------------------------------- write


def rank_order(scores: list[float], doc_ids: list[Any]) -> list[int]:
    """Candidate indices best first: score descending, then doc id ascending, then input order."""
    return sorted(range(len(scores)), key=lambda j: (-scores[j], doc_ids[j], j))


def write_ranked(
    batch: pa.Table, *, output: str, metadata: dict[str, str], storage_options: dict[str, Any] | None = None
) -> pa.Table:
    """``map_batches`` entry: write every packed block of the batch; one small record per part for the driver."""
    records = [rec for t in unpack(batch) for rec in write_block(t, output, metadata, storage_options)]
    telemetry.record(telemetry.ROWS_QUARANTINED, sum(r["errors"] for r in records), stage="write")
    return parts.records_table(records)


def _rank_rows(sub: pa.Table, stem: str) -> tuple[dict[str, list[Any]], list[dict[str, Any]], list[str]]:
    """Output columns, quarantine records, and the ids of the queries ranked here."""
    out: dict[str, list[Any]] = {"query_id": [], "doc_id": [], "score": [], "rank": []}
    errors: list[dict[str, Any]] = []
    ranked: list[str] = []
    cols = ("query_id", "doc_ids", "scores", "empty_row", "bad", "pair_error_types", "pair_errors", "_offset")
    for qid, dids, scores, empty, bad, kinds, msgs, offset in zip(*(sub[c].to_pylist() for c in cols)):
        good = [j for j in range(len(dids)) if kinds[j] is None]
        for j in set(range(len(dids))) - set(good):
            doc = None if dids[j] is None else str(dids[j])
            errors.append({"id": str(qid), "doc_id": doc, "shard": stem, "row_offset": offset,
                           "error_type": kinds[j], "message": msgs[j]})
        if good:
            order = rank_order([scores[j] for j in good], [dids[j] for j in good])
            for rank, k in enumerate(order, start=1):
                out["query_id"].append(qid)
                out["doc_id"].append(dids[good[k]])
                out["score"].append(scores[good[k]])
                out["rank"].append(rank)
        elif empty:
            for key, value in (("query_id", qid), ("doc_id", None), ("score", None), ("rank", None)):
                out[key].append(value)
        if qid is not None and (good or empty):
            ranked.append(str(qid))
        for b in bad:
            errors.append({"id": None if qid is None else str(qid), "shard": stem, **b})
    return out, errors, ranked


def write_block(
    table: pa.Table, output: str, metadata: dict[str, str], storage_options: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Rank each query's candidates and write one part per shard of this block (plus its quarantine part)."""
    records = []
    for stem in pc.unique(table["_shard"]).to_pylist():
        sub = table.filter(pc.equal(table["_shard"], stem)).sort_by("_offset")
        first = int(sub["_offset"][0].as_py())
        out, errors, ranked = _rank_rows(sub, stem)
        rec = parts.record(
            stem,
            first,
            rows=len(out["query_id"]),
            errors=len(errors),
            tokens=int(pc.sum(sub["_tokens"]).as_py() or 0),
            truncated=int(pc.sum(sub["_truncated"]).as_py() or 0),
            shard_rows=int(pc.max(sub["_shard_rows"]).as_py()),
            pairs=sum(len(d) for d in sub["doc_ids"].to_pylist()),
            queries=len(ranked),
        )
        if out["query_id"]:
            id_type = sub.schema.field("doc_ids").type.value_type
            if pa.types.is_null(id_type):
                id_type = pa.string()  # only queries without candidates in this part
            data = pa.table(
                {
                    "query_id": loose_array(out["query_id"], sub.schema.field("query_id").type),
                    "doc_id": loose_array(out["doc_id"], id_type),
                    "score": pa.array(out["score"], pa.float32()),
                    "rank": pa.array(out["rank"], pa.int32()),
                }
            )
            rel = f"data/{parts.part_name(stem, first)}"
            parts.write_parquet(parts.with_metadata(data, metadata), storage.join(output, rel), storage_options)
            rec["file"] = rel
        if errors:
            rel = f"_errors/{parts.part_name(stem, first)}"
            parts.write_parquet(parts.error_table(errors), storage.join(output, rel), storage_options)
            rec["errors_file"] = rel
        records.append(rec)
    return records
