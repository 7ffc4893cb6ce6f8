#!/usr/bin/env bash
# Runs ON the GPU machine (see scripts/gpu-check.sh for how it gets there):
# every GPU test, then the benchmarks, printing a summary last. Results
# under $OUT. SKIP_TEST=1 / SKIP_BENCH=1 / SKIP_OFFLOAD_BENCH=1 skip parts.
# HIP_PREFILL_ONLY=1: only the hip prefill estimator checks
# (gpu-test --hip-prefill-only) and the prefill benchmark (SDPA causal and
# bench-gpu --prefill-only, both mask estimators; PREFILL_TOKENS, default
# 32K,128K,1M; the reference estimator only up to 128K).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
BIN=${BIN:-gpu-bin/infinitehip}
export PYTHONUNBUFFERED=1 INFINITEHIP_CACHE=/tmp/ihip-cache
mkdir -p "$INFINITEHIP_CACHE"; [ -f gpu-bin/ptx.tar.xz ] && tar xJf gpu-bin/ptx.tar.xz -C "$INFINITEHIP_CACHE" --strip-components=1
cp gpu-bin/ptx/*.ptx "$INFINITEHIP_CACHE/" 2>/dev/null
# libnvrtc: the CUDA toolkit's, else the pip wheel's.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
date -u | tee -a "$OUT/device.txt"
rc=0
if [ "${HIP_PREFILL_ONLY:-0}" = 1 ]; then
  SKIP_TEST=1 SKIP_OFFLOAD_BENCH=1 SKIP_BENCH=1
fi
step() {  # step NAME TIMEOUT CMD...: run, log to $OUT/NAME.log, time it
  local name=$1 t=$2; shift 2
  local s=$(date +%s)
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1 || { rc=1; echo "FAILED: $name (see $name.log)" | tee -a "$OUT/device.txt"; }
  echo "$name: $(( $(date +%s) - s )) s" | tee -a "$OUT/device.txt"
}
if [ "${SKIP_TEST:-0}" != 1 ]; then
  # The checks through the test target (each check a test; a skip or a
  # missing GPU fails it), then the engine timing (a benchmark).
  step gpu-tests 440 env INFINITEHIP_BIN="$BIN" gpu-bin/gpu-tests
  step gpu-test 240 "$BIN" gpu-test --engine-timing 128K,1M
  step shim-gpu 200 env INFINITEHIP_LIB="$PWD/gpu-bin/libinfinitehip.so" python3 tests/gpu/test_shim_gpu.py
  step shim-offload-gpu 120 env INFINITEHIP_LIB="$PWD/gpu-bin/libinfinitehip.so" python3 tests/gpu/test_shim_offload_gpu.py
  step shim-locret-free 90 env INFINITEHIP_LIB="$PWD/gpu-bin/libinfinitehip.so" python3 tests/gpu/test_shim_locret_free.py
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  step sdpa 200 python3 scripts/sdpa_bench.py --model-tokens 131072,1048576 --json "$OUT/sdpa.json" ${SDPA_ARGS:-}
  step bench-gpu 330 "$BIN" bench-gpu --baseline "$OUT/sdpa.json" --json "$OUT/bench-gpu.json" ${BENCH_ARGS:-}
  # Dense decode kernel sweep and the 32-layer model step (issue 14).
  step bench-gpu-dense 200 "$BIN" bench-gpu-dense --json "$OUT/bench-gpu-dense.json"
  step bench-gpu-model 200 "$BIN" bench-gpu-model --baseline "$OUT/sdpa.json" --json "$OUT/bench-gpu-model.json"
  python3 scripts/plot_gpu.py "$OUT/bench-gpu.json" "$OUT/bench-gpu.png" 2>&1 | tail -2
fi
if [ "${HIP_PREFILL_ONLY:-0}" = 1 ]; then
  PT=${PREFILL_TOKENS:-32768,131072,1048576}
  step gpu-test-hip-prefill 240 "$BIN" gpu-test --hip-prefill-only
  step sdpa 200 python3 scripts/sdpa_bench.py --tokens 32768 --batch 1 --reps 3 --prefill-tokens "$PT" --json "$OUT/sdpa.json"
  step bench-gpu 330 "$BIN" bench-gpu --prefill-only --prefill-tokens "$PT" --estimators fast --baseline "$OUT/sdpa.json" --json "$OUT/bench-gpu.json"
  step bench-gpu-ref 200 "$BIN" bench-gpu --prefill-only --prefill-tokens 32768,131072 --estimators ref --baseline "$OUT/sdpa.json" --json "$OUT/bench-gpu-ref.json"
  grep -E '^(PASS|FAIL)' "$OUT/gpu-test-hip-prefill.log"
  for f in bench-gpu bench-gpu-ref; do sed -n '/^| prefill tokens | mask/,/^$/p' "$OUT/$f.log"; done
fi
if [ "${SKIP_OFFLOAD_BENCH:-0}" != 1 ]; then
  step bench-gpu-offload 200 "$BIN" bench-gpu-offload --tokens ${OFFLOAD_TOKENS:-1048576,4194304} --cache 0.05 \
    --est-rows 0.25 --steps 48 --warmup 16 --json "$OUT/bench-gpu-offload.json"
fi
echo "== summary"
[ -f "$OUT/gpu-tests.log" ] && grep -E '^test result|^  ' "$OUT/gpu-tests.log"
for f in gpu-test shim-gpu shim-locret-free; do
  [ -f "$OUT/$f.log" ] && echo "$f: $(grep -c '^PASS' "$OUT/$f.log") PASS, $(grep -c '^FAIL' "$OUT/$f.log") FAIL" && grep '^FAIL' "$OUT/$f.log"
done
[ -f "$OUT/gpu-test.log" ] && grep -iE 'engine-timing|^timing' "$OUT/gpu-test.log" | head -12
[ -f "$OUT/shim-gpu.log" ] && tail -4 "$OUT/shim-gpu.log"
[ -f "$OUT/bench-gpu.log" ] && sed -n '/^| tokens/,$p' "$OUT/bench-gpu.log"
[ -f "$OUT/bench-gpu-model.log" ] && grep -E '^\|' "$OUT/bench-gpu-model.log"
[ -f "$OUT/bench-gpu-dense.log" ] && grep -E '^\| (131072|1048576) \| (1|16) \| bf16 \| 4 ' "$OUT/bench-gpu-dense.log"
[ -f "$OUT/bench-gpu-offload.log" ] && grep -E '^\|' "$OUT/bench-gpu-offload.log" | head -12
cat "$OUT/device.txt"
# The device tool returns at most 8 files: the small logs go in one tarball.
tar czf "$OUT/logs.tgz" -C "$OUT" $(cd "$OUT" && ls *.log *.json *.txt 2>/dev/null) && rm -f "$OUT"/*.log "$OUT"/sdpa.json
exit $rc
