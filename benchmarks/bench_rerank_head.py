"""Reranker head cost: the two-row head (hidden_last @ lm_head[[no, yes]].T) against the full-vocabulary head.

Same random-weight Qwen3ForCausalLM (real Qwen vocabulary), same pairs, same token-budget micro-batches, one process.
Three heads over the same backbone pass:

  two-row      what operators.reranker runs: [B, hidden] @ [hidden, 2], in fp32
  full-last    the full lm_head at the last real position only: [B, hidden] @ [hidden, vocab]
  full-all     the full lm_head at every position, as ``model(**inputs).logits[:, -1, :]`` in the official code

The full heads run in the model's dtype, as ``Qwen3ForCausalLM.forward`` does. Prints tokens/s of each and the
ratios. This is a printed benchmark, not a test. On CPU (default: the tests' small config, hidden 128 and 2 layers,
untied head, where the head dominates the cost; about a minute):

    python benchmarks/bench_rerank_head.py [--hidden 128 --layers 2 --pairs 16 --batch-tokens 2048]

On a GPU with a real architecture (random weights; --tokenizer takes a saved tokenizer directory where the PyPI
``dashscope`` package that holds the Qwen vocabulary is not installed):

    python benchmarks/bench_rerank_head.py --device cuda --arch 0.6B --pairs 512 --tokenizer DIR
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

from operators.batching import MicroBatcher, pad_batch  # noqa: E402
from operators.reranker import Reranker  # noqa: E402
from tests.qwen_fixtures import QWEN3_ARCHS, make_qwen3_dir  # noqa: E402

VOCABULARY = "the capital of China is Beijing gravity attracts bodies river mountain data vector search relevance"
WORDS = VOCABULARY.split()


def make_pairs(n: int, min_words: int, max_words: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12))))
        d = " ".join(rng.choice(WORDS, size=int(rng.integers(min_words, max_words))))
        pairs.append((q, d))
    return pairs


def full_head_weight(path: str) -> torch.Tensor:
    """lm_head.weight, or the embeddings of a tied model, read from the saved safetensors."""
    from safetensors import safe_open

    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                keys = set(f.keys())
                for key in ("lm_head.weight", "model.embed_tokens.weight"):
                    if key in keys:
                        return f.get_tensor(key)
    raise SystemExit(f"no lm_head or embedding weight in {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=["small", *QWEN3_ARCHS], default="small")
    ap.add_argument("--hidden", type=int, default=128, help="hidden size of --arch small")
    ap.add_argument("--layers", type=int, default=2, help="layers of --arch small")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per head; the best is reported")
    ap.add_argument("--doc-words", type=int, nargs=2, default=(40, 250), metavar=("MIN", "MAX"))
    ap.add_argument(
        "--batch-tokens", type=int, default=None, help="default: 2048 on CPU, the operators' default on GPU"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--tokenizer", default=None, help="a saved tokenizer directory (default: built from dashscope)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    t0 = time.perf_counter()
    if args.arch == "small":
        heads = max(1, args.hidden // 32)
        overrides = dict(
            tie_word_embeddings=False,
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            head_dim=32,
            intermediate_size=2 * args.hidden,
        )
    else:
        overrides = dict(QWEN3_ARCHS[args.arch])
    tokenizer = None
    if args.tokenizer:
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_qwen3_dir(tmp, causal_lm=True, tokenizer=tokenizer, **overrides)
        batch_tokens = args.batch_tokens or (2048 if args.device == "cpu" else None)
        r = Reranker(path, device=args.device, dtype=args.dtype, batch_tokens=batch_tokens)
        full_head = full_head_weight(path).to(r.device, r.dtype)  # [vocab, hidden]
    setup_s = time.perf_counter() - t0
    budget = r.batcher.budget
    vocab = full_head.shape[0]
    no, yes = r.no_id, r.yes_id

    def pick(logits):  # [B, vocab] -> P(yes)
        two = torch.stack([logits[:, no], logits[:, yes]], dim=1).float()
        return torch.log_softmax(two, dim=1)[:, 1].exp()

    def full_last(rows):
        return pick(r._last_hidden(rows) @ full_head.T)

    def full_all(rows):
        ids, lengths = pad_batch(rows, r.pad_id)
        hidden = r.model(input_ids=torch.from_numpy(ids).to(r.device), use_cache=False).last_hidden_state
        logits = hidden @ full_head.T  # [B, L, vocab], as Qwen3ForCausalLM.forward computes them
        return pick(logits[torch.arange(len(rows), device=r.device), torch.from_numpy(lengths - 1).to(r.device)])

    pairs = make_pairs(args.pairs, *args.doc_words)
    rows = r.encode([q for q, _ in pairs], [d for _, d in pairs]).ids
    tokens = int(sum(len(x) for x in rows))
    variants = {"two-row": r._forward, "full-last": full_last, "full-all": full_all}
    results: dict[str, float] = {}
    scores, batchers = {}, {}
    with torch.inference_mode():
        for fn in variants.values():
            MicroBatcher(budget).run(rows[:4], fn).cpu()  # warm-up
        names = list(variants)
        for rep in range(args.repeats):  # interleaved, order rotated, best of: noise on a shared machine hits all
            for name in names[rep % 3 :] + names[: rep % 3]:
                fn = variants[name]
                batchers[name] = batcher = MicroBatcher(budget)
                t = time.perf_counter()
                scores[name] = batcher.run(rows, fn).float().cpu().numpy()  # .cpu() waits for the device
                results[name] = min(results.get(name, float("inf")), time.perf_counter() - t)
    plan = batchers["two-row"].stats
    size = "x".join(str(overrides[k]) for k in ("hidden_size", "num_hidden_layers"))
    device = (
        torch.cuda.get_device_name(r.device) if r.device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    )
    print(f"model: {args.arch} (hidden x layers {size}), vocab {vocab}, {r.dtype}; {device}; setup {setup_s:.1f}s")
    print(
        f"pairs {len(rows)}, real tokens {tokens}, micro-batches {plan.forwards} at budget {budget} "
        f"(padding efficiency {plan.padding_efficiency:.2f}), longest row {max(len(x) for x in rows)}"
    )
    for name, secs in results.items():
        retries = f", {batchers[name].stats.oom_retries} OOM retries" if batchers[name].stats.oom_retries else ""
        print(f"  {name:9s} {tokens / secs:12.0f} tokens/s  (best of {args.repeats}: {secs:.2f}s{retries})")
    base = results["two-row"]
    print(f"ratio two-row / full-last: {results['full-last'] / base:.2f}x")
    print(f"ratio two-row / full-all:  {results['full-all'] / base:.2f}x")
    print(
        f"largest logits tensor: two-row [B, 2]; full-last [B, {vocab}]; full-all [B, L, {vocab}] = "
        f"{budget * vocab * full_head.element_size() / 2**30:.2f} GiB at the budget"
    )
    diff = max(float(np.abs(scores[k] - scores["two-row"]).max()) for k in ("full-last", "full-all"))
    print(f"max |score difference| between heads: {diff:.2e}")


if __name__ == "__main__":
    main()
