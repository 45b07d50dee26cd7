"""End-to-end local Ray job vs the operator alone on the same corpus (pipeline efficiency), and driver memory.

    python benchmarks/bench_pipeline.py                  # 10k docs efficiency + driver peak RSS at 10k and 100k docs
    python benchmarks/bench_pipeline.py --docs 2000 --no-rss
    python benchmarks/bench_pipeline.py --docs 1200 --no-rss --corpus longtail   # the issue's 1,200-doc comparison
    python benchmarks/bench_pipeline.py --docs 600 --no-rss --hidden 256 --layers 4 --no-baseline

Printed, not a test. The model is a random-weight Qwen3 with the real Qwen vocabulary (tests/qwen_fixtures.py),
hidden 128 and 2 layers unless ``--hidden`` / ``--layers`` say otherwise. The job runs as ``rayembed embed``
(``pipelines.cli.main``) in a fresh process.

Baseline (``--baseline``, on by default): the hand-written Ray Data pattern a user would write, on the efficiency
corpus, one run: ``ray.data.read_parquet``, ``map_batches`` over a class running the official Qwen3-Embedding snippet
(``AutoTokenizer`` / ``AutoModel``, its ``tokenize`` with left padding, ``last_token_pool``, ``F.normalize``) with
``batch_size=32``, then ``write_parquet``; Ray's defaults otherwise (one actor booking 1 CPU). Printed: its wall time
(``ray.init`` excluded, as for the job) and job / hand-written (target >= 8 at 1,200 docs).

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
import re
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def longtail_texts(n_docs: int) -> list[str]:
    """bench_operator.py's corpus: lognormal token counts (median 150, sigma 1.0, capped at 4,096), real Qwen words."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from bench_operator import build_corpus

    from tests.qwen_fixtures import build_qwen_tokenizer

    return build_corpus(build_qwen_tokenizer(), n_docs, 0, 150.0, 1.0, 4096)[0]


def make_corpus(root: str, n_docs: int, shards: int, short: bool = False, longtail: bool = False) -> None:
    from tests.corpus import make_docs, write_parquet

    per = (n_docs + shards - 1) // shards
    texts = longtail_texts(n_docs) if longtail else None
    for k in range(shards):
        docs = make_docs(min(per, n_docs - k * per), seed=k, start_id=k * per)
        if texts is not None:
            docs = [{**d, "text": texts[d["id"]]} for d in docs]
        if short:
            # Driver memory depends on rows, shards and parts, not on text length: short texts keep 100k docs quick.
            docs = [{**d, "text": f"{d['lang']} doc {d['id']}"} for d in docs]
        write_parquet(docs, os.path.join(root, f"shard-{k:04d}.parquet"))


READY_FILE_ENV = "RAYEMBED_BENCH_READY_FILE"  # pipelines.testhooks.READY_FILE_ENV
SUMMARY = re.compile(r"rayembed embed: .*?(\d+) docs, (\d+) tokens")


def _resources(argv: list[str]) -> dict:
    """The model actor's resources as the job computes them (best effort: the pipelines' internals move)."""
    try:
        from pipelines import cli
        from pipelines.jobs.embed import embed_resources

        args = cli.build_parser().parse_args(argv)
        cfg = cli.make_job("embed", cli._values(args)).cfg
        res = embed_resources(cfg, cfg.dim or 1024)
        return {"threads": res.threads, "batch_rows": res.batch_rows, "num_cpus": res.num_cpus}
    except Exception as e:  # noqa: BLE001
        return {"threads": None, "batch_rows": None, "num_cpus": None, "resources_error": f"{type(e).__name__}: {e}"}


def run_job(inp: str, out: str, model: str, options: dict, stats: bool = False) -> dict:
    """``rayembed embed`` through ``pipelines.cli.main`` in this (fresh) process, Ray started first and apart."""
    import contextlib
    import io

    import ray

    from pipelines import cli

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ready_file = os.path.join(os.path.dirname(out), f"ready-{os.path.basename(out)}.txt")
    os.environ[READY_FILE_ENV] = ready_file  # the driver forwards it to the model actors
    # The runner wraps stages with the hooks (the ready file's writer among them) only when a RAYEMBED_TEST_* variable
    # is set; a sleep at a point that does not exist sets one and does nothing.
    os.environ.setdefault("RAYEMBED_TEST_SLEEP_AT", "bench-no-such-point:0")
    t = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_init = time.perf_counter() - t
    argv = ["embed", "--input", inp, "--output", out, "--model", model, "--quiet"]
    for k, v in options.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    res = _resources(argv)
    buf = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(argv)
    t1 = time.time()
    if rc:
        sys.exit(f"the job failed with {rc}: {buf.getvalue()[-2000:]}")
    m = SUMMARY.search(buf.getvalue())
    docs, tokens = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    with open(ready_file) as f:
        # <ready> <pid> <process start> <__init__ start> per actor (pipelines/testhooks.py); the first one
        first = min(tuple(float(x) for x in line.split()) for line in f if line.strip())
    ready, _pid, spawned, init = first
    wall, after = t1 - t0, t1 - ready
    return {
        "docs": docs,
        "tokens": tokens,
        "wall": wall,
        "tokens_per_s": tokens / wall,
        "startup": ready - t0,
        # the first actor's start-up: job start to its process start (plan, Ray Data planning, actor scheduling),
        # process start to __init__ (worker start-up, imports), __init__ (the model load)
        "startup_parts": {"until_spawn": spawned - t0, "imports": init - spawned, "init": ready - init},
        "after_startup_wall": after,
        "after_startup_tokens_per_s": tokens / after,
        "ray_init": ray_init,
        **res,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# The hand-written Ray Data pattern (issue 14): read_parquet, map_batches over a class running the official
# Qwen3-Embedding snippet with batch 32 (its tokenize, left padding, last_token_pool, F.normalize), write_parquet;
# Ray's defaults otherwise (one actor, 1 CPU booked, so one torch thread). Timed in a fresh process, ray.init apart.
HANDWRITTEN = """
import sys, time
import ray
t = time.perf_counter()
ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
ray_init = time.perf_counter() - t
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

def last_token_pool(last_hidden_states, attention_mask):
    left_padding = (attention_mask[:, -1].sum() == attention_mask.shape[0])
    if left_padding:
        return last_hidden_states[:, -1]
    else:
        sequence_lengths = attention_mask.sum(dim=1) - 1
        batch_size = last_hidden_states.shape[0]
        return last_hidden_states[torch.arange(batch_size, device=last_hidden_states.device), sequence_lengths]

def tokenize(tokenizer, input_texts, eod_id, max_length):
    batch_dict = tokenizer(input_texts, padding=False, truncation=True, max_length=max_length - 2)
    batch_dict["input_ids"] = [_ + [eod_id] for _ in batch_dict["input_ids"]]
    batch_dict["attention_mask"] = [_ + [1] for _ in batch_dict["attention_mask"]]
    batch_dict = tokenizer.pad(batch_dict, padding=True, return_tensors="pt")
    return batch_dict

class Embed:
    def __init__(self, path):
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.model = AutoModel.from_pretrained(path).eval()
        self.eod_id = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def __call__(self, batch):
        batch_dict = tokenize(self.tokenizer, list(batch["text"]), self.eod_id, 8192)
        with torch.no_grad():
            outputs = self.model(**batch_dict)
        embeddings = last_token_pool(outputs.last_hidden_state, batch_dict["attention_mask"])
        batch["embedding"] = F.normalize(embeddings, p=2, dim=1).numpy()
        return batch

inp, out, model = sys.argv[1:4]
t0 = time.time()
ds = ray.data.read_parquet(inp).map_batches(Embed, fn_constructor_args=(model,), batch_size=32, concurrency=1)
ds.write_parquet(out)
print(f"HANDWRITTEN {time.time() - t0:.3f} {ray_init:.3f}")
"""


def handwritten(inp: str, out: str, model: str) -> dict:
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    p = subprocess.run([sys.executable, "-c", HANDWRITTEN, inp, out, model], capture_output=True, text=True, env=env)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("HANDWRITTEN ")), None)
    if p.returncode or line is None:
        sys.exit(f"the hand-written Ray Data job failed:\n{p.stderr[-3000:]}")
    wall, ray_init = (float(x) for x in line.split()[1:])
    return {"wall": wall, "ray_init": ray_init}


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
    ap.add_argument(
        "--corpus",
        choices=["mixed", "longtail"],
        default="mixed",
        help="tests/corpus.py texts (default, up to ~600 tokens) or bench_operator.py's long tail (up to 4,096)",
    )
    ap.add_argument("--hidden", type=int, default=128, help="random Qwen3's hidden size (default 128)")
    ap.add_argument("--layers", type=int, default=2, help="random Qwen3's layers (default 2)")
    ap.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the hand-written Ray Data pattern on the efficiency corpus (default on)",
    )
    ap.add_argument("--_child", nargs=4, metavar=("INPUT", "OUTPUT", "MODEL", "OPTIONS"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._child:
        inp, out, model, options = args._child
        print(json.dumps(run_job(inp, out, model, json.loads(options))), flush=True)
        return

    from tests.qwen_fixtures import make_qwen3_dir

    options = {"rows_per_block": args.rows_per_block}
    if args.embed_batch_rows:
        options["embed_batch_rows"] = args.embed_batch_rows
    if args.threads:
        options["threads"] = args.threads
    # The job's own default in local mode with one actor: every core of this machine (pipelines.runtime).
    threads = args.threads or len(os.sched_getaffinity(0))

    tmp = tempfile.mkdtemp(prefix="bench-pipeline-")
    arch = {"hidden_size": args.hidden, "num_hidden_layers": args.layers}
    if args.hidden != 128:
        arch.update(head_dim=args.hidden // 4, intermediate_size=2 * args.hidden)
    model = make_qwen3_dir(os.path.join(tmp, "model"), **arch)
    sizes = [args.docs] + ([] if args.no_rss else [int(x) for x in args.rss_docs.split(",")])
    corpora = {}
    if args.docs in sizes[1:]:
        sizes = [args.docs] + [n for n in sizes[1:] if n != args.docs]  # the efficiency corpus keeps real texts
    for n in dict.fromkeys(sizes):
        corpora[n] = os.path.join(tmp, f"in-{n}")
        os.makedirs(corpora[n])
        longtail = args.corpus == "longtail" and n == args.docs
        make_corpus(corpora[n], n, shards=max(4, n // 5000), short=n != args.docs, longtail=longtail)

    emb = load_operator(model, threads)
    ops = [operator_only(corpora[args.docs], emb)]
    print(
        f"operator only : {ops[0]['docs']} docs, {ops[0]['tokens']} tokens, {threads} torch threads, "
        f"{ops[0]['wall']:.1f}s, {ops[0]['tokens_per_s']:,.0f} tokens/s ({_load()})",
        flush=True,
    )
    child = [sys.executable, os.path.abspath(__file__), "--_child"]
    res = {}
    for n in dict.fromkeys(sizes):
        out = subprocess.run(
            [*child, corpora[n], os.path.join(tmp, f"out-{n}"), model, json.dumps(options)],
            capture_output=True,
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
            f"{r['num_cpus']} CPU booked, {r['batch_rows']} rows per call; ray.init {r['ray_init']:.1f}s "
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
    hand = None
    if args.baseline:
        hand = handwritten(corpora[args.docs], os.path.join(tmp, "out-handwritten"), model)
        hand["tokens_per_s"] = job["tokens"] / hand["wall"]
        print(
            f"hand-written Ray Data (read_parquet, map_batches(official snippet, batch_size=32), write_parquet): "
            f"{hand['wall']:.1f}s, {hand['tokens_per_s']:,.0f} tokens/s (ray.init {hand['ray_init']:.1f}s excluded; "
            f"{_load()})",
            flush=True,
        )
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
    if hand:
        ratio = hand["wall"] / job["wall"]
        walls = f"{job['wall']:.1f}s vs {hand['wall']:.1f}s"
        print(f"job / hand-written     : {ratio:.2f}x the tokens/s ({walls}; target >= 8)")
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
                "handwritten": hand,
                "job_over_handwritten": hand["wall"] / job["wall"] if hand else None,
                "loadavg": os.getloadavg(),
            }
        )
    )


if __name__ == "__main__":
    main()
