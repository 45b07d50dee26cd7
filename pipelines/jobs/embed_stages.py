"""The per-block steps of the embed graph: read a shard, tokenize, embed, write parts.

Every block carries ``_shard`` (the shard's stem), ``_offset`` (row number in the shard) and ``error`` /
``error_type`` (null for good rows), so a bad row travels to the writer and is quarantined instead of lost.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators import rows, storage
from operators.bisect import bisect_call, describe
from operators.storage import Shard
from operators.tokenization import Encoded, TextEncoder, ids_to_arrow, text_error
from pipelines import parts, telemetry

log = logging.getLogger("rayembed")


# ------------------------------------------------------------------------------------------------------------ read


def _table(recs: list[dict[str, Any]], stem: str, columns: list[str], shard_rows: int) -> pa.Table:
    data: dict[str, Any] = {"_shard": pa.array([stem] * len(recs), pa.string())}
    data["_offset"] = pa.array([r["_offset"] for r in recs], pa.int64())
    data["_shard_rows"] = pa.array([shard_rows] * len(recs), pa.int64())
    for c in columns:
        values = [r.get(c) for r in recs]
        try:
            data[c] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # Mixed JSON types in one column (ints and strings): keep them as JSON text rather than lose rows.
            data[c] = pa.array([None if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in values])
    data["error"] = pa.array([r.get("error") for r in recs], pa.string())
    data["error_type"] = pa.array([r.get("error_type") for r in recs], pa.string())
    return pa.table(data)


def _jsonl_rows(f, columns: list[str], id_column: str, text_column: str) -> Iterator[dict[str, Any]]:
    for offset, obj, err_type, msg in rows.jsonl_records(f):
        if obj is None:
            yield {"_offset": offset, "error": msg, "error_type": err_type}
            continue
        if obj.get(id_column) is None:
            yield {"_offset": offset, "error": f"line has no {id_column!r} value", "error_type": "MissingId"}
            continue
        row = {c: obj.get(c) for c in columns}
        row["_offset"] = offset
        err = text_error(row[text_column])
        if err is not None:
            # Judge the text before Arrow sees it: a mixed-type column would otherwise coerce 5 into "5".
            row.update(error=err, error_type="InvalidText")
            row[text_column] = None
        yield row


def _parquet_blocks(f, shard: Shard, columns: list[str], text_column: str, rows_per_block: int, done: int):
    for t in rows.parquet_tables(f, columns, rows_per_block, string_columns=[text_column]):
        n = len(t)
        yield pa.table(
            {
                "_shard": pa.array([shard.stem] * n, pa.string()),
                "_offset": pa.array(np.arange(done, done + n), pa.int64()),
                "_shard_rows": pa.array([-1] * n, pa.int64()),
                **{c: t[c] for c in columns},
                "error": pa.nulls(n, pa.string()),
                "error_type": pa.nulls(n, pa.string()),
            }
        )
        done += n


def _stamp(t: pa.Table, total: int) -> pa.Table:
    i = t.schema.get_field_index("_shard_rows")
    return t.set_column(i, "_shard_rows", pa.array([total] * len(t), pa.int64()))


def read_shard(
    shard: Shard,
    *,
    id_column: str,
    text_column: str,
    passthrough: tuple[str, ...],
    rows_per_block: int,
    storage_options: dict[str, Any] | None = None,
) -> Iterator[pa.Table]:
    """Blocks of at most ``rows_per_block`` rows. The last block carries the shard's row count in ``_shard_rows``
    (-1 before); an unreadable or truncated shard ends with one shard-level error row."""
    columns = list(dict.fromkeys([id_column, text_column, *passthrough]))
    done = 0
    pending: pa.Table | None = None  # held back one block, so the last one can carry the row count
    buf: list[dict[str, Any]] = []  # JSONL rows read but not yet in a block

    def push(block: pa.Table) -> Iterator[pa.Table]:
        nonlocal pending, done
        if pending is not None:
            yield pending
        pending, done = block, done + len(block)

    try:
        with storage.open_input(shard, storage_options) as f:
            if shard.fmt == "parquet":
                for block in _parquet_blocks(f, shard, columns, text_column, rows_per_block, done):
                    yield from push(block)
            else:
                for row in _jsonl_rows(f, columns, id_column, text_column):
                    buf.append(row)
                    if len(buf) >= rows_per_block:
                        yield from push(_table(buf, shard.stem, columns, -1))
                        buf = []
                if buf:
                    yield from push(_table(buf, shard.stem, columns, -1))
                    buf = []
    except Exception as e:
        if buf:  # the lines read before the stream broke are good rows: keep them
            yield from push(_table(buf, shard.stem, columns, -1))
        if pending is not None:
            yield pending
        kind, msg = rows.shard_error(e, done)
        yield _table([{"_offset": done, "error": msg, "error_type": kind}], shard.stem, columns, done + 1)
        return
    # An empty shard yields nothing; the driver commits it with zero rows once the whole run has succeeded.
    if pending is not None:
        yield _stamp(pending, done)


def read_shards(
    batch: dict[str, np.ndarray], *, part_rows: int, vec_width: int = 0, **kwargs: Any
) -> Iterator[pa.Table]:
    """``map_batches`` entry: one row per shard in, packed parts out: each the next ``part_rows`` rows of the shard
    (the last smaller), with each row's ``content_hash`` and what the match pass decided for it
    (pipelines/jobs/refresh.py). A part travels whole to the writer, which writes it as one file; a shard is read
    in blocks of ``rows_per_block`` rows and at most one part is held in memory."""
    for i in range(len(batch["url"])):
        work = str(batch["work"][i]) if "work" in batch else ""
        cursor = WorkCursor(work or None, kwargs.get("storage_options"))
        blocks = read_shard(parts.shard_from_item(batch, i), **kwargs)
        for part in cut_parts((annotate(b, cursor, kwargs["text_column"], vec_width) for b in blocks), part_rows):
            telemetry.record(telemetry.ROWS_READ, len(part), stage="read")
            yield parts.pack(parts.add_retries(part))


def cut_parts(blocks: Iterator[pa.Table], part_rows: int) -> Iterator[pa.Table]:
    """Consecutive blocks of one shard regrouped into tables of exactly ``part_rows`` rows (the last one smaller):
    a part's rows, and so its file, follow from the shard alone, whatever the read blocks."""
    held: list[pa.Table] = []
    n = 0
    for block in blocks:
        while len(block):
            take = min(part_rows - n, len(block))
            held.append(block.slice(0, take))
            n, block = n + take, block.slice(take)
            if n == part_rows:
                yield parts.concat_blocks(held)
                held, n = [], 0
    if held:
        yield parts.concat_blocks(held)


class WorkCursor:
    """A shard's work file (sorted by row offset) read along the shard's blocks, which come in offset order: it
    holds one batch of decisions at a time, never the shard's."""

    def __init__(self, url: str | None, storage_options: dict[str, Any] | None):
        self._batches = self._read(url, storage_options) if url else iter(())
        self._buf: pa.Table | None = None
        self._done = not url

    @staticmethod
    def _read(url: str, storage_options: dict[str, Any] | None) -> Iterator[pa.Table]:
        import pyarrow.parquet as pq

        fs, path = storage.get_fs(url, storage_options)
        with fs.open(path, "rb") as f:
            for b in pq.ParquetFile(f).iter_batches(batch_size=16384):
                yield pa.Table.from_batches([b])

    def take(self, lo: int, hi: int) -> pa.Table | None:
        """The decisions for row offsets in [lo, hi]; the ones below ``lo`` are dropped (their rows have passed)."""
        if self._done and self._buf is None:
            return None
        while not self._done and (self._buf is None or self._buf["offset"][-1].as_py() < hi):
            nxt = next(self._batches, None)
            if nxt is None:
                self._done = True
            elif len(nxt):
                self._buf = nxt if self._buf is None else pa.concat_tables([self._buf, nxt])
        if self._buf is None:
            return None
        off = self._buf["offset"]
        out = self._buf.filter(pc.and_(pc.greater_equal(off, lo), pc.less_equal(off, hi)))
        rest = self._buf.filter(pc.greater(off, hi))
        self._buf = rest if len(rest) else None
        return out


def annotate(block: pa.Table, cursor: WorkCursor, text_column: str, vec_width: int) -> pa.Table:
    """Add ``content_hash``, ``_reuse`` / ``_upsert`` (the parent's vector is reused; the row is also upserted) and
    ``_vec`` (that vector's bytes), and quarantine the duplicate ids the match pass found."""
    n = len(block)
    DUPLICATE, REUSE, UPSERT = parts.DUPLICATE, parts.REUSE, parts.UPSERT  # noqa: N806 (module constants)

    action = np.full(n, -1, np.int8)
    vec = pa.nulls(n, pa.binary(vec_width))
    if n:
        offsets = block["_offset"].to_numpy()
        w = cursor.take(int(offsets.min()), int(offsets.max()))
        if w is not None and len(w):
            pos = np.searchsorted(offsets, w["offset"].to_numpy())  # a shard's blocks are sorted by offset
            action[pos] = w["action"].to_numpy()
            index = np.full(n, -1, np.int64)
            index[pos] = np.arange(len(w))
            vec = w["vec"].take(pa.array(index, mask=index < 0))
            errors, types = block["error"].to_pylist(), block["error_type"].to_pylist()
            for p, a, m in zip(pos, w["action"].to_pylist(), w["message"].to_pylist()):
                if a == DUPLICATE and errors[p] is None:
                    errors[p], types[p] = m, "DuplicateId"
            block = block.set_column(block.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
            i = block.schema.get_field_index("error_type")
            block = block.set_column(i, "error_type", pa.array(types, pa.string()))
    texts = block[text_column] if text_column in block.column_names else pa.nulls(n, pa.string())
    hashes = parts.content_hashes(pc.if_else(pc.is_null(block["error"]), texts, pa.scalar(None, texts.type)))
    reuse = (action == REUSE) | (action == UPSERT)
    return (
        block.append_column("content_hash", hashes)
        .append_column("_reuse", pa.array(reuse))
        .append_column("_upsert", pa.array(action == UPSERT))
        .append_column("_vec", vec)
    )


# -------------------------------------------------------------------------------------------------------- tokenize

_ENCODERS: dict[tuple, TextEncoder] = {}


def _encoder(
    model: str, revision: str | None, max_length: int, instruction: str | None, storage_options: dict[str, Any] | None
) -> TextEncoder:
    from operators.loading import inspect_model_dir, load_tokenizer, resolve_model_dir

    # One tokenizer per worker process: Ray reuses workers across tasks, so the load happens once, not per block.
    key = (model, revision, max_length, instruction)
    if key not in _ENCODERS:
        # One thread per task: Ray runs one tokenize task per booked CPU; the Rust tokenizer's own thread pool
        # (one thread per core by default) would oversubscribe the machine.
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
        path = resolve_model_dir(model, revision=revision, storage_options=storage_options, metadata_only=True)
        spec = inspect_model_dir(path, source=model, require_weights=False)
        _ENCODERS[key] = TextEncoder(load_tokenizer(spec), spec, max_length=max_length, instruction=instruction)
    return _ENCODERS[key]


def _merge_encoded(a: Encoded, b: Encoded) -> Encoded:
    return Encoded(ids=a.ids + b.ids, truncated=np.concatenate([a.truncated, b.truncated]), errors=a.errors + b.errors)


def _failed_encoding(texts: list[Any], e: Exception) -> Encoded:
    empty = [np.zeros(0, dtype=np.int32)]
    return Encoded(ids=empty, truncated=np.zeros(1, dtype=bool), errors=[describe(e, "tokenizer")])


def encode_bisecting(enc: TextEncoder, texts: list[Any]) -> tuple[Encoded, set[int]]:
    """``enc.encode`` that survives a poison row (operators/bisect.py); returns the indices of the rows that made the
    tokenizer raise, whose ``errors`` say so."""
    out = bisect_call(
        enc.encode,
        list(texts),
        size=len,
        split=lambda t, i: (t[:i], t[i:]),
        merge=_merge_encoded,
        fail_one=_failed_encoding,
    )
    return out, {i for i, e in enumerate(out.errors) if e is not None and e.startswith("tokenizer failed:")}


def tokenize_block(
    table: pa.Table,
    *,
    model: str,
    revision: str | None,
    max_length: int,
    instruction: str | None,
    text_column: str,
    drop_text: bool,
    storage_options: dict[str, Any] | None = None,
) -> pa.Table:
    enc = _encoder(model, revision, max_length, instruction, storage_options)
    texts = table[text_column].to_pylist()
    errors, types = table["error"].to_pylist(), table["error_type"].to_pylist()
    reuse = table["_reuse"].to_pylist() if "_reuse" in table.column_names else [False] * len(texts)
    # Only rows the model will see: quarantined rows and rows whose vector the parent version gives are skipped.
    todo = [i for i, (e, r) in enumerate(zip(errors, reuse)) if e is None and not r]
    encoded, poison = encode_bisecting(enc, [texts[i] for i in todo])
    ids = [np.zeros(0, dtype=np.int32)] * len(texts)
    truncated = np.zeros(len(texts), dtype=bool)
    for j, i in enumerate(todo):
        err = encoded.errors[j]
        if err is not None:
            errors[i], types[i] = err, "TokenizerError" if j in poison else "InvalidText"
        else:
            ids[i], truncated[i] = encoded.ids[j], encoded.truncated[j]
    out = table.drop_columns([text_column]) if drop_text else table
    out = out.set_column(out.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
    out = out.set_column(out.schema.get_field_index("error_type"), "error_type", pa.array(types, pa.string()))
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
    return (
        parts.add_retries(out)
        .append_column("input_ids", ids_to_arrow(ids))
        .append_column("num_tokens", pa.array(lengths, pa.int32()))
        .append_column("truncated", pa.array(truncated & (lengths > 0)))
    )


def tokenize_parts(batch: pa.Table, **kwargs: Any) -> pa.Table:
    """``map_batches`` entry: each packed part tokenized (``tokenize_block``) and packed again."""
    return parts.pack_all([tokenize_block(t, **kwargs) for t in parts.unpack(batch)])
