"""Poison rows: an exception inside the tokenizer or the model is bisected down to the rows that raise, which are
quarantined; every other row of the batch is embedded as in a clean run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from operators.storage import list_shards
from pipelines import testhooks
from pipelines.jobs.embed_model import EmbedStage
from pipelines.jobs.embed_stages import encode_bisecting, read_shard, tokenize_block
from pipelines.testhooks import POISON_TOKEN_ENV

TEXTS = [f"document number {i} about {'rivers' if i % 3 else 'mountains'} and data" for i in range(24)]
TEXTS[5] = "a zebra crossing the road"
TEXTS[17] = "stripes of a zebra again"


@pytest.fixture(scope="module")
def block(tmp_path_factory, qwen_model_dir):
    d = tmp_path_factory.mktemp("poison")
    with open(d / "p.jsonl", "w") as f:
        for i, t in enumerate(TEXTS):
            f.write(json.dumps({"id": i, "text": t}) + "\n")
    (shard,) = list_shards(str(d))
    (table,) = read_shard(shard, id_column="id", text_column="text", passthrough=(), rows_per_block=64)
    kw = dict(model=qwen_model_dir, revision=None, max_length=512, instruction=None, text_column="text")
    return tokenize_block(table, drop_text=True, **kw)


def test_model_poison_rows_are_bisected_out(block, qwen_model_dir, qwen_tokenizer, monkeypatch):
    clean = EmbedStage(qwen_model_dir, device="cpu", dtype="float32")(block)
    zebra = qwen_tokenizer.encode(" zebra", add_special_tokens=False)[0]
    poisoned = {i for i, ids in enumerate(block["input_ids"].to_pylist()) if zebra in ids}
    assert poisoned == {5, 17}
    monkeypatch.setenv(POISON_TOKEN_ENV, str(zebra))
    stage = testhooks.wrap(EmbedStage)(qwen_model_dir, device="cpu", dtype="float32")
    out = stage(block)
    assert out.num_rows == block.num_rows and out["id"].to_pylist() == block["id"].to_pylist()
    types, errors = out["error_type"].to_pylist(), out["error"].to_pylist()
    for i in range(out.num_rows):
        if i in poisoned:
            assert types[i] == "ModelError" and "poison token" in errors[i]
            assert out["embedding"][i].as_py() is None
        else:
            assert types[i] is None and errors[i] is None
            np.testing.assert_allclose(out["embedding"][i].as_py(), clean["embedding"][i].as_py(), atol=1e-6)
    # Bisection, not one forward per row: far fewer forwards than rows were run.
    assert stage.stats.rows < 3 * block.num_rows


class PoisonEncoder:
    """Wraps a real encoder; raises, as a tokenizer bug would, on any batch holding the word 'zebra'."""

    def __init__(self, enc):
        self.enc = enc

    def encode(self, texts):
        if any("zebra" in t for t in texts):
            raise ValueError("tokenizer blew up")
        return self.enc.encode(texts)


def test_tokenizer_poison_rows_are_bisected_out(qwen_model_dir):
    from operators.embedder import Embedder

    enc = Embedder(qwen_model_dir, device="cpu", dtype="float32").encoder
    clean = enc.encode(TEXTS)
    got, poison = encode_bisecting(PoisonEncoder(enc), TEXTS)
    assert poison == {5, 17}
    for i in range(len(TEXTS)):
        if i in poison:
            assert got.errors[i].startswith("tokenizer failed: ValueError: tokenizer blew up") and len(got.ids[i]) == 0
        else:
            assert got.errors[i] is None and got.ids[i].tolist() == clean.ids[i].tolist()


# ------------------------------------------------------------------------------------------------------- reranker

PAIR_ROWS = [
    {
        "query_id": "qa",
        "query": "capital of China",
        "candidates": [{"doc_id": i, "doc": f"city number {i}"} for i in range(6)],
    },
    {
        "query_id": "qb",
        "query": "striped animals",
        "candidates": [
            {"doc_id": 10, "doc": "a zebra in the grass"},
            {"doc_id": 11, "doc": "horses run"},
            {"doc_id": 12, "doc": "tigers"},
        ],
    },
]


@pytest.fixture(scope="module")
def pair_block(tmp_path_factory, qwen_lm_dir):
    """The reader's packed block of PAIR_ROWS, tokenized; and the untokenized block, for the tokenizer test."""
    from pipelines.jobs.rerank_read import Columns, pack, read_rerank_shard, unpack
    from pipelines.jobs.rerank_stages import tokenize_pairs

    d = tmp_path_factory.mktemp("pairs")
    (d / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIR_ROWS))
    (shard,) = list_shards(str(d))
    (source,) = read_rerank_shard(shard, columns=Columns(), rows_per_block=64)
    kw = dict(model=qwen_lm_dir, revision=None, instruction=None, max_length=256)
    return tokenize_pairs(pack(source), **kw), unpack, source


def _pairs(block, unpack):
    (t,) = unpack(block)
    return [
        (qid, did, s, k)
        for qid, dids, scores, kinds in zip(
            *(t[c].to_pylist() for c in ("query_id", "doc_ids", "scores", "pair_error_types"))
        )
        for did, s, k in zip(dids, scores, kinds)
    ]


def test_reranker_poison_pair_is_bisected_out(pair_block, qwen_lm_dir, qwen_tokenizer, monkeypatch):
    from pipelines.jobs.rerank_stages import RerankStage

    block, unpack, _source = pair_block
    kw = dict(model=qwen_lm_dir, device="cpu", dtype="float32", max_length=256)
    clean = {(q, d): s for q, d, s, _k in _pairs(RerankStage(**kw)(block), unpack)}
    zebra = qwen_tokenizer.encode(" zebra", add_special_tokens=False)[0]
    monkeypatch.setenv(POISON_TOKEN_ENV, str(zebra))
    got = _pairs(testhooks.wrap(RerankStage)(**kw)(block), unpack)
    assert len(got) == 9 and len(clean) == 9
    for q, d, s, kind in got:
        if d == 10:
            assert kind == "ModelError" and np.isnan(s)
        else:
            assert kind is None and abs(s - clean[(q, d)]) <= 1e-6


def test_reranker_tokenizer_poison_pair_is_bisected_out(pair_block, qwen_lm_dir, monkeypatch):
    from operators.tokenization import PairEncoder
    from pipelines.jobs import rerank_stages
    from pipelines.jobs.rerank_read import pack
    from pipelines.jobs.rerank_stages import RerankStage

    block, unpack, source = pair_block
    kw = dict(model=qwen_lm_dir, device="cpu", dtype="float32", max_length=256)
    clean = {(q, d): s for q, d, s, _k in _pairs(RerankStage(**kw)(block), unpack)}
    original = PairEncoder.encode

    def encode(self, queries, docs, valid=None):
        if any("zebra" in d for d in docs):
            raise ValueError("tokenizer blew up")
        return original(self, queries, docs, valid)

    monkeypatch.setattr(PairEncoder, "encode", encode)
    (raw,) = unpack(block)
    poisoned = rerank_stages.tokenize_pairs(
        pack(source), model=qwen_lm_dir, revision=None, instruction=None, max_length=256
    )
    (t,) = unpack(poisoned)
    kinds = [k for row in t["pair_error_types"].to_pylist() for k in row]
    msgs = [m for row in t["pair_errors"].to_pylist() for m in row]
    dids = [d for row in t["doc_ids"].to_pylist() for d in row]
    assert [d for d, k in zip(dids, kinds) if k] == [10] and kinds[dids.index(10)] == "TokenizerError"
    assert msgs[dids.index(10)].startswith("tokenizer failed: ValueError: tokenizer blew up")
    assert t["pair_ids"].to_pylist() != raw["pair_ids"].to_pylist()  # the poisoned pair has no ids
    for q, d, s, kind in _pairs(RerankStage(**kw)(poisoned), unpack):
        if d == 10:
            assert kind == "TokenizerError" and np.isnan(s)
        else:
            assert kind is None and abs(s - clean[(q, d)]) <= 1e-6
