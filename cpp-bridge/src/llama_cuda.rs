//! llama.cpp CUDA route: our CUDA attention (`GpuAttention`) over
//! llama.cpp's own device K/V, on ggml's CUDA stream.
//!
//! llama.cpp's K (and V with flash attention on) cache of a layer is
//! `[head_dim, n_head_kv, kv_size]` per stream, one cell per token: a
//! token-major pool, i.e. page size 1 with a cell-order table (as SGLang's
//! `req_to_token`). The C++ side (patch 0004) builds, once per ubatch on the
//! host from the KV cell metadata, a table `[n_stream][n_kv]` of cells in
//! sequence-position order (a graph input, copied to the device by ggml's
//! scheduler), and registers a `GGML_OP_CUSTOM` that ggml-cuda runs on its
//! own stream. That op calls [`LlamaCudaAttn::attend`] with device
//! pointers: q (f32, llama.cpp's layout), the K/V views, the table and the
//! f32 output. Nothing is read back and nothing waits on the host: the hip
//! mask refresh state lives on the device, per (layer, sequence), as in the
//! SGLang backend.
//!
//! Prefill ubatches (patch 0008: several tokens of one sequence, context
//! at or above the config's `prefill_dense_below`) call
//! [`LlamaCudaAttn::prefill`] with the same table (one row): hip layers run
//! the engine's sparse prefill (tensor-core mask estimator + block-sparse
//! causal attention, chunks of `prefill_chunk` queries).
//!
//! Check mode (`LLAMA_INFINITEHIP_CUDA_CHECK=N`, tests): for the first `N`
//! calls, wait for the device, read q, the output, the table, the K/V rows
//! and the selection back, and compare the output with the f64 reference
//! over the same selection and the same K/V (`attend_f64`); also check that
//! every head's selection holds the sink and the window. The worst relative
//! error and the count of failed checks appear in `stats_json`. Prefill
//! calls in check mode compare their first, middle and last query rows
//! with the f64 dense causal reference (`prefill_check`: the distance of
//! the sparse prefill from dense, within rounding for a covering budget);
//! with hip's RoPE modes they also compare the route's block selections
//! with the CPU `HipPolicy`'s over the same K/V and those rows with the
//! f64 streaming reference over the route's own selection
//! (`prefill_check_rope`).
//!
//! Without the crate feature `cuda`, [`llama_cuda_attn_new`] returns an
//! error and the C++ side keeps the other routes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use infinitehip::Result;

use crate::ffi::CudaAttnArgs;
use crate::llama::LlamaPlugin;
use crate::{guard, stats_unavailable, Poison};

/// ggml_type ids of the K/V caches the kernels read.
pub const GGML_TYPE_F16: u32 = 1;
pub const GGML_TYPE_BF16: u32 = 30;

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    rows: AtomicU64,
    tokens: AtomicU64,
    resets: AtomicU64,
    /// Host time spent in `attend` (launch + small uploads), ns.
    host_ns: AtomicU64,
    checks: AtomicU64,
    check_fail: AtomicU64,
    /// f64 bits of the worst relative error seen in check mode.
    check_worst: AtomicU64,
    check_selected: AtomicU64,
    check_visible: AtomicU64,
    prefill_calls: AtomicU64,
    prefill_tokens: AtomicU64,
    prefill_checks: AtomicU64,
    /// f64 bits of the worst prefill row's relative error vs dense.
    prefill_check_worst: AtomicU64,
    /// RoPE-mode prefill (check mode): query blocks compared with the CPU
    /// policy's selection over the same K/V, and those that differ.
    rope_pf_blocks: AtomicU64,
    rope_pf_block_mismatch: AtomicU64,
    /// ... and rows vs the f64 streaming reference over the route's own
    /// selection (f64 bits of the worst relative error).
    rope_pf_rows: AtomicU64,
    rope_pf_worst: AtomicU64,
}

/// Raise `cell` (f64 bits) to `e` (NaN counts as infinite).
#[cfg(feature = "cuda")]
fn raise_worst(cell: &AtomicU64, e: f64) {
    let e = if e.is_nan() { f64::INFINITY } else { e };
    let mut cur = cell.load(Ordering::Relaxed);
    while e > f64::from_bits(cur) {
        match cell.compare_exchange(cur, e.to_bits(), Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => break,
            Err(x) => cur = x,
        }
    }
}

/// Our CUDA attention for one llama.cpp context (module doc).
pub struct LlamaCudaAttn {
    #[cfg(feature = "cuda")]
    inner: Mutex<imp::Inner>,
    #[cfg(not(feature = "cuda"))]
    _inner: Mutex<()>,
    counters: Counters,
    method: Vec<&'static str>,
    /// `kv.device_cache_pages` set (`llama_offload`).
    host_tier: bool,
    /// Set by a caught panic (`guarded`).
    pub poison: Poison,
}

/// The CUDA route of `plugin`'s config: an error when this build lacks the
/// `cuda` feature, when no CUDA device/driver is found, or when a layer's
/// method or the head shape is not one the CUDA kernels run.
pub fn llama_cuda_attn_new(
    plugin: &LlamaPlugin,
) -> std::result::Result<Box<LlamaCudaAttn>, String> {
    guard(|| {
        only_dense_and_hip(plugin.config())?;
        plugin.refuse_per_q_head("CUDA route")?;
        let host_tier = crate::llama_offload::offload_sizes(plugin.config())?.is_some();
        cuda_rope_layout(plugin, host_tier)?;
        new_impl(plugin).map(Box::new)
    })
}

/// hip's RoPE modes on this route (issue 12): the layout and frequencies
/// `GpuAttention` re-rotates llama.cpp's stored keys and queries with
/// (`GpuAttention::set_rope_layout`): NORM (pairs 2i, 2i+1: its Llama
/// models) or NEOX, llama.cpp's freq_base and linear freq_scale (patch
/// 0006). None when no hip layer runs a mode. Prefill: ubatches whose
/// context reaches past the trained length (`model.max_position` =
/// llama.cpp's n_ctx_train) are never dense-below
/// (`LlamaPlugin::dense_below`), so they run `GpuAttention::prefill` with
/// the modes' sparse prefill (`rope_prefill_sparse`: also for a ubatch
/// within the trained length routed at or above `prefill_dense_below`, as
/// the CPU route plans it); below the thresholds, llama.cpp's attention. A prefill ubatch the route cannot take
/// there (several sequences, gaps, one token) keeps llama.cpp's attention
/// at its positions, logged once (patch 0012). Refused, naming the layer: partial rotary
/// (n_rot below head_dim: the kernels rotate whole heads), K/V in host
/// memory (`kv.device_cache_pages`: the host-tier decode has no modes).
/// YaRN and other rope types are refused when the plugin is built
/// (`layer_rope`).
pub(crate) fn cuda_rope_layout(
    plugin: &LlamaPlugin,
    host_tier: bool,
) -> Result<Option<infinitehip::rope::RopeLayout>> {
    use infinitehip::config::{LayerPolicy, RopeMode};
    let cfg = plugin.config();
    let Some(l) = (0..cfg.model.n_layers).find(|&l| {
        matches!(cfg.layer_policy(l), LayerPolicy::Hip(h)
            if h.rope.scoring != RopeMode::Original || h.rope.attention != RopeMode::Original)
    }) else {
        return Ok(None);
    };
    let at = format!("layer {l} hip.rope");
    if host_tier {
        return Err(infinitehip::Error::config(
            at,
            "CUDA route over host K/V (kv.device_cache_pages, --no-kv-offload) has no RoPE modes: \
             the rotated scorers and the streaming gather read keys in device memory; keep the K/V \
             on the GPU or use \"original\"",
        ));
    }
    let r = plugin.rope_info().ok_or_else(|| {
        infinitehip::Error::config(
            &at,
            "CUDA route: the RoPE modes need llama.cpp's rope parameters (patch 0006)",
        )
    })?;
    if r.n_rot as usize != cfg.model.head_dim {
        return Err(infinitehip::Error::config(
            at,
            format!(
                "CUDA route: partial rotary (llama.cpp rotates {} of {} dims per head): the GPU \
                 kernels rotate whole heads; run this model's RoPE modes on the CPU route",
                r.n_rot, cfg.model.head_dim
            ),
        ));
    }
    let interleaved = match r.rope_type {
        crate::llama_rope::LLAMA_ROPE_TYPE_NORM => true,
        crate::llama_rope::LLAMA_ROPE_TYPE_NEOX => false,
        t => {
            return Err(infinitehip::Error::config(
                at,
                format!("CUDA route: llama.cpp rope type {t} (the RoPE modes move NORM and NEOX)"),
            ))
        }
    };
    if r.yarn {
        return Err(infinitehip::Error::config(
            at,
            "the model uses YaRN RoPE scaling; the RoPE modes support plain and linear RoPE",
        ));
    }
    Ok(Some(infinitehip::rope::RopeLayout {
        interleaved,
        freq_base: r.freq_base,
        freq_scale: r.freq_scale,
    }))
}

/// GpuAttention also runs lazy/squeeze/locret, but those need its prefill
/// (prompt queries, projections), which this route leaves to llama.cpp.
fn only_dense_and_hip(cfg: &infinitehip::config::PolicyConfig) -> Result<()> {
    for l in 0..cfg.model.n_layers {
        let m = cfg.layer_policy(l).method();
        if !matches!(m, "dense" | "hip") {
            return Err(infinitehip::Error::Invalid(format!(
                "CUDA route: runs dense and hip layers only (prefill stays llama.cpp's); layer {l} is `{m}`"
            )));
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn new_impl(_plugin: &LlamaPlugin) -> Result<LlamaCudaAttn> {
    Err(infinitehip::Error::Invalid(
        "CUDA route: infinitehip-cpp-bridge was built without the `cuda` feature".into(),
    ))
}

#[cfg(feature = "cuda")]
fn new_impl(plugin: &LlamaPlugin) -> Result<LlamaCudaAttn> {
    let inner = imp::Inner::new(plugin)?;
    let method = (0..inner.attn.n_layers())
        .map(|l| inner.attn.layer_method(l).unwrap_or("dense"))
        .collect();
    Ok(LlamaCudaAttn {
        host_tier: inner.offload.is_some(),
        inner: Mutex::new(inner),
        counters: Counters::default(),
        method,
        poison: Poison::default(),
    })
}

impl LlamaCudaAttn {
    /// "hip" or "dense": what this route runs for `layer`.
    pub fn layer_method(&self, layer: u32) -> String {
        // Fallback "none": the layer stays on llama.cpp's attention.
        self.poison.guard_or("layer_method", "none".into(), || {
            self.method
                .get(layer as usize)
                .copied()
                .unwrap_or("none")
                .to_string()
        })
    }

    /// The config asks for host K/V read through device caches.
    pub fn host_tier(&self) -> bool {
        self.host_tier
    }

    /// Attention of one query row per request: request `b` is stream `b`
    /// of the ubatch (table row `b`), sequence `seqs[b]`, `lens[b]` tokens
    /// (the query is the last). Launches on `args.stream`; nothing waits.
    pub fn attend(
        &self,
        args: &CudaAttnArgs,
        seqs: &[u64],
        lens: &[u32],
    ) -> std::result::Result<(), String> {
        let t0 = std::time::Instant::now();
        let r = self.poison.guard(|| self.attend_impl(args, seqs, lens));
        let c = &self.counters;
        c.host_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if r.is_ok() {
            c.calls.fetch_add(1, Ordering::Relaxed);
            c.rows.fetch_add(seqs.len() as u64, Ordering::Relaxed);
            c.tokens.fetch_add(
                lens.iter().map(|&l| l as u64).sum::<u64>(),
                Ordering::Relaxed,
            );
        }
        r
    }

    #[cfg(not(feature = "cuda"))]
    fn attend_impl(&self, _a: &CudaAttnArgs, _s: &[u64], _l: &[u32]) -> Result<()> {
        Err(infinitehip::Error::Invalid(
            "CUDA route: built without the `cuda` feature".into(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn attend_impl(&self, a: &CudaAttnArgs, seqs: &[u64], lens: &[u32]) -> Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.attend(a, seqs, lens, &self.counters)
    }

    /// Causal prefill of sequence `seq`'s last `n_new` tokens over its
    /// `len` cells (table row 0; query rows consecutive). Launches on
    /// `args.stream`; nothing waits (except in check mode).
    pub fn prefill(
        &self,
        args: &CudaAttnArgs,
        seq: u64,
        len: u32,
        n_new: u32,
    ) -> std::result::Result<(), String> {
        let t0 = std::time::Instant::now();
        let r = self
            .poison
            .guard(|| self.prefill_impl(args, seq, len as usize, n_new as usize));
        let c = &self.counters;
        c.host_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if r.is_ok() {
            c.prefill_calls.fetch_add(1, Ordering::Relaxed);
            c.prefill_tokens.fetch_add(n_new as u64, Ordering::Relaxed);
        }
        r
    }

    #[cfg(not(feature = "cuda"))]
    fn prefill_impl(&self, _a: &CudaAttnArgs, _s: u64, _l: usize, _n: usize) -> Result<()> {
        Err(infinitehip::Error::Invalid(
            "CUDA route: built without the `cuda` feature".into(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn prefill_impl(&self, a: &CudaAttnArgs, seq: u64, len: usize, n_new: usize) -> Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.prefill(a, seq, len, n_new, &self.counters)
    }

    /// Forget sequence `seq`'s hip state (its next decode refreshes every
    /// stage): after a prefill ubatch, a cleared or shortened sequence.
    pub fn end_request(&self, seq: u64) {
        self.poison.guard_or("end_request", (), || {
            self.counters.resets.fetch_add(1, Ordering::Relaxed);
            #[cfg(feature = "cuda")]
            {
                let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                g.attn.end_request(seq);
            }
            #[cfg(not(feature = "cuda"))]
            let _ = seq;
        })
    }

    pub fn cuda_stats_json(&self) -> String {
        self.poison
            .guard_or("stats_json", stats_unavailable("cuda route stats"), || {
                self.stats_json_impl()
            })
    }

    fn stats_json_impl(&self) -> String {
        let c = &self.counters;
        let l = |x: &AtomicU64| x.load(Ordering::Relaxed);
        let checks = l(&c.checks);
        #[cfg(feature = "cuda")]
        let tier = {
            let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            g.tier_json()
        };
        #[cfg(not(feature = "cuda"))]
        let tier = serde_json::Value::Null;
        #[cfg(feature = "cuda")]
        let rope_layout = {
            let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            match g.rope_layout {
                Some(l) => serde_json::json!({
                    "interleaved": l.interleaved,
                    "freq_base": l.freq_base,
                    "freq_scale": l.freq_scale,
                }),
                None => serde_json::Value::Null,
            }
        };
        #[cfg(not(feature = "cuda"))]
        let rope_layout = serde_json::Value::Null;
        let mut j = serde_json::json!({
            "route": "cuda (our attention over llama.cpp's device K/V)",
            "host_tier": tier,
            "rope_layout": rope_layout,
            "calls": l(&c.calls),
            "rows": l(&c.rows),
            "context_tokens": l(&c.tokens),
            "hip_resets": l(&c.resets),
            "host_ms": l(&c.host_ns) as f64 * 1e-6,
            "prefill_calls": l(&c.prefill_calls),
            "prefill_tokens": l(&c.prefill_tokens),
        });
        if l(&c.prefill_checks) > 0 {
            j["prefill_check"] = serde_json::json!({
                "rows": l(&c.prefill_checks),
                "worst_rel_err_vs_dense": f64::from_bits(l(&c.prefill_check_worst)),
            });
        }
        if l(&c.rope_pf_blocks) > 0 {
            j["prefill_check_rope"] = serde_json::json!({
                "blocks": l(&c.rope_pf_blocks),
                "blocks_differing_from_cpu_policy": l(&c.rope_pf_block_mismatch),
                "rows": l(&c.rope_pf_rows),
                "worst_rel_err_vs_streaming_ref": f64::from_bits(l(&c.rope_pf_worst)),
            });
        }
        if checks > 0 {
            let (s, v) = (l(&c.check_selected), l(&c.check_visible));
            j["check"] = serde_json::json!({
                "rows": checks,
                "failed": l(&c.check_fail),
                "worst_rel_err": f64::from_bits(l(&c.check_worst)),
                "selected_fraction": if v == 0 { 1.0 } else { s as f64 / v as f64 },
            });
        }
        j.to_string()
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::sync::atomic::Ordering;

    use half::{bf16, f16};
    use infinitehip::attention::reference::{attend_f64, attend_streaming_f64};
    use infinitehip::attention::{rel_error, AttnShape};
    use infinitehip::backend::cuda::dispatch::AttnOut;
    use infinitehip::backend::cuda::engine_attn::{
        EngineKv, GpuAttention, HostKvArgs, HostTier, HostTierConfig, HostTierStats, QArg,
    };
    use infinitehip::backend::cuda::offload::host_device_ptr;
    use infinitehip::backend::cuda::{DevBuf, GpuContext};
    use infinitehip::config::RopeMode;
    use infinitehip::config::{LayerPolicy, PolicyConfig};
    use infinitehip::dtype::DType;
    use infinitehip::kv::KvRead;
    use infinitehip::policy::hip::HipPolicy;
    use infinitehip::policy::{Phase, Policy, SelectRequest};
    use infinitehip::rope::Rope;
    use infinitehip::{Error, Result};

    use super::{raise_worst, Counters, GGML_TYPE_BF16, GGML_TYPE_F16};
    use crate::ffi::CudaAttnArgs;
    use crate::llama::LlamaPlugin;

    pub(super) struct Inner {
        // kept alive for `attn` (modules, context)
        _gpu: GpuContext,
        pub(super) attn: GpuAttention,
        cfg: PolicyConfig,
        check_left: u64,
        /// Host offload (`llama_offload`): cache sizes and per-layer tiers.
        pub(super) offload: Option<HostTierConfig>,
        tiers: Vec<Option<HostTier>>,
        /// hip's RoPE modes: llama.cpp's layout (check mode's streaming
        /// reference reads keys through it).
        pub(super) rope_layout: Option<infinitehip::rope::RopeLayout>,
    }

    impl Inner {
        pub(super) fn new(plugin: &LlamaPlugin) -> Result<Self> {
            let cfg = plugin.config().clone();
            let gpu = GpuContext::new(0)?;
            let mut attn = GpuAttention::new(&gpu, &cfg)?;
            let host_tier = crate::llama_offload::offload_sizes(&cfg)?.is_some();
            let rope_layout = super::cuda_rope_layout(plugin, host_tier)?;
            if let Some(layout) = rope_layout {
                attn.set_rope_layout(layout)?;
                // The C++ side routes a prefill ubatch here at or above
                // prefill_dense_below (or past the trained length): run the
                // RoPE-mode sparse prefill on it, as the CPU route plans it.
                attn.rope_prefill_sparse = true;
                tracing::info!(
                    interleaved = layout.interleaved,
                    freq_base = layout.freq_base,
                    freq_scale = layout.freq_scale,
                    max_position = cfg.model.max_position,
                    "CUDA route: hip RoPE modes over llama.cpp's K/V"
                );
            }
            let check_left = std::env::var("LLAMA_INFINITEHIP_CUDA_CHECK")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let offload = crate::llama_offload::offload_sizes(&cfg)?.map(|s| HostTierConfig {
                cache_cells: s.cache_cells,
                estimation_rows: s.estimation_rows,
            });
            let tiers = (0..cfg.model.n_layers).map(|_| None).collect();
            Ok(Inner {
                _gpu: gpu,
                attn,
                cfg,
                check_left,
                offload,
                tiers,
                rope_layout,
            })
        }

        /// Summed tier counters (null when offload is off).
        pub(super) fn tier_json(&self) -> serde_json::Value {
            let Some(c) = self.offload else {
                return serde_json::Value::Null;
            };
            let mut s = HostTierStats::default();
            let mut layers = 0;
            for t in self.tiers.iter().flatten() {
                s.add(&t.stats);
                layers += 1;
            }
            let blocks = s.cache.hits + s.cache.misses;
            serde_json::json!({
                "cache_cells_per_layer": c.cache_cells,
                "estimation_rows_per_layer": c.estimation_rows,
                "layers": layers,
                "layer_steps": s.steps,
                "rebuilds": s.rebuilds,
                "block_hits": s.cache.hits,
                "block_misses": s.cache.misses,
                "hit_ratio": if blocks == 0 { 0.0 } else { s.cache.hits as f64 / blocks as f64 },
                "bytes_copied": s.cache.bytes_copied,
                "evictions": s.cache.evictions,
                "est_row_hits": s.est_hits,
                "est_row_misses": s.est_misses,
                "est_host_bytes": s.est_host_bytes,
                "device_bytes": s.device_bytes,
                "host_kv_bytes": s.host_bytes,
            })
        }

        /// Device addresses of a host-K/V call's buffers (mapped pinned
        /// memory): what the kernels of the other paths read directly.
        fn mapped(&self, a: &CudaAttnArgs) -> Result<CudaAttnArgs> {
            if !a.host_kv {
                return Ok(*a);
            }
            if self.offload.is_none() {
                return Err(Error::Invalid(
                    "CUDA route: K/V in host memory but kv.device_cache_pages is unset".into(),
                ));
            }
            Ok(CudaAttnArgs {
                k: host_device_ptr(a.k)?,
                v: host_device_ptr(a.v)?,
                ..*a
            })
        }

        /// The K/V, q and output views of a call.
        fn views(&self, a: &CudaAttnArgs) -> Result<(EngineKv, QArg, AttnOut)> {
            let dtype = match a.kv_type {
                GGML_TYPE_F16 => DType::F16,
                GGML_TYPE_BF16 => DType::Bf16,
                t => {
                    return Err(Error::Dtype {
                        what: "llama.cpp K/V cache".into(),
                        got: format!("ggml_type {t}"),
                        supported: "F16 (1), BF16 (30)".into(),
                    })
                }
            };
            let d = self.attn.shape().head_dim;
            let kv = EngineKv {
                k: a.k,
                v: a.v,
                dtype,
                table: a.table,
                table_stride: a.table_stride as usize,
                page_size: 1,
                page_stride: a.row_stride as usize,
                head_stride: d,
            };
            let q = QArg {
                ptr: a.q,
                dtype: DType::F32,
                row_stride: a.q_row_stride as usize,
            };
            let out = AttnOut {
                ptr: a.out,
                dtype: DType::F32,
                row_stride: a.out_row_stride as usize,
            };
            Ok((kv, q, out))
        }

        pub(super) fn prefill(
            &mut self,
            a: &CudaAttnArgs,
            seq: u64,
            len: usize,
            n_new: usize,
            c: &Counters,
        ) -> Result<()> {
            let a = &self.mapped(a)?;
            let (kv, q, out) = self.views(a)?;
            // SAFETY: as `attend`; the table row holds `len` cells, q and
            // the output `n_new` rows (checked by the C++ side).
            unsafe {
                self.attn.prefill(
                    a.stream,
                    a.layer as usize,
                    &kv,
                    &[seq],
                    &[0],
                    &[len],
                    &[n_new],
                    &q,
                    &out,
                    Some(a.scale),
                )?;
            }
            if self.check_left > 0 {
                self.check_left -= 1;
                self.check_prefill(a, &kv, len, n_new, c)?;
            }
            Ok(())
        }

        pub(super) fn attend(
            &mut self,
            a: &CudaAttnArgs,
            seqs: &[u64],
            lens: &[u32],
            c: &Counters,
        ) -> Result<()> {
            let b = seqs.len();
            if lens.len() != b || b == 0 {
                return Err(Error::shape("CUDA route lens per request", b, lens.len()));
            }
            if a.host_kv {
                return self.attend_host(a, seqs, lens);
            }
            let (kv, q, out) = self.views(a)?;
            let rows: Vec<usize> = (0..b).collect();
            let lens_us: Vec<usize> = lens.iter().map(|&l| l as usize).collect();
            // SAFETY: the C++ side passes ggml device tensors of this
            // context (sizes checked there against the shapes used here),
            // alive until ggml's stream has run the launches.
            unsafe {
                self.attn.decode(
                    a.stream,
                    a.layer as usize,
                    &kv,
                    seqs,
                    &rows,
                    &lens_us,
                    &q,
                    &out,
                    Some(a.scale),
                )?;
            }
            if self.check_left > 0 {
                self.check_left -= 1;
                self.check(a, &kv, &lens_us, c)?;
            }
            Ok(())
        }

        /// Decode over host K/V (`host_tier`): hip layers through the
        /// layer's device caches. Check mode does not apply here (the
        /// engine test compares with the resident run instead).
        fn attend_host(&mut self, a: &CudaAttnArgs, seqs: &[u64], lens: &[u32]) -> Result<()> {
            let Some(cfg) = self.offload else {
                return Err(Error::Invalid(
                    "CUDA route: K/V in host memory but kv.device_cache_pages is unset".into(),
                ));
            };
            let b = seqs.len();
            let (_, q, out) = self.views(a)?;
            let n = b * a.table_stride as usize;
            // SAFETY: the C++ side passes its host input tensor of the
            // table, [n_rows][table_stride] i32, alive during the call.
            let table_host = unsafe { std::slice::from_raw_parts(a.table_host as *const i32, n) };
            let dtype = self.views(a)?.0.dtype;
            let kv = HostKvArgs {
                k: a.k,
                v: a.v,
                n_cells: a.n_cells as usize,
                dtype,
                table: a.table,
                table_host,
                table_stride: a.table_stride as usize,
            };
            let lens_us: Vec<usize> = lens.iter().map(|&l| l as usize).collect();
            let layer = a.layer as usize;
            let tier = self.tiers.get_mut(layer).ok_or_else(|| {
                Error::OutOfRange(format!(
                    "CUDA route: layer {layer} beyond the config's layers"
                ))
            })?;
            // SAFETY: as `attend`; the host K/V are llama.cpp's CUDA_Host
            // buffers of this context (page-locked, alive with it).
            unsafe {
                self.attn.decode_host_tier(
                    a.stream,
                    layer,
                    tier,
                    cfg,
                    &kv,
                    seqs,
                    &lens_us,
                    &q,
                    &out,
                    Some(a.scale),
                )
            }
        }

        /// Reference twin of the last call (module doc): f64 attention over
        /// the same selection and K/V.
        fn check(
            &self,
            a: &CudaAttnArgs,
            kv: &EngineKv,
            lens: &[usize],
            c: &Counters,
        ) -> Result<()> {
            let sh = *self.attn.shape();
            let (hq, hkv, d) = (sh.n_q_heads, sh.n_kv_heads, sh.head_dim);
            // SAFETY: `a.stream` is ggml's CUDA stream of this device's primary context, alive for
            // the duration of this call.
            let gpu = unsafe { self._gpu.on_stream(a.stream) };
            gpu.synchronize()?;
            let sels = self.attn.last_selection()?;
            let (sink, window) = match self.cfg.layer_policy(a.layer as usize) {
                LayerPolicy::Hip(h) => (h.sink, h.window),
                _ => (usize::MAX, usize::MAX),
            };
            // Streaming attention: the f64 streaming reference over keys and
            // queries permuted to the halves layout (dot products are
            // unchanged), rotated at llama.cpp's base (unscaled only).
            let streaming = match (self.cfg.layer_policy(a.layer as usize), self.rope_layout) {
                (LayerPolicy::Hip(h), Some(l)) if h.rope.attention == RopeMode::Streaming => {
                    if l.freq_scale != 1.0 {
                        return Err(Error::Invalid(
                            "CUDA route check mode: the streaming reference rotates unscaled (freq_scale 1)"
                                .into(),
                        ));
                    }
                    Some((Rope::new(d, l.freq_base), l.interleaved))
                }
                _ => None,
            };
            let shape = AttnShape {
                scale: a.scale,
                ..AttnShape::new(hq, hkv, d)?
            };
            for (b, &len) in lens.iter().enumerate() {
                let q: Vec<f32> =
                    DevBuf::borrowed(a.q + (b as u64 * a.q_row_stride * 4), hq * d * 4)
                        .read(hq * d)?;
                let o: Vec<f32> =
                    DevBuf::borrowed(a.out + (b as u64 * a.out_row_stride * 4), hq * d * 4)
                        .read(hq * d)?;
                let (table, lo, kh, vh) = read_rows(a, kv, b, len)?;
                let view = TableKv {
                    k: &kh,
                    v: &vh,
                    table: &table,
                    lo,
                    row: a.row_stride as usize,
                    hkv,
                    d,
                    bf: kv.dtype == DType::Bf16,
                };
                let sel = sels.get(b).ok_or_else(|| {
                    Error::Invalid(format!("CUDA route check: no selection for row {b}"))
                })?;
                let want = match &streaming {
                    None => attend_f64(&shape, &q, &view, Some(sel), len),
                    Some((rope, inter)) => {
                        let hq: Vec<f32> = q.chunks(d).flat_map(|x| to_halves(x, *inter)).collect();
                        let hv = HalvesKv {
                            kv: &view,
                            inter: *inter,
                        };
                        attend_streaming_f64(&shape, rope, &hq, &hv, sel, len, len - 1)
                    }
                };
                let err = rel_error(&o, &want);
                let mut ok = err.is_finite() && err <= 1e-2;
                for h in 0..hkv {
                    if sink != usize::MAX {
                        let must = (0..sink.min(len)).chain(len.saturating_sub(window)..len);
                        for t in must {
                            ok &= sel.contains(h, t);
                        }
                    }
                    c.check_selected.fetch_add(
                        sel.heads[h].iter().map(|r| r.len() as u64).sum::<u64>(),
                        Ordering::Relaxed,
                    );
                    c.check_visible.fetch_add(len as u64, Ordering::Relaxed);
                }
                c.checks.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    c.check_fail.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        layer = a.layer,
                        row = b,
                        len,
                        err,
                        "CUDA route check failed"
                    );
                }
                raise_worst(&c.check_worst, err);
            }
            Ok(())
        }

        /// Prefill check (module doc): the first, middle and last query
        /// rows against the f64 dense causal reference over the device K/V.
        fn check_prefill(
            &self,
            a: &CudaAttnArgs,
            kv: &EngineKv,
            len: usize,
            n_new: usize,
            c: &Counters,
        ) -> Result<()> {
            let sh = *self.attn.shape();
            let (hq, hkv, d) = (sh.n_q_heads, sh.n_kv_heads, sh.head_dim);
            // SAFETY: as in `check`.
            let gpu = unsafe { self._gpu.on_stream(a.stream) };
            gpu.synchronize()?;
            let shape = AttnShape {
                scale: a.scale,
                ..AttnShape::new(hq, hkv, d)?
            };
            let (table, lo, kh, vh) = read_rows(a, kv, 0, len)?;
            let view = TableKv {
                k: &kh,
                v: &vh,
                table: &table,
                lo,
                row: a.row_stride as usize,
                hkv,
                d,
                bf: kv.dtype == DType::Bf16,
            };
            let mut rows = vec![0, n_new / 2, n_new - 1];
            rows.dedup();
            for j in rows {
                let q: Vec<f32> =
                    DevBuf::borrowed(a.q + (j as u64 * a.q_row_stride * 4), hq * d * 4)
                        .read(hq * d)?;
                let o: Vec<f32> =
                    DevBuf::borrowed(a.out + (j as u64 * a.out_row_stride * 4), hq * d * 4)
                        .read(hq * d)?;
                let want = attend_f64(&shape, &q, &view, None, len - n_new + j + 1);
                let err = rel_error(&o, &want);
                c.prefill_checks.fetch_add(1, Ordering::Relaxed);
                raise_worst(&c.prefill_check_worst, err);
            }
            self.check_prefill_rope(a, &shape, &view, len, n_new, c)
        }

        /// RoPE-mode prefill (issue 12 diagnosis): the CPU `HipPolicy`'s
        /// prefill selection over the same K/V and queries (both in the
        /// halves layout) vs the route's, block by block, and the first,
        /// middle and last rows vs the f64 streaming reference over the
        /// route's own selection. A route that selects as the CPU route
        /// and attends as its selection says cannot differ from the CPU
        /// route beyond rounding.
        fn check_prefill_rope(
            &self,
            a: &CudaAttnArgs,
            shape: &AttnShape,
            view: &TableKv,
            len: usize,
            n_new: usize,
            c: &Counters,
        ) -> Result<()> {
            let (LayerPolicy::Hip(h), Some(l)) =
                (self.cfg.layer_policy(a.layer as usize), self.rope_layout)
            else {
                return Ok(());
            };
            if h.rope.scoring == RopeMode::Original && h.rope.attention == RopeMode::Original {
                return Ok(());
            }
            if l.freq_scale != 1.0 {
                return Ok(()); // the references rotate unscaled
            }
            // A routed prefill of a RoPE-mode layer always runs the sparse
            // prefill (`rope_prefill_sparse`), so this is this call's.
            let Some(gpu_sel) = self.attn.last_prefill_selection()? else {
                return Ok(());
            };
            let (hq, d) = (shape.n_q_heads, shape.head_dim);
            let mut q = Vec::with_capacity(n_new * hq * d);
            for j in 0..n_new {
                let row: Vec<f32> =
                    DevBuf::borrowed(a.q + (j as u64 * a.q_row_stride * 4), hq * d * 4)
                        .read(hq * d)?;
                q.extend(row.chunks(d).flat_map(|x| to_halves(x, l.interleaved)));
            }
            let hv = HalvesKv {
                kv: view,
                inter: l.interleaved,
            };
            let mut pol = HipPolicy::new(h.clone(), &self.cfg.model)?;
            let cpu = pol.select(&SelectRequest {
                seq: 0,
                shape: *shape,
                phase: Phase::Prefill,
                queries: &q,
                q_start: len - n_new,
                kv: &hv,
            })?;
            let differ = cpu
                .blocks
                .iter()
                .zip(&gpu_sel)
                .filter(|(x, y)| x != y)
                .count()
                + cpu.blocks.len().abs_diff(gpu_sel.len());
            c.rope_pf_blocks
                .fetch_add(cpu.blocks.len() as u64, Ordering::Relaxed);
            c.rope_pf_block_mismatch
                .fetch_add(differ as u64, Ordering::Relaxed);
            if h.rope.attention != RopeMode::Streaming {
                return Ok(());
            }
            let rope = Rope::new(d, l.freq_base);
            let mut rows = vec![0, n_new / 2, n_new - 1];
            rows.dedup();
            for j in rows {
                let Some(sel) = gpu_sel.get(j / cpu.q_block.max(1)) else {
                    raise_worst(&c.rope_pf_worst, f64::INFINITY);
                    continue;
                };
                let o: Vec<f32> =
                    DevBuf::borrowed(a.out + (j as u64 * a.out_row_stride * 4), hq * d * 4)
                        .read(hq * d)?;
                let pos = len - n_new + j;
                let want = attend_streaming_f64(
                    shape,
                    &rope,
                    &q[j * hq * d..(j + 1) * hq * d],
                    &hv,
                    sel,
                    pos + 1,
                    pos,
                );
                c.rope_pf_rows.fetch_add(1, Ordering::Relaxed);
                raise_worst(&c.rope_pf_worst, rel_error(&o, &want));
            }
            Ok(())
        }
    }

    /// Table row `b` (`len` cells) and the K/V rows of the cells it spans
    /// (from cell `lo`), read back to the host.
    #[allow(clippy::type_complexity)]
    fn read_rows(
        a: &CudaAttnArgs,
        kv: &EngineKv,
        b: usize,
        len: usize,
    ) -> Result<(Vec<i32>, usize, Vec<u16>, Vec<u16>)> {
        let es = 2usize;
        let table: Vec<i32> =
            DevBuf::borrowed(a.table + (b as u64 * a.table_stride * 4), len * 4).read(len)?;
        let (lo, hi) = table
            .iter()
            .fold((i32::MAX, i32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
        if lo < 0 {
            return Err(Error::Invalid(format!(
                "CUDA route check: negative cell {lo} in the table"
            )));
        }
        let (lo, hi) = (lo as usize, hi as usize);
        let row = a.row_stride as usize;
        let n = (hi - lo + 1) * row;
        let off = (lo * row * es) as u64;
        let kh: Vec<u16> = DevBuf::borrowed(kv.k + off, n * es).read(n)?;
        let vh: Vec<u16> = DevBuf::borrowed(kv.v + off, n * es).read(n)?;
        Ok((table, lo, kh, vh))
    }

    /// Host copy of a table's K/V rows (cells `lo..`), read in table order.
    struct TableKv<'a> {
        k: &'a [u16],
        v: &'a [u16],
        table: &'a [i32],
        lo: usize,
        row: usize,
        hkv: usize,
        d: usize,
        bf: bool,
    }

    impl TableKv<'_> {
        fn read(&self, src: &[u16], head: usize, tok: usize, out: &mut [f32]) {
            let o = (self.table[tok] as usize - self.lo) * self.row + head * self.d;
            for (x, &b) in out.iter_mut().zip(&src[o..o + self.d]) {
                *x = if self.bf {
                    bf16::from_bits(b).to_f32()
                } else {
                    f16::from_bits(b).to_f32()
                };
            }
        }
    }

    /// One head from llama.cpp's layout to the halves layout (`inter`:
    /// pairs (2i, 2i+1); else already halves).
    fn to_halves(x: &[f32], inter: bool) -> Vec<f32> {
        if !inter {
            return x.to_vec();
        }
        let half = x.len() / 2;
        (0..x.len())
            .map(|j| {
                if j < half {
                    x[2 * j]
                } else {
                    x[2 * (j - half) + 1]
                }
            })
            .collect()
    }

    /// A K/V view whose keys read in the halves layout.
    struct HalvesKv<'a> {
        kv: &'a dyn KvRead,
        inter: bool,
    }

    impl KvRead for HalvesKv<'_> {
        fn len(&self) -> usize {
            self.kv.len()
        }
        fn n_kv_heads(&self) -> usize {
            self.kv.n_kv_heads()
        }
        fn head_dim(&self) -> usize {
            self.kv.head_dim()
        }
        fn dot_key(&self, head: usize, tok: usize, q: &[f32]) -> f32 {
            let mut k = vec![0f32; self.head_dim()];
            self.read_key(head, tok, &mut k);
            k.iter().zip(q).map(|(a, b)| a * b).sum()
        }
        fn read_key(&self, head: usize, tok: usize, out: &mut [f32]) {
            let mut k = vec![0f32; out.len()];
            self.kv.read_key(head, tok, &mut k);
            out.copy_from_slice(&to_halves(&k, self.inter));
        }
        fn read_value(&self, head: usize, tok: usize, out: &mut [f32]) {
            self.kv.read_value(head, tok, out)
        }
    }

    impl KvRead for TableKv<'_> {
        fn len(&self) -> usize {
            self.table.len()
        }
        fn n_kv_heads(&self) -> usize {
            self.hkv
        }
        fn head_dim(&self) -> usize {
            self.d
        }
        fn dot_key(&self, head: usize, tok: usize, q: &[f32]) -> f32 {
            let mut k = vec![0f32; self.d];
            self.read(self.k, head, tok, &mut k);
            k.iter().zip(q).map(|(a, b)| a * b).sum()
        }
        fn read_key(&self, head: usize, tok: usize, out: &mut [f32]) {
            self.read(self.k, head, tok, out)
        }
        fn read_value(&self, head: usize, tok: usize, out: &mut [f32]) {
            self.read(self.v, head, tok, out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::ModelInfo;

    fn plugin() -> LlamaPlugin {
        let mi = ModelInfo {
            n_layers: 2,
            n_q_heads: 8,
            n_kv_heads: 2,
            head_dim: 64,
            rope_theta: 10000.0,
            n_ctx_train: 4096,
        };
        LlamaPlugin::new(r#"{"dense_layers": 0, "default": {"method": "hip"}}"#, &mi).unwrap()
    }

    #[test]
    fn without_a_gpu_the_route_is_an_error_not_a_panic() {
        // CPU builds (no feature) and machines without libcuda both refuse
        // with a message the C++ side logs before keeping the other routes.
        #[cfg(feature = "cuda")]
        if infinitehip::backend::cuda::driver_available() {
            return;
        }
        let e = llama_cuda_attn_new(&plugin())
            .err()
            .expect("must fail here");
        assert!(e.contains("cuda") || e.contains("CUDA"), "{e}");
    }

    #[test]
    fn lazy_squeeze_layers_are_refused_before_any_gpu_work() {
        let mi = ModelInfo {
            n_layers: 32,
            n_q_heads: 8,
            n_kv_heads: 2,
            head_dim: 64,
            rope_theta: 10000.0,
            n_ctx_train: 4096,
        };
        for m in ["lazy", "squeeze"] {
            let cfg = format!(r#"{{"dense_layers": 1, "default": {{"method": "{m}"}}}}"#);
            let p = LlamaPlugin::new(&cfg, &mi).unwrap();
            let e = llama_cuda_attn_new(&p).err().expect("must refuse");
            assert!(e.contains(&format!("layer 1 is `{m}`")), "{e}");
        }
        // dense + hip only passes the method check (then needs a GPU).
        assert!(only_dense_and_hip(plugin().config()).is_ok());
    }

    #[test]
    fn per_q_head_is_refused_before_any_gpu_work() {
        // hip.per_q_head (one decode mask per q head) runs on the CPU route
        // only; the CUDA routes keep one mask per KV head.
        let mi = ModelInfo {
            n_layers: 4,
            n_q_heads: 8,
            n_kv_heads: 2,
            head_dim: 64,
            rope_theta: 10000.0,
            n_ctx_train: 4096,
        };
        let p = LlamaPlugin::new(
            r#"{"dense_layers": 1, "default": {"method": "hip", "per_q_head": true}}"#,
            &mi,
        )
        .unwrap();
        let e = llama_cuda_attn_new(&p).err().expect("must refuse");
        assert!(
            e.contains("layer 1 hip.per_q_head") && e.contains("CPU route only"),
            "{e}"
        );
        let route = crate::llama_gpu::llama_gpu_route_new(&p);
        let e = route.top_k(&p, 1, 4096).unwrap_err();
        assert!(e.contains("per_q_head") && e.contains("host mirror"), "{e}");
    }

    fn rope_plugin(
        rope_type: i32,
        n_rot: u32,
        scale: f32,
        modes: (&str, &str),
        kv: &str,
    ) -> std::result::Result<LlamaPlugin, String> {
        let mi = ModelInfo {
            n_layers: 4,
            n_q_heads: 8,
            n_kv_heads: 2,
            head_dim: 64,
            rope_theta: 10000.0,
            n_ctx_train: 4096,
        };
        let rope = crate::ffi::RopeInfo {
            rope_type,
            n_rot,
            freq_base: 10000.0,
            freq_scale: scale,
            yarn: false,
        };
        LlamaPlugin::new_with_rope(
            &format!(
                r#"{{"dense_layers": 1, "default": {{"method": "hip", "sink": 64, "window": 512,
                    "stages": [{{"chunk_size": 64, "keep_tokens": 4096, "refresh_interval": 16}},
                               {{"chunk_size": 8, "keep_tokens": 1024, "refresh_interval": 4}}],
                    "rope": {{"scoring": "{}", "attention": "{}"}}}}{kv}}}"#,
                modes.0, modes.1
            ),
            &mi,
            Some(&rope),
        )
        .map_err(|e| e.to_string())
    }

    /// llama.cpp's RoPE (patch 0006) maps to GpuAttention's layout: NORM to
    /// interleaved pairs, NEOX to halves, its base and linear scale; the
    /// mapped rotation (the kernels' host twin, `RopeLayout::rotate`) equals
    /// llama.cpp's (`LlamaRope::rotate_exact`, f64 frequencies) on fresh
    /// random heads within f32 rounding of the frequencies, and a wrong
    /// layout or a shift off by one is far off. Partial rotary, host K/V and
    /// (on the CPU plugin) YaRN are refused naming the layer.
    #[test]
    fn rope_modes_map_llama_rope_to_the_gpu_layout() {
        use crate::llama_rope::{LlamaRope, LLAMA_ROPE_TYPE_NEOX, LLAMA_ROPE_TYPE_NORM};
        use infinitehip::rng::Rng;
        let mut rng = Rng::new(12);
        for (rt, scale, modes) in [
            (LLAMA_ROPE_TYPE_NORM, 1.0, ("chunk_indexed", "streaming")),
            (LLAMA_ROPE_TYPE_NEOX, 1.0, ("relative", "streaming")),
            (LLAMA_ROPE_TYPE_NORM, 0.25, ("original", "streaming")),
        ] {
            let p = rope_plugin(rt, 64, scale, modes, "").unwrap();
            let lay = cuda_rope_layout(&p, false).unwrap().expect("modes on");
            assert_eq!(lay.interleaved, rt == LLAMA_ROPE_TYPE_NORM);
            assert_eq!((lay.freq_base, lay.freq_scale), (10000.0, scale));
            let lr = LlamaRope::new(rt, 64, 64, 10000.0, scale).unwrap();
            let w = lay.inv_freq(64);
            for _ in 0..100 {
                let x = rng.normal_vec(64, 1.0);
                let pos = rng.below(40000) as f64 - 20000.0;
                let (mut a, mut b) = (x.clone(), x.clone());
                lay.rotate(&w, &mut a, pos);
                lr.rotate_exact(&mut b, pos);
                // f32 frequencies (the core's) vs llama_rope's f64 ones:
                // ~1e-3 absolute at 20K positions.
                let e = a
                    .iter()
                    .zip(&b)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0f32, f32::max);
                assert!(e < 5e-3, "type {rt} scale {scale} pos {pos}: {e}");
                let mut off = x.clone();
                lr.rotate_exact(&mut off, pos + 1.0);
                assert!(a.iter().zip(&off).any(|(p, q)| (p - q).abs() > 1e-2));
                let wrong = infinitehip::rope::RopeLayout {
                    interleaved: !lay.interleaved,
                    ..lay
                };
                let mut c = x.clone();
                wrong.rotate(&w, &mut c, pos);
                if pos.abs() > 10.0 {
                    assert!(c.iter().zip(&b).any(|(p, q)| (p - q).abs() > 1e-2));
                }
            }
        }
        // Original positions: no layout, nothing to refuse.
        let p = rope_plugin(LLAMA_ROPE_TYPE_NORM, 32, 1.0, ("original", "original"), "").unwrap();
        assert_eq!(cuda_rope_layout(&p, false).unwrap(), None);
        // Partial rotary: the CPU plugin takes streaming with n_rot 32, the
        // CUDA route refuses it naming the layer.
        let p = rope_plugin(LLAMA_ROPE_TYPE_NORM, 32, 1.0, ("original", "streaming"), "").unwrap();
        let e = llama_cuda_attn_new(&p).err().expect("must refuse");
        assert!(
            e.contains("layer 1 hip.rope")
                && e.contains("partial rotary")
                && e.contains("32 of 64"),
            "{e}"
        );
        // Host K/V (kv.device_cache_pages) with the modes.
        let p = rope_plugin(
            LLAMA_ROPE_TYPE_NORM,
            64,
            1.0,
            ("chunk_indexed", "streaming"),
            r#", "kv": {"device_cache_pages": 5000}"#,
        )
        .unwrap();
        let e = llama_cuda_attn_new(&p).err().expect("must refuse");
        assert!(
            e.contains("layer 1 hip.rope") && e.contains("device_cache_pages"),
            "{e}"
        );
        // The host-mirror route keeps its refusal (plan_indices), not top_k.
        let p = rope_plugin(
            LLAMA_ROPE_TYPE_NORM,
            64,
            1.0,
            ("chunk_indexed", "streaming"),
            "",
        )
        .unwrap();
        let route = crate::llama_gpu::llama_gpu_route_new(&p);
        assert!(route.top_k(&p, 1, 4096).is_ok());
        // A supported config passes the rope checks: without a GPU the
        // error is the missing device/feature, not the RoPE modes.
        #[cfg(feature = "cuda")]
        if infinitehip::backend::cuda::driver_available() {
            return;
        }
        let e = llama_cuda_attn_new(&p).err().expect("no GPU here");
        assert!(
            !e.contains("hip.rope") && (e.contains("cuda") || e.contains("CUDA")),
            "{e}"
        );
    }

    /// With RoPE modes, a ubatch whose context reaches past the trained
    /// length (n_kv > model.max_position = n_ctx_train) is never
    /// dense-below (llama.cpp's attention would attend at untrained
    /// positions): the CUDA route routes its prefill to GpuAttention (and
    /// the CPU route plans it); below it, the thresholds are unchanged; at
    /// original positions nothing changes.
    #[test]
    fn rope_modes_are_never_dense_below_past_the_trained_length() {
        use crate::llama_rope::LLAMA_ROPE_TYPE_NORM;
        let th = r#", "prefill_dense_below": 100000, "decode_dense_below": 100000"#;
        let p = rope_plugin(
            LLAMA_ROPE_TYPE_NORM,
            64,
            1.0,
            ("chunk_indexed", "streaming"),
            th,
        )
        .unwrap();
        assert!(p.dense_below(512, 4096) && p.dense_below(1, 4096));
        assert!(!p.dense_below(512, 4097) && !p.dense_below(1, 4352));
        let o = rope_plugin(LLAMA_ROPE_TYPE_NORM, 64, 1.0, ("original", "original"), th).unwrap();
        assert!(o.dense_below(512, 4097) && o.dense_below(1, 16384));
        assert!(!o.dense_below(512, 100000));
        // What patch 0012 asks before keeping llama.cpp's attention.
        assert!(p.rope_modes_past_trained(4097) && !p.rope_modes_past_trained(4096));
        assert!(!o.rope_modes_past_trained(1 << 20));
    }

    #[test]
    fn an_overridden_layer_below_dense_layers_runs_its_override_here_too() {
        // Layer 0 is below dense_layers but overridden to lazy: the CPU
        // plugin runs lazy there, so this route must see lazy (and refuse),
        // not dense.
        let mi = ModelInfo {
            n_layers: 4,
            n_q_heads: 8,
            n_kv_heads: 2,
            head_dim: 64,
            rope_theta: 10000.0,
            n_ctx_train: 4096,
        };
        let cfg = r#"{"dense_layers": 2, "default": {"method": "hip"},
            "overrides": [{"layers": [0, 1], "policy": {"method": "lazy", "points": [{"layer": 0, "keep": 0.5}]}}]}"#;
        let p = LlamaPlugin::new(cfg, &mi).unwrap();
        assert_eq!(p.config().layer_policy(0).method(), "lazy");
        let e = only_dense_and_hip(p.config()).unwrap_err().to_string();
        assert!(e.contains("layer 0 is `lazy`"), "{e}");
    }
}
