"""Versioned outputs (``rayembed.version/1``): one immutable record per committed version, ``_manifest.json`` last.

Layout under an output prefix (the contract in the README's "Scheduled refresh" section)::

    data/<name>.parquet                            immutable parts, shared between versions
    _versions/<version:08d>.json                   one record per committed version
    _manifest.json                                 a copy of the latest record, written last: the commit point
    _deltas/<version:08d>/upserts/<name>.parquet   rows new or changed in that version (the data schema)
    _deltas/<version:08d>/deletes/<name>.parquet   column ``id``: ids removed in that version

Ray-free: every read and write goes through ``operators.storage``. A ``_versions/N.json`` newer than the manifest
is an interrupted commit, not a version: readers see only versions up to the manifest's.
"""

from __future__ import annotations

import datetime as dt
import os
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from operators import storage
from operators.errors import ConfigError

VERSION_FORMAT = "rayembed.version/1"
DELTA_KINDS = ("upserts", "deletes")
# The folders whose files a version may reference: vacuum cleans these and nothing else (never _state/ wholesale,
# never the lease, never a user's own files beside the output).
DATA_DIRS = ("data", "_errors")
_RECORD_NAME = re.compile(r"^(\d{8})\.json$")
_COUNT_KEYS = ("rows", "embedded", "reused", "upserted", "deleted", "quarantined")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def version_url(output: str, n: int) -> str:
    return storage.join(output, "_versions", f"{int(n):08d}.json")


def manifest_url(output: str) -> str:
    return storage.join(output, "_manifest.json")


def delta_dir(output: str, n: int, kind: str) -> str:
    if kind not in DELTA_KINDS:
        raise ValueError(f"delta kind must be one of {DELTA_KINDS}, got {kind!r}")
    return storage.join(output, "_deltas", f"{int(n):08d}", kind)


def absolute(output: str, rel: str) -> str:
    """The URL of a record's relative path: an absolute path for a local output, the object URL otherwise."""
    url = storage.join(output, rel)
    if storage.is_local(url):
        return os.path.abspath(url.split("://", 1)[-1])
    return url


def snapshot_urls(output: str, record: dict[str, Any]) -> list[str]:
    """The absolute URLs of the version's data files: exactly one snapshot, each id once."""
    return [absolute(output, f) for f in record["files"]]


def delta_urls(output: str, record: dict[str, Any], kind: str) -> list[str]:
    """The absolute URLs of the version's ``upserts`` or ``deletes`` files (both empty for a backfill)."""
    if kind not in DELTA_KINDS:
        raise ValueError(f"delta kind must be one of {DELTA_KINDS}, got {kind!r}")
    return [absolute(output, f) for f in (record.get("deltas") or {}).get(kind, [])]


def _check_format(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ConfigError(f"{where} is not a version record (not a JSON object)")
    fmt = record.get("format")
    if fmt != VERSION_FORMAT:
        raise ConfigError(
            f"{where} has format {fmt!r}, not {VERSION_FORMAT!r}: it is not a versioned embed output (written by "
            "an older rayembed, or by a rerank or search job); embed into a new --output to get versions"
        )
    return record


def latest(output: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The latest committed version's record (``_manifest.json``), or None when no version was committed yet."""
    url = manifest_url(output)
    record = storage.read_json(url, storage_options)
    return None if record is None else _check_format(record, url)


def load_version(output: str, n: int, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of committed version ``n``; a ConfigError that lists what exists when it is absent."""
    head = latest(output, storage_options)
    url = version_url(output, n)
    record = storage.read_json(url, storage_options) if head is not None and int(n) <= head["version"] else None
    if record is None:
        have = list_versions(output, storage_options)
        span = f"versions {have[0]}..{have[-1]}" if len(have) > 1 else f"version {have[0]}" if have else "no version"
        raise ConfigError(f"output {output!r} has no version {n} (it holds {span}; older ones may have been vacuumed)")
    return _check_format(record, url)


def _listed_versions(output: str, storage_options: dict[str, Any] | None) -> list[int]:
    urls = storage.list_files(storage.join(output, "_versions"), "*.json", storage_options)
    found = (_RECORD_NAME.match(posixpath.basename(u)) for u in urls)
    return sorted(int(m.group(1)) for m in found if m)


def list_versions(output: str, storage_options: dict[str, Any] | None = None) -> list[int]:
    """Committed versions, ascending: one listing of ``_versions/`` cut at the manifest's version."""
    head = latest(output, storage_options)
    if head is None:
        return []
    return [n for n in _listed_versions(output, storage_options) if n <= head["version"]]


def make_record(
    version: int,
    output_key: str,
    files: Iterable[str],
    *,
    config: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    error_files: Iterable[str] = (),
    upserts: Iterable[str] = (),
    deletes: Iterable[str] = (),
    counts: dict[str, int] | None = None,
    totals: dict[str, Any] | None = None,
    kind: str = "embed",
) -> dict[str, Any]:
    """A version record in the contract's shape (lists sorted, missing counts 0)."""
    return {
        "format": VERSION_FORMAT,
        "kind": kind,
        "version": int(version),
        "parent": int(version) - 1 if int(version) > 1 else None,
        "created_at": now(),
        "output_key": output_key,
        "config": dict(config or {}),
        "model": dict(model or {}),
        "files": sorted(files),
        "error_files": sorted(error_files),
        "deltas": {"upserts": sorted(upserts), "deletes": sorted(deletes)},
        "counts": {k: int((counts or {}).get(k, 0)) for k in _COUNT_KEYS},
        "totals": dict(totals or {}),
    }


def _validate(record: dict[str, Any]) -> int:
    _check_format(record, "the record to commit")
    n = record.get("version")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"a version record needs an integer version >= 1, got {n!r}")
    if record.get("parent") != (n - 1 if n > 1 else None):
        raise ConfigError(f"version {n} must have parent {n - 1 if n > 1 else None}, got {record.get('parent')!r}")
    if not record.get("output_key"):
        raise ConfigError(f"version {n} has no output_key")
    deltas = record.get("deltas") or {}
    lists = {"files": record.get("files"), **{f"deltas.{k}": deltas.get(k) for k in DELTA_KINDS}}
    for name, value in lists.items():
        relative = isinstance(value, list) and all(isinstance(p, str) and "://" not in p for p in value)
        if not relative or any(p.startswith("/") for p in value):
            raise ConfigError(f"version {n}: {name} must be a list of paths relative to the output")
    if n == 1 and (deltas.get("upserts") or deltas.get("deletes")):
        raise ConfigError("version 1 is a backfill: its upserts are its files, it has no deltas")
    return n


def commit_version(output: str, record: dict[str, Any], storage_options: dict[str, Any] | None = None) -> None:
    """Commit ``record``: ``_versions/N.json``, then ``_manifest.json`` (the commit point). Every file the record
    lists must already be durable. Refused unless N follows the latest committed version (or the output's key
    differs), so two writers never commit the same N over each other unnoticed."""
    n = _validate(record)
    head = latest(output, storage_options)
    expected = 1 if head is None else head["version"] + 1
    if n != expected:
        raise ConfigError(f"cannot commit version {n} on {output!r}: the latest committed version is {expected - 1}")
    if head is not None and head["output_key"] != record["output_key"]:
        raise ConfigError(
            f"cannot commit version {n} on {output!r}: the output holds vectors of another output key "
            f"({head['output_key']}, not {record['output_key']}); a new model is a new --output"
        )
    record = {**record, "files": sorted(record["files"])}
    # A rerun after a crash between the two writes rewrites N.json: it was never a committed version.
    storage.write_json(version_url(output, n), record, storage_options)
    storage.write_json(manifest_url(output), record, storage_options)


# ----------------------------------------------------------------------------------------------------------- vacuum


@dataclass
class VacuumSummary:
    kept: list[int]
    removed_versions: list[int] = field(default_factory=list)
    removed_files: list[str] = field(default_factory=list)  # relative paths: data/, _errors/, _deltas/ files
    removed_markers: list[str] = field(default_factory=list)
    dry_run: bool = False

    def line(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        kept = f"{self.kept[0]}..{self.kept[-1]}" if len(self.kept) > 1 else str(self.kept[0])
        deltas = sum(1 for f in self.removed_files if f.startswith("_deltas/"))
        return (
            f"vacuum: kept version{'s' if len(self.kept) > 1 else ''} {kept}; {verb} "
            f"{len(self.removed_versions)} version record(s), {len(self.removed_files) - deltas} data/error file(s), "
            f"{deltas} delta file(s), {len(self.removed_markers)} stale marker(s)"
        )


def _referenced(record: dict[str, Any]) -> set[str]:
    deltas = record.get("deltas") or {}
    return set(record["files"]) | set(record.get("error_files", [])) | {p for k in DELTA_KINDS for p in deltas[k]}


def _all_files(output: str, storage_options: dict[str, Any] | None) -> list[str]:
    """Relative paths of everything under data/, _errors/ and _deltas/ (temp files of killed writers included)."""
    fs, root = storage.get_fs(output, storage_options)
    root = root.rstrip("/")
    found: list[str] = []
    for sub in (*DATA_DIRS, "_deltas", "_work"):
        try:
            paths = fs.find(posixpath.join(root, sub))
        except FileNotFoundError:
            continue
        found += [posixpath.relpath(p, root) for p in paths]
    return sorted(found)


def _strings(obj: Any) -> Iterable[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _check_lease(output: str, storage_options: dict[str, Any] | None) -> None:
    from pipelines.lease import LeaseHeldError, describe_holder, lease_state, lease_url

    lease = storage.read_json(lease_url(output), storage_options)
    if lease_state(lease) == "live":
        raise LeaseHeldError(
            f"output {output!r} is leased by {describe_holder(lease)}: vacuum refuses while a job runs on it; "
            "retry when the job has finished"
        )


def _vacuum_head(output: str, keep: int, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ConfigError(f"--keep must be an integer >= 1 (the latest version is always kept), got {keep!r}")
    head = latest(output, storage_options)
    if head is None:
        raise ConfigError(f"output {output!r} has no committed version (no _manifest.json): nothing to vacuum")
    return head


def plan_vacuum(output: str, keep: int, storage_options: dict[str, Any] | None = None) -> VacuumSummary:
    """What ``vacuum`` would delete, without deleting anything."""
    head = _vacuum_head(output, keep, storage_options)
    listed = _listed_versions(output, storage_options)
    kept = [n for n in listed if n <= head["version"]][-keep:]
    referenced: set[str] = set()
    for n in kept:
        referenced |= _referenced(head if n == head["version"] else load_version(output, n, storage_options))
    summary = VacuumSummary(kept=kept, dry_run=True)
    summary.removed_versions = [n for n in listed if n not in kept]  # older ones and interrupted commits
    summary.removed_files = [p for p in _all_files(output, storage_options) if p not in referenced]
    gone = set(summary.removed_files)
    for url in storage.list_files(storage.join(output, "_state"), "*.json", storage_options):
        marker = storage.read_json(url, storage_options)
        if marker is not None and any(s in gone for s in _strings(marker)):
            summary.removed_markers.append(posixpath.basename(url))
    return summary


def vacuum(
    output: str, keep: int, storage_options: dict[str, Any] | None = None, *, dry_run: bool = False
) -> VacuumSummary:
    """Keep the latest ``keep`` versions; delete every data, error and delta file none of them references (older
    versions' files and the leftovers of interrupted runs), the older and the uncommitted version records, and the
    ``_state/`` markers that point at a deleted file (so a rerun redoes that shard instead of trusting it).

    Refused while a live lease is held; vacuum holds the lease itself while it deletes, so no job starts under it.
    Records go first, files after: a vacuum killed half-way leaves orphans for the next one, never a record whose
    files are gone."""
    from pipelines.lease import Lease

    _check_lease(output, storage_options)
    if dry_run:
        return plan_vacuum(output, keep, storage_options)
    _vacuum_head(output, keep, storage_options)  # before the lease: an empty prefix gets no lease file
    with Lease(output, storage_options=storage_options, info={"kind": "vacuum"}):
        summary = plan_vacuum(output, keep, storage_options)
        summary.dry_run = False
        storage.remove([version_url(output, n) for n in summary.removed_versions], storage_options)
        storage.remove([storage.join(output, "_state", m) for m in summary.removed_markers], storage_options)
        storage.remove([storage.join(output, p) for p in summary.removed_files], storage_options)
        _remove_empty_delta_dirs(output, storage_options)
    return summary


def _remove_empty_delta_dirs(output: str, storage_options: dict[str, Any] | None) -> None:
    """Local outputs keep empty directories after their files go; object stores have none to remove."""
    root = storage.join(output, "_deltas")
    if not storage.is_local(root):
        return
    root = root.split("://", 1)[-1]
    for dirpath, _dirs, _files in sorted(os.walk(root, topdown=False), reverse=True):
        if dirpath != root and not os.listdir(dirpath):
            os.rmdir(dirpath)
