//! The llama.cpp plugin installs a stderr subscriber at its first creation
//! (its own process: a test binary of one test), filtered by
//! `LLAMA_INFINITEHIP_LOG` (default `warn`), so the plugin's warnings reach
//! the user. Without it no subscriber is set and `warn` events are disabled.

use infinitehip_bridge::ffi::ModelInfo;
use infinitehip_bridge::llama_plugin_new;

#[test]
fn the_first_plugin_installs_a_warn_subscriber() {
    std::env::remove_var(infinitehip_bridge::logging::LOG_ENV);
    assert!(!tracing::dispatcher::has_been_set());
    assert!(!tracing::enabled!(tracing::Level::WARN));
    let m = ModelInfo {
        n_layers: 2,
        n_q_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
        rope_theta: 10000.0,
        n_ctx_train: 4096,
    };
    let cfg = r#"{"dense_layers": 0, "default": {"method": "dense"}}"#;
    llama_plugin_new(cfg, &m).unwrap();
    assert!(tracing::dispatcher::has_been_set());
    assert!(tracing::enabled!(tracing::Level::WARN));
    assert!(!tracing::enabled!(tracing::Level::DEBUG));
    // Once per process: a second plugin keeps the first subscriber.
    llama_plugin_new(cfg, &m).unwrap();
    assert!(tracing::enabled!(tracing::Level::WARN));
}
