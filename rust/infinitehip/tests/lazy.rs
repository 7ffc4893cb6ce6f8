//! LazyLLM: importance and keep sets against a brute-force reference, the
//! aux-cache plan's invariants over random importance sequences, and the
//! policy end to end through the Engine.

#![allow(clippy::needless_range_loop)]

use std::collections::HashMap;

use half::bf16;
use infinitehip::attention::{self, reference, rel_error, AttnShape};
use infinitehip::config::{
    KvConfig, LayerOverride, LayerPolicy, LazyConfig, LazyPoint, ModelShape,
};
use infinitehip::kv::{KvLayout, KvPool, KvRead, SeqView};
use infinitehip::policy::lazy::{importance, keep_count, top_k, LazyPlan, LazySingleLayer};
use infinitehip::policy::{Phase, Policy, SelectRequest, Selection};
use infinitehip::rng::Rng;
use infinitehip::workload::needle_seq;
use infinitehip::{DType, Engine, PolicyConfig};

const NQ: usize = 4;
const NKV: usize = 2;
const D: usize = 32;
const TE: usize = NKV * D;

fn points(p: &[(usize, f32)]) -> Vec<LazyPoint> {
    p.iter()
        .map(|&(layer, keep)| LazyPoint { layer, keep })
        .collect()
}

fn cfg(n_layers: usize, pts: &[(usize, f32)], dtype: DType) -> PolicyConfig {
    PolicyConfig {
        model: ModelShape {
            n_layers,
            n_q_heads: NQ,
            n_kv_heads: NKV,
            head_dim: D,
            ..ModelShape::default()
        },
        kv: KvConfig {
            page_size: 16,
            dtype,
            ..Default::default()
        },
        dense_layers: 0,
        default: LayerPolicy::Lazy(LazyConfig {
            points: points(pts),
        }),
        overrides: vec![],
    }
}

fn round(x: &[f32], dtype: DType) -> Vec<f32> {
    x.iter()
        .map(|&v| match dtype {
            DType::Bf16 => bf16::from_f32(v).to_f32(),
            DType::F16 => half::f16::from_f32(v).to_f32(),
            DType::F32 => v,
        })
        .collect()
}

/// f64 softmax over `tokens` of scale * q.k per q head, mean over q heads.
fn ref_importance(shape: &AttnShape, q: &[f32], kv: &dyn KvRead, tokens: &[u32]) -> Vec<f64> {
    let (g, d) = (shape.group(), shape.head_dim);
    let mut imp = vec![0f64; tokens.len()];
    let mut k = vec![0f32; d];
    for hq in 0..shape.n_q_heads {
        let qh = &q[hq * d..(hq + 1) * d];
        let logits: Vec<f64> = tokens
            .iter()
            .map(|&t| {
                kv.read_key(hq / g, t as usize, &mut k);
                qh.iter()
                    .zip(&k)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
                    * shape.scale as f64
            })
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
        for (i, l) in logits.iter().enumerate() {
            imp[i] += (l - m).exp() / z / shape.n_q_heads as f64;
        }
    }
    imp
}

/// Full sort: forced first, then importance descending, then later token.
fn ref_top_k<F: PartialOrd + Copy>(
    tokens: &[u32],
    imp: &[F],
    k: usize,
    force: Option<u32>,
) -> Vec<u32> {
    let mut idx: Vec<usize> = (0..tokens.len()).collect();
    idx.sort_by(|&a, &b| {
        let (fa, fb) = (Some(tokens[a]) == force, Some(tokens[b]) == force);
        fb.cmp(&fa)
            .then(imp[b].partial_cmp(&imp[a]).unwrap())
            .then(tokens[b].cmp(&tokens[a]))
    });
    let mut out: Vec<u32> = idx[..k.min(idx.len())].iter().map(|&i| tokens[i]).collect();
    out.sort_unstable();
    out
}

/// Gap between the k-th and (k+1)-th largest values, relative to the k-th:
/// below ~1e-5 the f32 and f64 rankings may legitimately differ.
fn boundary_gap(imp: &[f64], k: usize) -> f64 {
    if k == 0 || k >= imp.len() {
        return f64::INFINITY;
    }
    let mut s = imp.to_vec();
    s.sort_by(|a, b| b.partial_cmp(a).unwrap());
    (s[k - 1] - s[k]) / s[k - 1].max(1e-300)
}

#[test]
fn keep_count_is_ceil_of_fraction_of_full_prompt() {
    assert_eq!(keep_count(1.0, 37), 37);
    assert_eq!(keep_count(0.9, 10), 9);
    assert_eq!(keep_count(0.7, 10), 7);
    assert_eq!(keep_count(0.3, 10), 3); // 0.3f32 is 0.30000001
    assert_eq!(keep_count(0.25, 7), 2);
    assert_eq!(keep_count(0.5, 9), 5);
    assert_eq!(keep_count(1e-9, 5), 1);
    assert_eq!(keep_count(0.5, 0), 0);
}

#[test]
fn importance_and_top_k_match_bruteforce() {
    let mut rng = Rng::new(11);
    let (mut checked, mut skipped) = (0, 0);
    for trial in 0..60 {
        let (nq, nkv, d) = [(4, 4, 16), (8, 2, 32), (6, 1, 64), (4, 2, 128)][trial % 4];
        let shape = AttnShape::new(nq, nkv, d).unwrap();
        let len = 1 + rng.below(300);
        let k = rng.normal_vec(nkv * len * d, 1.0);
        let v = vec![0f32; k.len()];
        let view = SeqView::from_contiguous(nkv, d, len, &k[..], &v[..]);
        // Peaky and flat queries.
        let qs = [0.2, 1.0, 3.0][trial % 3];
        let q = rng.normal_vec(nq * d, qs);
        let tokens: Vec<u32> = (0..len as u32).filter(|_| rng.uniform() < 0.7).collect();
        let got = importance(&shape, &q, &view, &tokens).unwrap();
        let want = ref_importance(&shape, &q, &view, &tokens);
        assert_eq!(got.len(), tokens.len());
        if tokens.is_empty() {
            continue;
        }
        let max = want.iter().cloned().fold(0.0, f64::max);
        for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a as f64 - b).abs() <= 1e-5 * max,
                "trial {trial} token {}: {a} vs {b}",
                tokens[i]
            );
        }
        let sum: f64 = got.iter().map(|&x| x as f64).sum();
        assert!((sum - 1.0).abs() < 1e-4, "probabilities sum to {sum}");
        for frac in [1.0f32, 0.6, 0.25, 0.01] {
            let kk = keep_count(frac, tokens.len());
            let force = tokens.last().copied();
            // Same importances: the selection must be identical.
            assert_eq!(
                top_k(&tokens, &got, kk, force),
                ref_top_k(&tokens, &got, kk, force),
                "trial {trial} keep {frac}"
            );
            // Against the f64 ranking unless the boundary is a near-tie.
            let force_i = tokens.len() - 1;
            let mut w = want.clone();
            w[force_i] = 2.0 * max; // forced: ranks first
            if boundary_gap(&w, kk) < 1e-5 {
                skipped += 1;
                continue;
            }
            checked += 1;
            assert_eq!(
                top_k(&tokens, &got, kk, force),
                ref_top_k(&tokens, &want, kk, force),
                "trial {trial} keep {frac} vs f64 ranking"
            );
        }
    }
    assert!(
        checked > 10 * skipped.max(1),
        "checked {checked}, skipped {skipped}"
    );
}

#[test]
fn top_k_ties_and_force_are_deterministic() {
    let mut rng = Rng::new(5);
    for _ in 0..200 {
        let n = 1 + rng.below(60);
        let tokens: Vec<u32> = (0..n as u32).map(|t| t * 2 + 1).collect();
        // Few distinct values: many ties.
        let imp: Vec<f32> = (0..n).map(|_| rng.below(4) as f32).collect();
        let k = rng.below(n + 2);
        let force = if rng.uniform() < 0.5 {
            Some(tokens[rng.below(n)])
        } else {
            None
        };
        let got = top_k(&tokens, &imp, k, force);
        assert_eq!(got, ref_top_k(&tokens, &imp, k, force));
        assert_eq!(got.len(), k.min(n));
        if let Some(f) = force {
            if k > 0 {
                assert!(got.contains(&f));
            }
        }
    }
}

/// Random importances for the plan tests: uniform, heavy-tailed or tied.
fn random_importance(rng: &mut Rng, n: usize, mode: usize) -> Vec<f32> {
    (0..n)
        .map(|_| match mode {
            0 => rng.uniform(),
            1 => (rng.normal() * 3.0).exp(),
            _ => rng.below(3) as f32,
        })
        .collect()
}

fn random_points(rng: &mut Rng, n_layers: usize) -> Vec<LazyPoint> {
    let mut pts = Vec::new();
    let mut keep = 1.0f32;
    for l in 0..n_layers - 1 {
        if rng.uniform() < 0.5 {
            keep *= 0.3 + 0.7 * rng.uniform();
            pts.push(LazyPoint { layer: l, keep });
        }
    }
    pts
}

/// A simulated engine drives the plan: every hidden state is tracked as
/// (token, layers applied), so a row computed from the wrong input, twice,
/// or with a missing key fails.
#[test]
fn aux_cache_plan_invariants_over_random_importance() {
    let mut rng = Rng::new(2024);
    let (mut revived_total, mut pruned_total) = (0u64, 0u64);
    for trial in 0..150 {
        let n_layers = 2 + rng.below(7);
        let pts = random_points(&mut rng, n_layers);
        let mut plan = LazyPlan::new(n_layers, &pts).unwrap();
        let mode = trial % 3;
        // count[t][l]: times (t, l) was computed; kv[t][l] follows.
        let mut count: Vec<Vec<u8>> = Vec::new();
        let mut aux_sim: HashMap<u32, usize> = HashMap::new();
        let mut steps: Vec<(usize, Phase)> = vec![(1 + rng.below(60), Phase::Prefill)];
        if rng.uniform() < 0.3 {
            steps.push((1 + rng.below(20), Phase::Prefill));
        }
        steps.extend((0..rng.below(12)).map(|_| (1, Phase::Decode)));
        for (n_new, phase) in steps {
            let first_new = plan.len() as u32;
            plan.begin_step(n_new, phase).unwrap();
            count.extend((0..n_new).map(|_| vec![0u8; n_layers]));
            let len = plan.len() as u32;
            // Running batch: token -> layers applied to its hidden state.
            let mut batch: HashMap<u32, usize> = HashMap::new();
            let mut prev_attend: Option<Vec<u32>> = None;
            let mut pruned_here: Vec<u32> = Vec::new();
            for l in 0..n_layers {
                let lp = plan.layer(l).unwrap();
                assert_eq!(lp.layer, l);
                // Nested: the active set never grows inside a step.
                if let Some(prev) = &prev_attend {
                    assert!(lp.attend.iter().all(|t| prev.binary_search(t).is_ok()));
                    assert!(pruned_here
                        .iter()
                        .all(|t| lp.attend.binary_search(t).is_err()));
                } else {
                    assert_eq!(
                        lp.attend,
                        (0..len).collect::<Vec<_>>(),
                        "every token starts active"
                    );
                }
                // Generated tokens are never pruned.
                for t in 0..len {
                    if !plan.is_prompt(t) {
                        assert!(
                            lp.attend.binary_search(&t).is_ok(),
                            "generated token {t} pruned"
                        );
                    }
                }
                // Rows not continuing are gone from the batch.
                let continuing: Vec<u32> = lp
                    .compute
                    .iter()
                    .copied()
                    .filter(|t| lp.from_aux.binary_search(t).is_err())
                    .collect();
                let mut b: Vec<u32> = batch.keys().copied().collect();
                b.sort_unstable();
                if l > 0 {
                    assert_eq!(continuing, b, "trial {trial} layer {l}: batch rows");
                } else {
                    assert!(lp.from_aux.is_empty());
                    assert_eq!(
                        lp.compute,
                        (first_new..len).collect::<Vec<_>>(),
                        "layer 0 computes the new tokens"
                    );
                }
                for &t in &lp.from_aux {
                    // Resumes at the layer after the one it was pruned at.
                    assert_eq!(
                        aux_sim.remove(&t),
                        Some(l - 1),
                        "trial {trial}: token {t} at layer {l}"
                    );
                    assert!(t < first_new, "a new token cannot come from the aux cache");
                    batch.insert(t, l);
                }
                for &t in &continuing {
                    let depth = if l == 0 { 0 } else { batch[&t] };
                    assert_eq!(depth, l, "token {t} input is not layer {l}'s");
                    batch.insert(t, l);
                }
                for &t in &lp.compute {
                    assert!(
                        lp.attend.binary_search(&t).is_ok(),
                        "computed but not active"
                    );
                    count[t as usize][l] += 1;
                    assert_eq!(
                        count[t as usize][l], 1,
                        "trial {trial}: ({t}, {l}) computed twice"
                    );
                    *batch.get_mut(&t).unwrap() = l + 1;
                }
                // Every attended key exists at this layer now.
                for &t in &lp.attend {
                    assert_eq!(count[t as usize][l], 1, "key {t} missing at layer {l}");
                }
                pruned_here.clear();
                if plan.is_point(l) {
                    let imp = random_importance(&mut rng, lp.attend.len(), mode);
                    let pr = plan.prune_top(l, &imp).unwrap();
                    let n_active_prompt = lp.attend.iter().filter(|&&t| plan.is_prompt(t)).count();
                    let want = keep_count(plan.point(l).unwrap().keep, plan.n_prompt())
                        .min(n_active_prompt);
                    assert_eq!(pr.keep.len(), want);
                    if phase == Phase::Prefill {
                        assert!(
                            pr.keep.contains(&(len - 1)),
                            "the step's last token is kept"
                        );
                    }
                    let keep_set: std::collections::HashSet<u32> =
                        pr.keep.iter().copied().collect();
                    pruned_here = lp
                        .attend
                        .iter()
                        .copied()
                        .filter(|&t| plan.is_prompt(t) && !keep_set.contains(&t))
                        .collect();
                    pruned_total += pruned_here.len() as u64;
                    for &t in &pruned_here {
                        let in_batch = batch.remove(&t).is_some();
                        assert_eq!(
                            pr.to_aux.contains(&t),
                            in_batch && l + 1 < n_layers,
                            "token {t} pruned at {l}: stored iff computed here"
                        );
                        if pr.to_aux.contains(&t) {
                            assert!(aux_sim.insert(t, l).is_none(), "token {t} had an aux entry");
                        }
                    }
                }
                prev_attend = Some(lp.attend);
            }
            plan.end_step().unwrap();
            // Finished rows leave the batch.
            for (t, depth) in batch {
                assert_eq!(
                    depth, n_layers,
                    "token {t} left the step mid-way without an aux entry"
                );
            }
            // Computed layers are a prefix; the aux entry is its last layer.
            for t in 0..len {
                let c = count[t as usize].iter().take_while(|&&x| x == 1).count();
                assert!(count[t as usize][c..].iter().all(|&x| x == 0));
                assert_eq!(plan.computed_layers(t), Some(c));
                let want_aux = (c > 0 && c < n_layers).then(|| c - 1);
                assert_eq!(plan.aux_layer(t), want_aux, "token {t}");
                assert_eq!(aux_sim.get(&t).copied(), want_aux);
            }
        }
        let st = plan.stats();
        let total: u64 = count.iter().flatten().map(|&x| x as u64).sum();
        assert_eq!(st.computed_rows, total);
        assert!(
            st.computed_rows <= st.dense_rows,
            "never more work than dense"
        );
        assert_eq!(st.dense_rows, plan.len() as u64 * n_layers as u64);
        revived_total += st.revived;
    }
    assert!(
        pruned_total > 1000 && revived_total > 100,
        "pruned {pruned_total}, revived {revived_total}"
    );
}

#[test]
fn plan_rejects_misuse() {
    let mut plan = LazyPlan::new(4, &points(&[(1, 0.5)])).unwrap();
    assert!(plan.layer(0).is_err(), "outside a step");
    plan.begin_step(8, Phase::Prefill).unwrap();
    let e = plan.layer(2).unwrap_err().to_string();
    assert!(e.contains("skips pruning point at layer 1"), "{e}");
    plan.layer(1).unwrap();
    assert!(plan
        .layer(2)
        .unwrap_err()
        .to_string()
        .contains("before pruning point 1"));
    // Not a subset / not ascending / wrong length.
    assert!(plan.prune(1, &[3, 2]).is_err());
    assert!(plan.prune(1, &[9]).is_err());
    assert!(plan.prune_top(1, &[1.0; 3]).is_err());
    assert!(plan
        .prune_top(1, &[f32::NAN; 8])
        .unwrap_err()
        .to_string()
        .contains("NaN"));
    plan.prune(1, &[0, 7]).unwrap();
    assert_eq!(plan.active(), Some(&[0u32, 7][..]));
    assert!(plan.layer(1).is_err(), "layer 1 again");
    assert!(
        plan.begin_step(1, Phase::Decode).is_err(),
        "step in progress"
    );
    plan.end_step().unwrap();
    assert_eq!(plan.computed_layers(3), Some(2));
    assert_eq!(plan.aux_layer(3), Some(1));
    assert_eq!(plan.computed_layers(7), Some(4));
    assert!(LazyPlan::new(4, &points(&[(2, 0.5), (1, 0.4)])).is_err());
    assert!(LazyPlan::new(4, &points(&[(1, 0.5), (2, 0.6)])).is_err());
    assert!(LazyPlan::new(4, &points(&[(4, 0.5)])).is_err());
}

/// Brute-force LazyLLM over one sequence's stored K/V (per layer).
struct RefSeq {
    len: usize,
    prompt: usize,
}

/// One forward step through the engine and the brute force side by side:
/// per layer append K/V, attend, compare outputs and keep sets.
#[allow(clippy::too_many_arguments)]
fn step_and_compare(
    eng: &mut Engine,
    refs: &mut [KvPool<f32>],
    seqs: &[u64],
    rseq: &mut [RefSeq],
    n_new: &[usize],
    phase: Phase,
    pts: &[LazyPoint],
    dtype: DType,
    rng: &mut Rng,
    bound: f64,
    check_sets: bool,
) {
    let shape = eng.shape();
    let qe = shape.q_elems();
    let n_layers = eng.n_layers();
    for (r, &n) in rseq.iter_mut().zip(n_new) {
        r.len += n;
        if phase == Phase::Prefill {
            r.prompt += n;
        }
    }
    let mut active: Vec<Vec<u32>> = rseq.iter().map(|r| (0..r.len as u32).collect()).collect();
    for l in 0..n_layers {
        let mut qs = Vec::new();
        for (i, &s) in seqs.iter().enumerate() {
            let k = rng.normal_vec(n_new[i] * TE, 1.0);
            let v = rng.normal_vec(n_new[i] * TE, 1.0);
            eng.append(l, s, &k, &v, phase, phase == Phase::Prefill, None)
                .unwrap();
            refs[l]
                .append(s, &round(&k, dtype), &round(&v, dtype))
                .unwrap();
            qs.push(rng.normal_vec(n_new[i] * qe, 1.0));
        }
        let mut outs = Vec::new();
        if phase == Phase::Prefill {
            for (i, &s) in seqs.iter().enumerate() {
                let mut o = vec![f32::NAN; qs[i].len()];
                eng.attend_prefill(l, s, &qs[i], &mut o).unwrap();
                outs.push(o);
            }
        } else {
            let q: Vec<f32> = qs.concat();
            let mut o = vec![f32::NAN; q.len()];
            eng.attend_decode(l, seqs, &q, &mut o).unwrap();
            outs = o.chunks(qe).map(|c| c.to_vec()).collect();
        }
        for (i, &s) in seqs.iter().enumerate() {
            let view = refs[l].view(s).unwrap();
            let r = &rseq[i];
            let n = n_new[i];
            let sel = Selection::from_tokens(&vec![active[i].clone(); NKV]);
            let want = reference::prefill_f64(
                &shape,
                &qs[i],
                r.len - n,
                &view,
                Some((std::slice::from_ref(&sel), n)),
            );
            let err = rel_error(&outs[i], &want);
            assert!(err <= bound, "seq {s} layer {l} {phase:?}: rel err {err}");
            if let Some(p) = pts.iter().find(|p| p.layer == l) {
                let q_last = &qs[i][(n - 1) * qe..n * qe];
                let imp = ref_importance(&shape, q_last, &view, &active[i]);
                let (toks, ip): (Vec<u32>, Vec<f64>) = active[i]
                    .iter()
                    .zip(&imp)
                    .filter(|(&t, _)| (t as usize) < r.prompt)
                    .map(|(&t, &x)| (t, x))
                    .unzip();
                let k = keep_count(p.keep, r.prompt).min(toks.len());
                let last = r.len as u32 - 1;
                let keep = ref_top_k(&toks, &ip, k, Some(last));
                if check_sets {
                    let mut ipf = ip.clone();
                    if let Some(j) = toks.iter().position(|&t| t == last) {
                        ipf[j] = 2.0 * imp.iter().cloned().fold(0.0, f64::max);
                    }
                    assert!(boundary_gap(&ipf, k) > 1e-5, "near-tie: pick another seed");
                    assert_eq!(
                        eng.lazy().unwrap().keep_set(s, l + 1).unwrap(),
                        keep,
                        "seq {s} keep set after layer {l} ({phase:?})"
                    );
                }
                active[i] = keep
                    .into_iter()
                    .chain(r.prompt as u32..r.len as u32)
                    .collect();
                active[i].sort_unstable();
            }
        }
    }
}

fn ref_pools(n_layers: usize, seqs: &[u64]) -> Vec<KvPool<f32>> {
    (0..n_layers)
        .map(|_| {
            let mut p = KvPool::<f32>::new(
                KvLayout {
                    n_kv_heads: NKV,
                    head_dim: D,
                    page_size: 16,
                },
                None,
            )
            .unwrap();
            for &s in seqs {
                p.add_sequence(s).unwrap();
            }
            p
        })
        .collect()
}

#[test]
fn keep_fraction_one_equals_dense() {
    for dtype in [DType::F32, DType::Bf16] {
        let pts = [(0, 1.0), (1, 1.0)];
        let mut eng = Engine::new(cfg(3, &pts, dtype)).unwrap();
        let seqs = [1u64, 2];
        for &s in &seqs {
            eng.add_sequence(s).unwrap();
        }
        let mut refs = ref_pools(3, &seqs);
        let mut rseq = vec![RefSeq { len: 0, prompt: 0 }, RefSeq { len: 0, prompt: 0 }];
        let mut rng = Rng::new(7);
        // The reference reads the same stored (dtype-rounded) K/V: only f32
        // accumulation differs (~1e-6), in every dtype.
        let bound = 1e-5;
        // Brute force with no points = dense attention over every token.
        step_and_compare(
            &mut eng,
            &mut refs,
            &seqs,
            &mut rseq,
            &[45, 70],
            Phase::Prefill,
            &[],
            dtype,
            &mut rng,
            bound,
            false,
        );
        for _ in 0..4 {
            step_and_compare(
                &mut eng,
                &mut refs,
                &seqs,
                &mut rseq,
                &[1, 1],
                Phase::Decode,
                &[],
                dtype,
                &mut rng,
                bound,
                false,
            );
        }
        let lz = eng.lazy().unwrap();
        assert_eq!(lz.keep_set(2, 2).unwrap().len(), 70);
        let st = lz.stats(1).unwrap();
        // Step 5's rows are counted when step 6 starts; 4 finished steps.
        assert_eq!(st.steps, 4);
        assert_eq!(st.revived, 0);
    }
}

#[test]
fn engine_matches_bruteforce_lazyllm() {
    for dtype in [DType::F32, DType::Bf16] {
        let pts = points(&[(0, 0.6), (2, 0.3)]);
        let pp: Vec<(usize, f32)> = pts.iter().map(|p| (p.layer, p.keep)).collect();
        let mut eng = Engine::new(cfg(4, &pp, dtype)).unwrap();
        let seqs = [3u64, 9];
        for &s in &seqs {
            eng.add_sequence(s).unwrap();
        }
        let mut refs = ref_pools(4, &seqs);
        let mut rseq = vec![RefSeq { len: 0, prompt: 0 }, RefSeq { len: 0, prompt: 0 }];
        let mut rng = Rng::new(99);
        // The reference reads the same stored (dtype-rounded) K/V: only f32
        // accumulation differs (~1e-6), in every dtype.
        let bound = 1e-5;
        step_and_compare(
            &mut eng,
            &mut refs,
            &seqs,
            &mut rseq,
            &[48, 33],
            Phase::Prefill,
            &pts,
            dtype,
            &mut rng,
            bound,
            true,
        );
        let lz = eng.lazy().unwrap().clone();
        assert_eq!(lz.keep_set(3, 1).unwrap().len(), 29); // ceil(0.6 * 48)
        assert_eq!(lz.keep_set(3, 3).unwrap().len(), 15); // ceil(0.3 * 48)
        assert_eq!(lz.keep_set(9, 3).unwrap().len(), 10); // ceil(0.3 * 33)
                                                          // Rows a hook would compute in this prefill: every token at layer 0,
                                                          // the 60% set at layers 1 and 2, the 30% set at layer 3.
        let st = lz.stats(3).unwrap();
        assert_eq!(st.prompt_rows, 48 + 29 + 29 + 15);
        assert_eq!(st.aux_stores, (48 - 29) + (29 - 15));
        for _ in 0..6 {
            step_and_compare(
                &mut eng,
                &mut refs,
                &seqs,
                &mut rseq,
                &[1, 1],
                Phase::Decode,
                &pts,
                dtype,
                &mut rng,
                bound,
                true,
            );
        }
        // A hook following the plan computes fewer rows than dense, and
        // decode steps revived prompt tokens pruned earlier.
        for &s in &seqs {
            let st = lz.stats(s).unwrap();
            assert!(st.computed_rows < st.dense_rows, "{st:?}");
            assert!(st.revived > 0, "{st:?}");
        }
        let lp = lz.last_layer_plan(3).unwrap();
        assert_eq!(lp.layer, 3);
        eng.free_sequence(3).unwrap();
        assert!(lz.stats(3).is_none());
    }
}

#[test]
fn planted_token_is_always_kept() {
    let n_layers = 4;
    let pts = [(0, 0.1), (2, 0.05)];
    let qe = NQ * D;
    for seed in 0..3u64 {
        let mut eng = Engine::new(cfg(n_layers, &pts, DType::Bf16)).unwrap();
        let mut rng = Rng::new(100 + seed);
        // Per layer and q head a unit direction u that every query leans on.
        let u: Vec<Vec<f32>> = (0..n_layers)
            .map(|_| {
                let mut v = rng.normal_vec(NQ * D, 1.0);
                for h in v.chunks_mut(D) {
                    let n = h.iter().map(|x| x * x).sum::<f32>().sqrt();
                    h.iter_mut().for_each(|x| *x /= n);
                }
                v
            })
            .collect();
        let p = 200;
        let planted = rng.below(p - 1);
        eng.add_sequence(1).unwrap();
        let query = |rng: &mut Rng, l: usize, n: usize| -> Vec<f32> {
            (0..n * qe)
                .map(|i| 3.0 * u[l][i % qe] + 0.3 * rng.normal())
                .collect()
        };
        for step in 0..8 {
            let (n, phase) = if step == 0 {
                (p, Phase::Prefill)
            } else {
                (1, Phase::Decode)
            };
            for l in 0..n_layers {
                let mut k = rng.normal_vec(n * TE, 1.0);
                if step == 0 {
                    // Its key is 20 u for each KV head (mean of the group's u).
                    for h in 0..NKV {
                        for dd in 0..D {
                            let m = (0..NQ / NKV)
                                .map(|j| u[l][(h * (NQ / NKV) + j) * D + dd])
                                .sum::<f32>();
                            k[planted * TE + h * D + dd] = 20.0 * m / (NQ / NKV) as f32;
                        }
                    }
                }
                let v = rng.normal_vec(n * TE, 1.0);
                eng.append(l, 1, &k, &v, phase, true, None).unwrap();
                let q = query(&mut rng, l, n);
                let mut o = vec![0f32; q.len()];
                if phase == Phase::Prefill {
                    eng.attend_prefill(l, 1, &q, &mut o).unwrap();
                } else {
                    eng.attend_decode(l, &[1], &q, &mut o).unwrap();
                }
                assert!(o.iter().all(|x| x.is_finite()));
            }
            let lz = eng.lazy().unwrap();
            for l in [1, 3] {
                let ks = lz.keep_set(1, l).unwrap();
                assert_eq!(ks.len(), if l == 1 { 20 } else { 10 });
                assert!(
                    ks.contains(&(planted as u32)),
                    "seed {seed} step {step}: planted {planted} pruned before layer {l}"
                );
            }
        }
    }
}

#[test]
fn nan_query_is_an_error_not_a_selection() {
    let mut eng = Engine::new(cfg(3, &[(1, 0.5)], DType::F32)).unwrap();
    eng.add_sequence(1).unwrap();
    let mut rng = Rng::new(1);
    let n = 20;
    let qe = NQ * D;
    for l in 0..2 {
        let k = rng.normal_vec(n * TE, 1.0);
        eng.append(l, 1, &k, &k, Phase::Prefill, true, None)
            .unwrap();
    }
    let q = rng.normal_vec(n * qe, 1.0);
    let mut o = vec![0f32; q.len()];
    eng.attend_prefill(0, 1, &q, &mut o).unwrap();
    let mut bad = q.clone();
    bad[(n - 1) * qe + 3] = f32::NAN;
    let e = eng
        .attend_prefill(1, 1, &bad, &mut o)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lazy layer 1") && e.contains("importance"),
        "{e}"
    );
    // Layers out of order within a step are refused.
    let k = rng.normal_vec(TE, 1.0);
    for l in 0..3 {
        eng.append(l, 1, &k, &k, Phase::Decode, false, None)
            .unwrap();
    }
    let q1 = rng.normal_vec(qe, 1.0);
    let mut o1 = vec![0f32; qe];
    eng.attend_decode(2, &[1], &q1, &mut o1).unwrap_err();
    eng.attend_decode(0, &[1], &q1, &mut o1).unwrap();
    eng.attend_decode(1, &[1], &q1, &mut o1).unwrap();
    eng.attend_decode(1, &[1], &q1, &mut o1).unwrap(); // the same layer again
    let e = eng
        .attend_decode(0, &[1], &q1, &mut o1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("out of order"), "{e}");
}

#[test]
fn config_errors_name_the_field() {
    let base = |pts: &str, extra: &str| {
        format!(
            r#"{{"model": {{"n_layers": 8}}, "dense_layers": 0, "default": {{"method": "lazy", "points": {pts}}}{extra}}}"#
        )
    };
    let cases = [
        (
            base(
                r#"[{"layer": 4, "keep": 0.9}, {"layer": 2, "keep": 0.8}]"#,
                "",
            ),
            "default.points[1].layer",
        ),
        (
            base(
                r#"[{"layer": 4, "keep": 0.9}, {"layer": 4, "keep": 0.8}]"#,
                "",
            ),
            "default.points[1].layer",
        ),
        (
            base(r#"[{"layer": 2, "keep": 0.0}]"#, ""),
            "default.points[0].keep",
        ),
        (
            base(r#"[{"layer": 2, "keep": 1.5}]"#, ""),
            "default.points[0].keep",
        ),
        (
            base(r#"[{"layer": 2, "keep": -0.1}]"#, ""),
            "default.points[0].keep",
        ),
        (
            base(
                r#"[{"layer": 2, "keep": 0.5}, {"layer": 3, "keep": 0.6}]"#,
                "",
            ),
            "default.points[1].keep",
        ),
        (
            base(r#"[{"layer": 7, "keep": 0.5}]"#, ""),
            "default.points[0].layer",
        ),
        (
            base(r#"[{"layer": 9, "keep": 0.5}]"#, ""),
            "default.points[0].layer",
        ),
        (
            base(r#"[{"layer": 2, "keep": 0.5}]"#, r#", "dense_layers": 3"#)
                .replace(r#""dense_layers": 0, "#, ""),
            "default.points[0].layer",
        ),
        (
            base(
                r#"[{"layer": 2, "keep": 0.5}]"#,
                r#", "overrides": [{"layers": [2], "policy": {"method": "dense"}}]"#,
            ),
            "default.points[0].layer",
        ),
        (
            base(
                r#"[{"layer": 2, "keep": 0.5}]"#,
                r#", "overrides": [{"layers": [5], "policy": {"method": "lazy", "points": [{"layer": 3, "keep": 0.5}]}}]"#,
            ),
            "overrides[0].policy.points",
        ),
        (base(r#"[{"layer": 2, "kept": 0.5}]"#, ""), "kept"),
    ];
    for (json, field) in cases {
        let err = PolicyConfig::from_json(&json).unwrap_err().to_string();
        assert!(
            err.contains(field),
            "{json}: error `{err}` does not name `{field}`"
        );
    }
    // The documented default points validate on the default (32-layer) model.
    PolicyConfig::from_json(r#"{"default": {"method": "lazy"}}"#).unwrap();
    // Valid: a lazy layer set that includes its pruning layers, mixed with dense.
    let ok = cfg(8, &[(2, 0.5), (5, 0.2)], DType::Bf16);
    Engine::new(ok.clone()).unwrap();
    let mut mixed = ok;
    mixed.overrides = vec![LayerOverride {
        layers: vec![7],
        policy: LayerPolicy::Dense,
    }];
    let eng = Engine::new(mixed).unwrap();
    assert!(eng.lazy().is_some());
    assert!(Engine::new(PolicyConfig::default())
        .unwrap()
        .lazy()
        .is_none());
}

fn decode_req<'a>(shape: AttnShape, q: &'a [f32], kv: &'a dyn KvRead) -> SelectRequest<'a> {
    SelectRequest {
        seq: 0,
        shape,
        phase: Phase::Decode,
        queries: q,
        q_start: kv.len() - 1,
        kv,
    }
}

#[test]
fn single_layer_policy_matches_bruteforce_and_keeps_the_needle() {
    let shape = AttnShape::new(8, 2, 64).unwrap();
    let mut w = needle_seq::<bf16>(shape, 4096, 16, 0, 0, 64, 3).unwrap();
    let mut pol = LazySingleLayer::new(0.05).unwrap();
    let mut rng = Rng::new(1);
    // The first call's last token is the new one; the 4095 before it are the prompt.
    let prompt = 4095u32;
    for step in 0..4 {
        let q = w.query(&mut rng);
        let view = w.pool.view(0).unwrap();
        let len = view.len() as u32;
        let out = pol.select(&decode_req(shape, &q, &view)).unwrap();
        assert_eq!(out.blocks.len(), 1);
        let sel = &out.blocks[0];
        assert_eq!(w.recall(sel), 1.0, "step {step}");
        let all: Vec<u32> = (0..len).collect();
        let imp = ref_importance(&shape, &q, &view, &all);
        let k = keep_count(0.05, prompt as usize);
        assert_eq!(k, 205);
        assert!(boundary_gap(&imp[..prompt as usize], k) > 1e-5);
        let keep = ref_top_k(&all[..prompt as usize], &imp[..prompt as usize], k, None);
        let want: Vec<u32> = keep.into_iter().chain(prompt..len).collect();
        assert_eq!(*sel, Selection::from_tokens(&vec![want; 2]), "step {step}");
        drop(view);
        w.append_random(&mut rng).unwrap();
    }
    let st = pol.shared().stats(0).unwrap();
    assert_eq!(st.steps, 3);
}

/// Decode at Llama shape: dense vs importance + attention over the kept 10%.
/// `cargo test -p infinitehip --test lazy -- --ignored --nocapture`
#[test]
#[ignore]
fn single_layer_decode_throughput() {
    let shape = AttnShape::new(32, 8, 128).unwrap();
    let t = 131072;
    let mut w = needle_seq::<bf16>(shape, t, 64, 128, 1024, 64, 5).unwrap();
    let mut pol = LazySingleLayer::new(0.1).unwrap();
    let mut rng = Rng::new(2);
    let (mut dense_ms, mut sel_ms, mut imp_ms, mut attn_ms) = (0f64, 0f64, 0f64, 0f64);
    let (mut err, mut recall) = (0f64, 0f64);
    let steps = 5;
    for _ in 0..steps {
        let q = w.query(&mut rng);
        let view = w.pool.view(0).unwrap();
        let mut dense = vec![0f32; q.len()];
        let t0 = std::time::Instant::now();
        attention::decode(&shape, &q, std::slice::from_ref(&view), None, &mut dense).unwrap();
        dense_ms += t0.elapsed().as_secs_f64() * 1e3;
        let t0 = std::time::Instant::now();
        let sel = pol
            .select(&decode_req(shape, &q, &view))
            .unwrap()
            .blocks
            .swap_remove(0);
        sel_ms += t0.elapsed().as_secs_f64() * 1e3;
        let all: Vec<u32> = (0..view.len() as u32).collect();
        let t0 = std::time::Instant::now();
        importance(&shape, &q, &view, &all).unwrap();
        imp_ms += t0.elapsed().as_secs_f64() * 1e3;
        let mut ours = vec![0f32; q.len()];
        let t0 = std::time::Instant::now();
        attention::decode(
            &shape,
            &q,
            std::slice::from_ref(&view),
            Some(std::slice::from_ref(&sel)),
            &mut ours,
        )
        .unwrap();
        attn_ms += t0.elapsed().as_secs_f64() * 1e3;
        let d64: Vec<f64> = dense.iter().map(|&x| x as f64).collect();
        err = err.max(rel_error(&ours, &d64));
        recall += w.recall(&sel);
        drop(view);
        w.append_random(&mut rng).unwrap();
    }
    let s = steps as f64;
    println!(
        "lazy single layer T={t} keep 0.1: dense {:.2} ms, select (importance + plan) {:.2} ms (importance alone {:.2} ms), attention over kept {:.2} ms, max rel err {err:.4}, needle recall {:.3}",
        dense_ms / s,
        sel_ms / s,
        imp_ms / s,
        attn_ms / s,
        recall / s
    );
}
