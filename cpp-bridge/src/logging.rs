//! The llama.cpp plugin's log output: without a subscriber, the plugin's
//! `tracing` warnings (fallbacks to exact attention, refused routes, caught
//! panics) would vanish. The first plugin of a process installs one on
//! stderr, filtered by `LLAMA_INFINITEHIP_LOG` (tracing's env-filter syntax:
//! `warn` by default, `debug`, `off`, `infinitehip=trace`, ...). A host that
//! already installed a global subscriber keeps its own.

use std::sync::Once;

/// The environment variable naming the plugin's log filter.
pub const LOG_ENV: &str = "LLAMA_INFINITEHIP_LOG";

/// The filter used when `LLAMA_INFINITEHIP_LOG` is unset or empty.
pub const DEFAULT_FILTER: &str = "warn";

/// The filter a value of `LLAMA_INFINITEHIP_LOG` selects, or why it is refused.
pub fn log_filter(value: Option<&str>) -> Result<tracing_subscriber::EnvFilter, String> {
    let v = value.map(str::trim).filter(|v| !v.is_empty());
    tracing_subscriber::EnvFilter::try_new(v.unwrap_or(DEFAULT_FILTER))
        .map_err(|e| format!("{LOG_ENV}={:?} is not a log filter ({e})", v.unwrap_or("")))
}

/// Install the plugin's subscriber once per process (later calls do nothing).
pub fn init_plugin_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let value = std::env::var(LOG_ENV).ok();
        let (filter, bad) = match log_filter(value.as_deref()) {
            Ok(f) => (f, None),
            Err(why) => (
                tracing_subscriber::EnvFilter::new(DEFAULT_FILTER),
                Some(why),
            ),
        };
        let installed = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init()
            .is_ok();
        if let (true, Some(why)) = (installed, bad) {
            tracing::warn!("{why}; using {DEFAULT_FILTER:?}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_default_to_warn_and_bad_values_are_refused() {
        assert_eq!(log_filter(None).unwrap().to_string(), "warn");
        assert_eq!(log_filter(Some("  ")).unwrap().to_string(), "warn");
        assert_eq!(log_filter(Some("debug")).unwrap().to_string(), "debug");
        let e = log_filter(Some("infinitehip=notalevel")).unwrap_err();
        assert!(e.contains(LOG_ENV), "{e}");
    }
}
