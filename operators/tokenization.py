"""Text -> token ids with the exact Qwen3-Embedding conventions, and Arrow transport of the ids.

Qwen3 contract (design.md): documents go as-is, a query is ``f"Instruct: {task}\\nQuery:{text}"``; tokenize with
``add_special_tokens=False``, keep at most ``max_length - 1`` tokens, then append ``<|endoftext|>`` ourselves. Doing
the append here, instead of relying on the tokenizer's post-processor, gives the same ids for every tokenizer
revision: the older ones append nothing and the newer ones append EOS only when special tokens are requested.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from operators.errors import InvalidInputError, ModelLoadError
from operators.loading import QWEN_EOD_TOKEN, ModelSpec

DEFAULT_MAX_LENGTH = 8192


def qwen_query(instruction: str, text: str) -> str:
    return f"Instruct: {instruction}\nQuery:{text}"


def text_error(value: Any) -> str | None:
    """Why a value cannot be embedded, or None. The empty string is valid: it embeds as EOS alone."""
    if value is None:
        return "text is null"
    if not isinstance(value, str):
        return f"text is a {type(value).__name__}, not a string"
    return None


@dataclass
class Encoded:
    ids: list[np.ndarray]  # int32 per row; empty for rows with an error
    truncated: np.ndarray  # bool per row
    errors: list[str | None]

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int32, count=len(self.ids))

    def raise_first_error(self) -> None:
        for i, err in enumerate(self.errors):
            if err is not None:
                raise InvalidInputError(f"row {i}: {err}; expected a string")


class TextEncoder:
    """Formats and tokenizes one batch of texts for an embedding model described by ``spec``."""

    def __init__(
        self, tokenizer, spec: ModelSpec, *, max_length: int = DEFAULT_MAX_LENGTH, instruction: str | None = None
    ):
        if max_length < 2:
            raise InvalidInputError(f"max_length must be at least 2, got {max_length}")
        self.tokenizer = tokenizer
        self.spec = spec
        self.instruction = instruction or None
        if spec.is_qwen3:
            eod = tokenizer.convert_tokens_to_ids(QWEN_EOD_TOKEN)
            if eod is None or eod == tokenizer.unk_token_id:
                raise ModelLoadError(f"model {spec.source!r}: tokenizer has no {QWEN_EOD_TOKEN} token")
            self.eod_id: int | None = int(eod)
            self.max_length = max_length
            self.n_special = 1
        else:
            self.eod_id = None
            self.max_length = min(max_length, spec.max_seq_length or max_length)
            self.n_special = tokenizer.num_special_tokens_to_add(pair=False)
        self.pad_id = int(self.eod_id if self.eod_id is not None else (tokenizer.pad_token_id or 0))

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
        if good:
            formatted = [self.format(texts[i]) for i in good]
            batch = self.tokenizer(formatted, add_special_tokens=False, return_attention_mask=False)
            keep = self.max_length - self.n_special
            for k, (i, row) in enumerate(zip(good, batch["input_ids"], strict=True)):
                if len(row) > keep:
                    truncated[i] = True
                    row = row[:keep]
                if self.eod_id is not None:
                    row = [*row, self.eod_id]
                else:
                    # Fast tokenizers in transformers 5 have no build_inputs_with_special_tokens; the backend's
                    # post-processor adds the specials ([CLS] ... [SEP]) as tokenizer(..., truncation=True) does.
                    enc = batch.encodings[k]
                    enc.truncate(keep)
                    row = self.tokenizer.backend_tokenizer.post_process(enc, None, True).ids
                ids[i] = np.asarray(row, dtype=np.int32)
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
