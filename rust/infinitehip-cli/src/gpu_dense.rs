//! Dense decode kernel (kernels/decode_dense.cu): correctness checks for
//! `gpu-test` and the `bench-gpu-dense` sweep (bandwidth vs the measured
//! copy bandwidth, the CUDA-core kernel beside it).

use half::{bf16, f16};
use infinitehip::attention::{rel_error, AttnShape};
use infinitehip::backend::cuda::dense_decode::{
    self, dense_decode, random_device_kv, DenseDecodeWs,
};
use infinitehip::backend::cuda::dispatch::{self, DecodeWorkspace, DeviceKv, DeviceSelection};
use infinitehip::backend::cuda::{self as cu, kernels, DevBuf, GpuContext};
use infinitehip::kv::{KvLayout, KvPool};
use infinitehip::policy::Selection;
use infinitehip::rng::Rng;
use infinitehip::{DType, Element};
use serde_json::json;

use crate::gpu::{e, random_pool, ref_f64, time_ms, Check, R};

/// Bound on the relative error vs the f64 reference over the same stored
/// K/V: q and p enter the MMAs as hi + lo halves (~16 significant bits for
/// bf16), K/V exactly, f32 accumulation. Provisional (no H200 run yet);
/// one dropped token moves the output by 1e-3 or more at these lengths.
pub(crate) const DENSE_BOUND: f64 = 2e-5;

/// Kernel vs f64 on fresh random inputs; the same output must also be
/// further than the bound from the reference missing one token of one head
/// (so the bound would catch a dropped token).
#[allow(clippy::too_many_arguments)]
fn dense_case<T: Element>(
    gpu: &GpuContext,
    shape: AttnShape,
    ps: usize,
    lens: &[usize],
    split: Option<usize>,
    chunks: usize,
    seed: u64,
) -> R<Check> {
    let mut rng = Rng::new(seed);
    let lay = KvLayout {
        n_kv_heads: shape.n_kv_heads,
        head_dim: shape.head_dim,
        page_size: ps,
    };
    let pool = random_pool::<T>(lay, lens, &mut rng)?;
    let seqs: Vec<(&KvPool<T>, u64)> = (0..lens.len()).map(|i| (&pool, i as u64)).collect();
    let kv = DeviceKv::upload(&seqs).map_err(e)?;
    let lens32: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
    let lens_dev = DevBuf::from_slice(&lens32).map_err(e)?;
    let q = rng.normal_vec(lens.len() * shape.q_elems(), 1.0);
    let qd = DevBuf::from_slice(&q).map_err(e)?;
    let out = DevBuf::alloc(q.len() * 4).map_err(e)?;
    let mut ws = DenseDecodeWs::new();
    let mut run = || -> R<Vec<f32>> {
        out.fill_bytes(0xff).map_err(e)?; // NaN poison
        dense_decode(
            gpu,
            &mut ws,
            &shape,
            &kv,
            qd.ptr,
            &lens_dev,
            split,
            Some(chunks),
            out.ptr,
        )
        .map_err(e)?;
        gpu.synchronize().map_err(e)?;
        out.read(q.len()).map_err(e)
    };
    let got = run()?;
    // A second launch must give the same bits (arrival counters reset).
    let again = run()?;
    let same = got
        .iter()
        .zip(&again)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    let qe = shape.q_elems();
    let mut worst = 0f64;
    for b in 0..lens.len() {
        let view = pool.view(b as u64).map_err(e)?;
        let r = ref_f64(&shape, &q[b * qe..(b + 1) * qe], &view, None);
        let err = rel_error(&got[b * qe..(b + 1) * qe], &r);
        worst = if err.is_nan() || worst.is_nan() {
            f64::NAN
        } else {
            worst.max(err)
        };
    }
    // Sensitivity: drop one random token of kv head 0 of the longest row.
    let bl = (0..lens.len()).max_by_key(|&b| lens[b]).unwrap();
    let len = lens[bl];
    let drop_err = if len > 1 {
        let t = rng.below(len);
        let mut heads = vec![vec![0..len]; shape.n_kv_heads];
        heads[0] = vec![0..t, t + 1..len]
            .into_iter()
            .filter(|r| !r.is_empty())
            .collect();
        let sel = Selection::from_ranges(heads);
        let view = pool.view(bl as u64).map_err(e)?;
        let r = ref_f64(&shape, &q[bl * qe..(bl + 1) * qe], &view, Some(&sel));
        rel_error(&got[bl * qe..(bl + 1) * qe], &r)
    } else {
        f64::INFINITY
    };
    let finite = got.iter().all(|x| x.is_finite());
    let ok = finite && same && worst <= DENSE_BOUND && drop_err > DENSE_BOUND;
    Ok(Check {
        name: format!(
            "dense decode (tensor core) {} d{} g{} ps{} u{} split {:?} lens {:?}",
            T::DTYPE,
            shape.head_dim,
            shape.group(),
            ps,
            chunks,
            split,
            lens
        ),
        ok,
        detail: format!(
            "rel_err {worst:.2e} (bound {DENSE_BOUND:.0e}); one dropped token {drop_err:.2e} (must exceed the bound); all written+finite {finite}; relaunch bit-equal {same}"
        ),
    })
}

/// The checks `gpu-test` runs.
pub(crate) fn checks(gpu: &GpuContext, seed: u64) -> R<Vec<Check>> {
    let mut v = Vec::new();
    let mut s = seed ^ 0xde5e;
    let shapes = [
        (32, 8, 128, 64),
        (8, 8, 64, 16),
        (16, 2, 256, 1),
        (16, 8, 128, 16),
        (64, 8, 128, 1),
        (16, 4, 64, 64),
    ];
    for &(hq, hkv, d, ps) in &shapes {
        let shape = AttnShape::new(hq, hkv, d).map_err(e)?;
        for &u in kernels::dense_chunks(d) {
            s += 1;
            let lens = [1usize, 77, 1000, 5003];
            v.push(dense_case::<bf16>(gpu, shape, ps, &lens, None, u, s)?);
            v.push(dense_case::<f16>(
                gpu,
                shape,
                ps,
                &lens,
                Some(64),
                u,
                s + 50,
            )?);
        }
    }
    // Long rows: default splits (tens of CTAs per (row, kv head) merged by
    // the last to arrive), and a batch of 16 over a token-major pool.
    let llama = AttnShape::new(32, 8, 128).map_err(e)?;
    v.push(dense_case::<bf16>(
        gpu,
        llama,
        64,
        &[300_000],
        None,
        1,
        s + 100,
    )?);
    v.push(dense_case::<f16>(
        gpu,
        llama,
        16,
        &[200_003, 9],
        None,
        2,
        s + 101,
    )?);
    v.push(dense_case::<bf16>(
        gpu,
        llama,
        1,
        &[20_000; 16],
        None,
        1,
        s + 102,
    )?);
    Ok(v)
}

/// `bench-gpu-dense`: dense decode of one layer, ours (tensor core, each
/// chunk setting) and the CUDA-core block-sparse kernel over a full
/// selection, vs the bytes-read floor at the measured copy bandwidth.
pub fn bench(a: &crate::gpu_args::BenchGpuDenseArgs) -> R<()> {
    let (tokens, batches, groups, reps) =
        (a.tokens.clone(), a.batch.clone(), a.groups.clone(), a.reps);
    let dtypes: Vec<DType> = a
        .dtypes
        .split(',')
        .map(|x| match x {
            "bf16" => Ok(DType::Bf16),
            "f16" => Ok(DType::F16),
            o => Err(format!("--dtypes: `{o}` (bf16, f16)")),
        })
        .collect::<R<_>>()?;
    let gpu = GpuContext::new(0).map_err(e)?;
    let bw = copy_bandwidth(&gpu)?;
    println!(
        "device {} ({} SMs), measured copy bandwidth {:.0} GB/s",
        gpu.name,
        gpu.sm_count,
        bw / 1e9
    );
    let mut rows = Vec::new();
    let hkv = 8;
    for &t in &tokens {
        for &b in &batches {
            for &dt in &dtypes {
                let kv_bytes = (t * hkv * 128 * 2 * 2 * b) as f64;
                let (free, _) = gpu.mem_info().map_err(e)?;
                if kv_bytes > free as f64 * 0.9 {
                    println!("skip T={t} B={b}: K/V does not fit");
                    continue;
                }
                let kv =
                    random_device_kv(&gpu, b, t, hkv, 128, dt, 64, (t + b) as u32).map_err(e)?;
                let lens_dev = DevBuf::from_slice(&vec![t as i32; b]).map_err(e)?;
                for &g in &groups {
                    let shape = AttnShape::new(hkv * g, hkv, 128).map_err(e)?;
                    let mut rng = Rng::new(t as u64 ^ g as u64);
                    let q = rng.normal_vec(b * shape.q_elems(), 1.0);
                    let qd = DevBuf::from_slice(&q).map_err(e)?;
                    let out = DevBuf::alloc(q.len() * 4).map_err(e)?;
                    let mut ws = DenseDecodeWs::new();
                    let mut ms_u = Vec::new();
                    for var in &a.variants {
                        dense_decode::force_v2(var == "v2");
                        for &w in &a.waves {
                            dense_decode::set_default_waves(w);
                            for &u in kernels::dense_chunks(128) {
                                let ms = time_ms(&gpu, reps, || {
                                    dense_decode::dense_decode(
                                        &gpu,
                                        &mut ws,
                                        &shape,
                                        &kv,
                                        qd.ptr,
                                        &lens_dev,
                                        None,
                                        Some(u),
                                        out.ptr,
                                    )
                                    .map_err(e)
                                })?;
                                ms_u.push((format!("{var} w{w} u{u}"), ms));
                            }
                        }
                    }
                    dense_decode::force_v2(true);
                    dense_decode::set_default_waves(1);
                    // The CUDA-core kernel (the old dense path) at GQA 4 only.
                    let cc_ms = if g == 4 {
                        let full = DeviceSelection::for_kv(&kv, &vec![Selection::full(hkv, t); b])
                            .map_err(e)?;
                        let mut ws2 = DecodeWorkspace::new();
                        Some(time_ms(&gpu, reps, || {
                            dispatch::decode(
                                &gpu, &mut ws2, &shape, &kv, qd.ptr, &full, t, None, out.ptr,
                            )
                            .map_err(e)
                        })?)
                    } else {
                        None
                    };
                    let best = ms_u.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
                    let floor = kv_bytes / bw * 1e3;
                    let row = json!({
                        "tokens": t, "batch": b, "dtype": dt.to_string(), "group": g,
                        "ms_by_setting": ms_u.iter().map(|(u, ms)| json!({"setting": u, "ms": ms})).collect::<Vec<_>>(),
                        "best_setting": ms_u.iter().min_by(|x, y| x.1.partial_cmp(&y.1).unwrap()).map(|x| x.0.clone()),
                        "best_ms": best, "floor_ms": floor,
                        "bandwidth_fraction": floor / best,
                        "cuda_core_ms": cc_ms,
                    });
                    eprintln!("{row}");
                    rows.push(row);
                }
            }
        }
    }
    let names: Vec<String> = rows.first().map_or(Vec::new(), |r| {
        r["ms_by_setting"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["setting"].as_str().unwrap().to_string())
            .collect()
    });
    println!("\n| tokens | batch | K/V | GQA group | ours ms ({}) | best | floor ms | of copy bandwidth | CUDA-core kernel ms |", names.join(" / "));
    println!("|---:|---:|---|---:|---|---|---:|---:|---:|");
    for r in &rows {
        let ms: Vec<String> = r["ms_by_setting"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| format!("{:.3}", x["ms"].as_f64().unwrap()))
            .collect();
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.3} | {:.1}% | {} |",
            r["tokens"],
            r["batch"],
            r["dtype"].as_str().unwrap(),
            r["group"],
            ms.join(" / "),
            r["best_setting"].as_str().unwrap_or("-"),
            r["floor_ms"].as_f64().unwrap(),
            100.0 * r["bandwidth_fraction"].as_f64().unwrap(),
            r["cuda_core_ms"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.3}"))
        );
    }
    if let Some(p) = a.json.as_deref() {
        let doc = json!({"device": gpu.name, "copy_bandwidth_gbs": bw / 1e9, "rows": rows});
        std::fs::write(p, serde_json::to_string_pretty(&doc).unwrap()).map_err(e)?;
    }
    Ok(())
}

/// HBM bandwidth: a 4 GiB device-to-device copy, bytes read + written.
pub(crate) fn copy_bandwidth(gpu: &GpuContext) -> R<f64> {
    let n = 4usize << 30;
    let (src, dst) = (DevBuf::alloc(n).map_err(e)?, DevBuf::alloc(n).map_err(e)?);
    src.fill_bytes(0x3c).map_err(e)?;
    // SAFETY: `src` and `dst` are both `n`-byte allocations of this context.
    let ms = time_ms(gpu, 5, || unsafe {
        cu::cudarc::driver::result::memcpy_dtod_async(dst.ptr, src.ptr, n, gpu.stream.cu_stream())
            .map_err(e)
    })?;
    Ok(2.0 * n as f64 / (ms * 1e-3))
}
