#!/usr/bin/env bash
# Issue 16's bar alone (bench-gpu-offload at 1M and 4M, 5% pages / 25% rows, the earlier path vs
# admit-all + right-probe reuse), for a short device call on the H200 the issue names:
#   here:  bash scripts/gpu-check.sh
#   there: run(command="bash tests/gpu/bench16-run.sh", carry=["gpu-bin"], timeout_s=150, kind="nvidia-h200")
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT"
. tests/gpu/device-env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
timeout ${T:-110} gpu-bin/infinitehip bench-gpu-offload --tokens 1048576,4194304 --cache 0.05 --est-rows 0.25 \
  --admission full-device --est-fetch warp --steps 48 --warmup 16 --est-admit half,all --est-reuse off,on --est-pin 0 \
  --json "$OUT/bench16.json" > "$OUT/bench16.log" 2>&1
echo "bench: rc=$?"
grep -E '^\| [0-9]' "$OUT/bench16.log" | cut -c1-330; head -1 "$OUT/bench16.log"
