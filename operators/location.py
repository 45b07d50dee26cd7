"""A storage prefix bound to its fsspec options once (operators/storage.py does the work)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from operators.storage import exists, join, list_files, read_bytes, read_json, remove, write_bytes, write_json


@dataclass(frozen=True)
class Location:
    """A storage prefix bound to its fsspec options once, so callers pass one object instead of (url, options).
    Paths given to its methods are relative to the prefix. ``options`` never reach logs or records (repr=False)."""

    url: str
    options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    def join(self, *parts: str) -> str:
        return join(self.url, *parts)

    def child(self, *parts: str) -> Location:
        return Location(self.join(*parts), self.options)

    def read_json(self, rel: str) -> Any | None:
        return read_json(self.join(rel), self.options)

    def write_json(self, rel: str, obj: Any) -> None:
        write_json(self.join(rel), obj, self.options)

    def read_bytes(self, rel: str) -> bytes:
        return read_bytes(self.join(rel), self.options)

    def write_bytes(self, rel: str, data: bytes) -> None:
        write_bytes(self.join(rel), data, self.options)

    def exists(self, rel: str = "") -> bool:
        return exists(self.join(rel) if rel else self.url, self.options)

    def list(self, rel: str = "", pattern: str = "*") -> list[str]:
        return list_files(self.join(rel) if rel else self.url, pattern, self.options)

    def remove(self, rels: Sequence[str]) -> None:
        remove([self.join(r) for r in rels], self.options)
