"""Where the embedder's GPU time goes: a kernel profile of one 0.6B forward, and eager vs torch.compile tokens/s.

    python benchmarks/gpu_profile.py            # on the device machine (torch + transformers, no Ray)

Printed, not a test. Uses the same random-weight 0.6B directory and stand-in tokenizer as bench_gpu.py.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_gpu import make_model_dir  # noqa: E402

from operators.embedder import Embedder  # noqa: E402
from tests.qwen_fixtures import QWEN3_ARCHS  # noqa: E402


def rate(emb: Embedder, rows: list[np.ndarray], reps: int = 3) -> float:
    emb.embed_ids(rows[:256])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        emb.embed_ids(rows)
    torch.cuda.synchronize()
    return reps * sum(len(r) for r in rows) / (time.perf_counter() - t0)


def main() -> None:
    path = tempfile.mkdtemp(prefix="prof-")
    make_model_dir(path, QWEN3_ARCHS["0.6B"], causal_lm=False, dtype=torch.bfloat16, device="cuda", seed=0)
    rng = np.random.default_rng(0)
    rows = [np.append(rng.integers(0, 151643, 511), 151643).astype(np.int32) for _ in range(1024)]
    emb = Embedder(path)
    print(f"eager: {rate(emb, rows):,.0f} tok/s at 512 tokens, budget {emb.batcher.budget}", flush=True)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        emb.embed_ids(rows[:128])
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60), flush=True)

    for budget in (16384, 131072):
        e2 = Embedder(path, batch_tokens=budget)
        print(f"eager budget {budget}: {rate(e2, rows):,.0f} tok/s", flush=True)
        del e2
    t0 = time.perf_counter()
    emb.model = torch.compile(emb.model, dynamic=False)
    first = rate(emb, rows[:128], reps=1)
    print(f"compile warm-up {time.perf_counter() - t0:.0f}s ({first:,.0f} tok/s incl. compile)", flush=True)
    print(f"torch.compile: {rate(emb, rows):,.0f} tok/s at 512 tokens", flush=True)


if __name__ == "__main__":
    main()
