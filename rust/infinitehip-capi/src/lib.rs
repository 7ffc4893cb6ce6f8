//! C ABI over `infinitehip::Engine`: `libinfinitehip.so` with the header
//! `include/infinitehip.h`. Engines hosting a model (SGLang through the
//! Python shim, anything that can call C) use exactly this surface.
//!
//! Conventions (the header repeats them):
//! - Functions returning `int` give `IHIP_OK` (0) or a negative code; the
//!   message is then in `ihip_last_error()` (thread-local, valid until the
//!   next failing call on the same thread).
//! - No Rust panic ever crosses the boundary: every entry point runs under
//!   `catch_unwind`. An engine whose call panicked is poisoned: later calls on
//!   it fail with a message saying so, and it can only be destroyed.
//! - Null pointers, shape mismatches, bad dtype codes, misaligned or
//!   overflowing sizes are rejected with a message naming the argument.
//! - An engine handle may be used from several threads; calls on one engine
//!   are serialised by a lock.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

use half::{bf16, f16};
use ihip::engine::Projections;
use ihip::policy::Phase;
use ihip::{Element, Engine, PolicyConfig};

mod errors;
pub use errors::*;

/// Version of the C ABI (signatures and struct layouts), bumped on every
/// incompatible change so a caller built against another header can refuse
/// to run. 1: up to 0.1.0; 2: `table_n_rows` in `ihip_gpu_decode`,
/// `ihip_gpu_prefill` and `ihip_gpu_prefill_proj`, error codes -5..-7;
/// 3: `ihip_read` and `ihip_evict` (the SGLang shim needs them to hand a
/// Locret request's evicted slots back to SGLang); 4: the GPU calls take
/// descriptor structs (`IhipGpuRequests`, `IhipKvCache`, `IhipDeviceRows`,
/// `IhipProj`) instead of 23-31 positional arguments, and
/// `ihip_gpu_prefill_proj` is `ihip_gpu_prefill` with a non-NULL `proj`.
pub const IHIP_ABI_VERSION: u32 = 4;

pub const IHIP_DTYPE_F32: c_int = 0;
pub const IHIP_DTYPE_F16: c_int = 1;
pub const IHIP_DTYPE_BF16: c_int = 2;

pub const IHIP_PHASE_PREFILL: c_int = 0;
pub const IHIP_PHASE_DECODE: c_int = 1;

/// Opaque engine handle.
pub struct IhipEngine {
    inner: Mutex<Engine>,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: impl Into<String>) {
    let mut s = msg.into();
    s.retain(|c| c != '\0');
    let c = CString::new(s).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// An error on its way out: a code and a message.
struct Fail(c_int, String);

impl From<ihip::Error> for Fail {
    fn from(e: ihip::Error) -> Self {
        Fail(code_of(&e), e.to_string())
    }
}

fn arg(msg: impl Into<String>) -> Fail {
    Fail(IHIP_ERR_ARG, msg.into())
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// Run `f` catching panics; map failures to a code + thread-local message.
fn guard(what: &str, f: impl FnOnce() -> Result<(), Fail>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => IHIP_OK,
        Ok(Err(Fail(code, msg))) => {
            set_error(format!("{what}: {msg}"));
            code
        }
        Err(p) => {
            set_error(format!(
                "{what}: internal panic (a bug in infinitehip): {}",
                panic_message(&*p)
            ));
            IHIP_ERR_PANIC
        }
    }
}

/// Run `f` with the locked engine.
fn with_engine(
    e: *const IhipEngine,
    f: impl FnOnce(&mut Engine) -> Result<(), Fail>,
) -> Result<(), Fail> {
    if e.is_null() {
        return Err(arg("engine handle is NULL"));
    }
    // SAFETY: non-null handles come from `ihip_engine_new` and stay valid
    // until `ihip_engine_free` (the caller's contract).
    let eng = unsafe { &*e };
    let mut g = eng.inner.lock().map_err(|_| {
        Fail(
            IHIP_ERR_PANIC,
            "engine is poisoned by an earlier internal panic; destroy it with ihip_engine_free"
                .into(),
        )
    })?;
    f(&mut g)
}

fn cstr_arg<'a>(p: *const c_char, name: &str) -> Result<&'a str, Fail> {
    if p.is_null() {
        return Err(arg(format!("{name} is NULL")));
    }
    // SAFETY: caller passes a NUL-terminated string.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|e| arg(format!("{name} is not valid UTF-8: {e}")))
}

fn mul(a: usize, b: usize, what: &str) -> Result<usize, Fail> {
    a.checked_mul(b)
        .ok_or_else(|| arg(format!("{what}: size overflows ({a} x {b})")))
}

/// `from_raw_parts` requires `len * size_of::<T>() <= isize::MAX`: a
/// larger length is a caller error, never undefined behaviour.
fn check_bytes<T>(len: usize, name: &str) -> Result<(), Fail> {
    let max = isize::MAX as usize / std::mem::size_of::<T>().max(1);
    if len > max {
        return Err(arg(format!(
            "{name}: {len} elements of {} bytes exceed isize::MAX bytes",
            std::mem::size_of::<T>()
        )));
    }
    Ok(())
}

/// `len` elements of T at `p` (an empty slice when `len` is 0, even if `p` is NULL).
pub(crate) fn slice<'a, T>(p: *const T, len: usize, name: &str) -> Result<&'a [T], Fail> {
    if len == 0 {
        return Ok(&[]);
    }
    check_bytes::<T>(len, name)?;
    if p.is_null() {
        return Err(arg(format!("{name} is NULL ({len} elements expected)")));
    }
    if !p.is_aligned() {
        return Err(arg(format!(
            "{name} at {p:p} is not aligned to {} bytes",
            std::mem::align_of::<T>()
        )));
    }
    // SAFETY: the caller guarantees `len` readable elements at `p`.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

fn slice_mut<'a, T>(p: *mut T, len: usize, name: &str) -> Result<&'a mut [T], Fail> {
    if len == 0 {
        return Ok(&mut []);
    }
    check_bytes::<T>(len, name)?;
    if p.is_null() {
        return Err(arg(format!("{name} is NULL ({len} elements expected)")));
    }
    if !p.is_aligned() {
        return Err(arg(format!(
            "{name} at {p:p} is not aligned to {} bytes",
            std::mem::align_of::<T>()
        )));
    }
    // SAFETY: the caller guarantees `len` writable elements at `p`.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

fn check_heads(
    eng: &Engine,
    what: &str,
    heads_name: &str,
    heads: usize,
    head_dim: usize,
) -> Result<(), Fail> {
    let s = eng.shape();
    let want = if heads_name == "n_q_heads" {
        s.n_q_heads
    } else {
        s.n_kv_heads
    };
    if heads != want || head_dim != s.head_dim {
        return Err(arg(format!(
            "{what}: shape [{heads_name}={heads}, head_dim={head_dim}] does not match the engine's model \
             ({heads_name}={want}, head_dim={})",
            s.head_dim
        )));
    }
    Ok(())
}

fn into_c_string(s: String) -> *mut c_char {
    let mut s = s;
    s.retain(|c| c != '\0');
    CString::new(s)
        .map(CString::into_raw)
        .unwrap_or(std::ptr::null_mut())
}

fn init_logging() {
    // INFINITEHIP_LOG=debug (tracing's env-filter syntax) logs to stderr.
    if let Ok(filter) = std::env::var("INFINITEHIP_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// Library version, a static NUL-terminated string.
#[no_mangle]
pub extern "C" fn ihip_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The C ABI version (`IHIP_ABI_VERSION`): a caller compiled against
/// another version must refuse to run (the Python shim does).
#[no_mangle]
pub extern "C" fn ihip_abi_version() -> u32 {
    IHIP_ABI_VERSION
}

/// The last error message of this thread ("" if none). Owned by the library.
#[no_mangle]
pub extern "C" fn ihip_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Free a string returned by `ihip_*_json`. NULL is a no-op.
///
/// # Safety
/// `s` must come from this library and not be freed twice.
#[no_mangle]
pub unsafe extern "C" fn ihip_string_free(s: *mut c_char) {
    if !s.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(CString::from_raw(s))));
    }
}

/// The default policy config (Llama-3.1-8B shape) as JSON; free with
/// `ihip_string_free`. NULL on failure.
#[no_mangle]
pub extern "C" fn ihip_default_config_json() -> *mut c_char {
    let mut out = std::ptr::null_mut();
    guard("ihip_default_config_json", || {
        out = into_c_string(PolicyConfig::default().to_json_pretty());
        Ok(())
    });
    out
}

/// Validate a config without building an engine. `IHIP_OK` or an error whose
/// message names the bad field.
///
/// # Safety
/// `config_json` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn ihip_config_check(config_json: *const c_char) -> c_int {
    guard("ihip_config_check", || {
        let s = cstr_arg(config_json, "config_json")?;
        PolicyConfig::from_json(s)?.validate()?;
        Ok(())
    })
}

/// Build an engine from a policy config JSON document. NULL on error (see
/// `ihip_last_error`).
///
/// # Safety
/// `config_json` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn ihip_engine_new(config_json: *const c_char) -> *mut IhipEngine {
    let mut out = std::ptr::null_mut();
    guard("ihip_engine_new", || {
        init_logging();
        let s = cstr_arg(config_json, "config_json")?;
        let cfg = PolicyConfig::from_json(s)?;
        let eng = Engine::new(cfg)?;
        out = Box::into_raw(Box::new(IhipEngine {
            inner: Mutex::new(eng),
        }));
        Ok(())
    });
    out
}

/// Destroy an engine (NULL is a no-op).
///
/// # Safety
/// `e` comes from `ihip_engine_new` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn ihip_engine_free(e: *mut IhipEngine) {
    if !e.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(e))));
    }
}

/// The engine's model shape. Any out pointer may be NULL.
///
/// # Safety
/// Out pointers are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn ihip_engine_shape(
    e: *const IhipEngine,
    n_layers: *mut usize,
    n_q_heads: *mut usize,
    n_kv_heads: *mut usize,
    head_dim: *mut usize,
) -> c_int {
    guard("ihip_engine_shape", || {
        with_engine(e, |eng| {
            let s = eng.shape();
            for (p, v) in [
                (n_layers, eng.n_layers()),
                (n_q_heads, s.n_q_heads),
                (n_kv_heads, s.n_kv_heads),
                (head_dim, s.head_dim),
            ] {
                if !p.is_null() {
                    *p = v;
                }
            }
            Ok(())
        })
    })
}

/// The engine's effective config as JSON (free with `ihip_string_free`).
///
/// # Safety
/// `e` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn ihip_engine_config_json(e: *const IhipEngine) -> *mut c_char {
    let mut out = std::ptr::null_mut();
    guard("ihip_engine_config_json", || {
        with_engine(e, |eng| {
            out = into_c_string(eng.config().to_json_pretty());
            Ok(())
        })
    });
    out
}

/// Register a new, empty sequence in every layer.
///
/// # Safety
/// `e` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn ihip_add_sequence(e: *const IhipEngine, seq: u64) -> c_int {
    guard("ihip_add_sequence", || {
        with_engine(e, |eng| Ok(eng.add_sequence(seq)?))
    })
}

/// `child` starts as a copy of `parent` (pages shared copy-on-write).
///
/// # Safety
/// `e` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn ihip_fork_sequence(
    e: *const IhipEngine,
    parent: u64,
    child: u64,
) -> c_int {
    guard("ihip_fork_sequence", || {
        with_engine(e, |eng| Ok(eng.fork_sequence(parent, child)?))
    })
}

/// Free a sequence's KV and policy state in every layer.
///
/// # Safety
/// `e` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn ihip_free_sequence(e: *const IhipEngine, seq: u64) -> c_int {
    guard("ihip_free_sequence", || {
        with_engine(e, |eng| Ok(eng.free_sequence(seq)?))
    })
}

/// Tokens the engine holds for `seq` in `layer` (fewer than the sequence's
/// length after eviction).
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn ihip_seq_len(
    e: *const IhipEngine,
    layer: usize,
    seq: u64,
    out: *mut usize,
) -> c_int {
    guard("ihip_seq_len", || {
        if out.is_null() {
            return Err(arg("out is NULL"));
        }
        with_engine(e, |eng| {
            *out = eng.seq_len(layer, seq)?;
            Ok(())
        })
    })
}

/// Copy entries `start..end` of `seq` in `layer` out as f32
/// `[end - start][n_kv_heads][head_dim]` into `k_out` and `v_out`. After
/// Locret's per-head eviction entry i of head h is head h's i-th held unit
/// (in original-position order).
///
/// # Safety
/// `k_out`, `v_out` are NULL (only when the range is empty) or writable for
/// the stated number of elements.
#[no_mangle]
pub unsafe extern "C" fn ihip_read(
    e: *const IhipEngine,
    layer: usize,
    seq: u64,
    start: usize,
    end: usize,
    k_out: *mut f32,
    v_out: *mut f32,
) -> c_int {
    guard("ihip_read", || {
        with_engine(e, |eng| {
            if end < start {
                return Err(arg(format!("end {end} < start {start}")));
            }
            let s = eng.shape();
            let n = mul(end - start, mul(s.n_kv_heads, s.head_dim, "row")?, "k_out")?;
            let ko = slice_mut(k_out, n, "k_out")?;
            let vo = slice_mut(v_out, n, "v_out")?;
            if n > 0 && (ko.as_ptr() as usize) == (vo.as_ptr() as usize) {
                return Err(arg("k_out and v_out are the same buffer"));
            }
            let (k, v) = eng.read(layer, seq, start, end)?;
            ko.copy_from_slice(&k);
            vo.copy_from_slice(&v);
            Ok(())
        })
    })
}

/// Run the eviction `layer`'s policy owes for `seq` now (Locret: the
/// eviction of a finished prompt, otherwise run at the next append).
///
/// # Safety
/// `e` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn ihip_evict(e: *const IhipEngine, layer: usize, seq: u64) -> c_int {
    guard("ihip_evict", || {
        with_engine(e, |eng| {
            eng.evict(layer, seq)?;
            Ok(())
        })
    })
}

#[allow(clippy::too_many_arguments)]
fn append_typed<T: Element>(
    eng: &mut Engine,
    layer: usize,
    seq: u64,
    k: *const T,
    v: *const T,
    elems: usize,
    phase: Phase,
    prompt_done: bool,
    proj: Option<Projections<'_>>,
) -> Result<(), Fail> {
    let k = slice(k, elems, "k")?;
    let v = slice(v, elems, "v")?;
    eng.append(layer, seq, k, v, phase, prompt_done, proj)?;
    Ok(())
}

/// Append K/V of `n_tokens` new tokens to one layer of `seq`. `k`, `v`:
/// contiguous `[n_tokens][n_kv_heads][head_dim]` of `dtype`
/// (`IHIP_DTYPE_*`), post-RoPE. `proj_q/k/v`: all NULL, or the tokens'
/// pre-RoPE f32 projections (`[n][n_q_heads][d]`, `[n][n_kv_heads][d]` x2)
/// for policies that score at insertion.
///
/// # Safety
/// Pointers are NULL or point at the stated number of elements.
#[no_mangle]
pub unsafe extern "C" fn ihip_append(
    e: *const IhipEngine,
    layer: usize,
    seq: u64,
    k: *const std::ffi::c_void,
    v: *const std::ffi::c_void,
    dtype: c_int,
    n_tokens: usize,
    n_kv_heads: usize,
    head_dim: usize,
    phase: c_int,
    prompt_done: c_int,
    proj_q: *const f32,
    proj_k: *const f32,
    proj_v: *const f32,
) -> c_int {
    guard("ihip_append", || {
        with_engine(e, |eng| {
            check_heads(eng, "k/v", "n_kv_heads", n_kv_heads, head_dim)?;
            let phase = match phase {
                IHIP_PHASE_PREFILL => Phase::Prefill,
                IHIP_PHASE_DECODE => Phase::Decode,
                p => {
                    return Err(arg(format!(
                        "phase {p} is not IHIP_PHASE_PREFILL (0) or IHIP_PHASE_DECODE (1)"
                    )))
                }
            };
            let row = mul(n_kv_heads, head_dim, "k/v row")?;
            let elems = mul(n_tokens, row, "k/v")?;
            let s = eng.shape();
            let proj = match (proj_q.is_null(), proj_k.is_null(), proj_v.is_null()) {
                (true, true, true) => None,
                (false, false, false) => {
                    let qe = mul(n_tokens, s.q_elems(), "proj_q")?;
                    Some(Projections {
                        q: slice(proj_q, qe, "proj_q")?,
                        k: slice(proj_k, elems, "proj_k")?,
                        v: slice(proj_v, elems, "proj_v")?,
                    })
                }
                _ => {
                    return Err(arg(
                        "proj_q, proj_k and proj_v must be all NULL or all non-NULL",
                    ))
                }
            };
            let pd = prompt_done != 0;
            match dtype {
                IHIP_DTYPE_F32 => append_typed(
                    eng,
                    layer,
                    seq,
                    k as *const f32,
                    v as *const f32,
                    elems,
                    phase,
                    pd,
                    proj,
                ),
                IHIP_DTYPE_F16 => append_typed(
                    eng,
                    layer,
                    seq,
                    k as *const f16,
                    v as *const f16,
                    elems,
                    phase,
                    pd,
                    proj,
                ),
                IHIP_DTYPE_BF16 => append_typed(
                    eng,
                    layer,
                    seq,
                    k as *const bf16,
                    v as *const bf16,
                    elems,
                    phase,
                    pd,
                    proj,
                ),
                d => Err(Fail(
                    IHIP_ERR_ARG,
                    format!("dtype code {d} is not IHIP_DTYPE_F32 (0), IHIP_DTYPE_F16 (1) or IHIP_DTYPE_BF16 (2)"),
                )),
            }
        })
    })
}

/// Causal attention for the last `n_tokens` tokens of `seq` in `layer`
/// (their K/V already appended). `q`, `out`: f32 `[n_tokens][n_q_heads][head_dim]`,
/// post-RoPE; the softmax scale is 1/sqrt(head_dim).
///
/// # Safety
/// Pointers are NULL or point at the stated number of elements.
#[no_mangle]
pub unsafe extern "C" fn ihip_attend_prefill(
    e: *const IhipEngine,
    layer: usize,
    seq: u64,
    q: *const f32,
    n_tokens: usize,
    n_q_heads: usize,
    head_dim: usize,
    out: *mut f32,
) -> c_int {
    guard("ihip_attend_prefill", || {
        with_engine(e, |eng| {
            check_heads(eng, "q", "n_q_heads", n_q_heads, head_dim)?;
            if n_tokens == 0 {
                return Err(arg("n_tokens is 0"));
            }
            let n = mul(n_tokens, mul(n_q_heads, head_dim, "q row")?, "q")?;
            let q = slice(q, n, "q")?;
            let out = slice_mut(out, n, "out")?;
            check_no_overlap(q, out)?;
            eng.attend_prefill(layer, seq, q, out)?;
            Ok(())
        })
    })
}

/// Decode attention for a batch: one query per sequence. `seqs`: `n_seqs`
/// ids; `q`, `out`: f32 `[n_seqs][n_q_heads][head_dim]`.
///
/// # Safety
/// Pointers are NULL or point at the stated number of elements.
#[no_mangle]
pub unsafe extern "C" fn ihip_attend_decode(
    e: *const IhipEngine,
    layer: usize,
    seqs: *const u64,
    n_seqs: usize,
    q: *const f32,
    n_q_heads: usize,
    head_dim: usize,
    out: *mut f32,
) -> c_int {
    guard("ihip_attend_decode", || {
        with_engine(e, |eng| {
            check_heads(eng, "q", "n_q_heads", n_q_heads, head_dim)?;
            if n_seqs == 0 {
                return Err(arg("n_seqs is 0"));
            }
            let seqs = slice(seqs, n_seqs, "seqs")?;
            let n = mul(n_seqs, mul(n_q_heads, head_dim, "q row")?, "q")?;
            let q = slice(q, n, "q")?;
            let out = slice_mut(out, n, "out")?;
            check_no_overlap(q, out)?;
            eng.attend_decode(layer, seqs, q, out)?;
            Ok(())
        })
    })
}

fn check_no_overlap(q: &[f32], out: &[f32]) -> Result<(), Fail> {
    let (a0, a1) = (q.as_ptr() as usize, q.as_ptr() as usize + q.len() * 4);
    let (b0, b1) = (out.as_ptr() as usize, out.as_ptr() as usize + out.len() * 4);
    if a0 < b1 && b0 < a1 {
        return Err(arg("q and out overlap: pass a separate output buffer"));
    }
    Ok(())
}

/// Per-layer stats as JSON `{"layers": [...]}` (free with `ihip_string_free`).
/// NULL on error.
///
/// # Safety
/// `e` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn ihip_stats_json(e: *const IhipEngine) -> *mut c_char {
    let mut out = std::ptr::null_mut();
    guard("ihip_stats_json", || {
        with_engine(e, |eng| {
            out = into_c_string(eng.stats_json());
            Ok(())
        })
    });
    out
}

mod gpu;
mod gpu_host;
mod gpu_requests;
pub use gpu::*;
pub use gpu_host::*;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod header;
#[cfg(test)]
mod tests;
