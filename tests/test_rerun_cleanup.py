"""A rerun over a shrunk or changed shard into the same output leaves no stale part and no stale row readable.

The first run of each test writes a shard in several parts (``--part-rows 4``) with a quarantined row in its last
part; the input then changes and the same command runs again. After the rerun ``data/`` and ``_errors/`` must hold
exactly the files that ``_manifest.json`` or a retained version lists, and the latest version must list only the new
rows with the new texts' vectors and only the new quarantine records. Version 2's parts carry their version in their
names, so they never overwrite a part version 1 references.

Planted bug these tests catch: ``commit_shard`` skipping the deletion of a shard's stale parts (tests/README.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import cli
from tests.corpus import make_docs, write_parquet

ROWS_PER_BLOCK = 4  # parts at offsets 0, 4, 8, 12: a shard of 14 rows has four
ATOL = 1e-5


@pytest.fixture(scope="module")
def reference(qwen_model_dir):
    """The operator run directly on the texts: the vectors a clean run must write."""
    from operators.embedder import Embedder

    return Embedder(qwen_model_dir, device="cpu", dtype="float32")


def _docs(n: int, seed: int, start_id: int = 0, null_at: tuple[int, ...] = ()) -> list[dict]:
    docs = make_docs(n, seed=seed, start_id=start_id)
    for d in docs:
        d["text"] = d["text"][:200]  # short: this file is about files on disk, not throughput
    for i in null_at:
        docs[i]["text"] = None
    return docs


def _embed(inp: Path, out: Path, model: str) -> str:
    argv = ["embed", "--input", str(inp), "--output", str(out), "--model", model, "-q"]
    argv += ["--rows-per-block", str(ROWS_PER_BLOCK), "--part-rows", str(ROWS_PER_BLOCK), "--max-error-ratio", "0.5"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(argv)
    assert rc == 0, buf.getvalue()
    return buf.getvalue()


def _listed(out: Path) -> tuple[dict, list[str], list[str]]:
    """The manifest, and the data/ and _errors/ file names it lists."""
    manifest = json.loads((out / "_manifest.json").read_text())
    return manifest, sorted(manifest["files"]), sorted(manifest["error_files"])


def _on_disk(out: Path, sub: str) -> set[str]:
    d = out / sub
    return {f"{sub}/{f}" for f in os.listdir(d)} if d.is_dir() else set()


def _retained(out: Path) -> set[str]:
    """Files that a retained earlier version may still reference: none until ``_versions/`` exists."""
    d = out / "_versions"
    records = [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.is_dir() else []
    return {f for r in records for f in (*r.get("files", ()), *r.get("error_files", ()))}


def _read(out: Path, files: list[str]) -> pa.Table | None:
    return pa.concat_tables([pq.read_table(out / f) for f in files]) if files else None


def _check_output(out: Path, docs: list[dict], reference) -> dict:
    """On disk exactly the files the manifest (or a retained version) lists, so a reader that globs ``data/*.parquet``
    (the README's DuckDB query) sees what the manifest does; what it lists is exactly ``docs``: each row with its
    current text's vector, each null text as one quarantine record."""
    manifest, files, error_files = _listed(out)
    for sub, listed in (("data", files), ("_errors", error_files)):
        disk = _on_disk(out, sub)
        assert set(listed) <= disk, f"{sub}/ lacks files the manifest lists"
        assert not disk - set(listed) - _retained(out), f"{sub}/ holds stale files: {sorted(disk - set(listed))}"

    good = [d for d in docs if d["text"] is not None]
    table = _read(out, files)
    ids = table["id"].to_pylist()
    assert sorted(ids) == sorted(d["id"] for d in good), "a stale (or missing) row is readable"
    vecs = np.asarray(table["embedding"].combine_chunks().values.to_numpy()).reshape(len(ids), -1)
    by_id = {d["id"]: d["text"] for d in good}
    ref = reference.embed([by_id[i] for i in ids])
    assert np.abs(vecs - ref).max() <= ATOL, "a row's vector is not its current text's"

    bad = sorted(str(d["id"]) for d in docs if d["text"] is None)
    errors = _read(out, error_files)
    assert sorted(errors["id"].to_pylist() if errors is not None else []) == bad, "stale quarantine records"
    assert manifest["totals"]["rows"] == len(good) and manifest["totals"]["errors"] == len(bad)
    return manifest


def test_rerun_over_shrunk_shard_drops_its_stale_parts(tmp_path, qwen_model_dir, reference, ray_local):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    keep = _docs(6, seed=1, start_id=500)
    write_parquet(keep, str(inp / "keep.parquet"))
    before = _docs(14, seed=2, null_at=(13,))  # parts 0, 4, 8, 12; row 13's error in _errors/s-000000000012
    write_parquet(before, str(inp / "s.parquet"))
    _embed(inp, out, qwen_model_dir)
    _, files, error_files = _listed(out)
    assert [f for f in files if f.startswith("data/s-")] == [
        f"data/s-{k:012d}-v00000001.parquet" for k in (0, 4, 8, 12)
    ]
    assert error_files == ["_errors/s-000000000012-v00000001.parquet"]
    _check_output(out, keep + before, reference)

    after = before[:5]  # rows 0..4: parts 0 and 4 remain; 8, 12 and the error part 12 must go
    write_parquet(after, str(inp / "s.parquet"))
    stdout = _embed(inp, out, qwen_model_dir)
    assert "2 shards (1 processed, 1 already committed), 5 docs" in stdout
    manifest = _check_output(out, keep + after, reference)
    assert [f for f in manifest["files"] if f.startswith("data/s-")] == [
        f"data/s-{k:012d}-v00000002.parquet" for k in (0, 4)
    ]
    assert manifest["error_files"] == []


def test_rerun_over_changed_shard_drops_its_stale_parts(tmp_path, qwen_model_dir, reference, ray_local):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    keep = _docs(6, seed=3, start_id=500)
    write_parquet(keep, str(inp / "keep.parquet"))
    before = _docs(14, seed=4, null_at=(13,))
    write_parquet(before, str(inp / "s.parquet"))
    _embed(inp, out, qwen_model_dir)
    _check_output(out, keep + before, reference)

    # Same length, new texts and ids (rows 10.. get new ids): every part name is reused, but the part at 8 is now all
    # quarantined (no data part may remain there), the error moves from part 12 to part 0, and part 12 is all good.
    after = _docs(14, seed=5, null_at=(2, 8, 9, 10, 11))
    for d in after[10:]:
        d["id"] += 1000
    write_parquet(after, str(inp / "s.parquet"))
    stdout = _embed(inp, out, qwen_model_dir)
    assert "2 shards (1 processed, 1 already committed), 9 docs" in stdout
    manifest = _check_output(out, keep + after, reference)
    assert [f for f in manifest["files"] if f.startswith("data/s-")] == [
        f"data/s-{k:012d}-v00000002.parquet" for k in (0, 4, 12)
    ]
    assert manifest["error_files"] == [
        "_errors/s-000000000000-v00000002.parquet",
        "_errors/s-000000000008-v00000002.parquet",
    ]
