//! Dense decode at the memory-bandwidth limit: one launch of
//! kernels/decode_dense.cu (flash-decoding split-K on tensor cores; the last
//! CTA of each (row, kv head) merges the splits). Query row i attends
//! tokens `0..lens[i]` of table row `q_seq[i]`; `lens` and `q_seq` live on
//! the device, so a step uploads nothing else and the launch shape depends
//! only on the batch size and the longest length it is sized for.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::dispatch::{check_shape, AttnOut, DeviceKv, KvPtrs, KvStrides};
use super::{gpu_err, kernels, DevBuf, GpuContext};
use crate::attention::AttnShape;
use crate::error::{Error, Result};

/// Threads per CTA of the kernel (DD_WARPS warps).
const THREADS: u32 = 128;

static V2: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);
static WAVES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

/// Run kernels/decode_dense_v2.cu (packed hi/lo splits, shift page
/// indexing; the default: 99-107% of copy bandwidth at 1M on the H200 vs
/// 74-90% for decode_dense.cu, same 25 reference checks passed,
/// tests/gpu/logs/gpustep/) or, with false, the previous
/// kernels/decode_dense.cu. Benchmarks and tests switch it.
pub fn force_v2(on: bool) {
    V2.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Default split size for about `waves` waves of resident CTAs (1 unless
/// set; benchmarks sweep it).
pub fn set_default_waves(waves: usize) {
    WAVES.store(waves.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// Split-K scratch (partials) and the per-(row, kv head) arrival counters,
/// zeroed once at allocation (each launch leaves them zero).
pub struct DenseDecodeWs {
    pm: DevBuf,
    pl: DevBuf,
    pacc: DevBuf,
    counters: DevBuf,
    cap_rows: usize,
    cap_pairs: usize,
}

impl DenseDecodeWs {
    pub fn new() -> Self {
        DenseDecodeWs {
            pm: DevBuf::null(),
            pl: DevBuf::null(),
            pacc: DevBuf::null(),
            counters: DevBuf::null(),
            cap_rows: 0,
            cap_pairs: 0,
        }
    }
    /// `ensure` for a launch on `stream`: new counters are zeroed in that
    /// stream's order. (A fill on the legacy stream is not ordered with a
    /// caller's non-blocking stream, so a launch there could meet counters
    /// not yet zeroed, or zeroed mid-launch, and the last-CTA merge would
    /// misfire: a candidate cause of the engine dense failure of
    /// merged-2026-12-04c.)
    pub(crate) fn ensure_on(
        &mut self,
        rows: usize,
        pairs: usize,
        d: usize,
        stream: &cudarc::driver::CudaStream,
    ) -> Result<()> {
        self.grow(rows, pairs, d, Some(stream))
    }
    pub(crate) fn ensure(&mut self, rows: usize, pairs: usize, d: usize) -> Result<()> {
        self.grow(rows, pairs, d, None)
    }
    fn grow(
        &mut self,
        rows: usize,
        pairs: usize,
        d: usize,
        stream: Option<&cudarc::driver::CudaStream>,
    ) -> Result<()> {
        if rows > self.cap_rows {
            let rows = rows.next_power_of_two();
            self.pm = DevBuf::alloc(rows * 4)?;
            self.pl = DevBuf::alloc(rows * 4)?;
            self.pacc = DevBuf::alloc(rows * d * 4)?;
            self.cap_rows = rows;
        }
        if pairs > self.cap_pairs {
            let pairs = pairs.next_power_of_two();
            self.counters = DevBuf::alloc(pairs * 4)?;
            match stream {
                Some(st) => self.counters.fill_bytes_async(0, st)?,
                None => self.counters.fill_bytes(0)?,
            }
            self.cap_pairs = pairs;
        }
        Ok(())
    }
}

impl Default for DenseDecodeWs {
    fn default() -> Self {
        Self::new()
    }
}

/// Tokens per split for `n_rows` rows of up to `max_len` tokens: about one
/// wave of `slots` resident CTAs, in multiples of a CTA's iteration
/// (`4 warps x 16 x chunks` tokens), at least 512 tokens.
pub fn split_tokens(
    slots: usize,
    n_rows: usize,
    hkv: usize,
    max_len: usize,
    chunks: usize,
) -> usize {
    let step = 64 * chunks;
    let pairs = (n_rows * hkv).max(1);
    let want = (slots as f64 / pairs as f64).round().max(1.0) as usize;
    max_len.div_ceil(want).next_multiple_of(step).max(512)
}

/// What a v2 launch attends: each row's tokens `0..lens[row]` (dense), or
/// hip's selection (sparse: per (row, kv head) `ntab` positions of `tab`,
/// row stride `tab_stride`, then the contiguous slid + window tail read from
/// `extra`, `[rows][3]` int2 sink/slid/window as `HipGpuDecoder` keeps them).
/// `early`: no kernel of this step wrote `tab`, `ntab` or `extra` (a host
/// step that rebuilt no table; `extra` uploaded by a copy), and the K/V of
/// every token but each row's newest were written before the previous
/// step's attention: the launch loads its first chunk before its PDL wait
/// (`DD_EARLY_LOADS`, when `early_loads()` is on).
#[derive(Clone, Copy)]
pub(crate) enum V2Src {
    Dense {
        lens: u64,
    },
    Sparse {
        tab: u64,
        tab_stride: usize,
        ntab: u64,
        extra: u64,
        early: bool,
    },
}

static DENSE_CHUNKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Override the dense launch's default chunks per iteration (0: the
/// default; `gpu-test --dense-chunks` reproduces engine cases with it).
pub fn set_dense_chunks(chunks: usize) {
    DENSE_CHUNKS.store(chunks, std::sync::atomic::Ordering::Relaxed);
}

static LEGACY_MERGE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// v2 launches merge their splits with the previous merge (each thread one
/// output element at a time, 4 splits in flight: the L2 round trips chain
/// up) instead of the default (16-byte loads, 8 splits in flight, splits
/// spread over idle threads). Benchmarks compare the two
/// (`bench-gpu-sparse`); outputs equal to rounding.
pub fn set_legacy_merge(on: bool) {
    LEGACY_MERGE.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The split arrival and merge sum loop of v2 launches: on (default), one
/// acquire-release add by thread 0 between barriers and the merge's loads
/// 16 in flight; `INFINITEHIP_ACQREL_ARRIVAL=0` or
/// `set_fenced_arrival(true)` restores the previous (a fence in every
/// thread before and after the arrival counter, the sum loop's remainder
/// one load per round trip), which benchmarks compare. Outputs bit-equal.
static ACQREL_ARRIVAL: super::switch::EnvSwitch =
    super::switch::EnvSwitch::new("INFINITEHIP_ACQREL_ARRIVAL");

pub fn set_fenced_arrival(on: bool) {
    ACQREL_ARRIVAL.set(!on);
}

/// The merging CTA loads its first 16 partials before the split weights
/// (one L2 round trip fewer); `INFINITEHIP_MERGE_PREFETCH=0` or
/// `set_merge_prefetch(false)`: after them, as before. Outputs bit-equal.
static MERGE_PREFETCH: super::switch::EnvSwitch =
    super::switch::EnvSwitch::new("INFINITEHIP_MERGE_PREFETCH");

pub fn set_merge_prefetch(on: bool) {
    MERGE_PREFETCH.set(on);
}

/// Sparse launches marked `early` load their first chunk's table entries
/// and K/V before waiting for the previous kernel (PDL), overlapping that
/// kernel's tail; `INFINITEHIP_EARLY_LOADS=0` or `set_early_loads(false)`:
/// after the wait, as before. Outputs bit-equal.
static EARLY_LOADS: super::switch::EnvSwitch =
    super::switch::EnvSwitch::new("INFINITEHIP_EARLY_LOADS");

pub fn set_early_loads(on: bool) {
    EARLY_LOADS.set(on);
}

/// With early loads, the second chunk's K/V prefetched into L2 before the
/// wait as well (its page lookups put one more round trip before the wait):
/// on by default, `INFINITEHIP_EARLY_L2=0` or `set_early_l2(false)` off.
/// The gain of early loads is this prefetch: on an H100 the 32-layer
/// step's hip layer at 1M was 21.4-21.6 us with it, 22.5 with the first
/// chunk's loads alone, 22.7 with neither (BENCHMARKS.md, "early loads").
static EARLY_L2: super::switch::EnvSwitch = super::switch::EnvSwitch::new("INFINITEHIP_EARLY_L2");

pub fn set_early_l2(on: bool) {
    EARLY_L2.set(on);
}

pub fn early_loads() -> bool {
    EARLY_LOADS.get()
}

static SPARSE_TRACE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Diagnostics: sparse launches run the `hip_sparse_trace` build, whose
/// CTAs stamp the global timer at points of the launch (`sparse_trace`).
pub fn set_sparse_trace(on: bool) {
    SPARSE_TRACE.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Stamps per CTA of the traced build (`DD_TS`).
pub const SPARSE_TRACE_SLOTS: usize = 24;

/// The last traced sparse launch's stamps, `SPARSE_TRACE_SLOTS` per CTA in
/// launch-grid order (kernels/decode_dense_v2.cu, `DD_TRACE`), for its
/// first `n_ctas` CTAs.
pub fn sparse_trace(gpu: &GpuContext, n_ctas: usize) -> Result<Vec<u64>> {
    let (p, bytes) = gpu.module_global("hip_sparse_trace", "dd_trace")?;
    let n = (n_ctas * SPARSE_TRACE_SLOTS).min(bytes / 8);
    gpu.synchronize()?;
    DevBuf::borrowed(p, bytes).read(n)
}

static SPARSE_SPLIT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static SPARSE_CHUNKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Override the sparse launch's tokens per split and chunks per iteration
/// (0 keeps the default; benchmarks sweep them).
pub fn set_sparse_tuning(split: usize, chunks: usize) {
    SPARSE_SPLIT.store(split, std::sync::atomic::Ordering::Relaxed);
    SPARSE_CHUNKS.store(chunks, std::sync::atomic::Ordering::Relaxed);
}

/// Tokens per split of the sparse launch: about one wave of `slots`
/// resident CTAs over `pairs` (row, kv head) pairs, a multiple of one CTA
/// iteration (`64 * chunks` tokens) and no smaller: a hip row is a few
/// thousand tokens, so latency, not bytes, decides, and the shortest chain
/// per CTA wins.
pub fn sparse_split(slots: usize, pairs: usize, max_tokens: usize, chunks: usize) -> usize {
    let step = 64 * chunks;
    let want = (slots / pairs.max(1)).max(1);
    max_tokens.div_ceil(want).next_multiple_of(step).max(step)
}

/// The dense decode launch. `q` f32 `[n_rows][n_q_heads][head_dim]` (the
/// shape's scale applies), `lens` device i32 `[n_rows]` (each in
/// `1..=max_len`, within the table row's capacity: the caller's contract),
/// `q_seq` device i32 `[n_rows]` table rows (0: row i uses table row i).
/// `split` None: about one wave of CTAs; `chunks` None: the default of
/// `kernels::dense_chunks`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_dense(
    gpu: &GpuContext,
    ws: &mut DenseDecodeWs,
    shape: &AttnShape,
    kv: KvPtrs,
    st: KvStrides,
    q: u64,
    n_rows: usize,
    lens: u64,
    q_seq: u64,
    max_len: usize,
    split: Option<usize>,
    chunks: Option<usize>,
    out: AttnOut,
) -> Result<()> {
    launch_v2(
        gpu,
        ws,
        shape,
        kv,
        st,
        q,
        n_rows,
        V2Src::Dense { lens },
        q_seq,
        max_len,
        split,
        chunks,
        out,
    )
}

/// The v2 launch, dense or hip sparse (`src`); `max_len` bounds every
/// row's token count (sparse: the selected tokens).
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_v2(
    gpu: &GpuContext,
    ws: &mut DenseDecodeWs,
    shape: &AttnShape,
    kv: KvPtrs,
    st: KvStrides,
    q: u64,
    n_rows: usize,
    src: V2Src,
    q_seq: u64,
    max_len: usize,
    split: Option<usize>,
    chunks: Option<usize>,
    out: AttnOut,
) -> Result<()> {
    if n_rows == 0 || max_len == 0 {
        return Ok(());
    }
    let sparse = matches!(src, V2Src::Sparse { .. });
    let (hkv, d, g) = (shape.n_kv_heads, shape.head_dim, shape.group());
    let tag = kernels::dtype_tag(kv.dtype).ok_or_else(|| {
        Error::Invalid(format!("dense decode reads bf16/f16 K/V, got {}", kv.dtype))
    })?;
    let allowed = kernels::dense_chunks(d);
    let load =
        |a: &std::sync::atomic::AtomicUsize| match a.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            v => Some(v),
        };
    let chunks = chunks.or(load(if sparse {
        &SPARSE_CHUNKS
    } else {
        &DENSE_CHUNKS
    }));
    // Default: the most chunks per iteration built (2 at head_dim <= 128:
    // v2 at 1M batch 1 0.98 vs 1.32 ms with 1, at 128K 0.147 vs 0.210 ms,
    // equal at batch 16; tests/gpu/logs/gpustep/bench-gpu-dense.log), but
    // only at page sizes the u2 checks cover (16, 64): over the engine's
    // token-major pools (page size 1) u2 gave wrong outputs in the merged
    // GPU run of 2026-12-04 07:31 (tests/gpu/logs/merged-2026-12-04c/), so
    // those keep u1 until that is found.
    // Sparse: 1 chunk (168 registers, 3 CTAs per SM, vs 252 and 2 with 2
    // chunks): equal at batch 1 (20.1 us for 3,264 tokens x 8 kv heads,
    // cold L2), 98 vs 128 us at batch 16 (bench-gpu-sparse,
    // tests/gpu/logs/gpu14-2026-12-04/).
    let u = chunks.unwrap_or(if sparse {
        allowed[0]
    } else if kv.page_size >= 16 {
        *allowed.last().unwrap()
    } else {
        allowed[0]
    });
    if !allowed.contains(&u) {
        return Err(Error::Invalid(format!(
            "dense decode: {u} chunks per iteration not built for head_dim {d} (have {allowed:?})"
        )));
    }
    if n_rows > gpu.grid_limits.z as usize {
        return Err(Error::Invalid(format!(
            "dense decode: {n_rows} query rows exceed the grid's z limit {}",
            gpu.grid_limits.z
        )));
    }
    let v2 = sparse || V2.load(std::sync::atomic::Ordering::Relaxed);
    let module = if sparse {
        if SPARSE_TRACE.load(std::sync::atomic::Ordering::Relaxed) {
            "hip_sparse_trace"
        } else {
            "hip_sparse"
        }
    } else if v2 {
        "decode_dense_v2"
    } else {
        "decode_dense"
    };
    let kind = if sparse { "hip_sparse" } else { "dense" };
    let f = gpu.func(module, &format!("{kind}_{tag}_d{d}_g{g}_u{u}"))?;
    let split = match split.or(if sparse { load(&SPARSE_SPLIT) } else { None }) {
        Some(s) => s.next_multiple_of(64 * u),
        None => {
            let per_sm = f
                .occupancy_max_active_blocks_per_multiprocessor(THREADS, 0, None)
                .map_err(|e| gpu_err("dense decode occupancy", e))?
                .max(1) as usize;
            let waves = WAVES.load(std::sync::atomic::Ordering::Relaxed);
            let slots = gpu.sm_count * per_sm * waves;
            if sparse {
                sparse_split(slots, n_rows * hkv, max_len, u)
            } else {
                split_tokens(slots, n_rows, hkv, max_len, u)
            }
        }
    };
    let n_splits = max_len.div_ceil(split).max(1);
    if n_splits > gpu.grid_limits.x as usize {
        return Err(Error::Invalid(format!(
            "dense decode: {n_splits} splits exceed the grid's x limit"
        )));
    }
    ws.ensure_on(
        n_rows * shape.n_q_heads * n_splits,
        n_rows * hkv,
        d,
        &gpu.stream,
    )?;
    let scale_log2 = shape.scale * std::f32::consts::LOG2_E;
    let (ts, ps, hk, sp, ns) = (
        kv.table_stride as i32,
        kv.page_size as i32,
        hkv as i32,
        split as i32,
        n_splits as i32,
    );
    // v2 reads a power-of-two page size with a shift (-1: divide).
    let ps_log2: i32 = if kv.page_size.is_power_of_two() {
        kv.page_size.trailing_zeros() as i32
    } else {
        -1
    };
    let (ors, odt) = (out.row_stride as i64, out.code());
    // kernels/decode_dense_v2.cu: DD_LEGACY_MERGE 1, DD_FENCED_ARRIVAL 2, DD_NO_PREFETCH 4,
    // DD_EARLY_LOADS 8, DD_EARLY_L2 16.
    let early = matches!(src, V2Src::Sparse { early: true, .. }) && EARLY_LOADS.get();
    let flags: i32 = i32::from(LEGACY_MERGE.load(std::sync::atomic::Ordering::Relaxed))
        | (i32::from(!ACQREL_ARRIVAL.get()) << 1)
        | (i32::from(!MERGE_PREFETCH.get()) << 2)
        | (i32::from(early) << 3)
        | (i32::from(early && EARLY_L2.get()) << 4);
    // v2 entry points (dense and hip_sparse) begin with IHIP_PDL_ENTRY; decode_dense.cu's do not.
    let site = match (v2, sparse) {
        (false, _) => None,
        (true, true) => Some(super::pdl::Site::Attn),
        (true, false) => Some(super::pdl::Site::Dense),
    };
    let mut l = gpu.launch_pdl(&f, site);
    l.arg(&kv.k).arg(&kv.v).arg(&kv.table).arg(&ts).arg(&ps);
    if v2 {
        l.arg(&ps_log2);
    }
    l.arg(&hk)
        .arg(&st.page)
        .arg(&st.head)
        .arg(&q)
        .arg(&scale_log2);
    let tab_stride;
    match &src {
        V2Src::Dense { lens } => {
            l.arg(lens);
        }
        V2Src::Sparse {
            tab,
            tab_stride: t,
            ntab,
            extra,
            ..
        } => {
            tab_stride = *t as i32;
            l.arg(tab).arg(&tab_stride).arg(ntab).arg(extra);
        }
    }
    l.arg(&q_seq)
        .arg(&sp)
        .arg(&ns)
        .arg(&ws.pm.ptr)
        .arg(&ws.pl.ptr)
        .arg(&ws.pacc.ptr)
        .arg(&ws.counters.ptr)
        .arg(&out.ptr)
        .arg(&ors)
        .arg(&odt);
    if v2 {
        l.arg(&flags);
    }
    // SAFETY: the arguments pushed above follow DENSE_INST's (dense) or SPARSE_INST's (sparse)
    // parameter list in kernels/decode_dense_v2.cu (decode_dense.cu: DENSE_INST without
    // ps_log2 and flags), same order and C types; the workspace holds n_rows * Hq * n_splits partial rows
    // and n_rows * hkv zeroed counters (ensured above); K/V, table, lens or the selection
    // (tab rows of tab_stride, ntab, extra: the caller's, sized for n_rows * hkv rows and
    // n_rows sequences), q_seq, q and out are the caller's device buffers sized for these rows.
    unsafe {
        l.launch(LaunchConfig {
            grid_dim: (n_splits as u32, hkv as u32, n_rows as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map_err(|e| gpu_err("launch dense decode", e))?;
    super::prof::mark(gpu, if sparse { "attn sparse v2" } else { "dense" })
}

/// Dense decode over a `DeviceKv`: query row i (f32 `[rows][Hq][D]` at
/// `q`) attends tokens `0..kv.lens[i]` of sequence i; out f32, same shape.
/// `lens_dev` is a device copy of `kv.lens` as i32 (checked here against
/// the uploaded capacity on the host side).
#[allow(clippy::too_many_arguments)]
pub fn dense_decode(
    gpu: &GpuContext,
    ws: &mut DenseDecodeWs,
    shape: &AttnShape,
    kv: &DeviceKv,
    q: u64,
    lens_dev: &DevBuf,
    split: Option<usize>,
    chunks: Option<usize>,
    out: u64,
) -> Result<()> {
    check_shape(shape, kv)?;
    kv.check_lens()?;
    let b = kv.batch();
    if lens_dev.bytes < b * 4 {
        return Err(Error::shape("dense decode lens", b * 4, lens_dev.bytes));
    }
    if kv.lens.contains(&0) {
        return Err(Error::Invalid(
            "dense decode: a sequence of length 0".into(),
        ));
    }
    let max_len = kv.lens.iter().copied().max().unwrap_or(0);
    launch_dense(
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
        b,
        lens_dev.ptr,
        0,
        max_len,
        split,
        chunks,
        AttnOut::f32_rows(out, shape),
    )
}

/// hip sparse attention over a `DeviceKv` (the kernel `HipGpuDecoder`
/// attends with; tests drive it on arbitrary selections): query row b (f32
/// `[rows][Hq][D]` at `q`) attends, per kv head h, positions
/// `tab[(b * hkv + h) * tab_stride ..][..ntab[b * hkv + h]]` (i32, device)
/// then the tail `[tail0, win.1)` with `extra` i32 `[rows][3][2]` (sink,
/// slid, window; tail0 = slid.0 if the slid range is non-empty, else
/// win.0); `max_tokens` bounds every row's count. Out f32, same shape.
/// `early`: as `V2Src::Sparse`'s (the caller vouches that no kernel still
/// in flight writes the selection or the K/V it reads).
#[allow(clippy::too_many_arguments)]
pub fn sparse_decode(
    gpu: &GpuContext,
    ws: &mut DenseDecodeWs,
    shape: &AttnShape,
    kv: &DeviceKv,
    q: u64,
    tab: &DevBuf,
    tab_stride: usize,
    ntab: &DevBuf,
    extra: &DevBuf,
    max_tokens: usize,
    split: Option<usize>,
    chunks: Option<usize>,
    early: bool,
    out: u64,
) -> Result<()> {
    check_shape(shape, kv)?;
    let (b, hkv) = (kv.batch(), shape.n_kv_heads);
    if tab.bytes < b * hkv * tab_stride * 4 || ntab.bytes < b * hkv * 4 || extra.bytes < b * 24 {
        return Err(Error::Invalid(format!(
            "sparse decode: table {} / counts {} / extra {} bytes for {b} rows x {hkv} heads x {tab_stride}",
            tab.bytes, ntab.bytes, extra.bytes
        )));
    }
    launch_v2(
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
        b,
        V2Src::Sparse {
            tab: tab.ptr,
            tab_stride,
            ntab: ntab.ptr,
            extra: extra.ptr,
            early,
        },
        0,
        max_tokens,
        split,
        chunks,
        AttnOut::f32_rows(out, shape),
    )
}

/// Benchmark K/V on the device: `batch` sequences of `tokens` tokens in the
/// core pool's page layout (pages in order, distinct memory per sequence),
/// filled with hashed near-normal values by kernels/decode_dense.cu
/// `dense_fill_random` (no host upload).
#[allow(clippy::too_many_arguments)]
pub fn random_device_kv(
    gpu: &GpuContext,
    batch: usize,
    tokens: usize,
    n_kv_heads: usize,
    head_dim: usize,
    dtype: crate::dtype::DType,
    page_size: usize,
    seed: u32,
) -> Result<DeviceKv> {
    let code: i32 = match dtype {
        crate::dtype::DType::F16 => 1,
        crate::dtype::DType::Bf16 => 2,
        crate::dtype::DType::F32 => {
            return Err(Error::Invalid("random_device_kv: bf16 or f16".into()))
        }
    };
    let per = tokens.div_ceil(page_size);
    let pe = n_kv_heads * page_size * head_dim;
    let n = batch * per * pe;
    let (k, v) = (DevBuf::alloc(n * 2)?, DevBuf::alloc(n * 2)?);
    let f = gpu.func("decode_dense", "dense_fill_random")?;
    for (buf, s) in [(&k, seed), (&v, seed ^ 0x5bd1_e995)] {
        let nn = n as i64;
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(&buf.ptr).arg(&nn).arg(&s).arg(&code);
        // SAFETY: `buf` holds n 2-byte elements; the kernel writes elements 0..n only.
        unsafe {
            l.launch(LaunchConfig {
                grid_dim: (gpu.sm_count as u32 * 8, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(|e| gpu_err("launch dense_fill_random", e))?;
    }
    let table: Vec<i32> = (0..(batch * per) as i32).collect();
    Ok(DeviceKv {
        k,
        v,
        table: DevBuf::from_slice(&table)?,
        table_stride: per,
        page_size,
        page_stride: pe,
        head_stride: page_size * head_dim,
        n_kv_heads,
        head_dim,
        dtype,
        lens: vec![tokens; batch],
        capacity: vec![per * page_size; batch],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_fill_about_one_wave() {
        // H200: 132 SMs x 3 CTAs; 1M tokens, batch 1, 8 kv heads.
        let s = split_tokens(396, 1, 8, 1 << 20, 1);
        assert_eq!(s % 64, 0);
        let n = (1usize << 20).div_ceil(s);
        assert!((45..=55).contains(&n), "{n} splits");
        // Batch 16: 128 pairs, 3 splits each.
        assert_eq!(
            (1usize << 20).div_ceil(split_tokens(396, 16, 8, 1 << 20, 2)),
            3
        );
        // Short contexts are not split below 512 tokens.
        assert_eq!(split_tokens(396, 1, 8, 700, 1), 512);
    }

    #[test]
    fn sparse_splits_are_one_iteration_or_more() {
        // hip at batch 1: 3,264 selected tokens, 8 kv heads, 264 slots:
        // one 2-chunk iteration (128 tokens) per CTA, 26 splits.
        let s = sparse_split(264, 8, 3264, 2);
        assert_eq!(s, 128);
        assert_eq!(3264usize.div_ceil(s), 26);
        // Never below one iteration; multiples of it.
        assert_eq!(sparse_split(10_000, 8, 100, 1), 64);
        assert_eq!(sparse_split(396, 128, 3264, 2) % 128, 0);
        assert!(3264usize.div_ceil(sparse_split(396, 128, 3264, 2)) * 128 <= 396 * 2);
    }
}
