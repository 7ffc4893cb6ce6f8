//! `gpu-test --rope-only`, prefill: InfiniteHiP's RoPE modes in the GPU
//! hip sparse prefill (`HipGpuPrefill` + `set_rope_model`; rotated
//! per-block scoring through `RopeGpu::run_stages`, streaming attention
//! through `hip_pf_stream_gather_*` / `hip_pf_stream_q` and the unchanged
//! prefill attention per KV head) vs the CPU `HipPolicy::select_prefill`
//! and the CPU streaming prefill kernel (`attention::prefill_with`), on
//! fresh random inputs (needle sequences), one chunk of queries ending at
//! the sequence's end (past `max_position`):
//! - selections equal the CPU policy's, block for block;
//! - streaming: per checked query, the output against an f64 reference
//!   over the GPU's selection with the keys rotated to their ranks as the
//!   gather stores them (f32 rotation, rounded to the cache dtype) and the
//!   query rotated to n_j - 1 (f32): bound `STORED_KV_BOUND` on the
//!   CUDA-core kernel, `ROUNDING_KERNEL_BOUND` where the tensor-core kernel
//!   runs (bf16 P); the exact streaming reference (`attend_streaming_f64`)
//!   and the CPU kernel's error against it printed beside it, and the GPU
//!   against the CPU kernel bounded by `ROUNDING_KERNEL_BOUND` (the GPU
//!   rounds re-rotated keys to the cache dtype) plus the CPU kernel's
//!   measured error (ours plus that error with a covering budget, where
//!   nothing is re-rotated);
//! - one dropped token (the stored reference without one visible selected
//!   token: ranks behind it move) must miss the bound;
//! - the output is poisoned with NaN first: NaN never passes;
//! - a covering budget equals the CPU's dense streaming prefill
//!   (`prefill_with` without a selection) and `attend_streaming_f64`.
//!
//! Then the engine route: `GpuAttention::prefill` past `max_position`
//! (token-major pool, table rows reversed) equals `HipGpuPrefill` on the
//! same inputs and the CPU reference.
//!
//! Status: compiled, not run on a GPU.

use half::{bf16, f16};
use infinitehip::attention::reference::{attend_streaming_f64, softmax_values_f64};
use infinitehip::attention::{prefill_with, rel_error, AttnShape};
use infinitehip::backend::cuda::dispatch::{AttnKernel, AttnOut, DeviceKv, HipGpuPrefill};
use infinitehip::backend::cuda::engine_attn::{GpuAttention, QArg};
use infinitehip::backend::cuda::hip_fast::MaskEstimator;
use infinitehip::backend::cuda::{DevBuf, GpuContext};
use infinitehip::config::{HipConfig, LayerPolicy, ModelShape, PolicyConfig, RopeMode};
use infinitehip::kv::{KvLayout, KvPool, KvRead, SeqView};
use infinitehip::parallel::par_map;
use infinitehip::policy::hip::HipPolicy;
use infinitehip::policy::{Phase, Policy, SelectRequest, Selection};
use infinitehip::rng::Rng;
use infinitehip::rope::Rope;
use infinitehip::workload::needle_seq;
use infinitehip::{DType, Element};

use crate::gpu::{e, ref_f64_lim, Check, R, ROUNDING_KERNEL_BOUND, STORED_KV_BOUND};
use crate::gpu_engine::TokenPool;
use crate::gpu_rope::{cfg, Progress};

fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

fn model_of(shape: &AttnShape, max_position: usize) -> ModelShape {
    ModelShape {
        n_layers: 1,
        n_q_heads: shape.n_q_heads,
        n_kv_heads: shape.n_kv_heads,
        head_dim: shape.head_dim,
        rope_theta: 10000.0,
        max_position,
    }
}

/// f64 streaming prefill of one query (`q`: `[n_q][d]` as stored, at
/// `pos`) over the tokens of `sel` at positions <= pos, as the GPU computes
/// it: the query rotated by (n_vis - 1) - pos in f32 (`Rope::rotate`), the
/// key of rank i at t rotated by i - t in f32 and rounded to `T`. `drop`:
/// leave this token out of every list (a wrong selection).
fn stream_ref_stored<T: Element>(
    shape: &AttnShape,
    rope: &Rope,
    q: &[f32],
    kv: &dyn KvRead,
    sel: &Selection,
    pos: usize,
    drop: Option<usize>,
) -> Vec<f64> {
    let (g, d) = (shape.group(), shape.head_dim);
    let mut out = vec![0f64; shape.q_elems()];
    let mut k = vec![0f32; d];
    for hq in 0..shape.n_q_heads {
        let h = hq / g;
        let toks: Vec<usize> = sel.heads[h]
            .iter()
            .flat_map(|r| r.clone())
            .filter(|&t| t <= pos && Some(t) != drop)
            .collect();
        let n = toks.len();
        let mut qh = q[hq * d..(hq + 1) * d].to_vec();
        rope.rotate(&mut qh, (n as f64 - 1.0) - pos as f64);
        let mut scores = Vec::with_capacity(n);
        for (rank, &t) in toks.iter().enumerate() {
            kv.read_key(h, t, &mut k);
            rope.rotate(&mut k, rank as f64 - t as f64);
            let s: f64 = qh
                .iter()
                .zip(&k)
                .map(|(&a, &b)| a as f64 * T::from_f32(b).to_f32() as f64)
                .sum();
            scores.push(s * shape.scale as f64);
        }
        softmax_values_f64(kv, h, &toks, &scores, &mut out[hq * d..(hq + 1) * d]);
    }
    out
}

/// The CPU side of a prefill case: `HipPolicy::select_prefill` of the
/// chunk and the CPU kernel's output (streaming or original positions).
fn cpu_prefill<T: Element>(
    shape: &AttnShape,
    hip: &HipConfig,
    model: &ModelShape,
    view: &SeqView<'_, T>,
    q: &[f32],
    q_start: usize,
) -> R<(Vec<Selection>, Vec<f32>)> {
    let mut pol = HipPolicy::new(hip.clone(), model).map_err(e)?;
    let req = SelectRequest {
        seq: 0,
        shape: *shape,
        phase: Phase::Prefill,
        queries: q,
        q_start,
        kv: view,
    };
    let sel = pol.select(&req).map_err(e)?;
    let rope = Rope::new(shape.head_dim, model.rope_theta);
    let streaming = (hip.rope.attention == RopeMode::Streaming).then_some(&rope);
    let mut out = vec![0f32; q.len()];
    prefill_with(
        shape,
        q,
        q_start,
        view,
        Some((&sel.blocks, sel.q_block)),
        streaming,
        &mut out,
    )
    .map_err(e)?;
    Ok((sel.blocks, out))
}

/// One chunk of `n` queries ending at token `len` through `HipGpuPrefill`
/// with `hip`'s RoPE modes (attention kernel `kernel`) vs the CPU policy.
#[allow(clippy::too_many_arguments)]
pub(crate) fn prefill_case<T: Element>(
    gpu: &GpuContext,
    shape: AttnShape,
    hip: HipConfig,
    max_position: usize,
    len: usize,
    n: usize,
    kernel: AttnKernel,
    covering: bool,
    seed: u64,
) -> R<Check> {
    let model = model_of(&shape, max_position);
    let rope = Rope::new(shape.head_dim, model.rope_theta);
    let streaming = hip.rope.attention == RopeMode::Streaming;
    let qb = hip.block_size_q;
    let q_start = len - n;
    let ns = needle_seq::<T>(shape, len, 64, hip.sink, hip.window, 64, seed).map_err(e)?;
    let mut rng = Rng::new(seed ^ 0x51f7);
    let qe = shape.q_elems();
    let mut q = Vec::with_capacity(n * qe);
    for _ in 0..n {
        q.extend(ns.query(&mut rng));
    }
    let view = ns.pool.view(0).map_err(e)?;
    let (csel, cpu_out) = cpu_prefill(&shape, &hip, &model, &view, &q, q_start)?;
    // The GPU.
    let mut kv = DeviceKv::upload(&[(&ns.pool, 0)]).map_err(e)?;
    kv.lens = vec![len];
    let mut pf = HipGpuPrefill::new(hip.clone(), &shape, n).map_err(e)?;
    pf.set_rope_model(&model).map_err(e)?;
    // The reference estimator (bit-equal to the CPU policy at original
    // scoring; rotated scoring always runs it).
    pf.estimator = MaskEstimator::Reference;
    let qd = DevBuf::from_slice(&q).map_err(e)?;
    let out = DevBuf::alloc(q.len() * 4).map_err(e)?;
    out.fill_bytes(0xff).map_err(e)?; // NaN: every element must be written
    pf.prepare(gpu, &kv, q_start, n).map_err(e)?;
    pf.select(gpu, &kv, qd.ptr).map_err(e)?;
    pf.attend_with(gpu, &shape, &kv, qd.ptr, out.ptr, kernel)
        .map_err(e)?;
    gpu.synchronize().map_err(e)?;
    let gsel = pf.sel.to_host(shape.n_kv_heads).map_err(e)?;
    let got: Vec<f32> = out.read(q.len()).map_err(e)?;
    let finite = got.iter().all(|x| x.is_finite());
    let mism =
        csel.iter().zip(&gsel).filter(|(a, b)| a != b).count() + csel.len().abs_diff(gsel.len());
    let first_diff = csel
        .iter()
        .zip(&gsel)
        .position(|(a, b)| a != b)
        .map(|b| {
            let h = (0..shape.n_kv_heads)
                .find(|&h| csel[b].heads[h] != gsel[b].heads[h])
                .unwrap_or(0);
            format!(
                " (first: block {b} head {h}: cpu {} ranges/{} tok, gpu {} ranges/{} tok)",
                csel[b].heads[h].len(),
                csel[b].token_count(h),
                gsel[b].heads[h].len(),
                gsel[b].token_count(h)
            )
        })
        .unwrap_or_default();
    // Checked queries: ~48 spread over the chunk, the first and last of
    // the last block (the clip's extremes).
    let mut checked: Vec<usize> = (0..n).step_by((n / 48).max(1)).collect();
    checked.extend([(n - 1) / qb * qb, n - 1]);
    checked.sort_unstable();
    checked.dedup();
    let drop_at = *checked.last().unwrap();
    let drop_tok = streaming.then(|| {
        let pos = q_start + drop_at;
        let toks: Vec<usize> = gsel[drop_at / qb].heads[0]
            .iter()
            .flat_map(|r| r.clone())
            .filter(|&t| t <= pos)
            .collect();
        // The middle visible token: the keys before it move one streaming
        // position relative to the query (a random early token would move
        // only a few, which the tensor-core bound of 1e-2 could hide).
        toks[toks.len() / 2]
    });
    let bound = match kernel {
        AttnKernel::CudaCore => STORED_KV_BOUND,
        _ => ROUNDING_KERNEL_BOUND,
    };
    // Per checked query: [vs its reference, vs exact, CPU kernel vs exact,
    // vs CPU kernel, vs CPU dense (covering), dropped].
    let per: Vec<[f64; 6]> = par_map(checked.len(), |c| {
        let i = checked[c];
        let pos = q_start + i;
        let qi = &q[i * qe..(i + 1) * qe];
        let gi = &got[i * qe..(i + 1) * qe];
        let ci = &cpu_out[i * qe..(i + 1) * qe];
        let s = &gsel[i / qb];
        let mut r = [0f64, 0.0, 0.0, 0.0, 0.0, f64::INFINITY];
        if !streaming {
            let rf = ref_f64_lim(&shape, qi, &view, Some(s), pos + 1);
            r[0] = rel_error(gi, &rf);
            r[2] = rel_error(ci, &rf);
            return r;
        }
        r[0] = rel_error(
            gi,
            &stream_ref_stored::<T>(&shape, &rope, qi, &view, s, pos, None),
        );
        let ex = attend_streaming_f64(&shape, &rope, qi, &view, s, pos + 1, pos);
        r[1] = rel_error(gi, &ex);
        r[2] = rel_error(ci, &ex);
        let cd: Vec<f64> = ci.iter().map(|&x| x as f64).collect();
        r[3] = rel_error(gi, &cd);
        if covering {
            let full = Selection::full(shape.n_kv_heads, len);
            let fx = attend_streaming_f64(&shape, &rope, qi, &view, &full, pos + 1, pos);
            r[1] = nan_max(r[1], rel_error(gi, &fx));
        }
        if i == drop_at {
            if let Some(t) = drop_tok {
                let dr = stream_ref_stored::<T>(&shape, &rope, qi, &view, s, pos, Some(t));
                r[5] = rel_error(gi, &dr);
            }
        }
        r
    });
    let (mut worst, mut exact, mut cpu_exact, mut vs_cpu, mut drop_err) =
        (0f64, 0f64, 0f64, 0f64, f64::INFINITY);
    for r in &per {
        worst = nan_max(worst, r[0]);
        exact = nan_max(exact, r[1]);
        cpu_exact = nan_max(cpu_exact, r[2]);
        vs_cpu = nan_max(vs_cpu, r[3]);
        drop_err = drop_err.min(r[5]);
    }
    // Covering: the CPU's dense streaming prefill (no selection), all rows.
    let mut dense_diff = 0f64;
    if covering {
        let mut dense = vec![0f32; q.len()];
        prefill_with(&shape, &q, q_start, &view, None, Some(&rope), &mut dense).map_err(e)?;
        for &i in &checked {
            let dd: Vec<f64> = dense[i * qe..(i + 1) * qe]
                .iter()
                .map(|&x| x as f64)
                .collect();
            dense_diff = nan_max(dense_diff, rel_error(&got[i * qe..(i + 1) * qe], &dd));
        }
    }
    let attended: f64 = gsel
        .iter()
        .enumerate()
        .map(|(b, s)| s.token_count(0) as f64 / (q_start + ((b + 1) * qb).min(n)) as f64)
        .sum::<f64>()
        / gsel.len().max(1) as f64;
    let mut ok = mism == 0 && finite && worst <= bound;
    // Against the CPU kernel (which rotates the query per range in f32 and
    // reads the keys as stored) the GPU also differs by rounding the
    // re-rotated keys to the cache dtype: bounded by the rounding bound
    // plus the CPU kernel's own measured error; with a covering budget
    // nothing is re-rotated (ranks are positions), so ours plus that error.
    let cpu_bound = if covering {
        bound + cpu_exact
    } else {
        ROUNDING_KERNEL_BOUND + cpu_exact
    };
    let detail = if streaming {
        ok &= drop_err > bound && vs_cpu <= cpu_bound;
        if covering {
            ok &= dense_diff <= cpu_bound && exact <= bound;
        }
        format!(
            "block selection mismatches {mism}/{}{first_diff}; rel_err vs stored-rotation f64 ref {worst:.2e} (bound {bound:.0e}, {kernel:?} kernel, {} queries); one dropped token {drop_err:.2e} (must exceed); vs exact streaming ref {exact:.2e}; vs CPU streaming kernel {vs_cpu:.2e} (bound {cpu_bound:.2e}; CPU kernel vs exact {cpu_exact:.2e}){}; attended {:.1}% of keys; all written+finite {finite}",
            csel.len(),
            checked.len(),
            if covering {
                format!("; vs CPU dense streaming {dense_diff:.2e} (bound {cpu_bound:.2e})")
            } else {
                String::new()
            },
            attended * 100.0
        )
    } else {
        format!(
            "block selection mismatches {mism}/{}{first_diff}; attention rel_err vs f64 {worst:.2e} (bound {bound:.0e}, {kernel:?} kernel; CPU kernel {cpu_exact:.2e}); attended {:.1}% of keys; all written+finite {finite}",
            csel.len(),
            attended * 100.0
        )
    };
    Ok(Check {
        name: format!(
            "HipGpuPrefill RoPE modes (scoring {:?}, attention {:?}) == CPU HipPolicy prefill, {}, {} q / {} kv d{}, queries {q_start}..{len}, max_position {max_position}{}",
            hip.rope.scoring,
            hip.rope.attention,
            std::any::type_name::<T>().rsplit("::").next().unwrap_or("?"),
            shape.n_q_heads,
            shape.n_kv_heads,
            shape.head_dim,
            if covering { ", covering budget" } else { "" }
        ),
        ok,
        detail,
    })
}

/// The engine route: `GpuAttention::prefill` of two requests (one past
/// `max_position`, so the call runs the RoPE-mode sparse prefill; one
/// within it, which the same call prefills sparsely too) over a
/// token-major pool whose table rows are reversed, vs `HipGpuPrefill` on
/// the same K/V (a paged upload of each request; the same kernels, so
/// equal within 1e-6) and vs the CPU (`HipPolicy` selection, stored f64
/// reference; the engine's attention kernel is the tensor-core one where it
/// applies: bound `ROUNDING_KERNEL_BOUND`). With the sparse prefill off
/// (`prefill_estimator` None) the same call is refused.
///
/// `interleaved`: the pool's keys and the queries in llama.cpp's NORM
/// layout (`GpuAttention::set_rope_layout`, as its CUDA route sets it)
/// while the twin and the CPU read them in halves: the outputs must still
/// agree (dot products are layout-invariant), and one dropped visible
/// token must miss the CPU bound. `within`: `max_position` above both
/// requests and `GpuAttention::rope_prefill_sparse` on (llama.cpp's CUDA
/// route): the RoPE-mode sparse prefill must run within the trained length
/// too, equal to the CPU policy's prefill there.
fn engine_case(gpu: &GpuContext, seed: u64, interleaved: bool, within: bool) -> R<Vec<Check>> {
    let shape = AttnShape::new(8, 2, 64).map_err(e)?;
    let max_position = if within { 8192 } else { 4096 };
    let model = model_of(&shape, max_position);
    let rope = Rope::new(64, model.rope_theta);
    let hip = cfg(
        RopeMode::ChunkIndexed,
        RopeMode::Streaming,
        [1024, 512, 256],
    );
    let lens = [7000usize, 3000];
    let n_new = [300usize, 200];
    let qe = shape.q_elems();
    let seqs: Vec<_> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| needle_seq::<bf16>(shape, l, 64, hip.sink, hip.window, 64, seed + i as u64))
        .collect::<Result<_, _>>()
        .map_err(e)?;
    let mut rng = Rng::new(seed ^ 0xe9);
    let mut q = Vec::new();
    for (s, &m) in seqs.iter().zip(&n_new) {
        for _ in 0..m {
            q.extend(s.query(&mut rng));
        }
    }
    // Token-major pool, request b at table row 1 - b.
    let lay = KvLayout {
        n_kv_heads: 2,
        head_dim: 64,
        page_size: 64,
    };
    let mut pool = KvPool::<bf16>::new(lay, None).map_err(e)?;
    let mut plens = Vec::new();
    for j in 0..2 {
        let src = &seqs[1 - j];
        let (k, v) = src.pool.read(0, 0, lens[1 - j]).map_err(e)?;
        let k = if interleaved {
            crate::gpu_rope_engine::halves_to_interleaved(&k, 64)
        } else {
            k
        };
        pool.add_sequence(j as u64).map_err(e)?;
        pool.append(j as u64, &k, &v).map_err(e)?;
        plens.push(lens[1 - j]);
    }
    let tp = TokenPool::from_pool(&pool, &plens, &mut rng)?;
    let pcfg = PolicyConfig {
        model,
        dense_layers: 0,
        default: LayerPolicy::Hip(hip.clone()),
        ..PolicyConfig::default()
    };
    let mut ga = GpuAttention::new(gpu, &pcfg).map_err(e)?;
    ga.rope_prefill_sparse = within;
    if interleaved {
        ga.set_rope_layout(infinitehip::rope::RopeLayout {
            interleaved: true,
            freq_base: model.rope_theta,
            freq_scale: 1.0,
        })
        .map_err(e)?;
    }
    let qd = DevBuf::from_slice(&if interleaved {
        crate::gpu_rope_engine::halves_to_interleaved(&q, 64)
    } else {
        q.clone()
    })
    .map_err(e)?;
    let out = DevBuf::alloc(q.len() * 4).map_err(e)?;
    out.fill_bytes(0xff).map_err(e)?;
    let raw = gpu.raw_stream();
    let call = |ga: &mut GpuAttention| {
        // SAFETY: q/out hold sum(n_new) rows; the pool holds both requests.
        unsafe {
            ga.prefill(
                raw,
                0,
                &tp.engine_kv(),
                &[11, 12],
                &[1, 0],
                &lens,
                &n_new,
                &QArg {
                    ptr: qd.ptr,
                    dtype: DType::F32,
                    row_stride: qe,
                },
                &AttnOut {
                    ptr: out.ptr,
                    dtype: DType::F32,
                    row_stride: qe,
                },
                None,
            )
        }
    };
    let run = call(&mut ga).map_err(|x| x.to_string());
    gpu.synchronize().map_err(e)?;
    let got: Vec<f32> = out.read(q.len()).map_err(e)?;
    // The engine's own block selections of its last chunk (request 1's).
    let ga_sel = ga.last_prefill_selection().map_err(e)?.unwrap_or_default();
    let mut ga_mism = usize::MAX;
    let finite = got.iter().all(|x| x.is_finite());
    // HipGpuPrefill per request, and the CPU.
    let (mut twin, mut vs_cpu, mut mism) = (0f64, 0f64, 0usize);
    let mut drop_err = f64::INFINITY;
    let mut r0 = 0;
    for (i, s) in seqs.iter().enumerate() {
        let m = n_new[i];
        let qs = &q[r0 * qe..(r0 + m) * qe];
        let mut kv = DeviceKv::upload(&[(&s.pool, 0)]).map_err(e)?;
        kv.lens = vec![lens[i]];
        let mut pf = HipGpuPrefill::new(hip.clone(), &shape, m).map_err(e)?;
        pf.set_rope_model(&model).map_err(e)?;
        let qdi = DevBuf::from_slice(qs).map_err(e)?;
        let oi = DevBuf::alloc(qs.len() * 4).map_err(e)?;
        oi.fill_bytes(0xff).map_err(e)?;
        let q_start = lens[i] - m;
        pf.prepare(gpu, &kv, q_start, m).map_err(e)?;
        pf.select(gpu, &kv, qdi.ptr).map_err(e)?;
        pf.attend(gpu, &shape, &kv, qdi.ptr, oi.ptr).map_err(e)?;
        gpu.synchronize().map_err(e)?;
        let direct: Vec<f32> = oi.read(qs.len()).map_err(e)?;
        let gsel = pf.sel.to_host(2).map_err(e)?;
        let dd: Vec<f64> = direct.iter().map(|&x| x as f64).collect();
        twin = nan_max(twin, rel_error(&got[r0 * qe..(r0 + m) * qe], &dd));
        let view = s.pool.view(0).map_err(e)?;
        let (csel, _) = cpu_prefill(&shape, &hip, &model, &view, qs, q_start)?;
        mism += csel.iter().zip(&gsel).filter(|(a, b)| a != b).count();
        if i == seqs.len() - 1 {
            ga_mism = csel.iter().zip(&ga_sel).filter(|(a, b)| a != b).count()
                + csel.len().abs_diff(ga_sel.len());
        }
        for j in (0..m).step_by(17).chain([m - 1]) {
            let pos = q_start + j;
            let rf = stream_ref_stored::<bf16>(
                &shape,
                &rope,
                &qs[j * qe..(j + 1) * qe],
                &view,
                &csel[j / hip.block_size_q],
                pos,
                None,
            );
            vs_cpu = nan_max(
                vs_cpu,
                rel_error(&got[(r0 + j) * qe..(r0 + j + 1) * qe], &rf),
            );
        }
        // One dropped visible token of the last query's block (the middle
        // one: every key after it moves one streaming position).
        let sel_last = &csel[(m - 1) / hip.block_size_q];
        let vis: Vec<usize> = sel_last.heads[0]
            .iter()
            .flat_map(|r| r.clone())
            .filter(|&t| t < lens[i])
            .collect();
        if let Some(&t) = vis.get(vis.len() / 2) {
            let dr = stream_ref_stored::<bf16>(
                &shape,
                &rope,
                &qs[(m - 1) * qe..m * qe],
                &view,
                sel_last,
                lens[i] - 1,
                Some(t),
            );
            drop_err = drop_err.min(rel_error(&got[(r0 + m - 1) * qe..(r0 + m) * qe], &dr));
        }
        r0 += m;
    }
    let layout = match (interleaved, within) {
        (true, true) => ", keys/queries interleaved (llama.cpp NORM layout) vs a halves twin, within max_position with rope_prefill_sparse (llama.cpp's CUDA route)",
        (true, false) => ", keys/queries interleaved (llama.cpp NORM layout) vs a halves twin",
        _ => "",
    };
    // Interleaved: the tensor-core attention accumulates q.k over permuted
    // dims, so the bf16 probabilities can round one ulp apart from the
    // halves twin's (equal otherwise); the selections are compared directly.
    let twin_bound = if interleaved { 1e-3 } else { 1e-6 };
    let mut checks = vec![Check {
        name: format!(
            "GpuAttention::prefill {} model.max_position (RoPE-mode hip sparse prefill, chunk_indexed + streaming), lens {lens:?} new {n_new:?}, max_position {max_position}, rows reversed, token-major pool{layout}",
            if within { "within" } else { "past" }
        ),
        ok: run.is_ok()
            && finite
            && twin <= twin_bound
            && mism == 0
            && ga_mism == 0
            && vs_cpu <= ROUNDING_KERNEL_BOUND
            && drop_err > ROUNDING_KERNEL_BOUND,
        detail: format!(
            "call {run:?}; vs HipGpuPrefill on the same K/V {twin:.2e} (bound {twin_bound:.0e}); HipGpuPrefill block selections vs CPU mismatches {mism}; GpuAttention's last chunk (request 1) vs CPU mismatches {ga_mism}; vs CPU stored-rotation f64 ref {vs_cpu:.2e} (bound 1e-2, tensor-core kernel where it applies); one dropped visible token {drop_err:.2e} (must exceed 1e-2); all written+finite {finite}"
        ),
    }];
    if interleaved {
        return Ok(checks);
    }
    ga.prefill_estimator = None;
    let off = call(&mut ga)
        .err()
        .map(|x| x.to_string())
        .unwrap_or_default();
    checks.push(Check {
        name: "GpuAttention::prefill past model.max_position with the sparse prefill off: refused"
            .into(),
        ok: off.contains("max_position") && off.contains("prefill_estimator"),
        detail: off,
    });
    Ok(checks)
}

/// One prefill chunk (`prepare` + `select` + `attend`, auto kernels) of
/// `n` queries at the end of a `len`-token context, original positions vs
/// each RoPE mode: Llama-3.1-8B heads, bf16, paper stages
/// (`HipConfig::default`), device-random K/V, `max_position` len / 2 (so
/// `relative` moves every block). Mean of 3 after one warm-up.
pub(crate) fn timing(gpu: &GpuContext, len: usize, n: usize) -> R<()> {
    use RopeMode::*;
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let kv = infinitehip::backend::cuda::dense_decode::random_device_kv(
        gpu,
        1,
        len,
        8,
        128,
        DType::Bf16,
        64,
        9,
    )
    .map_err(e)?;
    let model = ModelShape {
        n_layers: 1,
        n_q_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        rope_theta: 500000.0,
        max_position: len / 2,
    };
    let mut rng = Rng::new(21);
    let q: Vec<f32> = rng.normal_vec(n * shape.q_elems(), 1.0);
    let qd = DevBuf::from_slice(&q).map_err(e)?;
    let out = DevBuf::alloc(q.len() * 4).map_err(e)?;
    println!(
        "rope prefill timing: one chunk of {n} queries at {}..{len}, 32 q / 8 kv heads, d128, bf16, paper stages, max_position {}",
        len - n,
        len / 2
    );
    println!(
        "{:>34} {:>12} {:>10}",
        "modes (mask estimator)", "ms/chunk", "vs orig"
    );
    let mut base = 0f64;
    // The first row is the engine's default at original positions (the
    // tensor-core mask estimator), for scale; ratios are against the
    // second (the reference estimator, as rotated scoring runs).
    for (sc, at, est) in [
        (Original, Original, MaskEstimator::Auto),
        (Original, Original, MaskEstimator::Reference),
        (ChunkIndexed, Original, MaskEstimator::Reference),
        (Relative, Original, MaskEstimator::Reference),
        (Original, Streaming, MaskEstimator::Reference),
        (ChunkIndexed, Streaming, MaskEstimator::Reference),
        (Relative, Streaming, MaskEstimator::Reference),
    ] {
        let hip = HipConfig {
            rope: infinitehip::config::RopeConfig {
                scoring: sc,
                attention: at,
            },
            ..HipConfig::default()
        };
        let mut pf = HipGpuPrefill::new(hip, &shape, n).map_err(e)?;
        pf.set_rope_model(&model).map_err(e)?;
        pf.estimator = est;
        let mut t = 0f64;
        for i in 0..4 {
            gpu.synchronize().map_err(e)?;
            let t0 = std::time::Instant::now();
            pf.prepare(gpu, &kv, len - n, n).map_err(e)?;
            pf.select(gpu, &kv, qd.ptr).map_err(e)?;
            pf.attend(gpu, &shape, &kv, qd.ptr, out.ptr).map_err(e)?;
            gpu.synchronize().map_err(e)?;
            if i > 0 {
                t += t0.elapsed().as_secs_f64();
            }
        }
        let got: Vec<f32> = out.read(q.len()).map_err(e)?;
        if !got.iter().all(|x| x.is_finite()) {
            return Err(format!(
                "rope prefill timing {sc:?}/{at:?}: non-finite output"
            ));
        }
        let ms = t / 3.0 * 1e3;
        if sc == Original && at == Original && est == MaskEstimator::Reference {
            base = ms;
        }
        let label = format!("{sc:?}/{at:?} ({})", est.name());
        if base > 0.0 {
            println!("{label:>34} {ms:>12.2} {:>9.2}x", ms / base);
        } else {
            println!("{label:>34} {ms:>12.2} {:>10}", "-");
        }
    }
    Ok(())
}

/// A case's error (a launch or shape error) as a failed check, so the
/// checks after it still run and report.
fn or_fail(name: &str, r: R<Check>) -> Check {
    r.unwrap_or_else(|x| Check {
        name: name.into(),
        ok: false,
        detail: format!("error: {x}"),
    })
}

/// The prefill checks, each reported as it finishes (`c`).
pub(crate) fn checks(gpu: &GpuContext, seed: u64, c: &mut Progress) -> R<()> {
    use RopeMode::*;
    let llama = AttnShape::new(32, 8, 128).map_err(e)?;
    let small = AttnShape::new(8, 2, 64).map_err(e)?;
    let keep = [1024, 512, 256];
    // Without the model's RoPE the prefill refuses to prepare.
    {
        let ns = needle_seq::<bf16>(small, 2000, 64, 32, 256, 64, 5).map_err(e)?;
        let kv = DeviceKv::upload(&[(&ns.pool, 0)]).map_err(e)?;
        let mut pf =
            HipGpuPrefill::new(cfg(ChunkIndexed, Streaming, keep), &small, 128).map_err(e)?;
        let r = pf
            .prepare(gpu, &kv, 1872, 128)
            .err()
            .map(|x| x.to_string())
            .unwrap_or_default();
        c.push(Check {
            name: "HipGpuPrefill RoPE modes: without set_rope_model, prepare is refused".into(),
            ok: r.contains("set_rope_model"),
            detail: r,
        });
    }
    // Llama heads, chunk_indexed + streaming, both attention kernels.
    for kernel in [AttnKernel::CudaCore, AttnKernel::Auto] {
        c.push(or_fail(
            "HipGpuPrefill RoPE modes: llama chunk_indexed + streaming",
            prefill_case::<bf16>(
                gpu,
                llama,
                cfg(ChunkIndexed, Streaming, keep),
                8192,
                20000,
                512,
                kernel,
                false,
                seed + 11,
            ),
        ));
    }
    // relative + streaming, f16, a chunk straddling max_position (blocks
    // below it score as stored) with a short last block.
    c.push(or_fail(
        "HipGpuPrefill RoPE modes: relative + streaming f16",
        prefill_case::<f16>(
            gpu,
            small,
            cfg(Relative, Streaming, keep),
            11900,
            12000,
            300,
            AttnKernel::CudaCore,
            false,
            seed + 12,
        ),
    ));
    // Scoring only (attention at original positions).
    c.push(or_fail(
        "HipGpuPrefill RoPE modes: relative scoring only",
        prefill_case::<bf16>(
            gpu,
            small,
            cfg(Relative, Original, keep),
            4096,
            9000,
            256,
            AttnKernel::CudaCore,
            false,
            seed + 13,
        ),
    ));
    c.push(or_fail(
        "HipGpuPrefill RoPE modes: chunk_indexed scoring only",
        prefill_case::<bf16>(
            gpu,
            small,
            cfg(ChunkIndexed, Original, keep),
            4096,
            6000,
            200,
            AttnKernel::CudaCore,
            false,
            seed + 14,
        ),
    ));
    // Streaming attention with original scoring.
    c.push(or_fail(
        "HipGpuPrefill RoPE modes: original scoring + streaming",
        prefill_case::<bf16>(
            gpu,
            llama,
            cfg(Original, Streaming, keep),
            8192,
            10000,
            256,
            AttnKernel::CudaCore,
            false,
            seed + 15,
        ),
    ));
    // Covering budget: every token selected, equals dense streaming.
    c.push(or_fail(
        "HipGpuPrefill RoPE modes: covering budget",
        prefill_case::<bf16>(
            gpu,
            llama,
            cfg(ChunkIndexed, Streaming, [8192, 8192, 8192]),
            1024,
            3000,
            512,
            AttnKernel::CudaCore,
            true,
            seed + 16,
        ),
    ));
    for (interleaved, within, s) in [(false, false, 17), (true, false, 18), (true, true, 19)] {
        match engine_case(gpu, seed + s, interleaved, within) {
            Ok(cs) => c.extend(cs),
            Err(x) => c.push(or_fail(
                &format!(
                    "GpuAttention::prefill past model.max_position (interleaved {interleaved})"
                ),
                Err(x),
            )),
        }
    }
    Ok(())
}
