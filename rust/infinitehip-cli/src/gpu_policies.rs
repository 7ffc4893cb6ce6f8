//! `gpu-test` checks of the policies' GPU kernels (backend::cuda::policies)
//! against the CPU code on fresh random inputs: Locret scores vs
//! `RetainingHead::scores_f64_reference`, Squeeze keep flags vs
//! `HeadIndex::kept_clusters` (one level), LazyLLM importance vs
//! `policy::lazy::importance` and its keep set vs `top_k` on the CPU values.
//! Outputs are poisoned with NaN (0xff bytes) before each launch.

use half::{bf16, f16};
use infinitehip::attention::{rel_error, AttnShape};
use infinitehip::backend::cuda::dispatch::DeviceKv;
use infinitehip::backend::cuda::policies::squeeze2::SqueezeIndexGpu;
use infinitehip::backend::cuda::policies::{self as gp, LazyWorkspace, LocretGpu, SqueezeGpu};
use infinitehip::backend::cuda::{DevBuf, GpuContext};
use infinitehip::config::{ModelShape, SqueezeConfig, SqueezePool};
use infinitehip::kv::{KvLayout, KvPool};
use infinitehip::policy::lazy::{importance, keep_count, top_k};
use infinitehip::policy::locret::RetainingHead;
use infinitehip::policy::squeeze::{pooled_probs, HeadIndex, Level, SqueezePolicy, Thresholds};
use infinitehip::policy::{Phase, Policy, SelectRequest, Selection};
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
    // Two-level (and one-level) Squeeze lookup straight to key ranges vs
    // the CPU policy; quantiles (0, 0): every token selected.
    let extras = [1usize, 37, 250, 5];
    v.push(squeeze2_case(
        gpu,
        (32, 8, 128),
        3000,
        &extras,
        2,
        (0.5, 0.5),
        seed + 40,
    )?);
    v.push(squeeze2_case(
        gpu,
        (12, 4, 80),
        1777,
        &extras[..3],
        2,
        (0.7, 0.3),
        seed + 41,
    )?);
    v.push(squeeze2_case(
        gpu,
        (16, 16, 64),
        2100,
        &extras[..2],
        1,
        (0.8, 0.0),
        seed + 42,
    )?);
    v.push(squeeze2_case(
        gpu,
        (32, 8, 128),
        2500,
        &extras,
        2,
        (0.0, 0.0),
        seed + 43,
    )?);
    // LazyLLM keep sets on the device.
    v.push(lazy_topk_exact_case(gpu, seed + 50)?);
    let seqs = [
        (60, 16, 0),
        (999, 0, 4),
        (5000, 2, 0),
        (20_000, 10, 1),
        (300, 32, 0),
        (1, 0, 1),
    ];
    v.push(lazy_plan_case::<bf16>(
        gpu,
        (32, 8, 128),
        64,
        &seqs,
        seed + 51,
    )?);
    v.push(lazy_plan_case::<f16>(
        gpu,
        (12, 4, 80),
        16,
        &seqs[..4],
        seed + 52,
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
    // Squeeze two-level select (lookup + key ranges) on a real index.
    {
        let prefix = 8192usize;
        let cfg = SqueezeConfig {
            levels: 2,
            kmeans_iters: 4,
            ..SqueezeConfig::default()
        };
        let lay = KvLayout {
            n_kv_heads: nkv,
            head_dim: d,
            page_size: 64,
        };
        let mut pool = KvPool::<f32>::new(lay, None).map_err(e)?;
        pool.add_sequence(0).map_err(e)?;
        let kk = rng.normal_vec(prefix * lay.token_elems(), 1.0);
        pool.append(0, &kk, &kk).map_err(e)?;
        let view = pool.view(0).map_err(e)?;
        let mut pol = SqueezePolicy::new(cfg.clone(), &ms).map_err(e)?;
        pol.build_prefix(1, &shape, &view).map_err(e)?;
        let w = cfg.observation_window;
        let calib = rng.normal_vec(w * shape.q_elems(), 1.0);
        pol.select(&SelectRequest {
            seq: 1,
            shape,
            phase: Phase::Prefill,
            queries: &calib,
            q_start: prefix - w,
            kv: &view,
        })
        .map_err(e)?;
        let p = pol.prefix(1).ok_or("squeeze prefix")?;
        let thr = p.thresholds().ok_or("squeeze thresholds")?;
        // One token past the prefix: a query at the prefix's own positions
        // is attended densely by the policy (no lookup to time).
        let one = rng.normal_vec(lay.token_elems(), 1.0);
        drop(view);
        pool.append(0, &one, &one).map_err(e)?;
        let view = pool.view(0).map_err(e)?;
        let len = prefix + 1;
        let idx = SqueezeIndexGpu::upload(&p).map_err(e)?;
        let (k, k1) = idx.clusters();
        for rows in [1usize, 32] {
            let queries = rng.normal_vec(rows * shape.q_elems(), 1.0);
            let lens = vec![len as i32; rows];
            let (dq, dl) = (
                DevBuf::from_slice(&queries).map_err(e)?,
                DevBuf::from_slice(&lens).map_err(e)?,
            );
            let ws = idx.workspace(rows).map_err(e)?;
            let out = idx.new_selection(rows, len).map_err(e)?;
            let g = crate::gpu::time_ms(gpu, 20, || {
                idx.launch_select(
                    gpu,
                    &gpu.stream,
                    &shape,
                    dq.ptr,
                    rows,
                    dl.ptr,
                    thr,
                    &ws,
                    &out,
                )
                .map_err(e)
            })?;
            let qe = shape.q_elems();
            let c = cpu_ms(3, || {
                for r in 0..rows {
                    pol.select(&SelectRequest {
                        seq: 1,
                        shape,
                        phase: Phase::Decode,
                        queries: &queries[r * qe..(r + 1) * qe],
                        q_start: prefix,
                        kv: &view,
                    })
                    .map_err(e)?;
                }
                Ok(())
            })?;
            println!(
                "| squeeze select, two levels, to key ranges | prefix {prefix}, {k}/{k1} clusters/head, {rows} queries | {g:.4} | {c:.3} (policy select) |"
            );
        }
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
        // Importance + top-k + compaction on the device, one sequence.
        let seg = [gp::lazy_topk::LazySegment {
            seq: 0,
            off: 0,
            n: len,
            k: kc,
            force: Some(len as u32 - 1),
            mask_off: None,
        }];
        let params = gp::lazy_topk::topk_params(&seg, len).map_err(e)?;
        let dp = DevBuf::from_slice(&params).map_err(e)?;
        let keep = DevBuf::alloc(len * 4).map_err(e)?;
        let (cnt, st) = (DevBuf::alloc(4).map_err(e)?, DevBuf::alloc(4).map_err(e)?);
        let gk = crate::gpu::time_ms(gpu, 20, || {
            gp::lazy_topk::launch_lazy_keep(
                gpu,
                &gpu.stream,
                &shape,
                &kv,
                &seg,
                dq.ptr,
                dt.ptr,
                None,
                dp.ptr,
                false,
                &mut ws,
                out.ptr,
                keep.ptr,
                cnt.ptr,
                st.ptr,
            )
            .map_err(e)
        })?;
        let ck = cpu_ms(3, || {
            let imp = importance(&shape, &q, &view, &tokens).map_err(e)?;
            top_k(&tokens, &imp, kc, Some(len as u32 - 1));
            Ok(())
        })?;
        println!("| lazy keep set on the device (importance + top-k {kc}) | {len} tokens | {gk:.4} | {ck:.3} |");
    }
    Ok(())
}

/// Squeeze lookup through `SqueezeIndexGpu` (one or two levels, decode,
/// straight to key ranges) against `SqueezePolicy::select` on the same
/// sealed, calibrated prefix: a real k-means index of clustered random keys
/// (`prefix` tokens, window 100), then one decode query per row, row r from
/// a sequence of `prefix + extras[r]` tokens. Every row's selection must
/// equal the CPU policy's, except rows where some probability lies within
/// 1e-5 (relative) of a threshold (counted apart). `quantiles` (fine,
/// coarse) = (0, 0) gives threshold -inf: everything must be selected.
fn squeeze2_case(
    gpu: &GpuContext,
    (nq, nkv, d): (usize, usize, usize),
    prefix: usize,
    extras: &[usize],
    levels: usize,
    quantiles: (f32, f32),
    seed: u64,
) -> R<Check> {
    let shape = AttnShape::new(nq, nkv, d).map_err(e)?;
    let g = shape.group();
    let ms = ModelShape {
        n_layers: 1,
        n_q_heads: nq,
        n_kv_heads: nkv,
        head_dim: d,
        ..ModelShape::default()
    };
    let cfg = SqueezeConfig {
        percent_clusters: 5.0,
        percent_clusters_l1: 20.0,
        levels,
        quantile: quantiles.0,
        quantile_l1: quantiles.1,
        observation_window: 100,
        kmeans_iters: 8,
        seed,
        prefill_pool: SqueezePool::Max,
        sink: 4,
    };
    let mut rng = Rng::new(seed);
    // Keys around 48 centres per head (token-major [t][h][d]).
    let centres = rng.normal_vec(nkv * 48 * d, 1.5);
    let key_rows = |n: usize, rng: &mut Rng| -> Vec<f32> {
        let mut out = Vec::with_capacity(n * nkv * d);
        for _ in 0..n {
            for h in 0..nkv {
                let c = &centres[(h * 48 + rng.below(48)) * d..][..d];
                let noise = rng.normal_vec(d, 0.6);
                out.extend(c.iter().zip(&noise).map(|(a, b)| a + b));
            }
        }
        out
    };
    let lay = KvLayout {
        n_kv_heads: nkv,
        head_dim: d,
        page_size: 64,
    };
    let mut pool = KvPool::<f32>::new(lay, None).map_err(e)?;
    pool.add_sequence(0).map_err(e)?;
    let kp = key_rows(prefix, &mut rng);
    pool.append(0, &kp, &kp).map_err(e)?;
    let mut pol = SqueezePolicy::new(cfg.clone(), &ms).map_err(e)?;
    pol.build_prefix(1, &shape, &pool.view(0).map_err(e)?)
        .map_err(e)?;
    let w = cfg.observation_window;
    let calib = rng.normal_vec(w * shape.q_elems(), 1.0);
    {
        let view = pool.view(0).map_err(e)?;
        pol.select(&SelectRequest {
            seq: 1,
            shape,
            phase: Phase::Prefill,
            queries: &calib,
            q_start: prefix - w,
            kv: &view,
        })
        .map_err(e)?;
    }
    let p = pol.prefix(1).ok_or("squeeze: prefix not sealed")?;
    let thr = p.thresholds().ok_or("squeeze: not calibrated")?;
    // CPU selections at growing lengths (rows sorted by length).
    let mut order: Vec<usize> = (0..extras.len()).collect();
    order.sort_by_key(|&r| extras[r]);
    let rows = extras.len();
    let queries = rng.normal_vec(rows * shape.q_elems(), 1.0);
    let qe = shape.q_elems();
    let lens: Vec<usize> = extras.iter().map(|&x| prefix + x).collect();
    let mut cpu: Vec<Option<Selection>> = vec![None; rows];
    for &r in &order {
        let have = pool.view(0).map_err(e)?.len();
        if lens[r] > have {
            let more = key_rows(lens[r] - have, &mut rng);
            pool.append(0, &more, &more).map_err(e)?;
        }
        let view = pool.view(0).map_err(e)?;
        let out = pol
            .select(&SelectRequest {
                seq: 1,
                shape,
                phase: Phase::Decode,
                queries: &queries[r * qe..(r + 1) * qe],
                q_start: lens[r] - 1,
                kv: &view,
            })
            .map_err(e)?;
        cpu[r] = Some(out.blocks[0].clone());
    }
    // GPU: poisoned outputs, one launch pair, probabilities read back too.
    let idx = SqueezeIndexGpu::upload(&p).map_err(e)?;
    let (k, k1) = idx.clusters();
    let ws = idx.workspace(rows).map_err(e)?;
    let out = idx
        .new_selection(rows, *lens.iter().max().unwrap())
        .map_err(e)?;
    for b in [
        &ws.probs,
        &ws.keep,
        &ws.cprobs,
        &ws.ckeep,
        &out.ranges,
        &out.cum,
        &out.cnt,
        &out.tot,
    ] {
        b.fill_bytes(0xff).map_err(e)?;
    }
    let lens_i: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
    let (dq, dl) = (
        DevBuf::from_slice(&queries).map_err(e)?,
        DevBuf::from_slice(&lens_i).map_err(e)?,
    );
    idx.launch_select(
        gpu,
        &gpu.stream,
        &shape,
        dq.ptr,
        rows,
        dl.ptr,
        thr,
        &ws,
        &out,
    )
    .map_err(e)?;
    gpu.synchronize().map_err(e)?;
    let cnt: Vec<i32> = out.cnt.read(rows * nkv).map_err(e)?;
    let tot: Vec<i32> = out.tot.read(rows * nkv).map_err(e)?;
    let written =
        cnt.iter().all(|&c| c >= 1 && c as usize <= out.cap) && tot.iter().all(|&t| t > 0);
    if !written {
        return Ok(Check {
            name: format!("squeeze {levels}-level GPU selection, {nq}q/{nkv}kv d{d}"),
            ok: false,
            detail: format!("range counts not written or out of bounds: {cnt:?}"),
        });
    }
    // The raw DeviceSelection form the decode kernel reads: ranges
    // ascending, non-empty, not touching; cum = tokens before each range;
    // tot = all of them.
    let rg: Vec<i32> = out.ranges.read(rows * nkv * out.cap * 2).map_err(e)?;
    let cum: Vec<i32> = out.cum.read(rows * nkv * out.cap).map_err(e)?;
    let mut form_ok = true;
    for row in 0..rows * nkv {
        let (mut acc, mut prev_end) = (0i32, -1i32);
        for i in 0..cnt[row] as usize {
            let (a, b) = (rg[(row * out.cap + i) * 2], rg[(row * out.cap + i) * 2 + 1]);
            form_ok &= a < b && a > prev_end && cum[row * out.cap + i] == acc;
            acc += b - a;
            prev_end = b;
        }
        form_ok &= acc == tot[row];
    }
    let gsel = out.to_host(nkv).map_err(e)?;
    let gp_: Vec<f32> = ws.probs.read(rows * nkv * k).map_err(e)?;
    let gcp: Vec<f32> = ws.cprobs.read(rows * nkv * k1.max(1)).map_err(e)?;
    let gck: Vec<u8> = ws.ckeep.read(rows * nkv * k1.max(1)).map_err(e)?;
    let near = |v: f32, t: f32| t.is_finite() && (v - t).abs() <= 1e-5 * t.abs();
    let (mut mism, mut near_rows, mut sel_tokens, mut all_tokens) =
        (0usize, 0usize, 0usize, 0usize);
    let (mut want_p, mut got_p) = (Vec::new(), Vec::new());
    for r in 0..rows {
        let cs = cpu[r].as_ref().unwrap();
        for h in 0..nkv {
            let hi = &p.heads[h];
            let qs = &queries[r * qe + h * g * d..r * qe + (h + 1) * g * d];
            let mut is_near = false;
            let cands: Vec<u32> = match &hi.coarse {
                Some(co) => {
                    let pc = pooled_probs(
                        &co.level,
                        &co.level.nonempty,
                        qs,
                        g,
                        shape.scale,
                        SqueezePool::Max,
                    );
                    let mut same = true;
                    let mut cands = Vec::new();
                    for (&c, &v) in co.level.nonempty.iter().zip(&pc) {
                        let i = (r * nkv + h) * k1 + c as usize;
                        want_p.push(v as f64);
                        got_p.push(gcp[i]);
                        is_near |= near(v, thr.coarse);
                        same &= (gck[i] == 1) == (v >= thr.coarse);
                        if v >= thr.coarse {
                            cands.extend_from_slice(co.fine_members(c as usize));
                        }
                    }
                    if !same {
                        cands.clear(); // fine probabilities not comparable
                    }
                    cands.sort_unstable();
                    cands
                }
                None => hi.fine.nonempty.clone(),
            };
            if !cands.is_empty() {
                let pf = pooled_probs(&hi.fine, &cands, qs, g, shape.scale, SqueezePool::Max);
                for (&c, &v) in cands.iter().zip(&pf) {
                    want_p.push(v as f64);
                    got_p.push(gp_[(r * nkv + h) * k + c as usize]);
                    is_near |= near(v, thr.fine);
                }
            }
            sel_tokens += gsel[r].token_count(h);
            all_tokens += lens[r];
            if gsel[r].heads[h] != cs.heads[h] {
                if is_near {
                    near_rows += 1;
                } else {
                    mism += 1;
                }
            }
        }
    }
    let perr = rel_error(&got_p, &want_p);
    let finite = got_p.iter().all(|x| x.is_finite());
    let full = quantiles == (0.0, 0.0);
    let all_selected = gsel
        .iter()
        .zip(&lens)
        .all(|(s, &l)| *s == Selection::full(nkv, l));
    Ok(Check {
        name: format!(
            "squeeze {levels}-level GPU selection, {nq}q/{nkv}kv d{d}, prefix {prefix}, {k}{} clusters, {rows} queries of lengths {lens:?}, quantiles {quantiles:?}",
            if k1 > 0 { format!("/{k1}") } else { String::new() }
        ),
        ok: mism == 0 && form_ok && finite && perr <= 1e-5 && (!full || all_selected),
        detail: format!(
            "(query, head) selections differing from SqueezePolicy: {mism} (+{near_rows} with a probability within 1e-5 of a threshold) of {}; range form (sorted, merged, cum, tot) ok {form_ok}; selected {:.1}% of tokens{}; probs rel_err {perr:.2e}; thresholds fine {:.3e} coarse {:.3e}",
            rows * nkv,
            100.0 * sel_tokens as f64 / all_tokens as f64,
            if full { format!("; every token selected {all_selected}") } else { String::new() },
            thr.fine,
            thr.coarse
        ),
    })
}

/// CPU twin of a `lazy_topk` segment: `top_k` over the candidates, plus
/// every non-candidate with `emit_always`, ascending.
fn cpu_keep(
    tokens: &[u32],
    imp: &[f32],
    is_cand: impl Fn(u32) -> bool,
    k: usize,
    force: Option<u32>,
    emit_always: bool,
) -> Vec<u32> {
    let (ct, ci): (Vec<u32>, Vec<f32>) = tokens
        .iter()
        .zip(imp)
        .filter(|(&t, _)| is_cand(t))
        .map(|(&t, &x)| (t, x))
        .unzip();
    let mut out = top_k(&ct, &ci, k.min(ct.len()), force);
    if emit_always {
        out.extend(tokens.iter().copied().filter(|&t| !is_cand(t)));
        out.sort_unstable();
    }
    out
}

/// `lazy_topk` alone on given importances against `top_k`: segments of
/// mixed lengths (1 to 70 000), importances drawn from 16 levels (many
/// exact ties at the cut) or continuous with ±0.0 and negatives, prompt
/// masks by token id (and none), forced tokens in and out of the
/// candidates, k from 0 to beyond the candidates, both output modes; plus
/// a NaN segment and a non-ascending one, which must report their status
/// without disturbing the others. Must be identical.
fn lazy_topk_exact_case(gpu: &GpuContext, seed: u64) -> R<Check> {
    let mut rng = Rng::new(seed);
    let lens = [1usize, 77, 256, 1000, 4099, 70_000, 513, 33];
    let (mut toks, mut imps, mut mask, mut segs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // (tokens, importance, prompt mask, k, force) per segment.
    type Seg = (Vec<u32>, Vec<f32>, Option<Vec<bool>>, usize, Option<u32>);
    let mut per: Vec<Seg> = Vec::new();
    let mut ties_at_cut = 0;
    for (i, &n) in lens.iter().enumerate() {
        let span = 2 * n as u32 + 1;
        let mut tokens: Vec<u32> = (0..span).filter(|_| rng.below(2) == 0).take(n).collect();
        while tokens.len() < n {
            tokens.push(span + tokens.len() as u32);
        }
        let imp: Vec<f32> = (0..n)
            .map(|_| match i % 2 {
                0 => rng.below(16) as f32 * 0.01,
                _ => match rng.below(20) {
                    0 => 0.0,
                    1 => -0.0,
                    _ => rng.normal_vec(1, 1.0)[0],
                },
            })
            .collect();
        let prompt: Option<Vec<bool>> = (i != 3).then(|| {
            (0..=*tokens.last().unwrap())
                .map(|_| rng.below(5) != 0)
                .collect()
        });
        let is_cand = |t: u32| prompt.as_ref().is_none_or(|p| p[t as usize]);
        let nc = tokens.iter().filter(|&&t| is_cand(t)).count();
        let k = match i % 4 {
            0 => nc.saturating_sub(1),
            1 => rng.below(nc + 1),
            2 => nc + 5,
            _ => (i / 4) * nc.min(1), // 0 or 1
        };
        let force = match i % 3 {
            0 => None,
            _ => Some(tokens[rng.below(n)]),
        };
        // Ties at the cut: the k-th and (k+1)-th candidate values equal.
        let mut cv: Vec<f32> = tokens
            .iter()
            .zip(&imp)
            .filter(|(&t, _)| is_cand(t))
            .map(|(_, &x)| x)
            .collect();
        cv.sort_by(|a, b| b.total_cmp(a));
        if k > 0 && k < cv.len() && cv[k - 1] == cv[k] {
            ties_at_cut += 1;
        }
        let mask_off = prompt.as_ref().map(|p| {
            mask.extend(p.iter().map(|&b| b as u8));
            mask.len() - p.len()
        });
        segs.push(gp::lazy_topk::LazySegment {
            seq: 0,
            off: toks.len(),
            n,
            k,
            force,
            mask_off,
        });
        toks.extend(tokens.iter().map(|&t| t as i32));
        imps.extend_from_slice(&imp);
        per.push((tokens, imp, prompt, k, force));
    }
    // Two broken segments at the end.
    let (nan_at, bad_at) = (segs.len(), segs.len() + 1);
    for (j, kind) in [0, 1].iter().enumerate() {
        let off = toks.len();
        let mut t: Vec<i32> = (0..50).collect();
        let mut x: Vec<f32> = rng.normal_vec(50, 1.0);
        if *kind == 0 {
            x[17] = f32::NAN;
        } else {
            t.swap(3, 4);
        }
        toks.extend(t);
        imps.extend(x);
        segs.push(gp::lazy_topk::LazySegment {
            seq: 0,
            off,
            n: 50,
            k: 10 + j,
            force: None,
            mask_off: None,
        });
    }
    let params = gp::lazy_topk::topk_params(&segs, toks.len()).map_err(e)?;
    let ns = segs.len();
    let n = toks.len();
    let (dt, di, dm, dp) = (
        DevBuf::from_slice(&toks).map_err(e)?,
        DevBuf::from_slice(&imps).map_err(e)?,
        DevBuf::from_slice(&mask).map_err(e)?,
        DevBuf::from_slice(&params).map_err(e)?,
    );
    let (mut mism, mut compared) = (0usize, 0usize);
    let mut status_ok = true;
    for emit in [false, true] {
        let (keep, counts, status) = (
            DevBuf::alloc(n * 4).map_err(e)?,
            DevBuf::alloc(ns * 4).map_err(e)?,
            DevBuf::alloc(ns * 4).map_err(e)?,
        );
        for b in [&keep, &counts, &status] {
            b.fill_bytes(0xff).map_err(e)?;
        }
        gp::lazy_topk::launch_lazy_topk(
            gpu,
            &gpu.stream,
            dt.ptr,
            di.ptr,
            Some(dm.ptr),
            dp.ptr,
            ns,
            emit,
            keep.ptr,
            counts.ptr,
            status.ptr,
        )
        .map_err(e)?;
        gpu.synchronize().map_err(e)?;
        let st: Vec<i32> = status.read(ns).map_err(e)?;
        let cn: Vec<i32> = counts.read(ns).map_err(e)?;
        let kp: Vec<i32> = keep.read(n).map_err(e)?;
        status_ok &= st[..nan_at].iter().all(|&s| s == 0)
            && st[nan_at] == 1
            && st[bad_at] == 2
            && cn[nan_at] == -1
            && cn[bad_at] == -1
            && gp::lazy_topk::check_status(&st).is_err();
        for (s, (tokens, imp, prompt, k, force)) in per.iter().enumerate() {
            let is_cand = |t: u32| prompt.as_ref().is_none_or(|p| p[t as usize]);
            let want = cpu_keep(tokens, imp, is_cand, *k, *force, emit);
            let c = cn[s];
            let got: Vec<u32> = if c >= 0 && c as usize <= tokens.len() {
                kp[segs[s].off..segs[s].off + c as usize]
                    .iter()
                    .map(|&t| t as u32)
                    .collect()
            } else {
                Vec::new()
            };
            compared += 1;
            mism += (got != want) as usize;
        }
    }
    Ok(Check {
        name: format!(
            "lazy top-k kernel vs top_k, {} segments of lengths {lens:?}, ties, masks, forced tokens",
            lens.len()
        ),
        ok: mism == 0 && status_ok,
        detail: format!(
            "keep sets differing: {mism} of {compared} (both output modes); segments with a tie at the cut {ties_at_cut}; NaN and non-ascending segments flagged, others unaffected {status_ok}"
        ),
    })
}

/// LazyLLM keep sets of a batch of sequences of mixed lengths, fully on the
/// GPU (importance, top-k, compaction; the second pruning point runs on the
/// first one's device output; one synchronisation at the end) against
/// `LazyPlan::prune_top` with the CPU importance (the CPU policy's path).
/// Two points (keep 0.6 then 0.3) in a 3-layer plan; each sequence has a
/// prompt, some generated tokens and a last step that is either a decode
/// token (not a candidate) or more prompt (forced in). A quarter of the key
/// rows duplicate an earlier token's, so exact importance ties occur on
/// both sides. Each sequence's sets must equal the CPU policy's, except
/// where a differing token's CPU importance lies within 1e-5 of the k-th
/// value (counted apart; its second point is then not compared); and the
/// device top-k must equal `top_k` applied to the GPU's own importances.
fn lazy_plan_case<T: Element>(
    gpu: &GpuContext,
    (nq, nkv, d): (usize, usize, usize),
    ps: usize,
    seqs: &[(usize, usize, usize)],
    seed: u64,
) -> R<Check> {
    use gp::lazy_topk::{keep_len, launch_lazy_keep, LazySegment};
    use infinitehip::config::LazyPoint;
    use infinitehip::policy::lazy::LazyPlan;
    let shape = AttnShape::new(nq, nkv, d).map_err(e)?;
    let qe = shape.q_elems();
    let mut rng = Rng::new(seed);
    let lay = KvLayout {
        n_kv_heads: nkv,
        head_dim: d,
        page_size: ps,
    };
    let te = lay.token_elems();
    let mut pool = KvPool::<T>::new(lay, None).map_err(e)?;
    let points = [
        LazyPoint {
            layer: 0,
            keep: 0.6,
        },
        LazyPoint {
            layer: 1,
            keep: 0.3,
        },
    ];
    struct Cpu {
        prompt: Vec<bool>,
        attend: [Vec<u32>; 3],
        imp: [Vec<f32>; 2],
        k: [usize; 2],
        ncand: [usize; 2],
    }
    let mut cpu = Vec::new();
    let (mut q0, mut q1) = (Vec::new(), Vec::new());
    for (s, &(prompt, gen, last_prompt)) in seqs.iter().enumerate() {
        let len = prompt + gen + last_prompt.max(1);
        pool.add_sequence(s as u64).map_err(e)?;
        let mut kk = rng.normal_vec(len * te, 1.0);
        for t in 1..len {
            if rng.below(4) == 0 {
                let u = rng.below(t);
                let row = kk[u * te..(u + 1) * te].to_vec();
                kk[t * te..(t + 1) * te].copy_from_slice(&row);
            }
        }
        let kt: Vec<T> = kk.iter().map(|&x| T::from_f32(x)).collect();
        pool.append(s as u64, &kt, &kt).map_err(e)?;
        let view = pool.view(s as u64).map_err(e)?;
        let mut plan = LazyPlan::new(3, &points).map_err(e)?;
        plan.begin_step(prompt, Phase::Prefill).map_err(e)?;
        plan.end_step().map_err(e)?;
        for _ in 0..gen {
            plan.begin_step(1, Phase::Decode).map_err(e)?;
            plan.end_step().map_err(e)?;
        }
        match last_prompt {
            0 => plan.begin_step(1, Phase::Decode),
            m => plan.begin_step(m, Phase::Prefill),
        }
        .map_err(e)?;
        let (qa, qb) = (rng.normal_vec(qe, 1.0), rng.normal_vec(qe, 1.0));
        let a0 = plan.layer(0).map_err(e)?.attend;
        let i0 = importance(&shape, &qa, &view, &a0).map_err(e)?;
        plan.prune_top(0, &i0).map_err(e)?;
        let a1 = plan.layer(1).map_err(e)?.attend;
        let i1 = importance(&shape, &qb, &view, &a1).map_err(e)?;
        plan.prune_top(1, &i1).map_err(e)?;
        let a2 = plan.layer(2).map_err(e)?.attend;
        let pm: Vec<bool> = (0..len as u32).map(|t| plan.is_prompt(t)).collect();
        let np = plan.n_prompt();
        let nc1 = a1.iter().filter(|&&t| pm[t as usize]).count();
        cpu.push(Cpu {
            prompt: pm,
            attend: [a0, a1, a2],
            imp: [i0, i1],
            k: [keep_count(0.6, np), keep_count(0.3, np)],
            ncand: [np, nc1],
        });
        q0.extend(qa);
        q1.extend(qb);
    }
    let kv = DeviceKv::upload(
        &(0..seqs.len())
            .map(|s| (&pool, s as u64))
            .collect::<Vec<_>>(),
    )
    .map_err(e)?;
    // Segments of both points; the host knows every output length.
    let (mut toks, mut mask) = (Vec::new(), Vec::new());
    let (mut seg0, mut seg1) = (Vec::new(), Vec::new());
    for (s, c) in cpu.iter().enumerate() {
        let (off, n0) = (toks.len(), c.attend[0].len());
        let force = Some(n0 as u32 - 1);
        let mask_off = Some(mask.len());
        mask.extend(c.prompt.iter().map(|&b| b as u8));
        toks.extend(c.attend[0].iter().map(|&t| t as i32));
        let n1 = keep_len(c.k[0], c.ncand[0], n0, true);
        seg0.push(LazySegment {
            seq: s,
            off,
            n: n0,
            k: c.k[0],
            force,
            mask_off,
        });
        seg1.push(LazySegment {
            seq: s,
            off,
            n: n1,
            k: c.k[1],
            force,
            mask_off,
        });
    }
    let n = toks.len();
    let p0 = gp::lazy_topk::topk_params(&seg0, n).map_err(e)?;
    let p1 = gp::lazy_topk::topk_params(&seg1, n).map_err(e)?;
    let ns = seqs.len();
    let up = |x: &[f32]| DevBuf::from_slice(x).map_err(e);
    let (dq0, dq1) = (up(&q0)?, up(&q1)?);
    let dt = DevBuf::from_slice(&toks).map_err(e)?;
    let dm = DevBuf::from_slice(&mask).map_err(e)?;
    let (dp0, dp1) = (
        DevBuf::from_slice(&p0).map_err(e)?,
        DevBuf::from_slice(&p1).map_err(e)?,
    );
    let bufs: Vec<DevBuf> = (0..4)
        .map(|_| DevBuf::alloc(n * 4))
        .chain((0..4).map(|_| DevBuf::alloc(ns * 4)))
        .collect::<Result<_, _>>()
        .map_err(e)?;
    for b in &bufs {
        b.fill_bytes(0xff).map_err(e)?;
    }
    let [imp0, keep0, imp1, keep1, cnt0, st0, cnt1, st1] = &bufs[..] else {
        unreachable!()
    };
    let mut ws = LazyWorkspace::default();
    let t0 = std::time::Instant::now();
    launch_lazy_keep(
        gpu,
        &gpu.stream,
        &shape,
        &kv,
        &seg0,
        dq0.ptr,
        dt.ptr,
        Some(dm.ptr),
        dp0.ptr,
        true,
        &mut ws,
        imp0.ptr,
        keep0.ptr,
        cnt0.ptr,
        st0.ptr,
    )
    .map_err(e)?;
    launch_lazy_keep(
        gpu,
        &gpu.stream,
        &shape,
        &kv,
        &seg1,
        dq1.ptr,
        keep0.ptr,
        Some(dm.ptr),
        dp1.ptr,
        true,
        &mut ws,
        imp1.ptr,
        keep1.ptr,
        cnt1.ptr,
        st1.ptr,
    )
    .map_err(e)?;
    gpu.synchronize().map_err(e)?;
    let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    let rd = |b: &DevBuf, m: usize| b.read::<i32>(m).map_err(e);
    let (st0v, st1v, c0, c1) = (rd(st0, ns)?, rd(st1, ns)?, rd(cnt0, ns)?, rd(cnt1, ns)?);
    let (k0v, k1v) = (rd(keep0, n)?, rd(keep1, n)?);
    let (i0v, i1v): (Vec<f32>, Vec<f32>) = (imp0.read(n).map_err(e)?, imp1.read(n).map_err(e)?);
    let status_ok = st0v.iter().chain(&st1v).all(|&x| x == 0);
    let (mut mism, mut near, mut kernel_mism, mut len_bad) = (0usize, 0usize, 0usize, 0usize);
    let (mut want_i, mut got_i) = (Vec::new(), Vec::new());
    let slice = |v: &[i32], s: &LazySegment, c: i32| -> Vec<u32> {
        if c < 0 || c as usize > s.n {
            return Vec::new();
        }
        v[s.off..s.off + c as usize]
            .iter()
            .map(|&t| t as u32)
            .collect()
    };
    for (s, c) in cpu.iter().enumerate() {
        let (s0, s1) = (&seg0[s], &seg1[s]);
        let is_cand = |t: u32| c.prompt[t as usize];
        let n2 = keep_len(c.k[1], c.k[0].min(c.ncand[0]), s1.n, true);
        len_bad += (c0[s] as usize != s1.n) as usize + (c1[s] as usize != n2) as usize;
        let g0 = slice(&k0v, s0, c0[s]);
        let g1 = slice(&k1v, s1, c1[s]);
        let gi0 = &i0v[s0.off..s0.off + s0.n];
        // The device top-k on the GPU's own importances: exact.
        kernel_mism +=
            (g0 != cpu_keep(&c.attend[0], gi0, is_cand, c.k[0], s0.force, true)) as usize;
        if g0.len() == s1.n {
            let gi1 = &i1v[s1.off..s1.off + s1.n];
            kernel_mism += (g1 != cpu_keep(&g0, gi1, is_cand, c.k[1], s1.force, true)) as usize;
        }
        want_i.extend(c.imp[0].iter().map(|&x| x as f64));
        got_i.extend_from_slice(gi0);
        // Against the CPU policy.
        let near_kth = |toks: &[u32], imp: &[f32], k: usize, diff: Vec<u32>| -> bool {
            let mut cv: Vec<f32> = toks
                .iter()
                .zip(imp)
                .filter(|(&t, _)| is_cand(t))
                .map(|(_, &x)| x)
                .collect();
            cv.sort_by(|a, b| b.total_cmp(a));
            let kth = cv[(k.max(1) - 1).min(cv.len() - 1)];
            diff.iter().all(|t| {
                let i = toks.binary_search(t).map(|i| imp[i]).unwrap_or(f32::NAN);
                (i - kth).abs() <= 1e-5 * kth.abs()
            })
        };
        let sym = |a: &[u32], b: &[u32]| -> Vec<u32> {
            let (x, y): (
                std::collections::HashSet<u32>,
                std::collections::HashSet<u32>,
            ) = (a.iter().copied().collect(), b.iter().copied().collect());
            x.symmetric_difference(&y).copied().collect()
        };
        if g0 != c.attend[1] {
            if near_kth(&c.attend[0], &c.imp[0], c.k[0], sym(&g0, &c.attend[1])) {
                near += 1;
            } else {
                mism += 1;
            }
            continue;
        }
        want_i.extend(c.imp[1].iter().map(|&x| x as f64));
        got_i.extend_from_slice(&i1v[s1.off..s1.off + s1.n]);
        if g1 != c.attend[2] {
            if near_kth(&c.attend[1], &c.imp[1], c.k[1], sym(&g1, &c.attend[2])) {
                near += 1;
            } else {
                mism += 1;
            }
        }
    }
    let ierr = rel_error(&got_i, &want_i);
    let lens: Vec<usize> = cpu.iter().map(|c| c.attend[0].len()).collect();
    Ok(Check {
        name: format!(
            "lazy keep on GPU (2 points, batch of {ns}) {}, {nq}q/{nkv}kv d{d} ps{ps}, lengths {lens:?}",
            T::DTYPE
        ),
        ok: status_ok && len_bad == 0 && kernel_mism == 0 && mism == 0 && ierr <= 1e-5,
        detail: format!(
            "keep sets differing from LazyPlan::prune_top: {mism} (+{near} within 1e-5 of the k-th importance) of {}; device top-k vs top_k on the GPU importances: {kernel_mism} differing; output lengths as predicted {}; status ok {status_ok}; importance rel_err {ierr:.2e}; both points {wall_ms:.2} ms wall incl. launches",
            2 * ns,
            len_bad == 0
        ),
    })
}
