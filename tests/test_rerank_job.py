"""The rerank job end to end on a real local Ray (local files and moto S3), through the CLI entry point."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.storage import get_fs
from pipelines import cli

PAIRS = [  # interleaved on purpose: the reader groups a pair shard by query id
    {
        "query_id": "qa",
        "query": "What is the capital of China?",
        "doc_id": 1,
        "doc": "Beijing is the capital of China.",
    },
    {"query_id": "qb", "query": "gravity", "doc_id": 2, "doc": "Gravity pulls bodies together."},
    {"query_id": "qa", "query": "What is the capital of China?", "doc_id": 3, "doc": "Shanghai is a big city."},
    {"query_id": "qn", "query": None, "doc_id": 4, "doc": "A pair without a query."},
    {"query_id": "qa", "query": "What is the capital of China?", "doc_id": 5, "doc": None},
    {"query_id": "qb", "query": "gravity", "doc_id": 6, "doc": ""},
    {"query_id": "qa", "query": "What is the capital of China?", "doc_id": 7, "doc": "北京是中国的首都。"},
]
CANDIDATES = [
    {
        "query_id": "qc",
        "query": "rivers of China",
        "candidates": [
            {"doc_id": 10, "doc": "The Yangtze is the longest river in China."},
            {"doc_id": 11, "doc": None},
            {"doc_id": 12, "doc": "The Yellow River."},
            {"doc_id": 13, "doc": "Mount Everest is high."},
        ],
    },
    {"query_id": "qd", "query": "a query with no candidates", "candidates": []},
    {"query_id": "qe", "query": "null candidates", "candidates": None},
]


def _write_inputs(root: str, fs=None) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(PAIRS), buf)
    lines = [json.dumps(r) for r in CANDIDATES[:1]] + ["{broken json"] + [json.dumps(r) for r in CANDIDATES[1:]]
    data = {f"{root}/pairs.parquet": buf.getvalue(), f"{root}/cands.jsonl": ("\n".join(lines) + "\n").encode()}
    for path, blob in data.items():
        if fs is None:
            with open(path, "wb") as f:
                f.write(blob)
        else:
            fs.pipe_file(path, blob)


@pytest.fixture(scope="module")
def reranker(qwen_lm_dir):
    from operators.reranker import Reranker

    return Reranker(qwen_lm_dir)


def _read(out: str, so=None):
    fs, root = get_fs(out, so)
    manifest = json.loads(fs.cat_file(f"{root}/_manifest.json"))
    # One schema for every part (no promotion): a part of queries without candidates keeps the doc id type.
    data = pa.concat_tables([pq.read_table(io.BytesIO(fs.cat_file(f"{root}/{f}"))) for f in manifest["files"]])
    errors = pa.concat_tables([pq.read_table(io.BytesIO(fs.cat_file(f"{root}/{f}"))) for f in manifest["error_files"]])
    return manifest, data.to_pylist(), errors.to_pylist()


def _check(manifest, rows, errors, reranker, extra_rows=0):
    by_q: dict = {}
    for r in rows:
        if r["doc_id"] == 99:  # the duplicate shard of the local test
            continue
        by_q.setdefault(r["query_id"], []).append(r)
    assert sorted(by_q) == ["qa", "qb", "qc", "qd", "qe"]  # qn: its only pair is quarantined
    expect = {
        "qa": ("What is the capital of China?", {1: PAIRS[0]["doc"], 3: PAIRS[2]["doc"], 7: PAIRS[6]["doc"]}),
        "qb": ("gravity", {2: PAIRS[1]["doc"], 6: ""}),
        "qc": (
            "rivers of China",
            {10: CANDIDATES[0]["candidates"][0]["doc"], 12: "The Yellow River.", 13: "Mount Everest is high."},
        ),
    }
    for qid, (query, docs) in expect.items():
        ids = list(docs)
        ref = dict(zip(ids, reranker.score(query, [docs[i] for i in ids]).tolist()))
        got = sorted(by_q[qid], key=lambda r: r["rank"])
        assert [r["rank"] for r in got] == list(range(1, len(ids) + 1))
        assert sorted(r["doc_id"] for r in got) == sorted(ids)
        for r in got:
            assert abs(r["score"] - ref[r["doc_id"]]) <= 1e-5
        # rank 1 = best: scores descending, ties by doc id ascending
        assert got == sorted(got, key=lambda r: (-r["score"], r["doc_id"]))
    # A query with no candidates (empty list or null): one row with null doc_id, score and rank.
    for qid in ("qd", "qe"):
        assert by_q[qid] == [{"query_id": qid, "doc_id": None, "score": None, "rank": None}]
    got_errors = sorted(((e["id"], e["doc_id"], e["error_type"], e["message"]) for e in errors), key=str)
    expected = [
        (None, None, "MalformedJSON", "malformed JSON: Expecting property name enclosed in double quotes at column 2"),
        ("qa", "5", "InvalidText", "doc is null"),
        ("qc", "11", "InvalidText", "candidates[1] (doc_id 11): doc is null"),
        ("qn", "4", "InvalidText", "query is null"),
    ]
    assert got_errors == sorted(expected, key=str)
    assert manifest["totals"]["rows"] == len(rows) == 3 + 2 + 3 + 2 + extra_rows
    assert manifest["totals"]["errors"] == 4
    assert manifest["config"]["instruction"].startswith("Given a web search query")


def test_rerank_job_local(tmp_path, qwen_lm_dir, reranker, ray_local, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    _write_inputs(str(inp))
    # A third shard repeats query qa: it is ranked there on its own, and the job warns.
    (inp / "dup.jsonl").write_text(json.dumps({**PAIRS[0], "doc_id": 99, "doc": "again"}) + "\n")
    argv = [
        "rerank",
        "--input",
        str(inp),
        "--output",
        str(out),
        "--model",
        qwen_lm_dir,
        "--rows-per-block",
        "3",
        "--max-error-ratio",
        "0.5",
        "-q",
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    stdout = captured.out
    assert "rayembed rerank: 3 shards (3 processed, 0 already committed), 5 queries, 9 pairs scored" in stdout
    assert "4 rows quarantined" in stdout
    assert (
        "warning: 1 query ids appear in more than one shard or candidate row and were ranked separately in each"
        in (captured.err)
    )
    manifest, rows, errors = _read(str(out))
    _check(manifest, rows, errors, reranker, extra_rows=1)
    assert [r["rank"] for r in rows if r["doc_id"] == 99] == [1]
    assert sorted(p.name for p in (out / "_state").iterdir()) == ["cands.json", "dup.json", "pairs.json"]
    assert all(f.startswith(("data/cands-", "data/pairs-", "data/dup-")) for f in manifest["files"])
    meta = pq.read_schema(out / manifest["files"][0]).metadata
    assert meta[b"rayembed.kind"] == b"rerank" and meta[b"rayembed.model"] == qwen_lm_dir.encode()
    schema = pq.read_schema(out / [f for f in manifest["files"] if "pairs" in f][0])
    assert schema.field("score").type == pa.float32() and schema.field("rank").type == pa.int32()

    # A rerun skips both committed shards.
    assert cli.main(argv) == 0
    assert "(0 processed, 3 already committed)" in capsys.readouterr().out


def test_rerank_job_s3(s3_server, qwen_lm_dir, reranker, ray_local, capsys):
    bucket = s3_server.new_bucket("rerank")
    _write_inputs(f"{bucket}/in", fs=s3_server.fs())
    so = json.dumps(s3_server.storage_options)
    argv = [
        "rerank",
        "--input",
        f"s3://{bucket}/in/",
        "--output",
        f"s3://{bucket}/out",
        "--model",
        qwen_lm_dir,
        "--storage-options",
        so,
        "--max-error-ratio",
        "0.5",
        "-q",
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    manifest, rows, errors = _read(f"s3://{bucket}/out", s3_server.storage_options)
    _check(manifest, rows, errors, reranker)
    raw = s3_server.fs().cat_file(f"{bucket}/out/_manifest.json").decode()
    assert "testing" not in raw and "storage_options" not in raw
    assert not s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


@pytest.mark.parametrize(
    "case, expect",
    [
        ("embed-model", "checkpoint without a language-model head"),
        ("columns", "--doc-column 'doc' not found"),
    ],
)
def test_rerank_bad_arguments(case, expect, tmp_path, qwen_lm_dir, qwen_model_dir, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    _write_inputs(str(inp))
    args = {"--input": str(inp), "--output": str(tmp_path / "out"), "--model": qwen_lm_dir}
    if case == "embed-model":
        args["--model"] = qwen_model_dir
    elif case == "columns":
        (inp / "cands.jsonl").unlink()
        pq.write_table(
            pa.table({"query_id": ["q"], "query": ["x"], "doc_id": [1], "text": ["y"]}), inp / "pairs.parquet"
        )
    rc = cli.main(["rerank", *[x for kv in args.items() for x in kv], "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_reader_groups_pairs_and_counts_units(tmp_path):
    """No Ray: a pair shard becomes one row per query (any row order), every input row is accounted for."""
    from operators.storage import list_shards
    from pipelines.jobs.rerank_read import Columns, read_rerank_shard

    _write_inputs(str(tmp_path))
    for shard in list_shards(str(tmp_path)):
        blocks = list(read_rerank_shard(shard, columns=Columns(), rows_per_block=2))
        assert len(blocks) >= 2 and [b["_shard_rows"][0].as_py() for b in blocks[:-1]] == [-1] * (len(blocks) - 1)
        # Every block has the shard's doc id type, even a block whose queries have no candidates.
        assert {b.schema.field("doc_ids").type for b in blocks} == {pa.list_(pa.int64())}
        t = pa.concat_tables(blocks, promote_options="default").to_pylist()
        units = sum(len(r["doc_ids"]) + (r["empty_row"] and not r["doc_ids"]) + len(r["bad"]) for r in t)
        assert blocks[-1]["_shard_rows"][0].as_py() == units == 7  # 7 pairs; 3 candidate rows + a broken line
        if shard.stem == "pairs":
            assert [(r["query_id"], r["doc_ids"], [b["doc_id"] for b in r["bad"]]) for r in t] == [
                ("qa", [1, 3, 7], ["5"]),
                ("qb", [2, 6], []),
                ("qn", [], ["4"]),
            ]
        else:
            assert [(r["query_id"], r["doc_ids"], r["empty_row"]) for r in t] == [
                ("qc", [10, 12, 13], False),
                (None, [], False),
                ("qd", [], True),
                ("qe", [], True),
            ]


def test_gpu_stage_builds_with_an_explicit_batch_size(tmp_path, qwen_lm_dir, ray_local):
    """Ray Data refuses ``batch_size=None`` for a stage that requests GPUs; the graph must build (not run) with one."""
    from operators.storage import list_shards
    from pipelines.config import build_rerank_config
    from pipelines.jobs.rerank import RerankJob
    from pipelines.runner import build_graph

    _write_inputs(str(tmp_path))
    cfg = build_rerank_config(
        {"input": str(tmp_path), "output": str(tmp_path / "out"), "num_gpus": 1, "model": qwen_lm_dir}
    )
    job = RerankJob(cfg)
    shards = list_shards(str(tmp_path))
    build_graph(job, job.plan(shards), shards)
