"""Retrieve-then-rerank end to end on a real local Ray over the BEIR sample in examples/beir (local and moto S3)."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators import DEFAULT_INSTRUCTION
from operators.storage import get_fs
from pipelines import cli
from tests.test_metrics_topk import _independent

BEIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "beir")
CORPUS = [json.loads(line) for line in Path(BEIR, "corpus.jsonl").read_text().splitlines()]
QUERIES = [json.loads(line) for line in Path(BEIR, "queries.jsonl").read_text().splitlines()]
UNKNOWN_QRELS = "q99\td01\t1\nq99\td02\t1\nq1\tdoc-not-in-corpus\t1\n"


@pytest.fixture(scope="module")
def beir_vectors(tmp_path_factory, qwen_model_dir, ray_local):
    """The corpus embedded by a real embed job (documents: no instruction)."""
    out = tmp_path_factory.mktemp("beir") / "vectors"
    rc = cli.main(
        ["embed", "--input", os.path.join(BEIR, "corpus.jsonl"), "--id-column", "_id", "--output", str(out)]
        + ["--model", qwen_model_dir, "-q"]
    )
    assert rc == 0
    return str(out)


@pytest.fixture(scope="module")
def references(qwen_model_dir, qwen_lm_dir):
    from operators.embedder import Embedder
    from operators.reranker import Reranker

    return Embedder(qwen_model_dir, instruction=DEFAULT_INSTRUCTION), Reranker(qwen_lm_dir)


def _inputs(root) -> dict[str, str]:
    """Copies of the sample, with a query whose text is null and qrels that reference unknown ids."""
    os.makedirs(root, exist_ok=True)
    paths = {k: os.path.join(root, k) for k in ("queries.jsonl", "corpus.jsonl", "qrels.tsv")}
    with open(paths["queries.jsonl"], "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in QUERIES)
        f.write(json.dumps({"_id": "q-null", "text": None}) + "\n")
    shutil.copy(os.path.join(BEIR, "corpus.jsonl"), paths["corpus.jsonl"])
    with open(os.path.join(BEIR, "qrels", "test.tsv")) as src, open(paths["qrels.tsv"], "w") as f:
        f.write(src.read() + UNKNOWN_QRELS)
    return paths


def _read(out: str, so=None):
    fs, root = get_fs(out, so)
    manifest = json.loads(fs.cat_file(f"{root}/_manifest.json"))
    rows = pa.concat_tables([pq.read_table(io.BytesIO(fs.cat_file(f"{root}/{f}"))) for f in manifest["files"]])
    errors = pa.concat_tables([pq.read_table(io.BytesIO(fs.cat_file(f"{root}/{f}"))) for f in manifest["error_files"]])
    metrics = json.loads(fs.cat_file(f"{root}/metrics.json"))
    return manifest, rows.to_pylist(), errors.to_pylist(), metrics


def _corpus_vectors(vectors: str):
    manifest = json.loads(Path(vectors, "_manifest.json").read_text())
    t = pa.concat_tables([pq.read_table(os.path.join(vectors, f)) for f in manifest["files"]])
    emb = t["embedding"].combine_chunks()
    return t["id"].to_pylist(), emb.values.to_numpy().reshape(len(t), emb.type.list_size)


def _check(rows, k, vectors, references, queries=QUERIES):
    embedder, reranker = references
    ids, corpus = _corpus_vectors(vectors)
    texts = {d["_id"]: (d["title"] + " " + d["text"]).strip() for d in CORPUS}
    qvecs = embedder.embed([q["text"] for q in queries])
    by_q: dict = {}
    for r in rows:
        by_q.setdefault(r["query_id"], []).append(r)
    assert sorted(by_q) == sorted(q["_id"] for q in queries)
    for q, qv in zip(queries, qvecs):
        got = by_q[q["_id"]]
        # Retrieval: the exact top-k of a brute force over all corpus vectors (ties by id).
        scores = corpus @ qv
        ref = sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i]))[:k]
        retrieved = sorted(got, key=lambda r: r["retrieval_rank"])
        assert [r["doc_id"] for r in retrieved] == [ids[i] for i in ref]
        np.testing.assert_allclose([r["retrieval_score"] for r in retrieved], scores[ref], atol=1e-5)
        # Reranking: a permutation of the retrieved top-k, with the scores of Reranker.score run directly.
        reranked = sorted(got, key=lambda r: r["rank"])
        assert [r["rank"] for r in reranked] == list(range(1, k + 1))
        assert sorted(r["doc_id"] for r in reranked) == sorted(ids[i] for i in ref)
        direct = reranker.score(q["text"], [texts[r["doc_id"]] for r in reranked])
        assert np.abs(np.array([r["rerank_score"] for r in reranked]) - direct).max() <= 1e-5
        assert reranked == sorted(reranked, key=lambda r: (-r["rerank_score"], r["doc_id"]))


def _expected_metrics(rows, qrels_path):
    from operators.metrics import parse_qrels

    qrels = parse_qrels(Path(qrels_path).read_text())
    ret, rer = {}, {}
    for r in sorted(rows, key=lambda r: r["retrieval_rank"]):
        ret.setdefault(r["query_id"], []).append(r["doc_id"])
    for r in sorted(rows, key=lambda r: r["rank"]):
        rer.setdefault(r["query_id"], []).append(r["doc_id"])
    return _independent(ret, qrels), _independent(rer, qrels)


def test_search_local(tmp_path, beir_vectors, qwen_lm_dir, references, ray_local, capsys):
    p = _inputs(str(tmp_path / "in"))
    out = tmp_path / "out"
    argv = ["search", "--queries", p["queries.jsonl"], "--vectors", beir_vectors, "--corpus", p["corpus.jsonl"]]
    argv += ["--qrels", p["qrels.tsv"], "--output", str(out), "--k", "5", "--rerank-model", qwen_lm_dir, "-q"]
    argv += ["--queries-per-block", "3", "--retrieval-tasks", "3", "--max-error-ratio", "0.5"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    manifest, rows, errors, metrics = _read(str(out))
    _check(rows, 5, beir_vectors, references)

    # The query with a null text is quarantined, with its reason.
    assert [(e["id"], e["error_type"], e["message"]) for e in errors] == [
        ("q-null", "InvalidText", "query text is null")
    ]
    assert "9 queries (8 searched, 1 rows quarantined" in stdout and "k=5, 40 pairs reranked" in stdout
    # One actor, both models: their sizes are reported.
    assert "embedder" in stdout and "reranker" in stdout and "MB of weights" in stdout
    assert min(manifest["model"]["bytes_per_actor"][m] for m in ("embedder", "reranker")) > 0

    # Metrics for retrieval alone and after reranking, equal to an independent implementation over the output.
    ref_ret, ref_rer = _expected_metrics(rows, p["qrels.tsv"])
    assert metrics["queries_evaluated"] == ref_ret["queries"] == 8
    for name in ("nDCG@10", "Recall@100", "MRR@10"):
        assert metrics["retrieval"][name] == pytest.approx(ref_ret[name], abs=1e-12)
        assert metrics["rerank"][name] == pytest.approx(ref_rer[name], abs=1e-12)
        assert f"{name} {metrics['retrieval'][name]:.4f}" in stdout
    # qrels that reference unknown ids are counted and reported, not a crash.
    q = metrics["qrels"]
    assert (q["unknown_query_ids"], q["unknown_query_judgements"]) == (1, 2)
    assert (q["unknown_doc_ids"], q["unknown_doc_judgements"]) == (1, 1)
    assert q["examples"] == {"query_ids": ["q99"], "doc_ids": ["doc-not-in-corpus"]}
    assert "2 reference 1 unknown query ids (ignored), 1 reference 1 doc ids not in the corpus" in stdout

    # A rerun skips the committed query shard and still writes the metrics, unchanged.
    os.remove(out / "metrics.json")
    assert cli.main(argv) == 0
    assert "1 of 1 query shards already committed" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["rerank"] == metrics["rerank"]


def test_search_s3_and_k_larger_than_corpus(
    s3_server, beir_vectors, qwen_lm_dir, references, ray_local, tmp_path, capsys
):
    bucket = s3_server.new_bucket("search")
    local = _inputs(str(tmp_path / "in"))
    s3_server.upload_dir(os.path.dirname(local["queries.jsonl"]), f"s3://{bucket}/beir")
    s3_server.upload_dir(beir_vectors, f"s3://{bucket}/vectors")  # the embed job's output, manifest included
    so = json.dumps(s3_server.storage_options)
    argv = ["search", "--queries", f"s3://{bucket}/beir/queries.jsonl", "--vectors", f"s3://{bucket}/vectors"]
    argv += ["--corpus", f"s3://{bucket}/beir/corpus.jsonl", "--qrels", f"s3://{bucket}/beir/qrels.tsv"]
    argv += ["--output", f"s3://{bucket}/out", "--rerank-model", qwen_lm_dir, "--storage-options", so, "-q"]
    argv += ["--max-error-ratio", "0.5"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    # k (default 100) above the corpus size: clamped, with a warning line.
    assert "rayembed search: warning: --k 100 is larger than the corpus (20 documents); using k=20" in captured.err
    manifest, rows, _errors, metrics = _read(f"s3://{bucket}/out", s3_server.storage_options)
    assert manifest["config"]["k"] == 20 and manifest["config"]["requested_k"] == 100
    _check(rows, 20, beir_vectors, references)
    assert metrics["retrieval"]["Recall@100"] == metrics["rerank"]["Recall@100"]  # reranking permutes the top-k
    raw = s3_server.fs().cat_file(f"{bucket}/out/_manifest.json").decode()
    assert "testing" not in raw and "storage_options" not in raw
    assert not s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


@pytest.mark.parametrize(
    "case, expect",
    [
        ("no-manifest", "has no _manifest.json; give the output prefix of a finished `rayembed embed` job"),
        ("k", "--k must be at least 1, got 0"),
        ("qrels", "--qrels"),
    ],
)
def test_search_bad_arguments(case, expect, tmp_path, beir_vectors, qwen_lm_dir, capsys):
    p = _inputs(str(tmp_path / "in"))
    args = {
        "--queries": p["queries.jsonl"],
        "--vectors": beir_vectors,
        "--corpus": p["corpus.jsonl"],
        "--output": str(tmp_path / "out"),
        "--rerank-model": qwen_lm_dir,
        "--k": "5",
    }
    if case == "no-manifest":
        args["--vectors"] = str(tmp_path)
    elif case == "k":
        args["--k"] = "0"
    elif case == "qrels":
        with open(p["qrels.tsv"], "a") as f:
            f.write("q1\td01\n")
        args["--qrels"] = p["qrels.tsv"]
        expect = f"--qrels {p['qrels.tsv']} line 20: expected 'query-id corpus-id score'"
    rc = cli.main(["search", *[x for kv in args.items() for x in kv]])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_second_rerank_and_search_refused_while_first_job_runs(tmp_path, beir_vectors, qwen_lm_dir, capsys):
    """Every job takes the output's lease: while a search job runs (slowed before its manifest by a test hook), a
    second search and a rerank on the same output are refused naming the holder, and the first job finishes."""
    import subprocess
    import sys
    import time

    from operators import storage
    from pipelines.lease import lease_state, lease_url

    p = _inputs(str(tmp_path / "in"))
    out = tmp_path / "out"
    args = ["--queries", p["queries.jsonl"], "--vectors", beir_vectors, "--corpus", p["corpus.jsonl"], "--k", "3"]
    args += ["--rerank-model", qwen_lm_dir, "--output", str(out), "--max-error-ratio", "0.5", "-q"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "RAYEMBED_TEST_SLEEP_AT": "runner.before_manifest:25"}
    env.pop("RAY_ADDRESS", None)
    first = subprocess.Popen(
        [sys.executable, "-m", "pipelines.search", *args],
        env=env,
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            lease = storage.read_json(lease_url(str(out)))
            if lease and lease["holder"]["pid"] == first.pid and lease_state(lease) == "live":
                break
            assert first.poll() is None, first.communicate()
            time.sleep(0.5)
        else:
            pytest.fail("the first job never took the lease")
        holder = f"leased by job {lease['holder']['job_id']} (pid {first.pid}"
        pairs = tmp_path / "pairs"
        pairs.mkdir()
        (pairs / "p.jsonl").write_text(json.dumps({"query_id": "q", "query": "x", "doc_id": 1, "doc": "y"}) + "\n")
        for argv in (
            ["search", *args],
            ["rerank", "--input", str(pairs), "--output", str(out), "--model", qwen_lm_dir],
        ):
            assert cli.main(argv) == 2
            err = capsys.readouterr().err
            assert holder in err and err.count("\n") == 1, err
        stdout, stderr = first.communicate(timeout=300)
        assert first.returncode == 0, stderr
    finally:
        if first.poll() is None:
            first.kill()
    assert "rayembed search: 9 queries (8 searched" in stdout
    assert (out / "_manifest.json").exists() and lease_state(storage.read_json(lease_url(str(out)))) == "released"
