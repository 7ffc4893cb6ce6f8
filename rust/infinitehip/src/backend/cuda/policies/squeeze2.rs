//! Squeezed Attention lookup on the GPU, one or two levels, straight to the
//! selected key ranges (`kernels/squeeze_lookup.cu`: `squeeze_lookup` or
//! `squeeze_lookup2`, then `squeeze_ranges`).
//!
//! Same semantics as `SqueezePolicy`'s decode lookup (`HeadIndex::
//! kept_clusters` with `use_coarse: true`, pool max, then `kept_ranges` plus
//! the observation window and everything after the prefix): with a coarse
//! level, coarse clusters with pooled p̂ >= `thr.coarse` survive, only the
//! fine clusters inside them are scored (the denominator counts only them)
//! and those with p̂ >= `thr.fine` are kept. The thresholds are the policy's
//! calibrated ones (`PrefixIndex::thresholds`); calibration stays on the
//! host. The output is a `DeviceSelection` (rows `[query][kv head]`), the
//! form the decode kernel reads, equal to the CPU policy's `Selection`.
//!
//! Ties: a cluster whose probability lies within f32 rounding (about 1e-6
//! relative) of a threshold may be decided differently from the CPU, which
//! sums the denominator in f64; at a coarse threshold that changes the fine
//! candidate set, hence the fine probabilities of that (query, head). The
//! GPU test counts such cases separately. Threshold -inf keeps everything.
//!
//! Decode only: one query position per row. The prefill lookup (one key set
//! shared by a chunk's queries, pooled max or mean) stays on the CPU.

use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};

use super::{i32_of, LevelGpu};
use crate::attention::AttnShape;
use crate::backend::cuda::dispatch::DeviceSelection;
use crate::backend::cuda::{gpu_err, DevBuf, GpuContext};
use crate::error::{Error, Result};
use crate::policy::squeeze::{HeadIndex, Level, PrefixIndex, Thresholds};
use crate::policy::Selection;

/// One sealed prefix's clustering (every KV head) on the device.
pub struct SqueezeIndexGpu {
    fine: LevelGpu,
    /// Coarse level and `of_fine` `[n_kv][k]` u32 (two-level indexes).
    coarse: Option<(LevelGpu, DevBuf)>,
    /// `[n_kv][window_start]` u32: fine cluster of each clustered key.
    labels: DevBuf,
    pub window_start: usize,
    pub prefix_len: usize,
    pub n_kv: usize,
    pub dim: usize,
}

/// Scratch of a lookup of `rows` queries: probabilities and keep flags per
/// (row, kv head, cluster), fine and coarse. Public for tests.
pub struct SqueezeWorkspace {
    pub probs: DevBuf,
    pub keep: DevBuf,
    pub cprobs: DevBuf,
    pub ckeep: DevBuf,
    pub rows: usize,
}

/// Host-side checks of a prefix index before upload: every head has the
/// same fine cluster count and dimension, all or none have a coarse level
/// (with the same count), labels cover `0..window_start` and name existing
/// clusters, `of_fine` names existing coarse clusters (or u32::MAX for an
/// empty fine cluster). Returns (k, k1) with k1 = 0 for one level.
pub fn check_heads(heads: &[HeadIndex], window_start: usize) -> Result<(usize, usize)> {
    let fine: Vec<&Level> = heads.iter().map(|h| &h.fine).collect();
    let (k, _) = super::level_dims("SqueezeIndexGpu", &fine)?;
    i32_of("squeeze window start", window_start)?;
    let two = heads[0].coarse.is_some();
    let mut k1 = 0;
    for (h, hi) in heads.iter().enumerate() {
        if hi.labels.len() != window_start {
            return Err(Error::shape(
                format!("SqueezeIndexGpu head {h} labels (clustered keys)"),
                window_start,
                hi.labels.len(),
            ));
        }
        if let Some(&l) = hi.labels.iter().find(|&&l| l as usize >= k) {
            return Err(Error::OutOfRange(format!(
                "SqueezeIndexGpu head {h}: label {l} of {k} clusters"
            )));
        }
        match (&hi.coarse, two) {
            (Some(co), true) => {
                if h == 0 {
                    k1 = co.level.k();
                }
                if co.of_fine.len() != k {
                    return Err(Error::shape(
                        format!("SqueezeIndexGpu head {h} coarse of_fine"),
                        k,
                        co.of_fine.len(),
                    ));
                }
                if let Some(&c) = co
                    .of_fine
                    .iter()
                    .find(|&&c| c != u32::MAX && c as usize >= k1)
                {
                    return Err(Error::OutOfRange(format!(
                        "SqueezeIndexGpu head {h}: coarse cluster {c} of {k1}"
                    )));
                }
            }
            (None, false) => {}
            _ => {
                return Err(Error::Invalid(format!(
                    "SqueezeIndexGpu: head {h} has {} levels, head 0 has {}",
                    1 + hi.coarse.is_some() as usize,
                    1 + two as usize
                )))
            }
        }
    }
    if two {
        let coarse: Vec<&Level> = heads
            .iter()
            .map(|h| &h.coarse.as_ref().expect("checked").level)
            .collect();
        super::level_dims("SqueezeIndexGpu coarse", &coarse)?;
    }
    Ok((k, k1))
}

/// Capacity in ranges of one (query, head) row: at most every other
/// clustered key starts a run, plus the tail.
pub fn ranges_cap(window_start: usize) -> usize {
    window_start.div_ceil(2) + 1
}

impl SqueezeIndexGpu {
    /// Upload a sealed prefix (`SqueezePolicy::prefix`). A prefix with
    /// nothing clustered (shorter than the observation window) is an error:
    /// the policy attends densely there.
    pub fn upload(p: &PrefixIndex) -> Result<Self> {
        Self::from_heads(&p.heads, p.window_start, p.prefix_len)
    }

    /// Upload per-head indexes of keys `0..window_start` of a prefix of
    /// `prefix_len` tokens.
    pub fn from_heads(heads: &[HeadIndex], window_start: usize, prefix_len: usize) -> Result<Self> {
        if heads.is_empty() || window_start == 0 {
            return Err(Error::Invalid(
                "SqueezeIndexGpu: nothing clustered (prefix within the observation window)".into(),
            ));
        }
        if prefix_len < window_start {
            return Err(Error::OutOfRange(format!(
                "SqueezeIndexGpu: window start {window_start} beyond the prefix of {prefix_len}"
            )));
        }
        check_heads(heads, window_start)?;
        let fine: Vec<&Level> = heads.iter().map(|h| &h.fine).collect();
        let fine = LevelGpu::upload("SqueezeIndexGpu", &fine)?;
        let coarse = match heads[0].coarse {
            Some(_) => {
                let lv: Vec<&Level> = heads
                    .iter()
                    .map(|h| &h.coarse.as_ref().expect("checked").level)
                    .collect();
                let of: Vec<u32> = heads
                    .iter()
                    .flat_map(|h| h.coarse.as_ref().expect("checked").of_fine.iter().copied())
                    .collect();
                Some((
                    LevelGpu::upload("SqueezeIndexGpu coarse", &lv)?,
                    DevBuf::from_slice(&of)?,
                ))
            }
            None => None,
        };
        let labels: Vec<u32> = heads
            .iter()
            .flat_map(|h| h.labels.iter().copied())
            .collect();
        Ok(SqueezeIndexGpu {
            dim: fine.dim,
            fine,
            coarse,
            labels: DevBuf::from_slice(&labels)?,
            window_start,
            prefix_len,
            n_kv: heads.len(),
        })
    }

    /// 1 or 2.
    pub fn levels(&self) -> usize {
        1 + self.coarse.is_some() as usize
    }

    /// Fine and coarse cluster counts per head (coarse 0 for one level).
    pub fn clusters(&self) -> (usize, usize) {
        (self.fine.k, self.coarse.as_ref().map_or(0, |c| c.0.k))
    }

    pub fn workspace(&self, rows: usize) -> Result<SqueezeWorkspace> {
        let (k, k1) = self.clusters();
        let (n, n1) = (rows * self.n_kv * k, rows * self.n_kv * k1.max(1));
        Ok(SqueezeWorkspace {
            probs: DevBuf::alloc(n * 4)?,
            keep: DevBuf::alloc(n)?,
            cprobs: DevBuf::alloc(n1 * 4)?,
            ckeep: DevBuf::alloc(n1)?,
            rows,
        })
    }

    /// An output selection for `rows` queries (rows x n_kv rows of
    /// `ranges_cap(window_start)` ranges); `max_len` bounds the sequences'
    /// lengths (it sizes the decode kernel's split-K grid).
    pub fn new_selection(&self, rows: usize, max_len: usize) -> Result<DeviceSelection> {
        let mut s = DeviceSelection::empty(rows * self.n_kv, ranges_cap(self.window_start))?;
        s.max_tokens = max_len;
        Ok(s)
    }

    /// Decode lookup of `rows` queries (device f32 `[rows][n_q][d]`),
    /// query r belonging to a sequence of `lens[r]` tokens (device i32
    /// `[rows]`, each >= `prefix_len`: trusted here, `select` checks them),
    /// into `out` (from `new_selection`), on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_select(
        &self,
        gpu: &GpuContext,
        stream: &CudaStream,
        shape: &AttnShape,
        queries: u64,
        rows: usize,
        lens: u64,
        thr: Thresholds,
        ws: &SqueezeWorkspace,
        out: &DeviceSelection,
    ) -> Result<()> {
        shape.validate()?;
        if shape.n_kv_heads != self.n_kv || shape.head_dim != self.dim {
            return Err(Error::shape(
                "SqueezeIndexGpu lookup shape (n_kv heads x head_dim)",
                format!("{} x {}", self.n_kv, self.dim),
                format!("{} x {}", shape.n_kv_heads, shape.head_dim),
            ));
        }
        if ws.rows < rows {
            return Err(Error::shape("SqueezeWorkspace rows", rows, ws.rows));
        }
        let cap = ranges_cap(self.window_start);
        if out.rows < rows * self.n_kv || out.cap < cap {
            return Err(Error::shape(
                "SqueezeIndexGpu output selection (rows, ranges per row)",
                format!("({}, {cap})", rows * self.n_kv),
                format!("({}, {})", out.rows, out.cap),
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        let (g, d) = (shape.group(), self.dim);
        let smem = (g * d + 2 * g + 16) * 4;
        if smem > 48 * 1024 {
            return Err(Error::Invalid(format!(
                "SqueezeIndexGpu: group {g} x head_dim {d} needs {smem} bytes of shared memory (> 48 KiB)"
            )));
        }
        i32_of("squeeze rows", rows)?;
        let (k, k1) = self.clusters();
        let (ki, k1i, di, nq, hk) = (
            k as i32,
            k1 as i32,
            d as i32,
            shape.n_q_heads as i32,
            self.n_kv as i32,
        );
        let grid = (self.n_kv, rows, 1);
        let f = &self.fine;
        match &self.coarse {
            None => launch!(gpu, stream, "squeeze_lookup", "squeeze_lookup",
                grid: grid, smem: smem,
                args: [f.cent.ptr, f.sizes.ptr, ki, di, queries, nq, hk, shape.scale, thr.fine,
                       ws.probs.ptr, ws.keep.ptr])?,
            Some((c, of_fine)) => launch!(gpu, stream, "squeeze_lookup", "squeeze_lookup2",
                grid: grid, smem: smem,
                args: [c.cent.ptr, c.sizes.ptr, k1i, f.cent.ptr, f.sizes.ptr, of_fine.ptr, ki, di,
                       queries, nq, hk, shape.scale, thr.coarse, thr.fine, ws.cprobs.ptr,
                       ws.ckeep.ptr, ws.probs.ptr, ws.keep.ptr])?,
        }
        let (wsi, capi) = (self.window_start as i32, out.cap as i32);
        launch!(gpu, stream, "squeeze_lookup", "squeeze_ranges",
            grid: grid, smem: 0,
            args: [self.labels.ptr, wsi, ws.keep.ptr, ki, lens, hk, capi, out.ranges.ptr,
                   out.cum.ptr, out.cnt.ptr, out.tot.ptr])
    }

    /// Host in, host out: one `Selection` per query (`queries` `[rows][n_q][d]`,
    /// query r from a sequence of `lens[r]` tokens, each >= `prefix_len`).
    pub fn select(
        &self,
        gpu: &GpuContext,
        shape: &AttnShape,
        queries: &[f32],
        lens: &[usize],
        thr: Thresholds,
    ) -> Result<Vec<Selection>> {
        let rows = lens.len();
        if queries.len() != rows * shape.q_elems() {
            return Err(Error::shape(
                "SqueezeIndexGpu queries (rows x n_q x d)",
                rows * shape.q_elems(),
                queries.len(),
            ));
        }
        let lens_i = check_lens(lens, self.prefix_len)?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let (dq, dl) = (DevBuf::from_slice(queries)?, DevBuf::from_slice(&lens_i)?);
        let ws = self.workspace(rows)?;
        let out = self.new_selection(rows, lens.iter().copied().max().unwrap_or(0))?;
        self.launch_select(
            gpu,
            &gpu.stream,
            shape,
            dq.ptr,
            rows,
            dl.ptr,
            thr,
            &ws,
            &out,
        )?;
        gpu.synchronize()?;
        out.to_host(self.n_kv)
    }
}

/// Lengths as i32, each at least `prefix_len` (the CPU policy errors on a
/// sequence shorter than its clustered prefix).
pub fn check_lens(lens: &[usize], prefix_len: usize) -> Result<Vec<i32>> {
    lens.iter()
        .enumerate()
        .map(|(r, &l)| {
            if l < prefix_len {
                return Err(Error::OutOfRange(format!(
                    "squeeze GPU query {r}: sequence holds {l} tokens, fewer than its clustered prefix of {prefix_len}"
                )));
            }
            i32_of("squeeze sequence length", l)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(k: usize, d: usize) -> Level {
        Level {
            dim: d,
            centroids: vec![0.0; k * d],
            sizes: vec![1; k],
            nonempty: (0..k as u32).collect(),
        }
    }

    fn head(k: usize, labels: Vec<u32>) -> HeadIndex {
        HeadIndex {
            fine: level(k, 4),
            labels,
            coarse: None,
        }
    }

    #[test]
    fn malformed_indexes_are_errors_before_any_cuda_call() {
        // Labels must cover the clustered keys and name existing clusters.
        let e = check_heads(&[head(3, vec![0, 1, 2])], 4).unwrap_err();
        assert!(e.to_string().contains("head 0 labels"), "{e}");
        let e = check_heads(&[head(3, vec![0, 1]), head(3, vec![0, 3])], 2).unwrap_err();
        assert!(e.to_string().contains("head 1: label 3 of 3"), "{e}");
        // Different cluster counts per head.
        let e = check_heads(&[head(3, vec![0]), head(4, vec![0])], 1).unwrap_err();
        assert!(e.to_string().contains("head 1 centroids"), "{e}");
        assert_eq!(check_heads(&[head(3, vec![0, 2])], 2).unwrap(), (3, 0));
        // A real two-level head (k-means on 40 random keys), then broken.
        let mut rng = crate::rng::Rng::new(7);
        let keys = rng.normal_vec(40 * 4, 1.0);
        let kv = crate::kv::SeqView::from_contiguous(1, 4, 40, &keys, &keys);
        let cfg = crate::config::SqueezeConfig {
            percent_clusters: 25.0,
            percent_clusters_l1: 50.0,
            levels: 2,
            ..Default::default()
        };
        let two = crate::policy::squeeze::build_head(&kv, 0, 40, &cfg).unwrap();
        let k = two.fine.k();
        let k1 = two.coarse.as_ref().unwrap().level.k();
        assert_eq!(
            check_heads(&[two.clone(), two.clone()], 40).unwrap(),
            (k, k1)
        );
        let mut one = two.clone();
        one.coarse = None;
        let e = check_heads(&[two.clone(), one], 40).unwrap_err();
        assert!(e.to_string().contains("head 1 has 1 levels"), "{e}");
        let mut bad = two.clone();
        bad.coarse.as_mut().unwrap().of_fine[0] = k1 as u32;
        let e = check_heads(&[bad], 40).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("coarse cluster {k1} of {k1}")),
            "{e}"
        );
        // Nothing clustered.
        assert!(SqueezeIndexGpu::from_heads(&[], 0, 10).is_err());
    }

    #[test]
    fn lens_and_capacity() {
        assert_eq!(check_lens(&[10, 12], 10).unwrap(), vec![10, 12]);
        let e = check_lens(&[10, 9], 10).unwrap_err();
        assert!(e.to_string().contains("query 1"), "{e}");
        // Alternating keys: 1, 3, 5 selected of 0..6 -> 3 runs + tail.
        assert_eq!(ranges_cap(6), 4);
        assert_eq!(ranges_cap(5), 4);
        assert_eq!(ranges_cap(1), 2);
    }
}
