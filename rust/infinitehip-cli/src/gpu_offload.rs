//! `gpu-test-offload` and `bench-gpu-offload`: the KV in pinned host memory,
//! a device slot arena as page cache (backend::cuda::offload), decode through
//! the slot table, against the same decode with all KV on the device.

use std::ops::Range;
use std::time::Instant;

use infinitehip::attention::AttnShape;
use infinitehip::backend::cuda::dispatch::{self, DecodeWorkspace, HipGpuDecoder};
use infinitehip::backend::cuda::offload::{HostKv, OffloadKv};
use infinitehip::backend::cuda::{DevBuf, GpuContext};
use infinitehip::config::HipConfig;
use infinitehip::kv::{head_blocks_touched, KvLayout};
use infinitehip::policy::Selection;
use infinitehip::rng::Rng;
use infinitehip::workload::needle_seq;
use infinitehip::DType;
use serde_json::json;

use crate::args::Args;

type R<T> = Result<T, String>;
fn e<E: std::fmt::Display>(x: E) -> String {
    x.to_string()
}

fn random_sel(rng: &mut Rng, hkv: usize, len: usize, max_ranges: usize) -> Selection {
    // Short ranges (up to 48 tokens) anywhere in the sequence.
    let heads = (0..hkv)
        .map(|_| {
            (0..1 + rng.below(max_ranges))
                .map(|_| {
                    let s = rng.below(len);
                    s..(s + 1 + rng.below(48)).min(len)
                })
                .collect()
        })
        .collect();
    Selection::from_ranges(heads)
}

/// Pages round-trip bit-exactly host -> device slots under random access and
/// eviction storms; the device slot table agrees with the policy.
fn roundtrip(gpu: &GpuContext, seed: u64) -> R<(bool, String)> {
    let lay = KvLayout {
        n_kv_heads: 4,
        head_dim: 64,
        page_size: 16,
    };
    let lens = [3000usize, 1777];
    let mut host = HostKv::alloc(lay, DType::Bf16, &lens).map_err(e)?;
    let mut rng = Rng::new(seed);
    for x in host.k.as_u16_mut() {
        *x = rng.next_u64() as u16;
    }
    for x in host.v.as_u16_mut() {
        *x = rng.next_u64() as u16;
    }
    let hk = host.k.as_u16().to_vec();
    let hv = host.v.as_u16().to_vec();
    let tables = host.tables.clone();
    let n_slots = 97;
    let mut off = OffloadKv::new(gpu, host, n_slots).map_err(e)?;
    let be = lay.page_size * lay.head_dim;
    let (mut checked, mut bad, mut rounds, mut evictions, mut misses) = (0usize, 0usize, 0, 0, 0);
    let mut attempts = 0;
    while rounds < 300 && attempts < 20_000 {
        attempts += 1;
        let storm = rounds % 3 != 0;
        let sels: Vec<Selection> = lens
            .iter()
            .map(|&l| random_sel(&mut rng, 4, l, if storm { 3 } else { 1 }))
            .collect();
        let pins: Vec<Vec<Range<usize>>> = lens
            .iter()
            .map(|&l| {
                if rounds % 5 == 0 {
                    vec![0..20, l - 30..l]
                } else {
                    vec![]
                }
            })
            .collect();
        let touched: usize = sels
            .iter()
            .map(|s| head_blocks_touched(s, lay.page_size).len())
            .sum::<usize>()
            + if rounds % 5 == 0 { 32 } else { 0 };
        if touched > n_slots {
            continue;
        }
        rounds += 1;
        let st = off.prepare(gpu, &sels, &pins).map_err(e)?;
        evictions += st.cache.evictions;
        misses += st.cache.misses;
        gpu.synchronize().map_err(e)?;
        let (sk, sv) = off.read_slots().map_err(e)?;
        let table = off.read_table().map_err(e)?;
        for (b, sel) in sels.iter().enumerate() {
            // The step's selection and its pinned ranges.
            let all = Selection::from_ranges(
                sel.heads
                    .iter()
                    .map(|r| r.iter().chain(&pins[b]).cloned().collect())
                    .collect(),
            );
            for (p, h) in head_blocks_touched(&all, lay.page_size) {
                let slot = table[b * off.stride + p * 4 + h] as usize;
                let hb = tables[b][p] as usize * 4 + h;
                let want = off.cache.slot_of(infinitehip::kv::HeadBlock {
                    page: tables[b][p],
                    head: h as u32,
                });
                checked += 1;
                if want != Some(slot as u32)
                    || sk[slot * be..(slot + 1) * be] != hk[hb * be..(hb + 1) * be]
                    || sv[slot * be..(slot + 1) * be] != hv[hb * be..(hb + 1) * be]
                {
                    bad += 1;
                }
            }
        }
    }
    let ok = rounds == 300 && bad == 0 && checked > 1000 && evictions > 1000;
    Ok((
        ok,
        format!("{rounds} rounds, {checked} blocks checked, {bad} differ; {misses} misses, {evictions} evictions ({n_slots} slots)"),
    ))
}

/// Decode with a device cache of `frac` of the head blocks equals decode
/// with all KV on the device, over many hip steps.
fn decode_equal(
    gpu: &GpuContext,
    lens: &[usize],
    frac: f64,
    steps: usize,
    seed: u64,
) -> R<(bool, String)> {
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let cfg = crate::gpu::small_hip();
    let ws_: Vec<_> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            needle_seq::<half::bf16>(shape, l, 64, cfg.sink, cfg.window, 64, seed + i as u64)
        })
        .collect::<Result<_, _>>()
        .map_err(e)?;
    let seqs: Vec<_> = ws_.iter().map(|w| (&w.pool, w.seq)).collect();
    let host = HostKv::from_pools(&seqs).map_err(e)?;
    let kv = host.to_device().map_err(e)?;
    let total_blocks = host.n_pages * 8;
    let n_slots = ((total_blocks as f64 * frac).ceil() as usize).max(1);
    let mut off = OffloadKv::new(gpu, host, n_slots).map_err(e)?;
    let mut dec = HipGpuDecoder::new(cfg.clone(), &shape, lens.len()).map_err(e)?;
    let mut rng = Rng::new(seed ^ 0x5107);
    let qe = shape.q_elems();
    let qd = DevBuf::alloc(qe * lens.len() * 4).map_err(e)?;
    let (o1, o2) = (
        DevBuf::alloc(qe * lens.len() * 4).map_err(e)?,
        DevBuf::alloc(qe * lens.len() * 4).map_err(e)?,
    );
    let (mut ws1, mut ws2) = (DecodeWorkspace::new(), DecodeWorkspace::new());
    let pins: Vec<Vec<Range<usize>>> = lens
        .iter()
        .map(|&l| vec![0..cfg.sink.min(l), l.saturating_sub(cfg.window)..l])
        .collect();
    let (mut max_abs, mut bitdiff, mut hits, mut misses, mut nan) =
        (0f32, 0usize, 0u64, 0u64, false);
    for _ in 0..steps {
        let q: Vec<f32> = ws_.iter().flat_map(|w| w.query(&mut rng)).collect();
        qd.write(&q).map_err(e)?;
        dec.select(gpu, &kv, qd.ptr, true).map_err(e)?;
        let mt = dec.max_tokens;
        dispatch::decode(
            gpu, &mut ws1, &shape, &kv, qd.ptr, &dec.sel, mt, None, o1.ptr,
        )
        .map_err(e)?;
        let sels = dec.sel.to_host(8).map_err(e)?;
        o2.fill_bytes(0xff).map_err(e)?;
        let st = off.prepare(gpu, &sels, &pins).map_err(e)?;
        hits += st.cache.hits;
        misses += st.cache.misses;
        off.decode(gpu, &mut ws2, &shape, qd.ptr, &dec.sel, mt, None, o2.ptr)
            .map_err(e)?;
        gpu.synchronize().map_err(e)?;
        let a: Vec<f32> = o1.read(qe * lens.len()).map_err(e)?;
        let b: Vec<f32> = o2.read(qe * lens.len()).map_err(e)?;
        for (x, y) in a.iter().zip(&b) {
            nan |= x.is_nan() || y.is_nan();
            bitdiff += (x.to_bits() != y.to_bits()) as usize;
            max_abs = max_abs.max((x - y).abs());
        }
    }
    let ok = !nan && max_abs <= 1e-6 && misses > 0;
    Ok((
        ok,
        format!(
            "{steps} hip steps, lens {lens:?}, cache {n_slots}/{total_blocks} head blocks ({:.0}%): hit {:.1}% ({misses} misses), outputs differing in bits {bitdiff}, max |diff| {max_abs:.1e}, NaN {nan}",
            frac * 100.0,
            100.0 * hits as f64 / (hits + misses).max(1) as f64
        ),
    ))
}

pub fn test(argv: &[String]) -> R<()> {
    let a = Args::parse(argv, &["seed"], &[])?;
    let seed: u64 = a.get("seed", 0x0ff1)?;
    let gpu = GpuContext::new(0).map_err(e)?;
    println!("device {} ({} SMs, {})", gpu.name, gpu.sm_count, gpu.arch);
    let mut failed = 0;
    let checks: Vec<(String, R<(bool, String)>)> = vec![
        (
            "host->slot round trip, random access + eviction storms".into(),
            roundtrip(&gpu, seed),
        ),
        (
            "decode 5% cache == all on device (batch 2, small hip)".into(),
            decode_equal(&gpu, &[150_000, 61_000], 0.05, 48, seed),
        ),
        (
            "decode 30% cache == all on device (batch 1, default hip)".into(),
            {
                let _ = HipConfig::default();
                decode_equal(&gpu, &[40_000], 0.3, 24, seed + 3)
            },
        ),
    ];
    for (name, r) in checks {
        let (ok, detail) = r.unwrap_or_else(|x| (false, format!("error: {x}")));
        println!(
            "{} {:<60} {}",
            if ok { "PASS" } else { "FAIL" },
            name,
            detail
        );
        failed += (!ok) as usize;
    }
    println!("gpu-test-offload: {failed} failed");
    if failed > 0 {
        return Err(format!("{failed} offload checks failed"));
    }
    Ok(())
}

/// Needle-like synthetic KV written straight into the pinned host tier
/// (uniform noise, one 64-token needle per KV head along a fixed direction),
/// in parallel. Returns the needle directions `[hkv][d]`.
fn fill_synthetic(host: &mut HostKv, seed: u64) -> Vec<f32> {
    let lay = host.layout;
    let (hkv, d, ps) = (lay.n_kv_heads, lay.head_dim, lay.page_size);
    let len = host.lens[0];
    let mut rng = Rng::new(seed);
    let mut dirs = vec![0f32; hkv * d];
    for h in 0..hkv {
        let v = &mut dirs[h * d..(h + 1) * d];
        rng.fill_normal(v, 1.0);
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n);
    }
    let needles: Vec<usize> = (0..hkv)
        .map(|_| (1024 + rng.below(len - 4096)) / 64 * 64)
        .collect();
    let pe = lay.page_elems();
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    for (buf, is_k) in [(host.k.as_u16_mut(), true), (host.v.as_u16_mut(), false)] {
        let chunk = (buf.len() / pe).div_ceil(threads) * pe;
        std::thread::scope(|s| {
            for (ci, c) in buf.chunks_mut(chunk).enumerate() {
                let (dirs, needles) = (&dirs, &needles);
                s.spawn(move || {
                    let mut x =
                        seed ^ (ci as u64 + 1).wrapping_mul(0x9e3779b97f4a7c15) ^ is_k as u64;
                    let page0 = ci * chunk / pe;
                    for (i, o) in c.iter_mut().enumerate() {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let mut f = ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                        if is_k {
                            let page = page0 + i / pe;
                            let r = i % pe;
                            let (h, t, dd) = (r / (ps * d), page * ps + (r / d) % ps, r % d);
                            if t >= needles[h] && t < needles[h] + 64 {
                                f = f * 0.5 + dirs[h * d + dd] * 14.0;
                            }
                        }
                        *o = half::bf16::from_f32(f).to_bits();
                    }
                });
            }
        });
    }
    dirs
}

fn query(rng: &mut Rng, shape: &AttnShape, dirs: &[f32]) -> Vec<f32> {
    let (g, d) = (shape.group(), shape.head_dim);
    let s = (d as f32).sqrt();
    (0..shape.q_elems())
        .map(|i| {
            let (hq, dd) = (i / d, i % d);
            (rng.uniform() * 2.0 - 1.0) * 0.3 + dirs[(hq / g) * d + dd] * s
        })
        .collect()
}

pub fn bench(argv: &[String]) -> R<()> {
    let a = Args::parse(
        argv,
        &["tokens", "cache", "steps", "warmup", "json", "seed"],
        &[],
    )?;
    let tokens = a.list("tokens", &[1 << 20, 4 << 20])?;
    let fractions: Vec<f64> = a
        .str("cache")
        .unwrap_or("0.05,0.01")
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|f| *f > 0.0 && *f <= 1.0)
                .ok_or_else(|| format!("--cache: `{s}` is not a fraction in (0, 1]"))
        })
        .collect::<Result<_, _>>()?;
    let steps: usize = a.get("steps", 48)?;
    let warm: usize = a.get("warmup", 16)?;
    let seed: u64 = a.get("seed", 0)?;
    let gpu = GpuContext::new(0).map_err(e)?;
    let machine = format!("{} ({} SMs)", gpu.name, gpu.sm_count);
    println!("bench-gpu-offload on {machine}");
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let cfg = HipConfig::default();
    let lay = KvLayout {
        n_kv_heads: 8,
        head_dim: 128,
        page_size: 64,
    };
    let qe = shape.q_elems();
    let mut rows = Vec::new();
    for &t in &tokens {
        let t0 = Instant::now();
        let mut host = HostKv::alloc(lay, DType::Bf16, &[t]).map_err(e)?;
        let dirs = fill_synthetic(&mut host, seed + t as u64);
        let kv = host.to_device().map_err(e)?;
        let total_blocks = host.n_pages * 8;
        let kv_mib = host.bytes() as f64 / (1 << 20) as f64;
        eprintln!(
            "{t} tokens: {kv_mib:.0} MiB host tier built and uploaded in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        let pins = vec![vec![0..cfg.sink, t - cfg.window..t]];
        let qd = DevBuf::alloc(qe * 4).map_err(e)?;
        let (o1, o2) = (
            DevBuf::alloc(qe * 4).map_err(e)?,
            DevBuf::alloc(qe * 4).map_err(e)?,
        );
        for &f in &fractions {
            let n_slots = ((total_blocks as f64 * f).ceil() as usize).max(1);
            let mut off = OffloadKv::new(&gpu, host, n_slots).map_err(e)?;
            let mut dec = HipGpuDecoder::new(cfg.clone(), &shape, 1).map_err(e)?;
            let (mut ws1, mut ws2) = (DecodeWorkspace::new(), DecodeWorkspace::new());
            let mut rng = Rng::new(seed ^ 0xbe);
            let (mut est, mut res, mut offt, mut prep) = (vec![], vec![], vec![], vec![]);
            let (mut hits, mut misses, mut bytes, mut needed, mut max_abs) =
                (0u64, 0u64, 0u64, 0usize, 0f32);
            for s in 0..warm + steps {
                qd.write(&query(&mut rng, &shape, &dirs)).map_err(e)?;
                gpu.synchronize().map_err(e)?;
                let ta = Instant::now();
                dec.select(&gpu, &kv, qd.ptr, true).map_err(e)?;
                gpu.synchronize().map_err(e)?;
                let tb = Instant::now();
                let mt = dec.max_tokens;
                dispatch::decode(
                    &gpu, &mut ws1, &shape, &kv, qd.ptr, &dec.sel, mt, None, o1.ptr,
                )
                .map_err(e)?;
                gpu.synchronize().map_err(e)?;
                let tc = Instant::now();
                let sels = dec.sel.to_host(8).map_err(e)?;
                let st = off.prepare(&gpu, &sels, &pins).map_err(e)?;
                let tp = Instant::now();
                off.decode(&gpu, &mut ws2, &shape, qd.ptr, &dec.sel, mt, None, o2.ptr)
                    .map_err(e)?;
                gpu.synchronize().map_err(e)?;
                let td = Instant::now();
                let x: Vec<f32> = o1.read(qe).map_err(e)?;
                let y: Vec<f32> = o2.read(qe).map_err(e)?;
                for (p, q) in x.iter().zip(&y) {
                    max_abs = max_abs.max(if p.is_nan() || q.is_nan() {
                        f32::INFINITY
                    } else {
                        (p - q).abs()
                    });
                }
                if s >= warm {
                    est.push((tb - ta).as_secs_f64() * 1e3);
                    res.push((tc - tb).as_secs_f64() * 1e3);
                    offt.push((td - tc).as_secs_f64() * 1e3);
                    prep.push((tp - tc).as_secs_f64() * 1e3);
                    hits += st.cache.hits;
                    misses += st.cache.misses;
                    bytes += st.cache.bytes_copied;
                    needed += st.blocks_needed;
                }
            }
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
            let n = steps as f64;
            let row = json!({
                "tokens": t, "cache_fraction": f, "cache_blocks": n_slots, "kv_blocks": total_blocks,
                "host_kv_mib": kv_mib, "device_cache_mib": off.device_bytes() as f64 / (1 << 20) as f64,
                "estimation_ms": mean(&est), "resident_decode_ms": mean(&res),
                "offload_decode_ms": mean(&offt), "offload_host_prepare_ms": mean(&prep),
                "hit_ratio": hits as f64 / (hits + misses).max(1) as f64,
                "blocks_needed_per_step": needed as f64 / n,
                "copied_mib_per_step": bytes as f64 / n / (1 << 20) as f64,
                "max_abs_diff": max_abs,
                "x32_resident_ms": 32.0 * mean(&res), "x32_offload_ms": 32.0 * mean(&offt),
                "x32_host_gib": 32.0 * kv_mib / 1024.0, "x32_device_cache_gib": 32.0 * off.device_bytes() as f64 / (1u64 << 30) as f64,
                "x32_resident_kv_gib": 32.0 * kv_mib / 1024.0,
            });
            eprintln!("{row}");
            rows.push(row);
            host = off.into_host();
        }
    }
    let g = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    println!("\n| tokens | cache | device cache MiB | host KV MiB | resident decode ms | offload decode ms (of it host prepare) | hit % | head blocks/step | copied MiB/step | estimation ms (device keys) | max abs diff | x32 resident ms | x32 offload ms | x32 host GiB | x32 cache GiB |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.1}% | {:.0} | {:.0} | {:.3} | {:.3} ({:.3}) | {:.1} | {:.0} | {:.2} | {:.3} | {:.1e} | {:.1} | {:.1} | {:.0} | {:.2} |",
            r["tokens"], 100.0 * g(r, "cache_fraction"), g(r, "device_cache_mib"), g(r, "host_kv_mib"),
            g(r, "resident_decode_ms"), g(r, "offload_decode_ms"), g(r, "offload_host_prepare_ms"),
            100.0 * g(r, "hit_ratio"), g(r, "blocks_needed_per_step"), g(r, "copied_mib_per_step"),
            g(r, "estimation_ms"), g(r, "max_abs_diff"), g(r, "x32_resident_ms"), g(r, "x32_offload_ms"),
            g(r, "x32_host_gib"), g(r, "x32_device_cache_gib")
        );
    }
    if let Some(p) = a.str("json") {
        let doc = json!({"machine": machine, "shape": {"q_heads": 32, "kv_heads": 8, "head_dim": 128, "page_size": 64, "dtype": "bf16"}, "policy": "hip default", "steps": steps, "warmup_steps": warm, "results": rows});
        std::fs::write(p, serde_json::to_string_pretty(&doc).unwrap())
            .map_err(|x| format!("{p}: {x}"))?;
    }
    Ok(())
}
