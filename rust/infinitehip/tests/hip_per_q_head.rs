//! `hip.per_q_head` (decode): every q head of a GQA group runs the stages with
//! its own query and keeps its own budget, so the decode `Selection` holds one
//! range list per q head (issue 12: on SmolLM2 one shared mask per KV head
//! keeps 0.974 of the attention mass at 1/8, each q head its own 0.982).
//!
//! 1. The policy's per-q-head decode selection equals a brute-force reference
//!    (per q head: stage 1 = chunks of 2 ranked by their exact max, kept per
//!    refresh; last stage = token top-k over stage 1's set, plus the
//!    successors when on; sink, window, tokens slid out of the window), step
//!    by step, with and without `successors`, on fresh random inputs.
//! 2. A covering budget gives dense attention within f32 rounding; dropping
//!    one token of one q head's list fails the bound; a NaN never passes.
//! 3. The CPU kernel (decode and prefill, original and streaming positions)
//!    over per-q-head selections equals the f64 reference, in a batch mixed
//!    with per-KV-head selections; the engine's decode equals the reference
//!    over the policy's own selection.
//! 4. One q head needs a token its group mates score low: only per-q-head
//!    selection keeps it (the group selection drops it, checked by the same
//!    predicate).
//! 5. The fast prefill estimator combines (prefill stays per group, decode is
//!    per q head and equal to the reference estimator's); host offload and
//!    bad selection shapes are refused with errors naming the field.

use infinitehip::attention::{self, reference, rel_error, AttnShape};
use infinitehip::config::{HipConfig, HipStage, LayerPolicy, MaskEstimatorChoice, ModelShape};
use infinitehip::dtype::max_dot_f32;
use infinitehip::kv::SeqView;
use infinitehip::policy::hip::HipPolicy;
use infinitehip::policy::{Phase, Policy, SelectRequest, Selection};
use infinitehip::rng::Rng;
use infinitehip::rope::Rope;
use infinitehip::{Engine, PolicyConfig};

mod hip_reference;
use hip_reference::Reference;

fn stage(chunk_size: usize, keep_tokens: usize, refresh_interval: usize) -> HipStage {
    HipStage {
        chunk_size,
        keep_tokens,
        refresh_interval,
    }
}

fn model(g: usize, hk: usize, d: usize) -> ModelShape {
    ModelShape {
        n_layers: 1,
        n_q_heads: g * hk,
        n_kv_heads: hk,
        head_dim: d,
        rope_theta: 1e4,
        max_position: 1 << 20,
    }
}

fn tokens(ranges: &[std::ops::Range<usize>]) -> Vec<usize> {
    ranges.iter().flat_map(|r| r.clone()).collect()
}

fn two_stage(sink: usize, window: usize, keep1: usize, r1: usize, keep2: usize) -> HipConfig {
    HipConfig {
        sink,
        window,
        stages: vec![stage(2, keep1, r1), stage(1, keep2, 1)],
        block_size_q: 16,
        q_stride: 1,
        ..HipConfig::default()
    }
}

/// Contiguous `[h][t][d]` K and V of the first `n` tokens of `k`, `v`
/// (`[h][len][d]`).
fn prefix(x: &[f32], hk: usize, len: usize, d: usize, n: usize) -> Vec<f32> {
    (0..hk)
        .flat_map(|h| x[h * len * d..(h * len + n) * d].iter().copied())
        .collect()
}

fn decode_select(
    pol: &mut HipPolicy,
    shape: AttnShape,
    q: &[f32],
    kv: &SeqView<'_, f32>,
    pos: usize,
) -> Selection {
    let mut out = pol
        .select(&SelectRequest {
            seq: 0,
            shape,
            phase: Phase::Decode,
            queries: q,
            q_start: pos,
            kv,
        })
        .unwrap();
    assert_eq!(out.blocks.len(), 1);
    out.blocks.swap_remove(0)
}

#[test]
fn per_q_head_selection_matches_brute_force_reference() {
    let (g, hk, d) = (3, 2, 16);
    let (pre, steps) = (900, 40);
    let len = pre + steps;
    let (sink, window, keep1, keep2, r1) = (8, 32, 192, 40, 4);
    for (seed, succ) in [(21u64, 0usize), (22, 3)] {
        let mut rng = Rng::new(seed);
        let k = rng.normal_vec(hk * len * d, 1.0);
        let v = rng.normal_vec(hk * len * d, 1.0);
        let shape = AttnShape::new(g * hk, hk, d).unwrap();
        let cfg = HipConfig {
            per_q_head: true,
            successors: succ,
            ..two_stage(sink, window, keep1, r1, keep2)
        };
        let mut pol = HipPolicy::new(cfg.clone(), &model(g, hk, d)).unwrap();
        let mut group = HipPolicy::new(
            HipConfig {
                per_q_head: false,
                ..cfg
            },
            &model(g, hk, d),
        )
        .unwrap();
        let mut refs: Vec<Reference> = (0..g * hk)
            .map(|_| Reference {
                succ,
                ..Reference::new(sink, window, keep1, r1, keep2)
            })
            .collect();
        let mut differs = 0;
        for i in 0..steps {
            let pos = pre + i;
            let q = rng.normal_vec(g * hk * d, 1.0);
            let (kk, vv) = (
                prefix(&k, hk, len, d, pos + 1),
                prefix(&v, hk, len, d, pos + 1),
            );
            let kv = SeqView::from_contiguous(hk, d, pos + 1, &kk, &vv);
            let sel = decode_select(&mut pol, shape, &q, &kv, pos);
            assert_eq!(sel.heads.len(), g * hk, "one list per q head");
            assert!(sel.is_per_q_head(&shape));
            let gs = decode_select(&mut group, shape, &q, &kv, pos);
            assert_eq!(gs.heads.len(), hk);
            for (hq, r) in refs.iter_mut().enumerate() {
                let h = hq / g;
                let want = r.select(&q[hq * d..(hq + 1) * d], &k[h * len * d..], d, pos);
                assert_eq!(
                    tokens(sel.q_head_ranges(hq, g * hk)),
                    want,
                    "succ {succ} step {i} q head {hq}"
                );
                // The same per-list budget as the group selection (sink,
                // window, the last stage's keep, at most r1 slid tokens).
                assert!(want.len() <= sink + window + keep2 + r1);
                assert!(gs.token_count(h) <= sink + window + keep2 + r1);
                if tokens(sel.q_head_ranges(hq, g * hk)) != tokens(&gs.heads[h]) {
                    differs += 1;
                }
            }
        }
        assert!(
            differs > steps,
            "per-q-head lists rarely differ from the group's ({differs})"
        );
    }
}

/// Decode over per-q-head selections vs the f64 reference; returns the
/// worst relative error over the batch.
fn decode_error(
    shape: &AttnShape,
    q: &[f32],
    views: &[SeqView<'_, f32>],
    sels: &[Selection],
) -> f64 {
    let mut out = vec![f32::NAN; q.len()];
    attention::decode(shape, q, views, Some(sels), &mut out).unwrap();
    let qe = shape.q_elems();
    let mut worst = 0f64;
    for (i, v) in views.iter().enumerate() {
        let r = reference::attend_f64(shape, &q[i * qe..(i + 1) * qe], v, Some(&sels[i]), v.len());
        let e = rel_error(&out[i * qe..(i + 1) * qe], &r);
        if e.is_nan() {
            return f64::NAN;
        }
        worst = worst.max(e);
    }
    worst
}

#[test]
fn covering_budget_equals_dense_and_dropping_a_token_fails() {
    let (g, hk, d, n) = (3, 3, 64, 5000);
    let shape = AttnShape::new(g * hk, hk, d).unwrap();
    let mut rng = Rng::new(7);
    let k = rng.normal_vec(hk * n * d, 1.0);
    let mut v = rng.normal_vec(hk * n * d, 1.0);
    let q = rng.normal_vec(g * hk * d, 1.0);
    let kv = SeqView::from_contiguous(hk, d, n, &k, &v);
    let cfg = HipConfig {
        per_q_head: true,
        ..two_stage(4, 64, 8192, 8, 8192)
    };
    let mut pol = HipPolicy::new(cfg, &model(g, hk, d)).unwrap();
    let sel = decode_select(&mut pol, shape, &q, &kv, n - 1);
    assert_eq!(sel.heads.len(), g * hk);
    for hq in 0..g * hk {
        assert_eq!(
            sel.q_head_ranges(hq, g * hk),
            vec![0..n],
            "q head {hq} covers"
        );
    }
    // Dense: the kernel over the covering selection vs f64 dense.
    let mut out = vec![f32::NAN; q.len()];
    attention::decode(
        &shape,
        &q,
        std::slice::from_ref(&kv),
        Some(std::slice::from_ref(&sel)),
        &mut out,
    )
    .unwrap();
    let dense = reference::attend_f64(&shape, &q, &kv, None, n);
    let e = rel_error(&out, &dense);
    assert!(e <= 1e-5, "covering per-q-head vs dense: {e}");
    // Drop one token from q head 4's list (KV head 1): must fail the bound.
    let mut dropped = sel.clone();
    dropped.heads[4] = vec![0..2500, 2501..n];
    let mut out2 = vec![f32::NAN; q.len()];
    attention::decode(
        &shape,
        &q,
        std::slice::from_ref(&kv),
        Some(std::slice::from_ref(&dropped)),
        &mut out2,
    )
    .unwrap();
    let e2 = rel_error(&out2, &dense);
    assert!(e2 > 1e-5, "dropping one token of 5000 passed: {e2}");
    // Only q head 4's output moved.
    for hq in (0..g * hk).filter(|&x| x != 4) {
        assert_eq!(
            out[hq * d..(hq + 1) * d],
            out2[hq * d..(hq + 1) * d],
            "q head {hq}"
        );
    }
    // NaN in one selected value (KV head 1, token 1234): never passes.
    v[(n + 1234) * d + 5] = f32::NAN;
    let kv = SeqView::from_contiguous(hk, d, n, &k, &v);
    let e3 = decode_error(
        &shape,
        &q,
        std::slice::from_ref(&kv),
        std::slice::from_ref(&sel),
    );
    assert!(e3.is_nan() || e3 > 1e-5, "NaN passed: {e3}");
}

fn random_lists(rng: &mut Rng, lists: usize, len: usize, p: f32) -> Selection {
    let per: Vec<Vec<u32>> = (0..lists)
        .map(|_| (0..len as u32).filter(|_| rng.uniform() < p).collect())
        .collect();
    Selection::from_tokens(&per)
}

#[test]
fn per_q_head_attention_equals_reference() {
    let (g, hk, d) = (4, 2, 64);
    let shape = AttnShape::new(g * hk, hk, d).unwrap();
    let mut rng = Rng::new(31);
    let lens = [1usize, 70, 1000, 5003];
    let ks: Vec<Vec<f32>> = lens
        .iter()
        .map(|&n| rng.normal_vec(hk * n * d, 1.0))
        .collect();
    let vs: Vec<Vec<f32>> = lens
        .iter()
        .map(|&n| rng.normal_vec(hk * n * d, 1.0))
        .collect();
    let views: Vec<SeqView<'_, f32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| SeqView::from_contiguous(hk, d, n, &ks[i], &vs[i]))
        .collect();
    // A batch mixing per-q-head and per-KV-head selections.
    let sels: Vec<Selection> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| random_lists(&mut rng, if i % 2 == 0 { g * hk } else { hk }, n, 0.3))
        .collect();
    let q = rng.normal_vec(lens.len() * shape.q_elems(), 1.0);
    let e = decode_error(&shape, &q, &views, &sels);
    assert!(e <= 1e-5, "decode per-q-head vs reference: {e}");
    // Streaming positions, decode.
    let rope = Rope::new(d, 1e4);
    let mut out = vec![f32::NAN; q.len()];
    attention::decode_with(&shape, &q, &views, Some(&sels), Some(&rope), &mut out).unwrap();
    let qe = shape.q_elems();
    for (i, v) in views.iter().enumerate() {
        let r = reference::attend_streaming_f64(
            &shape,
            &rope,
            &q[i * qe..(i + 1) * qe],
            v,
            &sels[i],
            v.len(),
            v.len() - 1,
        );
        let e = rel_error(&out[i * qe..(i + 1) * qe], &r);
        assert!(e <= 1e-5, "streaming decode seq {i}: {e}");
    }
    // Prefill: 40 queries at the end of a 1000-token sequence, blocks of 16,
    // alternating per-q-head and per-KV-head blocks.
    let (n, nq) = (1000, 40);
    let kv = &views[2];
    let qp = rng.normal_vec(nq * qe, 1.0);
    let blocks: Vec<Selection> = (0..nq.div_ceil(16))
        .map(|b| random_lists(&mut rng, if b % 2 == 0 { g * hk } else { hk }, n, 0.3))
        .collect();
    for streaming in [None, Some(&rope)] {
        let mut out = vec![f32::NAN; qp.len()];
        attention::prefill_with(
            &shape,
            &qp,
            n - nq,
            kv,
            Some((&blocks, 16)),
            streaming,
            &mut out,
        )
        .unwrap();
        for i in 0..nq {
            let pos = n - nq + i;
            let r = match streaming {
                None => reference::attend_f64(
                    &shape,
                    &qp[i * qe..(i + 1) * qe],
                    kv,
                    Some(&blocks[i / 16]),
                    pos + 1,
                ),
                Some(rope) => reference::attend_streaming_f64(
                    &shape,
                    rope,
                    &qp[i * qe..(i + 1) * qe],
                    kv,
                    &blocks[i / 16],
                    pos + 1,
                    pos,
                ),
            };
            let e = rel_error(&out[i * qe..(i + 1) * qe], &r);
            assert!(
                e <= 1e-5,
                "prefill query {i} streaming {}: {e}",
                streaming.is_some()
            );
        }
    }
    // A selection with neither n_kv_heads nor n_q_heads lists is refused.
    let bad = vec![random_lists(&mut rng, 3, 70, 0.3)];
    let mut o = vec![0f32; qe];
    let err = attention::decode(&shape, &q[..qe], &views[1..2], Some(&bad), &mut o).unwrap_err();
    assert!(
        err.to_string().contains("per KV head or per q head"),
        "{err}"
    );
}

/// Q head 1 of group 0 attends one needle key that its group mates score
/// low; they score 100 distractors (more than the budget) higher than any
/// score the needle gets. Whether a selection keeps the needle for q head 1.
#[test]
fn one_q_head_keeps_its_own_token_only_per_q_head() {
    let (g, hk, d, n) = (3, 2, 16, 600);
    let shape = AttnShape::new(g * hk, hk, d).unwrap();
    let mut rng = Rng::new(5);
    let mut k = rng.normal_vec(hk * n * d, 0.3);
    let v = rng.normal_vec(hk * n * d, 1.0);
    let needle = 300;
    for j in 0..d {
        k[needle * d + j] = 0.0;
    }
    k[needle * d + 1] = 3.0;
    // distractors of KV head 0 spread over the middle, never in chunk 150
    let distractors: Vec<usize> = (0..100)
        .map(|i| 20 + 5 * i)
        .filter(|&t| t / 2 != needle / 2)
        .collect();
    assert!(distractors.len() > 64);
    for &t in &distractors {
        k[t * d] = 5.0;
    }
    let mut q = rng.normal_vec(g * hk * d, 0.1);
    for hq in [0, 2] {
        q[hq * d] = 10.0; // distractor direction: 50 per distractor
    }
    q[d + 1] = 10.0; // q head 1: the needle scores 30, its best by far
    let kv = SeqView::from_contiguous(hk, d, n, &k, &v);
    let keeps_needle = |sel: &Selection| sel.q_head_contains(1, g * hk, needle);
    // Dense attention mass q head 1 puts on the needle, and the mass a
    // selection keeps for it.
    let mass = |sel: Option<&Selection>| {
        let qh = &q[d..2 * d];
        let s: Vec<f64> = (0..n)
            .map(|t| max_dot_f32(qh, &k[t * d..(t + 1) * d]) as f64 * shape.scale as f64)
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        (0..n)
            .filter(|&t| sel.is_none_or(|x| x.q_head_contains(1, g * hk, t)))
            .map(|t| (s[t] - m).exp() / z)
            .sum::<f64>()
    };
    let cfg = two_stage(4, 16, 128, 8, 32);
    let mut results = Vec::new();
    for per_q_head in [true, false] {
        let mut pol = HipPolicy::new(
            HipConfig {
                per_q_head,
                ..cfg.clone()
            },
            &model(g, hk, d),
        )
        .unwrap();
        let sel = decode_select(&mut pol, shape, &q, &kv, n - 1);
        results.push((keeps_needle(&sel), mass(Some(&sel)), sel));
    }
    let dense_needle = {
        let one = Selection::from_tokens(&vec![vec![needle as u32]; g * hk]);
        mass(Some(&one))
    };
    eprintln!(
        "q head 1: needle holds {dense_needle:.3} of its dense mass; kept per q head {:.3}, per group {:.3}",
        results[0].1, results[1].1
    );
    assert!(
        dense_needle > 0.5,
        "the needle must matter to q head 1 ({dense_needle})"
    );
    assert!(results[0].0, "per-q-head selection keeps q head 1's needle");
    assert!(
        !results[1].0,
        "the group selection drops it (the case per-q-head fixes)"
    );
    assert!(results[0].1 > results[1].1 + 0.4);
    // The group mates' lists are not widened: the same budget per list.
    let (pq, gs) = (&results[0].2, &results[1].2);
    for hq in 0..g * hk {
        assert_eq!(pq.token_count(hq), gs.token_count(hq / g), "q head {hq}");
    }
}

#[test]
fn fast_estimator_combines_prefill_per_group_decode_per_q_head() {
    let (g, hk, d, n) = (3, 3, 64, 2000);
    let shape = AttnShape::new(g * hk, hk, d).unwrap();
    let mut rng = Rng::new(17);
    let k = rng.normal_vec(hk * n * d, 1.0);
    let v = rng.normal_vec(hk * n * d, 1.0);
    let kv = SeqView::from_contiguous(hk, d, n, &k, &v);
    let base = HipConfig {
        per_q_head: true,
        successors: 4,
        ..two_stage(32, 64, 1024, 8, 160)
    };
    let mut fast = HipPolicy::new(
        HipConfig {
            mask_estimator: MaskEstimatorChoice::Fast,
            ..base.clone()
        },
        &model(g, hk, d),
    )
    .unwrap();
    let mut refp = HipPolicy::new(base, &model(g, hk, d)).unwrap();
    // Prefill of the last 64 queries: per KV head (prefill stays per group).
    let qp = rng.normal_vec(64 * shape.q_elems(), 1.0);
    let pre = fast
        .select(&SelectRequest {
            seq: 1,
            shape,
            phase: Phase::Prefill,
            queries: &qp,
            q_start: n - 64,
            kv: &kv,
        })
        .unwrap();
    assert!(pre.blocks.iter().all(|b| b.heads.len() == hk));
    // Decode: per q head, and the same selection as with the reference
    // estimator (decode always runs the reference search).
    for pos in n - 20..n {
        let q = rng.normal_vec(shape.q_elems(), 1.0);
        let (kk, vv) = (prefix(&k, hk, n, d, pos + 1), prefix(&v, hk, n, d, pos + 1));
        let kvp = SeqView::from_contiguous(hk, d, pos + 1, &kk, &vv);
        let a = decode_select(&mut fast, shape, &q, &kvp, pos);
        let b = decode_select(&mut refp, shape, &q, &kvp, pos);
        assert_eq!(a.heads.len(), g * hk);
        assert_eq!(a, b, "pos {pos}");
    }
}

/// The engine (what the C ABI and SGLang's CPU path run) with a per-q-head
/// config: prefill then decode, outputs equal the f64 reference over the
/// selection a twin policy makes from the same inputs.
#[test]
fn engine_decode_per_q_head_equals_reference() {
    let (g, hk, d) = (3, 3, 64);
    let json = r#"{"model": {"n_layers": 1, "n_q_heads": 9, "n_kv_heads": 3, "head_dim": 64,
        "rope_theta": 10000.0, "max_position": 8192},
        "kv": {"page_size": 64, "dtype": "f32"}, "dense_layers": 0,
        "default": {"method": "hip", "sink": 8, "window": 32, "per_q_head": true, "successors": 2,
          "stages": [{"chunk_size": 2, "keep_tokens": 256, "refresh_interval": 4},
                     {"chunk_size": 1, "keep_tokens": 48, "refresh_interval": 1}],
          "block_size_q": 16, "q_stride": 1}}"#;
    let cfg = PolicyConfig::from_json(json).unwrap();
    let LayerPolicy::Hip(h) = cfg.layer_policy(0).clone() else {
        panic!("hip")
    };
    assert!(h.per_q_head);
    let shape = AttnShape::new(g * hk, hk, d).unwrap();
    let mut twin = HipPolicy::new(h, &cfg.model).unwrap();
    let mut eng = Engine::new(cfg).unwrap();
    eng.add_sequence(0).unwrap();
    let mut rng = Rng::new(41);
    let (pre, steps) = (700, 12);
    let te = hk * d;
    let k = rng.normal_vec((pre + steps) * te, 1.0);
    let v = rng.normal_vec((pre + steps) * te, 1.0);
    eng.append(
        0,
        0,
        &k[..pre * te],
        &v[..pre * te],
        Phase::Prefill,
        true,
        None,
    )
    .unwrap();
    let mut sparse_seen = false;
    for t in pre..pre + steps {
        eng.append(
            0,
            0,
            &k[t * te..(t + 1) * te],
            &v[t * te..(t + 1) * te],
            Phase::Decode,
            false,
            None,
        )
        .unwrap();
        let q = rng.normal_vec(shape.q_elems(), 1.0);
        let mut out = vec![f32::NAN; q.len()];
        eng.attend_decode(0, &[0], &q, &mut out).unwrap();
        // The same tokens in the reference's [h][t][d] layout.
        let n = t + 1;
        let per_head = |x: &[f32]| -> Vec<f32> {
            (0..hk)
                .flat_map(|h| (0..n).flat_map(move |i| (i * te + h * d)..(i * te + (h + 1) * d)))
                .map(|i| x[i])
                .collect()
        };
        let (kk, vv) = (per_head(&k), per_head(&v));
        let kv = SeqView::from_contiguous(hk, d, n, &kk, &vv);
        let sel = decode_select(&mut twin, shape, &q, &kv, t);
        assert_eq!(sel.heads.len(), g * hk);
        let r = reference::attend_f64(&shape, &q, &kv, Some(&sel), n);
        let e = rel_error(&out, &r);
        assert!(e <= 1e-5, "step {t}: engine vs reference {e}");
        let dense = reference::attend_f64(&shape, &q, &kv, None, n);
        sparse_seen |= rel_error(&out, &dense) > 1e-3;
    }
    assert!(sparse_seen);
}

#[test]
fn config_parses_defaults_off_and_offload_refuses() {
    let c =
        PolicyConfig::from_json(r#"{"default": {"method": "hip", "per_q_head": true}}"#).unwrap();
    let LayerPolicy::Hip(h) = c.layer_policy(5) else {
        panic!("hip")
    };
    assert!(h.per_q_head);
    assert!(!HipConfig::default().per_q_head);
    let e = PolicyConfig::from_json(
        r#"{"kv": {"device_cache_pages": 64}, "default": {"method": "hip", "per_q_head": true}}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("default.per_q_head") && e.contains("device_cache_pages"),
        "{e}"
    );
    // without per_q_head the same offload config is accepted
    PolicyConfig::from_json(r#"{"kv": {"device_cache_pages": 64}, "default": {"method": "hip"}}"#)
        .unwrap();
}
