"""The driver's side of a big backfill, against moto: plan time, storage requests per shard commit, driver memory and
manifest size for N shards, extrapolated to 100k shards and a billion documents.

No model and no Ray: the fake stage is what the workers leave behind (N tiny input shards, P tiny parts per shard,
one part record each). The driver then does what pipelines/runner.py does with them: ``storage.list_shards`` and
``commit.load_markers`` + ``commit.plan`` (the first run's plan), one ``commit.ShardProgress`` per pending shard fed
with its records, ``commit.commit_shard`` on a pool of ``runner.COMMIT_THREADS`` threads as each shard completes,
then ``commit.write_manifest``; and the rerun's plan (list N inputs, read N markers: all done).

moto runs in a child process that counts every request it serves, so the driver's RSS and CPU are its own; the
child seeds objects straight into moto's backend (the workers' writes are not the driver's cost). Times on moto are
not S3 times; requests, bytes and driver memory carry over, and the driver CPU per commit bounds what a driver can
keep up with.

    python benchmarks/bench_scale.py                    # 20,000 shards
    python benchmarks/bench_scale.py --shards 2000      # a quick run
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import multiprocessing as mp
import os
import resource
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from operators import storage  # noqa: E402
from pipelines import commit, parts, runner  # noqa: E402
from pipelines.config import DEFAULT_PART_BYTES, PART_ROW_OVERHEAD  # noqa: E402

KEY = "0123456789abcdef"
CREDS = {"key": "testing", "secret": "testing"}
# What an embed job's manifest records besides the shards (sizes as in a real one: a few hundred bytes).
CONFIG = {
    "model": "Qwen/Qwen3-Embedding-0.6B",
    "dim": 1024,
    "max_length": 8192,
    "output_dtype": "float32",
    "instruction": None,
    "id_column": "id",
    "text_column": "text",
    "rows_per_block": 1024,
}
MODEL = {"id": "Qwen/Qwen3-Embedding-0.6B", "revision": "c54f2e6e80b2d7b7de06f51cec4959f6b3e03418", "hidden": 1024}


# ------------------------------------------------------------------------------------- the store (child process)


def _index_prefix_listings() -> None:
    """moto answers a prefix listing by scanning every key of the bucket (70 ms per LIST at 40k keys on this
    machine), where S3 seeks its index: with 20k shards the scan, not the driver, would be the benchmark. Keep the
    key names of each bucket sorted, and hand moto's own listing code only the keys under the prefix."""
    import bisect

    from moto.s3.models import S3Backend

    names: dict[str, list[str]] = collections.defaultdict(list)
    put, list_objects = S3Backend.put_object, S3Backend.list_objects

    def put_object(self, bucket_name, key_name, value, *a, **kw):
        key = put(self, bucket_name, key_name, value, *a, **kw)
        index = names[bucket_name]
        i = bisect.bisect_left(index, key_name)
        if i == len(index) or index[i] != key_name:
            index.insert(i, key_name)
        return key

    class View:  # all that list_objects reads of a bucket: its keys
        def __init__(self, keys: dict[str, Any]):
            self.keys = keys

    def indexed_list_objects(self, bucket, prefix, delimiter, marker, max_keys):
        if not prefix:
            return list_objects(self, bucket, prefix, delimiter, marker, max_keys)
        index = names[bucket.name]
        lo, hi = bisect.bisect_left(index, prefix), bisect.bisect_left(index, prefix + "\U0010ffff")
        keys = {n: bucket.keys[n] for n in index[lo:hi] if n in bucket.keys}  # deleted keys drop out here
        return list_objects(self, View(keys), prefix, delimiter, marker, max_keys)

    S3Backend.put_object, S3Backend.list_objects = put_object, indexed_list_objects


def _store_main(conn: Any, index: bool) -> None:
    """moto, counting every request it serves; answers ("bucket", name), ("seed", bucket, key format, n, size),
    ("counts",) (then resets them) and ("stop",). Counted in moto's WSGI app rather than at tests/s3_proxy.py: the
    proxy's extra hop (a new upstream connection per request) would double the store's CPU on 2 cores."""
    import threading

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    if index:
        _index_prefix_listings()
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    kinds: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def counted(environ: dict[str, Any], start_response: Any) -> Any:
        with lock:
            kinds[_kind(environ["REQUEST_METHOD"], environ.get("QUERY_STRING", ""))] += 1
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, counted, True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    conn.send(f"http://127.0.0.1:{server.server_address[1]}")
    while True:
        cmd, *args = conn.recv()
        if cmd == "bucket":
            backend.create_bucket(args[0], "us-east-1")
        elif cmd == "seed":
            bucket, fmt, n, size = args
            for i in range(n):
                backend.put_object(bucket, fmt.format(i), b"x" * size)
        elif cmd == "counts":
            with lock:
                conn.send(dict(kinds))
                kinds.clear()
            continue
        elif cmd == "stop":
            server.shutdown()
            conn.send("ok")
            return
        conn.send("ok")


def _kind(method: str, query: str) -> str:
    if method == "GET" and "list-type=2" in query:
        return "LIST"
    if method == "POST" or "uploadId=" in query:
        return "MULTIPART"
    return method


class Store:
    def __init__(self, index: bool = True) -> None:
        self.conn, child = mp.get_context("spawn").Pipe()
        self.proc = mp.get_context("spawn").Process(target=_store_main, args=(child, index), daemon=True)
        self.proc.start()
        self.endpoint = self.conn.recv()

    def call(self, *cmd: Any) -> Any:
        self.conn.send(cmd)
        return self.conn.recv()

    def counts(self) -> dict[str, int]:
        return self.call("counts")

    def stop(self) -> None:
        if self.proc.is_alive():
            self.call("stop")
        self.proc.join(10)


# ------------------------------------------------------------------------------------------------ the driver


def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _fmt(kinds: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "none"


def _plan(inputs: str, out: str, so: dict[str, Any]) -> tuple[list, list, dict, dict[str, float]]:
    t0, c0 = time.perf_counter(), _cpu_s()
    shards = storage.list_shards(inputs, so)
    t1 = time.perf_counter()
    markers = commit.load_markers(out, so)
    t2 = time.perf_counter()
    pending, done = commit.plan(shards, markers, KEY)
    times = {"list": t1 - t0, "markers": t2 - t1, "total": time.perf_counter() - t0, "cpu": _cpu_s() - c0}
    return pending, done, markers, times


def _commit_all(out: str, pending: list, markers: dict, so: dict[str, Any], args: argparse.Namespace) -> float:
    """The runner's record loop, fed by the fake stage: P part records per shard, a commit as each completes."""
    t0 = time.perf_counter()
    progress = {s.stem: commit.ShardProgress(s) for s in pending}
    futures: dict[str, Future] = {}
    rows = args.docs_per_shard
    with ThreadPoolExecutor(args.threads, thread_name_prefix="commit") as pool:
        for s in pending:
            p = progress[s.stem]
            for k in range(args.parts_per_shard):
                first = k * args.part_rows
                n = min(args.part_rows, rows - first) if k < args.parts_per_shard - 1 else rows - first
                last = k == args.parts_per_shard - 1
                rec = parts.record(
                    s.stem,
                    first,
                    file=f"data/{parts.part_name(s.stem, first)}",
                    rows=n,
                    tokens=n * args.tokens_per_doc,
                    shard_rows=rows if last else -1,
                )
                p.add(rec)
            if p.complete:
                futures[s.stem] = pool.submit(commit.commit_shard, out, p, KEY, so)
        for stem, fut in futures.items():
            markers[stem] = fut.result()
    return time.perf_counter() - t0


def _job(store: Store, so: dict[str, Any], name: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Seed ``n`` input shards and their parts under ``name``, then plan, commit, write the manifest and re-plan."""
    out, inputs = f"s3://bench-out/{name}", f"s3://bench-in/{name}/"
    r: dict[str, Any] = {}
    t0 = time.perf_counter()
    store.call("seed", "bench-in", f"{name}/shard-{{:06d}}.parquet", n, 64)
    for k in range(args.parts_per_shard):  # the parts the workers wrote: P per shard, named by their first row
        store.call("seed", "bench-out", f"{name}/data/shard-{{:06d}}-{k * args.part_rows:012d}.parquet", n, 16)
    r["seed_s"] = time.perf_counter() - t0
    store.counts()

    pending, done, markers, r["plan0"] = _plan(inputs, out, so)
    r["plan0_req"] = store.counts()
    assert len(pending) == n and not done, (len(pending), len(done))

    c0 = _cpu_s()
    r["commit_s"] = _commit_all(out, pending, markers, so, args)
    r["commit_cpu"] = _cpu_s() - c0
    r["commit_req"] = store.counts()
    r["rss_committed"] = _rss_mb()

    t1 = time.perf_counter()
    manifest = commit.write_manifest(out, [markers[s.stem] for s in pending], CONFIG, MODEL, so)
    r["manifest_s"] = time.perf_counter() - t1
    r["manifest_req"] = store.counts()
    r["manifest_bytes"] = len(json.dumps(manifest, indent=2, sort_keys=True).encode())  # as write_json writes it
    r["files_bytes"] = len(json.dumps(manifest["files"], indent=2).encode())
    r["n_files"] = len(manifest["files"])
    del manifest

    pending2, done2, markers2, r["plan1"] = _plan(inputs, out, so)
    r["plan1_req"] = store.counts()
    assert not pending2 and len(done2) == n and len(markers2) == n
    return r


def run(args: argparse.Namespace) -> dict[str, Any]:
    store = Store(index=not args.moto_scan)
    so = {"endpoint_url": store.endpoint, **CREDS}
    try:
        store.call("bucket", "bench-in")
        store.call("bucket", "bench-out")
        # A two-shard warm-up first: s3fs, botocore and its service model load now, not inside the measured growth.
        _job(store, so, "warmup", 2, args)
        rss0 = _rss_mb()
        r = _job(store, so, "job", args.shards, args)
        r["rss0"], r["rss_peak"] = rss0, _rss_mb("VmHWM")
    finally:
        store.stop()
    return r


# ---------------------------------------------------------------------------------------------- the report


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    n, target, docs = args.shards, args.target_shards, args.docs
    scale = target / n
    commit_n = sum(r["commit_req"].values())
    per_commit = commit_n / n
    plan1_n = sum(r["plan1_req"].values())
    mem_per_shard = (r["rss_peak"] - r["rss0"]) * 2**20 / n
    print(
        f"bench_scale: {n:,} shards x {args.parts_per_shard} part(s), {args.threads} commit threads, counted at "
        f"moto (seeded in {r['seed_s']:.1f}s)"
    )
    p0, p1 = r["plan0"], r["plan1"]
    print(
        f"plan, first run:  {p0['total']:.1f}s (list {n:,} inputs {p0['list']:.1f}s, markers {p0['markers']:.1f}s)"
        f"; requests: {_fmt(r['plan0_req'])}"
    )
    print(
        f"plan, rerun:      {p1['total']:.1f}s (list {n:,} inputs {p1['list']:.1f}s, load {n:,} markers "
        f"{p1['markers']:.1f}s; driver CPU {p1['cpu']:.1f}s); requests: {_fmt(r['plan1_req'])}"
    )
    print(
        f"commits:          {r['commit_s']:.1f}s for {n:,} shards ({n / r['commit_s']:.0f} shards/s, driver CPU "
        f"{r['commit_cpu'] * 1e3 / n:.2f} ms per commit); requests: {_fmt(r['commit_req'])}"
    )
    print(f"requests per shard commit: {per_commit:.2f}")
    print(
        f"manifest:         {r['manifest_bytes']:,} bytes ({r['manifest_bytes'] / n:.0f} B per shard, of which "
        f"{r['files_bytes'] / max(r['n_files'], 1):.0f} B per listed file); written in {r['manifest_s']:.2f}s, "
        f"requests: {_fmt(r['manifest_req'])}"
    )
    print(
        f"driver RSS:       {r['rss0']:.0f} MB after imports, {r['rss_committed']:.0f} MB after the commits, "
        f"peak {r['rss_peak']:.0f} MB ({mem_per_shard / 1024:.2f} KB per shard above the baseline)"
    )

    docs_per_shard = docs / target
    print(f"\nextrapolated to {target:,} shards ({docs:,.0f} docs, {docs_per_shard:,.0f} docs per shard):")
    print(
        f"  requests: {per_commit * target:,.0f} for the commits ({per_commit:.2f} per shard), "
        f"{plan1_n * scale:,.0f} per plan (input pages + {target:,} marker reads), 1 manifest"
    )
    print(
        f"  driver memory: {r['rss0'] + mem_per_shard * target / 2**20:,.0f} MB peak "
        f"({mem_per_shard * target / 2**20:,.0f} MB above the baseline, at {args.parts_per_shard} part(s)/shard)"
    )
    print(
        f"  driver time per {target:,} shards on moto: plan {p1['total'] * scale / 60:.1f} min, commits "
        f"{r['commit_s'] * scale / 60:.1f} min (driver CPU {r['commit_cpu'] * scale / 60:.1f} min), beside the "
        f"record loop; at {args.s3_ms:g} ms per S3 request: commits "
        f"{per_commit * target * args.s3_ms / 1e3 / args.threads / 60:.1f} min on {args.threads} threads, "
        f"plan {target * args.s3_ms / 1e3 / 16 / 60:.1f} min (16 reader threads)"
    )
    # the job's own default (pipelines/jobs/embed.py part_rows): about DEFAULT_PART_BYTES of vectors per part
    dim_bytes = args.dim * (4 if args.dtype == "float32" else 2) + PART_ROW_OVERHEAD
    for label, rows in (
        ("1,024-row parts (before)", 1024),
        ("~128 MB parts (default)", DEFAULT_PART_BYTES // dim_bytes),
    ):
        files = target * math.ceil(docs_per_shard / rows)
        per_file = r["files_bytes"] / max(r["n_files"], 1)  # a file's line in "files"; the rest is per shard
        mb = (r["manifest_bytes"] - r["files_bytes"]) / n * target + per_file * files
        print(
            f"  files with {label} ({rows:,} rows at dim {args.dim} {args.dtype}): {files:,} data files + "
            f"{target:,} markers; manifest ~{mb / 2**20:,.0f} MB"
        )
    gpu_h = docs * args.tokens_per_doc / args.tok_s / 3600
    print(
        f"  GPU time: {docs:,.0f} docs x {args.tokens_per_doc} tokens = {docs * args.tokens_per_doc:,.0f} tokens "
        f"at {args.tok_s:,.0f} tok/s per GPU = {gpu_h:,.0f} GPU-hours (model calls only)"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=20_000, help="input shards to plan and commit")
    p.add_argument("--parts-per-shard", type=int, default=1)
    p.add_argument("--part-rows", type=int, default=1024, help="rows per part record of the fake stage")
    p.add_argument("--threads", type=int, default=runner.COMMIT_THREADS, help="commit threads (the runner's pool)")
    p.add_argument("--target-shards", type=int, default=100_000, help="extrapolate to this many shards")
    p.add_argument("--docs", type=float, default=1e9, help="extrapolate to this many documents")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument(
        "--tokens-per-doc",
        type=int,
        default=250,
        help="mean tokens per document (the long-tail mix of bench_gpu.py: lognormal, median 150, "
        "sigma 1, cap 4096, has a mean of about 250)",
    )
    p.add_argument(
        "--tok-s",
        type=float,
        default=349_618,
        help="GPU throughput (benchmarks/results/gpu_check-h200-hybrid-compiled: 0.6B, long-tail mix)",
    )
    p.add_argument("--moto-scan", action="store_true", help="leave moto's prefix listings scanning every key")
    p.add_argument("--s3-ms", type=float, default=20.0, help="assumed latency of one small S3 request (ms)")
    args = p.parse_args(argv)
    args.docs_per_shard = args.parts_per_shard * args.part_rows
    report(run(args), args)


if __name__ == "__main__":
    main()
