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
