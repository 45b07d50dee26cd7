#!/usr/bin/env bash
# GPU check: environment, then benchmarks/bench_gpu.py (embedder vs the official procedure, MFU, reranker, 4B/8B) and
# benchmarks/bench_tokenizer.py (the tokenizer's tokens/s per CPU core). About 8 minutes on an H100/H200 with every
# section. Needs torch + transformers (+ numpy, pyarrow, fsspec, safetensors, tokenizers); no ray, no network.
#
#   benchmarks/gpu_check.sh                          # every section
#   SECTIONS="embed rerank" benchmarks/gpu_check.sh  # some: embed padded rerank big tokenizer
#   benchmarks/gpu_check.sh --lengths 512            # arguments given: one bench_gpu.py run with them
#   OUT=/some/dir benchmarks/gpu_check.sh            # also writes $OUT/gpu_check.log
#   TOKENIZER_JSON=/path/tokenizer.json benchmarks/gpu_check.sh   # the tokenizer section without dashscope
#
# The tokenizer section needs the real Qwen vocabulary: the dashscope package (as the tests), or a Qwen tokenizer.json
# in $TOKENIZER_JSON (default .gpu/qwen-tokenizer.json; bench_tokenizer.py --save-tokenizer PATH writes one). Without
# either it is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
SECTIONS=${SECTIONS:-embed padded rerank big tokenizer}
TOKENIZER_JSON=${TOKENIZER_JSON:-.gpu/qwen-tokenizer.json}

has() { [[ " $SECTIONS " == *" $1 "* ]]; }

run() {
  echo "== nvidia-smi -L"
  nvidia-smi -L || echo "(nvidia-smi unavailable)"
  echo "== versions"
  "$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("transformers", transformers.__version__)'
  echo "== cpu: $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
  if [[ $# -gt 0 ]]; then
    echo "== bench_gpu.py $*"
    "$PY" benchmarks/bench_gpu.py "$@"
    return
  fi
  if has embed; then
    # The default path (packing auto, compiled) against the reference at 128, 512, 2048 tokens and the long-tail mix.
    echo "== embed: bench_gpu.py (default path: packing auto, compiled) with the reference"
    "$PY" benchmarks/bench_gpu.py --no-rerank --tokens 1048576 --cap-s 8
  fi
  if has padded; then
    # Padded at a uniform length, compiled: the default (packed) path must be no slower there.
    echo "== padded: bench_gpu.py --packing off (compiled), 512 tokens"
    "$PY" benchmarks/bench_gpu.py --packing off --no-ref --no-rerank --no-mix --lengths 512 --tokens 2097152 --cap-s 8
  fi
  if has rerank; then
    echo "== rerank: default path (packing auto, compiled), pairs of 512 tokens and the long-tail mix"
    "$PY" benchmarks/bench_gpu.py --no-embed --tokens 1048576 --cap-s 8
    echo "== rerank: padded, eager (the path before packing and compile)"
    "$PY" benchmarks/bench_gpu.py --no-embed --packing off --no-compile --tokens 1048576 --cap-s 8
  fi
  if has big; then
    for arch in 4B 8B; do
      echo "== big: $arch embedder at 512 tokens (default path), ours only"
      "$PY" benchmarks/bench_gpu.py --arch "$arch" --no-ref --no-rerank --no-mix --lengths 512 --tokens 1048576 \
        --cap-s 8 --budget-s 150
    done
  fi
  if has tokenizer; then
    echo "== tokenizer: tokens/s per CPU core on the long-tail corpus"
    if [[ -f "$TOKENIZER_JSON" ]]; then
      "$PY" benchmarks/bench_tokenizer.py --docs 2000 --procs "1,2,4,8" --tokenizer-json "$TOKENIZER_JSON"
    elif "$PY" -c 'import importlib.metadata as m; m.distribution("dashscope")' 2>/dev/null; then
      "$PY" benchmarks/bench_tokenizer.py --docs 2000 --procs "1,2,4,8"
    else
      echo "(skipped: neither dashscope nor $TOKENIZER_JSON for the Qwen vocabulary)"
    fi
  fi
}

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  run "$@" 2>&1 | tee "$OUT/gpu_check.log"
else
  run "$@"
fi
