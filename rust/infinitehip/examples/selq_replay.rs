//! Replays a layer policy's selection offline over real q/k/v dumped from
//! llama.cpp (`INFINITEHIP_DUMP_QKV=DIR`, see cpp-bridge/src/llama.rs) and
//! measures, per scored query, what the selection loses against dense
//! attention: attention mass kept (recall), relative output error, keys kept.
//!
//!   cargo run --release -p infinitehip --example selq_replay -- DIR CONFIG.json \
//!       --prefill P [--from A] [--to B] [--layers 3,10,20] [--mode decode|prefill] [--ubatch 512]
//!
//! The policy is driven as the llama.cpp plugin drives it: prefill ubatches
//! of `--ubatch` queries up to P, `after_append` with `prompt_done` at P,
//! then one decode query per position P.. . `--mode prefill` instead selects
//! the scored positions A..B as prefill ubatches too (the same positions
//! through the prefill path). Dump files per layer: `L{l}.q.f32`
//! `[t][n_q_heads][d]`, `L{l}.k.f32` and `L{l}.v.f32` `[t][n_kv_heads][d]`.

use infinitehip::attention::AttnShape;
use infinitehip::config::PolicyConfig;
use infinitehip::engine::build_policy;
use infinitehip::kv::SeqView;
use infinitehip::policy::{InsertInfo, Phase, SelectRequest, Selection};

fn read_f32(path: &str) -> Vec<f32> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// `[t][h][d]` -> `[h][t][d]` for the first `len` tokens.
fn head_major(x: &[f32], h: usize, d: usize, len: usize) -> Vec<f32> {
    let mut out = vec![0f32; h * len * d];
    for t in 0..len {
        for j in 0..h {
            out[(j * len + t) * d..(j * len + t + 1) * d]
                .copy_from_slice(&x[(t * h + j) * d..(t * h + j + 1) * d]);
        }
    }
    out
}

struct Stats {
    n: usize,
    recall: f64,
    err: f64,
    kept: f64,
    sink_miss: usize,
    /// Mass of the same number of keys chosen by true score (per q head).
    oracle: f64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = &args[1];
    let cfg: PolicyConfig =
        serde_json::from_str(&std::fs::read_to_string(&args[2]).unwrap()).unwrap();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .map(|i| args[i + 1].clone())
    };
    let p: usize = opt("--prefill").expect("--prefill").parse().unwrap();
    let from: usize = opt("--from").map_or(p, |v| v.parse().unwrap());
    let ubatch: usize = opt("--ubatch").map_or(512, |v| v.parse().unwrap());
    let mode = opt("--mode").unwrap_or_else(|| "decode".into());
    let m = cfg.model;
    let (hq, hk, d) = (m.n_q_heads, m.n_kv_heads, m.head_dim);
    let shape = AttnShape::new(hq, hk, d).unwrap();
    let layers: Vec<usize> = opt("--layers").map_or((0..m.n_layers).collect(), |v| {
        v.split(',').map(|x| x.parse().unwrap()).collect()
    });
    if args.iter().any(|a| a == "--diag") {
        return sink_diag(dir, &cfg, p, &layers);
    }
    println!("layer  queries  recall   rel_err  kept_frac  sink_miss  oracle_recall");
    for &l in &layers {
        let q = read_f32(&format!("{dir}/L{l}.q.f32"));
        let kr = read_f32(&format!("{dir}/L{l}.k.f32"));
        let vr = read_f32(&format!("{dir}/L{l}.v.f32"));
        let n_tok = kr.len() / (hk * d);
        let to: usize = opt("--to").map_or(n_tok, |v| v.parse().unwrap());
        let mut pol = build_policy(cfg.layer_policy(l), &cfg, l, None).unwrap();
        let qe = hq * d;
        // Prefill ubatches: up to P (decode mode) or up to `to` (prefill mode).
        let pre_end = if mode == "prefill" { to } else { p };
        let mut st = Stats {
            n: 0,
            recall: 0.0,
            err: 0.0,
            kept: 0.0,
            sink_miss: 0,
            oracle: 0.0,
        };
        let mut sels: Vec<(usize, Selection)> = Vec::new();
        for u0 in (0..pre_end).step_by(ubatch) {
            let u1 = (u0 + ubatch).min(pre_end);
            let k = head_major(&kr, hk, d, u1);
            let v = head_major(&vr, hk, d, u1);
            let kv = SeqView::from_contiguous(hk, d, u1, &k, &v);
            let chunk = pol.prefill_chunk().unwrap_or(u1 - u0).max(1);
            for c0 in (u0..u1).step_by(chunk) {
                let c1 = (c0 + chunk).min(u1);
                let out = pol
                    .select(&SelectRequest {
                        seq: 0,
                        shape,
                        phase: Phase::Prefill,
                        queries: &q[c0 * qe..c1 * qe],
                        q_start: c0,
                        kv: &kv,
                    })
                    .unwrap();
                let qb = out.q_block.max(1);
                for t in c0.max(from)..c1.min(to) {
                    sels.push((t, out.blocks[(t - c0) / qb].clone()));
                }
            }
        }
        if mode != "prefill" {
            for t in p..to {
                let k = head_major(&kr, hk, d, t + 1);
                let v = head_major(&vr, hk, d, t + 1);
                let kv = SeqView::from_contiguous(hk, d, t + 1, &k, &v);
                if t == p {
                    let pk = head_major(&kr, hk, d, p);
                    let pv = head_major(&vr, hk, d, p);
                    let pkv = SeqView::from_contiguous(hk, d, p, &pk, &pv);
                    pol.after_append(&InsertInfo {
                        seq: 0,
                        shape,
                        phase: Phase::Prefill,
                        start: 0,
                        q: &[],
                        k: &[],
                        v: &[],
                        kv: &pkv,
                        prompt_done: true,
                    })
                    .unwrap();
                }
                let out = pol
                    .select(&SelectRequest {
                        seq: 0,
                        shape,
                        phase: Phase::Decode,
                        queries: &q[t * qe..(t + 1) * qe],
                        q_start: t,
                        kv: &kv,
                    })
                    .unwrap();
                if t >= from {
                    sels.push((t, out.blocks[0].clone()));
                }
            }
        }
        for (t, sel) in &sels {
            let sel = sel.clipped(t + 1);
            for h in 0..hq {
                let kh = h / (hq / hk);
                let qv = &q[t * qe + h * d..t * qe + (h + 1) * d];
                let s: Vec<f64> = (0..=*t)
                    .map(|j| {
                        let kk = &kr[(j * hk + kh) * d..(j * hk + kh + 1) * d];
                        qv.iter().zip(kk).map(|(a, b)| (a * b) as f64).sum::<f64>()
                            * shape.scale as f64
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let (mut od, mut os) = (vec![0f64; d], vec![0f64; d]);
                let (mut zd, mut zs) = (0f64, 0f64);
                let mut kept = 0usize;
                for j in 0..=*t {
                    let vv = &vr[(j * hk + kh) * d..(j * hk + kh + 1) * d];
                    zd += w[j];
                    od.iter_mut()
                        .zip(vv)
                        .for_each(|(o, &x)| *o += w[j] * x as f64);
                    if sel.contains(kh, j) {
                        kept += 1;
                        zs += w[j];
                        os.iter_mut()
                            .zip(vv)
                            .for_each(|(o, &x)| *o += w[j] * x as f64);
                    }
                }
                let (mut num, mut den) = (0f64, 0f64);
                for i in 0..d {
                    let a = od[i] / zd;
                    let b = if zs > 0.0 { os[i] / zs } else { 0.0 };
                    num += (a - b) * (a - b);
                    den += a * a;
                }
                st.n += 1;
                st.recall += zs / zd;
                st.err += (num / den.max(1e-30)).sqrt();
                st.kept += kept as f64 / (*t + 1) as f64;
                st.sink_miss += usize::from(!sel.contains(kh, 0));
                let mut ws = w.clone();
                ws.sort_unstable_by(|a, b| b.total_cmp(a));
                st.oracle += ws[..kept].iter().sum::<f64>() / zd;
            }
        }
        let n = st.n.max(1) as f64;
        println!(
            "{l:5} {:8} {:8.4} {:9.4} {:9.3} {:9} {:9.4}",
            st.n / hq,
            st.recall / n,
            st.err / n,
            st.kept / n,
            st.sink_miss,
            st.oracle / n
        );
    }
}

/// `--diag`: where squeeze puts key 0 (the attention sink) and what the
/// lookup estimates for it, per KV head, for the first decode query.
#[allow(dead_code)]
pub fn sink_diag(dir: &str, cfg: &PolicyConfig, p: usize, layers: &[usize]) {
    use infinitehip::config::LayerPolicy;
    use infinitehip::policy::squeeze::{build_head, calibrate};
    let LayerPolicy::Squeeze(sq) = &cfg.default else {
        panic!("--diag needs a squeeze config")
    };
    let m = cfg.model;
    let (hq, hk, d) = (m.n_q_heads, m.n_kv_heads, m.head_dim);
    let shape = AttnShape::new(hq, hk, d).unwrap();
    let g = hq / hk;
    for &l in layers {
        let q = read_f32(&format!("{dir}/L{l}.q.f32"));
        let kr = read_f32(&format!("{dir}/L{l}.k.f32"));
        let ws = p - sq.observation_window;
        let k = head_major(&kr, hk, d, p);
        let kv = SeqView::from_contiguous(hk, d, p, &k, &k);
        let heads: Vec<_> = (0..hk)
            .map(|h| build_head(&kv, h, ws, sq).unwrap())
            .collect();
        let cq: Vec<&[f32]> = (ws..p).map(|t| &q[t * hq * d..(t + 1) * hq * d]).collect();
        let thr = calibrate(&heads, &cq, &shape, sq);
        let qt = &q[p * hq * d..(p + 1) * hq * d];
        for (h, hi) in heads.iter().enumerate() {
            let c = hi.labels[0] as usize;
            let k0 = &kr[h * d..(h + 1) * d];
            let qs = &qt[h * g * d..(h + 1) * g * d];
            let pr = infinitehip::policy::squeeze::pooled_probs(
                &hi.fine,
                &hi.fine.nonempty,
                qs,
                g,
                shape.scale,
                infinitehip::config::SqueezePool::Max,
            );
            let ci = hi
                .fine
                .nonempty
                .iter()
                .position(|&x| x as usize == c)
                .unwrap();
            let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
            let nrm = |a: &[f32]| dot(a, a).sqrt();
            let q0 = &qs[..d];
            // Assignment check in the clustering space (normalised keys).
            let mut nm = vec![vec![0f32; d]; hi.fine.k()];
            for (t, &lb) in hi.labels.iter().enumerate() {
                let kt = &kr[(t * hk + h) * d..(t * hk + h + 1) * d];
                let n = nrm(kt);
                nm[lb as usize]
                    .iter_mut()
                    .zip(kt)
                    .for_each(|(a, &x)| *a += x / n);
            }
            let cosn: Vec<f32> = nm
                .iter()
                .map(|c| dot(k0, c) / nrm(k0) / nrm(c).max(1e-9))
                .collect();
            let best = cosn.iter().cloned().fold(f32::MIN, f32::max);
            let others = (1..ws)
                .map(|t| {
                    dot(k0, &kr[(t * hk + h) * d..(t * hk + h + 1) * d])
                        / nrm(k0)
                        / nrm(&kr[(t * hk + h) * d..(t * hk + h + 1) * d])
                })
                .fold(f32::MIN, f32::max);
            println!(
                "   normalised: cos(k0, own) {:.2} best {:.2} max cos(k0, other key) {:.2}",
                cosn[c], best, others
            );
            println!(
                "L{l} h{h}: key0 cluster {c} size {} |k0| {:.2} |centroid| {:.2} cos(k0,c) {:.2} q.k0 {:.2} q.c {:.2} p_hat {:.2e} thr {:.2e} kept {}",
                hi.fine.sizes[c],
                nrm(k0),
                nrm(hi.fine.centroid(c)),
                dot(k0, hi.fine.centroid(c)) / nrm(k0) / nrm(hi.fine.centroid(c)),
                dot(q0, k0) * shape.scale,
                dot(q0, hi.fine.centroid(c)) * shape.scale,
                pr[ci],
                thr.fine,
                pr[ci] >= thr.fine
            );
        }
    }
}
