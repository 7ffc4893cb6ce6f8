#!/usr/bin/env bash
# The device tool sends the session's main checkout, not this worktree: stage
# the binary and scripts into an ignored folder of that checkout to carry.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:?usage: gpu-stage.sh MAIN_CHECKOUT}
mkdir -p "$DEST/.gpu-carry-cuda/scripts" "$DEST/.gpu-carry-cuda/gpu-bin"
cp scripts/gpu-run.sh scripts/sdpa_bench.py scripts/plot_gpu.py "$DEST/.gpu-carry-cuda/scripts/"
cp gpu-bin/infinitehip "$DEST/.gpu-carry-cuda/gpu-bin/"
grep -qx '/.gpu-carry-cuda/' "$DEST/.git/info/exclude" || echo '/.gpu-carry-cuda/' >> "$DEST/.git/info/exclude"
