#!/usr/bin/env bash
# hip RoPE modes in the GPU hip sparse PREFILL (issue 12, branch ropepf):
# HipGpuPrefill + set_rope_model (rotated per-block scoring, streaming
# attention per query) and GpuAttention::prefill past model.max_position,
# vs the CPU HipPolicy prefill / host engine, in one device call. None of
# the prefill code has run on a GPU.
#   here:  bash scripts/gpu-check.sh      (stages gpu-bin/: CLI, libinfinitehip.so, PTX)
#   there: run(command="BUDGET=300 bash tests/gpu/ropepf-run.sh", carry=["gpu-bin"], timeout_s=330)
# In parallel: gpu-test --rope-only (the decoder's and GpuAttention::decode's
# cases as before, then the prefill cases of gpu_rope_prefill.rs, each printed
# as it finishes), gpu-test --hip-prefill-only (HipGpuPrefill at original
# positions, which this branch touched: select / attend dispatch), and the
# shim's RoPE test alone (SHIM_ONLY=rope: GpuAttention through the C ABI,
# decode past max_position and now a prefill past it, vs the host engine).
# Modules load on first use.
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
T0=$(date +%s); left() { echo $(( ${BUDGET:-300} - ($(date +%s) - T0) )); }
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; date -u; uptime; } > "$OUT/device.txt" 2>&1
step() {  # step NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2; local s=$(date +%s)
  [ "$t" -lt 5 ] && { echo "$name: skipped (no time)" >> "$OUT/device.txt"; return; }
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - s )) s (at $(( $(date +%s) - T0 )) s)" >> "$OUT/device.txt"
}
cap() { local a=$1 l; l=$(( $(left) - 5 )); echo $(( a < l ? a : l )); }
step rope-only $(cap 280) $BIN gpu-test --rope-only &
step hip-prefill $(cap 150) $BIN gpu-test --hip-prefill-only &
step shim-rope $(cap 200) env INFINITEHIP_LIB="$PWD/gpu-bin/libinfinitehip.so" SHIM_ONLY=rope TIMING_TOKENS= \
  python3 tests/gpu/test_shim_gpu.py &
wait
# Alone on the GPU: one RoPE-mode prefill chunk (8192 queries at 64K) vs
# original positions (gpu_rope_prefill::timing; a timing, not a check).
step rope-pf-timing $(cap 60) env INFINITEHIP_ROPE_PF_TIMING=65536,8192 $BIN gpu-test
echo "== summary"
for f in rope-only hip-prefill shim-rope; do echo "-- $f: PASS $(grep -c '^PASS' "$OUT/$f.log") FAIL $(grep -c '^FAIL' "$OUT/$f.log")"; grep -E '^FAIL' "$OUT/$f.log" | cut -c1-900; tail -2 "$OUT/$f.log" | cut -c1-400; done
grep -E '^(PASS|FAIL)' "$OUT/rope-only.log" | grep -i prefill | cut -c1-1400
grep '^\[' "$OUT/rope-only.log"
grep -A 9 '^rope prefill timing' "$OUT/rope-pf-timing.log"; tail -3 "$OUT/rope-pf-timing.log"
cat "$OUT/device.txt"
