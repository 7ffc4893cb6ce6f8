//! Soak: 10,000 decode steps over a mixed batch (requests joining and
//! leaving, forks sharing pages copy-on-write, device page-cache evictions
//! with every page on the host tier) end with the pools holding exactly
//! what they held at the start. Counts pages, bytes and sequences the
//! engine holds (not RSS), and checks that freed pages are reused rather
//! than the pool growing with the number of requests served.

use infinitehip::config::{HipConfig, HipStage, KvConfig, LayerPolicy, ModelShape};
use infinitehip::policy::Phase;
use infinitehip::rng::Rng;
use infinitehip::{DType, Engine, PolicyConfig};

const STEPS: usize = 10_000;
const MAX_BATCH: usize = 6;
const MAX_LEN: usize = 400;

fn config() -> PolicyConfig {
    PolicyConfig {
        model: ModelShape {
            n_layers: 2,
            n_q_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            ..ModelShape::default()
        },
        kv: KvConfig {
            page_size: 8,
            dtype: DType::Bf16,
            // Host offload through a device cache (128 pages x 2 heads)
            // that holds one hip step (6 x 20 pages per head at most) but
            // not the live requests' pages (up to 6 x 50): it evicts.
            device_cache_pages: Some(128),
            estimation_cache_rows: Some(256),
        },
        dense_layers: 0,
        default: LayerPolicy::Hip(HipConfig {
            sink: 4,
            window: 16,
            stages: vec![
                HipStage {
                    chunk_size: 8,
                    keep_tokens: 32,
                    refresh_interval: 4,
                },
                HipStage {
                    chunk_size: 2,
                    keep_tokens: 16,
                    refresh_interval: 2,
                },
            ],
            block_size_q: 8,
            q_stride: 1,
            prefill_chunk: 32,
            ..HipConfig::default()
        }),
        overrides: vec![],
        // Short contexts: run hip, not the dense short-context route.
        prefill_dense_below: 0,
        decode_dense_below: 0,
    }
}

/// (pages in use, bytes in use, sequences) per layer.
fn held(e: &Engine) -> Vec<(usize, usize, usize)> {
    e.stats()
        .iter()
        .map(|s| (s.pool.pages_in_use, s.pool.bytes_in_use, s.pool.sequences))
        .collect()
}

#[test]
fn ten_thousand_mixed_decode_steps_return_every_page() {
    let mut e = Engine::new(config()).unwrap();
    let shape = e.shape();
    let te = shape.n_kv_heads * shape.head_dim;
    let qe = shape.q_elems();
    let start = held(&e);
    let mut rng = Rng::new(2026);
    // (id, tokens appended)
    let mut live: Vec<(u64, usize)> = Vec::new();
    let mut next_id = 0u64;
    let (mut joined, mut forked, mut peak_pages) = (0usize, 0usize, 0usize);
    let mut out = vec![0f32; MAX_BATCH * qe];
    for step in 0..STEPS {
        // Join: a new request with a prompt (prefill attention included).
        if live.len() < MAX_BATCH && (live.len() < 2 || rng.below(8) == 0) {
            let id = next_id;
            next_id += 1;
            let n = 8 + rng.below(40);
            e.add_sequence(id).unwrap();
            let q = rng.normal_vec(n * qe, 1.0);
            let mut o = vec![0f32; n * qe];
            for layer in 0..2 {
                let k = rng.normal_vec(n * te, 1.0);
                let v = rng.normal_vec(n * te, 1.0);
                e.append(layer, id, &k, &v, Phase::Prefill, true, None)
                    .unwrap();
                e.attend_prefill(layer, id, &q, &mut o).unwrap();
            }
            assert!(o.iter().all(|x| x.is_finite()), "step {step}: prefill");
            live.push((id, n));
            joined += 1;
        }
        // Fork: a child sharing its parent's pages.
        if live.len() < MAX_BATCH && rng.below(25) == 0 {
            let (parent, len) = live[rng.below(live.len())];
            let child = next_id;
            next_id += 1;
            e.fork_sequence(parent, child).unwrap();
            live.push((child, len));
            forked += 1;
        }
        // Leave: finished (length cap) or cancelled.
        let mut i = 0;
        while i < live.len() {
            let (id, len) = live[i];
            if len >= MAX_LEN || rng.below(400) == 0 {
                e.free_sequence(id).unwrap();
                live.swap_remove(i);
            } else {
                i += 1;
            }
        }
        if live.is_empty() {
            continue;
        }
        // Decode one token for the whole batch in every layer.
        let ids: Vec<u64> = live.iter().map(|&(id, _)| id).collect();
        let b = ids.len();
        for layer in 0..2 {
            for &id in &ids {
                let k = rng.normal_vec(te, 1.0);
                let v = rng.normal_vec(te, 1.0);
                e.append(layer, id, &k, &v, Phase::Decode, false, None)
                    .unwrap();
            }
            let q = rng.normal_vec(b * qe, 1.0);
            e.attend_decode(layer, &ids, &q, &mut out[..b * qe])
                .unwrap();
            assert!(
                out[..b * qe].iter().all(|x| x.is_finite()),
                "step {step} layer {layer}: non-finite output"
            );
        }
        for s in &mut live {
            s.1 += 1;
        }
        for (layer, h) in held(&e).iter().enumerate() {
            assert_eq!(h.2, live.len(), "step {step} layer {layer}: sequences");
            peak_pages = peak_pages.max(h.0);
        }
    }
    for (id, _) in live.drain(..) {
        e.free_sequence(id).unwrap();
    }
    assert_eq!(held(&e), start, "pages/bytes/sequences held after the soak");
    let stats = e.stats();
    for (layer, s) in stats.iter().enumerate() {
        // The pool's page storage is bounded by the peak in use (sampled
        // after each step; a join's prompt and copy-on-write pages come and
        // go within a step: slack 64), not by the pages of every request
        // served (thousands): freed pages are reused.
        let allocated = s.pool.pages_in_use + s.pool.pages_free;
        assert!(
            allocated <= peak_pages + 64,
            "layer {layer}: {allocated} pages allocated for a peak of {peak_pages}"
        );
        assert!(s.cache.evictions > 1000, "layer {layer}: {:?}", s.cache);
    }
    // The mix really was mixed.
    assert!(
        joined > 150 && forked > 30,
        "joined {joined}, forked {forked}"
    );
}
