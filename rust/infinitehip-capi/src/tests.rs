//! Tests of the C ABI, called the way C calls it (raw pointers, codes,
//! thread-local messages), against an f64 dense reference written here.

use super::*;
use ihip::rng::Rng;
use std::ffi::CString;

const NQ: usize = 4;
const NKV: usize = 2;
const D: usize = 16;

fn cfg_json(extra_default: &str) -> CString {
    CString::new(format!(
        r#"{{"model": {{"n_layers": 2, "n_q_heads": {NQ}, "n_kv_heads": {NKV}, "head_dim": {D}}},
            "kv": {{"page_size": 16, "dtype": "f32"}},
            "dense_layers": 1,
            "default": {extra_default}}}"#
    ))
    .unwrap()
}

/// hip with a budget far above the test's context: must equal dense.
fn full_budget_hip() -> String {
    r#"{"method": "hip", "sink": 4, "window": 16,
        "stages": [{"chunk_size": 16, "keep_tokens": 4096, "refresh_interval": 4},
                   {"chunk_size": 4, "keep_tokens": 2048, "refresh_interval": 2}],
        "block_size_q": 8, "q_stride": 1, "prefill_chunk": 32}"#
        .to_string()
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(ihip_last_error()) }
        .to_str()
        .unwrap()
        .to_string()
}

fn new_engine(json: &CString) -> *mut IhipEngine {
    let e = unsafe { ihip_engine_new(json.as_ptr()) };
    assert!(!e.is_null(), "engine_new failed: {}", last_error());
    e
}

/// Dense causal GQA attention in f64 over flat `[t][h][d]` K/V, queries at
/// positions `q_start..`.
fn dense_ref(q: &[f32], q_start: usize, k: &[f32], v: &[f32]) -> Vec<f64> {
    let n = q.len() / (NQ * D);
    let g = NQ / NKV;
    let scale = 1.0 / (D as f64).sqrt();
    let mut out = vec![0f64; q.len()];
    for i in 0..n {
        let limit = q_start + i + 1;
        for hq in 0..NQ {
            let h = hq / g;
            let qv = &q[(i * NQ + hq) * D..][..D];
            let s: Vec<f64> = (0..limit)
                .map(|t| {
                    let kr = &k[(t * NKV + h) * D..][..D];
                    qv.iter()
                        .zip(kr)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = w.iter().sum();
            let o = &mut out[(i * NQ + hq) * D..][..D];
            for (t, wt) in w.iter().enumerate() {
                let vr = &v[(t * NKV + h) * D..][..D];
                for (oo, &vv) in o.iter_mut().zip(vr) {
                    *oo += wt / z * vv as f64;
                }
            }
        }
    }
    out
}

fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    ihip::attention::rel_error(a, b)
}

#[test]
fn full_budget_prefill_and_decode_equal_dense_reference_for_each_dtype() {
    for (dtype, bound) in [
        (IHIP_DTYPE_F32, 1e-5),
        (IHIP_DTYPE_F16, 1e-2),
        (IHIP_DTYPE_BF16, 1e-2),
    ] {
        let e = new_engine(&cfg_json(&full_budget_hip()));
        let mut rng = Rng::new(11 + dtype as u64);
        assert_eq!(unsafe { ihip_add_sequence(e, 42) }, IHIP_OK);
        let (mut kall, mut vall) = (Vec::new(), Vec::new());
        for (step, n) in [70usize, 1, 1, 1, 1, 1].into_iter().enumerate() {
            let k = rng.normal_vec(n * NKV * D, 1.0);
            let v = rng.normal_vec(n * NKV * D, 1.0);
            // Convert to the storage dtype on the caller's side (what SGLang hands us).
            let (kr, vr): (Vec<f32>, Vec<f32>);
            let rc = match dtype {
                IHIP_DTYPE_F32 => {
                    kr = k.clone();
                    vr = v.clone();
                    (0..2)
                        .map(|l| unsafe {
                            ihip_append(
                                e,
                                l,
                                42,
                                k.as_ptr().cast(),
                                v.as_ptr().cast(),
                                dtype,
                                n,
                                NKV,
                                D,
                                (step > 0) as c_int,
                                1,
                                std::ptr::null(),
                                std::ptr::null(),
                                std::ptr::null(),
                            )
                        })
                        .collect::<Vec<_>>()
                }
                IHIP_DTYPE_F16 => {
                    let kh: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
                    let vh: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
                    kr = kh.iter().map(|x| x.to_f32()).collect();
                    vr = vh.iter().map(|x| x.to_f32()).collect();
                    (0..2)
                        .map(|l| unsafe {
                            ihip_append(
                                e,
                                l,
                                42,
                                kh.as_ptr().cast(),
                                vh.as_ptr().cast(),
                                dtype,
                                n,
                                NKV,
                                D,
                                (step > 0) as c_int,
                                1,
                                std::ptr::null(),
                                std::ptr::null(),
                                std::ptr::null(),
                            )
                        })
                        .collect()
                }
                _ => {
                    let kh: Vec<bf16> = k.iter().map(|&x| bf16::from_f32(x)).collect();
                    let vh: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
                    kr = kh.iter().map(|x| x.to_f32()).collect();
                    vr = vh.iter().map(|x| x.to_f32()).collect();
                    (0..2)
                        .map(|l| unsafe {
                            ihip_append(
                                e,
                                l,
                                42,
                                kh.as_ptr().cast(),
                                vh.as_ptr().cast(),
                                dtype,
                                n,
                                NKV,
                                D,
                                (step > 0) as c_int,
                                1,
                                std::ptr::null(),
                                std::ptr::null(),
                                std::ptr::null(),
                            )
                        })
                        .collect()
                }
            };
            assert!(rc.iter().all(|&c| c == IHIP_OK), "{}", last_error());
            kall.extend(kr);
            vall.extend(vr);
            let len = kall.len() / (NKV * D);
            let q = rng.normal_vec(n * NQ * D, 1.0);
            let want = dense_ref(&q, len - n, &kall, &vall);
            for layer in 0..2 {
                let mut out = vec![f32::NAN; q.len()];
                let rc = unsafe {
                    if step == 0 {
                        ihip_attend_prefill(e, layer, 42, q.as_ptr(), n, NQ, D, out.as_mut_ptr())
                    } else {
                        let seqs = [42u64];
                        ihip_attend_decode(
                            e,
                            layer,
                            seqs.as_ptr(),
                            1,
                            q.as_ptr(),
                            NQ,
                            D,
                            out.as_mut_ptr(),
                        )
                    }
                };
                assert_eq!(rc, IHIP_OK, "{}", last_error());
                let err = rel_err(&out, &want);
                assert!(
                    err <= bound,
                    "dtype {dtype} layer {layer} step {step}: rel err {err}"
                );
            }
        }
        let mut len = 0usize;
        assert_eq!(unsafe { ihip_seq_len(e, 1, 42, &mut len) }, IHIP_OK);
        assert_eq!(len, 75);
        unsafe { ihip_engine_free(e) };
    }
}

#[test]
fn decode_batch_of_forked_sequences_of_different_lengths() {
    let e = new_engine(&cfg_json(r#"{"method": "dense"}"#));
    let mut rng = Rng::new(5);
    let te = NKV * D;
    unsafe {
        assert_eq!(ihip_add_sequence(e, 1), IHIP_OK);
        let k = rng.normal_vec(40 * te, 1.0);
        let v = rng.normal_vec(40 * te, 1.0);
        for l in 0..2 {
            let rc = ihip_append(
                e,
                l,
                1,
                k.as_ptr().cast(),
                v.as_ptr().cast(),
                IHIP_DTYPE_F32,
                40,
                NKV,
                D,
                IHIP_PHASE_PREFILL,
                1,
                std::ptr::null(),
                std::ptr::null(),
                std::ptr::null(),
            );
            assert_eq!(rc, IHIP_OK, "{}", last_error());
        }
        assert_eq!(ihip_fork_sequence(e, 1, 2), IHIP_OK, "{}", last_error());
        // Child grows by 3 more tokens; parent unchanged (copy-on-write).
        let k2 = rng.normal_vec(3 * te, 1.0);
        let v2 = rng.normal_vec(3 * te, 1.0);
        for l in 0..2 {
            let rc = ihip_append(
                e,
                l,
                2,
                k2.as_ptr().cast(),
                v2.as_ptr().cast(),
                IHIP_DTYPE_F32,
                3,
                NKV,
                D,
                IHIP_PHASE_DECODE,
                0,
                std::ptr::null(),
                std::ptr::null(),
                std::ptr::null(),
            );
            assert_eq!(rc, IHIP_OK, "{}", last_error());
        }
        let q = rng.normal_vec(2 * NQ * D, 1.0);
        let mut out = vec![f32::NAN; q.len()];
        let seqs = [1u64, 2];
        assert_eq!(
            ihip_attend_decode(e, 1, seqs.as_ptr(), 2, q.as_ptr(), NQ, D, out.as_mut_ptr()),
            IHIP_OK,
            "{}",
            last_error()
        );
        let want1 = dense_ref(&q[..NQ * D], 39, &k, &v);
        let (kc, vc): (Vec<f32>, Vec<f32>) = ([k.clone(), k2].concat(), [v.clone(), v2].concat());
        let want2 = dense_ref(&q[NQ * D..], 42, &kc, &vc);
        assert!(rel_err(&out[..NQ * D], &want1) <= 1e-5);
        assert!(rel_err(&out[NQ * D..], &want2) <= 1e-5);
        let s = ihip_stats_json(e);
        assert!(!s.is_null());
        let js: serde_json::Value =
            serde_json::from_str(CStr::from_ptr(s).to_str().unwrap()).unwrap();
        ihip_string_free(s);
        assert_eq!(js["layers"].as_array().unwrap().len(), 2);
        assert_eq!(js["layers"][1]["method"], "dense");
        assert_eq!(js["layers"][1]["sequences"], 2);
        assert_eq!(ihip_free_sequence(e, 1), IHIP_OK);
        assert_eq!(ihip_free_sequence(e, 2), IHIP_OK);
        let s = ihip_stats_json(e);
        let js: serde_json::Value =
            serde_json::from_str(CStr::from_ptr(s).to_str().unwrap()).unwrap();
        ihip_string_free(s);
        assert_eq!(js["layers"][1]["pages_in_use"], 0);
        ihip_engine_free(e);
    }
}

#[test]
fn config_errors_name_the_problem() {
    unsafe {
        assert!(ihip_engine_new(std::ptr::null()).is_null());
        assert!(
            last_error().contains("config_json is NULL"),
            "{}",
            last_error()
        );

        let bad = CString::new("{not json").unwrap();
        assert!(ihip_engine_new(bad.as_ptr()).is_null());
        assert!(last_error().contains("not valid JSON"), "{}", last_error());

        let bad = CString::new(r#"{"model": {"n_kv_heads": 3}}"#).unwrap();
        assert!(ihip_engine_new(bad.as_ptr()).is_null());
        assert!(last_error().contains("model.n_q_heads"), "{}", last_error());
        assert_eq!(ihip_config_check(bad.as_ptr()), IHIP_ERR_ENGINE);

        let bad = CString::new(r#"{"default": {"method": "hip", "stages": []}}"#).unwrap();
        assert!(ihip_engine_new(bad.as_ptr()).is_null());
        assert!(last_error().contains("default.stages"), "{}", last_error());

        let d = ihip_default_config_json();
        assert!(!d.is_null());
        assert_eq!(ihip_config_check(d), IHIP_OK);
        ihip_string_free(d);
        assert!(CStr::from_ptr(ihip_version())
            .to_str()
            .unwrap()
            .starts_with("0."));
    }
}

#[test]
fn argument_errors_are_codes_with_messages_never_panics() {
    let e = new_engine(&cfg_json(r#"{"method": "dense"}"#));
    let k = vec![0.5f32; 3 * NKV * D];
    let null = std::ptr::null::<f32>();
    unsafe {
        assert_eq!(ihip_add_sequence(e, 9), IHIP_OK);
        assert_eq!(ihip_add_sequence(e, 9), IHIP_ERR_ENGINE);
        assert!(
            last_error().contains("9 already exists"),
            "{}",
            last_error()
        );
        assert_eq!(ihip_add_sequence(std::ptr::null(), 1), IHIP_ERR_ARG);
        assert!(last_error().contains("engine handle is NULL"));

        let app = |kp: *const std::ffi::c_void,
                   dtype: c_int,
                   n: usize,
                   heads: usize,
                   phase: c_int,
                   pq: *const f32| {
            ihip_append(
                e,
                0,
                9,
                kp,
                k.as_ptr().cast(),
                dtype,
                n,
                heads,
                D,
                phase,
                0,
                pq,
                null,
                null,
            )
        };
        assert_eq!(app(k.as_ptr().cast(), 7, 3, NKV, 0, null), IHIP_ERR_ARG);
        assert!(last_error().contains("dtype code 7"), "{}", last_error());
        assert_eq!(
            app(k.as_ptr().cast(), IHIP_DTYPE_F32, 3, 3, 0, null),
            IHIP_ERR_ARG
        );
        assert!(last_error().contains("n_kv_heads=3"), "{}", last_error());
        assert_eq!(
            app(std::ptr::null(), IHIP_DTYPE_F32, 3, NKV, 0, null),
            IHIP_ERR_ARG
        );
        assert!(last_error().contains("k is NULL"), "{}", last_error());
        assert_eq!(
            app(k.as_ptr().cast(), IHIP_DTYPE_F32, 3, NKV, 5, null),
            IHIP_ERR_ARG
        );
        assert!(last_error().contains("phase 5"), "{}", last_error());
        assert_eq!(
            app(k.as_ptr().cast(), IHIP_DTYPE_F32, 3, NKV, 0, k.as_ptr()),
            IHIP_ERR_ARG
        );
        assert!(
            last_error().contains("all NULL or all non-NULL"),
            "{}",
            last_error()
        );
        let mis = (k.as_ptr() as *const u8).add(1);
        assert_eq!(
            app(mis.cast(), IHIP_DTYPE_F32, 3, NKV, 0, null),
            IHIP_ERR_ARG
        );
        assert!(last_error().contains("not aligned"), "{}", last_error());
        assert_eq!(
            app(
                k.as_ptr().cast(),
                IHIP_DTYPE_F32,
                usize::MAX / 2,
                NKV,
                0,
                null
            ),
            IHIP_ERR_ARG
        );
        assert!(last_error().contains("overflows"), "{}", last_error());
        // Unknown sequence; bad layer.
        let rc = ihip_append(
            e,
            0,
            77,
            k.as_ptr().cast(),
            k.as_ptr().cast(),
            IHIP_DTYPE_F32,
            3,
            NKV,
            D,
            0,
            0,
            null,
            null,
            null,
        );
        assert_eq!(rc, IHIP_ERR_ENGINE);
        assert!(last_error().contains("77"), "{}", last_error());
        let rc = ihip_append(
            e,
            5,
            9,
            k.as_ptr().cast(),
            k.as_ptr().cast(),
            IHIP_DTYPE_F32,
            3,
            NKV,
            D,
            0,
            0,
            null,
            null,
            null,
        );
        // An index out of range is the caller's argument error.
        assert_eq!(rc, IHIP_ERR_ARG);
        assert!(last_error().contains("layer 5"), "{}", last_error());

        // Attention: wrong q heads, overlap, empty, decode on an empty sequence.
        let mut out = vec![0f32; NQ * D];
        let q = vec![0.1f32; NQ * D];
        assert_eq!(
            ihip_attend_prefill(e, 0, 9, q.as_ptr(), 1, NQ + 1, D, out.as_mut_ptr()),
            IHIP_ERR_ARG
        );
        assert!(last_error().contains("n_q_heads=5"), "{}", last_error());
        assert_eq!(
            ihip_attend_prefill(e, 0, 9, out.as_ptr(), 1, NQ, D, out.as_mut_ptr()),
            IHIP_ERR_ARG
        );
        assert!(last_error().contains("overlap"), "{}", last_error());
        assert_eq!(
            ihip_attend_prefill(e, 0, 9, q.as_ptr(), 0, NQ, D, out.as_mut_ptr()),
            IHIP_ERR_ARG
        );
        let seqs = [9u64];
        assert_eq!(
            ihip_attend_decode(e, 0, seqs.as_ptr(), 1, q.as_ptr(), NQ, D, out.as_mut_ptr()),
            // `Error::Invalid` ("decode on sequence 9 with no tokens"): the
            // caller's argument.
            IHIP_ERR_ARG,
            "{}",
            last_error()
        );
        assert!(last_error().contains("no tokens"), "{}", last_error());
        assert_eq!(
            ihip_attend_decode(
                e,
                0,
                std::ptr::null(),
                1,
                q.as_ptr(),
                NQ,
                D,
                out.as_mut_ptr()
            ),
            IHIP_ERR_ARG
        );
        assert!(last_error().contains("seqs is NULL"), "{}", last_error());
        let mut len = 0usize;
        assert_eq!(ihip_seq_len(e, 0, 9, std::ptr::null_mut()), IHIP_ERR_ARG);
        assert_eq!(ihip_seq_len(e, 0, 9, &mut len), IHIP_OK);
        assert_eq!(len, 0);
        // Zero-token append with NULL pointers is a no-op.
        let rc = ihip_append(
            e,
            0,
            9,
            std::ptr::null(),
            std::ptr::null(),
            IHIP_DTYPE_F32,
            0,
            NKV,
            D,
            0,
            0,
            null,
            null,
            null,
        );
        assert_eq!(rc, IHIP_OK, "{}", last_error());
        ihip_engine_free(e);
        ihip_engine_free(std::ptr::null_mut());
        ihip_string_free(std::ptr::null_mut());
    }
}

#[test]
fn panics_are_caught_and_poison_the_engine() {
    let rc = guard("test", || panic!("boom"));
    assert_eq!(rc, IHIP_ERR_PANIC);
    assert!(last_error().contains("internal panic") && last_error().contains("boom"));
    let e = new_engine(&cfg_json(r#"{"method": "dense"}"#));
    let rc = guard("test", || with_engine(e, |_| panic!("inside the engine")));
    assert_eq!(rc, IHIP_ERR_PANIC);
    assert_eq!(unsafe { ihip_add_sequence(e, 1) }, IHIP_ERR_PANIC);
    assert!(last_error().contains("poisoned"), "{}", last_error());
    unsafe { ihip_engine_free(e) };
}

#[test]
fn last_error_is_per_thread() {
    unsafe { ihip_add_sequence(std::ptr::null(), 1) };
    let main_msg = last_error();
    assert!(main_msg.contains("NULL"));
    std::thread::spawn(|| assert_eq!(last_error(), ""))
        .join()
        .unwrap();
    assert_eq!(last_error(), main_msg);
}

/// The header declares exactly the functions the library exports.
#[test]
fn header_matches_exports() {
    let header = include_str!("../include/infinitehip.h");
    let src = concat!(
        include_str!("lib.rs"),
        include_str!("gpu.rs"),
        include_str!("gpu_host.rs")
    );
    let names = |text: &str, pat: &str| -> std::collections::BTreeSet<String> {
        text.match_indices(pat)
            .map(|(i, _)| {
                let rest = &text[i + pat.len() - "ihip_".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                // Declarations only (a name followed by its parameters).
                rest[name.len()..].starts_with('(').then_some(name)
            })
            .flatten()
            .collect()
    };
    let mut declared = names(header, " ihip_");
    declared.extend(names(header, "*ihip_"));
    let exported = names(src, "extern \"C\" fn ihip_");
    assert!(!exported.is_empty());
    assert_eq!(declared, exported);
    assert_eq!(ihip_abi_version(), IHIP_ABI_VERSION);
    // ABI 4: the GPU calls take descriptor structs, not 23-31 positional
    // arguments.
    for f in ["int ihip_gpu_decode(", "int ihip_gpu_prefill("] {
        let decl = &header[header.find(f).unwrap()..];
        let decl = &decl[..decl.find(';').unwrap()];
        assert!(decl.matches(',').count() < 9, "{decl}");
        assert!(decl.contains("const struct IhipKvCache *kv"), "{decl}");
    }
    for s in [
        "IhipGpuRequests",
        "IhipKvCache",
        "IhipDeviceRows",
        "IhipProj",
    ] {
        assert!(header.contains(&format!("typedef struct {s} {{")), "{s}");
    }
    for (name, value) in [
        ("IHIP_OK", IHIP_OK),
        ("IHIP_ERR_ARG", IHIP_ERR_ARG),
        ("IHIP_ERR_ENGINE", IHIP_ERR_ENGINE),
        ("IHIP_ERR_PANIC", IHIP_ERR_PANIC),
        ("IHIP_ERR_NO_GPU", IHIP_ERR_NO_GPU),
        ("IHIP_ERR_UNSUPPORTED", IHIP_ERR_UNSUPPORTED),
        ("IHIP_ERR_OOM", IHIP_ERR_OOM),
        ("IHIP_ERR_DEVICE", IHIP_ERR_DEVICE),
        ("IHIP_ABI_VERSION", IHIP_ABI_VERSION as c_int),
        ("IHIP_DTYPE_F32", IHIP_DTYPE_F32),
        ("IHIP_DTYPE_F16", IHIP_DTYPE_F16),
        ("IHIP_DTYPE_BF16", IHIP_DTYPE_BF16),
        ("IHIP_PHASE_PREFILL", IHIP_PHASE_PREFILL),
        ("IHIP_PHASE_DECODE", IHIP_PHASE_DECODE),
    ] {
        let plain = format!("#define {name} {value}\n");
        let paren = format!("#define {name} ({value})");
        assert!(
            header.contains(&plain) || header.contains(&paren),
            "{name} = {value}"
        );
    }
}
