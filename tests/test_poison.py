"""Poison rows: an exception inside the tokenizer or the model is bisected down to the rows that raise, which are
quarantined; every other row of the batch is embedded as in a clean run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from operators.storage import list_shards
from pipelines.stages import POISON_TOKEN_ENV, EmbedStage, encode_bisecting, read_shard, tokenize_block

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
    stage = EmbedStage(qwen_model_dir, device="cpu", dtype="float32")
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
