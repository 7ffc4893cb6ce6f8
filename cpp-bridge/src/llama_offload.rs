//! Host offload in llama.cpp's CUDA build (patch 0009): the user's option
//! and its validation.
//!
//! A user turns it on with llama.cpp's own `--no-kv-offload` (`-nkvo`,
//! `offload_kqv = false`: every layer's K/V in host memory; the patched
//! build allocates it in the CUDA_Host buffer, page-locked) plus
//! `kv.device_cache_pages` in the InfiniteHiP config: the cells (tokens,
//! all KV heads) of a layer's device page cache. hip layers then decode with
//! our CUDA attention reading the host K/V through that cache and the
//! estimation row cache (`kv.estimation_cache_rows` key rows per layer,
//! default `device_cache_pages * n_kv_heads`), see
//! `infinitehip::backend::cuda::engine_attn::host_tier`. llama.cpp's cells
//! are pages of one token: `kv.page_size` does not apply here.
//!
//! Without `-nkvo` the option is ignored (the K/V are on the device); with
//! `-nkvo` and without it, llama.cpp's own attention runs on the host K/V.

use infinitehip::config::{LayerPolicy, PolicyConfig};
use infinitehip::{Error, Result};

/// Device cache sizes per layer: (cells of the page cache, key rows of the
/// estimation row cache).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffloadSizes {
    pub cache_cells: usize,
    pub estimation_rows: usize,
}

/// Cells one decode step of a hip layer may select per KV head: sink,
/// window, the last stage's kept tokens and the tokens that slid out of the
/// window since the last full refresh.
pub fn step_cells(h: &infinitehip::config::HipConfig) -> usize {
    let last = h
        .stages
        .last()
        .map_or(0, |s| (s.keep_tokens / s.chunk_size).max(1) * s.chunk_size);
    let slid = h.stages.first().map_or(0, |s| s.refresh_interval);
    h.sink + h.window + last + slid
}

/// The option in `cfg` (None: off), or why it cannot work.
pub fn offload_sizes(cfg: &PolicyConfig) -> Result<Option<OffloadSizes>> {
    let Some(cells) = cfg.kv.device_cache_pages else {
        return Ok(None);
    };
    let bad = |reason: String| Err(Error::config("kv.device_cache_pages", reason));
    if cells == 0 {
        return bad("0 cells: must be >= 1 (or absent: no host offload)".into());
    }
    for l in 0..cfg.model.n_layers {
        if let LayerPolicy::Hip(h) = cfg.layer_policy(l) {
            let need = step_cells(h);
            if cells < need {
                return bad(format!(
                    "{cells} cells per layer cannot hold one decode step of layer {l}: up to {need} cells \
                     (sink {} + window {} + last stage's {} kept tokens + {} slid since a full refresh); \
                     set it to at least {need} (per sequence decoded together)",
                    h.sink,
                    h.window,
                    need - h.sink - h.window - h.stages.first().map_or(0, |s| s.refresh_interval),
                    h.stages.first().map_or(0, |s| s.refresh_interval),
                ));
            }
        }
    }
    let rows = match cfg.kv.estimation_cache_rows {
        Some(r) if r < 16 => {
            return Err(Error::config(
                "kv.estimation_cache_rows",
                format!("{r} key rows: must be >= 16 (or absent: device_cache_pages x n_kv_heads)"),
            ))
        }
        Some(r) if r > 1 << 30 => {
            return Err(Error::config(
                "kv.estimation_cache_rows",
                format!("{r} key rows: must be <= 2^30"),
            ))
        }
        Some(r) => r,
        None => (cells * cfg.model.n_kv_heads).clamp(16, 1 << 30),
    };
    Ok(Some(OffloadSizes {
        cache_cells: cells,
        estimation_rows: rows,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::ModelInfo;
    use crate::llama::LlamaPlugin;

    fn mi() -> ModelInfo {
        ModelInfo {
            n_layers: 4,
            n_q_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            rope_theta: 500000.0,
            n_ctx_train: 131072,
        }
    }

    const HIP: &str = r#""dense_layers": 0, "default": {"method": "hip", "sink": 64, "window": 512,
        "stages": [{"chunk_size": 64, "keep_tokens": 4096, "refresh_interval": 16},
                   {"chunk_size": 8, "keep_tokens": 1024, "refresh_interval": 4}]}"#;

    fn sizes(kv: &str) -> std::result::Result<Option<OffloadSizes>, String> {
        let p = LlamaPlugin::new(&format!("{{{HIP}{kv}}}"), &mi()).map_err(|e| e.to_string())?;
        offload_sizes(p.config()).map_err(|e| e.to_string())
    }

    #[test]
    fn absent_means_off_and_defaults_fill_in() {
        assert_eq!(sizes("").unwrap(), None);
        // 64 + 512 + 1024 + 16 cells per step
        let s = sizes(r#", "kv": {"device_cache_pages": 1616}"#)
            .unwrap()
            .unwrap();
        assert_eq!(s.cache_cells, 1616);
        assert_eq!(s.estimation_rows, 1616 * 8);
        let s = sizes(r#", "kv": {"device_cache_pages": 4096, "estimation_cache_rows": 100}"#)
            .unwrap()
            .unwrap();
        assert_eq!(s.estimation_rows, 100);
    }

    #[test]
    fn bad_values_fail_with_the_field_and_the_fix() {
        let e = sizes(r#", "kv": {"device_cache_pages": 1615}"#).unwrap_err();
        assert!(
            e.contains("kv.device_cache_pages") && e.contains("at least 1616"),
            "{e}"
        );
        let e = sizes(r#", "kv": {"device_cache_pages": 4096, "estimation_cache_rows": 15}"#)
            .unwrap_err();
        assert!(
            e.contains("kv.estimation_cache_rows") && e.contains(">= 16"),
            "{e}"
        );
        let e = sizes(r#", "kv": {"device_cache_pages": 0}"#).unwrap_err();
        assert!(e.contains("device_cache_pages"), "{e}");
        let e = sizes(r#", "kv": {"device_cache_pages": -3}"#).unwrap_err();
        assert!(
            e.contains("device_cache_pages") || e.contains("invalid"),
            "{e}"
        );
        let e = sizes(r#", "kv": {"device_cache_pagez": 4096}"#).unwrap_err();
        assert!(e.contains("device_cache_pagez"), "{e}");
    }

    #[test]
    fn the_cuda_route_refuses_a_bad_budget_before_any_gpu_work() {
        let p = LlamaPlugin::new(
            &format!("{{{HIP}, \"kv\": {{\"device_cache_pages\": 100}}}}"),
            &mi(),
        )
        .unwrap();
        let e = crate::llama_cuda::llama_cuda_attn_new(&p)
            .err()
            .expect("must refuse");
        assert!(
            e.contains("kv.device_cache_pages") && e.contains("at least 1616"),
            "{e}"
        );
    }
}
