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
from operators.batching import pick_device, pick_dtype
from operators.errors import ConfigError
from operators.loading import ModelSpec, inspect_model_dir, load_backbone, load_tokenizer, resolve_model_dir
from operators.packing import DeviceRunner
from operators.tokenization import (
    DEFAULT_MAX_LENGTH,
    QWEN_EOD_ID,
    TextEncoder,
    effective_max_length,
    ids_from_arrow,
    ids_to_arrow,
)

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


class Embedder(DeviceRunner):
    """Token ids or texts in, unit vectors out, equal to the official Qwen3-Embedding procedure.

    ``__init__`` loads the model once per actor; ``__call__`` maps a batch (a ``pyarrow.Table`` or a dict of numpy
    arrays) to the same batch plus an ``embedding`` column. A batch with an ``input_ids`` column (from the tokenize
    stage) is used as is; otherwise ``text_column`` is tokenized here. Rows whose ``error`` column is set get a null
    embedding and are left for the writer to quarantine.

    ``tokenizer=False``: the tokenizer is not loaded at start (a model actor fed token ids never uses it); ``encoder``
    loads it on first use, so ``embed(texts)`` still works.

    ``impl``: ``auto`` runs Qwen3 and BERT natively (operators/qwen3.py, bert.py: transformers' arithmetic without
    its import and load cost) and other models through transformers; ``native`` or ``transformers`` insists on one.
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
        tokenizer: bool = True,
        impl: str = "auto",
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
        self.instruction = instruction
        self.max_length = effective_max_length(spec, max_length)
        self._encoder: TextEncoder | None = None
        if tokenizer:
            self.pad_id = self.encoder.pad_id
        else:
            # Pads are never attended to (causal right padding, or masked), so any in-vocabulary id gives the same
            # vectors; Qwen's <|endoftext|> keeps the ids what a loaded tokenizer would pad with.
            self.pad_id = QWEN_EOD_ID if spec.is_qwen3 and spec.vocab_size > QWEN_EOD_ID else 0
        loaded, _ = load_backbone(
            spec, dtype=self.dtype, device=self.device, impl=impl, trust_remote_code=trust_remote_code
        )
        self._init_runner(loaded, packing=packing, compile=compile, batch_tokens=batch_tokens)
        if self.device.type == "cuda":
            self._warm_up(min(512, self.max_length), size_budget=batch_tokens is None)

    @property
    def encoder(self) -> TextEncoder:
        """The text encoder, its tokenizer loaded on first use."""
        if self._encoder is None:
            self._encoder = TextEncoder(
                load_tokenizer(self.spec), self.spec, max_length=self.max_length, instruction=self.instruction
            )
        return self._encoder

    # ------------------------------------------------------------------------------------------------ compute

    def _run_ids(self, rows: list[np.ndarray]) -> np.ndarray:
        return self.embed_ids(rows)

    def _forward(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.spec.is_qwen3:
            pooled = self._last_hidden(batch)  # last-token pooling
        else:
            self.stager.ready(batch["tensors"], batch["event"])
            input_ids, lens = batch["tensors"]
            n, mask = batch["n"], None
            if not batch["uniform"] or self.spec.pooling == "mean":
                mask = (torch.arange(input_ids.shape[1], device=self.device)[None, :] < lens[:, None]).long()
            if self.native:
                hidden = self.model(input_ids, mask)
            else:
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
