//! LazyLLM revival in llama.cpp decode (patch 0010): the paper's aux cache.
//!
//! Prefill (`llama_lazy`) drops the rows a pruning point `p` does not keep;
//! their cells then hold K/V for layers `0..=p` only. Here:
//!
//! - the aux cache: at `p` the pruned rows' hidden state (the input of
//!   layer `p`'s FFN: attention output + residual) is stored per cell;
//! - ranking: in every decode step, the new token's attention at `p`
//!   (softmax over the cells it sees, mean over q heads: the same importance
//!   as pruning) picks the top `keep` fraction of the cells visible there;
//!   those pruned at `p` are revived in the NEXT decode graph (a graph's
//!   shape is fixed when it is built, so the step after the one that ranks
//!   them computes them);
//! - revival: the decode graph takes those cells' aux rows in at `p`'s FFN,
//!   runs them (at their own positions, causal mask) through every layer
//!   after `p` next to the new token, and writes their K/V into their cells,
//!   so from then on they hold every layer and no mask hides them. Each
//!   token is computed at most once per layer.
//!
//! `LLAMA_INFINITEHIP_LAZY_REVIVE`: unset = on, at most 64 cells per point
//! per step (the most important first); a number = that cap; `all` = every
//! pruned cell at the first decode step (tests: K/V then equal a dense
//! run's); `off` = never (pruned cells stay hidden in the layers they lack).

use std::collections::HashMap;

use infinitehip::policy::lazy::keep_count;
use infinitehip::{Error, Result};

use crate::ffi::TensorDesc;
use crate::llama::View;
use crate::llama_lazy::{last_row_probs, views, LazyRows};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ReviveMode {
    Off,
    All,
    /// The most important pruned cells, at most this many per point and step.
    Top(usize),
}

impl ReviveMode {
    pub(crate) fn from_env() -> Self {
        match std::env::var("LLAMA_INFINITEHIP_LAZY_REVIVE").as_deref() {
            Ok("off") | Ok("0") => ReviveMode::Off,
            Ok("all") => ReviveMode::All,
            Ok(s) => s.parse().map_or(ReviveMode::Top(64), ReviveMode::Top),
            Err(_) => ReviveMode::Top(64),
        }
    }
}

/// Aux cache and the cells picked for revival.
#[derive(Default)]
pub(crate) struct Aux {
    /// cell -> its hidden state at its pruning layer (n_embd f32)
    rows: HashMap<i64, Vec<f32>>,
    /// per pruning point: cells the next decode graph revives
    pending: Vec<Vec<i64>>,
}

impl Aux {
    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    /// The cells were written by a new ubatch: whatever they held is gone.
    pub(crate) fn forget(&mut self, cells: &[i64]) {
        if self.rows.is_empty() {
            return;
        }
        for c in cells {
            self.rows.remove(c);
        }
        for p in &mut self.pending {
            p.retain(|c| !cells.contains(c));
        }
    }
}

impl LazyRows {
    /// Overrides `LLAMA_INFINITEHIP_LAZY_REVIVE` (tests).
    pub fn set_revive_mode(&mut self, mode: ReviveMode) {
        self.revive_mode = mode;
    }

    fn aux(&self) -> std::sync::MutexGuard<'_, Aux> {
        self.aux.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores the hidden rows (`n_embd` f32 each) of `cells`, pruned at `layer`.
    pub fn aux_store(&self, layer: usize, cells: &[i64], rows: &[f32]) -> Result<()> {
        if self.revive_mode == ReviveMode::Off || cells.is_empty() {
            return Ok(());
        }
        if rows.len() % cells.len() != 0 {
            return Err(Error::shape("lazy aux rows", "cells x n_embd", rows.len()));
        }
        let n_embd = rows.len() / cells.len();
        let mut a = self.aux();
        for (c, r) in cells.iter().zip(rows.chunks(n_embd)) {
            a.rows.insert(*c, r.to_vec());
        }
        let _ = layer;
        Ok(())
    }

    /// Cells the decode graph being built revives at point `j`, flat
    /// `[cell, position]` pairs (ascending cells).
    pub fn revive_plan(&self, j: usize) -> Vec<i64> {
        let Some(p) = self.points.get(j) else {
            return Vec::new();
        };
        let depth_here = (p.layer + 1) as u16;
        let a = self.aux();
        let d = self.depth.lock().unwrap_or_else(|e| e.into_inner());
        let pos = self.pos.lock().unwrap_or_else(|e| e.into_inner());
        let at_p =
            |c: &i64| *c >= 0 && d.get(*c as usize) == Some(&depth_here) && a.rows.contains_key(c);
        let mut cells: Vec<i64> = match self.revive_mode {
            ReviveMode::Off => Vec::new(),
            ReviveMode::All => a.rows.keys().copied().filter(at_p).collect(),
            ReviveMode::Top(_) => a
                .pending
                .get(j)
                .map_or(Vec::new(), |v| v.iter().copied().filter(at_p).collect()),
        };
        cells.sort_unstable();
        cells
            .iter()
            .flat_map(|&c| [c, pos.get(c as usize).copied().unwrap_or(0) as i64])
            .collect()
    }

    /// The decode graph that revives `cells` runs: from now on they hold
    /// every layer (their later layers are written before any mask reads).
    pub fn revive_begin(&self, cells: &[i64]) {
        let mut a = self.aux();
        let mut d = self.depth.lock().unwrap_or_else(|e| e.into_inner());
        for &c in cells {
            if c >= 0 && (c as usize) < d.len() {
                d[c as usize] = self.n_layers as u16;
            }
        }
        for p in &mut a.pending {
            p.retain(|c| !cells.contains(c));
        }
        self.revived
            .fetch_add(cells.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Copies the aux rows of `cells` into `out` (`cells.len()` x n_embd)
    /// and drops them from the cache.
    pub fn aux_take(&self, cells: &[i64], out: &mut [f32]) -> Result<()> {
        if cells.is_empty() {
            return Ok(());
        }
        let n_embd = out.len() / cells.len();
        let mut a = self.aux();
        for (c, dst) in cells.iter().zip(out.chunks_mut(n_embd)) {
            let row = a
                .rows
                .remove(c)
                .ok_or_else(|| Error::Invalid(format!("lazy revival: cell {c} has no aux row")))?;
            if row.len() != n_embd {
                return Err(Error::shape("lazy aux row", n_embd, row.len()));
            }
            dst.copy_from_slice(&row);
        }
        Ok(())
    }

    /// Decode step at point `j`: ranks the cells the new token (the last
    /// row) sees at the point's layer and marks the top `keep` fraction's
    /// pruned-here cells for revival in the next decode graph.
    pub fn revive_rank(
        &self,
        j: usize,
        scale: f32,
        q: &View,
        k: &View,
        mask: &View,
        col0: i64,
    ) -> Result<()> {
        let ReviveMode::Top(cap) = self.revive_mode else {
            return Ok(());
        };
        let Some(p) = self.points.get(j) else {
            return Ok(());
        };
        let (probs, visible) = last_row_probs(scale, q, k, mask)?;
        let n_visible = visible.len();
        let mut order = visible;
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(b.cmp(&a)));
        order.truncate(keep_count(p.keep, n_visible));
        let depth_here = (p.layer + 1) as u16;
        let mut a = self.aux();
        let d = self.depth.lock().unwrap_or_else(|e| e.into_inner());
        let picked: Vec<i64> = order
            .into_iter()
            .map(|c| col0 + c as i64)
            .filter(|c| d.get(*c as usize) == Some(&depth_here) && a.rows.contains_key(c))
            .take(cap)
            .collect();
        if a.pending.len() < self.points.len() {
            a.pending.resize(self.points.len(), Vec::new());
        }
        a.pending[j] = picked;
        Ok(())
    }

    /// Depth of every cell known (layers whose K/V it holds).
    pub fn depths(&self) -> Vec<u16> {
        self.depth.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl crate::LlamaPlugin {
    /// See [`LazyRows::aux_store`].
    pub fn lazy_aux_store(
        &self,
        layer: u32,
        cells: &[i64],
        rows: &[f32],
    ) -> std::result::Result<(), String> {
        self.poison.guard(|| {
            self.lazy_rows_state()?
                .aux_store(layer as usize, cells, rows)
        })
    }

    /// See [`LazyRows::revive_plan`]; empty without lazy layers.
    pub fn lazy_revive_plan(&self, point: u32) -> Vec<i64> {
        self.poison.guard_or("lazy_revive_plan", Vec::new(), || {
            self.lazy_rows
                .as_ref()
                .map_or(Vec::new(), |l| l.revive_plan(point as usize))
        })
    }

    /// See [`LazyRows::revive_begin`].
    pub fn lazy_revive_begin(&self, cells: &[i64]) -> std::result::Result<(), String> {
        self.poison.guard(|| {
            self.lazy_rows_state()?.revive_begin(cells);
            Ok(())
        })
    }

    /// See [`LazyRows::aux_take`].
    pub fn lazy_aux_take(&self, cells: &[i64], out: &mut [f32]) -> std::result::Result<(), String> {
        self.poison
            .guard(|| self.lazy_rows_state()?.aux_take(cells, out))
    }

    /// See [`LazyRows::revive_rank`] (F32 q, F16/F32 k and mask).
    #[allow(clippy::too_many_arguments)]
    pub fn lazy_revive_rank(
        &self,
        point: u32,
        scale: f32,
        q: &[u8],
        qd: &TensorDesc,
        k: &[u8],
        kd: &TensorDesc,
        mask: &[u8],
        md: &TensorDesc,
        col0: i64,
    ) -> std::result::Result<(), String> {
        self.poison.guard(|| {
            let (qv, kv, mv) = views(q, qd, k, kd, mask, md)?;
            self.lazy_rows_state()?
                .revive_rank(point as usize, scale, &qv, &kv, &mv, col0)
        })
    }

    /// Layers whose K/V each known cell holds (tests).
    pub fn lazy_rows_depths(&self) -> Vec<u16> {
        self.poison.guard_or("lazy_rows_depths", Vec::new(), || {
            self.lazy_rows.as_ref().map_or(Vec::new(), |l| l.depths())
        })
    }
}
