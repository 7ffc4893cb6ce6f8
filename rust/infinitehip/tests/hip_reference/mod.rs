//! The brute-force twin of hip's two-stage decode selection (chunks of 2 ->
//! token level, with `successors`), shared by the `hip_per_q_head` and
//! `hip_successors` tests.

use infinitehip::dtype::max_dot_f32;

/// Brute-force decode replay of a chunk-2 -> token-level config for one
/// range list (scored by the max over `qs`: one q head, or a whole group).
pub struct Reference {
    pub sink: usize,
    pub window: usize,
    pub keep1: usize,
    pub refresh1: usize,
    pub keep2: usize,
    pub succ: usize,
    pub step: usize,
    pub s1: Vec<usize>,
    pub mid_end: usize,
    pub prev: Vec<usize>,
}

impl Reference {
    pub fn new(sink: usize, window: usize, keep1: usize, refresh1: usize, keep2: usize) -> Self {
        Reference {
            sink,
            window,
            keep1,
            refresh1,
            keep2,
            succ: 0,
            step: 0,
            s1: vec![],
            mid_end: 0,
            prev: vec![],
        }
    }

    pub fn top(mut items: Vec<(f32, usize)>, n: usize) -> Vec<usize> {
        items.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        items.truncate(n);
        items.into_iter().map(|x| x.1).collect()
    }

    /// Attended tokens at `pos`; `k` `[t][d]` of the list's KV head.
    pub fn select(&mut self, qs: &[f32], k: &[f32], d: usize, pos: usize) -> Vec<usize> {
        let n = pos + 1;
        let sink_end = self.sink.min(n);
        let win_start = (pos + 1).saturating_sub(self.window).max(sink_end);
        let score = |t: usize| max_dot_f32(qs, &k[t * d..(t + 1) * d]);
        if self.step.is_multiple_of(self.refresh1) {
            self.mid_end = win_start;
            let chunks: Vec<(usize, usize)> = (sink_end..win_start)
                .step_by(2)
                .map(|s| (s, (s + 2).min(win_start)))
                .collect();
            let nk = self.keep1 / 2;
            self.s1 = if chunks.len() <= nk {
                (sink_end..win_start).collect()
            } else {
                let scored = chunks
                    .iter()
                    .enumerate()
                    .map(|(i, &(s, e))| ((s..e).map(score).fold(f32::NEG_INFINITY, f32::max), i))
                    .collect();
                let mut keep = Self::top(scored, nk);
                keep.sort_unstable();
                keep.iter()
                    .flat_map(|&i| chunks[i].0..chunks[i].1)
                    .collect()
            };
        }
        self.step += 1;
        let mut cand = self.s1.clone();
        for &x in &self.prev {
            for j in 1..=self.succ {
                if x + j >= sink_end && x + j < self.mid_end.min(win_start) {
                    cand.push(x + j);
                }
            }
        }
        cand.sort_unstable();
        cand.dedup();
        let pick = if cand.len() <= self.keep2 {
            cand
        } else {
            Self::top(cand.iter().map(|&t| (score(t), t)).collect(), self.keep2)
        };
        self.prev = pick.clone();
        let mut out: Vec<usize> = (0..sink_end).chain(win_start..n).chain(pick).collect();
        out.extend(self.mid_end.max(sink_end)..win_start);
        out.sort_unstable();
        out.dedup();
        out
    }
}
