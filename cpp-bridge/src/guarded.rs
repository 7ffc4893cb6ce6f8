//! Panic containment for every bridge entry point.
//!
//! Policy (the same as the C ABI's, `infinitehip-capi`): a handle whose call
//! panicked is *poisoned*. Its later calls do no work: fallible ones return
//! an error saying so (a C++ `rust::Error`), infallible ones (counters,
//! summaries, predicates) return a harmless fallback and log at `error`.
//! The handle can only be destroyed. A panic never unwinds into C++.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

/// The message of a caught panic payload.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn panic_error(p: &(dyn std::any::Any + Send)) -> String {
    format!(
        "internal error (panic in infinitehip): {}",
        panic_message(p)
    )
}

/// Run `f` for a function without a handle: its error or a panic becomes
/// the message C++ receives.
pub(crate) fn guard<T>(f: impl FnOnce() -> infinitehip::Result<T>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(p) => Err(panic_error(&*p)),
    }
}

/// As `guard` for an infallible function: a panic logs and yields `fallback`.
pub(crate) fn guard_or<T>(what: &str, fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        tracing::error!("infinitehip {what}: {}", panic_error(&*p));
        fallback
    })
}

/// A handle's poison flag (see the module doc).
#[derive(Debug, Default)]
pub struct Poison(AtomicBool);

const POISONED: &str =
    "this handle is poisoned by an earlier internal panic (a bug in infinitehip); destroy it";

impl Poison {
    pub fn is_poisoned(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Run a fallible call on the handle; a panic poisons it.
    pub(crate) fn guard<T>(&self, f: impl FnOnce() -> infinitehip::Result<T>) -> Result<T, String> {
        if self.is_poisoned() {
            return Err(POISONED.into());
        }
        catch_unwind(AssertUnwindSafe(f))
            .unwrap_or_else(|p| {
                self.set();
                Err(infinitehip::Error::Invalid(panic_error(&*p)))
            })
            .map_err(|e| e.to_string())
    }

    /// Run an infallible call on the handle: on a poisoned handle, or when
    /// it panics (poisoning the handle), log and return `fallback`.
    pub(crate) fn guard_or<T>(&self, what: &str, fallback: T, f: impl FnOnce() -> T) -> T {
        if self.is_poisoned() {
            tracing::error!("infinitehip {what}: {POISONED}");
            return fallback;
        }
        catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
            self.set();
            tracing::error!("infinitehip {what}: {}", panic_error(&*p));
            fallback
        })
    }

    /// Test hook: run `f` as a guarded call, so a test can poison a handle
    /// with a deliberate panic.
    #[doc(hidden)]
    pub fn run_for_test(&self, f: impl FnOnce()) -> Result<(), String> {
        self.guard(|| {
            f();
            Ok(())
        })
    }
}

/// JSON an infallible stats call returns when it cannot report.
pub(crate) fn stats_unavailable(what: &str) -> String {
    serde_json::json!({ "error": format!("{what}: unavailable (handle poisoned by an internal panic)") })
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_and_poisons_the_handle() {
        let p = Poison::default();
        let e = p.run_for_test(|| panic!("boom")).unwrap_err();
        assert!(e.contains("boom"), "{e}");
        assert!(p.is_poisoned());
        let e = p.guard(|| Ok(1)).unwrap_err();
        assert!(e.contains("poisoned"), "{e}");
        assert_eq!(p.guard_or("x", 7, || 1), 7);
    }

    #[test]
    fn an_infallible_call_that_panics_returns_its_fallback() {
        let p = Poison::default();
        assert_eq!(p.guard_or("x", 0, || -> i32 { panic!("boom") }), 0);
        assert!(p.is_poisoned());
        assert!(!guard_or("y", false, || -> bool { panic!("boom") }));
        assert!(guard(|| -> infinitehip::Result<()> { panic!("boom") })
            .unwrap_err()
            .contains("boom"));
    }
}
