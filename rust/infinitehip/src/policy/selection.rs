//! What a policy outputs: the token set each query group attends to.

use std::ops::Range;

/// Sorted disjoint token ranges per head. Usually one list per KV head,
/// which every q head of that KV head's group attends to; hip with
/// `per_q_head` (decode, CPU paths only) gives one list per q head
/// (`heads.len() == n_q_heads`), q head `hq` reading KV head `hq / group`.
/// Blocks (hip) and single tokens (locret, squeeze, lazy) share this form;
/// adjacent tokens merge into one range. `q_head_ranges` picks a q head's
/// list in either form.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Selection {
    pub heads: Vec<Vec<Range<usize>>>,
}

impl Selection {
    /// Every token `0..len` for every head: what dense attention reads.
    pub fn full(n_kv_heads: usize, len: usize) -> Self {
        Selection {
            heads: vec![if len > 0 { vec![0..len] } else { vec![] }; n_kv_heads],
        }
    }

    /// Build from per-head ascending token lists, merging runs.
    pub fn from_tokens(per_head: &[Vec<u32>]) -> Self {
        Selection {
            heads: per_head
                .iter()
                .map(|toks| merge_tokens(toks.iter().map(|&t| t as usize)))
                .collect(),
        }
    }

    /// Build from per-head ranges in any order, possibly overlapping.
    pub fn from_ranges(mut per_head: Vec<Vec<Range<usize>>>) -> Self {
        for r in per_head.iter_mut() {
            normalize(r);
        }
        Selection { heads: per_head }
    }

    /// Range lists held: KV heads, or q heads for a per-q-head selection.
    pub fn n_kv_heads(&self) -> usize {
        self.heads.len()
    }

    /// True when this holds one list per q head of `shape` and the heads
    /// are grouped (with one q head per KV head both forms are the same).
    pub fn is_per_q_head(&self, shape: &crate::attention::AttnShape) -> bool {
        shape.n_q_heads != shape.n_kv_heads && self.heads.len() == shape.n_q_heads
    }

    /// Q heads that share each list: the group size for a per-KV-head
    /// selection, 1 for a per-q-head one. None when `heads.len()` is
    /// neither `n_kv_heads` nor `n_q_heads` of `shape`.
    pub fn q_heads_per_list(&self, shape: &crate::attention::AttnShape) -> Option<usize> {
        if self.heads.len() == shape.n_kv_heads {
            Some(shape.group())
        } else if self.heads.len() == shape.n_q_heads {
            Some(1)
        } else {
            None
        }
    }

    /// The list q head `hq` (of `n_q_heads`) attends, in either form.
    pub fn q_head_ranges(&self, hq: usize, n_q_heads: usize) -> &[Range<usize>] {
        &self.heads[hq * self.heads.len() / n_q_heads]
    }

    /// Whether q head `hq` (of `n_q_heads`) attends token `tok`.
    pub fn q_head_contains(&self, hq: usize, n_q_heads: usize, tok: usize) -> bool {
        self.contains(hq * self.heads.len() / n_q_heads, tok)
    }

    /// Tokens selected for one head.
    pub fn token_count(&self, head: usize) -> usize {
        self.heads[head].iter().map(|r| r.len()).sum()
    }

    /// Largest per-head token count.
    pub fn max_tokens(&self) -> usize {
        (0..self.heads.len())
            .map(|h| self.token_count(h))
            .max()
            .unwrap_or(0)
    }

    pub fn contains(&self, head: usize, tok: usize) -> bool {
        let rs = &self.heads[head];
        let i = rs.partition_point(|r| r.end <= tok);
        i < rs.len() && rs[i].start <= tok
    }

    /// Clip every range to tokens below `end` (causal limit).
    pub fn clipped(&self, end: usize) -> Selection {
        Selection {
            heads: self
                .heads
                .iter()
                .map(|rs| {
                    rs.iter()
                        .filter(|r| r.start < end)
                        .map(|r| r.start..r.end.min(end))
                        .collect()
                })
                .collect(),
        }
    }
}

/// Sort and merge overlapping or touching ranges in place; drop empty ones.
pub fn normalize(ranges: &mut Vec<Range<usize>>) {
    ranges.retain(|r| r.start < r.end);
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<usize>> = Vec::with_capacity(ranges.len());
    for r in ranges.drain(..) {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    *ranges = out;
}

fn merge_tokens(toks: impl Iterator<Item = usize>) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for t in toks {
        match out.last_mut() {
            Some(last) if last.end == t => last.end = t + 1,
            _ => out.push(t..t + 1),
        }
    }
    normalize(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_and_counts() {
        let s = Selection::from_tokens(&[vec![1, 2, 3, 7, 9, 10], vec![]]);
        assert_eq!(s.heads[0], vec![1..4, 7..8, 9..11]);
        assert_eq!(s.token_count(0), 6);
        assert_eq!(s.token_count(1), 0);
        assert!(s.contains(0, 3) && !s.contains(0, 4) && s.contains(0, 10));
        let r = Selection::from_ranges(vec![vec![5..9, 0..2, 1..3, 9..10]]);
        assert_eq!(r.heads[0], vec![0..3, 5..10]);
        assert_eq!(r.clipped(6).heads[0], vec![0..3, 5..6]);
    }
}
