#!/usr/bin/env bash
# rope12g device call (staged as /work/main/target/rope12g-bin/ with the CLI binary,
# ptx/ and this script; the run tool copies /work/main):
#   run(command="cd target/rope12g-bin && BUDGET=<s> OUT=$OUT bash run.sh", carry=["target/rope12g-bin"])
# In parallel: gpu-test --rope-only (RoPE modes of the GPU hip decode vs the CPU HipPolicy;
# then, in the same process, the RoPE-mode step timing at 128K and 1M) and gpu-test
# --step-only (the original-position path intact). Modules load on first use
# (INFINITEHIP_LAZY_MODULES=all): the driver JITs only what each process runs (call 1, with
# every module JIT-compiled at start by both processes, ran out of its 100 s).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
BIN=./infinitehip
export PYTHONUNBUFFERED=1 INFINITEHIP_CACHE=/tmp/ihip-cache INFINITEHIP_LAZY_MODULES=all
mkdir -p "$INFINITEHIP_CACHE"; cp ptx/*.ptx "$INFINITEHIP_CACHE/" 2>/dev/null
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
T0=$(date +%s); left() { echo $(( ${BUDGET:-85} - ($(date +%s) - T0) )); }
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; date -u; uptime; } > "$OUT/device.txt" 2>&1
step() {  # step NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2; local s=$(date +%s)
  [ "$t" -lt 5 ] && { echo "$name: skipped (no time)" >> "$OUT/device.txt"; return; }
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - s )) s (at $(( $(date +%s) - T0 )) s)" >> "$OUT/device.txt"
}
cap() { local a=$1 l; l=$(( $(left) - 5 )); echo $(( a < l ? a : l )); }
step rope-only $(cap 100) $BIN gpu-test --rope-only --rope-timing ${ROPE_TOKENS:-131072,1048576} &
step step-only $(cap 100) $BIN gpu-test --step-only &
wait
echo "== summary"
for f in rope-only step-only; do echo "-- $f: PASS $(grep -c '^PASS' "$OUT/$f.log") FAIL $(grep -c '^FAIL' "$OUT/$f.log")"; grep -E '^FAIL' "$OUT/$f.log" | cut -c1-900; tail -2 "$OUT/$f.log" | cut -c1-400; done
grep -E '^(PASS|FAIL)' "$OUT/rope-only.log" | cut -c1-1200
grep -A 14 '^rope timing' "$OUT/rope-only.log"; grep '^\[' "$OUT/rope-only.log"
cat "$OUT/device.txt"
