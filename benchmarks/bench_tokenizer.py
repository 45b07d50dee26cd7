"""Tokens/s of the fast tokenizer per CPU core on the long-tail corpus, and the CPUs a GPU's tokenize stage needs.

    python benchmarks/bench_tokenizer.py                      # 4,000 docs, real Qwen vocabulary; about a minute
    python benchmarks/bench_tokenizer.py --gpu-tok-s 450000   # size the stage for another GPU rate
    python benchmarks/bench_tokenizer.py --tokenizer-json /models/Qwen3-Embedding-0.6B/tokenizer.json
    python benchmarks/bench_tokenizer.py --save-tokenizer .gpu/qwen-tokenizer.json   # for gpu_check.sh elsewhere

Printed, not a test. The corpus is bench_operator.py's (lognormal token counts, median 150, sigma 1.0, cap 4,096;
single-token words from the real Qwen vocabulary, 70% English, 15% Chinese, 15% code). The tokenizer is the real Qwen
BPE vocabulary (tests/qwen_fixtures.py, from the ``dashscope`` package) or a ``tokenizer.json`` given with
``--tokenizer-json``. One core: ``TOKENIZERS_PARALLELISM=false`` and ``RAYON_NUM_THREADS=1`` are set before the
tokenizer loads, so each measurement runs on one thread. Measured, tokens counted as the model sees them (EOS, or the
reranker's prompt, included):

  hf         transformers' ``tokenizer(texts, add_special_tokens=False)`` (the path before the raw tokenizer);
  raw        ``tokenizers.Tokenizer.encode_batch_fast`` alone;
  encoder    ``operators.tokenization.TextEncoder.encode`` (truncation, EOS, int32 rows);
  stage      what the embed job's tokenize task does per block: Arrow text column to Python, ``encode``,
             ``ids_to_arrow`` plus the length column;
  pairs      ``PairEncoder.encode`` on (query, doc) pairs of the same docs (the rerank job's tokenize stage);
  N procs    ``stage`` in N processes at once on disjoint slices (does the rate scale with cores?).

``--corpus natural`` cuts real prose and code (the installed packages' Markdown, reST and transformers' modeling
files) to the same length distribution: its words are not all single vocabulary tokens, so BPE merges more per word.

Rates are printed per wall second and per CPU-second of the process (one thread, so one core's work whatever else the
machine runs). CPUs per GPU = ceil(GPU tokens/s / stage tokens per CPU-second): the cores the tokenize stage (one task
per core) needs so that tokenization never starves one model actor.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (REPO, os.path.join(REPO, "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

import pyarrow as pa  # noqa: E402

GPU_TOK_S = 400_000  # the H100 rate the issue sizes the stage for
BLOCK = 1024  # rows per tokenize task (the pipeline's default block)


def qwen_spec(path: str):
    from operators.loading import ModelSpec

    return ModelSpec(path, "qwen", "qwen3", "qwen3", "lasttoken", 128, 151669, None)


def timed(fn, texts: list, reps: int) -> tuple[float, int, float]:
    """Best of ``reps`` (wall seconds, tokens, CPU seconds) over blocks of BLOCK rows. CPU seconds (this process, one
    thread) are what a core spends, whatever else the machine runs; wall seconds include waiting for a core."""
    best, tokens, cpu = float("inf"), 0, float("inf")
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        tokens = sum(fn(texts[i : i + BLOCK]) for i in range(0, len(texts), BLOCK))
        best, cpu = min(best, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return best, tokens, cpu


def stage_fn(enc):
    from operators.tokenization import ids_to_arrow

    def run(texts: list[str]) -> int:
        table = pa.table({"text": texts})
        e = enc.encode(table["text"].to_pylist())
        lengths = e.lengths
        table.append_column("input_ids", ids_to_arrow(e.ids)).append_column("num_tokens", pa.array(lengths))
        return int(lengths.sum())

    return run


def child(tok_path: str, texts_path: str, start: int, stop: int) -> None:
    """One process of the scaling run: the stage path on its slice, one thread."""
    from tokenizers import Tokenizer

    from operators.tokenization import TextEncoder

    with open(texts_path) as f:
        texts = json.load(f)[start:stop]
    enc = TextEncoder(Tokenizer.from_file(tok_path), qwen_spec(os.path.dirname(tok_path)))
    secs, tokens, cpu = timed(stage_fn(enc), texts, 2)
    print(json.dumps({"secs": secs, "tokens": tokens, "cpu": cpu}))


def scaling(tok_path: str, texts: list[str], procs: int) -> float:
    """Aggregate stage tokens/s of ``procs`` processes running at once on disjoint slices."""
    import subprocess

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(texts, f)
    per = len(texts) // procs
    child_cmd = [sys.executable, __file__, "--_child", tok_path, f.name]
    cmds = [[*child_cmd, str(k * per), str((k + 1) * per)] for k in range(procs)]
    runs = [subprocess.Popen(c, stdout=subprocess.PIPE, text=True) for c in cmds]
    res = [json.loads(r.communicate()[0].strip().splitlines()[-1]) for r in runs]
    os.unlink(f.name)
    return sum(r["tokens"] for r in res) / max(r["secs"] for r in res)


def natural_corpus(hf, n_docs: int, seed: int) -> list[str]:
    """Real prose and code: the Markdown, reST and Python files of the installed packages, cut into docs whose token
    counts follow the same lognormal (median 150, sigma 1.0, cap 4,096) as the synthetic corpus."""
    import glob
    import random
    import sysconfig

    import numpy as np

    site = sysconfig.get_paths()["purelib"]
    files = sorted(glob.glob(os.path.join(site, "**", "*.md"), recursive=True))
    files += sorted(glob.glob(os.path.join(site, "**", "*.rst"), recursive=True))
    files += sorted(glob.glob(os.path.join(site, "transformers", "models", "*", "modeling_*.py")))[:200]
    random.Random(seed).shuffle(files)
    rng = np.random.default_rng(seed)
    targets = np.clip(np.rint(rng.lognormal(np.log(150.0), 1.0, n_docs)), 4, 4096).astype(int)
    docs, k = [], 0
    for path in files:
        with open(path, errors="replace") as f:
            ids = hf(f.read(), add_special_tokens=False)["input_ids"]
        start = 0
        while k < n_docs and start + targets[k] <= len(ids):
            docs.append(hf.decode(ids[start : start + int(targets[k]) - 1]))
            start += int(targets[k])
            k += 1
        if k == n_docs:
            break
    return docs


def build(args) -> tuple[str, object, list[str]]:
    """tokenizer.json path, an HF tokenizer on it, and the corpus texts."""
    from bench_operator import build_corpus
    from transformers import PreTrainedTokenizerFast

    tmp = tempfile.mkdtemp(prefix="bench-tok-")
    if args.tokenizer_json:
        tok_path = args.tokenizer_json
        hf = PreTrainedTokenizerFast(tokenizer_file=tok_path)
    else:
        from tests.qwen_fixtures import build_qwen_tokenizer

        hf = build_qwen_tokenizer()
        hf.save_pretrained(tmp)
        tok_path = os.path.join(tmp, "tokenizer.json")
    if args.corpus == "natural":
        return tok_path, hf, natural_corpus(hf, args.docs, args.seed)
    texts, _ = build_corpus(hf, args.docs, args.seed, 150.0, 1.0, 4096)
    return tok_path, hf, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--corpus",
        choices=["synthetic", "natural"],
        default="synthetic",
        help="bench_operator.py's long-tail corpus (default), or real prose and code from installed packages' docs",
    )
    ap.add_argument("--reps", type=int, default=3, help="best of this many passes per method")
    ap.add_argument("--procs", default="1,2", help="process counts for the scaling run (default 1,2)")
    ap.add_argument("--gpu-tok-s", type=float, default=GPU_TOK_S, help="GPU tokens/s to feed (default 400,000)")
    ap.add_argument("--tokenizer-json", help="a tokenizer.json to use instead of the Qwen vocabulary from dashscope")
    ap.add_argument("--save-tokenizer", metavar="PATH", help="write the Qwen tokenizer.json there and exit")
    ap.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.save_tokenizer:  # e.g. .gpu/qwen-tokenizer.json, for gpu_check.sh on a machine without dashscope
        from tests.qwen_fixtures import build_qwen_tokenizer

        build_qwen_tokenizer().backend_tokenizer.save(args.save_tokenizer)
        print(args.save_tokenizer)
        return
    if args._child:
        child(args._child[0], args._child[1], int(args._child[2]), int(args._child[3]))
        return

    from tokenizers import Tokenizer

    from operators.tokenization import PairEncoder, TextEncoder, encode_ids

    t0 = time.perf_counter()
    tok_path, hf, texts = build(args)
    print(f"corpus: {len(texts)} docs, built in {time.perf_counter() - t0:.0f}s; tokenizer {tok_path}", flush=True)
    spec = qwen_spec(os.path.dirname(tok_path))
    t = time.perf_counter()
    raw = Tokenizer.from_file(tok_path)  # what operators.loading.load_tokenizer does with a tokenizer.json
    load_s = time.perf_counter() - t
    enc = TextEncoder(raw, spec)
    pairs = PairEncoder(raw)
    queries = [f"what is said about {t.split()[0] if t.split() else 'this'}?" for t in texts]
    methods = {
        "hf": lambda b: sum(len(x) + 1 for x in hf(b, add_special_tokens=False)["input_ids"]),
        "raw": lambda b: sum(len(x) + 1 for x in encode_ids(raw, b)),
        "encoder": lambda b: int(enc.encode(b).lengths.sum()),
        "stage": stage_fn(enc),
    }
    res: dict[str, dict] = {}
    for name, fn in methods.items():
        secs, tokens, cpu = timed(fn, texts, args.reps)
        res[name] = {"tokens": tokens, "secs": secs, "cpu": cpu, "tok_s": tokens / secs, "tok_cpu_s": tokens / cpu}
        print(
            f"{name:8s}: {tokens:,} tokens in {secs:.2f}s = {tokens / secs:,.0f} tokens/s wall, "
            f"{tokens / cpu:,.0f} per CPU-second (one thread)",
            flush=True,
        )
    qd = list(zip(queries, texts, strict=True))
    secs, tokens, cpu = timed(lambda b: int(pairs.encode([q for q, _ in b], [d for _, d in b]).lengths.sum()), qd, 2)
    res["pairs"] = {"tokens": tokens, "secs": secs, "cpu": cpu, "tok_s": tokens / secs, "tok_cpu_s": tokens / cpu}
    print(
        f"pairs   : {tokens:,} tokens in {secs:.2f}s = {tokens / secs:,.0f} tokens/s wall, {tokens / cpu:,.0f} per "
        "CPU-second (prompt included)"
    )
    scale = {}
    for n in (int(x) for x in args.procs.split(",") if x):
        scale[n] = scaling(tok_path, texts, n)
        print(f"{n} procs : {scale[n]:,.0f} tokens/s together, {scale[n] / n:,.0f} per process", flush=True)
    # Per core: tokens per CPU-second (a busy machine's wall time would understate a core's rate).
    per_core = res["stage"]["tok_cpu_s"]
    cpus = math.ceil(args.gpu_tok_s / per_core)
    cpus_pairs = math.ceil(args.gpu_tok_s / res["pairs"]["tok_cpu_s"])
    print(f"tokenizer load (tokenizer.json, one parse): {load_s:.2f}s; load average {os.getloadavg()[0]:.2f}")
    raw_tps = res["raw"]["tok_cpu_s"]
    print(f"raw / hf: {raw_tps / res['hf']['tok_cpu_s']:.2f}x; stage / raw: {per_core / raw_tps:.2f} (CPU time)")
    print(
        f"CPUs per GPU at {args.gpu_tok_s:,.0f} tokens/s: embed tokenize stage ceil({args.gpu_tok_s:,.0f} / "
        f"{per_core:,.0f} per core) = {cpus}; rerank tokenize stage {cpus_pairs}"
    )
    summary = {"methods": res, "scaling": scale, "load_s": load_s, "cpus_per_gpu": cpus, "cpus_pairs": cpus_pairs}
    print("JSON " + json.dumps({**summary, "gpu_tok_s": args.gpu_tok_s, "docs": len(texts)}))


if __name__ == "__main__":
    main()
