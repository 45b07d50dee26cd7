"""The reranker part of bench_gpu.py: ``operators.reranker.Reranker.score_ids`` on the real architecture, MFU.

Two cases on one random-weight ``Qwen3ForCausalLM`` of the chosen architecture (bench_gpu.py's ``--arch``):

  <len>     pairs of ``--rerank-len`` tokens, prompt included (uniform: every micro-batch runs padded);
  mix       the reranker prompt (prefix + suffix, ~48 tokens) around bodies of long-tail lengths (lognormal, median
            150, capped so a row stays within 4,096): where packing pays.

The reranker runs as a job's model actor does: ``tokenizer=False``, fed ids, with bench_gpu.py's ``--packing`` and
``--compile``. When it packs, a padded Reranker scores the same mixed rows and the largest score difference is
printed (``[rerank packing check]``; bf16, so differences of ~1e-3 are rounding). If operators/reranker.py is missing
or its constructor fails, a backbone plus the two-row head stands in (``TwoRowReranker``).
"""

from __future__ import annotations

import numpy as np
import torch
from bench_gpu import (
    REF_BATCH,
    dtype_kwarg,
    fixed_rows,
    fmt_mfu,
    free_memory,
    log,
    make_model_dir,
    mixed_rows,
    timed_run,
    useful_flops,
)

YES_ID, NO_ID = 9693, 2152


class TwoRowReranker:
    """Stand-in for operators.reranker: backbone forward, then ``hidden_last @ lm_head[[no, yes]].T``."""

    def __init__(self, path: str, dtype: torch.dtype, device: str, batch_tokens: int):
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(path, **{dtype_kwarg(): dtype}).to(device).eval()
        self.head = lm.get_output_embeddings().weight.detach()[[NO_ID, YES_ID]].float()
        self.model, self.device, self.batch_tokens = lm.model, device, batch_tokens
        self.kernel, self.warmup = None, {"kernel": "padded", "compiled": False}

    @torch.inference_mode()
    def score_ids(self, rows: list[np.ndarray]) -> np.ndarray:
        out = []
        rows = sorted(rows, key=len)  # the stand-in does not restore the order: timing only
        i = 0
        while i < len(rows):
            per = max(1, self.batch_tokens // len(rows[min(len(rows) - 1, i + 63)]))
            chunk = rows[i : i + per]
            ids = np.zeros((len(chunk), max(len(r) for r in chunk)), dtype=np.int64)
            for j, r in enumerate(chunk):
                ids[j, : len(r)] = r
            hidden = self.model(input_ids=torch.from_numpy(ids).to(self.device), use_cache=False).last_hidden_state
            last = torch.tensor([len(r) - 1 for r in chunk], device=self.device)
            out.append(torch.softmax(hidden[torch.arange(len(chunk)), last].float() @ self.head.T, dim=-1)[:, 1])
            i += per
        return torch.cat(out).cpu().numpy()


def _rerank_case(name: str, rr, pairs: list[np.ndarray], info: dict, peak, args) -> dict:
    rr.score_ids(pairs[: min(len(pairs), 256)])
    stats0 = (rr.stats.tokens, rr.stats.padded_tokens) if hasattr(rr, "stats") else None
    done, scores, secs = timed_run(rr.score_ids, pairs, args.rows_per_call, args.cap_s)
    lens = np.array([len(x) for x in pairs[:done]])
    eff = (rr.stats.tokens - stats0[0]) / max(1, rr.stats.padded_tokens - stats0[1]) if stats0 else float("nan")
    r = {
        "case": name,
        "rows": done,
        "mean_len": float(lens.mean()),
        "tok_s": float(lens.sum() / secs),
        "flops_s": useful_flops(lens, info) / secs,
        "pad_eff": eff,
        "score_range": [float(scores.min()), float(scores.max())],
    }
    log(
        f"[rerank {name}] {r['tok_s']:.0f} tok/s MFU {fmt_mfu(r['flops_s'], peak).strip()} ({done} pairs, mean "
        f"{r['mean_len']:.0f} tokens, {secs:.1f}s, pad eff {eff:.3f}; scores in [{scores.min():.3f}, "
        f"{scores.max():.3f}])"
    )
    return r


def _packing_check(rr, rr_dir: str, dtype, device: str, rows: list[np.ndarray], cls, args) -> dict:
    padded = cls(
        rr_dir,
        device=device,
        dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
        batch_tokens=args.batch_tokens,
        packing="off",
        compile=False,
        tokenizer=False,
    )
    sample = rows[: min(len(rows), 2000)]
    diff = np.abs(rr.score_ids(sample) - padded.score_ids(sample))
    out = {"rows": len(sample), "kernel": rr.kernel, "max_abs_diff": float(diff.max()), "mean": float(diff.mean())}
    log(
        f"[rerank packing check] {rr.kernel} vs padded SDPA (eager) on {len(sample)} mixed rows: max |score diff| "
        f"{out['max_abs_diff']:.2e}, mean {out['mean']:.2e}"
    )
    del padded
    free_memory()
    return out


def run_rerank(rr_dir, arch, dtype, device, rng, peak, args, reranker_cls, import_error) -> dict:
    """tokens/s and MFU of the reranker (or the two-row stand-in) on uniform and long-tail pairs."""
    info = make_model_dir(rr_dir, arch, causal_lm=True, dtype=dtype, device=device, seed=args.seed + 1)
    impl = "operators.reranker.Reranker"
    try:
        if reranker_cls is None:
            raise RuntimeError(import_error)
        rr = reranker_cls(
            rr_dir,
            device=device,
            dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
            batch_tokens=args.batch_tokens,
            compile=args.compile,
            packing=args.packing,
            tokenizer=False,
        )
        # The prompt's ids come from the directory's stand-in tokenizer, loaded on first use.
        prefix, suffix = np.asarray(rr.prefix_ids, np.int32), np.asarray(rr.suffix_ids, np.int32)
    except Exception as e:  # the optional import, or a constructor that does not accept the stand-in
        log(f"reranker: operators.reranker unusable ({e}); timing the two-row head stand-in instead")
        impl, reranker_cls = "stand-in: backbone + two-row head", None
        rr = TwoRowReranker(rr_dir, dtype, device, args.batch_tokens or (65536 if device == "cuda" else 8192))
        prefix, suffix = np.zeros(0, np.int32), np.zeros(0, np.int32)
    log(f"reranker: {impl}, {rr.warmup}")
    extra = len(prefix) + len(suffix)
    n = max(REF_BATCH, args.tokens // args.rerank_len)
    uniform = [np.concatenate([prefix, b, suffix]) for b in fixed_rows(rng, n, max(1, args.rerank_len - extra))]
    cap = 512 if args.cpu_smoke else 4096
    bodies = mixed_rows(rng, args.tokens // 4, 150.0, 1.0, cap - extra)
    mix = [np.concatenate([prefix, b, suffix]) for b in bodies]
    out = {"impl": impl, "warmup": getattr(rr, "warmup", None), "cases": [], "packing_check": None}
    for name, pairs in ((str(args.rerank_len), uniform), ("mix150", mix)):
        try:
            out["cases"].append(_rerank_case(name, rr, pairs, info, peak, args))
        except Exception as e:
            log(f"[rerank {name}] FAILED: {type(e).__name__}: {str(e)[:300]}")
            free_memory()
    if reranker_cls is not None and rr.kernel is not None:
        try:
            out["packing_check"] = _packing_check(rr, rr_dir, dtype, device, mix, reranker_cls, args)
        except Exception as e:
            log(f"[rerank packing check] FAILED: {type(e).__name__}: {str(e)[:300]}")
    del rr
    free_memory()
    return out
