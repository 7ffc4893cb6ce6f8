//! `gpu-test` checks of `GpuAttention` running squeeze and lazy layers over
//! engine-layout K/V (SGLang token-major `[slots][kv_heads][D]` with a
//! shuffled `req_to_token`, one pool per layer), bf16 q, against the CPU
//! `Engine` with the same config fed the same K/V and queries:
//! - outputs (prefill and decode) within DESIGN.md's bf16 bound (1e-2);
//! - selections: squeeze decode == the CPU `SqueezePolicy` (a mirror fed
//!   like the engine's), lazy (prefill and decode) == the CPU engine's keep
//!   sets (`Engine::lazy().keep_set`) plus the generated tokens;
//! - a covering budget (squeeze quantile 0, lazy keep 1.0) == dense (f64);
//! - requests that join at different steps (each with its own prefill).

use half::bf16;
use infinitehip::attention::{rel_error, AttnShape};
use infinitehip::backend::cuda::dispatch::AttnOut;
use infinitehip::backend::cuda::engine_attn::{GpuAttention, QArg};
use infinitehip::backend::cuda::{DevBuf, GpuContext};
use infinitehip::config::{
    LayerOverride, LayerPolicy, LazyConfig, LazyPoint, PolicyConfig, SqueezeConfig,
};
use infinitehip::engine::Engine;
use infinitehip::kv::{KvLayout, KvPool, SeqView};
use infinitehip::policy::squeeze::SqueezePolicy;
use infinitehip::policy::{Phase, Policy, SelectRequest, Selection};
use infinitehip::rng::Rng;
use infinitehip::DType;

use crate::gpu::{e, random_pool, ref_f64, Check, R};
use crate::gpu_engine::{model_cfg, TokenPool};

/// Prompt lengths, prefill rows (the prompt's last ones; the rest were
/// "already cached"), and the step each request joins at.
const PROMPT: [usize; 3] = [1300, 700, 1500];
const N_NEW: [usize; 3] = [150, 120, 160];
const JOIN: [usize; 3] = [0, 2, 3];
const STEPS: usize = 6;

struct Outcome {
    /// Worst output rel err vs the CPU engine (prefill, decode).
    pre_err: f64,
    dec_err: f64,
    /// (identical, compared) selections.
    sel_same: usize,
    sel_n: usize,
    sel_detail: String,
    /// Worst rel err vs dense f64 on the covering layer.
    cover_err: f64,
    finite: bool,
    seal_ms: Vec<f64>,
}

fn tokens_of(s: &Selection, h: usize) -> Vec<usize> {
    s.heads[h].iter().flat_map(|r| r.clone()).collect()
}

/// Head-major f32 K of `pool`'s sequence b, tokens 0..len.
fn head_major(pool: &KvPool<bf16>, b: usize, len: usize, hkv: usize, d: usize) -> R<Vec<f32>> {
    let (k, _) = pool.read(b as u64, 0, len).map_err(e)?;
    let mut out = vec![0f32; hkv * len * d];
    for t in 0..len {
        for h in 0..hkv {
            for c in 0..d {
                out[(h * len + t) * d + c] = k[(t * hkv + h) * d + c].to_f32();
            }
        }
    }
    Ok(out)
}

/// Runs the scenario over `layers` (layer 0 dense), comparing with the CPU
/// engine. `cover`: the layer whose selection covers everything.
fn scenario(
    gpu: &GpuContext,
    shape: AttnShape,
    layers: Vec<LayerPolicy>,
    cover: usize,
    seed: u64,
) -> R<Outcome> {
    let cfg = model_cfg(&shape, layers.clone());
    scenario_cfg(gpu, shape, layers, cfg, cover, seed)
}

/// `scenario` with the config given; `layers` is what it resolves to.
fn scenario_cfg(
    gpu: &GpuContext,
    shape: AttnShape,
    layers: Vec<LayerPolicy>,
    mut cfg: PolicyConfig,
    cover: usize,
    seed: u64,
) -> R<Outcome> {
    let nl = layers.len();
    for (l, p) in layers.iter().enumerate() {
        if cfg.layer_policy(l) != p {
            return Err(format!(
                "scenario: layer {l} resolves to {}",
                cfg.layer_policy(l).method()
            ));
        }
    }
    cfg.kv.dtype = DType::Bf16;
    let (hkv, d, qe) = (shape.n_kv_heads, shape.head_dim, shape.q_elems());
    let mut rng = Rng::new(seed);
    let full: Vec<usize> = (0..3).map(|b| PROMPT[b] + STEPS - JOIN[b]).collect();
    let lay = KvLayout {
        n_kv_heads: hkv,
        head_dim: d,
        page_size: 64,
    };
    let mut pools = Vec::new();
    let mut tps = Vec::new();
    for _ in 0..nl {
        let p = random_pool::<bf16>(lay, &full, &mut rng)?;
        tps.push(TokenPool::from_pool(&p, &full, &mut rng)?);
        pools.push(p);
    }
    let mut eng = Engine::new(cfg.clone()).map_err(e)?;
    let mut ga = GpuAttention::new(gpu, &cfg).map_err(e)?;
    let mut mirror: Vec<Option<SqueezePolicy>> = layers
        .iter()
        .map(|p| match p {
            LayerPolicy::Squeeze(z) => SqueezePolicy::new(z.clone(), &cfg.model).ok(),
            _ => None,
        })
        .collect();
    let side = gpu.ctx.new_stream().map_err(e)?;
    let raw = side.cu_stream() as u64;
    // SAFETY: `side` is a stream of `gpu`'s context and outlives `g2`.
    let g2 = unsafe { gpu.on_stream(raw) };
    let mut o = Outcome {
        pre_err: 0.0,
        dec_err: 0.0,
        sel_same: 0,
        sel_n: 0,
        sel_detail: String::new(),
        cover_err: 0.0,
        finite: true,
        seal_ms: Vec::new(),
    };
    let worst = |w: &mut f64, x: f64| *w = if x.is_nan() { f64::NAN } else { w.max(x) };
    let bq = |rng: &mut Rng, n: usize| -> (Vec<bf16>, Vec<f32>) {
        let qb: Vec<bf16> = rng
            .normal_vec(n * qe, 1.0)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let qf = qb.iter().map(|x| x.to_f32()).collect();
        (qb, qf)
    };
    let id = |b: usize| 40 + b as u64;
    let sel_note = |o: &mut Outcome, same: bool, what: String| {
        o.sel_n += 1;
        if same {
            o.sel_same += 1;
        } else if o.sel_detail.len() < 300 {
            o.sel_detail.push_str(&what);
            o.sel_detail.push_str("; ");
        }
    };
    for step in 0..STEPS {
        // Prefill of the requests joining now.
        for b in (0..3).filter(|&b| JOIN[b] == step) {
            let (p, n) = (PROMPT[b], N_NEW[b]);
            eng.add_sequence(id(b)).map_err(e)?;
            let (qb, qf) = bq(&mut rng, n);
            let qd = DevBuf::from_slice(&qb).map_err(e)?;
            let out = DevBuf::alloc(n * qe * 4).map_err(e)?;
            for l in 0..nl {
                let (k, v) = pools[l].read(b as u64, 0, p).map_err(e)?;
                eng.append(l, id(b), &k, &v, Phase::Prefill, true, None)
                    .map_err(e)?;
                let mut want = vec![0f32; n * qe];
                eng.attend_prefill(l, id(b), &qf, &mut want).map_err(e)?;
                out.fill_bytes(0xff).map_err(e)?;
                // SAFETY: the token pool, q and out are live allocations sized for these requests'
                // lengths and rows; `raw` (side stream) is synchronised before any read.
                unsafe {
                    ga.prefill(
                        raw,
                        l,
                        &tps[l].engine_kv(),
                        &[id(b)],
                        &[b],
                        &[p],
                        &[n],
                        &QArg {
                            ptr: qd.ptr,
                            dtype: DType::Bf16,
                            row_stride: qe,
                        },
                        &AttnOut {
                            ptr: out.ptr,
                            dtype: DType::F32,
                            row_stride: qe,
                        },
                        None,
                    )
                    .map_err(e)?;
                }
                g2.synchronize().map_err(e)?;
                let got: Vec<f32> = out.read(n * qe).map_err(e)?;
                o.finite &= got.iter().all(|x| x.is_finite());
                let w64: Vec<f64> = want.iter().map(|&x| x as f64).collect();
                worst(&mut o.pre_err, rel_error(&got, &w64));
                if let Some(lz) = eng.lazy() {
                    if matches!(layers[l], LayerPolicy::Lazy(_)) {
                        let gs = ga.last_selection().map_err(e)?;
                        let mut want: Vec<usize> = lz
                            .keep_set(id(b), l)
                            .unwrap_or_default()
                            .into_iter()
                            .map(|t| t as usize)
                            .collect();
                        want.retain(|&t| t < p);
                        let same = (0..hkv).all(|h| tokens_of(&gs[0], h) == want);
                        sel_note(&mut o, same, format!("lazy prefill req {b} layer {l}"));
                    }
                }
                if let Some(m) = &mut mirror[l] {
                    let kk = head_major(&pools[l], b, p, hkv, d)?;
                    let view = SeqView::from_contiguous(hkv, d, p, &kk, &kk);
                    m.build_prefix(id(b), &shape, &view).map_err(e)?;
                    m.select(&SelectRequest {
                        seq: id(b),
                        shape,
                        phase: Phase::Prefill,
                        queries: &qf,
                        q_start: p - n,
                        kv: &view,
                    })
                    .map_err(e)?;
                }
            }
        }
        // Decode of the requests that joined before.
        let act: Vec<usize> = (0..3).filter(|&b| JOIN[b] < step).collect();
        if act.is_empty() {
            continue;
        }
        let lens: Vec<usize> = act.iter().map(|&b| PROMPT[b] + step - JOIN[b]).collect();
        let ids: Vec<u64> = act.iter().map(|&b| id(b)).collect();
        let nb = act.len();
        let (qb, qf) = bq(&mut rng, nb);
        let qd = DevBuf::from_slice(&qb).map_err(e)?;
        let out = DevBuf::alloc(nb * qe * 4).map_err(e)?;
        for l in 0..nl {
            for (i, &b) in act.iter().enumerate() {
                let (k, v) = pools[l].read(b as u64, lens[i] - 1, lens[i]).map_err(e)?;
                eng.append(l, id(b), &k, &v, Phase::Decode, false, None)
                    .map_err(e)?;
            }
            let mut want = vec![0f32; nb * qe];
            eng.attend_decode(l, &ids, &qf, &mut want).map_err(e)?;
            out.fill_bytes(0xff).map_err(e)?;
            // SAFETY: as for the prefill above, sized for the `nb` decode rows.
            unsafe {
                ga.decode(
                    raw,
                    l,
                    &tps[l].engine_kv(),
                    &ids,
                    &act,
                    &lens,
                    &QArg {
                        ptr: qd.ptr,
                        dtype: DType::Bf16,
                        row_stride: qe,
                    },
                    &AttnOut {
                        ptr: out.ptr,
                        dtype: DType::F32,
                        row_stride: qe,
                    },
                    None,
                )
                .map_err(e)?;
            }
            g2.synchronize().map_err(e)?;
            let got: Vec<f32> = out.read(nb * qe).map_err(e)?;
            o.finite &= got.iter().all(|x| x.is_finite());
            let w64: Vec<f64> = want.iter().map(|&x| x as f64).collect();
            worst(&mut o.dec_err, rel_error(&got, &w64));
            let gs = if l > 0 {
                ga.last_selection().map_err(e)?
            } else {
                Vec::new()
            };
            for (i, &b) in act.iter().enumerate() {
                let len = lens[i];
                let qi = &qf[i * qe..(i + 1) * qe];
                if let Some(m) = &mut mirror[l] {
                    let kk = head_major(&pools[l], b, len, hkv, d)?;
                    let view = SeqView::from_contiguous(hkv, d, len, &kk, &kk);
                    let cpu = m
                        .select(&SelectRequest {
                            seq: id(b),
                            shape,
                            phase: Phase::Decode,
                            queries: qi,
                            q_start: len - 1,
                            kv: &view,
                        })
                        .map_err(e)?;
                    let same = cpu.blocks[0] == gs[i];
                    sel_note(&mut o, same, format!("squeeze req {b} layer {l} len {len}"));
                }
                if let (Some(lz), LayerPolicy::Lazy(_)) = (eng.lazy(), &layers[l]) {
                    let mut want: Vec<usize> = lz
                        .keep_set(id(b), l)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|t| t as usize)
                        .collect();
                    want.extend(PROMPT[b]..len);
                    let same = (0..hkv).all(|h| tokens_of(&gs[i], h) == want);
                    sel_note(&mut o, same, format!("lazy req {b} layer {l} len {len}"));
                }
                if l == cover {
                    let view = pools[l].view(b as u64).map_err(e)?;
                    let r = ref_f64(&shape, qi, &view, Some(&Selection::full(hkv, len)));
                    worst(&mut o.cover_err, rel_error(&got[i * qe..(i + 1) * qe], &r));
                }
            }
        }
    }
    for l in 0..nl {
        for b in 0..3 {
            if let Some((_, _, ms)) = ga.squeeze_sealed(l, id(b)) {
                o.seal_ms.push(ms);
            }
        }
    }
    for b in 0..3 {
        ga.end_request(id(b));
    }
    o.finite &= ga.n_requests() == 0;
    Ok(o)
}

fn check_of(name: &str, o: &Outcome) -> Check {
    let ok = o.finite
        && o.pre_err <= 1e-2
        && o.dec_err <= 1e-2
        && o.cover_err <= 1e-2
        && o.sel_n > 0
        && o.sel_same == o.sel_n;
    let seal = if o.seal_ms.is_empty() {
        String::new()
    } else {
        let mx = o.seal_ms.iter().cloned().fold(0f64, f64::max);
        let mean = o.seal_ms.iter().sum::<f64>() / o.seal_ms.len() as f64;
        format!(
            "; seal (key gather + k-means (GPU unless INFINITEHIP_SQUEEZE_KMEANS=host) + calibration + upload) mean {mean:.1} ms, max {mx:.1} ms over {} (request, layer)",
            o.seal_ms.len()
        )
    };
    Check {
        name: name.into(),
        ok,
        detail: format!(
            "selections identical {}/{}{}; vs CPU engine rel err prefill {:.2e} decode {:.2e} (bound 1e-2); covering layer vs dense f64 {:.2e}; finite {}{seal}",
            o.sel_same,
            o.sel_n,
            if o.sel_detail.is_empty() {
                String::new()
            } else {
                format!(" (differ: {})", o.sel_detail)
            },
            o.pre_err,
            o.dec_err,
            o.cover_err,
            o.finite
        ),
    }
}

pub(crate) fn checks(gpu: &GpuContext, seed: u64) -> R<Vec<Check>> {
    let mut v = Vec::new();
    // Squeeze: one level, two levels, and a covering layer (quantile 0).
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let one = SqueezeConfig::default();
    let two = SqueezeConfig {
        levels: 2,
        ..SqueezeConfig::default()
    };
    let all = SqueezeConfig {
        quantile: 0.0,
        ..SqueezeConfig::default()
    };
    let o = scenario(
        gpu,
        shape,
        vec![
            LayerPolicy::Dense,
            LayerPolicy::Squeeze(one),
            LayerPolicy::Squeeze(two),
            LayerPolicy::Squeeze(all),
        ],
        3,
        seed + 900,
    )?;
    v.push(check_of(
        "engine GpuAttention squeeze (1 and 2 levels, covering) vs CPU engine, 3 requests joining at steps 0/2/3",
        &o,
    ));
    // Lazy: points at layers 1 (keep 0.6) and 3 (0.3), GQA group 4.
    let shape = AttnShape::new(16, 4, 128).map_err(e)?;
    let lz = LazyConfig {
        points: vec![
            LazyPoint {
                layer: 1,
                keep: 0.6,
            },
            LazyPoint {
                layer: 3,
                keep: 0.3,
            },
        ],
    };
    let o = scenario(
        gpu,
        shape,
        vec![
            LayerPolicy::Dense,
            LayerPolicy::Lazy(lz.clone()),
            LayerPolicy::Lazy(lz.clone()),
            LayerPolicy::Lazy(lz.clone()),
            LayerPolicy::Lazy(lz),
        ],
        0,
        seed + 901,
    )?;
    v.push(check_of(
        "engine GpuAttention lazy (points 1 @0.6, 3 @0.3; prefill + decode) vs CPU engine, requests joining mid-way",
        &o,
    ));
    // The layer rule on both paths: layers 1-2 sit below dense_layers but
    // are overridden to lazy; the CPU engine runs lazy there, so must the
    // GPU (it ran them dense before `resolve_layer`).
    let shape = AttnShape::new(16, 4, 128).map_err(e)?;
    let lz = LazyConfig {
        points: vec![LazyPoint {
            layer: 1,
            keep: 0.5,
        }],
    };
    let mut cfg = model_cfg(&shape, vec![LayerPolicy::Dense; 4]);
    cfg.dense_layers = 3;
    cfg.overrides = vec![LayerOverride {
        layers: vec![1, 2],
        policy: LayerPolicy::Lazy(lz.clone()),
    }];
    let o = scenario_cfg(
        gpu,
        shape,
        vec![
            LayerPolicy::Dense,
            LayerPolicy::Lazy(lz.clone()),
            LayerPolicy::Lazy(lz),
            LayerPolicy::Dense,
        ],
        cfg,
        0,
        seed + 903,
    )?;
    v.push(check_of(
        "engine GpuAttention: layers below dense_layers overridden to lazy run lazy as on the CPU engine (one layer rule)",
        &o,
    ));
    // Lazy covering: keep 1.0 everywhere == dense.
    let shape = AttnShape::new(8, 8, 64).map_err(e)?;
    let lz = LazyConfig {
        points: vec![LazyPoint {
            layer: 1,
            keep: 1.0,
        }],
    };
    let o = scenario(
        gpu,
        shape,
        vec![
            LayerPolicy::Dense,
            LayerPolicy::Lazy(lz.clone()),
            LayerPolicy::Lazy(lz),
        ],
        2,
        seed + 902,
    )?;
    v.push(check_of(
        "engine GpuAttention lazy covering (keep 1.0) == dense (f64), d64 g1",
        &o,
    ));
    Ok(v)
}
