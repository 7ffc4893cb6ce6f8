#!/usr/bin/env bash
# Issue 14: the refresh-step changes as they land (hip_scorea for the stages' sub-chunks of <= 8 tokens
# only: at 16 tokens it read 16.8 MB and lost 0.7 us a launch on the H100; hip_topk_asm; hip_score_meanw).
# 1. `gpu-test --step-only`. 2. the 32-layer step at 128K and 1M, batch 1, mean_key, default intervals:
# new / all three off / hip_scorea up to 16 tokens (INFINITEHIP_SCOREA_MAX_C=16) / new again; then SGLang's
# CUDA-graph route (`--engine-graph`, search stage 0) with and without hip_scorea. 3. `gpu-test
# --engine-only` and the shim graph test. Per-step table by tests/gpu/model_steps.py. Logs in
# $OUT/all.tgz, the summary on stdout.
#   here:  bash scripts/gpu-check.sh      (gpu-bin/)
#   there: run(command="BUDGET=420 bash tests/gpu/scorea8-run.sh", carry=["gpu-bin"], kind="nvidia-h200", timeout_s=450)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT/logs"; L="$OUT/logs"
source tests/gpu/device-env.sh
T0=$(date +%s); left() { echo $(( ${BUDGET:-420} - ($(date +%s) - T0) )); }
at() { echo "$1: rc=$2 at $(( $(date +%s) - T0 )) s" >> "$L/device.txt"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u; uptime; nproc; } > "$L/device.txt"
timeout 150 gpu-bin/infinitehip gpu-test --step-only > "$L/step-check.log" 2>&1; at step-check $?
timeout 40 python3 scripts/sdpa_bench.py --tokens 1048576 --batch 1 --reps 3 --prefill-tokens '' \
  --model-tokens 131072,1048576 --model-batch 1 --json "$L/sdpa.json" > "$L/sdpa.log" 2>&1; at sdpa $?
P="INFINITEHIP_SCORE_ALLROWS=0 INFINITEHIP_TOPK_ASM=0 INFINITEHIP_MEAN_WARP=0"
for v in "new|mean_key||" "prev|mean_key|$P|" "scorea16|mean_key|INFINITEHIP_SCOREA_MAX_C=16|" "new2|mean_key||" \
         "eg-new|search||--engine-graph" "eg-prev|search|INFINITEHIP_SCORE_ALLROWS=0|--engine-graph"; do
  IFS='|' read -r n s0 envs extra <<< "$v"
  env $envs timeout 90 gpu-bin/infinitehip bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 \
    --baseline "$L/sdpa.json" --decode-stage0 "$s0" $extra --json "$L/model-$n.json" > "$L/model-$n.log" 2>&1
  at "model $n" $?
done
t=$(( $(left) - 40 )); [ $t -gt 150 ] && t=150
[ $t -gt 30 ] && { timeout $t gpu-bin/infinitehip gpu-test --engine-only > "$L/engine-check.log" 2>&1; at engine-check $?; }
t=$(( $(left) - 5 ))
[ $t -gt 20 ] && { INFINITEHIP_LIB="$PWD/gpu-bin/libinfinitehip.so" timeout $t python3 tests/gpu/test_shim_gpu.py \
  > "$L/shim-gpu.log" 2>&1; at shim-gpu $?; }
python3 tests/gpu/model_steps.py "$L"/model-*.json
for n in new prev scorea16; do echo "== $n"; grep -E "^\| (score|topk|assemble|attn|hip)" "$L/model-$n.log"; \
  grep -A4 "hip layer profile, 1048576" "$L/model-$n.log" | grep host; grep -o "host enqueue[^;]*: [0-9.]* us" "$L/model-$n.log"; done
for f in step-check engine-check; do
  [ -f "$L/$f.log" ] && { echo "-- $f: $(grep -c '^PASS' "$L/$f.log") PASS, $(grep -c '^FAIL' "$L/$f.log") FAIL"; \
    grep '^FAIL' "$L/$f.log" | cut -c1-600; tail -1 "$L/$f.log"; }
done
[ -f "$L/shim-gpu.log" ] && { grep -E "FAIL|timing" "$L/shim-gpu.log" | cut -c1-300; tail -1 "$L/shim-gpu.log"; }
cat "$L/device.txt"
tar czf "$OUT/all.tgz" -C "$OUT" logs && rm -rf "$L"
