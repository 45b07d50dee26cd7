"""The output contract: per-shard completion markers under ``_state/`` and the ``_manifest.json`` written last.

A shard counts as done only when its marker exists and its fingerprint matches the input; readers trust only the
files the manifest lists.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from operators import __version__, storage
from operators.errors import ConfigError
from operators.storage import Shard
from pipelines.parts import part_pattern

MANIFEST_FORMAT = "rayembed.manifest/1"
MARKER_FORMAT = "rayembed.shard/1"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def marker_url(output: str, stem: str) -> str:
    return storage.join(output, "_state", f"{stem}.json")


def output_key(settings: dict[str, Any]) -> str:
    """Digest of everything that changes the vectors. Shards committed under another key cannot be mixed in."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def load_markers(output: str, storage_options: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """All committed markers, by stem. One listing, then parallel reads: cheap for 100k shards on S3."""
    urls = storage.list_files(storage.join(output, "_state"), "*.json", storage_options)
    with ThreadPoolExecutor(max_workers=16) as pool:
        markers = list(pool.map(lambda u: storage.read_json(u, storage_options), urls))
    return {m["stem"]: m for m in markers if m and m.get("format") == MARKER_FORMAT}


def plan(shards: list[Shard], markers: dict[str, dict[str, Any]], key: str) -> tuple[list[Shard], list[Shard]]:
    """(pending, done): a shard is done when its marker has the same fingerprint and output key."""
    pending, done = [], []
    for s in shards:
        m = markers.get(s.stem)
        if m is not None and m.get("output_key") != key:
            raise ConfigError(
                f"output prefix already holds shard {s.stem!r} embedded with different settings (model, dim, "
                "instruction, max length or dtype); write to a new --output"
            )
        (done if m is not None and m.get("fingerprint") == s.fingerprint else pending).append(s)
    return pending, done


@dataclass
class ShardProgress:
    shard: Shard
    parts: list[dict[str, Any]] = field(default_factory=list)
    total: int | None = None

    @property
    def seen(self) -> int:
        return sum(p["rows"] + p["errors"] for p in self.parts)

    @property
    def complete(self) -> bool:
        return self.total is not None and self.seen == self.total

    def add(self, rec: dict[str, Any]) -> None:
        self.parts.append(rec)
        if rec["shard_rows"] >= 0:
            self.total = rec["shard_rows"]


def commit_shard(
    output: str,
    progress: ShardProgress,
    key: str,
    storage_options: dict[str, Any] | None,
    stamp: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the shard's marker (its data parts are already durable), then delete stale parts of earlier attempts.

    ``stamp`` (a versioned output's ``run`` and ``target`` version) goes into the marker; then only parts of the same
    version are stale: an earlier version's parts belong to that version until vacuum retires it."""
    parts = sorted(progress.parts, key=lambda p: p["part"])
    files = [p["file"] for p in parts if p["file"]]
    error_files = [p["errors_file"] for p in parts if p["errors_file"]]
    stamp = dict(stamp or {})
    marker = {
        "format": MARKER_FORMAT,
        "stem": progress.shard.stem,
        "shard": progress.shard.url,
        "fingerprint": progress.shard.fingerprint,
        "output_key": key,
        "files": files,
        "error_files": error_files,
        "rows": sum(p["rows"] for p in parts),
        "errors": sum(p["errors"] for p in parts),
        "tokens": sum(p["tokens"] for p in parts),
        "truncated": sum(p["truncated"] for p in parts),
        "committed_at": now(),
        "version": __version__,
        **{k: sum(p.get(k) or 0 for p in parts) for k in ("embedded", "reused", "upserted", "duplicates")},
        "upserts": [p["upserts_file"] for p in parts if p.get("upserts_file")],
        **stamp,
    }
    storage.write_json(marker_url(output, progress.shard.stem), marker, storage_options)
    # Parts of earlier attempts at this shard that this attempt did not rewrite: one prefix listing per directory,
    # whatever else the output holds (never a listing of all of data/).
    keep = set(files) | set(error_files)
    pattern = part_pattern(progress.shard.stem, stamp.get("target"))
    for sub in ("data", "_errors"):
        stale = [
            u
            for u in storage.list_prefix(storage.join(output, sub), f"{progress.shard.stem}-", storage_options)
            if pattern.search(u) and f"{sub}/{u.rstrip('/').rsplit('/', 1)[-1]}" not in keep
        ]
        storage.remove(stale, storage_options)
    return marker


def write_manifest(
    output: str,
    markers: Iterable[dict[str, Any]],
    config: dict[str, Any],
    model: dict[str, Any],
    storage_options: dict[str, Any] | None,
) -> dict[str, Any]:
    markers = sorted(markers, key=lambda m: m["stem"])
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": __version__,
        "written_at": now(),
        "config": config,
        "model": model,
        "files": [f for m in markers for f in m["files"]],
        "error_files": [f for m in markers for f in m["error_files"]],
        "shards": {
            m["stem"]: {k: m[k] for k in ("shard", "fingerprint", "rows", "errors", "tokens")} for m in markers
        },
        "totals": {
            "shards": len(markers),
            "rows": sum(m["rows"] for m in markers),
            "errors": sum(m["errors"] for m in markers),
            "tokens": sum(m["tokens"] for m in markers),
            "files": sum(len(m["files"]) for m in markers),
        },
    }
    storage.write_json(storage.join(output, "_manifest.json"), manifest, storage_options)
    return manifest
