//! Locret (arXiv 2410.01805): retaining heads score every KV unit once, at
//! insertion, and chunked prefill evicts the lowest-scored units of each KV
//! head so the cache stays at a fixed budget.
//!
//! What this policy does, against upstream (`huangyuxiang03/Locret` @ 28995c5,
//! `locret/inference/infer.py::generate` and the benchmark loops):
//!
//! - **Scores**: `weights::RetainingHead` on the pre-RoPE `[q | k | v]` of
//!   each appended token gives one raw score per KV head. Scores are never
//!   recomputed. Decoded tokens are never evicted, so their scores are not
//!   computed (stored as +inf).
//! - **Units**: per (sequence, KV head) the policy keeps the held units in
//!   cache order (original position, score, pinned flag); unit i of head h is
//!   cache index i of that head in the pool (`KvPool::retain_per_head` keeps
//!   this true). Each KV head keeps its own token set; all heads hold the same
//!   count.
//! - **Eviction** (per head, equal counts): while more than `budget` held
//!   units are not pinned, evict the lowest scores (ties: the older unit
//!   first) among units that are not protected. Protected: positions below
//!   `sink`, the last `stabilizer` held units, pinned units. Pinned: decoded
//!   tokens (`Phase::Decode`) and the last `keep_last` prompt tokens once an
//!   append says `prompt_done`. The budget thus counts what upstream's SN
//!   counts: upstream appends its 100-token tail after the last eviction and
//!   never evicts during decode, so its cache ends at SN + tail + decoded.
//!   If protected units alone exceed the budget, they are all kept and a
//!   `tracing::warn` says so.
//! - **When** (matches upstream's order): upstream evicts after a chunk's
//!   forward, so the chunk's queries see the previous eviction's survivors
//!   plus the whole chunk. `Engine::append` calls `after_append` before
//!   `attend_prefill`, so this policy defers each chunk's eviction: the
//!   eviction owed for chunk j runs at the start of the next append (before
//!   chunk j+1's units join), or earlier when the caller calls
//!   `Engine::evict` (e.g. after the chunk's attention). Peak cache is
//!   budget + chunk per head, as upstream.
//! - **Last chunk**: when an append with `prompt_done` holds at most
//!   `keep_last` tokens (the caller appended the tail separately, as upstream
//!   does), the eviction owed for the previous chunk is the final one; upstream
//!   drops the stabilizer protection there, which `stabilize_final_chunk:
//!   false` reproduces (default true: the stabilizer window is never evicted).
//!   A `prompt_done` append with more tokens has its own evictable part: its
//!   eviction runs at the first decode append or at `Engine::evict`.
//! - **Selection**: dense over what remains (`select` returns every held unit).
//! - **Positions**: original positions (`renumber_positions: true` is
//!   rejected by config validation; see `LocretConfig`).
//! - Forked sequences are not supported: the policy knows no state for the
//!   child and reports the mismatch at its next append.

mod weights;

pub use weights::{fc1_name, fc2_name, write_random_weights, write_weights, RetainingHead};

use std::collections::HashMap;
use std::path::Path;

use super::{InsertInfo, Phase, Policy, SelectOutput, SelectRequest, Selection};
use crate::config::{LocretConfig, ModelShape};
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug)]
struct Unit {
    pos: u32,
    score: f32,
    pinned: bool,
}

#[derive(Default)]
struct SeqState {
    /// Held units per KV head, in cache order.
    heads: Vec<Vec<Unit>>,
    /// Tokens ever appended (the next token's original position).
    seen: usize,
    /// Prefill units appended since the last eviction.
    pending: bool,
    /// The last append ended the prompt.
    prompt_done: bool,
}

impl SeqState {
    fn len(&self) -> usize {
        self.heads.first().map_or(0, |h| h.len())
    }
}

pub struct LocretPolicy {
    cfg: LocretConfig,
    head: RetainingHead,
    layer: usize,
    seqs: HashMap<u64, SeqState>,
}

impl LocretPolicy {
    /// Layer `layer`'s policy, its retaining head loaded from `cfg.weights`.
    pub fn new(cfg: LocretConfig, model: &ModelShape, layer: usize) -> Result<Self> {
        let Some(path) = cfg.weights.clone() else {
            return Err(Error::config(
                format!("layer {layer} locret.weights"),
                "locret needs a retaining-head safetensors file",
            ));
        };
        let head = RetainingHead::load(Path::new(&path), model, cfg.hidden, layer)?;
        Self::with_head(cfg, head, layer)
    }

    /// A policy over a retaining head built elsewhere (tests, benchmarks).
    pub fn with_head(cfg: LocretConfig, head: RetainingHead, layer: usize) -> Result<Self> {
        if cfg.renumber_positions {
            return Err(Error::config(
                "locret.renumber_positions",
                "not supported (the KV pool stores post-RoPE keys)",
            ));
        }
        if cfg.keep_last > cfg.stabilizer || cfg.budget == 0 || cfg.chunk == 0 {
            return Err(Error::config(
                "locret",
                format!("need budget > 0, chunk > 0 and keep_last <= stabilizer, got {cfg:?}"),
            ));
        }
        Ok(LocretPolicy {
            cfg,
            head,
            layer,
            seqs: HashMap::new(),
        })
    }

    pub fn config(&self) -> &LocretConfig {
        &self.cfg
    }
    pub fn head(&self) -> &RetainingHead {
        &self.head
    }

    /// Original positions of the held units per KV head, in cache order.
    pub fn held_positions(&self, seq: u64) -> Option<Vec<Vec<u32>>> {
        self.seqs.get(&seq).map(|s| {
            s.heads
                .iter()
                .map(|h| h.iter().map(|u| u.pos).collect())
                .collect()
        })
    }

    /// Scores of the held units per KV head, in cache order.
    pub fn held_scores(&self, seq: u64) -> Option<Vec<Vec<f32>>> {
        self.seqs.get(&seq).map(|s| {
            s.heads
                .iter()
                .map(|h| h.iter().map(|u| u.score).collect())
                .collect()
        })
    }

    /// Pinned flags of the held units per KV head (decoded tokens and the
    /// prompt tail), in cache order.
    pub fn held_pinned(&self, seq: u64) -> Option<Vec<Vec<bool>>> {
        self.seqs.get(&seq).map(|s| {
            s.heads
                .iter()
                .map(|h| h.iter().map(|u| u.pinned).collect())
                .collect()
        })
    }

    /// Whether an eviction is owed for `seq` (runs at its next append or at
    /// `evict`).
    pub fn eviction_pending(&self, seq: u64) -> bool {
        self.seqs.get(&seq).is_some_and(|s| s.pending)
    }

    /// Run the eviction owed for `seq` now, as its first decode append
    /// would (the final chunk's rule), so that a caller can act on the
    /// retained set before decoding (the SGLang GPU path frees the evicted
    /// slots). Returns the kept cache indices per head when it evicted.
    pub fn evict_as_decode(&mut self, seq: u64) -> Option<Vec<Vec<u32>>> {
        let mut st = self.seqs.remove(&seq)?;
        let keep = if st.pending {
            st.pending = false;
            self.evict_units(seq, &mut st, true)
        } else {
            None
        };
        self.seqs.insert(seq, st);
        keep
    }

    /// Tokens ever appended to `seq` (the next token's original position).
    pub fn seen(&self, seq: u64) -> Option<usize> {
        self.seqs.get(&seq).map(|s| s.seen)
    }

    /// Units held per KV head for `seq` (cache length).
    pub fn held_len(&self, seq: u64) -> Option<usize> {
        self.seqs.get(&seq).map(|s| s.len())
    }

    /// The bookkeeping of `after_append` over scores computed elsewhere
    /// (the GPU engine path scores on the device): `n` tokens appended to
    /// `seq` at cache index `start` (the units held), `scores` `[n][n_kv]`
    /// raw retaining-head scores (ignored for `Phase::Decode`: decoded
    /// tokens are never evicted). Runs the eviction owed for the previous
    /// chunk first, as `after_append`; returns the kept cache indices per
    /// head when it evicted (the new units included). A NaN score is an
    /// error and leaves the state untouched.
    pub fn apply_scores(
        &mut self,
        seq: u64,
        start: usize,
        n: usize,
        phase: Phase,
        prompt_done: bool,
        scores: &[f32],
    ) -> Result<Option<Vec<Vec<u32>>>> {
        let nkv = self.head.n_kv_heads();
        let prefill = phase == Phase::Prefill;
        if prefill {
            if scores.len() != n * nkv {
                return Err(Error::shape(
                    format!("locret layer {} scores [n][n_kv]", self.layer),
                    n * nkv,
                    scores.len(),
                ));
            }
            if let Some(i) = scores.iter().position(|x| x.is_nan()) {
                return Err(Error::Invalid(format!(
                    "locret layer {}: retaining-head score is NaN for token {} of sequence {seq} (non-finite q/k/v?)",
                    self.layer,
                    start + i / nkv,
                )));
            }
        }
        let mut st = self.seqs.remove(&seq).unwrap_or_else(|| SeqState {
            heads: vec![Vec::new(); nkv],
            ..SeqState::default()
        });
        if st.len() != start {
            let held = st.len();
            self.seqs.insert(seq, st);
            return Err(Error::Invalid(format!(
                "locret layer {}: sequence {seq} holds {held} units in the policy but the new tokens start at cache index {start} (forked sequences and appends that bypass the policy are not supported)",
                self.layer
            )));
        }
        let keep_last = self.cfg.keep_last;
        let tail_only = prefill && prompt_done && n <= keep_last;
        if prefill && prompt_done {
            // Pin the last keep_last prompt tokens already held.
            let from = (st.seen + n).saturating_sub(keep_last);
            for h in &mut st.heads {
                for u in h.iter_mut().rev() {
                    if (u.pos as usize) < from {
                        break;
                    }
                    u.pinned = true;
                }
            }
        }
        // The pool holds the new tokens at cache indices pre_len..pre_len + n.
        let pre_len = st.len();
        let mut keep = None;
        if st.pending {
            let final_chunk = !prefill || tail_only;
            keep = self.evict_units(seq, &mut st, final_chunk);
            st.pending = false;
        }
        for (h, units) in st.heads.iter_mut().enumerate() {
            for t in 0..n {
                units.push(Unit {
                    pos: (st.seen + t) as u32,
                    score: if prefill {
                        scores[t * nkv + h]
                    } else {
                        f32::INFINITY
                    },
                    pinned: !prefill || (prompt_done && t + keep_last >= n),
                });
            }
        }
        st.seen += n;
        if prefill {
            st.prompt_done = prompt_done;
            st.pending = !tail_only;
        }
        self.seqs.insert(seq, st);
        Ok(keep.map(|mut k| {
            for list in &mut k {
                list.extend(pre_len as u32..(pre_len + n) as u32);
            }
            k
        }))
    }

    /// Evict `st`'s held units down to the budget. `final_chunk`: this is the
    /// eviction after the last evictable chunk. Returns per head the kept
    /// cache indices, or None when nothing is evicted.
    fn evict_units(&self, seq: u64, st: &mut SeqState, final_chunk: bool) -> Option<Vec<Vec<u32>>> {
        let len = st.len();
        let stab = if final_chunk && !self.cfg.stabilize_final_chunk {
            0
        } else {
            self.cfg.stabilizer
        };
        let protected_from = len.saturating_sub(stab);
        let sink = self.cfg.sink;
        let mut cands: Vec<Vec<usize>> = Vec::with_capacity(st.heads.len());
        let (mut need, mut avail) = (0usize, usize::MAX);
        for h in &st.heads {
            let free = h.iter().filter(|u| !u.pinned).count();
            need = need.max(free.saturating_sub(self.cfg.budget));
            let c: Vec<usize> = (0..protected_from)
                .filter(|&i| !h[i].pinned && (h[i].pos as usize) >= sink)
                .collect();
            avail = avail.min(c.len());
            cands.push(c);
        }
        if need > avail {
            tracing::warn!(
                layer = self.layer,
                seq,
                held = len,
                budget = self.cfg.budget,
                need,
                evictable = avail,
                "locret: protected units (sink, stabilizer) exceed the budget; keeping them all"
            );
            need = avail;
        }
        if need == 0 {
            return None;
        }
        let mut keep = Vec::with_capacity(st.heads.len());
        for (h, mut c) in st.heads.iter_mut().zip(cands) {
            let by_score =
                |a: &usize, b: &usize| h[*a].score.total_cmp(&h[*b].score).then(a.cmp(b));
            c.select_nth_unstable_by(need - 1, by_score);
            let mut evict = vec![false; len];
            for &i in &c[..need] {
                evict[i] = true;
            }
            let kept: Vec<u32> = (0..len as u32).filter(|&i| !evict[i as usize]).collect();
            let mut i = 0;
            h.retain(|_| {
                i += 1;
                !evict[i - 1]
            });
            keep.push(kept);
        }
        tracing::debug!(
            layer = self.layer,
            seq,
            evicted = need,
            held = len - need,
            final_chunk,
            "locret eviction"
        );
        Some(keep)
    }
}

impl Policy for LocretPolicy {
    fn name(&self) -> &'static str {
        "locret"
    }

    fn select(&mut self, req: &SelectRequest<'_>) -> Result<SelectOutput> {
        Ok(SelectOutput {
            q_block: req.n_queries().max(1),
            blocks: vec![Selection::full(req.shape.n_kv_heads, req.kv.len())],
        })
    }

    fn needs_projections(&self) -> bool {
        true
    }

    fn after_append(&mut self, ins: &InsertInfo<'_>) -> Result<Option<Vec<Vec<u32>>>> {
        let nkv = ins.shape.n_kv_heads;
        let te = nkv * ins.shape.head_dim;
        let n = ins.k.len() / te;
        if ins.kv.len() != ins.start + n || ins.kv.n_kv_heads() != self.head.n_kv_heads() {
            return Err(Error::Invalid(format!(
                "locret layer {}: sequence {} holds {} tokens after appending {n} at {}",
                self.layer,
                ins.seq,
                ins.kv.len(),
                ins.start
            )));
        }
        // Score first: an error leaves the state untouched.
        let scores = if ins.phase == Phase::Decode {
            vec![f32::INFINITY; n * nkv]
        } else {
            self.head.scores(ins.q, ins.k, ins.v)?
        };
        self.apply_scores(ins.seq, ins.start, n, ins.phase, ins.prompt_done, &scores)
    }

    fn evict(&mut self, seq: u64) -> Result<Option<Vec<Vec<u32>>>> {
        let Some(mut st) = self.seqs.remove(&seq) else {
            return Ok(None);
        };
        let keep = if st.pending {
            st.pending = false;
            let final_chunk = st.prompt_done;
            self.evict_units(seq, &mut st, final_chunk)
        } else {
            None
        };
        self.seqs.insert(seq, st);
        Ok(keep)
    }

    fn end_sequence(&mut self, seq: u64) {
        self.seqs.remove(&seq);
    }

    fn prefill_chunk(&self) -> Option<usize> {
        Some(self.cfg.chunk)
    }
}
