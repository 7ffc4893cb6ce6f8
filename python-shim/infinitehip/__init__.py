"""infinitehip: Python bindings over libinfinitehip's C ABI.

    import infinitehip, numpy as np
    eng = infinitehip.Engine({"model": {"n_layers": 2, "n_q_heads": 4,
                                        "n_kv_heads": 2, "head_dim": 16}})
    eng.add_sequence(1)
    eng.append(0, 1, k, v, phase="prefill")      # k, v: [n, kv_heads, head_dim]
    out = eng.attend_prefill(0, 1, q)             # q: [n, q_heads, head_dim] f32

Arrays are numpy arrays or (when torch is installed) CPU torch tensors,
passed by pointer. Queries and outputs are float32; K/V may be float32,
float16 or bfloat16. No algorithm lives here: the Rust library does all the
work, and its errors arrive as `InfinitehipError` carrying its message.
"""

import ctypes
import json

import numpy as np

from . import _ffi
from ._ffi import InfinitehipError

__all__ = [
    "Engine",
    "InfinitehipError",
    "default_config",
    "check_config",
    "library_version",
]

__version__ = "0.1.0"

_DTYPES = {
    "float32": _ffi.DTYPE_F32,
    "float16": _ffi.DTYPE_F16,
    "bfloat16": _ffi.DTYPE_BF16,
}


def library_version():
    return _ffi.lib().ihip_version().decode()


def default_config():
    """The library's default policy config (Llama-3.1-8B shape) as a dict."""
    return json.loads(_ffi.take_string(_ffi.lib().ihip_default_config_json(), "default config"))


def _config_text(config):
    if isinstance(config, (bytes, bytearray)):
        return bytes(config)
    if isinstance(config, str):
        return config.encode()
    if isinstance(config, dict):
        return json.dumps(config).encode()
    raise InfinitehipError(f"config must be a dict or a JSON string, got {type(config).__name__}")


def check_config(config):
    """Validate a config (dict or JSON); raises InfinitehipError naming the bad field."""
    _ffi.check(_ffi.lib().ihip_config_check(_config_text(config)))


def _is_torch(x):
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "data_ptr")


class _Host:
    """A contiguous host buffer: pointer, dtype code, shape, and the object
    that owns the memory (kept alive for the call)."""

    __slots__ = ("ptr", "dtype", "shape", "owner")

    def __init__(self, ptr, dtype, shape, owner):
        self.ptr, self.dtype, self.shape, self.owner = ptr, dtype, tuple(shape), owner


def _host(x, name, f32_only):
    if _is_torch(x):
        if x.device.type != "cpu":
            raise InfinitehipError(
                f"{name} is on {x.device}: the C ABI reads host memory; move it to the CPU"
            )
        dt = str(x.dtype).replace("torch.", "")
        if f32_only or dt not in _DTYPES:
            if dt != "float32":
                import torch

                x = x.to(torch.float32)
            dt = "float32"
        x = x.detach().contiguous()
        return _Host(x.data_ptr(), _DTYPES[dt], x.shape, x)
    a = np.asarray(x)
    dt = a.dtype.name
    if f32_only or dt not in _DTYPES:
        a = np.ascontiguousarray(a, dtype=np.float32)
        dt = "float32"
    else:
        a = np.ascontiguousarray(a)
    return _Host(a.ctypes.data, _DTYPES[dt], a.shape, a)


def _rows(h, name, heads, head_dim):
    """Number of rows of `heads x head_dim` in `h` ([n, heads, dim], [n, heads*dim] or flat)."""
    shape = h.shape
    per = heads * head_dim
    if len(shape) == 3:
        if tuple(shape[1:]) != (heads, head_dim):
            # Let the library name the mismatch.
            return shape[0], shape[1], shape[2]
        return shape[0], heads, head_dim
    if len(shape) == 2:
        if shape[1] != per:
            raise InfinitehipError(
                f"{name} has shape {list(shape)}: expected [n, {heads}*{head_dim}] "
                f"or [n, {heads}, {head_dim}]"
            )
        return shape[0], heads, head_dim
    if len(shape) == 1:
        if shape[0] % per:
            raise InfinitehipError(
                f"{name} has {shape[0]} elements, not a multiple of {heads}*{head_dim}"
            )
        return shape[0] // per, heads, head_dim
    raise InfinitehipError(f"{name} has shape {list(shape)}: expected 1, 2 or 3 dimensions")


def _out_like(q, h):
    if _is_torch(q):
        import torch

        return torch.empty(h.shape, dtype=torch.float32)
    return np.empty(h.shape, dtype=np.float32)


def _check_out(out, h, name="out"):
    o = _host(out, name, True)
    if o.owner is not out and not (_is_torch(out) and o.owner.data_ptr() == out.data_ptr()):
        raise InfinitehipError(f"{name} must be a contiguous float32 buffer")
    n = int(np.prod(o.shape))
    if n != int(np.prod(h.shape)):
        raise InfinitehipError(f"{name} has shape {list(o.shape)}, q has {list(h.shape)}")
    return o


class Engine:
    """One infinitehip engine: per layer a paged KV pool and its policy."""

    def __init__(self, config):
        lib = _ffi.lib()
        ptr = lib.ihip_engine_new(_config_text(config))
        if not ptr:
            raise InfinitehipError(_ffi.last_error() or "ihip_engine_new failed", _ffi.IHIP_ERR_ENGINE)
        self._ptr = ctypes.c_void_p(ptr)
        vals = [ctypes.c_size_t() for _ in range(4)]
        _ffi.check(lib.ihip_engine_shape(self._ptr, *[ctypes.byref(v) for v in vals]))
        self.n_layers, self.n_q_heads, self.n_kv_heads, self.head_dim = (v.value for v in vals)

    # lifecycle -------------------------------------------------------------
    def close(self):
        p = getattr(self, "_ptr", None)
        if p is not None and p.value:
            _ffi.lib().ihip_engine_free(p)
        self._ptr = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _h(self):
        if self._ptr is None:
            raise InfinitehipError("engine is closed")
        return self._ptr

    # info ------------------------------------------------------------------
    @property
    def config(self):
        return json.loads(_ffi.take_string(_ffi.lib().ihip_engine_config_json(self._h()), "config"))

    def stats(self):
        return json.loads(_ffi.take_string(_ffi.lib().ihip_stats_json(self._h()), "stats"))

    # sequences -------------------------------------------------------------
    def add_sequence(self, seq):
        _ffi.check(_ffi.lib().ihip_add_sequence(self._h(), int(seq)))

    def fork_sequence(self, parent, child):
        _ffi.check(_ffi.lib().ihip_fork_sequence(self._h(), int(parent), int(child)))

    def free_sequence(self, seq):
        _ffi.check(_ffi.lib().ihip_free_sequence(self._h(), int(seq)))

    def seq_len(self, layer, seq):
        n = ctypes.c_size_t()
        _ffi.check(_ffi.lib().ihip_seq_len(self._h(), int(layer), int(seq), ctypes.byref(n)))
        return n.value

    def read(self, layer, seq, start=0, end=None):
        """Entries `start..end` of `seq` in `layer` as float32 numpy arrays
        (K, V) `[end - start, kv_heads, head_dim]`. After Locret's per-head
        eviction entry i of head h is head h's i-th held unit."""
        if end is None:
            end = self.seq_len(layer, seq)
        if end < start:
            raise InfinitehipError(f"read: end {end} < start {start}")
        k = np.empty((end - start, self.n_kv_heads, self.head_dim), dtype=np.float32)
        v = np.empty_like(k)
        _ffi.check(
            _ffi.lib().ihip_read(
                self._h(), int(layer), int(seq), int(start), int(end), k.ctypes.data, v.ctypes.data
            )
        )
        return k, v

    def evict(self, layer, seq):
        """Run the eviction `layer`'s policy owes for `seq` now (Locret: a
        finished prompt's eviction, else run at the next append)."""
        _ffi.check(_ffi.lib().ihip_evict(self._h(), int(layer), int(seq)))

    # K/V and attention -----------------------------------------------------
    def append(self, layer, seq, k, v, phase="prefill", prompt_done=False, proj=None):
        """Append post-RoPE K/V `[n, kv_heads, head_dim]` (or `[n, kv_heads*head_dim]`)
        of one layer. `proj`: optional (q, k, v) pre-RoPE float32 projections."""
        ph = {"prefill": _ffi.PHASE_PREFILL, "decode": _ffi.PHASE_DECODE}.get(phase)
        if ph is None:
            raise InfinitehipError(f"phase must be 'prefill' or 'decode', got {phase!r}")
        hk = _host(k, "k", False)
        hv = _host(v, "v", False)
        if hk.dtype != hv.dtype or hk.shape != hv.shape:
            raise InfinitehipError(
                f"k and v differ: k {list(hk.shape)} dtype code {hk.dtype}, "
                f"v {list(hv.shape)} dtype code {hv.dtype}"
            )
        n, heads, dim = _rows(hk, "k", self.n_kv_heads, self.head_dim)
        pq = pk = pv = None
        keep = []
        if proj is not None:
            if len(proj) != 3:
                raise InfinitehipError("proj must be a (q, k, v) triple")
            hs = [_host(a, f"proj_{nm}", True) for a, nm in zip(proj, "qkv")]
            for h, nm, heads in zip(hs, "qkv", (self.n_q_heads, heads, heads)):
                want = n * heads * dim
                got = int(np.prod(h.shape))
                if got != want:
                    raise InfinitehipError(f"proj_{nm} has {got} elements, expected {want}")
            keep.extend(hs)
            pq, pk, pv = (h.ptr for h in hs)
        _ffi.check(
            _ffi.lib().ihip_append(
                self._h(), int(layer), int(seq), hk.ptr, hv.ptr, hk.dtype, n, heads, dim,
                ph, 1 if prompt_done else 0, pq, pk, pv,
            )
        )
        del keep

    def attend_prefill(self, layer, seq, q, out=None):
        """Causal attention of the last n tokens of `seq`: q `[n, q_heads, head_dim]`
        (or `[n, q_heads*head_dim]`) float32; returns the same shape."""
        hq = _host(q, "q", True)
        n, heads, dim = _rows(hq, "q", self.n_q_heads, self.head_dim)
        if out is None:
            out = _out_like(q, hq)
        ho = _check_out(out, hq)
        _ffi.check(
            _ffi.lib().ihip_attend_prefill(self._h(), int(layer), int(seq), hq.ptr, n, heads, dim, ho.ptr)
        )
        return out

    def attend_decode(self, layer, seqs, q, out=None):
        """Decode attention, one query per sequence: q `[len(seqs), q_heads, head_dim]`."""
        ids = np.ascontiguousarray(np.asarray(seqs, dtype=np.uint64).reshape(-1))
        hq = _host(q, "q", True)
        n, heads, dim = _rows(hq, "q", self.n_q_heads, self.head_dim)
        if n != ids.size:
            raise InfinitehipError(f"{ids.size} sequences but q holds {n} queries")
        if out is None:
            out = _out_like(q, hq)
        ho = _check_out(out, hq)
        _ffi.check(
            _ffi.lib().ihip_attend_decode(
                self._h(), int(layer), ids.ctypes.data, ids.size, hq.ptr, heads, dim, ho.ptr
            )
        )
        return out
