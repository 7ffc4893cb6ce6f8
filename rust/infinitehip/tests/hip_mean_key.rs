//! Decode stage 0 by cached chunk means (`hip.decode_stage0 = "mean_key"`)
//! on fresh random inputs: a covering budget equals dense (and dropping one
//! token fails the bound), stage 0 keeps exactly the chunks whose mean keys
//! score best (means recomputed here from the stored keys), the per-sequence
//! cache gives the selections of a policy that averages everything afresh,
//! needles are found at 256K, and bad configs are refused.

use half::bf16;
use infinitehip::attention::{self, reference, rel_error, AttnShape};
use infinitehip::config::{
    DecodeStage0, HipConfig, HipStage, LayerPolicy, ModelShape, PolicyConfig,
};
use infinitehip::kv::KvRead;
use infinitehip::policy::hip::HipPolicy;
use infinitehip::policy::{Phase, Policy, SelectRequest, Selection};
use infinitehip::rng::Rng;
use infinitehip::workload::needle_seq;

fn model(d: usize) -> ModelShape {
    ModelShape {
        head_dim: d,
        ..Default::default()
    }
}

fn mean_key(cfg: HipConfig) -> HipConfig {
    HipConfig {
        decode_stage0: DecodeStage0::MeanKey,
        ..cfg
    }
}

fn stages(sink: usize, window: usize, keep: usize, c0: usize) -> HipConfig {
    HipConfig {
        sink,
        window,
        stages: vec![
            HipStage {
                chunk_size: c0,
                keep_tokens: keep * 4,
                refresh_interval: 8,
            },
            HipStage {
                chunk_size: 8,
                keep_tokens: keep * 2,
                refresh_interval: 4,
            },
            HipStage {
                chunk_size: 4,
                keep_tokens: keep,
                refresh_interval: 2,
            },
        ],
        block_size_q: 16,
        q_stride: 2,
        prefill_chunk: 1024,
        ..HipConfig::default()
    }
}

fn decode(pol: &mut HipPolicy, shape: AttnShape, q: &[f32], kv: &dyn KvRead) -> Selection {
    let out = pol
        .select(&SelectRequest {
            seq: 0,
            shape,
            phase: Phase::Decode,
            queries: q,
            q_start: kv.len() - 1,
            kv,
        })
        .unwrap();
    out.blocks.into_iter().next().unwrap()
}

#[test]
fn covering_budget_equals_dense_and_drop_fails() {
    let shape = AttnShape::new(8, 2, 64).unwrap();
    let len = 900;
    let ns = needle_seq::<bf16>(shape, len, 8, 16, 64, 64, 3).unwrap();
    let view = ns.pool.view(0).unwrap();
    let cfg = mean_key(stages(16, 64, 1024, 32));
    let mut pol = HipPolicy::new(cfg, &model(64)).unwrap();
    let q = ns.query(&mut Rng::new(4));
    let sel = decode(&mut pol, shape, &q, &view);
    for h in 0..2 {
        assert_eq!(sel.token_count(h), len, "head {h}: covering keeps all");
    }
    let dense = reference::attend_f64(&shape, &q, &view, None, len);
    let mut o = vec![f32::NAN; q.len()];
    let views = std::slice::from_ref(&view);
    attention::decode(&shape, &q, views, Some(std::slice::from_ref(&sel)), &mut o).unwrap();
    let err = rel_error(&o, &dense);
    assert!(err <= 1e-5, "covering mean-key decode rel err {err}");
    // Drop head 1's most attended token (a needle's, typically).
    let (g, d) = (shape.group(), shape.head_dim);
    let mut k = vec![0f32; d];
    let score = |t: usize, k: &mut [f32]| {
        view.read_key(1, t, k);
        (0..g)
            .map(|j| (0..d).map(|i| q[(g + j) * d + i] * k[i]).sum::<f32>())
            .fold(f32::NEG_INFINITY, f32::max)
    };
    let t = (0..len)
        .max_by(|&a, &b| score(a, &mut k).total_cmp(&score(b, &mut k)))
        .unwrap();
    let mut cut = sel.clone();
    cut.heads[1] = [0..t, t + 1..len]
        .into_iter()
        .filter(|r| !r.is_empty())
        .collect();
    attention::decode(&shape, &q, views, Some(std::slice::from_ref(&cut)), &mut o).unwrap();
    let err = rel_error(&o, &dense);
    assert!(err > 1e-5, "dropping token {t} went unnoticed: {err}");
}

/// bf16-rounded mean of keys lo..lo+c of head h, f32 sums in token order.
fn mean(kv: &dyn KvRead, h: usize, lo: usize, c: usize) -> Vec<f32> {
    let d = kv.head_dim();
    let (mut s, mut k) = (vec![0f32; d], vec![0f32; d]);
    for t in lo..lo + c {
        kv.read_key(h, t, &mut k);
        s.iter_mut().zip(&k).for_each(|(a, x)| *a += x);
    }
    s.iter()
        .map(|x| bf16::from_f32(x / c as f32).to_f32())
        .collect()
}

#[test]
fn stage0_keeps_the_best_mean_key_chunks() {
    // One stage: the middle selection is stage 0's output.
    let shape = AttnShape::new(8, 2, 64).unwrap();
    let (len, sink, window, c, keep) = (5000, 16, 128, 64, 640);
    let ns = needle_seq::<bf16>(shape, len, 12, sink, window, 64, 5).unwrap();
    let view = ns.pool.view(0).unwrap();
    let mut cfg = stages(sink, window, keep, c);
    cfg.stages.truncate(1);
    cfg.stages[0].keep_tokens = keep;
    let mut pol = HipPolicy::new(mean_key(cfg), &model(64)).unwrap();
    let q = ns.query(&mut Rng::new(6));
    let sel = decode(&mut pol, shape, &q, &view);
    let mid = sink..len - window;
    let n = mid.len().div_ceil(c);
    let (g, d) = (shape.group(), shape.head_dim);
    let mut gaps = Vec::new();
    for h in 0..2 {
        // Scores in f64 from the same rounded means: the kept set must be the
        // top keep / c unless two chunks tie within f32 rounding.
        let mut sc: Vec<(f64, usize)> = (0..n)
            .map(|a| {
                let m = mean(&view, h, mid.start + a * c, c);
                let best = (0..g)
                    .map(|j| {
                        let qh = &q[(h * g + j) * d..(h * g + j + 1) * d];
                        qh.iter()
                            .zip(&m)
                            .map(|(x, y)| *x as f64 * *y as f64)
                            .sum::<f64>()
                    })
                    .fold(f64::NEG_INFINITY, f64::max);
                (best, a)
            })
            .collect();
        sc.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
        let k = keep / c;
        gaps.push(sc[k - 1].0 - sc[k].0);
        for &(_, a) in &sc[..k] {
            let lo = mid.start + a * c;
            let hi = (lo + c).min(mid.end);
            assert!(
                (lo..hi).all(|t| sel.contains(h, t)),
                "head {h}: chunk {a} ({lo}..{hi}) is among the best {k} but not kept"
            );
        }
        for &(_, a) in &sc[k..] {
            let lo = mid.start + a * c;
            assert!(
                !sel.contains(h, lo),
                "head {h}: chunk {a} kept but not among the best {k}"
            );
        }
    }
    assert!(
        gaps.iter().all(|&x| x > 1e-4),
        "near tie at the threshold: {gaps:?}"
    );
}

#[test]
fn cached_means_select_as_a_fresh_policy() {
    // 33 steps with full refreshes every 8 (stage 0), the middle growing one
    // token a step: chunks enter the cache as the window slides past them.
    let shape = AttnShape::new(4, 2, 32).unwrap();
    let mut ns = needle_seq::<f32>(shape, 3000, 16, 8, 32, 64, 9).unwrap();
    let cfg = mean_key(stages(8, 32, 64, 16));
    let mut cached = HipPolicy::new(cfg.clone(), &model(32)).unwrap();
    let mut rng = Rng::new(10);
    let mut refreshes = 0;
    for step in 0..33 {
        let q = ns.query(&mut rng);
        let view = ns.pool.view(0).unwrap();
        let got = decode(&mut cached, shape, &q, &view);
        if step % 8 == 0 {
            let mut fresh = HipPolicy::new(cfg.clone(), &model(32)).unwrap();
            let want = decode(&mut fresh, shape, &q, &view);
            assert_eq!(got, want, "step {step}: cached means select differently");
            refreshes += 1;
        }
        drop(view);
        ns.append_random(&mut rng).unwrap();
    }
    assert_eq!(refreshes, 5);
}

#[test]
fn needles_found_at_256k() {
    let shape = AttnShape::new(4, 1, 64).unwrap();
    let cfg = mean_key(HipConfig::default());
    let len = 1 << 18;
    let mut recalls = Vec::new();
    for seed in 0..6u64 {
        let ns = needle_seq::<bf16>(shape, len, 64, cfg.sink, cfg.window, 64, 2000 + seed).unwrap();
        let view = ns.pool.view(0).unwrap();
        let mut pol = HipPolicy::new(cfg.clone(), &model(64)).unwrap();
        let q = ns.query(&mut Rng::new(seed));
        let sel = decode(&mut pol, shape, &q, &view);
        assert!(sel.token_count(0) <= cfg.sink + cfg.window + cfg.budget());
        recalls.push(ns.recall(&sel));
    }
    let mean = recalls.iter().sum::<f64>() / recalls.len() as f64;
    eprintln!("mean-key needle recall at 256K: {recalls:?}");
    assert!(mean >= 0.95, "needle recall {mean:.3}: {recalls:?}");
}

#[test]
fn config_is_read_and_checked() {
    let c =
        PolicyConfig::from_json(r#"{"default": {"method": "hip", "decode_stage0": "mean_key"}}"#)
            .unwrap();
    let LayerPolicy::Hip(h) = c.default else {
        panic!("not hip")
    };
    assert_eq!(h.decode_stage0, DecodeStage0::MeanKey);
    let bad = |json: &str, field: &str| {
        let e = PolicyConfig::from_json(json).unwrap_err().to_string();
        assert!(e.contains(field), "{json}: {e}");
    };
    bad(
        r#"{"default": {"method": "hip", "decode_stage0": "mean"}}"#,
        "mean",
    );
    bad(
        r#"{"default": {"method": "hip", "decode_stage0": "mean_key", "window": 32}}"#,
        "decode_stage0",
    );
    bad(
        r#"{"default": {"method": "hip", "decode_stage0": "mean_key", "rope": {"scoring": "relative", "attention": "streaming"}}}"#,
        "decode_stage0",
    );
    let one_stage = r#"{"default": {"method": "hip", "decode_stage0": "mean_key", "successors": 2,
        "stages": [{"chunk_size": 8, "keep_tokens": 512, "refresh_interval": 4}]}}"#;
    bad(one_stage, "decode_stage0");
}
