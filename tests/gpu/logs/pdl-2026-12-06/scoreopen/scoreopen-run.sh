#!/usr/bin/env bash
# Issue 14: a stage-1+ scoring that opens a host-metadata refresh step (steps 4 / 12 start at stage 2) is
# launched plainly (pdl::Site::ScoreOpen, off by default): launched early behind the previous layer's
# attention it made those steps ~47 us per hip layer instead of ~33.5 inside the 32-layer step (H100,
# tests/gpu/logs/pdl-2026-12-06/variants). 1. `gpu-test --step-only`. 2. the 32-layer step at 128K and 1M,
# batch 1, mean_key, default intervals: the new default; + score1 (stage 1 behind stage 0's multi-CTA top-k,
# off since the one-CTA top-k days); + score1,topk0; + score_open (the previous default); the default again.
# 3. `gpu-test --engine-only` and the shim graph test if time is left. Per-step table by
# tests/gpu/model_steps.py. Logs in $OUT/all.tgz, the summary on stdout.
#   here:  bash scripts/gpu-check.sh      (gpu-bin/)
#   there: run(command="BUDGET=420 bash tests/gpu/scoreopen-run.sh", carry=["gpu-bin"], kind="nvidia-h200", timeout_s=450)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT/logs"; L="$OUT/logs"
source tests/gpu/device-env.sh
T0=$(date +%s); left() { echo $(( ${BUDGET:-420} - ($(date +%s) - T0) )); }
at() { echo "$1: rc=$2 at $(( $(date +%s) - T0 )) s" >> "$L/device.txt"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u; uptime; } > "$L/device.txt"
timeout 150 gpu-bin/infinitehip gpu-test --step-only > "$L/step-check.log" 2>&1; at step-check $?
timeout 40 python3 scripts/sdpa_bench.py --tokens 1048576 --batch 1 --reps 3 --prefill-tokens '' \
  --model-tokens 131072,1048576 --model-batch 1 --json "$L/sdpa.json" > "$L/sdpa.log" 2>&1; at sdpa $?
D=meta,score0,score2,topk1,topk2,assemble,attn,dense
for v in "default|" "score1|INFINITEHIP_PDL_SITES=$D,score1" "score1topk0|INFINITEHIP_PDL_SITES=$D,score1,topk0" \
         "prevdefault|INFINITEHIP_PDL_SITES=$D,score_open" "default2|"; do
  n=${v%%|*} envs=${v#*|}
  env $envs timeout 60 gpu-bin/infinitehip bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 \
    --baseline "$L/sdpa.json" --decode-stage0 mean_key --json "$L/model-$n.json" > "$L/model-$n.log" 2>&1
  at "model $n" $?
done
t=$(( $(left) - 90 )); [ $t -gt 150 ] && t=150
[ $t -gt 30 ] && { timeout $t gpu-bin/infinitehip gpu-test --engine-only > "$L/engine-check.log" 2>&1; at engine-check $?; }
t=$(( $(left) - 5 ))
[ $t -gt 20 ] && { INFINITEHIP_LIB="$PWD/gpu-bin/libinfinitehip.so" timeout $t python3 tests/gpu/test_shim_gpu.py \
  > "$L/shim-gpu.log" 2>&1; at shim-gpu $?; }
python3 tests/gpu/model_steps.py "$L"/model-*.json
for f in step-check engine-check; do
  [ -f "$L/$f.log" ] && { echo "-- $f: $(grep -c '^PASS' "$L/$f.log") PASS, $(grep -c '^FAIL' "$L/$f.log") FAIL"; \
    grep '^FAIL' "$L/$f.log" | cut -c1-400; tail -1 "$L/$f.log"; }
done
[ -f "$L/shim-gpu.log" ] && tail -3 "$L/shim-gpu.log"
cat "$L/device.txt"
tar czf "$OUT/all.tgz" -C "$OUT" logs && rm -rf "$L"
