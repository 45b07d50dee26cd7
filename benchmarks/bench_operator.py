"""CPU throughput of the embedding operator against the official Qwen3-Embedding procedure and sentence-transformers.

One process, one synthetic long-tail corpus, one random-weight Qwen3 model (real Qwen vocabulary), three ways:

  (a) reference  the official snippet as published: batches of 32 in arrival order, ``max_length - 2`` truncation plus
                 ``<|endoftext|>``, ``tokenizer.pad`` with left padding, ``AutoModel`` forward, ``last_token_pool``,
                 ``F.normalize``; under ``torch.inference_mode``;
  (b) st         ``SentenceTransformer(dir).encode(texts, batch_size=32)`` on the same directory
                 (Transformer -> Pooling(lasttoken) -> Normalize, EOS appended by the tokenizer's post-processor);
  (c) rayembed   ``operators.embedder.Embedder(dir)`` with its default settings, fed ``--rows-per-call`` texts at a
                 time (what one Ray Data batch hands an actor).

tokens/s counts real tokens (the sum of the inputs' token counts, EOS included) over wall time, tokenization included
for all three. The vectors of (a), (b) and (c) are compared so the comparison is apples to apples.

    python benchmarks/bench_operator.py            # 2,000 docs, a few minutes on 2 cores
    python benchmarks/bench_operator.py --quick    # 400 docs, about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TARGETS = {"c_over_a": 5.0, "c_over_b": 1.3, "padding_efficiency": 0.9}
REF_BATCH = 32
MAX_LENGTH = 8192


# ------------------------------------------------------------------------------------------------------ corpus


def word_pools(tok) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Single-token English words (`` word``), single-token CJK strings, and identifiers, from the real vocabulary."""
    strs = tok.batch_decode([[i] for i in range(60000)])
    en = np.array([i for i, s in enumerate(strs) if re.fullmatch(r" [A-Za-z]{2,14}", s)])
    zh = np.array([i for i, s in enumerate(strs) if re.fullmatch(r"[\u4e00-\u9fff]{1,4}", s)])
    idents = sorted({strs[i].strip().lower() for i in en[:4000]})
    return en, zh, idents


CODE_LINES = [
    "def {a}({b}, {c}):\n    return {b} + {c} * {n}\n",
    "for {a} in range({n}):\n    {b}[{a}] = {c}({a})\n",
    'if {a} is None:\n    raise ValueError("{b} {c}")\n',
    "import {a}\nfrom {b} import {c}\n",
    "class {A}({B}):\n    {a}: int = {n}\n",
    "{a} = [{b} for {b} in {c} if {b} > {n}]\n",
    "# {a} {b} {c}\n",
    "    {a}.{b}({c}, key={n})\n",
]


def zipf_choice(rng, pool: np.ndarray, n: int) -> np.ndarray:
    w = 1.0 / (np.arange(len(pool)) + 20.0)
    return pool[rng.choice(len(pool), size=n, p=w / w.sum())]


def raw_text(rng, kind: str, n_tokens: int, strs: dict[int, str], pools) -> str:
    en, zh, idents = pools
    if kind == "en":
        words = [strs[i] for i in zipf_choice(rng, en, n_tokens)]
        out, since = [], 0
        for w in words:
            out.append(w)
            since += 1
            if since > rng.integers(8, 25):
                out.append(rng.choice([".", ",", ";", ".\n"]))
                since = 0
        return "".join(out).lstrip()
    if kind == "zh":
        chars = [strs[i] for i in zipf_choice(rng, zh, n_tokens)]
        out = []
        for j, c in enumerate(chars):
            out.append(c)
            if j % int(rng.integers(4, 12)) == 0 and j:
                out.append(rng.choice(["，", "。", "、"]))
        return "".join(out)
    lines = []
    while sum(len(x) for x in lines) < n_tokens * 4:
        ids = [idents[k] for k in rng.integers(0, len(idents), 5)]
        lines.append(
            rng.choice(CODE_LINES).format(
                a=ids[0], b=ids[1], c=ids[2], A=ids[3].title(), B=ids[4].title(), n=int(rng.integers(0, 1000))
            )
        )
    return "".join(lines)


def build_corpus(tok, n_docs: int, seed: int, median: float, sigma: float, cap: int, mix=(0.7, 0.15, 0.15)):
    """Texts whose token counts (EOS included) follow a capped lognormal; returns texts, targets, actual counts."""
    rng = np.random.default_rng(seed)
    targets = np.clip(np.rint(rng.lognormal(np.log(median), sigma, n_docs)), 4, cap).astype(np.int64)
    en, zh, idents = word_pools(tok)
    needed = np.unique(np.concatenate([en, zh]))
    strs = dict(zip(needed.tolist(), tok.batch_decode([[int(i)] for i in needed]), strict=True))
    kinds = rng.choice(["en", "zh", "code"], size=n_docs, p=np.asarray(mix) / sum(mix))
    # Generate with slack, then cut at the target in token space and decode back to text.
    raw = [raw_text(rng, k, int(t * 1.3) + 8, strs, (en, zh, idents)) for k, t in zip(kinds, targets, strict=True)]
    ids = tok(raw, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    texts = tok.batch_decode([row[: int(t) - 1] for row, t in zip(ids, targets, strict=True)])
    return texts, targets


# ------------------------------------------------------------------------------------------------------ models


def make_model_dir(path: str, args) -> str:
    """A random-weight Qwen3Model that loads with AutoModel, with our Embedder and with SentenceTransformer."""
    from tests.qwen_fixtures import build_qwen_tokenizer, make_qwen3_dir

    tok = build_qwen_tokenizer(eos_postprocessor=True)  # the newer Qwen3-Embedding tokenizer.json: appends EOS
    tok.padding_side = "left"  # as upstream's tokenizer_config.json
    make_qwen3_dir(
        path,
        tokenizer=tok,
        seed=args.seed,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        intermediate_size=args.intermediate,
    )
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    pooling = {
        "word_embedding_dimension": args.hidden,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": True,
        "include_prompt": True,
    }
    os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
    os.makedirs(os.path.join(path, "2_Normalize"), exist_ok=True)
    for name, obj in [
        ("modules.json", modules),
        ("1_Pooling/config.json", pooling),
        ("sentence_bert_config.json", {"max_seq_length": MAX_LENGTH, "do_lower_case": False}),
    ]:
        with open(os.path.join(path, name), "w") as f:
            json.dump(obj, f, indent=2)
    return path


# ------------------------------------------------------------------------------------------------------ (a) reference
# Verbatim from the Qwen3-Embedding announcement ("正确调用方式如下"), modelscope swapped for transformers.


def last_token_pool(last_hidden_states, attention_mask):
    left_padding = attention_mask[:, -1].sum() == attention_mask.shape[0]
    if left_padding:
        return last_hidden_states[:, -1]
    sequence_lengths = attention_mask.sum(dim=1) - 1
    batch_size = last_hidden_states.shape[0]
    return last_hidden_states[torch.arange(batch_size, device=last_hidden_states.device), sequence_lengths]


def ref_tokenize(tokenizer, input_texts, eod_id, max_length):
    batch_dict = tokenizer(input_texts, padding=False, truncation=True, max_length=max_length - 2)
    for seq, att in zip(batch_dict["input_ids"], batch_dict["attention_mask"], strict=True):
        seq.append(eod_id)
        att.append(1)
    return tokenizer.pad(batch_dict, padding=True, return_tensors="pt")


class Reference:
    def __init__(self, path: str):
        from transformers import AutoModel

        from tests.qwen_fixtures import build_qwen_tokenizer

        # The tokenizer the snippet was written for: no post-processor, so EOS is appended once, by the snippet.
        self.tokenizer = build_qwen_tokenizer()
        self.tokenizer.padding_side = "left"
        self.eod_id = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.model = AutoModel.from_pretrained(path).eval()
        self.tokens = 0
        self.padded_tokens = 0

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), REF_BATCH):
            batch_dict = ref_tokenize(self.tokenizer, texts[i : i + REF_BATCH], self.eod_id, MAX_LENGTH)
            self.tokens += int(batch_dict["attention_mask"].sum())
            self.padded_tokens += batch_dict["input_ids"].numel()
            outputs = self.model(**batch_dict)
            embeddings = last_token_pool(outputs.last_hidden_state, batch_dict["attention_mask"])
            out.append(F.normalize(embeddings, p=2, dim=1))
        return torch.cat(out).numpy()


# ------------------------------------------------------------------------------------------------------ driver


def describe_mix(mix) -> str:
    return ", ".join(
        f"{100 * w / sum(mix):.0f}% {k}" for k, w in zip(["English", "Chinese", "code"], mix, strict=True) if w
    )


def st_padding_efficiency(texts: list[str], lengths: np.ndarray, batch: int, rows_per_call: int) -> float:
    """sentence-transformers sorts each ``encode`` call's texts by length in characters, longest first, then cuts
    batches of ``batch`` rows: the padding that results, in tokens."""
    real = padded = 0
    for s in range(0, len(texts), rows_per_call):
        chars = np.array([len(t) for t in texts[s : s + rows_per_call]])
        lens = lengths[s : s + rows_per_call]
        order = np.argsort(-chars, kind="stable")
        for i in range(0, len(order), batch):
            sel = order[i : i + batch]
            real += int(lens[sel].sum())
            padded += len(sel) * int(lens[sel].max())
    return real / padded


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=2000, help="corpus size (default 2000)")
    p.add_argument("--quick", action="store_true", help="400 docs: a sanity run of about a minute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--median", type=float, default=150.0, help="median document length in tokens (default 150)")
    p.add_argument("--sigma", type=float, default=1.0, help="lognormal shape of the lengths (default 1.0)")
    p.add_argument("--cap", type=int, default=4096, help="longest document in tokens (default 4096)")
    p.add_argument(
        "--mix", default="0.7,0.15,0.15", help="weights of English, Chinese, code docs (default 0.7,0.15,0.15)"
    )
    # One intra-op thread by default: on a shared 2-core machine, 2 threads collapse as soon as another process takes
    # a core (measured 3x slower, all of it spin-waiting), and the comparison then measures the neighbours.
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads, the same for all three (default 1)")
    p.add_argument("--rows-per-call", type=int, default=1024, help="texts per Embedder / encode call (default 1024)")
    p.add_argument("--batch-tokens", type=int, default=None, help="Embedder batch_tokens (default: its own)")
    p.add_argument("--only", default="abc", help="run a subset of a (reference), b (sentence-transformers), c (ours)")
    g = p.add_argument_group("model (random weights, real Qwen vocabulary)")
    g.add_argument("--hidden", type=int, default=128)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--heads", type=int, default=2)
    g.add_argument("--kv-heads", type=int, default=1)
    g.add_argument("--head-dim", type=int, default=32)
    g.add_argument("--intermediate", type=int, default=512)
    args = p.parse_args(argv)
    if args.quick:
        args.docs = min(args.docs, 400)
    if not set(args.only) & set("abc") or set(args.only) - set("abc"):
        p.error(f"--only takes letters among a, b, c; got {args.only!r}")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()

    from transformers.utils import logging as hf_logging

    from tests.qwen_fixtures import build_qwen_tokenizer

    hf_logging.disable_progress_bar()
    tok = build_qwen_tokenizer()
    mix = [float(x) for x in args.mix.split(",")]
    texts, targets = build_corpus(tok, args.docs, args.seed, args.median, args.sigma, args.cap, mix)
    lengths = np.array([len(r) + 1 for r in tok(texts, add_special_tokens=False)["input_ids"]])  # + EOS
    total = int(lengths.sum())
    pct = np.percentile(lengths, [50, 90, 99, 100]).astype(int).tolist()
    print(
        f"corpus: {len(texts)} docs ({describe_mix(mix)}), {total} tokens with EOS; length "
        f"p50/p90/p99/max {pct}, mean {lengths.mean():.0f}; mean |actual - target| "
        f"{np.abs(lengths - targets).mean():.2f} tokens; built in {time.perf_counter() - t_start:.1f}s",
        flush=True,
    )

    tmp = tempfile.TemporaryDirectory(prefix="rayembed-bench-")
    path = make_model_dir(os.path.join(tmp.name, "qwen3-emb"), args)

    from sentence_transformers import SentenceTransformer

    from operators.embedder import Embedder

    emb = Embedder(path, batch_tokens=args.batch_tokens, device="cpu")
    n_params = sum(p.numel() for n, p in emb.model.named_parameters() if "embed_tokens" not in n)
    st = SentenceTransformer(path, device="cpu")
    ref = Reference(path)
    print(
        f"model: random-weight Qwen3: hidden {args.hidden}, {args.layers} layers, "
        f"heads {args.heads}/{args.kv_heads}, "
        f"head_dim {args.head_dim}, intermediate {args.intermediate} ({n_params / 1e6:.2f}M non-embedding params), "
        f"fp32; torch threads {torch.get_num_threads()}; sentence-transformers: "
        f"{' -> '.join(type(m).__name__ for m in st)}; load average {load_before:.1f}",
        flush=True,
    )

    methods = {
        "a": ref.encode,
        "b": lambda xs: st.encode(xs, batch_size=REF_BATCH, convert_to_numpy=True, show_progress_bar=False),
        "c": emb.embed,
    }
    methods = {k: v for k, v in methods.items() if k in args.only}
    for fn in methods.values():  # warm-up: first-call allocations, thread pools
        fn(texts[:REF_BATCH])
    ref.tokens = ref.padded_tokens = 0
    c_tokens, c_padded, c_forwards = emb.stats.tokens, emb.stats.padded_tokens, emb.stats.forwards

    # Interleaved rounds of --rows-per-call docs (what one Ray Data batch hands an actor), rotating the order, so that
    # load from other processes on a shared machine hits all three alike. All see the same docs in the same order.
    seconds = dict.fromkeys(methods, 0.0)
    cpu_seconds = dict.fromkeys(methods, 0.0)  # process CPU time: less sensitive to other processes' load
    parts: dict[str, list[np.ndarray]] = {k: [] for k in methods}
    starts = list(range(0, len(texts), args.rows_per_call))
    for r, s in enumerate(starts):
        chunk = texts[s : s + args.rows_per_call]
        keys = list(methods)
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            t, c = time.perf_counter(), time.process_time()
            parts[k].append(np.asarray(methods[k](chunk)))
            seconds[k] += time.perf_counter() - t
            cpu_seconds[k] += time.process_time() - c
        print(
            f"  round {r + 1}/{len(starts)} ({len(chunk)} docs): "
            + ", ".join(f"{k} {seconds[k]:.1f}s" for k in methods),
            flush=True,
        )
    vectors = {k: np.concatenate(v) for k, v in parts.items()}

    names = {"a": "(a) official reference", "b": "(b) SentenceTransformer", "c": "(c) rayembed Embedder"}
    notes = {
        "a": f"batches of {REF_BATCH} in arrival order, left padding",
        "b": f"encode(batch_size={REF_BATCH}): sorted by characters, padding estimated from token counts",
        "c": "",
    }
    results: dict[str, dict] = {}
    if "a" in methods:
        assert ref.tokens == total, (ref.tokens, total)
        results["a"] = {"padding_efficiency": ref.tokens / ref.padded_tokens}
    if "b" in methods:
        results["b"] = {"padding_efficiency": st_padding_efficiency(texts, lengths, REF_BATCH, args.rows_per_call)}
    if "c" in methods:
        real, padded = emb.stats.tokens - c_tokens, emb.stats.padded_tokens - c_padded
        assert real == total, (real, total)
        results["c"] = {"padding_efficiency": real / padded}
        notes["c"] = (
            f"batch_tokens {emb.batcher.budget}, {emb.stats.forwards - c_forwards} forwards, "
            f"{args.rows_per_call} rows per call"
        )
    for k in results:
        results[k].update(tok_s=total / seconds[k], seconds=seconds[k], cpu_seconds=cpu_seconds[k])

    diffs = {}
    for x, y in [("a", "c"), ("b", "c"), ("a", "b")]:
        if x in vectors and y in vectors:
            diffs[f"{x}-{y}"] = float(np.abs(vectors[x] - vectors[y]).max())

    print()
    print(f"{'':25s}{'tok/s':>9s}{'seconds':>9s}{'CPU s':>8s}{'pad eff':>9s}")
    for k, r in results.items():
        print(
            f"{names[k]:25s}{r['tok_s']:9.0f}{r['seconds']:9.1f}{r['cpu_seconds']:8.1f}{r['padding_efficiency']:9.3f}"
            f"   {notes[k]}"
        )
    if diffs:
        print("max |vector difference|: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    checks = []
    summary: dict = {}
    if "c" in results:
        for other, key in [("a", "c_over_a"), ("b", "c_over_b")]:
            if other in results:
                ratio = results["c"]["tok_s"] / results[other]["tok_s"]
                summary[key] = round(ratio, 3)
                by_cpu = results[other]["cpu_seconds"] / results["c"]["cpu_seconds"]
                summary[key + "_cpu_time"] = round(by_cpu, 3)
                checks.append((f"c/{other}", ratio, TARGETS[key], f"{ratio:.2f}x", f"(by CPU time {by_cpu:.2f}x)"))
        eff = results["c"]["padding_efficiency"]
        checks.append(("padding efficiency", eff, TARGETS["padding_efficiency"], f"{eff:.3f}", ""))
    for name, value, target, shown, extra in checks:
        print(f"{name:20s}{shown:>8s}   target >= {target:g}   {'met' if value >= target else 'MISSED':6s}   {extra}")
    load_after = os.getloadavg()[0]
    print(
        f"wall {time.perf_counter() - t_start:.0f}s; load average {load_before:.1f} -> {load_after:.1f} "
        f"on {os.cpu_count()} CPUs (timings are only comparable within one run)"
    )
    summary = {
        "bench": "operator",
        "docs": len(texts),
        "tokens": total,
        "model": {
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "intermediate": args.intermediate,
            "non_embedding_params": n_params,
        },
        "threads": torch.get_num_threads(),
        "rows_per_call": args.rows_per_call,
        "tok_s": {k: round(v["tok_s"], 1) for k, v in results.items()},
        "cpu_seconds": {k: round(v["cpu_seconds"], 1) for k, v in results.items()},
        "padding_efficiency": {k: round(v["padding_efficiency"], 4) for k, v in results.items()},
        **summary,
        "max_abs_diff": diffs,
        "targets_met": {name: bool(value >= target) for name, value, target, _, _ in checks},
        "load_average": [round(load_before, 2), round(load_after, 2)],
    }
    print("JSON " + json.dumps(summary), flush=True)
    tmp.cleanup()
    return summary


if __name__ == "__main__":
    main()
