//! KV storage: the paged pool (one per layer) and read-only views over a
//! sequence's keys and values that policies and kernels share.

mod page_cache;
mod pool;
mod row_cache;
mod view;

pub use page_cache::{
    head_blocks_touched, pages_touched, CacheStats, HeadBlock, PageCache, PageClock,
};
pub use pool::{KvPool, PoolStats};
pub use row_cache::{
    dedup_rows, probe_device_map, row_hash, row_key, Admitted, ClockBits, ClockTake,
    DeviceAdmissionTwin, EstRowCache, RowCache, RowSlotMap, TwinAdmit, EMPTY_ROW,
};
pub use view::{KvRead, SeqView};

/// Geometry of one layer's KV pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Tokens per page (default 64).
    pub page_size: usize,
}

impl KvLayout {
    /// Elements of K (or V) in one page: `[kv_head][token][dim]`.
    pub fn page_elems(&self) -> usize {
        self.n_kv_heads * self.page_size * self.head_dim
    }
    /// Elements of one token's K (or V) across heads in the engine layout
    /// `[token][kv_head][dim]`.
    pub fn token_elems(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}
