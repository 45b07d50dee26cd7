#!/usr/bin/env bash
# Refresh a vector store from cron (or by hand) with a plain `ray job submit` to a running Ray cluster.
#
#   RAY_ADDRESS=http://ray-head:8265 \
#   INPUT=s3://my-bucket/corpus/ OUTPUT=s3://my-bucket/vectors/qwen3-embedding-0.6b/ \
#       cluster/refresh.sh [extra rayembed flags ...]
#
#   crontab:  0 2 * * *  cd /srv/rayembed && RAY_ADDRESS=http://ray-head:8265 INPUT=... OUTPUT=... \
#                        cluster/refresh.sh >> /var/log/rayembed-refresh.log 2>&1
#
# OUTPUT_MODE=fixed (default): every run writes to the same prefix OUTPUT. Shards already committed with the same
#   input fingerprint (size + ETag/mtime) are skipped; new shards and changed ones are embedded again and their old
#   parts replaced; _manifest.json (written last) lists the current files. A nightly run costs what changed.
# OUTPUT_MODE=dated: every run writes a full snapshot to OUTPUT/YYYY-MM-DD/ (a rerun on the same day resumes it).
#
# The repository (this script's parent directory) is uploaded as the job's working dir; files matched by .gitignore
# (.venv/, caches) are left out, and so are tests/, benchmarks/ and examples/. The cluster's nodes need the
# project's dependencies installed (cluster/aws-gpu-cluster.yaml and cluster/Dockerfile do that).
#
# Authentication: Ray >= 2.52 heads started by `ray start` / `ray up` require a token by default. The token is read
# from RAY_AUTH_TOKEN, or from the file ~/.ray/auth_token (RAY_AUTH_TOKEN_PATH to point elsewhere); copy it from the
# head (`ray get-auth-token` there). Clients send it only with RAY_AUTH_MODE=token, which this script sets when a
# token is present (export RAY_AUTH_MODE=disabled to skip). Never put the token or AWS keys into this file or on the
# command line: the job's workers use their instance role or their own environment.
#
# Exit status: that of `ray job submit`, which waits for the job and fails when the job fails.
set -euo pipefail

: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard (job API) of the cluster, e.g. http://ray-head:8265}"
: "${INPUT:?set INPUT to the input shards, e.g. s3://my-bucket/corpus/}"
: "${OUTPUT:?set OUTPUT to the output prefix, e.g. s3://my-bucket/vectors/qwen3-embedding-0.6b/}"
MODEL="${MODEL:-Qwen/Qwen3-Embedding-0.6B}"
CONCURRENCY="${CONCURRENCY:-1,16}"   # model actors MIN,MAX; the autoscaler adds GPU nodes up to MAX actors
NUM_GPUS="${NUM_GPUS:-1}"            # GPUs per actor
OUTPUT_MODE="${OUTPUT_MODE:-fixed}"  # fixed | dated

case "$OUTPUT_MODE" in
  fixed) out="$OUTPUT" ;;
  dated) out="${OUTPUT%/}/$(date -u +%F)/" ;;
  *) echo "refresh.sh: OUTPUT_MODE must be fixed or dated, got '$OUTPUT_MODE'" >&2; exit 2 ;;
esac

if [[ -z "${RAY_AUTH_MODE:-}" ]] && { [[ -n "${RAY_AUTH_TOKEN:-}" ]] \
    || [[ -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]; }; then
  export RAY_AUTH_MODE=token
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# One refresh at a time per output prefix on this machine (cron can fire while last night's run is still going).
lock="${TMPDIR:-/tmp}/rayembed-refresh-$(printf '%s' "$out" | cksum | cut -d' ' -f1).lock"
exec 9>"$lock"
if command -v flock >/dev/null && ! flock -n 9; then
  echo "refresh.sh: a refresh of $out is already running (lock $lock); nothing to do" >&2
  exit 0
fi

submission_id="rayembed-refresh-$(date -u +%Y%m%dT%H%M%SZ)"
echo "refresh.sh: submitting $submission_id to $RAY_ADDRESS: $INPUT -> $out" >&2
exec ray job submit \
  --address "$RAY_ADDRESS" \
  --submission-id "$submission_id" \
  --working-dir "$repo" \
  --runtime-env-json '{"excludes": ["tests/", "benchmarks/", "examples/", ".git/"]}' \
  -- python -m pipelines.embed \
  --input "$INPUT" \
  --output "$out" \
  --model "$MODEL" \
  --concurrency "$CONCURRENCY" \
  --num-gpus "$NUM_GPUS" \
  -q \
  "$@"
