# Device call 3 (2026-12-04 16:29 UTC, warm machine), the command passed to run(carry=["gpu-bin"], timeout_s=200).
# (prev2.log, sdpa*.json/log and warm.log did not come back: the transfer's file-count limit; their tables are in
# the call's printed output, quoted in BENCHMARKS.md.)
export INFINITEHIP_CACHE=/tmp/ihip-cache PYTHONUNBUFFERED=1; mkdir -p $INFINITEHIP_CACHE; cp gpu-bin/ptx/*.ptx $INFINITEHIP_CACHE/
for d in /usr/local/cuda/lib64 $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break; done
B=gpu-bin/infinitehip; date -u > $OUT/device.txt
gpu-bin/infinitehip gpu-test --engine-decode-only > $OUT/warm.log 2>&1
for r in 1 2; do
  python3 scripts/sdpa_bench.py --tokens 131072,1048576 --batch 1 --reps 3 --prefill-tokens '' --model-tokens 131072,1048576 --model-batch 1 --json $OUT/sdpa$r.json > $OUT/sdpa$r.log 2>&1
  $B bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 --baseline $OUT/sdpa$r.json --json $OUT/model$r.json > $OUT/model$r.log 2>&1
  $B bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 --baseline $OUT/sdpa$r.json --score-v1 --no-lean --json $OUT/prev$r.json > $OUT/prev$r.log 2>&1
done
