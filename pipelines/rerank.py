"""The rerank job: ``python -m pipelines.rerank`` (what ``ray job submit`` runs) and ``rayembed rerank``.

plan -> read + group by query (CPU tasks) -> score pairs (Reranker actor pool) -> rank + write parts (CPU tasks)
-> commit markers -> manifest. The output contract is the embed job's: ``data/`` parts named from the input shard,
``_errors/``, ``_state/`` markers, ``_manifest.json`` last; a rerun skips committed shards.

Two input layouts, chosen per row (Parquet: per shard, from its schema):

- pairs: one row per (query_id, query, doc_id, doc);
- candidate lists: one row per query, (query_id, query, candidates: list of {doc_id, doc}).

Ranking needs all of a query's pairs together, so the reader turns each query into *one row* that carries its
candidate list; Ray Data never splits a row across blocks, so the writer always sees a query whole. Each reader
block (about ``rows_per_block`` pairs) then travels packed into one row, so the model stage's ``batch_size=1`` (Ray
Data requires an explicit batch size for GPU stages) is exactly one block, whatever the candidates per query.
Candidate-list shards stream row by row. A pair shard is grouped by its reader task in memory (any row order
within the shard works), so keep pair shards to a size one CPU worker holds comfortably, or use candidate lists. A
query id that appears in two shards (or in two candidate rows) is ranked separately in each; the job counts such ids
and warns.
"""

from __future__ import annotations

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
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators import DEFAULT_INSTRUCTION, __version__, storage
from operators.errors import ConfigError, ModelLoadError, RayembedError
from operators.loading import inspect_model_dir, resolve_model_dir
from operators.reranker import Reranker, check_reranker_dir, field_error
from operators.storage import Shard
from pipelines import commit
from pipelines.config import RerankJobConfig
from pipelines.embed import _init_ray, _num_gpus
from pipelines.stages import part_name, shard_from_item, shard_items

log = logging.getLogger("rayembed")

ERROR_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # the query id
        ("doc_id", pa.string()),
        ("shard", pa.string()),
        ("row_offset", pa.int64()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)
BAD_TYPE = pa.struct(
    [("doc_id", pa.string()), ("row_offset", pa.int64()), ("error_type", pa.string()), ("message", pa.string())]
)
RECORD_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("part", pa.int64()),
        ("file", pa.string()),
        ("rows", pa.int64()),
        ("errors", pa.int64()),
        ("errors_file", pa.string()),
        ("tokens", pa.int64()),
        ("truncated", pa.int64()),
        ("shard_rows", pa.int64()),
        ("pairs", pa.int64()),
        ("queries", pa.list_(pa.string())),
    ]
)


# ------------------------------------------------------------------------------------------------------------ read


@dataclass
class QueryGroup:
    """One query and its candidates: the unit that moves through the graph as a single row."""

    offset: int  # the input row of the query (candidate lists) or of its first pair (pairs)
    query_id: Any
    query: str | None = None
    doc_ids: list[Any] = field(default_factory=list)
    docs: list[str] = field(default_factory=list)
    bad: list[dict[str, Any]] = field(default_factory=list)
    empty_row: bool = False  # a valid query without candidates: one output row with null doc_id/score/rank

    @property
    def units(self) -> int:
        """Output rows + quarantine records this group produces (what the shard's row count adds up)."""
        return len(self.doc_ids) + int(self.empty_row and not self.doc_ids) + len(self.bad)

    def reject(self, doc_id: Any, offset: int, error_type: str, message: str) -> None:
        self.bad.append(
            {
                "doc_id": None if doc_id is None else str(doc_id),
                "row_offset": offset,
                "error_type": error_type,
                "message": message,
            }
        )


def _safe_id(value: Any) -> Any:
    """The id for a quarantine record: the value when it is a usable id, else None."""
    return value if _id_error("id", value) is None else None


def _id_error(name: str, value: Any) -> str | None:
    if value is None:
        return f"{name} is null"
    if isinstance(value, (dict, list, float, bool)):
        return f"{name} is a {type(value).__name__}; ids must be strings or integers"
    return None


@dataclass(frozen=True)
class Columns:
    query_id: str = "query_id"
    query: str = "query"
    doc_id: str = "doc_id"
    doc: str = "doc"
    candidates: str = "candidates"


def candidate_group(offset: int, obj: dict[str, Any], c: Columns) -> QueryGroup:
    qid, query, cands = obj.get(c.query_id), obj.get(c.query), obj.get(c.candidates)
    g = QueryGroup(offset, qid)
    if (err := _id_error(c.query_id, qid)) is not None:
        g.reject(None, offset, "InvalidId", err)
        return g
    if (err := field_error("query", query)) is not None:
        g.reject(None, offset, "InvalidText", err)
        return g
    if cands is not None and not isinstance(cands, (list, tuple)):
        g.reject(None, offset, "InvalidCandidates", f"{c.candidates} is a {type(cands).__name__}, not a list")
        return g
    g.query = query
    for j, cand in enumerate(cands or ()):
        if not isinstance(cand, dict):
            msg = f"{c.candidates}[{j}] is a {type(cand).__name__}, not an object with {c.doc_id} and {c.doc}"
            g.reject(None, offset, "InvalidCandidates", msg)
            continue
        did, doc = cand.get(c.doc_id), cand.get(c.doc)
        if (err := _id_error(c.doc_id, did)) is not None:
            g.reject(did, offset, "InvalidId", f"{c.candidates}[{j}]: {err}")
        elif (err := field_error("doc", doc)) is not None:
            g.reject(did, offset, "InvalidText", f"{c.candidates}[{j}] (doc_id {did!r}): {err}")
        else:
            g.doc_ids.append(did)
            g.docs.append(doc)
    g.empty_row = not g.doc_ids
    return g


class PairGrouper:
    """Collects a shard's pair rows by query id, in order of first appearance."""

    def __init__(self, c: Columns):
        self.c = c
        self.groups: dict[Any, QueryGroup] = {}
        self.loose: list[QueryGroup] = []  # pairs without a usable query id: quarantined alone

    def add(self, offset: int, obj: dict[str, Any]) -> None:
        c = self.c
        qid = obj.get(c.query_id)
        if (err := _id_error(c.query_id, qid)) is not None:
            g = QueryGroup(offset, qid)
            g.reject(_safe_id(obj.get(c.doc_id)), offset, "InvalidId", err)
            self.loose.append(g)
            return
        g = self.groups.get(qid)
        if g is None:
            g = self.groups[qid] = QueryGroup(offset, qid)
        query, did, doc = obj.get(c.query), obj.get(c.doc_id), obj.get(c.doc)
        if (err := field_error("query", query)) is not None:
            g.reject(_safe_id(did), offset, "InvalidText", err)
        elif (err := _id_error(c.doc_id, did)) is not None:
            g.reject(None, offset, "InvalidId", err)
        elif (err := field_error("doc", doc)) is not None:
            g.reject(did, offset, "InvalidText", err)
        elif g.query is not None and query != g.query:
            g.reject(did, offset, "InconsistentQuery", f"query text differs from the first pair of query_id {qid!r}")
        else:
            g.query = query
            g.doc_ids.append(did)
            g.docs.append(doc)

    def drain(self) -> list[QueryGroup]:
        out = sorted([*self.groups.values(), *self.loose], key=lambda g: g.offset)
        self.groups, self.loose = {}, []
        return out


def _loose_array(values: list[Any], type_: pa.DataType | None = None) -> pa.Array:
    """An Arrow array of ids; mixed JSON types fall back to their JSON text, as the embed reader does."""
    try:
        return pa.array(values, type=type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in values])


def _loose_lists(lists: list[list[Any]], value_type: pa.DataType | None = None) -> pa.Array:
    try:
        return pa.array(lists, None if value_type is None else pa.list_(value_type))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array(
            [[v if isinstance(v, str) else json.dumps(v) for v in x] for x in lists], pa.list_(pa.string())
        )


def groups_table(groups: list[QueryGroup], stem: str, shard_rows: int, id_type: pa.DataType | None = None) -> pa.Table:
    """Query rows as Arrow; ``id_type`` (the shard's doc id type, once known) keeps it equal in every block."""
    n = len(groups)
    return pa.table(
        {
            "_shard": pa.array([stem] * n, pa.string()),
            "_offset": pa.array([g.offset for g in groups], pa.int64()),
            "_shard_rows": pa.array([shard_rows] * n, pa.int64()),
            "query_id": _loose_array([g.query_id for g in groups]),
            "query": pa.array([g.query for g in groups], pa.string()),
            "doc_ids": _loose_lists([g.doc_ids for g in groups], id_type),
            "docs": pa.array([g.docs for g in groups], pa.list_(pa.string())),
            "bad": pa.array([g.bad for g in groups], pa.list_(BAD_TYPE)),
            "empty_row": pa.array([g.empty_row for g in groups], pa.bool_()),
        }
    )


def _jsonl_objects(f) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    for offset, raw in enumerate(f):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield offset, None, f"line is not valid UTF-8 ({e.reason} at byte {e.start})"
            continue
        if not line.strip():
            yield offset, None, "blank line"
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield offset, None, f"malformed JSON: {e.msg} at column {e.colno}"
            continue
        if not isinstance(obj, dict):
            yield offset, None, f"line is a JSON {type(obj).__name__}, not an object"
            continue
        yield offset, obj, None


def _parquet_objects(
    f, c: Columns, batch_rows: int, meta: dict[str, Any]
) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    pf = pq.ParquetFile(f)
    schema = pf.schema_arrow
    names = schema.names
    pairs = c.candidates not in names
    try:  # the doc id type, from the schema: every block of the shard uses it, even one with no doc ids
        if pairs:
            meta["id_type"] = schema.field(c.doc_id).type
        else:
            meta["id_type"] = schema.field(c.candidates).type.value_type.field(c.doc_id).type
    except (KeyError, AttributeError):
        pass
    columns = [c.query_id, c.query, c.doc_id, c.doc] if pairs else [c.query_id, c.query, c.candidates]
    missing = [x for x in columns if x not in names]
    if missing:
        raise KeyError(f"column(s) {missing} not in shard (has {names})")
    offset = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        for obj in batch.to_pylist():
            yield offset, obj, None
            offset += 1


def read_rerank_shard(
    shard: Shard, *, columns: Columns, rows_per_block: int, storage_options: dict[str, Any] | None = None
) -> Iterator[pa.Table]:
    """Blocks of query rows, each about ``rows_per_block`` pairs. The last block carries the shard's unit count in
    ``_shard_rows`` (-1 before). An unreadable shard ends with one shard-level error row."""
    grouper = PairGrouper(columns)
    buf: list[QueryGroup] = []
    units = 0  # units of the groups already yielded or buffered
    buffered = 0  # pairs (and quarantined rows) in ``buf``
    pending: pa.Table | None = None
    meta: dict[str, Any] = {}  # "id_type": the shard's doc id type (Parquet: its schema; JSONL: the first ids seen)

    def flush() -> Iterator[pa.Table]:
        nonlocal buf, pending, buffered
        if buf:
            if pending is not None:
                yield pending
            pending = groups_table(buf, shard.stem, -1, meta.get("id_type"))
            value_type = pending.schema.field("doc_ids").type.value_type
            if "id_type" not in meta and not pa.types.is_null(value_type):
                meta["id_type"] = value_type
            buf, buffered = [], 0

    def push(g: QueryGroup) -> Iterator[pa.Table]:
        nonlocal units, buffered
        buf.append(g)
        units += g.units
        buffered += max(1, g.units)
        # A block without any doc id, while the shard's id type is unknown, waits for the next ones: its output
        # part would otherwise get a doc_id column of another type than the rest of the shard.
        if buffered >= rows_per_block and ("id_type" in meta or any(x.doc_ids for x in buf)):
            yield from flush()

    def stamp(t: pa.Table, total: int) -> pa.Table:
        return t.set_column(
            t.schema.get_field_index("_shard_rows"), "_shard_rows", pa.array([total] * len(t), pa.int64())
        )

    offset = 0
    try:
        with storage.open_input(shard, storage_options) as f:
            parquet = shard.fmt == "parquet"
            rows = _parquet_objects(f, columns, rows_per_block, meta) if parquet else _jsonl_objects(f)
            for offset, obj, err in rows:
                if err is not None:
                    g = QueryGroup(offset, None)
                    g.reject(None, offset, "MalformedJSON" if "JSON" in err else "InvalidLine", err)
                    yield from push(g)
                elif columns.candidates in obj:
                    yield from push(candidate_group(offset, obj, columns))
                else:
                    grouper.add(offset, obj)
                offset += 1
        for g in grouper.drain():
            yield from push(g)
        yield from flush()
    except Exception as e:
        # The queries read before the failure are ranked among the pairs read so far; the shard-level record below
        # says where reading stopped, as the embed reader does.
        for g in grouper.drain():
            yield from push(g)
        yield from flush()
        kind = "MissingColumn" if isinstance(e, KeyError) else "CorruptShard"
        g = QueryGroup(offset, None)
        g.reject(None, offset, kind, f"shard unreadable after {offset} rows: {storage.describe_error(e)}")
        units += 1
        if pending is not None:
            yield pending
        yield groups_table([g], shard.stem, units, meta.get("id_type"))
        return
    if pending is not None:
        yield stamp(pending, units)
    # An empty shard yields nothing; the driver commits it with zero rows once the whole run has succeeded.


PACKED = "_block"  # the one column of a packed block: an Arrow IPC stream of query rows


def pack(table: pa.Table) -> pa.Table:
    """One block of query rows as one opaque row. Ray Data needs an explicit ``batch_size`` for GPU stages; with
    packed blocks ``batch_size=1`` is exactly one reader block (about ``rows_per_block`` pairs), and blocks of
    different id types never have to be concatenated by Ray."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return pa.table({PACKED: pa.array([sink.getvalue().to_pybytes()], pa.large_binary())})


def unpack(batch: pa.Table) -> list[pa.Table]:
    return [pa.ipc.open_stream(pa.py_buffer(b)).read_all() for b in batch[PACKED].to_pylist()]


def read_rerank_shards(batch: dict[str, np.ndarray], **kwargs: Any) -> Iterator[pa.Table]:
    """``map_batches`` entry: one row per shard in, packed blocks of query rows out."""
    for i in range(len(batch["url"])):
        shard = shard_from_item(batch, i)
        for table in read_rerank_shard(shard, **kwargs):
            yield pack(table)


# ----------------------------------------------------------------------------------------------------------- score


class RerankStage(Reranker):
    """The model actor: scores every (query, candidate) of a block of query rows, one list of scores per row."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        log.info(
            "rerank actor ready: %s on %s/%s, %.1f MB of weights",
            self.spec.source,
            self.device,
            self.dtype,
            self.model_bytes / 2**20,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:  # type: ignore[override]
        return pa.concat_tables([pack(self.score_block(t)) for t in unpack(batch)])

    def score_block(self, table: pa.Table) -> pa.Table:
        """Scores of one block of query rows: a ``scores`` list per row, aligned with its ``doc_ids``."""
        queries = table["query"].to_pylist()
        docs = table["docs"].to_pylist()
        counts = [len(d) for d in docs]
        flat_q = [q for q, d in zip(queries, docs) for _ in d]
        flat_d = [x for d in docs for x in d]
        enc = self.encode(flat_q, flat_d)
        enc.raise_first_error()  # the reader quarantined every null or non-string value already
        scores = self.score_ids(enc.ids) if flat_q else np.zeros(0, dtype=np.float32)
        offsets = np.zeros(len(counts) + 1, dtype=np.int32)
        np.cumsum(counts, out=offsets[1:])
        row_of = np.repeat(np.arange(len(counts)), counts)
        tokens = np.bincount(row_of, weights=enc.lengths, minlength=len(counts)).astype(np.int64)
        ntrunc = np.bincount(row_of, weights=enc.truncated, minlength=len(counts)).astype(np.int64)
        self.stats.truncated += int(enc.truncated.sum())
        out = table.drop_columns(["query", "docs"])
        return (
            out.append_column("scores", pa.ListArray.from_arrays(pa.array(offsets), pa.array(scores, pa.float32())))
            .append_column("_tokens", pa.array(tokens, pa.int64()))
            .append_column("_truncated", pa.array(ntrunc, pa.int64()))
        )


# ----------------------------------------------------------------------------------------------------------- write


def rank_order(scores: list[float], doc_ids: list[Any]) -> list[int]:
    """Candidate indices best first: score descending, then doc id ascending, then input order."""
    return sorted(range(len(scores)), key=lambda j: (-scores[j], doc_ids[j], j))


def write_parquet(table: pa.Table, url: str, storage_options: dict[str, Any] | None) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(url, buf.getvalue(), storage_options)


def error_table(records: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=ERROR_SCHEMA)


def write_ranked(
    batch: pa.Table, *, output: str, metadata: dict[str, str], storage_options: dict[str, Any] | None = None
) -> pa.Table:
    """``map_batches`` entry: write every packed block of the batch; one small record per part for the driver."""
    records = [rec for t in unpack(batch) for rec in write_block(t, output, metadata, storage_options)]
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)


def write_block(
    table: pa.Table, output: str, metadata: dict[str, str], storage_options: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Rank each query's candidates and write one part per shard of this block (plus its quarantine part)."""
    records = []
    kv = {k.encode(): v.encode() for k, v in metadata.items()}
    for stem in pc.unique(table["_shard"]).to_pylist():
        sub = table.filter(pc.equal(table["_shard"], stem)).sort_by("_offset")
        first = int(sub["_offset"][0].as_py())
        qids, doc_ids = sub["query_id"].to_pylist(), sub["doc_ids"].to_pylist()
        scores, empty, bad = sub["scores"].to_pylist(), sub["empty_row"].to_pylist(), sub["bad"].to_pylist()
        out_q: list[Any] = []
        out_d: list[Any] = []
        out_s: list[float | None] = []
        out_r: list[int | None] = []
        errors: list[dict[str, Any]] = []
        for i, qid in enumerate(qids):
            if doc_ids[i]:
                for rank, j in enumerate(rank_order(scores[i], doc_ids[i]), start=1):
                    out_q.append(qid)
                    out_d.append(doc_ids[i][j])
                    out_s.append(scores[i][j])
                    out_r.append(rank)
            elif empty[i]:
                out_q.append(qid)
                out_d.append(None)
                out_s.append(None)
                out_r.append(None)
            for b in bad[i]:
                errors.append({"id": None if qid is None else str(qid), "shard": stem, **b})
        rec = {
            "shard": stem,
            "part": first,
            "file": None,
            "rows": len(out_q),
            "errors": len(errors),
            "errors_file": None,
            "tokens": int(pc.sum(sub["_tokens"]).as_py() or 0),
            "truncated": int(pc.sum(sub["_truncated"]).as_py() or 0),
            "shard_rows": int(pc.max(sub["_shard_rows"]).as_py()),
            "pairs": sum(len(d) for d in doc_ids),
            "queries": [str(q) for q, d, e in zip(qids, doc_ids, empty) if q is not None and (d or e)],
        }
        if out_q:
            id_type = sub.schema.field("doc_ids").type.value_type
            if pa.types.is_null(id_type):
                id_type = pa.string()  # only queries without candidates in this part
            data = pa.table(
                {
                    "query_id": _loose_array(out_q, sub.schema.field("query_id").type),
                    "doc_id": _loose_array(out_d, id_type),
                    "score": pa.array(out_s, pa.float32()),
                    "rank": pa.array(out_r, pa.int32()),
                }
            )
            data = data.replace_schema_metadata({**(data.schema.metadata or {}), **kv})
            rel = f"data/{part_name(stem, first)}"
            write_parquet(data, storage.join(output, rel), storage_options)
            rec["file"] = rel
        if errors:
            rel = f"_errors/{part_name(stem, first)}"
            write_parquet(error_table(errors), storage.join(output, rel), storage_options)
            rec["errors_file"] = rel
        records.append(rec)
    return records


# ----------------------------------------------------------------------------------------------------------- driver


@dataclass
class RerankSummary:
    shards: int
    processed: int
    skipped: int
    queries: int
    pairs: int
    tokens: int
    files: int
    quarantined: int
    truncated: int
    repeated_queries: int
    elapsed: float
    output: str

    def line(self) -> str:
        rate = self.pairs / self.elapsed if self.elapsed > 0 else 0.0
        return (
            f"rayembed rerank: {self.shards} shards ({self.processed} processed, {self.skipped} already committed), "
            f"{self.queries} queries, {self.pairs} pairs scored, {rate:,.1f} pairs/s, {self.tokens} tokens, "
            f"{self.files} files written, {self.quarantined} rows quarantined, {self.truncated} truncated, "
            f"{self.elapsed:.1f}s -> {self.output}"
        )


def check_rerank_model(model: str, revision: str | None, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Validate the reranker on the driver from its configs (no weights), before any Ray work."""
    import hashlib

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


def _first_columns(shard: Shard, storage_options: dict[str, Any] | None) -> list[str] | None:
    try:
        with storage.open_input(shard, storage_options) as f:
            if shard.fmt == "parquet":
                return pq.ParquetFile(f).schema_arrow.names
            for line in f:
                if line.strip():
                    obj = json.loads(line)
                    return list(obj) if isinstance(obj, dict) else None
    except Exception:
        return None  # an unreadable shard is quarantined by its reader, not fatal here
    return None


def check_columns(shard: Shard, cfg: RerankJobConfig) -> None:
    names = _first_columns(shard, cfg.storage_options)
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


def file_metadata(cfg: RerankJobConfig, model: dict[str, Any]) -> dict[str, str]:
    return {
        "rayembed.version": __version__,
        "rayembed.kind": "rerank",
        "rayembed.model": cfg.model,
        "rayembed.revision": cfg.revision or "",
        "rayembed.instruction": cfg.instruction or DEFAULT_INSTRUCTION,
        "rayembed.max_length": str(cfg.max_length),
        "rayembed.config_sha256": model["config_sha256"],
    }


def plan_rerank(cfg: RerankJobConfig):
    shards = storage.list_shards(cfg.input, cfg.storage_options)
    for item in cfg.input:
        root = item.split("*")[0].split("?")[0].split("[")[0]
        if storage.is_within(cfg.output, root):
            raise ConfigError(f"--output {cfg.output!r} is inside --input {item!r}; write outputs to another prefix")
    model = check_rerank_model(cfg.model, cfg.revision, cfg.storage_options)
    check_columns(shards[0], cfg)
    key = commit.output_key(
        {
            "kind": "rerank",
            "model": cfg.model,
            "revision": cfg.revision,
            "config_sha256": model["config_sha256"],
            "instruction": cfg.instruction or DEFAULT_INSTRUCTION,
            "max_length": cfg.max_length,
            "columns": [
                cfg.query_id_column,
                cfg.query_column,
                cfg.doc_id_column,
                cfg.doc_column,
                cfg.candidates_column,
            ],
        }
    )
    markers = commit.load_markers(cfg.output, cfg.storage_options)
    pending, _done = commit.plan(shards, markers, key)
    return shards, pending, markers, key, model


def build_rerank_dataset(cfg: RerankJobConfig, pending: list[Shard], model: dict[str, Any]):
    import ray
    import ray.data

    items = shard_items(pending)
    so = cfg.storage_options
    cols = Columns(cfg.query_id_column, cfg.query_column, cfg.doc_id_column, cfg.doc_column, cfg.candidates_column)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        read_rerank_shards,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"columns": cols, "rows_per_block": cfg.rows_per_block, "storage_options": so},
    )
    ds = ds.map_batches(
        RerankStage,
        batch_size=1,  # one packed reader block per call (Ray Data requires an explicit batch size with GPUs)
        batch_format="pyarrow",
        fn_constructor_kwargs={
            "model": cfg.model,
            "instruction": cfg.instruction,
            "max_length": cfg.max_length,
            "batch_tokens": cfg.batch_tokens,
            "device": cfg.device,
            "dtype": cfg.dtype,
            "revision": cfg.revision,
            "trust_remote_code": cfg.trust_remote_code,
            "storage_options": so,
        },
        compute=ray.data.ActorPoolStrategy(min_size=cfg.concurrency[0], max_size=cfg.concurrency[1]),
        num_gpus=_num_gpus(cfg),
        num_cpus=cfg.num_cpus,
    )
    return ds.map_batches(
        write_ranked,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs={"output": cfg.output, "metadata": file_metadata(cfg, model), "storage_options": so},
    )


def run_rerank(cfg: RerankJobConfig) -> RerankSummary:
    t0 = time.time()
    shards, pending, markers, key, model = plan_rerank(cfg)
    log.info(
        "planned %d shards: %d pending, %d already committed", len(shards), len(pending), len(shards) - len(pending)
    )
    progress = {s.stem: commit.ShardProgress(s) for s in pending}
    queries = pairs = tokens = files = quarantined = truncated = 0
    seen: dict[str, str] = {}  # query id -> the shard it was ranked in
    repeated: set[str] = set()
    if pending:
        _init_ray(cfg.address)
        ds = build_rerank_dataset(cfg, pending, model)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for rec in batch.to_pylist():
                for q in rec.pop("queries"):
                    if q in seen:
                        repeated.add(q)
                    seen[q] = rec["shard"]
                p = progress[rec["shard"]]
                p.add(rec)
                pairs += rec["pairs"]
                tokens += rec["tokens"]
                files += int(rec["file"] is not None)
                quarantined += rec["errors"]
                truncated += rec["truncated"]
                if p.complete:
                    markers[p.shard.stem] = commit.commit_shard(cfg.output, p, key, cfg.storage_options)
        for p in progress.values():
            if p.shard.stem not in markers or markers[p.shard.stem].get("fingerprint") != p.shard.fingerprint:
                p.total = p.seen
                markers[p.shard.stem] = commit.commit_shard(cfg.output, p, key, cfg.storage_options)
    queries = len(seen)
    if repeated:
        examples = ", ".join(sorted(repeated)[:5])
        print(
            f"rayembed rerank: warning: {len(repeated)} query ids appear in more than one shard or candidate row and "
            f"were ranked separately in each (e.g. {examples}); put all of a query's pairs in one shard",
            file=sys.stderr,
            flush=True,
        )
    current = [markers[s.stem] for s in shards]
    total_rows = sum(m["rows"] + m["errors"] for m in current)
    total_errors = sum(m["errors"] for m in current)
    if total_rows and total_errors / total_rows > cfg.max_error_ratio:
        raise RayembedError(
            f"{total_errors} of {total_rows} rows ({total_errors / total_rows:.2%}) were quarantined, above "
            f"--max-error-ratio {cfg.max_error_ratio:.2%}; no manifest written; "
            f"see {storage.join(cfg.output, '_errors')}"
        )
    public = cfg.public()
    public["instruction"] = cfg.instruction or DEFAULT_INSTRUCTION
    commit.write_manifest(cfg.output, current, public, {**model, "kind": "rerank"}, cfg.storage_options)
    return RerankSummary(
        shards=len(shards),
        processed=len(pending),
        skipped=len(shards) - len(pending),
        queries=queries,
        pairs=pairs,
        tokens=tokens,
        files=files,
        quarantined=quarantined,
        truncated=truncated,
        repeated_queries=len(repeated),
        elapsed=time.time() - t0,
        output=cfg.output,
    )


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import main as cli_main

    return cli_main(["rerank", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
