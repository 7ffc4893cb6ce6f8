#!/usr/bin/env bash
# Prebuilds the patched llama.cpp's ggml + ggml-cuda (sm_90 SASS, CUDA 13.0) here,
# on a CPU-only machine, so that scripts/llama-cpp-gpu.sh run on the device
# builds only the two libllamas against it (IHIP_GGML_PREBUILT, ~50 s instead
# of ~280 s of device time).
#   here:   bash tests/gpu/ggml-prebuild.sh      (30-60 min on 2 cores the first time)
#   output: target/ggml-cuda-prebuilt/ggml-inst.tar.xz  (lib/*.so*, lib/cmake/ggml, include/)
#           target/ggml-cuda-prebuilt/ggml-inst.txt     (ggml_tree_sha256: the key; patch hash,
#                                                         versions, options, sonames)
#   there:  IHIP_GGML_PREBUILT=.../ggml-inst.tar.xz bash llama-cpp-gpu.sh run DIR OUT
# The CUDA toolchain comes from PyPI wheels (nvcc, crt, nvvm, cudart, cccl,
# cublas 13.0.x) into a venv outside the repo ($CACHE/cuda13-venv), completed
# into a toolkit root (unversioned .so links, lib64, a libcuda.so.1 stub built
# from cuda.h: the driver is only needed at run time). The patched tree is made
# as `stage` makes it (same excludes, patches/llama.cpp/*.patch); its ggml/ is
# added by a wrapper project as llama.cpp's top level adds it, with the options
# that gives it on the device (GGML_LLAMAFILE, GGML_CUDA_GRAPHS on), except
# GGML_NATIVE=OFF with an x86-64-v3 baseline (AVX2/FMA/F16C/BMI2) and
# GGML_CUDA_NCCL=OFF (no NCCL here; one GPU needs none). RUNPATH $ORIGIN and
# /usr/local/cuda/lib64 (the device's cudart/cublas 13). Idempotent:
# nothing is redone while the key (sha256 of the patched ggml/ files, options,
# wheel pins) is unchanged; FORCE=1 repacks anyway. The build dir is kept, so a
# change in ggml recompiles only what changed.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
CACHE=${IHIP_PREBUILD_CACHE:-/work/builds}
VENV=$CACHE/cuda13-venv
B=$CACHE/ggml-prebuild
OUTD=$REPO/target/ggml-cuda-prebuilt
ARCH=${ARCH:-90-real}   # SASS only (H100/H200): no PTX, half the size of "90"
JOBS=${JOBS:-2}
S=${LLAMA_SRC:-$REPO/target/llama.cpp/src-stock}
PINS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96
      nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14 ninja==1.13.2)
[ -d "$S/ggml" ] || { echo "no llama.cpp tree at $S (scripts/llama-cpp-build.sh makes it; or set LLAMA_SRC)" >&2; exit 1; }

# -- 1. the patched tree, exactly as `stage` stages it (the device hashes the same files)
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
mkdir -p "$T/patched"
LLAMA_SRC=$S bash scripts/llama-cpp-gpu.sh patched-tree "$T/patched"
TREE_HASH=$(bash scripts/llama-cpp-gpu.sh ggml-hash "$T/patched")
PATCH_HASH=$(cat "$REPO"/patches/llama.cpp/*.patch | sha256sum | cut -d' ' -f1)

OPTS=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DCMAKE_INSTALL_LIBDIR=lib
  -DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON
  -DGGML_LLAMAFILE=ON -DGGML_OPENMP=ON -DGGML_CCACHE=OFF -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF
  -DGGML_CUDA=ON -DGGML_CUDA_GRAPHS=ON -DGGML_CUDA_NCCL=OFF -DCMAKE_CUDA_ARCHITECTURES="$ARCH"
  '-DCMAKE_INSTALL_RPATH=$ORIGIN;/usr/local/cuda/lib64;/usr/local/cuda/targets/x86_64-linux/lib')
KEY=$(printf '%s\n' "$TREE_HASH" "${OPTS[@]}" "${PINS[@]}" | sha256sum | cut -d' ' -f1)
if [ "${FORCE:-0}" != 1 ] && [ -f "$OUTD/ggml-inst.tar.xz" ] && grep -qx "key: $KEY" "$OUTD/ggml-inst.txt" 2>/dev/null; then
  echo "== up to date: $OUTD/ggml-inst.tar.xz (ggml tree $TREE_HASH)"; exit 0
fi

# -- 2. CUDA 13.0 toolchain from PyPI wheels, completed into a toolkit root
[ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
if [ "$("$VENV/bin/pip" freeze 2>/dev/null | grep -cxF -f <(printf '%s\n' "${PINS[@]}"))" != "${#PINS[@]}" ]; then
  "$VENV/bin/pip" install -q "${PINS[@]}"
fi
CT=$(echo "$VENV"/lib/python3*/site-packages/nvidia/cu13)
[ -x "$CT/bin/nvcc" ] || { echo "no nvcc in $CT" >&2; exit 1; }
for l in cudart cublas cublasLt; do ln -sfn "lib$l.so.13" "$CT/lib/lib$l.so"; done
[ -e "$CT/lib64" ] || ln -s lib "$CT/lib64"   # nvcc.profile links from lib64 (and lib64/stubs)
if [ ! -f "$CT/lib/stubs/libcuda.so" ]; then   # the driver API's names, SONAME libcuda.so.1
  mkdir -p "$CT/lib/stubs"
  gcc -E -P -I"$CT/include" "$CT/include/cuda.h" | grep -oE '\bcu[A-Z][A-Za-z0-9_]*\s*\(' | tr -d ' (' | sort -u \
    | awk '{print "void " $1 "(void) {}"}' >"$T/cuda-stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CT/lib/stubs/libcuda.so" "$T/cuda-stub.c"
fi
export PATH="$VENV/bin:$PATH"

# -- 3. sync the tree into $B/src (unchanged files keep their mtimes), configure ggml/, build, install
mkdir -p "$B/src" "$OUTD"
python3 - "$T/patched" "$B/src" <<'EOF'
import filecmp, os, shutil, sys
src, dst = sys.argv[1:]
seen = set()
for root, dirs, files in os.walk(src):
    rel = os.path.relpath(root, src)
    os.makedirs(os.path.join(dst, rel), exist_ok=True)
    for f in files:
        a, b = os.path.join(root, f), os.path.normpath(os.path.join(dst, rel, f))
        seen.add(b)
        if not (os.path.isfile(b) and filecmp.cmp(a, b, shallow=False)):
            shutil.copy2(a, b)
for root, dirs, files in os.walk(dst):
    for f in files:
        p = os.path.normpath(os.path.join(root, f))
        if p not in seen:
            os.remove(p)
EOF
# ggml/ added as llama.cpp's top level adds it (not standalone: the trimmed tree has no ggml.pc.in)
mkdir -p "$B/wrap" && cat >"$B/wrap/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.14)
project(ggml-prebuild C CXX)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
set(CMAKE_LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
add_subdirectory(${CMAKE_CURRENT_SOURCE_DIR}/../src/ggml ggml)
CMAKE
t0=$(date +%s)
cmake -S "$B/wrap" -B "$B/build" -G Ninja "${OPTS[@]}" -DCUDAToolkit_ROOT="$CT" -DCMAKE_CUDA_COMPILER="$CT/bin/nvcc" \
  -DCMAKE_INSTALL_PREFIX="$B/inst" >"$B/cmake.log" 2>&1 || { tail -40 "$B/cmake.log"; exit 1; }
grep -E "CUDA|CPU backend|Adding CPU|OpenMP" "$B/cmake.log" | head -20
( while sleep 120; do echo "   $(date +%T) $(grep -oE '^\[[0-9]+/[0-9]+\]' "$B/build.log" 2>/dev/null | tail -1)"; done ) &
PROG=$!
rc=0; nice -n 10 cmake --build "$B/build" -j"$JOBS" >"$B/build.log" 2>&1 || rc=$?
kill "$PROG" 2>/dev/null || true
[ $rc = 0 ] || { tail -60 "$B/build.log"; exit 1; }
t1=$(date +%s)
echo "== ggml + ggml-cuda build: $((t1 - t0)) s"
rm -rf "$B/inst" && cmake --install "$B/build" >"$B/install.log" 2>&1 || { tail -20 "$B/install.log"; exit 1; }
find "$B/inst/lib" -maxdepth 1 -type f -name "libggml*.so*" -exec strip --strip-unneeded {} +   # not the links
if grep -rl "$CACHE" "$B/inst/lib/cmake" >/dev/null; then echo "the installed CMake files name $CACHE:" >&2; grep -rn "$CACHE" "$B/inst/lib/cmake" >&2; exit 1; fi

# -- 4. describe (inside the tar too: `run` checks ggml_tree_sha256 against its own patched tree) + pack
{
  echo "key: $KEY"
  echo "ggml_tree_sha256: $TREE_HASH"
  echo "patch_sha256: $PATCH_HASH  (cat patches/llama.cpp/*.patch | sha256sum)"
  echo "packed: $(date -u +%FT%TZ); build step of this run $((t1 - t0)) s ($JOBS jobs, $(uname -m))"
  echo "nvcc: $("$CT/bin/nvcc" --version | tail -1)"
  echo "host compiler: $(g++ --version | head -1); glibc $(ldd --version | head -1 | awk '{print $NF}')"
  echo "wheels: ${PINS[*]}"
  echo "cmake options: ${OPTS[*]}"
  for f in "$B"/inst/lib/libggml*.so; do
    echo "$(basename "$f"): NEEDED $(readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')" \
         "RUNPATH $(readelf -d "$f" | sed -n 's/.*(R[UN]*PATH).*\[\(.*\)\]/\1/p')"
    echo "  newest GLIBC/GLIBCXX/CXXABI needed: $(objdump -T "$f" | grep -oE '\bGLIBC_[0-9.]+' | sort -uV | tail -1)" \
         "$(objdump -T "$f" | grep -oE 'GLIBCXX_[0-9.]+' | sort -uV | tail -1) $(objdump -T "$f" | grep -oE 'CXXABI_[0-9.]+' | sort -uV | tail -1)"
  done
} >"$B/inst/ggml-prebuilt.txt"
XZ_OPT="-9 -T$JOBS" tar cJf "$OUTD/ggml-inst.tar.xz.tmp" -C "$B/inst" ggml-prebuilt.txt lib include
mv "$OUTD/ggml-inst.tar.xz.tmp" "$OUTD/ggml-inst.tar.xz"
{ cat "$B/inst/ggml-prebuilt.txt"
  echo "size: $(stat -c %s "$OUTD/ggml-inst.tar.xz") bytes compressed, $(du -sb "$B/inst" | cut -f1) unpacked"
} >"$OUTD/ggml-inst.txt"
cat "$OUTD/ggml-inst.txt"
