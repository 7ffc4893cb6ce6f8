//! No panic crosses the bridge, and one poison policy for every handle
//! (`infinitehip_bridge::guarded`): after a caught panic a handle refuses
//! work (errors) and its infallible calls return logged fallbacks. Each
//! handle is poisoned with an injected panic, then every bridge function of
//! it is called: one that bypasses the guard returns its normal answer and
//! fails here.

use infinitehip_bridge::ffi::ModelInfo;
use infinitehip_bridge::{default_config_json, engine_new, llama_gpu_route_new, LlamaPlugin};

fn model() -> ModelInfo {
    ModelInfo {
        n_layers: 2,
        n_q_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
        rope_theta: 10000.0,
        n_ctx_train: 4096,
    }
}

const HIP: &str = r#"{"dense_layers": 1, "default": {"method": "hip", "sink": 4, "window": 8,
    "stages": [{"chunk_size": 8, "keep_tokens": 8, "refresh_interval": 2},
               {"chunk_size": 4, "keep_tokens": 4, "refresh_interval": 1}],
    "block_size_q": 8, "q_stride": 1, "prefill_chunk": 64}}"#;

fn poison(p: &infinitehip_bridge::Poison) {
    let e = p.run_for_test(|| panic!("injected panic")).unwrap_err();
    assert!(e.contains("injected panic"), "{e}");
    assert!(p.is_poisoned());
}

fn assert_poisoned<T: std::fmt::Debug>(r: Result<T, String>) {
    let e = r.unwrap_err();
    assert!(e.contains("poisoned"), "{e}");
}

#[test]
fn a_poisoned_plugin_refuses_every_call() {
    let p = LlamaPlugin::new(HIP, &model()).unwrap();
    assert_eq!(p.layer_method(1).unwrap(), "hip");
    assert!(p.summary().contains("hip"));
    assert!(p.stats_json().contains("plans"));
    poison(&p.poison);
    assert_poisoned(p.layer_method(1));
    assert_eq!(p.summary(), "(unavailable)");
    assert!(p.stats_json().contains("\"error\""));
    assert!(!p.locret_on());
    assert!(!p.locret_layer(1));
    assert!(!p.locret_ubatch_decoded());
    p.locret_set_qk_interleaved(true);
    p.locret_release_heads();
    assert_poisoned(p.locret_graph_fc2(1));
    assert_poisoned(p.locret_begin(&[0], &[1], &[0]));
}

#[test]
fn a_poisoned_gpu_route_refuses_every_call() {
    let p = LlamaPlugin::new(HIP, &model()).unwrap();
    let r = llama_gpu_route_new(&p);
    assert!(r.top_k(&p, 1, 64).is_ok());
    assert!(r.gpu_stats_json().contains("plans"));
    poison(&r.poison);
    assert_poisoned(r.top_k(&p, 1, 64));
    assert!(r.gpu_stats_json().contains("\"error\""));
}

#[test]
fn a_poisoned_engine_refuses_every_call() {
    assert!(default_config_json().contains("dense_layers"));
    let mut e = engine_new(&default_config_json()).unwrap();
    let n = e.n_layers();
    assert!(n > 0);
    e.add_sequence(1).unwrap();
    poison(&e.poison);
    assert_eq!(e.n_layers(), 0);
    assert_eq!(e.config_json(), "");
    assert!(e.stats_json().contains("\"error\""));
    assert_poisoned(e.add_sequence(2));
    assert_poisoned(e.seq_len(0, 1));
    assert_poisoned(e.free_sequence(1));
}
