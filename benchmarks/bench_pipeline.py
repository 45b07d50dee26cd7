"""End-to-end local Ray job vs the operator alone on the same corpus (pipeline efficiency), and driver memory.

    python benchmarks/bench_pipeline.py                  # 10k docs efficiency + driver peak RSS at 10k and 100k docs
    python benchmarks/bench_pipeline.py --docs 2000 --no-rss
    python benchmarks/bench_pipeline.py --docs 2000 --no-rss --stats   # also Ray Data's per-stage stats of the job

Printed, not a test. The model is a random-weight Qwen3 with the real Qwen vocabulary (tests/qwen_fixtures.py).

Efficiency = job tokens/s / operator tokens/s on the same corpus, with the same torch thread count: the operator runs
with the threads the job's model actor gets (``--threads``, default: as the job picks them in local mode, this
machine's cores). The operator is timed twice, before and after the job, and the mean is used, so that load from
other processes hits both sides alike; tokenization is included on both sides and the operator's model load is not.
Two ratios are printed: over the whole job (planning, actor start-up, commits and the manifest included; Ray's own
start-up, ``ray.init``, is excluded and printed apart), and after start-up (tokens over the time from the moment the
first model actor is ready to the job's end; the job's fixed start-up cost is printed apart).

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


def run_job(inp: str, out: str, model: str, options: dict, stats: bool = False) -> dict:
    import ray

    from pipelines import embed
    from pipelines.config import build_embed_config
    from pipelines.stages import READY_FILE_ENV

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ready_file = os.path.join(os.path.dirname(out), f"ready-{os.path.basename(out)}.txt")
    os.environ[READY_FILE_ENV] = ready_file  # the driver forwards it to the model actors
    t = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_init = time.perf_counter() - t
    cfg = build_embed_config({"input": inp, "output": out, "model": model, **options})
    res = embed.embed_resources(cfg)
    datasets = []
    build = embed.build_dataset

    def keep(*args, **kwargs):
        datasets.append(build(*args, **kwargs))
        return datasets[-1]

    embed.build_dataset = keep
    t0 = time.time()
    s = embed.run_embed(cfg)
    t1 = time.time()
    if stats and datasets:
        print(datasets[-1].stats(), file=sys.stderr, flush=True)
    with open(ready_file) as f:
        # <ready> <pid> <process start> <__init__ start> per actor (pipelines.stages.EmbedStage); the first one
        first = min(tuple(float(x) for x in line.split()) for line in f if line.strip())
    ready, _pid, spawned, init = first
    wall, after = t1 - t0, t1 - ready
    return {
        "docs": s.docs,
        "tokens": s.tokens,
        "wall": wall,
        "tokens_per_s": s.tokens / wall,
        "startup": ready - t0,
        # the first actor's start-up: job start to its process start (plan, Ray Data planning, actor scheduling),
        # process start to __init__ (worker start-up, imports), __init__ (tokenizer and model load)
        "startup_parts": {"until_spawn": spawned - t0, "imports": init - spawned, "init": ready - init},
        "after_startup_wall": after,
        "after_startup_tokens_per_s": s.tokens / after,
        "ray_init": ray_init,
        "threads": res.threads,
        "batch_rows": res.batch_rows,
        "num_cpus": res.num_cpus,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def load_operator(model: str, threads: int):
    import torch

    from operators.embedder import Embedder

    torch.set_num_threads(threads)
    return Embedder(model)


def operator_only(inp: str, emb) -> dict:
    """Tokenize and embed the whole corpus in one call in this process (one length sort over everything)."""
    import pyarrow.dataset as pads

    texts = pads.dataset(inp).to_table(columns=["text"])["text"].to_pylist()
    t0 = time.perf_counter()
    enc = emb.encoder.encode(texts)
    emb.embed_ids(enc.ids)
    wall = time.perf_counter() - t0
    tokens = int(enc.lengths.sum())
    return {"docs": len(texts), "tokens": tokens, "wall": wall, "tokens_per_s": tokens / wall}


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


COLD = """
import json, sys, time
t0 = time.time()
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads({threads})
import pyarrow.dataset as pads
from operators.embedder import Embedder
emb = Embedder({model!r})
loaded = time.time()
texts = pads.dataset({inp!r}).to_table(columns=["text"])["text"].to_pylist()
enc = emb.encoder.encode(texts)
emb.embed_ids(enc.ids)
print(json.dumps({{"tokens": int(enc.lengths.sum()), "load": loaded - t0, "wall": time.time() - t0}}))
"""


def cold_operator(inp: str, model: str, threads: int) -> dict:
    """The operator as a plain script would run it: a fresh process that imports, loads the model and embeds; timed
    from the process start (the interpreter's own start excluded), so its start-up compares with the job's."""
    src = COLD.format(repo=REPO, threads=threads, model=model, inp=inp)
    out = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {**r, "tokens_per_s": r["tokens"] / r["wall"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=10_000)
    ap.add_argument("--rss-docs", default="10000,100000", help="corpus sizes for the driver-memory comparison")
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--rows-per-block", type=int, default=1024)
    ap.add_argument("--embed-batch-rows", type=int, help="rows per model-actor call (default: the job's)")
    ap.add_argument("--threads", type=int, help="torch threads of the actor and the operator (default: the job's)")
    ap.add_argument("--stats", action="store_true", help="print Ray Data's per-stage stats of the efficiency job")
    ap.add_argument("--_child", nargs=4, metavar=("INPUT", "OUTPUT", "MODEL", "OPTIONS"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._child:
        inp, out, model, options = args._child
        print(json.dumps(run_job(inp, out, model, json.loads(options), stats=args.stats)), flush=True)
        return

    from pipelines.embed import _machine_cpus
    from tests.qwen_fixtures import make_qwen3_dir

    options = {"rows_per_block": args.rows_per_block}
    if args.embed_batch_rows:
        options["embed_batch_rows"] = args.embed_batch_rows
    if args.threads:
        options["threads"] = args.threads
    # The job's own default in local mode with one actor: every core of this machine (pipelines.embed).
    threads = args.threads or _machine_cpus()

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

    emb = load_operator(model, threads)
    ops = [operator_only(corpora[args.docs], emb)]
    print(
        f"operator only : {ops[0]['docs']} docs, {ops[0]['tokens']} tokens, {threads} torch threads, "
        f"{ops[0]['wall']:.1f}s, {ops[0]['tokens_per_s']:,.0f} tokens/s ({_load()})",
        flush=True,
    )
    child = [sys.executable, os.path.abspath(__file__)] + (["--stats"] if args.stats else []) + ["--_child"]
    res = {}
    for n in dict.fromkeys(sizes):
        out = subprocess.run(
            [*child, corpora[n], os.path.join(tmp, f"out-{n}"), model, json.dumps(options)],
            stdout=subprocess.PIPE,
            stderr=None if (args.stats and n == args.docs) else subprocess.PIPE,
            text=True,
        )
        if out.returncode:
            sys.exit(f"the job at {n} docs failed:\n{(out.stderr or '')[-4000:]}")
        res[n] = json.loads(out.stdout.strip().splitlines()[-1])
        r = res[n]
        print(
            f"pipeline {n:>7} docs: {r['tokens']} tokens, {r['wall']:.1f}s, {r['tokens_per_s']:,.0f} tokens/s; "
            f"start-up (plan + first model actor ready) {r['startup']:.1f}s "
            f"({'; '.join(f'{k} {v:.1f}s' for k, v in r['startup_parts'].items())}), "
            f"then {r['after_startup_wall']:.1f}s at "
            f"{r['after_startup_tokens_per_s']:,.0f} tokens/s; actor: {r['threads']} torch threads, "
            f"{r['num_cpus']:g} CPU booked, {r['batch_rows']} rows per call; ray.init {r['ray_init']:.1f}s "
            f"(excluded); driver peak RSS {r['driver_peak_rss_mb']:.0f} MB ({_load()})",
            flush=True,
        )
        if n == args.docs:
            ops.append(operator_only(corpora[args.docs], emb))
            print(
                f"operator only : {ops[1]['wall']:.1f}s, {ops[1]['tokens_per_s']:,.0f} tokens/s "
                f"(again, after the job; {_load()})",
                flush=True,
            )
    cold = cold_operator(corpora[args.docs], model, threads)
    print(
        f"cold operator : {cold['wall']:.1f}s from a fresh process ({cold['load']:.1f}s of imports and model load), "
        f"{cold['tokens_per_s']:,.0f} tokens/s ({_load()})",
        flush=True,
    )
    job = res[args.docs]
    if job["threads"] != threads:
        print(f"WARNING: the actor ran {job['threads']} torch threads, the operator {threads}: not like with like")
    op_tps = sum(o["tokens_per_s"] for o in ops) / len(ops)
    eff = job["tokens_per_s"] / op_tps
    eff_after = job["after_startup_tokens_per_s"] / op_tps
    print(f"job tokens/s           : {job['tokens_per_s']:,.0f} (whole job; ray.init excluded)")
    print(f"job tokens/s, after    : {job['after_startup_tokens_per_s']:,.0f} (from the first actor ready to the end)")
    print(f"operator tokens/s      : {op_tps:,.0f} (mean of before and after, {threads} torch threads)")
    print(f"pipeline efficiency    : {eff:.2f} (whole job, {job['startup']:.1f}s of start-up included; target >= 0.8)")
    print(f"efficiency, after start-up: {eff_after:.2f} (start-up of {job['startup']:.1f}s excluded)")
    print(
        f"job / cold operator    : {job['tokens_per_s'] / cold['tokens_per_s']:.2f} (both with their start-up: the "
        f"job's {job['startup']:.1f}s, the script's {cold['load']:.1f}s)"
    )
    if not args.no_rss:
        a, b = (int(x) for x in args.rss_docs.split(","))
        print(
            f"driver peak RSS: {res[a]['driver_peak_rss_mb']:.0f} MB at {a} docs vs "
            f"{res[b]['driver_peak_rss_mb']:.0f} MB at {b} docs"
        )
    print(
        json.dumps(
            {
                "operator": ops,
                "operator_tokens_per_s": op_tps,
                "threads": threads,
                "pipeline": res,
                "efficiency": eff,
                "efficiency_after_startup": eff_after,
                "cold_operator": cold,
                "job_over_cold_operator": job["tokens_per_s"] / cold["tokens_per_s"],
                "loadavg": os.getloadavg(),
            }
        )
    )


if __name__ == "__main__":
    main()
