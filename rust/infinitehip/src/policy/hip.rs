//! InfiniteHiP hierarchical pruning (arXiv 2502.08910).
//!
//! Per query block and KV head, the context splits into sink, middle and
//! window. Sink and window are always attended. The middle goes through
//! stages: stage i cuts its candidates into chunks of `chunk_size`, scores
//! each chunk by a representative key and keeps the best `keep_tokens`.
//!
//! Representative search (as the authors' kernel does): inside [l, r) probe
//! the centre key of each half, follow the half whose probe scores higher,
//! until one key is left; its score is the chunk's score. A probe's score is
//! the max over the block's (strided) queries and the q heads of the GQA
//! group, so one mask serves the whole group. Ties go to the left half and,
//! among chunks, to the earlier chunk, so results are deterministic.
//!
//! With `per_q_head` (decode only) every q head runs the stages with its own
//! query and keeps its own budget: the decode selection then holds one range
//! list per q head (`Selection::q_head_ranges`). Prefill stays per group.
//!
//! Decode caches each stage's output per sequence and refreshes stage i every
//! `refresh_interval` steps (a refreshed stage also refreshes the later ones);
//! between refreshes new tokens are covered by the sliding window, and the
//! tokens that slid out of the window since the first stage last ran stay
//! selected (at most stage 1's refresh interval of them), so no token drops
//! out of the attention set between refreshes.

use std::collections::HashMap;
use std::ops::Range;

use super::{hip_fast, Phase, Policy, SelectOutput, SelectRequest, Selection};
use crate::config::{
    AsyncRefresh, DecodeStage0, HipConfig, HipStage, MaskEstimatorChoice, ModelShape, RopeMode,
};
use crate::dtype::max_dot_f32;
use crate::error::{Error, Result};
use crate::kv::KvRead;
use crate::parallel::par_map;
use crate::rope::{RelativeTable, Rope};

/// Scores keys against one query group (the queries of one KV head's group,
/// possibly several positions), optionally re-rotated for chunk-indexed RoPE.
struct Scorer<'a> {
    kv: &'a dyn KvRead,
    head: usize,
    /// `[n][d]` query vectors (all group heads of all scoring queries).
    qs: Vec<f32>,
    d: usize,
    rope: ScoreRope<'a>,
}

/// How stored keys move before scoring (DESIGN 3.1).
#[derive(Clone, Copy)]
enum ScoreRope<'a> {
    Original,
    /// Key t scores at its chunk index t / chunk.
    ChunkIndexed(&'a Rope, usize),
    /// Key t scores at t * scale (positions compressed into the trained
    /// length): rotated by t * factor, factor = scale - 1
    /// (`rope::relative_key_factor`).
    Relative(&'a Rope, f64),
    /// `Relative` through the step's shared table (decode): the same
    /// rotations bit for bit (`rope::RelativeTable`), no sin/cos per key.
    RelativeTable(&'a RelativeTable),
}

impl Scorer<'_> {
    #[inline]
    fn score(&self, t: usize) -> f32 {
        // A buffer just large enough: zeroing 2 KB per scored key showed in
        // the profile of token-level stages.
        if self.d <= 128 {
            self.score_in(t, &mut [0f32; 128][..self.d])
        } else {
            self.score_in(t, &mut [0f32; 512][..self.d])
        }
    }

    #[inline(always)]
    fn score_in(&self, t: usize, k: &mut [f32]) -> f32 {
        self.kv.read_key(self.head, t, k);
        // Stored keys are rotated at t; move them to their scoring position.
        match self.rope {
            ScoreRope::Original => {}
            ScoreRope::ChunkIndexed(rope, chunk) => rope.rotate(k, (t / chunk) as f64 - t as f64),
            ScoreRope::Relative(rope, factor) => rope.rotate(k, t as f64 * factor),
            ScoreRope::RelativeTable(table) => table.rotate(k, t),
        }
        max_dot_f32(&self.qs, k)
    }

    /// Score of chunk [l, r) by hierarchical representative search: the
    /// one-chunk reference that `chunk_scores` must match.
    #[cfg_attr(not(test), allow(dead_code))]
    fn chunk_score(&self, mut l: usize, mut r: usize) -> f32 {
        debug_assert!(l < r);
        if r - l == 1 {
            return self.score(l);
        }
        let mut best = f32::NEG_INFINITY;
        while r - l > 1 {
            let m = (l + r) / 2;
            let (sl, sr) = (self.score((l + m) / 2), self.score((m + r) / 2));
            if sl >= sr {
                r = m;
                best = sl;
            } else {
                l = m;
                best = sr;
            }
        }
        best
    }
}

/// Chunks advanced together, level by level, so their probe loads overlap.
const SEARCH_GROUP: usize = 16;

impl Scorer<'_> {
    /// `chunk_score` for many chunks at once: the same search, but each
    /// level's probe rows of a whole group are prefetched before any is
    /// scored (the loads are independent across chunks; within one chunk
    /// each level depends on the last).
    fn chunk_scores(&self, chunks: &[Range<usize>]) -> Vec<f32> {
        let mut out = vec![f32::NEG_INFINITY; chunks.len()];
        for (g0, group) in chunks.chunks(SEARCH_GROUP).enumerate() {
            let mut lr: Vec<(usize, usize)> = group.iter().map(|c| (c.start, c.end)).collect();
            let best = &mut out[g0 * SEARCH_GROUP..g0 * SEARCH_GROUP + group.len()];
            // Single-token chunks (token-level stages) are scored straight
            // away: their key rows are prefetched one group ahead.
            if g0 == 0 {
                for c in group.iter().filter(|c| c.len() == 1) {
                    self.kv.prefetch_key(self.head, c.start);
                }
            }
            let next = &chunks[((g0 + 1) * SEARCH_GROUP).min(chunks.len())
                ..((g0 + 2) * SEARCH_GROUP).min(chunks.len())];
            for c in next.iter().filter(|c| c.len() == 1) {
                self.kv.prefetch_key(self.head, c.start);
            }
            for (i, &(l, r)) in lr.iter().enumerate() {
                if r - l == 1 {
                    best[i] = self.score(l);
                }
            }
            loop {
                let mut active = false;
                for &(l, r) in &lr {
                    if r - l > 1 {
                        let m = (l + r) / 2;
                        self.kv.prefetch_key(self.head, (l + m) / 2);
                        self.kv.prefetch_key(self.head, (m + r) / 2);
                        active = true;
                    }
                }
                if !active {
                    break;
                }
                for (i, lr) in lr.iter_mut().enumerate() {
                    let (l, r) = *lr;
                    if r - l <= 1 {
                        continue;
                    }
                    let m = (l + r) / 2;
                    let (sl, sr) = (self.score((l + m) / 2), self.score((m + r) / 2));
                    if sl >= sr {
                        *lr = (l, m);
                        best[i] = sl;
                    } else {
                        *lr = (m, r);
                        best[i] = sr;
                    }
                }
            }
        }
        out
    }
}

/// Split sorted candidate ranges into chunks of `chunk` tokens (a range's last
/// chunk may be shorter), score them, keep the top `keep_tokens / chunk`.
fn run_stage(scorer: &Scorer<'_>, cands: &[Range<usize>], stage: &HipStage) -> Vec<Range<usize>> {
    run_stage_with(cands, stage, |chunks| scorer.chunk_scores(chunks))
}

/// `run_stage` with any chunk scorer (`score` gets every chunk, in order,
/// and returns one score each): the selection rule both estimators share.
pub(super) fn run_stage_with(
    cands: &[Range<usize>],
    stage: &HipStage,
    score: impl FnOnce(&[Range<usize>]) -> Vec<f32>,
) -> Vec<Range<usize>> {
    let c = stage.chunk_size;
    let chunks = stage_chunks(cands, c);
    let n_keep = stage.keep_tokens / c;
    if chunks.len() <= n_keep {
        return cands.to_vec();
    }
    let mut scored: Vec<(f32, usize)> = score(&chunks).into_iter().zip(0..).collect();
    debug_assert_eq!(scored.len(), chunks.len());
    // Higher score first; NaN scores sort last; ties by position.
    let key = |a: &(f32, usize), b: &(f32, usize)| {
        let (sa, sb) = (
            if a.0.is_nan() { f32::NEG_INFINITY } else { a.0 },
            if b.0.is_nan() { f32::NEG_INFINITY } else { b.0 },
        );
        sb.total_cmp(&sa).then(a.1.cmp(&b.1))
    };
    scored.select_nth_unstable_by(n_keep - 1, key);
    let mut kept: Vec<usize> = scored[..n_keep].iter().map(|x| x.1).collect();
    kept.sort_unstable();
    let mut out: Vec<Range<usize>> = kept.into_iter().map(|i| chunks[i].clone()).collect();
    super::normalize(&mut out);
    out
}

/// Sorted candidate ranges cut into chunks of `c` tokens (a range's last
/// chunk may be shorter): what a stage scores.
fn stage_chunks(cands: &[Range<usize>], c: usize) -> Vec<Range<usize>> {
    let mut chunks: Vec<Range<usize>> = Vec::new();
    for r in cands {
        let mut s = r.start;
        while s < r.end {
            let e = r.end.min(s + c);
            chunks.push(s..e);
            s = e;
        }
    }
    chunks
}

/// Per list, the last stage's previous output, and the successors' range
/// (`stages_flat`).
type PrevLists<'a> = Option<(&'a [Vec<Range<usize>>], &'a Range<usize>)>;

/// Chunks per work item of `stages_flat`'s scoring.
const FLAT_BLOCK: usize = 512;

/// `cands` plus the `n` successors of every token of `prev` (a range a..b
/// adds a+1..b+n), clipped to `middle`: the last stage's candidates with
/// `hip.successors` = n (decode).
pub(crate) fn with_successors(
    mut cands: Vec<Range<usize>>,
    prev: &[Range<usize>],
    n: usize,
    middle: &Range<usize>,
) -> Vec<Range<usize>> {
    for r in prev {
        let (s, e) = ((r.start + 1).max(middle.start), (r.end + n).min(middle.end));
        if s < e {
            cands.push(s..e);
        }
    }
    super::normalize(&mut cands);
    cands
}

/// Sink, middle and window of a query block whose first query sits at
/// `p_first` (the window starts `window` tokens before it).
pub(crate) fn regions(
    cfg: &HipConfig,
    p_first: usize,
    p_last: usize,
) -> (Range<usize>, Range<usize>, Range<usize>) {
    let end = p_last + 1;
    let sink_end = cfg.sink.min(end);
    let win_start = (p_first + 1).saturating_sub(cfg.window).max(sink_end);
    (0..sink_end, sink_end..win_start, win_start..end)
}

/// Per-sequence decode cache: each stage's kept ranges per range list (KV
/// head, or q head with `per_q_head`).
#[derive(Default)]
struct DecodeState {
    step: usize,
    /// `stages[i][list]`: output of stage i at its last refresh.
    stages: Vec<Vec<Vec<Range<usize>>>>,
    /// Sequence length at the last step, to detect a restarted sequence.
    last_len: usize,
    /// End of the middle region when stage 1 last ran.
    mid_end: usize,
    /// `decode_stage0 = mean_key`: per KV head, the mean keys (`[n][d]`,
    /// bf16-rounded) of stage 0's chunks from `means_base`, computed once
    /// per chunk (a chunk's stored keys never change).
    means: Vec<Vec<f32>>,
    means_base: usize,
    /// `async_refresh = stage0`: stage 0's kept ranges per list, scored at
    /// the step before its refresh, and the end of the middle they cover.
    early0: Option<(Vec<Vec<Range<usize>>>, usize)>,
}

pub struct HipPolicy {
    cfg: HipConfig,
    rope: Option<Rope>,
    max_position: usize,
    states: HashMap<u64, DecodeState>,
    /// The last decode step ran a stage (profiling: `last_decode_refreshed`).
    last_refreshed: bool,
    /// Relative scoring in decode through the step's shared rotation table
    /// (default); off: `Rope::rotate` per scored key, the reference path
    /// (`INFINITEHIP_RELATIVE_TABLE=off`, or `set_relative_table`).
    relative_table: bool,
    /// Decode refreshes score every list's chunks as one parallel loop of
    /// blocks (`stages_flat`, default); off: one parallel item per list
    /// (`stages_from`, the reference path; `INFINITEHIP_HIP_FLAT=off`).
    flat_decode: bool,
}

impl HipPolicy {
    /// `model` gives head_dim, RoPE theta and the trained length that the
    /// RoPE modes need.
    pub fn new(cfg: HipConfig, model: &ModelShape) -> Result<Self> {
        let rope = match (cfg.rope.scoring, cfg.rope.attention) {
            (RopeMode::Original, RopeMode::Original) => None,
            _ => Some(Rope::new(model.head_dim, model.rope_theta)),
        };
        if matches!(cfg.rope.scoring, RopeMode::Streaming) {
            return Err(Error::config(
                "hip.rope.scoring",
                "streaming applies to attention only",
            ));
        }
        if matches!(
            cfg.rope.attention,
            RopeMode::ChunkIndexed | RopeMode::Relative
        ) {
            return Err(Error::config(
                "hip.rope.attention",
                "use original or streaming",
            ));
        }
        if cfg.mask_estimator == MaskEstimatorChoice::Fast && cfg.rope.scoring != RopeMode::Original
        {
            return Err(Error::config(
                "hip.mask_estimator",
                "fast scores stored keys as they are: needs rope.scoring original",
            ));
        }
        Ok(HipPolicy {
            cfg,
            rope,
            max_position: model.max_position,
            states: HashMap::new(),
            last_refreshed: false,
            relative_table: std::env::var("INFINITEHIP_RELATIVE_TABLE")
                .map_or(true, |v| v != "off"),
            flat_decode: std::env::var("INFINITEHIP_HIP_FLAT").map_or(true, |v| v != "off"),
        })
    }

    /// The RoPE table when attention uses streaming positions.
    pub fn streaming_rope(&self) -> Option<&Rope> {
        (self.cfg.rope.attention == RopeMode::Streaming)
            .then(|| self.rope.as_ref())
            .flatten()
    }

    pub fn config(&self) -> &HipConfig {
        &self.cfg
    }

    /// Relative scoring in decode through the shared rotation table (on by
    /// default) or key by key (the reference path): the same selections.
    #[doc(hidden)]
    pub fn set_relative_table(&mut self, on: bool) {
        self.relative_table = on;
    }

    /// Decode refreshes through `stages_flat` (on by default) or one
    /// parallel item per list (the reference path): the same selections.
    #[doc(hidden)]
    pub fn set_flat_decode(&mut self, on: bool) {
        self.flat_decode = on;
    }

    /// The step's relative-scoring table (decode at `q_pos` beyond the
    /// trained length, keys below `len`), when that path is on.
    fn decode_table(&self, q_pos: usize, len: usize) -> Option<std::sync::Arc<RelativeTable>> {
        if !self.relative_table || self.cfg.rope.scoring != RopeMode::Relative {
            return None;
        }
        let factor = crate::rope::relative_key_factor(q_pos, self.max_position)?;
        self.rope.as_ref()?.relative_table(factor, len)
    }

    /// Gather the scoring queries of KV head `h` from queries `q_lo..q_hi`
    /// (`[n][n_q_heads][d]`), every `stride`-th one plus the last.
    fn group_queries(
        req: &SelectRequest<'_>,
        h: usize,
        q_lo: usize,
        q_hi: usize,
        stride: usize,
    ) -> Vec<f32> {
        let (g, d, qe) = (req.shape.group(), req.shape.head_dim, req.shape.q_elems());
        let mut idx: Vec<usize> = (q_lo..q_hi).step_by(stride).collect();
        if idx.last() != Some(&(q_hi - 1)) {
            idx.push(q_hi - 1);
        }
        let mut out = Vec::with_capacity(idx.len() * g * d);
        for i in idx {
            out.extend_from_slice(&req.queries[i * qe + h * g * d..i * qe + (h + 1) * g * d]);
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn scorer<'a>(
        &'a self,
        kv: &'a dyn KvRead,
        head: usize,
        mut qs: Vec<f32>,
        d: usize,
        stage: &HipStage,
        middle_end: usize,
        q_pos: usize,
        table: Option<&'a RelativeTable>,
    ) -> Scorer<'a> {
        // The query's shift and the keys' rule: `rope::score_query_shift`
        // (shared with the GPU decoder, backend/cuda/rope_gpu.rs).
        let mode = self.cfg.rope.scoring;
        let shift = crate::rope::score_query_shift(
            mode,
            q_pos,
            middle_end,
            stage.chunk_size,
            self.max_position,
        );
        let rope = match (&self.rope, shift) {
            (Some(r), Some(shift)) => {
                qs.chunks_exact_mut(d).for_each(|q| r.rotate(q, shift));
                match mode {
                    RopeMode::ChunkIndexed => ScoreRope::ChunkIndexed(r, stage.chunk_size),
                    // As the authors' scan kernel does beyond the trained
                    // length: the query sits at the last trained position
                    // and key positions shrink proportionally.
                    _ => {
                        let factor = crate::rope::relative_key_factor(q_pos, self.max_position)
                            .expect("relative shift implies the factor");
                        match table {
                            Some(t)
                                if t.factor().to_bits() == factor.to_bits()
                                    && t.len() >= middle_end =>
                            {
                                ScoreRope::RelativeTable(t)
                            }
                            _ => ScoreRope::Relative(r, factor),
                        }
                    }
                }
            }
            _ => ScoreRope::Original,
        };
        Scorer {
            kv,
            head,
            qs,
            d,
            rope,
        }
    }

    /// Run stages `from..` on `cands` for one head. `prev_last`: the last
    /// stage's output at its previous run (decode with `successors` > 0),
    /// whose successors join the last stage's candidates, clipped to the
    /// range given with it (the middle when the first stage last ran: the
    /// tokens that slid out of the window since then are attended anyway).
    #[allow(clippy::too_many_arguments)]
    fn stages_from(
        &self,
        req: &SelectRequest<'_>,
        head: usize,
        qs: &[f32],
        q_pos: usize,
        middle: &Range<usize>,
        from: usize,
        cands: Vec<Range<usize>>,
        prev_last: Option<(&[Range<usize>], &Range<usize>)>,
        table: Option<&RelativeTable>,
        mut keep: impl FnMut(usize, &[Range<usize>]),
    ) -> Vec<Range<usize>> {
        let d = req.shape.head_dim;
        let last = self.cfg.stages.len() - 1;
        let mut cur = cands;
        for (i, st) in self.cfg.stages.iter().enumerate().skip(from) {
            if i == last {
                if let Some((prev, succ_range)) = prev_last {
                    cur = with_successors(cur, prev, self.cfg.successors, succ_range);
                }
            }
            let sc = self.scorer(req.kv, head, qs.to_vec(), d, st, middle.end, q_pos, table);
            cur = run_stage(&sc, &cur, st);
            keep(i, &cur);
        }
        cur
    }

    /// `stages_from` for every list at once: per stage, the chunks of all
    /// lists are scored as one parallel loop over blocks of `FLAT_BLOCK`
    /// chunks (a decode step has only a few lists, e.g. 3 KV heads on 2
    /// threads), then each list keeps its best as `run_stage` does. A
    /// chunk's score does not depend on the blocking, so the selections are
    /// those of `stages_from`, bit for bit. `lists[u]`: (KV head, scoring
    /// queries); `cur[u]`: its candidates; `prev_last[u]`: its last stage's
    /// previous output (successors). Returns per list the output of every
    /// stage that ran.
    #[allow(clippy::too_many_arguments)]
    fn stages_flat(
        &self,
        req: &SelectRequest<'_>,
        lists: &[(usize, Vec<f32>)],
        q_pos: usize,
        middle: &Range<usize>,
        from: usize,
        mut cur: Vec<Vec<Range<usize>>>,
        prev_last: PrevLists<'_>,
        table: Option<&RelativeTable>,
    ) -> Vec<Vec<Vec<Range<usize>>>> {
        let d = req.shape.head_dim;
        let last = self.cfg.stages.len() - 1;
        let mut fresh: Vec<Vec<Vec<Range<usize>>>> = vec![Vec::new(); lists.len()];
        for (i, st) in self.cfg.stages.iter().enumerate().skip(from) {
            if i == last {
                if let Some((prev, succ_range)) = prev_last {
                    for (c, p) in cur.iter_mut().zip(prev) {
                        *c = with_successors(std::mem::take(c), p, self.cfg.successors, succ_range);
                    }
                }
            }
            let scorers: Vec<Scorer<'_>> = lists
                .iter()
                .map(|(h, qs)| self.scorer(req.kv, *h, qs.clone(), d, st, middle.end, q_pos, table))
                .collect();
            let chunks: Vec<Vec<Range<usize>>> =
                cur.iter().map(|c| stage_chunks(c, st.chunk_size)).collect();
            let n_keep = st.keep_tokens / st.chunk_size;
            let items: Vec<(usize, usize)> = chunks
                .iter()
                .enumerate()
                .filter(|(_, c)| c.len() > n_keep)
                .flat_map(|(u, c)| (0..c.len().div_ceil(FLAT_BLOCK)).map(move |b| (u, b)))
                .collect();
            let scored = par_map(items.len(), |j| {
                let (u, b) = items[j];
                let c = &chunks[u];
                scorers[u].chunk_scores(&c[b * FLAT_BLOCK..((b + 1) * FLAT_BLOCK).min(c.len())])
            });
            let mut scores: Vec<Vec<f32>> = vec![Vec::new(); lists.len()];
            for (&(u, _), sc) in items.iter().zip(scored) {
                scores[u].extend(sc);
            }
            for (u, c) in cur.iter_mut().enumerate() {
                let su = std::mem::take(&mut scores[u]);
                *c = run_stage_with(c, st, |ch| {
                    debug_assert_eq!(ch.len(), su.len());
                    su
                });
                fresh[u].push(c.clone());
            }
        }
        fresh
    }

    fn assemble(
        sink: &Range<usize>,
        mid: Vec<Range<usize>>,
        win: &Range<usize>,
    ) -> Vec<Range<usize>> {
        let mut rs = Vec::with_capacity(mid.len() + 2);
        rs.push(sink.clone());
        rs.extend(mid);
        rs.push(win.clone());
        super::normalize(&mut rs);
        rs
    }

    fn select_prefill(&self, req: &SelectRequest<'_>) -> Result<SelectOutput> {
        let n = req.n_queries();
        let qb = self.cfg.block_size_q;
        let hkv = req.shape.n_kv_heads;
        let n_blocks = n.div_ceil(qb);
        let fast = self.cfg.mask_estimator == MaskEstimatorChoice::Fast;
        // The fast estimator's stage-0 representatives, once per KV head for
        // every block of the call (the last block's middle reaches furthest).
        let reps: Vec<Vec<f32>> = if fast {
            let (_, mid, _) = regions(&self.cfg, req.q_start + n - 1, req.q_start + n - 1);
            let c0 = self.cfg.stages[0].chunk_size;
            par_map(hkv, |h| {
                hip_fast::representatives(req.kv, h, mid.start, c0, mid.len().div_ceil(c0))
            })
        } else {
            Vec::new()
        };
        let per = par_map(n_blocks * hkv, |item| {
            let (b, h) = (item / hkv, item % hkv);
            let (lo, hi) = (b * qb, ((b + 1) * qb).min(n));
            let (p_first, p_last) = (req.q_start + lo, req.q_start + hi - 1);
            let (sink, mid, win) = regions(&self.cfg, p_first, p_last);
            let qs = Self::group_queries(req, h, lo, hi, self.cfg.q_stride);
            let kept = if mid.is_empty() {
                vec![]
            } else if fast {
                hip_fast::select_middle(req.kv, h, &self.cfg.stages, &qs, &reps[h], mid.clone())
            } else {
                self.stages_from(
                    req,
                    h,
                    &qs,
                    p_last,
                    &mid,
                    0,
                    vec![mid.clone()],
                    None,
                    None,
                    |_, _| {},
                )
            };
            Self::assemble(&sink, kept, &win)
        });
        let blocks = per
            .chunks(hkv)
            .map(|heads| Selection {
                heads: heads.to_vec(),
            })
            .collect();
        Ok(SelectOutput {
            q_block: qb,
            blocks,
        })
    }

    /// Stage 0 of a decode refresh by cached chunk means
    /// (`decode_stage0 = mean_key`): per list, the chunks of `mid` kept by
    /// score max over the list's queries of q . mean (f32, `dot_f32`'s
    /// order, as the GPU decoder's `hip_score_mean`). Extends `st.means` by
    /// the chunks not yet averaged (every chunk of the middle is whole:
    /// validation asks window >= chunk_size).
    fn stage0_mean_key(
        &self,
        req: &SelectRequest<'_>,
        st: &mut DecodeState,
        lists: &[(usize, Vec<f32>)],
        mid: &Range<usize>,
    ) -> Vec<Vec<Range<usize>>> {
        let (hkv, d, len) = (req.shape.n_kv_heads, req.shape.head_dim, req.kv.len());
        let st0 = &self.cfg.stages[0];
        let c = st0.chunk_size;
        let n = mid.len().div_ceil(c);
        if st.means.len() != hkv || st.means_base != mid.start {
            st.means = vec![Vec::new(); hkv];
            st.means_base = mid.start;
        }
        // Only whole chunks are kept (a chunk cut by the cache's end would
        // change as tokens arrive; validation rules it out in decode).
        let whole = ((len.saturating_sub(mid.start)) / c).min(n);
        let from = (st.means[0].len() / d).min(whole);
        let fresh = par_map(hkv, |h| {
            hip_fast::representatives(req.kv, h, mid.start + from * c, c, n - from)
        });
        for (m, f) in st.means.iter_mut().zip(fresh) {
            m.truncate(from * d);
            m.extend_from_slice(&f);
        }
        let out = par_map(lists.len(), |u| {
            let (h, qs) = (&lists[u].0, &lists[u].1);
            let means = &st.means[*h];
            run_stage_with(std::slice::from_ref(mid), st0, |chunks| {
                chunks
                    .iter()
                    .map(|ch| {
                        let a = (ch.start - mid.start) / c;
                        max_dot_f32(qs, &means[a * d..(a + 1) * d])
                    })
                    .collect()
            })
        });
        // Drop the partial chunks again: only whole ones stay cached.
        for m in st.means.iter_mut() {
            m.truncate(whole * d);
        }
        out
    }

    fn select_decode(&mut self, req: &SelectRequest<'_>) -> Result<SelectOutput> {
        let (hkv, g, d) = (req.shape.n_kv_heads, req.shape.group(), req.shape.head_dim);
        // Range lists: one per KV head (scored by the max over its group's q
        // heads), or with `per_q_head` one per q head (scored by that head's
        // query alone, reading KV head u / g), each keeping the same budget.
        let per_q = self.cfg.per_q_head && g > 1;
        let lists = if per_q { req.shape.n_q_heads } else { hkv };
        let pos = req.q_start;
        let len = req.kv.len();
        let n_stages = self.cfg.stages.len();
        let mut st = self.states.remove(&req.seq).unwrap_or_default();
        if st.stages.len() != n_stages
            || st.stages.first().is_some_and(|s| s.len() != lists)
            || len <= st.last_len
        {
            // New or restarted sequence: recompute everything.
            st = DecodeState::default();
        }
        // The first stage due for refresh; later stages refresh with it.
        let from = if st.stages.is_empty() {
            0
        } else {
            (0..n_stages)
                .find(|&i| st.step % self.cfg.stages[i].refresh_interval == 0)
                .unwrap_or(n_stages)
        };
        let (sink, mid, win) = regions(&self.cfg, pos, pos);
        // `async_refresh`: this step attends the previous selection (the
        // last stage's ranges and the slid tokens since the stage 0 run
        // they came from); the refresh computed here is attended from the
        // next step on.
        let lagged = (self.cfg.async_refresh == AsyncRefresh::All
            && !st.stages.is_empty()
            && from < n_stages)
            .then(|| (st.stages[n_stages - 1].clone(), st.mid_end));
        // `async_refresh = stage0`: stage 0 as scored at the previous step
        // (over that step's middle), if it was.
        let early0 = if from == 0 { st.early0.take() } else { None };
        if from == 0 {
            st.mid_end = early0.as_ref().map_or(mid.end, |e| e.1);
        }
        // Tokens that left the window since stage 1 last ran.
        let slid = st.mid_end.max(mid.start)..mid.end;
        // Successors stay inside stage 1's middle (`slid` is attended anyway).
        let succ_range = mid.start..st.mid_end.clamp(mid.start, mid.end);
        // Relative scoring's key rotations for this step, shared by every
        // layer (built by the first one to ask).
        let table = if from < n_stages && !mid.is_empty() {
            self.decode_table(pos, mid.end)
        } else {
            None
        };
        let list_queries = |u: usize| -> (usize, Vec<f32>) {
            if per_q {
                (u / g, req.queries[u * d..(u + 1) * d].to_vec())
            } else {
                (u, Self::group_queries(req, u, 0, 1, 1))
            }
        };
        // Stage 0 by cached chunk means: run here, the search stages from 1.
        let stage0: Option<Vec<Vec<Range<usize>>>> = match early0 {
            Some((s0, _)) => Some(s0),
            None => {
                (from == 0 && self.cfg.decode_stage0 == DecodeStage0::MeanKey && !mid.is_empty())
                    .then(|| {
                        let heads: Vec<(usize, Vec<f32>)> = (0..lists).map(list_queries).collect();
                        self.stage0_mean_key(req, &mut st, &heads, &mid)
                    })
            }
        };
        let run_from = if stage0.is_some() { 1 } else { from };
        let first_cands = |u: usize| -> Vec<Range<usize>> {
            match (&stage0, run_from) {
                (Some(s0), _) => s0[u].clone(),
                (None, 0) => vec![mid.clone()],
                (None, f) => st.stages[f - 1][u].clone(),
            }
        };
        let per_head = |u: usize| {
            let mut fresh: Vec<Vec<Range<usize>>> = Vec::new();
            let mut kept = if mid.is_empty() {
                vec![]
            } else if from == n_stages {
                st.stages[n_stages - 1][u].clone()
            } else {
                let cands = first_cands(u);
                if let Some(s0) = &stage0 {
                    fresh.push(s0[u].clone());
                }
                let (h, qs) = list_queries(u);
                let prev_last = (self.cfg.successors > 0 && !st.stages.is_empty())
                    .then(|| (&st.stages[n_stages - 1][u][..], &succ_range));
                self.stages_from(
                    req,
                    h,
                    &qs,
                    pos,
                    &mid,
                    run_from,
                    cands,
                    prev_last,
                    table.as_deref(),
                    |_, r| fresh.push(r.to_vec()),
                )
            };
            if !slid.is_empty() {
                kept.push(slid.clone());
            }
            (Self::assemble(&sink, kept, &win), fresh)
        };
        // A step without refresh only copies cached ranges: spawning worker
        // threads for it would cost more than the work.
        let results: Vec<_> = if from == n_stages {
            (0..lists).map(per_head).collect()
        } else if self.flat_decode && !mid.is_empty() {
            let heads: Vec<(usize, Vec<f32>)> = (0..lists).map(list_queries).collect();
            let cands: Vec<Vec<Range<usize>>> = (0..lists).map(first_cands).collect();
            let prev: Option<&[Vec<Range<usize>>]> = (self.cfg.successors > 0
                && !st.stages.is_empty())
            .then(|| &st.stages[n_stages - 1][..]);
            let mut fresh = self.stages_flat(
                req,
                &heads,
                pos,
                &mid,
                run_from,
                cands,
                prev.map(|p| (p, &succ_range)),
                table.as_deref(),
            );
            if let Some(s0) = &stage0 {
                for (f, s) in fresh.iter_mut().zip(s0) {
                    f.insert(0, s.clone());
                }
            }
            fresh
                .into_iter()
                .map(|f| {
                    let mut kept = f.last().cloned().unwrap_or_default();
                    if !slid.is_empty() {
                        kept.push(slid.clone());
                    }
                    (Self::assemble(&sink, kept, &win), f)
                })
                .collect()
        } else {
            par_map(lists, per_head)
        };
        if from < n_stages {
            if st.stages.is_empty() {
                st.stages = vec![vec![Vec::new(); lists]; n_stages];
            }
            for (h, (_, fresh)) in results.iter().enumerate() {
                for (k, r) in fresh.iter().enumerate() {
                    st.stages[from + k][h] = r.clone();
                }
            }
        }
        self.last_refreshed = from < n_stages;
        st.step += 1;
        st.last_len = len;
        // `async_refresh = stage0`: the next step refreshes stage 0, so
        // score it now, with this step's query over this step's middle.
        if self.cfg.async_refresh == AsyncRefresh::Stage0
            && self.cfg.decode_stage0 == DecodeStage0::MeanKey
            && st.step % self.cfg.stages[0].refresh_interval == 0
        {
            let heads: Vec<(usize, Vec<f32>)> = (0..lists).map(list_queries).collect();
            let s0 = self.stage0_mean_key(req, &mut st, &heads, &mid);
            st.early0 = Some((s0, mid.end));
        }
        self.states.insert(req.seq, st);
        let heads = match lagged {
            None => results.into_iter().map(|(r, _)| r).collect(),
            Some((last, mid_end)) => {
                let slid = mid_end.max(mid.start)..mid.end;
                last.into_iter()
                    .map(|mut kept| {
                        if mid.is_empty() {
                            kept.clear();
                        }
                        if !slid.is_empty() {
                            kept.push(slid.clone());
                        }
                        Self::assemble(&sink, kept, &win)
                    })
                    .collect()
            }
        };
        Ok(SelectOutput {
            q_block: 1,
            blocks: vec![Selection { heads }],
        })
    }
}

impl Policy for HipPolicy {
    fn name(&self) -> &'static str {
        "hip"
    }

    fn select(&mut self, req: &SelectRequest<'_>) -> Result<SelectOutput> {
        let n = req.n_queries();
        if n == 0 || req.queries.len() != n * req.shape.q_elems() {
            return Err(Error::shape(
                "hip queries",
                format!("n x {}", req.shape.q_elems()),
                req.queries.len(),
            ));
        }
        if req.q_start + n > req.kv.len() {
            return Err(Error::OutOfRange(format!(
                "queries at {}..{} beyond the {} cached tokens",
                req.q_start,
                req.q_start + n,
                req.kv.len()
            )));
        }
        if req.kv.n_kv_heads() != req.shape.n_kv_heads || req.kv.head_dim() != req.shape.head_dim {
            return Err(Error::shape(
                "hip KV",
                format!("{} heads x {}", req.shape.n_kv_heads, req.shape.head_dim),
                format!("{} heads x {}", req.kv.n_kv_heads(), req.kv.head_dim()),
            ));
        }
        match req.phase {
            Phase::Decode if n == 1 => self.select_decode(req),
            Phase::Decode => Err(Error::Invalid(format!(
                "hip decode takes one query per sequence, got {n}"
            ))),
            Phase::Prefill => self.select_prefill(req),
        }
    }

    fn end_sequence(&mut self, seq: u64) {
        self.states.remove(&seq);
    }

    fn prefill_chunk(&self) -> Option<usize> {
        Some(self.cfg.prefill_chunk)
    }

    fn last_decode_refreshed(&self) -> Option<bool> {
        Some(self.last_refreshed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_search_equals_one_chunk_search() {
        use crate::kv::SeqView;
        use crate::rng::Rng;
        let (len, d) = (5000, 32);
        let mut rng = Rng::new(4);
        let k = rng.normal_vec(len * d, 1.0);
        let view = SeqView::from_contiguous(1, d, len, &k, &k);
        let scorer = Scorer {
            kv: &view,
            head: 0,
            qs: rng.normal_vec(3 * d, 1.0),
            d,
            rope: ScoreRope::Original,
        };
        // Uneven chunk sizes, including single tokens and a group remainder.
        let mut chunks = Vec::new();
        let mut s = 0;
        while s < len {
            let e = (s + 1 + rng.below(70)).min(len);
            chunks.push(s..e);
            s = e;
        }
        let grouped = scorer.chunk_scores(&chunks);
        for (c, g) in chunks.iter().zip(&grouped) {
            assert_eq!(*g, scorer.chunk_score(c.start, c.end), "chunk {c:?}");
        }
    }

    #[test]
    fn regions_split_context() {
        let cfg = HipConfig {
            sink: 4,
            window: 8,
            ..HipConfig::default()
        };
        assert_eq!(regions(&cfg, 99, 99), (0..4, 4..92, 92..100));
        assert_eq!(regions(&cfg, 5, 5), (0..4, 4..4, 4..6));
        assert_eq!(regions(&cfg, 2, 2), (0..3, 3..3, 3..3));
        // A prefill block: window counted from its first query.
        assert_eq!(regions(&cfg, 40, 47), (0..4, 4..33, 33..48));
    }
}
