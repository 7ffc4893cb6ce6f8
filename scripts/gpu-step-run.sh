#!/usr/bin/env bash
# Issue 14 device run (graph-capturable hip step, dense decode sweep): runs
# ON the GPU machine from a folder holding infinitehip, libinfinitehip.so,
# ptx/ and this script (copied by the lead's session into .xfer-<name>/).
# Usage there: bash gpu-step-run.sh REPO_ROOT. Logs/JSON under $OUT.
# DENSE_TEST=1: also the dense decode checks (current kernel; DENSE_V2=1:
# kernels/decode_dense_v2.cu too). SHIM=1: tests/gpu/test_shim_gpu.py.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=${1:-$HERE/..}
OUT=${OUT:-$HERE/out}; mkdir -p "$OUT"
BIN=$HERE/infinitehip
export PYTHONUNBUFFERED=1 INFINITEHIP_CACHE=/tmp/ihip-cache
mkdir -p "$INFINITEHIP_CACHE"; cp "$HERE"/ptx/*.ptx "$INFINITEHIP_CACHE/" 2>/dev/null
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
date -u | tee -a "$OUT/device.txt"
rc=0
step() {
  local name=$1 t=$2; shift 2
  local s=$(date +%s)
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1 || { rc=1; echo "FAILED: $name" | tee -a "$OUT/device.txt"; }
  echo "$name: $(( $(date +%s) - s )) s" | tee -a "$OUT/device.txt"
}
step step-test 150 "$BIN" gpu-test --step-only
step sdpa 120 python3 "$ROOT/scripts/sdpa_bench.py" --tokens 131072,1048576 --batch 1,16 --reps 3 \
  --prefill-tokens 32768 --model-tokens 131072,1048576 --json "$OUT/sdpa.json"
step bench-gpu-model 240 "$BIN" bench-gpu-model --baseline "$OUT/sdpa.json" --json "$OUT/bench-gpu-model.json"
step bench-gpu-dense 200 "$BIN" bench-gpu-dense --tokens ${DENSE_TOKENS:-128K,1M} --groups ${DENSE_GROUPS:-4} \
  --dtypes bf16 --variants ${DENSE_VARIANTS:-cur,v2} --waves ${DENSE_WAVES:-1,2,4} --json "$OUT/bench-gpu-dense.json"
if [ "${DENSE_TEST:-0}" = 1 ]; then
  step dense-test 150 "$BIN" gpu-test --dense-only
  [ "${DENSE_V2:-0}" = 1 ] && step dense-test-v2 150 "$BIN" gpu-test --dense-only --dense-v2
fi
if [ "${SHIM:-0}" = 1 ]; then
  step shim-gpu 150 env INFINITEHIP_LIB="$HERE/libinfinitehip.so" python3 "$ROOT/tests/gpu/test_shim_gpu.py"
fi
echo "== summary"
for f in step-test dense-test dense-test-v2 shim-gpu; do
  [ -f "$OUT/$f.log" ] && echo "$f: $(grep -c '^PASS' "$OUT/$f.log") PASS, $(grep -c '^FAIL' "$OUT/$f.log") FAIL" && grep -A2 '^FAIL' "$OUT/$f.log" | cut -c1-600
done
[ -f "$OUT/bench-gpu-model.log" ] && grep -E '^\||^hip layer|^attention' "$OUT/bench-gpu-model.log"
[ -f "$OUT/bench-gpu-dense.log" ] && grep -E '^\|' "$OUT/bench-gpu-dense.log"
tail -3 "$OUT/step-test.log"
cat "$OUT/device.txt"
tar czf "$OUT/logs.tgz" -C "$OUT" $(cd "$OUT" && ls *.log *.json *.txt 2>/dev/null) && rm -f "$OUT"/*.log "$OUT"/*.json
exit $rc
