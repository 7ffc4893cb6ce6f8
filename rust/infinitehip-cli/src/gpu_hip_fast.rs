//! GPU checks of the fast hip prefill mask estimator (tensor cores,
//! `MaskEstimator::TensorCore`) against its reference twin (f32 probes,
//! bit-equal to the CPU policy), on fresh random inputs:
//! - passages: attention mass sits in planted runs of tokens at random
//!   offsets; the output error vs dense f64 of the fast selections must be
//!   no worse than the reference selections' by more than 10%, NaN fails;
//! - needle: recall 1.0 for every block after the needle;
//! - covering budget: sparse == dense within rounding, same selection;
//! - CPU twin: the fast selections equal the CPU policy's fast estimator's
//!   (`hip.mask_estimator` fast) up to a measured share of near-ties.

use half::{bf16, f16};
use infinitehip::attention::{rel_error, AttnShape};
use infinitehip::backend::cuda::dispatch::{AttnOut, DeviceKv, HipGpuPrefill};
use infinitehip::backend::cuda::engine_attn::{GpuAttention, QArg};
use infinitehip::backend::cuda::hip_fast::MaskEstimator;
use infinitehip::backend::cuda::{DevBuf, GpuContext};
use infinitehip::config::{HipConfig, HipStage, LayerPolicy, MaskEstimatorChoice, ModelShape};
use infinitehip::kv::{KvLayout, KvPool, SeqView};
use infinitehip::policy::hip::HipPolicy;
use infinitehip::policy::Selection;
use infinitehip::policy::{Phase, Policy, SelectRequest};
use infinitehip::rng::Rng;
use infinitehip::workload::needle_seq;
use infinitehip::{DType, Element};

use crate::gpu::{e, ref_f64_lim, Check, R};
use crate::gpu_engine::{model_cfg, TokenPool};

/// Allowed ratio of the fast selections' error to the reference's.
const ERR_RATIO: f64 = 1.1;

/// A sequence whose attention mass sits in planted passages: random normal
/// keys, and per KV head `n_pass` runs of 4..48 tokens at random offsets
/// whose keys lean towards the head's query direction by a random amount.
/// Queries: twice sqrt(d) times the direction plus unit noise.
pub(crate) struct Passages<T: Element> {
    pub pool: KvPool<T>,
    dirs: Vec<f32>,
    shape: AttnShape,
}

pub(crate) fn passages<T: Element>(
    shape: AttnShape,
    len: usize,
    n_pass: usize,
    seed: u64,
) -> R<Passages<T>> {
    passages_multi(shape, &[len], n_pass, seed)
}

/// `passages` with one sequence (ids 0, 1, ...) per length, same directions.
pub(crate) fn passages_multi<T: Element>(
    shape: AttnShape,
    lens: &[usize],
    n_pass: usize,
    seed: u64,
) -> R<Passages<T>> {
    let (hkv, d) = (shape.n_kv_heads, shape.head_dim);
    let mut rng = Rng::new(seed);
    let mut dirs = vec![0f32; hkv * d];
    for h in 0..hkv {
        let v = &mut dirs[h * d..(h + 1) * d];
        rng.fill_normal(v, 1.0);
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n);
    }
    let te = hkv * d;
    let mut pool = KvPool::new(
        KvLayout {
            n_kv_heads: hkv,
            head_dim: d,
            page_size: 64,
        },
        None,
    )
    .map_err(e)?;
    for (id, &len) in lens.iter().enumerate() {
        let mut k = rng.normal_vec(len * te, 1.0);
        let v = rng.normal_vec(len * te, 1.0);
        for h in 0..hkv {
            for _ in 0..n_pass {
                let plen = 4 + rng.below(45);
                let start = rng.below(len.saturating_sub(plen).max(1));
                let amp = 0.5 + 2.5 * rng.uniform();
                for t in start..(start + plen).min(len) {
                    let row = &mut k[t * te + h * d..t * te + (h + 1) * d];
                    for (x, u) in row.iter_mut().zip(&dirs[h * d..(h + 1) * d]) {
                        *x += amp * u;
                    }
                }
            }
        }
        pool.add_sequence(id as u64).map_err(e)?;
        let kt: Vec<T> = k.iter().map(|&x| T::from_f32(x)).collect();
        let vt: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
        pool.append(id as u64, &kt, &vt).map_err(e)?;
    }
    Ok(Passages { pool, dirs, shape })
}

impl<T: Element> Passages<T> {
    pub fn query(&self, rng: &mut Rng) -> Vec<f32> {
        let (g, d) = (self.shape.group(), self.shape.head_dim);
        let mut q = rng.normal_vec(self.shape.q_elems(), 1.0);
        let s = 2.0 * (d as f32).sqrt();
        for hq in 0..self.shape.n_q_heads {
            let u = &self.dirs[(hq / g) * d..(hq / g + 1) * d];
            for (x, ui) in q[hq * d..(hq + 1) * d].iter_mut().zip(u) {
                *x += ui * s;
            }
        }
        q
    }
}

/// GPU prefill of queries `q_start..q_start + n` with one estimator:
/// outputs `[n][n_q][d]` f32 and the block selections.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gpu_prefill<T: Element>(
    gpu: &GpuContext,
    shape: &AttnShape,
    pool: &KvPool<T>,
    cfg: &HipConfig,
    q: &[f32],
    q_start: usize,
    n: usize,
    est: MaskEstimator,
) -> R<(Vec<f32>, Vec<Selection>)> {
    let mut kv = DeviceKv::upload(&[(pool, 0)]).map_err(e)?;
    kv.lens = vec![q_start + n];
    let mut pf = HipGpuPrefill::new(cfg.clone(), shape, n).map_err(e)?;
    pf.estimator = est;
    let qd = DevBuf::from_slice(q).map_err(e)?;
    let out = DevBuf::alloc(q.len() * 4).map_err(e)?;
    out.fill_bytes(0xff).map_err(e)?;
    pf.prepare(gpu, &kv, q_start, n).map_err(e)?;
    pf.select(gpu, &kv, qd.ptr).map_err(e)?;
    pf.attend(gpu, shape, &kv, qd.ptr, out.ptr).map_err(e)?;
    gpu.synchronize().map_err(e)?;
    let sel = pf.sel.to_host(shape.n_kv_heads).map_err(e)?;
    Ok((out.read(q.len()).map_err(e)?, sel))
}

/// Relative error (all sampled queries together) of `got` vs dense f64;
/// NaN if anything is NaN or was left unwritten.
fn err_vs_dense<T: Element>(
    shape: &AttnShape,
    view: &SeqView<'_, T>,
    q: &[f32],
    got: &[f32],
    q_start: usize,
    rows: &[usize],
) -> f64 {
    let qe = shape.q_elems();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for &i in rows {
        a.extend_from_slice(&got[i * qe..(i + 1) * qe]);
        b.extend(ref_f64_lim(
            shape,
            &q[i * qe..(i + 1) * qe],
            view,
            None,
            q_start + i + 1,
        ));
    }
    rel_error(&a, &b)
}

/// The pass rule: both finite, fast within ERR_RATIO of the reference.
pub(crate) fn within_ratio(fast: f64, reference: f64) -> bool {
    fast.is_finite() && reference.is_finite() && fast <= ERR_RATIO * reference
}

fn passages_case<T: Element>(
    gpu: &GpuContext,
    shape: AttnShape,
    len: usize,
    n: usize,
    seed: u64,
) -> R<Check> {
    let cfg = HipConfig::default();
    let ps = passages::<T>(shape, len, 48, seed)?;
    let mut rng = Rng::new(seed ^ 0x5a);
    let q: Vec<f32> = (0..n).flat_map(|_| ps.query(&mut rng)).collect();
    let q_start = len - n;
    let (fo, fsel) = gpu_prefill(
        gpu,
        &shape,
        &ps.pool,
        &cfg,
        &q,
        q_start,
        n,
        MaskEstimator::TensorCore,
    )?;
    let (ro, rsel) = gpu_prefill(
        gpu,
        &shape,
        &ps.pool,
        &cfg,
        &q,
        q_start,
        n,
        MaskEstimator::Reference,
    )?;
    let view = ps.pool.view(0).map_err(e)?;
    let rows: Vec<usize> = (0..n).step_by(37).chain([n - 1]).collect();
    let ef = err_vs_dense(&shape, &view, &q, &fo, q_start, &rows);
    let er = err_vs_dense(&shape, &view, &q, &ro, q_start, &rows);
    let tokens = |s: &[Selection]| -> usize {
        s.iter()
            .map(|x| {
                (0..shape.n_kv_heads)
                    .map(|h| x.token_count(h))
                    .sum::<usize>()
            })
            .sum()
    };
    Ok(Check {
        name: format!(
            "hip fast estimator vs reference, passages, len {len}, {}/{}/{} {}",
            shape.n_q_heads,
            shape.n_kv_heads,
            shape.head_dim,
            T::DTYPE
        ),
        ok: within_ratio(ef, er),
        detail: format!(
            "rel err vs dense: fast {ef:.3e}, reference {er:.3e} (ratio {:.2}, bound {ERR_RATIO}); selected tokens fast {} reference {}",
            ef / er,
            tokens(&fsel),
            tokens(&rsel)
        ),
    })
}

fn needle_case(gpu: &GpuContext, len: usize, seed: u64) -> R<Check> {
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let cfg = HipConfig::default();
    let ns = needle_seq::<bf16>(shape, len, 64, cfg.sink, cfg.window, 64, seed).map_err(e)?;
    let mut rng = Rng::new(seed ^ 3);
    let n = 2048;
    let q: Vec<f32> = (0..n).flat_map(|_| ns.query(&mut rng)).collect();
    let q_start = len - n;
    let (out, sel) = gpu_prefill(
        gpu,
        &shape,
        &ns.pool,
        &cfg,
        &q,
        q_start,
        n,
        MaskEstimator::TensorCore,
    )?;
    let after = ns
        .needles
        .iter()
        .map(|nd| nd.start + nd.len)
        .max()
        .unwrap_or(0);
    let recall = sel
        .iter()
        .enumerate()
        .filter(|(b, _)| q_start + b * cfg.block_size_q >= after)
        .map(|(_, s)| ns.recall(s))
        .fold(1f64, f64::min);
    let finite = out.iter().all(|x| x.is_finite());
    Ok(Check {
        name: format!("hip fast estimator, needle recall, len {len}"),
        ok: recall == 1.0 && finite,
        detail: format!("min needle recall over blocks after the needles {recall:.3}; all written+finite {finite}"),
    })
}

/// Budget covering the context: the fast selection covers everything, as
/// the reference's does, and the output equals dense.
fn covering_case<T: Element>(gpu: &GpuContext, shape: AttnShape, seed: u64) -> R<Check> {
    let cfg = HipConfig::default();
    let len = cfg.sink + cfg.window + cfg.budget() - 7;
    let ps = passages::<T>(shape, len, 8, seed)?;
    let mut rng = Rng::new(seed ^ 9);
    let n = len;
    let q: Vec<f32> = (0..n).flat_map(|_| ps.query(&mut rng)).collect();
    let (fo, fsel) = gpu_prefill(
        gpu,
        &shape,
        &ps.pool,
        &cfg,
        &q,
        0,
        n,
        MaskEstimator::TensorCore,
    )?;
    let (_, rsel) = gpu_prefill(
        gpu,
        &shape,
        &ps.pool,
        &cfg,
        &q,
        0,
        n,
        MaskEstimator::Reference,
    )?;
    let view = ps.pool.view(0).map_err(e)?;
    let rows: Vec<usize> = (0..n).step_by(97).chain([n - 1]).collect();
    let err = err_vs_dense(&shape, &view, &q, &fo, 0, &rows);
    let same = fsel == rsel;
    Ok(Check {
        name: format!(
            "hip fast estimator, covering budget == dense, len {len}, {}",
            T::DTYPE
        ),
        ok: same && err.is_finite() && err <= 1e-2,
        detail: format!(
            "selections equal to the reference's {same}; rel err vs dense {err:.2e} (bound 1e-2)"
        ),
    })
}

/// The engine path (`GpuAttention::prefill`, token-major K/V, bf16 q/out,
/// two requests, one longer than a prefill chunk): hip layers prefill
/// sparsely. The reference estimator's output equals `HipGpuPrefill`'s
/// (same selection) within bf16 rounding and differs from dense (the
/// prefill is sparse); the fast estimator's error vs dense f64 is within
/// ERR_RATIO of the reference's; `None` is dense within rounding.
fn engine_case(gpu: &GpuContext, seed: u64) -> R<Check> {
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let hip = HipConfig::default();
    let cfg = model_cfg(&shape, vec![LayerPolicy::Hip(hip.clone())]);
    let lens = [24000usize, 40000];
    let n_new = [3000usize, 9000];
    let ps = passages_multi::<bf16>(shape, &lens, 48, seed)?;
    let mut rng = Rng::new(seed ^ 0x77);
    let tp = TokenPool::from_pool(&ps.pool, &lens, &mut rng)?;
    let qe = shape.q_elems();
    let total: usize = n_new.iter().sum();
    let qf: Vec<f32> = (0..total).flat_map(|_| ps.query(&mut rng)).collect();
    let qb: Vec<bf16> = qf.iter().map(|&x| bf16::from_f32(x)).collect();
    let q_used: Vec<f32> = qb.iter().map(|x| x.to_f32()).collect();
    let qd = DevBuf::from_slice(&qb).map_err(e)?;
    let out = DevBuf::alloc(total * qe * 2).map_err(e)?;
    let mut ga = GpuAttention::new(gpu, &cfg).map_err(e)?;
    let mut run = |est: Option<MaskEstimator>| -> R<Vec<f32>> {
        ga.prefill_estimator = est;
        out.fill_bytes(0xff).map_err(e)?;
        unsafe {
            ga.prefill(
                0,
                0,
                &tp.engine_kv(),
                &[11, 12],
                &[0, 1],
                &lens,
                &n_new,
                &QArg {
                    ptr: qd.ptr,
                    dtype: DType::Bf16,
                    row_stride: qe,
                },
                &AttnOut {
                    ptr: out.ptr,
                    dtype: DType::Bf16,
                    row_stride: qe,
                },
                None,
            )
            .map_err(e)?;
        }
        gpu.synchronize().map_err(e)?;
        let got: Vec<bf16> = out.read(total * qe).map_err(e)?;
        Ok(got.iter().map(|x| x.to_f32()).collect())
    };
    let fast = run(Some(MaskEstimator::TensorCore))?;
    let reference = run(Some(MaskEstimator::Reference))?;
    let dense = run(None)?;
    // Error vs dense f64 over sampled rows of both requests.
    let (mut a_f, mut a_r, mut a_d, mut b) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut row = 0;
    for (i, (&len, &ni)) in lens.iter().zip(&n_new).enumerate() {
        let view = ps.pool.view(i as u64).map_err(e)?;
        for j in (0..ni).step_by(311).chain([ni - 1]) {
            let r = row + j;
            let pos = len - ni + j;
            let x = r * qe..(r + 1) * qe;
            a_f.extend_from_slice(&fast[x.clone()]);
            a_r.extend_from_slice(&reference[x.clone()]);
            a_d.extend_from_slice(&dense[x.clone()]);
            b.extend(ref_f64_lim(&shape, &q_used[x], &view, None, pos + 1));
        }
        row += ni;
    }
    let (ef, er, ed) = (
        rel_error(&a_f, &b),
        rel_error(&a_r, &b),
        rel_error(&a_d, &b),
    );
    // Request 0 through HipGpuPrefill (reference estimator, its own upload).
    let n0 = n_new[0];
    let (twin, _) = gpu_prefill(
        gpu,
        &shape,
        &ps.pool,
        &hip,
        &q_used[..n0 * qe],
        lens[0] - n0,
        n0,
        MaskEstimator::Reference,
    )?;
    let et = rel_error(
        &reference[..n0 * qe],
        &twin.iter().map(|&x| x as f64).collect::<Vec<_>>(),
    );
    let ok = within_ratio(ef, er)
        && ed.is_finite()
        && ed <= 1e-2
        && et.is_finite()
        && et <= 1e-2
        && er > 1e-2;
    Ok(Check {
        name: "engine GpuAttention prefill, hip layer: fast vs reference estimator (bf16, 2 requests)".into(),
        ok,
        detail: format!(
            "rel err vs dense f64: fast {ef:.3e}, reference {er:.3e} (ratio {:.2}, bound {ERR_RATIO}; reference > 1e-2: sparse), dense mode {ed:.2e} (bound 1e-2); reference vs HipGpuPrefill (request 0) {et:.2e} (bound 1e-2)",
            ef / er
        ),
    })
}

/// Allowed share of selected tokens where the GPU fast estimator and its
/// CPU twin disagree: both add the same exact bf16 products in f32, in a
/// different order, so scores may differ by f32 rounding and a near-tie at
/// a stage's threshold can go either way. Everything else must match.
const TWIN_TOKEN_DIFF: f64 = 1e-3;

/// Tokens of `a` not in `b` (both sorted, disjoint ranges).
fn tokens_missing(a: &[std::ops::Range<usize>], b: &[std::ops::Range<usize>]) -> usize {
    let (mut both, mut j) = (0, 0);
    for r in a {
        while j < b.len() && b[j].end <= r.start {
            j += 1;
        }
        let mut k = j;
        while k < b.len() && b[k].start < r.end {
            both += r.end.min(b[k].end) - r.start.max(b[k].start);
            k += 1;
        }
    }
    a.iter().map(|r| r.len()).sum::<usize>() - both
}

/// GPU fast estimator vs the CPU policy's fast twin on one passages input:
/// selections (as token sets) per (block, KV head).
fn cpu_twin_case<T: Element>(
    gpu: &GpuContext,
    shape: AttnShape,
    cfg: &HipConfig,
    len: usize,
    n: usize,
    seed: u64,
    label: &str,
) -> R<Check> {
    let ps = passages::<T>(shape, len, 48, seed)?;
    let mut rng = Rng::new(seed ^ 0x5a);
    let q: Vec<f32> = (0..n).flat_map(|_| ps.query(&mut rng)).collect();
    let q_start = len - n;
    let (_, gsel) = gpu_prefill(
        gpu,
        &shape,
        &ps.pool,
        cfg,
        &q,
        q_start,
        n,
        MaskEstimator::TensorCore,
    )?;
    let view = ps.pool.view(0).map_err(e)?;
    let ccfg = HipConfig {
        mask_estimator: MaskEstimatorChoice::Fast,
        ..cfg.clone()
    };
    let model = ModelShape {
        head_dim: shape.head_dim,
        ..Default::default()
    };
    let mut pol = HipPolicy::new(ccfg, &model).map_err(e)?;
    let cpu = pol
        .select(&SelectRequest {
            seq: 0,
            shape,
            phase: Phase::Prefill,
            queries: &q,
            q_start,
            kv: &view,
        })
        .map_err(e)?;
    let (mut rows_diff, mut diff, mut total) = (0usize, 0usize, 0usize);
    let blocks_equal = gsel.len() == cpu.blocks.len();
    for (g, c) in gsel.iter().zip(&cpu.blocks) {
        for h in 0..shape.n_kv_heads {
            let mut gr = g.heads[h].clone();
            gr.sort_by_key(|r| r.start);
            let d = tokens_missing(&gr, &c.heads[h]) + tokens_missing(&c.heads[h], &gr);
            rows_diff += (d > 0) as usize;
            diff += d;
            total += c.token_count(h);
        }
    }
    let share = diff as f64 / total.max(1) as f64;
    Ok(Check {
        name: format!(
            "hip fast estimator: GPU == CPU twin, {label}, len {len}, {}/{}/{} {}",
            shape.n_q_heads,
            shape.n_kv_heads,
            shape.head_dim,
            T::DTYPE
        ),
        ok: blocks_equal && total > 0 && share <= TWIN_TOKEN_DIFF,
        detail: format!(
            "rows differing {rows_diff}/{}; tokens in one selection only {diff} of {total} ({share:.2e}, bound {TWIN_TOKEN_DIFF:.0e})",
            cpu.blocks.len() * shape.n_kv_heads
        ),
    })
}

/// `gpu-test --hip-fast-cpu-only`: the GPU fast estimator vs its CPU twin
/// at the default stages and at the head_dim-64 quality stages.
pub(crate) fn cpu_twin_checks(gpu: &GpuContext, seed: u64) -> R<Vec<Check>> {
    let s = |a, b, c| AttnShape::new(a, b, c).map_err(e);
    let d64c2 = |len: usize| HipConfig {
        sink: 32,
        window: len / 32,
        stages: vec![
            HipStage {
                chunk_size: 2,
                keep_tokens: len / 2,
                refresh_interval: 8,
            },
            HipStage {
                chunk_size: 1,
                keep_tokens: len / 8 - 32 - len / 32,
                refresh_interval: 1,
            },
        ],
        ..HipConfig::default()
    };
    let def = HipConfig::default();
    Ok(vec![
        cpu_twin_case::<bf16>(
            gpu,
            s(32, 8, 128)?,
            &def,
            16384,
            512,
            seed + 11,
            "default stages",
        )?,
        cpu_twin_case::<f16>(
            gpu,
            s(12, 3, 64)?,
            &d64c2(8192),
            8192,
            2048,
            seed + 13,
            "d64c2 stages",
        )?,
        cpu_twin_case::<bf16>(
            gpu,
            s(12, 3, 64)?,
            &d64c2(16384),
            16384,
            1000,
            seed + 14,
            "d64c2 stages",
        )?,
    ])
}

pub(crate) fn checks(gpu: &GpuContext, seed: u64) -> R<Vec<Check>> {
    let mut v = Vec::new();
    // The pass rule itself: NaN never passes, a worse error fails.
    v.push(Check {
        name: "hip fast estimator pass rule (NaN, ratio)".into(),
        ok: !within_ratio(f64::NAN, 1.0)
            && !within_ratio(1.0, f64::NAN)
            && !within_ratio(1.2, 1.0)
            && within_ratio(1.05, 1.0),
        detail: "NaN fails on either side; 1.2x fails; 1.05x passes".into(),
    });
    let s = |a, b, c| AttnShape::new(a, b, c).map_err(e);
    v.push(passages_case::<bf16>(
        gpu,
        s(32, 8, 128)?,
        32768,
        1024,
        seed + 1,
    )?);
    v.push(passages_case::<bf16>(
        gpu,
        s(32, 8, 128)?,
        65536,
        512,
        seed + 2,
    )?);
    v.push(passages_case::<f16>(
        gpu,
        s(16, 2, 256)?,
        24576,
        512,
        seed + 3,
    )?);
    v.push(passages_case::<bf16>(
        gpu,
        s(8, 8, 64)?,
        40000,
        777,
        seed + 4,
    )?);
    v.push(needle_case(gpu, 100_000, seed + 5)?);
    v.push(covering_case::<bf16>(gpu, s(32, 8, 128)?, seed + 6)?);
    v.push(covering_case::<f16>(gpu, s(16, 8, 128)?, seed + 7)?);
    v.push(engine_case(gpu, seed + 8)?);
    Ok(v)
}
