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
            assert_eq!(c.contains(k), page_of(k) % 2 == 0, "row {k:x}");
        }
        c.access(&keys);
        assert_eq!(c.stats().misses, 16 + 8);
    }
}
