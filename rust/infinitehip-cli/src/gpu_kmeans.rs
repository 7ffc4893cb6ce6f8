//! `gpu-test` checks of the squeeze k-means on the GPU
//! (`policies::squeeze_kmeans`) against the CPU reference
//! (`kmeans::kmeans`) on fixed seeds, and the first-decode latency of a
//! squeeze layer with the k-means on the GPU vs on the host
//! (`--squeeze-first-decode`).
//!
//! Tolerance: the kernels repeat the CPU's arithmetic operation for
//! operation, so labels, sizes, iteration counts and centroids must be
//! identical (bit for bit); the check reports every difference and fails
//! on any. The engine checks (`gpu_engine_policies`, squeeze) then compare
//! whole selections with the CPU policy, now with the GPU k-means inside.

use std::time::Instant;

use infinitehip::attention::AttnShape;
use infinitehip::backend::cuda::dense_decode::random_device_kv;
use infinitehip::backend::cuda::dispatch::AttnOut;
use infinitehip::backend::cuda::engine_attn::{EngineKv, GpuAttention, QArg};
use infinitehip::backend::cuda::policies::squeeze_kmeans::kmeans_heads;
use infinitehip::backend::cuda::{DevBuf, GpuContext};
use infinitehip::config::{LayerPolicy, SqueezeConfig};
use infinitehip::kmeans::{kmeans, KMeansParams};
use infinitehip::rng::Rng;
use infinitehip::DType;
use serde_json::json;

use crate::gpu::{e, Check, R};

/// `hkv` heads of `m` points: `nc` Gaussian blobs (spread `noise`) per
/// head, every `dup`-th point a copy of an earlier one (0: none).
fn points(
    hkv: usize,
    m: usize,
    d: usize,
    nc: usize,
    noise: f32,
    dup: usize,
    seed: u64,
) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(hkv * m * d);
    for _ in 0..hkv {
        let centres = rng.normal_vec(nc * d, 1.0);
        let base = out.len();
        for i in 0..m {
            if dup > 0 && i >= dup && i % dup == 0 {
                let j = rng.below(i);
                let row: Vec<f32> = out[base + j * d..base + (j + 1) * d].to_vec();
                out.extend(row);
                continue;
            }
            let c = rng.below(nc);
            for t in 0..d {
                out.push(centres[c * d + t] + noise * rng.normal());
            }
        }
    }
    out
}

struct Case {
    name: &'static str,
    hkv: usize,
    m: usize,
    d: usize,
    k: usize,
    iters: usize,
    nc: usize,
    noise: f32,
    dup: usize,
}

fn case(gpu: &GpuContext, c: &Case, seed: u64) -> R<Check> {
    let pts = points(c.hkv, c.m, c.d, c.nc, c.noise, c.dup, seed);
    let p = KMeansParams {
        k: c.k,
        max_iters: c.iters,
        seed: seed ^ 0x5eed,
        normalize: true,
    };
    let dp = DevBuf::from_slice(&pts).map_err(e)?;
    let t = Instant::now();
    let (g, tm) = kmeans_heads(gpu, dp.ptr, c.m * c.d, c.hkv, c.m, c.d, &p).map_err(e)?;
    let gpu_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let cpu: Vec<_> = (0..c.hkv)
        .map(|h| kmeans(&pts[h * c.m * c.d..(h + 1) * c.m * c.d], c.d, &p))
        .collect::<Result<_, _>>()
        .map_err(e)?;
    let cpu_ms = t.elapsed().as_secs_f64() * 1e3;
    let (mut lab_diff, mut size_diff, mut cent_diff, mut iter_diff) = (0, 0, 0, 0);
    let mut max_abs = 0f32;
    let mut finite = true;
    let mut empty = 0;
    for (a, b) in g.iter().zip(&cpu) {
        lab_diff += a
            .labels
            .iter()
            .zip(&b.labels)
            .filter(|(x, y)| x != y)
            .count();
        size_diff += a.sizes.iter().zip(&b.sizes).filter(|(x, y)| x != y).count();
        iter_diff += (a.iters != b.iters) as usize;
        empty += b.sizes.iter().filter(|&&s| s == 0).count();
        for (x, y) in a.centroids.iter().zip(&b.centroids) {
            finite &= x.is_finite();
            if x.to_bits() != y.to_bits() {
                cent_diff += 1;
                max_abs = max_abs.max((x - y).abs());
            }
        }
    }
    let ok = finite
        && lab_diff == 0
        && size_diff == 0
        && cent_diff == 0
        && iter_diff == 0
        && g.len() == c.hkv;
    Ok(Check {
        name: format!(
            "squeeze k-means GPU == CPU {} (heads {}, {} pts, d {}, k {})",
            c.name, c.hkv, c.m, c.d, c.k
        ),
        ok,
        detail: format!(
            "labels differing {lab_diff}/{}, sizes differing {size_diff}, centroid values differing {cent_diff} (max abs {max_abs:.2e}), iteration counts differing {iter_diff}; iters {:?}; empty clusters {empty}; finite {finite}; GPU {gpu_ms:.1} ms (seeding {:.1}, Lloyd {:.1}) vs CPU {cpu_ms:.1} ms",
            c.hkv * c.m,
            g.iter().map(|x| x.iters).collect::<Vec<_>>(),
            tm.seeding_ms,
            tm.lloyd_ms,
        ),
    })
}

pub(crate) fn checks(gpu: &GpuContext, seed: u64) -> R<Vec<Check>> {
    let cases = [
        Case {
            name: "blobs",
            hkv: 4,
            m: 6000,
            d: 128,
            k: 300,
            iters: 30,
            nc: 40,
            noise: 0.6,
            dup: 0,
        },
        Case {
            name: "isotropic",
            hkv: 2,
            m: 3000,
            d: 64,
            k: 150,
            iters: 10,
            nc: 1,
            noise: 1.0,
            dup: 0,
        },
        Case {
            name: "d256",
            hkv: 1,
            m: 2500,
            d: 256,
            k: 100,
            iters: 30,
            nc: 20,
            noise: 0.3,
            dup: 0,
        },
        // Many duplicates: more clusters than distinct points (empty
        // clusters, re-seeding, the all-zero-weight seeding branch).
        Case {
            name: "duplicates",
            hkv: 2,
            m: 900,
            d: 64,
            k: 200,
            iters: 30,
            nc: 5,
            noise: 0.0,
            dup: 1,
        },
    ];
    let mut out = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        out.push(case(gpu, c, seed + i as u64)?);
    }
    out.push(two_level_head(gpu, seed)?);
    // A non-finite point is an error, never clusters.
    let mut pts = points(1, 200, 64, 4, 0.5, 0, seed);
    pts[77 * 64 + 5] = f32::NAN;
    let dp = DevBuf::from_slice(&pts).map_err(e)?;
    let p = KMeansParams {
        k: 10,
        max_iters: 5,
        seed: 1,
        normalize: true,
    };
    let r = kmeans_heads(gpu, dp.ptr, 200 * 64, 1, 200, 64, &p);
    out.push(Check {
        name: "squeeze k-means GPU rejects a NaN point".into(),
        ok: r
            .as_ref()
            .is_err_and(|x| x.to_string().contains("non-finite")),
        detail: match r {
            Ok(_) => "clustered a NaN point".into(),
            Err(x) => x.to_string(),
        },
    });
    Ok(out)
}

/// A two-level squeeze head index built as the engine seal builds it (fine
/// and coarse k-means on the GPU, `build_head_from`) == the CPU policy's
/// `build_head`: labels, sizes, centroids of both levels.
fn two_level_head(gpu: &GpuContext, seed: u64) -> R<Check> {
    use infinitehip::backend::cuda::policies::squeeze_kmeans::kmeans_host;
    use infinitehip::kv::SeqView;
    use infinitehip::policy::squeeze::{build_head, build_head_from, fine_params};
    let (n, d) = (5000, 128);
    let keys = points(1, n, d, 30, 0.7, 0, seed + 40);
    let cfg = SqueezeConfig {
        levels: 2,
        seed: seed ^ 3,
        ..SqueezeConfig::default()
    };
    let view = SeqView::from_contiguous(1, d, n, &keys, &keys);
    let cpu = build_head(&view, 0, n, &cfg).map_err(e)?;
    let s = cfg.sink;
    let km = kmeans_host(gpu, &keys[s * d..], d, &fine_params(&cfg, n - s)).map_err(e)?;
    let g = build_head_from(&keys[..s * d], d, Some(km), 0, &cfg, &mut |p, d, q| {
        kmeans_host(gpu, p, d, q)
    })
    .map_err(e)?;
    let (cc, gc) = (cpu.coarse.as_ref(), g.coarse.as_ref());
    let fine_same = cpu.labels == g.labels
        && cpu.fine.sizes == g.fine.sizes
        && cpu.fine.centroids == g.fine.centroids;
    let coarse_same = match (cc, gc) {
        (Some(a), Some(b)) => {
            a.of_fine == b.of_fine
                && a.level.sizes == b.level.sizes
                && a.level.centroids == b.level.centroids
        }
        _ => false,
    };
    Ok(Check {
        name: format!("squeeze two-level head index, GPU k-means == CPU ({n} keys, d {d})"),
        ok: fine_same && coarse_same,
        detail: format!(
            "fine level identical {fine_same} ({} clusters), coarse level identical {coarse_same} ({} clusters)",
            g.fine.k(),
            gc.map_or(0, |c| c.level.k())
        ),
    })
}

/// First decode of one request on one squeeze layer (Llama-3.1-8B heads,
/// default squeeze config) after a prefill of its last W positions, at
/// `len` prompt tokens (random bf16 K/V on the device): (first decode ms,
/// k-means ms, second decode ms).
fn first_decode(gpu: &GpuContext, len: usize, on_gpu: bool) -> R<(f64, f64, f64)> {
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let cfg =
        crate::gpu_engine::model_cfg(&shape, vec![LayerPolicy::Squeeze(SqueezeConfig::default())]);
    let kv = random_device_kv(gpu, 1, len + 2, 8, 128, DType::Bf16, 64, 7).map_err(e)?;
    let ekv = EngineKv {
        k: kv.k.ptr,
        v: kv.v.ptr,
        dtype: DType::Bf16,
        table: kv.table.ptr,
        table_stride: kv.table_stride,
        page_size: kv.page_size,
        page_stride: kv.page_stride,
        head_stride: kv.head_stride,
    };
    let qe = shape.q_elems();
    let w = SqueezeConfig::default().observation_window;
    let mut rng = Rng::new(9);
    let q: Vec<half::bf16> = rng
        .normal_vec(w * qe, 1.0)
        .into_iter()
        .map(half::bf16::from_f32)
        .collect();
    let qd = DevBuf::from_slice(&q).map_err(e)?;
    let out = DevBuf::alloc(w * qe * 4).map_err(e)?;
    let mut ga = GpuAttention::new(gpu, &cfg).map_err(e)?;
    ga.set_squeeze_kmeans_on_gpu(on_gpu);
    let raw = gpu.raw_stream();
    let qa = QArg {
        ptr: qd.ptr,
        dtype: DType::Bf16,
        row_stride: qe,
    };
    let oa = AttnOut {
        ptr: out.ptr,
        dtype: DType::F32,
        row_stride: qe,
    };
    // SAFETY: K/V hold len + 2 tokens through `table`; q and out hold w rows.
    unsafe { ga.prefill(raw, 0, &ekv, &[1], &[0], &[len], &[w], &qa, &oa, None) }.map_err(e)?;
    gpu.synchronize().map_err(e)?;
    let mut dec = |l: usize| -> R<f64> {
        let t = Instant::now();
        // SAFETY: as above (one query row).
        unsafe { ga.decode(raw, 0, &ekv, &[1], &[0], &[l], &qa, &oa, None) }.map_err(e)?;
        gpu.synchronize().map_err(e)?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let first = dec(len + 1)?;
    let second = dec(len + 2)?;
    let (km_ms, was_gpu) = ga.squeeze_kmeans(0, 1).ok_or("not sealed")?;
    if was_gpu != on_gpu {
        return Err(format!("k-means ran on the GPU: {was_gpu}, asked {on_gpu}"));
    }
    Ok((first, km_ms, second))
}

/// `--squeeze-first-decode LENS`: GPU k-means at every length, host
/// k-means at the lengths up to `cpu_max`; a table and JSON lines.
pub(crate) fn bench_first_decode(gpu: &GpuContext, lens: &[usize], cpu_max: usize) -> R<()> {
    println!(
        "| prompt tokens | k-means on | clusters/head | first decode ms | of which k-means ms | next decode ms |"
    );
    println!("|---:|---|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for &len in lens {
        for on_gpu in [true, false] {
            if !on_gpu && len > cpu_max {
                continue;
            }
            let (first, km, next) = first_decode(gpu, len, on_gpu)?;
            let cfg = SqueezeConfig::default();
            let k = infinitehip::policy::squeeze::fine_params(
                &cfg,
                len - cfg.observation_window - cfg.sink,
            )
            .k;
            let dev = if on_gpu { "GPU" } else { "host" };
            println!("| {len} | {dev} | {k} | {first:.1} | {km:.1} | {next:.3} |");
            rows.push(json!({"tokens": len, "kmeans": dev, "clusters": k,
                "first_decode_ms": first, "kmeans_ms": km, "next_decode_ms": next}));
        }
    }
    println!("JSON {}", serde_json::Value::Array(rows));
    Ok(())
}
