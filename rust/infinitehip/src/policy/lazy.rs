//! LazyLLM (arXiv 2407.14057): dynamic token pruning for long-context
//! prefill. At chosen layers the prompt tokens are ranked by the attention the
//! step's last token gives them (mean over q heads); the top fraction stays
//! active for the following layers, the rest stop being computed. A pruned
//! token's hidden state goes to an aux cache so a later step that selects it
//! again resumes it at the next layer, and no (token, layer) is computed twice.
//! No official code exists; `Adam-Mazur/Lazy-Llama` (HF Llama-2, eager
//! attention) shows the mechanics and was read, not copied.
//!
//! Two pieces:
//!
//! - [`LazyPlan`] (`plan.rs`): the per-sequence bookkeeping an engine hook
//!   drives: per layer the keys to attend, the rows to compute, the rows to
//!   pull from / push to the aux cache. This is what a llama.cpp / SGLang
//!   layer-loop hook needs to actually drop rows between layers (the speedup).
//! - [`LazyPolicy`]: the same selection through the `Policy` trait, for an
//!   engine (this crate's `Engine`) where every layer's KV exists for every
//!   token. One `LazyPolicy` per lazy layer, all sharing one [`LazyShared`]
//!   (the keep sets cross layers).
//!
//! What `LazyPolicy` does through `Engine` (exactly):
//!
//! - A *step* is one batch of new tokens (a prefill call or a decode token);
//!   the policy detects it from the KV length at `select`. Each step starts
//!   with every token active.
//! - `select` at layer l returns, for every KV head and every query of the
//!   step, the same set: the prompt tokens active at l plus every token that
//!   is not a prompt token (generated ones). The kernel clips it causally.
//! - At a pruning point (`LazyPoint::layer` = p), after planning layer p the
//!   policy computes the importance of every active token: softmax over the
//!   active set of `scale * q_last . k` per q head (the same logits as the
//!   attention at p), averaged over the q heads. The top
//!   `keep_count(keep, n_prompt)` active prompt tokens stay active for layers
//!   p+1.. (nested: a token pruned at p is never active later in the step);
//!   the step's last token always stays; ties keep the later token. Layers
//!   between points use the previous point's set; layers up to and including
//!   the first point see everything.
//! - In decode the sets are recomputed every step from the new token's query,
//!   which is how pruned prompt tokens come back.
//!
//! What it does NOT do (needs the engine hook): it cannot stop the engine
//! from computing pruned rows. Through `Engine`, every token is still
//! projected and attended at every layer; only the key sets shrink. So:
//! the rows LazyLLM computes (the kept tokens' queries) see exactly LazyLLM's
//! key sets and give LazyLLM's outputs within a prefill step; the rows it
//! would not compute (pruned tokens after their point) are computed anyway
//! over the same restricted key set (causally clipped, zero output where it
//! is empty), and their later-layer K/V, which LazyLLM computes only when a
//! later step revives the token (from the aux cache, attending to that step's
//! sets), here come from that earlier computation. Outputs after a revival
//! therefore differ from a true LazyLLM engine; the policy's internal
//! `LazyPlan` still counts the rows a hook would compute (`stats`), which is
//! the paper's "% of prompt tokens computed" cost model.

mod plan;

pub use plan::{keep_count, top_k, LayerPlan, LazyPlan, PlanStats, PruneResult};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Policy, SelectOutput, SelectRequest, Selection};
use crate::attention::AttnShape;
use crate::config::{LazyConfig, ModelShape};
use crate::dtype::dot_f32;
use crate::error::{Error, Result};
use crate::kv::KvRead;
use crate::parallel::par_map;

/// Mean over the q heads of the attention probability that query `q`
/// (`[n_q_heads][head_dim]`) gives each token of `tokens`, the softmax taken
/// over exactly those tokens with logits `shape.scale * q . k` (q head h reads
/// KV head h / group). f32 logits, f64 exponentials and sums, f32 result
/// (a probability below f32's range in every head ties at 0; `top_k` then
/// prefers the later token). Errors on a shape mismatch, a token beyond the
/// KV, or a NaN/infinite result.
pub fn importance(
    shape: &AttnShape,
    q: &[f32],
    kv: &dyn KvRead,
    tokens: &[u32],
) -> Result<Vec<f32>> {
    shape.validate()?;
    let (g, d, hkv) = (shape.group(), shape.head_dim, shape.n_kv_heads);
    if q.len() != shape.q_elems() {
        return Err(Error::shape(
            "lazy importance query",
            shape.q_elems(),
            q.len(),
        ));
    }
    if kv.n_kv_heads() != hkv || kv.head_dim() != d {
        return Err(Error::shape(
            "lazy importance KV (heads x dim)",
            format!("{hkv} x {d}"),
            format!("{} x {}", kv.n_kv_heads(), kv.head_dim()),
        ));
    }
    if let Some(&t) = tokens.iter().find(|&&t| t as usize >= kv.len()) {
        return Err(Error::OutOfRange(format!(
            "lazy importance token {t} of a KV holding {}",
            kv.len()
        )));
    }
    let n = tokens.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let scale = shape.scale;
    // One partial sum per KV head (its group's q heads), summed after.
    let parts: Vec<Vec<f64>> = par_map(hkv, |h| {
        let mut acc = vec![0f64; n];
        // Logits `[g][n]`: each key row is read (and converted) once for
        // the whole group.
        let mut logits = vec![0f32; g * n];
        let mut krow = vec![0f32; d];
        for (i, &t) in tokens.iter().enumerate() {
            if i + 8 < n {
                kv.prefetch_key(h, tokens[i + 8] as usize);
            }
            kv.read_key(h, t as usize, &mut krow);
            for j in 0..g {
                let qh = &q[(h * g + j) * d..(h * g + j + 1) * d];
                logits[j * n + i] = scale * dot_f32(qh, &krow);
            }
        }
        let mut ex = vec![0f64; n];
        for j in 0..g {
            let logits = &logits[j * n..(j + 1) * n];
            let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut z = 0f64;
            for (e, &l) in ex.iter_mut().zip(logits) {
                *e = ((l - m) as f64).exp();
                z += *e;
            }
            let inv = 1.0 / z;
            for (a, &e) in acc.iter_mut().zip(&ex) {
                *a += e * inv;
            }
        }
        acc
    });
    let inv_h = 1.0 / shape.n_q_heads as f64;
    let out: Vec<f32> = (0..n)
        .map(|i| (parts.iter().map(|p| p[i]).sum::<f64>() * inv_h) as f32)
        .collect();
    if let Some(i) = out.iter().position(|x| !x.is_finite()) {
        return Err(Error::Invalid(format!(
            "lazy importance of token {} is {} (non-finite query or keys)",
            tokens[i], out[i]
        )));
    }
    Ok(out)
}

struct SeqState {
    plan: LazyPlan,
    /// KV length of the current step.
    step_len: usize,
    /// The last layer planned in this step, with its plan.
    last: Option<LayerPlan>,
    /// Pruning points applied in this step.
    prunes: Vec<PruneResult>,
}

struct Shared {
    cfg: LazyConfig,
    n_layers: usize,
    seqs: HashMap<u64, SeqState>,
}

/// State shared by every lazy layer of an engine (keep sets cross layers).
/// Cheap to clone (one `Arc`). Also the read side for benches and hooks.
#[derive(Clone)]
pub struct LazyShared {
    inner: Arc<Mutex<Shared>>,
}

impl LazyShared {
    pub fn new(cfg: LazyConfig, model: &ModelShape) -> Result<Self> {
        // Validates the points.
        LazyPlan::new(model.n_layers, &cfg.points)?;
        Ok(LazyShared {
            inner: Arc::new(Mutex::new(Shared {
                cfg,
                n_layers: model.n_layers,
                seqs: HashMap::new(),
            })),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn config(&self) -> LazyConfig {
        self.lock().cfg.clone()
    }

    /// Prompt tokens active at `layer` in `seq`'s current (or last) step,
    /// ascending, as far as the step has got: a layer past the last pruning
    /// point applied gets that point's set. None for an unknown sequence.
    pub fn keep_set(&self, seq: u64, layer: usize) -> Option<Vec<u32>> {
        let g = self.lock();
        let st = g.seqs.get(&seq)?;
        match st.prunes.iter().rev().find(|p| p.layer < layer) {
            Some(p) => Some(p.keep.clone()),
            None => Some(
                (0..st.plan.len() as u32)
                    .filter(|&t| st.plan.is_prompt(t))
                    .collect(),
            ),
        }
    }

    /// The pruning points applied in `seq`'s current (or last) step.
    pub fn prunes(&self, seq: u64) -> Option<Vec<PruneResult>> {
        self.lock().seqs.get(&seq).map(|s| s.prunes.clone())
    }

    /// The plan of the last layer `seq` was selected at (what a hook would
    /// compute there).
    pub fn last_layer_plan(&self, seq: u64) -> Option<LayerPlan> {
        self.lock().seqs.get(&seq).and_then(|s| s.last.clone())
    }

    /// Rows a LazyLLM engine hook would have computed for `seq` so far.
    pub fn stats(&self, seq: u64) -> Option<PlanStats> {
        self.lock().seqs.get(&seq).map(|s| s.plan.stats())
    }

    /// Run `f` on `seq`'s plan (read only).
    pub fn with_plan<R>(&self, seq: u64, f: impl FnOnce(&LazyPlan) -> R) -> Option<R> {
        self.lock().seqs.get(&seq).map(|s| f(&s.plan))
    }

    fn forget(&self, seq: u64) {
        self.lock().seqs.remove(&seq);
    }
}

/// One layer's LazyLLM policy (see the module docs).
pub struct LazyPolicy {
    layer: usize,
    shared: LazyShared,
}

impl LazyPolicy {
    pub fn new(shared: LazyShared, layer: usize) -> Self {
        LazyPolicy { layer, shared }
    }
    pub fn shared(&self) -> &LazyShared {
        &self.shared
    }
}

impl Policy for LazyPolicy {
    fn name(&self) -> &'static str {
        "lazy"
    }

    fn select(&mut self, req: &SelectRequest<'_>) -> Result<SelectOutput> {
        let layer = self.layer;
        let n = req.n_queries();
        let len = req.kv.len();
        let qe = req.shape.q_elems();
        if n == 0 || req.queries.len() != n * qe || req.q_start + n != len {
            return Err(Error::Invalid(format!(
                "lazy layer {layer}: queries must be the sequence's last tokens (q_start {} + {n} queries of {qe} elements, {} given, KV holds {len})",
                req.q_start,
                req.queries.len()
            )));
        }
        let mut g = self.shared.lock();
        let n_layers = g.n_layers;
        if layer >= n_layers {
            return Err(Error::OutOfRange(format!(
                "lazy layer {layer} of {n_layers}"
            )));
        }
        if !g.seqs.contains_key(&req.seq) {
            let plan = LazyPlan::new(n_layers, &g.cfg.points)?;
            g.seqs.insert(
                req.seq,
                SeqState {
                    plan,
                    step_len: 0,
                    last: None,
                    prunes: Vec::new(),
                },
            );
        }
        let st = g.seqs.get_mut(&req.seq).expect("inserted");
        if len != st.step_len {
            // A new step.
            if len < st.plan.len() {
                return Err(Error::Invalid(format!(
                    "lazy layer {layer}: sequence {} holds {len} tokens but the policy saw {} (sequences must not shrink)",
                    req.seq,
                    st.plan.len()
                )));
            }
            if st.plan.in_step() {
                st.plan.end_step()?;
            }
            if st.plan.is_empty() && len > n {
                // Tokens this policy never saw (a forked prefix): their KV
                // exists in every layer.
                st.plan.register_computed(len - n, true)?;
            }
            let n_new = len - st.plan.len();
            if n_new == 0 {
                return Err(Error::Invalid(format!(
                    "lazy layer {layer}: sequence {} has no new tokens for this step",
                    req.seq
                )));
            }
            st.plan.begin_step(n_new, req.phase)?;
            st.step_len = len;
            st.last = None;
            st.prunes.clear();
        } else if st.plan.next_layer().is_some_and(|nl| layer < nl) {
            // The same layer again in this step: same selection.
            return match &st.last {
                Some(lp) if lp.layer == layer => Ok(selection(req, &lp.attend)),
                _ => Err(Error::Invalid(format!(
                    "lazy layer {layer}: layers out of order in a step of sequence {} (already at layer {:?})",
                    req.seq,
                    st.last.as_ref().map(|l| l.layer)
                ))),
            };
        }
        let lp = st.plan.layer(layer).map_err(|e| {
            Error::Invalid(format!(
                "lazy layer {layer}, sequence {}: {e} (every pruning layer must be attended, in layer order, each step)",
                req.seq
            ))
        })?;
        if st.plan.pending_prune() == Some(layer) {
            let q_last = &req.queries[(n - 1) * qe..n * qe];
            let imp = importance(&req.shape, q_last, req.kv, &lp.attend);
            let pr = match imp.and_then(|imp| st.plan.prune_top(layer, &imp)) {
                Ok(pr) => pr,
                Err(e) => {
                    // Keep the plan consistent: nothing pruned here.
                    let keep: Vec<u32> = lp
                        .attend
                        .iter()
                        .copied()
                        .filter(|&t| st.plan.is_prompt(t))
                        .collect();
                    st.plan.prune(layer, &keep)?;
                    return Err(Error::Invalid(format!(
                        "lazy layer {layer}, sequence {}: {e}",
                        req.seq
                    )));
                }
            };
            tracing::debug!(
                layer,
                seq = req.seq,
                kept = pr.keep.len(),
                to_aux = pr.to_aux.len(),
                "lazy pruning point"
            );
            st.prunes.push(pr);
        }
        let out = selection(req, &lp.attend);
        st.last = Some(lp);
        Ok(out)
    }

    fn end_sequence(&mut self, seq: u64) {
        self.shared.forget(seq);
    }
}

/// LazyLLM folded onto one layer's KV, for single-layer benchmarks (and
/// callers that hold one layer): every `select` is one step of a two-layer
/// model whose layer 0 is a pruning point with fraction `keep` and whose
/// layer 1 attends to the kept set, both reading the request's KV. So each
/// call computes the importance from the request's last query over every
/// token (the pruning layer's cost) and returns the top `keep` fraction of
/// the prompt plus every generated token (what the layers after the point
/// attend to). Tokens present before the first call count as prompt tokens.
/// In a real model the importance is paid once per pruning point (default 4
/// of 32 layers) and the reduced set serves every layer until the next one.
pub struct LazySingleLayer {
    prune: LazyPolicy,
    attend: LazyPolicy,
}

impl LazySingleLayer {
    pub fn new(keep: f32) -> Result<Self> {
        let model = ModelShape {
            n_layers: 2,
            ..ModelShape::default()
        };
        let shared = LazyShared::new(
            LazyConfig {
                points: vec![crate::config::LazyPoint { layer: 0, keep }],
            },
            &model,
        )?;
        Ok(LazySingleLayer {
            prune: LazyPolicy::new(shared.clone(), 0),
            attend: LazyPolicy::new(shared, 1),
        })
    }
    pub fn shared(&self) -> &LazyShared {
        self.attend.shared()
    }
}

impl Policy for LazySingleLayer {
    fn name(&self) -> &'static str {
        "lazy"
    }
    fn select(&mut self, req: &SelectRequest<'_>) -> Result<SelectOutput> {
        self.prune.select(req)?;
        self.attend.select(req)
    }
    fn end_sequence(&mut self, seq: u64) {
        self.prune.end_sequence(seq);
    }
}

/// One selection for every query of the request: `tokens` for every KV head.
fn selection(req: &SelectRequest<'_>, tokens: &[u32]) -> SelectOutput {
    let one = Selection::from_tokens(std::slice::from_ref(&tokens.to_vec()));
    let ranges = one.heads.into_iter().next().unwrap_or_default();
    SelectOutput {
        q_block: req.n_queries().max(1),
        blocks: vec![Selection {
            heads: vec![ranges; req.shape.n_kv_heads],
        }],
    }
}
