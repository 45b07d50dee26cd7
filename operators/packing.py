"""Padding-free packing for Qwen3: many sequences in one row, attention kept within each sequence.

A packed micro-batch is one row of ``sum(lengths)`` tokens with per-sequence position ids (so RoPE sees each text
from 0) and ``cu_seqlens`` boundaries handed to a variable-length attention kernel. The linear layers, most of the
FLOPs, then compute no padding at all. Attention runs through a function registered with transformers'
``AttentionInterface`` that takes the varlen path only when a packed batch is passed and is plain SDPA otherwise, so
the padded path stays bit-for-bit what it was.

Kernels, in order of preference: ``flash_attn.flash_attn_varlen_func`` and ``torch.nn.attention.varlen.varlen_attn``
(both CUDA only). ``loop`` runs causal SDPA once per sequence: exact and available everywhere, slow for many short
texts; it is how the packing logic (positions, boundaries, pooling) is tested on CPU against the padded path.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from operators.errors import ConfigError

log = logging.getLogger("rayembed")
ATTN_NAME = "rayembed_packed"
PACKING_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class Packed:
    """Boundaries of a packed row: sequence i spans tokens ``cu_seqlens[i]:cu_seqlens[i+1]``; ``call`` runs the kernel
    as ``call(q, k, v, cu_seqlens, max_seqlen)``."""

    cu_seqlens: torch.Tensor  # int32 [n+1], on the model's device
    max_seqlen: int
    call: Callable


def make_packed(cu_seqlens: torch.Tensor, max_seqlen: int, kernel: str, config: Any) -> Packed:
    """Built outside the model's forward, so that nothing is looked up while ``torch.compile`` traces it."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    groups = config.num_attention_heads // config.num_key_value_heads
    return Packed(cu_seqlens, max_seqlen, _kernel_call(kernel, groups, head_dim**-0.5, head_dim))


def _flash_attn() -> Callable | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # ImportError, or a wheel built for another torch/CUDA
        return None
    return flash_attn_varlen_func


def _torch_varlen() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    return varlen_attn


def available_kernel(device: torch.device) -> str | None:
    """The fastest importable varlen kernel for ``device``, or None (then the padded path is used)."""
    if device.type != "cuda":
        return None
    if _flash_attn() is not None:
        return "flash_attn"
    if _torch_varlen() is not None:
        return "torch_varlen"
    return None


def resolve_kernel(mode: str, device: torch.device, is_qwen3: bool) -> str | None:
    """``auto``: a varlen kernel if one is importable on this device, else padded. ``on``: packing even without one
    (the exact per-sequence loop). ``off``: padded. Only Qwen3 (causal, RoPE) models are packed."""
    if mode not in PACKING_MODES:
        raise ConfigError(f"packing must be one of {', '.join(PACKING_MODES)}, got {mode!r}")
    if mode == "off" or not is_qwen3:
        if mode == "on" and not is_qwen3:
            raise ConfigError("packing=on needs a Qwen3 (causal, last-token) model; this model is padded only")
        return None
    kernel = available_kernel(device)
    if kernel is None and mode == "on":
        return "loop"
    return kernel


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


@functools.cache
def _kernel_call(kernel: str, groups: int, scale: float, head_dim: int) -> Callable:
    """``fn(q, k, v, cu, max_seqlen)`` for a kernel, with its keyword arguments settled once: inspecting a signature
    inside a ``torch.compile``d forward would be traced on every layer."""
    if kernel == "flash_attn":  # GQA native
        fn = _flash_attn()
        return lambda q, k, v, cu, m: fn(q, k, v, cu, cu, m, m, softmax_scale=scale, causal=True)
    if kernel == "torch_varlen":
        fn = _torch_varlen()
        params = inspect.signature(fn).parameters
        kwargs: dict = {}
        if "scale" in params:
            kwargs["scale"] = scale
        elif abs(scale - head_dim**-0.5) > 1e-12:  # torch 2.10 has no scale argument: only the default works
            raise ConfigError(f"this torch's varlen_attn cannot apply scale {scale}; use packing=off")
        # torch 2.9-2.10 take is_causal; later releases express causality as window_size=(-1, 0).
        if "is_causal" in params:
            kwargs["is_causal"] = True
        else:
            kwargs["window_size"] = (-1, 0)
        gqa = groups > 1 and "enable_gqa" in params
        if gqa:
            kwargs["enable_gqa"] = True
        repeat = groups if groups > 1 and not gqa else 1
        return lambda q, k, v, cu, m: fn(q, _repeat_kv(k, repeat), _repeat_kv(v, repeat), cu, cu, m, m, **kwargs)
    if kernel == "loop":
        return functools.partial(_loop, scale=scale, gqa=groups > 1)
    raise ConfigError(f"unknown varlen kernel {kernel!r}")


def _loop(q, k, v, cu, m, *, scale: float, gqa: bool) -> torch.Tensor:
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
        out[s:e] = o[0].transpose(0, 1)
    return out


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = kwargs.pop("rayembed_packed", None)
    if packed is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # transformers hands [1, H, T, D] and expects [1, T, H, D] back.
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    return packed.call(q, k, v, packed.cu_seqlens, packed.max_seqlen).unsqueeze(0), None


def install(model: torch.nn.Module) -> None:
    """Route the model's attention through ``_attention`` (SDPA unless a packed batch is passed)."""
    from transformers import AttentionInterface

    # No mask function is registered: transformers then builds no mask for this implementation, and padded batches
    # (right padded, causal) need none, as with SDPA when it skips the mask.
    AttentionInterface.register(ATTN_NAME, _attention)
    model.config._attn_implementation = ATTN_NAME


def packed_hidden(model: torch.nn.Module, input_ids, position_ids, packed: Packed) -> torch.Tensor:
    """Last hidden states [T, H] of a packed row. The mask dict skips mask construction: the kernel needs none."""
    out = model(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask={"full_attention": None},
        use_cache=False,
        rayembed_packed=packed,
    )
    return out.last_hidden_state[0]
