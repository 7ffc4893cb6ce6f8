#!/usr/bin/env bash
# Issue 14 on the H200 (the issue's bar is stated there): the 32-layer decode step at 128K and 1M, batch 1,
# with main's default attention (acquire-release split arrival + merge prefetch) and the previous one
# (INFINITEHIP_ACQREL_ARRIVAL=0 INFINITEHIP_MERGE_PREFETCH=0), mean_key and search at the default
# intervals, then upstream hip-attention's (32,16,8 and 96,24,8) with both (tests/gpu/PENDING.md's search
# rows). First `bench-gpu-sparse --probe`. One SDPA baseline. Logs in $OUT/all.tgz, summary on stdout.
#   here:  bash scripts/gpu-check.sh      (gpu-bin/)
#   there: run(command="BUDGET=360 bash tests/gpu/h200-step-run.sh", carry=["gpu-bin"], kind="nvidia-h200", timeout_s=390)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT/logs"; L="$OUT/logs"
source tests/gpu/device-env.sh
T0=$(date +%s); left() { echo $(( ${BUDGET:-360} - ($(date +%s) - T0) )); }
at() { echo "$1: rc=$2 at $(( $(date +%s) - T0 )) s" >> "$L/device.txt"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u; uptime; } > "$L/device.txt"
timeout 40 python3 scripts/sdpa_bench.py --tokens 1048576 --batch 1 --reps 3 --prefill-tokens '' \
  --model-tokens 131072,1048576 --model-batch 1 --json "$L/sdpa.json" > "$L/sdpa.log" 2>&1; at sdpa $?
for run in mean_key:16,8,4:new mean_key:16,8,4:old mean_key:16,8,4:new2 mean_key:16,8,4:old2 search:16,8,4:new \
           search:32,16,8:new search:96,24,8:new mean_key:32,16,8:new mean_key:96,24,8:new; do
  [ "$(left)" -gt 25 ] || break
  m=${run%%:*} rest=${run#*:} r=${rest%%:*} v=${rest#*:}; f="$m-${r//,/x}-$v"
  on=1; [ "${v#old}" != "$v" ] && on=0
  # The first bench on a cold machine JIT-compiles the kernel modules (~60 s on 2026-12-06, H100: four
  # 40 s timeouts in a row, each killed before the driver's cache was written).
  t=40; [ -f "$L/.warm" ] || t=150
  INFINITEHIP_ACQREL_ARRIVAL=$on INFINITEHIP_MERGE_PREFETCH=$on timeout $t gpu-bin/infinitehip bench-gpu-model \
    --tokens 131072,1048576 --batch 1 --reps 3 --baseline "$L/sdpa.json" --refresh $r --decode-stage0 $m \
    --json "$L/model-$f.json" > "$L/model-$f.log" 2>&1; rc=$?; at "model $f" $rc
  [ $rc = 0 ] && touch "$L/.warm"
done
t=$(( $(left) - 5 )); [ $t -gt 90 ] && t=90
[ $t -gt 20 ] && { timeout $t gpu-bin/infinitehip bench-gpu-sparse --probe --tokens 1M --reps 30 \
  --json "$L/probe.json" > "$L/probe.log" 2>&1; at probe $?; }
for f in "$L"/model-*.log; do
  echo "== $f"; grep -B1 -A5 "^| path" "$f" | grep -E "host metadata|CUDA graph"
  grep -E "^\| (131072|1048576) \| 1 " "$f" | cut -c1-200
done
[ -f "$L/probe.log" ] && grep -E "^\| (random|nothing)" "$L/probe.log" | head -12
cat "$L/device.txt"
tar czf "$OUT/all.tgz" -C "$OUT" logs && rm -rf "$L"
