"""The ``rayembed files``, ``vacuum`` and ``sync`` subcommands: Ray-free, registered by ``pipelines/cli.py``.

``register(subparsers)`` adds them; each sets ``handler`` (``args.handler(args) -> int``). Imports stay inside the
handlers so that ``rayembed --help`` loads neither torch nor lancedb nor psycopg. Errors the user can fix are
RayembedErrors, which the CLI prints as one line.
"""

from __future__ import annotations

import argparse
from typing import Any

FILES_HELP = """Print the data file URLs of one version of an embed output, one per line: exactly one snapshot, each id
once. Read them with any Parquet reader, e.g. duckdb:
  duckdb -c "SELECT count(*) FROM read_parquet([$(rayembed files OUT | sed "s/.*/'&'/" | paste -sd,)])"
"""

VACUUM_HELP = """Delete what the latest K versions do not reference: data, error and delta files of older versions,
their version records, and the leftovers of interrupted runs. A file a retained version lists is never deleted.
Refused while a job holds the output's lease. A store synced from this output must be at one of the retained
versions (or newer) to keep syncing incrementally.
"""

SYNC_HELP = """Bring a vector store to a version of an embed output (default: the latest), exactly once.

The first sync bulk-loads the snapshot; later syncs apply each newer version in order (its deletes, then its
upserts). The store records the output key and the version it holds: a repeated sync applies nothing, a store from
another model / dim / instruction is refused, and so is a store ahead of the output.

--to lancedb://DIR (or lancedb://s3://bucket/dir): an embedded LanceDB table; the applied version is its tag
  rayembed-v<version>; one sync at a time per table (a lease beside the table).
--to postgresql://USER@HOST:PORT/DB?sslmode=...: PostgreSQL with pgvector; each version is one transaction. Give
  the password through PGPASSWORD or ~/.pgpass rather than in the URI (process lists show the command line); it is
  never printed.
"""


def register(subparsers: Any) -> None:
    """Add ``files``, ``vacuum`` and ``sync`` to the CLI's subparsers."""
    files = subparsers.add_parser(
        "files",
        help="print the data file URLs of one version of an embed output",
        description=FILES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    files.add_argument("output", help="the embed job's --output prefix")
    files.add_argument("--version", type=int, help="the version (default: the latest)")
    files.add_argument("--storage-options", help="JSON object passed to fsspec, as for embed")
    files.set_defaults(handler=run_files)

    vacuum = subparsers.add_parser(
        "vacuum",
        help="delete the files no retained version references",
        description=VACUUM_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    vacuum.add_argument("output", help="the embed job's --output prefix")
    vacuum.add_argument("--keep", type=int, required=True, help="how many of the latest versions to keep (>= 1)")
    vacuum.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    vacuum.add_argument("--storage-options", help="JSON object passed to fsspec, as for embed")
    vacuum.set_defaults(handler=run_vacuum)

    sync = subparsers.add_parser(
        "sync",
        help="load an embed output into LanceDB or PostgreSQL/pgvector and keep it in sync",
        description=SYNC_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sync.add_argument("output", help="the embed job's --output prefix")
    sync.add_argument("--to", help="the store: lancedb://DIR or a postgresql:// URI (required)")
    sync.add_argument("--table", help="the table to create or update (PostgreSQL: NAME or SCHEMA.NAME) (required)")
    sync.add_argument("--version", type=int, help="bring the store to this version (default: the latest)")
    sync.add_argument(
        "--index", choices=["hnsw"], help="build an HNSW index on embedding (cosine) after loading, if absent"
    )
    sync.add_argument(
        "--batch-rows",
        type=int,
        help="rows per batch read from Parquet and sent to the store (default: about 4 MB of rows)",
    )
    sync.add_argument("--storage-options", help="JSON object passed to fsspec for reading the output")
    sync.set_defaults(handler=run_sync)


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.config import parse_storage_options

    return parse_storage_options(getattr(args, "storage_options", None))


def run_files(args: argparse.Namespace) -> int:
    from operators.errors import ConfigError
    from pipelines import versions

    so = _storage_options(args)
    if args.version is None:
        record = versions.latest(args.output, so)
        if record is None:
            raise ConfigError(f"output {args.output!r} has no committed version (no _manifest.json)")
    else:
        record = versions.load_version(args.output, args.version, so)
    for url in versions.snapshot_urls(args.output, record):
        print(url)
    return 0


def run_vacuum(args: argparse.Namespace) -> int:
    from pipelines import versions

    summary = versions.vacuum(args.output, args.keep, _storage_options(args), dry_run=args.dry_run)
    print(summary.line(), flush=True)
    return 0


def run_sync(args: argparse.Namespace) -> int:
    from operators.errors import ConfigError
    from pipelines import sync

    if not args.to:
        raise ConfigError("--to is required: lancedb://DIR or a postgresql:// URI")
    result = sync.sync(
        args.output,
        args.to,
        args.table,
        version=args.version,
        index=args.index,
        batch_rows=args.batch_rows,
        storage_options=_storage_options(args),
    )
    print(result.line(), flush=True)
    return 0
