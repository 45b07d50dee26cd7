"""Padding-free packing: the packing logic (positions, boundaries, pooling, order) checked on CPU against the official
procedure through the exact per-sequence kernel; the CUDA kernels are compared with the padded path by
``benchmarks/bench_gpu.py --packing`` (cosine >= 0.999 in bf16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from operators import DEFAULT_INSTRUCTION
from operators.batching import OOM_HOOK_ENV, budget_from_memory, plan_packed, runs_padded
from operators.embedder import Embedder
from operators.errors import ConfigError
from operators.packing import resolve_kernel
from tests.test_embedder_reference import ATOL, QUERIES, OfficialQwen3Embedding, make_texts


@pytest.fixture(scope="module")
def texts(qwen_tokenizer) -> list[str]:
    return make_texts(qwen_tokenizer, 40, seed=2024, max_tokens=700)


@pytest.fixture(scope="module")
def reference(qwen_model_dir) -> OfficialQwen3Embedding:
    return OfficialQwen3Embedding(qwen_model_dir)


def test_packed_equals_official_reference(qwen_model_dir, reference, texts):
    emb = Embedder(qwen_model_dir, device="cpu", dtype="float32", packing="on", batch_tokens=900)
    assert emb.kernel == "loop" and emb.batcher.packed
    got = emb.embed(texts)
    want = reference.embed(texts)
    assert np.abs(got - want).max() <= ATOL
    # Several packs; a pack that would waste at most 5% on padding runs padded (single rows, near-uniform lengths).
    assert emb.stats.packed_forwards >= 3 and emb.stats.forwards > emb.stats.packed_forwards
    assert emb.stats.padding_efficiency >= 1 / 1.05


def test_packed_instructed_queries_and_mrl(qwen_model_dir, reference):
    emb = Embedder(
        qwen_model_dir, device="cpu", dtype="float32", packing="on", instruction=DEFAULT_INSTRUCTION, dim=64
    )
    got = emb.embed(QUERIES)
    want = reference.embed([f"Instruct: {DEFAULT_INSTRUCTION}\nQuery:{q}" for q in QUERIES], dim=64)
    assert got.shape == (len(QUERIES), 64)
    assert np.abs(got - want).max() <= ATOL


def test_packed_oom_backoff_retries_smaller_with_identical_vectors(qwen_model_dir, texts, monkeypatch):
    clean = Embedder(qwen_model_dir, device="cpu", dtype="float32", packing="on", batch_tokens=4000).embed(texts)
    monkeypatch.setenv(OOM_HOOK_ENV, "1500")
    emb = Embedder(qwen_model_dir, device="cpu", dtype="float32", packing="on", batch_tokens=4000)
    got = emb.embed(texts)
    assert emb.stats.oom_retries > 0 and emb.batcher.budget <= 1500
    assert emb.stats.budgets == sorted(emb.stats.budgets, reverse=True)
    np.testing.assert_allclose(got, clean, atol=1e-6)


@pytest.mark.parametrize("budget", [1, 50, 300, 10_000])
def test_plan_packed_covers_every_row_once_within_budget(budget):
    lengths = np.random.default_rng(3).integers(1, 400, size=200)
    plan = plan_packed(lengths, budget)
    flat = np.concatenate(plan)
    assert sorted(flat.tolist()) == list(range(200))
    for batch in plan:
        assert lengths[batch].sum() <= budget or len(batch) == 1
    # Longest first across the plan, so that each pack holds texts of similar length.
    assert (np.diff(lengths[flat]) <= 0).all()
    # Greedy: a pack is closed only when the next row would not fit.
    for batch, nxt in zip(plan[:-1], plan[1:], strict=True):
        assert lengths[batch].sum() + lengths[nxt[0]] > budget


def test_resolve_kernel_modes():
    cpu = torch.device("cpu")
    assert resolve_kernel("auto", cpu, is_qwen3=True) is None  # no varlen kernel on CPU: padded
    assert resolve_kernel("off", cpu, is_qwen3=True) is None
    assert resolve_kernel("on", cpu, is_qwen3=True) == "loop"
    assert resolve_kernel("auto", cpu, is_qwen3=False) is None
    with pytest.raises(ConfigError, match="packing must be one of auto, on, off"):
        resolve_kernel("yes", cpu, is_qwen3=True)
    with pytest.raises(ConfigError, match="needs a Qwen3"):
        resolve_kernel("on", cpu, is_qwen3=False)


def test_budget_from_memory():
    gib = 2**30
    # 40 GiB free at 26 kB/token: half of it is ~825k tokens, capped at 128k.
    assert budget_from_memory(40 * gib, 26_000) == 131072
    # 2 GiB free at 100 kB/token: 1 GiB / 100 kB = 10737 -> rounded down to a multiple of 1024.
    assert budget_from_memory(2 * gib, 100_000) == 10240
    # Nearly full GPU: never below the floor (OOM backoff takes over from there).
    assert budget_from_memory(10 * 2**20, 100_000) == 4096


def test_runs_padded_only_when_waste_is_small():
    assert runs_padded(np.array([512] * 8))  # uniform: no waste
    assert runs_padded(np.array([300]))  # a single row never pads
    assert runs_padded(np.array([100, 100, 100, 100, 100, 100, 100, 100, 100, 100, 100, 100, 100, 100, 100, 100, 99]))
    assert not runs_padded(np.array([100, 90]))  # 10 of 200 padded: 5.3% waste
    assert not runs_padded(np.array([4096, 12, 7]))
