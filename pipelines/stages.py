"""The per-block functions of the embed graph: read a shard, tokenize, embed, write parts.

Every block carries ``_shard`` (the shard's stem), ``_offset`` (row number in the shard) and ``error`` /
``error_type`` (null for good rows), so a bad row travels to the writer and is quarantined instead of lost.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from operators import storage
from operators.embedder import Embedder
from operators.loading import inspect_model_dir, load_tokenizer, resolve_model_dir
from operators.storage import Shard
from operators.tokenization import Encoded, TextEncoder, ids_to_arrow, text_error

log = logging.getLogger("rayembed")

ERROR_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("shard", pa.string()),
        ("row_offset", pa.int64()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)
# Test hooks (fault injection). The driver forwards every RAYEMBED_TEST_* variable to the Ray stages.
# An embed actor exits hard after K batches: "K" fires in every actor instance, "K:/path/flag" only in the first
# one that creates the flag file (once per job, so the restarted actor finishes the job).
ACTOR_EXIT_ENV = "RAYEMBED_TEST_ACTOR_EXIT_AFTER"
# Test hook: the model actor's forward raises on any micro-batch holding this token id (a poison row).
POISON_TOKEN_ENV = "RAYEMBED_TEST_POISON_TOKEN"
# A data part of a shard whose stem equals this value raises half-way through its atomic write.
FAIL_WRITE_ENV = "RAYEMBED_TEST_FAIL_WRITE"
# Each embed actor appends one line to this file once its model is loaded (benchmarks: the start-up breakdown). The
# driver forwards it to the embed actors alone, so the other stages keep Ray's pre-started workers as in a real job.
READY_FILE_ENV = "RAYEMBED_BENCH_READY_FILE"


def part_name(stem: str, first_offset: int) -> str:
    return f"{stem}-{first_offset:012d}.parquet"


def part_pattern(stem: str) -> re.Pattern[str]:
    """Matches exactly the part files of ``stem`` (not those of a stem that merely starts with it)."""
    return re.compile(re.escape(stem) + r"-\d{12}\.parquet$")


# ------------------------------------------------------------------------------------------------------------ read


def _error_row(offset: int, err_type: str, message: str) -> dict[str, Any]:
    return {"_offset": offset, "error": message, "error_type": err_type}


def _table(rows: list[dict[str, Any]], stem: str, columns: list[str], shard_rows: int) -> pa.Table:
    data: dict[str, Any] = {"_shard": pa.array([stem] * len(rows), pa.string())}
    data["_offset"] = pa.array([r["_offset"] for r in rows], pa.int64())
    data["_shard_rows"] = pa.array([shard_rows] * len(rows), pa.int64())
    for c in columns:
        values = [r.get(c) for r in rows]
        try:
            data[c] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # Mixed JSON types in one column (ints and strings): keep them as JSON text rather than lose rows.
            data[c] = pa.array([None if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in values])
    data["error"] = pa.array([r.get("error") for r in rows], pa.string())
    data["error_type"] = pa.array([r.get("error_type") for r in rows], pa.string())
    return pa.table(data)


def _jsonl_rows(f, columns: list[str], id_column: str, text_column: str) -> Iterator[dict[str, Any]]:
    for offset, raw in enumerate(f):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield _error_row(offset, "InvalidUTF8", f"line is not valid UTF-8 ({e.reason} at byte {e.start})")
            continue
        if not line.strip():
            yield _error_row(offset, "EmptyLine", "blank line")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield _error_row(offset, "MalformedJSON", f"malformed JSON: {e.msg} at column {e.colno}")
            continue
        if not isinstance(obj, dict):
            yield _error_row(offset, "MalformedJSON", f"line is a JSON {type(obj).__name__}, not an object")
            continue
        if obj.get(id_column) is None:
            yield _error_row(offset, "MissingId", f"line has no {id_column!r} value")
            continue
        row = {c: obj.get(c) for c in columns}
        row["_offset"] = offset
        err = text_error(row[text_column])
        if err is not None:
            # Judge the text before Arrow sees it: a mixed-type column would otherwise coerce 5 into "5".
            row.update(error=err, error_type="InvalidText")
            row[text_column] = None
        yield row


class InvalidColumn(TypeError):
    """A Parquet shard whose text column is not a string column: one shard-level record, not a crash."""


def _parquet_rows(f, columns: list[str], text_column: str, rows_per_block: int) -> Iterator[pa.Table]:
    pf = pq.ParquetFile(f)
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise KeyError(f"column(s) {missing} not in shard (has {pf.schema_arrow.names})")
    text_type = pf.schema_arrow.field(text_column).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type) or pa.types.is_null(text_type)):
        # Its blocks would not combine with other shards' string blocks in Ray Data: the whole job would fail.
        raise InvalidColumn(f"column {text_column!r} is {text_type}, not a string")
    yield from (pa.Table.from_batches([b]) for b in pf.iter_batches(batch_size=rows_per_block, columns=columns))


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
    pending: pa.Table | None = None
    buf: list[dict[str, Any]] = []  # JSONL rows read but not yet in a block

    def stamp(t: pa.Table, total: int) -> pa.Table:
        return t.set_column(
            t.schema.get_field_index("_shard_rows"), "_shard_rows", pa.array([total] * len(t), pa.int64())
        )

    def flush_last(total: int) -> Iterator[pa.Table]:
        if pending is not None:
            yield stamp(pending, total)

    try:
        with storage.open_input(shard, storage_options) as f:
            if shard.fmt == "parquet":
                for t in _parquet_rows(f, columns, text_column, rows_per_block):
                    n = len(t)
                    t = t.select(columns)
                    block = pa.table(
                        {
                            "_shard": pa.array([shard.stem] * n, pa.string()),
                            "_offset": pa.array(np.arange(done, done + n), pa.int64()),
                            "_shard_rows": pa.array([-1] * n, pa.int64()),
                            **{c: t[c] for c in columns},
                            "error": pa.nulls(n, pa.string()),
                            "error_type": pa.nulls(n, pa.string()),
                        }
                    )
                    if pending is not None:
                        yield pending
                    pending, done = block, done + n
            else:
                for row in _jsonl_rows(f, columns, id_column, text_column):
                    buf.append(row)
                    if len(buf) >= rows_per_block:
                        if pending is not None:
                            yield pending
                        pending, done = _table(buf, shard.stem, columns, -1), done + len(buf)
                        buf = []
                if buf:
                    if pending is not None:
                        yield pending
                    pending, done = _table(buf, shard.stem, columns, -1), done + len(buf)
                    buf = []
    except Exception as e:
        if buf:  # the lines read before the stream broke are good rows: keep them
            if pending is not None:
                yield pending
            pending, done = _table(buf, shard.stem, columns, -1), done + len(buf)
        yield from flush_last(-1)
        kinds = {KeyError: "MissingColumn", InvalidColumn: "InvalidColumn"}
        kind = next((k for t, k in kinds.items() if isinstance(e, t)), "CorruptShard")
        msg = f"shard unreadable after {done} rows: {storage.describe_error(e)}"
        yield _table([{"_offset": done, "error": msg, "error_type": kind}], shard.stem, columns, done + 1)
        return
    # An empty shard yields nothing; the driver commits it with zero rows once the whole run has succeeded.
    yield from flush_last(done)


def _add_retries(table: pa.Table) -> pa.Table:
    """Carry this process's storage retries (since the last call) on the block's first row to the driver."""
    n = storage.take_retries()
    if "_retries" not in table.column_names:
        return table.append_column("_retries", pa.array([n] + [0] * (len(table) - 1), pa.int64()))
    if n and len(table):
        vals = table["_retries"].to_pylist()
        vals[0] += n
        table = table.set_column(table.schema.get_field_index("_retries"), "_retries", pa.array(vals, pa.int64()))
    return table


def shard_items(shards: list[Shard]) -> list[dict[str, Any]]:
    """The rows of the dataset that drives the read stage: one per shard, as ``read_shards`` expects them."""
    return [
        {
            "url": s.url,
            "stem": s.stem,
            "fmt": s.fmt,
            "compression": s.compression or "",
            "size": s.size,
            "version": s.version,
        }
        for s in shards
    ]


def shard_from_item(batch: dict[str, np.ndarray], i: int) -> Shard:
    """Row ``i`` of a ``shard_items`` batch back as a Shard."""
    return Shard(
        url=str(batch["url"][i]),
        stem=str(batch["stem"][i]),
        fmt=str(batch["fmt"][i]),
        compression=batch["compression"][i] or None,
        size=int(batch["size"][i]),
        version=str(batch["version"][i]),
    )


def read_shards(batch: dict[str, np.ndarray], **kwargs: Any) -> Iterator[pa.Table]:
    """``map_batches`` entry: one row per shard in, blocks of rows out (streamed, never a whole shard in memory)."""
    for block in _read_shards(batch, **kwargs):
        yield _add_retries(block)


def _read_shards(batch: dict[str, np.ndarray], **kwargs: Any) -> Iterator[pa.Table]:
    for i in range(len(batch["url"])):
        shard = shard_from_item(batch, i)
        yield from read_shard(shard, **kwargs)


# -------------------------------------------------------------------------------------------------------- tokenize

_ENCODERS: dict[tuple, TextEncoder] = {}


def _encoder(
    model: str, revision: str | None, max_length: int, instruction: str | None, storage_options: dict[str, Any] | None
) -> TextEncoder:
    # One tokenizer per worker process: Ray reuses workers across tasks, so the load happens once, not per block.
    key = (model, revision, max_length, instruction)
    if key not in _ENCODERS:
        path = resolve_model_dir(model, revision=revision, storage_options=storage_options, metadata_only=True)
        spec = inspect_model_dir(path, source=model, require_weights=False)
        _ENCODERS[key] = TextEncoder(load_tokenizer(spec), spec, max_length=max_length, instruction=instruction)
    return _ENCODERS[key]


def encode_bisecting(enc: TextEncoder, texts: list[Any]) -> tuple[Encoded, set[int]]:
    """``enc.encode`` that survives a poison row: when the tokenizer raises, the batch is halved until only the rows
    that raise are left; those get an error (their indices are returned) and every other row is encoded."""
    try:
        return enc.encode(texts), set()
    except Exception as e:
        if len(texts) == 1:
            err = f"tokenizer failed: {type(e).__name__}: {str(e)[:300]}"
            return Encoded(ids=[np.zeros(0, dtype=np.int32)], truncated=np.zeros(1, dtype=bool), errors=[err]), {0}
    mid = len(texts) // 2
    (a, pa_), (b, pb) = encode_bisecting(enc, texts[:mid]), encode_bisecting(enc, texts[mid:])
    merged = Encoded(
        ids=a.ids + b.ids, truncated=np.concatenate([a.truncated, b.truncated]), errors=a.errors + b.errors
    )
    return merged, pa_ | {mid + i for i in pb}


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
    prior = table["error"].to_pylist()
    encoded, poison = encode_bisecting(enc, [t if p is None else "" for t, p in zip(texts, prior)])
    errors, types = table["error"].to_pylist(), table["error_type"].to_pylist()
    for i, err in enumerate(encoded.errors):
        if err is not None and errors[i] is None:
            errors[i], types[i] = err, "TokenizerError" if i in poison else "InvalidText"
    ids = [x if e is None else x[:0] for x, e in zip(encoded.ids, errors)]
    out = table.drop_columns([text_column]) if drop_text else table
    out = out.set_column(out.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
    out = out.set_column(out.schema.get_field_index("error_type"), "error_type", pa.array(types, pa.string()))
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
    return (
        _add_retries(out)
        .append_column("input_ids", ids_to_arrow(ids))
        .append_column("num_tokens", pa.array(lengths, pa.int32()))
        .append_column("truncated", pa.array(encoded.truncated & (lengths > 0)))
    )


# ----------------------------------------------------------------------------------------------------------- embed


def _process_start() -> float:
    """This process's start as a Unix time (Linux; 0 elsewhere), for the start-up breakdown of the ready hook."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0


class EmbedStage(Embedder):
    """The model actor: embeds the valid rows of a tokenized block and drops the ids before the block moves on.

    ``threads`` sets torch's intra-op threads (Ray sets OMP_NUM_THREADS to the actor's whole logical CPUs, 1 by
    default). A call may hold many read blocks (the embed stage's ``batch_size``: the length sort pads less); the
    writer cuts them back into parts of at most ``rows_per_block`` rows.
    """

    def __init__(self, *args: Any, threads: int | None = None, **kwargs: Any):
        t0 = time.perf_counter()
        if threads:
            torch.set_num_threads(threads)
        super().__init__(*args, **kwargs)
        self._batches = 0
        exit_after, _, flag = (os.environ.get(ACTOR_EXIT_ENV) or "").partition(":")
        self._exit_after = int(exit_after) if exit_after else None
        self._exit_flag = flag or None
        poison = os.environ.get(POISON_TOKEN_ENV)
        self._poison_token = int(poison) if poison else None
        log.info(
            "embed actor ready in %.1fs: %s on %s/%s, %.1f MB of weights, %d torch threads",
            time.perf_counter() - t0,
            self.spec.source,
            self.device,
            self.dtype,
            self.model_bytes / 2**20,
            torch.get_num_threads(),
        )
        ready = os.environ.get(READY_FILE_ENV)
        if ready:
            # <ready> <pid> <process start> <__init__ start>, Unix times: process start to __init__ is the worker's
            # own start plus the imports; __init__ to ready loads the tokenizer and the model.
            now = time.time()
            init_start = now - (time.perf_counter() - t0)
            with open(ready, "a") as f:
                f.write(f"{now:.6f} {os.getpid()} {_process_start():.6f} {init_start:.6f}\n")

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = _add_retries(self._embed_bisecting(batch).drop_columns(["input_ids"]))
        self._batches += 1
        if self._exit_after is not None and self._batches >= self._exit_after and self._claim_exit():
            log.warning("test hook %s: embed actor exits now", ACTOR_EXIT_ENV)
            os._exit(1)
        return out

    def _embed_bisecting(self, batch: pa.Table) -> pa.Table:
        """Embed; when the model raises on a batch, halve it until only the rows that raise are left and quarantine
        those as ModelError, so one poison row costs one row. (An OOM reaches here only for a row that does not fit
        alone: the micro-batcher retries smaller batches itself.) A failure of every row, a broken device say, ends
        above --max-error-ratio and fails the job with the counts."""
        try:
            return super().__call__(batch)
        except Exception as e:
            if batch.num_rows == 1:
                log.warning("quarantining a row the model fails on: %s: %s", type(e).__name__, str(e)[:200])
                err = f"model failed: {type(e).__name__}: {str(e)[:300]}"
                batch = batch.set_column(batch.schema.get_field_index("error"), "error", pa.array([err], pa.string()))
                i = batch.schema.get_field_index("error_type")
                return super().__call__(batch.set_column(i, "error_type", pa.array(["ModelError"], pa.string())))
        mid = batch.num_rows // 2
        return pa.concat_tables([self._embed_bisecting(batch.slice(0, mid)), self._embed_bisecting(batch.slice(mid))])

    def _forward(self, staged: dict[str, Any]) -> Any:
        if self._poison_token is not None and bool((staged["tensors"][0] == self._poison_token).any()):
            raise RuntimeError(f"test hook {POISON_TOKEN_ENV}: poison token in the batch")
        return super()._forward(staged)

    def _claim_exit(self) -> bool:
        if self._exit_flag is None:
            return True
        try:
            os.close(os.open(self._exit_flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            self._exit_after = None
            return False
        return True


# ----------------------------------------------------------------------------------------------------------- write


def write_parts(
    table: pa.Table,
    *,
    output: str,
    id_column: str,
    passthrough: tuple[str, ...],
    metadata: dict[str, str],
    storage_options: dict[str, Any] | None = None,
    rows_per_part: int | None = None,
) -> pa.Table:
    """Write each shard's rows of this block as immutable parts of at most ``rows_per_part`` rows (None: one part),
    named by the shard and the part's first row offset, plus a quarantine part for each part's bad rows. A block from
    the model stage may hold several read blocks of a shard (or rows of several shards). Returns one small record per
    part for the driver's commit."""
    records = []
    retries = storage.take_retries()
    if "_retries" in table.column_names:
        retries += int(pc.sum(table["_retries"]).as_py() or 0)
    kv = {k.encode(): v.encode() for k, v in metadata.items()}
    for stem in pc.unique(table["_shard"]).to_pylist():
        rows = table.filter(pc.equal(table["_shard"], stem)).sort_by("_offset")
        step = rows_per_part or len(rows)
        for start in range(0, len(rows), step):
            sub = rows.slice(start, step)
            records.append(_write_part(sub, stem, output, id_column, passthrough, kv, storage_options))
    if records:
        records[0]["retries"] = retries
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)


def _write_part(
    sub: pa.Table,
    stem: str,
    output: str,
    id_column: str,
    passthrough: tuple[str, ...],
    kv: dict[bytes, bytes],
    storage_options: dict[str, Any] | None,
) -> dict[str, Any]:
    first = int(sub["_offset"][0].as_py())
    bad_mask = pc.is_valid(sub["error"])
    good, bad = sub.filter(pc.invert(bad_mask)), sub.filter(bad_mask)
    rec = {
        "shard": stem,
        "part": first,
        "file": None,
        "rows": len(good),
        "errors": len(bad),
        "errors_file": None,
        "tokens": int(pc.sum(good["num_tokens"]).as_py() or 0) if len(good) else 0,
        "truncated": int(pc.sum(good["truncated"].cast(pa.int64())).as_py() or 0) if len(good) else 0,
        "shard_rows": int(pc.max(sub["_shard_rows"]).as_py()),
        "retries": 0,
    }
    if len(good):
        data = pa.table({"id": good[id_column], "embedding": good["embedding"], **{c: good[c] for c in passthrough}})
        data = data.replace_schema_metadata({**(data.schema.metadata or {}), **kv})
        rel = f"data/{part_name(stem, first)}"
        _write_parquet(data, storage.join(output, rel), storage_options)
        rec["file"] = rel
    if len(bad):
        ids = bad[id_column] if id_column in bad.column_names else pa.nulls(len(bad))
        errs = pa.table(
            {
                "id": pa.array([None if v is None else str(v) for v in ids.to_pylist()], pa.string()),
                "shard": pa.array([stem] * len(bad), pa.string()),
                "row_offset": bad["_offset"],
                "error_type": bad["error_type"],
                "message": bad["error"],
            },
            schema=ERROR_SCHEMA,
        )
        rel = f"_errors/{part_name(stem, first)}"
        _write_parquet(errs, storage.join(output, rel), storage_options)
        rec["errors_file"] = rel
    return rec


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
        ("retries", pa.int64()),
    ]
)


def _write_parquet(table: pa.Table, url: str, storage_options: dict[str, Any] | None) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()
    fail = os.environ.get(FAIL_WRITE_ENV)
    if fail and "/data/" in url.replace(os.sep, "/") and part_pattern(fail).search(url):
        with storage.atomic_write(url, storage_options) as f:
            f.write(data[: len(data) // 2])
            raise OSError(f"test hook {FAIL_WRITE_ENV}: write of {url} failed half-way")
    storage.write_bytes(url, data, storage_options)
