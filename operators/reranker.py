"""The reranking operator: a callable class that scores (query, doc) pairs with Qwen3-Reranker in ``map_batches``.

Qwen3 contract (design.md), equal to the official transformers procedure:

- text = prefix + body + suffix, where body = ``<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {doc}``;
- prefix and suffix are tokenized once; the body is tokenized with ``add_special_tokens=False`` and, when the whole
  sequence would exceed ``max_length``, only the body is cut, to ``max_length - len(prefix) - len(suffix)`` tokens,
  keeping its first tokens (the official ``truncation='longest_first'`` on a single sequence);
- score = softmax over the logits of ``no`` and ``yes`` at the last position, probability of ``yes``.

Only those two logits are computed: the backbone's hidden state at each row's last real token times a cached
``[2, hidden]`` slice of ``lm_head`` (rows ``no``, ``yes``). The full-vocabulary head is never run, and the rest of an
untied ``lm_head`` is dropped after loading.

Rows are right-padded. With causal attention a real token never attends to a later position, so the padding after a
row cannot change its last real token's hidden state: no attention mask is needed, and SDPA keeps its causal fast
path. Positions then start at 0 for every row, as they do for an unpadded sequence.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from operators import DEFAULT_INSTRUCTION
from operators.batching import DEFAULT_BATCH_TOKENS, BatchStats, MicroBatcher, pad_batch, pick_device, pick_dtype
from operators.errors import ConfigError, InvalidInputError, ModelLoadError
from operators.loading import (
    QWEN_EOD_TOKEN,
    ModelSpec,
    inspect_model_dir,
    load_model,
    load_tokenizer,
    resolve_model_dir,
)

log = logging.getLogger("rayembed")

DEFAULT_RERANK_MODEL = "Qwen/Qwen3-Reranker-0.6B"
DEFAULT_RERANK_MAX_LENGTH = 8192
RERANK_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
RERANK_BODY = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"
# The answer tokens in the Qwen vocabulary; the ids are looked up in the tokenizer and checked against these.
QWEN_YES_ID = 9693
QWEN_NO_ID = 2152

Batch = pa.Table | dict[str, Any]


def format_body(instruction: str, query: str, doc: str) -> str:
    return RERANK_BODY.format(instruction=instruction, query=query, doc=doc)


def field_error(field: str, value: Any) -> str | None:
    """Why a query or doc value cannot be scored, or None. The empty string is valid."""
    if value is None:
        return f"{field} is null"
    if not isinstance(value, str):
        return f"{field} is a {type(value).__name__}, not a string"
    return None


@dataclass
class EncodedPairs:
    ids: list[np.ndarray]  # int32 per row: prefix + body + suffix; empty for rows skipped or with an error
    truncated: np.ndarray  # bool per row
    errors: list[str | None]

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int32, count=len(self.ids))

    def raise_first_error(self) -> None:
        for i, err in enumerate(self.errors):
            if err is not None:
                raise InvalidInputError(f"row {i}: {err}; expected a string")


def _token_id(tokenizer, token: str, expected: int, source: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(tid, int) or tid == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(tid) != token:
        raise ModelLoadError(f"model {source!r}: the tokenizer has no {token!r} token; is it a Qwen3-Reranker?")
    if tid != expected:
        log.warning("model %r: token %r has id %d, not the Qwen id %d", source, token, tid, expected)
    return int(tid)


def check_reranker_dir(spec: ModelSpec) -> None:
    """A reranker needs a Qwen3 causal LM whose ``lm_head`` is in the checkpoint (or tied to the embeddings)."""
    if not spec.is_qwen3:
        raise ModelLoadError(
            f"model {spec.source!r} (model_type {spec.model_type!r}) is not a Qwen3 model; the reranker needs a "
            "Qwen3-Reranker checkpoint (Qwen3ForCausalLM), e.g. Qwen/Qwen3-Reranker-0.6B"
        )
    if spec.architectures and not any(a.endswith("ForCausalLM") for a in spec.architectures):
        raise ModelLoadError(
            f"model {spec.source!r} is a {', '.join(spec.architectures)} checkpoint without a language-model head; "
            "the reranker needs Qwen3ForCausalLM weights, e.g. Qwen/Qwen3-Reranker-0.6B"
        )
    with open(os.path.join(spec.path, "config.json")) as f:
        tied = json.load(f).get("tie_word_embeddings", True)
    if not tied and "lm_head.weight" not in _checkpoint_keys(spec.path):
        raise ModelLoadError(
            f"model {spec.source!r} has an untied lm_head but no lm_head.weight in its safetensors; it would be "
            "randomly initialised. Is it an embedding model? The reranker needs a Qwen3-Reranker checkpoint"
        )


def _checkpoint_keys(path: str) -> set[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return set(json.load(f).get("weight_map", {}))
    from safetensors import safe_open

    keys: set[str] = set()
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                keys.update(f.keys())
    return keys


class Reranker:
    """(query, doc) pairs in, relevance scores in [0, 1] out, equal to the official Qwen3-Reranker procedure.

    ``__init__`` loads the model once per actor; ``__call__`` maps a batch (a ``pyarrow.Table`` or a dict of numpy
    arrays) with ``query`` and ``doc`` columns to the same batch plus a float32 ``score`` column. Rows whose ``error``
    column is set get a null score (NaN in a dict batch) and are left for the writer to quarantine; any other null or
    non-string query or doc raises a one-line ``InvalidInputError`` naming its row and field.
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
    ):
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        if spec is None:
            path = resolve_model_dir(model, revision=revision, storage_options=storage_options)
            spec = inspect_model_dir(path, source=model)
        check_reranker_dir(spec)
        self.spec = spec
        self.instruction = instruction or DEFAULT_INSTRUCTION
        self.query_column = query_column
        self.doc_column = doc_column

        self.tokenizer = tok = load_tokenizer(spec)
        self.yes_id = _token_id(tok, "yes", QWEN_YES_ID, spec.source)
        self.no_id = _token_id(tok, "no", QWEN_NO_ID, spec.source)
        self.prefix_ids = np.asarray(tok.encode(RERANK_PREFIX, add_special_tokens=False), dtype=np.int32)
        self.suffix_ids = np.asarray(tok.encode(RERANK_SUFFIX, add_special_tokens=False), dtype=np.int32)
        self.max_length = int(max_length)
        self.body_max = self.max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.body_max < 1:
            raise ConfigError(
                f"max_length {max_length} leaves no room for the pair: the reranker prompt alone is "
                f"{len(self.prefix_ids) + len(self.suffix_ids)} tokens"
            )
        eod = tok.convert_tokens_to_ids(QWEN_EOD_TOKEN)
        self.pad_id = int(eod if isinstance(eod, int) and eod != tok.unk_token_id else tok.pad_token_id or 0)

        lm = load_model(
            spec, dtype=self.dtype, device=self.device, causal_lm=True, trust_remote_code=trust_remote_code
        )
        head = lm.get_output_embeddings()
        if head is None or not hasattr(lm, "model"):
            raise ModelLoadError(f"model {spec.source!r} loaded without a language-model head; the reranker needs one")
        if max(self.yes_id, self.no_id) >= head.weight.shape[0]:
            raise ModelLoadError(
                f"model {spec.source!r}: lm_head has {head.weight.shape[0]} rows, too few for the yes/no token ids"
            )
        # The only two rows of lm_head the score needs: [no, yes], kept in float32 (the logits are computed in fp32).
        self.head = head.weight.detach()[[self.no_id, self.yes_id]].float().contiguous()
        # Keep the backbone alone; an untied lm_head (1.2 GB for the 8B in bf16) is freed with the wrapper.
        self.model = lm.model
        del lm, head

        self.stats = BatchStats()
        self.batcher = MicroBatcher(batch_tokens or DEFAULT_BATCH_TOKENS[self.device.type], self.stats)

    @property
    def model_bytes(self) -> int:
        """Bytes of the weights held: the backbone plus the two-row head."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return params + self.head.numel() * self.head.element_size()

    # ------------------------------------------------------------------------------------------------ tokenize

    def encode(self, queries: Sequence[Any], docs: Sequence[Any], valid: np.ndarray | None = None) -> EncodedPairs:
        """Token ids of prefix + body + suffix per pair. Rows with ``valid`` False are skipped and not checked."""
        if len(queries) != len(docs):
            raise InvalidInputError(f"got {len(queries)} queries but {len(docs)} docs; they must pair up")
        n = len(queries)
        errors: list[str | None] = [None] * n
        for i in range(n):
            if valid is None or valid[i]:
                errors[i] = field_error("query", queries[i]) or field_error("doc", docs[i])
        good = [i for i in range(n) if errors[i] is None and (valid is None or valid[i])]
        ids: list[np.ndarray] = [np.zeros(0, dtype=np.int32)] * n
        truncated = np.zeros(n, dtype=bool)
        if good:
            bodies = [format_body(self.instruction, queries[i], docs[i]) for i in good]
            raw = self.tokenizer(bodies, add_special_tokens=False, return_attention_mask=False)["input_ids"]
            for i, body in zip(good, raw, strict=True):
                if len(body) > self.body_max:
                    truncated[i] = True
                    body = body[: self.body_max]
                ids[i] = np.concatenate([self.prefix_ids, np.asarray(body, dtype=np.int32), self.suffix_ids])
        return EncodedPairs(ids=ids, truncated=truncated, errors=errors)

    # ------------------------------------------------------------------------------------------------ compute

    def _last_hidden(self, rows: list[np.ndarray]) -> torch.Tensor:
        """The backbone's final (normed) hidden state at each row's last real token, [B, hidden]."""
        ids, lengths = pad_batch(rows, self.pad_id)
        input_ids = torch.from_numpy(ids).to(self.device, non_blocking=True)
        last = torch.from_numpy(lengths - 1).to(self.device, non_blocking=True)
        # Right padding + causal attention: no mask needed (module docstring). No KV cache either.
        hidden = self.model(input_ids=input_ids, use_cache=False).last_hidden_state
        return hidden[torch.arange(len(rows), device=self.device), last]

    def _forward(self, rows: list[np.ndarray]) -> torch.Tensor:
        logits = self._last_hidden(rows).float() @ self.head.T  # [B, 2]: no, yes
        return torch.log_softmax(logits, dim=-1)[:, 1].exp()

    @torch.inference_mode()
    def score_ids(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        """[n] float32 scores for rows of token ids (as made by ``encode``), in input order."""
        if len(rows) == 0:
            return np.zeros(0, dtype=np.float32)
        out = self.batcher.run(list(rows), self._forward)
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
    "DEFAULT_RERANK_MODEL",
    "RERANK_BODY",
    "RERANK_PREFIX",
    "RERANK_SUFFIX",
    "EncodedPairs",
    "Reranker",
    "check_reranker_dir",
    "format_body",
]
