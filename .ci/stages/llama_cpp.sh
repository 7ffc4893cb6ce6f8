#!/usr/bin/env bash
# CI stage: llama.cpp integration, end to end on the CPU.
# Builds stock and patched (-DLLAMA_INFINITEHIP=ON) llama.cpp from the pinned
# llama-cpp-python 0.3.36 sdist (only the libllama target, -j2), then runs
# tests/llama-cpp/e2e_test.py on a tiny random GGUF it writes itself.
# Downloads are cached in ~/.cache/infinitehip; builds under target/llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/../.."
t0=$(date +%s)

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v patch >/dev/null 2>&1 || need+=(patch)
if [ ${#need[@]} -gt 0 ]; then
  echo "== apt-get install ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq >/dev/null
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -c "import gguf, numpy" 2>/dev/null || {
  echo "== pip install gguf numpy"
  python3 -m pip install -q gguf numpy
}

JOBS=${JOBS:-2} scripts/llama-cpp-build.sh both
# The C ABI library: section 6 checks the CPU route's layer 0 against the core engine (the Python shim
# from the tree, no install; the SGLang stage builds the same debug library).
cargo build -p infinitehip-capi
echo "== llama.cpp e2e (stock vs patched)"
PYTHONPATH="$PWD/python-shim" INFINITEHIP_LIB="$PWD/target/debug/libinfinitehip.so" python3 tests/llama-cpp/e2e_test.py
echo "== llama.cpp stage done in $(( $(date +%s) - t0 )) s"
