#!/usr/bin/env bash
# Issue 14: hip sparse attention with early loads. On a host step that rebuilt no table, the launch loads
# its first chunk's table entries, page entries and K/V (and prefetches the second chunk into L2) before
# its PDL wait, so those round trips overlap the previous kernel's tail; every sparse launch now lets the
# next kernel launch only after its own wait (so a later launch's early loads never overlap the refresh
# that wrote the table). Outputs bit-equal (`INFINITEHIP_EARLY_LOADS=0`: after the wait, as before).
# 1. `gpu-test --step-only` (sparse kernel cases: early == not, bit for bit; the lean host step == the
# full host step; PDL == plain; device step, graph, CPU policy twins). 2. the 32-layer step at 128K and
# 1M, batch 1, mean_key, default intervals: early / not / early / not. 3. `--engine-only` and the shim
# graph test if time is left (STEP=0 skips the step check, ENGINE=0 the engine and shim checks).
# The second chunk's L2 prefetch is where the gain is (second call: without it, `INFINITEHIP_EARLY_L2=0`,
# the whole step was level with no early loads), so it is on by default. Logs in $OUT/all.tgz, the
# summary on stdout. The calls that ran: tests/gpu/logs/early-2026-12-06/run{1,2}/ (with their scripts).
#   here:  bash scripts/gpu-check.sh      (gpu-bin/)
#   there: run(command="BUDGET=420 bash tests/gpu/early-run.sh", carry=["gpu-bin"], kind="nvidia-h200", timeout_s=450)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT/logs"; L="$OUT/logs"
source tests/gpu/device-env.sh
T0=$(date +%s); left() { echo $(( ${BUDGET:-420} - ($(date +%s) - T0) )); }
at() { echo "$1: rc=$2 at $(( $(date +%s) - T0 )) s" >> "$L/device.txt"; }
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm --format=csv,noheader; date -u; uptime; nproc; } > "$L/device.txt"
# Registers of the default sparse kernel (168 before: 3 CTAs per SM).
f=$(ls "$INFINITEHIP_CACHE"/*hip_sparse*.ptx 2>/dev/null | grep -v trace | head -1)
PTXAS=$(command -v ptxas || echo /usr/local/cuda/bin/ptxas)
[ -n "$f" ] && [ -x "$PTXAS" ] && timeout 60 "$PTXAS" -arch=sm_90 -v --entry hip_sparse_bf16_d128_g8_u1 \
  "$f" -o /tmp/hs.cubin > "$L/ptxas.log" 2>&1; at ptxas $?
[ "${STEP:-1}" = 1 ] && { timeout 150 gpu-bin/infinitehip gpu-test --step-only > "$L/step-check.log" 2>&1; at step-check $?; }
timeout 40 python3 scripts/sdpa_bench.py --tokens 1048576 --batch 1 --reps 3 --prefill-tokens '' \
  --model-tokens 131072,1048576 --model-batch 1 --json "$L/sdpa.json" > "$L/sdpa.log" 2>&1; at sdpa $?
for v in "early|" "prev|INFINITEHIP_EARLY_LOADS=0" "nol2|INFINITEHIP_EARLY_L2=0" \
         "early2|" "prev2|INFINITEHIP_EARLY_LOADS=0" "nol2b|INFINITEHIP_EARLY_L2=0"; do
  IFS='|' read -r n envs <<< "$v"
  env $envs timeout 60 gpu-bin/infinitehip bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 \
    --baseline "$L/sdpa.json" --decode-stage0 mean_key --json "$L/model-$n.json" > "$L/model-$n.log" 2>&1
  at "model $n" $?
done
t=$(( $(left) - 40 )); [ $t -gt 150 ] && t=150
[ "${ENGINE:-1}" = 1 ] && [ $t -gt 30 ] && { timeout $t gpu-bin/infinitehip gpu-test --engine-only > "$L/engine-check.log" 2>&1; at engine-check $?; }
t=$(( $(left) - 5 ))
[ "${ENGINE:-1}" = 1 ] && [ $t -gt 20 ] && { INFINITEHIP_LIB="$PWD/gpu-bin/libinfinitehip.so" timeout $t python3 tests/gpu/test_shim_gpu.py \
  > "$L/shim-gpu.log" 2>&1; at shim-gpu $?; }
python3 tests/gpu/model_steps.py "$L"/model-*.json
for n in early prev nol2; do echo "== $n"; grep -E "^\| (attn|hip)|^\| host metadata|^attention" "$L/model-$n.log"; done
for f in step-check engine-check; do
  [ -f "$L/$f.log" ] && { echo "-- $f: $(grep -c '^PASS' "$L/$f.log") PASS, $(grep -c '^FAIL' "$L/$f.log") FAIL"; \
    grep '^FAIL' "$L/$f.log" | cut -c1-600; tail -1 "$L/$f.log"; }
done
grep -h "early loads" "$L/step-check.log" | cut -c1-300 | head -4
[ -f "$L/shim-gpu.log" ] && { grep -E "FAIL|timing" "$L/shim-gpu.log" | cut -c1-300; tail -1 "$L/shim-gpu.log"; }
grep -h "registers" "$L/ptxas.log" 2>/dev/null
cat "$L/device.txt"
tar czf "$OUT/all.tgz" -C "$OUT" logs && rm -rf "$L"
