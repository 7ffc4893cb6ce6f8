"""GPU attention over a caller's own K/V device tensors (torch), launched on
the caller's CUDA stream, through the C ABI's `ihip_gpu_*` functions.

    import torch, infinitehip.gpu as ig
    att = ig.GpuAttention(config)                 # dense/hip/squeeze/lazy/locret per layer
    out = att.decode(layer, q, k_buffer, v_buffer, req_to_token,
                     table_rows, lens, req_ids)   # q/out bf16/f16/f32

K/V layouts (bf16 or f16, last dimension contiguous, same strides for K and V):
- `[slots, kv_heads, head_dim]` (SGLang's `k_buffer[layer]`, token-major):
  page_size 1; `table` is `req_to_token` (int32 `[rows, max_context]`), so
  token t of request b lives in slot `table[table_rows[b], t]`;
- `[pages, kv_heads, page_size, head_dim]` (paged): `table` holds page ids.

Nothing is copied to the host and nothing waits for the device: the call
enqueues its work on `torch.cuda.current_stream(device)` (or `stream`),
after the caller's earlier work there. One exception: a squeeze layer's
first decode of a request seals its prompt (keys read back once, k-means on
the host, index uploaded), waiting for the device once per (request, layer).
A prefill of a request that has decoded starts a new request (squeeze and
lazy/locret state dropped), as SGLang reuses `req_to_token` rows. Locret
layers need the new tokens' pre-RoPE projections in `prefill(..., proj=(q, k,
v))`; each locret prefill reads the retaining-head scores back once (one wait
for the device per (call, layer)); eviction is a retained index set per
(request, layer, KV head) that attention reads; `locret_retained` hands it
out so the caller can compact its pool and free the rest (the SGLang shim
does). Host metadata (`table_rows`, `lens`, `req_ids`, `n_new`) are
Python ints/lists or CPU tensors.

Importing this module needs neither torch nor a GPU; torch is imported when
a call receives tensors.
"""

import ctypes
import json

from . import _ffi
from ._ffi import InfinitehipError

__all__ = ["GpuAttention", "gpu_built", "available"]

_DT = {"float32": _ffi.DTYPE_F32, "float16": _ffi.DTYPE_F16, "bfloat16": _ffi.DTYPE_BF16}


def _fn(name):
    f = getattr(_ffi.lib(), name, None)
    if f is None:
        raise InfinitehipError(
            f"the loaded libinfinitehip has no {name}: rebuild it from this version "
            "(cargo build --release -p infinitehip-capi --features cuda)",
            _ffi.IHIP_ERR_NO_GPU,
        )
    return f


def gpu_built():
    """True when the loaded library was built with CUDA support."""
    try:
        return bool(_fn("ihip_gpu_built")())
    except InfinitehipError:
        return False


def available(config=None, device=0):
    """True when a GPU attention object can be created here (library built
    with CUDA, driver present, device usable)."""
    if not gpu_built():
        return False
    cfg = config or {"model": {"n_layers": 1, "n_q_heads": 8, "n_kv_heads": 8, "head_dim": 64},
                     "dense_layers": 1}
    try:
        GpuAttention(cfg, device).close()
        return True
    except InfinitehipError:
        return False


def _config_text(config):
    if isinstance(config, (bytes, bytearray)):
        return bytes(config)
    if isinstance(config, str):
        return config.encode()
    if isinstance(config, dict):
        return json.dumps(config).encode()
    raise InfinitehipError(f"config must be a dict or a JSON string, got {type(config).__name__}")


def _dtype(t, name):
    dt = str(t.dtype).replace("torch.", "")
    if dt not in _DT:
        raise InfinitehipError(f"{name} has dtype {t.dtype}; expected float32, float16 or bfloat16")
    return _DT[dt]


def _rows_arg(t, name, hqd):
    """(row stride in elements) of a [n, heads*dim] or [n, heads, dim] tensor."""
    if t.dim() == 2:
        if t.shape[1] != hqd or t.stride(1) != 1:
            raise InfinitehipError(f"{name}: shape {list(t.shape)} strides {list(t.stride())}; "
                                   f"expected [n, {hqd}] with a contiguous last dimension")
        return t.stride(0)
    if t.dim() == 3:
        if t.shape[1] * t.shape[2] != hqd or t.stride(2) != 1 or t.stride(1) != t.shape[2]:
            raise InfinitehipError(f"{name}: shape {list(t.shape)} strides {list(t.stride())}; "
                                   f"expected [n, heads, dim] with heads*dim = {hqd}, rows contiguous")
        return t.stride(0)
    raise InfinitehipError(f"{name}: expected 2 or 3 dimensions, got shape {list(t.shape)}")


def _i64s(x, n, name):
    if hasattr(x, "tolist"):
        x = x.tolist()
    x = [int(v) for v in x]
    if len(x) != n:
        raise InfinitehipError(f"{name} has {len(x)} entries, expected {n}")
    return (ctypes.c_int64 * max(n, 1))(*x)


def _u64s(x, n, name):
    if hasattr(x, "tolist"):
        x = x.tolist()
    x = [int(v) for v in x]
    if len(x) != n:
        raise InfinitehipError(f"{name} has {len(x)} entries, expected {n}")
    return (ctypes.c_uint64 * max(n, 1))(*x)


class GpuAttention:
    """Per-layer dense, hip, squeeze or lazy attention (from the policy
    config) over caller-owned K/V; policy state per (layer, request id)
    (hip masks, squeeze indexes) or per request (lazy keep sets, shared by
    the lazy layers)."""

    def __init__(self, config, device=0):
        text = _config_text(config)
        cfg = json.loads(text)
        m = cfg.get("model", {})
        self.n_q_heads = int(m.get("n_q_heads", 32))
        self.n_kv_heads = int(m.get("n_kv_heads", 8))
        self.head_dim = int(m.get("head_dim", 128))
        self.device = int(device)
        self._ptr = None
        ptr = _fn("ihip_gpu_attn_new")(self.device, text)
        if not ptr:
            raise InfinitehipError(_ffi.last_error() or "ihip_gpu_attn_new failed", _ffi.IHIP_ERR_NO_GPU)
        self._ptr = ctypes.c_void_p(ptr)

    def close(self):
        p = getattr(self, "_ptr", None)
        if p is not None and p.value:
            _fn("ihip_gpu_attn_free")(p)
        self._ptr = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _h(self):
        if self._ptr is None:
            raise InfinitehipError("GPU attention object is closed")
        return self._ptr

    def info(self):
        return json.loads(_ffi.take_string(_fn("ihip_gpu_info_json")(self._h()), "gpu info"))

    def end_request(self, req_id):
        _ffi.check(_fn("ihip_gpu_end_request")(self._h(), int(req_id)))

    def locret_retained(self, layer, req_id):
        """Locret layer `layer`: run request `req_id`'s owed eviction now (what
        its first decode would run) and return `(per_head, positions)`:
        `positions` is a ctypes int32 array of `n_kv_heads * per_head`
        retained token positions, head-major, sorted per head (wrap it with
        `torch.frombuffer(positions, dtype=torch.int32)`). A caller that then
        moves those tokens' K/V into the request's first `per_head` slots
        and frees the rest must call `end_request(req_id)`. No device work."""
        f = _fn("ihip_gpu_locret_retained")
        m = ctypes.c_size_t(0)
        _ffi.check(f(self._h(), int(layer), int(req_id), None, 0, ctypes.byref(m)))
        n = self.n_kv_heads * m.value
        buf = (ctypes.c_int32 * max(n, 1))()
        _ffi.check(f(self._h(), int(layer), int(req_id), buf, n, ctypes.byref(m)))
        return m.value, buf

    def reset(self):
        _ffi.check(_fn("ihip_gpu_reset")(self._h()))

    # ------------------------------------------------------------------
    def _common(self, q, k, v, table, out, out_dtype, stream, host_kv=False):
        import torch

        for name, t in (("q", q), ("k", k), ("v", v), ("table", table)):
            if host_kv and name in ("k", "v") and isinstance(t, torch.Tensor) and t.device.type == "cpu":
                # Page-locked host K/V (host offload): the kernels read it
                # over the bus through its unified address.
                if not t.is_pinned():
                    raise InfinitehipError(f"{name} is a host tensor that is not page-locked (pin_memory)")
                continue
            if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
                raise InfinitehipError(f"{name} must be a CUDA tensor, got {getattr(t, 'device', type(t))}")
            if t.device.index != self.device:
                raise InfinitehipError(f"{name} is on {t.device}, the attention object on cuda:{self.device}")
        hqd = self.n_q_heads * self.head_dim
        q_stride = _rows_arg(q, "q", hqd)
        if k.shape != v.shape or k.stride() != v.stride() or k.dtype != v.dtype:
            raise InfinitehipError(
                f"k and v must share shape, strides and dtype: k {list(k.shape)} {list(k.stride())} {k.dtype}, "
                f"v {list(v.shape)} {list(v.stride())} {v.dtype}")
        d = self.head_dim
        if k.dim() == 3:
            if k.shape[1] != self.n_kv_heads or k.shape[2] != d or k.stride(2) != 1:
                raise InfinitehipError(f"k: shape {list(k.shape)} strides {list(k.stride())}; expected "
                                       f"[slots, {self.n_kv_heads}, {d}] with a contiguous last dimension")
            ps, pst, hst = 1, k.stride(0), k.stride(1)
        elif k.dim() == 4:
            if k.shape[1] != self.n_kv_heads or k.shape[3] != d or k.stride(3) != 1 or k.stride(2) != d:
                raise InfinitehipError(f"k: shape {list(k.shape)} strides {list(k.stride())}; expected "
                                       f"[pages, {self.n_kv_heads}, page_size, {d}] with contiguous rows")
            ps, pst, hst = k.shape[2], k.stride(0), k.stride(1)
        else:
            raise InfinitehipError(f"k: expected 3 or 4 dimensions, got shape {list(k.shape)}")
        if table.dtype != torch.int32 or table.dim() != 2 or table.stride(1) != 1:
            raise InfinitehipError(f"table must be a 2-D int32 tensor with contiguous rows, got "
                                   f"{table.dtype} {list(table.shape)} strides {list(table.stride())}")
        if out is None:
            odt = out_dtype or q.dtype
            out = torch.empty((q.shape[0], hqd), dtype=odt, device=q.device)
        o_stride = _rows_arg(out, "out", hqd)
        if stream is None:
            stream = torch.cuda.current_stream(q.device).cuda_stream
        args = (
            ctypes.byref(_ffi.KvCache(k.data_ptr(), v.data_ptr(), _dtype(k, "k"), table.data_ptr(),
                                      table.stride(0), int(table.shape[0]), ps, pst, hst)),
            ctypes.byref(_ffi.DeviceRows(q.data_ptr(), _dtype(q, "q"), q_stride)),
            ctypes.byref(_ffi.DeviceRows(out.data_ptr(), _dtype(out, "out"), o_stride)),
        )
        return out, int(stream), args

    def decode(self, layer, q, k, v, table, table_rows, lens, req_ids, out=None, sm_scale=None,
               out_dtype=None, stream=None):
        """One query per request: q `[batch, q_heads*head_dim]` (or 3-D);
        lens include the decoded token. Returns `out` (dtype of q unless
        `out`/`out_dtype` say otherwise)."""
        n = int(q.shape[0])
        out, st, args = self._common(q, k, v, table, out, out_dtype, stream)
        reqs = _ffi.GpuRequests(n, _u64s(req_ids, n, "req_ids"), _i64s(table_rows, n, "table_rows"),
                                _i64s(lens, n, "lens"), None)
        _ffi.check(_fn("ihip_gpu_decode")(self._h(), st, int(layer), ctypes.byref(reqs), *args,
                                          float(sm_scale or 0.0)))
        return out

    def prepare_graph(self, max_batch, table, page_size=1):
        """Allocate what `decode_graph` needs for batches up to `max_batch`
        over `table` (its rows x row length; page_size 1: SGLang's
        req_to_token). Synchronous: call before capturing. Refused for a
        config with layers other than dense and hip."""
        _ffi.check(_fn("ihip_gpu_graph_prepare")(self._h(), int(max_batch), int(table.shape[0]),
                                                   int(table.shape[1]), int(page_size)))

    def decode_graph(self, layer, q, k, v, table, rows, lens, out=None, sm_scale=None, out_dtype=None,
                     stream=None):
        """Decode that a CUDA graph can capture: `rows` / `lens` are DEVICE
        int32/int64 tensors `[batch]` (table row and length with the new
        token of each position), read when the work runs, so a captured call
        replays with their contents at replay time. Metadata is computed on
        the device; nothing is allocated, copied or waited for (after
        `prepare_graph`). Other arguments as `decode`."""
        import torch

        n = int(q.shape[0])
        for name, t in (("rows", rows), ("lens", lens)):
            if not isinstance(t, torch.Tensor) or t.device.type != "cuda" or t.dtype not in (torch.int32,
                                                                                             torch.int64):
                raise InfinitehipError(f"{name} must be a CUDA int32/int64 tensor, got "
                                       f"{getattr(t, 'dtype', type(t))} on {getattr(t, 'device', '?')}")
            if t.dim() != 1 or int(t.shape[0]) < n or (n > 1 and t.stride(0) != 1):
                raise InfinitehipError(f"{name} must be a contiguous 1-D tensor of >= {n} entries, "
                                       f"got shape {list(t.shape)}")
        out, st, args = self._common(q, k, v, table, out, out_dtype, stream)
        ri = _ffi.DeviceIndex(rows.data_ptr(), rows.element_size())
        li = _ffi.DeviceIndex(lens.data_ptr(), lens.element_size())
        _ffi.check(_fn("ihip_gpu_decode_graph")(self._h(), st, int(layer), n, ctypes.byref(ri), ctypes.byref(li),
                                                *args, float(sm_scale or 0.0)))
        return out

    def decode_host(self, layer, q, k, v, table, table_rows, lens, req_ids, cache_cells, estimation_rows=0,
                    out=None, sm_scale=None, out_dtype=None, stream=None):
        """Decode over K/V in page-locked HOST memory (host offload): `k`/`v`
        pinned CPU tensors `[cells, kv_heads, head_dim]` (SGLang's token pool
        allocated there), `table` the CUDA int32 cell table (`req_to_token`).
        hip layers read through this layer's device caches (`cache_cells`
        cells of page cache, `kv.device_cache_pages`; `estimation_rows` key
        rows for mask estimation, 0: cache_cells x kv_heads), kept in the
        object between calls and rebuilt cold when a step is not every
        request's previous step plus one token; other layers read the host
        rows over the bus. One host sync per hip layer-step (the selection is
        read back). Equal to `decode` over the same K/V on the device, bit
        for bit. Other arguments as `decode`."""
        import torch

        n = int(q.shape[0])
        rows = [int(r) for r in (table_rows.tolist() if hasattr(table_rows, "tolist") else table_rows)]
        if len(rows) != n:
            raise InfinitehipError(f"table_rows has {len(rows)} entries, expected {n}")
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or not t.is_pinned():
                raise InfinitehipError(f"{name} must be a page-locked host tensor (pin_memory), got "
                                       f"{getattr(t, 'device', type(t))}")
            if t.dim() != 3 or not t.is_contiguous():
                raise InfinitehipError(f"{name}: expected a contiguous [cells, kv_heads, head_dim] tensor, got "
                                       f"{list(t.shape)} strides {list(t.stride())}")
        # The batch's rows in order: request b is row b of the step's table.
        idx = torch.tensor(rows, dtype=torch.long, device=table.device)
        dev_table = table.index_select(0, idx).contiguous()
        host_table = dev_table.cpu()
        out, st, args = self._common(q, k, v, dev_table, out, out_dtype, stream, host_kv=True)
        hk = _ffi.HostKv(k.data_ptr(), v.data_ptr(), int(k.shape[0]), _dtype(k, "k"), dev_table.data_ptr(),
                         ctypes.cast(host_table.data_ptr(), ctypes.POINTER(ctypes.c_int32)),
                         int(dev_table.stride(0)), int(cache_cells), int(estimation_rows))
        reqs = _ffi.GpuRequests(n, _u64s(req_ids, n, "req_ids"), _i64s(list(range(n)), n, "table_rows"),
                                _i64s(lens, n, "lens"), None)
        _ffi.check(_fn("ihip_gpu_decode_host")(self._h(), st, int(layer), ctypes.byref(reqs), ctypes.byref(hk),
                                               args[1], args[2], float(sm_scale or 0.0)))
        # The step's table must outlive the queued kernels that read it.
        self._host_tables = getattr(self, "_host_tables", {})
        self._host_tables[int(layer)] = dev_table
        return out

    def prefill(self, layer, q, k, v, table, table_rows, lens, n_new, req_ids, out=None, sm_scale=None,
                out_dtype=None, stream=None, proj=None, prompt_done=None):
        """Causal attention of new tokens: request b owns n_new[b]
        consecutive rows of q at positions lens[b]-n_new[b] .. lens[b]-1.
        `proj`: (q, k, v) pre-RoPE projections of those rows (CUDA tensors,
        one dtype, `[rows, heads*dim]` or `[rows, heads, dim]`), required by
        locret layers; `prompt_done`: per request, whether this call ends its
        prompt (default all False)."""
        b = len(req_ids)
        out, st, args = self._common(q, k, v, table, out, out_dtype, stream, host_kv=True)
        nn = _i64s(n_new, b, "n_new")
        if sum(nn[:b]) != int(q.shape[0]):
            raise InfinitehipError(f"n_new sums to {sum(nn[:b])} but q has {int(q.shape[0])} rows")
        reqs = _ffi.GpuRequests(b, _u64s(req_ids, b, "req_ids"), _i64s(table_rows, b, "table_rows"),
                                _i64s(lens, b, "lens"), nn)
        head = (self._h(), st, int(layer), ctypes.byref(reqs), *args, float(sm_scale or 0.0))
        if proj is None:
            _ffi.check(_fn("ihip_gpu_prefill")(*head, None))
            return out
        if len(proj) != 3:
            raise InfinitehipError("proj must be a (q, k, v) triple of CUDA tensors")
        pq, pk, pv = proj
        rows = int(q.shape[0])
        for name, t in (("proj q", pq), ("proj k", pk), ("proj v", pv)):
            if getattr(t, "device", None) is None or t.device.type != "cuda" or t.device.index != self.device:
                raise InfinitehipError(f"{name} must be a CUDA tensor on cuda:{self.device}")
            if int(t.shape[0]) != rows:
                raise InfinitehipError(f"{name} has {int(t.shape[0])} rows, q has {rows}")
            if t.dtype != pq.dtype:
                raise InfinitehipError(f"proj tensors must share one dtype: {name} is {t.dtype}, q {pq.dtype}")
        kd = self.n_kv_heads * self.head_dim
        qs = _rows_arg(pq, "proj q", self.n_q_heads * self.head_dim)
        ks = _rows_arg(pk, "proj k", kd)
        vs = _rows_arg(pv, "proj v", kd)
        if ks != vs:
            raise InfinitehipError(f"proj k and v must share a row stride ({ks} vs {vs})")
        pd = None
        if prompt_done is not None:
            flags = [1 if x else 0 for x in prompt_done]
            if len(flags) != b:
                raise InfinitehipError(f"prompt_done has {len(flags)} entries, expected {b}")
            pd = (ctypes.c_uint8 * b)(*flags)
        pr = _ffi.Proj(pq.data_ptr(), pk.data_ptr(), pv.data_ptr(), _dtype(pq, "proj q"), qs, ks,
                       ctypes.cast(pd, ctypes.POINTER(ctypes.c_uint8)) if pd is not None else None)
        _ffi.check(_fn("ihip_gpu_prefill")(*head, ctypes.byref(pr)))
        return out
