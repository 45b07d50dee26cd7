"""Model loading: s3:// prefixes through moto, one copy per machine under concurrency, and one-line load errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from operators.embedder import Embedder
from operators.errors import ConfigError, InvalidInputError, ModelLoadError
from operators.loading import inspect_model_dir
from operators.modelcache import copy_prefix_to_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEXTS = [
    "The capital of China is Beijing.",
    "北京是中华人民共和国的首都。",
    "def add(a, b):\n    return a + b\n",
    "",
    "Gravity is a force that attracts two bodies towards each other. " * 30,
]


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    return msg


@pytest.fixture(scope="module")
def embedder(qwen_model_dir) -> Embedder:
    return Embedder(qwen_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def s3_model(s3_server, qwen_model_dir) -> str:
    bucket = s3_server.new_bucket("models")
    url = f"s3://{bucket}/qwen3-emb"
    s3_server.upload_dir(qwen_model_dir, url)
    return url


# ------------------------------------------------------------------------------------------------------- s3://


def test_s3_model_gives_same_vectors(s3_server, s3_model, embedder, qwen_model_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("RAYEMBED_CACHE", str(cache))
    emb = Embedder(s3_model, storage_options=s3_server.storage_options, device="cpu", dtype="float32")
    assert emb.spec.source == s3_model and emb.spec.is_qwen3
    assert os.path.dirname(emb.spec.path) == str(cache)
    assert sorted(os.listdir(emb.spec.path)) == sorted(os.listdir(qwen_model_dir))
    np.testing.assert_array_equal(emb.embed(TEXTS), embedder.embed(TEXTS))
    # A second load on the same machine reuses the copy.
    before = os.stat(os.path.join(emb.spec.path, "model.safetensors")).st_mtime_ns
    again = Embedder(s3_model, storage_options=s3_server.storage_options, device="cpu", dtype="float32")
    assert again.spec.path == emb.spec.path
    assert os.stat(os.path.join(again.spec.path, "model.safetensors")).st_mtime_ns == before
    assert [p for p in os.listdir(cache) if not p.startswith(".")] == [os.path.basename(emb.spec.path)]


def test_s3_missing_prefix(s3_server, s3_model, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYEMBED_CACHE", str(tmp_path))
    bucket = s3_model.split("/")[2]
    with pytest.raises(ModelLoadError) as e:
        Embedder(f"s3://{bucket}/no-such-model", storage_options=s3_server.storage_options)
    msg = one_line(e)
    assert "no-such-model" in msg and "empty or does not exist" in msg


# A child that imports only operators.storage (no torch): it signals "ready", waits for "go", copies, and prints
# (path, copied, start, end) as JSON.
_COPY_CHILD = """
import json, os, sys, time
from operators.modelcache import copy_prefix_to_cache
url, cache_root, opts, ready, go = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]
open(ready, "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.005)
start = time.time()
path, copied = copy_prefix_to_cache(url, cache_root, opts)
print(json.dumps([path, copied, start, time.time()]))
"""


def test_concurrent_copies_copy_once(s3_server, s3_model, qwen_model_dir, tmp_path):
    """Two processes on one machine load the same prefix at the same time: one copies, the other waits for it."""
    cache_root = str(tmp_path / "cache")
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs, readies = [], []
    for k in range(2):
        ready = tmp_path / f"ready-{k}"
        readies.append(ready)
        args = [s3_model, cache_root, json.dumps(s3_server.storage_options), str(ready), str(go)]
        procs.append(
            subprocess.Popen([sys.executable, "-c", _COPY_CHILD, *args], stdout=subprocess.PIPE, text=True, env=env)
        )
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in readies) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # release both at once
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1]))
    paths = {r[0] for r in results}
    assert len(paths) == 1
    assert sorted(r[1] for r in results) == [False, True]
    # Both calls were in flight together: each started before the other returned.
    (_, _, s0, e0), (_, _, s1, e1) = results
    assert s0 < e1 and s1 < e0
    final = paths.pop()
    assert os.path.dirname(final) == cache_root
    for name in os.listdir(qwen_model_dir):
        assert os.path.getsize(os.path.join(final, name)) == os.path.getsize(os.path.join(qwen_model_dir, name))
    # No temp dir is left behind: only the finished copy and its lock file.
    leftovers = [p for p in os.listdir(cache_root) if p != os.path.basename(final) and not p.endswith(".lock")]
    assert leftovers == []
    # A third call (this process) finds the copy.
    assert copy_prefix_to_cache(s3_model, cache_root, s3_server.storage_options) == (final, False)


# ------------------------------------------------------------------------------------------------- bad input


def test_null_text_names_row(embedder):
    with pytest.raises(InvalidInputError) as e:
        embedder.embed(["fine", "also fine", None])
    assert one_line(e) == "row 2: text is null; expected a string"


def test_non_string_text_names_row(embedder):
    with pytest.raises(InvalidInputError) as e:
        embedder.embed(["fine", 7, "fine"])
    assert one_line(e) == "row 1: text is a int, not a string; expected a string"


@pytest.mark.parametrize("dim", [0, 31, 129, -1, 64.0, True])
def test_bad_dim(qwen_model_dir, dim):
    with pytest.raises(ConfigError) as e:
        Embedder(qwen_model_dir, dim=dim)
    msg = one_line(e)
    assert "dim must be an integer in 32..128" in msg and repr(dim) in msg


def test_dim_bounds_accepted(qwen_model_dir, embedder):
    emb = Embedder(qwen_model_dir, dim=32, spec=embedder.spec)
    assert emb.embed(["x"]).shape == (1, 32)


def test_missing_model_path(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError) as e:
        Embedder(missing)
    msg = one_line(e)
    assert repr(missing) in msg and "does not exist" in msg and "--model" in msg


def test_model_path_is_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError) as e:
        Embedder(str(f))
    assert "is a file" in one_line(e)


@pytest.mark.parametrize("repo_id", ["Qwen/Qwen3-Embedding-0.6B", "no-such-org/no-such-model"])
def test_hub_id_offline_fails_fast(repo_id, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as e:
        Embedder(repo_id)
    assert time.monotonic() - start < 10
    msg = one_line(e)
    assert repr(repo_id) in msg and "HF_HUB_OFFLINE" in msg
    assert "pass a local model directory" in msg and "--model" in msg


def test_no_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError) as e:
        Embedder(str(tmp_path))
    assert "has no config.json" in one_line(e)


def _tiny_bert_dir(path) -> str:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(cfg).save_pretrained(str(path), safe_serialization=True)
    return str(path)


def test_plain_bert_is_neither_qwen3_nor_sentence_transformers(tmp_path):
    path = _tiny_bert_dir(tmp_path / "bert")
    assert not os.path.exists(os.path.join(path, "modules.json"))
    with pytest.raises(ModelLoadError) as e:
        Embedder(path)
    msg = one_line(e)
    assert "neither a Qwen3 model nor a sentence-transformers model" in msg and "'bert'" in msg


def test_gpt2_config_rejected(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError) as e:
        Embedder(str(tmp_path))
    msg = one_line(e)
    assert "'gpt2'" in msg and "neither a Qwen3 model" in msg


def test_unsupported_st_pooling(tmp_path):
    path = _tiny_bert_dir(tmp_path / "st")
    with open(os.path.join(path, "modules.json"), "w") as f:
        json.dump([{"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}], f)
    os.makedirs(os.path.join(path, "1_Pooling"))
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 32, "pooling_mode_max_tokens": True}, f)
    with pytest.raises(ModelLoadError) as e:
        inspect_model_dir(path)
    assert "unsupported sentence-transformers pooling" in one_line(e)


def test_pickle_only_weights(qwen_model_dir, tmp_path):
    import torch

    path = tmp_path / "pickled"
    path.mkdir()
    shutil.copy(os.path.join(qwen_model_dir, "config.json"), path / "config.json")
    torch.save({"w": torch.zeros(2)}, path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as e:
        Embedder(str(path))
    msg = one_line(e)
    assert "only pickle weights (pytorch_model.bin)" in msg and "safetensors only" in msg


def test_no_weights_at_all(qwen_model_dir, tmp_path):
    shutil.copy(os.path.join(qwen_model_dir, "config.json"), tmp_path / "config.json")
    with pytest.raises(ModelLoadError) as e:
        Embedder(str(tmp_path))
    assert "has no weights; rayembed loads safetensors only" in one_line(e)
