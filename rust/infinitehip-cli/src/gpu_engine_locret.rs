//! `gpu-test` checks of `GpuAttention` running locret layers over
//! engine-layout K/V (SGLang token-major `[slots][kv_heads][D]` with a
//! shuffled `req_to_token`, one pool per layer), bf16 q and bf16 pre-RoPE
//! projections, against the CPU `Engine` with the same config (random
//! retaining heads written with safetensors) fed the same K/V, projections
//! and queries. Three requests join at different steps; each prefills its
//! prompt in several chunks (batched with the other requests' chunks or
//! decodes of the same step), the last chunk with `prompt_done` (one
//! prompt ends with a tail shorter than `keep_last`), then decodes:
//! - retained sets: after every call, each locret layer's retained
//!   positions per KV head (`GpuAttention::locret_held`) pick exactly the K
//!   rows the CPU engine's compacted pool holds (`Engine::read`), and
//!   eviction did happen on the small-budget layers;
//! - outputs (prefill and decode) within DESIGN.md's bf16 bound (1e-2);
//! - a covering budget (no eviction) equals dense (f64 reference).

use std::path::PathBuf;

use half::bf16;
use infinitehip::attention::{rel_error, AttnShape};
use infinitehip::backend::cuda::dispatch::AttnOut;
use infinitehip::backend::cuda::engine_attn::{GpuAttention, Insert, ProjArg, QArg};
use infinitehip::backend::cuda::{DevBuf, GpuContext};
use infinitehip::config::{LayerPolicy, LocretConfig};
use infinitehip::engine::{Engine, Projections};
use infinitehip::kv::KvLayout;
use infinitehip::policy::locret::write_random_weights;
use infinitehip::policy::{Phase, Selection};
use infinitehip::rng::Rng;
use infinitehip::DType;

use crate::gpu::{e, random_pool, ref_f64, Check, R};
use crate::gpu_engine::{model_cfg, TokenPool};

const PROMPT: [usize; 3] = [900, 532, 1100];
const CHUNK: usize = 256;
const JOIN: [usize; 3] = [0, 1, 3];
const STEPS: usize = 10;

struct Outcome {
    pre_err: f64,
    dec_err: f64,
    sel_same: usize,
    sel_n: usize,
    sel_detail: String,
    /// (layer, fewest retained / most retained over the run) per locret
    /// layer at the end, and whether every small-budget layer evicted.
    evicted: bool,
    held_note: String,
    cover_err: f64,
    finite: bool,
    sync_ms: f64,
    syncs: usize,
    prefill_ms: Vec<f64>,
}

fn chunks(b: usize) -> usize {
    PROMPT[b].div_ceil(CHUNK)
}

fn bf(rng: &mut Rng, n: usize) -> (Vec<bf16>, Vec<f32>) {
    let b: Vec<bf16> = rng
        .normal_vec(n, 1.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let f = b.iter().map(|x| x.to_f32()).collect();
    (b, f)
}

fn scenario(
    gpu: &GpuContext,
    shape: AttnShape,
    locret: Vec<LocretConfig>,
    cover: usize,
    seed: u64,
) -> R<Outcome> {
    let mut layers = vec![LayerPolicy::Dense];
    layers.extend(locret.iter().cloned().map(LayerPolicy::Locret));
    let nl = layers.len();
    let mut cfg = model_cfg(&shape, layers.clone());
    cfg.kv.dtype = DType::Bf16;
    let hidden = locret[0].hidden;
    let path: PathBuf = std::env::temp_dir().join(format!(
        "ihip-gpulocret-{}-{seed}.safetensors",
        std::process::id()
    ));
    write_random_weights(&path, &cfg.model, hidden, DType::Bf16, seed).map_err(e)?;
    for l in 1..nl {
        if let LayerPolicy::Locret(c) = &mut cfg.overrides[l].policy {
            c.weights = Some(path.display().to_string());
        }
    }
    let (hkv, d, qe) = (shape.n_kv_heads, shape.head_dim, shape.q_elems());
    let te = hkv * d;
    let mut rng = Rng::new(seed);
    let full: Vec<usize> = (0..3)
        .map(|b| PROMPT[b] + STEPS.saturating_sub(JOIN[b] + chunks(b)))
        .collect();
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
    let _ = std::fs::remove_file(&path);
    let side = gpu.ctx.new_stream().map_err(e)?;
    let raw = side.cu_stream() as u64;
    let g2 = unsafe { gpu.on_stream(raw) };
    let mut o = Outcome {
        pre_err: 0.0,
        dec_err: 0.0,
        sel_same: 0,
        sel_n: 0,
        sel_detail: String::new(),
        evicted: false,
        held_note: String::new(),
        cover_err: 0.0,
        finite: true,
        sync_ms: 0.0,
        syncs: 0,
        prefill_ms: Vec::new(),
    };
    let worst = |w: &mut f64, x: f64| *w = if x.is_nan() { f64::NAN } else { w.max(x) };
    let id = |b: usize| 70 + b as u64;
    let mut pos = [0usize; 3];
    // Most tokens evicted (held fewer than seen) per layer over the run.
    let mut max_evicted = vec![0usize; nl];
    // Retained set of (layer, request) vs the CPU engine's compacted pool.
    let compare = |o: &mut Outcome,
                   eng: &Engine,
                   ga: &GpuAttention,
                   l: usize,
                   b: usize,
                   len: usize,
                   max_evicted: &mut Vec<usize>|
     -> R<()> {
        let held = ga.locret_held(l, id(b));
        let n_cpu = eng.seq_len(l, id(b)).map_err(e)?;
        let (kc, _) = eng.read(l, id(b), 0, n_cpu).map_err(e)?;
        let (kp, _) = pools[l].read(b as u64, 0, len).map_err(e)?;
        let same = match &held {
            None => false,
            Some(hs) => {
                hs.len() == hkv
                    && hs.iter().enumerate().all(|(h, ps)| {
                        ps.len() == n_cpu
                            && ps.iter().enumerate().all(|(i, &p)| {
                                let p = p as usize;
                                p < len
                                    && (0..d).all(|c| {
                                        kp[(p * hkv + h) * d + c].to_f32()
                                            == kc[(i * hkv + h) * d + c]
                                    })
                            })
                    })
            }
        };
        max_evicted[l] = max_evicted[l].max(len.saturating_sub(n_cpu));
        o.sel_n += 1;
        if same {
            o.sel_same += 1;
        } else if o.sel_detail.len() < 300 {
            o.sel_detail.push_str(&format!(
                "layer {l} req {b} len {len}: gpu {:?} cpu {n_cpu}; ",
                held.as_ref().map(|h| h[0].len())
            ));
        }
        Ok(())
    };
    for step in 0..STEPS {
        // Prefill chunks of every request in its prompt, one batched call.
        let pre: Vec<usize> = (0..3)
            .filter(|&b| JOIN[b] <= step && pos[b] < PROMPT[b])
            .collect();
        if !pre.is_empty() {
            let ns: Vec<usize> = pre.iter().map(|&b| CHUNK.min(PROMPT[b] - pos[b])).collect();
            let total: usize = ns.iter().sum();
            let lens: Vec<usize> = pre.iter().zip(&ns).map(|(&b, &n)| pos[b] + n).collect();
            let done: Vec<bool> = pre
                .iter()
                .zip(&lens)
                .map(|(&b, &l)| l == PROMPT[b])
                .collect();
            let ids: Vec<u64> = pre.iter().map(|&b| id(b)).collect();
            for &b in &pre {
                if pos[b] == 0 {
                    eng.add_sequence(id(b)).map_err(e)?;
                }
            }
            let (qb, qf) = bf(&mut rng, total * qe);
            let qd = DevBuf::from_slice(&qb).map_err(e)?;
            let out = DevBuf::alloc(total * qe * 4).map_err(e)?;
            for l in 0..nl {
                let (pqb, pqf) = bf(&mut rng, total * qe);
                let (pkb, pkf) = bf(&mut rng, total * te);
                let (pvb, pvf) = bf(&mut rng, total * te);
                let (dq, dk, dv) = (
                    DevBuf::from_slice(&pqb).map_err(e)?,
                    DevBuf::from_slice(&pkb).map_err(e)?,
                    DevBuf::from_slice(&pvb).map_err(e)?,
                );
                let mut want = vec![0f32; total * qe];
                let mut r0 = 0;
                for (i, &b) in pre.iter().enumerate() {
                    let n = ns[i];
                    let (k, v) = pools[l].read(b as u64, pos[b], pos[b] + n).map_err(e)?;
                    let pr = Projections {
                        q: &pqf[r0 * qe..(r0 + n) * qe],
                        k: &pkf[r0 * te..(r0 + n) * te],
                        v: &pvf[r0 * te..(r0 + n) * te],
                    };
                    eng.append(l, id(b), &k, &v, Phase::Prefill, done[i], Some(pr))
                        .map_err(e)?;
                    eng.attend_prefill(
                        l,
                        id(b),
                        &qf[r0 * qe..(r0 + n) * qe],
                        &mut want[r0 * qe..(r0 + n) * qe],
                    )
                    .map_err(e)?;
                    r0 += n;
                }
                out.fill_bytes(0xff).map_err(e)?;
                let t0 = std::time::Instant::now();
                unsafe {
                    ga.prefill_ex(
                        raw,
                        l,
                        &tps[l].engine_kv(),
                        &ids,
                        &pre,
                        &lens,
                        &ns,
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
                        Some(&Insert {
                            proj: Some(ProjArg {
                                q: dq.ptr,
                                k: dk.ptr,
                                v: dv.ptr,
                                dtype: DType::Bf16,
                                q_stride: qe,
                                kv_stride: te,
                            }),
                            prompt_done: &done,
                        }),
                    )
                    .map_err(e)?;
                }
                g2.synchronize().map_err(e)?;
                if l > 0 {
                    o.prefill_ms.push(t0.elapsed().as_secs_f64() * 1e3);
                }
                let got: Vec<f32> = out.read(total * qe).map_err(e)?;
                o.finite &= got.iter().all(|x| x.is_finite());
                let w64: Vec<f64> = want.iter().map(|&x| x as f64).collect();
                worst(&mut o.pre_err, rel_error(&got, &w64));
                if l > 0 {
                    for (i, &b) in pre.iter().enumerate() {
                        compare(&mut o, &eng, &ga, l, b, lens[i], &mut max_evicted)?;
                    }
                }
            }
            for (i, &b) in pre.iter().enumerate() {
                pos[b] += ns[i];
            }
        }
        // Decode of the requests whose prompt ended at an earlier step.
        let act: Vec<usize> = (0..3)
            .filter(|&b| pos[b] >= PROMPT[b] && !pre.contains(&b))
            .collect();
        if act.is_empty() {
            continue;
        }
        let lens: Vec<usize> = act.iter().map(|&b| pos[b] + 1).collect();
        let ids: Vec<u64> = act.iter().map(|&b| id(b)).collect();
        let nb = act.len();
        let (qb, qf) = bf(&mut rng, nb * qe);
        let qd = DevBuf::from_slice(&qb).map_err(e)?;
        let out = DevBuf::alloc(nb * qe * 4).map_err(e)?;
        for l in 0..nl {
            for (i, &b) in act.iter().enumerate() {
                let (k, v) = pools[l].read(b as u64, lens[i] - 1, lens[i]).map_err(e)?;
                // Decoded tokens are never scored; the CPU engine still
                // takes projections with every locret append.
                let (_, pq) = bf(&mut rng, qe);
                let (_, pk) = bf(&mut rng, te);
                let (_, pv) = bf(&mut rng, te);
                let pr = (l > 0).then_some(Projections {
                    q: &pq,
                    k: &pk,
                    v: &pv,
                });
                eng.append(l, id(b), &k, &v, Phase::Decode, false, pr)
                    .map_err(e)?;
            }
            let mut want = vec![0f32; nb * qe];
            eng.attend_decode(l, &ids, &qf, &mut want).map_err(e)?;
            out.fill_bytes(0xff).map_err(e)?;
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
            for (i, &b) in act.iter().enumerate() {
                if l > 0 {
                    compare(&mut o, &eng, &ga, l, b, lens[i], &mut max_evicted)?;
                }
                if l == cover {
                    let view = pools[l].view(b as u64).map_err(e)?;
                    let len = lens[i];
                    let qi = &qf[i * qe..(i + 1) * qe];
                    let r = ref_f64(&shape, qi, &view, Some(&Selection::full(hkv, len)));
                    worst(&mut o.cover_err, rel_error(&got[i * qe..(i + 1) * qe], &r));
                }
            }
        }
        for &b in &act {
            pos[b] += 1;
        }
    }
    // Every small-budget layer evicted; the covering one never did.
    o.evicted =
        (1..nl).filter(|&l| l != cover).all(|l| max_evicted[l] > 0) && max_evicted[cover] == 0;
    for l in 1..nl {
        if let Some(s) = ga.locret_stats(l) {
            o.sync_ms += s.sync_ms;
            o.syncs += s.syncs;
            o.held_note.push_str(&format!(
                "L{l} budget {} evicting calls {} most tokens evicted {}; ",
                locret[l - 1].budget,
                s.evictions,
                max_evicted[l]
            ));
        }
    }
    // A prefill without projections is refused on a locret layer.
    let refused = unsafe {
        ga.prefill(
            raw,
            1,
            &tps[1].engine_kv(),
            &[id(0)],
            &[0],
            &[1],
            &[1],
            &QArg {
                ptr: 16,
                dtype: DType::Bf16,
                row_stride: qe,
            },
            &AttnOut {
                ptr: 16,
                dtype: DType::F32,
                row_stride: qe,
            },
            None,
        )
    };
    o.finite &= refused.is_err_and(|x| x.to_string().contains("projections"));
    for b in 0..3 {
        ga.end_request(id(b));
    }
    o.finite &= ga.n_requests() == 0 && ga.locret_held(1, id(0)).is_none();
    Ok(o)
}

fn check_of(name: &str, o: &Outcome) -> Check {
    let ok = o.finite
        && o.pre_err <= 1e-2
        && o.dec_err <= 1e-2
        && o.cover_err <= 1e-2
        && o.sel_n > 0
        && o.sel_same == o.sel_n
        && o.evicted;
    let pm = if o.prefill_ms.is_empty() {
        0.0
    } else {
        o.prefill_ms.iter().sum::<f64>() / o.prefill_ms.len() as f64
    };
    Check {
        name: name.into(),
        ok,
        detail: format!(
            "retained sets identical {}/{}{}; {}evicted {}; vs CPU engine rel err prefill {:.2e} decode {:.2e} (bound 1e-2); covering layer vs dense f64 {:.2e}; finite/refusals {}; score read-back: {} syncs, mean host wait {:.3} ms; locret prefill call (batched chunks, incl. the sync) mean {:.2} ms",
            o.sel_same,
            o.sel_n,
            if o.sel_detail.is_empty() {
                String::new()
            } else {
                format!(" (differ: {})", o.sel_detail)
            },
            o.held_note,
            o.evicted,
            o.pre_err,
            o.dec_err,
            o.cover_err,
            o.finite,
            o.syncs,
            o.sync_ms / o.syncs.max(1) as f64,
            pm
        ),
    }
}

pub(crate) fn checks(gpu: &GpuContext, seed: u64) -> R<Vec<Check>> {
    let mut v = Vec::new();
    let base = LocretConfig {
        budget: 300,
        chunk: CHUNK,
        stabilizer: 128,
        sink: 4,
        keep_last: 32,
        hidden: 64,
        ..LocretConfig::default()
    };
    let upstream = LocretConfig {
        budget: 200,
        sink: 0,
        stabilize_final_chunk: false,
        ..base.clone()
    };
    let covering = LocretConfig {
        budget: 1 << 20,
        ..base.clone()
    };
    // A scenario error is a failed check (the other checks still run).
    let mut push = |name: &str, o: R<Outcome>| {
        v.push(match o {
            Ok(o) => check_of(name, &o),
            Err(x) => Check {
                name: name.into(),
                ok: false,
                detail: format!("error: {x}"),
            },
        })
    };
    let shape = AttnShape::new(16, 4, 128).map_err(e)?;
    push(
        "engine GpuAttention locret (budget 300 sink 4; budget 200 upstream final chunk; covering) vs CPU engine, chunked prefill + decode, requests joining at 0/1/3",
        scenario(
            gpu,
            shape,
            vec![base.clone(), upstream, covering.clone()],
            3,
            seed + 950,
        ),
    );
    let shape = AttnShape::new(8, 8, 64).map_err(e)?;
    push(
        "engine GpuAttention locret (budget 300; covering == dense) vs CPU engine, d64 g1",
        scenario(gpu, shape, vec![base, covering], 2, seed + 951),
    );
    Ok(v)
}
