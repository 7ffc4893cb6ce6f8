//! `gpu-test --rope-only`: InfiniteHiP's RoPE modes on the GPU hip decode
//! (`HipGpuDecoder` + backend/cuda/rope_gpu.rs) vs the CPU `HipPolicy`
//! with the same modes, on fresh random inputs, stepping several sequences
//! of different lengths through stage refreshes:
//! - selections equal the CPU policy's (scoring at chunk_indexed /
//!   relative positions: the GPU rotates probed keys as the CPU does);
//! - streaming attention: the output against an f64 reference over the
//!   same selection whose keys are re-rotated as the GPU's gather stores
//!   them (f32 rotation, rounded to the cache dtype): bound
//!   `STORED_KV_BOUND`; the exact streaming reference (f32 keys, no
//!   rounding; `attend_streaming_f64`) and the CPU kernel's own error
//!   against it are printed beside it (the real cost of the rounding);
//! - one dropped token (the stored reference without one selected token)
//!   must miss the bound; the output is poisoned with NaN before each step
//!   and NaN never passes;
//! - a covering budget equals the CPU's dense streaming attention
//!   (`decode_with` without a selection) and `attend_streaming_f64`.
//!
//! Then the engine path's decode (gpu_rope_engine.rs) and the sparse
//! prefill with the modes (gpu_rope_prefill.rs: `HipGpuPrefill` and
//! `GpuAttention::prefill` past `max_position`, compiled, not run on a GPU).
//! Then the step time of the modes vs original positions at 128K and 1M
//! (Llama-3.1-8B heads, batch 1, device-random K/V).

use std::time::Instant;

use half::{bf16, f16};
use infinitehip::attention::reference::{attend_streaming_f64, softmax_values_f64};
use infinitehip::attention::{decode_with, rel_error, AttnShape};
use infinitehip::backend::cuda::dispatch::{DeviceKv, HipGpuDecoder};
use infinitehip::backend::cuda::{DevBuf, GpuContext};
use infinitehip::config::{HipConfig, HipStage, ModelShape, RopeConfig, RopeMode};
use infinitehip::kv::{KvPool, KvRead, SeqView};
use infinitehip::parallel::par_map;
use infinitehip::policy::hip::HipPolicy;
use infinitehip::policy::{Phase, Policy, SelectRequest, Selection};
use infinitehip::rng::Rng;
use infinitehip::rope::{streaming_key_shift, Rope};
use infinitehip::workload::{needle_seq, NeedleSeq};
use infinitehip::Element;

use crate::gpu::{e, ref_f64, Check, R, STORED_KV_BOUND};

fn stages(keep: [usize; 3]) -> Vec<HipStage> {
    vec![
        HipStage {
            chunk_size: 64,
            keep_tokens: keep[0],
            refresh_interval: 16,
        },
        HipStage {
            chunk_size: 16,
            keep_tokens: keep[1],
            refresh_interval: 8,
        },
        HipStage {
            chunk_size: 8,
            keep_tokens: keep[2],
            refresh_interval: 4,
        },
    ]
}

pub(crate) fn cfg(scoring: RopeMode, attention: RopeMode, keep: [usize; 3]) -> HipConfig {
    HipConfig {
        sink: 32,
        window: 256,
        stages: stages(keep),
        rope: RopeConfig { scoring, attention },
        ..HipConfig::default()
    }
}

/// f64 streaming attention with the query as stored and every selected key
/// rotated by `streaming_key_shift` in f32 (`Rope::rotate`) and rounded to
/// `T`: what the GPU gather stores. `drop`: leave out this selected token
/// of every list (a wrong selection the check must catch).
fn stream_ref_stored<T: Element>(
    shape: &AttnShape,
    rope: &Rope,
    q: &[f32],
    kv: &dyn KvRead,
    sel: &Selection,
    q_pos: usize,
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
            .filter(|&t| Some(t) != drop)
            .collect();
        let n = toks.len();
        let qh = &q[hq * d..(hq + 1) * d];
        let mut scores = Vec::with_capacity(n);
        for (rank, &t) in toks.iter().enumerate() {
            kv.read_key(h, t, &mut k);
            rope.rotate(&mut k, streaming_key_shift(q_pos, n, t, rank));
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

fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// The GPU side a case steps: the hip decoder over plugin-owned paged K/V
/// (`DecoderRoute`) or the engine path (`GpuAttention`, gpu_rope_engine.rs).
pub(crate) trait RopeRoute {
    /// Shown in the check's name.
    fn label(&self) -> &'static str;
    /// One decode step of every sequence (lengths `lens`, f32 queries
    /// `[b][q_elems]` at `qd`) into `out` (f32, same layout), waited for;
    /// returns each sequence's selection.
    fn step(
        &mut self,
        gpu: &GpuContext,
        shape: &AttnShape,
        lens: &[usize],
        qd: &DevBuf,
        out: &DevBuf,
    ) -> R<Vec<Selection>>;
}

/// Builds a case's route from its sequences (full length: `lens0 + steps`).
pub(crate) type MakeRoute<T> =
    fn(&GpuContext, &[NeedleSeq<T>], &AttnShape, &HipConfig, &ModelShape) -> R<Box<dyn RopeRoute>>;

struct DecoderRoute {
    dec: HipGpuDecoder,
    kv: DeviceKv,
}

impl RopeRoute for DecoderRoute {
    fn label(&self) -> &'static str {
        "HipGpuDecoder"
    }
    fn step(
        &mut self,
        gpu: &GpuContext,
        shape: &AttnShape,
        lens: &[usize],
        qd: &DevBuf,
        out: &DevBuf,
    ) -> R<Vec<Selection>> {
        self.kv.lens = lens.to_vec();
        self.dec
            .step(gpu, shape, &self.kv, qd.ptr, out.ptr, true)
            .map_err(e)?;
        gpu.synchronize().map_err(e)?;
        self.dec.selection_host(gpu).map_err(e)
    }
}

fn decoder_route<T: Element>(
    _gpu: &GpuContext,
    full: &[NeedleSeq<T>],
    shape: &AttnShape,
    hip: &HipConfig,
    model: &ModelShape,
) -> R<Box<dyn RopeRoute>> {
    let seqs: Vec<(&KvPool<T>, u64)> = full.iter().map(|s| (&s.pool, 0)).collect();
    let kv = DeviceKv::upload(&seqs).map_err(e)?;
    let mut dec = HipGpuDecoder::new(hip.clone(), shape, full.len()).map_err(e)?;
    dec.set_rope_model(model).map_err(e)?;
    Ok(Box::new(DecoderRoute { dec, kv }))
}

/// One case: `lens0` sequences stepping `steps` tokens through a GPU route
/// (`make`) and `HipPolicy` (same config and model).
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope_case<T: Element>(
    gpu: &GpuContext,
    make: MakeRoute<T>,
    shape: AttnShape,
    hip: HipConfig,
    max_position: usize,
    lens0: &[usize],
    steps: usize,
    covering: bool,
    seed: u64,
) -> R<Check> {
    let model = ModelShape {
        n_layers: 1,
        n_q_heads: shape.n_q_heads,
        n_kv_heads: shape.n_kv_heads,
        head_dim: shape.head_dim,
        rope_theta: 10000.0,
        max_position,
    };
    let rope = Rope::new(shape.head_dim, model.rope_theta);
    let streaming = hip.rope.attention == RopeMode::Streaming;
    let full: Vec<_> = lens0
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            needle_seq::<T>(
                shape,
                l + steps,
                64,
                hip.sink,
                hip.window,
                64,
                seed + i as u64,
            )
        })
        .collect::<Result<_, _>>()
        .map_err(e)?;
    let mut cpu: Vec<KvPool<T>> = Vec::new();
    for (ns, &l) in full.iter().zip(lens0) {
        let mut p = KvPool::new(ns.pool.layout(), None).map_err(e)?;
        p.add_sequence(0).map_err(e)?;
        let (k, v) = ns.pool.read(0, 0, l).map_err(e)?;
        p.append(0, &k, &v).map_err(e)?;
        cpu.push(p);
    }
    let mut route = make(gpu, &full, &shape, &hip, &model)?;
    let mut pols: Vec<HipPolicy> = (0..lens0.len())
        .map(|_| HipPolicy::new(hip.clone(), &model))
        .collect::<Result<_, _>>()
        .map_err(e)?;
    let mut rng = Rng::new(seed ^ 0x9e37);
    let qe = shape.q_elems();
    let qd = DevBuf::alloc(lens0.len() * qe * 4).map_err(e)?;
    let out = DevBuf::alloc(lens0.len() * qe * 4).map_err(e)?;
    let (mut mism, mut worst, mut exact, mut cpu_exact, mut dense_diff) =
        (0usize, 0f64, 0f64, 0f64, 0f64);
    let mut drop_err = f64::INFINITY;
    let mut first_diff = String::new();
    let mut finite = true;
    let mut attended = 0f64;
    for step in 0..steps {
        if step > 0 {
            for (b, p) in cpu.iter_mut().enumerate() {
                let t = lens0[b] + step - 1;
                let (k, v) = full[b].pool.read(0, t, t + 1).map_err(e)?;
                p.append(0, &k, &v).map_err(e)?;
            }
        }
        let lens: Vec<usize> = lens0.iter().map(|&l| l + step).collect();
        let q: Vec<f32> = full.iter().flat_map(|s| s.query(&mut rng)).collect();
        qd.write(&q).map_err(e)?;
        out.fill_bytes(0xff).map_err(e)?; // NaN: every element must be written
        let gsel = route.step(gpu, &shape, &lens, &qd, &out)?;
        let got: Vec<f32> = out.read(q.len()).map_err(e)?;
        finite &= got.iter().all(|x| x.is_finite());
        // Selections (the CPU policies step in order), then the references
        // of every sequence in parallel.
        let views: Vec<SeqView<'_, T>> = cpu
            .iter()
            .map(|p| p.view(0))
            .collect::<Result<_, _>>()
            .map_err(e)?;
        let mut csels = Vec::with_capacity(lens0.len());
        for b in 0..lens0.len() {
            let view = &views[b];
            let req = SelectRequest {
                seq: 0,
                shape,
                phase: Phase::Decode,
                queries: &q[b * qe..(b + 1) * qe],
                q_start: view.len() - 1,
                kv: view,
            };
            let csel = pols[b].select(&req).map_err(e)?.blocks.swap_remove(0);
            if csel != gsel[b] {
                mism += 1;
                if first_diff.is_empty() {
                    let h = (0..shape.n_kv_heads)
                        .find(|&h| csel.heads[h] != gsel[b].heads[h])
                        .unwrap_or(0);
                    first_diff = format!(
                        " (first: step {step} seq {b} head {h}: cpu {} ranges/{} tok, gpu {} ranges/{} tok)",
                        csel.heads[h].len(),
                        csel.token_count(h),
                        gsel[b].heads[h].len(),
                        gsel[b].token_count(h)
                    );
                }
            }
            attended += gsel[b].token_count(0) as f64 / view.len() as f64;
            csels.push(csel);
        }
        // The exact reference and the CPU kernel every 4th step and the last.
        let full_refs = step % 4 == 0 || step == steps - 1;
        let drop_tok: Vec<Option<usize>> = (0..lens0.len())
            .map(|b| {
                (streaming && step == steps - 1 && b == 0).then(|| {
                    let toks: Vec<usize> =
                        gsel[b].heads[0].iter().flat_map(|r| r.clone()).collect();
                    toks[rng.below(toks.len())]
                })
            })
            .collect();
        // Per sequence: (worst vs its reference, vs exact, cpu vs exact, vs cpu dense, dropped).
        let per: Vec<Result<[f64; 5], String>> = par_map(lens0.len(), |b| {
            let view = &views[b];
            let q_pos = view.len() - 1;
            let qb = &q[b * qe..(b + 1) * qe];
            let gb = &got[b * qe..(b + 1) * qe];
            let mut r = [0f64, 0.0, 0.0, 0.0, f64::INFINITY];
            if !streaming {
                r[0] = rel_error(gb, &ref_f64(&shape, qb, view, Some(&gsel[b])));
                return Ok(r);
            }
            r[0] = rel_error(
                gb,
                &stream_ref_stored::<T>(&shape, &rope, qb, view, &gsel[b], q_pos, None),
            );
            if full_refs {
                let ex = attend_streaming_f64(&shape, &rope, qb, view, &gsel[b], view.len(), q_pos);
                r[1] = rel_error(gb, &ex);
                let mut co = vec![0f32; qe];
                decode_with(
                    &shape,
                    qb,
                    std::slice::from_ref(view),
                    Some(std::slice::from_ref(&csels[b])),
                    Some(&rope),
                    &mut co,
                )
                .map_err(e)?;
                r[2] = rel_error(&co, &ex);
            }
            if covering {
                // The CPU's dense streaming attention (no selection).
                let mut dense = vec![0f32; qe];
                decode_with(
                    &shape,
                    qb,
                    std::slice::from_ref(view),
                    None,
                    Some(&rope),
                    &mut dense,
                )
                .map_err(e)?;
                let dd: Vec<f64> = dense.iter().map(|&x| x as f64).collect();
                r[3] = rel_error(gb, &dd);
                let full_sel = Selection::full(shape.n_kv_heads, view.len());
                let fx =
                    attend_streaming_f64(&shape, &rope, qb, view, &full_sel, view.len(), q_pos);
                r[1] = nan_max(r[1], rel_error(gb, &fx));
            }
            if let Some(t) = drop_tok[b] {
                let dr = stream_ref_stored::<T>(&shape, &rope, qb, view, &gsel[b], q_pos, Some(t));
                r[4] = rel_error(gb, &dr);
            }
            Ok(r)
        });
        for r in per {
            let r = r?;
            worst = nan_max(worst, r[0]);
            exact = nan_max(exact, r[1]);
            cpu_exact = nan_max(cpu_exact, r[2]);
            dense_diff = nan_max(dense_diff, r[3]);
            drop_err = drop_err.min(r[4]);
        }
    }
    attended /= (steps * lens0.len()) as f64;
    let modes = format!(
        "scoring {:?}, attention {:?}",
        hip.rope.scoring, hip.rope.attention
    );
    let name = format!(
        "{} hip decode RoPE modes ({modes}) == CPU HipPolicy, {}, lens {lens0:?}, max_position {max_position}, {steps} steps{}",
        route.label(),
        std::any::type_name::<T>().rsplit("::").next().unwrap_or("?"),
        if covering { ", covering budget" } else { "" }
    );
    let mut ok = mism == 0 && finite && worst <= STORED_KV_BOUND;
    let detail = if streaming {
        // A dropped token must miss the bound; with a covering budget the
        // output must equal the CPU's dense streaming attention too.
        ok &= drop_err > STORED_KV_BOUND;
        // Against the CPU kernel the bound is ours plus that kernel's own
        // measured error vs the exact reference (it rotates in f32 and is
        // tested to 1e-4 vs f64): 1.7e-5 apart at max_position 1024 on the
        // H200 while 2.6e-6 from exact. The tight check is `exact`.
        let dense_bound = STORED_KV_BOUND + cpu_exact;
        if covering {
            ok &= dense_diff <= dense_bound && exact <= STORED_KV_BOUND;
        }
        let dense = if covering {
            format!("; vs CPU dense streaming {dense_diff:.2e} (bound {dense_bound:.2e})")
        } else {
            String::new()
        };
        format!(
            "selection mismatches {mism}{first_diff}; rel_err vs stored-rotation f64 ref {worst:.2e} (bound {STORED_KV_BOUND:.0e}); one dropped token {drop_err:.2e} (must exceed); vs exact streaming ref {exact:.2e} (CPU kernel vs exact {cpu_exact:.2e}){dense}; attended {:.1}% of keys; all written+finite {finite}",
            attended * 100.0
        )
    } else {
        format!(
            "selection mismatches {mism}{first_diff}; attention rel_err vs f64 {worst:.2e} (bound {STORED_KV_BOUND:.0e}); attended {:.1}% of keys; all written+finite {finite}",
            attended * 100.0
        )
    };
    Ok(Check { name, ok, detail })
}

/// Mutations: the check's pieces must fail on a NaN and on a refused path.
fn refusals(gpu: &GpuContext) -> R<Vec<Check>> {
    let shape = AttnShape::new(8, 2, 64).map_err(e)?;
    let hip = cfg(
        RopeMode::ChunkIndexed,
        RopeMode::Streaming,
        [1024, 512, 256],
    );
    let mut out = Vec::new();
    // Paths without the modes (original positions only) refuse them.
    let v = HipGpuDecoder::validate(&hip)
        .err()
        .map(|x| x.to_string())
        .unwrap_or_default();
    out.push(Check {
        name: "RoPE modes: the original-positions validation refuses them".into(),
        ok: v.contains("hip.rope"),
        detail: v,
    });
    // Without the model's RoPE the decoder refuses to step.
    let ns = needle_seq::<bf16>(shape, 2000, 64, 32, 256, 64, 5).map_err(e)?;
    let kv = DeviceKv::upload(&[(&ns.pool, 0)]).map_err(e)?;
    let mut dec = HipGpuDecoder::new(hip, &shape, 1).map_err(e)?;
    let qd = DevBuf::alloc(shape.q_elems() * 4).map_err(e)?;
    let o = DevBuf::alloc(shape.q_elems() * 4).map_err(e)?;
    let r = dec
        .step(gpu, &shape, &kv, qd.ptr, o.ptr, true)
        .err()
        .map(|x| x.to_string())
        .unwrap_or_default();
    out.push(Check {
        name: "RoPE modes: a decoder without set_rope_model refuses to step".into(),
        ok: r.contains("set_rope_model"),
        detail: r,
    });
    // NaN never passes the error measure the checks use.
    let nan = rel_error(&[1.0, f32::NAN], &[1.0, 2.0]);
    out.push(Check {
        name: "RoPE checks: a NaN output fails the bound".into(),
        ok: !matches!(
            nan.partial_cmp(&STORED_KV_BOUND),
            Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
        ),
        detail: format!("rel_err with a NaN element: {nan}"),
    });
    Ok(out)
}

pub(crate) fn checks(gpu: &GpuContext, seed: u64) -> R<Vec<Check>> {
    use RopeMode::*;
    let t0 = Instant::now();
    let mut c = Progress(Vec::new(), t0);
    c.extend(refusals(gpu)?);
    let llama = AttnShape::new(32, 8, 128).map_err(e)?;
    let small = AttnShape::new(8, 2, 64).map_err(e)?;
    let keep = [1024, 512, 256];
    c.push(rope_case::<bf16>(
        gpu,
        decoder_route::<bf16>,
        llama,
        cfg(ChunkIndexed, Streaming, keep),
        8192,
        &[20000, 7001, 3000],
        17,
        false,
        seed + 1,
    )?);
    c.push(rope_case::<f16>(
        gpu,
        decoder_route::<f16>,
        small,
        cfg(Relative, Streaming, keep),
        8192,
        &[20000, 9000, 5000],
        17,
        false,
        seed + 2,
    )?);
    c.push(rope_case::<bf16>(
        gpu,
        decoder_route::<bf16>,
        small,
        cfg(Relative, Original, keep),
        4096,
        &[12000, 3000],
        9,
        false,
        seed + 3,
    )?);
    c.push(rope_case::<bf16>(
        gpu,
        decoder_route::<bf16>,
        small,
        cfg(ChunkIndexed, Original, keep),
        4096,
        &[9000, 2500],
        9,
        false,
        seed + 4,
    )?);
    c.push(rope_case::<bf16>(
        gpu,
        decoder_route::<bf16>,
        llama,
        cfg(Original, Streaming, keep),
        8192,
        &[15000, 4000],
        9,
        false,
        seed + 5,
    )?);
    // Covering budget: every token selected.
    let cover = [8192, 8192, 8192];
    c.push(rope_case::<bf16>(
        gpu,
        decoder_route::<bf16>,
        llama,
        cfg(ChunkIndexed, Streaming, cover),
        1024,
        &[3000, 1500],
        5,
        true,
        seed + 6,
    )?);
    // The engine path (GpuAttention over a token-major pool).
    crate::gpu_rope_engine::checks(gpu, seed + 100, &mut c)?;
    // The sparse prefill (HipGpuPrefill, and GpuAttention past max_position).
    crate::gpu_rope_prefill::checks(gpu, seed + 200, &mut c)?;
    Ok(c.0)
}

/// Checks collected with a progress line on stderr each (a run cut short
/// still shows how far it got).
pub(crate) struct Progress(Vec<Check>, Instant);

impl Progress {
    pub(crate) fn push(&mut self, c: Check) {
        eprintln!(
            "[{:.1} s] {} {}",
            self.1.elapsed().as_secs_f64(),
            if c.ok { "pass" } else { "fail" },
            c.name
        );
        self.0.push(c);
    }
    pub(crate) fn extend(&mut self, cs: Vec<Check>) {
        cs.into_iter().for_each(|c| self.push(c));
    }
}

/// Mean decode step (selection + attention, host steps, 64 steps: every
/// refresh phase) of original positions vs the RoPE modes, Llama-3.1-8B
/// heads, batch 1, paper stages (HipConfig::default), device-random K/V.
pub(crate) fn timing(gpu: &GpuContext, lens: &[usize]) -> R<()> {
    use RopeMode::*;
    if lens.is_empty() {
        return Ok(());
    }
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    println!("rope timing: mean host step (64 steps after 16 warm-up), batch 1, 32 q / 8 kv heads, d128, bf16, paper stages; max_position 32768");
    println!(
        "{:>9} {:>26} {:>12} {:>10}",
        "tokens", "modes", "us/step", "vs orig"
    );
    for &len in lens {
        let mut kv = infinitehip::backend::cuda::dense_decode::random_device_kv(
            gpu,
            1,
            len + 80,
            8,
            128,
            infinitehip::DType::Bf16,
            64,
            7,
        )
        .map_err(e)?;
        let model = ModelShape {
            n_layers: 1,
            n_q_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            rope_theta: 500000.0,
            max_position: 32768,
        };
        let mut rng = Rng::new(11);
        let q: Vec<f32> = rng.normal_vec(shape.q_elems(), 1.0);
        let qd = DevBuf::from_slice(&q).map_err(e)?;
        let out = DevBuf::alloc(q.len() * 4).map_err(e)?;
        let mut base = 0f64;
        for (s, a) in [
            (Original, Original),
            (ChunkIndexed, Original),
            (Relative, Original),
            (Original, Streaming),
            (ChunkIndexed, Streaming),
            (Relative, Streaming),
        ] {
            let hip = HipConfig {
                rope: RopeConfig {
                    scoring: s,
                    attention: a,
                },
                ..HipConfig::default()
            };
            let mut dec = HipGpuDecoder::new(hip, &shape, 1).map_err(e)?;
            dec.set_rope_model(&model).map_err(e)?;
            let mut t = 0f64;
            for i in 0..80 {
                kv.lens = vec![len + i];
                if i == 16 {
                    gpu.synchronize().map_err(e)?;
                }
                let t0 = Instant::now();
                dec.step(gpu, &shape, &kv, qd.ptr, out.ptr, true)
                    .map_err(e)?;
                if i >= 16 {
                    gpu.synchronize().map_err(e)?;
                    t += t0.elapsed().as_secs_f64();
                }
            }
            let got: Vec<f32> = out.read(q.len()).map_err(e)?;
            if !got.iter().all(|x| x.is_finite()) {
                return Err(format!("rope timing {len} {s:?}/{a:?}: non-finite output"));
            }
            let us = t / 64.0 * 1e6;
            if s == Original && a == Original {
                base = us;
            }
            println!(
                "{len:>9} {:>26} {us:>12.1} {:>9.2}x",
                format!("{s:?}/{a:?}"),
                us / base
            );
        }
    }
    crate::gpu_rope_engine::timing(gpu, lens)
}
