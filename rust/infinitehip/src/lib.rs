//! infinitehip: sparse long-context attention and KV-cache management.
//!
//! Four methods behind one policy config (see `config`): InfiniteHiP
//! hierarchical pruning (`policy::hip`), Locret retaining heads, LazyLLM
//! token pruning and Squeezed Attention centroid lookup. `kv` stores K/V in
//! pages, `attention` runs dense and block-sparse attention, `rope` moves keys
//! between positions.

pub mod attention;
pub mod backend;
pub mod config;
pub mod dtype;
pub mod engine;
pub mod error;
pub mod est_sim;
pub mod kmeans;
pub mod kv;
pub mod offload;
pub mod parallel;
pub mod policy;
pub mod rng;
pub mod rope;
pub mod team;
pub mod workload;

pub use config::PolicyConfig;
pub use dtype::{DType, Element};
pub use engine::Engine;
pub use error::{Error, Result};
