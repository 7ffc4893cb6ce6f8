//! bench-cpu rows for the policies that need the whole engine flow (scoring
//! at insertion, eviction, per-prefix clustering): the needle sequence is
//! streamed into a one-layer `Engine` as a prompt, then decode steps run
//! through the engine while the dense reference attends over every token.

use std::path::PathBuf;
use std::time::Instant;

use half::bf16;
use infinitehip::attention::{self, rel_error, AttnShape};
use infinitehip::config::{LayerPolicy, LocretConfig, PolicyConfig};
use infinitehip::engine::{Engine, Projections};
use infinitehip::policy::locret::{write_weights, RetainingHead};
use infinitehip::policy::Phase;
use infinitehip::rng::Rng;
use infinitehip::workload::NeedleSeq;
use infinitehip::DType;

use crate::bench_cpu::Row;

fn err(e: infinitehip::Error) -> String {
    e.to_string()
}

fn engine(shape: &AttnShape, policy: LayerPolicy) -> Result<Engine, String> {
    let mut cfg = PolicyConfig::default();
    cfg.model.n_layers = 1;
    cfg.model.n_q_heads = shape.n_q_heads;
    cfg.model.n_kv_heads = shape.n_kv_heads;
    cfg.model.head_dim = shape.head_dim;
    cfg.dense_layers = 0;
    cfg.kv.dtype = DType::Bf16;
    cfg.default = policy;
    Engine::new(cfg).map_err(err)
}

/// Retaining heads for the bench. `oracle`: KV head h's score is
/// SiLU(k_h . u_h), u_h the direction its queries look for (a stand-in for a
/// trained head, which learns which keys later queries attend to); otherwise
/// random weights.
fn retaining_heads(
    shape: &AttnShape,
    w: &NeedleSeq<bf16>,
    oracle: bool,
    seed: u64,
) -> Result<RetainingHead, String> {
    let model = infinitehip::config::ModelShape {
        n_layers: 1,
        n_q_heads: shape.n_q_heads,
        n_kv_heads: shape.n_kv_heads,
        head_dim: shape.head_dim,
        ..Default::default()
    };
    let (hkv, d) = (shape.n_kv_heads, shape.head_dim);
    let hidden = hkv;
    if !oracle {
        return RetainingHead::random(&model, hidden, seed).map_err(err);
    }
    let input = (shape.n_q_heads + 2 * hkv) * d;
    let k_off = shape.n_q_heads * d;
    let mut w1 = vec![0f32; hidden * input];
    let mut w2 = vec![0f32; hkv * hidden];
    for h in 0..hkv {
        w1[h * input + k_off + h * d..h * input + k_off + (h + 1) * d]
            .copy_from_slice(&w.dirs[h * d..(h + 1) * d]);
        w2[h * hidden + h] = 1.0;
    }
    RetainingHead::new(&model, hidden, w1, w2).map_err(err)
}

/// Fraction of needle keys still held: per KV head, held keys whose
/// projection on the head's direction is above half the needle logit
/// (random keys sit near 0, needle keys near the logit).
fn held_needle_fraction(e: &Engine, w: &NeedleSeq<bf16>) -> Result<f64, String> {
    let (hkv, d) = (w.shape.n_kv_heads, w.shape.head_dim);
    let n = e.seq_len(0, 0).map_err(err)?;
    let (k, _) = e.read(0, 0, 0, n).map_err(err)?;
    let mut found = 0usize;
    for t in 0..n {
        for h in 0..hkv {
            let row = &k[(t * hkv + h) * d..(t * hkv + h + 1) * d];
            let p: f32 = row
                .iter()
                .zip(&w.dirs[h * d..(h + 1) * d])
                .map(|(a, b)| a * b)
                .sum();
            found += (p > w.needle_logit / 2.0) as usize;
        }
    }
    let total: usize = w.needles.iter().map(|n| n.len).sum();
    Ok(found as f64 / total as f64)
}

/// Locret: the prompt streams in `chunk`-token appends (pre-RoPE projections
/// with it: the workload has no RoPE, so k and v are the stored ones, q is
/// zero), evicting to `budget` per KV head; decode then attends densely over
/// what is held. Timed: decode attention only.
pub fn bench_locret(
    w: &mut NeedleSeq<bf16>,
    budget: usize,
    steps: usize,
    seed: u64,
    oracle: bool,
) -> Result<Row, String> {
    let shape = w.shape;
    let (sink, window) = (128, 1024);
    let dir = std::env::temp_dir().join(format!("infinitehip-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path: PathBuf = dir.join(if oracle {
        "oracle.safetensors"
    } else {
        "random.safetensors"
    });
    write_weights(
        &path,
        &[retaining_heads(&shape, w, oracle, seed)?],
        DType::F32,
    )
    .map_err(err)?;
    let cfg = LocretConfig {
        budget: sink + window + budget,
        chunk: 1024,
        stabilizer: window,
        sink,
        keep_last: 100,
        weights: Some(path.display().to_string()),
        hidden: shape.n_kv_heads,
        ..LocretConfig::default()
    };
    let mut e = engine(&shape, LayerPolicy::Locret(cfg))?;
    e.add_sequence(0).map_err(err)?;
    let len = w.pool.seq_len(w.seq).map_err(err)?;
    let qz = vec![0f32; 1024 * shape.q_elems()];
    let t_prep = Instant::now();
    for s in (0..len).step_by(1024) {
        let end = (s + 1024).min(len);
        let (k, v) = w.pool.read(w.seq, s, end).map_err(err)?;
        let (k, v): (Vec<f32>, Vec<f32>) = (
            k.iter().map(|x| x.to_f32()).collect(),
            v.iter().map(|x| x.to_f32()).collect(),
        );
        let proj = Projections {
            q: &qz[..(end - s) * shape.q_elems()],
            k: &k,
            v: &v,
        };
        e.append(0, 0, &k, &v, Phase::Prefill, end == len, Some(proj))
            .map_err(err)?;
    }
    e.evict(0, 0).map_err(err)?;
    eprintln!(
        "    prompt scored and evicted in {:.1} s: {} of {len} tokens held per KV head",
        t_prep.elapsed().as_secs_f64(),
        e.seq_len(0, 0).map_err(err)?
    );
    let recall = held_needle_fraction(&e, w)?;
    decode_through_engine(
        &mut e,
        w,
        steps,
        seed,
        if oracle {
            "locret-oracle"
        } else {
            "locret-random"
        },
        recall,
        true,
    )
}

/// Decode steps through `e` vs dense attention over every token of `w`; a
/// random token is appended to both after each step.
fn decode_through_engine(
    e: &mut Engine,
    w: &mut NeedleSeq<bf16>,
    steps: usize,
    seed: u64,
    name: &str,
    recall: f64,
    with_projections: bool,
) -> Result<Row, String> {
    let shape = w.shape;
    let tokens = w.pool.seq_len(w.seq).map_err(err)?;
    let mut rng = Rng::new(seed ^ 0xdec0de);
    let (mut dense_t, mut ours_t, mut max_err) = (Vec::new(), Vec::new(), 0f64);
    let qz = vec![0f32; shape.q_elems()];
    let bar = crate::progress::steps(steps, "decode steps");
    for _ in 0..steps {
        bar.inc(1);
        let q = w.query(&mut rng);
        let mut dense = vec![0f32; q.len()];
        {
            let view = w.pool.view(w.seq).map_err(err)?;
            let t = Instant::now();
            attention::decode(&shape, &q, std::slice::from_ref(&view), None, &mut dense)
                .map_err(err)?;
            dense_t.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let mut ours = vec![f32::NAN; q.len()];
        let t = Instant::now();
        e.attend_decode(0, &[0], &q, &mut ours).map_err(err)?;
        ours_t.push(t.elapsed().as_secs_f64() * 1e3);
        let d64: Vec<f64> = dense.iter().map(|&x| x as f64).collect();
        max_err = max_err.max(rel_error(&ours, &d64));
        w.append_random(&mut rng).map_err(err)?;
        let n = w.pool.seq_len(w.seq).map_err(err)?;
        let (k, v) = w.pool.read(w.seq, n - 1, n).map_err(err)?;
        let (k, v): (Vec<f32>, Vec<f32>) = (
            k.iter().map(|x| x.to_f32()).collect(),
            v.iter().map(|x| x.to_f32()).collect(),
        );
        let proj = with_projections.then(|| Projections {
            q: &qz,
            k: &k,
            v: &v,
        });
        e.append(0, 0, &k, &v, Phase::Decode, false, proj)
            .map_err(err)?;
    }
    bar.finish_and_clear();
    dense_t.sort_by(|a, b| a.total_cmp(b));
    Ok(Row {
        pool: "",
        policy: name.into(),
        phase: "decode",
        tokens,
        batch: 1,
        dense_ms: dense_t[dense_t.len() / 2],
        ours_ms: ours_t.iter().sum::<f64>() / steps as f64,
        refresh_ms: None,
        rel_error: max_err,
        needle_recall: recall,
    })
}

/// Squeezed Attention: the whole needle sequence is the fixed prefix. It is
/// clustered per KV head (256 clusters: exact k-means++ costs O(n k d), so
/// the paper's 5% is out of reach on 2 cores at 256K), calibrated on the
/// last 32 prefix queries at quantile 0.9, then decode looks up centroids per
/// step. Timed: select + attention. The policy is driven directly (as the
/// engine does) so its selection is visible for the needle recall.
pub fn bench_squeeze(w: &mut NeedleSeq<bf16>, steps: usize, seed: u64) -> Result<Row, String> {
    use infinitehip::config::SqueezeConfig;
    use infinitehip::policy::squeeze::SqueezePolicy;
    use infinitehip::policy::{Policy, SelectRequest};
    let shape = w.shape;
    let len = w.pool.seq_len(w.seq).map_err(err)?;
    let window = 32;
    let clusters = 256.0;
    let cfg = SqueezeConfig {
        percent_clusters: (clusters * 100.0 / (len - window) as f64) as f32,
        levels: 1,
        quantile: 0.9,
        observation_window: window,
        kmeans_iters: 5,
        seed,
        ..SqueezeConfig::default()
    };
    let model = infinitehip::config::ModelShape {
        n_layers: 1,
        n_q_heads: shape.n_q_heads,
        n_kv_heads: shape.n_kv_heads,
        head_dim: shape.head_dim,
        ..Default::default()
    };
    let mut pol = SqueezePolicy::new(cfg, &model).map_err(err)?;
    let mut rng = Rng::new(seed ^ 0x5eed);
    let t_prep = Instant::now();
    {
        let view = w.pool.view(w.seq).map_err(err)?;
        pol.build_prefix(0, &shape, &view).map_err(err)?;
        let qs: Vec<f32> = (0..window).flat_map(|_| w.query(&mut rng)).collect();
        // The calibration queries: the prefix's last `window` positions.
        pol.select(&SelectRequest {
            seq: 0,
            shape,
            phase: Phase::Prefill,
            queries: &qs,
            q_start: len - window,
            kv: &view,
        })
        .map_err(err)?;
    }
    eprintln!(
        "    prefix clustered and calibrated in {:.1} s",
        t_prep.elapsed().as_secs_f64()
    );
    let (mut dense_t, mut ours_t, mut max_err, mut recall) = (Vec::new(), Vec::new(), 0f64, 0f64);
    let mut kept = 0f64;
    let bar = crate::progress::steps(steps, "decode steps");
    for _ in 0..steps {
        bar.inc(1);
        let q = w.query(&mut rng);
        let view = w.pool.view(w.seq).map_err(err)?;
        let mut dense = vec![0f32; q.len()];
        let t = Instant::now();
        attention::decode(&shape, &q, std::slice::from_ref(&view), None, &mut dense)
            .map_err(err)?;
        dense_t.push(t.elapsed().as_secs_f64() * 1e3);
        let mut ours = vec![f32::NAN; q.len()];
        let t = Instant::now();
        let sel = pol
            .select(&SelectRequest {
                seq: 0,
                shape,
                phase: Phase::Decode,
                queries: &q,
                q_start: view.len() - 1,
                kv: &view,
            })
            .map_err(err)?
            .blocks
            .swap_remove(0);
        attention::decode(
            &shape,
            &q,
            std::slice::from_ref(&view),
            Some(std::slice::from_ref(&sel)),
            &mut ours,
        )
        .map_err(err)?;
        ours_t.push(t.elapsed().as_secs_f64() * 1e3);
        let d64: Vec<f64> = dense.iter().map(|&x| x as f64).collect();
        max_err = max_err.max(rel_error(&ours, &d64));
        recall += w.recall(&sel) / steps as f64;
        kept += sel.heads.iter().flatten().map(|r| r.len()).sum::<usize>() as f64
            / (shape.n_kv_heads * view.len()) as f64
            / steps as f64;
        drop(view);
        w.append_random(&mut rng).map_err(err)?;
    }
    bar.finish_and_clear();
    eprintln!(
        "    squeeze kept {:.1}% of the keys on average",
        kept * 100.0
    );
    dense_t.sort_by(|a, b| a.total_cmp(b));
    Ok(Row {
        pool: "",
        policy: "squeeze".into(),
        phase: "decode",
        tokens: len,
        batch: 1,
        dense_ms: dense_t[dense_t.len() / 2],
        ours_ms: ours_t.iter().sum::<f64>() / steps as f64,
        refresh_ms: None,
        rel_error: max_err,
        needle_recall: recall,
    })
}
