#!/usr/bin/env bash
# Stages target/rope-cover-stage/ (ignored by git) for tests/gpu/rope-cover-run.sh: the llama.cpp part of
# tests/gpu/ropecuda-stage.sh's stage (sources, bridge library, test scripts), the prebuilt CUDA ggml of the
# patched tree (tests/gpu/ggml-prebuild.sh, sm_90 only: ~19 MB), the kernels' PTX and the Python shim's
# library (no CLI): ~47 MB with the tracked files, under the 64 MiB carry.
#   here:  bash tests/gpu/ropecuda-stage.sh && bash tests/gpu/ggml-prebuild.sh && bash tests/gpu/rope-cover-stage.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
S=target/rope-cover-stage
rm -rf "$S" && mkdir -p "$S"
cp -r target/ropecuda-stage/llama "$S/llama"
cp target/ggml-cuda-prebuilt/ggml-inst.tar.xz target/ropecuda-stage/ptx.tar.xz "$S/"
cargo build --release -p infinitehip-capi --quiet
strip -o "$S/libinfinitehip.so" target/release/libinfinitehip.so && xz -T2 -6 "$S/libinfinitehip.so"
du -sb "$S" "$S"/* "$S"/llama/*
echo "with the tracked files: $(( $(du -sb "$S" | cut -f1) + $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) )) bytes (limit 67108864)"
