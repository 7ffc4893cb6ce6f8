//! Kernel launches with programmatic dependent launch (PDL, Hopper and
//! later): `cuLaunchKernelEx` with the programmatic-stream-serialization
//! attribute lets the driver launch a kernel (and make its CTAs resident)
//! before the previous kernel in the stream or the captured graph has
//! finished, once every CTA of that kernel has executed
//! `griddepcontrol.launch_dependents`. Every kernel launched this way
//! begins with `IHIP_PDL_ENTRY()` (kernels/common.cuh: trigger, then
//! `griddepcontrol.wait`, which returns only when the previous kernel has
//! completed and its writes are visible), so nothing is read early: the
//! order of memory accesses is that of plain launches, and only launch
//! latency overlaps. That latency is what a decode step of many small
//! launches pays per launch (each hip layer of a device-metadata step is
//! nine launches, most of which skip themselves on a step that refreshes
//! nothing).
//!
//! On by default where the device is compute capability 9.0 or later and
//! the stream is not the legacy default stream; `set_pdl(false)` or
//! `INFINITEHIP_PDL=0` launches plainly (`cuLaunchKernelEx` without the
//! attribute: the reference the GPU checks compare with, bit for bit).
//! `INFINITEHIP_PDL_SITES` (comma-separated `Site` names, e.g.
//! `meta,score1,attn`; `all`; `none`) picks which launch sites carry the
//! attribute (`DEFAULT_SITES` otherwise): a site launched plainly makes its
//! kernel wait for the whole previous kernel as before, so every subset
//! orders memory accesses the same way.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::atomic::Ordering;

use cudarc::driver::{sys, CudaFunction, DriverError, LaunchConfig};

use super::switch::EnvSwitch;
use super::GpuContext;

static PDL: EnvSwitch = EnvSwitch::new("INFINITEHIP_PDL");

/// A launch site whose kernel begins with `IHIP_PDL_ENTRY()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    /// `hip_step_meta` (device-metadata hip step).
    Meta,
    /// A hip stage's scoring (`hip_score*` / `hip_scorew*`), stage 0, 1, 2+.
    Score(usize),
    /// A hip stage's `hip_topk`, stage 0, 1, 2+.
    Topk(usize),
    /// `hip_assemble`.
    Assemble,
    /// The hip sparse attention (`hip_sparse_*`).
    Attn,
    /// The dense v2 decode kernel (`dense_*`, module decode_dense_v2).
    Dense,
    /// A stage-1+ scoring that opens a host-metadata refresh step (it
    /// follows the previous layer's attention, not a top-k): steps 4 / 12
    /// of the default cycle start at stage 2.
    ScoreOpen,
    /// The engines' graph decode's own kernels (`gs_meta`, which also
    /// converts the queries, `gs_stage_copy`, `gs_store_stages`;
    /// engine_attn/graph.rs).
    Engine,
}

const SITE_NAMES: [&str; 12] = [
    "meta",
    "score0",
    "score1",
    "score2",
    "topk0",
    "topk1",
    "topk2",
    "assemble",
    "attn",
    "dense",
    "score_open",
    "engine",
];

impl Site {
    fn bit(self) -> u32 {
        1 << match self {
            Site::Meta => 0,
            Site::Score(s) => 1 + s.min(2),
            Site::Topk(s) => 4 + s.min(2),
            Site::Assemble => 7,
            Site::Attn => 8,
            Site::Dense => 9,
            Site::ScoreOpen => 10,
            Site::Engine => 11,
        }
    }
}

/// Every site.
pub const ALL_SITES: u32 = (1 << 12) - 1;

/// Sites launched with the attribute unless `INFINITEHIP_PDL_SITES` says
/// otherwise: every site but stage 0's top-k, stage 1's scoring and a
/// scoring that opens a refresh step. Measured on an H200 (32-layer step at
/// 1M and 128K tokens, batch 1, BENCHMARKS.md "programmatic dependent
/// launch"): with every site the stage-0 refresh step is ~40 us per hip
/// layer slower (stage 1's scoring CTAs, launched early, sit resident for
/// the whole 31 us one-CTA-per-row top-k of stage 0), which costs more than
/// the launch latency saved; without those two sites the refresh step is as
/// fast as plain launches and a step that refreshes nothing still saves
/// ~2.4 us per layer as one CUDA graph. And on an H100 (BENCHMARKS.md "the
/// whole step by step of the cycle"): stage 2's scoring launched early
/// behind the previous layer's attention made the stage-2-only refresh
/// steps 46 us per hip layer instead of 33.5 at 1M (the same kernel behind
/// stage 1's top-k gains from it), so `score_open` is off.
pub const DEFAULT_SITES: u32 = ALL_SITES & !(1 << 4) & !(1 << 2) & !(1 << 10);

/// Parse a site list (`all`, `none`, or names of `SITE_NAMES`).
pub fn parse_sites(list: &str) -> Result<u32, String> {
    let mut m = 0u32;
    for w in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        match w {
            "all" => m = ALL_SITES,
            "none" => {}
            _ => {
                let i = SITE_NAMES.iter().position(|&n| n == w).ok_or_else(|| {
                    format!(
                        "PDL site {w:?}: one of all, none, {}",
                        SITE_NAMES.join(", ")
                    )
                })?;
                m |= 1 << i;
            }
        }
    }
    Ok(m)
}

/// The site names in `mask`, comma-separated.
pub fn site_list(mask: u32) -> String {
    let v: Vec<&str> = (0..SITE_NAMES.len())
        .filter(|i| mask & (1 << i) != 0)
        .map(|i| SITE_NAMES[i])
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(",")
    }
}

/// u32::MAX: not read yet.
static SITES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);

/// The sites launched with the attribute (when PDL is enabled).
pub fn sites() -> u32 {
    let m = SITES.load(Ordering::Relaxed);
    if m != u32::MAX {
        return m;
    }
    let m = match std::env::var("INFINITEHIP_PDL_SITES") {
        Ok(v) => parse_sites(&v).unwrap_or_else(|e| {
            tracing::warn!("INFINITEHIP_PDL_SITES: {e}; using the default sites");
            DEFAULT_SITES
        }),
        Err(_) => DEFAULT_SITES,
    };
    SITES.store(m, Ordering::Relaxed);
    m
}

/// Set the sites launched with the attribute (`parse_sites`).
pub fn set_sites(mask: u32) {
    SITES.store(mask, Ordering::Relaxed);
}

/// Launch PDL-ready kernels with the programmatic attribute (the default)
/// or plainly.
pub fn set_pdl(on: bool) {
    PDL.set(on);
}

/// Whether PDL launches are enabled (the process-wide switch; the device
/// and stream conditions are checked per launch).
pub fn pdl_enabled() -> bool {
    PDL.get()
}

/// Scalar kernel arguments (passed by pointer to `cuLaunchKernelEx`).
pub trait KernelScalar: Copy {}
impl KernelScalar for i32 {}
impl KernelScalar for u32 {}
impl KernelScalar for i64 {}
impl KernelScalar for u64 {}
impl KernelScalar for f32 {}
impl KernelScalar for f64 {}

/// A launch being built: `.arg(&x)` in the kernel's parameter order, then
/// `launch`. The arguments are borrowed until the launch.
pub struct Launch<'a> {
    gpu: &'a GpuContext,
    func: &'a CudaFunction,
    args: Vec<*mut c_void>,
    pdl: bool,
    _args: PhantomData<&'a ()>,
}

impl GpuContext {
    /// Build a launch of `func` on this context's stream; `site`: the
    /// kernel begins with `IHIP_PDL_ENTRY()` (None: it does not), so it may
    /// be launched with the programmatic attribute (when enabled for the
    /// site and supported).
    pub fn launch_pdl<'a>(&'a self, func: &'a CudaFunction, site: Option<Site>) -> Launch<'a> {
        let pdl = site.is_some_and(|s| sites() & s.bit() != 0)
            && pdl_enabled()
            && self.arch_number() >= 90
            && !self.stream.cu_stream().is_null();
        Launch {
            gpu: self,
            func,
            args: Vec::with_capacity(32),
            pdl,
            _args: PhantomData,
        }
    }

    /// The compute capability as a number (`compute_90` -> 90).
    pub fn arch_number(&self) -> u32 {
        self.arch
            .trim_start_matches("compute_")
            .trim_end_matches(|c: char| c.is_ascii_alphabetic())
            .parse()
            .unwrap_or(0)
    }
}

impl<'a> Launch<'a> {
    pub fn arg<T: KernelScalar>(&mut self, x: &'a T) -> &mut Self {
        self.args.push(x as *const T as *mut c_void);
        self
    }

    /// Whether this launch carries the programmatic attribute.
    pub fn is_pdl(&self) -> bool {
        self.pdl
    }

    /// Launch on the context's stream.
    ///
    /// # Safety
    /// The arguments pushed must follow the kernel's parameter list (order
    /// and C types) and every pointer among them must be valid for what
    /// the kernel does with this grid; with PDL the kernel must begin with
    /// `IHIP_PDL_ENTRY()` (the caller's `pdl_ready`).
    pub unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), DriverError> {
        self.gpu.ctx.bind_to_thread()?;
        // SAFETY: a plain-old-data attribute (an enum id and a union of
        // integers), fully initialised below before use.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let lc = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.gpu.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: if self.pdl { 1 } else { 0 },
        };
        // SAFETY: `lc` and `attr` outlive the call; the argument pointers
        // are borrowed for 'a (the caller's contract above covers their
        // meaning).
        unsafe {
            sys::cuLaunchKernelEx(
                &lc,
                self.func.cu_function(),
                self.args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_lists_round_trip() {
        assert_eq!(parse_sites("all").unwrap(), ALL_SITES);
        assert_eq!(parse_sites("none").unwrap(), 0);
        let m = parse_sites("meta,score1,attn").unwrap();
        assert_eq!(
            m,
            Site::Meta.bit() | Site::Score(1).bit() | Site::Attn.bit()
        );
        assert_eq!(site_list(m), "meta,score1,attn");
        assert_eq!(Site::Score(5).bit(), Site::Score(2).bit());
        assert_eq!(parse_sites("score_open").unwrap(), Site::ScoreOpen.bit());
        assert_eq!(DEFAULT_SITES & Site::ScoreOpen.bit(), 0);
        assert!(parse_sites("topk9").is_err());
        assert_eq!(site_list(0), "none");
        assert_eq!(
            site_list(DEFAULT_SITES),
            "meta,score0,score2,topk1,topk2,assemble,attn,dense,engine"
        );
    }
}
