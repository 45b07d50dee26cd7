"""The native models against transformers on the same weights: the Qwen3 decoder (operators/qwen3.py) on random
Qwen3 checkpoints whose every weight, the norms' included, is perturbed before saving (a weight loaded into the wrong
place, a norm skipped or a RoPE table off shows as a difference), and the BERT encoder (operators/bert.py) on the real
all-MiniLM-L6-v2 weights. fp32 on CPU, max abs diff <= 1e-4 (design.md)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from operators.bert import BertEncoder
from operators.embedder import Embedder
from operators.errors import ConfigError, ModelLoadError
from operators.loading import inspect_model_dir, load_backbone, native_blocker
from operators.packing import make_packed
from operators.qwen3 import Qwen3Decoder, load_decoder
from tests.qwen_fixtures import qwen3_config

ATOL = 1e-4


def _save_perturbed(out_dir: str, *, causal_lm: bool, shard: bool = False, **overrides) -> str:
    from transformers import Qwen3ForCausalLM, Qwen3Model

    torch.manual_seed(7)
    cfg = qwen3_config(causal_lm=causal_lm, vocab_size=512, **overrides)
    model = (Qwen3ForCausalLM if causal_lm else Qwen3Model)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="200KB" if shard else "50GB")
    return out_dir


def _official(path: str, causal_lm: bool):
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if causal_lm else AutoModel
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


def _ids(lengths: list[int], vocab: int = 512) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


LENGTHS = [1, 5, 17, 64, 33, 2]


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory) -> str:
    return _save_perturbed(str(tmp_path_factory.mktemp("q3-bare")), causal_lm=False, attention_bias=True)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("q3-lm"))
    return _save_perturbed(out, causal_lm=True, tie_word_embeddings=False, shard=True)


def _reference_hidden(official, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each sequence alone through transformers: no padding, no packing."""
    with torch.no_grad():
        return [official(input_ids=r[None], use_cache=False).last_hidden_state[0] for r in rows]


@pytest.mark.parametrize("which", ["bare", "lm"])
def test_padded_and_packed_hidden_states_equal_transformers(which, bare_dir, lm_dir):
    path = bare_dir if which == "bare" else lm_dir
    official = _official(path, causal_lm=which == "lm")
    want = _reference_hidden(official.model if which == "lm" else official, rows := _ids(LENGTHS))
    model, _ = load_decoder(path, dtype=torch.float32, device=torch.device("cpu"))
    assert isinstance(model, Qwen3Decoder)
    longest = max(LENGTHS)
    padded = torch.stack([torch.cat([r, torch.zeros(longest - len(r), dtype=r.dtype)]) for r in rows])
    packed_ids = torch.cat(rows)[None]
    positions = torch.cat([torch.arange(len(r)) for r in rows])[None]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(LENGTHS)]), dtype=torch.int32)
    with torch.no_grad():
        got_padded = model(padded)
        got_packed = model(packed_ids, positions, make_packed(cu, longest, "loop", model.config))[0]
    for i, (r, w) in enumerate(zip(rows, want, strict=True)):
        assert (got_padded[i, : len(r)] - w).abs().max().item() <= ATOL
        assert (got_packed[cu[i] : cu[i + 1]] - w).abs().max().item() <= ATOL


def test_head_rows_are_the_checkpoints_lm_head_rows(lm_dir, tmp_path):
    official = _official(lm_dir, causal_lm=True)
    _, head = load_decoder(lm_dir, dtype=torch.float32, device=torch.device("cpu"), head_rows=(9, 4))
    assert torch.equal(head, official.lm_head.weight.detach()[[9, 4]])
    # Tied: the rows come from the embedding matrix (as transformers ties them).
    tied = _save_perturbed(str(tmp_path / "tied"), causal_lm=True, tie_word_embeddings=True)
    official = _official(tied, causal_lm=True)
    _, head = load_decoder(tied, dtype=torch.float32, device=torch.device("cpu"), head_rows=(3, 8))
    assert torch.equal(head, official.get_input_embeddings().weight.detach()[[3, 8]])
    with pytest.raises(ModelLoadError, match="too few"):
        load_backbone(inspect_model_dir(lm_dir), dtype=torch.float32, device=torch.device("cpu"), head_rows=(1, 512))


def test_embedder_native_equals_embedder_on_transformers(qwen_model_dir, qwen_tokenizer):
    from tests.test_embedder_reference import make_texts

    texts = make_texts(qwen_tokenizer, 24, seed=5, max_tokens=300)
    native = Embedder(qwen_model_dir, device="cpu", dtype="float32")
    hf = Embedder(qwen_model_dir, device="cpu", dtype="float32", impl="transformers")
    assert native.native and not hf.native
    assert np.abs(native.embed(texts) - hf.embed(texts)).max() <= ATOL


def _with_config(src: str, dst: str, **changes) -> str:
    os.makedirs(dst)
    for name in os.listdir(src):
        os.symlink(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(changes)
    os.unlink(os.path.join(dst, "config.json"))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


def test_unsupported_config_falls_back_to_transformers_or_fails_clearly(bare_dir, tmp_path):
    scaled = _with_config(bare_dir, str(tmp_path / "scaled"), rope_scaling={"rope_type": "linear", "factor": 2.0})
    spec = inspect_model_dir(scaled)
    assert "linear" in native_blocker(spec, "auto")
    assert native_blocker(inspect_model_dir(bare_dir), "auto") is None
    model, _ = load_backbone(spec, dtype=torch.float32, device=torch.device("cpu"))
    assert not isinstance(model, Qwen3Decoder)
    with pytest.raises(ConfigError, match="native implementation: rope_scaling of type 'linear'"):
        load_backbone(spec, dtype=torch.float32, device=torch.device("cpu"), impl="native")
    with pytest.raises(ConfigError, match="auto, native, transformers"):
        native_blocker(spec, "fast")


def test_missing_weight_is_a_one_line_load_error(bare_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = str(tmp_path / "broken")
    os.makedirs(broken)
    state = load_file(os.path.join(bare_dir, "model.safetensors"))
    del state["layers.1.mlp.up_proj.weight"]
    save_file(state, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(bare_dir, "config.json")) as f, open(os.path.join(broken, "config.json"), "w") as g:
        g.write(f.read())
    with pytest.raises(ModelLoadError, match=r"lacks 1 Qwen3 weights, e.g. \['layers.1.mlp.up_proj.weight'\]"):
        load_backbone(inspect_model_dir(broken), dtype=torch.float32, device=torch.device("cpu"), impl="native")


def test_bert_encoder_equals_transformers_on_minilm(minilm_dir):
    from transformers import AutoModel

    official = AutoModel.from_pretrained(minilm_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    model, _ = load_backbone(inspect_model_dir(minilm_dir), dtype=torch.float32, device=torch.device("cpu"))
    assert isinstance(model, BertEncoder)
    rows = _ids([3, 40, 7, 128, 1], vocab=30522)
    longest = 128
    ids = torch.stack([torch.cat([r, torch.zeros(longest - len(r), dtype=r.dtype)]) for r in rows])
    mask = (torch.arange(longest)[None, :] < torch.tensor([len(r) for r in rows])[:, None]).long()
    with torch.no_grad():
        want = official(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(ids, mask)
        got_unmasked = model(ids[3:4])  # one full-length row: no mask needed
    for i, r in enumerate(rows):
        assert (got[i, : len(r)] - want[i, : len(r)]).abs().max().item() <= ATOL
    assert (got_unmasked[0] - want[3]).abs().max().item() <= ATOL


def test_embedder_on_minilm_native_equals_transformers(minilm_dir):
    from tests.test_minilm import make_texts

    texts = make_texts(20, seed=4)
    native = Embedder(minilm_dir, device="cpu", dtype="float32")
    hf = Embedder(minilm_dir, device="cpu", dtype="float32", impl="transformers")
    assert native.native and not hf.native
    assert np.abs(native.embed(texts) - hf.embed(texts)).max() <= ATOL
