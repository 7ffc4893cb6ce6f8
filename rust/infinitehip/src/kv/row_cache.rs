//! Device cache of single key rows for mask estimation (DESIGN 3.5).
//!
//! Mask estimation reads a few representative keys per chunk, scattered over
//! the whole context, so caching whole head blocks for it would cache the
//! whole KV. InfiniteHiP keeps a separate, row-granular cache for these
//! reads. Rows are keyed by where they live on the host (page, KV head,
//! offset), so forked sequences share them. Replacement is CLOCK (second
//! chance), an LRU approximation with O(1) work per access.
//!
//! On the CPU backend both tiers are host memory and estimation reads the
//! host copy in place (bit-identical); this cache does the bookkeeping a GPU
//! does (which rows are resident, what a step copies), so CI tests it.

use std::collections::{HashMap, HashSet};

use super::CacheStats;

/// Host location of one key row: page, KV head, token offset in the page.
pub fn row_key(page: u32, head: usize, offset: usize) -> u64 {
    ((page as u64) << 32) | ((head as u64) << 16) | offset as u64
}

fn page_of(key: u64) -> u32 {
    (key >> 32) as u32
}

pub struct RowCache {
    row_bytes: u64,
    slot_of: HashMap<u64, u32>,
    holder: Vec<Option<u64>>,
    referenced: Vec<bool>,
    hand: usize,
    stats: CacheStats,
}

impl RowCache {
    /// `capacity` rows of `row_bytes` each.
    pub fn new(capacity: usize, row_bytes: usize) -> Self {
        RowCache {
            row_bytes: row_bytes as u64,
            slot_of: HashMap::with_capacity(capacity),
            holder: vec![None; capacity],
            referenced: vec![false; capacity],
            hand: 0,
            stats: CacheStats::default(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.holder.len()
    }

    pub fn bytes(&self) -> usize {
        self.capacity() * self.row_bytes as usize
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    pub fn contains(&self, key: u64) -> bool {
        self.slot_of.contains_key(&key)
    }

    /// Record one step's reads (duplicates allowed): hits refresh their row,
    /// misses are copied in, evicting by CLOCK.
    pub fn access(&mut self, keys: &[u64]) {
        if self.holder.is_empty() {
            self.stats.misses += keys.len() as u64;
            self.stats.bytes_copied += keys.len() as u64 * self.row_bytes;
            return;
        }
        for &k in keys {
            if let Some(&s) = self.slot_of.get(&k) {
                self.referenced[s as usize] = true;
                self.stats.hits += 1;
                continue;
            }
            let s = self.victim();
            if let Some(old) = self.holder[s].replace(k) {
                self.slot_of.remove(&old);
                self.stats.evictions += 1;
            }
            self.slot_of.insert(k, s as u32);
            self.referenced[s] = true;
            self.stats.misses += 1;
            self.stats.bytes_copied += self.row_bytes;
        }
    }

    fn victim(&mut self) -> usize {
        loop {
            let s = self.hand;
            self.hand = (self.hand + 1) % self.holder.len();
            if self.holder[s].is_none() || !self.referenced[s] {
                return s;
            }
            self.referenced[s] = false;
        }
    }

    /// Drop every row of `pages` (freed or rewritten on the host).
    pub fn invalidate_pages(&mut self, pages: &[u32]) {
        if pages.is_empty() || self.slot_of.is_empty() {
            return;
        }
        let gone: HashSet<u32> = pages.iter().copied().collect();
        let holder = &mut self.holder;
        self.slot_of.retain(|&k, &mut s| {
            let keep = !gone.contains(&page_of(k));
            if !keep {
                holder[s as usize] = None;
            }
            keep
        });
    }
}

/// Empty bucket of a `RowSlotMap` (no row id takes this value).
pub const EMPTY_ROW: u32 = u32::MAX;

/// Bucket of `row` in a table of `2^(32 - shift)` buckets (Fibonacci
/// hashing; kernels/hip_est_host.cuh computes the same).
#[inline]
pub fn row_hash(row: u32, shift: u32) -> u32 {
    row.wrapping_mul(2_654_435_761) >> shift
}

/// Open-addressing map row id -> slot (linear probing, backward-shift
/// deletion) whose bucket array is mirrored on a device: every changed
/// bucket is logged, `take_updates` yields (bucket, entry) pairs to write
/// there, entry = `(row << 32) | slot`, empty = all ones. At most half full.
pub struct RowSlotMap {
    keys: Vec<u32>,
    vals: Vec<u32>,
    shift: u32,
    mask: u32,
    len: usize,
    dirty: Vec<u32>,
}

impl RowSlotMap {
    /// Room for `rows` entries (table of the next power of two >= 2 rows).
    pub fn new(rows: usize) -> Self {
        let n = (2 * rows.max(1)).next_power_of_two().max(2);
        assert!(n <= 1 << 31, "row map of {rows} rows is too large");
        RowSlotMap {
            keys: vec![EMPTY_ROW; n],
            vals: vec![0; n],
            shift: 32 - n.trailing_zeros(),
            mask: (n - 1) as u32,
            len: 0,
            dirty: Vec::new(),
        }
    }

    pub fn buckets(&self) -> usize {
        self.keys.len()
    }
    pub fn shift(&self) -> u32 {
        self.shift
    }
    pub fn mask(&self) -> u32 {
        self.mask
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Device form of bucket `b`.
    pub fn entry(&self, b: usize) -> u64 {
        if self.keys[b] == EMPTY_ROW {
            u64::MAX
        } else {
            ((self.keys[b] as u64) << 32) | self.vals[b] as u64
        }
    }

    fn find(&self, row: u32) -> Option<usize> {
        let mut b = row_hash(row, self.shift);
        loop {
            match self.keys[b as usize] {
                k if k == row => return Some(b as usize),
                EMPTY_ROW => return None,
                _ => b = (b + 1) & self.mask,
            }
        }
    }

    pub fn get(&self, row: u32) -> Option<u32> {
        self.find(row).map(|b| self.vals[b])
    }

    pub fn insert(&mut self, row: u32, slot: u32) {
        assert_ne!(row, EMPTY_ROW, "row id {row:#x} is reserved");
        let mut b = row_hash(row, self.shift);
        loop {
            let k = self.keys[b as usize];
            if k == row || k == EMPTY_ROW {
                if k == EMPTY_ROW {
                    assert!(
                        2 * (self.len + 1) <= self.keys.len(),
                        "row map over half full"
                    );
                    self.len += 1;
                }
                self.keys[b as usize] = row;
                self.vals[b as usize] = slot;
                self.dirty.push(b);
                return;
            }
            b = (b + 1) & self.mask;
        }
    }

    pub fn remove(&mut self, row: u32) -> Option<u32> {
        let mut i = self.find(row)?;
        let val = self.vals[i];
        self.len -= 1;
        let mut j = i;
        loop {
            j = (j + 1) & self.mask as usize;
            let k = self.keys[j];
            if k == EMPTY_ROW {
                break;
            }
            let home = row_hash(k, self.shift) as usize;
            // k stays if its home lies cyclically in (i, j].
            let stays = if i <= j {
                i < home && home <= j
            } else {
                i < home || home <= j
            };
            if !stays {
                self.keys[i] = k;
                self.vals[i] = self.vals[j];
                self.dirty.push(i as u32);
                i = j;
            }
        }
        self.keys[i] = EMPTY_ROW;
        self.dirty.push(i as u32);
        Some(val)
    }

    /// Changed buckets since the last call, as (bucket, device entry).
    pub fn take_updates(&mut self) -> Vec<(u64, u64)> {
        let mut d = std::mem::take(&mut self.dirty);
        d.sort_unstable();
        d.dedup();
        d.iter()
            .map(|&b| (b as u64, self.entry(b as usize)))
            .collect()
    }
}

/// Look `row` up in a device-form bucket array exactly as the scoring
/// kernel does (test twin of kernels/hip_est_host.cuh).
pub fn probe_device_map(map: &[u64], shift: u32, row: u32) -> Option<u32> {
    let mask = map.len() as u32 - 1;
    let mut b = row_hash(row, shift);
    loop {
        let e = map[b as usize];
        if (e >> 32) as u32 == row {
            return Some(e as u32);
        }
        if (e >> 32) as u32 == EMPTY_ROW {
            return None;
        }
        b = (b + 1) & mask;
    }
}

/// Row admitted by `EstRowCache::admit`: copy host row `row` into `slot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admitted {
    pub row: u32,
    pub slot: u32,
    /// Index of the row in the `admit` call's list.
    pub index: u32,
    /// Row that held the slot before.
    pub evicted: Option<u32>,
}

/// The estimation row cache a GPU runs: slots of one key row each, CLOCK
/// replacement, and a `RowSlotMap` index mirrored on the device. Lookups
/// happen on the device (hits set the slot's reference bit there, misses
/// are logged); after a step the host merges the device's reference bits and
/// admits the logged misses here in one batch.
pub struct EstRowCache {
    pub map: RowSlotMap,
    holder: Vec<u32>,
    referenced: Vec<bool>,
    hand: usize,
    batch_gen: Vec<u32>,
    batch_pos: Vec<u32>,
    gen: u32,
    pub stats: CacheStats,
}

impl EstRowCache {
    pub fn new(rows: usize) -> Self {
        EstRowCache {
            map: RowSlotMap::new(rows),
            holder: vec![EMPTY_ROW; rows],
            referenced: vec![false; rows],
            hand: 0,
            batch_gen: vec![0; rows],
            batch_pos: vec![0; rows],
            gen: 0,
            stats: CacheStats::default(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.holder.len()
    }

    pub fn slot(&self, row: u32) -> Option<u32> {
        self.map.get(row)
    }

    /// Count a step's device lookups.
    pub fn record(&mut self, hits: u64, misses: u64) {
        self.stats.hits += hits;
        self.stats.misses += misses;
    }

    /// OR the device's reference bits (one byte per slot) into the host's.
    pub fn merge_referenced(&mut self, bits: &[u8]) {
        for (r, &b) in self.referenced.iter_mut().zip(bits) {
            *r |= b != 0;
        }
    }

    /// Admit missed rows (duplicates and resident rows skipped) by CLOCK;
    /// at most `limit` (and at most `capacity`) slots per call: a step whose
    /// misses exceed the cache would otherwise flush it (the LRU scan
    /// pathology) and pay host time for rows that are evicted again before
    /// their next use. `row_bytes` feeds `stats.bytes_copied`.
    pub fn admit(&mut self, rows: &[u32], row_bytes: u64, limit: usize) -> Vec<Admitted> {
        let mut out: Vec<Admitted> = Vec::new();
        if self.holder.is_empty() {
            return out;
        }
        // Slot -> index in `out` for this batch (generation-stamped): a slot
        // taken twice (the hand came round) keeps only its last row, so no
        // slot is copied twice in one gather.
        self.gen = self.gen.wrapping_add(1);
        if self.gen == 0 {
            self.batch_gen.iter_mut().for_each(|g| *g = 0);
            self.gen = 1;
        }
        let mut taken = 0;
        for (index, &row) in rows.iter().enumerate() {
            if taken == self.holder.len().min(limit) {
                break;
            }
            if row == EMPTY_ROW || self.map.get(row).is_some() {
                continue;
            }
            let s = self.victim();
            if self.batch_gen[s] == self.gen {
                out[self.batch_pos[s] as usize].row = EMPTY_ROW;
            } else {
                taken += 1;
            }
            self.batch_gen[s] = self.gen;
            self.batch_pos[s] = out.len() as u32;
            let old = self.holder[s];
            let evicted = (old != EMPTY_ROW).then(|| {
                self.map.remove(old);
                self.stats.evictions += 1;
                old
            });
            self.holder[s] = row;
            // Admitted rows start unreferenced: rows read again before the
            // hand comes round earn their second chance on the device.
            self.referenced[s] = false;
            self.map.insert(row, s as u32);
            self.stats.bytes_copied += row_bytes;
            out.push(Admitted {
                row,
                slot: s as u32,
                index: index as u32,
                evicted,
            });
        }
        out.retain(|a| a.row != EMPTY_ROW);
        out
    }

    fn victim(&mut self) -> usize {
        loop {
            let s = self.hand;
            self.hand = (self.hand + 1) % self.holder.len();
            if self.holder[s] == EMPTY_ROW || !self.referenced[s] {
                return s;
            }
            self.referenced[s] = false;
        }
    }
}

/// CLOCK hand over `capacity` slots whose reference bits are kept by the
/// device (one byte per slot, set by hits) and merged here only for the
/// words the hand is about to pass: the host never reads the whole table.
/// `take` picks victims exactly as a sequential CLOCK over fully merged
/// bits would (the hand only ever reads merged words), and never visits a
/// slot twice in one call, so one batch lists each slot at most once.
/// Slot occupancy is tracked here too (a bitset), so evictions are counted
/// without the host knowing which row a slot holds.
pub struct ClockBits {
    cap: usize,
    hand: usize,
    /// Merged reference bits, 64 slots a word.
    bits: Vec<u64>,
    /// Slots that hold a row.
    filled: Vec<u64>,
    n_filled: usize,
    /// Slots the hand passed in the last `take` (sizes the next window).
    last_sweep: usize,
}

/// Result of one `ClockBits::take`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClockTake {
    pub slots: Vec<u32>,
    /// Of `slots`, how many held a row before (evictions).
    pub evicted: usize,
    /// Words of reference bits merged from the device.
    pub words_loaded: usize,
    /// Window loads (device round trips).
    pub loads: usize,
}

impl ClockBits {
    pub fn new(capacity: usize) -> Self {
        let words = capacity.div_ceil(64);
        ClockBits {
            cap: capacity,
            hand: 0,
            bits: vec![0; words],
            filled: vec![0; words],
            n_filled: 0,
            last_sweep: 0,
        }
    }
    pub fn capacity(&self) -> usize {
        self.cap
    }
    pub fn words(&self) -> usize {
        self.bits.len()
    }
    pub fn hand(&self) -> usize {
        self.hand
    }
    /// Slots that hold a row.
    pub fn filled(&self) -> usize {
        self.n_filled
    }

    /// Up to `n` victim slots, in hand order. `load(w0, nw, out)` must
    /// write the device's reference bits of words `w0, w0+1, ..` (`nw`
    /// words, cyclic over `words()`) into `out` and clear them there; they
    /// are ORed into the host's bits. Windows start at the hand's word and
    /// grow geometrically when the hand runs past them.
    pub fn take<E>(
        &mut self,
        n: usize,
        mut load: impl FnMut(usize, usize, &mut [u64]) -> std::result::Result<(), E>,
    ) -> std::result::Result<ClockTake, E> {
        let mut out = ClockTake::default();
        let nw_all = self.bits.len();
        if n == 0 || self.cap == 0 {
            return Ok(out);
        }
        let start_word = self.hand / 64;
        // Words merged so far in this call, counted from `start_word`.
        let mut merged = 0usize;
        let mut want = (2 * self.last_sweep.max(4 * n))
            .div_ceil(64)
            .max(16)
            .min(nw_all);
        let mut buf: Vec<u64> = Vec::new();
        let mut travelled = 0usize;
        while out.slots.len() < n && travelled < self.cap {
            let w = self.hand / 64;
            // Words from start_word up to and including w must be merged.
            let rel = (w + nw_all - start_word) % nw_all;
            if rel >= merged {
                let nw = want.min(nw_all - merged).max(1);
                buf.clear();
                buf.resize(nw, 0);
                load((start_word + merged) % nw_all, nw, &mut buf)?;
                for (i, &x) in buf.iter().enumerate() {
                    self.bits[(start_word + merged + i) % nw_all] |= x;
                }
                merged += nw;
                out.words_loaded += nw;
                out.loads += 1;
                want = (want * 2).min(nw_all);
                continue;
            }
            let b = self.hand % 64;
            let valid = (self.cap - w * 64).min(64);
            let in_word = valid - b;
            // Slots of this word at or after the hand, not past the travel limit.
            let span = in_word.min(self.cap - travelled);
            let range = if span == 64 {
                u64::MAX
            } else {
                ((1u64 << span) - 1) << b
            };
            let free = !self.bits[w] & range;
            if free == 0 {
                self.bits[w] &= !range;
                travelled += span;
                self.hand = (w * 64 + b + span) % self.cap;
                continue;
            }
            // Take this word's free slots in order, as many as wanted.
            let mut free = free;
            let mut s = b;
            while free != 0 && out.slots.len() < n {
                s = free.trailing_zeros() as usize;
                free &= free - 1;
                if self.filled[w] >> s & 1 == 1 {
                    out.evicted += 1;
                } else {
                    self.filled[w] |= 1 << s;
                    self.n_filled += 1;
                }
                out.slots.push((w * 64 + s) as u32);
            }
            // Referenced slots the hand passed lose their second chance.
            self.bits[w] &= !((u64::MAX >> (63 - s)) & range);
            travelled += s - b + 1;
            self.hand = (w * 64 + s + 1) % self.cap;
        }
        self.last_sweep = travelled;
        Ok(out)
    }
}

/// Distinct values of `rows` with the position of their first occurrence,
/// in first-occurrence order (a generation-stamped open-addressing set).
pub fn dedup_rows(rows: &[u32]) -> Vec<(u32, u32)> {
    let n = (2 * rows.len()).next_power_of_two().max(16);
    let shift = 32 - n.trailing_zeros();
    let mask = (n - 1) as u32;
    let mut keys = vec![EMPTY_ROW; n];
    let mut out = Vec::with_capacity(rows.len());
    for (i, &r) in rows.iter().enumerate() {
        if r == EMPTY_ROW {
            continue;
        }
        let mut b = row_hash(r, shift);
        loop {
            let k = keys[b as usize];
            if k == r {
                break;
            }
            if k == EMPTY_ROW {
                keys[b as usize] = r;
                out.push((r, i as u32));
                break;
            }
            b = (b + 1) & mask;
        }
    }
    out
}

/// CPU twin of the estimation cache's device admission (kernels/offload.cu
/// `ea_mark` .. `ea_take`), written the way the kernels split the work:
/// the reversed miss list in `pieces` contiguous pieces (first occurrences
/// counted per piece, then listed at piece prefix + rank), the slots in
/// chunks of `chunk` from the hand (unreferenced slots counted per chunk,
/// the hand stops after the n-th). Its choices equal `dedup_rows` over the
/// reversed list followed by `ClockBits::take` (CPU test
/// `device_admission_twin_equals_dedup_and_clock_bits`).
pub struct DeviceAdmissionTwin {
    /// One reference byte per slot (set by hits, cleared as the hand passes).
    pub refb: Vec<u8>,
    /// Whether each slot holds a row (for the eviction count).
    pub filled: Vec<bool>,
    pub hand: usize,
    pub pieces: usize,
    pub chunk: usize,
}

/// One admission of `DeviceAdmissionTwin::admit`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TwinAdmit {
    /// (row, position in the forward list) in admission order.
    pub rows: Vec<(u32, u32)>,
    pub slots: Vec<u32>,
    pub evicted: usize,
    pub unique: usize,
}

impl DeviceAdmissionTwin {
    pub fn new(capacity: usize, pieces: usize, chunk: usize) -> Self {
        DeviceAdmissionTwin {
            refb: vec![0; capacity],
            filled: vec![false; capacity],
            hand: 0,
            pieces: pieces.max(1),
            chunk: chunk.max(1),
        }
    }

    /// Admit the logged misses `list` (forward order), at most `max_admit`.
    pub fn admit(&mut self, list: &[u32], max_admit: usize) -> TwinAdmit {
        let l = list.len();
        // ea_mark: last position (+1) of each row.
        let mut last: HashMap<u32, usize> = HashMap::new();
        for (p, &r) in list.iter().enumerate() {
            let e = last.entry(r).or_insert(0);
            *e = (*e).max(p + 1);
        }
        let per = l.div_ceil(self.pieces);
        let piece = |g: usize| {
            let q0 = (g * per).min(l);
            q0..(q0 + per).min(l)
        };
        let first = |q: usize| last[&list[l - 1 - q]] == l - q;
        // ea_count (dedup half) + ea_scatter.
        let dcnt: Vec<usize> = (0..self.pieces)
            .map(|g| piece(g).filter(|&q| first(q)).count())
            .collect();
        let unique: usize = dcnt.iter().sum();
        let mut out = TwinAdmit {
            unique,
            ..Default::default()
        };
        let mut rows = vec![(0u32, 0u32); unique.min(max_admit)];
        let mut pre = 0;
        for (g, &c) in dcnt.iter().enumerate() {
            let mut u = pre;
            for q in piece(g) {
                if first(q) {
                    if u < max_admit {
                        let p = l - 1 - q;
                        rows[u] = (list[p], p as u32);
                    }
                    u += 1;
                }
            }
            pre += c;
        }
        // ea_count (CLOCK half) + the scatter's last CTA + ea_take.
        let cap = self.refb.len();
        let n = unique.min(max_admit);
        if cap == 0 || n == 0 {
            out.rows = rows;
            return out;
        }
        let nchunks = cap.div_ceil(self.chunk);
        let at = |j: usize| (self.hand + j) % cap;
        let ccnt: Vec<usize> = (0..nchunks)
            .map(|k| {
                (k * self.chunk..((k + 1) * self.chunk).min(cap))
                    .filter(|&j| self.refb[at(j)] == 0)
                    .count()
            })
            .collect();
        let total: usize = ccnt.iter().sum();
        let take = n.min(total);
        let full = total < n;
        let mut slots = vec![0u32; take];
        let mut new_hand = self.hand;
        let mut cpre = 0;
        for (k, &cnt) in ccnt.iter().enumerate() {
            if full || cpre < take {
                let mut rank = cpre;
                for j in k * self.chunk..((k + 1) * self.chunk).min(cap) {
                    let s = at(j);
                    if self.refb[s] == 0 {
                        if rank < take {
                            slots[rank] = s as u32;
                            if rank + 1 == take && !full {
                                new_hand = (self.hand + j + 1) % cap;
                            }
                        }
                        rank += 1;
                    } else if full || rank < take {
                        self.refb[s] = 0;
                    }
                }
            }
            cpre += cnt;
        }
        self.hand = new_hand;
        for &s in &slots {
            if std::mem::replace(&mut self.filled[s as usize], true) {
                out.evicted += 1;
            }
        }
        rows.truncate(take);
        out.rows = rows;
        out.slots = slots;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn repeated_working_set_hits_and_never_exceeds_capacity() {
        let mut c = RowCache::new(100, 256);
        let set: Vec<u64> = (0..80)
            .map(|i| row_key(i / 8, (i % 8) as usize, 3))
            .collect();
        c.access(&set);
        assert_eq!(c.stats().misses, 80);
        c.access(&set);
        assert_eq!(
            c.stats().hits,
            80,
            "a working set smaller than the cache stays resident"
        );
        assert_eq!(c.stats().bytes_copied, 80 * 256);
        let mut rng = Rng::new(3);
        for _ in 0..50 {
            let keys: Vec<u64> = (0..40)
                .map(|_| row_key(rng.below(1000) as u32, 0, 0))
                .collect();
            c.access(&keys);
            assert!(c.slot_of.len() <= 100);
            for k in &keys[30..] {
                assert!(c.contains(*k), "a row just read is resident");
            }
        }
        let st = c.stats();
        assert!(st.evictions > 0 && st.hits + st.misses == 160 + 50 * 40);
    }

    #[test]
    fn invalidation_drops_exactly_the_pages_rows() {
        let mut c = RowCache::new(64, 256);
        let keys: Vec<u64> = (0..4u32)
            .flat_map(|p| (0..4).map(move |o| row_key(p, 1, o)))
            .collect();
        c.access(&keys);
        c.invalidate_pages(&[1, 3]);
        for &k in &keys {
            assert_eq!(c.contains(k), page_of(k).is_multiple_of(2), "row {k:x}");
        }
        c.access(&keys);
        assert_eq!(c.stats().misses, 16 + 8);
    }

    /// The host map and its device mirror (built only from `take_updates`)
    /// agree under random inserts and removes, probed as the kernel probes.
    #[test]
    fn row_slot_map_mirror_matches_a_hash_map() {
        let mut rng = Rng::new(11);
        let mut m = RowSlotMap::new(300);
        let mut dev = vec![u64::MAX; m.buckets()];
        let mut refm: HashMap<u32, u32> = HashMap::new();
        for step in 0..20_000 {
            // A small key space so collisions and wrap-around chains occur.
            let row = rng.below(2000) as u32;
            if refm.len() < 300 && rng.below(2) == 0 {
                let slot = rng.below(1 << 20) as u32;
                m.insert(row, slot);
                refm.insert(row, slot);
            } else {
                assert_eq!(m.remove(row), refm.remove(&row), "step {step}");
            }
            for (b, e) in m.take_updates() {
                dev[b as usize] = e;
            }
            if step % 97 == 0 {
                for r in 0..2000u32 {
                    assert_eq!(probe_device_map(&dev, m.shift(), r), refm.get(&r).copied());
                    assert_eq!(m.get(r), refm.get(&r).copied());
                }
            }
            assert_eq!(m.len(), refm.len());
        }
    }

    /// Device-side protocol simulated on the CPU: lookups through the
    /// mirrored map read arena rows that equal the host rows bit for bit,
    /// misses are admitted by CLOCK, capacity is never exceeded, a
    /// repeated working set that fits ends up all hits.
    #[test]
    fn est_row_cache_round_trips_rows_through_the_mirror() {
        let d = 4usize;
        let n_rows = 5000u32;
        let mut rng = Rng::new(2);
        let host: Vec<u32> = (0..n_rows as usize * d)
            .map(|_| rng.next_u64() as u32)
            .collect();
        let cap = 256usize;
        let mut c = EstRowCache::new(cap);
        let mut dev_map = vec![u64::MAX; c.map.buckets()];
        let mut arena = vec![0u32; cap * d];
        let mut dev_ref = vec![0u8; cap];
        let hot: Vec<u32> = (0..200)
            .map(|_| rng.below(n_rows as usize) as u32)
            .collect();
        let mut last_hits = 0;
        for step in 0..60 {
            let reads: Vec<u32> = (0..400)
                .map(|i| {
                    if step >= 40 || i % 2 == 0 {
                        hot[rng.below(hot.len())]
                    } else {
                        rng.below(n_rows as usize) as u32
                    }
                })
                .collect();
            let (mut hits, mut misses) = (0, Vec::new());
            for &r in &reads {
                let row = match probe_device_map(&dev_map, c.map.shift(), r) {
                    Some(s) => {
                        hits += 1;
                        dev_ref[s as usize] = 1;
                        &arena[s as usize * d..(s as usize + 1) * d]
                    }
                    None => {
                        misses.push(r);
                        &host[r as usize * d..(r as usize + 1) * d]
                    }
                };
                assert_eq!(row, &host[r as usize * d..(r as usize + 1) * d], "row {r}");
            }
            c.record(hits, misses.len() as u64);
            c.merge_referenced(&dev_ref);
            dev_ref.iter_mut().for_each(|b| *b = 0);
            for a in c.admit(&misses, 16, usize::MAX) {
                let (s, r) = (a.slot as usize, a.row as usize);
                arena[s * d..(s + 1) * d].copy_from_slice(&host[r * d..(r + 1) * d]);
            }
            for (b, e) in c.map.take_updates() {
                dev_map[b as usize] = e;
            }
            assert!(c.map.len() <= cap);
            if step == 59 {
                last_hits = hits;
            }
        }
        assert_eq!(last_hits, 400, "the hot set (200 rows) fits in 256 slots");
        assert!(c.stats.evictions > 100, "{:?}", c.stats);
        assert_eq!(c.stats.hits + c.stats.misses, 60 * 400);
    }

    /// A batch larger than the cache: every slot appears at most once in
    /// the admission list and each admitted row is resident where listed.
    #[test]
    fn oversized_admission_batch_lists_each_slot_once() {
        let mut c = EstRowCache::new(64);
        let first: Vec<u32> = (0..40).collect();
        c.admit(&first, 8, usize::MAX);
        c.merge_referenced(&[1u8; 64]);
        let rows: Vec<u32> = (1000..1300).chain(0..40).collect();
        let adm = c.admit(&rows, 8, usize::MAX);
        assert_eq!(EstRowCache::new(64).admit(&rows, 8, 10).len(), 10);
        assert!(!adm.is_empty() && adm.len() <= 64);
        let mut slots: Vec<u32> = adm.iter().map(|a| a.slot).collect();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), adm.len(), "a slot listed twice");
        for a in &adm {
            assert_eq!(c.slot(a.row), Some(a.slot));
            assert_eq!(rows[a.index as usize], a.row);
        }
        assert_eq!(c.map.len(), 64);
    }

    /// Sequential CLOCK over fully merged bits, one slot at a time: the
    /// reference for `ClockBits::take` (which merges lazily, a word at a
    /// time, and skips whole words).
    struct ClockRef {
        hand: usize,
        refd: Vec<bool>,
        filled: Vec<bool>,
    }
    impl ClockRef {
        fn take(&mut self, n: usize, dev: &mut [bool]) -> (Vec<u32>, usize) {
            let cap = self.refd.len();
            for (r, d) in self.refd.iter_mut().zip(dev.iter_mut()) {
                *r |= *d;
                *d = false;
            }
            let (mut out, mut ev, mut trav) = (Vec::new(), 0, 0);
            while out.len() < n && trav < cap {
                let s = self.hand;
                self.hand = (s + 1) % cap;
                trav += 1;
                if self.refd[s] {
                    self.refd[s] = false;
                    continue;
                }
                ev += self.filled[s] as usize;
                self.filled[s] = true;
                out.push(s as u32);
            }
            (out, ev)
        }
    }

    /// Lazy word-wise merging picks exactly the victims of a sequential
    /// CLOCK that merges every bit every step, over random hit patterns,
    /// capacities that are not multiples of 64 and batches larger than the
    /// cache; no slot twice in a batch.
    #[test]
    fn clock_bits_equal_sequential_clock() {
        let mut rng = Rng::new(5);
        for &cap in &[1usize, 63, 64, 65, 200, 1000, 4097] {
            let mut c = ClockBits::new(cap);
            let mut r = ClockRef {
                hand: 0,
                refd: vec![false; cap],
                filled: vec![false; cap],
            };
            // Device bytes not merged by the lazy side yet.
            let mut dev = vec![false; cap];
            let mut loaded = 0;
            for step in 0..300 {
                let p = [0, 1, 5, 9, 10][step % 5];
                let mut hits: Vec<bool> = (0..cap).map(|_| rng.below(10) < p).collect();
                for (d, h) in dev.iter_mut().zip(&hits) {
                    *d |= *h;
                }
                let n = match step % 7 {
                    0 => cap + 3,
                    1 => 0,
                    _ => rng.below(cap / 4 + 2),
                };
                let (want, want_ev) = r.take(n, &mut hits);
                let got = c
                    .take(n, |w0, nw, out: &mut [u64]| -> Result<(), ()> {
                        assert!(nw <= c_words(cap));
                        for (i, o) in out.iter_mut().enumerate() {
                            let w = (w0 + i) % c_words(cap);
                            for bit in 0..64 {
                                let s = w * 64 + bit;
                                if s < cap && dev[s] {
                                    *o |= 1 << bit;
                                    dev[s] = false;
                                }
                            }
                        }
                        Ok(())
                    })
                    .unwrap();
                assert_eq!(got.slots, want, "cap {cap} step {step} n {n}");
                assert_eq!(got.evicted, want_ev);
                loaded += got.words_loaded;
                let mut s = got.slots.clone();
                s.sort_unstable();
                s.dedup();
                assert_eq!(s.len(), got.slots.len(), "a slot twice in one batch");
                assert_eq!(c.hand(), r.hand);
                assert_eq!(c.filled(), r.filled.iter().filter(|&&f| f).count());
                // Bits not merged yet stay on the device until the hand
                // reaches their word: host OR device equals the reference.
                for (i, (&d, &want)) in dev.iter().zip(&r.refd).enumerate() {
                    let host = c.bits[i / 64] >> (i % 64) & 1 == 1;
                    assert_eq!(host || d, want, "cap {cap} step {step} slot {i}");
                }
            }
            if cap >= 1000 {
                assert!(
                    loaded < 300 * c_words(cap),
                    "windows should not always be whole"
                );
            }
        }
    }

    fn c_words(cap: usize) -> usize {
        cap.div_ceil(64)
    }

    #[test]
    fn dedup_rows_keeps_first_occurrences() {
        let mut rng = Rng::new(9);
        for len in [0usize, 1, 7, 100, 5000] {
            let rows: Vec<u32> = (0..len).map(|_| rng.below(len / 3 + 2) as u32).collect();
            let got = dedup_rows(&rows);
            let mut seen = HashSet::new();
            let want: Vec<(u32, u32)> = rows
                .iter()
                .enumerate()
                .filter(|(_, r)| seen.insert(**r))
                .map(|(i, &r)| (r, i as u32))
                .collect();
            assert_eq!(got, want);
        }
        assert_eq!(dedup_rows(&[EMPTY_ROW, 3, 3]), vec![(3, 1)]);
    }

    /// The device admission, as the kernels split it (pieces, chunks), makes
    /// the host-side path's choices: `dedup_rows` over the reversed miss
    /// list, then `ClockBits::take` over the same reference bits; same rows,
    /// slots, hand and eviction counts, on random lists with duplicates,
    /// limits, full turns and capacities that are not multiples of anything.
    #[test]
    fn device_admission_twin_equals_dedup_and_clock_bits() {
        let mut rng = Rng::new(77);
        for &(cap, pieces, chunk) in &[
            (1usize, 3usize, 4usize),
            (65, 7, 16),
            (1000, 13, 64),
            (4097, 256, 4096),
        ] {
            let mut t = DeviceAdmissionTwin::new(cap, pieces, chunk);
            let mut c = ClockBits::new(cap);
            let mut dev = vec![false; cap];
            for step in 0..200 {
                let p = [0, 1, 5, 9, 10][step % 5];
                for s in 0..cap {
                    if rng.below(10) < p {
                        dev[s] = true;
                        t.refb[s] = 1;
                    }
                }
                let len = match step % 6 {
                    0 => 0,
                    1 => 3 * cap + 5,
                    _ => rng.below(cap + 10),
                };
                let list: Vec<u32> = (0..len).map(|_| rng.below(2 * cap + 20) as u32).collect();
                // Half the cache (the default), a few rows, or the whole
                // cache (`HostEstimation::with_admit_all`).
                let max_admit = match step % 9 {
                    4 => 3,
                    7 => cap,
                    _ => (cap / 2).max(1),
                };
                let got = t.admit(&list, max_admit);
                let mut rev = list.clone();
                rev.reverse();
                let uniq = dedup_rows(&rev);
                let n = uniq.len().min(max_admit);
                let want = c
                    .take(n, |w0, _nw, out: &mut [u64]| -> Result<(), ()> {
                        for (i, o) in out.iter_mut().enumerate() {
                            let w = (w0 + i) % c_words(cap);
                            for bit in 0..64 {
                                let s = w * 64 + bit;
                                if s < cap && dev[s] {
                                    *o |= 1 << bit;
                                    dev[s] = false;
                                }
                            }
                        }
                        Ok(())
                    })
                    .unwrap();
                let want_rows: Vec<(u32, u32)> = uniq[..want.slots.len()]
                    .iter()
                    .map(|&(r, pos)| (r, (list.len() - 1 - pos as usize) as u32))
                    .collect();
                assert_eq!(got.unique, uniq.len(), "cap {cap} step {step}");
                assert_eq!(got.slots, want.slots, "cap {cap} step {step} n {n}");
                assert_eq!(got.rows, want_rows, "cap {cap} step {step}");
                assert_eq!(got.evicted, want.evicted, "cap {cap} step {step}");
                assert_eq!(t.hand, c.hand(), "cap {cap} step {step}");
            }
        }
    }
}
