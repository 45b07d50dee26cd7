"""CPU tokens/s of the reranker against the embedder: same backbone size, same corpus, one run.

    python benchmarks/bench_rerank.py                 # 1,500 docs, hidden 256, 4 layers; a few minutes on 2 cores
    python benchmarks/bench_rerank.py --docs 600 --hidden 128 --layers 2 --threads 2

Printed, not a test. Two random-weight Qwen3 models with one backbone configuration and the real Qwen vocabulary
(tests/qwen_fixtures.py): a ``Qwen3Model`` for ``operators.embedder.Embedder`` and a ``Qwen3ForCausalLM`` (untied
head, as the test fixture) for ``operators.reranker.Reranker``. The corpus is bench_operator.py's long-tail docs
(lognormal token counts, median 150, cap 4,096). The embedder embeds the docs; the reranker scores one short query
against each doc, so its rows are the same docs plus the reranker prompt (~70 tokens of prefix, instruction and
suffix). tokens/s counts the tokens each model runs over (EOS, or the prompt, included) per second of wall time.

Two measurements per model, in interleaved rounds of ``--rows-per-call`` rows (one pipeline block per call) so that
load from other processes hits both alike:

  model     ``embed_ids`` / ``score_ids`` on token ids made beforehand: the model actor of a job, fed by its CPU
            tokenize stage (``TextEncoder`` / ``PairEncoder``);
  operator  ``embed(texts)`` / ``score(pairs)``: tokenization inside the call, as a direct user runs it.

The target (issue 14): reranker tokens/s within 15% of the embedder's (ratio >= 0.85), model stage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (REPO, os.path.join(REPO, "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402
import torch  # noqa: E402

TARGET = 0.85


def make_models(tmp: str, args):
    from tests.qwen_fixtures import build_qwen_tokenizer, make_qwen3_dir

    tok = build_qwen_tokenizer()
    arch = dict(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        intermediate_size=2 * args.hidden,
    )
    emb = make_qwen3_dir(os.path.join(tmp, "emb"), tokenizer=tok, **arch)
    rr = make_qwen3_dir(os.path.join(tmp, "rr"), causal_lm=True, tokenizer=tok, tie_word_embeddings=False, **arch)
    return tok, emb, rr


def rounds(fns: dict, n: int, per: int) -> tuple[dict[str, float], dict[str, float]]:
    """Wall and CPU seconds per name, the calls of each round interleaved: fns[name](start, stop)."""
    secs, cpu = dict.fromkeys(fns, 0.0), dict.fromkeys(fns, 0.0)
    for s in range(0, n, per):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn(s, min(n, s + per))
            secs[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
    return secs, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1500)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a busy 2-core machine)")
    ap.add_argument("--rows-per-call", type=int, default=1024)
    ap.add_argument("--batch-tokens", type=int, default=None, help="both operators' token budget (default: theirs)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from bench_operator import build_corpus

    from operators.embedder import Embedder
    from operators.reranker import Reranker
    from operators.tokenization import PairEncoder

    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="bench-rerank-")
    tok, emb_dir, rr_dir = make_models(tmp, args)
    docs, _ = build_corpus(tok, args.docs, args.seed, 150.0, 1.0, 4096)
    rng = np.random.default_rng(args.seed + 1)
    words = [w for d in docs[:200] for w in d.split()[:3]]
    queries = [" ".join(rng.choice(words, size=int(rng.integers(3, 9)))) + "?" for _ in docs]
    common = dict(device="cpu", dtype="float32", batch_tokens=args.batch_tokens)
    emb = Embedder(emb_dir, **common)
    rr = Reranker(rr_dir, **common)
    # The actors of a job: no tokenizer, fed ids by the CPU tokenize stage's encoders.
    emb_actor = Embedder(emb_dir, tokenizer=False, **common)
    rr_actor = Reranker(rr_dir, tokenizer=False, answer_ids=PairEncoder.from_model(rr_dir).answer_ids, **common)
    doc_ids = emb.encoder.encode(docs).ids
    pair_ids = rr.encode(queries, docs).ids
    tokens = {"embed": int(sum(len(x) for x in doc_ids)), "rerank": int(sum(len(x) for x in pair_ids))}
    print(
        f"set-up {time.perf_counter() - t0:.0f}s: {len(docs)} docs, Qwen3 hidden {args.hidden}, {args.layers} layers, "
        f"{args.heads}/{args.kv_heads} heads; {tokens['embed']:,} doc tokens, {tokens['rerank']:,} pair tokens; "
        f"{args.threads} torch threads",
        flush=True,
    )
    # Warm both once (first-call allocations), then time.
    emb_actor.embed_ids(doc_ids[:64])
    rr_actor.score_ids(pair_ids[:64])
    n, per = len(docs), args.rows_per_call
    model = rounds(
        {
            "embed": lambda a, b: emb_actor.embed_ids(doc_ids[a:b]),
            "rerank": lambda a, b: rr_actor.score_ids(pair_ids[a:b]),
        },
        n,
        per,
    )
    op = rounds(
        {"embed": lambda a, b: emb.embed(docs[a:b]), "rerank": lambda a, b: rr.score(queries[a:b], docs[a:b])},
        n,
        per,
    )
    res = {}
    for what, (secs, cpu) in (("model", model), ("operator", op)):
        e, r = tokens["embed"] / secs["embed"], tokens["rerank"] / secs["rerank"]
        ce, cr = tokens["embed"] / cpu["embed"], tokens["rerank"] / cpu["rerank"]
        res[what] = {"embed_tok_s": e, "rerank_tok_s": r, "ratio": r / e, "secs": secs, "cpu": cpu}
        res[what]["cpu_ratio"] = cr / ce
        print(
            f"{what:8s}: embedder {e:,.0f} tokens/s ({secs['embed']:.1f}s), reranker {r:,.0f} tokens/s "
            f"({secs['rerank']:.1f}s): reranker / embedder {r / e:.2f} (per CPU-second: {ce:,.0f} vs {cr:,.0f}, "
            f"{cr / ce:.2f})",
            flush=True,
        )
    eff = {"embed": emb_actor.stats.padding_efficiency, "rerank": rr_actor.stats.padding_efficiency}
    print(f"padding efficiency: embedder {eff['embed']:.3f}, reranker {eff['rerank']:.3f}")
    ok = "met" if res["model"]["ratio"] >= TARGET else "NOT met"
    print(f"target: reranker / embedder >= {TARGET} on the model stage: {res['model']['ratio']:.2f} ({ok})")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("JSON " + json.dumps({**res, "tokens": tokens, "padding_efficiency": eff, "args": vars(args)}))


if __name__ == "__main__":
    main()
