#!/usr/bin/env bash
# Lead's first device call of 2026-12-04 session 4: engine dense decode check, llama.cpp CUDA build with patch 0010, lazy e2e on CUDA, gpu_test.
set -u
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
X=.xfer-lead
mkdir -p gpu-bin $X/ptx && cp $X/bin/* gpu-bin/ && tar xJf $X/ptx.tar.xz -C gpu-bin && cp gpu-bin/ptx/* $X/ptx/
export INFINITEHIP_CACHE=/tmp/ihip-cache; mkdir -p $INFINITEHIP_CACHE; cp gpu-bin/ptx/*.ptx $INFINITEHIP_CACHE/
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
timeout 90 gpu-bin/infinitehip gpu-test --engine-decode-only > $OUT/engine-decode.log 2>&1; echo "engine-decode rc=$? at $(el) s"
grep -E "^(PASS|FAIL)|passed|failed" $OUT/engine-decode.log | cut -c1-300 | tail -30
GPU_TEST_ARGS="--skip-tests --skip-bench --skip-ttft" timeout 330 bash $X/llama-cpp-gpu.sh run $X $OUT/ll-build > $OUT/ll-build.log 2>&1; echo "llama build rc=$? at $(el) s"; tail -5 $OUT/ll-build.log
mkdir -p /tmp/w/build-patched/bin /tmp/w/build-stock/bin
ln -sf /tmp/ihip-gpu/ihip_run-patched /tmp/w/build-patched/bin/ihip_run; ln -sf /tmp/ihip-gpu/ihip_run-stock /tmp/w/build-stock/bin/ihip_run
PYTHONPATH=/tmp/ihip-gpu/gguf-py timeout 100 python3 $X/e2e_test.py --work /tmp/w --only-lazy --json $OUT/lazy.json > $OUT/lazy.log 2>&1; echo "lazy e2e rc=$? at $(el) s"
grep -E "^(PASS|FAIL)" $OUT/lazy.log | cut -c1-250; tail -3 $OUT/lazy.log
B=$(( 575 - $(el) ))
if [ $B -gt 60 ]; then
  IHIP_REUSE=1 IHIP_BUDGET_S=$B GPU_TEST_ARGS="--skip-bench --skip-ttft" timeout $B bash $X/llama-cpp-gpu.sh run $X $OUT/ll > $OUT/ll.log 2>&1; echo "gpu_test rc=$? at $(el) s"
  grep -E "PASS|FAIL|SKIP" $OUT/ll.log | cut -c1-200 | tail -30
fi
