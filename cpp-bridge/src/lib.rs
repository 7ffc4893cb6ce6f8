//! C++ bridge over the infinitehip engine (cxx).
//!
//! Two surfaces, both in namespace `infinitehip`:
//! - `EngineHandle`: the core `Engine` API (engine from a config JSON string,
//!   sequences, append K/V as f32 or f16 bits, prefill/decode attention,
//!   stats as JSON). The plugin owns the KV.
//! - `LlamaPlugin`: the llama.cpp attention hook. Stateless over KV: it reads
//!   llama.cpp's own K/V buffers and attention mask (ggml views passed as byte
//!   slices + `TensorDesc`), runs the layer's policy to select tokens and
//!   attends over them (see `llama`).
//!
//! Errors cross as `rust::Error` (a C++ exception carrying the Rust message).
//! Every entry point runs under `catch_unwind`, so a Rust panic becomes an
//! error too and never unwinds into C++.

pub mod guarded;
pub mod llama;
pub(crate) mod llama_attend;
pub mod llama_cuda;
pub mod llama_gpu;
pub mod llama_lazy;
pub mod llama_lazy_revive;
pub mod llama_locret;
pub mod llama_locret_score;
pub mod llama_offload;
pub(crate) mod llama_profile;
pub mod llama_rope;
pub mod logging;

use half::f16;
use infinitehip::engine::Projections;
use infinitehip::policy::Phase;
use infinitehip::{Engine, PolicyConfig};

pub use guarded::Poison;
pub(crate) use guarded::{guard, guard_or, stats_unavailable};
pub use llama::LlamaPlugin;
pub use llama_cuda::{llama_cuda_attn_new, LlamaCudaAttn};
pub use llama_gpu::{llama_gpu_route_new, LlamaGpuRoute};

#[cxx::bridge(namespace = "infinitehip")]
pub mod ffi {
    /// A ggml tensor view: element type as `ggml_type` (0 = F32, 1 = F16),
    /// sizes `ne` (innermost first) and byte strides `nb`.
    #[derive(Clone, Copy, Debug)]
    struct TensorDesc {
        dtype: u32,
        ne0: i64,
        ne1: i64,
        ne2: i64,
        ne3: i64,
        nb0: u64,
        nb1: u64,
        nb2: u64,
        nb3: u64,
    }

    /// Model geometry the host engine knows. It fills `model` in a policy
    /// config that omits it, and is checked against one that has it.
    #[derive(Clone, Copy, Debug)]
    struct ModelInfo {
        n_layers: u32,
        n_q_heads: u32,
        n_kv_heads: u32,
        head_dim: u32,
        rope_theta: f32,
        n_ctx_train: u32,
    }

    /// llama.cpp's RoPE (patch 0006), for hip's RoPE modes (`llama_rope`).
    #[derive(Clone, Copy, Debug)]
    struct RopeInfo {
        /// `llama_rope_type`: 0 NORM (pairs 2i, 2i+1), 2 NEOX (i, i+n_rot/2).
        rope_type: i32,
        /// Rotated dims of each head (the rest pass through).
        n_rot: u32,
        freq_base: f32,
        /// Linear position scale (1 = none).
        freq_scale: f32,
        /// YaRN scaling (refused by the RoPE modes).
        yarn: bool,
    }

    /// One call of the CUDA route (`llama_cuda`): device pointers of
    /// llama.cpp's tensors, element strides, ggml's `cudaStream_t`.
    #[derive(Clone, Copy, Debug)]
    struct CudaAttnArgs {
        stream: u64,
        layer: u32,
        /// K and V views (first cell of the ubatch's first stream).
        k: u64,
        v: u64,
        /// ggml_type of the K/V cache (F16 1, BF16 30).
        kv_type: u32,
        /// Elements between consecutive cells (n_embd_k_gqa), K and V alike.
        row_stride: u64,
        /// Device i32 `[n_rows][table_stride]`: cells (relative to `k`/`v`)
        /// in sequence-position order.
        table: u64,
        table_stride: u64,
        /// f32 q `[rows][n_q_heads * head_dim]` and output, row strides in elements.
        q: u64,
        q_row_stride: u64,
        out: u64,
        out_row_stride: u64,
        scale: f32,
        /// K/V in page-locked host memory (`--no-kv-offload` with
        /// `kv.device_cache_pages`, patch 0009): `k`/`v` are host addresses
        /// of `n_cells` cells (all streams) and `table_host` is the host
        /// twin of `table`. False (zero): `k`/`v` are device views.
        host_kv: bool,
        table_host: u64,
        n_cells: u64,
    }

    extern "Rust" {
        type EngineHandle;

        /// Engine from a `PolicyConfig` JSON document.
        fn engine_new(config_json: &str) -> Result<Box<EngineHandle>>;
        /// The documented default config (Llama-3.1-8B shape) as JSON.
        fn default_config_json() -> String;
        fn n_layers(self: &EngineHandle) -> usize;
        fn config_json(self: &EngineHandle) -> String;
        fn add_sequence(self: &mut EngineHandle, seq: u64) -> Result<()>;
        fn fork_sequence(self: &mut EngineHandle, parent: u64, child: u64) -> Result<()>;
        fn free_sequence(self: &mut EngineHandle, seq: u64) -> Result<()>;
        fn seq_len(self: &EngineHandle, layer: usize, seq: u64) -> Result<usize>;
        /// Append post-RoPE K/V `[n][n_kv_heads][head_dim]` to one layer.
        fn append_f32(
            self: &mut EngineHandle,
            layer: usize,
            seq: u64,
            k: &[f32],
            v: &[f32],
            decode: bool,
            prompt_done: bool,
        ) -> Result<()>;
        /// As `append_f32` with IEEE half bits (`ggml_fp16_t`, `uint16_t`).
        fn append_f16(
            self: &mut EngineHandle,
            layer: usize,
            seq: u64,
            k: &[u16],
            v: &[u16],
            decode: bool,
            prompt_done: bool,
        ) -> Result<()>;
        /// Append with the pre-RoPE projections that insertion-scoring
        /// policies (Locret) read: q `[n][n_q_heads][d]`, k/v `[n][n_kv_heads][d]`.
        #[allow(clippy::too_many_arguments)]
        fn append_with_projections(
            self: &mut EngineHandle,
            layer: usize,
            seq: u64,
            k: &[f32],
            v: &[f32],
            q_proj: &[f32],
            k_proj: &[f32],
            v_proj: &[f32],
            decode: bool,
            prompt_done: bool,
        ) -> Result<()>;
        /// Causal attention of the last `n` tokens: q/out `[n][n_q_heads][d]`.
        fn attend_prefill(
            self: &mut EngineHandle,
            layer: usize,
            seq: u64,
            q: &[f32],
            out: &mut [f32],
        ) -> Result<()>;
        /// One query `[n_q_heads][d]` per sequence.
        fn attend_decode(
            self: &mut EngineHandle,
            layer: usize,
            seqs: &[u64],
            q: &[f32],
            out: &mut [f32],
        ) -> Result<()>;
        /// Run the eviction the layer's policy owes for `seq` now (Locret:
        /// after a prefill chunk's attention), freeing pages.
        fn evict(self: &mut EngineHandle, layer: usize, seq: u64) -> Result<()>;
        /// Copy entries `start..end` of `seq` in `layer` out as f32
        /// `[token][kv_head][dim]` into `k` and `v` (each exactly that size).
        fn read(
            self: &EngineHandle,
            layer: usize,
            seq: u64,
            start: usize,
            end: usize,
            k: &mut [f32],
            v: &mut [f32],
        ) -> Result<()>;
        /// Per-layer stats as a JSON array.
        fn stats_json(self: &EngineHandle) -> String;

        type LlamaPlugin;

        /// Plugin for one llama.cpp context. `config_json` may omit `model`
        /// (filled from `model`); when present it must agree with `model`.
        fn llama_plugin_new(config_json: &str, model: &ModelInfo) -> Result<Box<LlamaPlugin>>;
        /// As `llama_plugin_new`, with llama.cpp's RoPE so hip's RoPE modes
        /// (`chunk_indexed`/`relative` scoring, `streaming` attention) run.
        fn llama_plugin_new_rope(
            config_json: &str,
            model: &ModelInfo,
            rope: &RopeInfo,
        ) -> Result<Box<LlamaPlugin>>;
        /// Method of a layer ("dense" layers stay on llama.cpp's attention).
        fn layer_method(self: &LlamaPlugin, layer: u32) -> Result<String>;
        /// One line describing which layers run which method.
        fn summary(self: &LlamaPlugin) -> String;
        /// Whether a ubatch of `n_tokens` tokens per stream over `n_kv`
        /// cells stays on llama.cpp's attention in every layer (below the
        /// config's `prefill_dense_below` / `decode_dense_below`).
        fn dense_below(self: &LlamaPlugin, n_tokens: u32, n_kv: u64) -> bool;
        /// Some hip layer runs a RoPE mode and a context of `n_kv` cells
        /// reaches past the trained length (`model.max_position`): llama.cpp's
        /// own attention would attend at untrained positions (patch 0012).
        fn rope_modes_past_trained(self: &LlamaPlugin, n_kv: u64) -> bool;
        /// Select the tokens every query attends to (one thread). `q`
        /// `[d, n_q_heads, n_tokens, n_stream]` f32; `k`
        /// `[d, n_kv_heads, n_kv, n_stream]`; `v` as k, or
        /// `[n_kv, n_kv_heads, d, n_stream]` when `v_trans`; `mask`
        /// `[n_kv, >= n_tokens, *, n_stream or 1]` (0 or -inf entries).
        #[allow(clippy::too_many_arguments)]
        fn plan(
            self: &LlamaPlugin,
            layer: u32,
            scale: f32,
            q: &[u8],
            qd: &TensorDesc,
            k: &[u8],
            kd: &TensorDesc,
            v: &[u8],
            vd: &TensorDesc,
            v_trans: bool,
            mask: &[u8],
            md: &TensorDesc,
        ) -> Result<()>;
        /// `plan` run by all `nth` threads of a ggml op: thread 0 plans,
        /// the others (`ith` > 0) work on its parallel parts and return when
        /// it is done (their tensor arguments are not read).
        #[allow(clippy::too_many_arguments)]
        fn plan_team(
            self: &LlamaPlugin,
            layer: u32,
            ith: i32,
            nth: i32,
            scale: f32,
            q: &[u8],
            qd: &TensorDesc,
            k: &[u8],
            kd: &TensorDesc,
            v: &[u8],
            vd: &TensorDesc,
            v_trans: bool,
            mask: &[u8],
            md: &TensorDesc,
        ) -> Result<()>;
        /// `attend` run by all `nth` threads of a ggml op: thread 0's `out`
        /// holds every item's output; the others (`ith` > 0) work on its
        /// parts and return when it is done (their arguments are not read).
        /// At decode with few items per thread, one KV head's selected cells
        /// are split across threads and merged.
        #[allow(clippy::too_many_arguments)]
        fn attend_team(
            self: &LlamaPlugin,
            layer: u32,
            ith: i32,
            nth: i32,
            scale: f32,
            q: &[u8],
            qd: &TensorDesc,
            k: &[u8],
            kd: &TensorDesc,
            v: &[u8],
            vd: &TensorDesc,
            v_trans: bool,
            mask: &[u8],
            md: &TensorDesc,
            out: &mut [f32],
        ) -> Result<()>;
        /// Attention for work items `item0..item1` of the last plan (item =
        /// (stream, token, kv head), in that order); `out` holds exactly
        /// those items' outputs (`group * d` floats each), a contiguous part
        /// of `[d, n_q_heads, n_tokens, n_stream]`. Safe to call from several
        /// threads with disjoint item ranges.
        #[allow(clippy::too_many_arguments)]
        fn attend(
            self: &LlamaPlugin,
            layer: u32,
            item0: usize,
            item1: usize,
            scale: f32,
            q: &[u8],
            qd: &TensorDesc,
            k: &[u8],
            kd: &TensorDesc,
            v: &[u8],
            vd: &TensorDesc,
            v_trans: bool,
            mask: &[u8],
            md: &TensorDesc,
            out: &mut [f32],
        ) -> Result<()>;
        /// Counters (planned calls, sparse vs masked streams, tokens attended) as JSON.
        fn stats_json(self: &LlamaPlugin) -> String;

        /// Locret (see `llama_locret`): whether `layer` runs locret (its
        /// attention stays llama.cpp's; a scoring op scores its tokens).
        fn locret_layer(self: &LlamaPlugin, layer: u32) -> bool;
        /// Whether some layer runs locret.
        fn locret_on(self: &LlamaPlugin) -> bool;
        /// q/k rows in llama.cpp's interleaved-RoPE order (un-permuted to
        /// HF order before scoring).
        fn locret_set_qk_interleaved(self: &LlamaPlugin, on: bool);
        /// Score tokens of the ubatch in flight (ggml thread `ith` of
        /// `nth`): pre-RoPE q `[d, n_q_heads, n_tokens]`, k and v `[d,
        /// n_kv_heads, n_tokens]`; `mask` (may be empty) counts live cells.
        #[allow(clippy::too_many_arguments)]
        fn locret_score(
            self: &LlamaPlugin,
            layer: u32,
            q: &[u8],
            qd: &TensorDesc,
            k: &[u8],
            kd: &TensorDesc,
            v: &[u8],
            vd: &TensorDesc,
            mask: &[u8],
            md: &TensorDesc,
            ith: u32,
            nth: u32,
        ) -> Result<()>;
        /// Layer `layer`'s retaining-head fc1 `[hidden][in]` (ggml `[in,
        /// hidden]`) for the scoring graph, q/k columns in llama.cpp's row
        /// order when `qk_interleaved`.
        fn locret_graph_fc1(
            self: &LlamaPlugin,
            layer: u32,
            qk_interleaved: bool,
        ) -> Result<Vec<f32>>;
        /// Layer `layer`'s fc2 `[n_kv_heads][hidden]` (ggml `[hidden, n_kv_heads]`).
        fn locret_graph_fc2(self: &LlamaPlugin, layer: u32) -> Result<Vec<f32>>;
        /// Drop the plugin's f32 retaining heads (the ggml graph holds them).
        fn locret_release_heads(self: &LlamaPlugin);
        /// The ubatch in flight holds only decoded tokens: no scoring needed.
        fn locret_ubatch_decoded(self: &LlamaPlugin) -> bool;
        /// Fold the scoring graph's scores `s` `[n_kv_heads, n_tokens]` of
        /// `layer` into the ubatch in flight (max over heads and layers);
        /// `mask` (may be empty) counts live cells; empty `s`: only that.
        fn locret_record(
            self: &LlamaPlugin,
            layer: u32,
            s: &[u8],
            sd: &TensorDesc,
            mask: &[u8],
            md: &TensorDesc,
        ) -> Result<()>;
        /// Check mode: compare the graph's scores with the core's f64
        /// reference on the same pre-RoPE q/k/v (stats: check_max_rel_err).
        #[allow(clippy::too_many_arguments)]
        fn locret_check(
            self: &LlamaPlugin,
            layer: u32,
            s: &[u8],
            sd: &TensorDesc,
            q: &[u8],
            qd: &TensorDesc,
            k: &[u8],
            kd: &TensorDesc,
            v: &[u8],
            vd: &TensorDesc,
        ) -> Result<()>;
        /// Before each ubatch: its tokens' positions, sequence counts and
        /// flattened sequence ids. Returns the cells to evict as flat
        /// `(seq, p0, p1)` triples for `llama_memory_seq_rm`.
        fn locret_begin(
            self: &LlamaPlugin,
            pos: &[i32],
            n_seq: &[u32],
            seq_ids: &[i32],
        ) -> Result<Vec<i32>>;

        /// LazyLLM row dropping (see `llama_lazy`, patch 0007): whether some
        /// layer runs lazy.
        fn lazy_rows_on(self: &LlamaPlugin) -> bool;
        /// `[layer, rows after it]` per pruning point (flat) for a ubatch of
        /// `n_tokens` tokens, `n_outputs` of them with logits.
        fn lazy_rows_plan(
            self: &LlamaPlugin,
            n_tokens: u32,
            n_outputs: u32,
            single_seq: bool,
        ) -> Vec<u32>;
        /// Graph build with row dropping in progress (lazy layers then keep
        /// llama.cpp's attention).
        fn lazy_rows_set_building(self: &LlamaPlugin, on: bool);
        fn lazy_rows_building(self: &LlamaPlugin) -> bool;
        /// The ubatch in flight writes `cells` (`k_idxs`) at positions `pos`.
        fn lazy_rows_begin(self: &LlamaPlugin, cells: &[i64], pos: &[i32]) -> Result<()>;
        /// Pruning op: kept rows (indices into the current rows) into `out`.
        #[allow(clippy::too_many_arguments)]
        fn lazy_rows_keep(
            self: &LlamaPlugin,
            layer: u32,
            scale: f32,
            q: &[u8],
            qd: &TensorDesc,
            k: &[u8],
            kd: &TensorDesc,
            mask: &[u8],
            md: &TensorDesc,
            cells: &[i64],
            col0: i64,
            cols: &[i64],
            forced: &[u8],
            out: &mut [i32],
        ) -> Result<()>;
        /// Mask of the layers from `first` on: gathered rows (`rows`, empty:
        /// all), cells without K/V there hidden.
        #[allow(clippy::too_many_arguments)]
        fn lazy_rows_mask(
            self: &LlamaPlugin,
            first: u32,
            mask: &[u8],
            md: &TensorDesc,
            rows: &[i32],
            rev_pos: &[i32],
            col0: i64,
            kv_size: i64,
            ith: u32,
            nth: u32,
            out: &mut [u8],
        ) -> Result<()>;
        /// Layers `first..=last` computed `rows` attention rows each.
        fn lazy_rows_count(self: &LlamaPlugin, first: u32, last: u32, rows: u64);
        /// Layers `first..=last` attended over compact K/V (patch 0010) with
        /// `rows` rows each (stats `compact_rows`).
        fn lazy_rows_compacted(self: &LlamaPlugin, first: u32, last: u32, rows: u64);
        /// Revival (see `llama_lazy_revive`, patch 0010): hidden rows of
        /// `cells` pruned at `layer` into the aux cache.
        fn lazy_aux_store(
            self: &LlamaPlugin,
            layer: u32,
            cells: &[i64],
            rows: &[f32],
        ) -> Result<()>;
        /// Cells the decode graph being built revives at point `point`, flat
        /// `[cell, position]` pairs.
        fn lazy_revive_plan(self: &LlamaPlugin, point: u32) -> Vec<i64>;
        /// The graph reviving `cells` runs: they hold every layer from now on.
        fn lazy_revive_begin(self: &LlamaPlugin, cells: &[i64]) -> Result<()>;
        /// Aux rows of `cells` into `out` (taken out of the cache).
        fn lazy_aux_take(self: &LlamaPlugin, cells: &[i64], out: &mut [f32]) -> Result<()>;
        /// Decode at point `point`: the new token's attention picks the
        /// cells the next decode step revives.
        #[allow(clippy::too_many_arguments)]
        fn lazy_revive_rank(
            self: &LlamaPlugin,
            point: u32,
            scale: f32,
            q: &[u8],
            qd: &TensorDesc,
            k: &[u8],
            kd: &TensorDesc,
            mask: &[u8],
            md: &TensorDesc,
            col0: i64,
        ) -> Result<()>;
        /// Layers whose K/V each known cell holds (tests).
        fn lazy_rows_depths(self: &LlamaPlugin) -> Vec<u16>;

        /// GPU route of a llama.cpp context (see `llama_gpu`): host key
        /// mirror, policy over it, I32 cell indices for a sparse mask.
        type LlamaGpuRoute;
        fn llama_gpu_route_new(plugin: &LlamaPlugin) -> Box<LlamaGpuRoute>;
        fn top_k(self: &LlamaGpuRoute, plugin: &LlamaPlugin, layer: u32, n_kv: i64) -> Result<u32>;
        fn append_keys(
            self: &LlamaGpuRoute,
            layer: u32,
            k_cur: &[u8],
            kd: &TensorDesc,
            idxs: &[u8],
            cells_total: u64,
        ) -> Result<()>;
        #[allow(clippy::too_many_arguments)]
        fn missing_cells(
            self: &LlamaGpuRoute,
            layer: u32,
            mask: &[u8],
            md: &TensorDesc,
            n_tokens: u64,
            stream0: u64,
            kv_size: u64,
            row: u64,
        ) -> Result<Vec<u64>>;
        fn fill_cells(
            self: &LlamaGpuRoute,
            layer: u32,
            start: u64,
            data: &[u8],
            dtype: u32,
        ) -> Result<()>;
        #[allow(clippy::too_many_arguments)]
        fn plan_indices(
            self: &LlamaGpuRoute,
            plugin: &LlamaPlugin,
            layer: u32,
            scale: f32,
            q: &[u8],
            qd: &TensorDesc,
            mask: &[u8],
            md: &TensorDesc,
            stream0: u64,
            kv_size: u64,
            top_k: u32,
            out: &mut [i32],
        ) -> Result<()>;
        #[cxx_name = "stats_json"]
        fn gpu_stats_json(self: &LlamaGpuRoute) -> String;

        /// CUDA route of a llama.cpp context (see `llama_cuda`): our CUDA
        /// attention over llama.cpp's device K/V on ggml's stream. Errors
        /// when built without the `cuda` feature or without a GPU.
        type LlamaCudaAttn;
        fn llama_cuda_attn_new(plugin: &LlamaPlugin) -> Result<Box<LlamaCudaAttn>>;
        fn layer_method(self: &LlamaCudaAttn, layer: u32) -> String;
        /// The config asks for K/V in host memory read through device
        /// caches (`kv.device_cache_pages`, see `llama_offload`).
        fn host_tier(self: &LlamaCudaAttn) -> bool;
        /// One query row per request (stream b of the ubatch, sequence
        /// `seqs[b]`, `lens[b]` tokens in table row b). Nothing waits.
        fn attend(
            self: &LlamaCudaAttn,
            args: &CudaAttnArgs,
            seqs: &[u64],
            lens: &[u32],
        ) -> Result<()>;
        /// Causal prefill of one sequence's `n_new` last tokens (query
        /// rows consecutive in `args.q`) over its `len` cells in table
        /// row 0: hip layers attend sparsely (the engine's prefill, mask
        /// estimator included). Resets the sequence's hip state. Nothing waits.
        fn prefill(
            self: &LlamaCudaAttn,
            args: &CudaAttnArgs,
            seq: u64,
            len: u32,
            n_new: u32,
        ) -> Result<()>;
        /// Forget a sequence's hip state (next decode refreshes fully).
        fn end_request(self: &LlamaCudaAttn, seq: u64);
        #[cxx_name = "stats_json"]
        fn cuda_stats_json(self: &LlamaCudaAttn) -> String;
    }
}

/// The core `Engine` behind the bridge.
pub struct EngineHandle {
    engine: Engine,
    /// Set by a caught panic (`guarded`).
    pub poison: Poison,
}

pub fn engine_new(config_json: &str) -> Result<Box<EngineHandle>, String> {
    guard(|| {
        let cfg = PolicyConfig::from_json(config_json)?;
        Ok(Box::new(EngineHandle {
            engine: Engine::new(cfg)?,
            poison: Poison::default(),
        }))
    })
}

pub fn default_config_json() -> String {
    guard_or("default_config_json", String::new(), || {
        PolicyConfig::default().to_json_pretty()
    })
}

fn phase(decode: bool) -> Phase {
    if decode {
        Phase::Decode
    } else {
        Phase::Prefill
    }
}

fn f16_bits(x: &[u16]) -> &[f16] {
    // SAFETY: f16 is repr(transparent) over u16: same size and alignment.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const f16, x.len()) }
}

impl EngineHandle {
    pub fn n_layers(&self) -> usize {
        self.poison
            .guard_or("n_layers", 0, || self.engine.n_layers())
    }
    pub fn config_json(&self) -> String {
        self.poison.guard_or("config_json", String::new(), || {
            self.engine.config().to_json_pretty()
        })
    }
    pub fn add_sequence(&mut self, seq: u64) -> Result<(), String> {
        self.poison.guard(|| self.engine.add_sequence(seq))
    }
    pub fn fork_sequence(&mut self, parent: u64, child: u64) -> Result<(), String> {
        self.poison
            .guard(|| self.engine.fork_sequence(parent, child))
    }
    pub fn free_sequence(&mut self, seq: u64) -> Result<(), String> {
        self.poison.guard(|| self.engine.free_sequence(seq))
    }
    pub fn seq_len(&self, layer: usize, seq: u64) -> Result<usize, String> {
        self.poison.guard(|| self.engine.seq_len(layer, seq))
    }
    pub fn append_f32(
        &mut self,
        layer: usize,
        seq: u64,
        k: &[f32],
        v: &[f32],
        decode: bool,
        prompt_done: bool,
    ) -> Result<(), String> {
        self.poison.guard(|| {
            self.engine
                .append(layer, seq, k, v, phase(decode), prompt_done, None)
        })
    }
    pub fn append_f16(
        &mut self,
        layer: usize,
        seq: u64,
        k: &[u16],
        v: &[u16],
        decode: bool,
        prompt_done: bool,
    ) -> Result<(), String> {
        self.poison.guard(|| {
            self.engine.append(
                layer,
                seq,
                f16_bits(k),
                f16_bits(v),
                phase(decode),
                prompt_done,
                None,
            )
        })
    }
    #[allow(clippy::too_many_arguments)]
    pub fn append_with_projections(
        &mut self,
        layer: usize,
        seq: u64,
        k: &[f32],
        v: &[f32],
        q_proj: &[f32],
        k_proj: &[f32],
        v_proj: &[f32],
        decode: bool,
        prompt_done: bool,
    ) -> Result<(), String> {
        self.poison.guard(|| {
            let proj = Projections {
                q: q_proj,
                k: k_proj,
                v: v_proj,
            };
            self.engine
                .append(layer, seq, k, v, phase(decode), prompt_done, Some(proj))
        })
    }
    pub fn attend_prefill(
        &mut self,
        layer: usize,
        seq: u64,
        q: &[f32],
        out: &mut [f32],
    ) -> Result<(), String> {
        self.poison
            .guard(|| self.engine.attend_prefill(layer, seq, q, out))
    }
    pub fn attend_decode(
        &mut self,
        layer: usize,
        seqs: &[u64],
        q: &[f32],
        out: &mut [f32],
    ) -> Result<(), String> {
        self.poison
            .guard(|| self.engine.attend_decode(layer, seqs, q, out))
    }
    pub fn evict(&mut self, layer: usize, seq: u64) -> Result<(), String> {
        self.poison.guard(|| self.engine.evict(layer, seq))
    }
    pub fn read(
        &self,
        layer: usize,
        seq: u64,
        start: usize,
        end: usize,
        k: &mut [f32],
        v: &mut [f32],
    ) -> Result<(), String> {
        self.poison.guard(|| {
            let (rk, rv) = self.engine.read(layer, seq, start, end)?;
            if k.len() != rk.len() || v.len() != rv.len() {
                return Err(infinitehip::Error::shape(
                    "read k/v buffers",
                    format!("{} elements each", rk.len()),
                    format!("k {}, v {}", k.len(), v.len()),
                ));
            }
            k.copy_from_slice(&rk);
            v.copy_from_slice(&rv);
            Ok(())
        })
    }
    /// Per-layer stats, `{"layers": [...]}` (`Engine::stats_json`).
    pub fn stats_json(&self) -> String {
        self.poison
            .guard_or("stats_json", stats_unavailable("engine stats"), || {
                self.engine.stats_json()
            })
    }
}

pub fn llama_plugin_new(
    config_json: &str,
    model: &ffi::ModelInfo,
) -> Result<Box<LlamaPlugin>, String> {
    logging::init_plugin_logging();
    guard(|| LlamaPlugin::new(config_json, model).map(Box::new))
}

pub fn llama_plugin_new_rope(
    config_json: &str,
    model: &ffi::ModelInfo,
    rope: &ffi::RopeInfo,
) -> Result<Box<LlamaPlugin>, String> {
    logging::init_plugin_logging();
    guard(|| LlamaPlugin::new_with_rope(config_json, model, Some(rope)).map(Box::new))
}
