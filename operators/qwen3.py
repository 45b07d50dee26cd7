"""A native Qwen3 decoder for inference, loaded straight from safetensors.

Why not transformers' ``Qwen3Model``: importing ``transformers.models.qwen3`` costs a model actor 3.5 s on two cores
(it pulls in ``torch._dynamo``, ``torch.distributed.tensor``, sympy and scipy through ``modeling_utils``), and
``from_pretrained`` initialises every weight before overwriting it. This module imports only torch and safetensors,
builds the modules on the meta device and assigns the checkpoint's tensors, so an actor is ready in a few hundred ms
plus the time to read its weights.

The arithmetic is transformers' Qwen3 op for op (design.md, Qwen3 semantics): RMSNorm in float32 then cast back,
per-head RMSNorm of q and k before RoPE, RoPE tables computed in float32 and cast to the activations' dtype, GQA
attention under SDPA (causal, no mask: right padding is never attended to), SwiGLU MLP, final norm.
tests/test_native_models.py holds it to transformers on the same weights, padded and packed, fp32 within 1e-4.

Only what the Qwen3 embedding and reranker checkpoints use is supported (default RoPE, full attention, SiLU);
``unsupported(config)`` names anything else, and ``loading.load_backbone`` then falls back to transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from operators import checkpoint, native


@dataclass(frozen=True)
class Qwen3Config:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool
    tie_word_embeddings: bool

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Qwen3Config:
        heads = int(raw["num_attention_heads"])
        rope = raw.get("rope_parameters") or {}
        return cls(
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or int(raw["hidden_size"]) // heads),
            vocab_size=int(raw["vocab_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            attention_bias=bool(raw.get("attention_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        )


def unsupported(raw: dict[str, Any]) -> str | None:
    """Why the native decoder cannot run this config (transformers then does), or None."""
    if raw.get("model_type") != "qwen3":
        return f"model_type {raw.get('model_type')!r} is not qwen3"
    if raw.get("hidden_act", "silu") != "silu":
        return f"hidden_act {raw.get('hidden_act')!r}"
    for key in ("rope_scaling", "rope_parameters"):
        rope = raw.get(key) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            return f"{key} of type {kind!r}"
    if raw.get("use_sliding_window"):
        return "sliding-window attention"
    if any(t != "full_attention" for t in raw.get("layer_types") or []):
        return "layer types other than full_attention"
    if raw.get("quantization_config"):
        return "a quantized checkpoint"
    return None


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = native.empty(size)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        d, b = c.head_dim, c.attention_bias
        self.head_dim, self.scale = d, d**-0.5
        self.gqa = c.num_attention_heads != c.num_key_value_heads
        self.q_proj = native.Linear(c.hidden_size, c.num_attention_heads * d, bias=b)
        self.k_proj = native.Linear(c.hidden_size, c.num_key_value_heads * d, bias=b)
        self.v_proj = native.Linear(c.hidden_size, c.num_key_value_heads * d, bias=b)
        self.o_proj = native.Linear(c.num_attention_heads * d, c.hidden_size, bias=b)
        self.q_norm = RMSNorm(d, c.rms_norm_eps)
        self.k_norm = RMSNorm(d, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, packed: Any) -> torch.Tensor:
        # [B, T, heads, head_dim] throughout: RoPE is elementwise, so the layout does not change its values.
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, -1, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(b, t, -1, self.head_dim))
        v = self.v_proj(x).view(b, t, -1, self.head_dim)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if packed is not None:  # one packed row: the varlen kernel takes [T, heads, head_dim]
            o = packed.call(q[0], k[0], v[0], packed.cu_seqlens, packed.max_seqlen).unsqueeze(0)
        else:  # right padding under causal attention: no real token sees a pad, so no mask
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                is_causal=t > 1,
                scale=self.scale,
                enable_gqa=self.gqa,
            ).transpose(1, 2)
        return self.o_proj(o.reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.gate_proj = native.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = native.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = native.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, packed: Any) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, packed)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3Decoder(nn.Module):
    """The Qwen3 backbone: token ids in, final normed hidden states [B, T, hidden] out, no KV cache.

    ``forward(input_ids)`` runs right-padded rows; ``forward(ids, position_ids, packed)`` one packed row whose
    positions restart per sequence and whose attention stays within each (``operators.packing.Packed``).
    """

    native = True  # what operators.packing.DeviceRunner checks: called as forward(ids[, positions, packed])

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.embed_tokens = native.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)  # float32, as transformers'

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, packed: Any = None):
        h = self.embed_tokens(input_ids)
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [B, T, head_dim / 2], float32
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, packed)
        return self.norm(h)


def rope_inv_freq(config: Qwen3Config) -> torch.Tensor:
    d = config.head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))


# ----------------------------------------------------------------------------------------------------------- loading


def _backbone_name(key: str) -> str | None:
    """The decoder's parameter name for a checkpoint key: a CausalLM saves ``model.*``, a bare Qwen3Model does not."""
    if key.startswith("lm_head."):
        return None
    return key[len("model.") :] if key.startswith("model.") else key


def load_decoder(
    path: str, *, dtype: torch.dtype, device: torch.device, head_rows: tuple[int, ...] = ()
) -> tuple[Qwen3Decoder, torch.Tensor | None]:
    """The decoder with the checkpoint's weights in ``dtype`` on ``device``, in eval mode, and, when ``head_rows`` is
    given, those rows of ``lm_head`` (of the tied embedding when the head is tied) as [len(head_rows), hidden] in
    ``dtype``: the rest of the head is never read."""
    config = Qwen3Config.from_dict(checkpoint.read_config(path))
    files = checkpoint.checkpoint_files(path)
    head_key = "lm_head.weight" if "lm_head.weight" in files and not config.tie_word_embeddings else None
    load_to = str(device) if device.type == "cuda" else "cpu"
    model = Qwen3Decoder(config)
    native.load_weights(model, files, _backbone_name, dtype=dtype, load_to=load_to, kind="Qwen3")
    model.inv_freq = rope_inv_freq(config)
    model = model.to(device).eval()
    head = None
    if head_rows:
        if head_key is None:
            head = model.embed_tokens.weight.detach()[list(head_rows)]
        else:
            from safetensors import safe_open

            with safe_open(files[head_key], framework="pt", device=load_to) as f:
                sl = f.get_slice(head_key)
                rows = int(sl.get_shape()[0])
                if max(head_rows) >= rows:
                    raise IndexError(f"lm_head has {rows} rows, too few for ids {head_rows}")
                head = torch.cat([sl[r : r + 1] for r in head_rows]).to(dtype).to(device)
    return model, head
