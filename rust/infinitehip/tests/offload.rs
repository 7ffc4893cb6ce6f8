//! Host tier + device page cache: pages round-trip bit-exactly under random
//! access and eviction storms, and decode through a 5% cache equals decode
//! with every page resident.

use half::bf16;
use infinitehip::attention::{self, AttnShape};
use infinitehip::config::{HipConfig, HipStage};
use infinitehip::kv::{HeadBlock, KvLayout, KvPool, PageCache};
use infinitehip::offload::{decode_offloaded, CountingKv};
use infinitehip::policy::hip::HipPolicy;
use infinitehip::policy::{Phase, Policy, SelectRequest};
use infinitehip::rng::Rng;

fn model(head_dim: usize, rope_theta: f32) -> infinitehip::config::ModelShape {
    infinitehip::config::ModelShape {
        head_dim,
        rope_theta,
        ..Default::default()
    }
}
use infinitehip::workload::needle_seq;
use infinitehip::Element;

fn bits<T: Element>(x: &[T]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits_u32()).collect()
}

#[test]
fn pages_round_trip_under_eviction_storms() {
    let layout = KvLayout {
        n_kv_heads: 2,
        head_dim: 16,
        page_size: 8,
    };
    let mut host = KvPool::<bf16>::new(layout, None).unwrap();
    host.add_sequence(0).unwrap();
    let mut rng = Rng::new(1);
    let n_tok = 200 * 8;
    let k: Vec<bf16> = (0..n_tok * 32)
        .map(|_| bf16::from_f32(rng.normal()))
        .collect();
    let v: Vec<bf16> = (0..n_tok * 32)
        .map(|_| bf16::from_f32(rng.normal()))
        .collect();
    host.append(0, &k, &v).unwrap();
    let table = host.page_table(0).unwrap().to_vec();
    let mut cache = PageCache::<bf16>::new(layout, 10).unwrap();
    let mut requested = 0u64;
    for round in 0..3000 {
        let n = 1 + rng.below(6); // at most 4 pinned + 6 requested = 10 slots
        let pages: Vec<HeadBlock> = (0..n)
            .map(|_| HeadBlock {
                page: table[rng.below(table.len())],
                head: rng.below(2) as u32,
            })
            .collect();
        let pin = round % 50 == 0 && n < 5;
        cache.begin_step();
        let slots = cache.resolve(&host, &pages, pin).unwrap();
        let mut uniq = pages.clone();
        uniq.sort_unstable();
        uniq.dedup();
        requested += uniq.len() as u64;
        for (&p, &s) in pages.iter().zip(&slots) {
            let (hk, hv) = host.page_data(p.page).unwrap();
            let blk = p.head as usize * 8 * 16..(p.head as usize + 1) * 8 * 16;
            let (hk, hv) = (&hk[blk.clone()], &hv[blk]);
            let (ck, cv) = cache.slot_data(s);
            assert_eq!(bits(hk), bits(ck), "round {round}: K of {p:?} in slot {s}");
            assert_eq!(bits(hv), bits(cv), "round {round}: V of {p:?} in slot {s}");
        }
        if round % 50 == 49 {
            cache.unpin_all();
        }
    }
    let st = cache.stats();
    assert_eq!(
        st.hits + st.misses,
        requested,
        "every distinct requested page is a hit or a miss"
    );
    assert!(st.evictions > 1000, "no eviction storm: {st:?}");
    // More pages than slots in one request is a clear error.
    let too_many: Vec<HeadBlock> = table[..11]
        .iter()
        .map(|&page| HeadBlock { page, head: 1 })
        .collect();
    cache.begin_step();
    let e = cache
        .resolve(&host, &too_many, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("raise the device cache size"), "{e}");
}

#[test]
fn decode_through_a_five_percent_cache_equals_resident_decode() {
    let shape = AttnShape::new(8, 2, 64).unwrap();
    let len = 256 * 1024;
    let mut cfg = HipConfig::default();
    cfg.stages = vec![
        HipStage {
            chunk_size: 64,
            keep_tokens: 2048,
            refresh_interval: 16,
        },
        HipStage {
            chunk_size: 16,
            keep_tokens: 1024,
            refresh_interval: 8,
        },
        HipStage {
            chunk_size: 8,
            keep_tokens: 512,
            refresh_interval: 4,
        },
    ];
    let mut ns = needle_seq::<bf16>(shape, len, 64, cfg.sink, cfg.window, 64, 5).unwrap();
    let total_pages = len / 64;
    // 5% of the KV, counted in head blocks (the cache's unit).
    let slots = total_pages * shape.n_kv_heads * 5 / 100;
    let mut cache = PageCache::<bf16>::new(ns.pool.layout(), slots).unwrap();
    let mut pol = HipPolicy::new(cfg.clone(), &model(64, 500000.0)).unwrap();
    let mut rng = Rng::new(6);
    let mut hits = 0u64;
    let mut lookups = 0u64;
    for step in 0..20 {
        let q = ns.query(&mut rng);
        let cur = ns.pool.seq_len(0).unwrap();
        let view = ns.pool.view(0).unwrap();
        let counting = CountingKv::new(&view, 2);
        let sel = pol
            .select(&SelectRequest {
                seq: 0,
                shape,
                phase: Phase::Decode,
                queries: &q,
                q_start: cur - 1,
                kv: &counting,
            })
            .unwrap()
            .blocks;
        let est_bytes = counting.bytes();
        drop(counting);
        let mut resident = vec![0f32; q.len()];
        attention::decode(
            &shape,
            &q,
            std::slice::from_ref(&view),
            Some(&sel),
            &mut resident,
        )
        .unwrap();
        drop(view);
        let pinned = vec![vec![0..cfg.sink, cur.saturating_sub(cfg.window)..cur]];
        let mut off = vec![f32::NAN; q.len()];
        let st = decode_offloaded(
            &shape,
            &q,
            &ns.pool,
            &[0],
            &sel,
            &pinned,
            &mut cache,
            None,
            &mut off,
        )
        .unwrap();
        assert_eq!(
            bits(&off),
            bits(&resident),
            "step {step}: offloaded output differs"
        );
        assert!(st.blocks_needed <= slots);
        if step > 0 {
            hits += st.cache.hits;
            lookups += st.cache.hits + st.cache.misses;
        }
        if step == 0 {
            // The first step's mask estimation reads keys in place: count them.
            assert!(
                est_bytes > 0 && est_bytes < (len * 2 * 64 * 2) as u64 / 4,
                "{est_bytes}"
            );
        }
        // Append a token; keep the cached copy of the written page fresh.
        ns.append_random(&mut rng).unwrap();
        let last = *ns.pool.page_table(0).unwrap().last().unwrap();
        cache.refresh(&ns.pool, last).unwrap();
    }
    let ratio = hits as f64 / lookups as f64;
    assert!(
        ratio > 0.8,
        "hit ratio {ratio} between refreshes should be high"
    );
}

/// A batch resolves all its sequences' blocks in one step: a later
/// sequence's misses never evict blocks an earlier one still reads. With
/// room for both it equals resident decode; without, it is a clear error.
#[test]
fn batch_blocks_are_not_evicted_by_later_sequences() {
    let layout = KvLayout {
        n_kv_heads: 1,
        head_dim: 16,
        page_size: 8,
    };
    let shape = AttnShape::new(2, 1, 16).unwrap();
    let mut host = KvPool::<bf16>::new(layout, None).unwrap();
    let mut rng = Rng::new(21);
    for (s, n) in [(0u64, 52usize), (1, 49)] {
        host.add_sequence(s).unwrap();
        let k: Vec<bf16> = (0..n * 16).map(|_| bf16::from_f32(rng.normal())).collect();
        let v: Vec<bf16> = (0..n * 16).map(|_| bf16::from_f32(rng.normal())).collect();
        host.append(s, &k, &v).unwrap();
    }
    let sels: Vec<infinitehip::policy::Selection> = [52usize, 49]
        .iter()
        .map(|&n| infinitehip::policy::Selection {
            heads: vec![vec![0..n]],
        })
        .collect();
    let q = rng.normal_vec(2 * shape.q_elems(), 1.0);
    let mut resident = vec![0f32; q.len()];
    let views: Vec<_> = (0..2).map(|s| host.view(s).unwrap()).collect();
    attention::decode(&shape, &q, &views, Some(&sels), &mut resident).unwrap();
    drop(views);
    let pinned = vec![vec![], vec![]];
    // 7 + 7 blocks: fits 14 slots exactly, across several steps.
    let mut cache = PageCache::<bf16>::new(layout, 14).unwrap();
    for step in 0..3 {
        let mut out = vec![f32::NAN; q.len()];
        decode_offloaded(
            &shape,
            &q,
            &host,
            &[0, 1],
            &sels,
            &pinned,
            &mut cache,
            None,
            &mut out,
        )
        .unwrap();
        assert_eq!(bits_f32(&out), bits_f32(&resident), "step {step}");
    }
    // 10 slots cannot hold both sequences' 14 blocks at once.
    let mut small = PageCache::<bf16>::new(layout, 10).unwrap();
    let mut out = vec![f32::NAN; q.len()];
    let e = decode_offloaded(
        &shape,
        &q,
        &host,
        &[0, 1],
        &sels,
        &pinned,
        &mut small,
        None,
        &mut out,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("raise the device cache size"), "{e}");
}

fn bits_f32(x: &[f32]) -> Vec<u32> {
    x.iter().map(|f| f.to_bits()).collect()
}
