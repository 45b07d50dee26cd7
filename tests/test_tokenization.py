"""Tokenizer facts for Qwen3-Embedding: exact ids, the query template, EOS handling, truncation, Arrow transport."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from operators import DEFAULT_INSTRUCTION
from operators.embedder import Embedder
from operators.loading import ModelSpec, inspect_model_dir, load_tokenizer
from operators.tokenization import TextEncoder, ids_from_arrow, ids_to_arrow, qwen_query
from tests.qwen_fixtures import EOD_ID

CAPITAL = "The capital of China is Beijing."
CAPITAL_IDS = [785, 6722, 315, 5616, 374, 26549, 13, EOD_ID]
IM_END_ID = 151645
QWEN_SPEC = ModelSpec(
    path="unused",
    source="qwen3-test",
    model_type="qwen3",
    family="qwen3",
    pooling="lasttoken",
    hidden_size=128,
    vocab_size=151669,
    max_seq_length=None,
)
MIXED = [
    CAPITAL,
    "",
    " ",
    "北京是中华人民共和国的首都，也是全国的政治文化中心。",
    "def add(a: int, b: int) -> int:\n    return a + b  # simple helper\n",
    'She said it\'s "fine" — the naïve café résumé ✓ 3.14',
    "<|endoftext|> inside a text is the special token",
    "Gravity is a force that attracts two bodies towards each other. " * 40,
    "向量检索根据查询的嵌入找到最相关的段落。" * 30,
]


@functools.lru_cache(maxsize=1)
def eos_tokenizer():
    """The newer Qwen3-Embedding tokenizer.json: its post-processor appends <|endoftext|> (built once, ~15 s)."""
    from tests.qwen_fixtures import build_qwen_tokenizer

    return build_qwen_tokenizer(eos_postprocessor=True)


@pytest.fixture(scope="module")
def encoder(qwen_tokenizer) -> TextEncoder:
    return TextEncoder(qwen_tokenizer, QWEN_SPEC)


def test_capital_sentence_ids(encoder):
    enc = encoder.encode([CAPITAL])
    assert enc.ids[0].tolist() == CAPITAL_IDS
    assert enc.ids[0].dtype == np.int32
    assert enc.errors == [None] and not enc.truncated[0]
    assert encoder.eod_id == EOD_ID == encoder.pad_id


def test_vocabulary_facts(qwen_tokenizer):
    assert qwen_tokenizer.convert_tokens_to_ids("yes") == 9693
    assert qwen_tokenizer.convert_tokens_to_ids("no") == 2152
    assert qwen_tokenizer.convert_tokens_to_ids("<|im_end|>") == IM_END_ID


def test_eos_appended_never_im_end(encoder):
    enc = encoder.encode(MIXED)
    for row in enc.ids:
        assert row[-1] == EOD_ID
        assert IM_END_ID not in row.tolist()


@pytest.mark.parametrize("max_length", [8192, 16])
def test_same_ids_with_or_without_eos_postprocessor(qwen_tokenizer, max_length):
    plain = TextEncoder(qwen_tokenizer, QWEN_SPEC, max_length=max_length).encode(MIXED)
    post = TextEncoder(eos_tokenizer(), QWEN_SPEC, max_length=max_length).encode(MIXED)
    assert [x.tolist() for x in plain.ids] == [x.tolist() for x in post.ids]
    assert plain.truncated.tolist() == post.truncated.tolist()
    # The two tokenizers really differ when special tokens are requested.
    assert eos_tokenizer()(CAPITAL)["input_ids"] == CAPITAL_IDS
    assert qwen_tokenizer(CAPITAL)["input_ids"] == CAPITAL_IDS[:-1]


def test_query_template_exact(qwen_tokenizer):
    task = "Given a web search query, retrieve relevant passages that answer the query"
    assert task == DEFAULT_INSTRUCTION
    expected = f"Instruct: {task}\nQuery:What is the capital of China?"
    assert qwen_query(task, "What is the capital of China?") == expected
    assert expected == "Instruct: " + task + "\nQuery:" + "What is the capital of China?"  # one space, then none
    enc = TextEncoder(qwen_tokenizer, QWEN_SPEC, instruction=task)
    assert enc.format("What is the capital of China?") == expected
    ids = enc.encode(["What is the capital of China?"]).ids[0].tolist()
    assert ids == [*qwen_tokenizer.encode(expected, add_special_tokens=False), EOD_ID]
    # Documents go as-is: no instruction, no template.
    doc = TextEncoder(qwen_tokenizer, QWEN_SPEC)
    assert doc.format(CAPITAL) == CAPITAL
    assert TextEncoder(qwen_tokenizer, QWEN_SPEC, instruction="").format(CAPITAL) == CAPITAL


def test_empty_string_is_eos_only(encoder):
    enc = encoder.encode(["", CAPITAL, ""])
    assert enc.ids[0].tolist() == [EOD_ID] and enc.ids[2].tolist() == [EOD_ID]
    assert enc.errors == [None, None, None]
    assert enc.lengths.tolist() == [1, 8, 1]


def test_invalid_rows_reported_not_encoded(encoder):
    enc = encoder.encode([CAPITAL, None, 7, b"bytes"])
    assert enc.errors[0] is None
    assert enc.errors[1] == "text is null"
    assert enc.errors[2] == "text is a int, not a string"
    assert enc.errors[3] == "text is a bytes, not a string"
    assert enc.ids[0].tolist() == CAPITAL_IDS and all(len(x) == 0 for x in enc.ids[1:])


@pytest.fixture(scope="module")
def embedder(qwen_model_dir) -> Embedder:
    return Embedder(qwen_model_dir, device="cpu", dtype="float32")


def test_one_megabyte_text_truncated_to_max_length(embedder, qwen_tokenizer):
    unit = "The quick brown fox jumps over the lazy dog. 北京是中国的首都。 x = f(y) + 42\n"
    big = unit * (1_000_000 // len(unit.encode()) + 1)
    assert len(big.encode()) >= 1_000_000
    max_length = embedder.encoder.max_length
    assert max_length == 8192
    enc = embedder.encoder.encode([big, CAPITAL])
    assert len(enc.ids[0]) == max_length and enc.ids[0][-1] == EOD_ID
    assert enc.truncated.tolist() == [True, False]
    # The kept content is the prefix of the full tokenization.
    head = qwen_tokenizer.encode(big[:20_000], add_special_tokens=False)
    assert enc.ids[0][:1000].tolist() == head[:1000]

    before = embedder.stats.truncated
    vectors = embedder.embed([big, CAPITAL])
    assert vectors.shape == (2, 128) and np.isfinite(vectors).all()
    assert embedder.stats.truncated - before == 1
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_truncation_keeps_max_length_minus_one_content_tokens(qwen_tokenizer):
    enc = TextEncoder(qwen_tokenizer, QWEN_SPEC, max_length=8).encode([CAPITAL, "a b c", CAPITAL + " More."])
    assert enc.ids[0].tolist() == CAPITAL_IDS  # 7 content tokens + EOS: exactly at the limit, not truncated
    assert enc.ids[2].tolist() == CAPITAL_IDS  # 7 kept, the rest dropped, EOS appended
    assert enc.truncated.tolist() == [False, False, True]
    with pytest.raises(Exception, match="max_length must be at least 2"):
        TextEncoder(qwen_tokenizer, QWEN_SPEC, max_length=1)


# ------------------------------------------------------------------------------------------------ load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _auto_ids(path: str, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)(texts, add_special_tokens=False)["input_ids"]


def _qwen2_layout(src: str, dst) -> str:
    """The fixture's tokenizer laid out as the real Qwen3 checkpoints ship it: ``tokenizer_class`` Qwen2Tokenizer
    (transformers rebuilds the backend from the vocabulary) and the added tokens listed in tokenizer_config.json."""
    os.makedirs(dst, exist_ok=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(src, "tokenizer.json")) as f:
        added = json.load(f)["added_tokens"]
    cfg = {
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "added_tokens_decoder": {
            str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for t in added
        },
    }
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return str(dst)


def test_load_tokenizer_ids_equal_auto_tokenizer(qwen_model_dir, tmp_path):
    """load_tokenizer reads tokenizer.json into the Rust tokenizer alone; its ids equal AutoTokenizer's, for the
    fixture's layout and for the real checkpoints' (Qwen2Tokenizer, whose backend transformers rebuilds)."""
    texts = [*MIXED, "<|im_start|>user\nhi<|im_end|>", "<think>\n\n</think>\n\n", "yes no Yes", "a\r\n\tb  c"]
    for path in (qwen_model_dir, _qwen2_layout(qwen_model_dir, tmp_path / "qwen2")):
        spec = inspect_model_dir(path, require_weights=False)
        tok = load_tokenizer(spec)
        assert type(tok).__module__.startswith("tokenizers")  # not a transformers wrapper
        ours = [x.tolist() for x in TextEncoder(tok, spec).encode(texts).ids]
        assert ours == [[*ids, EOD_ID] for ids in _auto_ids(path, texts)], path


def test_load_tokenizer_without_tokenizer_json_uses_auto_tokenizer(minilm_dir, tmp_path):
    """A directory with only the slow files (vocab.txt) still loads: AutoTokenizer converts it."""
    d = tmp_path / "minilm-slow"
    shutil.copytree(minilm_dir, d)
    os.unlink(d / "tokenizer.json")
    spec = inspect_model_dir(str(d))
    fast, slow = (
        TextEncoder(load_tokenizer(inspect_model_dir(minilm_dir)), spec),
        TextEncoder(load_tokenizer(spec), spec),
    )
    assert [x.tolist() for x in slow.encode(MIXED).ids] == [x.tolist() for x in fast.encode(MIXED).ids]
    assert slow.max_length == fast.max_length == 256 and slow.pad_id == fast.pad_id == 0


def test_tokenize_path_imports_neither_torch_nor_transformers(qwen_model_dir):
    """What a CPU tokenize stage runs: loading the tokenizer and encoding texts and pairs."""
    code = (
        "import sys\n"
        "from operators.loading import inspect_model_dir, load_tokenizer\n"
        "from operators.tokenization import PairEncoder, TextEncoder\n"
        f"spec = inspect_model_dir({qwen_model_dir!r}, require_weights=False)\n"
        "assert TextEncoder(load_tokenizer(spec), spec).encode(['The capital']).ids[0].tolist()[0] == 785\n"
        "assert len(PairEncoder(load_tokenizer(spec)).encode(['q'], ['d']).ids[0]) > 48\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------- Arrow transport


def _rows(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = [rng.integers(0, 151669, size=int(n), dtype=np.int32) for n in rng.integers(1, 50, size=20)]
    rows[3] = np.zeros(0, dtype=np.int32)  # an errored row travels as an empty list
    rows[7] = np.asarray(CAPITAL_IDS, dtype=np.int32)
    return rows


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == np.int32
        assert x.tolist() == y.tolist()


def test_arrow_round_trip():
    rows = _rows()
    arr = ids_to_arrow(rows)
    assert arr.type == pa.list_(pa.int32())
    assert len(arr) == len(rows) and arr.null_count == 0
    assert arr.to_pylist() == [r.tolist() for r in rows]
    _same(ids_from_arrow(arr), rows)


def test_arrow_round_trip_sliced_and_chunked():
    rows = _rows(1)
    arr = ids_to_arrow(rows)
    sliced = arr.slice(5, 9)  # offsets no longer start at 0
    assert sliced.offsets[0].as_py() != 0
    _same(ids_from_arrow(sliced), rows[5:14])
    chunked = pa.chunked_array([arr.slice(0, 4), arr.slice(4, 10), arr.slice(14)])
    _same(ids_from_arrow(chunked), rows)
    one_chunk = pa.chunked_array([arr.slice(2, 6)])
    _same(ids_from_arrow(one_chunk), rows[2:8])
    # Through a table column and a large_list cast, as Ray Data may hand it over.
    table = pa.table({"input_ids": arr})
    _same(ids_from_arrow(table.slice(3, 5).column("input_ids")), rows[3:8])
    _same(ids_from_arrow(arr.cast(pa.large_list(pa.int32()))), rows)


def test_arrow_empty():
    arr = ids_to_arrow([])
    assert len(arr) == 0 and arr.type == pa.list_(pa.int32())
    assert ids_from_arrow(arr) == []
