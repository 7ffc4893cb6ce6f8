#!/usr/bin/env bash
# Issue 14: the 32-layer decode step and the hip layer at 1M, batch 1, with the default refresh intervals
# (16,8,4) and upstream hip-attention's (v1_2 HiPAttentionConfig default 32,16,8; its SGLang usage examples
# for Llama-3.1-8B 96,24,8), one SDPA baseline, same call.
#   here:  bash scripts/gpu-check.sh      (gpu-bin/)
#   there: run(command="bash tests/gpu/refresh-run.sh", carry=["gpu-bin"], timeout_s=240)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT"
source tests/gpu/device-env.sh
T0=$(date +%s); left() { echo $(( ${BUDGET:-220} - ($(date +%s) - T0) )); }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u; } > "$OUT/device.txt"
timeout 70 python3 scripts/sdpa_bench.py --tokens 1048576 --batch 1 --reps 3 --prefill-tokens '' \
  --model-tokens 131072,1048576 --model-batch 1 --json "$OUT/sdpa.json" > "$OUT/sdpa.log" 2>&1
echo "sdpa: rc=$? at $(( $(date +%s) - T0 )) s" >> "$OUT/device.txt"
for r in 16,8,4 32,16,8 96,24,8; do
  [ "$(left)" -gt 30 ] || break
  t=$(( $(left) - 5 < 60 ? $(left) - 5 : 60 ))
  timeout $t gpu-bin/infinitehip bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 \
    --baseline "$OUT/sdpa.json" --refresh $r --json "$OUT/model-$r.json" > "$OUT/model-$r.log" 2>&1
  echo "refresh $r: rc=$? at $(( $(date +%s) - T0 )) s" >> "$OUT/device.txt"
done
for r in 16,8,4 32,16,8 96,24,8; do
  [ -f "$OUT/model-$r.log" ] && { echo "== refresh $r"; grep -E '^\|' "$OUT/model-$r.log" | head -8; grep -iE "hip layer|amortis" "$OUT/model-$r.log" | head -6; }
done
cat "$OUT/device.txt"
