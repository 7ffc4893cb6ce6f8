#!/usr/bin/env bash
# Whole GPU check under a tight device budget (BUDGET seconds of wall time):
# the correctness checks first, in parallel (the GPU test target and the
# Python shim test, incl. SGLang's CUDA-graph replay), then the benchmarks,
# each alone on the GPU and only while time is left: the 32-layer step
# (the default: sparse v2 attention, warp scoring, lean steps; the previous
# default: per-thread scoring, full steps; and split+combine, same SDPA
# baseline). Runs ON the GPU
# machine from the repo root with gpu-bin/ carried (scripts/gpu-check.sh
# builds it). scripts/gpu-run.sh is the unhurried version of the same.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
BIN=gpu-bin/infinitehip
export PYTHONUNBUFFERED=1 INFINITEHIP_CACHE=/tmp/ihip-cache
mkdir -p "$INFINITEHIP_CACHE"; [ -f gpu-bin/ptx.tar.xz ] && tar xJf gpu-bin/ptx.tar.xz -C "$INFINITEHIP_CACHE" --strip-components=1
cp gpu-bin/ptx/*.ptx "$INFINITEHIP_CACHE/" 2>/dev/null
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
T0=$(date +%s); left() { echo $(( ${BUDGET:-450} - ($(date +%s) - T0) )); }
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; date -u; } > "$OUT/device.txt"
step() {  # step NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2; local s=$(date +%s)
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - s )) s (at $(( $(date +%s) - T0 )) s)" >> "$OUT/device.txt"
}
step gpu-tests ${TESTS_T:-420} env INFINITEHIP_BIN=$BIN gpu-bin/gpu-tests &
{ step shim-gpu 150 env INFINITEHIP_LIB="$PWD/gpu-bin/libinfinitehip.so" python3 tests/gpu/test_shim_gpu.py
  step shim-offload-gpu 100 env INFINITEHIP_LIB="$PWD/gpu-bin/libinfinitehip.so" python3 tests/gpu/test_shim_offload_gpu.py
  step shim-locret-free 90 env INFINITEHIP_LIB="$PWD/gpu-bin/libinfinitehip.so" python3 tests/gpu/test_shim_locret_free.py; } &
# the engine decode case with 2 chunks per iteration over a token-major pool (failed 2026-12-04 07:31)
step engine-u2 200 $BIN gpu-test --engine-decode-only --dense-chunks 2 &
wait
if [ "$(left)" -gt 100 ]; then
  step sdpa 60 python3 scripts/sdpa_bench.py --tokens 131072,1048576 --batch 1 --reps 3 --prefill-tokens '' \
    --model-tokens 131072,1048576 --model-batch 1 --json "$OUT/sdpa.json"
  step bench-gpu-model 60 $BIN bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 --baseline "$OUT/sdpa.json" --json "$OUT/bench-gpu-model.json"
fi
# the previous default (per-thread scoring, full steps), then the previous split-K + combine hip attention
[ "$(left)" -gt 45 ] && step bench-gpu-model-prev $(( $(left) - 5 < 60 ? $(left) - 5 : 60 )) $BIN bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 --baseline "$OUT/sdpa.json" --score-v1 --no-lean --json "$OUT/bench-gpu-model-prev.json"
[ "$(left)" -gt 45 ] && step bench-gpu-model-split $(( $(left) - 5 < 60 ? $(left) - 5 : 60 )) $BIN bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 --baseline "$OUT/sdpa.json" --split-combine --json "$OUT/bench-gpu-model-split.json"
# the default with plain launches instead of programmatic dependent launch (backend/cuda/pdl.rs), same baseline
[ "$(left)" -gt 45 ] && step bench-gpu-model-nopdl $(( $(left) - 5 < 60 ? $(left) - 5 : 60 )) $BIN bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 --baseline "$OUT/sdpa.json" --no-pdl --json "$OUT/bench-gpu-model-nopdl.json"
echo "== summary"
grep -E '^test result|^test .*(FAILED|ok)$' "$OUT/gpu-tests.log" | tail -40
echo "shim-gpu: $(grep -c '^PASS' "$OUT/shim-gpu.log") PASS, $(grep -c '^FAIL' "$OUT/shim-gpu.log") FAIL"; grep '^FAIL' "$OUT/shim-gpu.log"; tail -3 "$OUT/shim-gpu.log"
for f in shim-offload-gpu shim-locret-free engine-u2; do echo "-- $f"; grep -E '^(PASS|FAIL)' "$OUT/$f.log" | cut -c1-250; tail -2 "$OUT/$f.log"; done
for f in bench-gpu-model bench-gpu-model-prev bench-gpu-model-split bench-gpu-model-nopdl; do [ -f "$OUT/$f.log" ] && echo "-- $f" && grep -E '^\|' "$OUT/$f.log"; done
cat "$OUT/device.txt"
tar czf "$OUT/logs.tgz" -C "$OUT" $(cd "$OUT" && ls *.log *.json *.txt 2>/dev/null) && rm -f "$OUT"/*.log
