#!/usr/bin/env bash
# Issue 14: the engines' graph decode with two launches fewer per layer and step: the queries converted
# by gs_meta's extra CTAs (no q_to_f32 launch) and every stage's store in one gs_store_stages launch.
# 1. tests/gpu/test_shim_gpu.py (graph replay == eager == host metadata, with both top-k kernels).
# 2. `bench-gpu-model --engine-graph` at 128K and 1M batch 1 (twice), then 128K batch 16.
# 3. `gpu-test --engine-only`, then `--step-only` if time is left.
# Per-step table by tests/gpu/model_steps.py. Logs in $OUT/all.tgz, the summary on stdout.
#   here:  bash scripts/gpu-check.sh      (gpu-bin/)
#   there: run(command="BUDGET=420 bash tests/gpu/engine-merge-run.sh", carry=["gpu-bin"], kind="nvidia-h200", timeout_s=450)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT/logs"; L="$OUT/logs"
source tests/gpu/device-env.sh
T0=$(date +%s); left() { echo $(( ${BUDGET:-420} - ($(date +%s) - T0) )); }
at() { echo "$1: rc=$2 at $(( $(date +%s) - T0 )) s" >> "$L/device.txt"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u; uptime; nproc; } > "$L/device.txt"
INFINITEHIP_LIB="$PWD/gpu-bin/libinfinitehip.so" timeout 150 python3 tests/gpu/test_shim_gpu.py \
  > "$L/shim-gpu.log" 2>&1; at shim-gpu $?
timeout 40 python3 scripts/sdpa_bench.py --tokens 1048576 --batch 1 --reps 3 --prefill-tokens '' \
  --model-tokens 131072,1048576 --model-batch 1 --json "$L/sdpa.json" > "$L/sdpa.log" 2>&1; at sdpa $?
for n in 1 2; do
  timeout 120 gpu-bin/infinitehip bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 \
    --baseline "$L/sdpa.json" --decode-stage0 search --engine-graph --json "$L/model-engine-$n.json" \
    > "$L/model-engine-$n.log" 2>&1; at "model engine $n" $?
done
timeout 60 gpu-bin/infinitehip bench-gpu-model --tokens 131072 --batch 16 --reps 3 --decode-stage0 search \
  --engine-graph --json "$L/model-engine-b16.json" > "$L/model-engine-b16.log" 2>&1; at "model engine b16" $?
t=$(( $(left) - 5 )); [ $t -gt 150 ] && t=150
[ $t -gt 30 ] && { timeout $t gpu-bin/infinitehip gpu-test --engine-only > "$L/engine-check.log" 2>&1; at engine-check $?; }
t=$(( $(left) - 5 )); [ $t -gt 150 ] && t=150
[ $t -gt 30 ] && { timeout $t gpu-bin/infinitehip gpu-test --step-only > "$L/step-check.log" 2>&1; at step-check $?; }
python3 tests/gpu/model_steps.py "$L"/model-*.json | grep -E "^\| run|^\|---|engine graph|host"
for f in step-check engine-check; do
  [ -f "$L/$f.log" ] && { echo "-- $f: $(grep -c '^PASS' "$L/$f.log") PASS, $(grep -c '^FAIL' "$L/$f.log") FAIL"; \
    grep '^FAIL' "$L/$f.log" | cut -c1-400; tail -1 "$L/$f.log"; }
done
grep -E "FAIL|graph decode|timing" "$L/shim-gpu.log" | cut -c1-300; tail -1 "$L/shim-gpu.log"
cat "$L/device.txt"
tar czf "$OUT/all.tgz" -C "$OUT" logs && rm -rf "$L"
