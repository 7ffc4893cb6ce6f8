//! The `infinitehip` command: benchmarks and config tools.

mod args;
mod bench_cpu;
mod bench_offload;
mod bench_policies;
mod config_check;
#[cfg(feature = "cuda")]
mod gpu;
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
mod gpu_long_prefill;
#[cfg(feature = "cuda")]
mod gpu_model;
#[cfg(feature = "cuda")]
mod gpu_offload;
#[cfg(feature = "cuda")]
mod gpu_policies;
#[cfg(feature = "cuda")]
mod gpu_prefill_tc;
mod machine;

use infinitehip::PolicyConfig;

const USAGE: &str = "infinitehip <command> [options]
commands:
  bench-cpu        dense vs sparse policies on synthetic long-context attention (see bench-cpu --help)
  bench-offload    hip decode with all KV resident vs through a device page cache over the host tier
  config-default   print the default policy config (Llama-3.1-8B shape) as JSON
  config-check F   validate a policy config file; errors name the bad field
  nvrtc-check      compile every CUDA kernel with NVRTC (no GPU needed; feature cuda)
  gpu-test         CUDA kernels vs the CPU reference on fresh random inputs (feature cuda)
  bench-gpu        CUDA hip/dense decode at Llama-3.1-8B shape, JSON output (feature cuda)
  bench-gpu-dense  dense decode kernel vs the bytes-read floor (GQA 1-8, bf16/f16; feature cuda)
  bench-gpu-model  32-layer decode step (dense + hip layers) vs 32 dense layers (feature cuda)
  gpu-test-offload host tier + device page cache: round trips and decode vs all-resident (feature cuda)
  bench-gpu-offload hip decode with KV in pinned host memory and a device page cache (feature cuda)";

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("INFINITEHIP_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first() else {
        eprintln!("{USAGE}");
        std::process::exit(2);
    };
    let rest = &argv[1..];
    if let Err(e) = infinitehip::parallel::threads_from_env() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    if rest.iter().any(|a| a == "--help" || a == "-h") {
        match cmd.as_str() {
            "bench-cpu" => println!("{}", bench_cpu::HELP),
            "bench-offload" => println!("{}", bench_offload::HELP),
            "config-check" => println!("{}", config_check::HELP),
            _ => println!("{USAGE}"),
        }
        return;
    }
    let result = match cmd.as_str() {
        "bench-cpu" => bench_cpu::run(rest),
        "bench-offload" => bench_offload::run(rest),
        "config-default" => {
            println!("{}", PolicyConfig::default().to_json_pretty());
            Ok(())
        }
        "config-check" => config_check::run(rest),
        #[cfg(feature = "cuda")]
        "nvrtc-check" => gpu::nvrtc_check(rest),
        #[cfg(feature = "cuda")]
        "gpu-test" => gpu::gpu_test(rest),
        #[cfg(feature = "cuda")]
        "bench-gpu" => gpu::bench_gpu(rest),
        #[cfg(feature = "cuda")]
        "bench-gpu-dense" => gpu_dense::bench(rest),
        #[cfg(feature = "cuda")]
        "bench-gpu-model" => gpu_model::bench(rest),
        #[cfg(feature = "cuda")]
        "gpu-test-offload" => gpu_offload::test(rest),
        #[cfg(feature = "cuda")]
        "bench-gpu-offload" => gpu_offload::bench(rest),
        #[cfg(not(feature = "cuda"))]
        "nvrtc-check" | "gpu-test" | "bench-gpu" | "bench-gpu-dense" | "bench-gpu-model"
        | "gpu-test-offload" | "bench-gpu-offload" => Err(format!(
            "`{cmd}` needs a build with the GPU backend: cargo build --release --features cuda"
        )),
        "--help" | "-h" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command `{other}`\n{USAGE}")),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
