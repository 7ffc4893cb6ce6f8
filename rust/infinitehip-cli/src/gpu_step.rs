//! The graph-capturable hip decode step (`backend::cuda::hip_step`):
//! gpu-test checks (device metadata == host metadata selections, graph
//! replay == eager bit for bit, over growing lengths and refresh steps, a
//! forced refresh after a jump) and the per-layer profile that
//! `bench-gpu-model` prints.

use std::time::Instant;

use half::bf16;
use infinitehip::attention::{rel_error, AttnShape};
use infinitehip::backend::cuda::dispatch::{self, DeviceKv, HipGpuDecoder};
use infinitehip::backend::cuda::{dense_decode, hip_step, pdl, DevBuf, GpuContext};
use infinitehip::config::HipConfig;
use infinitehip::kv::KvPool;
use infinitehip::policy::Selection;
use infinitehip::rng::Rng;
use infinitehip::workload::needle_seq;

use crate::gpu::{e, ref_f64, Check, R, STORED_KV_BOUND};
use crate::gpu_dense::DENSE_BOUND;

/// The checks `gpu-test` runs.
pub(crate) fn checks(gpu: &GpuContext, seed: u64) -> R<Vec<Check>> {
    Ok(vec![
        topk_case(gpu, seed + 3)?,
        step_case(gpu, &[40_000, 13_001, 5_000], 22, seed + 1, false)?,
        step_case(gpu, &[3_000], 10, seed + 2, false)?,
        step_case(gpu, &[70_000, 66_000], 10, seed + 4, true)?,
        mean_key_step_case(gpu, &[40_000, 13_001, 5_000], 22, seed + 5)?,
    ])
}

/// `step_case` with `hip.decode_stage0 = mean_key` (stage 0 by cached
/// chunk means): host steps, eager device steps and graph replays agree,
/// including the jump (a fresh host decoder vs decoders whose means were
/// cached over the earlier steps).
fn mean_key_step_case(gpu: &GpuContext, lens0: &[usize], steps: usize, seed: u64) -> R<Check> {
    let cfg = HipConfig {
        decode_stage0: infinitehip::config::DecodeStage0::MeanKey,
        ..HipConfig::default()
    };
    let mut c = step_case_in(gpu, lens0, steps, seed, &cfg)?;
    c.name = format!("{} [decode_stage0 mean_key]", c.name);
    Ok(c)
}

/// The reference launch mode of the step checks' plain twins: plain
/// launches (no PDL), the plain warp scorer and one-CTA top-k (`on`), or
/// back to the defaults.
fn reference_mode(on: bool, pdl_default: bool) {
    pdl::set_pdl(if on { false } else { pdl_default });
    dispatch::set_score_pipe(!on && dispatch_default_pipe());
    dispatch::set_topk_mc(!on && dispatch_default_mc());
}

fn dispatch_default_pipe() -> bool {
    std::env::var("INFINITEHIP_SCORE_PIPE").map_or(true, |v| v != "0")
}

fn dispatch_default_mc() -> bool {
    std::env::var("INFINITEHIP_TOPK_MC").map_or(true, |v| v != "0")
}

/// The CPU's order-preserving key of a score (kernels/hip_mask.cu score_key).
fn score_key(f: f32) -> u32 {
    let f = if f.is_nan() { f32::NEG_INFINITY } else { f };
    let u = f.to_bits();
    if u & 0x8000_0000 != 0 {
        !u
    } else {
        u | 0x8000_0000
    }
}

/// hip_topk vs a sort on the host: rows of random keys (continuous, or
/// rounded to a few dozen values so the threshold ties; some invalid
/// slots), n_sub from 7 to 40,000, k below and above the valid count. The
/// kept slot sets must be equal (best k, ties: the earlier slot).
fn topk_case(gpu: &GpuContext, seed: u64) -> R<Check> {
    let mut rng = Rng::new(seed);
    let cases: [(usize, usize, usize, bool, f32); 12] = [
        (8, 16_384, 128, true, 0.0),
        (8, 16_384, 128, true, 0.5),
        (8, 2_048, 128, false, 0.0),
        (1, 1_025, 128, false, 0.95),
        (2, 5_000, 128, true, 0.97),
        (8, 16_384, 128, false, 0.0),
        (8, 512, 256, false, 0.0),
        (8, 512, 256, true, 0.1),
        (3, 3_125, 128, true, 0.2),
        (2, 40_000, 1_000, false, 0.05),
        (4, 100, 200, false, 0.3),
        (2, 7, 3, true, 0.0),
    ];
    let (mut mismatched, mut total, mut mc_runs, mut mc_wrong) = (0usize, 0usize, 0usize, 0usize);
    let mut first = String::new();
    for &(rows, n_sub, k, ties, invalid) in &cases {
        let keys: Vec<u32> = (0..rows * n_sub)
            .map(|_| {
                let x = rng.normal();
                if rng.uniform() < invalid {
                    0
                } else {
                    score_key(if ties { (x * 4.0).round() } else { x * 100.0 })
                }
            })
            .collect();
        for multi in [false, true] {
            let (got, ran_mc) =
                dispatch::topk_slots(gpu, &keys, rows, n_sub, k, multi).map_err(e)?;
            mc_runs += usize::from(ran_mc);
            // hip_topk_mc runs exactly where a row spans two segments or more.
            if ran_mc != (multi && n_sub > 1024.max(8 * k).next_multiple_of(1024)) {
                mc_wrong += 1;
            }
            for r in 0..rows {
                let row = &keys[r * n_sub..(r + 1) * n_sub];
                let mut v: Vec<usize> = (0..n_sub).filter(|&i| row[i] != 0).collect();
                v.sort_by(|&a, &b| row[b].cmp(&row[a]).then(a.cmp(&b)));
                v.truncate(k);
                v.sort();
                total += 1;
                if v != got[r] {
                    mismatched += 1;
                    if first.is_empty() {
                        first = format!(
                            "(first: n_sub {n_sub} k {k} ties {ties} multi-CTA {ran_mc} row {r}: want {} slots, got {})",
                            v.len(),
                            got[r].len()
                        );
                    }
                }
            }
        }
    }
    Ok(Check {
        name:
            "hip_topk == hip_topk_mc (multi-CTA) == host sort (n_sub 7..40000, ties, invalid slots)"
                .into(),
        ok: mismatched == 0 && total > 0 && mc_runs == 8 && mc_wrong == 0,
        detail: format!(
            "rows with a different kept set: {mismatched} of {total} (both kernels); \
             launches through hip_topk_mc {mc_runs}, path not the expected one {mc_wrong} {first}"
        ),
    })
}

fn bits_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// `steps` decode steps, one token appended per step, except the last,
/// which jumps 300 tokens (past the slid cap: the device forces a full
/// refresh there, compared with a fresh decoder's first step). Three
/// decoders on one stream: host metadata (`step`, the reference), device
/// metadata eager (`step_device`) and the same captured once in a CUDA
/// graph and replayed every step. `force_new`: stage 0 through the
/// pipelined one-lane scorer and the multi-CTA top-k even at these lengths
/// (4-lane scoring off, `hip_topk_mc` from 2 segments), so that the plain
/// twins (reference kernels) compare them inside whole steps.
fn step_case(
    gpu0: &GpuContext,
    lens0: &[usize],
    steps: usize,
    seed: u64,
    force_new: bool,
) -> R<Check> {
    if force_new {
        dispatch::set_score4_max(Some(0));
        dispatch::set_topk_mc_min_segs(Some(2));
    }
    let r = step_case_in(gpu0, lens0, steps, seed, &HipConfig::default());
    if force_new {
        dispatch::set_score4_max(None);
        dispatch::set_topk_mc_min_segs(None);
    }
    let mut c = r?;
    if force_new {
        c.name = format!(
            "{} [stage 0: hip_scorewp one lane, hip_topk_mc from 2 segments]",
            c.name
        );
    }
    Ok(c)
}

fn step_case_in(
    gpu0: &GpuContext,
    lens0: &[usize],
    steps: usize,
    seed: u64,
    cfg: &HipConfig,
) -> R<Check> {
    let gpu = &gpu0.with_new_stream().map_err(e)?;
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let cfg = cfg.clone();
    let jump = 300;
    let nb = lens0.len();
    let full: Vec<_> = lens0
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            needle_seq::<bf16>(
                shape,
                l + steps + jump,
                64,
                cfg.sink,
                cfg.window,
                64,
                seed + i as u64,
            )
        })
        .collect::<Result<_, _>>()
        .map_err(e)?;
    let seqs: Vec<(&KvPool<bf16>, u64)> = full.iter().map(|s| (&s.pool, 0)).collect();
    let mut kv = DeviceKv::upload(&seqs).map_err(e)?;
    let qe = shape.q_elems();
    let qd = DevBuf::alloc(nb * qe * 4).map_err(e)?;
    let lens_dev = DevBuf::alloc(nb * 4).map_err(e)?;
    let outs: Vec<DevBuf> = (0..9)
        .map(|_| DevBuf::alloc(nb * qe * 4))
        .collect::<Result<_, _>>()
        .map_err(e)?;
    let new_dec = || HipGpuDecoder::new(cfg.clone(), &shape, nb).map_err(e);
    let (mut host, mut eager, mut graphed) = (new_dec()?, new_dec()?, new_dec()?);
    // The sparse v2 attention (kernels/decode_dense_v2.cu hip_sparse_*),
    // full host steps, and lean steps (no assembly when nothing refreshed)
    // on the host and the device, whatever the default attention.
    let new_sparse = |lean: bool| -> R<HipGpuDecoder> {
        let mut d = new_dec()?;
        d.set_attention(Some(dispatch::HipAttention::SparseV2));
        d.set_lean(lean);
        Ok(d)
    };
    let (mut host_sparse, mut host_lean, mut eager_lean) =
        (new_sparse(false)?, new_sparse(true)?, new_sparse(true)?);
    let set_lens = |kv: &mut DeviceKv, lens: &[usize]| -> R<()> {
        kv.lens = lens.to_vec();
        let l32: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        lens_dev.write(&l32).map_err(e)
    };
    set_lens(&mut kv, lens0)?;
    eager.prepare_device_steps(&kv).map_err(e)?;
    graphed.prepare_device_steps(&kv).map_err(e)?;
    eager_lean.prepare_device_steps(&kv).map_err(e)?;
    let bound = eager.device_max_tokens().unwrap();
    // Warm step (grows the attention workspace), then a fresh cycle.
    qd.write(&vec![0.5f32; nb * qe]).map_err(e)?;
    graphed
        .step_device(gpu, &shape, &kv, lens_dev.ptr, qd.ptr, outs[2].ptr)
        .map_err(e)?;
    graphed.reset_device(gpu).map_err(e)?;
    gpu.synchronize().map_err(e)?;
    let graph = hip_step::capture(gpu, || {
        graphed.step_device(gpu, &shape, &kv, lens_dev.ptr, qd.ptr, outs[2].ptr)
    })
    .map_err(e)?;
    // The reference twins of programmatic dependent launch (pdl.rs): the
    // host step, the eager device step and the graph, launched plainly
    // (outs 6, 7, 8), must equal the PDL launches bit for bit.
    let pdl_on = pdl::pdl_enabled() && gpu.arch_number() >= 90;
    let pdl_default = pdl::pdl_enabled();
    let (mut host_plain, mut eager_plain, mut graphed_plain) = (new_dec()?, new_dec()?, new_dec()?);
    eager_plain.prepare_device_steps(&kv).map_err(e)?;
    graphed_plain.prepare_device_steps(&kv).map_err(e)?;
    reference_mode(true, pdl_default);
    graphed_plain
        .step_device(gpu, &shape, &kv, lens_dev.ptr, qd.ptr, outs[8].ptr)
        .map_err(e)?;
    graphed_plain.reset_device(gpu).map_err(e)?;
    gpu.synchronize().map_err(e)?;
    let graph_plain = hip_step::capture(gpu, || {
        graphed_plain.step_device(gpu, &shape, &kv, lens_dev.ptr, qd.ptr, outs[8].ptr)
    });
    reference_mode(false, pdl_default);
    let graph_plain = graph_plain.map_err(e)?;
    let mut pdl_mismatch = 0usize;
    let mut rng = Rng::new(seed ^ 0x57e9);
    let (mut sel_mismatch, mut graph_mismatch, mut worst, mut host_vs_dev) = (0, 0, 0f64, 0f64);
    let (mut over_bound, mut finite, mut drop_err) = (0, true, f64::INFINITY);
    let (mut lean_mismatch, mut lean_steps) = (0, 0);
    let (mut stale_seen, mut lean_sel_mismatch) = (0usize, 0usize);
    let mut graph_out_mismatch = 0usize;
    // Lean steps are the default: `host`, `eager` and `graphed` take them.
    let lean_default = host.lean_active();
    let (mut sparse_worst, mut lean_dev, mut sparse_drop) = (0f64, 0f64, f64::INFINITY);
    let mut first_diff = String::new();
    for step in 0..steps {
        let last = step + 1 == steps;
        let lens: Vec<usize> = lens0
            .iter()
            .map(|&l| l + step + if last { jump } else { 0 })
            .collect();
        set_lens(&mut kv, &lens)?;
        let q: Vec<f32> = full.iter().flat_map(|s| s.query(&mut rng)).collect();
        qd.write(&q).map_err(e)?;
        for o in &outs {
            o.fill_bytes(0xff).map_err(e)?; // NaN poison
        }
        // The reference at the jump: a fresh decoder's first (full) step.
        if last {
            host = new_dec()?;
            host_sparse = new_sparse(false)?;
            host_lean = new_sparse(true)?;
            host_plain = new_dec()?;
        }
        host.step(gpu, &shape, &kv, qd.ptr, outs[0].ptr, true)
            .map_err(e)?;
        eager
            .step_device(gpu, &shape, &kv, lens_dev.ptr, qd.ptr, outs[1].ptr)
            .map_err(e)?;
        graph.launch().map_err(e)?;
        host_sparse
            .step(gpu, &shape, &kv, qd.ptr, outs[3].ptr, true)
            .map_err(e)?;
        host_lean
            .step(gpu, &shape, &kv, qd.ptr, outs[4].ptr, true)
            .map_err(e)?;
        eager_lean
            .step_device(gpu, &shape, &kv, lens_dev.ptr, qd.ptr, outs[5].ptr)
            .map_err(e)?;
        reference_mode(true, pdl_default);
        let plain = (|| -> R<()> {
            host_plain
                .step(gpu, &shape, &kv, qd.ptr, outs[6].ptr, true)
                .map_err(e)?;
            eager_plain
                .step_device(gpu, &shape, &kv, lens_dev.ptr, qd.ptr, outs[7].ptr)
                .map_err(e)?;
            graph_plain.launch().map_err(e)
        })();
        reference_mode(false, pdl_default);
        plain?;
        gpu.synchronize().map_err(e)?;
        // What a reader of the lean decoder's selection buffer would see
        // without `selection()`: stale slid/window ranges on lean steps.
        let left = host_lean.selection_as_left().to_host(8).map_err(e)?;
        let mut sels: Vec<Vec<Selection>> = Vec::new();
        for d in [
            &mut host,
            &mut eager,
            &mut graphed,
            &mut host_sparse,
            &mut host_lean,
            &mut eager_lean,
            &mut host_plain,
            &mut eager_plain,
            &mut graphed_plain,
        ] {
            sels.push(d.selection_host(gpu).map_err(e)?);
        }
        // sels[3] is the full (non-lean) host step: the reference.
        stale_seen += usize::from(left != sels[3]);
        lean_sel_mismatch += [0, 1, 2, 4, 5]
            .iter()
            .filter(|&&i| sels[i] != sels[3])
            .count();
        let got: Vec<Vec<f32>> = outs
            .iter()
            .map(|o| o.read(nb * qe))
            .collect::<Result<_, _>>()
            .map_err(e)?;
        finite &= got.iter().all(|o| o.iter().all(|x| x.is_finite()));
        // PDL launches (host, eager device, graph) vs the plain ones.
        pdl_mismatch += [(0, 6), (1, 7), (2, 8)]
            .iter()
            .filter(|&&(a, b)| sels[a] != sels[b] || !bits_equal(&got[a], &got[b]))
            .count();
        if sels[0] != sels[1] {
            sel_mismatch += 1;
            if first_diff.is_empty() {
                first_diff = format!("first at step {step}");
            }
        }
        if sels[1] != sels[2] || !bits_equal(&got[1], &got[2]) {
            graph_mismatch += 1;
            graph_out_mismatch += usize::from(!bits_equal(&got[1], &got[2]));
        }
        lean_steps += 1;
        if sels[3] != sels[0] || !bits_equal(&got[3], &got[4]) {
            lean_mismatch += 1;
        }
        for b in 0..nb {
            let s = &sels[1][b];
            over_bound += (0..8).filter(|&h| s.token_count(h) > bound).count();
            let view = full[b].pool.view(0).map_err(e)?;
            let qb = &q[b * qe..(b + 1) * qe];
            let r = ref_f64(&shape, qb, &view, Some(s));
            worst = nan_max(worst, rel_error(&got[1][b * qe..(b + 1) * qe], &r));
            let r32: Vec<f64> = got[0][b * qe..(b + 1) * qe]
                .iter()
                .map(|&x| x as f64)
                .collect();
            host_vs_dev = nan_max(host_vs_dev, rel_error(&got[1][b * qe..(b + 1) * qe], &r32));
            // Sparse v2 (host step) vs f64; the lean device step vs it
            // (another split count: equal to f32 rounding).
            let sp = &got[3][b * qe..(b + 1) * qe];
            sparse_worst = nan_max(sparse_worst, rel_error(sp, &r));
            let sp64: Vec<f64> = sp.iter().map(|&x| x as f64).collect();
            lean_dev = nan_max(lean_dev, rel_error(&got[5][b * qe..(b + 1) * qe], &sp64));
            if last && b == 0 {
                // Dropping head 0's highest-scoring selected token (q head 0)
                // must move the output past the bound.
                let mut top = (f32::NEG_INFINITY, 0usize);
                for r in &s.heads[0] {
                    for t in r.clone() {
                        let (k, _) = full[b].pool.read(0, t, t + 1).map_err(e)?;
                        let sc: f32 = (0..shape.head_dim).map(|i| qb[i] * k[i].to_f32()).sum();
                        if sc > top.0 {
                            top = (sc, t);
                        }
                    }
                }
                let t = top.1;
                let mut heads = s.heads.clone();
                heads[0] = s.heads[0]
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
                let sd = Selection::from_ranges(heads);
                let rd = ref_f64(&shape, qb, &view, Some(&sd));
                drop_err = rel_error(&got[1][..qe], &rd);
                sparse_drop = rel_error(&got[3][..qe], &rd);
            }
        }
    }
    let ok = sel_mismatch == 0
        && pdl_mismatch == 0
        && graph_mismatch == 0
        && lean_mismatch == 0
        && lean_sel_mismatch == 0
        && stale_seen > 0
        && over_bound == 0
        && finite
        && worst <= STORED_KV_BOUND
        && host_vs_dev <= STORED_KV_BOUND
        && drop_err > STORED_KV_BOUND
        && sparse_worst <= DENSE_BOUND
        && lean_dev <= DENSE_BOUND
        && sparse_drop > DENSE_BOUND;
    Ok(Check {
        name: format!(
            "hip device step (graph-capturable): lens {lens0:?}, {steps} steps (refresh cycle, last +{jump} forces a refresh)"
        ),
        ok,
        detail: format!(
            "programmatic dependent launch {pdl_on}: PDL launches (default stage kernels) != plain launches with hip_scorew + hip_topk (host step, eager device step, graph replay; selection or output bits): {pdl_mismatch}; \
             selections != host-metadata step: {sel_mismatch} {first_diff}; graph replay != eager (selection or output bits): {graph_mismatch} (output bits: {graph_out_mismatch}); \
             sparse v2: rel_err vs f64 {sparse_worst:.2e}, lean device step vs host {lean_dev:.2e} (bound {DENSE_BOUND:.0e}), one dropped token {sparse_drop:.2e} (must exceed), \
             lean host step != full host step (selection or output bits; {lean_steps} steps): {lean_mismatch}; \
             lean steps the default: {lean_default}; selections read through selection() != the full host step's: {lean_sel_mismatch}; \
             steps where the lean buffer as left was stale (must be > 0, else the check sees nothing): {stale_seen}; \
             rel_err vs f64 {worst:.2e}, vs host step {host_vs_dev:.2e} (bound {STORED_KV_BOUND:.0e}); one dropped token {drop_err:.2e} (must exceed); \
             rows over the {bound}-token bound {over_bound}; all written+finite {finite}"
        ),
    })
}

/// Where one hip layer's decode step goes at `tokens` x `batch` (random
/// K/V already on the device): per-step device time over a refresh cycle,
/// host metadata (`step`) vs device metadata eager vs the device step
/// replayed from a graph, the attention launch alone, and the host time to
/// enqueue one step. Printed as a table; returned as JSON.
pub(crate) fn profile_layer(
    gpu: &GpuContext,
    cfg: &HipConfig,
    shape: &AttnShape,
    kv: &DeviceKv,
    lens_dev: &DevBuf,
    q: u64,
    out: u64,
    reps: usize,
) -> R<serde_json::Value> {
    let b = kv.batch();
    let cycle = cfg
        .stages
        .iter()
        .map(|s| s.refresh_interval)
        .max()
        .unwrap_or(1);
    let mut host = HipGpuDecoder::new(cfg.clone(), shape, b).map_err(e)?;
    host.step(gpu, shape, kv, q, out, true).map_err(e)?;
    let mut dev = HipGpuDecoder::new(cfg.clone(), shape, b).map_err(e)?;
    dev.prepare_device_steps(kv).map_err(e)?;
    dev.step_device(gpu, shape, kv, lens_dev.ptr, q, out)
        .map_err(e)?;
    gpu.synchronize().map_err(e)?;
    let graph = hip_step::capture(gpu, || {
        dev.step_device(gpu, shape, kv, lens_dev.ptr, q, out)
    })
    .map_err(e)?;
    let per_step = |f: &mut dyn FnMut(Option<usize>) -> R<()>| cycle_times(gpu, cycle, reps, f);
    let kvr: &DeviceKv = kv;
    let t_host = per_step(&mut |i| match i {
        None => {
            host.restart_cycle();
            Ok(())
        }
        Some(_) => host
            .step(gpu, shape, kvr, q, out, false)
            .map(drop)
            .map_err(e),
    })?;
    let t_eager = per_step(&mut |i| match i {
        None => dev.restart_device_cycle(gpu).map_err(e),
        Some(_) => dev
            .step_device(gpu, shape, kvr, lens_dev.ptr, q, out)
            .map_err(e),
    })?;
    let t_graph = per_step(&mut |i| match i {
        None => dev.restart_device_cycle(gpu).map_err(e),
        Some(_) => graph.launch().map_err(e),
    })?;
    let dref = &mut dev;
    // Attention launch alone over the last selection, at the device bound.
    let mt = dref.device_max_tokens().unwrap();
    let mut ws = dispatch::DecodeWorkspace::new();
    let dsel = dref.selection(gpu).map_err(e)?;
    let attn = crate::gpu::time_ms(gpu, reps * 4, || {
        dispatch::decode(gpu, &mut ws, shape, kvr, q, dsel, mt, None, out).map_err(e)
    })?;
    // The sparse v2 kernel over the same selection (tokens per split, chunks
    // per iteration; 0/0: the defaults), same bound.
    let mut v2 = Vec::new();
    let was = dispatch::attention();
    dispatch::force_attention(dispatch::HipAttention::SparseV2);
    for (split, u) in [
        (0, 0),
        (128, 2),
        (256, 2),
        (512, 2),
        (64, 1),
        (128, 1),
        (256, 1),
    ] {
        dense_decode::set_sparse_tuning(split, u);
        let ms = crate::gpu::time_ms(gpu, reps * 4, || {
            dref.attend(gpu, shape, kvr, q, mt, out).map_err(e)
        })?;
        v2.push(serde_json::json!({"split": split, "chunks": u, "ms": ms}));
    }
    dense_decode::set_sparse_tuning(0, 0);
    dispatch::force_attention(was);
    // Host time to enqueue one eager device step (no sync inside).
    gpu.synchronize().map_err(e)?;
    let n = 200;
    let t0 = Instant::now();
    for _ in 0..n {
        dref.step_device(gpu, shape, kvr, lens_dev.ptr, q, out)
            .map_err(e)?;
    }
    let enqueue_us = t0.elapsed().as_secs_f64() * 1e6 / n as f64;
    gpu.synchronize().map_err(e)?;
    let amort = |t: &[f64]| t.iter().sum::<f64>() / t.len() as f64;
    let quiet = |t: &[f64]| {
        let mut v: Vec<f64> = (1..t.len()).filter(|i| i % 4 != 0).map(|i| t[i]).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    println!(
        "\nhip layer profile, {} tokens x batch {b} (us; refresh cycle {cycle} steps: step 0 all stages, 8 from stage 1, 4/12 from stage 2)",
        kvr.lens[0]
    );
    println!("| path | step 0 | step 8 | step 4 | no-refresh step (median) | amortised |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, t) in [
        ("host metadata (`step`)", &t_host),
        ("device metadata, eager", &t_eager),
        ("device metadata, CUDA graph", &t_graph),
    ] {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            t[0] * 1e3,
            t[8.min(cycle - 1)] * 1e3,
            t[4.min(cycle - 1)] * 1e3,
            quiet(t) * 1e3,
            amort(t) * 1e3
        );
    }
    println!(
        "attention launch alone (split-K + combine, {mt}-token bound): {:.1} us; host enqueue of one eager device step: {enqueue_us:.1} us",
        attn * 1e3
    );
    println!(
        "attention sparse v2 alone (split tokens/chunks: us): {}",
        v2.iter()
            .map(|x| format!(
                "{}/{}: {:.1}",
                x["split"],
                x["chunks"],
                x["ms"].as_f64().unwrap() * 1e3
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(serde_json::json!({
        "tokens": kvr.lens[0], "batch": b, "cycle": cycle,
        "host_step_ms": t_host, "device_eager_step_ms": t_eager, "device_graph_step_ms": t_graph,
        "attention_only_ms": attn, "attention_sparse_v2_ms": v2, "enqueue_eager_us": enqueue_us, "max_tokens_bound": mt,
    }))
}

/// Per step-of-cycle device times (ms, median over `reps` cycles after one
/// warm-up cycle), timed with events between steps: `f(None)` resets the
/// refresh cycle (outside the timed region), `f(Some(i))` enqueues step i.
pub(crate) fn cycle_times(
    gpu: &GpuContext,
    cycle: usize,
    reps: usize,
    f: &mut dyn FnMut(Option<usize>) -> R<()>,
) -> R<Vec<f64>> {
    let mut t = vec![Vec::new(); cycle];
    for _ in 0..reps + 1 {
        f(None)?;
        let evs: Vec<_> = (0..=cycle)
            .map(|_| {
                gpu.ctx.new_event(Some(
                    infinitehip::backend::cuda::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT,
                ))
            })
            .collect::<Result<_, _>>()
            .map_err(e)?;
        evs[0].record(&gpu.stream).map_err(e)?;
        for (i, ev) in evs[1..].iter().enumerate() {
            f(Some(i))?;
            ev.record(&gpu.stream).map_err(e)?;
        }
        evs[cycle].synchronize().map_err(e)?;
        for i in 0..cycle {
            t[i].push(evs[i].elapsed_ms(&evs[i + 1]).map_err(e)? as f64);
        }
    }
    Ok(t.into_iter()
        .map(|mut v| {
            v.remove(0); // warm-up cycle
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v[v.len() / 2]
        })
        .collect())
}

/// Device time per launch kind over one refresh cycle: `f(Reset)` restarts
/// the cycle; for each step i, `f(Cushion)` first queues enough device work
/// (unmarked) that the host stays ahead, then `f(Step(i))` runs with
/// `backend::cuda::prof` marks after every launch; the time between
/// consecutive marks is the launch's device time (launch gaps included).
/// Returns (name, launches, ms over the cycle, ms in step 0), in first-seen
/// order.
pub(crate) fn kernel_breakdown(
    gpu: &GpuContext,
    cycle: usize,
    f: &mut dyn FnMut(Phase) -> R<()>,
) -> R<Vec<(&'static str, usize, f64, f64)>> {
    use infinitehip::backend::cuda::prof;
    let mut acc: Vec<(&'static str, usize, f64, f64)> = Vec::new();
    f(Phase::Reset)?;
    prof::enable(true);
    let r = (|| -> R<()> {
        for i in 0..cycle {
            f(Phase::Cushion)?;
            drop(prof::take());
            prof::mark(gpu, "start").map_err(e)?;
            f(Phase::Step)?;
            gpu.synchronize().map_err(e)?;
            let marks = prof::take();
            for w in marks.windows(2) {
                let dt = w[0].1.elapsed_ms(&w[1].1).map_err(e)? as f64;
                let name = w[1].0;
                let at = match acc.iter().position(|a| a.0 == name) {
                    Some(p) => p,
                    None => {
                        acc.push((name, 0, 0.0, 0.0));
                        acc.len() - 1
                    }
                };
                acc[at].1 += 1;
                acc[at].2 += dt;
                if i == 0 {
                    acc[at].3 += dt;
                }
            }
        }
        Ok(())
    })();
    prof::enable(false);
    r.map(|_| acc)
}

/// What `kernel_breakdown` asks of its closure.
pub(crate) enum Phase {
    Reset,
    Cushion,
    Step,
}
