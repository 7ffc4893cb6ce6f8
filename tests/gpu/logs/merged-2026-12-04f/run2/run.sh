# Device call 2 (2026-12-04 16:28 UTC), the command passed to run(carry=["gpu-bin"], timeout_s=260), one line split here.
export INFINITEHIP_CACHE=/tmp/ihip-cache PYTHONUNBUFFERED=1; mkdir -p $INFINITEHIP_CACHE; cp gpu-bin/ptx/*.ptx $INFINITEHIP_CACHE/
for d in /usr/local/cuda/lib64 $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break; done
T0=$(date +%s); st(){ n=$1; t=$2; shift 2; s=$(date +%s); timeout $t "$@" > $OUT/$n.log 2>&1; echo "$n: rc=$? $(( $(date +%s)-s )) s (at $(( $(date +%s)-T0 )) s)" >> $OUT/device.txt; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $OUT/device.txt
st offload 200 gpu-bin/infinitehip gpu-test-offload &
st engine-u2 200 gpu-bin/infinitehip gpu-test --engine-decode-only --dense-chunks 2 &
st shim-offload-gpu 150 env INFINITEHIP_LIB=$PWD/gpu-bin/libinfinitehip.so python3 tests/gpu/test_shim_offload_gpu.py &
wait
