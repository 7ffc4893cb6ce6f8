#!/usr/bin/env bash
# Issue 14: what SGLang's decode CUDA graph costs per hip layer: the 32-layer step with the hip layers also
# through GpuAttention::decode_graph (`bench-gpu-model --engine-graph`, one CUDA graph per step of the cycle;
# the engine route scores stage 0 by search), next to the HipGpuDecoder rows (host metadata, device eager,
# one graph), 128K and 1M batch 1, then 128K batch 16; and the mean_key rows for reference. One SDPA
# baseline. Per-step table by tests/gpu/model_steps.py. Logs in $OUT/all.tgz, the summary on stdout.
#   here:  bash scripts/gpu-check.sh      (gpu-bin/)
#   there: run(command="BUDGET=300 bash tests/gpu/logs/enginegraph-2026-12-06/enginegraph-run.sh" (at commit 2705d3c + the bench), carry=["gpu-bin"], kind="nvidia-h200", timeout_s=330)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT/logs"; L="$OUT/logs"
source tests/gpu/device-env.sh
T0=$(date +%s); left() { echo $(( ${BUDGET:-300} - ($(date +%s) - T0) )); }
at() { echo "$1: rc=$2 at $(( $(date +%s) - T0 )) s" >> "$L/device.txt"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u; uptime; } > "$L/device.txt"
timeout 40 python3 scripts/sdpa_bench.py --tokens 1048576 --batch 1 --reps 3 --prefill-tokens '' \
  --model-tokens 131072,1048576 --model-batch 1 --json "$L/sdpa.json" > "$L/sdpa.log" 2>&1; at sdpa $?
timeout 40 python3 scripts/sdpa_bench.py --tokens 131072 --batch 16 --reps 3 --prefill-tokens '' \
  --model-tokens 131072 --model-batch 16 --json "$L/sdpa-b16.json" > "$L/sdpa-b16.log" 2>&1; at sdpa-b16 $?
# The first bench on a cold machine JIT-compiles the kernel modules (~60 s).
timeout 200 gpu-bin/infinitehip bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 --baseline "$L/sdpa.json" \
  --decode-stage0 search --engine-graph --json "$L/model-search-engine.json" > "$L/model-search-engine.log" 2>&1
at "model search engine" $?
t=$(( $(left) - 5 )); [ $t -gt 60 ] && t=60
[ $t -gt 20 ] && { timeout $t gpu-bin/infinitehip bench-gpu-model --tokens 131072 --batch 16 --reps 3 \
  --baseline "$L/sdpa-b16.json" --decode-stage0 search --engine-graph --json "$L/model-search-engine-b16.json" \
  > "$L/model-search-engine-b16.log" 2>&1; at "model search engine b16" $?; }
t=$(( $(left) - 5 )); [ $t -gt 40 ] && t=40
[ $t -gt 15 ] && { timeout $t gpu-bin/infinitehip bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 \
  --baseline "$L/sdpa.json" --decode-stage0 mean_key --json "$L/model-mean_key.json" > "$L/model-mean_key.log" 2>&1
  at "model mean_key" $?; }
python3 tests/gpu/model_steps.py "$L"/model-*.json
grep -h "decode_graph" "$L"/model-*.log
grep -hE "^\| (131072|1048576) \| (1|16) " "$L"/model-*.log | cut -c1-220
tail -5 "$L/model-search-engine.log" | cut -c1-300
cat "$L/device.txt"
tar czf "$OUT/all.tgz" -C "$OUT" logs && rm -rf "$L"
