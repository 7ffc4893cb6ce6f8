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
}

impl OffloadKv {
    pub fn new(gpu: &GpuContext, host: HostKv, n_slots: usize) -> Result<Self> {
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
        copied
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

    /// Device bytes of the slot arena and slot table.
    pub fn device_bytes(&self) -> usize {
        self.slot_k.bytes + self.slot_v.bytes + self.slot_table.bytes
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

impl OffloadKv {
    /// Give the host tier back (drops the device cache).
    pub fn into_host(self) -> HostKv {
        self.host
    }
}
