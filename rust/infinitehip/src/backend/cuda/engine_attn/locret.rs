//! Locret layers of `GpuAttention` (the CPU policy is `policy::locret`; its
//! module doc is the specification, and its own code keeps the books here).
//!
//! **Eviction is a retained index set, not freed memory.** The engine
//! (SGLang) owns the K/V pool; this path never frees or moves pool slots.
//! Per (request, locret layer, KV head) it keeps the set of token positions
//! Locret retains, and attention reads only those positions (through the
//! selection ranges, over the engine's page table). The attention result is
//! what the CPU engine computes over its compacted pool. To realise the
//! memory saving, an engine asks for the retained positions after the
//! prompt (`GpuAttention::locret_retain_now`, C ABI
//! `ihip_gpu_locret_retained`), moves those K/V into the request's first
//! slots itself and frees the rest (the SGLang shim's `locret_free`).
//!
//! Per prefill call (one call = one append, as `Engine::append`):
//! - **Scores on the GPU**: the caller passes the new tokens' pre-RoPE
//!   projections (`ProjArg`: q, k, v, any of f32/f16/bf16 with row strides);
//!   they are converted to f32 on the device and scored by the retaining
//!   head (`LocretGpu`, `kernels/locret_score.cu`; heads loaded from
//!   `locret.weights` exactly as the CPU policy loads them).
//! - **One host sync per (prefill call, locret layer)**: the scores
//!   (`n x n_kv_heads` f32) are read back and the CPU policy's own
//!   bookkeeping (`LocretPolicy::apply_scores`: the eviction owed for the
//!   previous chunk, protected sink / stabilizer / pinned tail, ties to the
//!   older unit, decoded tokens never evicted) updates the retained sets.
//!   The sync is timed (`LocretStats`). Decode steps need no scores and no
//!   sync: the decoded token joins every head's set (pinned), and the first
//!   decode runs the eviction owed for the last chunk, as on the CPU.
//! - The retained sets become selection ranges on the host and go to the
//!   device with one async copy per call (merged runs of consecutive
//!   positions; after eviction a head's set may have up to `budget` runs).
//! - Prefill attention: every query of a request attends that request's
//!   retained set (the survivors of earlier chunks plus this chunk), clipped
//!   causally; one attention launch per request.
//! - A prefill at position 0 for a request that has state, or for one that
//!   has decoded, starts a new request (SGLang reuses a `req_to_token` row).
//!   A prefill that starts past 0 with no state (a radix-cache prefix hit:
//!   those tokens were never scored for this request) is an error naming
//!   the request, as is a prefill or decode that skips positions.
//! - `prompt_done` per request (default false): as `Engine::append`'s flag;
//!   SGLang cannot tell a chunk's position in its prompt, so its backend
//!   passes false and the first decode runs the final eviction (the
//!   `keep_last` tail is then protected by the stabilizer, not pinned
//!   outside the budget).

use std::collections::HashSet;
use std::path::Path;

use super::super::policies::LocretGpu;
use super::super::{DevBuf, GpuContext};
use super::{grow, ProjArg};
use crate::attention::AttnShape;
use crate::config::{LocretConfig, ModelShape};
use crate::error::{Error, Result};
use crate::policy::locret::{LocretPolicy, RetainingHead};
use crate::policy::Phase;

/// Host-side counters of a locret layer (scores read back per prefill).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LocretStats {
    /// Prefill calls scored (each one host sync).
    pub syncs: usize,
    /// Tokens scored.
    pub tokens: usize,
    /// Host wall time spent waiting for the scores (stream sync + read).
    pub sync_ms: f64,
    /// Calls whose bookkeeping evicted units.
    pub evictions: usize,
}

/// The host bookkeeping of one locret layer (no CUDA: unit-tested on the
/// CPU). Requests are keyed by the caller's request id.
pub(crate) struct LocretHost {
    pub policy: LocretPolicy,
    known: HashSet<u64>,
    decoded: HashSet<u64>,
}

impl LocretHost {
    pub fn new(cfg: LocretConfig, head: RetainingHead, layer: usize) -> Result<Self> {
        Ok(LocretHost {
            policy: LocretPolicy::with_head(cfg, head, layer)?,
            known: HashSet::new(),
            decoded: HashSet::new(),
        })
    }

    pub fn end(&mut self, id: u64) {
        use crate::policy::Policy;
        self.policy.end_sequence(id);
        self.known.remove(&id);
        self.decoded.remove(&id);
    }

    pub fn clear(&mut self) {
        let ids: Vec<u64> = self.known.drain().collect();
        for id in ids {
            self.end(id);
        }
        self.decoded.clear();
    }

    /// Check (and, for a new request in the row, reset) request `id`'s
    /// state before a prefill of tokens from position `pos0`. Nothing is
    /// changed on error.
    pub fn begin_prefill(&mut self, layer: usize, id: u64, pos0: usize) -> Result<()> {
        if self.known.contains(&id) && (pos0 == 0 || self.decoded.contains(&id)) {
            self.end(id);
        }
        let seen = self.policy.seen(id).unwrap_or(0);
        if seen != pos0 {
            return Err(Error::Invalid(format!(
                "locret layer {layer} on the GPU: request {id} prefills from position {pos0} but its locret state covers {seen} tokens (tokens that were never scored, e.g. a radix-cache prefix hit, are not supported: every prompt token must pass through a prefill call here)"
            )));
        }
        Ok(())
    }

    /// Apply `n` new tokens of request `id` (`scores` `[n][n_kv]` for a
    /// prefill, ignored for decode). Returns whether units were evicted.
    #[allow(clippy::too_many_arguments)]
    pub fn insert(
        &mut self,
        layer: usize,
        id: u64,
        pos0: usize,
        n: usize,
        phase: Phase,
        prompt_done: bool,
        scores: &[f32],
    ) -> Result<bool> {
        if phase == Phase::Decode {
            let seen = self.policy.seen(id);
            if seen != Some(pos0) {
                return Err(Error::Invalid(format!(
                    "locret layer {layer} on the GPU: request {id} decodes position {pos0} but its locret state covers {} tokens (a decode needs a prefill of every earlier position here first)",
                    seen.map_or("no".to_string(), |s| s.to_string())
                )));
            }
        }
        let start = self.policy.held_len(id).unwrap_or(0);
        let keep = self
            .policy
            .apply_scores(id, start, n, phase, prompt_done, scores)?;
        self.known.insert(id);
        if phase == Phase::Decode {
            self.decoded.insert(id);
        }
        Ok(keep.is_some())
    }

    /// Run request `id`'s owed eviction now (what its first decode would
    /// run) and return its retained positions per KV head (sorted, equal
    /// counts). An error when the request has no state or has decoded.
    pub fn retain_now(&mut self, layer: usize, id: u64) -> Result<Vec<Vec<u32>>> {
        if self.decoded.contains(&id) {
            return Err(Error::Invalid(format!(
                "locret layer {layer} on the GPU: request {id} has decoded; its retained set is settled (ask before the first decode)"
            )));
        }
        self.policy.evict_as_decode(id);
        self.policy.held_positions(id).ok_or_else(|| {
            Error::Invalid(format!(
                "locret layer {layer} on the GPU: request {id} has no locret state (no prefill here)"
            ))
        })
    }

    /// Retained positions of request `id` per KV head as merged runs
    /// `[start, end)`.
    pub fn runs(&self, id: u64) -> Vec<Vec<(i32, i32)>> {
        self.policy
            .held_positions(id)
            .unwrap_or_default()
            .iter()
            .map(|h| runs_of(h))
            .collect()
    }
}

/// Sorted positions as merged `[start, end)` runs.
pub(crate) fn runs_of(pos: &[u32]) -> Vec<(i32, i32)> {
    let mut out: Vec<(i32, i32)> = Vec::new();
    for &p in pos {
        let p = p as i32;
        match out.last_mut() {
            Some(r) if r.1 == p => r.1 = p + 1,
            _ => out.push((p, p + 1)),
        }
    }
    out
}

/// Host arrays of a selection with one row per entry of `rows` and `cap`
/// ranges per row: (ranges `[rows][cap][2]`, then cum `[rows][cap]` ++ cnt
/// `[rows]` ++ tot `[rows]`, the layout of `GpuAttention::sel_view`).
pub(crate) fn sel_arrays(rows: &[Vec<(i32, i32)>]) -> (Vec<i32>, Vec<i32>, usize) {
    let cap = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let n = rows.len();
    let mut ranges = vec![0i32; n * cap * 2];
    let mut rest = vec![0i32; n * cap + 2 * n];
    for (i, r) in rows.iter().enumerate() {
        let mut acc = 0;
        for (j, &(a, b)) in r.iter().enumerate() {
            ranges[(i * cap + j) * 2] = a;
            ranges[(i * cap + j) * 2 + 1] = b;
            rest[i * cap + j] = acc;
            acc += b - a;
        }
        rest[n * cap + i] = r.len() as i32;
        rest[n * cap + n + i] = acc;
    }
    (ranges, rest, cap)
}

/// One locret layer: host bookkeeping plus the retaining head on the GPU.
pub(crate) struct LocretLayer {
    pub host: LocretHost,
    head: LocretGpu,
    qd: usize,
    kd: usize,
    /// f32 staging of the projections: q `[n][qd]`, k, v `[n][kd]`.
    x: DevBuf,
    ws: DevBuf,
    scores: DevBuf,
    pub stats: LocretStats,
}

impl LocretLayer {
    pub fn new(
        cfg: LocretConfig,
        model: &ModelShape,
        layer: usize,
        shape: &AttnShape,
    ) -> Result<Self> {
        let Some(path) = cfg.weights.clone() else {
            return Err(Error::config(
                format!("layer {layer} locret.weights"),
                "locret needs a retaining-head safetensors file",
            ));
        };
        let head = RetainingHead::load(Path::new(&path), model, cfg.hidden, layer)?;
        let gpu_head = LocretGpu::new(&head, shape)?;
        Ok(LocretLayer {
            host: LocretHost::new(cfg, head, layer)?,
            head: gpu_head,
            qd: shape.n_q_heads * shape.head_dim,
            kd: shape.n_kv_heads * shape.head_dim,
            x: DevBuf::null(),
            ws: DevBuf::null(),
            scores: DevBuf::null(),
            stats: LocretStats::default(),
        })
    }

    /// Scores `[n][n_kv]` of `n` tokens' projections, read back (the one
    /// host sync of a locret prefill).
    pub fn score(&mut self, gpu: &GpuContext, p: &ProjArg, n: usize) -> Result<Vec<f32>> {
        let (qd, kd) = (self.qd, self.kd);
        if p.q == 0 || p.k == 0 || p.v == 0 {
            return Err(Error::Invalid(
                "locret on the GPU: a projection pointer (q, k or v) is NULL".into(),
            ));
        }
        if p.q_stride < qd || p.kv_stride < kd {
            return Err(Error::shape(
                "locret projection row strides (q >= n_q x d, k/v >= n_kv x d)",
                format!("{qd}, {kd}"),
                format!("{}, {}", p.q_stride, p.kv_stride),
            ));
        }
        grow(&mut self.x, n * (qd + 2 * kd) * 4)?;
        let (xq, xk) = (self.x.ptr, self.x.ptr + (n * qd * 4) as u64);
        let xv = xk + (n * kd * 4) as u64;
        super::to_f32(gpu, p.q, p.dtype, p.q_stride, n, qd, 1.0, xq)?;
        super::to_f32(gpu, p.k, p.dtype, p.kv_stride, n, kd, 1.0, xk)?;
        super::to_f32(gpu, p.v, p.dtype, p.kv_stride, n, kd, 1.0, xv)?;
        grow(&mut self.ws, self.head.workspace_bytes(n))?;
        let n_kv = self.host.policy.head().n_kv_heads();
        grow(&mut self.scores, n * n_kv * 4)?;
        self.head
            .launch(gpu, &gpu.stream, xq, xk, xv, n, &self.ws, self.scores.ptr)?;
        let t0 = std::time::Instant::now();
        gpu.synchronize()?;
        let s: Vec<f32> = DevBuf::borrowed(self.scores.ptr, n * n_kv * 4).read(n * n_kv)?;
        self.stats.sync_ms += t0.elapsed().as_secs_f64() * 1e3;
        self.stats.syncs += 1;
        self.stats.tokens += n;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelShape;

    fn model() -> ModelShape {
        ModelShape {
            n_layers: 2,
            n_q_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            ..ModelShape::default()
        }
    }

    #[test]
    fn runs_merge_consecutive_positions() {
        assert_eq!(runs_of(&[]), vec![]);
        assert_eq!(runs_of(&[0, 1, 2, 5, 7, 8]), vec![(0, 3), (5, 6), (7, 9)]);
    }

    #[test]
    fn sel_arrays_layout() {
        let rows = vec![vec![(0, 3), (5, 6)], vec![(2, 4)]];
        let (r, rest, cap) = sel_arrays(&rows);
        assert_eq!(cap, 2);
        assert_eq!(r, vec![0, 3, 5, 6, 2, 4, 0, 0]);
        // cum, cnt, tot
        assert_eq!(rest, vec![0, 3, 0, 0, 2, 1, 4, 2]);
    }

    /// Chunked prefill then decode through the host books: the budget rule
    /// (budget + pinned tail + decoded), decoded tokens kept, and the state
    /// checks (skipped positions, unscored prefix, new request in a row,
    /// NaN scores) refuse without changing the state.
    #[test]
    fn host_books_budget_and_state_checks() {
        let m = model();
        let cfg = LocretConfig {
            budget: 10,
            chunk: 8,
            stabilizer: 4,
            keep_last: 2,
            hidden: 16,
            ..LocretConfig::default()
        };
        let head = RetainingHead::random(&m, 16, 3).unwrap();
        let mut h = LocretHost::new(cfg.clone(), head.clone(), 1).unwrap();
        let mut rng = crate::rng::Rng::new(5);
        let mut pos = 0;
        let mut evicted = 0;
        for (c, n) in [8usize, 8, 8, 5].into_iter().enumerate() {
            h.begin_prefill(1, 9, pos).unwrap();
            let s = rng.normal_vec(n * 2, 1.0);
            evicted += h.insert(1, 9, pos, n, Phase::Prefill, c == 3, &s).unwrap() as usize;
            pos += n;
        }
        assert!(evicted >= 2);
        for _ in 0..3 {
            h.insert(1, 9, pos, 1, Phase::Decode, false, &[]).unwrap();
            pos += 1;
        }
        let runs = h.runs(9);
        assert_eq!(runs.len(), 2);
        for r in &runs {
            // budget + pinned tail (2) + 3 decoded
            let n: i32 = r.iter().map(|(a, b)| b - a).sum();
            assert_eq!(n, 10 + 2 + 3);
            assert_eq!(r.last().unwrap().1, pos as i32);
        }
        // Skipped position: refused, state kept.
        assert!(h
            .insert(1, 9, pos + 1, 1, Phase::Decode, false, &[])
            .is_err());
        assert!(h.begin_prefill(1, 9, pos + 3).is_err());
        // Prefix never scored here.
        assert!(h.begin_prefill(1, 77, 40).is_err());
        // A prefill after decode starts a new request.
        h.begin_prefill(1, 9, 0).unwrap();
        assert_eq!(h.policy.seen(9), None);
        h.insert(1, 9, 0, 4, Phase::Prefill, false, &[0.0; 8])
            .unwrap();
        assert_eq!(h.runs(9), vec![vec![(0, 4)], vec![(0, 4)]]);
        // NaN score: refused, nothing changed.
        h.begin_prefill(1, 9, 4).unwrap();
        let mut s = vec![0.0; 8];
        s[3] = f32::NAN;
        assert!(h.insert(1, 9, 4, 4, Phase::Prefill, false, &s).is_err());
        assert_eq!(h.policy.seen(9), Some(4));
        h.clear();
        assert_eq!(h.policy.seen(9), None);
    }

    /// `retain_now` runs the owed eviction (budget per head), is refused
    /// after a decode and for unknown requests, and the next decode keeps
    /// what it returned plus the decoded token.
    #[test]
    fn retain_now_evicts_what_the_first_decode_would() {
        let m = model();
        let cfg = LocretConfig {
            budget: 10,
            chunk: 8,
            stabilizer: 4,
            keep_last: 2,
            hidden: 16,
            ..LocretConfig::default()
        };
        let head = RetainingHead::random(&m, 16, 3).unwrap();
        let mut h = LocretHost::new(cfg, head, 1).unwrap();
        let mut rng = crate::rng::Rng::new(8);
        let mut pos = 0;
        for n in [8usize, 8, 8] {
            h.begin_prefill(1, 4, pos).unwrap();
            let s = rng.normal_vec(n * 2, 1.0);
            h.insert(1, 4, pos, n, Phase::Prefill, false, &s).unwrap();
            pos += n;
        }
        assert!(h.retain_now(1, 99).is_err());
        let kept = h.retain_now(1, 4).unwrap();
        assert_eq!(kept.len(), 2);
        assert!(kept.iter().all(|k| k.len() == 10));
        assert_eq!(h.retain_now(1, 4).unwrap(), kept, "idempotent");
        h.insert(1, 4, pos, 1, Phase::Decode, false, &[]).unwrap();
        let after = h.policy.held_positions(4).unwrap();
        for (a, k) in after.iter().zip(&kept) {
            assert_eq!(&a[..10], &k[..]);
            assert_eq!(a[10], pos as u32);
        }
        assert!(h.retain_now(1, 4).is_err(), "refused after a decode");
    }

    /// The books the GPU path keeps (fed with the same scores the CPU
    /// policy computes) pick exactly the K rows the CPU `Engine`'s compacted
    /// pool holds, after every chunked-prefill call (batched requests, one
    /// ending with a tail shorter than keep_last) and decode: the GPU test's
    /// comparison with the GPU scores replaced by host ones.
    #[test]
    fn host_books_equal_cpu_engine_retained_rows() {
        use crate::config::{LayerOverride, LayerPolicy, PolicyConfig};
        use crate::engine::{Engine, Projections};
        use crate::policy::locret::write_random_weights;
        let m = ModelShape {
            n_layers: 2,
            n_q_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            ..ModelShape::default()
        };
        let path = std::env::temp_dir().join(format!(
            "ihip-locret-books-{}.safetensors",
            std::process::id()
        ));
        write_random_weights(&path, &m, 16, crate::DType::F32, 11).unwrap();
        let lc = LocretConfig {
            budget: 20,
            chunk: 16,
            stabilizer: 6,
            sink: 2,
            keep_last: 4,
            hidden: 16,
            weights: Some(path.display().to_string()),
            ..LocretConfig::default()
        };
        let mut cfg = PolicyConfig {
            model: m,
            dense_layers: 0,
            ..PolicyConfig::default()
        };
        cfg.default = LayerPolicy::Dense;
        cfg.overrides = vec![LayerOverride {
            layers: vec![1],
            policy: LayerPolicy::Locret(lc.clone()),
        }];
        let mut eng = Engine::new(cfg).unwrap();
        let head = RetainingHead::load(&path, &m, 16, 1).unwrap();
        let _ = std::fs::remove_file(&path);
        let mut books = LocretHost::new(lc, head.clone(), 1).unwrap();
        let (hkv, d, qe) = (2, 8, 32);
        let te = hkv * d;
        let prompt = [70usize, 36];
        let mut rng = crate::rng::Rng::new(3);
        let full: Vec<Vec<f32>> = prompt
            .iter()
            .map(|&p| {
                // Exact in the engine's bf16 pool.
                rng.normal_vec((p + 5) * te, 1.0)
                    .into_iter()
                    .map(|x| half::bf16::from_f32(x).to_f32())
                    .collect()
            })
            .collect();
        let mut pos = [0usize; 2];
        for b in 0..2 {
            eng.add_sequence(b as u64).unwrap();
        }
        let mut compared = 0;
        for _step in 0..12 {
            for b in 0..2 {
                let decode = pos[b] >= prompt[b];
                if pos[b] >= prompt[b] + 5 {
                    continue;
                }
                let n = if decode {
                    1
                } else {
                    16.min(prompt[b] - pos[b])
                };
                let done = !decode && pos[b] + n == prompt[b];
                let k = &full[b][pos[b] * te..(pos[b] + n) * te];
                let (pq, pk, pv) = (
                    rng.normal_vec(n * qe, 1.0),
                    rng.normal_vec(n * te, 1.0),
                    rng.normal_vec(n * te, 1.0),
                );
                let phase = if decode {
                    Phase::Decode
                } else {
                    Phase::Prefill
                };
                let pr = Projections {
                    q: &pq,
                    k: &pk,
                    v: &pv,
                };
                eng.append(1, b as u64, k, k, phase, done, Some(pr))
                    .unwrap();
                if !decode {
                    books.begin_prefill(1, b as u64, pos[b]).unwrap();
                }
                let sc = if decode {
                    Vec::new()
                } else {
                    head.scores(&pq, &pk, &pv).unwrap()
                };
                books
                    .insert(1, b as u64, pos[b], n, phase, done, &sc)
                    .unwrap();
                pos[b] += n;
                let nc = eng.seq_len(1, b as u64).unwrap();
                let (kc, _) = eng.read(1, b as u64, 0, nc).unwrap();
                let held = books.policy.held_positions(b as u64).unwrap();
                for (h, ps) in held.iter().enumerate() {
                    assert_eq!(ps.len(), nc, "req {b} head {h} at {}", pos[b]);
                    for (i, &p) in ps.iter().enumerate() {
                        let p = p as usize;
                        assert_eq!(
                            &full[b][(p * hkv + h) * d..(p * hkv + h + 1) * d],
                            &kc[(i * hkv + h) * d..(i * hkv + h + 1) * d]
                        );
                    }
                }
                compared += 1;
            }
        }
        assert!(compared > 10);
        // Eviction happened: the long prompt holds fewer than its length.
        assert!(eng.seq_len(1, 0).unwrap() < prompt[0]);
    }
}
