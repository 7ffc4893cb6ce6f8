//! llama.cpp GPU route: the policy picks cells, llama.cpp's own (CUDA)
//! sparse flash attention gathers them.
//!
//! When llama.cpp's K cache lives in device memory, reading it from the host
//! every step would move the whole cache. Instead the plugin keeps a host
//! mirror of the keys per layer: a small CPU op appends each ubatch's `k_cur`
//! at the cells `k_idxs` names (ggml's scheduler copies `k_cur` to the host,
//! `n_embd_k_gqa * n_tokens` floats); cells the mirror never saw (a loaded
//! session, a restarted sequence) are read from the device cache once, in
//! contiguous ranges (`missing_cells` / `fill_cells`). The planning op runs
//! the layer's policy over the mirror exactly as the CPU route does
//! (`LlamaPlugin::plan`) and writes, per query row, the union over KV heads of
//! the selected cells as an I32 index tensor `[top_k, rows, n_stream]`. The
//! graph turns it into a sparse mask (as llama.cpp's DSA top-k attention
//! does) for `build_attn_mha` with `n_kv_max = top_k`.
//!
//! llama.cpp's sparse mask is one per query row for all heads, so a row
//! attends the union of its KV heads' selections (a superset of each head's
//! own selection; equal to it when the budget covers the context).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use half::f16;
use infinitehip::config::LayerPolicy;
use infinitehip::{Error, Result};

use crate::ffi::TensorDesc;
use crate::llama::{LlamaPlugin, StreamPlan, GGML_TYPE_F16, GGML_TYPE_F32};
use crate::{guard_or, stats_unavailable, Poison};

#[derive(Default)]
struct Mirror {
    /// `n_kv_heads * head_dim` keys per cell.
    row: usize,
    /// `[cells][row]`, cells global (`stream * kv_size + cell`, as `k_idxs`).
    data: Vec<f16>,
    valid: Vec<bool>,
    /// Cells written by the last `append_keys` (kept through a restart).
    fresh: Vec<usize>,
    /// Per stream: (first visible cell, visible count) at the last plan.
    seen: HashMap<usize, (usize, usize)>,
}

impl Mirror {
    fn ensure(&mut self, row: usize, cells: usize) -> Result<()> {
        if self.row != 0 && self.row != row {
            return Err(Error::shape(
                "key row (n_kv_heads * head_dim)",
                self.row,
                row,
            ));
        }
        self.row = row;
        if self.valid.len() < cells {
            self.valid.resize(cells, false);
            self.data.resize(cells * row, f16::ZERO);
        }
        Ok(())
    }
}

#[derive(Default)]
struct Counters {
    appended: AtomicU64,
    fetched: AtomicU64,
    plans: AtomicU64,
    rows: AtomicU64,
    attended: AtomicU64,
    visible: AtomicU64,
    /// Host time (ns): key appends, mirror checks, policy, index writing.
    append_ns: AtomicU64,
    missing_ns: AtomicU64,
    policy_ns: AtomicU64,
    index_ns: AtomicU64,
}

fn since(t: std::time::Instant, c: &AtomicU64) {
    c.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// What this route lacks for hip's RoPE modes: attention is llama.cpp's.
pub(crate) const HOST_MIRROR_ROPE: &str = "attention is llama.cpp's flash attention over the \
    selected cells at llama.cpp's own positions, so streaming attention cannot run there, and \
    rotated scoring over the host key mirror is not wired";

/// Host side of the GPU route for one llama.cpp context.
pub struct LlamaGpuRoute {
    layers: Vec<Mutex<Mirror>>,
    counters: Counters,
    /// Set by a caught panic (`guarded`).
    pub poison: Poison,
}

pub fn llama_gpu_route_new(plugin: &LlamaPlugin) -> Box<LlamaGpuRoute> {
    let route = |n: usize| LlamaGpuRoute {
        layers: (0..n).map(|_| Mutex::new(Mirror::default())).collect(),
        counters: Counters::default(),
        poison: Poison::default(),
    };
    // Fallback: a route with no layers, whose every call is an error.
    let n = guard_or("llama_gpu_route_new", 0, || plugin.config().model.n_layers);
    Box::new(route(n))
}

/// Element reader over a strided F32/F16 ggml view.
struct Strided<'a> {
    bytes: &'a [u8],
    dtype: u32,
    ne: [usize; 4],
    nb: [usize; 4],
}

impl<'a> Strided<'a> {
    fn new(bytes: &'a [u8], d: &TensorDesc, what: &str) -> Result<Self> {
        let es = match d.dtype {
            GGML_TYPE_F32 => 4,
            GGML_TYPE_F16 => 2,
            t => {
                return Err(Error::Dtype {
                    what: what.into(),
                    got: format!("ggml_type {t}"),
                    supported: "F32 (0), F16 (1)".into(),
                })
            }
        };
        let ne = [d.ne0, d.ne1, d.ne2, d.ne3];
        if ne.iter().any(|&n| n <= 0) {
            return Err(Error::shape(what, "all ne > 0", format!("{ne:?}")));
        }
        let ne = ne.map(|n| n as usize);
        let nb = [d.nb0, d.nb1, d.nb2, d.nb3].map(|b| b as usize);
        let span = (0..4).map(|i| (ne[i] - 1) * nb[i]).sum::<usize>() + es;
        if span > bytes.len() {
            return Err(Error::shape(
                format!("{what} buffer"),
                format!(">= {span} bytes for ne {ne:?} nb {nb:?}"),
                format!("{} bytes", bytes.len()),
            ));
        }
        Ok(Strided {
            bytes,
            dtype: d.dtype,
            ne,
            nb,
        })
    }

    #[inline]
    fn get(&self, i: [usize; 4]) -> f32 {
        let o = (0..4).map(|j| i[j] * self.nb[j]).sum::<usize>();
        if self.dtype == GGML_TYPE_F32 {
            f32::from_le_bytes(self.bytes[o..o + 4].try_into().unwrap())
        } else {
            f16::from_bits(u16::from_le_bytes(self.bytes[o..o + 2].try_into().unwrap())).to_f32()
        }
    }
}

/// Calls `f(cell)` for every finite entry of mask row `row`, stream `s`
/// (a fast path over the raw bits when the row is contiguous).
fn for_each_visible(m: &Strided<'_>, row: usize, s: usize, mut f: impl FnMut(usize)) {
    let n_kv = m.ne[0];
    let o = row * m.nb[1] + s * m.nb[3];
    if m.dtype == GGML_TYPE_F16 && m.nb[0] == 2 {
        for (c, b) in m.bytes[o..o + 2 * n_kv].chunks_exact(2).enumerate() {
            // finite: exponent bits not all ones
            if u16::from_le_bytes([b[0], b[1]]) & 0x7c00 != 0x7c00 {
                f(c);
            }
        }
    } else {
        for c in 0..n_kv {
            if m.get([c, row, 0, s]).is_finite() {
                f(c);
            }
        }
    }
}

impl LlamaGpuRoute {
    fn mirror(&self, layer: u32) -> Result<std::sync::MutexGuard<'_, Mirror>> {
        Ok(self
            .layers
            .get(layer as usize)
            .ok_or_else(|| Error::OutOfRange(format!("layer {layer} of {}", self.layers.len())))?
            .lock()
            .unwrap_or_else(|e| e.into_inner()))
    }

    /// Index slots per query row for `layer` at `n_kv` cells: a bound on the
    /// union over KV heads of one row's selected cells, at most `n_kv`.
    pub fn top_k(
        &self,
        plugin: &LlamaPlugin,
        layer: u32,
        n_kv: i64,
    ) -> std::result::Result<u32, String> {
        self.poison.guard(|| {
            plugin.refuse_rope_modes("CUDA route (host mirror)", HOST_MIRROR_ROPE)?;
            plugin.refuse_per_q_head("CUDA route (host mirror)")?;
            let cfg = plugin.config();
            if layer as usize >= cfg.model.n_layers {
                return Err(Error::OutOfRange(format!(
                    "layer {layer} of {}",
                    cfg.model.n_layers
                )));
            }
            let n_kv = usize::try_from(n_kv).map_err(|_| Error::shape("n_kv", ">= 0", n_kv))?;
            let per_head = match cfg.layer_policy(layer as usize) {
                LayerPolicy::Hip(h) => {
                    let chunk = h.stages.iter().map(|s| s.chunk_size).max().unwrap_or(0);
                    let slid = h.stages.first().map_or(0, |s| s.refresh_interval);
                    // sink + window (+ the block's spread in prefill, or the
                    // tokens slid out of the window between refreshes in
                    // decode) + the last stage's keep, rounded up by a chunk
                    h.sink + h.window + h.block_size_q.max(slid) + h.budget() + chunk
                }
                other => {
                    return Err(Error::config(
                        format!("layer {layer} method"),
                        format!("`{}` has no GPU route", other.method()),
                    ))
                }
            };
            let k = per_head
                .saturating_mul(cfg.model.n_kv_heads)
                .min(n_kv)
                .max(1);
            u32::try_from(k).map_err(|_| Error::shape("top_k", "<= u32::MAX", k))
        })
    }

    /// Store the ubatch's keys `k_cur` `[d, n_kv_heads, n_tokens]` (F32/F16)
    /// at the global cells `idxs` (I64, one per token, as llama.cpp's
    /// `k_idxs`); the mirror holds `cells_total` cells.
    pub fn append_keys(
        &self,
        layer: u32,
        k_cur: &[u8],
        kd: &TensorDesc,
        idxs: &[u8],
        cells_total: u64,
    ) -> std::result::Result<(), String> {
        let t0 = std::time::Instant::now();
        let r = self.poison.guard(|| {
            let k = Strided::new(k_cur, kd, "k_cur")?;
            let [d, h, n, _] = k.ne;
            if idxs.len() != n * 8 {
                return Err(Error::shape("k_idxs bytes", n * 8, idxs.len()));
            }
            let row = d * h;
            let total = cells_total as usize;
            let mut m = self.mirror(layer)?;
            m.ensure(row, total)?;
            m.fresh.clear();
            for t in 0..n {
                let c = i64::from_le_bytes(idxs[t * 8..t * 8 + 8].try_into().unwrap());
                let c = usize::try_from(c)
                    .ok()
                    .filter(|&c| c < total)
                    .ok_or_else(|| Error::shape("k_idxs entry", format!("0..{total}"), c))?;
                for hh in 0..h {
                    for j in 0..d {
                        m.data[c * row + hh * d + j] = f16::from_f32(k.get([j, hh, t, 0]));
                    }
                }
                m.valid[c] = true;
                m.fresh.push(c);
            }
            self.counters
                .appended
                .fetch_add(n as u64, Ordering::Relaxed);
            Ok(())
        });
        since(t0, &self.counters.append_ns);
        r
    }

    /// Global cell ranges `[start, end)` (flattened pairs) that the mask
    /// `[n_kv, rows, 1, n_stream]` shows to the ubatch's last query but the
    /// mirror does not hold. A stream whose visible cells do not continue the
    /// last plan's (a cleared or reloaded sequence) is re-read from the
    /// device, except the cells this ubatch appended.
    #[allow(clippy::too_many_arguments)]
    pub fn missing_cells(
        &self,
        layer: u32,
        mask: &[u8],
        md: &TensorDesc,
        n_tokens: u64,
        stream0: u64,
        kv_size: u64,
        row: u64,
    ) -> std::result::Result<Vec<u64>, String> {
        let t0 = std::time::Instant::now();
        let r = self.poison.guard(|| {
            let m = Strided::new(mask, md, "kq_mask")?;
            let [n_kv, rows, _, ns] = m.ne;
            let n = n_tokens as usize;
            if n == 0 || n > rows || n_kv as u64 > kv_size {
                return Err(Error::shape(
                    "kq_mask",
                    format!("[<= {kv_size}, >= {n}, 1, n_stream]"),
                    format!("{:?}", m.ne),
                ));
            }
            let total = (stream0 as usize + ns) * kv_size as usize;
            let mut mir = self.mirror(layer)?;
            mir.ensure(row as usize, total)?;
            let mir = &mut *mir;
            let mut out = Vec::new();
            for s in 0..ns {
                let base = (stream0 as usize + s) * kv_size as usize;
                // one pass over the last row: first visible cell, count, cells not held
                let (mut first, mut count) = (usize::MAX, 0usize);
                let mut run: Option<usize> = None;
                let mut gaps: Vec<(usize, usize)> = Vec::new();
                let valid = &mir.valid[base..base + n_kv];
                for_each_visible(&m, n - 1, s, |c| {
                    if first == usize::MAX {
                        first = c;
                    }
                    count += 1;
                    if !valid[c] {
                        if run.is_none() {
                            run = Some(c);
                        }
                    } else if let Some(r) = run.take() {
                        gaps.push((r, c));
                    }
                });
                if first == usize::MAX {
                    continue;
                }
                // fresh cells of this stream (this ubatch's appends) are all visible
                let new_here = mir
                    .fresh
                    .iter()
                    .filter(|&&c| c >= base && c < base + n_kv)
                    .count();
                let cont = match mir.seen.get(&s) {
                    None => true,
                    Some(&(f, cnt)) => f == first && cnt + new_here == count,
                };
                mir.seen.insert(s, (first, count));
                if !cont {
                    // a cleared or reloaded sequence: re-read every visible cell not appended now
                    let fresh: std::collections::HashSet<usize> =
                        mir.fresh.iter().copied().collect();
                    let mut cells = Vec::with_capacity(count);
                    for_each_visible(&m, n - 1, s, |c| cells.push(c));
                    for c in cells {
                        if !fresh.contains(&(base + c)) {
                            mir.valid[base + c] = false;
                        }
                    }
                    gaps.clear();
                    run = None;
                    let valid = &mir.valid[base..base + n_kv];
                    for_each_visible(&m, n - 1, s, |c| {
                        if !valid[c] && run.is_none() {
                            run = Some(c);
                        } else if valid[c] {
                            if let Some(r) = run.take() {
                                gaps.push((r, c));
                            }
                        }
                    });
                }
                if let Some(r) = run.take() {
                    gaps.push((r, n_kv));
                }
                // a gap ends at the next held cell; hidden cells inside it are read too
                // (harmless: they are marked held, and any later write goes through append)
                for (a, b) in gaps {
                    out.push((base + a) as u64);
                    out.push((base + b) as u64);
                }
            }
            Ok(out)
        });
        since(t0, &self.counters.missing_ns);
        r
    }

    /// Rows of the device K cache (F16 or F32, `row` keys each) starting at
    /// global cell `start`.
    pub fn fill_cells(
        &self,
        layer: u32,
        start: u64,
        data: &[u8],
        dtype: u32,
    ) -> std::result::Result<(), String> {
        self.poison.guard(|| {
            let mut m = self.mirror(layer)?;
            let row = m.row;
            let es = match dtype {
                GGML_TYPE_F32 => 4,
                GGML_TYPE_F16 => 2,
                t => {
                    return Err(Error::config(
                        "K cache type",
                        format!("ggml_type {t}: the GPU route reads F16/F32"),
                    ))
                }
            };
            if row == 0 || !data.len().is_multiple_of(row * es) {
                return Err(Error::shape(
                    "fill_cells bytes",
                    format!("a multiple of {} ", row * es),
                    data.len(),
                ));
            }
            let n = data.len() / (row * es);
            let s = start as usize;
            if s + n > m.valid.len() {
                return Err(Error::shape(
                    "fill_cells range",
                    format!("within 0..{}", m.valid.len()),
                    format!("{s}..{}", s + n),
                ));
            }
            for i in 0..n * row {
                m.data[s * row + i] = if es == 4 {
                    f16::from_f32(f32::from_le_bytes(
                        data[i * 4..i * 4 + 4].try_into().unwrap(),
                    ))
                } else {
                    f16::from_bits(u16::from_le_bytes(
                        data[i * 2..i * 2 + 2].try_into().unwrap(),
                    ))
                };
            }
            m.valid[s..s + n].iter_mut().for_each(|v| *v = true);
            self.counters.fetched.fetch_add(n as u64, Ordering::Relaxed);
            Ok(())
        })
    }

    /// Run the layer's policy over the mirror and write, per stream and
    /// query row, the cells the row attends (union over KV heads, view-relative
    /// cell indices) into `out` `[top_k, rows, n_stream]`; unused slots repeat
    /// the row's first cell (a no-op for the mask). `q` `[d, n_q_heads,
    /// n_tokens, n_stream]` f32, `mask` `[n_kv, rows, 1, n_stream]`.
    #[allow(clippy::too_many_arguments)]
    pub fn plan_indices(
        &self,
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
    ) -> std::result::Result<(), String> {
        self.poison.guard(|| {
            plugin.refuse_rope_modes("CUDA route (host mirror)", HOST_MIRROR_ROPE)?;
            plugin.refuse_per_q_head("CUDA route (host mirror)")?;
            let top_k = top_k as usize;
            let (n_kv, rows, ns) = (md.ne0 as usize, md.ne1 as usize, md.ne3 as usize);
            let n_tokens = qd.ne2 as usize;
            if out.len() != top_k * rows * ns || top_k == 0 || n_tokens > rows {
                return Err(Error::shape(
                    "plan_indices out",
                    format!("top_k {top_k} x rows {rows} x streams {ns}"),
                    out.len(),
                ));
            }
            let mut mir = self.mirror(layer)?;
            let row = mir.row;
            let d = qd.ne0 as usize;
            if row == 0 || !row.is_multiple_of(d) {
                return Err(Error::Invalid(format!(
                    "layer {layer}: key mirror is empty (no append before plan)"
                )));
            }
            let cell0 = stream0 as usize * kv_size as usize;
            let need = (cell0 + (ns - 1) * kv_size as usize + n_kv) * row;
            if mir.data.len() < need {
                return Err(Error::shape(
                    "key mirror",
                    format!(">= {need} keys"),
                    mir.data.len(),
                ));
            }
            // the mirror as a ggml view [d, n_kv_heads, n_kv, n_stream] (f16)
            let bytes: &[u8] = {
                let s = &mir.data[cell0 * row..];
                // SAFETY: f16 is two plain bytes.
                unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, s.len() * 2) }
            };
            let kd = TensorDesc {
                dtype: GGML_TYPE_F16,
                ne0: d as i64,
                ne1: (row / d) as i64,
                ne2: n_kv as i64,
                ne3: ns as i64,
                nb0: 2,
                nb1: 2 * d as u64,
                nb2: 2 * row as u64,
                nb3: 2 * row as u64 * kv_size,
            };
            let t0 = std::time::Instant::now();
            plugin
                .plan(layer, scale, q, qd, bytes, &kd, bytes, &kd, false, mask, md)
                .map_err(Error::Invalid)?;
            mir.fresh.clear();
            drop(mir);
            since(t0, &self.counters.policy_ns);
            let t1 = std::time::Instant::now();
            let plan = plugin.last_plan(layer)?;
            let (mut attended, mut visible) = (0u64, 0u64);
            for (s, sp) in plan.streams.iter().enumerate() {
                let StreamPlan::Sparse {
                    cells,
                    q_pos,
                    sel_of,
                    sels,
                } = sp
                else {
                    return Err(Error::Invalid(format!(
                        "layer {layer}: stream {s} is not one causal chain; the GPU route needs one sequence per stream"
                    )));
                };
                let mut mark = vec![false; cells.len()];
                let mut list: Vec<usize> = Vec::new();
                for r in 0..rows {
                    let dst = &mut out[(s * rows + r) * top_k..(s * rows + r + 1) * top_k];
                    if r >= n_tokens {
                        dst.fill(cells[0] as i32);
                        continue;
                    }
                    let end = q_pos[r] + 1;
                    list.clear();
                    for head in &sels[sel_of[r] as usize].heads {
                        for rg in head {
                            let (a, b) = (rg.start.min(end), rg.end.min(end));
                            for (i, m) in mark[a..b].iter_mut().enumerate() {
                                if !*m {
                                    *m = true;
                                    list.push(a + i);
                                }
                            }
                        }
                    }
                    for &i in &list {
                        mark[i] = false;
                    }
                    if list.len() > top_k {
                        return Err(Error::Invalid(format!(
                            "layer {layer}: row {r} selects {} cells, more than top_k {top_k} (the GPU route's bound)",
                            list.len()
                        )));
                    }
                    if list.is_empty() {
                        return Err(Error::Invalid(format!(
                            "layer {layer}: row {r} selects no cell"
                        )));
                    }
                    for (j, x) in dst.iter_mut().enumerate() {
                        *x = cells[list[j.min(list.len() - 1)]] as i32;
                    }
                    attended += list.len() as u64;
                    visible += end as u64;
                }
            }
            let c = &self.counters;
            since(t1, &c.index_ns);
            c.plans.fetch_add(1, Ordering::Relaxed);
            c.rows
                .fetch_add(n_tokens as u64 * ns as u64, Ordering::Relaxed);
            c.attended.fetch_add(attended, Ordering::Relaxed);
            c.visible.fetch_add(visible, Ordering::Relaxed);
            Ok(())
        })
    }

    pub fn gpu_stats_json(&self) -> String {
        self.poison
            .guard_or("stats_json", stats_unavailable("gpu route stats"), || {
                self.stats_json_impl()
            })
    }

    fn stats_json_impl(&self) -> String {
        let c = &self.counters;
        let (a, v) = (
            c.attended.load(Ordering::Relaxed),
            c.visible.load(Ordering::Relaxed),
        );
        serde_json::json!({
            "route": "gpu (sparse mask + n_kv_max)",
            "appended_cells": c.appended.load(Ordering::Relaxed),
            "fetched_cells": c.fetched.load(Ordering::Relaxed),
            "plans": c.plans.load(Ordering::Relaxed),
            "rows": c.rows.load(Ordering::Relaxed),
            "attended_cells": a,
            "visible_cells": v,
            "attended_fraction": if v == 0 { 1.0 } else { a as f64 / v as f64 },
            "host_ms": {
                "append": c.append_ns.load(Ordering::Relaxed) as f64 * 1e-6,
                "mirror_check": c.missing_ns.load(Ordering::Relaxed) as f64 * 1e-6,
                "policy": c.policy_ns.load(Ordering::Relaxed) as f64 * 1e-6,
                "indices": c.index_ns.load(Ordering::Relaxed) as f64 * 1e-6,
            },
        })
        .to_string()
    }
}
