"""The shim over the C ABI: results against a numpy f64 dense reference,
and every error path surfacing as InfinitehipError with Rust's message."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import infinitehip
from infinitehip import Engine, InfinitehipError

NQ, NKV, D = 4, 2, 16


def config(default=None, dtype="f32"):
    return {
        "model": {"n_layers": 2, "n_q_heads": NQ, "n_kv_heads": NKV, "head_dim": D},
        "kv": {"page_size": 16, "dtype": dtype},
        "dense_layers": 1,
        "default": default
        or {
            "method": "hip",
            "sink": 4,
            "window": 16,
            "stages": [
                {"chunk_size": 16, "keep_tokens": 4096, "refresh_interval": 4},
                {"chunk_size": 4, "keep_tokens": 2048, "refresh_interval": 2},
            ],
            "block_size_q": 8,
            "q_stride": 1,
            "prefill_chunk": 32,
        },
    }


def dense_ref(q, q_start, k, v):
    """Causal GQA attention in f64. q [n, NQ, D], k/v [t, NKV, D]."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    g = NQ // NKV
    out = np.zeros_like(q)
    for i in range(q.shape[0]):
        lim = q_start + i + 1
        for h in range(NQ):
            s = k[:lim, h // g] @ q[i, h] / np.sqrt(D)
            w = np.exp(s - s.max())
            out[i, h] = (w / w.sum()) @ v[:lim, h // g]
    return out


def rel(a, b):
    a = np.asarray(a, dtype=np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("kv_dtype,bound", [(np.float32, 1e-5), (np.float16, 1e-2)])
def test_full_budget_equals_dense_reference(kv_dtype, bound):
    rng = np.random.default_rng(3)
    eng = Engine(config(dtype="f32" if kv_dtype == np.float32 else "f16"))
    assert (eng.n_layers, eng.n_q_heads, eng.n_kv_heads, eng.head_dim) == (2, NQ, NKV, D)
    eng.add_sequence(7)
    ks, vs = [], []
    for step, n in enumerate([70, 1, 1, 1]):
        k = rng.standard_normal((n, NKV, D)).astype(kv_dtype)
        v = rng.standard_normal((n, NKV, D)).astype(kv_dtype)
        for layer in range(2):
            # 2-D layout on layer 1, 3-D on layer 0: both accepted.
            kk, vv = (k, v) if layer == 0 else (k.reshape(n, -1), v.reshape(n, -1))
            eng.append(layer, 7, kk, vv, phase="prefill" if step == 0 else "decode", prompt_done=True)
        ks.append(k)
        vs.append(v)
        kall, vall = np.concatenate(ks), np.concatenate(vs)
        q = rng.standard_normal((n, NQ, D)).astype(np.float32)
        want = dense_ref(q, kall.shape[0] - n, kall, vall)
        for layer in range(2):
            out = eng.attend_prefill(layer, 7, q) if step == 0 else eng.attend_decode(layer, [7], q)
            assert out.shape == q.shape and out.dtype == np.float32
            assert np.isfinite(out).all()
            assert rel(out, want) <= bound, (layer, step, rel(out, want))
    assert eng.seq_len(1, 7) == 73
    st = eng.stats()
    assert [l["method"] for l in st["layers"]] == ["dense", "hip"]
    eng.free_sequence(7)
    assert eng.stats()["layers"][1]["pages_in_use"] == 0
    eng.close()


def test_decode_batch_fork_and_out_buffer():
    rng = np.random.default_rng(4)
    eng = Engine(config({"method": "dense"}))
    eng.add_sequence(1)
    k = rng.standard_normal((20, NKV, D)).astype(np.float32)
    v = rng.standard_normal((20, NKV, D)).astype(np.float32)
    eng.append(1, 1, k, v)
    eng.fork_sequence(1, 2)
    k2 = rng.standard_normal((5, NKV, D)).astype(np.float32)
    v2 = rng.standard_normal((5, NKV, D)).astype(np.float32)
    eng.append(1, 2, k2, v2, phase="decode")
    q = rng.standard_normal((2, NQ * D)).astype(np.float32)  # [tokens, heads*dim] like SGLang
    out = np.full_like(q, np.nan)
    r = eng.attend_decode(1, [1, 2], q, out=out)
    assert r is out
    w1 = dense_ref(q[:1].reshape(1, NQ, D), 19, k, v).reshape(1, -1)
    w2 = dense_ref(q[1:].reshape(1, NQ, D), 24, np.concatenate([k, k2]), np.concatenate([v, v2])).reshape(1, -1)
    assert rel(out[:1], w1) <= 1e-5 and rel(out[1:], w2) <= 1e-5


def test_torch_cpu_tensors_when_available():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    eng = Engine(config({"method": "dense"}, dtype="bf16"))
    eng.add_sequence(3)
    k = torch.randn(30, NKV, D, generator=g, dtype=torch.float32).to(torch.bfloat16)
    v = torch.randn(30, NKV, D, generator=g, dtype=torch.float32).to(torch.bfloat16)
    eng.append(0, 3, k, v)
    q = torch.randn(30, NQ * D, generator=g, dtype=torch.float32)
    out = eng.attend_prefill(0, 3, q)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    want = dense_ref(q.numpy().reshape(30, NQ, D), 0, k.float().numpy(), v.float().numpy())
    assert rel(out.numpy().reshape(30, NQ, D), want) <= 1e-2
    # Non-contiguous and f64 inputs are converted, not rejected.
    qt = q.double().t().contiguous().t()
    out2 = eng.attend_prefill(0, 3, qt)
    assert rel(out2.numpy().reshape(30, NQ, D), want) <= 1e-2
    with pytest.raises(InfinitehipError, match="on meta.*CPU"):
        eng.attend_prefill(0, 3, torch.empty(1, NQ * D, device="meta"))


def test_errors_carry_rust_messages():
    with pytest.raises(InfinitehipError, match=r"model\.n_q_heads"):
        Engine({"model": {"n_kv_heads": 3}})
    with pytest.raises(InfinitehipError, match=r"default\.stages\[0\]\.keep_tokens"):
        infinitehip.check_config({"default": {"method": "hip", "stages": [
            {"chunk_size": 16, "keep_tokens": 10, "refresh_interval": 1}]}})
    with pytest.raises(InfinitehipError, match="not valid JSON"):
        Engine("{")
    with pytest.raises(InfinitehipError, match="unknown field"):
        Engine({"modle": {}})
    eng = Engine(config({"method": "dense"}))
    eng.add_sequence(5)
    with pytest.raises(InfinitehipError, match="5 already exists") as ei:
        eng.add_sequence(5)
    assert ei.value.code == -2
    z = np.zeros((2, NKV, D), np.float32)
    with pytest.raises(InfinitehipError, match="unknown sequence id 99"):
        eng.append(0, 99, z, z)
    with pytest.raises(InfinitehipError, match=r"n_kv_heads=3"):
        eng.append(0, 5, np.zeros((2, 3, D), np.float32), np.zeros((2, 3, D), np.float32))
    with pytest.raises(InfinitehipError, match="expected \\[n, 2\\*16\\]"):
        eng.append(0, 5, np.zeros((2, 7), np.float32), np.zeros((2, 7), np.float32))
    with pytest.raises(InfinitehipError, match="k and v differ"):
        eng.append(0, 5, z, z[:1])
    with pytest.raises(InfinitehipError, match="phase must be"):
        eng.append(0, 5, z, z, phase="later")
    with pytest.raises(InfinitehipError, match="layer 9"):
        eng.append(9, 5, z, z)
    with pytest.raises(InfinitehipError, match="no tokens"):
        eng.attend_decode(0, [5], np.zeros((1, NQ, D), np.float32))
    with pytest.raises(InfinitehipError, match="2 sequences but q holds 1"):
        eng.attend_decode(0, [5, 5], np.zeros((1, NQ, D), np.float32))
    with pytest.raises(InfinitehipError, match="n_q_heads=3"):
        eng.attend_prefill(0, 5, np.zeros((1, 3, D), np.float32))
    with pytest.raises(InfinitehipError, match="proj_q has 1 elements, expected 128"):
        eng.append(0, 5, z, z, proj=(np.zeros(1, np.float32), z, z))
    eng.append(0, 5, z, z, proj=(np.zeros((2, NQ, D), np.float32), z, z))  # accepted
    assert eng.seq_len(0, 5) == 2
    with pytest.raises(InfinitehipError, match="out has shape"):
        eng.attend_prefill(0, 5, np.zeros((1, NQ, D), np.float32), out=np.zeros(3, np.float32))
    eng.close()
    with pytest.raises(InfinitehipError, match="closed"):
        eng.add_sequence(1)


def test_default_config_round_trips():
    d = infinitehip.default_config()
    assert d["model"]["n_q_heads"] == 32
    infinitehip.check_config(d)
    infinitehip.check_config(json.dumps(d))
    assert infinitehip.library_version().startswith("0.")


def test_import_needs_no_library_and_no_torch():
    code = (
        "import sys, infinitehip\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "import infinitehip.sglang\n"
        "assert 'torch' not in sys.modules and 'sglang' not in sys.modules\n"
        "try:\n"
        "    infinitehip.Engine({})\n"
        "except infinitehip.InfinitehipError as e:\n"
        "    assert 'INFINITEHIP_LIB' in str(e), e\n"
        "    print('ok')\n"
    )
    env = dict(os.environ, INFINITEHIP_LIB="/nonexistent/libinfinitehip.so")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_a_library_of_another_abi_version_is_refused():
    from infinitehip import _ffi

    class Fn:
        def __init__(self, v):
            self.v = v

        def __call__(self):
            return self.v

    class Lib:
        pass

    other = Lib()
    other.ihip_abi_version = Fn(_ffi.ABI_VERSION + 1)
    with pytest.raises(InfinitehipError, match=f"C ABI version {_ffi.ABI_VERSION + 1}") as ei:
        _ffi.check_abi(other, "other.so")
    assert ei.value.code == _ffi.IHIP_ERR_UNSUPPORTED
    with pytest.raises(InfinitehipError, match="no ihip_abi_version"):
        _ffi.check_abi(Lib(), "old.so")
    # The library under test was accepted, and says the same version.
    assert _ffi.lib().ihip_abi_version() == _ffi.ABI_VERSION


def test_error_codes_match_the_header():
    """The shim's constants are the header's (kept in sync by hand)."""
    from pathlib import Path
    import re
    from infinitehip import _ffi

    header = Path(__file__).resolve().parents[2] / "rust/infinitehip-capi/include/infinitehip.h"
    defines = dict(re.findall(r"#define (IHIP_\w+) \(?(-?\d+)\)?", header.read_text()))
    names = [n for n in dir(_ffi) if n.startswith("IHIP_")]
    assert len(names) >= 8
    for n in names:
        assert int(defines[n]) == getattr(_ffi, n), n
    assert int(defines["IHIP_ABI_VERSION"]) == _ffi.ABI_VERSION


def test_gpu_descriptors_reach_the_library_field_by_field():
    """The ctypes descriptor structs have the Rust layout (ABI 4): each bad
    index is reported under its own field name, checked before the handle
    (so this runs without a GPU)."""
    import ctypes
    from infinitehip import _ffi

    lib = _ffi.lib()
    i64s = lambda *x: (ctypes.c_int64 * len(x))(*x)  # noqa: E731
    ids = (ctypes.c_uint64 * 2)(1, 2)
    kv = _ffi.KvCache(16, 16, _ffi.DTYPE_BF16, 16, 4, 3, 2, 64, 16)
    rows = _ffi.DeviceRows(16, _ffi.DTYPE_BF16, 64)
    cases = [
        ((i64s(0, 3), i64s(1, 1), i64s(1, 1)), "table_rows[1] = 3"),
        ((i64s(0, 1), i64s(1, 9), i64s(1, 1)), "lens[1] = 9"),
        ((i64s(0, 1), i64s(1, 2), i64s(1, 3)), "n_new[1] = 3"),
    ]
    for (tr, ls, nn), msg in cases:
        reqs = _ffi.GpuRequests(2, ids, tr, ls, nn)
        rc = lib.ihip_gpu_prefill(None, 0, 0, ctypes.byref(reqs), ctypes.byref(kv), ctypes.byref(rows),
                                  ctypes.byref(rows), 0.0, None)
        assert rc == _ffi.IHIP_ERR_ARG, (msg, rc)
        assert msg in lib.ihip_last_error().decode()
    reqs = _ffi.GpuRequests(2, ids, i64s(0, 1), i64s(1, 8), None)
    rc = lib.ihip_gpu_decode(None, 0, 0, ctypes.byref(reqs), ctypes.byref(kv), ctypes.byref(rows),
                             ctypes.byref(rows), 0.0)
    # Valid indices get past the checks and stop at the NULL handle.
    assert rc in (_ffi.IHIP_ERR_ARG, _ffi.IHIP_ERR_NO_GPU), rc
    assert "handle" in lib.ihip_last_error().decode() or "CUDA" in lib.ihip_last_error().decode()


def test_an_index_out_of_range_is_an_argument_error():
    eng = Engine(config({"method": "dense"}))
    eng.add_sequence(1)
    z = np.zeros((2, NKV, D), np.float32)
    with pytest.raises(InfinitehipError, match="layer 7") as ei:
        eng.append(7, 1, z, z)
    assert ei.value.code == -1


def test_read_returns_what_was_appended_and_checks_its_range():
    eng = Engine(config({"method": "dense"}))
    rng = np.random.default_rng(5)
    k = rng.standard_normal((9, NKV, D)).astype(np.float32)
    v = rng.standard_normal((9, NKV, D)).astype(np.float32)
    eng.add_sequence(1)
    eng.append(1, 1, k, v)
    rk, rv = eng.read(1, 1)
    assert np.array_equal(rk, k) and np.array_equal(rv, v)
    rk, rv = eng.read(1, 1, 3, 5)
    assert np.array_equal(rk, k[3:5]) and np.array_equal(rv, v[3:5])
    assert eng.read(1, 1, 4, 4)[0].shape == (0, NKV, D)
    with pytest.raises(InfinitehipError):
        eng.read(1, 1, 0, 10)  # past the held tokens
    with pytest.raises(InfinitehipError, match="end 2 < start 3"):
        eng.read(1, 1, 3, 2)
    eng.evict(1, 1)  # dense: nothing owed, nothing dropped
    assert eng.seq_len(1, 1) == 9
    with pytest.raises(InfinitehipError):
        eng.evict(1, 77)  # unknown sequence
