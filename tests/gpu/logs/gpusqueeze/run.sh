#!/usr/bin/env bash
# Device run of the squeeze GPU k-means checks and first-decode bench.
set -u
cd "$(dirname "$0")"
OUT=${OUT:-out}; mkdir -p "$OUT"
export INFINITEHIP_CACHE=/tmp/ihip-cache
mkdir -p $INFINITEHIP_CACHE && cp ptx/*.ptx $INFINITEHIP_CACHE/
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.txt"; date -u >> "$OUT/device.txt"
s=$(date +%s)
timeout ${T1:-110} ./infinitehip gpu-test --kmeans-only --squeeze-first-decode ${LENS:-8K,32K,128K} --squeeze-cpu-max 8K > "$OUT/kmeans.log" 2>&1; echo "kmeans rc $? $(( $(date +%s) - s )) s" >> "$OUT/device.txt"
s=$(date +%s)
[ "${ENGINE:-1}" = 1 ] && { timeout ${T2:-50} ./infinitehip gpu-test --engine-only > "$OUT/engine.log" 2>&1; echo "engine rc $? $(( $(date +%s) - s )) s" >> "$OUT/device.txt"; }
cat "$OUT/device.txt"; cat "$OUT/kmeans.log" | cut -c1-400; grep -E "^(PASS|FAIL)|checks" "$OUT/engine.log" 2>/dev/null | cut -c1-300
