//! InfiniteHiP's RoPE modes over llama.cpp's cache.
//!
//! llama.cpp stores keys already rotated at their positions, in its own pair
//! layout (`LLAMA_ROPE_TYPE_NORM`: dims (2i, 2i+1), what the GGUF converter
//! makes of Llama; `NEOX`: dims (i, i + n_rot/2)). Rotations compose, so the
//! plugin moves a stored key or query to another position by rotating it by
//! the difference, with llama.cpp's own frequencies (patch 0006 passes the
//! rope type, n_rot, base and linear scale):
//! - scoring modes (`chunk_indexed`, `relative`): the core's policy rotates
//!   keys in the halves layout over the whole head, so the plugin hands it
//!   keys and queries permuted to that layout (dot products are unchanged);
//! - `streaming` attention: per query, the selected keys it sees take ranks
//!   0..n and the query n - 1; a run of consecutive tokens shares one shift,
//!   so the query is rotated once per run (as the core's CPU kernel does).
//!
//! Positions are the chain indices the plugin already uses (cell order from
//! position 0, append-only), as llama.cpp assigns them in plain generation.

use std::sync::{Arc, RwLock};

use infinitehip::{Error, Result};

/// `llama_rope_type` values we can move (llama.h).
pub const LLAMA_ROPE_TYPE_NORM: i32 = 0;
pub const LLAMA_ROPE_TYPE_NEOX: i32 = 2;

/// Which dims form a rotating pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// (2i, 2i + 1): llama.cpp's NORM.
    Interleaved,
    /// (i, i + n_rot / 2): NEOX, and the core's `Rope`.
    Halves,
}

/// llama.cpp's RoPE for one head, with a cos/sin table over integer shifts.
pub struct LlamaRope {
    layout: Layout,
    head_dim: usize,
    n_rot: usize,
    /// Per pair: angle per position (freq_scale * base^(-2i/n_rot)).
    step: Vec<f64>,
    /// `[shift][pair] (cos, sin)` for shifts 0..len, grown by `reserve`.
    table: RwLock<Arc<Vec<(f32, f32)>>>,
}

impl LlamaRope {
    /// `rope_type`: llama.cpp's (NORM or NEOX); `n_rot` rotated dims (the
    /// rest pass through); linear `freq_scale` only (YaRN is refused by the
    /// caller).
    pub fn new(
        rope_type: i32,
        head_dim: usize,
        n_rot: usize,
        freq_base: f32,
        freq_scale: f32,
    ) -> Result<Self> {
        let layout = match rope_type {
            LLAMA_ROPE_TYPE_NORM => Layout::Interleaved,
            LLAMA_ROPE_TYPE_NEOX => Layout::Halves,
            t => {
                return Err(Error::config(
                    "hip.rope",
                    format!(
                        "llama.cpp rope type {t}: the RoPE modes support NORM (0) and NEOX (2)"
                    ),
                ))
            }
        };
        if n_rot == 0 || !n_rot.is_multiple_of(2) || n_rot > head_dim {
            return Err(Error::config(
                "hip.rope",
                format!("n_rot {n_rot} must be even and in 2..={head_dim} (head_dim)"),
            ));
        }
        if !(freq_base.is_finite() && freq_base > 1.0 && freq_scale.is_finite() && freq_scale > 0.0)
        {
            return Err(Error::config(
                "hip.rope",
                format!("freq_base {freq_base} / freq_scale {freq_scale}"),
            ));
        }
        let step = (0..n_rot / 2)
            .map(|i| freq_scale as f64 * (freq_base as f64).powf(-2.0 * i as f64 / n_rot as f64))
            .collect();
        Ok(LlamaRope {
            layout,
            head_dim,
            n_rot,
            step,
            table: RwLock::new(Arc::new(Vec::new())),
        })
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn n_rot(&self) -> usize {
        self.n_rot
    }

    /// Make the table cover shifts `-(n-1)..=(n-1)`.
    pub fn reserve(&self, n: usize) {
        if self.table.read().unwrap_or_else(|e| e.into_inner()).len() >= n * self.step.len() {
            return;
        }
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        let have = t.len() / self.step.len().max(1);
        if have >= n {
            return;
        }
        // Grow geometrically so a growing context rebuilds O(log n) times.
        let want = n.max(have * 2).max(1024);
        let mut v = Vec::with_capacity(want * self.step.len());
        for p in 0..want {
            for &w in &self.step {
                let (s, c) = (p as f64 * w).sin_cos();
                v.push((c as f32, s as f32));
            }
        }
        *t = Arc::new(v);
    }

    /// The table as it is now (valid for shifts below `len`).
    pub fn table(&self) -> Arc<Vec<(f32, f32)>> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Rotate every head of `x` (`[heads][head_dim]`) by `shift` positions,
    /// reading cos/sin from `table` (from `table()` after `reserve(|shift|+1)`).
    pub fn rotate_heads(&self, table: &[(f32, f32)], x: &mut [f32], shift: i64) {
        let half = self.step.len();
        let a = shift.unsigned_abs() as usize;
        let cs = &table[a * half..(a + 1) * half];
        let sign = if shift < 0 { -1.0 } else { 1.0 };
        // The layout chosen once, outside the loops, so they vectorise; the
        // same operations per element as `rotate_heads_reference`.
        match self.layout {
            Layout::Interleaved => {
                for h in x.chunks_exact_mut(self.head_dim) {
                    for (p, &(c, s)) in h[..2 * half].chunks_exact_mut(2).zip(cs) {
                        let s = s * sign;
                        let (x0, x1) = (p[0], p[1]);
                        p[0] = x0 * c - x1 * s;
                        p[1] = x0 * s + x1 * c;
                    }
                }
            }
            Layout::Halves => {
                for h in x.chunks_exact_mut(self.head_dim) {
                    let (lo, hi) = h.split_at_mut(half);
                    for ((x0, x1), &(c, s)) in lo.iter_mut().zip(&mut hi[..half]).zip(cs) {
                        let s = s * sign;
                        let (a0, a1) = (*x0, *x1);
                        *x0 = a0 * c - a1 * s;
                        *x1 = a0 * s + a1 * c;
                    }
                }
            }
        }
    }

    /// `rotate_heads` pair by pair with the layout chosen per pair: the
    /// reference it must equal bit for bit.
    pub fn rotate_heads_reference(&self, table: &[(f32, f32)], x: &mut [f32], shift: i64) {
        let half = self.step.len();
        let a = shift.unsigned_abs() as usize;
        let cs = &table[a * half..(a + 1) * half];
        let sign = if shift < 0 { -1.0 } else { 1.0 };
        for h in x.chunks_exact_mut(self.head_dim) {
            for (i, &(c, s)) in cs.iter().enumerate() {
                let s = s * sign;
                let (i0, i1) = match self.layout {
                    Layout::Interleaved => (2 * i, 2 * i + 1),
                    Layout::Halves => (i, i + half),
                };
                let (x0, x1) = (h[i0], h[i1]);
                h[i0] = x0 * c - x1 * s;
                h[i1] = x0 * s + x1 * c;
            }
        }
    }

    /// Rotate one head by any `pos` (f64 angles, no table): the reference
    /// for `rotate_heads` and what tests rotate keys with.
    pub fn rotate_exact(&self, x: &mut [f32], pos: f64) {
        let half = self.step.len();
        for (i, &w) in self.step.iter().enumerate() {
            let (s, c) = (pos * w).sin_cos();
            let (s, c) = (s as f32, c as f32);
            let (i0, i1) = match self.layout {
                Layout::Interleaved => (2 * i, 2 * i + 1),
                Layout::Halves => (i, i + half),
            };
            let (x0, x1) = (x[i0], x[i1]);
            x[i0] = x0 * c - x1 * s;
            x[i1] = x0 * s + x1 * c;
        }
    }

    /// Whether scoring can hand the core halves-layout vectors: the core's
    /// `Rope` rotates the whole head at base^(-2i/head_dim), unscaled.
    pub fn core_compatible(&self, freq_scale: f32) -> bool {
        self.n_rot == self.head_dim && freq_scale == 1.0
    }

    /// Permute one head from llama.cpp's layout to the halves layout.
    pub fn to_halves(&self, x: &[f32], out: &mut [f32]) {
        match self.layout {
            Layout::Halves => out.copy_from_slice(x),
            Layout::Interleaved => {
                let half = self.head_dim / 2;
                for i in 0..half {
                    out[i] = x[2 * i];
                    out[i + half] = x[2 * i + 1];
                }
            }
        }
    }
}

impl LlamaRope {
    /// `to_halves` of an f16 row (converted to f32 first): what the scoring
    /// modes read per key. On x86-64 with AVX2 + F16C, 16 dims per step
    /// (convert, then split even/odd lanes); elsewhere, and for other
    /// shapes, convert then `to_halves`. Both exact (f16 -> f32 is exact, the
    /// permutation moves values), so the results are bit-identical.
    pub fn to_halves_f16(&self, x: &[half::f16], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if self.layout == Layout::Interleaved
                && self.head_dim.is_multiple_of(16)
                && x.len() == self.head_dim
                && out.len() == self.head_dim
                && f16c_avx2()
            {
                // SAFETY: the CPU has AVX2 and F16C; lengths checked above.
                unsafe { deinterleave_f16_avx2(x, out) };
                return;
            }
        }
        self.to_halves_f16_reference(x, out);
    }

    /// Convert, then permute: the reference for `to_halves_f16`.
    pub fn to_halves_f16_reference(&self, x: &[half::f16], out: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        let mut raw = [0f32; 512];
        let raw = &mut raw[..out.len()];
        x.convert_to_f32_slice(raw);
        self.to_halves(raw, out);
    }
}

#[cfg(target_arch = "x86_64")]
fn f16c_avx2() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c"))
}

/// out[i] = x[2i], out[half + i] = x[2i + 1] over an f16 row whose length is
/// a multiple of 16 (8 outputs per half and step).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn deinterleave_f16_avx2(x: &[half::f16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let half = n / 2;
    let src = x.as_ptr() as *const u16;
    let dst = out.as_mut_ptr();
    let mut j = 0;
    while j < n {
        // x[j..j+16] -> a = x[j..j+8], b = x[j+8..j+16] as f32
        let a = _mm256_cvtph_ps(_mm_loadu_si128(src.add(j) as *const __m128i));
        let b = _mm256_cvtph_ps(_mm_loadu_si128(src.add(j + 8) as *const __m128i));
        // per 128-bit lane: evens (a0 a2 b0 b2 | a4 a6 b4 b6), odds likewise
        let ev = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
        let od = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
        // lanes 64-bit order 0, 2, 1, 3: (a0 a2 a4 a6 b0 b2 b4 b6)
        let ev = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(ev)));
        let od = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(od)));
        _mm256_storeu_ps(dst.add(j / 2), ev);
        _mm256_storeu_ps(dst.add(half + j / 2), od);
        j += 16;
    }
}

/// Streaming shift for a run of consecutive chain indices starting at
/// `start` whose first token has rank `rank` among the `n` selected tokens
/// the query at chain index `q_pos` sees: (n - 1 - q_pos) - (rank - start).
pub fn streaming_shift(n: usize, q_pos: usize, rank: usize, start: usize) -> i64 {
    (n as i64 - 1 - q_pos as i64) - (rank as i64 - start as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use infinitehip::rng::Rng;

    /// ggml's rope_f32 formula for one head at position p (NORM or NEOX):
    /// theta_i = p * freq_scale * base^(-2i/n_rot), f32 arithmetic as ggml.
    fn ggml_rope(
        x: &[f32],
        p: i64,
        rope_type: i32,
        n_rot: usize,
        base: f32,
        scale: f32,
    ) -> Vec<f32> {
        let mut out = x.to_vec();
        let theta_scale = base.powf(-2.0 / n_rot as f32);
        let mut theta = p as f32 * scale;
        for i in 0..n_rot / 2 {
            let (c, s) = (theta.cos(), theta.sin());
            let (i0, i1) = if rope_type == LLAMA_ROPE_TYPE_NORM {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + n_rot / 2)
            };
            out[i0] = x[i0] * c - x[i1] * s;
            out[i1] = x[i0] * s + x[i1] * c;
            theta *= theta_scale;
        }
        out
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Un-rotating a key llama.cpp rotated at p and re-rotating it to p'
    /// equals llama.cpp rotating it at p' directly; the table path equals the
    /// exact path; dims past n_rot pass through.
    #[test]
    fn unrotate_then_rotate_equals_direct_rotation() {
        let mut rng = Rng::new(3);
        for (rt, n_rot, scale) in [
            (LLAMA_ROPE_TYPE_NORM, 64, 1.0),
            (LLAMA_ROPE_TYPE_NEOX, 64, 1.0),
            (LLAMA_ROPE_TYPE_NORM, 32, 0.5),
        ] {
            let r = LlamaRope::new(rt, 64, n_rot, 100000.0, scale).unwrap();
            r.reserve(40000);
            let table = r.table();
            for &(p, p2) in &[(0i64, 7i64), (5000, 120), (32000, 8191), (17, 31000)] {
                let x0 = rng.normal_vec(64, 1.0);
                let stored = ggml_rope(&x0, p, rt, n_rot, 100000.0, scale);
                let direct = ggml_rope(&x0, p2, rt, n_rot, 100000.0, scale);
                let mut moved = stored.clone();
                r.rotate_heads(&table, &mut moved, p2 - p);
                // f32 angles in ggml at 32K positions: ~3e-3 absolute.
                let e = max_diff(&moved, &direct);
                assert!(e < 1e-2, "type {rt} n_rot {n_rot} {p}->{p2}: {e}");
                assert_eq!(
                    &moved[n_rot..],
                    &x0[n_rot..],
                    "dims past n_rot must not move"
                );
                let mut exact = stored.clone();
                r.rotate_exact(&mut exact, (p2 - p) as f64);
                assert!(max_diff(&moved, &exact) < 1e-5);
                // A wrong shift is far off: the check can fail.
                let mut off = stored.clone();
                r.rotate_heads(&table, &mut off, p2 - p + 1);
                assert!(
                    max_diff(&off, &direct) > 1e-2,
                    "type {rt}: shift by one not detected"
                );
            }
        }
    }

    /// Permuted to the halves layout, an interleaved rotation is the core's
    /// `Rope` rotation: what the scoring modes rely on.
    #[test]
    fn interleaved_permuted_is_core_rope() {
        let mut rng = Rng::new(4);
        let r = LlamaRope::new(LLAMA_ROPE_TYPE_NORM, 64, 64, 100000.0, 1.0).unwrap();
        let core = infinitehip::rope::Rope::new(64, 100000.0);
        let x = rng.normal_vec(64, 1.0);
        let mut a = x.clone();
        r.rotate_exact(&mut a, 1234.0);
        let mut ah = vec![0f32; 64];
        r.to_halves(&a, &mut ah);
        let mut b = vec![0f32; 64];
        r.to_halves(&x, &mut b);
        core.rotate(&mut b, 1234.0);
        // The core keeps f32 frequencies: ~1e-4 at position 1234.
        assert!(max_diff(&ah, &b) < 1e-3, "{}", max_diff(&ah, &b));
        assert!(r.core_compatible(1.0) && !r.core_compatible(0.5));
    }

    /// The AVX2/F16C read of an f16 key row in the halves layout equals
    /// convert-then-permute bit for bit on fresh random rows (NaN, infinities
    /// and subnormals included), for NORM and NEOX and several head sizes.
    #[test]
    fn to_halves_f16_equals_reference() {
        use half::f16;
        let mut rng = Rng::new(5);
        for (rt, d) in [
            (LLAMA_ROPE_TYPE_NORM, 64),
            (LLAMA_ROPE_TYPE_NORM, 128),
            (LLAMA_ROPE_TYPE_NORM, 32),
            (LLAMA_ROPE_TYPE_NORM, 48),
            (LLAMA_ROPE_TYPE_NORM, 40),
            (LLAMA_ROPE_TYPE_NEOX, 64),
        ] {
            let r = LlamaRope::new(rt, d, d, 10000.0, 1.0).unwrap();
            for trial in 0..200 {
                let mut x: Vec<f16> = rng
                    .normal_vec(d, 3.0)
                    .iter()
                    .map(|&v| f16::from_f32(v))
                    .collect();
                if trial == 0 {
                    x[1] = f16::NAN;
                    x[2] = f16::INFINITY;
                    x[3] = f16::from_bits(1); // subnormal
                }
                let (mut a, mut b) = (vec![0f32; d], vec![0f32; d]);
                r.to_halves_f16(&x, &mut a);
                r.to_halves_f16_reference(&x, &mut b);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "type {rt} d {d}");
                // The permutation is not the identity (NORM): a copy fails.
                if rt == LLAMA_ROPE_TYPE_NORM && trial > 0 {
                    let plain: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
                    assert_ne!(bits(&a), bits(&plain));
                    assert_eq!(a[d / 2], x[1].to_f32());
                }
            }
        }
    }

    /// `rotate_heads` (layout chosen outside the loops) equals the per-pair
    /// reference bit for bit on fresh random heads and shifts of both signs,
    /// NORM and NEOX, n_rot below head_dim included.
    #[test]
    fn rotate_heads_equals_reference() {
        let mut rng = Rng::new(6);
        for (rt, d, n_rot) in [
            (LLAMA_ROPE_TYPE_NORM, 64, 64),
            (LLAMA_ROPE_TYPE_NEOX, 64, 64),
            (LLAMA_ROPE_TYPE_NORM, 128, 96),
            (LLAMA_ROPE_TYPE_NEOX, 64, 32),
        ] {
            let r = LlamaRope::new(rt, d, n_rot, 100000.0, 1.0).unwrap();
            r.reserve(20000);
            let table = r.table();
            for _ in 0..200 {
                let shift = rng.below(39999) as i64 - 19999;
                let x = rng.normal_vec(3 * d, 1.0);
                let (mut a, mut b) = (x.clone(), x.clone());
                r.rotate_heads(&table, &mut a, shift);
                r.rotate_heads_reference(&table, &mut b, shift);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&a),
                    bits(&b),
                    "type {rt} d {d} n_rot {n_rot} shift {shift}"
                );
                if shift != 0 {
                    let mut c = x.clone();
                    r.rotate_heads_reference(&table, &mut c, -shift);
                    assert_ne!(bits(&a), bits(&c), "sign of the shift not detected");
                }
            }
        }
    }

    #[test]
    fn bad_rope_parameters_are_refused() {
        assert!(LlamaRope::new(8, 64, 64, 1e4, 1.0).is_err());
        assert!(LlamaRope::new(0, 64, 65, 1e4, 1.0).is_err());
        assert!(LlamaRope::new(0, 64, 0, 1e4, 1.0).is_err());
        assert!(LlamaRope::new(0, 64, 64, f32::NAN, 1.0).is_err());
    }
}
