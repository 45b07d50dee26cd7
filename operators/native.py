"""What the native models (operators/qwen3.py, operators/bert.py) share: uninitialised parameter modules and the
safetensors loader that fills them.

Modules are built with shapes only, on the meta device, and the checkpoint's tensors are assigned to them: no random
init runs (a minute of random numbers at 8B), and no meta-device context is entered (it routes through torch._refs,
which imports torch._dynamo: 1.3 s of a model actor's start).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def empty(*shape: int) -> nn.Parameter:
    # Shapes only, on the meta device: the checkpoint's tensors replace them (load_state_dict(assign=True)). No init
    # runs, which at 8B would be a minute of random numbers, and a meta-device context would import torch._dynamo.
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class Linear(nn.Module):
    """``nn.Linear``'s parameters and arithmetic, created uninitialised."""

    def __init__(self, n_in: int, n_out: int, bias: bool):
        super().__init__()
        self.weight = empty(n_out, n_in)
        self.bias = empty(n_out) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    def __init__(self, rows: int, size: int):
        super().__init__()
        self.weight = empty(rows, size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)




def load_weights(
    model: nn.Module,
    files: dict[str, str],
    rename: Callable[[str], str | None],
    *,
    dtype: torch.dtype,
    load_to: str,
    kind: str,
) -> nn.Module:
    """``model`` with every parameter and persistent buffer taken from the checkpoint (``rename`` maps a checkpoint
    key to the module's name, or None to skip it), cast to ``dtype``; a missing weight is a KeyError naming it."""
    from safetensors import safe_open

    expected = set(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    for file in sorted(set(files.values())):
        with safe_open(file, framework="pt", device=load_to) as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                name = rename(key)
                if name in expected:
                    state[name] = f.get_tensor(key).to(dtype)
    missing = sorted(expected - set(state))
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} {kind} weights, e.g. {missing[:3]}")
    model.load_state_dict(state, strict=True, assign=True)
    return model
