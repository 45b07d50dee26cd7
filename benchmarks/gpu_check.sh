#!/usr/bin/env bash
# GPU check: environment, then benchmarks/bench_gpu.py (embedder vs the official procedure, MFU, reranker).
# Runs from any directory; arguments go to bench_gpu.py. With $OUT set, the whole log is also written to
# $OUT/gpu_check.log. Needs torch + transformers (+ numpy, pyarrow, fsspec, safetensors); no ray, no network.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python

run() {
  echo "== nvidia-smi -L"
  nvidia-smi -L || echo "(nvidia-smi unavailable)"
  echo "== versions"
  "$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("transformers", transformers.__version__)'
  if [[ $# -gt 0 ]]; then
    echo "== bench_gpu.py $*"
    "$PY" benchmarks/bench_gpu.py "$@"
    return
  fi
  # The default check, about 6 minutes: ours (packing auto, eager) against the reference at every length plus the
  # reranker; then 512 tokens compiled, and the padded path eager and compiled, ours only, for the comparison.
  echo "== bench_gpu.py (packing auto, eager, with the reference)"
  "$PY" benchmarks/bench_gpu.py --tokens 1048576 --cap-s 8
  echo "== bench_gpu.py --compile (packing auto)"
  "$PY" benchmarks/bench_gpu.py --compile --no-ref --no-rerank --lengths 512 --tokens 2097152 --cap-s 10
  echo "== bench_gpu.py --packing off (padded), eager and compiled"
  "$PY" benchmarks/bench_gpu.py --packing off --no-ref --no-rerank --no-mix --lengths 512 --tokens 1048576 --cap-s 8
  "$PY" benchmarks/bench_gpu.py --packing off --compile --no-ref --no-rerank --lengths 512 --tokens 2097152 --cap-s 10
}

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  run "$@" 2>&1 | tee "$OUT/gpu_check.log"
else
  run "$@"
fi
