# Sourced by the device scripts (tests/gpu/*-run.sh) from the repo root: the
# kernels' PTX from gpu-bin/ptx.tar.xz into $INFINITEHIP_CACHE (default
# /tmp/ihip-cache), lazy module loading, and libnvrtc on LD_LIBRARY_PATH.
export INFINITEHIP_CACHE=${INFINITEHIP_CACHE:-/tmp/ihip-cache} INFINITEHIP_LAZY_MODULES=all
mkdir -p "$INFINITEHIP_CACHE" /tmp/ihip-ptx
if [ -f gpu-bin/ptx.tar.xz ] && [ ! -e /tmp/ihip-ptx/.unpacked ]; then
  tar xJf gpu-bin/ptx.tar.xz -C /tmp/ihip-ptx && touch /tmp/ihip-ptx/.unpacked
fi
cp /tmp/ihip-ptx/ptx/*.ptx "$INFINITEHIP_CACHE/" 2>/dev/null || true
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
