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
  echo "== bench_gpu.py $*"
  "$PY" benchmarks/bench_gpu.py "$@"
}

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  run "$@" 2>&1 | tee "$OUT/gpu_check.log"
else
  run "$@"
fi
