#!/usr/bin/env bash
# Builds the whole GPU check here (release, feature cuda: the CLI and the C
# ABI library) and stages it in gpu-bin/ (ignored by git, carried to the
# device), with the PTX precompiled when libnvrtc is found here. It calls
# nothing on the device. The device call, made with the workplace's `run`
# tool from the repo root:
#   run(command="bash scripts/gpu-run.sh", carry=["gpu-bin"], timeout_s=600)
# gpu-run.sh there runs every GPU test (kernels, engine path, offload, the
# Python shim over torch tensors), the PyTorch SDPA baseline, `bench-gpu`
# and the plot, writing logs/JSON/PNG under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p infinitehip-cli -p infinitehip-capi \
  --features infinitehip-cli/cuda,infinitehip-capi/cuda
rm -rf gpu-bin/ptx gpu-bin/ptx.tar.xz; mkdir -p gpu-bin/ptx
cp target/release/infinitehip target/release/libinfinitehip.so gpu-bin/
# The GPU checks as a test target (rust/infinitehip-cli/tests/gpu.rs).
t=$(cargo test --release -p infinitehip-cli --features cuda --test gpu --no-run 2>&1 \
  | grep -o 'target/release/deps/gpu-[0-9a-f]*' | head -1)
cp "$t" gpu-bin/gpu-tests
strip gpu-bin/infinitehip gpu-bin/libinfinitehip.so gpu-bin/gpu-tests 2>/dev/null || true
# Precompile the kernels (the device then loads PTX from the cache).
for d in ${NVRTC_LIB:-} /usr/local/cuda/lib64 /tmp/nvrtc-venv/lib/python3*/site-packages/nvidia/cu13/lib \
         ~/.cache/infinitehip-ci/venv-*/lib/python3*/site-packages/nvidia/cu13/lib; do
  if [ -e "$d/libnvrtc.so.13" ]; then
    LD_LIBRARY_PATH="$d" gpu-bin/infinitehip nvrtc-check --arch compute_90 --into gpu-bin/ptx
    break
  fi
done
# The PTX compresses ~20x; the device call carries at most 64 MiB with the tree.
if [ -n "$(ls gpu-bin/ptx 2>/dev/null)" ]; then tar cJf gpu-bin/ptx.tar.xz -C gpu-bin ptx && rm -rf gpu-bin/ptx; fi
grep -qx '/gpu-bin/' .git/info/exclude 2>/dev/null || { gitdir=$(git rev-parse --git-dir); mkdir -p "$gitdir/info"; echo '/gpu-bin/' >> "$gitdir/info/exclude"; }
ls -la gpu-bin/
