//! Work splitting over all cores with std scoped threads: the crate's only
//! parallel primitive, so the thread count is decided in one place.

use std::sync::atomic::{AtomicUsize, Ordering};

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

/// Run `f(i)` for every i in 0..n, items handed out dynamically to threads.
/// Runs inline when there is one item or one thread.
pub fn par_for(n: usize, f: impl Fn(usize) + Sync) {
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

#[cfg(test)]
mod tests {
    use super::parse_threads;

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
