//! The `infinitehip` binary as a user runs it: help, version, argument
//! errors before any work, config errors, and small end-to-end benchmarks.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_infinitehip"));
    c.env_remove("INFINITEHIP_THREADS")
        .env("INFINITEHIP_THREADS", "1");
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A fresh directory under the system temp dir for one test.
fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ihip-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn version_and_help_for_every_command() {
    let o = run(&["--version"]);
    assert!(o.status.success());
    assert_eq!(
        stdout(&o).trim(),
        format!("infinitehip {}", env!("CARGO_PKG_VERSION"))
    );
    let o = run(&["--help"]);
    assert!(o.status.success());
    let top = stdout(&o);
    let commands = [
        "bench-cpu",
        "bench-offload",
        "config-default",
        "config-check",
        "nvrtc-check",
        "gpu-test",
        "bench-gpu",
        "gpu-test-offload",
        "bench-gpu-offload",
    ];
    for c in commands {
        assert!(top.contains(c), "top-level help lacks {c}:\n{top}");
        let o = run(&[c, "--help"]);
        assert!(o.status.success(), "{c} --help: {}", stderr(&o));
        let h = stdout(&o);
        assert!(
            h.contains(&format!("Usage: infinitehip {c}")),
            "{c} --help:\n{h}"
        );
    }
    // Flags are listed with their help and defaults.
    let h = stdout(&run(&["bench-offload", "--help"]));
    for flag in [
        "--tokens",
        "--cache",
        "--est-cache",
        "--steps",
        "--json",
        "--seed",
    ] {
        assert!(h.contains(flag), "bench-offload --help lacks {flag}");
    }
    assert!(h.contains("[default: 0.1,0.05]"), "{h}");
}

#[test]
fn no_command_or_unknown_command_is_a_usage_error() {
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("Usage: infinitehip"), "{}", stderr(&o));
    let o = run(&["bench-cup"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("bench-cup") && e.contains("bench-cpu"), "{e}");
}

#[test]
fn bad_flag_values_name_the_flag() {
    for (args, want) in [
        (&["bench-cpu", "--tokens", "4K,1X"][..], "--tokens"),
        (&["bench-cpu", "--steps", "0"][..], "--steps"),
        (&["bench-cpu", "--policies", "hip,fast"][..], "--policies"),
        (&["bench-offload", "--cache", "0.1,1.5"][..], "--cache"),
        (&["bench-offload", "--est-cache", "-1"][..], "--est-cache"),
        (&["bench-cpu", "--prefil", "4"][..], "--prefill"),
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let e = stderr(&o);
        assert!(e.contains(want), "{args:?}: {e}");
    }
}

/// `--tokens 4K,1K` used to run 4K, then fail on 1K and lose the rows: all
/// sizes, the prefill length and the output path are checked first.
#[test]
fn arguments_and_paths_are_checked_before_any_work() {
    let dir = tmp("upfront");
    let json = dir.join("x.json");
    let json = json.to_str().unwrap();
    for (args, want) in [
        (
            vec!["bench-cpu", "--tokens", "4K,1K", "--json", json],
            "--tokens 1024 is too short: the minimum is 1217",
        ),
        (vec!["bench-cpu", "--tokens", "1200"], "the minimum is 1217"),
        (
            vec!["bench-cpu", "--tokens", "4K", "--prefill", "5K"],
            "--prefill 5120 exceeds --tokens 4096",
        ),
        (
            vec![
                "bench-cpu",
                "--tokens",
                "4K",
                "--json",
                "/nonexistent-dir/x.json",
            ],
            "--json /nonexistent-dir/x.json",
        ),
        (
            vec!["bench-offload", "--tokens", "4K,1K", "--json", json],
            "--tokens 1024 is too short: the minimum is 1217",
        ),
        (
            vec![
                "bench-offload",
                "--tokens",
                "4K",
                "--json",
                "/nonexistent-dir/x.json",
            ],
            "--json /nonexistent-dir/x.json",
        ),
    ] {
        let t = Instant::now();
        let o = run(&args);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
        assert!(e.contains(want), "{args:?}: {e}");
        // Refused at once: no workload was built.
        assert!(!e.contains("building"), "{args:?}: {e}");
        assert!(t.elapsed() < Duration::from_secs(20));
        assert!(!std::path::Path::new(json).exists(), "{args:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_thread_count_is_an_error() {
    for v in ["abc", "0", "-2", "1.5"] {
        let o = bin()
            .env("INFINITEHIP_THREADS", v)
            .arg("config-default")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "INFINITEHIP_THREADS={v}");
        let e = stderr(&o);
        assert!(e.contains("INFINITEHIP_THREADS") && e.contains(v), "{e}");
    }
    let o = bin()
        .env("INFINITEHIP_THREADS", "2")
        .arg("config-default")
        .output()
        .unwrap();
    assert!(o.status.success());
}

#[test]
fn config_check_reports_field_paths_and_missing_files() {
    let dir = tmp("config");
    let check = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        run(&["config-check", p.to_str().unwrap()])
    };
    let o = check(
        "ok.json",
        r#"{"dense_layers": 2, "default": {"method": "hip"}}"#,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("layers 0-1: dense (dense_layers)"),
        "{}",
        stdout(&o)
    );
    for (name, text, want) in [
        (
            "dense-extra.json",
            r#"{"default": {"method": "dense", "window": 4}}"#,
            "default",
        ),
        (
            "override-dense-extra.json",
            r#"{"overrides": [{"layers": [1], "policy": {"method": "dense", "budget": 8}}]}"#,
            "overrides[0].policy",
        ),
        (
            "locret-missing.json",
            r#"{"default": {"method": "locret", "weights": "/nonexistent/w.safetensors"}}"#,
            "default.weights",
        ),
        (
            "negative.json",
            r#"{"default": {"method": "hip", "sink": -5}}"#,
            "`default.sink`: expected a whole number >= 0, got -5",
        ),
        ("array.json", r#"[1, 2]"#, "must be one JSON object"),
        ("no-method.json", r#"{"default": {"sink": 4}}"#, "method"),
    ] {
        let o = check(name, text);
        assert_eq!(o.status.code(), Some(1), "{name}");
        let e = stderr(&o);
        assert!(e.contains(want), "{name}: {e}");
        // The field path, not the file name, says where the error is.
        assert!(
            !e.contains(&format!("field `{}", dir.display())),
            "{name}: {e}"
        );
    }
    let o = run(&["config-check", "/nonexistent/c.json"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("/nonexistent/c.json"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_default_round_trips_through_config_check() {
    let dir = tmp("default");
    let o = run(&["config-default"]);
    assert!(o.status.success());
    let p = dir.join("default.json");
    std::fs::write(&p, &o.stdout).unwrap();
    let o = run(&["config-check", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A tiny bench-cpu run end to end: table on stdout, complete JSON.
#[test]
fn bench_cpu_small_run_writes_its_rows() {
    let dir = tmp("bench");
    let json = dir.join("b.json");
    let o = run(&[
        "bench-cpu",
        "--tokens",
        "1300,1400",
        "--q-heads",
        "2",
        "--kv-heads",
        "1",
        "--head-dim",
        "16",
        "--budget",
        "64",
        "--steps",
        "2",
        "--prefill",
        "8",
        "--policies",
        "hip,lazy",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["complete"], true);
    // 2 sizes x 2 policies x (decode + prefill).
    let rows = doc["results"].as_array().unwrap();
    assert_eq!(rows.len(), 8);
    for r in rows {
        let err = r["rel_error"].as_f64().unwrap();
        assert!(err.is_finite(), "{r}");
    }
    assert_eq!(stdout(&o).lines().count(), 9, "{}", stdout(&o));
    // Progress bars only on a terminal: none in piped stderr.
    assert!(!stderr(&o).contains("steps ["), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A tiny bench-offload run end to end: offloaded decode equals resident.
#[test]
fn bench_offload_small_run_writes_its_rows() {
    let dir = tmp("offload");
    let json = dir.join("o.json");
    let o = run(&[
        "bench-offload",
        "--tokens",
        "32K",
        "--q-heads",
        "2",
        "--kv-heads",
        "1",
        "--head-dim",
        "16",
        "--steps",
        "2",
        "--cache",
        "0.5",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["complete"], true);
    let rows = doc["results"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["max_abs_diff"].as_f64(), Some(0.0), "{}", rows[0]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_commands_say_what_build_they_need() {
    for c in [
        "nvrtc-check",
        "gpu-test",
        "bench-gpu",
        "gpu-test-offload",
        "bench-gpu-offload",
    ] {
        let o = run(&[c]);
        assert_eq!(o.status.code(), Some(1), "{c}");
        assert!(
            stderr(&o).contains("--features cuda"),
            "{c}: {}",
            stderr(&o)
        );
    }
}
