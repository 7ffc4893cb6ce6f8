//! GPU attention for engines: decode (and dense causal prefill) over the
//! ENGINE'S OWN K/V device tensors, on the engine's CUDA stream, with q and
//! out in the engine's dtype. One `GpuAttention` serves every layer of a
//! model: each layer is dense, hip, squeeze, lazy or locret (from the
//! `PolicyConfig`); per-request policy state is kept per (layer, request
//! id) (hip masks, squeeze indexes, locret retained sets) or per request
//! (lazy keep sets, shared by the lazy layers as on the CPU). One module
//! per policy's state: `hip`, `squeeze`, `lazy`, `locret` (each says what
//! it does and where it differs from the CPU policy).
//!
//! - K/V: `EngineKv`, borrowed pointers + element strides + a device i32 page
//!   (or slot) table (`DeviceKv::borrowed`); SGLang's `k_buffer[layer]`
//!   `[slots][kv_heads][D]` with `req_to_token` is page_size 1.
//! - q: `QArg`, `[rows][n_q_heads * D]` f32/f16/bf16 with a row stride; it
//!   is converted to the kernels' f32 (one small launch, scaled so that the
//!   softmax scale is the caller's). out: `AttnOut` (dtype + row stride),
//!   written by the combine kernel directly.
//! - Per step the host sends only small arrays (selection bounds, regions,
//!   table rows) with one async copy on the stream; nothing waits for the
//!   device (see the ordering rules in `backend::cuda`).
//! - hip state: a request's first decode (or the first after `prefill` or
//!   `end_request`) refreshes every stage; later steps follow its own
//!   refresh schedule (as `HipGpuDecoder`, batch 1). Mask estimation is
//!   launched per request (pointer offsets into the batch); the attention of
//!   the whole batch (mixed lengths) is one launch: by default the sparse v2
//!   kernel (kernels/decode_dense_v2.cu `hip_sparse_*`, as `HipGpuDecoder`:
//!   the assembly also writes each row's sink + chunk position table, the
//!   slid + window tail comes from the step's regions), or split-K partials
//!   and combine over the selection ranges (`set_hip_attention`, or
//!   `dispatch::force_attention`; the previous path, same selection). No
//!   lean steps here (`HipGpuDecoder::set_lean`): the tables live in a
//!   per-call buffer (host path) or per batch position (graph path), not per
//!   request, so every step assembles them (one small launch per request).
//! - squeeze: prefill dense (the prompt's own queries, as on the CPU) while
//!   the observation window's queries are kept on the device; the first
//!   decode seals the prefix (the one host sync: keys read back once,
//!   k-means on the host, see `squeeze`); decode looks up on the GPU.
//! - lazy: keep sets on the GPU per request, shared across layers; prefill
//!   attention is launched per request (its queries share one set, clipped
//!   causally).
//! - locret: the retaining head scores each prefill's tokens on the GPU
//!   from the pre-RoPE projections the caller passes (`prefill_ex`,
//!   `ProjArg`); one host sync per (prefill call, layer) reads the scores
//!   back for the CPU policy's bookkeeping. Eviction is a per-(request,
//!   layer, KV head) retained index set that attention reads; the engine
//!   frees pool memory itself from `locret_retain_now` (see `locret`).
//! - hip prefill: sparse, as on the CPU (`prefill_estimator`, default the
//!   tensor-core mask estimator of `hip_fast`; `Reference` is the f32 twin
//!   bit-equal to the CPU policy; `None` attends densely): per request and
//!   chunk of `prefill_chunk` queries, the mask of every query block, then
//!   block-sparse causal attention.
//! - CUDA graphs: `decode` takes host arrays that change every step, so it
//!   cannot be captured; `decode_graph` (`graph`, dense and hip layers) reads
//!   the batch's rows and lengths from device tensors and computes its
//!   metadata on the device, after `prepare_graph` allocated everything.

mod graph;
mod hip;
mod host_tier;
mod lazy;
mod locret;
mod rope;
mod squeeze;

pub use graph::{DevIndex, MAX_GRAPH_BATCH};
pub use host_tier::{HostKvArgs, HostTier, HostTierConfig, HostTierStats};
pub use locret::LocretStats;

use std::collections::HashMap;

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::dense_decode::{launch_dense, launch_v2, DenseDecodeWs, V2Src};
use super::dispatch::HipGpuPrefill;
use super::dispatch::{
    assemble_rows, launch_attention_ex, regions, run_stages, AttnOut, DecodeWorkspace, DeviceKv,
    DeviceSelection, HipAttention, KvPtrs, StageBuf, StageInputs, TabOut,
};
use super::hip_fast::MaskEstimator;
use super::rope_gpu::{CompactKv, RopeGpu, RopeLayout, Seqs};
use super::{gpu_err, kernels, DevBuf, GpuContext};
use crate::attention::AttnShape;
use crate::config::{LayerPolicy, PolicyConfig};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// An engine's K/V for one layer (see `DeviceKv::borrowed`).
#[derive(Clone, Copy, Debug)]
pub struct EngineKv {
    pub k: u64,
    pub v: u64,
    pub dtype: DType,
    /// Device i32 `[rows][table_stride]` page (slot) ids.
    pub table: u64,
    pub table_stride: usize,
    pub page_size: usize,
    pub page_stride: usize,
    pub head_stride: usize,
}

impl EngineKv {
    /// The kernels' view of these tensors (strides come from `DeviceKv`).
    fn ptrs(&self) -> KvPtrs {
        KvPtrs {
            k: self.k,
            v: self.v,
            table: self.table,
            table_stride: self.table_stride,
            page_size: self.page_size,
            dtype: self.dtype,
        }
    }
}

/// Queries `[rows][n_q_heads * head_dim]` on the device.
#[derive(Clone, Copy, Debug)]
pub struct QArg {
    pub ptr: u64,
    pub dtype: DType,
    /// Elements between consecutive rows.
    pub row_stride: usize,
}

/// Pre-RoPE projections of a prefill's new tokens (rows in request order,
/// as q), for locret layers: q `[rows][n_q_heads * D]`, k and v
/// `[rows][n_kv_heads * D]`, all of `dtype`, with row strides in elements.
#[derive(Clone, Copy, Debug)]
pub struct ProjArg {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub dtype: DType,
    pub q_stride: usize,
    pub kv_stride: usize,
}

/// What a prefill appends beyond K/V, for policies that score at
/// insertion (locret): the projections and, per request, whether the call
/// ends the prompt (`Engine::append`'s `prompt_done`; empty: false).
#[derive(Clone, Copy, Debug)]
pub struct Insert<'a> {
    pub proj: Option<ProjArg>,
    pub prompt_done: &'a [bool],
}

pub(super) fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Bf16 => 2,
    }
}

use hip::HipLayer;
use lazy::{LazyGpu, LazyReq};
use locret::LocretLayer;
use squeeze::SqueezeLayer;

enum Layer {
    Dense,
    Hip(Box<HipLayer>),
    Squeeze(Box<SqueezeLayer>),
    Lazy,
    Locret(Box<LocretLayer>),
}

/// Per-layer dense or hip attention over an engine's K/V (module doc).
pub struct GpuAttention {
    gpu: GpuContext,
    shape: AttnShape,
    layers: Vec<Layer>,
    slots: HashMap<u64, usize>,
    free: Vec<usize>,
    n_slots: usize,
    ws: DecodeWorkspace,
    /// Split-K scratch of the dense decode kernel (dense layers).
    dense_ws: DenseDecodeWs,
    /// hip layers' decode attention (None: `dispatch::attention()`, the
    /// sparse v2 kernel unless forced): `set_hip_attention`.
    hip_attn: Option<HipAttention>,
    /// Split scratch of the sparse v2 attention (hip layers).
    sparse_ws: DenseDecodeWs,
    /// Sparse v2 position tables (sink + last stage's chunks) of the
    /// host-metadata hip decode: i32 `[b * hkv][tab_cap]`, and counts.
    tab: DevBuf,
    ntab: DevBuf,
    qf: DevBuf,
    up: DevBuf,
    sel_ranges: DevBuf,
    sel_cum: DevBuf,
    sel_rows: usize,
    sel_cap: usize,
    keys: DevBuf,
    keys_cap: usize,
    nq: DevBuf,
    ones: DevBuf,
    /// Small per-call uploads of the squeeze layers.
    pol_up: DevBuf,
    /// State of the lazy layers (None when no layer is lazy).
    lazy: Option<LazyGpu>,
    /// Prefill of hip layers: `Some(estimator)` runs hip's sparse prefill
    /// (mask estimation per query block, then block-sparse attention) with
    /// that estimator; `None` attends densely (causal). Default
    /// `Some(MaskEstimator::Auto)` (the tensor-core estimator).
    pub prefill_estimator: Option<MaskEstimator>,
    /// RoPE-mode hip layers' prefill while every query is within the
    /// trained length: false (default; SGLang's host path) dense causal at
    /// the model's positions; true (llama.cpp's CUDA route, whose host runs
    /// a ubatch here only at or above `prefill_dense_below`, as its CPU
    /// route plans it) the RoPE-mode sparse prefill, as past it.
    pub rope_prefill_sparse: bool,
    /// Buffers of the hip sparse prefill, shared by the hip layers (rebuilt
    /// when a layer's hip config differs from the last one's).
    hip_pf: Option<Box<HipGpuPrefill>>,
    /// Buffers and per-row state of `decode_graph` (after `prepare_graph`).
    graph: Option<Box<graph::GraphState>>,
    /// Streaming attention's compact K/V, shared by the RoPE-mode hip
    /// layers (first use; `rope_gpu::CompactKv`).
    rope_kv: Option<CompactKv>,
    /// The stored keys' pair layout and frequencies for the RoPE modes
    /// (`set_rope_layout`; None: halves at `model.rope_theta`).
    rope_layout: Option<RopeLayout>,
}

fn grow(buf: &mut DevBuf, bytes: usize) -> Result<()> {
    if buf.bytes < bytes || !buf.is_owned() {
        *buf = DevBuf::alloc(bytes.next_power_of_two())?;
    }
    Ok(())
}

fn i32_of(what: &str, x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::OutOfRange(format!("{what} {x} exceeds i32")))
}

/// `rows` rows of `width` elements of `dtype` at `src` (row stride in
/// elements) to contiguous f32 at `dst`, times `mul`, on `gpu`'s stream.
#[allow(clippy::too_many_arguments)]
fn to_f32(
    gpu: &GpuContext,
    src: u64,
    dtype: DType,
    row_stride: usize,
    rows: usize,
    width: usize,
    mul: f32,
    dst: u64,
) -> Result<()> {
    let f = gpu.func("decode", "q_to_f32")?;
    let (dt, st, nr, h) = (
        dtype_code(dtype),
        row_stride as i64,
        i32_of("rows", rows)?,
        i32_of("row width", width)?,
    );
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(&src)
        .arg(&dt)
        .arg(&st)
        .arg(&nr)
        .arg(&h)
        .arg(&mul)
        .arg(&dst);
    let blocks = (rows * width).div_ceil(256).min(4096) as u32;
    // SAFETY: the arguments pushed above follow the kernel's parameter list in kernels/*.cu (same
    // order and C types); every pointer is a device allocation of this context sized for this grid
    // by the code above.
    unsafe {
        l.launch(LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map_err(|e| gpu_err("launch q_to_f32", e))?;
    Ok(())
}

/// Rows `row0..row0 + n` of a selection (a view: same buffers).
fn sel_rows(sel: &DeviceSelection, row0: usize, n: usize) -> DeviceSelection {
    let cap = sel.cap;
    DeviceSelection {
        ranges: DevBuf::borrowed(sel.ranges.ptr + (row0 * cap * 8) as u64, n * cap * 8),
        cum: DevBuf::borrowed(sel.cum.ptr + (row0 * cap * 4) as u64, n * cap * 4),
        cnt: DevBuf::borrowed(sel.cnt.ptr + (row0 * 4) as u64, n * 4),
        tot: DevBuf::borrowed(sel.tot.ptr + (row0 * 4) as u64, n * 4),
        cap,
        rows: n,
        max_tokens: sel.max_tokens,
    }
}

/// The lazy layers' view of a call's requests (query rows in request
/// order, `n_new[i]` each).
fn lazy_reqs(
    slots: &[usize],
    table_rows: &[usize],
    lens: &[usize],
    n_new: &[usize],
) -> Vec<LazyReq> {
    let mut row = 0;
    slots
        .iter()
        .enumerate()
        .map(|(i, &slot)| {
            row += n_new[i];
            LazyReq {
                slot,
                row: table_rows[i],
                len: lens[i],
                n: n_new[i],
                last_row: row - 1,
            }
        })
        .collect()
}

impl GpuAttention {
    /// One attention object for the model in `cfg` on `gpu`. Locret layers
    /// are refused.
    pub fn new(gpu: &GpuContext, cfg: &PolicyConfig) -> Result<Self> {
        cfg.validate()?;
        let m = &cfg.model;
        let shape = AttnShape::new(m.n_q_heads, m.n_kv_heads, m.head_dim)?;
        if !kernels::HEAD_DIMS.contains(&shape.head_dim)
            || !kernels::GROUPS.contains(&shape.group())
        {
            return Err(Error::Invalid(format!(
                "GPU attention: kernels support head_dim 64/128/256 and GQA groups 1/2/4/8, got head_dim {} group {}",
                shape.head_dim,
                shape.group()
            )));
        }
        let mut layers = Vec::new();
        let mut rope_layers = Vec::new();
        for l in 0..m.n_layers {
            // The one layer rule (`resolve_layer`), as on the CPU.
            layers.push(match cfg.layer_policy(l) {
                LayerPolicy::Dense => Layer::Dense,
                LayerPolicy::Hip(h) => {
                    let rope = match rope::layer_modes(l, h)? {
                        None => None,
                        Some(_) => {
                            rope_layers.push(l);
                            RopeGpu::new(
                                h,
                                m.head_dim,
                                m.rope_theta,
                                m.max_position,
                                1,
                                m.n_q_heads,
                            )?
                            .map(Box::new)
                        }
                    };
                    Layer::Hip(Box::new(HipLayer {
                        caps: h
                            .stages
                            .iter()
                            .map(|s| (s.keep_tokens / s.chunk_size).max(1))
                            .collect(),
                        cfg: h.clone(),
                        chunks: Vec::new(),
                        step: Vec::new(),
                        mid_end: Vec::new(),
                        rope,
                    }))
                }
                LayerPolicy::Squeeze(z) => {
                    Layer::Squeeze(Box::new(SqueezeLayer::new(z.clone(), m)?))
                }
                LayerPolicy::Lazy(_) => Layer::Lazy,
                LayerPolicy::Locret(c) => {
                    Layer::Locret(Box::new(LocretLayer::new(c.clone(), m, l, &shape)?))
                }
            });
        }
        let n_locret = layers
            .iter()
            .filter(|l| matches!(l, Layer::Locret(_)))
            .count();
        if n_locret > 0 {
            tracing::info!(
                layers = n_locret,
                "locret on the GPU engine path: eviction keeps a retained index set per (request, layer, KV head) that attention reads; the engine frees its evicted slots only if it compacts its pool (locret_retain_now)"
            );
        }
        if !rope_layers.is_empty() {
            tracing::info!(
                layers = ?rope_layers,
                rope_theta = m.rope_theta,
                max_position = m.max_position,
                "hip RoPE modes on the GPU engine path: decode re-rotates keys on the fly; prefill of these layers is dense at the model's positions within model.max_position and the RoPE-mode hip sparse prefill past it (compiled, not run on a GPU); no CUDA graphs"
            );
        }
        let lazy = (0..m.n_layers).find_map(|l| match cfg.layer_policy(l) {
            LayerPolicy::Lazy(z) => Some(LazyGpu::new(z.clone())),
            _ => None,
        });
        let g = shape.group() as i32;
        Ok(GpuAttention {
            lazy,
            pol_up: DevBuf::null(),
            // SAFETY: `gpu`'s own stream: the context's default stream, or a
            // caller stream the caller keeps alive as `on_stream` requires;
            // the copy keeps the context itself alive.
            gpu: unsafe { gpu.on_stream(gpu.raw_stream()) },
            shape,
            layers,
            slots: HashMap::new(),
            free: Vec::new(),
            n_slots: 0,
            ws: DecodeWorkspace::new(),
            dense_ws: DenseDecodeWs::new(),
            hip_attn: None,
            sparse_ws: DenseDecodeWs::new(),
            tab: DevBuf::null(),
            ntab: DevBuf::null(),
            qf: DevBuf::null(),
            up: DevBuf::null(),
            sel_ranges: DevBuf::null(),
            sel_cum: DevBuf::null(),
            sel_rows: 0,
            sel_cap: 1,
            keys: DevBuf::null(),
            keys_cap: 0,
            nq: DevBuf::from_slice(&[g])?,
            ones: DevBuf::from_slice(&vec![1i32; shape.n_kv_heads])?,
            prefill_estimator: Some(MaskEstimator::Auto),
            rope_prefill_sparse: false,
            hip_pf: None,
            graph: None,
            rope_kv: None,
            rope_layout: None,
        })
    }

    pub fn shape(&self) -> &AttnShape {
        &self.shape
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// The decode attention of hip layers (`decode` and `decode_graph`):
    /// `Some(HipAttention::SparseV2)` the sparse v2 kernel of
    /// kernels/decode_dense_v2.cu over the sink + chunk position table and
    /// the slid + window tail (one launch; what `HipGpuDecoder` attends
    /// with), `Some(HipAttention::SplitCombine)` the previous split-K
    /// partials + combine over the selection ranges, None (the default)
    /// whatever `dispatch::attention()` says (`force_attention`; sparse v2
    /// unless forced). The selection is the same either way. Set it before
    /// capturing a graph: a captured step keeps the kernel it recorded.
    pub fn set_hip_attention(&mut self, a: Option<HipAttention>) {
        self.hip_attn = a;
    }

    /// How the engine stores rotated keys and queries, for the RoPE-mode
    /// hip layers' re-rotations (decode scorer and gather, sparse prefill):
    /// llama.cpp's CUDA route passes its NORM (interleaved) layout and its
    /// freq_base / freq_scale here. Without a call: halves (NEOX) at
    /// `model.rope_theta`, unscaled. Refused per layer (naming it) where
    /// rotated scoring would rotate at other frequencies than the CPU
    /// policy (`RopeGpu::set_layout`). No-op for layers without the modes.
    /// Status: compiled, not run on a GPU (gpu-test --rope-only has
    /// interleaved cases).
    pub fn set_rope_layout(&mut self, layout: RopeLayout) -> Result<()> {
        for (l, layer) in self.layers.iter_mut().enumerate() {
            if let Layer::Hip(h) = layer {
                if let Some(r) = h.rope.as_deref_mut() {
                    r.set_layout(layout)
                        .map_err(|e| Error::Invalid(format!("layer {l}: {e}")))?;
                }
            }
        }
        self.rope_layout = Some(layout);
        Ok(())
    }

    /// What `set_rope_layout` was given.
    pub fn rope_layout(&self) -> Option<RopeLayout> {
        self.rope_layout
    }

    /// The hip layers' decode attention now (`set_hip_attention`).
    pub fn hip_attention(&self) -> HipAttention {
        self.hip_attn.unwrap_or_else(super::dispatch::attention)
    }

    /// "dense", "hip", "squeeze" or "lazy" for `layer`.
    pub fn layer_method(&self, layer: usize) -> Option<&'static str> {
        self.layers.get(layer).map(|l| match l {
            Layer::Dense => "dense",
            Layer::Hip(_) => "hip",
            Layer::Squeeze(_) => "squeeze",
            Layer::Lazy => "lazy",
            Layer::Locret(_) => "locret",
        })
    }

    /// Locret layer `layer`'s retained positions of request `id` per KV
    /// head (sorted), None when it has none.
    pub fn locret_held(&self, layer: usize, id: u64) -> Option<Vec<Vec<u32>>> {
        match self.layers.get(layer) {
            Some(Layer::Locret(z)) => z.host.policy.held_positions(id),
            _ => None,
        }
    }

    /// Locret layer `layer`: run request `id`'s owed eviction now (the
    /// one its first decode would run) and return its retained positions
    /// per KV head. With these the engine can move the retained K/V into
    /// the request's first slots and free the rest (the SGLang shim does);
    /// then end the request here, since its state describes slots that no
    /// longer hold those tokens.
    pub fn locret_retain_now(&mut self, layer: usize, id: u64) -> Result<Vec<Vec<u32>>> {
        match self.layers.get_mut(layer) {
            Some(Layer::Locret(z)) => z.host.retain_now(layer, id),
            Some(_) => Err(Error::Invalid(format!(
                "layer {layer} is not a locret layer"
            ))),
            None => Err(Error::OutOfRange(format!(
                "layer {layer} of {}",
                self.layers.len()
            ))),
        }
    }

    /// Locret layer `layer`'s counters (score read-backs and their time).
    pub fn locret_stats(&self, layer: usize) -> Option<LocretStats> {
        match self.layers.get(layer) {
            Some(Layer::Locret(z)) => Some(z.stats),
            _ => None,
        }
    }

    /// Squeeze layer `layer`'s sealed prefix of request `id`: (prefix
    /// length, clusters per head (0: nothing clustered), host time of the
    /// seal in ms). None before the seal.
    pub fn squeeze_sealed(&self, layer: usize, id: u64) -> Option<(usize, usize, f64)> {
        let s = *self.slots.get(&id)?;
        let Some(Layer::Squeeze(z)) = self.layers.get(layer) else {
            return None;
        };
        z.sealed(s).map(|x| {
            (
                x.prefix_len,
                x.index.as_ref().map_or(0, |(i, _, _)| i.clusters().0),
                x.seal_ms,
            )
        })
    }

    /// Squeeze layer `layer`'s clustering of request `id`: (k-means ms,
    /// whether it ran on the GPU). None before the seal.
    pub fn squeeze_kmeans(&self, layer: usize, id: u64) -> Option<(f64, bool)> {
        let s = *self.slots.get(&id)?;
        let Some(Layer::Squeeze(z)) = self.layers.get(layer) else {
            return None;
        };
        z.sealed(s).map(|x| (x.kmeans_ms, x.kmeans_on_gpu))
    }

    /// Cluster squeeze prefixes sealed from now on with the GPU k-means
    /// (default) or the host's (`INFINITEHIP_SQUEEZE_KMEANS=host` sets the
    /// initial choice).
    pub fn set_squeeze_kmeans_on_gpu(&mut self, on: bool) {
        for l in &mut self.layers {
            if let Layer::Squeeze(z) = l {
                z.kmeans_on_gpu = on;
            }
        }
    }

    /// Whether request `id`'s current lazy step met a non-finite importance
    /// (its selections then cover everything, so the NaN reaches the
    /// output). Waits for the device (tests, debugging).
    pub fn lazy_bad(&self, id: u64) -> Result<bool> {
        match (&self.lazy, self.slots.get(&id)) {
            (Some(z), Some(&s)) => z.bad_flag(&self.gpu, s),
            _ => Ok(false),
        }
    }

    /// Requests with hip state.
    pub fn n_requests(&self) -> usize {
        self.slots.len()
    }

    /// Forget request `id`'s hip state (its next decode refreshes fully).
    pub fn end_request(&mut self, id: u64) {
        for l in &mut self.layers {
            if let Layer::Locret(z) = l {
                z.host.end(id);
            }
        }
        if let Some(s) = self.slots.remove(&id) {
            self.reset_slot(s);
            self.free.push(s);
        }
    }

    /// Forget every request's state.
    pub fn reset(&mut self) {
        self.slots.clear();
        self.free.clear();
        self.n_slots = 0;
        for l in &mut self.layers {
            match l {
                Layer::Hip(h) => h.step.iter_mut().for_each(|x| *x = 0),
                Layer::Squeeze(z) => z.slots.clear(),
                Layer::Locret(z) => z.host.clear(),
                _ => {}
            }
        }
        if let Some(z) = &mut self.lazy {
            z.plan.slots.clear();
        }
        if let Err(e) = self.reset_graph() {
            tracing::warn!(error = %e, "GPU graph decode state not reset");
        }
    }

    fn slot(&mut self, id: u64) -> (usize, bool) {
        if let Some(&s) = self.slots.get(&id) {
            return (s, false);
        }
        let s = self.free.pop().unwrap_or_else(|| {
            self.n_slots += 1;
            self.n_slots - 1
        });
        self.slots.insert(id, s);
        // A recycled slot starts fresh in EVERY hip layer (not only the one
        // that allocates it).
        self.reset_slot(s);
        (s, true)
    }

    fn reset_slot(&mut self, s: usize) {
        self.reset_hip_slot(s);
        for l in &mut self.layers {
            if let Layer::Squeeze(z) = l {
                z.reset(s);
            }
        }
        if let Some(z) = &mut self.lazy {
            z.reset(s);
        }
    }

    /// What a prefill resets: hip masks; lazy state once the request has
    /// decoded (a new request in the row). Squeeze: `SqueezeLayer::record`.
    fn prefill_reset_slot(&mut self, s: usize) {
        self.reset_hip_slot(s);
        if let Some(z) = &mut self.lazy {
            if z.plan.slots.get(s).is_some_and(|x| x.decoded()) {
                z.reset(s);
            }
        }
    }

    fn reset_hip_slot(&mut self, s: usize) {
        for l in &mut self.layers {
            if let Layer::Hip(h) = l {
                if s < h.step.len() {
                    h.step[s] = 0;
                }
            }
        }
    }

    fn check_common(
        &self,
        layer: usize,
        kv: &EngineKv,
        q: &QArg,
        out: &AttnOut,
        rows: usize,
    ) -> Result<()> {
        if layer >= self.layers.len() {
            return Err(Error::OutOfRange(format!(
                "GPU attention: layer {layer} of a {}-layer model",
                self.layers.len()
            )));
        }
        if rows == 0 {
            return Err(Error::Invalid("GPU attention: empty batch".into()));
        }
        let hqd = self.shape.n_q_heads * self.shape.head_dim;
        for (name, p, st) in [("q", q.ptr, q.row_stride), ("out", out.ptr, out.row_stride)] {
            if p == 0 {
                return Err(Error::Invalid(format!(
                    "GPU attention: {name} pointer is NULL"
                )));
            }
            if st < hqd {
                return Err(Error::shape(
                    format!("GPU attention {name} row stride (>= n_q_heads x head_dim)"),
                    hqd,
                    st,
                ));
            }
        }
        if kernels::dtype_tag(kv.dtype).is_none() {
            return Err(Error::Invalid(format!(
                "GPU attention: K/V dtype must be bf16 or f16, got {}",
                kv.dtype
            )));
        }
        Ok(())
    }

    fn borrowed_kv(&self, kv: &EngineKv, lens: Vec<usize>) -> Result<DeviceKv> {
        DeviceKv::borrowed(
            kv.k,
            kv.v,
            kv.dtype,
            kv.table,
            kv.table_stride,
            kv.page_size,
            kv.page_stride,
            kv.head_stride,
            self.shape.n_kv_heads,
            self.shape.head_dim,
            lens,
        )
    }

    /// q to f32 `[rows][n_q][d]` in `self.qf`, times `mul`.
    fn convert_q(&mut self, gpu: &GpuContext, q: &QArg, rows: usize, mul: f32) -> Result<()> {
        let hqd = self.shape.n_q_heads * self.shape.head_dim;
        grow(&mut self.qf, rows * hqd * 4)?;
        to_f32(
            gpu,
            q.ptr,
            q.dtype,
            q.row_stride,
            rows,
            hqd,
            mul,
            self.qf.ptr,
        )
    }

    fn scaled_shape(&self, sm_scale: Option<f32>) -> Result<(AttnShape, f32)> {
        let mut sh = self.shape;
        match sm_scale {
            None => Ok((sh, 1.0)),
            Some(s) if s.is_finite() && s > 0.0 => {
                // Scores are exact in the kernels' scale; q keeps the
                // caller's scale for hip scoring (order-invariant).
                sh.scale = s;
                Ok((sh, 1.0))
            }
            Some(s) => Err(Error::Invalid(format!(
                "GPU attention: softmax scale {s} must be finite and positive"
            ))),
        }
    }

    /// Selection buffers for `rows` rows of `cap` ranges plus cnt/tot.
    fn sel_view(&mut self, rows: usize, cap: usize) -> Result<DeviceSelection> {
        grow(&mut self.sel_ranges, rows * cap * 8)?;
        grow(&mut self.sel_cum, rows * cap * 4 + rows * 8)?;
        self.sel_rows = rows;
        self.sel_cap = cap;
        let cum = self.sel_cum.ptr;
        Ok(DeviceSelection {
            ranges: DevBuf::borrowed(self.sel_ranges.ptr, rows * cap * 8),
            cum: DevBuf::borrowed(cum, rows * cap * 4),
            cnt: DevBuf::borrowed(cum + (rows * cap * 4) as u64, rows * 4),
            tot: DevBuf::borrowed(cum + (rows * cap * 4 + rows * 4) as u64, rows * 4),
            cap,
            rows,
            max_tokens: 0,
        })
    }

    /// The block selections of the last hip sparse prefill chunk (one per
    /// query block of `block_size_q`; None before any), read back
    /// synchronously (tests: the RoPE-mode prefill vs the CPU policy).
    pub fn last_prefill_selection(&self) -> Result<Option<Vec<crate::policy::Selection>>> {
        let Some(pf) = self.hip_pf.as_deref() else {
            return Ok(None);
        };
        // The last call ran on the caller's stream: wait for the device.
        cudarc::driver::result::ctx::synchronize()
            .map_err(|e| gpu_err("context synchronize", e))?;
        pf.sel.to_host(self.shape.n_kv_heads).map(Some)
    }

    /// The selection of the last call (rows `[query row][kv head]`), read
    /// back synchronously (tests, debugging). Not that of a hip layer's
    /// sparse prefill (`last_prefill_selection`).
    pub fn last_selection(&self) -> Result<Vec<crate::policy::Selection>> {
        // The last call ran on the caller's stream: wait for the device.
        cudarc::driver::result::ctx::synchronize()
            .map_err(|e| gpu_err("context synchronize", e))?;
        let (rows, cap) = (self.sel_rows, self.sel_cap);
        let sel = DeviceSelection {
            ranges: DevBuf::borrowed(self.sel_ranges.ptr, rows * cap * 8),
            cum: DevBuf::borrowed(self.sel_cum.ptr, rows * cap * 4),
            cnt: DevBuf::borrowed(self.sel_cum.ptr + (rows * cap * 4) as u64, rows * 4),
            tot: DevBuf::borrowed(
                self.sel_cum.ptr + (rows * cap * 4 + rows * 4) as u64,
                rows * 4,
            ),
            cap,
            rows,
            max_tokens: 0,
        };
        sel.to_host(self.shape.n_kv_heads)
    }

    /// Decode one query per request. `req_ids[b]` keys the hip state,
    /// `table_rows[b]` is request b's row of `kv.table`, `lens[b]` its
    /// length including the token being decoded (the query sits at
    /// `lens[b] - 1`). q `[batch][n_q * d]`, out the same. `stream`: the
    /// caller's `CUstream` (0: the legacy default stream); every launch and
    /// copy goes there, nothing waits on the host. `sm_scale` None:
    /// 1/sqrt(head_dim).
    ///
    /// # Safety
    /// All pointers are device pointers of this context, valid and sized
    /// for the shapes given, until the stream has run the launches.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn decode(
        &mut self,
        stream: u64,
        layer: usize,
        kv: &EngineKv,
        req_ids: &[u64],
        table_rows: &[usize],
        lens: &[usize],
        q: &QArg,
        out: &AttnOut,
        sm_scale: Option<f32>,
    ) -> Result<()> {
        let b = req_ids.len();
        self.check_common(layer, kv, q, out, b)?;
        if table_rows.len() != b || lens.len() != b {
            return Err(Error::shape(
                "GPU decode table_rows / lens per request",
                b,
                format!("{} / {}", table_rows.len(), lens.len()),
            ));
        }
        let cap_tokens = kv.table_stride * kv.page_size;
        for (i, &l) in lens.iter().enumerate() {
            if l == 0 || l > cap_tokens {
                return Err(Error::OutOfRange(format!(
                    "GPU decode request {i}: length {l} (must be 1..={cap_tokens}, the table row's capacity)"
                )));
            }
        }
        {
            let mut seen = std::collections::HashSet::new();
            if let Some(d) = req_ids.iter().find(|&&r| !seen.insert(r)) {
                return Err(Error::Invalid(format!(
                    "GPU decode: request id {d} appears twice in one batch"
                )));
            }
        }
        // Engines call from their own threads: make the context current.
        self.gpu
            .ctx
            .bind_to_thread()
            .map_err(|e| gpu_err("bind the CUDA context to this thread", e))?;
        let dkv = self.borrowed_kv(kv, lens.to_vec())?;
        let gpu = self.gpu.on_stream(stream);
        let (shape, mul) = self.scaled_shape(sm_scale)?;
        self.convert_q(&gpu, q, b, mul)?;
        let rows: Vec<i32> = table_rows
            .iter()
            .map(|&r| i32_of("table row", r))
            .collect::<Result<_>>()?;
        let (sel, max_tokens) = if matches!(self.layers[layer], Layer::Locret(_)) {
            grow(&mut self.up, b * 4)?;
            self.up.write_async(&gpu.stream, &rows)?;
            for &id in req_ids {
                self.slot(id);
            }
            let sel = self.locret_decode(&gpu, layer, req_ids, lens)?;
            (sel, *lens.iter().max().unwrap())
        } else if matches!(self.layers[layer], Layer::Squeeze(_) | Layer::Lazy) {
            grow(&mut self.up, b * 4)?;
            self.up.write_async(&gpu.stream, &rows)?;
            let slots: Vec<usize> = req_ids.iter().map(|&id| self.slot(id).0).collect();
            if matches!(self.layers[layer], Layer::Lazy) {
                let n_new = vec![1; b];
                let reqs = lazy_reqs(&slots, table_rows, lens, &n_new);
                let sel = self.lazy_select(
                    &gpu,
                    &shape,
                    layer,
                    kv,
                    req_ids,
                    &reqs,
                    crate::policy::Phase::Decode,
                )?;
                (sel, *lens.iter().max().unwrap())
            } else {
                self.squeeze_select(&gpu, &shape, layer, kv, req_ids, &slots, &rows, lens)?
            }
        } else if matches!(self.layers[layer], Layer::Dense) {
            // kernels/decode_dense.cu: table rows then lengths, one upload.
            let mut host = rows.clone();
            for &l in lens {
                host.push(i32_of("length", l)?);
            }
            grow(&mut self.up, b * 8)?;
            self.up.write_async(&gpu.stream, &host)?;
            let mut ws = std::mem::take(&mut self.dense_ws);
            let r = launch_dense(
                &gpu,
                &mut ws,
                &shape,
                kv.ptrs(),
                dkv.strides(),
                self.qf.ptr,
                b,
                self.up.ptr + (b * 4) as u64,
                self.up.ptr,
                *lens.iter().max().unwrap(),
                None,
                None,
                *out,
            );
            self.dense_ws = ws;
            return r;
        } else {
            let attn = self.hip_attention();
            let sparse = attn == HipAttention::SparseV2;
            let streaming = match &self.layers[layer] {
                Layer::Hip(h) => h.rope.as_ref().is_some_and(|r| r.streaming),
                _ => false,
            };
            rope::check_decode(layer, streaming, attn)?;
            let (sel, bound, ex) =
                self.hip_select(&gpu, layer, &dkv, req_ids, &rows, lens, "hip_mask", sparse)?;
            if streaming {
                return self.streaming_attend(&gpu, &shape, layer, &dkv, b, ex, bound, out);
            }
            if sparse {
                // kernels/decode_dense_v2.cu hip_sparse: the position
                // tables hip_select assembled, the tail from the regions at
                // `ex` ([b][3] int2), table rows at `self.up`.
                let Layer::Hip(h) = &self.layers[layer] else {
                    unreachable!()
                };
                let tab_cap = h.tab_cap();
                let mut ws = std::mem::take(&mut self.sparse_ws);
                let r = launch_v2(
                    &gpu,
                    &mut ws,
                    &shape,
                    kv.ptrs(),
                    dkv.strides(),
                    self.qf.ptr,
                    b,
                    V2Src::Sparse {
                        tab: self.tab.ptr,
                        tab_stride: tab_cap,
                        ntab: self.ntab.ptr,
                        extra: ex,
                        early: false,
                    },
                    self.up.ptr,
                    bound.max(1),
                    None,
                    None,
                    *out,
                );
                self.sparse_ws = ws;
                return r;
            }
            (sel, bound)
        };
        let q_seq = self.up.ptr;
        let mut ws = std::mem::take(&mut self.ws);
        let r = launch_attention_ex(
            &gpu,
            &mut ws,
            &shape,
            "",
            kv.ptrs(),
            dkv.strides(),
            self.qf.ptr,
            b,
            &sel,
            max_tokens,
            None,
            *out,
            1,
            q_seq,
            0,
        );
        self.ws = ws;
        r
    }

    /// Squeeze decode selection: seal the requests that have not sealed yet
    /// (host sync, see `squeeze`), fill every row with the full range, then
    /// the GPU lookup of each sealed request with an index overwrites its
    /// rows.
    #[allow(clippy::too_many_arguments)]
    fn squeeze_select(
        &mut self,
        gpu: &GpuContext,
        shape: &AttnShape,
        layer: usize,
        kv: &EngineKv,
        req_ids: &[u64],
        slots: &[usize],
        rows: &[i32],
        lens: &[usize],
    ) -> Result<(DeviceSelection, usize)> {
        let b = req_ids.len();
        let hkv = self.shape.n_kv_heads;
        let Layer::Squeeze(z) = &mut self.layers[layer] else {
            unreachable!()
        };
        let mut cap = 1;
        for i in 0..b {
            let s = slots[i];
            if z.sealed(s).is_none() {
                let row = kv.table + (rows[i] as usize * kv.table_stride * 4) as u64;
                z.seal(
                    gpu,
                    shape,
                    s,
                    req_ids[i],
                    lens[i],
                    row,
                    (kv.k, kv.dtype, kv.page_size, kv.page_stride, kv.head_stride),
                )?;
            }
            let p = z.sealed(s).expect("sealed").prefix_len;
            if lens[i] <= p {
                return Err(Error::OutOfRange(format!(
                    "squeeze layer {layer} on the GPU: request {} decodes at length {}, not past its sealed prefix of {p}",
                    req_ids[i], lens[i]
                )));
            }
            cap = cap.max(z.cap(s));
        }
        let sel = self.sel_view(b * hkv, cap)?;
        let mut host: Vec<i32> = vec![0; 2 * b];
        host.extend(std::iter::repeat_n(-1, b));
        for &l in lens {
            host.push(i32_of("length", l)?);
        }
        for &s in slots {
            host.push(s as i32);
        }
        grow(&mut self.pol_up, host.len() * 4)?;
        self.pol_up.write_async(&gpu.stream, &host)?;
        let base = self.pol_up.ptr;
        let (pn, pl, ps) = (
            base + (b * 8) as u64,
            base + (b * 12) as u64,
            base + (b * 16) as u64,
        );
        lazy::launch_token_ranges(gpu, hkv, b, base, pn, pl, ps, 0, &sel)?;
        let Layer::Squeeze(z) = &self.layers[layer] else {
            unreachable!()
        };
        let qe = self.shape.q_elems();
        for (i, &s) in slots.iter().enumerate() {
            let q = self.qf.ptr + (i * qe * 4) as u64;
            z.launch_lookup(gpu, shape, s, q, pl + (i * 4) as u64, &sel, i)?;
        }
        Ok((sel, *lens.iter().max().unwrap()))
    }

    /// A selection with rows `[request][kv head]` from the locret layer's
    /// retained sets of `ids` (host-built, one async copy each of ranges and
    /// cum/cnt/tot).
    fn locret_sel(
        &mut self,
        gpu: &GpuContext,
        layer: usize,
        ids: &[u64],
    ) -> Result<DeviceSelection> {
        let Layer::Locret(z) = &self.layers[layer] else {
            unreachable!()
        };
        let mut rows = Vec::with_capacity(ids.len() * self.shape.n_kv_heads);
        for &id in ids {
            let r = z.host.runs(id);
            if r.len() != self.shape.n_kv_heads {
                return Err(Error::Invalid(format!(
                    "locret layer {layer} on the GPU: request {id} has no retained set"
                )));
            }
            rows.extend(r);
        }
        let (ranges, rest, cap) = locret::sel_arrays(&rows);
        let sel = self.sel_view(rows.len(), cap)?;
        sel.ranges.write_async(&gpu.stream, &ranges)?;
        DevBuf::borrowed(sel.cum.ptr, rest.len() * 4).write_async(&gpu.stream, &rest)?;
        Ok(sel)
    }

    /// Locret decode: each request's token joins its retained sets (the
    /// first decode runs the eviction owed for the last prefill), then the
    /// selection of the sets. No host sync.
    fn locret_decode(
        &mut self,
        gpu: &GpuContext,
        layer: usize,
        req_ids: &[u64],
        lens: &[usize],
    ) -> Result<DeviceSelection> {
        let Layer::Locret(z) = &mut self.layers[layer] else {
            unreachable!()
        };
        // Check every request first: an error changes nothing.
        for (&id, &len) in req_ids.iter().zip(lens) {
            let seen = z.host.policy.seen(id);
            if seen != Some(len - 1) {
                return Err(Error::Invalid(format!(
                    "locret layer {layer} on the GPU: request {id} decodes position {} but its locret state covers {} tokens (every earlier position must pass through a prefill or decode call here first)",
                    len - 1,
                    seen.map_or("no".to_string(), |s| s.to_string())
                )));
            }
        }
        for (&id, &len) in req_ids.iter().zip(lens) {
            z.host.insert(
                layer,
                id,
                len - 1,
                1,
                crate::policy::Phase::Decode,
                false,
                &[],
            )?;
        }
        self.locret_sel(gpu, layer, req_ids)
    }

    /// Locret prefill: score the new tokens on the GPU (one host sync),
    /// update the retained sets with the CPU policy's rules, then attention
    /// of each request's queries over its retained set, causally.
    #[allow(clippy::too_many_arguments)]
    fn locret_prefill(
        &mut self,
        gpu: &GpuContext,
        shape: &AttnShape,
        layer: usize,
        kv: &EngineKv,
        dkv: &DeviceKv,
        req_ids: &[u64],
        reqs: &[LazyReq],
        n_new: &[usize],
        out: &AttnOut,
        ins: Option<&Insert<'_>>,
    ) -> Result<()> {
        let b = req_ids.len();
        let proj = ins.and_then(|i| i.proj).ok_or_else(|| {
            Error::Invalid(format!(
                "locret layer {layer} on the GPU: a prefill needs the new tokens' pre-RoPE projections (prefill_ex with Insert::proj)"
            ))
        })?;
        let pd = ins.map_or(&[][..], |i| i.prompt_done);
        if !pd.is_empty() && pd.len() != b {
            return Err(Error::shape(
                "GPU prefill prompt_done per request",
                b,
                pd.len(),
            ));
        }
        {
            let mut seen = std::collections::HashSet::new();
            if let Some(d) = req_ids.iter().find(|&&r| !seen.insert(r)) {
                return Err(Error::Invalid(format!(
                    "locret layer {layer} on the GPU: request id {d} appears twice in one prefill"
                )));
            }
        }
        let total: usize = n_new.iter().sum();
        let nkv = self.shape.n_kv_heads;
        let Layer::Locret(z) = &mut self.layers[layer] else {
            unreachable!()
        };
        for r in reqs.iter().zip(req_ids) {
            z.host.begin_prefill(layer, *r.1, r.0.len - r.0.n)?;
        }
        let scores = z.score(gpu, &proj, total)?;
        if let Some(i) = scores.iter().position(|x| x.is_nan()) {
            let (mut row, mut who) = (i / nkv, 0);
            while row >= n_new[who] {
                row -= n_new[who];
                who += 1;
            }
            return Err(Error::Invalid(format!(
                "locret layer {layer} on the GPU: retaining-head score is NaN for token {} of request {} (non-finite projections?)",
                reqs[who].len - reqs[who].n + row,
                req_ids[who]
            )));
        }
        let mut r0 = 0;
        for (i, r) in reqs.iter().enumerate() {
            let evicted = z.host.insert(
                layer,
                req_ids[i],
                r.len - r.n,
                r.n,
                crate::policy::Phase::Prefill,
                pd.get(i).copied().unwrap_or(false),
                &scores[r0 * nkv..(r0 + r.n) * nkv],
            )?;
            z.stats.evictions += evicted as usize;
            r0 += r.n;
        }
        let sel = self.locret_sel(gpu, layer, req_ids)?;
        self.prefill_per_request(gpu, shape, kv, dkv, reqs, n_new, &sel, out)
    }

    /// Lazy selection of a call (plan on the host, keep sets and rows on
    /// the GPU, see `lazy`).
    #[allow(clippy::too_many_arguments)]
    fn lazy_select(
        &mut self,
        gpu: &GpuContext,
        shape: &AttnShape,
        layer: usize,
        kv: &EngineKv,
        req_ids: &[u64],
        reqs: &[LazyReq],
        phase: crate::policy::Phase,
    ) -> Result<DeviceSelection> {
        let z = self.lazy.as_mut().expect("a lazy layer has lazy state");
        let planned: Vec<lazy::Planned> = reqs
            .iter()
            .zip(req_ids)
            .map(|(r, &id)| z.plan.plan(r.slot, id, layer, r.len, r.n, phase))
            .collect::<Result<_>>()?;
        let cap = LazyGpu::cap_for(&planned);
        let sel = self.sel_view(reqs.len() * self.shape.n_kv_heads, cap)?;
        let qf = self.qf.ptr;
        let z = self.lazy.as_mut().expect("a lazy layer has lazy state");
        z.launch(gpu, shape, kv, reqs, &planned, qf, &sel)?;
        Ok(sel)
    }

    /// Lazy prefill: the step's set per request, every query of the
    /// request attending it clipped causally; one attention launch per
    /// request (its rows share one selection row per KV head).
    #[allow(clippy::too_many_arguments)]
    fn lazy_prefill(
        &mut self,
        gpu: &GpuContext,
        shape: &AttnShape,
        layer: usize,
        kv: &EngineKv,
        dkv: &DeviceKv,
        req_ids: &[u64],
        reqs: &[LazyReq],
        n_new: &[usize],
        out: &AttnOut,
    ) -> Result<()> {
        let sel = self.lazy_select(
            gpu,
            shape,
            layer,
            kv,
            req_ids,
            reqs,
            crate::policy::Phase::Prefill,
        )?;
        self.prefill_per_request(gpu, shape, kv, dkv, reqs, n_new, &sel, out)
    }

    /// Prefill attention with one selection row per KV head per request
    /// (`sel` rows `[request][kv head]`): every query of request i attends
    /// its rows clipped causally; one attention launch per request.
    #[allow(clippy::too_many_arguments)]
    fn prefill_per_request(
        &mut self,
        gpu: &GpuContext,
        shape: &AttnShape,
        kv: &EngineKv,
        dkv: &DeviceKv,
        reqs: &[LazyReq],
        n_new: &[usize],
        sel: &DeviceSelection,
        out: &AttnOut,
    ) -> Result<()> {
        let total: usize = n_new.iter().sum();
        let mut host: Vec<i32> = Vec::with_capacity(2 * total);
        for r in reqs {
            host.extend(std::iter::repeat_n(i32_of("table row", r.row)?, r.n));
        }
        for r in reqs {
            for j in 0..r.n {
                host.push(i32_of("position", r.len - r.n + j)?);
            }
        }
        grow(&mut self.up, host.len() * 4)?;
        self.up.write_async(&gpu.stream, &host)?;
        let hkv = self.shape.n_kv_heads;
        let qe = self.shape.q_elems();
        let esz = if out.dtype == DType::F32 { 4 } else { 2 };
        let mut ws = std::mem::take(&mut self.ws);
        let mut r0 = 0;
        let mut res = Ok(());
        for (i, r) in reqs.iter().enumerate() {
            res = launch_attention_ex(
                gpu,
                &mut ws,
                shape,
                "",
                kv.ptrs(),
                dkv.strides(),
                self.qf.ptr + (r0 * qe * 4) as u64,
                r.n,
                &sel_rows(sel, i * hkv, hkv),
                r.len,
                None,
                AttnOut {
                    ptr: out.ptr + (r0 * out.row_stride * esz) as u64,
                    ..*out
                },
                r.n,
                self.up.ptr + (r0 * 4) as u64,
                self.up.ptr + ((total + r0) * 4) as u64,
            );
            if res.is_err() {
                break;
            }
            r0 += r.n;
        }
        self.ws = ws;
        res
    }

    /// Streaming attention of a RoPE-mode hip layer's decode batch (after
    /// `hip_select` with the sparse tables): the gather writes each row's
    /// selected keys re-rotated to streaming positions and their values
    /// into the layer's compact buffer (`RopeGpu::gather`, table rows at
    /// `self.up`), then the sparse v2 kernel attends it as a one-page
    /// sequence per request (identity tables, no tail).
    #[allow(clippy::too_many_arguments)]
    fn streaming_attend(
        &mut self,
        gpu: &GpuContext,
        shape: &AttnShape,
        layer: usize,
        dkv: &DeviceKv,
        b: usize,
        ex: u64,
        bound: usize,
        out: &AttnOut,
    ) -> Result<()> {
        let hkv = self.shape.n_kv_heads;
        let (tab, ntab, rows) = (self.tab.ptr, self.ntab.ptr, self.up.ptr);
        let Layer::Hip(h) = &self.layers[layer] else {
            unreachable!()
        };
        let tab_cap = h.tab_cap();
        let r = h.rope.as_deref().expect("streaming layer has RoPE state");
        let compact = match &mut self.rope_kv {
            Some(c) => c,
            None => self.rope_kv.insert(CompactKv::new()?),
        };
        let src = r.gather(
            gpu,
            compact,
            dkv,
            b * hkv,
            tab,
            tab_cap,
            ntab,
            ex,
            bound,
            rows,
        )?;
        src.attend(
            gpu,
            &mut self.sparse_ws,
            shape,
            dkv.dtype,
            self.qf.ptr,
            b,
            bound,
            *out,
        )
    }

    /// hip sparse prefill of a hip layer: per request, per chunk of at most
    /// `prefill_chunk` queries, the mask of every query block (`est`) and
    /// block-sparse causal attention into the request's output rows.
    /// Representatives of the fast estimator are recomputed per (request,
    /// layer) call and reused by every query block of the call.
    #[allow(clippy::too_many_arguments)]
    fn hip_prefill(
        &mut self,
        gpu: &GpuContext,
        shape: &AttnShape,
        cfg: &crate::config::HipConfig,
        est: MaskEstimator,
        // The layer's RoPE (theta, max_position) when it has RoPE modes.
        rope_model: Option<(f32, usize)>,
        dkv: &DeviceKv,
        table_rows: &[usize],
        lens: &[usize],
        n_new: &[usize],
        out: &AttnOut,
    ) -> Result<()> {
        // Buffers for the largest chunk of this call (not a whole
        // prefill_chunk for short prompts: a covering budget's stage
        // buffers are large per row).
        let want = n_new
            .iter()
            .max()
            .copied()
            .unwrap_or(1)
            .min(cfg.prefill_chunk.max(cfg.block_size_q))
            .next_multiple_of(cfg.block_size_q);
        let rebuild = match &self.hip_pf {
            Some(p) => p.config() != cfg || p.max_queries() < want,
            None => true,
        };
        if rebuild {
            self.hip_pf = None;
            self.hip_pf = Some(Box::new(HipGpuPrefill::new(
                cfg.clone(),
                &self.shape,
                want,
            )?));
        }
        let pf = self.hip_pf.as_mut().unwrap();
        if let Some((theta, max_position)) = rope_model {
            if pf.rope_model() != Some((theta, max_position)) {
                pf.set_rope(self.shape.head_dim, theta, max_position)?;
            }
            // The stored keys' layout (llama.cpp's NORM on its CUDA route).
            if pf.rope_layout() != self.rope_layout {
                pf.set_rope_layout(self.rope_layout)?;
            }
        }
        pf.estimator = est;
        let qe = self.shape.q_elems();
        let esz = if out.dtype == DType::F32 { 4 } else { 2 };
        let qf = self.qf.ptr;
        let mut r0 = 0;
        for i in 0..lens.len() {
            let ni = n_new[i];
            if ni > 0 {
                pf.set_sequence(gpu, i, table_rows[i])?;
            }
            let mut j = 0;
            while j < ni {
                // Chunks of prefill_chunk queries, as the CPU policy.
                let n = (ni - j).min(cfg.prefill_chunk.max(cfg.block_size_q));
                pf.prepare(gpu, dkv, lens[i] - ni + j, n)?;
                let qp = qf + ((r0 + j) * qe * 4) as u64;
                pf.select(gpu, dkv, qp)?;
                let o = AttnOut {
                    ptr: out.ptr + ((r0 + j) * out.row_stride * esz) as u64,
                    ..*out
                };
                pf.attend_out(gpu, shape, dkv, qp, o)?;
                j += n;
            }
            r0 += ni;
        }
        Ok(())
    }

    /// hip mask estimation of every request of the batch into the
    /// selection; returns it and the host bound on selected tokens. Leaves
    /// the table rows at `self.up` (first `b` i32).
    #[allow(clippy::too_many_arguments)]
    fn hip_select(
        &mut self,
        gpu: &GpuContext,
        layer: usize,
        dkv: &DeviceKv,
        req_ids: &[u64],
        rows: &[i32],
        lens: &[usize],
        // "hip_mask", or "hip_mask_host" (keys through the estimation row
        // cache of `dkv`, see `host_tier`)
        module: &'static str,
        // Also assemble the sparse v2 position tables (`self.tab`,
        // `self.ntab`, rows `b * hkv` of the layer's `tab_cap`).
        sparse: bool,
    ) -> Result<(DeviceSelection, usize, u64)> {
        let b = req_ids.len();
        let hkv = self.shape.n_kv_heads;
        let g = self.shape.group();
        let d = self.shape.head_dim;
        let slots: Vec<(usize, bool)> = req_ids.iter().map(|&id| self.slot(id)).collect();
        let n_slots = self.n_slots;
        let Layer::Hip(h) = &mut self.layers[layer] else {
            unreachable!()
        };
        h.ensure_slots(n_slots, hkv)?;
        for &(s, fresh) in &slots {
            if fresh {
                h.step[s] = 0;
            }
        }
        let cfg = &h.cfg;
        let n = cfg.stages.len();
        let last_cap = *h.caps.last().unwrap();
        let last_keep = last_cap * cfg.stages.last().unwrap().chunk_size;
        // Host upload: [rows b], per request [mids hkv x 2] (4-int
        // aligned), then [extra 6] per request, contiguous (the sparse v2
        // attention reads them as [b][3] int2).
        let per = (hkv * 2).next_multiple_of(4);
        let head = b.next_multiple_of(4);
        let ex0 = head + b * per;
        let mut host = vec![0i32; ex0 + b * 6];
        host[..b].copy_from_slice(rows);
        let mut froms = Vec::with_capacity(b);
        let mut e0s = Vec::with_capacity(b);
        let mut bound = 1usize;
        let mut slots_need = 0usize;
        for (i, (&(s, _), &len)) in slots.iter().zip(lens).enumerate() {
            let from = h.refresh_from(s);
            let (sink, mid, win) = regions(cfg, len - 1);
            if from == 0 {
                h.mid_end[s] = mid.end;
            }
            let slid = h.mid_end[s].max(mid.start)..mid.end;
            bound = bound.max(sink.len() + slid.len() + win.len() + last_keep.min(mid.len()));
            let o = head + i * per;
            for hh in 0..hkv {
                host[o + 2 * hh] = mid.start as i32;
                host[o + 2 * hh + 1] = mid.end as i32;
            }
            let x = ex0 + 6 * i;
            for (j, r) in [sink, slid, win].into_iter().enumerate() {
                host[x + 2 * j] = r.start as i32;
                host[x + 2 * j + 1] = r.end as i32;
            }
            let e0 = mid.len().div_ceil(cfg.stages[0].chunk_size).max(1);
            let mut need = e0;
            for st in 1..n {
                let e = cfg.stages[st - 1]
                    .chunk_size
                    .div_ceil(cfg.stages[st].chunk_size);
                need = need.max(h.caps[st - 1] * e);
            }
            slots_need = slots_need.max(hkv * need);
            froms.push(from);
            e0s.push(e0);
        }
        grow(&mut self.up, host.len() * 4)?;
        self.up.write_async(&gpu.stream, &host)?;
        if slots_need > self.keys_cap {
            self.keys = DevBuf::alloc(slots_need * 4)?;
            self.keys_cap = slots_need;
        }
        let tab_cap = h.tab_cap();
        if sparse {
            grow(&mut self.tab, b * hkv * tab_cap * 4)?;
            grow(&mut self.ntab, b * hkv * 4)?;
        }
        let (tab0, ntab0) = (self.tab.ptr, self.ntab.ptr);
        // sel_view borrows self mutably: compute it before the loop.
        let sel = {
            let rows_n = b * hkv;
            let cap = last_cap + 3;
            grow(&mut self.sel_ranges, rows_n * cap * 8)?;
            grow(&mut self.sel_cum, rows_n * cap * 4 + rows_n * 8)?;
            let cum = self.sel_cum.ptr;
            DeviceSelection {
                ranges: DevBuf::borrowed(self.sel_ranges.ptr, rows_n * cap * 8),
                cum: DevBuf::borrowed(cum, rows_n * cap * 4),
                cnt: DevBuf::borrowed(cum + (rows_n * cap * 4) as u64, rows_n * 4),
                tot: DevBuf::borrowed(cum + (rows_n * cap * 4 + rows_n * 4) as u64, rows_n * 4),
                cap,
                rows: rows_n,
                max_tokens: 0,
            }
        };
        let Layer::Hip(h) = &mut self.layers[layer] else {
            unreachable!()
        };
        // RoPE modes: this call's query shifts and key factors, once for
        // the batch (`rope`).
        let rotated = match h.rope.as_deref_mut() {
            Some(r) => {
                r.reserve(b)?;
                if r.scores_rotated() && module != "hip_mask" {
                    return Err(rope::host_tier_refused(layer));
                }
                r.upload_step(gpu, &h.cfg, lens)?;
                r.scores_rotated()
            }
            None => false,
        };
        let up = self.up.ptr;
        let qf = self.qf.ptr;
        for (i, &(s, _)) in slots.iter().enumerate() {
            let stages: Vec<StageBuf> = (0..n).map(|st| h.stage_view(s, st, hkv)).collect();
            let o = (head + i * per) as u64 * 4;
            if froms[i] < n {
                let x = StageInputs {
                    rows: hkv,
                    row_seq: up + (i * 4) as u64,
                    q: qf + (i * hkv * g * d * 4) as u64,
                    nq: self.nq.ptr,
                    nq_max: g,
                    nq_tpl: g.min(8),
                    stage0_in: up + o,
                    stage0_cnt: self.ones.ptr,
                    e0: e0s[i],
                    keys: self.keys.ptr,
                    module,
                    gate: 0,
                    topk_mc: None,
                    mean0: None,
                    assemble: None,
                };
                match h.rope.as_deref() {
                    Some(r) if rotated => {
                        let one = Seqs {
                            batch: b,
                            first: i,
                            count: 1,
                        };
                        r.run_stages(gpu, dkv, &h.cfg, &stages, froms[i], n, &x, one)?
                    }
                    _ => {
                        run_stages(gpu, dkv, &h.cfg, &stages, froms[i], &x)?;
                    }
                }
            }
            let tab = sparse.then(|| TabOut {
                tab: tab0 + (i * hkv * tab_cap * 4) as u64,
                cap: tab_cap,
                ntab: ntab0 + (i * hkv * 4) as u64,
                gate: 0,
                n_stages: n,
                tab_sink: 0,
            });
            assemble_rows(
                gpu,
                stages.last().unwrap(),
                up + ((ex0 + 6 * i) * 4) as u64,
                hkv,
                hkv,
                &sel,
                i * hkv,
                tab,
            )?;
            h.step[s] += 1;
        }
        self.sel_rows = b * hkv;
        self.sel_cap = last_cap + 3;
        Ok((sel, bound, up + (ex0 * 4) as u64))
    }

    /// Dense causal attention of new tokens (chunked prefill / extend):
    /// request b has `n_new[b]` query rows (consecutive in q and out, in
    /// request order) at positions `lens[b] - n_new[b] .. lens[b]`, its K/V
    /// already written to the engine's cache. Resets the hip state of the
    /// requests (their next decode refreshes every stage).
    ///
    /// # Safety
    /// As `decode`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn prefill(
        &mut self,
        stream: u64,
        layer: usize,
        kv: &EngineKv,
        req_ids: &[u64],
        table_rows: &[usize],
        lens: &[usize],
        n_new: &[usize],
        q: &QArg,
        out: &AttnOut,
        sm_scale: Option<f32>,
    ) -> Result<()> {
        self.prefill_ex(
            stream, layer, kv, req_ids, table_rows, lens, n_new, q, out, sm_scale, None,
        )
    }

    /// `prefill` with what policies that score at insertion need (`ins`):
    /// a locret layer requires `ins.proj` (the new tokens' pre-RoPE
    /// projections, rows as q) and reads `ins.prompt_done`; other layers
    /// ignore `ins`.
    ///
    /// # Safety
    /// As `decode`; the projection pointers as q.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn prefill_ex(
        &mut self,
        stream: u64,
        layer: usize,
        kv: &EngineKv,
        req_ids: &[u64],
        table_rows: &[usize],
        lens: &[usize],
        n_new: &[usize],
        q: &QArg,
        out: &AttnOut,
        sm_scale: Option<f32>,
        ins: Option<&Insert<'_>>,
    ) -> Result<()> {
        let b = req_ids.len();
        if table_rows.len() != b || lens.len() != b || n_new.len() != b {
            return Err(Error::shape(
                "GPU prefill table_rows / lens / n_new per request",
                b,
                format!("{} / {} / {}", table_rows.len(), lens.len(), n_new.len()),
            ));
        }
        let total: usize = n_new.iter().sum();
        self.check_common(layer, kv, q, out, total)?;
        if matches!(self.layers[layer], Layer::Locret(_)) && ins.and_then(|i| i.proj).is_none() {
            return Err(Error::Invalid(format!(
                "locret layer {layer} on the GPU: a prefill needs the new tokens' pre-RoPE projections (prefill_ex with Insert::proj)"
            )));
        }
        let cap_tokens = kv.table_stride * kv.page_size;
        for i in 0..b {
            if n_new[i] > lens[i] || lens[i] > cap_tokens {
                return Err(Error::OutOfRange(format!(
                    "GPU prefill request {i}: {} new of {} tokens (table row holds {cap_tokens})",
                    n_new[i], lens[i]
                )));
            }
        }
        // RoPE-mode hip layers prefill densely within the trained length
        // and sparsely with their modes past it (`rope::prefill_mode`);
        // decided before anything is launched.
        let (rope_dense, rope_model) = match &self.layers[layer] {
            Layer::Hip(h) => match h.rope.as_deref() {
                Some(r) => {
                    let m = rope::prefill_mode(
                        layer,
                        lens,
                        n_new,
                        r.max_position(),
                        self.prefill_estimator.is_some(),
                        self.rope_prefill_sparse,
                    )?;
                    (
                        m == rope::RopePrefill::Dense,
                        Some((r.theta(), r.max_position())),
                    )
                }
                None => (false, None),
            },
            _ => (false, None),
        };
        let slots: Vec<usize> = req_ids
            .iter()
            .map(|&id| {
                let (s, fresh) = self.slot(id);
                if !fresh {
                    self.prefill_reset_slot(s);
                }
                s
            })
            .collect();
        // Engines call from their own threads: make the context current.
        self.gpu
            .ctx
            .bind_to_thread()
            .map_err(|e| gpu_err("bind the CUDA context to this thread", e))?;
        let dkv = self.borrowed_kv(kv, lens.to_vec())?;
        let gpu = self.gpu.on_stream(stream);
        let (shape, mul) = self.scaled_shape(sm_scale)?;
        self.convert_q(&gpu, q, total, mul)?;
        // The rows' next graph decode starts their hip state afresh.
        self.reset_graph_rows(&gpu, table_rows)?;
        if matches!(self.layers[layer], Layer::Locret(_)) {
            let reqs = lazy_reqs(&slots, table_rows, lens, n_new);
            return self.locret_prefill(
                &gpu, &shape, layer, kv, &dkv, req_ids, &reqs, n_new, out, ins,
            );
        }
        if matches!(self.layers[layer], Layer::Lazy) {
            let reqs = lazy_reqs(&slots, table_rows, lens, n_new);
            return self.lazy_prefill(&gpu, &shape, layer, kv, &dkv, req_ids, &reqs, n_new, out);
        }
        if let Layer::Squeeze(z) = &mut self.layers[layer] {
            let qe = self.shape.q_elems();
            let mut row = 0;
            for (i, &s) in slots.iter().enumerate() {
                let q0 = self.qf.ptr + (row * qe * 4) as u64;
                z.record(&gpu.stream, s, qe, q0, lens[i], n_new[i])?;
                row += n_new[i];
            }
        }
        if let (Layer::Hip(h), Some(est), false) =
            (&self.layers[layer], self.prefill_estimator, rope_dense)
        {
            let cfg = h.cfg.clone();
            return self.hip_prefill(
                &gpu, &shape, &cfg, est, rope_model, &dkv, table_rows, lens, n_new, out,
            );
        }
        let hkv = self.shape.n_kv_heads;
        let nr = total * hkv;
        let sel = self.sel_view(nr, 1)?;
        let mut ranges = Vec::with_capacity(nr * 2);
        let mut tail = vec![0i32; nr];
        tail.extend(std::iter::repeat_n(1, nr));
        let mut q_seq = Vec::with_capacity(total);
        for i in 0..b {
            let row = i32_of("table row", table_rows[i])?;
            for j in 0..n_new[i] {
                let end = (lens[i] - n_new[i] + j + 1) as i32;
                q_seq.push(row);
                for _ in 0..hkv {
                    ranges.extend_from_slice(&[0, end]);
                    tail.push(end);
                }
            }
        }
        sel.ranges.write_async(&gpu.stream, &ranges)?;
        DevBuf::borrowed(sel.cum.ptr, tail.len() * 4).write_async(&gpu.stream, &tail)?;
        grow(&mut self.up, total * 4)?;
        self.up.write_async(&gpu.stream, &q_seq)?;
        let max_tokens = *lens.iter().max().unwrap();
        let mut ws = std::mem::take(&mut self.ws);
        let r = super::dispatch::launch_prefill_rows(
            &gpu,
            &mut ws,
            &shape,
            "",
            kv.ptrs(),
            dkv.strides(),
            self.qf.ptr,
            total,
            &sel,
            max_tokens,
            None,
            *out,
            1,
            self.up.ptr,
            0,
        );
        self.ws = ws;
        r
    }
}
