#!/usr/bin/env bash
# off16 device call 2, staged in /work/main/target/off16-bin (gpu-bin/{infinitehip,ptx/} + this script):
#   run(command="cd target/off16-bin && OUT=$OUT BUDGET=160 bash run2.sh", carry=["target/off16-bin"], timeout_s=170)
# 1) gpu-test-offload (12 checks; the mutation check now bypasses the whole reuse test)
# 2) the command of record (defaults now: page reuse on, late admission on, row preload on, phase events off)
# 3) before, same process kind: run 6's path (reuse off, late admission off, preload off), events off
# 4) 1M breakdown: row preload off/on with the phase events on
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
BIN=gpu-bin/infinitehip
export INFINITEHIP_CACHE=/tmp/ihip-cache; mkdir -p $INFINITEHIP_CACHE; cp gpu-bin/ptx/*.ptx $INFINITEHIP_CACHE/
export INFINITEHIP_LAZY_MODULES=all
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
T0=$(date +%s); left() { echo $(( ${BUDGET:-160} - ($(date +%s) - T0) )); }
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
step gpu-test-offload $(cap 70 75) $BIN gpu-test-offload
BENCH="bench-gpu-offload --tokens 1048576,4194304 --cache 0.05 --est-rows 0.25,0.5 --admission full-device --est-fetch warp --steps 48 --warmup 16"
step bench $(cap 45 30) $BIN $BENCH --json "$OUT/bench.json"
step bench-run6-path $(cap 40 10) $BIN $BENCH --page-reuse off --late-admission off --est-preload off --json "$OUT/bench-run6-path.json"
step bench-preload-events $(cap 25) $BIN bench-gpu-offload --tokens 1048576 --cache 0.05 --est-rows 0.25,0.5 --admission full-device --est-fetch warp --steps 48 --warmup 16 --est-preload off,on --phase-events on --json "$OUT/bench-preload-events.json"
echo "== tests"; grep -E '^(PASS|FAIL)|failed' "$OUT/gpu-test-offload.log" | cut -c1-200
for f in bench bench-run6-path bench-preload-events; do echo "== $f"; grep -E '^\| [0-9]' "$OUT/$f.log" | head -4 | cut -c1-250; done
cat "$OUT/device.txt"
