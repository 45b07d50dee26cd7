"""All storage access: listing, fingerprints, atomic writes, JSON state and model-directory copies.

Everything goes through ``fsspec.url_to_fs`` so local paths, ``file://``, ``s3://`` and ``gs://`` share one code path.
"""

from __future__ import annotations

import collections
import contextlib
import fnmatch
import io
import json
import os
import posixpath
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import fsspec
from fsspec.core import url_to_fs

from operators.errors import ConfigError, RayembedError

# Input formats by extension. The compression suffix is handled by fsspec's ``compression=`` argument.
PARQUET_EXTS = (".parquet", ".pq")
JSONL_EXTS = (".jsonl", ".ndjson")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}

# s3fs answers an unreachable endpoint only after botocore's default retries and timeouts (minutes). These defaults
# make a wrong endpoint fail in seconds; users can override each one through --storage-options. botocore makes one
# attempt per call: RetryingS3FileSystem below owns the retries (throttling, resets), with a time budget and a count.
_S3_DEFAULT_CONFIG = {
    "connect_timeout": 10,
    "read_timeout": 120,
    "retries": {"total_max_attempts": 1, "mode": "standard"},
}
DEFAULT_RETRY_BUDGET = 120.0  # seconds one S3 call may spend retrying throttling / resets before the job fails
CONNECT_RETRIES = 3  # "could not connect" is retried only this often: a wrong endpoint must fail in seconds


class StorageError(RayembedError):
    pass


@dataclass(frozen=True)
class Shard:
    """One input file. ``stem`` is unique within a job and names every output derived from this shard."""

    url: str
    stem: str
    fmt: str  # "parquet" | "jsonl"
    compression: str | None
    size: int
    version: str  # ETag on object stores, mtime locally

    @property
    def fingerprint(self) -> str:
        return f"{self.size}:{self.version}"


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def is_local(url: str) -> bool:
    return _protocol(url) in ("file", "local")


def _with_defaults(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    opts = dict(storage_options or {})
    if _protocol(url) not in ("s3", "s3a"):
        opts.pop("retry_budget", None)  # ours, for RetryingS3FileSystem only
    else:
        # Other processes (Ray workers, other jobs) write under the same prefixes: a cached listing would hide their
        # files, and s3fs consults it even for a plain read.
        opts.setdefault("use_listings_cache", False)
        cfg = dict(_S3_DEFAULT_CONFIG)
        cfg.update(opts.get("config_kwargs", {}))
        opts["config_kwargs"] = cfg
        endpoint = (
            opts.pop("endpoint_url", None)
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        if endpoint:
            client_kwargs = dict(opts.get("client_kwargs", {}))
            client_kwargs.setdefault("endpoint_url", endpoint)
            opts["client_kwargs"] = client_kwargs
    return opts


def get_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return url_to_fs(url, **_with_defaults(url, storage_options))
    except ImportError as e:
        raise StorageError(f"no filesystem for {url!r}: {e}") from None


def join(url: str, *parts: str) -> str:
    if is_local(url) and "://" not in url:
        return os.path.join(url, *parts)
    return posixpath.join(url, *parts)


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn an fs-internal path back into a URL that ``get_fs`` accepts."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return f"{protocol}://{path}"


def describe_error(e: BaseException) -> str:
    """One line for a storage exception; botocore chains are long and secrets never appear in them."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# ------------------------------------------------------------------------------------------ S3 retries with a budget

_RETRY_LOCK = threading.Lock()
_RETRIES: collections.Counter[str] = collections.Counter()  # this process's retries since the last take_retries()
def count_retry(kind: str) -> None:
    with _RETRY_LOCK:
        _RETRIES[kind] += 1


def take_retries() -> int:
    """Storage retries made by this process since the last call (Ray stages report them with their records)."""
    with _RETRY_LOCK:
        n = sum(_RETRIES.values())
        _RETRIES.clear()
    return n


# s3:// and s3a:// go through RetryingS3FileSystem (operators/s3retry.py), imported only when an S3 URL is opened.
fsspec.register_implementation("s3", "operators.s3retry.RetryingS3FileSystem", clobber=True)
fsspec.register_implementation("s3a", "operators.s3retry.RetryingS3FileSystem", clobber=True)


# --------------------------------------------------------------------------------------------------- shard listing


def _classify(name: str) -> tuple[str, str | None] | None:
    base = name.lower()
    compression = None
    for ext, comp in COMPRESSIONS.items():
        if base.endswith(ext):
            compression, base = comp, base[: -len(ext)]
            break
    if base.endswith(PARQUET_EXTS) and compression is None:
        return "parquet", None
    if base.endswith(JSONL_EXTS):
        return "jsonl", compression
    return None


def _strip_ext(name: str) -> str:
    base = name
    for ext in COMPRESSIONS:
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
    return posixpath.splitext(base)[0]


def _skipped(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def object_version(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "md5Hash", "generation"):
        if info.get(key):
            return str(info[key]).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return str(mtime)


def list_shards(inputs: str | Sequence[str], storage_options: dict[str, Any] | None = None) -> list[Shard]:
    """Expand directories, globs and explicit lists into sorted, fingerprinted shards.

    Raises a one-line error for a missing input, an empty directory, an unsupported extension or a stem collision.
    """
    items = [inputs] if isinstance(inputs, str) else list(inputs)
    if not items:
        raise ConfigError("--input is empty: give a directory, a glob or a list of Parquet/JSONL shards")
    found: list[tuple[str, str, dict[str, Any]]] = []  # (url, relative name, info)
    for item in items:
        fs, path = get_fs(item, storage_options)
        try:
            if any(ch in path for ch in "*?["):
                root = path.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0]
                matches = fs.glob(path, detail=True)
                entries = [(p, i) for p, i in sorted(matches.items()) if i.get("type") != "directory"]
                if not entries:
                    raise ConfigError(f"input {item!r} matches no files")
            elif fs.isdir(path):
                root = path.rstrip("/")
                detail = fs.find(path, detail=True)
                entries = sorted((p, i) for p, i in detail.items() if i.get("type") != "directory")
                entries = [(p, i) for p, i in entries if not _skipped(posixpath.relpath(p, root))]
                if not entries:
                    raise ConfigError(f"input directory {item!r} contains no shards")
            elif fs.exists(path):
                root = posixpath.dirname(path.rstrip("/"))
                entries = [(path, fs.info(path))]
            else:
                raise ConfigError(f"input {item!r} does not exist")
        except RayembedError:
            raise
        except Exception as e:  # botocore/aiohttp errors are not OSErrors; all of them end in one line
            raise StorageError(f"cannot list input {item!r}: {describe_error(e)}") from None
        for p, info in entries:
            rel = posixpath.relpath(p, root) if len(items) == 1 else posixpath.basename(p)
            found.append((unstrip(fs, p), rel, info))

    shards: list[Shard] = []
    stems: dict[str, str] = {}
    for url, rel, info in sorted(found, key=lambda t: t[0]):
        kind = _classify(posixpath.basename(rel))
        if kind is None:
            raise ConfigError(
                f"unsupported input file {url!r}: expected .parquet, .jsonl or .jsonl.gz/.zst "
                "(hidden and _-prefixed files are skipped)"
            )
        stem = _strip_ext(rel).replace("/", "__")
        if stem in stems:
            raise ConfigError(f"inputs {stems[stem]!r} and {url!r} map to the same output name {stem!r}; rename one")
        stems[stem] = url
        shards.append(Shard(url, stem, kind[0], kind[1], int(info.get("size") or 0), object_version(info)))
    return shards


# ------------------------------------------------------------------------------------------------- reads and writes


def open_input(shard: Shard, storage_options: dict[str, Any] | None = None) -> BinaryIO:
    fs, path = get_fs(shard.url, storage_options)
    f = fs.open(path, "rb", compression=shard.compression)
    # zstandard's decompression reader has no readline (io.UnsupportedOperation): buffer it for line iteration.
    return io.BufferedReader(f) if shard.compression == "zstd" else f


@contextlib.contextmanager
def atomic_write(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[BinaryIO]:
    """Yield a writable file whose content becomes visible at ``url`` only if the block exits cleanly.

    Local: temp file in the same directory, fsync, rename. Object stores: multipart upload with autocommit off,
    committed on success and discarded on failure; a plain ``with fs.open(url, "wb")`` would publish a truncated
    object when the body raises.
    """
    fs, path = get_fs(url, storage_options)
    if is_local(url):
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="." + os.path.basename(path))
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return
    f = fs.open(path, "wb", autocommit=False)
    try:
        yield f
        f.close()
        f.commit()
    except BaseException:
        with contextlib.suppress(Exception):
            f.discard()
        raise


def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    if _protocol(url) in ("s3", "s3a"):  # one PutObject, visible only once complete: 1 request, not a 3-part upload
        fs, path = get_fs(url, storage_options)
        fs.pipe_file(path, data)
        return
    with atomic_write(url, storage_options) as f:
        f.write(data)


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = get_fs(url, storage_options)
    return fs.cat_file(path)


def write_json(url: str, obj: Any, storage_options: dict[str, Any] | None = None) -> None:
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=True).encode(), storage_options)


def read_json(url: str, storage_options: dict[str, Any] | None = None) -> Any | None:
    """The parsed JSON at ``url``, or None when it does not exist."""
    try:
        fs, path = get_fs(url, storage_options)
        one_get = {"max_concurrency": 1} if _protocol(url) in ("s3", "s3a") else {}  # else s3fs sends a HEAD first
        return json.loads(fs.cat_file(path, **one_get))
    except FileNotFoundError:
        return None


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = get_fs(url, storage_options)
    return fs.exists(path)


def list_files(prefix: str, pattern: str = "*", storage_options: dict[str, Any] | None = None) -> list[str]:
    """URLs of the files directly under ``prefix`` whose name matches ``pattern``; empty if the prefix is absent."""
    fs, path = get_fs(prefix, storage_options)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(unstrip(fs, n) for n in names if fnmatch.fnmatch(posixpath.basename(n), pattern))


def list_prefix(directory: str, name_prefix: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """URLs of the files directly under ``directory`` whose name starts with ``name_prefix``. On S3 this is one
    delimited listing with a server-side prefix (a page per 1,000 matches): its cost does not grow with the rest of
    the directory, which is what keeps a shard commit cheap beside millions of other parts."""
    fs, path = get_fs(directory, storage_options)
    path = path.rstrip("/")
    try:
        if _protocol(directory) in ("s3", "s3a"):
            names = fs.find(path, maxdepth=1, prefix=name_prefix)
        else:
            names = [n for n in fs.ls(path, detail=False) if posixpath.basename(n).startswith(name_prefix)]
    except FileNotFoundError:
        return []
    return sorted(unstrip(fs, n) for n in names)


def remove(urls: Sequence[str], storage_options: dict[str, Any] | None = None) -> None:
    for url in urls:
        fs, path = get_fs(url, storage_options)
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)


def abort_uploads(prefix: str, storage_options: dict[str, Any] | None = None) -> int:
    """Abort the unfinished multipart uploads under ``prefix`` (object stores only): what a writer killed mid-part
    leaves behind, invisible but billed. Call it only while holding the output's lease. Returns how many."""
    if is_local(prefix) or _protocol(prefix) not in ("s3", "s3a"):
        return 0
    fs, path = get_fs(prefix, storage_options)
    return fs.abort_uploads(path) if hasattr(fs, "abort_uploads") else 0  # operators/s3retry.py's filesystem


def is_within(child: str, parent: str) -> bool:
    """True when ``child`` is ``parent`` or lies under it (an output inside an input directory, say)."""

    def norm(u: str) -> str:
        if is_local(u):
            return os.path.realpath(u.split("://", 1)[-1]).rstrip("/") + "/"
        return u.rstrip("/") + "/"

    return norm(child).startswith(norm(parent))
