#!/usr/bin/env bash
# gpu14 device call 1 (run from the repo root, gpu-bin carried):
#   (staged as target/gpu14-carry/run1.sh with gpu-bin/ and scripts/sdpa_bench.py)
#   run(command="cd target/gpu14-carry && BUDGET=285 OUT=$OUT bash run1.sh", carry=["target/gpu14-carry"], timeout_s=300)
# Checks in parallel first (issue 13 fast estimator vs CPU twin; the engine
# bf16-vs-f32 case with diagnostics; dense v2 and sparse v2 with the new
# split merge), then alone on the GPU: the sparse launch sweep, the SDPA
# baseline + 32-layer step (split+combine, sparse v2 + lean), and ncu on
# the sparse launch (new vs previous merge).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
BIN=gpu-bin/infinitehip
export PYTHONUNBUFFERED=1 INFINITEHIP_CACHE=/tmp/ihip-cache
mkdir -p "$INFINITEHIP_CACHE"; cp gpu-bin/ptx/*.ptx "$INFINITEHIP_CACHE/" 2>/dev/null
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
T0=$(date +%s); left() { echo $(( ${BUDGET:-300} - ($(date +%s) - T0) )); }
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; date -u; which ncu nsys; } > "$OUT/device.txt" 2>&1
step() {  # step NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2; local s=$(date +%s)
  [ "$t" -lt 5 ] && { echo "$name: skipped (no time)" >> "$OUT/device.txt"; return; }
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - s )) s (at $(( $(date +%s) - T0 )) s)" >> "$OUT/device.txt"
}
cap() { local a=$1 l; l=$(( $(left) - 10 )); echo $(( a < l ? a : l )); }
step hip-fast-cpu 150 $BIN gpu-test --hip-fast-cpu-only &
step engine-decode 150 $BIN gpu-test --engine-decode-only &
step dense-only 170 $BIN gpu-test --dense-only &
step step-sparse 170 $BIN gpu-test --step-only --sparse-v2 &
wait
step bench-sparse $(cap 60) $BIN bench-gpu-sparse --tokens 1M --batch 1,16 --json "$OUT/bench-sparse.json"
step sdpa $(cap 40) python3 scripts/sdpa_bench.py --tokens 131072,1048576 --batch 1 --reps 3 --prefill-tokens '' \
    --model-tokens 131072,1048576 --model-batch 1 --json "$OUT/sdpa.json"
step model-lean $(cap 50) $BIN bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 --baseline "$OUT/sdpa.json" --lean --json "$OUT/model-lean.json"
step model-split $(cap 50) $BIN bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 --baseline "$OUT/sdpa.json" --json "$OUT/model-split.json"
step ncu $(cap 60) ncu --clock-control none --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    -k regex:hip_sparse -c 8 $BIN bench-gpu-sparse --tokens 1M --batch 1 --splits 0 --chunks 2 --reps 1
echo "== summary"
for f in hip-fast-cpu engine-decode dense-only step-sparse; do echo "-- $f"; grep -E '^FAIL' "$OUT/$f.log" | cut -c1-600; echo "PASS $(grep -c '^PASS' "$OUT/$f.log") FAIL $(grep -c '^FAIL' "$OUT/$f.log")"; tail -1 "$OUT/$f.log" | cut -c1-300; done
grep -E '^\|' "$OUT/bench-sparse.log" | grep -E '^\| 1 \||^\| 16 \| (default|128|256) '
for f in model-lean model-split; do echo "-- $f"; grep -E '^\| (attn|hip, all|1048576|131072) ' "$OUT/$f.log"; done
grep -E 'hip_sparse|Duration|Registers Per|Achieved Occupancy|Stall Long|Stall Barrier|Warp Cycles Per Issued|DRAM Throughput' "$OUT/ncu.log" | head -40
cat "$OUT/device.txt"
tar czf "$OUT/logs.tgz" -C "$OUT" $(cd "$OUT" && ls *.log *.json *.txt 2>/dev/null) && rm -f "$OUT"/*.log "$OUT"/*.json
