//! `hip.async_refresh` on the GPU decoder (`HipGpuDecoder` host steps):
//! refresh work moved onto a stream of the decoder's own, beside the
//! attention, and joined by the next step (which waits for it before
//! anything of its own). The CPU twin is `HipPolicy` with the same setting.
//!
//! - `stage0`: at the step before a stage-0 refresh, stage 0 (cached
//!   chunk means) is scored on the side stream into a second stage-0
//!   buffer, with its own score and top-k scratch; the refresh step swaps
//!   it in and runs the later stages in line.
//! - `all`: a refresh due at step s runs on the side stream into a second
//!   set of the buffers the attention reads (the last stage's chunks, the
//!   selection, the sparse table, its counts and sink ends), with its own
//!   regions; step s attends the previous set and step s + 1 swaps.
//!
//! Everything else a side refresh touches (earlier stages, scratch, the
//! mean cache) only refreshes use, and the next step waits for the side
//! stream before its own uploads and launches.

use cudarc::driver::CudaEvent;

use super::dispatch::{DeviceSelection, StageBuf, TopkMc};
use super::{gpu_err, DevBuf, GpuContext};
use crate::error::Result;

/// `all`: the buffers a refresh writes for the attention (swapped with
/// the decoder's own).
pub(crate) struct RefreshOutputs {
    pub last: StageBuf,
    pub sel: DeviceSelection,
    pub tab: DevBuf,
    pub ntab: DevBuf,
    pub tab_sink: DevBuf,
    pub host_tab_sink: Vec<usize>,
    /// The side refresh's regions `[batch][sink, slid, window]`.
    pub extra: DevBuf,
    /// Host copy of `extra` as last uploaded, and whether it differs from
    /// the attention's regions of that step (a stage-0 refresh moved the
    /// slid range): a step that uploads nothing then copies it over.
    pub extra_host: Vec<[i32; 2]>,
    pub extra_differs: bool,
}

/// `stage0`: the early stage 0's output and scratch.
pub(crate) struct EarlyStage0 {
    pub out: StageBuf,
    pub keys: DevBuf,
    pub keys_cap: usize,
    pub topk_mc: Option<TopkMc>,
    /// End of each sequence's middle when it was scored.
    pub mid_end: Vec<usize>,
    /// The decoder's rows started new sequences since (`reset`): the
    /// pending result is dropped.
    pub discard: bool,
}

pub(crate) struct AsyncRefresh {
    pub side: GpuContext,
    fork: CudaEvent,
    join: CudaEvent,
    /// Side work was enqueued and not waited for yet.
    pub pending: bool,
    pub all: Option<RefreshOutputs>,
    pub stage0: Option<EarlyStage0>,
}

impl AsyncRefresh {
    pub fn new(
        gpu: &GpuContext,
        stage0: Option<EarlyStage0>,
        all: Option<RefreshOutputs>,
    ) -> Result<Self> {
        let ev = || {
            gpu.ctx
                .new_event(None)
                .map_err(|e| gpu_err("create async-refresh event", e))
        };
        Ok(AsyncRefresh {
            side: gpu.with_new_stream()?,
            fork: ev()?,
            join: ev()?,
            pending: false,
            all,
            stage0,
        })
    }

    /// The side stream waits for everything queued on `gpu`'s stream.
    pub fn fork(&self, gpu: &GpuContext) -> Result<()> {
        self.fork
            .record(&gpu.stream)
            .map_err(|e| gpu_err("record async-refresh fork", e))?;
        self.side
            .stream
            .wait(&self.fork)
            .map_err(|e| gpu_err("wait for async-refresh fork", e))
    }

    /// Mark the end of the work just queued on the side stream.
    pub fn join(&mut self) -> Result<()> {
        self.join
            .record(&self.side.stream)
            .map_err(|e| gpu_err("record async-refresh join", e))?;
        self.pending = true;
        Ok(())
    }

    /// `gpu`'s stream waits for the pending side work, if any; true if
    /// there was some.
    pub fn wait_pending(&mut self, gpu: &GpuContext) -> Result<bool> {
        if !self.pending {
            return Ok(false);
        }
        gpu.stream
            .wait(&self.join)
            .map_err(|e| gpu_err("wait for async refresh", e))?;
        self.pending = false;
        Ok(true)
    }
}

impl StageBuf {
    /// A buffer of the same shape (contents undefined, counts zero).
    pub(crate) fn twin(&self, rows: usize) -> Result<StageBuf> {
        Ok(StageBuf {
            out: DevBuf::alloc(self.out.bytes)?,
            cnt: DevBuf::from_slice(&vec![0i32; rows])?,
            cap: self.cap,
        })
    }
}
