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

/// Opaque GPU attention handle.
pub struct IhipGpuAttn {
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
fn with_gpu(
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
fn with_gpu(
    a: *const IhipGpuAttn,
    _f: impl FnOnce(&mut ()) -> Result<(), Fail>,
) -> Result<(), Fail> {
    if a.is_null() {
        return Err(no_gpu(format!("GPU attention handle is NULL; {NO_CUDA}")));
    }
    Err(no_gpu(NO_CUDA))
}

#[cfg(feature = "cuda")]
fn dtype_of(code: c_int, name: &str) -> Result<ihip::DType, Fail> {
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

#[cfg(feature = "cuda")]
fn usizes(p: *const i64, n: usize, name: &str) -> Result<Vec<usize>, Fail> {
    slice(p, n, name)?
        .iter()
        .enumerate()
        .map(|(i, &x)| nonneg(x, &format!("{name}[{i}]")))
        .collect()
}

/// Arguments shared by decode and prefill.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn gpu_args(
    q: u64,
    q_dtype: c_int,
    q_row_stride: i64,
    k: u64,
    v: u64,
    kv_dtype: c_int,
    table: u64,
    table_stride: i64,
    page_size: i64,
    page_stride: i64,
    head_stride: i64,
    out: u64,
    out_dtype: c_int,
    out_row_stride: i64,
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
        k,
        v,
        dtype: dtype_of(kv_dtype, "kv")?,
        table,
        table_stride: nonneg(table_stride, "table_stride")?,
        page_size: nonneg(page_size, "page_size")?,
        page_stride: nonneg(page_stride, "page_stride")?,
        head_stride: nonneg(head_stride, "head_stride")?,
    };
    let qa = QArg {
        ptr: q,
        dtype: dtype_of(q_dtype, "q")?,
        row_stride: nonneg(q_row_stride, "q_row_stride")?,
    };
    let o = AttnOut {
        ptr: out,
        dtype: dtype_of(out_dtype, "out")?,
        row_stride: nonneg(out_row_stride, "out_row_stride")?,
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
/// Host arrays (n = batch): req_ids (hip state key), table_rows (request's
/// row of `table`), lens (tokens in the cache including the one decoded).
/// Device: q `[batch][n_q_heads*head_dim]` at q_row_stride elements per row;
/// K/V: token t of KV head h of request b is at
/// `table[table_rows[b] * table_stride + t / page_size] * page_stride +
///  h * head_stride + (t % page_size) * head_dim` (elements; 16-byte rows);
/// table int32; out like q. sm_scale 0: 1/sqrt(head_dim).
///
/// # Safety
/// Host pointers hold `batch` elements; device pointers are valid for the
/// shapes given until the stream has run the work.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ihip_gpu_decode(
    a: *const IhipGpuAttn,
    stream: u64,
    layer: usize,
    batch: usize,
    req_ids: *const u64,
    table_rows: *const i64,
    lens: *const i64,
    q: u64,
    q_dtype: c_int,
    q_row_stride: i64,
    k: u64,
    v: u64,
    kv_dtype: c_int,
    table: u64,
    table_stride: i64,
    page_size: i64,
    page_stride: i64,
    head_stride: i64,
    out: u64,
    out_dtype: c_int,
    out_row_stride: i64,
    sm_scale: f32,
) -> c_int {
    guard("ihip_gpu_decode", || {
        #[cfg(feature = "cuda")]
        {
            let ids = slice(req_ids, batch, "req_ids")?;
            let rows = usizes(table_rows, batch, "table_rows")?;
            let ls = usizes(lens, batch, "lens")?;
            let (kv, qa, o, sc) = gpu_args(
                q,
                q_dtype,
                q_row_stride,
                k,
                v,
                kv_dtype,
                table,
                table_stride,
                page_size,
                page_stride,
                head_stride,
                out,
                out_dtype,
                out_row_stride,
                sm_scale,
            )?;
            with_gpu(a, |g| {
                g.decode(stream, layer, &kv, ids, &rows, &ls, &qa, &o, sc)?;
                Ok(())
            })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (
                stream,
                layer,
                batch,
                req_ids,
                table_rows,
                lens,
                q,
                q_dtype,
                q_row_stride,
                k,
                v,
                kv_dtype,
                table,
                table_stride,
                page_size,
                page_stride,
                head_stride,
                out,
                out_dtype,
                out_row_stride,
                sm_scale,
            );
            with_gpu(a, |_| Ok(()))
        }
    })
}

/// Causal attention of new tokens (prefill / extend): request b has
/// n_new[b] consecutive query rows (in request order) at positions
/// lens[b] - n_new[b] .. lens[b]; their K/V are already in the cache.
/// Dense layers attend densely, hip layers sparsely (a mask per query block
/// by the tensor-core estimator, `GpuAttention::prefill_estimator`).
/// Resets the requests' hip state. Other arguments as `ihip_gpu_decode`.
///
/// # Safety
/// As `ihip_gpu_decode`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ihip_gpu_prefill(
    a: *const IhipGpuAttn,
    stream: u64,
    layer: usize,
    batch: usize,
    req_ids: *const u64,
    table_rows: *const i64,
    lens: *const i64,
    n_new: *const i64,
    q: u64,
    q_dtype: c_int,
    q_row_stride: i64,
    k: u64,
    v: u64,
    kv_dtype: c_int,
    table: u64,
    table_stride: i64,
    page_size: i64,
    page_stride: i64,
    head_stride: i64,
    out: u64,
    out_dtype: c_int,
    out_row_stride: i64,
    sm_scale: f32,
) -> c_int {
    prefill_with(
        "ihip_gpu_prefill",
        a,
        stream,
        layer,
        batch,
        req_ids,
        table_rows,
        lens,
        n_new,
        q,
        q_dtype,
        q_row_stride,
        k,
        v,
        kv_dtype,
        table,
        table_stride,
        page_size,
        page_stride,
        head_stride,
        out,
        out_dtype,
        out_row_stride,
        sm_scale,
        None,
        std::ptr::null(),
    )
}

/// `ihip_gpu_prefill` with the new tokens' pre-RoPE projections, for
/// locret layers (other layers ignore them): device `proj_q`
/// `[rows][n_q_heads*head_dim]`, `proj_k`, `proj_v` `[rows][n_kv_heads*head_dim]`
/// (rows as q), all of `proj_dtype`, row strides in elements; `prompt_done`
/// (host, `batch` bytes, 0/1, or NULL = all 0): whether the call ends each
/// request's prompt (`Engine::append`). A locret layer reads the scores
/// back once per call (a host sync on `stream`).
///
/// # Safety
/// As `ihip_gpu_prefill`; `prompt_done` is NULL or holds `batch` bytes.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ihip_gpu_prefill_proj(
    a: *const IhipGpuAttn,
    stream: u64,
    layer: usize,
    batch: usize,
    req_ids: *const u64,
    table_rows: *const i64,
    lens: *const i64,
    n_new: *const i64,
    q: u64,
    q_dtype: c_int,
    q_row_stride: i64,
    k: u64,
    v: u64,
    kv_dtype: c_int,
    table: u64,
    table_stride: i64,
    page_size: i64,
    page_stride: i64,
    head_stride: i64,
    out: u64,
    out_dtype: c_int,
    out_row_stride: i64,
    sm_scale: f32,
    proj_q: u64,
    proj_k: u64,
    proj_v: u64,
    proj_dtype: c_int,
    proj_q_stride: i64,
    proj_kv_stride: i64,
    prompt_done: *const u8,
) -> c_int {
    let proj = RawProj {
        q: proj_q,
        k: proj_k,
        v: proj_v,
        dtype: proj_dtype,
        q_stride: proj_q_stride,
        kv_stride: proj_kv_stride,
    };
    prefill_with(
        "ihip_gpu_prefill_proj",
        a,
        stream,
        layer,
        batch,
        req_ids,
        table_rows,
        lens,
        n_new,
        q,
        q_dtype,
        q_row_stride,
        k,
        v,
        kv_dtype,
        table,
        table_stride,
        page_size,
        page_stride,
        head_stride,
        out,
        out_dtype,
        out_row_stride,
        sm_scale,
        Some(proj),
        prompt_done,
    )
}

/// The projection arguments of `ihip_gpu_prefill_proj`, unchecked.
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct RawProj {
    q: u64,
    k: u64,
    v: u64,
    dtype: c_int,
    q_stride: i64,
    kv_stride: i64,
}

/// Both prefill entry points; `proj` None = plain `ihip_gpu_prefill`.
#[allow(clippy::too_many_arguments)]
unsafe fn prefill_with(
    what: &str,
    a: *const IhipGpuAttn,
    stream: u64,
    layer: usize,
    batch: usize,
    req_ids: *const u64,
    table_rows: *const i64,
    lens: *const i64,
    n_new: *const i64,
    q: u64,
    q_dtype: c_int,
    q_row_stride: i64,
    k: u64,
    v: u64,
    kv_dtype: c_int,
    table: u64,
    table_stride: i64,
    page_size: i64,
    page_stride: i64,
    head_stride: i64,
    out: u64,
    out_dtype: c_int,
    out_row_stride: i64,
    sm_scale: f32,
    proj: Option<RawProj>,
    prompt_done: *const u8,
) -> c_int {
    guard(what, || {
        #[cfg(feature = "cuda")]
        {
            use ihip::backend::cuda::engine_attn::{Insert, ProjArg};
            let ids = slice(req_ids, batch, "req_ids")?;
            let rows = usizes(table_rows, batch, "table_rows")?;
            let ls = usizes(lens, batch, "lens")?;
            let nn = usizes(n_new, batch, "n_new")?;
            let (kv, qa, o, sc) = gpu_args(
                q,
                q_dtype,
                q_row_stride,
                k,
                v,
                kv_dtype,
                table,
                table_stride,
                page_size,
                page_stride,
                head_stride,
                out,
                out_dtype,
                out_row_stride,
                sm_scale,
            )?;
            let proj = match proj {
                None => None,
                Some(p) => Some(ProjArg {
                    q: p.q,
                    k: p.k,
                    v: p.v,
                    dtype: dtype_of(p.dtype, "proj")?,
                    q_stride: nonneg(p.q_stride, "proj_q_stride")?,
                    kv_stride: nonneg(p.kv_stride, "proj_kv_stride")?,
                }),
            };
            let pd: Vec<bool> = if prompt_done.is_null() {
                Vec::new()
            } else {
                slice(prompt_done, batch, "prompt_done")?
                    .iter()
                    .map(|&x| x != 0)
                    .collect()
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
                    ids,
                    &rows,
                    &ls,
                    &nn,
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
            let _ = (
                stream,
                layer,
                batch,
                req_ids,
                table_rows,
                lens,
                n_new,
                q,
                q_dtype,
                q_row_stride,
                k,
                v,
                kv_dtype,
                table,
                table_stride,
                page_size,
                page_stride,
                head_stride,
                out,
                out_dtype,
                out_row_stride,
                sm_scale,
                proj,
                prompt_done,
            );
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
                out = into_c_string(
                    serde_json::json!({"layers": layers, "requests": g.n_requests(), "locret": locret})
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
            let rc = unsafe {
                ihip_gpu_decode(
                    h,
                    0,
                    0,
                    1,
                    ids.as_ptr(),
                    ls.as_ptr(),
                    ls.as_ptr(),
                    16,
                    IHIP_DTYPE_BF16,
                    256,
                    16,
                    16,
                    IHIP_DTYPE_BF16,
                    16,
                    8,
                    1,
                    128,
                    64,
                    16,
                    IHIP_DTYPE_BF16,
                    256,
                    0.0,
                )
            };
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
