//! The command line: every command and flag, with its help (clap derive).
//! Flag values are parsed here; checks that need several flags together
//! (`--prefill` vs `--tokens`, output paths) run in each command's `plan`,
//! also before any work.

use clap::{Parser, Subcommand};

use crate::bench_cpu::BenchCpuArgs;
use crate::bench_offload::BenchOffloadArgs;
use crate::config_check::ConfigCheckArgs;
use crate::gpu_args::{
    BenchGpuArgs, BenchGpuDenseArgs, BenchGpuModelArgs, BenchGpuOffloadArgs, BenchGpuSparseArgs,
    GpuTestArgs, GpuTestOffloadArgs, NvrtcCheckArgs,
};
use crate::sim_est::SimEstRowsArgs;

/// Sparse attention and KV-cache policies for long contexts: benchmarks
/// and config tools
///
/// The GPU commands need a build with `--features cuda`.
///
/// Environment: INFINITEHIP_THREADS=N caps the worker threads (a whole
/// number >= 1; anything else is an error), INFINITEHIP_LOG=debug turns on
/// logs (tracing env-filter syntax, on stderr).
#[derive(Parser, Debug)]
#[command(name = "infinitehip", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    BenchCpu(BenchCpuArgs),
    BenchOffload(BenchOffloadArgs),
    /// Print the default policy config (Llama-3.1-8B shape) as JSON.
    ConfigDefault,
    ConfigCheck(ConfigCheckArgs),
    NvrtcCheck(NvrtcCheckArgs),
    GpuTest(GpuTestArgs),
    BenchGpu(BenchGpuArgs),
    BenchGpuDense(BenchGpuDenseArgs),
    BenchGpuModel(BenchGpuModelArgs),
    BenchGpuSparse(BenchGpuSparseArgs),
    GpuTestOffload(GpuTestOffloadArgs),
    BenchGpuOffload(BenchGpuOffloadArgs),
    SimEstRows(SimEstRowsArgs),
}

impl Command {
    /// The subcommand's name as typed (`bench-cpu`).
    pub fn name(&self) -> &'static str {
        match self {
            Command::BenchCpu(_) => "bench-cpu",
            Command::BenchOffload(_) => "bench-offload",
            Command::ConfigDefault => "config-default",
            Command::ConfigCheck(_) => "config-check",
            Command::NvrtcCheck(_) => "nvrtc-check",
            Command::GpuTest(_) => "gpu-test",
            Command::BenchGpu(_) => "bench-gpu",
            Command::BenchGpuDense(_) => "bench-gpu-dense",
            Command::BenchGpuModel(_) => "bench-gpu-model",
            Command::BenchGpuSparse(_) => "bench-gpu-sparse",
            Command::GpuTestOffload(_) => "gpu-test-offload",
            Command::BenchGpuOffload(_) => "bench-gpu-offload",
            Command::SimEstRows(_) => "sim-est-rows",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_and_flag_has_help() {
        let cli = Cli::command();
        let mut n = 0;
        for sub in cli.get_subcommands() {
            assert!(
                sub.get_about().is_some(),
                "command {} has no help",
                sub.get_name()
            );
            // The name() table matches clap's names.
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                assert!(
                    arg.get_help()
                        .is_some_and(|h| !h.to_string().trim().is_empty()),
                    "{} {id} has no help",
                    sub.get_name()
                );
                n += 1;
            }
        }
        assert!(n > 30, "only {n} flags found");
    }

    #[test]
    fn names_match_clap() {
        for (argv, name) in [
            ("config-default", "config-default"),
            ("config-check x.json", "config-check"),
            ("bench-cpu", "bench-cpu"),
            ("bench-offload", "bench-offload"),
            ("nvrtc-check", "nvrtc-check"),
            ("gpu-test", "gpu-test"),
            ("bench-gpu", "bench-gpu"),
            ("gpu-test-offload", "gpu-test-offload"),
            ("bench-gpu-offload", "bench-gpu-offload"),
            ("sim-est-rows", "sim-est-rows"),
        ] {
            let cli =
                Cli::try_parse_from(std::iter::once("infinitehip").chain(argv.split_whitespace()))
                    .unwrap();
            assert_eq!(cli.command.name(), name);
        }
    }

    /// Every invocation the repository's scripts, CI stages and docs make
    /// still parses (scripts/gpu-run.sh, scripts/gpu-check.sh,
    /// .ci/stages/nvrtc.sh, tests/gpu/logs/*/run.sh, README, BENCHMARKS).
    #[test]
    fn existing_invocations_still_parse() {
        for line in [
            "bench-cpu --tokens 32K,256K,1M --steps 16 --json out/bench-cpu.json",
            "bench-cpu --tokens 256K --policies hip,lazy,squeeze,locret-oracle,locret-random --steps 16 --json out/b.json",
            "bench-cpu --tokens=4K --prefill=512 --batch 2 --q-heads 8 --kv-heads 2 --head-dim 64 --budget 512 --seed 3",
            "bench-offload --tokens 1M --steps 32 --cache 0.05,0.01 --est-cache 0.25 --json out/o.json",
            "bench-offload --tokens 256K --steps 32 --cache 0.2,0.1,0.05 --q-heads 8 --kv-heads 8 --head-dim 64 --seed 1",
            "config-check configs/x.json",
            "nvrtc-check --arch compute_90 --into gpu-bin/ptx",
            "gpu-test --engine-timing 128K,1M",
            "gpu-test --hip-prefill-only",
            "gpu-test --hip-fast-cpu-only",
            "gpu-test --engine-only",
            "gpu-test --dense-only --seed 3",
            "bench-gpu-dense --tokens 128K,1M --batch 1,16 --groups 1,8 --dtypes bf16 --reps 5 --json d.json",
            "bench-gpu-model --tokens 128K,1M --batch 1,16 --layers 32 --dense-layers 3 --reps 3 --baseline s.json --json m.json",
            "gpu-test --policies-only --policy-timing --quick --seed 7 --hip-len 5000",
            "bench-gpu-sparse --tokens 1M --batch 1,16 --splits 0,128,512 --chunks 1,2 --reps 30 --json s.json",
            "gpu-test-offload",
            "gpu-test-offload --seed 4",
            "bench-gpu --baseline out/sdpa.json --json out/bench-gpu.json",
            "bench-gpu --prefill-only --prefill-tokens 32768,131072,1048576 --estimators fast --baseline s.json --json b.json",
            "bench-gpu --prefill-only --prefill-tokens 32768,131072 --estimators ref --baseline s.json --json b.json",
            "bench-gpu --tokens 32K --batch 1,16 --reps 3 --seed 1 --prefill-dense-max 65536 --estimators auto,fast",
            "bench-gpu-offload --tokens 1048576,4194304 --cache 0.05 --est-rows 0.25 --steps 48 --warmup 16 --json o.json",
            "bench-gpu-offload --tokens 1048576 --cache 0.05 --est-rows 0.05 --est-direct --admission device,host --seed 2",
            "bench-gpu-offload --tokens 1048576,4194304 --cache 0.05 --est-rows 0.25,0.5 --admission full-device --est-fetch warp --steps 48 --warmup 16 --est-admit half,all --est-reuse off,on --est-pin 0,2 --json o.json",
            "sim-est-rows --tokens 1M,4M --est-rows 0.25,0.5 --pin 0,1,2 --reuse off,on --admit 0.5,1.0 --unbounded --heads 4 --warmup 16 --steps 48 --json s.json",
        ] {
            let argv = std::iter::once("infinitehip").chain(line.split_whitespace());
            if let Err(e) = Cli::try_parse_from(argv) {
                panic!("`{line}` no longer parses:\n{e}");
            }
        }
    }

    #[test]
    fn list_defaults_split_like_typed_lists() {
        let parse = |line: &str| {
            Cli::try_parse_from(std::iter::once("infinitehip").chain(line.split_whitespace()))
                .unwrap()
                .command
        };
        match parse("bench-cpu") {
            Command::BenchCpu(a) => {
                assert_eq!(a.tokens, [262144]);
                assert_eq!(a.policies, ["hip"]);
            }
            c => panic!("{c:?}"),
        }
        match parse("bench-offload") {
            Command::BenchOffload(a) => assert_eq!(a.cache, [0.1, 0.05]),
            c => panic!("{c:?}"),
        }
        match parse("bench-gpu") {
            Command::BenchGpu(a) => {
                assert_eq!(a.tokens, [32768, 131072, 524288, 1048576]);
                assert_eq!(a.batch, [1, 16]);
                assert_eq!(a.prefill_tokens, [32768, 131072, 1048576]);
                assert_eq!(a.estimators, ["auto"]);
            }
            c => panic!("{c:?}"),
        }
        match parse("bench-gpu-offload") {
            Command::BenchGpuOffload(a) => {
                assert_eq!(a.tokens, [1 << 20, 4 << 20]);
                assert_eq!(a.cache, [0.05]);
                assert_eq!(a.est_rows, [0.05, 0.25]);
                assert_eq!(a.admission, ["device"]);
            }
            c => panic!("{c:?}"),
        }
        match parse("gpu-test") {
            Command::GpuTest(a) => assert_eq!((a.seed, a.hip_len), (0xC0DA, 200_000)),
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn errors_name_the_bad_argument() {
        let err = |line: &str| {
            Cli::try_parse_from(std::iter::once("infinitehip").chain(line.split_whitespace()))
                .unwrap_err()
                .to_string()
        };
        let e = err("bench-cpu --tokens 4K,1X");
        assert!(e.contains("--tokens") && e.contains("1X"), "{e}");
        let e = err("bench-cpu --policies hip,hop");
        assert!(
            e.contains("--policies") && e.contains("hop") && e.contains("lazy"),
            "{e}"
        );
        let e = err("bench-cpu --stesp 4");
        assert!(e.contains("--stesp") && e.contains("--steps"), "{e}");
        let e = err("bench-offload --cache 0.1,2");
        assert!(e.contains("--cache") && e.contains("`2`"), "{e}");
        let e = err("bench-gpu --estimators slow");
        assert!(e.contains("--estimators") && e.contains("slow"), "{e}");
        let e = err("config-check");
        assert!(e.contains("FILE"), "{e}");
        let e = err("bench-cpu --batch 0");
        assert!(e.contains("--batch"), "{e}");
    }
}
