//! `LLAMA_INFINITEHIP_PROFILE=1`: where the plugin's time goes, summed over
//! layers and steps, reported in the stats line when the context is freed.
//! Off (the default), each probe is one branch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Time slots (nanoseconds, summed; `Attend` over all ggml threads).
#[derive(Clone, Copy)]
pub(crate) enum Slot {
    /// The whole plan op (one thread).
    Plan,
    /// Of it: reading the mask rows (causal-chain check).
    Chain,
    /// Of it: the prompt-end hook (`after_append`).
    PromptDone,
    /// Of it: prefill selection.
    SelectPrefill,
    /// Of it: decode selection on refresh steps (a stage ran).
    SelectRefresh,
    /// Of it: decode selection on steps reusing cached stages.
    SelectCached,
    /// The attend op, thread-summed.
    Attend,
}

const SLOTS: [(&str, Slot); 7] = [
    ("plan_ms", Slot::Plan),
    ("chain_ms", Slot::Chain),
    ("prompt_done_ms", Slot::PromptDone),
    ("select_prefill_ms", Slot::SelectPrefill),
    ("select_refresh_ms", Slot::SelectRefresh),
    ("select_cached_ms", Slot::SelectCached),
    ("attend_thread_ms", Slot::Attend),
];

/// Event counts.
#[derive(Clone, Copy)]
pub(crate) enum Count {
    PrefillPlans,
    DecodePlans,
    RefreshSteps,
    AttendCalls,
}

const COUNTS: [(&str, Count); 4] = [
    ("prefill_plans", Count::PrefillPlans),
    ("decode_plans", Count::DecodePlans),
    ("refresh_steps", Count::RefreshSteps),
    ("attend_calls", Count::AttendCalls),
];

pub(crate) struct Profile {
    on: bool,
    ns: [AtomicU64; 7],
    n: [AtomicU64; 4],
}

impl Profile {
    pub(crate) fn from_env() -> Self {
        Profile {
            on: std::env::var("LLAMA_INFINITEHIP_PROFILE").is_ok_and(|v| v == "1"),
            ns: Default::default(),
            n: Default::default(),
        }
    }

    /// A start time when profiling is on.
    #[inline]
    pub(crate) fn start(&self) -> Option<Instant> {
        self.on.then(Instant::now)
    }

    #[inline]
    pub(crate) fn stop(&self, slot: Slot, t0: Option<Instant>) {
        if let Some(t0) = t0 {
            self.ns[slot as usize].fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }

    #[inline]
    pub(crate) fn count(&self, c: Count) {
        if self.on {
            self.n[c as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// JSON object of the slots (ms) and counts; None when off.
    pub(crate) fn json(&self) -> Option<serde_json::Value> {
        if !self.on {
            return None;
        }
        let mut o = serde_json::Map::new();
        for (name, s) in SLOTS {
            let ms = self.ns[s as usize].load(Ordering::Relaxed) as f64 / 1e6;
            o.insert(
                name.into(),
                serde_json::json!((ms * 1000.0).round() / 1000.0),
            );
        }
        for (name, c) in COUNTS {
            o.insert(
                name.into(),
                self.n[c as usize].load(Ordering::Relaxed).into(),
            );
        }
        Some(o.into())
    }
}
