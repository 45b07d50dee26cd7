"""All storage access: listing, fingerprints, atomic writes, JSON state and model-directory copies.

Everything goes through ``fsspec.url_to_fs`` so local paths, ``file://``, ``s3://`` and ``gs://`` share one code path.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fnmatch
import hashlib
import http.client
import io
import json
import os
import posixpath
import random
import tempfile
import threading
import time
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
_THROTTLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
}


def take_retries() -> int:
    """Storage retries made by this process since the last call (Ray stages report them with their records)."""
    with _RETRY_LOCK:
        n = sum(_RETRIES.values())
        _RETRIES.clear()
    return n


def _retry_kind(e: BaseException) -> str | None:
    """The cause to name when ``e`` is transient (throttling, 5xx, a reset connection), else None."""
    from botocore.exceptions import ClientError, EndpointConnectionError, HTTPClientError
    from botocore.parsers import ResponseParserError

    if isinstance(e, ClientError):
        err = e.response.get("Error", {}) or {}
        code = str(err.get("Code", ""))
        status = int((e.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode") or 0)
        if code in _THROTTLE_CODES or status in (500, 502, 503, 504):
            return f"{code or status} (HTTP {status})" if status else code
        return None
    if isinstance(e, EndpointConnectionError):
        # "Could not connect" covers a refused connection (wrong endpoint: fail fast) and a reset one (retry).
        cause = str(getattr(e, "kwargs", {}).get("error", "")).lower()
        return "connection error (reset)" if "reset" in cause or "disconnect" in cause else "connect"
    transient = (HTTPClientError, ResponseParserError, ConnectionError, TimeoutError, http.client.IncompleteRead)
    if isinstance(e, transient):
        return f"connection error ({type(e).__name__})"
    mod = type(e).__module__ or ""
    if mod.startswith("aiohttp") and type(e).__name__ in (
        "ServerDisconnectedError",
        "ClientOSError",
        "ClientPayloadError",
        "ServerTimeoutError",
    ):
        return f"connection error ({type(e).__name__})"
    return None


try:
    import s3fs
    from fsspec.asyn import sync_wrapper
    from s3fs.core import translate_boto_error
except ImportError:  # no s3fs: s3:// URLs fail in get_fs with a clear message
    s3fs = None

if s3fs is not None:

    class RetryingS3FileSystem(s3fs.S3FileSystem):
        """s3fs whose every S3 call retries throttling (503 SlowDown, 5xx) and reset connections with exponential
        backoff and full jitter until ``retry_budget`` seconds have passed since the call's first failure; then it
        raises a StorageError that names the cause. Retries are counted per process (``take_retries``)."""

        def __init__(self, *args: Any, retry_budget: float = DEFAULT_RETRY_BUDGET, **kwargs: Any):
            self.retry_budget = float(retry_budget)
            super().__init__(*args, **kwargs)

        async def _call_s3(self, method, *akwarglist, **kwargs):
            await self.set_session()
            s3 = await self.get_s3(kwargs.get("Bucket"))
            fn = getattr(s3, method)
            call_kwargs = self._get_s3_method_kwargs(fn, *akwarglist, **kwargs)
            deadline, attempt = None, 0
            while True:
                try:
                    return await fn(**call_kwargs)
                except Exception as e:
                    kind = _retry_kind(e)
                    if kind is None or (kind == "connect" and attempt + 1 >= CONNECT_RETRIES):
                        raise translate_boto_error(e) from e
                    now = time.monotonic()
                    deadline = deadline if deadline is not None else now + self.retry_budget
                    if now >= deadline:
                        where = f"{kwargs.get('Bucket', '')}/{kwargs.get('Key', '')}".rstrip("/")
                        raise StorageError(
                            f"S3 {method} {where} still failing after {attempt} retries within the "
                            f"{self.retry_budget:g}s retry budget (--retry-budget): {kind}: {describe_error(e)}"
                        ) from None
                    attempt += 1
                    with _RETRY_LOCK:
                        _RETRIES[kind] += 1
                    # Full jitter: uniform in [0, min(cap, base * 2**attempt)], never past the deadline.
                    delay = random.uniform(0, min(5.0, 0.05 * 2**attempt))
                    await asyncio.sleep(max(0.0, min(delay, deadline - now)))

        call_s3 = sync_wrapper(_call_s3)  # the base class binds its own _call_s3 here (S3File uses it)

    fsspec.register_implementation("s3", RetryingS3FileSystem, clobber=True)
    fsspec.register_implementation("s3a", RetryingS3FileSystem, clobber=True)


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


def _version(info: dict[str, Any]) -> str:
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
        shards.append(Shard(url, stem, kind[0], kind[1], int(info.get("size") or 0), _version(info)))
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
        return json.loads(read_bytes(url, storage_options))
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
    bucket, _, key = path.partition("/")
    key = key.rstrip("/") + "/"
    n, markers = 0, {}
    while True:
        resp = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key, **markers)
        for up in resp.get("Uploads", []) or []:
            with contextlib.suppress(Exception):
                fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                n += 1
        if not resp.get("IsTruncated"):
            return n
        markers = {"KeyMarker": resp["NextKeyMarker"], "UploadIdMarker": resp["NextUploadIdMarker"]}


def is_within(child: str, parent: str) -> bool:
    """True when ``child`` is ``parent`` or lies under it (an output inside an input directory, say)."""

    def norm(u: str) -> str:
        if is_local(u):
            return os.path.realpath(u.split("://", 1)[-1]).rstrip("/") + "/"
        return u.rstrip("/") + "/"

    return norm(child).startswith(norm(parent))


# -------------------------------------------------------------------------------------------- model directory copies


def prefix_fingerprint(url: str, storage_options: dict[str, Any] | None = None) -> tuple[str, list[tuple[str, int]]]:
    """A digest of a remote prefix's listing (names, sizes, ETags) and the files to copy."""
    fs, path = get_fs(url, storage_options)
    try:
        detail = fs.find(path, detail=True)
    except Exception as e:
        raise StorageError(f"cannot list model prefix {url!r}: {describe_error(e)}") from None
    files = sorted(
        (posixpath.relpath(p, path.rstrip("/")), i) for p, i in detail.items() if i.get("type") != "directory"
    )
    if not files:
        raise StorageError(f"model prefix {url!r} is empty or does not exist")
    h = hashlib.sha256(url.encode())
    for rel, info in files:
        h.update(f"\0{rel}\0{info.get('size')}\0{_version(info)}".encode())
    return h.hexdigest()[:16], [(rel, int(info.get("size") or 0)) for rel, info in files]


def copy_prefix_to_cache(
    url: str, cache_root: str, storage_options: dict[str, Any] | None = None, only: Sequence[str] | None = None
) -> tuple[str, bool]:
    """Copy a remote model prefix into ``cache_root`` once per machine; returns (local dir, copied by this call).

    Concurrent callers (actors on one node) serialise on an flock; the first copies into a temp dir and renames it,
    the others find the finished copy. The cache key includes the listing's ETags, so a changed model is re-copied.
    ``only`` (fnmatch patterns) copies a subset, e.g. the tokenizer and config files for CPU-only stages.
    """
    import fcntl

    key, files = prefix_fingerprint(url, storage_options)
    if only is not None:
        files = [(rel, size) for rel, size in files if any(fnmatch.fnmatch(rel, pat) for pat in only)]
        key += "-" + hashlib.sha256("\0".join(only).encode()).hexdigest()[:8]
    os.makedirs(cache_root, exist_ok=True)
    name = posixpath.basename(url.rstrip("/")) or "model"
    final = os.path.join(cache_root, f"{name}-{key}")
    with open(os.path.join(cache_root, f".{name}-{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.isdir(final):
                return final, False
            fs, path = get_fs(url, storage_options)
            tmp = tempfile.mkdtemp(dir=cache_root, prefix=f".{name}-{key}-")
            for rel, _size in files:
                dest = os.path.join(tmp, rel)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                fs.get_file(posixpath.join(path.rstrip("/"), rel), dest)
            os.replace(tmp, final)
            return final, True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
