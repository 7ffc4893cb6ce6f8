//! InfiniteHiP selection: exact when the budget covers the context, finds
//! planted needles in a million tokens, refreshes cached masks on schedule.

use half::bf16;
use infinitehip::attention::{self, reference, rel_error, AttnShape};
use infinitehip::config::{HipConfig, HipStage};
use infinitehip::kv::KvRead;
use infinitehip::policy::hip::HipPolicy;
use infinitehip::policy::{Phase, Policy, SelectRequest};
use infinitehip::rng::Rng;

fn model(head_dim: usize, rope_theta: f32) -> infinitehip::config::ModelShape {
    infinitehip::config::ModelShape {
        head_dim,
        rope_theta,
        ..Default::default()
    }
}
use infinitehip::workload::needle_seq;

fn small_cfg(keep: usize) -> HipConfig {
    HipConfig {
        sink: 8,
        window: 32,
        stages: vec![
            HipStage {
                chunk_size: 32,
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

fn req<'a>(
    shape: AttnShape,
    phase: Phase,
    q: &'a [f32],
    q_start: usize,
    kv: &'a dyn KvRead,
) -> SelectRequest<'a> {
    SelectRequest {
        seq: 0,
        shape,
        phase,
        queries: q,
        q_start,
        kv,
    }
}

#[test]
fn budget_covering_context_equals_dense() {
    let shape = AttnShape::new(8, 2, 64).unwrap();
    let len = 700;
    let ns = needle_seq::<bf16>(shape, len, 16, 8, 32, 64, 1).unwrap();
    let view = ns.pool.view(0).unwrap();
    let mut pol = HipPolicy::new(small_cfg(1024), &model(64, 10000.0)).unwrap();
    let mut rng = Rng::new(2);
    // Decode.
    let q = rng.normal_vec(shape.q_elems(), 1.0);
    let out = pol
        .select(&req(shape, Phase::Decode, &q, len - 1, &view))
        .unwrap();
    assert_eq!(out.blocks[0].heads, vec![vec![0..len]; 2]);
    let mut o = vec![f32::NAN; q.len()];
    attention::decode(
        &shape,
        &q,
        std::slice::from_ref(&view),
        Some(&out.blocks),
        &mut o,
    )
    .unwrap();
    let err = rel_error(&o, &reference::attend_f64(&shape, &q, &view, None, len));
    // Same stored K/V in the reference: f32 accumulation only.
    assert!(err <= 1e-5, "decode rel err {err}");
    // Prefill of the last 200 tokens.
    let q = rng.normal_vec(200 * shape.q_elems(), 1.0);
    let out = pol
        .select(&req(shape, Phase::Prefill, &q, len - 200, &view))
        .unwrap();
    let mut o = vec![f32::NAN; q.len()];
    attention::prefill(
        &shape,
        &q,
        len - 200,
        &view,
        Some((&out.blocks, out.q_block)),
        &mut o,
    )
    .unwrap();
    let err = rel_error(
        &o,
        &reference::prefill_f64(&shape, &q, len - 200, &view, None),
    );
    assert!(err <= 1e-5, "prefill rel err {err}");
}

#[test]
fn small_budget_respects_budget_and_keeps_sink_and_window() {
    let shape = AttnShape::new(4, 2, 32).unwrap();
    let len = 5000;
    let ns = needle_seq::<f32>(shape, len, 16, 8, 32, 64, 3).unwrap();
    let view = ns.pool.view(0).unwrap();
    let cfg = small_cfg(64);
    let mut pol = HipPolicy::new(cfg.clone(), &model(32, 10000.0)).unwrap();
    let q = ns.query(&mut Rng::new(4));
    let out = pol
        .select(&req(shape, Phase::Decode, &q, len - 1, &view))
        .unwrap();
    let sel = &out.blocks[0];
    for h in 0..2 {
        assert!(
            sel.token_count(h) <= cfg.sink + cfg.window + 64,
            "head {h}: {}",
            sel.token_count(h)
        );
        assert!((0..8).all(|t| sel.contains(h, t)), "sink dropped");
        assert!(
            (len - 32..len).all(|t| sel.contains(h, t)),
            "window dropped"
        );
    }
    assert_eq!(ns.recall(sel), 1.0);
    // Prefill blocks: each block's selection stays within budget and is causal.
    let n = 64;
    let q: Vec<f32> = (0..n).flat_map(|_| ns.query(&mut Rng::new(5))).collect();
    let out = pol
        .select(&req(shape, Phase::Prefill, &q, len - n, &view))
        .unwrap();
    assert_eq!(out.blocks.len(), n / 16);
    for (b, s) in out.blocks.iter().enumerate() {
        let last = len - n + (b + 1) * 16;
        for h in 0..2 {
            assert!(
                s.heads[h].last().unwrap().end <= last,
                "block {b} reads the future"
            );
            assert!(s.token_count(h) <= 8 + 32 + 15 + 64);
        }
    }
}

/// DESIGN 4: a planted 64-token block among 1M random keys is found in >= 99% of seeds.
#[test]
fn needle_recall_at_one_million_tokens() {
    let shape = AttnShape::new(4, 1, 64).unwrap();
    let cfg = HipConfig::default();
    let len = 1 << 20;
    let mut recalls = Vec::new();
    for seed in 0..20u64 {
        let ns = needle_seq::<bf16>(shape, len, 64, cfg.sink, cfg.window, 64, 1000 + seed).unwrap();
        let view = ns.pool.view(0).unwrap();
        let mut pol = HipPolicy::new(cfg.clone(), &model(64, 500000.0)).unwrap();
        let q = ns.query(&mut Rng::new(seed));
        let out = pol
            .select(&req(shape, Phase::Decode, &q, len - 1, &view))
            .unwrap();
        assert!(out.blocks[0].token_count(0) <= cfg.sink + cfg.window + cfg.budget());
        recalls.push(ns.recall(&out.blocks[0]));
    }
    let mean = recalls.iter().sum::<f64>() / recalls.len() as f64;
    assert!(
        mean >= 0.99,
        "needle recall {mean:.3} over 20 seeds: {recalls:?}"
    );
}

#[test]
fn decode_masks_refresh_on_schedule() {
    let shape = AttnShape::new(4, 2, 32).unwrap();
    let len = 4000;
    let mut ns = needle_seq::<f32>(shape, len, 16, 8, 32, 64, 9).unwrap();
    let cfg = small_cfg(64);
    let mut cached = HipPolicy::new(cfg.clone(), &model(32, 10000.0)).unwrap();
    let mut rng = Rng::new(10);
    let mut prev_mid: Option<Vec<Vec<std::ops::Range<usize>>>> = None;
    for step in 0..17 {
        let cur = ns.pool.seq_len(0).unwrap();
        let q = ns.query(&mut rng);
        let view = ns.pool.view(0).unwrap();
        let out = cached
            .select(&req(shape, Phase::Decode, &q, cur - 1, &view))
            .unwrap();
        let mut fresh = HipPolicy::new(cfg.clone(), &model(32, 10000.0)).unwrap();
        let want = fresh
            .select(&req(shape, Phase::Decode, &q, cur - 1, &view))
            .unwrap();
        // Middle part = selection without sink and window.
        let mid: Vec<Vec<_>> = out.blocks[0]
            .heads
            .iter()
            .map(|rs| {
                rs.iter()
                    .filter(|r| r.start >= 8 && r.end <= cur - 32)
                    .cloned()
                    .collect()
            })
            .collect();
        if step % 8 == 0 {
            assert_eq!(
                out, want,
                "step {step}: a full refresh must equal a fresh selection"
            );
        } else if step % 2 != 0 {
            // No stage refreshes on odd steps: the middle is exactly the cached one.
            assert_eq!(
                Some(&mid),
                prev_mid.as_ref(),
                "step {step}: mask changed between refreshes"
            );
        }
        for h in 0..2 {
            assert!(
                (cur - 32..cur).all(|t| out.blocks[0].contains(h, t)),
                "step {step}: window misses new tokens"
            );
        }
        prev_mid = Some(mid);
        drop(view);
        ns.append_random(&mut rng).unwrap();
    }
}

#[test]
fn config_and_input_errors() {
    let shape = AttnShape::new(4, 2, 32).unwrap();
    let ns = needle_seq::<f32>(shape, 100, 4, 8, 32, 64, 1).unwrap();
    let view = ns.pool.view(0).unwrap();
    let mut pol = HipPolicy::new(small_cfg(64), &model(32, 10000.0)).unwrap();
    let q = vec![0.0; 2 * shape.q_elems()];
    assert!(pol
        .select(&req(shape, Phase::Decode, &q, 98, &view))
        .is_err());
    assert!(pol
        .select(&req(
            shape,
            Phase::Decode,
            &q[..shape.q_elems()],
            100,
            &view
        ))
        .is_err());
    assert!(pol
        .select(&req(shape, Phase::Prefill, &q[..77], 0, &view))
        .is_err());
    let mut cfg = small_cfg(64);
    cfg.rope.attention = infinitehip::config::RopeMode::ChunkIndexed;
    let e = HipPolicy::new(cfg, &model(32, 10000.0))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("hip.rope.attention"), "{e}");
    let mut cfg = small_cfg(64);
    cfg.rope.scoring = infinitehip::config::RopeMode::Streaming;
    assert!(HipPolicy::new(cfg, &model(32, 10000.0)).is_err());
}

/// Relative scoring only moves positions once the query is past the trained
/// length; chunk-indexed scoring changes what is selected on rotated keys.
#[test]
fn scoring_rope_modes() {
    use infinitehip::config::RopeMode;
    let shape = AttnShape::new(4, 2, 32).unwrap();
    let len = 6000;
    let ns = needle_seq::<f32>(shape, len, 16, 8, 32, 64, 21).unwrap();
    let view = ns.pool.view(0).unwrap();
    let q = ns.query(&mut Rng::new(22));
    let select = |mode: RopeMode, max_position: usize| {
        let mut cfg = small_cfg(64);
        cfg.rope.scoring = mode;
        let m = infinitehip::config::ModelShape {
            head_dim: 32,
            rope_theta: 10000.0,
            max_position,
            ..Default::default()
        };
        let mut pol = HipPolicy::new(cfg, &m).unwrap();
        pol.select(&req(shape, Phase::Decode, &q, len - 1, &view))
            .unwrap()
    };
    let original = select(RopeMode::Original, 8192);
    assert_eq!(
        select(RopeMode::Relative, 8192),
        original,
        "relative must not act below the trained length"
    );
    let relative = select(RopeMode::Relative, 1024);
    let chunked = select(RopeMode::ChunkIndexed, 8192);
    assert_ne!(
        relative, original,
        "relative scoring had no effect beyond the trained length"
    );
    assert_ne!(chunked, original, "chunk-indexed scoring had no effect");
    for out in [&relative, &chunked] {
        for h in 0..2 {
            assert!(out.blocks[0].token_count(h) <= 8 + 32 + 64);
        }
    }
}

/// A token-level stage (chunk 1, refreshed every step) is exact top-k over
/// the middle by the group-max score: the setting measured on SmolLM2
/// (head_dim 64, BENCHMARKS.md) where coarser chunks lose attention mass.
#[test]
fn token_level_stage_is_exact_group_max_top_k() {
    use infinitehip::kv::SeqView;
    let (hq, hk, d, len, keep) = (6, 2, 16, 700, 40);
    let shape = AttnShape::new(hq, hk, d).unwrap();
    let mut rng = Rng::new(11);
    let k = rng.normal_vec(hk * len * d, 1.0);
    let cfg = HipConfig {
        sink: 4,
        window: 16,
        stages: vec![HipStage {
            chunk_size: 1,
            keep_tokens: keep,
            refresh_interval: 1,
        }],
        ..HipConfig::default()
    };
    let mut pol = HipPolicy::new(cfg, &model(d, 10000.0)).unwrap();
    for step in 0..3 {
        let pos = len - 3 + step;
        let q = rng.normal_vec(hq * d, 1.0);
        let view = SeqView::from_contiguous(hk, d, len, &k, &k);
        let out = pol
            .select(&req(shape, Phase::Decode, &q, pos, &view))
            .unwrap();
        let sel = &out.blocks[0];
        let g = hq / hk;
        for h in 0..hk {
            let mid = 4..pos + 1 - 16;
            let mut s: Vec<(f32, usize)> = mid
                .clone()
                .map(|t| {
                    let kt = &k[(h * len + t) * d..(h * len + t + 1) * d];
                    let best = (0..g)
                        .map(|j| {
                            let qj = &q[(h * g + j) * d..(h * g + j + 1) * d];
                            qj.iter().zip(kt).map(|(a, b)| a * b).sum::<f32>()
                        })
                        .fold(f32::NEG_INFINITY, f32::max);
                    (best, t)
                })
                .collect();
            s.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let top: std::collections::BTreeSet<usize> = s[..keep].iter().map(|x| x.1).collect();
            let got: std::collections::BTreeSet<usize> =
                mid.filter(|&t| sel.contains(h, t)).collect();
            assert_eq!(got, top, "step {step} head {h}");
            assert!((0..4).chain(pos + 1 - 16..=pos).all(|t| sel.contains(h, t)));
        }
    }
}

/// Relative scoring in decode through the step's shared rotation table
/// (`rope::RelativeTable`) and the flat block-parallel stage scoring
/// (`stages_flat`), the defaults, select exactly what the reference path
/// (per-key rotation, one parallel item per list) selects, step by step
/// beyond the trained length, on fresh random keys and queries: s4-clip's
/// shape (chunks of 4 refreshed every 8 steps, then single tokens every
/// step, successors), head_dim 64 and 32, several layers sharing one table
/// per step; each fast path alone too.
#[test]
fn relative_table_decode_equals_per_key_rotation() {
    use infinitehip::config::RopeMode;
    for (d, hkv, hq, seed) in [(64usize, 3usize, 9usize, 31u64), (32, 2, 4, 32)] {
        let shape = AttnShape::new(hq, hkv, d).unwrap();
        let max_position = 512;
        // Over 512 chunks per stage and list: several `stages_flat` blocks.
        let (len0, steps) = (3000, 20);
        let cfg = HipConfig {
            sink: 16,
            window: 64,
            stages: vec![
                HipStage {
                    chunk_size: 4,
                    keep_tokens: 1024,
                    refresh_interval: 8,
                },
                HipStage {
                    chunk_size: 1,
                    keep_tokens: 256,
                    refresh_interval: 1,
                },
            ],
            successors: 4,
            block_size_q: 16,
            q_stride: 2,
            ..HipConfig::default()
        };
        let mut cfg = cfg;
        cfg.rope.scoring = RopeMode::Relative;
        cfg.rope.attention = RopeMode::Streaming;
        let m = infinitehip::config::ModelShape {
            head_dim: d,
            rope_theta: 100000.0,
            max_position,
            ..Default::default()
        };
        let layers = 3;
        let mut fast: Vec<HipPolicy> = (0..layers)
            .map(|_| HipPolicy::new(cfg.clone(), &m).unwrap())
            .collect();
        // The reference: key-by-key rotation, one parallel item per list.
        let mut slow: Vec<HipPolicy> = (0..layers)
            .map(|_| {
                let mut p = HipPolicy::new(cfg.clone(), &m).unwrap();
                p.set_relative_table(false);
                p.set_flat_decode(false);
                p
            })
            .collect();
        // Each fast path alone.
        let mut table_only: Vec<HipPolicy> = (0..layers)
            .map(|_| {
                let mut p = HipPolicy::new(cfg.clone(), &m).unwrap();
                p.set_flat_decode(false);
                p
            })
            .collect();
        let mut flat_only: Vec<HipPolicy> = (0..layers)
            .map(|_| {
                let mut p = HipPolicy::new(cfg.clone(), &m).unwrap();
                p.set_relative_table(false);
                p
            })
            .collect();
        let mut rng = Rng::new(seed);
        let kmax = (len0 + steps) * hkv * d;
        let keys: Vec<Vec<f32>> = (0..layers).map(|_| rng.normal_vec(kmax, 1.0)).collect();
        let mut differ_from_original = 0;
        for step in 0..steps {
            let len = len0 + step;
            for l in 0..layers {
                let k = &keys[l][..len * hkv * d];
                let view = infinitehip::kv::SeqView::from_contiguous(hkv, d, len, k, k);
                let q = rng.normal_vec(hq * d, 1.0);
                let r = req(shape, Phase::Decode, &q, len - 1, &view);
                let a = fast[l].select(&r).unwrap();
                let b = slow[l].select(&r).unwrap();
                assert_eq!(a, b, "d {d} step {step} layer {l}");
                assert_eq!(table_only[l].select(&r).unwrap(), b, "table, step {step}");
                assert_eq!(flat_only[l].select(&r).unwrap(), b, "flat, step {step}");
                for h in 0..hkv {
                    assert!(a.blocks[0].token_count(h) >= 16 + 64 + 256, "step {step}");
                }
                // The rotation matters here: original scoring selects otherwise.
                let mut o = cfg.clone();
                o.rope.scoring = RopeMode::Original;
                let orig = HipPolicy::new(o, &m).unwrap().select(&r).unwrap();
                differ_from_original += usize::from(orig != a);
            }
        }
        assert!(
            differ_from_original > steps,
            "relative scoring had no effect: {differ_from_original}"
        );
    }
}
