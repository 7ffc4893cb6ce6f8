#!/usr/bin/env bash
# off16c device call 2, staged in /work/main/target/off16c-bin (gpu-bin/{infinitehip,ptx/} + this script):
#   run(command="cd target/off16c-bin && OUT=$OUT BUDGET=100 bash run2.sh", carry=["target/off16c-bin"], timeout_s=110)
# 1) gpu-test-offload (14 checks, printed as each finishes; call 1's was cut at 85 s before printing)
# 2) if time is left: the command of record at 1M only, run 7's path and the new one (second sample)
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
BIN=gpu-bin/infinitehip
export INFINITEHIP_CACHE=/tmp/ihip-cache; mkdir -p $INFINITEHIP_CACHE; cp gpu-bin/ptx/*.ptx $INFINITEHIP_CACHE/
export INFINITEHIP_LAZY_MODULES=all
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
T0=$(date +%s); left() { echo $(( ${BUDGET:-100} - ($(date +%s) - T0) )); }
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
step gpu-test-offload $(cap 92 0) $BIN gpu-test-offload
BENCH="bench-gpu-offload --tokens 1048576 --cache 0.05 --est-rows 0.25,0.5 --admission full-device --est-fetch warp --steps 48 --warmup 16"
step bench-1m $(cap 20) $BIN $BENCH --page-prefetch off,on --json "$OUT/bench-1m.json"
echo "== tests"; grep -E '^(PASS|FAIL)|failed|error' "$OUT/gpu-test-offload.log" | cut -c1-330
echo "== bench-1m"; grep -E '^\| [0-9]' "$OUT/bench-1m.log" | head -4 | cut -c1-300
cat "$OUT/device.txt"
