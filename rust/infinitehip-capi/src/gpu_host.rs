//! `ihip_gpu_decode_host`: decode over K/V that live in page-locked HOST
//! memory (an engine's KV pool allocated there: SGLang's token pool in
//! pinned memory under host offload), read through per-layer device caches
//! (`GpuAttention::decode_host_tier`: a page cache of `cache_cells` cells
//! and an estimation row cache). The caches live in the handle, one per
//! layer, and follow their requests by appends (anything else rebuilds them
//! cold, so a reused cell is never read stale).

use std::ffi::c_int;

use super::*;
use crate::gpu::{IhipDeviceRows, IhipGpuAttn, IhipGpuRequests};
use crate::gpu_requests::check_requests;

/// One layer's K/V in page-locked host memory, token-major rows
/// `[cell][kv_head][head_dim]` of `dtype` (page size 1, rows contiguous),
/// and the step's cell table: request b's cells are row b of `table`
/// (device int32 `[batch][table_stride]`) and of its host twin
/// `table_host` (the page cache's bookkeeping reads it). `cache_cells`:
/// cells (all KV heads) of the device page cache (`kv.device_cache_pages`);
/// `estimation_rows`: key rows of the estimation row cache, 0 for
/// `cache_cells * n_kv_heads`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IhipHostKv {
    pub k: u64,
    pub v: u64,
    pub n_cells: i64,
    pub dtype: c_int,
    pub table: u64,
    pub table_host: *const i32,
    pub table_stride: i64,
    pub cache_cells: i64,
    pub estimation_rows: i64,
}

/// Decode one query per request over host K/V (module doc). hip layers
/// read through the layer's device caches (page policy and row admission
/// on the device, missed blocks copied on `stream`, no host sync; with
/// `INFINITEHIP_OFFLOAD_ROUTE=device` the earlier path: one host sync per
/// layer-step, the selection read back for the page cache's bookkeeping,
/// missed blocks copied on a side stream); other layers read every row of
/// the mapped host memory over the bus. Outputs equal `ihip_gpu_decode`'s
/// over the same K/V in device memory bit for bit. `reqs.table_rows[b]`
/// must be b (the table holds the batch's rows only); `n_new` is unused.
/// Checked (IHIP_ERR_ARG): table rows, lengths within `table_stride`,
/// cells within `n_cells`, `cache_cells >= 1`; a step whose selection
/// does not fit `cache_cells` is IHIP_ERR_CONFIG naming
/// `kv.device_cache_pages`.
///
/// # Safety
/// As `ihip_gpu_decode`; `kv.k`/`kv.v` are page-locked host memory of
/// `n_cells` cells that stay allocated while the handle lives (or until a
/// later call with other buffers rebuilds the caches); `table_host` holds
/// `batch * table_stride` int32.
#[no_mangle]
pub unsafe extern "C" fn ihip_gpu_decode_host(
    a: *const IhipGpuAttn,
    stream: u64,
    layer: usize,
    reqs: *const IhipGpuRequests,
    kv: *const IhipHostKv,
    q: *const IhipDeviceRows,
    out: *const IhipDeviceRows,
    sm_scale: f32,
) -> c_int {
    guard("ihip_gpu_decode_host", || {
        let (r, h) = (crate::gpu::desc(reqs, "reqs")?, crate::gpu::desc(kv, "kv")?);
        let (q, out) = (crate::gpu::desc(q, "q")?, crate::gpu::desc(out, "out")?);
        let reqs = check_requests(
            r.batch,
            r.req_ids,
            r.table_rows,
            r.lens,
            None,
            r.batch as i64,
            h.table_stride,
            1,
        )?;
        if let Some(b) = reqs.rows.iter().enumerate().find(|&(b, &row)| row != b) {
            return Err(arg(format!(
                "table_rows[{}] = {}: the host-K/V table holds the batch's rows in order (row b = request b)",
                b.0, b.1
            )));
        }
        if h.n_cells < 1 || h.cache_cells < 1 || h.estimation_rows < 0 {
            return Err(arg(format!(
                "n_cells {} and cache_cells {} must be >= 1, estimation_rows {} >= 0",
                h.n_cells, h.cache_cells, h.estimation_rows
            )));
        }
        let table_host = slice(
            h.table_host,
            r.batch * h.table_stride as usize,
            "table_host",
        )?;
        #[cfg(feature = "cuda")]
        {
            use ihip::backend::cuda::engine_attn::{HostKvArgs, HostTierConfig};
            let hk = HostKvArgs {
                k: h.k,
                v: h.v,
                n_cells: h.n_cells as usize,
                dtype: crate::gpu::dtype_of(h.dtype, "kv")?,
                table: h.table,
                table_host,
                table_stride: h.table_stride as usize,
            };
            let (qp, qd, qs) = crate::gpu::rows_of(q, "q")?;
            let (op, od, os) = crate::gpu::rows_of(out, "out")?;
            let qa = ihip::backend::cuda::engine_attn::QArg {
                ptr: qp,
                dtype: qd,
                row_stride: qs,
            };
            let o = ihip::backend::cuda::dispatch::AttnOut {
                ptr: op,
                dtype: od,
                row_stride: os,
            };
            let sc = (sm_scale != 0.0).then_some(sm_scale);
            crate::gpu::with_gpu(a, |g| {
                let hkv = g.shape().n_kv_heads;
                let cfg = HostTierConfig {
                    cache_cells: h.cache_cells as usize,
                    estimation_rows: if h.estimation_rows == 0 {
                        (h.cache_cells as usize * hkv).clamp(16, 1 << 30)
                    } else {
                        h.estimation_rows as usize
                    },
                };
                // SAFETY: `a` is non-null here (with_gpu checked it).
                let mut tiers = unsafe { &*a }.tiers.lock().map_err(|_| {
                    Fail(
                        IHIP_ERR_PANIC,
                        "GPU host-tier state is poisoned; free the handle".into(),
                    )
                })?;
                let n = tiers.len();
                let tier = tiers
                    .get_mut(layer)
                    .ok_or_else(|| arg(format!("layer {layer} of {n}")))?;
                g.decode_host_tier(
                    stream, layer, tier, cfg, &hk, reqs.ids, &reqs.lens, &qa, &o, sc,
                )?;
                Ok(())
            })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (table_host, reqs.ids, stream, layer, q, out, sm_scale);
            crate::gpu::with_gpu(a, |_| Ok(()))
        }
    })
}

/// Per-layer counters of the host-tier caches (layers that ran
/// `ihip_gpu_decode_host`), for `ihip_gpu_info_json`. Called with the
/// attention object locked.
#[cfg(feature = "cuda")]
pub(crate) fn tier_stats_json(a: *const IhipGpuAttn) -> Vec<serde_json::Value> {
    // SAFETY: called from `ihip_gpu_info_json` on a live, non-null handle.
    let Ok(tiers) = (unsafe { &*a }).tiers.lock() else {
        return Vec::new();
    };
    tiers
        .iter()
        .enumerate()
        .filter_map(|(l, t)| t.as_ref().map(|t| (l, t.stats)))
        .map(|(l, s)| {
            serde_json::json!({"layer": l, "steps": s.steps, "rebuilds": s.rebuilds,
                "hits": s.cache.hits, "misses": s.cache.misses, "bytes_copied": s.cache.bytes_copied,
                "evictions": s.cache.evictions, "blocks_needed": s.blocks_needed,
                "est_hits": s.est_hits, "est_misses": s.est_misses,
                "device_bytes": s.device_bytes, "host_bytes": s.host_bytes})
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn call(rows: &[i64], cache_cells: i64) -> (c_int, String) {
        let ids = [1u64, 2];
        let lens = [5i64, 3];
        let reqs = IhipGpuRequests {
            batch: rows.len(),
            req_ids: ids.as_ptr(),
            table_rows: rows.as_ptr(),
            lens: lens.as_ptr(),
            n_new: std::ptr::null(),
        };
        let table = [0i32; 16];
        let kv = IhipHostKv {
            k: 16,
            v: 16,
            n_cells: 8,
            dtype: IHIP_DTYPE_BF16,
            table: 16,
            table_host: table.as_ptr(),
            table_stride: 8,
            cache_cells,
            estimation_rows: 0,
        };
        let r = IhipDeviceRows {
            ptr: 16,
            dtype: IHIP_DTYPE_BF16,
            row_stride: 256,
        };
        let rc = unsafe { ihip_gpu_decode_host(std::ptr::null(), 0, 0, &reqs, &kv, &r, &r, 0.0) };
        let msg = unsafe { CStr::from_ptr(ihip_last_error()) }
            .to_string_lossy()
            .into_owned();
        (rc, msg)
    }

    #[test]
    fn host_decode_checks_its_arguments_before_the_gpu() {
        // Rows must be the batch's own, in order.
        let (rc, msg) = call(&[1, 0], 4);
        assert_eq!(rc, IHIP_ERR_ARG, "{msg}");
        assert!(msg.contains("table_rows[0] = 1"), "{msg}");
        let (rc, msg) = call(&[0, 1], 0);
        assert_eq!(rc, IHIP_ERR_ARG, "{msg}");
        assert!(msg.contains("cache_cells 0"), "{msg}");
        // Valid arguments reach the handle: NULL here, so no GPU.
        let (rc, msg) = call(&[0, 1], 4);
        assert!(rc == IHIP_ERR_NO_GPU || rc == IHIP_ERR_ARG, "{rc} {msg}");
        assert!(msg.contains("NULL"), "{msg}");
    }
}
