//! The CPU kernel. Work items are (sequence or query block, KV head, token
//! split); each computes an online-softmax partial for the whole GQA group so
//! a K/V row is loaded once for all q heads that read it. Partials merge by
//! log-sum-exp.

use std::ops::Range;

use super::AttnShape;
use crate::dtype::{axpy_f32, dot_f32, Element};
use crate::error::{Error, Result};
use crate::kv::SeqView;
use crate::parallel::{par_for, par_map};
use crate::policy::Selection;
use crate::rope::Rope;

/// Tokens per split in decode: keeps every core busy at batch 1.
const SPLIT_TOKENS: usize = 4096;
const TILE: usize = 32;

struct Partial {
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<f32>,
}

impl Partial {
    fn new(g: usize, d: usize) -> Self {
        Partial {
            m: vec![f32::NEG_INFINITY; g],
            l: vec![0.0; g],
            acc: vec![0.0; g * d],
        }
    }

    fn merge(&mut self, o: &Partial, d: usize) {
        for j in 0..self.m.len() {
            if o.l[j] == 0.0 {
                continue;
            }
            let m = self.m[j].max(o.m[j]);
            let (a, b) = ((self.m[j] - m).exp(), (o.m[j] - m).exp());
            self.l[j] = self.l[j] * a + o.l[j] * b;
            for i in 0..d {
                self.acc[j * d + i] = self.acc[j * d + i] * a + o.acc[j * d + i] * b;
            }
            self.m[j] = m;
        }
    }

    /// Normalised output; a query that saw no token gets zeros.
    fn write(&self, d: usize, out: &mut [f32]) {
        for j in 0..self.m.len() {
            let inv = if self.l[j] > 0.0 {
                1.0 / self.l[j]
            } else {
                0.0
            };
            for i in 0..d {
                out[j * d + i] = self.acc[j * d + i] * inv;
            }
        }
    }
}

/// Accumulate the group's queries `qs` (`[g][d]`, already scaled) over
/// `ranges` of KV head `head`.
fn attend<T: Element>(
    qs: &[f32],
    g: usize,
    d: usize,
    kv: &SeqView<'_, T>,
    head: usize,
    ranges: &[Range<usize>],
    rot: Option<(&Rope, &[f64])>,
    p: &mut Partial,
) {
    let mut qbuf = Vec::new();
    let mut s = [0f32; TILE * 8];
    let mut scores = vec![0f32; g * TILE];
    let scores = if g <= 8 {
        &mut s[..g * TILE]
    } else {
        &mut scores[..]
    };
    for (ri, r) in ranges.iter().enumerate() {
        // Streaming positions: rotating every key of a range by the same shift
        // equals rotating the queries the other way, once per range.
        let qs: &[f32] = match rot {
            Some((rope, shifts)) => {
                qbuf.clear();
                qbuf.extend_from_slice(qs);
                rope.rotate_heads(&mut qbuf, shifts[ri]);
                &qbuf
            }
            None => qs,
        };
        kv.for_each_run(head, r.start, r.end, |_, ks, vs| {
            let n = ks.len() / d;
            let mut t0 = 0;
            while t0 < n {
                let tn = TILE.min(n - t0);
                for j in 0..g {
                    let q = &qs[j * d..(j + 1) * d];
                    let mut mx = f32::NEG_INFINITY;
                    for t in 0..tn {
                        let sc = dot_f32(q, &ks[(t0 + t) * d..(t0 + t + 1) * d]);
                        scores[j * TILE + t] = sc;
                        mx = mx.max(sc);
                    }
                    let m_new = p.m[j].max(mx);
                    let corr = (p.m[j] - m_new).exp();
                    if corr != 1.0 {
                        p.l[j] *= corr;
                        for a in &mut p.acc[j * d..(j + 1) * d] {
                            *a *= corr;
                        }
                    }
                    p.m[j] = m_new;
                    let acc = &mut p.acc[j * d..(j + 1) * d];
                    for t in 0..tn {
                        let w = (scores[j * TILE + t] - m_new).exp();
                        p.l[j] += w;
                        axpy_f32(acc, w, &vs[(t0 + t) * d..(t0 + t + 1) * d]);
                    }
                }
                t0 += tn;
            }
        });
    }
}

/// Streaming positions: the selected tokens (in order) take positions
/// 0..n and the query takes n - 1 (it is the last selected token). For a
/// query stored rotated at `q_pos`, the rotation to apply to it against each
/// range: (n - 1 - q_pos) - (rank(start) - start). `rank0`: selected tokens
/// before `ranges[0]`; `n`: selected tokens visible to the query.
pub(crate) fn streaming_shifts(
    ranges: &[Range<usize>],
    rank0: usize,
    n: usize,
    q_pos: usize,
) -> Vec<f64> {
    let mut rank = rank0;
    ranges
        .iter()
        .map(|r| {
            let x = (n as f64 - 1.0 - q_pos as f64) - (rank as f64 - r.start as f64);
            rank += r.len();
            x
        })
        .collect()
}

/// Cut sorted ranges into pieces of at most `split` tokens.
fn split_ranges(ranges: &[Range<usize>], split: usize) -> Vec<Vec<Range<usize>>> {
    let mut out = vec![Vec::new()];
    let mut filled = 0;
    for r in ranges {
        let mut s = r.start;
        while s < r.end {
            if filled == split {
                out.push(Vec::new());
                filled = 0;
            }
            let e = r.end.min(s + split - filled);
            out.last_mut().unwrap().push(s..e);
            filled += e - s;
            s = e;
        }
    }
    out
}

/// A selection holds one range list per KV head or (hip `per_q_head`) one
/// per q head; anything else is refused.
fn check_sel(sel: &Selection, shape: &AttnShape, len: usize, what: &str) -> Result<()> {
    if sel.q_heads_per_list(shape).is_none() {
        return Err(Error::shape(
            format!("{what} selection heads (per KV head or per q head)"),
            format!("{} or {}", shape.n_kv_heads, shape.n_q_heads),
            sel.n_kv_heads(),
        ));
    }
    for rs in &sel.heads {
        if let Some(r) = rs.last() {
            if r.end > len {
                return Err(Error::OutOfRange(format!(
                    "{what} selection reaches token {} of a {len}-token sequence",
                    r.end
                )));
            }
        }
    }
    Ok(())
}

/// Decode attention for a batch of sequences of different lengths.
/// `q`: `[batch][n_q_heads][head_dim]`; `sel`: one selection per sequence, or
/// None for dense. Writes `out` (same shape as q).
pub fn decode<T: Element>(
    shape: &AttnShape,
    q: &[f32],
    kvs: &[SeqView<'_, T>],
    sel: Option<&[Selection]>,
    out: &mut [f32],
) -> Result<()> {
    decode_with(shape, q, kvs, sel, None, out)
}

/// `decode` with an optional streaming-position RoPE (DESIGN 3.1): selected
/// tokens are renumbered 0..n in order and the query sits at n - 1, so no
/// distance exceeds the selection size. Keys and queries must be stored
/// rotated with `rope` at their original positions.
pub fn decode_with<T: Element>(
    shape: &AttnShape,
    q: &[f32],
    kvs: &[SeqView<'_, T>],
    sel: Option<&[Selection]>,
    streaming: Option<&Rope>,
    out: &mut [f32],
) -> Result<()> {
    shape.validate()?;
    let (g, d, hkv) = (shape.group(), shape.head_dim, shape.n_kv_heads);
    let b = kvs.len();
    if q.len() != b * shape.q_elems() || out.len() != q.len() {
        return Err(Error::shape(
            "decode q/out",
            format!("{b} x {} elements", shape.q_elems()),
            format!("q {}, out {}", q.len(), out.len()),
        ));
    }
    for (i, kv) in kvs.iter().enumerate() {
        if kv.layout().n_kv_heads != hkv || kv.layout().head_dim != d {
            return Err(Error::shape(
                format!("KV of sequence {i}"),
                format!("{hkv} heads x {d}"),
                format!(
                    "{} heads x {}",
                    kv.layout().n_kv_heads,
                    kv.layout().head_dim
                ),
            ));
        }
    }
    let dense: Vec<Selection>;
    let sel = match sel {
        Some(s) => {
            if s.len() != b {
                return Err(Error::shape("decode selections", b, s.len()));
            }
            for (i, (x, kv)) in s.iter().zip(kvs).enumerate() {
                check_sel(x, shape, kv.len(), &format!("sequence {i}"))?;
            }
            s
        }
        None => {
            dense = kvs
                .iter()
                .map(|kv| Selection::full(hkv, kv.len()))
                .collect();
            &dense
        }
    };
    let qs: Vec<f32> = q.iter().map(|x| x * shape.scale).collect();
    let qe = shape.q_elems();
    // Work items: (sequence, list, split). A list is a KV head (its `nq` = g
    // q heads share the loads) or, per q head, one q head (`nq` = 1) of KV
    // head `list * nq / g`. Its q heads are `list * nq..(list + 1) * nq`.
    let mut items = Vec::new();
    let mut slot0 = Vec::with_capacity(b);
    let mut n_slots = 0;
    for bi in 0..b {
        let lists = sel[bi].heads.len();
        let nq = shape.n_q_heads / lists;
        slot0.push(n_slots);
        n_slots += lists;
        for u in 0..lists {
            let total = sel[bi].token_count(u);
            let mut rank = 0;
            for piece in split_ranges(&sel[bi].heads[u], SPLIT_TOKENS) {
                let shifts =
                    streaming.map(|_| streaming_shifts(&piece, rank, total, kvs[bi].len() - 1));
                rank += piece.iter().map(|r| r.len()).sum::<usize>();
                items.push((bi, u, nq, piece, shifts));
            }
        }
    }
    let partials = par_map(items.len(), |i| {
        let (bi, u, nq, ref piece, ref shifts) = items[i];
        let mut p = Partial::new(nq, d);
        let qo = bi * qe + u * nq * d;
        let rot = streaming.zip(shifts.as_deref());
        attend(
            &qs[qo..qo + nq * d],
            nq,
            d,
            &kvs[bi],
            u * nq / g,
            piece,
            rot,
            &mut p,
        );
        p
    });
    let mut merged: Vec<Option<(usize, Partial)>> = (0..n_slots).map(|_| None).collect();
    for ((bi, u, nq, _, _), p) in items.iter().zip(partials) {
        let slot = &mut merged[slot0[*bi] + u];
        match slot {
            Some((_, m)) => m.merge(&p, d),
            None => *slot = Some((bi * qe + u * nq * d, p)),
        }
    }
    for m in merged {
        let (o, p) = m.expect("every (seq, list) has a split");
        let n = p.m.len() * d;
        p.write(d, &mut out[o..o + n]);
    }
    Ok(())
}

/// Causal prefill over one sequence whose KV already holds the new tokens.
/// `q`: `[n][n_q_heads][head_dim]` for cache positions `q_start..q_start+n`.
/// `sel`: (selections, q_block) with one selection per block of `q_block`
/// queries, or None for dense. Each query also stops at its own position.
pub fn prefill<T: Element>(
    shape: &AttnShape,
    q: &[f32],
    q_start: usize,
    kv: &SeqView<'_, T>,
    sel: Option<(&[Selection], usize)>,
    out: &mut [f32],
) -> Result<()> {
    prefill_with(shape, q, q_start, kv, sel, None, out)
}

/// `prefill` with optional streaming positions (see `decode_with`): each
/// query renumbers the selected tokens it can see.
pub fn prefill_with<T: Element>(
    shape: &AttnShape,
    q: &[f32],
    q_start: usize,
    kv: &SeqView<'_, T>,
    sel: Option<(&[Selection], usize)>,
    streaming: Option<&Rope>,
    out: &mut [f32],
) -> Result<()> {
    shape.validate()?;
    let (g, d, hkv) = (shape.group(), shape.head_dim, shape.n_kv_heads);
    let qe = shape.q_elems();
    if q.len() % qe != 0 || out.len() != q.len() {
        return Err(Error::shape(
            "prefill q/out",
            format!("n x {qe} elements"),
            format!("q {}, out {}", q.len(), out.len()),
        ));
    }
    let n = q.len() / qe;
    if q_start + n > kv.len() {
        return Err(Error::OutOfRange(format!(
            "prefill queries at {q_start}..{} but the KV holds {} tokens (append K/V first)",
            q_start + n,
            kv.len()
        )));
    }
    let (sels, qb) = match sel {
        Some((s, qb)) => {
            if qb == 0 || s.len() != n.div_ceil(qb) {
                return Err(Error::shape(
                    "prefill selections (one per query block)",
                    n.div_ceil(qb.max(1)),
                    s.len(),
                ));
            }
            for (i, x) in s.iter().enumerate() {
                check_sel(x, shape, kv.len(), &format!("query block {i}"))?;
            }
            (Some(s), qb)
        }
        None => (None, 64),
    };
    let n_blocks = n.div_ceil(qb);
    let qs: Vec<f32> = q.iter().map(|x| x * shape.scale).collect();
    let out_ptr = SyncPtr(out.as_mut_ptr());
    // Work items (block, list): a list is a KV head, or one q head of a
    // per-q-head selection (see `decode_with`).
    let lists_of = |blk: usize| sels.map_or(hkv, |s| s[blk].heads.len());
    let items: Vec<(usize, usize)> = (0..n_blocks)
        .flat_map(|blk| (0..lists_of(blk)).map(move |u| (blk, u)))
        .collect();
    par_for(items.len(), |item| {
        let (blk, u) = items[item];
        let nq = shape.n_q_heads / lists_of(blk);
        let h = u * nq / g;
        let full;
        let ranges: &[Range<usize>] = match sels {
            Some(s) => &s[blk].heads[u],
            None => {
                full = [0..kv.len()];
                &full
            }
        };
        let mut clipped = Vec::with_capacity(ranges.len());
        for i in blk * qb..((blk + 1) * qb).min(n) {
            let pos = q_start + i;
            clipped.clear();
            clipped.extend(
                ranges
                    .iter()
                    .filter(|r| r.start <= pos)
                    .map(|r| r.start..r.end.min(pos + 1)),
            );
            let mut p = Partial::new(nq, d);
            let qo = i * qe + u * nq * d;
            let shifts = streaming.map(|_| {
                let n_vis = clipped.iter().map(|r| r.len()).sum();
                streaming_shifts(&clipped, 0, n_vis, pos)
            });
            let rot = streaming.zip(shifts.as_deref());
            attend(&qs[qo..qo + nq * d], nq, d, kv, h, &clipped, rot, &mut p);
            // SAFETY: each (query, list) writes its own disjoint nq*d slice.
            let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(qo), nq * d) };
            p.write(d, dst);
        }
    });
    Ok(())
}

#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_ranges_covers_everything_once() {
        let r = vec![0..5, 10..23, 30..31];
        let parts = split_ranges(&r, 7);
        let flat: Vec<usize> = parts.iter().flatten().flat_map(|r| r.clone()).collect();
        let want: Vec<usize> = r.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(flat, want);
        assert!(parts
            .iter()
            .all(|p| p.iter().map(|r| r.len()).sum::<usize>() <= 7));
    }
}
