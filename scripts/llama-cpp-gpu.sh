#!/usr/bin/env bash
# GPU route of the llama.cpp integration: build stock and patched CUDA
# llama.cpp and run tests/llama-cpp/gpu_test.py, on a machine with nvcc,
# CMake and ninja but no network and no cargo.
#
#   here:   scripts/llama-cpp-gpu.sh stage DIR     (DIR <= 64 MiB: source tar.xz,
#           stripped libinfinitehip_bridge.a (feature cuda) + cxx headers,
#           precompiled PTX, test files)
#   there:  bash DIR/llama-cpp-gpu.sh run DIR OUT  [ARCH (default 90)]
#
# `stage` needs scripts/llama-cpp-build.sh's trees (target/llama.cpp/src-stock);
# it builds the bridge with the `cuda` feature (the CUDA route of patch 0004)
# and precompiles the kernels' PTX when libnvrtc is found here. `run` builds
# ggml-cuda + the patched libllama once (-DGGML_CUDA=ON -DLLAMA_INFINITEHIP=ON),
# installs it, builds the stock libllama against that same ggml
# (-DLLAMA_USE_SYSTEM_GGML=ON: ggml is not patched), compiles ihip_run for
# both, writes the tiny GGUF and runs the tests + decode benchmark.
#   here:   scripts/llama-cpp-gpu.sh patched-tree DIR  (the patched source tree `stage` packs, into DIR;
#           tests/gpu/ggml-prebuild.sh builds its ggml), scripts/llama-cpp-gpu.sh ggml-hash DIR (its
#           ggml/ files' hash: the key of a prebuilt ggml, IHIP_GGML_PREBUILT)
set -euo pipefail
MODE=${1:?stage|run|patched-tree|ggml-hash}

# the sources llama.cpp's CUDA build needs (no other GPU backends), patched: SRC DEST REPO
patched_tree() {
  (cd "$1" && tar cf - --exclude='ggml/src/ggml-vulkan' --exclude='ggml/src/ggml-opencl' --exclude='ggml/src/ggml-sycl' \
      --exclude='ggml/src/ggml-hexagon' --exclude='ggml/src/ggml-et' --exclude='ggml/src/ggml-metal' \
      --exclude='ggml/src/ggml-openvino' --exclude='ggml/src/ggml-cann' --exclude='ggml/src/ggml-webgpu' \
      --exclude='ggml/src/ggml-virtgpu' --exclude='ggml/src/ggml-musa' --exclude='ggml/src/ggml-zdnn' \
      CMakeLists.txt cmake ggml src include licenses LICENSE vendor) | tar xf - -C "$2"
  for p in "$3"/patches/llama.cpp/*.patch; do patch -p1 --batch --forward -d "$2" <"$p" >/dev/null; done
}
ggml_tree_hash() { (cd "$1" && find ggml -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -d' ' -f1; }
if [ "$MODE" = patched-tree ]; then
  REPO=$(cd "$(dirname "$0")/.." && pwd)
  mkdir -p "${2:?DIR}" && patched_tree "${LLAMA_SRC:-$REPO/target/llama.cpp/src-stock}" "$2" "$REPO"
  exit 0
elif [ "$MODE" = ggml-hash ]; then
  ggml_tree_hash "${2:?DIR}"
  exit 0
fi
DIR=$(cd "${2:?DIR}" && pwd)

if [ "$MODE" = stage ]; then
  REPO=$(cd "$(dirname "$0")/.." && pwd)
  S=$REPO/target/llama.cpp/src-stock
  T=$(mktemp -d)
  mkdir -p "$T/patched" "$T/stock-overlay"
  patched_tree "$S" "$T/patched" "$REPO"
  cp "$S/CMakeLists.txt" "$T/stock-overlay/" && cp -r "$S/src" "$T/stock-overlay/src" && cp -r "$S/gguf-py" "$T/gguf-py"
  (cd "$REPO" && cargo build --release -p infinitehip-cpp-bridge --lib --features cuda --quiet \
     && cargo build --release -p infinitehip-cli --features cuda --quiet)
  rm -rf "$DIR"/* && mkdir -p "$DIR/cxxbridge/rust" "$DIR/cxxbridge/infinitehip-cpp-bridge/src" "$DIR/ptx"
  for d in ${NVRTC_LIB:-} /usr/local/cuda/lib64 /tmp/nvrtc-venv/lib/python3*/site-packages/nvidia/cu13/lib \
           "$REPO"/target/nvrtc-venv/lib/python3*/site-packages/nvidia/cu13/lib; do
    if [ -e "$d/libnvrtc.so.13" ]; then
      LD_LIBRARY_PATH="$d" "$REPO/target/release/infinitehip" nvrtc-check --arch compute_90 --into "$DIR/ptx" >/dev/null
      break
    fi
  done
  tar cJf "$DIR/src.tar.xz" -C "$T" patched stock-overlay gguf-py
  rm -rf "$T"
  cp "$REPO/target/release/libinfinitehip_bridge.a" "$DIR/" && strip --strip-debug "$DIR/libinfinitehip_bridge.a"
  cp -L "$REPO/target/cxxbridge/rust/cxx.h" "$DIR/cxxbridge/rust/"
  cp -L "$REPO/target/cxxbridge/infinitehip-cpp-bridge/src/lib.rs.h" "$DIR/cxxbridge/infinitehip-cpp-bridge/src/"
  cp "$REPO"/tests/llama-cpp/{ihip_run.cpp,make_tiny_gguf.py,e2e_test.py,gpu_test.py} "$0" "$DIR/"
  du -sh "$DIR"
  exit 0
fi

[ "$MODE" = run ] || { echo "usage: $0 stage|run DIR [OUT [ARCH]]" >&2; exit 2; }
T_START=$(date +%s)
OUT=${3:?OUT}
ARCH=${4:-90}
CUDA=${IHIP_GGML_CUDA:-ON}   # OFF: a CPU dry run of this script (with LLAMA_INFINITEHIP_ROUTE=gpu)
W=${IHIP_WORK:-/tmp/ihip-gpu}  # the builds and the test files
# tests/gpu/ggml-prebuild.sh's ggml-inst.tar.xz (ggml + ggml-cuda of the patched tree, built elsewhere):
# both libllamas are built against it, when its ggml tree hash matches src.tar.xz's patched ggml/
PRE=${IHIP_GGML_PREBUILT:-}
JOBS=$(nproc)
mkdir -p "$W" "$OUT"
if [ "${IHIP_REUSE:-0}" = 1 ] && [ -x "$W/ihip_run-patched" ] && [ -x "$W/ihip_run-stock" ]; then
  echo "== reusing the builds in $W"
else
  rm -rf "$W/patched" "$W/stock" "$W/build-patched" "$W/build-stock" "$W/inst"
  tar xJf "$DIR/src.tar.xz" -C "$W"
  cp -r "$W/patched" "$W/stock"
  rm -rf "$W/stock/src" && cp -r "$W/stock-overlay/src" "$W/stock/src" && cp "$W/stock-overlay/CMakeLists.txt" "$W/stock/"
  GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
  COMMON=("${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF)
  [ "$CUDA" = ON ] && echo "== nvcc: $(nvcc --version | tail -1); $JOBS cores"
  t0=$(date +%s)
  PGGML=(-DGGML_CUDA="$CUDA" -DCMAKE_CUDA_ARCHITECTURES="$ARCH")
  if [ -n "$PRE" ]; then
    mkdir -p "$W/inst" && tar xJf "$PRE" -C "$W/inst"
    if [ "$(sed -n 's/^ggml_tree_sha256: //p' "$W/inst/ggml-prebuilt.txt")" = "$(ggml_tree_hash "$W/patched")" ]; then
      echo "== prebuilt ggml: $PRE"
      PGGML=(-DLLAMA_USE_SYSTEM_GGML=ON -Dggml_DIR="$W/inst/lib/cmake/ggml")
      if ldd "$W/inst/lib/libggml-cuda.so" | grep "not found"; then  # else PyTorch's CUDA 13 wheels
        d=$(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null) \
          && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
      fi
    else
      echo "== prebuilt ggml $PRE is stale (ggml tree hash differs): building ggml here"
      PRE= && rm -rf "$W/inst"
    fi
  fi
  cmake -S "$W/patched" -B "$W/build-patched" "${COMMON[@]}" "${PGGML[@]}" \
    -DLLAMA_INFINITEHIP=ON -DLLAMA_INFINITEHIP_LIB="$DIR/libinfinitehip_bridge.a" \
    -DLLAMA_INFINITEHIP_INCLUDE_DIR="$DIR/cxxbridge" -DCMAKE_INSTALL_PREFIX="$W/inst" >"$OUT/cmake-patched.log" 2>&1 \
    || { tail -40 "$OUT/cmake-patched.log"; exit 1; }
  cmake --build "$W/build-patched" -j"$JOBS" --target llama >"$OUT/build-patched.log" 2>&1 || { tail -60 "$OUT/build-patched.log"; exit 1; }
  t1=$(date +%s)
  if [ -n "$PRE" ]; then
    echo "== patched libllama against the prebuilt ggml: $((t1 - t0)) s"
  else
    echo "== patched CUDA build (ggml + ggml-cuda + libllama): $((t1 - t0)) s"
    cmake --install "$W/build-patched" >"$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
  fi
  cmake -S "$W/stock" -B "$W/build-stock" "${COMMON[@]}" -DLLAMA_USE_SYSTEM_GGML=ON -Dggml_DIR="$W/inst/lib/cmake/ggml" \
    >"$OUT/cmake-stock.log" 2>&1 || { tail -40 "$OUT/cmake-stock.log"; exit 1; }
  cmake --build "$W/build-stock" -j"$JOBS" --target llama >"$OUT/build-stock.log" 2>&1 || { tail -60 "$OUT/build-stock.log"; exit 1; }
  t2=$(date +%s)
  echo "== stock libllama against the same ggml: $((t2 - t1)) s"
  for v in patched stock; do
    # DT_RPATH (not RUNPATH) so libllama's own ggml dependencies resolve there too
    g++ -O2 -std=c++17 "$DIR/ihip_run.cpp" -I "$W/$v/include" -I "$W/$v/ggml/include" -L "$W/build-$v/bin" \
      -L "$W/build-patched/bin" ${PRE:+-L "$W/inst/lib"} -lllama -lggml -lggml-base \
      -Wl,--disable-new-dtags,-rpath,"$W/build-$v/bin:$W/build-patched/bin${PRE:+:$W/inst/lib}" \
      -o "$W/ihip_run-$v"
  done
  ldd "$W/ihip_run-stock" | grep -E "llama|ggml"
fi
PYTHONPATH="$W/gguf-py" python3 "$DIR/make_tiny_gguf.py" "$W/tiny256.gguf" --heads 16 --kv-heads 2 --head-dim 256
# Llama-3.1-8B's attention heads (head_dim 128, 32 q / 8 KV), 4 layers, small embd/ffn
PYTHONPATH="$W/gguf-py" python3 "$DIR/make_tiny_gguf.py" "$W/tiny128.gguf" --layers 4 --embd 1024 --heads 32 \
  --kv-heads 8 --head-dim 128 --ctx 1048576
# hip's RoPE modes beyond the trained length (section 12): a trained context of 256 tokens, d64, 8 q / 2 KV heads
PYTHONPATH="$W/gguf-py" python3 "$DIR/make_tiny_gguf.py" "$W/tinyrope.gguf" --layers 2 --embd 512 --heads 8 \
  --kv-heads 2 --head-dim 64 --ff 1024 --ctx 256
[ "$CUDA" = ON ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# the CUDA route's kernels: PTX precompiled by `stage` (else NVRTC compiles them here)
export INFINITEHIP_CACHE=$W/ptx-cache
mkdir -p "$INFINITEHIP_CACHE" && cp "$DIR"/ptx/*.ptx "$INFINITEHIP_CACHE/" 2>/dev/null || true
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
PYTHONUNBUFFERED=1 python3 "$DIR/gpu_test.py" --stock "$W/ihip_run-stock" --patched "$W/ihip_run-patched" \
  --model "$W/tiny256.gguf" --model128 "$W/tiny128.gguf" --model-rope "$W/tinyrope.gguf" --tmp "$W/tmp" \
  --json "$OUT/gpu_test.json" \
  --deadline $((T_START + ${IHIP_BUDGET_S:-570})) ${GPU_TEST_ARGS:-}
