//! Locret on llama.cpp's CPU path: retaining heads score every prompt token
//! in the graph, and the lowest-scored tokens are evicted from llama.cpp's
//! KV cells between ubatches.
//!
//! What runs where:
//! - **Scoring**: the layer's `RetainingHead` on the token's pre-RoPE
//!   `[q | k | v]` (the `src[0]` of the ROPE nodes feeding llama.cpp's
//!   `build_attn`) gives one raw score per KV head. By default patch 0003
//!   builds it as ggml ops (concat, `mul_mat` fc1, `silu`, `mul_mat` fc2) on
//!   weights from `graph_fc1`/`graph_fc2` loaded once into the layer's
//!   backend buffer (then `release_heads`), and a one-thread op hands the
//!   scores `[n_kv_heads, n_tokens]` to `record_op`. The Rust scoring op
//!   (`score_op`, any number of ggml threads over disjoint token ranges) is
//!   the reference twin (`LLAMA_INFINITEHIP_LOCRET_SCORING=rust`); `check_op`
//!   compares graph scores with the f64 reference (`=check`). llama.cpp's cells are shared by every layer and
//!   head, so eviction is per token: each held token keeps its raw score per
//!   (locret layer, KV head) (one row of `n_locret_layers * n_kv_heads`
//!   floats), and each eviction turns the rows of the held tokens into one
//!   score per token by `locret.token_score` (`llama_locret_score`): by
//!   default the token's largest per-(layer, head) z-score among the held
//!   tokens (`z_max`; `rank_max` uses ranks), or the raw max over layers and
//!   heads (`raw_max`, the first version: the layer with the largest logit
//!   scale decides). Our core and upstream
//!   evict per (layer, KV head) instead, which llama.cpp's cell layout cannot
//!   express.
//! - **Attention** of locret layers is llama.cpp's own (the selection is
//!   dense over what remains), so with a budget that covers the context the
//!   output is stock llama.cpp's.
//! - **Eviction** (`LocretLlama::begin`, called by llama.cpp's decode loop
//!   before each ubatch): the previous ubatch's tokens join their sequences'
//!   held units with their scores, then each sequence of the new ubatch pays
//!   the eviction it owes, the core's rule (`policy::locret`) on one list of
//!   units per sequence: while more than `budget` held units are not pinned,
//!   evict the lowest scores (ties: older first) among units that are not
//!   protected (positions below `sink`, the last `stabilizer` held units,
//!   pinned units). Pinned: decoded tokens and, once the prompt ends, its last
//!   `keep_last` tokens. The removal goes through `llama_memory_seq_rm` (one
//!   call per run of consecutive evicted positions); llama.cpp rebuilds the
//!   mask from its cells.
//! - **Prompt end**: llama.cpp does not say which ubatch ends the prompt; a
//!   sequence's first single-token ubatch after it holds tokens is a decode
//!   step (as the plugin's prompt-end detection for lazy/squeeze). Its
//!   eviction is the final one (`stabilize_final_chunk` applies there), after
//!   pinning the last `keep_last` prompt positions. A prompt whose last ubatch
//!   holds a single token has that token treated as decoded (pinned).
//! - **Chunking**: llama.cpp's `n_ubatch` is the chunk; `locret.chunk` is not
//!   used. The peak held per sequence is budget + pinned + one ubatch, as the
//!   core's budget + chunk.
//! - **Positions** stay llama.cpp's (the core's `renumber_positions: false`).
//!   A sequence's newest token is never evicted (llama.cpp continues
//!   positions from its last cell), which only matters with `stabilizer: 0`
//!   or `stabilize_final_chunk: false` and `keep_last: 0`.
//! - A sequence rewound (new tokens at positions it already holds: a
//!   failed ubatch, `llama_memory_seq_rm(.., p, -1)`, a cleared cache) drops
//!   its units from there on. Forked sequences (`seq_cp`) and removals of
//!   middle ranges behind the plugin's back are not tracked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use infinitehip::config::{LayerPolicy, LocretConfig, PolicyConfig};
use infinitehip::policy::locret::RetainingHead;
use infinitehip::{Error, Result};

use crate::ffi::TensorDesc;
use crate::llama::View;
use crate::llama_locret_score::token_scores;

/// One token held by a sequence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Unit {
    pub pos: i32,
    /// The eviction score (`locret.token_score` over the held tokens' rows,
    /// computed at each eviction); +inf for decoded and unscored tokens.
    pub score: f32,
    pub pinned: bool,
}

/// Indices (into `units`, held in position order) of the units the core's
/// Locret rule evicts now. `final_chunk`: the eviction after the last
/// prompt chunk (`stabilize_final_chunk: false` drops the stabilizer
/// protection there). One addition to the core's rule: the newest unit is
/// always protected (llama.cpp takes a sequence's next position from its
/// last cell and requires positions to continue from it). Also returns
/// whether protected units alone exceeded the budget (then every evictable
/// unit goes and the rest stays).
pub fn choose_evictions(
    units: &[Unit],
    cfg: &LocretConfig,
    final_chunk: bool,
) -> (Vec<usize>, bool) {
    let len = units.len();
    let stab = if final_chunk && !cfg.stabilize_final_chunk {
        0
    } else {
        cfg.stabilizer
    };
    let protected_from = len.saturating_sub(stab.max(1));
    let free = units.iter().filter(|u| !u.pinned).count();
    let mut need = free.saturating_sub(cfg.budget);
    let mut cands: Vec<usize> = (0..protected_from)
        .filter(|&i| !units[i].pinned && units[i].pos >= 0 && (units[i].pos as usize) >= cfg.sink)
        .collect();
    let short = need > cands.len();
    if short {
        need = cands.len();
    }
    if need == 0 {
        return (Vec::new(), short);
    }
    let by_score =
        |a: &usize, b: &usize| units[*a].score.total_cmp(&units[*b].score).then(a.cmp(b));
    cands.select_nth_unstable_by(need - 1, by_score);
    let mut out = cands[..need].to_vec();
    out.sort_unstable();
    (out, short)
}

/// Runs of consecutive positions `[p0, p1)` covering `pos` (ascending).
fn runs(pos: &[i32]) -> Vec<(i32, i32)> {
    let mut out: Vec<(i32, i32)> = Vec::new();
    for &p in pos {
        match out.last_mut() {
            Some(r) if r.1 == p => r.1 = p + 1,
            _ => out.push((p, p + 1)),
        }
    }
    out
}

#[derive(Default)]
struct SeqUnits {
    /// Held units in position order.
    units: Vec<Unit>,
    /// Per held unit (same order): its raw score per (locret layer, KV
    /// head), `width` floats; +inf for decoded and unscored units.
    rows: Vec<f32>,
    /// Prompt units joined since the last eviction.
    pending: bool,
}

impl SeqUnits {
    /// Keep the first `n` units.
    fn truncate(&mut self, n: usize, width: usize) {
        self.units.truncate(n);
        self.rows.truncate(n * width);
    }

    /// Recompute every unit's eviction score from the rows.
    fn rescore(&mut self, rule: infinitehip::config::TokenScore, width: usize) {
        let s = token_scores(rule, &self.rows, width);
        for (u, x) in self.units.iter_mut().zip(s) {
            u.score = x;
        }
    }
}

/// The ubatch in flight: its tokens and their scores so far.
#[derive(Default)]
struct Ubatch {
    pos: Vec<i32>,
    /// Per token: its sequences.
    seqs: Vec<Vec<i32>>,
    /// Per token: decoded (its sequence's only token in this ubatch, after
    /// the prompt): pinned, not scored.
    decoded: Vec<bool>,
    /// Per token: its row of raw scores per (locret layer, KV head)
    /// (`n x width`; -inf until that layer scores).
    scores: Vec<f32>,
    /// Per layer: a scoring op ran for this ubatch.
    scored: Vec<bool>,
}

#[derive(Default)]
struct Counters {
    ubatches: AtomicU64,
    scored_tokens: AtomicU64,
    evictions: AtomicU64,
    evicted_tokens: AtomicU64,
    seq_rm_calls: AtomicU64,
    budget_short: AtomicU64,
    unscored_ubatches: AtomicU64,
    rewinds: AtomicU64,
    max_held: AtomicU64,
    /// Cells visible to the last query of a stream, read from llama.cpp's
    /// own attention mask in the scoring op (llama.cpp's live cells of that
    /// sequence, this ubatch included).
    max_visible_cells: AtomicU64,
    last_visible_cells: AtomicU64,
    /// Check mode: graph scores compared with the f64 reference, and the
    /// largest relative error (f64 bits).
    check_scores: AtomicU64,
    check_max_rel_err: AtomicU64,
    /// Layer scorings by the ggml graph (`record_op`) and by the Rust
    /// scoring op (`score_op`, counted once per layer and ubatch).
    graph_scorings: AtomicU64,
    rust_op_scorings: AtomicU64,
}

/// Locret state of one llama.cpp context.
pub struct LocretLlama {
    cfg: LocretConfig,
    /// Per layer: its retaining head (locret layers only).
    /// `release_heads` empties it once the ggml graph holds the weights.
    heads: RwLock<Vec<Option<Arc<RetainingHead>>>>,
    /// Per layer: runs locret.
    locret_layers: Vec<bool>,
    /// Per layer: its locret ordinal (the column block of its KV heads in a
    /// token's score row).
    ordinal: Vec<usize>,
    n_scoring: usize,
    /// Floats per token score row: locret layers x KV heads.
    width: usize,
    n_q_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// q/k rows in llama.cpp's interleaved-RoPE order (GGUF converters
    /// permute Llama's q/k rows): un-permute to HF order before scoring.
    qk_interleaved: AtomicBool,
    ub: Mutex<Ubatch>,
    seqs: Mutex<HashMap<i32, SeqUnits>>,
    c: Counters,
    warned_unscored: AtomicBool,
}

impl LocretLlama {
    /// None when no layer runs locret. Errors: other sparse methods next to
    /// locret, locret layers that disagree on the eviction fields, weights
    /// that are missing or do not fit the model.
    pub fn new(cfg: &PolicyConfig) -> Result<Option<Self>> {
        let m = &cfg.model;
        let mut common: Option<(usize, LocretConfig)> = None;
        let mut heads = Vec::with_capacity(m.n_layers);
        for l in 0..m.n_layers {
            let LayerPolicy::Locret(c) = cfg.layer_policy(l) else {
                heads.push(None);
                continue;
            };
            match &common {
                None => common = Some((l, c.clone())),
                Some((l0, c0)) => {
                    let fields = [
                        ("budget", c.budget != c0.budget),
                        ("stabilizer", c.stabilizer != c0.stabilizer),
                        ("sink", c.sink != c0.sink),
                        ("keep_last", c.keep_last != c0.keep_last),
                        (
                            "stabilize_final_chunk",
                            c.stabilize_final_chunk != c0.stabilize_final_chunk,
                        ),
                        ("token_score", c.token_score != c0.token_score),
                    ];
                    if let Some((f, _)) = fields.iter().find(|x| x.1) {
                        return Err(Error::config(
                            format!("layer {l} locret.{f}"),
                            format!("differs from layer {l0}'s: llama.cpp evicts whole tokens (cells shared by all layers), so every locret layer must use the same budget, stabilizer, sink, keep_last, stabilize_final_chunk and token_score"),
                        ));
                    }
                }
            }
            if c.renumber_positions {
                return Err(Error::config(
                    format!("layer {l} locret.renumber_positions"),
                    "not supported (llama.cpp keeps its positions)",
                ));
            }
            if c.keep_last > c.stabilizer || c.budget == 0 {
                return Err(Error::config(
                    format!("layer {l} locret"),
                    format!(
                        "need budget > 0 and keep_last <= stabilizer, got budget {}, keep_last {}, stabilizer {}",
                        c.budget, c.keep_last, c.stabilizer
                    ),
                ));
            }
            let Some(path) = c.weights.as_deref() else {
                return Err(Error::config(
                    format!("layer {l} locret.weights"),
                    "locret needs a retaining-head safetensors file",
                ));
            };
            let head =
                RetainingHead::load(std::path::Path::new(path), m, c.hidden, l).map_err(|e| {
                    Error::config(format!("layer {l} locret.weights ({path})"), e.to_string())
                })?;
            heads.push(Some(Arc::new(head)));
        }
        let Some((_, cfg0)) = common else {
            return Ok(None);
        };
        for l in 0..m.n_layers {
            let method = cfg.layer_policy(l).method();
            if method != "dense" && method != "locret" {
                return Err(Error::config(
                    format!("layer {l} method"),
                    format!("`{method}` next to locret layers: locret evicts llama.cpp cells shared by every layer, and cells then leave position order, which the other sparse methods' selection over cell order assumes; use dense or locret for every layer"),
                ));
            }
        }
        let n_scoring = heads.iter().filter(|h| h.is_some()).count();
        let locret_layers: Vec<bool> = heads.iter().map(|h| h.is_some()).collect();
        let ordinal = locret_layers
            .iter()
            .scan(0, |n, &on| {
                *n += on as usize;
                Some(*n - on as usize)
            })
            .collect();
        Ok(Some(LocretLlama {
            cfg: cfg0,
            heads: RwLock::new(heads),
            locret_layers,
            ordinal,
            n_scoring,
            width: n_scoring * m.n_kv_heads,
            n_q_heads: m.n_q_heads,
            n_kv_heads: m.n_kv_heads,
            head_dim: m.head_dim,
            qk_interleaved: AtomicBool::new(false),
            ub: Mutex::new(Ubatch::default()),
            seqs: Mutex::new(HashMap::new()),
            c: Counters::default(),
            warned_unscored: AtomicBool::new(false),
        }))
    }

    pub fn config(&self) -> &LocretConfig {
        &self.cfg
    }

    pub fn is_locret_layer(&self, layer: u32) -> bool {
        self.locret_layers
            .get(layer as usize)
            .copied()
            .unwrap_or(false)
    }

    pub fn set_qk_interleaved(&self, on: bool) {
        self.qk_interleaved.store(on, Ordering::Relaxed);
    }

    /// Held positions of `seq`, ascending (tests, diagnostics).
    pub fn held_positions(&self, seq: i32) -> Vec<i32> {
        let seqs = self.seqs.lock().unwrap_or_else(|e| e.into_inner());
        seqs.get(&seq)
            .map(|s| s.units.iter().map(|u| u.pos).collect())
            .unwrap_or_default()
    }

    /// Held units of `seq` with the scores an eviction would use now
    /// (tests, diagnostics).
    pub fn held_units(&self, seq: i32) -> Vec<Unit> {
        let seqs = self.seqs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = seqs.get(&seq) else {
            return Vec::new();
        };
        let mut units = s.units.clone();
        let scores = token_scores(self.cfg.token_score, &s.rows, self.width);
        for (u, x) in units.iter_mut().zip(scores) {
            u.score = x;
        }
        units
    }

    /// Held units' raw score rows of `seq`, `width` floats per unit in
    /// position order: column `o * n_kv_heads + h` is KV head h of the
    /// `o`-th locret layer (tests, diagnostics).
    pub fn held_rows(&self, seq: i32) -> Vec<f32> {
        let seqs = self.seqs.lock().unwrap_or_else(|e| e.into_inner());
        seqs.get(&seq).map(|s| s.rows.clone()).unwrap_or_default()
    }

    /// Scores of layer `layer` for tokens `t0..t1` of the ubatch: the
    /// retaining head on pre-RoPE q `[d, n_q_heads, n_tokens]`, k and v
    /// `[d, n_kv_heads, n_tokens]` (ggml views, F32 or F16). `out` gets
    /// `(t1 - t0) x n_kv_heads` scores, token-major.
    #[allow(clippy::too_many_arguments)]
    pub fn head_scores(
        &self,
        layer: u32,
        q: &View<'_>,
        k: &View<'_>,
        v: &View<'_>,
        t0: usize,
        t1: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let head = self.head(layer)?;
        let (d, nq, nkv) = (self.head_dim, self.n_q_heads, self.n_kv_heads);
        let n = q.ne[2];
        let want = |x: &View<'_>, heads: usize| {
            x.ne[0] == d && x.ne[1] == heads && x.ne[2] == n && x.ne[3] == 1
        };
        if !want(q, nq) || !want(k, nkv) || !want(v, nkv) {
            return Err(Error::shape(
                format!("locret layer {layer} pre-RoPE q/k/v"),
                format!("q [{d}, {nq}, n, 1], k and v [{d}, {nkv}, n, 1]"),
                format!("q {:?}, k {:?}, v {:?}", q.ne, k.ne, v.ne),
            ));
        }
        if t0 > t1 || t1 > n || out.len() != (t1 - t0) * nkv {
            return Err(Error::shape(
                "locret token range/out",
                format!("tokens within 0..{n}, out = tokens x {nkv} KV heads"),
                format!("{t0}..{t1}, out {}", out.len()),
            ));
        }
        let nt = t1 - t0;
        if nt == 0 {
            return Ok(());
        }
        let (qs, ks, vs) = self.gather_hf(q, k, v, t0, t1);
        let s = head.scores_serial(&qs, &ks, &vs)?;
        if s.len() != out.len() || s.iter().any(|x| x.is_nan()) {
            return Err(Error::Invalid(format!(
                "locret layer {layer}: retaining-head score is NaN (non-finite q/k/v?) or {} scores for {} slots",
                s.len(),
                out.len()
            )));
        }
        out.copy_from_slice(&s);
        Ok(())
    }

    /// Tokens `t0..t1` of the pre-RoPE views as the core's `[n][heads][d]`
    /// f32 in HF order: llama.cpp's interleaved-RoPE rows 2i + j hold HF's
    /// row j * d/2 + i (the GGUF converter's permute).
    fn gather_hf(
        &self,
        q: &View<'_>,
        k: &View<'_>,
        v: &View<'_>,
        t0: usize,
        t1: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (d, nt) = (self.head_dim, t1 - t0);
        let gather = |x: &View<'_>, heads: usize, unperm: bool| -> Vec<f32> {
            let mut o = vec![0f32; nt * heads * d];
            for t in 0..nt {
                for h in 0..heads {
                    let dst = &mut o[(t * heads + h) * d..(t * heads + h + 1) * d];
                    for (e, y) in dst.iter_mut().enumerate() {
                        let src = if unperm {
                            2 * (e % (d / 2)) + e / (d / 2)
                        } else {
                            e
                        };
                        *y = x.get(x.idx(src, h, t0 + t, 0));
                    }
                }
            }
            o
        };
        let unperm = self.qk_interleaved.load(Ordering::Relaxed) && d.is_multiple_of(2);
        (
            gather(q, self.n_q_heads, unperm),
            gather(k, self.n_kv_heads, unperm),
            gather(v, self.n_kv_heads, false),
        )
    }

    fn head(&self, layer: u32) -> Result<Arc<RetainingHead>> {
        if !self.is_locret_layer(layer) {
            return Err(Error::Invalid(format!(
                "layer {layer} has no retaining head"
            )));
        }
        let heads = self.heads.read().unwrap_or_else(|e| e.into_inner());
        heads[layer as usize].clone().ok_or_else(|| {
            Error::Invalid(format!(
                "layer {layer}: retaining head released (the ggml graph holds it: LLAMA_INFINITEHIP_LOCRET_SCORING=ggml)"
            ))
        })
    }

    /// Drop the f32 retaining heads once the ggml graph holds copies (one
    /// copy of fc1 per locret layer, 25 MB at the Llama-3.1-8B shape):
    /// the Rust scoring op, check mode and `graph_fc1/fc2` then fail.
    pub fn release_heads(&self) {
        let mut heads = self.heads.write().unwrap_or_else(|e| e.into_inner());
        heads.iter_mut().for_each(|h| *h = None);
    }

    /// The ubatch in flight holds only decoded tokens (nothing to score).
    pub fn ubatch_decoded(&self) -> bool {
        let ub = self.ub.lock().unwrap_or_else(|e| e.into_inner());
        !ub.pos.is_empty() && ub.decoded.iter().all(|&d| d)
    }

    /// Layer `layer`'s fc1 for a ggml graph that feeds it llama.cpp's
    /// pre-RoPE rows as they are: `[hidden][in]` (ggml `[in, hidden]`) with
    /// the q and k columns of each head moved to llama.cpp's row order when
    /// `qk_interleaved` (column `h*d + 2i + j` = the core's `h*d + j*d/2 + i`),
    /// so `fc1_graph · x_llama = fc1 · x_hf` term by term.
    pub fn graph_fc1(&self, layer: u32, qk_interleaved: bool) -> Result<Vec<f32>> {
        let head = self.head(layer)?;
        let (d, input) = (self.head_dim, head.input_dim());
        let w = head.fc1();
        if !qk_interleaved || !d.is_multiple_of(2) {
            return Ok(w.to_vec());
        }
        let qk_cols = (self.n_q_heads + self.n_kv_heads) * d;
        let mut o = w.to_vec();
        for (src, dst) in w.chunks_exact(input).zip(o.chunks_exact_mut(input)) {
            for hd in (0..qk_cols).step_by(d) {
                for e in 0..d {
                    dst[hd + 2 * (e % (d / 2)) + e / (d / 2)] = src[hd + e];
                }
            }
        }
        Ok(o)
    }

    /// Layer `layer`'s fc2 `[n_kv_heads][hidden]` (ggml `[hidden, n_kv_heads]`).
    pub fn graph_fc2(&self, layer: u32) -> Result<Vec<f32>> {
        Ok(self.head(layer)?.fc2().to_vec())
    }

    /// Cells llama.cpp's mask shows the last query of each stream.
    fn count_visible(&self, m: &View<'_>, n: usize) {
        let n_stream = m.ne[3];
        if n_stream > 0 && n.is_multiple_of(n_stream) && m.ne[1] >= n / n_stream && n > 0 {
            let row = n / n_stream - 1;
            let mut most = 0u64;
            for s in 0..n_stream {
                let vis = (0..m.ne[0])
                    .filter(|&c| m.get(m.idx(c, row, 0, s)) != f32::NEG_INFINITY)
                    .count() as u64;
                most = most.max(vis);
            }
            self.c.max_visible_cells.fetch_max(most, Ordering::Relaxed);
            self.c.last_visible_cells.store(most, Ordering::Relaxed);
        }
    }

    /// Store one ubatch's retaining-head scores of layer `layer`, computed in
    /// the ggml graph (`s` `[n_kv_heads, n_tokens]`), in the ubatch's score
    /// rows, as the Rust scoring op does; `mask` counts
    /// live cells. One call per layer and ubatch (one thread). Without `s`
    /// (decode steps: nothing to score) only the cells are counted.
    pub fn record_op(
        &self,
        layer: u32,
        s: Option<&View<'_>>,
        mask: Option<&View<'_>>,
    ) -> Result<()> {
        if !self.is_locret_layer(layer) {
            return Err(Error::Invalid(format!(
                "layer {layer} has no retaining head"
            )));
        }
        let Some(s) = s else {
            if let Some(m) = mask {
                let n = self.ub.lock().unwrap_or_else(|e| e.into_inner()).pos.len();
                self.count_visible(m, n);
            }
            return Ok(());
        };
        let (nkv, n) = (self.n_kv_heads, s.ne[1]);
        if s.ne[0] != nkv || s.ne[2] != 1 || s.ne[3] != 1 {
            return Err(Error::shape(
                format!("locret layer {layer} graph scores"),
                format!("[{nkv}, n_tokens, 1, 1]"),
                format!("{:?}", s.ne),
            ));
        }
        if let Some(m) = mask {
            self.count_visible(m, n);
        }
        let mut ub = self.ub.lock().unwrap_or_else(|e| e.into_inner());
        if ub.pos.len() != n {
            return Err(Error::Invalid(format!(
                "locret layer {layer}: graph scores for {n} tokens, but the ubatch in flight has {} (llama_ihip_ubatch_begin not called for it?)",
                ub.pos.len()
            )));
        }
        let (w, c0) = (self.width, self.ordinal[layer as usize] * nkv);
        for t in 0..n {
            if ub.decoded[t] {
                continue;
            }
            for h in 0..nkv {
                let x = s.get(s.idx(h, t, 0, 0));
                if x.is_nan() {
                    return Err(Error::Invalid(format!(
                        "locret layer {layer}: retaining-head score is NaN (non-finite q/k/v?)"
                    )));
                }
                ub.scores[t * w + c0 + h] = x;
            }
        }
        if let Some(x) = ub.scored.get_mut(layer as usize) {
            *x = true;
        }
        self.c.graph_scorings.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Check mode: compare the graph's scores `s` `[n_kv_heads, n_tokens]`
    /// with the core's f64 reference (`RetainingHead::scores_f64_reference`)
    /// on the same pre-RoPE q/k/v; the largest relative error
    /// `|s - ref| / max(|ref|, 1)` goes to the stats (`check_max_rel_err`,
    /// infinite for a NaN).
    pub fn check_op(
        &self,
        layer: u32,
        s: &View<'_>,
        q: &View<'_>,
        k: &View<'_>,
        v: &View<'_>,
    ) -> Result<()> {
        let head = self.head(layer)?;
        let (nkv, n) = (self.n_kv_heads, s.ne[1]);
        if s.ne[0] != nkv || q.ne[2] != n || k.ne[2] != n || v.ne[2] != n {
            return Err(Error::shape(
                format!("locret layer {layer} check"),
                format!("scores [{nkv}, n], q/k/v over n tokens"),
                format!(
                    "scores {:?}, q {:?}, k {:?}, v {:?}",
                    s.ne, q.ne, k.ne, v.ne
                ),
            ));
        }
        let (qs, ks, vs) = self.gather_hf(q, k, v, 0, n);
        let r = head.scores_f64_reference(&qs, &ks, &vs)?;
        let mut worst = 0f64;
        for t in 0..n {
            for h in 0..nkv {
                let (x, y) = (s.get(s.idx(h, t, 0, 0)) as f64, r[t * nkv + h]);
                let e = (x - y).abs() / y.abs().max(1.0);
                worst = if e.is_nan() {
                    f64::INFINITY
                } else {
                    worst.max(e)
                };
            }
        }
        // Non-negative f64 bit patterns order as the values.
        self.c
            .check_max_rel_err
            .fetch_max(worst.to_bits(), Ordering::Relaxed);
        self.c
            .check_scores
            .fetch_add((n * nkv) as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The scoring op's work for ggml thread `ith` of `nth`: score its share
    /// of the ubatch's tokens into the ubatch's score rows; thread
    /// 0 also counts the cells llama.cpp's mask shows the last query of each
    /// stream.
    #[allow(clippy::too_many_arguments)]
    pub fn score_op(
        &self,
        layer: u32,
        q: &View<'_>,
        k: &View<'_>,
        v: &View<'_>,
        mask: Option<&View<'_>>,
        ith: usize,
        nth: usize,
    ) -> Result<()> {
        let n = q.ne[2];
        if ith == 0 {
            if let Some(m) = mask {
                self.count_visible(m, n);
            }
            self.c.rust_op_scorings.fetch_add(1, Ordering::Relaxed);
        }
        let nth = nth.max(1);
        let (t0, t1) = (n * ith / nth, n * (ith + 1) / nth);
        let todo: Vec<usize> = {
            let ub = self.ub.lock().unwrap_or_else(|e| e.into_inner());
            if ub.pos.len() != n {
                return Err(Error::Invalid(format!(
                    "locret layer {layer}: scoring op over {n} tokens, but the ubatch in flight has {} (llama_ihip_ubatch_begin not called for it?)",
                    ub.pos.len()
                )));
            }
            (t0..t1).filter(|&t| !ub.decoded[t]).collect()
        };
        // Score the contiguous runs of prompt tokens (decoded ones are pinned).
        let nkv = self.n_kv_heads;
        let mut got: Vec<(usize, Vec<f32>)> = Vec::new();
        let mut i = 0;
        while i < todo.len() {
            let mut j = i + 1;
            while j < todo.len() && todo[j] == todo[j - 1] + 1 {
                j += 1;
            }
            let (a, b) = (todo[i], todo[j - 1] + 1);
            let mut s = vec![0f32; (b - a) * nkv];
            self.head_scores(layer, q, k, v, a, b, &mut s)?;
            got.push((a, s));
            i = j;
        }
        let (w, c0) = (self.width, self.ordinal[layer as usize] * nkv);
        let mut ub = self.ub.lock().unwrap_or_else(|e| e.into_inner());
        for (a, s) in got {
            for (dt, row) in s.chunks_exact(nkv).enumerate() {
                let o = (a + dt) * w + c0;
                ub.scores[o..o + nkv].copy_from_slice(row);
            }
        }
        if let Some(x) = ub.scored.get_mut(layer as usize) {
            *x = true;
        }
        Ok(())
    }

    /// Before llama.cpp processes a ubatch: fold the previous ubatch's tokens
    /// into their sequences, run the evictions the sequences of this ubatch
    /// owe, and start this ubatch. `pos[t]`, `n_seq[t]` and the flattened
    /// `seq_ids` describe its tokens. Returns the cells to remove as flat
    /// `(seq, p0, p1)` triples for `llama_memory_seq_rm`.
    pub fn begin(&self, pos: &[i32], n_seq: &[u32], seq_ids: &[i32]) -> Result<Vec<i32>> {
        let n = pos.len();
        if n_seq.len() != n || n_seq.iter().map(|&x| x as usize).sum::<usize>() != seq_ids.len() {
            return Err(Error::shape(
                "locret ubatch (pos, n_seq, seq_ids)",
                format!("{n} tokens, n_seq per token summing to seq_ids"),
                format!("pos {n}, n_seq {}, seq_ids {}", n_seq.len(), seq_ids.len()),
            ));
        }
        let mut ub = self.ub.lock().unwrap_or_else(|e| e.into_inner());
        let mut seqs = self.seqs.lock().unwrap_or_else(|e| e.into_inner());
        self.fold(&mut ub, &mut seqs);

        // This ubatch's tokens per sequence.
        let mut per_seq: HashMap<i32, (usize, i32)> = HashMap::new(); // count, min pos
        let mut tok_seqs = Vec::with_capacity(n);
        let mut o = 0;
        for t in 0..n {
            let ids = seq_ids[o..o + n_seq[t] as usize].to_vec();
            o += n_seq[t] as usize;
            for &s in &ids {
                let e = per_seq.entry(s).or_insert((0, i32::MAX));
                e.0 += 1;
                e.1 = e.1.min(pos[t]);
            }
            tok_seqs.push(ids);
        }
        let mut order: Vec<i32> = per_seq.keys().copied().collect();
        order.sort_unstable();
        let mut decode_seq: HashMap<i32, bool> = HashMap::new();
        let mut rm = Vec::new();
        for s in order {
            let (count, pmin) = per_seq[&s];
            let st = seqs.entry(s).or_default();
            // Rewound: drop what the new tokens replace.
            let keep = st.units.partition_point(|u| u.pos < pmin);
            if keep < st.units.len() {
                st.truncate(keep, self.width);
                self.c.rewinds.fetch_add(1, Ordering::Relaxed);
            }
            let decode = count == 1 && !st.units.is_empty();
            decode_seq.insert(s, decode);
            if !st.pending {
                continue;
            }
            st.pending = false;
            if decode {
                // Prompt done: pin its last keep_last positions.
                let last = st.units.last().map_or(0, |u| u.pos);
                let from = last
                    .saturating_add(1)
                    .saturating_sub(self.cfg.keep_last as i32);
                for u in st.units.iter_mut().rev() {
                    if u.pos < from {
                        break;
                    }
                    u.pinned = true;
                }
            }
            st.rescore(self.cfg.token_score, self.width);
            let (ev, short) = choose_evictions(&st.units, &self.cfg, decode);
            if short {
                self.c.budget_short.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    seq = s,
                    held = st.units.len(),
                    budget = self.cfg.budget,
                    "locret: protected units (sink, stabilizer, pinned) exceed the budget; keeping them"
                );
            }
            if ev.is_empty() {
                continue;
            }
            let gone: Vec<i32> = ev.iter().map(|&i| st.units[i].pos).collect();
            let mut drop = vec![false; st.units.len()];
            for &i in &ev {
                drop[i] = true;
            }
            let mut i = 0;
            st.units.retain(|_| {
                i += 1;
                !drop[i - 1]
            });
            let w = self.width;
            let mut i = 0;
            st.rows.retain(|_| {
                i += 1;
                !drop[(i - 1) / w]
            });
            for (p0, p1) in runs(&gone) {
                rm.extend([s, p0, p1]);
            }
            self.c.evictions.fetch_add(1, Ordering::Relaxed);
            self.c
                .evicted_tokens
                .fetch_add(gone.len() as u64, Ordering::Relaxed);
            self.c
                .max_held
                .fetch_max(st.units.len() as u64, Ordering::Relaxed);
            tracing::debug!(
                seq = s,
                evicted = gone.len(),
                held = st.units.len(),
                final_chunk = decode,
                "locret eviction"
            );
        }
        self.c
            .seq_rm_calls
            .fetch_add((rm.len() / 3) as u64, Ordering::Relaxed);
        let decoded = tok_seqs
            .iter()
            .map(|ids| !ids.is_empty() && ids.iter().all(|s| decode_seq[s]))
            .collect();
        *ub = Ubatch {
            pos: pos.to_vec(),
            seqs: tok_seqs,
            decoded,
            scores: vec![f32::NEG_INFINITY; n * self.width],
            scored: vec![false; self.locret_layers.len()],
        };
        self.c.ubatches.fetch_add(1, Ordering::Relaxed);
        Ok(rm)
    }

    /// The previous ubatch's tokens join their sequences.
    fn fold(&self, ub: &mut Ubatch, seqs: &mut HashMap<i32, SeqUnits>) {
        if ub.pos.is_empty() {
            return;
        }
        let has_prompt = ub.decoded.iter().any(|d| !d);
        let scored = ub.scored.iter().filter(|&&x| x).count();
        let complete = scored == self.n_scoring;
        if has_prompt && !complete {
            self.c.unscored_ubatches.fetch_add(1, Ordering::Relaxed);
            if !self.warned_unscored.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    scored,
                    locret_layers = self.n_scoring,
                    "locret: not every locret layer scored a ubatch (attention path without the scoring hook?); its tokens are kept (not evicted)"
                );
            }
        }
        let w = self.width;
        let unscored = vec![f32::INFINITY; w];
        for t in 0..ub.pos.len() {
            let pinned = ub.decoded[t];
            let (score, row) = if pinned || !complete {
                (f32::INFINITY, &unscored[..])
            } else {
                // Rescored from the rows at the next eviction.
                (f32::NAN, &ub.scores[t * w..(t + 1) * w])
            };
            if !pinned && complete {
                self.c.scored_tokens.fetch_add(1, Ordering::Relaxed);
            }
            for &s in &ub.seqs[t] {
                let st = seqs.entry(s).or_default();
                let u = Unit {
                    pos: ub.pos[t],
                    score,
                    pinned,
                };
                // Keep position order (ubatch tokens of one sequence ascend).
                let at = st.units.partition_point(|x| x.pos < u.pos);
                if st.units.get(at).is_some_and(|x| x.pos == u.pos) {
                    st.units[at] = u;
                    st.rows[at * w..(at + 1) * w].copy_from_slice(row);
                } else {
                    st.units.insert(at, u);
                    st.rows.splice(at * w..at * w, row.iter().copied());
                }
                if !pinned {
                    st.pending = true;
                }
                self.c
                    .max_held
                    .fetch_max(st.units.len() as u64, Ordering::Relaxed);
            }
        }
        *ub = Ubatch::default();
    }

    pub fn stats(&self) -> serde_json::Value {
        let c = &self.c;
        let l = |x: &AtomicU64| x.load(Ordering::Relaxed);
        serde_json::json!({
            "budget": self.cfg.budget,
            "stabilizer": self.cfg.stabilizer,
            "sink": self.cfg.sink,
            "keep_last": self.cfg.keep_last,
            "token_score": self.cfg.token_score,
            "scoring_layers": self.n_scoring,
            "ubatches": l(&c.ubatches),
            "scored_tokens": l(&c.scored_tokens),
            "evictions": l(&c.evictions),
            "evicted_tokens": l(&c.evicted_tokens),
            "seq_rm_calls": l(&c.seq_rm_calls),
            "budget_short": l(&c.budget_short),
            "unscored_ubatches": l(&c.unscored_ubatches),
            "rewinds": l(&c.rewinds),
            "max_held": l(&c.max_held),
            "max_visible_cells": l(&c.max_visible_cells),
            "last_visible_cells": l(&c.last_visible_cells),
            "graph_scorings": l(&c.graph_scorings),
            "rust_op_scorings": l(&c.rust_op_scorings),
            "check_scores": l(&c.check_scores),
            "check_max_rel_err": f64::from_bits(l(&c.check_max_rel_err)),
        })
    }
}

/// Check a `TensorDesc` + bytes as a view (error names `what`).
pub(crate) fn view<'a>(bytes: &'a [u8], d: &TensorDesc, what: &str) -> Result<View<'a>> {
    View::new(bytes, d, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_unit_is_never_evicted() {
        let cfg = LocretConfig {
            budget: 2,
            stabilizer: 0,
            keep_last: 0,
            stabilize_final_chunk: false,
            ..LocretConfig::default()
        };
        // The newest unit has the lowest score.
        let units: Vec<Unit> = (0..6)
            .map(|p| Unit {
                pos: p,
                score: 10.0 - p as f32,
                pinned: false,
            })
            .collect();
        for final_chunk in [false, true] {
            let (ev, short) = choose_evictions(&units, &cfg, final_chunk);
            assert_eq!(ev, vec![1, 2, 3, 4]);
            assert!(!short);
        }
    }

    #[test]
    fn runs_group_consecutive_positions() {
        assert_eq!(runs(&[1, 2, 3, 7, 9, 10]), vec![(1, 4), (7, 8), (9, 11)]);
        assert!(runs(&[]).is_empty());
    }
}
