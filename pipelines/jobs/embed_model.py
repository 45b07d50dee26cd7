"""The embed graph's model stage: the actor that holds a model replica and turns packed parts of token ids into
vectors (rows whose vector the parent version holds skip the model)."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators.bisect import bisect_call, describe
from pipelines import parts, telemetry

log = logging.getLogger("rayembed")


# ----------------------------------------------------------------------------------------------------------- embed


def _set_error(batch: pa.Table, message: str, kind: str) -> pa.Table:
    batch = batch.set_column(batch.schema.get_field_index("error"), "error", pa.array([message], pa.string()))
    return batch.set_column(batch.schema.get_field_index("error_type"), "error_type", pa.array([kind], pa.string()))


# The columns the model pass reads or writes; every other column of a part passes by it.
MODEL_COLUMNS = ("input_ids", "error", "error_type", "_reuse", "_vec", "_retries")


class EmbedStage:
    """The model actor: embeds the valid rows of tokenized parts and drops the ids before the parts move on.

    A call holds one packed part, or several small ones (the stage's ``batch_size`` in parts), whose rows the model
    sees in one length-sorted pass; each part leaves whole, for the writer to write as one file. When the model
    raises on a call, the call is bisected (operators/bisect.py) down to the rows that raise, quarantined as
    ModelError; one poison row costs one row. (An OOM reaches here only for a row that does not fit alone: the
    micro-batcher retries smaller batches itself.)
    """

    def __init__(self, *args: Any, threads: int | None = None, **embedder_kwargs: Any):
        import torch

        from operators.embedder import Embedder

        t0 = time.perf_counter()
        if threads:
            torch.set_num_threads(threads)
        self.embedder = Embedder(*args, **embedder_kwargs)
        e = self.embedder
        log.info(
            "embed actor ready in %.1fs: %s on %s/%s, %.1f MB of weights, %d torch threads",
            time.perf_counter() - t0,
            e.spec.source,
            e.device,
            e.dtype,
            e.model_bytes / 2**20,
            torch.get_num_threads(),
        )

    @property
    def stats(self):
        return self.embedder.stats

    def model_call(self, batch: pa.Table) -> pa.Table:
        return self.embedder(batch)

    def _fail_one(self, batch: pa.Table, e: Exception) -> pa.Table:
        log.warning("quarantining a row the model fails on: %s: %s", type(e).__name__, str(e)[:200])
        return self.embedder(_set_error(batch, describe(e, "model"), "ModelError"))  # an error row: no forward

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Packed parts in (or a plain table, as in the tests), the same parts out, each with its ``embedding``."""
        if parts.PACKED not in batch.column_names:
            return self.embed_table(batch)
        tables = parts.unpack(batch)
        if len(tables) == 1:
            return parts.pack(self.embed_table(tables[0]))
        # Several (small) parts per call: one model pass over all their rows, so one length sort pads less; the
        # model's columns are the same type in every part (the parts' ids and pass-through columns need not be).
        cols = [c for c in MODEL_COLUMNS if c in tables[0].column_names]
        joint = self.embed_table(pa.concat_tables([t.select(cols) for t in tables], promote_options="permissive"))
        out, start = [], 0
        for t in tables:
            piece, rest = joint.slice(start, len(t)), t.drop_columns(cols)
            start += len(t)
            for c in piece.column_names:
                rest = rest.append_column(c, piece[c])
            out.append(rest)
        return parts.pack_all(out)

    def embed_table(self, batch: pa.Table) -> pa.Table:
        """The rows of ``batch`` in their order, each with its vector: the model's, or the parent version's."""
        if "_reuse" in batch.column_names and pc.any(batch["_reuse"]).as_py():
            # Rows whose vector the parent version holds never reach the model: their ``_vec`` becomes the vector.
            mask = batch["_reuse"].combine_chunks().to_numpy(zero_copy_only=False)
            todo, done = np.flatnonzero(~mask), np.flatnonzero(mask)
            reused = reused_vectors(batch.take(done), self.embedder.dim, self.embedder.out_dtype)
            out = pa.concat_tables([self._embed(batch.take(todo)), reused]) if len(todo) else reused
            order = np.concatenate([todo, done])
            back = np.empty_like(order)
            back[order] = np.arange(len(order))
            out = out.take(back)
        else:
            out = self._embed(batch)
        return out.drop_columns(["_vec"]) if "_vec" in out.column_names else out

    def _embed(self, batch: pa.Table) -> pa.Table:
        t0, before = time.perf_counter(), (self.stats.rows, self.stats.tokens, self.stats.padded_tokens)
        out = bisect_call(
            self.model_call,
            batch,
            size=lambda t: t.num_rows,
            split=lambda t, i: (t.slice(0, i), t.slice(i)),
            merge=lambda a, b: pa.concat_tables([a, b]),
            fail_one=self._fail_one,
        )
        st = self.stats
        rows, tokens, slots = st.rows - before[0], st.tokens - before[1], st.padded_tokens - before[2]
        telemetry.model_call(time.perf_counter() - t0, rows=rows, tokens=tokens, slots=slots, stage="embed")
        return parts.add_retries(out.drop_columns(["input_ids"]))


def reused_vectors(batch: pa.Table, dim: int, dtype) -> pa.Table:
    """Reused rows as the model stage's output: ``_vec`` (the parent's vector bytes) as the ``embedding`` column."""
    from operators.embedder import vectors_to_arrow

    flat = np.frombuffer(b"".join(batch["_vec"].to_pylist()), dtype=dtype).reshape(len(batch), dim)
    out = parts.add_retries(batch.drop_columns(["input_ids"]))
    return out.append_column("embedding", vectors_to_arrow(flat, np.ones(len(batch), dtype=bool)))
