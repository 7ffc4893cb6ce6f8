#!/usr/bin/env bash
# offload3: gpu-test-offload then bench-gpu-offload (device vs host admission), one call.
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out}; mkdir -p "$OUT"
export INFINITEHIP_CACHE=$PWD/ptx
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
cp run.sh "$OUT/run.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
date -u | tee -a "$OUT/device.txt"
s=$(date +%s)
timeout ${TEST_T:-150} ./infinitehip gpu-test-offload 2>&1 | tee "$OUT/gpu-test-offload.log"
rc=${PIPESTATUS[0]}
echo "gpu-test-offload rc $rc, $(( $(date +%s) - s )) s" | tee -a "$OUT/device.txt"
[ "${SKIP_BENCH:-0}" = 1 ] && exit $rc
s=$(date +%s)
timeout ${BENCH_T:-380} ./infinitehip bench-gpu-offload --tokens ${TOKENS:-1048576,4194304,8388608} --cache 0.05 --est-rows ${EST:-0.25,0.05} \
  --admission ${ADM:-device,host} --steps ${STEPS:-64} --warmup ${WARM:-32} --json "$OUT/bench-gpu-offload.json" 2>&1 | tee "$OUT/bench-gpu-offload.log"
echo "bench rc ${PIPESTATUS[0]}, $(( $(date +%s) - s )) s" | tee -a "$OUT/device.txt"
exit $rc
