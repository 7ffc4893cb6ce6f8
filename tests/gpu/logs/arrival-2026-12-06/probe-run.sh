#!/usr/bin/env bash
# Issue 14: where the hip sparse attention launch (every decode step, 14.5 of the 24.4 us a hip layer
# costs at 1M) spends its time. 1. `bench-gpu-sparse --probe`: random vs side-by-side chunk positions,
# L2 / address translations warm or evicted, the traced build's per-CTA phase stamps. 2. ncu on the
# production launch (speed of light, warp states, source counters; the SASS stall table as CSV).
#   here:  bash scripts/gpu-check.sh      (gpu-bin/)
#   there: run(command="BUDGET=240 bash tests/gpu/probe-run.sh", carry=["gpu-bin"], timeout_s=270)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT"
source tests/gpu/device-env.sh
T0=$(date +%s); left() { echo $(( ${BUDGET:-240} - ($(date +%s) - T0) )); }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u; uptime; } > "$OUT/device.txt"
timeout 120 gpu-bin/infinitehip bench-gpu-sparse --probe --tokens 1M --reps 30 --json "$OUT/probe.json" \
  > "$OUT/probe.log" 2>&1
echo "probe: rc=$? at $(( $(date +%s) - T0 )) s" >> "$OUT/device.txt"
if [ "${NCU:-1}" = 1 ] && [ "$(left)" -gt 60 ]; then
  N="gpu-bin/infinitehip bench-gpu-sparse --tokens 1M --batch 1 --splits 0 --chunks 1 --reps 2"
  timeout $(( $(left) - 20 )) ncu --clock-control none -k regex:hip_sparse_bf16_d128_g4_u1 --launch-skip 2 \
    --launch-count 1 --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section SourceCounters --section MemoryWorkloadAnalysis -o /tmp/sp $N > "$OUT/ncu-run.log" 2>&1
  echo "ncu: rc=$? at $(( $(date +%s) - T0 )) s" >> "$OUT/device.txt"
  ncu -i /tmp/sp.ncu-rep --page details > "$OUT/ncu.log" 2>&1
  ncu -i /tmp/sp.ncu-rep --page source --print-source sass --csv > /tmp/src.csv 2>&1
  xz -9 < /tmp/src.csv > "$OUT/ncu-src.csv.xz"
fi
cat "$OUT/probe.log" | grep -v '^{'
grep -E "Duration|Elapsed Cycles|Memory Throughput|DRAM Throughput|Warp Cycles Per Issued|Stall|Registers" "$OUT/ncu.log" | head -40
cat "$OUT/device.txt"
