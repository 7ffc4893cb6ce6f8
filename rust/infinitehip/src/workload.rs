//! Synthetic long-context attention workloads for tests and benchmarks.
//!
//! Random keys (unit variance) hide one planted "needle" block per KV head:
//! keys aligned with that head's query direction so their logits sit about
//! `needle_logit` above the noise, as a relevant passage does in a real
//! model. The q heads of a GQA group share the direction plus noise.

use crate::attention::AttnShape;
use crate::dtype::Element;
use crate::error::Result;
use crate::kv::{KvLayout, KvPool};
use crate::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Needle {
    pub start: usize,
    pub len: usize,
}

pub struct NeedleSeq<T: Element> {
    pub pool: KvPool<T>,
    pub seq: u64,
    /// One needle per KV head.
    pub needles: Vec<Needle>,
    /// Unit query direction per KV head, `[n_kv_heads][d]`.
    pub dirs: Vec<f32>,
    pub shape: AttnShape,
    pub needle_logit: f32,
}

/// Fast unit-variance noise: uniform in [-sqrt3, sqrt3).
#[inline]
fn fill_uniform(rng: &mut Rng, out: &mut [f32], scale: f32) {
    let s = 3f32.sqrt() * scale;
    for pair in out.chunks_mut(2) {
        let r = rng.next_u64();
        for (i, x) in pair.iter_mut().enumerate() {
            let bits = (r >> (32 * i)) as u32;
            *x = (bits as f32 * (2.0 / 4294967296.0) - 1.0) * s;
        }
    }
}

/// Build a sequence of `len` tokens with one needle of `needle_len` tokens
/// per KV head, placed uniformly in `sink..len - window - needle_len` at a
/// multiple of `needle_len` (a block of the KV block grid: an unaligned
/// needle's edge tokens can fall in sub-chunks whose probes miss them).
pub fn needle_seq<T: Element>(
    shape: AttnShape,
    len: usize,
    needle_len: usize,
    sink: usize,
    window: usize,
    page_size: usize,
    seed: u64,
) -> Result<NeedleSeq<T>> {
    let (hkv, d) = (shape.n_kv_heads, shape.head_dim);
    let mut rng = Rng::new(seed);
    let mut dirs = vec![0f32; hkv * d];
    for h in 0..hkv {
        let v = &mut dirs[h * d..(h + 1) * d];
        rng.fill_normal(v, 1.0);
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n);
    }
    let lo = sink.min(len);
    let hi = len.saturating_sub(window + needle_len).max(lo + 1);
    let needles: Vec<Needle> = (0..hkv)
        .map(|_| Needle {
            start: (lo + rng.below(hi - lo)).div_ceil(needle_len.max(1)) * needle_len.max(1),
            len: needle_len,
        })
        .collect();
    let needle_logit = 14.0;
    let mut pool = KvPool::new(
        KvLayout {
            n_kv_heads: hkv,
            head_dim: d,
            page_size,
        },
        None,
    )?;
    pool.add_sequence(0)?;
    let chunk = 16384;
    let mut kf = vec![0f32; chunk * hkv * d];
    let mut vf = vec![0f32; chunk * hkv * d];
    let mut t0 = 0;
    while t0 < len {
        let n = chunk.min(len - t0);
        let (kb, vb) = (&mut kf[..n * hkv * d], &mut vf[..n * hkv * d]);
        fill_uniform(&mut rng, kb, 1.0);
        fill_uniform(&mut rng, vb, 1.0);
        for (h, nd) in needles.iter().enumerate() {
            let (s, e) = (nd.start.max(t0), (nd.start + nd.len).min(t0 + n));
            for t in s..e {
                let row = &mut kb[((t - t0) * hkv + h) * d..((t - t0) * hkv + h + 1) * d];
                for (x, u) in row.iter_mut().zip(&dirs[h * d..(h + 1) * d]) {
                    *x = *x * 0.5 + u * needle_logit;
                }
            }
        }
        let kt: Vec<T> = kb.iter().map(|&x| T::from_f32(x)).collect();
        let vt: Vec<T> = vb.iter().map(|&x| T::from_f32(x)).collect();
        pool.append(0, &kt, &vt)?;
        t0 += n;
    }
    Ok(NeedleSeq {
        pool,
        seq: 0,
        needles,
        dirs,
        shape,
        needle_logit,
    })
}

impl<T: Element> NeedleSeq<T> {
    /// A decode query `[n_q_heads][d]`: each head is its group's direction
    /// scaled to norm sqrt(d), plus noise.
    pub fn query(&self, rng: &mut Rng) -> Vec<f32> {
        let (g, d) = (self.shape.group(), self.shape.head_dim);
        let mut q = vec![0f32; self.shape.q_elems()];
        fill_uniform(rng, &mut q, 0.3);
        let s = (d as f32).sqrt();
        for hq in 0..self.shape.n_q_heads {
            let u = &self.dirs[(hq / g) * d..(hq / g + 1) * d];
            for (x, ui) in q[hq * d..(hq + 1) * d].iter_mut().zip(u) {
                *x += ui * s;
            }
        }
        q
    }

    /// Append one random (non-needle) token, as a decode step does.
    pub fn append_random(&mut self, rng: &mut Rng) -> Result<()> {
        let te = self.shape.n_kv_heads * self.shape.head_dim;
        let mut k = vec![0f32; te];
        let mut v = vec![0f32; te];
        fill_uniform(rng, &mut k, 1.0);
        fill_uniform(rng, &mut v, 1.0);
        let kt: Vec<T> = k.iter().map(|&x| T::from_f32(x)).collect();
        let vt: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
        self.pool.append(self.seq, &kt, &vt)
    }

    /// Fraction of needle tokens (over all KV heads) inside `sel`.
    pub fn recall(&self, sel: &crate::policy::Selection) -> f64 {
        let mut hit = 0usize;
        let mut total = 0usize;
        for (h, nd) in self.needles.iter().enumerate() {
            for t in nd.start..nd.start + nd.len {
                hit += sel.contains(h, t) as usize;
                total += 1;
            }
        }
        hit as f64 / total.max(1) as f64
    }
}
