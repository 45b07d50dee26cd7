"""Deterministic mixed-language corpora written as Parquet and JSONL(.gz) shards, locally or through fsspec."""

from __future__ import annotations

import gzip
import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq

EN = "The quick brown fox jumps over the lazy dog while the committee reviews the quarterly budget report."
ZH = "北京是中华人民共和国的首都，也是全国的政治文化中心。今天天气不错，我们去公园散步吧。"
CODE = (
    "def add(a: int, b: int) -> int:\n    return a + b  # simple helper\n\nfor i in range(10):\n    print(add(i, i))\n"
)


def make_docs(n: int, seed: int = 0, start_id: int = 0) -> list[dict]:
    """``n`` docs with int ids, texts of 1..~600 tokens in English, Chinese or code, and two pass-through columns."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lang = ("en", "zh", "code")[i % 3]
        base = {"en": EN, "zh": ZH, "code": CODE}[lang]
        reps = rng.choice([0, 1, 1, 2, 3, 5, 8, 20])
        text = (base + " ") * reps + f"{lang} doc {start_id + i} {rng.random():.6f}"
        docs.append({"id": start_id + i, "text": text, "lang": lang, "score": float(i) / 7})
    return docs


def write_parquet(docs: list[dict], path: str, fs=None) -> None:
    table = pa.Table.from_pylist(docs)
    if fs is None:
        pq.write_table(table, path)
    else:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        fs.pipe_file(path, buf.getvalue())


def write_jsonl_gz(docs: list[dict], path: str, fs=None) -> None:
    data = gzip.compress("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode())
    if fs is None:
        with open(path, "wb") as f:
            f.write(data)
    else:
        fs.pipe_file(path, data)


def make_mixed_corpus(root: str, fs=None, per_shard: int = 40) -> list[dict]:
    """3 Parquet + 2 JSONL.gz shards under ``root`` (a local dir or an fs path without protocol)."""
    docs: list[dict] = []
    for k in range(5):
        chunk = make_docs(per_shard + 7 * k, seed=k, start_id=1000 * k)
        docs.extend(chunk)
        if k < 3:
            write_parquet(chunk, f"{root}/part-{k}.parquet", fs)
        else:
            write_jsonl_gz(chunk, f"{root}/part-{k}.jsonl.gz", fs)
    return docs
