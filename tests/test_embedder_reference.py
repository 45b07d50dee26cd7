"""The embedding operator against a transcription of the official Qwen3-Embedding transformers snippet.

The reference below is copied from the Qwen3-Embedding announcement ("正确调用方式如下"): ``tokenize`` truncates to
``max_length - 2`` and appends <|endoftext|>, ``tokenizer.pad`` pads on the LEFT, ``last_token_pool`` takes the last
position, ``F.normalize`` L2-normalises. It runs on the random-weight ``qwen_model_dir`` (real Qwen vocabulary) and
must agree with ``operators.embedder.Embedder`` to 1e-4 on every row.
"""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from operators import DEFAULT_INSTRUCTION
from operators.embedder import Embedder
from operators.tokenization import TextEncoder
from tests.qwen_fixtures import EOD_ID
from tests.test_tokenization import eos_tokenizer

ATOL = 1e-4
REF_CHUNK = 8  # the snippet pads its whole list; we run it per chunk of 8 length-sorted texts, still left padded

# ------------------------------------------------------------------------------------ official snippet, verbatim


def last_token_pool(last_hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
    left_padding = attention_mask[:, -1].sum() == attention_mask.shape[0]
    if left_padding:
        return last_hidden_states[:, -1]
    else:
        sequence_lengths = attention_mask.sum(dim=1) - 1
        batch_size = last_hidden_states.shape[0]
        return last_hidden_states[torch.arange(batch_size, device=last_hidden_states.device), sequence_lengths]


def get_detailed_instruct(task_description: str, query: str) -> str:
    return f"Instruct: {task_description}\nQuery:{query}"


def tokenize(tokenizer, input_texts, eod_id, max_length):
    batch_dict = tokenizer(input_texts, padding=False, truncation=True, max_length=max_length - 2)
    for seq, att in zip(batch_dict["input_ids"], batch_dict["attention_mask"]):  # noqa: B905 (verbatim)
        seq.append(eod_id)
        att.append(1)
    batch_dict = tokenizer.pad(batch_dict, padding=True, return_tensors="pt")
    return batch_dict


# ------------------------------------------------------------------------------------------------- reference


class OfficialQwen3Embedding:
    """The snippet's model/tokenizer set-up, pointed at a local directory instead of the hub."""

    def __init__(self, path: str):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        self.eod_id = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")

    @torch.inference_mode()
    def pooled_batch(self, batch_dict) -> Tensor:
        assert batch_dict["attention_mask"][:, -1].all(), "reference batches must be left padded"
        outputs = self.model(**batch_dict)
        return last_token_pool(outputs.last_hidden_state, batch_dict["attention_mask"]).float()

    def pooled(self, input_texts: list[str], max_length: int = 8192) -> Tensor:
        """Un-normalised last-token states in input order; chunks of REF_CHUNK texts sorted by length."""
        lengths = [len(x) for x in self.tokenizer(input_texts, add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(input_texts)), key=lambda i: -lengths[i])
        out: list[Tensor | None] = [None] * len(input_texts)
        for start in range(0, len(order), REF_CHUNK):
            idx = order[start : start + REF_CHUNK]
            batch_dict = tokenize(self.tokenizer, [input_texts[i] for i in idx], self.eod_id, max_length)
            pooled = self.pooled_batch(batch_dict)
            for j, i in enumerate(idx):
                out[i] = pooled[j]
        return torch.stack(out)  # type: ignore[arg-type]

    def embed(self, input_texts: list[str], dim: int | None = None) -> np.ndarray:
        pooled = self.pooled(input_texts)
        if dim is not None:
            pooled = pooled[:, :dim]
        return F.normalize(pooled, p=2, dim=1).numpy()


# --------------------------------------------------------------------------------------------------- corpus

EN = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other.",
    "It gives weight to physical objects and is responsible for the movement of planets around the sun.",
    "The committee reviewed the quarterly budget report and approved the new data center.",
    "Vector search retrieves passages whose embeddings lie close to the query embedding.",
    'She said it\'s "fine" — but the résumé of the naïve café owner was 3.14 pages long.',
]
ZH = [
    "北京是中华人民共和国的首都，也是全国的政治文化中心。",
    "今天天气不错，我们去公园散步吧。",
    "向量检索根据查询的嵌入找到最相关的段落。",
    "长江是中国最长的河流，全长约六千三百公里。",
    "机器学习模型需要大量高质量的训练数据。",
]
CODE = [
    "def add(a: int, b: int) -> int:\n    return a + b  # simple helper\n",
    "for i in range(10):\n    print(add(i, i))\n",
    "SELECT id, text FROM docs WHERE lang = 'zh' ORDER BY id LIMIT 100;\n",
    'fn main() {\n    let v: Vec<u32> = (0..8).map(|x| x * x).collect();\n    println!("{:?}", v);\n}\n',
    "const f = async (url) => { const r = await fetch(url); return r.json(); };\n",
]
WORDS = ["a", "the", "Beijing", "北", "京", "首都", "x", "=", "42", "café", "{", "}", "\n", "query", "数据", "λ"]


def _piece(rng: random.Random, kind: str, small: bool) -> str:
    if small:
        return rng.choice(WORDS)
    if kind == "mix":
        kind = rng.choice(["en", "zh", "code"])
    s = rng.choice({"en": EN, "zh": ZH, "code": CODE}[kind])
    if rng.random() < 0.3:
        s = f"{s} {rng.randint(0, 10**6)}"
    return s


def make_texts(tokenizer, n: int, seed: int, max_tokens: int = 2000) -> list[str]:
    """``n`` English / Chinese / code / mixed texts whose token counts run log-spaced from 1 to ~``max_tokens``,
    shuffled so that the input is not sorted by length."""
    rng = random.Random(seed)
    targets = np.unique(np.geomspace(1, max_tokens, n).round().astype(int)).tolist()
    while len(targets) < n:
        targets.append(rng.randint(1, max_tokens))
    texts = []
    for i, target in enumerate(targets):
        kind = ("en", "zh", "code", "mix")[i % 4]
        parts: list[str] = []
        total = 0
        while total < target:
            p = _piece(rng, kind, small=target < 24)
            parts.append(p)
            total += len(tokenizer.encode(p, add_special_tokens=False))
        sep = "" if target < 24 and kind == "zh" else ("\n" if kind == "code" else " ")
        texts.append(sep.join(parts))
    texts.append("")  # the empty document embeds as <|endoftext|> alone
    rng.shuffle(texts)
    return texts


QUERIES = [
    "What is the capital of China?",
    "Explain gravity",
    "北京是哪个国家的首都？",
    "how to add two ints in python",
    "",
    "rust vec map collect example",
    "向量检索 vs keyword search",
    "Why is the sky blue? " * 20,
]

# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def reference(qwen_model_dir) -> OfficialQwen3Embedding:
    return OfficialQwen3Embedding(qwen_model_dir)


@pytest.fixture(scope="module")
def embedder(qwen_model_dir) -> Embedder:
    return Embedder(qwen_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def texts(qwen_tokenizer) -> list[str]:
    return make_texts(qwen_tokenizer, 72, seed=1234)


@pytest.fixture(scope="module")
def ref_pooled(reference, texts) -> Tensor:
    return reference.pooled(texts)


@pytest.fixture(scope="module")
def subset(embedder, texts) -> np.ndarray:
    """Every fourth row by length (longest included): a cheaper corpus for the per-option tests."""
    lengths = embedder.encoder.encode(texts).lengths
    return np.sort(np.argsort(-lengths, kind="stable")[::4])


@pytest.fixture(scope="module")
def query_embedder(qwen_model_dir) -> Embedder:
    return Embedder(qwen_model_dir, instruction=DEFAULT_INSTRUCTION, device="cpu", dtype="float32")


# ------------------------------------------------------------------------------------------------------ tests


def test_corpus_covers_1_to_2000_tokens(embedder, texts):
    lengths = embedder.encoder.encode(texts).lengths
    assert len(texts) >= 64
    assert lengths.min() == 1  # the empty text: EOS alone
    assert sorted(lengths)[1] <= 3  # a one-word text
    assert 1800 <= lengths.max() <= 2300
    assert not np.all(np.diff(lengths) <= 0), "input must not already be sorted by length"
    joined = "".join(texts)
    assert "北京" in joined and "def add" in joined and "Gravity" in joined


def test_token_ids_equal_the_snippet(embedder, reference, texts):
    """Under the length limit our ids equal the snippet's ``tokenize`` (before padding), row by row."""
    ours = embedder.encoder.encode(texts).ids
    theirs = reference.tokenizer(texts, padding=False, truncation=True, max_length=8192 - 2)["input_ids"]
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.tolist() == [*b, EOD_ID], f"row {i}"


def test_documents_match_reference(embedder, texts, ref_pooled):
    expected = F.normalize(ref_pooled, p=2, dim=1).numpy()
    got = embedder.embed(texts)
    assert got.shape == (len(texts), 128) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    diff = np.abs(got - expected).max(axis=1)
    assert diff.max() <= ATOL, f"rows {np.flatnonzero(diff > ATOL).tolist()} differ by up to {diff.max():.2e}"
    # The comparison can fail: distinct texts give clearly distinct vectors.
    assert np.abs(expected[0] - expected[1]).max() > 100 * ATOL


def test_table_call_matches_reference(embedder, texts, ref_pooled, subset):
    expected = F.normalize(ref_pooled[subset], p=2, dim=1).numpy()
    rows = [texts[i] for i in subset]
    out = embedder(pa.table({"id": subset.tolist(), "text": rows}))
    assert out.column_names == ["id", "text", "embedding"]
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), 128)
    got = np.asarray(out.column("embedding").combine_chunks().flatten()).reshape(len(rows), 128)
    assert np.abs(got - expected).max() <= ATOL


def test_ids_only_embedder_loads_no_tokenizer(qwen_model_dir, embedder, texts, ref_pooled, subset):
    """``tokenizer=False`` (the model actor, fed ids by the tokenize stage): no tokenizer at start, the same vectors
    from ids, and ``embed(texts)`` still works for a direct user (the tokenizer is loaded then)."""
    emb = Embedder(qwen_model_dir, device="cpu", dtype="float32", tokenizer=False)
    assert emb._encoder is None and emb.pad_id == embedder.pad_id == EOD_ID
    expected = F.normalize(ref_pooled[subset], p=2, dim=1).numpy()
    rows = [texts[i] for i in subset]
    got = emb.embed_ids(embedder.encoder.encode(rows).ids)
    assert emb._encoder is None
    assert np.abs(got - expected).max() <= ATOL
    assert np.abs(emb.embed(rows) - expected).max() <= ATOL
    assert emb._encoder is not None and emb.encoder.max_length == 8192


@pytest.mark.parametrize("task", [DEFAULT_INSTRUCTION, "Given a code question, retrieve code that answers it"])
def test_instructed_queries_match_reference(qwen_model_dir, reference, query_embedder, task):
    if task == DEFAULT_INSTRUCTION:
        emb = query_embedder
    else:
        emb = Embedder(qwen_model_dir, instruction=task, device="cpu", dtype="float32")
    expected = reference.embed([get_detailed_instruct(task, q) for q in QUERIES])
    got = emb.embed(QUERIES)
    assert np.abs(got - expected).max() <= ATOL
    # The instruction changes the vector: a query embedded as a document is a different vector.
    plain = reference.embed(QUERIES)
    assert np.abs(plain - expected).max(axis=1).min() > 100 * ATOL


def test_announcement_example(reference, embedder, query_embedder):
    """The snippet's own four inputs, padded together as one left-padded batch exactly as it does."""
    task = "Given a web search query, retrieve relevant passages that answer the query"
    queries = [
        get_detailed_instruct(task, "What is the capital of China?"),
        get_detailed_instruct(task, "Explain gravity"),
    ]
    documents = [
        "The capital of China is Beijing.",
        "Gravity is a force that attracts two bodies towards each other. It gives weight to physical objects and is "
        "responsible for the movement of planets around the sun.",
    ]
    batch_dict = tokenize(reference.tokenizer, queries + documents, reference.eod_id, 8192)
    expected = F.normalize(reference.pooled_batch(batch_dict), p=2, dim=1).numpy()
    assert query_embedder.encoder.instruction == task
    got = np.concatenate(
        [query_embedder.embed(["What is the capital of China?", "Explain gravity"]), embedder.embed(documents)]
    )
    assert np.abs(got - expected).max() <= ATOL
    scores = got[:2] @ got[2:].T
    np.testing.assert_allclose(scores, expected[:2] @ expected[2:].T, atol=2 * ATOL)


@pytest.mark.parametrize("dim", [32, 100, 128])
def test_mrl_dims_match_reference(qwen_model_dir, texts, ref_pooled, subset, dim):
    """MRL: slice ``[:dim]`` of the pooled state first, then L2-normalise. 128 is the fixture's full hidden size
    (dim=None, the default, is the full-size case of test_documents_match_reference)."""
    emb = Embedder(qwen_model_dir, dim=dim, device="cpu", dtype="float32")
    full = dim
    ref_pooled = ref_pooled[subset]
    expected = F.normalize(ref_pooled[:, :full], p=2, dim=1).numpy()
    got = emb.embed([texts[i] for i in subset])
    assert got.shape == (len(subset), full)
    assert np.abs(got - expected).max() <= ATOL
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    if full < 128:
        # Slicing the already-normalised full vector would not be unit length: the order of operations matters.
        wrong = F.normalize(ref_pooled, p=2, dim=1)[:, :full].numpy()
        assert np.abs(got - wrong).max() > 100 * ATOL


def test_truncation_matches_eos_postprocessor_tokenizer(qwen_model_dir, qwen_tokenizer, reference, embedder, texts):
    """Truncation follows design.md: content is cut to ``max_length - 1`` tokens, then EOS, so a row holds at most
    ``max_length`` ids. That equals the current HF model card, whose tokenizer post-processor appends EOS and whose
    ``tokenizer(..., truncation=True, max_length=L)`` reserves one slot for it. The announcement snippet cuts the
    content to ``max_length - 2`` (one token fewer, total ``max_length - 1``); inputs under the limit are identical.
    """
    max_length = 64
    eos_tok = eos_tokenizer()
    ours = TextEncoder(qwen_tokenizer, embedder.spec, max_length=max_length).encode(texts)
    theirs = eos_tok(texts, truncation=True, max_length=max_length)["input_ids"]
    assert [x.tolist() for x in ours.ids] == theirs
    long_rows = np.flatnonzero(ours.truncated)
    assert len(long_rows) >= 20 and (ours.lengths[long_rows] == max_length).all()
    assert (ours.lengths[~ours.truncated] < max_length).all()

    # The -2 vs -1 difference, pinned: the snippet keeps one content token fewer on truncated rows only.
    snippet = reference.tokenizer(texts, padding=False, truncation=True, max_length=max_length - 2)["input_ids"]
    for i, row in enumerate(ours.ids):
        if ours.truncated[i]:
            assert snippet[i] + [EOD_ID] == [*row[: max_length - 2].tolist(), EOD_ID]
        else:
            assert snippet[i] + [EOD_ID] == row.tolist()

    # And the vectors of truncated inputs equal the reference forward over the post-processor tokenizer's ids.
    emb = Embedder(qwen_model_dir, max_length=max_length, device="cpu", dtype="float32")
    got = emb.embed(texts)
    assert emb.stats.truncated == len(long_rows)
    emb(pa.table({"text": texts}))  # the table path counts truncated rows too
    assert emb.stats.truncated == 2 * len(long_rows)
    batch_dict = reference.tokenizer.pad({"input_ids": theirs}, padding=True, return_tensors="pt")
    expected = F.normalize(reference.pooled_batch(batch_dict), p=2, dim=1).numpy()
    assert np.abs(got - expected).max() <= ATOL


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, qwen_tokenizer) -> str:
    """Hidden 192, so that MRL 128 is a strict sub-dimension (the shared fixture's hidden size is 128)."""
    from tests.qwen_fixtures import make_qwen3_dir

    return make_qwen3_dir(
        str(tmp_path_factory.mktemp("qwen3-wide")),
        tokenizer=qwen_tokenizer,
        hidden_size=192,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=48,
        intermediate_size=384,
        seed=7,
    )


@pytest.mark.parametrize("dim", [32, 128, 192, None])
def test_mrl_on_wider_model(wide_model_dir, texts, subset, dim):
    """32 and 128 of 192, and the full size (explicit and default): slice first, then normalise."""
    reference = OfficialQwen3Embedding(wide_model_dir)
    sample = [texts[i] for i in subset]
    pooled = reference.pooled(sample)
    expected = F.normalize(pooled[:, : dim or 192], p=2, dim=1).numpy()
    got = Embedder(wide_model_dir, dim=dim, device="cpu", dtype="float32").embed(sample)
    assert got.shape == (len(sample), dim or 192)
    assert np.abs(got - expected).max() <= ATOL
