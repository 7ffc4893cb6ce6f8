#!/usr/bin/env bash
# Issue 14: the split arrival of the v2 attention kernels (sparse hip attention and dense decode) as one
# acquire-release add between barriers, and the merge's loads 16 in flight (`INFINITEHIP_ACQREL_ARRIVAL`,
# default on; =0 the previous fences + chained sum loop). 1. `bench-gpu-sparse --probe` (both, same call,
# with the traced build's phases). 2. `gpu-test --step-only` (sparse + dense v2 kernel cases vs f64, the
# hip step twins, CPU policy twins). 3. the 32-layer step at 128K and 1M, batch 1, mean_key, new / old /
# new / old against one SDPA baseline.
#   here:  bash scripts/gpu-check.sh      (gpu-bin/)
#   there: run(command="BUDGET=420 bash tests/gpu/arrival-run.sh", carry=["gpu-bin"], timeout_s=450)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT"
source tests/gpu/device-env.sh
T0=$(date +%s); left() { echo $(( ${BUDGET:-420} - ($(date +%s) - T0) )); }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u; uptime; } > "$OUT/device.txt"
timeout 100 gpu-bin/infinitehip bench-gpu-sparse --probe --tokens 1M --reps 30 --json "$OUT/probe.json" \
  > "$OUT/probe.log" 2>&1
echo "probe: rc=$? at $(( $(date +%s) - T0 )) s" >> "$OUT/device.txt"
timeout 170 gpu-bin/infinitehip gpu-test --step-only > "$OUT/step-check.log" 2>&1
echo "step-check: rc=$? at $(( $(date +%s) - T0 )) s" >> "$OUT/device.txt"
timeout 40 python3 scripts/sdpa_bench.py --tokens 1048576 --batch 1 --reps 3 --prefill-tokens '' \
  --model-tokens 131072,1048576 --model-batch 1 --json "$OUT/sdpa.json" > "$OUT/sdpa.log" 2>&1
echo "sdpa: rc=$? at $(( $(date +%s) - T0 )) s" >> "$OUT/device.txt"
for run in new1 old1 new2 old2; do
  [ "$(left)" -gt 30 ] || break
  v=1; [ "${run#old}" != "$run" ] && v=0
  INFINITEHIP_ACQREL_ARRIVAL=$v timeout 60 gpu-bin/infinitehip bench-gpu-model --tokens 131072,1048576 --batch 1 \
    --reps 3 --baseline "$OUT/sdpa.json" --decode-stage0 mean_key --json "$OUT/model-$run.json" > "$OUT/model-$run.log" 2>&1
  echo "$run: rc=$? at $(( $(date +%s) - T0 )) s" >> "$OUT/device.txt"
done
grep -v '^{' "$OUT/probe.log"
echo "-- step-check: $(grep -c '^PASS' "$OUT/step-check.log") PASS, $(grep -c '^FAIL' "$OUT/step-check.log") FAIL"
grep '^FAIL' "$OUT/step-check.log" | cut -c1-800
tail -1 "$OUT/step-check.log"
for f in "$OUT"/model-*.log; do
  [ -f "$f" ] && { echo "== $f"; grep -E '^\|' "$f" | head -8; grep -iE "hip layer|amortis" "$f" | grep -v "^{" | cut -c1-250 | head -4; }
done
cat "$OUT/device.txt"
