#!/usr/bin/env bash
# Issue 12, llama.cpp's CUDA route with hip's RoPE modes: section 12 of tests/llama-cpp/gpu_test.py with libllama
# built against the prebuilt CUDA ggml (~50 s instead of ~300 s). GPU_TEST_ROPE_COVER_ONLY=1 (the default
# here): the covering-budget comparison alone (both routes and stock, every graph tensor dumped); =0: all of it.
#   here:  bash tests/gpu/rope-cover-stage.sh   (see its header)
#   there: run(command="bash tests/gpu/rope-cover-run.sh", carry=["target/rope-cover-stage"], timeout_s=300)
set -uo pipefail
cd "$(dirname "$0")/../.."
S=$PWD/target/rope-cover-stage
OUT=${OUT:-out}; mkdir -p "$OUT"
xz -dc "$S/libinfinitehip.so.xz" > /tmp/libinfinitehip.so
[ -f "$S/llama/libinfinitehip_bridge.a" ] || xz -dk -T0 "$S/llama/libinfinitehip_bridge.a.xz"
[ -f "$S/ptx.tar.xz" ] && tar xJf "$S/ptx.tar.xz" -C "$S/llama"   # llama-cpp-gpu.sh copies llama/ptx/*.ptx
export PYTHONUNBUFFERED=1 INFINITEHIP_CACHE=/tmp/ihip-cache INFINITEHIP_LAZY_MODULES=all
export PYTHONPATH=$PWD/python-shim INFINITEHIP_LIB=/tmp/libinfinitehip.so
export GPU_TEST_ROPE_COVER_ONLY=${GPU_TEST_ROPE_COVER_ONLY:-1}
mkdir -p "$INFINITEHIP_CACHE"
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u; } > "$OUT/device.txt" 2>&1
s=$(date +%s)
IHIP_GGML_PREBUILT=$S/ggml-inst.tar.xz IHIP_BUDGET_S=${BUDGET:-260} GPU_TEST_ARGS="--only-rope" \
  timeout ${BUDGET:-260} bash "$S/llama/llama-cpp-gpu.sh" run "$S/llama" "$OUT/llama" > "$OUT/llama-rope.log" 2>&1
echo "llama-rope: rc=$? $(( $(date +%s) - s )) s" >> "$OUT/device.txt"
grep -E '^== |^(PASS|FAIL|SKIP)|ALL PASS|SOME FAILED|INCOMPLETE' "$OUT/llama-rope.log" | cut -c1-700
grep -h "rope covering summary\|rope diagnostics" "$OUT/llama-rope.log" | cut -c1-3000
tail -4 "$OUT/llama-rope.log" | cut -c1-800
cat "$OUT/device.txt"
