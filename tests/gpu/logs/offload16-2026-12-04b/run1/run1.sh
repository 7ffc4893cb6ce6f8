#!/usr/bin/env bash
# offload16 device call 1 (staged in a folder holding gpu-bin/{infinitehip,ptx/} and this script):
#   run(command="cd target/offload16-carry && OUT=$OUT bash run1.sh", carry=["target/offload16-carry"], timeout_s=300)
# 1) gpu-test-offload (11 checks: the warp-staged misses are the default path now; one check keeps the per-thread path)
# 2) bench-gpu-offload, full-device path, per-thread vs warp miss staging, 25% and 50% row caches, with the bus probe
# 3) the same with --profile (exact per-step bytes per refresh class; waits for each step's admission)
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
BIN=gpu-bin/infinitehip
export INFINITEHIP_CACHE=/tmp/ihip-cache; mkdir -p $INFINITEHIP_CACHE; cp gpu-bin/ptx/*.ptx $INFINITEHIP_CACHE/
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,pcie.link.gen.current,pcie.link.width.current --format=csv; date -u; nproc; free -g; } > "$OUT/device.txt" 2>&1
cp run1.sh "$OUT/"
step() {  # step NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2; local s=$(date +%s)
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - s )) s (at $(( $(date +%s) - T0 )) s)" | tee -a "$OUT/device.txt"
}
step gpu-test-offload 100 $BIN gpu-test-offload
grep -E '^(PASS|FAIL)|failed' "$OUT/gpu-test-offload.log" | cut -c1-330
step bench 110 $BIN bench-gpu-offload --tokens 1048576,4194304 --cache 0.05 --est-rows 0.25,0.5 \
  --admission full-device --est-fetch thread,warp --bus --steps 48 --warmup 16 --json "$OUT/bench.json"
step bench-profile 70 $BIN bench-gpu-offload --tokens 1048576,4194304 --cache 0.05 --est-rows 0.25 \
  --admission full-device --est-fetch thread,warp --profile --steps 48 --warmup 16 --json "$OUT/bench-profile.json"
echo "== bench"; grep -E '^\|' "$OUT/bench.log" | grep -v -- '---' | cut -c1-400
echo "== profile"; sed -n '/By refresh class/,$p' "$OUT/bench-profile.log" | grep -E '^\|' | grep -v -- '---'
tail -2 "$OUT/bench.log" | cut -c1-300
cat "$OUT/device.txt"
