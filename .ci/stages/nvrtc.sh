#!/usr/bin/env bash
# Compile every CUDA kernel with NVRTC on this (CPU-only) machine, so a kernel
# that does not compile fails CI. NVRTC comes from PyPI, pinned to the CUDA
# 13.0 series that the GPU machines' driver runs; no GPU is needed.
set -euo pipefail
cd "$(dirname "$0")/../.."
NVRTC_VERSION=13.0.88
VENV=${NVRTC_VENV:-target/nvrtc-venv}
if [ ! -e "$VENV/.ok-$NVRTC_VERSION" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "nvidia-cuda-nvrtc==$NVRTC_VERSION"
  touch "$VENV/.ok-$NVRTC_VERSION"
fi
LIB=$(dirname "$(find "$VENV" -name 'libnvrtc.so.13' | head -1)")
[ -n "$LIB" ] || { echo "libnvrtc.so.13 not found in $VENV" >&2; exit 1; }
# The GPU backend builds and its CPU-side unit tests pass with no CUDA at all.
cargo build -q -p infinitehip-cli --features cuda
cargo test -q -p infinitehip --features cuda --lib backend 2>&1 | tail -3
# The C ABI's GPU entry points built with CUDA fail cleanly without a driver.
cargo test -q -p infinitehip-capi --features cuda gpu 2>&1 | tail -3
LD_LIBRARY_PATH="$LIB:${LD_LIBRARY_PATH:-}" ./target/debug/infinitehip nvrtc-check --arch compute_90
