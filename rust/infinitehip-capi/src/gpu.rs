//! GPU entry points (`ihip_gpu_*`): attention over an engine's own K/V
//! device tensors on the engine's CUDA stream
//! (`infinitehip::backend::cuda::engine_attn::GpuAttention`).
//!
//! They exist in every build. Without the `cuda` cargo feature, or without
//! an NVIDIA driver, `ihip_gpu_attn_new` returns NULL with a message saying
//! which, and the other calls return `IHIP_ERR_NO_GPU`.

use std::ffi::{c_char, c_int};
#[cfg(feature = "cuda")]
use std::sync::Mutex;

use super::*;
use crate::gpu_requests::check_requests;

/// Opaque GPU attention handle.
pub struct IhipGpuAttn {
    /// Per-layer device caches of `ihip_gpu_decode_host` (declared first:
    /// dropped before the attention object and its context).
    #[cfg(feature = "cuda")]
    pub(crate) tiers: Mutex<Vec<Option<ihip::backend::cuda::engine_attn::HostTier>>>,
    #[cfg(feature = "cuda")]
    inner: Mutex<ihip::backend::cuda::engine_attn::GpuAttention>,
    #[cfg(not(feature = "cuda"))]
    _never: (),
}

#[cfg(not(feature = "cuda"))]
const NO_CUDA: &str = "libinfinitehip was built without CUDA support (rebuild with `cargo build --release -p infinitehip-capi --features cuda`)";

fn no_gpu(msg: impl Into<String>) -> Fail {
    Fail(IHIP_ERR_NO_GPU, msg.into())
}

/// 1 when the library was built with CUDA support, else 0 (a driver may
/// still be missing: `ihip_gpu_attn_new` says so).
#[no_mangle]
pub extern "C" fn ihip_gpu_built() -> c_int {
    cfg!(feature = "cuda") as c_int
}

/// Create a GPU attention object on device `device` for the model and
/// per-layer policies (dense or hip) of `config_json`. Compiles or loads the
/// kernels (PTX cache). NULL on error (`ihip_last_error`).
///
/// # Safety
/// `config_json` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn ihip_gpu_attn_new(
    device: c_int,
    config_json: *const c_char,
) -> *mut IhipGpuAttn {
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut out = std::ptr::null_mut();
    guard("ihip_gpu_attn_new", || {
        init_logging();
        let s = cstr_arg(config_json, "config_json")?;
        let cfg = PolicyConfig::from_json(s)?;
        if device < 0 {
            return Err(arg(format!("device {device} must be >= 0")));
        }
        #[cfg(feature = "cuda")]
        {
            use ihip::backend::cuda::{engine_attn::GpuAttention, GpuContext};
            let gpu = GpuContext::new(device as usize).map_err(|e| no_gpu(e.to_string()))?;
            let a = GpuAttention::new(&gpu, &cfg)?;
            out = Box::into_raw(Box::new(IhipGpuAttn {
                tiers: Mutex::new((0..cfg.model.n_layers).map(|_| None).collect()),
                inner: Mutex::new(a),
            }));
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = cfg;
            Err(no_gpu(NO_CUDA))
        }
    });
    out
}

/// Destroy a GPU attention object (NULL is a no-op). Work it launched must
/// have finished (synchronise the stream first).
///
/// # Safety
/// `a` comes from `ihip_gpu_attn_new` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn ihip_gpu_attn_free(a: *mut IhipGpuAttn) {
    if !a.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(a))));
    }
}

#[cfg(feature = "cuda")]
pub(crate) fn with_gpu(
    a: *const IhipGpuAttn,
    f: impl FnOnce(&mut ihip::backend::cuda::engine_attn::GpuAttention) -> Result<(), Fail>,
) -> Result<(), Fail> {
    if a.is_null() {
        return Err(arg("GPU attention handle is NULL"));
    }
    // SAFETY: non-null handles come from `ihip_gpu_attn_new`.
    let h = unsafe { &*a };
    let mut g = h.inner.lock().map_err(|_| {
        Fail(
            IHIP_ERR_PANIC,
            "GPU attention handle is poisoned by an earlier internal panic; free it".into(),
        )
    })?;
    f(&mut g)
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn with_gpu(
    a: *const IhipGpuAttn,
    _f: impl FnOnce(&mut ()) -> Result<(), Fail>,
) -> Result<(), Fail> {
    if a.is_null() {
        return Err(no_gpu(format!("GPU attention handle is NULL; {NO_CUDA}")));
    }
    Err(no_gpu(NO_CUDA))
}

#[cfg(feature = "cuda")]
pub(crate) fn dtype_of(code: c_int, name: &str) -> Result<ihip::DType, Fail> {
    match code {
        IHIP_DTYPE_F32 => Ok(ihip::DType::F32),
        IHIP_DTYPE_F16 => Ok(ihip::DType::F16),
        IHIP_DTYPE_BF16 => Ok(ihip::DType::Bf16),
        _ => Err(arg(format!(
            "{name} dtype code {code} (IHIP_DTYPE_F32/F16/BF16 = 0/1/2)"
        ))),
    }
}

#[cfg(feature = "cuda")]
fn nonneg(x: i64, name: &str) -> Result<usize, Fail> {
    usize::try_from(x).map_err(|_| arg(format!("{name} = {x} must be >= 0")))
}

/// The per-request host arrays of one GPU call, `batch` elements each.
/// `table_rows[b]`: request b's row of the page table; `lens[b]`: tokens
/// cached for it, including those of this call; `n_new[b]` (prefill only,
/// ignored by decode): its new query rows, at positions
/// `lens[b] - n_new[b] .. lens[b]`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IhipGpuRequests {
    pub batch: usize,
    /// Key of each request's hip mask-refresh state.
    pub req_ids: *const u64,
    pub table_rows: *const i64,
    pub lens: *const i64,
    pub n_new: *const i64,
}

/// A device matrix of rows of `n_heads * head_dim` elements of `dtype`
/// (`IHIP_DTYPE_*`), `row_stride` elements apart: queries, outputs and
/// projections.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IhipDeviceRows {
    pub ptr: u64,
    pub dtype: c_int,
    pub row_stride: i64,
}

/// The caller's paged K/V cache of one layer (bf16 or f16): token t of KV
/// head h of request b is at element
/// `table[table_rows[b] * table_stride + t / page_size] * page_stride +
///  h * head_stride + (t % page_size) * head_dim` of `k` and of `v`
/// (16-byte aligned rows). `table` is int32 `[table_n_rows][table_stride]`
/// on the device; its page ids are not checked. SGLang's
/// `k_buffer[layer]` `[slots][kv_heads][head_dim]` with `req_to_token`:
/// page_size 1, page_stride `k.stride(0)`, head_stride `k.stride(1)`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IhipKvCache {
    pub k: u64,
    pub v: u64,
    pub dtype: c_int,
    pub table: u64,
    pub table_stride: i64,
    pub table_n_rows: i64,
    pub page_size: i64,
    pub page_stride: i64,
    pub head_stride: i64,
}

/// The new tokens' pre-RoPE projections for locret layers (other layers
/// ignore them): `q` `[rows][n_q_heads * head_dim]`, `k` and `v`
/// `[rows][n_kv_heads * head_dim]` (rows as the queries), one `dtype`, row
/// strides in elements. `prompt_done`: NULL (all 0) or `batch` bytes 0/1,
/// whether the call ends each request's prompt (as the engine's append).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IhipProj {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub dtype: c_int,
    pub q_stride: i64,
    pub kv_stride: i64,
    pub prompt_done: *const u8,
}

/// Read a descriptor the caller passed by pointer.
pub(crate) unsafe fn desc<'a, T>(p: *const T, name: &str) -> Result<&'a T, Fail> {
    if p.is_null() {
        return Err(arg(format!("{name} is NULL")));
    }
    if !p.is_aligned() {
        return Err(arg(format!("{name} is misaligned")));
    }
    // SAFETY: non-NULL and aligned; the caller guarantees it points at a
    // live descriptor for the duration of the call.
    Ok(unsafe { &*p })
}

#[cfg(feature = "cuda")]
pub(crate) fn rows_of(r: &IhipDeviceRows, name: &str) -> Result<(u64, ihip::DType, usize), Fail> {
    Ok((
        r.ptr,
        dtype_of(r.dtype, name)?,
        nonneg(r.row_stride, &format!("{name} row_stride"))?,
    ))
}

/// The device arguments shared by decode and prefill, checked.
#[cfg(feature = "cuda")]
fn gpu_args(
    c: &IhipKvCache,
    q: &IhipDeviceRows,
    out: &IhipDeviceRows,
    sm_scale: f32,
) -> Result<
    (
        ihip::backend::cuda::engine_attn::EngineKv,
        ihip::backend::cuda::engine_attn::QArg,
        ihip::backend::cuda::dispatch::AttnOut,
        Option<f32>,
    ),
    Fail,
> {
    use ihip::backend::cuda::{
        dispatch::AttnOut,
        engine_attn::{EngineKv, QArg},
    };
    let kv = EngineKv {
        k: c.k,
        v: c.v,
        dtype: dtype_of(c.dtype, "kv")?,
        table: c.table,
        table_stride: nonneg(c.table_stride, "table_stride")?,
        page_size: nonneg(c.page_size, "page_size")?,
        page_stride: nonneg(c.page_stride, "page_stride")?,
        head_stride: nonneg(c.head_stride, "head_stride")?,
    };
    let (ptr, dtype, row_stride) = rows_of(q, "q")?;
    let qa = QArg {
        ptr,
        dtype,
        row_stride,
    };
    let (ptr, dtype, row_stride) = rows_of(out, "out")?;
    let o = AttnOut {
        ptr,
        dtype,
        row_stride,
    };
    let sc = if sm_scale == 0.0 {
        None
    } else {
        Some(sm_scale)
    };
    Ok((kv, qa, o, sc))
}

/// Decode attention for a batch (one query per request) over the caller's
/// K/V device tensors; everything is launched on `stream` (a CUstream of
/// the device's primary context, e.g. torch.cuda.current_stream().cuda_stream;
/// 0 = legacy default stream) and nothing waits on the host.
///
/// `reqs`: host arrays (n_new unused); `kv`: the layer's cache; `q`, `out`:
/// `[batch][n_q_heads * head_dim]` on the device. sm_scale 0:
/// 1/sqrt(head_dim). Checked before any launch (IHIP_ERR_ARG):
/// `0 <= table_rows[b] < table_n_rows`,
/// `1 <= lens[b] <= table_stride * page_size`, every count within int32.
///
/// # Safety
/// Descriptors and their host arrays are valid; device pointers are valid
/// for the shapes given until the stream has run the work.
#[no_mangle]
pub unsafe extern "C" fn ihip_gpu_decode(
    a: *const IhipGpuAttn,
    stream: u64,
    layer: usize,
    reqs: *const IhipGpuRequests,
    kv: *const IhipKvCache,
    q: *const IhipDeviceRows,
    out: *const IhipDeviceRows,
    sm_scale: f32,
) -> c_int {
    guard("ihip_gpu_decode", || {
        let (r, c) = (desc(reqs, "reqs")?, desc(kv, "kv")?);
        let (q, out) = (desc(q, "q")?, desc(out, "out")?);
        let reqs = check_requests(
            r.batch,
            r.req_ids,
            r.table_rows,
            r.lens,
            None,
            c.table_n_rows,
            c.table_stride,
            c.page_size,
        )?;
        #[cfg(feature = "cuda")]
        {
            let (kv, qa, o, sc) = gpu_args(c, q, out, sm_scale)?;
            with_gpu(a, |g| {
                g.decode(
                    stream, layer, &kv, reqs.ids, &reqs.rows, &reqs.lens, &qa, &o, sc,
                )?;
                Ok(())
            })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (reqs.ids, stream, layer, q, out, sm_scale);
            with_gpu(a, |_| Ok(()))
        }
    })
}

/// Causal attention of new tokens (prefill / extend): request b has
/// n_new[b] consecutive query rows (in request order) at positions
/// lens[b] - n_new[b] .. lens[b]; their K/V are already in the cache.
/// Dense layers attend densely, hip layers sparsely (a mask per query block
/// by the tensor-core estimator, `GpuAttention::prefill_estimator`).
/// Resets the requests' hip state. `proj`: NULL, or the projections locret
/// layers need (a locret layer then reads its scores back once per call, a
/// host sync on `stream`; eviction is a retained index set per request,
/// layer and KV head, the caller's pool memory is not freed). Other
/// arguments as `ihip_gpu_decode`.
///
/// # Safety
/// As `ihip_gpu_decode`; `proj` is NULL or a valid descriptor.
#[no_mangle]
pub unsafe extern "C" fn ihip_gpu_prefill(
    a: *const IhipGpuAttn,
    stream: u64,
    layer: usize,
    reqs: *const IhipGpuRequests,
    kv: *const IhipKvCache,
    q: *const IhipDeviceRows,
    out: *const IhipDeviceRows,
    sm_scale: f32,
    proj: *const IhipProj,
) -> c_int {
    guard("ihip_gpu_prefill", || {
        let (r, c) = (desc(reqs, "reqs")?, desc(kv, "kv")?);
        let (q, out) = (desc(q, "q")?, desc(out, "out")?);
        let proj = if proj.is_null() {
            None
        } else {
            Some(desc(proj, "proj")?)
        };
        let reqs = check_requests(
            r.batch,
            r.req_ids,
            r.table_rows,
            r.lens,
            Some(r.n_new),
            c.table_n_rows,
            c.table_stride,
            c.page_size,
        )?;
        #[cfg(feature = "cuda")]
        {
            use ihip::backend::cuda::engine_attn::{Insert, ProjArg};
            let (kv, qa, o, sc) = gpu_args(c, q, out, sm_scale)?;
            let pd: Vec<bool> = match proj {
                Some(p) if !p.prompt_done.is_null() => {
                    slice(p.prompt_done, r.batch, "prompt_done")?
                        .iter()
                        .map(|&x| x != 0)
                        .collect()
                }
                _ => Vec::new(),
            };
            let proj = match proj {
                None => None,
                Some(p) => Some(ProjArg {
                    q: p.q,
                    k: p.k,
                    v: p.v,
                    dtype: dtype_of(p.dtype, "proj")?,
                    q_stride: nonneg(p.q_stride, "proj q_stride")?,
                    kv_stride: nonneg(p.kv_stride, "proj kv_stride")?,
                }),
            };
            let ins = proj.map(|proj| Insert {
                proj: Some(proj),
                prompt_done: &pd,
            });
            with_gpu(a, |g| {
                g.prefill_ex(
                    stream,
                    layer,
                    &kv,
                    reqs.ids,
                    &reqs.rows,
                    &reqs.lens,
                    &reqs.n_new,
                    &qa,
                    &o,
                    sc,
                    ins.as_ref(),
                )?;
                Ok(())
            })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (reqs.ids, stream, layer, q, out, sm_scale, proj);
            with_gpu(a, |_| Ok(()))
        }
    })
}

/// Prepare CUDA-graph decode (`ihip_gpu_decode_graph`) of batches up to
/// `max_batch` over a page table of `table_n_rows` rows of `table_stride`
/// pages of `page_size` tokens: allocates every buffer once (synchronous;
/// call before capturing). A second call with sizes that fit is a no-op;
/// one that does not fit is IHIP_ERR_ARG. Only configs whose layers are all
/// dense or hip can be captured (else IHIP_ERR_ARG naming the layer).
///
/// # Safety
/// `a` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn ihip_gpu_graph_prepare(
    a: *const IhipGpuAttn,
    max_batch: usize,
    table_n_rows: i64,
    table_stride: i64,
    page_size: i64,
) -> c_int {
    guard("ihip_gpu_graph_prepare", || {
        #[cfg(feature = "cuda")]
        {
            let (nr, ts, ps) = (
                nonneg(table_n_rows, "table_n_rows")?,
                nonneg(table_stride, "table_stride")?,
                nonneg(page_size, "page_size")?,
            );
            with_gpu(a, |g| {
                g.prepare_graph(max_batch, nr, ts, ps)?;
                Ok(())
            })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (max_batch, table_n_rows, table_stride, page_size);
            with_gpu(a, |_| Ok(()))
        }
    })
}

/// A device array of `batch` table rows or lengths: int32 (`elem_bytes`
/// 4) or int64 (8), e.g. SGLang's `req_pool_indices` and `seq_lens`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IhipDeviceIndex {
    pub ptr: u64,
    pub elem_bytes: i64,
}

/// Decode attention that a CUDA graph can capture (dense and hip layers,
/// after `ihip_gpu_graph_prepare`): position b of the batch is table row
/// `rows[b]` at length `lens[b]` (including its new token), both READ ON THE
/// DEVICE when the work runs, so a captured call replays with whatever the
/// caller wrote into those arrays since. All metadata (hip refresh
/// decisions included) is computed on the device; the call launches only
/// (no allocation, no copy, no host wait). hip state is kept per table row:
/// a row's first decode after `ihip_gpu_prefill` of it, or after its
/// request changed (length not the last + 1, or another first page),
/// refreshes every stage. Rows and lengths are clamped into the prepared
/// table on the device. Other arguments as `ihip_gpu_decode`.
///
/// # Safety
/// As `ihip_gpu_decode`; `rows` / `lens` point at `batch` device elements.
#[no_mangle]
pub unsafe extern "C" fn ihip_gpu_decode_graph(
    a: *const IhipGpuAttn,
    stream: u64,
    layer: usize,
    batch: usize,
    rows: *const IhipDeviceIndex,
    lens: *const IhipDeviceIndex,
    kv: *const IhipKvCache,
    q: *const IhipDeviceRows,
    out: *const IhipDeviceRows,
    sm_scale: f32,
) -> c_int {
    guard("ihip_gpu_decode_graph", || {
        let (r, l, c) = (desc(rows, "rows")?, desc(lens, "lens")?, desc(kv, "kv")?);
        let (q, out) = (desc(q, "q")?, desc(out, "out")?);
        if batch == 0 {
            return Err(arg("batch is 0"));
        }
        #[cfg(feature = "cuda")]
        {
            use ihip::backend::cuda::engine_attn::DevIndex;
            let (kv, qa, o, sc) = gpu_args(c, q, out, sm_scale)?;
            let idx = |x: &IhipDeviceIndex, name: &str| -> Result<DevIndex, Fail> {
                if x.elem_bytes != 4 && x.elem_bytes != 8 {
                    return Err(arg(format!(
                        "{name}.elem_bytes = {} (4: int32, 8: int64)",
                        x.elem_bytes
                    )));
                }
                Ok(DevIndex {
                    ptr: x.ptr,
                    elem_bytes: x.elem_bytes as usize,
                })
            };
            let (ri, li) = (idx(r, "rows")?, idx(l, "lens")?);
            with_gpu(a, |g| {
                g.decode_graph(stream, layer, &kv, batch, ri, li, &qa, &o, sc)?;
                Ok(())
            })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (r, l, c, q, out, stream, layer, sm_scale);
            with_gpu(a, |_| Ok(()))
        }
    })
}

/// Forget request `req_id`'s hip state (call when the request ends).
///
/// # Safety
/// `a` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn ihip_gpu_end_request(a: *const IhipGpuAttn, req_id: u64) -> c_int {
    guard("ihip_gpu_end_request", || {
        with_gpu(a, |g| {
            #[cfg(feature = "cuda")]
            g.end_request(req_id);
            #[cfg(not(feature = "cuda"))]
            let _ = (g, req_id);
            Ok(())
        })
    })
}

/// Locret layer `layer`: run request `req_id`'s owed eviction now (the one
/// its first decode would run) and write its retained token positions, per
/// KV head, sorted: `positions[h * per_head + i]` (`n_kv_heads x per_head`
/// int32). `*per_head` receives the count (every head holds the same). With
/// `positions` NULL only the count is written (the eviction still runs);
/// `cap` (entries) smaller than `n_kv_heads x per_head` is `IHIP_ERR_ARG`.
/// An engine that moves these tokens' K/V into the request's first
/// `per_head` slots and frees the rest (the SGLang shim) must then call
/// `ihip_gpu_end_request` for it. Refused (`IHIP_ERR_ARG`) for a layer that
/// is not locret, a request with no prefill here or one that has decoded.
/// No device work.
///
/// # Safety
/// `a` is NULL or a live handle; `positions` is NULL or holds `cap` int32;
/// `per_head` is valid for one write.
#[no_mangle]
pub unsafe extern "C" fn ihip_gpu_locret_retained(
    a: *const IhipGpuAttn,
    layer: usize,
    req_id: u64,
    positions: *mut i32,
    cap: usize,
    per_head: *mut usize,
) -> c_int {
    guard("ihip_gpu_locret_retained", || {
        if per_head.is_null() {
            return Err(arg("per_head is NULL"));
        }
        with_gpu(a, |g| {
            #[cfg(feature = "cuda")]
            {
                let held = g.locret_retain_now(layer, req_id).map_err(|e| match e {
                    ihip::Error::Invalid(m) | ihip::Error::OutOfRange(m) => arg(m),
                    e => e.into(),
                })?;
                let m = held.first().map_or(0, |h| h.len());
                if held.iter().any(|h| h.len() != m) {
                    return Err(Fail(
                        IHIP_ERR_ENGINE,
                        format!("locret layer {layer}: request {req_id}'s KV heads hold different counts"),
                    ));
                }
                // SAFETY: checked non-null above; the caller gives one writable usize.
                unsafe { *per_head = m };
                if positions.is_null() {
                    return Ok(());
                }
                let need = mul(held.len(), m, "positions")?;
                if cap < need {
                    return Err(arg(format!(
                        "positions holds {cap} entries, need {need} ({} KV heads x {m})",
                        held.len()
                    )));
                }
                let out = slice_mut(positions, need, "positions")?;
                for (h, ps) in held.iter().enumerate() {
                    for (i, &p) in ps.iter().enumerate() {
                        out[h * m + i] = p as i32;
                    }
                }
                Ok(())
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = (g, layer, req_id, positions, cap);
                Ok(())
            }
        })
    })
}

/// Forget every request's hip state.
///
/// # Safety
/// `a` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn ihip_gpu_reset(a: *const IhipGpuAttn) -> c_int {
    guard("ihip_gpu_reset", || {
        with_gpu(a, |g| {
            #[cfg(feature = "cuda")]
            g.reset();
            #[cfg(not(feature = "cuda"))]
            let _ = g;
            Ok(())
        })
    })
}

/// Per-layer method names as JSON {"layers":["dense","hip",...],
/// "requests":N}; free with `ihip_string_free`. NULL on error.
///
/// # Safety
/// `a` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn ihip_gpu_info_json(a: *const IhipGpuAttn) -> *mut c_char {
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut out = std::ptr::null_mut();
    guard("ihip_gpu_info_json", || {
        with_gpu(a, |g| {
            #[cfg(feature = "cuda")]
            {
                let layers: Vec<&str> = (0..g.n_layers())
                    .map(|l| g.layer_method(l).unwrap_or("?"))
                    .collect();
                // Locret layers: score read-backs (one host sync per
                // prefill call) and their host wait.
                let locret: Vec<serde_json::Value> = (0..g.n_layers())
                    .filter_map(|l| {
                        g.locret_stats(l).map(|s| {
                            serde_json::json!({"layer": l, "syncs": s.syncs, "tokens": s.tokens,
                                "sync_ms": s.sync_ms, "evictions": s.evictions})
                        })
                    })
                    .collect();
                let graph = g.graph_prepared().map(|(bs, rows, bytes)| {
                    serde_json::json!({"max_batch": bs, "table_rows": rows, "bytes": bytes})
                });
                let host_tier = crate::gpu_host::tier_stats_json(a);
                out = into_c_string(
                    serde_json::json!({"layers": layers, "requests": g.n_requests(), "locret": locret,
                        "graph": graph, "host_tier": host_tier})
                    .to_string(),
                );
            }
            #[cfg(not(feature = "cuda"))]
            let _ = g;
            Ok(())
        })
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    #[cfg(feature = "cuda")]
    fn driver_present() -> bool {
        ihip::backend::cuda::driver_available()
    }
    #[cfg(not(feature = "cuda"))]
    fn driver_present() -> bool {
        false
    }

    #[test]
    fn gpu_calls_fail_cleanly_without_cuda_or_driver() {
        let cfg = CString::new(r#"{"model":{"n_layers":2,"n_q_heads":4,"n_kv_heads":2,"head_dim":64},"dense_layers":1}"#)
            .unwrap();
        let h = unsafe { ihip_gpu_attn_new(0, cfg.as_ptr()) };
        let msg = unsafe { CStr::from_ptr(ihip_last_error()) }
            .to_string_lossy()
            .into_owned();
        if !cfg!(feature = "cuda") {
            assert_eq!(ihip_gpu_built(), 0);
            assert!(h.is_null());
            assert!(msg.contains("without CUDA support"), "{msg}");
        } else if !driver_present() {
            assert!(h.is_null());
            assert!(msg.contains("libcuda"), "{msg}");
        }
        if h.is_null() {
            let ids = [1u64];
            let ls = [5i64];
            let reqs = IhipGpuRequests {
                batch: 1,
                req_ids: ids.as_ptr(),
                table_rows: ls.as_ptr(),
                lens: ls.as_ptr(),
                n_new: std::ptr::null(),
            };
            let kv = IhipKvCache {
                k: 16,
                v: 16,
                dtype: IHIP_DTYPE_BF16,
                table: 16,
                table_stride: 8,
                table_n_rows: 8,
                page_size: 1,
                page_stride: 128,
                head_stride: 64,
            };
            let rows = IhipDeviceRows {
                ptr: 16,
                dtype: IHIP_DTYPE_BF16,
                row_stride: 256,
            };
            let rc = unsafe { ihip_gpu_decode(h, 0, 0, &reqs, &kv, &rows, &rows, 0.0) };
            assert!(rc == IHIP_ERR_NO_GPU || rc == IHIP_ERR_ARG, "{rc}");
            let msg = unsafe { CStr::from_ptr(ihip_last_error()) }.to_string_lossy();
            assert!(msg.contains("NULL") || msg.contains("CUDA"), "{msg}");
            unsafe { ihip_gpu_attn_free(h) };
        } else {
            unsafe { ihip_gpu_attn_free(h) };
        }
        // A bad config is a config error whatever the build.
        let bad = CString::new(r#"{"model":{"n_layers":0}}"#).unwrap();
        assert!(unsafe { ihip_gpu_attn_new(0, bad.as_ptr()) }.is_null());
    }
}
