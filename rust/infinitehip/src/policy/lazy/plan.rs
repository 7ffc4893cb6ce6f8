//! LazyLLM's per-sequence bookkeeping: which tokens are active at each layer
//! of a step, which rows an engine must compute there, and the aux cache that
//! lets a pruned token resume where it stopped.
//!
//! The engine (a llama.cpp or SGLang hook that can drop rows between layers)
//! drives one `LazyPlan` per sequence:
//!
//! ```text
//! plan.begin_step(n_new, phase)
//! for l in 0..n_layers {
//!     let lp = plan.layer(l)?;          // attend / compute / from_aux
//!     // gather lp.from_aux rows from the aux cache into the hidden-state batch,
//!     // run layer l for the rows lp.compute (attending to the keys lp.attend)
//!     if plan.is_point(l) {
//!         let pr = plan.prune_top(l, &importance_of(lp.attend))?;
//!         // store the output rows pr.to_aux in the aux cache (tagged layer l),
//!         // drop every row not in the next layer's compute list
//!     }
//! }
//! plan.end_step()
//! ```
//!
//! State per token: `computed` = the next layer whose row is not computed yet
//! (the computed layers are always the prefix `0..computed`, because keep sets
//! are nested inside a step), and `aux` = the layer whose output hidden state
//! the aux cache holds (always `computed - 1` while `0 < computed < n_layers`
//! and the token is not in the running batch). A token is computed at layer
//! l only when it is active at l and `computed == l`, then `computed` becomes
//! l + 1: every (token, layer) is computed at most once over the sequence's
//! life, and a revived token resumes at the layer after the one it was pruned
//! at, from the hidden state stored there.
//!
//! Every step starts with every token active (prompt and generated); at each
//! pruning point the prompt tokens still active are cut to the top `keep`
//! fraction of the whole prompt; tokens that are not prompt tokens (decoded
//! ones) stay active. This follows the paper's fig. 3/4 and the
//! Adam-Mazur/Lazy-Llama reimplementation's `selected_tokens_bit_array` reset
//! per forward. Differences from that reimplementation: only prompt tokens are
//! pruned, the fraction is of the full prompt at named points (not a rate of
//! the current tokens at every layer), and the aux cache keeps one entry per
//! token (the latest), not one per (token, layer).

use crate::config::LazyPoint;
use crate::error::{Error, Result};
use crate::policy::Phase;

const NONE: u32 = u32::MAX;

/// What the engine does at one layer of a step. All lists ascending.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerPlan {
    pub layer: usize,
    /// Tokens active at this layer: the keys every active query attends to.
    /// Each has KV at this layer once `compute` is done.
    pub attend: Vec<u32>,
    /// Rows the engine computes at this layer: active tokens without KV here.
    pub compute: Vec<u32>,
    /// The part of `compute` whose input hidden state comes from the aux cache
    /// (the output of layer `layer - 1`, stored in an earlier step); the rest
    /// continue from the previous layer's batch (or, at layer 0, are the new
    /// tokens' embeddings).
    pub from_aux: Vec<u32>,
}

/// The result of a pruning point.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneResult {
    pub layer: usize,
    /// Prompt tokens that stay active after this layer.
    pub keep: Vec<u32>,
    /// Rows computed at this layer in this step that are pruned now: store
    /// their output hidden state (after `layer`) in the aux cache. Empty at
    /// the last layer.
    pub to_aux: Vec<u32>,
}

/// Work counters over a sequence's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanStats {
    pub steps: u64,
    /// (token, layer) rows computed.
    pub computed_rows: u64,
    /// Rows a dense forward computes: every token at every layer.
    pub dense_rows: u64,
    /// The same two counts for prompt tokens only.
    pub prompt_rows: u64,
    pub prompt_dense_rows: u64,
    /// Rows resumed from the aux cache.
    pub revived: u64,
    /// Hidden states written to the aux cache.
    pub aux_stores: u64,
}

impl PlanStats {
    /// Fraction of prompt (token, layer) rows computed so far.
    pub fn prompt_fraction(&self) -> f64 {
        self.prompt_rows as f64 / (self.prompt_dense_rows as f64).max(1.0)
    }
    pub fn row_fraction(&self) -> f64 {
        self.computed_rows as f64 / (self.dense_rows as f64).max(1.0)
    }
}

struct Step {
    /// Next layer to plan.
    next_layer: usize,
    /// Index of the next pruning point not yet applied.
    next_point: usize,
    /// Active tokens at `next_layer`.
    active: Vec<u32>,
    /// Rows computed at the last planned layer.
    batch: Vec<u32>,
    /// A pruning point planned but not yet pruned.
    pending: Option<usize>,
}

/// Per-sequence LazyLLM plan (see the module docs).
pub struct LazyPlan {
    n_layers: usize,
    points: Vec<LazyPoint>,
    computed: Vec<u32>,
    aux: Vec<u32>,
    prompt: Vec<bool>,
    n_prompt: usize,
    step: Option<Step>,
    stats: PlanStats,
}

/// Prompt tokens kept at a point with fraction `keep` of a prompt of
/// `n_prompt` tokens: ceil(keep * n_prompt) (a 1e-6 slack absorbs the f32
/// rounding of `keep`), at least 1 when there is a prompt.
pub fn keep_count(keep: f32, n_prompt: usize) -> usize {
    if n_prompt == 0 {
        return 0;
    }
    let k = (keep as f64 * n_prompt as f64 - 1e-6).ceil();
    (k.max(1.0) as usize).min(n_prompt)
}

/// The `k` entries of `tokens` with the highest `importance` (same order),
/// returned ascending. `force` (if among `tokens`) is always kept. Ties:
/// the later token wins. Importance must not be NaN (callers check).
pub fn top_k(tokens: &[u32], importance: &[f32], k: usize, force: Option<u32>) -> Vec<u32> {
    debug_assert_eq!(tokens.len(), importance.len());
    if k >= tokens.len() {
        return tokens.to_vec();
    }
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..tokens.len()).collect();
    let better = |a: &usize, b: &usize| {
        let (fa, fb) = (Some(tokens[*a]) == force, Some(tokens[*b]) == force);
        fb.cmp(&fa)
            .then(importance[*b].total_cmp(&importance[*a]))
            .then(tokens[*b].cmp(&tokens[*a]))
    };
    idx.select_nth_unstable_by(k - 1, better);
    let mut out: Vec<u32> = idx[..k].iter().map(|&i| tokens[i]).collect();
    out.sort_unstable();
    out
}

fn err(msg: String) -> Error {
    Error::Invalid(format!("lazy plan: {msg}"))
}

impl LazyPlan {
    /// `points` must be valid (`LazyConfig` validation): ascending layers below
    /// `n_layers`, fractions in (0, 1], non-increasing.
    pub fn new(n_layers: usize, points: &[LazyPoint]) -> Result<Self> {
        if n_layers == 0 || n_layers >= NONE as usize {
            return Err(err(format!("n_layers {n_layers} out of range")));
        }
        let mut prev: Option<&LazyPoint> = None;
        for (i, p) in points.iter().enumerate() {
            let ok_layer = p.layer < n_layers && prev.is_none_or(|q| p.layer > q.layer);
            let ok_keep = p.keep > 0.0 && p.keep <= prev.map_or(1.0, |q| q.keep);
            if !ok_layer || !ok_keep {
                return Err(Error::config(
                    format!("lazy.points[{i}]"),
                    format!(
                        "{p:?}: layers must ascend below {n_layers}, keep in (0, 1] non-increasing"
                    ),
                ));
            }
            prev = Some(p);
        }
        Ok(LazyPlan {
            n_layers,
            points: points.to_vec(),
            computed: Vec::new(),
            aux: Vec::new(),
            prompt: Vec::new(),
            n_prompt: 0,
            step: None,
            stats: PlanStats::default(),
        })
    }

    pub fn n_layers(&self) -> usize {
        self.n_layers
    }
    pub fn points(&self) -> &[LazyPoint] {
        &self.points
    }
    /// Tokens known to the plan.
    pub fn len(&self) -> usize {
        self.computed.len()
    }
    pub fn is_empty(&self) -> bool {
        self.computed.is_empty()
    }
    pub fn n_prompt(&self) -> usize {
        self.n_prompt
    }
    pub fn is_prompt(&self, tok: u32) -> bool {
        self.prompt.get(tok as usize).copied().unwrap_or(false)
    }
    pub fn stats(&self) -> PlanStats {
        self.stats
    }
    pub fn in_step(&self) -> bool {
        self.step.is_some()
    }
    /// The pruning point at `layer`, if any.
    pub fn point(&self, layer: usize) -> Option<&LazyPoint> {
        self.points.iter().find(|p| p.layer == layer)
    }
    pub fn is_point(&self, layer: usize) -> bool {
        self.point(layer).is_some()
    }
    /// Layers `0..n` of `tok` have been computed (KV exists there).
    pub fn computed_layers(&self, tok: u32) -> Option<usize> {
        self.computed.get(tok as usize).map(|&c| c as usize)
    }
    /// The layer whose output hidden state the aux cache holds for `tok`.
    pub fn aux_layer(&self, tok: u32) -> Option<usize> {
        match self.aux.get(tok as usize) {
            Some(&a) if a != NONE => Some(a as usize),
            _ => None,
        }
    }
    /// Tokens with an aux-cache entry.
    pub fn aux_entries(&self) -> usize {
        self.aux.iter().filter(|&&a| a != NONE).count()
    }
    /// Tokens active at the next layer of the current step.
    pub fn active(&self) -> Option<&[u32]> {
        self.step.as_ref().map(|s| s.active.as_slice())
    }
    /// The next layer `layer` expects in the current step.
    pub fn next_layer(&self) -> Option<usize> {
        self.step.as_ref().map(|s| s.next_layer)
    }
    /// The pruning point planned and still waiting for `prune`.
    pub fn pending_prune(&self) -> Option<usize> {
        self.step.as_ref().and_then(|s| s.pending)
    }

    /// Tokens whose KV already exists in every layer (e.g. a forked prefix the
    /// plan never saw). Only between steps.
    pub fn register_computed(&mut self, n: usize, prompt: bool) -> Result<()> {
        if self.step.is_some() {
            return Err(err("register_computed inside a step".into()));
        }
        self.push_tokens(n, prompt, self.n_layers as u32)
    }

    fn push_tokens(&mut self, n: usize, prompt: bool, computed: u32) -> Result<()> {
        if self.computed.len() + n >= NONE as usize {
            return Err(err(format!(
                "{} tokens exceed u32",
                self.computed.len() + n
            )));
        }
        self.computed.extend(std::iter::repeat_n(computed, n));
        self.aux.extend(std::iter::repeat_n(NONE, n));
        self.prompt.extend(std::iter::repeat_n(prompt, n));
        if prompt {
            self.n_prompt += n;
        }
        Ok(())
    }

    /// Start a step with `n_new` new tokens (prompt tokens in prefill,
    /// generated ones in decode). Every token starts active.
    pub fn begin_step(&mut self, n_new: usize, phase: Phase) -> Result<()> {
        if self.step.is_some() {
            return Err(err(
                "begin_step while a step is in progress (call end_step)".into(),
            ));
        }
        if n_new == 0 {
            return Err(err("a step needs at least one new token".into()));
        }
        let prompt = phase == Phase::Prefill;
        self.push_tokens(n_new, prompt, 0)?;
        let len = self.computed.len() as u64;
        self.stats.dense_rows += n_new as u64 * self.n_layers as u64;
        if prompt {
            self.stats.prompt_dense_rows += n_new as u64 * self.n_layers as u64;
        }
        self.step = Some(Step {
            next_layer: 0,
            next_point: 0,
            active: (0..len as u32).collect(),
            batch: Vec::new(),
            pending: None,
        });
        Ok(())
    }

    /// Plan layer `l` of the current step. Layers between the last planned one
    /// and `l` are planned implicitly (an engine whose layers run outside
    /// this plan, e.g. dense ones); skipping a pruning point is an error.
    pub fn layer(&mut self, l: usize) -> Result<LayerPlan> {
        let Some(st) = &self.step else {
            return Err(err(format!("layer {l} outside a step (call begin_step)")));
        };
        if let Some(p) = st.pending {
            return Err(err(format!(
                "layer {l} planned before pruning point {p} was pruned"
            )));
        }
        if l < st.next_layer || l >= self.n_layers {
            return Err(err(format!(
                "layer {l} out of order (next is {} of {})",
                st.next_layer, self.n_layers
            )));
        }
        if let Some(p) = self.points[st.next_point..].iter().find(|p| p.layer < l) {
            return Err(err(format!(
                "layer {l} skips pruning point at layer {}",
                p.layer
            )));
        }
        for m in st.next_layer..l {
            self.plan_one(m)?;
        }
        let lp = self.plan_one(l)?;
        if self.is_point(l) {
            self.step.as_mut().expect("in step").pending = Some(l);
        }
        Ok(lp)
    }

    fn plan_one(&mut self, l: usize) -> Result<LayerPlan> {
        let st = self.step.as_mut().expect("in step");
        let lu = l as u32;
        let mut compute = Vec::new();
        let mut from_aux = Vec::new();
        let mut bi = 0;
        for &t in &st.active {
            let c = self.computed[t as usize];
            if c < lu {
                return Err(err(format!(
                    "token {t} is active at layer {l} but only layers 0..{c} are computed"
                )));
            }
            if c > lu {
                continue;
            }
            while bi < st.batch.len() && st.batch[bi] < t {
                bi += 1;
            }
            let in_batch = bi < st.batch.len() && st.batch[bi] == t;
            if l > 0 && !in_batch {
                if self.aux[t as usize] != lu - 1 {
                    return Err(err(format!(
                        "token {t} resumes at layer {l} but the aux cache holds layer {:?}",
                        self.aux_layer(t)
                    )));
                }
                self.aux[t as usize] = NONE;
                from_aux.push(t);
            }
            compute.push(t);
        }
        let n_prompt_rows = compute.iter().filter(|&&t| self.prompt[t as usize]).count();
        for &t in &compute {
            self.computed[t as usize] = lu + 1;
        }
        self.stats.computed_rows += compute.len() as u64;
        self.stats.prompt_rows += n_prompt_rows as u64;
        self.stats.revived += from_aux.len() as u64;
        st.batch = compute.clone();
        st.next_layer = l + 1;
        Ok(LayerPlan {
            layer: l,
            attend: st.active.clone(),
            compute,
            from_aux,
        })
    }

    /// Apply pruning point `l` (just planned by `layer(l)`): `keep` are the
    /// prompt tokens that stay active (ascending, a subset of the active
    /// prompt tokens); tokens that are not prompt tokens always stay.
    pub fn prune(&mut self, l: usize, keep: &[u32]) -> Result<PruneResult> {
        let n_layers = self.n_layers;
        let Some(st) = self.step.as_mut() else {
            return Err(err(format!("prune at layer {l} outside a step")));
        };
        if st.pending != Some(l) {
            return Err(err(format!(
                "prune at layer {l}, but the pending pruning point is {:?}",
                st.pending
            )));
        }
        // Merge-walk: keep ⊆ active ∩ prompt, ascending.
        let mut new_active = Vec::with_capacity(st.active.len());
        let mut pruned = Vec::new();
        let mut ki = 0;
        for &t in &st.active {
            if !self.prompt[t as usize] {
                new_active.push(t);
                if ki < keep.len() && keep[ki] == t {
                    return Err(err(format!(
                        "keep lists token {t}, which is not a prompt token"
                    )));
                }
                continue;
            }
            if ki < keep.len() && keep[ki] < t {
                return Err(err(format!(
                    "keep lists token {} at layer {l}, which is not active or not ascending",
                    keep[ki]
                )));
            }
            if ki < keep.len() && keep[ki] == t {
                new_active.push(t);
                ki += 1;
            } else {
                pruned.push(t);
            }
        }
        if ki < keep.len() {
            return Err(err(format!(
                "keep lists token {} at layer {l}, which is not active or not ascending",
                keep[ki]
            )));
        }
        let mut to_aux = Vec::new();
        if l + 1 < n_layers {
            let mut bi = 0;
            for &t in &pruned {
                while bi < st.batch.len() && st.batch[bi] < t {
                    bi += 1;
                }
                if bi < st.batch.len() && st.batch[bi] == t {
                    self.aux[t as usize] = l as u32;
                    to_aux.push(t);
                }
            }
        }
        self.stats.aux_stores += to_aux.len() as u64;
        st.active = new_active;
        st.pending = None;
        st.next_point = self
            .points
            .iter()
            .position(|p| p.layer > l)
            .unwrap_or(self.points.len());
        Ok(PruneResult {
            layer: l,
            keep: keep.to_vec(),
            to_aux,
        })
    }

    /// Apply pruning point `l` from importances aligned with the active
    /// tokens (`LayerPlan::attend` of layer l): keep the top
    /// `keep_count(point.keep, n_prompt)` active prompt tokens; the step's
    /// last token is always kept.
    pub fn prune_top(&mut self, l: usize, importance: &[f32]) -> Result<PruneResult> {
        let keep_frac = self
            .point(l)
            .map(|p| p.keep)
            .ok_or_else(|| err(format!("layer {l} is not a pruning point")))?;
        let Some(st) = &self.step else {
            return Err(err(format!("prune at layer {l} outside a step")));
        };
        if importance.len() != st.active.len() {
            return Err(Error::shape(
                format!("lazy importance at layer {l}"),
                st.active.len(),
                importance.len(),
            ));
        }
        if let Some(i) = importance.iter().position(|x| x.is_nan()) {
            return Err(err(format!(
                "importance of token {} at layer {l} is NaN",
                st.active[i]
            )));
        }
        let (toks, imp): (Vec<u32>, Vec<f32>) = st
            .active
            .iter()
            .zip(importance)
            .filter(|(&t, _)| self.prompt[t as usize])
            .map(|(&t, &x)| (t, x))
            .unzip();
        let k = keep_count(keep_frac, self.n_prompt).min(toks.len());
        let last = self.computed.len() as u32 - 1;
        let keep = top_k(&toks, &imp, k, Some(last));
        self.prune(l, &keep)
    }

    /// Finish the step: plan the layers not planned yet (a pruning point
    /// never reached, or planned but not pruned, keeps every token).
    pub fn end_step(&mut self) -> Result<()> {
        let Some(st) = &self.step else {
            return Err(err("end_step outside a step".into()));
        };
        if let Some(p) = st.pending {
            let keep: Vec<u32> = st
                .active
                .iter()
                .copied()
                .filter(|&t| self.prompt[t as usize])
                .collect();
            self.prune(p, &keep)?;
        }
        loop {
            let st = self.step.as_ref().expect("in step");
            let l = st.next_layer;
            if l >= self.n_layers {
                break;
            }
            self.plan_one(l)?;
            if self.is_point(l) {
                let st = self.step.as_mut().expect("in step");
                st.pending = None;
                st.next_point = self
                    .points
                    .iter()
                    .position(|p| p.layer > l)
                    .unwrap_or(self.points.len());
            }
        }
        self.step = None;
        self.stats.steps += 1;
        Ok(())
    }
}
