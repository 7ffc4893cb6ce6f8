"""Loading libinfinitehip and declaring its C signatures (ctypes).

The library is found, in order, at `$INFINITEHIP_LIB` or at the copy packaged
in `infinitehip/_lib/`. It is loaded on first use, so `import infinitehip`
needs neither the library, torch nor a GPU.
"""

import ctypes
import os
import sys
import threading
from pathlib import Path

IHIP_OK = 0
IHIP_ERR_ARG = -1
IHIP_ERR_ENGINE = -2
IHIP_ERR_PANIC = -3
IHIP_ERR_NO_GPU = -4
IHIP_ERR_UNSUPPORTED = -5
IHIP_ERR_OOM = -6
IHIP_ERR_DEVICE = -7

# The C ABI version these declarations describe (IHIP_ABI_VERSION in
# include/infinitehip.h); a library of another version is refused.
ABI_VERSION = 4

DTYPE_F32 = 0
DTYPE_F16 = 1
DTYPE_BF16 = 2

PHASE_PREFILL = 0
PHASE_DECODE = 1

LIBNAME = "libinfinitehip.dylib" if sys.platform == "darwin" else "libinfinitehip.so"


class InfinitehipError(RuntimeError):
    """An error reported by the Rust library (the message is Rust's), or a
    problem found before calling it (library not found, bad array)."""

    def __init__(self, message, code=IHIP_ERR_ARG):
        super().__init__(message)
        self.code = code


_lock = threading.Lock()
_lib = None


def library_candidates():
    env = os.environ.get("INFINITEHIP_LIB")
    if env:
        return [Path(env)]
    return [Path(__file__).resolve().parent / "_lib" / LIBNAME]


def check_abi(lib, path):
    """Refuse a library whose C ABI differs from these declarations (calling
    it would pass arguments in the wrong places)."""
    f = getattr(lib, "ihip_abi_version", None)
    if f is None:
        got = "1 (no ihip_abi_version)"
    else:
        f.restype = ctypes.c_uint32
        f.argtypes = []
        got = f()
    if got != ABI_VERSION:
        raise InfinitehipError(
            f"{path}: C ABI version {got}, this infinitehip package needs {ABI_VERSION}; "
            "rebuild the library from the same source (cargo build --release -p infinitehip-capi) "
            "or reinstall the package",
            IHIP_ERR_UNSUPPORTED,
        )


class GpuRequests(ctypes.Structure):
    """IhipGpuRequests: the per-request host arrays of one GPU call."""
    _fields_ = [
        ("batch", ctypes.c_size_t),
        ("req_ids", ctypes.POINTER(ctypes.c_uint64)),
        ("table_rows", ctypes.POINTER(ctypes.c_int64)),
        ("lens", ctypes.POINTER(ctypes.c_int64)),
        ("n_new", ctypes.POINTER(ctypes.c_int64)),
    ]


class DeviceRows(ctypes.Structure):
    """IhipDeviceRows: a device matrix (queries, outputs, projections)."""
    _fields_ = [("ptr", ctypes.c_uint64), ("dtype", ctypes.c_int), ("row_stride", ctypes.c_int64)]


class KvCache(ctypes.Structure):
    """IhipKvCache: the caller's paged K/V cache of one layer."""
    _fields_ = [
        ("k", ctypes.c_uint64),
        ("v", ctypes.c_uint64),
        ("dtype", ctypes.c_int),
        ("table", ctypes.c_uint64),
        ("table_stride", ctypes.c_int64),
        ("table_n_rows", ctypes.c_int64),
        ("page_size", ctypes.c_int64),
        ("page_stride", ctypes.c_int64),
        ("head_stride", ctypes.c_int64),
    ]


class Proj(ctypes.Structure):
    """IhipProj: pre-RoPE projections of the new tokens (locret layers)."""
    _fields_ = [
        ("q", ctypes.c_uint64),
        ("k", ctypes.c_uint64),
        ("v", ctypes.c_uint64),
        ("dtype", ctypes.c_int),
        ("q_stride", ctypes.c_int64),
        ("kv_stride", ctypes.c_int64),
        ("prompt_done", ctypes.POINTER(ctypes.c_uint8)),
    ]


class HostKv(ctypes.Structure):
    """IhipHostKv: one layer's K/V in page-locked host memory + the step's
    cell table and device cache sizes (ihip_gpu_decode_host)."""
    _fields_ = [
        ("k", ctypes.c_uint64),
        ("v", ctypes.c_uint64),
        ("n_cells", ctypes.c_int64),
        ("dtype", ctypes.c_int),
        ("table", ctypes.c_uint64),
        ("table_host", ctypes.POINTER(ctypes.c_int32)),
        ("table_stride", ctypes.c_int64),
        ("cache_cells", ctypes.c_int64),
        ("estimation_rows", ctypes.c_int64),
    ]


class DeviceIndex(ctypes.Structure):
    """IhipDeviceIndex: a device int32 (elem_bytes 4) or int64 (8) array."""
    _fields_ = [("ptr", ctypes.c_uint64), ("elem_bytes", ctypes.c_int64)]


def _declare(lib):
    c = ctypes
    sz, u64, i32 = c.c_size_t, c.c_uint64, c.c_int
    vp, fp, cp = c.c_void_p, c.POINTER(c.c_float), c.c_char_p
    sigs = {
        "ihip_version": (cp, []),
        "ihip_abi_version": (c.c_uint32, []),
        "ihip_last_error": (cp, []),
        "ihip_string_free": (None, [vp]),
        "ihip_default_config_json": (vp, []),
        "ihip_config_check": (i32, [cp]),
        "ihip_engine_new": (vp, [cp]),
        "ihip_engine_free": (None, [vp]),
        "ihip_engine_shape": (i32, [vp, c.POINTER(sz), c.POINTER(sz), c.POINTER(sz), c.POINTER(sz)]),
        "ihip_engine_config_json": (vp, [vp]),
        "ihip_add_sequence": (i32, [vp, u64]),
        "ihip_fork_sequence": (i32, [vp, u64, u64]),
        "ihip_free_sequence": (i32, [vp, u64]),
        "ihip_seq_len": (i32, [vp, sz, u64, c.POINTER(sz)]),
        "ihip_read": (i32, [vp, sz, u64, sz, sz, vp, vp]),
        "ihip_evict": (i32, [vp, sz, u64]),
        "ihip_append": (i32, [vp, sz, u64, vp, vp, i32, sz, sz, sz, i32, i32, vp, vp, vp]),
        "ihip_attend_prefill": (i32, [vp, sz, u64, vp, sz, sz, sz, vp]),
        "ihip_attend_decode": (i32, [vp, sz, vp, sz, vp, sz, sz, vp]),
        "ihip_stats_json": (vp, [vp]),
    }
    for name, (res, args) in sigs.items():
        f = getattr(lib, name)
        f.restype = res
        f.argtypes = args
    gpu = {
        "ihip_gpu_built": (i32, []),
        "ihip_gpu_attn_new": (vp, [i32, cp]),
        "ihip_gpu_attn_free": (None, [vp]),
        "ihip_gpu_decode": (
            i32, [vp, u64, sz, c.POINTER(GpuRequests), c.POINTER(KvCache), c.POINTER(DeviceRows),
                  c.POINTER(DeviceRows), c.c_float]),
        "ihip_gpu_prefill": (
            i32, [vp, u64, sz, c.POINTER(GpuRequests), c.POINTER(KvCache), c.POINTER(DeviceRows),
                  c.POINTER(DeviceRows), c.c_float, c.POINTER(Proj)]),
        "ihip_gpu_graph_prepare": (i32, [vp, sz, c.c_int64, c.c_int64, c.c_int64]),
        "ihip_gpu_decode_graph": (
            i32, [vp, u64, sz, sz, c.POINTER(DeviceIndex), c.POINTER(DeviceIndex), c.POINTER(KvCache),
                  c.POINTER(DeviceRows), c.POINTER(DeviceRows), c.c_float]),
        "ihip_gpu_decode_host": (
            i32, [vp, u64, sz, c.POINTER(GpuRequests), c.POINTER(HostKv), c.POINTER(DeviceRows),
                  c.POINTER(DeviceRows), c.c_float]),
        "ihip_gpu_end_request": (i32, [vp, u64]),
        "ihip_gpu_reset": (i32, [vp]),
        "ihip_gpu_locret_retained": (i32, [vp, sz, u64, vp, sz, c.POINTER(sz)]),
        "ihip_gpu_info_json": (vp, [vp]),
    }
    # A library older than the GPU entry points still loads; the GPU shim
    # then says so (infinitehip.gpu).
    for name, (res, args) in gpu.items():
        f = getattr(lib, name, None)
        if f is not None:
            f.restype = res
            f.argtypes = args
    del fp
    return lib


def lib():
    """The loaded library (loads it on first call)."""
    global _lib
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None:
            tried = []
            for p in library_candidates():
                if p.is_file():
                    try:
                        loaded = ctypes.CDLL(str(p))
                    except OSError as e:
                        tried.append(f"{p} ({e})")
                        continue
                    check_abi(loaded, p)
                    _lib = _declare(loaded)
                    break
                else:
                    tried.append(f"{p} (missing)")
            if _lib is None:
                raise InfinitehipError(
                    "cannot load libinfinitehip; tried: "
                    + "; ".join(tried)
                    + ". Set INFINITEHIP_LIB to a built libinfinitehip.so "
                    "(cargo build --release -p infinitehip-capi) or reinstall the package"
                )
    return _lib


def last_error():
    msg = lib().ihip_last_error()
    return msg.decode("utf-8", "replace") if msg else ""


def check(rc):
    if rc != IHIP_OK:
        raise InfinitehipError(last_error() or f"infinitehip error code {rc}", rc)


def take_string(ptr, what):
    """Copy and free a char* returned by the library; NULL raises."""
    if not ptr:
        raise InfinitehipError(last_error() or f"{what} failed")
    try:
        return ctypes.string_at(ptr).decode("utf-8")
    finally:
        lib().ihip_string_free(ptr)
