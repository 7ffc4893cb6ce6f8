//! Work splitting over all cores: the crate's only parallel primitive, so
//! the thread count and the threads themselves are decided in one place.
//!
//! Items go, in order of preference, to a host's threads lent for the call
//! (`team`, llama.cpp), to a persistent worker pool (rayon, the default), or
//! to scoped OS threads spawned for the call (kept as the measured
//! alternative: `bench-cpu --pool scoped,rayon`).

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Number of worker threads: `INFINITEHIP_THREADS` or all available cores.
/// A bad `INFINITEHIP_THREADS` is reported (`Engine::new` and the CLI fail
/// on it through `threads_from_env`); here, where no error can be returned,
/// it is logged once and all cores are used.
pub fn num_threads() -> usize {
    let n = THREADS.load(Ordering::Relaxed);
    if n != 0 {
        return n;
    }
    let all = || std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = match threads_from_env() {
        Ok(Some(n)) => n,
        Ok(None) => all(),
        Err(e) => {
            tracing::warn!("{e}; using all {} cores", all());
            all()
        }
    };
    THREADS.store(n, Ordering::Relaxed);
    n
}

/// `INFINITEHIP_THREADS` as a thread count: None when unset or empty, an
/// error naming the variable when it is not a whole number >= 1.
pub fn threads_from_env() -> Result<Option<usize>> {
    parse_threads(std::env::var("INFINITEHIP_THREADS").ok().as_deref())
}

fn parse_threads(v: Option<&str>) -> Result<Option<usize>> {
    match v.map(str::trim) {
        None | Some("") => Ok(None),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(Error::Invalid(format!(
                "INFINITEHIP_THREADS=`{s}`: expected a whole number >= 1 (worker threads), or unset for all cores"
            ))),
        },
    }
}

/// Override the worker count (e.g. from an engine's own thread setting).
pub fn set_num_threads(n: usize) {
    THREADS.store(n.max(1), Ordering::Relaxed);
}

/// Where `par_for` runs its items when no host team is lent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// A persistent rayon pool of `num_threads()` workers (the default).
    Rayon,
    /// OS threads spawned by `std::thread::scope` for each call.
    Scoped,
}

impl Pool {
    pub fn name(self) -> &'static str {
        match self {
            Pool::Rayon => "rayon",
            Pool::Scoped => "scoped",
        }
    }
}

static POOL: AtomicU8 = AtomicU8::new(0);

/// Choose where later `par_for` calls run (process-wide; for benchmarks).
pub fn set_pool(p: Pool) {
    POOL.store(p as u8, Ordering::Relaxed);
}

pub fn pool() -> Pool {
    match POOL.load(Ordering::Relaxed) {
        0 => Pool::Rayon,
        _ => Pool::Scoped,
    }
}

/// The rayon pool sized `threads`, built on first use and kept (one per
/// size asked for: `set_num_threads` may change the count).
fn rayon_pool(threads: usize) -> Arc<rayon::ThreadPool> {
    static POOLS: Mutex<Vec<(usize, Arc<rayon::ThreadPool>)>> = Mutex::new(Vec::new());
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = pools.iter().find(|(n, _)| *n == threads) {
        return p.clone();
    }
    let p = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("infinitehip-{i}"))
        .build()
        .map(Arc::new)
        .expect("building the worker pool (rayon could not start its threads)");
    pools.push((threads, p.clone()));
    p
}

/// Run `f(i)` for every i in 0..n, items handed out dynamically (one at a
/// time, from a shared counter) to the installed team's threads, else to
/// `pool()`'s. Runs inline when there is one item or one thread.
pub fn par_for(n: usize, f: impl Fn(usize) + Sync) {
    // A host's threads lent for this call (`team::Team::lead`) take the items.
    if n > 1 && crate::team::par_for_team(n, &f) {
        return;
    }
    let threads = num_threads().min(n);
    if threads <= 1 {
        (0..n).for_each(f);
        return;
    }
    let next = AtomicUsize::new(0);
    let worker = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        f(i);
    };
    match pool() {
        // A call from inside the pool (nested `par_for`) is fine: the waiting
        // worker runs the scope's jobs itself.
        Pool::Rayon => rayon_pool(num_threads()).scope(|s| {
            for _ in 0..threads {
                s.spawn(|_| worker());
            }
        }),
        Pool::Scoped => std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(worker);
            }
        }),
    }
}

/// Map every i in 0..n to a value, in parallel, keeping order.
pub fn par_map<R: Send>(n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let slots: Vec<std::sync::Mutex<Option<R>>> =
        (0..n).map(|_| std::sync::Mutex::new(None)).collect();
    par_for(n, |i| {
        *slots[i].lock().unwrap() = Some(f(i));
    });
    slots
        .into_iter()
        .map(|m| m.into_inner().unwrap().expect("par_map slot filled"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every item runs exactly once on either pool, nested calls included.
    #[test]
    fn both_pools_run_every_item_once() {
        for p in [Pool::Rayon, Pool::Scoped] {
            set_pool(p);
            let hits: Vec<AtomicUsize> = (0..97).map(|_| AtomicUsize::new(0)).collect();
            par_for(97, |i| {
                par_for(3, |_| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                })
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 3), "{p:?}");
            let v = par_map(50, |i| i * i);
            assert_eq!(v, (0..50).map(|i| i * i).collect::<Vec<_>>(), "{p:?}");
        }
        set_pool(Pool::Rayon);
    }

    #[test]
    fn bad_thread_counts_are_errors() {
        assert_eq!(parse_threads(None).unwrap(), None);
        assert_eq!(parse_threads(Some("")).unwrap(), None);
        assert_eq!(parse_threads(Some("4")).unwrap(), Some(4));
        for bad in ["abc", "0", "-2", "1.5"] {
            let e = parse_threads(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("INFINITEHIP_THREADS") && e.contains(bad), "{e}");
        }
    }
}
