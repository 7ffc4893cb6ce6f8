#!/usr/bin/env bash
# `gpu-test --rope-only` alone (the decoder's and GpuAttention's RoPE-mode
# cases, incl. the engines' configs and flow), from gpu-bin/:
#   here:  bash scripts/gpu-check.sh
#   there: run(command="bash tests/gpu/rope-only-run.sh", carry=["gpu-bin"], timeout_s=200)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT"
. tests/gpu/device-env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
s=$(date +%s)
timeout ${T:-180} gpu-bin/infinitehip gpu-test --rope-only > "$OUT/rope-only.log" 2>&1
echo "rope-only: rc=$? $(( $(date +%s) - s )) s"
echo "PASS $(grep -c '^PASS' "$OUT/rope-only.log") FAIL $(grep -c '^FAIL' "$OUT/rope-only.log")"
grep -E '^FAIL' "$OUT/rope-only.log" | cut -c1-1200
grep -E '^(PASS|FAIL)' "$OUT/rope-only.log" | grep -i "engine flow\|max_position 256" | cut -c1-700
tail -3 "$OUT/rope-only.log" | cut -c1-400
