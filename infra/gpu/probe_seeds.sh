#!/usr/bin/env bash
# bench/mixed_sampling_probe.py for seeds 0..N-1 side by side, each in its own project folder under $MOA_GPU_STAGE,
# then their metrics into $OUT/probe.tar.gz. Run through `run_flow.sh exec`, which stages the kit first:
#   bash infra/gpu/run_flow.sh exec bash infra/gpu/probe_seeds.sh gpu 3 420 [--generate]
# PROFILE N LIMIT are positional: give all three before any probe option (--generate). LIMIT (seconds) covers
# curate, training and evaluation; with --generate on the gpu profile three seeds took up to ~400 s on an H200.
set -uo pipefail
profile=${1:-gpu} n=${2:-3} limit=${3:-420}
shift $(( $# < 3 ? $# : 3 ))  # what is left goes to the probe's `run` (e.g. --generate)
STAGE=${MOA_GPU_STAGE:-${HOME:-/root}/moa-gpu}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
pids=()
for k in $(seq 0 $((n - 1))); do
  dir=$STAGE/probe-${profile//,/_}-seed-$k
  rm -rf "$dir" && mkdir -p "$dir" && cp "$ROOT/params.yaml" "$dir/"
  ( cd "$dir" && timeout --signal=INT --kill-after=15 "$limit" "${PYTHON:-python3}" "$ROOT/bench/mixed_sampling_probe.py" run \
      --params "$dir/params.yaml" --profile "$profile" --seed "$k" "$@" >"$OUT/probe-seed$k.log" 2>&1 ) &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
(cd "$STAGE" && find probe-*/metrics -type f | tar -czf "$OUT/probe.tar.gz" -T -)
echo "probe exit $rc"
exit $rc
