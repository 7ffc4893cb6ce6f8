#!/usr/bin/env bash
# Build stock and/or patched llama.cpp (CPU, Release) from the pinned source:
# the llama-cpp-python 0.3.36 sdist, which vendors llama.cpp commit 0c1e570.
#
#   scripts/llama-cpp-build.sh [stock|patched|both]     (default: both)
#
# Downloads the sdist once (pip, into $IHIP_CACHE, default ~/.cache/infinitehip),
# checks its sha256, extracts llama.cpp to $LLAMA_CPP_WORK/src-{stock,patched}
# (default target/llama.cpp, outside the git tree), applies patches/llama.cpp/*.patch
# with `patch -p1` to the patched copy, builds the cpp-bridge static library
# with cargo and libllama with -DLLAMA_INFINITEHIP=ON, then compiles
# tests/llama-cpp/ihip_run.cpp against each libllama (and locret_bench.cpp
# against the patched one):
#   $LLAMA_CPP_WORK/build-{stock,patched}/bin/{libllama.so,ihip_run}
# Nothing fetched is written inside the repository's tracked tree.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
WHICH=${1:-both}
JOBS=${JOBS:-2}
WORK=${LLAMA_CPP_WORK:-$REPO/target/llama.cpp}
CACHE=${IHIP_CACHE:-$HOME/.cache/infinitehip}
SDIST=llama_cpp_python-0.3.36.tar.gz
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
PATCHES=("$REPO"/patches/llama.cpp/*.patch)

mkdir -p "$WORK" "$CACHE"
if [ ! -f "$CACHE/$SDIST" ]; then
  echo "== download $SDIST (pip, llama-cpp-python==0.3.36 sdist)"
  python3 -m pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d "$CACHE" >/dev/null
fi
echo "$SDIST_SHA256  $CACHE/$SDIST" | sha256sum -c --quiet - || { echo "sha256 mismatch for $CACHE/$SDIST" >&2; exit 1; }

# extract <dir>: fresh copy of vendor/llama.cpp
extract() {
  rm -rf "$1.tmp" && mkdir -p "$1.tmp"
  tar xzf "$CACHE/$SDIST" -C "$1.tmp" --strip-components=3 llama_cpp_python-0.3.36/vendor/llama.cpp
  rm -f "$1.tmp/.git"   # a submodule gitlink pointing outside the sdist
  rm -rf "$1" && mv "$1.tmp" "$1"
}

CMAKE_COMMON=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF)

# GGML_NATIVE compiles ggml's AMX kernels where the CPU advertises AMX, but
# some VMs advertise it and grant the tile permission while tile loads still
# fault (SIGILL in tinygemm_kernel_amx on 2026-12-05's Xeon VM): probe one
# tile load, and build without AMX when it fails (GCC's explicit -mno-amx-*
# wins over -march=native). Stock and patched get the same flags.
amx_works() {
  local d; d=$(mktemp -d)
  cat >"$d/p.c" <<'C'
#include <immintrin.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */)) return 2;
    struct { unsigned char palette, start, res[14]; unsigned short colsb[16]; unsigned char rows[16]; }
        __attribute__((packed)) cfg;
    static char buf[1024] __attribute__((aligned(64)));
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1; cfg.colsb[0] = 64; cfg.rows[0] = 16;
    _tile_loadconfig(&cfg); _tile_loadd(0, buf, 64); _tile_release();
    return 0;
}
C
  local ok=1
  if gcc -O1 -mamx-tile "$d/p.c" -o "$d/p" 2>/dev/null; then ("$d/p") 2>/dev/null && ok=0; fi
  rm -rf "$d"
  return $ok
}
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null && ! amx_works; then
  echo "== this CPU advertises AMX but a tile load faults: building ggml without AMX"
  NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  CMAKE_COMMON+=("-DCMAKE_C_FLAGS=$NO_AMX" "-DCMAKE_CXX_FLAGS=$NO_AMX")
fi

# tool <src> <build>: ihip_run against that libllama
tool() {
  g++ -O2 -std=c++17 "$REPO/tests/llama-cpp/ihip_run.cpp" -I "$1/include" -I "$1/ggml/include" \
    -L "$2/bin" -lllama -lggml -lggml-base -Wl,-rpath,"$2/bin" -o "$2/bin/ihip_run"
}

build_stock() {
  local src=$WORK/src-stock bld=$WORK/build-stock
  [ -f "$src/.sdist-stamp" ] && [ "$(cat "$src/.sdist-stamp")" = "$SDIST_SHA256" ] || { extract "$src"; echo "$SDIST_SHA256" >"$src/.sdist-stamp"; }
  echo "== stock llama.cpp: configure + build (target llama, -j$JOBS)"
  cmake -S "$src" -B "$bld" "${CMAKE_COMMON[@]}" >"$WORK/cmake-stock.log"
  cmake --build "$bld" -j"$JOBS" --target llama >"$WORK/build-stock.log" 2>&1 || { tail -30 "$WORK/build-stock.log"; exit 1; }
  tool "$src" "$bld"
  echo "stock: $bld/bin/ihip_run"
}

build_patched() {
  local src=$WORK/src-patched bld=$WORK/build-patched
  local stamp
  stamp=$( (echo "$SDIST_SHA256"; cat "${PATCHES[@]}") | sha256sum | cut -d' ' -f1)
  if [ ! -f "$src/.patch-stamp" ] || [ "$(cat "$src/.patch-stamp")" != "$stamp" ]; then
    extract "$src"
    for p in "${PATCHES[@]}"; do
      echo "== apply $(basename "$p")"
      patch -p1 --batch --forward -d "$src" <"$p" >/dev/null
    done
    echo "$stamp" >"$src/.patch-stamp"
  fi
  echo "== cpp-bridge static library (cargo build --release)"
  cargo build --release -p infinitehip-cpp-bridge --lib --quiet
  echo "== patched llama.cpp: configure + build (-DLLAMA_INFINITEHIP=ON, target llama, -j$JOBS)"
  cmake -S "$src" -B "$bld" "${CMAKE_COMMON[@]}" -DLLAMA_INFINITEHIP=ON \
    -DLLAMA_INFINITEHIP_LIB="$REPO/target/release/libinfinitehip_bridge.a" \
    -DLLAMA_INFINITEHIP_INCLUDE_DIR="$REPO/target/cxxbridge" >"$WORK/cmake-patched.log"
  cmake --build "$bld" -j"$JOBS" --target llama >"$WORK/build-patched.log" 2>&1 || { tail -30 "$WORK/build-patched.log"; exit 1; }
  tool "$src" "$bld"
  # locret scoring bench/check: ggml graph vs the Rust op (patch 0003)
  g++ -O2 -std=c++17 "$REPO/tests/llama-cpp/locret_bench.cpp" -I "$src/include" -I "$src/ggml/include" \
    -I "$REPO/target/cxxbridge" -L "$bld/bin" -lllama -lggml -lggml-base -lggml-cpu -Wl,-rpath,"$bld/bin" \
    -o "$bld/bin/locret_bench"
  echo "patched: $bld/bin/ihip_run"
}

case "$WHICH" in
  stock) build_stock ;;
  patched) build_patched ;;
  both) build_stock; build_patched ;;
  *) echo "usage: $0 [stock|patched|both]" >&2; exit 2 ;;
esac
