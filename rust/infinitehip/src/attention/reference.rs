//! Plain f64 attention: the ground truth every fast path is compared against.

use super::AttnShape;
use crate::kv::KvRead;
use crate::policy::Selection;

/// `out = softmax(scores) . V[toks]` for KV head `h`, in f64 (`out` is
/// added to; all zero when `toks` is empty). The tail every f64 reference
/// shares once it has its tokens and scaled scores.
pub fn softmax_values_f64(
    kv: &dyn KvRead,
    h: usize,
    toks: &[usize],
    scores: &[f64],
    out: &mut [f64],
) {
    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut v = vec![0f32; out.len()];
    let mut l = 0f64;
    for (&t, &s) in toks.iter().zip(scores) {
        let w = (s - m).exp();
        l += w;
        kv.read_value(h, t, &mut v);
        for (o, &x) in out.iter_mut().zip(&v) {
            *o += w * x as f64;
        }
    }
    if l > 0.0 {
        out.iter_mut().for_each(|x| *x /= l);
    }
}

/// One query vector set (`[n_q_heads][d]`) against the tokens of `sel`
/// (or all tokens below `limit`), in f64. `sel` may hold one list per KV
/// head or one per q head (`Selection::q_head_ranges`).
pub fn attend_f64(
    shape: &AttnShape,
    q: &[f32],
    kv: &dyn KvRead,
    sel: Option<&Selection>,
    limit: usize,
) -> Vec<f64> {
    let (g, d) = (shape.group(), shape.head_dim);
    let mut out = vec![0f64; shape.q_elems()];
    let mut k = vec![0f32; d];
    for hq in 0..shape.n_q_heads {
        let h = hq / g;
        let qh = &q[hq * d..(hq + 1) * d];
        let toks: Vec<usize> = (0..limit.min(kv.len()))
            .filter(|&t| sel.is_none_or(|s| s.q_head_contains(hq, shape.n_q_heads, t)))
            .collect();
        let mut scores = Vec::with_capacity(toks.len());
        for &t in &toks {
            kv.read_key(h, t, &mut k);
            let s: f64 = qh.iter().zip(&k).map(|(&a, &b)| a as f64 * b as f64).sum();
            scores.push(s * shape.scale as f64);
        }
        softmax_values_f64(kv, h, &toks, &scores, &mut out[hq * d..(hq + 1) * d]);
    }
    out
}

/// Causal prefill reference: query i (cache position q_start+i) sees tokens
/// `0..=q_start+i` intersected with its block's selection.
pub fn prefill_f64(
    shape: &AttnShape,
    q: &[f32],
    q_start: usize,
    kv: &dyn KvRead,
    sel: Option<(&[Selection], usize)>,
) -> Vec<f64> {
    let qe = shape.q_elems();
    let n = q.len() / qe;
    let mut out = Vec::with_capacity(q.len());
    for i in 0..n {
        let s = sel.map(|(s, qb)| &s[i / qb]);
        out.extend(attend_f64(
            shape,
            &q[i * qe..(i + 1) * qe],
            kv,
            s,
            q_start + i + 1,
        ));
    }
    out
}

/// Streaming-position reference: every selected key visible to the query
/// (tokens below `limit`) is re-rotated individually from its position t to
/// its rank among them; the query moves from `q_pos` to (count - 1).
pub fn attend_streaming_f64(
    shape: &AttnShape,
    rope: &crate::rope::Rope,
    q: &[f32],
    kv: &dyn KvRead,
    sel: &Selection,
    limit: usize,
    q_pos: usize,
) -> Vec<f64> {
    let (g, d) = (shape.group(), shape.head_dim);
    let mut out = vec![0f64; shape.q_elems()];
    let mut k = vec![0f32; d];
    for hq in 0..shape.n_q_heads {
        let h = hq / g;
        let toks: Vec<usize> = (0..limit.min(kv.len()))
            .filter(|&t| sel.q_head_contains(hq, shape.n_q_heads, t))
            .collect();
        let n = toks.len();
        let mut qh = q[hq * d..(hq + 1) * d].to_vec();
        rope.rotate(&mut qh, n as f64 - 1.0 - q_pos as f64);
        let mut scores = Vec::with_capacity(n);
        for (rank, &t) in toks.iter().enumerate() {
            kv.read_key(h, t, &mut k);
            rope.rotate(&mut k, rank as f64 - t as f64);
            let s: f64 = qh.iter().zip(&k).map(|(&a, &b)| a as f64 * b as f64).sum();
            scores.push(s * shape.scale as f64);
        }
        softmax_values_f64(kv, h, &toks, &scores, &mut out[hq * d..(hq + 1) * d]);
    }
    out
}
