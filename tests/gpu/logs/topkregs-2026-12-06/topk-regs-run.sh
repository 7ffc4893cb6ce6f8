#!/usr/bin/env bash
# Issue 14: the top-k kernels (hip_topk, hip_topk_mc) with their keys staged in shared memory once
# (kernels/hip_mask.cu TOPK_STAGE) and hip_score_mean's one load round. 1. `gpu-test --step-only` (top-k,
# device / host steps and mean_key vs the CPU policy). 2. the 32-layer step, 128K and 1M, batch 1, mean_key
# and search at the default intervals, one SDPA baseline (twice). 3. `gpu-test --engine-only` if time is left.
# Logs in $OUT/all.tgz, the summary on stdout.
#   here:  bash scripts/gpu-check.sh      (gpu-bin/)
#   there: run(command="BUDGET=300 bash tests/gpu/topk-run.sh", carry=["gpu-bin"], timeout_s=330)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT/logs"; L="$OUT/logs"
source tests/gpu/device-env.sh
T0=$(date +%s); left() { echo $(( ${BUDGET:-300} - ($(date +%s) - T0) )); }
at() { echo "$1: rc=$2 at $(( $(date +%s) - T0 )) s" >> "$L/device.txt"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u; uptime; } > "$L/device.txt"
timeout 150 gpu-bin/infinitehip gpu-test --step-only > "$L/step-check.log" 2>&1; at step-check $?
timeout 40 python3 scripts/sdpa_bench.py --tokens 1048576 --batch 1 --reps 3 --prefill-tokens '' \
  --model-tokens 131072,1048576 --model-batch 1 --json "$L/sdpa.json" > "$L/sdpa.log" 2>&1; at sdpa $?
for run in mean_key:1 search:1 mean_key:2 search:2; do
  m=${run%%:*}
  timeout 60 gpu-bin/infinitehip bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 \
    --baseline "$L/sdpa.json" --decode-stage0 $m --json "$L/model-$m-${run#*:}.json" \
    > "$L/model-$m-${run#*:}.log" 2>&1; at "model $run" $?
done
t=$(( $(left) - 5 )); [ $t -gt 150 ] && t=150
[ $t -gt 20 ] && { timeout $t gpu-bin/infinitehip gpu-test --engine-only > "$L/engine-check.log" 2>&1; at engine-check $?; }
for f in step-check engine-check; do
  [ -f "$L/$f.log" ] && { echo "-- $f: $(grep -c '^PASS' "$L/$f.log") PASS, $(grep -c '^FAIL' "$L/$f.log") FAIL"; \
    grep '^FAIL' "$L/$f.log" | cut -c1-600; tail -1 "$L/$f.log"; }
done
for f in "$L"/model-*.log; do
  echo "== $f"; grep -E "^\| (score s0|topk s0|score s1|topk s1|score s2|topk s2|assemble) " "$f" | sed -n '8,14p'
  grep -B1 -A5 "^| path" "$f" | grep -E "host metadata|CUDA graph"
  grep -E "^\| (131072|1048576) \| 1 " "$f" | cut -c1-200
done
cat "$L/device.txt"
tar czf "$OUT/all.tgz" -C "$OUT" logs && rm -rf "$L"
