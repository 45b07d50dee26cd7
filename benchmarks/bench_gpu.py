"""GPU throughput and MFU of the embedding operator against the official Qwen3-Embedding procedure, plus the reranker.

Runs where torch and transformers are installed and nothing else of ours is: no ray, no dashscope, no
sentence-transformers, no network. The real Qwen3-Embedding-0.6B architecture (``QWEN3_ARCHS["0.6B"]``, vocab 151669)
gets random bf16 weights, made on the GPU and saved with ``save_pretrained`` to a temporary directory, then loaded
through the real loading code (``operators.embedder.Embedder``). The Qwen vocabulary is not needed: inputs are random
token ids in [0, 151643) with ``<|endoftext|>`` (151643) as the last token, fed through ``Embedder.embed_ids``. The
directory gets a stand-in ``tokenizer.json`` (a word-level table holding only the special tokens and ``yes``/``no``
at their Qwen ids) just so that loading works; no text is ever tokenized.

Measured per input length (128, 512 and 2048 tokens, and a long-tail mix: lognormal, median 150, capped at 4096):

  ours       ``Embedder.embed_ids`` (bf16, SDPA, default batch_tokens), fed ``--rows-per-call`` rows per call, as the
             pipeline's tokenize stage hands one block to the model actor;
  reference  the official procedure on the same ids: batches of 32 in arrival order, left padding to the longest
             with an attention mask (what ``tokenizer.pad`` makes), ``AutoModel`` forward, ``last_token_pool``,
             ``F.normalize``. The padding is done in numpy, which is cheaper than ``tokenizer.pad``.

and, for the reranker (benchmarks/gpu_rerank.py), ``operators.reranker.Reranker.score_ids`` with the same ``--packing``
and ``--compile`` on (prefix + body + suffix) rows of ``--rerank-len`` tokens and on long-tail bodies, with the same
architecture as ``Qwen3ForCausalLM`` (if operators/reranker.py is missing or fails to load, a plain backbone forward
plus the two-row head ``hidden_last @ lm_head[[no, yes]].T`` stands in).

tokens/s counts real tokens (padding excluded) over wall time, host-to-device copies and the copy of the results
back included, with ``torch.cuda.synchronize()`` around each timing.

MFU = useful FLOP/s / peak. Useful FLOPs of one sequence of L real tokens (forward only):

    FLOPs(L) = 2 * N * L  +  2 * n_layers * d_attn * L^2

where N is the number of non-embedding parameters (the embedding lookup is a gather, not a matmul; for 0.6B,
N = 0.44e9) and d_attn = n_heads * head_dim (2048 for 0.6B). The second term is causal attention: QK^T and AV cost
4 * n_layers * d_attn * L^2 for the full L x L square, of which the causal half is useful. Padding and the masked
half are not counted, so a procedure that computes padding shows a lower MFU. Peak is the dense bf16 tensor-core
peak: 989e12 FLOP/s for H100 SXM and H200 (756e12 for H100 PCIe), from ``torch.cuda.get_device_name``; override with
``--peak-tflops``.

    PYTHONUNBUFFERED=1 python benchmarks/bench_gpu.py            # on the GPU machine, about 3 minutes
    python benchmarks/bench_gpu.py --cpu-smoke                   # tiny config on CPU, fp32: checks the script runs
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (REPO, os.path.join(REPO, "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

EOD_ID = 151643
YES_ID, NO_ID = 9693, 2152
REF_BATCH = 32
# Rows per operator call: the pipeline's default block (pipelines.config.DEFAULT_ROWS_PER_BLOCK), one Ray Data batch.
ROWS_PER_CALL = 1024
# Dense bf16 tensor-core peaks, FLOP/s; the first name contained in the device name wins.
PEAKS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
]
SMOKE_ARCH = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    tie_word_embeddings=True,
)


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------------ models


def standin_tokenizer():
    """A tokenizer that only satisfies loading: Qwen's special tokens, ``yes`` and ``no`` at their Qwen ids."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {
        "<|endoftext|>": EOD_ID,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<think>": 151667,
        "</think>": 151668,
    }
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "no": NO_ID, "yes": YES_ID, **specials}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )


def make_model_dir(path: str, arch: dict, *, causal_lm: bool, dtype: torch.dtype, device: str, seed: int) -> dict:
    """Random weights made directly on ``device`` in ``dtype``, saved as safetensors with the stand-in tokenizer."""
    from transformers import Qwen3ForCausalLM, Qwen3Model

    from tests.qwen_fixtures import qwen3_config

    cfg = qwen3_config(causal_lm=causal_lm, **arch)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = (Qwen3ForCausalLM if causal_lm else Qwen3Model)(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(path, safe_serialization=True)
    standin_tokenizer().save_pretrained(path)
    info = {
        "non_embedding_params": sum(
            p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n
        ),
        "layers": cfg.num_hidden_layers,
        "d_attn": cfg.num_attention_heads * cfg.head_dim,
        "hidden": cfg.hidden_size,
    }
    del model
    free_memory()
    return info


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def useful_flops(lengths: np.ndarray, info: dict) -> float:
    """Forward FLOPs of the real tokens: 2*N*L + 2*layers*d_attn*L^2 per sequence (module docstring)."""
    lens = np.asarray(lengths, dtype=np.float64)
    return float((2 * info["non_embedding_params"] * lens + 2 * info["layers"] * info["d_attn"] * lens**2).sum())


# ------------------------------------------------------------------------------------------------------ inputs


def fixed_rows(rng: np.random.Generator, n: int, length: int) -> list[np.ndarray]:
    ids = rng.integers(0, EOD_ID, size=(n, length), dtype=np.int32)
    ids[:, -1] = EOD_ID
    return list(ids)


def mixed_rows(rng: np.random.Generator, tokens: int, median: float, sigma: float, cap: int) -> list[np.ndarray]:
    rows: list[np.ndarray] = []
    total = 0
    while total < tokens:
        length = int(np.clip(round(rng.lognormal(np.log(median), sigma)), 2, cap))
        row = rng.integers(0, EOD_ID, size=length, dtype=np.int32)
        row[-1] = EOD_ID
        rows.append(row)
        total += length
    return rows


# ------------------------------------------------------------------------------------------------------ reference
# The official snippet's pooling, verbatim; the padding that tokenizer.pad(padding_side="left") does, in numpy.


def last_token_pool(last_hidden_states, attention_mask):
    left_padding = attention_mask[:, -1].sum() == attention_mask.shape[0]
    if left_padding:
        return last_hidden_states[:, -1]
    sequence_lengths = attention_mask.sum(dim=1) - 1
    batch_size = last_hidden_states.shape[0]
    return last_hidden_states[torch.arange(batch_size, device=last_hidden_states.device), sequence_lengths]


class Reference:
    def __init__(self, path: str, dtype: torch.dtype, device: str):
        from transformers import AutoModel

        self.device = device
        self.model = AutoModel.from_pretrained(path, **{dtype_kwarg(): dtype}).to(device).eval()
        self.padded_tokens = 0

    @torch.inference_mode()
    def embed_ids(self, rows: list[np.ndarray]) -> np.ndarray:
        out = []
        for i in range(0, len(rows), REF_BATCH):
            batch = rows[i : i + REF_BATCH]
            longest = max(len(r) for r in batch)
            ids = np.full((len(batch), longest), EOD_ID, dtype=np.int64)
            mask = np.zeros((len(batch), longest), dtype=np.int64)
            for j, r in enumerate(batch):
                ids[j, longest - len(r) :] = r
                mask[j, longest - len(r) :] = 1
            self.padded_tokens += ids.size
            batch_dict = {
                "input_ids": torch.from_numpy(ids).to(self.device),
                "attention_mask": torch.from_numpy(mask).to(self.device),
            }
            outputs = self.model(**batch_dict)
            embeddings = last_token_pool(outputs.last_hidden_state, batch_dict["attention_mask"])
            out.append(F.normalize(embeddings, p=2, dim=1))
        return torch.cat(out).float().cpu().numpy()


# ------------------------------------------------------------------------------------------------------ timing


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_run(fn, rows: list[np.ndarray], rows_per_call: int, cap_s: float) -> tuple[int, np.ndarray, float]:
    """Run ``fn`` over ``rows`` in calls of ``rows_per_call``; stop after the call that passes ``cap_s`` seconds.

    Returns the number of rows done, their outputs and the wall time."""
    outs = []
    done = 0
    sync()
    t0 = time.perf_counter()
    for s in range(0, len(rows), rows_per_call):
        outs.append(fn(rows[s : s + rows_per_call]))
        done = min(len(rows), s + rows_per_call)
        if time.perf_counter() - t0 > cap_s:
            break
    sync()
    return done, np.concatenate(outs), time.perf_counter() - t0


def peak_flops(args) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops * 1e12, f"--peak-tflops {args.peak_tflops:g}"
    if not torch.cuda.is_available() or args.cpu_smoke:
        return None, "no GPU: MFU not computed"
    name = torch.cuda.get_device_name(0)
    for key, value in PEAKS:
        if key.lower() in name.lower():
            return value, f"{name}: dense bf16 peak {value / 1e12:.0f} TFLOP/s"
    return None, f"{name}: unknown peak, pass --peak-tflops for MFU"


def fmt_mfu(flops_s: float, peak: float | None) -> str:
    return f"{100 * flops_s / peak:5.1f}%" if peak else "   n/a"


def dtype_kwarg() -> str:
    """``from_pretrained`` takes ``dtype`` from transformers 4.56 on, ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def run_case(name: str, rows: list[np.ndarray], emb, ref, info: dict, peak: float | None, args) -> dict:
    """Time ours and the reference on the same rows; check that their vectors agree."""
    warm = rows[: max(REF_BATCH, min(len(rows), 2 * emb.batcher.budget // max(len(r) for r in rows[:64])))]
    emb.embed_ids(warm)
    if ref is not None:
        ref.embed_ids(warm[:REF_BATCH])
    sync()
    stats0 = (emb.stats.tokens, emb.stats.padded_tokens)
    n_ours, v_ours, s_ours = timed_run(emb.embed_ids, rows, args.rows_per_call, args.cap_s)
    eff_ours = (emb.stats.tokens - stats0[0]) / max(1, emb.stats.padded_tokens - stats0[1])
    lens_ours = np.array([len(r) for r in rows[:n_ours]])
    if ref is None:  # --no-ref: ours only
        v_ref, s_ref, n_ref, eff_ref = v_ours[:0], float("nan"), 0, float("nan")
    else:
        ref.padded_tokens = 0
        # The reference works in arrival-order batches of 32 whatever it is handed; smaller calls only make the time
        # cap finer.
        n_ref, v_ref, s_ref = timed_run(ref.embed_ids, rows, 8 * REF_BATCH, args.cap_s)
        eff_ref = sum(len(r) for r in rows[:n_ref]) / max(1, ref.padded_tokens)
    lens_ref = np.array([len(r) for r in rows[:n_ref]], dtype=np.int64)
    k = min(n_ours, n_ref)
    diff = float(np.abs(v_ours[:k] - v_ref[:k]).max()) if k else float("nan")
    cos = float((v_ours[:k] * v_ref[:k]).sum(1).min()) if k else float("nan")
    r = {
        "case": name,
        "rows": [n_ours, n_ref],
        "ours_tok_s": float(lens_ours.sum() / s_ours),
        "ref_tok_s": float(lens_ref.sum() / s_ref) if n_ref else float("nan"),
        "ours_flops_s": useful_flops(lens_ours, info) / s_ours,
        "ref_flops_s": useful_flops(lens_ref, info) / s_ref if n_ref else float("nan"),
        "ours_pad_eff": eff_ours,
        "ref_pad_eff": eff_ref,
        "max_abs_diff": diff,
        "min_cos": cos,
    }
    r["ratio"] = r["ours_tok_s"] / r["ref_tok_s"]
    ours = f"{r['ours_tok_s']:.0f} tok/s MFU {fmt_mfu(r['ours_flops_s'], peak).strip()}"
    refs = f"{r['ref_tok_s']:.0f} tok/s MFU {fmt_mfu(r['ref_flops_s'], peak).strip()}"
    log(
        f"[{name}] ours {ours} ({n_ours} rows, {s_ours:.1f}s, pad eff {eff_ours:.3f}) | reference {refs} "
        f"({n_ref} rows, {s_ref:.1f}s, pad eff {eff_ref:.3f}) | x{r['ratio']:.2f} | max|diff| {diff:.1e}, "
        f"min cos {cos:.4f}"
    )
    return r


def check_packing(emb, emb_dir: str, dtype, device: str, rows: list[np.ndarray], args) -> dict:
    """Packed vectors against the padded path's on the same rows: the bf16 contract is cosine >= 0.999."""
    from operators.embedder import Embedder

    padded = Embedder(
        emb_dir,
        device=device,
        dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
        batch_tokens=args.batch_tokens,
        packing="off",
    )
    sample = rows[: min(len(rows), 4000)]
    a, b = emb.embed_ids(sample), padded.embed_ids(sample)
    cos = (a * b).sum(1)
    out = {"rows": len(sample), "kernel": emb.kernel, "min_cos": float(cos.min()), "mean_cos": float(cos.mean())}
    verdict = "ok" if out["min_cos"] >= 0.999 else "BELOW 0.999"
    log(
        f"[packing check] {emb.kernel} vs padded SDPA on {len(sample)} rows: min cos {out['min_cos']:.5f}, "
        f"mean {out['mean_cos']:.6f} ({verdict})"
    )
    del padded
    return out


def run_embedder(tmp, arch, dtype, device, lengths, mix, rng, peak, args, t_start) -> tuple[list[dict], dict | None]:
    """The embedder against the reference at each length and on the mix, then the packing check."""
    from operators.embedder import Embedder

    emb_dir = os.path.join(tmp, "emb")
    t = time.perf_counter()
    info = make_model_dir(emb_dir, arch, causal_lm=False, dtype=dtype, device=device, seed=args.seed)
    emb = Embedder(
        emb_dir,
        device=device,
        dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
        batch_tokens=args.batch_tokens,
        compile=args.compile,
        packing=args.packing,
    )
    ref = None if args.no_ref else Reference(emb_dir, dtype, device)
    log(
        f"model: Qwen3 {'smoke' if args.cpu_smoke else args.arch} (hidden {info['hidden']}, {info['layers']} layers, "
        f"d_attn {info['d_attn']}, {info['non_embedding_params'] / 1e6:.1f}M non-embedding params), random weights; "
        f"Embedder batch_tokens {emb.batcher.budget}, {args.rows_per_call} rows per call; "
        f"set up in {time.perf_counter() - t:.1f}s"
    )
    log(f"attention: {emb.warmup}")

    cases: list[tuple[str, list[np.ndarray]]] = [
        (str(n), fixed_rows(rng, max(REF_BATCH, args.tokens // n), n)) for n in lengths
    ]
    if not args.no_mix:
        cases.append((f"mix{mix[0]:.0f}", mixed_rows(rng, args.tokens // 4, *mix)))  # a quarter: its reference pads

    rows_out: list[dict] = []
    for name, rows in cases:
        if time.perf_counter() - t_start > args.budget_s:
            log(f"[{name}] skipped: the {args.budget_s:.0f}s budget is spent")
            continue
        try:
            rows_out.append(run_case(name, rows, emb, ref, info, peak, args))
        except Exception as e:  # one failed case (an OOM, say) must not cost the others
            log(f"[{name}] FAILED: {type(e).__name__}: {str(e)[:300]}")
            free_memory()

    packing_check = None
    if emb.kernel is not None and time.perf_counter() - t_start <= args.budget_s:
        try:
            packing_check = check_packing(emb, emb_dir, dtype, device, cases[-1][1], args)
        except Exception as e:
            log(f"[packing check] FAILED: {type(e).__name__}: {str(e)[:300]}")

    del emb, ref
    free_memory()
    return rows_out, packing_check


# ------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny config, fp32, on CPU, few sequences")
    p.add_argument("--arch", default="0.6B", help="architecture from tests.qwen_fixtures.QWEN3_ARCHS (default 0.6B)")
    p.add_argument("--lengths", default=None, help="fixed input lengths, EOS included (default 128,512,2048)")
    p.add_argument("--no-mix", action="store_true", help="skip the long-tail mix (lognormal, median 150, cap 4096)")
    p.add_argument("--tokens", type=int, default=2**21, help="tokens per length and method (default 2,097,152)")
    p.add_argument("--rows-per-call", type=int, default=ROWS_PER_CALL, help="rows per Embedder call (default 1024)")
    p.add_argument("--batch-tokens", type=int, default=None, help="Embedder batch_tokens (default: its own)")
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on CUDA)"
    )
    p.add_argument("--packing", default="auto", choices=["auto", "on", "off"], help="Embedder packing (default auto)")
    p.add_argument("--no-ref", action="store_true", help="time ours only (no reference, no ratio)")
    p.add_argument("--rerank-len", type=int, default=512, help="reranker pair length in tokens (default 512)")
    p.add_argument("--no-rerank", action="store_true")
    p.add_argument("--no-embed", action="store_true", help="the reranker only")
    p.add_argument("--cap-s", type=float, default=15.0, help="stop a measurement after this many seconds")
    p.add_argument("--budget-s", type=float, default=220.0, help="skip what is left after this many seconds")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: from the device name)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    from tests.qwen_fixtures import QWEN3_ARCHS

    if args.cpu_smoke:
        device, dtype, arch = "cpu", torch.float32, dict(SMOKE_ARCH)
        lengths = [int(x) for x in (args.lengths or "16,64,256").split(",") if x]
        args.tokens = min(args.tokens, 4096)
        args.rerank_len = min(args.rerank_len, 64)
        mix = (150.0, 1.0, 512)
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_gpu.py: no CUDA device; use --cpu-smoke to check the script on CPU")
        device, dtype, arch = "cuda", torch.bfloat16, dict(QWEN3_ARCHS[args.arch])
        lengths = [int(x) for x in (args.lengths or "128,512,2048").split(",") if x]
        mix = (150.0, 1.0, 4096)

    import transformers
    from transformers.utils import logging as hf_logging

    import operators

    try:
        from operators.reranker import Reranker
    except ImportError as e:
        Reranker, rerank_import_error = None, f"{type(e).__name__}: {e}"
    else:
        rerank_import_error = None
    ray_loaded = sys.modules.get("ray") is not None  # None: blocked on purpose by a caller
    hf_logging.disable_progress_bar()
    peak, peak_note = peak_flops(args)
    versions = f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}"
    log(f"rayembed {operators.__version__}; {versions}; ray imported by operators: {'YES' if ray_loaded else 'no'}")
    log(f"device {device} ({peak_note}); dtype {str(dtype).removeprefix('torch.')}")
    if ray_loaded:
        log("WARNING: importing operators pulled in ray; the operators must not need ray at import time")

    tmp = tempfile.TemporaryDirectory(prefix="rayembed-gpu-")
    rng = np.random.default_rng(args.seed)
    rows_out: list[dict] = []
    packing_check = None
    if not args.no_embed:
        rows_out, packing_check = run_embedder(tmp.name, arch, dtype, device, lengths, mix, rng, peak, args, t_start)

    rerank: dict | None = None
    if not args.no_rerank and time.perf_counter() - t_start <= args.budget_s:
        from gpu_rerank import run_rerank

        try:
            rerank = run_rerank(
                os.path.join(tmp.name, "rerank"), arch, dtype, device, rng, peak, args, Reranker, rerank_import_error
            )
        except Exception as e:
            log(f"[rerank] FAILED: {type(e).__name__}: {str(e)[:300]}")
        free_memory()

    log()
    log(
        f"summary: {device} {peak_note}; Qwen3 {'smoke' if args.cpu_smoke else args.arch}, {str(dtype)[6:]}; "
        f"tokens/s of real tokens; MFU = (2*N*L + 2*layers*d_attn*L^2) per sequence / s / peak"
    )
    cols = f"{'tok/s':>11s} {'MFU':>6s} {'pad':>5s}"
    log(f"{'input':>8s} | ours {cols} | reference {cols} | {'ours/ref':>8s} | {'max|diff|':>9s}")
    for r in rows_out:
        ours = f"{r['ours_tok_s']:11.0f} {fmt_mfu(r['ours_flops_s'], peak)} {r['ours_pad_eff']:5.2f}"
        refs = f"{r['ref_tok_s']:11.0f} {fmt_mfu(r['ref_flops_s'], peak)} {r['ref_pad_eff']:5.2f}"
        log(f"{r['case']:>8s} |      {ours} |           {refs} | {r['ratio']:7.2f}x | {r['max_abs_diff']:9.1e}")
    for c in (rerank or {}).get("cases", []):
        rr_cols = f"{c['tok_s']:11.0f} {fmt_mfu(c['flops_s'], peak)} {c['pad_eff']:5.2f}"
        log(f"{'rr' + c['case']:>8s} |      {rr_cols} | {rerank['impl']}, mean {c['mean_len']:.0f} tokens per pair")
    log(f"wall {time.perf_counter() - t_start:.0f}s")
    summary = {
        "bench": "gpu",
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "arch": "smoke" if args.cpu_smoke else args.arch,
        "dtype": str(dtype).removeprefix("torch."),
        "peak_flops": peak,
        "ray_imported": ray_loaded,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cases": rows_out,
        "rerank": rerank,
        "packing_check": packing_check,
    }
    if peak:
        for r in rows_out:
            r["ours_mfu"], r["ref_mfu"] = r["ours_flops_s"] / peak, r["ref_flops_s"] / peak
        for c in (rerank or {}).get("cases", []):
            c["mfu"] = c["flops_s"] / peak
    log("JSON " + json.dumps(summary, default=float))
    tmp.cleanup()
    return summary


if __name__ == "__main__":
    main()
