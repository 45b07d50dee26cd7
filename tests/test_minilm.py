"""Real weights: sentence-transformers/all-MiniLM-L6-v2 (mean pooling) through Embedder vs SentenceTransformer."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from operators.embedder import Embedder

MIN_COS = 0.9999
EN = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other.",
    "A man is playing a guitar on the street.",
    "The committee reviewed the quarterly budget report.",
    "Vector search retrieves passages close to the query.",
    'She said it\'s "fine" — the naïve café résumé was 3.14 pages long.',
]
ZH = ["北京是中华人民共和国的首都。", "今天天气不错，我们去公园散步吧。", "向量检索根据查询的嵌入找到最相关的段落。"]
CODE = ["def add(a: int, b: int) -> int:\n    return a + b\n", "SELECT id, text FROM docs WHERE lang = 'zh';"]
MISC = ["", " ", "a", "UPPER lower MiXeD", "émoji ✓ 😀", "1 2 3 4 5 6 7 8 9 10", "<html><body>x</body></html>"]


def make_texts(n: int, seed: int, n_long: int = 12) -> list[str]:
    """``n`` short and mid-length texts, ``n_long`` of them well over 256 word pieces (truncated by both sides)."""
    rng = random.Random(seed)
    texts = list(MISC)
    while len(texts) < n:
        pool = rng.choice([EN, EN, ZH, CODE, EN + ZH + CODE])
        reps = rng.choice([30, 60]) if len(texts) < len(MISC) + n_long else rng.choice([1, 1, 1, 2, 2, 3, 5])
        texts.append(" ".join(rng.choice(pool) for _ in range(reps)) + f" #{len(texts)}")
    rng.shuffle(texts)
    return texts


@pytest.fixture(scope="module")
def st_model(minilm_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_dir, device="cpu")


@pytest.fixture(scope="module")
def embedder(minilm_dir) -> Embedder:
    return Embedder(minilm_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return make_texts(208, seed=11)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_spec_is_mean_pooling(embedder, st_model):
    assert embedder.spec.family == "sentence-transformers" and embedder.spec.pooling == "mean"
    assert embedder.spec.hidden_size == 384 and embedder.dim == 384
    assert embedder.encoder.max_length == st_model.max_seq_length == 256


def test_matches_sentence_transformers(embedder, st_model, texts):
    expected = st_model.encode(texts, normalize_embeddings=True, batch_size=32)
    enc = embedder.encoder.encode(texts)
    assert len(texts) >= 200
    assert enc.truncated.sum() >= 10 and (enc.lengths[enc.truncated] == 256).all()
    # Same ids as sentence-transformers' own tokenization ([CLS] ... [SEP], truncated to 256).
    st_ids = st_model.tokenizer(texts[:50], truncation=True, max_length=256)["input_ids"]
    assert [x.tolist() for x in enc.ids[:50]] == st_ids
    before = embedder.stats.truncated
    got = embedder.embed(texts)
    assert embedder.stats.truncated - before == enc.truncated.sum()
    assert got.shape == (len(texts), 384)
    cos = _cosines(got, expected)
    assert cos.min() >= MIN_COS, f"rows {np.flatnonzero(cos < MIN_COS).tolist()}: min cosine {cos.min():.6f}"
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # The comparison can fail: unrelated rows are far from each other.
    assert _cosines(got[:-1], expected[1:]).min() < 0.9


def test_table_call_matches_sentence_transformers(embedder, st_model, texts):
    rows = texts[:24]
    out = embedder(pa.table({"id": list(range(24)), "text": rows}))
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    got = np.asarray(out.column("embedding").combine_chunks().flatten()).reshape(24, 384)
    assert _cosines(got, st_model.encode(rows, normalize_embeddings=True)).min() >= MIN_COS


def test_prompt_and_truncate_dim_match_sentence_transformers(minilm_dir, st_model, texts):
    """An instruction is a literal prompt prefix, as ``encode(prompt=...)``; ``dim`` slices then normalises, as
    ``truncate_dim`` with ``normalize_embeddings``."""
    rows = texts[:24]
    emb = Embedder(minilm_dir, instruction="query: ", dim=128, device="cpu", dtype="float32")
    expected = st_model.encode(rows, prompt="query: ", normalize_embeddings=True, truncate_dim=128)
    got = emb.embed(rows)
    assert got.shape == (24, 128)
    assert _cosines(got, expected).min() >= MIN_COS
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
