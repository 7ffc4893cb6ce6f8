#!/usr/bin/env bash
# The SGLang backend's opt-in GPU route for hip's RoPE modes (issue 12,
# branch sglrope: INFINITEHIP_SGLANG_ROPE_GPU=1), one device call. NONE of
# this route has run on a GPU yet (the backend's default stays the host
# engine until this passes).
#   here:  bash scripts/gpu-check.sh      (stages gpu-bin/: libinfinitehip.so built with cuda, PTX)
#   there: run(command="bash tests/gpu/sglrope-run.sh", carry=["gpu-bin"], timeout_s=300)
# Runs tests/gpu/test_shim_gpu.py's test_backend_rope alone
# (SHIM_ONLY=rope_backend): InfiniteHipAttnBackend on CUDA with the switch
# (GpuAttention over the stand-in SGLang pool) vs the same backend on the
# host engine, a random 2-layer model, trained length 256, prompts up to
# 1300 tokens, 8 decode steps; bound from the covering-budget run; negative
# control with original attention positions; CUDA graphs refused.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 INFINITEHIP_CACHE=${INFINITEHIP_CACHE:-/tmp/ihip-cache} INFINITEHIP_LAZY_MODULES=all
mkdir -p "$INFINITEHIP_CACHE"; [ -f gpu-bin/ptx.tar.xz ] && tar xJf gpu-bin/ptx.tar.xz -C "$INFINITEHIP_CACHE" --strip-components=1
cp gpu-bin/ptx/*.ptx "$INFINITEHIP_CACHE/" 2>/dev/null
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u; } > "$OUT/device.txt" 2>&1
s=$(date +%s); rc=0
[ "${DEFAULT_PASS:-1}" = 1 ] && { timeout "${LIMIT:-280}" env INFINITEHIP_LIB="$PWD/gpu-bin/libinfinitehip.so" SHIM_ONLY=rope_backend \
  python3 tests/gpu/test_shim_gpu.py > "$OUT/sglrope.log" 2>&1; rc=$?; }
echo "sglrope: rc=$rc $(( $(date +%s) - s )) s" >> "$OUT/device.txt"
# Second pass: the GPU route's attention on the CUDA-core kernel (f32 q and P;
# INFINITEHIP_ATTN_KERNEL=cuda_core), to separate tensor-core rounding from a route bug.
if [ "${CUDA_CORE_PASS:-1}" = 1 ]; then
  s=$(date +%s)
  timeout "${LIMIT:-280}" env INFINITEHIP_LIB="$PWD/gpu-bin/libinfinitehip.so" SHIM_ONLY=rope_backend \
    INFINITEHIP_ATTN_KERNEL=cuda_core SHIM_ROPE_TRACE=1 python3 tests/gpu/test_shim_gpu.py > "$OUT/sglrope-cudacore.log" 2>&1
  echo "sglrope (cuda_core): rc=$? $(( $(date +%s) - s )) s" >> "$OUT/device.txt"
  grep -E '^(PASS|FAIL)' "$OUT/sglrope-cudacore.log" | grep "CUDA-core" | cut -c1-700
  grep -A15 'rope trace' "$OUT/sglrope-cudacore.log" | cut -c1-300
fi
echo "== summary: PASS $(grep -c '^PASS' "$OUT/sglrope.log") FAIL $(grep -c '^FAIL' "$OUT/sglrope.log")"
grep -E '^(PASS|FAIL)|^  world|^test_shim_gpu' "$OUT/sglrope.log" | cut -c1-700
tail -5 "$OUT/sglrope.log" | cut -c1-1500
cat "$OUT/device.txt"
exit $rc
