//! The GPU checks as a test target (`--features cuda`; harness = false):
//! runs `infinitehip gpu-test` and `gpu-test-offload`, reports each of their
//! checks as a test, and fails when any check fails, when a command exits
//! non-zero (no GPU, no driver: a failure, never a silent pass), when a
//! command reports no checks, or when anything was skipped.
//!
//! Built here with `cargo test --release --features cuda -p infinitehip-cli
//! --test gpu --no-run`; run on the GPU machine from the build's target
//! directory (the CLI binary is found beside the test binary, or at
//! `$INFINITEHIP_BIN`).

use std::path::PathBuf;
use std::process::Command;

/// The commands whose checks this target runs (benchmarks stay in the CLI).
const COMMANDS: &[&[&str]] = &[
    &["gpu-test"],
    &["gpu-test", "--step-only"],
    &["gpu-test", "--rope-only"],
    &["gpu-test", "--hip-prefill-only"],
    &["gpu-test", "--hip-fast-cpu-only"],
    &["gpu-test-offload"],
];

fn cli() -> PathBuf {
    if let Some(p) = std::env::var_os("INFINITEHIP_BIN") {
        return p.into();
    }
    // target/<profile>/deps/gpu-<hash> -> target/<profile>/infinitehip
    let exe = std::env::current_exe().expect("test binary path");
    let beside = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("infinitehip"));
    match beside {
        Some(p) if p.is_file() => p,
        _ => env!("CARGO_BIN_EXE_infinitehip").into(),
    }
}

/// Outcome of one command's output: (passed, failed, skipped) check lines.
fn tally(name: &str, out: &str) -> (usize, usize, usize) {
    let (mut pass, mut fail, mut skip) = (0, 0, 0);
    for line in out.lines() {
        let (verdict, rest) = line.split_once(' ').unwrap_or((line, ""));
        match verdict {
            "PASS" => {
                println!("test {name}::{} ... ok", rest.trim());
                pass += 1;
            }
            "FAIL" => {
                println!("test {name}::{} ... FAILED", rest.trim());
                fail += 1;
            }
            v if v.eq_ignore_ascii_case("skip") || v.eq_ignore_ascii_case("skip:") => {
                println!(
                    "test {name}::{} ... SKIPPED (counted as a failure)",
                    rest.trim()
                );
                skip += 1;
            }
            _ => {}
        }
    }
    (pass, fail, skip)
}

fn main() {
    let bin = cli();
    let mut bad = Vec::new();
    let mut total = 0;
    for args in COMMANDS {
        let name = args.join(" ");
        let out = match Command::new(&bin).args(*args).output() {
            Ok(o) => o,
            Err(e) => {
                bad.push(format!("{name}: cannot run {}: {e}", bin.display()));
                continue;
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        let (pass, fail, skip) = tally(&name, &stdout);
        total += pass + fail;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(5).collect();
            bad.push(format!(
                "{name}: exit {} ({})",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ));
        }
        if pass + fail == 0 {
            bad.push(format!("{name}: reported no checks"));
        }
        if fail > 0 {
            bad.push(format!("{name}: {fail} checks failed"));
        }
        if skip > 0 {
            bad.push(format!("{name}: {skip} checks skipped"));
        }
    }
    if bad.is_empty() {
        println!("\ntest result: ok. {total} GPU checks passed");
    } else {
        println!("\ntest result: FAILED. {total} checks run");
        for b in &bad {
            println!("  {b}");
        }
        std::process::exit(1);
    }
}
