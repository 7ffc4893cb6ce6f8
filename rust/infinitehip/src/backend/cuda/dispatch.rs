//! Launch code: a paged KV pool on the device, selections in the kernels'
//! CSR form, block-sparse flash decode (split-K + combine) and InfiniteHiP
//! mask estimation for decode. Buffers are raw device pointers, so an
//! engine's own tensors (caller-owned pointers) can be passed in as well.

use std::ops::Range;

use cudarc::driver::{CudaEvent, LaunchConfig, PushKernelArg};

use super::hip_fast::{FastEstimator, FastInputs, MaskEstimator};
use super::{gpu_err, kernels, DevBuf, GpuContext};
use crate::attention::AttnShape;
use crate::backend::launch_grid::{grid, row_split_grid};
use crate::config::{AsyncRefresh as AsyncMode, HipConfig};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::kv::KvPool;
use crate::policy::Selection;

/// K/V of a batch of sequences in device memory with a page table per
/// sequence (`[batch][table_stride]` i32 page ids). Token `t` of KV head `h`
/// is the `head_dim` elements at
/// `page * page_stride + h * head_stride + (t % page_size) * head_dim`,
/// `page = table[b][t / page_size]` (kernels/common.cuh `kv_row`). `upload`
/// makes the core pool's layout `[page][kv_head][page_size][head_dim]`;
/// `borrowed` wraps an engine's own tensors (SGLang's token-major
/// `[slots][kv_heads][head_dim]` is page_size 1, page_stride = the slot
/// stride, head_stride = the head stride; the table is `req_to_token`).
pub struct DeviceKv {
    pub k: DevBuf,
    pub v: DevBuf,
    pub table: DevBuf,
    pub table_stride: usize,
    pub page_size: usize,
    /// Elements between consecutive pages (slots when page_size is 1).
    pub page_stride: usize,
    /// Elements between consecutive KV heads of one page.
    pub head_stride: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
    /// Current length of each sequence (may be lowered, e.g. to replay a
    /// growing sequence; never above `capacity`).
    pub lens: Vec<usize>,
    /// Tokens uploaded per sequence.
    pub capacity: Vec<usize>,
}

fn as_u16<T: Element>(x: &[T]) -> &[u16] {
    assert_eq!(std::mem::size_of::<T>(), 2);
    // SAFETY: bf16/f16 are 2-byte plain data (repr(transparent) over u16).
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u16, x.len()) }
}

impl DeviceKv {
    /// Upload sequences `(pool, seq id)`; pages are copied once each.
    pub fn upload<T: Element>(seqs: &[(&KvPool<T>, u64)]) -> Result<Self> {
        let dtype = T::DTYPE;
        if kernels::dtype_tag(dtype).is_none() {
            return Err(Error::Invalid(format!(
                "CUDA backend stores bf16 or f16 K/V, got {dtype}"
            )));
        }
        let lay = seqs
            .first()
            .ok_or_else(|| Error::Invalid("DeviceKv::upload: no sequences".into()))?
            .0
            .layout();
        let pe = lay.page_elems();
        let mut n_pages = 0usize;
        let mut stride = 1usize;
        for (p, s) in seqs {
            if p.layout() != lay {
                return Err(Error::shape(
                    "DeviceKv sequences' layouts",
                    format!("{lay:?}"),
                    format!("{:?}", p.layout()),
                ));
            }
            let t = p.page_table(*s)?;
            n_pages += t.len();
            stride = stride.max(t.len());
        }
        let k = DevBuf::alloc(n_pages.max(1) * pe * 2)?;
        let v = DevBuf::alloc(n_pages.max(1) * pe * 2)?;
        let mut table = vec![0i32; seqs.len() * stride];
        let mut lens = Vec::new();
        let mut next = 0usize;
        let group = 512usize;
        let mut kst: Vec<u16> = Vec::with_capacity(group * pe);
        let mut vst: Vec<u16> = Vec::with_capacity(group * pe);
        let mut first = 0usize;
        let flush = |kst: &mut Vec<u16>, vst: &mut Vec<u16>, first: usize| -> Result<()> {
            if kst.is_empty() {
                return Ok(());
            }
            // SAFETY: `k`/`v` were allocated above for every token's page rows; `first * pe +
            // kst.len()` elements stay inside them.
            unsafe {
                cudarc::driver::result::memcpy_htod_sync(k.ptr + (first * pe * 2) as u64, &kst[..])
                    .map_err(|e| gpu_err("upload K", e))?;
                cudarc::driver::result::memcpy_htod_sync(v.ptr + (first * pe * 2) as u64, &vst[..])
                    .map_err(|e| gpu_err("upload V", e))?;
            }
            kst.clear();
            vst.clear();
            Ok(())
        };
        for (b, (p, s)) in seqs.iter().enumerate() {
            lens.push(p.seq_len(*s)?);
            for (i, &page) in p.page_table(*s)?.iter().enumerate() {
                let (pk, pv) = p.page_data(page)?;
                kst.extend_from_slice(as_u16(pk));
                vst.extend_from_slice(as_u16(pv));
                table[b * stride + i] = next as i32;
                next += 1;
                if kst.len() >= group * pe {
                    flush(&mut kst, &mut vst, first)?;
                    first = next;
                }
            }
        }
        flush(&mut kst, &mut vst, first)?;
        Ok(DeviceKv {
            k,
            v,
            table: DevBuf::from_slice(&table)?,
            table_stride: stride,
            page_size: lay.page_size,
            page_stride: pe,
            head_stride: lay.page_size * lay.head_dim,
            n_kv_heads: lay.n_kv_heads,
            head_dim: lay.head_dim,
            dtype,
            capacity: lens.clone(),
            lens,
        })
    }

    /// K/V over caller-owned device memory (an engine's tensors), never
    /// freed here. `table` is a device i32 `[batch][table_stride]` of page
    /// (or slot) ids; `lens` the current length of each row. Strides are in
    /// elements; rows must be 16-byte aligned (pointers and strides checked
    /// here). The table's entries are the caller's contract: they must name
    /// pages inside the K and V allocations for every token below `lens`.
    #[allow(clippy::too_many_arguments, clippy::manual_is_multiple_of)] // MSRV 1.80
    pub fn borrowed(
        k: u64,
        v: u64,
        dtype: DType,
        table: u64,
        table_stride: usize,
        page_size: usize,
        page_stride: usize,
        head_stride: usize,
        n_kv_heads: usize,
        head_dim: usize,
        lens: Vec<usize>,
    ) -> Result<Self> {
        if kernels::dtype_tag(dtype).is_none() {
            return Err(Error::Invalid(format!(
                "CUDA kernels read bf16 or f16 K/V, got {dtype}"
            )));
        }
        for (name, p) in [("k", k), ("v", v), ("table", table)] {
            if p == 0 {
                return Err(Error::Invalid(format!(
                    "borrowed KV: {name} pointer is NULL"
                )));
            }
        }
        if k % 16 != 0 || v % 16 != 0 {
            return Err(Error::Invalid(format!(
                "borrowed KV: k ({k:#x}) and v ({v:#x}) must be 16-byte aligned"
            )));
        }
        if table % 4 != 0 {
            return Err(Error::Invalid(format!(
                "borrowed KV: table ({table:#x}) must be 4-byte aligned (int32)"
            )));
        }
        if page_size == 0 || n_kv_heads == 0 || table_stride == 0 {
            return Err(Error::Invalid(format!(
                "borrowed KV: page_size {page_size}, n_kv_heads {n_kv_heads}, table_stride {table_stride} must be positive"
            )));
        }
        for (name, st) in [("page_stride", page_stride), ("head_stride", head_stride)] {
            if st % 8 != 0 {
                return Err(Error::Invalid(format!(
                    "borrowed KV: {name} {st} must be a multiple of 8 elements (16-byte rows)"
                )));
            }
        }
        if page_size > 1 && head_stride < page_size * head_dim {
            return Err(Error::Invalid(format!(
                "borrowed KV: head_stride {head_stride} smaller than page_size x head_dim = {}",
                page_size * head_dim
            )));
        }
        let cap = table_stride * page_size;
        Ok(DeviceKv {
            k: DevBuf::borrowed(k, 0),
            v: DevBuf::borrowed(v, 0),
            table: DevBuf::borrowed(table, 0),
            table_stride,
            page_size,
            page_stride,
            head_stride,
            n_kv_heads,
            head_dim,
            dtype,
            capacity: vec![cap; lens.len()],
            lens,
        })
    }

    pub fn batch(&self) -> usize {
        self.lens.len()
    }

    pub(crate) fn strides(&self) -> KvStrides {
        KvStrides {
            page: self.page_stride as i64,
            head: self.head_stride as i64,
        }
    }

    /// Every length within what was uploaded (kernels index the page table
    /// with them).
    pub fn check_lens(&self) -> Result<()> {
        for (b, (&l, &c)) in self.lens.iter().zip(&self.capacity).enumerate() {
            if l > c || self.lens.len() != self.capacity.len() {
                return Err(Error::OutOfRange(format!(
                    "DeviceKv sequence {b}: length {l} exceeds the {c} uploaded tokens"
                )));
            }
        }
        Ok(())
    }
}

/// Per-(sequence, kv head) token ranges in the kernels' form.
pub struct DeviceSelection {
    pub ranges: DevBuf,
    pub cum: DevBuf,
    pub cnt: DevBuf,
    pub tot: DevBuf,
    pub cap: usize,
    pub rows: usize,
    /// Largest per-row token count (sizes the split-K grid).
    pub max_tokens: usize,
}

impl DeviceSelection {
    /// `from_host`, checking every range against the sequences' lengths.
    pub fn for_kv(kv: &DeviceKv, sels: &[Selection]) -> Result<Self> {
        kv.check_lens()?;
        if sels.len() != kv.batch() {
            return Err(Error::shape(
                "selections per sequence",
                kv.batch(),
                sels.len(),
            ));
        }
        for (b, s) in sels.iter().enumerate() {
            if s.n_kv_heads() != kv.n_kv_heads {
                return Err(Error::shape(
                    format!("selection {b} heads"),
                    kv.n_kv_heads,
                    s.n_kv_heads(),
                ));
            }
            if let Some(r) = s.heads.iter().flatten().find(|r| r.end > kv.lens[b]) {
                return Err(Error::OutOfRange(format!(
                    "selection {b} range {r:?} beyond the sequence's {} tokens",
                    kv.lens[b]
                )));
            }
        }
        Self::from_host(sels)
    }

    /// Rows `[batch][kv_head]` from one `Selection` per sequence (ranges are
    /// trusted: use `for_kv` to check them against a `DeviceKv`).
    pub fn from_host(sels: &[Selection]) -> Result<Self> {
        let hkv = sels.first().map_or(0, |s| s.n_kv_heads());
        let rows = sels.len() * hkv;
        let cap = sels
            .iter()
            .flat_map(|s| s.heads.iter().map(|h| h.len()))
            .max()
            .unwrap_or(1)
            .max(1);
        let mut ranges = vec![[0i32; 2]; rows * cap];
        let mut cum = vec![0i32; rows * cap];
        let mut cnt = vec![0i32; rows];
        let mut tot = vec![0i32; rows];
        let mut max_tokens = 0;
        for (b, s) in sels.iter().enumerate() {
            if s.n_kv_heads() != hkv {
                return Err(Error::shape("selection heads", hkv, s.n_kv_heads()));
            }
            for (h, rs) in s.heads.iter().enumerate() {
                let r = b * hkv + h;
                let mut acc = 0usize;
                for (i, x) in rs.iter().enumerate() {
                    ranges[r * cap + i] = [x.start as i32, x.end as i32];
                    cum[r * cap + i] = acc as i32;
                    acc += x.len();
                }
                cnt[r] = rs.len() as i32;
                tot[r] = acc as i32;
                max_tokens = max_tokens.max(acc);
            }
        }
        Ok(DeviceSelection {
            ranges: DevBuf::from_slice(&ranges)?,
            cum: DevBuf::from_slice(&cum)?,
            cnt: DevBuf::from_slice(&cnt)?,
            tot: DevBuf::from_slice(&tot)?,
            cap,
            rows,
            max_tokens,
        })
    }

    pub fn empty(rows: usize, cap: usize) -> Result<Self> {
        Ok(DeviceSelection {
            ranges: DevBuf::alloc(rows * cap * 8)?,
            cum: DevBuf::alloc(rows * cap * 4)?,
            cnt: DevBuf::alloc(rows * 4)?,
            tot: DevBuf::alloc(rows * 4)?,
            cap,
            rows,
            max_tokens: 0,
        })
    }

    /// Read back as host selections (for tests).
    pub fn to_host(&self, n_kv_heads: usize) -> Result<Vec<Selection>> {
        let rg: Vec<[i32; 2]> = self.ranges.read(self.rows * self.cap)?;
        let cnt: Vec<i32> = self.cnt.read(self.rows)?;
        let mut out = Vec::new();
        for b in 0..self.rows / n_kv_heads {
            let heads = (0..n_kv_heads)
                .map(|h| {
                    let r = b * n_kv_heads + h;
                    (0..cnt[r] as usize)
                        .map(|i| {
                            let x = rg[r * self.cap + i];
                            x[0] as usize..x[1] as usize
                        })
                        .collect()
                })
                .collect();
            out.push(Selection::from_ranges(heads));
        }
        Ok(out)
    }
}

/// Scratch for split-K partials.
pub struct DecodeWorkspace {
    pm: DevBuf,
    pl: DevBuf,
    pacc: DevBuf,
    cap_rows: usize,
}

impl DecodeWorkspace {
    pub fn new() -> Self {
        DecodeWorkspace {
            pm: DevBuf::null(),
            pl: DevBuf::null(),
            pacc: DevBuf::null(),
            cap_rows: 0,
        }
    }
    pub(crate) fn ensure(&mut self, rows: usize, d: usize) -> Result<()> {
        if rows > self.cap_rows {
            let rows = rows.next_power_of_two();
            self.pm = DevBuf::alloc(rows * 4)?;
            self.pl = DevBuf::alloc(rows * 4)?;
            self.pacc = DevBuf::alloc(rows * d * 4)?;
            self.cap_rows = rows;
        }
        Ok(())
    }
}

impl Default for DecodeWorkspace {
    fn default() -> Self {
        Self::new()
    }
}

pub(crate) fn check_shape(shape: &AttnShape, kv: &DeviceKv) -> Result<()> {
    shape.validate()?;
    if shape.n_kv_heads != kv.n_kv_heads || shape.head_dim != kv.head_dim {
        return Err(Error::shape(
            "CUDA decode KV",
            format!("{} heads x {}", shape.n_kv_heads, shape.head_dim),
            format!("{} heads x {}", kv.n_kv_heads, kv.head_dim),
        ));
    }
    if !kernels::HEAD_DIMS.contains(&shape.head_dim) || !kernels::GROUPS.contains(&shape.group()) {
        return Err(Error::Invalid(format!(
            "CUDA kernels support head_dim 64/128/256 and GQA groups 1/2/4/8, got head_dim {} group {}",
            shape.head_dim,
            shape.group()
        )));
    }
    Ok(())
}

/// Block-sparse decode: `q` is `[batch][n_q_heads][head_dim]` f32 on the
/// device, `out` the same shape (f32). `split_tokens` None picks a split
/// size that gives about eight CTAs per SM.
#[allow(clippy::too_many_arguments)]
pub fn decode(
    gpu: &GpuContext,
    ws: &mut DecodeWorkspace,
    shape: &AttnShape,
    kv: &DeviceKv,
    q: u64,
    sel: &DeviceSelection,
    max_tokens: usize,
    split_tokens: Option<usize>,
    out: u64,
) -> Result<()> {
    let b = kv.batch();
    if sel.rows != b * shape.n_kv_heads {
        return Err(Error::shape(
            "CUDA decode selection rows",
            b * shape.n_kv_heads,
            sel.rows,
        ));
    }
    attend(
        gpu,
        ws,
        shape,
        kv,
        q,
        b,
        sel,
        max_tokens,
        split_tokens,
        out,
        1,
        0,
        0,
    )
}

/// The shared attention launch. Query row i (of `n_rows`) reads selection
/// row `(i / q_block, head)`, the page table of sequence `q_seq[i]` (0: row
/// i) and, when `q_pos` is non-null, only tokens at or before `q_pos[i]`.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    gpu: &GpuContext,
    ws: &mut DecodeWorkspace,
    shape: &AttnShape,
    kv: &DeviceKv,
    q: u64,
    n_rows: usize,
    sel: &DeviceSelection,
    max_tokens: usize,
    split_tokens: Option<usize>,
    out: u64,
    q_block: usize,
    q_seq: u64,
    q_pos: u64,
) -> Result<()> {
    attend_with(
        gpu,
        ws,
        shape,
        kv,
        q,
        n_rows,
        sel,
        max_tokens,
        split_tokens,
        out,
        q_block,
        q_seq,
        q_pos,
        AttnKernel::Auto,
    )
}

/// `attend` with the kernel chosen by the caller (tests and benchmarks run
/// both twins on the same inputs). `AttnKernel::TensorCore` is an error
/// where the tensor-core kernel does not apply (see `tc_applies`).
#[allow(clippy::too_many_arguments)]
pub fn attend_with(
    gpu: &GpuContext,
    ws: &mut DecodeWorkspace,
    shape: &AttnShape,
    kv: &DeviceKv,
    q: u64,
    n_rows: usize,
    sel: &DeviceSelection,
    max_tokens: usize,
    split_tokens: Option<usize>,
    out: u64,
    q_block: usize,
    q_seq: u64,
    q_pos: u64,
    kernel: AttnKernel,
) -> Result<()> {
    check_shape(shape, kv)?;
    kv.check_lens()?;
    let hkv = shape.n_kv_heads;
    if sel.rows != n_rows.div_ceil(q_block) * hkv {
        return Err(Error::shape(
            "CUDA attention selection rows",
            n_rows.div_ceil(q_block) * hkv,
            sel.rows,
        ));
    }
    launch_attention_kernel(
        gpu,
        ws,
        shape,
        KvPtrs {
            k: kv.k.ptr,
            v: kv.v.ptr,
            table: kv.table.ptr,
            table_stride: kv.table_stride,
            page_size: kv.page_size,
            dtype: kv.dtype,
        },
        kv.strides(),
        q,
        n_rows,
        sel,
        max_tokens,
        split_tokens,
        AttnOut::f32_rows(out, shape),
        q_block,
        q_seq,
        q_pos,
        kernel,
        false,
    )
}

/// Per-row prefix attention over a `DeviceKv` (the input of
/// `launch_prefill_rows`, the engine's dense prefill) with a chosen kernel:
/// query row i attends tokens `0..end_i` of table row `q_seq[i]`, its
/// selection row `(i, head)` holding the one range `0..end_i` (or none).
/// `q` f32 `[n_rows][n_q_heads][head_dim]`, pre-scaled by nothing (the
/// shape's scale applies). The tensor-core kernel writes NaN for a row whose
/// selection is not such a prefix.
#[allow(clippy::too_many_arguments)]
pub fn attend_rows(
    gpu: &GpuContext,
    ws: &mut DecodeWorkspace,
    shape: &AttnShape,
    kv: &DeviceKv,
    q: u64,
    n_rows: usize,
    sel: &DeviceSelection,
    q_seq: u64,
    out: AttnOut,
    kernel: AttnKernel,
) -> Result<()> {
    check_shape(shape, kv)?;
    kv.check_lens()?;
    if sel.rows != n_rows * shape.n_kv_heads {
        return Err(Error::shape(
            "prefix-row attention selection rows",
            n_rows * shape.n_kv_heads,
            sel.rows,
        ));
    }
    if q_seq == 0 {
        return Err(Error::Invalid(
            "prefix-row attention: q_seq (table row per query) is NULL".into(),
        ));
    }
    let ptrs = KvPtrs {
        k: kv.k.ptr,
        v: kv.v.ptr,
        table: kv.table.ptr,
        table_stride: kv.table_stride,
        page_size: kv.page_size,
        dtype: kv.dtype,
    };
    let tc = match kernel {
        _ if cuda_core_forced() => false,
        AttnKernel::CudaCore => false,
        AttnKernel::TensorCore => true,
        AttnKernel::Auto => tc_applies(shape, kv.dtype, &out),
    };
    let k = if tc {
        AttnKernel::TensorCore
    } else {
        AttnKernel::CudaCore
    };
    launch_attention_kernel(
        gpu,
        ws,
        shape,
        ptrs,
        kv.strides(),
        q,
        n_rows,
        sel,
        sel.max_tokens.max(1),
        None,
        out,
        1,
        q_seq,
        0,
        k,
        true,
    )
}

/// Which attention kernel a launch runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernel {
    /// The tensor-core prefill kernel where it applies and pays (query
    /// blocks of at least one tile: prefill), else the CUDA-core kernel.
    Auto,
    /// kernels/decode.cu (split-K + combine, one query row at a time): the
    /// reference twin, any head_dim / group / layout.
    CudaCore,
    /// kernels/prefill_tc.cu (query tile x key tile on mma.sync).
    TensorCore,
}

/// Query rows per tensor-core tile of `mt` m16 tiles per warp (64 * mt M
/// rows = rows x GQA group).
pub fn tc_rows_per_tile(shape: &AttnShape, mt: usize) -> usize {
    64 * mt / shape.group().max(1)
}

/// Forced m16 tiles per warp of the tensor-core kernel (0: chosen per
/// launch). For benchmarks comparing the two variants.
static TC_MT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Force the tensor-core kernel's m16 tiles per warp (1 or 2; None: the
/// default choice, see `launch_prefill_tc`).
pub fn force_tc_tiles_per_warp(mt: Option<usize>) {
    TC_MT.store(mt.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
}

/// `INFINITEHIP_ATTN_KERNEL=cuda_core` (diagnostic, read once per
/// process): every attention launch that would run the tensor-core kernel
/// (bf16/f16 q and P) runs the CUDA-core kernel (f32) instead, so an
/// engine's GPU route can be compared with its CPU route without the
/// tensor cores' rounding (issue 12: on small random models that rounding
/// flips near-tied hip block choices, and the flips compound over layers).
pub fn cuda_core_forced() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        let on = std::env::var("INFINITEHIP_ATTN_KERNEL").is_ok_and(|v| v == "cuda_core");
        if on {
            tracing::warn!(
                "INFINITEHIP_ATTN_KERNEL=cuda_core: attention runs the CUDA-core kernel only"
            );
        }
        on
    })
}

/// Whether the tensor-core kernel can run this launch: head_dim 64 or 128,
/// bf16/f16 K/V, GQA group 1/2/4/8, an f32/f16/bf16 output whose rows allow
/// 8-byte (f32) or 4-byte (f16/bf16) pair stores.
#[allow(clippy::manual_is_multiple_of)] // MSRV 1.80
pub(crate) fn tc_applies(shape: &AttnShape, kv_dtype: DType, out: &AttnOut) -> bool {
    let pair = if out.dtype == DType::F32 { 8 } else { 4 };
    kernels::TC_HEAD_DIMS.contains(&shape.head_dim)
        && kernels::GROUPS.contains(&shape.group())
        && kernels::dtype_tag(kv_dtype).is_some()
        && out.ptr % pair == 0
        && out.row_stride % 2 == 0
}

/// Causal attention of query rows over per-row prefix selections: row i
/// attends tokens `0..end_i` of table row `q_seq[i]`, where its selection
/// row `(i, head)` holds the single range `0..end_i` (or none). This is the
/// engine's dense (chunked) prefill; arguments as `launch_attention_ex`
/// (`q_block` 1). Runs the tensor-core kernel where it applies (rows of one
/// request share key tiles), else the CUDA-core kernel on the same input.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_prefill_rows(
    gpu: &GpuContext,
    ws: &mut DecodeWorkspace,
    shape: &AttnShape,
    variant: &str,
    kv: KvPtrs,
    st: KvStrides,
    q: u64,
    n_rows: usize,
    sel: &DeviceSelection,
    max_tokens: usize,
    split_tokens: Option<usize>,
    out: AttnOut,
    q_block: usize,
    q_seq: u64,
    q_pos: u64,
) -> Result<()> {
    if variant.is_empty()
        && q_block == 1
        && tc_applies(shape, kv.dtype, &out)
        && !cuda_core_forced()
    {
        return launch_attention_kernel(
            gpu,
            ws,
            shape,
            kv,
            st,
            q,
            n_rows,
            sel,
            max_tokens,
            split_tokens,
            out,
            q_block,
            q_seq,
            q_pos,
            AttnKernel::TensorCore,
            true,
        );
    }
    launch_attention_ex(
        gpu,
        ws,
        shape,
        variant,
        kv,
        st,
        q,
        n_rows,
        sel,
        max_tokens,
        split_tokens,
        out,
        q_block,
        q_seq,
        q_pos,
    )
}

/// The kernel choice over a paged pool (module `decode` / `prefill_tc`).
/// `prefix`: every row's selection is one range `0..end` (see
/// `launch_prefill_rows`); the CUDA-core kernel reads such selections as
/// they are.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_attention_kernel(
    gpu: &GpuContext,
    ws: &mut DecodeWorkspace,
    shape: &AttnShape,
    kv: KvPtrs,
    st: KvStrides,
    q: u64,
    n_rows: usize,
    sel: &DeviceSelection,
    max_tokens: usize,
    split_tokens: Option<usize>,
    out: AttnOut,
    q_block: usize,
    q_seq: u64,
    q_pos: u64,
    kernel: AttnKernel,
    prefix: bool,
) -> Result<()> {
    let fits = tc_applies(shape, kv.dtype, &out);
    let kernel = if cuda_core_forced() {
        AttnKernel::CudaCore
    } else {
        kernel
    };
    let tc = match kernel {
        AttnKernel::CudaCore => false,
        AttnKernel::Auto => fits && q_block >= tc_rows_per_tile(shape, 1),
        AttnKernel::TensorCore => {
            if !fits {
                return Err(Error::Invalid(format!(
                    "tensor-core prefill: needs head_dim 64/128, GQA group 1/2/4/8, bf16/f16 K/V and an aligned output; got head_dim {} group {} K/V {} output {} (ptr {:#x}, row stride {})",
                    shape.head_dim,
                    shape.group(),
                    kv.dtype,
                    out.dtype,
                    out.ptr,
                    out.row_stride
                )));
            }
            true
        }
    };
    if !tc {
        return launch_attention_ex(
            gpu,
            ws,
            shape,
            "",
            kv,
            st,
            q,
            n_rows,
            sel,
            max_tokens,
            split_tokens,
            out,
            q_block,
            q_seq,
            q_pos,
        );
    }
    launch_prefill_tc(
        gpu, shape, kv, st, q, n_rows, sel, out, q_block, q_seq, q_pos, prefix,
    )
}

/// One launch of kernels/prefill_tc.cu: grid (query tiles, kv heads), 128
/// threads, K/V stages in dynamic shared memory.
#[allow(clippy::too_many_arguments, clippy::manual_is_multiple_of)] // MSRV 1.80
fn launch_prefill_tc(
    gpu: &GpuContext,
    shape: &AttnShape,
    kv: KvPtrs,
    st: KvStrides,
    q: u64,
    n_rows: usize,
    sel: &DeviceSelection,
    out: AttnOut,
    q_block: usize,
    q_seq: u64,
    q_pos: u64,
    prefix: bool,
) -> Result<()> {
    if n_rows == 0 {
        return Ok(());
    }
    if q_block == 0 {
        return Err(Error::Invalid("tensor-core prefill: q_block is 0".into()));
    }
    let (hkv, d, g) = (shape.n_kv_heads, shape.head_dim, shape.group());
    let tag = kernels::dtype_tag(kv.dtype).unwrap();
    // Two m16 tiles per warp (128 M rows per CTA) where a tile stays within
    // one query block (or rows are prefix rows, split by sequence anyway),
    // else one.
    let mt = match TC_MT.load(std::sync::atomic::Ordering::Relaxed) {
        0 if prefix || q_block % tc_rows_per_tile(shape, 2) == 0 => 2,
        0 => 1,
        x => x.clamp(1, 2),
    };
    let name = if mt == 2 { "prefill_tc2" } else { "prefill_tc" };
    let f = gpu.func("prefill_tc", &format!("{name}_{tag}_d{d}_g{g}"))?;
    // K and V, two stages each, of `bn` keys x head_dim; Q (64 * mt rows)
    // borrows K stage 1 when mt is 1 (kernels/prefill_tc.cu TC_BN_OF).
    let bn = if mt == 2 && d > 64 { 32 } else { 64 };
    let smem = (4 * bn * d + if mt == 2 { 128 * d } else { 0 }) * 2;
    // Always raise the dynamic limit: static shared memory (about 8-10 KB)
    // counts against the default 48 KB too (48 KB dynamic at head_dim 64
    // with two m-tiles per warp would not launch).
    f.set_attribute(
        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .map_err(|e| gpu_err("raise prefill_tc shared memory", e))?;
    let tiles = n_rows.div_ceil(tc_rows_per_tile(shape, mt));
    let scale_log2 = shape.scale * std::f32::consts::LOG2_E;
    let (ts, ps, hk, cap, nr, qb, pf) = (
        kv.table_stride as i32,
        kv.page_size as i32,
        hkv as i32,
        sel.cap as i32,
        n_rows as i32,
        q_block as i32,
        prefix as i32,
    );
    let (ors, odt) = (out.row_stride as i64, out.code());
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(&kv.k)
        .arg(&kv.v)
        .arg(&kv.table)
        .arg(&ts)
        .arg(&ps)
        .arg(&hk)
        .arg(&st.page)
        .arg(&st.head)
        .arg(&q)
        .arg(&scale_log2)
        .arg(&sel.ranges.ptr)
        .arg(&sel.cum.ptr)
        .arg(&sel.cnt.ptr)
        .arg(&sel.tot.ptr)
        .arg(&cap)
        .arg(&nr)
        .arg(&qb)
        .arg(&q_seq)
        .arg(&q_pos)
        .arg(&pf)
        .arg(&out.ptr)
        .arg(&ors)
        .arg(&odt);
    // SAFETY: the arguments pushed above follow the kernel's parameter list in kernels/*.cu (same
    // order and C types); every pointer is a device allocation of this context sized for this grid
    // by the code above.
    unsafe {
        l.launch(LaunchConfig {
            grid_dim: (tiles as u32, hkv as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        })
    }
    .map_err(|e| gpu_err("launch prefill_tc", e))?;
    Ok(())
}

/// Element strides of a K/V buffer (see `DeviceKv`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct KvStrides {
    pub page: i64,
    pub head: i64,
}

impl KvStrides {
    /// The core pool's page layout.
    pub fn pool(n_kv_heads: usize, page_size: usize, head_dim: usize) -> Self {
        KvStrides {
            page: (n_kv_heads * page_size * head_dim) as i64,
            head: (page_size * head_dim) as i64,
        }
    }
}

/// Where the combine writes: query row b's head h at
/// `ptr + (b * row_stride + h * head_dim) * size(dtype)`.
#[derive(Clone, Copy, Debug)]
pub struct AttnOut {
    pub ptr: u64,
    pub dtype: DType,
    /// Elements between consecutive query rows.
    pub row_stride: usize,
}

impl AttnOut {
    /// f32 `[rows][n_q_heads][head_dim]`, contiguous.
    pub fn f32_rows(ptr: u64, shape: &AttnShape) -> Self {
        AttnOut {
            ptr,
            dtype: DType::F32,
            row_stride: shape.n_q_heads * shape.head_dim,
        }
    }
    pub(crate) fn code(&self) -> i32 {
        match self.dtype {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Bf16 => 2,
        }
    }
}

/// K/V pointers and table for `launch_attention`.
#[derive(Clone, Copy)]
pub(crate) struct KvPtrs {
    pub k: u64,
    pub v: u64,
    pub table: u64,
    pub table_stride: usize,
    pub page_size: usize,
    pub dtype: DType,
}

/// The attention launch (split-K partials + combine). `variant` "" reads a
/// paged pool through a page table (module `decode`); "slot_" reads a slot
/// arena through a per-(page, kv head) slot table (module `decode_slot`).
/// Shapes are checked by the callers. K/V in the core pool's page layout,
/// f32 output `[n_rows][n_q_heads][head_dim]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_attention(
    gpu: &GpuContext,
    ws: &mut DecodeWorkspace,
    shape: &AttnShape,
    variant: &str,
    kv: KvPtrs,
    q: u64,
    n_rows: usize,
    sel: &DeviceSelection,
    max_tokens: usize,
    split_tokens: Option<usize>,
    out: u64,
    q_block: usize,
    q_seq: u64,
    q_pos: u64,
) -> Result<()> {
    let st = KvStrides::pool(shape.n_kv_heads, kv.page_size, shape.head_dim);
    launch_attention_ex(
        gpu,
        ws,
        shape,
        variant,
        kv,
        st,
        q,
        n_rows,
        sel,
        max_tokens,
        split_tokens,
        AttnOut::f32_rows(out, shape),
        q_block,
        q_seq,
        q_pos,
    )
}

/// `launch_attention` with K/V strides and the output's dtype and row
/// stride (the slot variant ignores the strides).
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_attention_ex(
    gpu: &GpuContext,
    ws: &mut DecodeWorkspace,
    shape: &AttnShape,
    variant: &str,
    kv: KvPtrs,
    st: KvStrides,
    q: u64,
    n_rows: usize,
    sel: &DeviceSelection,
    max_tokens: usize,
    split_tokens: Option<usize>,
    out: AttnOut,
    q_block: usize,
    q_seq: u64,
    q_pos: u64,
) -> Result<()> {
    let (hkv, d, g) = (shape.n_kv_heads, shape.head_dim, shape.group());
    let module = if variant.is_empty() {
        "decode"
    } else {
        "decode_slot"
    };
    let split =
        split_tokens.unwrap_or_else(|| default_split(gpu.sm_count, n_rows * hkv, max_tokens));
    let n_splits = max_tokens.div_ceil(split).max(1);
    let rows = n_rows * shape.n_q_heads * n_splits;
    ws.ensure(rows, d)?;
    let tag = kernels::dtype_tag(kv.dtype).unwrap();
    let f = gpu.func(module, &format!("{variant}decode_{tag}_d{d}_g{g}"))?;
    let scale_log2 = shape.scale * std::f32::consts::LOG2_E;
    let (ts, ps, hk, cap, sp, qb) = (
        kv.table_stride as i32,
        kv.page_size as i32,
        hkv as i32,
        sel.cap as i32,
        split as i32,
        q_block as i32,
    );
    let cfg = LaunchConfig {
        grid_dim: row_split_grid(gpu.grid_limits, n_rows, n_splits, hkv)?,
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let combine_grid = grid(
        gpu.grid_limits,
        "attention combine",
        (n_rows * shape.n_q_heads, 1, 1),
    )?;
    let ns = n_splits as i32;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(&kv.k)
        .arg(&kv.v)
        .arg(&kv.table)
        .arg(&ts)
        .arg(&ps)
        .arg(&hk)
        .arg(&st.page)
        .arg(&st.head)
        .arg(&q)
        .arg(&scale_log2)
        .arg(&sel.ranges.ptr)
        .arg(&sel.cum.ptr)
        .arg(&sel.cnt.ptr)
        .arg(&sel.tot.ptr)
        .arg(&cap)
        .arg(&sp)
        .arg(&ns)
        .arg(&ws.pm.ptr)
        .arg(&ws.pl.ptr)
        .arg(&ws.pacc.ptr)
        .arg(&qb)
        .arg(&q_seq)
        .arg(&q_pos);
    // SAFETY: the arguments pushed above follow the kernel's parameter list in kernels/*.cu (same
    // order and C types); every pointer is a device allocation of this context sized for this grid
    // by the code above.
    unsafe { l.launch(cfg) }.map_err(|e| gpu_err("launch attention", e))?;
    super::prof::mark(gpu, "attn partial")?;
    let fc = gpu.func(module, &format!("{variant}combine_d{d}"))?;
    let (hq, ors, odt) = (shape.n_q_heads as i32, out.row_stride as i64, out.code());
    let mut l = gpu.stream.launch_builder(&fc);
    l.arg(&ws.pm.ptr)
        .arg(&ws.pl.ptr)
        .arg(&ws.pacc.ptr)
        .arg(&ns)
        .arg(&out.ptr)
        .arg(&hq)
        .arg(&ors)
        .arg(&odt);
    // SAFETY: the arguments pushed above follow the kernel's parameter list in kernels/*.cu (same
    // order and C types); every pointer is a device allocation of this context sized for this grid
    // by the code above.
    unsafe {
        l.launch(LaunchConfig {
            grid_dim: combine_grid,
            block_dim: (d.min(128) as u32, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map_err(|e| gpu_err("launch combine", e))?;
    super::prof::mark(gpu, "attn combine")
}

/// CTAs per SM and split alignment of the attention launch's default
/// split (benchmarks sweep them; 0: the default).
static SPLIT_CTAS_PER_SM: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static SPLIT_ALIGN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Override the attention launch's default split: about `ctas_per_sm`
/// CTAs per SM, splits a multiple of `align` tokens (0 keeps a default).
pub fn set_split_tuning(ctas_per_sm: usize, align: usize) {
    SPLIT_CTAS_PER_SM.store(ctas_per_sm, std::sync::atomic::Ordering::Relaxed);
    SPLIT_ALIGN.store(align, std::sync::atomic::Ordering::Relaxed);
}

/// Tokens per split of the attention launch for `pairs` (row, kv head)
/// pairs of up to `max_tokens` selected tokens: about `ctas_per_sm` CTAs
/// per SM (4), each a multiple of `align` (128) tokens.
pub(crate) fn default_split(sm_count: usize, pairs: usize, max_tokens: usize) -> usize {
    let load = |a: &std::sync::atomic::AtomicUsize, d: usize| match a
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        0 => d,
        v => v,
    };
    let (per_sm, align) = (load(&SPLIT_CTAS_PER_SM, 4), load(&SPLIT_ALIGN, 128));
    let want = (per_sm * sm_count).div_ceil(pairs.max(1)).max(1);
    max_tokens.div_ceil(want).next_multiple_of(align).max(align)
}

/// Sink, middle and window of a decode query at `pos` (as policy::hip).
pub(crate) fn regions(cfg: &HipConfig, pos: usize) -> (Range<usize>, Range<usize>, Range<usize>) {
    let end = pos + 1;
    let sink_end = cfg.sink.min(end);
    let win_start = (pos + 1).saturating_sub(cfg.window).max(sink_end);
    (0..sink_end, sink_end..win_start, win_start..end)
}

/// Per-call inputs of the stage kernels.
pub(crate) struct StageInputs {
    pub rows: usize,
    pub row_seq: u64,
    pub q: u64,
    pub nq: u64,
    pub nq_max: usize,
    pub nq_tpl: usize,
    pub stage0_in: u64,
    pub stage0_cnt: u64,
    pub e0: usize,
    pub keys: u64,
    /// Kernel module of the score/top-k kernels ("hip_mask", or
    /// "hip_mask_host" for keys read through the estimation row cache).
    pub module: &'static str,
    /// Device refresh gate (`hip_step_meta`'s state, 0: none): stage s
    /// runs only when the step refreshes from s or earlier.
    pub gate: u64,
    /// Scratch of the multi-CTA top-k (`hip_topk_mc`); None: `hip_topk`.
    pub topk_mc: Option<TopkMcPtrs>,
    /// Stage 0 by cached chunk means (`hip.decode_stage0 = mean_key`,
    /// backend/cuda/mean_key.rs); None: the search.
    pub mean0: Option<super::mean_key::MeanPtrs>,
    /// The attention selection to build in the last stage's top-k launch
    /// (`hip_topk_asm`) where it runs one CTA per row; None: the caller
    /// assembles (`run_stages_to` says whether it was built).
    pub assemble: Option<FusedAsm>,
}

/// `assemble_rows`' outputs (rows from 0) for `hip_topk_asm`.
#[derive(Clone, Copy)]
pub(crate) struct FusedAsm {
    pub extra: u64,
    pub hkv: usize,
    pub ranges: u64,
    pub cum: u64,
    pub cnt: u64,
    pub tot: u64,
    pub cap: usize,
    pub tab: TabOut,
}

impl FusedAsm {
    pub(crate) fn new(sel: &DeviceSelection, extra: u64, hkv: usize, tab: Option<TabOut>) -> Self {
        FusedAsm {
            extra,
            hkv,
            ranges: sel.ranges.ptr,
            cum: sel.cum.ptr,
            cnt: sel.cnt.ptr,
            tot: sel.tot.ptr,
            cap: sel.cap,
            tab: tab.unwrap_or(TabOut::NONE),
        }
    }
}

static TOPK_ASM: super::switch::EnvSwitch = super::switch::EnvSwitch::new("INFINITEHIP_TOPK_ASM");

/// Build the attention selection inside the last stage's top-k launch
/// (`hip_topk_asm`, the default) or in its own `hip_assemble` launch
/// (`false`). Overrides `INFINITEHIP_TOPK_ASM`.
pub fn set_topk_asm(on: bool) {
    TOPK_ASM.set(on);
}

/// Whether callers should ask for the fused assembly (see `set_topk_asm`).
pub(crate) fn topk_asm() -> bool {
    TOPK_ASM.get()
}

/// Largest last-stage output (chunks per row) `hip_topk_asm` takes
/// (kernels/hip_mask.cu TOPK_ASM_CAP).
const TOPK_ASM_CAP: usize = 2048;

/// Scratch of `hip_topk_mc` (kernels/hip_mask.cu), device pointers: i32
/// arrival counters `[rows]` (zero between launches), i32 segment counts
/// `[rows][segs]`, int2 candidates `[rows][segs * k]`.
#[derive(Clone, Copy, Debug)]
pub struct TopkMcPtrs {
    pub arrive: u64,
    pub seg_cnt: u64,
    pub cand: u64,
    pub rows: usize,
    pub segs_cap: usize,
    pub pairs_per_row: usize,
}

/// Owner of a `TopkMcPtrs` scratch.
pub struct TopkMc {
    _buf: DevBuf,
    pub ptrs: TopkMcPtrs,
}

impl TopkMc {
    /// Scratch for `rows` rows of up to `n_sub` slots, keeping up to `k_max`.
    pub fn new(rows: usize, n_sub: usize, k_max: usize) -> Result<Self> {
        let k_max = k_max.max(1);
        let segs_cap = n_sub.div_ceil(TOPK_MC_MIN_SEG).max(1);
        let pairs_per_row = segs_cap * k_max;
        let cnt_i32 = (rows + rows * segs_cap).next_multiple_of(2);
        let buf = DevBuf::from_slice(&vec![0i32; cnt_i32 + rows * pairs_per_row * 2])?;
        let ptrs = TopkMcPtrs {
            arrive: buf.ptr,
            seg_cnt: buf.ptr + rows as u64 * 4,
            cand: buf.ptr + cnt_i32 as u64 * 4,
            rows,
            segs_cap,
            pairs_per_row,
        };
        Ok(TopkMc { _buf: buf, ptrs })
    }
}

/// Smallest segment of `hip_topk_mc` (one key per thread of a CTA).
const TOPK_MC_MIN_SEG: usize = 1024;

/// Keys per CTA of `hip_topk_mc` for a top-`k`: at least 8 k, so the last
/// CTA's candidates (k per segment) are at most an eighth of the row, and
/// a multiple of 1024 (the CTA's threads).
pub(crate) fn topk_mc_seg(k: usize) -> usize {
    (8 * k)
        .max(TOPK_MC_MIN_SEG)
        .next_multiple_of(TOPK_MC_MIN_SEG)
}

/// Fewest segments per row for which `launch_topk` takes `hip_topk_mc` in
/// the decode stages. Measured on the H200 (2026-12-04, bench-gpu-model,
/// stage 0 of 8 rows, k 128): 2 segments (128K tokens) 15.5-16.7 us vs
/// 10.9-11.3 with one CTA per row, 16 segments (1M) 20.4-20.6 vs 31.0-31.2;
/// a line through them breaks even near 6.
const TOPK_MC_MIN_SEGS: usize = 6;
/// 0: not decided yet (`INFINITEHIP_TOPK_MC_MIN_SEGS`, else the default).
static TOPK_MC_SEGS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Override the fewest segments per row that take `hip_topk_mc` (tests:
/// 2 exercises it at short lengths; None: the default, 6). Without a call:
/// `INFINITEHIP_TOPK_MC_MIN_SEGS` if set (the shim GPU tests' engine
/// route), else the default.
pub fn set_topk_mc_min_segs(n: Option<usize>) {
    TOPK_MC_SEGS.store(
        n.unwrap_or(TOPK_MC_MIN_SEGS).max(2),
        std::sync::atomic::Ordering::Relaxed,
    );
}

fn topk_mc_min_segs() -> usize {
    match TOPK_MC_SEGS.load(std::sync::atomic::Ordering::Relaxed) {
        0 => {
            let n = std::env::var("INFINITEHIP_TOPK_MC_MIN_SEGS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(TOPK_MC_MIN_SEGS)
                .max(2);
            TOPK_MC_SEGS.store(n, std::sync::atomic::Ordering::Relaxed);
            n
        }
        n => n,
    }
}

static TOPK_MC: super::switch::EnvSwitch = super::switch::EnvSwitch::new("INFINITEHIP_TOPK_MC");

/// Select the top-k of rows of `TOPK_MC_MIN_SEGS` segments or more with
/// `hip_topk_mc` (several CTAs per row; the default) or always with
/// `hip_topk` (one CTA per row, `false`). Overrides `INFINITEHIP_TOPK_MC`.
pub fn set_topk_mc(on: bool) {
    TOPK_MC.set(on);
}

/// Whether long rows use `hip_topk_mc` (see `set_topk_mc`).
pub fn topk_mc() -> bool {
    TOPK_MC.get()
}

/// Run hip stages `from..` (score + top-k each) for all rows.
pub(crate) fn run_stages(
    gpu: &GpuContext,
    kv: &DeviceKv,
    cfg: &HipConfig,
    stages: &[StageBuf],
    from: usize,
    x: &StageInputs,
) -> Result<bool> {
    run_stages_to(gpu, kv, cfg, stages, from, cfg.stages.len(), x)
}

/// Run hip stages `from..to` (score + top-k each) for all rows. Returns
/// whether the last stage's top-k also built `x.assemble`'s selection.
pub(crate) fn run_stages_to(
    gpu: &GpuContext,
    kv: &DeviceKv,
    cfg: &HipConfig,
    stages: &[StageBuf],
    from: usize,
    to: usize,
    x: &StageInputs,
) -> Result<bool> {
    let mut assembled = false;
    let nq_tpl = x.nq_tpl;
    let topk = gpu.func(x.module, "hip_topk")?;
    let mc = match x.topk_mc {
        Some(p) if topk_mc() => Some((gpu.func(x.module, "hip_topk_mc")?, p, topk_mc_min_segs())),
        _ => None,
    };
    for s in from..to.min(cfg.stages.len()) {
        let st = &cfg.stages[s];
        let (in_ptr, in_cnt, cap_in, e) = if s == 0 {
            (x.stage0_in, x.stage0_cnt, 1usize, x.e0)
        } else {
            let prev = &stages[s - 1];
            (
                prev.out.ptr,
                prev.cnt.ptr,
                prev.cap,
                cfg.stages[s - 1].chunk_size.div_ceil(st.chunk_size),
            )
        };
        let n_sub = cap_in * e;
        let lanes = score_lanes(nq_tpl, x.rows * n_sub);
        let launch = ScoreLaunch {
            module: x.module,
            nq_tpl,
            lanes,
            rows: x.rows,
            row_seq: x.row_seq,
            q: x.q,
            nq: x.nq,
            nq_max: x.nq_max,
            in_ranges: in_ptr,
            in_cnt,
            cap_in,
            e,
            c: st.chunk_size,
            keys: x.keys,
            gate: x.gate,
            stage: s,
            opens_step: s == from && x.gate == 0,
        };
        match (s, &x.mean0) {
            (0, Some(m)) => super::mean_key::launch_score_mean(gpu, kv, &launch, m)?,
            _ => {
                launch_score(gpu, kv, &launch, score_kernel_for(st.chunk_size))?;
            }
        }
        super::prof::mark(gpu, super::prof::stage_name(true, s))?;
        let k = st.keep_tokens / st.chunk_size;
        let sub = SubChunks {
            ranges: in_ptr,
            cnt: in_cnt,
            cap: cap_in,
            e,
            c: st.chunk_size,
            gate: x.gate,
            stage: s,
        };
        let mc = mc.as_ref().map(|(f, p, m)| (f, *p, *m));
        let fuse = x.assemble.filter(|_| {
            s + 1 == cfg.stages.len()
                && stages[s].cap <= TOPK_ASM_CAP
                && !mc.is_some_and(|(_, p, m)| mc_applies(&p, m, sub.cap * sub.e, k, x.rows))
        });
        match fuse {
            Some(a) => {
                launch_topk_asm(gpu, x.module, x.keys, x.rows, &sub, k, &stages[s], &a)?;
                assembled = true;
            }
            None => {
                launch_topk(gpu, &topk, x.keys, x.rows, &sub, k, &stages[s], mc)?;
            }
        }
        super::prof::mark(gpu, super::prof::stage_name(false, s))?;
    }
    Ok(assembled)
}

/// Which scoring kernel a stage launches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreKernel {
    /// `hip_score*`: each thread loads its probe rows itself, 16 bytes at
    /// a time (the reference; the host-tier module always uses it).
    PerThread,
    /// `hip_scorew*`: the warp copies every probe row of a level into
    /// shared memory at once (coalesced cp.async), then scores from there;
    /// the same keys bit for bit.
    Warp,
    /// `hip_scorewp*`: the warp kernel with two groups of sub-chunks per
    /// warp, one group's level copied while the other's is scored (one
    /// lane per sub-chunk launches only, else `Warp`); the same keys bit
    /// for bit. The default where it applies (`INFINITEHIP_SCORE_PIPE=0`:
    /// `Warp`).
    WarpPipe,
    /// `hip_scorea*`: sub-chunks of up to 32 tokens (the later stages)
    /// with every token's row copied and scored at once and the search
    /// replayed over those scores (one round trip instead of one a level);
    /// the same keys bit for bit. The stages' default for sub-chunks of up
    /// to 32 tokens and 8 queries a row (`INFINITEHIP_SCORE_ALLROWS=0`:
    /// off; `INFINITEHIP_SCOREA_MAX_C`: a smaller limit); elsewhere as
    /// `WarpPipe`.
    AllRows,
}

static SCORE_V1: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Score every hip stage with the per-thread kernel (`hip_score*`, the
/// reference) instead of the default warp kernel (`hip_scorew*`).
pub fn set_score_v1(on: bool) {
    SCORE_V1.store(on, std::sync::atomic::Ordering::Relaxed);
}

static SCORE_PIPE: super::switch::EnvSwitch =
    super::switch::EnvSwitch::new("INFINITEHIP_SCORE_PIPE");

/// Score one-lane stages (stage 0 at long contexts) with the pipelined
/// warp kernel (`hip_scorewp*`, the default) or the plain warp kernel
/// (`hip_scorew*`, `false`). Overrides `INFINITEHIP_SCORE_PIPE`.
pub fn set_score_pipe(on: bool) {
    SCORE_PIPE.set(on);
}

/// Whether one-lane stages use `hip_scorewp*` (see `set_score_pipe`).
pub fn score_pipe() -> bool {
    SCORE_PIPE.get()
}

static SCORE_ALLROWS: super::switch::EnvSwitch =
    super::switch::EnvSwitch::new("INFINITEHIP_SCORE_ALLROWS");

/// Score stages of up to 32-token sub-chunks with `hip_scorea*` (the
/// default) or as before (`false`). Overrides `INFINITEHIP_SCORE_ALLROWS`.
pub fn set_score_allrows(on: bool) {
    SCORE_ALLROWS.set(on);
}

/// Largest sub-chunk (tokens) and query count per row `hip_scorea` takes.
const SCOREA_MAX_C: usize = 32;
const SCOREA_MAX_NQ: usize = 8;
/// Largest sub-chunk the stages score with `hip_scorea` by default: all it
/// takes. H100, 1M tokens, batch 1, one call (BENCHMARKS.md, 2026-12-06
/// fourth session): the stage-1 launch (16 tokens, 16.8 MB of rows) reads
/// 0.5-0.7 us slower between launch marks than `hip_scorew4`, yet the hip
/// layer with it is 21.5 us (profile) / 22.1 (whole step) vs 22.5 / 22.7
/// with stage 2 (8 tokens) alone.
const SCOREA_DEFAULT_MAX_C: usize = SCOREA_MAX_C;

/// 0: not read yet; else 1 + the largest default `hip_scorea` sub-chunk.
static SCOREA_MAX: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Largest sub-chunk the stages score with `hip_scorea`:
/// `INFINITEHIP_SCOREA_MAX_C` if set (benchmarks), else 32.
fn scorea_max_c() -> usize {
    use std::sync::atomic::Ordering::Relaxed;
    match SCOREA_MAX.load(Relaxed) {
        0 => {
            let c = std::env::var("INFINITEHIP_SCOREA_MAX_C")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(SCOREA_DEFAULT_MAX_C)
                .min(SCOREA_MAX_C);
            SCOREA_MAX.store(c + 1, Relaxed);
            c
        }
        n => n - 1,
    }
}

/// The scoring kernel a stage of `c`-token sub-chunks asks for.
fn score_kernel_for(c: usize) -> ScoreKernel {
    match score_kernel() {
        ScoreKernel::AllRows if c > scorea_max_c() => ScoreKernel::WarpPipe,
        k => k,
    }
}

fn score_kernel() -> ScoreKernel {
    if SCORE_V1.load(std::sync::atomic::Ordering::Relaxed) {
        ScoreKernel::PerThread
    } else if SCORE_ALLROWS.get() {
        ScoreKernel::AllRows
    } else if score_pipe() {
        ScoreKernel::WarpPipe
    } else {
        ScoreKernel::Warp
    }
}

/// Largest dynamic shared memory of a warp-kernel scoring launch; above it
/// (many queries, e.g. prefill blocks) the per-thread kernel runs.
const SCOREW_MAX_SMEM: usize = 160 * 1024;
/// Threads per CTA of the scoring launches.
pub(crate) const SCORE_THREADS: usize = 128;

/// One stage's scoring launch (see `run_stages`).
pub(crate) struct ScoreLaunch {
    pub module: &'static str,
    pub nq_tpl: usize,
    pub lanes: usize,
    pub rows: usize,
    pub row_seq: u64,
    pub q: u64,
    pub nq: u64,
    pub nq_max: usize,
    pub in_ranges: u64,
    pub in_cnt: u64,
    pub cap_in: usize,
    pub e: usize,
    pub c: usize,
    pub keys: u64,
    pub gate: u64,
    pub stage: usize,
    /// The first launch of a host-metadata step that refreshes from this
    /// stage (it follows the previous step's attention; `pdl::Site::ScoreOpen`).
    pub opens_step: bool,
}

/// Launch `hip_score*` / `hip_scorew*` for one stage: keys of every
/// sub-chunk slot (`rows` x `cap_in * e`). `want` is the kernel asked for;
/// the warp kernel runs only in module `hip_mask` and within
/// `SCOREW_MAX_SMEM`, else the per-thread one. Returns the one launched.
pub(crate) fn launch_score(
    gpu: &GpuContext,
    kv: &DeviceKv,
    x: &ScoreLaunch,
    want: ScoreKernel,
) -> Result<ScoreKernel> {
    let d = kv.head_dim;
    let tag = kernels::dtype_tag(kv.dtype).unwrap();
    let lanes = x.lanes;
    let n_sub = x.cap_in * x.e;
    // Query rows padded by 4 floats with several lanes per sub-chunk.
    let row = if lanes == 1 { d } else { d + 4 };
    let q_bytes = x.nq_max.next_multiple_of(x.nq_tpl) * row * 4;
    // kernels/hip_mask.cu HSW_WARP_BYTES, per warp.
    let warp_bytes = 2 * (32 / lanes) * ((d / 8 + 1) * 16 + 8);
    let w_smem = q_bytes + SCORE_THREADS / 32 * warp_bytes;
    // hip_scorea: queries padded to its NQ (one tile), then 32 rows per warp.
    let a_nq = x.nq_max.next_power_of_two();
    let a_smem = a_nq * d * 4 + SCORE_THREADS / 32 * (32 * ((d / 8 + 1) * 16 + 8));
    let all_rows = want == ScoreKernel::AllRows
        && x.module == "hip_mask"
        && x.c <= SCOREA_MAX_C
        && x.nq_max <= SCOREA_MAX_NQ;
    // hip_scorewp: the same shared memory as hip_scorew with one lane.
    let kind = if all_rows {
        ScoreKernel::AllRows
    } else if want != ScoreKernel::PerThread && x.module == "hip_mask" && w_smem <= SCOREW_MAX_SMEM
    {
        if (want == ScoreKernel::WarpPipe || want == ScoreKernel::AllRows) && lanes == 1 {
            ScoreKernel::WarpPipe
        } else {
            ScoreKernel::Warp
        }
    } else {
        ScoreKernel::PerThread
    };
    let (pfx, smem) = match kind {
        ScoreKernel::AllRows => ("hip_scorea", a_smem),
        ScoreKernel::WarpPipe => ("hip_scorewp", w_smem),
        ScoreKernel::Warp => ("hip_scorew", w_smem),
        ScoreKernel::PerThread => ("hip_score", q_bytes),
    };
    let name = if kind == ScoreKernel::AllRows {
        format!("{pfx}_{tag}_d{d}_q{a_nq}")
    } else if lanes == 1 {
        format!("{pfx}_{tag}_d{d}_q{}", x.nq_tpl)
    } else {
        format!("{pfx}4_{tag}_d{d}_q{}", x.nq_tpl / lanes)
    };
    // Threads per sub-chunk: hip_scorea one per token (c rounded up to a
    // power of two), else `lanes`.
    let per_sub = if kind == ScoreKernel::AllRows {
        x.c.next_power_of_two()
    } else {
        lanes
    };
    let score = gpu.func_smem(x.module, &name, smem)?;
    let (ts, ps, hk, nqm, ci, ei, c) = (
        kv.table_stride as i32,
        kv.page_size as i32,
        kv.n_kv_heads as i32,
        x.nq_max as i32,
        x.cap_in as i32,
        x.e as i32,
        x.c as i32,
    );
    let stage_i = x.stage as i32;
    let kst = kv.strides();
    let site = if x.opens_step && x.stage > 0 {
        super::pdl::Site::ScoreOpen
    } else {
        super::pdl::Site::Score(x.stage)
    };
    let mut l = gpu.launch_pdl(&score, Some(site));
    l.arg(&kv.k.ptr)
        .arg(&kv.table.ptr)
        .arg(&ts)
        .arg(&ps)
        .arg(&hk)
        .arg(&kst.page)
        .arg(&kst.head)
        .arg(&x.row_seq)
        .arg(&x.q)
        .arg(&x.nq)
        .arg(&nqm)
        .arg(&x.in_ranges)
        .arg(&x.in_cnt)
        .arg(&ci)
        .arg(&ei)
        .arg(&c)
        .arg(&x.keys)
        .arg(&x.gate)
        .arg(&stage_i);
    // SAFETY: the arguments pushed above follow the kernel's parameter list in kernels/hip_mask.cu
    // (same order and C types, the same for hip_score and hip_scorew); every pointer is a device
    // allocation of this context sized for this grid by the caller.
    unsafe {
        l.launch(LaunchConfig {
            grid_dim: (
                (n_sub * per_sub).div_ceil(SCORE_THREADS) as u32,
                x.rows as u32,
                1,
            ),
            block_dim: (SCORE_THREADS as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        })
    }
    .map_err(|e| gpu_err("launch hip_score", e))?;
    Ok(kind)
}

/// Test support: score sub-chunk slots with the chosen kernel and lanes
/// over `kv` (K only). Rows are `nq.len() * kv.n_kv_heads` (sequence `rb`
/// = page-table row `rb`); `q` is `[rows][nq_max][head_dim]`, `ranges`
/// `[rows][cap_in]` (start, end), `cnt` per row. Returns the keys
/// (`[rows][cap_in * e]`, 0: invalid) and the kernel that ran.
#[allow(clippy::too_many_arguments)]
pub fn score_slots(
    gpu: &GpuContext,
    kv: &DeviceKv,
    q: &[f32],
    nq: &[i32],
    nq_max: usize,
    nq_tpl: usize,
    lanes: usize,
    ranges: &[[i32; 2]],
    cnt: &[i32],
    cap_in: usize,
    e: usize,
    c: usize,
    want: ScoreKernel,
) -> Result<(Vec<u32>, ScoreKernel)> {
    let rows = nq.len() * kv.n_kv_heads;
    let d = kv.head_dim;
    if q.len() != rows * nq_max * d || ranges.len() != rows * cap_in || cnt.len() != rows {
        return Err(Error::shape("score_slots inputs", rows, cnt.len()));
    }
    if !(lanes == 1 || (lanes == 4 && nq_tpl >= 4))
        || nq.iter().any(|&n| n < 1 || n as usize > nq_max)
    {
        return Err(Error::Invalid(
            "score_slots: lanes 1, or 4 with nq_tpl >= 4; 1 <= nq <= nq_max".into(),
        ));
    }
    let n_sub = cap_in * e;
    let qd = DevBuf::from_slice(q)?;
    let nqd = DevBuf::from_slice(nq)?;
    let rs: Vec<i32> = (0..nq.len() as i32).collect();
    let rsd = DevBuf::from_slice(&rs)?;
    let rd = DevBuf::from_slice(ranges)?;
    let cd = DevBuf::from_slice(cnt)?;
    let keys = DevBuf::from_slice(&vec![0xdead_beefu32; rows * n_sub])?;
    let kind = launch_score(
        gpu,
        kv,
        &ScoreLaunch {
            module: "hip_mask",
            nq_tpl,
            lanes,
            rows,
            row_seq: rsd.ptr,
            q: qd.ptr,
            nq: nqd.ptr,
            nq_max,
            in_ranges: rd.ptr,
            in_cnt: cd.ptr,
            cap_in,
            e,
            c,
            keys: keys.ptr,
            gate: 0,
            stage: 0,
            opens_step: false,
        },
        want,
    )?;
    gpu.synchronize()?;
    Ok((keys.read(rows * n_sub)?, kind))
}

/// Lanes per sub-chunk of the scoring launch: 1 (one thread per sub-chunk,
/// `nq_tpl` queries per pass), or 4 (hip_score4: each lane a quarter of the
/// queries) when the stage has at most `SCORE4_MAX` sub-chunks in all, so
/// that small stages spread over 4x the threads. Needs `nq_tpl` >= 4.
pub(crate) fn score_lanes(nq_tpl: usize, total_sub: usize) -> usize {
    let max = match SCORE4_MAX.load(std::sync::atomic::Ordering::Relaxed) {
        usize::MAX => DEFAULT_SCORE4_MAX,
        v => v,
    };
    if nq_tpl >= 4 && total_sub <= max {
        4
    } else {
        1
    }
}

const DEFAULT_SCORE4_MAX: usize = 1 << 16;
static SCORE4_MAX: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(usize::MAX);

/// Largest stage (rows x sub-chunks) scored with 4 lanes per sub-chunk
/// (benchmarks sweep it; 0: never; None: the default, 65,536).
pub fn set_score4_max(max: Option<usize>) {
    SCORE4_MAX.store(
        max.unwrap_or(usize::MAX),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// A stage's candidate slots: sub-chunk `e` (of `c` tokens) of input range
/// `i` is slot `i * e_count + e` (`cap` ranges per row, `cnt` valid).
pub(crate) struct SubChunks {
    pub ranges: u64,
    pub cnt: u64,
    pub cap: usize,
    pub e: usize,
    pub c: usize,
    /// Refresh gate (see `StageInputs::gate`; 0: always run) and the
    /// stage this top-k belongs to.
    pub gate: u64,
    pub stage: usize,
}

/// Whether `launch_topk` takes `hip_topk_mc` for rows of `n_sub` slots.
fn mc_applies(p: &TopkMcPtrs, min_segs: usize, n_sub: usize, k: usize, rows: usize) -> bool {
    let segs = n_sub.div_ceil(topk_mc_seg(k));
    segs >= min_segs.max(2) && segs <= p.segs_cap && segs * k <= p.pairs_per_row && rows <= p.rows
}

/// Threads of a one-CTA-per-row top-k: one key per thread up to 1024 (the
/// kernel loops beyond), so small stages synchronise fewer warps.
fn topk_threads(n_sub: usize) -> u32 {
    n_sub.next_multiple_of(32).clamp(64, 1024) as u32
}

/// `hip_topk_asm`: `launch_topk`'s one-CTA-per-row top-k of the last
/// stage, then `assemble_rows` of its output (rows from 0) into `a`, in one
/// launch. Needs `out.cap <= TOPK_ASM_CAP`.
#[allow(clippy::too_many_arguments)]
fn launch_topk_asm(
    gpu: &GpuContext,
    module: &'static str,
    keys: u64,
    rows: usize,
    sub: &SubChunks,
    k: usize,
    out: &StageBuf,
    a: &FusedAsm,
) -> Result<()> {
    debug_assert!(out.cap <= TOPK_ASM_CAP);
    let f = gpu.func(module, "hip_topk_asm")?;
    let n_sub = sub.cap * sub.e;
    let (nsub, ki, ci, ei, c, oc, st) = (
        n_sub as i32,
        k as i32,
        sub.cap as i32,
        sub.e as i32,
        sub.c as i32,
        out.cap as i32,
        sub.stage as i32,
    );
    let (hk, cap, tcap, tns) = (
        a.hkv as i32,
        a.cap as i32,
        a.tab.cap as i32,
        a.tab.n_stages as i32,
    );
    let mut l = gpu.launch_pdl(&f, Some(super::pdl::Site::Topk(sub.stage)));
    l.arg(&keys)
        .arg(&nsub)
        .arg(&ki)
        .arg(&sub.ranges)
        .arg(&sub.cnt)
        .arg(&ci)
        .arg(&ei)
        .arg(&c)
        .arg(&out.out.ptr)
        .arg(&out.cnt.ptr)
        .arg(&oc)
        .arg(&sub.gate)
        .arg(&st)
        .arg(&a.extra)
        .arg(&hk)
        .arg(&a.ranges)
        .arg(&a.cum)
        .arg(&a.cnt)
        .arg(&a.tot)
        .arg(&cap)
        .arg(&a.tab.tab)
        .arg(&tcap)
        .arg(&a.tab.ntab)
        .arg(&a.tab.gate)
        .arg(&tns)
        .arg(&a.tab.tab_sink);
    // SAFETY: the arguments follow hip_topk_asm's parameter list in kernels/hip_mask.cu (same order
    // and C types): hip_topk's, then hip_assemble's outputs; the pointers are device allocations of
    // this context sized for `rows` rows by the caller (as for launch_topk and assemble_rows).
    unsafe {
        l.launch(LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (topk_threads(n_sub), 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map_err(|e| gpu_err("launch hip_topk_asm", e))?;
    Ok(())
}

/// hip_topk: keep the best `k` slots of each row's `keys` into `out`.
/// With `mc` (`hip_topk_mc`, its scratch and the fewest segments, >= 2)
/// rows of that many segments (`topk_mc_seg`) or more are selected by
/// several CTAs each (the same result), when the scratch is large enough;
/// else one CTA per row. Returns whether `hip_topk_mc` ran.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_topk(
    gpu: &GpuContext,
    topk: &cudarc::driver::CudaFunction,
    keys: u64,
    rows: usize,
    sub: &SubChunks,
    k: usize,
    out: &StageBuf,
    mc: Option<(&cudarc::driver::CudaFunction, TopkMcPtrs, usize)>,
) -> Result<bool> {
    let stage = sub.stage as i32;
    let n_sub = sub.cap * sub.e;
    let seg = topk_mc_seg(k);
    let segs = n_sub.div_ceil(seg);
    if let Some((f, p, min_segs)) = mc {
        if mc_applies(&p, min_segs, n_sub, k, rows) {
            let (nsub, ki, segi, oc, ci, ei, c) = (
                n_sub as i32,
                k as i32,
                seg as i32,
                out.cap as i32,
                sub.cap as i32,
                sub.e as i32,
                sub.c as i32,
            );
            let mut l = gpu.launch_pdl(f, Some(super::pdl::Site::Topk(sub.stage)));
            l.arg(&keys)
                .arg(&nsub)
                .arg(&ki)
                .arg(&segi)
                .arg(&sub.ranges)
                .arg(&sub.cnt)
                .arg(&ci)
                .arg(&ei)
                .arg(&c)
                .arg(&out.out.ptr)
                .arg(&out.cnt.ptr)
                .arg(&oc)
                .arg(&sub.gate)
                .arg(&stage)
                .arg(&p.arrive)
                .arg(&p.seg_cnt)
                .arg(&p.cand);
            // SAFETY: the arguments follow hip_topk_mc's parameter list (kernels/hip_mask.cu,
            // same order and C types); the scratch holds rows x segs counts and rows x segs * k
            // candidates (checked above), its counters zero between launches (the kernel resets
            // them); the other pointers are as for hip_topk below.
            unsafe {
                l.launch(LaunchConfig {
                    grid_dim: (segs as u32, rows as u32, 1),
                    block_dim: (TOPK_MC_MIN_SEG as u32, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(|e| gpu_err("launch hip_topk_mc", e))?;
            return Ok(true);
        }
    }
    let (nsub, k, oc, ci, ei, c) = (
        (sub.cap * sub.e) as i32,
        k as i32,
        out.cap as i32,
        sub.cap as i32,
        sub.e as i32,
        sub.c as i32,
    );
    let mut l = gpu.launch_pdl(topk, Some(super::pdl::Site::Topk(sub.stage)));
    l.arg(&keys)
        .arg(&nsub)
        .arg(&k)
        .arg(&sub.ranges)
        .arg(&sub.cnt)
        .arg(&ci)
        .arg(&ei)
        .arg(&c)
        .arg(&out.out.ptr)
        .arg(&out.cnt.ptr)
        .arg(&oc)
        .arg(&sub.gate)
        .arg(&stage);
    // SAFETY: the arguments pushed above follow the kernel's parameter list in kernels/*.cu
    // (same order and C types); every pointer is a device allocation of this context sized for
    // this grid by the code above.
    let threads = topk_threads(sub.cap * sub.e);
    unsafe {
        l.launch(LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map_err(|e| gpu_err("launch hip_topk", e))?;
    Ok(false)
}

/// hip_topk on host keys (tests): `keys` holds `rows` rows of `n_sub`
/// order-preserving keys (0: an invalid slot); returns per row the kept
/// slot indices in ascending order (the best `k` valid keys, ties: the
/// earlier slot). `multi`: through `hip_topk_mc` where the row spans two
/// segments or more (the decode stages take it from 6); the bool says
/// whether it ran.
pub fn topk_slots(
    gpu: &GpuContext,
    keys: &[u32],
    rows: usize,
    n_sub: usize,
    k: usize,
    multi: bool,
) -> Result<(Vec<Vec<usize>>, bool)> {
    if keys.len() != rows * n_sub || k == 0 {
        return Err(Error::shape("topk_slots keys", rows * n_sub, keys.len()));
    }
    // Slot i of a row is input range i of one token: out = (i, i + 1).
    let ranges: Vec<[i32; 2]> = (0..rows)
        .flat_map(|_| (0..n_sub as i32).map(|i| [i, i + 1]))
        .collect();
    let kd = DevBuf::from_slice(keys)?;
    let rd = DevBuf::from_slice(&ranges)?;
    let cd = DevBuf::from_slice(&vec![n_sub as i32; rows])?;
    let out = StageBuf {
        out: DevBuf::alloc(rows * k * 8)?,
        cnt: DevBuf::from_slice(&vec![-1i32; rows])?,
        cap: k,
    };
    let sub = SubChunks {
        ranges: rd.ptr,
        cnt: cd.ptr,
        cap: n_sub,
        e: 1,
        c: 1,
        gate: 0,
        stage: 0,
    };
    let topk = gpu.func("hip_mask", "hip_topk")?;
    let scratch = if multi {
        Some(TopkMc::new(rows, n_sub, k)?)
    } else {
        None
    };
    let f_mc = gpu.func("hip_mask", "hip_topk_mc")?;
    let ran_mc = launch_topk(
        gpu,
        &topk,
        kd.ptr,
        rows,
        &sub,
        k,
        &out,
        scratch.as_ref().map(|m| (&f_mc, m.ptrs, 2)),
    )?;
    gpu.synchronize()?;
    let cnt: Vec<i32> = out.cnt.read(rows)?;
    let got: Vec<[i32; 2]> = out.out.read(rows * k)?;
    Ok((
        (0..rows)
            .map(|r| {
                got[r * k..r * k + cnt[r].clamp(0, k as i32) as usize]
                    .iter()
                    .map(|p| p[0] as usize)
                    .collect()
            })
            .collect(),
        ran_mc,
    ))
}

/// Build the attention selection (sink, last stage's chunks, slid, window).
fn assemble(
    gpu: &GpuContext,
    last: &StageBuf,
    extra: u64,
    hkv: usize,
    rows: usize,
    sel: &DeviceSelection,
) -> Result<()> {
    assemble_rows(gpu, last, extra, hkv, rows, sel, 0, None)
}

/// Where `hip_assemble` also writes each row's sink + chunk positions (the
/// sparse v2 attention's table): `tab` i32 `[rows][cap]`, `ntab` i32
/// `[rows]` (how many).
/// With `gate` non-zero (a lean device step, `hip_step_meta`'s state),
/// rows whose table is current (no stage refreshed, sink as at the build
/// recorded in `tab_sink` i32 `[rows]`) are skipped.
#[derive(Clone, Copy)]
pub(crate) struct TabOut {
    pub tab: u64,
    pub cap: usize,
    pub ntab: u64,
    pub gate: u64,
    pub n_stages: usize,
    pub tab_sink: u64,
}

impl TabOut {
    /// No table (selection ranges only).
    pub(crate) const NONE: TabOut = TabOut {
        tab: 0,
        cap: 0,
        ntab: 0,
        gate: 0,
        n_stages: 0,
        tab_sink: 0,
    };
}

/// `assemble` into selection rows `row0..row0 + rows` of `sel` (and, with
/// `tab`, rows `0..rows` of the position table).
#[allow(clippy::too_many_arguments)]
pub(crate) fn assemble_rows(
    gpu: &GpuContext,
    last: &StageBuf,
    extra: u64,
    hkv: usize,
    rows: usize,
    sel: &DeviceSelection,
    row0: usize,
    tab: Option<TabOut>,
) -> Result<()> {
    let asm = gpu.func("hip_mask", "hip_assemble")?;
    let (lc, hk, nr, cap) = (last.cap as i32, hkv as i32, rows as i32, sel.cap as i32);
    let t = tab.unwrap_or(TabOut::NONE);
    let (tcap, tns) = (t.cap as i32, t.n_stages as i32);
    let off = |base: u64, elem: usize| base + (row0 * elem) as u64;
    let (rg, cm, cn, tt) = (
        off(sel.ranges.ptr, sel.cap * 8),
        off(sel.cum.ptr, sel.cap * 4),
        off(sel.cnt.ptr, 4),
        off(sel.tot.ptr, 4),
    );
    let mut l = gpu.launch_pdl(&asm, Some(super::pdl::Site::Assemble));
    l.arg(&last.out.ptr)
        .arg(&last.cnt.ptr)
        .arg(&lc)
        .arg(&extra)
        .arg(&hk)
        .arg(&nr)
        .arg(&rg)
        .arg(&cm)
        .arg(&cn)
        .arg(&tt)
        .arg(&cap)
        .arg(&t.tab)
        .arg(&tcap)
        .arg(&t.ntab)
        .arg(&t.gate)
        .arg(&tns)
        .arg(&t.tab_sink);
    // SAFETY: the arguments pushed above follow the kernel's parameter list in kernels/*.cu (same
    // order and C types); every pointer is a device allocation of this context sized for this grid
    // by the code above.
    unsafe {
        l.launch(LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map_err(|e| gpu_err("launch hip_assemble", e))?;
    super::prof::mark(gpu, "assemble")
}

pub(crate) struct StageBuf {
    pub out: DevBuf,
    pub cnt: DevBuf,
    pub cap: usize,
}

/// Which kernel `HipGpuDecoder` (and `GpuAttention`'s hip layers, see
/// `set_hip_attention`) attends with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HipAttention {
    /// kernels/decode_dense_v2.cu `hip_sparse_*` (the default): one
    /// launch, tensor cores, the selection as a position table + tail, the
    /// last CTA of each (row, kv head) merges the splits. 17.1-17.5 us per
    /// layer at 128K/1M batch 1 vs 24.9-25.8 + 7.1 us for split-K + combine
    /// on the H200 (tests/gpu/logs/gpu14-2026-12-04/run2/).
    SparseV2 = 0,
    /// kernels/decode.cu split-K partials + combine over the ranges (the
    /// previous default, of the engine path's hip layers too).
    SplitCombine = 1,
}

/// 0 sparse v2, 1 split-K + combine, 2 not chosen yet (read the
/// environment at first use).
static ATTN: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(2);

/// Choose `HipGpuDecoder`'s attention kernel (tests and benchmarks run
/// each on the same inputs).
pub fn force_attention(a: HipAttention) {
    ATTN.store(a as u8, std::sync::atomic::Ordering::Relaxed);
}

/// Values `INFINITEHIP_HIP_ATTENTION` accepts.
pub const HIP_ATTENTION_VALUES: &[&str] = &["sparse-v2", "split-combine"];

/// `INFINITEHIP_HIP_ATTENTION`'s value as a kernel choice: None when unset
/// or empty, an error naming the accepted values otherwise
/// (`GpuContext::new` checks it, so a misspelt value fails there instead
/// of silently running the default).
pub fn parse_hip_attention(v: Option<&str>) -> Result<Option<HipAttention>> {
    match v.map(str::trim) {
        None | Some("") => Ok(None),
        Some("sparse-v2") => Ok(Some(HipAttention::SparseV2)),
        Some("split-combine") => Ok(Some(HipAttention::SplitCombine)),
        Some(x) => Err(Error::config(
            "INFINITEHIP_HIP_ATTENTION",
            format!(
                "`{x}` is not one of {} (unset: sparse-v2)",
                HIP_ATTENTION_VALUES.join(", ")
            ),
        )),
    }
}

/// `parse_hip_attention` of the environment.
pub fn hip_attention_env() -> Result<Option<HipAttention>> {
    let v = std::env::var("INFINITEHIP_HIP_ATTENTION").ok();
    parse_hip_attention(v.as_deref())
}

/// The attention kernel `HipGpuDecoder` uses now: `force_attention`'s
/// choice, else `INFINITEHIP_HIP_ATTENTION` (`split-combine` selects the
/// previous kernel, e.g. so that a process compares the host-offload tier,
/// which attends with split-K + combine, bit for bit with resident decode;
/// `sparse-v2` or unset: sparse v2; any other value is refused by
/// `GpuContext::new`).
pub fn attention() -> HipAttention {
    use std::sync::atomic::Ordering::Relaxed;
    let mut v = ATTN.load(Relaxed);
    if v == 2 {
        let split = matches!(hip_attention_env(), Ok(Some(HipAttention::SplitCombine)));
        v = u8::from(split);
        let _ = ATTN.compare_exchange(2, v, Relaxed, Relaxed);
        v = ATTN.load(Relaxed);
    }
    match v {
        0 => HipAttention::SparseV2,
        _ => HipAttention::SplitCombine,
    }
}

/// InfiniteHiP decode on the GPU: the same stages, refresh schedule, sink,
/// window and slid-token rule as `policy::hip::HipPolicy` in decode, for a
/// batch of sequences stepping together. Stage chunk sizes must each divide
/// the previous one (the default 64/16/8 does).
pub struct HipGpuDecoder {
    pub(crate) cfg: HipConfig,
    pub(crate) hkv: usize,
    pub(crate) batch: usize,
    pub(crate) step: usize,
    pub(crate) stages: Vec<StageBuf>,
    pub(crate) mid_end: Vec<usize>,
    pub(crate) keys: DevBuf,
    pub(crate) keys_cap: usize,
    pub(crate) e0: usize,
    pub(crate) group: usize,
    pub(crate) stage0_in: DevBuf,
    pub(crate) stage0_cnt: DevBuf,
    pub(crate) row_seq: DevBuf,
    pub(crate) nq: DevBuf,
    pub(crate) extra: DevBuf,
    /// The attention selection of the last step; after a lean step its
    /// slid and window ranges are the last build's (`sel_stale`): read it
    /// through `selection()`, which brings it up to date.
    pub(crate) sel: DeviceSelection,
    /// `sel` may hold a lean step's stale ranges (see `selection`).
    pub(crate) sel_stale: bool,
    /// The last step was a lean device step (`step_device`, possibly
    /// replayed from a CUDA graph any number of times since, which the host
    /// does not see): `selection()` rebuilds the ranges on every read.
    pub(crate) sel_from_device: bool,
    /// The last host step rebuilt no table (`lean_skip`) and no sequence
    /// grew by more than one token: its attention may load its first chunk
    /// before the PDL wait (`V2Src::Sparse::early`).
    pub(crate) early_ok: bool,
    /// Sequence lengths of the last host step (`early_ok`).
    pub(crate) last_lens: Vec<usize>,
    /// Largest selected-token count of the last assembly (host bound).
    pub max_tokens: usize,
    pub ws: DecodeWorkspace,
    /// Sink + chunk positions per row for the sparse v2 attention
    /// (`[rows][tab_cap]` i32, written by `hip_assemble`) and their counts.
    pub(crate) tab: DevBuf,
    pub(crate) tab_cap: usize,
    pub(crate) ntab: DevBuf,
    /// Partials and arrival counters of the sparse v2 attention.
    pub(crate) v2_ws: super::dense_decode::DenseDecodeWs,
    /// Lean steps (`set_lean`), the sink end per row at the last table
    /// build (device, -1: none yet) and per sequence (host steps).
    pub(crate) lean: bool,
    pub(crate) attn: Option<HipAttention>,
    pub(crate) tab_sink: DevBuf,
    pub(crate) host_tab_sink: Vec<usize>,
    /// Module of the scoring kernels: "hip_mask" (keys in a `DeviceKv`) or
    /// "hip_mask_host" (backend::cuda::est_cache: keys in the host tier,
    /// read through a device row cache).
    pub score_module: &'static str,
    /// Device-side stepping state (`hip_step`), once prepared.
    pub(crate) dev: Option<super::hip_step::DeviceStepState>,
    /// RoPE modes (`rope.scoring` / `rope.attention` other than original),
    /// set up by `set_rope_model` (backend/cuda/rope_gpu.rs).
    pub(crate) rope: Option<Box<super::rope_gpu::RopeGpu>>,
    /// Streaming attention's compact K/V (first use).
    pub(crate) rope_kv: Option<super::rope_gpu::CompactKv>,
    pub(crate) n_q: usize,
    /// Scratch of the multi-CTA top-k, sized with `keys`.
    pub(crate) topk_mc: Option<TopkMc>,
    /// Recorded on the stream right after stage 0's top-k of a step that
    /// refreshes stage 0 (`set_stage0_event`): a copy stream can start on
    /// stage 0's kept chunks (`stage0_chunks`) while stages 1.. score.
    pub(crate) stage0_done: Option<CudaEvent>,
    /// Stage 0's cached chunk means (`hip.decode_stage0 = mean_key`).
    pub(crate) mean0: Option<super::mean_key::MeanKeyCache>,
    /// `hip.async_refresh`: the side stream and second set of outputs
    /// (first step).
    pub(crate) async_rf: Option<Box<super::async_refresh::AsyncRefresh>>,
    /// End of each sequence's middle at the last upload (`stage0`).
    pub(crate) mid_now: Vec<usize>,
    /// Score slots and top-k slots the last upload needs (`grow_scratch`).
    pub(crate) scratch_need: (usize, usize),
    /// The rows hold a selection of their sequences (a step ran since
    /// `reset`): `async_refresh` lags refreshes only then.
    pub(crate) has_selection: bool,
}

impl HipGpuDecoder {
    /// Configurations the GPU stages reproduce exactly, at original RoPE
    /// positions. `HipGpuDecoder`, `GpuAttention`'s decode and
    /// `HipGpuPrefill` (with `set_rope_model`) also run the RoPE modes
    /// (`validate_decoder`; engine_attn/rope.rs).
    pub fn validate(cfg: &HipConfig) -> Result<()> {
        Self::validate_decoder(cfg)?;
        if cfg.rope.scoring != crate::config::RopeMode::Original
            || cfg.rope.attention != crate::config::RopeMode::Original
        {
            return Err(Error::config(
                "hip.rope",
                "this GPU hip path supports original RoPE positions only; the GPU hip decode (HipGpuDecoder host steps, GpuAttention::decode) and the GPU sparse prefill (HipGpuPrefill with set_rope_model) run the modes",
            ));
        }
        Ok(())
    }

    /// `validate` without the RoPE restriction: the decoder's (the modes
    /// need `set_rope_model`).
    pub fn validate_decoder(cfg: &HipConfig) -> Result<()> {
        if cfg.stages.is_empty() {
            return Err(Error::config(
                "hip.stages",
                "the GPU path needs at least one stage",
            ));
        }
        for (i, w) in cfg.stages.windows(2).enumerate() {
            if w[0].chunk_size % w[1].chunk_size != 0 {
                return Err(Error::config(
                    format!("hip.stages[{}].chunk_size", i + 1),
                    "on the GPU each stage's chunk size must divide the previous stage's",
                ));
            }
        }
        if cfg.successors > 0 {
            return Err(Error::config(
                "hip.successors",
                "CPU policy only: the GPU decode stages do not add successors (use 0 on the GPU)",
            ));
        }
        if cfg.per_q_head {
            return Err(Error::config(
                "hip.per_q_head",
                "CPU policy only: the GPU stages and kernels keep one mask per KV head (use false on the GPU)",
            ));
        }
        if cfg.async_refresh == AsyncMode::Stage0
            && (cfg.decode_stage0 != crate::config::DecodeStage0::MeanKey || cfg.stages.len() < 2)
        {
            return Err(Error::config(
                "hip.async_refresh",
                "stage0 needs decode_stage0 mean_key and a second stage",
            ));
        }
        if cfg.decode_stage0 == crate::config::DecodeStage0::MeanKey {
            let c0 = cfg.stages[0].chunk_size;
            if cfg.rope.scoring != crate::config::RopeMode::Original || cfg.window < c0 {
                return Err(Error::config(
                    "hip.decode_stage0",
                    format!("mean_key needs rope.scoring original and window >= stages[0].chunk_size ({c0})"),
                ));
            }
        }
        Ok(())
    }

    pub fn new(cfg: HipConfig, shape: &AttnShape, batch: usize) -> Result<Self> {
        Self::validate_decoder(&cfg)?;
        let hkv = shape.n_kv_heads;
        let rows = batch * hkv;
        let mut stages = Vec::new();
        for st in &cfg.stages {
            let cap = (st.keep_tokens / st.chunk_size).max(1);
            stages.push(StageBuf {
                out: DevBuf::alloc(rows * cap * 8)?,
                cnt: DevBuf::from_slice(&vec![0i32; rows])?,
                cap,
            });
        }
        let last_cap = stages.last().unwrap().cap;
        let tab_cap = cfg.sink + last_cap * cfg.stages.last().unwrap().chunk_size;
        let g = shape.group() as i32;
        Ok(HipGpuDecoder {
            hkv,
            batch,
            step: 0,
            mid_end: vec![0; batch],
            keys: DevBuf::alloc(16)?,
            keys_cap: 0,
            e0: 1,
            group: shape.group(),
            stage0_in: DevBuf::alloc(rows * 8)?,
            stage0_cnt: DevBuf::from_slice(&vec![1i32; rows])?,
            row_seq: DevBuf::from_slice(&(0..batch as i32).collect::<Vec<_>>())?,
            nq: DevBuf::from_slice(&vec![g; batch])?,
            extra: DevBuf::alloc(batch * 3 * 8)?,
            sel: DeviceSelection::empty(rows, last_cap + 3)?,
            sel_stale: false,
            sel_from_device: false,
            early_ok: false,
            last_lens: Vec::new(),
            max_tokens: 0,
            ws: DecodeWorkspace::new(),
            tab: DevBuf::alloc(rows * tab_cap * 4)?,
            tab_cap,
            ntab: DevBuf::from_slice(&vec![0i32; rows])?,
            v2_ws: super::dense_decode::DenseDecodeWs::new(),
            lean: true,
            attn: None,
            tab_sink: DevBuf::from_slice(&vec![-1i32; rows])?,
            host_tab_sink: Vec::new(),
            score_module: "hip_mask",
            dev: None,
            rope: None,
            rope_kv: None,
            n_q: shape.n_q_heads,
            topk_mc: None,
            stage0_done: None,
            mean0: if cfg.decode_stage0 == crate::config::DecodeStage0::MeanKey {
                Some(super::mean_key::MeanKeyCache::new()?)
            } else {
                None
            },
            async_rf: None,
            mid_now: vec![0; batch],
            scratch_need: (0, 1),
            has_selection: false,
            stages,
            cfg,
        })
    }

    /// Whether the config asks for a RoPE mode (scoring or attention).
    pub fn rope_modes(&self) -> bool {
        self.cfg.rope.scoring != crate::config::RopeMode::Original
            || self.cfg.rope.attention != crate::config::RopeMode::Original
    }

    /// The model's RoPE (theta, trained length `max_position`), which the
    /// RoPE modes need (as `HipPolicy::new` takes the `ModelShape`). A no-op
    /// at original positions. Keys and queries must be stored rotated at
    /// their positions in the halves (NEOX) layout of `rope::Rope`.
    /// Status: compiled, not yet run on a GPU (`gpu-test --rope-only` is the
    /// check). `GpuAttention` builds the same state per hip layer from its
    /// config's `model` (engine_attn/rope.rs).
    pub fn set_rope_model(&mut self, model: &crate::config::ModelShape) -> Result<()> {
        self.rope = super::rope_gpu::RopeGpu::new(
            &self.cfg,
            model.head_dim,
            model.rope_theta,
            model.max_position,
            self.batch,
            self.n_q,
        )?
        .map(Box::new);
        Ok(())
    }

    /// The RoPE state, or an error naming what is missing or refused.
    fn rope_ready(&self, upload: bool) -> Result<Option<&super::rope_gpu::RopeGpu>> {
        if !self.rope_modes() {
            return Ok(None);
        }
        let r = self.rope.as_deref().ok_or_else(|| {
            Error::config(
                "hip.rope",
                "the GPU decoder's RoPE modes need the model's RoPE: call set_rope_model",
            )
        })?;
        if !upload {
            return Err(Error::config(
                "hip.rope",
                "the GPU decoder's RoPE modes run host steps only (select/step with upload)",
            ));
        }
        if r.scores_rotated() && self.score_module != "hip_mask" {
            return Err(Error::config(
                "hip.rope.scoring",
                "host-tier (offloaded) key scoring supports original positions only",
            ));
        }
        Ok(Some(r))
    }

    /// Size the multi-CTA top-k scratch for rows of up to `slots` keys.
    pub(crate) fn grow_topk_mc(&mut self, slots: usize) -> Result<()> {
        let k_max = self.stages.iter().map(|s| s.cap).max().unwrap_or(1);
        self.topk_mc = Some(TopkMc::new(self.batch * self.hkv, slots, k_max)?);
        Ok(())
    }

    /// Record `ev` on the stream right after stage 0's top-k whenever a
    /// `select` refreshes stage 0 (None: record nothing, the default).
    pub fn set_stage0_event(&mut self, ev: Option<CudaEvent>) {
        self.stage0_done = ev;
    }

    /// The event `set_stage0_event` gave, if any.
    pub fn stage0_event(&self) -> Option<&CudaEvent> {
        self.stage0_done.as_ref()
    }

    /// Stage 0's kept chunks as the device holds them: ranges `[rows][cap]`
    /// of (start, end) i32 pairs, counts `[rows]` i32, and `cap`; rows are
    /// `sequence * n_kv_heads + kv_head`. Every later stage keeps sub-chunks
    /// of these, so until stage 0 refreshes again every selection is inside
    /// them plus the sink, slid and window ranges.
    pub fn stage0_chunks(&self) -> (u64, u64, usize) {
        let s = &self.stages[0];
        (s.out.ptr, s.cnt.ptr, s.cap)
    }

    /// Which stage a step starts from (n_stages: none refreshed).
    #[allow(clippy::manual_is_multiple_of)] // MSRV 1.80
    pub fn refresh_from(&self) -> usize {
        if self.step == 0 {
            return 0;
        }
        (0..self.cfg.stages.len())
            .find(|&i| self.step % self.cfg.stages[i].refresh_interval == 0)
            .unwrap_or(self.cfg.stages.len())
    }

    /// One decode step's selection for sequences of lengths `lens` (the
    /// query sits at len - 1); `q` is the decode query `[batch][n_q][d]` f32
    /// on the device. Leaves the selection in `self.sel`. On a step that
    /// rebuilds no table, where every sequence grew by at most one token
    /// since the last host step, the attention loads K/V rows of tokens
    /// older than each sequence's newest before waiting for the previous
    /// kernel on the stream (`dense_decode::early_loads`): those rows must
    /// not be written by work queued since the previous step.
    pub fn select(
        &mut self,
        gpu: &GpuContext,
        kv: &DeviceKv,
        q: u64,
        upload: bool,
    ) -> Result<usize> {
        let lens = &kv.lens;
        if lens.len() != self.batch {
            return Err(Error::shape("hip GPU batch", self.batch, lens.len()));
        }
        kv.check_lens()?;
        if let Some(b) = lens.iter().position(|&l| l == 0) {
            return Err(Error::Invalid(format!(
                "hip GPU decode: sequence {b} is empty"
            )));
        }
        let from = self.refresh_from();
        let n = self.cfg.stages.len();
        let hkv = self.hkv;
        let mode = self.cfg.async_refresh;
        // `stage0`: this refresh's stage 0 was scored on the side stream at
        // the previous step (its output now swapped in).
        let early0 = mode != AsyncMode::Off && self.async_begin(gpu, upload, from)?;
        // `all`: this step's refresh runs on the side stream and this step
        // attends the previous selection.
        let lag = mode == AsyncMode::All && self.has_selection && from < n;
        if upload {
            let mut mids = Vec::with_capacity(self.batch * hkv);
            let mut extra = Vec::with_capacity(self.batch * 3);
            let mut extra_new = Vec::with_capacity(self.batch * 3);
            let mut max_mid = 0;
            let mut bound = 1;
            let last_keep = self.stages.last().map_or(0, |s| s.cap)
                * self.cfg.stages.last().map_or(0, |s| s.chunk_size);
            for (b, &len) in lens.iter().enumerate() {
                let (sink, mid, win) = regions(&self.cfg, len - 1);
                let old_end = self.mid_end[b];
                if from == 0 {
                    self.mid_end[b] = match (early0, &self.async_rf) {
                        (true, Some(a)) => a.stage0.as_ref().map_or(mid.end, |s| s.mid_end[b]),
                        _ => mid.end,
                    };
                }
                self.mid_now[b] = mid.end;
                let slid = self.mid_end[b].max(mid.start)..mid.end;
                // A lagged step attends the slid range of the selection it
                // reads (since the stage-0 run before this one).
                let slid_att = if lag {
                    old_end.max(mid.start)..mid.end
                } else {
                    slid.clone()
                };
                max_mid = max_mid.max(mid.len());
                let slid_max = slid.len().max(slid_att.len());
                bound = bound.max(sink.len() + slid_max + win.len() + last_keep.min(mid.len()));
                for _ in 0..hkv {
                    mids.push([mid.start as i32, mid.end as i32]);
                }
                for r in [sink.clone(), slid_att, win.clone()] {
                    extra.push([r.start as i32, r.end as i32]);
                }
                for r in [sink, slid, win] {
                    extra_new.push([r.start as i32, r.end as i32]);
                }
            }
            self.stage0_in.write_async(&gpu.stream, &mids)?;
            self.extra.write_async(&gpu.stream, &extra)?;
            if let Some(o) = self.async_rf.as_mut().and_then(|a| a.all.as_mut()) {
                o.extra.write_async(&gpu.stream, &extra_new)?;
                o.extra_differs = extra_new != extra;
                o.extra_host = extra_new;
            }
            self.max_tokens = bound;
            // Sub-chunk slots of stage 0 for the longest middle.
            let e0 = max_mid.div_ceil(self.cfg.stages[0].chunk_size).max(1);
            let mut slots = e0;
            for s in 1..n {
                let e = self.cfg.stages[s - 1]
                    .chunk_size
                    .div_ceil(self.cfg.stages[s].chunk_size);
                slots = slots.max(self.stages[s - 1].cap * e);
            }
            self.scratch_need = (self.batch * hkv * slots, slots);
            self.grow_scratch()?;
            self.e0 = e0;
        }
        let rows = self.batch * hkv;
        let mean0 = self.mean0_ready(gpu, self.e0, kv.head_dim)?;
        let sinks: Vec<usize> = lens.iter().map(|&l| self.cfg.sink.min(l)).collect();
        let mut assembled = false;
        if lag {
            // The refresh into the second set of outputs, on the side stream
            // (after everything queued so far on this one).
            let mut a = self.async_rf.take().expect("async state");
            let r = a.fork(gpu).and_then(|()| {
                self.swap_async_outputs(&mut a, true);
                let r = self
                    .refresh_stages(&a.side, kv, q, from, upload, mean0, rows)
                    .and_then(|done| {
                        if !done {
                            assemble_rows(
                                &a.side,
                                self.stages.last().unwrap(),
                                self.extra.ptr,
                                hkv,
                                rows,
                                &self.sel,
                                0,
                                Some(self.tab_out(0)),
                            )?;
                        }
                        self.host_tab_sink.clone_from(&sinks);
                        Ok(())
                    });
                self.swap_async_outputs(&mut a, true);
                r
            });
            let r = r.and_then(|()| a.join());
            self.async_rf = Some(a);
            r?;
        } else {
            let run_from = if early0 { 1 } else { from };
            assembled = self.refresh_stages(gpu, kv, q, run_from, upload, mean0, rows)?;
        }
        // What this stream refreshed (a lagged step: nothing).
        let main_from = if lag { n } else { from };
        let lean_skip = self.lean_active() && main_from == n && self.host_tab_sink == sinks;
        self.sel_stale = lean_skip;
        self.sel_from_device = false;
        // Nothing in this step wrote the table, the counts or (with a
        // copy, not a kernel) the regions; only each sequence's newest
        // token can be new since the last step.
        self.early_ok = lean_skip && grew_by_at_most_one(&self.last_lens, lens);
        self.last_lens.clone_from(lens);
        if assembled {
            self.host_tab_sink = sinks;
        } else if !lean_skip {
            assemble_rows(
                gpu,
                self.stages.last().unwrap(),
                self.extra.ptr,
                hkv,
                rows,
                &self.sel,
                0,
                Some(self.tab_out(0)),
            )?;
            self.host_tab_sink = sinks;
        }
        self.step += 1;
        self.has_selection = true;
        // `stage0`: the next step refreshes stage 0: score it now, beside
        // this step's attention.
        if mode == AsyncMode::Stage0 && self.step % self.cfg.stages[0].refresh_interval == 0 {
            self.early_stage0(gpu, kv, q, mean0, rows)?;
        }
        Ok(from)
    }

    /// The inputs of a step's stage launches (`from`: the first stage run).
    fn stage_inputs(
        &self,
        q: u64,
        from: usize,
        mean0: Option<super::mean_key::MeanPtrs>,
        rows: usize,
    ) -> StageInputs {
        let n = self.cfg.stages.len();
        StageInputs {
            rows,
            row_seq: self.row_seq.ptr,
            q,
            nq: self.nq.ptr,
            nq_max: self.group,
            nq_tpl: self.group.min(8),
            stage0_in: self.stage0_in.ptr,
            stage0_cnt: self.stage0_cnt.ptr,
            e0: self.e0,
            keys: self.keys.ptr,
            module: self.score_module,
            gate: 0,
            topk_mc: self.topk_mc.as_ref().map(|m| m.ptrs),
            mean0,
            // Only where a stage refreshes (else nothing reaches the last top-k).
            assemble: (topk_asm() && from < n)
                .then(|| FusedAsm::new(&self.sel, self.extra.ptr, self.hkv, Some(self.tab_out(0)))),
        }
    }

    /// Score and top-k scratch for the sizes of the last upload.
    fn grow_scratch(&mut self) -> Result<()> {
        let (need, slots) = self.scratch_need;
        if need > self.keys_cap {
            self.keys = DevBuf::alloc(need * 4)?;
            self.keys_cap = need;
            self.grow_topk_mc(slots)?;
        }
        Ok(())
    }

    /// Stages `from..` of a step on `gpu`'s stream, into this decoder's
    /// outputs; true if the last top-k also assembled the selection.
    #[allow(clippy::too_many_arguments)]
    fn refresh_stages(
        &mut self,
        gpu: &GpuContext,
        kv: &DeviceKv,
        q: u64,
        from: usize,
        upload: bool,
        mean0: Option<super::mean_key::MeanPtrs>,
        rows: usize,
    ) -> Result<bool> {
        let n = self.cfg.stages.len();
        let ctx = self.stage_inputs(q, from, mean0, rows);
        let mut assembled = false;
        match self.rope_ready(upload)? {
            Some(r) if r.scores_rotated() => {
                r.upload_step(gpu, &self.cfg, &kv.lens)?;
                let all = super::rope_gpu::Seqs {
                    batch: self.batch,
                    first: 0,
                    count: self.batch,
                };
                // As below: stage 0 alone first when its event is wanted.
                let mut start = from;
                if let (Some(ev), 0) = (&self.stage0_done, from) {
                    r.run_stages(gpu, kv, &self.cfg, &self.stages, 0, 1, &ctx, all)?;
                    ev.record(&gpu.stream)
                        .map_err(|e| gpu_err("record stage-0 event", e))?;
                    start = 1;
                }
                r.run_stages(gpu, kv, &self.cfg, &self.stages, start, n, &ctx, all)?;
            }
            _ => match (&self.stage0_done, from) {
                (Some(ev), 0) => {
                    assembled = run_stages_to(gpu, kv, &self.cfg, &self.stages, 0, 1, &ctx)?;
                    ev.record(&gpu.stream)
                        .map_err(|e| gpu_err("record stage-0 event", e))?;
                    assembled |= run_stages(gpu, kv, &self.cfg, &self.stages, 1, &ctx)?;
                }
                _ => assembled = run_stages(gpu, kv, &self.cfg, &self.stages, from, &ctx)?,
            },
        }
        Ok(assembled)
    }

    /// `stage0`: stage 0 by cached means over this step's middle with this
    /// step's query, on the side stream, into the second stage-0 buffer
    /// with the side's own scratch (the next step swaps it in).
    fn early_stage0(
        &mut self,
        gpu: &GpuContext,
        kv: &DeviceKv,
        q: u64,
        mean0: Option<super::mean_key::MeanPtrs>,
        rows: usize,
    ) -> Result<()> {
        let mut a = self.async_rf.take().expect("async state");
        let r = a.fork(gpu).and_then(|()| {
            self.swap_early_stage0(&mut a);
            let r = self.grow_scratch().and_then(|()| {
                let ctx = self.stage_inputs(q, 0, mean0, rows);
                run_stages_to(&a.side, kv, &self.cfg, &self.stages, 0, 1, &ctx).map(drop)
            });
            self.swap_early_stage0(&mut a);
            r
        });
        let r = r.and_then(|()| {
            let s0 = a.stage0.as_mut().expect("stage0 state");
            s0.mid_end.clone_from(&self.mid_now);
            s0.discard = false;
            a.join()
        });
        self.async_rf = Some(a);
        r
    }

    /// Swap stage 0's output and the score / top-k scratch with the early
    /// stage 0's.
    fn swap_early_stage0(&mut self, a: &mut super::async_refresh::AsyncRefresh) {
        use std::mem::swap;
        let s0 = a.stage0.as_mut().expect("stage0 state");
        swap(&mut self.stages[0], &mut s0.out);
        swap(&mut self.keys, &mut s0.keys);
        swap(&mut self.keys_cap, &mut s0.keys_cap);
        swap(&mut self.topk_mc, &mut s0.topk_mc);
    }

    /// `async_refresh`, at the start of a step: the stream waits for the
    /// previous step's side work. `all`: its outputs become the ones the
    /// attention reads. `stage0`: on a step that refreshes stage 0
    /// (`from` 0), the early stage 0 is swapped in; returns whether it was.
    /// Refused where the work cannot move to a side stream (RoPE modes,
    /// host-tier scoring, the stage-0 event).
    fn async_begin(&mut self, gpu: &GpuContext, upload: bool, from: usize) -> Result<bool> {
        if self.rope_modes() {
            return Err(Error::config(
                "hip.async_refresh",
                "the GPU decoder runs it at original RoPE positions only",
            ));
        }
        if self.score_module != "hip_mask" || self.stage0_done.is_some() {
            return Err(Error::config(
                "hip.async_refresh",
                "not with host-tier (offloaded) key scoring or a stage-0 event",
            ));
        }
        let rows = self.batch * self.hkv;
        let mut a = match self.async_rf.take() {
            Some(a) => a,
            None => {
                let stage0 = (self.cfg.async_refresh == AsyncMode::Stage0)
                    .then(|| -> Result<_> {
                        Ok(super::async_refresh::EarlyStage0 {
                            out: self.stages[0].twin(rows)?,
                            keys: DevBuf::alloc(16)?,
                            keys_cap: 0,
                            topk_mc: None,
                            mid_end: vec![0; self.batch],
                            discard: false,
                        })
                    })
                    .transpose()?;
                let all = (self.cfg.async_refresh == AsyncMode::All)
                    .then(|| -> Result<_> {
                        Ok(super::async_refresh::RefreshOutputs {
                            last: self.stages.last().unwrap().twin(rows)?,
                            sel: DeviceSelection::empty(rows, self.sel.cap)?,
                            tab: DevBuf::alloc(self.tab.bytes)?,
                            ntab: DevBuf::from_slice(&vec![0i32; rows])?,
                            tab_sink: DevBuf::from_slice(&vec![-1i32; rows])?,
                            host_tab_sink: Vec::new(),
                            extra: DevBuf::alloc(self.batch * 3 * 8)?,
                            extra_host: Vec::new(),
                            extra_differs: false,
                        })
                    })
                    .transpose()?;
                Box::new(super::async_refresh::AsyncRefresh::new(gpu, stage0, all)?)
            }
        };
        let r = a.wait_pending(gpu).and_then(|waited| {
            if !waited {
                return Ok(false);
            }
            if a.all.is_some() {
                self.swap_async_outputs(&mut a, false);
                // A step that uploads nothing keeps the last upload's
                // regions: the refresh's, which this step now attends.
                let o = a.all.as_mut().unwrap();
                if !upload && o.extra_differs {
                    self.extra.write_async(&gpu.stream, &o.extra_host)?;
                    o.extra_differs = false;
                }
                return Ok(false);
            }
            let keep = a.stage0.as_ref().is_some_and(|s| !s.discard && from == 0);
            if keep {
                let s0 = a.stage0.as_mut().unwrap();
                std::mem::swap(&mut self.stages[0], &mut s0.out);
            }
            Ok(keep)
        });
        self.async_rf = Some(a);
        r
    }

    /// `all`: swap the attention's outputs (last stage, selection, table,
    /// counts, sink ends) with the side refresh's; `extra` too: the
    /// regions, for the side refresh itself.
    fn swap_async_outputs(&mut self, a: &mut super::async_refresh::AsyncRefresh, extra: bool) {
        use std::mem::swap;
        let o = a.all.as_mut().expect("all state");
        swap(self.stages.last_mut().unwrap(), &mut o.last);
        swap(&mut self.sel, &mut o.sel);
        swap(&mut self.tab, &mut o.tab);
        swap(&mut self.ntab, &mut o.ntab);
        swap(&mut self.tab_sink, &mut o.tab_sink);
        swap(&mut self.host_tab_sink, &mut o.host_tab_sink);
        if extra {
            swap(&mut self.extra, &mut o.extra);
        }
    }

    /// One full decode step: selection then attention into `out`.
    pub fn step(
        &mut self,
        gpu: &GpuContext,
        shape: &AttnShape,
        kv: &DeviceKv,
        q: u64,
        out: u64,
        upload: bool,
    ) -> Result<usize> {
        let from = self.select(gpu, kv, q, upload)?;
        let mt = self.max_tokens;
        self.attend(gpu, shape, kv, q, mt, out)?;
        Ok(from)
    }

    /// The table outputs of `hip_assemble`; `gate` non-zero: a lean device
    /// step (see `TabOut`).
    pub(crate) fn tab_out(&self, gate: u64) -> TabOut {
        TabOut {
            tab: self.tab.ptr,
            cap: self.tab_cap,
            ntab: self.ntab.ptr,
            gate,
            n_stages: self.cfg.stages.len(),
            tab_sink: self.tab_sink.ptr,
        }
    }

    /// The stage-0 mean cache sized for `chunks` chunks per row, with a
    /// pending invalidation applied (`reset`); None without `mean_key`.
    pub(crate) fn mean0_ready(
        &mut self,
        gpu: &GpuContext,
        chunks: usize,
        d: usize,
    ) -> Result<Option<super::mean_key::MeanPtrs>> {
        let rows = self.batch * self.hkv;
        let module = self.score_module;
        let Some(m) = self.mean0.as_mut() else {
            return Ok(None);
        };
        if module != "hip_mask" {
            return Err(Error::config(
                "hip.decode_stage0",
                "mean_key reads keys on the device: not with host-tier (offloaded) key scoring",
            ));
        }
        m.ensure(rows, chunks, d)?;
        if m.bump_pending {
            m.bump(gpu)?;
        }
        Ok(Some(m.ptrs()))
    }

    /// Lean steps (on by default): with the sparse v2 attention, a step
    /// that refreshes no stage skips `hip_assemble` when the sink is as at
    /// the last build (the host step launches nothing for it; the device
    /// step's launch returns at once), since the sparse attention reads
    /// the sink + chunk table (unchanged) and the slid + window tail from
    /// the per-step regions. `sel` then keeps the last build's ranges (its
    /// slid and window are stale) until `selection()` rebuilds them; the
    /// split-K attention, which reads `sel`, turns lean steps off. Outputs
    /// equal the full steps' bit for bit (gpu-test).
    pub fn set_lean(&mut self, on: bool) {
        self.lean = on;
    }

    /// Whether steps are lean now (`set_lean` and the sparse v2 attention).
    pub fn lean_active(&self) -> bool {
        self.lean && self.attention_kernel() == HipAttention::SparseV2
    }

    /// The last step's attention selection, up to date: after a lean step
    /// (or a device step that may have been one) the ranges are assembled
    /// again from the last stage's chunks and the step's regions (one
    /// launch on `gpu`'s stream; nothing else changes).
    pub fn selection(&mut self, gpu: &GpuContext) -> Result<&DeviceSelection> {
        if self.sel_stale || self.sel_from_device {
            let rows = self.batch * self.hkv;
            assemble_rows(
                gpu,
                self.stages.last().unwrap(),
                self.extra.ptr,
                self.hkv,
                rows,
                &self.sel,
                0,
                None,
            )?;
            self.sel_stale = false;
        }
        Ok(&self.sel)
    }

    /// `selection()` read to the host (one `Selection` per sequence),
    /// after waiting for `gpu`'s stream (the rebuild and the step may run
    /// on a non-blocking stream, which host reads are not ordered with).
    pub fn selection_host(&mut self, gpu: &GpuContext) -> Result<Vec<Selection>> {
        self.selection(gpu)?;
        gpu.synchronize()?;
        self.sel.to_host(self.hkv)
    }

    /// The selection buffer as the last step left it, stale ranges and
    /// all after a lean step (tests: what a reader that skipped
    /// `selection()` would see).
    pub fn selection_as_left(&self) -> &DeviceSelection {
        &self.sel
    }

    /// This decoder's attention kernel (None: the global `attention()`).
    pub fn set_attention(&mut self, a: Option<HipAttention>) {
        self.attn = a;
    }

    fn attention_kernel(&self) -> HipAttention {
        self.attn.unwrap_or_else(attention)
    }

    /// Attention over the step's selection (bound `mt` selected tokens per
    /// row), by `HipAttention` (`set_attention`, `force_attention`): the
    /// sparse v2 kernel (one launch over the sink + chunk table and the
    /// slid + window tail; the default), or split-K + combine (`decode`)
    /// over `self.sel`'s ranges.
    pub fn attend(
        &mut self,
        gpu: &GpuContext,
        shape: &AttnShape,
        kv: &DeviceKv,
        q: u64,
        mt: usize,
        out: u64,
    ) -> Result<()> {
        let kind = self.attention_kernel();
        if self.rope_modes() && self.rope.is_none() {
            return Err(Error::config(
                "hip.rope",
                "the GPU decoder's RoPE modes need the model's RoPE: call set_rope_model",
            ));
        }
        if self.rope.as_ref().is_some_and(|r| r.streaming) {
            if kind != HipAttention::SparseV2 {
                return Err(Error::config(
                    "hip.rope.attention",
                    "streaming attention on the GPU runs on the sparse v2 kernel only (not split-combine)",
                ));
            }
            check_shape(shape, kv)?;
            let rows = self.batch * self.hkv;
            if self.rope_kv.is_none() {
                self.rope_kv = Some(super::rope_gpu::CompactKv::new()?);
            }
            let compact = self.rope_kv.as_mut().unwrap();
            let rope = self.rope.as_deref().unwrap();
            let src = rope.gather(
                gpu,
                compact,
                kv,
                rows,
                self.tab.ptr,
                self.tab_cap,
                self.ntab.ptr,
                self.extra.ptr,
                mt,
                0,
            )?;
            let out = AttnOut::f32_rows(out, shape);
            return src.attend(
                gpu,
                &mut self.v2_ws,
                shape,
                kv.dtype,
                q,
                self.batch,
                mt,
                out,
            );
        }
        if kind == HipAttention::SparseV2 {
            check_shape(shape, kv)?;
            let mut ws = std::mem::take(&mut self.v2_ws);
            let r = super::dense_decode::launch_v2(
                gpu,
                &mut ws,
                shape,
                KvPtrs {
                    k: kv.k.ptr,
                    v: kv.v.ptr,
                    table: kv.table.ptr,
                    table_stride: kv.table_stride,
                    page_size: kv.page_size,
                    dtype: kv.dtype,
                },
                kv.strides(),
                q,
                self.batch,
                super::dense_decode::V2Src::Sparse {
                    tab: self.tab.ptr,
                    tab_stride: self.tab_cap,
                    ntab: self.ntab.ptr,
                    extra: self.extra.ptr,
                    early: self.early_ok,
                },
                0,
                mt.max(1),
                None,
                None,
                AttnOut::f32_rows(out, shape),
            );
            self.v2_ws = ws;
            return r;
        }
        let mut ws = std::mem::take(&mut self.ws);
        let r = decode(gpu, &mut ws, shape, kv, q, &self.sel, mt, None, out);
        self.ws = ws;
        r
    }

    /// The rows start new sequences: the next step refreshes every stage
    /// (and, with `decode_stage0 = mean_key`, forgets the cached means).
    pub fn reset(&mut self) {
        if let Some(m) = &mut self.mean0 {
            m.bump_pending = true;
        }
        self.restart_cycle();
        self.has_selection = false;
        self.host_tab_sink.clear();
        // A pending early stage 0 scored the previous sequences.
        if let Some(s0) = self.async_rf.as_mut().and_then(|a| a.stage0.as_mut()) {
            s0.discard = true;
        }
    }

    /// Restart the refresh cycle on the same sequences (benchmarks): the
    /// next step refreshes every stage; cached means stay. With
    /// `async_refresh` the current selection stays too (the next step
    /// attends it while its refresh runs beside), as in a long decode.
    pub fn restart_cycle(&mut self) {
        self.step = 0;
        if self.cfg.async_refresh != AsyncMode::All {
            self.host_tab_sink.clear();
        }
        self.sel_stale = false;
        self.sel_from_device = false;
        self.early_ok = false;
    }
}

/// InfiniteHiP chunked prefill on the GPU: the mask of every query block of
/// a chunk (the CPU policy's `select_prefill`: sink, stages over the middle
/// scored by the block's strided queries, window from the block's first
/// query), then causal block-sparse attention of each query over its block's
/// selection. One sequence (batch row 0 of the `DeviceKv`).
pub struct HipGpuPrefill {
    cfg: HipConfig,
    hkv: usize,
    group: usize,
    max_blocks: usize,
    nq_max: usize,
    stages: Vec<StageBuf>,
    keys: DevBuf,
    keys_cap: usize,
    qs: DevBuf,
    nq: DevBuf,
    row_seq: DevBuf,
    stage0_in: DevBuf,
    stage0_cnt: DevBuf,
    extra: DevBuf,
    q_pos: DevBuf,
    /// Sequence (page-table row) of each query: all 0.
    q_seq: DevBuf,
    pub sel: DeviceSelection,
    pub ws: DecodeWorkspace,
    n_blocks: usize,
    n: usize,
    e0: usize,
    max_tokens: usize,
    /// Mask estimator of `select` (Auto: the tensor-core one).
    pub estimator: MaskEstimator,
    fast: FastEstimator,
    /// The sequence: its index in the `DeviceKv`'s lens and its page-table
    /// row (`set_sequence`; default 0 and 0).
    seq: usize,
    table_row: usize,
    /// First query position of the prepared chunk.
    q_start: usize,
    n_q: usize,
    /// RoPE modes (`rope.scoring` / `rope.attention` other than original),
    /// set up by `set_rope_model`: rotated per-block scoring
    /// (`RopeGpu::run_stages` with one query shift per (stage, block)) and
    /// streaming attention (`attend_streaming`).
    rope: Option<Box<super::rope_gpu::RopeGpu>>,
    /// The stored keys' pair layout and frequencies (`set_rope_layout`;
    /// None: halves at the model's theta).
    rope_layout: Option<super::rope_gpu::RopeLayout>,
    /// Streaming attention's buffers (first use).
    stream: Option<PfStream>,
}

/// Buffers of the streaming prefill (`HipGpuPrefill::attend_streaming`):
/// the compact K/V of one KV head at a time (`[block][p][d]`, cache dtype;
/// zeroed at allocation so that slots past a row's count hold finite
/// values), its identity page table, the rotated queries `[hkv][n][g][d]`
/// f32 with their clips and blocks `[hkv][n]` i32, and the attention's
/// selection (one range `0..p` per block: each query is clipped at its own
/// n_j - 1).
struct PfStream {
    k2: DevBuf,
    v2: DevBuf,
    p: usize,
    rows: usize,
    table: DevBuf,
    qout: DevBuf,
    qpos2: DevBuf,
    qseq2: DevBuf,
    sel: DeviceSelection,
}

impl HipGpuPrefill {
    /// Buffers for chunks of up to `max_queries` queries.
    pub fn new(cfg: HipConfig, shape: &AttnShape, max_queries: usize) -> Result<Self> {
        // Reuse the decoder's validation of stages; RoPE modes need
        // `set_rope_model` before `prepare`.
        HipGpuDecoder::validate_decoder(&cfg)?;
        let hkv = shape.n_kv_heads;
        let g = shape.group();
        let qb = cfg.block_size_q;
        let max_blocks = max_queries.div_ceil(qb).max(1);
        let rows = max_blocks * hkv;
        let per_block = qb.div_ceil(cfg.q_stride) + 1;
        let nq_max = per_block * g;
        let mut stages = Vec::new();
        for st in &cfg.stages {
            let cap = (st.keep_tokens / st.chunk_size).max(1);
            stages.push(StageBuf {
                out: DevBuf::alloc(rows * cap * 8)?,
                cnt: DevBuf::from_slice(&vec![0i32; rows])?,
                cap,
            });
        }
        let last_cap = stages.last().unwrap().cap;
        Ok(HipGpuPrefill {
            hkv,
            group: g,
            max_blocks,
            nq_max,
            keys: DevBuf::alloc(16)?,
            keys_cap: 0,
            qs: DevBuf::alloc(rows * nq_max.next_multiple_of(8) * shape.head_dim * 4)?,
            nq: DevBuf::alloc(max_blocks * 4)?,
            row_seq: DevBuf::from_slice(&vec![0i32; max_blocks])?,
            stage0_in: DevBuf::alloc(rows * 8)?,
            stage0_cnt: DevBuf::from_slice(&vec![1i32; rows])?,
            extra: DevBuf::alloc(max_blocks * 3 * 8)?,
            q_pos: DevBuf::alloc(max_blocks * qb * 4)?,
            q_seq: DevBuf::from_slice(&vec![0i32; max_blocks * qb])?,
            sel: DeviceSelection::empty(rows, last_cap + 3)?,
            ws: DecodeWorkspace::new(),
            n_blocks: 0,
            n: 0,
            e0: 1,
            max_tokens: 1,
            estimator: MaskEstimator::Auto,
            fast: FastEstimator::new(),
            seq: 0,
            table_row: 0,
            q_start: 0,
            n_q: shape.n_q_heads,
            rope: None,
            rope_layout: None,
            stream: None,
            stages,
            cfg,
        })
    }

    /// The configuration this object was built for.
    pub fn config(&self) -> &HipConfig {
        &self.cfg
    }

    /// Whether the config asks for a RoPE mode (scoring or attention).
    pub fn rope_modes(&self) -> bool {
        self.cfg.rope.scoring != crate::config::RopeMode::Original
            || self.cfg.rope.attention != crate::config::RopeMode::Original
    }

    /// The model's RoPE (theta, trained length `max_position`), which the
    /// RoPE modes need, as `HipPolicy::new` takes the `ModelShape`; a no-op
    /// at original positions. Keys and queries must be stored rotated at
    /// their positions (halves / NEOX layout of `rope::Rope`).
    /// Status: compiled, not run on a GPU (`gpu-test --rope-only` checks it
    /// against the CPU `HipPolicy`'s prefill).
    pub fn set_rope_model(&mut self, model: &crate::config::ModelShape) -> Result<()> {
        self.set_rope(model.head_dim, model.rope_theta, model.max_position)
    }

    /// `set_rope_model` from its parts (`GpuAttention`: a layer's RoPE).
    pub fn set_rope(&mut self, head_dim: usize, theta: f32, max_position: usize) -> Result<()> {
        // hip_rope_q moves `[blocks][hkv * nq_max][d]` scoring queries by
        // one shift per block: a "sequence" of hkv * nq_max query rows.
        self.rope = super::rope_gpu::RopeGpu::new(
            &self.cfg,
            head_dim,
            theta,
            max_position,
            self.max_blocks,
            self.hkv * self.nq_max,
        )?
        .map(Box::new);
        if let (Some(r), Some(l)) = (self.rope.as_deref_mut(), self.rope_layout) {
            r.set_layout(l)?;
        }
        Ok(())
    }

    /// The stored keys' pair layout and frequencies (llama.cpp's NORM
    /// layout on its CUDA route), applied now and by later `set_rope`
    /// calls; None: halves at the model's theta (`RopeGpu::set_layout`).
    pub fn set_rope_layout(&mut self, layout: Option<super::rope_gpu::RopeLayout>) -> Result<()> {
        if let Some(r) = self.rope.as_deref_mut() {
            r.set_layout(layout.unwrap_or(super::rope_gpu::RopeLayout::halves(r.theta())))?;
        }
        self.rope_layout = layout;
        Ok(())
    }

    /// What `set_rope_layout` was given.
    pub fn rope_layout(&self) -> Option<super::rope_gpu::RopeLayout> {
        self.rope_layout
    }

    /// The (theta, max_position) `set_rope` was given, if any.
    pub fn rope_model(&self) -> Option<(f32, usize)> {
        self.rope.as_deref().map(|r| (r.theta(), r.max_position()))
    }

    /// The RoPE state, or an error naming what is missing.
    fn rope_ready(&self) -> Result<Option<&super::rope_gpu::RopeGpu>> {
        if !self.rope_modes() {
            return Ok(None);
        }
        self.rope.as_deref().map(Some).ok_or_else(|| {
            Error::config(
                "hip.rope",
                "the GPU sparse prefill's RoPE modes need the model's RoPE: call HipGpuPrefill::set_rope_model",
            )
        })
    }

    /// Largest chunk of queries one `prepare` takes.
    pub fn max_queries(&self) -> usize {
        self.max_blocks * self.cfg.block_size_q
    }

    /// Work on sequence `seq` of the `DeviceKv` (its lens index) at page
    /// table row `table_row` from now on; the fast estimator's
    /// representatives restart.
    pub fn set_sequence(&mut self, gpu: &GpuContext, seq: usize, table_row: usize) -> Result<()> {
        let row = i32::try_from(table_row)
            .map_err(|_| Error::OutOfRange(format!("table row {table_row} exceeds i32")))?;
        let qb = self.cfg.block_size_q;
        self.row_seq
            .write_async(&gpu.stream, &vec![row; self.max_blocks])?;
        self.q_seq
            .write_async(&gpu.stream, &vec![row; self.max_blocks * qb])?;
        self.seq = seq;
        self.table_row = table_row;
        self.fast.reset();
        Ok(())
    }

    /// Host-side set-up of a chunk of `n` queries at cache positions
    /// `q_start..q_start + n` (tiny uploads: regions and positions).
    pub fn prepare(
        &mut self,
        gpu: &GpuContext,
        kv: &DeviceKv,
        q_start: usize,
        n: usize,
    ) -> Result<()> {
        let qb = self.cfg.block_size_q;
        let nb = n.div_ceil(qb);
        if n == 0 || nb > self.max_blocks {
            return Err(Error::Invalid(format!(
                "hip GPU prefill: chunk of {n} queries (buffers hold {})",
                self.max_blocks * qb
            )));
        }
        kv.check_lens()?;
        let len = kv.lens.get(self.seq).copied().unwrap_or(0);
        if q_start + n > len {
            return Err(Error::OutOfRange(format!(
                "hip GPU prefill: queries {q_start}..{} beyond {len} cached tokens",
                q_start + n,
            )));
        }
        let mut mids = Vec::with_capacity(nb * self.hkv);
        let mut extra = Vec::with_capacity(nb * 3);
        let (mut max_mid, mut bound) = (0, 1);
        let last_keep = self.stages.last().map_or(0, |s| s.cap)
            * self.cfg.stages.last().map_or(0, |s| s.chunk_size);
        for b in 0..nb {
            let p_first = q_start + b * qb;
            let p_last = q_start + ((b + 1) * qb).min(n) - 1;
            let end = p_last + 1;
            // The CPU policy's prefill regions (rope_gpu::prefill_regions).
            let (sink, mid, win) = super::rope_gpu::prefill_regions(&self.cfg, p_first, p_last);
            let (sink_end, win_start) = (sink.end, win.start);
            max_mid = max_mid.max(mid.len());
            bound = bound.max(sink_end + (end - win_start) + last_keep.min(mid.len()));
            for _ in 0..self.hkv {
                mids.push([mid.start as i32, mid.end as i32]);
            }
            extra.push([0, sink_end as i32]);
            extra.push([0, 0]);
            extra.push([win_start as i32, end as i32]);
        }
        self.stage0_in.write_async(&gpu.stream, &mids)?;
        self.extra.write_async(&gpu.stream, &extra)?;
        let pos: Vec<i32> = (0..n).map(|i| (q_start + i) as i32).collect();
        self.q_pos.write_async(&gpu.stream, &pos)?;
        self.e0 = max_mid.div_ceil(self.cfg.stages[0].chunk_size).max(1);
        let mut slots = self.e0;
        for s in 1..self.cfg.stages.len() {
            let e = self.cfg.stages[s - 1]
                .chunk_size
                .div_ceil(self.cfg.stages[s].chunk_size);
            slots = slots.max(self.stages[s - 1].cap * e);
        }
        let need = nb * self.hkv * slots;
        if need > self.keys_cap {
            self.keys = DevBuf::alloc(need * 4)?;
            self.keys_cap = need;
        }
        if let Some(r) = self.rope_ready()? {
            r.upload_prefill(gpu, &self.cfg, q_start, n)?;
        }
        self.n_blocks = nb;
        self.n = n;
        self.q_start = q_start;
        self.max_tokens = bound;
        if q_start == 0 {
            // A new sequence: the fast estimator's representatives restart.
            self.fast.reset();
        }
        Ok(())
    }

    /// Mask estimation for the prepared chunk; `q` is the chunk's queries
    /// `[n][n_q_heads][d]` f32 on the device. Leaves the selection in `sel`
    /// (rows `[block][kv_head]`).
    pub fn select(&mut self, gpu: &GpuContext, kv: &DeviceKv, q: u64) -> Result<()> {
        let rows = self.n_blocks * self.hkv;
        let d = kv.head_dim;
        // Rotated scoring (chunk_indexed / relative) runs the reference
        // search with rotated probes, as the CPU policy (which refuses the
        // fast estimator with these modes).
        let rotated = self.rope_ready()?.is_some_and(|r| r.scores_rotated());
        if rotated
            && self.estimator.with_config(self.cfg.mask_estimator) == MaskEstimator::TensorCore
        {
            return Err(Error::config(
                "hip.rope.scoring",
                "the tensor-core mask estimator scores stored keys as they are: with chunk_indexed / relative scoring the GPU prefill runs the reference estimator (use MaskEstimator::Auto or Reference)",
            ));
        }
        if !rotated
            && self
                .estimator
                .with_config(self.cfg.mask_estimator)
                .fast_for(d)
        {
            let x = FastInputs {
                rows,
                q,
                n: self.n,
                nq_max: self.nq_max,
                group: self.group,
                row_seq: self.row_seq.ptr,
                seq_row: self.table_row,
                len: kv.lens[self.seq],
                stage0_in: self.stage0_in.ptr,
                stage0_cnt: self.stage0_cnt.ptr,
                e0: self.e0,
                keys: self.keys.ptr,
            };
            self.fast
                .run(gpu, kv, &self.cfg, self.cfg.block_size_q, &self.stages, &x)?;
            self.sel.rows = rows;
            return assemble(
                gpu,
                self.stages.last().unwrap(),
                self.extra.ptr,
                self.hkv,
                rows,
                &self.sel,
            );
        }
        let gather = gpu.func("hip_mask", "hip_gather_q")?;
        let (n, qb, st, hk, g, di, nqm) = (
            self.n as i32,
            self.cfg.block_size_q as i32,
            self.cfg.q_stride as i32,
            self.hkv as i32,
            self.group as i32,
            d as i32,
            self.nq_max as i32,
        );
        let mut l = gpu.stream.launch_builder(&gather);
        l.arg(&q)
            .arg(&n)
            .arg(&qb)
            .arg(&st)
            .arg(&hk)
            .arg(&g)
            .arg(&di)
            .arg(&nqm)
            .arg(&self.qs.ptr)
            .arg(&self.nq.ptr);
        // SAFETY: the arguments pushed above follow the kernel's parameter list in kernels/*.cu
        // (same order and C types); every pointer is a device allocation of this context sized for
        // this grid by the code above.
        unsafe {
            l.launch(LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(|e| gpu_err("launch hip_gather_q", e))?;
        let x = StageInputs {
            rows,
            row_seq: self.row_seq.ptr,
            q: self.qs.ptr,
            nq: self.nq.ptr,
            nq_max: self.nq_max,
            nq_tpl: 8,
            stage0_in: self.stage0_in.ptr,
            stage0_cnt: self.stage0_cnt.ptr,
            e0: self.e0,
            keys: self.keys.ptr,
            module: "hip_mask",
            gate: 0,
            topk_mc: None,
            mean0: None,
            assemble: None,
        };
        match self.rope.as_deref() {
            Some(r) if rotated => {
                let smem = self.nq_max * d * 4;
                if smem > 227 * 1024 {
                    return Err(Error::config(
                        "hip.q_stride",
                        format!("rotated prefill scoring keeps a block's {} scoring queries x head_dim {d} in shared memory ({smem} bytes > 227 KiB): raise q_stride", self.nq_max),
                    ));
                }
                let nb = self.n_blocks;
                let seqs = super::rope_gpu::Seqs {
                    batch: nb,
                    first: 0,
                    count: nb,
                };
                r.run_stages(
                    gpu,
                    kv,
                    &self.cfg,
                    &self.stages,
                    0,
                    self.cfg.stages.len(),
                    &x,
                    seqs,
                )?;
            }
            _ => {
                run_stages(gpu, kv, &self.cfg, &self.stages, 0, &x)?;
            }
        }
        self.sel.rows = rows;
        assemble(
            gpu,
            self.stages.last().unwrap(),
            self.extra.ptr,
            self.hkv,
            rows,
            &self.sel,
        )
    }

    /// Causal block-sparse attention of the prepared chunk over `sel`.
    pub fn attend(
        &mut self,
        gpu: &GpuContext,
        shape: &AttnShape,
        kv: &DeviceKv,
        q: u64,
        out: u64,
    ) -> Result<()> {
        self.attend_with(gpu, shape, kv, q, out, AttnKernel::Auto)
    }

    /// `attend` into an output of any dtype and row stride (the engine's).
    pub fn attend_out(
        &mut self,
        gpu: &GpuContext,
        shape: &AttnShape,
        kv: &DeviceKv,
        q: u64,
        out: AttnOut,
    ) -> Result<()> {
        check_shape(shape, kv)?;
        if self.streaming() {
            return self.attend_streaming(gpu, shape, kv, q, out, AttnKernel::Auto);
        }
        let mut ws = std::mem::take(&mut self.ws);
        let ptrs = KvPtrs {
            k: kv.k.ptr,
            v: kv.v.ptr,
            table: kv.table.ptr,
            table_stride: kv.table_stride,
            page_size: kv.page_size,
            dtype: kv.dtype,
        };
        let r = launch_attention_kernel(
            gpu,
            &mut ws,
            shape,
            ptrs,
            kv.strides(),
            q,
            self.n,
            &self.sel,
            self.max_tokens,
            None,
            out,
            self.cfg.block_size_q,
            self.q_seq.ptr,
            self.q_pos.ptr,
            AttnKernel::Auto,
            false,
        );
        self.ws = ws;
        r
    }

    /// `attend` with a chosen kernel (both twins over one selection).
    pub fn attend_with(
        &mut self,
        gpu: &GpuContext,
        shape: &AttnShape,
        kv: &DeviceKv,
        q: u64,
        out: u64,
        kernel: AttnKernel,
    ) -> Result<()> {
        if self.streaming() {
            check_shape(shape, kv)?;
            return self.attend_streaming(gpu, shape, kv, q, AttnOut::f32_rows(out, shape), kernel);
        }
        let mut ws = std::mem::take(&mut self.ws);
        let r = attend_with(
            gpu,
            &mut ws,
            shape,
            kv,
            q,
            self.n,
            &self.sel,
            self.max_tokens,
            None,
            out,
            self.cfg.block_size_q,
            self.q_seq.ptr,
            self.q_pos.ptr,
            kernel,
        );
        self.ws = ws;
        r
    }
}

impl HipGpuPrefill {
    /// Streaming attention (`rope.attention` streaming) of the prepared
    /// chunk over `sel`, as the CPU kernel (attention/cpu.rs
    /// `prefill_with`): query j of block b, KV head h, sees row (b, h)'s
    /// tokens at positions <= p_j renumbered 0..n_j in order, and sits at
    /// n_j - 1. Rows are ascending, so a key's streaming position is its
    /// rank in the row: `hip_pf_stream_q` rotates each (query, q head) to
    /// n_j - 1 and records the clip n_j - 1, then per KV head
    /// `hip_pf_stream_gather_*` writes that head's rows' keys rotated to
    /// their ranks (rounded to the cache dtype) into a compact buffer and
    /// the unchanged prefill attention (`kernel`) reads it as one page per
    /// block, every block's selection `0..p` clipped at each query's
    /// n_j - 1. Host-side twin: `rope_gpu::pf_stream_plan`.
    fn attend_streaming(
        &mut self,
        gpu: &GpuContext,
        shape: &AttnShape,
        kv: &DeviceKv,
        q: u64,
        out: AttnOut,
        kernel: AttnKernel,
    ) -> Result<()> {
        self.rope_ready()?;
        let (hkv, g, d, n, nb) = (self.hkv, self.group, kv.head_dim, self.n, self.n_blocks);
        let qb = self.cfg.block_size_q;
        // Every row holds at most max_tokens tokens (prepare's bound).
        let p = self.max_tokens.max(1);
        // One KV head's rows at a time (gather, then its attention).
        let max_rows = self.max_blocks;
        let max_q = self.max_blocks * qb;
        let grow = match &self.stream {
            Some(st) => st.p < p,
            None => true,
        };
        if grow {
            let pc = p.next_multiple_of(256);
            let bytes = max_rows * pc * d * 2;
            let k2 = DevBuf::alloc(bytes)?;
            let v2 = DevBuf::alloc(bytes)?;
            k2.fill_bytes(0)?;
            v2.fill_bytes(0)?;
            let sel = DeviceSelection::empty(self.max_blocks, 1)?;
            self.stream = Some(PfStream {
                k2,
                v2,
                p: pc,
                rows: max_rows,
                table: DevBuf::from_slice(&(0..max_rows as i32).collect::<Vec<_>>())?,
                qout: DevBuf::alloc(max_q * self.n_q * d * 4)?,
                qpos2: DevBuf::alloc(hkv * max_q * 4)?,
                qseq2: DevBuf::alloc(hkv * max_q * 4)?,
                sel,
            });
        }
        let r = self.rope.as_deref().expect("streaming implies RoPE modes");
        let st = self.stream.as_ref().unwrap();
        debug_assert!(nb <= st.rows);
        let pc = st.p;
        r.pf_queries(
            gpu,
            q,
            n,
            self.q_start,
            qb,
            hkv,
            g,
            &self.sel,
            st.qout.ptr,
            st.qpos2.ptr,
            st.qseq2.ptr,
        )?;
        // Every block: the one range 0..pc (each query clipped at n_j - 1).
        st.sel
            .ranges
            .write_async(&gpu.stream, &vec![[0i32, pc as i32]; nb])?;
        st.sel.cum.write_async(&gpu.stream, &vec![0i32; nb])?;
        st.sel.cnt.write_async(&gpu.stream, &vec![1i32; nb])?;
        st.sel.tot.write_async(&gpu.stream, &vec![pc as i32; nb])?;
        let sel = DeviceSelection {
            ranges: DevBuf::borrowed(st.sel.ranges.ptr, nb * 8),
            cum: DevBuf::borrowed(st.sel.cum.ptr, nb * 4),
            cnt: DevBuf::borrowed(st.sel.cnt.ptr, nb * 4),
            tot: DevBuf::borrowed(st.sel.tot.ptr, nb * 4),
            cap: 1,
            rows: nb,
            max_tokens: pc,
        };
        let shape_h = AttnShape {
            n_q_heads: g,
            n_kv_heads: 1,
            head_dim: d,
            scale: shape.scale,
        };
        let esz = if out.dtype == DType::F32 { 4 } else { 2 };
        let (k2, v2, table, qout, qpos2, qseq2) = (
            st.k2.ptr,
            st.v2.ptr,
            st.table.ptr,
            st.qout.ptr,
            st.qpos2.ptr,
            st.qseq2.ptr,
        );
        let mut ws = std::mem::take(&mut self.ws);
        let mut res = Ok(());
        for h in 0..hkv {
            res = r.pf_gather(gpu, kv, self.table_row, &self.sel, h, nb, pc, k2, v2);
            if res.is_err() {
                break;
            }
            res = launch_attention_kernel(
                gpu,
                &mut ws,
                &shape_h,
                KvPtrs {
                    k: k2,
                    v: v2,
                    table,
                    table_stride: 1,
                    page_size: pc,
                    dtype: kv.dtype,
                },
                KvStrides {
                    page: (pc * d) as i64,
                    head: (pc * d) as i64,
                },
                qout + (h * n * g * d * 4) as u64,
                n,
                &sel,
                pc,
                None,
                AttnOut {
                    ptr: out.ptr + (h * g * d * esz) as u64,
                    ..out
                },
                qb,
                qseq2 + (h * n * 4) as u64,
                qpos2 + (h * n * 4) as u64,
                kernel,
                false,
            );
            if res.is_err() {
                break;
            }
        }
        self.ws = ws;
        res
    }

    /// Whether `attend` runs streaming positions.
    fn streaming(&self) -> bool {
        self.cfg.rope.attention == crate::config::RopeMode::Streaming
    }
}

/// Every sequence's length is the same as at the last host step or one
/// more (same batch): only each sequence's newest token can be new.
fn grew_by_at_most_one(last: &[usize], now: &[usize]) -> bool {
    last.len() == now.len() && now.iter().zip(last).all(|(&l, &p)| l == p || l == p + 1)
}

#[cfg(test)]
mod tc_tests {
    use super::*;

    #[test]
    fn early_loads_need_at_most_one_new_token() {
        assert!(grew_by_at_most_one(&[10, 20], &[11, 20]));
        assert!(grew_by_at_most_one(&[10, 20], &[10, 20]));
        assert!(!grew_by_at_most_one(&[10, 20], &[12, 20]));
        assert!(!grew_by_at_most_one(&[10, 20], &[9, 20]));
        assert!(!grew_by_at_most_one(&[], &[1]));
        assert!(!grew_by_at_most_one(&[10], &[11, 1]));
    }

    #[test]
    fn tensor_core_applicability() {
        let s = AttnShape::new(32, 8, 128).unwrap();
        let out = |ptr: u64, dtype: DType, row_stride: usize| AttnOut {
            ptr,
            dtype,
            row_stride,
        };
        assert!(tc_applies(&s, DType::Bf16, &out(4096, DType::F32, 4096)));
        assert!(tc_applies(&s, DType::F16, &out(4100, DType::Bf16, 4096)));
        // f32 pairs need 8-byte alignment, 16-bit pairs 4-byte, rows even.
        assert!(!tc_applies(&s, DType::Bf16, &out(4100, DType::F32, 4096)));
        assert!(!tc_applies(&s, DType::Bf16, &out(4098, DType::Bf16, 4096)));
        assert!(!tc_applies(&s, DType::Bf16, &out(4096, DType::F32, 4095)));
        assert!(!tc_applies(&s, DType::F32, &out(4096, DType::F32, 4096)));
        let d256 = AttnShape::new(16, 2, 256).unwrap();
        assert!(!tc_applies(
            &d256,
            DType::Bf16,
            &out(4096, DType::F32, 4096)
        ));
        let d64 = AttnShape::new(8, 8, 64).unwrap();
        assert!(tc_applies(&d64, DType::Bf16, &out(4096, DType::F32, 512)));
        // Rows per tile: 64 M rows per m-tile per warp group of 4 warps.
        assert_eq!(tc_rows_per_tile(&s, 1), 16);
        assert_eq!(tc_rows_per_tile(&s, 2), 32);
        assert_eq!(tc_rows_per_tile(&d64, 2), 128);
    }
}
