#!/usr/bin/env bash
# dec14c device call: run(command="BUDGET=<s> OUT=$OUT bash target/dec14c-bin/run.sh", carry=["target/dec14c-bin"]).
# Runs in /work/main's tree with target/dec14c-bin/ (infinitehip + ptx/ + sdpa_bench.py + this script, branch dec14c).
# 1. gpu-test --step-only (the pipelined scorer vs warp / per-thread / host keys, hip_topk_mc vs hip_topk vs host
#    sort, the device/host/graph step checks on the new defaults); 2. one SDPA baseline; 3. bench-gpu-model with the
#    new stage-0 path and the old one (INFINITEHIP_SCORE_PIPE=0 INFINITEHIP_TOPK_MC=0) alternated, then each lever alone.
set -uo pipefail
H=target/dec14c-bin; B=$H/infinitehip
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 INFINITEHIP_CACHE=/tmp/ihip-cache INFINITEHIP_LAZY_MODULES=all
mkdir -p "$INFINITEHIP_CACHE"; cp $H/ptx/*.ptx "$INFINITEHIP_CACHE/" 2>/dev/null
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
T0=$(date +%s); left() { echo $(( ${BUDGET:-200} - ($(date +%s) - T0) )); }
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; date -u; uptime; } > "$OUT/device.txt"
step() {  # step NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2; local s=$(date +%s)
  [ "$t" -gt "$(left)" ] && t=$(( $(left) - 3 ))
  [ "$t" -lt 5 ] && { echo "$name: not run (no time left)" >> "$OUT/device.txt"; return; }
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - s )) s (at $(( $(date +%s) - T0 )) s)" >> "$OUT/device.txt"
}
OLD="env INFINITEHIP_SCORE_PIPE=0 INFINITEHIP_TOPK_MC=0"
step step-check 120 $B gpu-test --step-only
step sdpa 40 python3 $H/sdpa_bench.py --tokens 131072,1048576 --batch 1 --reps 3 --prefill-tokens '' \
  --model-tokens 131072,1048576 --model-batch 1 --json "$OUT/sdpa.json"
M="--tokens 131072,1048576 --batch 1 --reps 3 --baseline $OUT/sdpa.json"
step model-new-1 60 $B bench-gpu-model $M --json "$OUT/model-new-1.json"
step model-old-1 30 $OLD $B bench-gpu-model $M --json "$OUT/model-old-1.json"
step model-new-2 30 $B bench-gpu-model $M --json "$OUT/model-new-2.json"
step model-old-2 30 $OLD $B bench-gpu-model $M --json "$OUT/model-old-2.json"
step model-pipe-only 30 env INFINITEHIP_TOPK_MC=0 $B bench-gpu-model $M --json "$OUT/model-pipe-only.json"
step model-mc-only 30 env INFINITEHIP_SCORE_PIPE=0 $B bench-gpu-model $M --json "$OUT/model-mc-only.json"
echo "== summary"
for f in step-check; do
  [ -f "$OUT/$f.log" ] && { echo "-- $f: $(grep -c '^PASS' "$OUT/$f.log") PASS, $(grep -c '^FAIL' "$OUT/$f.log") FAIL"; grep '^FAIL' "$OUT/$f.log" | cut -c1-600; grep -i 'scorewp\|topk_mc' "$OUT/$f.log" | cut -c1-400; }
done
for f in model-new-1 model-old-1 model-new-2 model-old-2 model-pipe-only model-mc-only; do
  [ -f "$OUT/$f.log" ] && { echo "-- $f"; grep -E '^one-lane' "$OUT/$f.log"; grep -E '^\| (score s0|topk s0|attn sparse v2|hip, all) ' "$OUT/$f.log"; grep -E '^\| host metadata|^\| device metadata, CUDA' "$OUT/$f.log"; grep -E '^\| 1[0-9]+ \| 1 \|' "$OUT/$f.log"; }
done
cat "$OUT/device.txt"
