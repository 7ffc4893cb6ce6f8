#!/usr/bin/env bash
# off16 device call 1, staged in /work/main/target/off16-bin (gpu-bin/{infinitehip,ptx/} + this script):
#   run(command="cd target/off16-bin && OUT=$OUT BUDGET=215 bash run1.sh", carry=["target/off16-bin"], timeout_s=230)
# 1) gpu-test-offload (12 checks: walk reuse, late admission, the mutation check)
# 2) the command of record (defaults now: --page-reuse on --late-admission on)
# 3) 1M: page reuse off/on x late admission off/on in one process (off/off = run 6's path)
# 4) 1M: the same with the phase events off (no instrumentation inside the timed step)
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
BIN=gpu-bin/infinitehip
export INFINITEHIP_CACHE=/tmp/ihip-cache; mkdir -p $INFINITEHIP_CACHE; cp gpu-bin/ptx/*.ptx $INFINITEHIP_CACHE/
export INFINITEHIP_LAZY_MODULES=all
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
T0=$(date +%s); left() { echo $(( ${BUDGET:-215} - ($(date +%s) - T0) )); }
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
step gpu-test-offload $(cap 60 120) $BIN gpu-test-offload
BENCH="bench-gpu-offload --cache 0.05 --admission full-device --est-fetch warp --steps 48 --warmup 16"
step bench $(cap 80 50) $BIN $BENCH --tokens 1048576,4194304 --est-rows 0.25,0.5 --json "$OUT/bench.json"
step bench-variants $(cap 60 12) $BIN $BENCH --tokens 1048576 --est-rows 0.25,0.5 --page-reuse off,on --late-admission off,on --json "$OUT/bench-variants.json"
step bench-noevents $(cap 30) $BIN $BENCH --tokens 1048576 --est-rows 0.25,0.5 --phase-events off --json "$OUT/bench-noevents.json"
echo "== tests"; grep -E '^(PASS|FAIL)|failed' "$OUT/gpu-test-offload.log" | cut -c1-230
for f in bench bench-variants bench-noevents; do echo "== $f"; grep -E '^\| [0-9]' "$OUT/$f.log" | head -12 | cut -c1-260; done
cat "$OUT/device.txt"
