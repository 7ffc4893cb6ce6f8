#!/usr/bin/env bash
# offload16 device call 2 (staged in a folder holding gpu-bin/{infinitehip,libinfinitehip.so,ptx/} and this script; repo root at ../..):
#   run(command="cd target/offload16-carry && OUT=$OUT bash run2.sh", carry=["target/offload16-carry"], timeout_s=240)
# 1) bench-gpu-offload, full-device path (warp-staged misses, idle steps skip the admission), 25% and 50% row caches
# 2) gpu-test-offload (11 checks)   3) the SGLang shim's offload GPU test (the engines' route, now full-device by default)
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
BIN=gpu-bin/infinitehip
R=${REPO:-../..}
export PYTHONUNBUFFERED=1 INFINITEHIP_CACHE=/tmp/ihip-cache; mkdir -p $INFINITEHIP_CACHE; cp gpu-bin/ptx/*.ptx $INFINITEHIP_CACHE/
# Load (JIT) only the kernel modules a command uses (a cold machine JIT-compiles ~27 MB of PTX otherwise).
export INFINITEHIP_LAZY_MODULES=all
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
T0=$(date +%s); left() { echo $(( ${BUDGET:-232} - ($(date +%s) - T0) )); }
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,pcie.link.gen.current,pcie.link.width.current --format=csv; date -u; } > "$OUT/device.txt" 2>&1
cp run2.sh "$OUT/"
step() {  # step NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2; local s=$(date +%s)
  [ "$t" -lt 5 ] && { echo "$name: skipped (no time)" | tee -a "$OUT/device.txt"; return 1; }
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - s )) s (at $(( $(date +%s) - T0 )) s)" | tee -a "$OUT/device.txt"
  return $rc
}
cap() { local a=$1 l; l=$(( $(left) - ${2:-0} )); echo $(( a < l ? a : l )); }
BENCH="bench-gpu-offload --tokens 1048576,4194304 --cache 0.05 --est-rows 0.25,0.5 --admission full-device --est-fetch warp --steps 48 --warmup 16"
s=$(date +%s)
if ! step bench $(cap 120 75) $BIN $BENCH --json "$OUT/bench.json" && [ $(( $(date +%s) - s )) -lt 15 ]; then
  # A failure at once (the lazy loading?): again with every module loaded up front.
  INFINITEHIP_LAZY_MODULES= step bench-eager $(cap 140 60) $BIN $BENCH --json "$OUT/bench.json"
fi
step gpu-test-offload $(cap 100 12) $BIN gpu-test-offload
step shim-offload-gpu $(cap 60) env INFINITEHIP_LIB="$PWD/gpu-bin/libinfinitehip.so" python3 $R/tests/gpu/test_shim_offload_gpu.py
echo "== bench"; grep -E '^\|' "$OUT"/bench*.log | grep -v -- '---' | cut -c1-330 | head -40
echo "== tests"; grep -E '^(PASS|FAIL)|failed' "$OUT/gpu-test-offload.log" | cut -c1-260
grep -E '^(PASS|FAIL)' "$OUT/shim-offload-gpu.log" | cut -c1-200; tail -2 "$OUT/shim-offload-gpu.log" | cut -c1-300
cat "$OUT/device.txt"
