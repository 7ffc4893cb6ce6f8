#!/usr/bin/env bash
# One device call: scripts/gpu-final.sh (every GPU test, the shim tests incl.
# SGLang's RoPE-mode GPU route, the 32-layer step) then off16d's offload bench
# (issue 16's bar), all output packed into $OUT/whole.tgz + a summary.
#   here:  bash scripts/gpu-check.sh
#   there: run(command="bash tests/gpu/whole-run.sh", carry=["gpu-bin"], timeout_s=480)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT/final"
OUT="$OUT/final" INFINITEHIP_LAZY_MODULES=all BUDGET=${FINAL_BUDGET:-300} TESTS_T=${TESTS_T:-290} \
  bash scripts/gpu-final.sh 2>&1 | tee "$OUT/final/summary.txt"
export INFINITEHIP_CACHE=/tmp/ihip-cache INFINITEHIP_LAZY_MODULES=all
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
mkdir -p "$OUT/off"
s=$(date +%s)
timeout ${BENCH_T:-150} gpu-bin/infinitehip bench-gpu-offload --tokens 1048576,4194304 --cache 0.05 \
  --est-rows 0.25,0.5 --admission full-device --est-fetch warp --steps 48 --warmup 16 \
  --est-admit half,all --est-reuse off,on --est-pin 0,2 --json "$OUT/off/bench.json" > "$OUT/off/bench.log" 2>&1
echo "off16d bench: rc=$? $(( $(date +%s) - s )) s" | tee -a "$OUT/off/bench.log"
echo "== off16d bench"; grep -E '^\|' "$OUT/off/bench.log" | cut -c1-330; tail -3 "$OUT/off/bench.log"
tar czf "$OUT/whole.tgz" -C "$OUT" final off && rm -rf "$OUT/final" "$OUT/off"
