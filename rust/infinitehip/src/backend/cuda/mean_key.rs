//! Stage 0 of a GPU decode refresh by cached chunk means
//! (`hip.decode_stage0 = "mean_key"`, `HipGpuDecoder` only): the cache and
//! the launch of `hip_score_mean_*` (kernels/hip_mask.cu). CPU twin:
//! `policy::hip::HipPolicy::stage0_mean_key`.
//!
//! A chunk's stored keys never change, so its mean key is computed by the
//! first refresh that scores it and read back by every later one. Cache
//! validity is a generation number: each slot's tag must equal the
//! decoder's current generation, which `bump` moves on whenever the
//! decoder's rows start new sequences (`HipGpuDecoder::reset` /
//! `reset_device`). The generation lives on the device, so a captured step
//! replays correctly after a bump.

use super::dispatch::{ScoreLaunch, SCORE_THREADS};
use super::{gpu_err, DevBuf, GpuContext};
use crate::error::Result;
use cudarc::driver::LaunchConfig;

/// Device pointers of a `MeanKeyCache` for one launch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MeanPtrs {
    pub means: u64,
    pub tags: u64,
    pub gen: u64,
    pub mcap: usize,
}

/// Mean keys `[rows][mcap][d]` bf16, tags `[rows][mcap]` i32 and the
/// generation (one i32 on the device).
pub(crate) struct MeanKeyCache {
    means: DevBuf,
    tags: DevBuf,
    gen: DevBuf,
    gen_host: i32,
    rows: usize,
    mcap: usize,
    d: usize,
    /// `bump` was asked for without a stream (`HipGpuDecoder::reset`).
    pub bump_pending: bool,
}

impl MeanKeyCache {
    pub fn new() -> Result<Self> {
        Ok(MeanKeyCache {
            means: DevBuf::alloc(16)?,
            tags: DevBuf::alloc(16)?,
            gen: DevBuf::from_slice(&[1i32])?,
            gen_host: 1,
            rows: 0,
            mcap: 0,
            d: 0,
            bump_pending: false,
        })
    }

    /// Room for `rows` rows of `chunks` chunks of head dim `d`. Growing
    /// drops every cached mean (fresh tags are 0, never a generation).
    /// Allocates (synchronous): not inside a graph capture.
    pub fn ensure(&mut self, rows: usize, chunks: usize, d: usize) -> Result<()> {
        if rows == self.rows && d == self.d && chunks <= self.mcap {
            return Ok(());
        }
        let mcap = chunks.max(self.mcap).max(1);
        self.means = DevBuf::alloc(rows * mcap * d * 2)?;
        self.tags = DevBuf::alloc(rows * mcap * 4)?;
        self.tags.fill_bytes(0)?;
        (self.rows, self.mcap, self.d) = (rows, mcap, d);
        Ok(())
    }

    /// Invalidate every cached mean, ordered on `gpu`'s stream.
    pub fn bump(&mut self, gpu: &GpuContext) -> Result<()> {
        self.gen_host = self.gen_host.wrapping_add(1).max(1);
        self.bump_pending = false;
        self.gen.write_async(&gpu.stream, &[self.gen_host])
    }

    pub fn ptrs(&self) -> MeanPtrs {
        MeanPtrs {
            means: self.means.ptr,
            tags: self.tags.ptr,
            gen: self.gen.ptr,
            mcap: self.mcap,
        }
    }
}

/// Score stage-0 means with `hip_score_meanw` (the warp copies its rows
/// coalesced; the default) or `hip_score_mean` (each thread its own row;
/// `INFINITEHIP_MEAN_WARP=0`).
static MEAN_WARP: super::switch::EnvSwitch = super::switch::EnvSwitch::new("INFINITEHIP_MEAN_WARP");

/// Launch `hip_score_mean_*` (or `hip_score_meanw_*`) for stage 0
/// (`x.cap_in` must be 1): keys of every sub-chunk slot `[rows][x.e]`, as
/// `launch_score` writes them.
pub(crate) fn launch_score_mean(
    gpu: &GpuContext,
    kv: &super::dispatch::DeviceKv,
    x: &ScoreLaunch,
    m: &MeanPtrs,
) -> Result<()> {
    if x.cap_in != 1 || x.e > m.mcap {
        return Err(crate::error::Error::Invalid(format!(
            "hip_score_mean: {} ranges per row (must be 1), {} chunks for a cache of {}",
            x.cap_in, x.e, m.mcap
        )));
    }
    let d = kv.head_dim;
    let tag = super::kernels::dtype_tag(kv.dtype).unwrap();
    let q_bytes = x.nq_max.next_multiple_of(x.nq_tpl) * d * 4;
    // hip_score_meanw: then per warp 32 rows of d / 8 + 1 16-byte units.
    let (pfx, smem) = if MEAN_WARP.get() {
        (
            "hip_score_meanw",
            q_bytes + SCORE_THREADS * (d / 8 + 1) * 16,
        )
    } else {
        ("hip_score_mean", q_bytes)
    };
    let name = format!("{pfx}_{tag}_d{d}_q{}", x.nq_tpl);
    let f = gpu.func_smem(x.module, &name, smem)?;
    let (ts, ps, hk, nqm, ei, c, stage, mcap) = (
        kv.table_stride as i32,
        kv.page_size as i32,
        kv.n_kv_heads as i32,
        x.nq_max as i32,
        x.e as i32,
        x.c as i32,
        x.stage as i32,
        m.mcap as i32,
    );
    let kst = kv.strides();
    let mut l = gpu.launch_pdl(&f, Some(super::pdl::Site::Score(x.stage)));
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
        .arg(&ei)
        .arg(&c)
        .arg(&x.keys)
        .arg(&x.gate)
        .arg(&stage)
        .arg(&m.means)
        .arg(&m.tags)
        .arg(&m.gen)
        .arg(&mcap);
    // SAFETY: the arguments follow hip_score_mean's parameter list (kernels/hip_mask.cu, same
    // order and C types); keys hold rows * e u32 (the decoder sizes them), in_ranges/in_cnt one
    // range per row, means/tags rows * mcap slots (MeanKeyCache::ensure), gen one i32.
    unsafe {
        l.launch(LaunchConfig {
            grid_dim: (x.e.div_ceil(SCORE_THREADS) as u32, x.rows as u32, 1),
            block_dim: (SCORE_THREADS as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        })
    }
    .map_err(|e| gpu_err("launch hip_score_mean", e))
}
