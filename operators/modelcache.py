"""Copies of remote model prefixes (``s3://...``) into a per-machine cache, once, under a file lock."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
import tempfile
from collections.abc import Sequence
from typing import Any

from operators.storage import StorageError, describe_error, get_fs, object_version


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
        h.update(f"\0{rel}\0{info.get('size')}\0{object_version(info)}".encode())
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
