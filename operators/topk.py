"""Exact top-k by inner product over blocks of corpus vectors, and the merge of partial top-k lists.

The order is total and deterministic: score descending, then id ascending (ints numerically, strings
lexicographically). So the top-k of a corpus split into any number of blocks, merged in any order, equals the top-k
of the whole corpus computed at once, ties included.

Scores are float32 inner products (``queries @ vectors.T``); for unit vectors that is the cosine similarity. Two
scores are tied when the float32 values are equal. BLAS may sum a dot product in a different order for matrices of
different shapes, so two vectors that are only *mathematically* equal-scoring can land a last bit apart; ties are
decided on the computed values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from operators.errors import ConfigError, InvalidInputError

# Corpus rows scored per matmul: bounds the [queries, rows] score matrix a worker holds at once.
DEFAULT_CHUNK_ROWS = 8192
MAX_SCORES = 2**25  # float32 scores per chunk: 128 MiB


@dataclass
class TopK:
    """Per query, up to ``k`` (score, id) pairs in rank order: ``scores`` float32 [Q, m], ``ids`` [Q, m], m <= k."""

    scores: np.ndarray
    ids: np.ndarray

    @property
    def width(self) -> int:
        return int(self.scores.shape[1])

    @classmethod
    def empty(cls, num_queries: int, id_dtype=np.int64) -> TopK:
        return cls(np.zeros((num_queries, 0), dtype=np.float32), np.zeros((num_queries, 0), dtype=id_dtype))


def _as_ids(ids: Sequence | np.ndarray) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise InvalidInputError(f"ids must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == object:
        kinds = {type(x) for x in arr.tolist()}
        if len(kinds) > 1 or None.__class__ in kinds:
            raise InvalidInputError(f"ids must all be ints or all strings, got {sorted(k.__name__ for k in kinds)}")
        if kinds == {str}:
            arr = arr.astype(str)
        elif kinds and kinds <= {int}:
            arr = arr.astype(np.int64)
    return arr


def _rank_order(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Column order per row: score descending, then id ascending. ``scores`` and ``ids`` are [Q, m].

    One vectorised argsort by score; only runs of exactly equal scores (rare with real embeddings) are then
    re-sorted by id, so string ids cost nothing in the common case.
    """
    order = np.argsort(-scores, axis=1, kind="stable")
    if scores.shape[1] < 2:
        return order
    ranked = np.take_along_axis(scores, order, axis=1)
    tied = ranked[:, 1:] == ranked[:, :-1]
    for row in np.flatnonzero(tied.any(axis=1)):
        cols = order[row]
        t = tied[row]
        j, m = 0, len(cols)
        while j < m - 1:
            if not t[j]:
                j += 1
                continue
            end = j + 1
            while end < m - 1 and t[end]:
                end += 1
            run = cols[j : end + 1]  # columns j..end share one score
            cols[j : end + 1] = run[np.argsort(ids[row, run], kind="stable")]
            j = end + 1
    return order


def _select(scores: np.ndarray, ids: np.ndarray, k: int) -> TopK:
    """The best ``k`` columns per row of [Q, m] candidates, in rank order."""
    m = scores.shape[1]
    if m > k > 0:
        # Shrink to k columns per row with one argpartition. Only a row whose k-th score is tied with a score
        # outside the cut needs the ids to decide which tied columns stay: those rows are redone exactly.
        cols = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(scores, cols, axis=1).min(axis=1, keepdims=True)
        for row in np.flatnonzero((scores >= kth).sum(axis=1) > k):
            cand = np.flatnonzero(scores[row] >= kth[row, 0])
            order = _rank_order(scores[row, cand][None, :], ids[row, cand][None, :])[0]
            cols[row] = cand[order[:k]]
        scores = np.take_along_axis(scores, cols, axis=1)
        ids = np.take_along_axis(ids, cols, axis=1)
    order = _rank_order(scores, ids)[:, :k]
    return TopK(np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1))


def topk_block(
    queries: np.ndarray, vectors: np.ndarray, ids: Sequence | np.ndarray, k: int, chunk_rows: int | None = None
) -> TopK:
    """Exact top-``k`` of one block of corpus ``vectors`` [N, d] (with ``ids`` [N]) for every query [Q, d].

    Returns ``min(k, N)`` entries per query. Large blocks are scored ``chunk_rows`` rows at a time and merged; by
    default as many rows as keep the [Q, rows] float32 score matrix near 128 MiB.
    """
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    q = np.asarray(queries, dtype=np.float32)
    v = np.asarray(vectors)
    ids = _as_ids(ids)
    if q.ndim != 2 or v.ndim != 2:
        raise InvalidInputError(f"queries and vectors must be 2-D, got {q.shape} and {v.shape}")
    if len(v) != len(ids):
        raise InvalidInputError(f"{len(v)} vectors but {len(ids)} ids")
    if len(v) and q.shape[1] != v.shape[1]:
        raise InvalidInputError(f"query dim {q.shape[1]} != corpus vector dim {v.shape[1]}")
    if chunk_rows is None:
        chunk_rows = max(256, min(DEFAULT_CHUNK_ROWS, MAX_SCORES // max(1, len(q))))
    result = TopK.empty(len(q), ids.dtype)
    for start in range(0, len(v), max(1, chunk_rows)):
        chunk = v[start : start + chunk_rows].astype(np.float32, copy=False)
        scores = q @ chunk.T
        chunk_ids = np.broadcast_to(ids[start : start + len(chunk)], scores.shape)
        part = _select(scores, chunk_ids, k)
        result = part if result.width == 0 else merge_topk([result, part], k)
    return result


def merge_topk(partials: Iterable[TopK], k: int) -> TopK:
    """Merge partial top-k lists of the same queries (from disjoint corpus blocks) into one top-``k``."""
    parts = [p for p in partials if p is not None]
    if not parts:
        raise InvalidInputError("merge_topk needs at least one partial result")
    nq = {p.scores.shape[0] for p in parts}
    if len(nq) != 1:
        raise InvalidInputError(f"partial results cover different numbers of queries: {sorted(nq)}")
    parts = [p for p in parts if p.width] or parts[:1]
    if len(parts) == 1:
        return _select(parts[0].scores, parts[0].ids, k) if parts[0].width > k else parts[0]
    kinds = {p.ids.dtype.kind for p in parts}
    if len(kinds) > 1 and not kinds <= {"i", "u"}:
        raise InvalidInputError(f"cannot merge ids of different types ({sorted(str(p.ids.dtype) for p in parts)})")
    scores = np.concatenate([p.scores for p in parts], axis=1)
    ids = np.concatenate([p.ids for p in parts], axis=1)
    return _select(scores, ids, k)


__all__ = ["TopK", "merge_topk", "topk_block"]
