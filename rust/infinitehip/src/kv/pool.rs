//! Paged KV pool for one layer. Pages hold `page_size` tokens laid out
//! `[kv_head][token][dim]` so one head's keys in a page are contiguous.
//! Sequences own page tables; forked sequences share pages by reference count
//! and copy a shared page before writing into it (copy-on-write).

use std::collections::HashMap;

use super::view::SeqView;
use super::KvLayout;
use crate::dtype::Element;
use crate::error::{Error, Result};

struct Page<T> {
    k: Box<[T]>,
    v: Box<[T]>,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct SeqEntry {
    pub pages: Vec<u32>,
    pub len: usize,
}

/// Occupancy numbers, for stats and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStats {
    pub pages_in_use: usize,
    pub pages_free: usize,
    pub bytes_in_use: usize,
    pub sequences: usize,
}

pub struct KvPool<T: Element> {
    layout: KvLayout,
    max_pages: Option<usize>,
    pages: Vec<Page<T>>,
    refcount: Vec<u32>,
    free: Vec<u32>,
    seqs: HashMap<u64, SeqEntry>,
}

impl<T: Element> KvPool<T> {
    /// `max_pages`: hard cap on allocated pages (None: grow on demand).
    pub fn new(layout: KvLayout, max_pages: Option<usize>) -> Result<Self> {
        if layout.n_kv_heads == 0 || layout.head_dim == 0 || layout.page_size == 0 {
            return Err(Error::Invalid(format!(
                "KV layout needs non-zero heads, head_dim and page_size, got {layout:?}"
            )));
        }
        Ok(KvPool {
            layout,
            max_pages,
            pages: Vec::new(),
            refcount: Vec::new(),
            free: Vec::new(),
            seqs: HashMap::new(),
        })
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    pub fn add_sequence(&mut self, id: u64) -> Result<()> {
        if self.seqs.contains_key(&id) {
            return Err(Error::DuplicateSequence(id));
        }
        self.seqs.insert(id, SeqEntry::default());
        Ok(())
    }

    pub fn has_sequence(&self, id: u64) -> bool {
        self.seqs.contains_key(&id)
    }

    pub fn seq_len(&self, id: u64) -> Result<usize> {
        Ok(self.entry(id)?.len)
    }

    /// New sequence `child` sharing every page of `parent` (a shared prefix).
    pub fn fork(&mut self, parent: u64, child: u64) -> Result<()> {
        if self.seqs.contains_key(&child) {
            return Err(Error::DuplicateSequence(child));
        }
        let e = self.entry(parent)?.clone();
        for &p in &e.pages {
            self.refcount[p as usize] += 1;
        }
        self.seqs.insert(child, e);
        Ok(())
    }

    /// Drop a sequence; pages no other sequence references return to the pool.
    pub fn free_sequence(&mut self, id: u64) -> Result<()> {
        let e = self.seqs.remove(&id).ok_or(Error::UnknownSequence(id))?;
        for p in e.pages {
            self.release(p);
        }
        Ok(())
    }

    /// Append `n` tokens given in the engine layout `[token][kv_head][dim]`.
    pub fn append(&mut self, id: u64, k: &[T], v: &[T]) -> Result<()> {
        let te = self.layout.token_elems();
        if k.len() % te != 0 || k.len() != v.len() {
            return Err(Error::shape(
                "append K/V",
                format!("equal lengths, multiples of kv_heads*head_dim = {te}"),
                format!("k {} elements, v {} elements", k.len(), v.len()),
            ));
        }
        let n = k.len() / te;
        let ps = self.layout.page_size;
        let (old_len, n_pages) = {
            let e = self.entry(id)?;
            (e.len, e.pages.len())
        };
        let needed_pages = (old_len + n).div_ceil(ps);
        let new_pages = needed_pages - n_pages;
        // The last partial page needs its own copy when shared.
        let cow =
            old_len % ps != 0 && self.refcount[self.seqs[&id].pages[n_pages - 1] as usize] > 1;
        self.reserve(new_pages + cow as usize)?;
        if cow {
            let last = self.seqs[&id].pages[n_pages - 1];
            let copy = self.copy_page(last);
            self.release(last);
            self.seqs.get_mut(&id).unwrap().pages[n_pages - 1] = copy;
        }
        for _ in 0..new_pages {
            let p = self.alloc_page();
            self.seqs.get_mut(&id).unwrap().pages.push(p);
        }
        let (hd, nh) = (self.layout.head_dim, self.layout.n_kv_heads);
        let pages = self.seqs[&id].pages.clone();
        for t in 0..n {
            let pos = old_len + t;
            let page = &mut self.pages[pages[pos / ps] as usize];
            let slot = pos % ps;
            for h in 0..nh {
                let src = t * te + h * hd;
                let dst = (h * ps + slot) * hd;
                page.k[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                page.v[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
            }
        }
        self.seqs.get_mut(&id).unwrap().len = old_len + n;
        Ok(())
    }

    /// Copy tokens `start..end` out in the engine layout `[token][kv_head][dim]`.
    pub fn read(&self, id: u64, start: usize, end: usize) -> Result<(Vec<T>, Vec<T>)> {
        let e = self.entry(id)?;
        if start > end || end > e.len {
            return Err(Error::OutOfRange(format!(
                "read {start}..{end} of sequence {id} with {} tokens",
                e.len
            )));
        }
        let view = self.view(id)?;
        let (hd, nh) = (self.layout.head_dim, self.layout.n_kv_heads);
        let mut k = Vec::with_capacity((end - start) * nh * hd);
        let mut v = Vec::with_capacity((end - start) * nh * hd);
        for t in start..end {
            for h in 0..nh {
                k.extend_from_slice(view.key_row(h, t));
                v.extend_from_slice(view.value_row(h, t));
            }
        }
        Ok((k, v))
    }

    /// Shorten a sequence to `new_len` tokens, freeing pages past the end.
    pub fn truncate(&mut self, id: u64, new_len: usize) -> Result<()> {
        let ps = self.layout.page_size;
        let e = self.entry(id)?;
        if new_len > e.len {
            return Err(Error::OutOfRange(format!(
                "truncate sequence {id} of {} tokens to {new_len}",
                e.len
            )));
        }
        let keep_pages = new_len.div_ceil(ps);
        let dropped: Vec<u32> = self.seqs.get_mut(&id).unwrap().pages.split_off(keep_pages);
        for p in dropped {
            self.release(p);
        }
        self.seqs.get_mut(&id).unwrap().len = new_len;
        Ok(())
    }

    /// Keep, per KV head, the listed token indices (ascending, equal count for
    /// every head) and compact them to the front; the pages freed at the tail
    /// return to the pool. This is how per-head eviction (Locret) frees memory.
    pub fn retain_per_head(&mut self, id: u64, keep: &[Vec<u32>]) -> Result<()> {
        let (nh, hd, ps) = (
            self.layout.n_kv_heads,
            self.layout.head_dim,
            self.layout.page_size,
        );
        let len = self.entry(id)?.len;
        if keep.len() != nh {
            return Err(Error::shape("retain_per_head keep lists", nh, keep.len()));
        }
        let n = keep[0].len();
        for (h, list) in keep.iter().enumerate() {
            if list.len() != n {
                return Err(Error::Invalid(format!(
                    "retain_per_head: head {h} keeps {} tokens, head 0 keeps {n}; counts must match",
                    list.len()
                )));
            }
            if list.windows(2).any(|w| w[0] >= w[1])
                || list.last().is_some_and(|&t| t as usize >= len)
            {
                return Err(Error::Invalid(format!(
                    "retain_per_head: head {h} indices must be strictly ascending and below {len}"
                )));
            }
        }
        // Pages we are about to write must be private to this sequence.
        self.unshare_prefix(id, n.div_ceil(ps))?;
        let pages = self.seqs[&id].pages.clone();
        let mut kb = vec![T::default(); hd];
        let mut vb = vec![T::default(); hd];
        for (h, list) in keep.iter().enumerate() {
            // Ascending sources and dst <= src: an in-place forward copy is safe.
            for (dst, &src) in list.iter().enumerate() {
                let src = src as usize;
                if src == dst {
                    continue;
                }
                let (sp, so) = (pages[src / ps] as usize, (h * ps + src % ps) * hd);
                let (dp, doff) = (pages[dst / ps] as usize, (h * ps + dst % ps) * hd);
                kb.copy_from_slice(&self.pages[sp].k[so..so + hd]);
                vb.copy_from_slice(&self.pages[sp].v[so..so + hd]);
                self.pages[dp].k[doff..doff + hd].copy_from_slice(&kb);
                self.pages[dp].v[doff..doff + hd].copy_from_slice(&vb);
            }
        }
        self.truncate(id, n)
    }

    pub fn view(&self, id: u64) -> Result<SeqView<'_, T>> {
        let e = self.entry(id)?;
        Ok(SeqView::new(
            self.layout,
            e.len,
            e.pages.iter().map(|&p| {
                let pg = &self.pages[p as usize];
                (&pg.k[..], &pg.v[..])
            }),
        ))
    }

    pub fn stats(&self) -> PoolStats {
        let in_use = self.pages.len() - self.free.len();
        PoolStats {
            pages_in_use: in_use,
            pages_free: self.free.len(),
            bytes_in_use: in_use * 2 * self.layout.page_elems() * std::mem::size_of::<T>(),
            sequences: self.seqs.len(),
        }
    }

    /// Page ids of a sequence (for offload bookkeeping and tests).
    pub fn page_table(&self, id: u64) -> Result<&[u32]> {
        Ok(&self.entry(id)?.pages)
    }

    /// K and V of one page, `[kv_head][token][dim]` each.
    pub fn page_data(&self, page: u32) -> Result<(&[T], &[T])> {
        let p = self
            .pages
            .get(page as usize)
            .filter(|_| self.refcount[page as usize] > 0)
            .ok_or_else(|| Error::OutOfRange(format!("page {page} is not allocated")))?;
        Ok((&p.k, &p.v))
    }

    pub fn page_refcount(&self, page: u32) -> u32 {
        self.refcount[page as usize]
    }

    fn entry(&self, id: u64) -> Result<&SeqEntry> {
        self.seqs.get(&id).ok_or(Error::UnknownSequence(id))
    }

    fn reserve(&mut self, n: usize) -> Result<()> {
        if let Some(cap) = self.max_pages {
            let available = self.free.len() + cap.saturating_sub(self.pages.len());
            if n > available {
                return Err(Error::OutOfPages {
                    capacity: cap,
                    needed: n - available,
                });
            }
        }
        Ok(())
    }

    fn alloc_page(&mut self) -> u32 {
        if let Some(p) = self.free.pop() {
            self.refcount[p as usize] = 1;
            return p;
        }
        let pe = self.layout.page_elems();
        self.pages.push(Page {
            k: vec![T::default(); pe].into_boxed_slice(),
            v: vec![T::default(); pe].into_boxed_slice(),
        });
        self.refcount.push(1);
        (self.pages.len() - 1) as u32
    }

    fn copy_page(&mut self, src: u32) -> u32 {
        let dst = self.alloc_page();
        let (s, d) = (src as usize, dst as usize);
        let (k, v) = (self.pages[s].k.clone(), self.pages[s].v.clone());
        self.pages[d].k = k;
        self.pages[d].v = v;
        dst
    }

    fn release(&mut self, p: u32) {
        let rc = &mut self.refcount[p as usize];
        debug_assert!(*rc > 0, "page {p} released twice");
        *rc -= 1;
        if *rc == 0 {
            self.free.push(p);
        }
    }

    /// Give the sequence private copies of its first `n_pages` shared pages.
    fn unshare_prefix(&mut self, id: u64, n_pages: usize) -> Result<()> {
        let shared: Vec<usize> = self.seqs[&id].pages[..n_pages]
            .iter()
            .enumerate()
            .filter(|(_, &p)| self.refcount[p as usize] > 1)
            .map(|(i, _)| i)
            .collect();
        self.reserve(shared.len())?;
        for i in shared {
            let old = self.seqs[&id].pages[i];
            let copy = self.copy_page(old);
            self.release(old);
            self.seqs.get_mut(&id).unwrap().pages[i] = copy;
        }
        Ok(())
    }
}
