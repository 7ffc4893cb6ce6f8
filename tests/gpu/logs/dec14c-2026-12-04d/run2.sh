#!/usr/bin/env bash
# dec14c device call 2: run(command="BUDGET=<s> OUT=$OUT bash target/dec14c-bin/run2.sh", carry=["target/dec14c-bin"]).
# gpu-test --step-only with the third step case (stage 0 forced through hip_scorewp and hip_topk_mc at 66-70K
# tokens, compared inside whole host / eager device / graph-replayed steps with plain launches of hip_scorew +
# hip_topk) and hip_topk_mc taken from 5 segments in production.
set -uo pipefail
H=target/dec14c-bin; B=$H/infinitehip
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 INFINITEHIP_CACHE=/tmp/ihip-cache INFINITEHIP_LAZY_MODULES=all
mkdir -p "$INFINITEHIP_CACHE"; cp $H/ptx/*.ptx "$INFINITEHIP_CACHE/" 2>/dev/null
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; date -u; uptime; } > "$OUT/device.txt"
s=$(date +%s)
timeout $(( ${BUDGET:-110} - 2 )) $B gpu-test --step-only > "$OUT/step-check.log" 2>&1; rc=$?
echo "step-check: rc=$rc $(( $(date +%s) - s )) s" >> "$OUT/device.txt"
echo "-- step-check: $(grep -c '^PASS' "$OUT/step-check.log") PASS, $(grep -c '^FAIL' "$OUT/step-check.log") FAIL"
grep '^FAIL' "$OUT/step-check.log" | cut -c1-900
grep -E '^PASS (hip_scorew|hip_topk|hip device step)' "$OUT/step-check.log" | cut -c1-420
cat "$OUT/device.txt"
