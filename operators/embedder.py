"""The embedding operator: a callable class that drops into ``Dataset.map_batches``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from operators import DEFAULT_EMBED_MODEL
from operators.batching import (
    DEFAULT_BATCH_TOKENS,
    BatchStats,
    MicroBatcher,
    Stager,
    budget_from_memory,
    is_oom,
    pick_device,
    pick_dtype,
    runs_padded,
)
from operators.errors import ConfigError
from operators.loading import ModelSpec, inspect_model_dir, load_model, load_tokenizer, resolve_model_dir
from operators.packing import install, make_packed, packed_hidden, resolve_kernel
from operators.tokenization import DEFAULT_MAX_LENGTH, TextEncoder, ids_from_arrow, ids_to_arrow

log = logging.getLogger("rayembed")
MIN_DIM = 32
OUTPUT_DTYPES = {"float32": np.float32, "float16": np.float16}

Batch = pa.Table | dict[str, Any]


def check_dim(dim: int | None, hidden: int) -> int:
    if dim is None:
        return hidden
    if not isinstance(dim, int) or isinstance(dim, bool) or not MIN_DIM <= dim <= hidden:
        raise ConfigError(f"dim must be an integer in {MIN_DIM}..{hidden} (the model's hidden size), got {dim!r}")
    return dim


def check_output_dtype(name: str) -> np.dtype:
    if name not in OUTPUT_DTYPES:
        raise ConfigError(f"unknown output dtype {name!r}; choose float32 or float16")
    return np.dtype(OUTPUT_DTYPES[name])


def vectors_to_arrow(vectors: np.ndarray, valid: np.ndarray | None = None) -> pa.FixedSizeListArray:
    """``fixed_size_list<float>[dim]``: the layout LanceDB, DuckDB and pyarrow read as a vector without conversion."""
    n, dim = vectors.shape
    values = pa.array(vectors.reshape(-1))
    mask = None if valid is None or valid.all() else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=mask)


class Embedder:
    """Token ids or texts in, unit vectors out, equal to the official Qwen3-Embedding procedure.

    ``__init__`` loads the model once per actor; ``__call__`` maps a batch (a ``pyarrow.Table`` or a dict of numpy
    arrays) to the same batch plus an ``embedding`` column. A batch with an ``input_ids`` column (from the tokenize
    stage) is used as is; otherwise ``text_column`` is tokenized here. Rows whose ``error`` column is set get a null
    embedding and are left for the writer to quarantine.
    """

    def __init__(
        self,
        model: str = DEFAULT_EMBED_MODEL,
        *,
        dim: int | None = None,
        instruction: str | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        batch_tokens: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        output_dtype: str = "float32",
        normalize: bool = True,
        text_column: str = "text",
        revision: str | None = None,
        trust_remote_code: bool = False,
        storage_options: dict[str, Any] | None = None,
        spec: ModelSpec | None = None,
        compile: bool | None = None,
        packing: str = "auto",
    ):
        self.out_dtype = check_output_dtype(output_dtype)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        if spec is None:
            path = resolve_model_dir(model, revision=revision, storage_options=storage_options)
            spec = inspect_model_dir(path, source=model)
        self.spec = spec
        self.dim = check_dim(dim, spec.hidden_size)
        self.normalize = normalize
        self.text_column = text_column
        self.encoder = TextEncoder(load_tokenizer(spec), spec, max_length=max_length, instruction=instruction)
        self.model = load_model(spec, dtype=self.dtype, device=self.device, trust_remote_code=trust_remote_code)
        self.kernel = resolve_kernel(packing, self.device, spec.is_qwen3)
        if self.kernel is not None:
            install(self.model)
        self._eager_model = self.model
        # Default: compiled on CUDA. It fuses the norm/RoPE/activation kernels that dominate a small model's GPU time
        # (1.9x on the 0.6B at 512 tokens on an H200). Shapes vary per micro-batch: torch.compile turns dimensions
        # dynamic after the first recompile, so the cost is the warm-up below, not one compile per shape.
        self.compiled = bool(self.device.type == "cuda" if compile is None else compile)
        if self.compiled:
            self.model = torch.compile(self.model)
        self.stats = BatchStats()
        self.stager = Stager(self.device)
        self.batcher = MicroBatcher(
            batch_tokens or DEFAULT_BATCH_TOKENS[self.device.type], self.stats, packed=self.kernel is not None
        )
        self.warmup: dict[str, Any] = {
            "packing": packing,
            "kernel": self.kernel or "padded",
            "compiled": self.compiled,
        }
        if self.device.type == "cuda":
            self._warm_up(size_budget=batch_tokens is None)

    @property
    def model_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    # ------------------------------------------------------------------------------------------------ compute

    def _stage(self, rows: list[np.ndarray]) -> dict[str, Any]:
        """A micro-batch's inputs on the device: packed into one row, or right-padded."""
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
        ids.fill(self.encoder.pad_id)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = r
        lens = self.stager.empty((n,))
        lens.numpy()[:] = lengths
        tensors, event = self.stager.to_device(host, lens)
        padded = n * int(lengths.max())
        return {
            "n": n,
            "tensors": tensors,
            "event": event,
            "padded": padded,
            "uniform": lengths.min() == lengths.max(),
        }

    def _forward(self, batch: dict[str, Any]) -> torch.Tensor:
        self.stager.ready(batch["tensors"], batch["event"])
        n = batch["n"]
        if "max_len" in batch:
            host_ids_pos, cu = batch["tensors"]
            packed = make_packed(cu, batch["max_len"], self.kernel, self._eager_model.config)
            hidden = packed_hidden(self.model, host_ids_pos[0:1], host_ids_pos[1:2], packed)
            pooled = hidden[cu[1:].long() - 1]
        else:
            input_ids, lens = batch["tensors"]
            mask = None
            if self.spec.is_qwen3:
                # Causal attention with right padding: a real token never attends to the pads after it, so the pooled
                # state is exact without a mask, and SDPA keeps its fused causal kernel. No KV cache is built either.
                hidden = self.model(input_ids=input_ids, use_cache=False).last_hidden_state
            else:
                if not batch["uniform"] or self.spec.pooling == "mean":
                    mask = (torch.arange(input_ids.shape[1], device=self.device)[None, :] < lens[:, None]).long()
                hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            if self.spec.pooling == "lasttoken":
                pooled = hidden[torch.arange(n, device=self.device), lens - 1]
            elif self.spec.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        # MRL: slice first, then normalise (design.md).
        pooled = pooled.float()[:, : self.dim]
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled

    def _warm_up(self, size_budget: bool) -> None:
        """Run probe batches before real data: they pay the one-time costs (CUDA context, cuBLAS, ``torch.compile`` of
        the padded and the packed graph), fall back to eager if compilation fails, and measure the activation memory
        per token, from which the token budget is sized to the memory free."""
        probe_len = min(512, self.encoder.max_length)
        uniform = [np.full(probe_len, self.encoder.pad_id, dtype=np.int64) for _ in range(16)]
        mixed = [np.full(1 + (probe_len - 1) * k // 15, self.encoder.pad_id, dtype=np.int64) for k in range(16)]
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
                self.embed_ids(rows)
            except Exception as e:
                if not self.compiled or is_oom(e):
                    raise
                # A missing compiler toolchain or an unsupported op must cost speed, not the job.
                log.warning("torch.compile failed (%s: %s); running eager", type(e).__name__, str(e)[:200])
                self.model, self.compiled = self._eager_model, False
                self.embed_ids(rows)

    @torch.inference_mode()
    def embed_ids(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        """[n, dim] vectors for rows of token ids (each already ending in EOS for Qwen3), in input order."""
        if len(rows) == 0:
            return np.zeros((0, self.dim), dtype=self.out_dtype)
        out = self.batcher.run(list(rows), self._forward, self._stage)
        return out.cpu().numpy().astype(self.out_dtype, copy=False)

    def embed(self, texts: Sequence[Any]) -> np.ndarray:
        """Tokenize and embed; a null or non-string text raises a one-line error naming its row."""
        enc = self.encoder.encode(list(texts))
        enc.raise_first_error()
        self.stats.truncated += int(enc.truncated.sum())
        return self.embed_ids(enc.ids)

    def __call__(self, batch: Batch) -> Batch:
        is_table = isinstance(batch, pa.Table)
        names = batch.column_names if is_table else list(batch.keys())
        if "input_ids" in names:
            rows = ids_from_arrow(batch["input_ids"]) if is_table else [np.asarray(r) for r in batch["input_ids"]]
            errors = _column_values(batch["error"], is_table) if "error" in names else [None] * len(rows)
            valid = np.array([e is None for e in errors], dtype=bool)
        else:
            if self.text_column not in names:
                raise ConfigError(f"batch has neither 'input_ids' nor the text column {self.text_column!r}: {names}")
            texts = _column_values(batch[self.text_column], is_table)
            enc = self.encoder.encode(texts)
            enc.raise_first_error()
            self.stats.truncated += int(enc.truncated.sum())
            rows, valid = enc.ids, np.ones(len(texts), dtype=bool)
        vectors = np.zeros((len(rows), self.dim), dtype=self.out_dtype)
        good = np.flatnonzero(valid)
        if len(good):
            vectors[good] = self.embed_ids([rows[i] for i in good])
        if is_table:
            return batch.append_column("embedding", vectors_to_arrow(vectors, valid))
        out = dict(batch)
        out["embedding"] = vectors
        return out


def _column_values(col, is_table: bool) -> list[Any]:
    return col.to_pylist() if is_table else list(col)


__all__ = ["Embedder", "check_dim", "ids_to_arrow", "vectors_to_arrow"]
