//! `PolicyConfig`: the one JSON document that says, per layer, which method
//! picks the attended tokens and with what budgets. Every field has a default
//! (Llama-3.1-8B shape); `validate` names the first bad field by JSON path.

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::error::{Error, Result};

mod layers;
mod lazy_default;
mod read;
mod stages;

pub use layers::LayerSource;
pub use lazy_default::{lazy_default_points, LAZY_DEFAULT_DEPTH_PERCENT, LAZY_DEFAULT_KEEP};
pub use stages::{small_head_dim_stages, SMALL_HEAD_DIM};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub model: ModelShape,
    pub kv: KvConfig,
    /// Layers `0..dense_layers` use dense attention unless `overrides` names
    /// them (InfiniteHiP keeps the first 3 layers dense). The whole rule is
    /// `resolve_layer`.
    pub dense_layers: usize,
    /// Policy for every layer not covered by `dense_layers` or `overrides`.
    pub default: LayerPolicy,
    /// Win over `dense_layers` and `default`; later entries win over
    /// earlier ones.
    pub overrides: Vec<LayerOverride>,
    /// A prefill chunk whose context (cached tokens, chunk included) is
    /// below this attends densely through the engine's own attention (in
    /// llama.cpp: its flash attention), where selection costs more than the
    /// tokens it saves. 0: never. Default: the crossover measured on the CPU
    /// llama.cpp build (BENCHMARKS.md).
    pub prefill_dense_below: usize,
    /// The same for a decode step (one new token per sequence).
    pub decode_dense_below: usize,
}

/// Defaults of `prefill_dense_below` / `decode_dense_below`: crossovers
/// measured with `tests/llama-cpp/bench.py --real` (BENCHMARKS.md).
pub const PREFILL_DENSE_BELOW: usize = 4_096;
pub const DECODE_DENSE_BELOW: usize = 16_384;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelShape {
    pub n_layers: usize,
    pub n_q_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// RoPE base frequency (Llama-3.1: 500000).
    pub rope_theta: f32,
    /// Context length the model was trained for (RoPE modes use it).
    pub max_position: usize,
}

impl Default for ModelShape {
    fn default() -> Self {
        ModelShape {
            n_layers: 32,
            n_q_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            rope_theta: 500_000.0,
            max_position: 131_072,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvConfig {
    pub page_size: usize,
    pub dtype: DType,
    /// Host offload: every page lives in the host tier and decode reads
    /// through a device page cache of this many pages per layer (LRU; sink
    /// and window pages pinned). None: all KV resident.
    pub device_cache_pages: Option<usize>,
    /// With host offload: key rows per layer in the device cache that mask
    /// estimation reads through (CLOCK replacement). None: estimation reads
    /// are counted but not cached.
    pub estimation_cache_rows: Option<usize>,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig {
            page_size: 64,
            dtype: DType::Bf16,
            device_cache_pages: None,
            estimation_cache_rows: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerOverride {
    pub layers: Vec<usize>,
    pub policy: LayerPolicy,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase", from = "LayerPolicyJson")]
pub enum LayerPolicy {
    Dense,
    Hip(HipConfig),
    Locret(LocretConfig),
    Lazy(LazyConfig),
    Squeeze(SqueezeConfig),
}

/// What `LayerPolicy` is read from: the same JSON, except that `dense`
/// carries an empty field set, so unknown fields under `"method": "dense"`
/// are rejected as they are for every other method (a unit variant of an
/// internally tagged enum silently accepts any).
#[derive(Deserialize)]
#[serde(tag = "method", rename_all = "lowercase")]
enum LayerPolicyJson {
    Dense(DenseFields),
    Hip(HipConfig),
    Locret(LocretConfig),
    Lazy(LazyConfig),
    Squeeze(SqueezeConfig),
}

/// `dense` has no settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DenseFields {}

impl From<LayerPolicyJson> for LayerPolicy {
    fn from(p: LayerPolicyJson) -> Self {
        match p {
            LayerPolicyJson::Dense(DenseFields {}) => LayerPolicy::Dense,
            LayerPolicyJson::Hip(c) => LayerPolicy::Hip(c),
            LayerPolicyJson::Locret(c) => LayerPolicy::Locret(c),
            LayerPolicyJson::Lazy(c) => LayerPolicy::Lazy(c),
            LayerPolicyJson::Squeeze(c) => LayerPolicy::Squeeze(c),
        }
    }
}

impl Default for LayerPolicy {
    fn default() -> Self {
        LayerPolicy::Hip(HipConfig::default())
    }
}

impl LayerPolicy {
    pub fn method(&self) -> &'static str {
        match self {
            LayerPolicy::Dense => "dense",
            LayerPolicy::Hip(_) => "hip",
            LayerPolicy::Locret(_) => "locret",
            LayerPolicy::Lazy(_) => "lazy",
            LayerPolicy::Squeeze(_) => "squeeze",
        }
    }
}

/// How positions enter the scores (DESIGN 3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeMode {
    /// Keys keep the positions they were stored with.
    Original,
    /// Every key of a stage chunk takes its chunk's index as position; the
    /// query sits just after the last chunk (mask estimation only).
    ChunkIndexed,
    /// Keys and query are re-rotated so the query sits at a fixed distance
    /// (the trained length) from every key: only relative order is kept.
    Relative,
    /// Selected tokens are renumbered 0..n in order and the query follows
    /// them, so attention never sees a position beyond the trained length.
    Streaming,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RopeConfig {
    /// Positions used while scoring chunks in the pruning stages.
    pub scoring: RopeMode,
    /// Positions used by the sparse attention itself.
    pub attention: RopeMode,
}

impl Default for RopeConfig {
    fn default() -> Self {
        RopeConfig {
            scoring: RopeMode::Original,
            attention: RopeMode::Original,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HipStage {
    /// Candidate tokens are split into chunks of this many tokens; each chunk
    /// is scored by its representative key.
    pub chunk_size: usize,
    /// Tokens kept after this stage (top chunks * chunk_size). The last
    /// stage's value is the attention budget.
    pub keep_tokens: usize,
    /// Decode steps between refreshes of this stage's mask.
    pub refresh_interval: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HipConfig {
    pub sink: usize,
    pub window: usize,
    pub stages: Vec<HipStage>,
    /// Queries per prefill block sharing one mask.
    pub block_size_q: usize,
    /// Score a prefill block with every `q_stride`-th query (1 = all).
    pub q_stride: usize,
    /// Prefill is processed in chunks of this many queries.
    pub prefill_chunk: usize,
    pub rope: RopeConfig,
    /// Prefill mask estimator (decode always uses the reference search).
    pub mask_estimator: MaskEstimatorChoice,
    /// Decode only, CPU policy only (the GPU decoders refuse it): when the
    /// last stage runs, its candidates also hold the `successors` tokens
    /// after each key it kept at its previous run (ranges a..b add
    /// b..b+successors), inside the middle of the first stage's last run
    /// (tokens that slid out of the window since then are attended anyway).
    /// A copying (induction) head
    /// attends next the successor of the key it attended last, which a stale
    /// earlier stage may have dropped; the attended budget is unchanged (the
    /// last stage still keeps `keep_tokens`). 0 = off (issue 12: on SmolLM2
    /// at 8K the copy probe loses planted-passage keys between stage-1
    /// refreshes).
    pub successors: usize,
    /// Decode only, CPU policy only (the GPU decoders, the llama.cpp CUDA
    /// routes and host offload refuse it): every q head of a GQA group runs
    /// the stages with its own query and keeps its own `keep_tokens`, so a
    /// decode `Selection` holds one range list per q head instead of one per
    /// KV head. The per-head budget is the same, so the attended fraction
    /// is unchanged; mask estimation reads each KV head's keys once per q
    /// head. Prefill stays per KV-head group. false = off (issue 12: on
    /// SmolLM2 one shared mask per group keeps 0.974 of the attention mass
    /// at 1/8, each q head its own 0.982).
    pub per_q_head: bool,
    /// How a decode refresh of stage 0 scores its chunks (`search`: the
    /// paper's representative-key search, the default; `mean_key`: each
    /// chunk's mean key, computed once per chunk and cached per sequence).
    pub decode_stage0: DecodeStage0,
    /// Decode only: which refresh work moves off the step that attends it
    /// (`off`, the default; `stage0`; `all`: see `AsyncRefresh`). On the
    /// GPU decoder (`HipGpuDecoder` host steps) that work runs on a stream
    /// of its own beside the attention; the CPU policy computes the same
    /// selections in line. The engines' GPU routes (`GpuAttention`), the
    /// decoder's device steps (CUDA graphs) and its GPU host-offload tier
    /// refuse anything but `off`.
    pub async_refresh: AsyncRefresh,
}

/// Refresh work a decode step leaves to a side stream (`hip.async_refresh`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AsyncRefresh {
    /// Every refresh is computed and attended at its step.
    #[default]
    Off,
    /// Stage 0 of a refresh due at step s is scored at step s - 1 with
    /// that step's query over that step's middle (the later stages still
    /// run at step s, in line, on its output); the sequence's first step
    /// scores it in line. Needs `decode_stage0 = mean_key` and a second
    /// stage.
    Stage0,
    /// A refresh due at step s (after the sequence's first) scores with
    /// step s's query but is attended from step s + 1 on; step s attends
    /// the previous selection (with its own sink, slid and window ranges).
    All,
}

/// How decode scores stage 0's chunks (`hip.decode_stage0`).
///
/// Stage 0 of a decode refresh at 1M tokens reads ~11 key rows per 64-token
/// chunk (369 MB per layer, 157 us on an H200: half of hip's decode time
/// amortised over a refresh cycle). A chunk's tokens never change once
/// written, so its mean key can be computed once and kept: a refresh then
/// reads one row per chunk (1/11 of the bytes). Prefill is unchanged (its
/// estimator is `mask_estimator`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecodeStage0 {
    /// Representative-key binary search over each chunk (the paper's).
    #[default]
    Search,
    /// The chunk's mean key: f32 sum of its `chunk_size` stored keys in
    /// token order, divided by the count, rounded once to bf16 (the fast
    /// prefill estimator's representative), scored as q . mean in f32.
    /// The whole chunk is averaged even where the middle ends inside it,
    /// so needs `window >= stages[0].chunk_size` (every averaged token is
    /// stored), original scoring positions, and a second stage when
    /// `successors` is on. CPU policy and the GPU decoder
    /// (`HipGpuDecoder`); the engines' GPU routes refuse it for now.
    MeanKey,
}

/// Which prefill mask estimator a hip layer runs (`hip.mask_estimator`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskEstimatorChoice {
    /// Each backend's default: the reference search on the CPU, the
    /// tensor-core estimator on the GPU (today's behaviour).
    #[default]
    Auto,
    /// Representative-key search with f32 probes (the paper's estimator;
    /// the GPU's f32 twin is bit-equal to the CPU policy).
    Reference,
    /// Stage 0 ranks chunks by their mean key, later stages score every
    /// token of the kept chunks; bf16 operands, f32 accumulation. On the
    /// GPU tensor cores (kernels/hip_fast.cu), on the CPU its twin
    /// (`policy::hip_fast`). Needs `rope.scoring` original.
    Fast,
}

impl Default for HipConfig {
    fn default() -> Self {
        HipConfig {
            sink: 128,
            window: 1024,
            stages: vec![
                HipStage {
                    chunk_size: 64,
                    keep_tokens: 8192,
                    refresh_interval: 16,
                },
                HipStage {
                    chunk_size: 16,
                    keep_tokens: 4096,
                    refresh_interval: 8,
                },
                HipStage {
                    chunk_size: 8,
                    keep_tokens: 2048,
                    refresh_interval: 4,
                },
            ],
            block_size_q: 64,
            q_stride: 4,
            prefill_chunk: 8192,
            rope: RopeConfig::default(),
            mask_estimator: MaskEstimatorChoice::Auto,
            successors: 0,
            per_q_head: false,
            decode_stage0: DecodeStage0::Search,
            async_refresh: AsyncRefresh::Off,
        }
    }
}

impl HipConfig {
    /// Tokens attended beyond sink and window.
    pub fn budget(&self) -> usize {
        self.stages.last().map_or(0, |s| s.keep_tokens)
    }
}

/// Locret (arXiv 2410.01805): retaining heads score each KV unit once at
/// insertion; chunked prefill evicts the lowest-scored units per KV head down
/// to `budget`. See `policy::locret` for the exact semantics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocretConfig {
    /// KV units kept per KV head after each prefill chunk's eviction, not
    /// counting the pinned prompt tail (`keep_last`) and decoded tokens
    /// (upstream's `budget_size` SN).
    pub budget: usize,
    /// Prefill chunk length (upstream SD). Eviction runs once per appended
    /// chunk, so callers should append prompts in pieces of this size; the
    /// engine also selects/attends prefill queries in chunks of this many.
    pub chunk: usize,
    /// Most recent held units that are never evicted during prefill
    /// (upstream `stabilizers`).
    pub stabilizer: usize,
    /// First tokens that are never evicted (upstream: 0).
    pub sink: usize,
    /// Last prompt tokens kept whatever their score (upstream `local_len`:
    /// 100). Must not exceed `stabilizer`.
    pub keep_last: usize,
    /// Upstream drops the stabilizer protection in the eviction after the
    /// last evictable chunk (the one before the tail). true: keep protecting
    /// the stabilizer window there too (never evicts recent tokens); false:
    /// upstream's behaviour.
    pub stabilize_final_chunk: bool,
    /// Retaining-head weights (safetensors). Required for this method.
    pub weights: Option<String>,
    /// Hidden width of the retaining-head MLP.
    pub hidden: usize,
    /// Renumber positions 0..n-1 after eviction and re-rotate the cache, as
    /// upstream does. Not supported yet (validation rejects true): the pool
    /// stores post-RoPE keys; false keeps original positions.
    pub renumber_positions: bool,
    /// How whole-token eviction (llama.cpp, whose KV cells are shared by
    /// every layer and head) turns a token's per-(layer, KV head) scores into
    /// one score. Per-head eviction (the core, SGLang) does not use it.
    pub token_score: TokenScore,
}

/// One score per token from its per-(layer, KV head) retaining-head scores,
/// for eviction units shared by every layer and head (llama.cpp's cells).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenScore {
    /// Standardise the held tokens' scores within each (layer, KV head)
    /// (z-score: minus the mean, over the standard deviation), then take a
    /// token's largest: scale-free, so every head's ranking counts (the
    /// heads regress raw logits whose scale differs per layer).
    #[default]
    ZMax,
    /// As `z_max` with ranks (ties share their mean rank, scaled to [0, 1])
    /// instead of z-scores.
    RankMax,
    /// The largest raw score over layers and KV heads: the layer with the
    /// largest logit scale decides (the first llama.cpp version).
    RawMax,
    /// Each (layer, KV head)'s scores as a softmax over the held tokens
    /// (the heads regress pre-softmax attention logits, so this estimates
    /// the share of that head's attention the token would get), then the
    /// token's largest share over layers and heads.
    SoftMax,
    /// As `soft_max`, summing the shares over layers and heads.
    SoftSum,
}

impl Default for LocretConfig {
    fn default() -> Self {
        LocretConfig {
            budget: 16384,
            chunk: 1024,
            stabilizer: 2500,
            sink: 0,
            keep_last: 100,
            stabilize_final_chunk: true,
            weights: None,
            hidden: 1024,
            renumber_positions: false,
            token_score: TokenScore::ZMax,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LazyPoint {
    /// Pruning happens after this layer's attention: the importance comes
    /// from this layer's last-token attention, and the kept set applies from
    /// the next layer on. Must be a layer that runs `lazy`, below the last.
    pub layer: usize,
    /// Fraction of the full prompt (not of the tokens still active) that
    /// stays active after this point: ceil(keep * prompt_len) tokens. In
    /// (0, 1], non-increasing across points, so the kept sets are nested.
    pub keep: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LazyConfig {
    /// Pruning points, ascending layers, non-increasing keep fractions. All
    /// layers that run `lazy` in one config share one `LazyConfig` (the keep
    /// sets cross layers). See `policy::lazy`. Absent from the JSON: after
    /// 30%, 60% and 90% of `model.n_layers` keeping 0.8, 0.5, 0.3 of the
    /// prompt (`lazy_default_points`; points at layers that do not run lazy
    /// are left out).
    pub points: Vec<LazyPoint>,
}

impl Default for LazyConfig {
    /// The default points for the default model shape (32 layers). A lazy
    /// policy read by `PolicyConfig::from_json` without `points` gets them
    /// for its `model.n_layers` instead (`lazy_default_points`).
    fn default() -> Self {
        LazyConfig {
            points: lazy_default_points(ModelShape::default().n_layers),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqueezeConfig {
    /// Clusters as a percentage of (prefix length - observation window).
    pub percent_clusters: f32,
    /// Coarse clusters (two-level lookup) as a percentage of the fine ones.
    pub percent_clusters_l1: f32,
    /// 1 or 2 lookup levels.
    pub levels: usize,
    /// Quantile of estimated key probabilities used as the keep threshold:
    /// about `1 - quantile` of the clustered prefix keys are kept on the
    /// calibration queries. 0 keeps every key (threshold -inf).
    pub quantile: f32,
    /// Quantile for the coarse level in two-level lookup.
    pub quantile_l1: f32,
    /// Last prefix tokens always kept (and used for calibration).
    pub observation_window: usize,
    /// First prefix tokens that get a cluster of their own at both levels
    /// (exact lookup scores) instead of joining the k-means clusters.
    /// Upstream: 0. Real models' attention sink (key 0 of SmolLM2-135M)
    /// points away from every other key yet draws most of the attention;
    /// averaged into a cluster its score is lost and the lookup drops it
    /// (doubled perplexity, see `policy::squeeze`).
    pub sink: usize,
    pub kmeans_iters: usize,
    pub seed: u64,
    /// How a prefill chunk's queries share one key set per KV head.
    pub prefill_pool: SqueezePool,
}

/// How the estimated key probabilities of several queries combine into one
/// key set (Squeezed Attention prefill).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SqueezePool {
    /// Max over queries: the union of the keys each query would keep.
    Max,
    /// Mean over queries, then the threshold (upstream's prefill kernel).
    Mean,
}

impl Default for SqueezeConfig {
    fn default() -> Self {
        SqueezeConfig {
            percent_clusters: 5.0,
            percent_clusters_l1: 10.0,
            levels: 1,
            quantile: 0.7,
            quantile_l1: 0.7,
            observation_window: 100,
            sink: 4,
            kmeans_iters: 30,
            seed: 0,
            prefill_pool: SqueezePool::Max,
        }
    }
}

impl SqueezeConfig {
    /// Check every field; errors name `{at}.field`.
    pub fn validate(&self, at: &str) -> Result<()> {
        let s = self;
        if !(s.percent_clusters > 0.0 && s.percent_clusters <= 100.0) {
            return Err(bad(format!("{at}.percent_clusters"), "must be in (0, 100]"));
        }
        if !(s.percent_clusters_l1 > 0.0 && s.percent_clusters_l1 <= 100.0) {
            return Err(bad(
                format!("{at}.percent_clusters_l1"),
                "must be in (0, 100]",
            ));
        }
        if s.levels != 1 && s.levels != 2 {
            return Err(bad(
                format!("{at}.levels"),
                format!("{} must be 1 or 2", s.levels),
            ));
        }
        for (name, q) in [("quantile", s.quantile), ("quantile_l1", s.quantile_l1)] {
            if !(0.0..1.0).contains(&q) {
                return Err(bad(
                    format!("{at}.{name}"),
                    format!("{q} must be in [0, 1)"),
                ));
            }
        }
        if s.kmeans_iters == 0 {
            return Err(bad(format!("{at}.kmeans_iters"), "must be > 0"));
        }
        if s.observation_window == 0 {
            return Err(bad(
                format!("{at}.observation_window"),
                "must be >= 1 (its queries calibrate the threshold)",
            ));
        }
        Ok(())
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            model: ModelShape::default(),
            kv: KvConfig::default(),
            dense_layers: 3,
            default: LayerPolicy::default(),
            overrides: Vec::new(),
            prefill_dense_below: PREFILL_DENSE_BELOW,
            decode_dense_below: DECODE_DENSE_BELOW,
        }
    }
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::config(field, reason)
}

impl PolicyConfig {
    /// Parse and validate. Errors name the field by JSON path.
    /// A hip policy without `stages` gets shapes for the model's head_dim
    /// (`small_head_dim_stages` at head_dim <= 64); a lazy policy without
    /// `points` gets points for the model's depth (`lazy_default_points`).
    pub fn from_json(s: &str) -> Result<Self> {
        let mut c = read::parse(s)?;
        let raw = serde_json::from_str(s)?;
        stages::resolve(&mut c, &raw);
        lazy_default::resolve(&mut c, &raw);
        c.validate()?;
        Ok(c)
    }

    /// `from_json` on a file's contents; errors also name the file.
    pub fn from_file(path: &str) -> Result<Self> {
        let s = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_string(),
            source: e,
        })?;
        Self::from_json(&s).map_err(|e| match e {
            Error::ConfigJson(j) => {
                Error::Invalid(format!("config file {path} is not valid JSON: {j}"))
            }
            Error::Config { field, reason } => {
                Error::config(field, format!("{reason} (in {path})"))
            }
            other => other,
        })
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serialises")
    }

    /// Whether a step of `n_queries` new tokens per sequence over a
    /// context of `context` tokens should attend densely (below the
    /// `*_dense_below` thresholds).
    pub fn dense_below(&self, n_queries: usize, context: usize) -> bool {
        let limit = if n_queries <= 1 {
            self.decode_dense_below
        } else {
            self.prefill_dense_below
        };
        context < limit
    }

    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        for (name, v) in [
            ("n_layers", m.n_layers),
            ("n_q_heads", m.n_q_heads),
            ("n_kv_heads", m.n_kv_heads),
            ("head_dim", m.head_dim),
            ("max_position", m.max_position),
        ] {
            if v == 0 {
                return Err(bad(format!("model.{name}"), "must be > 0"));
            }
        }
        if m.n_q_heads % m.n_kv_heads != 0 {
            return Err(bad(
                "model.n_q_heads",
                format!(
                    "{} is not a multiple of n_kv_heads {}",
                    m.n_q_heads, m.n_kv_heads
                ),
            ));
        }
        if m.head_dim % 2 != 0 || m.head_dim > 512 {
            return Err(bad(
                "model.head_dim",
                format!("{} must be even and <= 512", m.head_dim),
            ));
        }
        if !(m.rope_theta.is_finite() && m.rope_theta > 1.0) {
            return Err(bad(
                "model.rope_theta",
                format!("{} must be finite and > 1", m.rope_theta),
            ));
        }
        if self.kv.page_size == 0 || !self.kv.page_size.is_power_of_two() {
            return Err(bad(
                "kv.page_size",
                format!("{} must be a power of two", self.kv.page_size),
            ));
        }
        if self.kv.estimation_cache_rows.is_some() && self.kv.device_cache_pages.is_none() {
            return Err(bad(
                "kv.estimation_cache_rows",
                "needs kv.device_cache_pages (it caches host-offloaded keys)",
            ));
        }
        if self.kv.device_cache_pages == Some(0) {
            return Err(bad(
                "kv.device_cache_pages",
                "must be >= 1 (or absent for no offload)",
            ));
        }
        if self.kv.device_cache_pages.is_some() {
            if let Some(l) = (0..m.n_layers)
                .find(|&l| matches!(self.layer_policy(l), LayerPolicy::Hip(h) if h.per_q_head))
            {
                return Err(bad(
                    format!("{}.per_q_head", self.resolve_layer(l).1.path()),
                    format!(
                        "layer {l}: per-q-head decode selection runs on the all-resident CPU path only; \
                         host offload (kv.device_cache_pages) caches per-KV-head blocks: use false"
                    ),
                ));
            }
        }
        if self.dense_layers > m.n_layers {
            return Err(bad(
                "dense_layers",
                format!(
                    "{} exceeds model.n_layers {}",
                    self.dense_layers, m.n_layers
                ),
            ));
        }
        validate_policy(&self.default, "default", m)?;
        for (i, o) in self.overrides.iter().enumerate() {
            if let Some(&l) = o.layers.iter().find(|&&l| l >= m.n_layers) {
                return Err(bad(
                    format!("overrides[{i}].layers"),
                    format!("layer {l} >= n_layers {}", m.n_layers),
                ));
            }
            validate_policy(&o.policy, &format!("overrides[{i}].policy"), m)?;
        }
        self.validate_lazy_layers()
    }

    /// LazyLLM's keep sets cross layers: every lazy layer must share one
    /// config, and every pruning layer must run `lazy` (its attention gives
    /// the importance).
    fn validate_lazy_layers(&self) -> Result<()> {
        let mut first: Option<(usize, &LazyConfig)> = None;
        for l in 0..self.model.n_layers {
            let LayerPolicy::Lazy(z) = self.layer_policy(l) else {
                continue;
            };
            match first {
                None => first = Some((l, z)),
                Some((l0, z0)) if z0 != z => {
                    return Err(bad(
                        format!("{}.points", self.resolve_layer(l).1.path()),
                        format!(
                            "layer {l} runs lazy with other points than layer {l0}; all lazy layers share one config"
                        ),
                    ))
                }
                _ => {}
            }
        }
        let Some((l0, z)) = first else {
            return Ok(());
        };
        let at = self.resolve_layer(l0).1.path();
        for (i, p) in z.points.iter().enumerate() {
            let method = self.layer_policy(p.layer).method();
            if method != "lazy" {
                return Err(bad(
                    format!("{at}.points[{i}].layer"),
                    format!(
                        "layer {} runs `{method}`; a pruning layer must run lazy (its attention gives the importance)",
                        p.layer
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn validate_policy(p: &LayerPolicy, at: &str, m: &ModelShape) -> Result<()> {
    match p {
        LayerPolicy::Dense => Ok(()),
        LayerPolicy::Hip(h) => validate_hip(h, at),
        LayerPolicy::Locret(l) => {
            if l.budget == 0 {
                return Err(bad(format!("{at}.budget"), "must be > 0"));
            }
            if l.chunk == 0 {
                return Err(bad(format!("{at}.chunk"), "must be > 0"));
            }
            if l.stabilizer + l.sink >= l.budget {
                return Err(bad(
                    format!("{at}.stabilizer"),
                    format!(
                        "stabilizer {} + sink {} must be below budget {}",
                        l.stabilizer, l.sink, l.budget
                    ),
                ));
            }
            if l.hidden == 0 {
                return Err(bad(format!("{at}.hidden"), "must be > 0"));
            }
            if l.keep_last > l.stabilizer {
                return Err(bad(
                    format!("{at}.keep_last"),
                    format!(
                        "keep_last {} must not exceed stabilizer {} (the prompt tail must still be held when it is pinned)",
                        l.keep_last, l.stabilizer
                    ),
                ));
            }
            if l.renumber_positions {
                return Err(bad(
                    format!("{at}.renumber_positions"),
                    "not supported: the KV pool stores post-RoPE keys, so renumbering would re-rotate \
                     them after every eviction (accumulating rounding in bf16/f16) and shift every \
                     caller's query positions; use false (original positions)",
                ));
            }
            if l.weights.is_none() {
                return Err(bad(
                    format!("{at}.weights"),
                    "locret needs a retaining-head safetensors file",
                ));
            }
            Ok(())
        }
        LayerPolicy::Lazy(z) => {
            let mut prev_layer = None;
            let mut prev_keep = 1.0f32;
            for (i, p) in z.points.iter().enumerate() {
                let f = format!("{at}.points[{i}]");
                if p.layer + 1 >= m.n_layers {
                    return Err(bad(
                        format!("{f}.layer"),
                        format!(
                            "{} must be below the last layer {} (pruning acts on the layers after it)",
                            p.layer,
                            m.n_layers - 1
                        ),
                    ));
                }
                if prev_layer.is_some_and(|l| p.layer <= l) {
                    return Err(bad(
                        format!("{f}.layer"),
                        "layers must be strictly ascending",
                    ));
                }
                if !(p.keep > 0.0 && p.keep <= prev_keep) {
                    return Err(bad(
                        format!("{f}.keep"),
                        format!("{} must be in (0, {prev_keep}] (non-increasing)", p.keep),
                    ));
                }
                prev_layer = Some(p.layer);
                prev_keep = p.keep;
            }
            Ok(())
        }
        LayerPolicy::Squeeze(s) => s.validate(at),
    }
}

impl HipConfig {
    /// Check every field; errors name `{at}.field`.
    pub fn validate(&self, at: &str) -> Result<()> {
        validate_hip(self, at)
    }
}

fn validate_hip(h: &HipConfig, at: &str) -> Result<()> {
    if h.stages.is_empty() {
        return Err(bad(format!("{at}.stages"), "needs at least one stage"));
    }
    let mut prev_chunk = usize::MAX;
    let mut prev_keep = usize::MAX;
    for (i, s) in h.stages.iter().enumerate() {
        let f = format!("{at}.stages[{i}]");
        if s.chunk_size == 0 || !s.chunk_size.is_power_of_two() {
            return Err(bad(
                format!("{f}.chunk_size"),
                format!("{} must be a power of two", s.chunk_size),
            ));
        }
        if s.chunk_size > prev_chunk {
            return Err(bad(
                format!("{f}.chunk_size"),
                "chunk sizes must not grow from stage to stage",
            ));
        }
        if s.keep_tokens == 0 || s.keep_tokens % s.chunk_size != 0 {
            return Err(bad(
                format!("{f}.keep_tokens"),
                format!(
                    "{} must be a positive multiple of chunk_size {}",
                    s.keep_tokens, s.chunk_size
                ),
            ));
        }
        if s.keep_tokens > prev_keep {
            return Err(bad(
                format!("{f}.keep_tokens"),
                "must not grow from stage to stage",
            ));
        }
        if s.refresh_interval == 0 {
            return Err(bad(format!("{f}.refresh_interval"), "must be >= 1"));
        }
        prev_chunk = s.chunk_size;
        prev_keep = s.keep_tokens;
    }
    if h.block_size_q == 0 {
        return Err(bad(format!("{at}.block_size_q"), "must be > 0"));
    }
    if h.q_stride == 0 || h.q_stride > h.block_size_q {
        return Err(bad(format!("{at}.q_stride"), "must be in 1..=block_size_q"));
    }
    if h.prefill_chunk == 0 || h.prefill_chunk % h.block_size_q != 0 {
        return Err(bad(
            format!("{at}.prefill_chunk"),
            "must be a positive multiple of block_size_q",
        ));
    }
    if matches!(h.rope.scoring, RopeMode::Streaming) {
        return Err(bad(
            format!("{at}.rope.scoring"),
            "streaming applies to attention only",
        ));
    }
    if matches!(
        h.rope.attention,
        RopeMode::ChunkIndexed | RopeMode::Relative
    ) {
        return Err(bad(
            format!("{at}.rope.attention"),
            "use original or streaming",
        ));
    }
    if h.mask_estimator == MaskEstimatorChoice::Fast && h.rope.scoring != RopeMode::Original {
        return Err(bad(
            format!("{at}.mask_estimator"),
            "fast scores stored keys as they are: needs rope.scoring original",
        ));
    }
    if h.decode_stage0 == DecodeStage0::MeanKey {
        let c0 = h.stages[0].chunk_size;
        if h.rope.scoring != RopeMode::Original {
            return Err(bad(
                format!("{at}.decode_stage0"),
                "mean_key scores stored keys as they are: needs rope.scoring original",
            ));
        }
        if h.window < c0 {
            return Err(bad(
                format!("{at}.decode_stage0"),
                format!(
                    "mean_key averages whole stage-0 chunks: needs window ({}) >= stages[0].chunk_size ({c0})",
                    h.window
                ),
            ));
        }
        if h.successors > 0 && h.stages.len() < 2 {
            return Err(bad(
                format!("{at}.decode_stage0"),
                "mean_key with successors needs a second stage (successors join the last stage's candidates)",
            ));
        }
    }
    if h.async_refresh == AsyncRefresh::Stage0
        && (h.decode_stage0 != DecodeStage0::MeanKey || h.stages.len() < 2)
    {
        return Err(bad(
            format!("{at}.async_refresh"),
            "stage0 moves the cached-mean stage 0 to the step before: needs decode_stage0 mean_key and a second stage",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_round_trips_and_validates() {
        let c = PolicyConfig::default();
        c.validate().unwrap();
        let back = PolicyConfig::from_json(&c.to_json_pretty()).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.layer_policy(0).method(), "dense");
        assert_eq!(c.layer_policy(3).method(), "hip");
    }

    #[test]
    fn dense_below_thresholds() {
        let c =
            PolicyConfig::from_json(r#"{"prefill_dense_below": 100, "decode_dense_below": 50}"#)
                .unwrap();
        assert!(c.dense_below(8, 99));
        assert!(!c.dense_below(8, 100));
        assert!(c.dense_below(1, 49));
        assert!(!c.dense_below(1, 50));
        assert!(!c.dense_below(1, 99));
        let off = PolicyConfig::from_json(r#"{"prefill_dense_below": 0, "decode_dense_below": 0}"#)
            .unwrap();
        assert!(!off.dense_below(1, 0) && !off.dense_below(512, 0));
        let d = PolicyConfig::default();
        assert_eq!(
            (d.prefill_dense_below, d.decode_dense_below),
            (PREFILL_DENSE_BELOW, DECODE_DENSE_BELOW)
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"model": {"n_kv_heads": 5}}"#, "model.n_q_heads"),
            (
                r#"{"default": {"method": "hip", "stages": [{"chunk_size": 48, "keep_tokens": 96, "refresh_interval": 1}]}}"#,
                "default.stages[0].chunk_size",
            ),
            (
                r#"{"default": {"method": "hip", "stages": [{"chunk_size": 16, "keep_tokens": 100, "refresh_interval": 1}]}}"#,
                "default.stages[0].keep_tokens",
            ),
            (r#"{"default": {"method": "locret"}}"#, "default.weights"),
            (
                r#"{"default": {"method": "squeeze", "levels": 3}}"#,
                "default.levels",
            ),
            (
                r#"{"overrides": [{"layers": [40], "policy": {"method": "dense"}}]}"#,
                "overrides[0].layers",
            ),
            (
                r#"{"default": {"method": "lazy", "points": [{"layer": 4, "keep": 0.5}, {"layer": 8, "keep": 0.9}]}}"#,
                "default.points[1].keep",
            ),
            (r#"{"kv": {"page_size": 48}}"#, "kv.page_size"),
        ];
        for (json, field) in cases {
            let err = PolicyConfig::from_json(json).unwrap_err().to_string();
            assert!(
                err.contains(field),
                "{json}: error `{err}` does not name `{field}`"
            );
        }
        let err = PolicyConfig::from_json(r#"{"default": {"method": "hip", "sinkk": 3}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("sinkk"), "{err}");
        let err = PolicyConfig::from_json(r#"{"default": {"method": "flash"}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("flash"), "{err}");
    }

    fn err(json: &str) -> String {
        PolicyConfig::from_json(json).unwrap_err().to_string()
    }

    #[test]
    fn dense_rejects_unknown_fields() {
        let e = err(r#"{"default": {"method": "dense", "sink": 4}}"#);
        assert!(
            e.contains("`default.sink`: unknown field `sink`: `dense` takes no settings"),
            "{e}"
        );
        let e =
            err(r#"{"overrides": [{"layers": [5], "policy": {"method": "dense", "windw": 4}}]}"#);
        assert!(e.contains("`overrides[0].policy.windw`"), "{e}");
        // Plain dense still parses, in both places.
        PolicyConfig::from_json(
            r#"{"default": {"method": "dense"}, "overrides": [{"layers": [5], "policy": {"method": "dense"}}]}"#,
        )
        .unwrap();
    }

    #[test]
    fn type_errors_give_the_field_path_and_expected_value_in_words() {
        let cases = [
            (
                r#"{"default": {"method": "hip", "sink": -5}}"#,
                "`default.sink`: expected a whole number >= 0, got -5",
            ),
            (
                r#"{"model": {"n_layers": "32"}}"#,
                "`model.n_layers`: expected a whole number >= 0, got \"32\"",
            ),
            (
                r#"{"model": [32, 8]}"#,
                "`model`: expected an object {...}, got a list [...]",
            ),
            (
                r#"{"overrides": [{"layers": [4], "policy": {"method": "hip", "stages": [{"chunk_size": 1.5, "keep_tokens": 8, "refresh_interval": 1}]}}]}"#,
                "`overrides[0].policy.stages[0].chunk_size`: expected a whole number >= 0, got 1.5",
            ),
            (
                r#"{"default": {"method": "squeeze", "quantile": true}}"#,
                "`default.quantile`: expected a number, got true",
            ),
            (
                r#"{"default": {"sink": 4}}"#,
                "`default`: missing field `method` (one of dense, hip, locret, lazy, squeeze)",
            ),
            (
                r#"[{"default": {"method": "hip"}}]"#,
                "`(top level)`: the config must be one JSON object",
            ),
        ];
        for (json, want) in cases {
            let e = err(json);
            assert!(e.contains(want), "{json}:\n  got  `{e}`\n  want `{want}`");
        }
    }

    #[test]
    fn file_errors_name_the_field_not_the_file() {
        let dir = std::env::temp_dir().join(format!("ihip-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("x.json");
        std::fs::write(&f, r#"{"default": {"method": "hip", "sink": -5}}"#).unwrap();
        let p = f.to_str().unwrap();
        let e = PolicyConfig::from_file(p).unwrap_err().to_string();
        assert!(
            e.starts_with("invalid config field `default.sink`") && e.contains(p),
            "{e}"
        );
        std::fs::write(&f, "{\"default\": ").unwrap();
        let e = PolicyConfig::from_file(p).unwrap_err().to_string();
        assert!(
            e.contains(p) && e.contains("not valid JSON") && e.contains("line 1"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
