#!/usr/bin/env bash
# Refresh a vector store from cron (or by hand) with a plain `ray job submit` to a running Ray cluster.
#
#   RAY_ADDRESS=http://ray-head:8265 \
#   INPUT=s3://my-bucket/corpus/ OUTPUT=s3://my-bucket/vectors/qwen3-embedding-0.6b/ KEEP=7 \
#       cluster/refresh.sh [extra rayembed embed flags ...]   # e.g. --passthrough url,lang --max-delete-ratio 0.2
#
#   crontab:  0 2 * * *  cd /srv/rayembed && RAY_ADDRESS=http://ray-head:8265 INPUT=... OUTPUT=... KEEP=7 \
#                        cluster/refresh.sh >> /var/log/rayembed-refresh.log 2>&1
#
# OUTPUT_MODE=fixed (default): every run is the same `rayembed embed` command on the same prefix OUTPUT, which makes
#   every run after the first a refresh (README, "Scheduled refresh"). Changes are found per document, not per file:
#   the input's rows are matched with the latest version's by id across the whole corpus, so a Spark export that
#   renames, splits or merges its shards every night still only sends new and changed texts to the model; the
#   others keep their vectors (copied), ids gone from the input are deleted (refused above --max-delete-ratio,
#   default 0.5, with nothing committed), and an unchanged input commits nothing. Each run that changed something
#   commits one immutable version: OUTPUT/_versions/<N>.json, its upserts and deletes under OUTPUT/_deltas/<N>/, and
#   OUTPUT/_manifest.json (written last) for the latest one. Old versions' files stay until vacuum removes them; read
#   a version with `rayembed files OUTPUT [--version N]`, never a glob over data/. A run killed half-way leaves the
#   previous version the latest; the next run finishes the new one.
# OUTPUT_MODE=dated: every run writes a full backfill to its own prefix OUTPUT/YYYY-MM-DD/ (a rerun on the same day
#   resumes it). Each one embeds the whole corpus and shares no file with the others; fixed mode with KEEP gives the
#   same dated, readable snapshots (one version per night) for the cost of what changed.
# KEEP=K (optional, fixed mode): after a successful refresh, a second `ray job submit` runs
#   `rayembed vacuum OUTPUT --keep K` on the cluster: it deletes the data, error and delta files that none of the
#   latest K versions references, and the leftovers of interrupted runs. It runs only when the refresh succeeded,
#   after its lease was released and under this script's lock (a separate cron line could fire during a refresh,
#   where vacuum refuses), and on the cluster, which has the storage credentials this machine need not have. A
#   store kept current with `rayembed sync` must sync at least once per K refreshes, so choose K above the longest
#   gap between two syncs. Unset: nothing is vacuumed and every version stays readable.
# STORAGE_OPTIONS (optional): fsspec JSON given to both jobs as --storage-options (an endpoint, never keys).
# MODEL, CONCURRENCY, NUM_GPUS: below. Other embed flags (--passthrough, --max-delete-ratio, ...) go after the script.
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
# Exit status: that of `ray job submit`, which waits for the job and fails when the job fails; with KEEP, that of the
# vacuum job after a successful refresh (a failed vacuum leaves the committed version as it is).
set -euo pipefail

: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard (job API) of the cluster, e.g. http://ray-head:8265}"
: "${INPUT:?set INPUT to the input shards, e.g. s3://my-bucket/corpus/}"
: "${OUTPUT:?set OUTPUT to the output prefix, e.g. s3://my-bucket/vectors/qwen3-embedding-0.6b/}"
MODEL="${MODEL:-Qwen/Qwen3-Embedding-0.6B}"
CONCURRENCY="${CONCURRENCY:-1,16}"   # model actors MIN,MAX; the autoscaler adds GPU nodes up to MAX actors
NUM_GPUS="${NUM_GPUS:-1}"            # GPUs per actor
OUTPUT_MODE="${OUTPUT_MODE:-fixed}"  # fixed | dated
KEEP="${KEEP:-}"                     # vacuum to the latest KEEP versions after a successful refresh (fixed mode)
STORAGE_OPTIONS="${STORAGE_OPTIONS:-}"  # fsspec JSON for both jobs, e.g. {"endpoint_url": "http://minio:9000"}; no keys
storage=()
[[ -z "$STORAGE_OPTIONS" ]] || storage=(--storage-options "$STORAGE_OPTIONS")

case "$OUTPUT_MODE" in
  fixed) out="$OUTPUT" ;;
  dated) out="${OUTPUT%/}/$(date -u +%F)/" ;;
  *) echo "refresh.sh: OUTPUT_MODE must be fixed or dated, got '$OUTPUT_MODE'" >&2; exit 2 ;;
esac
if [[ -n "$KEEP" ]]; then
  if ! [[ "$KEEP" =~ ^[1-9][0-9]*$ ]]; then
    echo "refresh.sh: KEEP must be an integer >= 1 (versions to keep), got '$KEEP'" >&2; exit 2
  fi
  if [[ "$OUTPUT_MODE" != fixed ]]; then
    echo "refresh.sh: KEEP needs OUTPUT_MODE=fixed (a dated prefix holds one version)" >&2; exit 2
  fi
fi

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
runtime_env='{"excludes": ["tests/", "benchmarks/", "examples/", ".git/"]}'
echo "refresh.sh: submitting $submission_id to $RAY_ADDRESS: $INPUT -> $out" >&2
ray job submit \
  --address "$RAY_ADDRESS" \
  --submission-id "$submission_id" \
  --working-dir "$repo" \
  --runtime-env-json "$runtime_env" \
  -- python -m pipelines.embed \
  --input "$INPUT" \
  --output "$out" \
  --model "$MODEL" \
  --concurrency "$CONCURRENCY" \
  --num-gpus "$NUM_GPUS" \
  ${storage[@]+"${storage[@]}"} \
  -q \
  "$@"
# set -e: a failed refresh ends the script here, with the job's status; nothing is vacuumed.

[[ -n "$KEEP" ]] || exit 0
echo "refresh.sh: submitting $submission_id-vacuum: rayembed vacuum $out --keep $KEEP" >&2
exec ray job submit \
  --address "$RAY_ADDRESS" \
  --submission-id "$submission_id-vacuum" \
  --working-dir "$repo" \
  --runtime-env-json "$runtime_env" \
  -- python -m pipelines.cli vacuum "$out" --keep "$KEEP" ${storage[@]+"${storage[@]}"}
