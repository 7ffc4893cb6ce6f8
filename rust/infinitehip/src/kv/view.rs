//! Read-only access to one sequence's K/V in one layer.

use super::KvLayout;
use crate::dtype::{dot_f32, Element};

/// A sequence's keys and values as page slices. Cheap to build; borrows the pool.
pub struct SeqView<'a, T: Element> {
    layout: KvLayout,
    len: usize,
    /// Whole pages `[kv_head][token][dim]`, or with `head_split` one slice
    /// `[token][dim]` per (page, KV head) at `page * n_kv_heads + head`.
    pages: Vec<(&'a [T], &'a [T])>,
    head_split: bool,
}

impl<'a, T: Element> SeqView<'a, T> {
    pub fn new(
        layout: KvLayout,
        len: usize,
        pages: impl Iterator<Item = (&'a [T], &'a [T])>,
    ) -> Self {
        let pages: Vec<_> = pages.collect();
        debug_assert!(pages.len() * layout.page_size >= len);
        SeqView {
            layout,
            len,
            pages,
            head_split: false,
        }
    }

    /// A view whose pages are split per KV head: `blocks[p * n_kv_heads + h]`
    /// holds tokens of page p for head h as `[page_size][dim]` (the device
    /// page cache caches per head).
    pub fn head_split(
        layout: KvLayout,
        len: usize,
        blocks: impl Iterator<Item = (&'a [T], &'a [T])>,
    ) -> Self {
        let pages: Vec<_> = blocks.collect();
        debug_assert!(pages.len() >= len.div_ceil(layout.page_size) * layout.n_kv_heads);
        SeqView {
            layout,
            len,
            pages,
            head_split: true,
        }
    }

    /// A view over contiguous head-major buffers `[kv_head][token][dim]`
    /// (one "page" per head span), used by tests and benchmarks that hold
    /// K/V outside a pool.
    pub fn from_contiguous(
        n_kv_heads: usize,
        head_dim: usize,
        len: usize,
        k: &'a [T],
        v: &'a [T],
    ) -> Self {
        assert_eq!(k.len(), n_kv_heads * len * head_dim);
        assert_eq!(v.len(), k.len());
        SeqView {
            layout: KvLayout {
                n_kv_heads,
                head_dim,
                page_size: len.max(1),
            },
            len,
            pages: vec![(k, v)],
            head_split: false,
        }
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    fn offset(&self, head: usize, tok: usize) -> (usize, usize) {
        let ps = self.layout.page_size;
        if self.head_split {
            (
                tok / ps * self.layout.n_kv_heads + head,
                tok % ps * self.layout.head_dim,
            )
        } else {
            (tok / ps, (head * ps + tok % ps) * self.layout.head_dim)
        }
    }

    #[inline]
    pub fn key_row(&self, head: usize, tok: usize) -> &'a [T] {
        let (p, o) = self.offset(head, tok);
        &self.pages[p].0[o..o + self.layout.head_dim]
    }

    #[inline]
    pub fn value_row(&self, head: usize, tok: usize) -> &'a [T] {
        let (p, o) = self.offset(head, tok);
        &self.pages[p].1[o..o + self.layout.head_dim]
    }

    /// Split tokens `start..end` of `head` into page-contiguous runs and hand
    /// each run's keys and values (`[n][dim]`) to `f(first_token, keys, values)`.
    #[inline]
    pub fn for_each_run(
        &self,
        head: usize,
        start: usize,
        end: usize,
        mut f: impl FnMut(usize, &'a [T], &'a [T]),
    ) {
        let (ps, hd) = (self.layout.page_size, self.layout.head_dim);
        let mut t = start;
        while t < end {
            let run_end = end.min((t / ps + 1) * ps);
            let (p, o) = self.offset(head, t);
            let n = (run_end - t) * hd;
            f(t, &self.pages[p].0[o..o + n], &self.pages[p].1[o..o + n]);
            t = run_end;
        }
    }
}

/// Type-erased f32 access for policies, so they need no dtype generics.
pub trait KvRead: Sync {
    fn len(&self) -> usize;
    fn n_kv_heads(&self) -> usize;
    fn head_dim(&self) -> usize;
    fn dot_key(&self, head: usize, tok: usize, q: &[f32]) -> f32;
    fn read_key(&self, head: usize, tok: usize, out: &mut [f32]);
    fn read_value(&self, head: usize, tok: usize, out: &mut [f32]);
    /// Hint that a key row will be read soon (no-op where unsupported).
    fn prefetch_key(&self, _head: usize, _tok: usize) {}
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: Element> KvRead for SeqView<'_, T> {
    fn len(&self) -> usize {
        self.len
    }
    fn n_kv_heads(&self) -> usize {
        self.layout.n_kv_heads
    }
    fn head_dim(&self) -> usize {
        self.layout.head_dim
    }
    #[inline]
    fn dot_key(&self, head: usize, tok: usize, q: &[f32]) -> f32 {
        dot_f32(q, self.key_row(head, tok))
    }
    fn read_key(&self, head: usize, tok: usize, out: &mut [f32]) {
        for (o, x) in out.iter_mut().zip(self.key_row(head, tok)) {
            *o = x.to_f32();
        }
    }
    fn read_value(&self, head: usize, tok: usize, out: &mut [f32]) {
        for (o, x) in out.iter_mut().zip(self.value_row(head, tok)) {
            *o = x.to_f32();
        }
    }
    #[inline]
    fn prefetch_key(&self, head: usize, tok: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let row = self.key_row(head, tok);
            let bytes = std::mem::size_of_val(row);
            let base = row.as_ptr() as *const i8;
            for off in (0..bytes).step_by(64) {
                // SAFETY: prefetch is a hint; the address lies inside `row`.
                unsafe {
                    std::arch::x86_64::_mm_prefetch(base.add(off), std::arch::x86_64::_MM_HINT_T0)
                };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (head, tok);
    }
}
