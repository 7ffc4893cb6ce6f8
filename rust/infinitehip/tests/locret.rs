//! Locret: retaining-head weights load and validate, the f32 MLP matches its
//! f64 reference, eviction keeps its budget and protections and drops exactly
//! the lowest scores, and the engine frees pages and equals dense attention
//! when the budget covers the context.

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use infinitehip::attention::{reference, rel_error, AttnShape};
use infinitehip::config::{KvConfig, LayerPolicy, LocretConfig, ModelShape};
use infinitehip::engine::Projections;
use infinitehip::kv::{KvLayout, KvPool, SeqView};
use infinitehip::policy::locret::{
    fc1_name, fc2_name, write_random_weights, LocretPolicy, RetainingHead,
};
use infinitehip::policy::{InsertInfo, Phase, Policy};
use infinitehip::rng::Rng;
use infinitehip::{DType, Engine, Error, PolicyConfig};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ihip-locret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn small_shape() -> ModelShape {
    ModelShape {
        n_layers: 2,
        n_q_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
        ..ModelShape::default()
    }
}

/// Write tensors `(name, dtype, shape, f32 values)` with the safetensors crate.
fn write_st(path: &Path, tensors: &[(String, safetensors::Dtype, Vec<usize>, Vec<f32>)]) {
    use safetensors::Dtype;
    let bufs: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, dt, _, x)| match dt {
            Dtype::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F16 => x
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            Dtype::BF16 => x
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
            Dtype::I32 => x.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect(),
            Dtype::F64 => x.iter().flat_map(|&v| (v as f64).to_le_bytes()).collect(),
            other => panic!("test writes no {other:?}"),
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bufs)
        .map(|((n, dt, s, _), b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, &None, path).unwrap();
}

fn weights_err(r: infinitehip::Result<RetainingHead>) -> String {
    match r {
        Err(e @ Error::Weights { .. }) => e.to_string(),
        Err(e) => panic!("expected Error::Weights, got {e}"),
        Ok(_) => panic!("expected an error"),
    }
}

#[test]
fn weight_file_errors_name_the_problem() {
    use safetensors::Dtype;
    let m = small_shape();
    let (hidden, input) = (32usize, (4 + 2 * 2) * 16);
    let fc1 = vec![0.01f32; hidden * input];
    let fc2 = vec![0.02f32; 2 * hidden];

    let missing = tmp("does-not-exist.safetensors");
    let e = weights_err(RetainingHead::load(&missing, &m, hidden, 0));
    assert!(
        e.contains("does-not-exist.safetensors") && e.contains("cannot open"),
        "{e}"
    );

    let p = tmp("no-fc2.safetensors");
    write_st(
        &p,
        &[(fc1_name(0), Dtype::F32, vec![hidden, input], fc1.clone())],
    );
    let e = weights_err(RetainingHead::load(&p, &m, hidden, 0));
    assert!(
        e.contains("no-fc2.safetensors")
            && e.contains("model.layers.0.self_attn.fc2.weight")
            && e.contains("missing")
            && e.contains("[2, 32]"),
        "{e}"
    );
    // Layer 1's tensors are absent too.
    let e = weights_err(RetainingHead::load(&p, &m, hidden, 1));
    assert!(e.contains("model.layers.1.self_attn.fc1.weight"), "{e}");

    let p = tmp("bad-shape.safetensors");
    write_st(
        &p,
        &[
            (
                fc1_name(0),
                Dtype::F32,
                vec![hidden, 100],
                vec![0.0; hidden * 100],
            ),
            (fc2_name(0), Dtype::F32, vec![2, hidden], fc2.clone()),
        ],
    );
    let e = weights_err(RetainingHead::load(&p, &m, hidden, 0));
    assert!(
        e.contains("bad-shape.safetensors")
            && e.contains("fc1.weight")
            && e.contains("[32, 100]")
            && e.contains("expected [32, 128]"),
        "{e}"
    );
    // A hidden width the file does not have.
    let p = tmp("good.safetensors");
    write_st(
        &p,
        &[
            (fc1_name(0), Dtype::BF16, vec![hidden, input], fc1.clone()),
            (fc2_name(0), Dtype::F16, vec![2, hidden], fc2.clone()),
        ],
    );
    RetainingHead::load(&p, &m, hidden, 0).unwrap();
    let e = weights_err(RetainingHead::load(&p, &m, 64, 0));
    assert!(
        e.contains("[32, 128]") && e.contains("expected [64, 128]"),
        "{e}"
    );
    assert!(e.contains("set locret.hidden to 32"), "{e}");
    // A model shape the file does not match (fc2 rows = n_kv_heads).
    let m4 = ModelShape { n_kv_heads: 4, ..m };
    let e = weights_err(RetainingHead::load(&p, &m4, hidden, 0));
    assert!(
        e.contains("fc1.weight") && e.contains("expected [32, 192]"),
        "{e}"
    );

    // A head tensor the model cannot use: a bias, or a layer it lacks.
    for (extra, shp, want) in [
        (
            "model.layers.0.self_attn.fc1.bias".to_string(),
            vec![hidden],
            vec!["fc1.bias", "without bias"],
        ),
        (
            fc2_name(2),
            vec![2, hidden],
            vec!["model.layers.2.self_attn.fc2.weight", "layer 2", "2 layers"],
        ),
    ] {
        let p = tmp("extra.safetensors");
        let n = shp.iter().product();
        write_st(
            &p,
            &[
                (fc1_name(0), Dtype::F32, vec![hidden, input], fc1.clone()),
                (fc2_name(0), Dtype::F32, vec![2, hidden], fc2.clone()),
                (extra, Dtype::F32, shp, vec![0.5; n]),
            ],
        );
        let e = weights_err(RetainingHead::load(&p, &m, hidden, 0));
        assert!(want.iter().all(|w| e.contains(w)), "{e}");
    }
    // Tensors that are not head tensors (a whole upstream checkpoint) are ignored.
    let p = tmp("with-model.safetensors");
    write_st(
        &p,
        &[
            (fc1_name(0), Dtype::F32, vec![hidden, input], fc1.clone()),
            (fc2_name(0), Dtype::F32, vec![2, hidden], fc2.clone()),
            (
                "model.layers.7.self_attn.q_proj.weight".into(),
                Dtype::F32,
                vec![2, 2],
                vec![1.0; 4],
            ),
            ("lm_head.weight".into(), Dtype::F32, vec![2], vec![1.0; 2]),
        ],
    );
    RetainingHead::load(&p, &m, hidden, 0).unwrap();

    for (dt, name) in [(Dtype::I32, "I32"), (Dtype::F64, "F64")] {
        let p = tmp(&format!("dtype-{name}.safetensors"));
        write_st(
            &p,
            &[
                (fc1_name(0), dt, vec![hidden, input], fc1.clone()),
                (fc2_name(0), Dtype::F32, vec![2, hidden], fc2.clone()),
            ],
        );
        let e = weights_err(RetainingHead::load(&p, &m, hidden, 0));
        assert!(
            e.contains(&format!("dtype-{name}.safetensors"))
                && e.contains("fc1.weight")
                && e.contains(&format!("dtype {name}"))
                && e.contains("F32, F16 or BF16"),
            "{e}"
        );
    }

    let p = tmp("nan.safetensors");
    let mut bad = fc2.clone();
    bad[5] = f32::NAN;
    write_st(
        &p,
        &[
            (fc1_name(0), Dtype::F32, vec![hidden, input], fc1.clone()),
            (fc2_name(0), Dtype::F32, vec![2, hidden], bad),
        ],
    );
    let e = weights_err(RetainingHead::load(&p, &m, hidden, 0));
    assert!(e.contains("fc2.weight") && e.contains("non-finite"), "{e}");

    let p = tmp("garbage.safetensors");
    std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header").unwrap();
    let e = weights_err(RetainingHead::load(&p, &m, hidden, 0));
    assert!(
        e.contains("garbage.safetensors") && e.contains("header"),
        "{e}"
    );

    // Through the engine: the config names the file; errors pass through.
    let json = format!(
        r#"{{"model": {{"n_layers": 2, "n_q_heads": 4, "n_kv_heads": 2, "head_dim": 16}},
            "dense_layers": 1,
            "default": {{"method": "locret", "budget": 64, "stabilizer": 16, "keep_last": 4,
                         "hidden": 32, "weights": "{}"}}}}"#,
        tmp("no-fc2.safetensors").display()
    );
    let e = Engine::new(PolicyConfig::from_json(&json).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("no-fc2.safetensors") && e.contains("model.layers.1.self_attn.fc1.weight"),
        "{e}"
    );
    for (field, json) in [
        (
            "default.renumber_positions",
            r#"{"default": {"method": "locret", "weights": "w", "renumber_positions": true}}"#,
        ),
        (
            "default.keep_last",
            r#"{"default": {"method": "locret", "weights": "w", "stabilizer": 10, "keep_last": 20}}"#,
        ),
        (
            "default.stabilizer",
            r#"{"default": {"method": "locret", "weights": "w", "budget": 100, "stabilizer": 100}}"#,
        ),
    ] {
        let e = PolicyConfig::from_json(json).unwrap_err().to_string();
        assert!(e.contains(field), "{json}: {e}");
    }
}

/// The trained heads committed for SmolLM2-135M-Instruct
/// (`python -m infinitehip.locret_train`, README) load for that model's
/// shape, every layer, and score real-valued, varying outputs.
#[test]
fn committed_smollm2_heads_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python-shim/infinitehip/heads");
    let st = dir.join("smollm2-135m-instruct.h64.safetensors");
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("smollm2-135m-instruct.h64.json")).unwrap())
            .unwrap();
    let m = ModelShape {
        n_layers: 30,
        n_q_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        ..ModelShape::default()
    };
    let mc = &info["model_config"];
    assert_eq!(
        [
            &mc["n_layers"],
            &mc["n_q_heads"],
            &mc["n_kv_heads"],
            &mc["head_dim"]
        ]
        .map(|v| v.as_u64()),
        [30, 9, 3, 64].map(Some)
    );
    assert_eq!(info["hidden"].as_u64(), Some(64));
    let mut rng = Rng::new(3);
    let n = 16;
    let q = rng.normal_vec(n * 9 * 64, 1.0);
    let k = rng.normal_vec(n * 3 * 64, 1.0);
    let v = rng.normal_vec(n * 3 * 64, 1.0);
    for layer in 0..30 {
        let head = RetainingHead::load(&st, &m, 64, layer).unwrap();
        let s = head.scores(&q, &k, &v).unwrap();
        assert!(s.iter().all(|x| x.is_finite()), "layer {layer}");
        let (lo, hi) = s
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        assert!(hi - lo > 1e-3, "layer {layer}: constant scores {lo}");
    }
    let e = weights_err(RetainingHead::load(&st, &m, 1024, 0));
    assert!(e.contains("set locret.hidden to 64"), "{e}");
    let e = weights_err(RetainingHead::load(
        &st,
        &ModelShape { n_layers: 24, ..m },
        64,
        0,
    ));
    assert!(e.contains("layer 24") && e.contains("24 layers"), "{e}");
}

#[test]
fn mlp_fast_path_matches_f64_reference() {
    let mut rng = Rng::new(11);
    // (n_q, n_kv, head_dim, hidden): GQA, MHA, Llama-3.1-8B's real head.
    for (nq, nkv, d, hidden, tokens) in [
        (4usize, 2usize, 16usize, 32usize, &[1usize, 3, 4, 9][..]),
        (6, 6, 8, 24, &[5][..]),
        // Several token blocks with a partial last one; hidden rows split
        // unevenly across work items.
        (4, 2, 16, 200, &[3, 130][..]),
        // Widths that are not multiples of 8 (remainder paths).
        (1, 1, 6, 10, &[2, 7][..]),
        (32, 8, 128, 1024, &[6][..]),
    ] {
        let m = ModelShape {
            n_q_heads: nq,
            n_kv_heads: nkv,
            head_dim: d,
            ..ModelShape::default()
        };
        let head = RetainingHead::random(&m, hidden, rng.next_u64()).unwrap();
        assert_eq!(head.input_dim(), (nq + 2 * nkv) * d);
        for &n in tokens {
            let q = rng.normal_vec(n * nq * d, 1.0);
            let k = rng.normal_vec(n * nkv * d, 1.0);
            let v = rng.normal_vec(n * nkv * d, 1.0);
            let fast = head.scores(&q, &k, &v).unwrap();
            let want = head.scores_f64_reference(&q, &k, &v).unwrap();
            assert_eq!(fast.len(), n * nkv);
            let err = rel_error(&fast, &want);
            assert!(
                err <= 1e-5,
                "shape {nq}/{nkv}/{d} hidden {hidden} n {n}: rel err {err}"
            );
            // Token t's scores depend on token t only (no mixing across the block).
            let one = head
                .scores(
                    &q[(n - 1) * nq * d..],
                    &k[(n - 1) * nkv * d..],
                    &v[(n - 1) * nkv * d..],
                )
                .unwrap();
            assert_eq!(&fast[(n - 1) * nkv..], &one[..]);
        }
    }
    // The input order is [q | k | v]: permuting k and v changes the scores.
    let m = small_shape();
    let head = RetainingHead::random(&m, 32, 5).unwrap();
    let (q, k, v) = (
        rng.normal_vec(64, 1.0),
        rng.normal_vec(32, 1.0),
        rng.normal_vec(32, 1.0),
    );
    let a = head.scores_f64_reference(&q, &k, &v).unwrap();
    let b = head.scores_f64_reference(&q, &v, &k).unwrap();
    assert!((a[0] - b[0]).abs() > 1e-6);
    // Manual check of one score: fc2 . silu(fc1 . [q|k|v]).
    let x: Vec<f32> = q.iter().chain(&k).chain(&v).copied().collect();
    let h: Vec<f64> = head
        .fc1()
        .chunks(128)
        .map(|r| {
            let s: f64 = r.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
            s / (1.0 + (-s).exp())
        })
        .collect();
    let s1: f64 = head.fc2()[32..]
        .iter()
        .zip(&h)
        .map(|(&a, &b)| a as f64 * b)
        .sum();
    assert!((s1 - a[1]).abs() < 1e-9 * s1.abs().max(1.0));
    assert!(head.scores(&q[..60], &k, &v).is_err());

    // Files in every accepted dtype load the weights write_random_weights drew.
    for dt in [DType::F32, DType::F16, DType::Bf16] {
        let p = tmp(&format!("random-{dt}.safetensors"));
        write_random_weights(&p, &m, 32, dt, 42).unwrap();
        for layer in 0..2 {
            let loaded = RetainingHead::load(&p, &m, 32, layer).unwrap();
            let drawn = RetainingHead::random(&m, 32, 42 + layer as u64 * 7919).unwrap();
            let round = |x: f32| match dt {
                DType::F32 => x,
                DType::F16 => f16::from_f32(x).to_f32(),
                DType::Bf16 => bf16::from_f32(x).to_f32(),
            };
            assert!(loaded
                .fc1()
                .iter()
                .zip(drawn.fc1())
                .all(|(&a, &b)| a == round(b)));
            assert!(loaded
                .fc2()
                .iter()
                .zip(drawn.fc2())
                .all(|(&a, &b)| a == round(b)));
        }
    }
}

fn locret_cfg(
    budget: usize,
    chunk: usize,
    stabilizer: usize,
    sink: usize,
    keep_last: usize,
) -> LocretConfig {
    LocretConfig {
        budget,
        chunk,
        stabilizer,
        sink,
        keep_last,
        hidden: 32,
        ..LocretConfig::default()
    }
}

/// Drives a `LocretPolicy` over a real pool (f32, page 8) and checks the
/// pool's compacted keys against the policy's bookkeeping after every step.
/// Each key's first element is its original position.
struct Driver {
    pol: LocretPolicy,
    pool: KvPool<f32>,
    shape: AttnShape,
    seen: usize,
    /// Positions of decoded tokens and of pinned prompt tails.
    pinned: Vec<usize>,
    /// Units appended by the last append.
    last_n: usize,
}

impl Driver {
    fn new(cfg: LocretConfig, seed: u64) -> Self {
        let m = small_shape();
        let head = RetainingHead::random(&m, cfg.hidden, seed).unwrap();
        let mut pool = KvPool::new(
            KvLayout {
                n_kv_heads: 2,
                head_dim: 16,
                page_size: 8,
            },
            None,
        )
        .unwrap();
        pool.add_sequence(1).unwrap();
        Driver {
            pol: LocretPolicy::with_head(cfg, head, 0).unwrap(),
            pool,
            shape: AttnShape::new(4, 2, 16).unwrap(),
            seen: 0,
            pinned: Vec::new(),
            last_n: 0,
        }
    }

    /// Returns the scores `[n][n_kv]` of the new tokens (fast path).
    fn append(&mut self, rng: &mut Rng, n: usize, phase: Phase, prompt_done: bool) -> Vec<f32> {
        let q = rng.normal_vec(n * 64, 1.0);
        let mut k = rng.normal_vec(n * 32, 1.0);
        for t in 0..n {
            for h in 0..2 {
                k[(t * 2 + h) * 16] = (self.seen + t) as f32;
            }
        }
        let v = rng.normal_vec(n * 32, 1.0);
        let start = self.pool.seq_len(1).unwrap();
        self.pool.append(1, &k, &v).unwrap();
        let keep = {
            let view = self.pool.view(1).unwrap();
            let info = InsertInfo {
                seq: 1,
                shape: self.shape,
                phase,
                start,
                q: &q,
                k: &k,
                v: &v,
                kv: &view,
                prompt_done,
            };
            self.pol.after_append(&info).unwrap()
        };
        if let Some(keep) = keep {
            self.pool.retain_per_head(1, &keep).unwrap();
        }
        let kl = self.pol.config().keep_last;
        if phase == Phase::Decode {
            self.pinned.extend(self.seen..self.seen + n);
        } else if prompt_done {
            self.pinned
                .extend((self.seen + n).saturating_sub(kl)..self.seen + n);
        }
        self.seen += n;
        self.last_n = n;
        let head = self.pol.head().clone();
        head.scores(&q, &k, &v).unwrap()
    }

    fn evict(&mut self) {
        if let Some(keep) = self.pol.evict(1).unwrap() {
            self.pool.retain_per_head(1, &keep).unwrap();
        }
        self.last_n = 0;
    }

    /// Invariants that hold after every step.
    fn check(&self, what: &str) {
        let cfg = self.pol.config().clone();
        let held = self.pol.held_positions(1).unwrap();
        let pinned = self.pol.held_pinned(1).unwrap();
        let len = self.pool.seq_len(1).unwrap();
        let view = self.pool.view(1).unwrap();
        for (h, pos) in held.iter().enumerate() {
            assert_eq!(pos.len(), len, "{what}: head {h} count vs pool");
            assert!(pos.windows(2).all(|w| w[0] < w[1]), "{what}: order");
            for (i, &p) in pos.iter().enumerate() {
                assert_eq!(
                    view.key_row(h, i)[0],
                    p as f32,
                    "{what}: pool row {i} head {h}"
                );
            }
            for p in (0..cfg.sink.min(self.seen)).chain(self.pinned.iter().copied()) {
                assert!(
                    pos.binary_search(&(p as u32)).is_ok(),
                    "{what}: head {h} lost protected {p}"
                );
            }
            // The newest `stabilizer` tokens before the last append, and the
            // last append itself, are all held.
            let from = self.seen.saturating_sub(self.last_n + cfg.stabilizer);
            if cfg.stabilize_final_chunk {
                for p in from..self.seen {
                    assert!(
                        pos.binary_search(&(p as u32)).is_ok(),
                        "{what}: head {h} lost recent {p}"
                    );
                }
            }
            let free = pinned[h].iter().filter(|&&x| !x).count();
            // Protected units beyond the budget stay (with a warning).
            let allowed = cfg.budget.max(cfg.sink.min(self.seen) + cfg.stabilizer);
            assert!(
                free <= allowed + self.last_n,
                "{what}: head {h} holds {free} unpinned > budget {} + last append {}",
                cfg.budget,
                self.last_n
            );
        }
    }
}

#[test]
fn eviction_respects_budget_and_protection() {
    let mut rng = Rng::new(7);
    for trial in 0..24 {
        let stabilize_final_chunk = trial % 3 != 2;
        let cfg = LocretConfig {
            stabilize_final_chunk,
            ..locret_cfg(40, 16, 20, if trial % 2 == 0 { 4 } else { 0 }, 6)
        };
        let mut d = Driver::new(cfg, trial);
        for turn in 0..2 {
            let chunks = 2 + rng.below(8);
            for c in 0..chunks {
                let n = 1 + rng.below(40);
                d.append(&mut rng, n, Phase::Prefill, false);
                d.check(&format!("trial {trial} turn {turn} chunk {c}"));
                if rng.below(3) == 0 {
                    d.evict();
                    d.check(&format!("trial {trial} turn {turn} evict after chunk {c}"));
                    let free = d.pol.held_pinned(1).unwrap()[0]
                        .iter()
                        .filter(|&&x| !x)
                        .count();
                    assert!(free <= 40, "evict leaves {free} unpinned");
                }
            }
            // The tail: separate (upstream) or merged with the last chunk.
            let n = if rng.below(2) == 0 {
                1 + rng.below(6)
            } else {
                7 + rng.below(30)
            };
            d.append(&mut rng, n, Phase::Prefill, true);
            d.check(&format!("trial {trial} turn {turn} tail {n}"));
            for s in 0..1 + rng.below(5) {
                d.append(&mut rng, 1, Phase::Decode, false);
                d.check(&format!("trial {trial} turn {turn} decode {s}"));
                d.last_n = 0;
                let free = d.pol.held_pinned(1).unwrap()[0]
                    .iter()
                    .filter(|&&x| !x)
                    .count();
                assert!(
                    free <= 40,
                    "trial {trial} decode {s}: {free} unpinned units"
                );
            }
        }
    }
    // Protected units beyond the budget: kept (with a warning), never evicted.
    let cfg = locret_cfg(10, 8, 4, 30, 2);
    let mut d = Driver::new(cfg, 99);
    for _ in 0..6 {
        d.append(&mut rng, 8, Phase::Prefill, false);
        d.check("sink beyond budget");
    }
    assert!(d.pool.seq_len(1).unwrap() >= 30);
}

/// Brute-force model of the documented semantics: per head, sort every
/// evictable unit by (score, index) and drop the first `need`.
#[derive(Clone)]
struct RefUnit {
    pos: usize,
    score: f32,
    pinned: bool,
}

fn ref_evict(heads: &mut [Vec<RefUnit>], cfg: &LocretConfig, final_chunk: bool) {
    let stab = if final_chunk && !cfg.stabilize_final_chunk {
        0
    } else {
        cfg.stabilizer
    };
    let len = heads[0].len();
    let need = heads
        .iter()
        .map(|h| {
            h.iter()
                .filter(|u| !u.pinned)
                .count()
                .saturating_sub(cfg.budget)
        })
        .max()
        .unwrap();
    for h in heads.iter_mut() {
        let mut c: Vec<usize> = (0..len.saturating_sub(stab))
            .filter(|&i| !h[i].pinned && h[i].pos >= cfg.sink)
            .collect();
        c.sort_by(|&a, &b| h[a].score.partial_cmp(&h[b].score).unwrap().then(a.cmp(&b)));
        let gone: Vec<usize> = c.into_iter().take(need).collect();
        let mut i = 0;
        h.retain(|_| {
            i += 1;
            !gone.contains(&(i - 1))
        });
    }
}

#[test]
fn eviction_drops_exactly_the_lowest_scores() {
    let mut rng = Rng::new(21);
    for trial in 0..16 {
        let cfg = LocretConfig {
            stabilize_final_chunk: trial % 2 == 0,
            ..locret_cfg(30, 12, 10, (trial % 3) as usize, 5)
        };
        let mut d = Driver::new(cfg.clone(), 1000 + trial);
        let mut heads: Vec<Vec<RefUnit>> = vec![Vec::new(); 2];
        let (mut pending, mut seen) = (false, 0usize);
        let mut step = |d: &mut Driver, rng: &mut Rng, n: usize, phase: Phase, done: bool| {
            let scores = d.append(rng, n, phase, done);
            let prefill = phase == Phase::Prefill;
            let tail_only = prefill && done && n <= cfg.keep_last;
            if prefill && done {
                for h in heads.iter_mut() {
                    for u in h.iter_mut() {
                        if u.pos + cfg.keep_last >= seen + n {
                            u.pinned = true;
                        }
                    }
                }
            }
            if pending {
                ref_evict(&mut heads, &cfg, !prefill || tail_only);
                pending = false;
            }
            for (h, units) in heads.iter_mut().enumerate() {
                for t in 0..n {
                    units.push(RefUnit {
                        pos: seen + t,
                        score: scores[t * 2 + h],
                        pinned: !prefill || (done && t + cfg.keep_last >= n),
                    });
                }
            }
            seen += n;
            if prefill {
                pending = !tail_only;
            }
            let want: Vec<Vec<u32>> = heads
                .iter()
                .map(|h| h.iter().map(|u| u.pos as u32).collect())
                .collect();
            assert_eq!(
                d.pol.held_positions(1).unwrap(),
                want,
                "trial {trial} at {seen}"
            );
            d.check(&format!("trial {trial} at {seen}"));
        };
        for _ in 0..3 + rng.below(8) {
            let n = 1 + rng.below(30);
            step(&mut d, &mut rng, n, Phase::Prefill, false);
        }
        let n = 1 + rng.below(12);
        step(&mut d, &mut rng, n, Phase::Prefill, true);
        for _ in 0..3 {
            step(&mut d, &mut rng, 1, Phase::Decode, false);
        }
        // Scores are the fast path's, fixed at insertion.
        let sc = d.pol.held_scores(1).unwrap();
        for (h, units) in heads.iter().enumerate() {
            for (u, &s) in units.iter().zip(&sc[h]) {
                assert!(u.score == s || (u.score.is_infinite() && s.is_infinite()) || u.pinned);
            }
        }
    }
}

/// A config with `n_layers` layers, layer 0 dense, the rest locret.
fn engine_cfg(weights: &Path, dtype: DType, loc: LocretConfig) -> PolicyConfig {
    PolicyConfig {
        model: small_shape(),
        kv: KvConfig {
            page_size: 8,
            dtype,
            device_cache_pages: None,
            estimation_cache_rows: None,
        },
        dense_layers: 1,
        default: LayerPolicy::Locret(LocretConfig {
            weights: Some(weights.display().to_string()),
            ..loc
        }),
        overrides: vec![],
        ..PolicyConfig::default()
    }
}

/// Round to the storage type, as the pool does.
fn stored(x: &[f32], dtype: DType) -> Vec<f32> {
    x.iter()
        .map(|&v| match dtype {
            DType::Bf16 => bf16::from_f32(v).to_f32(),
            DType::F16 => f16::from_f32(v).to_f32(),
            DType::F32 => v,
        })
        .collect()
}

#[test]
fn full_budget_engine_equals_dense() {
    let w = tmp("full-budget.safetensors");
    write_random_weights(&w, &small_shape(), 32, DType::Bf16, 3).unwrap();
    for dtype in [DType::F32, DType::Bf16] {
        let mut eng =
            Engine::new(engine_cfg(&w, dtype, locret_cfg(100_000, 32, 40, 0, 8))).unwrap();
        let shape = eng.shape();
        let mut refpool = KvPool::<f32>::new(
            KvLayout {
                n_kv_heads: 2,
                head_dim: 16,
                page_size: 8,
            },
            None,
        )
        .unwrap();
        refpool.add_sequence(3).unwrap();
        eng.add_sequence(3).unwrap();
        let mut rng = Rng::new(5);
        // The reference reads the same stored (dtype-rounded) K/V: only f32
        // accumulation differs (~1e-6), in every dtype.
        let bound = 1e-5;
        let steps: Vec<(usize, Phase, bool)> = [37usize, 32, 32, 50, 8]
            .iter()
            .enumerate()
            .map(|(i, &n)| (n, Phase::Prefill, i == 4))
            .chain((0..6).map(|_| (1, Phase::Decode, false)))
            .collect();
        for (n, phase, done) in steps {
            let k = rng.normal_vec(n * 32, 1.0);
            let v = rng.normal_vec(n * 32, 1.0);
            let pq = rng.normal_vec(n * 64, 1.0);
            refpool
                .append(3, &stored(&k, dtype), &stored(&v, dtype))
                .unwrap();
            for layer in 0..2 {
                let proj = Projections {
                    q: &pq,
                    k: &k,
                    v: &v,
                };
                eng.append(layer, 3, &k, &v, phase, done, Some(proj))
                    .unwrap();
            }
            let q = rng.normal_vec(n * 64, 1.0);
            let len = refpool.seq_len(3).unwrap();
            let want = reference::prefill_f64(&shape, &q, len - n, &refpool.view(3).unwrap(), None);
            for layer in 0..2 {
                let mut out = vec![f32::NAN; q.len()];
                if phase == Phase::Prefill {
                    eng.attend_prefill(layer, 3, &q, &mut out).unwrap();
                } else {
                    eng.attend_decode(layer, &[3], &q, &mut out).unwrap();
                }
                let err = rel_error(&out, &want);
                assert!(
                    err <= bound,
                    "{dtype} layer {layer} {phase:?} len {len}: {err}"
                );
            }
            assert_eq!(eng.seq_len(1, 3).unwrap(), len);
        }
        // Without projections a locret layer refuses the append.
        let e = eng
            .append(1, 3, &[0f32; 32], &[0f32; 32], Phase::Decode, false, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("pre-RoPE projections"), "{e}");
    }
}

#[test]
fn evicted_units_free_their_pages() {
    let w = tmp("pages.safetensors");
    write_random_weights(&w, &small_shape(), 32, DType::F32, 8).unwrap();
    let (budget, chunk, keep_last) = (48, 16, 8);
    let mut eng = Engine::new(engine_cfg(
        &w,
        DType::Bf16,
        locret_cfg(budget, chunk, 20, 4, keep_last),
    ))
    .unwrap();
    eng.add_sequence(1).unwrap();
    let mut rng = Rng::new(2);
    let push = |eng: &mut Engine, rng: &mut Rng, n: usize, phase: Phase, done: bool| {
        let k = rng.normal_vec(n * 32, 1.0);
        let v = rng.normal_vec(n * 32, 1.0);
        let q = rng.normal_vec(n * 64, 1.0);
        for layer in 0..2 {
            let proj = Projections {
                q: &q,
                k: &k,
                v: &v,
            };
            eng.append(layer, 1, &k, &v, phase, done, Some(proj))
                .unwrap();
        }
    };
    let pages = |eng: &Engine, layer: usize| eng.stats()[layer].pool.pages_in_use;
    for c in 0..20 {
        push(&mut eng, &mut rng, chunk, Phase::Prefill, false);
        let len = eng.seq_len(1, 1).unwrap();
        assert_eq!(
            eng.seq_len(0, 1).unwrap(),
            (c + 1) * chunk,
            "dense layer keeps all"
        );
        assert_eq!(len, ((c + 1) * chunk).min(budget + chunk), "chunk {c}");
        assert_eq!(
            pages(&eng, 1),
            len.div_ceil(8),
            "chunk {c}: pages follow the held count"
        );
    }
    assert_eq!(pages(&eng, 0), 20 * chunk / 8);
    // Explicit eviction after the chunk's attention: down to the budget now.
    eng.evict(1, 1).unwrap();
    assert_eq!(eng.seq_len(1, 1).unwrap(), budget);
    assert_eq!(pages(&eng, 1), budget / 8);
    eng.evict(0, 1).unwrap();
    assert_eq!(eng.seq_len(0, 1).unwrap(), 20 * chunk);
    // Tail appended on its own (as upstream), then decode: nothing evicted.
    push(&mut eng, &mut rng, keep_last, Phase::Prefill, true);
    for _ in 0..5 {
        push(&mut eng, &mut rng, 1, Phase::Decode, false);
    }
    assert_eq!(eng.seq_len(1, 1).unwrap(), budget + keep_last + 5);
    assert_eq!(pages(&eng, 1), (budget + keep_last + 5).div_ceil(8));
    eng.free_sequence(1).unwrap();
    assert_eq!(pages(&eng, 1), 0);
    assert!(eng.evict(1, 1).is_err());
}

/// Contiguous `[head][unit][dim]` K/V of the units a policy holds, taken
/// from the original (storage-rounded) K/V of every token.
fn gather_held(held: &[Vec<u32>], all: &[f32]) -> Vec<f32> {
    let mut out = Vec::new();
    for (h, pos) in held.iter().enumerate() {
        for &p in pos {
            let o = (p as usize * 2 + h) * 16;
            out.extend_from_slice(&all[o..o + 16]);
        }
    }
    out
}

/// End to end from a JSON config naming a random-weight safetensors file:
/// the engine's outputs equal f64 attention over exactly the units a
/// separately driven policy (same weights) holds, at every prefill chunk
/// (queries see the previous survivors plus their chunk) and decode step.
#[test]
fn engine_end_to_end_from_json_config() {
    let w = tmp("e2e.safetensors");
    write_random_weights(&w, &small_shape(), 32, DType::Bf16, 77).unwrap();
    let json = format!(
        r#"{{"model": {{"n_layers": 2, "n_q_heads": 4, "n_kv_heads": 2, "head_dim": 16}},
            "kv": {{"page_size": 8, "dtype": "f32"}},
            "dense_layers": 1,
            "default": {{"method": "locret", "budget": 64, "chunk": 24, "stabilizer": 30,
                         "sink": 2, "keep_last": 10, "hidden": 32, "weights": "{}"}}}}"#,
        w.display()
    );
    let cfg = PolicyConfig::from_json(&json).unwrap();
    let LayerPolicy::Locret(lc) = cfg.layer_policy(1).clone() else {
        panic!("layer 1 is locret")
    };
    let mut eng = Engine::new(cfg.clone()).unwrap();
    assert_eq!(eng.stats()[1].method, "locret");
    let mut shadow = LocretPolicy::new(lc, &cfg.model, 1).unwrap();
    let shape = eng.shape();
    let mut shadow_pool = KvPool::<f32>::new(
        KvLayout {
            n_kv_heads: 2,
            head_dim: 16,
            page_size: 8,
        },
        None,
    )
    .unwrap();
    shadow_pool.add_sequence(9).unwrap();
    eng.add_sequence(9).unwrap();
    let mut rng = Rng::new(31);
    let (mut all_k, mut all_v) = (Vec::new(), Vec::new());
    let mut steps: Vec<(usize, Phase, bool)> =
        (0..12).map(|_| (24, Phase::Prefill, false)).collect();
    steps.push((10, Phase::Prefill, true));
    steps.extend((0..8).map(|_| (1, Phase::Decode, false)));
    let mut evicted_any = false;
    for (si, (n, phase, done)) in steps.into_iter().enumerate() {
        let k = rng.normal_vec(n * 32, 1.0);
        let v = rng.normal_vec(n * 32, 1.0);
        let pq = rng.normal_vec(n * 64, 1.0);
        all_k.extend_from_slice(&k);
        all_v.extend_from_slice(&v);
        for layer in 0..2 {
            let proj = Projections {
                q: &pq,
                k: &k,
                v: &v,
            };
            eng.append(layer, 9, &k, &v, phase, done, Some(proj))
                .unwrap();
        }
        let start = shadow_pool.seq_len(9).unwrap();
        shadow_pool.append(9, &k, &v).unwrap();
        let keep = {
            let view = shadow_pool.view(9).unwrap();
            shadow
                .after_append(&InsertInfo {
                    seq: 9,
                    shape,
                    phase,
                    start,
                    q: &pq,
                    k: &k,
                    v: &v,
                    kv: &view,
                    prompt_done: done,
                })
                .unwrap()
        };
        if let Some(keep) = keep {
            evicted_any = true;
            shadow_pool.retain_per_head(9, &keep).unwrap();
        }
        let held = shadow.held_positions(9).unwrap();
        let len = held[0].len();
        assert_eq!(eng.seq_len(1, 9).unwrap(), len, "step {si}");
        let (kh, vh) = (gather_held(&held, &all_k), gather_held(&held, &all_v));
        let view = SeqView::from_contiguous(2, 16, len, &kh, &vh);
        assert_eq!(view.len(), len);
        let q = rng.normal_vec(n * 64, 1.0);
        let want = reference::prefill_f64(&shape, &q, len - n, &view, None);
        let mut out = vec![f32::NAN; q.len()];
        if phase == Phase::Prefill {
            eng.attend_prefill(1, 9, &q, &mut out).unwrap();
        } else {
            eng.attend_decode(1, &[9], &q, &mut out).unwrap();
        }
        let err = rel_error(&out, &want);
        assert!(err <= 1e-5, "step {si} {phase:?}: rel err {err}");
    }
    assert!(evicted_any);
    // NaN projections: an error naming the problem, and the sequence is
    // left as it was (the next good append works).
    let before = eng.seq_len(1, 9).unwrap();
    let (k, mut pq) = (rng.normal_vec(32, 1.0), rng.normal_vec(64, 1.0));
    pq[3] = f32::NAN;
    for (phase, done) in [(Phase::Prefill, false), (Phase::Prefill, true)] {
        let e = eng
            .append(
                1,
                9,
                &k,
                &k,
                phase,
                done,
                Some(Projections {
                    q: &pq,
                    k: &k,
                    v: &k,
                }),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("NaN"), "{e}");
        assert_eq!(eng.seq_len(1, 9).unwrap(), before);
    }
    pq[3] = 0.5;
    // (Layer 1 only: layer 0 did not see the failed appends either.)
    eng.append(
        1,
        9,
        &k,
        &k,
        Phase::Decode,
        false,
        Some(Projections {
            q: &pq,
            k: &k,
            v: &k,
        }),
    )
    .unwrap();
    assert_eq!(eng.seq_len(1, 9).unwrap(), before + 1);
    eng.append(0, 9, &k, &k, Phase::Decode, false, None)
        .unwrap();
    // 64 budget + 10 pinned tail + 8 decoded (+1 after the NaN check).
    assert_eq!(eng.seq_len(1, 9).unwrap(), 64 + 10 + 8 + 1);
    assert_eq!(eng.seq_len(0, 9).unwrap(), 12 * 24 + 10 + 8 + 1);
    // The heads keep different token sets.
    let held = shadow.held_positions(9).unwrap();
    assert_ne!(held[0], held[1]);
    // A forked sequence has no policy state: its next append says so.
    eng.fork_sequence(9, 10).unwrap();
    let (k, pq) = (rng.normal_vec(32, 1.0), rng.normal_vec(64, 1.0));
    let e = eng
        .append(
            1,
            10,
            &k,
            &k,
            Phase::Decode,
            false,
            Some(Projections {
                q: &pq,
                k: &k,
                v: &k,
            }),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("forked"), "{e}");
}

/// Throughput of the f32 retaining head at Llama-3.1-8B's shape
/// (6144 -> 1024 -> 8). Run with `--ignored --nocapture`.
#[test]
#[ignore]
fn mlp_throughput_llama_shape() {
    let m = ModelShape::default();
    let head = RetainingHead::random(&m, 1024, 1).unwrap();
    let mut rng = Rng::new(2);
    let n = 256;
    let q = rng.normal_vec(n * 32 * 128, 1.0);
    let k = rng.normal_vec(n * 8 * 128, 1.0);
    let v = rng.normal_vec(n * 8 * 128, 1.0);
    head.scores(&q[..4 * 4096], &k[..4 * 1024], &v[..4 * 1024])
        .unwrap();
    let t = std::time::Instant::now();
    let s = head.scores(&q, &k, &v).unwrap();
    let dt = t.elapsed().as_secs_f64();
    let gflop = 2.0 * n as f64 * (6144.0 * 1024.0 + 1024.0 * 8.0) / 1e9;
    println!(
        "retaining head, {n} tokens: {:.1} ms, {:.0} tokens/s, {:.1} GFLOP/s ({} threads)",
        dt * 1e3,
        n as f64 / dt,
        gflop / dt,
        infinitehip::parallel::num_threads()
    );
    assert!(s.iter().all(|x| x.is_finite()));
}

/// Host offload with eviction: decode through a small device page cache
/// equals decode on resident KV bit for bit while evictions compact the
/// pool between decode steps (a second sequence keeps prefilling).
#[test]
fn device_page_cache_follows_compaction() {
    let w = tmp("offload.safetensors");
    write_random_weights(&w, &small_shape(), 32, DType::Bf16, 12).unwrap();
    let loc = locret_cfg(40, 16, 20, 2, 6);
    let plain_cfg = engine_cfg(&w, DType::Bf16, loc.clone());
    let mut cached_cfg = plain_cfg.clone();
    // Room for one decode step of both sequences (7 + 7 pages).
    cached_cfg.kv.device_cache_pages = Some(16);
    let mut engines = [
        Engine::new(plain_cfg).unwrap(),
        Engine::new(cached_cfg).unwrap(),
    ];
    let mut rng = Rng::new(4);
    for e in &mut engines {
        e.add_sequence(1).unwrap();
        e.add_sequence(2).unwrap();
    }
    let push =
        |engines: &mut [Engine; 2], rng: &mut Rng, seq: u64, n: usize, phase: Phase, done: bool| {
            let k = rng.normal_vec(n * 32, 1.0);
            let v = rng.normal_vec(n * 32, 1.0);
            let q = rng.normal_vec(n * 64, 1.0);
            for e in engines.iter_mut() {
                for layer in 0..2 {
                    let proj = Projections {
                        q: &q,
                        k: &k,
                        v: &v,
                    };
                    e.append(layer, seq, &k, &v, phase, done, Some(proj))
                        .unwrap();
                }
            }
        };
    for _ in 0..5 {
        push(&mut engines, &mut rng, 1, 16, Phase::Prefill, false);
    }
    push(&mut engines, &mut rng, 1, 6, Phase::Prefill, true);
    for step in 0..12 {
        // Sequence 2 prefills (and evicts) between sequence 1's decode steps.
        push(&mut engines, &mut rng, 2, 16, Phase::Prefill, false);
        push(&mut engines, &mut rng, 1, 1, Phase::Decode, false);
        let q = rng.normal_vec(2 * 64, 1.0);
        let mut outs = Vec::new();
        for e in engines.iter_mut() {
            let mut o = vec![f32::NAN; q.len()];
            e.attend_decode(1, &[1, 2], &q, &mut o).unwrap();
            outs.push(o.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        }
        assert_eq!(outs[0], outs[1], "step {step}");
    }
    assert_eq!(engines[1].seq_len(1, 2).unwrap(), 40 + 16);
    let st = &engines[1].stats()[1];
    assert!(st.cache.misses > 0 && st.device_bytes > 0, "{:?}", st.cache);
}

/// `evict_as_decode` (the SGLang GPU path runs it before freeing a
/// request's evicted slots) leaves exactly the retained set the first
/// decode append would: two policies fed the same chunked prefill, one
/// evicted early then decoded, one decoded directly, hold the same
/// positions; with `stabilize_final_chunk: false` too (the final-chunk
/// rule, which `Policy::evict` on a prompt not marked done does not apply).
#[test]
fn evict_as_decode_equals_first_decode() {
    let m = small_shape();
    for stab_final in [true, false] {
        let mut cfg = locret_cfg(24, 16, 8, 2, 4);
        cfg.stabilize_final_chunk = stab_final;
        let head = RetainingHead::random(&m, cfg.hidden, 9).unwrap();
        let mut a = LocretPolicy::with_head(cfg.clone(), head.clone(), 0).unwrap();
        let mut b = LocretPolicy::with_head(cfg, head, 0).unwrap();
        let mut rng = Rng::new(4);
        let mut seen = 0;
        for n in [16usize, 16, 16, 7] {
            let s = rng.normal_vec(n * 2, 1.0);
            for p in [&mut a, &mut b] {
                let start = p.held_len(1).unwrap_or(0);
                p.apply_scores(1, start, n, Phase::Prefill, false, &s)
                    .unwrap();
            }
            seen += n;
        }
        assert!(a.eviction_pending(1));
        let early = a.evict_as_decode(1).expect("an eviction was owed");
        assert!(!a.eviction_pending(1));
        assert!(a.evict_as_decode(1).is_none(), "nothing owed twice");
        let held = a.held_positions(1).unwrap();
        assert_eq!(early.len(), 2);
        for h in &held {
            assert_eq!(h.len(), 24, "budget per head");
        }
        let start = b.held_len(1).unwrap();
        b.apply_scores(1, start, 1, Phase::Decode, false, &[])
            .unwrap();
        let start = a.held_len(1).unwrap();
        a.apply_scores(1, start, 1, Phase::Decode, false, &[])
            .unwrap();
        assert_eq!(a.held_positions(1), b.held_positions(1));
        let hb = b.held_positions(1).unwrap();
        assert!(hb
            .iter()
            .all(|h| h.len() == 25 && *h.last().unwrap() == seen as u32));
    }
    // No state: nothing to do.
    let head = RetainingHead::random(&m, 32, 1).unwrap();
    let mut p = LocretPolicy::with_head(locret_cfg(8, 8, 4, 0, 2), head, 0).unwrap();
    assert!(p.evict_as_decode(7).is_none());
}
