"""The rerank job's reader: each query becomes one row that carries its candidates, so no stage ever splits a query.

Two input layouts, chosen per row (Parquet: per shard, from its schema):

- pairs: one row per (query_id, query, doc_id, doc);
- candidate lists: one row per query, (query_id, query, candidates: list of {doc_id, doc}).

Ray Data never splits a row across blocks, so the writer always sees a query whole. Each reader block (about
``rows_per_block`` pairs) then travels packed into one row, so the model stage's ``batch_size=1`` (Ray Data requires
an explicit batch size for GPU stages) is exactly one block, whatever the candidates per query. Candidate-list shards
stream row by row. A pair shard is grouped by its reader task in memory (any row order within the shard works), so
keep pair shards to a size one CPU worker holds comfortably, or use candidate lists.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from operators import rows, storage
from operators.reranker import field_error
from operators.storage import Shard
from pipelines import parts
from pipelines.parts import PACKED, pack, unpack  # noqa: F401 (the rerank stages' and tests' import)

BAD_TYPE = pa.struct(
    [("doc_id", pa.string()), ("row_offset", pa.int64()), ("error_type", pa.string()), ("message", pa.string())]
)


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


def loose_array(values: list[Any], type_: pa.DataType | None = None) -> pa.Array:
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
            "query_id": loose_array([g.query_id for g in groups]),
            "query": pa.array([g.query for g in groups], pa.string()),
            "doc_ids": _loose_lists([g.doc_ids for g in groups], id_type),
            "docs": pa.array([g.docs for g in groups], pa.list_(pa.string())),
            "bad": pa.array([g.bad for g in groups], pa.list_(BAD_TYPE)),
            "empty_row": pa.array([g.empty_row for g in groups], pa.bool_()),
        }
    )


def _parquet_objects(f, c: Columns, batch_rows: int, meta: dict[str, Any]) -> Iterator[rows.Record]:
    """Pair rows or candidate rows of a Parquet shard as dicts; ``meta["id_type"]`` gets the shard's doc id type
    from the schema, so every block of the shard uses it, even one with no doc ids."""
    schema = rows.parquet_schema(f)
    pairs = c.candidates not in schema.names
    try:
        if pairs:
            meta["id_type"] = schema.field(c.doc_id).type
        else:
            meta["id_type"] = schema.field(c.candidates).type.value_type.field(c.doc_id).type
    except (KeyError, AttributeError):
        pass
    columns = [c.query_id, c.query, c.doc_id, c.doc] if pairs else [c.query_id, c.query, c.candidates]
    f.seek(0)
    offset = 0
    for table in rows.parquet_tables(f, columns, batch_rows):
        for obj in table.to_pylist():
            yield offset, obj, None, None
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
            records = _parquet_objects(f, columns, rows_per_block, meta) if parquet else rows.jsonl_records(f)
            for offset, obj, err_type, err in records:
                if obj is None:
                    g = QueryGroup(offset, None)
                    g.reject(None, offset, err_type, err)
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
        kind, msg = rows.shard_error(e, offset)
        g = QueryGroup(offset, None)
        g.reject(None, offset, kind, msg)
        units += 1
        if pending is not None:
            yield pending
        yield groups_table([g], shard.stem, units, meta.get("id_type"))
        return
    if pending is not None:
        yield stamp(pending, units)
    # An empty shard yields nothing; the driver commits it with zero rows once the whole run has succeeded.


def read_rerank_shards(batch: dict[str, np.ndarray], **kwargs: Any) -> Iterator[pa.Table]:
    """``map_batches`` entry: one row per shard in, packed blocks of query rows out."""
    for i in range(len(batch["url"])):
        shard = parts.shard_from_item(batch, i)
        for table in read_rerank_shard(shard, **kwargs):
            yield pack(table)
