//! Decode with the KV on the host tier and a bounded device page cache
//! (DESIGN 3.5). Per step: the pages the selections touch are resolved in one
//! batch per sequence (sink and window pages pinned), then the kernel reads
//! through the slot table. Mask estimation reads keys in place on the host
//! (`CountingKv` counts those bytes, which a GPU reads over the bus).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::attention::{self, AttnShape};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::kv::{
    head_blocks_touched, row_key, CacheStats, HeadBlock, KvPool, KvRead, PageCache, SeqView,
};
use crate::policy::Selection;
use crate::rope::Rope;

/// Counters for one decode step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepStats {
    pub cache: CacheStats,
    /// Head blocks (one KV head of one page) the step's selections touched.
    pub blocks_needed: usize,
    /// Bytes of the host KV read in place by mask estimation.
    pub estimation_bytes: u64,
    /// Estimation reads through the row cache (zero when it is off).
    pub estimation_cache: CacheStats,
}

/// Decode a batch with every sequence's KV on the host and only the touched
/// pages in `cache`. `pinned[i]`: token ranges of sequence i kept resident
/// (sink and window).
pub fn decode_offloaded<T: Element>(
    shape: &AttnShape,
    q: &[f32],
    host: &KvPool<T>,
    seqs: &[u64],
    sels: &[Selection],
    pinned: &[Vec<Range<usize>>],
    cache: &mut PageCache<T>,
    streaming: Option<&Rope>,
    out: &mut [f32],
) -> Result<StepStats> {
    if sels.len() != seqs.len() || pinned.len() != seqs.len() {
        return Err(Error::shape(
            "offloaded decode selections/pinned",
            seqs.len(),
            format!("{}/{}", sels.len(), pinned.len()),
        ));
    }
    if let Some(i) = sels.iter().position(|s| s.n_kv_heads() != shape.n_kv_heads) {
        return Err(Error::Invalid(format!(
            "offloaded decode: sequence {i}'s selection holds {} range lists, not one per KV head ({}); \
             the device page cache works per KV head (hip.per_q_head runs on the all-resident path only)",
            sels[i].n_kv_heads(),
            shape.n_kv_heads
        )));
    }
    let ps = host.layout().page_size;
    let n_heads = host.layout().n_kv_heads;
    let before = cache.stats();
    cache.unpin_all();
    // One step for the whole batch: a later sequence's misses must not evict
    // blocks an earlier one is about to read.
    cache.begin_step();
    let mut slot_tables = Vec::with_capacity(seqs.len());
    let mut lens = Vec::with_capacity(seqs.len());
    let mut needed = 0;
    for ((&s, sel), pin) in seqs.iter().zip(sels).zip(pinned) {
        let table = host.page_table(s)?;
        let len = host.seq_len(s)?;
        let physical = |blocks: &[(usize, usize)]| -> Vec<HeadBlock> {
            blocks
                .iter()
                .map(|&(p, h)| HeadBlock {
                    page: table[p],
                    head: h as u32,
                })
                .collect()
        };
        let pin_sel = Selection {
            heads: vec![pin.clone(); n_heads],
        };
        let pin_blocks: Vec<(usize, usize)> = head_blocks_touched(&pin_sel, ps)
            .into_iter()
            .filter(|&(p, _)| p < table.len())
            .collect();
        cache.resolve(host, &physical(&pin_blocks), true)?;
        let logical = head_blocks_touched(sel, ps);
        if logical
            .iter()
            .any(|&(p, h)| p >= table.len() || h >= n_heads)
        {
            return Err(Error::OutOfRange(format!(
                "selection of sequence {s} reaches past its {len} tokens or {n_heads} KV heads"
            )));
        }
        let slots = cache.resolve(host, &physical(&logical), false)?;
        let mut st = vec![None; table.len() * n_heads];
        for (&(p, h), sl) in logical.iter().zip(slots) {
            st[p * n_heads + h] = Some(sl);
        }
        needed += logical.len();
        slot_tables.push(st);
        lens.push(len);
    }
    let views: Vec<SeqView<'_, T>> = slot_tables
        .iter()
        .zip(&lens)
        .map(|(st, &len)| cache.view(len, st))
        .collect();
    attention::decode_with(shape, q, &views, Some(sels), streaming, out)?;
    let after = cache.stats();
    Ok(StepStats {
        cache: CacheStats {
            hits: after.hits - before.hits,
            misses: after.misses - before.misses,
            bytes_copied: after.bytes_copied - before.bytes_copied,
            evictions: after.evictions - before.evictions,
        },
        blocks_needed: needed,
        estimation_bytes: 0,
        estimation_cache: CacheStats::default(),
    })
}

/// A `KvRead` that counts the key bytes read through it and, given the
/// sequence's page table, records which host rows were read (for the
/// estimation row cache).
pub struct CountingKv<'a> {
    inner: &'a dyn KvRead,
    bytes_per_row: u64,
    reads: AtomicU64,
    rows: Option<RowLog<'a>>,
}

struct RowLog<'a> {
    table: &'a [u32],
    page_size: usize,
    /// Sharded so parallel readers rarely contend.
    shards: Vec<Mutex<Vec<u64>>>,
}

impl<'a> CountingKv<'a> {
    pub fn new(inner: &'a dyn KvRead, elem_bytes: usize) -> Self {
        CountingKv {
            inner,
            bytes_per_row: (inner.head_dim() * elem_bytes) as u64,
            reads: AtomicU64::new(0),
            rows: None,
        }
    }

    /// Also record the host location (`row_key`) of every row read.
    pub fn recording(mut self, table: &'a [u32], page_size: usize) -> Self {
        self.rows = Some(RowLog {
            table,
            page_size,
            shards: (0..16).map(|_| Mutex::new(Vec::new())).collect(),
        });
        self
    }

    pub fn bytes(&self) -> u64 {
        self.reads.load(Ordering::Relaxed) * self.bytes_per_row
    }

    /// The rows read so far (with repeats), when recording.
    pub fn take_rows(&self) -> Vec<u64> {
        self.rows.as_ref().map_or_else(Vec::new, |log| {
            log.shards
                .iter()
                .flat_map(|s| std::mem::take(&mut *s.lock().unwrap_or_else(|e| e.into_inner())))
                .collect()
        })
    }

    #[inline]
    fn count(&self, head: usize, tok: usize) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        if let Some(log) = &self.rows {
            let key = row_key(log.table[tok / log.page_size], head, tok % log.page_size);
            let shard = &log.shards[(tok / log.page_size) % log.shards.len()];
            shard.lock().unwrap_or_else(|e| e.into_inner()).push(key);
        }
    }
}

impl KvRead for CountingKv<'_> {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn n_kv_heads(&self) -> usize {
        self.inner.n_kv_heads()
    }
    fn head_dim(&self) -> usize {
        self.inner.head_dim()
    }
    fn dot_key(&self, head: usize, tok: usize, q: &[f32]) -> f32 {
        self.count(head, tok);
        self.inner.dot_key(head, tok, q)
    }
    fn read_key(&self, head: usize, tok: usize, out: &mut [f32]) {
        self.count(head, tok);
        self.inner.read_key(head, tok, out)
    }
    fn read_value(&self, head: usize, tok: usize, out: &mut [f32]) {
        // Values are not estimation reads: counted as bytes, not cached.
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.read_value(head, tok, out)
    }
    fn prefetch_key(&self, head: usize, tok: usize) {
        self.inner.prefetch_key(head, tok)
    }
}
