//! Rotary position embedding (Llama layout: dimension i pairs with i + d/2).
//! Rotations compose, so a key stored rotated at position p moves to p' by
//! rotating it by p' - p: every RoPE mode re-rotates stored keys this way.

/// Inverse frequencies for one head dimension.
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f32) -> Self {
        assert!(head_dim.is_multiple_of(2), "RoPE needs an even head_dim");
        let half = head_dim / 2;
        Rope {
            inv_freq: (0..half)
                .map(|i| 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32))
                .collect(),
        }
    }

    pub fn head_dim(&self) -> usize {
        self.inv_freq.len() * 2
    }

    /// The inverse frequencies (`head_dim / 2` values, f32 as `rotate`
    /// uses them): what the GPU kernels rotate with.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Rotate `x` (one head, `head_dim` values) by position `pos` (may be
    /// negative or fractional: a relative move). Angles in f64 so positions in
    /// the millions stay exact.
    pub fn rotate(&self, x: &mut [f32], pos: f64) {
        let half = self.inv_freq.len();
        debug_assert_eq!(x.len(), 2 * half);
        for i in 0..half {
            let a = pos * self.inv_freq[i] as f64;
            let (s, c) = (a.sin() as f32, a.cos() as f32);
            let (x0, x1) = (x[i], x[i + half]);
            x[i] = x0 * c - x1 * s;
            x[i + half] = x1 * c + x0 * s;
        }
    }

    /// Rotate every head of `x` (`[heads][head_dim]`) to position `pos`.
    pub fn rotate_heads(&self, x: &mut [f32], pos: f64) {
        for h in x.chunks_mut(self.head_dim()) {
            self.rotate(h, pos);
        }
    }
}

/// How a model stores its rotated keys and queries, for the GPU RoPE
/// modes' re-rotations (`backend::cuda::rope_gpu`): the pair layout and the
/// frequencies (llama.cpp's RoPE parameters on its CUDA route). `RopeGpu`
/// starts from the halves layout at `model.rope_theta`, unscaled
/// (`RopeLayout::halves`). Defined here, outside the `cuda` feature, so
/// hosts test their mapping to it on the CPU.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeLayout {
    /// Pairs (2i, 2i + 1): llama.cpp's NORM (its Llama models). False:
    /// pairs (i, i + d/2), NEOX / the core's `Rope`.
    pub interleaved: bool,
    /// Frequency base (llama.cpp's `freq_base`).
    pub freq_base: f32,
    /// Linear position scale (llama.cpp's `freq_scale`; 1 = none).
    pub freq_scale: f32,
}

impl RopeLayout {
    /// The core's own RoPE: halves layout at `theta`, unscaled.
    pub fn halves(theta: f32) -> Self {
        RopeLayout {
            interleaved: false,
            freq_base: theta,
            freq_scale: 1.0,
        }
    }

    /// The f32 inverse frequencies the kernels rotate with: pair i (dims
    /// (i, i + d/2) or (2i, 2i + 1)) turns by `pos * inv_freq[i]`: the core's
    /// `Rope::new(head_dim, freq_base)` times `freq_scale` (in f32; exactly
    /// the core's when the scale is 1, as the CPU policy rotates).
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        Rope::new(head_dim, self.freq_base)
            .inv_freq()
            .iter()
            .map(|&w| w * self.freq_scale)
            .collect()
    }

    /// The two dims of rotation pair `i` of a `head_dim`-wide head (the
    /// kernels' `pair_lo` / `pair_hi`). Host twin, for tests.
    pub fn pair(&self, i: usize, head_dim: usize) -> (usize, usize) {
        if self.interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + head_dim / 2)
        }
    }

    /// Rotate one head `x` by `pos` as the kernels' `rope_rot` does (f64
    /// angle from the f32 frequency, f32 sin/cos, unfused f32 products).
    /// Host twin, for tests.
    pub fn rotate(&self, inv_freq: &[f32], x: &mut [f32], pos: f64) {
        for (i, &w) in inv_freq.iter().enumerate() {
            let (i0, i1) = self.pair(i, x.len());
            let a = pos * w as f64;
            let (s, c) = (a.sin() as f32, a.cos() as f32);
            let (x0, x1) = (x[i0], x[i1]);
            x[i0] = x0 * c - x1 * s;
            x[i1] = x1 * c + x0 * s;
        }
    }
}

/// Relative scoring's key rotations for one decode step, as a table: row t
/// holds, per pair i, the f32 (cos, sin) of `(t as f64 * factor) *
/// inv_freq[i] as f64`, computed exactly as `Rope::rotate(k, t as f64 *
/// factor)` computes them, so `rotate` gives bit-identical keys. The factor
/// depends only on the query position (`relative_key_factor`), so one table
/// serves every layer and KV head of a step: built once instead of
/// `head_dim / 2` sin/cos pairs per scored key (`Rope::relative_table`).
pub struct RelativeTable {
    inv_freq: Vec<f32>,
    factor: f64,
    len: usize,
    /// `[t][i]` cos, then sin, in separate planes.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// Tables larger than this (entries: tokens x head_dim / 2) are not built;
/// scoring then rotates key by key (`Rope::rotate`), as before.
pub const RELATIVE_TABLE_MAX_ENTRIES: usize = 1 << 23;

/// The last few tables (one per step in flight: sequences at different
/// positions each have theirs).
static RELATIVE_TABLES: std::sync::Mutex<Vec<std::sync::Arc<RelativeTable>>> =
    std::sync::Mutex::new(Vec::new());
const RELATIVE_TABLES_KEPT: usize = 4;

impl RelativeTable {
    /// Tokens covered (rows `0..len`).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// `Rope::rotate(x, t as f64 * factor)`, bit for bit, for `t < len`.
    #[inline]
    pub fn rotate(&self, x: &mut [f32], t: usize) {
        let half = self.inv_freq.len();
        debug_assert_eq!(x.len(), 2 * half);
        let (c, s) = (
            &self.cos[t * half..(t + 1) * half],
            &self.sin[t * half..(t + 1) * half],
        );
        let (lo, hi) = x.split_at_mut(half);
        for i in 0..half {
            let (x0, x1) = (lo[i], hi[i]);
            lo[i] = x0 * c[i] - x1 * s[i];
            hi[i] = x1 * c[i] + x0 * s[i];
        }
    }

    /// `recycle`: an old table's planes to fill (saves the page faults of
    /// fresh 2 x len x head_dim / 2 floats every step).
    fn build(inv_freq: &[f32], factor: f64, len: usize, recycle: Option<Self>) -> Self {
        let half = inv_freq.len();
        const ROWS: usize = 1024;
        let (mut cos, mut sin) = match recycle {
            Some(t) => (t.cos, t.sin),
            None => (Vec::new(), Vec::new()),
        };
        cos.resize(len * half, 0.0);
        sin.resize(len * half, 0.0);
        // Blocks of rows filled in parallel, each into its own slices.
        let blocks: Vec<std::sync::Mutex<(&mut [f32], &mut [f32])>> = cos
            .chunks_mut(ROWS * half)
            .zip(sin.chunks_mut(ROWS * half))
            .map(std::sync::Mutex::new)
            .collect();
        crate::parallel::par_for(blocks.len(), |b| {
            let mut g = blocks[b].lock().unwrap_or_else(|e| e.into_inner());
            let (c, s) = &mut *g;
            for (r, (cr, sr)) in c
                .chunks_exact_mut(half)
                .zip(s.chunks_exact_mut(half))
                .enumerate()
            {
                // The same expressions as `Rope::rotate(k, t as f64 * factor)`.
                let pos = (b * ROWS + r) as f64 * factor;
                for ((cv, sv), &w) in cr.iter_mut().zip(sr.iter_mut()).zip(inv_freq) {
                    let a = pos * w as f64;
                    *sv = a.sin() as f32;
                    *cv = a.cos() as f32;
                }
            }
        });
        drop(blocks);
        RelativeTable {
            inv_freq: inv_freq.to_vec(),
            factor,
            len,
            cos,
            sin,
        }
    }
}

impl Rope {
    /// The relative-scoring table for `factor` covering tokens `0..len`,
    /// shared (process-wide) by every `Rope` with the same frequencies: the
    /// first caller of a step builds it, the other layers reuse it. None
    /// when it would exceed `RELATIVE_TABLE_MAX_ENTRIES`.
    pub fn relative_table(&self, factor: f64, len: usize) -> Option<std::sync::Arc<RelativeTable>> {
        if len.saturating_mul(self.inv_freq.len()) > RELATIVE_TABLE_MAX_ENTRIES {
            return None;
        }
        let hit = |cache: &mut Vec<std::sync::Arc<RelativeTable>>| {
            let i = cache.iter().position(|t| {
                t.factor.to_bits() == factor.to_bits()
                    && t.len >= len
                    && t.inv_freq == self.inv_freq
            })?;
            let t = cache.remove(i);
            cache.push(t.clone());
            Some(t)
        };
        let lock = || RELATIVE_TABLES.lock().unwrap_or_else(|e| e.into_inner());
        // Built outside the lock (the build runs on the worker threads).
        let recycle = {
            let mut cache = lock();
            if let Some(t) = hit(&mut cache) {
                return Some(t);
            }
            (cache.len() >= RELATIVE_TABLES_KEPT)
                .then(|| std::sync::Arc::try_unwrap(cache.remove(0)).ok())
                .flatten()
        };
        let t = std::sync::Arc::new(RelativeTable::build(&self.inv_freq, factor, len, recycle));
        let mut cache = lock();
        if let Some(other) = hit(&mut cache) {
            return Some(other);
        }
        if cache.len() >= RELATIVE_TABLES_KEPT {
            cache.remove(0);
        }
        cache.push(t.clone());
        Some(t)
    }
}

/// Position a key at original position `t` takes in chunk-indexed scoring:
/// its chunk's index, so a whole chunk shares one position.
pub fn chunk_indexed_position(t: usize, chunk_size: usize) -> usize {
    t / chunk_size
}

/// Rotation of a decode query's scoring copy under `rope.scoring`
/// (`policy/hip.rs` and the GPU decoder share it). `q_pos`: the query's
/// position; `middle_end`: end of its middle region; `chunk_size`: the
/// stage's. None: the query scores as stored (original mode, or relative
/// below the trained length).
pub fn score_query_shift(
    mode: crate::config::RopeMode,
    q_pos: usize,
    middle_end: usize,
    chunk_size: usize,
    max_position: usize,
) -> Option<f64> {
    use crate::config::RopeMode;
    match mode {
        // The query moves to just after the last chunk index.
        RopeMode::ChunkIndexed => Some(middle_end.div_ceil(chunk_size) as f64 - q_pos as f64),
        // Beyond the trained length the query sits at the last trained
        // position (and key positions shrink: `relative_key_factor`).
        RopeMode::Relative if q_pos >= max_position => {
            Some((max_position as f64 - 1.0) - q_pos as f64)
        }
        _ => None,
    }
}

/// Relative scoring's key factor: key t scores rotated by `t * factor`
/// (`factor = max_position / q_pos - 1`); None below the trained length.
pub fn relative_key_factor(q_pos: usize, max_position: usize) -> Option<f64> {
    (q_pos >= max_position).then(|| max_position as f64 / q_pos as f64 - 1.0)
}

/// Streaming attention with the query kept as stored: the rotation of the
/// key at `pos` that is the `rank`-th of `n` selected tokens, for a query at
/// `q_pos` (`(q_pos - (n - 1)) - (pos - rank)`: the key moves to `rank` and
/// the query to `n - 1`, since rotations compose and only differences
/// count). The GPU decoder's gather (kernels/hip_rope.cu) rotates by this;
/// `attention/cpu.rs` rotates the query the opposite way per range.
pub fn streaming_key_shift(q_pos: usize, n: usize, pos: usize, rank: usize) -> f64 {
    ((q_pos as i64 - (n as i64 - 1)) - (pos as i64 - rank as i64)) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The interleaved layout's rotation (the GPU kernels' `inter` path,
    /// host twin) of a head equals the core's halves rotation of the same
    /// head permuted to halves, bit for bit (pair i has frequency i in
    /// both), on fresh random heads and positions; the halves layout is the
    /// core's `Rope::rotate` itself; a scaled layout is the core's at
    /// position * scale within f32 rounding of the frequency.
    #[test]
    fn layout_rotation_is_the_core_rotation_permuted() {
        let mut rng = Rng::new(41);
        for d in [64usize, 128, 256] {
            let half = d / 2;
            let lay = RopeLayout {
                interleaved: true,
                freq_base: 100000.0,
                freq_scale: 1.0,
            };
            let w = lay.inv_freq(d);
            let core = Rope::new(d, 100000.0);
            assert_eq!(w, core.inv_freq(), "scale 1 must be the core's frequencies");
            for _ in 0..50 {
                let x = rng.normal_vec(d, 1.0);
                let pos = rng.below(200000) as f64 - 100000.0;
                let mut a = x.clone();
                lay.rotate(&w, &mut a, pos);
                let mut h: Vec<f32> = (0..d)
                    .map(|j| {
                        if j < half {
                            x[2 * j]
                        } else {
                            x[2 * (j - half) + 1]
                        }
                    })
                    .collect();
                core.rotate(&mut h, pos);
                for i in 0..half {
                    assert_eq!(a[2 * i].to_bits(), h[i].to_bits(), "d {d} pair {i}");
                    assert_eq!(a[2 * i + 1].to_bits(), h[i + half].to_bits());
                }
                // The halves layout is the core's rotation.
                let mut b = x.clone();
                RopeLayout::halves(100000.0).rotate(&w, &mut b, pos);
                let mut c = x.clone();
                core.rotate(&mut c, pos);
                assert_eq!(b, c);
                // The wrong layout is far off (the check can fail).
                assert!(b.iter().zip(&a).any(|(p, q)| (p - q).abs() > 1e-2));
            }
        }
        let scaled = RopeLayout {
            interleaved: false,
            freq_base: 10000.0,
            freq_scale: 0.25,
        };
        let ws = scaled.inv_freq(64);
        let x = rng.normal_vec(64, 1.0);
        let (mut a, mut b) = (x.clone(), x.clone());
        scaled.rotate(&ws, &mut a, 4000.0);
        Rope::new(64, 10000.0).rotate(&mut b, 1000.0);
        let e = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(e < 1e-3, "{e}");
    }

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn scores_depend_only_on_relative_position_and_rotations_compose() {
        let rope = Rope::new(64, 10000.0);
        let mut rng = Rng::new(1);
        let q0 = rng.normal_vec(64, 1.0);
        let k0 = rng.normal_vec(64, 1.0);
        let score = |pq: f64, pk: f64| {
            let (mut q, mut k) = (q0.clone(), k0.clone());
            rope.rotate(&mut q, pq);
            rope.rotate(&mut k, pk);
            dot(&q, &k)
        };
        assert!((score(100.0, 40.0) - score(1060.0, 1000.0)).abs() < 1e-3);
        assert!((score(100.0, 40.0) - score(100.0, 41.0)).abs() > 1e-4);
        let mut a = k0.clone();
        rope.rotate(&mut a, 700.0);
        rope.rotate(&mut a, -300.0);
        let mut b = k0.clone();
        rope.rotate(&mut b, 400.0);
        let err: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum();
        assert!(err < 1e-3, "{err}");
        // Norm preserved.
        assert!((dot(&a, &a) - dot(&k0, &k0)).abs() < 1e-2);
    }

    /// The table path of relative scoring equals `Rope::rotate` bit for bit
    /// on fresh random keys, for factors of both signs and every row; a
    /// table of another step (factor) or a row off by one differs.
    #[test]
    fn relative_table_is_rotate_bit_for_bit() {
        let mut rng = Rng::new(11);
        for (d, theta) in [(64usize, 100000.0f32), (128, 10000.0), (32, 500000.0)] {
            let rope = Rope::new(d, theta);
            for &(q_pos, max_pos) in &[(16384usize, 8192usize), (8193, 8192), (70001, 4096)] {
                let factor = relative_key_factor(q_pos, max_pos).unwrap();
                let len = q_pos - 1000;
                let tab = rope.relative_table(factor, len).unwrap();
                assert!(tab.len() >= len);
                // Cached: the same Arc for the same step (every layer).
                assert!(std::sync::Arc::ptr_eq(
                    &tab,
                    &rope.relative_table(factor, len - 7).unwrap()
                ));
                let mut ts: Vec<usize> = (0..300).map(|_| rng.below(len)).collect();
                ts.extend([0, 1, len - 1]);
                for t in ts {
                    let k = rng.normal_vec(d, 1.0);
                    let (mut a, mut b) = (k.clone(), k.clone());
                    rope.rotate(&mut a, t as f64 * factor);
                    tab.rotate(&mut b, t);
                    assert!(a.iter().all(|x| x.is_finite()));
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&a), bits(&b), "d {d} q_pos {q_pos} t {t}");
                    if t > 100 {
                        let mut off = k.clone();
                        tab.rotate(&mut off, t - 1);
                        assert_ne!(bits(&a), bits(&off), "row off by one not detected");
                    }
                }
                // Another step's factor: a different table.
                let other = relative_key_factor(q_pos + 1, max_pos).unwrap();
                let tab2 = rope.relative_table(other, len).unwrap();
                assert!(!std::sync::Arc::ptr_eq(&tab, &tab2));
                assert_eq!(tab2.factor().to_bits(), other.to_bits());
            }
        }
        assert!(Rope::new(64, 1e4)
            .relative_table(-0.5, RELATIVE_TABLE_MAX_ENTRIES)
            .is_none());
    }

    #[test]
    fn score_shifts_match_the_modes() {
        use crate::config::RopeMode;
        // chunk_indexed: query to ceil(middle_end / c), whatever q_pos.
        assert_eq!(
            score_query_shift(RopeMode::ChunkIndexed, 9999, 8976, 64, 4096),
            Some(141.0 - 9999.0)
        );
        assert_eq!(
            score_query_shift(RopeMode::ChunkIndexed, 100, 64, 8, 4096),
            Some(8.0 - 100.0)
        );
        // relative: only at or beyond the trained length.
        assert_eq!(
            score_query_shift(RopeMode::Relative, 4095, 3000, 64, 4096),
            None
        );
        assert_eq!(
            score_query_shift(RopeMode::Relative, 4096, 3000, 64, 4096),
            Some(-1.0)
        );
        assert_eq!(
            score_query_shift(RopeMode::Relative, 20000, 3000, 64, 4096),
            Some(4095.0 - 20000.0)
        );
        assert_eq!(
            score_query_shift(RopeMode::Original, 20000, 3000, 64, 4096),
            None
        );
        assert_eq!(relative_key_factor(4095, 4096), None);
        assert_eq!(relative_key_factor(8192, 4096), Some(-0.5));
        // Key t = q_pos lands at max_position (the query's own slot + 1).
        let f = relative_key_factor(20000, 4096).unwrap();
        assert!((20000.0 * (1.0 + f) - 4096.0).abs() < 1e-9);
    }

    #[test]
    fn streaming_key_shift_is_the_query_shift_reversed() {
        // Rotating the key by s equals rotating the query by -s: the CPU
        // kernel's per-range query shift (attention/cpu.rs) must be the
        // negation of every key shift of that range.
        let rope = Rope::new(32, 10000.0);
        let mut rng = Rng::new(3);
        let q0 = rng.normal_vec(32, 1.0);
        let k0 = rng.normal_vec(32, 1.0);
        let ranges = [0..4usize, 90..100, 400..401, 990..1000];
        let n: usize = ranges.iter().map(|r| r.len()).sum();
        let q_pos = 999;
        let q_shifts = crate::attention::cpu::streaming_shifts(&ranges, 0, n, q_pos);
        let mut rank = 0;
        for (r, &q_shift) in ranges.iter().zip(&q_shifts) {
            for (i, t) in r.clone().enumerate() {
                let s = streaming_key_shift(q_pos, n, t, rank + i);
                assert_eq!(s, -q_shift, "token {t}");
                // Scores: query at n - 1 and key at its rank, from vectors
                // stored rotated at q_pos and t.
                let (mut q, mut k) = (q0.clone(), k0.clone());
                rope.rotate(&mut q, q_pos as f64);
                rope.rotate(&mut k, t as f64);
                rope.rotate(&mut k, s);
                let (mut qe, mut ke) = (q0.clone(), k0.clone());
                rope.rotate(&mut qe, n as f64 - 1.0);
                rope.rotate(&mut ke, (rank + i) as f64);
                assert!((dot(&q, &k) - dot(&qe, &ke)).abs() < 1e-3);
            }
            rank += r.len();
        }
        // Everything selected: no rotation.
        assert_eq!(streaming_key_shift(50, 51, 7, 7), 0.0);
    }
}
