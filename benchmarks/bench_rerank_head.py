"""Reranker head cost on CPU: the two-row head (hidden_last @ lm_head[[no, yes]].T) against the full-vocabulary head.

Same random-weight Qwen3ForCausalLM (real Qwen vocabulary, untied head), same pairs, same token-budget micro-batches,
one process. Three heads over the same backbone pass:

  two-row      what operators.reranker runs: [B, hidden] @ [hidden, 2]
  full-last    the full lm_head at the last real position only: [B, hidden] @ [hidden, vocab]
  full-all     the full lm_head at every position, as ``model(**inputs).logits[:, -1, :]`` in the official code

Prints tokens/s of each and the ratios. This is a printed benchmark, not a test:

    python benchmarks/bench_rerank_head.py [--hidden 128 --layers 2 --pairs 32 --batch-tokens 2048]

The default model is the tests' small config (hidden 128, 2 layers), where the head dominates the cost; a
larger --hidden/--layers moves the ratio towards a real checkpoint's (and takes longer).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from operators.batching import MicroBatcher  # noqa: E402
from operators.reranker import Reranker  # noqa: E402
from tests.qwen_fixtures import make_qwen3_dir  # noqa: E402

VOCABULARY = "the capital of China is Beijing gravity attracts bodies river mountain data vector search relevance"
WORDS = VOCABULARY.split()


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12))))
        d = " ".join(rng.choice(WORDS, size=int(rng.integers(40, 250))))
        pairs.append((q, d))
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    t0 = time.perf_counter()
    heads = max(1, args.hidden // 32)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_qwen3_dir(
            tmp,
            causal_lm=True,
            tie_word_embeddings=False,
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            head_dim=32,
            intermediate_size=2 * args.hidden,
        )
        r = Reranker(path, device="cpu", dtype="float32", batch_tokens=args.batch_tokens)
        from safetensors import safe_open

        with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
            full_head = f.get_tensor("lm_head.weight").float()  # [vocab, hidden]
    setup_s = time.perf_counter() - t0
    vocab = full_head.shape[0]
    no, yes = r.no_id, r.yes_id

    def two_row(rows):
        return r._forward(rows)

    def pick(logits):  # [B, vocab] -> P(yes)
        return torch.log_softmax(torch.stack([logits[:, no], logits[:, yes]], dim=1), dim=1)[:, 1].exp()

    def full_last(rows):
        return pick(r._last_hidden(rows).float() @ full_head.T)

    def full_all(rows):
        from operators.batching import pad_batch

        ids, lengths = pad_batch(rows, r.pad_id)
        hidden = r.model(input_ids=torch.from_numpy(ids), use_cache=False).last_hidden_state
        logits = hidden.float() @ full_head.T  # [B, L, vocab], as CausalLM.forward computes
        return pick(logits[torch.arange(len(rows)), torch.from_numpy(lengths - 1)])

    enc = r.encode([q for q, _ in make_pairs(args.pairs)], [d for _, d in make_pairs(args.pairs)])
    rows = enc.ids
    tokens = int(sum(len(x) for x in rows))
    plan = MicroBatcher(args.batch_tokens)
    variants = {"two-row": two_row, "full-last": full_last, "full-all": full_all}
    results, scores = {}, {}
    with torch.inference_mode():
        for name, fn in variants.items():
            MicroBatcher(args.batch_tokens).run(rows[:4], fn)  # warm-up
            batcher = MicroBatcher(args.batch_tokens)
            t = time.perf_counter()
            scores[name] = batcher.run(rows, fn).numpy()
            results[name] = time.perf_counter() - t
            plan = batcher
    largest = max(len(x) for x in rows)

    print(
        f"model: hidden {args.hidden}, {args.layers} layers, vocab {vocab}, untied head; torch threads "
        f"{torch.get_num_threads()}; setup {setup_s:.1f}s"
    )
    print(
        f"pairs {len(rows)}, real tokens {tokens}, micro-batches {plan.stats.forwards} at budget {args.batch_tokens} "
        f"(padding efficiency {plan.stats.padding_efficiency:.2f}), longest row {largest}"
    )
    for name, secs in results.items():
        print(f"  {name:9s} {tokens / secs:10.0f} tokens/s  ({secs:.2f}s)")
    base = results["two-row"]
    print(f"ratio two-row / full-last: {results['full-last'] / base:.2f}x")
    print(f"ratio two-row / full-all:  {results['full-all'] / base:.2f}x")
    print(
        f"largest logits tensor: two-row [B, 2]; full-last [B, {vocab}]; full-all [B, L, {vocab}] = "
        f"{args.batch_tokens * vocab * 4 / 2**30:.2f} GiB fp32 at the budget"
    )
    diff = max(float(np.abs(scores[k] - scores["two-row"]).max()) for k in ("full-last", "full-all"))
    print(f"max |score difference| between heads: {diff:.2e}")


if __name__ == "__main__":
    main()
