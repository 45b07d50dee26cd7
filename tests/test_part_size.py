"""Output parts are right-sized: ``--part-rows`` rows per file (default about 128 MB of vectors), cut from each shard
alone, whatever the read blocks and however Ray Data batches the model stage.

Planted bugs these tests catch: a writer that cuts parts per batch again (a shard then gets a file per batch that
touches it), a part cut that loses or repeats the rows at a block boundary, and a default that ignores the dtype.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import cli, parts, versions
from pipelines.config import EmbedJobConfig
from pipelines.jobs.embed import part_rows
from pipelines.jobs.embed_stages import cut_parts
from tests.corpus import make_docs, write_parquet

PART_ROWS = 8
ROWS_PER_BLOCK = 5  # does not divide PART_ROWS: parts straddle read blocks
ATOL = 1e-5


def test_default_part_rows_follow_dim_and_dtype():
    cfg = EmbedJobConfig(input=("in",), output="out")
    assert part_rows(cfg, 1024) == 128 * 2**20 // (1024 * 4 + 32) == 32513
    half = EmbedJobConfig(input=("in",), output="out", output_dtype="float16")
    assert part_rows(half, 1024) == 128 * 2**20 // (1024 * 2 + 32)
    assert part_rows(EmbedJobConfig(input=("in",), output="out", part_rows=100), 1024) == 100


def _block(start: int, n: int, values: list) -> pa.Table:
    return pa.table({"_offset": pa.array(range(start, start + n), pa.int64()), "lang": pa.array(values)})


def test_cut_parts_regroups_blocks_exactly():
    blocks = [_block(0, 5, [1] * 5), _block(5, 5, [None] * 5), _block(10, 5, ["x"] * 5), _block(15, 3, [2] * 3)]
    got = list(cut_parts(iter(blocks), PART_ROWS))
    assert [len(t) for t in got] == [8, 8, 2]
    assert [o for t in got for o in t["_offset"].to_pylist()] == list(range(18))
    # numbers in one block and text in another: the part keeps both, as text (as one JSONL block does)
    assert got[1]["lang"].to_pylist() == [None, None, "x", "x", "x", "x", "x", "2"]
    assert got[0]["lang"].to_pylist() == [1] * 5 + [None] * 3  # all null merges into the ints' type
    assert list(cut_parts(iter([]), PART_ROWS)) == []


def _embed(inp: Path, out: Path, model: str) -> str:
    argv = ["embed", "--input", str(inp), "--output", str(out), "--model", model, "-q", "--max-error-ratio", "0.5"]
    argv += ["--part-rows", str(PART_ROWS), "--rows-per-block", str(ROWS_PER_BLOCK)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(argv) == 0, buf.getvalue()
    return buf.getvalue()


@pytest.fixture(scope="module")
def reference(qwen_model_dir):
    from operators.embedder import Embedder

    return Embedder(qwen_model_dir, device="cpu", dtype="float32")


def test_a_shard_of_three_parts_gives_three_files(tmp_path, qwen_model_dir, reference, ray_local):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    docs = make_docs(20, seed=7)
    for d in docs:
        d["text"] = d["text"][:160]
    docs[9]["text"] = None  # quarantined inside the second part
    (inp / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    small = make_docs(3, seed=8, start_id=100)
    write_parquet(small, str(inp / "b.parquet"))
    _embed(inp, out, qwen_model_dir)

    rec = versions.latest(str(out))
    v = rec["version"]
    want = {parts.part_name("a", o, v): n for o, n in ((0, 8), (8, 7), (16, 4))} | {parts.part_name("b", 0, v): 3}
    assert sorted(rec["files"]) == sorted(f"data/{name}" for name in want)
    assert rec["error_files"] == [f"_errors/{parts.part_name('a', 8, v)}"]
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(want), "a file beside the parts listed"
    texts = {d["id"]: d["text"] for d in docs + small}
    for name, n in want.items():
        table = pq.read_table(out / "data" / name)
        assert len(table) == n, name
        ids = table["id"].to_pylist()
        vecs = np.asarray(table["embedding"].combine_chunks().values.to_numpy()).reshape(n, -1)
        assert np.abs(vecs - reference.embed([texts[i] for i in ids])).max() <= ATOL, name
    first = pq.read_table(out / "data" / parts.part_name("a", 0, v))["id"].to_pylist()
    assert first == [d["id"] for d in docs[:8]], "a part holds its shard's rows in input order"
    (bad,) = pq.read_table(out / "_errors" / parts.part_name("a", 8, v))["id"].to_pylist()
    assert bad == str(docs[9]["id"])

    # the same command again: nothing changed, no version, the same files
    again = _embed(inp, out, qwen_model_dir)
    assert f"version {v} is current" in again
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(want)
