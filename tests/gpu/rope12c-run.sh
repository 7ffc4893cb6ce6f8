#!/usr/bin/env bash
# hip RoPE modes on the GPU (issue 12): HipGpuDecoder (branch rope12g) and
# GpuAttention::decode, the engine route (branch rope12c), vs the CPU
# HipPolicy / host engine, in one device call. None of it has run on a GPU.
#   here:  bash scripts/gpu-check.sh      (stages gpu-bin/: CLI, libinfinitehip.so, PTX)
#   there: run(command="BUDGET=540 bash tests/gpu/rope12c-run.sh", carry=["gpu-bin"], timeout_s=600)
# In parallel: gpu-test --rope-only (6 decoder cases, then GpuAttention's refusals
# and 4 engine cases, each printed as it finishes; then the decoder's RoPE-mode
# step timing at 128K and 1M), gpu-test --engine-decode-only (the engine path at
# original positions, which this branch touched: hip_select, the gather's table
# rows), then tests/gpu/test_shim_gpu.py (its test_shim_rope: GpuAttention through
# the C ABI vs the host engine past model.max_position, with a negative control;
# shim timing off). Modules load on first use.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
BIN=gpu-bin/infinitehip
export PYTHONUNBUFFERED=1 INFINITEHIP_CACHE=/tmp/ihip-cache INFINITEHIP_LAZY_MODULES=all
mkdir -p "$INFINITEHIP_CACHE"; [ -f gpu-bin/ptx.tar.xz ] && tar xJf gpu-bin/ptx.tar.xz -C "$INFINITEHIP_CACHE" --strip-components=1
cp gpu-bin/ptx/*.ptx "$INFINITEHIP_CACHE/" 2>/dev/null
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
T0=$(date +%s); left() { echo $(( ${BUDGET:-540} - ($(date +%s) - T0) )); }
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; date -u; uptime; } > "$OUT/device.txt" 2>&1
step() {  # step NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2; local s=$(date +%s)
  [ "$t" -lt 5 ] && { echo "$name: skipped (no time)" >> "$OUT/device.txt"; return; }
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - s )) s (at $(( $(date +%s) - T0 )) s)" >> "$OUT/device.txt"
}
cap() { local a=$1 l; l=$(( $(left) - 5 )); echo $(( a < l ? a : l )); }
step rope-only $(cap 300) $BIN gpu-test --rope-only --rope-timing ${ROPE_TOKENS:-131072,1048576} &
step engine-decode $(cap 200) $BIN gpu-test --engine-decode-only &
wait
step shim-gpu $(cap 200) env INFINITEHIP_LIB="$PWD/gpu-bin/libinfinitehip.so" TIMING_TOKENS= \
  python3 tests/gpu/test_shim_gpu.py
echo "== summary"
for f in rope-only engine-decode shim-gpu; do echo "-- $f: PASS $(grep -c '^PASS' "$OUT/$f.log") FAIL $(grep -c '^FAIL' "$OUT/$f.log")"; grep -E '^FAIL' "$OUT/$f.log" | cut -c1-900; tail -2 "$OUT/$f.log" | cut -c1-400; done
grep -E '^(PASS|FAIL)' "$OUT/rope-only.log" | cut -c1-1200
grep -A 14 '^rope timing' "$OUT/rope-only.log"; grep '^\[' "$OUT/rope-only.log"
cat "$OUT/device.txt"
