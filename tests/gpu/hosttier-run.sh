#!/usr/bin/env bash
# The host tier's checks after a change to its defaults, in one short device
# call (~2 min on a warm machine): the shim's decode_host == decode bit for
# bit and greedy tokens through the SGLang backend offload == resident
# (test_shim_offload_gpu.py), then gpu-test-offload.
#   here:  bash scripts/gpu-check.sh
#   there: run(command="bash tests/gpu/hosttier-run.sh", carry=["gpu-bin"], timeout_s=300)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 INFINITEHIP_CACHE=${INFINITEHIP_CACHE:-/tmp/ihip-cache} INFINITEHIP_LAZY_MODULES=all
mkdir -p "$INFINITEHIP_CACHE"; [ -f gpu-bin/ptx.tar.xz ] && tar xJf gpu-bin/ptx.tar.xz -C "$INFINITEHIP_CACHE" --strip-components=1
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u; } > "$OUT/device.txt"
s=$(date +%s)
timeout ${SHIM_T:-100} env INFINITEHIP_LIB="$PWD/gpu-bin/libinfinitehip.so" python3 tests/gpu/test_shim_offload_gpu.py \
  > "$OUT/shim-offload-gpu.log" 2>&1
echo "shim-offload-gpu: rc=$? $(( $(date +%s) - s )) s" >> "$OUT/device.txt"
s=$(date +%s)
timeout ${OFF_T:-150} gpu-bin/infinitehip gpu-test-offload > "$OUT/gpu-test-offload.log" 2>&1
echo "gpu-test-offload: rc=$? $(( $(date +%s) - s )) s" >> "$OUT/device.txt"
cat "$OUT/device.txt"
for f in shim-offload-gpu gpu-test-offload; do
  echo "-- $f"; grep -E '^(PASS|FAIL)|failed' "$OUT/$f.log" | cut -c1-260; tail -2 "$OUT/$f.log" | cut -c1-300
done
