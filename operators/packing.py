"""Padding-free packing for Qwen3: many sequences in one row, attention kept within each sequence.

A packed micro-batch is one row of ``sum(lengths)`` tokens with per-sequence position ids (so RoPE sees each text
from 0) and ``cu_seqlens`` boundaries handed to a variable-length attention kernel. The linear layers, most of the
FLOPs, then compute no padding at all. Attention runs through a function registered with transformers'
``AttentionInterface`` that takes the varlen path only when a packed batch is passed and is plain SDPA otherwise, so
the padded path stays bit-for-bit what it was.

Kernels, in order of preference: ``flash_attn.flash_attn_varlen_func`` and ``torch.nn.attention.varlen.varlen_attn``
(both CUDA only). ``loop`` runs causal SDPA once per sequence: exact and available everywhere, slow for many short
texts; it is how the packing logic (positions, boundaries, pooling) is tested on CPU against the padded path.

``DeviceRunner`` is what the embedder and the reranker share on top: staging a micro-batch packed or padded, the
last real token's hidden state, ``torch.compile`` and the CUDA warm-up.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from operators.batching import (
    DEFAULT_BATCH_TOKENS,
    BatchStats,
    MicroBatcher,
    Stager,
    budget_from_memory,
    is_oom,
    runs_padded,
)
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


# ------------------------------------------------------------------------------------------------------ runner


class DeviceRunner:
    """What the embedder and the reranker share: a Qwen3 or BERT-like backbone on a device, fed length-sorted token
    micro-batches (``MicroBatcher``) that are staged padding-free packed (operators/packing.py) or right-padded,
    optionally ``torch.compile``d, and warmed up on CUDA, where the warm-up also sizes the token budget.

    A subclass sets ``device``, ``spec`` and ``pad_id``, calls ``_init_runner`` with its loaded backbone and provides
    ``_run_ids(rows)`` (its public ids-in, results-out call) for the warm-up probes.
    """

    device: torch.device
    spec: Any  # operators.loading.ModelSpec
    pad_id: int

    def _init_runner(self, model: torch.nn.Module, *, packing: str, compile: bool | None, batch_tokens: int | None):
        self.kernel = resolve_kernel(packing, self.device, self.spec.is_qwen3)
        # A native model (operators/qwen3.py, bert.py) takes a packed row itself; a transformers model gets the hook.
        self.native = bool(getattr(model, "native", False))
        if self.kernel is not None and not self.native:
            install(model)
        self.model = self._eager_model = model
        # Default: compiled on CUDA. It fuses the norm/RoPE/activation kernels that dominate a small model's GPU time
        # (1.9x on the 0.6B at 512 tokens on an H200). Shapes vary per micro-batch: torch.compile turns dimensions
        # dynamic after the first recompile, so the cost is the warm-up, not one compile per shape.
        self.compiled = bool(self.device.type == "cuda" if compile is None else compile)
        if self.compiled:
            self.model = torch.compile(model)
        self.stats = BatchStats()
        self.stager = Stager(self.device)
        budget = batch_tokens or DEFAULT_BATCH_TOKENS[self.device.type]
        self.batcher = MicroBatcher(budget, self.stats, packed=self.kernel is not None)
        self.warmup: dict[str, Any] = {"packing": packing, "kernel": self.kernel or "padded"}
        self.warmup["compiled"] = self.compiled

    @property
    def model_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def _run_ids(self, rows: list[np.ndarray]) -> Any:
        raise NotImplementedError

    def _stage(self, rows: list[np.ndarray]) -> dict[str, Any]:
        """A micro-batch's inputs on the device: packed into one row ``[ids; positions]`` with ``cu_seqlens``, or
        right-padded ``[n, longest]`` with the lengths. ``tensors[0]`` holds the ids either way."""
        n = len(rows)
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=n)
        if self.kernel is not None and not runs_padded(lengths):
            total = int(lengths.sum())
            host = self.stager.empty((2, total))
            ids, pos = host[0].numpy(), host[1].numpy()
            np.concatenate(rows, out=ids, casting="unsafe")
            ends = np.cumsum(lengths)
            pos[:] = np.arange(total) - np.repeat(ends - lengths, lengths)
            cu = self.stager.empty((n + 1,), torch.int32)
            cu[0] = 0
            cu[1:] = torch.from_numpy(ends)
            tensors, event = self.stager.to_device(host, cu)
            return {"n": n, "tensors": tensors, "event": event, "padded": total, "max_len": int(lengths.max())}
        host = self.stager.empty((n, int(lengths.max())))
        ids = host.numpy()
        ids.fill(self.pad_id)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = r
        lens = self.stager.empty((n,))
        lens.numpy()[:] = lengths
        tensors, event = self.stager.to_device(host, lens)
        return {
            "n": n,
            "tensors": tensors,
            "event": event,
            "padded": n * int(lengths.max()),
            "uniform": lengths.min() == lengths.max(),
        }

    def _last_hidden(self, batch: dict[str, Any]) -> torch.Tensor:
        """Qwen3: the final (normed) hidden state at each row's last real token, [n, hidden], in the batch's order.

        Packed: one row, positions restarting per sequence, attention kept within each (``cu_seqlens``). Padded: right
        padding under causal attention, where a real token never attends to the pads after it, so no mask is needed,
        SDPA keeps its fused causal kernel and positions start at 0 for every row. No KV cache either way."""
        self.stager.ready(batch["tensors"], batch["event"])
        if "max_len" in batch:
            ids_pos, cu = batch["tensors"]
            packed = make_packed(cu, batch["max_len"], self.kernel, self._eager_model.config)
            if self.native:
                hidden = self.model(ids_pos[0:1], ids_pos[1:2], packed)[0]
            else:
                hidden = packed_hidden(self.model, ids_pos[0:1], ids_pos[1:2], packed)
            return hidden[cu[1:].long() - 1]
        input_ids, lens = batch["tensors"]
        if self.native:
            hidden = self.model(input_ids)
        else:
            hidden = self.model(input_ids=input_ids, use_cache=False).last_hidden_state
        return hidden[torch.arange(batch["n"], device=self.device), lens - 1]

    def _warm_up(self, probe_len: int, size_budget: bool) -> None:
        """Run probe batches before real data: they pay the one-time costs (CUDA context, cuBLAS, ``torch.compile`` of
        the padded and the packed graph), fall back to eager if compilation fails, and measure the activation memory
        per token, from which the token budget is sized to the memory free."""
        uniform = [np.full(probe_len, self.pad_id, dtype=np.int64) for _ in range(16)]
        mixed = [np.full(1 + (probe_len - 1) * k // 15, self.pad_id, dtype=np.int64) for k in range(16)]
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        saved, self.batcher.budget = self.batcher.budget, len(uniform) * probe_len
        try:
            self._probe(uniform, mixed)
        finally:
            self.batcher.budget = saved
            self.stats.__init__()  # the probes are not part of the job's statistics
        per_token = (torch.cuda.max_memory_allocated(self.device) - base) / (len(uniform) * probe_len)
        free, _total = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        self.warmup.update(bytes_per_token=round(per_token), free_bytes=free, compiled=self.compiled)
        if size_budget:
            self.batcher.budget = budget_from_memory(free, per_token)
        self.warmup["budget"] = self.batcher.budget
        log.info(
            "warm-up: %.0f activation bytes/token, %.1f GiB free -> %d batch tokens (%s, %s)",
            per_token,
            free / 2**30,
            self.batcher.budget,
            self.warmup["kernel"],
            "compiled" if self.compiled else "eager",
        )

    def _probe(self, *batches: list[np.ndarray]) -> None:
        for rows in batches:
            try:
                self._run_ids(rows)
            except Exception as e:
                if not self.compiled or is_oom(e):
                    raise
                # A missing compiler toolchain or an unsupported op must cost speed, not the job.
                log.warning("torch.compile failed (%s: %s); running eager", type(e).__name__, str(e)[:200])
                self.model, self.compiled = self._eager_model, False
                self._run_ids(rows)
