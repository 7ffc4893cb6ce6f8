#!/usr/bin/env bash
# Builds the GPU build here (release, feature cuda) and stages it in gpu-bin/
# (ignored by git, carried to the device). It calls nothing on the device.
# The device call, made with the workplace's `run` tool from the repo root:
#   run(command="bash scripts/gpu-run.sh", carry=["gpu-bin"], timeout_s=600)
# gpu-run.sh there runs `infinitehip gpu-test`, the PyTorch SDPA baseline,
# `infinitehip bench-gpu` and the plot, writing logs/JSON/PNG under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p infinitehip-cli --features cuda
mkdir -p gpu-bin
cp target/release/infinitehip gpu-bin/
grep -qx '/gpu-bin/' .git/info/exclude 2>/dev/null || { gitdir=$(git rev-parse --git-dir); mkdir -p "$gitdir/info"; echo '/gpu-bin/' >> "$gitdir/info/exclude"; }
ls -la gpu-bin/
