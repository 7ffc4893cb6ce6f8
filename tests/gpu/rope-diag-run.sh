#!/usr/bin/env bash
# Issue 12's engine-level RoPE checks with the CUDA-core-kernel diagnostic,
# then issue 16's offload bench, in ONE device call (<= 560 s):
#   here:  bash scripts/gpu-check.sh && bash tests/gpu/ropecuda-stage.sh
#   there: run(command="bash tests/gpu/rope-diag-run.sh", carry=["gpu-bin", "target/ropecuda-stage"], timeout_s=580)
# In parallel: llama.cpp's CUDA build + gpu_test.py section 12 (the CUDA route
# with and without INFINITEHIP_ATTN_KERNEL=cuda_core vs the CPU route) and
# gpu-test --rope-only; SGLang's test_backend_rope, default and cuda_core.
# Then alone: bench-gpu-offload (issue 16's bar) if > 60 s are left, on an H200.
# SGL=0 skips SGLang's pass, ROPE_ONLY=0 gpu-test --rope-only.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT/rope" "$OUT/sgl" "$OUT/off"
T0=$(date +%s)
# section 12 runs the core engine over each route's layer-0 q/k/v through the Python shim (gpu-bin's library)
PYTHONPATH="$PWD/python-shim" INFINITEHIP_LIB="$PWD/gpu-bin/libinfinitehip.so" \
OUT="$OUT/rope" BUDGET=${ROPE_BUDGET:-420} ROPECUDA_LLAMA_ARGS="--only-rope --gen 65" \
  bash tests/gpu/ropecuda-run.sh > "$OUT/rope/summary.txt" 2>&1 &
[ "${SGL:-1}" = 1 ] && OUT="$OUT/sgl" INFINITEHIP_CACHE=/tmp/ihip-cache2 LIMIT=150 bash tests/gpu/sglrope-run.sh > "$OUT/sgl/summary.txt" 2>&1 &
wait
export INFINITEHIP_CACHE=/tmp/ihip-cache2; . tests/gpu/device-env.sh
left=$(( ${BUDGET:-550} - ($(date +%s) - T0) - 10 ))
s=$(date +%s)
# issue 16 names the H200: the bench runs there only (BENCH_ANY=1: on any card)
h200=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -c H200)
[ "$left" -gt 60 ] && [ "$h200" -gt 0 -o "${BENCH_ANY:-0}" = 1 ] && timeout $(( left < 120 ? left : 120 )) gpu-bin/infinitehip bench-gpu-offload --tokens 1048576,4194304 --cache 0.05 \
  --est-rows 0.25 --admission full-device --est-fetch warp --steps 48 --warmup 16 \
  --est-admit half,all --est-reuse off,on --est-pin 0,2 --json "$OUT/off/bench.json" > "$OUT/off/bench.log" 2>&1
echo "bench: rc=$? $(( $(date +%s) - s )) s (at $(( $(date +%s) - T0 )) s)" >> "$OUT/off/steps.txt"
echo "== sglrope"; cut -c1-700 "$OUT/sgl/summary.txt"
echo "== ropecuda"; grep -E '^(PASS|FAIL)|^--|gpu-test:' "$OUT/rope/summary.txt" | cut -c1-1200
grep -h "rope diagnostics\|rope layers\|rope covering summary" "$OUT"/rope/llama-rope.log | cut -c1-2500
cat "$OUT/rope/device.txt"
echo "== off16d bench"; grep -E '^\| [0-9]' "$OUT/off/bench.log" | head -16 | cut -c1-330; head -1 "$OUT/off/bench.log"
cat "$OUT/off/steps.txt"
tar czf "$OUT/diag.tgz" -C "$OUT" rope sgl off && rm -rf "$OUT/rope" "$OUT/sgl" "$OUT/off"
