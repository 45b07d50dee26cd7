"""The error-ratio gate of every job (embed, rerank, search) at its default, --max-error-ratio 0.01.

Each job runs twice on two shards with one bad row between them: over 99 rows (1.01%, just above the default) it must
fail with the counts in its one-line message and write no ``_manifest.json``; over 100 rows (1.00%, at the ratio,
which is not above it) it must succeed and write the manifest. Two shards, because the ratio is over the whole job:
one shard alone holds 2% bad rows. The rows a job counts are its output rows plus its quarantined rows (search with
``--k 1``: one output row per query).

Planted bugs these tests catch (tests/README.md): the gate's error count multiplied by zero, in each job; ``>=``
instead of ``>``; a ratio over good rows only (1 of 99 is above 1%).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines import cli

ABOVE = "1 of 99 rows (1.01%) were quarantined, above --max-error-ratio 1.00%; no manifest written"


@dataclass
class Run:
    rc: int
    out: Path
    stdout: str
    stderr: str

    @property
    def manifest(self) -> dict | None:
        path = self.out / "_manifest.json"
        return json.loads(path.read_text()) if path.exists() else None


def _run(argv: list[str], out: Path) -> Run:
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        rc = cli.main([*argv, "--output", str(out), "-q"])
    return Run(rc, out, o.getvalue(), e.getvalue())


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _split(rows: list[dict], root: Path, name: str, at: int) -> Path:
    """``rows`` as two JSONL shards under ``root/name``: rows[:at] and rows[at:]."""
    d = root / name
    d.mkdir(parents=True)
    _jsonl(d / "a.jsonl", rows[:at])
    _jsonl(d / "b.jsonl", rows[at:])
    return d


def _both(tmp: Path, rows: list[dict], argv) -> dict[str, Run]:
    """Run the job over the first 99 rows and over all 100 (one of them bad, in the first 50), as two shards."""
    runs = {}
    for case, n in (("above", 99), ("at", 100)):
        inp = _split(rows[:n], tmp, f"{case}-in", 50)
        runs[case] = _run(argv(inp), tmp / f"{case}-out")
    return runs


@pytest.fixture(scope="module")
def embed_runs(tmp_path_factory, qwen_model_dir, ray_local) -> dict[str, Run]:
    docs = [{"id": i, "text": f"document number {i}"} for i in range(100)]
    docs[7]["text"] = None
    tmp = tmp_path_factory.mktemp("gate-embed")
    return _both(tmp, docs, lambda inp: ["embed", "--input", str(inp), "--model", qwen_model_dir])


@pytest.fixture(scope="module")
def rerank_runs(tmp_path_factory, qwen_lm_dir, ray_local) -> dict[str, Run]:
    # Five pairs per query; a query's pairs stay in one shard (50 = 10 queries), as the rerank job requires.
    pairs = [
        {"query_id": f"q{i // 5}", "query": f"query {i // 5}", "doc_id": i, "doc": f"doc {i}"} for i in range(100)
    ]
    pairs[7]["doc"] = None
    tmp = tmp_path_factory.mktemp("gate-rerank")
    return _both(tmp, pairs, lambda inp: ["rerank", "--input", str(inp), "--model", qwen_lm_dir])


@pytest.fixture(scope="module")
def search_runs(tmp_path_factory, embed_runs, qwen_lm_dir) -> dict[str, Run]:
    """Over the vectors of the embed job that succeeded (ids 0..99 but 7) and a BEIR-style corpus of their texts."""
    tmp = tmp_path_factory.mktemp("gate-search")
    vectors = embed_runs["at"]
    assert vectors.rc == 0, vectors.stderr
    corpus = tmp / "corpus.jsonl"
    _jsonl(corpus, [{"_id": i, "title": "", "text": f"document number {i}"} for i in range(100) if i != 7])
    queries = [{"_id": f"q{i}", "text": f"what is thing {i}?"} for i in range(100)]
    queries[7]["text"] = None

    common = ["--vectors", str(vectors.out), "--corpus", str(corpus), "--k", "1", "--rerank-model", qwen_lm_dir]
    return _both(tmp, queries, lambda inp: ["search", "--queries", str(inp), *common])


JOBS = ["embed", "rerank", "search"]


@pytest.mark.parametrize("job", JOBS)
def test_just_above_the_default_ratio_fails_with_the_counts_and_no_manifest(job, request):
    run = request.getfixturevalue(f"{job}_runs")["above"]
    assert run.rc == 2, (run.stdout[-2000:], run.stderr[-2000:])
    (line,) = [x for x in run.stderr.splitlines() if x.startswith("rayembed: error: ")]
    assert ABOVE in line, line
    assert run.manifest is None
    assert not (run.out / "_manifest.json").exists()
    # The bad row was quarantined, not dropped: its shard is committed with its record under _errors/.
    # (The embed job's parts carry the version they were written for.)
    name = "a-000000000000-v00000001.parquet" if job == "embed" else "a-000000000000.parquet"
    assert os.listdir(run.out / "_errors") == [name]


@pytest.mark.parametrize("job", JOBS)
def test_at_the_default_ratio_succeeds_and_writes_the_manifest(job, request):
    run = request.getfixturevalue(f"{job}_runs")["at"]
    assert run.rc == 0, run.stderr[-2000:]
    assert "rayembed: error" not in run.stderr
    totals = run.manifest["totals"]
    assert (totals["rows"], totals["errors"], totals["shards"]) == (99, 1, 2)
    assert "1 rows quarantined" in run.stdout, run.stdout
