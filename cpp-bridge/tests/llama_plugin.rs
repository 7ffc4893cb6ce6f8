//! The llama.cpp path of the bridge on synthetic llama.cpp-layout buffers:
//! K `[d, hkv, n_kv]` f16/f32, V plain or transposed, an f32/f16 mask.

use half::f16;
use infinitehip::rng::Rng;
use infinitehip::{Engine, PolicyConfig};
use infinitehip_bridge::ffi::{ModelInfo, TensorDesc};
use infinitehip_bridge::LlamaPlugin;

const D: usize = 16;
const HQ: usize = 4;
const HKV: usize = 2;

fn model() -> ModelInfo {
    ModelInfo {
        n_layers: 2,
        n_q_heads: HQ as u32,
        n_kv_heads: HKV as u32,
        head_dim: D as u32,
        rope_theta: 10000.0,
        n_ctx_train: 4096,
    }
}

/// Layer 0 dense, layer 1 hip with `keep` tokens in its last stage.
fn config(keep: usize, window: usize) -> String {
    format!(
        r#"{{"dense_layers": 1, "default": {{"method": "hip", "sink": 4, "window": {window},
        "stages": [{{"chunk_size": 8, "keep_tokens": {k1}, "refresh_interval": 2}},
                   {{"chunk_size": 4, "keep_tokens": {keep}, "refresh_interval": 1}}],
        "block_size_q": 8, "q_stride": 1, "prefill_chunk": 64}}}}"#,
        k1 = keep * 2
    )
}

fn desc(dtype: u32, ne: [i64; 4], nb: [u64; 4]) -> TensorDesc {
    TensorDesc {
        dtype,
        ne0: ne[0],
        ne1: ne[1],
        ne2: ne[2],
        ne3: ne[3],
        nb0: nb[0],
        nb1: nb[1],
        nb2: nb[2],
        nb3: nb[3],
    }
}

/// One stream's cache as llama.cpp holds it.
struct Cache {
    kv_size: usize,
    f16: bool,
    v_trans: bool,
    /// Logical (rounded) K/V: `k[cell][h][j]`.
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Cache {
    fn new(kv_size: usize, f16: bool, v_trans: bool, rng: &mut Rng) -> Self {
        let n = kv_size * HKV * D;
        let round = |x: f32| {
            if f16 {
                half::f16::from_f32(x).to_f32()
            } else {
                x
            }
        };
        let k = (0..n).map(|_| round(rng.normal())).collect();
        let v = (0..n).map(|_| round(rng.normal())).collect();
        Cache {
            kv_size,
            f16,
            v_trans,
            k,
            v,
        }
    }
    fn es(&self) -> usize {
        if self.f16 {
            2
        } else {
            4
        }
    }
    fn bytes(&self, x: &[f32]) -> Vec<u8> {
        if self.f16 {
            x.iter()
                .flat_map(|&a| f16::from_f32(a).to_le_bytes())
                .collect()
        } else {
            x.iter().flat_map(|&a| a.to_le_bytes()).collect()
        }
    }
    fn k_bytes(&self) -> Vec<u8> {
        self.bytes(&self.k)
    }
    fn v_bytes(&self) -> Vec<u8> {
        if !self.v_trans {
            return self.bytes(&self.v);
        }
        // [h*d + j][cell]
        let mut t = vec![0f32; self.v.len()];
        for c in 0..self.kv_size {
            for hj in 0..HKV * D {
                t[hj * self.kv_size + c] = self.v[c * HKV * D + hj];
            }
        }
        self.bytes(&t)
    }
    fn dtype(&self) -> u32 {
        u32::from(self.f16)
    }
    /// Views of the first `n_kv` cells.
    fn k_desc(&self, n_kv: usize) -> TensorDesc {
        let es = self.es() as u64;
        desc(
            self.dtype(),
            [D as i64, HKV as i64, n_kv as i64, 1],
            [
                es,
                es * D as u64,
                es * (HKV * D) as u64,
                es * (HKV * D * self.kv_size) as u64,
            ],
        )
    }
    fn v_desc(&self, n_kv: usize) -> TensorDesc {
        let es = self.es() as u64;
        if self.v_trans {
            let kv = self.kv_size as u64;
            desc(
                self.dtype(),
                [n_kv as i64, HKV as i64, D as i64, 1],
                [es, es * kv * D as u64, es * kv, es * kv * (HKV * D) as u64],
            )
        } else {
            self.k_desc(n_kv)
        }
    }
}

struct Call {
    q: Vec<f32>,
    n_tokens: usize,
    n_kv: usize,
    /// mask[row][cell]
    mask: Vec<Vec<f32>>,
}

impl Call {
    fn q_bytes(&self) -> Vec<u8> {
        self.q.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
    fn q_desc(&self) -> TensorDesc {
        desc(
            0,
            [D as i64, HQ as i64, self.n_tokens as i64, 1],
            [
                4,
                4 * D as u64,
                4 * (HQ * D) as u64,
                4 * (HQ * D * self.n_tokens) as u64,
            ],
        )
    }
    /// Padded to 4 rows more than the queries, as llama.cpp pads.
    fn mask_bytes(&self, f16m: bool) -> (Vec<u8>, TensorDesc) {
        let rows = self.n_tokens + 4;
        let mut b = Vec::new();
        for r in 0..rows {
            for c in 0..self.n_kv {
                let x = if r < self.n_tokens {
                    self.mask[r][c]
                } else {
                    f32::NEG_INFINITY
                };
                if f16m {
                    b.extend(f16::from_f32(x).to_le_bytes());
                } else {
                    b.extend(x.to_le_bytes());
                }
            }
        }
        let es = if f16m { 2 } else { 4 };
        let n = self.n_kv as u64;
        (
            b,
            desc(
                u32::from(f16m),
                [self.n_kv as i64, rows as i64, 1, 1],
                [es, es * n, es * n * rows as u64, es * n * rows as u64],
            ),
        )
    }
}

/// A causal chain over `cells` (in order): the last `n_tokens` of them are
/// the queries.
fn chain_call(cells: &[usize], n_kv: usize, n_tokens: usize, rng: &mut Rng) -> Call {
    let len = cells.len();
    let mask = (0..n_tokens)
        .map(|t| {
            let mut row = vec![f32::NEG_INFINITY; n_kv];
            for &c in &cells[..len - n_tokens + t + 1] {
                row[c] = 0.0;
            }
            row
        })
        .collect();
    Call {
        q: (0..n_tokens * HQ * D).map(|_| rng.normal()).collect(),
        n_tokens,
        n_kv,
        mask,
    }
}

/// f64 attention of every query over its visible cells (mask as bias).
fn reference(cache: &Cache, call: &Call, scale: f32) -> Vec<f64> {
    let g = HQ / HKV;
    let mut out = vec![0f64; call.n_tokens * HQ * D];
    for t in 0..call.n_tokens {
        for hq in 0..HQ {
            let h = hq / g;
            let q = &call.q[(t * HQ + hq) * D..(t * HQ + hq + 1) * D];
            let vis: Vec<(usize, f64)> = (0..call.n_kv)
                .filter(|&c| call.mask[t][c] != f32::NEG_INFINITY)
                .map(|c| {
                    let k = &cache.k[(c * HKV + h) * D..(c * HKV + h + 1) * D];
                    let s: f64 = q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
                    (c, s * scale as f64 + call.mask[t][c] as f64)
                })
                .collect();
            let m = vis.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
            let l: f64 = vis.iter().map(|x| (x.1 - m).exp()).sum();
            let o = &mut out[(t * HQ + hq) * D..(t * HQ + hq + 1) * D];
            for &(c, s) in &vis {
                let w = (s - m).exp() / l;
                for (j, oj) in o.iter_mut().enumerate() {
                    *oj += w * cache.v[(c * HKV + h) * D + j] as f64;
                }
            }
        }
    }
    out
}

/// plan + attend (split over `threads` disjoint item ranges) on `layer`.
fn run(
    p: &LlamaPlugin,
    layer: u32,
    cache: &Cache,
    call: &Call,
    f16m: bool,
    threads: usize,
) -> Result<Vec<f32>, String> {
    let scale = 1.0 / (D as f32).sqrt();
    let (qb, kb, vb) = (call.q_bytes(), cache.k_bytes(), cache.v_bytes());
    let (qd, kd, vd) = (
        call.q_desc(),
        cache.k_desc(call.n_kv),
        cache.v_desc(call.n_kv),
    );
    let (mb, md) = call.mask_bytes(f16m);
    p.plan(
        layer,
        scale,
        &qb,
        &qd,
        &kb,
        &kd,
        &vb,
        &vd,
        cache.v_trans,
        &mb,
        &md,
    )?;
    let g = HQ / HKV;
    let n_items = call.n_tokens * HKV;
    let mut out = vec![f32::NAN; n_items * g * D];
    let per = n_items.div_ceil(threads);
    std::thread::scope(|sc| {
        let mut handles = Vec::new();
        for (i, chunk) in out.chunks_mut(per * g * D).enumerate() {
            let (qb, kb, vb, mb) = (&qb, &kb, &vb, &mb);
            let i0 = i * per;
            let i1 = i0 + chunk.len() / (g * D);
            handles.push(sc.spawn(move || {
                p.attend(
                    layer,
                    i0,
                    i1,
                    scale,
                    qb,
                    &qd,
                    kb,
                    &kd,
                    vb,
                    &vd,
                    cache.v_trans,
                    mb,
                    &md,
                    chunk,
                )
            }));
        }
        handles.into_iter().try_for_each(|h| h.join().unwrap())
    })?;
    Ok(out)
}

fn rel(a: &[f32], b: &[f64]) -> f64 {
    infinitehip::attention::rel_error(a, b)
}

#[test]
fn full_budget_equals_dense_in_every_layout() {
    let mut rng = Rng::new(11);
    for (f16, v_trans, f16m) in [
        (true, true, false),
        (true, false, true),
        (false, true, false),
        (false, false, false),
    ] {
        let p = LlamaPlugin::new(&config(256, 8), &model()).unwrap();
        let cache = Cache::new(128, f16, v_trans, &mut rng);
        // The sequence skips cells 10..13 (another sequence's) and ends at 100.
        let cells: Vec<usize> = (0..100).filter(|c| !(10..13).contains(c)).collect();
        let n_kv = 112;
        // Prefill of 40 tokens, then decode steps over growing chains.
        let pre = chain_call(&cells[..60], n_kv, 40, &mut rng);
        let out = run(&p, 1, &cache, &pre, f16m, 2).unwrap();
        let e = rel(&out, &reference(&cache, &pre, 1.0 / 4.0));
        assert!(e < 1e-5, "prefill f16={f16} v_trans={v_trans}: rel err {e}");
        for len in 61..=cells.len() {
            let dec = chain_call(&cells[..len], n_kv, 1, &mut rng);
            let out = run(&p, 1, &cache, &dec, f16m, 2).unwrap();
            let e = rel(&out, &reference(&cache, &dec, 0.25));
            assert!(e < 1e-5, "decode len {len}: rel err {e}");
        }
        let st: serde_json::Value = serde_json::from_str(&p.stats_json()).unwrap();
        assert_eq!(st["attended_fraction"].as_f64().unwrap(), 1.0, "{st}");
        assert_eq!(st["masked_streams"].as_u64().unwrap(), 0);
    }
}

/// With a small budget the plugin selects exactly what the engine selects
/// for the same keys: its outputs equal `Engine::attend_decode`'s.
#[test]
fn small_budget_decode_equals_engine() {
    let mut rng = Rng::new(5);
    let cfg_json = config(16, 8);
    let p = LlamaPlugin::new(&cfg_json, &model()).unwrap();
    let cache = Cache::new(512, true, true, &mut rng);
    let len0 = 300;
    let cells: Vec<usize> = (0..len0 + 40).collect();
    let mut cfg: PolicyConfig = p.config().clone();
    cfg.kv.dtype = infinitehip::DType::F32;
    cfg.kv.page_size = 64;
    let mut eng = Engine::new(cfg).unwrap();
    eng.add_sequence(0).unwrap();
    let te = HKV * D;
    eng.append(
        1,
        0,
        &cache.k[..len0 * te],
        &cache.v[..len0 * te],
        infinitehip::policy::Phase::Prefill,
        true,
        None,
    )
    .unwrap();
    let mut sparse_seen = false;
    for len in len0 + 1..=cells.len() {
        let t = len - 1;
        eng.append(
            1,
            0,
            &cache.k[t * te..len * te],
            &cache.v[t * te..len * te],
            infinitehip::policy::Phase::Decode,
            true,
            None,
        )
        .unwrap();
        let dec = chain_call(&cells[..len], 512, 1, &mut rng);
        let ours = run(&p, 1, &cache, &dec, false, 2).unwrap();
        let mut want = vec![0f32; HQ * D];
        eng.attend_decode(1, &[0], &dec.q, &mut want).unwrap();
        let want64: Vec<f64> = want.iter().map(|&x| x as f64).collect();
        let e = rel(&ours, &want64);
        assert!(e < 1e-5, "len {len}: plugin vs engine rel err {e}");
        let dense = rel(&ours, &reference(&cache, &dec, 0.25));
        sparse_seen |= dense > 1e-4;
    }
    assert!(
        sparse_seen,
        "a 16-token budget over 300+ tokens never differed from dense"
    );
    let st: serde_json::Value = serde_json::from_str(&p.stats_json()).unwrap();
    let frac = st["attended_fraction"].as_f64().unwrap();
    assert!(frac < 0.2, "attended fraction {frac}");
}

/// Two sequences interleaved in one stream are not one chain: exact masked
/// attention, equal to the reference.
#[test]
fn mixed_sequences_use_exact_masked_path() {
    let mut rng = Rng::new(9);
    let p = LlamaPlugin::new(&config(16, 8), &model()).unwrap();
    let cache = Cache::new(64, true, true, &mut rng);
    let a: Vec<usize> = (0..64).step_by(2).collect();
    let b: Vec<usize> = (1..64).step_by(2).collect();
    let mut call = chain_call(&a[..20], 64, 1, &mut rng);
    let cb = chain_call(&b[..30], 64, 1, &mut rng);
    call.q.extend(cb.q);
    call.mask.extend(cb.mask);
    call.n_tokens = 2;
    // A bias value also forces the masked path.
    call.mask[0][a[3]] = -1.5;
    let out = run(&p, 1, &cache, &call, false, 1).unwrap();
    let e = rel(&out, &reference(&cache, &call, 0.25));
    assert!(e < 1e-5, "rel err {e}");
    let st: serde_json::Value = serde_json::from_str(&p.stats_json()).unwrap();
    assert_eq!(st["masked_streams"].as_u64().unwrap(), 1, "{st}");
}

#[test]
fn bad_inputs_are_errors_naming_the_problem() {
    let mut rng = Rng::new(3);
    let p = LlamaPlugin::new(&config(16, 8), &model()).unwrap();
    let cache = Cache::new(32, true, false, &mut rng);
    let call = chain_call(&(0..20).collect::<Vec<_>>(), 32, 1, &mut rng);
    let (qb, kb, vb) = (call.q_bytes(), cache.k_bytes(), cache.v_bytes());
    let (qd, kd, vd) = (call.q_desc(), cache.k_desc(32), cache.v_desc(32));
    let (mb, md) = call.mask_bytes(false);
    let mut out = vec![0f32; HQ * D];
    let e = p
        .attend(
            1, 0, 2, 0.25, &qb, &qd, &kb, &kd, &vb, &vd, false, &mb, &md, &mut out,
        )
        .unwrap_err();
    assert!(e.contains("attend before plan"), "{e}");
    let e = p
        .plan(0, 0.25, &qb, &qd, &kb, &kd, &vb, &vd, false, &mb, &md)
        .unwrap_err();
    assert!(e.contains("layer 0 is dense"), "{e}");
    let e = p
        .plan(7, 0.25, &qb, &qd, &kb, &kd, &vb, &vd, false, &mb, &md)
        .unwrap_err();
    assert!(e.contains("layer 7"), "{e}");
    let e = p
        .plan(
            1,
            0.25,
            &qb,
            &qd,
            &kb[..kb.len() - 2],
            &kd,
            &vb,
            &vd,
            false,
            &mb,
            &md,
        )
        .unwrap_err();
    assert!(e.contains("k buffer"), "{e}");
    let mut bad = kd;
    bad.dtype = 8;
    let e = p
        .plan(1, 0.25, &qb, &qd, &kb, &bad, &vb, &vd, false, &mb, &md)
        .unwrap_err();
    assert!(e.contains("unsupported dtype") && e.contains("k"), "{e}");
    let e = p
        .plan(1, 0.25, &qb, &qd, &kb, &kd, &vb, &vd, true, &mb, &md)
        .unwrap_err();
    assert!(e.contains("v (transposed)"), "{e}");
    let e = p
        .plan(1, f32::NAN, &qb, &qd, &kb, &kd, &vb, &vd, false, &mb, &md)
        .unwrap_err();
    assert!(e.contains("kq_scale"), "{e}");
    let mut bad = md;
    bad.ne0 = 31;
    let e = p
        .plan(1, 0.25, &qb, &qd, &kb, &kd, &vb, &vd, false, &mb, &bad)
        .unwrap_err();
    assert!(e.contains("kq_mask"), "{e}");
    p.plan(1, 0.25, &qb, &qd, &kb, &kd, &vb, &vd, false, &mb, &md)
        .unwrap();
    let e = p
        .attend(
            1, 0, 3, 0.25, &qb, &qd, &kb, &kd, &vb, &vd, false, &mb, &md, &mut out,
        )
        .unwrap_err();
    assert!(e.contains("attend items/out"), "{e}");

    // Config problems.
    let m = model();
    let e = LlamaPlugin::new(r#"{"model": {"n_q_heads": 8}}"#, &m)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model.n_q_heads"), "{e}");
    let e = LlamaPlugin::new(
        r#"{"dense_layers": 0, "default": {"method": "locret", "weights": "/nonexistent/locret.safetensors"}}"#,
        &m,
    )
    .err()
    .unwrap()
    .to_string();
    // locret runs on llama.cpp now: a missing weights file names the field and the file
    assert!(
        e.contains("layer 0 locret.weights") && e.contains("/nonexistent/locret.safetensors"),
        "{e}"
    );
    let e = LlamaPlugin::new(r#"{"dense_layers": 0, "default": {"method": "hip", "rope": {"scoring": "chunk_indexed", "attention": "original"}}}"#, &m)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("hip.rope"), "{e}");
    let e = LlamaPlugin::new("[1]", &m).err().unwrap().to_string();
    assert!(e.contains("JSON object"), "{e}");
    let p = LlamaPlugin::new(r#"{"dense_layers": 1}"#, &m).unwrap();
    assert_eq!(
        p.summary(),
        "layer 0: dense (llama.cpp attention), layer 1: hip"
    );
}

/// A middle row from another sequence breaks the chain even when the first
/// and last rows fit it (f16 mask, the flash-attention layout).
#[test]
fn middle_row_of_another_sequence_is_detected() {
    let mut rng = Rng::new(21);
    let p = LlamaPlugin::new(&config(16, 8), &model()).unwrap();
    let cache = Cache::new(64, true, false, &mut rng);
    let a: Vec<usize> = (0..40).collect();
    let mut call = chain_call(&a, 64, 3, &mut rng);
    // Row 1 sees cells 0..10 and 50 only.
    call.mask[1] = (0..64)
        .map(|c| {
            if c < 10 || c == 50 {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let out = run(&p, 1, &cache, &call, true, 2).unwrap();
    let e = rel(&out, &reference(&cache, &call, 0.25));
    assert!(e < 1e-5, "rel err {e}");
    let st: serde_json::Value = serde_json::from_str(&p.stats_json()).unwrap();
    assert_eq!(st["masked_streams"].as_u64().unwrap(), 1, "{st}");
}

/// Gather the K/V rows of `cells` in chain order (the engine's layout).
fn gather(cache: &Cache, cells: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let te = HKV * D;
    let mut k = Vec::with_capacity(cells.len() * te);
    let mut v = Vec::with_capacity(cells.len() * te);
    for &c in cells {
        k.extend_from_slice(&cache.k[c * te..(c + 1) * te]);
        v.extend_from_slice(&cache.v[c * te..(c + 1) * te]);
    }
    (k, v)
}

/// Drive the plugin over a growing cell chain the way llama.cpp does (per
/// ubatch, every sparse layer in order) and the engine over the same tokens
/// (appends with `prompt_done` on the prompt's last ubatch, `attend_prefill`,
/// then `append` + `attend_decode` per token). Two sequences one after the
/// other in the same stream: the second starts on other cells, so the plugin
/// must restart its per-stream state (once per step for lazy's shared state).
/// Returns (worst plugin-vs-engine rel err, some output differed from dense).
fn plugin_vs_engine(cfg_json: &str, layers: &[u32], seed: u64) -> (f64, bool, LlamaPlugin) {
    let mut rng = Rng::new(seed);
    let p = LlamaPlugin::new(cfg_json, &model()).unwrap();
    let n_kv = 512;
    let cache = Cache::new(n_kv, true, seed.is_multiple_of(2), &mut rng);
    let mut cfg: PolicyConfig = p.config().clone();
    cfg.kv.dtype = infinitehip::DType::F32;
    cfg.kv.page_size = 64;
    let mut eng = Engine::new(cfg).unwrap();
    let (mut worst, mut sparse_seen) = (0f64, false);
    // Sequence 0: every cell but 3 mod 7 (another sequence's), prompt in two
    // ubatches; sequence 1: odd cells, prompt in one ubatch.
    let seqs: [(Vec<usize>, Vec<usize>, usize); 2] = [
        (
            (0..n_kv).filter(|c| c % 7 != 3).collect(),
            vec![180, 120],
            24,
        ),
        ((1..n_kv).step_by(2).collect(), vec![200], 12),
    ];
    for (sid, (cells, ubatches, n_dec)) in seqs.iter().enumerate() {
        let sid = sid as u64;
        if sid > 0 {
            eng.free_sequence(sid - 1).unwrap();
        }
        eng.add_sequence(sid).unwrap();
        let prompt: usize = ubatches.iter().sum();
        let mut len = 0;
        let mut steps: Vec<(usize, usize)> = Vec::new();
        for &n in ubatches {
            steps.push((len + n, n));
            len += n;
        }
        for t in prompt..prompt + n_dec {
            steps.push((t + 1, 1));
        }
        for (end, n) in steps {
            let (k, v) = gather(&cache, &cells[end - n..end]);
            let phase = if n == 1 {
                infinitehip::policy::Phase::Decode
            } else {
                infinitehip::policy::Phase::Prefill
            };
            for &l in layers {
                eng.append(l as usize, sid, &k, &v, phase, end == prompt, None)
                    .unwrap();
            }
            let call = chain_call(&cells[..end], n_kv, n, &mut rng);
            for &l in layers {
                let ours = run(&p, l, &cache, &call, false, 2).unwrap();
                let mut want = vec![0f32; n * HQ * D];
                if n == 1 {
                    eng.attend_decode(l as usize, &[sid], &call.q, &mut want)
                        .unwrap();
                } else {
                    eng.attend_prefill(l as usize, sid, &call.q, &mut want)
                        .unwrap();
                }
                let want64: Vec<f64> = want.iter().map(|&x| x as f64).collect();
                let e = rel(&ours, &want64);
                assert!(
                    e < 1e-5,
                    "seq {sid} layer {l} len {end} (n {n}): plugin vs engine rel err {e}"
                );
                worst = worst.max(e);
                sparse_seen |= rel(&ours, &reference(&cache, &call, 0.25)) > 1e-3;
            }
        }
    }
    (worst, sparse_seen, p)
}

/// LazyLLM over llama.cpp cells: both layers lazy, pruning after layer 0
/// keeps 20% of the prompt for layer 1. The plugin's outputs (prefill
/// ubatches and decode) equal the engine's, so its keep sets are the
/// engine's; the shared state restarts once per step, not per layer.
#[test]
fn lazy_over_growing_chain_equals_engine() {
    let cfg = r#"{"dense_layers": 0, "default": {"method": "lazy", "points": [{"layer": 0, "keep": 0.2}]}}"#;
    let (worst, sparse_seen, p) = plugin_vs_engine(cfg, &[0, 1], 31);
    assert!(sparse_seen, "a 20% keep set never differed from dense");
    let lazy = p.lazy().expect("lazy state");
    // The last step of stream 0 is a decode step: 20% of the 200-token prompt
    // is kept after layer 0.
    let keep = lazy.keep_set(0, 1).unwrap();
    assert_eq!(keep.len(), 40, "keep set {keep:?}");
    let st: serde_json::Value = serde_json::from_str(&p.stats_json()).unwrap();
    assert_eq!(st["masked_streams"].as_u64().unwrap(), 0, "{st}");
    eprintln!("lazy: worst rel err vs engine {worst:.2e}, stats {st}");
}

/// Squeezed Attention over llama.cpp cells: the first single-token ubatch
/// ends the prompt; the plugin then clusters and calibrates the prefix
/// (after_append with prompt_done) and its lookups equal the engine's,
/// where the prompt's last append carried prompt_done.
#[test]
fn squeeze_over_growing_chain_equals_engine() {
    let cfg = r#"{"dense_layers": 1, "default": {"method": "squeeze", "percent_clusters": 10.0,
        "quantile": 0.8, "observation_window": 32, "kmeans_iters": 10}}"#;
    let (worst, sparse_seen, p) = plugin_vs_engine(cfg, &[1], 8);
    assert!(sparse_seen, "squeeze lookups never differed from dense");
    let st: serde_json::Value = serde_json::from_str(&p.stats_json()).unwrap();
    assert_eq!(st["prompts_done"].as_u64().unwrap(), 2, "{st}");
    let frac = st["attended_fraction"].as_f64().unwrap();
    assert!(frac < 1.0, "attended fraction {frac}");
    eprintln!("squeeze: worst rel err vs engine {worst:.2e}, stats {st}");
}

/// A lazy policy that names no points gets the default points for the host
/// model's depth (llama.cpp fills `model` before the config is read): 30
/// layers (the quality suite's SmolLM2-135M) prune after layers 8, 17, 26.
#[test]
fn lazy_without_points_takes_the_host_depth_default() {
    use infinitehip::config::{lazy_default_points, LayerPolicy, LAZY_DEFAULT_KEEP};
    let m = ModelInfo {
        n_layers: 30,
        ..model()
    };
    let p = LlamaPlugin::new(r#"{"dense_layers": 0, "default": {"method": "lazy"}}"#, &m).unwrap();
    let LayerPolicy::Lazy(z) = &p.config().default else {
        panic!("not lazy")
    };
    let got: Vec<(usize, f32)> = z.points.iter().map(|q| (q.layer, q.keep)).collect();
    let k = LAZY_DEFAULT_KEEP;
    assert_eq!(got, [(8, k[0]), (17, k[1]), (26, k[2])]);
    assert_eq!(z.points, lazy_default_points(30));
    assert_eq!(p.lazy().unwrap().config().points, z.points);
}

/// hip with `per_q_head` (one decode range list per q head) over llama.cpp
/// cells: the plugin's tiled kernel attends each q head over its own list and
/// its outputs (prefill ubatches per KV-head group, decode per q head) equal
/// the engine's, which the core tests check against the f64 reference.
#[test]
fn hip_per_q_head_over_growing_chain_equals_engine() {
    let cfg = r#"{"dense_layers": 1, "default": {"method": "hip", "sink": 4, "window": 8,
        "per_q_head": true, "successors": 2,
        "stages": [{"chunk_size": 2, "keep_tokens": 64, "refresh_interval": 2},
                   {"chunk_size": 1, "keep_tokens": 16, "refresh_interval": 1}],
        "block_size_q": 8, "q_stride": 1, "prefill_chunk": 64}}"#;
    let (worst, sparse_seen, p) = plugin_vs_engine(cfg, &[1], 12);
    assert!(sparse_seen, "a 16-token budget never differed from dense");
    let st: serde_json::Value = serde_json::from_str(&p.stats_json()).unwrap();
    assert_eq!(st["masked_streams"].as_u64().unwrap(), 0, "{st}");
    let frac = st["attended_fraction"].as_f64().unwrap();
    assert!(frac < 0.5, "attended fraction {frac}");
    eprintln!("hip per_q_head: worst rel err vs engine {worst:.2e}, stats {st}");
}

/// plan + `attend_team` on `threads` threads (thread 0 leads with the whole
/// output, as patch 0013's op does).
fn run_team(
    p: &LlamaPlugin,
    layer: u32,
    cache: &Cache,
    call: &Call,
    threads: usize,
) -> Result<Vec<f32>, String> {
    let scale = 1.0 / (D as f32).sqrt();
    let (qb, kb, vb) = (call.q_bytes(), cache.k_bytes(), cache.v_bytes());
    let (qd, kd, vd) = (
        call.q_desc(),
        cache.k_desc(call.n_kv),
        cache.v_desc(call.n_kv),
    );
    let (mb, md) = call.mask_bytes(false);
    let vt = cache.v_trans;
    p.plan(layer, scale, &qb, &qd, &kb, &kd, &vb, &vd, vt, &mb, &md)?;
    let mut out = vec![f32::NAN; call.n_tokens * HQ * D];
    std::thread::scope(|sc| {
        let (qb, kb, vb, mb) = (&qb, &kb, &vb, &mb);
        let helpers: Vec<_> = (1..threads)
            .map(|ith| {
                sc.spawn(move || {
                    p.attend_team(
                        layer,
                        ith as i32,
                        threads as i32,
                        scale,
                        qb,
                        &qd,
                        kb,
                        &kd,
                        vb,
                        &vd,
                        vt,
                        mb,
                        &md,
                        &mut [],
                    )
                })
            })
            .collect();
        let r = p.attend_team(
            layer,
            0,
            threads as i32,
            scale,
            qb,
            &qd,
            kb,
            &kd,
            vb,
            &vd,
            vt,
            mb,
            &md,
            &mut out,
        );
        helpers.into_iter().try_for_each(|h| h.join().unwrap())?;
        r
    })?;
    Ok(out)
}

fn split_attends(p: &LlamaPlugin) -> u64 {
    let st: serde_json::Value = serde_json::from_str(&p.stats_json()).unwrap();
    st["split_attends"].as_u64().unwrap()
}

/// The attend op on all ggml threads: at decode (2 KV heads on 2-5
/// threads) each head's selected cells are split across threads and
/// merged; that equals one thread's item-range attention up to f32
/// rounding at a small budget, and dense f64 at a covering one. Prefill
/// (many items) takes item ranges (no split).
#[test]
fn attend_team_split_equals_item_ranges() {
    let mut rng = Rng::new(21);
    for (keep, window) in [(16, 8), (512, 8)] {
        for threads in [2, 3, 5] {
            let p = LlamaPlugin::new(&config(keep, window), &model()).unwrap();
            let q = LlamaPlugin::new(&config(keep, window), &model()).unwrap();
            let cache = Cache::new(512, true, threads % 2 == 1, &mut rng);
            let cells: Vec<usize> = (0..420).collect();
            let pre = chain_call(&cells[..300], 512, 64, &mut rng);
            let a = run_team(&p, 1, &cache, &pre, threads).unwrap();
            let b = run(&q, 1, &cache, &pre, false, 1).unwrap();
            assert_eq!(a, b, "prefill through the team (item ranges) == one thread");
            assert_eq!(split_attends(&p), 0, "prefill was split");
            let mut worst = 0f64;
            for len in 301..=cells.len() {
                let dec = chain_call(&cells[..len], 512, 1, &mut rng);
                let a = run_team(&p, 1, &cache, &dec, threads).unwrap();
                let b = run(&q, 1, &cache, &dec, false, 1).unwrap();
                assert!(a.iter().all(|x| x.is_finite()), "non-finite output");
                let b64: Vec<f64> = b.iter().map(|&x| x as f64).collect();
                worst = worst.max(rel(&a, &b64));
                if keep == 512 {
                    let e = rel(&a, &reference(&cache, &dec, 0.25));
                    assert!(
                        e < 1e-5,
                        "covering budget, len {len}: split vs dense f64 rel err {e}"
                    );
                }
            }
            // f32 rounding of a different summation order
            assert!(
                worst < 2e-6,
                "keep {keep}, {threads} threads: split vs item ranges rel err {worst}"
            );
            assert_eq!(split_attends(&p), 120, "every decode step split");
        }
    }
}
