#!/usr/bin/env bash
# Issue 14, hip sparse v2 attention (branch hipattend): one device call's work under a time budget.
# Run from a folder holding gpu-bin's contents (infinitehip, ptx/), sdpa_bench.py and this script:
#   cd .xfer-hipattend && BUDGET=450 bash run.sh [what]
# what: comma list of checks,engine,sdpa,model,model-sparse,model-lean,model-r96 (default: all). Logs under $OUT.
# A cold device machine first spends tens of seconds in the driver's PTX JIT (all modules, first process).
cd "$(dirname "$0")"
OUT=${OUT:-out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-450}; T0=$(date +%s)
WHAT=${1:-checks,engine,sdpa,model,model-sparse,model-lean,model-r96}
TOK=${TOK:-131072,1048576}; BAT=${BAT:-1}
export PYTHONUNBUFFERED=1 INFINITEHIP_CACHE=/tmp/ihip-cache
mkdir -p $INFINITEHIP_CACHE; cp ptx/*.ptx $INFINITEHIP_CACHE/ 2>/dev/null
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; date -u; } > $OUT/device.txt
want() { [[ ",$WHAT," == *",$1,"* ]]; }
# step NAME TIMEOUT CMD...: run with at most TIMEOUT s and what is left of the budget; log to $OUT/NAME.log.
step() {
  local name=$1 t=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if [ "$left" -lt 5 ]; then echo "SKIPPED $name (budget left ${left}s)" | tee -a $OUT/device.txt; return; fi
  [ "$left" -lt "$t" ] && t=$left
  local s=$(date +%s)
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - s )) s" | tee -a $OUT/device.txt
}
if want checks; then
  # hip_sparse kernel vs f64 (page-64 and shuffled token-major pools, u1/u2), dense v2 over a
  # token-major pool (u1/u2), the device step (graph == eager, == host step, dropped token; sparse v2
  # and lean decoders beside it), top-k, the CPU policy; then the same step checks with every hip
  # decoder on sparse v2.
  step step-test ${T_CHECKS:-150} ./infinitehip gpu-test --step-only
  step step-test-sparse 60 ./infinitehip gpu-test --step-only --sparse-v2
fi
if want engine; then
  # The engine decode case (token-major pool, q_seq rows, side stream) at the default (u1 at page
  # size 1) and forced u2 (the merged-2026-12-04c failure).
  step engine-u0 60 ./infinitehip gpu-test --engine-decode-only
  step engine-u2 60 ./infinitehip gpu-test --engine-decode-only --dense-chunks 2
fi
if want sdpa; then
  step sdpa 90 python3 sdpa_bench.py --tokens $TOK --batch $BAT --reps 3 --prefill-tokens '' \
    --model-tokens $TOK --model-batch $BAT --json $OUT/sdpa.json
fi
if want model; then
  step model 150 ./infinitehip bench-gpu-model --tokens $TOK --batch $BAT --reps 3 \
    --baseline $OUT/sdpa.json --json $OUT/bench-gpu-model.json
fi
if want model-lean; then
  step model-lean 120 ./infinitehip bench-gpu-model --tokens $TOK --batch $BAT --reps 3 --lean \
    --baseline $OUT/sdpa.json --json $OUT/bench-gpu-model-lean.json
fi
if want model-sparse; then
  step model-sparse 120 ./infinitehip bench-gpu-model --tokens $TOK --batch $BAT --reps 3 --sparse-v2 \
    --baseline $OUT/sdpa.json --json $OUT/bench-gpu-model-sparse.json
fi
if want model-r96; then
  # InfiniteHiP's SGLang example intervals (not our default config): for reference only.
  step model-r96 120 ./infinitehip bench-gpu-model --tokens $TOK --batch $BAT --reps 2 --lean --refresh 96,24,8 \
    --baseline $OUT/sdpa.json --json $OUT/bench-gpu-model-r96.json
fi
echo "== summary"
grep -hE '^(PASS|FAIL)|checks' $OUT/step-test*.log $OUT/engine-*.log 2>/dev/null | cut -c1-330
for f in model model-sparse model-lean model-r96; do
  [ -e $OUT/$f.log ] && { echo "-- $f"; grep -E '^\||^attention|^hip layer|^kernel' $OUT/$f.log; }
done
cat $OUT/device.txt
