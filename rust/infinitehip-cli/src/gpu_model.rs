//! `bench-gpu-model`: attention of one whole-model decode step at the
//! Llama-3.1-8B shape (32 layers: the first `--dense-layers` dense through
//! kernels/decode_dense.cu, the rest hip), each layer with its own K/V
//! buffer and its own query, vs 32 dense layers (ours, and PyTorch SDPA
//! flash from `scripts/sdpa_bench.py --model-tokens`, same device run), with
//! the bytes-read floors beside them.
//!
//! Where 32 layers of K/V do not fit in device memory the layers cycle
//! through as many distinct buffers as fit (`distinct_kv` in the output):
//! each dense layer then reads GiBs and each hip layer's reads (distinct
//! queries, so distinct selections) are far over the L2 at batch 16, so
//! no layer finds another's data in cache except hip layers at batch 1
//! that share a buffer; the reuse distance is reported.

use infinitehip::attention::AttnShape;
use infinitehip::backend::cuda::dense_decode::{dense_decode, random_device_kv, DenseDecodeWs};
use infinitehip::backend::cuda::dispatch::{DeviceKv, HipGpuDecoder};
use infinitehip::backend::cuda::{hip_step, DevBuf, GpuContext};
use infinitehip::config::HipConfig;
use infinitehip::rng::Rng;
use infinitehip::DType;
use serde_json::json;

use crate::gpu::{e, time_ms, R};
use crate::gpu_dense::copy_bandwidth;
use crate::gpu_step::cycle_times;

pub fn bench(a: &crate::gpu_args::BenchGpuModelArgs) -> R<()> {
    let (tokens, batches, n_layers, n_dense, reps) = (
        a.tokens.clone(),
        a.batch.clone(),
        a.layers,
        a.dense_layers,
        a.reps,
    );
    let baseline: serde_json::Value = match a.baseline.as_deref() {
        Some(p) => {
            serde_json::from_str(&std::fs::read_to_string(p).map_err(|x| format!("{p}: {x}"))?)
                .map_err(|x| format!("{p}: {x}"))?
        }
        None => json!({}),
    };
    let mut tunes: Vec<Tune> = a.tune.iter().map(|s| Tune::parse(s)).collect::<R<_>>()?;
    if tunes.is_empty() {
        tunes.push(Tune::default());
    }
    infinitehip::backend::cuda::dispatch::set_score_v1(a.score_v1);
    if a.no_pdl {
        infinitehip::backend::cuda::pdl::set_pdl(false);
    }
    {
        use infinitehip::backend::cuda::dispatch::{force_attention, HipAttention};
        force_attention(if a.split_combine {
            HipAttention::SplitCombine
        } else {
            HipAttention::SparseV2
        });
    }
    let gpu0 = GpuContext::new(0).map_err(e)?;
    // An own stream: the legacy default stream cannot be graph-captured.
    let gpu = gpu0.with_new_stream().map_err(e)?;
    let bw = copy_bandwidth(&gpu)?;
    println!(
        "device {} ({} SMs), measured copy bandwidth {:.0} GB/s; programmatic dependent launch {}",
        gpu.name,
        gpu.sm_count,
        bw / 1e9,
        if infinitehip::backend::cuda::pdl::pdl_enabled() && gpu.arch_number() >= 90 {
            format!(
                "on at {}",
                infinitehip::backend::cuda::pdl::site_list(infinitehip::backend::cuda::pdl::sites())
            )
        } else {
            "off".to_string()
        }
    );
    println!(
        "one-lane stage scoring: {}; long-row top-k: {}",
        if infinitehip::backend::cuda::dispatch::score_pipe() {
            "hip_scorewp (pipelined)"
        } else {
            "hip_scorew (INFINITEHIP_SCORE_PIPE=0)"
        },
        if infinitehip::backend::cuda::dispatch::topk_mc() {
            "hip_topk_mc (multi-CTA)"
        } else {
            "hip_topk (one CTA per row, INFINITEHIP_TOPK_MC=0)"
        }
    );
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let mut cfg = HipConfig::default();
    if !a.refresh.is_empty() {
        if a.refresh.len() != cfg.stages.len() || a.refresh.contains(&0) {
            return Err(format!(
                "--refresh: {} positive intervals, one per stage",
                cfg.stages.len()
            ));
        }
        for (s, &r) in cfg.stages.iter_mut().zip(&a.refresh) {
            s.refresh_interval = r;
        }
    }
    if a.decode_stage0 == "mean_key" {
        cfg.decode_stage0 = infinitehip::config::DecodeStage0::MeanKey;
    }
    let mean_key = a.decode_stage0 == "mean_key";
    println!("hip decode stage 0: {}", a.decode_stage0);
    let cycle = cfg
        .stages
        .iter()
        .map(|s| s.refresh_interval)
        .max()
        .unwrap_or(1);
    let mut rows = Vec::new();
    for &t in &tokens {
        for &b in &batches {
            let layer_bytes = (t * 8 * 128 * 2 * 2 * b) as f64;
            let (free, _) = gpu.mem_info().map_err(e)?;
            // mean_key: each hip layer also keeps one bf16 mean key and one
            // tag per 64-token chunk and KV head (~1/60 of its K/V).
            let reserve = if mean_key {
                (n_layers * b * (t / 64 + 1) * 8 * (128 * 2 + 4)) as f64
            } else {
                0.0
            };
            let fit = (((free as f64 - reserve) * 0.85) / layer_bytes).floor() as usize;
            if fit == 0 {
                println!("skip T={t} B={b}: one layer's K/V does not fit");
                continue;
            }
            let distinct = fit.min(n_layers);
            let kvs: Vec<DeviceKv> = (0..distinct)
                .map(|i| {
                    random_device_kv(&gpu, b, t, 8, 128, DType::Bf16, 64, (i * 7919 + t) as u32)
                })
                .collect::<infinitehip::Result<_>>()
                .map_err(e)?;
            let lens_dev = DevBuf::from_slice(&vec![t as i32; b]).map_err(e)?;
            let mut rng = Rng::new(t as u64 * 31 + b as u64);
            let qs: Vec<DevBuf> = (0..n_layers)
                .map(|_| DevBuf::from_slice(&rng.normal_vec(b * shape.q_elems(), 1.0)))
                .collect::<infinitehip::Result<_>>()
                .map_err(e)?;
            let out = DevBuf::alloc(b * shape.q_elems() * 4).map_err(e)?;
            let mut dws = DenseDecodeWs::new();
            let mut hips: Vec<HipGpuDecoder> = (n_dense..n_layers)
                .map(|_| HipGpuDecoder::new(cfg.clone(), &shape, b))
                .collect::<infinitehip::Result<_>>()
                .map_err(e)?;
            hips.iter_mut().for_each(|h| h.set_lean(!a.no_lean));
            // First step of each hip layer uploads its regions (and with
            // mean_key averages every stage-0 chunk once).
            gpu.synchronize().map_err(e)?;
            let t0 = std::time::Instant::now();
            for (i, h) in hips.iter_mut().enumerate() {
                let l = n_dense + i;
                h.step(&gpu, &shape, &kvs[l % distinct], qs[l].ptr, out.ptr, true)
                    .map_err(e)?;
            }
            gpu.synchronize().map_err(e)?;
            let first_ms = t0.elapsed().as_secs_f64() * 1e3;
            println!(
                "T={t} B={b}: first step of the {} hip layers (host wall{}): {first_ms:.2} ms",
                hips.len(),
                if mean_key {
                    ", builds the chunk means"
                } else {
                    ""
                }
            );
            let sel_tokens: usize = {
                let s = hips[0].selection_host(&gpu).map_err(e)?;
                (0..b)
                    .map(|r| (0..8).map(|h| s[r].token_count(h)).sum::<usize>())
                    .sum()
            };
            let dense_layer = |l: usize, dws: &mut DenseDecodeWs| -> R<()> {
                dense_decode(
                    &gpu,
                    dws,
                    &shape,
                    &kvs[l % distinct],
                    qs[l].ptr,
                    &lens_dev,
                    None,
                    None,
                    out.ptr,
                )
                .map_err(e)
            };
            let model_step = |hips: &mut [HipGpuDecoder], dws: &mut DenseDecodeWs| -> R<()> {
                for l in 0..n_layers {
                    if l < n_dense {
                        dense_layer(l, dws)?;
                    } else {
                        hips[l - n_dense]
                            .step(&gpu, &shape, &kvs[l % distinct], qs[l].ptr, out.ptr, false)
                            .map_err(e)?;
                    }
                }
                Ok(())
            };
            // Host-metadata path (the previous one): per step of a cycle.
            let t_host = cycle_times(&gpu, cycle, reps, &mut |i| match i {
                None => {
                    hips.iter_mut().for_each(|h| h.restart_cycle());
                    Ok(())
                }
                Some(_) => model_step(&mut hips, &mut dws),
            })?;
            // The same steps with `async_refresh` (host metadata only).
            let mut t_async: Vec<(String, Vec<f64>)> = Vec::new();
            for mode in &a.async_refresh {
                let acfg = infinitehip::config::HipConfig {
                    async_refresh: match mode.as_str() {
                        "stage0" => infinitehip::config::AsyncRefresh::Stage0,
                        _ => infinitehip::config::AsyncRefresh::All,
                    },
                    ..cfg.clone()
                };
                if let Err(err) = acfg.validate("hip") {
                    println!("T={t} B={b}: async_refresh {mode}: {err}");
                    continue;
                }
                let mut ahips: Vec<HipGpuDecoder> = (n_dense..n_layers)
                    .map(|_| HipGpuDecoder::new(acfg.clone(), &shape, b))
                    .collect::<infinitehip::Result<_>>()
                    .map_err(e)?;
                ahips.iter_mut().for_each(|h| h.set_lean(!a.no_lean));
                for (i, h) in ahips.iter_mut().enumerate() {
                    let l = n_dense + i;
                    h.step(&gpu, &shape, &kvs[l % distinct], qs[l].ptr, out.ptr, true)
                        .map_err(e)?;
                }
                let tm = cycle_times(&gpu, cycle, reps, &mut |i| match i {
                    None => {
                        ahips.iter_mut().for_each(|h| h.restart_cycle());
                        Ok(())
                    }
                    Some(_) => model_step(&mut ahips, &mut dws),
                })?;
                gpu.ctx.synchronize().map_err(e)?;
                t_async.push((mode.clone(), tm));
            }
            // Per-launch device times over a cycle (host path), per tuning.
            let one_dense = time_ms(&gpu, 3, || dense_layer(0, &mut dws))?;
            let cushion_layers = ((15.0 / one_dense.max(1e-3)).ceil() as usize).clamp(1, 400);
            let mut breakdowns = Vec::new();
            for tune in &tunes {
                tune.apply();
                use crate::gpu_step::Phase;
                let bd = crate::gpu_step::kernel_breakdown(&gpu, cycle, &mut |p| match p {
                    Phase::Reset => {
                        hips.iter_mut().for_each(|h| h.restart_cycle());
                        Ok(())
                    }
                    Phase::Cushion => {
                        (0..cushion_layers).try_for_each(|_| dense_layer(0, &mut dws))
                    }
                    Phase::Step => model_step(&mut hips, &mut dws),
                })?;
                Tune::default().apply();
                breakdowns.push(print_breakdown(t, b, tune, &bd, cycle, n_layers - n_dense));
            }
            // Device-metadata path: the same layers, eager and as one graph
            // of the whole 32-layer step.
            for h in hips.iter_mut() {
                h.prepare_device_steps(&kvs[0]).map_err(e)?;
            }
            let dev_step = |hips: &mut [HipGpuDecoder], dws: &mut DenseDecodeWs| -> R<()> {
                for l in 0..n_layers {
                    if l < n_dense {
                        dense_layer(l, dws)?;
                    } else {
                        hips[l - n_dense]
                            .step_device(
                                &gpu,
                                &shape,
                                &kvs[l % distinct],
                                lens_dev.ptr,
                                qs[l].ptr,
                                out.ptr,
                            )
                            .map_err(e)?;
                    }
                }
                Ok(())
            };
            dev_step(&mut hips, &mut dws)?;
            gpu.synchronize().map_err(e)?;
            let reset_all = |hips: &[HipGpuDecoder]| -> R<()> {
                hips.iter()
                    .try_for_each(|h| h.restart_device_cycle(&gpu).map_err(e))
            };
            let t_eager = cycle_times(&gpu, cycle, reps, &mut |i| match i {
                None => reset_all(&hips),
                Some(_) => dev_step(&mut hips, &mut dws),
            })?;
            let graph = hip_step::capture(&gpu, || {
                dev_step(&mut hips, &mut dws).map_err(infinitehip::Error::Invalid)
            })
            .map_err(e)?;
            let t_graph = cycle_times(&gpu, cycle, reps, &mut |i| match i {
                None => reset_all(&hips),
                Some(_) => graph.launch().map_err(e),
            })?;
            drop(graph);
            let amort = |t: &[f64]| t.iter().sum::<f64>() / t.len() as f64;
            let (step_ms, refresh_ms) = (amort(&t_host), t_host[0]);
            let (eager_ms, graph_ms, graph_refresh_ms) =
                (amort(&t_eager), amort(&t_graph), t_graph[0]);
            let profile = crate::gpu_step::profile_layer(
                &gpu,
                &cfg,
                &shape,
                &kvs[n_dense % distinct],
                &lens_dev,
                qs[n_dense].ptr,
                out.ptr,
                reps,
            )?;
            let dense_layer = |l: usize, dws: &mut DenseDecodeWs| -> R<()> {
                dense_decode(
                    &gpu,
                    dws,
                    &shape,
                    &kvs[l % distinct],
                    qs[l].ptr,
                    &lens_dev,
                    None,
                    None,
                    out.ptr,
                )
                .map_err(e)
            };
            let dense_part_ms = time_ms(&gpu, reps, || {
                (0..n_dense).try_for_each(|l| dense_layer(l, &mut dws))
            })?;
            let all_dense_ms = time_ms(&gpu, reps, || {
                (0..n_layers).try_for_each(|l| dense_layer(l, &mut dws))
            })?;
            let engine = if a.engine_graph {
                let eg = crate::gpu_model_engine::engine_graph(
                    &gpu, &cfg, &shape, &kvs, &qs, b, n_layers, n_dense, cycle, reps,
                )?;
                let us: Vec<f64> = eg["hip_layer_us_by_cycle"]
                    .as_array()
                    .map(|v| v.iter().filter_map(|x| x.as_f64()).collect())
                    .unwrap_or_default();
                if us.len() == cycle {
                    let mut plain: Vec<f64> = (0..cycle)
                        .filter(|i| cfg.stages.iter().all(|s| i % s.refresh_interval != 0))
                        .map(|i| us[i])
                        .collect();
                    plain.sort_by(|x, y| x.partial_cmp(y).unwrap());
                    println!(
                        "T={t} B={b}: hip layers through GpuAttention::decode_graph (SGLang's graph route, search stage 0), us per hip layer: step 0 {:.1}, no-refresh median {:.1}, amortised {:.1}",
                        us[0],
                        plain.get(plain.len() / 2).copied().unwrap_or(f64::NAN),
                        eg["hip_layer_amortised_us"].as_f64().unwrap_or(f64::NAN)
                    );
                }
                eg
            } else {
                serde_json::Value::Null
            };
            let n_hip = n_layers - n_dense;
            let hip_layer_ms = (step_ms - dense_part_ms) / n_hip.max(1) as f64;
            let hip_layer_graph_ms = (graph_ms - dense_part_ms) / n_hip.max(1) as f64;
            let hip_layer_eager_ms = (eager_ms - dense_part_ms) / n_hip.max(1) as f64;
            let mut async_rows = serde_json::Map::new();
            for (mode, tm) in &t_async {
                let s = amort(tm);
                let h = (s - dense_part_ms) / n_hip.max(1) as f64;
                println!(
                    "T={t} B={b}: async_refresh {mode} (host metadata): step {s:.3} ms amortised (in line: {step_ms:.3}), hip {:.1} us/layer (in line: {:.1}), step 0 {:.3} ms, vs SDPA {}",
                    h * 1e3,
                    (step_ms - dense_part_ms) / n_hip.max(1) as f64 * 1e3,
                    tm[0],
                    baseline
                        .get("results")
                        .and_then(|r| r.get(format!("model_{t}x{b}")))
                        .and_then(|x| x.as_f64())
                        .map_or("-".to_string(), |x| format!("{:.2}x", x / s))
                );
                async_rows.insert(
                    mode.clone(),
                    json!({"step_ms": s, "hip_layer_amortised_ms": h, "step_ms_by_cycle_host": tm}),
                );
            }
            let dense_floor = layer_bytes / bw * 1e3;
            let hip_floor = (sel_tokens * 128 * 2 * 2) as f64 / bw * 1e3;
            let floor_step = n_dense as f64 * dense_floor + n_hip as f64 * hip_floor;
            let res = baseline.get("results");
            let sdpa_model = res
                .and_then(|r| r.get(format!("model_{t}x{b}")))
                .and_then(|x| x.as_f64());
            let sdpa_layer = res
                .and_then(|r| r.get(format!("{t}x{b}")))
                .and_then(|x| x.as_f64());
            let sdpa_distinct = baseline
                .get("model_distinct")
                .and_then(|r| r.get(format!("model_{t}x{b}")))
                .and_then(|x| x.as_u64());
            let row = json!({
                "tokens": t, "batch": b, "layers": n_layers, "dense_layers": n_dense,
                "distinct_kv": distinct, "step_ms": step_ms, "refresh_step_ms": refresh_ms,
                "dense_part_ms": dense_part_ms, "hip_layer_amortised_ms": hip_layer_ms,
                "all_dense_ours_ms": all_dense_ms,
                "sdpa_model_ms": sdpa_model, "sdpa_model_distinct_kv": sdpa_distinct,
                "sdpa_layer_x_layers_ms": sdpa_layer.map(|x| x * n_layers as f64),
                "speedup_vs_sdpa": sdpa_model.map(|x| x / step_ms),
                "device_eager_step_ms": eager_ms, "graph_step_ms": graph_ms,
                "graph_refresh_step_ms": graph_refresh_ms,
                "speedup_vs_sdpa_graph": sdpa_model.map(|x| x / graph_ms),
                "hip_layer_eager_ms": hip_layer_eager_ms, "hip_layer_graph_ms": hip_layer_graph_ms,
                "step_ms_by_cycle_host": t_host, "step_ms_by_cycle_eager": t_eager,
                "step_ms_by_cycle_graph": t_graph, "hip_layer_profile": profile,
                "speedup_vs_all_dense_ours": all_dense_ms / step_ms,
                "floor_step_ms": floor_step, "floor_all_dense_ms": dense_floor * n_layers as f64,
                "dense_layer_floor_ms": dense_floor, "hip_layer_floor_ms": hip_floor,
                "hip_selected_tokens_per_head": sel_tokens / (8 * b),
                "refresh_cycle_steps": cycle, "kernel_breakdown": breakdowns,
                "engine_graph": engine,
                "async_refresh": async_rows,
                "pdl": infinitehip::backend::cuda::pdl::pdl_enabled() && gpu.arch_number() >= 90,
                "pdl_sites": infinitehip::backend::cuda::pdl::site_list(infinitehip::backend::cuda::pdl::sites()),
            });
            eprintln!("{row}");
            rows.push(row);
        }
    }
    println!("\nStep ms amortised over the refresh cycle; hip metadata on the host (`step`, previous) / on the device eager / device as one CUDA graph of the whole step; refresh step = step 0 of the cycle (all stages).\n");
    println!("| tokens | batch | distinct K/V | step ms host / device / graph | refresh step ms host / graph | 32 x SDPA flash ms | speed-up vs SDPA host / graph | 32 x our dense ms | hip ms/layer amortised host / device / graph | step floor ms | all-dense floor ms |");
    println!("|---:|---:|---:|---|---|---:|---|---:|---|---:|---:|");
    let f = |r: &serde_json::Value, k: &str, p: usize| {
        r[k].as_f64()
            .map_or("-".to_string(), |x| format!("{x:.p$}"))
    };
    for r in &rows {
        println!(
            "| {} | {} | {} | {} / {} / {} | {} / {} | {} | {} / {} | {} | {} / {} / {} | {} | {} |",
            r["tokens"],
            r["batch"],
            r["distinct_kv"],
            f(r, "step_ms", 3),
            f(r, "device_eager_step_ms", 3),
            f(r, "graph_step_ms", 3),
            f(r, "refresh_step_ms", 3),
            f(r, "graph_refresh_step_ms", 3),
            f(r, "sdpa_model_ms", 3),
            f(r, "speedup_vs_sdpa", 2),
            f(r, "speedup_vs_sdpa_graph", 2),
            f(r, "all_dense_ours_ms", 3),
            f(r, "hip_layer_amortised_ms", 4),
            f(r, "hip_layer_eager_ms", 4),
            f(r, "hip_layer_graph_ms", 4),
            f(r, "floor_step_ms", 3),
            f(r, "floor_all_dense_ms", 3),
        );
    }
    if let Some(p) = a.json.as_deref() {
        let doc = json!({"device": gpu.name, "copy_bandwidth_gbs": bw / 1e9, "rows": rows});
        std::fs::write(p, serde_json::to_string_pretty(&doc).unwrap()).map_err(e)?;
    }
    Ok(())
}

/// A launch tuning the kernel breakdown sweeps (`--tune C/A/S`): attention
/// split about C CTAs per SM in multiples of A tokens, stages of at most S
/// sub-chunks scored with 4 lanes each (0 for C or A: the default; S `d`:
/// the default, 0: never).
#[derive(Clone, Debug, Default)]
struct Tune {
    ctas_per_sm: usize,
    align: usize,
    score4_max: Option<usize>,
}

impl Tune {
    fn parse(s: &str) -> R<Self> {
        let p: Vec<&str> = s.split('/').collect();
        let num = |x: &str| {
            x.parse::<usize>()
                .map_err(|_| format!("--tune {s}: want C/A/S"))
        };
        if p.len() != 3 {
            return Err(format!("--tune {s}: want C/A/S"));
        }
        Ok(Tune {
            ctas_per_sm: num(p[0])?,
            align: num(p[1])?,
            score4_max: if p[2] == "d" { None } else { Some(num(p[2])?) },
        })
    }
    fn apply(&self) {
        use infinitehip::backend::cuda::dispatch;
        dispatch::set_split_tuning(self.ctas_per_sm, self.align);
        dispatch::set_score4_max(self.score4_max);
    }
    fn label(&self) -> String {
        format!(
            "{}/{}/{}",
            self.ctas_per_sm,
            self.align,
            self.score4_max.map_or("d".to_string(), |v| v.to_string())
        )
    }
}

/// Print one kernel breakdown (ms totals over a cycle) as a table of us;
/// returns it as JSON.
fn print_breakdown(
    t: usize,
    b: usize,
    tune: &Tune,
    bd: &[(&'static str, usize, f64, f64)],
    cycle: usize,
    n_hip: usize,
) -> serde_json::Value {
    println!(
        "\nkernel breakdown, {t} tokens x batch {b}, tune {} (host-metadata step, device time between launch marks, us)",
        tune.label()
    );
    println!("| launch | per cycle | us per step (all layers) | us per layer amortised | step 0 us (all layers) |");
    println!("|---|---:|---:|---:|---:|");
    let (mut hip_total, mut hip0) = (0.0, 0.0);
    let mut rows = Vec::new();
    for &(name, n, ms, ms0) in bd {
        let per_step = ms * 1e3 / cycle as f64;
        let layers = if name == "dense" {
            (n / cycle).max(1)
        } else {
            hip_total += ms;
            hip0 += ms0;
            n_hip
        };
        println!(
            "| {name} | {n} | {per_step:.1} | {:.2} | {:.1} |",
            per_step / layers as f64,
            ms0 * 1e3
        );
        rows.push(json!({"launch": name, "per_cycle": n, "ms_cycle": ms, "ms_step0": ms0}));
    }
    let hip_layer = hip_total * 1e3 / cycle as f64 / n_hip.max(1) as f64;
    println!(
        "| hip, all launches | - | {:.1} | {hip_layer:.2} | {:.1} |",
        hip_total * 1e3 / cycle as f64,
        hip0 * 1e3
    );
    json!({"tune": tune.label(), "launches": rows, "hip_layer_amortised_us": hip_layer, "hip_step0_us": hip0 * 1e3})
}
