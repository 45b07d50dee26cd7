"""``rayembed status OUTPUT``: what an embed output prefix holds, while its job runs or after it ended.

Reads only the output contract: ``_state/*.json`` markers, ``_lease.json`` and ``_manifest.json``; lists the input
(given, or recorded in the lease or manifest) to find the shards still pending or whose input changed (stale).
"""

from __future__ import annotations

import json
import time
from typing import Any

from operators import storage
from operators.errors import RayembedError
from pipelines import commit
from pipelines.config import parse_storage_options
from pipelines.lease import describe_holder, lease_state, lease_url


def collect_status(
    output: str, inputs: list[str] | None = None, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    markers = commit.load_markers(output, storage_options)
    lease = storage.read_json(lease_url(output), storage_options)
    manifest = storage.read_json(storage.join(output, "_manifest.json"), storage_options)
    if not markers and lease is None and manifest is None:
        raise RayembedError(f"{output!r} holds no rayembed embed output (no _state/, _lease.json or _manifest.json)")
    if not inputs:
        inputs = (lease or {}).get("input") or ((manifest or {}).get("config") or {}).get("input")
    report: dict[str, Any] = {
        "output": output,
        "input": inputs,
        "done": len(markers),
        "rows": sum(m["rows"] for m in markers.values()),
        "quarantined": sum(m["errors"] for m in markers.values()),
        "tokens": sum(m["tokens"] for m in markers.values()),
        "files": sum(len(m["files"]) for m in markers.values()),
        "shards_with_quarantined_rows": sorted(s for s, m in markers.items() if m["errors"]),
        "pending": None,
        "stale": None,
        "total_shards": None,
        "lease": None,
        "manifest": None,
    }
    if inputs:
        shards = storage.list_shards(inputs, storage_options)
        report["total_shards"] = len(shards)
        report["pending"] = [s.stem for s in shards if s.stem not in markers]
        report["stale"] = [
            s.stem for s in shards if s.stem in markers and markers[s.stem].get("fingerprint") != s.fingerprint
        ]
        report["done"] = sum(
            1 for s in shards if s.stem in markers and markers[s.stem].get("fingerprint") == s.fingerprint
        )
    if lease is not None:
        state = lease_state(lease)
        report["lease"] = {
            "state": state,
            "holder": lease.get("holder"),
            "heartbeat_age_s": round(time.time() - float(lease.get("heartbeat_at", 0)), 1),
            "ttl_s": lease.get("ttl_s"),
            "outcome": lease.get("outcome"),
        }
    if manifest is not None:
        report["manifest"] = {"written_at": manifest.get("written_at"), "totals": manifest.get("totals")}
    return report


def format_status(r: dict[str, Any]) -> str:
    lines = [f"rayembed status: {r['output']}"]
    if r["total_shards"] is not None:
        lines.append(
            f"  shards: {r['done']} done, {len(r['pending'])} pending, {len(r['stale'])} stale "
            f"(input changed), {r['total_shards']} in the input"
        )
    else:
        lines.append(f"  shards: {r['done']} done (input unknown: pass --input to count pending ones)")
    lines.append(
        f"  rows: {r['rows']} written, {r['quarantined']} quarantined, {r['tokens']} tokens, {r['files']} data files"
    )
    if r["shards_with_quarantined_rows"]:
        lines.append(f"  shards with quarantined rows: {', '.join(r['shards_with_quarantined_rows'])}")
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
    m = r["manifest"]
    if m is None:
        lines.append("  manifest: none (the job has not finished successfully yet)")
    else:
        t = m["totals"]
        lines.append(
            f"  manifest: written {m['written_at']}: {t['shards']} shards, {t['rows']} rows, {t['errors']} "
            f"quarantined, {t['files']} files"
        )
    return "\n".join(lines)


def run_status(args: Any) -> int:
    so = parse_storage_options(getattr(args, "storage_options", None))
    inputs = [p.strip() for p in args.input.split(",") if p.strip()] if getattr(args, "input", None) else None
    report = collect_status(args.output, inputs, so)
    print(json.dumps(report, indent=2, sort_keys=True) if getattr(args, "json", False) else format_status(report))
    return 0
