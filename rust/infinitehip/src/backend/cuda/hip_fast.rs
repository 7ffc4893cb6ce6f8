//! Fast hip prefill mask estimation on tensor cores (kernels/hip_fast.cu).
//!
//! Stage 0 ranks the middle's chunks by one representative key each (the
//! chunk's mean key, computed once per chunk and kept across query chunks
//! of a sequence); later stages score every token of the chunks stage 0
//! kept, once, and rank sub-chunks by their best token. The f32 CUDA-core
//! estimator (`dispatch::run_stages`, bit-equal to the CPU policy) stays the
//! reference twin: `MaskEstimator::Reference`.

use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};

use super::dispatch::{launch_topk, DeviceKv, StageBuf, SubChunks};
use super::{gpu_err, kernels, DevBuf, GpuContext};
use crate::config::{HipConfig, MaskEstimatorChoice};
use crate::error::{Error, Result};

/// Which mask estimator a hip prefill runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MaskEstimator {
    /// TensorCore wherever it applies (head dims 64/128/256: always on the
    /// GPU prefill paths today).
    #[default]
    Auto,
    /// f32 probes, bit-equal to the CPU policy's selection.
    Reference,
    /// Representative keys and token scores on tensor cores.
    TensorCore,
}

impl MaskEstimator {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "ref" | "reference" => Some(Self::Reference),
            "fast" | "tc" | "tensor_core" => Some(Self::TensorCore),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Reference => "reference",
            Self::TensorCore => "tensor_core",
        }
    }
    /// `Auto` defers to the layer config's `hip.mask_estimator` (whose own
    /// `auto` means the tensor-core estimator here); explicit choices win.
    pub fn with_config(self, c: MaskEstimatorChoice) -> Self {
        match (self, c) {
            (Self::Auto, MaskEstimatorChoice::Reference) => Self::Reference,
            (Self::Auto, MaskEstimatorChoice::Fast) => Self::TensorCore,
            (e, _) => e,
        }
    }
    /// Whether this choice runs the tensor-core estimator for `head_dim`.
    pub fn fast_for(self, head_dim: usize) -> bool {
        match self {
            Self::Reference => false,
            Self::TensorCore => true,
            Self::Auto => kernels::HEAD_DIMS.contains(&head_dim),
        }
    }
}

/// Key tiles per CTA of the scoring kernels (the query tile is loaded once
/// per CTA).
const TILES_PER_CTA: usize = 4;
const TILE: usize = 64;

/// One sequence's prefill inputs for `FastEstimator::run`.
pub(crate) struct FastInputs {
    /// Rows `[block][kv head]` of this call.
    pub rows: usize,
    /// Chunk queries `[n][n_q_heads][d]` f32 on the device.
    pub q: u64,
    pub n: usize,
    /// Scoring queries per row (before padding to 16).
    pub nq_max: usize,
    pub group: usize,
    /// i32 page-table row per block (all the sequence's row).
    pub row_seq: u64,
    /// The sequence's page-table row and its cached length (representatives
    /// cover chunks up to it).
    pub seq_row: usize,
    pub len: usize,
    pub stage0_in: u64,
    pub stage0_cnt: u64,
    pub e0: usize,
    pub keys: u64,
}

/// Device state of the fast estimator: representatives of one sequence
/// (reset for a new one), the bf16 query tiles and score scratch.
pub(crate) struct FastEstimator {
    reps: DevBuf,
    rep_cap: usize,
    /// Complete chunks whose representative is final.
    reps_done: usize,
    qt: DevBuf,
    sc: DevBuf,
    tok: DevBuf,
}

fn grow(b: &mut DevBuf, bytes: usize) -> Result<()> {
    if b.bytes < bytes {
        *b = DevBuf::alloc(bytes)?;
    }
    Ok(())
}

fn smem_attr(f: &CudaFunction, bytes: usize) -> Result<()> {
    if bytes > 48 * 1024 {
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .map_err(|e| gpu_err("raise hip_fast shared memory", e))?;
    }
    Ok(())
}

impl FastEstimator {
    pub fn new() -> Self {
        FastEstimator {
            reps: DevBuf::null(),
            rep_cap: 0,
            reps_done: 0,
            qt: DevBuf::null(),
            sc: DevBuf::null(),
            tok: DevBuf::null(),
        }
    }

    /// A new sequence: every representative is recomputed.
    pub fn reset(&mut self) {
        self.reps_done = 0;
    }

    /// Representatives of chunks up to `len` tokens (the last, partial one
    /// is recomputed at every call until complete).
    fn update_reps(
        &mut self,
        gpu: &GpuContext,
        kv: &DeviceKv,
        cfg: &HipConfig,
        x: &FastInputs,
    ) -> Result<()> {
        let c = cfg.stages[0].chunk_size;
        let base = cfg.sink;
        if x.len <= base {
            return Ok(());
        }
        let need = (x.len - base).div_ceil(c);
        let hkv = kv.n_kv_heads;
        let d = kv.head_dim;
        if need > self.rep_cap {
            let cap = need.next_power_of_two().max(1024);
            self.reps = DevBuf::alloc(hkv * cap * d * 2)?;
            self.rep_cap = cap;
            self.reps_done = 0;
        }
        let a0 = self.reps_done.min(need);
        if need > a0 {
            let tag = kernels::dtype_tag(kv.dtype).unwrap();
            let f = gpu.func("hip_fast", &format!("hipf_reps_{tag}_d{d}"))?;
            let kst = kv.strides();
            let (ts, sr, ps, bs, ci, li, ai, rc) = (
                kv.table_stride as i32,
                x.seq_row as i32,
                kv.page_size as i32,
                base as i32,
                c as i32,
                x.len as i32,
                a0 as i32,
                self.rep_cap as i32,
            );
            let mut l = gpu.stream.launch_builder(&f);
            l.arg(&kv.k.ptr)
                .arg(&kv.table.ptr)
                .arg(&ts)
                .arg(&sr)
                .arg(&ps)
                .arg(&kst.page)
                .arg(&kst.head)
                .arg(&bs)
                .arg(&ci)
                .arg(&li)
                .arg(&ai)
                .arg(&rc)
                .arg(&self.reps.ptr);
            unsafe {
                l.launch(LaunchConfig {
                    grid_dim: ((need - a0) as u32, hkv as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(|e| gpu_err("launch hipf_reps", e))?;
        }
        self.reps_done = (x.len - base) / c;
        Ok(())
    }

    /// Every stage for `x.rows` rows into `stages` (then `assemble_rows`).
    pub fn run(
        &mut self,
        gpu: &GpuContext,
        kv: &DeviceKv,
        cfg: &HipConfig,
        q_block: usize,
        stages: &[StageBuf],
        x: &FastInputs,
    ) -> Result<()> {
        let hkv = kv.n_kv_heads;
        let d = kv.head_dim;
        if !kernels::HEAD_DIMS.contains(&d) {
            return Err(Error::Invalid(format!(
                "hip fast mask estimator: head_dim {d} (kernels for {:?})",
                kernels::HEAD_DIMS
            )));
        }
        let tag = kernels::dtype_tag(kv.dtype).unwrap();
        let rows = x.rows;
        let mp = x.nq_max.next_multiple_of(16);
        let mt = (mp / 16) as i32;
        // Query tiles.
        grow(&mut self.qt, rows * mp * d * 2)?;
        let gather = gpu.func("hip_fast", "hipf_gather_q")?;
        let (n, qb, qs, hk, g, di, mpi) = (
            x.n as i32,
            q_block as i32,
            cfg.q_stride as i32,
            hkv as i32,
            x.group as i32,
            d as i32,
            mp as i32,
        );
        let mut l = gpu.stream.launch_builder(&gather);
        l.arg(&x.q)
            .arg(&n)
            .arg(&qb)
            .arg(&qs)
            .arg(&hk)
            .arg(&g)
            .arg(&di)
            .arg(&mpi)
            .arg(&self.qt.ptr);
        unsafe {
            l.launch(LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(|e| gpu_err("launch hipf_gather_q", e))?;
        self.update_reps(gpu, kv, cfg, x)?;
        let smem = (mp + TILE) * d * 2;
        let topk = gpu.func("hip_mask", "hip_topk")?;
        // Stage 0: representative scores -> keys -> top-k.
        let st0 = &cfg.stages[0];
        let e0 = x.e0;
        grow(&mut self.sc, rows * e0 * 4)?;
        let score_rep = gpu.func("hip_fast", &format!("hipf_score_rep_bf16_d{d}"))?;
        smem_attr(&score_rep, smem)?;
        let (rc, bs, c0, ost) = (
            self.rep_cap as i32,
            cfg.sink as i32,
            st0.chunk_size as i32,
            e0 as i32,
        );
        let gx = e0.div_ceil(TILE).div_ceil(TILES_PER_CTA).max(1);
        let mut l = gpu.stream.launch_builder(&score_rep);
        l.arg(&self.reps.ptr)
            .arg(&x.stage0_in)
            .arg(&x.stage0_cnt)
            .arg(&rc)
            .arg(&bs)
            .arg(&c0)
            .arg(&hk)
            .arg(&self.qt.ptr)
            .arg(&mt)
            .arg(&self.sc.ptr)
            .arg(&ost);
        unsafe {
            l.launch(LaunchConfig {
                grid_dim: (gx as u32, rows as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: smem as u32,
            })
        }
        .map_err(|e| gpu_err("launch hipf_score_rep", e))?;
        let keys0 = gpu.func("hip_fast", "hipf_stage0_keys")?;
        let mut l = gpu.stream.launch_builder(&keys0);
        l.arg(&self.sc.ptr)
            .arg(&x.stage0_in)
            .arg(&x.stage0_cnt)
            .arg(&c0)
            .arg(&ost)
            .arg(&x.keys);
        unsafe {
            l.launch(LaunchConfig {
                grid_dim: (e0.div_ceil(256) as u32, rows as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(|e| gpu_err("launch hipf_stage0_keys", e))?;
        let sub0 = SubChunks {
            ranges: x.stage0_in,
            cnt: x.stage0_cnt,
            cap: 1,
            e: e0,
            c: st0.chunk_size,
            gate: 0,
            stage: 0,
        };
        launch_topk(
            gpu,
            &topk,
            x.keys,
            rows,
            &sub0,
            st0.keep_tokens / st0.chunk_size,
            &stages[0],
            None,
        )?;
        if cfg.stages.len() == 1 {
            return Ok(());
        }
        // Token scores of every token stage 0 kept.
        // Stage 0 keeps at most e0 chunks: token scores of min(cap0, e0)
        // ranges per row (a covering budget's cap0 can be huge).
        let cap0 = stages[0].cap;
        let tok_cap = cap0.min(e0);
        let per_row = tok_cap * st0.chunk_size;
        grow(&mut self.tok, rows * per_row * 4)?;
        let score_tok = gpu.func("hip_fast", &format!("hipf_score_tok_{tag}_d{d}"))?;
        smem_attr(&score_tok, smem)?;
        let kst = kv.strides();
        let (ts, ps, cp0, tc) = (
            kv.table_stride as i32,
            kv.page_size as i32,
            cap0 as i32,
            tok_cap as i32,
        );
        let gx = per_row.div_ceil(TILE).div_ceil(TILES_PER_CTA).max(1);
        let mut l = gpu.stream.launch_builder(&score_tok);
        l.arg(&kv.k.ptr)
            .arg(&kv.table.ptr)
            .arg(&ts)
            .arg(&ps)
            .arg(&hk)
            .arg(&kst.page)
            .arg(&kst.head)
            .arg(&x.row_seq)
            .arg(&stages[0].out.ptr)
            .arg(&stages[0].cnt.ptr)
            .arg(&cp0)
            .arg(&c0)
            .arg(&tc)
            .arg(&self.qt.ptr)
            .arg(&mt)
            .arg(&self.tok.ptr);
        unsafe {
            l.launch(LaunchConfig {
                grid_dim: (gx as u32, rows as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: smem as u32,
            })
        }
        .map_err(|e| gpu_err("launch hipf_score_tok", e))?;
        // Later stages: sub-chunk keys from the token scores, then top-k.
        let subkeys = gpu.func("hip_fast", "hipf_subkeys")?;
        for s in 1..cfg.stages.len() {
            let st = &cfg.stages[s];
            let prev = &stages[s - 1];
            let sub = SubChunks {
                ranges: prev.out.ptr,
                cnt: prev.cnt.ptr,
                cap: prev.cap,
                e: cfg.stages[s - 1].chunk_size.div_ceil(st.chunk_size),
                c: st.chunk_size,
                gate: 0,
                stage: s,
            };
            let n_sub = sub.cap * sub.e;
            let (ci, ei, cc) = (sub.cap as i32, sub.e as i32, sub.c as i32);
            let mut l = gpu.stream.launch_builder(&subkeys);
            l.arg(&self.tok.ptr)
                .arg(&stages[0].out.ptr)
                .arg(&stages[0].cnt.ptr)
                .arg(&cp0)
                .arg(&c0)
                .arg(&tc)
                .arg(&sub.ranges)
                .arg(&sub.cnt)
                .arg(&ci)
                .arg(&ei)
                .arg(&cc)
                .arg(&x.keys);
            unsafe {
                l.launch(LaunchConfig {
                    grid_dim: (n_sub.div_ceil(256) as u32, rows as u32, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(|e| gpu_err("launch hipf_subkeys", e))?;
            launch_topk(
                gpu,
                &topk,
                x.keys,
                rows,
                &sub,
                st.keep_tokens / st.chunk_size,
                &stages[s],
                None,
            )?;
        }
        Ok(())
    }
}

impl Default for FastEstimator {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimator_names_round_trip() {
        for e in [
            MaskEstimator::Auto,
            MaskEstimator::Reference,
            MaskEstimator::TensorCore,
        ] {
            assert_eq!(MaskEstimator::parse(e.name()), Some(e));
        }
        assert_eq!(
            MaskEstimator::parse("fast"),
            Some(MaskEstimator::TensorCore)
        );
        assert_eq!(MaskEstimator::parse("nope"), None);
        assert!(MaskEstimator::Auto.fast_for(128));
        assert!(!MaskEstimator::Auto.fast_for(96));
        assert!(!MaskEstimator::Reference.fast_for(128));
    }
}
