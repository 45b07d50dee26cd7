"""The reranking operator: a callable class that scores (query, doc) pairs with Qwen3-Reranker in ``map_batches``.

Qwen3 contract (design.md), equal to the official transformers procedure:

- text = prefix + body + suffix, where body = ``<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {doc}``;
- prefix and suffix are tokenized once; the body is tokenized with ``add_special_tokens=False`` and, when the whole
  sequence would exceed ``max_length``, only the body is cut, to ``max_length - len(prefix) - len(suffix)`` tokens,
  keeping its first tokens (the official ``truncation='longest_first'`` on a single sequence);
- score = softmax over the logits of ``no`` and ``yes`` at the last position, probability of ``yes``.

Tokenization is ``operators.tokenization.PairEncoder``, which a job's CPU tokenize stage runs on its own; the model
actor then needs no tokenizer (``tokenizer=False``). Only the two answer logits are computed: the backbone's hidden
state at each row's last real token times a cached ``[2, hidden]`` slice of ``lm_head`` (rows ``no``, ``yes``). The
full-vocabulary head is never run, and the rest of an untied ``lm_head`` is dropped after loading.

Rows run as the embedder's do (``operators.packing.DeviceRunner``): length-sorted micro-batches within a token
budget, the input order restored; padding-free packed on CUDA (``packing="auto"``, or the exact per-sequence loop
with ``packing="on"`` anywhere), right-padded otherwise. Under causal attention a real token never attends to a later
position, so the padding after a row cannot change its last real token's hidden state: no mask is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from operators import DEFAULT_RERANK_MODEL
from operators.batching import pick_device, pick_dtype
from operators.errors import ConfigError, InvalidInputError, ModelLoadError
from operators.loading import (
    ModelSpec,
    check_reranker_dir,
    inspect_model_dir,
    load_backbone,
    load_tokenizer,
    resolve_model_dir,
)
from operators.packing import DeviceRunner
from operators.tokenization import (
    DEFAULT_RERANK_MAX_LENGTH,
    QWEN_EOD_ID,
    QWEN_NO_ID,
    QWEN_YES_ID,
    RERANK_BODY,
    RERANK_PREFIX,
    RERANK_SUFFIX,
    EncodedPairs,
    PairEncoder,
    field_error,
    format_body,
)

log = logging.getLogger("rayembed")

Batch = pa.Table | dict[str, Any]


class Reranker(DeviceRunner):
    """(query, doc) pairs in, relevance scores in [0, 1] out, equal to the official Qwen3-Reranker procedure.

    ``__init__`` loads the model once per actor; ``__call__`` maps a batch (a ``pyarrow.Table`` or a dict of numpy
    arrays) with ``query`` and ``doc`` columns to the same batch plus a float32 ``score`` column. Rows whose ``error``
    column is set get a null score (NaN in a dict batch) and are left for the writer to quarantine; any other null or
    non-string query or doc raises a one-line ``InvalidInputError`` naming its row and field.

    ``tokenizer=False``: no tokenizer at start (an actor fed ids from ``PairEncoder`` never uses one); the answer
    ids are then ``answer_ids`` (``(no, yes)``, default the Qwen ids; pass ``PairEncoder.answer_ids``), and
    ``encoder`` loads the tokenizer on first use, checking it agrees, so ``score(pairs)`` still works.

    ``impl``: as for the embedder (``auto``: the native Qwen3 decoder, which also reads just the two head rows).
    """

    def __init__(
        self,
        model: str = DEFAULT_RERANK_MODEL,
        *,
        instruction: str | None = None,
        max_length: int = DEFAULT_RERANK_MAX_LENGTH,
        batch_tokens: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        storage_options: dict[str, Any] | None = None,
        query_column: str = "query",
        doc_column: str = "doc",
        spec: ModelSpec | None = None,
        compile: bool | None = None,
        packing: str = "auto",
        tokenizer: bool = True,
        answer_ids: tuple[int, int] | None = None,
        impl: str = "auto",
    ):
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        if spec is None:
            path = resolve_model_dir(model, revision=revision, storage_options=storage_options)
            spec = inspect_model_dir(path, source=model)
        check_reranker_dir(spec)
        self.spec = spec
        self.instruction = instruction
        self.max_length = int(max_length)
        self.query_column = query_column
        self.doc_column = doc_column
        self._encoder: PairEncoder | None = None
        if tokenizer:
            self.no_id, self.yes_id = self.encoder.answer_ids
            self.pad_id = self.encoder.pad_id
        else:
            self.no_id, self.yes_id = answer_ids or (QWEN_NO_ID, QWEN_YES_ID)
            # Causal right padding: a pad is never attended to; <|endoftext|> is what a loaded tokenizer pads with.
            self.pad_id = QWEN_EOD_ID if spec.vocab_size > QWEN_EOD_ID else 0

        backbone, head = load_backbone(
            spec,
            dtype=self.dtype,
            device=self.device,
            impl=impl,
            head_rows=(self.no_id, self.yes_id),
            trust_remote_code=trust_remote_code,
        )
        # The only two rows of lm_head the score needs: [no, yes], kept in float32 (the logits are computed in fp32).
        self.head = head.float().contiguous()
        self._init_runner(backbone, packing=packing, compile=compile, batch_tokens=batch_tokens)
        if self.device.type == "cuda":
            self._warm_up(min(512, self.max_length), size_budget=batch_tokens is None)

    @property
    def encoder(self) -> PairEncoder:
        """The pair encoder, its tokenizer loaded on first use."""
        if self._encoder is None:
            enc = PairEncoder(
                load_tokenizer(self.spec),
                source=self.spec.source,
                instruction=self.instruction,
                max_length=self.max_length,
            )
            if hasattr(self, "head") and enc.answer_ids != (self.no_id, self.yes_id):
                raise ModelLoadError(
                    f"model {self.spec.source!r}: the tokenizer's (no, yes) ids are {enc.answer_ids}, but the scores "
                    f"read {(self.no_id, self.yes_id)}; pass answer_ids=PairEncoder.answer_ids"
                )
            self._encoder = enc
        return self._encoder

    # The prompt's pieces, as the encoder has them (kept as attributes of the reranker for its users).
    prefix_ids = property(lambda self: self.encoder.prefix_ids)
    suffix_ids = property(lambda self: self.encoder.suffix_ids)
    body_max = property(lambda self: self.encoder.body_max)

    @property
    def model_bytes(self) -> int:
        """Bytes of the weights held: the backbone plus the two-row head."""
        return super().model_bytes + self.head.numel() * self.head.element_size()

    def encode(self, queries: Sequence[Any], docs: Sequence[Any], valid: np.ndarray | None = None) -> EncodedPairs:
        """Token ids of prefix + body + suffix per pair (``PairEncoder.encode``)."""
        return self.encoder.encode(queries, docs, valid)

    # ------------------------------------------------------------------------------------------------ compute

    def _run_ids(self, rows: list[np.ndarray]) -> np.ndarray:
        return self.score_ids(rows)

    def _forward(self, batch: dict[str, Any]) -> torch.Tensor:
        logits = self._last_hidden(batch).float() @ self.head.T  # [B, 2]: no, yes
        return torch.log_softmax(logits, dim=-1)[:, 1].exp()

    @torch.inference_mode()
    def score_ids(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        """[n] float32 scores for rows of token ids (as made by ``encode``), in input order: the rows run in
        length-sorted micro-batches within the token budget, packed on CUDA."""
        if len(rows) == 0:
            return np.zeros(0, dtype=np.float32)
        out = self.batcher.run(list(rows), self._forward, self._stage)
        return out.cpu().numpy().astype(np.float32, copy=False)

    def score(self, pairs_or_queries: Any, docs: Sequence[Any] | None = None) -> np.ndarray:
        """Scores of ``[(query, doc), ...]``, of ``queries, docs`` (equal lengths), or of one query string against
        ``docs``. A null or non-string query or doc raises a one-line error naming its row and field."""
        if docs is None:
            pairs = list(pairs_or_queries)
            for i, p in enumerate(pairs):
                if isinstance(p, (str, bytes, dict)) or not hasattr(p, "__len__") or len(p) != 2:
                    raise InvalidInputError(f"row {i}: expected a (query, doc) pair, got {type(p).__name__}")
            queries = [p[0] for p in pairs]
            docs = [p[1] for p in pairs]
        else:
            docs = list(docs)
            queries = [pairs_or_queries] * len(docs) if isinstance(pairs_or_queries, str) else list(pairs_or_queries)
        enc = self.encode(queries, docs)
        enc.raise_first_error()
        self.stats.truncated += int(enc.truncated.sum())
        return self.score_ids(enc.ids)

    def __call__(self, batch: Batch) -> Batch:
        is_table = isinstance(batch, pa.Table)
        names = batch.column_names if is_table else list(batch.keys())
        missing = [c for c in (self.query_column, self.doc_column) if c not in names]
        if missing:
            raise ConfigError(f"batch has no {' or '.join(repr(c) for c in missing)} column: {names}")
        queries = _column_values(batch[self.query_column], is_table)
        docs = _column_values(batch[self.doc_column], is_table)
        if "error" in names:
            valid = np.array([e is None for e in _column_values(batch["error"], is_table)], dtype=bool)
        else:
            valid = np.ones(len(queries), dtype=bool)
        enc = self.encode(queries, docs, valid)
        enc.raise_first_error()
        self.stats.truncated += int(enc.truncated.sum())
        scores = np.full(len(queries), np.nan, dtype=np.float32)
        good = np.flatnonzero(valid)
        if len(good):
            scores[good] = self.score_ids([enc.ids[i] for i in good])
        if is_table:
            column = pa.array(scores, type=pa.float32(), mask=None if valid.all() else ~valid)
            if "score" in names:
                return batch.set_column(names.index("score"), "score", column)
            return batch.append_column("score", column)
        out = dict(batch)
        out["score"] = scores
        return out


def _column_values(col, is_table: bool) -> list[Any]:
    return col.to_pylist() if is_table else list(col)


__all__ = [
    "DEFAULT_RERANK_MAX_LENGTH",
    "DEFAULT_RERANK_MODEL",
    "PairEncoder",
    "field_error",
    "RERANK_BODY",
    "RERANK_PREFIX",
    "RERANK_SUFFIX",
    "EncodedPairs",
    "Reranker",
    "check_reranker_dir",
    "format_body",
]
