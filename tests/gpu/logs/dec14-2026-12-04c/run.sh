#!/usr/bin/env bash
# dec14 device call: run(command="BUDGET=<s> bash target/dec14-bin/run.sh", carry=["target/dec14-bin"]).
# Runs in /work/main's tree with target/dec14-bin/ (infinitehip + ptx/ + sdpa_bench.py of branch dec14).
# Benchmarks first (PDL on / off alternated, same SDPA baseline), then the checks touched by the change.
set -uo pipefail
H=target/dec14-bin; B=$H/infinitehip
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 INFINITEHIP_CACHE=/tmp/ihip-cache
mkdir -p "$INFINITEHIP_CACHE"; cp $H/ptx/*.ptx "$INFINITEHIP_CACHE/" 2>/dev/null
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
T0=$(date +%s); left() { echo $(( ${BUDGET:-280} - ($(date +%s) - T0) )); }
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; date -u; uptime; } > "$OUT/device.txt"
step() {  # step NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2; local s=$(date +%s)
  [ "$t" -gt "$(left)" ] && t=$(( $(left) - 3 ))
  [ "$t" -lt 5 ] && { echo "$name: not run (no time left)" >> "$OUT/device.txt"; return; }
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - s )) s (at $(( $(date +%s) - T0 )) s)" >> "$OUT/device.txt"
}
# Warm the driver's JIT cache in one process (every module), so the timed ones start warm.
step dense-check 120 $B gpu-test --dense-only
step sdpa 60 python3 $H/sdpa_bench.py --tokens 131072,1048576 --batch 1 --reps 3 --prefill-tokens '' \
  --model-tokens 131072,1048576 --model-batch 1 --json "$OUT/sdpa.json"
M="--tokens 131072,1048576 --batch 1 --reps 3 --baseline $OUT/sdpa.json"
step model-pdl-1 60 $B bench-gpu-model $M --json "$OUT/model-pdl-1.json"
step model-plain-1 60 $B bench-gpu-model $M --no-pdl --json "$OUT/model-plain-1.json"
step model-pdl-2 60 $B bench-gpu-model $M --json "$OUT/model-pdl-2.json"
step model-plain-2 60 $B bench-gpu-model $M --no-pdl --json "$OUT/model-plain-2.json"
step step-check 150 $B gpu-test --step-only
step engine-check 90 $B gpu-test --engine-decode-only
echo "== summary"
for f in dense-check step-check engine-check; do
  [ -f "$OUT/$f.log" ] && { echo "-- $f: $(grep -c '^PASS' "$OUT/$f.log") PASS, $(grep -c '^FAIL' "$OUT/$f.log") FAIL"; grep '^FAIL' "$OUT/$f.log" | cut -c1-400; grep -i 'PDL launches\|programmatic' "$OUT/$f.log" | cut -c1-300; }
done
for f in model-pdl-1 model-plain-1 model-pdl-2 model-plain-2; do
  [ -f "$OUT/$f.log" ] && { echo "-- $f"; grep -E '^device|^\| 1[0-9]+ \|' "$OUT/$f.log"; grep -A4 '^| path' "$OUT/$f.log" | grep -E 'host|eager|graph'; }
done
cat "$OUT/device.txt"
