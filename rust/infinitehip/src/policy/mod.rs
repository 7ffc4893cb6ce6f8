//! Block selection. Each method is one module behind the `Policy` trait: it
//! turns (queries, a sequence's KV, its own per-sequence state) into the token
//! set every query block attends to.

mod dense;
pub mod hip;
mod hip_fast;
pub mod lazy;
pub mod locret;
mod selection;
pub mod squeeze;

pub use dense::DensePolicy;
pub use selection::{normalize, Selection};

use crate::attention::AttnShape;
use crate::error::Result;
use crate::kv::KvRead;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Prefill,
    Decode,
}

/// What a policy is asked to select for.
pub struct SelectRequest<'a> {
    pub seq: u64,
    pub shape: AttnShape,
    pub phase: Phase,
    /// Post-RoPE queries `[n][n_q_heads][head_dim]` at cache positions
    /// `q_start..q_start + n`. In decode, n is 1.
    pub queries: &'a [f32],
    pub q_start: usize,
    /// The sequence's KV for this layer, new tokens included.
    pub kv: &'a dyn KvRead,
}

impl SelectRequest<'_> {
    pub fn n_queries(&self) -> usize {
        self.queries.len() / self.shape.q_elems()
    }
}

/// One selection per block of `q_block` consecutive queries.
#[derive(Clone, Debug, PartialEq)]
pub struct SelectOutput {
    pub q_block: usize,
    pub blocks: Vec<Selection>,
}

/// Tokens just appended, with the projections some policies score at insertion.
pub struct InsertInfo<'a> {
    pub seq: u64,
    pub shape: AttnShape,
    pub phase: Phase,
    /// Cache index of the first new token.
    pub start: usize,
    /// Pre-RoPE projections of the new tokens: q `[n][n_q_heads][d]`,
    /// k and v `[n][n_kv_heads][d]`. Empty when the caller passed none (the
    /// engine then calls `after_append` only for `prompt_done`).
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// The sequence's KV with the new tokens.
    pub kv: &'a dyn KvRead,
    /// True when these are the last prompt tokens (prefill finished).
    pub prompt_done: bool,
}

pub trait Policy: Send {
    fn name(&self) -> &'static str;

    /// Tokens each query block attends to.
    fn select(&mut self, req: &SelectRequest<'_>) -> Result<SelectOutput>;

    /// Called after tokens are appended. A policy that evicts returns, per KV
    /// head, the ascending cache indices to keep (equal count for all heads);
    /// the caller compacts the pool with `KvPool::retain_per_head`.
    fn after_append(&mut self, _ins: &InsertInfo<'_>) -> Result<Option<Vec<Vec<u32>>>> {
        Ok(None)
    }

    /// True when `after_append` needs the pre-RoPE projections (the engine
    /// refuses appends without them instead of letting state drift).
    fn needs_projections(&self) -> bool {
        false
    }

    /// Run any eviction the policy still owes for `seq` now (e.g. after a
    /// prefill chunk's attention); same return as `after_append`.
    fn evict(&mut self, _seq: u64) -> Result<Option<Vec<Vec<u32>>>> {
        Ok(None)
    }

    /// Forget a finished sequence's state.
    fn end_sequence(&mut self, _seq: u64) {}

    /// `child` was forked from `parent` and shares its KV pages: a policy
    /// with per-prefix state (squeeze's clusters) may share it.
    fn fork_sequence(&mut self, _parent: u64, _child: u64) {}

    /// Prefill queries are selected and attended in chunks of this many so
    /// selection memory stays bounded (None: all at once).
    fn prefill_chunk(&self) -> Option<usize> {
        None
    }

    /// Whether the last decode `select` recomputed its selection (a
    /// refresh) rather than reusing cached state; None when the policy has
    /// no such distinction (profiling only).
    fn last_decode_refreshed(&self) -> Option<bool> {
        None
    }
}
