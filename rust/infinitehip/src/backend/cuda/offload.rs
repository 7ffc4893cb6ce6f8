//! Host offload on the GPU (DESIGN 3.5, issue 4). The KV of a batch lives in
//! pinned, device-mapped host memory (`HostKv`, cuMemHostAlloc, page layout
//! `[page][kv_head][page_size][head_dim]`); the device holds a slot arena of
//! `n_slots` head blocks (`[page_size][head_dim]` of K and of V each). Slot
//! assignment is the CPU `PageCache`'s policy itself (`resolve_slots`: LRU
//! over (page, KV head) blocks, sink/window pinned, nothing used this step
//! evicted); this module only mirrors its decisions with device copies.
//!
//! Per step (`OffloadKv::prepare`): resolve every touched block, then ONE
//! launch of `offload_gather` on a side stream copies all misses (the
//! kernel reads the mapped pinned memory over the bus; the miss and
//! table-update lists are in mapped pinned memory too) and writes the step's
//! entries of the device slot table `[batch][pages * n_kv_heads]`. An event
//! makes the main stream wait for it; `decode` then runs the `decode_slot`
//! variant of the decode kernel, which reads `table[page * hkv + head]`.
//! No unified/managed memory.
//!
//! `PagePolicy::Device` (opt-in: `with_policy`) runs the policy on the device instead,
//! from the device selection (`prepare_device`; no selection read-back, no
//! host policy on the step's path): CLOCK over the slots (kernels
//! `pc_walk`, `pc_clock`; CPU twin `kv::PageClock`, same choices, compared
//! on the GPU), three launches on the main stream. Counters reach the host
//! through mapped memory a step late (`take_stats`). A hip step that
//! refreshes no stage may reuse the last walk instead
//! (`prepare_device_step(.., tail_only = true)`, rule `walk_covers`): no
//! launch but the appended rows' write-through. With `set_superset` every
//! walk also covers stage 0's kept chunks (which contain every selection
//! until stage 0 refreshes again), so steps that refresh only later stages
//! reuse it too, and `prefetch_superset` walks them on the copy stream
//! while the later stages score (page prefetch at mask refresh; bench
//! `--page-prefetch`, BENCHMARKS run 8). `PagePolicy::Host` is
//! the exact-LRU path above (`PageCache`), kept for comparison.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{result as cu, sys, CudaEvent, CudaStream, LaunchConfig, PushKernelArg};

use super::dispatch::{launch_attention, DecodeWorkspace, DeviceKv, DeviceSelection, KvPtrs};
use super::{gpu_err, kernels, DevBuf, GpuContext};
use crate::attention::AttnShape;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::kv::{head_blocks_touched, CacheStats, HeadBlock, KvLayout, KvPool, PageCache};
use crate::policy::Selection;

/// Pinned, device-mapped host memory (freed on drop).
pub struct PinnedBuf {
    ptr: *mut u8,
    /// Device address of the same memory.
    pub dev: u64,
    pub bytes: usize,
    /// False for memory someone else allocated (`borrowed`): not freed here.
    owned: bool,
}

// SAFETY: plain memory owned by this value.
unsafe impl Send for PinnedBuf {}

impl PinnedBuf {
    pub fn alloc(bytes: usize) -> Result<Self> {
        let bytes = bytes.max(16);
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        let ptr = unsafe { cu::malloc_host(bytes, flags) }
            .map_err(|e| gpu_err(&format!("cuMemHostAlloc of {bytes} bytes"), e))?
            as *mut u8;
        let mut dev: sys::CUdeviceptr = 0;
        let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, ptr as *mut _, 0) };
        if r != sys::CUresult::CUDA_SUCCESS {
            unsafe {
                let _ = cu::free_host(ptr as *mut _);
            }
            return Err(gpu_err("cuMemHostGetDevicePointer", r));
        }
        Ok(PinnedBuf {
            ptr,
            dev,
            bytes,
            owned: true,
        })
    }

    /// Page-locked host memory allocated elsewhere (an engine's pinned K/V
    /// buffer, e.g. cudaMallocHost), seen through its device address; never
    /// freed here. Errors when the driver does not know `ptr` as page-locked.
    ///
    /// # Safety
    /// `ptr..ptr + bytes` stays allocated and page-locked while this lives.
    pub unsafe fn borrowed(ptr: u64, bytes: usize) -> Result<Self> {
        Ok(PinnedBuf {
            ptr: ptr as *mut u8,
            dev: host_device_ptr(ptr)?,
            bytes,
            owned: false,
        })
    }
    pub fn as_u16(&self) -> &[u16] {
        unsafe { std::slice::from_raw_parts(self.ptr as *const u16, self.bytes / 2) }
    }
    pub fn as_u16_mut(&mut self) -> &mut [u16] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u16, self.bytes / 2) }
    }
    pub fn as_u64(&self) -> &[u64] {
        unsafe { std::slice::from_raw_parts(self.ptr as *const u64, self.bytes / 8) }
    }
    /// Word `i` as the device last wrote it (the device writes this memory
    /// while the host reads it).
    pub fn read_u64(&self, i: usize) -> u64 {
        assert!((i + 1) * 8 <= self.bytes, "pinned read past the end");
        // SAFETY: in bounds (checked), 8-byte aligned (cuMemHostAlloc).
        unsafe { std::ptr::read_volatile((self.ptr as *const u64).add(i)) }
    }
    fn as_i32_mut(&mut self) -> &mut [i32] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut i32, self.bytes / 4) }
    }
    /// Copy plain values to byte offset `off` (panics past the end).
    pub fn write_at<T: Copy>(&mut self, off: usize, data: &[T]) {
        let n = std::mem::size_of_val(data);
        assert!(off + n <= self.bytes, "pinned write past the end");
        // SAFETY: in bounds (checked), plain data, no overlap with `data`.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr() as *const u8, self.ptr.add(off), n);
        }
    }
}

/// Device address of page-locked host memory at `ptr` (the same address
/// under unified addressing), or an error naming what is wrong.
pub fn host_device_ptr(ptr: u64) -> Result<u64> {
    let mut dev: sys::CUdeviceptr = 0;
    let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, ptr as *mut _, 0) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(gpu_err(
            "cuMemHostGetDevicePointer (host K/V must be page-locked, e.g. llama.cpp's CUDA_Host buffer)",
            r,
        ));
    }
    Ok(dev)
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        unsafe {
            let _ = cu::free_host(self.ptr as *mut _);
        }
    }
}

/// The host tier: every page of a batch of sequences in pinned memory.
pub struct HostKv {
    pub k: PinnedBuf,
    pub v: PinnedBuf,
    pub layout: KvLayout,
    pub dtype: DType,
    pub n_pages: usize,
    /// Host page ids per sequence.
    pub tables: Vec<Vec<u32>>,
    pub lens: Vec<usize>,
}

impl HostKv {
    /// Room for sequences of `lens` tokens, pages assigned consecutively
    /// (contents unset: fill `k`/`v` through `as_u16_mut`).
    pub fn alloc(layout: KvLayout, dtype: DType, lens: &[usize]) -> Result<Self> {
        Self::alloc_with_room(layout, dtype, lens, 0)
    }

    /// As `alloc`, with pages for `room` more tokens per sequence (decode
    /// appends, `append`).
    pub fn alloc_with_room(
        layout: KvLayout,
        dtype: DType,
        lens: &[usize],
        room: usize,
    ) -> Result<Self> {
        if kernels::dtype_tag(dtype).is_none() {
            return Err(Error::Invalid(format!(
                "CUDA host tier stores bf16 or f16 K/V, got {dtype}"
            )));
        }
        let mut tables = Vec::new();
        let mut n = 0u32;
        for &l in lens {
            let p = (l + room).div_ceil(layout.page_size) as u32;
            tables.push((n..n + p).collect());
            n += p;
        }
        let bytes = n as usize * layout.page_elems() * 2;
        Ok(HostKv {
            k: PinnedBuf::alloc(bytes)?,
            v: PinnedBuf::alloc(bytes)?,
            layout,
            dtype,
            n_pages: n as usize,
            tables,
            lens: lens.to_vec(),
        })
    }

    /// Copy sequences `(pool, seq id)` into pinned memory.
    pub fn from_pools<T: Element>(seqs: &[(&KvPool<T>, u64)]) -> Result<Self> {
        let lay = seqs
            .first()
            .ok_or_else(|| Error::Invalid("HostKv::from_pools: no sequences".into()))?
            .0
            .layout();
        let mut lens = Vec::new();
        for (p, s) in seqs {
            if p.layout() != lay {
                return Err(Error::shape(
                    "HostKv sequences' layouts",
                    format!("{lay:?}"),
                    format!("{:?}", p.layout()),
                ));
            }
            lens.push(p.seq_len(*s)?);
        }
        let mut h = Self::alloc(lay, T::DTYPE, &lens)?;
        let pe = lay.page_elems();
        for (b, (p, s)) in seqs.iter().enumerate() {
            for (i, &page) in p.page_table(*s)?.iter().enumerate() {
                let (pk, pv) = p.page_data(page)?;
                let dst = h.tables[b][i] as usize * pe;
                let as16 = |x: &[T]| unsafe {
                    std::slice::from_raw_parts(x.as_ptr() as *const u16, x.len())
                };
                h.k.as_u16_mut()[dst..dst + pe].copy_from_slice(as16(pk));
                h.v.as_u16_mut()[dst..dst + pe].copy_from_slice(as16(pv));
            }
        }
        Ok(h)
    }

    /// Host row id of token `t`, KV head `h` of sequence `b`: rows of
    /// `head_dim` elements counted over the whole tier.
    pub fn row(&self, b: usize, t: usize, h: usize) -> usize {
        let ps = self.layout.page_size;
        (self.tables[b][t / ps] as usize * self.layout.n_kv_heads + h) * ps + t % ps
    }

    /// Tokens sequence `b` has pages for.
    pub fn capacity(&self, b: usize) -> usize {
        self.tables[b].len() * self.layout.page_size
    }

    /// Append one token of sequence `b` (`k`, `v`: `[n_kv_heads][head_dim]`
    /// raw 16-bit words) into the pinned tier.
    pub fn append(&mut self, b: usize, k: &[u16], v: &[u16]) -> Result<usize> {
        let (hkv, d) = (self.layout.n_kv_heads, self.layout.head_dim);
        if b >= self.lens.len() {
            return Err(Error::OutOfRange(format!(
                "host tier append: sequence {b} of {}",
                self.lens.len()
            )));
        }
        if k.len() != hkv * d || v.len() != hkv * d {
            return Err(Error::shape(
                "host tier append K/V",
                hkv * d,
                format!("{}/{}", k.len(), v.len()),
            ));
        }
        let t = self.lens[b];
        if t >= self.capacity(b) {
            return Err(Error::Invalid(format!(
                "host tier append: sequence {b} is full ({t} tokens); allocate room (HostKv::alloc_with_room)"
            )));
        }
        for h in 0..hkv {
            let r = self.row(b, t, h) * d;
            self.k.as_u16_mut()[r..r + d].copy_from_slice(&k[h * d..(h + 1) * d]);
            self.v.as_u16_mut()[r..r + d].copy_from_slice(&v[h * d..(h + 1) * d]);
        }
        self.lens[b] = t + 1;
        Ok(t)
    }

    /// Shorten sequence `b` to `len` tokens and poison the rows past it
    /// with all-ones words (NaN in bf16 and f16), so a read of a token that
    /// was never appended shows.
    pub fn truncate_poisoned(&mut self, b: usize, len: usize) -> Result<()> {
        if b >= self.lens.len() || len > self.lens[b] {
            return Err(Error::OutOfRange(format!(
                "host tier truncate: sequence {b} to {len} tokens"
            )));
        }
        let (hkv, d) = (self.layout.n_kv_heads, self.layout.head_dim);
        for t in len..self.capacity(b) {
            for h in 0..hkv {
                let r = self.row(b, t, h) * d;
                self.k.as_u16_mut()[r..r + d].fill(0xffff);
                self.v.as_u16_mut()[r..r + d].fill(0xffff);
            }
        }
        self.lens[b] = len;
        Ok(())
    }

    /// Page table `[batch][stride]` (host page ids) and its stride.
    pub fn device_table(&self) -> (Vec<i32>, usize) {
        let stride = self
            .tables
            .iter()
            .map(|t| t.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut table = vec![0i32; self.tables.len() * stride];
        for (b, t) in self.tables.iter().enumerate() {
            for (i, &p) in t.iter().enumerate() {
                table[b * stride + i] = p as i32;
            }
        }
        (table, stride)
    }

    /// Elements of one head block.
    pub fn block_elems(&self) -> usize {
        self.layout.page_size * self.layout.head_dim
    }

    pub fn bytes(&self) -> usize {
        self.k.bytes + self.v.bytes
    }

    /// Everything on the device (the all-resident baseline), same page ids.
    pub fn to_device(&self) -> Result<DeviceKv> {
        let k = DevBuf::alloc(self.k.bytes)?;
        let v = DevBuf::alloc(self.v.bytes)?;
        unsafe {
            cu::memcpy_htod_sync(k.ptr, self.k.as_u16()).map_err(|e| gpu_err("upload K", e))?;
            cu::memcpy_htod_sync(v.ptr, self.v.as_u16()).map_err(|e| gpu_err("upload V", e))?;
        }
        let (table, stride) = self.device_table();
        Ok(DeviceKv {
            k,
            v,
            table: DevBuf::from_slice(&table)?,
            table_stride: stride,
            page_size: self.layout.page_size,
            page_stride: self.layout.page_elems(),
            head_stride: self.layout.page_size * self.layout.head_dim,
            n_kv_heads: self.layout.n_kv_heads,
            head_dim: self.layout.head_dim,
            dtype: self.dtype,
            capacity: (0..self.lens.len()).map(|b| self.capacity(b)).collect(),
            lens: self.lens.clone(),
        })
    }
}

/// Counters of one `prepare`.
#[derive(Clone, Copy, Debug, Default)]
pub struct OffloadStep {
    pub cache: CacheStats,
    pub blocks_needed: usize,
    /// Host time of `prepare` (ms): page-cache policy + lists, waiting for
    /// the previous copy, staging + launches.
    pub host_resolve_ms: f64,
    pub host_wait_ms: f64,
    pub host_launch_ms: f64,
}

/// Who runs the page-cache policy (module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagePolicy {
    /// CLOCK on the device from the device selection.
    Device,
    /// The CPU `PageCache`'s exact LRU from host selections (default).
    Host,
}

/// Device state of `PagePolicy::Device` (kernels/offload.cu `pc_*`).
struct DevicePages {
    /// Host page ids `[batch][pstride]`.
    ptable: DevBuf,
    pstride: usize,
    stamp: DevBuf,
    block_slot: DevBuf,
    slot_block: DevBuf,
    slot_step: DevBuf,
    slot_ref: DevBuf,
    miss: DevBuf,
    scratch: DevBuf,
    victim: DevBuf,
    miss_cap: usize,
    ctr: DevBuf,
    /// Cumulative hits, misses, evictions, failed steps, steps (mapped).
    stats: PinnedBuf,
    seen: [u64; 5],
    step: u32,
}

/// A device page cache over a `HostKv`.
pub struct OffloadKv {
    pub host: HostKv,
    /// The CPU page cache's policy, no arena of its own.
    pub cache: PageCache<half::bf16>,
    pub slot_k: DevBuf,
    pub slot_v: DevBuf,
    /// `[batch][stride]` slot per (logical page, kv head), stride =
    /// max pages * n_kv_heads.
    pub slot_table: DevBuf,
    pub stride: usize,
    side: Arc<CudaStream>,
    copied: CudaEvent,
    attended: CudaEvent,
    staging: PinnedBuf,
    /// Tokens appended since the last `prepare`: (sequence, position).
    pending: Vec<(usize, usize)>,
    pub policy: PagePolicy,
    dev: Option<DevicePages>,
    /// `PagePolicy::Device`: what the last walked step (`pc_walk`) covered,
    /// for `prepare_device_step`'s reuse test; None: nothing to reuse.
    walked: Option<Walked>,
    /// Steps `prepare_device_step` served from the last walk (no walk, no
    /// CLOCK), since construction.
    pub steps_reused: u64,
    /// Tests only (`gpu-test-offload`'s mutation check): reuse the last walk
    /// on every `tail_only` step, even when a sequence's newest token
    /// entered a new page, which is wrong (that page's blocks were never
    /// mapped); the checks must see it.
    pub unsound_reuse_for_tests: bool,
    /// Stage 0's kept chunks (`set_superset`): walked with every selection,
    /// so steps that refresh only later stages may reuse the walk.
    superset: Option<Superset>,
    /// The copy stream's superset walk (`prefetch_superset`) and its pins
    /// list; the next `prepare_device_step` waits for it.
    prefetched: CudaEvent,
    prefetch_pending: bool,
    prefetch_staging: PinnedBuf,
    /// Steps whose page step was the copy stream's superset walk (no walk
    /// on the main stream), since construction.
    pub steps_prefetched: u64,
}

/// Stage 0's kept chunks on the device (`HipGpuDecoder::stage0_chunks`).
#[derive(Clone, Copy)]
struct Superset {
    ranges: u64,
    cnt: u64,
    cap: usize,
}

/// One selection a page walk covers: ranges `[rows][cap]` (i32 pairs) and
/// counts `[rows]` on the device.
#[derive(Clone, Copy)]
struct WalkPart {
    ranges: u64,
    cnt: u64,
    cap: i32,
    rows: i32,
}

/// The last walked step of the device policy: per sequence its length and
/// the page spans (first, last page, inclusive) of its pinned ranges.
struct Walked {
    lens: Vec<usize>,
    pin_pages: Vec<Vec<(usize, usize)>>,
}

/// `prepare_device_step`'s reuse rule (pages of `ps` tokens): a step with
/// lengths `lens` and pinned page spans `pins`, whose selection grew only
/// at its tail since the walk that saw `walked_lens` / `walked_pins`,
/// touches no block that walk did not map when, for every sequence, the
/// length did not shrink, the newest token is in the page it was in then,
/// and each pinned span lies inside a span pinned then.
pub fn walk_covers(
    ps: usize,
    walked_lens: &[usize],
    walked_pins: &[Vec<(usize, usize)>],
    lens: &[usize],
    pins: &[Vec<(usize, usize)>],
) -> bool {
    if walked_lens.len() != lens.len()
        || pins.len() != lens.len()
        || walked_pins.len() != lens.len()
    {
        return false;
    }
    (0..lens.len()).all(|b| {
        let (now, then) = (lens[b], walked_lens[b]);
        let same_page = now >= then && then > 0 && (now - 1) / ps == (then - 1) / ps;
        same_page
            && pins[b]
                .iter()
                .all(|&(a, z)| walked_pins[b].iter().any(|&(wa, wz)| wa <= a && z <= wz))
    })
}

#[cfg(test)]
mod walk_tests {
    use super::walk_covers;

    #[test]
    fn walk_reuse_rule() {
        let ps = 64;
        // Walked at length 1000 (newest token 999, page 15), sink + window pinned.
        let wl = [1000usize];
        let wp = vec![vec![(0, 1), (0, 15)]];
        let pins = |len: usize| {
            vec![vec![
                (0, 1),
                ((len - 1024usize.min(len)) / ps, (len - 1) / ps),
            ]]
        };
        // Appends inside page 15 (up to token 1023): reusable.
        for len in 1000..=1024 {
            assert!(walk_covers(ps, &wl, &wp, &[len], &pins(len)), "len {len}");
        }
        // Token 1024 opens page 16: must walk.
        assert!(!walk_covers(ps, &wl, &wp, &[1025], &pins(1025)));
        // Shorter than at the walk: must walk.
        assert!(!walk_covers(ps, &wl, &wp, &[999], &pins(999)));
        // A pinned span outside the walked pins: must walk.
        assert!(!walk_covers(
            ps,
            &wl,
            &wp,
            &[1000],
            &[vec![(0, 1), (14, 16)]]
        ));
        assert!(walk_covers(ps, &wl, &wp, &[1000], &[vec![(2, 3)]]));
        // Nothing walked for an empty sequence; batch size changed.
        assert!(!walk_covers(ps, &[0], &[vec![]], &[0], &[vec![]]));
        assert!(!walk_covers(ps, &wl, &wp, &[1000, 5], &[vec![], vec![]]));
        // Batch of two: one sequence crossing a page is enough to walk.
        let wl2 = [1000usize, 127];
        let wp2 = vec![vec![(0, 15)], vec![(0, 1)]];
        assert!(walk_covers(
            ps,
            &wl2,
            &wp2,
            &[1010, 128],
            &[vec![(0, 15)], vec![(0, 1)]]
        ));
        assert!(!walk_covers(
            ps,
            &wl2,
            &wp2,
            &[1010, 129],
            &[vec![(0, 15)], vec![(0, 2)]]
        ));
        assert!(!walk_covers(
            ps,
            &wl2,
            &wp2,
            &[1010, 129],
            &[vec![(0, 15)], vec![(0, 1)]]
        ));
    }
}

impl OffloadKv {
    /// A cache of `n_slots` head blocks, host LRU policy (`with_policy`
    /// for the device policy).
    pub fn new(gpu: &GpuContext, host: HostKv, n_slots: usize) -> Result<Self> {
        Self::with_policy(gpu, host, n_slots, PagePolicy::Host)
    }

    pub fn with_policy(
        gpu: &GpuContext,
        host: HostKv,
        n_slots: usize,
        policy: PagePolicy,
    ) -> Result<Self> {
        let dev = match policy {
            PagePolicy::Device => Some(DevicePages::new(&host, n_slots)?),
            PagePolicy::Host => None,
        };
        let cache = PageCache::policy_only(host.layout, n_slots)?;
        let be = host.block_elems();
        let hkv = host.layout.n_kv_heads;
        let stride = host
            .tables
            .iter()
            .map(|t| t.len())
            .max()
            .unwrap_or(1)
            .max(1)
            * hkv;
        let slot_table = DevBuf::alloc(host.tables.len() * stride * 4)?;
        slot_table.fill_bytes(0)?;
        let side = gpu
            .ctx
            .new_stream()
            .map_err(|e| gpu_err("create copy stream", e))?;
        let copied = gpu
            .ctx
            .new_event(None)
            .map_err(|e| gpu_err("create event", e))?;
        let attended = gpu
            .ctx
            .new_event(None)
            .map_err(|e| gpu_err("create event", e))?;
        let prefetched = gpu
            .ctx
            .new_event(None)
            .map_err(|e| gpu_err("create event", e))?;
        copied
            .record(&side)
            .map_err(|e| gpu_err("record event", e))?;
        prefetched
            .record(&side)
            .map_err(|e| gpu_err("record event", e))?;
        attended
            .record(&gpu.stream)
            .map_err(|e| gpu_err("record event", e))?;
        Ok(OffloadKv {
            slot_k: DevBuf::alloc(n_slots * be * 2)?,
            slot_v: DevBuf::alloc(n_slots * be * 2)?,
            cache,
            host,
            slot_table,
            stride,
            side,
            copied,
            attended,
            staging: PinnedBuf::alloc(1 << 16)?,
            pending: Vec::new(),
            policy,
            dev,
            walked: None,
            steps_reused: 0,
            unsound_reuse_for_tests: false,
            superset: None,
            prefetched,
            prefetch_pending: false,
            prefetch_staging: PinnedBuf::alloc(1 << 12)?,
            steps_prefetched: 0,
        })
    }

    /// Append one decoded token of sequence `b` (`[n_kv_heads][head_dim]`
    /// raw words) to the host tier; the next `prepare` writes it through to
    /// the device slots of its page if they are resident (the window's are,
    /// pinned), so device copies never go stale.
    pub fn append(&mut self, b: usize, k: &[u16], v: &[u16]) -> Result<()> {
        // The previous attention may read slots the write-through updates
        // only after `prepare`, which orders itself after it.
        let t = self.host.append(b, k, v)?;
        self.pending.push((b, t));
        Ok(())
    }

    /// Device bytes of the slot arena and slot table (+ the device policy's
    /// maps: 8 B per host head block, 13 B per slot, the page table).
    pub fn device_bytes(&self) -> usize {
        self.slot_k.bytes
            + self.slot_v.bytes
            + self.slot_table.bytes
            + self.dev.as_ref().map_or(0, |d| d.bytes())
    }

    /// Make every block a step reads resident: `pinned[b]` token ranges of
    /// sequence b (sink, window) are resolved pinned first, then the blocks
    /// `sels[b]` touch. Copies the misses and updates the slot table on the
    /// copy stream; the main stream waits for it.
    pub fn prepare(
        &mut self,
        gpu: &GpuContext,
        sels: &[Selection],
        pinned: &[Vec<Range<usize>>],
    ) -> Result<OffloadStep> {
        let nb = self.host.tables.len();
        if sels.len() != nb || pinned.len() != nb {
            return Err(Error::shape(
                "offload prepare selections/pinned",
                nb,
                format!("{}/{}", sels.len(), pinned.len()),
            ));
        }
        if self.policy == PagePolicy::Device {
            for (b, sel) in sels.iter().enumerate() {
                let len = self.host.lens[b];
                if sel.n_kv_heads() != self.host.layout.n_kv_heads {
                    return Err(Error::shape(
                        format!("selection {b} heads"),
                        self.host.layout.n_kv_heads,
                        sel.n_kv_heads(),
                    ));
                }
                if let Some(r) = sel.heads.iter().flatten().find(|r| r.end > len) {
                    return Err(Error::OutOfRange(format!(
                        "selection {b} range {r:?} beyond the sequence's {len} tokens"
                    )));
                }
            }
            let dsel = DeviceSelection::from_host(sels)?;
            return self.prepare_device(gpu, &dsel, pinned);
        }
        let hkv = self.host.layout.n_kv_heads;
        let ps = self.host.layout.page_size;
        let t0 = std::time::Instant::now();
        let before = self.cache.stats();
        self.cache.unpin_all();
        self.cache.begin_step();
        let mut fills: Vec<i32> = Vec::new();
        let mut upd: Vec<i32> = Vec::new();
        let mut needed = 0;
        for (b, (sel, pin)) in sels.iter().zip(pinned).enumerate() {
            let table = &self.host.tables[b];
            let len = self.host.lens[b];
            if sel.n_kv_heads() != hkv {
                return Err(Error::shape(
                    format!("selection {b} heads"),
                    hkv,
                    sel.n_kv_heads(),
                ));
            }
            if let Some(r) = sel.heads.iter().flatten().find(|r| r.end > len) {
                return Err(Error::OutOfRange(format!(
                    "selection {b} range {r:?} beyond the sequence's {len} tokens"
                )));
            }
            let pin_sel = Selection {
                heads: vec![pin.clone(); hkv],
            };
            let pin_blocks: Vec<(usize, usize)> = head_blocks_touched(&pin_sel, ps)
                .into_iter()
                .filter(|&(p, _)| p < table.len())
                .collect();
            let logical = head_blocks_touched(sel, ps);
            needed += logical.len();
            for (list, is_pin) in [(pin_blocks, true), (logical, false)] {
                let phys: Vec<HeadBlock> = list
                    .iter()
                    .map(|&(p, h)| HeadBlock {
                        page: table[p],
                        head: h as u32,
                    })
                    .collect();
                let (slots, miss) = self.cache.resolve_slots(&phys, is_pin)?;
                for (i, s) in miss {
                    fills.push((phys[i].page as usize * hkv + phys[i].head as usize) as i32);
                    fills.push(s as i32);
                }
                for (&(p, h), s) in list.iter().zip(slots) {
                    upd.push((b * self.stride + p * hkv + h) as i32);
                    upd.push(s as i32);
                }
            }
        }
        // Appended rows whose head block is resident (after this step's
        // fills, which already copy whole blocks): written through.
        let mut rows: Vec<i32> = Vec::new();
        for (b, t) in std::mem::take(&mut self.pending) {
            let page = self.host.tables[b][t / ps];
            for h in 0..hkv {
                if let Some(s) = self.cache.slot_of(HeadBlock {
                    page,
                    head: h as u32,
                }) {
                    rows.push(self.host.row(b, t, h) as i32);
                    rows.push((s as usize * ps + t % ps) as i32);
                }
            }
        }
        let t1 = std::time::Instant::now();
        // The staging lists of the previous step may still be read.
        self.copied
            .synchronize()
            .map_err(|e| gpu_err("wait for the previous copy", e))?;
        let t2 = std::time::Instant::now();
        let need = (fills.len() + upd.len() + rows.len()) * 4;
        if need > self.staging.bytes {
            self.staging = PinnedBuf::alloc(need.next_power_of_two())?;
        }
        let st = self.staging.as_i32_mut();
        st[..fills.len()].copy_from_slice(&fills);
        st[fills.len()..fills.len() + upd.len()].copy_from_slice(&upd);
        let r0 = fills.len() + upd.len();
        st[r0..r0 + rows.len()].copy_from_slice(&rows);
        // Slots being refilled may still be read by the previous attention.
        self.side
            .wait(&self.attended)
            .map_err(|e| gpu_err("copy stream wait", e))?;
        let f = gpu.func("offload", "offload_gather")?;
        let n_fill = (fills.len() / 2) as i32;
        let n_upd = (upd.len() / 2) as i32;
        let bv = (self.host.block_elems() * 2 / 16) as i32;
        let fills_ptr = self.staging.dev;
        let upd_ptr = self.staging.dev + (fills.len() * 4) as u64;
        let mut l = self.side.launch_builder(&f);
        l.arg(&self.host.k.dev)
            .arg(&self.host.v.dev)
            .arg(&self.slot_k.ptr)
            .arg(&self.slot_v.ptr)
            .arg(&fills_ptr)
            .arg(&n_fill)
            .arg(&bv)
            .arg(&self.slot_table.ptr)
            .arg(&upd_ptr)
            .arg(&n_upd);
        unsafe {
            l.launch(LaunchConfig {
                grid_dim: (n_fill as u32 + 1, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(|e| gpu_err("launch offload_gather", e))?;
        if !rows.is_empty() {
            let f = gpu.func("offload", "offload_rows")?;
            let n = (rows.len() / 2) as i32;
            let rv = (self.host.layout.head_dim * 2 / 16) as i32;
            let rows_ptr = self.staging.dev + (r0 * 4) as u64;
            let mut l = self.side.launch_builder(&f);
            l.arg(&self.host.k.dev)
                .arg(&self.host.v.dev)
                .arg(&self.slot_k.ptr)
                .arg(&self.slot_v.ptr)
                .arg(&rows_ptr)
                .arg(&n)
                .arg(&rv);
            unsafe {
                l.launch(LaunchConfig {
                    grid_dim: ((n as u32 * rv as u32).div_ceil(256).max(1), 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(|e| gpu_err("launch offload_rows", e))?;
        }
        self.copied
            .record(&self.side)
            .map_err(|e| gpu_err("record copy event", e))?;
        gpu.stream
            .wait(&self.copied)
            .map_err(|e| gpu_err("main stream wait for copy", e))?;
        let after = self.cache.stats();
        Ok(OffloadStep {
            cache: CacheStats {
                hits: after.hits - before.hits,
                misses: after.misses - before.misses,
                bytes_copied: after.bytes_copied - before.bytes_copied,
                evictions: after.evictions - before.evictions,
            },
            blocks_needed: needed,
            host_resolve_ms: (t1 - t0).as_secs_f64() * 1e3,
            host_wait_ms: (t2 - t1).as_secs_f64() * 1e3,
            host_launch_ms: t2.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// `PagePolicy::Device`: make every block of the device selection `sel`
    /// (rows `[batch][kv_head]`, e.g. `HipGpuDecoder::sel`) and of the
    /// `pinned[b]` token ranges resident, wholly on the device: three
    /// launches on the main stream (mark, CLOCK, slot table + copies), plus
    /// one for appended rows. No read-back and no host policy. The returned
    /// counters are what the device finished since the last call (a step
    /// late; `take_stats` waits for the rest); a step the cache could not
    /// hold (more distinct blocks than slots) is reported as an error by the
    /// next call or by `take_stats` (its unresolved blocks read slot 0).
    pub fn prepare_device(
        &mut self,
        gpu: &GpuContext,
        sel: &DeviceSelection,
        pinned: &[Vec<Range<usize>>],
    ) -> Result<OffloadStep> {
        self.prepare_device_step(gpu, sel, pinned, false)
    }

    /// `prepare_device`, reusing the last walked step when that is exact:
    /// `tail_only` says the caller's selection differs from the previous
    /// call's at most by ranges growing toward each sequence's newest token
    /// (a hip decode step that refreshes no stage: the stages' chunks are
    /// unchanged, the slid + window tail moves with the length). Then, if
    /// every sequence's newest token (`host.lens[b] - 1`) is still in the
    /// page it was in at the last walk, its length did not shrink, and each
    /// pinned range lies in the pages pinned then, the step touches no block
    /// the last walk did not map, and no walk or CLOCK runs since (nothing
    /// was evicted since): the slot table's entries for those blocks are
    /// still right. Only the appended rows are written through (`pc_rows`;
    /// no launch at all without appends). What is given up: CLOCK reference
    /// bits and counters are not refreshed on such steps (eviction order
    /// only; `steps_reused` counts them, their hits are not counted).
    pub fn prepare_device_step(
        &mut self,
        gpu: &GpuContext,
        sel: &DeviceSelection,
        pinned: &[Vec<Range<usize>>],
        tail_only: bool,
    ) -> Result<OffloadStep> {
        let nb = self.host.tables.len();
        let hkv = self.host.layout.n_kv_heads;
        let ps = self.host.layout.page_size;
        if self.dev.is_none() {
            return Err(Error::Invalid(
                "offload prepare_device on a host-policy page cache".into(),
            ));
        }
        if sel.rows != nb * hkv || pinned.len() != nb {
            return Err(Error::shape(
                "offload prepare_device selection rows/pinned",
                format!("{}/{nb}", nb * hkv),
                format!("{}/{}", sel.rows, pinned.len()),
            ));
        }
        let t0 = std::time::Instant::now();
        let cache = self.collect_stats(false)?;
        let pin_pages: Vec<Vec<(usize, usize)>> = pinned
            .iter()
            .enumerate()
            .map(|(b, rs)| {
                let end = self.host.capacity(b);
                rs.iter()
                    .filter(|r| r.start < r.end.min(end))
                    .map(|r| (r.start / ps, (r.end.min(end) - 1) / ps))
                    .collect()
            })
            .collect();
        if std::mem::take(&mut self.prefetch_pending) {
            // The copy stream walked this step's superset and pins
            // (`prefetch_superset`): the selection lies inside them.
            gpu.stream
                .wait(&self.prefetched)
                .map_err(|e| gpu_err("main stream wait for the prefetch", e))?;
            if self.reusable(&pin_pages) {
                self.steps_prefetched += 1;
                self.write_through(gpu)?;
                // Waits on the page step (`take_stats`) cover the prefetch.
                self.copied
                    .record(&gpu.stream)
                    .map_err(|e| gpu_err("record page step event", e))?;
                return Ok(OffloadStep {
                    blocks_needed: 0,
                    cache,
                    host_resolve_ms: t0.elapsed().as_secs_f64() * 1e3,
                    host_wait_ms: 0.0,
                    host_launch_ms: 0.0,
                });
            }
        }
        if tail_only && self.reusable(&pin_pages) {
            self.steps_reused += 1;
            self.write_through(gpu)?;
            return Ok(OffloadStep {
                blocks_needed: 0,
                cache,
                host_resolve_ms: t0.elapsed().as_secs_f64() * 1e3,
                host_wait_ms: 0.0,
                host_launch_ms: 0.0,
            });
        }
        self.walked = Some(Walked {
            lens: self.host.lens.clone(),
            pin_pages,
        });
        let mut pins: Vec<i32> = Vec::new();
        for (b, rs) in pinned.iter().enumerate() {
            let end = self.host.capacity(b);
            for r in rs {
                let e = r.end.min(end);
                if r.start < e {
                    pins.extend_from_slice(&[b as i32, r.start as i32, e as i32]);
                }
            }
        }
        let mut rows: Vec<i32> = Vec::new();
        for (b, t) in std::mem::take(&mut self.pending) {
            let page = self.host.tables[b][t / ps] as usize;
            for h in 0..hkv {
                rows.extend_from_slice(&[
                    self.host.row(b, t, h) as i32,
                    (page * hkv + h) as i32,
                    (t % ps) as i32,
                ]);
            }
        }
        let t1 = std::time::Instant::now();
        // The staging lists of the previous step may still be read.
        self.copied
            .synchronize()
            .map_err(|e| gpu_err("wait for the previous page step", e))?;
        let t2 = std::time::Instant::now();
        let need = (pins.len() + rows.len()) * 4;
        if need > self.staging.bytes {
            self.staging = PinnedBuf::alloc(need.next_power_of_two())?;
        }
        self.staging.write_at(0, &pins);
        self.staging.write_at(pins.len() * 4, &rows);
        let pins_ptr = self.staging.dev;
        let rows_ptr = self.staging.dev + (pins.len() * 4) as u64;
        let mut parts = vec![WalkPart {
            ranges: sel.ranges.ptr,
            cnt: sel.cnt.ptr,
            cap: sel.cap as i32,
            rows: sel.rows as i32,
        }];
        parts.extend(self.superset_part());
        self.launch_walk(gpu, &gpu.stream, &parts, pins_ptr, pins.len() / 3)?;
        if !rows.is_empty() {
            self.launch_rows(gpu, rows_ptr, rows.len() / 3)?;
        }
        self.copied
            .record(&gpu.stream)
            .map_err(|e| gpu_err("record page step event", e))?;
        Ok(OffloadStep {
            blocks_needed: (cache.hits + cache.misses) as usize,
            cache,
            host_resolve_ms: (t1 - t0).as_secs_f64() * 1e3,
            host_wait_ms: (t2 - t1).as_secs_f64() * 1e3,
            host_launch_ms: t2.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// The superset as a walk part (None: not set).
    fn superset_part(&self) -> Option<WalkPart> {
        let nb = self.host.tables.len();
        self.superset.map(|u| WalkPart {
            ranges: u.ranges,
            cnt: u.cnt,
            cap: u.cap as i32,
            rows: (nb * self.host.layout.n_kv_heads) as i32,
        })
    }

    /// One page walk on `stream` over `parts` (the pins, `n_pins` staged
    /// (sequence, start, end) triples at `pins_ptr`, with the first part):
    /// `pc_walk` mode 0 per part (blocks marked once per step by their
    /// stamp), `pc_clock`, `pc_walk` mode 1 per part, the last with the
    /// copy CTAs.
    fn launch_walk(
        &mut self,
        gpu: &GpuContext,
        stream: &Arc<CudaStream>,
        parts: &[WalkPart],
        pins_ptr: u64,
        n_pins: usize,
    ) -> Result<()> {
        let hkv = self.host.layout.n_kv_heads;
        let ps = self.host.layout.page_size;
        let n_slots = self.cache.n_slots() as i32;
        let d = self.dev.as_mut().unwrap();
        d.step = d.step.wrapping_add(1).max(1);
        let f = gpu.func("offload", "pc_walk")?;
        let (hkv_i, ps_i) = (hkv as i32, ps as i32);
        let (pstride, miss_cap, tstride) =
            (d.pstride as i32, d.miss_cap as i32, self.stride as i32);
        let bv = (self.host.block_elems() * 2 / 16) as i32;
        let n_copy = (gpu.sm_count as u32).clamp(1, 264);
        for mode in [0i32, 1] {
            for (i, p) in parts.iter().enumerate() {
                let np = if i == 0 { n_pins as i32 } else { 0 };
                let walk = (p.rows as usize + np as usize * hkv) as u32;
                let copy = mode == 1 && i + 1 == parts.len();
                let mut l = stream.launch_builder(&f);
                l.arg(&mode)
                    .arg(&p.ranges)
                    .arg(&p.cnt)
                    .arg(&p.cap)
                    .arg(&p.rows)
                    .arg(&hkv_i)
                    .arg(&ps_i)
                    .arg(&d.ptable.ptr)
                    .arg(&pstride)
                    .arg(&pins_ptr)
                    .arg(&np)
                    .arg(&d.step)
                    .arg(&d.stamp.ptr)
                    .arg(&d.block_slot.ptr)
                    .arg(&d.slot_step.ptr)
                    .arg(&d.slot_ref.ptr)
                    .arg(&d.miss.ptr)
                    .arg(&miss_cap)
                    .arg(&d.ctr.ptr)
                    .arg(&self.slot_table.ptr)
                    .arg(&tstride)
                    .arg(&self.host.k.dev)
                    .arg(&self.host.v.dev)
                    .arg(&self.slot_k.ptr)
                    .arg(&self.slot_v.ptr)
                    .arg(&d.victim.ptr)
                    .arg(&bv);
                let grid = if copy { walk + n_copy } else { walk };
                unsafe {
                    l.launch(LaunchConfig {
                        grid_dim: (grid.max(1), 1, 1),
                        block_dim: (if mode == 0 { 128 } else { 256 }, 1, 1),
                        shared_mem_bytes: 0,
                    })
                }
                .map_err(|e| gpu_err("launch pc_walk", e))?;
            }
            if mode == 0 {
                let c = gpu.func("offload", "pc_clock")?;
                let mut l = stream.launch_builder(&c);
                l.arg(&n_slots)
                    .arg(&d.step)
                    .arg(&d.miss.ptr)
                    .arg(&miss_cap)
                    .arg(&d.scratch.ptr)
                    .arg(&d.block_slot.ptr)
                    .arg(&d.slot_block.ptr)
                    .arg(&d.slot_step.ptr)
                    .arg(&d.slot_ref.ptr)
                    .arg(&d.victim.ptr)
                    .arg(&d.ctr.ptr)
                    .arg(&d.stats.dev);
                unsafe {
                    l.launch(LaunchConfig {
                        grid_dim: (1, 1, 1),
                        block_dim: (1024, 1, 1),
                        shared_mem_bytes: 0,
                    })
                }
                .map_err(|e| gpu_err("launch pc_clock", e))?;
            }
        }
        Ok(())
    }

    /// `PagePolicy::Device`: walk stage 0's kept chunks (`ranges`, `cnt`:
    /// `HipGpuDecoder::stage0_chunks`, rows `[batch][n_kv_heads]`, `cap`
    /// per row, chunks of `chunk` tokens) along with every selection from
    /// now on (the buffers must stay allocated). Every hip selection until
    /// stage 0 refreshes again is inside them plus the sink, slid and
    /// window ranges, so a step that refreshes only later stages may then
    /// pass `tail_only` to `prepare_device_step` and reuse the walk, and a
    /// stage-0 refresh can walk them on the copy stream while the later
    /// stages score (`prefetch_superset`). Errors when stage 0's chunks
    /// could need more than 3/4 of the cache's slots (leave it off then).
    pub fn set_superset(&mut self, ranges: u64, cnt: u64, cap: usize, chunk: usize) -> Result<()> {
        if self.dev.is_none() {
            return Err(Error::Invalid(
                "offload superset walks need the device page policy".into(),
            ));
        }
        let rows = self.host.tables.len() * self.host.layout.n_kv_heads;
        let bound = rows * cap * (chunk.div_ceil(self.host.layout.page_size) + 1);
        let n = self.cache.n_slots();
        if bound > n / 4 * 3 {
            return Err(Error::config(
                "kv.device_cache_pages",
                format!("{n} slots: stage 0's kept chunks may touch {bound} head blocks, more than 3/4 of the cache; page prefetch needs a larger cache"),
            ));
        }
        self.superset = Some(Superset { ranges, cnt, cap });
        // Walks so far did not cover it.
        self.walked = None;
        Ok(())
    }

    /// Stop walking stage 0's chunks with every selection.
    pub fn clear_superset(&mut self) {
        self.superset = None;
        self.walked = None;
    }

    /// Superset walk on the copy stream, for a step that refreshed stage 0
    /// (`set_superset` first): after `after` (recorded on `gpu.stream` once
    /// stage 0's kept chunks are written, `HipGpuDecoder::set_stage0_event`),
    /// walk stage 0's chunks and the `pinned` ranges, evict by CLOCK and
    /// copy the missing blocks, overlapping whatever `gpu.stream` runs
    /// meanwhile (the later stages' scoring). The next
    /// `prepare_device_step` makes `gpu.stream` wait for it and, the
    /// selection being inside what it walked, walks nothing itself.
    /// `gpu.stream` must not run a page step or attention between `after`
    /// and that call.
    pub fn prefetch_superset(
        &mut self,
        gpu: &GpuContext,
        pinned: &[Vec<Range<usize>>],
        after: &CudaEvent,
    ) -> Result<()> {
        let nb = self.host.tables.len();
        let ps = self.host.layout.page_size;
        let part = self.superset_part().ok_or_else(|| {
            Error::Invalid("offload prefetch_superset before set_superset".into())
        })?;
        if pinned.len() != nb {
            return Err(Error::shape("offload prefetch pinned", nb, pinned.len()));
        }
        let mut pins: Vec<i32> = Vec::new();
        let mut pin_pages = Vec::new();
        for (b, rs) in pinned.iter().enumerate() {
            let end = self.host.capacity(b);
            let mut pp = Vec::new();
            for r in rs {
                let e = r.end.min(end);
                if r.start < e {
                    pins.extend_from_slice(&[b as i32, r.start as i32, e as i32]);
                    pp.push((r.start / ps, (e - 1) / ps));
                }
            }
            pin_pages.push(pp);
        }
        // The last prefetch may still read its pins list.
        self.prefetched
            .synchronize()
            .map_err(|e| gpu_err("wait for the previous prefetch", e))?;
        if pins.len() * 4 > self.prefetch_staging.bytes {
            self.prefetch_staging = PinnedBuf::alloc((pins.len() * 4).next_power_of_two())?;
        }
        self.prefetch_staging.write_at(0, &pins);
        let side = self.side.clone();
        side.wait(after)
            .map_err(|e| gpu_err("copy stream wait for stage 0", e))?;
        let pins_ptr = self.prefetch_staging.dev;
        self.launch_walk(gpu, &side, &[part], pins_ptr, pins.len() / 3)?;
        self.prefetched
            .record(&side)
            .map_err(|e| gpu_err("record prefetch event", e))?;
        self.prefetch_pending = true;
        self.walked = Some(Walked {
            lens: self.host.lens.clone(),
            pin_pages,
        });
        Ok(())
    }

    /// Make `gpu.stream` wait for the last `prefetch_superset` (tests).
    pub fn wait_prefetch(&self, gpu: &GpuContext) -> Result<()> {
        gpu.stream
            .wait(&self.prefetched)
            .map_err(|e| gpu_err("main stream wait for the prefetch", e))
    }

    /// Whether the last walk covers a step whose selection grew only at its
    /// tail (`prepare_device_step`) and whose pinned page spans are
    /// `pin_pages`.
    fn reusable(&self, pin_pages: &[Vec<(usize, usize)>]) -> bool {
        let Some(w) = &self.walked else {
            return false;
        };
        if self.unsound_reuse_for_tests {
            return true;
        }
        walk_covers(
            self.host.layout.page_size,
            &w.lens,
            &w.pin_pages,
            &self.host.lens,
            pin_pages,
        )
    }

    /// Appended rows only (a reused step): write them through to their
    /// resident slots (`pc_rows`); nothing launched without appends.
    fn write_through(&mut self, gpu: &GpuContext) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let hkv = self.host.layout.n_kv_heads;
        let ps = self.host.layout.page_size;
        let mut rows: Vec<i32> = Vec::new();
        for (b, t) in std::mem::take(&mut self.pending) {
            let page = self.host.tables[b][t / ps] as usize;
            for h in 0..hkv {
                rows.extend_from_slice(&[
                    self.host.row(b, t, h) as i32,
                    (page * hkv + h) as i32,
                    (t % ps) as i32,
                ]);
            }
        }
        // The staging lists of the previous step may still be read.
        self.copied
            .synchronize()
            .map_err(|e| gpu_err("wait for the previous page step", e))?;
        let need = rows.len() * 4;
        if need > self.staging.bytes {
            self.staging = PinnedBuf::alloc(need.next_power_of_two())?;
        }
        self.staging.write_at(0, &rows);
        let rows_ptr = self.staging.dev;
        self.launch_rows(gpu, rows_ptr, rows.len() / 3)?;
        self.copied
            .record(&gpu.stream)
            .map_err(|e| gpu_err("record page step event", e))
    }

    /// `pc_rows` over `n` staged (host row, head block, offset) triples.
    fn launch_rows(&self, gpu: &GpuContext, rows_ptr: u64, n: usize) -> Result<()> {
        let d = self.dev.as_ref().unwrap();
        let f = gpu.func("offload", "pc_rows")?;
        let n = n as i32;
        let ps_i = self.host.layout.page_size as i32;
        let rv = (self.host.layout.head_dim * 2 / 16) as i32;
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(&self.host.k.dev)
            .arg(&self.host.v.dev)
            .arg(&self.slot_k.ptr)
            .arg(&self.slot_v.ptr)
            .arg(&rows_ptr)
            .arg(&n)
            .arg(&rv)
            .arg(&ps_i)
            .arg(&d.block_slot.ptr);
        unsafe {
            l.launch(LaunchConfig {
                grid_dim: ((n as u32 * rv as u32).div_ceil(256).max(1), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(|e| gpu_err("launch pc_rows", e))?;
        Ok(())
    }

    /// Device policy: wait for the pending page step and return the
    /// counters not returned yet (the host policy: its counters since the
    /// last call too). Errors if a step could not be held.
    pub fn take_stats(&mut self) -> Result<CacheStats> {
        if self.dev.is_none() {
            return Ok(self.cache.take_stats());
        }
        self.collect_stats(true)
    }

    fn collect_stats(&mut self, wait: bool) -> Result<CacheStats> {
        if wait {
            self.copied
                .synchronize()
                .map_err(|e| gpu_err("wait for the page step", e))?;
        }
        let block_bytes = (self.host.block_elems() * 2 * 2) as u64;
        let n_slots = self.cache.n_slots();
        let d = self.dev.as_mut().unwrap();
        let now: [u64; 5] = std::array::from_fn(|i| d.stats.read_u64(i));
        let dl: [u64; 5] = std::array::from_fn(|i| now[i].saturating_sub(d.seen[i]));
        d.seen = now;
        if now[3] > 0 {
            return Err(Error::Invalid(format!(
                "device page cache of {n_slots} slots could not hold a step's pages ({} steps); raise the device cache size",
                now[3]
            )));
        }
        Ok(CacheStats {
            hits: dl[0],
            misses: dl[1],
            bytes_copied: dl[1] * block_bytes,
            evictions: dl[2],
        })
    }

    /// Device policy: (slot of each host head block or -1, head block of
    /// each slot or -1), for checks against `kv::PageClock`.
    pub fn read_block_maps(&self) -> Result<(Vec<i32>, Vec<i32>)> {
        let d = self
            .dev
            .as_ref()
            .ok_or_else(|| Error::Invalid("host-policy page cache has no device maps".into()))?;
        Ok((
            d.block_slot.read(d.block_slot.bytes / 4)?,
            d.slot_block.read(d.slot_block.bytes / 4)?,
        ))
    }

    /// Block-sparse decode through the slot table (after `prepare` with the
    /// same selections). Arguments as `dispatch::decode`.
    #[allow(clippy::too_many_arguments)]
    pub fn decode(
        &mut self,
        gpu: &GpuContext,
        ws: &mut DecodeWorkspace,
        shape: &AttnShape,
        q: u64,
        sel: &DeviceSelection,
        max_tokens: usize,
        split_tokens: Option<usize>,
        out: u64,
    ) -> Result<()> {
        shape.validate()?;
        let lay = self.host.layout;
        if shape.n_kv_heads != lay.n_kv_heads || shape.head_dim != lay.head_dim {
            return Err(Error::shape(
                "CUDA offload decode KV",
                format!("{} heads x {}", shape.n_kv_heads, shape.head_dim),
                format!("{} heads x {}", lay.n_kv_heads, lay.head_dim),
            ));
        }
        if !kernels::HEAD_DIMS.contains(&shape.head_dim)
            || !kernels::GROUPS.contains(&shape.group())
        {
            return Err(Error::Invalid(format!(
                "CUDA kernels support head_dim 64/128/256 and GQA groups 1/2/4/8, got head_dim {} group {}",
                shape.head_dim,
                shape.group()
            )));
        }
        let nb = self.host.tables.len();
        if sel.rows != nb * lay.n_kv_heads {
            return Err(Error::shape(
                "CUDA offload decode selection rows",
                nb * lay.n_kv_heads,
                sel.rows,
            ));
        }
        launch_attention(
            gpu,
            ws,
            shape,
            "slot_",
            KvPtrs {
                k: self.slot_k.ptr,
                v: self.slot_v.ptr,
                table: self.slot_table.ptr,
                table_stride: self.stride,
                page_size: lay.page_size,
                dtype: self.host.dtype,
            },
            q,
            nb,
            sel,
            max_tokens,
            split_tokens,
            out,
            1,
            0,
            0,
        )?;
        self.attended
            .record(&gpu.stream)
            .map_err(|e| gpu_err("record attention event", e))
    }

    /// Record that attention launched on `gpu.stream` (what `decode` does
    /// after its launch) for callers that launch the `slot_` kernels
    /// themselves: the next `prepare` refills no slot before it ran.
    pub fn attention_launched(&self, gpu: &GpuContext) -> Result<()> {
        self.attended
            .record(&gpu.stream)
            .map_err(|e| gpu_err("record attention event", e))
    }

    /// Slot arena contents (K, V) as raw 16-bit words, for round-trip checks.
    pub fn read_slots(&self) -> Result<(Vec<u16>, Vec<u16>)> {
        let n = self.slot_k.bytes / 2;
        Ok((self.slot_k.read(n)?, self.slot_v.read(n)?))
    }

    /// The device slot table, for checks.
    pub fn read_table(&self) -> Result<Vec<i32>> {
        self.slot_table.read(self.slot_table.bytes / 4)
    }
}

impl DevicePages {
    fn new(host: &HostKv, n_slots: usize) -> Result<Self> {
        let n_blocks = host.n_pages * host.layout.n_kv_heads;
        let (table, pstride) = host.device_table();
        let zeroed = |bytes: usize| -> Result<DevBuf> {
            let b = DevBuf::alloc(bytes)?;
            b.fill_bytes(0)?;
            Ok(b)
        };
        let minus1 = |n: usize| -> Result<DevBuf> {
            let b = DevBuf::alloc(n * 4)?;
            b.fill_bytes(0xff)?;
            Ok(b)
        };
        let mut stats = PinnedBuf::alloc(64)?;
        stats.write_at(0, &[0u64; 8]);
        Ok(DevicePages {
            ptable: DevBuf::from_slice(&table)?,
            pstride,
            stamp: zeroed(n_blocks * 4)?,
            block_slot: minus1(n_blocks)?,
            slot_block: minus1(n_slots)?,
            slot_step: zeroed(n_slots * 4)?,
            slot_ref: zeroed(n_slots)?,
            miss: DevBuf::alloc(n_slots * 4)?,
            scratch: DevBuf::alloc(n_slots.next_power_of_two() * 4)?,
            victim: DevBuf::alloc(n_slots * 4)?,
            miss_cap: n_slots,
            ctr: zeroed(32)?,
            stats,
            seen: [0; 5],
            step: 0,
        })
    }

    fn bytes(&self) -> usize {
        [
            &self.ptable,
            &self.stamp,
            &self.block_slot,
            &self.slot_block,
            &self.slot_step,
            &self.slot_ref,
            &self.miss,
            &self.scratch,
            &self.victim,
            &self.ctr,
        ]
        .iter()
        .map(|b| b.bytes)
        .sum()
    }
}

impl OffloadKv {
    /// `PagePolicy::Device`: read page ids from a device i32 table
    /// `[rows][stride]` owned by the caller (an engine's cell-order table,
    /// page size 1) instead of the copy made at construction, which cannot
    /// follow an engine's appends. The caller keeps it allocated and
    /// current while steps that use it run.
    pub fn set_device_page_table(&mut self, ptr: u64, stride: usize, rows: usize) -> Result<()> {
        let d = self.dev.as_mut().ok_or_else(|| {
            Error::Invalid("offload: device page table on a host-policy page cache".into())
        })?;
        if rows != self.host.tables.len() || stride == 0 {
            return Err(Error::shape(
                "offload device page table rows",
                self.host.tables.len(),
                rows,
            ));
        }
        d.ptable = DevBuf::borrowed(ptr, rows * stride * 4);
        d.pstride = stride;
        // Page ids may differ now: the next step walks.
        self.walked = None;
        Ok(())
    }

    /// Give the host tier back (drops the device cache).
    pub fn into_host(self) -> HostKv {
        self.host
    }
}
