"""A model directory's files without torch: its config.json and where each safetensors tensor lives."""

from __future__ import annotations

import json
import os


def read_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def checkpoint_files(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file, from the index of a sharded checkpoint or the files' headers (read without
    torch: the driver checks a reranker directory before any actor loads it)."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    where: dict[str, str] = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="numpy") as f:
                where.update(dict.fromkeys(f.keys(), os.path.join(path, name)))
    if not where:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    return where
