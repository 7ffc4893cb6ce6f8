//! Bounded fuzzing of the C ABI entry points (proptest; a few seconds):
//! random lengths, indices, shapes and codes, called the way C calls them.
//! Properties: no call panics or aborts (`IHIP_ERR_PANIC` never appears, the
//! process survives lengths beyond `isize::MAX`), every bad caller index is
//! `IHIP_ERR_ARG` before the device is touched, and the answer matches an
//! independent model of which calls are valid.

use super::*;
use proptest::prelude::*;
use proptest::test_runner::Config;
use std::ffi::CString;

const NQ: usize = 4;
const NKV: usize = 2;
const D: usize = 16;
const LAYERS: usize = 2;

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(ihip_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Small values around the edges, and a few extreme ones.
fn edgy(lo: i64, hi: i64) -> impl Strategy<Value = i64> {
    prop_oneof![
        8 => lo..=hi,
        1 => Just(i32::MAX as i64),
        1 => Just(i32::MAX as i64 + 1),
        1 => Just(i64::MAX),
        1 => Just(i64::MIN),
    ]
}

#[derive(Debug, Clone)]
struct GpuCall {
    table_n_rows: i64,
    table_stride: i64,
    page_size: i64,
    rows: Vec<i64>,
    lens: Vec<i64>,
    n_new: Vec<i64>,
}

fn gpu_call() -> impl Strategy<Value = GpuCall> {
    (1usize..6).prop_flat_map(|b| {
        (
            edgy(-1, 6),
            edgy(-1, 6),
            edgy(-1, 4),
            prop::collection::vec(edgy(-2, 8), b),
            prop::collection::vec(edgy(-2, 30), b),
            prop::collection::vec(edgy(-2, 30), b),
        )
            .prop_map(
                |(table_n_rows, table_stride, page_size, rows, lens, n_new)| GpuCall {
                    table_n_rows,
                    table_stride,
                    page_size,
                    rows,
                    lens,
                    n_new,
                },
            )
    })
}

/// The model of a valid call, written independently of `gpu_requests`.
fn gpu_call_valid(c: &GpuCall, prefill: bool) -> bool {
    let i32max = i32::MAX as i64;
    let pos = |x: i64| (1..=i32max).contains(&x);
    if !(pos(c.table_n_rows) && pos(c.table_stride) && pos(c.page_size)) {
        return false;
    }
    let cap = c.table_stride as i128 * c.page_size as i128;
    (0..c.rows.len()).all(|b| {
        (0..c.table_n_rows).contains(&c.rows[b])
            && pos(c.lens[b])
            && (c.lens[b] as i128) <= cap
            && (!prefill || (0..=c.lens[b]).contains(&c.n_new[b]))
    })
}

unsafe fn call_gpu(c: &GpuCall, prefill: bool) -> c_int {
    let b = c.rows.len();
    let ids: Vec<u64> = (0..b as u64).collect();
    // No handle: every valid call must get past the index checks and stop
    // at the handle (NULL / no CUDA), so no device memory is ever touched.
    let h = std::ptr::null();
    let reqs = IhipGpuRequests {
        batch: b,
        req_ids: ids.as_ptr(),
        table_rows: c.rows.as_ptr(),
        lens: c.lens.as_ptr(),
        n_new: c.n_new.as_ptr(),
    };
    let kv = IhipKvCache {
        k: 16,
        v: 16,
        dtype: IHIP_DTYPE_BF16,
        table: 16,
        table_stride: c.table_stride,
        table_n_rows: c.table_n_rows,
        page_size: c.page_size,
        page_stride: (NKV * D) as i64,
        head_stride: D as i64,
    };
    let rows = IhipDeviceRows {
        ptr: 16,
        dtype: IHIP_DTYPE_BF16,
        row_stride: (NQ * D) as i64,
    };
    if prefill {
        ihip_gpu_prefill(h, 0, 0, &reqs, &kv, &rows, &rows, 0.0, std::ptr::null())
    } else {
        ihip_gpu_decode(h, 0, 0, &reqs, &kv, &rows, &rows, 0.0)
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn gpu_calls_check_every_caller_index_before_the_device(c in gpu_call(), prefill: bool) {
        let rc = unsafe { call_gpu(&c, prefill) };
        let msg = last_error();
        prop_assert_ne!(rc, IHIP_ERR_PANIC, "{}", msg);
        let at_handle = msg.contains("handle is NULL") || msg.contains("without CUDA support");
        if gpu_call_valid(&c, prefill) {
            prop_assert!(at_handle, "valid call refused: {}", msg);
        } else {
            prop_assert_eq!(rc, IHIP_ERR_ARG, "{}", msg);
            prop_assert!(!at_handle, "bad index reached the handle: {}", msg);
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Append {
        layer: usize,
        seq: u64,
        n: usize,
        kvh: usize,
        d: usize,
        dtype: c_int,
        phase: c_int,
    },
    Prefill {
        layer: usize,
        seq: u64,
        n: usize,
        qh: usize,
    },
    Decode {
        layer: usize,
        seqs: Vec<u64>,
        qh: usize,
    },
    SeqLen {
        layer: usize,
        seq: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let layer = 0usize..LAYERS + 2;
    let seq = 0u64..4;
    prop_oneof![
        (
            layer.clone(),
            seq.clone(),
            0usize..40,
            NKV - 1..NKV + 2,
            D - 1..D + 2,
            -1i32..4,
            -1i32..3
        )
            .prop_map(|(layer, seq, n, kvh, d, dtype, phase)| Op::Append {
                layer,
                seq,
                n,
                kvh,
                d,
                dtype,
                phase
            }),
        (layer.clone(), seq.clone(), 0usize..40, NQ - 1..NQ + 2)
            .prop_map(|(layer, seq, n, qh)| Op::Prefill { layer, seq, n, qh }),
        (
            layer.clone(),
            prop::collection::vec(seq.clone(), 0..4),
            NQ - 1..NQ + 2
        )
            .prop_map(|(layer, seqs, qh)| Op::Decode { layer, seqs, qh }),
        (layer, seq).prop_map(|(layer, seq)| Op::SeqLen { layer, seq }),
    ]
}

/// The code the model expects for the argument checks of `op`, if an
/// argument is bad (None: the engine decides).
fn expected_arg_error(op: &Op) -> Option<c_int> {
    let bad = match op {
        Op::Append {
            layer,
            kvh,
            d,
            dtype,
            phase,
            ..
        } => {
            *layer >= LAYERS
                || *kvh != NKV
                || *d != D
                || !(0..3).contains(dtype)
                || !(0..2).contains(phase)
        }
        Op::Prefill { layer, n, qh, .. } => *layer >= LAYERS || *n == 0 || *qh != NQ,
        Op::Decode { layer, seqs, qh } => *layer >= LAYERS || seqs.is_empty() || *qh != NQ,
        Op::SeqLen { layer, .. } => *layer >= LAYERS,
    };
    bad.then_some(IHIP_ERR_ARG)
}

unsafe fn run_op(e: *const IhipEngine, op: &Op) -> c_int {
    match op {
        Op::Append {
            layer,
            seq,
            n,
            kvh,
            d,
            dtype,
            phase,
        } => {
            // Buffers as large as the call claims, in the widest dtype.
            let kv = vec![0.25f32; n * kvh * d];
            ihip_append(
                e,
                *layer,
                *seq,
                kv.as_ptr().cast(),
                kv.as_ptr().cast(),
                *dtype,
                *n,
                *kvh,
                *d,
                *phase,
                0,
                std::ptr::null(),
                std::ptr::null(),
                std::ptr::null(),
            )
        }
        Op::Prefill { layer, seq, n, qh } => {
            let q = vec![0.5f32; n * qh * D];
            let mut out = vec![0f32; q.len()];
            ihip_attend_prefill(e, *layer, *seq, q.as_ptr(), *n, *qh, D, out.as_mut_ptr())
        }
        Op::Decode { layer, seqs, qh } => {
            let q = vec![0.5f32; seqs.len() * qh * D];
            let mut out = vec![0f32; q.len()];
            ihip_attend_decode(
                e,
                *layer,
                seqs.as_ptr(),
                seqs.len(),
                q.as_ptr(),
                *qh,
                D,
                out.as_mut_ptr(),
            )
        }
        Op::SeqLen { layer, seq } => {
            let mut n = 0usize;
            ihip_seq_len(e, *layer, *seq, &mut n)
        }
    }
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn engine_calls_with_random_indices_and_shapes_never_panic(ops in prop::collection::vec(op(), 1..24)) {
        let cfg = CString::new(format!(
            r#"{{"model": {{"n_layers": {LAYERS}, "n_q_heads": {NQ}, "n_kv_heads": {NKV}, "head_dim": {D}}},
                "kv": {{"page_size": 16, "dtype": "f32"}}, "dense_layers": 0,
                "default": {{"method": "hip", "sink": 4, "window": 8,
                  "stages": [{{"chunk_size": 8, "keep_tokens": 16, "refresh_interval": 2}}],
                  "block_size_q": 8, "q_stride": 1, "prefill_chunk": 16}}}}"#
        )).unwrap();
        let e = unsafe { ihip_engine_new(cfg.as_ptr()) };
        prop_assert!(!e.is_null(), "{}", last_error());
        for s in [1u64, 2] {
            prop_assert_eq!(unsafe { ihip_add_sequence(e, s) }, IHIP_OK);
        }
        for op in &ops {
            let rc = unsafe { run_op(e, op) };
            let msg = last_error();
            prop_assert_ne!(rc, IHIP_ERR_PANIC, "{:?}: {}", op, msg);
            if let Some(want) = expected_arg_error(op) {
                prop_assert_eq!(rc, want, "{:?}: {}", op, msg);
            }
            // Unregistered sequences (0, 3) are never accepted.
            let unknown = match op {
                Op::Append { seq, .. } | Op::Prefill { seq, .. } | Op::SeqLen { seq, .. } => !(1..=2).contains(seq),
                Op::Decode { seqs, .. } => seqs.iter().any(|s| !(1..=2).contains(s)),
            };
            if unknown {
                prop_assert_ne!(rc, IHIP_OK, "{:?}", op);
            }
        }
        // The engine is not poisoned by any of it.
        prop_assert_eq!(unsafe { ihip_add_sequence(e, 100) }, IHIP_OK, "{}", last_error());
        unsafe { ihip_engine_free(e) };
    }

    /// Lengths whose byte size passes `isize::MAX` are refused before
    /// `from_raw_parts` (which would abort the process in a debug build).
    #[test]
    fn lengths_beyond_isize_max_are_argument_errors(n in (isize::MAX as usize / 8 + 1)..=usize::MAX) {
        let e = unsafe { ihip_engine_new(CString::new(format!(
            r#"{{"model": {{"n_layers": 1, "n_q_heads": {NQ}, "n_kv_heads": {NKV}, "head_dim": {D}}}, "dense_layers": 1}}"#
        )).unwrap().as_ptr()) };
        prop_assert!(!e.is_null(), "{}", last_error());
        // A non-NULL, aligned pointer that must never be read.
        let p = std::ptr::NonNull::<u64>::dangling().as_ptr();
        let q = std::ptr::NonNull::<f32>::dangling().as_ptr();
        let rc = unsafe { ihip_attend_decode(e, 0, p, n, q, NQ, D, q) };
        prop_assert_eq!(rc, IHIP_ERR_ARG, "{}", last_error());
        prop_assert!(last_error().contains("isize::MAX"), "{}", last_error());
        let reqs = IhipGpuRequests { batch: n, req_ids: p, table_rows: p.cast(), lens: p.cast(), n_new: p.cast() };
        let kv = IhipKvCache { k: 16, v: 16, dtype: 2, table: 16, table_stride: 8, table_n_rows: 8, page_size: 1,
                               page_stride: 32, head_stride: 16 };
        let rows = IhipDeviceRows { ptr: 16, dtype: 2, row_stride: 64 };
        let rc = unsafe { ihip_gpu_decode(std::ptr::null(), 0, 0, &reqs, &kv, &rows, &rows, 0.0) };
        prop_assert_eq!(rc, IHIP_ERR_ARG, "{}", last_error());
        unsafe { ihip_engine_free(e) };
    }
}
