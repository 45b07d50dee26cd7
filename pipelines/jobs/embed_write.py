"""The embed graph's last step: each packed part written as one immutable file, with its quarantine part and, on a
refresh, its upserts delta; one small record per part for the driver's commit."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from operators import storage
from pipelines import parts, telemetry


def write_parts(
    batch: pa.Table,
    *,
    output: str,
    id_column: str,
    passthrough: tuple[str, ...],
    metadata: dict[str, str],
    storage_options: dict[str, Any] | None = None,
    version: int | None = None,
    refresh: bool = False,
) -> pa.Table:
    """Write each packed part of this batch (pipelines/jobs/embed_stages.py ``cut_parts``: one shard's consecutive
    rows) as one immutable file named by the shard, the part's first row offset and the version, plus a quarantine
    part for its bad rows and, on a refresh, its upserted rows under ``_deltas/<version>/upserts/``. Returns one
    record per part."""
    records = []
    retries = storage.take_retries()
    out = Out(output, id_column, passthrough, metadata, storage_options, version, refresh)
    tables = parts.unpack(batch) if parts.PACKED in batch.column_names else [batch]
    for table in tables:
        if "_retries" in table.column_names:
            retries += int(pc.sum(table["_retries"]).as_py() or 0)
        for stem in pc.unique(table["_shard"]).to_pylist():
            records.append(out.part(table.filter(pc.equal(table["_shard"], stem)).sort_by("_offset"), stem))
    if records:
        records[0]["retries"] = retries
    telemetry.record(telemetry.ROWS_QUARANTINED, sum(r["errors"] for r in records), stage="write")
    telemetry.record(telemetry.STORAGE_RETRIES, retries, stage="write")
    return parts.records_table(records)


class Out:
    """Where and how one job writes its parts."""

    def __init__(self, output, id_column, passthrough, metadata, storage_options, version, refresh):
        self.output, self.id_column, self.passthrough = output, id_column, tuple(passthrough)
        self.metadata, self.so, self.version, self.refresh = metadata, storage_options, version, refresh

    def _data(self, rows: pa.Table) -> pa.Table:
        cols = {"id": rows[self.id_column], "embedding": rows["embedding"]}
        if "content_hash" in rows.column_names:
            cols["content_hash"] = rows["content_hash"]
        return parts.with_metadata(pa.table({**cols, **{c: rows[c] for c in self.passthrough}}), self.metadata)

    def part(self, sub: pa.Table, stem: str) -> dict[str, Any]:
        first = int(sub["_offset"][0].as_py())
        bad_mask = pc.is_valid(sub["error"])
        good, bad = sub.filter(pc.invert(bad_mask)), sub.filter(bad_mask)
        reused = good["_reuse"] if "_reuse" in good.column_names else pa.array([False] * len(good))
        n_reused = int(pc.sum(reused.cast(pa.int64())).as_py() or 0) if len(good) else 0
        rec = parts.record(
            stem,
            first,
            rows=len(good),
            errors=len(bad),
            tokens=int(pc.sum(good["num_tokens"]).as_py() or 0) if len(good) else 0,
            truncated=int(pc.sum(good["truncated"].cast(pa.int64())).as_py() or 0) if len(good) else 0,
            shard_rows=int(pc.max(sub["_shard_rows"]).as_py()),
            embedded=len(good) - n_reused,
            reused=n_reused,
            duplicates=int(pc.sum(pc.equal(bad["error_type"], "DuplicateId").cast(pa.int64())).as_py() or 0)
            if len(bad)
            else 0,
        )
        name = parts.part_name(stem, first, self.version)
        if len(good):
            rel = f"data/{name}"
            parts.write_parquet(self._data(good), storage.join(self.output, rel), self.so)
            rec["file"] = rel
            if self.refresh:
                self._upserts(good, reused, stem, first, rec)
        if len(bad):
            rel = f"_errors/{name}"
            parts.write_parquet(self._errors(bad, stem), storage.join(self.output, rel), self.so)
            rec["errors_file"] = rel
        return rec

    def _upserts(self, good: pa.Table, reused: pa.Array, stem: str, first: int, rec: dict[str, Any]) -> None:
        """The rows new or changed in this version: embedded ones, and reused ones whose pass-through changed."""
        changed = pc.or_(pc.invert(reused), good["_upsert"]) if "_upsert" in good.column_names else pc.invert(reused)
        up = good.filter(changed)
        rec["upserted"] = len(up)
        if len(up):
            rel = f"_deltas/{self.version:08d}/upserts/{parts.part_name(stem, first)}"
            parts.write_parquet(self._data(up), storage.join(self.output, rel), self.so)
            rec["upserts_file"] = rel

    def _errors(self, bad: pa.Table, stem: str) -> pa.Table:
        ids = bad[self.id_column] if self.id_column in bad.column_names else pa.nulls(len(bad))
        return pa.table(
            {
                "id": pa.array([None if v is None else str(v) for v in ids.to_pylist()], pa.string()),
                "shard": pa.array([stem] * len(bad), pa.string()),
                "row_offset": bad["_offset"],
                "error_type": bad["error_type"],
                "message": bad["error"],
            },
            schema=parts.ERROR_SCHEMA,
        )
