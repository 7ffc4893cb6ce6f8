//! The llama.cpp GPU route's host side (`LlamaGpuRoute`) on synthetic
//! llama.cpp-layout buffers: its cell indices against the CPU route's
//! attention, the key mirror (appends, reads of unseen cells, restarts) and
//! its error paths.

use half::f16;
use infinitehip::rng::Rng;
use infinitehip_bridge::ffi::{ModelInfo, TensorDesc};
use infinitehip_bridge::{llama_gpu_route_new, LlamaPlugin};

const D: usize = 16;
const HQ: usize = 4;

fn model(hkv: usize) -> ModelInfo {
    ModelInfo {
        n_layers: 1,
        n_q_heads: HQ as u32,
        n_kv_heads: hkv as u32,
        head_dim: D as u32,
        rope_theta: 10000.0,
        n_ctx_train: 1 << 20,
    }
}

fn config(sink: usize, window: usize, keep: usize) -> String {
    format!(
        r#"{{"dense_layers": 0, "default": {{"method": "hip", "sink": {sink}, "window": {window},
        "stages": [{{"chunk_size": 8, "keep_tokens": {k1}, "refresh_interval": 3}},
                   {{"chunk_size": 4, "keep_tokens": {keep}, "refresh_interval": 2}}],
        "block_size_q": 8, "q_stride": 1, "prefill_chunk": 64}}}}"#,
        k1 = keep * 2
    )
}

fn desc(dtype: u32, ne: [usize; 4], nb: [usize; 4]) -> TensorDesc {
    TensorDesc {
        dtype,
        ne0: ne[0] as i64,
        ne1: ne[1] as i64,
        ne2: ne[2] as i64,
        ne3: ne[3] as i64,
        nb0: nb[0] as u64,
        nb1: nb[1] as u64,
        nb2: nb[2] as u64,
        nb3: nb[3] as u64,
    }
}

fn f16_bytes(x: &[f32]) -> Vec<u8> {
    x.iter()
        .flat_map(|&a| f16::from_f32(a).to_le_bytes())
        .collect()
}
fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|&a| a.to_le_bytes()).collect()
}

/// A llama.cpp-like single-stream cache: f16 K/V `[cell][h][d]` (values kept
/// f16-rounded), a chain of cells in position order with hidden holes.
struct World {
    hkv: usize,
    kv_size: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    chain: Vec<usize>,
}

impl World {
    fn new(hkv: usize, kv_size: usize, rng: &mut Rng) -> Self {
        let r = |x: f32| f16::from_f32(x).to_f32();
        let n = kv_size * hkv * D;
        World {
            hkv,
            kv_size,
            k: (0..n).map(|_| r(rng.normal() * 1.5)).collect(),
            v: (0..n).map(|_| r(rng.normal())).collect(),
            chain: Vec::new(),
        }
    }
    fn row(&self) -> usize {
        self.hkv * D
    }
    fn kd(&self) -> TensorDesc {
        let r = self.row() * 2;
        desc(
            1,
            [D, self.hkv, self.kv_size, 1],
            [2, 2 * D, r, r * self.kv_size],
        )
    }
    /// f16 mask `[kv_size, n, 1, 1]`: row t sees chain[..len - n + t + 1].
    fn mask(&self, n: usize) -> (Vec<u8>, TensorDesc) {
        let len = self.chain.len();
        let mut m = vec![f32::NEG_INFINITY; self.kv_size * n];
        for t in 0..n {
            for &c in &self.chain[..len - n + t + 1] {
                m[t * self.kv_size + c] = 0.0;
            }
        }
        let d = desc(
            1,
            [self.kv_size, n, 1, 1],
            [
                2,
                2 * self.kv_size,
                2 * self.kv_size * n,
                2 * self.kv_size * n,
            ],
        );
        (f16_bytes(&m), d)
    }
    /// The keys of the chain's last n cells as k_cur `[d, hkv, n]` f32, and k_idxs.
    fn k_cur(&self, n: usize) -> (Vec<u8>, TensorDesc, Vec<u8>) {
        let cells = &self.chain[self.chain.len() - n..];
        let mut x = Vec::new();
        for &c in cells {
            x.extend_from_slice(&self.k[c * self.row()..(c + 1) * self.row()]);
        }
        let d = desc(
            0,
            [D, self.hkv, n, 1],
            [4, 4 * D, 4 * self.row(), 4 * self.row() * n],
        );
        let idx: Vec<u8> = cells
            .iter()
            .flat_map(|&c| (c as i64).to_le_bytes())
            .collect();
        (f32_bytes(&x), d, idx)
    }
}

fn queries(n: usize, rng: &mut Rng) -> (Vec<u8>, TensorDesc) {
    let q: Vec<f32> = (0..n * HQ * D).map(|_| rng.normal()).collect();
    (
        f32_bytes(&q),
        desc(0, [D, HQ, n, 1], [4, 4 * D, 4 * D * HQ, 4 * D * HQ * n]),
    )
}

/// f64 attention of every query head over the cells `idx` (deduplicated).
fn attend_cells(w: &World, q: &[u8], n: usize, idx: &[i32], top_k: usize, scale: f64) -> Vec<f64> {
    let qf: Vec<f32> = q
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let grp = HQ / w.hkv;
    let mut out = vec![0f64; n * HQ * D];
    for t in 0..n {
        let mut cells: Vec<usize> = idx[t * top_k..(t + 1) * top_k]
            .iter()
            .map(|&c| c as usize)
            .collect();
        cells.sort_unstable();
        cells.dedup();
        for h in 0..HQ {
            let kh = h / grp;
            let qv = &qf[(t * HQ + h) * D..(t * HQ + h + 1) * D];
            let s: Vec<f64> = cells
                .iter()
                .map(|&c| {
                    let k = &w.k[c * w.row() + kh * D..c * w.row() + (kh + 1) * D];
                    qv.iter()
                        .zip(k)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for (i, &c) in cells.iter().enumerate() {
                let v = &w.v[c * w.row() + kh * D..c * w.row() + (kh + 1) * D];
                for j in 0..D {
                    out[(t * HQ + h) * D + j] += e[i] / z * v[j] as f64;
                }
            }
        }
    }
    out
}

/// The GPU route's indices give the same attention as the CPU route (the
/// plugin's own block-sparse attention over its selection) when there is
/// one KV head, so the union over KV heads is the selection itself: prefill
/// ubatches then decode steps (policy refreshes), with holes in the chain,
/// keys fed by appends and by reads of cells the mirror never saw.
#[test]
fn gpu_route_indices_match_cpu_route() {
    for (keep, seed) in [(16usize, 1u64), (4096, 2)] {
        let mut rng = Rng::new(seed);
        let mut w = World::new(1, 400, &mut rng);
        let cfg = config(4, 16, keep);
        let cpu = LlamaPlugin::new(&cfg, &model(1)).unwrap();
        let gpu_plugin = LlamaPlugin::new(&cfg, &model(1)).unwrap();
        let route = llama_gpu_route_new(&gpu_plugin);
        let scale = 1.0 / (D as f32).sqrt();
        // cells in position order, every 7th hidden
        let order: Vec<usize> = (0..400).filter(|c| c % 7 != 3).collect();
        let vd = w.kd();
        let (kb, vb) = (f16_bytes(&w.k), f16_bytes(&w.v));
        let mut pos = 0;
        // the first 100 cells come from a "session file": never appended
        w.chain.extend_from_slice(&order[..100]);
        pos += 100;
        for (step, n) in [40usize, 24, 1, 1, 1, 1, 1, 1, 1].into_iter().enumerate() {
            w.chain.extend_from_slice(&order[pos..pos + n]);
            pos += n;
            let (q, qd) = queries(n, &mut rng);
            let (m, md) = w.mask(n);
            // CPU route
            cpu.plan(0, scale, &q, &qd, &kb, &w.kd(), &vb, &vd, false, &m, &md)
                .unwrap();
            let mut o1 = vec![0f32; n * HQ * D];
            cpu.attend(
                0,
                0,
                n,
                scale,
                &q,
                &qd,
                &kb,
                &w.kd(),
                &vb,
                &vd,
                false,
                &m,
                &md,
                &mut o1,
            )
            .unwrap();
            // GPU route's host side
            let (kc, kcd, idx) = w.k_cur(n);
            route
                .append_keys(0, &kc, &kcd, &idx, w.kv_size as u64)
                .unwrap();
            let miss = route
                .missing_cells(0, &m, &md, n as u64, 0, w.kv_size as u64, w.row() as u64)
                .unwrap();
            if step == 0 {
                assert!(!miss.is_empty(), "the session cells must be read once");
            } else {
                assert!(
                    miss.is_empty(),
                    "step {step}: nothing new to read, got {miss:?}"
                );
            }
            for r in miss.chunks_exact(2) {
                let (a, b) = (r[0] as usize, r[1] as usize);
                route
                    .fill_cells(0, r[0], &kb[a * w.row() * 2..b * w.row() * 2], 1)
                    .unwrap();
            }
            let top_k = route.top_k(&gpu_plugin, 0, w.kv_size as i64).unwrap() as usize;
            let mut out = vec![-7i32; top_k * n];
            route
                .plan_indices(
                    &gpu_plugin,
                    0,
                    scale,
                    &q,
                    &qd,
                    &m,
                    &md,
                    0,
                    w.kv_size as u64,
                    top_k as u32,
                    &mut out,
                )
                .unwrap();
            // every index is a cell the row may see
            let len = w.chain.len();
            for t in 0..n {
                let vis = &w.chain[..len - n + t + 1];
                for &c in &out[t * top_k..(t + 1) * top_k] {
                    assert!(
                        vis.contains(&(c as usize)),
                        "step {step} row {t}: cell {c} not visible"
                    );
                }
            }
            let o2 = attend_cells(&w, &q, n, &out, top_k, scale as f64);
            let (mut num, mut den) = (0f64, 0f64);
            for (a, b) in o1.iter().zip(&o2) {
                num += (*a as f64 - b).powi(2);
                den += b * b;
            }
            let rel = (num / den).sqrt();
            assert!(
                rel < 1e-5,
                "keep {keep} step {step}: GPU-route attention vs CPU route rel err {rel}"
            );
        }
    }
}

/// A restarted sequence (its first cell moves) is read again from the
/// device, except the cells appended by the same ubatch.
#[test]
fn restart_rereads_cells() {
    let mut rng = Rng::new(3);
    let mut w = World::new(2, 64, &mut rng);
    let cfg = config(4, 8, 4096);
    let p = LlamaPlugin::new(&cfg, &model(2)).unwrap();
    let route = llama_gpu_route_new(&p);
    w.chain = (0..32).collect();
    let (kc, kcd, idx) = w.k_cur(32);
    route.append_keys(0, &kc, &kcd, &idx, 64).unwrap();
    let (m, md) = w.mask(32);
    assert!(route
        .missing_cells(0, &m, &md, 32, 0, 64, w.row() as u64)
        .unwrap()
        .is_empty());
    // cells 0..8 removed, 8 new cells appended at 32..40
    w.chain = (8..40).collect();
    let (kc, kcd, idx) = w.k_cur(8);
    route.append_keys(0, &kc, &kcd, &idx, 64).unwrap();
    let (m, md) = w.mask(8);
    let miss = route
        .missing_cells(0, &m, &md, 8, 0, 64, w.row() as u64)
        .unwrap();
    assert_eq!(
        miss,
        vec![8, 32],
        "re-read the kept cells, not this ubatch's appends"
    );
}

#[test]
fn errors_name_the_problem() {
    let mut rng = Rng::new(4);
    let mut w = World::new(2, 64, &mut rng);
    let p = LlamaPlugin::new(&config(4, 8, 8), &model(2)).unwrap();
    let route = llama_gpu_route_new(&p);
    w.chain = (0..48).collect();
    let (kc, kcd, mut idx) = w.k_cur(48);
    let e = route.append_keys(0, &kc, &kcd, &idx[..8], 64).unwrap_err();
    assert!(e.contains("k_idxs"), "{e}");
    idx[..8].copy_from_slice(&99i64.to_le_bytes());
    let e = route.append_keys(0, &kc, &kcd, &idx, 64).unwrap_err();
    assert!(e.contains("k_idxs entry"), "{e}");
    let (_, _, idx) = w.k_cur(48);
    route.append_keys(0, &kc, &kcd, &idx, 64).unwrap();
    let (q, qd) = queries(1, &mut rng);
    let (m, md) = w.mask(1);
    // a top_k below what the policy selects is refused, not truncated
    let mut out = vec![0i32; 4];
    let e = route
        .plan_indices(&p, 0, 0.25, &q, &qd, &m, &md, 0, 64, 4, &mut out)
        .unwrap_err();
    assert!(e.contains("top_k"), "{e}");
    let e = route.fill_cells(0, 0, &[0u8; 6], 1).unwrap_err();
    assert!(e.contains("fill_cells"), "{e}");
    let e = route.top_k(&p, 5, 64).unwrap_err();
    assert!(e.contains("layer 5"), "{e}");
}

/// Host cost per decode step at 128K cells (mirror check + policy + indices);
/// `cargo test --release -p infinitehip-cpp-bridge --test llama_gpu_route -- --ignored --nocapture`.
#[test]
#[ignore]
fn host_cost_128k() {
    let mut rng = Rng::new(5);
    let n_kv = 131072;
    let hkv = 2;
    let mut w = World::new(hkv, n_kv, &mut rng);
    let cfg = r#"{"dense_layers": 0, "default": {"method": "hip", "sink": 64, "window": 512,
        "stages": [{"chunk_size": 64, "keep_tokens": 4096, "refresh_interval": 16},
                   {"chunk_size": 16, "keep_tokens": 2048, "refresh_interval": 8},
                   {"chunk_size": 8, "keep_tokens": 1024, "refresh_interval": 4}],
        "block_size_q": 64, "q_stride": 1, "prefill_chunk": 4096}}"#;
    let p = LlamaPlugin::new(cfg, &model(hkv)).unwrap();
    let route = llama_gpu_route_new(&p);
    w.chain = (0..n_kv - 64).collect();
    let kb = f16_bytes(&w.k);
    let top_k = route.top_k(&p, 0, n_kv as i64).unwrap() as usize;
    let steps = 32;
    let t0 = std::time::Instant::now();
    for step in 0..steps {
        w.chain.push(n_kv - 64 + step);
        let (kc, kcd, idx) = w.k_cur(1);
        route.append_keys(0, &kc, &kcd, &idx, n_kv as u64).unwrap();
        let (m, md) = w.mask(1);
        let miss = route
            .missing_cells(0, &m, &md, 1, 0, n_kv as u64, w.row() as u64)
            .unwrap();
        for r in miss.chunks_exact(2) {
            let (a, b) = (r[0] as usize, r[1] as usize);
            route
                .fill_cells(0, r[0], &kb[a * w.row() * 2..b * w.row() * 2], 1)
                .unwrap();
        }
        let (q, qd) = queries(1, &mut rng);
        let mut out = vec![0i32; top_k];
        route
            .plan_indices(
                &p,
                0,
                0.25,
                &q,
                &qd,
                &m,
                &md,
                0,
                n_kv as u64,
                top_k as u32,
                &mut out,
            )
            .unwrap();
        if step == 0 {
            eprintln!("first step (reads the whole mirror): {:?}", t0.elapsed());
        }
    }
    eprintln!(
        "{steps} steps: {:?}; {}",
        t0.elapsed(),
        route.gpu_stats_json()
    );
}
