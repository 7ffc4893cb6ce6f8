//! k-means on the GPU for Squeezed Attention (`kernels/squeeze_kmeans.cu`):
//! the device twin of `kmeans::kmeans` (the CPU reference), every KV head
//! of a layer at once.
//!
//! Same algorithm and the same arithmetic, operation for operation: k-means++
//! seeding from the same random draws (drawn here on the host from the
//! seed, uploaded), Lloyd iterations until the labels settle or
//! `max_iters`, empty clusters re-seeded at the farthest points, centroids
//! the means of the raw points. The kernels keep the CPU's summation orders
//! (see the .cu header), so on the same points and seed the labels,
//! centroids and sizes are expected to be bit for bit the CPU's; the GPU
//! test compares them and counts any label that differs (allowed only
//! where the two nearest centres tie within f32 rounding).
//!
//! Cost per call (m points per head, k clusters, d dims, hkv heads):
//! seeding is k - 1 sequential steps (3 launches each) over all points,
//! fewer rows read where the triangle inequality allows (as on the CPU);
//! each Lloyd iteration is m x k x d multiply-adds per head on CUDA cores
//! (no tensor cores, to keep f32 results equal to the CPU's) plus a stable
//! counting sort and the f64 cluster sums. `max_iters` (the squeeze config's
//! `kmeans_iters`) caps the iterations. Memory: a normalised copy of the
//! points (hkv x m x d f32) and about 6 x 4 bytes per point and per
//! (cluster, 2048-point segment).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::i32_of;
use crate::backend::cuda::{gpu_err, kernels, DevBuf, GpuContext};
use crate::error::{Error, Result};
use crate::kmeans::{KMeans, KMeansParams};
use crate::rng::Rng;

/// kernels/squeeze_kmeans.cu KM_CHUNK (= kmeans.rs CHUNK) and KM_SEG.
const CHUNK: usize = 1024;
const SEG: usize = 2048;

/// Launch `$name` of squeeze_kmeans on `gpu.stream` with `$block` threads.
macro_rules! km {
    ($gpu:expr, $name:expr, grid: $grid:expr, block: $block:expr, args: [$($a:expr),* $(,)?]) => {{
        let name: &str = &$name;
        let f = $gpu.func("squeeze_kmeans", name)?;
        let mut l = $gpu.stream.launch_builder(&f);
        $( l.arg(&$a); )*
        let grid_dim = $crate::backend::launch_grid::grid($gpu.grid_limits, name, $grid)?;
        let cfg = LaunchConfig {
            grid_dim,
            block_dim: ($block as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments follow the kernel's parameter list in kernels/squeeze_kmeans.cu
        // (same order and C types); every pointer is a device allocation sized by `Bufs::new`
        // for this (hkv, m, k, d).
        unsafe { l.launch(cfg) }
            .map(|_| ())
            .map_err(|e| gpu_err(&format!("launch {name}"), e))
    }};
}

/// Wall time of the phases of one call (host clock, device synchronised at
/// each boundary).
#[derive(Clone, Copy, Debug, Default)]
pub struct KMeansGpuTiming {
    pub normalize_ms: f64,
    pub seeding_ms: f64,
    pub lloyd_ms: f64,
    pub final_ms: f64,
}

/// The seeding's random draws, as `kmeans::kmeans_pp_init` takes them from
/// `Rng::new(seed)`: the first centre, then one uniform per later centre
/// (the CPU stops drawing once every point coincides with a centre, and
/// from then on never needs a draw again, so drawing all up front gives
/// the same sequence).
pub fn seeding_draws(seed: u64, m: usize, k: usize) -> (usize, Vec<f64>) {
    let mut rng = Rng::new(seed);
    let first = rng.below(m);
    let u = (1..k).map(|_| rng.uniform() as f64).collect();
    (first, u)
}

/// Checks done before any CUDA call.
pub fn check_args(hkv: usize, m: usize, d: usize, p: &KMeansParams) -> Result<()> {
    if !kernels::HEAD_DIMS.contains(&d) {
        return Err(Error::Invalid(format!(
            "GPU k-means: dimension {d} (built for {:?}; use kmeans::kmeans)",
            kernels::HEAD_DIMS
        )));
    }
    if hkv == 0 || m == 0 {
        return Err(Error::Invalid("GPU k-means on zero points".into()));
    }
    if p.k == 0 || p.k > m {
        return Err(Error::Invalid(format!(
            "k-means cluster count k = {} must be in 1..={m} (the number of points)",
            p.k
        )));
    }
    if p.max_iters == 0 {
        return Err(Error::Invalid("k-means max_iters must be > 0".into()));
    }
    i32_of("GPU k-means points", m)?;
    i32_of("GPU k-means heads", hkv)?;
    i32_of("GPU k-means clusters x segments", p.k * m.div_ceil(SEG))?;
    Ok(())
}

struct Bufs {
    x: DevBuf,
    bad: DevBuf,
    d2: DevBuf,
    near: DevBuf,
    chosen: DevBuf,
    centers: DevBuf,
    cc: DevBuf,
    parts: DevBuf,
    u: DevBuf,
    cent: DevBuf,
    cn: DevBuf,
    labels: DevBuf,
    dists: DevBuf,
    changed: DevBuf,
    active: DevBuf,
    cnt: DevBuf,
    sizes: DevBuf,
    offs: DevBuf,
    members: DevBuf,
}

impl Bufs {
    fn new(hkv: usize, m: usize, k: usize, d: usize) -> Result<Self> {
        let (hm, hk) = (hkv * m, hkv * k);
        let a = DevBuf::alloc;
        Ok(Bufs {
            x: a(hm * d * 4)?,
            bad: a(4)?,
            d2: a(hm * 4)?,
            near: a(hm * 4)?,
            chosen: a(hm)?,
            centers: a(hk * 4)?,
            cc: a(hk * 4)?,
            parts: a(hkv * m.div_ceil(CHUNK) * 8)?,
            u: a(k * 8)?,
            cent: a(hk * d * 4)?,
            cn: a(hk * 4)?,
            labels: a(hm * 4)?,
            dists: a(hm * 4)?,
            changed: a(hkv * 4)?,
            active: a(hkv)?,
            cnt: a(hk * m.div_ceil(SEG) * 4)?,
            sizes: a(hk * 4)?,
            offs: a(hkv * (k + 1) * 4)?,
            members: a(hm * 4)?,
        })
    }
}

fn fill_u32(gpu: &GpuContext, buf: &DevBuf, n: usize, v: u32) -> Result<()> {
    let ni = n as i64;
    km!(gpu, "km_fill_u32", grid: (n.div_ceil(256).clamp(1, 4096), 1, 1), block: 256,
        args: [buf.ptr, ni, v])
}

/// Cluster the points of `hkv` heads at once: head h's point i is the f32
/// row at device address `pts + 4 * (h * hs + i * d)` (`hs`: head stride in
/// elements), `m` points per head. Returns one `KMeans` per head, equal to
/// `kmeans::kmeans` on that head's points (module doc), and the phase times.
pub fn kmeans_heads(
    gpu: &GpuContext,
    pts: u64,
    hs: usize,
    hkv: usize,
    m: usize,
    d: usize,
    p: &KMeansParams,
) -> Result<(Vec<KMeans>, KMeansGpuTiming)> {
    check_args(hkv, m, d, p)?;
    let k = p.k;
    let b = Bufs::new(hkv, m, k, d)?;
    let mut tm = KMeansGpuTiming::default();
    let (mi, ki, di) = (m as i32, k as i32, d as i32);
    let hsl = hs as i64;
    let blk_d = d.next_multiple_of(32).min(256);
    // Normalised copy, finiteness check.
    let t0 = std::time::Instant::now();
    fill_u32(gpu, &b.bad, 1, 0)?;
    let norm = p.normalize as i32;
    km!(gpu, "km_normalize", grid: (m.div_ceil(256), hkv, 1), block: 256,
        args: [pts, hsl, mi, di, norm, b.x.ptr, b.bad.ptr])?;
    gpu.synchronize()?;
    if b.bad.read::<u32>(1)?[0] != 0 {
        return Err(Error::Invalid(
            "k-means point has a non-finite coordinate (GPU k-means)".into(),
        ));
    }
    tm.normalize_ms = t0.elapsed().as_secs_f64() * 1e3;

    // k-means++ seeding.
    let t0 = std::time::Instant::now();
    let (first, u) = seeding_draws(p.seed, m, k);
    b.u.write_async(&gpu.stream, &u)?;
    let firsti = first as i32;
    km!(gpu, "km_pp_init", grid: (m.div_ceil(256), hkv, 1), block: 256,
        args: [b.d2.ptr, b.near.ptr, b.chosen.ptr, b.centers.ptr, mi, ki, firsti])?;
    let nchunks = m.div_ceil(CHUNK);
    let nci = nchunks as i32;
    for j in 0..k - 1 {
        let ji = j as i32;
        if j > 0 {
            km!(gpu, "km_pp_cc", grid: (j.div_ceil(256), hkv, 1), block: 256,
                args: [b.x.ptr, mi, di, b.centers.ptr, ki, ji, b.cc.ptr])?;
        }
        km!(gpu, "km_pp_update", grid: (nchunks, hkv, 1), block: 256,
            args: [b.x.ptr, mi, di, b.centers.ptr, ki, ji, b.cc.ptr, b.d2.ptr, b.near.ptr,
                   b.parts.ptr, nci])?;
        km!(gpu, "km_pp_pick", grid: (1, hkv, 1), block: 1024,
            args: [b.d2.ptr, b.parts.ptr, nci, mi, b.u.ptr, ji, b.chosen.ptr, b.centers.ptr, ki])?;
    }
    km!(gpu, "km_gather_rows", grid: (k, hkv, 1), block: blk_d,
        args: [b.x.ptr, mi, di, b.centers.ptr, ki, b.cent.ptr])?;
    gpu.synchronize()?;
    tm.seeding_ms = t0.elapsed().as_secs_f64() * 1e3;

    // Lloyd iterations; a head stops when its labels settle.
    let t0 = std::time::Instant::now();
    let max = p.max_iters.max(1);
    let mut active = vec![1u8; hkv];
    let mut iters = vec![0usize; hkv];
    fill_u32(gpu, &b.labels, hkv * m, u32::MAX)?;
    let xs = (m * d) as i64;
    let assign = format!("km_assign_d{d}");
    for it in 1..=max {
        b.active.write_async(&gpu.stream, &active)?;
        km!(gpu, "km_cnorm", grid: (k.div_ceil(256), hkv, 1), block: 256,
            args: [b.cent.ptr, ki, di, b.cn.ptr, b.active.ptr])?;
        fill_u32(gpu, &b.changed, hkv, 0)?;
        km!(gpu, assign, grid: (m.div_ceil(128), hkv, 1), block: 128,
            args: [b.x.ptr, mi, b.cent.ptr, b.cn.ptr, ki, b.labels.ptr, b.dists.ptr,
                   b.changed.ptr, b.active.ptr])?;
        gpu.synchronize()?;
        let changed: Vec<u32> = b.changed.read(hkv)?;
        for h in 0..hkv {
            if active[h] != 0 {
                iters[h] += 1;
                if changed[h] == 0 || it == max {
                    active[h] = 0;
                }
            }
        }
        if active.iter().all(|&a| a == 0) {
            break;
        }
        b.active.write_async(&gpu.stream, &active)?;
        group(gpu, &b, hkv, m, k)?;
        km!(gpu, "km_means", grid: (k, hkv, 1), block: blk_d,
            args: [b.x.ptr, xs, mi, di, ki, b.offs.ptr, b.members.ptr, b.cent.ptr,
                   b.active.ptr])?;
        reseed_empty(gpu, &b, &active, m, k, d)?;
    }
    tm.lloyd_ms = t0.elapsed().as_secs_f64() * 1e3;

    // Centroids: means of the raw points under the final labels.
    let t0 = std::time::Instant::now();
    let all = vec![1u8; hkv];
    b.active.write_async(&gpu.stream, &all)?;
    group(gpu, &b, hkv, m, k)?;
    km!(gpu, "km_means", grid: (k, hkv, 1), block: blk_d,
        args: [pts, hsl, mi, di, ki, b.offs.ptr, b.members.ptr, b.cent.ptr, b.active.ptr])?;
    gpu.synchronize()?;
    let labels: Vec<u32> = b.labels.read(hkv * m)?;
    let cent: Vec<f32> = b.cent.read(hkv * k * d)?;
    let sizes: Vec<u32> = b.sizes.read(hkv * k)?;
    tm.final_ms = t0.elapsed().as_secs_f64() * 1e3;
    let out = (0..hkv)
        .map(|h| KMeans {
            k,
            dim: d,
            centroids: cent[h * k * d..(h + 1) * k * d].to_vec(),
            labels: labels[h * m..(h + 1) * m].to_vec(),
            sizes: sizes[h * k..(h + 1) * k].to_vec(),
            iters: iters[h],
        })
        .collect();
    Ok((out, tm))
}

/// Stable counting sort of the points by label (active heads): sizes,
/// offsets and members in point order within each cluster.
fn group(gpu: &GpuContext, b: &Bufs, hkv: usize, m: usize, k: usize) -> Result<()> {
    let p = m.div_ceil(SEG);
    fill_u32(gpu, &b.cnt, hkv * p * k, 0)?;
    let (mi, ki, pi) = (m as i32, k as i32, p as i32);
    km!(gpu, "km_seg_count", grid: (p, hkv, 1), block: 32,
        args: [b.labels.ptr, mi, ki, pi, b.cnt.ptr, b.active.ptr])?;
    km!(gpu, "km_seg_base", grid: (k.div_ceil(256), hkv, 1), block: 256,
        args: [b.cnt.ptr, ki, pi, b.sizes.ptr, b.active.ptr])?;
    km!(gpu, "km_offsets", grid: (1, hkv, 1), block: 1024,
        args: [b.sizes.ptr, ki, b.offs.ptr, b.active.ptr])?;
    km!(gpu, "km_seg_scatter", grid: (p, hkv, 1), block: 32,
        args: [b.labels.ptr, mi, ki, pi, b.cnt.ptr, b.offs.ptr, b.members.ptr, b.active.ptr])
}

/// `kmeans::lloyd`'s re-seeding of the clusters left empty (rare): at the
/// points farthest from their centre, farthest first, ties by index, on
/// the host for the heads still iterating.
fn reseed_empty(
    gpu: &GpuContext,
    b: &Bufs,
    active: &[u8],
    m: usize,
    k: usize,
    d: usize,
) -> Result<()> {
    gpu.synchronize()?;
    let sizes: Vec<u32> = b.sizes.read(active.len() * k)?;
    for (h, _) in active.iter().enumerate().filter(|(_, &a)| a != 0) {
        let empty: Vec<usize> = (0..k).filter(|&c| sizes[h * k + c] == 0).collect();
        if empty.is_empty() {
            continue;
        }
        let dists: Vec<f32> = DevBuf::borrowed(b.dists.ptr + (h * m * 4) as u64, m * 4).read(m)?;
        for (c, p) in empty.iter().zip(farthest_first(&dists)) {
            let dst = b.cent.ptr + ((h * k + c) * d * 4) as u64;
            let src = b.x.ptr + ((h * m + p) * d * 4) as u64;
            // SAFETY: both rows lie inside their allocations (c < k, p < m).
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(dst, src, d * 4, gpu.stream.cu_stream())
            }
            .map_err(|e| gpu_err("k-means re-seed copy", e))?;
        }
    }
    Ok(())
}

/// Point indices by distance, farthest first, ties by index (as
/// `kmeans::lloyd`).
pub fn farthest_first(dists: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..dists.len()).collect();
    order.sort_by(|&a, &b| dists[b].total_cmp(&dists[a]).then(a.cmp(&b)));
    order
}

/// Host in, host out: `kmeans::kmeans` of `points` (`[n][dim]`) on the GPU.
pub fn kmeans_host(
    gpu: &GpuContext,
    points: &[f32],
    dim: usize,
    p: &KMeansParams,
) -> Result<KMeans> {
    if dim == 0 || points.len() % dim != 0 {
        return Err(Error::shape(
            "GPU k-means points",
            format!("n x {dim} elements"),
            points.len(),
        ));
    }
    let n = points.len() / dim;
    check_args(1, n, dim, p)?;
    let dp = DevBuf::from_slice(points)?;
    let (mut v, _) = kmeans_heads(gpu, dp.ptr, n * dim, 1, n, dim, p)?;
    Ok(v.pop().expect("one head"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_follow_the_cpu_seeding() {
        // The first centre is the CPU's.
        let mut rng = Rng::new(3);
        let pts = rng.normal_vec(300 * 8, 1.0);
        let init = crate::kmeans::kmeans_pp_init(&pts, 8, 5, 11).unwrap();
        let (first, u) = seeding_draws(11, 300, 5);
        assert_eq!(first, init[0]);
        assert_eq!(u.len(), 4);
        assert!(u.iter().all(|&x| (0.0..1.0).contains(&x)));
    }

    #[test]
    fn bad_arguments_fail_before_any_cuda_call() {
        let p = |k| KMeansParams {
            k,
            max_iters: 3,
            seed: 0,
            normalize: true,
        };
        assert!(check_args(2, 100, 128, &p(5)).is_ok());
        let e = check_args(2, 100, 96, &p(5)).unwrap_err();
        assert!(e.to_string().contains("dimension 96"), "{e}");
        assert!(check_args(2, 100, 128, &p(101)).is_err());
        assert!(check_args(2, 100, 128, &p(0)).is_err());
        assert!(check_args(0, 100, 128, &p(5)).is_err());
        let mut q = p(5);
        q.max_iters = 0;
        assert!(check_args(1, 100, 64, &q).is_err());
    }

    #[test]
    fn farthest_first_breaks_ties_by_index() {
        assert_eq!(farthest_first(&[1.0, 3.0, 3.0, 0.5]), vec![1, 2, 0, 3]);
    }
}
