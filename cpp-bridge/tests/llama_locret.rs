//! Locret on llama.cpp's cells (`llama_locret`), through the plugin's bridge
//! API as llama.cpp drives it: `locret_begin` before each ubatch, then one
//! `locret_score` per locret layer and ggml thread over ggml views of the
//! pre-RoPE q/k/v.
//!
//! - the scoring op equals the core's f64 reference (`RetainingHead::
//!   scores_f64_reference`), max over layers and KV heads, on strided views
//!   split over several threads, and with llama.cpp's interleaved q/k rows
//!   un-permuted to HF order;
//! - with one layer and one KV head (token score = the head's own score) the
//!   held positions equal the core's `LocretPolicy` after every ubatch, over
//!   chunked prefill, the final eviction at the first decode step and decode;
//! - with several layers and heads the evicted tokens are exactly the
//!   lowest token scores (`token_score`: raw max, or the max of z-scores /
//!   ranks over the held tokens per (layer, KV head), computed here from the
//!   f64 reference) among those the rule may evict;
//! - a hand-built case where one layer's scores are 100x larger: raw max,
//!   z-score max and rank max evict the three different sets worked out by
//!   hand; with one layer and one head every `token_score` keeps the core's
//!   positions;
//! - bad configs name the field.

use std::collections::BTreeSet;
use std::path::PathBuf;

use infinitehip::attention::AttnShape;
use infinitehip::config::{LocretConfig, ModelShape, TokenScore};
use infinitehip::kv::KvRead;
use infinitehip::policy::locret::{write_weights, LocretPolicy, RetainingHead};
use infinitehip::policy::{InsertInfo, Phase, Policy};
use infinitehip::rng::Rng;
use infinitehip::DType;
use infinitehip_bridge::ffi::{ModelInfo, TensorDesc};
use infinitehip_bridge::LlamaPlugin;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ihip-llama-locret-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn shape(n_layers: usize, nq: usize, nkv: usize, d: usize) -> ModelShape {
    ModelShape {
        n_layers,
        n_q_heads: nq,
        n_kv_heads: nkv,
        head_dim: d,
        rope_theta: 10000.0,
        max_position: 4096,
    }
}

fn info(m: &ModelShape) -> ModelInfo {
    ModelInfo {
        n_layers: m.n_layers as u32,
        n_q_heads: m.n_q_heads as u32,
        n_kv_heads: m.n_kv_heads as u32,
        head_dim: m.head_dim as u32,
        rope_theta: m.rope_theta,
        n_ctx_train: m.max_position as u32,
    }
}

/// Random heads for every layer, written to a safetensors file.
fn heads(m: &ModelShape, hidden: usize, seed: u64, name: &str) -> (Vec<RetainingHead>, String) {
    let hs: Vec<RetainingHead> = (0..m.n_layers)
        .map(|l| RetainingHead::random(m, hidden, seed + l as u64).unwrap())
        .collect();
    let p = tmp(name);
    write_weights(&p, &hs, DType::F32).unwrap();
    (hs, p.display().to_string())
}

fn locret_json(c: &LocretConfig, weights: &str) -> String {
    format!(
        r#"{{"dense_layers": 0, "default": {{"method": "locret", "budget": {}, "stabilizer": {}, "sink": {},
            "keep_last": {}, "stabilize_final_chunk": {}, "hidden": {}, "weights": "{weights}",
            "token_score": {}}}}}"#,
        c.budget,
        c.stabilizer,
        c.sink,
        c.keep_last,
        c.stabilize_final_chunk,
        c.hidden,
        serde_json::to_string(&c.token_score).unwrap()
    )
}

/// A ggml view `[d, heads, n, 1]` F32 of `x` (`[n][heads][d]`), each token's
/// row `pad` floats wider than `heads * d` (as a view into a fused QKV).
fn view_of(x: &[f32], d: usize, heads: usize, pad: usize) -> (Vec<u8>, TensorDesc) {
    let n = x.len() / (heads * d);
    let row = heads * d + pad;
    let mut buf = vec![0f32; n * row];
    for t in 0..n {
        buf[t * row..t * row + heads * d].copy_from_slice(&x[t * heads * d..(t + 1) * heads * d]);
        buf[t * row + heads * d..(t + 1) * row].fill(f32::NAN); // never read
    }
    let bytes: Vec<u8> = buf.iter().flat_map(|v| v.to_le_bytes()).collect();
    let desc = TensorDesc {
        dtype: 0,
        ne0: d as i64,
        ne1: heads as i64,
        ne2: n as i64,
        ne3: 1,
        nb0: 4,
        nb1: 4 * d as u64,
        nb2: 4 * row as u64,
        nb3: 4 * (row * n) as u64,
    };
    (bytes, desc)
}

/// llama.cpp's GGUF converter's q/k row permutation within each head
/// (`permute` in convert_hf_to_gguf.py): GGUF row 2i + j = HF row j*d/2 + i.
fn hf_to_gguf(x: &[f32], d: usize) -> Vec<f32> {
    let mut o = vec![0f32; x.len()];
    for (h, (src, dst)) in x.chunks_exact(d).zip(o.chunks_exact_mut(d)).enumerate() {
        let _ = h;
        for i in 0..d / 2 {
            for j in 0..2 {
                dst[2 * i + j] = src[j * d / 2 + i];
            }
        }
    }
    o
}

struct Tokens {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

fn random_tokens(m: &ModelShape, n: usize, rng: &mut Rng) -> Tokens {
    let (d, nq, nkv) = (m.head_dim, m.n_q_heads, m.n_kv_heads);
    Tokens {
        q: rng.normal_vec(n * nq * d, 1.0),
        k: rng.normal_vec(n * nkv * d, 1.0),
        v: rng.normal_vec(n * nkv * d, 1.0),
    }
}

/// Run every locret layer's scoring op over the ubatch, split over `nth`
/// threads (called one after another: the ops share nothing but the
/// ubatch's score slots). `layer_tokens[l]` are layer l's projections.
fn score_all(
    p: &LlamaPlugin,
    m: &ModelShape,
    layer_tokens: &[Tokens],
    nth: u32,
    interleaved: bool,
) {
    let (d, nq, nkv) = (m.head_dim, m.n_q_heads, m.n_kv_heads);
    p.locret_set_qk_interleaved(interleaved);
    for (l, t) in layer_tokens.iter().enumerate() {
        let (q, k) = if interleaved {
            (hf_to_gguf(&t.q, d), hf_to_gguf(&t.k, d))
        } else {
            (t.q.clone(), t.k.clone())
        };
        let (qb, qd) = view_of(&q, d, nq, 3);
        let (kb, kd) = view_of(&k, d, nkv, 2 * nkv * d);
        let (vb, vd) = view_of(&t.v, d, nkv, 0);
        for ith in 0..nth {
            p.locret_score(l as u32, &qb, &qd, &kb, &kd, &vb, &vd, &[], &qd, ith, nth)
                .unwrap();
        }
    }
}

/// Max over layers and KV heads of the core's f64 reference scores.
fn reference_scores(hs: &[RetainingHead], layer_tokens: &[Tokens], nkv: usize) -> Vec<f64> {
    let mut best: Vec<f64> = Vec::new();
    for (h, t) in hs.iter().zip(layer_tokens) {
        let s = h.scores_f64_reference(&t.q, &t.k, &t.v).unwrap();
        let per_tok: Vec<f64> = s
            .chunks_exact(nkv)
            .map(|r| r.iter().cloned().fold(f64::NEG_INFINITY, f64::max))
            .collect();
        if best.is_empty() {
            best = per_tok;
        } else {
            best.iter_mut()
                .zip(per_tok)
                .for_each(|(b, x)| *b = b.max(x));
        }
    }
    best
}

/// The core's f64 reference scores as the plugin's rows: per token, layer
/// after layer, each layer's KV heads.
fn reference_rows(hs: &[RetainingHead], layer_tokens: &[Tokens], nkv: usize) -> Vec<f64> {
    let per_layer: Vec<Vec<f64>> = hs
        .iter()
        .zip(layer_tokens)
        .map(|(h, t)| h.scores_f64_reference(&t.q, &t.k, &t.v).unwrap())
        .collect();
    let n = per_layer[0].len() / nkv;
    let mut out = Vec::with_capacity(n * nkv * hs.len());
    for t in 0..n {
        for l in &per_layer {
            out.extend_from_slice(&l[t * nkv..(t + 1) * nkv]);
        }
    }
    out
}

/// Token scores by `rule` from f64 rows (`width` per token) of the held
/// tokens; `None` rows (decoded) score +inf. Written out plainly here as
/// the reference for the plugin's `llama_locret_score`.
fn expected_token_scores(rule: TokenScore, rows: &[Option<Vec<f64>>], width: usize) -> Vec<f64> {
    let scored: Vec<&Vec<f64>> = rows.iter().flatten().collect();
    let m = scored.len() as f64;
    let norm = |c: usize, x: f64| -> f64 {
        let col: Vec<f64> = scored.iter().map(|r| r[c]).collect();
        match rule {
            TokenScore::RawMax => x,
            TokenScore::ZMax => {
                let mean = col.iter().sum::<f64>() / m;
                let sd = (col.iter().map(|y| (y - mean).powi(2)).sum::<f64>() / m).sqrt();
                (x - mean) / sd
            }
            TokenScore::RankMax => {
                let below = col.iter().filter(|&&y| y < x).count() as f64;
                let equal = col.iter().filter(|&&y| y == x).count() as f64;
                (below + (equal - 1.0) / 2.0) / (m - 1.0)
            }
            // The rows are the f32 scores widened: their exp does not
            // overflow at these magnitudes, so no shift is needed here.
            TokenScore::SoftMax | TokenScore::SoftSum => {
                x.exp() / col.iter().map(|y| y.exp()).sum::<f64>()
            }
        }
    };
    rows.iter()
        .map(|r| match r {
            None => f64::INFINITY,
            Some(r) if rule == TokenScore::SoftSum => (0..width).map(|c| norm(c, r[c])).sum(),
            Some(r) => (0..width)
                .map(|c| norm(c, r[c]))
                .fold(f64::NEG_INFINITY, f64::max),
        })
        .collect()
}

fn begin_seq0(p: &LlamaPlugin, pos: std::ops::Range<i32>) -> Vec<i32> {
    let pos: Vec<i32> = pos.collect();
    let n_seq = vec![1u32; pos.len()];
    let seqs = vec![0i32; pos.len()];
    p.locret_begin(&pos, &n_seq, &seqs).unwrap()
}

/// The scoring op equals the core's reference (max over layers and KV
/// heads), on strided views, over 1 and 3 threads, plain and with
/// interleaved q/k rows; a wrong row order is caught.
#[test]
fn scoring_op_equals_core_reference() {
    let m = shape(2, 4, 2, 8);
    let (hs, w) = heads(&m, 16, 11, "score.safetensors");
    let cfg = LocretConfig {
        budget: 1000,
        stabilizer: 4,
        keep_last: 2,
        hidden: 16,
        token_score: TokenScore::RawMax,
        ..LocretConfig::default()
    };
    let mut rng = Rng::new(5);
    for (nth, interleaved) in [(1, false), (3, false), (3, true)] {
        let p = LlamaPlugin::new(&locret_json(&cfg, &w), &info(&m)).unwrap();
        let n = 37;
        let toks: Vec<Tokens> = (0..2).map(|_| random_tokens(&m, n, &mut rng)).collect();
        assert!(begin_seq0(&p, 0..n as i32).is_empty());
        score_all(&p, &m, &toks, nth, interleaved);
        assert!(begin_seq0(&p, n as i32..n as i32 + 1).is_empty()); // folds the prompt
        let got = p.locret().unwrap().held_units(0);
        let want = reference_scores(&hs, &toks, m.n_kv_heads);
        assert_eq!(got.len(), n);
        for (u, w) in got.iter().zip(&want) {
            assert!(
                (u.score as f64 - w).abs() <= 1e-5 * w.abs().max(1.0),
                "nth {nth} interleaved {interleaved}: pos {} score {} vs reference {w}",
                u.pos,
                u.score
            );
        }
        // The held rows: every (layer, KV head)'s own score.
        let rows = p.locret().unwrap().held_rows(0);
        let per_head = reference_rows(&hs, &toks, m.n_kv_heads);
        assert_eq!(rows.len(), per_head.len());
        for (i, (x, w)) in rows.iter().zip(&per_head).enumerate() {
            assert!(
                (*x as f64 - w).abs() <= 1e-5 * w.abs().max(1.0),
                "row slot {i}: {x} vs {w}"
            );
        }
        let st: serde_json::Value = serde_json::from_str(&p.stats_json()).unwrap();
        assert_eq!(st["locret"]["scored_tokens"], n as u64);
    }
    // Interleaved rows read as HF order give other scores: the test can fail.
    let p = LlamaPlugin::new(&locret_json(&cfg, &w), &info(&m)).unwrap();
    let toks: Vec<Tokens> = (0..2).map(|_| random_tokens(&m, 9, &mut rng)).collect();
    begin_seq0(&p, 0..9);
    let perm: Vec<Tokens> = toks
        .iter()
        .map(|t| Tokens {
            q: hf_to_gguf(&t.q, 8),
            k: hf_to_gguf(&t.k, 8),
            v: t.v.clone(),
        })
        .collect();
    score_all(&p, &m, &perm, 1, false);
    begin_seq0(&p, 9..10);
    let got = p.locret().unwrap().held_units(0);
    let want = reference_scores(&hs, &toks, 2);
    assert!(got
        .iter()
        .zip(&want)
        .any(|(u, w)| (u.score as f64 - w).abs() > 1e-3 * w.abs().max(1.0)));
}

/// The sequence's KV as `after_append` sees it (only its length is read).
struct Len(usize, usize);
impl KvRead for Len {
    fn len(&self) -> usize {
        self.0
    }
    fn n_kv_heads(&self) -> usize {
        self.1
    }
    fn head_dim(&self) -> usize {
        unreachable!()
    }
    fn dot_key(&self, _: usize, _: usize, _: &[f32]) -> f32 {
        unreachable!()
    }
    fn read_key(&self, _: usize, _: usize, _: &mut [f32]) {
        unreachable!()
    }
    fn read_value(&self, _: usize, _: usize, _: &mut [f32]) {
        unreachable!()
    }
}

/// One layer, one KV head: the token score is the head's score, so the
/// llama.cpp eviction must keep exactly the core policy's positions.
fn twin(cfg: LocretConfig, chunks: &[usize], n_decode: usize, seed: u64) {
    let m = shape(1, 2, 1, 8);
    let (hs, w) = heads(&m, cfg.hidden, seed, &format!("twin{seed}.safetensors"));
    let p = LlamaPlugin::new(&locret_json(&cfg, &w), &info(&m)).unwrap();
    let mut core = LocretPolicy::with_head(cfg.clone(), hs[0].clone(), 0).unwrap();
    let ashape = AttnShape::new(2, 1, 8).unwrap();
    let mut rng = Rng::new(seed);
    let mut pos = 0i32;
    let mut evicted_total = 0usize;
    let steps: Vec<usize> = chunks
        .iter()
        .copied()
        .chain(std::iter::repeat_n(1, n_decode))
        .collect();
    for (i, &n) in steps.iter().enumerate() {
        let decode = i >= chunks.len();
        let toks = random_tokens(&m, n, &mut rng);
        // llama.cpp side: begin (eviction owed so far), then score.
        let rm = begin_seq0(&p, pos..pos + n as i32);
        evicted_total += rm
            .chunks_exact(3)
            .map(|r| (r[2] - r[1]) as usize)
            .sum::<usize>();
        score_all(&p, &m, std::slice::from_ref(&toks), 2, false);
        // core side: append this chunk (the prompt's last chunk says prompt_done).
        let held = core.held_positions(0).map_or(0, |h| h[0].len());
        let ins = InsertInfo {
            seq: 0,
            shape: ashape,
            phase: if decode {
                Phase::Decode
            } else {
                Phase::Prefill
            },
            start: held,
            q: &toks.q,
            k: &toks.k,
            v: &toks.v,
            kv: &Len(held + n, 1),
            prompt_done: !decode && i + 1 == chunks.len(),
        };
        core.after_append(&ins).unwrap();
        // Compare what both hold before this step's tokens.
        let want: Vec<i32> = core.held_positions(0).unwrap()[0]
            .iter()
            .map(|&x| x as i32)
            .filter(|&x| x < pos)
            .collect();
        let got = p.locret().unwrap().held_positions(0);
        assert_eq!(got, want, "step {i} ({n} tokens at {pos}), cfg {cfg:?}");
        pos += n as i32;
    }
    let total: usize = chunks.iter().sum();
    assert!(
        evicted_total > 0 && evicted_total < total,
        "{evicted_total} of {total}"
    );
    let st: serde_json::Value = serde_json::from_str(&p.stats_json()).unwrap();
    assert_eq!(st["locret"]["evicted_tokens"], evicted_total as u64);
}

/// One layer and one KV head: every `token_score` is monotone in the head's
/// own score, so each keeps exactly the core's (and the raw max's) positions.
#[test]
fn one_head_eviction_equals_core_policy() {
    for rule in [
        TokenScore::RawMax,
        TokenScore::ZMax,
        TokenScore::RankMax,
        TokenScore::SoftMax,
        TokenScore::SoftSum,
    ] {
        one_head_cases(rule);
    }
}

fn one_head_cases(token_score: TokenScore) {
    let base = LocretConfig {
        budget: 24,
        stabilizer: 8,
        keep_last: 4,
        sink: 0,
        hidden: 16,
        token_score,
        ..LocretConfig::default()
    };
    twin(base.clone(), &[16; 7], 5, 1);
    twin(
        LocretConfig {
            sink: 3,
            ..base.clone()
        },
        &[10, 16, 16, 5, 16, 16],
        4,
        2,
    );
    twin(
        LocretConfig {
            stabilize_final_chunk: false,
            ..base.clone()
        },
        &[16; 6],
        3,
        3,
    );
    // Small budget, stabilizer + sink just below it, long keep_last.
    twin(
        LocretConfig {
            budget: 10,
            stabilizer: 8,
            keep_last: 8,
            sink: 1,
            ..base
        },
        &[16; 5],
        2,
        4,
    );
}

/// Several layers and KV heads: each eviction removes exactly the lowest
/// token scores (per `token_score`, over the tokens held at that eviction)
/// among those the rule lets go (not pinned, not in the stabilizer window,
/// not sinks), down to the budget.
#[test]
fn evicts_lowest_token_scores() {
    for rule in [
        TokenScore::RawMax,
        TokenScore::ZMax,
        TokenScore::RankMax,
        TokenScore::SoftMax,
        TokenScore::SoftSum,
    ] {
        evicts_lowest(rule);
    }
}

fn evicts_lowest(token_score: TokenScore) {
    let m = shape(3, 4, 2, 8);
    let (hs, w) = heads(&m, 16, 21, "multi.safetensors");
    let cfg = LocretConfig {
        budget: 20,
        stabilizer: 6,
        keep_last: 3,
        sink: 2,
        hidden: 16,
        token_score,
        ..LocretConfig::default()
    };
    let width = 3 * m.n_kv_heads;
    let p = LlamaPlugin::new(&locret_json(&cfg, &w), &info(&m)).unwrap();
    let mut rng = Rng::new(9);
    // Per position: its reference row (None: decoded).
    let mut row_of: Vec<Option<Vec<f64>>> = Vec::new();
    let mut held: Vec<i32> = Vec::new();
    let mut pos = 0i32;
    for (i, n) in [12usize, 12, 12, 12, 1, 1].into_iter().enumerate() {
        let decode = n == 1;
        let rm = begin_seq0(&p, pos..pos + n as i32);
        // Expected: the rule over (pos, max score) pairs held so far.
        let mut pinned: BTreeSet<i32> = BTreeSet::new();
        if decode && i == 4 {
            pinned.extend((pos - cfg.keep_last as i32)..pos);
        }
        let want_gone: Vec<i32> = if i == 0 || (decode && i > 4) {
            Vec::new()
        } else {
            let free = held.iter().filter(|p| !pinned.contains(p)).count();
            let need = free.saturating_sub(cfg.budget);
            let held_rows: Vec<Option<Vec<f64>>> =
                held.iter().map(|&p| row_of[p as usize].clone()).collect();
            let scores = expected_token_scores(token_score, &held_rows, width);
            let score_at = |p: i32| scores[held.iter().position(|&h| h == p).unwrap()];
            let from = held.len().saturating_sub(cfg.stabilizer);
            let mut cands: Vec<i32> = held[..from]
                .iter()
                .copied()
                .filter(|p| !pinned.contains(p) && *p >= cfg.sink as i32)
                .collect();
            cands.sort_by(|a, b| score_at(*a).total_cmp(&score_at(*b)));
            let mut g: Vec<i32> = cands[..need.min(cands.len())].to_vec();
            g.sort_unstable();
            g
        };
        let mut gone = Vec::new();
        for r in rm.chunks_exact(3) {
            assert_eq!(r[0], 0);
            gone.extend(r[1]..r[2]);
        }
        assert_eq!(gone, want_gone, "step {i}, {token_score:?}");
        held.retain(|p| !gone.contains(p));
        let toks: Vec<Tokens> = (0..3).map(|_| random_tokens(&m, n, &mut rng)).collect();
        score_all(&p, &m, &toks, 2, false);
        if decode {
            row_of.push(None);
        } else {
            let rows = reference_rows(&hs, &toks, m.n_kv_heads);
            row_of.extend(rows.chunks_exact(width).map(|r| Some(r.to_vec())));
        }
        held.extend(pos..pos + n as i32);
        pos += n as i32;
        if (2..5).contains(&i) {
            assert!(!gone.is_empty(), "step {i} evicted nothing");
        }
    }
    // After the final eviction: budget + keep_last pinned + decoded.
    begin_seq0(&p, pos..pos + 1);
    assert_eq!(
        p.locret().unwrap().held_positions(0).len(),
        cfg.budget + cfg.keep_last + 2
    );
}

/// A rewound sequence (tokens at positions it holds) drops its units from
/// there; several sequences in one ubatch are kept apart.
#[test]
fn rewind_and_sequences() {
    let m = shape(1, 2, 1, 8);
    let cfg = LocretConfig {
        budget: 100,
        stabilizer: 4,
        keep_last: 2,
        hidden: 8,
        ..LocretConfig::default()
    };
    let (_, w) = heads(&m, 8, 31, "rewind.safetensors");
    let p = LlamaPlugin::new(&locret_json(&cfg, &w), &info(&m)).unwrap();
    let mut rng = Rng::new(3);
    // seq 0: positions 0..6, seq 1: 0..4, in one ubatch; token 0 shared.
    let pos = [0, 1, 2, 3, 4, 5, 1, 2, 3];
    let n_seq = [2, 1, 1, 1, 1, 1, 1, 1, 1];
    let seqs = [0, 1, 0, 0, 0, 0, 0, 1, 1, 1];
    p.locret_begin(&pos, &n_seq, &seqs).unwrap();
    score_all(&p, &m, &[random_tokens(&m, 9, &mut rng)], 1, false);
    p.locret_begin(&[3], &[1], &[0]).unwrap(); // seq 0 rewinds to 3
    let l = p.locret().unwrap();
    assert_eq!(l.held_positions(0), vec![0, 1, 2]);
    assert_eq!(l.held_positions(1), vec![0, 1, 2, 3]);
    let st: serde_json::Value = serde_json::from_str(&p.stats_json()).unwrap();
    assert_eq!(st["locret"]["rewinds"], 1);
    // Scoring a ubatch of another size than the one begun is an error.
    let t = random_tokens(&m, 4, &mut rng);
    let (qb, qd) = view_of(&t.q, 8, 2, 0);
    let (kb, kd) = view_of(&t.k, 8, 1, 0);
    let e = p
        .locret_score(0, &qb, &qd, &kb, &kd, &kb, &kd, &[], &qd, 0, 1)
        .unwrap_err();
    assert!(e.contains("ubatch"), "{e}");
    let e = p.locret_begin(&[1, 2], &[1], &[0]).unwrap_err();
    assert!(e.contains("locret ubatch"), "{e}");
}

#[test]
fn bad_configs_name_the_field() {
    let m = shape(2, 4, 2, 8);
    let (_, w) = heads(&m, 16, 41, "cfg.safetensors");
    let mi = info(&m);
    let err = |json: &str| LlamaPlugin::new(json, &mi).err().unwrap().to_string();
    let e = err(r#"{"dense_layers": 0, "default": {"method": "locret", "hidden": 16}}"#);
    assert!(e.contains(".weights") && e.contains("safetensors"), "{e}");
    let e = err(
        r#"{"dense_layers": 0, "default": {"method": "locret", "hidden": 16, "weights": "/nonexistent/w.safetensors"}}"#,
    );
    assert!(
        e.contains("locret.weights") && e.contains("/nonexistent/w.safetensors"),
        "{e}"
    );
    // Heads written for another geometry (8 KV heads' worth of input).
    let (_, w8) = heads(&shape(2, 4, 8, 8), 16, 42, "other.safetensors");
    let e = err(&format!(
        r#"{{"dense_layers": 0, "default": {{"method": "locret", "hidden": 16, "weights": "{w8}"}}}}"#
    ));
    assert!(e.contains("locret.weights") && e.contains("fc1"), "{e}");
    let e = err(&format!(
        r#"{{"dense_layers": 0, "default": {{"method": "locret", "hidden": 32, "weights": "{w}"}}}}"#
    ));
    assert!(e.contains("locret.weights") && e.contains("fc1"), "{e}");
    let e = err(&format!(
        r#"{{"dense_layers": 0, "default": {{"method": "locret", "hidden": 16, "weights": "{w}"}},
            "overrides": [{{"layers": [1], "policy": {{"method": "locret", "hidden": 16, "budget": 7000, "weights": "{w}"}}}}]}}"#
    ));
    assert!(e.contains("layer 1 locret.budget"), "{e}");
    let e = err(&format!(
        r#"{{"dense_layers": 0, "default": {{"method": "locret", "hidden": 16, "weights": "{w}"}},
            "overrides": [{{"layers": [1], "policy": {{"method": "locret", "hidden": 16, "token_score": "raw_max", "weights": "{w}"}}}}]}}"#
    ));
    assert!(e.contains("layer 1 locret.token_score"), "{e}");
    let e = err(&format!(
        r#"{{"dense_layers": 0, "default": {{"method": "locret", "hidden": 16, "token_score": "median", "weights": "{w}"}}}}"#
    ));
    assert!(
        e.contains("token_score") && e.contains("median") && e.contains("z_max"),
        "{e}"
    );
    let e = err(&format!(
        r#"{{"dense_layers": 0, "default": {{"method": "locret", "hidden": 16, "weights": "{w}"}},
            "overrides": [{{"layers": [1], "policy": {{"method": "hip"}}}}]}}"#
    ));
    assert!(e.contains("layer 1 method") && e.contains("hip"), "{e}");
    // Dense layers next to locret are fine.
    let p = LlamaPlugin::new(
        &format!(r#"{{"dense_layers": 1, "default": {{"method": "locret", "hidden": 16, "weights": "{w}"}}}}"#),
        &mi,
    )
    .unwrap();
    assert!(!p.locret_layer(0) && p.locret_layer(1) && p.locret_on());
    assert_eq!(
        p.summary(),
        "layer 0: dense (llama.cpp attention), layer 1: locret (llama.cpp attention, token eviction)"
    );
}

/// Scores computed the way the ggml graph does (patch 0003's
/// `llama_ihip_locret_mlp`): x = llama.cpp's rows `[q | k | v]` as they come
/// (`q` `[n][nq][d]`, `k`, `v` `[n][nkv][d]`), `fc2 · silu(fc1_graph · x)`
/// in f32, as a ggml tensor `[nkv, n]`.
fn graph_scores(
    p: &LlamaPlugin,
    m: &ModelShape,
    l: u32,
    t: &Tokens,
    inter: bool,
) -> (Vec<u8>, TensorDesc) {
    let (d, nq, nkv) = (m.head_dim, m.n_q_heads, m.n_kv_heads);
    let w1 = p.locret_graph_fc1(l, inter).unwrap();
    let w2 = p.locret_graph_fc2(l).unwrap();
    let input = (nq + 2 * nkv) * d;
    let hidden = w2.len() / nkv;
    assert_eq!(w1.len(), hidden * input);
    let n = t.v.len() / (nkv * d);
    let mut s = vec![0f32; n * nkv];
    for tok in 0..n {
        let x: Vec<f32> = t.q[tok * nq * d..(tok + 1) * nq * d]
            .iter()
            .chain(&t.k[tok * nkv * d..(tok + 1) * nkv * d])
            .chain(&t.v[tok * nkv * d..(tok + 1) * nkv * d])
            .copied()
            .collect();
        let h: Vec<f32> = w1
            .chunks_exact(input)
            .map(|row| {
                let a: f32 = row.iter().zip(&x).map(|(w, x)| w * x).sum();
                a / (1.0 + (-a).exp())
            })
            .collect();
        for (hd, row) in w2.chunks_exact(hidden).enumerate() {
            s[tok * nkv + hd] = row.iter().zip(&h).map(|(w, h)| w * h).sum();
        }
    }
    let bytes: Vec<u8> = s.iter().flat_map(|v| v.to_le_bytes()).collect();
    let desc = TensorDesc {
        dtype: 0,
        ne0: nkv as i64,
        ne1: n as i64,
        ne2: 1,
        ne3: 1,
        nb0: 4,
        nb1: 4 * nkv as u64,
        nb2: 4 * (nkv * n) as u64,
        nb3: 4 * (nkv * n) as u64,
    };
    (bytes, desc)
}

/// The ggml path's Rust side (`locret_graph_fc1/fc2`, `locret_record`,
/// `locret_check`): fc1 with its q/k columns moved to llama.cpp's
/// interleaved row order, applied to llama.cpp's rows as they are, gives the
/// core's scores; scores computed that way and folded by `locret_record`
/// equal the core's f64 reference (max over layers and KV heads), as the
/// Rust scoring op's do; `locret_check` reports f32 rounding for them and a
/// large error for a wrong column order; a wrong score shape is an error.
#[test]
fn graph_path_weights_record_and_check() {
    let m = shape(2, 4, 2, 8);
    let (hs, w) = heads(&m, 16, 21, "graph.safetensors");
    let cfg = LocretConfig {
        budget: 1000,
        stabilizer: 4,
        keep_last: 2,
        hidden: 16,
        token_score: TokenScore::RawMax,
        ..LocretConfig::default()
    };
    let mut rng = Rng::new(9);
    let n = 29;
    for inter in [false, true] {
        let p = LlamaPlugin::new(&locret_json(&cfg, &w), &info(&m)).unwrap();
        p.locret_set_qk_interleaved(inter);
        let toks: Vec<Tokens> = (0..2).map(|_| random_tokens(&m, n, &mut rng)).collect();
        assert!(begin_seq0(&p, 0..n as i32).is_empty());
        for (l, t) in toks.iter().enumerate() {
            // llama.cpp's rows: GGUF order for q/k when interleaved
            let rows = Tokens {
                q: if inter {
                    hf_to_gguf(&t.q, 8)
                } else {
                    t.q.clone()
                },
                k: if inter {
                    hf_to_gguf(&t.k, 8)
                } else {
                    t.k.clone()
                },
                v: t.v.clone(),
            };
            let (sb, sd) = graph_scores(&p, &m, l as u32, &rows, inter);
            let (qb, qd) = view_of(&rows.q, 8, 4, 0);
            let (kb, kd) = view_of(&rows.k, 8, 2, 0);
            let (vb, vd) = view_of(&rows.v, 8, 2, 0);
            p.locret_check(l as u32, &sb, &sd, &qb, &qd, &kb, &kd, &vb, &vd)
                .unwrap();
            p.locret_record(l as u32, &sb, &sd, &[], &sd).unwrap();
        }
        assert!(begin_seq0(&p, n as i32..n as i32 + 1).is_empty());
        let got = p.locret().unwrap().held_units(0);
        let want = reference_scores(&hs, &toks, m.n_kv_heads);
        assert_eq!(got.len(), n);
        for (u, w) in got.iter().zip(&want) {
            assert!(
                (u.score as f64 - w).abs() <= 1e-5 * w.abs().max(1.0),
                "interleaved {inter}: pos {} score {} vs reference {w}",
                u.pos,
                u.score
            );
        }
        let st: serde_json::Value = serde_json::from_str(&p.stats_json()).unwrap();
        let err = st["locret"]["check_max_rel_err"].as_f64().unwrap();
        assert!(err <= 1e-5, "check_max_rel_err {err}");
        assert_eq!(st["locret"]["check_scores"], (2 * n * 2) as u64);
        assert_eq!(st["locret"]["scored_tokens"], n as u64);
    }
    // fc1 in interleaved column order on HF rows: the check sees it.
    let p = LlamaPlugin::new(&locret_json(&cfg, &w), &info(&m)).unwrap();
    let t = random_tokens(&m, 7, &mut rng);
    begin_seq0(&p, 0..7);
    let (sb, sd) = graph_scores(&p, &m, 0, &t, true);
    let (qb, qd) = view_of(&t.q, 8, 4, 0);
    let (kb, kd) = view_of(&t.k, 8, 2, 0);
    let (vb, vd) = view_of(&t.v, 8, 2, 0);
    p.locret_check(0, &sb, &sd, &qb, &qd, &kb, &kd, &vb, &vd)
        .unwrap();
    let st: serde_json::Value = serde_json::from_str(&p.stats_json()).unwrap();
    let err = st["locret"]["check_max_rel_err"].as_f64().unwrap();
    assert!(err > 1e-3, "wrong column order not seen: {err}");
    // scores of the wrong shape
    let bad = TensorDesc { ne0: 1, ..sd };
    let e = p.locret_record(0, &sb, &bad, &[], &sd).unwrap_err();
    assert!(e.contains("graph scores"), "{e}");
    // Decode steps need no scoring; once the graph holds the heads, the
    // plugin's copies go: recording works, the Rust op names the reason.
    assert!(!p.locret_ubatch_decoded());
    begin_seq0(&p, 7..8);
    assert!(p.locret_ubatch_decoded());
    begin_seq0(&p, 8..10);
    assert!(!p.locret_ubatch_decoded());
    p.locret_release_heads();
    let t2 = random_tokens(&m, 2, &mut rng);
    let (sb, sd) = graph_scores_of(&m, 2, 7.0);
    p.locret_record(0, &sb, &sd, &[], &sd).unwrap();
    let (qb, qd) = view_of(&t2.q, 8, 4, 0);
    let (kb, kd) = view_of(&t2.k, 8, 2, 0);
    let (vb, vd) = view_of(&t2.v, 8, 2, 0);
    let e = p
        .locret_score(1, &qb, &qd, &kb, &kd, &vb, &vd, &[], &qd, 0, 1)
        .unwrap_err();
    assert!(e.contains("released"), "{e}");
    assert!(p.locret_graph_fc1(0, false).is_err());
}

/// A constant score tensor `[nkv, n]`.
fn graph_scores_of(m: &ModelShape, n: usize, x: f32) -> (Vec<u8>, TensorDesc) {
    let nkv = m.n_kv_heads;
    let bytes: Vec<u8> = (0..n * nkv).flat_map(|_| x.to_le_bytes()).collect();
    let desc = TensorDesc {
        dtype: 0,
        ne0: nkv as i64,
        ne1: n as i64,
        ne2: 1,
        ne3: 1,
        nb0: 4,
        nb1: 4 * nkv as u64,
        nb2: 4 * (nkv * n) as u64,
        nb3: 4 * (nkv * n) as u64,
    };
    (bytes, desc)
}

/// A score tensor `[nkv = 1, n]` holding `x`.
fn graph_scores_vec(x: &[f32]) -> (Vec<u8>, TensorDesc) {
    let n = x.len();
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let desc = TensorDesc {
        dtype: 0,
        ne0: 1,
        ne1: n as i64,
        ne2: 1,
        ne3: 1,
        nb0: 4,
        nb1: 4,
        nb2: 4 * n as u64,
        nb3: 4 * n as u64,
    };
    (bytes, desc)
}

/// Two layers, one KV head each, layer 0's scores 100x layer 1's: 8 prompt
/// tokens, then the final eviction (budget 4, keep_last 1 pins position 7,
/// stabilizer 1) evicts 3 of positions 0..=6. Expected sets by hand:
/// - raw max = layer 0 alone (100..800): evicts 0, 1, 2;
/// - z_max: layer 0 z = (a - 450) / 229.13 = -1.528 -1.091 -0.655 -0.218
///   0.218 0.655 1.091 1.528; layer 1 (mean 0.4875, sd 0.2713) z = 1.521
///   1.152 0.783 -1.428 -1.060 -0.691 -0.323 0.046; max = 1.521 1.152 0.783
///   -0.218 0.218 0.655 1.091 (1.528): evicts 3, 4, 5;
/// - rank_max (ranks / 7): layer 0 ranks 0..7, layer 1 ranks 7 6 5 0 1 2 3 4;
///   max = 7 6 5 3 4 5 6 (7): evicts 3, 4 and the older of the tie at 5: 2.
#[test]
fn large_scale_layer_does_not_decide_alone() {
    let m = shape(2, 2, 1, 8);
    let (_, w) = heads(&m, 16, 51, "scale.safetensors");
    let layer0: Vec<f32> = (1..=8).map(|i| 100.0 * i as f32).collect();
    let layer1 = [0.9f32, 0.8, 0.7, 0.1, 0.2, 0.3, 0.4, 0.5];
    for (rule, want) in [
        (TokenScore::RawMax, vec![0, 1, 2]),
        (TokenScore::ZMax, vec![3, 4, 5]),
        (TokenScore::RankMax, vec![2, 3, 4]),
        // Layer 0's softmax gives token 7 (protected) a share of ~1 and the
        // others < e^-100: layer 1's near-uniform shares decide, as z_max.
        (TokenScore::SoftMax, vec![3, 4, 5]),
        (TokenScore::SoftSum, vec![3, 4, 5]),
    ] {
        let cfg = LocretConfig {
            budget: 4,
            stabilizer: 1,
            keep_last: 1,
            sink: 0,
            hidden: 16,
            token_score: rule,
            ..LocretConfig::default()
        };
        let p = LlamaPlugin::new(&locret_json(&cfg, &w), &info(&m)).unwrap();
        assert!(begin_seq0(&p, 0..8).is_empty());
        for (l, x) in [&layer0[..], &layer1[..]].into_iter().enumerate() {
            let (sb, sd) = graph_scores_vec(x);
            p.locret_record(l as u32, &sb, &sd, &[], &sd).unwrap();
        }
        let rm = begin_seq0(&p, 8..9);
        let gone: Vec<i32> = rm.chunks_exact(3).flat_map(|r| r[1]..r[2]).collect();
        assert_eq!(gone, want, "{rule:?}");
        let held = p.locret().unwrap().held_positions(0);
        assert_eq!(held.len(), 5, "{rule:?}: {held:?}");
    }
}
