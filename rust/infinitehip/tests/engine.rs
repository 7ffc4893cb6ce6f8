//! The engine end to end on the CPU: sequences, appends, prefill and decode
//! across layers, against the f64 reference.

use half::bf16;
use infinitehip::attention::{reference, rel_error};
use infinitehip::config::{HipConfig, HipStage, LayerPolicy, ModelShape};
use infinitehip::kv::{KvLayout, KvPool};
use infinitehip::policy::Phase;
use infinitehip::rng::Rng;
use infinitehip::{DType, Engine, PolicyConfig};

fn cfg(keep: usize, dtype: DType) -> PolicyConfig {
    cfg_cached(keep, dtype, None)
}

fn cfg_cached(keep: usize, dtype: DType, device_cache_pages: Option<usize>) -> PolicyConfig {
    PolicyConfig {
        model: ModelShape {
            n_layers: 2,
            n_q_heads: 4,
            n_kv_heads: 2,
            head_dim: 32,
            ..ModelShape::default()
        },
        kv: infinitehip::config::KvConfig {
            page_size: 16,
            dtype,
            device_cache_pages,
            ..Default::default()
        },
        dense_layers: 1,
        default: LayerPolicy::Hip(HipConfig {
            sink: 4,
            window: 16,
            stages: vec![
                HipStage {
                    chunk_size: 16,
                    keep_tokens: keep * 2,
                    refresh_interval: 4,
                },
                HipStage {
                    chunk_size: 4,
                    keep_tokens: keep,
                    refresh_interval: 2,
                },
            ],
            block_size_q: 8,
            q_stride: 1,
            prefill_chunk: 48,
            // Full budget: ranks equal positions, so streaming equals dense.
            rope: infinitehip::config::RopeConfig {
                scoring: infinitehip::config::RopeMode::Original,
                attention: infinitehip::config::RopeMode::Streaming,
            },
            ..HipConfig::default()
        }),
        overrides: vec![],
    }
}

/// Reference: a plain pool holding the same K/V, dense f64 attention.
#[test]
fn full_budget_engine_equals_dense_reference() {
    for dtype in [DType::F32, DType::Bf16] {
        let mut eng = Engine::new(cfg(4096, dtype)).unwrap();
        let shape = eng.shape();
        let mut refpool = KvPool::<f32>::new(
            KvLayout {
                n_kv_heads: 2,
                head_dim: 32,
                page_size: 16,
            },
            None,
        )
        .unwrap();
        refpool.add_sequence(7).unwrap();
        eng.add_sequence(7).unwrap();
        let mut rng = Rng::new(1);
        // The reference reads the same stored (dtype-rounded) K/V: only f32
        // accumulation differs (~1e-6), in every dtype.
        let bound = 1e-5;
        let te = 64;
        // Prefill 150 tokens then 10 decode steps, layer 1 (hip).
        for (n, phase) in [(150usize, Phase::Prefill)]
            .into_iter()
            .chain((0..10).map(|_| (1, Phase::Decode)))
        {
            let k: Vec<f32> = rng.normal_vec(n * te, 1.0);
            let v: Vec<f32> = rng.normal_vec(n * te, 1.0);
            // Store what the engine stores (rounded to its dtype) in the reference.
            let kr: Vec<f32> = k
                .iter()
                .map(|&x| {
                    if dtype == DType::Bf16 {
                        bf16::from_f32(x).to_f32()
                    } else {
                        x
                    }
                })
                .collect();
            let vr: Vec<f32> = v
                .iter()
                .map(|&x| {
                    if dtype == DType::Bf16 {
                        bf16::from_f32(x).to_f32()
                    } else {
                        x
                    }
                })
                .collect();
            refpool.append(7, &kr, &vr).unwrap();
            for layer in 0..2 {
                eng.append(layer, 7, &k, &v, phase, phase == Phase::Prefill, None)
                    .unwrap();
            }
            let q = rng.normal_vec(n * shape.q_elems(), 1.0);
            let view = refpool.view(7).unwrap();
            let len = refpool.seq_len(7).unwrap();
            let want = reference::prefill_f64(&shape, &q, len - n, &view, None);
            for layer in 0..2 {
                let mut out = vec![f32::NAN; q.len()];
                if phase == Phase::Prefill {
                    eng.attend_prefill(layer, 7, &q, &mut out).unwrap();
                } else {
                    eng.attend_decode(layer, &[7], &q, &mut out).unwrap();
                }
                let err = rel_error(&out, &want);
                assert!(
                    err <= bound,
                    "{dtype} layer {layer} {phase:?} len {len}: rel err {err}"
                );
            }
        }
        assert_eq!(eng.seq_len(1, 7).unwrap(), 160);
        let stats = eng.stats();
        assert_eq!(stats[0].method, "dense");
        assert_eq!(stats[1].method, "hip");
        assert_eq!(stats[1].pool.pages_in_use, 10);
        eng.free_sequence(7).unwrap();
        assert_eq!(eng.stats()[1].pool.pages_in_use, 0);
    }
}

#[test]
fn small_budget_decodes_a_batch_of_mixed_lengths() {
    let mut eng = Engine::new(cfg(16, DType::Bf16)).unwrap();
    let shape = eng.shape();
    let mut rng = Rng::new(3);
    for (s, n) in [(1u64, 40usize), (2, 500), (3, 1)] {
        eng.add_sequence(s).unwrap();
        for layer in 0..2 {
            let k = rng.normal_vec(n * 64, 1.0);
            eng.append(layer, s, &k, &k, Phase::Prefill, true, None)
                .unwrap();
        }
    }
    eng.fork_sequence(2, 4).unwrap();
    let seqs = [1u64, 2, 3, 4];
    let q = rng.normal_vec(seqs.len() * shape.q_elems(), 1.0);
    let mut out = vec![f32::NAN; q.len()];
    eng.attend_decode(1, &seqs, &q, &mut out).unwrap();
    assert!(out.iter().all(|x| x.is_finite()));
    // Forked sequence 4 sees the same KV as 2: same output for the same query.
    let mut q2 = q.clone();
    q2[3 * shape.q_elems()..].copy_from_slice(&q[shape.q_elems()..2 * shape.q_elems()].to_vec());
    let mut out2 = vec![f32::NAN; q.len()];
    eng.attend_decode(1, &seqs, &q2, &mut out2).unwrap();
    let qe = shape.q_elems();
    assert_eq!(&out2[3 * qe..], &out2[qe..2 * qe]);
}

#[test]
fn engine_errors_name_the_problem() {
    let mut eng = Engine::new(cfg(16, DType::F16)).unwrap();
    eng.add_sequence(1).unwrap();
    assert!(eng
        .add_sequence(1)
        .unwrap_err()
        .to_string()
        .contains("already exists"));
    let e = eng
        .append(5, 1, &[0f32; 64], &[0f32; 64], Phase::Prefill, false, None)
        .unwrap_err();
    assert!(e.to_string().contains("layer 5"), "{e}");
    let e = eng
        .append(0, 1, &[0f32; 63], &[0f32; 63], Phase::Prefill, false, None)
        .unwrap_err();
    assert!(e.to_string().contains("append K/V"), "{e}");
    let e = eng
        .attend_decode(0, &[1], &[0f32; 128], &mut [0f32; 128])
        .unwrap_err();
    assert!(e.to_string().contains("append its K/V first"), "{e}");
    let e = eng
        .attend_decode(0, &[9], &[0f32; 128], &mut [0f32; 128])
        .unwrap_err();
    assert!(e.to_string().contains("unknown sequence id 9"), "{e}");
    let e = eng
        .attend_prefill(0, 1, &[0f32; 100], &mut [0f32; 100])
        .unwrap_err();
    assert!(e.to_string().contains("prefill q/out"), "{e}");
    let mut bad = cfg(16, DType::F16);
    bad.model.n_kv_heads = 3;
    assert!(Engine::new(bad)
        .err()
        .unwrap()
        .to_string()
        .contains("model.n_q_heads"));
}

/// Host offload through the engine: a small device cache gives bit-identical
/// outputs to all-resident KV, and the stats account for every page.
#[test]
fn device_page_cache_is_transparent() {
    let mut plain = Engine::new(cfg(64, DType::Bf16)).unwrap();
    // 200 pages of 16 tokens per sequence; the cache holds 40 per layer
    // (each of the 2 KV heads selects its own 16 chunks, plus sink/window).
    let mut cached = Engine::new(cfg_cached(64, DType::Bf16, Some(40))).unwrap();
    let shape = plain.shape();
    let mut rng = Rng::new(9);
    for e in [&mut plain, &mut cached] {
        e.add_sequence(1).unwrap();
    }
    let n = 3200;
    let k = rng.normal_vec(n * 64, 1.0);
    let v = rng.normal_vec(n * 64, 1.0);
    for e in [&mut plain, &mut cached] {
        for layer in 0..2 {
            e.append(layer, 1, &k, &v, Phase::Prefill, true, None)
                .unwrap();
        }
    }
    let mut est_steps = 0;
    for step in 0..12 {
        let q = rng.normal_vec(shape.q_elems(), 1.0);
        let (k1, v1) = (rng.normal_vec(64, 1.0), rng.normal_vec(64, 1.0));
        let mut outs = Vec::new();
        for e in [&mut plain, &mut cached] {
            for layer in 0..2 {
                e.append(layer, 1, &k1, &v1, Phase::Decode, false, None)
                    .unwrap();
            }
            let mut o = vec![f32::NAN; q.len()];
            e.attend_decode(1, &[1], &q, &mut o).unwrap();
            outs.push(o);
        }
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&outs[0]),
            bits(&outs[1]),
            "step {step}: cached decode differs"
        );
        let ls = cached.stats()[1].last_step;
        est_steps += (ls.estimation_bytes > 0) as usize;
        // 40 pages of cache = 80 head-block slots (2 KV heads).
        assert!(ls.blocks_needed > 0 && ls.blocks_needed <= 80);
    }
    // Stage refresh intervals 4 and 2: estimation reads keys on even steps only.
    assert_eq!(est_steps, 6);
    let st = &cached.stats()[1];
    assert_eq!(st.device_bytes, 40 * 2 * 2 * 16 * 32 * 2);
    assert!(
        st.cache.misses > 0 && st.cache.hits > st.cache.misses,
        "{:?}",
        st.cache
    );
    assert_eq!(plain.stats()[1].device_bytes, 0);
    cached.free_sequence(1).unwrap();
    let bad = cfg_cached(64, DType::Bf16, Some(0));
    assert!(Engine::new(bad)
        .err()
        .unwrap()
        .to_string()
        .contains("kv.device_cache_pages"));
}

/// Mask-estimation reads go through the row cache: a repeated refresh with
/// the same query and KV reads the same rows, all hits the second time; the
/// outputs stay bit-identical to all-resident decode.
#[test]
fn estimation_row_cache_hits_on_repeated_refresh() {
    let mut plain = Engine::new(cfg(64, DType::Bf16)).unwrap();
    let mut c = cfg_cached(64, DType::Bf16, Some(40));
    c.kv.estimation_cache_rows = Some(4000);
    let mut cached = Engine::new(c).unwrap();
    let shape = plain.shape();
    let mut rng = Rng::new(11);
    let n = 3200;
    let k = rng.normal_vec(n * 64, 1.0);
    let v = rng.normal_vec(n * 64, 1.0);
    for e in [&mut plain, &mut cached] {
        e.add_sequence(1).unwrap();
        for layer in 0..2 {
            e.append(layer, 1, &k, &v, Phase::Prefill, true, None)
                .unwrap();
        }
    }
    let q = rng.normal_vec(shape.q_elems(), 1.0);
    let mut est = Vec::new();
    for step in 0..8 {
        let mut outs = Vec::new();
        for e in [&mut plain, &mut cached] {
            let mut o = vec![f32::NAN; q.len()];
            e.attend_decode(1, &[1], &q, &mut o).unwrap();
            outs.push(o.iter().map(|f| f.to_bits()).collect::<Vec<_>>());
        }
        assert_eq!(outs[0], outs[1], "step {step}: cached decode differs");
        let ls = cached.stats()[1].last_step;
        if ls.estimation_bytes > 0 {
            est.push(ls.estimation_cache);
        }
    }
    assert!(est.len() >= 2, "{est:?}");
    assert!(est[0].misses > 0 && est[0].bytes_copied == est[0].misses * 64);
    for e in &est[1..] {
        assert!(e.hits > 0 && e.misses == 0 && e.bytes_copied == 0, "{e:?}");
    }
    assert_eq!(
        cached.stats()[1].device_bytes,
        40 * 2 * 2 * 16 * 32 * 2 + 4000 * 32 * 2
    );
    let mut bad = cfg(64, DType::Bf16);
    bad.kv.estimation_cache_rows = Some(10);
    let e = Engine::new(bad).err().unwrap().to_string();
    assert!(e.contains("kv.estimation_cache_rows"), "{e}");
}
