#!/usr/bin/env bash
# Issue 14: the hip sparse attention's split merge through a thread-block cluster (`INFINITEHIP_SPARSE_CLUSTER`,
# default on at batch 1 on compute capability 9.0+) vs the split path (global partials, arrival counter,
# last-CTA merge). 1. `bench-gpu-sparse --probe` (cluster / split rows, same call). 2. `gpu-test --step-only`
# (sparse cases on both paths vs f64, step twins, CPU policy twins). 3. the 32-layer step, 128K and 1M,
# batch 1, mean_key: cluster / split / cluster / split, one SDPA baseline. 4. `gpu-test --engine-only`.
# 5. tests/gpu/test_shim_gpu.py (SGLang-style graph capture / replay == eager).
# Logs in $OUT/all.tgz (the device returns at most 8 files), the summary on stdout.
#   here:  bash scripts/gpu-check.sh      (gpu-bin/)
#   there: run(command="BUDGET=480 bash tests/gpu/cluster-run.sh", carry=["gpu-bin"], timeout_s=510)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT/logs"; L="$OUT/logs"
source tests/gpu/device-env.sh
T0=$(date +%s); left() { echo $(( ${BUDGET:-480} - ($(date +%s) - T0) )); }
at() { echo "$1: rc=$2 at $(( $(date +%s) - T0 )) s" >> "$L/device.txt"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u; uptime; } > "$L/device.txt"
timeout 200 gpu-bin/infinitehip bench-gpu-sparse --probe --tokens 1M --reps 30 --json "$L/probe.json" > "$L/probe.log" 2>&1
at probe $?
timeout 120 gpu-bin/infinitehip gpu-test --step-only > "$L/step-check.log" 2>&1; at step-check $?
timeout 40 python3 scripts/sdpa_bench.py --tokens 1048576 --batch 1 --reps 3 --prefill-tokens '' \
  --model-tokens 131072,1048576 --model-batch 1 --json "$L/sdpa.json" > "$L/sdpa.log" 2>&1; at sdpa $?
for run in cl1 split1 cl2 split2; do
  v=1; [ "${run#split}" != "$run" ] && v=0
  INFINITEHIP_SPARSE_CLUSTER=$v timeout 60 gpu-bin/infinitehip bench-gpu-model \
    --tokens 131072,1048576 --batch 1 --reps 3 --baseline "$L/sdpa.json" --decode-stage0 mean_key \
    --json "$L/model-$run.json" > "$L/model-$run.log" 2>&1; at "model $run" $?
done
t=$(( $(left) - 90 )); [ $t -gt 150 ] && t=150
[ $t -gt 20 ] && { timeout $t gpu-bin/infinitehip gpu-test --engine-only > "$L/engine-check.log" 2>&1; at engine-check $?; }
t=$(( $(left) - 5 ))
[ $t -gt 20 ] && { INFINITEHIP_LIB="$PWD/gpu-bin/libinfinitehip.so" timeout $t python3 tests/gpu/test_shim_gpu.py \
  > "$L/shim-gpu.log" 2>&1; at shim-gpu $?; }
grep -v '^{' "$L/probe.log" | grep -v "^| .* | [0-9.]* | [0-9]* CTAs" | head -60
for f in step-check engine-check; do
  [ -f "$L/$f.log" ] && { echo "-- $f: $(grep -c '^PASS' "$L/$f.log") PASS, $(grep -c '^FAIL' "$L/$f.log") FAIL"; \
    grep '^FAIL' "$L/$f.log" | cut -c1-600; grep 'cluster merge' "$L/$f.log" | cut -c1-400; tail -1 "$L/$f.log"; }
done
[ -f "$L/shim-gpu.log" ] && tail -3 "$L/shim-gpu.log"
for f in "$L"/model-*.log; do
  echo "== $f"; grep -B1 -A5 "^| path" "$f" | grep -E "host metadata|CUDA graph"
  grep -E "^\| (131072|1048576) \| 1 " "$f" | cut -c1-260
done
cat "$L/device.txt"
tar czf "$OUT/all.tgz" -C "$OUT" logs && rm -rf "$L"
