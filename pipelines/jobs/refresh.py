"""The match pass that runs before the embed graph, on the engine: ids are keys, and a refresh reuses vectors.

One Ray Data pass over the keys of the whole corpus:

    key rows  one task per input shard (id, content hash, pass-through digest, position) and, on a refresh, one per
              data file of the parent version (the same, plus the old vector), all in one schema (KEY_SCHEMA)
    bucket    groupby(hash(id) % buckets) -> match_bucket: per id, the row kept (the first in sorted shard order,
              then by row offset), its duplicates, and whether the parent holds the same text (reuse the vector) or
              the same text with other pass-through values (reuse, and upsert); the parent's ids with no kept row are
              this version's deletes, written here, one file per bucket
    route     groupby(shard) -> write_work: each shard's decisions in one work file that the read stage joins by row
              offset; one small record per shard (and per bucket) back to the driver

An input whose key rows fit in ``inline_match_bytes()`` runs the same three functions in the driver process
(``match_in_process``): there, Ray Data's start-up would be all the pass costs. Otherwise the driver sees one record
per shard and per bucket, never an id or a vector. Every file name derives from the run
and the shard or bucket, so a retried task rewrites the same file; nothing here is referenced by a committed version
until the version record names it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators import storage
from operators.storage import Shard
from pipelines import parts
from pipelines.jobs.embed_stages import read_shard
from pipelines.parts import BUCKET, DUPLICATE, EMBED, REUSE, UPSERT

NEW, OLD = 0, 1
MAX_BUCKETS = 4096
BUCKET_BYTES = 256 * 2**20  # key rows per bucket: one map_groups call holds one bucket
KEY_ROW_BYTES = 96  # id string, positions, two digests, Arrow overhead
# Key rows (with the parent's vectors) up to which the pass runs in the driver process (match_in_process): below it,
# Ray Data's task and shuffle start-up (2-3 s) is all the pass would cost. RAYEMBED_MATCH_INLINE_BYTES overrides it
# (0: always on the engine).
INLINE_MATCH_BYTES = 32 * 2**20

ROUTE_SCHEMA = pa.schema(
    [
        ("src", pa.int32()),
        ("embed", pa.int64()),
        ("reuse", pa.int64()),
        ("upsert", pa.int64()),
        ("duplicates", pa.int64()),
        ("work", pa.string()),
        ("deletes", pa.int64()),
        ("deletes_file", pa.string()),
    ]
)


def key_schema(width: int) -> pa.Schema:
    return pa.schema(
        [
            ("_key", pa.string()),
            ("_bucket", pa.int32()),
            ("_side", pa.int8()),
            ("_src", pa.int32()),
            ("_offset", pa.int64()),
            ("_hash", parts.HASH_TYPE),
            ("_pass", parts.HASH_TYPE),
            ("_vec", pa.binary(width)),
        ]
    )


def decision_schema(width: int) -> pa.Schema:
    return pa.schema(
        [
            ("_src", pa.int32()),
            ("_offset", pa.int64()),
            ("_action", pa.int8()),
            ("_vec", pa.binary(width)),
            ("_keep_src", pa.int32()),
            ("_keep_offset", pa.int64()),
            ("_count", pa.int64()),
            ("_file", pa.string()),
        ]
    )


def bucket_count(input_bytes: int, parent_rows: int, width: int) -> int:
    """Buckets enough that one holds about BUCKET_BYTES of key rows (the input's rows estimated from its bytes)."""
    est = input_bytes // 4 + parent_rows * (KEY_ROW_BYTES + width)
    return int(min(MAX_BUCKETS, max(1, -(-est // BUCKET_BYTES))))


# -------------------------------------------------------------------------------------------------------- key rows


def _keys(table: pa.Table, side: int, src: int, offsets: pa.Array, hashes: pa.Array, passes, vecs, *, width, buckets):
    keys = pc.cast(table["_key_value"], pa.string())
    n = len(keys)
    return pa.Table.from_arrays(
        [
            keys,
            pa.array(parts.key_buckets(keys, buckets), pa.int32()),
            pa.array(np.full(n, side, np.int8)),
            pa.array(np.full(n, src, np.int32)),
            offsets,
            hashes,
            passes,
            vecs if vecs is not None else pa.nulls(n, pa.binary(width)),
        ],
        schema=key_schema(width),
    )


def new_keys(shard: Shard, src: int, *, cfg: dict[str, Any], width: int, buckets: int) -> Iterator[pa.Table]:
    """The key rows of one input shard's readable rows with a valid text (the others are quarantined later)."""
    text, ident = cfg["text_column"], cfg["id_column"]
    for block in read_shard(
        shard,
        id_column=ident,
        text_column=text,
        passthrough=cfg["passthrough"],
        rows_per_block=65536,
        storage_options=cfg["storage_options"],
    ):
        # A null text is quarantined later (by the tokenize stage): it is no key, so a valid copy of its id is kept.
        valid = pc.and_(pc.is_valid(block[ident]), pc.is_valid(block[text]))
        good = block.filter(pc.and_(pc.is_null(block["error"]), valid))
        if not len(good):
            continue
        good = good.append_column("_key_value", good[ident])
        yield _keys(
            good,
            NEW,
            src,
            good["_offset"],
            parts.content_hashes(good[text]),
            parts.row_digests(good, cfg["passthrough"]),
            None,
            width=width,
            buckets=buckets,
        )


def old_keys(url: str, src: int, *, cfg: dict[str, Any], width: int, buckets: int) -> Iterator[pa.Table]:
    """The key rows of one data file of the parent version, with each row's vector as fixed-width bytes."""
    cols = ["id", "embedding", "content_hash", *cfg["passthrough"]]
    fs, path = storage.get_fs(url, cfg["storage_options"])
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        done = 0
        for batch in pf.iter_batches(batch_size=65536, columns=cols):
            t = pa.Table.from_batches([batch])
            n = len(t)
            flat = t["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
            vecs = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(flat.tobytes())])
            yield _keys(
                t.append_column("_key_value", t["id"]),
                OLD,
                src,
                pa.array(np.arange(done, done + n), pa.int64()),
                t["content_hash"].combine_chunks(),
                parts.row_digests(t, cfg["passthrough"]),
                vecs,
                width=width,
                buckets=buckets,
            )
            done += n


def key_rows(batch: dict[str, np.ndarray], *, cfg: dict[str, Any], width: int, buckets: int) -> Iterator[pa.Table]:
    """``map_batches`` entry: one item per input shard (``kind`` new) or parent data file (``kind`` old)."""
    for i in range(len(batch["url"])):
        src = int(batch["src"][i])
        if batch["kind"][i] == "new":
            blocks = new_keys(parts.shard_from_item(batch, i), src, cfg=cfg, width=width, buckets=buckets)
        else:
            blocks = old_keys(str(batch["url"][i]), src, cfg=cfg, width=width, buckets=buckets)
        yield from blocks
    # Never a task without a block: an input of empty shards must still reach the shuffle with its schema.
    yield key_schema(width).empty_table()


# ---------------------------------------------------------------------------------------------------------- bucket


def _first_of_runs(keys: pa.Array) -> np.ndarray:
    n = len(keys)
    first = np.ones(n, dtype=bool)
    if n > 1:
        first[1:] = pc.not_equal(keys.slice(1), keys.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    return first


def _decisions(width: int, **cols: Any) -> pa.Table:
    schema = decision_schema(width)
    n = len(next(iter(cols.values())))
    arrays = [cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in schema]
    return pa.Table.from_arrays(
        [pa.array(a, f.type) if not isinstance(a, pa.Array) else a.cast(f.type) for a, f in zip(arrays, schema)],
        schema=schema,
    )


def match_bucket(
    t: pa.Table,
    *,
    width: int,
    refresh: bool,
    output: str,
    deletes_dir: str,
    id_type: str | None,
    storage_options: dict | None,
) -> pa.Table:
    """All key rows of one bucket in, the decisions for its input rows (and one record of its deletes) out."""
    new = t.filter(pc.equal(t["_side"], NEW)).sort_by(
        [("_key", "ascending"), ("_src", "ascending"), ("_offset", "ascending")]
    )
    old = t.filter(pc.equal(t["_side"], OLD))
    first = _first_of_runs(new["_key"].combine_chunks())
    keeper = np.maximum.accumulate(np.where(first, np.arange(len(new)), 0))
    src, off = new["_src"].to_numpy(), new["_offset"].to_numpy()
    dup = ~first
    out = [
        _decisions(
            width,
            _src=src[dup],
            _offset=off[dup],
            _action=np.full(int(dup.sum()), DUPLICATE, np.int8),
            _keep_src=src[keeper[dup]],
            _keep_offset=off[keeper[dup]],
        )
    ]
    kept = new.filter(pa.array(first))
    if refresh:
        out.append(_match_parent(kept, old, width))
    bucket = int(t["_bucket"][0].as_py()) if len(t) else 0
    gone = old.select(["_key"]).join(kept.select(["_key"]), "_key", join_type="left anti")
    if len(gone):  # a bucket record only where there are deletes: a backfill without duplicates decides nothing
        ids = _typed_ids(gone["_key"], id_type)
        rel = f"{deletes_dir}/b{bucket:05d}.parquet"
        parts.write_parquet(pa.table({"id": ids}), storage.join(output, rel), storage_options)
        out.append(_decisions(width, _src=[-1], _offset=[bucket], _action=[BUCKET], _count=[len(gone)], _file=[rel]))
    return pa.concat_tables(out)


def _typed_ids(keys, id_type: str | None):
    """The deletes' ids back in the snapshot's id type (ints, strings); kept as strings where the type has no cast
    from its string form."""
    try:
        return keys if id_type is None else pc.cast(keys, pa.type_for_alias(id_type))
    except (ValueError, TypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return keys


def _match_parent(kept: pa.Table, old: pa.Table, width: int) -> pa.Table:
    """The kept rows against the parent's: the same text reuses the old vector (an upsert when pass-through values
    differ); a new id or another text is embedded."""
    right = old.select(["_key", "_hash", "_pass", "_vec"]).rename_columns(["_key", "_old_hash", "_old_pass", "_vec"])
    j = kept.select(["_key", "_src", "_offset", "_hash", "_pass"]).join(right, "_key", join_type="left outer")
    same = pc.fill_null(pc.equal(j["_hash"], j["_old_hash"]), False).to_numpy(zero_copy_only=False)
    pass_eq = pc.fill_null(pc.equal(j["_pass"], j["_old_pass"]), False)
    both_null = pc.and_(pc.is_null(j["_pass"]), pc.is_null(j["_old_pass"]))
    pass_same = pc.or_(pass_eq, both_null).to_numpy(zero_copy_only=False)
    action = np.where(same, np.where(pass_same, REUSE, UPSERT), EMBED).astype(np.int8)
    vec = pc.if_else(pa.array(same), j["_vec"], pa.nulls(len(j), pa.binary(width)))
    return _decisions(width, _src=j["_src"], _offset=j["_offset"], _action=action, _vec=vec)


# ----------------------------------------------------------------------------------------------------------- route


def write_work(
    t: pa.Table, *, work_dir: str, stems: list[str], unchanged: np.ndarray, storage_options: dict | None
) -> pa.Table:
    """One shard's decisions (or the bucket records, src -1) in, one record out; the decisions the read stage needs
    go to ``<work_dir>/<stem>.parquet``, unless the shard is unchanged and keeps every vector (no file at all)."""
    src = int(t["_src"][0].as_py())
    if src < 0:
        return pa.Table.from_pylist(
            [
                {"src": -1, "deletes": c, "deletes_file": f}
                for c, f in zip(t["_count"].to_pylist(), t["_file"].to_pylist())
            ],
            schema=ROUTE_SCHEMA,
        )
    action = t["_action"].to_numpy()
    counts = {
        k: int((action == v).sum())
        for k, v in (("embed", EMBED), ("reuse", REUSE), ("upsert", UPSERT), ("duplicates", DUPLICATE))
    }
    rec = {"src": src, **counts, "work": None, "deletes": 0, "deletes_file": None}
    if unchanged[src] and counts["embed"] == counts["upsert"] == counts["duplicates"] == 0:
        return pa.Table.from_pylist([rec], schema=ROUTE_SCHEMA)
    keep = t.filter(pc.not_equal(t["_action"], EMBED)).sort_by("_offset")
    msgs = [
        None if a != DUPLICATE else f"duplicate id: kept the row at {stems[s]} offset {o}"
        for a, s, o in zip(
            keep["_action"].to_pylist(), keep["_keep_src"].to_pylist(), keep["_keep_offset"].to_pylist()
        )
    ]
    work = pa.table(
        {
            "offset": keep["_offset"],
            "action": keep["_action"],
            "vec": keep["_vec"],
            "message": pa.array(msgs, pa.string()),
        }
    )
    rec["work"] = storage.join(work_dir, f"{stems[src]}.parquet")
    parts.write_parquet(work, rec["work"], storage_options)
    return pa.Table.from_pylist([rec], schema=ROUTE_SCHEMA)


def inline_match_bytes() -> int:
    return int(os.environ.get("RAYEMBED_MATCH_INLINE_BYTES", INLINE_MATCH_BYTES))


def _groups(t: pa.Table, column: str) -> Iterator[pa.Table]:
    """``t``'s rows grouped by ``column``, in key order: what ``groupby(column).map_groups`` hands each call."""
    if not len(t):
        return
    t = t.sort_by(column)
    keys = t[column].to_numpy()
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    for start, end in zip(starts, np.r_[starts[1:], len(t)], strict=True):
        yield t.slice(int(start), int(end - start))


def match_in_process(
    items: list[dict[str, Any]], *, key_kw: dict, match_kw: dict, route_kw: dict, backfill: bool
) -> list[dict[str, Any]]:
    """The same three steps (key rows, bucket, route) on the same functions, in this process, for an input small
    enough to hold (``inline_match_bytes``); the records ``write_work`` returns, or none for a backfill without
    duplicates (as on the engine)."""
    batch = {k: np.array([it[k] for it in items], dtype=object) for k in items[0]}
    keys = pa.concat_tables(list(key_rows(batch, **key_kw)))
    decided = [match_bucket(g, **match_kw) for g in _groups(keys, "_bucket")]
    table = pa.concat_tables(decided) if decided else decision_schema(match_kw["width"]).empty_table()
    if backfill and table.num_rows == 0:
        return []
    return [r for g in _groups(table, "_src") for r in write_work(g, **route_kw).to_pylist()]


@contextlib.contextmanager
def shuffle_strategy(tasks: int, buckets: int):
    """The pull-based sort shuffle for small jobs (a second, not the hash shuffle's aggregator start-up of tens of
    seconds); the hash shuffle when tasks x buckets blocks would swamp the object store. RAY_DATA_DEFAULT_SHUFFLE_
    STRATEGY, when set, wins."""
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    ctx = DataContext.get_current()
    before = ctx.shuffle_strategy
    if not os.environ.get("RAY_DATA_DEFAULT_SHUFFLE_STRATEGY"):
        small = tasks * max(buckets, 1) <= 200_000
        ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED if small else ShuffleStrategy.HASH_SHUFFLE
    try:
        yield
    finally:
        ctx.shuffle_strategy = before
