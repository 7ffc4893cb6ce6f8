//! `infinitehip bench-cpu`: dense attention vs each policy on the synthetic
//! needle workload, in one run. Decode is timed over a full mask-refresh
//! cycle (the amortised cost) and the refresh step alone is reported too.

use std::time::Instant;

use half::bf16;
use infinitehip::attention::{self, rel_error, AttnShape};
use infinitehip::config::{HipConfig, HipStage, ModelShape};
use infinitehip::parallel::{set_pool, Pool};
use infinitehip::policy::hip::HipPolicy;
use infinitehip::policy::lazy::LazySingleLayer;
use infinitehip::policy::{Phase, Policy, SelectRequest, Selection};
use infinitehip::rng::Rng;
use infinitehip::workload::{needle_seq, NeedleSeq};
use serde_json::json;

use crate::args::{check_writable, parse_count, parse_positive};

/// Dense attention vs sparse policies on a synthetic needle workload (CPU)
///
/// Each policy against dense attention on a synthetic long-context needle
/// workload (bf16 K/V), in one run: a table on stdout, JSON on request.
/// Decode is timed over a full mask-refresh cycle (the amortised cost); the
/// refresh step alone is reported too. Every argument, size and output path
/// is checked before any work; when a later size fails, the rows that
/// finished are still printed and written (`"complete": false`).
#[derive(clap::Args, Debug)]
pub struct BenchCpuArgs {
    /// Context lengths, comma-separated (K = 1024, M = 1024K); each at least
    /// 1217 tokens (sink 128 + window 1024 + one 64-token needle chunk + 1).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_count,
          default_value = "256K")]
    pub tokens: Vec<usize>,
    /// Sequences per decode step.
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value_t = 1)]
    pub batch: usize,
    /// Query heads (the defaults are Llama-3.1-8B's shape).
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value_t = 32)]
    pub q_heads: usize,
    /// KV heads; must divide --q-heads.
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value_t = 8)]
    pub kv_heads: usize,
    /// Head dimension.
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value_t = 128)]
    pub head_dim: usize,
    /// hip tokens attended beyond sink + window (a positive multiple of 8).
    #[arg(long, value_name = "N", value_parser = parse_count, default_value_t = 2048)]
    pub budget: usize,
    /// Policies to time, comma-separated.
    ///
    /// hip: hierarchical top-k mask, refreshed every 4-16 steps.
    ///
    /// lazy: one pruning layer keeping as many prompt tokens as hip attends,
    /// importance recomputed every step.
    ///
    /// squeeze: 256 clusters per KV head, 32-query calibration window,
    /// quantile 0.9.
    ///
    /// locret-oracle: retaining heads that score k.u (u: the direction the
    /// queries look for), a stand-in for trained heads.
    ///
    /// locret-random: random retaining heads.
    ///
    /// hip-mean-key: hip with `decode_stage0` mean_key (stage 0 ranks
    /// chunks by their cached mean keys; the first step averages them).
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "hip",
          value_parser = ["hip", "hip-mean-key", "lazy", "squeeze", "locret-oracle", "locret-random"])]
    pub policies: Vec<String>,
    /// Decode steps timed (16 = the longest refresh interval).
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value_t = 16)]
    pub steps: usize,
    /// Also time a causal prefill of the context's last N queries (0: none;
    /// at most the shortest --tokens).
    #[arg(long, value_name = "N", value_parser = parse_count, default_value_t = 0)]
    pub prefill: usize,
    /// Write the results as JSON to FILE (checked writable before any work).
    #[arg(long, value_name = "FILE")]
    pub json: Option<String>,
    /// Workload seed.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
    /// Where the CPU work runs, comma-separated; each row runs once per pool
    /// (interleaved, same inputs). rayon: the persistent worker pool (the
    /// default); scoped: OS threads spawned per parallel call.
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "rayon",
          value_parser = ["rayon", "scoped"])]
    pub pool: Vec<String>,
}

pub struct Row {
    pub pool: &'static str,
    pub policy: String,
    pub phase: &'static str,
    pub tokens: usize,
    pub batch: usize,
    pub dense_ms: f64,
    pub ours_ms: f64,
    pub refresh_ms: Option<f64>,
    pub rel_error: f64,
    pub needle_recall: f64,
}

/// Policies timed through the whole engine (batch 1, decode only).
const ENGINE_POLICIES: &[&str] = &["locret-oracle", "locret-random", "squeeze"];

fn hip_config(budget: usize) -> HipConfig {
    let mut c = HipConfig::default();
    // Keep the default stage ratios (4x, 2x, 1x the budget).
    c.stages = vec![
        HipStage {
            chunk_size: 64,
            keep_tokens: budget * 4,
            refresh_interval: 16,
        },
        HipStage {
            chunk_size: 16,
            keep_tokens: budget * 2,
            refresh_interval: 8,
        },
        HipStage {
            chunk_size: 8,
            keep_tokens: budget,
            refresh_interval: 4,
        },
    ];
    c
}

/// The model shape the synthetic workload stands for.
fn model(shape: &AttnShape) -> ModelShape {
    ModelShape {
        n_layers: 1,
        n_q_heads: shape.n_q_heads,
        n_kv_heads: shape.n_kv_heads,
        head_dim: shape.head_dim,
        ..ModelShape::default()
    }
}

/// `tokens`: the context length (lazy keeps the same token count as hip).
fn make_policy(
    name: &str,
    budget: usize,
    shape: &AttnShape,
    tokens: usize,
) -> Result<Box<dyn Policy>, String> {
    match name {
        "lazy" => {
            let keep = ((128 + 1024 + budget) as f32 / tokens.max(1) as f32).min(1.0);
            Ok(Box::new(
                LazySingleLayer::new(keep).map_err(|e| e.to_string())?,
            ))
        }
        "hip" => Ok(Box::new(
            HipPolicy::new(hip_config(budget), &model(shape)).map_err(|e| e.to_string())?,
        )),
        "hip-mean-key" => {
            let cfg = HipConfig {
                decode_stage0: infinitehip::config::DecodeStage0::MeanKey,
                ..hip_config(budget)
            };
            Ok(Box::new(
                HipPolicy::new(cfg, &model(shape)).map_err(|e| e.to_string())?,
            ))
        }
        other => Err(format!(
            "bench-cpu: unknown policy `{other}` (available: hip, hip-mean-key, lazy, squeeze, locret-oracle, locret-random)"
        )),
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One decode selection per sequence (`q`: `[batch][q_elems]`).
fn select_all<V: infinitehip::kv::KvRead>(
    pols: &mut [Box<dyn Policy>],
    views: &[V],
    shape: &AttnShape,
    q: &[f32],
) -> Result<Vec<Selection>, String> {
    let qe = shape.q_elems();
    pols.iter_mut()
        .zip(views)
        .enumerate()
        .map(|(i, (p, v))| {
            let req = SelectRequest {
                seq: 0,
                shape: *shape,
                phase: Phase::Decode,
                queries: &q[i * qe..(i + 1) * qe],
                q_start: v.len() - 1,
                kv: v,
            };
            Ok(p.select(&req)
                .map_err(|e| e.to_string())?
                .blocks
                .swap_remove(0))
        })
        .collect()
}

fn bench_decode(
    name: &str,
    seqs: &mut [NeedleSeq<bf16>],
    shape: &AttnShape,
    budget: usize,
    steps: usize,
    seed: u64,
) -> Result<Row, String> {
    let b = seqs.len();
    let tokens = seqs[0].pool.seq_len(0).map_err(|e| e.to_string())?;
    let mut pols: Vec<Box<dyn Policy>> = (0..b)
        .map(|_| make_policy(name, budget, shape, tokens))
        .collect::<Result<_, _>>()?;
    let mut rng = Rng::new(seed ^ 0xdec0de);
    if name == "hip-mean-key" {
        // An untimed cycle first: its first step averages every stage-0
        // chunk (once per sequence); the timed cycle then starts at a
        // stage-0 refresh (`steps`, 16 by default, is a multiple of every
        // interval) reading cached means, as a long decode does.
        let bar = crate::progress::steps(steps, "warm-up cycle (builds the chunk means)");
        for i in 0..steps {
            bar.inc(1);
            let q: Vec<f32> = seqs.iter().flat_map(|s| s.query(&mut rng)).collect();
            let views: Vec<_> = seqs.iter().map(|s| s.pool.view(0).unwrap()).collect();
            let t = Instant::now();
            select_all(&mut pols, &views, shape, &q)?;
            if i == 0 {
                eprintln!(
                    "  {name}: first selection (averages every stage-0 chunk) {:.1} ms",
                    ms(t)
                );
            }
            drop(views);
            for s in seqs.iter_mut() {
                s.append_random(&mut rng).map_err(|e| e.to_string())?;
            }
        }
        bar.finish_and_clear();
    }
    let (mut dense_t, mut ours_t) = (Vec::new(), Vec::new());
    let (mut max_err, mut recall_sum) = (0f64, 0f64);
    let bar = crate::progress::steps(steps, "decode steps");
    for _ in 0..steps {
        bar.inc(1);
        let q: Vec<f32> = seqs.iter().flat_map(|s| s.query(&mut rng)).collect();
        let views: Vec<_> = seqs.iter().map(|s| s.pool.view(0).unwrap()).collect();
        let mut dense = vec![0f32; q.len()];
        let t = Instant::now();
        attention::decode(shape, &q, &views, None, &mut dense).map_err(|e| e.to_string())?;
        dense_t.push(ms(t));
        let mut ours = vec![f32::NAN; q.len()];
        let t = Instant::now();
        let sels = select_all(&mut pols, &views, shape, &q)?;
        attention::decode(shape, &q, &views, Some(&sels), &mut ours).map_err(|e| e.to_string())?;
        ours_t.push(ms(t));
        let dense64: Vec<f64> = dense.iter().map(|&x| x as f64).collect();
        max_err = max_err.max(rel_error(&ours, &dense64));
        recall_sum += seqs
            .iter()
            .zip(&sels)
            .map(|(s, sel)| s.recall(sel))
            .sum::<f64>()
            / b as f64;
        drop(views);
        for s in seqs.iter_mut() {
            s.append_random(&mut rng).map_err(|e| e.to_string())?;
        }
    }
    bar.finish_and_clear();
    Ok(Row {
        pool: "",
        policy: name.into(),
        phase: "decode",
        tokens,
        batch: b,
        dense_ms: median(&mut dense_t.clone()),
        ours_ms: ours_t.iter().sum::<f64>() / steps as f64,
        refresh_ms: Some(ours_t[0]),
        rel_error: max_err,
        needle_recall: recall_sum / steps as f64,
    })
}

fn bench_prefill(
    name: &str,
    s: &NeedleSeq<bf16>,
    shape: &AttnShape,
    budget: usize,
    n: usize,
    seed: u64,
) -> Result<Row, String> {
    let view = s.pool.view(0).map_err(|e| e.to_string())?;
    let len = view.len();
    if n > len {
        return Err(format!("--prefill {n} exceeds the context ({len} tokens)"));
    }
    let mut rng = Rng::new(seed ^ 0x9e1f);
    let q: Vec<f32> = (0..n).flat_map(|_| s.query(&mut rng)).collect();
    let mut dense = vec![0f32; q.len()];
    let t = Instant::now();
    attention::prefill(shape, &q, len - n, &view, None, &mut dense).map_err(|e| e.to_string())?;
    let dense_ms = ms(t);
    let mut pol = make_policy(name, budget, shape, len)?;
    let mut ours = vec![f32::NAN; q.len()];
    let t = Instant::now();
    let req = SelectRequest {
        seq: 0,
        shape: *shape,
        phase: Phase::Prefill,
        queries: &q,
        q_start: len - n,
        kv: &view,
    };
    let out = pol.select(&req).map_err(|e| e.to_string())?;
    attention::prefill(
        shape,
        &q,
        len - n,
        &view,
        Some((&out.blocks, out.q_block)),
        &mut ours,
    )
    .map_err(|e| e.to_string())?;
    let ours_ms = ms(t);
    let dense64: Vec<f64> = dense.iter().map(|&x| x as f64).collect();
    let recall = out.blocks.iter().map(|b| s.recall(b)).sum::<f64>() / out.blocks.len() as f64;
    Ok(Row {
        pool: "",
        policy: name.into(),
        phase: "prefill",
        tokens: len,
        batch: 1,
        dense_ms,
        ours_ms,
        refresh_ms: None,
        rel_error: rel_error(&ours, &dense64),
        needle_recall: recall,
    })
}

/// Every argument of one run, checked before any work starts.
struct Plan {
    tokens: Vec<usize>,
    batch: usize,
    shape: AttnShape,
    budget: usize,
    policies: Vec<String>,
    steps: usize,
    prefill: usize,
    seed: u64,
    pools: Vec<Pool>,
    json: Option<String>,
}

/// Shortest context the workload supports: sink + window + one 64-token
/// needle chunk + 1 (the needles sit between sink and window).
fn min_tokens(cfg: &HipConfig) -> usize {
    cfg.sink + cfg.window + 65
}

fn plan(a: &BenchCpuArgs) -> Result<Plan, String> {
    let shape = AttnShape::new(a.q_heads, a.kv_heads, a.head_dim)
        .map_err(|e| format!("--q-heads/--kv-heads/--head-dim: {e}"))?;
    let budget = a.budget;
    if budget == 0 || budget % 8 != 0 {
        return Err(format!(
            "--budget {budget}: must be a positive multiple of 8"
        ));
    }
    for p in &a.policies {
        if !ENGINE_POLICIES.contains(&p.as_str()) {
            make_policy(p, budget, &shape, 1 << 20).map_err(|e| format!("--policies {p}: {e}"))?;
        }
    }
    let cfg = hip_config(budget);
    let min = min_tokens(&cfg);
    if let Some(&t) = a.tokens.iter().find(|&&t| t < min) {
        return Err(format!(
            "--tokens {t} is too short: the minimum is {min} (sink {} + window {} + one 64-token needle chunk + 1)",
            cfg.sink, cfg.window
        ));
    }
    if let Some(&t) = a.tokens.iter().find(|&&t| a.prefill > t) {
        return Err(format!(
            "--prefill {} exceeds --tokens {t} (prefill queries are the context's last ones)",
            a.prefill
        ));
    }
    if let Some(path) = &a.json {
        check_writable("--json", path)?;
    }
    Ok(Plan {
        tokens: a.tokens.clone(),
        batch: a.batch,
        shape,
        budget,
        policies: a.policies.clone(),
        steps: a.steps,
        prefill: a.prefill,
        seed: a.seed,
        pools: a
            .pool
            .iter()
            .map(|p| {
                if p == "scoped" {
                    Pool::Scoped
                } else {
                    Pool::Rayon
                }
            })
            .collect(),
        json: a.json.clone(),
    })
}

/// Checks every argument (nothing runs when one is wrong).
pub fn check(a: &BenchCpuArgs) -> Result<(), String> {
    plan(a).map(drop)
}

pub fn run(a: &BenchCpuArgs) -> Result<(), String> {
    let p = plan(a)?;
    let machine = crate::machine::describe();
    eprintln!("bench-cpu on {machine}");
    let mut rows = Vec::new();
    let outcome = bench_all(&p, &mut rows);
    set_pool(Pool::Rayon);
    // Whatever finished is reported, also when a later size failed.
    print_table(&rows);
    if let Some(path) = &p.json {
        write_json(path, &machine, &p, &rows, outcome.as_ref().err())?;
        eprintln!("wrote {path}");
    }
    outcome
}

fn bench_all(p: &Plan, rows: &mut Vec<Row>) -> Result<(), String> {
    let (shape, budget, steps, seed, batch) = (p.shape, p.budget, p.steps, p.seed, p.batch);
    for &t in &p.tokens {
        let cfg = hip_config(budget);
        eprintln!("building {batch} x {t}-token needle sequence(s) ({} q heads, {} kv heads, head_dim {}, bf16)...", shape.n_q_heads, shape.n_kv_heads, shape.head_dim);
        let mut seqs: Vec<NeedleSeq<bf16>> = (0..batch)
            .map(|i| {
                needle_seq(
                    shape,
                    t,
                    64,
                    cfg.sink,
                    cfg.window,
                    64,
                    seed * 1000 + i as u64,
                )
            })
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        for (name, &pool) in p
            .policies
            .iter()
            .flat_map(|n| p.pools.iter().map(move |q| (n, q)))
        {
            set_pool(pool);
            let pool_name = pool.name();
            if ENGINE_POLICIES.contains(&name.as_str()) {
                eprintln!(
                    "  {name}: prepare (prompt, scoring or clustering), then decode, {steps} steps..."
                );
                let row = match name.as_str() {
                    "squeeze" => crate::bench_policies::bench_squeeze(&mut seqs[0], steps, seed)?,
                    "locret-oracle" => crate::bench_policies::bench_locret(
                        &mut seqs[0],
                        budget,
                        steps,
                        seed,
                        true,
                    )?,
                    _ => crate::bench_policies::bench_locret(
                        &mut seqs[0],
                        budget,
                        steps,
                        seed,
                        false,
                    )?,
                };
                rows.push(Row {
                    pool: pool_name,
                    ..row
                });
                continue;
            }
            eprintln!("  {name}: decode, {steps} steps ({pool_name} pool)...");
            let row = bench_decode(name, &mut seqs, &shape, budget, steps, seed)?;
            rows.push(Row {
                pool: pool_name,
                ..row
            });
            if p.prefill > 0 {
                eprintln!("  {name}: prefill of {} queries...", p.prefill);
                let row = bench_prefill(name, &seqs[0], &shape, budget, p.prefill, seed)?;
                rows.push(Row {
                    pool: pool_name,
                    ..row
                });
            }
        }
    }
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<7} {:<14} {:<8} {:>9} {:>5} {:>11} {:>11} {:>12} {:>8} {:>10} {:>7}",
        "pool",
        "policy",
        "phase",
        "tokens",
        "batch",
        "dense_ms",
        "ours_ms",
        "refresh_ms",
        "speedup",
        "rel_err",
        "recall"
    );
    for r in rows {
        println!(
            "{:<7} {:<14} {:<8} {:>9} {:>5} {:>11.2} {:>11.2} {:>12} {:>7.1}x {:>10.2e} {:>7.3}",
            r.pool,
            r.policy,
            r.phase,
            r.tokens,
            r.batch,
            r.dense_ms,
            r.ours_ms,
            r.refresh_ms.map_or("-".into(), |x| format!("{x:.2}")),
            r.dense_ms / r.ours_ms,
            r.rel_error,
            r.needle_recall
        );
    }
}

/// The results as JSON; `error`: why the run stopped early (then
/// `"complete": false` and `results` holds the rows that finished).
fn write_json(
    path: &str,
    machine: &str,
    p: &Plan,
    rows: &[Row],
    error: Option<&String>,
) -> Result<(), String> {
    let results: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({
                "pool": r.pool, "policy": r.policy, "phase": r.phase, "tokens": r.tokens, "batch": r.batch,
                "dense_ms": r.dense_ms, "ours_ms": r.ours_ms, "refresh_ms": r.refresh_ms,
                "speedup": r.dense_ms / r.ours_ms, "rel_error": r.rel_error, "needle_recall": r.needle_recall,
            })
        })
        .collect();
    let shape = &p.shape;
    let doc = json!({"machine": machine, "shape": {"q_heads": shape.n_q_heads, "kv_heads": shape.n_kv_heads, "head_dim": shape.head_dim, "dtype": "bf16"}, "budget": p.budget, "steps": p.steps,
        "complete": error.is_none(), "error": error, "results": results});
    std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap())
        .map_err(|e| format!("writing {path}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn args(s: &str) -> BenchCpuArgs {
        let argv = ["infinitehip", "bench-cpu"]
            .into_iter()
            .chain(s.split_whitespace());
        match Cli::try_parse_from(argv).unwrap().command {
            Command::BenchCpu(a) => a,
            other => panic!("{other:?}"),
        }
    }

    fn plan_of(s: &str) -> Result<Plan, String> {
        plan(&args(s))
    }

    #[test]
    fn stated_minimum_matches_the_workload() {
        let min = min_tokens(&hip_config(2048));
        let help = <Cli as clap::CommandFactory>::command()
            .find_subcommand("bench-cpu")
            .unwrap()
            .get_arguments()
            .find(|a| a.get_id() == "tokens")
            .unwrap()
            .get_help()
            .unwrap()
            .to_string();
        assert!(help.contains(&format!("at least {min} tokens")), "{help}");
    }

    #[test]
    fn budget_and_shape_errors_name_the_flag() {
        let e = plan_of("--tokens 4K --budget 100").err().unwrap();
        assert!(e.starts_with("--budget 100"), "{e}");
        let e = plan_of("--tokens 4K --q-heads 6 --kv-heads 4")
            .err()
            .unwrap();
        assert!(e.contains("--kv-heads"), "{e}");
    }

    #[test]
    fn every_size_is_checked_before_any_work() {
        // 4K is fine, 1K is below the minimum: refused up front, naming it.
        let e = plan_of("--tokens 4K,1K").err().unwrap();
        assert!(
            e.contains("--tokens 1024") && e.contains("minimum is 1217"),
            "{e}"
        );
        assert!(plan_of("--tokens 1217").is_ok());
        let e = plan_of("--tokens 1216").err().unwrap();
        assert!(e.contains("1217"), "{e}");
        let e = plan_of("--tokens 4K,2K --prefill 3000").err().unwrap();
        assert!(e.contains("--prefill 3000") && e.contains("2048"), "{e}");
        let e = plan_of("--tokens 4K --json /nonexistent-dir/x.json")
            .err()
            .unwrap();
        assert!(e.contains("/nonexistent-dir/x.json"), "{e}");
    }

    #[test]
    fn finished_rows_are_written_when_a_later_size_fails() {
        let dir = std::env::temp_dir().join(format!("ihip-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.json");
        let path = path.to_str().unwrap();
        let p = plan_of(&format!("--tokens 4K,1300 --json {path}")).unwrap();
        let row = Row {
            pool: "rayon",
            policy: "hip".into(),
            phase: "decode",
            tokens: 4096,
            batch: 1,
            dense_ms: 2.0,
            ours_ms: 1.0,
            refresh_ms: Some(1.5),
            rel_error: 1e-3,
            needle_recall: 1.0,
        };
        write_json(path, "test", &p, &[row], Some(&"1300: failed".to_string())).unwrap();
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(doc["complete"], false);
        assert_eq!(doc["error"], "1300: failed");
        assert_eq!(doc["results"][0]["tokens"], 4096);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
