"""A lease on an output prefix: ``<out>/_lease.json`` keeps two jobs from writing one prefix at the same time.

The holder is (host, pid, job id). A driver thread renews ``heartbeat_at`` every ``heartbeat`` seconds; the lease is
live while ``now - heartbeat_at <= ttl``. A job that finds a live lease of another job is refused with the holder's
name; an expired lease (its driver died, or hangs) is taken over. On the holder's own host, a lease whose pid no
longer exists is expired at once (a SIGKILLed driver need not wait out the ttl).

Object stores without conditional writes give no compare-and-swap, so acquisition is write-then-verify: two jobs
starting within the same second could both pass the check; the later writer wins the re-read and the other stops.
The per-shard markers and deterministic part names keep the output exactly-once even then.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from operators import storage
from operators.errors import RayembedError

log = logging.getLogger("rayembed")

LEASE_FORMAT = "rayembed.lease/1"
DEFAULT_LEASE_TTL = 60.0
DEFAULT_LEASE_HEARTBEAT = 10.0


class LeaseHeldError(RayembedError):
    pass


def lease_url(output: str) -> str:
    return storage.join(output, "_lease.json")


def describe_holder(lease: dict[str, Any]) -> str:
    h = lease.get("holder", {})
    return f"job {h.get('job_id')} (pid {h.get('pid')} on {h.get('host')})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lease_state(lease: dict[str, Any] | None, now: float | None = None) -> str:
    """ "none", "live", "expired" (ttl passed without a heartbeat) or "dead" (holder pid gone on this host)."""
    if not lease:
        return "none"
    if lease.get("released_at"):
        return "released"
    now = time.time() if now is None else now
    h = lease.get("holder", {})
    if h.get("host") == socket.gethostname() and isinstance(h.get("pid"), int) and not _pid_alive(h["pid"]):
        return "dead"
    if now - float(lease.get("heartbeat_at", 0)) > float(lease.get("ttl_s", DEFAULT_LEASE_TTL)):
        return "expired"
    return "live"


@dataclass
class Lease:
    output: str
    ttl: float = DEFAULT_LEASE_TTL
    heartbeat: float = DEFAULT_LEASE_HEARTBEAT
    storage_options: dict[str, Any] | None = None
    info: dict[str, Any] | None = None  # extra fields recorded for `rayembed status` (the input, say)
    progress: Callable[[], dict[str, Any]] | None = None  # a running job's progress, written with each heartbeat

    def __post_init__(self) -> None:
        self.job_id = uuid.uuid4().hex[:12]
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": self.job_id}
        self.lost: str | None = None  # set by the heartbeat thread when another job took the lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.time()

    def _record(self) -> dict[str, Any]:
        return {
            "format": LEASE_FORMAT,
            "holder": self.holder,
            "started_at": self._started,
            "heartbeat_at": time.time(),
            "ttl_s": self.ttl,
            "heartbeat_s": self.heartbeat,
            **(self.info or {}),
            **({"progress": self.progress()} if self.progress is not None else {}),
        }

    def acquire(self) -> Lease:
        url = lease_url(self.output)
        current = storage.read_json(url, self.storage_options)
        state = lease_state(current)
        if state == "live" and current.get("holder", {}).get("job_id") != self.job_id:
            age = time.time() - float(current.get("heartbeat_at", 0))
            raise LeaseHeldError(
                f"output {self.output!r} is leased by {describe_holder(current)}, last heartbeat {age:.0f}s ago "
                f"(ttl {float(current.get('ttl_s', 0)):g}s); wait for it to finish, or for the lease to expire"
            )
        if state in ("expired", "dead"):
            log.warning("taking over the %s lease of %s", state, describe_holder(current))
        storage.write_json(url, self._record(), self.storage_options)
        mine = storage.read_json(url, self.storage_options)
        if not mine or mine.get("holder", {}).get("job_id") != self.job_id:
            raise LeaseHeldError(f"output {self.output!r} was leased concurrently by {describe_holder(mine or {})}")
        self._thread = threading.Thread(target=self._beat, name="rayembed-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        url = lease_url(self.output)
        while not self._stop.wait(self.heartbeat):
            try:
                current = storage.read_json(url, self.storage_options)
                if current and current.get("holder", {}).get("job_id") != self.job_id:
                    self.lost = f"the lease on {self.output!r} was taken by {describe_holder(current)}"
                    log.error("%s; this job stops", self.lost)
                    return
                storage.write_json(url, self._record(), self.storage_options)
            except Exception as e:  # a missed heartbeat is not fatal; the ttl covers several of them
                log.warning("lease heartbeat failed: %s", storage.describe_error(e))

    def check(self) -> None:
        if self.lost:
            raise LeaseHeldError(self.lost)

    def release(self, outcome: str = "succeeded") -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat + 5)
        if self.lost:
            return
        try:
            rec = self._record()
            rec.update(released_at=time.time(), outcome=outcome)
            storage.write_json(lease_url(self.output), rec, self.storage_options)
        except Exception as e:
            log.warning("could not release the lease: %s", storage.describe_error(e))

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release("succeeded" if exc_type is None else f"failed: {type(exc).__name__}")
