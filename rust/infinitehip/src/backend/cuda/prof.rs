//! Diagnostic per-launch device times (`bench-gpu-model`'s kernel
//! breakdown): while enabled on this thread, the hip, attention and dense
//! launch sites record a named event after each launch; the time between
//! consecutive marks is the device time of the launch in between when the
//! caller keeps the device busy ahead of the host (a queue of earlier work).
//! Off by default: one thread-local flag test per launch. Never enable it
//! while capturing a CUDA graph.

use std::cell::RefCell;

use cudarc::driver::{sys, CudaEvent};

use super::{gpu_err, GpuContext};
use crate::error::Result;

thread_local! {
    static MARKS: RefCell<Option<Vec<(&'static str, CudaEvent)>>> = const { RefCell::new(None) };
}

/// Start (or stop, dropping the marks) recording on this thread.
pub fn enable(on: bool) {
    MARKS.with(|m| *m.borrow_mut() = if on { Some(Vec::new()) } else { None });
}

/// Record an event named `name` on `gpu`'s stream, when enabled.
pub fn mark(gpu: &GpuContext, name: &'static str) -> Result<()> {
    MARKS.with(|m| {
        let mut m = m.borrow_mut();
        let Some(v) = m.as_mut() else {
            return Ok(());
        };
        let ev = gpu
            .ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| gpu_err("profile event", e))?;
        ev.record(&gpu.stream)
            .map_err(|e| gpu_err("record profile event", e))?;
        v.push((name, ev));
        Ok(())
    })
}

/// The marks recorded since enabling (or the last take); recording goes on.
pub fn take() -> Vec<(&'static str, CudaEvent)> {
    MARKS.with(|m| {
        m.borrow_mut()
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    })
}

/// Name of stage `s`'s scoring / top-k launches.
pub(crate) fn stage_name(score: bool, s: usize) -> &'static str {
    const SCORE: [&str; 4] = ["score s0", "score s1", "score s2", "score s3+"];
    const TOPK: [&str; 4] = ["topk s0", "topk s1", "topk s2", "topk s3+"];
    let i = s.min(3);
    if score {
        SCORE[i]
    } else {
        TOPK[i]
    }
}
