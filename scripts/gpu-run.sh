#!/usr/bin/env bash
# Runs ON the GPU machine (see scripts/gpu-check.sh for how it gets there):
# GPU tests, then the benchmark, printing a table last. Results under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
BIN=${BIN:-gpu-bin/infinitehip}
export PYTHONUNBUFFERED=1 INFINITEHIP_CACHE=/tmp/ihip-cache
# libnvrtc: the CUDA toolkit's, else the pip wheel's.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
date -u | tee -a "$OUT/device.txt"
rc=0
[ "${SKIP_TEST:-0}" = 1 ] || timeout ${TEST_TIMEOUT:-200} "$BIN" gpu-test ${GPU_TEST_ARGS:-} 2>&1 | tee "$OUT/gpu-test.log" || rc=1
[ "${SKIP_BENCH:-0}" = 1 ] && exit $rc
timeout ${SDPA_TIMEOUT:-200} python3 scripts/sdpa_bench.py --json "$OUT/sdpa.json" ${SDPA_ARGS:-} 2>&1 | tee "$OUT/sdpa.log"
timeout ${BENCH_TIMEOUT:-330} "$BIN" bench-gpu --baseline "$OUT/sdpa.json" --json "$OUT/bench-gpu.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" || rc=1
python3 scripts/plot_gpu.py "$OUT/bench-gpu.json" "$OUT/bench-gpu.png" 2>&1 | tail -2
[ -f "$OUT/gpu-test.log" ] && grep -E '^(PASS|FAIL|gpu-test)' "$OUT/gpu-test.log" | tail -40
sed -n '/^| tokens/,$p' "$OUT/bench.log"
exit $rc
