//! A hip decode step that a CUDA graph can capture: the per-step metadata
//! (regions, refresh decision, step counter) lives on the device and is
//! computed there by `hip_step_meta` from the caller's device lengths, the
//! stage kernels are always launched and skip themselves on the device when
//! the step does not refresh them, and every launch shape is fixed for the
//! decoder's batch and K/V capacity. So a step uploads nothing, reads
//! nothing back and never waits on the host.
//!
//! `HipGpuDecoder::step` (host metadata, launches sized to the step) stays
//! the reference: the device step makes the same selections (gpu-test
//! checks both, and graph replay against eager launches bit for bit).

use cudarc::driver::{sys, CudaGraph, LaunchConfig};

use super::dispatch::{
    assemble_rows, run_stages, topk_asm, DeviceKv, FusedAsm, HipGpuDecoder, StageInputs,
};
use super::{gpu_err, DevBuf, GpuContext};
use crate::attention::AttnShape;
use crate::error::{Error, Result};

/// Device state of `HipGpuDecoder::step_device`.
pub struct DeviceStepState {
    /// i32 [step counter, refresh-from stage of the current step].
    state: DevBuf,
    /// i32 per sequence: end of the middle when stage 0 last ran.
    mid_end: DevBuf,
    /// i32 per stage: refresh intervals.
    intervals: DevBuf,
    /// Fixed bound on selected tokens per row (the attention launch's size).
    max_tokens: usize,
    /// Most slid tokens before a full refresh is forced.
    slid_cap: usize,
}

/// The most sequences one step handles (one `hip_step_meta` CTA).
pub const MAX_DEVICE_BATCH: usize = 1024;

impl HipGpuDecoder {
    fn refuse_async(&self) -> Result<()> {
        if self.cfg.async_refresh != crate::config::AsyncRefresh::Off {
            return Err(Error::config(
                "hip.async_refresh",
                "runs on the GPU decoder's host steps (step / select) only, not the device step",
            ));
        }
        Ok(())
    }

    /// Size every launch for sequences up to `kv`'s uploaded capacity and
    /// reset the device step counter. Allocates (synchronous): call before
    /// capturing, never inside a capture.
    pub fn prepare_device_steps(&mut self, kv: &DeviceKv) -> Result<()> {
        self.refuse_async()?;
        if kv.batch() != self.batch {
            return Err(Error::shape(
                "hip device step batch",
                self.batch,
                kv.batch(),
            ));
        }
        if self.batch > MAX_DEVICE_BATCH {
            return Err(Error::Invalid(format!(
                "hip device step: batch {} over {MAX_DEVICE_BATCH}",
                self.batch
            )));
        }
        let cap_max = kv.capacity.iter().copied().max().unwrap_or(0).max(1);
        let st = self.cfg.stages.clone();
        let e0 = cap_max.div_ceil(st[0].chunk_size).max(1);
        let mut slots = e0;
        for s in 1..st.len() {
            let e = st[s - 1].chunk_size.div_ceil(st[s].chunk_size);
            slots = slots.max(self.stages[s - 1].cap * e);
        }
        let need = self.batch * self.hkv * slots;
        if need > self.keys_cap {
            self.keys = DevBuf::alloc(need * 4)?;
            self.keys_cap = need;
            self.grow_topk_mc(slots)?;
        }
        self.e0 = e0;
        self.mean0_ready_for_device(e0, kv.head_dim)?;
        // One token per step slides at most one token per step out of the
        // window; four stage-0 intervals of headroom before forcing.
        let slid_cap = 4 * st[0].refresh_interval.max(1);
        let last = self.stages.last().unwrap();
        let last_keep = last.cap * st.last().unwrap().chunk_size;
        let max_tokens = self.cfg.sink + self.cfg.window + last_keep + slid_cap;
        let intervals: Vec<i32> = st
            .iter()
            .map(|s| s.refresh_interval.max(1) as i32)
            .collect();
        self.dev = Some(DeviceStepState {
            state: DevBuf::from_slice(&[0i32, 0])?,
            mid_end: DevBuf::from_slice(&vec![0i32; self.batch])?,
            intervals: DevBuf::from_slice(&intervals)?,
            max_tokens,
            slid_cap,
        });
        self.max_tokens = max_tokens;
        Ok(())
    }

    /// The fixed selected-token bound of the device step (its attention
    /// launch size), once prepared.
    pub fn device_max_tokens(&self) -> Option<usize> {
        self.dev.as_ref().map(|d| d.max_tokens)
    }

    /// Restart the device refresh cycle (the next step refreshes every
    /// stage), ordered on `gpu`'s stream. Not part of a step: a captured
    /// step replays on whatever counter it finds.
    /// The rows start new sequences: also forgets the cached stage-0 means
    /// (`decode_stage0 = mean_key`; their generation lives on the device,
    /// so a graph captured before replays correctly after this).
    pub fn reset_device(&mut self, gpu: &GpuContext) -> Result<()> {
        if let Some(m) = &mut self.mean0 {
            m.bump(gpu)?;
        }
        self.restart_device_cycle(gpu)
    }

    /// `reset_device` on the same sequences (benchmarks): cached means stay.
    pub fn restart_device_cycle(&self, gpu: &GpuContext) -> Result<()> {
        let d = self.dev.as_ref().ok_or_else(not_prepared)?;
        d.state.write_async(&gpu.stream, &[0i32, 0])
    }

    /// The stage-0 mean cache sized for the device step's `e0` (allocates:
    /// in `prepare_device_steps`, never inside a capture).
    fn mean0_ready_for_device(&mut self, e0: usize, d: usize) -> Result<()> {
        let rows = self.batch * self.hkv;
        if let Some(m) = self.mean0.as_mut() {
            if self.score_module != "hip_mask" {
                return Err(Error::config(
                    "hip.decode_stage0",
                    "mean_key reads keys on the device: not with host-tier (offloaded) key scoring",
                ));
            }
            m.ensure(rows, e0, d)?;
        }
        Ok(())
    }

    /// One decode step with device metadata: `lens` device i32 `[batch]`
    /// (current lengths, each in 1..=capacity: the caller's contract, not
    /// checked on the host), `q` f32 `[batch][n_q][d]`, `out` the same.
    /// Launches only: `hip_step_meta`, score + top-k per stage (gated),
    /// assemble, attention + combine.
    pub fn step_device(
        &mut self,
        gpu: &GpuContext,
        shape: &AttnShape,
        kv: &DeviceKv,
        lens: u64,
        q: u64,
        out: u64,
    ) -> Result<()> {
        if kv.batch() != self.batch {
            return Err(Error::shape(
                "hip device step batch",
                self.batch,
                kv.batch(),
            ));
        }
        self.refuse_async()?;
        if self.rope_modes() {
            return Err(Error::config(
                "hip.rope",
                "the GPU decoder's RoPE modes run host steps only (step with upload), not the device step",
            ));
        }
        // A pending invalidation (`reset`) is applied here, outside any
        // capture when the caller reset before capturing.
        let mean0 = match self.mean0.as_mut() {
            Some(m) => {
                if m.bump_pending {
                    m.bump(gpu)?;
                }
                Some(m.ptrs())
            }
            None => None,
        };
        let d = self.dev.as_ref().ok_or_else(not_prepared)?;
        let cfg = &self.cfg;
        let meta = gpu.func(self.score_module, "hip_step_meta")?;
        let (b, hk, sink, win, ns, sc) = (
            self.batch as i32,
            self.hkv as i32,
            cfg.sink as i32,
            cfg.window as i32,
            cfg.stages.len() as i32,
            d.slid_cap as i32,
        );
        let mut l = gpu.launch_pdl(&meta, Some(super::pdl::Site::Meta));
        l.arg(&lens)
            .arg(&b)
            .arg(&hk)
            .arg(&sink)
            .arg(&win)
            .arg(&d.intervals.ptr)
            .arg(&ns)
            .arg(&sc)
            .arg(&d.state.ptr)
            .arg(&d.mid_end.ptr)
            .arg(&self.stage0_in.ptr)
            .arg(&self.extra.ptr);
        // SAFETY: arguments follow hip_step_meta's parameter list (kernels/hip_mask.cu); lens
        // holds `batch` i32 (caller), state/mid_end/intervals were sized in prepare_device_steps,
        // stage0_in holds batch * hkv int2 and extra batch * 3 int2 (HipGpuDecoder::new).
        unsafe {
            l.launch(LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (self.batch.next_multiple_of(32) as u32, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(|e| gpu_err("launch hip_step_meta", e))?;
        super::prof::mark(gpu, "step meta")?;
        let rows = self.batch * self.hkv;
        let x = StageInputs {
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
            gate: d.state.ptr,
            topk_mc: self.topk_mc.as_ref().map(|m| m.ptrs),
            mean0,
            assemble: None,
        };
        // A lean device step's assembly returns at once when nothing was
        // refreshed (decided on the device): `sel` may then be stale, also
        // after any later replay of a graph captured from this call.
        let lean = self.lean_active();
        let tab = Some(self.tab_out(if lean { d.state.ptr } else { 0 }));
        let x = StageInputs {
            assemble: topk_asm().then(|| FusedAsm::new(&self.sel, self.extra.ptr, self.hkv, tab)),
            ..x
        };
        if !run_stages(gpu, kv, cfg, &self.stages, 0, &x)? {
            let last = self.stages.last().unwrap();
            assemble_rows(gpu, last, self.extra.ptr, self.hkv, rows, &self.sel, 0, tab)?;
        }
        self.sel_stale = false;
        self.sel_from_device = lean;
        // The refresh and the regions are decided on the device this step.
        self.early_ok = false;
        let mt = d.max_tokens;
        self.attend(gpu, shape, kv, q, mt, out)
    }
}

fn not_prepared() -> Error {
    Error::Invalid("hip device step: call prepare_device_steps first".into())
}

/// Capture the launches `f` makes on `gpu`'s stream into a CUDA graph
/// (nothing runs during capture). The stream must be one of the caller's
/// own (`GpuContext::with_new_stream`): the legacy default stream cannot be
/// captured. Buffers `f` grows must be grown before (no allocation inside).
pub fn capture(gpu: &GpuContext, f: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
    if gpu.stream.cu_stream().is_null() {
        return Err(Error::Invalid(
            "CUDA graph capture needs a non-default stream (GpuContext::with_new_stream)".into(),
        ));
    }
    gpu.stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| gpu_err("begin graph capture", e))?;
    let r = f();
    let g = gpu
        .stream
        .end_capture(sys::CUgraphInstantiate_flags(0))
        .map_err(|e| gpu_err("end graph capture / instantiate", e));
    r?;
    g?.ok_or_else(|| Error::Invalid("CUDA graph capture recorded nothing".into()))
}
