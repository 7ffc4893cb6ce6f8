//! `hip.async_refresh`, checked against the in-line policy on the same
//! inputs. `all`: a refresh due at a decode step scores with that step's
//! query but is attended from the next step on, so steps that refresh
//! nothing and the sequence's first step select the same, and a step that
//! refreshes attends exactly the in-line policy's previous selection plus
//! the newest token. `stage0`: stage 0 of a refresh due at step s is what a
//! fresh policy's stage 0 keeps at step s - 1. A covering budget still
//! attends every token.

use half::bf16;
use infinitehip::attention::AttnShape;
use infinitehip::config::{
    AsyncRefresh, DecodeStage0, HipConfig, HipStage, LayerPolicy, ModelShape, PolicyConfig,
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

fn cfg(keep: usize, stage0: DecodeStage0, async_refresh: AsyncRefresh) -> HipConfig {
    HipConfig {
        sink: 8,
        window: 32,
        stages: vec![
            HipStage {
                chunk_size: 16,
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
        decode_stage0: stage0,
        async_refresh,
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

fn tokens(sel: &Selection, h: usize) -> Vec<usize> {
    sel.heads[h].iter().flat_map(|r| r.clone()).collect()
}

/// Runs both policies `steps` steps; returns how many refresh steps the
/// async policy attended differently from the synchronous one.
fn lag_run(stage0: DecodeStage0, keep: usize, len0: usize, steps: usize, seed: u64) -> usize {
    let shape = AttnShape::new(4, 2, 32).unwrap();
    let mut ns = needle_seq::<f32>(shape, len0, 16, 8, 32, 64, seed).unwrap();
    let mut sync = HipPolicy::new(cfg(keep, stage0, AsyncRefresh::Off), &model(32)).unwrap();
    let mut lag = HipPolicy::new(cfg(keep, stage0, AsyncRefresh::All), &model(32)).unwrap();
    let mut rng = Rng::new(seed + 1);
    let mut prev: Option<Selection> = None;
    let mut differ = 0;
    for step in 0..steps {
        let q = ns.query(&mut rng);
        let view = ns.pool.view(0).unwrap();
        let len = view.len();
        let want = decode(&mut sync, shape, &q, &view);
        let got = decode(&mut lag, shape, &q, &view);
        let refreshes = step % 2 == 0;
        if step == 0 || !refreshes {
            assert_eq!(got, want, "step {step}: no lag expected");
        } else {
            let p = prev.as_ref().unwrap();
            for h in 0..shape.n_kv_heads {
                let mut expect = tokens(p, h);
                expect.push(len - 1);
                assert_eq!(
                    tokens(&got, h),
                    expect,
                    "step {step} head {h}: a lagged step attends the previous selection + the newest token"
                );
            }
            differ += usize::from(got != want);
        }
        prev = Some(want);
        drop(view);
        ns.append_random(&mut rng).unwrap();
    }
    differ
}

#[test]
fn lagged_steps_attend_the_previous_selection() {
    for (stage0, seed) in [(DecodeStage0::Search, 3), (DecodeStage0::MeanKey, 5)] {
        // 40 steps: stage 0 refreshes at 0, 8, .., 32; the last stage every 2.
        let differ = lag_run(stage0, 64, 2000, 40, seed);
        // The lag must show: fresh selections differ from stale ones.
        assert!(differ >= 5, "{stage0:?}: only {differ} lagged steps differ");
    }
}

#[test]
fn covering_budget_attends_every_token() {
    let shape = AttnShape::new(8, 2, 64).unwrap();
    let mut ns = needle_seq::<bf16>(shape, 700, 8, 8, 32, 64, 11).unwrap();
    let mut pols: Vec<HipPolicy> = [AsyncRefresh::All, AsyncRefresh::Stage0]
        .into_iter()
        .map(|m| HipPolicy::new(cfg(1024, DecodeStage0::MeanKey, m), &model(64)).unwrap())
        .collect();
    let mut rng = Rng::new(12);
    for step in 0..20 {
        let q = ns.query(&mut rng);
        let view = ns.pool.view(0).unwrap();
        for pol in pols.iter_mut() {
            let sel = decode(pol, shape, &q, &view);
            for h in 0..2 {
                assert_eq!(
                    tokens(&sel, h),
                    (0..view.len()).collect::<Vec<_>>(),
                    "step {step} head {h}"
                );
            }
        }
        drop(view);
        ns.append_random(&mut rng).unwrap();
    }
}

#[test]
fn stage0_is_scored_a_step_early() {
    // Stage 1 keeps every sub-chunk of stage 0's chunks, so the middle of
    // a selection is stage 0's output.
    let shape = AttnShape::new(4, 2, 32).unwrap();
    let mut ns = needle_seq::<f32>(shape, 2000, 16, 8, 32, 64, 21).unwrap();
    let two = |m: AsyncRefresh| HipConfig {
        stages: vec![
            HipStage {
                chunk_size: 16,
                keep_tokens: 256,
                refresh_interval: 8,
            },
            HipStage {
                chunk_size: 4,
                keep_tokens: 256,
                refresh_interval: 2,
            },
        ],
        ..cfg(64, DecodeStage0::MeanKey, m)
    };
    let mut pol = HipPolicy::new(two(AsyncRefresh::Stage0), &model(32)).unwrap();
    let mut inline = HipPolicy::new(two(AsyncRefresh::Off), &model(32)).unwrap();
    let mut rng = Rng::new(22);
    let mut prev_fresh: Option<Selection> = None;
    let (mut checked, mut differ) = (0, 0);
    for step in 0..41 {
        let q = ns.query(&mut rng);
        let view = ns.pool.view(0).unwrap();
        let len = view.len();
        let got = decode(&mut pol, shape, &q, &view);
        let want = decode(&mut inline, shape, &q, &view);
        if step == 0 {
            assert_eq!(got, want, "the first step scores stage 0 in line");
        } else if step % 8 == 0 {
            let p = prev_fresh.as_ref().unwrap();
            for h in 0..shape.n_kv_heads {
                let mut expect = tokens(p, h);
                expect.push(len - 1);
                assert_eq!(
                    tokens(&got, h),
                    expect,
                    "step {step} head {h}: stage 0 as a fresh policy kept it a step before"
                );
            }
            checked += 1;
            differ += usize::from(got != want);
        }
        // What a fresh policy's stage 0 keeps at this step.
        let mut fresh = HipPolicy::new(two(AsyncRefresh::Off), &model(32)).unwrap();
        prev_fresh = Some(decode(&mut fresh, shape, &q, &view));
        drop(view);
        ns.append_random(&mut rng).unwrap();
    }
    assert_eq!(checked, 5);
    assert!(
        differ >= 2,
        "stage 0 a step early changed nothing ({differ})"
    );
}

#[test]
fn stage0_needs_mean_key_and_two_stages() {
    let bad = |json: &str| {
        let e = PolicyConfig::from_json(json).unwrap_err().to_string();
        assert!(e.contains("async_refresh"), "{json}: {e}");
    };
    bad(r#"{"default": {"method": "hip", "async_refresh": "stage0"}}"#);
    bad(
        r#"{"default": {"method": "hip", "decode_stage0": "mean_key", "async_refresh": "stage0",
            "stages": [{"chunk_size": 64, "keep_tokens": 2048, "refresh_interval": 8}]}}"#,
    );
    PolicyConfig::from_json(
        r#"{"default": {"method": "hip", "decode_stage0": "mean_key", "async_refresh": "stage0"}}"#,
    )
    .unwrap();
}

#[test]
fn config_is_read() {
    let c = PolicyConfig::from_json(r#"{"default": {"method": "hip", "async_refresh": "all"}}"#)
        .unwrap();
    let LayerPolicy::Hip(h) = c.default else {
        panic!("not hip")
    };
    assert_eq!(h.async_refresh, AsyncRefresh::All);
    let c = PolicyConfig::from_json(r#"{"default": {"method": "hip"}}"#).unwrap();
    let LayerPolicy::Hip(h) = c.default else {
        panic!("not hip")
    };
    assert_eq!(h.async_refresh, AsyncRefresh::Off, "off by default");
    for v in ["1", "true", "\"later\""] {
        let json = format!(r#"{{"default": {{"method": "hip", "async_refresh": {v}}}}}"#);
        assert!(PolicyConfig::from_json(&json).is_err(), "{json}");
    }
}
