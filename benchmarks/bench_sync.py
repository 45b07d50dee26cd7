"""`rayembed sync` throughput and memory: rows/s of the bulk load and of applying a 2% delta, into LanceDB and into
PostgreSQL + pgvector (pgserver), and the peak RSS of the syncing process for a small and a large output.

For each size, an output is written through pipelines/versions.py, in the embed job's layout: version 1 (a backfill,
parts of 10,000 rows) and version 2 (a 2% delta: 1% changed, 0.5% deleted, 0.5% new rows). Each (store, size) runs
in a fresh child process: bulk-load version 1, then apply version 2. rows/s: snapshot rows over the bulk load's wall
time, and delta rows (upserts + deletes) over the apply's. Peak RSS: the child's ``ru_maxrss``. The issue's target:
peak RSS at 200k rows within 100 MB of the peak at 10k (the sync streams; memory does not grow with the snapshot).

    python benchmarks/bench_sync.py                      # 10k and 200k rows, dim 256, both stores
    python benchmarks/bench_sync.py --sizes 2000,20000   # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

RSS_TARGET_MB = 100
PART_ROWS = 10_000  # equal parts at every size: a reader holds one row group of one part at a time


def _schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.int64()),
            pa.field("embedding", pa.list_(pa.float32(), dim)),
            pa.field("content_hash", pa.binary(16)),
            pa.field("title", pa.string()),
            pa.field("score", pa.float64()),
        ]
    )


def _rows(ids: np.ndarray, dim: int, rng: np.random.Generator) -> pa.Table:
    vecs = rng.standard_normal((len(ids), dim), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    hashes = rng.bytes(16 * len(ids))
    return pa.table(
        [
            pa.array(ids, pa.int64()),
            pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), dim),
            pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(ids), [None, pa.py_buffer(hashes)]),
            pa.array([f"title of document {i}" for i in ids]),
            pa.array(ids / 7.0),
        ],
        schema=_schema(dim),
    )


def build_output(out: str, n: int, dim: int) -> tuple[int, int]:
    """Version 1 with ``n`` rows, version 2 with a 2% delta. Returns (snapshot rows, delta rows)."""
    from pipelines import versions

    rng = np.random.default_rng(n)
    files = []
    for start in range(0, n, PART_ROWS):
        rel = f"data/bench-{start:012d}-v00000001.parquet"  # the embed job's part names
        pq.write_table(_rows(np.arange(start, min(n, start + PART_ROWS)), dim, rng), os.path.join(out, rel))
        files.append(rel)
    versions.commit_version(out, versions.make_record(1, "bench", files, counts={"rows": n}))
    changed = rng.choice(n, n // 100, replace=False)
    deleted = np.setdiff1d(rng.choice(n, n // 100, replace=False), changed)[: n // 200]
    new = np.arange(n, n + n // 200)
    up, dele = "_deltas/00000002/upserts/bench-000000000000.parquet", "_deltas/00000002/deletes/b00000.parquet"
    os.makedirs(os.path.join(out, os.path.dirname(up)))
    os.makedirs(os.path.join(out, os.path.dirname(dele)))
    pq.write_table(_rows(np.sort(np.concatenate([changed, new])), dim, rng), os.path.join(out, up))
    pq.write_table(pa.table({"id": pa.array(np.sort(deleted), pa.int64())}), os.path.join(out, dele))
    # The snapshot's files are not re-read by an incremental sync; version 2 lists version 1's (close enough here).
    record = versions.make_record(2, "bench", files, upserts=[up], deletes=[dele])
    versions.commit_version(out, record)
    return n, len(changed) + len(new) + len(deleted)


def child(out: str, to: str, table: str) -> None:
    """One sync process: bulk load version 1, then apply version 2; print JSON with times and peak RSS."""
    import lancedb  # noqa: F401  imported up front: 2 s of imports are not load time
    import psycopg  # noqa: F401

    from pipelines.sync import sync

    t0 = time.monotonic()
    sync(out, to, table, version=1)
    bulk_s = time.monotonic() - t0
    bulk_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.monotonic()
    sync(out, to, table)
    delta_s = time.monotonic() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"bulk_s": bulk_s, "delta_s": delta_s, "bulk_rss_mb": bulk_rss, "rss_mb": rss}))


def run_child(out: str, to: str, table: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", out, to, table]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,200000", help="comma-separated snapshot sizes (rows)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--stores", default="lance,pg")
    ap.add_argument("--child", nargs=3, metavar=("OUT", "TO", "TABLE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    import pgserver

    sizes = [int(s) for s in args.sizes.split(",")]
    base = tempfile.mkdtemp(prefix="rayembed-bench-sync-")
    results: dict[tuple[str, int], dict] = {}
    try:
        stores = args.stores.split(",")
        srv = pgserver.get_server(os.path.join(base, "pgdata"), cleanup_mode="stop") if "pg" in stores else None
        for n in sizes:
            out = os.path.join(base, f"out-{n}")
            os.makedirs(os.path.join(out, "data"))
            rows, delta = build_output(out, n, args.dim)
            for store in stores:
                to = f"lancedb://{base}/lance" if store == "lance" else srv.get_uri()
                r = run_child(out, to, f"bench_{n}")
                r.update(rows=rows, delta=delta)
                results[(store, n)] = r
                print(
                    f"{store:6s} rows={rows:>8,} dim={args.dim}  bulk {rows / r['bulk_s']:>9,.0f} rows/s "
                    f"({r['bulk_s']:.1f}s)  2% delta {delta / r['delta_s']:>8,.0f} rows/s ({delta:,} rows, "
                    f"{r['delta_s']:.2f}s)  peak RSS {r['rss_mb']:.0f} MB (after bulk {r['bulk_rss_mb']:.0f} MB)",
                    flush=True,
                )
        if len(sizes) >= 2:
            lo, hi = min(sizes), max(sizes)
            for store in stores:
                diff = results[(store, hi)]["rss_mb"] - results[(store, lo)]["rss_mb"]
                verdict = "ok" if diff <= RSS_TARGET_MB else "OVER"
                print(
                    f"{store:6s} peak RSS {hi:,} rows - {lo:,} rows = {diff:+.0f} MB (target <= {RSS_TARGET_MB}) "
                    f"{verdict}"
                )
        if srv is not None:
            srv.cleanup()
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
