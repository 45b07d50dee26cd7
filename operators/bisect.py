"""Poison batches: when a call raises on a batch, halve it until only the rows that raise are left.

One row that breaks the tokenizer or the model then costs that row (quarantined with the exception), not the batch,
and a batch of n rows with p poison rows costs O(p log n) extra calls. The embedder's and the reranker's stages, and
the tokenize stage, all go through ``bisect_call``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

B = TypeVar("B")  # a batch: anything with a length that can be split
R = TypeVar("R")  # the result of a call on a batch


def bisect_call(
    fn: Callable[[B], R],
    batch: B,
    *,
    size: Callable[[B], int],
    split: Callable[[B, int], tuple[B, B]],
    merge: Callable[[R, R], R],
    fail_one: Callable[[B, Exception], R],
) -> R:
    """``fn(batch)``; on an exception, ``merge`` of the two halves' results, recursively, down to single rows,
    for which ``fail_one(row, exception)`` builds the result that marks the row as failed."""
    try:
        return fn(batch)
    except Exception as e:
        n = size(batch)
        if n <= 1:
            return fail_one(batch, e)
    left, right = split(batch, n // 2)
    kw = {"size": size, "split": split, "merge": merge, "fail_one": fail_one}
    return merge(bisect_call(fn, left, **kw), bisect_call(fn, right, **kw))


def describe(e: BaseException, what: str) -> str:
    """The quarantine message of a row that made ``what`` (the tokenizer, the model) raise."""
    return f"{what} failed: {type(e).__name__}: {str(e)[:300]}"
