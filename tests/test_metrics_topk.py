"""Exact top-k over sharded vectors against a brute force, and the BEIR metrics against hand-computed values."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from operators.errors import ConfigError, InvalidInputError
from operators.metrics import (
    evaluate,
    mrr_at_k,
    ndcg_at_k,
    parse_qrels,
    qrels_coverage,
    recall_at_k,
)
from operators.topk import TopK, merge_topk, topk_block

# ------------------------------------------------------------------------------------------------------------ top-k


def _brute_force(queries, vectors, ids, k):
    """Independent reference: every score in Python, sorted by (-score, id)."""
    out_ids, out_scores = [], []
    for q in queries:
        scored = sorted(((float(np.dot(q, v)), i) for v, i in zip(vectors, ids)), key=lambda t: (-t[0], t[1]))
        out_scores.append([s for s, _ in scored[:k]])
        out_ids.append([i for _, i in scored[:k]])
    return out_scores, out_ids


def _dyadic_corpus(seed: int, n: int, dim: int, ids):
    """Vectors with entries in {-1, -1/2, 0, 1/2, 1}: every dot product is exact in float32 whatever the summation
    order, so ties are real ties for BLAS and for the reference alike. Rows are repeated on purpose (ties)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-2, 3, size=(n // 3, dim)).astype(np.float32) / 2
    vectors = np.concatenate([base, base, base[: n - 2 * len(base)]])  # each base row 2-3 times
    perm = rng.permutation(n)
    return vectors[perm], [ids[i] for i in range(n)]


@pytest.mark.parametrize("id_kind", ["int", "str"])
def test_topk_over_three_shards_equals_brute_force_with_ties(id_kind):
    n, dim, k = 60, 8, 15
    ids = (
        list(range(1000, 1000 - n, -1))
        if id_kind == "int"
        else [f"doc-{i:03d}" for i in random.Random(1).sample(range(999), n)]
    )
    vectors, ids = _dyadic_corpus(3, n, dim, ids)
    queries = np.random.default_rng(4).integers(-2, 3, size=(7, dim)).astype(np.float32) / 2
    queries[0] = 0  # every score 0: the order is the ids alone

    shards = [(vectors[:17], ids[:17]), (vectors[17:41], ids[17:41]), (vectors[41:], ids[41:])]
    partials = [topk_block(queries, v, i, k) for v, i in shards]
    for order in ([0, 1, 2], [2, 0, 1]):  # merge order does not matter
        got = merge_topk([partials[j] for j in order], k)
        ref_scores, ref_ids = _brute_force(queries, vectors, ids, k)
        assert got.ids.tolist() == ref_ids
        assert got.scores.tolist() == ref_scores  # exact: dyadic values
    # Ties were constructed: some query has equal scores inside its top-k, resolved by ascending id.
    assert any(len(set(row)) < len(row) for row in got.scores.tolist())
    assert got.ids[0].tolist() == sorted(ids)[:k]
    # Merging pairwise as results arrive gives the same.
    assert merge_topk([merge_topk(partials[:2], k), partials[2]], k).ids.tolist() == ref_ids


def test_topk_random_unit_vectors_and_small_chunks():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[[5, 77, 120]] + 0.01
    ids = np.arange(300) * 3
    got = topk_block(queries, vectors, ids, 10, chunk_rows=64)  # chunked inside one block
    ref_scores, ref_ids = _brute_force(queries, vectors, ids.tolist(), 10)
    assert got.ids.tolist() == ref_ids
    np.testing.assert_allclose(got.scores, ref_scores, atol=1e-5)
    assert got.ids[:, 0].tolist() == [15, 231, 360]


def test_topk_k_larger_than_block_and_bad_input():
    v = np.eye(4, dtype=np.float32)
    got = topk_block(v[:1], v, ["d", "c", "b", "a"], 10)
    assert got.width == 4 and got.ids.tolist() == [["d", "a", "b", "c"]]
    assert merge_topk([TopK.empty(1), got], 2).ids.tolist() == [["d", "a"]]
    with pytest.raises(ConfigError, match="k must be at least 1"):
        topk_block(v, v, [1, 2, 3, 4], 0)
    with pytest.raises(InvalidInputError, match="query dim 3 != corpus vector dim 4"):
        topk_block(np.ones((1, 3)), v, [1, 2, 3, 4], 2)
    with pytest.raises(InvalidInputError, match="4 vectors but 3 ids"):
        topk_block(v, v, [1, 2, 3], 2)


# ---------------------------------------------------------------------------------------------------------- metrics

QRELS = {
    "q1": {"a": 2, "b": 1, "z": 1},  # z is never retrieved
    "q2": {"c": 1},
    "q3": {"d": 0},  # judged, nothing relevant: not evaluated
}
RUN = {"q1": ["x", "b", "a", "y"], "q2": ["c", "x"], "q3": ["d"], "q4": ["a"]}


def test_metrics_hand_computed():
    # q1: DCG@10 = 0/log2(2) + 1/log2(3) + 2/log2(4) = 1.63093; IDCG = 2/1 + 1/log2(3) + 1/log2(4) = 3.13093
    dcg = 1 / math.log2(3) + 2 / 2
    idcg = 2 + 1 / math.log2(3) + 1 / 2
    assert ndcg_at_k(RUN["q1"], QRELS["q1"], 10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(RUN["q1"], QRELS["q1"], 10) == pytest.approx(0.5209, abs=1e-4)  # 1.63093 / 3.13093
    # Cut at 2: DCG = 1/log2(3); IDCG = 2 + 1/log2(3)
    assert ndcg_at_k(RUN["q1"], QRELS["q1"], 2) == pytest.approx((1 / math.log2(3)) / (2 + 1 / math.log2(3)))
    assert recall_at_k(RUN["q1"], QRELS["q1"], 100) == pytest.approx(2 / 3)
    assert recall_at_k(RUN["q1"], QRELS["q1"], 2) == pytest.approx(1 / 3)
    assert mrr_at_k(RUN["q1"], QRELS["q1"], 10) == pytest.approx(1 / 2)
    assert mrr_at_k(RUN["q1"], QRELS["q1"], 1) == 0.0
    assert ndcg_at_k(RUN["q2"], QRELS["q2"], 10) == 1.0
    assert ndcg_at_k(RUN["q3"], QRELS["q3"], 10) == 0.0  # no relevant doc
    m = evaluate(RUN, QRELS)
    # Evaluated: q1 and q2 (q3 has no relevant judgement, q4 no judgement at all).
    assert m["queries"] == 2
    assert m["nDCG@10"] == pytest.approx((dcg / idcg + 1.0) / 2)
    assert m["Recall@100"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["MRR@10"] == pytest.approx((1 / 2 + 1) / 2)
    # Linear gain, not 2^rel - 1: with exponential gain q1 would be (1/log2(3) + 3/2) / (3 + 1/log2(3) + 1/2).
    assert ndcg_at_k(RUN["q1"], QRELS["q1"], 10) != pytest.approx((1 / math.log2(3) + 1.5) / (3.5 + 1 / math.log2(3)))


def _independent(run, qrels, k_ndcg=10, k_recall=100, k_mrr=10):
    """A second implementation, written from trec_eval's definitions, vectorised differently."""
    per = []
    for q, ranked in run.items():
        rels = {d: r for d, r in qrels.get(q, {}).items() if r > 0}
        if not rels:
            continue
        gains = np.array([rels.get(d, 0) for d in ranked[:k_ndcg]], dtype=float)
        disc = 1 / np.log2(np.arange(2, len(gains) + 2))
        ideal = np.sort(np.array(list(rels.values()), dtype=float))[::-1][:k_ndcg]
        ndcg = float((gains * disc).sum() / (ideal * (1 / np.log2(np.arange(2, len(ideal) + 2)))).sum())
        recall = len(set(ranked[:k_recall]) & set(rels)) / len(rels)
        hits = [i for i, d in enumerate(ranked[:k_mrr]) if d in rels]
        per.append((ndcg, recall, 1 / (hits[0] + 1) if hits else 0.0))
    arr = np.array(per)
    return {
        "nDCG@10": arr[:, 0].mean(),
        "Recall@100": arr[:, 1].mean(),
        "MRR@10": arr[:, 2].mean(),
        "queries": len(per),
    }


def test_metrics_equal_an_independent_implementation():
    rng = random.Random(7)
    docs = [f"d{i}" for i in range(300)]
    qrels = {
        f"q{i}": {d: rng.choice([0, 1, 1, 2, 3]) for d in rng.sample(docs, rng.randint(1, 12))} for i in range(40)
    }
    run = {f"q{i}": rng.sample(docs, rng.randint(0, 150)) for i in range(45)}
    for q in list(run)[:30]:  # plant some hits near the top
        run[q][:0] = rng.sample(sorted(qrels.get(q, {"d0": 1})), 1)
        run[q] = list(dict.fromkeys(run[q]))
    got, ref = evaluate(run, qrels), _independent(run, qrels)
    assert got["queries"] == ref["queries"] > 20
    for name in ("nDCG@10", "Recall@100", "MRR@10"):
        assert got[name] == pytest.approx(ref[name], abs=1e-12)


def test_qrels_parsing_and_unknown_ids():
    beir = "query-id\tcorpus-id\tscore\nq1\ta\t2\nq1\tb\t1\n\nq2\tc\t1\nq9\tzz\t1\nq1\tnope\t1\n"
    qrels = parse_qrels(beir)
    assert qrels == {"q1": {"a": 2, "b": 1, "nope": 1}, "q2": {"c": 1}, "q9": {"zz": 1}}
    assert parse_qrels("q1 0 a 2\nq2 0 c 1\n") == {"q1": {"a": 2}, "q2": {"c": 1}}  # TREC, no header
    with pytest.raises(ConfigError, match="line 3: relevance 'x' is not an integer"):
        parse_qrels("query-id\tcorpus-id\tscore\nq1\ta\t1\nq1\tb\tx\n")
    with pytest.raises(ConfigError, match="line 1: expected 'query-id corpus-id score'"):
        parse_qrels("q1 a\n")
    cov = qrels_coverage(qrels, ["q1", "q2"], ["a", "b", "c"])
    assert (cov.unknown_query_ids, cov.unknown_query_judgements) == (1, 1)
    assert (cov.unknown_doc_ids, cov.unknown_doc_judgements) == (2, 2)
    assert cov.examples == {"query_ids": ["q9"], "doc_ids": ["nope", "zz"]}
    assert "1 reference 1 unknown query ids" in cov.line() and "2 reference 2 doc ids not in the corpus" in cov.line()
