//! CPU simulation of the GPU estimation row cache (issue 16, `sim-est-rows`).
//!
//! `bench-gpu-offload` scores the hip stages over keys in the host tier
//! through a device row cache (backend/cuda/est_cache.rs): every probed key
//! row is looked up; a hit reads the arena and sets the slot's reference
//! byte, a miss reads the row over the bus and is logged; after the step
//! the logged misses are admitted by CLOCK (`Admission::FullDevice`, CPU
//! twin `kv::DeviceAdmissionTwin`, at most half the cache per step). Which
//! rows a step probes never depends on the cache (scores are the same
//! bits), so this module takes the probe sequence from the CPU policy
//! (`HipPolicy`, whose probes are the kernels': the centre-of-half binary
//! search, two probes per level, as `hip_score` does in module
//! `hip_mask_host`) through a `KvRead` that logs every key row read, and
//! replays it through cache policies:
//! - `Clock`: today's cache (every slot under CLOCK);
//! - `Pinned`: the rows at given offsets of every stage-0 chunk (the upper
//!   levels of the binary search, `search_offsets`) held in a pinned region
//!   filled when the tokens are written (always hits, never evicted), CLOCK
//!   over the other slots;
//! - `Unbounded`: every row ever probed stays (only first reads miss: the
//!   floor any policy that admits on miss can reach).
//!
//! The keys and queries are `bench-gpu-offload`'s synthetic workload
//! (`BenchKeys::bench`, `bench_query`), optionally for the first few KV
//! heads only (each head is scored on its own; the cache is then sized by
//! the same fraction of the kept heads' rows).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::attention::AttnShape;
use crate::config::{HipConfig, ModelShape};
use crate::kv::{DeviceAdmissionTwin, KvRead, EMPTY_ROW};
use crate::policy::hip::HipPolicy;
use crate::policy::{Phase, Policy, SelectRequest};
use crate::rng::Rng;

/// Offsets (within a chunk of `chunk` tokens) that levels `1..=levels` of
/// the centre-of-half search can probe: level L probes the centres of the
/// halves of a range of chunk / 2^(L-1) tokens, i.e. offsets
/// (2j + 1) * chunk / 2^(L+1). Sorted.
pub fn search_offsets(chunk: usize, levels: usize) -> Vec<usize> {
    let mut out = Vec::new();
    for l in 1..=levels {
        let step = chunk >> l; // range size of the halves at level l
        if step == 0 {
            break;
        }
        let half = step / 2;
        let mut o = half;
        while o < chunk {
            out.push(o);
            o += step;
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The tokens the centre-of-half search probes in chunk [l, r), in probe
/// order (two per level, also when a level's right probe repeats the last
/// level's choice, as `hip_score` reads it), with the chunk's score.
/// Reference of the kernels' search (kernels/hip_mask.cu `hip_score`).
pub fn search_probes(
    mut l: usize,
    mut r: usize,
    mut score: impl FnMut(usize) -> f32,
    out: &mut Vec<usize>,
) -> f32 {
    if r - l == 1 {
        out.push(l);
        return score(l);
    }
    let mut best = f32::NEG_INFINITY;
    while r - l > 1 {
        let m = (l + r) / 2;
        let (a, b) = ((l + m) / 2, (m + r) / 2);
        out.push(a);
        out.push(b);
        let (sl, sr) = (score(a), score(b));
        if sl >= sr {
            r = m;
            best = sl;
        } else {
            l = m;
            best = sr;
        }
    }
    best
}

/// Page offsets (bit o: offset o of a page of `page_size` tokens) of the
/// rows levels `1..=levels` of stage 0's search can probe, for chunks of
/// `chunk` tokens starting at `sink` (chunk offsets `search_offsets`):
/// the pinned region's mask (`HostEstimation::set_pinned`). None when a
/// chunk is not a page (offsets would not repeat per page) or pages exceed
/// 64 tokens; 0 for no levels.
pub fn pin_page_mask(levels: usize, chunk: usize, sink: usize, page_size: usize) -> Option<u64> {
    if levels == 0 {
        return Some(0);
    }
    if chunk != page_size || page_size > 64 || page_size == 0 {
        return None;
    }
    Some(
        search_offsets(chunk, levels)
            .into_iter()
            .fold(0u64, |m, o| m | 1u64 << ((sink + o) % page_size)),
    )
}

/// `search_probes` with the last level's right probe reused (as
/// `hip_scorew` does, kernels/hip_mask.cu): a 2-token range after the first
/// level has the previous level's chosen probe as its right probe, so that
/// row is not read again. Same score.
pub fn search_probes_reuse(
    mut l: usize,
    mut r: usize,
    mut score: impl FnMut(usize) -> f32,
    out: &mut Vec<usize>,
) -> f32 {
    if r - l == 1 {
        out.push(l);
        return score(l);
    }
    let mut best = f32::NEG_INFINITY;
    let mut level = 0;
    while r - l > 1 {
        let m = (l + r) / 2;
        let (a, b) = ((l + m) / 2, (m + r) / 2);
        out.push(a);
        let sl = score(a);
        let sr = if r - l == 2 && level > 0 {
            best
        } else {
            out.push(b);
            score(b)
        };
        if sl >= sr {
            r = m;
            best = sl;
        } else {
            l = m;
            best = sr;
        }
        level += 1;
    }
    best
}

/// A step's lookups without the re-reads that `search_probes_reuse` saves:
/// a row at an odd offset (`tok_of`) looked up again within `window`
/// lookups (the CPU policy searches 16 chunks level by level, so a chunk's
/// last-level right probe comes at most 2 x 16 lookups after its previous
/// level's probes; odd offsets are probed only by those two levels).
pub fn drop_right_repeats(rows: &[u32], window: usize, tok_of: impl Fn(u32) -> usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(rows.len());
    for (p, &r) in rows.iter().enumerate() {
        if tok_of(r) % 2 == 1 && rows[p.saturating_sub(window)..p].contains(&r) {
            continue;
        }
        out.push(r);
    }
    out
}

/// Keys of `bench-gpu-offload`'s synthetic host tier (gpu_offload.rs
/// `fill_synthetic`): bf16, pages `[page][kv head][page_size][head_dim]`,
/// uniform in [-1, 1) from a per-thread xorshift stream (the stream's
/// split depends on the filling machine's thread count, `threads`), a
/// 64-token needle per head along that head's direction. Only heads
/// `0..keep` are stored.
pub struct BenchKeys {
    pub len: usize,
    pub n_kv_heads: usize,
    pub keep: usize,
    pub head_dim: usize,
    pub page_size: usize,
    /// `[page][keep][page_size][head_dim]` bf16 bits.
    data: Vec<u16>,
}

impl BenchKeys {
    /// The bench's keys for `len` tokens with fill seed `seed` (the bench
    /// passes its `--seed` + tokens). Returns the keys and the per-head
    /// directions the bench's queries follow.
    pub fn bench(
        len: usize,
        n_kv_heads: usize,
        head_dim: usize,
        page_size: usize,
        seed: u64,
        threads: usize,
        keep: usize,
    ) -> (Self, Vec<f32>) {
        let (hkv, d, ps) = (n_kv_heads, head_dim, page_size);
        let keep = keep.clamp(1, hkv);
        let mut rng = Rng::new(seed);
        let mut dirs = vec![0f32; hkv * d];
        for h in 0..hkv {
            let v = &mut dirs[h * d..(h + 1) * d];
            rng.fill_normal(v, 1.0);
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= n);
        }
        let needles: Vec<usize> = (0..hkv)
            .map(|_| (1024 + rng.below(len - 4096)) / 64 * 64)
            .collect();
        let n_pages = len.div_ceil(ps);
        let pe = hkv * ps * d;
        let ke = keep * ps * d;
        let total = n_pages * pe;
        let chunk = (total / pe).div_ceil(threads.max(1)) * pe;
        let mut data = vec![0u16; n_pages * ke];
        // Each of the bench's thread chunks is a whole number of pages:
        // generate them in parallel here too (2 workers at most: the
        // stream of chunk ci depends only on ci).
        let n_chunks = total.div_ceil(chunk);
        let pages_per = chunk / pe;
        let out_chunks: Vec<&mut [u16]> = data.chunks_mut(pages_per * ke).collect();
        let (dirs_r, needles_r) = (&dirs, &needles);
        let work = Mutex::new(out_chunks.into_iter().enumerate().collect::<Vec<_>>());
        let workers = crate::parallel::num_threads().clamp(1, n_chunks.max(1));
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let Some((ci, out)) = work.lock().unwrap().pop() else {
                        break;
                    };
                    let mut x = seed ^ (ci as u64 + 1).wrapping_mul(0x9e3779b97f4a7c15) ^ 1;
                    let page0 = ci * pages_per;
                    let n_el = (total - ci * chunk).min(chunk);
                    for i in 0..n_el {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let r = i % pe;
                        let h = r / (ps * d);
                        if h >= keep {
                            continue;
                        }
                        let mut f = ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                        let page = page0 + i / pe;
                        let (t, dd) = (page * ps + (r / d) % ps, r % d);
                        if t >= needles_r[h] && t < needles_r[h] + 64 {
                            f = f * 0.5 + dirs_r[h * d + dd] * 14.0;
                        }
                        out[(i / pe) * ke + r] = half::bf16::from_f32(f).to_bits();
                    }
                });
            }
        });
        let _ = n_chunks;
        (
            BenchKeys {
                len,
                n_kv_heads: hkv,
                keep,
                head_dim: d,
                page_size: ps,
                data,
            },
            dirs,
        )
    }

    /// Host-tier row id of key (`head`, `tok`) (kernels `est_key_row`,
    /// pages in order).
    #[inline]
    pub fn row_id(&self, head: usize, tok: usize) -> u32 {
        let ps = self.page_size;
        (((tok / ps) * self.n_kv_heads + head) * ps + tok % ps) as u32
    }

    /// (`head`, `tok`) of a row id.
    #[inline]
    pub fn row_pos(&self, row: u32) -> (usize, usize) {
        let ps = self.page_size;
        let r = row as usize;
        let (page, rest) = (r / (self.n_kv_heads * ps), r % (self.n_kv_heads * ps));
        (rest / ps, page * ps + rest % ps)
    }

    #[inline]
    fn key(&self, head: usize, tok: usize) -> &[u16] {
        let (ps, d) = (self.page_size, self.head_dim);
        let o = ((tok / ps) * self.keep + head) * ps * d + (tok % ps) * d;
        &self.data[o..o + d]
    }
}

/// The bench's decode query (gpu_offload.rs `query`): each q head along its
/// KV head's direction (x sqrt(d)) plus uniform noise of 0.3.
pub fn bench_query(
    rng: &mut Rng,
    n_q_heads: usize,
    n_kv_heads: usize,
    d: usize,
    dirs: &[f32],
) -> Vec<f32> {
    let g = n_q_heads / n_kv_heads;
    let s = (d as f32).sqrt();
    (0..n_q_heads * d)
        .map(|i| {
            let (hq, dd) = (i / d, i % d);
            (rng.uniform() * 2.0 - 1.0) * 0.3 + dirs[(hq / g) * d + dd] * s
        })
        .collect()
}

/// A `KvRead` over `BenchKeys` (first `len` tokens) that logs the row id of
/// every key read, in read order.
pub struct LoggedKeys<'a> {
    pub keys: &'a BenchKeys,
    pub len: usize,
    pub log: Mutex<Vec<u32>>,
}

impl<'a> LoggedKeys<'a> {
    pub fn new(keys: &'a BenchKeys, len: usize) -> Self {
        LoggedKeys {
            keys,
            len,
            log: Mutex::new(Vec::new()),
        }
    }
    pub fn take(&self) -> Vec<u32> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl KvRead for LoggedKeys<'_> {
    fn len(&self) -> usize {
        self.len
    }
    // The policy scores the kept heads (the first `keep` of the bench's).
    #[allow(clippy::misnamed_getters)]
    fn n_kv_heads(&self) -> usize {
        self.keys.keep
    }
    fn head_dim(&self) -> usize {
        self.keys.head_dim
    }
    fn dot_key(&self, head: usize, tok: usize, q: &[f32]) -> f32 {
        let mut k = vec![0f32; self.keys.head_dim];
        self.read_key(head, tok, &mut k);
        crate::dtype::dot_f32(q, &k)
    }
    fn read_key(&self, head: usize, tok: usize, out: &mut [f32]) {
        assert!(tok < self.len, "key {tok} past the length {}", self.len);
        self.log.lock().unwrap().push(self.keys.row_id(head, tok));
        for (o, &x) in out.iter_mut().zip(self.keys.key(head, tok)) {
            *o = half::bf16::from_bits(x).to_f32();
        }
    }
    fn read_value(&self, _head: usize, _tok: usize, out: &mut [f32]) {
        out.fill(0.0);
    }
}

/// Which rows a cache keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimPolicy {
    /// Every slot under CLOCK (today's cache).
    Clock,
    /// Rows of tokens `t >= base` with `(t - base) % chunk` in `offsets`
    /// pinned (filled when written, never evicted); CLOCK over the rest.
    Pinned {
        base: usize,
        chunk: usize,
        offsets: Vec<usize>,
    },
    /// Nothing is ever evicted (first reads miss).
    Unbounded,
}

impl SimPolicy {
    /// Whether row (token `tok`) sits in the pinned region.
    #[inline]
    pub fn pinned(&self, tok: usize) -> bool {
        match self {
            SimPolicy::Pinned {
                base,
                chunk,
                offsets,
            } => tok >= *base && offsets.binary_search(&((tok - base) % chunk)).is_ok(),
            _ => false,
        }
    }

    /// Rows pinned over `len` tokens of `heads` heads.
    pub fn pinned_rows(&self, len: usize, heads: usize) -> usize {
        match self {
            SimPolicy::Pinned {
                base,
                chunk,
                offsets,
            } => {
                let n = len.saturating_sub(*base);
                let full = n / chunk * offsets.len();
                let part = offsets.iter().filter(|&&o| o < n % chunk).count();
                (full + part) * heads
            }
            _ => 0,
        }
    }
}

/// Counters of one simulated step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStep {
    pub lookups: u64,
    pub hits: u64,
    /// Of the hits, pinned rows.
    pub pinned_hits: u64,
    /// Missed lookups (each reads its row over the bus).
    pub misses: u64,
    /// Distinct rows among the misses.
    pub missed_rows: u64,
    pub admitted: u64,
    pub evicted: u64,
}

/// The row cache of `bench-gpu-offload --admission full-device` over a
/// probe sequence: lookups, then the step's misses admitted by the device
/// CLOCK (`DeviceAdmissionTwin`, at most half the CLOCK slots a step).
pub struct RowCacheSim {
    pub policy: SimPolicy,
    /// Slots under CLOCK.
    pub clock_slots: usize,
    map: HashMap<u32, u32>,
    holder: Vec<u32>,
    twin: DeviceAdmissionTwin,
    max_admit: usize,
    /// Rows ever seen (`Unbounded`).
    seen: HashMap<u32, ()>,
    /// The last step's missed lookups, in order.
    pub last_misses: Vec<u32>,
    page_size: usize,
    n_kv_heads: usize,
}

impl RowCacheSim {
    /// A cache of `slots` rows; `pinned_rows` of them hold the pinned
    /// region (`policy.pinned_rows`); errors when it does not fit.
    pub fn new(
        policy: SimPolicy,
        slots: usize,
        pinned_rows: usize,
        n_kv_heads: usize,
        page_size: usize,
    ) -> Result<Self, String> {
        Self::with_admit(policy, slots, pinned_rows, n_kv_heads, page_size, 0.5)
    }

    /// `new` admitting at most `admit_frac` of the CLOCK slots a step (the
    /// device admission: 0.5).
    pub fn with_admit(
        policy: SimPolicy,
        slots: usize,
        pinned_rows: usize,
        n_kv_heads: usize,
        page_size: usize,
        admit_frac: f64,
    ) -> Result<Self, String> {
        if pinned_rows > slots {
            return Err(format!(
                "pinned region of {pinned_rows} rows exceeds the cache's {slots}"
            ));
        }
        let clock_slots = slots - pinned_rows;
        // ea_* kernels: pieces / chunk only split the work (same choices).
        Ok(RowCacheSim {
            policy,
            clock_slots,
            map: HashMap::new(),
            holder: vec![EMPTY_ROW; clock_slots],
            twin: DeviceAdmissionTwin::new(clock_slots, 64, 4096),
            max_admit: (clock_slots as f64 * admit_frac) as usize,
            seen: HashMap::new(),
            last_misses: Vec::new(),
            page_size,
            n_kv_heads,
        })
    }

    /// Token of a row id.
    #[inline]
    pub fn tok_of(&self, row: u32) -> usize {
        let ps = self.page_size;
        let r = row as usize;
        (r / (self.n_kv_heads * ps)) * ps + r % ps
    }

    /// One step: look up `lookups` in order, then admit the misses.
    pub fn step(&mut self, lookups: &[u32]) -> SimStep {
        let mut st = SimStep {
            lookups: lookups.len() as u64,
            ..Default::default()
        };
        let mut list: Vec<u32> = Vec::new();
        if self.policy == SimPolicy::Unbounded {
            let mut step_missed: HashMap<u32, ()> = HashMap::new();
            for &r in lookups {
                if self.seen.contains_key(&r) {
                    st.hits += 1;
                } else {
                    st.misses += 1;
                    step_missed.insert(r, ());
                    list.push(r);
                }
            }
            self.last_misses = list;
            st.missed_rows = step_missed.len() as u64;
            st.admitted = st.missed_rows;
            self.seen.extend(step_missed);
            return st;
        }
        for &r in lookups {
            if self.policy.pinned(self.tok_of(r)) {
                st.hits += 1;
                st.pinned_hits += 1;
            } else if let Some(&s) = self.map.get(&r) {
                st.hits += 1;
                self.twin.refb[s as usize] = 1;
            } else {
                st.misses += 1;
                list.push(r);
            }
        }
        let mut distinct: HashMap<u32, ()> = HashMap::with_capacity(list.len());
        for &r in &list {
            distinct.insert(r, ());
        }
        st.missed_rows = distinct.len() as u64;
        if self.clock_slots > 0 {
            let a = self.twin.admit(&list, self.max_admit);
            for (&(row, _), &slot) in a.rows.iter().zip(&a.slots) {
                let old = std::mem::replace(&mut self.holder[slot as usize], row);
                if old != EMPTY_ROW {
                    self.map.remove(&old);
                    st.evicted += 1;
                }
                self.map.insert(row, slot);
            }
            st.admitted = a.rows.len() as u64;
        }
        self.last_misses = list;
        st
    }

    /// Whether `row` is resident (pinned or in a CLOCK slot).
    pub fn contains(&self, row: u32) -> bool {
        match self.policy {
            SimPolicy::Unbounded => self.seen.contains_key(&row),
            _ => self.policy.pinned(self.tok_of(row)) || self.map.contains_key(&row),
        }
    }
}

/// One decode step of a probe trace.
pub struct TraceStep {
    /// The first stage the step refreshes (`n_stages`: none).
    pub from: usize,
    /// Row ids of every key row the step reads, in the CPU policy's order.
    pub rows: Vec<u32>,
}

/// The stage a decode step `s` (0-based) refreshes from, as `HipPolicy`
/// and `HipGpuDecoder` schedule it.
pub fn refresh_from(cfg: &HipConfig, s: usize) -> usize {
    if s == 0 {
        return 0;
    }
    (0..cfg.stages.len())
        .find(|&i| s.is_multiple_of(cfg.stages[i].refresh_interval))
        .unwrap_or(cfg.stages.len())
}

/// The probe trace of `n_steps` decode steps of `bench-gpu-offload`'s
/// workload (keys `keys`, queries from `Rng::new(seed ^ 0xbe)` as the
/// bench draws them, `n_q_heads` q heads over the keys' `n_kv_heads`, the
/// first `keys.keep` KV heads scored) through `HipPolicy` with `cfg`. The
/// bench decodes at a fixed length; the CPU policy restarts a sequence
/// whose length does not grow, so here step s decodes at length
/// `keys.len - n_steps + 1 + s` (the stage-0 region moves by one token a
/// step). Single-threaded (deterministic order).
pub fn bench_trace(
    keys: &BenchKeys,
    dirs: &[f32],
    cfg: &HipConfig,
    n_q_heads: usize,
    seed: u64,
    n_steps: usize,
) -> crate::Result<Vec<TraceStep>> {
    let (hkv, d, keep) = (keys.n_kv_heads, keys.head_dim, keys.keep);
    let g = n_q_heads / hkv;
    let model = ModelShape {
        n_q_heads: g * keep,
        n_kv_heads: keep,
        head_dim: d,
        max_position: 1 << 40,
        ..Default::default()
    };
    let shape = AttnShape::new(g * keep, keep, d)?;
    let mut pol = HipPolicy::new(cfg.clone(), &model)?;
    let mut rng = Rng::new(seed ^ 0xbe);
    let prev = crate::parallel::num_threads();
    crate::parallel::set_num_threads(1);
    let mut out = Vec::with_capacity(n_steps);
    for s in 0..n_steps {
        let len = keys.len - n_steps + 1 + s;
        let q_all = bench_query(&mut rng, n_q_heads, hkv, d, dirs);
        let q = &q_all[..g * keep * d];
        let kv = LoggedKeys::new(keys, len);
        let req = SelectRequest {
            seq: 0,
            shape,
            phase: Phase::Decode,
            queries: q,
            q_start: len - 1,
            kv: &kv,
        };
        pol.select(&req)?;
        out.push(TraceStep {
            from: refresh_from(cfg, s),
            rows: kv.take(),
        });
    }
    crate::parallel::set_num_threads(prev);
    Ok(out)
}

/// Offset class of a stage-0 probe at token `tok`: the search level whose
/// probe offsets hold `(tok - base) % chunk` (1 = the two query-independent
/// probes; `levels` + 1: offsets only the last level's left probe reads,
/// 0 and chunk / 2).
pub fn offset_level(tok: usize, base: usize, chunk: usize) -> usize {
    let levels = chunk.trailing_zeros() as usize;
    if tok < base {
        return 0;
    }
    let o = (tok - base) % chunk;
    if o == 0 || o == chunk / 2 {
        return levels;
    }
    // Level L probes odd multiples of chunk / 2^(L+1).
    levels - 1 - o.trailing_zeros() as usize
}

/// Per step class (the stage a step refreshes from, or none) totals of a
/// replay.
#[derive(Clone, Debug, Default)]
pub struct ClassTotals {
    pub steps: u64,
    pub sum: SimStep,
    /// Missed lookups by `offset_level` (index 0: sink / window rows).
    pub miss_by_level: Vec<u64>,
    /// Missed lookups of each counted step, in order.
    pub per_step: Vec<u64>,
}

/// Replay `trace` through `cache`; totals per step class over the steps
/// `warmup..` (classes `0..=n_stages`).
pub fn replay(
    trace: &[TraceStep],
    cache: &mut RowCacheSim,
    n_stages: usize,
    warmup: usize,
    base: usize,
    chunk: usize,
    reuse: bool,
) -> Vec<ClassTotals> {
    let levels = chunk.trailing_zeros() as usize;
    let mut out = vec![
        ClassTotals {
            miss_by_level: vec![0; levels + 1],
            ..Default::default()
        };
        n_stages + 1
    ];
    for (s, st) in trace.iter().enumerate() {
        let r = if reuse {
            let rows = drop_right_repeats(&st.rows, 64, |x| cache.tok_of(x));
            cache.step(&rows)
        } else {
            cache.step(&st.rows)
        };
        if s < warmup {
            continue;
        }
        let c = &mut out[st.from.min(n_stages)];
        c.steps += 1;
        c.per_step.push(r.misses);
        c.sum.lookups += r.lookups;
        c.sum.hits += r.hits;
        c.sum.pinned_hits += r.pinned_hits;
        c.sum.misses += r.misses;
        c.sum.missed_rows += r.missed_rows;
        c.sum.admitted += r.admitted;
        c.sum.evicted += r.evicted;
        for &row in &cache.last_misses {
            let tok = cache.tok_of(row);
            c.miss_by_level[offset_level(tok, base, chunk)] += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HipStage;

    #[test]
    fn search_offsets_are_the_levels_probes() {
        assert_eq!(search_offsets(64, 1), vec![16, 48]);
        assert_eq!(search_offsets(64, 2), vec![8, 16, 24, 40, 48, 56]);
        assert_eq!(search_offsets(64, 3).len(), 14);
        // Every probe the search makes at level <= L lies in the offsets
        // of L (random scores, every path).
        let mut rng = Rng::new(5);
        for levels in 1..=6 {
            let offs = search_offsets(64, levels);
            for _ in 0..200 {
                let sc: Vec<f32> = (0..64).map(|_| rng.uniform()).collect();
                let mut p = Vec::new();
                search_probes(0, 64, |t| sc[t], &mut p);
                assert_eq!(p.len(), 12);
                for &t in &p[..2 * levels] {
                    assert!(offs.contains(&t), "level <= {levels} probe {t}");
                }
            }
        }
        // Level 1 is query independent; level 2 has 4 candidates.
        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..500 {
            let sc: Vec<f32> = (0..64).map(|_| rng.uniform()).collect();
            let mut p = Vec::new();
            search_probes(0, 64, |t| sc[t], &mut p);
            assert_eq!(&p[..2], &[16, 48]);
            firsts.insert(p[2]);
            firsts.insert(p[3]);
        }
        assert_eq!(firsts.into_iter().collect::<Vec<_>>(), vec![8, 24, 40, 56]);
    }

    /// The logged probe sequence of the CPU policy (what the simulation
    /// replays) equals `search_probes` (the kernels' search) chunk by chunk,
    /// and the policy's selection follows those scores: fresh random keys
    /// and queries, all three stages.
    #[test]
    fn policy_probes_equal_the_kernel_search() {
        crate::parallel::set_num_threads(1);
        let (len, hkv, d) = (20_000usize, 2usize, 64usize);
        for seed in [1u64, 2] {
            let (keys, dirs) = BenchKeys::bench(len, hkv, d, 64, seed, 3, hkv);
            let mut cfg = HipConfig {
                sink: 128,
                window: 1024,
                ..Default::default()
            };
            cfg.stages = vec![
                HipStage {
                    chunk_size: 64,
                    keep_tokens: 2048,
                    refresh_interval: 4,
                },
                HipStage {
                    chunk_size: 16,
                    keep_tokens: 1024,
                    refresh_interval: 2,
                },
                HipStage {
                    chunk_size: 8,
                    keep_tokens: 512,
                    refresh_interval: 1,
                },
            ];
            let model = ModelShape {
                n_q_heads: 4 * hkv,
                n_kv_heads: hkv,
                head_dim: d,
                max_position: 1 << 30,
                ..Default::default()
            };
            let shape = AttnShape::new(4 * hkv, hkv, d).unwrap();
            let mut pol = HipPolicy::new(cfg.clone(), &model).unwrap();
            let mut rng = Rng::new(seed ^ 0xbe);
            let q = bench_query(&mut rng, 4 * hkv, hkv, d, &dirs);
            let kv = LoggedKeys::new(&keys, len);
            let req = SelectRequest {
                seq: 0,
                shape,
                phase: Phase::Decode,
                queries: &q,
                q_start: len - 1,
                kv: &kv,
            };
            pol.select(&req).unwrap();
            let log = kv.take();
            // Stage 0 of each head, as the kernels search it.
            let mid = cfg.sink..len - cfg.window;
            let mut want = Vec::new();
            let mut best0 = Vec::new();
            for h in 0..hkv {
                let qs = &q[h * 4 * d..(h + 1) * 4 * d];
                let score = |t: usize| {
                    let mut k = vec![0f32; d];
                    kv.read_key(h, t, &mut k);
                    crate::dtype::max_dot_f32(qs, &k)
                };
                let mut s = mid.start;
                let mut sc = Vec::new();
                while s < mid.end {
                    let e = mid.end.min(s + 64);
                    let mut p = Vec::new();
                    sc.push((search_probes(s, e, score, &mut p), s));
                    want.extend(p.iter().map(|&t| keys.row_id(h, t)));
                    s = e;
                }
                best0.push(sc);
            }
            kv.take();
            assert!(log.len() > want.len());
            // The policy scores chunks in groups of 16, level by level;
            // compare as multisets per head and per group order-free.
            let mut a = log[..want.len()].to_vec();
            let mut b = want.clone();
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b, "stage-0 probes differ (seed {seed})");
            // Stage 1 and 2 probes lie inside stage 0's best chunks.
            for &r in &log[want.len()..] {
                let (h, t) = keys.row_pos(r);
                let mut sc = best0[h].clone();
                sc.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
                let kept: Vec<usize> = sc[..2048 / 64].iter().map(|x| x.1).collect();
                assert!(
                    kept.iter().any(|&s| t >= s && t < s + 64),
                    "stage 1/2 probe of token {t} (head {h}) outside stage 0's kept chunks"
                );
            }
        }
    }

    /// The last level's right probe is the previous level's choice
    /// (random scores, every chunk length 1..=64): the reuse search reads
    /// one row fewer per level-6 step, scores equal the plain search's.
    #[test]
    fn reuse_search_equals_plain_search() {
        let mut rng = Rng::new(11);
        for _ in 0..2000 {
            let n = 1 + rng.below(64);
            let sc: Vec<f32> = (0..n).map(|_| (rng.below(8) as f32) * 0.5).collect();
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let sa = search_probes(0, n, |t| sc[t], &mut a);
            let sb = search_probes_reuse(0, n, |t| sc[t], &mut b);
            assert_eq!(sa.to_bits(), sb.to_bits());
            // b is a minus re-reads of rows a already read.
            let mut rest = a.clone();
            for t in &b {
                let i = rest.iter().position(|x| x == t).unwrap();
                rest.remove(i);
            }
            for t in &rest {
                assert!(b.contains(t), "dropped probe {t} was never read (n {n})");
            }
            if n == 64 {
                assert_eq!((a.len(), b.len()), (12, 11));
            }
        }
    }

    /// `drop_right_repeats` over the CPU policy's interleaved log (groups of
    /// 16 chunks level by level) leaves exactly the reuse search's probes.
    #[test]
    fn dropped_repeats_are_the_reuse_probes() {
        crate::parallel::set_num_threads(1);
        let (len, hkv, d) = (12_000usize, 1usize, 64usize);
        let (keys, dirs) = BenchKeys::bench(len, hkv, d, 64, 4, 2, hkv);
        let cfg = HipConfig::default();
        let tr = bench_trace(&keys, &dirs, &cfg, 4, 4, 1).unwrap();
        let mid = cfg.sink..len - cfg.window;
        let n0 = mid.len().div_ceil(64);
        // Stage 0's probes: the first 12 per chunk of the log (full chunks).
        let mut want = Vec::new();
        let kv = LoggedKeys::new(&keys, len);
        let q = bench_query(&mut Rng::new(4 ^ 0xbe), 4, 1, d, &dirs);
        for c in 0..n0 {
            let (l, r) = (mid.start + 64 * c, (mid.start + 64 * (c + 1)).min(mid.end));
            search_probes_reuse(
                l,
                r,
                |t| {
                    let mut k = vec![0f32; d];
                    kv.read_key(0, t, &mut k);
                    crate::dtype::max_dot_f32(&q, &k)
                },
                &mut want,
            );
        }
        // Probes of the plain search over stage 0's chunks (the last one is
        // shorter): the log's stage-0 prefix.
        let mut plain_p = Vec::new();
        for c in 0..n0 {
            let (l, r) = (mid.start + 64 * c, (mid.start + 64 * (c + 1)).min(mid.end));
            search_probes(l, r, |_| 0.0, &mut plain_p);
        }
        let plain = plain_p.len();
        assert!(mid.len() % 64 != 0, "the test wants a short last chunk");
        let got = drop_right_repeats(&tr[0].rows[..plain], 64, |x| keys.row_pos(x).1);
        let mut g: Vec<usize> = got.iter().map(|&x| keys.row_pos(x).1).collect();
        g.sort_unstable();
        want.sort_unstable();
        assert_eq!(g, want);
        assert!(got.len() < plain && got.len() >= (n0 - 1) * 11);
    }

    /// The device region's page mask pins exactly the rows the simulated
    /// policy pins (tokens past the sink), for sinks that are not multiples
    /// of the page.
    #[test]
    fn pin_page_mask_equals_the_simulated_pins() {
        for sink in [0usize, 32, 128, 100] {
            for levels in 0..=4 {
                let m = pin_page_mask(levels, 64, sink, 64).unwrap();
                assert_eq!(m.count_ones() as usize, search_offsets(64, levels).len());
                let pol = SimPolicy::Pinned {
                    base: sink,
                    chunk: 64,
                    offsets: search_offsets(64, levels),
                };
                for t in sink..sink + 1000 {
                    assert_eq!(
                        pol.pinned(t),
                        m >> (t % 64) & 1 == 1,
                        "sink {sink} levels {levels} t {t}"
                    );
                }
            }
        }
        assert_eq!(pin_page_mask(2, 16, 0, 64), None);
        assert_eq!(pin_page_mask(0, 16, 0, 64), Some(0));
    }

    /// Bench keys: row ids round trip; kept heads equal the full fill's.
    #[test]
    fn bench_keys_heads_and_rows() {
        let (all, dirs_a) = BenchKeys::bench(8192, 4, 32, 64, 9, 5, 4);
        let (two, dirs_b) = BenchKeys::bench(8192, 4, 32, 64, 9, 5, 2);
        assert_eq!(dirs_a, dirs_b);
        for h in 0..2 {
            for t in (0..8192).step_by(37) {
                assert_eq!(all.key(h, t), two.key(h, t));
                let r = all.row_id(h, t);
                assert_eq!(all.row_pos(r), (h, t));
            }
        }
        // Values in [-1, 1) outside the needles, not all equal.
        let k = all.key(3, 100);
        assert!(k.iter().any(|&x| x != k[0]));
    }

    /// Pinned rows are never evicted and never miss, whatever the churn;
    /// the CLOCK part admits at most half its slots a step.
    #[test]
    fn pinned_rows_survive_churn() {
        let (hkv, ps) = (2usize, 64usize);
        let pol = SimPolicy::Pinned {
            base: 128,
            chunk: 64,
            offsets: search_offsets(64, 2),
        };
        let len = 64 * 400;
        let pinned = pol.pinned_rows(len, hkv);
        assert_eq!(pinned, (len - 128) / 64 * 6 * hkv);
        let mut c = RowCacheSim::new(pol.clone(), pinned + 500, pinned, hkv, ps).unwrap();
        let row = |h: usize, t: usize| (((t / ps) * hkv + h) * ps + t % ps) as u32;
        let pins: Vec<u32> = (128..len)
            .filter(|&t| pol.pinned(t))
            .map(|t| row(t % 2, t))
            .collect();
        let mut rng = Rng::new(3);
        for _ in 0..40 {
            let churn: Vec<u32> = (0..3000)
                .map(|_| row(rng.below(hkv), rng.below(len)))
                .collect();
            let st = c.step(&churn);
            assert!(st.admitted <= 250);
            let st = c.step(&pins);
            assert_eq!(st.misses, 0, "a pinned row missed");
            assert_eq!(st.pinned_hits, pins.len() as u64);
        }
        for &p in &pins {
            assert!(c.contains(p));
        }
        // Under plain CLOCK of the same size, the same churn evicts them.
        let mut c2 = RowCacheSim::new(SimPolicy::Clock, pinned + 500, 0, hkv, ps).unwrap();
        c2.step(&pins);
        c2.step(&pins);
        let mut rng = Rng::new(3);
        for _ in 0..40 {
            let churn: Vec<u32> = (0..3000)
                .map(|_| row(rng.below(hkv), rng.below(len)))
                .collect();
            c2.step(&churn);
        }
        assert!(c2.step(&pins).misses > 0);
        assert!(RowCacheSim::new(pol, pinned - 1, pinned, hkv, ps).is_err());
    }

    /// The simulated CLOCK cache against a plain reference (a sequential
    /// CLOCK over one reference bit a slot, misses admitted after the step
    /// in reversed-list first-occurrence order): the same hits on fresh
    /// random streams with reuse.
    #[test]
    fn clock_sim_equals_reference_clock() {
        for seed in 0..4u64 {
            let mut rng = Rng::new(seed + 40);
            let cap = 64 + rng.below(300);
            let mut sim = RowCacheSim::new(SimPolicy::Clock, cap, 0, 1, 64).unwrap();
            // Reference.
            let mut holder = vec![EMPTY_ROW; cap];
            let mut refb = vec![false; cap];
            let mut map: HashMap<u32, usize> = HashMap::new();
            let mut hand = 0usize;
            for _ in 0..60 {
                let n = rng.below(400);
                let hot = 1 + rng.below(2000);
                let list: Vec<u32> = (0..n).map(|_| rng.below(hot) as u32).collect();
                let st = sim.step(&list);
                let (mut hits, mut misses) = (0u64, Vec::new());
                for &r in &list {
                    if let Some(&s) = map.get(&r) {
                        hits += 1;
                        refb[s] = true;
                    } else {
                        misses.push(r);
                    }
                }
                assert_eq!(st.hits, hits, "seed {seed}");
                // Admission: reversed list, first occurrences, at most cap / 2.
                let mut seen = std::collections::HashSet::new();
                let uniq: Vec<u32> = misses
                    .iter()
                    .rev()
                    .filter(|r| seen.insert(**r))
                    .copied()
                    .collect();
                // One admission never passes a slot twice (kv::ClockBits).
                let mut travelled = 0;
                for &r in uniq.iter().take(cap / 2) {
                    let mut s = None;
                    while travelled < cap {
                        let h = hand;
                        hand = (hand + 1) % cap;
                        travelled += 1;
                        if !refb[h] {
                            s = Some(h);
                            break;
                        }
                        refb[h] = false;
                    }
                    let Some(s) = s else { break };
                    if holder[s] != EMPTY_ROW {
                        map.remove(&holder[s]);
                    }
                    holder[s] = r;
                    map.insert(r, s);
                }
            }
        }
    }
}
