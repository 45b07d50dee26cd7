"""The embed job end to end on a real local Ray: local files and moto S3 over HTTP, through the CLI entry point."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import cli
from tests.corpus import make_docs, make_mixed_corpus, write_parquet
from tests.pipeline_checks import check_embed_output, read_output


@pytest.fixture(scope="module")
def reference(qwen_model_dir):
    """Vectors from the operator run directly, keyed by (text) — the pipeline must reproduce them."""
    from operators.embedder import Embedder

    return Embedder(qwen_model_dir)


def _ref(embedder, docs):
    vecs = embedder.embed([d["text"] for d in docs])
    return {d["id"]: v for d, v in zip(docs, vecs)}


def _run(argv, capsys=None) -> str:
    rc = cli.main(argv)
    out = capsys.readouterr() if capsys else None
    assert rc == 0, out.err if out else rc
    return out.out if out else ""


def test_local_end_to_end(tmp_path, qwen_model_dir, reference, ray_local, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    docs = make_mixed_corpus(str(inp))
    stdout = _run(
        [
            "embed",
            "--input",
            str(inp),
            "--output",
            str(out),
            "--model",
            qwen_model_dir,
            "--passthrough",
            "lang,score",
            "--rows-per-block",
            "16",
            "-q",
        ],
        capsys,
    )
    manifest, table = check_embed_output(str(out), docs, _ref(reference, docs), dim=128)
    # Names derive from the input shards; five shards, several parts each.
    assert all(f.startswith("data/part-") for f in manifest["files"])
    assert {f.split("-")[1] for f in manifest["files"]} == {"0", "1", "2", "3", "4"}
    assert sorted(os.listdir(out / "_state")) == [f"part-{k}.json" for k in range(5)]
    meta = pq.read_schema(out / manifest["files"][0]).metadata
    assert meta[b"rayembed.dim"] == b"128" and meta[b"rayembed.model"] == qwen_model_dir.encode()
    assert f"5 shards (5 processed, 0 already committed), {len(docs)} docs" in stdout
    assert manifest["totals"]["tokens"] == sum(len(x) for x in reference.encoder.encode([d["text"] for d in docs]).ids)

    # The README's DuckDB query works on the files as written (no conversion step) and ranks as the reference does:
    # a query vector from the operator run directly, not from the output, and the top 5 by cosine computed in numpy
    # from the reference vectors. (A vector's cosine with itself is 1 whatever the files hold.)
    import duckdb

    glob = f"{out}/data/*.parquet"
    ref = _ref(reference, docs)
    qvec = reference.embed(["Which city is the capital of China?"])[0]
    literal = "[" + ", ".join(f"{x:.9g}" for x in qvec) + f"]::FLOAT[{len(qvec)}]"
    top = duckdb.execute(
        f"SELECT id, list_cosine_similarity(embedding, {literal}) AS sim FROM read_parquet('{glob}') "
        "ORDER BY sim DESC LIMIT 5"
    ).fetchall()
    sims = {i: float(v @ qvec) for i, v in ref.items()}  # unit vectors: the cosine is the dot product
    assert len(top) == 5 and len({i for i, _ in top}) == 5
    for i, sim in top:  # each row's score is its reference vector's
        assert abs(sim - sims[i]) <= 1e-5, (i, sim, sims[i])
    # ... and they are the top 5 (up to the tolerance: random-weight vectors sit close together).
    assert max(sims[i] for i in sims.keys() - {i for i, _ in top}) <= top[-1][1] + 1e-5
    assert duckdb.execute(f"SELECT count(*) FROM read_parquet('{glob}')").fetchone()[0] == len(docs)

    # A rerun of a finished job processes nothing and rewrites no data file.
    mtimes = {f: os.stat(out / f).st_mtime_ns for f in manifest["files"]}
    stdout = _run(
        [
            "embed",
            "--input",
            str(inp),
            "--output",
            str(out),
            "--model",
            qwen_model_dir,
            "--passthrough",
            "lang,score",
            "--rows-per-block",
            "16",
            "-q",
        ],
        capsys,
    )
    assert "(0 processed, 5 already committed), 0 docs" in stdout
    assert {f: os.stat(out / f).st_mtime_ns for f in manifest["files"]} == mtimes


def test_yaml_job_file_query_mode_dim_and_fp16(tmp_path, qwen_model_dir, ray_local, capsys):
    from operators.embedder import Embedder

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    docs = make_docs(30, seed=7)
    write_parquet(docs, str(inp / "q.parquet"))
    task = "Given a web search query, retrieve relevant passages that answer the query"
    job = tmp_path / "job.yaml"
    job.write_text(
        json.dumps(
            {
                "input": str(inp),
                "output": "ignored-by-flag",
                "model": qwen_model_dir,
                "instruction": task,
                "dim": 32,
                "output-dtype": "float16",
            }
        )
    )
    _run(["embed", "--config", str(job), "--output", str(out), "--passthrough", "lang", "-q"], capsys)
    manifest, table = read_output(str(out))
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 32)
    ref = Embedder(qwen_model_dir, instruction=task, dim=32).embed([d["text"] for d in docs])
    got = np.asarray(table["embedding"].combine_chunks().values.to_numpy()).reshape(-1, 32).astype(np.float32)
    order = [d["id"] for d in docs]
    idx = {i: k for k, i in enumerate(table["id"].to_pylist())}
    assert np.abs(got[[idx[i] for i in order]] - ref).max() <= 2e-3  # float16 rounding
    assert manifest["config"]["instruction"] == task and manifest["model"]["dim"] == 32


def test_s3_end_to_end(s3_server, qwen_model_dir, reference, ray_local, capsys):
    bucket = s3_server.new_bucket("e2e")
    fs = s3_server.fs()
    docs = make_mixed_corpus(f"{bucket}/in", fs=fs, per_shard=20)
    s3_server.upload_dir(qwen_model_dir, f"s3://{bucket}/models/qwen3-tiny")
    so = json.dumps(s3_server.storage_options)
    _run(
        [
            "embed",
            "--input",
            f"s3://{bucket}/in/",
            "--output",
            f"s3://{bucket}/out",
            "--model",
            f"s3://{bucket}/models/qwen3-tiny",
            "--storage-options",
            so,
            "--passthrough",
            "lang,score",
            "-q",
        ],
        capsys,
    )
    manifest, _ = check_embed_output(
        f"s3://{bucket}/out", docs, _ref(reference, docs), dim=128, storage_options=s3_server.storage_options
    )
    assert manifest["totals"]["shards"] == 5
    # Secrets never reach the manifest.
    raw = fs.cat_file(f"{bucket}/out/_manifest.json").decode()
    assert "testing" not in raw and "storage_options" not in raw
    # Nothing half-written is left behind.
    assert not s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_quarantine_of_bad_rows(tmp_path, qwen_model_dir, ray_local, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    good = make_docs(20, seed=3)
    lines = [json.dumps(d) for d in good[:10]] + ['{"id": 77, "text": null}', "{not json", '{"id": 78, "text": 5}']
    lines += [json.dumps(d) for d in good[10:]]
    (inp / "bad.jsonl").write_text("\n".join(lines) + "\n")
    _run(
        [
            "embed",
            "--input",
            str(inp),
            "--output",
            str(out),
            "--model",
            qwen_model_dir,
            "--max-error-ratio",
            "0.5",
            "-q",
        ],
        capsys,
    )
    manifest, table = read_output(str(out))
    assert sorted(table["id"].to_pylist()) == sorted(d["id"] for d in good)
    errors = pa.concat_tables([pq.read_table(out / f) for f in manifest["error_files"]]).to_pylist()
    assert [(e["id"], e["row_offset"], e["error_type"]) for e in errors] == [
        ("77", 10, "InvalidText"),
        (None, 11, "MalformedJSON"),
        ("78", 12, "InvalidText"),
    ]
    assert errors[0]["message"] == "text is null" and "not a string" in errors[2]["message"]
    assert manifest["totals"]["errors"] == 3

    # Above the ratio the job fails with the counts and writes no manifest.
    out2 = tmp_path / "out2"
    rc = cli.main(
        [
            "embed",
            "--input",
            str(inp),
            "--output",
            str(out2),
            "--model",
            qwen_model_dir,
            "-q",
            "--max-error-ratio",
            "0.1",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "3 of 23 rows (13.04%) were quarantined, above --max-error-ratio 10.00%" in err
    assert not (out2 / "_manifest.json").exists()


def test_corrupt_shard_is_quarantined_and_others_proceed(tmp_path, qwen_model_dir, ray_local, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    docs = make_docs(12, seed=5)
    write_parquet(docs, str(inp / "good.parquet"))
    write_parquet(make_docs(12, seed=6, start_id=100), str(inp / "broken.parquet"))
    data = (inp / "broken.parquet").read_bytes()
    (inp / "broken.parquet").write_bytes(data[: len(data) // 2])
    _run(
        [
            "embed",
            "--input",
            str(inp),
            "--output",
            str(out),
            "--model",
            qwen_model_dir,
            "-q",
            "--max-error-ratio",
            "1",
        ],
        capsys,
    )
    manifest, table = read_output(str(out))
    assert sorted(table["id"].to_pylist()) == [d["id"] for d in docs]
    (err,) = pq.read_table(out / manifest["error_files"][0]).to_pylist()
    assert err["shard"] == "broken" and err["error_type"] == "CorruptShard" and "unreadable" in err["message"]


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing", "does not exist"),
        ("empty", "contains no shards"),
        ("mixed", "unsupported input file"),
        ("no-id", "--id-column 'id' not found"),
        ("no-text", "--text-column 'text' not found"),
        ("out-in-in", "is inside --input"),
        ("concurrency", "--concurrency must be MIN,MAX with 1 <= MIN <= MAX"),
        ("dtype", "unknown --output-dtype 'int8'"),
        ("dim", "--dim must be in 32..128"),
    ],
)
def test_bad_arguments(case, expect, tmp_path, qwen_model_dir, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    write_parquet(make_docs(3), str(inp / "a.parquet"))
    args = {"--input": str(inp), "--output": str(tmp_path / "out"), "--model": qwen_model_dir}
    if case == "missing":
        args["--input"] = str(tmp_path / "nope")
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args["--input"] = str(tmp_path / "empty")
    elif case == "mixed":
        (inp / "notes.csv").write_text("id,text\n1,a\n")
    elif case in ("no-id", "no-text"):
        write_parquet([{"doc": 1, "body": "x"}], str(inp / "a.parquet"))
        if case == "no-text":
            write_parquet([{"id": 1, "body": "x"}], str(inp / "a.parquet"))
    elif case == "out-in-in":
        args["--output"] = str(inp)
    elif case == "concurrency":
        args["--concurrency"] = "0"
    elif case == "dtype":
        args["--output-dtype"] = "int8"
    elif case == "dim":
        args["--dim"] = "129"
    rc = cli.main(["embed", *[x for kv in args.items() for x in kv]])
    err = capsys.readouterr().err
    assert rc == 2
    assert expect in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_unreachable_s3_endpoint_fails_fast(tmp_path, qwen_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    t0 = time.time()
    rc = cli.main(
        [
            "embed",
            "--input",
            "s3://bucket/in",
            "--output",
            str(tmp_path / "o"),
            "--model",
            qwen_model_dir,
            "--storage-options",
            json.dumps({"endpoint_url": "http://127.0.0.1:9"}),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and time.time() - t0 < 60
    assert "cannot list input 's3://bucket/in'" in err and "Could not connect" in err


def test_the_command_leaves_a_ray_it_did_not_start_running(tmp_path, ray_local, monkeypatch, capsys):
    """``rayembed`` stops a local Ray it started itself before exiting (pipelines/runtime.py); a Ray its caller
    started (here the session's) survives the command, whatever its outcome."""
    from pipelines import runtime

    runtime.init_ray(None)  # joins: the session's Ray is already up
    monkeypatch.setattr("sys.argv", ["rayembed", "files", str(tmp_path / "no-such-output")])
    with pytest.raises(SystemExit) as e:
        cli.entry()
    assert e.value.code != 0 and "rayembed: error:" in capsys.readouterr().err
    assert ray_local.is_initialized() and ray_local.cluster_resources().get("CPU") == 2
