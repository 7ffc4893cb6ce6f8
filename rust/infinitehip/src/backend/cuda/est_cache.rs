//! GPU mask estimation over keys in the host tier (DESIGN 3.5, issue 4).
//!
//! The scoring kernels of module `hip_mask_host` (kernels/hip_mask.cu with
//! kernels/hip_est_host.cuh prepended) look every probed key row up in a
//! bounded device row cache: an arena of `rows` key rows, an open-addressing
//! row -> slot table (a mirror of the host's `kv::RowSlotMap`), one CLOCK
//! reference byte per slot and a miss list. Hits read the arena; misses read
//! the row straight from the mapped pinned host tier (the same bits) and log
//! the row id. After the step (`finish`) the host merges the reference bits,
//! admits the logged misses by CLOCK (`kv::EstRowCache`) and launches ONE
//! `est_admit` kernel on a side stream that copies the admitted rows and
//! writes the changed table buckets; the next estimation waits for it,
//! attention does not. Device memory: arena + table + reference bytes + miss
//! list + the page table, whatever the context length. No managed memory.
//! The selections equal the all-on-device estimation's because every score
//! is computed from the same key bits in the same order.

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaStream, LaunchConfig, PushKernelArg};

use super::dispatch::{DeviceKv, HipGpuDecoder};
use super::offload::{HostKv, PinnedBuf};
use super::{gpu_err, DevBuf, GpuContext};
use crate::error::{Error, Result};
use crate::kv::{CacheStats, EstRowCache};

/// Device twin of `struct EstCache` (kernels/hip_est_host.cuh).
#[repr(C)]
#[derive(Clone, Copy)]
struct EstCacheDev {
    host_k: u64,
    arena: u64,
    map: u64,
    map_mask: u32,
    map_shift: u32,
    counters: u64,
    miss_list: u64,
    miss_cap: u32,
    pad: u32,
    refb: u64,
    miss_rows: u64,
}

/// Counters of one estimation step.
#[derive(Clone, Copy, Debug, Default)]
pub struct EstStep {
    /// Key-row reads through the cache: hits, misses, bytes admitted
    /// (`bytes_copied`), evictions.
    pub cache: CacheStats,
    /// Bytes the scoring kernels read from host memory (the misses).
    pub host_bytes_read: u64,
    pub rows_admitted: u64,
}

/// The bounded estimation row cache over a `HostKv`.
pub struct HostEstimation {
    /// What `HipGpuDecoder::select` reads: `k` holds the `EstCache`, the
    /// table is the host tier's page table (page ids of the host layout).
    pub kv: DeviceKv,
    _arena: DevBuf,
    map: DevBuf,
    refb: DevBuf,
    counters: DevBuf,
    miss_list: DevBuf,
    miss_cap: usize,
    /// `[miss_cap][head_dim]` staged copies of the step's missed rows.
    miss_rows: Option<DevBuf>,
    pub cache: EstRowCache,
    host_k: u64,
    row_bytes: usize,
    staging: PinnedBuf,
    side: Arc<CudaStream>,
    admitted: CudaEvent,
    /// Most rows admitted per step (default capacity / 2, at least 1024):
    /// bounds the host's admission time and the bus bytes of a step whose
    /// misses exceed the cache, and keeps most of the cache across such
    /// steps instead of flushing it.
    pub max_admit_per_step: usize,
}

impl HostEstimation {
    /// A row cache of `rows` key rows over `host`'s keys. `stage_misses`:
    /// missed rows are copied whole into a device staging area (as many
    /// rows as the cache, so twice its device bytes) and scored from there;
    /// admission then copies device -> device instead of re-reading the
    /// host. Without it, the scoring loop reads missed rows over the bus.
    pub fn new(gpu: &GpuContext, host: &HostKv, rows: usize, stage_misses: bool) -> Result<Self> {
        let lay = host.layout;
        let total_rows = host.n_pages as u64 * (lay.n_kv_heads * lay.page_size) as u64;
        if total_rows >= u32::MAX as u64 {
            return Err(Error::Invalid(format!(
                "estimation row cache: {total_rows} host key rows exceed the 32-bit row ids"
            )));
        }
        if rows > (1 << 30) {
            return Err(Error::config(
                "kv.estimation_cache_rows",
                format!("{rows} rows is too many"),
            ));
        }
        let cache = EstRowCache::new(rows);
        let row_bytes = lay.head_dim * 2;
        let arena = DevBuf::alloc(rows * row_bytes)?;
        let map = DevBuf::from_slice(&vec![u64::MAX; cache.map.buckets()])?;
        let refb = DevBuf::alloc(rows)?;
        refb.fill_bytes(0)?;
        let counters = DevBuf::from_slice(&[0u32; 4])?;
        let miss_cap = rows;
        let miss_list = DevBuf::alloc(miss_cap * 4)?;
        let miss_rows = if stage_misses {
            Some(DevBuf::alloc(miss_cap * row_bytes)?)
        } else {
            None
        };
        let dev = EstCacheDev {
            host_k: host.k.dev,
            arena: arena.ptr,
            map: map.ptr,
            map_mask: cache.map.mask(),
            map_shift: cache.map.shift(),
            counters: counters.ptr,
            miss_list: miss_list.ptr,
            miss_cap: miss_cap as u32,
            pad: 0,
            refb: refb.ptr,
            miss_rows: miss_rows.as_ref().map_or(0, |b| b.ptr),
        };
        let (table, stride) = host.device_table();
        let capacity: Vec<usize> = host
            .tables
            .iter()
            .map(|t| t.len() * lay.page_size)
            .collect();
        let kv = DeviceKv {
            k: DevBuf::from_slice(&[dev])?,
            v: DevBuf::alloc(16)?,
            table: DevBuf::from_slice(&table)?,
            table_stride: stride,
            page_size: lay.page_size,
            // Unused by the HIP_EST_HOST kernels (they address the host tier
            // through the row cache); the plugin page layout for completeness.
            page_stride: lay.page_elems(),
            head_stride: lay.page_size * lay.head_dim,
            n_kv_heads: lay.n_kv_heads,
            head_dim: lay.head_dim,
            dtype: host.dtype,
            lens: host.lens.clone(),
            capacity,
        };
        let side = gpu
            .ctx
            .new_stream()
            .map_err(|e| gpu_err("create admission stream", e))?;
        let admitted = gpu
            .ctx
            .new_event(None)
            .map_err(|e| gpu_err("create event", e))?;
        admitted
            .record(&side)
            .map_err(|e| gpu_err("record event", e))?;
        Ok(HostEstimation {
            kv,
            _arena: arena,
            map,
            refb,
            counters,
            miss_list,
            miss_cap,
            miss_rows,
            cache,
            host_k: host.k.dev,
            row_bytes,
            staging: PinnedBuf::alloc(1 << 16)?,
            side,
            admitted,
            max_admit_per_step: (rows / 2).max(1024).min(rows),
        })
    }

    /// Device bytes this path holds (arena, table, reference bytes, miss
    /// list, counters, page table).
    pub fn device_bytes(&self) -> usize {
        self._arena.bytes
            + self.map.bytes
            + self.refb.bytes
            + self.counters.bytes
            + self.miss_list.bytes
            + self.miss_rows.as_ref().map_or(0, |b| b.bytes)
            + self.kv.k.bytes
            + self.kv.table.bytes
    }

    /// Run `dec`'s estimation for the current lengths of `host` with keys
    /// read through the row cache. Call `finish` before the next `select`.
    pub fn select(
        &mut self,
        gpu: &GpuContext,
        dec: &mut HipGpuDecoder,
        host: &HostKv,
        q: u64,
        upload: bool,
    ) -> Result<usize> {
        if host.k.dev != self.host_k || host.lens.len() != self.kv.lens.len() {
            return Err(Error::Invalid(
                "estimation row cache used with another host tier".into(),
            ));
        }
        self.kv.lens.clone_from(&host.lens);
        gpu.stream
            .wait(&self.admitted)
            .map_err(|e| gpu_err("estimation wait for admission", e))?;
        dec.score_module = "hip_mask_host";
        let r = dec.select(gpu, &self.kv, q, upload);
        dec.score_module = "hip_mask";
        r
    }

    /// After `select`: read the step's counters and miss list (waits for
    /// the estimation), admit the misses by CLOCK and copy them in with one
    /// launch on the side stream (overlapping whatever the main stream runs
    /// next, e.g. attention).
    pub fn finish(&mut self, gpu: &GpuContext) -> Result<EstStep> {
        gpu.synchronize()?;
        let c: Vec<u32> = self.counters.read(4)?;
        let (hits, misses, logged) = (c[0] as u64, c[1] as u64, c[2] as usize);
        self.counters.write(&[0u32; 4])?;
        self.cache.record(hits, misses);
        let mut step = EstStep {
            cache: CacheStats {
                hits,
                misses,
                ..Default::default()
            },
            host_bytes_read: misses * self.row_bytes as u64,
            rows_admitted: 0,
        };
        let logged = logged.min(self.miss_cap);
        if logged == 0 {
            return Ok(step);
        }
        // Later stages' misses come last in the list and are re-read at
        // every refresh of their stage: admitted first (the list reversed).
        let mut rows: Vec<u32> = self.miss_list.read(logged)?;
        rows.reverse();
        let bits: Vec<u8> = self.refb.read(self.cache.capacity())?;
        self.refb.fill_bytes(0)?;
        self.cache.merge_referenced(&bits);
        let ev0 = self.cache.stats.evictions;
        let adm = self
            .cache
            .admit(&rows, self.row_bytes as u64, self.max_admit_per_step);
        let upd = self.cache.map.take_updates();
        step.rows_admitted = adm.len() as u64;
        step.cache.bytes_copied = adm.len() as u64 * self.row_bytes as u64;
        step.cache.evictions = self.cache.stats.evictions - ev0;
        if adm.is_empty() && upd.is_empty() {
            return Ok(step);
        }
        // The previous admission may still read the staging lists.
        self.admitted
            .synchronize()
            .map_err(|e| gpu_err("wait for the previous admission", e))?;
        let need = upd.len() * 16 + adm.len() * 8;
        if need > self.staging.bytes {
            self.staging = PinnedBuf::alloc(need.next_power_of_two())?;
        }
        let w64: Vec<u64> = upd.iter().flat_map(|&(b, e)| [b, e]).collect();
        // Source of each admitted row: its staged copy (its position in the
        // miss list, which `rows` holds reversed) or the host tier.
        let w32: Vec<u32> = if self.miss_rows.is_some() {
            adm.iter()
                .flat_map(|a| [(logged - 1 - a.index as usize) as u32, a.slot])
                .collect()
        } else {
            adm.iter().flat_map(|a| [a.row, a.slot]).collect()
        };
        let src = self.miss_rows.as_ref().map_or(self.host_k, |b| b.ptr);
        self.staging.write_at(0, &w64);
        self.staging.write_at(w64.len() * 8, &w32);
        let f = gpu.func("offload", "est_admit")?;
        let upd_ptr = self.staging.dev;
        let pairs_ptr = self.staging.dev + (w64.len() * 8) as u64;
        let (n, rv, nu) = (
            adm.len() as i32,
            (self.row_bytes / 16) as i32,
            upd.len() as i32,
        );
        let work = (adm.len() * self.row_bytes / 16).max(upd.len());
        let arena = self._arena.ptr;
        let mut l = self.side.launch_builder(&f);
        l.arg(&src)
            .arg(&arena)
            .arg(&pairs_ptr)
            .arg(&n)
            .arg(&rv)
            .arg(&self.map.ptr)
            .arg(&upd_ptr)
            .arg(&nu);
        unsafe {
            l.launch(LaunchConfig {
                grid_dim: (work.div_ceil(256).clamp(1, 2048) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(|e| gpu_err("launch est_admit", e))?;
        self.admitted
            .record(&self.side)
            .map_err(|e| gpu_err("record admission event", e))?;
        Ok(step)
    }
}
