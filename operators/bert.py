"""A native BERT encoder for inference (all-MiniLM-L6-v2 and other BERT sentence-transformers), loaded straight from
safetensors, for the same reason as operators/qwen3.py: transformers' BertModel costs a model actor 3-4 s of imports
and initialisation before its first vector, which is most of a small local job's start-up.

The arithmetic is transformers' ``BertModel`` (absolute positions, token type 0, post-LayerNorm layers, exact GELU,
SDPA over a padding mask); the pooler is not loaded (sentence-transformers pools the last hidden states itself).
tests/test_native_models.py holds it to transformers on the real MiniLM weights within 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from operators import checkpoint, native


@dataclass(frozen=True)
class BertConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BertConfig:
        return cls(
            **{k: raw[k] for k in cls.__dataclass_fields__ if k != "layer_norm_eps"},
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
        )


def unsupported(raw: dict[str, Any]) -> str | None:
    """Why the native encoder cannot run this config (transformers then does), or None."""
    if raw.get("model_type") != "bert":
        return f"model_type {raw.get('model_type')!r} is not bert or qwen3"
    if raw.get("hidden_act", "gelu") != "gelu":
        return f"hidden_act {raw.get('hidden_act')!r}"
    if raw.get("position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type {raw.get('position_embedding_type')!r}"
    if raw.get("is_decoder") or raw.get("add_cross_attention"):
        return "a decoder configuration"
    if raw.get("quantization_config"):
        return "a quantized checkpoint"
    return None


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight, self.bias, self.eps = native.empty(size), native.empty(size), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class _Embeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = native.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = native.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = native.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = LayerNorm(c.hidden_size, c.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        # transformers' order: words + token types (all 0), then + positions.
        h = self.word_embeddings(ids) + self.token_type_embeddings.weight[0]
        h = h + self.position_embeddings.weight[:t]
        return self.LayerNorm(h)


class _SelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.heads, self.head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        self.query = native.Linear(c.hidden_size, c.hidden_size, bias=True)
        self.key = native.Linear(c.hidden_size, c.hidden_size, bias=True)
        self.value = native.Linear(c.hidden_size, c.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (
            p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2) for p in (self.query, self.key, self.value)
        )
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)
        return o.transpose(1, 2).reshape(b, t, -1)


class _Output(nn.Module):
    """A dense projection, then LayerNorm over it plus the residual (BERT's post-norm)."""

    def __init__(self, n_in: int, c: BertConfig):
        super().__init__()
        self.dense = native.Linear(n_in, c.hidden_size, bias=True)
        self.LayerNorm = LayerNorm(c.hidden_size, c.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.add_module("self", _SelfAttention(c))  # the checkpoint's name: encoder.layer.N.attention.self.*
        self.output = _Output(c.hidden_size, c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self._modules["self"](x, mask), x)


class _Intermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = native.Linear(c.hidden_size, c.intermediate_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _Output(c.intermediate_size, c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.attention(x, mask)
        return self.output(self.intermediate(h), h)


class _Encoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


class BertEncoder(nn.Module):
    """Token ids [B, T] (right padded) and an optional 0/1 attention mask in, last hidden states [B, T, H] out."""

    native = True  # what operators.packing.DeviceRunner and the embedder check

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embeddings(input_ids)
        # A padded key is never attended to; every query row keeps at least its own real tokens.
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for layer in self.encoder.layer:
            h = layer(h, mask)
        return h


def _encoder_name(key: str) -> str | None:
    """A BertModel saves ``embeddings.*`` / ``encoder.*``; a task model prefixes them with ``bert.``."""
    key = key[len("bert.") :] if key.startswith("bert.") else key
    return key if key.startswith(("embeddings.", "encoder.")) else None


def load_encoder(path: str, *, dtype: torch.dtype, device: torch.device) -> BertEncoder:
    config = BertConfig.from_dict(checkpoint.read_config(path))
    model = BertEncoder(config)
    load_to = str(device) if device.type == "cuda" else "cpu"
    files = checkpoint.checkpoint_files(path)
    native.load_weights(model, files, _encoder_name, dtype=dtype, load_to=load_to, kind="BERT")
    return model.to(device).eval()
