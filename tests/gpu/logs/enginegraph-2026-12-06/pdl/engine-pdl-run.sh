#!/usr/bin/env bash
# Issue 14: the engines' graph decode (what SGLang's decode CUDA graph replays) with its own launches
# (q_to_f32, gs_meta, gs_stage_copy) under programmatic dependent launch (pdl::Site::Engine) and the
# multi-CTA top-k for long stage-0 rows (as the host path). 1. `gpu-test --step-only`, `--engine-only`,
# tests/gpu/test_shim_gpu.py (graph replay == eager == host metadata, now also with 4-token stage-0 chunks
# through hip_topk_mc). 2. `bench-gpu-model --engine-graph` at 128K and 1M batch 1 (search stage 0), the
# engine launches plain (INFINITEHIP_PDL_SITES without engine) and PDL (default), then 128K batch 16.
# Per-step table by tests/gpu/model_steps.py. Logs in $OUT/all.tgz, the summary on stdout.
#   here:  bash scripts/gpu-check.sh      (gpu-bin/)
#   there: run(command="BUDGET=480 bash tests/gpu/logs/enginegraph-2026-12-06/pdl/engine-pdl-run.sh" (at commit 8983ff4), carry=["gpu-bin"], kind="nvidia-h200", timeout_s=510)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT/logs"; L="$OUT/logs"
source tests/gpu/device-env.sh
T0=$(date +%s); left() { echo $(( ${BUDGET:-480} - ($(date +%s) - T0) )); }
at() { echo "$1: rc=$2 at $(( $(date +%s) - T0 )) s" >> "$L/device.txt"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u; uptime; } > "$L/device.txt"
timeout 150 gpu-bin/infinitehip gpu-test --step-only > "$L/step-check.log" 2>&1; at step-check $?
INFINITEHIP_LIB="$PWD/gpu-bin/libinfinitehip.so" timeout 90 python3 tests/gpu/test_shim_gpu.py \
  > "$L/shim-gpu.log" 2>&1; at shim-gpu $?
timeout 40 python3 scripts/sdpa_bench.py --tokens 1048576 --batch 1 --reps 3 --prefill-tokens '' \
  --model-tokens 131072,1048576 --model-batch 1 --json "$L/sdpa.json" > "$L/sdpa.log" 2>&1; at sdpa $?
P=meta,score0,score2,topk1,topk2,assemble,attn,dense
for v in "pdl|" "plain|INFINITEHIP_PDL_SITES=$P" "pdl2|"; do
  n=${v%%|*} envs=${v#*|}
  env $envs timeout 90 gpu-bin/infinitehip bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 \
    --baseline "$L/sdpa.json" --decode-stage0 search --engine-graph --json "$L/model-engine-$n.json" \
    > "$L/model-engine-$n.log" 2>&1; at "model engine $n" $?
done
t=$(( $(left) - 5 )); [ $t -gt 150 ] && t=150
[ $t -gt 30 ] && { timeout $t gpu-bin/infinitehip gpu-test --engine-only > "$L/engine-check.log" 2>&1; at engine-check $?; }
python3 tests/gpu/model_steps.py "$L"/model-*.json | grep -E "^\| run|^\|---|engine graph|host"
for f in step-check engine-check; do
  [ -f "$L/$f.log" ] && { echo "-- $f: $(grep -c '^PASS' "$L/$f.log") PASS, $(grep -c '^FAIL' "$L/$f.log") FAIL"; \
    grep '^FAIL' "$L/$f.log" | cut -c1-400; tail -1 "$L/$f.log"; }
done
grep -E "FAIL|graph decode" "$L/shim-gpu.log" | cut -c1-300; tail -2 "$L/shim-gpu.log"
cat "$L/device.txt"
tar czf "$OUT/all.tgz" -C "$OUT" logs && rm -rf "$L"
