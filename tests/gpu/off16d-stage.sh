#!/usr/bin/env bash
# off16d: builds the device call's files here (nothing runs on a device).
# Stages target/off16d-bin/{gpu-bin/infinitehip, gpu-bin/ptx.tar.xz, off16d-run.sh}
# (target/ is ignored by git; carried with the tree, ~25 MiB). Then, from the repo root:
#   run(command="cd target/off16d-bin && OUT=$OUT BUDGET=285 bash off16d-run.sh",
#       carry=["target/off16d-bin"], timeout_s=300)
set -euo pipefail
cd "$(dirname "$0")/../.."
CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2} nice -n 19 cargo build --release -p infinitehip-cli --features cuda
S=target/off16d-bin
rm -rf "$S"; mkdir -p "$S/gpu-bin/ptx"
cp target/release/infinitehip "$S/gpu-bin/"; strip "$S/gpu-bin/infinitehip" 2>/dev/null || true
cp tests/gpu/off16d-run.sh "$S/"
LIB=""
for d in ${NVRTC_LIB:-} /usr/local/cuda/lib64 target/nvrtc-venv/lib/python3*/site-packages/nvidia/cu13/lib \
         ~/.cache/infinitehip-ci/venv-*/lib/python3*/site-packages/nvidia/cu13/lib; do
  [ -e "$d/libnvrtc.so.13" ] && { LIB=$d; break; }
done
[ -n "$LIB" ] || { echo "libnvrtc.so.13 not found (set NVRTC_LIB)" >&2; exit 1; }
LD_LIBRARY_PATH="$LIB" nice -n 19 "$S/gpu-bin/infinitehip" nvrtc-check --arch compute_90 --into "$S/gpu-bin/ptx"
tar cJf "$S/gpu-bin/ptx.tar.xz" -C "$S/gpu-bin" ptx && rm -rf "$S/gpu-bin/ptx"
du -sh "$S"; ls -la "$S" "$S/gpu-bin"
