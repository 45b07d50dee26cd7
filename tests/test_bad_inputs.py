"""Issue #5's bad-input matrix, each case its own test, all through the real embed job (CLI entry, local Ray).

One job (module-scoped) runs over a directory holding every bad shard plus good ones, with ``--max-error-ratio 1`` so
it completes; each test then asserts its own shard's records. The contract (README "Failure semantics"):

- a shard the reader cannot open or finish (zero-byte or truncated Parquet, truncated gzip, a file that does not
  decode, a Parquet shard without the id or text column) gets ONE shard-level record in ``_errors/`` at the offset
  where reading stopped, and the other shards proceed;
- a bad row (invalid UTF-8, malformed JSON, null text) is quarantined with its offset, id (when it could be parsed),
  error type and message, and the other rows of its shard are embedded;
- empty text is a valid document: it embeds as ``<|endoftext|>`` alone (``operators.tokenization.text_error``);
- a zero-byte JSONL file is a valid empty shard: committed with zero rows, no error;
- a text longer than ``--max-length`` is cut to ``max_length - 1`` tokens plus EOS and counted as ``truncated`` in
  the shard's marker and the summary line (the manifest has no truncated count);
- ids are keys: of the rows sharing an id, the first in sorted shard order (then by row offset) is embedded and
  written; every other one is quarantined as DuplicateId, naming the row that was kept.

Bugs these cases found and that are fixed: an int64 text column in a Parquet shard crashed the whole job (now one
InvalidColumn record), a JSONL line without an id was embedded with a null id (now MissingId), a truncated gzip lost
the complete lines read since the last full block, and .jsonl.zst could not be read (zstandard was not a dependency).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.storage import list_shards
from pipelines import cli
from pipelines.jobs.embed_stages import read_shard
from tests.corpus import EN, make_docs, write_jsonl_gz, write_parquet

MAX_LENGTH = 64  # the 1 MB text is cut to 63 tokens + EOS, and every forward pass stays cheap on CPU
ROWS_PER_BLOCK = 4  # several blocks per shard: the truncated gzip has embedded rows before its error record
BIG_TEXT = ((EN + " ") * (2**20 // len(EN) + 1))[: 2**20]  # 1 MiB of ASCII

# Shard-level error types written by pipelines.jobs.embed_stages.read_shard.
SHARD_LEVEL = {"CorruptShard", "MissingColumn", "InvalidColumn"}
# Shards the reader cannot open or finish: one shard-level record each (truncated-gzip after the rows it read).
FAILED_SHARDS = {"zero-bytes", "truncated-parquet", "truncated-gzip", "not-gzip", "garbage", "no-id-column"}
FAILED_SHARDS |= {"no-text-column", "int-text"}
# The rows (offsets) of the other shards that must be quarantined; every other row must be embedded.
BAD_ROWS = {
    "invalid-utf8": {1},
    "malformed-json": {1, 2},
    "null-text": {1},
    "no-id-field": {0, 1},
    "duplicate-ids": {0, 2},  # id 0 is kept in aa-good (sorted first), id 170 at offset 1
}


def _jsonl(path: Path, lines: list[bytes | str | dict]) -> None:
    out = []
    for x in lines:
        if isinstance(x, dict):
            x = json.dumps(x, ensure_ascii=False)
        out.append(x if isinstance(x, bytes) else x.encode())
    path.write_bytes(b"\n".join(out) + b"\n")


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _make_inputs(inp: Path) -> dict[str, list[dict]]:
    """Write every case's shard; returns the docs each shard holds (what a perfect reader would see), by stem.
    Names sort with a good shard first: the driver checks the id/text columns on the first shard only."""
    docs: dict[str, list[dict]] = {}

    docs["aa-good"] = make_docs(10, seed=11)  # ids 0..9
    write_parquet(docs["aa-good"], str(inp / "aa-good.parquet"))

    # --- shard-level: the reader cannot open or finish the file
    (inp / "zero-bytes.parquet").write_bytes(b"")
    (inp / "zero-bytes-jsonl.jsonl").write_bytes(b"")
    (inp / "zero-bytes-gzip.jsonl.gz").write_bytes(b"")
    docs["truncated-parquet"] = make_docs(12, seed=12, start_id=1000)
    write_parquet(docs["truncated-parquet"], str(inp / "truncated-parquet.parquet"))
    _truncate(inp / "truncated-parquet.parquet", 0.5)
    docs["truncated-gzip"] = make_docs(30, seed=13, start_id=2000)
    write_jsonl_gz(docs["truncated-gzip"], str(inp / "truncated-gzip.jsonl.gz"))
    _truncate(inp / "truncated-gzip.jsonl.gz", 2 / 3)
    docs["not-gzip"] = make_docs(3, seed=14, start_id=3000)
    _jsonl(inp / "not-gzip.jsonl.gz", docs["not-gzip"])  # plain JSONL under a .gz name
    (inp / "garbage.parquet").write_bytes(np.random.default_rng(0).bytes(4096))
    write_parquet([{"text": "no id here"}, {"text": "nor here"}], str(inp / "no-id-column.parquet"))
    write_parquet([{"id": 4000, "body": "no text column"}], str(inp / "no-text-column.parquet"))

    # --- row-level: one bad row, the rest of the shard embedded
    docs["invalid-utf8"] = [
        {"id": 100, "text": "first good row"},
        {"id": 101, "text": "caf\u00e9"},  # written below as Latin-1: not UTF-8
        {"id": 102, "text": "third good row"},
    ]
    _jsonl(
        inp / "invalid-utf8.jsonl",
        [docs["invalid-utf8"][0], '{"id": 101, "text": "caf\u00e9"}'.encode("latin-1"), docs["invalid-utf8"][2]],
    )
    docs["malformed-json"] = [{"id": 110, "text": "good before"}, None, None, {"id": 113, "text": "good after"}]
    _jsonl(
        inp / "malformed-json.jsonl",
        [docs["malformed-json"][0], '{"id": 111 "text": "no comma"}', "[1, 2, 3]", docs["malformed-json"][3]],
    )
    docs["null-text"] = [{"id": 120, "text": "a"}, {"id": 121, "text": None}, {"id": 122, "text": "c"}]
    write_parquet(docs["null-text"], str(inp / "null-text.parquet"))
    int_text = [{"id": 180 + i, "text": 7 * i} for i in range(3)]  # a text column of type int64
    write_parquet(int_text, str(inp / "int-text.parquet"))
    docs["no-id-field"] = [{"text": "a JSONL line without an id"}, {"text": "another one"}]
    _jsonl(inp / "no-id-field.jsonl", docs["no-id-field"])

    # --- valid but unusual rows
    docs["empty-text"] = [{"id": 130, "text": ""}, {"id": 131, "text": "not empty"}]
    _jsonl(inp / "empty-text.jsonl", docs["empty-text"])
    docs["big-text"] = [{"id": 140, "text": BIG_TEXT}, {"id": 141, "text": "short"}]
    _jsonl(inp / "big-text.jsonl", docs["big-text"])
    docs["duplicate-ids"] = [
        {"id": 0, "text": "same id as the first row of aa-good"},
        {"id": 170, "text": "first copy of id 170"},
        {"id": 170, "text": "second copy of id 170, another text"},
    ]
    write_parquet(docs["duplicate-ids"], str(inp / "duplicate-ids.parquet"))
    return docs


@dataclass
class Job:
    out: Path
    inp: Path
    docs: dict[str, list[dict]]
    stdout: str
    manifest: dict
    markers: dict[str, dict]
    errors: dict[str, list[dict]]  # quarantine records by shard, in offset order
    data: dict[str, pa.Table]  # data rows by shard (each shard's files read alone: id types differ per shard)
    embedder: object

    def error(self, stem: str) -> dict:
        """The shard's only quarantine record."""
        (rec,) = self.errors[stem]
        return rec

    def ids(self, stem: str) -> list:
        return self.data[stem]["id"].to_pylist() if stem in self.data else []

    def vectors(self, stem: str) -> np.ndarray:
        col = self.data[stem]["embedding"].combine_chunks()
        return np.asarray(col.values.to_numpy()).reshape(len(col), -1)


@pytest.fixture(scope="module")
def job(tmp_path_factory, qwen_model_dir, ray_local) -> Job:
    from operators.embedder import Embedder

    root = tmp_path_factory.mktemp("bad-inputs")
    inp, out = root / "in", root / "out"
    inp.mkdir()
    docs = _make_inputs(inp)
    argv = ["embed", "--input", str(inp), "--output", str(out), "--model", qwen_model_dir, "-q"]
    argv += ["--max-error-ratio", "1", "--max-length", str(MAX_LENGTH), "--rows-per-block", str(ROWS_PER_BLOCK)]
    argv += ["--part-rows", str(ROWS_PER_BLOCK)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(argv)
    assert rc == 0, buf.getvalue()
    manifest = json.loads((out / "_manifest.json").read_text())
    markers = {p.stem: json.loads(p.read_text()) for p in (out / "_state").glob("*.json")}
    errors: dict[str, list[dict]] = {}
    for f in manifest["error_files"]:
        for rec in pq.read_table(out / f).to_pylist():
            errors.setdefault(rec["shard"], []).append(rec)
    data = {}
    for stem, m in markers.items():
        if m["files"]:
            data[stem] = pa.concat_tables([pq.read_table(out / f) for f in m["files"]])
    return Job(
        out=out,
        inp=inp,
        docs=docs,
        stdout=buf.getvalue(),
        manifest=manifest,
        markers=markers,
        errors={k: sorted(v, key=lambda r: r["row_offset"]) for k, v in errors.items()},
        data=data,
        embedder=Embedder(qwen_model_dir, max_length=MAX_LENGTH),
    )


def _assert_shard_failed(job: Job, stem: str, error_type: str, *needles: str, offset: int = 0) -> dict:
    """Exactly one shard-level record for ``stem``, at ``offset``, naming the cause; no data beyond ``offset``."""
    rec = job.error(stem)
    assert (rec["shard"], rec["error_type"], rec["row_offset"], rec["id"]) == (stem, error_type, offset, None)
    assert rec["message"].startswith(f"shard unreadable after {offset} rows: "), rec["message"]
    for needle in needles:
        assert needle in rec["message"], rec["message"]
    m = job.markers[stem]
    assert (m["rows"], m["errors"]) == (offset, 1)
    assert len(job.ids(stem)) == offset
    return rec


# --------------------------------------------------------------------------------------------- the whole job


def test_every_shard_committed_and_nothing_lost(job):
    """Every input shard has a marker; markers agree with the files on disk; manifest totals are the markers' sums;
    for each shard read to its end, exactly its valid rows are written and exactly its invalid rows quarantined."""
    stems = {s.stem for s in list_shards(str(job.inp))}
    assert set(job.markers) == stems and set(job.manifest["shards"]) == stems
    for stem, m in job.markers.items():
        assert m["rows"] == len(job.ids(stem)), stem
        assert m["errors"] == len(job.errors.get(stem, [])), stem
    assert all(job.errors[stem][-1]["error_type"] in SHARD_LEVEL for stem in FAILED_SHARDS)
    # Exactly the good rows written, in order, and the bad ones quarantined (a null text embedded as "" adds up too).
    for stem in sorted(job.docs.keys() - FAILED_SHARDS):
        docs, bad = job.docs[stem], BAD_ROWS.get(stem, set())
        good = [d for k, d in enumerate(docs) if k not in bad]
        assert all(isinstance(d["text"], str) and d["id"] is not None for d in good), stem  # the table fits the docs
        assert job.ids(stem) == [d["id"] for d in good], stem
        assert [r["row_offset"] for r in job.errors.get(stem, [])] == sorted(bad), stem
    totals = job.manifest["totals"]
    assert totals["shards"] == len(stems)
    assert totals["rows"] == sum(m["rows"] for m in job.markers.values()) == sum(len(t) for t in job.data.values())
    assert totals["errors"] == sum(m["errors"] for m in job.markers.values()) == sum(map(len, job.errors.values()))
    assert f"{len(stems)} shards ({len(stems)} processed, 0 already committed), {totals['rows']} docs" in job.stdout
    assert f"{totals['errors']} rows quarantined" in job.stdout
    # On disk: exactly the files the manifest lists, no leftovers.
    assert sorted(os.listdir(job.out / "data")) == sorted(f.split("/")[-1] for f in job.manifest["files"])
    assert sorted(os.listdir(job.out / "_errors")) == sorted(f.split("/")[-1] for f in job.manifest["error_files"])


def test_good_shard_embedded_exactly(job):
    docs = job.docs["aa-good"]
    assert job.ids("aa-good") == [d["id"] for d in docs]
    assert "aa-good" not in job.errors
    ref = job.embedder.embed([d["text"] for d in docs])
    assert np.abs(job.vectors("aa-good") - ref).max() <= 1e-5


# ------------------------------------------------------------------------------------------- shard-level cases


def test_zero_byte_parquet_is_one_shard_error(job):
    _assert_shard_failed(job, "zero-bytes", "CorruptShard", "Parquet file size is 0 bytes")


@pytest.mark.parametrize("stem", ["zero-bytes-jsonl", "zero-bytes-gzip"])
def test_zero_byte_jsonl_is_an_empty_shard(job, stem):
    """Policy: a zero-byte .jsonl (or .jsonl.gz: Python's gzip reads an empty file as empty) holds no lines; it is
    committed with zero rows and no error, so a rerun skips it."""
    m = job.markers[stem]
    assert (m["rows"], m["errors"], m["files"], m["error_files"]) == (0, 0, [], [])
    assert stem not in job.errors and stem not in job.data


def test_truncated_parquet_is_one_shard_error(job):
    _assert_shard_failed(job, "truncated-parquet", "CorruptShard", "ArrowInvalid")


def test_truncated_gzip_is_one_shard_error_after_the_rows_read(job):
    rec = job.errors["truncated-gzip"][-1]
    n = rec["row_offset"]
    assert 0 < n < 30  # some blocks were read before the gzip stream ended
    _assert_shard_failed(job, "truncated-gzip", "CorruptShard", "EOFError", "Compressed file ended", offset=n)
    assert job.ids("truncated-gzip") == [d["id"] for d in job.docs["truncated-gzip"][:n]]


def test_truncated_gzip_keeps_every_complete_line(job):
    data = (job.inp / "truncated-gzip.jsonl.gz").read_bytes()
    complete = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data).count(b"\n")
    assert complete % ROWS_PER_BLOCK  # else the bug does not show
    assert job.errors["truncated-gzip"][-1]["row_offset"] == complete
    assert job.ids("truncated-gzip") == [d["id"] for d in job.docs["truncated-gzip"][:complete]]


def test_undecodable_files_are_one_shard_error(job):
    _assert_shard_failed(job, "not-gzip", "CorruptShard", "BadGzipFile", "Not a gzipped file")
    _assert_shard_failed(job, "garbage", "CorruptShard", "ArrowInvalid", "magic bytes not found")


def test_missing_id_column_in_parquet_is_one_shard_error_naming_it(job):
    _assert_shard_failed(job, "no-id-column", "MissingColumn", "['id'] not in shard", "has ['text']")


def test_missing_text_column_in_parquet_is_one_shard_error_naming_it(job):
    _assert_shard_failed(job, "no-text-column", "MissingColumn", "['text'] not in shard", "has ['id', 'body']")


# --------------------------------------------------------------------------------------------- row-level cases


def test_invalid_utf8_line_quarantined_others_embedded(job):
    rec = job.error("invalid-utf8")
    assert (rec["row_offset"], rec["id"], rec["error_type"]) == (1, None, "InvalidUTF8")
    assert re.fullmatch(r"line is not valid UTF-8 \(invalid continuation byte at byte \d+\)", rec["message"])
    assert job.ids("invalid-utf8") == [100, 102]


def test_malformed_json_lines_quarantined_others_embedded(job):
    recs = job.errors["malformed-json"]
    assert [(r["row_offset"], r["id"], r["error_type"]) for r in recs] == [
        (1, None, "MalformedJSON"),
        (2, None, "MalformedJSON"),
    ]
    assert recs[0]["message"] == "malformed JSON: Expecting ',' delimiter at column 12"
    assert recs[1]["message"] == "line is a JSON list, not an object"
    assert job.ids("malformed-json") == [110, 113]


def test_null_text_quarantined_with_its_id(job):
    rec = job.error("null-text")
    assert (rec["row_offset"], rec["id"], rec["error_type"]) == (1, "121", "InvalidText")
    assert rec["message"] == "text is null"
    assert job.ids("null-text") == [120, 122]


def test_non_string_text_column_is_one_shard_error_naming_it(job):
    assert "int-text" in job.markers
    _assert_shard_failed(job, "int-text", "InvalidColumn", "'text'", "int64")


def test_jsonl_line_without_id_field_is_quarantined(job):
    recs = job.errors.get("no-id-field", [])
    assert [(r["row_offset"], r["id"], r["error_type"]) for r in recs] == [(i, None, "MissingId") for i in range(2)]
    assert all("'id'" in r["message"] for r in recs)
    assert "no-id-field" not in job.data


# ------------------------------------------------------------------------------------ valid but unusual rows


def test_empty_text_is_embedded_as_eos_alone(job):
    assert "empty-text" not in job.errors
    assert job.ids("empty-text") == [130, 131]
    enc = job.embedder.encoder.encode(["", "not empty"])
    assert enc.ids[0].tolist() == [151643]  # <|endoftext|> alone
    assert job.markers["empty-text"]["tokens"] == 1 + len(enc.ids[1])
    ref = job.embedder.embed(["", "not empty"])
    assert np.abs(job.vectors("empty-text") - ref).max() <= 1e-5


def test_one_megabyte_text_is_truncated_and_counted(job):
    assert "big-text" not in job.errors
    assert job.ids("big-text") == [140, 141]
    m = job.markers["big-text"]
    assert m["truncated"] == 1
    assert m["tokens"] == MAX_LENGTH + len(job.embedder.encoder.encode(["short"]).ids[0])
    ref = job.embedder.embed([BIG_TEXT, "short"])
    assert np.abs(job.vectors("big-text") - ref).max() <= 1e-5
    # The summary line counts every truncated row of the job (aa-good's long docs are cut at 64 tokens too).
    expect = 0
    for stem, docs in job.docs.items():
        written = set(job.ids(stem))
        texts = [d["text"] for d in docs if d and d.get("id") in written and isinstance(d.get("text"), str)]
        expect += int(job.embedder.encoder.encode(texts).truncated.sum())
    assert expect > 1 and f"{expect} truncated" in job.stdout
    assert sum(m["truncated"] for m in job.markers.values()) == expect


def test_duplicate_ids_keep_the_first_row_and_quarantine_the_others(job):
    assert job.ids("duplicate-ids") == [170]
    all_ids = [i for stem in job.data for i in job.ids(stem)]
    assert all_ids.count(0) == 1 and all_ids.count(170) == 1 and job.ids("aa-good")[0] == 0
    recs = [(r["row_offset"], r["id"], r["error_type"], r["message"]) for r in job.errors["duplicate-ids"]]
    assert recs == [
        (0, "0", "DuplicateId", "duplicate id: kept the row at aa-good offset 0"),
        (2, "170", "DuplicateId", "duplicate id: kept the row at duplicate-ids offset 1"),
    ]
    assert job.markers["duplicate-ids"]["duplicates"] == 2 and job.markers["aa-good"]["duplicates"] == 0
    ref = job.embedder.embed([job.docs["duplicate-ids"][1]["text"]])
    assert np.abs(job.vectors("duplicate-ids") - ref).max() <= 1e-5  # the kept row's own text, not the other copy


def test_status_lists_exactly_the_failed_shards(job):
    from pipelines.status import collect_status

    report = collect_status(str(job.out))
    assert [f["shard"] for f in report["failed"]] == sorted(FAILED_SHARDS)
    for f in report["failed"]:
        rec = job.errors[f["shard"]][-1]
        assert f == {"shard": f["shard"], **{k: rec[k] for k in ("row_offset", "error_type", "message")}}
    assert report["done"] == len(job.markers) - len(FAILED_SHARDS)
    assert report["pending"] == [] and report["stale"] == []
    assert report["truncated"] == sum(m["truncated"] for m in job.markers.values()) > 0


# ------------------------------------------------------------------------------------------- without a job


def test_valid_zstd_jsonl_shard_is_read(tmp_path):
    docs = make_docs(3, seed=21)
    payload = "".join(json.dumps(d) + "\n" for d in docs).encode()
    with pa.CompressedOutputStream(str(tmp_path / "z.jsonl.zst"), "zstd") as f:
        f.write(payload)
    (shard,) = list_shards(str(tmp_path))
    (block,) = read_shard(shard, id_column="id", text_column="text", passthrough=(), rows_per_block=16)
    assert block["error_type"].null_count == len(block)
    assert block["id"].to_pylist() == [d["id"] for d in docs]
