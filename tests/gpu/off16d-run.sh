#!/usr/bin/env bash
# off16d device call (one H200, <= 300 s), staged by tests/gpu/off16d-stage.sh:
#   run(command="cd target/off16d-bin && OUT=$OUT BUDGET=285 bash off16d-run.sh",
#       carry=["target/off16d-bin"], timeout_s=300)
# 1) gpu-test-offload: every check (+ 6 new: right-probe reuse + admit-all rows, with
#    appends, storms, pinned search levels 1-2, and two mutations that must change
#    selections: reuse at every level, pinned rows from the wrong offset)
# 2) the command of record with the old estimation row cache (--est-admit half
#    --est-reuse off --est-pin 0, run 8's path) and the new ones in the same process
#    (8 variants per size and row fraction; the pinned rows come out of the same budget)
# 3) if time is left: 1M by refresh class (phase events on), old and new
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
BIN=gpu-bin/infinitehip
export INFINITEHIP_CACHE=/tmp/ihip-cache; mkdir -p $INFINITEHIP_CACHE
tar xJf gpu-bin/ptx.tar.xz -C gpu-bin && cp gpu-bin/ptx/*.ptx $INFINITEHIP_CACHE/
export INFINITEHIP_LAZY_MODULES=all
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
T0=$(date +%s); left() { echo $(( ${BUDGET:-285} - ($(date +%s) - T0) )); }
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,pcie.link.gen.current,pcie.link.width.current --format=csv; date -u; uptime; } > "$OUT/device.txt" 2>&1
cp "$0" "$OUT/" 2>/dev/null
step() {  # step NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2; local s=$(date +%s)
  [ "$t" -lt 5 ] && { echo "$name: skipped (no time)" | tee -a "$OUT/device.txt"; return 1; }
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - s )) s (at $(( $(date +%s) - T0 )) s)" | tee -a "$OUT/device.txt"
  return $rc
}
cap() { local a=$1 l; l=$(( $(left) - ${2:-0} )); echo $(( a < l ? a : l )); }
step gpu-test-offload $(cap 125 100) $BIN gpu-test-offload
BENCH="bench-gpu-offload --tokens 1048576,4194304 --cache 0.05 --est-rows 0.25,0.5 --admission full-device --est-fetch warp --steps 48 --warmup 16"
step bench $(cap 130 5) $BIN $BENCH --est-admit half,all --est-reuse off,on --est-pin 0,2 --json "$OUT/bench.json"
step bench-events $(cap 40) $BIN bench-gpu-offload --tokens 1048576 --cache 0.05 --est-rows 0.25 --admission full-device --est-fetch warp --steps 48 --warmup 16 --est-admit half,all --est-reuse off,on --est-pin 0,2 --phase-events on --json "$OUT/bench-events.json"
echo "== tests"; grep -E '^(PASS|FAIL)|failed|error' "$OUT/gpu-test-offload.log" | cut -c1-400
for f in bench bench-events; do echo "== $f"; grep -E '^\| [0-9]' "$OUT/$f.log" | head -34 | cut -c1-330; done
echo "== classes"; grep -A40 'By refresh class' "$OUT/bench-events.log" | grep -E '^\| 1048576' | cut -c1-300
cat "$OUT/device.txt"
