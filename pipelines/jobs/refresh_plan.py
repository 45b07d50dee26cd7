"""The driver's side of a versioned embed output: which version this run makes, the match pass (pipelines/jobs/
refresh.py) and what it settles before the embed graph: the shards not to read again, the work file of each shard
to read, the deletes, the mass-delete guard; after the graph, the version record.

Every run on a prefix is version N+1 of it (1 on an empty prefix, "the backfill"); an input identical to version N's
commits nothing. The run id (output key, parent version, every shard's URL and fingerprint) names the scratch of the
run under ``_work/<run>/`` and stamps its markers, so a rerun of the same command after a crash resumes the same
version, and a rerun on a changed input starts the version over instead of mixing two inputs' decisions.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from operators import OUTPUT_DTYPE_NAMES, storage
from operators.errors import RayembedError
from operators.storage import Shard
from pipelines import commit, parts, testhooks, versions
from pipelines.jobs import refresh

log = logging.getLogger("rayembed")
ITEMSIZE = {"float32": 4, "float16": 2}
assert set(ITEMSIZE) == set(OUTPUT_DTYPE_NAMES)


@dataclass
class VersionRun:
    """What a run settles about the version it makes (kept in ``plan.extra["version"]``)."""

    version: int
    run: str
    parent: dict[str, Any] | None
    width: int  # bytes of one vector: the match pass carries old vectors as fixed-size binary
    unchanged: bool = False
    work: dict[str, str] = field(default_factory=dict)  # stem -> work file URL
    carried: list[str] = field(default_factory=list)  # stems whose parent files this version references as they are
    deletes: list[str] = field(default_factory=list)  # relative paths of the deletes delta
    deleted: int = 0

    @property
    def refresh(self) -> bool:
        return self.parent is not None

    def work_dir(self, output: str) -> str:
        return storage.join(output, "_work", self.run)


def run_id(key: str, parent: int | None, shards: list[Shard]) -> str:
    blob = json.dumps([key, parent, [(s.url, s.fingerprint) for s in shards]])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def start(key: str, parent: dict[str, Any] | None, shards: list[Shard], dim: int, dtype: str):
    version = 1 if parent is None else int(parent["version"]) + 1
    return VersionRun(
        version, run_id(key, None if parent is None else version - 1, shards), parent, dim * ITEMSIZE[dtype]
    )


def _same_input(parent: dict[str, Any], shards: list[Shard]) -> bool:
    have = parent.get("shards") or {}
    return len(have) == len(shards) and all(
        s.stem in have and have[s.stem]["shard"] == s.url and have[s.stem]["fingerprint"] == s.fingerprint
        for s in shards
    )


def carried_marker(entry: dict[str, Any], stem: str, key: str, vr: VersionRun) -> dict[str, Any]:
    """A parent's shard entry as this run's marker: its files referenced as they are, every row reused."""
    return {
        "format": commit.MARKER_FORMAT,
        "stem": stem,
        "output_key": key,
        **entry,
        "embedded": 0,
        "reused": entry["rows"],
        "upserted": 0,
        "upserts": [],
        "run": vr.run,
        "target": vr.version,
        "carried": True,
    }


def prepare(job, plan, shards: list[Shard], markers: dict[str, dict[str, Any]]) -> list[Shard]:
    """The shards the embed graph must read; fills ``plan.extra["version"]`` and, for shards this version carries
    over from its parent, ``markers``."""
    cfg, vr = job.cfg, plan.extra["version"]
    plan.stamp.update(run=vr.run, target=vr.version)
    if vr.parent is not None and _same_input(vr.parent, shards):
        vr.unchanged = True
        for s in shards:
            markers[s.stem] = carried_marker(vr.parent["shards"][s.stem], s.stem, plan.key, vr)
        return []
    done = {
        s.stem
        for s in shards
        if (m := markers.get(s.stem)) is not None and m.get("run") == vr.run and m.get("fingerprint") == s.fingerprint
    }
    cached = storage.join(vr.work_dir(cfg.output), "match.json")
    match = storage.read_json(cached, cfg.options)
    if match is None:
        testhooks.point("refresh.before_match")
        match = run_match(job, plan, shards)
        storage.write_json(cached, match, cfg.options)
    testhooks.point("refresh.after_match")
    vr.work, vr.deletes, vr.deleted = match["work"], match["deletes"], match["deleted"]
    plan.extra["work"] = vr.work
    _check_deletes(vr, cfg.max_delete_ratio)
    for stem in match["carried"]:
        if stem not in done:
            markers[stem] = carried_marker(vr.parent["shards"][stem], stem, plan.key, vr)
    vr.carried = list(match["carried"])
    skip = done | set(vr.carried)
    return [s for s in shards if s.stem not in skip]


def _check_deletes(vr: VersionRun, ratio: float) -> None:
    rows = int(vr.parent["counts"]["rows"]) if vr.parent else 0
    if rows and vr.deleted / rows > ratio:
        raise RayembedError(
            f"refresh would delete {vr.deleted} of {rows} rows ({vr.deleted / rows:.1%}) of version "
            f"{vr.version - 1}, above --max-delete-ratio {ratio:g}; nothing committed"
        )


def _items(shards: list[Shard], parent: dict[str, Any] | None, output: str) -> list[dict[str, Any]]:
    items = [{"kind": "new", "src": i, **it} for i, it in enumerate(parts.shard_items(shards))]
    blank = {k: v for k, v in items[0].items() if k not in ("kind", "src", "url")}
    blank = {k: (0 if isinstance(v, int) else "") for k, v in blank.items()}
    for j, rel in enumerate((parent or {}).get("files", [])):
        items.append({"kind": "old", "src": j, "url": storage.join(output, rel), **blank})
    return items


def run_match(job, plan, shards: list[Shard]) -> dict[str, Any]:
    """The match pass, on the engine or (a small input) in this process; returns what the driver keeps of it: one
    entry per shard and bucket."""
    cfg, vr = job.cfg, plan.extra["version"]
    so = cfg.options
    items = _items(shards, vr.parent, cfg.output)
    parent_rows = int(vr.parent["counts"]["rows"]) if vr.parent else 0
    buckets = cfg.match_buckets or refresh.bucket_count(sum(s.size for s in shards), parent_rows, vr.width)
    read_cfg = {
        "id_column": cfg.id_column,
        "text_column": cfg.text_column,
        "passthrough": cfg.passthrough,
        "storage_options": so,
    }
    stems = [s.stem for s in shards]
    have = (vr.parent or {}).get("shards") or {}
    unchanged = np.array([s.stem in have and have[s.stem]["fingerprint"] == s.fingerprint for s in shards], dtype=bool)
    key_kw = {"cfg": read_cfg, "width": vr.width, "buckets": buckets}
    match_kw = {
        "width": vr.width,
        "refresh": vr.refresh,
        "output": cfg.output,
        "deletes_dir": f"_deltas/{vr.version:08d}/deletes",
        "id_type": plan.extra.get("id_type"),
        "storage_options": so,
    }
    route_kw = {"work_dir": vr.work_dir(cfg.output), "stems": stems, "unchanged": unchanged, "storage_options": so}
    key_bytes = sum(s.size for s in shards) + parent_rows * (refresh.KEY_ROW_BYTES + vr.width)
    inline = key_bytes <= refresh.inline_match_bytes()
    log.info(
        "match: %d input shards, %d parent files, %d buckets, %s",
        len(shards),
        len(items) - len(shards),
        buckets,
        "in the driver (a small input)" if inline else "on Ray Data",
    )
    if inline:
        records = refresh.match_in_process(
            items, key_kw=key_kw, match_kw=match_kw, route_kw=route_kw, backfill=not vr.refresh
        )
    else:
        records = _match_on_engine(cfg, items, buckets, key_kw, match_kw, route_kw, backfill=not vr.refresh)
    work, carried, deletes, deleted = {}, [], [], 0
    for r in records:
        if r["src"] < 0:
            deleted += r["deletes"]
            if r["deletes_file"]:
                deletes.append(r["deletes_file"])
        elif r["work"]:
            work[stems[r["src"]]] = r["work"]
        elif unchanged[r["src"]]:
            carried.append(stems[r["src"]])
    log.info(
        "match: %d shards to rewrite with reused vectors, %d carried as they are, %d ids deleted",
        len(work),
        len(carried),
        deleted,
    )
    return {"work": work, "carried": sorted(carried), "deletes": sorted(deletes), "deleted": deleted}


def _match_on_engine(cfg, items, buckets: int, key_kw: dict, match_kw: dict, route_kw: dict, backfill: bool):
    import ray.data

    from pipelines.runtime import init_ray

    init_ray(cfg.address)
    with refresh.shuffle_strategy(len(items), buckets):
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            refresh.key_rows, batch_size=1, batch_format="numpy", fn_kwargs=key_kw
        )
        decided = ds.groupby("_bucket", num_partitions=buckets).map_groups(
            refresh.match_bucket, batch_format="pyarrow", fn_kwargs=match_kw
        )
        if backfill:
            # A backfill decides only its duplicates (rare; a refresh's decisions carry vectors and stream on): with
            # none, there is no work file to write and no second shuffle to run.
            decided = decided.materialize()
            if decided.count() == 0:
                return []
        shards = len(route_kw["stems"])
        routed = decided.groupby("_src", num_partitions=min(shards + 1, 200)).map_groups(
            refresh.write_work, batch_format="pyarrow", fn_kwargs=route_kw
        )
        return [r for b in routed.iter_batches(batch_format="pyarrow", batch_size=None) for r in b.to_pylist()]


# ---------------------------------------------------------------------------------------------------- the record


def record(job, plan, markers: list[dict[str, Any]]) -> dict[str, Any]:
    """The version record of this run from its shards' markers (this run's and the carried parent entries)."""
    vr = plan.extra["version"]
    ms = sorted(markers, key=lambda m: m["stem"])
    own = [m for m in ms if not m.get("carried")]
    rows = sum(m["rows"] for m in ms)
    counts = {
        "rows": rows,
        "embedded": sum(m.get("embedded", 0) for m in own),
        "reused": sum(m.get("reused", 0) for m in ms),
        "upserted": rows if vr.version == 1 else sum(m.get("upserted", 0) for m in own),
        "deleted": vr.deleted,
        "quarantined": sum(m["errors"] for m in ms),
    }
    shard_keys = (
        "shard",
        "fingerprint",
        "rows",
        "errors",
        "tokens",
        "truncated",
        "files",
        "error_files",
        "duplicates",
    )
    rec = versions.make_record(
        vr.version,
        plan.key,
        [f for m in ms for f in m["files"]],
        config=plan.config,
        model=plan.model,
        error_files=[f for m in ms for f in m["error_files"]],
        upserts=[u for m in own for u in m.get("upserts", [])] if vr.version > 1 else [],
        deletes=vr.deletes if vr.version > 1 else [],
        counts=counts,
        totals={
            "shards": len(ms),
            "rows": rows,
            "errors": counts["quarantined"],
            "tokens": sum(m["tokens"] for m in ms),
            "files": sum(len(m["files"]) for m in ms),
        },
    )
    rec["shards"] = {m["stem"]: {k: m.get(k, 0) for k in shard_keys} for m in ms}
    return rec


def commit_version(job, plan, markers: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Write the version record and the manifest (the commit point), then drop the run's scratch. Nothing when the
    input is the parent's."""
    cfg, vr = job.cfg, plan.extra["version"]
    if vr.unchanged:
        return None
    rec = record(job, plan, markers)
    versions.commit_version(cfg.output, rec, cfg.options)
    try:  # best effort: vacuum removes what a crash here leaves
        fs, path = storage.get_fs(vr.work_dir(cfg.output), cfg.options)
        fs.rm(path, recursive=True)
    except Exception as e:  # noqa: BLE001 (the version is committed; scratch is only scratch)
        log.warning("could not remove %s: %s", vr.work_dir(cfg.output), storage.describe_error(e))
    return rec
