//! InfiniteHiP's RoPE modes on the GPU hip decode (`HipGpuDecoder`, and
//! `GpuAttention::decode` per hip layer: engine_attn/rope.rs), as the CPU
//! policy runs them (DESIGN 3.1): keys stay stored rotated at their
//! original positions and are re-rotated on the fly (kernels/hip_rope.cu).
//!
//! - `rope.scoring` `chunk_indexed` / `relative`: per stage, the scoring
//!   queries are moved by `rope::score_query_shift` (one small launch), and
//!   the stage's scorer (`hip_score_rope_*`: one thread per sub-chunk, the
//!   same search and keys as `hip_score`) rotates every probed key to its
//!   scoring position before the dot products. Selections equal the CPU
//!   policy's (gpu-test --rope-only).
//! - `rope.attention` `streaming`: after the selection, a gather pass
//!   (`hip_stream_gather_*`) writes every row's selected keys re-rotated by
//!   `rope::streaming_key_shift` (query kept as stored) and their values into
//!   a compact buffer, which the unchanged hip sparse attention reads as a
//!   one-page sequence per row. The rotated keys are rounded to the cache's
//!   dtype (bf16/f16) there: the one numerical difference from the CPU
//!   kernel, which rotates the query in f32 instead.
//!
//! Pair layout: halves (the core's `Rope`) unless `set_layout` gives
//! llama.cpp's NORM layout (pairs (2i, 2i+1)) and frequencies: every kernel
//! takes an `inter` flag, the halves path unchanged (compiled, not yet run
//! on a GPU; `gpu-test --rope-only` has interleaved cases).
//!
//! Host steps only (`step`/`select` with `upload`): the graph-capturable
//! device step (and `GpuAttention`'s CUDA-graph decode), split-K attention,
//! the host-tier scorers and the GPU sparse prefill refuse the modes.
//! Status: compiled, NOT yet run on a GPU.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::dense_decode::{launch_v2, DenseDecodeWs, V2Src};
use super::dispatch::{
    launch_topk, regions, AttnOut, DeviceKv, KvPtrs, KvStrides, StageBuf, SubChunks,
};
use super::{gpu_err, kernels, DevBuf, GpuContext};
use crate::attention::AttnShape;
use crate::config::{HipConfig, RopeMode};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::rope::Rope;

/// Threads per CTA of the scorer and gather launches.
const THREADS: usize = 128;

pub use crate::rope::RopeLayout;

/// Device state of the RoPE modes of one `HipGpuDecoder`, or of one hip
/// layer of `GpuAttention` (engine_attn/rope.rs).
pub struct RopeGpu {
    pub(crate) scoring: RopeMode,
    pub(crate) streaming: bool,
    max_position: usize,
    theta: f32,
    /// Pair layout and frequencies of the stored keys (`set_layout`).
    layout: RopeLayout,
    head_dim: usize,
    n_q_heads: usize,
    n_stages: usize,
    /// Sequences the per-sequence buffers below hold (`reserve`).
    batch: usize,
    inv_freq: DevBuf,
    /// `[batch][n_q][d]` f32: the stage's moved scoring queries.
    qrot: DevBuf,
    /// `[n_stages][batch]` f64 query shifts (NaN: as stored).
    shifts: DevBuf,
    /// `[batch]` f64 relative key factors (NaN: as stored).
    rel: DevBuf,
    /// Streaming: zero tails and the one-page table of the compact buffer
    /// (`CompactKv`), per sequence.
    extra2: DevBuf,
    table2: DevBuf,
}

/// Streaming attention's compact K/V (`[rows][p][d]`, the cache dtype)
/// with its per-row identity position tables and counts. The decoder owns
/// one; `GpuAttention` shares one across its layers (they run one after
/// another on one stream), not one per layer.
pub(crate) struct CompactKv {
    k2: DevBuf,
    v2: DevBuf,
    p: usize,
    tab2: DevBuf,
    ntab2: DevBuf,
}

impl CompactKv {
    pub(crate) fn new() -> Result<Self> {
        Ok(CompactKv {
            k2: DevBuf::alloc(16)?,
            v2: DevBuf::alloc(16)?,
            p: 0,
            tab2: DevBuf::alloc(16)?,
            ntab2: DevBuf::alloc(16)?,
        })
    }

    /// Room for `rows` rows of at least `p` tokens of `d` 2-byte elements
    /// (grown in 256-token steps; the stride stays until it must grow).
    /// Returns the row stride in tokens.
    fn ensure(&mut self, rows: usize, p: usize, d: usize) -> Result<usize> {
        let p = p.max(1);
        if p > self.p || self.k2.bytes < rows * self.p * d * 2 {
            let cap = p.max(self.p).next_multiple_of(256);
            self.k2 = DevBuf::alloc(rows * cap * d * 2)?;
            self.v2 = DevBuf::alloc(rows * cap * d * 2)?;
            let iota: Vec<i32> = (0..rows * cap).map(|i| (i % cap) as i32).collect();
            self.tab2 = DevBuf::from_slice(&iota)?;
            self.ntab2 = DevBuf::alloc(rows * 4)?;
            self.p = cap;
        }
        Ok(self.p)
    }
}

/// The RoPE modes `cfg` asks for, validated as `HipPolicy::new` validates
/// them: None when both are original, else (scoring mode, streaming
/// attention). Host-only (CPU tests).
pub fn modes(cfg: &HipConfig) -> Result<Option<(RopeMode, bool)>> {
    let (scoring, attention) = (cfg.rope.scoring, cfg.rope.attention);
    if scoring == RopeMode::Original && attention == RopeMode::Original {
        return Ok(None);
    }
    if scoring == RopeMode::Streaming {
        return Err(Error::config(
            "hip.rope.scoring",
            "streaming applies to attention only",
        ));
    }
    if matches!(attention, RopeMode::ChunkIndexed | RopeMode::Relative) {
        return Err(Error::config(
            "hip.rope.attention",
            "use original or streaming",
        ));
    }
    // As HipPolicy::new (and config validation): the fast estimator scores
    // stored keys as they are, so rotated scoring cannot use it; refused
    // here rather than silently replaced by the reference estimator.
    if cfg.mask_estimator == crate::config::MaskEstimatorChoice::Fast
        && scoring != RopeMode::Original
    {
        return Err(Error::config(
            "hip.mask_estimator",
            "fast scores stored keys as they are: needs rope.scoring original",
        ));
    }
    Ok(Some((scoring, attention == RopeMode::Streaming)))
}

/// Which sequences of the last `upload_step` a `run_stages` call scores:
/// `count` from `first`, of the `batch` uploaded (the decoder: all of
/// them; `GpuAttention`: one request per call, as its stages launch).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seqs {
    pub batch: usize,
    pub first: usize,
    pub count: usize,
}

impl Seqs {
    /// Index of sequence `first`'s query shift of stage `s` in
    /// `step_shifts`' `[n_stages][batch]` output (what `shifts` holds).
    pub(crate) fn shift_index(&self, s: usize) -> usize {
        s * self.batch + self.first
    }
}

impl RopeGpu {
    /// None when both modes are original (the decoder then runs exactly as
    /// before).
    pub fn new(
        cfg: &HipConfig,
        head_dim: usize,
        theta: f32,
        max_position: usize,
        batch: usize,
        n_q_heads: usize,
    ) -> Result<Option<Self>> {
        let Some((scoring, streaming)) = modes(cfg)? else {
            return Ok(None);
        };
        let rope = Rope::new(head_dim, theta);
        let mut r = RopeGpu {
            scoring,
            streaming,
            max_position,
            theta,
            layout: RopeLayout::halves(theta),
            head_dim,
            n_q_heads,
            n_stages: cfg.stages.len(),
            batch: 0,
            inv_freq: DevBuf::from_slice(rope.inv_freq())?,
            qrot: DevBuf::alloc(16)?,
            shifts: DevBuf::alloc(16)?,
            rel: DevBuf::alloc(16)?,
            extra2: DevBuf::alloc(16)?,
            table2: DevBuf::alloc(16)?,
        };
        r.reserve(batch)?;
        Ok(Some(r))
    }

    /// The stored keys' pair layout and frequencies (llama.cpp's CUDA route:
    /// NORM layout, its freq_base / freq_scale). Rotated scoring scores at
    /// the CPU policy's positions, which rotates at `model.rope_theta`
    /// unscaled: a layout with other frequencies is refused there (as the
    /// llama.cpp plugin's CPU route refuses it); streaming attention takes
    /// any base and linear scale.
    pub fn set_layout(&mut self, layout: RopeLayout) -> Result<()> {
        if !(layout.freq_base.is_finite()
            && layout.freq_base > 1.0
            && layout.freq_scale.is_finite()
            && layout.freq_scale > 0.0)
        {
            return Err(Error::config(
                "hip.rope",
                format!(
                    "RoPE layout: freq_base {} / freq_scale {} (must be finite, > 1 / > 0)",
                    layout.freq_base, layout.freq_scale
                ),
            ));
        }
        if self.scores_rotated() && (layout.freq_base != self.theta || layout.freq_scale != 1.0) {
            return Err(Error::config(
                "hip.rope.scoring",
                format!(
                    "chunk_indexed/relative scoring rotates at model.rope_theta {} unscaled (as the CPU \
                     policy); the keys are rotated at base {} scale {}: use \"original\" scoring",
                    self.theta, layout.freq_base, layout.freq_scale
                ),
            ));
        }
        if layout != self.layout {
            self.inv_freq = DevBuf::from_slice(&layout.inv_freq(self.head_dim))?;
            self.layout = layout;
        }
        Ok(())
    }

    /// The layout `set_layout` was given (`RopeLayout::halves(theta)`
    /// before).
    pub fn layout(&self) -> RopeLayout {
        self.layout
    }

    fn inter(&self) -> i32 {
        self.layout.interleaved as i32
    }

    /// Size the per-sequence buffers for `batch` sequences (grow only;
    /// synchronous allocations and uploads).
    pub(crate) fn reserve(&mut self, batch: usize) -> Result<()> {
        if batch <= self.batch {
            return Ok(());
        }
        let (d, nq) = (self.head_dim, self.n_q_heads);
        self.qrot = DevBuf::alloc(batch * nq * d * 4)?;
        self.shifts = DevBuf::alloc(self.n_stages.max(1) * batch * 8)?;
        self.rel = DevBuf::alloc(batch * 8)?;
        self.extra2 = DevBuf::from_slice(&vec![0i32; batch * 6])?;
        self.table2 = DevBuf::from_slice(&(0..batch as i32).collect::<Vec<_>>())?;
        self.batch = batch;
        Ok(())
    }

    fn check_kv(&self, kv: &DeviceKv) -> Result<&'static str> {
        if kv.head_dim != self.head_dim {
            return Err(Error::shape(
                "hip RoPE head_dim (set_rope_model)",
                self.head_dim,
                kv.head_dim,
            ));
        }
        kernels::dtype_tag(kv.dtype).ok_or_else(|| {
            Error::Invalid(format!(
                "hip RoPE modes read bf16/f16 keys, got {}",
                kv.dtype
            ))
        })
    }

    /// The trained length the modes were built with (`model.max_position`).
    pub fn max_position(&self) -> usize {
        self.max_position
    }

    /// The RoPE theta the modes were built with (`model.rope_theta`).
    pub fn theta(&self) -> f32 {
        self.theta
    }

    pub fn scores_rotated(&self) -> bool {
        self.scoring != RopeMode::Original
    }

    /// Upload this step's query shifts and key factors (`lens`: every
    /// sequence's length; its query sits at len - 1).
    pub(crate) fn upload_step(
        &self,
        gpu: &GpuContext,
        cfg: &HipConfig,
        lens: &[usize],
    ) -> Result<()> {
        if !self.scores_rotated() {
            return Ok(());
        }
        if lens.len() > self.batch {
            return Err(Error::shape(
                "hip RoPE batch (reserve)",
                self.batch,
                lens.len(),
            ));
        }
        let (shifts, rel) = step_shifts(cfg, self.scoring, self.max_position, lens);
        self.shifts.write_async(&gpu.stream, &shifts)?;
        self.rel.write_async(&gpu.stream, &rel)
    }

    /// Upload a prefill chunk's per-block query shifts and key factors
    /// (`prefill_shifts`: `n` queries at `q_start..`, blocks of
    /// `cfg.block_size_q`); `run_stages` then scores its blocks with
    /// `Seqs { batch: blocks, first: 0, count: blocks }`.
    pub(crate) fn upload_prefill(
        &self,
        gpu: &GpuContext,
        cfg: &HipConfig,
        q_start: usize,
        n: usize,
    ) -> Result<()> {
        if !self.scores_rotated() {
            return Ok(());
        }
        let nb = n.div_ceil(cfg.block_size_q);
        if nb > self.batch {
            return Err(Error::shape(
                "hip RoPE prefill blocks (reserve)",
                self.batch,
                nb,
            ));
        }
        let (shifts, rel) = prefill_shifts(cfg, self.scoring, self.max_position, q_start, n);
        self.shifts.write_async(&gpu.stream, &shifts)?;
        self.rel.write_async(&gpu.stream, &rel)
    }

    /// Streaming prefill, pass 1 (`hip_pf_stream_gather_*`): KV head
    /// `head`'s selection rows (`sel`, rows `[block][kv head]`, ascending)
    /// of `blocks` query blocks written at compact slots `block * p +
    /// rank`, keys rotated to their rank, values copied (at most `p` per
    /// row). K/V: page-table row `table_row` of `kv`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn pf_gather(
        &self,
        gpu: &GpuContext,
        kv: &DeviceKv,
        table_row: usize,
        sel: &super::dispatch::DeviceSelection,
        head: usize,
        blocks: usize,
        p: usize,
        k2: u64,
        v2: u64,
    ) -> Result<()> {
        let tag = self.check_kv(kv)?;
        let d = kv.head_dim;
        let f = gpu.func("hip_rope", &format!("hip_pf_stream_gather_{tag}_d{d}"))?;
        let kst = kv.strides();
        let inter = self.inter();
        let (ts, tr, ps, hk, hd, cap, pi) = (
            kv.table_stride as i32,
            table_row as i32,
            kv.page_size as i32,
            kv.n_kv_heads as i32,
            head as i32,
            sel.cap as i32,
            p as i32,
        );
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(&kv.k.ptr)
            .arg(&kv.v.ptr)
            .arg(&kv.table.ptr)
            .arg(&ts)
            .arg(&tr)
            .arg(&ps)
            .arg(&hk)
            .arg(&hd)
            .arg(&kst.page)
            .arg(&kst.head)
            .arg(&sel.ranges.ptr)
            .arg(&sel.cum.ptr)
            .arg(&sel.cnt.ptr)
            .arg(&sel.tot.ptr)
            .arg(&cap)
            .arg(&self.inv_freq.ptr)
            .arg(&pi)
            .arg(&k2)
            .arg(&v2)
            .arg(&inter);
        if head >= kv.n_kv_heads {
            return Err(Error::OutOfRange(format!(
                "hip RoPE prefill gather: KV head {head} of {}",
                kv.n_kv_heads
            )));
        }
        let grid_x = (p * d / 2).div_ceil(THREADS).max(1);
        // SAFETY: arguments in the order and C types of hip_pf_stream_gather_* (kernels/hip_rope.cu);
        // k2/v2 hold blocks * p * d elements of the cache dtype (HipGpuPrefill's stream buffers), the
        // selection blocks * n_kv_heads rows of `cap` ranges, head < n_kv_heads; table_row is a row
        // of kv's page table.
        unsafe {
            l.launch(LaunchConfig {
                grid_dim: (grid_x as u32, blocks as u32, 1),
                block_dim: (THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map(|_| ())
        .map_err(|e| gpu_err("launch hip_pf_stream_gather", e))
    }

    /// Streaming prefill, pass 2 (`hip_pf_stream_q`): the chunk's queries
    /// `q` (`[n][n_q][d]` f32 at `q_start..`) rotated per (query, KV head)
    /// to streaming position n_j - 1 into `qout` (`[hkv][n][g][d]` f32),
    /// with `qpos2` / `qseq2` (`[hkv][n]` i32: n_j - 1 and the query's
    /// block, its page of the compact buffer).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn pf_queries(
        &self,
        gpu: &GpuContext,
        q: u64,
        n: usize,
        q_start: usize,
        q_block: usize,
        hkv: usize,
        g: usize,
        sel: &super::dispatch::DeviceSelection,
        qout: u64,
        qpos2: u64,
        qseq2: u64,
    ) -> Result<()> {
        let f = gpu.func("hip_rope", "hip_pf_stream_q")?;
        let d = self.head_dim;
        let inter = self.inter();
        let (ni, qs, qb, hk, gi, di, cap) = (
            n as i32,
            q_start as i32,
            q_block as i32,
            hkv as i32,
            g as i32,
            d as i32,
            sel.cap as i32,
        );
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(&q)
            .arg(&ni)
            .arg(&qs)
            .arg(&qb)
            .arg(&hk)
            .arg(&gi)
            .arg(&di)
            .arg(&sel.ranges.ptr)
            .arg(&sel.cnt.ptr)
            .arg(&cap)
            .arg(&self.inv_freq.ptr)
            .arg(&qout)
            .arg(&qpos2)
            .arg(&qseq2)
            .arg(&inter);
        // SAFETY: arguments in the order and C types of hip_pf_stream_q (kernels/hip_rope.cu); q holds
        // n * hkv * g * d f32, qout the same, qpos2/qseq2 hkv * n i32; the selection has a row per
        // (block of q_block queries, kv head).
        unsafe {
            l.launch(LaunchConfig {
                grid_dim: ((n * hkv * g) as u32, 1, 1),
                block_dim: ((d / 2).min(THREADS) as u32, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map(|_| ())
        .map_err(|e| gpu_err("launch hip_pf_stream_q", e))
    }

    /// Stages `from..to` with rotated scoring (`dispatch::run_stages_to`
    /// with `hip_rope_q` + `hip_score_rope_*` in place of `hip_score*`) of
    /// the sequences `seqs` of the last `upload_step`; `x` holds their rows
    /// (`x.q`, `x.row_seq`, ... start at sequence `seqs.first`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run_stages(
        &self,
        gpu: &GpuContext,
        kv: &DeviceKv,
        cfg: &HipConfig,
        stages: &[StageBuf],
        from: usize,
        to: usize,
        x: &super::dispatch::StageInputs,
        seqs: Seqs,
    ) -> Result<()> {
        let tag = self.check_kv(kv)?;
        let n_q = self.n_q_heads;
        if seqs.first + seqs.count > seqs.batch || seqs.batch > self.batch {
            return Err(Error::OutOfRange(format!(
                "hip RoPE stages: sequences {}..{} of {} (reserved {})",
                seqs.first,
                seqs.first + seqs.count,
                seqs.batch,
                self.batch
            )));
        }
        let d = kv.head_dim;
        let rotq = gpu.func("hip_rope", "hip_rope_q")?;
        let smem = x.nq_max * d * 4;
        let score = gpu.func_smem("hip_rope", &format!("hip_score_rope_{tag}_d{d}"), smem)?;
        let topk = gpu.func(x.module, "hip_topk")?;
        let mode: i32 = match self.scoring {
            RopeMode::ChunkIndexed => 1,
            RopeMode::Relative => 2,
            _ => 0,
        };
        let kst = kv.strides();
        let inter = self.inter();
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
            // The scoring queries of this stage, moved.
            let (nqh, di) = (n_q as i32, d as i32);
            let sh = self.shifts.ptr + (seqs.shift_index(s) * 8) as u64;
            let rel = self.rel.ptr + (seqs.first * 8) as u64;
            let mut l = gpu.stream.launch_builder(&rotq);
            l.arg(&x.q)
                .arg(&self.qrot.ptr)
                .arg(&nqh)
                .arg(&di)
                .arg(&sh)
                .arg(&self.inv_freq.ptr)
                .arg(&inter);
            // SAFETY: arguments in the order and C types of kernels/hip_rope.cu hip_rope_q; q holds
            // seqs.count * n_q * d f32 from x.q, qrot batch * n_q * d (reserve), sh points at the
            // stage's shifts of sequence seqs.first (n_stages * batch f64), inv_freq d / 2 f32.
            unsafe {
                l.launch(LaunchConfig {
                    grid_dim: ((seqs.count * n_q) as u32, 1, 1),
                    block_dim: ((d / 2).min(THREADS) as u32, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(|e| gpu_err("launch hip_rope_q", e))?;
            let n_sub = cap_in * e;
            let (ts, ps, hk, nqm, ci, ei, c) = (
                kv.table_stride as i32,
                kv.page_size as i32,
                kv.n_kv_heads as i32,
                x.nq_max as i32,
                cap_in as i32,
                e as i32,
                st.chunk_size as i32,
            );
            let mut l = gpu.stream.launch_builder(&score);
            l.arg(&kv.k.ptr)
                .arg(&kv.table.ptr)
                .arg(&ts)
                .arg(&ps)
                .arg(&hk)
                .arg(&kst.page)
                .arg(&kst.head)
                .arg(&x.row_seq)
                .arg(&self.qrot.ptr)
                .arg(&x.nq)
                .arg(&nqm)
                .arg(&in_ptr)
                .arg(&in_cnt)
                .arg(&ci)
                .arg(&ei)
                .arg(&c)
                .arg(&x.keys)
                .arg(&mode)
                .arg(&self.inv_freq.ptr)
                .arg(&rel)
                .arg(&inter);
            // SAFETY: arguments in the order and C types of hip_score_rope_* (kernels/hip_rope.cu);
            // the pointers are the decoder's stage buffers (sized by HipGpuDecoder::select) and
            // the DeviceKv's allocations.
            unsafe {
                l.launch(LaunchConfig {
                    grid_dim: (n_sub.div_ceil(THREADS) as u32, x.rows as u32, 1),
                    block_dim: (THREADS as u32, 1, 1),
                    shared_mem_bytes: smem as u32,
                })
            }
            .map_err(|e| gpu_err("launch hip_score_rope", e))?;
            let sub = SubChunks {
                ranges: in_ptr,
                cnt: in_cnt,
                cap: cap_in,
                e,
                c: st.chunk_size,
                gate: 0,
                stage: s,
            };
            // The single-CTA top-k (the reference; its multi-CTA twin keeps the same set).
            launch_topk(
                gpu,
                &topk,
                x.keys,
                x.rows,
                &sub,
                st.keep_tokens / st.chunk_size,
                &stages[s],
                None,
            )?;
        }
        Ok(())
    }

    /// Streaming attention's compact buffer of this step: every row's
    /// selected tokens (the sparse attention's table + tail), keys
    /// re-rotated, values copied, at most `p` per row. Returns what the
    /// hip sparse attention reads instead of the cache. `seq_row`: device
    /// i32 per sequence, its row of `kv.table` (0: sequence b is row b).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gather(
        &self,
        gpu: &GpuContext,
        out: &mut CompactKv,
        kv: &DeviceKv,
        rows: usize,
        tab: u64,
        tab_stride: usize,
        ntab: u64,
        extra: u64,
        p: usize,
        seq_row: u64,
    ) -> Result<StreamSrc> {
        let tag = self.check_kv(kv)?;
        if rows > self.batch * kv.n_kv_heads {
            return Err(Error::shape(
                "hip RoPE gather rows (reserve)",
                self.batch * kv.n_kv_heads,
                rows,
            ));
        }
        let d = kv.head_dim;
        let p = out.ensure(rows, p, d)?;
        let f = gpu.func("hip_rope", &format!("hip_stream_gather_{tag}_d{d}"))?;
        let kst = kv.strides();
        let inter = self.inter();
        let (ts, ps, hk, tst, pi) = (
            kv.table_stride as i32,
            kv.page_size as i32,
            kv.n_kv_heads as i32,
            tab_stride as i32,
            p as i32,
        );
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(&kv.k.ptr)
            .arg(&kv.v.ptr)
            .arg(&kv.table.ptr)
            .arg(&ts)
            .arg(&ps)
            .arg(&hk)
            .arg(&kst.page)
            .arg(&kst.head)
            .arg(&tab)
            .arg(&tst)
            .arg(&ntab)
            .arg(&extra)
            .arg(&self.inv_freq.ptr)
            .arg(&pi)
            .arg(&out.k2.ptr)
            .arg(&out.v2.ptr)
            .arg(&out.ntab2.ptr)
            .arg(&seq_row)
            .arg(&inter);
        let blocks = (p * d / 2).div_ceil(THREADS);
        // SAFETY: arguments in the order and C types of hip_stream_gather_* (kernels/hip_rope.cu);
        // k2/v2 hold rows * p * d elements, ntab2 rows ints; tab/ntab/extra are the caller's
        // selection buffers for `rows` rows; seq_row is 0 or rows / n_kv_heads i32.
        unsafe {
            l.launch(LaunchConfig {
                grid_dim: (blocks as u32, rows as u32, 1),
                block_dim: (THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(|e| gpu_err("launch hip_stream_gather", e))?;
        let hkv = kv.n_kv_heads;
        Ok(StreamSrc {
            k: out.k2.ptr,
            v: out.v2.ptr,
            table: self.table2.ptr,
            page_size: p,
            page_stride: (hkv * p * d) as i64,
            head_stride: (p * d) as i64,
            tab: out.tab2.ptr,
            ntab: out.ntab2.ptr,
            extra: self.extra2.ptr,
        })
    }
}

/// Where the streaming attention reads (the compact buffer as a paged KV
/// of one page per sequence, and its selection: identity tables, no tail).
pub(crate) struct StreamSrc {
    pub k: u64,
    pub v: u64,
    pub table: u64,
    pub page_size: usize,
    pub page_stride: i64,
    pub head_stride: i64,
    pub tab: u64,
    pub ntab: u64,
    pub extra: u64,
}

impl StreamSrc {
    /// The unchanged hip sparse v2 attention over the compact buffer: the
    /// queries `q` (`[batch][n_q][d]` f32, as stored) of `batch` sequences,
    /// at most `mt` tokens per row, into `out`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attend(
        &self,
        gpu: &GpuContext,
        ws: &mut DenseDecodeWs,
        shape: &AttnShape,
        dtype: DType,
        q: u64,
        batch: usize,
        mt: usize,
        out: AttnOut,
    ) -> Result<()> {
        launch_v2(
            gpu,
            ws,
            shape,
            KvPtrs {
                k: self.k,
                v: self.v,
                table: self.table,
                table_stride: 1,
                page_size: self.page_size,
                dtype,
            },
            KvStrides {
                page: self.page_stride,
                head: self.head_stride,
            },
            q,
            batch,
            V2Src::Sparse {
                tab: self.tab,
                tab_stride: self.page_size,
                ntab: self.ntab,
                extra: self.extra,
                early: false,
            },
            0,
            mt.max(1),
            None,
            None,
            out,
        )
    }
}

/// The compact slots of one row as `hip_stream_gather_*` writes them (its
/// host twin, for tests): `tab` holds the row's sink + chunk positions
/// (ascending), then the tail `slid` .. `win` (HipGpuDecoder's regions);
/// slot i holds (position, key rotation).
pub fn compact_plan(tab: &[i32], slid: (i32, i32), win: (i32, i32)) -> Vec<(usize, f64)> {
    let nt = tab.len();
    let tail0 = if slid.1 > slid.0 { slid.0 } else { win.0 };
    let n = nt + (win.1 - tail0).max(0) as usize;
    let q_pos = (win.1 - 1) as usize;
    (0..n)
        .map(|i| {
            let p = if i < nt {
                tab[i] as usize
            } else {
                tail0 as usize + (i - nt)
            };
            (p, crate::rope::streaming_key_shift(q_pos, n, p, i))
        })
        .collect()
}

/// Sink, middle and window of a prefill query block whose queries sit at
/// `p_first..=p_last` (`HipPolicy`'s prefill regions; `HipGpuPrefill::prepare`
/// uploads the same).
pub fn prefill_regions(
    cfg: &HipConfig,
    p_first: usize,
    p_last: usize,
) -> (
    std::ops::Range<usize>,
    std::ops::Range<usize>,
    std::ops::Range<usize>,
) {
    let end = p_last + 1;
    let sink_end = cfg.sink.min(end);
    let win_start = (p_first + 1).saturating_sub(cfg.window).max(sink_end);
    (0..sink_end, sink_end..win_start, win_start..end)
}

/// A prefill chunk's rotated-scoring inputs, as `HipPolicy::select_prefill`
/// scores each query block (`n` queries at `q_start..`, blocks of
/// `cfg.block_size_q`): per stage and block (`[n_stages][blocks]`) the
/// query shift `rope::score_query_shift` at the block's last query and its
/// middle's end, per block the relative key factor at the block's last
/// query; NaN where the queries / keys score as stored.
pub fn prefill_shifts(
    cfg: &HipConfig,
    mode: RopeMode,
    max_position: usize,
    q_start: usize,
    n: usize,
) -> (Vec<f64>, Vec<f64>) {
    let qb = cfg.block_size_q;
    let nb = n.div_ceil(qb);
    let blocks: Vec<(usize, usize)> = (0..nb)
        .map(|b| {
            let (p_first, p_last) = (q_start + b * qb, q_start + ((b + 1) * qb).min(n) - 1);
            let (_, mid, _) = prefill_regions(cfg, p_first, p_last);
            (p_last, mid.end)
        })
        .collect();
    let mut shifts = Vec::with_capacity(cfg.stages.len() * nb);
    for st in &cfg.stages {
        for &(p_last, mid_end) in &blocks {
            shifts.push(
                crate::rope::score_query_shift(mode, p_last, mid_end, st.chunk_size, max_position)
                    .unwrap_or(f64::NAN),
            );
        }
    }
    let rel = blocks
        .iter()
        .map(|&(p_last, _)| match mode {
            RopeMode::Relative => {
                crate::rope::relative_key_factor(p_last, max_position).unwrap_or(f64::NAN)
            }
            _ => f64::NAN,
        })
        .collect();
    (shifts, rel)
}

/// Host twin of the streaming prefill's two passes for one selection row
/// (`ranges`: ascending, disjoint, as `hip_assemble` writes them) and a
/// query at `pos`: the compact slots (position, key rotation
/// `rank - position`) as `hip_pf_stream_gather_*` writes them, and the
/// query's rotation and clip as `hip_pf_stream_q` computes them: the query
/// sees slots `0..n_vis` and moves by `(n_vis - 1) - pos`. Returns (slots,
/// n_vis, query shift).
pub fn pf_stream_plan(
    ranges: &[std::ops::Range<usize>],
    pos: usize,
) -> (Vec<(usize, f64)>, usize, f64) {
    let slots: Vec<(usize, f64)> = ranges
        .iter()
        .flat_map(|r| r.clone())
        .enumerate()
        .map(|(rank, p)| (p, rank as f64 - p as f64))
        .collect();
    let n_vis: usize = ranges
        .iter()
        .map(|r| r.end.min(pos + 1).saturating_sub(r.start))
        .sum();
    (slots, n_vis, (n_vis as f64 - 1.0) - pos as f64)
}

/// Per stage and sequence the scoring query shift (`[n_stages][batch]`) and
/// per sequence the relative key factor, NaN where the query / keys score
/// as stored: `rope::score_query_shift` / `relative_key_factor` at each
/// sequence's decode position and middle, as `HipPolicy` computes them.
pub fn step_shifts(
    cfg: &HipConfig,
    mode: RopeMode,
    max_position: usize,
    lens: &[usize],
) -> (Vec<f64>, Vec<f64>) {
    let mut shifts = Vec::with_capacity(cfg.stages.len() * lens.len());
    for st in &cfg.stages {
        for &len in lens {
            let q_pos = len - 1;
            let (_, mid, _) = regions(cfg, q_pos);
            shifts.push(
                crate::rope::score_query_shift(mode, q_pos, mid.end, st.chunk_size, max_position)
                    .unwrap_or(f64::NAN),
            );
        }
    }
    let rel = lens
        .iter()
        .map(|&len| match mode {
            RopeMode::Relative => {
                crate::rope::relative_key_factor(len - 1, max_position).unwrap_or(f64::NAN)
            }
            _ => f64::NAN,
        })
        .collect();
    (shifts, rel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HipStage, RopeConfig};

    fn cfg(scoring: RopeMode) -> HipConfig {
        HipConfig {
            sink: 32,
            window: 256,
            stages: vec![
                HipStage {
                    chunk_size: 64,
                    keep_tokens: 1024,
                    refresh_interval: 16,
                },
                HipStage {
                    chunk_size: 8,
                    keep_tokens: 256,
                    refresh_interval: 4,
                },
            ],
            rope: RopeConfig {
                scoring,
                attention: RopeMode::Streaming,
            },
            ..HipConfig::default()
        }
    }

    /// The fast mask estimator with rotated scoring is refused, as the CPU
    /// policy refuses it (not silently replaced by the reference search);
    /// with original scoring (streaming attention only) it is allowed.
    #[test]
    fn fast_estimator_with_rotated_scoring_is_refused_as_the_cpu_policy() {
        use crate::config::{MaskEstimatorChoice, ModelShape};
        for scoring in [RopeMode::ChunkIndexed, RopeMode::Relative] {
            let mut c = cfg(scoring);
            c.mask_estimator = MaskEstimatorChoice::Fast;
            let e = modes(&c).unwrap_err().to_string();
            assert!(e.contains("mask_estimator") && e.contains("fast"), "{e}");
            assert!(crate::policy::hip::HipPolicy::new(c.clone(), &ModelShape::default()).is_err());
            c.mask_estimator = MaskEstimatorChoice::Reference;
            assert!(modes(&c).unwrap().is_some());
        }
        let mut c = cfg(RopeMode::Original);
        c.mask_estimator = MaskEstimatorChoice::Fast;
        assert_eq!(modes(&c).unwrap(), Some((RopeMode::Original, true)));
        assert!(crate::policy::hip::HipPolicy::new(c, &ModelShape::default()).is_ok());
    }

    #[test]
    fn step_shifts_follow_the_policy_per_stage_and_sequence() {
        let lens = [20000usize, 5000, 8193];
        // chunk_indexed: query to ceil(middle_end / c) per stage; the
        // middle ends where the window starts (len - window).
        let c = cfg(RopeMode::ChunkIndexed);
        let (s, rel) = step_shifts(&c, RopeMode::ChunkIndexed, 8192, &lens);
        assert_eq!(s.len(), 2 * 3);
        for (i, st) in c.stages.iter().enumerate() {
            for (b, &len) in lens.iter().enumerate() {
                let mid_end = len - 256;
                let want = mid_end.div_ceil(st.chunk_size) as f64 - (len - 1) as f64;
                assert_eq!(s[i * 3 + b], want, "stage {i} seq {b}");
            }
        }
        assert!(rel.iter().all(|x| x.is_nan()));
        // relative: only the sequences at or beyond the trained length.
        let (s, rel) = step_shifts(&cfg(RopeMode::Relative), RopeMode::Relative, 8192, &lens);
        for i in 0..2 {
            assert_eq!(s[i * 3], 8191.0 - 19999.0);
            assert!(s[i * 3 + 1].is_nan());
            assert_eq!(s[i * 3 + 2], -1.0);
        }
        assert_eq!(rel[0], 8192.0 / 19999.0 - 1.0);
        assert!(rel[1].is_nan());
        assert_eq!(rel[2], 0.0);
        // original scoring: nothing moves.
        let (s, rel) = step_shifts(&cfg(RopeMode::Original), RopeMode::Original, 8192, &lens);
        assert!(s.iter().chain(&rel).all(|x| x.is_nan()));
    }

    #[test]
    fn one_request_slice_of_the_batch_shifts_is_its_own() {
        // GpuAttention uploads the batch's shifts once and scores request
        // i alone (Seqs { first: i, count: 1 }): its slice must be what
        // the request's own shifts are.
        let lens = [20000usize, 5000, 8193, 300];
        for mode in [RopeMode::ChunkIndexed, RopeMode::Relative] {
            let c = cfg(mode);
            let (all, rel) = step_shifts(&c, mode, 8192, &lens);
            for (i, &len) in lens.iter().enumerate() {
                let (own, own_rel) = step_shifts(&c, mode, 8192, &[len]);
                let one = Seqs {
                    batch: lens.len(),
                    first: i,
                    count: 1,
                };
                for s in 0..c.stages.len() {
                    let (a, b) = (all[one.shift_index(s)], own[s]);
                    assert!(
                        a == b || (a.is_nan() && b.is_nan()),
                        "{mode:?} seq {i} stage {s}"
                    );
                }
                let (a, b) = (rel[i], own_rel[0]);
                assert!(a == b || (a.is_nan() && b.is_nan()), "{mode:?} seq {i}");
            }
        }
    }

    #[test]
    fn compact_plan_attends_as_the_cpu_streaming_kernel() {
        // A decode selection in the GPU's form (sink + chunks in the table,
        // slid + window as the tail), compacted as the gather does, then
        // plain attention with the query as stored: equals the CPU kernel's
        // streaming attention over the same ranges.
        use crate::attention::{decode_with, AttnShape};
        use crate::kv::SeqView;
        use crate::policy::Selection;
        use crate::rng::Rng;
        let (d, len) = (64usize, 3000usize);
        let shape = AttnShape::new(4, 1, d).unwrap();
        let rope = Rope::new(d, 10000.0);
        let mut rng = Rng::new(9);
        let k = rng.normal_vec(len * d, 1.0);
        let v = rng.normal_vec(len * d, 1.0);
        let view = SeqView::from_contiguous(1, d, len, &k, &v);
        let q = rng.normal_vec(shape.q_elems(), 1.0);
        let (sink, chunks, slid, win) = (
            0..16,
            [400..408, 1000..1064, 2001..2009],
            2600..2744,
            2744..3000,
        );
        let mut tab: Vec<i32> = sink.clone().map(|t| t as i32).collect();
        for c in &chunks {
            tab.extend(c.clone().map(|t| t as i32));
        }
        let plan = compact_plan(
            &tab,
            (slid.start as i32, slid.end as i32),
            (win.start as i32, win.end as i32),
        );
        let mut ranges = vec![sink];
        ranges.extend(chunks.iter().cloned());
        ranges.push(slid.start..win.end);
        let sel = Selection {
            heads: vec![ranges],
        };
        assert_eq!(plan.len(), sel.token_count(0));
        let mut cpu = vec![0f32; shape.q_elems()];
        decode_with(
            &shape,
            &q,
            std::slice::from_ref(&view),
            Some(std::slice::from_ref(&sel)),
            Some(&rope),
            &mut cpu,
        )
        .unwrap();
        // f64 attention of every q head over the compact rotated keys.
        let attend = |plan: &[(usize, f64)]| -> f64 {
            let mut kr = vec![0f32; d];
            let (mut num, mut den) = (0f64, 0f64);
            for j in 0..4 {
                let qj = &q[j * d..(j + 1) * d];
                let scores: Vec<f64> = plan
                    .iter()
                    .map(|&(p, sh)| {
                        kr.copy_from_slice(&k[p * d..(p + 1) * d]);
                        rope.rotate(&mut kr, sh);
                        let s: f64 = qj.iter().zip(&kr).map(|(&a, &b)| a as f64 * b as f64).sum();
                        s * shape.scale as f64
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let mut o = vec![0f64; d];
                let mut l = 0f64;
                for (&(p, _), &s) in plan.iter().zip(&scores) {
                    let w = (s - m).exp();
                    l += w;
                    for i in 0..d {
                        o[i] += w * v[p * d + i] as f64;
                    }
                }
                for i in 0..d {
                    let r = o[i] / l;
                    num += (cpu[j * d + i] as f64 - r).powi(2);
                    den += r * r;
                }
            }
            (num / den).sqrt()
        };
        let err = attend(&plan);
        assert!(err < 1e-5, "{err:e}");
        // One slot left out (ranks shift behind it) must miss the bound.
        let mut dropped = plan.clone();
        dropped.remove(20);
        let n = dropped.len();
        for (i, x) in dropped.iter_mut().enumerate() {
            x.1 = crate::rope::streaming_key_shift(len - 1, n, x.0, i);
        }
        let derr = attend(&dropped);
        assert!(derr > 1e-4, "{derr:e}");
    }

    #[test]
    fn prefill_shifts_follow_the_policy_per_stage_and_block() {
        // 200 queries at 9000.. in blocks of 64: blocks 9000..9063,
        // ..9127, ..9191, 9192..9199 (a short last block).
        let (q_start, n) = (9000usize, 200usize);
        for mode in [RopeMode::ChunkIndexed, RopeMode::Relative] {
            let c = cfg(mode);
            let (s, rel) = prefill_shifts(&c, mode, 9100, q_start, n);
            assert_eq!((s.len(), rel.len()), (2 * 4, 4));
            for (i, st) in c.stages.iter().enumerate() {
                for b in 0..4 {
                    let p_first = q_start + b * 64;
                    let p_last = (p_first + 63).min(q_start + n - 1);
                    // The middle ends where the window starts: window
                    // tokens before the block's first query + 1.
                    let mid_end = p_first + 1 - 256;
                    let want = match mode {
                        RopeMode::ChunkIndexed => {
                            Some(mid_end.div_ceil(st.chunk_size) as f64 - p_last as f64)
                        }
                        _ => (p_last >= 9100).then(|| 9099.0 - p_last as f64),
                    };
                    let got = s[i * 4 + b];
                    match want {
                        Some(w) => assert_eq!(got, w, "{mode:?} stage {i} block {b}"),
                        None => assert!(got.is_nan(), "{mode:?} stage {i} block {b}"),
                    }
                }
            }
            for (b, &r) in rel.iter().enumerate() {
                let p_last = (q_start + b * 64 + 63).min(q_start + n - 1);
                if mode == RopeMode::Relative && p_last >= 9100 {
                    assert_eq!(r, 9100.0 / p_last as f64 - 1.0);
                } else {
                    assert!(r.is_nan(), "{mode:?} block {b}");
                }
            }
        }
        // Regions as the CPU policy's (window from the block's first query).
        let c = cfg(RopeMode::ChunkIndexed);
        assert_eq!(prefill_regions(&c, 40, 47), (0..32, 32..32, 32..48));
        assert_eq!(prefill_regions(&c, 1000, 1063), (0..32, 32..745, 745..1064));
    }

    #[test]
    fn prefill_regions_are_the_cpu_policys() {
        // HipGpuPrefill::prepare uploads these regions; HipPolicy's prefill
        // cuts its blocks with policy::hip::regions: the same, over random
        // sinks, windows and blocks (short ones, at the start, past both).
        let mut rng = crate::rng::Rng::new(5);
        for _ in 0..5000 {
            let c = HipConfig {
                sink: rng.below(300),
                window: 1 + rng.below(3000),
                ..HipConfig::default()
            };
            let p_first = rng.below(20000);
            let p_last = p_first + rng.below(130);
            assert_eq!(
                prefill_regions(&c, p_first, p_last),
                crate::policy::hip::regions(&c, p_first, p_last),
                "sink {} window {} block {p_first}..={p_last}",
                c.sink,
                c.window
            );
        }
    }

    #[test]
    fn pf_stream_plan_attends_as_the_cpu_streaming_prefill() {
        // One query block's selection row (sink, chunks, window), every
        // query of the block through the two passes' host twin (keys to
        // their rank, query to n_vis - 1, slots 0..n_vis), in f64: equals
        // the CPU kernel's streaming prefill (attention/cpu.rs
        // prefill_with) over the same selection, within f32 rounding.
        use crate::attention::{prefill_with, AttnShape};
        use crate::kv::SeqView;
        use crate::policy::Selection;
        use crate::rng::Rng;
        let (d, len, qb) = (32usize, 2000usize, 16usize);
        let shape = AttnShape::new(4, 2, d).unwrap();
        let rope = Rope::new(d, 10000.0);
        let mut rng = Rng::new(21);
        let k = rng.normal_vec(len * 2 * d, 1.0);
        let v = rng.normal_vec(len * 2 * d, 1.0);
        let view = SeqView::from_contiguous(2, d, len, &k, &v);
        let q_start = len - qb;
        let q = rng.normal_vec(qb * shape.q_elems(), 1.0);
        // Per KV head its own chunks (different counts), the window
        // reaching the block's last query.
        let rows = [
            vec![0..8, 300..316, 900..904, 1700..2000],
            vec![0..8, 500..508, 1200..1232, 1700..2000],
        ];
        let sel = Selection {
            heads: rows.to_vec(),
        };
        let mut cpu = vec![0f32; q.len()];
        prefill_with(
            &shape,
            &q,
            q_start,
            &view,
            Some((std::slice::from_ref(&sel), qb)),
            Some(&rope),
            &mut cpu,
        )
        .unwrap();
        let attend = |hq: usize, j: usize, drop: Option<usize>| -> Vec<f64> {
            let h = hq / 2;
            let pos = q_start + j;
            let mut rs = rows[h].clone();
            if let Some(t) = drop {
                // A wrong selection: token t left out (ranks behind it move).
                rs = rs
                    .into_iter()
                    .flat_map(|r| {
                        if r.contains(&t) {
                            vec![r.start..t, t + 1..r.end]
                        } else {
                            vec![r]
                        }
                    })
                    .filter(|r| !r.is_empty())
                    .collect();
            }
            let (slots, n_vis, qshift) = pf_stream_plan(&rs, pos);
            let mut qh = q[(j * 4 + hq) * d..(j * 4 + hq + 1) * d].to_vec();
            rope.rotate(&mut qh, qshift);
            let mut kr = vec![0f32; d];
            let scores: Vec<f64> = slots[..n_vis]
                .iter()
                .map(|&(p, sh)| {
                    kr.copy_from_slice(&k[(h * len + p) * d..(h * len + p + 1) * d]);
                    rope.rotate(&mut kr, sh);
                    let s: f64 = qh.iter().zip(&kr).map(|(&a, &b)| a as f64 * b as f64).sum();
                    s * shape.scale as f64
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let (mut o, mut l) = (vec![0f64; d], 0f64);
            for (&(p, _), &s) in slots[..n_vis].iter().zip(&scores) {
                let w = (s - m).exp();
                l += w;
                for i in 0..d {
                    o[i] += w * v[(h * len + p) * d + i] as f64;
                }
            }
            o.iter().map(|x| x / l).collect()
        };
        let err = |drop: Option<usize>| -> f64 {
            let (mut num, mut den) = (0f64, 0f64);
            for j in 0..qb {
                for hq in 0..4 {
                    let r = attend(hq, j, drop);
                    for i in 0..d {
                        let c = cpu[(j * 4 + hq) * d + i] as f64;
                        num += (c - r[i]).powi(2);
                        den += r[i] * r[i];
                    }
                }
            }
            (num / den).sqrt()
        };
        let e = err(None);
        assert!(e < 1e-4, "{e:e}");
        // The clip: a query early in the block sees fewer window tokens.
        let (_, n0, _) = pf_stream_plan(&rows[0], q_start);
        let (_, n1, _) = pf_stream_plan(&rows[0], q_start + qb - 1);
        assert_eq!(n1 - n0, qb - 1);
        assert_eq!(n1, 8 + 16 + 4 + 300);
        // One selected token dropped must miss the bound.
        let de = err(Some(310));
        assert!(de > 1e-3, "{de:e}");
    }

    #[test]
    fn validation_splits_decoder_and_engine_paths() {
        use super::super::dispatch::HipGpuDecoder;
        let c = cfg(RopeMode::ChunkIndexed);
        assert!(HipGpuDecoder::validate_decoder(&c).is_ok());
        let e = HipGpuDecoder::validate(&c).unwrap_err().to_string();
        assert!(e.contains("hip.rope") && e.contains("HipGpuPrefill"), "{e}");
        let mut o = c.clone();
        o.rope = RopeConfig::default();
        assert!(HipGpuDecoder::validate(&o).is_ok());
    }
}
