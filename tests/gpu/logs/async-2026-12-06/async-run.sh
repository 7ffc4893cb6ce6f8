#!/usr/bin/env bash
# Issue 14: `hip.async_refresh` on the GPU decoder (stage0: stage 0 of the refresh at step s scored at s - 1 on the
# layer's side stream; all: a refresh due at step s runs on the side
# stream beside step s's attention (which reads the previous selection); step s + 1 waits for it. The
# CPU twin is HipPolicy with the same flag (rust/infinitehip/tests/hip_async_refresh.rs).
# 1. `gpu-test --step-only` (its new case: GPU decoder with async_refresh == CPU HipPolicy twin, search and
# mean_key, 35 steps, then reset; every earlier step check too). 2. the 32-layer step at 128K and 1M,
# batch 1, default intervals, in line vs async in the same bench (`--async-refresh`), mean_key and search.
# 3. dense decode at 1M (issue 14's dense row, same call); `--engine-only` if time is left. Logs in $OUT/all.tgz, the summary on stdout.
#   here:  bash scripts/gpu-check.sh      (gpu-bin/)
#   there: run(command="BUDGET=400 bash tests/gpu/async-run.sh", carry=["gpu-bin"], kind="nvidia-h200", timeout_s=430)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT/logs"; L="$OUT/logs"
source tests/gpu/device-env.sh
T0=$(date +%s); left() { echo $(( ${BUDGET:-400} - ($(date +%s) - T0) )); }
at() { echo "$1: rc=$2 at $(( $(date +%s) - T0 )) s" >> "$L/device.txt"; }
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader; date -u; uptime; nproc; } > "$L/device.txt"
[ "${STEP:-1}" = 1 ] && { timeout 170 gpu-bin/infinitehip gpu-test --step-only > "$L/step-check.log" 2>&1; at step-check $?; }
timeout 40 python3 scripts/sdpa_bench.py --tokens 1048576 --batch 1 --reps 3 --prefill-tokens '' \
  --model-tokens 131072,1048576 --model-batch 1 --json "$L/sdpa.json" > "$L/sdpa.log" 2>&1; at sdpa $?
for v in mean_key:1 search:1 mean_key:2 search:2; do
  m=${v%%:*} i=${v#*:}
  [ "$(left)" -gt 45 ] || break
  timeout 60 gpu-bin/infinitehip bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 \
    --baseline "$L/sdpa.json" --decode-stage0 $m --async-refresh stage0,all --json "$L/model-$m-$i.json" > "$L/model-$m-$i.log" 2>&1
  at "model $m $i" $?
done
t=$(( $(left) - 5 )); [ $t -gt 40 ] && t=40
[ $t -gt 15 ] && { timeout $t gpu-bin/infinitehip bench-gpu-dense --tokens 1M --groups 4 --dtypes bf16 --variants v2 \
  --waves 1 --json "$L/dense.json" > "$L/dense.log" 2>&1; at dense $?; }
t=$(( $(left) - 10 )); [ $t -gt 120 ] && t=120
[ "${ENGINE:-1}" = 1 ] && [ $t -gt 60 ] && { timeout $t gpu-bin/infinitehip gpu-test --engine-only > "$L/engine-check.log" 2>&1; at engine-check $?; }
python3 tests/gpu/model_steps.py "$L"/model-*.json
grep -h "async_refresh (host" "$L"/model-*.log
for f in "$L"/model-*.log; do echo "== $f"; grep -E "^\| (131072|1048576) \| 1 " "$f" | cut -c1-200; done
for f in step-check engine-check; do
  [ -f "$L/$f.log" ] && { echo "-- $f: $(grep -c '^PASS' "$L/$f.log") PASS, $(grep -c '^FAIL' "$L/$f.log") FAIL"; \
    grep '^FAIL' "$L/$f.log" | cut -c1-800; tail -1 "$L/$f.log"; }
done
grep -h "async_refresh" "$L/step-check.log" | cut -c1-1500
[ -f "$L/dense.log" ] && grep -E "^\|" "$L/dense.log" | tail -4
cat "$L/device.txt"
tar czf "$OUT/all.tgz" -C "$OUT" logs && rm -rf "$L"
