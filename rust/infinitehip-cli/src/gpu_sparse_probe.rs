//! `bench-gpu-sparse --probe`: where the hip sparse attention launch
//! (batch 1, default split) spends its time. Each row times one launch
//! (device time between two events, median of `--reps`) after a chosen
//! preparation, with a 30 us spin queued first so that the launch starts
//! on the device right after the first event (no host gap inside the
//! timing):
//! - warm: the same launch ran just before (K/V in L2);
//! - L2 evicted: a 256 MiB memset before,
//!
//! for chunk positions drawn at random (as a hip selection) and for the
//! same number of chunks side by side (same bytes, few pages), for a launch
//! with nothing selected, with 1 or 2 chunks per iteration and the split
//! arrival and merge of the default, of the previous launch
//! (`set_fenced_arrival`) and without the merge's early loads
//! (`set_merge_prefetch`).
//! Then the `hip_sparse_trace` build's per-CTA timestamps of the same
//! launches: when CTAs start, and how long each phase takes (query +
//! counts, the first chunk, the rest of the loop, partials, arrival, the
//! last CTA's merge). (Address translations evicted before the launch, by
//! one read per 2 MiB of a 16 GiB buffer, changed nothing: 2026-12-06,
//! BENCHMARKS.md.)

use infinitehip::attention::AttnShape;
use infinitehip::backend::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
use infinitehip::backend::cuda::dense_decode::{
    random_device_kv, set_fenced_arrival, set_merge_prefetch, set_sparse_trace, sparse_decode,
    sparse_trace, DenseDecodeWs, SPARSE_TRACE_SLOTS,
};
use infinitehip::backend::cuda::{DevBuf, GpuContext};
use infinitehip::rng::Rng;
use infinitehip::DType;
use serde_json::json;

use crate::gpu::{e, median, R};

const SPIN_NS: i64 = 30_000;

#[derive(Clone, Copy, PartialEq)]
enum Prep {
    Warm,
    L2,
}

impl Prep {
    fn name(self) -> &'static str {
        match self {
            Prep::Warm => "warm",
            Prep::L2 => "L2 evicted",
        }
    }
}

struct Bufs {
    flush: DevBuf,
}

fn spin(gpu: &GpuContext) -> R<()> {
    let f = gpu.func("decode_dense_v2", "dense_spin").map_err(e)?;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(&SPIN_NS);
    // SAFETY: dense_spin(long long ns) reads only the global timer.
    unsafe {
        l.launch(LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map_err(e)?;
    Ok(())
}

fn prepare(gpu: &GpuContext, b: &Bufs, p: Prep, rng: &mut Rng) -> R<()> {
    if p == Prep::L2 {
        b.flush
            .fill_bytes_async(rng.below(255) as u8, &gpu.stream)
            .map_err(e)?;
    }
    spin(gpu)
}

/// Device time of one `launch` after `prep` (median of reps), us.
fn timed(
    gpu: &GpuContext,
    b: &Bufs,
    p: Prep,
    reps: usize,
    rng: &mut Rng,
    launch: &mut dyn FnMut() -> R<()>,
) -> R<f64> {
    use infinitehip::backend::cuda::cudarc::driver::sys::CUevent_flags;
    launch()?;
    let mut ts = Vec::new();
    for _ in 0..reps {
        prepare(gpu, b, p, rng)?;
        let x = gpu
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(e)?;
        let y = gpu
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(e)?;
        x.record(&gpu.stream).map_err(e)?;
        launch()?;
        y.record(&gpu.stream).map_err(e)?;
        y.synchronize().map_err(e)?;
        ts.push(x.elapsed_ms(&y).map_err(e)? as f64 * 1e3);
    }
    Ok(median(&mut ts))
}

/// Per-phase statistics of one traced launch (us): for each phase the
/// median and the largest over CTAs. Start and end from the global timer
/// (comparable across SMs); phase lengths from each SM's clock, converted
/// at the clock rate the two timers give over the launch.
fn trace_stats(st: &[u64]) -> (serde_json::Value, String) {
    let ctas: Vec<&[u64]> = st
        .chunks(SPARSE_TRACE_SLOTS)
        .filter(|c| c[0] != 0)
        .collect();
    let t0 = ctas.iter().map(|c| c[0]).min().unwrap_or(0);
    let us = |a: u64, b: u64| (b as f64 - a as f64) * 1e-3;
    // SM cycles per ns: clock vs timer from entry to arrival, median.
    let mut ghz: Vec<f64> = ctas
        .iter()
        .filter(|c| c[4] > c[0] + 1000)
        .map(|c| (c[8 + 4] - c[8]) as f64 / (c[4] - c[0]) as f64)
        .collect();
    let ghz = if ghz.is_empty() {
        1.8
    } else {
        median(&mut ghz)
    };
    let cyc = |c: &[u64], a: usize, b: usize| (c[8 + b] as f64 - c[8 + a] as f64) / ghz * 1e-3;
    let merged: Vec<&&[u64]> = ctas.iter().filter(|c| c[7] == 1).collect();
    let mut cols: Vec<(&str, Vec<f64>)> = vec![
        ("start", ctas.iter().map(|c| us(t0, c[0])).collect()),
        ("query+counts", ctas.iter().map(|c| cyc(c, 0, 1)).collect()),
        ("first chunk", ctas.iter().map(|c| cyc(c, 1, 2)).collect()),
        ("rest of loop", ctas.iter().map(|c| cyc(c, 2, 3)).collect()),
        (
            "warps merged, partials stored",
            ctas.iter().map(|c| cyc(c, 3, 6)).collect(),
        ),
        ("fence", ctas.iter().map(|c| cyc(c, 6, 7)).collect()),
        ("arrival", ctas.iter().map(|c| cyc(c, 7, 4)).collect()),
        (
            "merge: fence",
            merged.iter().map(|c| cyc(c, 4, 8)).collect(),
        ),
        (
            "merge: weights",
            merged.iter().map(|c| cyc(c, 8, 9)).collect(),
        ),
        (
            "merge: sums",
            merged.iter().map(|c| cyc(c, 9, 10)).collect(),
        ),
        (
            "merge: rest",
            merged.iter().map(|c| cyc(c, 10, 5)).collect(),
        ),
        (
            "end",
            ctas.iter()
                .map(|c| us(t0, if c[7] == 1 { c[5] } else { c[4] }))
                .collect(),
        ),
    ];
    let sms: std::collections::BTreeSet<u64> = ctas.iter().map(|c| c[6]).collect();
    let mut line = format!("{} CTAs / {} SMs, {ghz:.2} GHz |", ctas.len(), sms.len());
    let mut j = serde_json::Map::new();
    for (name, v) in cols.iter_mut() {
        if v.is_empty() {
            line += " - |";
            continue;
        }
        let med = median(v);
        let max = v.iter().cloned().fold(f64::MIN, f64::max);
        line += &format!(" {med:.2} / {max:.2} |");
        j.insert(name.to_string(), json!({"median_us": med, "max_us": max}));
    }
    j.insert("ctas".into(), json!(ctas.len()));
    j.insert("sms".into(), json!(sms.len()));
    j.insert("sm_ghz".into(), json!(ghz));
    (serde_json::Value::Object(j), line)
}

pub(crate) fn probe(gpu: &GpuContext, a: &crate::gpu_args::BenchGpuSparseArgs) -> R<()> {
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let (hkv, qe, t) = (8usize, shape.q_elems(), a.tokens);
    let (sink, chunk, n_chunks, slid, window) = (128usize, 8usize, 256usize, 64usize, 1024usize);
    if t < sink + window + slid + chunk * n_chunks * 2 {
        return Err(format!("--tokens {t}: too short for the selection"));
    }
    let sel_tokens = sink + chunk * n_chunks + slid + window;
    let bufs = Bufs {
        flush: DevBuf::alloc(256 << 20).map_err(e)?,
    };
    let kv = random_device_kv(gpu, 1, t, hkv, 128, DType::Bf16, 64, 17).map_err(e)?;
    let mut rng = Rng::new(99);
    let ntab_n = sink + chunk * n_chunks;
    let tail0 = t - window - slid;
    let span = (tail0 - sink) / chunk;
    let table = |contiguous: bool, rng: &mut Rng| -> Vec<i32> {
        let mut tab = Vec::with_capacity(hkv * ntab_n);
        for _ in 0..hkv {
            let mut cs: Vec<usize> = Vec::new();
            if contiguous {
                let s = rng.below(span - n_chunks);
                cs.extend(s..s + n_chunks);
            } else {
                while cs.len() < n_chunks {
                    let c = rng.below(span);
                    if !cs.contains(&c) {
                        cs.push(c);
                    }
                }
                cs.sort();
            }
            tab.extend(0..sink as i32);
            for c in cs {
                tab.extend((0..chunk).map(|i| (sink + c * chunk + i) as i32));
            }
        }
        tab
    };
    let tab_rand = DevBuf::from_slice(&table(false, &mut rng)).map_err(e)?;
    let tab_cont = DevBuf::from_slice(&table(true, &mut rng)).map_err(e)?;
    let extra = DevBuf::from_slice(&[
        [0i32, sink as i32],
        [tail0 as i32, (t - window) as i32],
        [(t - window) as i32, t as i32],
    ])
    .map_err(e)?;
    let ntab_d = DevBuf::from_slice(&vec![ntab_n as i32; hkv]).map_err(e)?;
    let zero_ntab = DevBuf::from_slice(&vec![0i32; hkv]).map_err(e)?;
    let zero_extra = DevBuf::from_slice(&[[0i32, 0]; 3]).map_err(e)?;
    let qd = DevBuf::from_slice(&rng.normal_vec(qe, 1.0)).map_err(e)?;
    let out = DevBuf::alloc(qe * 4).map_err(e)?;
    let mut ws = DenseDecodeWs::new();
    println!(
        "\nsparse launch probe: {sel_tokens} tokens per kv head from {t}, batch 1, Llama-3.1-8B heads (32 q / 8 kv, d128, bf16), default split\n"
    );
    println!(
        "| chunk positions | chunks / iteration | split arrival | before the launch | device us (median of {}) | output bits vs first row |",
        a.reps
    );
    println!("|---|---:|---|---|---:|---|");
    let sels: [(&str, &DevBuf, &DevBuf, &DevBuf); 3] = [
        ("random (hip)", &tab_rand, &ntab_d, &extra),
        ("side by side", &tab_cont, &ntab_d, &extra),
        ("nothing selected", &tab_rand, &zero_ntab, &zero_extra),
    ];
    // (chunks per iteration, split arrival + merge): 0 previous (fenced,
    // chained sums), 1 acq_rel + batched sums, 2 the same + partials loaded
    // before the weights (the default).
    let variants = [(1usize, 2u8), (1, 1), (1, 0), (2, 2)];
    let mut rows = Vec::new();
    for traced in [false, true] {
        set_sparse_trace(traced);
        if traced {
            println!("\nper-CTA phases, traced build (us; start and end from the first CTA's start, else the phase's length; median / max over CTAs; merge phases over the merging CTAs):\n");
            println!("| chunk positions | chunks | split arrival | before the launch | event us | CTAs, SMs, clock | start | query+counts | first chunk | rest of loop | warps merged, partials stored | fence | arrival | merge: fence | merge: weights | merge: sums | merge: rest | end |");
            println!("|---|---:|---|---|---:|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        }
        for (sname, tab, nt, ex) in sels {
            let mut first: Option<Vec<f32>> = None;
            for (u, m) in variants {
                if sname != "random (hip)" && (u == 2 || (traced && m != 2)) {
                    continue;
                }
                set_fenced_arrival(m == 0);
                set_merge_prefetch(m == 2);
                for p in [Prep::Warm, Prep::L2] {
                    let mut launch = || -> R<()> {
                        sparse_decode(
                            gpu,
                            &mut ws,
                            &shape,
                            &kv,
                            qd.ptr,
                            tab,
                            ntab_n,
                            nt,
                            ex,
                            sel_tokens,
                            None,
                            Some(u),
                            false,
                            out.ptr,
                        )
                        .map_err(e)
                    };
                    let arrival =
                        ["fenced (previous)", "acq_rel", "acq_rel + prefetch"][m as usize];
                    let us = timed(
                        gpu,
                        &bufs,
                        p,
                        if traced { 5 } else { a.reps },
                        &mut rng,
                        &mut launch,
                    )?;
                    if !traced {
                        gpu.synchronize().map_err(e)?;
                        let got: Vec<f32> = out.read(qe).map_err(e)?;
                        let same = match &first {
                            None => {
                                first = Some(got.clone());
                                "first".to_string()
                            }
                            Some(f) => {
                                let n = f
                                    .iter()
                                    .zip(&got)
                                    .filter(|(x, y)| x.to_bits() != y.to_bits())
                                    .count();
                                format!("{n} of {qe} differ")
                            }
                        };
                        let finite = got.iter().all(|x| x.is_finite());
                        println!(
                            "| {sname} | {u} | {arrival} | {} | {us:.2} | {same}{} |",
                            p.name(),
                            if finite { "" } else { " NOT FINITE" }
                        );
                        rows.push(json!({"positions": sname, "chunks": u, "arrival": arrival,
                            "prep": p.name(), "device_us": us, "bits": same, "finite": finite}));
                        continue;
                    }
                    // One more traced launch after the same preparation.
                    let (tp, tbytes) = gpu
                        .module_global("hip_sparse_trace", "dd_trace")
                        .map_err(e)?;
                    DevBuf::borrowed(tp, tbytes).fill_bytes(0).map_err(e)?;
                    prepare(gpu, &bufs, p, &mut rng)?;
                    launch()?;
                    gpu.synchronize().map_err(e)?;
                    let st = sparse_trace(gpu, tbytes / (8 * SPARSE_TRACE_SLOTS)).map_err(e)?;
                    let (j, line) = trace_stats(&st);
                    println!(
                        "| {sname} | {u} | {arrival} | {} | {us:.2} | {line}",
                        p.name()
                    );
                    rows.push(json!({"positions": sname, "chunks": u, "arrival": arrival,
                        "prep": p.name(), "traced": true, "device_us": us, "phases": j}));
                }
            }
        }
    }
    set_fenced_arrival(false);
    set_merge_prefetch(true);
    set_sparse_trace(false);
    if let Some(p) = a.json.as_deref() {
        let doc = json!({"device": gpu.name, "probe": rows, "sel_tokens": sel_tokens, "tokens": t});
        std::fs::write(p, serde_json::to_string_pretty(&doc).unwrap()).map_err(e)?;
    }
    Ok(())
}
