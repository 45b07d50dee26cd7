"""``rayembed``: a thin CLI over the job configs. Errors the user can fix print as one line, never a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from operators import DEFAULT_EMBED_MODEL, DEFAULT_INSTRUCTION, __version__
from operators.errors import RayembedError
from pipelines.config import DEFAULT_MAX_ERROR_RATIO, DEFAULT_ROWS_PER_BLOCK, build_embed_config, load_job_file

EMBED_HELP = f"""Embed sharded text into vector Parquet shards.

Without --address (or RAY_ADDRESS) Ray starts in-process on this machine (local mode). Under `ray job submit`
RAY_ADDRESS is set and the job runs on the cluster. Output layout: <output>/data/*.parquet (vectors),
<output>/_errors/ (quarantined rows), <output>/_state/ (per-shard markers), <output>/_manifest.json (written last).
A rerun skips shards already committed with the same input fingerprint.

query mode: --instruction TASK embeds each text as "Instruct: TASK\\nQuery:TEXT" (Qwen3 convention); the usual
retrieval task is {DEFAULT_INSTRUCTION!r}. Documents take no instruction.
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
        help="padded tokens per forward pass (default: 8192 on CPU, 65536 on "
        "CUDA; halves automatically on out-of-memory)",
    )
    p.add_argument(
        "--rows-per-block", type=int, help=f"rows per block and per output part (default: {DEFAULT_ROWS_PER_BLOCK})"
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
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


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
    return parser


def _values(args: argparse.Namespace, skip: tuple[str, ...]) -> dict[str, Any]:
    values: dict[str, Any] = load_job_file(args.config) if getattr(args, "config", None) else {}
    for k, v in vars(args).items():
        if k not in skip and v is not None:
            values[k] = v
    return values


def _run_embed(args: argparse.Namespace) -> int:
    from pipelines.embed import run_embed

    cfg = build_embed_config(_values(args, skip=("command", "config", "quiet")))
    if args.quiet:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    summary = run_embed(cfg)
    print(summary.line(), flush=True)
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
        if args.command == "embed":
            return _run_embed(args)
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
