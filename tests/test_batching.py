"""Token-budget micro-batching: vectors independent of the budget, input order restored, OOM backoff.

Expected vectors come from the transformers model called on each text alone (``reference``), never through
``MicroBatcher``: with the batcher on both sides, a bug that returns rows in length-sorted order passed unnoticed.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from operators.batching import OOM_HOOK_ENV, BatchStats, MicroBatcher, pad_batch, plan_microbatches
from operators.embedder import Embedder
from operators.errors import ConfigError
from tests.qwen_fixtures import EOD_ID

ATOL = 1e-4
SENTENCES = [
    "The capital of China is Beijing.",
    "北京是中华人民共和国的首都。",
    "def add(a, b):\n    return a + b\n",
    "Gravity is a force that attracts two bodies towards each other.",
    "向量检索根据查询的嵌入找到最相关的段落。",
    "SELECT id FROM docs WHERE lang = 'en';",
]


def make_texts(n: int, seed: int) -> list[str]:
    """``n`` texts of 1 to ~300 tokens, in no particular length order."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        reps = rng.choice([0, 1, 1, 2, 3, 5, 8, 13, 16])
        body = " ".join(rng.choice(SENTENCES) for _ in range(reps))
        texts.append(f"{body} {i}" if i % 9 else body)
    texts[5] = ""  # EOS only
    return texts


def record_forwards(emb: Embedder) -> list[tuple[int, int]]:
    """Wrap ``emb._forward`` to log (rows, padded tokens) per forward pass."""
    log: list[tuple[int, int]] = []
    inner = emb._forward

    def forward(batch):
        log.append((batch["n"], batch["padded"]))
        return inner(batch)

    emb._forward = forward
    return log


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return make_texts(64, seed=7)


@pytest.fixture(scope="module")
def embedder(qwen_model_dir) -> Embedder:
    return Embedder(qwen_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def ids(embedder, texts) -> list[np.ndarray]:
    rows = embedder.encoder.encode(texts).ids
    lengths = [len(r) for r in rows]
    assert min(lengths) == 1 and max(lengths) >= 150 and len(set(lengths)) > 20
    return rows


def fresh(emb: Embedder, budget: int) -> BatchStats:
    emb.stats = BatchStats()
    emb.batcher = MicroBatcher(budget, emb.stats)
    return emb.stats


@pytest.fixture(scope="module")
def reference(qwen_model_dir, texts) -> np.ndarray:
    """Ground truth with neither ``MicroBatcher`` nor ``Embedder``: the transformers model called on each text alone
    (one forward per text, no padding), tokenized as the Qwen3 contract says (no special tokens, then
    <|endoftext|>), the last token's state L2-normalised. An ordering bug in the batcher cannot shift both sides."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen_model_dir)
    model = AutoModel.from_pretrained(qwen_model_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"] + [EOD_ID]
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            out.append(F.normalize(hidden.float(), dim=0).numpy())
    return np.stack(out)


def test_budget_1_runs_each_row_alone(embedder, ids, reference):
    stats = fresh(embedder, 1)
    log = record_forwards(embedder)
    try:
        out = embedder.embed_ids(ids)
    finally:
        del embedder._forward
    assert [n for n, _ in log] == [1] * len(ids)
    assert stats.forwards == len(ids) and stats.padded_tokens == stats.tokens
    diff = np.abs(out - reference).max()
    assert diff <= ATOL, f"max diff {diff:.2e}"


def test_batch_sizes_7_and_64_give_the_reference_vectors(embedder, ids, reference):
    longest = max(len(r) for r in ids)
    for budget, expected_sizes in [(7 * longest, None), (64 * longest, [64])]:
        stats = fresh(embedder, budget)
        log = record_forwards(embedder)
        try:
            out = embedder.embed_ids(ids)
        finally:
            del embedder._forward
        sizes = [n for n, _ in log]
        if expected_sizes is None:
            assert sizes[0] == 7 and 7 in sizes, sizes  # the longest rows go first, 7 to a batch
            assert max(sizes) > 7  # shorter rows pack more per batch under the same budget
        else:
            assert sizes == expected_sizes
        assert stats.forwards == len(sizes) and sum(sizes) == len(ids)
        assert all(padded <= budget for _, padded in log)
        assert stats.padded_tokens > stats.tokens  # ragged batches really were padded
        diff = np.abs(out - reference).max()
        assert diff <= ATOL, f"budget {budget}: max diff {diff:.2e}"


def test_order_restored_under_sorting(embedder, ids, reference):
    rng = np.random.default_rng(3)
    perm = rng.permutation(len(ids))
    fresh(embedder, 8192)
    out = embedder.embed_ids([ids[i] for i in perm])
    assert np.abs(out - reference[perm]).max() <= ATOL
    # Rows with different texts give different vectors, so a swap would be caught.
    assert np.abs(reference[1:] - reference[:-1]).max(axis=1).min() > 100 * ATOL


def test_embed_texts_vs_ids(embedder, texts, reference):
    fresh(embedder, 8192)
    assert np.abs(embedder.embed(texts) - reference).max() <= ATOL


def test_oom_backoff_same_result(embedder, ids, reference, monkeypatch, no_endless_retries):
    longest = max(len(r) for r in ids)
    threshold = 3 * longest
    monkeypatch.setenv(OOM_HOOK_ENV, str(threshold))
    initial = 64 * longest
    stats = fresh(embedder, initial)
    assert embedder.batcher._oom_above == threshold
    log = record_forwards(embedder)
    try:
        out = embedder.embed_ids(ids)
    finally:
        del embedder._forward
    assert stats.oom_retries > 0
    assert embedder.batcher.budget < initial and embedder.batcher.budget <= threshold
    assert stats.budgets and stats.budgets == sorted(stats.budgets, reverse=True)
    assert all(padded <= threshold for _, padded in log)  # only passes that fit ran
    assert sum(n for n, _ in log) == len(ids) and stats.rows == len(ids)
    assert np.abs(out - reference).max() <= ATOL
    # The smaller budget is kept: a second call needs no more retries.
    retries = stats.oom_retries
    out2 = embedder.embed_ids(ids)
    assert stats.oom_retries == retries
    assert np.abs(out2 - reference).max() <= ATOL


# ------------------------------------------------------------------------------------ MicroBatcher without a model


@pytest.fixture
def no_endless_retries(monkeypatch):
    """Fail, instead of hanging, if an OOM retry loop stops making progress (e.g. the budget never shrinks)."""
    from operators import batching

    plans = []
    inner = batching.plan_microbatches

    def plan(lengths, budget):
        plans.append(budget)
        if len(plans) > 1000:
            raise AssertionError(f"OOM backoff does not converge; budgets tried: {plans[:10]}...")
        return inner(lengths, budget)

    monkeypatch.setattr(batching, "plan_microbatches", plan)
    return plans


def _fake_forward(calls: list[list[int]]):
    """Returns, per row, (length, first id): enough to tell every row apart."""

    def forward(rows):
        calls.append([len(r) for r in rows])
        return torch.tensor([[len(r), int(r[0])] for r in rows], dtype=torch.float64)

    return forward


def _random_rows(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 300, size=n)
    lengths[::5] = lengths[0]  # ties: stable sorting must keep them apart correctly
    return [
        np.concatenate([[i], rng.integers(0, 1000, size=int(k) - 1)]).astype(np.int32) for i, k in enumerate(lengths)
    ]


@pytest.mark.parametrize("budget", [1, 100, 512, 4096, 10**6])
def test_microbatcher_restores_order(budget):
    rows = _random_rows(200, seed=budget)
    calls: list[list[int]] = []
    out = MicroBatcher(budget).run(rows, _fake_forward(calls))
    assert out[:, 1].long().tolist() == list(range(len(rows)))
    assert out[:, 0].long().tolist() == [len(r) for r in rows]
    for c in calls:
        assert len(c) == 1 or len(c) * max(c) <= budget
        assert c == sorted(c, reverse=True)


def test_microbatcher_oom_hook(monkeypatch, no_endless_retries):
    monkeypatch.setenv(OOM_HOOK_ENV, "1000")
    rows = _random_rows(100, seed=1)
    calls: list[list[int]] = []
    batcher = MicroBatcher(100_000)
    out = batcher.run(rows, _fake_forward(calls))
    assert out[:, 1].long().tolist() == list(range(len(rows)))
    assert batcher.stats.oom_retries > 0 and batcher.budget <= 1000
    assert all(len(c) * max(c) <= 1000 for c in calls)
    assert sum(len(c) for c in calls) == len(rows)  # no row computed twice


def test_microbatcher_single_row_too_big_raises(monkeypatch):
    monkeypatch.setenv(OOM_HOOK_ENV, "10")
    with pytest.raises(torch.cuda.OutOfMemoryError, match="injected OOM"):
        MicroBatcher(1000).run([np.arange(50, dtype=np.int32)], _fake_forward([]))


def test_microbatcher_other_errors_not_retried(monkeypatch):
    monkeypatch.delenv(OOM_HOOK_ENV, raising=False)
    batcher = MicroBatcher(1000)

    def boom(rows):
        raise ValueError("not an OOM")

    with pytest.raises(ValueError, match="not an OOM"):
        batcher.run(_random_rows(10, seed=2), boom)
    assert batcher.stats.oom_retries == 0 and batcher.budget == 1000


def test_microbatcher_real_oom_message_retried(monkeypatch, no_endless_retries):
    monkeypatch.delenv(OOM_HOOK_ENV, raising=False)
    calls: list[list[int]] = []
    inner = _fake_forward(calls)

    def forward(rows):
        if len(rows) > 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return inner(rows)

    rows = _random_rows(40, seed=4)
    batcher = MicroBatcher(10**6)
    out = batcher.run(rows, forward)
    assert out[:, 1].long().tolist() == list(range(len(rows)))
    assert batcher.stats.oom_retries > 0


def test_microbatcher_bad_budget():
    with pytest.raises(ConfigError, match="must be positive"):
        MicroBatcher(0)


# ---------------------------------------------------------------------------------------------- plan_microbatches


@pytest.mark.parametrize("seed", range(5))
def test_plan_padded_size_within_budget(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 2000, size=500)
    for budget in (1, 64, 1999, 2000, 8192, 65536):
        plan = plan_microbatches(lengths, budget)
        flat = np.concatenate(plan)
        assert sorted(flat.tolist()) == list(range(len(lengths)))  # every row exactly once
        for b in plan:
            assert len(b) >= 1
            assert len(b) == 1 or len(b) * lengths[b].max() <= budget
            if lengths[b].max() > budget:
                assert len(b) == 1  # a row longer than the budget runs alone
        # Longest first, non-increasing across the whole plan.
        assert (np.diff(lengths[flat]) <= 0).all()
        assert [b.tolist() for b in plan_microbatches(lengths, budget)] == [b.tolist() for b in plan]


def test_plan_fills_budget_and_is_stable():
    lengths = np.array([10, 10, 10, 10, 10, 10, 10])
    plan = plan_microbatches(lengths, 30)
    assert [b.tolist() for b in plan] == [[0, 1, 2], [3, 4, 5], [6]]
    lengths = np.array([5, 100, 5, 50, 50])
    assert [b.tolist() for b in plan_microbatches(lengths, 100)] == [[1], [3, 4], [0, 2]]
    with pytest.raises(ConfigError):
        plan_microbatches(lengths, 0)
    assert plan_microbatches(np.array([], dtype=np.int64), 10) == []


def test_pad_batch_right_pads_with_lengths():
    ids, lengths = pad_batch([np.array([1, 2, 3]), np.array([7]), np.array([151643, 151643])], 151643)
    assert ids.tolist() == [[1, 2, 3], [7, 151643, 151643], [151643, 151643, 151643]]
    assert lengths.tolist() == [3, 1, 2]  # the mask comes from lengths: row 2's EOS tokens are real
