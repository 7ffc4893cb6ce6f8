"""The GPU entry of the shim (infinitehip.gpu) on a machine without a GPU:
importing needs neither torch nor a GPU, and every call fails with a clear
InfinitehipError (library built without CUDA, or no driver). The GPU path
itself is tested on the device (tests/gpu/test_shim_gpu.py)."""

import os
import subprocess
import sys

import pytest

import infinitehip
from infinitehip import InfinitehipError

CFG = {"model": {"n_layers": 2, "n_q_heads": 4, "n_kv_heads": 2, "head_dim": 64}, "dense_layers": 1}


def _gpu_usable():
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def test_import_gpu_needs_no_torch():
    code = (
        "import sys, infinitehip.gpu as g\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print('ok')\n"
    )
    env = dict(os.environ, INFINITEHIP_LIB="/nonexistent/libinfinitehip.so")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.skipif(_gpu_usable(), reason="a GPU is present: tested on the device")
def test_gpu_attention_fails_cleanly_without_cuda():
    import infinitehip.gpu as g

    assert not g.available(CFG)
    with pytest.raises(InfinitehipError) as ei:
        g.GpuAttention(CFG)
    msg = str(ei.value)
    if g.gpu_built():
        assert "libcuda" in msg or "CUDA" in msg, msg
    else:
        assert "without CUDA support" in msg, msg
    assert ei.value.code == -4


def test_gpu_config_errors_name_the_field():
    import infinitehip.gpu as g

    with pytest.raises(InfinitehipError) as ei:
        g.GpuAttention({"model": {"n_layers": 0}})
    assert "n_layers" in str(ei.value)
