"""Token-budget micro-batching over length-sorted rows, device/dtype defaults and OOM backoff."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from operators.errors import ConfigError

# Padded tokens per forward pass. CPU: large batches buy nothing and cost memory. CUDA: enough work to fill an H100
# with the 0.6B model while staying far below its memory; the budget halves on OOM.
DEFAULT_BATCH_TOKENS = {"cpu": 8192, "cuda": 65536}
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# Test hook: raise an OOM for any forward above this many padded tokens, so backoff is testable on CPU.
OOM_HOOK_ENV = "RAYEMBED_TEST_OOM_ABOVE_TOKENS"


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available on this machine")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of float32, bfloat16, float16")
    return _DTYPES[dtype]


def plan_microbatches(lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """Row indices per micro-batch: longest first, each batch's padded size (rows x longest) within ``budget``.

    A row longer than the budget runs alone. Sorting is stable, so equal lengths keep their input order and the plan
    is deterministic.
    """
    if budget < 1:
        raise ConfigError(f"batch token budget must be positive, got {budget}")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches: list[np.ndarray] = []
    i, n = 0, len(order)
    while i < n:
        longest = max(int(lengths[order[i]]), 1)
        rows = max(1, budget // longest)
        batches.append(order[i : i + rows])
        i += rows
    return batches


def plan_packed(lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """Row indices per packed micro-batch: longest first, each batch's real tokens within ``budget`` (no padding).

    Sorting is not needed to avoid padding here; it keeps the plan deterministic and each forward's longest sequence
    (the attention kernel's work per sequence) similar across a batch. A row longer than the budget runs alone.
    """
    if budget < 1:
        raise ConfigError(f"batch token budget must be positive, got {budget}")
    lengths = np.maximum(np.asarray(lengths, dtype=np.int64), 1)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start, total = 0, 0
    for k, i in enumerate(order):
        if k > start and total + lengths[i] > budget:
            batches.append(order[start:k])
            start, total = k, 0
        total += int(lengths[i])
    if start < len(order):
        batches.append(order[start:])
    return batches


# A packed micro-batch that would waste at most this share on padding runs padded instead: at one length the padded
# SDPA path is ~10% faster than varlen attention (H200, 0.6B, torch 2.11), and sorting makes most batches near-uniform.
PACK_ABOVE_WASTE = 0.05


def runs_padded(lengths: np.ndarray) -> bool:
    """Whether a micro-batch of a packed plan is cheaper padded: its padding waste is at most PACK_ABOVE_WASTE."""
    return len(lengths) * int(lengths.max()) <= (1 + PACK_ABOVE_WASTE) * int(lengths.sum())


def budget_from_memory(
    free_bytes: int, bytes_per_token: float, *, fraction: float = 0.5, lo: int = 4096, hi: int = 131072
) -> int:
    """Token budget that keeps a forward's activations within ``fraction`` of the free device memory.

    ``bytes_per_token`` is the peak activation memory per padded token, measured by a warm-up forward. Half the free
    memory leaves room for allocator fragmentation and for other actors placed on the same GPU (fractional
    ``--num-gpus``); OOM backoff covers what the estimate misses. Above ~128k tokens a forward is already big enough to
    saturate the GPU, so larger budgets buy nothing but memory.
    """
    if bytes_per_token <= 0:
        return hi
    budget = int(free_bytes * fraction / bytes_per_token)
    return int(min(hi, max(lo, budget // 1024 * 1024)))


def pad_batch(rows: Sequence[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids [B, L] and lengths [B]; masks come from lengths, never from ``ids != pad`` (pad == EOS)."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    out = np.full((len(rows), int(lengths.max())), pad_id, dtype=np.int64)
    for j, r in enumerate(rows):
        out[j, : len(r)] = r
    return out, lengths


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


@dataclass
class BatchStats:
    rows: int = 0
    tokens: int = 0  # real tokens
    padded_tokens: int = 0  # tokens the model computed, padding included
    forwards: int = 0
    oom_retries: int = 0
    packed_forwards: int = 0  # forwards run padding-free
    truncated: int = 0
    budgets: list[int] = field(default_factory=list)

    @property
    def padding_efficiency(self) -> float:
        return self.tokens / self.padded_tokens if self.padded_tokens else 1.0


class MicroBatcher:
    """Runs ``forward(stage(rows)) -> tensor [B, ...]`` over length-sorted micro-batches, restoring the input order.

    ``packed``: micro-batches are cut by real tokens (padding-free packing) instead of rows x longest. ``stage``
    prepares a micro-batch's device inputs; the next micro-batch is staged right after the current forward is queued,
    so on CUDA its host work and host-to-device copy run while the GPU computes. On OOM the budget halves, the same
    rows are re-planned and retried, and the smaller budget is kept.
    """

    def __init__(self, budget: int, stats: BatchStats | None = None, *, packed: bool = False):
        if budget < 1:
            raise ConfigError(f"--batch-tokens must be positive, got {budget}")
        self.budget = int(budget)
        self.stats = stats or BatchStats()
        self.packed = packed
        # Test hook, bound once here and never checked in the loop: forwards above N tokens raise an OOM.
        hook = os.environ.get(OOM_HOOK_ENV)
        self._oom_above = int(hook) if hook else None
        self._call = _call if self._oom_above is None else _oom_above(self._oom_above)

    def _cost(self, lengths: np.ndarray) -> int:
        """Tokens the forward computes: real tokens when packed, rows x longest when padded."""
        if self.packed and not runs_padded(lengths):
            return int(lengths.sum())
        return len(lengths) * int(lengths.max())

    def run(
        self,
        rows: Sequence[np.ndarray],
        forward: Callable[[Any], torch.Tensor],
        stage: Callable[[list[np.ndarray]], Any] | None = None,
    ) -> torch.Tensor:
        stage = stage or _identity
        plan_fn = plan_packed if self.packed else plan_microbatches
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        outputs: list[torch.Tensor | None] = [None] * len(rows)
        pending = [np.arange(len(rows))]  # groups of original indices still to compute
        while pending:
            group = pending.pop()
            plan = plan_fn(lengths[group], self.budget)
            staged = None
            for k, idx in enumerate(plan):
                sel = group[idx]
                padded = self._cost(lengths[sel])
                try:
                    current = staged if staged is not None else stage([rows[i] for i in sel])
                    staged = None
                    out = self._call(forward, current, padded)
                    if k + 1 < len(plan):
                        staged = stage([rows[i] for i in group[plan[k + 1]]])
                except BaseException as e:
                    if not is_oom(e) or len(sel) == 1:
                        raise  # a single row that does not fit cannot be split further
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    self.budget = max(1, min(self.budget, padded) // 2)
                    self.stats.oom_retries += 1
                    self.stats.budgets.append(self.budget)
                    # Re-plan this micro-batch's rows, and those not yet run, under the smaller budget.
                    done = {int(i) for i in group if outputs[i] is not None}
                    pending.append(np.asarray([i for i in group if int(i) not in done], dtype=np.int64))
                    break
                self.stats.forwards += 1
                self.stats.packed_forwards += int(self.packed and not runs_padded(lengths[sel]))
                self.stats.padded_tokens += padded
                for j, i in enumerate(sel):
                    outputs[i] = out[j]
        self.stats.rows += len(rows)
        self.stats.tokens += int(lengths.sum())
        if not rows:
            return torch.empty(0)
        return torch.stack(outputs)  # type: ignore[arg-type]


def _call(forward: Callable[[Any], torch.Tensor], batch: Any, tokens: int) -> torch.Tensor:
    return forward(batch)


def _oom_above(limit: int) -> Callable[..., torch.Tensor]:
    def call(forward: Callable[[Any], torch.Tensor], batch: Any, tokens: int) -> torch.Tensor:
        if tokens > limit:
            raise torch.cuda.OutOfMemoryError(f"injected OOM at {tokens} padded tokens")
        return forward(batch)

    return call


def _identity(rows: list[np.ndarray]) -> list[np.ndarray]:
    return rows


class Stager:
    """Host-to-device staging of micro-batch inputs.

    On CUDA the host tensors are pinned and copied without blocking on a side stream; an event gates the compute
    stream, so the copy of micro-batch k+1 overlaps the forward of k. PyTorch's caching host allocator does not reuse a
    pinned block before the copy that reads it has finished. On CPU the tensors are used as they are.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.cuda)

    def to_device(self, *tensors: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], Any]:
        if not self.cuda:
            return tensors, None
        with torch.cuda.stream(self.stream):
            out = tuple(t.to(self.device, non_blocking=True) for t in tensors)
            event = torch.cuda.Event()
            event.record(self.stream)
        return out, event

    def ready(self, tensors: tuple[torch.Tensor, ...], event: Any) -> None:
        """Make the compute stream wait for the copy, and tell the allocator the tensors are used there."""
        if event is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for t in tensors:
            t.record_stream(current)
