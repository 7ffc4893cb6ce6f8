#!/usr/bin/env bash
# Issue 14: hip decode stage 0 by cached chunk means (hip.decode_stage0 = mean_key).
# 1. gpu-test --step-only: with the new checks "hip device step ... [decode_stage0 mean_key]" (host steps,
#    eager device steps, graph replays, PDL vs plain twins, the jump past cached means) and "hip decode,
#    decode_stage0 mean_key == CPU HipPolicy ... then reset and new K/V" (the GPU keys equal the CPU twin's).
# 2. bench-gpu-model at 128K and 1M, batch 1: search vs mean_key at the default intervals (16,8,4), one
#    SDPA baseline, same call; then, while time is left, upstream hip-attention's intervals (32,16,8 and
#    96,24,8) with both (this subsumes tests/gpu/refresh-run.sh).
#   here:  bash scripts/gpu-check.sh      (gpu-bin/)
#   there: run(command="BUDGET=560 bash tests/gpu/meankey-run.sh", carry=["gpu-bin"], timeout_s=590)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT"
source tests/gpu/device-env.sh
T0=$(date +%s); left() { echo $(( ${BUDGET:-560} - ($(date +%s) - T0) )); }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u; uptime; } > "$OUT/device.txt"
if [ -z "${SKIP_STEP:-}" ]; then
  timeout 200 gpu-bin/infinitehip gpu-test --step-only > "$OUT/step-check.log" 2>&1
  echo "step-check: rc=$? at $(( $(date +%s) - T0 )) s" >> "$OUT/device.txt"
fi
timeout 70 python3 scripts/sdpa_bench.py --tokens 1048576 --batch 1 --reps 3 --prefill-tokens '' \
  --model-tokens 131072,1048576 --model-batch 1 --json "$OUT/sdpa.json" > "$OUT/sdpa.log" 2>&1
echo "sdpa: rc=$? at $(( $(date +%s) - T0 )) s" >> "$OUT/device.txt"
for run in search:16,8,4 mean_key:16,8,4 mean_key:32,16,8 search:32,16,8 search:96,24,8 mean_key:96,24,8; do
  [ "$(left)" -gt 40 ] || break
  m=${run%%:*} r=${run#*:} f=${run//,/x}; f=${f//:/-}  # $OUT names: no commas
  t=$(( $(left) - 5 < 75 ? $(left) - 5 : 75 ))
  timeout $t gpu-bin/infinitehip bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 \
    --baseline "$OUT/sdpa.json" --refresh $r --decode-stage0 $m --json "$OUT/model-$f.json" > "$OUT/model-$f.log" 2>&1
  echo "$m $r: rc=$? at $(( $(date +%s) - T0 )) s" >> "$OUT/device.txt"
done
[ -f "$OUT/step-check.log" ] && echo "-- step-check: $(grep -c '^PASS' "$OUT/step-check.log") PASS, $(grep -c '^FAIL' "$OUT/step-check.log") FAIL"
grep '^FAIL' "$OUT/step-check.log" | cut -c1-1200
grep -E 'mean_key' "$OUT/step-check.log" | cut -c1-1500
tail -1 "$OUT/step-check.log"
for f in "$OUT"/model-*.log; do
  [ -f "$f" ] && { echo "== $f"; grep -E '^\||first step|stage 0' "$f" | head -14; grep -iE "hip layer|amortis|refresh step" "$f" | grep -v "^{" | cut -c1-300 | head -8; }
done
cat "$OUT/device.txt"
