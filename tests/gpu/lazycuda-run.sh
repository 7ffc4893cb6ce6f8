#!/usr/bin/env bash
# LazyLLM row dropping on the CUDA build (issue 18, patch 0011), one device
# call: build the patched CUDA llama.cpp (patches 0001-0011; the stock
# reference is the same binary with the plugin off, bit-identical to stock
# per gpu_test.py), run tests/llama-cpp/e2e_test.py --only-lazy with the
# model and K/V on the GPU until a deadline, then TTFT stock vs lazy on the
# d128 tiny model if time is left.
#   here:  stage DIR = src.tar.xz (patched tree + gguf-py), libinfinitehip_bridge.a
#          (feature cuda), cxxbridge/, ihip_run.cpp, make_tiny_gguf.py, e2e_test.py, this
#   there: bash DIR/lazycuda-run.sh   ($OUT set by the device tool; LIMIT_S: seconds)
set -u
T0=$(date +%s)
el() { echo $(($(date +%s) - T0)); }
LIMIT=${LIMIT_S:-295}
X=$(cd "$(dirname "$0")" && pwd)
W=/tmp/lzc
mkdir -p "$W" "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== $(nproc) cores, nvcc $(nvcc --version | tail -1)"
tar xJf "$X/src.tar.xz" -C "$W"
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S "$W/patched" -B "$W/build" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_COMMON=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DGGML_CUDA="${IHIP_GGML_CUDA:-ON}" -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DLLAMA_INFINITEHIP=ON -DLLAMA_INFINITEHIP_LIB="$X/libinfinitehip_bridge.a" \
  -DLLAMA_INFINITEHIP_INCLUDE_DIR="$X/cxxbridge" >"$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
cmake --build "$W/build" -j"$(nproc)" --target llama >"$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
echo "== patched CUDA build: $(el) s"
mkdir -p "$W/work/build-patched/bin" "$W/work/build-stock/bin"
g++ -O2 -std=c++17 "$X/ihip_run.cpp" -I "$W/patched/include" -I "$W/patched/ggml/include" -L "$W/build/bin" \
  -lllama -lggml -lggml-base -Wl,-rpath,"$W/build/bin" -o "$W/work/build-patched/bin/ihip_run" || exit 1
# plugin off == stock (LLAMA_INFINITEHIP_CONFIG unset for every stock run)
ln -sf "$W/work/build-patched/bin/ihip_run" "$W/work/build-stock/bin/ihip_run"
export PYTHONPATH="$W/gguf-py"
CUDA_FLAG=on
[ "${IHIP_GGML_CUDA:-ON}" = ON ] || CUDA_FLAG=off
timeout $((LIMIT - $(el) - 5)) python3 "$X/e2e_test.py" --work "$W/work" --only-lazy --cuda $CUDA_FLAG --threads 8 \
  --deadline $((T0 + LIMIT - 25)) --json "$OUT/lazy.json" >"$OUT/lazy.log" 2>&1
echo "== lazy e2e rc=$? at $(el) s"
grep -E "^(PASS|FAIL)" "$OUT/lazy.log" | cut -c1-400
grep -E "Traceback|Error" -A3 "$OUT/lazy.log" | tail -8
grep -h "lazy rows on device" "$OUT"/*.log 2>/dev/null | head -1
# TTFT (prompt in one ubatch, last token's logits): stock vs lazy 1:0.5 2:0.25
if [ $((LIMIT - $(el))) -gt 40 ]; then
  python3 "$X/make_tiny_gguf.py" "$W/tiny128.gguf" --layers 4 --embd 1024 --heads 32 --kv-heads 8 --head-dim 128 \
    --ctx 1048576 >/dev/null
  echo '{"dense_layers": 0, "default": {"method": "lazy", "points": [{"layer": 1, "keep": 0.5}, {"layer": 2, "keep": 0.25}]}}' >"$W/lazy.json"
  for N in 8192 32768; do
    [ $((LIMIT - $(el))) -gt 20 ] || break
    python3 -c "import numpy as np; np.random.default_rng(11).integers(3, 256, $N + 1).astype(np.int32).tofile('$W/ids$N')"
    for v in stock lazy; do
      [ $v = lazy ] && export LLAMA_INFINITEHIP_CONFIG="$W/lazy.json" || unset LLAMA_INFINITEHIP_CONFIG
      for rep in 1 2; do
        "$W/work/build-patched/bin/ihip_run" score "$W/tiny128.gguf" --input "$W/ids$N" --prefill $N --n $((N + 1)) \
          --batch $N --fa on --prefill-logits last --nll "$W/nll" --threads 8 2>"$OUT/ttft-$v-$N.err" |
          tail -1 | sed "s/^/ttft $v N=$N rep=$rep: /"
      done
    done
  done
  unset LLAMA_INFINITEHIP_CONFIG
fi
echo "== done at $(el) s"
