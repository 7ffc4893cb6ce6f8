//! Squeezed Attention (arXiv 2411.09688; SqueezeAILab/SqueezedAttention).
//!
//! A sequence's fixed context (its prefix) is clustered once, per KV head;
//! later queries look up the centroids and attend only to the prefix keys of
//! clusters whose estimated attention probability reaches a calibrated
//! threshold. Tokens after the prefix (user input, generated tokens) are
//! attended in full.
//!
//! **When the prefix is clustered.** The first `after_append` with
//! `prompt_done` seals the prefix: every token the sequence holds at that
//! point is the fixed context. Per KV head, keys `0..prefix_len - W` (W =
//! `observation_window`, the last prefix tokens, always kept) are clustered
//! with `kmeans::kmeans` on their L2-normalised post-RoPE values; centroids
//! are the means of the raw keys, with cluster sizes kept. With `levels: 2`
//! the non-empty fine centroids are clustered again into coarse centroids
//! (the mean of the raw keys each coarse cluster covers, i.e. the
//! size-weighted mean of its fine centroids; upstream averages the fine
//! centroids unweighted). A sequence forked from a sealed one
//! (`fork_sequence`) shares the parent's index (an `Arc`): it is never
//! re-clustered.
//!
//! **Calibration.** The post-RoPE queries of the W observation-window
//! positions are taken from the prefill `select` calls that cover them (the
//! engine's `attend_prefill` over the prefix, or over just its last W
//! queries when the prefix KV was computed elsewhere). A query's estimated
//! probability of cluster c is `p̂_c = exp(s_c) / Σ_k n_k exp(s_k)`, `s =
//! scale · q·C`, n_k the cluster sizes (upstream `run_global_threshold`).
//! Each key gets the mean over the W queries of its cluster's p̂ (pooled over
//! the GQA group by max); the threshold is the `quantile` of these values
//! over all keys of all KV heads of the layer (numpy's linear
//! interpolation). Upstream takes one quantile over all layers; our policies
//! are per layer, so the threshold is per layer. `quantile: 0` means keep
//! every key (threshold -inf). Two-level lookup calibrates the coarse level
//! the same way with `quantile_l1` (coarse sizes counted in keys) and the
//! fine level with the full one-level lookup, as upstream does. If a lookup
//! past the prefix comes before all W queries were seen, the thresholds are
//! calibrated from those seen (with a warning) and stay fixed; with none
//! seen, the lookup is an error that says which positions are missing.
//!
//! **Lookup.** A cluster is kept when its pooled p̂ ≥ threshold (upstream
//! uses `>`; `≥` lets threshold -inf keep everything). Decode looks
//! up per token; a prefill chunk after the prefix shares one key set per KV
//! head across its queries (`prefill_pool`: `max` = union of the queries'
//! sets, `mean` = upstream's averaged scores). GQA: upstream asserts
//! `n_q_heads == n_kv_heads`; we score each q head of a KV head's group and
//! pool by max, so one key set serves the group. Two-level: coarse clusters
//! with pooled p̂ ≥ the coarse threshold survive; only the fine clusters
//! inside them are scored, their denominator counting only those clusters
//! (upstream zeroes the sizes of removed clusters), and the result is the
//! intersection of both levels. Unlike upstream, which simulates two-level
//! with two full lookups, the fine level here only scores surviving clusters.
//!
//! Queries at prefix positions (the prefix's own prefill) attend densely, as
//! upstream recomputes the fixed context with full attention; a prefill
//! chunk that straddles the prefix end is attended densely as well. A
//! sequence that never saw `prompt_done` is attended densely.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use super::{InsertInfo, Phase, Policy, SelectOutput, SelectRequest, Selection};
use crate::attention::AttnShape;
use crate::config::{ModelShape, SqueezeConfig, SqueezePool};
use crate::dtype::dot_f32;
use crate::error::{Error, Result};
use crate::kmeans::{kmeans, KMeans, KMeansParams};
use crate::kv::KvRead;
use crate::parallel::par_map;

/// Centroids of one clustering level of one KV head.
#[derive(Clone, Debug)]
pub struct Level {
    pub dim: usize,
    /// `[k][dim]` raw-key means.
    pub centroids: Vec<f32>,
    /// Keys per cluster.
    pub sizes: Vec<u32>,
    /// Clusters with at least one key, ascending.
    pub nonempty: Vec<u32>,
}

impl Level {
    fn new(dim: usize, centroids: Vec<f32>, sizes: Vec<u32>) -> Self {
        let nonempty = (0..sizes.len() as u32)
            .filter(|&c| sizes[c as usize] > 0)
            .collect();
        Level {
            dim,
            centroids,
            sizes,
            nonempty,
        }
    }
    pub fn k(&self) -> usize {
        self.sizes.len()
    }
    pub fn centroid(&self, c: usize) -> &[f32] {
        &self.centroids[c * self.dim..(c + 1) * self.dim]
    }
}

/// The coarse level of a two-level index.
#[derive(Clone, Debug)]
pub struct Coarse {
    pub level: Level,
    /// Coarse cluster of each fine cluster (`u32::MAX` for an empty one).
    pub of_fine: Vec<u32>,
    /// Fine clusters of coarse cluster c: `members[offs[c]..offs[c + 1]]`.
    offs: Vec<u32>,
    members: Vec<u32>,
}

impl Coarse {
    pub fn fine_members(&self, c: usize) -> &[u32] {
        &self.members[self.offs[c] as usize..self.offs[c + 1] as usize]
    }
}

/// One KV head's clustering of the prefix keys `0..labels.len()`.
#[derive(Clone, Debug)]
pub struct HeadIndex {
    pub fine: Level,
    /// Fine cluster of each clustered key.
    pub labels: Vec<u32>,
    pub coarse: Option<Coarse>,
}

/// Thresholds on the pooled estimated probability.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    pub fine: f32,
    /// Coarse level (two-level lookup only; -inf otherwise).
    pub coarse: f32,
}

#[derive(Debug, Default)]
struct Calib {
    /// Query `[n_q_heads][d]` of each observation-window position (freed
    /// once calibrated).
    slots: Vec<Option<Vec<f32>>>,
    thresholds: Option<Thresholds>,
    /// Queries the thresholds were calibrated with.
    used: usize,
}

/// A sealed prefix: per KV head clusters, calibration state. Shared (`Arc`)
/// by every sequence forked from the one that built it.
#[derive(Debug)]
pub struct PrefixIndex {
    pub prefix_len: usize,
    /// Keys `0..window_start` are clustered; `window_start..prefix_len` is
    /// the observation window, always kept.
    pub window_start: usize,
    pub heads: Vec<HeadIndex>,
    calib: Mutex<Calib>,
}

impl PrefixIndex {
    /// The calibrated thresholds (None until the window's queries arrived).
    pub fn thresholds(&self) -> Option<Thresholds> {
        self.calib.lock().unwrap().thresholds
    }

    /// Observation-window queries the thresholds were calibrated with (0
    /// while not calibrated).
    pub fn calibration_queries(&self) -> usize {
        self.calib.lock().unwrap().used
    }

    fn finish(
        c: &mut Calib,
        heads: &[HeadIndex],
        shape: &AttnShape,
        cfg: &SqueezeConfig,
    ) -> Thresholds {
        let qs: Vec<&[f32]> = c.slots.iter().flatten().map(|v| v.as_slice()).collect();
        let t = calibrate(heads, &qs, shape, cfg);
        tracing::debug!(
            fine = t.fine,
            coarse = t.coarse,
            queries = qs.len(),
            "squeeze: threshold calibrated"
        );
        c.used = qs.len();
        c.thresholds = Some(t);
        c.slots = Vec::new();
        t
    }

    /// Record queries `[n][n_q_heads][d]` at positions `q_start..`; the
    /// window's ones fill calibration slots. Calibrates once all are there.
    fn offer(&self, cfg: &SqueezeConfig, shape: &AttnShape, q_start: usize, queries: &[f32]) {
        let qe = shape.q_elems();
        let mut c = self.calib.lock().unwrap();
        if c.thresholds.is_some() {
            return;
        }
        for (i, q) in queries.chunks_exact(qe).enumerate() {
            let pos = q_start + i;
            if (self.window_start..self.prefix_len).contains(&pos) {
                c.slots[pos - self.window_start] = Some(q.to_vec());
            }
        }
        if c.slots.iter().all(Option::is_some) {
            Self::finish(&mut c, &self.heads, shape, cfg);
        }
    }

    /// Thresholds for a lookup: calibrated, or calibrated now from the
    /// window queries received so far.
    pub fn thresholds_for(
        &self,
        cfg: &SqueezeConfig,
        shape: &AttnShape,
        seq: u64,
    ) -> Result<Thresholds> {
        let mut c = self.calib.lock().unwrap();
        if let Some(t) = c.thresholds {
            return Ok(t);
        }
        let have = c.slots.iter().flatten().count();
        if have == 0 {
            return Err(Error::Invalid(format!(
                "squeeze: sequence {seq} has no calibration queries; run prefill attention \
                 over the prefix's last {} tokens (positions {}..{}) before attending past the prefix",
                self.prefix_len - self.window_start,
                self.window_start,
                self.prefix_len
            )));
        }
        tracing::warn!(
            seq,
            have,
            want = c.slots.len(),
            "squeeze: calibrating with part of the observation window's queries"
        );
        Ok(Self::finish(&mut c, &self.heads, shape, cfg))
    }
}

/// Estimated probability of each candidate cluster, pooled over a query set
/// `qs` `[npos][g][d]` (one KV head's group): max over the g heads, then
/// max or mean over the positions. The denominator counts the candidates
/// only, each weighted by its size.
pub fn pooled_probs(
    level: &Level,
    cands: &[u32],
    qs: &[f32],
    g: usize,
    scale: f32,
    pool: SqueezePool,
) -> Vec<f32> {
    let d = level.dim;
    let npos = qs.len() / (g * d);
    let m = cands.len();
    let mut acc = vec![0f32; m];
    let mut s = vec![0f32; m];
    let mut best = vec![0f32; m];
    for p in 0..npos {
        best.fill(0.0);
        for j in 0..g {
            let q = &qs[(p * g + j) * d..(p * g + j + 1) * d];
            let mut mx = f32::NEG_INFINITY;
            for (si, &c) in s.iter_mut().zip(cands) {
                *si = scale * dot_f32(q, level.centroid(c as usize));
                mx = mx.max(*si);
            }
            let mut den = 0f64;
            for (si, &c) in s.iter_mut().zip(cands) {
                *si = (*si - mx).exp();
                den += level.sizes[c as usize] as f64 * *si as f64;
            }
            let inv = (1.0 / den) as f32;
            for (b, &si) in best.iter_mut().zip(&s) {
                *b = b.max(si * inv);
            }
        }
        match pool {
            SqueezePool::Max => acc.iter_mut().zip(&best).for_each(|(a, &b)| *a = a.max(b)),
            SqueezePool::Mean => acc.iter_mut().zip(&best).for_each(|(a, &b)| *a += b),
        }
    }
    if pool == SqueezePool::Mean && npos > 0 {
        acc.iter_mut().for_each(|a| *a /= npos as f32);
    }
    acc
}

impl HeadIndex {
    /// Fine clusters kept for the query set `qs` `[npos][g][d]`.
    /// `use_coarse: false` runs the one-level lookup even on a two-level
    /// index (for comparisons).
    pub fn kept_clusters(
        &self,
        qs: &[f32],
        g: usize,
        scale: f32,
        pool: SqueezePool,
        thr: Thresholds,
        use_coarse: bool,
    ) -> Vec<bool> {
        let mut kept = vec![false; self.fine.k()];
        let cands: Vec<u32> = match (&self.coarse, use_coarse) {
            (Some(co), true) => {
                let pc = pooled_probs(&co.level, &co.level.nonempty, qs, g, scale, pool);
                co.level
                    .nonempty
                    .iter()
                    .zip(&pc)
                    .filter(|(_, &p)| p >= thr.coarse)
                    .flat_map(|(&c, _)| co.fine_members(c as usize).iter().copied())
                    .collect::<Vec<u32>>()
            }
            _ => self.fine.nonempty.clone(),
        };
        if cands.is_empty() {
            return kept;
        }
        // Ascending, as in the one-level lookup, so that keeping every
        // coarse cluster reproduces it bit for bit.
        let mut cands = cands;
        cands.sort_unstable();
        let pf = pooled_probs(&self.fine, &cands, qs, g, scale, pool);
        for (&c, &p) in cands.iter().zip(&pf) {
            kept[c as usize] = p >= thr.fine;
        }
        kept
    }

    /// Ascending runs of clustered keys whose cluster is kept.
    pub fn kept_ranges(&self, kept: &[bool]) -> Vec<Range<usize>> {
        let mut out: Vec<Range<usize>> = Vec::new();
        for (t, &l) in self.labels.iter().enumerate() {
            if kept[l as usize] {
                match out.last_mut() {
                    Some(r) if r.end == t => r.end = t + 1,
                    _ => out.push(t..t + 1),
                }
            }
        }
        out
    }
}

/// The queries of KV head h's group, `[npos][g][d]`, from `[npos][n_q_heads][d]`.
fn group_queries(queries: &[&[f32]], shape: &AttnShape, h: usize) -> Vec<f32> {
    let gd = shape.group() * shape.head_dim;
    let mut out = Vec::with_capacity(queries.len() * gd);
    for q in queries {
        out.extend_from_slice(&q[h * gd..(h + 1) * gd]);
    }
    out
}

/// numpy-style (linear) quantile of a multiset given as (value, count).
pub fn weighted_quantile(vals: &mut [(f32, u32)], q: f64) -> f32 {
    vals.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: u64 = vals.iter().map(|v| v.1 as u64).sum();
    if total == 0 {
        return f32::NEG_INFINITY;
    }
    let pos = q * (total - 1) as f64;
    let (lo, frac) = (pos.floor() as u64, pos - pos.floor());
    let at = |rank: u64| {
        let mut seen = 0u64;
        for v in vals.iter() {
            seen += v.1 as u64;
            if rank < seen {
                return v.0 as f64;
            }
        }
        vals[vals.len() - 1].0 as f64
    };
    let a = at(lo);
    let b = at((lo + 1).min(total - 1));
    (a + (b - a) * frac) as f32
}

/// Per-key calibration scores of each head: mean over the queries of the
/// group-max p̂ of the key's cluster, as (value, keys) pairs per cluster.
fn calib_scores(
    heads: &[HeadIndex],
    queries: &[&[f32]],
    shape: &AttnShape,
    coarse: bool,
) -> Vec<(f32, u32)> {
    let per = par_map(heads.len(), |h| {
        let qs = group_queries(queries, shape, h);
        let level = match (&heads[h].coarse, coarse) {
            (Some(c), true) => &c.level,
            _ => &heads[h].fine,
        };
        let p = pooled_probs(
            level,
            &level.nonempty,
            &qs,
            shape.group(),
            shape.scale,
            SqueezePool::Mean,
        );
        level
            .nonempty
            .iter()
            .zip(p)
            .map(|(&c, v)| (v, level.sizes[c as usize]))
            .collect::<Vec<_>>()
    });
    per.into_iter().flatten().collect()
}

/// Thresholds from the calibration queries (each `[n_q_heads][d]`).
pub fn calibrate(
    heads: &[HeadIndex],
    queries: &[&[f32]],
    shape: &AttnShape,
    cfg: &SqueezeConfig,
) -> Thresholds {
    let quant = |mut v: Vec<(f32, u32)>, q: f32| {
        if q <= 0.0 {
            f32::NEG_INFINITY
        } else {
            weighted_quantile(&mut v, q as f64)
        }
    };
    let fine = quant(calib_scores(heads, queries, shape, false), cfg.quantile);
    let coarse = if heads.iter().any(|h| h.coarse.is_some()) {
        quant(calib_scores(heads, queries, shape, true), cfg.quantile_l1)
    } else {
        f32::NEG_INFINITY
    };
    Thresholds { fine, coarse }
}

/// A k-means implementation: `kmeans::kmeans` on the CPU, or a device twin
/// (`backend::cuda::policies::squeeze_kmeans`).
pub type KMeansFn<'a> = dyn FnMut(&[f32], usize, &KMeansParams) -> Result<KMeans> + 'a;

/// k-means parameters of the fine level over `rest` non-sink keys.
pub fn fine_params(cfg: &SqueezeConfig, rest: usize) -> KMeansParams {
    let k = ((cfg.percent_clusters as f64 / 100.0 * rest as f64) as usize).clamp(1, rest.max(1));
    KMeansParams {
        k,
        max_iters: cfg.kmeans_iters,
        seed: cfg.seed,
        normalize: true,
    }
}

/// Clusters keys `0..n` of KV head `h`: keys `0..cfg.sink` get a cluster of
/// their own (at both levels), the rest go through k-means.
pub fn build_head(kv: &dyn KvRead, h: usize, n: usize, cfg: &SqueezeConfig) -> Result<HeadIndex> {
    let d = kv.head_dim();
    let mut keys = vec![0f32; n * d];
    for (t, row) in keys.chunks_exact_mut(d).enumerate() {
        kv.read_key(h, t, row);
    }
    let s = cfg.sink.min(n);
    let km = if n > s {
        Some(
            kmeans(&keys[s * d..], d, &fine_params(cfg, n - s))
                .map_err(|e| Error::Invalid(format!("squeeze: clustering KV head {h}: {e}")))?,
        )
    } else {
        None
    };
    keys.truncate(s * d);
    build_head_from(&keys, d, km, h, cfg, &mut |p, d, q| kmeans(p, d, q))
}

/// A head's index from its sink keys (`[s][d]`, each its own cluster) and
/// the fine k-means of the other keys (None when there are none); the
/// coarse level (two-level config) clusters the fine centroids with
/// `coarse_kmeans`.
pub fn build_head_from(
    sink_keys: &[f32],
    d: usize,
    km: Option<KMeans>,
    h: usize,
    cfg: &SqueezeConfig,
    coarse_kmeans: &mut KMeansFn<'_>,
) -> Result<HeadIndex> {
    let s = sink_keys.len() / d;
    // Sink clusters 0..s (centroid = the key itself), then the k-means ones.
    let mut centroids = sink_keys.to_vec();
    let mut sizes = vec![1u32; s];
    let mut labels: Vec<u32> = (0..s as u32).collect();
    if let Some(km) = km {
        centroids.extend_from_slice(&km.centroids);
        sizes.extend_from_slice(&km.sizes);
        labels.extend(km.labels.iter().map(|&l| l + s as u32));
    }
    let fine = Level::new(d, centroids, sizes);
    let coarse = if cfg.levels == 2 {
        Some(build_coarse(&fine, s, h, cfg, coarse_kmeans)?)
    } else {
        None
    };
    Ok(HeadIndex {
        fine,
        labels,
        coarse,
    })
}

/// The coarse level over `fine`: fine clusters `0..sink` stay alone, the
/// other non-empty ones are clustered again.
fn build_coarse(
    fine: &Level,
    sink: usize,
    h: usize,
    cfg: &SqueezeConfig,
    kmeans_fn: &mut KMeansFn<'_>,
) -> Result<Coarse> {
    let d = fine.dim;
    let ne = &fine.nonempty;
    let rest: Vec<u32> = ne.iter().copied().filter(|&c| c as usize >= sink).collect();
    // Coarse cluster of each non-empty fine cluster, in `ne` order.
    let mut assign: Vec<usize> = ne.iter().map(|&c| c as usize).collect();
    let mut k1 = ne.len() - rest.len();
    if !rest.is_empty() {
        let pts: Vec<f32> = rest
            .iter()
            .flat_map(|&c| fine.centroid(c as usize).iter().copied())
            .collect();
        let kr = ((cfg.percent_clusters_l1 as f64 / 100.0 * rest.len() as f64) as usize)
            .clamp(1, rest.len());
        let km1 = kmeans_fn(
            &pts,
            d,
            &KMeansParams {
                k: kr,
                max_iters: cfg.kmeans_iters,
                seed: cfg.seed,
                normalize: true,
            },
        )
        .map_err(|e| Error::Invalid(format!("squeeze: coarse clustering KV head {h}: {e}")))?;
        let base = k1;
        for (a, l) in assign[ne.len() - rest.len()..].iter_mut().zip(&km1.labels) {
            *a = base + *l as usize;
        }
        k1 += kr;
    }
    let mut of_fine = vec![u32::MAX; fine.k()];
    let mut sums = vec![0f64; k1 * d];
    let mut sizes = vec![0u32; k1];
    let mut count = vec![0u32; k1];
    for (&c, &cc) in ne.iter().zip(&assign) {
        of_fine[c as usize] = cc as u32;
        let n_c = fine.sizes[c as usize];
        sizes[cc] += n_c;
        count[cc] += 1;
        for (s, &x) in sums[cc * d..(cc + 1) * d]
            .iter_mut()
            .zip(fine.centroid(c as usize))
        {
            *s += n_c as f64 * x as f64;
        }
    }
    let centroids: Vec<f32> = (0..k1 * d)
        .map(|i| {
            let sz = sizes[i / d];
            if sz > 0 {
                (sums[i] / sz as f64) as f32
            } else {
                0.0
            }
        })
        .collect();
    let mut offs = vec![0u32; k1 + 1];
    for c in 0..k1 {
        offs[c + 1] = offs[c] + count[c];
    }
    let mut fill = offs.clone();
    let mut members = vec![0u32; ne.len()];
    for &c in ne {
        let cc = of_fine[c as usize] as usize;
        members[fill[cc] as usize] = c;
        fill[cc] += 1;
    }
    Ok(Coarse {
        level: Level::new(d, centroids, sizes),
        of_fine,
        offs,
        members,
    })
}

#[derive(Clone, Default)]
struct SeqState {
    /// Before the prefix is sealed: the last W queries seen, with positions.
    recent: VecDeque<(usize, Vec<f32>)>,
    prefix: Option<Arc<PrefixIndex>>,
}

pub struct SqueezePolicy {
    cfg: SqueezeConfig,
    states: HashMap<u64, SeqState>,
    clusterings: usize,
}

impl SqueezePolicy {
    pub fn new(cfg: SqueezeConfig, model: &ModelShape) -> Result<Self> {
        cfg.validate("squeeze")?;
        if model.head_dim == 0 {
            return Err(Error::config("model.head_dim", "must be > 0"));
        }
        Ok(SqueezePolicy {
            cfg,
            states: HashMap::new(),
            clusterings: 0,
        })
    }

    pub fn config(&self) -> &SqueezeConfig {
        &self.cfg
    }

    /// The sealed prefix of `seq` (shared with its forks).
    pub fn prefix(&self, seq: u64) -> Option<Arc<PrefixIndex>> {
        self.states.get(&seq).and_then(|s| s.prefix.clone())
    }

    /// Prefix clusterings run by this policy (forks reuse, so do not count).
    pub fn clusterings_run(&self) -> usize {
        self.clusterings
    }

    /// Seal `seq`'s prefix: its first `kv.len()` tokens. Called from
    /// `after_append` on `prompt_done`; public for callers that drive the
    /// policy without an engine.
    pub fn build_prefix(&mut self, seq: u64, shape: &AttnShape, kv: &dyn KvRead) -> Result<()> {
        if kv.n_kv_heads() != shape.n_kv_heads || kv.head_dim() != shape.head_dim {
            return Err(Error::shape(
                "squeeze KV",
                format!("{} heads x {}", shape.n_kv_heads, shape.head_dim),
                format!("{} heads x {}", kv.n_kv_heads(), kv.head_dim()),
            ));
        }
        let prefix_len = kv.len();
        let window_start = self.window_start(prefix_len);
        let t0 = std::time::Instant::now();
        let heads = if window_start == 0 {
            Vec::new()
        } else {
            (0..shape.n_kv_heads)
                .map(|h| build_head(kv, h, window_start, &self.cfg))
                .collect::<Result<Vec<_>>>()?
        };
        self.seal_with_heads(seq, shape, prefix_len, heads, t0)
    }

    /// Keys `0..window_start(prefix_len)` of a prefix are clustered.
    pub fn window_start(&self, prefix_len: usize) -> usize {
        prefix_len.saturating_sub(self.cfg.observation_window)
    }

    /// Seal `seq`'s prefix of `prefix_len` tokens with per-KV-head indexes
    /// built elsewhere (`build_head_from`, e.g. with the GPU k-means) over
    /// keys `0..window_start(prefix_len)` (none when that is 0).
    pub fn seal_prefix(
        &mut self,
        seq: u64,
        shape: &AttnShape,
        prefix_len: usize,
        heads: Vec<HeadIndex>,
    ) -> Result<()> {
        let ws = self.window_start(prefix_len);
        let want = if ws == 0 { 0 } else { shape.n_kv_heads };
        if heads.len() != want || heads.iter().any(|h| h.labels.len() != ws) {
            return Err(Error::shape(
                "squeeze seal_prefix heads (count, clustered keys)",
                format!("({want}, {ws})"),
                format!(
                    "({}, {:?})",
                    heads.len(),
                    heads.first().map(|h| h.labels.len())
                ),
            ));
        }
        self.seal_with_heads(seq, shape, prefix_len, heads, std::time::Instant::now())
    }

    fn seal_with_heads(
        &mut self,
        seq: u64,
        shape: &AttnShape,
        prefix_len: usize,
        heads: Vec<HeadIndex>,
        t0: std::time::Instant,
    ) -> Result<()> {
        let window_start = self.window_start(prefix_len);
        self.clusterings += 1;
        tracing::debug!(
            seq,
            prefix_len,
            clusters = heads.first().map_or(0, |h| h.fine.k()),
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "squeeze: prefix clustered"
        );
        let index = Arc::new(PrefixIndex {
            prefix_len,
            window_start,
            heads,
            calib: Mutex::new(Calib {
                slots: vec![None; prefix_len - window_start],
                thresholds: None,
                used: 0,
            }),
        });
        let st = self.states.entry(seq).or_default();
        for (pos, q) in std::mem::take(&mut st.recent) {
            index.offer(&self.cfg, shape, pos, &q);
        }
        st.prefix = Some(index);
        Ok(())
    }

    fn lookup(&self, req: &SelectRequest<'_>, p: &PrefixIndex) -> Result<Selection> {
        let (shape, len) = (req.shape, req.kv.len());
        if p.window_start == 0 {
            return Ok(Selection::full(shape.n_kv_heads, len));
        }
        let thr = p.thresholds_for(&self.cfg, &shape, req.seq)?;
        let pool = match req.phase {
            Phase::Decode => SqueezePool::Max,
            Phase::Prefill => self.cfg.prefill_pool,
        };
        let qe = shape.q_elems();
        let queries: Vec<&[f32]> = req.queries.chunks_exact(qe).collect();
        let heads = par_map(shape.n_kv_heads, |h| {
            let hi = &p.heads[h];
            let qs = group_queries(&queries, &shape, h);
            let kept = hi.kept_clusters(&qs, shape.group(), shape.scale, pool, thr, true);
            let mut r = hi.kept_ranges(&kept);
            r.push(p.window_start..len);
            super::normalize(&mut r);
            r
        });
        Ok(Selection { heads })
    }
}

impl Policy for SqueezePolicy {
    fn name(&self) -> &'static str {
        "squeeze"
    }

    fn select(&mut self, req: &SelectRequest<'_>) -> Result<SelectOutput> {
        let n = req.n_queries();
        let shape = req.shape;
        if n == 0 || req.queries.len() != n * shape.q_elems() {
            return Err(Error::shape(
                "squeeze queries",
                format!("n x {}", shape.q_elems()),
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
        if req.kv.n_kv_heads() != shape.n_kv_heads || req.kv.head_dim() != shape.head_dim {
            return Err(Error::shape(
                "squeeze KV",
                format!("{} heads x {}", shape.n_kv_heads, shape.head_dim),
                format!("{} heads x {}", req.kv.n_kv_heads(), req.kv.head_dim()),
            ));
        }
        if req.phase == Phase::Decode && n != 1 {
            return Err(Error::Invalid(format!(
                "squeeze decode takes one query per sequence, got {n}"
            )));
        }
        let len = req.kv.len();
        let one = |sel: Selection| SelectOutput {
            q_block: n,
            blocks: vec![sel],
        };
        let st = self.states.entry(req.seq).or_default();
        let Some(p) = st.prefix.clone() else {
            // Not sealed yet: remember the latest queries for calibration.
            let w = self.cfg.observation_window;
            for (i, q) in req
                .queries
                .chunks_exact(shape.q_elems())
                .enumerate()
                .skip(n.saturating_sub(w))
            {
                st.recent.push_back((req.q_start + i, q.to_vec()));
            }
            while st.recent.len() > w {
                st.recent.pop_front();
            }
            return Ok(one(Selection::full(shape.n_kv_heads, len)));
        };
        if len < p.prefix_len {
            return Err(Error::OutOfRange(format!(
                "squeeze: sequence {} holds {len} tokens, fewer than its clustered prefix of {}",
                req.seq, p.prefix_len
            )));
        }
        if req.q_start < p.prefix_len {
            // The prefix's own queries: dense; the window's calibrate.
            p.offer(&self.cfg, &shape, req.q_start, req.queries);
            return Ok(one(Selection::full(shape.n_kv_heads, len)));
        }
        Ok(one(self.lookup(req, &p)?))
    }

    fn after_append(&mut self, ins: &InsertInfo<'_>) -> Result<Option<Vec<Vec<u32>>>> {
        let sealed = self
            .states
            .get(&ins.seq)
            .is_some_and(|s| s.prefix.is_some());
        if ins.prompt_done && !sealed {
            self.build_prefix(ins.seq, &ins.shape, ins.kv)?;
        }
        Ok(None)
    }

    fn fork_sequence(&mut self, parent: u64, child: u64) {
        if let Some(st) = self.states.get(&parent) {
            let st = st.clone();
            self.states.insert(child, st);
        }
    }

    fn end_sequence(&mut self, seq: u64) {
        self.states.remove(&seq);
    }
}
