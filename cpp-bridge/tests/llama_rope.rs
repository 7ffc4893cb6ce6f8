//! hip's RoPE modes over llama.cpp-layout buffers: keys and queries in
//! llama.cpp's interleaved (NORM) pair layout, moved by the plugin with
//! llama.cpp's RoPE, against the core engine over the same vectors in the
//! halves layout (where the core's `Rope` rotates them).

use infinitehip::policy::Phase;
use infinitehip::rng::Rng;
use infinitehip::{Engine, PolicyConfig};
use infinitehip_bridge::ffi::{ModelInfo, RopeInfo, TensorDesc};
use infinitehip_bridge::LlamaPlugin;

const D: usize = 16;
const HQ: usize = 4;
const HKV: usize = 2;
const SCALE: f32 = 0.25;

fn model(n_ctx_train: u32) -> ModelInfo {
    ModelInfo {
        n_layers: 2,
        n_q_heads: HQ as u32,
        n_kv_heads: HKV as u32,
        head_dim: D as u32,
        rope_theta: 10000.0,
        n_ctx_train,
    }
}

fn rope(rope_type: i32) -> RopeInfo {
    RopeInfo {
        rope_type,
        n_rot: D as u32,
        freq_base: 10000.0,
        freq_scale: 1.0,
        yarn: false,
    }
}

/// Layer 0 dense, layer 1 hip with the given RoPE modes.
fn config(keep: usize, scoring: &str, attention: &str) -> String {
    format!(
        r#"{{"dense_layers": 1, "default": {{"method": "hip", "sink": 4, "window": 8,
        "stages": [{{"chunk_size": 8, "keep_tokens": {k1}, "refresh_interval": 2}},
                   {{"chunk_size": 4, "keep_tokens": {keep}, "refresh_interval": 1}}],
        "block_size_q": 8, "q_stride": 1, "prefill_chunk": 64,
        "rope": {{"scoring": "{scoring}", "attention": "{attention}"}}}}}}"#,
        k1 = keep * 2
    )
}

fn desc(ne: [usize; 4]) -> TensorDesc {
    let nb = [4, 4 * ne[0], 4 * ne[0] * ne[1], 4 * ne[0] * ne[1] * ne[2]];
    TensorDesc {
        dtype: 0,
        ne0: ne[0] as i64,
        ne1: ne[1] as i64,
        ne2: ne[2] as i64,
        ne3: ne[3] as i64,
        nb0: nb[0] as u64,
        nb1: nb[1] as u64,
        nb2: nb[2] as u64,
        nb3: nb[3] as u64,
    }
}

fn bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|a| a.to_le_bytes()).collect()
}

/// Halves layout (i, i + D/2) to llama.cpp's NORM layout (2i, 2i + 1), per head.
fn to_interleaved(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (h, o) in x.chunks_exact(D).zip(out.chunks_exact_mut(D)) {
        for i in 0..D / 2 {
            o[2 * i] = h[i];
            o[2 * i + 1] = h[i + D / 2];
        }
    }
    out
}

/// plan + attend of `layer` over the first `len` cells of `k`/`v`
/// (`[cell][hkv][d]`, f32), the last `n` of them being the queries `q`.
fn run(p: &LlamaPlugin, layer: u32, k: &[f32], v: &[f32], len: usize, q: &[f32]) -> Vec<f32> {
    let n = q.len() / (HQ * D);
    let mut mask = Vec::with_capacity((n + 4) * len);
    for r in 0..n + 4 {
        for c in 0..len {
            let vis = r < n && c <= len - n + r;
            mask.push(if vis { 0.0 } else { f32::NEG_INFINITY });
        }
    }
    let (kb, vb, qb, mb) = (
        bytes(&k[..len * HKV * D]),
        bytes(&v[..len * HKV * D]),
        bytes(q),
        bytes(&mask),
    );
    let (kd, qd, md) = (
        desc([D, HKV, len, 1]),
        desc([D, HQ, n, 1]),
        desc([len, n + 4, 1, 1]),
    );
    p.plan(layer, SCALE, &qb, &qd, &kb, &kd, &vb, &kd, false, &mb, &md)
        .unwrap();
    let mut out = vec![f32::NAN; n * HQ * D];
    p.attend(
        layer,
        0,
        n * HKV,
        SCALE,
        &qb,
        &qd,
        &kb,
        &kd,
        &vb,
        &kd,
        false,
        &mb,
        &md,
        &mut out,
    )
    .unwrap();
    out
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let b64: Vec<f64> = b.iter().map(|&x| x as f64).collect();
    infinitehip::attention::rel_error(a, &b64)
}

/// Plugin (NORM keys and queries, moved with llama.cpp's RoPE) vs engine
/// (the same vectors in the halves layout) over a 200-token prompt in two
/// ubatches, then decode steps. Returns (worst rel err, worst difference
/// between the plugin's output and its output with original positions).
fn plugin_vs_engine(scoring: &str, attention: &str, n_ctx_train: u32, seed: u64) -> (f64, f64) {
    let mut rng = Rng::new(seed);
    let cfg = config(16, scoring, attention);
    let p = LlamaPlugin::new_with_rope(&cfg, &model(n_ctx_train), Some(&rope(0))).unwrap();
    let orig = LlamaPlugin::new(&config(16, "original", "original"), &model(n_ctx_train)).unwrap();
    let mut ecfg: PolicyConfig = p.config().clone();
    ecfg.kv.dtype = infinitehip::DType::F32;
    ecfg.kv.page_size = 64;
    let mut eng = Engine::new(ecfg).unwrap();
    eng.add_sequence(0).unwrap();
    let total = 260;
    let te = HKV * D;
    let k_h = rng.normal_vec(total * te, 1.0);
    let v = rng.normal_vec(total * te, 1.0);
    let k_i = to_interleaved(&k_h);
    let (mut worst, mut moved) = (0f64, 0f64);
    let mut steps = vec![(0, 120), (120, 200)];
    steps.extend((200..total).map(|t| (t, t + 1)));
    for (a, b) in steps {
        let n = b - a;
        let phase = if n == 1 {
            Phase::Decode
        } else {
            Phase::Prefill
        };
        eng.append(
            1,
            0,
            &k_h[a * te..b * te],
            &v[a * te..b * te],
            phase,
            b == 200,
            None,
        )
        .unwrap();
        let q_h = rng.normal_vec(n * HQ * D, 1.0);
        let q_i = to_interleaved(&q_h);
        let ours = run(&p, 1, &k_i, &v, b, &q_i);
        let mut want = vec![0f32; n * HQ * D];
        if n == 1 {
            eng.attend_decode(1, &[0], &q_h, &mut want).unwrap();
        } else {
            eng.attend_prefill(1, 0, &q_h, &mut want).unwrap();
        }
        let e = rel(&ours, &want);
        assert!(
            e < 1e-4,
            "{scoring}/{attention} tokens {a}..{b}: plugin vs engine rel err {e}"
        );
        assert!(ours.iter().all(|x| x.is_finite()));
        worst = worst.max(e);
        moved = moved.max(rel(&run(&orig, 1, &k_i, &v, b, &q_i), &ours));
    }
    (worst, moved)
}

/// Streaming positions and chunk-indexed scoring over interleaved keys
/// equal the engine's, and differ from attention at original positions.
#[test]
fn streaming_and_chunk_indexed_equal_engine() {
    let (worst, moved) = plugin_vs_engine("chunk_indexed", "streaming", 4096, 3);
    assert!(moved > 1e-2, "streaming never moved a position: {moved}");
    eprintln!("chunk_indexed/streaming: worst rel err {worst:.2e}, vs original {moved:.2e}");
}

/// Relative scoring engages past the trained length (64 here).
#[test]
fn relative_scoring_past_trained_length_equals_engine() {
    let (worst, moved) = plugin_vs_engine("relative", "original", 64, 4);
    assert!(
        moved > 1e-3,
        "relative scoring never changed a selection: {moved}"
    );
    eprintln!("relative/original: worst rel err {worst:.2e}, vs original {moved:.2e}");
}

/// With a budget covering every token, streaming ranks equal positions:
/// output equals dense attention, and equals the original-mode plugin.
#[test]
fn covering_budget_streaming_equals_original() {
    let mut rng = Rng::new(7);
    let p = LlamaPlugin::new_with_rope(
        &config(512, "chunk_indexed", "streaming"),
        &model(4096),
        Some(&rope(0)),
    )
    .unwrap();
    let o = LlamaPlugin::new_with_rope(
        &config(512, "original", "original"),
        &model(4096),
        Some(&rope(0)),
    )
    .unwrap();
    let te = HKV * D;
    let k = rng.normal_vec(300 * te, 1.0);
    let v = rng.normal_vec(300 * te, 1.0);
    for (len, n) in [(200, 200), (201, 1), (300, 1)] {
        let q = rng.normal_vec(n * HQ * D, 1.0);
        let a = run(&p, 1, &k, &v, len, &q);
        let b = run(&o, 1, &k, &v, len, &q);
        let e = rel(&a, &b);
        assert!(
            e < 1e-5,
            "len {len}: streaming vs original at a covering budget: {e}"
        );
    }
}

#[test]
fn rope_modes_are_refused_without_what_they_need() {
    let m = model(4096);
    let cfg = config(16, "chunk_indexed", "streaming");
    let err = |r: Result<LlamaPlugin, infinitehip::Error>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    let e = err(LlamaPlugin::new(&cfg, &m));
    assert!(e.contains("0006"), "{e}");
    let mut r = rope(0);
    r.yarn = true;
    assert!(err(LlamaPlugin::new_with_rope(&cfg, &m, Some(&r))).contains("YaRN"));
    let mut r = rope(0);
    r.n_rot = 8;
    assert!(err(LlamaPlugin::new_with_rope(&cfg, &m, Some(&r))).contains("scoring"));
    // Streaming alone moves only the rotated dims: fine with partial RoPE.
    assert!(LlamaPlugin::new_with_rope(&config(16, "original", "streaming"), &m, Some(&r)).is_ok());
    assert!(err(LlamaPlugin::new_with_rope(&cfg, &m, Some(&rope(8)))).contains("rope type"));
    assert!(LlamaPlugin::new_with_rope(&cfg, &m, Some(&rope(2))).is_ok());
}
