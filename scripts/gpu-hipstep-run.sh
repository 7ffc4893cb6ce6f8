#!/usr/bin/env bash
# The hip step on the GPU (issue 14): step/top-k/CPU-policy checks, the SDPA baseline and the 32-layer
# step with its kernel breakdown, from a folder holding infinitehip, ptx/ and sdpa_bench.py (see
# scripts/gpu-check.sh for building them). SPLIT=1 adds --split-combine (the previous hip attention).
# Usage: bash gpu-hipstep-run.sh "<model tokens>" "<batches>" "<tunes>" [skip-tests]
cd "$(dirname "$0")"
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 INFINITEHIP_CACHE=/tmp/ihip-cache
mkdir -p $INFINITEHIP_CACHE; cp ptx/*.ptx $INFINITEHIP_CACHE/
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
TOK=${1:-131072,1048576}; BAT=${2:-1}; TUNE=${3:-0/0/d}
F=""; [ "${SPLIT:-0}" = 1 ] && F=--split-combine
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; date -u; ls /usr/local/cuda/bin 2>&1 | tr '\n' ' '; echo; } > $OUT/device.txt
t0=$(date +%s)
if [ -z "${4:-}" ]; then
  timeout 120 ./infinitehip gpu-test --step-only $F > $OUT/step-test.log 2>&1; echo "step-test rc=$? $(( $(date +%s)-t0 )) s" | tee -a $OUT/device.txt
fi
t1=$(date +%s)
timeout 90 python3 sdpa_bench.py --tokens $TOK --batch $BAT --reps 3 --prefill-tokens '' --model-tokens $TOK --model-batch $BAT --json $OUT/sdpa.json > $OUT/sdpa.log 2>&1; echo "sdpa rc=$? $(( $(date +%s)-t1 )) s" | tee -a $OUT/device.txt
t2=$(date +%s)
timeout 240 ./infinitehip bench-gpu-model --tokens $TOK --batch $BAT --reps 3 --baseline $OUT/sdpa.json --tune $TUNE $F --json $OUT/bench-gpu-model.json > $OUT/bench-gpu-model.log 2>&1; echo "model rc=$? $(( $(date +%s)-t2 )) s" | tee -a $OUT/device.txt
grep -E '^(PASS|FAIL)|checks' $OUT/step-test.log 2>/dev/null | cut -c1-400
grep -E '^\||^kernel|^hip layer|^attention' $OUT/bench-gpu-model.log
tail -3 $OUT/bench-gpu-model.log
cat $OUT/device.txt
