"""Scheduled refresh against a backfill: a nightly Spark-style re-export of the corpus, embedded on the same prefix.

    nice python benchmarks/bench_refresh.py          # 20,000 docs: the issue's benchmark (~1 hour on 2 busy cores)
    python benchmarks/bench_refresh.py --docs 2000   # a smoke run (the wall-time target is for the full size)
    python benchmarks/bench_refresh.py --docs 2000 --passthrough-changed 0.01 --keep --out-dir /tmp/bench-refresh

Printed, not a test. The corpus is bench_operator.py's long tail (lognormal token counts, median 150, sigma 1.0, capped
at 4,096, made of words from the real Qwen vocabulary), with int64 ids and two pass-through columns (``lang``,
``url``). The model is a random-weight Qwen3, hidden 256 and 4 layers (``--hidden`` / ``--layers``), with the real Qwen
vocabulary (tests/qwen_fixtures.py).

1. **Backfill.** The corpus as ``--shards`` Parquet files named as Spark names them
   (``part-0000k-<uuid4>-c000.snappy.parquet``, plus a ``_SUCCESS`` marker), embedded into a fresh prefix.
2. **Rewrite.** The input directory is rewritten as Spark's overwrite does: every old file removed, the rows shuffled
   across ``--refresh-shards`` new files under new uuids. On the way ``--changed`` of the docs get a new text,
   ``--deleted`` are dropped, ``--new`` new docs are added (and ``--passthrough-changed`` keep their text but get a
   new ``url``).
3. **Refresh.** The same ``python -m pipelines.embed`` command on the same ``--output``.
4. **No-op** (``--noop``, default on). The same command once more on the unchanged input: it must commit nothing.

Each run is a fresh ``python -m pipelines.embed`` subprocess (local mode: it starts its own Ray), timed from launch to
exit. Its driver's peak RSS is the kernel's high-water mark of that one process (``VmHWM`` in /proc/<pid>/status,
polled every 0.1 s until it exits, so the last tenth of a second is not seen); Ray's raylet, GCS and workers are
other processes and are not counted. ``embedded`` and the other counts come from the version record
(``_manifest.json``). Bytes read are the sizes of the files the run has to read: the input shards, plus, for the
refresh, the parent version's data files (whole files, an upper bound: the match pass needs only their ``id`` and
``content_hash`` columns, printed too, and the vectors of the rows it reuses). Bytes written are the files the new
version references that its parent did not, plus its deltas and error files.

Targets (issue 11): ``embedded`` == changed + new, exactly; the refresh's wall time at most 25% of the backfill's;
the driver's peak RSS within 100 MB of the backfill's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Writing model shards" bar from save_pretrained
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SUMMARY = re.compile(r"^rayembed embed: .*$", re.M)
VERSION_LINE = re.compile(r"^version \d+.*$", re.M)
COUNT_KEYS = ("rows", "embedded", "reused", "upserted", "deleted", "quarantined")
PASSTHROUGH = "lang,url"
LANGS = ("en", "zh", "code")


# ------------------------------------------------------------------------------------------------------ corpus


def longtail_texts(n: int, seed: int) -> list[str]:
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from bench_operator import build_corpus

    from tests.qwen_fixtures import build_qwen_tokenizer

    return build_corpus(build_qwen_tokenizer(), n, seed, 150.0, 1.0, 4096)[0]


def doc(i: int, text: str, version: int = 1) -> dict:
    url = f"https://example.com/doc/{i}" + ("" if version == 1 else f"?rev={version}")
    return {"id": i, "text": text, "lang": LANGS[i % 3], "url": url}


def write_spark(root: str, docs: list[dict], shards: int) -> list[str]:
    """Spark's overwrite: remove every file under ``root``, write ``shards`` new uuid-named files and ``_SUCCESS``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if os.path.isdir(root):
        shutil.rmtree(root)
    os.makedirs(root)
    per = -(-len(docs) // shards)
    names = []
    for k in range(shards):
        chunk = docs[k * per : (k + 1) * per]
        name = f"part-{k:05d}-{uuid.uuid4()}-c000.snappy.parquet"
        pq.write_table(pa.Table.from_pylist(chunk), os.path.join(root, name), compression="snappy")
        names.append(name)
    open(os.path.join(root, "_SUCCESS"), "w").close()
    return names


def make_inputs(args: argparse.Namespace, work: str) -> tuple[str, dict]:
    """Write the backfill's input; return it and what the rewrite will do (applied by ``rewrite``)."""
    n = args.docs
    n_changed, n_deleted, n_new = round(n * args.changed), round(n * args.deleted), round(n * args.new)
    n_meta = round(n * args.passthrough_changed)
    t0 = time.perf_counter()
    texts = longtail_texts(n + n_changed + n_new, args.seed)
    gen_s = time.perf_counter() - t0
    docs = [doc(i, texts[i]) for i in range(n)]
    rng = random.Random(args.seed)
    order = list(range(n))
    rng.shuffle(order)
    plan = {
        "docs": docs,
        "deleted": sorted(order[:n_deleted]),
        "changed": sorted(order[n_deleted : n_deleted + n_changed]),
        "meta": sorted(order[n_deleted + n_changed : n_deleted + n_changed + n_meta]),
        "changed_texts": texts[n : n + n_changed],
        "new_texts": texts[n + n_changed :],
        "gen_s": gen_s,
    }
    inp = os.path.join(work, "input")
    write_spark(inp, docs, args.shards)
    return inp, plan


def rewrite(inp: str, plan: dict, args: argparse.Namespace) -> list[dict]:
    by_id = {d["id"]: d for d in plan["docs"]}
    for i in plan["deleted"]:
        del by_id[i]
    for i, text in zip(plan["changed"], plan["changed_texts"], strict=True):
        by_id[i] = doc(i, text)
    for i in plan["meta"]:
        by_id[i] = doc(i, by_id[i]["text"], version=2)
    start = args.docs
    for k, text in enumerate(plan["new_texts"]):
        by_id[start + k] = doc(start + k, text)
    rows = list(by_id.values())
    random.Random(args.seed + 1).shuffle(rows)  # rows move between shards
    write_spark(inp, rows, args.refresh_shards)
    return rows


# ------------------------------------------------------------------------------------------------------ runs


def _status_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def run_embed(inp: str, out: str, model: str, log: str, extra: list[str]) -> dict:
    """One ``python -m pipelines.embed`` process, timed from launch to exit; its own peak RSS, polled."""
    cmd = [sys.executable, "-m", "pipelines.embed", "--input", inp, "--output", out, "--model", model]
    cmd += ["--passthrough", PASSTHROUGH, "-q", *extra]
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1", PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)  # local mode: the job starts its own Ray
    with open(log + ".out", "w") as so, open(log + ".err", "w") as se:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=so, stderr=se)
        hwm = rss = scratch = 0
        polls = 0
        while p.poll() is None:
            hwm = max(hwm, _status_kb(p.pid, "VmHWM") or 0)
            rss = max(rss, _status_kb(p.pid, "VmRSS") or 0)
            if polls % 10 == 0:  # once a second: the refresh's scratch under _work/ (removed after its commit)
                scratch = max(scratch, tree_bytes(os.path.join(out, "_work")))
            polls += 1
            time.sleep(0.1)
        wall = time.perf_counter() - t0
    with open(log + ".out") as so, open(log + ".err") as se:
        stdout, stderr = so.read(), se.read()
    if p.returncode:
        sys.exit(f"bench_refresh: {' '.join(cmd)} failed with {p.returncode}:\n{stderr[-4000:]}\n{stdout[-2000:]}")
    return {
        "wall": wall,
        "rss_mb": max(hwm, rss) / 1024,
        "scratch": scratch,
        "summary": SUMMARY.findall(stdout) + VERSION_LINE.findall(stdout),
    }


def tree_bytes(root: str) -> int:
    total = 0
    for d, _dirs, files in os.walk(root):
        for f in files:
            with contextlib.suppress(FileNotFoundError):  # removed while we walk
                total += os.path.getsize(os.path.join(d, f))
    return total


def record(out: str) -> dict:
    with open(os.path.join(out, "_manifest.json")) as f:
        return json.load(f)


def counts(rec: dict) -> tuple[dict, bool]:
    """The version record's counts; on an output without version records (the embed job before refresh) the
    manifest's rows stand in for every count, flagged False."""
    if rec.get("format") == "rayembed.version/1":
        return {k: int(rec["counts"].get(k, 0)) for k in COUNT_KEYS}, True
    rows = int(rec["totals"]["rows"])
    return {"rows": rows, "embedded": rows, "reused": 0, "upserted": rows, "deleted": 0, "quarantined": 0}, False


def sizes(root: str, rels: list[str]) -> int:
    return sum(os.path.getsize(os.path.join(root, r)) for r in rels)


def input_bytes(inp: str) -> int:
    return sum(os.path.getsize(os.path.join(inp, f)) for f in os.listdir(inp) if not f.startswith(("_", ".")))


def match_columns_bytes(out: str, rels: list[str]) -> int:
    """Compressed bytes of the ``id`` and ``content_hash`` column chunks of the given Parquet files."""
    import pyarrow.parquet as pq

    total = 0
    for r in rels:
        md = pq.ParquetFile(os.path.join(out, r)).metadata
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            for c in range(rg.num_columns):
                if rg.column(c).path_in_schema in ("id", "content_hash"):
                    total += rg.column(c).total_compressed_size
    return total


def written(out: str, rec: dict, parent: dict | None) -> int:
    old = set(parent["files"]) | set(parent.get("error_files", [])) if parent else set()
    new = (set(rec["files"]) | set(rec.get("error_files", []))) - old
    deltas = rec.get("deltas") or {}
    return sizes(out, sorted(new | set(deltas.get("upserts", [])) | set(deltas.get("deletes", []))))


# ------------------------------------------------------------------------------------------------------ report


def mb(b: float) -> str:
    return f"{b / 2**20:,.1f} MB" if b >= 2**20 or b == 0 else f"{b / 1024:,.0f} KB"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=20_000, help="docs in the backfill (default 20,000)")
    ap.add_argument("--shards", type=int, default=8, help="input shards of the backfill (default 8)")
    ap.add_argument("--refresh-shards", type=int, help="shards of the rewritten input (default: --shards * 3 / 2 + 1)")
    ap.add_argument("--changed", type=float, default=0.02, help="fraction of docs whose text changes (0.02)")
    ap.add_argument("--deleted", type=float, default=0.01, help="fraction of docs deleted (0.01)")
    ap.add_argument("--new", type=float, default=0.01, help="new docs, as a fraction of --docs (0.01)")
    ap.add_argument("--passthrough-changed", type=float, default=0.0, help="fraction with only a new url (default 0)")
    ap.add_argument("--hidden", type=int, default=256, help="random Qwen3's hidden size (256)")
    ap.add_argument("--layers", type=int, default=4, help="random Qwen3's layers (4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noop", action=argparse.BooleanOptionalAction, default=True, help="run 3: unchanged input")
    ap.add_argument("--out-dir", help="work directory (default: a fresh temporary one); must be empty or absent")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (inputs, outputs, model, logs)")
    ap.add_argument("extra", nargs="*", help="extra flags for every embed run, after --")
    args = ap.parse_args()
    args.refresh_shards = args.refresh_shards or args.shards * 3 // 2 + 1

    if args.out_dir:
        if os.path.exists(args.out_dir) and os.listdir(args.out_dir):
            sys.exit(f"bench_refresh: --out-dir {args.out_dir} is not empty")
        os.makedirs(args.out_dir, exist_ok=True)
        work = os.path.abspath(args.out_dir)
    else:
        work = tempfile.mkdtemp(prefix="bench-refresh-")
    try:
        return bench(args, work)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def bench(args: argparse.Namespace, work: str) -> int:
    from tests.qwen_fixtures import make_qwen3_dir

    h = args.hidden
    model = make_qwen3_dir(
        os.path.join(work, "model"),
        hidden_size=h,
        num_hidden_layers=args.layers,
        head_dim=h // 4,
        intermediate_size=2 * h,
    )
    inp, plan = make_inputs(args, work)
    out = os.path.join(work, "output")
    n_changed, n_deleted, n_new, n_meta = (len(plan[k]) for k in ("changed", "deleted", "new_texts", "meta"))
    print(
        f"bench_refresh: {args.docs:,} long-tail docs (median 150 tokens, cap 4,096; made in {plan['gen_s']:.0f}s), "
        f"random Qwen3 hidden {h} x {args.layers} layers with the real Qwen vocabulary, {os.cpu_count()} CPUs",
        flush=True,
    )
    in1 = input_bytes(inp)
    print(
        f"run 1, backfill: {args.shards} Spark-named shards ({mb(in1)}) into a fresh prefix (load {load()})",
        flush=True,
    )
    r1 = run_embed(inp, out, model, os.path.join(work, "run1"), args.extra)
    rec1 = record(out)
    c1, versioned1 = counts(rec1)
    r1.update(counts=c1, read=in1, written=written(out, rec1, None))
    for line in r1["summary"]:
        print("  " + line)

    rows2 = rewrite(inp, plan, args)
    in2 = input_bytes(inp)
    parent_files = list(rec1["files"])
    parent_bytes = sizes(out, parent_files)
    parent_match = match_columns_bytes(out, parent_files)
    print(
        f"run 2, refresh: input rewritten as {args.refresh_shards} new Spark-named shards ({mb(in2)}), rows shuffled; "
        f"{n_changed:,} texts changed, {n_deleted:,} docs deleted, {n_new:,} new"
        + (f", {n_meta:,} with only a new url" if n_meta else "")
        + f" (load {load()})",
        flush=True,
    )
    r2 = run_embed(inp, out, model, os.path.join(work, "run2"), args.extra)
    rec2 = record(out)
    c2, versioned2 = counts(rec2)
    r2.update(counts=c2, read=in2 + parent_bytes, written=written(out, rec2, rec1 if versioned2 else None))
    for line in r2["summary"]:
        print("  " + line)

    r3 = None
    if args.noop:
        print(f"run 3, no-op: the same command on the unchanged input (load {load()})", flush=True)
        r3 = run_embed(inp, out, model, os.path.join(work, "run3"), args.extra)
        rec3 = record(out)
        # read: a no-op's plan lists the input and reads the records, no shard (0 here); written: nothing expected
        same = rec3.get("version") == rec2.get("version")
        w3 = 0 if same or not versioned2 else written(out, rec3, rec2)
        r3.update(counts=counts(rec3)[0], read=0, written=w3, version=rec3.get("version"))
        for line in r3["summary"]:
            print("  " + line)

    print()
    head = f"{'run':<9} {'wall':>8} {'embedded':>9} {'rows':>7} {'reused':>7} {'upserted':>8} {'deleted':>7}"
    print(head + f" {'bytes read':>11} {'written':>10} {'_work peak':>10} {'driver peak RSS':>15}")
    for name, r in (("backfill", r1), ("refresh", r2), ("no-op", r3)):
        if r is None:
            continue
        c = {k: f"{v:,}" for k, v in r["counts"].items()}
        if r is r3 and r3["version"] == rec2.get("version"):
            c = dict.fromkeys(c, "-")  # no new version: the record's counts are the refresh's
        print(
            f"{name:<9} {r['wall']:>7.1f}s {c['embedded']:>9} {c['rows']:>7} {c['reused']:>7} {c['upserted']:>8} "
            f"{c['deleted']:>7} {mb(r['read']):>11} {mb(r['written']):>10} {mb(r['scratch']):>10} "
            f"{r['rss_mb']:>12.0f} MB"
        )
    print(
        f"bytes read = the input shards' sizes; the refresh adds its parent's {len(parent_files)} data files "
        f"({mb(parent_bytes)}, whole files: an upper bound; their id + content_hash columns are {mb(parent_match)}); "
        "the no-op's plan reads no shard. "
        "written = files the version references that its parent did not, plus its deltas; _work peak = the largest "
        "size of the refresh's scratch seen (polled each second, removed after the commit). wall: process launch to "
        "exit (Ray's start included); RSS: the driver process alone (VmHWM)."
    )
    if not versioned2:
        print(
            "NOTE: the output has no version records (format "
            f"{rec2.get('format')!r}): the embed job does not refresh yet, so the counts above are the manifest's rows"
        )

    expect = {
        "embedded": n_changed + n_new,
        "rows": args.docs - n_deleted + n_new,
        "reused": args.docs - n_deleted - n_changed,
        "upserted": n_changed + n_new + n_meta,
        "deleted": n_deleted,
    }
    assert len(rows2) == expect["rows"]
    ratio = r2["wall"] / r1["wall"]
    drss = r2["rss_mb"] - r1["rss_mb"]
    targets = [
        (
            "embedded == changed + new",
            c2["embedded"] == expect["embedded"],
            f"{c2['embedded']:,} vs {n_changed:,} + {n_new:,} = {expect['embedded']:,}",
        ),
        ("refresh wall <= 25% of backfill's", ratio <= 0.25, f"{r2['wall']:.1f}s / {r1['wall']:.1f}s = {ratio:.1%}"),
        (
            "driver peak RSS within 100 MB of backfill's",
            abs(drss) <= 100,
            f"{r2['rss_mb']:.0f} MB vs {r1['rss_mb']:.0f} MB ({drss:+.0f} MB)",
        ),
    ]
    checks = [(f"{k} == {v:,}", c2[k] == v, f"{c2[k]:,}") for k, v in expect.items() if k != "embedded"]
    checks.append(("backfill embedded == docs", c1["embedded"] == args.docs, f"{c1['embedded']:,}"))
    if r3 is not None:
        noop_ok = r3["counts"] == c2 and r3["version"] == rec2.get("version") and versioned2
        checks.append(("no-op commits no version", noop_ok, f"version {r3['version']}, {r3['wall']:.1f}s"))
    print()
    for label, rows in (("target", targets), ("check", checks)):
        for name, ok, detail in rows:
            print(f"{label:<6} {'met ' if ok else 'MISSED'} {name}: {detail}")
    print(f"load average at the end: {load()}")
    print(
        "JSON "
        + json.dumps(
            {
                "docs": args.docs,
                "changed": n_changed,
                "deleted": n_deleted,
                "new": n_new,
                "passthrough_changed": n_meta,
                "versioned": [versioned1, versioned2],
                "runs": {k: r for k, r in (("backfill", r1), ("refresh", r2), ("noop", r3)) if r},
                "targets": {name: ok for name, ok, _ in targets},
                "checks": {name: ok for name, ok, _ in checks},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
