#!/usr/bin/env bash
# hip's RoPE modes on llama.cpp's CUDA route (issue 12, branch ropecuda), one
# device call. None of this branch's GPU code has run on a GPU.
#   here:  bash tests/gpu/ropecuda-stage.sh
#   there: run(command="bash tests/gpu/ropecuda-run.sh", carry=["target/ropecuda-stage"], timeout_s=540)
# In parallel:
# - gpu-test --rope-only: the decoder's and GpuAttention's RoPE-mode cases as
#   before, plus GpuAttention with llama.cpp's NORM (interleaved) layout
#   (decode: 4 cases, prefill: 1) vs the CPU HipPolicy over the same keys in
#   halves (selections must match exactly; dropped-token and NaN checks);
# - the llama.cpp CUDA build (scripts/llama-cpp-gpu.sh run, ~200 s) then
#   tests/llama-cpp/gpu_test.py --only-rope (section 12: a random Llama GGUF
#   trained at 256 tokens run at 2048 + 48 through the CUDA route with the
#   modes vs the plugin's CPU route; negative controls).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
S=${STAGE:-$PWD/target/ropecuda-stage}  # STAGE: elsewhere (a dry run on a copy)
export PYTHONUNBUFFERED=1 INFINITEHIP_CACHE=/tmp/ihip-cache INFINITEHIP_LAZY_MODULES=all
mkdir -p "$INFINITEHIP_CACHE" "$S/llama/ptx"
[ -f "$S/ptx.tar.xz" ] && tar xJf "$S/ptx.tar.xz" -C "$S/llama" && cp "$S"/llama/ptx/*.ptx "$INFINITEHIP_CACHE/"
[ -f "$S/llama/libinfinitehip_bridge.a.xz" ] && [ ! -f "$S/llama/libinfinitehip_bridge.a" ] && xz -dk -T0 "$S/llama/libinfinitehip_bridge.a.xz"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
T0=$(date +%s); left() { echo $(( ${BUDGET:-530} - ($(date +%s) - T0) )); }
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; date -u; uptime; nproc; } > "$OUT/device.txt" 2>&1
step() {  # step NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2; local s=$(date +%s)
  [ "$t" -lt 5 ] && { echo "$name: skipped (no time)" >> "$OUT/device.txt"; return; }
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - s )) s (at $(( $(date +%s) - T0 )) s)" >> "$OUT/device.txt"
}
cap() { local a=$1 l; l=$(( $(left) - 5 )); echo $(( a < l ? a : l )); }
[ "${ROPE_ONLY:-1}" = 1 ] && step rope-only $(cap 330) "$S/gpu/infinitehip" gpu-test --rope-only &
step llama-rope $(cap 520) env IHIP_BUDGET_S=$(( $(left) - 15 )) GPU_TEST_ARGS="${ROPECUDA_LLAMA_ARGS:---only-rope}" \
  IHIP_GGML_PREBUILT=$([ -f "$S/llama/ggml-inst.tar.xz" ] && echo "$S/llama/ggml-inst.tar.xz") \
  bash "$S/llama/llama-cpp-gpu.sh" run "$S/llama" "$OUT/llama" &
wait
cp "$OUT"/llama/gpu_test.json "$OUT/" 2>/dev/null
echo "== summary"
echo "-- rope-only: PASS $(grep -c '^PASS' "$OUT/rope-only.log") FAIL $(grep -c '^FAIL' "$OUT/rope-only.log")"
grep -E '^FAIL' "$OUT/rope-only.log" | cut -c1-900
grep -E '^(PASS|FAIL)' "$OUT/rope-only.log" | grep -i "interleaved\|NORM" | cut -c1-1200
tail -2 "$OUT/rope-only.log" | cut -c1-400
echo "-- llama.cpp CUDA route, section 12"
grep -E '^== |^(PASS|FAIL|SKIP)|ALL PASS|SOME FAILED|INCOMPLETE' "$OUT/llama-rope.log" | cut -c1-2500
tail -5 "$OUT/llama-rope.log" | cut -c1-1500
cat "$OUT/device.txt"
