"""Fault-injection hooks for the tests, in one module. Production code calls ``point(name)`` at a few named places
(never inside a per-row or per-micro-batch loop); with no ``RAYEMBED_TEST_*`` variable set it does nothing.

- ``RAYEMBED_TEST_KILL_AT=<name>``: the process exits hard (``os._exit(137)``, as a SIGKILL would leave it) when it
  reaches point ``<name>``. ``<name>:<flag file>`` fires once per flag file (the first process to create it).
- ``RAYEMBED_TEST_SLEEP_AT=<name>:<seconds>``: sleep there (a test needs a slow phase to act in).

The driver forwards every ``RAYEMBED_TEST_*`` variable to Ray workers (``forwarded_env``), so the same hooks reach
stages that run in other processes.
"""

from __future__ import annotations

import os
import time

PREFIX = "RAYEMBED_TEST_"
KILL_ENV = "RAYEMBED_TEST_KILL_AT"
SLEEP_ENV = "RAYEMBED_TEST_SLEEP_AT"


def forwarded_env() -> dict[str, str]:
    """The test variables of this process, for a Ray stage's ``runtime_env``."""
    return {k: v for k, v in os.environ.items() if k.startswith(PREFIX)}


def _claim(flag: str | None) -> bool:
    if not flag:
        return True
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def point(name: str) -> None:
    """A named place where a test may kill this process or slow it down."""
    kill = os.environ.get(KILL_ENV)
    if kill:
        target, _, flag = kill.partition(":")
        if target == name and _claim(flag or None):
            os._exit(137)
    sleep = os.environ.get(SLEEP_ENV)
    if sleep:
        target, _, seconds = sleep.rpartition(":")
        if target == name:
            time.sleep(float(seconds))


# The fault injections older tests use, by variable. Each is applied by ``wrap`` around a stage, from outside.
# A model actor exits hard after K calls: "K" fires in every actor instance, "K:/path/flag" only in the first one that
# creates the flag file (once per job, so the restarted actor finishes the job).
ACTOR_EXIT_ENV = "RAYEMBED_TEST_ACTOR_EXIT_AFTER"
# A model actor's model call raises on any batch holding this token id (a poison row; bisection isolates it).
POISON_TOKEN_ENV = "RAYEMBED_TEST_POISON_TOKEN"
# A data part of the shard with this stem raises half-way through its atomic write.
FAIL_WRITE_ENV = "RAYEMBED_TEST_FAIL_WRITE"
# The driver sleeps this many seconds after each shard commit (driver-kill tests need a slow job).
COMMIT_DELAY_ENV = "RAYEMBED_TEST_COMMIT_DELAY"
# Benchmarks: each model actor appends "<ready> <pid> <process start> <__init__ start>" (Unix times) to this file once
# its model is loaded. The runner forwards it to model actors only (pipelines/jobs/embed.py).
READY_FILE_ENV = "RAYEMBED_BENCH_READY_FILE"


def after_commit() -> None:
    delay = float(os.environ.get(COMMIT_DELAY_ENV) or 0)
    if delay:
        time.sleep(delay)


def _holds_token(batch, token: int) -> bool:
    import numpy as np

    if hasattr(batch, "column_names"):  # a tokenized Arrow block
        if "input_ids" not in batch.column_names:
            return False
        ids = batch["input_ids"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return bool((ids == token).any())
    return any(bool((np.asarray(x) == token).any()) for x in batch)  # a list of token-id rows


def _process_start() -> float:
    """This process's start as a Unix time (Linux; 0 elsewhere), for the start-up breakdown of the ready file."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0


def _hooked_actor(cls: type) -> type:
    class Hooked(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            t0, init_start = time.perf_counter(), time.time()
            super().__init__(*args, **kwargs)
            exit_after, _, flag = (os.environ.get(ACTOR_EXIT_ENV) or "").partition(":")
            self._hook_exit = (int(exit_after), flag or None) if exit_after else None
            self._hook_calls = 0
            poison = os.environ.get(POISON_TOKEN_ENV)
            self._hook_poison = int(poison) if poison else None
            ready = os.environ.get(READY_FILE_ENV)
            if ready:
                now = init_start + (time.perf_counter() - t0)
                with open(ready, "a") as f:
                    f.write(f"{now:.6f} {os.getpid()} {_process_start():.6f} {init_start:.6f}\n")

        def __call__(self, batch):
            out = super().__call__(batch)
            self._hook_calls += 1
            if self._hook_exit and self._hook_calls >= self._hook_exit[0] and _claim(self._hook_exit[1]):
                os._exit(1)
            return out

        def model_call(self, batch):
            if self._hook_poison is not None and _holds_token(batch, self._hook_poison):
                raise RuntimeError(f"test hook {POISON_TOKEN_ENV}: poison token in the batch")
            return super().model_call(batch)

    Hooked.__name__ = Hooked.__qualname__ = cls.__name__
    return Hooked


def _hooked_task(fn):
    def hooked(batch, **kwargs):
        stem = os.environ.get(FAIL_WRITE_ENV)
        if stem:
            _fail_writes_of(stem)
        return fn(batch, **kwargs)

    hooked.__name__ = hooked.__qualname__ = getattr(fn, "__name__", "stage")
    return hooked


def _fail_writes_of(stem: str) -> None:
    """Make this process's part writes of ``stem`` fail half-way through their atomic write."""
    from operators import storage
    from pipelines import parts

    if getattr(parts.write_parquet, "_hooked", False):
        return
    original = parts.write_parquet

    def write_parquet(table, url, storage_options):
        if "/data/" in url.replace(os.sep, "/") and parts.part_pattern(stem).search(url):
            import io

            import pyarrow.parquet as pq

            buf = io.BytesIO()
            pq.write_table(table, buf)
            data = buf.getvalue()
            with storage.atomic_write(url, storage_options) as f:
                f.write(data[: len(data) // 2])
                raise OSError(f"test hook {FAIL_WRITE_ENV}: write of {url} failed half-way")
        return original(table, url, storage_options)

    write_parquet._hooked = True  # type: ignore[attr-defined]
    parts.write_parquet = write_parquet


def wrap(fn):
    """A stage with this process's test hooks around it (the runner calls this only when a hook is set)."""
    return _hooked_actor(fn) if isinstance(fn, type) else _hooked_task(fn)
