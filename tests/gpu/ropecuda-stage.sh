#!/usr/bin/env bash
# Stages tests/gpu/ropecuda-run.sh's files in target/ropecuda-stage/ (ignored
# by git; carried to the device): the CLI (feature cuda) for `gpu-test
# --rope-only`, scripts/llama-cpp-gpu.sh's stage (patched + stock llama.cpp
# source, the bridge static library with the CUDA route, cxx headers, the
# test scripts) and the kernels' PTX once, compressed (both read it from
# INFINITEHIP_CACHE there). Calls nothing on the device.
#   here: bash tests/gpu/ropecuda-stage.sh   (LLAMA_SRC: a llama.cpp checkout when
#         target/llama.cpp/src-stock is absent; default /work/builds/llama-main/src-stock)
set -euo pipefail
cd "$(dirname "$0")/../.."
S=target/ropecuda-stage
rm -rf "$S" && mkdir -p "$S/gpu" "$S/llama"
if [ ! -e target/llama.cpp/src-stock ]; then
  mkdir -p target/llama.cpp && ln -s "${LLAMA_SRC:-/work/builds/llama-main/src-stock}" target/llama.cpp/src-stock
fi
cargo build --release -p infinitehip-cli --features cuda --quiet
cp target/release/infinitehip "$S/gpu/" && strip "$S/gpu/infinitehip"
for d in ${NVRTC_LIB:-} /usr/local/cuda/lib64 ~/.cache/infinitehip-ci/venv-*/lib/python3*/site-packages/nvidia/cu13/lib; do
  if [ -e "$d/libnvrtc.so.13" ]; then export NVRTC_LIB=$d; break; fi
done
bash scripts/llama-cpp-gpu.sh stage "$S/llama"
# PREBUILT=1: tests/gpu/ggml-prebuild.sh's CUDA ggml (19 MB) too, so the device builds only libllama
# (~230 s less); with gpu-bin beside it the carry passes 64 MiB (tests/gpu/rope-cover-stage.sh carries less)
[ "${PREBUILT:-0}" = 1 ] && [ -f target/ggml-cuda-prebuilt/ggml-inst.tar.xz ] && cp target/ggml-cuda-prebuilt/ggml-inst.tar.xz "$S/llama/"
if [ -n "$(ls "$S/llama/ptx" 2>/dev/null)" ]; then
  tar cJf "$S/ptx.tar.xz" -C "$S/llama" ptx && rm -rf "$S/llama/ptx"
else
  echo "no libnvrtc here: the device compiles the kernels (NVRTC) on first use" >&2
fi
xz -T2 -6 "$S/llama/libinfinitehip_bridge.a"
du -sh "$S" "$S"/* "$S"/llama/*
