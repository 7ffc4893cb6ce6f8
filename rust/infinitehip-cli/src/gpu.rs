//! GPU commands: `nvrtc-check` (CI, no GPU), `gpu-test` (kernels vs the CPU
//! reference) and `bench-gpu` (hip and dense decode at Llama-3.1-8B shape).

use std::time::Instant;

use half::{bf16, f16};
use infinitehip::attention::{reference::attend_f64, rel_error, AttnShape};
use infinitehip::backend::cuda::dispatch::{
    self, AttnKernel, DecodeWorkspace, DeviceKv, DeviceSelection, HipGpuDecoder, HipGpuPrefill,
};
use infinitehip::backend::cuda::hip_fast::MaskEstimator;
use infinitehip::backend::cuda::{self as cu, kernels, DevBuf, GpuContext};
use infinitehip::config::{HipConfig, HipStage, ModelShape};
use infinitehip::kv::{KvLayout, KvPool, SeqView};
use infinitehip::parallel::par_map;
use infinitehip::policy::hip::HipPolicy;
use infinitehip::policy::{Phase, Policy, SelectRequest, Selection};
use infinitehip::rng::Rng;
use infinitehip::workload::needle_seq;
use infinitehip::Element;
use serde_json::json;

use crate::gpu_args::{BenchGpuArgs, GpuTestArgs, NvrtcCheckArgs};

pub(crate) type R<T> = Result<T, String>;

/// Bound on the relative error where the f64 reference reads the same
/// stored (rounded) K/V and queries as the kernel and the kernel computes
/// in f32 with an f32 output: only f32 accumulation differs (measured about
/// 2e-7 on an H100). A single dropped token out of 5,000 is ~1e-2
/// (`tests/attention.rs`), so the looser 1e-2 could not catch it.
pub(crate) const STORED_KV_BOUND: f64 = 1e-5;
/// Where the kernel itself rounds: bf16 P in the tensor-core PV product,
/// or bf16/f16 outputs (relative rounding 2^-8).
pub(crate) const ROUNDING_KERNEL_BOUND: f64 = 1e-2;
pub(crate) fn e<E: std::fmt::Display>(x: E) -> String {
    x.to_string()
}

pub fn nvrtc_check(a: &NvrtcCheckArgs) -> R<()> {
    let arch: &'static str = Box::leak(a.arch.clone().into_boxed_str());
    // Compile fresh: the check must not pass from a stale cache. `--into
    // DIR` keeps the PTX there (a cache to carry to a GPU machine).
    let dir = match &a.into {
        Some(d) => {
            let d = std::path::PathBuf::from(d);
            std::fs::create_dir_all(&d).map_err(e)?;
            for f in std::fs::read_dir(&d).map_err(e)? {
                let f = f.map_err(e)?.path();
                let keep = !a.only.is_empty()
                    && !a.only.iter().any(|m| {
                        f.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with(&format!("{m}-")))
                    });
                if f.extension().is_some_and(|x| x == "ptx") && !keep {
                    std::fs::remove_file(f).map_err(e)?;
                }
            }
            d
        }
        None => std::env::temp_dir().join(format!("ihip-nvrtc-check-{}", std::process::id())),
    };
    std::env::set_var("INFINITEHIP_CACHE", dir);
    for (m, _) in kernels::MODULES {
        if !a.only.is_empty() && !a.only.iter().any(|o| o == m) {
            continue;
        }
        let t = Instant::now();
        let (ptx, _) = cu::compile_module(m, arch).map_err(e)?;
        println!(
            "{m}.cu: ok for {arch} ({} entry points, {} KB PTX, {:.1} s)",
            kernels::entry_points(m).len(),
            ptx.len() / 1024,
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// f64 attention of one decode query `[n_q][d]` over `sel` (None: dense),
/// parallel over q heads.
pub(crate) fn ref_f64<T: Element>(
    shape: &AttnShape,
    q: &[f32],
    view: &SeqView<'_, T>,
    sel: Option<&Selection>,
) -> Vec<f64> {
    ref_f64_lim(shape, q, view, sel, usize::MAX)
}

pub(crate) fn ref_f64_lim<T: Element>(
    shape: &AttnShape,
    q: &[f32],
    view: &SeqView<'_, T>,
    sel: Option<&Selection>,
    limit: usize,
) -> Vec<f64> {
    let (g, d) = (shape.group(), shape.head_dim);
    let one = AttnShape {
        n_q_heads: g,
        n_kv_heads: 1,
        ..*shape
    };
    let per = par_map(shape.n_kv_heads, |h| {
        let hv = HeadView { v: view, h };
        let s1 = sel.map(|s| Selection {
            heads: vec![s.heads[h].clone()],
        });
        attend_f64(
            &one,
            &q[h * g * d..(h + 1) * g * d],
            &hv,
            s1.as_ref(),
            limit,
        )
    });
    per.concat()
}

/// One KV head of a view, as a 1-head KvRead.
struct HeadView<'a, 'b, T: Element> {
    v: &'a SeqView<'b, T>,
    h: usize,
}
impl<T: Element> infinitehip::kv::KvRead for HeadView<'_, '_, T> {
    fn len(&self) -> usize {
        self.v.len()
    }
    fn n_kv_heads(&self) -> usize {
        1
    }
    fn head_dim(&self) -> usize {
        self.v.layout().head_dim
    }
    fn dot_key(&self, _h: usize, t: usize, q: &[f32]) -> f32 {
        infinitehip::dtype::dot_f32(q, self.v.key_row(self.h, t))
    }
    fn read_key(&self, _h: usize, t: usize, out: &mut [f32]) {
        for (o, x) in out.iter_mut().zip(self.v.key_row(self.h, t)) {
            *o = x.to_f32();
        }
    }
    fn read_value(&self, _h: usize, t: usize, out: &mut [f32]) {
        for (o, x) in out.iter_mut().zip(self.v.value_row(self.h, t)) {
            *o = x.to_f32();
        }
    }
}

pub(crate) struct Check {
    pub(crate) name: String,
    pub(crate) ok: bool,
    pub(crate) detail: String,
}

pub(crate) fn random_pool<T: Element>(
    lay: KvLayout,
    lens: &[usize],
    rng: &mut Rng,
) -> R<KvPool<T>> {
    let mut p = KvPool::<T>::new(lay, None).map_err(e)?;
    for (i, &len) in lens.iter().enumerate() {
        p.add_sequence(i as u64).map_err(e)?;
        let n = len * lay.token_elems();
        let k: Vec<T> = rng
            .normal_vec(n, 1.0)
            .into_iter()
            .map(T::from_f32)
            .collect();
        let v: Vec<T> = rng
            .normal_vec(n, 1.0)
            .into_iter()
            .map(T::from_f32)
            .collect();
        p.append(i as u64, &k, &v).map_err(e)?;
    }
    Ok(p)
}

/// Random sorted disjoint ranges over 0..len (some single tokens).
fn random_sel(rng: &mut Rng, hkv: usize, len: usize) -> Selection {
    let heads = (0..hkv)
        .map(|_| {
            let mut v = Vec::new();
            let mut t = rng.below(8);
            while t < len {
                let l = 1 + rng.below(40);
                v.push(t..(t + l).min(len));
                t += l + rng.below(200);
            }
            v
        })
        .collect();
    Selection::from_ranges(heads)
}

fn decode_case<T: Element>(
    gpu: &GpuContext,
    shape: AttnShape,
    ps: usize,
    lens: &[usize],
    sparse: bool,
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
    let sels: Vec<Selection> = lens
        .iter()
        .map(|&l| {
            if sparse {
                random_sel(&mut rng, shape.n_kv_heads, l)
            } else {
                Selection::full(shape.n_kv_heads, l)
            }
        })
        .collect();
    let dsel = DeviceSelection::for_kv(&kv, &sels).map_err(e)?;
    let q = rng.normal_vec(lens.len() * shape.q_elems(), 1.0);
    let qd = DevBuf::from_slice(&q).map_err(e)?;
    let out = DevBuf::alloc(q.len() * 4).map_err(e)?;
    out.fill_bytes(0xff).map_err(e)?; // NaN poison
    let mut ws = DecodeWorkspace::new();
    // Small splits so that split-K and the combine are exercised.
    let split = if sparse { None } else { Some(256) };
    dispatch::decode(
        gpu,
        &mut ws,
        &shape,
        &kv,
        qd.ptr,
        &dsel,
        dsel.max_tokens,
        split,
        out.ptr,
    )
    .map_err(e)?;
    gpu.synchronize().map_err(e)?;
    let got: Vec<f32> = out.read(q.len()).map_err(e)?;
    let mut worst = 0f64;
    let qe = shape.q_elems();
    for (b, sel) in sels.iter().enumerate() {
        let view = pool.view(b as u64).map_err(e)?;
        let r = ref_f64(&shape, &q[b * qe..(b + 1) * qe], &view, Some(sel));
        let err = rel_error(&got[b * qe..(b + 1) * qe], &r);
        worst = if err.is_nan() {
            f64::NAN
        } else {
            worst.max(err)
        };
    }
    let nan_free = got.iter().all(|x| x.is_finite());
    // CUDA-core decode, f32 q and out over the stored K/V the reference reads.
    let ok = nan_free && worst <= STORED_KV_BOUND && worst.is_finite();
    Ok(Check {
        name: format!(
            "decode {} {} d{} g{} ps{} lens {:?}",
            if sparse { "sparse" } else { "dense" },
            T::DTYPE,
            shape.head_dim,
            shape.group(),
            ps,
            lens
        ),
        ok,
        detail: format!(
            "rel_err {worst:.2e} (bound {STORED_KV_BOUND:.0e}), all written+finite {nan_free}"
        ),
    })
}

/// GPU hip decode vs the CPU HipPolicy over a refresh cycle on a growing
/// needle workload, a batch of mixed lengths: same selected sets each step.
fn hip_case(gpu: &GpuContext, lens0: &[usize], steps: usize, seed: u64) -> R<Check> {
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let cfg = HipConfig::default();
    let mut dec = HipGpuDecoder::new(cfg.clone(), &shape, lens0.len()).map_err(e)?;
    let r = hip_case_on(gpu, &mut dec, &cfg, lens0, steps, seed)?;
    Ok(Check {
        name: format!("hip decode == CPU HipPolicy, lens {lens0:?}, {steps} steps"),
        ok: r.ok(),
        detail: r.detail(),
    })
}

/// `decode_stage0 = mean_key`: the GPU decoder (cached chunk means,
/// `hip_score_mean`) vs the CPU HipPolicy's twin on one sequence batch,
/// then `reset` and another batch of different K/V on the same decoder
/// (the means of the first must not be reused).
fn hip_mean_key_case(gpu: &GpuContext, lens0: &[usize], steps: usize, seed: u64) -> R<Check> {
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let cfg = HipConfig {
        decode_stage0: infinitehip::config::DecodeStage0::MeanKey,
        ..HipConfig::default()
    };
    let mut dec = HipGpuDecoder::new(cfg.clone(), &shape, lens0.len()).map_err(e)?;
    let a = hip_case_on(gpu, &mut dec, &cfg, lens0, steps, seed)?;
    dec.reset();
    let b = hip_case_on(gpu, &mut dec, &cfg, lens0, steps, seed + 1000)?;
    Ok(Check {
        name: format!(
            "hip decode, decode_stage0 mean_key == CPU HipPolicy, lens {lens0:?}, {steps} steps, then reset and new K/V"
        ),
        ok: a.ok() && b.ok(),
        detail: format!("first: {}; after reset: {}", a.detail(), b.detail()),
    })
}

/// `async_refresh`: the GPU decoder (refresh work on its side stream) vs
/// the CPU HipPolicy twin with the same setting: `all` with stage 0 by
/// search and by mean_key, `stage0` (mean_key); each then `reset` and new
/// K/V on the same decoder (its first step refreshes in line again).
fn hip_async_case(gpu: &GpuContext, lens0: &[usize], steps: usize, seed: u64) -> R<Check> {
    use infinitehip::config::{AsyncRefresh, DecodeStage0};
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let (mut ok, mut details) = (true, Vec::new());
    for (mode, stage0) in [
        (AsyncRefresh::All, DecodeStage0::Search),
        (AsyncRefresh::All, DecodeStage0::MeanKey),
        (AsyncRefresh::Stage0, DecodeStage0::MeanKey),
    ] {
        let cfg = HipConfig {
            decode_stage0: stage0,
            async_refresh: mode,
            ..HipConfig::default()
        };
        let mut dec = HipGpuDecoder::new(cfg.clone(), &shape, lens0.len()).map_err(e)?;
        let a = hip_case_on(gpu, &mut dec, &cfg, lens0, steps, seed)?;
        dec.reset();
        let b = hip_case_on(gpu, &mut dec, &cfg, lens0, steps, seed + 1000)?;
        ok &= a.ok() && b.ok();
        details.push(format!(
            "{mode:?}/{stage0:?}: {}; after reset: {}",
            a.detail(),
            b.detail()
        ));
    }
    Ok(Check {
        name: format!(
            "hip decode, async_refresh all and stage0 (side stream) == CPU HipPolicy, lens {lens0:?}, {steps} steps, then reset"
        ),
        ok,
        detail: details.join(" | "),
    })
}

/// What `hip_case_on` measured.
struct HipCaseResult {
    mismatches: usize,
    first_diff: String,
    worst: f64,
    recall_min: f64,
}

impl HipCaseResult {
    fn ok(&self) -> bool {
        self.mismatches == 0 && self.worst <= STORED_KV_BOUND && self.recall_min >= 0.99
    }
    fn detail(&self) -> String {
        format!(
            "selection mismatches {} {}; attention rel_err {:.2e} (bound {STORED_KV_BOUND:.0e}); min needle recall {:.3}",
            self.mismatches, self.first_diff, self.worst, self.recall_min
        )
    }
}

/// `hip_case`'s steps on a given decoder (fresh CPU policies).
fn hip_case_on(
    gpu: &GpuContext,
    dec: &mut HipGpuDecoder,
    cfg: &HipConfig,
    lens0: &[usize],
    steps: usize,
    seed: u64,
) -> R<HipCaseResult> {
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let model = ModelShape {
        n_layers: 1,
        n_q_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        ..ModelShape::default()
    };
    let full: Vec<_> = lens0
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            needle_seq::<bf16>(
                shape,
                l + steps,
                64,
                cfg.sink,
                cfg.window,
                64,
                seed + i as u64,
            )
        })
        .collect::<Result<_, _>>()
        .map_err(e)?;
    // CPU pools that grow by one token per step.
    let mut cpu: Vec<KvPool<bf16>> = Vec::new();
    for (ns, &l) in full.iter().zip(lens0) {
        let mut p = KvPool::new(ns.pool.layout(), None).map_err(e)?;
        p.add_sequence(0).map_err(e)?;
        let (k, v) = ns.pool.read(0, 0, l).map_err(e)?;
        p.append(0, &k, &v).map_err(e)?;
        cpu.push(p);
    }
    let seqs: Vec<(&KvPool<bf16>, u64)> = full.iter().map(|s| (&s.pool, 0)).collect();
    let mut kv = DeviceKv::upload(&seqs).map_err(e)?;
    let mut pols: Vec<HipPolicy> = (0..lens0.len())
        .map(|_| HipPolicy::new(cfg.clone(), &model))
        .collect::<Result<_, _>>()
        .map_err(e)?;
    let mut rng = Rng::new(seed ^ 77);
    let qe = shape.q_elems();
    let qd = DevBuf::alloc(lens0.len() * qe * 4).map_err(e)?;
    let out = DevBuf::alloc(lens0.len() * qe * 4).map_err(e)?;
    let (mut mismatches, mut worst, mut recall_min) = (0usize, 0f64, 1f64);
    let mut first_diff = String::new();
    for step in 0..steps {
        if step > 0 {
            for (b, p) in cpu.iter_mut().enumerate() {
                let t = lens0[b] + step - 1;
                let (k, v) = full[b].pool.read(0, t, t + 1).map_err(e)?;
                p.append(0, &k, &v).map_err(e)?;
            }
        }
        kv.lens = lens0.iter().map(|&l| l + step).collect();
        let q: Vec<f32> = full.iter().flat_map(|s| s.query(&mut rng)).collect();
        qd.write(&q).map_err(e)?;
        out.fill_bytes(0xff).map_err(e)?;
        dec.step(gpu, &shape, &kv, qd.ptr, out.ptr, true)
            .map_err(e)?;
        gpu.synchronize().map_err(e)?;
        let gsel = dec.selection_host(gpu).map_err(e)?;
        let got: Vec<f32> = out.read(q.len()).map_err(e)?;
        for b in 0..lens0.len() {
            let view = cpu[b].view(0).map_err(e)?;
            let req = SelectRequest {
                seq: 0,
                shape,
                phase: Phase::Decode,
                queries: &q[b * qe..(b + 1) * qe],
                q_start: view.len() - 1,
                kv: &view,
            };
            let csel = pols[b].select(&req).map_err(e)?.blocks.swap_remove(0);
            if csel != gsel[b] {
                mismatches += 1;
                if first_diff.is_empty() {
                    let h = (0..8)
                        .find(|&h| csel.heads[h] != gsel[b].heads[h])
                        .unwrap_or(0);
                    first_diff = format!(
                        "step {step} seq {b} head {h}: cpu {} ranges/{} tok, gpu {} ranges/{} tok",
                        csel.heads[h].len(),
                        csel.token_count(h),
                        gsel[b].heads[h].len(),
                        gsel[b].token_count(h)
                    );
                }
            }
            let r = ref_f64(&shape, &q[b * qe..(b + 1) * qe], &view, Some(&gsel[b]));
            let err = rel_error(&got[b * qe..(b + 1) * qe], &r);
            worst = if err.is_nan() || worst.is_nan() {
                f64::NAN
            } else {
                worst.max(err)
            };
            recall_min = recall_min.min(full[b].recall(&gsel[b]));
        }
    }
    Ok(HipCaseResult {
        mismatches,
        first_diff,
        worst,
        recall_min,
    })
}

pub(crate) fn small_hip() -> HipConfig {
    HipConfig {
        sink: 32,
        window: 256,
        stages: vec![
            HipStage {
                chunk_size: 64,
                keep_tokens: 1024,
                refresh_interval: 16,
            },
            HipStage {
                chunk_size: 16,
                keep_tokens: 512,
                refresh_interval: 8,
            },
            HipStage {
                chunk_size: 8,
                keep_tokens: 256,
                refresh_interval: 4,
            },
        ],
        block_size_q: 64,
        q_stride: 4,
        ..HipConfig::default()
    }
}

/// GPU chunked prefill (mask of every query block + causal block-sparse
/// attention) vs the CPU HipPolicy's prefill selection and the f64
/// reference, on a chunk whose length is not a multiple of the block.
fn prefill_case(gpu: &GpuContext, len: usize, q_start: usize, n: usize, seed: u64) -> R<Check> {
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let cfg = small_hip();
    let model = ModelShape {
        n_layers: 1,
        n_q_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        ..ModelShape::default()
    };
    let ns = needle_seq::<bf16>(shape, len, 64, cfg.sink, cfg.window, 64, seed).map_err(e)?;
    let mut rng = Rng::new(seed ^ 5);
    let qe = shape.q_elems();
    let mut q = Vec::with_capacity(n * qe);
    for _ in 0..n {
        q.extend(ns.query(&mut rng));
    }
    let view = ns.pool.view(0).map_err(e)?;
    let mut pol = HipPolicy::new(cfg.clone(), &model).map_err(e)?;
    let req = SelectRequest {
        seq: 0,
        shape,
        phase: Phase::Prefill,
        queries: &q,
        q_start,
        kv: &view,
    };
    let cpu = pol.select(&req).map_err(e)?;
    let mut kv = DeviceKv::upload(&[(&ns.pool, 0)]).map_err(e)?;
    kv.lens = vec![q_start + n];
    let mut pf = HipGpuPrefill::new(cfg.clone(), &shape, n).map_err(e)?;
    // The reference estimator is bit-equal to the CPU policy.
    pf.estimator = MaskEstimator::Reference;
    let qd = DevBuf::from_slice(&q).map_err(e)?;
    let out = DevBuf::alloc(q.len() * 4).map_err(e)?;
    out.fill_bytes(0xff).map_err(e)?;
    pf.prepare(gpu, &kv, q_start, n).map_err(e)?;
    pf.select(gpu, &kv, qd.ptr).map_err(e)?;
    pf.attend(gpu, &shape, &kv, qd.ptr, out.ptr).map_err(e)?;
    gpu.synchronize().map_err(e)?;
    let gsel = pf.sel.to_host(8).map_err(e)?;
    let mism = cpu.blocks.iter().zip(&gsel).filter(|(a, b)| a != b).count()
        + cpu.blocks.len().abs_diff(gsel.len());
    let got: Vec<f32> = out.read(q.len()).map_err(e)?;
    let finite = got.iter().all(|x| x.is_finite());
    let mut worst = 0f64;
    let checked: Vec<usize> = (0..n).step_by(7).chain([n - 1]).collect();
    for &i in &checked {
        let r = ref_f64_lim(
            &shape,
            &q[i * qe..(i + 1) * qe],
            &view,
            Some(&gsel[i / cfg.block_size_q]),
            q_start + i + 1,
        );
        let err = rel_error(&got[i * qe..(i + 1) * qe], &r);
        worst = if err.is_nan() || worst.is_nan() {
            f64::NAN
        } else {
            worst.max(err)
        };
    }
    let after = ns
        .needles
        .iter()
        .map(|nd| nd.start + nd.len)
        .max()
        .unwrap_or(0);
    let recall = gsel
        .iter()
        .enumerate()
        .filter(|(b, _)| q_start + b * cfg.block_size_q >= after)
        .map(|(_, s)| ns.recall(s))
        .fold(1f64, f64::min);
    Ok(Check {
        name: format!("hip prefill (reference estimator) == CPU HipPolicy, len {len}, queries {q_start}..{}", q_start + n),
        // Prefill attention may run on tensor cores (bf16 P in PV).
        ok: mism == 0 && finite && worst <= ROUNDING_KERNEL_BOUND,
        detail: format!("block selection mismatches {mism}/{}; causal attention rel_err {worst:.2e} over {} queries; all written+finite {finite}; needle recall (blocks after the needles) {recall:.3}", cpu.blocks.len(), checked.len()),
    })
}

pub fn gpu_test(a: &GpuTestArgs) -> R<()> {
    let (seed, hip_len) = (a.seed, a.hip_len);
    let gpu = GpuContext::new(0).map_err(e)?;
    println!("device {} ({} SMs, {})", gpu.name, gpu.sm_count, gpu.arch);
    if a.hip_fast_cpu_only {
        return report(&crate::gpu_hip_fast::cpu_twin_checks(&gpu, seed)?);
    }
    if a.hip_prefill_only {
        // The hip prefill estimators only: reference == CPU policy, fast
        // vs reference, and the engine path.
        let mut checks = vec![
            prefill_case(&gpu, 6000, 2500, 1500, seed + 9)?,
            prefill_case(&gpu, 3000, 0, 3000, seed + 10)?,
        ];
        checks.extend(crate::gpu_hip_fast::checks(&gpu, seed)?);
        return report(&checks);
    }
    infinitehip::backend::cuda::dispatch::set_score_v1(a.score_v1);
    infinitehip::backend::cuda::dense_decode::force_v2(!a.dense_v1);
    infinitehip::backend::cuda::dense_decode::set_dense_chunks(a.dense_chunks);
    {
        use infinitehip::backend::cuda::dispatch::{force_attention, HipAttention};
        force_attention(if a.split_combine {
            HipAttention::SplitCombine
        } else {
            HipAttention::SparseV2
        });
    }
    if a.dense_only {
        // The dense decode kernel only (kernels/decode_dense.cu).
        return report(&crate::gpu_dense::checks(&gpu, seed)?);
    }
    if a.step_only {
        // The device step, hip_topk, and the host step vs the CPU policy.
        let mut checks = crate::gpu_score::checks(&gpu, seed)?;
        checks.extend(crate::gpu_step::checks(&gpu, seed)?);
        checks.extend(crate::gpu_sparse::checks(&gpu, seed)?);
        checks.push(hip_case(
            &gpu,
            &[hip_len, hip_len / 3 + 17, 5000],
            17,
            seed,
        )?);
        checks.push(hip_mean_key_case(
            &gpu,
            &[hip_len, hip_len / 3 + 17, 5000],
            17,
            seed + 9,
        )?);
        checks.push(hip_async_case(
            &gpu,
            &[hip_len, hip_len / 3 + 17, 5000],
            35,
            seed + 21,
        )?);
        return report(&checks);
    }
    if let Ok(v) = std::env::var("INFINITEHIP_ROPE_PF_TIMING") {
        // "len,n": the RoPE-mode prefill chunk timing alone
        // (gpu_rope_prefill::timing; no checks).
        let x: Vec<usize> = v.split(',').filter_map(|s| s.trim().parse().ok()).collect();
        return match x[..] {
            [len, n] if n > 0 && n < len => crate::gpu_rope_prefill::timing(&gpu, len, n),
            _ => Err(format!(
                "INFINITEHIP_ROPE_PF_TIMING={v:?}: want \"len,n\" with 0 < n < len"
            )),
        };
    }
    if a.rope_only {
        // RoPE modes of the GPU hip decode vs the CPU policy, then timing.
        let checks = crate::gpu_rope::checks(&gpu, seed)?;
        // The verdicts first (a timing cut short keeps them).
        let r = report(&checks);
        crate::gpu_rope::timing(&gpu, &a.rope_timing)?;
        return r;
    }
    if !a.rope_timing.is_empty() {
        // The RoPE-mode timing alone (no checks).
        return crate::gpu_rope::timing(&gpu, &a.rope_timing);
    }
    if a.engine_decode_only {
        return report(&crate::gpu_engine::decode_checks(&gpu, seed)?);
    }
    if a.kmeans_only {
        // The squeeze k-means (GPU == CPU), then the first-decode timing.
        let checks = crate::gpu_kmeans::checks(&gpu, seed)?;
        crate::gpu_kmeans::bench_first_decode(&gpu, &a.squeeze_first_decode, a.squeeze_cpu_max)?;
        return report(&checks);
    }
    // Policy kernels (locret, squeeze, lazy) first: they are quick.
    let mut checks = crate::gpu_policies::checks(&gpu, seed)?;
    checks.extend(crate::gpu_kmeans::checks(&gpu, seed)?);
    if a.engine_only {
        checks.clear();
    }
    // The engine-facing path: borrowed caller K/V, caller stream, bf16 q/out.
    checks.extend(crate::gpu_engine::checks(&gpu, seed)?);
    checks.extend(crate::gpu_engine_policies::checks(&gpu, seed)?);
    checks.extend(crate::gpu_engine_locret::checks(&gpu, seed)?);
    if !a.policies_only {
        // Dense decode (tensor-core split-K) vs f64.
        checks.extend(crate::gpu_dense::checks(&gpu, seed)?);
        // Tensor-core prefill vs its CUDA-core twin and f64.
        checks.extend(crate::gpu_prefill_tc::checks(&gpu, seed)?);
        checks.push(crate::gpu_long_prefill::check(&gpu, seed + 77));
    }
    for &len in &a.engine_timing {
        crate::gpu_engine::timing(&gpu, len)?;
    }
    if a.policy_timing {
        crate::gpu_policies::timing(&gpu, seed)?;
    }
    let mut s = seed;
    let attention = !a.policies_only && !a.engine_only;
    for &(hq, hkv, d) in if attention {
        &[(32, 8, 128), (8, 8, 64), (16, 2, 256), (16, 8, 128)][..]
    } else {
        &[]
    } {
        let shape = AttnShape::new(hq, hkv, d).map_err(e)?;
        for &ps in &[64usize, 16] {
            s += 1;
            let lens = [1usize, 77, 1000, 5003];
            checks.push(decode_case::<bf16>(&gpu, shape, ps, &lens, false, s)?);
            checks.push(decode_case::<f16>(&gpu, shape, ps, &lens, false, s + 100)?);
            checks.push(decode_case::<bf16>(
                &gpu,
                shape,
                ps,
                &[3000, 1, 12345],
                true,
                s + 200,
            )?);
        }
    }
    if attention {
        checks.extend(crate::gpu_score::checks(&gpu, seed)?);
        checks.extend(crate::gpu_step::checks(&gpu, seed)?);
        checks.extend(crate::gpu_sparse::checks(&gpu, seed)?);
        checks.push(hip_case(
            &gpu,
            &[hip_len, hip_len / 3 + 17, 5000],
            17,
            seed,
        )?);
        checks.push(prefill_case(&gpu, 6000, 2500, 1500, seed + 9)?);
        checks.push(prefill_case(&gpu, 3000, 0, 3000, seed + 10)?);
        // The fast (tensor-core) prefill mask estimator vs its reference.
        checks.extend(crate::gpu_hip_fast::checks(&gpu, seed)?);
    }
    report(&checks)
}

fn report(checks: &[Check]) -> R<()> {
    let mut failed = 0;
    for c in checks {
        println!(
            "{} {:<70} {}",
            if c.ok { "PASS" } else { "FAIL" },
            c.name,
            c.detail
        );
        failed += (!c.ok) as usize;
    }
    println!("gpu-test: {} checks, {failed} failed", checks.len());
    if failed > 0 {
        return Err(format!("{failed} GPU checks failed"));
    }
    Ok(())
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub(crate) fn time_ms(gpu: &GpuContext, reps: usize, mut f: impl FnMut() -> R<()>) -> R<f64> {
    f()?;
    gpu.synchronize().map_err(e)?;
    let mut ts = Vec::new();
    for _ in 0..reps {
        let a = gpu
            .ctx
            .new_event(Some(
                cu::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT,
            ))
            .map_err(e)?;
        let b = gpu
            .ctx
            .new_event(Some(
                cu::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT,
            ))
            .map_err(e)?;
        a.record(&gpu.stream).map_err(e)?;
        f()?;
        b.record(&gpu.stream).map_err(e)?;
        b.synchronize().map_err(e)?;
        ts.push(a.elapsed_ms(&b).map_err(e)? as f64);
    }
    Ok(median(&mut ts))
}

/// Device time of one call (events around it, then wait).
fn event_ms(gpu: &GpuContext, f: impl FnOnce() -> R<()>) -> R<f64> {
    let ev = || {
        gpu.ctx
            .new_event(Some(
                cu::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT,
            ))
            .map_err(e)
    };
    let (a, b) = (ev()?, ev()?);
    a.record(&gpu.stream).map_err(e)?;
    f()?;
    b.record(&gpu.stream).map_err(e)?;
    b.synchronize().map_err(e)?;
    Ok(a.elapsed_ms(&b).map_err(e)? as f64)
}

pub fn bench_gpu(a: &BenchGpuArgs) -> R<()> {
    // --prefill-only: no decode rows, and per prefill only mask + attention
    // (no kernel-variant or dense timings), for each of --estimators.
    let prefill_only = a.prefill_only;
    let estimators: Vec<MaskEstimator> = a
        .estimators
        .iter()
        .map(|x| {
            MaskEstimator::parse(x)
                .ok_or_else(|| format!("--estimators: unknown `{x}` (auto, ref, fast)"))
        })
        .collect::<R<_>>()?;
    let (tokens, batches, seed, reps) = (a.tokens.clone(), a.batch.clone(), a.seed, a.reps);
    let baseline = a.check()?;
    let gpu = GpuContext::new(0).map_err(e)?;
    // HBM bandwidth: a 4 GiB device-to-device copy, bytes read + written.
    let bw = {
        let n = 4usize << 30;
        let (src, dst) = (DevBuf::alloc(n).map_err(e)?, DevBuf::alloc(n).map_err(e)?);
        src.fill_bytes(0x3c).map_err(e)?;
        // SAFETY: `src` and `dst` are both `n`-byte allocations of this context.
        let ms = time_ms(&gpu, 5, || unsafe {
            cu::cudarc::driver::result::memcpy_dtod_async(
                dst.ptr,
                src.ptr,
                n,
                gpu.stream.cu_stream(),
            )
            .map_err(e)
        })?;
        2.0 * n as f64 / (ms * 1e-3)
    };
    println!(
        "device {} ({} SMs), measured copy bandwidth {:.0} GB/s",
        gpu.name,
        gpu.sm_count,
        bw / 1e9
    );
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let cfg = HipConfig::default();
    let qe = shape.q_elems();
    let mut rows = Vec::new();
    for &t in if prefill_only { &[][..] } else { &tokens[..] } {
        let t_gen = Instant::now();
        let ns = needle_seq::<bf16>(shape, t, 64, cfg.sink, cfg.window, 64, seed + t as u64)
            .map_err(e)?;
        eprintln!(
            "generated {t} tokens in {:.1} s",
            t_gen.elapsed().as_secs_f64()
        );
        for &b in &batches {
            let kv_bytes = (t * shape.n_kv_heads * shape.head_dim * 2 * 2 * b) as f64;
            let (free, _) = gpu.mem_info().map_err(e)?;
            if kv_bytes > free as f64 * 0.9 {
                println!(
                    "skip T={t} B={b}: K/V {:.1} GiB > free device memory {:.1} GiB",
                    kv_bytes / (1u64 << 30) as f64,
                    free as f64 / (1u64 << 30) as f64
                );
                continue;
            }
            // b distinct device copies of the same sequence (distinct memory).
            let seqs: Vec<(&KvPool<bf16>, u64)> = (0..b).map(|_| (&ns.pool, 0)).collect();
            let kv = DeviceKv::upload(&seqs).map_err(e)?;
            let mut rng = Rng::new(seed ^ 0xbe);
            let q1 = ns.query(&mut rng);
            let q: Vec<f32> = (0..b).flat_map(|_| q1.clone()).collect();
            let qd = DevBuf::from_slice(&q).map_err(e)?;
            let out = DevBuf::alloc(q.len() * 4).map_err(e)?;
            // Dense decode with our kernel.
            let full = DeviceSelection::for_kv(&kv, &vec![Selection::full(8, t); b]).map_err(e)?;
            let mut ws = DecodeWorkspace::new();
            let dense_ms = time_ms(&gpu, reps, || {
                dispatch::decode(&gpu, &mut ws, &shape, &kv, qd.ptr, &full, t, None, out.ptr)
                    .map_err(e)
            })?;
            let dense_out: Vec<f32> = out.read(qe).map_err(e)?;
            // hip: refresh step alone, then the amortised cycle.
            let mut dec = HipGpuDecoder::new(cfg.clone(), &shape, b).map_err(e)?;
            dec.step(&gpu, &shape, &kv, qd.ptr, out.ptr, true)
                .map_err(e)?;
            gpu.synchronize().map_err(e)?;
            let cycle = cfg
                .stages
                .iter()
                .map(|s| s.refresh_interval)
                .max()
                .unwrap_or(1);
            let refresh_ms = time_ms(&gpu, reps, || {
                dec.reset();
                dec.step(&gpu, &shape, &kv, qd.ptr, out.ptr, false)
                    .map(|_| ())
                    .map_err(e)
            })?;
            let cycle_ms = time_ms(&gpu, reps, || {
                dec.reset();
                for _ in 0..cycle {
                    dec.step(&gpu, &shape, &kv, qd.ptr, out.ptr, false)
                        .map_err(e)?;
                }
                Ok(())
            })?;
            let ours_ms = cycle_ms / cycle as f64;
            // Breakdown: the refresh step's mask estimation alone, and one
            // attention pass over its selection.
            let select_ms = time_ms(&gpu, reps, || {
                dec.reset();
                dec.select(&gpu, &kv, qd.ptr, false).map(|_| ()).map_err(e)
            })?;
            let mut ws2 = DecodeWorkspace::new();
            let mt = dec.max_tokens;
            let dsel = dec.selection(&gpu).map_err(e)?;
            let attend_ms = time_ms(&gpu, reps, || {
                dispatch::decode(&gpu, &mut ws2, &shape, &kv, qd.ptr, dsel, mt, None, out.ptr)
                    .map_err(e)
            })?;
            // Output of a refresh step, its selection, error and recall.
            dec.reset();
            dec.step(&gpu, &shape, &kv, qd.ptr, out.ptr, false)
                .map_err(e)?;
            gpu.synchronize().map_err(e)?;
            let got: Vec<f32> = out.read(qe).map_err(e)?;
            let sel = dec.selection_host(&gpu).map_err(e)?;
            let recall = ns.recall(&sel[0]);
            let view = ns.pool.view(0).map_err(e)?;
            let (rel, dense_rel) = if b == 1 {
                let dref = ref_f64(&shape, &q1, &view, None);
                (rel_error(&got, &dref), rel_error(&dense_out, &dref))
            } else {
                (f64::NAN, f64::NAN)
            };
            let sel_tokens: usize = (0..8).map(|h| sel[0].token_count(h)).sum();
            let floor_hip = (sel_tokens * shape.head_dim * 2 * 2 * b) as f64 / bw * 1e3;
            let floor_dense = kv_bytes / bw * 1e3;
            let key = format!("{t}x{b}");
            let base = baseline
                .get("results")
                .and_then(|r| r.get(&key))
                .and_then(|x| x.as_f64());
            let base_name = baseline
                .get("name")
                .and_then(|x| x.as_str())
                .unwrap_or("none")
                .to_string();
            rows.push(json!({
                "policy": "hip", "phase": "decode", "tokens": t, "batch": b,
                "dense_ms": dense_ms, "ours_ms": ours_ms, "refresh_ms": refresh_ms,
                "speedup": base.map(|x| x / ours_ms),
                "speedup_vs_our_dense": dense_ms / ours_ms,
                "rel_error": if rel.is_nan() { None } else { Some(rel) },
                "dense_rel_error": if dense_rel.is_nan() { None } else { Some(dense_rel) },
                "needle_recall": recall,
                "baseline": base_name, "baseline_ms": base,
                "floor_ms": floor_hip, "dense_floor_ms": floor_dense,
                "selected_tokens_per_head": sel_tokens / 8,
                "refresh_select_ms": select_ms, "attend_ms": attend_ms,
            }));
            eprintln!("T={t} B={b}: {}", rows.last().unwrap());
        }
    }
    let (prefill_tokens, dense_max) = (a.prefill_tokens.clone(), a.prefill_dense_max);
    for &t in &prefill_tokens {
        let ns = needle_seq::<bf16>(shape, t, 64, cfg.sink, cfg.window, 64, seed + 7 * t as u64)
            .map_err(e)?;
        let kv = DeviceKv::upload(&[(&ns.pool, 0)]).map_err(e)?;
        let mut rng = Rng::new(seed ^ 0x9f);
        let mut q = Vec::with_capacity(t * qe);
        for _ in 0..t {
            q.extend(ns.query(&mut rng));
        }
        let qd = DevBuf::from_slice(&q).map_err(e)?;
        drop(q);
        let chunk = cfg.prefill_chunk;
        let out = DevBuf::alloc(chunk * qe * 4).map_err(e)?;
        let out_cc = DevBuf::alloc(chunk * qe * 4).map_err(e)?;
        for &est in &estimators {
            let mut pf = HipGpuPrefill::new(cfg.clone(), &shape, chunk).map_err(e)?;
            pf.estimator = est;
            let mut recall = 1f64;
            // Blocks whose first query comes after every needle (earlier blocks
            // cannot see it causally): worst recall of the chunk at q0.
            let needle_recall = |pf: &HipGpuPrefill, q0: usize| -> R<f64> {
                let after = ns
                    .needles
                    .iter()
                    .map(|nd| nd.start + nd.len)
                    .max()
                    .unwrap_or(0);
                let sel = pf.sel.to_host(8).map_err(e)?;
                Ok(sel
                    .iter()
                    .enumerate()
                    .filter(|(b, _)| q0 + b * cfg.block_size_q >= after)
                    .map(|(_, s)| ns.recall(s))
                    .fold(1f64, f64::min))
            };
            // Per pass: mask ms, attention ms (dispatch's choice), and over the
            // same selections the tensor-core and CUDA-core kernels alone
            // (device events), and their outputs' worst relative difference.
            let mut run = |record: bool, recall: &mut f64| -> R<[f64; 7]> {
                let (mut sel_ms, mut att_ms, mut tc_ms, mut cc_ms) = (0f64, 0f64, 0f64, 0f64);
                let mut tc_mt = [0f64; 2];
                let mut twin = 0f64;
                let mut q0 = 0;
                while q0 < t {
                    let n = chunk.min(t - q0);
                    pf.prepare(&gpu, &kv, q0, n).map_err(e)?;
                    let qp = qd.ptr + (q0 * qe * 4) as u64;
                    gpu.synchronize().map_err(e)?;
                    let t0 = Instant::now();
                    pf.select(&gpu, &kv, qp).map_err(e)?;
                    gpu.synchronize().map_err(e)?;
                    let t1 = Instant::now();
                    pf.attend(&gpu, &shape, &kv, qp, out.ptr).map_err(e)?;
                    gpu.synchronize().map_err(e)?;
                    sel_ms += (t1 - t0).as_secs_f64() * 1e3;
                    att_ms += t1.elapsed().as_secs_f64() * 1e3;
                    if prefill_only {
                        if record && q0 + n == t {
                            *recall = needle_recall(&pf, q0)?;
                        }
                        q0 += n;
                        continue;
                    }
                    tc_ms += event_ms(&gpu, || {
                        pf.attend_with(&gpu, &shape, &kv, qp, out.ptr, AttnKernel::TensorCore)
                            .map_err(e)
                    })?;
                    for (mt, acc) in tc_mt.iter_mut().enumerate() {
                        dispatch::force_tc_tiles_per_warp(Some(mt + 1));
                        *acc += event_ms(&gpu, || {
                            pf.attend_with(&gpu, &shape, &kv, qp, out.ptr, AttnKernel::TensorCore)
                                .map_err(e)
                        })?;
                    }
                    dispatch::force_tc_tiles_per_warp(None);
                    cc_ms += event_ms(&gpu, || {
                        pf.attend_with(&gpu, &shape, &kv, qp, out_cc.ptr, AttnKernel::CudaCore)
                            .map_err(e)
                    })?;
                    if record && (q0 == 0 || q0 + n == t) {
                        let a: Vec<f32> = out.read(n * qe).map_err(e)?;
                        let b: Vec<f64> = out_cc
                            .read::<f32>(n * qe)
                            .map_err(e)?
                            .iter()
                            .map(|&x| x as f64)
                            .collect();
                        let r = rel_error(&a, &b);
                        twin = if r.is_nan() { f64::NAN } else { twin.max(r) };
                    }
                    if record && q0 + n == t {
                        *recall = needle_recall(&pf, q0)?;
                    }
                    q0 += n;
                }
                Ok([sel_ms, att_ms, tc_ms, cc_ms, twin, tc_mt[0], tc_mt[1]])
            };
            // Warm-up pass (kernels, allocations) except at very long contexts,
            // where one pass takes tens of seconds and the warm-up is negligible.
            if t <= 262_144 {
                run(false, &mut recall)?;
            }
            let [sel_ms, att_ms, tc_ms, cc_ms, twin, tc1_ms, tc2_ms] = run(true, &mut recall)?;
            let ours = sel_ms + att_ms;
            // Dense causal prefill on the tensor-core kernel (a covering
            // selection per chunk), the like-for-like kernel comparison with
            // SDPA flash; only up to --prefill-dense-max tokens (quadratic).
            let mut dense_mt = [None::<f64>; 2];
            let dense_ms = if t <= dense_max && !prefill_only {
                let mut ws = DecodeWorkspace::new();
                let mut pass = || -> R<f64> {
                    let mut ms = 0f64;
                    let mut q0 = 0;
                    while q0 < t {
                        let n = chunk.min(t - q0);
                        let sel =
                            DeviceSelection::from_host(&[Selection::full(8, q0 + n)]).map_err(e)?;
                        let pos: Vec<i32> = (q0..q0 + n).map(|p| p as i32).collect();
                        let q_pos = DevBuf::from_slice(&pos).map_err(e)?;
                        let q_seq = DevBuf::from_slice(&vec![0i32; n]).map_err(e)?;
                        let qp = qd.ptr + (q0 * qe * 4) as u64;
                        ms += event_ms(&gpu, || {
                            dispatch::attend_with(
                                &gpu,
                                &mut ws,
                                &shape,
                                &kv,
                                qp,
                                n,
                                &sel,
                                q0 + n,
                                None,
                                out.ptr,
                                n,
                                q_seq.ptr,
                                q_pos.ptr,
                                AttnKernel::TensorCore,
                            )
                            .map_err(e)
                        })?;
                        q0 += n;
                    }
                    Ok(ms)
                };
                pass()?;
                let auto = pass()?;
                for (mt, x) in dense_mt.iter_mut().enumerate() {
                    dispatch::force_tc_tiles_per_warp(Some(mt + 1));
                    *x = Some(pass()?);
                }
                dispatch::force_tc_tiles_per_warp(None);
                Some(auto)
            } else {
                None
            };
            let key = format!("prefill_{t}");
            let base = baseline
                .get("results")
                .and_then(|r| r.get(&key))
                .and_then(|x| x.as_f64());
            rows.push(json!({
                "policy": "hip", "phase": "prefill", "tokens": t, "batch": 1,
                "estimator": est.name(),
                "dense_ms": None::<f64>, "ours_ms": ours, "refresh_ms": None::<f64>,
                "prefill_select_ms": sel_ms, "prefill_attend_ms": att_ms,
                "prefill_attend_tc_ms": tc_ms, "prefill_attend_cc_ms": cc_ms,
                "prefill_attend_tc_mt1_ms": tc1_ms, "prefill_attend_tc_mt2_ms": tc2_ms,
                "dense_causal_tc_mt1_ms": dense_mt[0], "dense_causal_tc_mt2_ms": dense_mt[1],
                "prefill_tc_vs_cc_rel": if twin.is_nan() { None } else { Some(twin) },
                "prefill_tc_nan": twin.is_nan(),
                "dense_causal_tc_ms": dense_ms,
                "dense_causal_tc_speedup": base.zip(dense_ms).map(|(b, d)| b / d),
                "speedup": base.map(|x| x / ours), "rel_error": None::<f64>,
                "needle_recall": recall,
                "baseline": baseline.get("name").and_then(|x| x.as_str()).unwrap_or("none"),
                "baseline_ms": base, "floor_ms": None::<f64>,
            }));
            eprintln!("prefill T={t}: {}", rows.last().unwrap());
        }
    }
    let doc = json!({
        "machine": format!("{} ({} SMs), {:.0} GB/s measured copy bandwidth", gpu.name, gpu.sm_count, bw / 1e9),
        "results": rows,
    });
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&doc).unwrap())
            .map_err(|x| format!("{p}: {x}"))?;
    }
    println!("\n| tokens | batch | SDPA flash ms | our dense ms | hip amortised ms | hip refresh ms | speedup vs SDPA | hip floor ms | dense floor ms | rel err (hip) | rel err (dense) | needle recall |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let f = |v: &serde_json::Value, k: &str, p: usize| {
        v.get(k)
            .and_then(|x| x.as_f64())
            .map_or("-".to_string(), |x| format!("{x:.p$}"))
    };
    let fe = |v: &serde_json::Value, k: &str| {
        v.get(k)
            .and_then(|x| x.as_f64())
            .map_or("-".to_string(), |x| format!("{x:.2e}"))
    };
    for r in rows.iter().filter(|r| r["phase"] == "decode") {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r["tokens"],
            r["batch"],
            f(r, "baseline_ms", 3),
            f(r, "dense_ms", 3),
            f(r, "ours_ms", 4),
            f(r, "refresh_ms", 4),
            f(r, "speedup", 1),
            f(r, "floor_ms", 4),
            f(r, "dense_floor_ms", 3),
            fe(r, "rel_error"),
            fe(r, "dense_rel_error"),
            f(r, "needle_recall", 3)
        );
    }
    println!("\n| prefill tokens | mask estimator | SDPA flash causal ms | hip prefill ms (mask + attention) | mask ms | attention ms | speedup | needle recall, last chunk (blocks after the needles) |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows.iter().filter(|r| r["phase"] == "prefill") {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r["tokens"],
            r["estimator"].as_str().unwrap_or("-"),
            f(r, "baseline_ms", 1),
            f(r, "ours_ms", 1),
            f(r, "prefill_select_ms", 1),
            f(r, "prefill_attend_ms", 1),
            f(r, "speedup", 2),
            f(r, "needle_recall", 3)
        );
    }
    println!("\n| prefill tokens | SDPA flash causal ms | hip attention, tensor core ms | hip attention, CUDA core ms | TC / CC speed-up | TC vs CC rel diff | dense causal, tensor core ms | dense TC vs SDPA | hip TC 1 / 2 m-tiles per warp ms | dense TC 1 / 2 ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in rows.iter().filter(|r| r["phase"] == "prefill") {
        let tc = r["prefill_attend_tc_ms"].as_f64().unwrap_or(f64::NAN);
        let cc = r["prefill_attend_cc_ms"].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {} | {} | {} | {} | {:.1} | {} | {} | {} | {} / {} | {} / {} |",
            r["tokens"],
            f(r, "baseline_ms", 1),
            f(r, "prefill_attend_tc_ms", 1),
            f(r, "prefill_attend_cc_ms", 1),
            cc / tc,
            if r["prefill_tc_nan"] == true {
                "NaN".to_string()
            } else {
                fe(r, "prefill_tc_vs_cc_rel")
            },
            f(r, "dense_causal_tc_ms", 1),
            f(r, "dense_causal_tc_speedup", 2),
            f(r, "prefill_attend_tc_mt1_ms", 1),
            f(r, "prefill_attend_tc_mt2_ms", 1),
            f(r, "dense_causal_tc_mt1_ms", 1),
            f(r, "dense_causal_tc_mt2_ms", 1)
        );
    }
    Ok(())
}
