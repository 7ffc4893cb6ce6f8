#!/usr/bin/env bash
# Developer helper: regenerate patches/llama.cpp/0001-infinitehip-attention-plugin.patch
# from an edited target/llama.cpp/src-patched against the pristine src-stock
# (both made by scripts/llama-cpp-build.sh). Only the files listed are diffed.
set -euo pipefail
cd "$(dirname "$0")/.."
# src-patched carries every patch; diffing it into 0001 would fold later patches in
if [ "$(ls patches/llama.cpp/*.patch | wc -l)" -gt 1 ] && [ "${FORCE:-0}" != 1 ]; then
  echo "patches after 0001 exist: diff only your hunks into their own patch (FORCE=1 to override)" >&2; exit 1
fi
WORK=${LLAMA_CPP_WORK:-target/llama.cpp}
FILES=(CMakeLists.txt src/CMakeLists.txt src/llama-context.cpp src/llama-cparams.h src/llama-graph.cpp
       src/llama-infinitehip.cpp src/llama-infinitehip.h)
tmp=$(mktemp -d)
for f in "${FILES[@]}"; do
  if [ -f "$WORK/src-stock/$f" ]; then mkdir -p "$tmp/$(dirname "$f")"; cp "$WORK/src-stock/$f" "$tmp/$f"; fi
done
git -C "$tmp" init -q && git -C "$tmp" add -A && git -C "$tmp" -c user.email=x@y -c user.name=x commit -qm pristine
for f in "${FILES[@]}"; do mkdir -p "$tmp/$(dirname "$f")"; cp "$WORK/src-patched/$f" "$tmp/$f"; done
git -C "$tmp" add -A
git -C "$tmp" diff --cached >patches/llama.cpp/0001-infinitehip-attention-plugin.patch
rm -rf "$tmp"
echo "wrote patches/llama.cpp/0001-infinitehip-attention-plugin.patch"
