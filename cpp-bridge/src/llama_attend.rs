//! The attention math of the plugin's `attend` op, over one KV head of
//! llama.cpp's cache.
//!
//! Two implementations of the same result:
//! - `attend_run_moved` (default; `attend_run` without key moves): a run of
//!   consecutive query tokens that share a
//!   selection (one hip query block) goes through the selected cells in
//!   tiles. Each tile's K and V rows are converted to f32 once and used by
//!   every query row of the run (tokens x the KV head's query group), with an
//!   online softmax; each token sees a prefix of the cell list (its causal
//!   clip). On x86-64 with AVX2/FMA/F16C the inner loops use those.
//! - `attend_reference`: one query group over an explicit (cell, bias) list,
//!   all scores then softmax then V: the previous path, kept as the twin
//!   (`LLAMA_INFINITEHIP_ATTEND=reference`) and as the masked path's kernel.

use half::f16;

use crate::llama_rope::LlamaRope;

/// Cells per tile: the tile's f32 K and V (2 x 32 x d floats) stay in L1.
const TILE: usize = 32;

#[derive(Clone, Copy)]
pub(crate) enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

/// K and V of one (stream, KV head): K row of cell c at `k0 + c * k_cell`
/// (d contiguous elements); V element j of cell c at
/// `v0 + c * v_cell + j * v_dim` (`v_dim` 1 unless V is transposed).
#[derive(Clone, Copy)]
pub(crate) struct HeadKv<'a> {
    pub k: Rows<'a>,
    pub v: Rows<'a>,
    pub d: usize,
    pub k0: usize,
    pub k_cell: usize,
    pub v0: usize,
    pub v_cell: usize,
    pub v_dim: usize,
}

impl HeadKv<'_> {
    fn key(&self, c: u32, out: &mut [f32]) {
        let o = self.k0 + c as usize * self.k_cell;
        match self.k {
            Rows::F32(k) => out.copy_from_slice(&k[o..o + self.d]),
            Rows::F16(k) => f16_to_f32(&k[o..o + self.d], out),
        }
    }

    /// Prefetch the K and V rows of cell `c` (a hint: no effect on results).
    #[inline]
    fn prefetch(&self, c: u32) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let row = |rows: Rows<'_>, o: usize, n: usize| match rows {
                Rows::F32(x) => x.get(o..o + n).map(|r| (r.as_ptr() as *const i8, 4 * n)),
                Rows::F16(x) => x.get(o..o + n).map(|r| (r.as_ptr() as *const i8, 2 * n)),
            };
            let k = row(self.k, self.k0 + c as usize * self.k_cell, self.d);
            // V transposed: elements are strided, prefetch only its first line.
            let vn = if self.v_dim == 1 { self.d } else { 1 };
            let v = row(self.v, self.v0 + c as usize * self.v_cell, vn);
            for (base, bytes) in [k, v].into_iter().flatten() {
                for off in (0..bytes).step_by(64) {
                    // SAFETY: prefetch is a hint; the address lies inside the row.
                    unsafe { _mm_prefetch::<_MM_HINT_T0>(base.add(off)) };
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = c;
    }

    fn value(&self, c: u32, out: &mut [f32]) {
        let o = self.v0 + c as usize * self.v_cell;
        if self.v_dim == 1 {
            match self.v {
                Rows::F32(v) => out.copy_from_slice(&v[o..o + self.d]),
                Rows::F16(v) => f16_to_f32(&v[o..o + self.d], out),
            }
        } else {
            for (j, x) in out.iter_mut().enumerate() {
                let i = o + j * self.v_dim;
                *x = match self.v {
                    Rows::F32(v) => v[i],
                    Rows::F16(v) => v[i].to_f32(),
                };
            }
        }
    }
}

fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    // Runtime-dispatched F16C conversion (per call, not per element).
    src.convert_to_f32_slice(dst);
}

/// Which kernel `attend` runs (`LLAMA_INFINITEHIP_ATTEND=reference` picks the twin).
pub(crate) fn use_reference() -> bool {
    static REF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REF.get_or_init(|| std::env::var("LLAMA_INFINITEHIP_ATTEND").is_ok_and(|v| v == "reference"))
}

/// Reference: the query group `qg` (`[grp][d]`) over `toks` (cell, additive
/// bias), scores, softmax, then V, f32 accumulation; `out` `[grp][d]`.
/// Rows with nothing visible get zeros.
pub(crate) fn attend_reference(
    kv: &HeadKv<'_>,
    qg: &[f32],
    toks: &[(u32, f32)],
    scale: f32,
    out: &mut [f32],
) {
    let d = kv.d;
    let grp = qg.len() / d;
    let n = toks.len();
    out.fill(0.0);
    if n == 0 {
        return;
    }
    let mut row = vec![0f32; d];
    let mut p = vec![0f32; grp * n];
    for (i, &(c, b)) in toks.iter().enumerate() {
        kv.key(c, &mut row);
        for gi in 0..grp {
            p[gi * n + i] =
                infinitehip::dtype::dot_f32(&qg[gi * d..(gi + 1) * d], &row) * scale + b;
        }
    }
    let mut inv = vec![0f32; grp];
    for gi in 0..grp {
        let r = &mut p[gi * n..(gi + 1) * n];
        let m = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        if !m.is_finite() {
            r.fill(0.0);
            continue;
        }
        let mut l = 0f32;
        for x in r.iter_mut() {
            *x = (*x - m).exp();
            l += *x;
        }
        inv[gi] = 1.0 / l;
    }
    for (i, &(c, _)) in toks.iter().enumerate() {
        kv.value(c, &mut row);
        for gi in 0..grp {
            infinitehip::dtype::axpy_f32(&mut out[gi * d..(gi + 1) * d], p[gi * n + i], &row);
        }
    }
    for gi in 0..grp {
        out[gi * d..(gi + 1) * d]
            .iter_mut()
            .for_each(|x| *x *= inv[gi]);
    }
}

/// Tiled kernel: `q` holds `n_tok` tokens x `grp` rows x `d` (token-major);
/// token i attends `cells[..visible[i]]` (`visible` non-decreasing is not
/// required). `out` is laid out as `q`. Tokens with nothing visible get zeros.
/// The route calls `attend_run_moved`; this form is the tests' entry point.
#[cfg(test)]
pub(crate) fn attend_run(
    kv: &HeadKv<'_>,
    q: &[f32],
    grp: usize,
    cells: &[u32],
    visible: &[usize],
    scale: f32,
    out: &mut [f32],
) {
    attend_run_moved(kv, q, grp, cells, visible, scale, None, out)
}

/// Keys moved to other positions as they are loaded: key `i` of the cell
/// list is rotated by `shift[i]` positions (streaming attention: from its
/// chain index to its rank among the selected tokens). Each key is rotated
/// once per tile, for every query row of the run.
pub(crate) struct KeyMove<'a> {
    pub rope: &'a LlamaRope,
    pub table: &'a [(f32, f32)],
    pub shift: &'a [i64],
}

/// `attend_run` with the keys optionally moved (`KeyMove`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_run_moved(
    kv: &HeadKv<'_>,
    q: &[f32],
    grp: usize,
    cells: &[u32],
    visible: &[usize],
    scale: f32,
    mv: Option<&KeyMove<'_>>,
    out: &mut [f32],
) {
    let n_rows = visible.len() * grp;
    let mut m = vec![f32::NEG_INFINITY; n_rows];
    let mut l = vec![0f32; n_rows];
    attend_run_partial(kv, q, grp, cells, visible, scale, mv, out, &mut m, &mut l);
    normalise_rows(kv.d, &l, out);
}

/// `attend_run_moved` without the last division: per query row the running
/// max `m` and sum `l` of its softmax and the unnormalised output (rows that
/// see nothing: `m` -inf, `l` 0, output 0). Parts of one cell list computed
/// this way (each with its own `visible`, the token's clip within the part)
/// are merged by `merge_partials`: one head's cells split across threads.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_run_partial(
    kv: &HeadKv<'_>,
    q: &[f32],
    grp: usize,
    cells: &[u32],
    visible: &[usize],
    scale: f32,
    mv: Option<&KeyMove<'_>>,
    out: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
) {
    let d = kv.d;
    let n_rows = visible.len() * grp;
    debug_assert_eq!(q.len(), n_rows * d);
    debug_assert_eq!(out.len(), n_rows * d);
    debug_assert!(m.len() == n_rows && l.len() == n_rows);
    debug_assert!(visible.iter().all(|&v| v <= cells.len()));
    debug_assert!(mv.is_none_or(|m| m.shift.len() >= cells.len()));
    out.fill(0.0);
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    let mut kt = vec![0f32; TILE * d];
    let mut vt = vec![0f32; TILE * d];
    let mut s = [0f32; TILE];
    let n_max = visible.iter().copied().max().unwrap_or(0);
    let simd = simd_ok();
    for t0 in (0..n_max).step_by(TILE) {
        let tn = TILE.min(n_max - t0);
        // The next tile's rows load while this one is computed.
        for &c in &cells[(t0 + TILE).min(n_max)..(t0 + 2 * TILE).min(n_max)] {
            kv.prefetch(c);
        }
        for j in 0..tn {
            kv.key(cells[t0 + j], &mut kt[j * d..(j + 1) * d]);
            if let Some(m) = mv {
                m.rope
                    .rotate_heads(m.table, &mut kt[j * d..(j + 1) * d], m.shift[t0 + j]);
            }
            kv.value(cells[t0 + j], &mut vt[j * d..(j + 1) * d]);
        }
        for r in 0..n_rows {
            let vis = visible[r / grp];
            if vis <= t0 {
                continue;
            }
            let jn = tn.min(vis - t0);
            let qr = &q[r * d..(r + 1) * d];
            let or = &mut out[r * d..(r + 1) * d];
            // SAFETY: `simd` says the CPU has the features the kernel enables.
            unsafe {
                tile_row(
                    simd,
                    qr,
                    &kt[..jn * d],
                    &vt[..jn * d],
                    scale,
                    &mut s[..jn],
                    &mut m[r],
                    &mut l[r],
                    or,
                )
            };
        }
    }
}

/// Divide each row of `out` (`[rows][d]`) by its softmax sum `l`; rows with
/// nothing visible get zeros, NaN rows NaN.
fn normalise_rows(d: usize, l: &[f32], out: &mut [f32]) {
    for (or, &lr) in out.chunks_exact_mut(d).zip(l) {
        if lr.is_nan() {
            or.fill(f32::NAN);
        } else if lr > 0.0 {
            let inv = 1.0 / lr;
            or.iter_mut().for_each(|x| *x *= inv);
        } else {
            or.fill(0.0);
        }
    }
}

/// One part's state for `merge_partials`: per row max, sum, unnormalised output.
pub(crate) struct Partial<'a> {
    pub m: &'a [f32],
    pub l: &'a [f32],
    pub o: &'a [f32],
}

/// The attention of rows split over cell parts (`attend_run_partial` of
/// each part): each part rescaled to the common max, then normalised; the
/// result equals one pass over all the cells up to f32 rounding. A NaN in
/// any part makes the row NaN; a row no part sees gets zeros.
pub(crate) fn merge_partials(d: usize, parts: &[Partial<'_>], out: &mut [f32]) {
    let n_rows = out.len() / d;
    let mut l = vec![0f32; n_rows];
    out.fill(0.0);
    for r in 0..n_rows {
        let or = &mut out[r * d..(r + 1) * d];
        if parts.iter().any(|p| p.m[r].is_nan() || p.l[r].is_nan()) {
            l[r] = f32::NAN;
            continue;
        }
        let mx = parts
            .iter()
            .map(|p| p.m[r])
            .fold(f32::NEG_INFINITY, f32::max);
        if mx == f32::NEG_INFINITY {
            continue;
        }
        for p in parts {
            if p.m[r] == f32::NEG_INFINITY {
                continue;
            }
            let a = (p.m[r] - mx).exp();
            l[r] += a * p.l[r];
            for (x, &y) in or.iter_mut().zip(&p.o[r * d..(r + 1) * d]) {
                *x += a * y;
            }
        }
    }
    normalise_rows(d, &l, out);
}

fn simd_ok() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One query row against one tile: scores, online-softmax update of the
/// row's running max `m`, sum `l` and unnormalised output `o`.
///
/// # Safety
/// `simd` true only when the CPU has AVX2 and FMA.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn tile_row(
    simd: bool,
    q: &[f32],
    kt: &[f32],
    vt: &[f32],
    scale: f32,
    s: &mut [f32],
    m: &mut f32,
    l: &mut f32,
    o: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        return tile_row_avx2(q, kt, vt, scale, s, m, l, o);
    }
    let _ = simd;
    tile_row_generic(q, kt, vt, scale, s, m, l, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_row_avx2(
    q: &[f32],
    kt: &[f32],
    vt: &[f32],
    scale: f32,
    s: &mut [f32],
    m: &mut f32,
    l: &mut f32,
    o: &mut [f32],
) {
    tile_row_generic(q, kt, vt, scale, s, m, l, o)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn tile_row_generic(
    q: &[f32],
    kt: &[f32],
    vt: &[f32],
    scale: f32,
    s: &mut [f32],
    m: &mut f32,
    l: &mut f32,
    o: &mut [f32],
) {
    let d = q.len();
    let mut mx = f32::NEG_INFINITY;
    let mut nan = false;
    for (j, sj) in s.iter_mut().enumerate() {
        *sj = dot8(q, &kt[j * d..(j + 1) * d]) * scale;
        nan |= sj.is_nan();
        mx = mx.max(*sj);
    }
    if nan || m.is_nan() {
        // NaN poisons the row, as it does the reference's softmax.
        *m = f32::NAN;
        *l = f32::NAN;
        return;
    }
    if mx == f32::NEG_INFINITY {
        return;
    }
    let m_new = m.max(mx);
    if m_new > *m {
        let alpha = if *m == f32::NEG_INFINITY {
            0.0
        } else {
            (*m - m_new).exp()
        };
        *l *= alpha;
        o.iter_mut().for_each(|x| *x *= alpha);
        *m = m_new;
    }
    let mut sum = 0f32;
    for (j, &sj) in s.iter().enumerate() {
        let p = (sj - m_new).exp();
        sum += p;
        let vr = &vt[j * d..(j + 1) * d];
        for (x, &v) in o.iter_mut().zip(vr) {
            *x += p * v;
        }
    }
    *l += sum;
}

/// f32 dot product with 8 independent partial sums (vectorises).
#[inline(always)]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let n8 = a.len() / 8 * 8;
    for (ca, cb) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut t = 0f32;
    for i in n8..a.len() {
        t += a[i] * b[i];
    }
    acc.iter().sum::<f32>() + t
}

#[cfg(test)]
mod tests {
    use super::*;
    use infinitehip::rng::Rng;

    struct Case {
        k: Vec<f16>,
        v: Vec<f32>,
        vt: Vec<f16>,
        n_cells: usize,
        d: usize,
    }

    fn case(rng: &mut Rng, n_cells: usize, d: usize) -> Case {
        let k = rng
            .normal_vec(n_cells * d, 1.0)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let v = rng.normal_vec(n_cells * d, 1.0);
        let vt = v.iter().map(|&x| f16::from_f32(x)).collect();
        Case {
            k,
            v,
            vt,
            n_cells,
            d,
        }
    }

    fn views(c: &Case) -> [HeadKv<'_>; 2] {
        let d = c.d;
        [
            // K f16 rows, V f32 rows
            HeadKv {
                k: Rows::F16(&c.k),
                v: Rows::F32(&c.v),
                d,
                k0: 0,
                k_cell: d,
                v0: 0,
                v_cell: d,
                v_dim: 1,
            },
            // V f16 transposed: element j of cell c at c + j * n_cells
            HeadKv {
                k: Rows::F16(&c.k),
                v: Rows::F16(&c.vt),
                d,
                k0: 0,
                k_cell: d,
                v0: 0,
                v_cell: 1,
                v_dim: c.n_cells,
            },
        ]
    }

    /// Tiled == reference on random selections, causal clips and shapes.
    #[test]
    fn tiled_equals_reference() {
        let mut rng = Rng::new(11);
        for trial in 0..24 {
            let d = [32, 64, 40][trial % 3];
            let n_cells = 50 + rng.below(700);
            let c = case(&mut rng, n_cells, d);
            // a sorted cell subset (the selection) and per-token prefixes
            let cells: Vec<u32> = (0..n_cells as u32).filter(|_| rng.below(3) != 0).collect();
            let grp = 1 + rng.below(4);
            let n_tok = 1 + rng.below(9);
            let visible: Vec<usize> = (0..n_tok)
                .map(|i| {
                    if i == 0 && trial % 4 == 0 {
                        0
                    } else {
                        rng.below(cells.len() + 1)
                    }
                })
                .collect();
            let q = rng.normal_vec(n_tok * grp * d, 1.0);
            let scale = 1.0 / (d as f32).sqrt();
            for kv in views(&c) {
                let mut got = vec![0f32; q.len()];
                attend_run(&kv, &q, grp, &cells, &visible, scale, &mut got);
                let mut worst = 0f32;
                for (i, &vis) in visible.iter().enumerate() {
                    let toks: Vec<(u32, f32)> = cells[..vis].iter().map(|&c| (c, 0.0)).collect();
                    let mut want = vec![0f32; grp * d];
                    attend_reference(
                        &kv,
                        &q[i * grp * d..(i + 1) * grp * d],
                        &toks,
                        scale,
                        &mut want,
                    );
                    for (a, b) in got[i * grp * d..(i + 1) * grp * d].iter().zip(&want) {
                        assert!(a.is_finite(), "trial {trial}: non-finite output");
                        worst = worst.max((a - b).abs());
                    }
                }
                // outputs are convex combinations of O(1) values: f32 rounding
                assert!(worst < 2e-5, "trial {trial}: max abs diff {worst}");
            }
        }
    }

    /// The comparison can fail: one dropped cell changes the output.
    #[test]
    fn dropping_a_cell_is_seen() {
        let mut rng = Rng::new(12);
        let (n_cells, d) = (300, 64);
        let c = case(&mut rng, n_cells, d);
        let cells: Vec<u32> = (0..n_cells as u32).collect();
        let q: Vec<f32> = rng.normal_vec(d, 1.0).iter().map(|x| x * 4.0).collect();
        let kv = views(&c)[0];
        let mut got = vec![0f32; d];
        attend_run(&kv, &q, 1, &cells, &[n_cells], 0.125, &mut got);
        // drop the cell with the highest score
        let mut row = vec![0f32; d];
        let best = (0..n_cells as u32)
            .max_by(|&a, &b| {
                kv.key(a, &mut row);
                let sa = dot8(&q, &row);
                kv.key(b, &mut row);
                sa.total_cmp(&dot8(&q, &row))
            })
            .unwrap();
        let toks: Vec<(u32, f32)> = cells
            .iter()
            .filter(|&&x| x != best)
            .map(|&x| (x, 0.0))
            .collect();
        let mut want = vec![0f32; d];
        attend_reference(&kv, &q, &toks, 0.125, &mut want);
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff > 1e-3,
            "dropping the top cell changed the output by only {diff}"
        );
    }

    /// NaN in K never passes as a finite output.
    #[test]
    fn nan_propagates() {
        let mut rng = Rng::new(13);
        let (n_cells, d) = (100, 32);
        let mut c = case(&mut rng, n_cells, d);
        c.k[40 * d + 3] = f16::NAN;
        let cells: Vec<u32> = (0..n_cells as u32).collect();
        let q = rng.normal_vec(d, 1.0);
        let mut got = vec![0f32; d];
        attend_run(&views(&c)[0], &q, 1, &cells, &[n_cells], 0.2, &mut got);
        assert!(
            got.iter().any(|x| x.is_nan()),
            "a NaN key gave a finite output"
        );
    }

    /// Attention of `visible` split into `n_parts` cell ranges
    /// (`attend_run_partial` each, visible clipped per part), merged.
    #[allow(clippy::too_many_arguments)]
    fn split_merged(
        kv: &HeadKv<'_>,
        q: &[f32],
        grp: usize,
        cells: &[u32],
        visible: &[usize],
        scale: f32,
        n_parts: usize,
        skip_first_of_part: Option<usize>,
    ) -> Vec<f32> {
        let (d, rows) = (kv.d, visible.len() * grp);
        let n = visible.iter().copied().max().unwrap_or(0);
        let mut st = Vec::new();
        for p in 0..n_parts {
            let (mut c0, c1) = (n * p / n_parts, n * (p + 1) / n_parts);
            if skip_first_of_part == Some(p) && c0 < c1 {
                c0 += 1;
            }
            let vis: Vec<usize> = visible.iter().map(|&v| v.clamp(c0, c1) - c0).collect();
            let (mut o, mut m, mut l) = (vec![0f32; rows * d], vec![0f32; rows], vec![0f32; rows]);
            attend_run_partial(
                kv,
                q,
                grp,
                &cells[c0..c1],
                &vis,
                scale,
                None,
                &mut o,
                &mut m,
                &mut l,
            );
            st.push((m, l, o));
        }
        let parts: Vec<Partial<'_>> = st.iter().map(|(m, l, o)| Partial { m, l, o }).collect();
        let mut out = vec![0f32; rows * d];
        merge_partials(d, &parts, &mut out);
        out
    }

    /// One head's cells split into parts (the attend op's cross-thread
    /// split) and merged == one pass, on random selections, clips (tokens
    /// that see nothing, parts a token does not reach) and part counts.
    #[test]
    fn split_parts_merged_equal_one_pass() {
        let mut rng = Rng::new(14);
        for trial in 0..24 {
            let d = [32, 64, 40][trial % 3];
            let n_cells = 20 + rng.below(900);
            let c = case(&mut rng, n_cells, d);
            let cells: Vec<u32> = (0..n_cells as u32).filter(|_| rng.below(3) != 0).collect();
            let grp = 1 + rng.below(4);
            let n_tok = 1 + rng.below(4);
            let visible: Vec<usize> = (0..n_tok)
                .map(|i| {
                    if i == 0 && trial % 5 == 0 {
                        0
                    } else {
                        rng.below(cells.len() + 1)
                    }
                })
                .collect();
            let q = rng.normal_vec(n_tok * grp * d, 1.0);
            let scale = 1.0 / (d as f32).sqrt();
            for kv in views(&c) {
                let mut want = vec![0f32; q.len()];
                attend_run(&kv, &q, grp, &cells, &visible, scale, &mut want);
                for n_parts in [1, 2, 3, 7] {
                    let got = split_merged(&kv, &q, grp, &cells, &visible, scale, n_parts, None);
                    let worst = got.iter().zip(&want).fold(0f32, |w, (a, b)| {
                        assert!(a.is_finite(), "trial {trial}: non-finite output");
                        w.max((a - b).abs())
                    });
                    assert!(
                        worst < 2e-6,
                        "trial {trial}, {n_parts} parts: max abs diff {worst}"
                    );
                }
            }
        }
    }

    /// The merge comparison can fail: a part that loses its first cell (one
    /// token of the head's selection) is seen; a NaN in one part is NaN.
    #[test]
    fn split_dropping_a_cell_or_nan_is_seen() {
        let mut rng = Rng::new(15);
        let (n_cells, d) = (400, 64);
        let mut c = case(&mut rng, n_cells, d);
        let cells: Vec<u32> = (0..n_cells as u32).collect();
        // scores ~ N(0, 1): no cell's weight is negligible
        let q: Vec<f32> = rng.normal_vec(d, 1.0);
        let kv = views(&c)[0];
        let mut want = vec![0f32; d];
        attend_run(&kv, &q, 1, &cells, &[n_cells], 0.125, &mut want);
        let mut worst_drop = f32::INFINITY;
        for part in 0..4 {
            let got = split_merged(&kv, &q, 1, &cells, &[n_cells], 0.125, 4, Some(part));
            let diff = got
                .iter()
                .zip(&want)
                .fold(0f32, |w, (a, b)| w.max((a - b).abs()));
            worst_drop = worst_drop.min(diff);
        }
        assert!(
            worst_drop > 2e-6,
            "dropping a cell moved the output by only {worst_drop}"
        );
        c.k[310 * d + 5] = f16::NAN;
        let kv = views(&c)[0];
        let got = split_merged(&kv, &q, 1, &cells, &[n_cells], 0.125, 4, None);
        assert!(
            got.iter().any(|x| x.is_nan()),
            "a NaN key in one part gave a finite output"
        );
    }
}
