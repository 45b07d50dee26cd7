"""End-to-end local Ray job vs the operator alone on the same corpus (pipeline efficiency), and driver memory.

    python benchmarks/bench_pipeline.py                  # 10k docs efficiency + driver peak RSS at 10k and 100k docs
    python benchmarks/bench_pipeline.py --docs 2000 --no-rss

Printed, not a test. The model is a random-weight Qwen3 with the real Qwen vocabulary (tests/qwen_fixtures.py).
Driver peak RSS is measured in a fresh process per corpus size (ru_maxrss of the driver alone; Ray's own daemons and
workers are separate processes), so the two numbers are comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_corpus(root: str, n_docs: int, shards: int, short: bool = False) -> None:
    from tests.corpus import make_docs, write_parquet

    per = (n_docs + shards - 1) // shards
    for k in range(shards):
        docs = make_docs(min(per, n_docs - k * per), seed=k, start_id=k * per)
        if short:
            # Driver memory depends on rows, shards and parts, not on text length: short texts keep 100k docs quick.
            docs = [{**d, "text": f"{d['lang']} doc {d['id']}"} for d in docs]
        write_parquet(docs, os.path.join(root, f"shard-{k:04d}.parquet"))


def run_job(inp: str, out: str, model: str, rows_per_block: int) -> dict:
    import ray

    from pipelines.config import build_embed_config
    from pipelines.embed import run_embed

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    cfg = build_embed_config({"input": inp, "output": out, "model": model, "rows_per_block": rows_per_block})
    t0 = time.perf_counter()
    s = run_embed(cfg)
    wall = time.perf_counter() - t0
    return {
        "docs": s.docs,
        "tokens": s.tokens,
        "wall": wall,
        "tokens_per_s": s.tokens / wall,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def operator_only(inp: str, model: str) -> dict:
    import pyarrow.dataset as pads

    from operators.embedder import Embedder

    texts = pads.dataset(inp).to_table(columns=["text"])["text"].to_pylist()
    emb = Embedder(model)
    t0 = time.perf_counter()
    enc = emb.encoder.encode(texts)
    emb.embed_ids(enc.ids)
    wall = time.perf_counter() - t0
    tokens = int(enc.lengths.sum())
    return {"docs": len(texts), "tokens": tokens, "wall": wall, "tokens_per_s": tokens / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=10_000)
    ap.add_argument("--rss-docs", default="10000,100000", help="corpus sizes for the driver-memory comparison")
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--rows-per-block", type=int, default=1024)
    ap.add_argument("--_child", nargs=3, metavar=("INPUT", "OUTPUT", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._child:
        print(json.dumps(run_job(*args._child, rows_per_block=args.rows_per_block)), flush=True)
        return

    from tests.qwen_fixtures import make_qwen3_dir

    tmp = tempfile.mkdtemp(prefix="bench-pipeline-")
    model = make_qwen3_dir(os.path.join(tmp, "model"))
    sizes = [args.docs] + ([] if args.no_rss else [int(x) for x in args.rss_docs.split(",")])
    corpora = {}
    if args.docs in sizes[1:]:
        sizes = [args.docs] + [n for n in sizes[1:] if n != args.docs]  # the efficiency corpus keeps real texts
    for n in dict.fromkeys(sizes):
        corpora[n] = os.path.join(tmp, f"in-{n}")
        os.makedirs(corpora[n])
        make_corpus(corpora[n], n, shards=max(4, n // 5000), short=n != args.docs)

    op = operator_only(corpora[args.docs], model)
    print(
        f"operator only : {op['docs']} docs, {op['tokens']} tokens, {op['wall']:.1f}s, "
        f"{op['tokens_per_s']:,.0f} tokens/s",
        flush=True,
    )
    child = [sys.executable, os.path.abspath(__file__), "--rows-per-block", str(args.rows_per_block), "--_child"]
    res = {}
    for n in dict.fromkeys(sizes):
        out = subprocess.run(
            [*child, corpora[n], os.path.join(tmp, f"out-{n}"), model], capture_output=True, text=True, check=True
        )
        res[n] = json.loads(out.stdout.strip().splitlines()[-1])
        r = res[n]
        print(
            f"pipeline {n:>7} docs: {r['tokens']} tokens, {r['wall']:.1f}s, {r['tokens_per_s']:,.0f} tokens/s, "
            f"driver peak RSS {r['driver_peak_rss_mb']:.0f} MB",
            flush=True,
        )
    eff = res[args.docs]["tokens_per_s"] / op["tokens_per_s"]
    print(
        f"pipeline efficiency (job tokens/s / operator tokens/s, {args.docs} docs, Ray start-up excluded, "
        f"planning, actor start and commits included): {eff:.2f}"
    )
    if not args.no_rss:
        a, b = (int(x) for x in args.rss_docs.split(","))
        print(
            f"driver peak RSS: {res[a]['driver_peak_rss_mb']:.0f} MB at {a} docs vs "
            f"{res[b]['driver_peak_rss_mb']:.0f} MB at {b} docs"
        )
    print(json.dumps({"operator": op, "pipeline": res, "efficiency": eff}))


if __name__ == "__main__":
    main()
