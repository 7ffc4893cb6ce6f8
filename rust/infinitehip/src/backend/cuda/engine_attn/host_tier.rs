//! hip decode of `GpuAttention` over K/V that live in page-locked HOST
//! memory (an engine's host KV buffer: llama.cpp's `--no-kv-offload` cache
//! in its CUDA_Host buffer), read through the device caches of the offload
//! machinery instead of a device copy of the cache.
//!
//! The K/V are token-major rows `[cell][kv_head][head_dim]` (page size 1)
//! with the engine's device cell-order table, as in `decode`. Per layer a
//! `HostTier` holds:
//! - the estimation row cache (`est_cache::HostEstimation`): mask
//!   estimation scores keys through it (kernels `hip_mask_host`); misses
//!   read the pinned rows over the bus. Same key bits in the same order, so
//!   the selection equals the one over device K/V;
//! - the device page cache (`offload::OffloadKv`, one page per cell, sink
//!   and window pinned): by default `PagePolicy::Device` (CLOCK on the
//!   device from the device selection and the engine's device cell table,
//!   the missed blocks copied on the engine's stream: no read-back, no host
//!   sync per layer-step) with `Admission::FullDevice` for the row cache;
//!   `INFINITEHIP_OFFLOAD_ROUTE=device`: the earlier path (the selection
//!   read back, one host sync per layer-step, host LRU, copies on a side
//!   stream, host dedup + CLOCK for the row cache). The `slot_` decode
//!   kernel attends from the slot arena on the engine's stream.
//!
//! The output equals `decode`'s over device K/V bit for bit (same
//! selection, same K/V bits, same kernel arithmetic). Device memory per
//! layer: `cache_cells * n_kv_heads` head blocks of K and V, the row
//! cache, and the slot table (one i32 per (cell, kv head) of the buffer);
//! the device-side policy adds 12 B per (cell, kv head) of the buffer.
//!
//! The tier follows its sequences by appends: a step whose every table row
//! is the last step's plus one cell keeps the caches; anything else (other
//! sequences, a cleared, shortened or reloaded one) rebuilds them cold.
//! So a cached cell is never rewritten: an engine writes only free cells,
//! and freeing a cell of a tier's sequence is a non-append step.

use std::ops::Range;

use super::super::dispatch::{launch_attention_ex, regions, KvPtrs, KvStrides};
use super::super::est_cache::{Admission, HostEstimation};
use super::super::offload::{HostKv, OffloadKv, PagePolicy, PinnedBuf};
use super::super::{gpu_err, DevBuf};
use super::{AttnOut, EngineKv, GpuAttention, Layer, QArg};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kv::{CacheStats, KvLayout};

/// Sizes of the device caches of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostTierConfig {
    /// Cells (tokens, all kv heads) the device page cache holds.
    pub cache_cells: usize,
    /// Key rows (cell, kv head) of the estimation row cache.
    pub estimation_rows: usize,
}

/// K/V in host memory, as the engine passes them.
#[derive(Clone, Copy, Debug)]
pub struct HostKvArgs<'a> {
    /// Host addresses of the K and V buffers (page-locked; cell 0).
    pub k: u64,
    pub v: u64,
    /// Cells the buffers hold (all streams).
    pub n_cells: usize,
    pub dtype: DType,
    /// Device i32 cell-order table `[rows][table_stride]` (the kernels'),
    /// and its host twin (the page cache's bookkeeping).
    pub table: u64,
    pub table_host: &'a [i32],
    pub table_stride: usize,
}

/// Counters of a layer's tier (summed over its steps).
#[derive(Clone, Copy, Debug, Default)]
pub struct HostTierStats {
    pub steps: u64,
    pub rebuilds: u64,
    /// Page cache: (cell, kv head) blocks hit / missed, bytes copied in.
    pub cache: CacheStats,
    pub blocks_needed: u64,
    /// Estimation row cache: key rows hit / missed, bytes read from host.
    pub est_hits: u64,
    pub est_misses: u64,
    pub est_host_bytes: u64,
    /// Device bytes of the caches (last built).
    pub device_bytes: usize,
    /// Host bytes of the K/V buffers the tier reads (last built).
    pub host_bytes: usize,
}

impl HostTierStats {
    pub fn add(&mut self, o: &HostTierStats) {
        self.steps += o.steps;
        self.rebuilds += o.rebuilds;
        self.cache.hits += o.cache.hits;
        self.cache.misses += o.cache.misses;
        self.cache.bytes_copied += o.cache.bytes_copied;
        self.cache.evictions += o.cache.evictions;
        self.blocks_needed += o.blocks_needed;
        self.est_hits += o.est_hits;
        self.est_misses += o.est_misses;
        self.est_host_bytes += o.est_host_bytes;
        self.device_bytes += o.device_bytes;
        self.host_bytes += o.host_bytes;
    }
}

/// One layer's device caches over the host K/V (module doc).
pub struct HostTier {
    off: OffloadKv,
    est: HostEstimation,
    k: u64,
    n_cells: usize,
    seqs: Vec<u64>,
    pub stats: HostTierStats,
}

impl HostTier {
    /// The step's tables extend the tier's by one cell each (same sequences).
    fn appends(&self, seqs: &[u64], tables: &[Vec<u32>]) -> bool {
        self.seqs == seqs
            && self
                .off
                .host
                .tables
                .iter()
                .zip(tables)
                .all(|(old, new)| new.len() == old.len() + 1 && new[..old.len()] == old[..])
    }
}

/// Which offload path the engines' route runs: the full-device one
/// (default: page policy and estimation admission on the device, no host
/// sync per layer-step; bench-gpu-offload `--admission full-device`), or
/// run 4's (`INFINITEHIP_OFFLOAD_ROUTE=device`: the selection read back for
/// a host LRU page policy, host dedup + CLOCK for the row cache). Read when
/// a tier is (re)built.
fn full_device_route() -> bool {
    !matches!(
        std::env::var("INFINITEHIP_OFFLOAD_ROUTE").as_deref(),
        Ok("device")
    )
}

impl GpuAttention {
    /// Decode one query per request over K/V in page-locked host memory
    /// (module doc). `tier` is this layer's state (built or rebuilt here);
    /// request b is table row b. hip layers read through the device
    /// caches; other layers run `decode` over the mapped host memory (their
    /// kernels read every row over the bus).
    ///
    /// # Safety
    /// As `decode`; `kv.k`/`kv.v` hold `kv.n_cells` cells of page-locked
    /// host memory that stay allocated while `tier` lives.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn decode_host_tier(
        &mut self,
        stream: u64,
        layer: usize,
        tier: &mut Option<HostTier>,
        cfg: HostTierConfig,
        kv: &HostKvArgs,
        req_ids: &[u64],
        lens: &[usize],
        q: &QArg,
        out: &AttnOut,
        sm_scale: Option<f32>,
    ) -> Result<()> {
        let b = req_ids.len();
        let (hkv, d) = (self.shape.n_kv_heads, self.shape.head_dim);
        let row = hkv * d;
        let dkv = EngineKv {
            k: super::super::offload::host_device_ptr(kv.k)?,
            v: super::super::offload::host_device_ptr(kv.v)?,
            dtype: kv.dtype,
            table: kv.table,
            table_stride: kv.table_stride,
            page_size: 1,
            page_stride: row,
            head_stride: d,
        };
        self.check_common(layer, &dkv, q, out, b)?;
        if lens.len() != b || kv.table_host.len() < b * kv.table_stride {
            return Err(Error::shape(
                "host-tier decode lens / host table rows",
                b,
                format!(
                    "{} / {}",
                    lens.len(),
                    kv.table_host.len() / kv.table_stride.max(1)
                ),
            ));
        }
        if matches!(&self.layers[layer], Layer::Hip(h) if h.rope.is_some()) {
            return Err(super::rope::host_tier_refused(layer));
        }
        if !matches!(self.layers[layer], Layer::Hip(_)) {
            let rows: Vec<usize> = (0..b).collect();
            return self.decode(stream, layer, &dkv, req_ids, &rows, lens, q, out, sm_scale);
        }
        let mut tables = Vec::with_capacity(b);
        for (i, &l) in lens.iter().enumerate() {
            if l == 0 || l > kv.table_stride {
                return Err(Error::OutOfRange(format!(
                    "host-tier decode request {i}: length {l} (table row holds {})",
                    kv.table_stride
                )));
            }
            let t = &kv.table_host[i * kv.table_stride..i * kv.table_stride + l];
            if let Some(&c) = t.iter().find(|&&c| c < 0 || c as usize >= kv.n_cells) {
                return Err(Error::OutOfRange(format!(
                    "host-tier decode request {i}: cell {c} outside the {} cells of the host K/V",
                    kv.n_cells
                )));
            }
            tables.push(t.iter().map(|&c| c as u32).collect::<Vec<u32>>());
        }
        self.gpu
            .ctx
            .bind_to_thread()
            .map_err(|e| gpu_err("bind the CUDA context to this thread", e))?;
        let gpu = self.gpu.on_stream(stream);
        let keep = matches!(tier, Some(t) if t.k == kv.k && t.n_cells == kv.n_cells && t.appends(req_ids, &tables));
        let mut built = 0;
        if keep {
            let t = tier.as_mut().unwrap();
            t.off.host.tables = tables;
            t.off.host.lens = lens.to_vec();
        } else {
            if tier.is_some() {
                // The old caches may still be read or filled by launches in
                // flight (this stream, their copy streams): wait, then free.
                cudarc::driver::result::ctx::synchronize()
                    .map_err(|e| gpu_err("context synchronize before a tier rebuild", e))?;
                *tier = None;
            }
            let lay = KvLayout {
                n_kv_heads: hkv,
                head_dim: d,
                page_size: 1,
            };
            let bytes = kv.n_cells * row * 2;
            let host = HostKv {
                k: PinnedBuf::borrowed(kv.k, bytes)?,
                v: PinnedBuf::borrowed(kv.v, bytes)?,
                layout: lay,
                dtype: kv.dtype,
                n_pages: kv.n_cells,
                // Full-length rows size the slot table for any length.
                tables: vec![vec![0; kv.n_cells]; b],
                lens: vec![0; b],
            };
            let full = full_device_route();
            // The full-device route admits up to the whole row cache a step
            // and scores the search's last right probe from the previous
            // level: the same selections and bits (gpu-test-offload), and
            // what brought bench-gpu-offload to 1.86x resident at 1M and
            // 2.6x at 4M (H100, 2026-12-05; 2.5x / 5.3x without).
            let mut est = if full {
                HostEstimation::with_admit_all(
                    &gpu,
                    &host,
                    cfg.estimation_rows,
                    true,
                    Admission::FullDevice,
                )?
            } else {
                HostEstimation::with_admission(
                    &gpu,
                    &host,
                    cfg.estimation_rows,
                    true,
                    Admission::Device,
                )?
            };
            if full {
                est.set_reuse_right(true)?;
            }
            let policy = if full {
                PagePolicy::Device
            } else {
                PagePolicy::Host
            };
            let mut off = OffloadKv::with_policy(&gpu, host, cfg.cache_cells * hkv, policy)?;
            off.host.tables = tables;
            off.host.lens = lens.to_vec();
            let stats = HostTierStats {
                device_bytes: off.device_bytes() + est.device_bytes(),
                host_bytes: 2 * bytes,
                ..Default::default()
            };
            *tier = Some(HostTier {
                off,
                est,
                k: kv.k,
                n_cells: kv.n_cells,
                seqs: req_ids.to_vec(),
                stats,
            });
            built = 1;
        }
        let t = tier.as_mut().unwrap();
        t.stats.rebuilds += built;
        t.stats.steps += 1;
        // Estimation reads the engine's device table and today's lengths.
        let ekv = &mut t.est.kv;
        ekv.table = DevBuf::borrowed(kv.table, b * kv.table_stride * 4);
        ekv.table_stride = kv.table_stride;
        ekv.lens = lens.to_vec();
        ekv.capacity = vec![kv.table_stride; b];

        let (shape, mul) = self.scaled_shape(sm_scale)?;
        self.convert_q(&gpu, q, b, mul)?;
        let rows: Vec<i32> = (0..b as i32).collect();
        t.est.wait_admission(&gpu)?;
        // The host tier attends over the cache cells of the selection's
        // ranges (read to the host below), not the sparse v2 tables.
        let (sel, max_tokens, _) = self.hip_select(
            &gpu,
            layer,
            &t.est.kv,
            req_ids,
            &rows,
            lens,
            t.est.score_module(),
            false,
        )?;
        let es = t.est.finish(&gpu)?;
        if b * max_tokens > cfg.cache_cells {
            return Err(Error::config(
                "kv.device_cache_pages",
                format!(
                    "{} cells per layer cannot hold this step's selection: {b} sequences x up to {max_tokens} cells",
                    cfg.cache_cells
                ),
            ));
        }
        t.stats.est_hits += es.cache.hits;
        t.stats.est_misses += es.cache.misses;
        t.stats.est_host_bytes += es.host_bytes_read;
        let Layer::Hip(h) = &self.layers[layer] else {
            unreachable!()
        };
        let pins: Vec<Vec<Range<usize>>> = lens
            .iter()
            .map(|&l| {
                let (sink, _, win) = regions(&h.cfg, l - 1);
                vec![sink, win]
            })
            .collect();
        let st = if t.off.policy == PagePolicy::Device {
            // Page policy on the device from the device selection: no
            // read-back, no host sync on the layer-step's path. Page ids
            // are the engine's cells, read from its device table.
            t.off.set_device_page_table(kv.table, kv.table_stride, b)?;
            t.off.prepare_device(&gpu, &sel, &pins)?
        } else {
            let sels = sel.to_host(hkv)?;
            t.off.prepare(&gpu, &sels, &pins)?
        };
        t.stats.cache.hits += st.cache.hits;
        t.stats.cache.misses += st.cache.misses;
        t.stats.cache.bytes_copied += st.cache.bytes_copied;
        t.stats.cache.evictions += st.cache.evictions;
        t.stats.blocks_needed += st.blocks_needed as u64;
        let ptrs = KvPtrs {
            k: t.off.slot_k.ptr,
            v: t.off.slot_v.ptr,
            table: t.off.slot_table.ptr,
            table_stride: t.off.stride,
            page_size: 1,
            dtype: kv.dtype,
        };
        let mut ws = std::mem::take(&mut self.ws);
        let r = launch_attention_ex(
            &gpu,
            &mut ws,
            &shape,
            "slot_",
            ptrs,
            KvStrides::pool(hkv, 1, d),
            self.qf.ptr,
            b,
            &sel,
            max_tokens,
            None,
            *out,
            1,
            0,
            0,
        );
        self.ws = ws;
        r?;
        t.off.attention_launched(&gpu)
    }
}
