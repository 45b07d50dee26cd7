"""Token-budget micro-batching over length-sorted rows, device/dtype defaults and OOM backoff."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
    truncated: int = 0
    budgets: list[int] = field(default_factory=list)

    @property
    def padding_efficiency(self) -> float:
        return self.tokens / self.padded_tokens if self.padded_tokens else 1.0


class MicroBatcher:
    """Runs ``forward(rows) -> tensor [B, ...]`` over length-sorted micro-batches and restores the input order.

    On OOM the budget halves, the same rows are re-planned and retried, and the smaller budget is kept.
    """

    def __init__(self, budget: int, stats: BatchStats | None = None):
        if budget < 1:
            raise ConfigError(f"--batch-tokens must be positive, got {budget}")
        self.budget = int(budget)
        self.stats = stats or BatchStats()
        hook = os.environ.get(OOM_HOOK_ENV)
        self._oom_above = int(hook) if hook else None

    def run(self, rows: Sequence[np.ndarray], forward: Callable[[list[np.ndarray]], torch.Tensor]) -> torch.Tensor:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        outputs: list[torch.Tensor | None] = [None] * len(rows)
        pending = [np.arange(len(rows))]  # groups of original indices still to compute
        while pending:
            group = pending.pop()
            for idx in plan_microbatches(lengths[group], self.budget):
                sel = group[idx]
                padded = len(sel) * int(lengths[sel].max())
                try:
                    if self._oom_above is not None and padded > self._oom_above:
                        raise torch.cuda.OutOfMemoryError(f"injected OOM at {padded} padded tokens")
                    out = forward([rows[i] for i in sel])
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
                self.stats.padded_tokens += padded
                for j, i in enumerate(sel):
                    outputs[i] = out[j]
        self.stats.rows += len(rows)
        self.stats.tokens += int(lengths.sum())
        if not rows:
            return torch.empty(0)
        return torch.stack(outputs)  # type: ignore[arg-type]
