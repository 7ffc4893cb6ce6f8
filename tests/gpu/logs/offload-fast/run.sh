#!/usr/bin/env bash
# offload-fast device run: gpu-test-offload, then bench-gpu-offload (full-device path vs run 4's device path, same run).
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out}; mkdir -p "$OUT"
export INFINITEHIP_CACHE=/tmp/ihip-cache; mkdir -p $INFINITEHIP_CACHE; cp ptx/*.ptx $INFINITEHIP_CACHE/
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"; date -u | tee -a "$OUT/device.txt"; nproc >> "$OUT/device.txt"; free -g >> "$OUT/device.txt"
cp run.sh "$OUT/"
if [ "${SKIP_TEST:-0}" != 1 ]; then
  s=$(date +%s); timeout ${TEST_T:-120} ./infinitehip gpu-test-offload > "$OUT/gpu-test-offload.log" 2>&1; echo "gpu-test-offload rc=$? $(( $(date +%s) - s )) s" | tee -a "$OUT/device.txt"
  grep -E '^(PASS|FAIL)|failed' "$OUT/gpu-test-offload.log" | cut -c1-400
fi
s=$(date +%s)
timeout ${BENCH_T:-150} ./infinitehip bench-gpu-offload --tokens ${TOK:-1048576,4194304} --cache 0.05 --est-rows 0.25 --admission ${ADM:-full-device,device} \
  --steps ${STEPS:-48} --warmup 16 --json "$OUT/bench-gpu-offload.json" > "$OUT/bench-gpu-offload.log" 2>&1
echo "bench rc=$? $(( $(date +%s) - s )) s" | tee -a "$OUT/device.txt"
grep -E '^\|' "$OUT/bench-gpu-offload.log" | head -30; tail -3 "$OUT/bench-gpu-offload.log" | cut -c1-300
