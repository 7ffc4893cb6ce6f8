#!/usr/bin/env bash
# gpulocret device run: gpu-test --engine-only (engine path incl. locret) + the shim test.
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 INFINITEHIP_CACHE=/tmp/ihip-cache
mkdir -p "$INFINITEHIP_CACHE"; cp ptx/*.ptx "$INFINITEHIP_CACHE/"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
s=$(date +%s)
[ "${SKIP_GT:-0}" = 1 ] || INFINITEHIP_LOG=info timeout ${T1:-200} ./infinitehip gpu-test --engine-only > "$OUT/gpu-test.log" 2>&1; echo "gpu-test rc $? $(( $(date +%s) - s )) s" | tee -a "$OUT/device.txt"
if [ "${SKIP_SHIM:-0}" != 1 ]; then
s=$(date +%s)
TIMING_TOKENS=${TIMING_TOKENS:-131072} timeout ${T2:-150} env INFINITEHIP_LIB="$PWD/libinfinitehip.so" SHIM_DIR="$PWD/python-shim" \
  python3 tests/gpu/test_shim_gpu.py > "$OUT/shim-gpu.log" 2>&1; echo "shim rc $? $(( $(date +%s) - s )) s" | tee -a "$OUT/device.txt"
fi
for f in gpu-test shim-gpu; do
  [ -f "$OUT/$f.log" ] && echo "== $f: $(grep -c '^PASS' "$OUT/$f.log") PASS, $(grep -c '^FAIL' "$OUT/$f.log") FAIL" && grep -E '^FAIL|panicked|Error|error' "$OUT/$f.log" | cut -c1-400 | head -20
done
grep -E 'locret' "$OUT/gpu-test.log" "$OUT/shim-gpu.log" | cut -c1-600 | head -20
tail -3 "$OUT/gpu-test.log"
