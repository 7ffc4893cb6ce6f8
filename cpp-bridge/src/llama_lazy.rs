//! LazyLLM row dropping in llama.cpp (patch 0007): the Rust side.
//!
//! The patch changes the Llama graph builder so that, after the attention of
//! each pruning layer `p` of a `lazy` config, only the rows (ubatch tokens)
//! kept by this module go on: hidden state, residual, positions and K/V cell
//! indices are gathered, so layers `p+1..` compute fewer rows. This module
//! supplies, per ubatch:
//!
//! - [`LazyRows::plan`]: rows left after each point (static: the graph's
//!   shapes), `keep_count(keep, n_tokens)` of the ubatch, at least
//!   `n_outputs + 1` (rows whose logits are requested are never pruned, and
//!   the last row never is);
//! - [`keep_rows`]: which rows, from the last row's attention at `p`
//!   (softmax over the cells it sees, mean over q heads: the paper's
//!   importance), top-k among the current rows, ties to the later row;
//! - [`LazyRows::mask`]: the attention mask of the layers after a point:
//!   the kept rows' mask rows, with every cell that holds no K/V at those
//!   layers set to -inf.
//!
//! Pruned tokens' K/V. A token pruned at `p` never gets K/V in layers
//! `p+1..`; its cell there holds whatever an earlier token left. The plugin
//! keeps a depth per cell (the number of layers whose K/V the cell holds,
//! set when a ubatch writes the cell), and every later mask of every later
//! ubatch (decode included) hides the cell in the layers it lacks. This is
//! the "mark and keep masking" choice; the paper's revival (computing a
//! pruned token's missing layers from an aux cache when a decode step needs
//! it) is not done: decode attends, at layer l, to the prompt tokens that
//! reached l in prefill. Revival (the paper's aux cache) is in
//! `llama_lazy_revive` (patch 0010): pruned rows' hidden states are kept,
//! and a decode step that ranks a pruned token high computes its missing
//! layers in the next decode graph.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use half::f16;
use infinitehip::config::LazyPoint;
use infinitehip::policy::lazy::{keep_count, top_k};
use infinitehip::{Error, Result};

use crate::ffi::TensorDesc;
use crate::llama::{View, GGML_TYPE_F16, GGML_TYPE_F32};
use crate::llama_lazy_revive::{Aux, ReviveMode};

/// Row dropping state of one llama.cpp context.
pub struct LazyRows {
    pub(crate) n_layers: usize,
    pub(crate) points: Vec<LazyPoint>,
    /// Per KV cell (llama.cpp's index over all streams): layers `0..depth`
    /// hold its K/V. Cells past the end hold every layer.
    pub(crate) depth: Mutex<Vec<u16>>,
    /// Per KV cell: the position of the token that wrote it last.
    pub(crate) pos: Mutex<Vec<i32>>,
    /// Revival (`llama_lazy_revive`): aux cache, cells picked to revive.
    pub(crate) aux: Mutex<Aux>,
    pub(crate) revive_mode: ReviveMode,
    pub(crate) revived: AtomicU64,
    /// Attention rows computed over compact K/V (patch 0010), summed over layers.
    compact_rows: AtomicU64,
    /// A graph with row dropping is being built (lazy layers then keep
    /// llama.cpp's attention instead of the key-narrowing route).
    building: AtomicBool,
    /// Attention rows computed per layer (summed over ubatches).
    rows: Vec<AtomicU64>,
    ubatches: AtomicU64,
    tokens: AtomicU64,
    pruned: AtomicU64,
    masked_cells: AtomicU64,
}

impl LazyRows {
    pub fn new(n_layers: usize, points: Vec<LazyPoint>) -> Result<Self> {
        if n_layers > u16::MAX as usize {
            return Err(Error::Invalid(format!(
                "lazy rows: {n_layers} layers (at most {})",
                u16::MAX
            )));
        }
        if let Some(p) = points.iter().find(|p| p.layer + 1 >= n_layers) {
            return Err(Error::config(
                "lazy.points",
                format!(
                    "layer {} must be below the last layer {}",
                    p.layer,
                    n_layers - 1
                ),
            ));
        }
        Ok(LazyRows {
            n_layers,
            points,
            depth: Mutex::new(Vec::new()),
            pos: Mutex::new(Vec::new()),
            aux: Mutex::new(Aux::default()),
            revive_mode: ReviveMode::from_env(),
            revived: AtomicU64::new(0),
            compact_rows: AtomicU64::new(0),
            building: AtomicBool::new(false),
            rows: (0..n_layers).map(|_| AtomicU64::new(0)).collect(),
            ubatches: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            pruned: AtomicU64::new(0),
            masked_cells: AtomicU64::new(0),
        })
    }

    pub fn n_layers(&self) -> usize {
        self.n_layers
    }

    /// `[layer, rows after it]` per pruning point, flat, for a ubatch of
    /// `n_tokens` tokens of which `n_outputs` want logits. `single_seq`:
    /// rows are dropped only when the ubatch holds one sequence (else every
    /// point keeps every row, and only the masks apply).
    pub fn plan(&self, n_tokens: usize, n_outputs: usize, single_seq: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(2 * self.points.len());
        let mut prev = n_tokens;
        for p in &self.points {
            let m = if single_seq {
                keep_count(p.keep, n_tokens).max(n_outputs + 1).min(prev)
            } else {
                n_tokens
            };
            out.push(p.layer as u32);
            out.push(m as u32);
            prev = m;
        }
        out
    }

    pub fn set_building(&self, on: bool) {
        self.building.store(on, Ordering::Relaxed);
    }

    pub fn building(&self) -> bool {
        self.building.load(Ordering::Relaxed)
    }

    /// A ubatch writes `cells` (llama.cpp's `k_idxs`) at positions `pos`:
    /// they hold every layer until a point prunes them.
    pub fn begin_ubatch(&self, cells: &[i64], pos: &[i32]) {
        self.aux
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget(cells);
        let mut d = self.depth.lock().unwrap_or_else(|e| e.into_inner());
        for &c in cells {
            if c >= 0 && (c as usize) < d.len() {
                d[c as usize] = self.n_layers as u16;
            }
        }
        let mut cp = self.pos.lock().unwrap_or_else(|e| e.into_inner());
        for (&c, &p) in cells.iter().zip(pos) {
            if c >= 0 {
                if c as usize >= cp.len() {
                    cp.resize(c as usize + 1, i32::MAX);
                }
                cp[c as usize] = p;
            }
        }
        self.ubatches.fetch_add(1, Ordering::Relaxed);
        self.tokens.fetch_add(cells.len() as u64, Ordering::Relaxed);
    }

    /// Rows pruned at `layer`: their cells hold layers `0..=layer` only.
    pub fn mark_pruned(&self, layer: usize, cells: &[i64]) {
        let mut d = self.depth.lock().unwrap_or_else(|e| e.into_inner());
        for &c in cells {
            if c < 0 {
                continue;
            }
            let c = c as usize;
            if c >= d.len() {
                d.resize(c + 1, self.n_layers as u16);
            }
            d[c] = (layer + 1) as u16;
        }
        self.pruned.fetch_add(cells.len() as u64, Ordering::Relaxed);
    }

    /// Layers `first..=last` computed `rows` attention rows each.
    pub fn count(&self, first: usize, last: usize, rows: u64) {
        for r in self.rows.iter().take(last + 1).skip(first) {
            r.fetch_add(rows, Ordering::Relaxed);
        }
    }

    /// Layers `first..=last` attended over compact K/V with `rows` rows each.
    pub fn count_compact(&self, first: usize, last: usize, rows: u64) {
        let n = (last + 1).saturating_sub(first) as u64;
        self.compact_rows.fetch_add(n * rows, Ordering::Relaxed);
    }

    /// Depth of a cell (layers whose K/V it holds).
    pub fn depth(&self, cell: usize) -> usize {
        let d = self.depth.lock().unwrap_or_else(|e| e.into_inner());
        d.get(cell).map_or(self.n_layers, |&x| x as usize)
    }

    /// The mask of layers `first..` (ggml thread `ith` of `nth` writes its
    /// share of the rows): `out[s][i][c] = mask[s][rows[i]][c]`, or -inf
    /// where cell `col0 + s * kv_size + c` holds no K/V at layer `first`.
    /// `rows` is empty for an identity row map. A row id `-1 - k` is revived
    /// row `k` (decode, `llama_lazy_revive`) at position `rev_pos[k]`: the
    /// last mask row (the new token's) with every cell written at a later
    /// position hidden. `out` is contiguous `[n_kv, n_rows, 1, n_stream]` of
    /// the mask's type.
    #[allow(clippy::too_many_arguments)]
    pub fn mask(
        &self,
        first: usize,
        mask: &[u8],
        md: &TensorDesc,
        rows: &[i32],
        rev_pos: &[i32],
        col0: i64,
        kv_size: i64,
        ith: usize,
        nth: usize,
        out: &mut [u8],
    ) -> Result<()> {
        let m = View::new(mask, md, "lazy mask")?;
        let (n_kv, n_in, n_stream) = (m.ne[0], m.ne[1], m.ne[3]);
        if m.ne[2] != 1 || m.st[0] != 1 {
            return Err(Error::shape(
                "lazy mask",
                "[n_kv, n_rows, 1, n_stream], contiguous rows",
                format!("{:?}", m.ne),
            ));
        }
        let n_rows = if rows.is_empty() { n_in } else { rows.len() };
        let es = if md.dtype == GGML_TYPE_F16 { 2 } else { 4 };
        if out.len() != n_kv * n_rows * n_stream * es {
            return Err(Error::shape(
                "lazy mask output bytes",
                n_kv * n_rows * n_stream * es,
                out.len(),
            ));
        }
        if let Some(&r) = rows
            .iter()
            .find(|&&r| r >= n_in as i32 || (r < 0 && (-1 - r) as usize >= rev_pos.len()))
        {
            return Err(Error::OutOfRange(format!(
                "lazy mask row {r} of {n_in} ({} revived)",
                rev_pos.len()
            )));
        }
        let cell_pos: Vec<i32> = if rev_pos.is_empty() {
            Vec::new()
        } else {
            self.pos.lock().unwrap_or_else(|e| e.into_inner()).clone()
        };
        // Which columns lose their K/V at `first`, per stream (same for every row).
        let hidden: Vec<Vec<bool>> = {
            let d = self.depth.lock().unwrap_or_else(|e| e.into_inner());
            (0..n_stream)
                .map(|s| {
                    (0..n_kv)
                        .map(|c| {
                            let cell = col0 + s as i64 * kv_size + c as i64;
                            cell >= 0
                                && d.get(cell as usize).is_some_and(|&x| (x as usize) <= first)
                        })
                        .collect()
                })
                .collect()
        };
        let total = n_rows * n_stream;
        let (i0, i1) = (total * ith / nth, total * (ith + 1) / nth);
        if ith == 0 {
            let n_hidden: usize = hidden
                .iter()
                .map(|h| h.iter().filter(|&&x| x).count())
                .sum();
            self.masked_cells
                .fetch_add(n_hidden as u64, Ordering::Relaxed);
        }
        let row_bytes = n_kv * es;
        for item in i0..i1 {
            let (s, i) = (item / n_rows, item % n_rows);
            let r = if rows.is_empty() { i as i32 } else { rows[i] };
            let src_row = if r < 0 { n_in - 1 } else { r as usize };
            let src = m.idx(0, src_row, 0, s) * es;
            let dst = &mut out[item * row_bytes..(item + 1) * row_bytes];
            dst.copy_from_slice(&mask[src..src + row_bytes]);
            let later = |c: usize| {
                r < 0 && {
                    let cell = col0 + s as i64 * kv_size + c as i64;
                    cell < 0
                        || cell_pos
                            .get(cell as usize)
                            .is_none_or(|&p| p > rev_pos[(-1 - r) as usize])
                }
            };
            for (c, &h) in hidden[s].iter().enumerate() {
                if h || later(c) {
                    if es == 2 {
                        dst[2 * c..2 * c + 2]
                            .copy_from_slice(&f16::NEG_INFINITY.to_bits().to_le_bytes());
                    } else {
                        dst[4 * c..4 * c + 4].copy_from_slice(&f32::NEG_INFINITY.to_le_bytes());
                    }
                }
            }
        }
        Ok(())
    }

    /// JSON counters: attention rows per layer, tokens, pruned rows.
    pub fn stats(&self) -> serde_json::Value {
        let rows: Vec<u64> = self
            .rows
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .collect();
        let tokens = self.tokens.load(Ordering::Relaxed);
        let computed: u64 = rows.iter().sum();
        serde_json::json!({
            "ubatches": self.ubatches.load(Ordering::Relaxed),
            "tokens": tokens,
            "pruned_rows": self.pruned.load(Ordering::Relaxed),
            "revived": self.revived.load(Ordering::Relaxed),
            "compact_rows": self.compact_rows.load(Ordering::Relaxed),
            "aux_rows": self.aux.lock().unwrap_or_else(|e| e.into_inner()).len(),
            "masked_cells": self.masked_cells.load(Ordering::Relaxed),
            "rows_per_layer": rows,
            "row_fraction": if tokens == 0 { 1.0 } else {
                computed as f64 / (tokens as f64 * self.n_layers as f64)
            },
        })
    }
}

/// The rows that stay after a pruning point. `q` `[d, n_q_heads, n_rows]`
/// (f32) holds the current rows' queries at the point, `k` `[d, n_kv_heads,
/// n_kv, 1]` the layer's K cache view, `mask` `[n_kv, n_rows, 1, 1]` the mask
/// those rows attended with. Row `r`'s token sits in column `cols[r]`.
/// Importance of a row = the last row's attention probability to its cell
/// (softmax over the cells the last row sees, logits `scale * q.k + mask`,
/// mean over q heads; q head h reads KV head h / group). Returns `m` row
/// indices, ascending: the `forced` rows and the last row always, then the
/// most important (ties: the later row).
#[allow(clippy::too_many_arguments)]
pub fn keep_rows(
    scale: f32,
    q: &View,
    k: &View,
    mask: &View,
    cols: &[usize],
    forced: &[bool],
    m: usize,
) -> Result<Vec<usize>> {
    let (d, n_head, n_rows) = (q.ne[0], q.ne[1], q.ne[2]);
    let (n_kv_heads, n_kv) = (k.ne[1], k.ne[2]);
    if k.ne[0] != d || n_kv_heads == 0 || n_head % n_kv_heads != 0 || q.ne[3] != 1 {
        return Err(Error::shape(
            "lazy keep q/k heads",
            format!("k [{d}, h | {n_head}, ..]"),
            format!("q {:?}, k {:?}", q.ne, k.ne),
        ));
    }
    if mask.ne[0] < n_kv || mask.ne[1] < n_rows || cols.len() != n_rows || forced.len() != n_rows {
        return Err(Error::shape(
            "lazy keep mask / rows",
            format!("mask [>= {n_kv}, >= {n_rows}], {n_rows} cols and forced flags"),
            format!(
                "mask {:?}, {} cols, {} forced",
                mask.ne,
                cols.len(),
                forced.len()
            ),
        ));
    }
    if let Some(&c) = cols.iter().find(|&&c| c >= n_kv) {
        return Err(Error::OutOfRange(format!("lazy keep column {c} of {n_kv}")));
    }
    if m >= n_rows {
        return Ok((0..n_rows).collect());
    }
    let last = n_rows - 1;
    let (prob, _) = last_row_probs(scale, q, k, mask)?;
    let imp: Vec<f32> = (0..n_rows)
        .map(|r| {
            if forced[r] {
                f32::INFINITY
            } else {
                prob[cols[r]] as f32
            }
        })
        .collect();
    if let Some(r) = imp.iter().position(|x| x.is_nan()) {
        return Err(Error::Invalid(format!(
            "lazy keep: importance of row {r} is NaN (non-finite query or keys)"
        )));
    }
    let rows: Vec<u32> = (0..n_rows as u32).collect();
    let kept = top_k(&rows, &imp, m, Some(last as u32));
    Ok(kept.into_iter().map(|r| r as usize).collect())
}

/// The last row's attention over the columns (`q` `[d, n_q_heads, n_rows]`,
/// `k` `[d, n_kv_heads, n_kv, 1]`, `mask` rows as q's): softmax of `scale *
/// q.k + mask` over the columns its mask row shows, mean over q heads (q
/// head h reads KV head h / group). Returns the probability per column and
/// the visible columns.
pub(crate) fn last_row_probs(
    scale: f32,
    q: &View,
    k: &View,
    mask: &View,
) -> Result<(Vec<f64>, Vec<usize>)> {
    let (d, n_head, n_rows) = (q.ne[0], q.ne[1], q.ne[2]);
    let (n_kv_heads, n_kv) = (k.ne[1], k.ne[2]);
    if n_rows == 0 || k.ne[0] != d || n_kv_heads == 0 || n_head % n_kv_heads != 0 {
        return Err(Error::shape(
            "lazy importance q/k",
            format!("k [{d}, h | {n_head}, ..]"),
            format!("q {:?}, k {:?}", q.ne, k.ne),
        ));
    }
    if mask.ne[0] < n_kv || mask.ne[1] < n_rows {
        return Err(Error::shape(
            "lazy importance mask",
            format!("[>= {n_kv}, >= {n_rows}]"),
            format!("{:?}", mask.ne),
        ));
    }
    let last = n_rows - 1;
    let group = n_head / n_kv_heads;
    let visible: Vec<usize> = (0..n_kv)
        .filter(|&c| mask.get(mask.idx(c, last, 0, 0)) != f32::NEG_INFINITY)
        .collect();
    let mut prob = vec![0f64; n_kv];
    let mut logits = vec![0f32; visible.len()];
    let mut qh = vec![0f32; d];
    for h in 0..n_head {
        for (i, x) in qh.iter_mut().enumerate() {
            *x = q.get(q.idx(i, h, last, 0));
        }
        let hk = h / group;
        for (l, &c) in logits.iter_mut().zip(&visible) {
            let mut dot = 0f32;
            for (i, &x) in qh.iter().enumerate() {
                dot += x * k.get(k.idx(i, hk, c, 0));
            }
            *l = scale * dot + mask.get(mask.idx(c, last, 0, 0));
        }
        let mx = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let ex: Vec<f64> = logits.iter().map(|&l| ((l - mx) as f64).exp()).collect();
        let z: f64 = ex.iter().sum();
        for (&c, e) in visible.iter().zip(&ex) {
            prob[c] += e / z / n_head as f64;
        }
    }
    Ok((prob, visible))
}

/// Views for [`keep_rows`] from ggml tensors (F32 q; F16/F32 k and mask).
pub(crate) fn views<'a>(
    q: &'a [u8],
    qd: &TensorDesc,
    k: &'a [u8],
    kd: &TensorDesc,
    mask: &'a [u8],
    md: &TensorDesc,
) -> Result<(View<'a>, View<'a>, View<'a>)> {
    if qd.dtype != GGML_TYPE_F32 {
        return Err(Error::Dtype {
            what: "lazy keep q".into(),
            got: format!("ggml_type {}", qd.dtype),
            supported: "F32".into(),
        });
    }
    Ok((
        View::new(q, qd, "lazy keep q")?,
        View::new(k, kd, "lazy keep k")?,
        View::new(mask, md, "lazy keep mask")?,
    ))
}

impl crate::LlamaPlugin {
    pub(crate) fn lazy_rows_state(&self) -> Result<&LazyRows> {
        self.lazy_rows
            .as_ref()
            .ok_or_else(|| Error::Invalid("no layer runs lazy".into()))
    }

    /// Whether some layer runs `lazy` (the graph builder drops rows).
    pub fn lazy_rows_on(&self) -> bool {
        self.poison
            .guard_or("lazy_rows_on", false, || self.lazy_rows.is_some())
    }

    /// See [`LazyRows::plan`]; empty without lazy layers.
    pub fn lazy_rows_plan(&self, n_tokens: u32, n_outputs: u32, single_seq: bool) -> Vec<u32> {
        self.poison.guard_or("lazy_rows_plan", Vec::new(), || {
            self.lazy_rows.as_ref().map_or(Vec::new(), |l| {
                l.plan(n_tokens as usize, n_outputs as usize, single_seq)
            })
        })
    }

    pub fn lazy_rows_set_building(&self, on: bool) {
        self.poison.guard_or("lazy_rows_set_building", (), || {
            if let Some(l) = &self.lazy_rows {
                l.set_building(on)
            }
        })
    }

    /// A graph with row dropping is being built: lazy layers keep
    /// llama.cpp's attention.
    pub fn lazy_rows_building(&self) -> bool {
        self.poison.guard_or("lazy_rows_building", false, || {
            self.lazy_rows.as_ref().is_some_and(|l| l.building())
        })
    }

    /// The ubatch in flight writes `cells` (`k_idxs`, I64) at `pos`.
    pub fn lazy_rows_begin(&self, cells: &[i64], pos: &[i32]) -> std::result::Result<(), String> {
        self.poison.guard(|| {
            self.lazy_rows_state()?.begin_ubatch(cells, pos);
            Ok(())
        })
    }

    /// The pruning op of `layer`: writes the kept rows (indices into the
    /// current rows, ascending) into `out` (its length is the count) and
    /// marks the pruned rows' cells. `cells[r]`: row r's cell (llama.cpp's
    /// index), `col0`: the cell of mask column 0; `forced[r] != 0`: keep.
    /// `cols` (compact K/V, patch 0010): row r's column in `k` and `mask`
    /// (empty: `cells[r] - col0`).
    #[allow(clippy::too_many_arguments)]
    pub fn lazy_rows_keep(
        &self,
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
    ) -> std::result::Result<(), String> {
        self.poison.guard(|| {
            let l = self.lazy_rows_state()?;
            let (qv, kv, mv) = views(q, qd, k, kd, mask, md)?;
            if !cols.is_empty() && cols.len() != cells.len() {
                return Err(Error::shape("lazy keep cols", cells.len(), cols.len()));
            }
            let (src, col0) = if cols.is_empty() {
                (cells, col0)
            } else {
                (cols, 0)
            };
            let cols = src
                .iter()
                .map(|&c| {
                    usize::try_from(c - col0).map_err(|_| {
                        Error::OutOfRange(format!("lazy keep: cell {c} before column 0 ({col0})"))
                    })
                })
                .collect::<Result<Vec<usize>>>()?;
            let forced: Vec<bool> = forced.iter().map(|&f| f != 0).collect();
            let kept = keep_rows(scale, &qv, &kv, &mv, &cols, &forced, out.len())?;
            if kept.len() != out.len() {
                return Err(Error::shape("lazy kept rows", out.len(), kept.len()));
            }
            let mut is_kept = vec![false; cells.len()];
            for (o, &r) in out.iter_mut().zip(&kept) {
                *o = r as i32;
                is_kept[r] = true;
            }
            let pruned: Vec<i64> = cells
                .iter()
                .zip(&is_kept)
                .filter(|(_, &k)| !k)
                .map(|(&c, _)| c)
                .collect();
            l.mark_pruned(layer as usize, &pruned);
            Ok(())
        })
    }

    /// See [`LazyRows::mask`].
    #[allow(clippy::too_many_arguments)]
    pub fn lazy_rows_mask(
        &self,
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
    ) -> std::result::Result<(), String> {
        self.poison.guard(|| {
            self.lazy_rows_state()?.mask(
                first as usize,
                mask,
                md,
                rows,
                rev_pos,
                col0,
                kv_size,
                ith as usize,
                nth.max(1) as usize,
                out,
            )
        })
    }

    /// Layers `first..=last` attended over compact K/V with `rows` rows each (stats).
    pub fn lazy_rows_compacted(&self, first: u32, last: u32, rows: u64) {
        self.poison.guard_or("lazy_rows_compacted", (), || {
            if let Some(l) = &self.lazy_rows {
                l.count_compact(first as usize, last as usize, rows)
            }
        })
    }

    /// Layers `first..=last` computed `rows` attention rows each (stats).
    pub fn lazy_rows_count(&self, first: u32, last: u32, rows: u64) {
        self.poison.guard_or("lazy_rows_count", (), || {
            if let Some(l) = &self.lazy_rows {
                l.count(first as usize, last as usize, rows)
            }
        })
    }
}
