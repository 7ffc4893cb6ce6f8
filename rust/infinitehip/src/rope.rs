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
}
