"""Shared assertions on an embed job's output: exactly-once ids, unit vectors, operator equality, manifest totals."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators.storage import get_fs


def read_output(out: str, storage_options: dict | None = None) -> tuple[dict, pa.Table]:
    fs, root = get_fs(out, storage_options)
    manifest = json.loads(fs.cat_file(f"{root}/_manifest.json"))
    tables = [pq.read_table(io.BytesIO(fs.cat_file(f"{root}/{f}"))) for f in manifest["files"]]
    on_disk = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/data", detail=False))
    assert on_disk == sorted(f.rsplit("/", 1)[-1] for f in manifest["files"]), "data/ holds files outside the manifest"
    return manifest, pa.concat_tables(tables)


def check_embed_output(
    out: str,
    docs: list[dict],
    reference: dict,
    *,
    dim: int,
    passthrough=("lang", "score"),
    storage_options=None,
    atol: float = 1e-5,
) -> tuple[dict, pa.Table]:
    manifest, table = read_output(out, storage_options)
    ids = table["id"].to_pylist()
    assert sorted(ids) == sorted(d["id"] for d in docs), "every input id must appear exactly once"
    assert len(set(ids)) == len(ids)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), dim)
    vecs = np.asarray(table["embedding"].combine_chunks().values.to_numpy()).reshape(-1, dim)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    ref = np.stack([reference[i] for i in ids])
    assert np.abs(vecs - ref).max() <= atol
    by_id = {d["id"]: d for d in docs}
    for col in passthrough:
        assert table[col].to_pylist() == [by_id[i][col] for i in ids], f"pass-through column {col} changed"
    totals = manifest["totals"]
    assert totals["rows"] == table.num_rows == len(docs)
    assert totals["files"] == len(manifest["files"])
    assert totals["errors"] == 0
    return manifest, table
