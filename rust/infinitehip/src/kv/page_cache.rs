//! Device page cache over the host tier (InfiniteHiP offload, DESIGN 3.5).
//!
//! The host `KvPool` holds every page. A `PageCache` holds a fixed number of
//! slots (on the CPU backend a second arena standing in for device memory)
//! and maps head blocks — one KV head's part of one host page, `[page_size]
//! [dim]` for K and for V — to slots with LRU replacement. Caching per head,
//! not per page, matters: each KV head selects its own scattered blocks, so a
//! whole-page cache needs about n_kv_heads times the slots for the same step.
//! Each decode step asks for the head blocks its selection touches in one
//! `resolve` call: hits map to their slot, misses are copied host -> slot in
//! one batch. Pinned blocks (sink and window) are never evicted. The
//! attention kernel then reads through the step's slot table (`view`), so
//! what it reads is bit-for-bit what the host holds.
//!
//! Replacement is exact LRU in O(1) per access: evictable resident slots sit
//! in an intrusive doubly linked list ordered by last use (head = least
//! recent), free slots on a stack. Pinned slots leave the list; `unpin_all`
//! puts them back at the recent end in the order of their last use (an
//! unpin counts as a use). A victim is the list head unless the head was
//! used in the current step (then the list is walked, which only happens
//! when the cache cannot hold the step and the call fails anyway).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// Multiplicative hasher for `HeadBlock` keys (two u32 writes): the step's
/// ~1000 lookups cost a few ns each instead of SipHash's tens. Not
/// collision-resistant; keys come from the plugin's own page tables.
#[derive(Default)]
pub struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        // Fold the high bits down: hashbrown takes its bucket from the low
        // bits and its tag from the top 7.
        let x = self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^ (x >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u8(b);
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.write_u64(i as u64);
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(i as u64);
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(26) ^ i).wrapping_mul(0xff51_afd7_ed55_8ccd);
    }
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
}

type BlockMap<V> = HashMap<HeadBlock, V, BuildHasherDefault<BlockHasher>>;
type BlockSet = HashSet<HeadBlock, BuildHasherDefault<BlockHasher>>;
use std::ops::Range;

use super::{KvLayout, KvPool, SeqView};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::policy::Selection;

/// Cumulative counters (reset with `take_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub bytes_copied: u64,
    pub evictions: u64,
}

impl CacheStats {
    pub fn hit_ratio(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            1.0
        } else {
            self.hits as f64 / n as f64
        }
    }
}

/// One KV head's part of one host page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HeadBlock {
    pub page: u32,
    pub head: u32,
}

/// Misses a `resolve_slots` call assigned: (index into the request, slot).
pub type Fills = Vec<(usize, u32)>;

pub struct PageCache<T: Element> {
    layout: KvLayout,
    k: Vec<Box<[T]>>,
    v: Vec<Box<[T]>>,
    /// Head block held by each slot.
    holder: Vec<Option<HeadBlock>>,
    slot_of: BlockMap<u32>,
    lru: Lru,
    tick: u64,
    stats: CacheStats,
}

const NIL: u32 = u32::MAX;

/// Recency bookkeeping of the slots: the intrusive LRU list of evictable
/// resident slots, the free stack and the pinned set.
struct Lru {
    /// Step (`begin_step` tick) of each slot's last use.
    last_used: Vec<u64>,
    /// Global order of last use (unpins included); increasing along the list.
    stamp: Vec<u64>,
    clock: u64,
    pinned: Vec<bool>,
    pinned_slots: Vec<u32>,
    prev: Vec<u32>,
    next: Vec<u32>,
    in_list: Vec<bool>,
    head: u32,
    tail: u32,
    /// Free slots; popped in ascending slot order at first.
    free: Vec<u32>,
}

impl Lru {
    fn new(n: usize) -> Self {
        Lru {
            last_used: vec![0; n],
            stamp: vec![0; n],
            clock: 0,
            pinned: vec![false; n],
            pinned_slots: Vec::new(),
            prev: vec![NIL; n],
            next: vec![NIL; n],
            in_list: vec![false; n],
            head: NIL,
            tail: NIL,
            free: (0..n as u32).rev().collect(),
        }
    }

    fn unlink(&mut self, s: u32) {
        let i = s as usize;
        if !self.in_list[i] {
            return;
        }
        let (p, n) = (self.prev[i], self.next[i]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[i] = NIL;
        self.next[i] = NIL;
        self.in_list[i] = false;
    }

    fn push_tail(&mut self, s: u32) {
        let i = s as usize;
        self.prev[i] = self.tail;
        self.next[i] = NIL;
        if self.tail == NIL {
            self.head = s;
        } else {
            self.next[self.tail as usize] = s;
        }
        self.tail = s;
        self.in_list[i] = true;
    }

    /// A resident slot is used at `tick`; `pin` keeps it until `unpin_all`.
    fn touch(&mut self, s: u32, tick: u64, pin: bool) {
        let i = s as usize;
        self.clock += 1;
        self.stamp[i] = self.clock;
        self.last_used[i] = tick;
        if self.pinned[i] {
            return;
        }
        self.unlink(s);
        if pin {
            self.pinned[i] = true;
            self.pinned_slots.push(s);
        } else {
            self.push_tail(s);
        }
    }

    /// A free slot, else the least recently used evictable slot not used at
    /// `tick` (taken out of the list).
    fn victim(&mut self, tick: u64) -> Option<(u32, bool)> {
        if let Some(f) = self.free.pop() {
            return Some((f, false));
        }
        let mut s = self.head;
        while s != NIL {
            if self.last_used[s as usize] != tick {
                self.unlink(s);
                return Some((s, true));
            }
            s = self.next[s as usize];
        }
        None
    }

    fn unpin_all(&mut self) {
        let mut ps = std::mem::take(&mut self.pinned_slots);
        ps.sort_unstable_by_key(|&s| self.stamp[s as usize]);
        for &s in &ps {
            self.pinned[s as usize] = false;
            self.clock += 1;
            self.stamp[s as usize] = self.clock;
            self.push_tail(s);
        }
        ps.clear();
        self.pinned_slots = ps;
    }

    /// The slot no longer holds anything.
    fn release(&mut self, s: u32) {
        self.unlink(s);
        if self.pinned[s as usize] {
            self.pinned[s as usize] = false;
            self.pinned_slots.retain(|&x| x != s);
        }
        self.free.push(s);
    }
}

impl<T: Element> PageCache<T> {
    /// A cache of `n_slots` head blocks (`n_kv_heads` slots = one page).
    pub fn new(layout: KvLayout, n_slots: usize) -> Result<Self> {
        if n_slots == 0 {
            return Err(Error::Invalid("page cache needs at least one slot".into()));
        }
        let pe = Self::block_elems(&layout);
        Ok(PageCache {
            layout,
            k: (0..n_slots)
                .map(|_| vec![T::default(); pe].into_boxed_slice())
                .collect(),
            v: (0..n_slots)
                .map(|_| vec![T::default(); pe].into_boxed_slice())
                .collect(),
            holder: vec![None; n_slots],
            slot_of: BlockMap::default(),
            lru: Lru::new(n_slots),
            tick: 0,
            stats: CacheStats::default(),
        })
    }

    /// The replacement policy without a slot arena: `resolve_slots` only
    /// (the slots live elsewhere, e.g. in device memory). `bytes` still
    /// reports what the slots take there.
    pub fn policy_only(layout: KvLayout, n_slots: usize) -> Result<Self> {
        if n_slots == 0 {
            return Err(Error::Invalid("page cache needs at least one slot".into()));
        }
        Ok(PageCache {
            layout,
            k: Vec::new(),
            v: Vec::new(),
            holder: vec![None; n_slots],
            slot_of: BlockMap::default(),
            lru: Lru::new(n_slots),
            tick: 0,
            stats: CacheStats::default(),
        })
    }

    fn block_elems(layout: &KvLayout) -> usize {
        layout.page_size * layout.head_dim
    }

    pub fn n_slots(&self) -> usize {
        self.holder.len()
    }

    /// Bytes of slot memory (the device budget).
    pub fn bytes(&self) -> usize {
        self.n_slots() * 2 * Self::block_elems(&self.layout) * std::mem::size_of::<T>()
    }

    pub fn resident(&self) -> usize {
        self.slot_of.len()
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    pub fn take_stats(&mut self) -> CacheStats {
        std::mem::take(&mut self.stats)
    }

    pub fn slot_of(&self, block: HeadBlock) -> Option<u32> {
        self.slot_of.get(&block).copied()
    }

    /// Host data of one head block.
    fn host_block<'h>(&self, host: &'h KvPool<T>, b: HeadBlock) -> Result<(&'h [T], &'h [T])> {
        let (hk, hv) = host.page_data(b.page)?;
        let n = Self::block_elems(&self.layout);
        let o = b.head as usize * n;
        if o + n > hk.len() {
            return Err(Error::OutOfRange(format!(
                "KV head {} of page {}",
                b.head, b.page
            )));
        }
        Ok((&hk[o..o + n], &hv[o..o + n]))
    }

    /// Start a step: blocks resolved from now until the next `begin_step`
    /// are all in use together (a batch's sequences), so none of them is
    /// evicted to make room for another.
    pub fn begin_step(&mut self) {
        self.tick += 1;
    }

    /// Make `blocks` resident and return their slots, in order. Blocks used
    /// in the current step (since `begin_step`) are never evicted. `pin`:
    /// keep them resident until `unpin_all` (sink and window).
    pub fn resolve(
        &mut self,
        host: &KvPool<T>,
        pages: &[HeadBlock],
        pin: bool,
    ) -> Result<Vec<u32>> {
        if self.k.is_empty() {
            return Err(Error::Invalid(
                "page cache: resolve on a policy-only cache (no slot arena); use resolve_slots"
                    .into(),
            ));
        }
        // Check every block against the host first, so a bad block leaves
        // the cache unchanged.
        for &p in pages {
            self.host_block(host, p)?;
        }
        let (out, fills) = self.resolve_slots(pages, pin)?;
        for (i, s) in fills {
            let (hk, hv) = self.host_block(host, pages[i])?;
            self.k[s as usize].copy_from_slice(hk);
            self.v[s as usize].copy_from_slice(hv);
        }
        Ok(out)
    }

    /// The replacement policy alone: assign slots to `pages` exactly as
    /// `resolve` does (hits, LRU victims, pinning, stats) without copying
    /// any data. Returns the slots in order and the misses to fill, as
    /// (index into `pages`, slot). A device backend copies those blocks
    /// itself (see `backend::cuda::offload`).
    pub fn resolve_slots(&mut self, pages: &[HeadBlock], pin: bool) -> Result<(Vec<u32>, Fills)> {
        let tick = self.tick;
        let block_bytes = (2 * Self::block_elems(&self.layout) * std::mem::size_of::<T>()) as u64;
        let mut out = Vec::with_capacity(pages.len());
        let mut misses = Vec::new();
        let mut fills = Vec::new();
        let mut seen = BlockSet::with_capacity_and_hasher(pages.len(), Default::default());
        for &p in pages {
            if !seen.insert(p) {
                // Listed twice: counted once, filled in below.
                misses.push(out.len());
                out.push(u32::MAX);
                continue;
            }
            match self.slot_of.get(&p) {
                Some(&s) => {
                    self.lru.touch(s, tick, pin);
                    self.stats.hits += 1;
                    out.push(s);
                }
                None => {
                    misses.push(out.len());
                    out.push(u32::MAX);
                }
            }
        }
        for i in misses {
            let p = pages[i];
            if let Some(&s) = self.slot_of.get(&p) {
                // Listed twice in this request: already resident now.
                out[i] = s;
                continue;
            }
            let (s, _) = self.lru.victim(tick).ok_or_else(|| {
                Error::Invalid(format!(
                    "page cache of {} slots cannot hold this step's pages (pinned or in use); raise the device cache size",
                    self.n_slots()
                ))
            })?;
            let s = s as usize;
            if let Some(old) = self.holder[s].take() {
                self.slot_of.remove(&old);
                self.stats.evictions += 1;
            }
            self.holder[s] = Some(p);
            self.slot_of.insert(p, s as u32);
            self.lru.touch(s as u32, tick, pin);
            self.stats.misses += 1;
            self.stats.bytes_copied += block_bytes;
            out[i] = s as u32;
            fills.push((i, s as u32));
        }
        Ok((out, fills))
    }

    /// Release every pin (O(pinned slots)); they rejoin the LRU order as
    /// just used, in the order of their last use.
    pub fn unpin_all(&mut self) {
        self.lru.unpin_all();
    }

    /// Slots currently pinned.
    pub fn n_pinned(&self) -> usize {
        self.lru.pinned_slots.len()
    }

    /// Write-through after the host changed `page` (an append into a partly
    /// filled page): refresh the cached copies so no stale data is ever read.
    pub fn refresh(&mut self, host: &KvPool<T>, page: u32) -> Result<()> {
        for head in 0..self.layout.n_kv_heads as u32 {
            let b = HeadBlock { page, head };
            if let Some(&s) = self.slot_of.get(&b) {
                if self.k.is_empty() {
                    return Err(Error::Invalid(
                        "page cache: refresh on a policy-only cache (no slot arena)".into(),
                    ));
                }
                let (hk, hv) = self.host_block(host, b)?;
                self.k[s as usize].copy_from_slice(hk);
                self.v[s as usize].copy_from_slice(hv);
                self.stats.bytes_copied += (2 * hk.len() * std::mem::size_of::<T>()) as u64;
            }
        }
        Ok(())
    }

    /// Drop a page's head blocks (the page was freed or rewritten on the host).
    pub fn invalidate(&mut self, page: u32) {
        for head in 0..self.layout.n_kv_heads as u32 {
            if let Some(s) = self.slot_of.remove(&HeadBlock { page, head }) {
                self.holder[s as usize] = None;
                self.lru.release(s);
            }
        }
    }

    /// Slot contents, for round-trip checks.
    pub fn slot_data(&self, slot: u32) -> (&[T], &[T]) {
        (&self.k[slot as usize], &self.v[slot as usize])
    }

    /// A view of a `len`-token sequence whose logical page i, KV head h lives
    /// in `slots[i * n_kv_heads + h]` (None: not resident; reading it is a
    /// caller bug and panics).
    pub fn view(&self, len: usize, slots: &[Option<u32>]) -> SeqView<'_, T> {
        SeqView::head_split(
            self.layout,
            len,
            slots.iter().map(|s| match s {
                Some(s) => (&self.k[*s as usize][..], &self.v[*s as usize][..]),
                None => (&[][..], &[][..]),
            }),
        )
    }
}

/// CPU twin of the device page-cache policy (kernels/offload.cu `pc_walk`
/// + `pc_clock`, driven by `backend::cuda::offload` with
/// `PagePolicy::Device`): CLOCK over slots of head blocks. A step marks its
/// blocks (duplicates counted once); a resident block is a hit (its slot is
/// "used this step" and referenced); the misses, sorted by block id, take
/// victims in hand order: a slot not used this step that is empty or
/// unreferenced is taken, any other slot the hand passes loses its
/// reference. At most two turns; a step whose blocks do not fit fails (the
/// victims found are still assigned, as on the device). Not the same
/// choices as `PageCache`'s exact LRU; the GPU test compares the device's
/// maps with this twin after every step.
pub struct PageClock {
    /// Slot of each head block (`page * n_kv_heads + head`), -1 if none.
    pub block_slot: Vec<i32>,
    /// Head block each slot holds, -1 if empty.
    pub slot_block: Vec<i32>,
    slot_step: Vec<u32>,
    slot_ref: Vec<u8>,
    stamp: Vec<u32>,
    hand: usize,
    step: u32,
    pub stats: CacheStats,
}

impl PageClock {
    pub fn new(n_blocks: usize, n_slots: usize) -> Self {
        PageClock {
            block_slot: vec![-1; n_blocks],
            slot_block: vec![-1; n_slots],
            slot_step: vec![0; n_slots],
            slot_ref: vec![0; n_slots],
            stamp: vec![0; n_blocks],
            hand: 0,
            step: 0,
            stats: CacheStats::default(),
        }
    }

    pub fn hand(&self) -> usize {
        self.hand
    }

    /// One step over `blocks` (head block ids, any order). Returns the
    /// fills (block, slot) in assignment order; Err(fills) when the cache
    /// could not hold the step's blocks.
    pub fn step(
        &mut self,
        blocks: &[u32],
    ) -> std::result::Result<Vec<(u32, u32)>, Vec<(u32, u32)>> {
        self.step = self.step.wrapping_add(1);
        let step = self.step;
        let mut miss: Vec<u32> = Vec::new();
        for &hb in blocks {
            let b = hb as usize;
            if self.stamp[b] == step {
                continue;
            }
            self.stamp[b] = step;
            match self.block_slot[b] {
                s if s >= 0 => {
                    self.slot_step[s as usize] = step;
                    self.slot_ref[s as usize] = 1;
                    self.stats.hits += 1;
                }
                _ => miss.push(hb),
            }
        }
        miss.sort_unstable();
        self.stats.misses += miss.len() as u64;
        let n = self.slot_block.len();
        let mut victims: Vec<u32> = Vec::with_capacity(miss.len());
        let mut pos = 0usize;
        while victims.len() < miss.len() && pos < 2 * n {
            let s = (self.hand + pos) % n;
            pos += 1;
            if self.slot_step[s] != step && (self.slot_block[s] < 0 || self.slot_ref[s] == 0) {
                self.slot_step[s] = step;
                victims.push(s as u32);
            } else {
                self.slot_ref[s] = 0;
            }
        }
        self.hand = (self.hand + pos) % n;
        let mut fills = Vec::with_capacity(victims.len());
        for (&hb, &s) in miss.iter().zip(&victims) {
            let old = self.slot_block[s as usize];
            if old >= 0 {
                self.block_slot[old as usize] = -1;
                self.stats.evictions += 1;
            }
            self.slot_block[s as usize] = hb as i32;
            self.block_slot[hb as usize] = s as i32;
            self.slot_ref[s as usize] = 1;
            fills.push((hb, s));
        }
        if victims.len() < miss.len() {
            Err(fills)
        } else {
            Ok(fills)
        }
    }
}

/// (logical page, KV head) pairs the tokens of `sel` touch, ascending.
pub fn head_blocks_touched(sel: &Selection, page_size: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (h, ranges) in sel.heads.iter().enumerate() {
        for r in ranges {
            out.extend((r.start / page_size..r.end.div_ceil(page_size)).map(|p| (p, h)));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Logical pages of a sequence that the tokens of `sel` touch, ascending.
pub fn pages_touched(sel: &Selection, page_size: usize) -> Vec<usize> {
    let mut pages: Vec<usize> = sel
        .heads
        .iter()
        .flatten()
        .flat_map(|r: &Range<usize>| r.start / page_size..r.end.div_ceil(page_size))
        .collect();
    pages.sort_unstable();
    pages.dedup();
    pages
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The policy-only cache (what the GPU backend drives) assigns exactly
    /// the slots the arena cache does, reports its misses as fills, and the
    /// arena cache's slots hold the host blocks bit for bit.
    #[test]
    fn resolve_slots_twins_resolve() {
        let lay = KvLayout {
            n_kv_heads: 2,
            head_dim: 8,
            page_size: 4,
        };
        let mut host = KvPool::<f32>::new(lay, None).unwrap();
        host.add_sequence(0).unwrap();
        let mut rng = Rng::new(7);
        let n = 400 * 16;
        let k: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        host.append(0, &k, &v).unwrap();
        let table = host.page_table(0).unwrap().to_vec();
        let mut a = PageCache::<f32>::new(lay, 13).unwrap();
        let mut b = PageCache::<f32>::policy_only(lay, 13).unwrap();
        let mut fills_total = 0;
        for step in 0..200 {
            a.begin_step();
            b.begin_step();
            // As a decode step does: pins last one step.
            a.unpin_all();
            b.unpin_all();
            let req: Vec<HeadBlock> = (0..1 + rng.below(10))
                .map(|_| HeadBlock {
                    page: table[rng.below(table.len())],
                    head: rng.below(2) as u32,
                })
                .collect();
            let pin = step % 11 == 0;
            let sa = a.resolve(&host, &req, pin).unwrap();
            let (sb, fills) = b.resolve_slots(&req, pin).unwrap();
            assert_eq!(sa, sb, "step {step}");
            fills_total += fills.len();
            for (i, s) in &fills {
                assert_eq!(sb[*i], *s);
            }
            for (blk, &s) in req.iter().zip(&sa) {
                let (hk, hv) = a.host_block(&host, *blk).unwrap();
                assert_eq!(a.slot_data(s), (hk, hv));
            }
            assert_eq!(a.stats(), b.stats());
        }
        assert_eq!(fills_total as u64, b.stats().misses);
        assert!(b.stats().evictions > 100);
        let e = b.resolve(&host, &[], false).unwrap_err();
        assert!(e.to_string().contains("policy-only"), "{e}");
    }

    /// Brute-force LRU: victims by a full scan for the least recent stamp
    /// (the definition the O(1) list must reproduce).
    struct RefLru {
        holder: Vec<Option<HeadBlock>>,
        slot_of: HashMap<HeadBlock, u32>,
        stamp: Vec<u64>,
        last_used: Vec<u64>,
        pinned: Vec<bool>,
        free: Vec<u32>,
        clock: u64,
        tick: u64,
        stats: CacheStats,
    }

    impl RefLru {
        fn new(n: usize) -> Self {
            RefLru {
                holder: vec![None; n],
                slot_of: HashMap::new(),
                stamp: vec![0; n],
                last_used: vec![0; n],
                pinned: vec![false; n],
                free: (0..n as u32).rev().collect(),
                clock: 0,
                tick: 0,
                stats: CacheStats::default(),
            }
        }
        fn touch(&mut self, s: usize, pin: bool) {
            self.clock += 1;
            self.stamp[s] = self.clock;
            self.last_used[s] = self.tick;
            self.pinned[s] |= pin;
        }
        fn resolve(&mut self, pages: &[HeadBlock], pin: bool) -> Option<Vec<u32>> {
            let mut out = vec![u32::MAX; pages.len()];
            let mut misses = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for (i, p) in pages.iter().enumerate() {
                match self.slot_of.get(p).copied() {
                    Some(s) if seen.insert(*p) => {
                        self.touch(s as usize, pin);
                        self.stats.hits += 1;
                        out[i] = s;
                    }
                    _ => {
                        seen.insert(*p);
                        misses.push(i);
                    }
                }
            }
            for i in misses {
                if let Some(&s) = self.slot_of.get(&pages[i]) {
                    out[i] = s;
                    continue;
                }
                let s = match self.free.pop() {
                    Some(f) => f as usize,
                    None => (0..self.holder.len())
                        .filter(|&s| !self.pinned[s] && self.last_used[s] != self.tick)
                        .min_by_key(|&s| self.stamp[s])?,
                };
                if let Some(old) = self.holder[s].take() {
                    self.slot_of.remove(&old);
                    self.stats.evictions += 1;
                }
                self.holder[s] = Some(pages[i]);
                self.slot_of.insert(pages[i], s as u32);
                self.pinned[s] = false;
                self.touch(s, pin);
                self.stats.misses += 1;
                out[i] = s as u32;
            }
            Some(out)
        }
        fn unpin_all(&mut self) {
            let mut ps: Vec<usize> = (0..self.holder.len()).filter(|&s| self.pinned[s]).collect();
            ps.sort_by_key(|&s| self.stamp[s]);
            for s in ps {
                self.pinned[s] = false;
                self.clock += 1;
                self.stamp[s] = self.clock;
            }
        }
        fn invalidate(&mut self, page: u32, heads: u32) {
            for head in 0..heads {
                if let Some(s) = self.slot_of.remove(&HeadBlock { page, head }) {
                    self.holder[s as usize] = None;
                    self.pinned[s as usize] = false;
                    self.free.push(s);
                }
            }
        }
    }

    /// The O(1) list makes exactly the brute-force LRU's choices (same
    /// slots, hits, misses, evictions) on a random skewed trace with pins,
    /// several resolves per step, invalidations and overfull steps.
    #[test]
    fn o1_lru_matches_brute_force_reference() {
        let lay = KvLayout {
            n_kv_heads: 4,
            head_dim: 8,
            page_size: 4,
        };
        for seed in 0..4u64 {
            let n_slots = 37 + seed as usize * 20;
            let mut c = PageCache::<f32>::policy_only(lay, n_slots).unwrap();
            let mut r = RefLru::new(n_slots);
            let mut rng = Rng::new(100 + seed);
            let (mut calls, mut failed) = (0, 0);
            for step in 0..3000 {
                if rng.below(4) != 0 {
                    c.unpin_all();
                    r.unpin_all();
                }
                c.begin_step();
                r.tick += 1;
                for _ in 0..1 + rng.below(3) {
                    let n = 1 + rng.below(if step % 50 == 0 { 60 } else { 12 });
                    let req: Vec<HeadBlock> = (0..n)
                        .map(|_| HeadBlock {
                            // Hot set of 16 pages, cold tail of 400.
                            page: if rng.below(3) == 0 {
                                rng.below(400) as u32
                            } else {
                                rng.below(16) as u32
                            },
                            head: rng.below(4) as u32,
                        })
                        .collect();
                    let pin = rng.below(7) == 0;
                    calls += 1;
                    match (c.resolve_slots(&req, pin), r.resolve(&req, pin)) {
                        (Ok((a, _)), Some(b)) => assert_eq!(a, b, "seed {seed} step {step}"),
                        (Err(_), None) => {
                            failed += 1;
                            break;
                        }
                        (x, y) => panic!(
                            "seed {seed} step {step}: list {:?} vs reference {:?}",
                            x.is_ok(),
                            y.is_some()
                        ),
                    }
                }
                // A failed call may have assigned part of its request; both
                // must agree on that too.
                let cs = c.stats();
                assert_eq!(
                    (cs.hits, cs.misses, cs.evictions),
                    (r.stats.hits, r.stats.misses, r.stats.evictions),
                    "seed {seed} step {step}"
                );
                assert_eq!(cs.bytes_copied, cs.misses * 2 * 32 * 4);
                assert_eq!(c.resident(), r.slot_of.len());
                if rng.below(20) == 0 {
                    let p = rng.below(16) as u32;
                    c.invalidate(p);
                    r.invalidate(p, 4);
                }
            }
            let st = c.stats();
            assert!(st.evictions > 1000 && st.hits > 1000, "{st:?}");
            assert!(calls > 5000 && failed < calls / 10, "{calls} {failed}");
        }
    }

    /// Victim choice is O(1): a 200K-slot cache takes 400K misses quickly
    /// (a per-miss scan would be 8e10 steps).
    #[test]
    fn o1_lru_many_slots_is_fast() {
        let lay = KvLayout {
            n_kv_heads: 8,
            head_dim: 8,
            page_size: 4,
        };
        let n = 200_000;
        let mut c = PageCache::<f32>::policy_only(lay, n).unwrap();
        let t = std::time::Instant::now();
        let mut rng = Rng::new(5);
        for step in 0..400u32 {
            c.unpin_all();
            c.begin_step();
            let pin: Vec<HeadBlock> = (0..8).map(|h| HeadBlock { page: 0, head: h }).collect();
            c.resolve_slots(&pin, true).unwrap();
            let req: Vec<HeadBlock> = (0..1000)
                .map(|i| HeadBlock {
                    page: 1 + (step * 1000 + i) % 90_000,
                    head: rng.below(8) as u32,
                })
                .collect();
            c.resolve_slots(&req, false).unwrap();
        }
        let st = c.stats();
        assert!(st.evictions > 100_000, "{st:?}");
        assert!(
            t.elapsed().as_secs_f64() < 5.0,
            "400K accesses on 200K slots took {:?}",
            t.elapsed()
        );
        // Pinned sink blocks survived every storm.
        assert!((0..8).all(|h| c.slot_of(HeadBlock { page: 0, head: h }).is_some()));
    }

    /// The device policy's twin: every block of a step is resident after
    /// it, maps stay inverse, a block used in the step is never evicted,
    /// hits + misses = distinct blocks, and a step fails exactly when its
    /// distinct blocks exceed the slots. A hot set that fits keeps hitting.
    #[test]
    fn page_clock_keeps_each_steps_blocks_and_fails_only_when_over_full() {
        for seed in 0..4u64 {
            let (n_blocks, n_slots) = (500usize, 23 + 17 * seed as usize);
            let mut c = PageClock::new(n_blocks, n_slots);
            let mut rng = Rng::new(900 + seed);
            let (mut fails, mut ok_steps) = (0, 0);
            for step in 0..3000 {
                // Every 40th step overfull: 2x the slots, all cold blocks.
                let storm = step % 40 == 0;
                let n = if storm {
                    2 * n_slots
                } else {
                    1 + rng.below(n_slots / 2)
                };
                let blocks: Vec<u32> = (0..n)
                    .map(|_| {
                        if storm || rng.below(3) == 0 {
                            rng.below(n_blocks) as u32
                        } else {
                            rng.below(12) as u32
                        }
                    })
                    .collect();
                let mut uniq = blocks.clone();
                uniq.sort_unstable();
                uniq.dedup();
                let resident_before: Vec<i32> =
                    uniq.iter().map(|&b| c.block_slot[b as usize]).collect();
                let before = c.stats;
                let r = c.step(&blocks);
                assert_eq!(r.is_err(), uniq.len() > n_slots, "seed {seed} step {step}");
                let st = c.stats;
                assert_eq!(
                    (st.hits - before.hits + st.misses - before.misses) as usize,
                    uniq.len()
                );
                if r.is_err() {
                    fails += 1;
                    continue;
                }
                ok_steps += 1;
                for (&b, &was) in uniq.iter().zip(&resident_before) {
                    let s = c.block_slot[b as usize];
                    assert!(s >= 0, "block {b} not resident after its step");
                    assert_eq!(c.slot_block[s as usize], b as i32);
                    if was >= 0 {
                        assert_eq!(s, was, "a hit never moves");
                    }
                }
                for (s, &b) in c.slot_block.iter().enumerate() {
                    if b >= 0 {
                        assert_eq!(c.block_slot[b as usize], s as i32);
                    }
                }
            }
            assert!(fails > 0 && ok_steps > 2500, "{fails} {ok_steps}");
            assert!(
                c.stats.evictions > 1000 && c.stats.hits > 1000,
                "{:?}",
                c.stats
            );
        }
    }
}
