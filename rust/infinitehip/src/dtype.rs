//! Storage element types. KV is stored as f32, f16 or bf16; every kernel
//! accumulates in f32.

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    Bf16,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }
    pub fn parse(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(DType::F32),
            "f16" | "float16" | "half" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::Bf16),
            _ => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A storage element: plain old data convertible to and from f32.
pub trait Element: Copy + Send + Sync + Default + PartialEq + std::fmt::Debug + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    /// Raw bits, for bit-exact round-trip checks.
    fn to_bits_u32(self) -> u32;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_bits_u32(self) -> u32 {
        self.to_bits()
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn to_bits_u32(self) -> u32 {
        self.to_bits() as u32
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_bits_u32(self) -> u32 {
        self.to_bits() as u32
    }
}

/// Dot product of an f32 query with a stored row, accumulated in f32 with
/// several independent partial sums so the compiler can vectorise it.
/// Always inlined, so `max_dot_f32`'s AVX2 copy vectorises it too (the
/// same lanes and sum order at any vector width: the same bits).
#[inline(always)]
pub fn dot_f32<T: Element>(q: &[f32], k: &[T]) -> f32 {
    debug_assert_eq!(q.len(), k.len());
    let mut acc = [0f32; 8];
    let chunks = q.len() / 8;
    for c in 0..chunks {
        let qs = &q[c * 8..c * 8 + 8];
        let ks = &k[c * 8..c * 8 + 8];
        for i in 0..8 {
            acc[i] += qs[i] * ks[i].to_f32();
        }
    }
    let mut s = 0f32;
    for i in chunks * 8..q.len() {
        s += q[i] * k[i].to_f32();
    }
    acc.iter().sum::<f32>() + s
}

/// Max over the rows of `qs` (`[n][k.len()]`) of `dot_f32(row, k)`, bit for
/// bit; the loop is compiled for AVX2 as well and picked at run time (the
/// crate is built for the baseline CPU).
pub fn max_dot_f32(qs: &[f32], k: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *AVX2.get_or_init(|| std::is_x86_feature_detected!("avx2")) {
            // SAFETY: the CPU has AVX2.
            return unsafe { max_dot_avx2(qs, k) };
        }
    }
    max_dot_generic(qs, k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn max_dot_avx2(qs: &[f32], k: &[f32]) -> f32 {
    max_dot_generic(qs, k)
}

#[inline(always)]
fn max_dot_generic(qs: &[f32], k: &[f32]) -> f32 {
    let mut best = f32::NEG_INFINITY;
    for q in qs.chunks_exact(k.len()) {
        best = best.max(dot_f32(q, k));
    }
    best
}

/// `out += w * v` with v converted to f32.
#[inline]
pub fn axpy_f32<T: Element>(out: &mut [f32], w: f32, v: &[T]) {
    debug_assert_eq!(out.len(), v.len());
    for (o, x) in out.iter_mut().zip(v) {
        *o += w * x.to_f32();
    }
}
