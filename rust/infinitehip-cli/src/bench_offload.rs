//! `infinitehip bench-offload`: hip decode with all KV resident vs the same
//! decode with the KV on the host tier and a device page cache of a fraction
//! of it (DESIGN 3.5), in one run. On the CPU backend the "device" is a
//! second arena, so latencies here only show the bookkeeping cost; the hit
//! ratio, pages needed and bytes copied per step are what a GPU run moves
//! over the bus.

use std::time::Instant;

use half::bf16;
use infinitehip::attention::{rel_error, AttnShape};
use infinitehip::config::{LayerPolicy, PolicyConfig};
use infinitehip::engine::Engine;
use infinitehip::policy::Phase;
use infinitehip::rng::Rng;
use infinitehip::workload::{needle_seq, NeedleSeq};
use infinitehip::DType;
use serde_json::json;

use crate::args::Args;

pub const HELP: &str = "infinitehip bench-offload [options]
  --tokens LIST        context lengths (default 262144)
  --cache LIST         device cache sizes as fractions of the KV pages (default 0.1,0.05)
  --q-heads N --kv-heads N --head-dim N   (default 32, 8, 128)
  --est-cache F        estimation row cache as a fraction of all key rows (default 0: reads counted, not cached)
  --steps N            decode steps after a warm-up refresh cycle (default 32)
  --json FILE          write the results as JSON
  --seed N             workload seed (default 0)";

struct Row {
    tokens: usize,
    cache_fraction: f64,
    cache_pages: usize,
    kv_pages: usize,
    resident_ms: f64,
    offload_ms: f64,
    hit_ratio: f64,
    blocks_needed: f64,
    copied_mib_per_step: f64,
    estimation_mib_per_step: f64,
    est_hit_ratio: Option<f64>,
    est_copied_mib_per_step: f64,
    device_mib: f64,
    host_mib: f64,
    max_abs_diff: f64,
    rel_error: f64,
}

fn engine(
    shape: &AttnShape,
    cache_pages: Option<usize>,
    est_rows: Option<usize>,
) -> Result<Engine, String> {
    let mut cfg = PolicyConfig::default();
    cfg.model.n_layers = 1;
    cfg.model.n_q_heads = shape.n_q_heads;
    cfg.model.n_kv_heads = shape.n_kv_heads;
    cfg.model.head_dim = shape.head_dim;
    cfg.dense_layers = 0;
    cfg.kv.dtype = DType::Bf16;
    cfg.kv.device_cache_pages = cache_pages;
    cfg.kv.estimation_cache_rows = est_rows;
    if !matches!(cfg.default, LayerPolicy::Hip(_)) {
        return Err("default policy is not hip".into());
    }
    Engine::new(cfg).map_err(|e| e.to_string())
}

/// Copy the workload's KV into an engine, 16K tokens at a time.
fn fill(e: &mut Engine, w: &NeedleSeq<bf16>) -> Result<(), String> {
    let len = w.pool.seq_len(w.seq).map_err(|e| e.to_string())?;
    e.add_sequence(0).map_err(|e| e.to_string())?;
    for s in (0..len).step_by(16384) {
        let (k, v) = w
            .pool
            .read(w.seq, s, (s + 16384).min(len))
            .map_err(|e| e.to_string())?;
        e.append(0, 0, &k, &v, Phase::Prefill, false, None)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Run `steps` decode steps (one random token appended per step); returns
/// the outputs, the per-step latencies and the per-step engine stats.
fn decode_steps(
    e: &mut Engine,
    w: &NeedleSeq<bf16>,
    steps: usize,
    seed: u64,
) -> Result<
    (
        Vec<Vec<f32>>,
        Vec<f64>,
        Vec<infinitehip::engine::LayerStats>,
    ),
    String,
> {
    let mut rng = Rng::new(seed ^ 0x0ff1_0ad);
    let te = w.shape.n_kv_heads * w.shape.head_dim;
    let (mut outs, mut times, mut stats) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..steps {
        let q = w.query(&mut rng);
        let mut out = vec![f32::NAN; q.len()];
        let t = Instant::now();
        e.attend_decode(0, &[0], &q, &mut out)
            .map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        stats.push(e.stats().swap_remove(0));
        outs.push(out);
        let k: Vec<f32> = (0..te).map(|_| rng.normal()).collect();
        let v: Vec<f32> = (0..te).map(|_| rng.normal()).collect();
        e.append(0, 0, &k, &v, Phase::Decode, false, None)
            .map_err(|e| e.to_string())?;
    }
    Ok((outs, times, stats))
}

pub fn run(argv: &[String]) -> Result<(), String> {
    let a = Args::parse(
        argv,
        &[
            "tokens",
            "cache",
            "est-cache",
            "q-heads",
            "kv-heads",
            "head-dim",
            "steps",
            "json",
            "seed",
        ],
        &[],
    )?;
    let tokens = a.list("tokens", &[262144])?;
    let fractions: Vec<f64> = a
        .str("cache")
        .unwrap_or("0.1,0.05")
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|f| *f > 0.0 && *f <= 1.0)
                .ok_or_else(|| format!("--cache: `{s}` is not a fraction in (0, 1]"))
        })
        .collect::<Result<_, _>>()?;
    let shape = AttnShape::new(
        a.get("q-heads", 32)?,
        a.get("kv-heads", 8)?,
        a.get("head-dim", 128)?,
    )
    .map_err(|e| e.to_string())?;
    let est_frac: f64 = a.get("est-cache", 0.0)?;
    if !(0.0..=1.0).contains(&est_frac) {
        return Err("--est-cache must be a fraction in [0, 1]".into());
    }
    let steps: usize = a.get("steps", 32)?;
    let seed: u64 = a.get("seed", 0)?;
    if steps == 0 {
        return Err("--steps must be >= 1".into());
    }
    let machine = crate::machine::describe();
    eprintln!("bench-offload on {machine}");
    let warm = 16; // one full stage-1 refresh cycle before timing
    let mut rows = Vec::new();
    for &t in &tokens {
        eprintln!("building a {t}-token needle sequence...");
        let w = needle_seq::<bf16>(shape, t, 64, 128, 1024, 64, seed).map_err(|e| e.to_string())?;
        eprintln!("  resident: {} decode steps...", warm + steps);
        let mut res = engine(&shape, None, None)?;
        fill(&mut res, &w)?;
        let (ref_out, res_t, _) = decode_steps(&mut res, &w, warm + steps, seed)?;
        let kv_pages = res.stats()[0].pool.pages_in_use;
        let host_mib = res.stats()[0].pool.bytes_in_use as f64 / (1 << 20) as f64;
        drop(res);
        for &f in &fractions {
            let pages = ((kv_pages as f64 * f).ceil() as usize).max(1);
            eprintln!("  offloaded, cache {pages} of {kv_pages} pages...");
            let est_rows = (est_frac > 0.0)
                .then(|| ((t * shape.n_kv_heads) as f64 * est_frac).ceil() as usize);
            let mut off = engine(&shape, Some(pages), est_rows)?;
            fill(&mut off, &w)?;
            let (out, off_t, st) = decode_steps(&mut off, &w, warm + steps, seed)?;
            let timed = &st[warm..];
            let (hits, misses): (u64, u64) = timed.iter().fold((0, 0), |(h, m), s| {
                (h + s.last_step.cache.hits, m + s.last_step.cache.misses)
            });
            let mut max_abs = 0f64;
            let mut err = 0f64;
            for (o, r) in out.iter().zip(&ref_out) {
                let r64: Vec<f64> = r.iter().map(|&x| x as f64).collect();
                err = err.max(rel_error(o, &r64));
                for (x, y) in o.iter().zip(r) {
                    max_abs = max_abs.max(if x.is_nan() {
                        f64::INFINITY
                    } else {
                        (x - y).abs() as f64
                    });
                }
            }
            let n = timed.len() as f64;
            let (eh, em, eb) = timed.iter().fold((0u64, 0u64, 0u64), |(h, m, b), s| {
                let e = s.last_step.estimation_cache;
                (h + e.hits, m + e.misses, b + e.bytes_copied)
            });
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            rows.push(Row {
                tokens: t,
                cache_fraction: f,
                cache_pages: pages,
                kv_pages,
                resident_ms: res_t[warm..].iter().sum::<f64>() / n,
                offload_ms: off_t[warm..].iter().sum::<f64>() / n,
                hit_ratio: hits as f64 / (hits + misses).max(1) as f64,
                blocks_needed: timed
                    .iter()
                    .map(|s| s.last_step.blocks_needed as f64)
                    .sum::<f64>()
                    / n,
                copied_mib_per_step: timed
                    .iter()
                    .map(|s| mib(s.last_step.cache.bytes_copied))
                    .sum::<f64>()
                    / n,
                estimation_mib_per_step: timed
                    .iter()
                    .map(|s| mib(s.last_step.estimation_bytes))
                    .sum::<f64>()
                    / n,
                est_hit_ratio: est_rows.map(|_| eh as f64 / (eh + em).max(1) as f64),
                est_copied_mib_per_step: mib(eb) / n,
                device_mib: off.stats()[0].device_bytes as f64 / (1 << 20) as f64,
                host_mib,
                max_abs_diff: max_abs,
                rel_error: err,
            });
        }
    }
    println!(
        "{:>8} {:>6} {:>12} {:>11} {:>11} {:>6} {:>9} {:>13} {:>12} {:>8} {:>12} {:>10} {:>10} {:>9}",
        "tokens", "cache", "pages", "resident_ms", "offload_ms", "hit%", "blocks/st", "copied_MiB/st",
        "estim_MiB/st", "est_hit%", "est_copy_MiB", "device_MiB", "host_MiB", "max|diff|"
    );
    for r in &rows {
        println!(
            "{:>8} {:>5.0}% {:>12} {:>11.2} {:>11.2} {:>6.1} {:>9.0} {:>13.2} {:>12.2} {:>8} {:>12.2} {:>10.0} {:>10.0} {:>9.1e}",
            r.tokens,
            r.cache_fraction * 100.0,
            format!("{}/{}", r.cache_pages, r.kv_pages),
            r.resident_ms,
            r.offload_ms,
            r.hit_ratio * 100.0,
            r.blocks_needed,
            r.copied_mib_per_step,
            r.estimation_mib_per_step,
            r.est_hit_ratio.map_or("-".into(), |x| format!("{:.1}", x * 100.0)),
            r.est_copied_mib_per_step,
            r.device_mib,
            r.host_mib,
            r.max_abs_diff
        );
    }
    if let Some(path) = a.str("json") {
        let results: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "policy": "hip", "tokens": r.tokens, "batch": 1, "cache_fraction": r.cache_fraction,
                    "cache_pages": r.cache_pages, "kv_pages": r.kv_pages,
                    "resident_ms": r.resident_ms, "offload_ms": r.offload_ms, "hit_ratio": r.hit_ratio,
                    "blocks_needed_per_step": r.blocks_needed, "copied_mib_per_step": r.copied_mib_per_step,
                    "estimation_mib_per_step": r.estimation_mib_per_step,
                    "estimation_hit_ratio": r.est_hit_ratio, "estimation_copied_mib_per_step": r.est_copied_mib_per_step, "device_mib": r.device_mib,
                    "host_mib": r.host_mib, "max_abs_diff": r.max_abs_diff, "rel_error": r.rel_error,
                })
            })
            .collect();
        let doc = json!({"machine": machine, "backend": "cpu", "shape": {"q_heads": shape.n_q_heads, "kv_heads": shape.n_kv_heads, "head_dim": shape.head_dim, "dtype": "bf16"}, "steps": steps, "warmup_steps": warm, "results": results});
        std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap())
            .map_err(|e| format!("writing {path}: {e}"))?;
        eprintln!("wrote {path}");
    }
    Ok(())
}
