//! The hip sparse attention kernel (kernels/decode_dense_v2.cu
//! `hip_sparse_*`, `HipGpuDecoder`'s default attention): `gpu-test` checks
//! on random per-head selections (a sink + chunk position table per kv
//! head, the slid + window tail per sequence) vs the f64 reference, over
//! the core pool's pages and over a shuffled token-major pool (page size
//! 1, padded slot stride, as the engines hand it), each chunk setting; and
//! the dense v2 kernel over that token-major pool at each chunk setting
//! (the engine check that failed with 2 chunks, merged-2026-12-04c).

use half::{bf16, f16};
use infinitehip::attention::{rel_error, AttnShape};
use infinitehip::backend::cuda::dense_decode::{dense_decode, sparse_decode, DenseDecodeWs};
use infinitehip::backend::cuda::dispatch::DeviceKv;
use infinitehip::backend::cuda::{kernels, DevBuf, GpuContext};
use infinitehip::kv::{KvLayout, KvPool};
use infinitehip::policy::Selection;
use infinitehip::rng::Rng;
use infinitehip::Element;

use crate::gpu::{e, random_pool, ref_f64, Check, R};
use crate::gpu_dense::DENSE_BOUND;
use crate::gpu_engine::TokenPool;

/// The checks `gpu-test` (and `--step-only`) runs.
pub(crate) fn checks(gpu: &GpuContext, seed: u64) -> R<Vec<Check>> {
    let mut v = Vec::new();
    let mut s = seed + 500;
    for &(hq, hkv, d) in &[(32usize, 8usize, 128usize), (16, 2, 256), (8, 8, 64)] {
        let shape = AttnShape::new(hq, hkv, d).map_err(e)?;
        for &token_major in &[false, true] {
            for &u in kernels::dense_chunks(d) {
                s += 1;
                let lens = [9000usize, 3001, 20000, 77, 1];
                v.push(sparse_case::<bf16>(
                    gpu,
                    shape,
                    &lens,
                    token_major,
                    None,
                    u,
                    s,
                )?);
            }
        }
    }
    // f16 K/V; many small splits (the last CTA merges dozens).
    let llama = AttnShape::new(32, 8, 128).map_err(e)?;
    v.push(sparse_case::<f16>(
        gpu,
        llama,
        &[6000, 700],
        false,
        Some(64),
        2,
        s + 1,
    )?);
    for u in [1, 2] {
        v.push(dense_token_major_case(gpu, u, s + 10 + u as u64)?);
    }
    Ok(v)
}

/// Random selection of sequence `len` (one `Selection` over `hkv` heads):
/// sink `[0, min(64, len))`, per head a different random subset of the
/// 8-token chunks of the middle, and the tail `[tail0, len)` (window of
/// 512 plus, when `slid`, up to 300 slid tokens). Returns the selection,
/// each head's table (sink + chunk positions) and the (sink, slid, window)
/// triple the kernel reads (`inverted`: an empty slid written as x > y).
fn random_selection(
    rng: &mut Rng,
    len: usize,
    hkv: usize,
    slid: bool,
    inverted: bool,
) -> (Selection, Vec<Vec<i32>>, [[i32; 2]; 3]) {
    let sink_end = len.min(64);
    let ws = len.saturating_sub(512).max(sink_end);
    let tail0 = if slid {
        ws.saturating_sub(rng.below(300)).max(sink_end)
    } else {
        ws
    };
    let n_chunks = (tail0 - sink_end).div_ceil(8);
    let mut heads = Vec::new();
    let mut tabs = Vec::new();
    for h in 0..hkv {
        let want = n_chunks.min(50 + 37 * h);
        let mut idx: Vec<usize> = (0..n_chunks).collect();
        for i in 0..want {
            let j = i + rng.below(n_chunks - i);
            idx.swap(i, j);
        }
        idx.truncate(want);
        idx.sort();
        let mut rs = vec![0..sink_end];
        let mut tab: Vec<i32> = (0..sink_end as i32).collect();
        for &c in &idx {
            let r = sink_end + 8 * c..(sink_end + 8 * c + 8).min(tail0);
            tab.extend(r.clone().map(|p| p as i32));
            rs.push(r);
        }
        rs.push(tail0..len);
        heads.push(rs.into_iter().filter(|r| !r.is_empty()).collect());
        tabs.push(tab);
    }
    let slid_r = if inverted {
        [ws as i32 + 5, ws as i32]
    } else {
        [tail0 as i32, ws as i32]
    };
    let extra = [[0, sink_end as i32], slid_r, [ws as i32, len as i32]];
    (Selection::from_ranges(heads), tabs, extra)
}

/// The sparse kernel vs f64 on fresh random inputs; relaunch bit-equal;
/// the output must be further than the bound from the reference missing
/// head 0's highest-scoring selected token (q head 0) of sequence 0.
#[allow(clippy::too_many_arguments)]
fn sparse_case<T: Element + 'static>(
    gpu: &GpuContext,
    shape: AttnShape,
    lens: &[usize],
    token_major: bool,
    split: Option<usize>,
    chunks: usize,
    seed: u64,
) -> R<Check> {
    let mut rng = Rng::new(seed);
    let hkv = shape.n_kv_heads;
    let lay = KvLayout {
        n_kv_heads: hkv,
        head_dim: shape.head_dim,
        page_size: 64,
    };
    let pool = random_pool::<T>(lay, lens, &mut rng)?;
    let tp = if token_major {
        // TokenPool holds bf16: token-major cases run on bf16 pools only.
        let pb: &KvPool<bf16> = (&pool as &dyn std::any::Any)
            .downcast_ref()
            .ok_or("token-major sparse case: bf16 pools only")?;
        Some(TokenPool::from_pool(pb, lens, &mut rng)?)
    } else {
        None
    };
    let kv = match &tp {
        Some(t) => t.device_kv(hkv, lens.to_vec())?,
        None => {
            let seqs: Vec<(&KvPool<T>, u64)> = (0..lens.len()).map(|i| (&pool, i as u64)).collect();
            DeviceKv::upload(&seqs).map_err(e)?
        }
    };
    let mut sels = Vec::new();
    let tab_stride = lens.iter().max().unwrap() + 1;
    let mut tab = vec![-1i32; lens.len() * hkv * tab_stride];
    let mut ntab = vec![0i32; lens.len() * hkv];
    let mut extra = Vec::new();
    let mut max_tokens = 1;
    for (b, &l) in lens.iter().enumerate() {
        let (sel, tabs, ex) = random_selection(&mut rng, l, hkv, b % 2 == 0, b == 1);
        for (h, t) in tabs.iter().enumerate() {
            let r = b * hkv + h;
            tab[r * tab_stride..r * tab_stride + t.len()].copy_from_slice(t);
            ntab[r] = t.len() as i32;
            max_tokens = max_tokens.max(sel.token_count(h));
        }
        extra.extend(ex);
        sels.push(sel);
    }
    let (tab_d, ntab_d, extra_d) = (
        DevBuf::from_slice(&tab).map_err(e)?,
        DevBuf::from_slice(&ntab).map_err(e)?,
        DevBuf::from_slice(&extra).map_err(e)?,
    );
    let qe = shape.q_elems();
    let q = rng.normal_vec(lens.len() * qe, 1.0);
    let qd = DevBuf::from_slice(&q).map_err(e)?;
    let out = DevBuf::alloc(q.len() * 4).map_err(e)?;
    let mut ws = DenseDecodeWs::new();
    // `early`: the first chunk loaded before the PDL wait (the inputs were
    // all copied in before: no kernel in flight writes them).
    let mut run = |early: bool| -> R<Vec<f32>> {
        out.fill_bytes(0xff).map_err(e)?; // NaN poison
        sparse_decode(
            gpu,
            &mut ws,
            &shape,
            &kv,
            qd.ptr,
            &tab_d,
            tab_stride,
            &ntab_d,
            &extra_d,
            max_tokens,
            split,
            Some(chunks),
            early,
            out.ptr,
        )
        .map_err(e)?;
        gpu.synchronize().map_err(e)?;
        out.read(q.len()).map_err(e)
    };
    let got = run(false)?;
    let again = run(false)?;
    let early = run(true)?;
    let bits = |x: &[f32]| got.iter().zip(x).all(|(a, b)| a.to_bits() == b.to_bits());
    let same = bits(&again);
    let early_same = bits(&early);
    let finite = got.iter().all(|x| x.is_finite());
    let mut worst = 0f64;
    let mut drop_err = f64::INFINITY;
    for (b, sel) in sels.iter().enumerate() {
        let view = pool.view(b as u64).map_err(e)?;
        let qb = &q[b * qe..(b + 1) * qe];
        let r = ref_f64(&shape, qb, &view, Some(sel));
        let err = rel_error(&got[b * qe..(b + 1) * qe], &r);
        worst = if err.is_nan() {
            f64::NAN
        } else {
            worst.max(err)
        };
        if b == 0 {
            let d = shape.head_dim;
            let mut top = (f32::NEG_INFINITY, 0usize);
            for rr in &sel.heads[0] {
                for t in rr.clone() {
                    let (k, _) = pool.read(0, t, t + 1).map_err(e)?;
                    let sc: f32 = (0..d).map(|i| qb[i] * k[i].to_f32()).sum();
                    if sc > top.0 {
                        top = (sc, t);
                    }
                }
            }
            let t = top.1;
            let mut heads = sel.heads.clone();
            heads[0] = sel.heads[0]
                .iter()
                .flat_map(|r| {
                    if r.contains(&t) {
                        vec![r.start..t, t + 1..r.end]
                    } else {
                        vec![r.clone()]
                    }
                })
                .filter(|r| !r.is_empty())
                .collect();
            let rd = ref_f64(&shape, qb, &view, Some(&Selection::from_ranges(heads)));
            drop_err = rel_error(&got[..qe], &rd);
        }
    }
    let ok = worst <= DENSE_BOUND && finite && same && early_same && drop_err > DENSE_BOUND;
    Ok(Check {
        name: format!(
            "hip sparse v2 {} d{} g{} {}, {} chunk(s), split {split:?}, lens {lens:?} vs f64",
            std::any::type_name::<T>().rsplit("::").next().unwrap_or("?"),
            shape.head_dim,
            shape.group(),
            if token_major {
                "token-major shuffled pool"
            } else {
                "page-64 pool"
            },
            chunks
        ),
        ok,
        detail: format!(
            "rel_err {worst:.2e} (bound {DENSE_BOUND:.0e}); one dropped token {drop_err:.2e} (must exceed); relaunch bit-equal {same}; early loads bit-equal {early_same}; all written+finite {finite}"
        ),
    })
}

/// Dense v2 over a shuffled token-major pool (page size 1, padded slot
/// stride), `chunks` per iteration, a batch of mixed lengths, vs f64.
fn dense_token_major_case(gpu: &GpuContext, chunks: usize, seed: u64) -> R<Check> {
    let mut rng = Rng::new(seed);
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let lens = [9000usize, 3001, 20000];
    let lay = KvLayout {
        n_kv_heads: 8,
        head_dim: 128,
        page_size: 64,
    };
    let pool = random_pool::<bf16>(lay, &lens, &mut rng)?;
    let tp = TokenPool::from_pool(&pool, &lens, &mut rng)?;
    let kv = tp.device_kv(8, lens.to_vec())?;
    let l32: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
    let lens_d = DevBuf::from_slice(&l32).map_err(e)?;
    let qe = shape.q_elems();
    let q = rng.normal_vec(lens.len() * qe, 1.0);
    let qd = DevBuf::from_slice(&q).map_err(e)?;
    let out = DevBuf::alloc(q.len() * 4).map_err(e)?;
    out.fill_bytes(0xff).map_err(e)?;
    let mut ws = DenseDecodeWs::new();
    dense_decode(
        gpu,
        &mut ws,
        &shape,
        &kv,
        qd.ptr,
        &lens_d,
        None,
        Some(chunks),
        out.ptr,
    )
    .map_err(e)?;
    gpu.synchronize().map_err(e)?;
    let got: Vec<f32> = out.read(q.len()).map_err(e)?;
    let mut worst = 0f64;
    for (b, &l) in lens.iter().enumerate() {
        let view = pool.view(b as u64).map_err(e)?;
        let r = ref_f64(
            &shape,
            &q[b * qe..(b + 1) * qe],
            &view,
            Some(&Selection::full(8, l)),
        );
        let err = rel_error(&got[b * qe..(b + 1) * qe], &r);
        worst = if err.is_nan() {
            f64::NAN
        } else {
            worst.max(err)
        };
    }
    Ok(Check {
        name: format!(
            "dense v2 {chunks} chunk(s) over a shuffled token-major pool, lens {lens:?} vs f64"
        ),
        ok: worst <= DENSE_BOUND,
        detail: format!("rel_err {worst:.2e} (bound {DENSE_BOUND:.0e})"),
    })
}

/// `bench-gpu-sparse`: the sparse launch alone on a hip-sized selection,
/// warm (data in L2 after the first launch at batch 1) and cold (a 256 MiB
/// memset before each launch evicts the L2), per split size x chunks per
/// iteration x split merge (default / previous), and one launch with no
/// tokens selected (the launch's fixed cost at the same shape).
pub fn bench(a: &crate::gpu_args::BenchGpuSparseArgs) -> R<()> {
    use infinitehip::backend::cuda::dense_decode::{random_device_kv, set_legacy_merge};
    use infinitehip::DType;
    use serde_json::json;
    let gpu = GpuContext::new(0).map_err(e)?;
    println!("device {} ({} SMs)", gpu.name, gpu.sm_count);
    if a.probe {
        return crate::gpu_sparse_probe::probe(&gpu, a);
    }
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let (hkv, qe, t) = (8usize, shape.q_elems(), a.tokens);
    let (sink, chunk, n_chunks, slid, window) = (128usize, 8usize, 256usize, 64usize, 1024usize);
    if t < sink + window + slid + chunk * n_chunks * 2 {
        return Err(format!("--tokens {t}: too short for the selection"));
    }
    let sel_tokens = sink + chunk * n_chunks + slid + window;
    let flush = DevBuf::alloc(256 << 20).map_err(e)?;
    let ev = || {
        gpu.ctx
            .new_event(Some(
                infinitehip::backend::cuda::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT,
            ))
            .map_err(e)
    };
    let mut rows = Vec::new();
    println!("\nsparse launch, {sel_tokens} tokens per (row, kv head) from {t}, Llama-3.1-8B heads (32 q / 8 kv, d128, bf16), us (median of {} launches)\n", a.reps);
    println!("| batch | split tokens | chunks | merge | CTAs | warm us | cold us | max rel diff vs first row |");
    println!("|---:|---:|---:|---|---:|---:|---:|---:|");
    for &b in &a.batch {
        let kv =
            random_device_kv(&gpu, b, t, hkv, 128, DType::Bf16, 64, 17 + b as u32).map_err(e)?;
        let mut rng = Rng::new(99 + b as u64);
        let ntab_n = sink + chunk * n_chunks;
        let mut tab = Vec::with_capacity(b * hkv * ntab_n);
        let tail0 = t - window - slid;
        let span = (tail0 - sink) / chunk;
        for _ in 0..b * hkv {
            let mut cs: Vec<usize> = Vec::new();
            while cs.len() < n_chunks {
                let c = rng.below(span);
                if !cs.contains(&c) {
                    cs.push(c);
                }
            }
            cs.sort();
            tab.extend((0..sink as i32).collect::<Vec<_>>());
            for c in cs {
                tab.extend((0..chunk).map(|i| (sink + c * chunk + i) as i32));
            }
        }
        let mut extra = Vec::new();
        for _ in 0..b {
            extra.extend([
                [0i32, sink as i32],
                [tail0 as i32, (t - window) as i32],
                [(t - window) as i32, t as i32],
            ]);
        }
        let tab_d = DevBuf::from_slice(&tab).map_err(e)?;
        let ntab_d = DevBuf::from_slice(&vec![ntab_n as i32; b * hkv]).map_err(e)?;
        let extra_d = DevBuf::from_slice(&extra).map_err(e)?;
        // No tokens: empty table, empty slid and window.
        let zero_ntab = DevBuf::from_slice(&vec![0i32; b * hkv]).map_err(e)?;
        let zero_extra = DevBuf::from_slice(&vec![[0i32, 0]; 3 * b]).map_err(e)?;
        let qd = DevBuf::from_slice(&rng.normal_vec(b * qe, 1.0)).map_err(e)?;
        let out = DevBuf::alloc(b * qe * 4).map_err(e)?;
        let mut ws = DenseDecodeWs::new();
        let mut first: Option<Vec<f32>> = None;
        let mut configs: Vec<(usize, usize, bool, bool)> = Vec::new();
        for &u in &a.chunks {
            for &sp in &a.splits {
                for legacy in [false, true] {
                    configs.push((sp, u, legacy, false));
                }
            }
        }
        configs.push((0, 2, false, true));
        configs.push((0, 2, true, true));
        for (sp, u, legacy, empty) in configs {
            set_legacy_merge(legacy);
            let split = if sp == 0 { None } else { Some(sp) };
            let (nt, ex) = if empty {
                (&zero_ntab, &zero_extra)
            } else {
                (&ntab_d, &extra_d)
            };
            let mut launch = || -> R<()> {
                sparse_decode(
                    &gpu,
                    &mut ws,
                    &shape,
                    &kv,
                    qd.ptr,
                    &tab_d,
                    ntab_n,
                    nt,
                    ex,
                    sel_tokens,
                    split,
                    Some(u),
                    false,
                    out.ptr,
                )
                .map_err(e)
            };
            out.fill_bytes(0xff).map_err(e)?;
            launch()?;
            gpu.synchronize().map_err(e)?;
            let got: Vec<f32> = out.read(b * qe).map_err(e)?;
            let finite = got.iter().all(|x| x.is_finite());
            let diff = if empty {
                f64::NAN
            } else {
                match &first {
                    None => {
                        first = Some(got.clone());
                        0.0
                    }
                    Some(f) => {
                        let f64v: Vec<f64> = f.iter().map(|&x| x as f64).collect();
                        rel_error(&got, &f64v)
                    }
                }
            };
            let warm = crate::gpu::time_ms(&gpu, a.reps, &mut launch)? * 1e3;
            let mut cold = Vec::new();
            for _ in 0..a.reps {
                flush
                    .fill_bytes_async(rng.below(255) as u8, &gpu.stream)
                    .map_err(e)?;
                let (x, y) = (ev()?, ev()?);
                x.record(&gpu.stream).map_err(e)?;
                launch()?;
                y.record(&gpu.stream).map_err(e)?;
                y.synchronize().map_err(e)?;
                cold.push(x.elapsed_ms(&y).map_err(e)? as f64 * 1e3);
            }
            let cold = crate::gpu::median(&mut cold);
            let uu = u;
            let split_eff = match split {
                Some(s) => s.next_multiple_of(64 * uu),
                None => 0,
            };
            let n_ctas = if split_eff == 0 {
                "-".to_string()
            } else {
                (sel_tokens.div_ceil(split_eff) * hkv * b).to_string()
            };
            println!(
                "| {b} | {} | {u} | {} | {n_ctas} | {warm:.1} | {cold:.1} | {} |",
                if empty {
                    "default, no tokens".to_string()
                } else if split_eff == 0 {
                    "default".to_string()
                } else {
                    split_eff.to_string()
                },
                if legacy { "previous" } else { "new" },
                if empty {
                    format!("finite {finite}")
                } else {
                    format!("{diff:.1e}{}", if finite { "" } else { " NOT FINITE" })
                }
            );
            rows.push(
                json!({"batch": b, "split": split_eff, "chunks": u, "legacy_merge": legacy,
                "empty": empty, "warm_us": warm, "cold_us": cold, "rel_diff_vs_first": diff,
                "finite": finite, "sel_tokens": sel_tokens, "tokens": t}),
            );
        }
        set_legacy_merge(false);
    }
    if let Some(p) = a.json.as_deref() {
        let doc = json!({"device": gpu.name, "rows": rows});
        std::fs::write(p, serde_json::to_string_pretty(&doc).unwrap()).map_err(e)?;
    }
    Ok(())
}
