"""Load: 200k synthetic docs through the embed job on the session's local Ray with a tiny model, memory bounded.

Measured while the job runs (a sampler thread in the driver): the driver's RSS (peak from the kernel's VmHWM, reset
just before the job) and the object store's use (the raylet's store stats, as ``ray memory --stats-only`` reads
them). Asserted: every id written exactly once, manifest totals equal to the input, the driver's peak RSS bounded
in absolute terms and in growth over the job, the object store's peak below its capacity, and no spill failure.
The numbers are printed (``pytest -s``) for the record.
"""

from __future__ import annotations

import os
import re
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import cli
from tests.pipeline_checks import read_output

N_DOCS = 200_000
N_SHARDS = 8
ROWS_PER_BLOCK = 2048
# Bounds for the driver process, which is pytest itself: torch, transformers, tokenizers and the earlier tests' state
# are in it before the job starts (measured: ~700 MB when this file runs alone, ~1.3 GB after the rest of the suite).
# The job streams, so the driver holds one small record per written part: its growth over the job measures ~0-30 MB.
DRIVER_PEAK_RSS_MAX_MB = 2048
DRIVER_RSS_GROWTH_MAX_MB = 256
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, qwen_tokenizer) -> str:
    """A very small random Qwen3 (hidden 32, 1 layer) with the real Qwen vocabulary: the load is in the pipeline."""
    from tests.qwen_fixtures import make_qwen3_dir

    return make_qwen3_dir(
        str(tmp_path_factory.mktemp("qwen3-tiny")),
        tokenizer=qwen_tokenizer,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=64,
    )


@pytest.fixture(scope="module")
def load_corpus(tmp_path_factory) -> str:
    """200k docs of a few words each (ids 0..N-1, shuffled within shards), in 8 Parquet shards."""
    root = tmp_path_factory.mktemp("load-in")
    rng = np.random.default_rng(0)
    per = N_DOCS // N_SHARDS
    for k in range(N_SHARDS):
        ids = rng.permutation(np.arange(k * per, (k + 1) * per, dtype=np.int64))
        picks = rng.integers(0, len(WORDS), size=(per, 3))
        texts = [f"{WORDS[a]} {WORDS[b]} {WORDS[c]} doc {i}" for (a, b, c), i in zip(picks.tolist(), ids.tolist())]
        pq.write_table(pa.table({"id": ids, "text": texts}), str(root / f"load-{k}.parquet"))
    return str(root)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    """Samples the driver's RSS and the object store's use (bytes used, capacity, spilled) until stopped."""

    def __init__(self, interval: float = 0.25):
        super().__init__(name="load-sampler", daemon=True)
        import ray
        from ray._private import internal_api

        node = next(n for n in ray.nodes() if n["Alive"])
        self._addr = (node["NodeManagerAddress"], node["NodeManagerPort"])
        self._reply = internal_api.get_memory_info_reply
        self.interval = interval
        self.stop_event = threading.Event()
        self.rss_peak_kb = 0
        self.store_peak = 0
        self.store_capacity = 0
        self.spilled_bytes = 0
        self.samples = 0
        self.errors: list[str] = []

    def store_stats(self):
        return self._reply(None, node_manager_address=self._addr[0], node_manager_port=self._addr[1]).store_stats

    def sample(self) -> None:
        self.rss_peak_kb = max(self.rss_peak_kb, _rss_kb("VmRSS"))
        try:
            s = self.store_stats()
        except Exception as e:  # a slow raylet answer must not kill the sampler; counted, then reported
            self.errors.append(repr(e))
            return
        self.store_peak = max(self.store_peak, s.object_store_bytes_used)
        self.store_capacity = max(self.store_capacity, s.object_store_bytes_avail)
        self.spilled_bytes = s.spilled_bytes_total
        self.samples += 1

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=30)
        self.sample()


def _raylet_log() -> str | None:
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    path = os.path.join(session, "logs", "raylet.out")
    return path if os.path.exists(path) else None


# A warning or error line of the raylet that mentions spilling, or any failed spill / full store / full disk.
SPILL_FAILURE = re.compile(
    r"^\[[^\]]* [EWF] \d+ \d+\].*(?i:spill)|(?i:fail\w* to (?:spill|send object spill)|spill\w* fail|ObjectStoreFull"
    r"|out ?of ?disk)"
)


def _expected_tokens(corpus: str, tokenizer) -> int:
    """Tokens the job must count, from the tokenizer alone: each text without special tokens, plus <|endoftext|>."""
    total = 0
    for name in sorted(os.listdir(corpus)):
        texts = pq.read_table(os.path.join(corpus, name), columns=["text"])["text"].to_pylist()
        total += sum(len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return total


def test_200k_docs_bounded_driver_memory_and_object_store(
    load_corpus, tiny_model_dir, qwen_tokenizer, ray_local, tmp_path, capsys
):
    out = str(tmp_path / "out")
    log = _raylet_log()
    # The spill-failure check reads this log: without it the check would pass having read nothing.
    assert log is not None, "raylet.out not found in the Ray session's logs: the spill-failure check cannot run"
    log_start = os.path.getsize(log)
    sampler = _Sampler()
    spilled_before = sampler.store_stats().spilled_bytes_total
    rss_before_kb = _rss_kb("VmRSS")
    hwm_reset = _reset_peak_rss()
    sampler.start()
    t0 = time.perf_counter()
    try:
        rc = cli.main(
            [
                "embed",
                "--input",
                load_corpus,
                "--output",
                out,
                "--model",
                tiny_model_dir,
                "--rows-per-block",
                str(ROWS_PER_BLOCK),
                "--part-rows",
                str(ROWS_PER_BLOCK),
                "-q",
            ]
        )
    finally:
        wall = time.perf_counter() - t0
        sampler.stop()
    peak_kb = max(sampler.rss_peak_kb, _rss_kb("VmHWM") if hwm_reset else 0)
    stdout, err = capsys.readouterr()
    assert rc == 0, err[-3000:]

    with open(log, errors="replace") as f:
        f.seek(log_start)
        new_log = f.read()
    spill_failures = [line for line in new_log.splitlines() if SPILL_FAILURE.search(line)]
    spilled = sampler.spilled_bytes - spilled_before

    mb = 1024.0
    print(
        f"\nload: {N_DOCS} docs in {N_SHARDS} shards, rows/block {ROWS_PER_BLOCK}: {wall:.1f}s wall, "
        f"{N_DOCS / wall:,.0f} docs/s; driver RSS {rss_before_kb / mb:.0f} MB before, peak {peak_kb / mb:.0f} MB "
        f"(+{(peak_kb - rss_before_kb) / mb:.0f} MB; VmHWM reset: {hwm_reset}); object store peak "
        f"{sampler.store_peak / 2**20:.1f} MiB of {sampler.store_capacity / 2**20:.0f} MiB, "
        f"{spilled / 2**20:.1f} MiB spilled, {len(spill_failures)} spill failures logged "
        f"({sampler.samples} samples, {len(sampler.errors)} failed)\n{stdout.strip()}"
    )

    # Exactly-once output and consistent totals.
    manifest, table = read_output(out)
    ids = table["id"].to_numpy()
    assert len(ids) == N_DOCS
    assert np.array_equal(np.sort(ids), np.arange(N_DOCS)), "every id must be written exactly once"
    tokens = _expected_tokens(load_corpus, qwen_tokenizer)
    assert tokens >= 6 * N_DOCS  # a few words each, plus <|endoftext|>
    assert manifest["totals"] == {
        "shards": N_SHARDS,
        "rows": N_DOCS,
        "errors": 0,
        "tokens": tokens,
        "files": len(manifest["files"]),
    }
    summary = f"{N_SHARDS} shards ({N_SHARDS} processed, 0 already committed), {N_DOCS} docs, {tokens} tokens"
    assert summary in stdout, stdout
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)

    # Bounded memory.
    assert sampler.samples > 0, sampler.errors[:3]
    assert peak_kb / mb < DRIVER_PEAK_RSS_MAX_MB
    assert (peak_kb - rss_before_kb) / mb < DRIVER_RSS_GROWTH_MAX_MB
    assert sampler.store_capacity > 0
    assert sampler.store_peak < sampler.store_capacity
    # No spill failure: the job succeeded, and the raylet logged no failed spill or full store while it ran.
    assert not spill_failures, spill_failures[:5]
