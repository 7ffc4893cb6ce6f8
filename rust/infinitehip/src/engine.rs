//! The plugin's one API surface: an engine built from a `PolicyConfig`
//! holds, per layer, a paged KV pool and that layer's policy. Callers register
//! sequences, append K/V as their model produces it, and ask for attention.
//! The C++ bridge and the Python shim wrap exactly this.

use half::{bf16, f16};

use crate::attention::{self, AttnShape};
use crate::config::{LayerPolicy, PolicyConfig, RopeMode};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::kv::{CacheStats, KvLayout, KvPool, PageCache, PoolStats, RowCache, SeqView};
use crate::offload::{decode_offloaded, CountingKv, StepStats};
use crate::policy::hip::HipPolicy;
use crate::policy::lazy::{LazyPolicy, LazyShared};
use crate::policy::locret::LocretPolicy;
use crate::policy::squeeze::SqueezePolicy;
use crate::policy::{DensePolicy, InsertInfo, Phase, Policy, SelectRequest, Selection};
use crate::rope::Rope;

/// One layer's KV: the host tier (every page) and, when configured, a
/// device page cache that decode reads through.
struct Tier<T: Element> {
    host: KvPool<T>,
    cache: Option<PageCache<T>>,
    /// Key rows mask estimation reads, when offloaded.
    rows: Option<RowCache>,
    step: StepStats,
}

impl<T: Element> Tier<T> {
    fn new(layout: KvLayout, cache_pages: Option<usize>, rows: Option<usize>) -> Result<Self> {
        Ok(Tier {
            rows: rows.map(|n| RowCache::new(n, layout.head_dim * std::mem::size_of::<T>())),
            host: KvPool::new(layout, None)?,
            // The config counts pages; the cache holds one slot per (page, KV head).
            cache: cache_pages
                .map(|n| PageCache::new(layout, n * layout.n_kv_heads))
                .transpose()?,
            step: StepStats::default(),
        })
    }

    /// Forget cached copies of pages that `seq` holds (before the host
    /// rewrites or frees them).
    fn invalidate_seq(&mut self, seq: u64) -> Result<()> {
        let table = self.host.page_table(seq)?;
        if let Some(c) = &mut self.cache {
            for &p in table {
                c.invalidate(p);
            }
        }
        if let Some(r) = &mut self.rows {
            r.invalidate_pages(table);
        }
        Ok(())
    }

    fn has_sequence(&self, seq: u64) -> bool {
        self.host.has_sequence(seq)
    }
}

enum Pool {
    F32(Tier<f32>),
    F16(Tier<f16>),
    Bf16(Tier<bf16>),
}

/// Run `$body` with `$p` bound to the typed tier.
macro_rules! with_pool {
    ($pool:expr, $p:ident => $body:expr) => {
        match $pool {
            Pool::F32($p) => $body,
            Pool::F16($p) => $body,
            Pool::Bf16($p) => $body,
        }
    };
}

struct Layer {
    pool: Pool,
    policy: Box<dyn Policy>,
    method: &'static str,
    /// Set when this layer attends with streaming positions.
    streaming: Option<Rope>,
    /// (sink, window) tokens kept resident in the device page cache.
    pinned: (usize, usize),
}

/// Pre-RoPE projections of appended tokens, for policies that score at
/// insertion (Locret). q: `[n][n_q_heads][d]`, k and v: `[n][n_kv_heads][d]`.
pub struct Projections<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
}

#[derive(Clone, Debug, PartialEq)]
pub struct LayerStats {
    pub method: &'static str,
    /// Host tier occupancy.
    pub pool: PoolStats,
    /// Device page cache bytes (0 when the layer has no cache).
    pub device_bytes: usize,
    /// Cumulative cache counters since the engine was created.
    pub cache: CacheStats,
    /// Counters of the layer's last decode step.
    pub last_step: StepStats,
}

pub struct Engine {
    cfg: PolicyConfig,
    shape: AttnShape,
    layers: Vec<Layer>,
    /// State shared by the lazy layers (LazyLLM keep sets cross layers).
    lazy: Option<LazyShared>,
}

/// The policy object a layer runs (also used by the C++ bridge's llama.cpp
/// path). `lazy`: the state lazy layers share (None where none is lazy).
pub fn build_policy(
    p: &LayerPolicy,
    cfg: &PolicyConfig,
    layer: usize,
    lazy: Option<&LazyShared>,
) -> Result<Box<dyn Policy>> {
    Ok(match p {
        LayerPolicy::Dense => Box::new(DensePolicy),
        LayerPolicy::Hip(h) => Box::new(HipPolicy::new(h.clone(), &cfg.model)?),
        LayerPolicy::Locret(c) => Box::new(LocretPolicy::new(c.clone(), &cfg.model, layer)?),
        LayerPolicy::Squeeze(s) => Box::new(SqueezePolicy::new(s.clone(), &cfg.model)?),
        LayerPolicy::Lazy(_) => Box::new(LazyPolicy::new(
            lazy.cloned().ok_or_else(|| {
                Error::config(format!("layer {layer} method"), "lazy state missing")
            })?,
            layer,
        )),
    })
}

impl Engine {
    pub fn new(cfg: PolicyConfig) -> Result<Self> {
        cfg.validate()?;
        crate::parallel::threads_from_env()?;
        let m = cfg.model;
        let shape = AttnShape::new(m.n_q_heads, m.n_kv_heads, m.head_dim)?;
        let layout = KvLayout {
            n_kv_heads: m.n_kv_heads,
            head_dim: m.head_dim,
            page_size: cfg.kv.page_size,
        };
        let lazy = (0..m.n_layers)
            .find_map(|l| match cfg.layer_policy(l) {
                LayerPolicy::Lazy(z) => Some(z.clone()),
                _ => None,
            })
            .map(|z| LazyShared::new(z, &m))
            .transpose()?;
        let mut layers = Vec::with_capacity(m.n_layers);
        for l in 0..m.n_layers {
            let p = cfg.layer_policy(l);
            let (cp, rows) = (cfg.kv.device_cache_pages, cfg.kv.estimation_cache_rows);
            let pool = match cfg.kv.dtype {
                DType::F32 => Pool::F32(Tier::new(layout, cp, rows)?),
                DType::F16 => Pool::F16(Tier::new(layout, cp, rows)?),
                DType::Bf16 => Pool::Bf16(Tier::new(layout, cp, rows)?),
            };
            let streaming = match p {
                LayerPolicy::Hip(h) if h.rope.attention == RopeMode::Streaming => {
                    Some(Rope::new(m.head_dim, m.rope_theta))
                }
                _ => None,
            };
            let pinned = match p {
                LayerPolicy::Hip(h) => (h.sink, h.window),
                _ => (0, 0),
            };
            layers.push(Layer {
                pool,
                policy: build_policy(p, &cfg, l, lazy.as_ref())?,
                method: p.method(),
                streaming,
                pinned,
            });
        }
        tracing::info!(layers = m.n_layers, dtype = %cfg.kv.dtype, "infinitehip engine created");
        Ok(Engine {
            cfg,
            shape,
            layers,
            lazy,
        })
    }

    /// The LazyLLM state (keep sets, plans, row counts) when some layer runs
    /// `lazy`: what an engine hook that drops rows between layers reads.
    pub fn lazy(&self) -> Option<&LazyShared> {
        self.lazy.as_ref()
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }
    pub fn shape(&self) -> AttnShape {
        self.shape
    }
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    fn layer(&mut self, layer: usize) -> Result<&mut Layer> {
        let n = self.layers.len();
        self.layers
            .get_mut(layer)
            .ok_or_else(|| Error::OutOfRange(format!("layer {layer} of {n}")))
    }

    /// Register a sequence in every layer.
    pub fn add_sequence(&mut self, seq: u64) -> Result<()> {
        if self
            .layers
            .iter()
            .any(|l| with_pool!(&l.pool, p => p.has_sequence(seq)))
        {
            return Err(Error::DuplicateSequence(seq));
        }
        for l in &mut self.layers {
            with_pool!(&mut l.pool, p => p.host.add_sequence(seq))?;
        }
        Ok(())
    }

    /// `child` shares `parent`'s KV pages (a common prefix) in every layer.
    pub fn fork_sequence(&mut self, parent: u64, child: u64) -> Result<()> {
        for l in &mut self.layers {
            with_pool!(&mut l.pool, p => p.host.fork(parent, child))?;
            l.policy.fork_sequence(parent, child);
        }
        Ok(())
    }

    pub fn free_sequence(&mut self, seq: u64) -> Result<()> {
        for l in &mut self.layers {
            with_pool!(&mut l.pool, p => {
                p.invalidate_seq(seq)?;
                p.host.free_sequence(seq)
            })?;
            l.policy.end_sequence(seq);
        }
        Ok(())
    }

    /// Tokens held for `seq` in `layer` (smaller than the sequence after eviction).
    pub fn seq_len(&self, layer: usize, seq: u64) -> Result<usize> {
        let l = self
            .layers
            .get(layer)
            .ok_or_else(|| Error::OutOfRange(format!("layer {layer}")))?;
        with_pool!(&l.pool, p => p.host.seq_len(seq))
    }

    /// Append post-RoPE K/V of new tokens (`[n][n_kv_heads][head_dim]`, any
    /// storage type, converted to the pool's) to one layer. `proj` carries the
    /// pre-RoPE projections policies that score at insertion need.
    pub fn append<T: Element>(
        &mut self,
        layer: usize,
        seq: u64,
        k: &[T],
        v: &[T],
        phase: Phase,
        prompt_done: bool,
        proj: Option<Projections<'_>>,
    ) -> Result<()> {
        let shape = self.shape;
        let l = self.layer(layer)?;
        let te = shape.n_kv_heads * shape.head_dim;
        if k.len() != v.len() || k.len() % te != 0 {
            return Err(Error::shape(
                "append K/V",
                format!("n x {te} elements each"),
                format!("k {}, v {}", k.len(), v.len()),
            ));
        }
        let n = k.len() / te;
        if let Some(pr) = &proj {
            if pr.q.len() != n * shape.q_elems() || pr.k.len() != n * te || pr.v.len() != n * te {
                return Err(Error::shape(
                    "append projections (q, k, v)",
                    format!("{} , {te}, {te} per token for {n} tokens", shape.q_elems()),
                    format!("{}, {}, {}", pr.q.len(), pr.k.len(), pr.v.len()),
                ));
            }
        }
        let Layer { pool, policy, .. } = l;
        if proj.is_none() && policy.needs_projections() {
            return Err(Error::Invalid(format!(
                "layer {layer} ({}) scores tokens at insertion: append needs the pre-RoPE projections (proj)",
                policy.name()
            )));
        }
        with_pool!(pool, p => {
            let start = p.host.seq_len(seq)?;
            p.host.append(seq, &convert(k), &convert(v))?;
            if let Some(c) = &mut p.cache {
                // Write-through: cached copies of the pages just written.
                let ps = p.host.layout().page_size;
                for &pg in &p.host.page_table(seq)?[start / ps..] {
                    c.refresh(&p.host, pg)?;
                }
            }
            // Policies see every append with projections, and the end of a
            // prompt (squeeze clusters its prefix then) with or without.
            if proj.is_some() || prompt_done {
                let (q, k, v) = proj.as_ref().map_or((&[][..], &[][..], &[][..]), |p| (p.q, p.k, p.v));
                let keep = {
                    let view = p.host.view(seq)?;
                    let info = InsertInfo { seq, shape, phase, start, q, k, v, kv: &view, prompt_done };
                    policy.after_append(&info)
                };
                // A policy that rejects the tokens (e.g. NaN scores) leaves
                // the sequence as it was before this append.
                let keep = match keep {
                    Ok(k) => k,
                    Err(e) => {
                        p.invalidate_seq(seq)?;
                        p.host.truncate(seq, start)?;
                        return Err(e);
                    }
                };
                if let Some(keep) = keep {
                    p.invalidate_seq(seq)?;
                    p.host.retain_per_head(seq, &keep)?;
                }
            }
            Ok(())
        })
    }

    /// Copy cache entries `start..end` of `seq` in `layer` out as f32 in the
    /// engine layout `[token][kv_head][dim]` (K, V). After per-head eviction
    /// (Locret) entry i of each head is that head's i-th held unit.
    pub fn read(
        &self,
        layer: usize,
        seq: u64,
        start: usize,
        end: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let l = self
            .layers
            .get(layer)
            .ok_or_else(|| Error::OutOfRange(format!("layer {layer}")))?;
        with_pool!(&l.pool, p => {
            let (k, v) = p.host.read(seq, start, end)?;
            Ok((convert(&k), convert(&v)))
        })
    }

    /// Run the eviction `layer`'s policy owes for `seq` now (Locret: after a
    /// prefill chunk's attention; otherwise it runs at the next append) and
    /// compact the pool, freeing pages.
    pub fn evict(&mut self, layer: usize, seq: u64) -> Result<()> {
        let Layer { pool, policy, .. } = self.layer(layer)?;
        with_pool!(pool, p => {
            p.host.seq_len(seq)?;
            if let Some(keep) = policy.evict(seq)? {
                p.invalidate_seq(seq)?;
                p.host.retain_per_head(seq, &keep)?;
            }
            Ok(())
        })
    }

    /// Causal attention for the last `n` tokens of `seq` (their K/V already
    /// appended): `q` `[n][n_q_heads][d]` post-RoPE, `out` the same shape.
    pub fn attend_prefill(
        &mut self,
        layer: usize,
        seq: u64,
        q: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        let shape = self.shape;
        let l = self.layer(layer)?;
        let qe = shape.q_elems();
        if q.len() % qe != 0 || q.is_empty() || out.len() != q.len() {
            return Err(Error::shape(
                "prefill q/out",
                format!("n x {qe}"),
                format!("q {}, out {}", q.len(), out.len()),
            ));
        }
        let n = q.len() / qe;
        let Layer {
            pool,
            policy,
            streaming,
            ..
        } = l;
        let streaming = streaming.as_ref();
        with_pool!(pool, p => {
            let view = p.host.view(seq)?;
            let len = view.len();
            if n > len {
                return Err(Error::OutOfRange(format!("{n} prefill queries but sequence {seq} holds {len} tokens")));
            }
            let chunk = policy.prefill_chunk().unwrap_or(n).max(1);
            for c0 in (0..n).step_by(chunk) {
                let c1 = (c0 + chunk).min(n);
                let (qc, oc) = (&q[c0 * qe..c1 * qe], &mut out[c0 * qe..c1 * qe]);
                let q_start = len - n + c0;
                let req = SelectRequest { seq, shape, phase: Phase::Prefill, queries: qc, q_start, kv: &view };
                let sel = policy.select(&req)?;
                attention::prefill_with(&shape, qc, q_start, &view, Some((&sel.blocks, sel.q_block)), streaming, oc)?;
            }
            Ok(())
        })
    }

    /// Decode attention for a batch: one query `[n_q_heads][d]` per sequence.
    pub fn attend_decode(
        &mut self,
        layer: usize,
        seqs: &[u64],
        q: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        let shape = self.shape;
        let l = self.layer(layer)?;
        let qe = shape.q_elems();
        if q.len() != seqs.len() * qe || out.len() != q.len() {
            return Err(Error::shape(
                "decode q/out",
                format!("{} x {qe}", seqs.len()),
                format!("q {}, out {}", q.len(), out.len()),
            ));
        }
        let Layer {
            pool,
            policy,
            streaming,
            pinned,
            ..
        } = l;
        let streaming = streaming.as_ref();
        with_pool!(pool, p => {
            let views: Vec<SeqView<'_, _>> = seqs.iter().map(|&s| p.host.view(s)).collect::<Result<_>>()?;
            let mut sels: Vec<Selection> = Vec::with_capacity(seqs.len());
            let mut est_bytes = 0;
            let mut est_rows = Vec::new();
            let record = p.rows.is_some();
            let ps = p.host.layout().page_size;
            for (i, (&s, v)) in seqs.iter().zip(&views).enumerate() {
                if v.is_empty() {
                    return Err(Error::Invalid(format!("decode on sequence {s} with no tokens: append its K/V first")));
                }
                // Mask estimation reads keys in place on the host tier; count them
                // (and, with an estimation row cache, record which rows).
                let mut counting = CountingKv::new(v, std::mem::size_of_val(&v.key_row(0, 0)[0]));
                if record {
                    counting = counting.recording(p.host.page_table(s)?, ps);
                }
                let req = SelectRequest { seq: s, shape, phase: Phase::Decode, queries: &q[i * qe..(i + 1) * qe], q_start: v.len() - 1, kv: &counting };
                sels.push(policy.select(&req)?.blocks.swap_remove(0));
                est_bytes += counting.bytes();
                est_rows.extend(counting.take_rows());
            }
            let est_cache = match &mut p.rows {
                Some(r) => {
                    let before = r.stats();
                    r.access(&est_rows);
                    let after = r.stats();
                    CacheStats {
                        hits: after.hits - before.hits,
                        misses: after.misses - before.misses,
                        bytes_copied: after.bytes_copied - before.bytes_copied,
                        evictions: after.evictions - before.evictions,
                    }
                }
                None => CacheStats::default(),
            };
            let Some(cache) = &mut p.cache else {
                return attention::decode_with(&shape, q, &views, Some(&sels), streaming, out);
            };
            let (sink, window) = *pinned;
            let pins: Vec<Vec<std::ops::Range<usize>>> = views.iter().map(|v| vec![0..sink.min(v.len()), v.len().saturating_sub(window)..v.len()]).collect();
            drop(views);
            let mut st = decode_offloaded(&shape, q, &p.host, seqs, &sels, &pins, cache, streaming, out)?;
            st.estimation_bytes = est_bytes;
            st.estimation_cache = est_cache;
            p.step = st;
            tracing::debug!(layer, hits = st.cache.hits, misses = st.cache.misses, bytes_copied = st.cache.bytes_copied, estimation_bytes = est_bytes, "decode step through device page cache");
            Ok(())
        })
    }

    pub fn stats(&self) -> Vec<LayerStats> {
        self.layers
            .iter()
            .map(|l| LayerStats {
                method: l.method,
                pool: with_pool!(&l.pool, p => p.host.stats()),
                device_bytes: with_pool!(&l.pool, p => p.cache.as_ref().map_or(0, |c| c.bytes()) + p.rows.as_ref().map_or(0, |r| r.bytes())),
                cache: with_pool!(&l.pool, p => p.cache.as_ref().map_or(CacheStats::default(), |c| c.stats())),
                last_step: with_pool!(&l.pool, p => p.step),
            })
            .collect()
    }

    /// Every layer's stats as JSON `{"layers": [...]}`: the one schema the C
    /// ABI, the C++ bridge and the Python shim report.
    pub fn stats_json(&self) -> String {
        let layers: Vec<_> = self
            .stats()
            .iter()
            .enumerate()
            .map(|(i, s)| s.to_json(i))
            .collect();
        serde_json::json!({ "layers": layers }).to_string()
    }
}

impl LayerStats {
    /// This layer's stats as JSON (cumulative cache counters and the last
    /// decode step's, see `stats_json`).
    pub fn to_json(&self, layer: usize) -> serde_json::Value {
        serde_json::json!({
            "layer": layer,
            "method": self.method,
            "pages_in_use": self.pool.pages_in_use,
            "pages_free": self.pool.pages_free,
            "host_bytes": self.pool.bytes_in_use,
            "sequences": self.pool.sequences,
            "device_bytes": self.device_bytes,
            "cache": {
                "hits": self.cache.hits,
                "misses": self.cache.misses,
                "bytes_copied": self.cache.bytes_copied,
                "evictions": self.cache.evictions,
                "hit_ratio": self.cache.hit_ratio(),
            },
            "last_step": {
                "hits": self.last_step.cache.hits,
                "misses": self.last_step.cache.misses,
                "bytes_copied": self.last_step.cache.bytes_copied,
                "blocks_needed": self.last_step.blocks_needed,
                "estimation_cache_hits": self.last_step.estimation_cache.hits,
                "estimation_cache_misses": self.last_step.estimation_cache.misses,
                "estimation_bytes": self.last_step.estimation_bytes,
            },
        })
    }
}

fn convert<S: Element, D: Element>(x: &[S]) -> Vec<D> {
    x.iter().map(|v| D::from_f32(v.to_f32())).collect()
}
