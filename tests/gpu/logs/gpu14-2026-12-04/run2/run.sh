#!/usr/bin/env bash
# gpu14 device call 2 (run from a folder holding gpu-bin/ and scripts/sdpa_bench.py, repo root tests/ beside):
#   run(command="cd target/gpu14-carry && BUDGET=390 OUT=$OUT REPO=../.. bash run2.sh", carry=["target/gpu14-carry"], timeout_s=410)
# The whole GPU check of the branch (GPU test target: gpu-test, --step-only, --hip-prefill-only,
# --hip-fast-cpu-only, gpu-test-offload; the Python shim GPU tests, SGLang CUDA graphs among them),
# then alone on the GPU: the sparse launch sweep, the SDPA baseline and the 32-layer step with hip
# attention through sparse v2 (now the default), sparse v2 + lean steps, and the previous split+combine.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
R=${REPO:-../..}   # the repo root (tests/gpu/*.py)
BIN=gpu-bin/infinitehip
export PYTHONUNBUFFERED=1 INFINITEHIP_CACHE=/tmp/ihip-cache
mkdir -p "$INFINITEHIP_CACHE"; cp gpu-bin/ptx/*.ptx "$INFINITEHIP_CACHE/" 2>/dev/null
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
T0=$(date +%s); left() { echo $(( ${BUDGET:-380} - ($(date +%s) - T0) )); }
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; date -u; } > "$OUT/device.txt" 2>&1
step() {  # step NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2; local s=$(date +%s)
  [ "$t" -lt 5 ] && { echo "$name: skipped (no time)" >> "$OUT/device.txt"; return; }
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - s )) s (at $(( $(date +%s) - T0 )) s)" >> "$OUT/device.txt"
}
cap() { local a=$1 l; l=$(( $(left) - 12 )); echo $(( a < l ? a : l )); }
step gpu-tests 290 env INFINITEHIP_BIN=$BIN gpu-bin/gpu-tests &
LIB="$PWD/gpu-bin/libinfinitehip.so"
{ step shim-gpu 150 env INFINITEHIP_LIB="$LIB" python3 $R/tests/gpu/test_shim_gpu.py
  step shim-offload-gpu 100 env INFINITEHIP_LIB="$LIB" python3 $R/tests/gpu/test_shim_offload_gpu.py
  step shim-locret-free 90 env INFINITEHIP_LIB="$LIB" python3 $R/tests/gpu/test_shim_locret_free.py; } &
wait
step bench-sparse $(cap 40) $BIN bench-gpu-sparse --tokens 1M --batch 1,16 --json "$OUT/bench-sparse.json"
step sdpa $(cap 40) python3 scripts/sdpa_bench.py --tokens 131072,1048576 --batch 1 --reps 3 --prefill-tokens '' \
    --model-tokens 131072,1048576 --model-batch 1 --json "$OUT/sdpa.json"
step model $(cap 40) $BIN bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 --baseline "$OUT/sdpa.json" --json "$OUT/model.json"
step model-lean $(cap 40) $BIN bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 --baseline "$OUT/sdpa.json" --lean --json "$OUT/model-lean.json"
step model-split $(cap 40) $BIN bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 --baseline "$OUT/sdpa.json" --split-combine --json "$OUT/model-split.json"
step ncu $(cap 40) ncu --clock-control none --section SpeedOfLight --section LaunchStats --section WarpStateStats \
    -k regex:hip_sparse -c 2 $BIN bench-gpu-sparse --tokens 1M --batch 1 --splits 0 --chunks 2 --reps 1
echo "== summary"
grep -E '^test result|FAILED|SKIPPED' "$OUT/gpu-tests.log" | cut -c1-400 | tail -30
grep -E '^FAIL' "$OUT/gpu-tests.log" | cut -c1-500
grep -E 'bf16 out == f32 out' "$OUT/gpu-tests.log" | cut -c1-400
echo "shim-gpu: $(grep -c '^PASS' "$OUT/shim-gpu.log") PASS, $(grep -c '^FAIL' "$OUT/shim-gpu.log") FAIL"; grep '^FAIL' "$OUT/shim-gpu.log" | cut -c1-300
for f in shim-offload-gpu shim-locret-free; do echo "-- $f: $(grep -c '^PASS' "$OUT/$f.log") PASS, $(grep -c '^FAIL' "$OUT/$f.log") FAIL"; tail -1 "$OUT/$f.log" | cut -c1-200; done
grep -E '^\| 1 \| (default|128|256)|^\| 16 \| default' "$OUT/bench-sparse.log"
for f in model model-lean model-split; do echo "-- $f"; grep -E '^\| (attn|hip, all|1048576|131072) ' "$OUT/$f.log"; done
grep -E 'Duration|Registers Per|Warp Cycles Per Issued' "$OUT/ncu.log" | head -8
cat "$OUT/device.txt"
tar czf "$OUT/logs.tgz" -C "$OUT" $(cd "$OUT" && ls *.log *.json *.txt 2>/dev/null) && rm -f "$OUT"/*.log "$OUT"/*.json
