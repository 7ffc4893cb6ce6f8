//! Small deterministic random source for synthetic workloads, k-means++
//! seeding and tests (SplitMix64; not for cryptography).

#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
    spare_normal: Option<f32>,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng {
            state: seed ^ 0x9E37_79B9_7F4A_7C15,
            spare_normal: None,
        }
    }
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    #[inline]
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }
    /// Uniform integer in [0, n).
    #[inline]
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() >> 11) as u128 * n as u128 >> 53) as usize
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        let u1 = self.uniform().max(1e-12);
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f32::consts::TAU * u2;
        self.spare_normal = Some(r * t.sin());
        r * t.cos()
    }
    pub fn fill_normal(&mut self, out: &mut [f32], scale: f32) {
        for x in out {
            *x = self.normal() * scale;
        }
    }
    pub fn normal_vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        let mut v = vec![0f32; n];
        self.fill_normal(&mut v, scale);
        v
    }
}
