//! The `infinitehip` command: benchmarks and config tools.

mod args;
mod bench_cpu;
mod bench_offload;
mod bench_policies;
mod cli;
mod config_check;
#[cfg(feature = "cuda")]
mod gpu;
mod gpu_args;
#[cfg(feature = "cuda")]
mod gpu_dense;
#[cfg(feature = "cuda")]
mod gpu_engine;
#[cfg(feature = "cuda")]
mod gpu_engine_locret;
#[cfg(feature = "cuda")]
mod gpu_engine_policies;
#[cfg(feature = "cuda")]
mod gpu_hip_fast;
#[cfg(feature = "cuda")]
mod gpu_kmeans;
#[cfg(feature = "cuda")]
mod gpu_long_prefill;
#[cfg(feature = "cuda")]
mod gpu_model;
#[cfg(feature = "cuda")]
mod gpu_model_engine;
#[cfg(feature = "cuda")]
mod gpu_offload;
#[cfg(feature = "cuda")]
mod gpu_policies;
#[cfg(feature = "cuda")]
mod gpu_prefill_tc;
#[cfg(feature = "cuda")]
mod gpu_rope;
#[cfg(feature = "cuda")]
mod gpu_rope_engine;
#[cfg(feature = "cuda")]
mod gpu_rope_prefill;
#[cfg(feature = "cuda")]
mod gpu_score;
#[cfg(feature = "cuda")]
mod gpu_sparse;
#[cfg(feature = "cuda")]
mod gpu_sparse_probe;
#[cfg(feature = "cuda")]
mod gpu_step;
mod machine;
mod progress;
mod sim_est;

use clap::{CommandFactory, Parser};
use cli::{Cli, Command};
use infinitehip::PolicyConfig;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("INFINITEHIP_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // --help, --version and flag errors exit here (usage errors: status 2).
    let cli = Cli::parse();
    if let Err(e) = infinitehip::parallel::threads_from_env() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    if let Err(e) = checks(&cli.command) {
        // Bad arguments found before any work: reported like clap's own
        // usage errors (the command's usage line, status 2).
        let mut cmd = Cli::command();
        cmd.build();
        let sub = cmd
            .find_subcommand_mut(cli.command.name())
            .expect("known command");
        sub.error(clap::error::ErrorKind::ValueValidation, e).exit();
    }
    if let Err(e) = run(cli.command) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// What can be checked without doing any work: the arguments of `cmd`
/// taken together (values alone are checked by clap).
fn checks(cmd: &Command) -> Result<(), String> {
    match cmd {
        Command::BenchCpu(a) => bench_cpu::check(a),
        Command::BenchOffload(a) => bench_offload::check(a).map(drop),
        Command::SimEstRows(a) => sim_est::check(a),
        // Without the GPU backend `run` says what to build instead.
        Command::BenchGpu(a) if cfg!(feature = "cuda") => a.check().map(drop),
        Command::BenchGpuOffload(a) if cfg!(feature = "cuda") => a.check(),
        _ => Ok(()),
    }
}

fn run(cmd: Command) -> Result<(), String> {
    match cmd {
        Command::BenchCpu(a) => bench_cpu::run(&a),
        Command::BenchOffload(a) => bench_offload::run(&a),
        Command::ConfigDefault => {
            println!("{}", PolicyConfig::default().to_json_pretty());
            Ok(())
        }
        Command::ConfigCheck(a) => config_check::run(&a),
        Command::SimEstRows(a) => sim_est::run(&a),
        #[cfg(feature = "cuda")]
        Command::NvrtcCheck(a) => gpu::nvrtc_check(&a),
        #[cfg(feature = "cuda")]
        Command::GpuTest(a) => gpu::gpu_test(&a),
        #[cfg(feature = "cuda")]
        Command::BenchGpu(a) => gpu::bench_gpu(&a),
        #[cfg(feature = "cuda")]
        Command::BenchGpuDense(a) => gpu_dense::bench(&a),
        #[cfg(feature = "cuda")]
        Command::BenchGpuModel(a) => gpu_model::bench(&a),
        #[cfg(feature = "cuda")]
        Command::BenchGpuSparse(a) => gpu_sparse::bench(&a),
        #[cfg(feature = "cuda")]
        Command::GpuTestOffload(a) => gpu_offload::test(&a),
        #[cfg(feature = "cuda")]
        Command::BenchGpuOffload(a) => gpu_offload::bench(&a),
        #[cfg(not(feature = "cuda"))]
        Command::NvrtcCheck(_)
        | Command::GpuTest(_)
        | Command::BenchGpu(_)
        | Command::BenchGpuDense(_)
        | Command::BenchGpuModel(_)
        | Command::BenchGpuSparse(_)
        | Command::GpuTestOffload(_)
        | Command::BenchGpuOffload(_) => Err(format!(
            "`{}` needs a build with the GPU backend: cargo build --release -p infinitehip-cli --features cuda",
            cmd.name()
        )),
    }
}
