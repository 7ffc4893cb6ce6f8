//! `gpu-test` checks of the policies' GPU kernels (backend::cuda::policies)
//! against the CPU code on fresh random inputs: Locret scores vs
//! `RetainingHead::scores_f64_reference`, Squeeze keep flags vs
//! `HeadIndex::kept_clusters` (one level), LazyLLM importance vs
//! `policy::lazy::importance` and its keep set vs `top_k` on the CPU values.
//! Outputs are poisoned with NaN (0xff bytes) before each launch.

use half::{bf16, f16};
use infinitehip::attention::{rel_error, AttnShape};
use infinitehip::backend::cuda::dispatch::DeviceKv;
use infinitehip::backend::cuda::policies::{self as gp, LazyWorkspace, LocretGpu, SqueezeGpu};
use infinitehip::backend::cuda::{DevBuf, GpuContext};
use infinitehip::config::{ModelShape, SqueezePool};
use infinitehip::kv::{KvLayout, KvPool};
use infinitehip::policy::lazy::{importance, keep_count, top_k};
use infinitehip::policy::locret::RetainingHead;
use infinitehip::policy::squeeze::{pooled_probs, HeadIndex, Level, Thresholds};
use infinitehip::rng::Rng;
use infinitehip::Element;

use crate::gpu::Check;

type R<T> = Result<T, String>;
fn e<E: std::fmt::Display>(x: E) -> String {
    x.to_string()
}

/// Locret: `n` tokens through a head of width `hidden`; `ext_stream`
/// launches on a caller-made stream wrapped with `wrap_borrowed_stream`.
fn locret_case(
    gpu: &GpuContext,
    (nq, nkv, d): (usize, usize, usize),
    hidden: usize,
    n: usize,
    ext_stream: bool,
    seed: u64,
) -> R<Check> {
    let ms = ModelShape {
        n_layers: 1,
        n_q_heads: nq,
        n_kv_heads: nkv,
        head_dim: d,
        ..ModelShape::default()
    };
    let shape = AttnShape::new(nq, nkv, d).map_err(e)?;
    let head = RetainingHead::random(&ms, hidden, seed).map_err(e)?;
    let mut rng = Rng::new(seed ^ 0x5eed);
    let q = rng.normal_vec(n * nq * d, 1.0);
    let k = rng.normal_vec(n * nkv * d, 1.0);
    let v = rng.normal_vec(n * nkv * d, 1.0);
    let want = head.scores_f64_reference(&q, &k, &v).map_err(e)?;
    let g = LocretGpu::new(&head, &shape).map_err(e)?;
    let (dq, dk, dv) = (
        DevBuf::from_slice(&q).map_err(e)?,
        DevBuf::from_slice(&k).map_err(e)?,
        DevBuf::from_slice(&v).map_err(e)?,
    );
    let ws = DevBuf::alloc(g.workspace_bytes(n)).map_err(e)?;
    let out = DevBuf::alloc(n * nkv * 4).map_err(e)?;
    ws.fill_bytes(0xff).map_err(e)?;
    out.fill_bytes(0xff).map_err(e)?;
    if ext_stream {
        // An engine's stream: made elsewhere, borrowed here.
        let own = gpu.ctx.new_stream().map_err(|x| format!("{x:?}"))?;
        gpu.ctx.synchronize().map_err(|x| format!("{x:?}"))?;
        let ext = unsafe { gpu.ctx.wrap_borrowed_stream(own.cu_stream()) };
        g.launch(gpu, &ext, dq.ptr, dk.ptr, dv.ptr, n, &ws, out.ptr)
            .map_err(e)?;
        ext.synchronize().map_err(|x| format!("{x:?}"))?;
        drop(ext);
    } else {
        g.launch(gpu, &gpu.stream, dq.ptr, dk.ptr, dv.ptr, n, &ws, out.ptr)
            .map_err(e)?;
        gpu.synchronize().map_err(e)?;
    }
    let got: Vec<f32> = out.read(n * nkv).map_err(e)?;
    let finite = got.iter().all(|x| x.is_finite());
    let err = rel_error(&got, &want);
    let max_abs = got
        .iter()
        .zip(&want)
        .map(|(&a, &b)| (a as f64 - b).abs())
        .fold(0f64, f64::max);
    Ok(Check {
        name: format!(
            "locret scores, {nq}q/{nkv}kv d{d} hidden {hidden}, {n} tokens{}",
            if ext_stream { ", borrowed stream" } else { "" }
        ),
        ok: finite && err <= 1e-5,
        detail: format!(
            "rel_err vs scores_f64_reference {err:.2e} (max abs {max_abs:.2e}); all written+finite {finite}"
        ),
    })
}

/// Squeeze one-level lookup: `k` clusters per head (some empty), `rows`
/// decode queries; the threshold is the median CPU probability
/// (`median: false`: -inf, keep every non-empty cluster).
fn squeeze_case(
    gpu: &GpuContext,
    (nq, nkv, d): (usize, usize, usize),
    k: usize,
    rows: usize,
    median: bool,
    seed: u64,
) -> R<Check> {
    let shape = AttnShape::new(nq, nkv, d).map_err(e)?;
    let g = shape.group();
    let mut rng = Rng::new(seed);
    let heads: Vec<HeadIndex> = (0..nkv)
        .map(|_| {
            let centroids = rng.normal_vec(k * d, 1.0);
            let sizes: Vec<u32> = (0..k)
                .map(|_| {
                    if rng.below(10) == 0 {
                        0
                    } else {
                        1 + rng.below(60) as u32
                    }
                })
                .collect();
            let nonempty = (0..k as u32).filter(|&c| sizes[c as usize] > 0).collect();
            HeadIndex {
                fine: Level {
                    dim: d,
                    centroids,
                    sizes,
                    nonempty,
                },
                labels: Vec::new(),
                coarse: None,
            }
        })
        .collect();
    let queries = rng.normal_vec(rows * nq * d, 1.5);
    let qrow = |r: usize, h: usize| &queries[(r * nq + h * g) * d..(r * nq + (h + 1) * g) * d];
    // CPU probabilities (cluster order) for the threshold and near-ties.
    let mut cpu_p = vec![0f32; rows * nkv * k];
    for r in 0..rows {
        for (h, hi) in heads.iter().enumerate() {
            let p = pooled_probs(
                &hi.fine,
                &hi.fine.nonempty,
                qrow(r, h),
                g,
                shape.scale,
                SqueezePool::Max,
            );
            for (&c, &pc) in hi.fine.nonempty.iter().zip(&p) {
                cpu_p[(r * nkv + h) * k + c as usize] = pc;
            }
        }
    }
    let thr = if median {
        let mut all: Vec<f32> = cpu_p.iter().copied().filter(|&p| p > 0.0).collect();
        all.sort_by(f32::total_cmp);
        all[all.len() / 2]
    } else {
        f32::NEG_INFINITY
    };
    let th = Thresholds {
        fine: thr,
        coarse: f32::NEG_INFINITY,
    };
    let sg = SqueezeGpu::upload(&heads).map_err(e)?;
    let n = rows * nkv * k;
    let dq = DevBuf::from_slice(&queries).map_err(e)?;
    let probs = DevBuf::alloc(n * 4).map_err(e)?;
    let keep = DevBuf::alloc(n).map_err(e)?;
    probs.fill_bytes(0xff).map_err(e)?;
    keep.fill_bytes(0xff).map_err(e)?;
    sg.launch(
        gpu,
        &gpu.stream,
        &shape,
        dq.ptr,
        rows,
        thr,
        probs.ptr,
        keep.ptr,
    )
    .map_err(e)?;
    gpu.synchronize().map_err(e)?;
    let gp_: Vec<f32> = probs.read(n).map_err(e)?;
    let gk: Vec<u8> = keep.read(n).map_err(e)?;
    let written = gp_.iter().all(|x| x.is_finite()) && gk.iter().all(|&x| x <= 1);
    let (mut mism, mut near, mut kept) = (0usize, 0usize, 0usize);
    for r in 0..rows {
        for (h, hi) in heads.iter().enumerate() {
            let cpu_keep =
                hi.kept_clusters(qrow(r, h), g, shape.scale, SqueezePool::Max, th, false);
            for (c, &ck) in cpu_keep.iter().enumerate() {
                let i = (r * nkv + h) * k + c;
                kept += ck as usize;
                if (gk[i] == 1) != ck {
                    if (cpu_p[i] - thr).abs() <= 1e-5 * thr.abs() {
                        near += 1;
                    } else {
                        mism += 1;
                    }
                }
            }
        }
    }
    let want: Vec<f64> = cpu_p.iter().map(|&x| x as f64).collect();
    let perr = rel_error(&gp_, &want);
    Ok(Check {
        name: format!(
            "squeeze lookup, {nq}q/{nkv}kv d{d}, {k} clusters, {rows} queries, thr {}",
            if median { "median" } else { "-inf" }
        ),
        ok: written && mism == 0 && perr <= 1e-5,
        detail: format!(
            "keep-flag mismatches {mism} (+{near} within 1e-5 of thr) of {n}, CPU kept {kept}; probs rel_err {perr:.2e}; all written+finite {written}"
        ),
    })
}

/// LazyLLM importance of a random subset of a `len`-token sequence, and the
/// keep set at fraction 0.3 (last token forced).
fn lazy_case<T: Element>(
    gpu: &GpuContext,
    (nq, nkv, d): (usize, usize, usize),
    ps: usize,
    len: usize,
    qscale: f32,
    seed: u64,
) -> R<Check> {
    let shape = AttnShape::new(nq, nkv, d).map_err(e)?;
    let mut rng = Rng::new(seed);
    let lay = KvLayout {
        n_kv_heads: nkv,
        head_dim: d,
        page_size: ps,
    };
    let mut pool = KvPool::<T>::new(lay, None).map_err(e)?;
    pool.add_sequence(0).map_err(e)?;
    let ne = len * lay.token_elems();
    let kk: Vec<T> = rng
        .normal_vec(ne, 1.0)
        .into_iter()
        .map(T::from_f32)
        .collect();
    let vv: Vec<T> = rng
        .normal_vec(ne, 1.0)
        .into_iter()
        .map(T::from_f32)
        .collect();
    pool.append(0, &kk, &vv).map_err(e)?;
    let view = pool.view(0).map_err(e)?;
    let q = rng.normal_vec(shape.q_elems(), qscale);
    let mut tokens: Vec<u32> = (0..len as u32 - 1).filter(|_| rng.below(10) < 7).collect();
    tokens.push(len as u32 - 1);
    let n = tokens.len();
    let cpu = importance(&shape, &q, &view, &tokens).map_err(e)?;
    let kv = DeviceKv::upload(&[(&pool, 0)]).map_err(e)?;
    let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    let (dq, dt) = (
        DevBuf::from_slice(&q).map_err(e)?,
        DevBuf::from_slice(&ids).map_err(e)?,
    );
    let out = DevBuf::alloc(n * 4).map_err(e)?;
    out.fill_bytes(0xff).map_err(e)?;
    let mut ws = LazyWorkspace::default();
    gp::launch_lazy_importance(
        gpu,
        &gpu.stream,
        &shape,
        &kv,
        0,
        dq.ptr,
        dt.ptr,
        n,
        &mut ws,
        out.ptr,
    )
    .map_err(e)?;
    gpu.synchronize().map_err(e)?;
    let got: Vec<f32> = out.read(n).map_err(e)?;
    let finite = got.iter().all(|x| x.is_finite());
    let want: Vec<f64> = cpu.iter().map(|&x| x as f64).collect();
    let err = rel_error(&got, &want);
    // Keep sets: GPU (host top-k over the GPU importance) vs CPU.
    let kc = keep_count(0.3, n);
    let force = Some(len as u32 - 1);
    let gkeep = gp::lazy_keep(gpu, &shape, &kv, 0, &q, &tokens, kc, force).map_err(e)?;
    let ckeep = top_k(&tokens, &cpu, kc, force);
    // The k-th largest CPU importance among the non-forced tokens.
    let mut sorted: Vec<f32> = cpu[..n - 1].to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let kth = sorted[(kc.max(2) - 2).min(sorted.len() - 1)];
    let pos = |t: u32| tokens.binary_search(&t).unwrap();
    let (mut mism, mut near) = (0usize, 0usize);
    let gs: std::collections::HashSet<u32> = gkeep.iter().copied().collect();
    let cs: std::collections::HashSet<u32> = ckeep.iter().copied().collect();
    for &t in gs.symmetric_difference(&cs) {
        if (cpu[pos(t)] - kth).abs() <= 1e-5 * kth.abs() {
            near += 1;
        } else {
            mism += 1;
        }
    }
    // NaN in the query must not pass.
    let mut qn = q.clone();
    qn[d + 3] = f32::NAN;
    let nan_rejected = gp::lazy_importance(gpu, &shape, &kv, 0, &qn, &tokens).is_err();
    Ok(Check {
        name: format!(
            "lazy importance {}, {nq}q/{nkv}kv d{d} ps{ps}, {n} of {len} tokens, q x{qscale}",
            T::DTYPE
        ),
        ok: finite && err <= 1e-5 && mism == 0 && gkeep.len() == kc && nan_rejected,
        detail: format!(
            "rel_err vs CPU importance {err:.2e}; keep {kc}: set mismatches {mism} (+{near} near-ties); all written+finite {finite}; NaN query rejected {nan_rejected}"
        ),
    })
}

/// Every policy-kernel check (sizes deliberately off the tile sizes).
pub fn checks(gpu: &GpuContext, seed: u64) -> R<Vec<Check>> {
    let mut v = vec![
        locret_case(gpu, (32, 8, 128), 1024, 300, false, seed + 1)?,
        locret_case(gpu, (12, 4, 80), 333, 77, true, seed + 2)?,
        locret_case(gpu, (8, 8, 64), 100, 1, false, seed + 3)?,
    ];
    for (i, &(sh, k, rows)) in [
        ((32, 8, 128), 1000, 5),
        ((16, 16, 64), 77, 3),
        ((28, 4, 96), 513, 2),
    ]
    .iter()
    .enumerate()
    {
        v.push(squeeze_case(gpu, sh, k, rows, true, seed + 10 + i as u64)?);
    }
    v.push(squeeze_case(gpu, (32, 8, 128), 300, 2, false, seed + 20)?);
    v.push(lazy_case::<bf16>(
        gpu,
        (32, 8, 128),
        64,
        5003,
        1.0,
        seed + 30,
    )?);
    v.push(lazy_case::<f16>(
        gpu,
        (32, 8, 128),
        16,
        3001,
        4.0,
        seed + 31,
    )?);
    v.push(lazy_case::<bf16>(gpu, (12, 4, 80), 16, 77, 1.0, seed + 32)?);
    v.push(lazy_case::<f16>(
        gpu,
        (8, 8, 64),
        64,
        20_000,
        2.0,
        seed + 33,
    )?);
    Ok(v)
}

fn cpu_ms(reps: usize, mut f: impl FnMut() -> R<()>) -> R<f64> {
    f()?;
    let mut ts = Vec::new();
    for _ in 0..reps {
        let t = std::time::Instant::now();
        f()?;
        ts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(crate::gpu::median(&mut ts))
}

/// Median times of the policy kernels (device pointers, no transfers) and
/// of the CPU code they replace (all cores), at Llama-3.1-8B's attention
/// shape (32 q / 8 kv heads, d 128). Printed as a table.
pub fn timing(gpu: &GpuContext, seed: u64) -> R<()> {
    let (nq, nkv, d) = (32usize, 8usize, 128usize);
    let shape = AttnShape::new(nq, nkv, d).map_err(e)?;
    let ms = ModelShape {
        n_layers: 1,
        n_q_heads: nq,
        n_kv_heads: nkv,
        head_dim: d,
        ..ModelShape::default()
    };
    let mut rng = Rng::new(seed ^ 0x7157);
    println!(
        "| op | size | GPU ms | CPU ms ({} threads) |",
        infinitehip::parallel::num_threads()
    );
    println!("|---|---|---|---|");
    // Locret: one prefill chunk of n tokens through a hidden-1024 head.
    let hidden = 1024;
    let head = RetainingHead::random(&ms, hidden, seed).map_err(e)?;
    let lg = LocretGpu::new(&head, &shape).map_err(e)?;
    for n in [1usize, 4096] {
        let q = rng.normal_vec(n * nq * d, 1.0);
        let k = rng.normal_vec(n * nkv * d, 1.0);
        let v = rng.normal_vec(n * nkv * d, 1.0);
        let (dq, dk, dv) = (
            DevBuf::from_slice(&q).map_err(e)?,
            DevBuf::from_slice(&k).map_err(e)?,
            DevBuf::from_slice(&v).map_err(e)?,
        );
        let ws = DevBuf::alloc(lg.workspace_bytes(n)).map_err(e)?;
        let out = DevBuf::alloc(n * nkv * 4).map_err(e)?;
        let g = crate::gpu::time_ms(gpu, 20, || {
            lg.launch(gpu, &gpu.stream, dq.ptr, dk.ptr, dv.ptr, n, &ws, out.ptr)
                .map_err(e)
        })?;
        let c = cpu_ms(3, || head.scores(&q, &k, &v).map(|_| ()).map_err(e))?;
        println!("| locret scores (hidden {hidden}) | {n} tokens | {g:.4} | {c:.3} |");
    }
    // Squeeze: one decode query (and a batch of 32) against k clusters/head.
    for (k, rows) in [(4096usize, 1usize), (4096, 32)] {
        let heads: Vec<HeadIndex> = (0..nkv)
            .map(|_| {
                let sizes = vec![16u32; k];
                HeadIndex {
                    fine: Level {
                        dim: d,
                        centroids: rng.normal_vec(k * d, 1.0),
                        sizes,
                        nonempty: (0..k as u32).collect(),
                    },
                    labels: Vec::new(),
                    coarse: None,
                }
            })
            .collect();
        let sg = SqueezeGpu::upload(&heads).map_err(e)?;
        let queries = rng.normal_vec(rows * nq * d, 1.0);
        let dq = DevBuf::from_slice(&queries).map_err(e)?;
        let n = rows * nkv * k;
        let (probs, keep) = (
            DevBuf::alloc(n * 4).map_err(e)?,
            DevBuf::alloc(n).map_err(e)?,
        );
        let thr = 1.0 / (16.0 * k as f32);
        let g = crate::gpu::time_ms(gpu, 20, || {
            sg.launch(
                gpu,
                &gpu.stream,
                &shape,
                dq.ptr,
                rows,
                thr,
                probs.ptr,
                keep.ptr,
            )
            .map_err(e)
        })?;
        let th = Thresholds {
            fine: thr,
            coarse: f32::NEG_INFINITY,
        };
        let gq = shape.group();
        let c = cpu_ms(3, || {
            infinitehip::parallel::par_map(rows * nkv, |i| {
                let (r, h) = (i / nkv, i % nkv);
                let qs = &queries[(r * nq + h * gq) * d..(r * nq + (h + 1) * gq) * d];
                heads[h].kept_clusters(qs, gq, shape.scale, SqueezePool::Max, th, false)
            });
            Ok(())
        })?;
        println!(
            "| squeeze lookup (one level) | {k} clusters/head, {rows} queries | {g:.4} | {c:.3} |"
        );
    }
    // Lazy: importance of every token of a long prompt (bf16 KV).
    for len in [32_768usize, 131_072] {
        let lay = KvLayout {
            n_kv_heads: nkv,
            head_dim: d,
            page_size: 64,
        };
        let mut pool = KvPool::<bf16>::new(lay, None).map_err(e)?;
        pool.add_sequence(0).map_err(e)?;
        let ne = len * lay.token_elems();
        let kk: Vec<bf16> = rng
            .normal_vec(ne, 1.0)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        pool.append(0, &kk, &kk).map_err(e)?;
        let view = pool.view(0).map_err(e)?;
        let kv = DeviceKv::upload(&[(&pool, 0)]).map_err(e)?;
        let q = rng.normal_vec(shape.q_elems(), 1.0);
        let tokens: Vec<u32> = (0..len as u32).collect();
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let (dq, dt) = (
            DevBuf::from_slice(&q).map_err(e)?,
            DevBuf::from_slice(&ids).map_err(e)?,
        );
        let out = DevBuf::alloc(len * 4).map_err(e)?;
        let mut ws = LazyWorkspace::default();
        let g = crate::gpu::time_ms(gpu, 20, || {
            gp::launch_lazy_importance(
                gpu,
                &gpu.stream,
                &shape,
                &kv,
                0,
                dq.ptr,
                dt.ptr,
                len,
                &mut ws,
                out.ptr,
            )
            .map_err(e)
        })?;
        let c = cpu_ms(3, || {
            importance(&shape, &q, &view, &tokens)
                .map(|_| ())
                .map_err(e)
        })?;
        let kc = keep_count(0.5, len);
        let imp: Vec<f32> = out.read(len).map_err(e)?;
        let tk = cpu_ms(3, || {
            top_k(&tokens, &imp, kc, Some(len as u32 - 1));
            Ok(())
        })?;
        println!("| lazy importance (bf16 KV) | {len} tokens | {g:.4} | {c:.3} (host top-k of the GPU result: {tk:.3}) |");
    }
    Ok(())
}
