"""``rayembed status OUTPUT``: what an embed output prefix holds, while its job runs or after it ended.

Reads only the output contract: ``_state/*.json`` markers, ``_lease.json`` and ``_manifest.json``, plus the last
``_errors/`` part of each shard with quarantined rows (to tell a failed shard from one with a few bad rows); lists the
input (given, or recorded in the lease or manifest) to find the shards still pending or whose input changed (stale).

A shard is one of: done (committed), failed (committed with a shard-level error: the reader could not open or finish
it, so its rows from that offset on are not embedded; a rerun skips it until its input changes), stale (committed from
an input that has changed since: a rerun redoes it) or pending (not committed yet).
"""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow.parquet as pq

from operators import storage
from operators.errors import RayembedError
from operators.rows import SHARD_ERROR_TYPES
from pipelines import commit, progress
from pipelines.config import parse_storage_options
from pipelines.lease import describe_holder, lease_state, lease_url


def shard_failures(
    output: str, markers: dict[str, dict[str, Any]], storage_options: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """The shard-level error record of each committed shard that has one, by stem. The reader stops at that error, so
    it is the shard's highest row offset and lies in the shard's last quarantine part (parts are named by their first
    offset): one small read per shard with quarantined rows, none for the others."""
    last = {s: max(m["error_files"]) for s, m in markers.items() if m.get("errors") and m.get("error_files")}

    def read(item: tuple[str, str]) -> tuple[str, dict[str, Any] | None]:
        stem, rel = item
        try:
            data = storage.read_bytes(storage.join(output, rel), storage_options)
        except FileNotFoundError:
            return stem, None  # a rerun is redoing the shard and removed its old parts since we read the marker
        rows = pq.read_table(io.BytesIO(data), columns=["row_offset", "error_type", "message"]).to_pylist()
        failed = [r for r in rows if r["error_type"] in SHARD_ERROR_TYPES]
        return stem, ({"shard": stem, **failed[-1]} if failed else None)

    with ThreadPoolExecutor(max_workers=16) as pool:
        return {s: r for s, r in pool.map(read, sorted(last.items())) if r is not None}


def collect_status(
    output: str, inputs: list[str] | None = None, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    markers = commit.load_markers(output, storage_options)
    lease = storage.read_json(lease_url(output), storage_options)
    manifest = storage.read_json(storage.join(output, "_manifest.json"), storage_options)
    if not markers and lease is None and manifest is None:
        raise RayembedError(f"{output!r} holds no rayembed embed output (no _state/, _lease.json or _manifest.json)")
    markers = _current_shards(markers, manifest)
    if not inputs:
        inputs = (lease or {}).get("input") or ((manifest or {}).get("config") or {}).get("input")
    report: dict[str, Any] = {
        "output": output,
        "input": inputs,
        "done": len(markers),
        "rows": sum(m["rows"] for m in markers.values()),
        "quarantined": sum(m["errors"] for m in markers.values()),
        "tokens": sum(m["tokens"] for m in markers.values()),
        "truncated": sum(m.get("truncated", 0) for m in markers.values()),
        "files": sum(len(m["files"]) for m in markers.values()),
        "shards_with_quarantined_rows": sorted(s for s, m in markers.items() if m["errors"]),
        "failed": [],
        "pending": None,
        "stale": None,
        "total_shards": None,
        "lease": None,
        "manifest": None,
    }
    current = set(markers)
    if inputs:
        shards = storage.list_shards(inputs, storage_options)
        report["total_shards"] = len(shards)
        report["pending"] = [s.stem for s in shards if s.stem not in markers]
        report["stale"] = [
            s.stem for s in shards if s.stem in markers and markers[s.stem].get("fingerprint") != s.fingerprint
        ]
        current = {s.stem for s in shards if s.stem in markers and markers[s.stem].get("fingerprint") == s.fingerprint}
    # A failed shard whose input changed since is stale (a rerun redoes it), not failed.
    failures = shard_failures(output, {s: m for s, m in markers.items() if s in current}, storage_options)
    report["failed"] = [failures[s] for s in sorted(failures)]
    report["done"] = len(current) - len(failures)
    if lease is not None:
        state = lease_state(lease)
        report["lease"] = {
            "state": state,
            "holder": lease.get("holder"),
            "heartbeat_age_s": round(time.time() - float(lease.get("heartbeat_at", 0)), 1),
            "ttl_s": lease.get("ttl_s"),
            "outcome": lease.get("outcome"),
            "job": lease.get("job"),
            "progress": lease.get("progress") if state == "live" else None,
        }
    if manifest is not None:
        written = manifest.get("written_at") or manifest.get("created_at")
        report["manifest"] = {"written_at": written, "totals": manifest.get("totals")}
        if "counts" in manifest:
            report["version"] = {"version": manifest["version"], "counts": manifest["counts"]}
    return report


def _current_shards(markers: dict[str, dict[str, Any]], manifest: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """A versioned output's shards: the latest version's, updated by the markers of the run in progress (those that
    target a later version); markers an earlier version left behind (of a shard deleted since) do not count."""
    if not manifest or "counts" not in manifest or not isinstance(manifest.get("shards"), dict):
        return markers
    latest = int(manifest["version"])
    current = {stem: {"stem": stem, **entry} for stem, entry in manifest["shards"].items()}
    current.update({s: m for s, m in markers.items() if int(m.get("target") or 0) > latest})
    return current


def format_status(r: dict[str, Any]) -> str:
    lines = [f"rayembed status: {r['output']}"]
    failed = r["failed"]
    if r["total_shards"] is not None:
        lines.append(
            f"  shards: {r['done']} done, {len(failed)} failed, {len(r['pending'])} pending, {len(r['stale'])} stale "
            f"(input changed), {r['total_shards']} in the input"
        )
    else:
        lines.append(
            f"  shards: {r['done']} done, {len(failed)} failed (input unknown: pass --input to count pending ones)"
        )
    lines.append(
        f"  rows: {r['rows']} written, {r['quarantined']} quarantined, {r['truncated']} truncated, {r['tokens']} "
        f"tokens, {r['files']} data files"
    )
    if r["shards_with_quarantined_rows"]:
        lines.append(f"  shards with quarantined rows: {', '.join(r['shards_with_quarantined_rows'])}")
    if failed:
        lines.append("  failed shards (not read to the end; fix the input, then rerun: a changed shard is redone):")
        lines += [f"    {f['shard']}: {f['error_type']} at row {f['row_offset']}: {f['message']}" for f in failed]
    lease = r["lease"]
    if lease is None:
        lines.append("  lease: none")
    elif lease["state"] == "released":
        lines.append(f"  lease: released; last job {lease['holder'].get('job_id')} {lease['outcome']}")
    else:
        lines.append(
            f"  lease: {lease['state']}, held by {describe_holder(lease)}, "
            f"last heartbeat {lease['heartbeat_age_s']:.0f}s ago (ttl {lease['ttl_s']:g}s)"
        )
        if lease.get("progress"):
            lines.append(f"  progress ({lease.get('job') or 'job'}): {progress.describe(lease['progress'])}")
    m = r["manifest"]
    if m is None:
        lines.append("  manifest: none (the job has not finished successfully yet)")
    else:
        t = m["totals"]
        lines.append(
            f"  manifest: written {m['written_at']}: {t['shards']} shards, {t['rows']} rows, {t['errors']} "
            f"quarantined, {t['files']} files"
        )
    if r.get("version"):
        c = r["version"]["counts"]
        lines.append(
            f"  version: {r['version']['version']} ({c['rows']} rows, {c['embedded']} embedded, {c['reused']} reused, "
            f"{c['upserted']} upserted, {c['deleted']} deleted, {c['quarantined']} quarantined)"
        )
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    """The ``rayembed status`` subcommand."""
    p = sub.add_parser(
        "status",
        help="progress of an output: shards done / pending / stale, rows, quarantine, lease holder",
        description="Report on a job's output prefix, while the job runs or after it ended: shards done "
        "(markers), pending and stale (when the input is known: from --input, the lease or the manifest), rows "
        "written and quarantined, the lease holder and the manifest totals.",
    )
    p.add_argument("output", help="the job's --output prefix")
    p.add_argument("--input", help="input shards (default: the input recorded in the lease or manifest)")
    p.add_argument("--storage-options", help="JSON object passed to fsspec, as for embed")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=run_status)


def run_status(args: Any) -> int:
    so = parse_storage_options(getattr(args, "storage_options", None))
    inputs = [p.strip() for p in args.input.split(",") if p.strip()] if getattr(args, "input", None) else None
    report = collect_status(args.output, inputs, so)
    print(json.dumps(report, indent=2, sort_keys=True) if getattr(args, "json", False) else format_status(report))
    return 0
