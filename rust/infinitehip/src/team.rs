//! A host's own worker threads lent to `par_for` for one call.
//!
//! llama.cpp runs a custom op on all its threads at once and, for a
//! one-thread op, leaves the others spinning at its barrier. The plugin's
//! selection op runs on all of them instead: thread 0 (the leader) runs the
//! policy with this team installed, so its `par_for` hands items to the other
//! threads (the helpers), which sleep here between jobs and leave when the
//! leader is done. No thread is spawned and none spins while another works.
//!
//! Every one of the `n_helpers` helper threads must call `serve` exactly once
//! per leader session (`lead`); a helper may arrive before or after the
//! leader starts.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

/// The job a `par_for` publishes: items `next..n` of `f`.
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
}

#[derive(Default)]
struct State {
    /// Leader sessions begun so far.
    session: u64,
    /// The session is open: from `lead`'s start until all its helpers left.
    /// A helper never joins a closed session (it would count as having
    /// left the next one before that one starts).
    open: bool,
    /// Helper slots of the open session (`0..helpers`).
    helpers: usize,
    /// The session's leader has finished (helpers leave).
    done: bool,
    /// The job in flight and its number (helpers join each job once).
    job: Option<(u64, *const Job)>,
    jobs: u64,
    /// Helpers inside the job in flight.
    busy: usize,
    /// Helpers that left this session.
    left: usize,
    /// Per helper slot: the last session it served.
    served: Vec<u64>,
}

// SAFETY: the raw pointers in `State` point into the leader's stack frame,
// which `par_for_team` keeps alive until no helper can reach them.
unsafe impl Send for State {}

#[derive(Default)]
pub struct Team {
    st: Mutex<State>,
    cv: Condvar,
}

thread_local! {
    static CURRENT: Cell<Option<*const Team>> = const { Cell::new(None) };
}

impl Team {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Leader: run `f` with this team as `par_for`'s workers, then wait until
    /// all `n_helpers` helpers have served this session and left.
    pub fn lead<R>(&self, n_helpers: usize, f: impl FnOnce() -> R) -> R {
        {
            let mut st = self.lock();
            st.session += 1;
            st.open = true;
            st.helpers = n_helpers;
            st.done = false;
            st.left = 0;
            st.job = None;
            if st.served.len() < n_helpers {
                st.served.resize(n_helpers, 0);
            }
            self.cv.notify_all();
        }
        struct Restore(Option<*const Team>);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let prev = CURRENT.with(|c| c.replace((n_helpers > 0).then_some(self as *const Team)));
        let r = {
            let _restore = Restore(prev);
            f()
        };
        let mut st = self.lock();
        st.done = true;
        self.cv.notify_all();
        while st.left < n_helpers {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.open = false;
        r
    }

    /// Helper `slot` (0..n_helpers): work on the leader's jobs until it is
    /// done with the session this helper has not served yet.
    pub fn serve(&self, slot: usize) {
        let mut st = self.lock();
        // wait for an open session this slot belongs to and has not served
        // (the leader may be late; the thread count may change per session)
        loop {
            let served = st.served.get(slot).copied();
            if st.open && slot < st.helpers && served.is_some_and(|s| s < st.session) {
                break;
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let session = st.session;
        let mut last_job = 0;
        loop {
            if let Some((id, job)) = st.job {
                if id != last_job {
                    last_job = id;
                    st.busy += 1;
                    drop(st);
                    // SAFETY: the leader keeps the job alive while `busy` > 0
                    // or the job is published.
                    unsafe { run_items(&*job) };
                    st = self.lock();
                    st.busy -= 1;
                    self.cv.notify_all();
                    continue;
                }
            }
            if st.done {
                break;
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.served[slot] = session;
        st.left += 1;
        self.cv.notify_all();
    }

    /// `par_for` through the team: publish, work, wait for the helpers.
    fn par_for(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        // SAFETY (lifetime erasure): the job is withdrawn and every helper
        // has left it before this frame returns.
        let f: *const (dyn Fn(usize) + Sync + '_) = f;
        let f: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        let job = Job {
            f,
            n,
            next: AtomicUsize::new(0),
        };
        {
            let mut st = self.lock();
            st.jobs += 1;
            st.job = Some((st.jobs, &job as *const Job));
            self.cv.notify_all();
        }
        // SAFETY: `job` lives in this frame.
        unsafe { run_items(&job) };
        let mut st = self.lock();
        st.job = None;
        while st.busy > 0 {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// # Safety
/// `job.f` must be alive.
unsafe fn run_items(job: &Job) {
    loop {
        let i = job.next.fetch_add(1, Ordering::Relaxed);
        if i >= job.n {
            break;
        }
        (*job.f)(i);
    }
}

/// Run `f(i)` for i in 0..n on the current thread's team, if one is
/// installed (by `Team::lead`); false when there is none.
pub(crate) fn par_for_team(n: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
    let Some(team) = CURRENT.with(|c| c.get()) else {
        return false;
    };
    // Nested par_for inside a job runs inline (the team is busy).
    CURRENT.with(|c| c.set(None));
    // SAFETY: `lead` keeps the team alive while it is installed.
    unsafe { (*team).par_for(n, f) };
    CURRENT.with(|c| c.set(Some(team)));
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// A helper that sat out the previous session (fewer threads then) and
    /// arrives before the next leader waits for that leader: it used to
    /// join the finished session, leave it, and hang the next one.
    #[test]
    fn early_helper_after_a_smaller_session_joins_the_next_one() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let team = Team::new();
            std::thread::scope(|s| {
                s.spawn(|| team.serve(0));
                s.spawn(|| team.serve(1));
                team.lead(2, || crate::parallel::par_for(10, |_| {}));
            });
            std::thread::scope(|s| {
                s.spawn(|| team.serve(0));
                team.lead(1, || crate::parallel::par_for(10, |_| {}));
            });
            let hits = AtomicU64::new(0);
            std::thread::scope(|s| {
                s.spawn(|| team.serve(1)); // early: the leader is not there yet
                std::thread::sleep(std::time::Duration::from_millis(50));
                s.spawn(|| team.serve(0));
                team.lead(2, || {
                    crate::parallel::par_for(100, |_| {
                        hits.fetch_add(1, Ordering::Relaxed);
                    })
                });
            });
            tx.send(hits.load(Ordering::Relaxed)).ok();
        });
        let hits = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the second session hung");
        assert_eq!(hits, 100);
    }

    /// Every item runs exactly once, helpers arriving early or late, over
    /// several sessions; nested par_for runs inline.
    #[test]
    fn team_runs_every_item_once() {
        let team = Team::new();
        for session in 0..20u64 {
            let n_helpers = (session % 3) as usize + 1;
            let hits: Vec<AtomicU64> = (0..1000).map(|_| AtomicU64::new(0)).collect();
            std::thread::scope(|s| {
                for slot in 0..n_helpers {
                    let team = &team;
                    s.spawn(move || {
                        if (slot + session as usize) % 2 == 0 {
                            std::thread::sleep(std::time::Duration::from_millis(2));
                        }
                        team.serve(slot)
                    });
                }
                team.lead(n_helpers, || {
                    for round in 0..3 {
                        crate::parallel::par_for(1000, |i| {
                            if i % 500 == 0 {
                                // nested: inline
                                crate::parallel::par_for(2, |_| {});
                            }
                            hits[i].fetch_add(1 + round, Ordering::Relaxed);
                        });
                    }
                });
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 6),
                "session {session}"
            );
        }
    }
}
