#!/usr/bin/env bash
# Issue 14: stage top-k (and, on host steps, the last stage's assemble) fused into the warp scoring
# launch (dispatch.rs FuseCtx / kernels/hip_mask.cu stage_fuse_tail), and hip_score_mean's row loads
# all in flight.
# 1. gpu-test --step-only: every hip check with the fused tails the default (host steps, device
#    steps, graph replays), plus hip_fuse_case (fused via hip_scorew4 and hip_scorewp at stage 0 of
#    40K tokens, and separate launches, each == the CPU HipPolicy).
# 2. bench-gpu-model at 128K and 1M, batch 1, one SDPA baseline: mean_key and search at 16,8,4,
#    fused (default) and INFINITEHIP_FUSE_TOPK=0 (separate launches), same call.
# 3. While time is left: gpu-test --engine-only --policies-only (GpuAttention's host step fuses
#    too), then the Python shim's GPU tests (SGLang's CUDA-graph path fuses the top-k).
#   here:  bash scripts/gpu-check.sh      (gpu-bin/)
#   there: run(command="BUDGET=480 bash tests/gpu/fuse-run.sh", carry=["gpu-bin"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT"
source tests/gpu/device-env.sh
export INFINITEHIP_FUSE_TOPK=1  # the fused tails, whether or not they are the default yet
T0=$(date +%s); left() { echo $(( ${BUDGET:-480} - ($(date +%s) - T0) )); }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u; } > "$OUT/device.txt"
timeout 200 gpu-bin/infinitehip gpu-test --step-only > "$OUT/step-check.log" 2>&1
echo "step-check: rc=$? at $(( $(date +%s) - T0 )) s" >> "$OUT/device.txt"
timeout 60 python3 scripts/sdpa_bench.py --tokens 1048576 --batch 1 --reps 3 --prefill-tokens '' \
  --model-tokens 131072,1048576 --model-batch 1 --json /tmp/sdpa.json > /tmp/sdpa.log 2>&1
echo "sdpa: rc=$? at $(( $(date +%s) - T0 )) s" >> "$OUT/device.txt"; cat /tmp/sdpa.log >> "$OUT/device.txt"
for run in mean_key-fused mean_key-apart search-fused search-apart; do
  [ "$(left)" -gt 30 ] || break
  m=${run%%-*} f=${run#*-}
  fz=1; [ "$f" = apart ] && fz=0
  INFINITEHIP_FUSE_TOPK=$fz timeout 60 gpu-bin/infinitehip bench-gpu-model --tokens 131072,1048576 --batch 1 \
    --reps 3 --baseline /tmp/sdpa.json --decode-stage0 $m > "$OUT/model-$run.log" 2>&1
  echo "$run: rc=$? at $(( $(date +%s) - T0 )) s" >> "$OUT/device.txt"
done
if [ "$(left)" -gt 40 ]; then
  timeout $(( $(left) - 20 < 120 ? $(left) - 20 : 120 )) gpu-bin/infinitehip gpu-test --engine-only --policies-only \
    > "$OUT/engine-check.log" 2>&1
  echo "engine-check: rc=$? at $(( $(date +%s) - T0 )) s" >> "$OUT/device.txt"
fi
if [ "$(left)" -gt 40 ]; then
  INFINITEHIP_LIB="$PWD/gpu-bin/libinfinitehip.so" timeout $(( $(left) - 10 )) python3 tests/gpu/test_shim_gpu.py \
    > "$OUT/shim-gpu.log" 2>&1
  echo "shim-gpu: rc=$? at $(( $(date +%s) - T0 )) s" >> "$OUT/device.txt"
fi
echo "-- step-check: $(grep -c '^PASS' "$OUT/step-check.log") PASS, $(grep -c '^FAIL' "$OUT/step-check.log") FAIL"
grep '^FAIL' "$OUT/step-check.log" | cut -c1-1500; grep -E 'top-k (fused|launched)' "$OUT/step-check.log" | cut -c1-400
tail -1 "$OUT/step-check.log"
[ -f "$OUT/engine-check.log" ] && { grep '^FAIL' "$OUT/engine-check.log" | cut -c1-1500; tail -1 "$OUT/engine-check.log"; }
[ -f "$OUT/shim-gpu.log" ] && tail -4 "$OUT/shim-gpu.log"
for f in "$OUT"/model-*.log; do
  [ -f "$f" ] && { echo "== $f"; grep -v '^{' "$f" | sed -n '/1048576 tokens x batch 1, tune/,$p' | cut -c1-330 | head -32; }
done
cat "$OUT/device.txt"
