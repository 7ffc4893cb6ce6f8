//! Flags of the GPU commands. Defined in every build (not only with the
//! `cuda` feature) so `--help` and argument errors work everywhere and a
//! build without CUDA can say what the command needs.

use clap::Args;

use crate::args::{parse_count, parse_fraction, parse_positive};

/// Compile every CUDA kernel with NVRTC (needs libnvrtc, no GPU)
#[derive(Args, Debug)]
pub struct NvrtcCheckArgs {
    /// Target virtual architecture passed to NVRTC.
    #[arg(long, value_name = "ARCH", default_value = "compute_90")]
    pub arch: String,
    /// Keep the compiled PTX in DIR (a kernel cache to carry to a GPU
    /// machine; its old .ptx files are removed first). Default: a fresh
    /// temporary directory, so a stale cache cannot make the check pass.
    #[arg(long, value_name = "DIR")]
    pub into: Option<String>,
    /// Only these modules, comma-separated (with --into, the other .ptx
    /// files there are kept).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub only: Vec<String>,
}

/// CUDA kernels vs the CPU reference on fresh random inputs (GPU)
///
/// Prints PASS or FAIL per check; exits non-zero when any check fails.
#[derive(Args, Debug)]
pub struct GpuTestArgs {
    /// Seed of the random inputs.
    #[arg(long, value_name = "N", default_value_t = 0xC0DA)]
    pub seed: u64,
    /// Longest sequence of the hip decode check (tokens).
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value_t = 200_000)]
    pub hip_len: usize,
    /// Also time the engine path (GpuAttention) at these context lengths,
    /// comma-separated (e.g. 128K,1M).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_positive)]
    pub engine_timing: Vec<usize>,
    /// Only the policy (locret, squeeze, lazy) and engine-path checks: no
    /// attention-kernel or tensor-core prefill checks.
    #[arg(long)]
    pub policies_only: bool,
    /// Only the engine-path checks.
    #[arg(long)]
    pub engine_only: bool,
    /// Only the hip prefill mask-estimator checks (reference == CPU policy,
    /// fast vs reference, engine path).
    #[arg(long)]
    pub hip_prefill_only: bool,
    /// Only the check that the GPU fast (tensor-core) mask estimator's
    /// selections equal the CPU policy's twin (`hip.mask_estimator` fast).
    #[arg(long)]
    pub hip_fast_cpu_only: bool,
    /// Only the dense decode kernel checks (kernels/decode_dense.cu).
    #[arg(long)]
    pub dense_only: bool,
    /// Only the checks of InfiniteHiP's RoPE modes on the GPU hip decode
    /// (rope.scoring chunk_indexed/relative, rope.attention streaming) vs
    /// the CPU HipPolicy.
    #[arg(long)]
    pub rope_only: bool,
    /// Time the RoPE modes vs original positions (hip decode steps) at
    /// these context lengths, comma-separated (e.g. 128K,1M): after the
    /// --rope-only checks, or alone (no other check runs).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_positive)]
    pub rope_timing: Vec<usize>,
    /// Only the graph-capturable hip decode step checks (device metadata
    /// == host metadata, CUDA graph replay == eager).
    #[arg(long)]
    pub step_only: bool,
    /// Attend through split-K partials + combine (kernels/decode.cu) in
    /// every hip check (default: the sparse v2 kernel,
    /// kernels/decode_dense_v2.cu hip_sparse_*; the step checks run
    /// sparse v2 decoders beside the chosen ones anyway).
    #[arg(long)]
    pub split_combine: bool,
    /// Accepted for older scripts: sparse v2 is the default now.
    #[arg(long, conflicts_with = "split_combine")]
    pub sparse_v2: bool,
    /// Score hip stages with the per-thread kernel (`hip_score*`, the
    /// reference) instead of the warp kernel (`hip_scorew*`).
    #[arg(long)]
    pub score_v1: bool,
    /// Default chunks per iteration of every dense v2 launch (0: the
    /// built-in default, 2 at page sizes >= 16, else 1).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub dense_chunks: usize,
    /// Run the dense decode checks on the previous kernel
    /// (kernels/decode_dense.cu; default: decode_dense_v2.cu).
    #[arg(long)]
    pub dense_v1: bool,
    /// Also time the policy kernels against the CPU code they replace.
    #[arg(long)]
    pub policy_timing: bool,
    /// Accepted for older scripts; has no effect.
    #[arg(long)]
    pub quick: bool,
    /// Only the squeeze k-means checks (GPU == CPU reference).
    #[arg(long)]
    pub kmeans_only: bool,
    /// Only the engine's decode case (dense, hip and covering layers over a
    /// token-major pool on a caller stream): a quick check of the route
    /// SGLang and llama.cpp take.
    #[arg(long)]
    pub engine_decode_only: bool,
    /// Also time a squeeze layer's first decode (prefix clustering) at
    /// these prompt lengths, comma-separated (e.g. 8K,32K,128K): k-means on
    /// the GPU, and on the host up to --squeeze-cpu-max.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_positive)]
    pub squeeze_first_decode: Vec<usize>,
    /// Longest prompt whose first decode is also timed with the host k-means.
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value_t = 8192)]
    pub squeeze_cpu_max: usize,
}

/// CUDA hip and dense decode and prefill at Llama-3.1-8B shape (GPU)
///
/// Against a baseline (PyTorch SDPA, scripts/sdpa_bench.py); a table on
/// stdout, rows as JSON.
#[derive(Args, Debug)]
pub struct BenchGpuArgs {
    /// Decode context lengths, comma-separated (K = 1024, M = 1024K).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_positive,
          default_value = "32K,128K,512K,1M")]
    pub tokens: Vec<usize>,
    /// Decode batch sizes, comma-separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_positive,
          default_value = "1,16")]
    pub batch: Vec<usize>,
    /// Prefill context lengths, comma-separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_positive,
          default_value = "32K,128K,1M")]
    pub prefill_tokens: Vec<usize>,
    /// Longest prefill also timed dense (our kernel).
    #[arg(long, value_name = "N", value_parser = parse_count, default_value_t = 131072)]
    pub prefill_dense_max: usize,
    /// Prefill only, and per prefill only mask + attention (no decode rows,
    /// kernel variants or dense timings).
    #[arg(long)]
    pub prefill_only: bool,
    /// hip prefill mask estimators to time, comma-separated: auto, ref
    /// (the f32 reference), fast (tensor cores).
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "auto",
          value_parser = ["auto", "ref", "reference", "fast", "tc", "tensor_core"])]
    pub estimators: Vec<String>,
    /// Baseline timings (scripts/sdpa_bench.py's JSON) to compare against;
    /// read before any work.
    #[arg(long, value_name = "FILE")]
    pub baseline: Option<String>,
    /// Write the results as JSON to FILE (checked writable before any work).
    #[arg(long, value_name = "FILE")]
    pub json: Option<String>,
    /// Timed repetitions per measurement.
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value_t = 10)]
    pub reps: usize,
    /// Workload seed.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
}

/// Host tier + device page cache: round trips, decode vs all resident (GPU)
#[derive(Args, Debug)]
pub struct GpuTestOffloadArgs {
    /// Seed of the random inputs.
    #[arg(long, value_name = "N", default_value_t = 0x0ff1)]
    pub seed: u64,
}

/// hip decode with KV in pinned host memory and a device page cache (GPU)
///
/// Against the same decode with all KV on the device, at Llama-3.1-8B
/// shape.
#[derive(Args, Debug)]
pub struct BenchGpuOffloadArgs {
    /// Context lengths, comma-separated (K = 1024, M = 1024K).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_positive,
          default_value = "1M,4M")]
    pub tokens: Vec<usize>,
    /// Device page-cache sizes as fractions of the KV pages, comma-separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_fraction,
          default_value = "0.05")]
    pub cache: Vec<f64>,
    /// Estimation row-cache sizes as fractions of all key rows, comma-separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_fraction,
          default_value = "0.05,0.25")]
    pub est_rows: Vec<f64>,
    /// Score missed estimation rows straight from host memory instead of
    /// staging them in device memory first.
    #[arg(long)]
    pub est_direct: bool,
    /// Offload paths, comma-separated; each configuration runs once per
    /// path: `full-device` (page-cache policy and estimation admission
    /// wholly on the device, no read-back on the step's path), `device`
    /// (run 4's: host LRU page policy from the read-back selection, host
    /// dedup + CLOCK over a device table), `host` (run 3's host admission).
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "device",
          value_parser = ["full-device", "device", "host"])]
    pub admission: Vec<String>,
    /// How the estimation kernels stage missed key rows, comma-separated;
    /// each configuration runs once per value: `warp` (a warp fetches its
    /// missed rows together, coalesced) or `thread` (each thread copies its
    /// own row, the earlier path).
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "warp",
          value_parser = ["warp", "thread"])]
    pub est_fetch: Vec<String>,
    /// Full-device path: a step that refreshes no hip stage reuses the last
    /// page walk when every block it touches was mapped then
    /// (`OffloadKv::prepare_device_step`), comma-separated; each
    /// configuration runs once per value (`off`: every step walks, run 6).
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "on",
          value_parser = ["on", "off"])]
    pub page_reuse: Vec<String>,
    /// Full-device path: launch the estimation's admission after the step's
    /// attention (its side-stream work starts after it) and let steps that
    /// refresh no stage skip the wait for it (`on`), or right after the
    /// estimation with every step waiting (`off`, run 6), comma-separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "on",
          value_parser = ["on", "off"])]
    pub late_admission: Vec<String>,
    /// Estimation kernels that load each probed key row's vectors all at
    /// once before scoring it (`on`: module hip_mask_host_pl, its 4-lane
    /// scorers of the later stages) or two at a time (`off`: the reference
    /// loop, run 6), comma-separated; same bits.
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "on",
          value_parser = ["on", "off"])]
    pub est_preload: Vec<String>,
    /// Full-device path with page reuse: every page walk also covers stage
    /// 0's kept chunks, a step that refreshes stage 0 walks them (and
    /// copies their missing blocks) on the copy stream while stages 1..
    /// score, and steps that refresh only later stages reuse the walk
    /// (`on`); `off`: walks cover the selection only (run 7),
    /// comma-separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "on",
          value_parser = ["on", "off"])]
    pub page_prefetch: Vec<String>,
    /// Estimation row cache admission per step: at most `half` the cache
    /// (default, the earlier path) or `all` of it (`HostEstimation::
    /// with_admit_all`: a table of twice the buckets), comma-separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "half",
          value_parser = ["half", "all"])]
    pub est_admit: Vec<String>,
    /// The host-tier search's last-level right probe scored from the
    /// previous level's choice instead of read again (`on`,
    /// `HostEstimation::set_reuse_right`; same bits) or read (`off`,
    /// default), comma-separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "off",
          value_parser = ["on", "off"])]
    pub est_reuse: Vec<String>,
    /// Pinned search levels of the estimation row cache, comma-separated:
    /// 0 (none, default) or N (the rows levels 1..=N of stage 0's search
    /// can probe, `HostEstimation::set_pinned`), taken from the same
    /// --est-rows budget (CLOCK gets the rest).
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "0",
          value_parser = clap::value_parser!(usize))]
    pub est_pin: Vec<usize>,
    /// Record five timing events inside each timed offloaded step (`on`:
    /// the per-class device times, run 6's default; `off`: host times only,
    /// no instrumentation the resident step does not have: ~0.013 ms per
    /// step on the H200).
    #[arg(long, value_name = "on|off", default_value = "off", value_parser = ["on", "off"])]
    pub phase_events: String,
    /// First measure the bus: DMA (cuMemcpyHtoDAsync) vs the copy kernels'
    /// patterns (row gathers, head-block copies) over the same host tier.
    #[arg(long)]
    pub bus: bool,
    /// Exact per-step counters for the per-refresh-class table: waits for
    /// each step's admission before the next (no overlap with it).
    #[arg(long)]
    pub profile: bool,
    /// Decode steps timed (after the warm-up).
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value_t = 48)]
    pub steps: usize,
    /// Warm-up decode steps before timing.
    #[arg(long, value_name = "N", value_parser = parse_count, default_value_t = 16)]
    pub warmup: usize,
    /// Write the results as JSON to FILE (checked writable before any work).
    #[arg(long, value_name = "FILE")]
    pub json: Option<String>,
    /// Workload seed.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
}

impl BenchGpuArgs {
    /// Output path writable, baseline readable JSON: before any GPU work.
    pub fn check(&self) -> Result<serde_json::Value, String> {
        if let Some(p) = &self.json {
            crate::args::check_writable("--json", p)?;
        }
        match &self.baseline {
            Some(p) => {
                let s = std::fs::read_to_string(p).map_err(|x| format!("--baseline {p}: {x}"))?;
                serde_json::from_str(&s).map_err(|x| format!("--baseline {p}: not JSON: {x}"))
            }
            None => Ok(serde_json::json!({})),
        }
    }
}

impl BenchGpuOffloadArgs {
    /// Output path writable: before any GPU work.
    pub fn check(&self) -> Result<(), String> {
        match &self.json {
            Some(p) => crate::args::check_writable("--json", p),
            None => Ok(()),
        }
    }
}

/// Dense decode of one layer (split-K tensor-core kernel) vs the bytes-read
/// floor at the measured copy bandwidth (GPU)
#[derive(Args, Debug)]
pub struct BenchGpuDenseArgs {
    /// Context lengths, comma-separated (K = 1024, M = 1024K).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_positive,
          default_value = "128K,512K,1M")]
    pub tokens: Vec<usize>,
    /// Batch sizes, comma-separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_positive,
          default_value = "1,16")]
    pub batch: Vec<usize>,
    /// GQA group sizes (q heads per KV head), comma-separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_positive,
          default_value = "1,2,4,8")]
    pub groups: Vec<usize>,
    /// K/V dtypes, comma-separated: bf16, f16.
    #[arg(long, value_name = "LIST", default_value = "bf16,f16")]
    pub dtypes: String,
    /// Timed repetitions per row.
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value_t = 10)]
    pub reps: usize,
    /// Write the rows as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<String>,
    /// Kernel variants to time, comma-separated: cur (kernels/decode_dense.cu),
    /// v2 (kernels/decode_dense_v2.cu).
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "cur"
    )]
    pub variants: Vec<String>,
    /// Default split sizes for this many waves of resident CTAs,
    /// comma-separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_positive,
          default_value = "1")]
    pub waves: Vec<usize>,
}

/// The hip sparse attention launch alone (kernels/decode_dense_v2.cu
/// hip_sparse_*) on a hip-sized selection (sink 128 + 256 random 8-token
/// chunks + 64 slid + 1,024 window = 3,264 tokens per (row, kv head), Llama-3.1-8B
/// heads), warm (repeated on L2-resident data) and cold (L2 flushed
/// before each launch), over split sizes, chunks per iteration and the
/// split merge (GPU)
#[derive(Args, Debug)]
pub struct BenchGpuSparseArgs {
    /// Context length the selection is drawn from (K = 1024, M = 1024K).
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value = "1M")]
    pub tokens: usize,
    /// Batch sizes, comma-separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_positive,
          default_value = "1,16")]
    pub batch: Vec<usize>,
    /// Tokens per split, comma-separated (0: the launch's default).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_count,
          default_value = "0,64,128,256,512,1024,4096")]
    pub splits: Vec<usize>,
    /// Chunks per warp iteration, comma-separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_positive,
          default_value = "1,2")]
    pub chunks: Vec<usize>,
    /// Timed launches per row (median).
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value_t = 30)]
    pub reps: usize,
    /// Instead of the sweep: where the default batch-1 launch spends its
    /// time. Random vs contiguous chunk positions, L2 and address
    /// translations warm or evicted, and per-CTA timestamps of each phase
    /// (the `hip_sparse_trace` build).
    #[arg(long)]
    pub probe: bool,
    /// Write the rows as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<String>,
}

/// A whole-model decode step (dense + hip layers, each with its own K/V)
/// vs all layers dense (PyTorch SDPA baseline) (GPU)
#[derive(Args, Debug)]
pub struct BenchGpuModelArgs {
    /// Context lengths, comma-separated (K = 1024, M = 1024K).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_positive,
          default_value = "128K,1M")]
    pub tokens: Vec<usize>,
    /// Batch sizes, comma-separated.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_positive,
          default_value = "1,16")]
    pub batch: Vec<usize>,
    /// Layers in the step.
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value_t = 32)]
    pub layers: usize,
    /// Of them dense (the first ones).
    #[arg(long, value_name = "N", value_parser = parse_count, default_value_t = 3)]
    pub dense_layers: usize,
    /// Timed repetitions per row.
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value_t = 5)]
    pub reps: usize,
    /// Baseline JSON (scripts/sdpa_bench.py output) for the SDPA rows.
    #[arg(long, value_name = "FILE")]
    pub baseline: Option<String>,
    /// Write the rows as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<String>,
    /// Kernel-breakdown tunings to sweep, comma-separated C/A/S: attention
    /// split about C CTAs per SM in multiples of A tokens, stages of at most
    /// S sub-chunks scored 4 lanes per sub-chunk (0 for C or A: default; S
    /// `d`: default, 0: never). The timed steps use the defaults.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub tune: Vec<String>,
    /// hip layers attend through split-K partials + combine
    /// (kernels/decode.cu; default: the sparse v2 kernel,
    /// kernels/decode_dense_v2.cu hip_sparse_*).
    #[arg(long)]
    pub split_combine: bool,
    /// Accepted for older scripts: sparse v2 is the default now.
    #[arg(long, conflicts_with = "split_combine")]
    pub sparse_v2: bool,
    /// Per-stage refresh intervals of the hip layers, comma-separated
    /// (default: the default config's, 16,8,4; InfiniteHiP's SGLang example
    /// uses 96,24,8).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub refresh: Vec<usize>,
    /// How the hip layers score stage 0 in a decode refresh: `search`
    /// (default, the representative search) or `mean_key` (cached chunk
    /// means, `hip.decode_stage0`); the first step's time, which builds
    /// the means, is printed apart.
    #[arg(long, value_name = "MODE", default_value = "search", value_parser = ["search", "mean_key"])]
    pub decode_stage0: String,
    /// Accepted for older scripts: hip layers take lean steps by default
    /// now (`HipGpuDecoder::set_lean`: no assembly when no stage refreshes;
    /// sparse v2 attention only).
    #[arg(long, conflicts_with = "split_combine")]
    pub lean: bool,
    /// Full steps: hip layers assemble their selection every step (lean
    /// steps off).
    #[arg(long, conflicts_with = "lean")]
    pub no_lean: bool,
    /// Launch every kernel plainly: no programmatic dependent launch
    /// (backend/cuda/pdl.rs; the default on compute capability 9.0+).
    #[arg(long)]
    pub no_pdl: bool,
    /// Score hip stages with the per-thread kernel (`hip_score*`, the
    /// reference) instead of the warp kernel (`hip_scorew*`).
    #[arg(long)]
    pub score_v1: bool,
    /// Also time the hip layers through the engines' capturable decode
    /// (`GpuAttention::decode_graph`, what SGLang's decode CUDA graph
    /// replays), one CUDA graph per step of the cycle (search stage 0
    /// only: the engine route does not run mean_key).
    #[arg(long)]
    pub engine_graph: bool,
    /// Also time the host-metadata step with these `hip.async_refresh`
    /// modes, comma-separated (`stage0`: stage 0 scored at the step before
    /// its refresh on a side stream, mean_key only; `all`: each hip layer's
    /// refresh on its side stream, attended from the next step), same K/V
    /// and queries, in steady state (the selection kept across cycles).
    #[arg(long, value_name = "MODES", value_delimiter = ',', value_parser = ["stage0", "all"])]
    pub async_refresh: Vec<String>,
}
