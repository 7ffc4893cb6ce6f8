//! The graph-capturable decode of `GpuAttention` (dense and hip layers):
//! what SGLang's decode CUDA graph records. Every launch reads the batch's
//! table rows and lengths from the engine's own device tensors (SGLang's
//! `req_pool_indices` / `seq_lens`, i32 or i64) and computes the step's
//! metadata on the device (`kernels/graph_step.cu`); every buffer is
//! allocated once by `prepare_graph` for the largest batch, so a step
//! allocates nothing, uploads nothing and never waits on the host, and a
//! captured step replays with whatever the engine wrote into those tensors.
//!
//! hip state is kept per TABLE ROW (one request per row at a time, as
//! SGLang's `req_to_token`), not per request id as the host-metadata
//! `decode`: a row's first decode after a prefill of it (`reset_graph_rows`)
//! or after its request changed (its length is not the previous one + 1, or
//! its first page differs) refreshes every stage; later steps follow the
//! request's own schedule, as the host path does. Stages run for the whole
//! batch from the earliest stage any request refreshes (one device gate),
//! then the requests that refresh later get their stored stage output back
//! before the next stage reads it, so each request's selection is the one
//! the host path makes. The attention launch is sized for a fixed bound
//! (sink + window + last stage's keep + 4 stage-0 intervals of slid tokens;
//! a request past it refreshes fully), so outputs equal the host path's up
//! to the split-K summation order.
//!
//! Padding positions (SGLang pads a batch to the captured size with row 0,
//! length 1) are computed and never write state (only a row's first
//! position does). Rows and lengths are clamped into the prepared table on
//! the device (an engine bug cannot write outside the state).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::super::dense_decode::{
    launch_dense, launch_v2, sparse_split, split_tokens, DenseDecodeWs, V2Src,
};
use super::super::dispatch::{
    assemble_rows, launch_attention_ex, run_stages, AttnOut, DecodeWorkspace, DeviceSelection,
    HipAttention, StageBuf, StageInputs, TabOut, TopkMc,
};
use super::super::{gpu_err, DevBuf, GpuContext};
use super::{dtype_code, i32_of, EngineKv, GpuAttention, Layer, QArg};
use crate::config::HipConfig;
use crate::error::{Error, Result};

/// A device index array of the engine (`[batch]` i32 or i64).
#[derive(Clone, Copy, Debug)]
pub struct DevIndex {
    pub ptr: u64,
    /// 4 (int32) or 8 (int64).
    pub elem_bytes: usize,
}

/// Most positions one graph step handles (one `gs_meta` CTA).
pub const MAX_GRAPH_BATCH: usize = 1024;

/// Per hip layer: the per-row store (`[n_rows][hkv][cap]` ranges and
/// `[n_rows][hkv]` counts per stage).
struct RowStore {
    stages: Vec<(DevBuf, DevBuf)>,
    /// i64 `[stage][5]`: {row out, row count, scratch out, scratch count,
    /// cap} per stage, for the one-launch store (`gs_store_stages`).
    desc: DevBuf,
    /// i32 refresh interval per stage.
    intervals: DevBuf,
    /// Index of this layer's block in `GraphState::row_state`.
    block: usize,
}

pub(super) struct GraphState {
    max_bs: usize,
    n_rows: usize,
    table_stride: usize,
    page_size: usize,
    cap_tokens: usize,
    rows: DevBuf,
    lens: DevBuf,
    pos_from: DevBuf,
    owner: DevBuf,
    gate: DevBuf,
    stage0_in: DevBuf,
    ones: DevBuf,
    /// i32 `[max_bs]`: scoring queries per position (the GQA group).
    nq: DevBuf,
    extra: DevBuf,
    qf: DevBuf,
    keys: DevBuf,
    /// Positional stage outputs, per stage index (sized for the largest cap).
    scratch: Vec<(DevBuf, DevBuf)>,
    sel_ranges: DevBuf,
    sel_cum: DevBuf,
    sel_cap: usize,
    ws: DecodeWorkspace,
    dense_ws: DenseDecodeWs,
    /// Sparse v2 attention of hip layers: position tables i32
    /// `[max_bs * hkv][tab_cap]` (the largest hip layer's), their counts
    /// `[max_bs * hkv]`, and the split scratch (sized for every batch).
    tab: DevBuf,
    ntab: DevBuf,
    tab_cap: usize,
    sparse_ws: DenseDecodeWs,
    /// i32 `[hip layers][n_rows][4]` (see kernels/graph_step.cu).
    row_state: DevBuf,
    n_hip: usize,
    store: Vec<Option<RowStore>>,
    /// Scratch of the multi-CTA top-k (long stage-0 rows, as the host
    /// path's `HipGpuDecoder`), shared by the hip layers like `keys`.
    topk_mc: Option<TopkMc>,
    reset_up: DevBuf,
    bytes: usize,
}

/// The selected-token bound of a hip layer's graph step.
fn hip_bound(cfg: &HipConfig, caps: &[usize], cap_tokens: usize) -> usize {
    let last_keep = caps.last().unwrap() * cfg.stages.last().unwrap().chunk_size;
    (cfg.sink + cfg.window + last_keep + slid_cap(cfg)).min(cap_tokens)
}

fn slid_cap(cfg: &HipConfig) -> usize {
    4 * cfg.stages[0].refresh_interval.max(1)
}

/// Split of the sparse v2 hip attention launch (fixed per batch size:
/// about one wave of 3 CTAs per SM, the kernel's occupancy at one chunk per
/// iteration; `u` chunks per iteration).
fn sparse_attn_split(sm: usize, bs: usize, hkv: usize, max_tokens: usize, u: usize) -> usize {
    sparse_split(3 * sm, bs * hkv, max_tokens, u)
}

/// Split of the split-K hip attention launch (fixed per batch size).
fn attn_split(sm: usize, bs: usize, hkv: usize, max_tokens: usize) -> usize {
    let want = (4 * sm).div_ceil(bs * hkv).max(1);
    max_tokens.div_ceil(want).next_multiple_of(128).max(128)
}

fn alloc(bytes: usize, total: &mut usize) -> Result<DevBuf> {
    *total += bytes;
    DevBuf::alloc(bytes)
}

impl GpuAttention {
    /// Allocate everything the graph decode of batches up to `max_bs` over
    /// a table of `n_rows` rows of `table_stride` pages of `page_size`
    /// tokens needs (synchronous; call before any capture). A second call
    /// with sizes that fit keeps the buffers (captured graphs point at
    /// them); one that does not fit is an error. Only dense and hip layers
    /// can be captured: other methods are refused here.
    pub fn prepare_graph(
        &mut self,
        max_bs: usize,
        n_rows: usize,
        table_stride: usize,
        page_size: usize,
    ) -> Result<()> {
        if let Some(g) = &self.graph {
            if max_bs <= g.max_bs
                && n_rows <= g.n_rows
                && table_stride == g.table_stride
                && page_size == g.page_size
            {
                return Ok(());
            }
            return Err(Error::Invalid(format!(
                "GPU graph decode already prepared for batch {} over {} rows x {} pages of {}; \
                 asked for batch {max_bs} over {n_rows} x {table_stride} x {page_size} \
                 (captured graphs use the first buffers: create a new attention object)",
                g.max_bs, g.n_rows, g.table_stride, g.page_size
            )));
        }
        if max_bs == 0 || max_bs > MAX_GRAPH_BATCH {
            return Err(Error::Invalid(format!(
                "GPU graph decode: batch {max_bs} outside 1..={MAX_GRAPH_BATCH}"
            )));
        }
        if n_rows == 0 || table_stride == 0 || page_size == 0 {
            return Err(Error::Invalid(format!(
                "GPU graph decode: table of {n_rows} rows x {table_stride} pages of {page_size}"
            )));
        }
        let rope_layers: Vec<usize> = (0..self.layers.len())
            .filter(|&l| matches!(&self.layers[l], Layer::Hip(h) if h.rope.is_some()))
            .collect();
        super::rope::check_graph(&rope_layers)?;
        for (l, layer) in self.layers.iter().enumerate() {
            if !matches!(layer, Layer::Dense | Layer::Hip(_)) {
                return Err(Error::Invalid(format!(
                    "GPU graph decode: layer {l} is {}; only dense and hip layers can be captured \
                     (run this config without CUDA graphs)",
                    self.layer_method(l).unwrap_or("?")
                )));
            }
        }
        self.gpu
            .ctx
            .bind_to_thread()
            .map_err(|e| gpu_err("bind the CUDA context to this thread", e))?;
        let cap_tokens = table_stride * page_size;
        i32_of("table capacity", cap_tokens)?;
        i32_of("table rows", n_rows)?;
        let (hkv, hq, d) = (
            self.shape.n_kv_heads,
            self.shape.n_q_heads,
            self.shape.head_dim,
        );
        let sm = self.gpu.sm_count;
        let mut total = 0usize;
        let mut scratch_caps: Vec<usize> = Vec::new();
        let mut keys_slots = 1usize;
        let mut k_max = 1usize;
        let mut sel_cap = 1usize;
        let mut attn_rows = 1usize;
        let mut tab_cap = 1usize;
        let mut sparse_rows = 1usize;
        let u_sp = super::super::kernels::dense_chunks(d)[0];
        let mut n_hip = 0usize;
        let mut store = Vec::new();
        for layer in &self.layers {
            let Layer::Hip(h) = layer else {
                store.push(None);
                continue;
            };
            let st = &h.cfg.stages;
            let mut need = cap_tokens.div_ceil(st[0].chunk_size).max(1);
            for s in 1..st.len() {
                need = need.max(h.caps[s - 1] * st[s - 1].chunk_size.div_ceil(st[s].chunk_size));
            }
            keys_slots = keys_slots.max(need);
            k_max = k_max.max(h.caps.iter().copied().max().unwrap_or(1));
            for (s, &cap) in h.caps.iter().enumerate() {
                if scratch_caps.len() <= s {
                    scratch_caps.push(0);
                }
                scratch_caps[s] = scratch_caps[s].max(cap);
            }
            sel_cap = sel_cap.max(h.caps.last().unwrap() + 3);
            let bound = hip_bound(&h.cfg, &h.caps, cap_tokens);
            tab_cap = tab_cap.max(h.tab_cap());
            for bs in 1..=max_bs {
                let sp = attn_split(sm, bs, hkv, bound);
                attn_rows = attn_rows.max(bs * hq * bound.div_ceil(sp).max(1));
                let sp = sparse_attn_split(sm, bs, hkv, bound, u_sp);
                sparse_rows = sparse_rows.max(bs * hq * bound.div_ceil(sp).max(1));
            }
            let mut stages = Vec::new();
            for &cap in &h.caps {
                let out = alloc(n_rows * hkv * cap * 8, &mut total)?;
                let cnt = alloc(n_rows * hkv * 4, &mut total)?;
                cnt.fill_bytes(0)?;
                stages.push((out, cnt));
            }
            let iv: Vec<i32> = st
                .iter()
                .map(|s| s.refresh_interval.max(1) as i32)
                .collect();
            store.push(Some(RowStore {
                stages,
                desc: DevBuf::null(), // filled once the scratch exists
                intervals: DevBuf::from_slice(&iv)?,
                block: n_hip,
            }));
            n_hip += 1;
        }
        let mut scratch = Vec::new();
        for &cap in &scratch_caps {
            let out = alloc(max_bs * hkv * cap * 8, &mut total)?;
            let cnt = alloc(max_bs * hkv * 4, &mut total)?;
            cnt.fill_bytes(0)?;
            scratch.push((out, cnt));
        }
        for (layer, st) in self.layers.iter().zip(store.iter_mut()) {
            let (Layer::Hip(h), Some(st)) = (layer, st.as_mut()) else {
                continue;
            };
            let desc: Vec<i64> = (0..h.caps.len())
                .flat_map(|s| {
                    [
                        st.stages[s].0.ptr as i64,
                        st.stages[s].1.ptr as i64,
                        scratch[s].0.ptr as i64,
                        scratch[s].1.ptr as i64,
                        h.caps[s] as i64,
                    ]
                })
                .collect();
            st.desc = DevBuf::from_slice(&desc)?;
        }
        let row_state = alloc(n_hip.max(1) * n_rows * 16, &mut total)?;
        row_state.fill_bytes(0xff)?; // last length -1: every row starts fresh
        let rows_n = max_bs * hkv;
        let mut ws = DecodeWorkspace::new();
        ws.ensure(attn_rows, d)?;
        let mut dense_ws = DenseDecodeWs::new();
        let u = super::super::kernels::dense_chunks(d)[0];
        let mut dense_rows = 1;
        for bs in 1..=max_bs {
            let sp = dense_split(sm, bs, hkv, cap_tokens, u);
            dense_rows = dense_rows.max(bs * hq * cap_tokens.div_ceil(sp).max(1));
        }
        dense_ws.ensure(dense_rows, rows_n, d)?;
        if n_hip > 0 {
            // hip_sparse is a lazily loaded module: load it here, outside
            // any capture (a step's first use would otherwise load it in
            // the captured region). An entry point not built for this shape
            // is reported by the launch, not here.
            for dt in ["bf16", "f16"] {
                let name = format!("hip_sparse_{dt}_d{d}_g{}_u{u_sp}", self.shape.group());
                let _ = self.gpu.func("hip_sparse", &name);
            }
        }
        let mut sparse_ws = DenseDecodeWs::new();
        sparse_ws.ensure(sparse_rows, rows_n, d)?;
        let topk_mc = if n_hip > 0 {
            let m = TopkMc::new(rows_n, keys_slots, k_max)?;
            total += (rows_n * (1 + m.ptrs.segs_cap) + rows_n * m.ptrs.pairs_per_row * 2) * 4;
            Some(m)
        } else {
            None
        };
        total += (attn_rows + dense_rows + sparse_rows) * (d + 2) * 4;
        let g = GraphState {
            max_bs,
            n_rows,
            table_stride,
            page_size,
            cap_tokens,
            rows: alloc(max_bs * 4, &mut total)?,
            lens: alloc(max_bs * 4, &mut total)?,
            pos_from: alloc(max_bs * 4, &mut total)?,
            owner: alloc(max_bs * 4, &mut total)?,
            gate: alloc(8, &mut total)?,
            stage0_in: alloc(rows_n * 8, &mut total)?,
            ones: DevBuf::from_slice(&vec![1i32; rows_n])?,
            nq: DevBuf::from_slice(&vec![self.shape.group() as i32; max_bs])?,
            extra: alloc(max_bs * 3 * 8, &mut total)?,
            qf: alloc(max_bs * hq * d * 4, &mut total)?,
            keys: alloc(rows_n * keys_slots * 4, &mut total)?,
            scratch,
            sel_ranges: alloc(rows_n * sel_cap * 8, &mut total)?,
            sel_cum: alloc(rows_n * sel_cap * 4 + rows_n * 8, &mut total)?,
            sel_cap,
            ws,
            dense_ws,
            tab: alloc(rows_n * tab_cap * 4, &mut total)?,
            ntab: alloc(rows_n * 4, &mut total)?,
            tab_cap,
            sparse_ws,
            row_state,
            n_hip,
            store,
            topk_mc,
            reset_up: DevBuf::null(),
            bytes: 0,
        };
        tracing::info!(
            max_bs,
            n_rows,
            cap_tokens,
            mib = total as f64 / (1 << 20) as f64,
            "GPU graph decode prepared"
        );
        self.graph = Some(Box::new(GraphState { bytes: total, ..g }));
        Ok(())
    }

    /// (largest batch, table rows, device bytes) of the prepared graph
    /// decode, if any.
    pub fn graph_prepared(&self) -> Option<(usize, usize, usize)> {
        self.graph.as_ref().map(|g| (g.max_bs, g.n_rows, g.bytes))
    }

    /// After a prefill of `table_rows`: their next graph decode refreshes
    /// every stage (one small upload and launch on `gpu`'s stream; not
    /// part of a captured step). Public for benchmarks that replay decode
    /// steps without a prefill.
    pub fn reset_graph_rows(&mut self, gpu: &GpuContext, table_rows: &[usize]) -> Result<()> {
        let Some(g) = self.graph.as_mut() else {
            return Ok(());
        };
        if g.n_hip == 0 || table_rows.is_empty() {
            return Ok(());
        }
        let rows: Vec<i32> = table_rows
            .iter()
            .filter(|&&r| r < g.n_rows)
            .map(|&r| r as i32)
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        if g.reset_up.bytes < rows.len() * 4 {
            g.reset_up = DevBuf::alloc((rows.len() * 4).next_power_of_two())?;
        }
        g.reset_up.write_async(&gpu.stream, &rows)?;
        let f = gpu.func("graph_step", "gs_reset_rows")?;
        let (n, ls, nl) = (rows.len() as i32, (g.n_rows * 4) as i64, g.n_hip as i32);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(&g.reset_up.ptr)
            .arg(&n)
            .arg(&g.row_state.ptr)
            .arg(&ls)
            .arg(&nl);
        let total = rows.len() * g.n_hip;
        // SAFETY: gs_reset_rows(rows, n, row_state, layer_stride, n_layers) of kernels/graph_step.cu;
        // reset_up holds n i32 rows < n_rows, row_state n_hip blocks of n_rows x 4 i32.
        unsafe {
            l.launch(LaunchConfig {
                grid_dim: (total.div_ceil(128) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(|e| gpu_err("launch gs_reset_rows", e))?;
        Ok(())
    }

    /// Every row's graph state back to fresh (synchronous).
    pub(super) fn reset_graph(&mut self) -> Result<()> {
        if let Some(g) = &self.graph {
            g.row_state.fill_bytes(0xff)?;
        }
        Ok(())
    }

    /// Decode `bs` queries (one per request) with device metadata:
    /// position b is table row `rows[b]` at length `lens[b]` (including
    /// its new token), both read on the device when the launches run (a
    /// captured call replays with the tensors' contents at replay time).
    /// q/out `[bs][n_q * d]` as `decode`. Launches only (after
    /// `prepare_graph`): capturable into a CUDA graph on `stream`.
    ///
    /// # Safety
    /// As `decode`; `rows` and `lens` hold `bs` elements on the device;
    /// `kv.table` has the prepared shape (at least the prepared rows).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn decode_graph(
        &mut self,
        stream: u64,
        layer: usize,
        kv: &EngineKv,
        bs: usize,
        rows: DevIndex,
        lens: DevIndex,
        q: &QArg,
        out: &AttnOut,
        sm_scale: Option<f32>,
    ) -> Result<()> {
        self.check_common(layer, kv, q, out, bs)?;
        let Some(g) = self.graph.as_ref() else {
            return Err(Error::Invalid(
                "GPU graph decode: call prepare_graph first".into(),
            ));
        };
        if bs > g.max_bs {
            return Err(Error::Invalid(format!(
                "GPU graph decode: batch {bs} over the prepared {}",
                g.max_bs
            )));
        }
        if kv.table_stride != g.table_stride || kv.page_size != g.page_size {
            return Err(Error::Invalid(format!(
                "GPU graph decode: table of {} pages of {} per row, prepared for {} of {}",
                kv.table_stride, kv.page_size, g.table_stride, g.page_size
            )));
        }
        for (name, x) in [("rows", rows), ("lens", lens)] {
            if x.ptr == 0 || !(x.elem_bytes == 4 || x.elem_bytes == 8) {
                return Err(Error::Invalid(format!(
                    "GPU graph decode: {name} must be a device int32/int64 array (got {:#x}, {} bytes)",
                    x.ptr, x.elem_bytes
                )));
            }
        }
        self.gpu
            .ctx
            .bind_to_thread()
            .map_err(|e| gpu_err("bind the CUDA context to this thread", e))?;
        let gpu = self.gpu.on_stream(stream);
        let (shape, mul) = self.scaled_shape(sm_scale)?;
        let dkv = self.borrowed_kv(kv, vec![g.cap_tokens; bs])?;
        let hqd = self.shape.n_q_heads * self.shape.head_dim;
        let hip = match &self.layers[layer] {
            Layer::Dense => None,
            Layer::Hip(h) => Some(h),
            _ => {
                return Err(Error::Invalid(format!(
                    "GPU graph decode: layer {layer} is {}, not capturable",
                    self.layer_method(layer).unwrap_or("?")
                )))
            }
        };
        let g = self.graph.as_mut().unwrap();
        let hkv = self.shape.n_kv_heads;
        launch_meta(
            &gpu,
            g,
            kv,
            bs,
            rows,
            lens,
            hip.map(|h| (&h.cfg, hkv)),
            layer,
            QConvert { q: *q, hqd, mul },
        )?;
        let Some(h) = hip else {
            let u = super::super::kernels::dense_chunks(self.shape.head_dim)[0];
            let sp = dense_split(gpu.sm_count, bs, hkv, g.cap_tokens, u);
            return launch_dense(
                &gpu,
                &mut g.dense_ws,
                &shape,
                kv.ptrs(),
                dkv.strides(),
                g.qf.ptr,
                bs,
                g.lens.ptr,
                g.rows.ptr,
                g.cap_tokens,
                Some(sp),
                Some(u),
                *out,
            );
        };
        let store = g.store[layer].as_ref().expect("hip layer store");
        let n = h.cfg.stages.len();
        let rows_n = bs * hkv;
        let grp = self.shape.group();
        let x = StageInputs {
            rows: rows_n,
            row_seq: g.rows.ptr,
            q: g.qf.ptr,
            nq: g.nq.ptr,
            nq_max: grp,
            nq_tpl: grp.min(8),
            stage0_in: g.stage0_in.ptr,
            stage0_cnt: g.ones.ptr,
            e0: g.cap_tokens.div_ceil(h.cfg.stages[0].chunk_size).max(1),
            keys: g.keys.ptr,
            module: "hip_mask",
            gate: g.gate.ptr,
            topk_mc: g.topk_mc.as_ref().map(|m| m.ptrs),
            mean0: None,
            assemble: None,
        };
        let pos: Vec<StageBuf> = (0..n)
            .map(|s| StageBuf {
                out: DevBuf::borrowed(g.scratch[s].0.ptr, 0),
                cnt: DevBuf::borrowed(g.scratch[s].1.ptr, 0),
                cap: h.caps[s],
            })
            .collect();
        for s in 0..n {
            // Stage s alone (run_stages runs from..cfg.stages.len()).
            let mut one = h.cfg.clone();
            one.stages.truncate(s + 1);
            run_stages(&gpu, &dkv, &one, &pos[..=s], s, &x)?;
            stage_copy(&gpu, g, 0, s, bs, hkv, h.caps[s], &store.stages[s])?;
        }
        store_stages(&gpu, g, n, bs, hkv, store)?;
        let cap = h.caps[n - 1] + 3;
        let cum = g.sel_cum.ptr;
        let sel = DeviceSelection {
            ranges: DevBuf::borrowed(g.sel_ranges.ptr, rows_n * cap * 8),
            cum: DevBuf::borrowed(cum, rows_n * cap * 4),
            cnt: DevBuf::borrowed(cum + (rows_n * cap * 4) as u64, rows_n * 4),
            tot: DevBuf::borrowed(cum + (rows_n * cap * 4 + rows_n * 4) as u64, rows_n * 4),
            cap,
            rows: rows_n,
            max_tokens: 0,
        };
        debug_assert!(cap <= g.sel_cap);
        // Sparse v2 (the default, `set_hip_attention`): the assembly also
        // writes each row's sink + chunk position table; the kernel reads
        // the slid + window tail from `extra` (gs_meta's, every step).
        let sparse = self
            .hip_attn
            .unwrap_or_else(super::super::dispatch::attention)
            == HipAttention::SparseV2;
        let tab_cap = h.tab_cap();
        debug_assert!(tab_cap <= g.tab_cap);
        let tab = sparse.then_some(TabOut {
            tab: g.tab.ptr,
            cap: tab_cap,
            ntab: g.ntab.ptr,
            gate: 0,
            n_stages: n,
            tab_sink: 0,
        });
        assemble_rows(&gpu, &pos[n - 1], g.extra.ptr, hkv, rows_n, &sel, 0, tab)?;
        let bound = hip_bound(&h.cfg, &h.caps, g.cap_tokens);
        if sparse {
            // Split fixed per batch size and the scratch sized for it in
            // prepare_graph: the launch allocates nothing (capturable).
            let u = super::super::kernels::dense_chunks(self.shape.head_dim)[0];
            let sp = sparse_attn_split(gpu.sm_count, bs, hkv, bound, u);
            return launch_v2(
                &gpu,
                &mut g.sparse_ws,
                &shape,
                kv.ptrs(),
                dkv.strides(),
                g.qf.ptr,
                bs,
                V2Src::Sparse {
                    tab: g.tab.ptr,
                    tab_stride: tab_cap,
                    ntab: g.ntab.ptr,
                    extra: g.extra.ptr,
                    early: false,
                },
                g.rows.ptr,
                bound,
                Some(sp),
                Some(u),
                *out,
            );
        }
        let sp = attn_split(gpu.sm_count, bs, hkv, bound);
        launch_attention_ex(
            &gpu,
            &mut g.ws,
            &shape,
            "",
            kv.ptrs(),
            dkv.strides(),
            g.qf.ptr,
            bs,
            &sel,
            bound,
            Some(sp),
            *out,
            1,
            g.rows.ptr,
            0,
        )
    }
}

/// Split of the dense launch (fixed per batch size: about one wave).
fn dense_split(sm: usize, bs: usize, hkv: usize, cap_tokens: usize, u: usize) -> usize {
    split_tokens(sm * 4, bs, hkv, cap_tokens, u)
}

/// The engine's queries `gs_meta` converts into `GraphState::qf` (f32,
/// times `mul`; `hqd` = n_q_heads x head_dim per row).
struct QConvert {
    q: QArg,
    hqd: usize,
    mul: f32,
}

#[allow(clippy::too_many_arguments)]
fn launch_meta(
    gpu: &GpuContext,
    g: &GraphState,
    kv: &EngineKv,
    bs: usize,
    rows: DevIndex,
    lens: DevIndex,
    hip: Option<(&HipConfig, usize)>,
    layer: usize,
    qc: QConvert,
) -> Result<()> {
    let f = gpu.func("graph_step", "gs_meta")?;
    let (r64, l64, b) = (
        (rows.elem_bytes == 8) as i32,
        (lens.elem_bytes == 8) as i32,
        bs as i32,
    );
    let ts = kv.table_stride as i64;
    let (nr, ct) = (g.n_rows as i32, g.cap_tokens as i32);
    let (hk, sink, win, ns, sc) = match hip {
        Some((c, hkv)) => (
            hkv as i32,
            c.sink as i32,
            c.window as i32,
            c.stages.len() as i32,
            slid_cap(c) as i32,
        ),
        None => (0, 0, 0, 0, 0),
    };
    let (state, intervals) = match (hip, g.store.get(layer).and_then(|s| s.as_ref())) {
        (Some(_), Some(st)) => (
            g.row_state.ptr + (st.block * g.n_rows * 16) as u64,
            st.intervals.ptr,
        ),
        _ => (g.row_state.ptr, 0u64),
    };
    let (q_dt, q_st, hqd) = (
        dtype_code(qc.q.dtype),
        qc.q.row_stride as i64,
        i32_of("row width", qc.hqd)?,
    );
    let mut l = gpu.launch_pdl(&f, Some(super::super::pdl::Site::Engine));
    l.arg(&rows.ptr)
        .arg(&r64)
        .arg(&lens.ptr)
        .arg(&l64)
        .arg(&b)
        .arg(&nr)
        .arg(&ct)
        .arg(&kv.table)
        .arg(&ts)
        .arg(&g.rows.ptr)
        .arg(&g.lens.ptr)
        .arg(&hk)
        .arg(&sink)
        .arg(&win)
        .arg(&intervals)
        .arg(&ns)
        .arg(&sc)
        .arg(&state)
        .arg(&g.pos_from.ptr)
        .arg(&g.owner.ptr)
        .arg(&g.gate.ptr)
        .arg(&g.stage0_in.ptr)
        .arg(&g.extra.ptr)
        .arg(&qc.q.ptr)
        .arg(&q_dt)
        .arg(&q_st)
        .arg(&hqd)
        .arg(&qc.mul)
        .arg(&g.qf.ptr);
    // CTA 0: the metadata (one thread per position); the rest convert the
    // queries, a few elements per thread.
    let threads = bs.next_multiple_of(32);
    let q_ctas = (bs * qc.hqd).div_ceil(threads * 4).clamp(1, 256);
    // SAFETY: gs_meta's parameter list (kernels/graph_step.cu); rows/lens hold bs elements and q
    // bs rows of q.row_stride elements of q.dtype (the caller's contract), every other buffer
    // (qf: max_bs rows of hqd f32) was sized for max_bs >= bs rows in prepare_graph.
    unsafe {
        l.launch(LaunchConfig {
            grid_dim: (1 + q_ctas as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map_err(|e| gpu_err("launch gs_meta", e))?;
    Ok(())
}

/// `gs_stage_copy` mode 1 (store) of every stage, one launch.
fn store_stages(
    gpu: &GpuContext,
    g: &GraphState,
    n_stages: usize,
    bs: usize,
    hkv: usize,
    store: &RowStore,
) -> Result<()> {
    let f = gpu.func("graph_step", "gs_store_stages")?;
    let hk = hkv as i32;
    let mut l = gpu.launch_pdl(&f, Some(super::super::pdl::Site::Engine));
    l.arg(&g.rows.ptr)
        .arg(&g.pos_from.ptr)
        .arg(&g.owner.ptr)
        .arg(&hk)
        .arg(&store.desc.ptr);
    // SAFETY: gs_store_stages' parameter list (kernels/graph_step.cu); desc holds n_stages
    // descriptors of this layer's store and the scratch (prepare_graph), sized as for
    // gs_stage_copy; rows were clamped into the table by gs_meta.
    unsafe {
        l.launch(LaunchConfig {
            grid_dim: ((bs * hkv) as u32, n_stages as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map_err(|e| gpu_err("launch gs_store_stages", e))
}

#[allow(clippy::too_many_arguments)]
fn stage_copy(
    gpu: &GpuContext,
    g: &GraphState,
    mode: i32,
    stage: usize,
    bs: usize,
    hkv: usize,
    cap: usize,
    store: &(DevBuf, DevBuf),
) -> Result<()> {
    let f = gpu.func("graph_step", "gs_stage_copy")?;
    let (st, hk, cp) = (stage as i32, hkv as i32, cap as i32);
    let mut l = gpu.launch_pdl(&f, Some(super::super::pdl::Site::Engine));
    l.arg(&mode)
        .arg(&st)
        .arg(&g.rows.ptr)
        .arg(&g.pos_from.ptr)
        .arg(&g.owner.ptr)
        .arg(&hk)
        .arg(&cp)
        .arg(&store.0.ptr)
        .arg(&store.1.ptr)
        .arg(&g.scratch[stage].0.ptr)
        .arg(&g.scratch[stage].1.ptr);
    // SAFETY: gs_stage_copy's parameter list (kernels/graph_step.cu); the store holds n_rows x hkv
    // rows of `cap` ranges, the scratch max_bs x hkv rows of at least `cap` (prepare_graph); rows
    // were clamped into the table by gs_meta.
    unsafe {
        l.launch(LaunchConfig {
            grid_dim: ((bs * hkv) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map_err(|e| gpu_err("launch gs_stage_copy", e))?;
    Ok(())
}
