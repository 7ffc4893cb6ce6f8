//! `infinitehip sim-est-rows`: the GPU estimation row cache simulated on
//! the CPU over `bench-gpu-offload`'s workload (issue 16): which probed key
//! rows miss, per step class, under today's CLOCK cache and under a cache
//! that pins the upper levels of stage 0's binary search
//! (`infinitehip::est_sim`).

use infinitehip::config::HipConfig;
use infinitehip::est_sim::{
    bench_trace, replay, search_offsets, BenchKeys, RowCacheSim, SimPolicy,
};
use serde_json::json;

use crate::args::{check_writable, parse_count, parse_fraction, parse_positive};

/// Estimation row cache misses of bench-gpu-offload's workload, simulated
/// on the CPU (CLOCK vs pinned search levels)
///
/// The probe sequence is the CPU policy's (the kernels' search), the cache
/// is the device CLOCK admission's twin; pinned policies keep every row at
/// the offsets levels 1..=N of stage 0's search can probe (filled when the
/// tokens are written, never evicted) and run CLOCK over the other slots.
#[derive(clap::Args, Debug)]
pub struct SimEstRowsArgs {
    /// Context lengths, comma-separated (K = 1024, M = 1024K).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_count,
          default_value = "1M")]
    pub tokens: Vec<usize>,
    /// Estimation row caches as fractions of the key rows, comma-separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_fraction,
          default_value = "0.25,0.5")]
    pub est_rows: Vec<f64>,
    /// Pinned search levels, comma-separated (0: plain CLOCK, today's cache;
    /// N: levels 1..=N of stage 0's search pinned).
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "0,1,2,3"
    )]
    pub pin: Vec<usize>,
    /// Replay without the last search level's right-probe re-reads (the
    /// host-tier kernels reusing the previous level's score, as
    /// `hip_scorew` does): `off`, `on`, or both (`off,on`).
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "off,on",
          value_parser = ["on", "off"])]
    pub reuse: Vec<String>,
    /// Most rows admitted a step, as fractions of the CLOCK slots,
    /// comma-separated (the device admission: 0.5).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_fraction,
          default_value = "0.5")]
    pub admit: Vec<f64>,
    /// Also replay through an unbounded cache (only first reads miss).
    #[arg(long)]
    pub unbounded: bool,
    /// KV heads simulated (the first N of the bench's 8; each is scored on
    /// its own, the cache holds the same fraction of their rows).
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value_t = 8)]
    pub heads: usize,
    /// Threads of the machine that fills the bench's keys (its xorshift
    /// streams are split per thread; the H200 machine has 16 cores).
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value_t = 16)]
    pub fill_threads: usize,
    /// Decode steps counted (after the warm-up), as the bench's --steps.
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value_t = 48)]
    pub steps: usize,
    /// Warm-up steps, as the bench's --warmup.
    #[arg(long, value_name = "N", value_parser = parse_count, default_value_t = 16)]
    pub warmup: usize,
    /// Workload seed (the bench's --seed).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
    /// Write the results as JSON to FILE (checked writable before any work).
    #[arg(long, value_name = "FILE")]
    pub json: Option<String>,
}

pub fn check(a: &SimEstRowsArgs) -> Result<(), String> {
    if let Some(p) = &a.json {
        check_writable("--json", p)?;
    }
    if a.heads > 8 {
        return Err(format!("--heads {}: the bench has 8 KV heads", a.heads));
    }
    if let Some(&p) = a.pin.iter().find(|&&p| p > 6) {
        return Err(format!("--pin {p}: stage 0's search has 6 levels"));
    }
    if let Some(&t) = a.tokens.iter().find(|&&t| t < 8192 + a.steps + a.warmup) {
        return Err(format!("--tokens {t}: too short for the bench's workload"));
    }
    Ok(())
}

pub fn run(a: &SimEstRowsArgs) -> Result<(), String> {
    check(a)?;
    let e = |x: infinitehip::Error| x.to_string();
    let cfg = HipConfig::default();
    let (hkv, d, ps, nq) = (8usize, 128usize, 64usize, 32usize);
    let (base, chunk) = (cfg.sink, cfg.stages[0].chunk_size);
    let n_stages = cfg.stages.len();
    let scale = hkv as f64 / a.heads as f64;
    let mut rows_json = Vec::new();
    println!(
        "sim-est-rows: bench-gpu-offload's workload, {} of 8 KV heads simulated (per-step figures scaled to 8), \
         steps {} after {} warm-up, seed {}",
        a.heads, a.steps, a.warmup, a.seed
    );
    for &t in &a.tokens {
        let t0 = std::time::Instant::now();
        let (keys, dirs) =
            BenchKeys::bench(t, hkv, d, ps, a.seed + t as u64, a.fill_threads, a.heads);
        let t1 = t0.elapsed().as_secs_f64();
        let trace = bench_trace(&keys, &dirs, &cfg, nq, a.seed, a.warmup + a.steps).map_err(e)?;
        eprintln!(
            "{t} tokens: keys in {t1:.1} s, trace of {} steps in {:.1} s ({} lookups)",
            trace.len(),
            t0.elapsed().as_secs_f64() - t1,
            trace.iter().map(|s| s.rows.len()).sum::<usize>()
        );
        let total_rows = t.div_ceil(ps) * ps * a.heads;
        let mut pols: Vec<(String, SimPolicy)> = a
            .pin
            .iter()
            .map(|&p| {
                if p == 0 {
                    ("clock".to_string(), SimPolicy::Clock)
                } else {
                    (
                        format!("pin L1-{p} + clock"),
                        SimPolicy::Pinned {
                            base,
                            chunk,
                            offsets: search_offsets(chunk, p),
                        },
                    )
                }
            })
            .collect();
        if a.unbounded {
            pols.push(("unbounded".into(), SimPolicy::Unbounded));
        }
        println!();
        println!("{t} tokens");
        println!(
            "| est rows | policy | pinned rows | hit % | class | steps | lookups/step | missed lookups/step | distinct missed rows/step | MiB/step over the bus | stage-0 class misses by search level L1..L6 (%); missed lookups per refresh |"
        );
        println!("|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---|");
        for &f in &a.est_rows {
            let slots = ((total_rows as f64 * f).ceil() as usize).max(16);
            for (name0, pol) in &pols {
                for reuse in a.reuse.iter().map(|x| x == "on") {
                    for &adm in &a.admit {
                        let name = &format!(
                            "{name0}{}{}",
                            if reuse { " + reuse" } else { "" },
                            if adm != 0.5 {
                                format!(" (admit {adm})")
                            } else {
                                String::new()
                            }
                        );
                        let pinned = pol.pinned_rows(t, a.heads);
                        let mut cache = match RowCacheSim::with_admit(
                            pol.clone(),
                            slots,
                            pinned,
                            hkv,
                            ps,
                            adm,
                        ) {
                            Ok(c) => c,
                            Err(x) => {
                                println!("| {:.0}% | {name} | {pinned} | - | does not fit: {x} | | | | | | |", f * 100.0);
                                continue;
                            }
                        };
                        let tot =
                            replay(&trace, &mut cache, n_stages, a.warmup, base, chunk, reuse);
                        let (lk, hit): (u64, u64) = tot
                            .iter()
                            .fold((0, 0), |(l, h), c| (l + c.sum.lookups, h + c.sum.hits));
                        let hit_pct = 100.0 * hit as f64 / lk.max(1) as f64;
                        let mut classes = Vec::new();
                        for (ci, c) in tot.iter().enumerate() {
                            if c.steps == 0 {
                                continue;
                            }
                            let n = c.steps as f64;
                            let cls = if ci < n_stages {
                                format!("stage {ci}")
                            } else {
                                "none".into()
                            };
                            let per = |x: u64| x as f64 * scale / n;
                            let mib = per(c.sum.misses) * (d * 2) as f64 / (1 << 20) as f64;
                            let lv = if ci == 0 {
                                let m: u64 = c.miss_by_level.iter().sum();
                                let lv = c.miss_by_level[1..]
                                    .iter()
                                    .map(|&x| format!("{:.0}", 100.0 * x as f64 / m.max(1) as f64))
                                    .collect::<Vec<_>>()
                                    .join(" / ");
                                let ps: Vec<String> = c
                                    .per_step
                                    .iter()
                                    .map(|&x| format!("{:.0}K", x as f64 * scale / 1000.0))
                                    .collect();
                                format!("{lv}; per refresh {}", ps.join(", "))
                            } else {
                                String::new()
                            };
                            println!(
                        "| {:.0}% | {name} | {} | {hit_pct:.1} | {cls} | {} | {:.0} | {:.0} | {:.0} | {mib:.2} | {lv} |",
                        f * 100.0,
                        (pinned as f64 * scale) as u64,
                        c.steps,
                        per(c.sum.lookups),
                        per(c.sum.misses),
                        per(c.sum.missed_rows),
                    );
                            classes.push(json!({
                        "class": cls, "steps": c.steps,
                        "lookups_per_step": per(c.sum.lookups),
                        "misses_per_step": per(c.sum.misses),
                        "missed_rows_per_step": per(c.sum.missed_rows),
                        "mib_per_step": mib,
                        "admitted_per_step": per(c.sum.admitted),
                        "evicted_per_step": per(c.sum.evicted),
                        "pinned_hits_per_step": per(c.sum.pinned_hits),
                        "misses_by_level": c.miss_by_level, "misses_per_counted_step": c.per_step,
                    }));
                        }
                        let all_mib: f64 = tot.iter().map(|c| c.sum.misses as f64).sum::<f64>()
                            * scale
                            * (d * 2) as f64
                            / (1 << 20) as f64
                            / a.steps as f64;
                        println!("| {:.0}% | {name} | | | all steps: {all_mib:.2} MiB/step | | | | | | |", f * 100.0);
                        rows_json.push(json!({
                    "tokens": t, "est_rows": f, "policy": name, "slots_8_heads": (slots as f64 * scale) as u64,
                    "pinned_rows_8_heads": (pinned as f64 * scale) as u64, "hit_pct": hit_pct,
                    "mib_per_step": all_mib, "classes": classes, "reuse": reuse, "admit": adm,
                }));
                    }
                }
            }
        }
    }
    if let Some(p) = &a.json {
        let v = json!({"command": "sim-est-rows", "heads": a.heads, "steps": a.steps, "warmup": a.warmup,
                       "seed": a.seed, "rows": rows_json});
        std::fs::write(p, serde_json::to_string_pretty(&v).unwrap())
            .map_err(|x| format!("{p}: {x}"))?;
    }
    Ok(())
}
