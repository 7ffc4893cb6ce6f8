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

use crate::args::{
    check_writable, parse_count, parse_fraction, parse_fraction_or_zero, parse_positive,
};

/// hip decode with all KV resident vs through a device page cache (CPU)
///
/// The KV on the host tier behind a device page cache of a fraction of it.
/// On the CPU backend the "device" is a second arena, so latencies show the
/// bookkeeping cost; hit ratios and bytes copied are what a GPU moves.
///
/// Every argument and the output path are checked before any work; when a
/// later size fails, the rows that finished are still printed and written
/// (`"complete": false`).
#[derive(clap::Args, Debug)]
pub struct BenchOffloadArgs {
    /// Context lengths, comma-separated (K = 1024, M = 1024K); each at least
    /// 1217 tokens (sink 128 + window 1024 + one 64-token needle chunk + 1).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_count,
          default_value = "256K")]
    pub tokens: Vec<usize>,
    /// Device cache sizes as fractions of the KV pages, comma-separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_fraction,
          default_value = "0.1,0.05")]
    pub cache: Vec<f64>,
    /// Estimation row cache as a fraction of all key rows (0: reads counted,
    /// not cached).
    #[arg(long, value_name = "F", value_parser = parse_fraction_or_zero, default_value_t = 0.0,
          allow_negative_numbers = true)]
    pub est_cache: f64,
    /// Query heads (the defaults are Llama-3.1-8B's shape).
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value_t = 32)]
    pub q_heads: usize,
    /// KV heads; must divide --q-heads.
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value_t = 8)]
    pub kv_heads: usize,
    /// Head dimension.
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value_t = 128)]
    pub head_dim: usize,
    /// Decode steps timed, after a warm-up refresh cycle of 16.
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value_t = 32)]
    pub steps: usize,
    /// Write the results as JSON to FILE (checked writable before any work).
    #[arg(long, value_name = "FILE")]
    pub json: Option<String>,
    /// Workload seed.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
}

/// Sink and window of the default hip config (the workload puts its needles
/// between them).
const SINK: usize = 128;
const WINDOW: usize = 1024;

/// Checks every argument together (nothing runs when one is wrong);
/// returns the attention shape.
pub fn check(a: &BenchOffloadArgs) -> Result<AttnShape, String> {
    let shape = AttnShape::new(a.q_heads, a.kv_heads, a.head_dim)
        .map_err(|e| format!("--q-heads/--kv-heads/--head-dim: {e}"))?;
    let min = SINK + WINDOW + 65;
    if let Some(&t) = a.tokens.iter().find(|&&t| t < min) {
        return Err(format!(
            "--tokens {t} is too short: the minimum is {min} (sink {SINK} + window {WINDOW} + one 64-token needle chunk + 1)"
        ));
    }
    if let Some(path) = &a.json {
        check_writable("--json", path)?;
    }
    Ok(shape)
}

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
    let bar = crate::progress::steps(steps, "decode steps");
    for _ in 0..steps {
        bar.inc(1);
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
    bar.finish_and_clear();
    Ok((outs, times, stats))
}

pub fn run(a: &BenchOffloadArgs) -> Result<(), String> {
    let shape = check(a)?;
    let machine = crate::machine::describe();
    eprintln!("bench-offload on {machine}");
    let mut rows = Vec::new();
    let outcome = bench_all(a, &shape, &mut rows);
    // Whatever finished is reported, also when a later size failed.
    print_table(&rows);
    if let Some(path) = &a.json {
        write_json(path, &machine, a, &shape, &rows, outcome.as_ref().err())?;
        eprintln!("wrote {path}");
    }
    outcome
}

/// One full stage-1 refresh cycle before timing.
const WARM: usize = 16;

fn bench_all(a: &BenchOffloadArgs, shape: &AttnShape, rows: &mut Vec<Row>) -> Result<(), String> {
    let (shape, warm, steps, seed, est_frac) = (*shape, WARM, a.steps, a.seed, a.est_cache);
    for &t in &a.tokens {
        eprintln!("building a {t}-token needle sequence...");
        let w =
            needle_seq::<bf16>(shape, t, 64, SINK, WINDOW, 64, seed).map_err(|e| e.to_string())?;
        eprintln!("  resident: {} decode steps...", warm + steps);
        let mut res = engine(&shape, None, None)?;
        fill(&mut res, &w)?;
        let (ref_out, res_t, _) = decode_steps(&mut res, &w, warm + steps, seed)?;
        let kv_pages = res.stats()[0].pool.pages_in_use;
        let host_mib = res.stats()[0].pool.bytes_in_use as f64 / (1 << 20) as f64;
        drop(res);
        for &f in &a.cache {
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
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!(
        "{:>8} {:>6} {:>12} {:>11} {:>11} {:>6} {:>9} {:>13} {:>12} {:>8} {:>12} {:>10} {:>10} {:>9}",
        "tokens", "cache", "pages", "resident_ms", "offload_ms", "hit%", "blocks/st", "copied_MiB/st",
        "estim_MiB/st", "est_hit%", "est_copy_MiB", "device_MiB", "host_MiB", "max|diff|"
    );
    for r in rows {
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
}

/// The results as JSON; `error`: why the run stopped early (then
/// `"complete": false` and `results` holds the rows that finished).
fn write_json(
    path: &str,
    machine: &str,
    a: &BenchOffloadArgs,
    shape: &AttnShape,
    rows: &[Row],
    error: Option<&String>,
) -> Result<(), String> {
    {
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
        let doc = json!({"machine": machine, "backend": "cpu", "shape": {"q_heads": shape.n_q_heads, "kv_heads": shape.n_kv_heads, "head_dim": shape.head_dim, "dtype": "bf16"}, "steps": a.steps, "warmup_steps": WARM,
            "complete": error.is_none(), "error": error, "results": results});
        std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap())
            .map_err(|e| format!("writing {path}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn args(s: &str) -> BenchOffloadArgs {
        let argv = ["infinitehip", "bench-offload"]
            .into_iter()
            .chain(s.split_whitespace());
        match Cli::try_parse_from(argv).unwrap().command {
            Command::BenchOffload(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sink_and_window_are_the_default_hip_configs() {
        let c = infinitehip::config::HipConfig::default();
        assert_eq!((SINK, WINDOW), (c.sink, c.window));
    }

    #[test]
    fn every_size_and_the_path_are_checked_first() {
        let e = check(&args("--tokens 4K,1K")).unwrap_err();
        assert!(e.contains("--tokens 1024") && e.contains("1217"), "{e}");
        assert!(check(&args("--tokens 1217")).is_ok());
        let e = check(&args("--tokens 4K --json /nonexistent-dir/o.json")).unwrap_err();
        assert!(e.contains("/nonexistent-dir/o.json"), "{e}");
        let e = check(&args("--q-heads 6 --kv-heads 4")).unwrap_err();
        assert!(e.contains("--kv-heads"), "{e}");
    }

    #[test]
    fn finished_rows_are_written_when_a_later_size_fails() {
        let dir = std::env::temp_dir().join(format!("ihip-offload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("o.json");
        let path = path.to_str().unwrap();
        let a = args(&format!("--tokens 4K,8K --json {path}"));
        let shape = check(&a).unwrap();
        let row = Row {
            tokens: 4096,
            cache_fraction: 0.1,
            cache_pages: 7,
            kv_pages: 64,
            resident_ms: 1.0,
            offload_ms: 2.0,
            hit_ratio: 0.5,
            blocks_needed: 9.0,
            copied_mib_per_step: 0.1,
            estimation_mib_per_step: 0.2,
            est_hit_ratio: None,
            est_copied_mib_per_step: 0.0,
            device_mib: 1.0,
            host_mib: 2.0,
            max_abs_diff: 0.0,
            rel_error: 0.0,
        };
        let err = "8192: out of memory".to_string();
        write_json(path, "test", &a, &shape, &[row], Some(&err)).unwrap();
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(doc["complete"], false);
        assert_eq!(doc["error"], "8192: out of memory");
        assert_eq!(doc["results"][0]["tokens"], 4096);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
