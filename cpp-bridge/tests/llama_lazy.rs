//! LazyLLM row dropping, the Rust side of patch 0007 (`llama_lazy`): the
//! kept rows against an f64 reference of the paper's importance, the masks
//! of later layers against the cell depths, and the per-ubatch row plan.

use half::f16;
use infinitehip::config::LazyPoint;
use infinitehip_bridge::ffi::TensorDesc;
use infinitehip_bridge::llama::View;
use infinitehip_bridge::llama_lazy::{keep_rows, LazyRows};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn desc(dtype: u32, ne: [i64; 4], es: u64) -> TensorDesc {
    TensorDesc {
        dtype,
        ne0: ne[0],
        ne1: ne[1],
        ne2: ne[2],
        ne3: ne[3],
        nb0: es,
        nb1: es * ne[0] as u64,
        nb2: es * (ne[0] * ne[1]) as u64,
        nb3: es * (ne[0] * ne[1] * ne[2]) as u64,
    }
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f16_bytes(x: &[f32]) -> Vec<u8> {
    x.iter()
        .flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes())
        .collect()
}

/// A ubatch of `n_rows` tokens in cells `ctx..ctx + n_rows` after `ctx`
/// earlier cells; `hidden` cells are -inf for every row (pruned earlier).
struct Case {
    d: usize,
    n_head: usize,
    n_kv_heads: usize,
    n_kv: usize,
    n_rows: usize,
    ctx: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    mask: Vec<f32>,
}

fn case(seed: u64, hidden: &[usize]) -> Case {
    let (d, n_head, n_kv_heads, ctx, n_rows) = (16, 4, 2, 12, 40);
    let n_kv = ctx + n_rows + 4; // 4 unused cells past the ubatch
    let mut r = Rng(seed);
    let q: Vec<f32> = (0..d * n_head * n_rows).map(|_| 2.0 * r.next()).collect();
    let k: Vec<f32> = (0..d * n_kv_heads * n_kv).map(|_| 2.0 * r.next()).collect();
    let mut mask = vec![f32::NEG_INFINITY; n_kv * n_rows];
    for row in 0..n_rows {
        for c in 0..=ctx + row {
            if !hidden.contains(&c) {
                mask[row * n_kv + c] = 0.0;
            }
        }
    }
    Case {
        d,
        n_head,
        n_kv_heads,
        n_kv,
        n_rows,
        ctx,
        q,
        k,
        mask,
    }
}

/// f64 reference: mean over q heads of the last row's softmax, per cell.
fn reference_importance(c: &Case, k: &[f32]) -> Vec<f64> {
    let last = c.n_rows - 1;
    let g = c.n_head / c.n_kv_heads;
    let scale = 1.0 / (c.d as f64).sqrt();
    let mut imp = vec![0f64; c.n_kv];
    for h in 0..c.n_head {
        let qh = &c.q[(last * c.n_head + h) * c.d..][..c.d];
        let vis: Vec<usize> = (0..c.n_kv)
            .filter(|&i| c.mask[last * c.n_kv + i] == 0.0)
            .collect();
        let logits: Vec<f64> = vis
            .iter()
            .map(|&i| {
                let kr = &k[(i * c.n_kv_heads + h / g) * c.d..][..c.d];
                scale
                    * qh.iter()
                        .zip(kr)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
            })
            .collect();
        let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = logits.iter().map(|l| (l - mx).exp()).sum();
        for (&i, l) in vis.iter().zip(&logits) {
            imp[i] += (l - mx).exp() / z / c.n_head as f64;
        }
    }
    imp
}

/// The reference's kept rows: forced + last, then by importance (ties later).
fn reference_keep(c: &Case, imp: &[f64], forced: &[bool], m: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..c.n_rows).collect();
    let key = |r: usize| {
        if forced[r] || r == c.n_rows - 1 {
            f64::INFINITY
        } else {
            imp[c.ctx + r]
        }
    };
    order.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(b.cmp(&a)));
    let mut kept = order[..m].to_vec();
    kept.sort_unstable();
    kept
}

fn run_keep(c: &Case, k_f16: bool, forced: &[bool], m: usize) -> Vec<usize> {
    let qb = f32_bytes(&c.q);
    let qd = desc(0, [c.d as i64, c.n_head as i64, c.n_rows as i64, 1], 4);
    let (kb, kd) = if k_f16 {
        (
            f16_bytes(&c.k),
            desc(1, [c.d as i64, c.n_kv_heads as i64, c.n_kv as i64, 1], 2),
        )
    } else {
        (
            f32_bytes(&c.k),
            desc(0, [c.d as i64, c.n_kv_heads as i64, c.n_kv as i64, 1], 4),
        )
    };
    let mb = f16_bytes(&c.mask);
    let md = desc(1, [c.n_kv as i64, c.n_rows as i64, 1, 1], 2);
    let q = View::new(&qb, &qd, "q").unwrap();
    let k = View::new(&kb, &kd, "k").unwrap();
    let mv = View::new(&mb, &md, "mask").unwrap();
    let cols: Vec<usize> = (0..c.n_rows).map(|r| c.ctx + r).collect();
    keep_rows(1.0 / (c.d as f32).sqrt(), &q, &k, &mv, &cols, forced, m).unwrap()
}

#[test]
fn kept_rows_are_the_reference_top_k() {
    for seed in 1..6u64 {
        let c = case(seed, &[3, 20]);
        let imp = reference_importance(&c, &c.k);
        let mut forced = vec![false; c.n_rows];
        forced[5] = true;
        for m in [1, 7, 20, 39] {
            let got = run_keep(&c, false, &forced, m.max(2));
            let want = reference_keep(&c, &imp, &forced, m.max(2));
            assert_eq!(got, want, "seed {seed} m {m}");
            assert!(got.contains(&5) && got.contains(&(c.n_rows - 1)));
        }
    }
}

#[test]
fn kept_rows_f16_keys_match_reference_on_rounded_keys() {
    let c = case(9, &[]);
    let k16: Vec<f32> = c.k.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
    let imp = reference_importance(&c, &k16);
    let forced = vec![false; c.n_rows];
    assert_eq!(
        run_keep(&c, true, &forced, 13),
        reference_keep(&c, &imp, &forced, 13)
    );
}

#[test]
fn hidden_cells_take_no_attention_mass() {
    // A hidden (pruned) cell with a key aligned to the query would take most
    // of the softmax; hidden, it must not change which rows stay.
    let mut c = case(4, &[]);
    let with = {
        let mut c2 = case(4, &[c.ctx + 2]);
        let last = c2.n_rows - 1;
        for h in 0..c2.n_kv_heads {
            for i in 0..c2.d {
                c2.k[((c2.ctx + 2) * c2.n_kv_heads + h) * c2.d + i] =
                    50.0 * c2.q[(last * c2.n_head + h * 2) * c2.d + i];
            }
        }
        let imp = reference_importance(&c2, &c2.k);
        let forced = vec![false; c2.n_rows];
        (
            run_keep(&c2, false, &forced, 10),
            reference_keep(&c2, &imp, &forced, 10),
        )
    };
    assert_eq!(with.0, with.1);
    assert!(
        !with.0.contains(&2),
        "a hidden row's cell cannot be kept by importance"
    );
    // and visible, the same key makes row 2 the most important
    let last = c.n_rows - 1;
    for h in 0..c.n_kv_heads {
        for i in 0..c.d {
            c.k[((c.ctx + 2) * c.n_kv_heads + h) * c.d + i] =
                50.0 * c.q[(last * c.n_head + h * 2) * c.d + i];
        }
    }
    let forced = vec![false; c.n_rows];
    assert!(run_keep(&c, false, &forced, 2).contains(&2));
}

#[test]
fn keep_all_when_count_covers_rows() {
    let c = case(2, &[]);
    let forced = vec![false; c.n_rows];
    assert_eq!(
        run_keep(&c, false, &forced, c.n_rows),
        (0..c.n_rows).collect::<Vec<_>>()
    );
}

fn points() -> Vec<LazyPoint> {
    vec![
        LazyPoint {
            layer: 1,
            keep: 0.5,
        },
        LazyPoint {
            layer: 3,
            keep: 0.25,
        },
    ]
}

#[test]
fn plan_counts_rows_per_point() {
    let l = LazyRows::new(6, points()).unwrap();
    assert_eq!(l.plan(100, 1, true), vec![1, 50, 3, 25]);
    // rows with logits (+ the last) stay
    assert_eq!(l.plan(100, 40, true), vec![1, 50, 3, 41]);
    assert_eq!(l.plan(100, 100, true), vec![1, 100, 3, 100]);
    // one token: nothing to drop
    assert_eq!(l.plan(1, 1, true), vec![1, 1, 3, 1]);
    // several sequences: masks only
    assert_eq!(l.plan(100, 2, false), vec![1, 100, 3, 100]);
    assert!(LazyRows::new(
        4,
        vec![LazyPoint {
            layer: 3,
            keep: 0.5
        }]
    )
    .is_err());
}

fn mask_out(
    l: &LazyRows,
    first: usize,
    mask: &[f32],
    n_kv: usize,
    rows: &[i32],
    f16m: bool,
    nth: usize,
) -> Vec<f32> {
    let n_in = mask.len() / n_kv;
    let (mb, md, es) = if f16m {
        (
            f16_bytes(mask),
            desc(1, [n_kv as i64, n_in as i64, 1, 1], 2),
            2,
        )
    } else {
        (
            f32_bytes(mask),
            desc(0, [n_kv as i64, n_in as i64, 1, 1], 4),
            4,
        )
    };
    let n_out = if rows.is_empty() { n_in } else { rows.len() };
    let mut out = vec![0u8; n_kv * n_out * es];
    for ith in 0..nth {
        l.mask(first, &mb, &md, rows, &[], 0, 1024, ith, nth, &mut out)
            .unwrap();
    }
    out.chunks(es)
        .map(|b| {
            if es == 2 {
                f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
            } else {
                f32::from_le_bytes([b[0], b[1], b[2], b[3]])
            }
        })
        .collect()
}

#[test]
fn later_masks_hide_pruned_cells_and_gather_rows() {
    let l = LazyRows::new(6, points()).unwrap();
    let n_kv = 8;
    // 6 rows in cells 2..8, causal; cells 0..2 an earlier ubatch
    let mut mask = vec![f32::NEG_INFINITY; n_kv * 6];
    for r in 0..6 {
        for c in 0..=2 + r {
            mask[r * n_kv + c] = 0.0;
        }
    }
    l.begin_ubatch(&[2, 3, 4, 5, 6, 7], &[0, 1, 2, 3, 4, 5]);
    l.mark_pruned(1, &[3, 5]); // pruned at layer 1: K/V in layers 0, 1 only
    l.mark_pruned(3, &[0]); // an earlier token pruned at layer 3
    assert_eq!(
        (l.depth(3), l.depth(0), l.depth(2), l.depth(100)),
        (2, 4, 6, 6)
    );
    for f16m in [false, true] {
        for nth in [1, 3] {
            let rows = [0i32, 2, 4, 5];
            let out = mask_out(&l, 2, &mask, n_kv, &rows, f16m, nth);
            for (i, &r) in rows.iter().enumerate() {
                for c in 0..n_kv {
                    let want = if c == 3 || c == 5 {
                        f32::NEG_INFINITY
                    } else {
                        mask[r as usize * n_kv + c]
                    };
                    assert_eq!(out[i * n_kv + c], want, "row {r} col {c}");
                }
            }
            // layers from 4: cell 0 is gone too
            let out = mask_out(&l, 4, &mask, n_kv, &[], f16m, nth);
            assert_eq!(out.len(), mask.len());
            for r in 0..6 {
                for c in 0..n_kv {
                    let want = if [0, 3, 5].contains(&c) {
                        f32::NEG_INFINITY
                    } else {
                        mask[r * n_kv + c]
                    };
                    assert_eq!(out[r * n_kv + c], want);
                }
            }
            // layer 1 still sees every cell
            assert_eq!(mask_out(&l, 1, &mask, n_kv, &[], f16m, nth), mask);
        }
    }
    // a new ubatch writing cell 3 gives it every layer again
    l.begin_ubatch(&[3], &[9]);
    assert_eq!(l.depth(3), 6);
    let out = mask_out(&l, 4, &mask, n_kv, &[5], false, 1);
    assert_eq!(out[3], mask[5 * n_kv + 3]);
    assert_eq!(out[5], f32::NEG_INFINITY);
    // a bad row is an error, not a read out of bounds
    let mb = f32_bytes(&mask);
    let md = desc(0, [n_kv as i64, 6, 1, 1], 4);
    let mut o = vec![0u8; n_kv * 4];
    assert!(l
        .mask(2, &mb, &md, &[6], &[], 0, 1024, 0, 1, &mut o)
        .is_err());
}

#[test]
fn stats_count_rows_per_layer() {
    let l = LazyRows::new(6, points()).unwrap();
    l.begin_ubatch(
        &(0..100).collect::<Vec<i64>>(),
        &(0..100).collect::<Vec<i32>>(),
    );
    l.count(0, 1, 100);
    l.count(2, 3, 50);
    l.count(4, 5, 25);
    let s = l.stats();
    assert_eq!(
        s["rows_per_layer"],
        serde_json::json!([100, 100, 50, 50, 25, 25])
    );
    assert_eq!(s["tokens"], 100);
    let f = s["row_fraction"].as_f64().unwrap();
    assert!((f - 350.0 / 600.0).abs() < 1e-12);
}
