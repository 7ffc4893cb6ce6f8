#!/usr/bin/env bash
# Issue 14: two refresh-step changes. (a) later hip stages (sub-chunks of <= 32 tokens) scored by
# hip_scorea: every token's key row of a sub-chunk copied at once and scored, the centre-of-half search
# replayed over those scores by shuffles (one round trip instead of log2(c)), the same keys bit for bit.
# (b) the attention selection built inside the last stage's top-k launch (hip_topk_asm): one launch
# fewer on every refresh step. (c) stage 0's mean rows copied coalesced by the warp (hip_score_meanw).
# 1. `gpu-test --step-only` (score kernels vs the host reference, the step
# and decoder vs the CPU policy). 2. the 32-layer step at 128K and 1M, batch 1, mean_key, default
# intervals: new default / without (c) / (a) only / none / new again; then the search stage 0, new and
# none.
# 3. `gpu-test --engine-only` and the shim graph test if time is left.
# Per-step table by tests/gpu/model_steps.py. Logs in $OUT/all.tgz, the summary on stdout.
#   here:  bash scripts/gpu-check.sh      (gpu-bin/)
#   there: run(command="BUDGET=420 bash tests/gpu/allrows-run.sh", carry=["gpu-bin"], kind="nvidia-h200", timeout_s=450)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT/logs"; L="$OUT/logs"
source tests/gpu/device-env.sh
T0=$(date +%s); left() { echo $(( ${BUDGET:-420} - ($(date +%s) - T0) )); }
at() { echo "$1: rc=$2 at $(( $(date +%s) - T0 )) s" >> "$L/device.txt"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u; uptime; nproc; } > "$L/device.txt"
timeout 150 gpu-bin/infinitehip gpu-test --step-only > "$L/step-check.log" 2>&1; at step-check $?
timeout 40 python3 scripts/sdpa_bench.py --tokens 1048576 --batch 1 --reps 3 --prefill-tokens '' \
  --model-tokens 131072,1048576 --model-batch 1 --json "$L/sdpa.json" > "$L/sdpa.log" 2>&1; at sdpa $?
P="INFINITEHIP_SCORE_ALLROWS=0 INFINITEHIP_TOPK_ASM=0 INFINITEHIP_MEAN_WARP=0"
for v in "new|mean_key|" "nomeanw|mean_key|INFINITEHIP_MEAN_WARP=0" \
         "allrows|mean_key|INFINITEHIP_TOPK_ASM=0 INFINITEHIP_MEAN_WARP=0" "prev|mean_key|$P" "new2|mean_key|" \
         "search-new|search|" "search-prev|search|$P"; do
  IFS='|' read -r n s0 envs <<< "$v"
  env $envs timeout 60 gpu-bin/infinitehip bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 \
    --baseline "$L/sdpa.json" --decode-stage0 "$s0" --json "$L/model-$n.json" > "$L/model-$n.log" 2>&1
  at "model $n" $?
done
t=$(( $(left) - 70 )); [ $t -gt 150 ] && t=150
[ $t -gt 30 ] && { timeout $t gpu-bin/infinitehip gpu-test --engine-only > "$L/engine-check.log" 2>&1; at engine-check $?; }
t=$(( $(left) - 5 ))
[ $t -gt 20 ] && { INFINITEHIP_LIB="$PWD/gpu-bin/libinfinitehip.so" timeout $t python3 tests/gpu/test_shim_gpu.py \
  > "$L/shim-gpu.log" 2>&1; at shim-gpu $?; }
python3 tests/gpu/model_steps.py "$L"/model-*.json
for n in new nomeanw allrows prev; do echo "== $n"; grep -E "^\| (score|topk|assemble|attn|hip)" "$L/model-$n.log"; done
for f in step-check engine-check; do
  [ -f "$L/$f.log" ] && { echo "-- $f: $(grep -c '^PASS' "$L/$f.log") PASS, $(grep -c '^FAIL' "$L/$f.log") FAIL"; \
    grep '^FAIL' "$L/$f.log" | cut -c1-600; tail -1 "$L/$f.log"; }
done
[ -f "$L/shim-gpu.log" ] && { grep -E "FAIL|timing" "$L/shim-gpu.log" | cut -c1-300; tail -1 "$L/shim-gpu.log"; }
cat "$L/device.txt"
tar czf "$OUT/all.tgz" -C "$OUT" logs && rm -rf "$L"
