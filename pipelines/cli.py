"""``rayembed``: a thin CLI over the job configs. Errors the user can fix print as one line, never a traceback.

Each job's flags are built from its config dataclass (pipelines/config.py, where every default lives) and the help
texts below; importing this module loads neither torch nor Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any

from operators import DEFAULT_EMBED_MODEL, DEFAULT_INSTRUCTION, DEFAULT_RERANK_MODEL, __version__
from operators.errors import RayembedError
from pipelines import config as C

EMBED_HELP = f"""Embed sharded text into vector Parquet shards.

Without --address (or RAY_ADDRESS) Ray starts in-process on this machine (local mode). Under `ray job submit`
RAY_ADDRESS is set and the job runs on the cluster. Output layout: <output>/data/*.parquet (vectors),
<output>/_errors/ (quarantined rows), <output>/_state/ (per-shard markers), <output>/_manifest.json (written last).
A rerun skips shards already committed with the same input fingerprint.

query mode: --instruction TASK embeds each text as "Instruct: TASK\\nQuery:TEXT" (Qwen3 convention); the usual
retrieval task is {DEFAULT_INSTRUCTION!r}. Documents take no instruction.
"""

RERANK_HELP = f"""Score query-document pairs with Qwen3-Reranker and rank each query's candidates.

Input shards (Parquet / JSONL) hold either pairs, one row per (query_id, query, doc_id, doc), or candidate lists,
one row per query: (query_id, query, candidates: [{{doc_id, doc}}, ...]). Output: <output>/data/*.parquet with
query_id, doc_id, score (float32, P(yes)) and rank (1 = best; ties by doc_id ascending), plus _errors/, _state/ and
_manifest.json as for `rayembed embed`. A query's pairs must all be in one shard (a pair shard is grouped in memory;
candidate lists stream). A query with no candidates gets one row with null doc_id, score and rank. Rows with a null
query, doc or id are quarantined. The default instruction is {DEFAULT_INSTRUCTION!r}.
"""

SEARCH_HELP = f"""Retrieve, then rerank: embed queries, exact top-k over an embed job's vectors, rerank the top k.

--queries: BEIR queries.jsonl (_id, text). --vectors: the output prefix of a finished `rayembed embed` job over the
corpus (its _manifest.json lists the vector files; the embed model, dim and max length default to its values).
--corpus: the corpus texts for reranking (BEIR corpus.jsonl: _id, title, text; the reranked document is
title + " " + text, stripped, as BEIR's rerankers do). Output: <output>/data/*.parquet with query_id, doc_id,
retrieval_score, retrieval_rank, rerank_score, rank; _errors/, _state/, _manifest.json; with --qrels (BEIR TSV
query-id, corpus-id, score) also <output>/metrics.json with nDCG@10, Recall@100 and MRR@10 for retrieval alone
and after reranking. Queries are embedded with the instruction {DEFAULT_INSTRUCTION!r} unless --instruction is set.
"""

SHARDS = "Parquet / JSONL (.jsonl, .jsonl.gz, .jsonl.zst) shards: a directory, a glob or a comma-separated list"
# Help per option. "{default}" is filled from the config field's default, so the value lives in one place.
HELP: dict[str, str] = {
    "input": f"input {SHARDS}; local paths, file://, s3:// or gs://",
    "output": "output prefix (local or s3://...); must not lie inside the input",
    "id_column": "column holding the document id (default: {default}); its type is kept",
    "text_column": "column holding the text to embed (default: {default})",
    "passthrough": "comma-separated columns copied unchanged into the output",
    "model": "hub id, local directory or s3:// prefix (default: {default}); offline machines pass a local directory",
    "revision": "hub revision (branch, tag or commit) of the model",
    "dim": "MRL output dimension, 32..hidden size (default: the full hidden size)",
    "instruction": "query mode: the task instruction (documents: leave unset)",
    "max_length": "max tokens per text, EOS included (default: {default}); longer texts are truncated and counted",
    "output_dtype": "float32 (default) or float16 vectors",
    "batch_tokens": "tokens per forward pass (default: 8192 on CPU; on CUDA sized at warm-up from the free memory, at "
    "most 131072; halves automatically on out-of-memory)",
    "rows_per_block": "rows per read block (default: {default})",
    "part_rows": "rows per output part file (default: about 128 MB of vectors, 32,513 rows at dim 1024 float32); "
    "a part moves through the graph whole",
    "embed_batch_rows": "rows per model-actor call when parts are smaller, length-sorted inside it (default: 4 x "
    "--rows-per-block on CPU, 16 x on GPU); a larger part is one call",
    "threads": "torch threads per model actor (default: local CPU mode: all cores / max actors; else --num-cpus)",
    "packing": "padding-free packing of Qwen3 micro-batches: auto (default: when a CUDA varlen attention kernel is "
    "importable), on, off",
    "concurrency": "model actors as N or MIN,MAX for an autoscaling pool (default: 1)",
    "num_gpus": "GPUs per actor, fractions allowed (default: 1 if the cluster has GPUs, else 0)",
    "num_cpus": "CPUs per model actor (default: {default})",
    "device": "cuda, cpu or auto (default: auto = cuda when available)",
    "dtype": "model dtype: bfloat16 (CUDA default), float32 (CPU default) or float16",
    "max_error_ratio": "fail the job when more than this fraction of rows is quarantined (default: {default})",
    "max_delete_ratio": "refuse a refresh that would delete more than this fraction of the previous version's rows "
    "(default: {default}); 1 allows any",
    "match_buckets": "buckets of a refresh's match shuffle (default: about 256 MB of key rows each)",
    "storage_options": 'JSON object passed to fsspec, e.g. \'{{"endpoint_url": "http://127.0.0.1:9000"}}\'; AWS_* '
    "variables and instance roles are honoured; never logged",
    "address": "Ray cluster address (default: RAY_ADDRESS, else local mode)",
    "trust_remote_code": "allow model code from the model directory (off by default)",
    "model_impl": "how Qwen3 runs: auto (default: rayembed's native decoder, transformers' arithmetic without its "
    "3-5 s import and load, for every checkpoint it supports; transformers otherwise), native, transformers",
    "lease_ttl": "seconds: the job holds <output>/_lease.json while it runs and another job on the same output is "
    "refused; a lease whose driver sent no heartbeat for this long is expired and taken over (default: {default})",
    "lease_heartbeat": "seconds between lease renewals, below --lease-ttl (default: {default})",
    "retry_budget": "seconds one S3 request may spend retrying throttling (503 SlowDown, 5xx) and reset connections, "
    "with exponential backoff and jitter, before the job fails naming the cause (default: {default})",
    "compile": "torch.compile the model in each actor (default: on with CUDA, off on CPU): a warm-up of about a "
    "minute, then 1.7-2x tokens/s for the 0.6B on an H200; falls back to eager if compilation fails",
    # rerank
    "query_id_column": "query id column (default: {default})",
    "query_column": "query text column (default: {default})",
    "doc_id_column": "doc id column, or field of a candidate (default: {default})",
    "doc_column": "doc text column, or field of a candidate (default: {default})",
    "candidates_column": "candidate-list column (default: {default})",
    # search
    "queries": "queries: BEIR queries.jsonl (_id, text), or Parquet / JSONL shards",
    "vectors": "output prefix of a finished `rayembed embed` job over the corpus",
    "corpus": "corpus texts for reranking: BEIR corpus.jsonl (_id, title, text) or shards",
    "qrels": "BEIR qrels TSV (query-id, corpus-id, score; header line) or TREC qrels",
    "k": "documents retrieved and reranked per query (default: {default})",
    "embed_model": "query embedding model (default: the model of the --vectors manifest)",
    "rerank_model": "reranker (default: {default})",
    "rerank_revision": "hub revision of --rerank-model",
    "rerank_instruction": "the reranker's instruction (default: the same default task)",
    "rerank_max_length": "max tokens per pair (default: {default})",
    "query_text_column": "query text column (default: {default})",
    "corpus_id_column": "corpus id column (default: {default})",
    "corpus_title_column": "corpus title column (default: {default}; absent or null: no title)",
    "corpus_text_column": "corpus text column (default: {default})",
    "queries_per_block": "queries per actor call and per output part (default: {default})",
    "retrieval_tasks": "Ray tasks the vector files are split over (default: 2 per cluster CPU)",
}
# Where a job gives an option another meaning.
JOB_HELP: dict[tuple[str, str], str] = {
    ("rerank", "input"): f"input {SHARDS} of pairs or candidate lists",
    ("rerank", "model"): f"reranker: hub id, local directory or s3:// prefix (default: {DEFAULT_RERANK_MODEL})",
    ("rerank", "instruction"): f"the reranker's task instruction (default: {DEFAULT_INSTRUCTION!r})",
    ("rerank", "max_length"): "max tokens per pair, prompt included (default: {default}); longer docs are cut",
    ("rerank", "rows_per_block"): "pairs per block, about (default: {default}); a query is never split",
    ("rerank", "concurrency"): "reranker actors as N or MIN,MAX for an autoscaling pool (default: 1)",
    ("search", "revision"): "hub revision of --embed-model",
    ("search", "instruction"): f"query instruction of the embedder (default: {DEFAULT_INSTRUCTION!r})",
    ("search", "max_length"): "max query tokens (default: the --vectors manifest's)",
    ("search", "concurrency"): "search actors, each holding the embedder and the reranker on one device (default: 1)",
    ("embed", "model"): f"hub id, local directory or s3:// prefix (default: {DEFAULT_EMBED_MODEL}); offline machines "
    "pass a local directory",
}
JOBS = {
    "embed": (C.EmbedJobConfig, "embed text shards into vector Parquet shards", EMBED_HELP),
    "rerank": (C.RerankJobConfig, "score and rank query-document pairs with Qwen3-Reranker", RERANK_HELP),
    "search": (
        C.SearchJobConfig,
        "retrieve (exact top-k over embed-job vectors), then rerank; BEIR metrics with --qrels",
        SEARCH_HELP,
    ),
}
# Options with a fixed set of values.
CHOICES = {"packing": ["auto", "on", "off"], "model_impl": ["auto", "native", "transformers"]}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line plus the usage hint, exit 2
        self.exit(2, f"rayembed: error: {message} (see --help)\n")


def add_job_args(p: argparse.ArgumentParser, job: str, cls: type) -> None:
    """One flag per config field, typed from the field, with its help and the field's default."""
    p.add_argument("--config", metavar="JOB.yaml", help="YAML job file with any of these options (flags override it)")
    # Inputs and output first in --help; the rest in the config's order.
    first = ("input", "queries", "vectors", "corpus", "output")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    inputs = [fields[n] for n in first if n in fields]
    rest = [f for f in fields.values() if f.name not in first]
    for f in inputs + rest:
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        text = JOB_HELP.get((job, f.name), HELP[f.name]).format(default=default)
        kind = str(f.type)
        if kind == "bool":
            p.add_argument(flag, action="store_true", default=None, help=text)
        elif kind == "bool | None":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            cast = int if kind.startswith("int") else float if kind.startswith("float") else str
            p.add_argument(flag, type=cast, choices=CHOICES.get(f.name), help=text)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from pipelines import commands, status

    parser = _Parser(prog="rayembed", description="Embed and rerank text with Qwen3 models on Ray Data.")
    parser.add_argument("--version", action="version", version=f"rayembed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (cls, short, long) in JOBS.items():
        p = sub.add_parser(name, help=short, description=long, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_job_args(p, name, cls)
        p.set_defaults(handler=run_job)
    status.add_parser(sub)
    commands.register(sub)
    return parser


def _values(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = C.load_job_file(args.config) if getattr(args, "config", None) else {}
    skip = ("command", "config", "quiet", "handler")
    values.update({k: v for k, v in vars(args).items() if k not in skip and v is not None})
    return {k: v for k, v in values.items() if v is not None}


def make_job(command: str, values: dict[str, Any]):
    """The job object for ``command`` from raw option values (what `python -m pipelines.<job>` and tests use)."""
    cfg = C.build_config(JOBS[command][0], values)
    if command == "embed":
        from pipelines.jobs.embed import EmbedJob

        return EmbedJob(cfg)
    if command == "rerank":
        from pipelines.jobs.rerank import RerankJob

        return RerankJob(cfg)
    from pipelines.jobs.search import SearchJob

    return SearchJob(cfg)


def run_job(args: argparse.Namespace) -> int:
    from pipelines.runner import run

    job = make_job(args.command, _values(args))
    if args.quiet:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    for line in run(job):
        print(line, flush=True)
    return 0


def _root_cause(e: BaseException) -> BaseException:
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = getattr(e, "cause", None) or e.__cause__
        if nxt is None:
            break
        e = nxt
    return e


def _is_storage_error(e: BaseException) -> bool:
    mod = type(e).__module__ or ""
    return isinstance(e, OSError) or mod.startswith(("botocore", "aiobotocore", "s3fs", "aiohttp", "gcsfs"))


def _one_line(e: BaseException) -> str:
    from operators.storage import describe_error

    return str(e) if isinstance(e, RayembedError) else describe_error(e)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except RayembedError as e:
        print(f"rayembed: error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        cause = _root_cause(e)
        if isinstance(cause, RayembedError) or _is_storage_error(cause):
            # A worker's storage or input error, wrapped by Ray: the traceback is in the Ray logs above.
            print(f"rayembed: error: {_one_line(cause)}", file=sys.stderr, flush=True)
            return 1
        raise
    except KeyboardInterrupt:
        print("rayembed: interrupted; committed shards are kept and a rerun resumes", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``rayembed`` command: ``main``, then a local Ray it started stopped before the process exits."""
    try:
        code = main()
    finally:
        from pipelines.runtime import stop_local_ray

        stop_local_ray()
    sys.exit(code)


if __name__ == "__main__":
    entry()
