//! CPU twin of the GPU's fast prefill mask estimator (kernels/hip_fast.cu,
//! `backend::cuda::hip_fast`), chosen by `hip.mask_estimator = "fast"`.
//!
//! Stage 0 ranks the middle's chunks by one representative key each: the
//! mean of the stored keys of chunk a, tokens `sink + a*c .. min(+c, len)`,
//! summed in f32 in token order and rounded once to bf16. As on the GPU,
//! where a representative is computed once per chunk of the sequence, the
//! last chunk of a block's middle averages the whole chunk even where it
//! reaches into the block's window. Later stages score every token of the
//! chunks stage 0 kept, once, and rank sub-chunks by their best token.
//! A score is the max over the block's scoring queries (and the GQA group)
//! of q . k with both operands rounded to bf16 and f32 accumulation; the
//! selection rule (top-k, ties to the earlier chunk, NaN last) is the
//! reference's (`hip::run_stage_with`). The GPU's tensor cores add the same
//! exact bf16 products in another order, so a score may differ by f32
//! rounding and selections can differ at near-ties (`gpu-test
//! --hip-fast-cpu-only` measures how often).

use std::ops::Range;

use half::bf16;

use super::hip::run_stage_with;
use crate::config::HipStage;
use crate::dtype::max_dot_f32;
use crate::kv::KvRead;

fn round_bf16(v: &mut [f32]) {
    v.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32());
}

/// bf16-rounded mean keys (`[n][d]`) of KV head `head`'s stage-0 chunks
/// `0..n` of `c` tokens from `base` (the sink's end), clipped to the cache.
pub(super) fn representatives(
    kv: &dyn KvRead,
    head: usize,
    base: usize,
    c: usize,
    n: usize,
) -> Vec<f32> {
    let (d, len) = (kv.head_dim(), kv.len());
    let mut out = vec![0f32; n * d];
    let mut k = vec![0f32; d];
    for (a, rep) in out.chunks_exact_mut(d).enumerate() {
        let lo = base + a * c;
        let hi = (lo + c).min(len);
        for t in lo..hi {
            kv.read_key(head, t, &mut k);
            rep.iter_mut().zip(&k).for_each(|(s, x)| *s += x);
        }
        if hi > lo {
            let cnt = (hi - lo) as f32;
            rep.iter_mut().for_each(|s| *s /= cnt);
        }
        round_bf16(rep);
    }
    out
}

/// Scores of every token of stage 0's kept ranges (ascending, disjoint).
struct TokenScores {
    ranges: Vec<Range<usize>>,
    offsets: Vec<usize>,
    scores: Vec<f32>,
}

impl TokenScores {
    fn new(kv: &dyn KvRead, head: usize, q: &[f32], ranges: &[Range<usize>]) -> Self {
        let d = kv.head_dim();
        let mut offsets = Vec::with_capacity(ranges.len());
        let mut scores = Vec::new();
        let mut k = vec![0f32; d];
        for r in ranges {
            offsets.push(scores.len());
            for t in r.clone() {
                kv.read_key(head, t, &mut k);
                round_bf16(&mut k);
                scores.push(max_dot_f32(q, &k));
            }
        }
        TokenScores {
            ranges: ranges.to_vec(),
            offsets,
            scores,
        }
    }

    /// Best token score in `c`, which lies inside one of the ranges (NaN
    /// scores lose to anything, as `fmaxf` on the GPU).
    fn best(&self, c: &Range<usize>) -> f32 {
        let i = self.ranges.partition_point(|r| r.start <= c.start) - 1;
        let (r, o) = (&self.ranges[i], self.offsets[i]);
        debug_assert!(c.end <= r.end);
        self.scores[o + c.start - r.start..o + c.end - r.start]
            .iter()
            .fold(f32::NEG_INFINITY, |m, &x| m.max(x))
    }
}

/// The fast estimator's kept middle ranges for one (query block, KV head):
/// `qs` the block's scoring queries (f32, rounded here), `reps` the head's
/// `representatives` from `mid.start`.
pub(super) fn select_middle(
    kv: &dyn KvRead,
    head: usize,
    stages: &[HipStage],
    qs: &[f32],
    reps: &[f32],
    mid: Range<usize>,
) -> Vec<Range<usize>> {
    let d = kv.head_dim();
    let mut q = qs.to_vec();
    round_bf16(&mut q);
    let (base, c0) = (mid.start, stages[0].chunk_size);
    let mut cur = run_stage_with(std::slice::from_ref(&mid), &stages[0], |chunks| {
        chunks
            .iter()
            .map(|ch| {
                let a = (ch.start - base) / c0;
                max_dot_f32(&q, &reps[a * d..(a + 1) * d])
            })
            .collect()
    });
    if stages.len() == 1 {
        return cur;
    }
    let toks = TokenScores::new(kv, head, &q, &cur);
    for st in &stages[1..] {
        cur = run_stage_with(&cur, st, |chunks| {
            chunks.iter().map(|ch| toks.best(ch)).collect()
        });
    }
    cur
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::SeqView;
    use crate::rng::Rng;

    #[test]
    fn representative_is_rounded_mean_clipped_to_cache() {
        let (len, d) = (10, 4);
        let mut rng = Rng::new(1);
        let k = rng.normal_vec(len * d, 1.0);
        let view = SeqView::from_contiguous(1, d, len, &k, &k);
        // Chunks of 4 from token 2: 2..6, 6..10, 10..10 (empty).
        let reps = representatives(&view, 0, 2, 4, 3);
        for (a, (lo, hi)) in [(2usize, 6usize), (6, 10)].into_iter().enumerate() {
            for j in 0..d {
                let mut s = 0f32;
                for t in lo..hi {
                    s += k[t * d + j];
                }
                let want = bf16::from_f32(s / (hi - lo) as f32).to_f32();
                assert_eq!(reps[a * d + j], want, "chunk {a} dim {j}");
            }
        }
        assert!(reps[2 * d..].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn token_scores_best_finds_range_and_ignores_nan() {
        let ts = TokenScores {
            ranges: vec![2..5, 9..12],
            offsets: vec![0, 3],
            scores: vec![1.0, f32::NAN, 3.0, 0.5, 7.0, -1.0],
        };
        assert_eq!(ts.best(&(2..4)), 1.0);
        assert_eq!(ts.best(&(3..5)), 3.0);
        assert_eq!(ts.best(&(10..12)), 7.0);
        assert_eq!(ts.best(&(3..4)), f32::NEG_INFINITY);
    }
}
