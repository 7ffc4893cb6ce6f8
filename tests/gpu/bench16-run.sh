#!/usr/bin/env bash
# Issue 16's bar alone (bench-gpu-offload at 1M and 4M, 5% pages / 25% rows, the earlier path vs
# admit-all + right-probe reuse), for a short device call on the H200 the issue names:
#   here:  bash scripts/gpu-check.sh
#   there: run(command="bash tests/gpu/bench16-run.sh", carry=["gpu-bin"], timeout_s=150, kind="nvidia-h200")
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export INFINITEHIP_CACHE=/tmp/ihip-cache INFINITEHIP_LAZY_MODULES=all
mkdir -p "$INFINITEHIP_CACHE" /tmp/ihip-ptx
[ -f gpu-bin/ptx.tar.xz ] && tar xJf gpu-bin/ptx.tar.xz -C /tmp/ihip-ptx && cp /tmp/ihip-ptx/ptx/*.ptx "$INFINITEHIP_CACHE/"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
timeout ${T:-110} gpu-bin/infinitehip bench-gpu-offload --tokens 1048576,4194304 --cache 0.05 --est-rows 0.25 \
  --admission full-device --est-fetch warp --steps 48 --warmup 16 --est-admit half,all --est-reuse off,on --est-pin 0 \
  --json "$OUT/bench16.json" > "$OUT/bench16.log" 2>&1
echo "bench: rc=$?"
grep -E '^\| [0-9]' "$OUT/bench16.log" | cut -c1-330; head -1 "$OUT/bench16.log"
