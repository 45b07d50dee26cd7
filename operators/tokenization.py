"""Text -> token ids with the exact Qwen3 conventions, and Arrow transport of the ids. No torch, no transformers.

Qwen3-Embedding contract (design.md): documents go as-is, a query is ``f"Instruct: {task}\\nQuery:{text}"``; tokenize
with ``add_special_tokens=False``, keep at most ``max_length - 1`` tokens, then append ``<|endoftext|>`` ourselves.
Doing the append here, instead of relying on the tokenizer's post-processor, gives the same ids for every tokenizer
revision: the older ones append nothing and the newer ones append EOS only when special tokens are requested.

Qwen3-Reranker contract: prefix + body + suffix, where only the body is cut to fit ``max_length`` (``PairEncoder``).

Both encoders run the Rust ``tokenizers.Tokenizer`` directly, as transformers' ``tokenizer(texts,
add_special_tokens=False)`` does underneath (no truncation, no padding, special tokens matched in the text), so the
CPU tokenize stages of a job import neither torch nor transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from operators import DEFAULT_INSTRUCTION
from operators.errors import ConfigError, InvalidInputError, ModelLoadError
from operators.loading import QWEN_EOD_TOKEN, ModelSpec, check_qwen3

DEFAULT_MAX_LENGTH = 8192
DEFAULT_RERANK_MAX_LENGTH = 8192
RERANK_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
RERANK_BODY = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"
# The answer tokens in the Qwen vocabulary; a loaded tokenizer's ids are checked against these.
QWEN_YES_ID = 9693
QWEN_NO_ID = 2152
QWEN_EOD_ID = 151643
# Pad ids of tokenizers without Qwen's <|endoftext|>, first found wins; a padded position is masked, so any id works.
_PAD_TOKENS = ("[PAD]", "<pad>", "<|endoftext|>")


def qwen_query(instruction: str, text: str) -> str:
    return f"Instruct: {instruction}\nQuery:{text}"


def format_body(instruction: str, query: str, doc: str) -> str:
    return RERANK_BODY.format(instruction=instruction, query=query, doc=doc)


def text_error(value: Any) -> str | None:
    """Why a value cannot be embedded, or None. The empty string is valid: it embeds as EOS alone."""
    if value is None:
        return "text is null"
    if not isinstance(value, str):
        return f"text is a {type(value).__name__}, not a string"
    return None


def field_error(field: str, value: Any) -> str | None:
    """Why a query or doc value cannot be scored, or None. The empty string is valid."""
    if value is None:
        return f"{field} is null"
    if not isinstance(value, str):
        return f"{field} is a {type(value).__name__}, not a string"
    return None


def backend_of(tokenizer):
    """The Rust ``tokenizers.Tokenizer`` of ``tokenizer`` (a transformers fast tokenizer or the Rust one), set as
    transformers sets it for ``tokenizer(texts)``: no truncation or padding (a tokenizer.json may carry both, e.g.
    MiniLM's 128), special tokens in the text matched as such."""
    tok = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if tok.truncation is not None:
        tok.no_truncation()
    if tok.padding is not None:
        tok.no_padding()
    if tok.encode_special_tokens:
        tok.encode_special_tokens = False
    return tok


def encode_ids(tok, texts: list[str]) -> list[list[int]]:
    """Ids without special tokens. ``encode_batch_fast`` (tokenizers >= 0.21) skips the character offsets."""
    fast = getattr(tok, "encode_batch_fast", None) or tok.encode_batch
    return [e.ids for e in fast(texts, add_special_tokens=False)]


def effective_max_length(spec: ModelSpec, max_length: int) -> int:
    """The longest row, special tokens included: ``max_length``, or a sentence-transformers model's own lower cap."""
    if max_length < 2:
        raise InvalidInputError(f"max_length must be at least 2, got {max_length}")
    return max_length if spec.is_qwen3 else min(max_length, spec.max_seq_length or max_length)


@dataclass
class Encoded:
    ids: list[np.ndarray]  # int32 per row; empty for rows with an error (or skipped)
    truncated: np.ndarray  # bool per row
    errors: list[str | None]

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int32, count=len(self.ids))

    def raise_first_error(self) -> None:
        for i, err in enumerate(self.errors):
            if err is not None:
                raise InvalidInputError(f"row {i}: {err}; expected a string")


EncodedPairs = Encoded  # the reranker's name for the same record: ids are prefix + body + suffix


class TextEncoder:
    """Formats and tokenizes one batch of texts for an embedding model described by ``spec``."""

    def __init__(
        self, tokenizer, spec: ModelSpec, *, max_length: int = DEFAULT_MAX_LENGTH, instruction: str | None = None
    ):
        self.max_length = effective_max_length(spec, max_length)
        self.tokenizer = tokenizer
        self.backend = tok = backend_of(tokenizer)
        self.spec = spec
        self.instruction = instruction or None
        if spec.is_qwen3:
            eod = tok.token_to_id(QWEN_EOD_TOKEN)
            if eod is None:
                raise ModelLoadError(f"model {spec.source!r}: tokenizer has no {QWEN_EOD_TOKEN} token")
            self.eod_id: int | None = int(eod)
            self.n_special = 1
            self.pad_id = self.eod_id
        else:
            self.eod_id = None
            self.n_special = tok.num_special_tokens_to_add(False)
            pad = getattr(tokenizer, "pad_token_id", None)
            if pad is None:
                pad = next((tok.token_to_id(t) for t in _PAD_TOKENS if tok.token_to_id(t) is not None), 0)
            self.pad_id = int(pad)

    def format(self, text: str) -> str:
        if self.instruction is None:
            return text
        if self.spec.is_qwen3:
            return qwen_query(self.instruction, text)
        # sentence-transformers models take the instruction as a literal prompt prefix, as ``encode(prompt=...)`` does.
        return self.instruction + text

    def encode(self, texts: Sequence[Any]) -> Encoded:
        errors = [text_error(t) for t in texts]
        good = [i for i, e in enumerate(errors) if e is None]
        ids: list[np.ndarray] = [np.zeros(0, dtype=np.int32)] * len(texts)
        truncated = np.zeros(len(texts), dtype=bool)
        if not good:
            return Encoded(ids=ids, truncated=truncated, errors=errors)
        formatted = [self.format(texts[i]) for i in good]
        keep = self.max_length - self.n_special
        tok = backend_of(self.tokenizer)  # again: a transformers caller may have turned truncation on since
        if self.eod_id is not None:
            for i, row in zip(good, encode_ids(tok, formatted), strict=True):
                if len(row) > keep:
                    truncated[i] = True
                    del row[keep:]
                row.append(self.eod_id)
                ids[i] = np.asarray(row, dtype=np.int32)
            return Encoded(ids=ids, truncated=truncated, errors=errors)
        # sentence-transformers: the backend's post-processor adds the specials ([CLS] ... [SEP]) after the cut, as
        # tokenizer(..., truncation=True) does.
        for i, enc in zip(good, tok.encode_batch(formatted, add_special_tokens=False), strict=True):
            if len(enc.ids) > keep:
                truncated[i] = True
                enc.truncate(keep)
            ids[i] = np.asarray(tok.post_process(enc, None, True).ids, dtype=np.int32)
        return Encoded(ids=ids, truncated=truncated, errors=errors)


# ------------------------------------------------------------------------------------------------------ reranker


def _token_id(tok, token: str, source: str) -> int:
    tid = tok.token_to_id(token)
    if tid is None or tok.id_to_token(tid) != token:
        raise ModelLoadError(f"model {source!r}: the tokenizer has no {token!r} token; is it a Qwen3-Reranker?")
    return int(tid)


class PairEncoder:
    """(query, doc) pairs -> token ids of prefix + body + suffix, exactly as ``Reranker`` scores them.

    It needs the tokenizer only (no model, no torch), so a job's CPU tokenize stage runs it and the model actor gets
    ids. The body is cut, keeping its first tokens, when the whole row would exceed ``max_length`` (the official
    ``truncation='longest_first'`` on one sequence). ``answer_ids`` are the ``(no, yes)`` ids the score reads.
    """

    def __init__(
        self,
        tokenizer,
        *,
        source: str = "model",
        instruction: str | None = None,
        max_length: int = DEFAULT_RERANK_MAX_LENGTH,
    ):
        self.tokenizer = tokenizer
        self.backend = tok = backend_of(tokenizer)
        self.source = source
        self.instruction = instruction or DEFAULT_INSTRUCTION
        self.answer_ids = (_token_id(tok, "no", source), _token_id(tok, "yes", source))
        self.prefix_ids = np.asarray(encode_ids(tok, [RERANK_PREFIX])[0], dtype=np.int32)
        self.suffix_ids = np.asarray(encode_ids(tok, [RERANK_SUFFIX])[0], dtype=np.int32)
        self.max_length = int(max_length)
        self.body_max = self.max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.body_max < 1:
            raise ConfigError(
                f"max_length {max_length} leaves no room for the pair: the reranker prompt alone is "
                f"{len(self.prefix_ids) + len(self.suffix_ids)} tokens"
            )
        eod = tok.token_to_id(QWEN_EOD_TOKEN)
        self.pad_id = int(eod if eod is not None else 0)

    @classmethod
    def from_model(
        cls,
        model: str | ModelSpec,
        *,
        instruction: str | None = None,
        max_length: int = DEFAULT_RERANK_MAX_LENGTH,
        revision: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> PairEncoder:
        """From a model id, directory, ``s3://`` prefix (configs and tokenizer fetched, no weights) or a ModelSpec."""
        from operators.loading import inspect_model_dir, load_tokenizer, resolve_model_dir

        spec = model
        if not isinstance(spec, ModelSpec):
            path = resolve_model_dir(model, revision=revision, storage_options=storage_options, metadata_only=True)
            spec = inspect_model_dir(path, source=model, require_weights=False)
        check_qwen3(spec)
        return cls(load_tokenizer(spec), source=spec.source, instruction=instruction, max_length=max_length)

    def encode(self, queries: Sequence[Any], docs: Sequence[Any], valid: np.ndarray | None = None) -> Encoded:
        """Token ids (int32) of prefix + body + suffix per pair. Rows with ``valid`` False are skipped, unchecked."""
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
            p, s = len(self.prefix_ids), len(self.suffix_ids)
            for i, body in zip(good, encode_ids(backend_of(self.tokenizer), bodies), strict=True):
                if len(body) > self.body_max:
                    truncated[i] = True
                    del body[self.body_max :]
                row = np.empty(p + len(body) + s, dtype=np.int32)
                row[:p], row[p : p + len(body)], row[p + len(body) :] = self.prefix_ids, body, self.suffix_ids
                ids[i] = row
        return Encoded(ids=ids, truncated=truncated, errors=errors)


# ------------------------------------------------------------------------------------------------- Arrow transport


def ids_to_arrow(ids: Sequence[np.ndarray]) -> pa.ListArray:
    """Pack rows of int32 ids into one ``list<int32>`` array: two buffers instead of n Python lists."""
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(ids).astype(np.int32, copy=False) if len(ids) else np.zeros(0, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32()))


def ids_from_arrow(column: pa.Array | pa.ChunkedArray) -> list[np.ndarray]:
    """Zero-copy views of each row of a ``list<int32>`` column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_large_list(column.type):
        column = column.cast(pa.list_(pa.int32()))
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(column))]
