"""``rayembed``: a thin CLI over the job configs. Errors the user can fix print as one line, never a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from operators import DEFAULT_EMBED_MODEL, DEFAULT_INSTRUCTION, __version__
from operators.errors import RayembedError
from pipelines.config import (
    DEFAULT_MAX_ERROR_RATIO,
    DEFAULT_QUERIES_PER_BLOCK,
    DEFAULT_RERANK_MAX_LENGTH,
    DEFAULT_ROWS_PER_BLOCK,
    DEFAULT_SEARCH_K,
    build_embed_config,
    build_rerank_config,
    build_search_config,
    load_job_file,
)

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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line plus the usage hint, exit 2
        self.exit(2, f"rayembed: error: {message} (see --help)\n")


def _embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="JOB.yaml", help="YAML job file with any of these options (flags override it)")
    p.add_argument(
        "--input",
        help="input shards: a directory, a glob, or a comma-separated list of Parquet / JSONL "
        "(.jsonl, .jsonl.gz, .jsonl.zst) files; local paths, file://, s3:// or gs://",
    )
    p.add_argument("--output", help="output prefix (local or s3://...); must not lie inside the input")
    p.add_argument("--id-column", help="column holding the document id (default: id); its type is kept")
    p.add_argument("--text-column", help="column holding the text to embed (default: text)")
    p.add_argument("--passthrough", help="comma-separated columns copied unchanged into the output")
    p.add_argument(
        "--model",
        help=f"hub id, local directory or s3:// prefix (default: {DEFAULT_EMBED_MODEL}); "
        "offline machines pass a local directory",
    )
    p.add_argument("--revision", help="hub revision (branch, tag or commit) of --model")
    p.add_argument("--dim", type=int, help="MRL output dimension, 32..hidden size (default: the full hidden size)")
    p.add_argument("--instruction", help="query mode: the task instruction (documents: leave unset)")
    p.add_argument(
        "--max-length",
        type=int,
        help="max tokens per text, EOS included (default: 8192); longer texts are truncated and counted",
    )
    p.add_argument("--output-dtype", help="float32 (default) or float16 vectors")
    p.add_argument(
        "--batch-tokens",
        type=int,
        help="tokens per forward pass (default: 8192 on CPU; on CUDA sized at warm-up from the free memory, at most "
        "131072; halves automatically on out-of-memory)",
    )
    p.add_argument(
        "--rows-per-block", type=int, help=f"rows per block and per output part (default: {DEFAULT_ROWS_PER_BLOCK})"
    )
    p.add_argument(
        "--embed-batch-rows",
        type=int,
        help="rows per model-actor call, length-sorted inside it (default: 4 x --rows-per-block on CPU, 16 x on GPU)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads per model actor (default: local CPU mode: all cores / max actors; else --num-cpus)",
    )
    p.add_argument(
        "--packing",
        choices=["auto", "on", "off"],
        help="padding-free packing of Qwen3 micro-batches: auto (default: when a CUDA varlen attention kernel is "
        "importable), on, off",
    )
    p.add_argument("--concurrency", help="model actors as N or MIN,MAX for an autoscaling pool (default: 1)")
    p.add_argument(
        "--num-gpus", type=float, help="GPUs per actor, fractions allowed (default: 1 if the cluster has GPUs, else 0)"
    )
    p.add_argument("--num-cpus", type=float, help="CPUs per model actor (default: 1)")
    p.add_argument("--device", help="cuda, cpu or auto (default: auto = cuda when available)")
    p.add_argument("--dtype", help="model dtype: bfloat16 (CUDA default), float32 (CPU default) or float16")
    p.add_argument(
        "--max-error-ratio",
        type=float,
        help=f"fail the job when more than this fraction of rows is quarantined (default: {DEFAULT_MAX_ERROR_RATIO})",
    )
    p.add_argument(
        "--storage-options",
        help='JSON object passed to fsspec, e.g. \'{"endpoint_url": '
        '"http://127.0.0.1:9000"}\'; AWS_* variables and instance roles are honoured; never logged',
    )
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local mode)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="allow model code from the model directory (off by default)",
    )
    p.add_argument(
        "--lease-ttl",
        type=float,
        help="seconds: the job holds <output>/_lease.json while it runs and another job on the same output is "
        "refused; a lease whose driver sent no heartbeat for this long is expired and taken over (default: 60)",
    )
    p.add_argument(
        "--lease-heartbeat", type=float, help="seconds between lease renewals, below --lease-ttl (default: 10)"
    )
    p.add_argument(
        "--retry-budget",
        type=float,
        help="seconds one S3 request may spend retrying throttling (503 SlowDown, 5xx) and reset connections, with "
        "exponential backoff and jitter, before the job fails naming the cause (default: 120)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model in each actor (default: on with CUDA, off on CPU): a warm-up of about a minute, "
        "then 1.7-2x tokens/s for the 0.6B on an H200; falls back to eager if compilation fails",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _run_args(p: argparse.ArgumentParser, concurrency_help: str) -> None:
    """Options every job shares: model actors, devices, errors, storage, Ray."""
    p.add_argument(
        "--batch-tokens",
        type=int,
        help="padded tokens per forward pass (default: 8192 on CPU, 65536 on CUDA; halves on out-of-memory)",
    )
    p.add_argument("--concurrency", help=concurrency_help)
    p.add_argument(
        "--num-gpus", type=float, help="GPUs per actor, fractions allowed (default: 1 if the cluster has GPUs, else 0)"
    )
    p.add_argument("--num-cpus", type=float, help="CPUs per model actor (default: 1)")
    p.add_argument("--device", help="cuda, cpu or auto (default: auto = cuda when available)")
    p.add_argument("--dtype", help="model dtype: bfloat16 (CUDA default), float32 (CPU default) or float16")
    p.add_argument(
        "--max-error-ratio",
        type=float,
        help=f"fail the job when more than this fraction of rows is quarantined (default: {DEFAULT_MAX_ERROR_RATIO})",
    )
    p.add_argument(
        "--storage-options",
        help='JSON object passed to fsspec, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'; never logged',
    )
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local mode)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="allow model code from the model directory (off by default)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _rerank_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="JOB.yaml", help="YAML job file with any of these options (flags override it)")
    p.add_argument("--input", help="input shards: a directory, a glob or a comma-separated list of Parquet / JSONL")
    p.add_argument("--output", help="output prefix (local or s3://...); must not lie inside the input")
    p.add_argument("--query-id-column", help="query id column (default: query_id)")
    p.add_argument("--query-column", help="query text column (default: query)")
    p.add_argument("--doc-id-column", help="doc id column, or field of a candidate (default: doc_id)")
    p.add_argument("--doc-column", help="doc text column, or field of a candidate (default: doc)")
    p.add_argument("--candidates-column", help="candidate-list column (default: candidates)")
    p.add_argument(
        "--model", help="reranker: hub id, local directory or s3:// prefix (default: Qwen/Qwen3-Reranker-0.6B)"
    )
    p.add_argument("--revision", help="hub revision of --model")
    p.add_argument("--instruction", help=f"the reranker's task instruction (default: {DEFAULT_INSTRUCTION!r})")
    p.add_argument(
        "--max-length",
        type=int,
        help=f"max tokens per pair, prompt included (default: {DEFAULT_RERANK_MAX_LENGTH}); longer docs are cut",
    )
    p.add_argument(
        "--rows-per-block",
        type=int,
        help=f"pairs per block, about (default: {DEFAULT_ROWS_PER_BLOCK}); a query is never split",
    )
    _run_args(p, "reranker actors as N or MIN,MAX for an autoscaling pool (default: 1)")


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="JOB.yaml", help="YAML job file with any of these options (flags override it)")
    p.add_argument("--queries", help="queries: BEIR queries.jsonl (_id, text), or Parquet / JSONL shards")
    p.add_argument("--vectors", help="output prefix of a finished `rayembed embed` job over the corpus")
    p.add_argument("--corpus", help="corpus texts for reranking: BEIR corpus.jsonl (_id, title, text) or shards")
    p.add_argument("--output", help="output prefix (local or s3://...)")
    p.add_argument("--qrels", help="BEIR qrels TSV (query-id, corpus-id, score; header line) or TREC qrels")
    p.add_argument("--k", type=int, help=f"documents retrieved and reranked per query (default: {DEFAULT_SEARCH_K})")
    p.add_argument("--embed-model", help="query embedding model (default: the model of the --vectors manifest)")
    p.add_argument("--revision", help="hub revision of --embed-model")
    p.add_argument("--rerank-model", help="reranker (default: Qwen/Qwen3-Reranker-0.6B)")
    p.add_argument("--rerank-revision", help="hub revision of --rerank-model")
    p.add_argument("--instruction", help=f"query instruction of the embedder (default: {DEFAULT_INSTRUCTION!r})")
    p.add_argument("--rerank-instruction", help="the reranker's instruction (default: the same default task)")
    p.add_argument("--max-length", type=int, help="max query tokens (default: the --vectors manifest's)")
    p.add_argument("--rerank-max-length", type=int, help=f"max tokens per pair (default: {DEFAULT_RERANK_MAX_LENGTH})")
    p.add_argument("--query-id-column", help="query id column (default: _id)")
    p.add_argument("--query-text-column", help="query text column (default: text)")
    p.add_argument("--corpus-id-column", help="corpus id column (default: _id)")
    p.add_argument("--corpus-title-column", help="corpus title column (default: title; absent or null: no title)")
    p.add_argument("--corpus-text-column", help="corpus text column (default: text)")
    p.add_argument(
        "--queries-per-block",
        type=int,
        help=f"queries per actor call and per output part (default: {DEFAULT_QUERIES_PER_BLOCK})",
    )
    p.add_argument(
        "--retrieval-tasks", type=int, help="Ray tasks the vector files are split over (default: 2 per cluster CPU)"
    )
    _run_args(p, "search actors, each holding the embedder and the reranker on one device (default: 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rayembed", description="Embed and rerank text with Qwen3 models on Ray Data.")
    parser.add_argument("--version", action="version", version=f"rayembed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    embed = sub.add_parser(
        "embed",
        help="embed text shards into vector Parquet shards",
        description=EMBED_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _embed_args(embed)
    rerank = sub.add_parser(
        "rerank",
        help="score and rank query-document pairs with Qwen3-Reranker",
        description=RERANK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _rerank_args(rerank)
    search = sub.add_parser(
        "search",
        help="retrieve (exact top-k over embed-job vectors), then rerank; BEIR metrics with --qrels",
        description=SEARCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _search_args(search)
    status = sub.add_parser(
        "status",
        help="progress of an embed output: shards done / pending / stale, rows, quarantine, lease holder",
        description="Report on an embed job's output prefix, while the job runs or after it ended: shards done "
        "(markers), pending and stale (when the input is known: from --input, the lease or the manifest), rows "
        "written and quarantined, the lease holder and the manifest totals.",
    )
    status.add_argument("output", help="the job's --output prefix")
    status.add_argument("--input", help="input shards (default: the input recorded in the lease or manifest)")
    status.add_argument("--storage-options", help="JSON object passed to fsspec, as for embed")
    status.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _values(args: argparse.Namespace, skip: tuple[str, ...]) -> dict[str, Any]:
    values: dict[str, Any] = load_job_file(args.config) if getattr(args, "config", None) else {}
    for k, v in vars(args).items():
        if k not in skip and v is not None:
            values[k] = v
    return values


def _run_job(args: argparse.Namespace, build, run) -> int:
    cfg = build(_values(args, skip=("command", "config", "quiet")))
    if args.quiet:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    summary = run(cfg)
    for line in summary.lines() if hasattr(summary, "lines") else [summary.line()]:
        print(line, flush=True)
    return 0


def _run_embed(args: argparse.Namespace) -> int:
    from pipelines.embed import run_embed

    return _run_job(args, build_embed_config, run_embed)


def _run_rerank(args: argparse.Namespace) -> int:
    from pipelines.rerank import run_rerank

    return _run_job(args, build_rerank_config, run_rerank)


def _run_search(args: argparse.Namespace) -> int:
    from pipelines.search import run_search

    return _run_job(args, build_search_config, run_search)


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
        if args.command == "embed":
            return _run_embed(args)
        if args.command == "rerank":
            return _run_rerank(args)
        if args.command == "search":
            return _run_search(args)
        if args.command == "status":
            from pipelines.status import run_status

            return run_status(args)
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
    return 1


if __name__ == "__main__":
    sys.exit(main())
