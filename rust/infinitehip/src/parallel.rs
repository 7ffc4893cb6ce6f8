//! Work splitting over all cores with std scoped threads: the crate's only
//! parallel primitive, so the thread count is decided in one place.

use std::sync::atomic::{AtomicUsize, Ordering};

static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Number of worker threads: `INFINITEHIP_THREADS` or all available cores.
pub fn num_threads() -> usize {
    let n = THREADS.load(Ordering::Relaxed);
    if n != 0 {
        return n;
    }
    let n = std::env::var("INFINITEHIP_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    THREADS.store(n, Ordering::Relaxed);
    n
}

/// Override the worker count (e.g. from an engine's own thread setting).
pub fn set_num_threads(n: usize) {
    THREADS.store(n.max(1), Ordering::Relaxed);
}

/// Run `f(i)` for every i in 0..n, items handed out dynamically to threads
/// (the installed team's, else scoped threads). Runs inline when there is
/// one item or one thread.
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
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                f(i);
            });
        }
    });
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
