#!/usr/bin/env bash
# gpu14b device call 1 (staged as target/gpu14b-carry/ with gpu-bin/ and scripts/sdpa_bench.py):
#   run(command="cd target/gpu14b-carry && BUDGET=285 OUT=$OUT bash run1.sh", carry=["target/gpu14b-carry"], timeout_s=300 (staged in /work/main/target/: the run tool copies the session checkout, /work/main))
# Checks in parallel first: gpu-test --step-only (new: warp scoring kernel vs the per-thread one vs
# a host reference; lean steps the default, readers through selection()), the engine decode checks
# and gpu-test-offload (readers of HipGpuDecoder's selection changed). Then alone on the GPU: the
# SDPA baseline and the 32-layer step: default (warp scoring, lean), --score-v1 (per-thread
# scoring), --no-lean, both (= main's default); ncu on the three scoring launches at 1M.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
BIN=gpu-bin/infinitehip
export PYTHONUNBUFFERED=1 INFINITEHIP_CACHE=/tmp/ihip-cache
mkdir -p "$INFINITEHIP_CACHE"; cp gpu-bin/ptx/*.ptx "$INFINITEHIP_CACHE/" 2>/dev/null
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
T0=$(date +%s); left() { echo $(( ${BUDGET:-230} - ($(date +%s) - T0) )); }
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; date -u; which ncu; } > "$OUT/device.txt" 2>&1
step() {  # step NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2; local s=$(date +%s)
  [ "$t" -lt 5 ] && { echo "$name: skipped (no time)" >> "$OUT/device.txt"; return; }
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - s )) s (at $(( $(date +%s) - T0 )) s)" >> "$OUT/device.txt"
}
cap() { local a=$1 l; l=$(( $(left) - 8 )); echo $(( a < l ? a : l )); }
step step-only 150 $BIN gpu-test --step-only &
step engine-decode 120 $BIN gpu-test --engine-decode-only &
step offload 150 $BIN gpu-test-offload &
step hip-prefill 150 $BIN gpu-test --hip-prefill-only &
wait
step sdpa $(cap 30) python3 scripts/sdpa_bench.py --tokens 131072,1048576 --batch 1 --reps 3 --prefill-tokens '' \
    --model-tokens 131072,1048576 --model-batch 1 --json "$OUT/sdpa.json"
M="$BIN bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 --baseline $OUT/sdpa.json"
step model $(cap 25) $M --tune 0/0/d,0/0/0,0/0/1048576 --json "$OUT/model.json"
step model-v1 $(cap 20) $M --score-v1 --json "$OUT/model-v1.json"
step model-nolean $(cap 20) $M --no-lean --json "$OUT/model-nolean.json"
step model-v1-nolean $(cap 20) $M --score-v1 --no-lean --json "$OUT/model-v1-nolean.json"
step model-2 $(cap 20) $M --json "$OUT/model-2.json"
step ncu $(cap 45) ncu --clock-control none --section SpeedOfLight --section LaunchStats --section Occupancy \
    --section WarpStateStats --section MemoryWorkloadAnalysis -k regex:hip_score -c 3 \
    $BIN bench-gpu-model --tokens 1048576 --batch 1 --reps 1 --layers 4
echo "== summary"
for f in step-only engine-decode offload hip-prefill; do echo "-- $f: PASS $(grep -c '^PASS' "$OUT/$f.log") FAIL $(grep -c '^FAIL' "$OUT/$f.log")"; grep -E '^FAIL' "$OUT/$f.log" | cut -c1-700; tail -2 "$OUT/$f.log" | cut -c1-300; done
grep -E 'hip_scorew keys|device step|lean' "$OUT/step-only.log" | cut -c1-900
for f in model model-v1 model-nolean model-v1-nolean model-2; do echo "-- $f"; grep -E '^\| (score|top-k|assem|attn|hip, all|1048576|131072) ' "$OUT/$f.log" | cut -c1-260; done
grep -E 'hip_score|Duration|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|DRAM Throughput|Memory Throughput|L1/TEX Hit|Stall' "$OUT/ncu.log" | head -45
cat "$OUT/device.txt"
tar czf "$OUT/logs.tgz" -C "$OUT" $(cd "$OUT" && ls *.log *.json *.txt 2>/dev/null) && rm -f "$OUT"/*.log "$OUT"/*.json
