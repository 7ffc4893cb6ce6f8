//! Squeezed Attention: k-means, two-level lookup, threshold calibration,
//! dense equivalence through the engine, planted needles, fork reuse, config
//! errors.

use half::bf16;
use infinitehip::attention::{self, reference, rel_error, AttnShape};
use infinitehip::config::{KvConfig, LayerPolicy, ModelShape, SqueezeConfig, SqueezePool};
use infinitehip::kmeans::{assign, kmeans, kmeans_pp_init, normalized, KMeansParams};
use infinitehip::kv::{KvLayout, KvPool, SeqView};
use infinitehip::policy::squeeze::{pooled_probs, HeadIndex, SqueezePolicy, Thresholds};
use infinitehip::policy::{InsertInfo, Phase, Policy, SelectRequest, Selection};
use infinitehip::rng::Rng;
use infinitehip::{DType, Engine, PolicyConfig};

/// Head-major K/V `[head][token][dim]` held outside a pool.
struct Kv {
    hkv: usize,
    d: usize,
    len: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Kv {
    fn random(hkv: usize, d: usize, len: usize, rng: &mut Rng) -> Kv {
        Kv {
            hkv,
            d,
            len,
            k: rng.normal_vec(hkv * len * d, 1.0),
            v: rng.normal_vec(hkv * len * d, 1.0),
        }
    }
    fn view(&self) -> SeqView<'_, f32> {
        SeqView::from_contiguous(self.hkv, self.d, self.len, &self.k, &self.v)
    }
    fn key_mut(&mut self, h: usize, t: usize) -> &mut [f32] {
        let o = (h * self.len + t) * self.d;
        &mut self.k[o..o + self.d]
    }
}

fn model(d: usize) -> ModelShape {
    ModelShape {
        n_layers: 1,
        n_q_heads: 4,
        n_kv_heads: 2,
        head_dim: d,
        ..ModelShape::default()
    }
}

fn req<'a>(
    seq: u64,
    shape: AttnShape,
    phase: Phase,
    q: &'a [f32],
    q_start: usize,
    kv: &'a SeqView<'a, f32>,
) -> SelectRequest<'a> {
    SelectRequest {
        seq,
        shape,
        phase,
        queries: q,
        q_start,
        kv,
    }
}

/// Seal `seq`'s prefix (the first `prefix` tokens of `kv`) and feed the
/// observation window's queries through a prefill select.
fn seal_and_calibrate(
    pol: &mut SqueezePolicy,
    seq: u64,
    shape: AttnShape,
    kv: &Kv,
    prefix: usize,
    calib: &[f32],
) {
    let pk = Kv {
        hkv: kv.hkv,
        d: kv.d,
        len: prefix,
        k: (0..kv.hkv)
            .flat_map(|h| kv.k[h * kv.len * kv.d..(h * kv.len + prefix) * kv.d].to_vec())
            .collect(),
        v: (0..kv.hkv)
            .flat_map(|h| kv.v[h * kv.len * kv.d..(h * kv.len + prefix) * kv.d].to_vec())
            .collect(),
    };
    let view = pk.view();
    let ins = InsertInfo {
        seq,
        shape,
        phase: Phase::Prefill,
        start: 0,
        q: &[],
        k: &[],
        v: &[],
        kv: &view,
        prompt_done: true,
    };
    assert_eq!(pol.after_append(&ins).unwrap(), None);
    let w = calib.len() / shape.q_elems();
    let out = pol
        .select(&req(seq, shape, Phase::Prefill, calib, prefix - w, &view))
        .unwrap();
    // The prefix's own queries attend densely.
    assert_eq!(out.blocks, vec![Selection::full(kv.hkv, prefix)]);
}

/// Labels equal up to a bijective renaming.
fn same_partition(a: &[u32], b: &[u32]) -> bool {
    use std::collections::HashMap;
    let (mut ab, mut ba) = (HashMap::new(), HashMap::new());
    a.iter()
        .zip(b)
        .all(|(&x, &y)| *ab.entry(x).or_insert(y) == y && *ba.entry(y).or_insert(x) == x)
}

#[test]
fn kmeans_recovers_separated_clusters_and_raw_means() {
    let (d, k) = (16, 8);
    for seed in 0..6u64 {
        let mut rng = Rng::new(100 + seed);
        let dirs: Vec<Vec<f32>> = (0..k)
            .map(|_| {
                let v = rng.normal_vec(d, 1.0);
                let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.into_iter().map(|x| x / n).collect()
            })
            .collect();
        // Points in random order; each cluster has its own sizes and norms
        // (normalisation must not split a cluster by norm).
        let n = 400;
        let mut truth = Vec::with_capacity(n);
        let mut pts = Vec::with_capacity(n * d);
        for _ in 0..n {
            let c = rng.below(k);
            let norm = 0.5 + 3.0 * rng.uniform();
            truth.push(c as u32);
            pts.extend(dirs[c].iter().map(|&x| norm * (x + 0.01 * rng.normal())));
        }
        let p = KMeansParams {
            k,
            max_iters: 50,
            seed,
            normalize: true,
        };
        let r = kmeans(&pts, d, &p).unwrap();
        assert!(
            same_partition(&r.labels, &truth),
            "seed {seed}: partition not recovered"
        );
        // Centroids are the means of the raw points, sizes match.
        for c in 0..k {
            let members: Vec<usize> = (0..n).filter(|&i| r.labels[i] as usize == c).collect();
            assert_eq!(r.sizes[c] as usize, members.len());
            for j in 0..d {
                let mean = members.iter().map(|&i| pts[i * d + j] as f64).sum::<f64>()
                    / members.len() as f64;
                assert!(
                    (r.centroid(c)[j] as f64 - mean).abs() < 1e-5,
                    "seed {seed} c {c}"
                );
            }
        }
        // Same seed, same everything.
        assert_eq!(kmeans(&pts, d, &p).unwrap(), r);
    }
}

#[test]
fn kmeans_pp_is_deterministic_and_lloyd_matches_serial_reference() {
    let (d, n, k) = (8, 3000, 40);
    let mut rng = Rng::new(7);
    let pts = rng.normal_vec(n * d, 1.0);
    let x = normalized(&pts, d);
    let a = kmeans_pp_init(&x, d, k, 11).unwrap();
    assert_eq!(a, kmeans_pp_init(&x, d, k, 11).unwrap());
    let mut uniq = a.clone();
    uniq.sort_unstable();
    uniq.dedup();
    assert_eq!(uniq.len(), k, "k-means++ picked a point twice");
    assert!(
        (12..16).any(|s| kmeans_pp_init(&x, d, k, s).unwrap() != a),
        "the seed does not change the seeding"
    );

    // Serial reference Lloyd (f64 distances) from the same seeding; no
    // cluster empties on this data, so no re-seeding is involved.
    let mut c: Vec<f64> = a
        .iter()
        .flat_map(|&i| x[i * d..(i + 1) * d].iter().map(|&v| v as f64))
        .collect();
    let mut labels = vec![0u32; n];
    for _ in 0..8 {
        for i in 0..n {
            let mut best = (f64::INFINITY, 0);
            for j in 0..k {
                let dist: f64 = (0..d)
                    .map(|t| (x[i * d + t] as f64 - c[j * d + t]).powi(2))
                    .sum();
                if dist < best.0 {
                    best = (dist, j);
                }
            }
            labels[i] = best.1 as u32;
        }
        let mut sums = vec![0f64; k * d];
        let mut cnt = vec![0usize; k];
        for i in 0..n {
            let l = labels[i] as usize;
            cnt[l] += 1;
            for t in 0..d {
                sums[l * d + t] += x[i * d + t] as f64;
            }
        }
        assert!(cnt.iter().all(|&c| c > 0));
        for j in 0..k {
            for t in 0..d {
                c[j * d + t] = sums[j * d + t] / cnt[j] as f64;
            }
        }
    }
    let ours = infinitehip::kmeans::lloyd(
        &x,
        d,
        a.iter()
            .flat_map(|&i| x[i * d..(i + 1) * d].to_vec())
            .collect(),
        9,
    );
    // After 8 updates, the 9th assignment: same labels except where two
    // centres are within rounding of each other.
    let cf: Vec<f32> = c.iter().map(|&v| v as f32).collect();
    let (want, _) = assign(&x, d, &cf);
    let differ = ours.0.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert!(
        differ <= n / 500,
        "{differ} labels differ from the serial reference"
    );
    let _ = labels;
}

/// Plain k-means++ (every distance recomputed, one global f64 walk) with
/// the same random draws as `kmeans_pp_init`.
fn naive_kmeans_pp(x: &[f32], d: usize, k: usize, seed: u64) -> Vec<usize> {
    let n = x.len() / d;
    let mut rng = Rng::new(seed);
    let mut centers = vec![rng.below(n)];
    let mut d2 = vec![f64::INFINITY; n];
    while centers.len() < k {
        let c = &x[centers[centers.len() - 1] * d..][..d];
        for i in 0..n {
            let e: f32 = (0..d).map(|t| (x[i * d + t] - c[t]).powi(2)).sum();
            d2[i] = d2[i].min(e as f64);
        }
        let total: f64 = d2.iter().sum();
        assert!(total > 0.0);
        let mut r = rng.uniform() as f64 * total;
        let mut pick = 0;
        for (i, &w) in d2.iter().enumerate() {
            if w > 0.0 {
                pick = i;
                if r < w {
                    break;
                }
                r -= w;
            }
        }
        centers.push(pick);
    }
    centers
}

#[test]
fn kmeans_pp_with_distance_bounds_equals_plain_kmeans_pp() {
    // Clustered data (the bound skips most rows) and isotropic data (it
    // skips none); n not a multiple of the 1024-point work chunk.
    let (d, n, k) = (16, 5000, 150);
    let mut rng = Rng::new(3);
    let centres: Vec<f32> = rng.normal_vec(60 * d, 1.0);
    let clustered: Vec<f32> = (0..n)
        .flat_map(|_| {
            let c = rng.below(60);
            (0..d)
                .map(|t| centres[c * d + t] + 0.05 * rng.normal())
                .collect::<Vec<_>>()
        })
        .collect();
    let iso = rng.normal_vec(n * d, 1.0);
    for pts in [&clustered, &iso] {
        for seed in 0..3 {
            // The f32 distances feed the same sums; only f64 summation order
            // differs, so the picks agree.
            assert_eq!(
                kmeans_pp_init(pts, d, k, seed).unwrap(),
                naive_kmeans_pp(pts, d, k, seed),
                "seed {seed}"
            );
        }
    }
}

fn small_cfg(quantile: f32, levels: usize) -> SqueezeConfig {
    SqueezeConfig {
        percent_clusters: 10.0,
        percent_clusters_l1: 10.0,
        levels,
        quantile,
        quantile_l1: 0.5,
        observation_window: 50,
        sink: 0,
        kmeans_iters: 20,
        seed: 3,
        prefill_pool: SqueezePool::Max,
    }
}

/// f64 estimated probability of every cluster for one KV head and a query
/// set `[npos][g][d]`, pooled max over g then max/mean over positions.
fn ref_probs(hi: &HeadIndex, qs: &[f32], g: usize, scale: f64, pool: SqueezePool) -> Vec<f64> {
    let lv = &hi.fine;
    let d = lv.dim;
    let npos = qs.len() / (g * d);
    let mut acc = vec![0f64; lv.k()];
    for p in 0..npos {
        let mut best = vec![0f64; lv.k()];
        for j in 0..g {
            let q = &qs[(p * g + j) * d..(p * g + j + 1) * d];
            let s: Vec<f64> = (0..lv.k())
                .map(|c| {
                    scale
                        * q.iter()
                            .zip(lv.centroid(c))
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                })
                .collect();
            let den: f64 = (0..lv.k()).map(|c| lv.sizes[c] as f64 * s[c].exp()).sum();
            for c in 0..lv.k() {
                best[c] = best[c].max(s[c].exp() / den);
            }
        }
        for c in 0..lv.k() {
            acc[c] = match pool {
                SqueezePool::Max => acc[c].max(best[c]),
                SqueezePool::Mean => acc[c] + best[c] / npos as f64,
            };
        }
    }
    acc
}

fn group(q: &[f32], shape: &AttnShape, h: usize) -> Vec<f32> {
    let gd = shape.group() * shape.head_dim;
    q.chunks_exact(shape.q_elems())
        .flat_map(|qq| qq[h * gd..(h + 1) * gd].to_vec())
        .collect()
}

#[test]
fn calibration_hits_target_keep_fraction_and_lookup_matches_reference() {
    let (d, prefix, extra) = (32, 3000, 64);
    let shape = AttnShape::new(4, 2, d).unwrap();
    for (i, &quant) in [0.5f32, 0.7, 0.9].iter().enumerate() {
        let mut rng = Rng::new(20 + i as u64);
        let kv = Kv::random(2, d, prefix + extra, &mut rng);
        let cfg = small_cfg(quant, 1);
        let w = cfg.observation_window;
        let mut pol = SqueezePolicy::new(cfg, &model(d)).unwrap();
        let calib = rng.normal_vec(w * shape.q_elems(), 1.0);
        seal_and_calibrate(&mut pol, 1, shape, &kv, prefix, &calib);
        let p = pol.prefix(1).unwrap();
        let thr = p
            .thresholds()
            .expect("calibrated once the window's queries arrived");
        assert_eq!(p.calibration_queries(), w);
        let n_clustered = p.window_start;
        assert_eq!(n_clustered, prefix - w);

        // Reference: per-key mean-over-queries p̂ in f64; the fraction of
        // keys at or above the threshold is 1 - quantile, up to one cluster.
        let (mut kept, mut total, mut biggest) = (0usize, 0usize, 0u32);
        for h in 0..2 {
            let hi = &p.heads[h];
            let pr = ref_probs(
                hi,
                &group(&calib, &shape, h),
                2,
                shape.scale as f64,
                SqueezePool::Mean,
            );
            biggest = biggest.max(*hi.fine.sizes.iter().max().unwrap());
            for &l in &hi.labels {
                total += 1;
                kept += (pr[l as usize] >= thr.fine as f64) as usize;
            }
        }
        let frac = kept as f64 / total as f64;
        let tol = biggest as f64 / total as f64 + 0.005;
        assert!(
            (frac - (1.0 - quant as f64)).abs() <= tol,
            "quantile {quant}: kept {frac}, want {} +- {tol}",
            1.0 - quant
        );

        // The same queries as a prefill chunk past the prefix, pooled by
        // mean as in calibration: the lookup keeps that same fraction.
        let kvv = kv.view();
        let mut mean_pol = SqueezePolicy::new(
            SqueezeConfig {
                prefill_pool: SqueezePool::Mean,
                ..small_cfg(quant, 1)
            },
            &model(d),
        )
        .unwrap();
        seal_and_calibrate(&mut mean_pol, 1, shape, &kv, prefix, &calib);
        let out = mean_pol
            .select(&req(
                1,
                shape,
                Phase::Prefill,
                &calib,
                prefix + extra - w,
                &kvv,
            ))
            .unwrap();
        assert_eq!(out.q_block, w);
        let sel = &out.blocks[0];
        let online: usize = (0..2)
            .map(|h| (0..n_clustered).filter(|&t| sel.contains(h, t)).count())
            .sum();
        assert!(
            ((online as f64 / total as f64) - frac).abs() <= 0.002,
            "online {online} vs {kept}"
        );

        // Decode and max-pooled prefill lookups against the f64 reference,
        // ignoring clusters within rounding of the threshold.
        for (phase, nq, q_start) in [
            (Phase::Decode, 1, prefix + extra - 1),
            (Phase::Prefill, 8, prefix + 10),
        ] {
            let q = rng.normal_vec(nq * shape.q_elems(), 1.0);
            let out = pol
                .select(&req(1, shape, phase, &q, q_start, &kvv))
                .unwrap();
            assert_eq!(out.blocks.len(), 1);
            let sel = &out.blocks[0];
            for h in 0..2 {
                let hi = &p.heads[h];
                let pr = ref_probs(
                    hi,
                    &group(&q, &shape, h),
                    2,
                    shape.scale as f64,
                    SqueezePool::Max,
                );
                for (t, &l) in hi.labels.iter().enumerate() {
                    let v = pr[l as usize];
                    if (v - thr.fine as f64).abs() <= 1e-4 * thr.fine as f64 {
                        continue;
                    }
                    assert_eq!(
                        sel.contains(h, t),
                        v >= thr.fine as f64,
                        "{phase:?} head {h} token {t}"
                    );
                }
                // Window and everything after the prefix: always.
                assert!((n_clustered..prefix + extra).all(|t| sel.contains(h, t)));
            }
        }
    }
}

#[test]
fn two_level_lookup_is_consistent_with_one_level() {
    let (d, prefix) = (32, 3050);
    let shape = AttnShape::new(4, 2, d).unwrap();
    let mut rng = Rng::new(5);
    let kv = Kv::random(2, d, prefix, &mut rng);
    let cfg = small_cfg(0.7, 2);
    let mut pol = SqueezePolicy::new(cfg.clone(), &model(d)).unwrap();
    let calib = rng.normal_vec(cfg.observation_window * shape.q_elems(), 1.0);
    seal_and_calibrate(&mut pol, 1, shape, &kv, prefix, &calib);
    let p = pol.prefix(1).unwrap();
    let thr = p.thresholds().unwrap();
    assert!(thr.coarse.is_finite() && thr.fine.is_finite());
    let mut some_pruned = 0;
    for h in 0..2 {
        let hi = &p.heads[h];
        let co = hi.coarse.as_ref().expect("two-level index");
        assert_eq!(hi.fine.k(), 300);
        assert_eq!(co.level.k(), 30);
        // Coarse sizes count keys; each coarse centroid is the raw-key mean.
        assert_eq!(co.level.sizes.iter().sum::<u32>() as usize, prefix - 50);
        for c in co.level.nonempty.iter().map(|&c| c as usize) {
            let fm = co.fine_members(c);
            let n: u32 = fm.iter().map(|&f| hi.fine.sizes[f as usize]).sum();
            assert_eq!(n, co.level.sizes[c]);
            for j in 0..d {
                let m: f64 = fm
                    .iter()
                    .map(|&f| {
                        hi.fine.sizes[f as usize] as f64 * hi.fine.centroid(f as usize)[j] as f64
                    })
                    .sum::<f64>()
                    / n as f64;
                assert!((co.level.centroid(c)[j] as f64 - m).abs() < 1e-5);
            }
        }
        for _ in 0..10 {
            let qs = rng.normal_vec(shape.group() * d, 1.0);
            let one = hi.kept_clusters(&qs, 2, shape.scale, SqueezePool::Max, thr, false);
            let two = hi.kept_clusters(&qs, 2, shape.scale, SqueezePool::Max, thr, true);
            let pc = pooled_probs(
                &co.level,
                &co.level.nonempty,
                &qs,
                2,
                shape.scale,
                SqueezePool::Max,
            );
            let mut in_a = vec![false; hi.fine.k()];
            for (&c, &pv) in co.level.nonempty.iter().zip(&pc) {
                if pv >= thr.coarse {
                    co.fine_members(c as usize)
                        .iter()
                        .for_each(|&f| in_a[f as usize] = true);
                }
            }
            for f in 0..hi.fine.k() {
                // Both levels must agree: nothing outside surviving coarse
                // clusters; inside them, the smaller denominator only adds.
                assert!(!two[f] || in_a[f], "fine {f} kept outside the coarse set");
                assert!(!(one[f] && in_a[f]) || two[f], "fine {f} lost by two-level");
            }
            some_pruned += (in_a.iter().filter(|&&x| x).count() < hi.fine.nonempty.len()) as usize;
            // Keeping every coarse cluster reproduces one level exactly.
            let all = Thresholds {
                coarse: f32::NEG_INFINITY,
                ..thr
            };
            assert_eq!(
                hi.kept_clusters(&qs, 2, shape.scale, SqueezePool::Max, all, true),
                one
            );
        }
    }
    assert!(some_pruned > 0, "the coarse level never pruned anything");
}

#[test]
fn planted_needle_cluster_is_selected() {
    let (d, prefix, extra) = (64, 4000, 32);
    let shape = AttnShape::new(4, 2, d).unwrap();
    for seed in 0..4u64 {
        let mut rng = Rng::new(50 + seed);
        let mut kv = Kv::random(2, d, prefix + extra, &mut rng);
        let cfg = SqueezeConfig {
            quantile: 0.9,
            ..small_cfg(0.9, 1)
        };
        // Per head a direction u_h and 24 needle keys along it (norm 8,
        // like the random keys), at random positions of the clustered part.
        let mut needles: Vec<Vec<usize>> = vec![];
        let mut dirs = vec![];
        for h in 0..2 {
            let u = rng.normal_vec(d, 1.0);
            let n = u.iter().map(|x| x * x).sum::<f32>().sqrt();
            let u: Vec<f32> = u.into_iter().map(|x| x / n).collect();
            let mut pos: Vec<usize> = (0..24).map(|_| rng.below(prefix - 100)).collect();
            pos.sort_unstable();
            pos.dedup();
            for &t in &pos {
                let noise = rng.normal_vec(d, 0.05);
                for (j, x) in kv.key_mut(h, t).iter_mut().enumerate() {
                    *x = 8.0 * u[j] + noise[j];
                }
            }
            needles.push(pos);
            dirs.push(u);
        }
        let mut pol = SqueezePolicy::new(cfg.clone(), &model(d)).unwrap();
        let calib = rng.normal_vec(cfg.observation_window * shape.q_elems(), 1.0);
        seal_and_calibrate(&mut pol, 9, shape, &kv, prefix, &calib);
        // Decode query: in each group only the first q head looks for the
        // needle (GQA max pooling must keep it for the group).
        let mut q = rng.normal_vec(shape.q_elems(), 1.0);
        for (h, u) in dirs.iter().enumerate() {
            let o = (h * 2) * d;
            for (x, &uj) in q[o..o + d].iter_mut().zip(u) {
                *x = 12.0 * uj;
            }
        }
        let view = kv.view();
        let len = prefix + extra;
        let out = pol
            .select(&req(9, shape, Phase::Decode, &q, len - 1, &view))
            .unwrap();
        let sel = &out.blocks[0];
        let window_start = prefix - cfg.observation_window;
        for (h, pos) in needles.iter().enumerate() {
            for &t in pos {
                assert!(
                    sel.contains(h, t),
                    "seed {seed} head {h}: needle at {t} not selected"
                );
            }
            let kept = (0..window_start).filter(|&t| sel.contains(h, t)).count();
            assert!(
                kept < window_start / 3,
                "seed {seed} head {h}: {kept} of {window_start} prefix keys kept"
            );
        }
        // The sparse output is close to dense: the needle dominates.
        let mut o = vec![f32::NAN; q.len()];
        attention::decode(
            &shape,
            &q,
            std::slice::from_ref(&view),
            Some(std::slice::from_ref(sel)),
            &mut o,
        )
        .unwrap();
        let want = reference::attend_f64(&shape, &q, &view, None, len);
        // Heads that do not look for a needle see a diffuse softmax that 10%
        // of the keys cannot reproduce: only the needle-seeking heads are
        // expected to be close.
        for hq in [0, 2] {
            let e = rel_error(&o[hq * d..(hq + 1) * d], &want[hq * d..(hq + 1) * d]);
            eprintln!("seed {seed} q head {hq}: rel err {e}");
            assert!(e < 0.05, "seed {seed} q head {hq}: rel err {e}");
        }
    }
}

#[test]
fn fork_reuses_the_parents_clusters() {
    let (d, prefix) = (32, 1200);
    let shape = AttnShape::new(4, 2, d).unwrap();
    let mut rng = Rng::new(8);
    let kv = Kv::random(2, d, prefix + 20, &mut rng);
    let cfg = small_cfg(0.7, 2);
    let mut pol = SqueezePolicy::new(cfg.clone(), &model(d)).unwrap();
    let calib = rng.normal_vec(cfg.observation_window * shape.q_elems(), 1.0);
    seal_and_calibrate(&mut pol, 1, shape, &kv, prefix, &calib);
    assert_eq!(pol.clusterings_run(), 1);
    pol.fork_sequence(1, 2);
    let (a, b) = (pol.prefix(1).unwrap(), pol.prefix(2).unwrap());
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    // The child's own prompt end (its user input) does not re-cluster.
    let view = kv.view();
    let ins = InsertInfo {
        seq: 2,
        shape,
        phase: Phase::Prefill,
        start: prefix,
        q: &[],
        k: &[],
        v: &[],
        kv: &view,
        prompt_done: true,
    };
    pol.after_append(&ins).unwrap();
    assert_eq!(pol.clusterings_run(), 1);
    let q = rng.normal_vec(shape.q_elems(), 1.0);
    let s1 = pol
        .select(&req(1, shape, Phase::Decode, &q, prefix + 19, &view))
        .unwrap();
    let s2 = pol
        .select(&req(2, shape, Phase::Decode, &q, prefix + 19, &view))
        .unwrap();
    assert_eq!(s1, s2);
    pol.end_sequence(1);
    assert!(pol.prefix(1).is_none() && pol.prefix(2).is_some());
}

#[test]
fn missing_calibration_is_an_error_naming_it() {
    let (d, prefix) = (32, 400);
    let shape = AttnShape::new(4, 2, d).unwrap();
    let mut rng = Rng::new(9);
    let kv = Kv::random(2, d, prefix + 1, &mut rng);
    let mut pol = SqueezePolicy::new(small_cfg(0.5, 1), &model(d)).unwrap();
    let view = kv.view();
    // Seal with the first `prefix` tokens only.
    let pk = Kv {
        hkv: 2,
        d,
        len: prefix,
        k: (0..2)
            .flat_map(|h| kv.k[h * (prefix + 1) * d..(h * (prefix + 1) + prefix) * d].to_vec())
            .collect(),
        v: vec![0.0; 2 * prefix * d],
    };
    let pv = pk.view();
    pol.build_prefix(1, &shape, &pv).unwrap();
    let q = rng.normal_vec(shape.q_elems(), 1.0);
    let e = pol
        .select(&req(1, shape, Phase::Decode, &q, prefix, &view))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("calibration queries") && e.contains("350..400"),
        "{e}"
    );
    // NaN keys are refused when clustering.
    let mut bad = Kv::random(2, d, prefix, &mut rng);
    bad.key_mut(1, 7)[3] = f32::NAN;
    let e = pol
        .build_prefix(2, &shape, &bad.view())
        .unwrap_err()
        .to_string();
    assert!(e.contains("KV head 1") && e.contains("non-finite"), "{e}");
}

fn engine_cfg(dtype: DType, quantile: f32, levels: usize) -> PolicyConfig {
    PolicyConfig {
        model: ModelShape {
            n_layers: 2,
            n_q_heads: 4,
            n_kv_heads: 2,
            head_dim: 32,
            ..ModelShape::default()
        },
        kv: KvConfig {
            page_size: 16,
            dtype,
            device_cache_pages: None,
            estimation_cache_rows: None,
        },
        dense_layers: 1,
        default: LayerPolicy::Squeeze(SqueezeConfig {
            observation_window: 16,
            quantile_l1: quantile,
            ..small_cfg(quantile, levels)
        }),
        overrides: vec![],
        ..PolicyConfig::default()
    }
}

/// Through the engine: prefix (prompt_done), prefill, a forked child with
/// its own user input, decode. Quantile 0 keeps every key: equals dense.
#[test]
fn quantile_zero_equals_dense_through_engine() {
    for (dtype, levels) in [(DType::F32, 1), (DType::Bf16, 2)] {
        let mut eng = Engine::new(engine_cfg(dtype, 0.0, levels)).unwrap();
        let shape = eng.shape();
        let round = |x: &[f32]| -> Vec<f32> {
            x.iter()
                .map(|&v| {
                    if dtype == DType::Bf16 {
                        bf16::from_f32(v).to_f32()
                    } else {
                        v
                    }
                })
                .collect()
        };
        let layout = KvLayout {
            n_kv_heads: 2,
            head_dim: 32,
            page_size: 16,
        };
        let mut refpool = KvPool::<f32>::new(layout, None).unwrap();
        // The reference reads the same stored (dtype-rounded) K/V: only f32
        // accumulation differs (~1e-6), in every dtype.
        let bound = 1e-5;
        let mut rng = Rng::new(31);
        let te = 64;
        eng.add_sequence(1).unwrap();
        refpool.add_sequence(1).unwrap();
        // Steps: (seq, tokens, phase, prompt_done).
        let steps: Vec<(u64, usize, Phase, bool)> = vec![
            (1, 200, Phase::Prefill, false),
            (1, 120, Phase::Prefill, true), // prefix = 320 tokens
            (2, 0, Phase::Prefill, false),  // fork 1 -> 2
            (1, 40, Phase::Prefill, true),  // user input of 1
            (2, 25, Phase::Prefill, true),  // user input of 2
            (1, 1, Phase::Decode, false),
            (2, 1, Phase::Decode, false),
            (1, 1, Phase::Decode, false),
            (2, 1, Phase::Decode, false),
        ];
        for (seq, n, phase, done) in steps {
            if n == 0 {
                eng.fork_sequence(1, 2).unwrap();
                refpool.fork(1, 2).unwrap();
                continue;
            }
            let k = rng.normal_vec(n * te, 1.0);
            let v = rng.normal_vec(n * te, 1.0);
            refpool.append(seq, &round(&k), &round(&v)).unwrap();
            for layer in 0..2 {
                eng.append(layer, seq, &k, &v, phase, done, None).unwrap();
            }
            let q = rng.normal_vec(n * shape.q_elems(), 1.0);
            let view = refpool.view(seq).unwrap();
            let len = view.len();
            let want = reference::prefill_f64(&shape, &q, len - n, &view, None);
            for layer in 0..2 {
                let mut out = vec![f32::NAN; q.len()];
                if phase == Phase::Prefill {
                    eng.attend_prefill(layer, seq, &q, &mut out).unwrap();
                } else {
                    eng.attend_decode(layer, &[seq], &q, &mut out).unwrap();
                }
                let err = rel_error(&out, &want);
                assert!(
                    err <= bound,
                    "{dtype} levels {levels} layer {layer} seq {seq} {phase:?} len {len}: rel err {err}"
                );
            }
        }
        assert_eq!(eng.stats()[1].method, "squeeze");
    }
}

/// Through the engine at a real quantile: runs, finite, and the bench flow
/// (prefix with prompt_done, prefill of just the window's queries, decode).
#[test]
fn engine_sparse_flow_runs() {
    let mut eng = Engine::new(engine_cfg(DType::Bf16, 0.8, 1)).unwrap();
    let shape = eng.shape();
    let mut rng = Rng::new(4);
    eng.add_sequence(3).unwrap();
    let n = 600;
    let k = rng.normal_vec(n * 64, 1.0);
    for layer in 0..2 {
        eng.append(layer, 3, &k, &k, Phase::Prefill, true, None)
            .unwrap();
    }
    // Decode past the prefix before the window's queries were seen: an
    // error that says so.
    let k1 = rng.normal_vec(64, 1.0);
    eng.append(1, 3, &k1, &k1, Phase::Decode, false, None)
        .unwrap();
    let q = rng.normal_vec(shape.q_elems(), 1.0);
    let mut out = vec![0f32; q.len()];
    let e = eng
        .attend_decode(1, &[3], &q, &mut out)
        .unwrap_err()
        .to_string();
    eng.append(0, 3, &k1, &k1, Phase::Decode, false, None)
        .unwrap();
    assert!(e.contains("calibration"), "{e}");
    // Calibration: the window's (positions 584..600) queries through a
    // prefill over the last 17 tokens (the prefix's last 16 and the new one).
    let qw = rng.normal_vec(17 * shape.q_elems(), 1.0);
    let mut ow = vec![0f32; qw.len()];
    for layer in 0..2 {
        eng.attend_prefill(layer, 3, &qw, &mut ow).unwrap();
    }
    for _ in 0..3 {
        let k1 = rng.normal_vec(64, 1.0);
        for layer in 0..2 {
            eng.append(layer, 3, &k1, &k1, Phase::Decode, false, None)
                .unwrap();
            let q = rng.normal_vec(shape.q_elems(), 1.0);
            let mut out = vec![f32::NAN; q.len()];
            eng.attend_decode(layer, &[3], &q, &mut out).unwrap();
            assert!(out.iter().all(|x| x.is_finite()));
        }
    }
}

#[test]
fn config_errors_name_the_field() {
    let cases = [
        (
            r#"{"default": {"method": "squeeze", "observation_window": 0}}"#,
            "default.observation_window",
        ),
        (
            r#"{"default": {"method": "squeeze", "percent_clusters": 0}}"#,
            "default.percent_clusters",
        ),
        (
            r#"{"default": {"method": "squeeze", "percent_clusters_l1": 150}}"#,
            "default.percent_clusters_l1",
        ),
        (
            r#"{"default": {"method": "squeeze", "quantile": 1.0}}"#,
            "default.quantile",
        ),
        (
            r#"{"default": {"method": "squeeze", "quantile_l1": -0.1}}"#,
            "default.quantile_l1",
        ),
        (
            r#"{"default": {"method": "squeeze", "kmeans_iters": 0}}"#,
            "default.kmeans_iters",
        ),
        (
            r#"{"default": {"method": "squeeze", "levels": 3}}"#,
            "default.levels",
        ),
        (
            r#"{"default": {"method": "squeeze", "prefill_pool": "median"}}"#,
            "median",
        ),
        (
            r#"{"overrides": [{"layers": [5], "policy": {"method": "squeeze", "quantile": 2}}]}"#,
            "overrides[0].policy.quantile",
        ),
    ];
    for (json, field) in cases {
        let err = PolicyConfig::from_json(json).unwrap_err().to_string();
        assert!(
            err.contains(field),
            "{json}: error `{err}` does not name `{field}`"
        );
    }
    let ok = PolicyConfig::from_json(
        r#"{"default": {"method": "squeeze", "levels": 2, "quantile": 0.9, "prefill_pool": "mean"}}"#,
    )
    .unwrap();
    assert!(Engine::new(ok).is_ok());
    let e = SqueezePolicy::new(
        SqueezeConfig {
            quantile: f32::NAN,
            ..SqueezeConfig::default()
        },
        &ModelShape::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("squeeze.quantile"), "{e}");
}

/// Timings for the report (not a pass/fail test): one KV head's k-means at
/// 5% clusters, and decode select + sparse attention vs dense attention.
/// `cargo test --release -p infinitehip --test squeeze throughput -- --ignored --nocapture`
#[test]
#[ignore]
fn throughput() {
    let n: usize = std::env::var("SQ_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32768);
    let (d, hkv) = (128, 8);
    let shape = AttnShape::new(32, hkv, d).unwrap();
    let mut rng = Rng::new(1);
    let iso = rng.normal_vec(n * d, 1.0);
    // Keys of 200 directions with noise: the shape real keys tend to have.
    let dirs = rng.normal_vec(200 * d, 1.0);
    let clustered: Vec<f32> = (0..n)
        .flat_map(|_| {
            let c = rng.below(200);
            (0..d)
                .map(|t| dirs[c * d + t] + 0.3 * rng.normal())
                .collect::<Vec<_>>()
        })
        .collect();
    let k = n / 20;
    for (name, pts) in [("isotropic", &iso), ("clustered", &clustered)] {
        let x = normalized(pts, d);
        let t = std::time::Instant::now();
        kmeans_pp_init(&x, d, k, 0).unwrap();
        let init = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let p = KMeansParams {
            k,
            max_iters: 5,
            seed: 0,
            normalize: true,
        };
        let r = kmeans(pts, d, &p).unwrap();
        eprintln!(
            "kmeans {name} n={n} d={d} k={k}: k-means++ seeding {init:.2} s; \
             seeding + {} Lloyd iterations {:.2} s",
            r.iters,
            t.elapsed().as_secs_f64()
        );
    }
    let kv = Kv::random(hkv, d, n + 1, &mut rng);
    for levels in [1, 2] {
        let cfg = SqueezeConfig {
            percent_clusters: 5.0,
            levels,
            quantile: 0.9,
            quantile_l1: 0.7,
            kmeans_iters: 3,
            ..SqueezeConfig::default()
        };
        let mut pol = SqueezePolicy::new(cfg, &ModelShape::default()).unwrap();
        let calib = rng.normal_vec(100 * shape.q_elems(), 1.0);
        let t = std::time::Instant::now();
        seal_and_calibrate(&mut pol, 1, shape, &kv, n, &calib);
        let build = t.elapsed().as_secs_f64();
        let view = kv.view();
        let q = rng.normal_vec(shape.q_elems(), 1.0);
        let reps = 20;
        let t = std::time::Instant::now();
        let mut sel = None;
        for _ in 0..reps {
            sel = Some(
                pol.select(&req(1, shape, Phase::Decode, &q, n, &view))
                    .unwrap(),
            );
        }
        let sel_ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
        let sel = sel.unwrap().blocks;
        let mut o = vec![0f32; q.len()];
        let t = std::time::Instant::now();
        for _ in 0..reps {
            attention::decode(&shape, &q, std::slice::from_ref(&view), Some(&sel), &mut o).unwrap();
        }
        let sparse_ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            attention::decode(&shape, &q, std::slice::from_ref(&view), None, &mut o).unwrap();
        }
        let dense_ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
        eprintln!(
            "levels {levels}: build+calibrate {build:.1} s (3 Lloyd iters/head), kept {:.1}% of tokens, \
             select {sel_ms:.2} ms + sparse attention {sparse_ms:.2} ms vs dense {dense_ms:.2} ms",
            100.0 * sel[0].max_tokens() as f64 / (n + 1) as f64
        );
    }
}

/// `seal_prefix` with heads from `build_head_from` (the GPU engine path's
/// route, here with the CPU k-means) gives the index and thresholds of
/// `build_prefix`; malformed heads are rejected.
#[test]
fn sealing_prebuilt_heads_equals_build_prefix() {
    use infinitehip::policy::squeeze::{build_head_from, fine_params};
    let (d, prefix) = (16, 900);
    let shape = AttnShape::new(4, 2, d).unwrap();
    let mut rng = Rng::new(21);
    let kv = Kv::random(2, d, prefix + 5, &mut rng);
    let mut cfg = small_cfg(0.6, 2);
    cfg.sink = 3;
    let calib = rng.normal_vec(cfg.observation_window * shape.q_elems(), 1.0);
    let mut a = SqueezePolicy::new(cfg.clone(), &model(d)).unwrap();
    seal_and_calibrate(&mut a, 1, shape, &kv, prefix, &calib);
    let pa = a.prefix(1).unwrap();

    let mut b = SqueezePolicy::new(cfg.clone(), &model(d)).unwrap();
    let ws = b.window_start(prefix);
    assert_eq!(ws, prefix - cfg.observation_window);
    let heads: Vec<HeadIndex> = (0..2)
        .map(|h| {
            let keys = &kv.k[h * kv.len * d..(h * kv.len + ws) * d];
            let s = cfg.sink;
            let km = kmeans(&keys[s * d..], d, &fine_params(&cfg, ws - s)).unwrap();
            build_head_from(&keys[..s * d], d, Some(km), h, &cfg, &mut |p, d, q| {
                kmeans(p, d, q)
            })
            .unwrap()
        })
        .collect();
    // Wrong head count or clustered-key count: errors.
    assert!(b
        .seal_prefix(2, &shape, prefix, heads[..1].to_vec())
        .is_err());
    let mut short = heads.clone();
    short[1].labels.pop();
    assert!(b.seal_prefix(2, &shape, prefix, short).is_err());
    b.seal_prefix(1, &shape, prefix, heads).unwrap();
    let view = kv.view();
    b.select(&req(
        1,
        shape,
        Phase::Prefill,
        &calib,
        prefix - cfg.observation_window,
        &view,
    ))
    .unwrap();
    let pb = b.prefix(1).unwrap();
    assert_eq!(pa.thresholds(), pb.thresholds());
    assert!(pa.thresholds().unwrap().fine.is_finite());
    for (x, y) in pa.heads.iter().zip(&pb.heads) {
        assert_eq!(x.labels, y.labels);
        assert_eq!(x.fine.centroids, y.fine.centroids);
        assert_eq!(x.fine.sizes, y.fine.sizes);
        let (cx, cy) = (x.coarse.as_ref().unwrap(), y.coarse.as_ref().unwrap());
        assert_eq!(cx.of_fine, cy.of_fine);
        assert_eq!(cx.level.centroids, cy.level.centroids);
    }
    // Decode lookups agree.
    for t in 0..5 {
        let q = rng.normal_vec(shape.q_elems(), 1.0);
        let sa = a
            .select(&req(1, shape, Phase::Decode, &q, prefix + t, &view))
            .unwrap();
        let sb = b
            .select(&req(1, shape, Phase::Decode, &q, prefix + t, &view))
            .unwrap();
        assert_eq!(sa.blocks, sb.blocks);
        // Sparse: the lookup dropped some prefix keys.
        let kept: usize = sa.blocks[0].heads[0].iter().map(|r| r.len()).sum();
        assert!(kept < prefix + 5, "kept {kept}");
    }
}
