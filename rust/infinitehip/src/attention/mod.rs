//! Attention on the CPU: a multithreaded block-sparse kernel (dense attention
//! is the same kernel over every token) and an f64 reference for tests.

pub(crate) mod cpu;
pub mod reference;

pub use cpu::{decode, decode_with, prefill, prefill_with};

use crate::error::{Error, Result};

/// Head geometry of one attention layer. `n_q_heads = g * n_kv_heads` (GQA).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnShape {
    pub n_q_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Softmax scale, usually 1/sqrt(head_dim).
    pub scale: f32,
}

impl AttnShape {
    pub fn new(n_q_heads: usize, n_kv_heads: usize, head_dim: usize) -> Result<Self> {
        let s = AttnShape {
            n_q_heads,
            n_kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
        };
        s.validate()?;
        Ok(s)
    }
    pub fn group(&self) -> usize {
        self.n_q_heads / self.n_kv_heads
    }
    pub fn q_elems(&self) -> usize {
        self.n_q_heads * self.head_dim
    }
    pub fn validate(&self) -> Result<()> {
        if self.n_kv_heads == 0 || self.n_q_heads == 0 || self.n_q_heads % self.n_kv_heads != 0 {
            return Err(Error::Invalid(format!(
                "n_q_heads ({}) must be a non-zero multiple of n_kv_heads ({})",
                self.n_q_heads, self.n_kv_heads
            )));
        }
        if self.head_dim == 0 || self.head_dim > 512 {
            return Err(Error::Invalid(format!(
                "head_dim {} out of range 1..=512",
                self.head_dim
            )));
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(Error::Invalid(format!(
                "softmax scale {} must be finite and > 0",
                self.scale
            )));
        }
        Ok(())
    }
}

/// Relative error ||a - b|| / ||b|| (b the reference). NaN anywhere gives NaN.
pub fn rel_error(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let d = x as f64 - y;
        num += d * d;
        den += y * y;
    }
    if num.is_nan() || den.is_nan() {
        return f64::NAN;
    }
    (num / den.max(1e-300)).sqrt()
}
