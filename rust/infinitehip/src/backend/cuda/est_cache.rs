//! GPU mask estimation over keys in the host tier (DESIGN 3.5, issue 4).
//!
//! The scoring kernels of module `hip_mask_host` (kernels/hip_mask.cu with
//! kernels/hip_est_host.cuh prepended) look every probed key row up in a
//! bounded device row cache: an arena of `rows` key rows, an open-addressing
//! row -> slot table (a mirror of the host's `kv::RowSlotMap`), one CLOCK
//! reference byte per slot and a miss list. Hits read the arena; misses read
//! the row straight from the mapped pinned host tier (the same bits) and log
//! the row id. After the step (`finish`) the misses are admitted by CLOCK
//! with ONE launch on a side stream; the next estimation waits for it,
//! attention does not. Three ways to admit (`Admission`):
//! - `FullDevice` (new, opt-in until measured on a GPU): all of it on the device, no read-back and no host
//!   work on the step's path: `ea_*` kernels (kernels/offload.cu) dedup the
//!   miss list, pick victims by CLOCK over the reference bytes, update the
//!   table and copy the rows, seven launches on the side stream. Same
//!   choices as `Device` (CPU twin `kv::DeviceAdmissionTwin`, tested
//!   equal to `dedup_rows` + `ClockBits`). Counters reach the host through
//!   mapped memory a step late (`sync_stats` waits). Device memory: + 4 B
//!   per host key row (last miss position, for the dedup) + 12 B per slot.
//! - `Device` (default): the table lives on the device only. The host reads
//!   back the miss list, drops duplicates, and picks victim slots with
//!   `kv::ClockBits`, which reads the reference bits packed (one bit a slot)
//!   and only for the words the hand is about to pass; `est_admit_dev`
//!   removes the victims' old rows, inserts the new ones and copies them.
//!   Host work per step is O(misses + slots swept / 64), not O(cache).
//! - `Host` (the earlier path, kept for comparison): the host holds the
//!   table (`kv::EstRowCache`), reads and merges one reference byte per slot
//!   every step, and uploads the changed buckets.
//!
//! Either way the scores never depend on admission: a row that is not
//! admitted (overflow, limits) is read from the host tier again, the same
//! bits. Device memory: arena + table + reference bytes + miss list (+
//! staging, + the slot holders) + the page table, whatever the context
//! length. No managed memory.
//! The selections equal the all-on-device estimation's because every score
//! is computed from the same key bits in the same order.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaEvent, CudaStream, LaunchConfig, PushKernelArg};

use super::dispatch::{DeviceKv, HipGpuDecoder};
use super::offload::{HostKv, PinnedBuf};
use super::{gpu_err, DevBuf, GpuContext};
use crate::config::KvConfig;
use crate::error::{Error, Result};
use crate::kv::{dedup_rows, CacheStats, ClockBits, EstRowCache, EMPTY_ROW};

/// Who keeps the row -> slot table and runs the admission (module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Device,
    FullDevice,
    Host,
}

/// Device state of `Admission::FullDevice` (kernels/offload.cu `ea_*`).
struct DevAdmission {
    /// `[host key rows]` last miss-list position + 1 (0: none; reset each step).
    last: DevBuf,
    urow: DevBuf,
    upos: DevBuf,
    victim: DevBuf,
    dcnt: DevBuf,
    ccnt: DevBuf,
    cpre: DevBuf,
    /// See `ea_*`: unique, taken, hand, full turn, evictions, tombstones, new hand, done.
    adm: DevBuf,
    /// Cumulative hits, misses, unlogged, admitted, evictions, rebuilds, steps (mapped).
    stats: PinnedBuf,
    seen: [u64; 7],
    pieces: usize,
    chunk: usize,
    est_done: CudaEvent,
    /// Timing events around the last admission on the side stream.
    t_start: CudaEvent,
    t_end: CudaEvent,
}

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
    stage_cap: u32,
    refb: u64,
    miss_rows: u64,
    fetch_warp: u32,
    /// `EST_REUSE_RIGHT` (1) / `EST_REUSE_UNSOUND` (2), kernels/hip_est_host.cuh.
    flags: u32,
    /// Pinned region (`set_pinned`): arena, per-page valid bytes, page
    /// offsets pinned, their count.
    pin_arena: u64,
    pin_valid: u64,
    pin_mask: u64,
    pin_n: u32,
    pad2: u32,
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
    /// Misses the miss list could not keep (past its end: dropped under
    /// host admission, overwritten in the ring part under device
    /// admission); read from the host tier as every miss, not admitted.
    pub misses_unlogged: u64,
    /// Host time of `finish`, split (ms).
    pub prof: EstProfile,
}

/// Where `finish`'s host time goes (ms).
#[derive(Clone, Copy, Debug, Default)]
pub struct EstProfile {
    /// Counters and miss list read back (includes waiting for the kernels).
    pub readback: f64,
    /// Reference bits: read + merge (Host) or window packs + loads (Device).
    pub refbits: f64,
    /// Dedup + CLOCK victim choice + table bookkeeping.
    pub clock: f64,
    /// Staging lists + launches.
    pub launch: f64,
    /// Device-side table rebuilds launched.
    pub rebuilds: u32,
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
    /// Host-admission state (`Admission::Host`).
    pub cache: EstRowCache,
    pub admission: Admission,
    /// Device-admission state: CLOCK hand + merged reference bits.
    pub clock: ClockBits,
    /// `[rows]` row id each slot holds (not `Admission::Host`).
    holder: Option<DevBuf>,
    /// Packed reference bits of one window (mapped pinned).
    refwin: PinnedBuf,
    /// `Admission::FullDevice` state.
    dev_adm: Option<DevAdmission>,
    /// Tombstones in the device table since the last rebuild (upper bound).
    tombs: usize,
    /// A step may admit up to the whole cache (`with_admit_all`).
    admit_all: bool,
    /// Pinned region (`set_pinned`): `[host page][hkv][pin_n][D]` rows and
    /// one valid byte per host page; which pages hold their rows (host copy).
    pin: Option<(DevBuf, DevBuf)>,
    pin_pages: Vec<bool>,
    /// Mutation checks only: pinned rows copied from the next page offset.
    pub pin_unsound_for_tests: bool,
    /// Staged rows: the first `stage_cap` misses of a step.
    stage_cap: usize,
    /// The `EstCache` uploaded in `kv.k` (kept to flip `fetch_warp`).
    desc: EstCacheDev,
    /// Scoring kernels' module: `hip_mask_host`, or `hip_mask_host_pl`
    /// (`set_row_preload`).
    module: &'static str,
    /// The last `select` refreshed no stage (scored no key): its `finish`
    /// has nothing to admit and launches nothing (`FullDevice`).
    idle_step: bool,
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
        Self::with_admission(gpu, host, rows, stage_misses, Admission::Device)
    }

    /// A row cache sized by `kv.estimation_cache_rows` (rows per layer;
    /// None or 0: the smallest cache, 16 rows, i.e. practically every read
    /// goes to the host tier), staged misses, device admission.
    pub fn from_config(gpu: &GpuContext, host: &HostKv, kv: &KvConfig) -> Result<Self> {
        let rows = kv.estimation_cache_rows.unwrap_or(0).max(16);
        Self::with_admission(gpu, host, rows, true, Admission::Device)
    }

    pub fn with_admission(
        gpu: &GpuContext,
        host: &HostKv,
        rows: usize,
        stage_misses: bool,
        admission: Admission,
    ) -> Result<Self> {
        Self::build(gpu, host, rows, stage_misses, admission, false)
    }

    /// `with_admission` whose admission may fill the whole cache in one
    /// step (`max_admit_per_step` = the capacity) instead of half of it,
    /// with a row -> slot table of twice the buckets so that the table's
    /// fill stays below 5/8 (live <= 1/4, tombstones <= 1/8 before the
    /// step's rebuild check + 1/4 of the step's evictions), and the
    /// admission's row / victim lists sized for the whole cache.
    /// `Admission::FullDevice` only. Why: with half the cache a step, a cold cache
    /// needs several stage-0 refreshes to take in one refresh's probed
    /// rows (`sim-est-rows`: at 1M tokens with a 25% row cache the first
    /// refresh after a cold one misses 511K rows instead of 196K).
    /// Device memory: + 8 B x 2 x the table's buckets.
    pub fn with_admit_all(
        gpu: &GpuContext,
        host: &HostKv,
        rows: usize,
        stage_misses: bool,
        admission: Admission,
    ) -> Result<Self> {
        if admission != Admission::FullDevice {
            return Err(Error::Invalid(
                "estimation row cache: admit-all is built for the full-device admission only"
                    .into(),
            ));
        }
        Self::build(gpu, host, rows, stage_misses, admission, true)
    }

    fn build(
        gpu: &GpuContext,
        host: &HostKv,
        rows: usize,
        stage_misses: bool,
        admission: Admission,
        admit_all: bool,
    ) -> Result<Self> {
        let lay = host.layout;
        let total_rows = host.n_pages as u64 * (lay.n_kv_heads * lay.page_size) as u64;
        // Row ids 0xffffffff (empty) and 0xfffffffe (tombstone) are reserved.
        if total_rows >= (u32::MAX - 1) as u64 {
            return Err(Error::Invalid(format!(
                "estimation row cache: {total_rows} host key rows exceed the 32-bit row ids"
            )));
        }
        if !(16..=(1 << 30)).contains(&rows) {
            return Err(Error::config(
                "kv.estimation_cache_rows",
                format!("{rows} rows: must be in 16..=2^30"),
            ));
        }
        let device = admission != Admission::Host;
        // The host table only for host admission (same bucket count).
        let cache = EstRowCache::new(if device { 0 } else { rows });
        let map_buckets =
            crate::kv::RowSlotMap::new(if admit_all { 2 * rows } else { rows }).buckets();
        let (map_mask, map_shift) = ((map_buckets - 1) as u32, 32 - map_buckets.trailing_zeros());
        let clock = ClockBits::new(if admission == Admission::Device {
            rows
        } else {
            0
        });
        let row_bytes = lay.head_dim * 2;
        let arena = DevBuf::alloc(rows * row_bytes)?;
        let map = DevBuf::alloc(map_buckets * 8)?;
        map.fill_bytes(0xff)?;
        // Padded to whole 64-slot words (est_ref_pack reads 64 bytes a word).
        let refb = DevBuf::alloc(rows.div_ceil(64) * 64)?;
        refb.fill_bytes(0)?;
        let counters = DevBuf::from_slice(&[0u32; 4])?;
        // Device admission logs more misses than it stages (4 bytes each),
        // and past the staged prefix the list is a ring (hip_est_host.cuh),
        // so a step whose misses overflow it still admits its later stages'
        // rows (read from the host tier).
        // Device admission takes at most half the cache a step, so half the
        // cache of staging holds every row a step can admit unless the
        // step's misses exceed that (then the later ones are read from the
        // host tier, as past the staging before). Host admission stages all.
        let stage_cap = if device { (rows / 2).max(16) } else { rows };
        let miss_cap = if device { 2 * rows + 4096 } else { rows };
        let miss_list = DevBuf::alloc(miss_cap * 4)?;
        let miss_rows = if stage_misses {
            Some(DevBuf::alloc(stage_cap * row_bytes)?)
        } else {
            None
        };
        let dev = EstCacheDev {
            host_k: host.k.dev,
            arena: arena.ptr,
            map: map.ptr,
            map_mask,
            map_shift,
            counters: counters.ptr,
            miss_list: miss_list.ptr,
            miss_cap: miss_cap as u32,
            stage_cap: stage_cap as u32,
            refb: refb.ptr,
            miss_rows: miss_rows.as_ref().map_or(0, |b| b.ptr),
            fetch_warp: 1,
            flags: 0,
            pin_arena: 0,
            pin_valid: 0,
            pin_mask: 0,
            pin_n: 0,
            pad2: 0,
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
            admission,
            clock,
            holder: if device {
                let h = DevBuf::alloc(rows * 4)?;
                h.fill_bytes(0xff)?;
                Some(h)
            } else {
                None
            },
            refwin: PinnedBuf::alloc(if admission == Admission::Device {
                rows.div_ceil(64) * 8
            } else {
                16
            })?,
            dev_adm: if admission == Admission::FullDevice {
                Some(DevAdmission::new(
                    gpu,
                    total_rows as usize,
                    rows,
                    if admit_all { rows } else { rows / 2 },
                )?)
            } else {
                None
            },
            tombs: 0,
            admit_all,
            pin: None,
            pin_pages: Vec::new(),
            pin_unsound_for_tests: false,
            stage_cap,
            desc: dev,
            module: "hip_mask_host",
            idle_step: false,
            host_k: host.k.dev,
            row_bytes,
            staging: PinnedBuf::alloc(1 << 16)?,
            side,
            admitted,
            // Device admission: at most half the cache per step, which also
            // bounds the table's fill (live + tombstones) below 7/8.
            max_admit_per_step: if admit_all {
                rows
            } else if device {
                rows / 2
            } else {
                (rows / 2).max(1024).min(rows)
            },
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
            + self.holder.as_ref().map_or(0, |b| b.bytes)
            + self.dev_adm.as_ref().map_or(0, |d| d.bytes())
            + self.pin.as_ref().map_or(0, |(a, v)| a.bytes + v.bytes)
    }

    /// How the scoring kernels stage missed rows: `true` (default): a full
    /// warp fetches its missed rows together, `D/8` lanes per row side by
    /// side (coalesced 16-byte loads, all in flight before the first
    /// store); `false`: each thread copies its own row (the earlier path).
    /// Same bits either way.
    pub fn set_fetch_warp(&mut self, on: bool) -> Result<()> {
        self.desc.fetch_warp = on as u32;
        self.kv.k.write(&[self.desc])
    }

    pub fn fetch_warp(&self) -> bool {
        self.desc.fetch_warp != 0
    }

    /// Whether a step may admit up to the whole cache (`with_admit_all`).
    pub fn admit_all(&self) -> bool {
        self.admit_all
    }

    /// The search's last-level right probe scored from the previous level's
    /// choice instead of read again (`true`), as `hip_scorew` does: one key
    /// row fewer per searched sub-chunk of 2^k tokens, the same scores and
    /// selections (kernels/hip_mask.cu `hip_score` under HIP_EST_HOST; CPU
    /// reference `est_sim::search_probes_reuse`). `false`: every probe
    /// read (the earlier path).
    pub fn set_reuse_right(&mut self, on: bool) -> Result<()> {
        self.desc.flags = (self.desc.flags & !1) | on as u32;
        self.kv.k.write(&[self.desc])
    }

    pub fn reuse_right(&self) -> bool {
        self.desc.flags & 1 != 0
    }

    /// Rows a pinned region of page offsets `mask` holds over `host`.
    pub fn pinned_rows(host: &HostKv, mask: u64) -> usize {
        host.n_pages * host.layout.n_kv_heads * mask.count_ones() as usize
    }

    /// Pin the rows at page offsets `mask` (bit o: offset o of every host
    /// page; `est_sim::pin_page_mask` gives stage 0's upper search levels):
    /// a region beside the arena holds them for every complete page
    /// (`pin_sync` adds pages as they fill), the scoring kernels read them
    /// without a table lookup, and they are never evicted: admission and
    /// CLOCK run over the arena's slots only, so a caller keeping a row
    /// budget builds the cache with `budget - pinned_rows` rows. 0 removes
    /// the region. The rows are copied from the host tier (the same bits),
    /// so scores and selections do not change. The KV must be append-only
    /// while pinned (a page's rows are copied once, when it is complete).
    pub fn set_pinned(&mut self, host: &HostKv, mask: u64) -> Result<()> {
        let lay = host.layout;
        if host.k.dev != self.host_k {
            return Err(Error::Invalid(
                "estimation row cache pinned over another host tier".into(),
            ));
        }
        if mask != 0 && (lay.page_size > 64 || (lay.page_size < 64 && mask >> lay.page_size != 0)) {
            return Err(Error::Invalid(format!(
                "pinned page offsets {mask:#x} outside pages of {} tokens",
                lay.page_size
            )));
        }
        self.pin = None;
        self.pin_pages.clear();
        let n = mask.count_ones() as usize;
        if mask == 0 {
            self.desc.pin_arena = 0;
            self.desc.pin_valid = 0;
            self.desc.pin_mask = 0;
            self.desc.pin_n = 0;
            return self.kv.k.write(&[self.desc]);
        }
        let arena = DevBuf::alloc(Self::pinned_rows(host, mask) * self.row_bytes)?;
        let valid = DevBuf::alloc(host.n_pages.max(1))?;
        valid.fill_bytes(0)?;
        self.desc.pin_arena = arena.ptr;
        self.desc.pin_valid = valid.ptr;
        self.desc.pin_mask = mask;
        self.desc.pin_n = n as u32;
        self.pin = Some((arena, valid));
        self.pin_pages = vec![false; host.n_pages];
        self.kv.k.write(&[self.desc])?;
        self.pin_sync(host).map(drop)
    }

    /// Copy the pinned rows of host pages that became complete since the
    /// last call (every sequence's pages below its length), then mark them
    /// valid. Returns how many pages were added. No-op without a region.
    pub fn pin_sync(&mut self, host: &HostKv) -> Result<usize> {
        let Some((arena, valid)) = self.pin.as_ref() else {
            return Ok(0);
        };
        let lay = host.layout;
        let (hkv, ps, d) = (lay.n_kv_heads, lay.page_size, self.row_bytes / 2);
        let mask = self.desc.pin_mask;
        let offs: Vec<usize> = (0..ps).filter(|&o| mask >> o & 1 == 1).collect();
        let mut pages: Vec<usize> = Vec::new();
        for (b, table) in host.tables.iter().enumerate() {
            let full = host.lens.get(b).copied().unwrap_or(0) / ps;
            for &pg in &table[..full.min(table.len())] {
                let pg = pg as usize;
                if pg < self.pin_pages.len() && !self.pin_pages[pg] {
                    pages.push(pg);
                }
            }
        }
        pages.sort_unstable();
        pages.dedup();
        let hk = host.k.as_u16();
        let per_page = hkv * offs.len() * d;
        let mut i = 0;
        while i < pages.len() {
            // A run of consecutive page ids: one copy.
            let mut j = i + 1;
            while j < pages.len() && pages[j] == pages[j - 1] + 1 {
                j += 1;
            }
            let mut buf: Vec<u16> = Vec::with_capacity((j - i) * per_page);
            for &pg in &pages[i..j] {
                for h in 0..hkv {
                    for &o in &offs {
                        let o = if self.pin_unsound_for_tests {
                            (o + 1) % ps
                        } else {
                            o
                        };
                        let r = ((pg * hkv + h) * ps + o) * d;
                        buf.extend_from_slice(&hk[r..r + d]);
                    }
                }
            }
            arena.write_at(pages[i] * per_page * 2, &buf)?;
            valid.write_at(pages[i], &vec![1u8; j - i])?;
            for &pg in &pages[i..j] {
                self.pin_pages[pg] = true;
            }
            i = j;
        }
        Ok(pages.len())
    }

    /// Host pages whose pinned rows are in the region.
    pub fn pinned_pages(&self) -> usize {
        self.pin_pages.iter().filter(|&&x| x).count()
    }

    /// Mutation checks only: reuse the previous level's score at every
    /// level after the first (wrong scores: selections must differ).
    pub fn set_reuse_unsound_for_tests(&mut self, on: bool) -> Result<()> {
        self.desc.flags = (self.desc.flags & !2) | ((on as u32) << 1);
        self.kv.k.write(&[self.desc])
    }

    /// Scoring kernels that load each probed row's 16-byte vectors all at
    /// once before using them (module `hip_mask_host_pl`) instead of the
    /// reference loop's two at a time (`hip_mask_host`). Same bits.
    pub fn set_row_preload(&mut self, on: bool) {
        self.module = if on {
            "hip_mask_host_pl"
        } else {
            "hip_mask_host"
        };
    }

    /// The module of the scoring kernels (for callers that run the stages
    /// themselves over `kv`).
    pub fn score_module(&self) -> &'static str {
        self.module
    }

    /// Rows the cache holds (its capacity).
    pub fn capacity(&self) -> usize {
        self._arena.bytes / self.row_bytes
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
        // A step that refreshes no stage probes no key row (it reads
        // nothing the admission writes): it need not wait for it, so an
        // admission launched late (after the previous step's attention)
        // overlaps such steps.
        if Self::scores(dec) {
            gpu.stream
                .wait(&self.admitted)
                .map_err(|e| gpu_err("estimation wait for admission", e))?;
        }
        dec.score_module = self.module;
        let r = dec.select(gpu, &self.kv, q, upload);
        dec.score_module = "hip_mask";
        // No stage refreshed: no key was probed, no miss logged.
        self.idle_step = matches!(r, Ok(from) if from >= dec.cfg.stages.len());
        r
    }

    /// Whether `dec`'s next `select` refreshes a stage (probes key rows,
    /// so must wait for the last admission).
    pub fn scores(dec: &HipGpuDecoder) -> bool {
        dec.refresh_from() < dec.cfg.stages.len()
    }

    /// Make `gpu.stream` wait for the last admission (what `select` does
    /// first when it scores), for callers that launch the scoring kernels
    /// themselves.
    pub fn wait_admission(&self, gpu: &GpuContext) -> Result<()> {
        gpu.stream
            .wait(&self.admitted)
            .map_err(|e| gpu_err("estimation wait for admission", e))
    }

    /// After `select`: read the step's counters and miss list (waits for
    /// the estimation), admit the misses by CLOCK and copy them in with one
    /// launch on the side stream (overlapping whatever the main stream runs
    /// next, e.g. attention).
    pub fn finish(&mut self, gpu: &GpuContext) -> Result<EstStep> {
        if self.admission == Admission::FullDevice {
            return self.finish_device(gpu);
        }
        let t0 = Instant::now();
        gpu.synchronize()?;
        let c: Vec<u32> = self.counters.read(4)?;
        let (hits, misses, listed) = (c[0] as u64, c[1] as u64, c[2] as usize);
        self.counters.write(&[0u32; 4])?;
        let logged = listed.min(self.miss_cap);
        let mut step = EstStep {
            cache: CacheStats {
                hits,
                misses,
                ..Default::default()
            },
            host_bytes_read: misses * self.row_bytes as u64,
            misses_unlogged: (listed - logged) as u64,
            ..Default::default()
        };
        if self.admission == Admission::Host {
            self.cache.record(hits, misses);
        } else {
            self.cache.stats.hits += hits;
            self.cache.stats.misses += misses;
        }
        if logged == 0 {
            step.prof.readback = ms(t0);
            return Ok(step);
        }
        // Later stages' misses come last in the list and are re-read at
        // every refresh of their stage: admitted first (the list reversed).
        let mut rows: Vec<u32> = self.miss_list.read(logged)?;
        rows.reverse();
        step.prof.readback = ms(t0);
        match self.admission {
            Admission::Host => self.admit_host(gpu, &rows, logged, &mut step)?,
            Admission::Device => self.admit_device(gpu, &rows, logged, &mut step)?,
            Admission::FullDevice => unreachable!("finish_device"),
        }
        Ok(step)
    }

    /// `Admission::FullDevice`: the whole admission as seven launches on the
    /// side stream after the estimation (no wait, no read-back). Returns the
    /// counters the device finished since the last call (a step late).
    fn finish_device(&mut self, gpu: &GpuContext) -> Result<EstStep> {
        let t0 = Instant::now();
        let mut step = self.collect_dev_stats(false)?;
        // A step that scored no key (`select` refreshed no stage: three of
        // four decode steps with the default hip schedule) has an empty
        // miss list and no reference bits set: the seven launches would
        // admit nothing, move no hand and rebuild nothing, so skip them
        // (and their ~0.03 ms of host launch time on the step's path).
        if std::mem::take(&mut self.idle_step) {
            step.prof.launch = ms(t0);
            return Ok(step);
        }
        let cap = self.capacity();
        let max_admit = self
            .max_admit_per_step
            .min(if self.admit_all { cap } else { cap / 2 }) as i32;
        let holder = self.holder.as_ref().map_or(0, |h| h.ptr);
        let staged = self.miss_rows.as_ref().map_or(0, |b| b.ptr);
        let stage_cap = if staged != 0 {
            self.stage_cap as i32
        } else {
            0
        };
        let (mask, shift) = (self.kv_map_mask(), self.kv_map_shift());
        let buckets = (self.map.bytes / 8) as i64;
        let lim = (buckets / 8) as u32;
        let (miss_cap, cap_i, rv) = (
            self.miss_cap as i32,
            cap as i32,
            (self.row_bytes / 16) as i32,
        );
        let (list, counters, refb) = (self.miss_list.ptr, self.counters.ptr, self.refb.ptr);
        let (arena, map, hk) = (self._arena.ptr, self.map.ptr, self.host_k);
        let d = self.dev_adm.as_ref().unwrap();
        d.est_done
            .record(&gpu.stream)
            .map_err(|e| gpu_err("record estimation event", e))?;
        self.side
            .wait(&d.est_done)
            .map_err(|e| gpu_err("admission wait for estimation", e))?;
        d.t_start
            .record(&self.side)
            .map_err(|e| gpu_err("record admission start", e))?;
        let (g, c) = (d.pieces as i32, d.chunk as i32);
        let nchunks = cap.div_ceil(d.chunk) as i32;
        let wide = (gpu.sm_count as u32 * 4).clamp(4, 1024);
        let side = &self.side;
        // One launch on the side stream: kernel, grid, block, arguments.
        macro_rules! launch {
            ($name:expr, $grid:expr, $block:expr, [$($a:expr),* $(,)?]) => {{
                let f = gpu.func("offload", $name)?;
                let mut l = side.launch_builder(&f);
                $(l.arg($a);)*
                unsafe {
                    l.launch(LaunchConfig {
                        grid_dim: (($grid as u32).max(1), 1, 1),
                        block_dim: ($block, 1, 1),
                        shared_mem_bytes: 0,
                    })
                }
                .map_err(|e| gpu_err(concat!("launch ", $name), e))?;
            }};
        }
        launch!(
            "ea_mark",
            wide,
            256,
            [&list, &counters, &miss_cap, &d.last.ptr]
        );
        launch!(
            "ea_count",
            g + nchunks,
            512,
            [
                &list,
                &counters,
                &miss_cap,
                &d.last.ptr,
                &g,
                &d.dcnt.ptr,
                &refb,
                &cap_i,
                &d.adm.ptr,
                &c,
                &d.ccnt.ptr
            ]
        );
        launch!(
            "ea_scatter",
            g + 1,
            512,
            [
                &list,
                &counters,
                &miss_cap,
                &d.last.ptr,
                &g,
                &d.dcnt.ptr,
                &max_admit,
                &d.urow.ptr,
                &d.upos.ptr,
                &d.ccnt.ptr,
                &nchunks,
                &d.cpre.ptr,
                &d.adm.ptr
            ]
        );
        launch!(
            "ea_take",
            nchunks,
            512,
            [&refb, &cap_i, &c, &d.cpre.ptr, &d.adm.ptr, &d.victim.ptr]
        );
        launch!(
            "ea_admit",
            wide * 2,
            256,
            [
                &staged,
                &hk,
                &arena,
                &d.urow.ptr,
                &d.upos.ptr,
                &d.victim.ptr,
                &d.adm.ptr,
                &stage_cap,
                &rv,
                &holder,
                &map,
                &mask,
                &shift,
                &list,
                &counters,
                &miss_cap,
                &d.last.ptr
            ]
        );
        launch!("ea_clear", wide, 256, [&map, &buckets, &d.adm.ptr, &lim]);
        launch!(
            "ea_rebuild",
            wide,
            256,
            [
                &holder,
                &cap_i,
                &map,
                &mask,
                &shift,
                &d.adm.ptr,
                &lim,
                &counters,
                &miss_cap,
                &d.stats.dev
            ]
        );
        d.t_end
            .record(&self.side)
            .map_err(|e| gpu_err("record admission end", e))?;
        self.admitted
            .record(&self.side)
            .map_err(|e| gpu_err("record admission event", e))?;
        step.prof.launch = ms(t0);
        Ok(step)
    }

    /// `Admission::FullDevice`: device time (ms) of the last admission's
    /// seven launches on the side stream (waits for it); None otherwise.
    pub fn last_admission_ms(&self) -> Result<Option<f32>> {
        match &self.dev_adm {
            Some(d) => d
                .t_start
                .elapsed_ms(&d.t_end)
                .map(Some)
                .map_err(|e| gpu_err("admission timing", e)),
            None => Ok(None),
        }
    }

    /// `Admission::FullDevice`: wait for the pending admission and return the
    /// counters not returned yet (other admissions: nothing pending).
    pub fn sync_stats(&mut self) -> Result<EstStep> {
        if self.dev_adm.is_none() {
            return Ok(EstStep::default());
        }
        self.admitted
            .synchronize()
            .map_err(|e| gpu_err("wait for admission", e))?;
        self.collect_dev_stats(true)
    }

    fn collect_dev_stats(&mut self, _waited: bool) -> Result<EstStep> {
        let rb = self.row_bytes as u64;
        let d = self.dev_adm.as_mut().unwrap();
        let now: [u64; 7] = std::array::from_fn(|i| d.stats.read_u64(i));
        let dl: [u64; 7] = std::array::from_fn(|i| now[i].saturating_sub(d.seen[i]));
        d.seen = now;
        self.cache.stats.hits += dl[0];
        self.cache.stats.misses += dl[1];
        self.cache.stats.bytes_copied += dl[3] * rb;
        self.cache.stats.evictions += dl[4];
        Ok(EstStep {
            cache: CacheStats {
                hits: dl[0],
                misses: dl[1],
                bytes_copied: dl[3] * rb,
                evictions: dl[4],
            },
            host_bytes_read: dl[1] * rb,
            rows_admitted: dl[3],
            misses_unlogged: dl[2],
            prof: EstProfile {
                rebuilds: dl[5] as u32,
                ..Default::default()
            },
        })
    }

    /// `Admission::Device`: victims by `ClockBits` (packed reference bits,
    /// loaded a window at a time), table + copies by `est_admit_dev`.
    fn admit_device(
        &mut self,
        gpu: &GpuContext,
        rows: &[u32],
        logged: usize,
        step: &mut EstStep,
    ) -> Result<()> {
        let t0 = Instant::now();
        let uniq = dedup_rows(rows);
        let n = uniq.len().min(self.max_admit_per_step);
        let mut t_ref = 0.0;
        let (ref_ptr, n_words) = (self.refb.ptr, self.clock.words());
        let win = &mut self.refwin;
        let pack = gpu.func("offload", "est_ref_pack")?;
        let stream = &gpu.stream;
        let take = self
            .clock
            .take(n, |w0, nw, out: &mut [u64]| -> Result<()> {
                let tl = Instant::now();
                let (w0i, nwi, nall) = (w0 as i32, nw as i32, n_words as i32);
                let mut l = stream.launch_builder(&pack);
                l.arg(&ref_ptr).arg(&w0i).arg(&nwi).arg(&nall).arg(&win.dev);
                unsafe {
                    l.launch(LaunchConfig {
                        grid_dim: (nw.div_ceil(256).clamp(1, 1024) as u32, 1, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    })
                }
                .map_err(|e| gpu_err("launch est_ref_pack", e))?;
                stream
                    .synchronize()
                    .map_err(|e| gpu_err("wait for est_ref_pack", e))?;
                out.copy_from_slice(&win.as_u64()[..nw]);
                t_ref += ms(tl);
                Ok(())
            })?;
        step.prof.refbits = t_ref;
        let k = take.slots.len();
        step.rows_admitted = k as u64;
        step.cache.bytes_copied = (k * self.row_bytes) as u64;
        step.cache.evictions = take.evicted as u64;
        self.cache.stats.bytes_copied += step.cache.bytes_copied;
        self.cache.stats.evictions += step.cache.evictions;
        if k == 0 {
            step.prof.clock = ms(t0) - t_ref;
            return Ok(());
        }
        // Triples (row, slot, staged index or EMPTY_ROW: from the host tier).
        let staged = self.miss_rows.is_some();
        let mut tri: Vec<u32> = Vec::with_capacity(3 * k);
        for (&(row, pos), &slot) in uniq[..k].iter().zip(&take.slots) {
            // Position in the device list (`rows` is it reversed).
            let p = logged - 1 - pos as usize;
            let si = if staged && p < self.stage_cap {
                p as u32
            } else {
                EMPTY_ROW
            };
            tri.extend_from_slice(&[row, slot, si]);
        }
        step.prof.clock = ms(t0) - t_ref;
        let tl = Instant::now();
        // The previous admission may still read the staging list.
        self.admitted
            .synchronize()
            .map_err(|e| gpu_err("wait for the previous admission", e))?;
        if tri.len() * 4 > self.staging.bytes {
            self.staging = PinnedBuf::alloc((tri.len() * 4).next_power_of_two())?;
        }
        self.staging.write_at(0, &tri);
        let holder = self.holder.as_ref().map_or(0, |h| h.ptr);
        let src = self.miss_rows.as_ref().map_or(self.host_k, |b| b.ptr);
        let (mask, shift) = (self.kv_map_mask(), self.kv_map_shift());
        let f = gpu.func("offload", "est_admit_dev")?;
        let (ni, rv) = (k as i32, (self.row_bytes / 16) as i32);
        let arena = self._arena.ptr;
        let mut l = self.side.launch_builder(&f);
        l.arg(&src)
            .arg(&self.host_k)
            .arg(&arena)
            .arg(&self.staging.dev)
            .arg(&ni)
            .arg(&rv)
            .arg(&holder)
            .arg(&self.map.ptr)
            .arg(&mask)
            .arg(&shift);
        unsafe {
            l.launch(LaunchConfig {
                grid_dim: ((k * 32).div_ceil(256).clamp(1, 4096) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(|e| gpu_err("launch est_admit_dev", e))?;
        // Tombstones are never reused: rebuild the table from the holders
        // once they exceed 1/8 of the buckets (live rows fill at most 1/2).
        self.tombs += take.evicted;
        let buckets = self.map.bytes / 8;
        if self.tombs > buckets / 8 {
            self.tombs = 0;
            step.prof.rebuilds += 1;
            let clear = gpu.func("offload", "est_map_clear")?;
            let nb = buckets as i64;
            let mut l = self.side.launch_builder(&clear);
            l.arg(&self.map.ptr).arg(&nb);
            unsafe {
                l.launch(LaunchConfig {
                    grid_dim: (buckets.div_ceil(256).clamp(1, 4096) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(|e| gpu_err("launch est_map_clear", e))?;
            let rebuild = gpu.func("offload", "est_map_rebuild")?;
            let cap = self.clock.capacity() as i32;
            let mut l = self.side.launch_builder(&rebuild);
            l.arg(&holder)
                .arg(&cap)
                .arg(&self.map.ptr)
                .arg(&mask)
                .arg(&shift);
            unsafe {
                l.launch(LaunchConfig {
                    grid_dim: ((cap as usize).div_ceil(256).clamp(1, 4096) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(|e| gpu_err("launch est_map_rebuild", e))?;
        }
        self.admitted
            .record(&self.side)
            .map_err(|e| gpu_err("record admission event", e))?;
        step.prof.launch = ms(tl);
        Ok(())
    }

    fn kv_map_mask(&self) -> u32 {
        (self.map.bytes / 8 - 1) as u32
    }
    fn kv_map_shift(&self) -> u32 {
        32 - (self.map.bytes / 8).trailing_zeros()
    }

    /// `Admission::Host`: the earlier path (host table, one reference byte
    /// per slot read back and merged every step, changed buckets uploaded).
    fn admit_host(
        &mut self,
        gpu: &GpuContext,
        rows: &[u32],
        logged: usize,
        step: &mut EstStep,
    ) -> Result<()> {
        let t0 = Instant::now();
        let bits: Vec<u8> = self.refb.read(self.cache.capacity())?;
        self.refb.fill_bytes(0)?;
        self.cache.merge_referenced(&bits);
        step.prof.refbits = ms(t0);
        let t1 = Instant::now();
        let ev0 = self.cache.stats.evictions;
        let adm = self
            .cache
            .admit(rows, self.row_bytes as u64, self.max_admit_per_step);
        let upd = self.cache.map.take_updates();
        step.rows_admitted = adm.len() as u64;
        step.cache.bytes_copied = adm.len() as u64 * self.row_bytes as u64;
        step.cache.evictions = self.cache.stats.evictions - ev0;
        step.prof.clock = ms(t1);
        if adm.is_empty() && upd.is_empty() {
            return Ok(());
        }
        let t2 = Instant::now();
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
        step.prof.launch = ms(t2);
        Ok(())
    }

    /// Check the device table against the arena and the host tier (tests):
    /// every row the table maps reads, from its slot, the host tier's bits;
    /// no row is mapped twice; no slot holds two rows. Returns the number
    /// of rows mapped. Waits for the pending admission.
    pub fn verify(&self, host: &HostKv) -> Result<usize> {
        self.admitted
            .synchronize()
            .map_err(|e| gpu_err("wait for admission", e))?;
        let map: Vec<u64> = self.map.read(self.map.bytes / 8)?;
        let arena: Vec<u16> = self._arena.read(self._arena.bytes / 2)?;
        let d = self.row_bytes / 2;
        let hk = host.k.as_u16();
        let mut rows_seen = std::collections::HashSet::new();
        let mut slots_seen = std::collections::HashSet::new();
        for &e in &map {
            let key = (e >> 32) as u32;
            if key >= EMPTY_ROW - 1 {
                continue;
            }
            let slot = e as u32 as usize;
            let r = key as usize;
            if !rows_seen.insert(key) || !slots_seen.insert(slot) {
                return Err(Error::Invalid(format!(
                    "estimation table maps row {key} or slot {slot} twice"
                )));
            }
            if slot * d >= arena.len() || arena[slot * d..(slot + 1) * d] != hk[r * d..(r + 1) * d]
            {
                return Err(Error::Invalid(format!(
                    "estimation arena slot {slot} differs from host row {key}"
                )));
            }
            if self.admission != Admission::Host {
                // The lookup must find it from its home bucket.
                if crate::kv::probe_device_map(&map, self.kv_map_shift(), key) != Some(slot as u32)
                {
                    return Err(Error::Invalid(format!(
                        "estimation table: row {key} not reachable from its bucket"
                    )));
                }
            }
        }
        // The pinned region: every valid page's rows equal the host tier's.
        let mut pinned = 0;
        if let Some((pa, _)) = self.pin.as_ref() {
            let lay = host.layout;
            let (hkv, ps) = (lay.n_kv_heads, lay.page_size);
            let mask = self.desc.pin_mask;
            let offs: Vec<usize> = (0..ps).filter(|&o| mask >> o & 1 == 1).collect();
            let pin: Vec<u16> = pa.read(pa.bytes / 2)?;
            for (pg, _) in self.pin_pages.iter().enumerate().filter(|(_, &v)| v) {
                for h in 0..hkv {
                    for (k, &o) in offs.iter().enumerate() {
                        let at = ((pg * hkv + h) * offs.len() + k) * d;
                        let r = ((pg * hkv + h) * ps + o) * d;
                        if pin[at..at + d] != hk[r..r + d] {
                            return Err(Error::Invalid(format!(
                                "pinned row (page {pg}, head {h}, offset {o}) differs from the host tier"
                            )));
                        }
                        pinned += 1;
                    }
                }
            }
        }
        Ok(rows_seen.len() + pinned)
    }
}

impl DevAdmission {
    /// `max_admit`: the most rows one admission takes (its list sizes).
    fn new(gpu: &GpuContext, host_rows: usize, rows: usize, max_admit: usize) -> Result<Self> {
        let zeroed = |bytes: usize| -> Result<DevBuf> {
            let b = DevBuf::alloc(bytes)?;
            b.fill_bytes(0)?;
            Ok(b)
        };
        let (pieces, chunk) = (256usize, 4096usize);
        let nchunks = rows.div_ceil(chunk);
        let half = max_admit + 1;
        let mut stats = PinnedBuf::alloc(64)?;
        stats.write_at(0, &[0u64; 8]);
        Ok(DevAdmission {
            last: zeroed(host_rows * 4)?,
            urow: DevBuf::alloc(half * 4)?,
            upos: DevBuf::alloc(half * 4)?,
            victim: DevBuf::alloc(half * 4)?,
            dcnt: DevBuf::alloc(pieces * 4)?,
            ccnt: DevBuf::alloc(nchunks * 4)?,
            cpre: DevBuf::alloc(nchunks * 4)?,
            adm: zeroed(64)?,
            stats,
            seen: [0; 7],
            pieces,
            chunk,
            est_done: gpu
                .ctx
                .new_event(None)
                .map_err(|e| gpu_err("create event", e))?,
            t_start: timing_event(gpu)?,
            t_end: timing_event(gpu)?,
        })
    }

    fn bytes(&self) -> usize {
        [
            &self.last,
            &self.urow,
            &self.upos,
            &self.victim,
            &self.dcnt,
            &self.ccnt,
            &self.cpre,
            &self.adm,
        ]
        .iter()
        .map(|b| b.bytes)
        .sum()
    }
}

fn timing_event(gpu: &GpuContext) -> Result<CudaEvent> {
    gpu.ctx
        .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(|e| gpu_err("create timing event", e))
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
