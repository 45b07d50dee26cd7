"""A running job's progress, for operators: rates, shards done of total and an ETA.

The record loop calls ``update`` with each part record and ``shard_done`` with each commit. The snapshot rides in
the lease record (pipelines/lease.py writes it with every heartbeat), so ``rayembed status`` reads it beside the
holder; when stdout is no terminal (``ray job submit``, a CronJob), one line a minute goes to the log instead of
progress bars.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

from operators.storage import Shard

log = logging.getLogger("rayembed")
LOG_EVERY_S = 60.0
LOG_EVERY_ENV = "RAYEMBED_PROGRESS_EVERY"  # seconds between progress log lines (default: 60 when stdout is no tty)


class Progress:
    def __init__(self, job: str, pending: list[Shard], total_shards: int, log_every: float | None = None):
        self.job = job
        self.t0 = time.time()
        self.total_shards = total_shards
        self.pending_shards = len(pending)
        self.pending_bytes = sum(s.size for s in pending)
        self.sizes = {s.stem: s.size for s in pending}
        self.done_shards = 0
        self.done_bytes = 0
        self.rows = self.tokens = self.errors = 0
        self._lock = threading.Lock()
        if log_every is None and os.environ.get(LOG_EVERY_ENV):
            log_every = float(os.environ[LOG_EVERY_ENV])
        if log_every is None and not sys.stdout.isatty():
            log_every = LOG_EVERY_S
        self.log_every = log_every
        self._last_log = self.t0

    def update(self, rec: dict[str, Any]) -> None:
        with self._lock:
            self.rows += int(rec.get("rows") or 0)
            self.tokens += int(rec.get("tokens") or 0)
            self.errors += int(rec.get("errors") or 0)
        if self.log_every is not None and time.time() - self._last_log >= self.log_every:
            self._last_log = time.time()
            log.info("%s", self.line())

    def shard_done(self, stem: str) -> None:
        with self._lock:
            self.done_shards += 1
            self.done_bytes += self.sizes.get(stem, 0)

    def line(self) -> str:
        return f"rayembed {self.job} progress: " + describe(self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            elapsed = max(time.time() - self.t0, 1e-9)
            frac = self.done_bytes / self.pending_bytes if self.pending_bytes else None
            if not frac and self.pending_shards:
                frac = self.done_shards / self.pending_shards
            eta = elapsed * (1 - frac) / frac if frac else None
            return {
                "job": self.job,
                "elapsed_s": round(elapsed, 1),
                "shards_done": self.done_shards,
                "shards_pending": self.pending_shards,
                "shards_total": self.total_shards,
                "rows": self.rows,
                "tokens": self.tokens,
                "quarantined": self.errors,
                "docs_per_s": round(self.rows / elapsed, 1),
                "tokens_per_s": round(self.tokens / elapsed, 1),
                "eta_s": None if eta is None else round(eta, 1),
                "updated_at": time.time(),
            }


def describe(p: dict[str, Any]) -> str:
    eta = "unknown" if p.get("eta_s") is None else f"{p['eta_s']:.0f}s"
    return (
        f"{p['shards_done']} of {p['shards_pending']} pending shards done ({p['shards_total']} in the input), "
        f"{p['rows']} docs, {p['docs_per_s']:,.1f} docs/s, {p['tokens_per_s']:,.0f} tokens/s, "
        f"{p['quarantined']} quarantined, ETA {eta}"
    )

