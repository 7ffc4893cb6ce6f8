#!/usr/bin/env bash
# The pending GPU checks of tests/gpu/PENDING.md in ONE device call (<= 580 s),
# for a session whose device share is short:
#   here:  bash scripts/gpu-check.sh && bash tests/gpu/ropecuda-stage.sh
#   there: run(command="bash tests/gpu/combo-run.sh", carry=["gpu-bin", "target/ropecuda-stage"], timeout_s=590)
# In parallel first: ropecuda (gpu-test --rope-only; the llama.cpp CUDA build, then
# gpu_test.py sections 12 and 11: RoPE modes on the CUDA route, host offload on the
# full-device route), sglrope (SGLang's RoPE-mode GPU route), the shim's host-tier
# checks (tests/gpu/hosttier-run.sh) then off16d's
# gpu-test-offload checks. Then alone on the machine (no build beside it): off16d's
# bench (issue 16's bar). Everything comes back as $OUT/combo.tgz + the summary.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT/rope" "$OUT/sgl" "$OUT/off"
T0=$(date +%s)
OUT="$OUT/rope" BUDGET=${ROPE_BUDGET:-470} ROPECUDA_LLAMA_ARGS="--only-rope --only-offload --gen 65" \
  bash tests/gpu/ropecuda-run.sh > "$OUT/rope/summary.txt" 2>&1 &
{ export INFINITEHIP_CACHE=/tmp/ihip-cache2  # not ropecuda-run.sh's: both unpack PTX at the start
  OUT="$OUT/sgl" LIMIT=150 bash tests/gpu/sglrope-run.sh > "$OUT/sgl/summary.txt" 2>&1
  # the engines' host tier (admit-all + right-probe reuse since 2026-12-05): decode_host == decode
  OUT="$OUT/sgl/hosttier" OFF_T=1 SHIM_T=90 bash tests/gpu/hosttier-run.sh > "$OUT/sgl/hosttier.txt" 2>&1
  export INFINITEHIP_LAZY_MODULES=all
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
           $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
    [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
  done
  s=$(date +%s); timeout 130 gpu-bin/infinitehip gpu-test-offload > "$OUT/off/gpu-test-offload.log" 2>&1
  echo "gpu-test-offload: rc=$? $(( $(date +%s) - s )) s" >> "$OUT/off/steps.txt"; } &
wait
export INFINITEHIP_CACHE=/tmp/ihip-cache2 INFINITEHIP_LAZY_MODULES=all
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
left=$(( ${BUDGET:-570} - ($(date +%s) - T0) - 10 ))
s=$(date +%s)
[ "$left" -gt 60 ] && timeout $(( left < 160 ? left : 160 )) gpu-bin/infinitehip bench-gpu-offload --tokens 1048576,4194304 --cache 0.05 \
  --est-rows 0.25,0.5 --admission full-device --est-fetch warp --steps 48 --warmup 16 \
  --est-admit half,all --est-reuse off,on --est-pin 0,2 --json "$OUT/off/bench.json" > "$OUT/off/bench.log" 2>&1
echo "bench: rc=$? $(( $(date +%s) - s )) s (at $(( $(date +%s) - T0 )) s)" >> "$OUT/off/steps.txt"
echo "== ropecuda"; cat "$OUT/rope/summary.txt" | cut -c1-1500
echo "== sglrope"; cat "$OUT/sgl/summary.txt" | cut -c1-1500
echo "== host tier (shim)"; cut -c1-300 "$OUT/sgl/hosttier.txt"
echo "== off16d tests"; grep -E '^(PASS|FAIL)|failed|panicked' "$OUT/off/gpu-test-offload.log" | cut -c1-300; tail -2 "$OUT/off/gpu-test-offload.log"
echo "== off16d bench"; grep -E '^\|' "$OUT/off/bench.log" | cut -c1-330; tail -3 "$OUT/off/bench.log"
cat "$OUT/off/steps.txt"
tar czf "$OUT/combo.tgz" -C "$OUT" rope sgl off && rm -rf "$OUT/rope" "$OUT/sgl" "$OUT/off"
