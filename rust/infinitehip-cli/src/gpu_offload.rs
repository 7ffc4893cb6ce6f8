//! `gpu-test-offload` and `bench-gpu-offload`: the KV in pinned host memory,
//! a device slot arena as page cache (backend::cuda::offload), decode through
//! the slot table, against the same decode with all KV on the device.

use std::ops::Range;
use std::time::Instant;

use infinitehip::attention::AttnShape;
use infinitehip::backend::cuda::cudarc::driver::sys::CUevent_flags;
use infinitehip::backend::cuda::cudarc::driver::{CudaEvent, LaunchConfig, PushKernelArg};
use infinitehip::backend::cuda::dispatch::{self, DecodeWorkspace, HipGpuDecoder};
use infinitehip::backend::cuda::est_cache::{Admission, HostEstimation};
use infinitehip::backend::cuda::offload::{HostKv, OffloadKv, PagePolicy};
use infinitehip::backend::cuda::{DevBuf, GpuContext};
use infinitehip::config::HipConfig;
use infinitehip::kv::{head_blocks_touched, KvLayout, PageClock};
use infinitehip::policy::Selection;
use infinitehip::rng::Rng;
use infinitehip::workload::needle_seq;
use infinitehip::DType;
use serde_json::json;

use crate::gpu_args::{BenchGpuOffloadArgs, GpuTestOffloadArgs};

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
/// With `PagePolicy::Device`, the device's block <-> slot maps also equal
/// the CPU twin `kv::PageClock`'s after every round.
fn roundtrip(gpu: &GpuContext, seed: u64, policy: PagePolicy) -> R<(bool, String)> {
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
    let mut off = OffloadKv::with_policy(gpu, host, n_slots, policy).map_err(e)?;
    let mut twin = PageClock::new(off.host.n_pages * 4, n_slots);
    let mut twin_diff = 0usize;
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
        let dev_maps = if policy == PagePolicy::Device {
            // The twin sees the step's blocks in any order (it sorts misses).
            let mut blocks = Vec::new();
            for (b, sel) in sels.iter().enumerate() {
                let all = Selection::from_ranges(
                    sel.heads
                        .iter()
                        .map(|r| r.iter().chain(&pins[b]).cloned().collect())
                        .collect(),
                );
                for (p, h) in head_blocks_touched(&all, lay.page_size) {
                    blocks.push(tables[b][p] * 4 + h as u32);
                }
            }
            blocks.reverse();
            if twin.step(&blocks).is_err() {
                return Err(format!("round {rounds}: the twin could not hold the step"));
            }
            let (bs, sb) = off.read_block_maps().map_err(e)?;
            twin_diff += (bs != twin.block_slot) as usize + (sb != twin.slot_block) as usize;
            Some(bs)
        } else {
            None
        };
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
                let want = match &dev_maps {
                    Some(bs) => Some(bs[hb] as u32).filter(|&s| s != u32::MAX),
                    None => off.cache.slot_of(infinitehip::kv::HeadBlock {
                        page: tables[b][p],
                        head: h as u32,
                    }),
                };
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
    let rest = off.take_stats().map_err(e)?;
    if policy == PagePolicy::Device {
        evictions += rest.evictions;
        misses += rest.misses;
        let t = twin.stats;
        twin_diff += (t.misses != misses || t.evictions != evictions) as usize;
    }
    let ok = rounds == 300 && bad == 0 && checked > 1000 && evictions > 1000 && twin_diff == 0;
    Ok((
        ok,
        format!("{policy:?} policy: {rounds} rounds, {checked} blocks checked, {bad} differ; {misses} misses, {evictions} evictions ({n_slots} slots); maps differing from the CPU twin (kv::PageClock): {}",
            if policy == PagePolicy::Device { twin_diff.to_string() } else { "n/a".into() }),
    ))
}

/// Options of one `decode_equal` run.
struct EqRun<'a> {
    lens: &'a [usize],
    /// Page cache size as a fraction of all head blocks.
    frac: f64,
    steps: usize,
    /// Estimation over the host tier with a row cache of this fraction of
    /// all key rows (None: the offloaded decode uses the all-on-device
    /// estimation's selection).
    est_frac: Option<f64>,
    /// Append one token per sequence after every step.
    appends: bool,
    small: bool,
    /// Stage missed rows in device memory (`HostEstimation::new`).
    stage: bool,
    admission: Admission,
    pages: PagePolicy,
    /// Override `max_admit_per_step` (Some(0): nothing is ever admitted).
    admit_limit: Option<usize>,
    /// Missed rows staged by a whole warp together (default) or by each
    /// thread alone (`HostEstimation::set_fetch_warp`).
    fetch_warp: bool,
    /// Steps that refresh no stage reuse the last page walk when exact
    /// (`OffloadKv::prepare_device_step`); the check then also requires
    /// that some step did.
    reuse: bool,
    /// The estimation's admission launched after the step's attention,
    /// steps that score no key not waiting for it.
    late: bool,
    /// Estimation kernels preloading each probed row (`set_row_preload`).
    preload: bool,
    /// Mutation check: reuse even across a new page
    /// (`unsound_reuse_for_tests`); passes only if the outputs differ.
    unsound: bool,
    /// Page prefetch: every walk also covers stage 0's kept chunks
    /// (`OffloadKv::set_superset`), a stage-0 refresh walks them on the copy
    /// stream while the later stages score (`prefetch_superset`), and steps
    /// that refresh only later stages reuse the walk. Needs `est_frac`.
    prefetch: bool,
    /// Mutation check: the prefetch walks the PREVIOUS refresh's stage-0
    /// chunks (stale) and the step uses it; passes only if outputs differ.
    stale_prefetch: bool,
    /// Row cache admitting up to the whole cache a step
    /// (`HostEstimation::with_admit_all`).
    admit_all: bool,
    /// The search's last-level right probe scored from the previous level
    /// (`HostEstimation::set_reuse_right`).
    reuse_right: bool,
    /// Mutation check: the previous level's score reused at every level
    /// (`set_reuse_unsound_for_tests`); passes only if selections differ.
    reuse_unsound: bool,
    /// Pinned region of stage 0's search levels 1..=N
    /// (`HostEstimation::set_pinned`, on top of the row cache's rows).
    pin_levels: usize,
    /// Mutation check: pinned rows copied from the next page offset
    /// (`pin_unsound_for_tests`); passes only if selections differ.
    pin_unsound: bool,
    seed: u64,
}

impl Default for EqRun<'_> {
    fn default() -> Self {
        EqRun {
            lens: &[],
            frac: 0.05,
            steps: 48,
            est_frac: None,
            appends: false,
            small: true,
            stage: true,
            admission: Admission::FullDevice,
            pages: PagePolicy::Device,
            admit_limit: None,
            fetch_warp: true,
            reuse: true,
            late: true,
            preload: true,
            unsound: false,
            prefetch: true,
            stale_prefetch: false,
            admit_all: false,
            reuse_right: false,
            reuse_unsound: false,
            pin_levels: 0,
            pin_unsound: false,
            seed: 0,
        }
    }
}

/// Decode with a device cache of `frac` of the head blocks (and, with
/// `est_frac`, mask estimation reading keys only from the host tier) equals
/// decode with all KV on the device, over many hip steps: the same
/// selections, outputs equal. With `appends`, the offloaded tier starts with
/// its future tokens poisoned (NaN) and receives each token by `append`.
fn decode_equal(gpu: &GpuContext, r: &EqRun) -> R<(bool, String)> {
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let cfg = if r.small {
        crate::gpu::small_hip()
    } else {
        HipConfig::default()
    };
    let extra = if r.appends { r.steps } else { 0 };
    let ws_: Vec<_> = r
        .lens
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            needle_seq::<half::bf16>(
                shape,
                l + extra,
                64,
                cfg.sink,
                cfg.window,
                64,
                r.seed + i as u64,
            )
        })
        .collect::<Result<_, _>>()
        .map_err(e)?;
    let seqs: Vec<_> = ws_.iter().map(|w| (&w.pool, w.seq)).collect();
    let full = HostKv::from_pools(&seqs).map_err(e)?;
    let mut kv = full.to_device().map_err(e)?;
    let mut host = HostKv::from_pools(&seqs).map_err(e)?;
    for (b, &l) in r.lens.iter().enumerate() {
        kv.lens[b] = l;
        host.truncate_poisoned(b, l).map_err(e)?;
    }
    let total_blocks = host.n_pages * 8;
    let total_rows = total_blocks * host.layout.page_size;
    let n_slots = ((total_blocks as f64 * r.frac).ceil() as usize).max(1);
    let mut off = OffloadKv::with_policy(gpu, host, n_slots, r.pages).map_err(e)?;
    off.unsound_reuse_for_tests = r.unsound;
    let device = r.pages == PagePolicy::Device;
    let (reuse, late) = (r.reuse && device, r.late && device);
    let mut est = match r.est_frac {
        // Staged device admission is what `KvConfig` describes: built from
        // `kv.estimation_cache_rows` (the config path the engine would use).
        Some(f) if r.stage && r.admission == Admission::Device => {
            let mut kc = infinitehip::config::KvConfig {
                device_cache_pages: Some(n_slots),
                estimation_cache_rows: Some(((total_rows as f64 * f).ceil() as usize).max(16)),
                ..Default::default()
            };
            kc.page_size = off.host.layout.page_size;
            Some(HostEstimation::from_config(gpu, &off.host, &kc).map_err(e)?)
        }
        Some(f) => {
            let rows = ((total_rows as f64 * f).ceil() as usize).max(16);
            Some(
                if r.admit_all {
                    HostEstimation::with_admit_all(gpu, &off.host, rows, r.stage, r.admission)
                } else {
                    HostEstimation::with_admission(gpu, &off.host, rows, r.stage, r.admission)
                }
                .map_err(e)?,
            )
        }
        None => None,
    };
    if let Some(es) = est.as_mut() {
        es.set_fetch_warp(r.fetch_warp).map_err(e)?;
        es.set_row_preload(r.preload);
        es.set_reuse_right(r.reuse_right).map_err(e)?;
        es.set_reuse_unsound_for_tests(r.reuse_unsound).map_err(e)?;
        if r.pin_levels > 0 {
            let mask = infinitehip::est_sim::pin_page_mask(
                r.pin_levels,
                cfg.stages[0].chunk_size,
                cfg.sink,
                off.host.layout.page_size,
            )
            .ok_or("pinned levels need stage-0 chunks of one page")?;
            es.pin_unsound_for_tests = r.pin_unsound;
            es.set_pinned(&off.host, mask).map_err(e)?;
        }
    }
    if let (Some(x), Some(l)) = (est.as_mut(), r.admit_limit) {
        x.max_admit_per_step = l;
    }
    let nb = r.lens.len();
    let mut dec = HipGpuDecoder::new(cfg.clone(), &shape, nb).map_err(e)?;
    let mut dec2 = HipGpuDecoder::new(cfg.clone(), &shape, nb).map_err(e)?;
    let prefetch = (r.prefetch || r.stale_prefetch) && device;
    if prefetch {
        if est.is_none() {
            return Err("page prefetch checks need the host-tier estimation".into());
        }
        dec2.set_stage0_event(Some(gpu.ctx.new_event(None).map_err(e)?));
        let (rg, cn, cap) = dec2.stage0_chunks();
        off.set_superset(rg, cn, cap, cfg.stages[0].chunk_size)
            .map_err(e)?;
    }
    let pre_ev = gpu.ctx.new_event(None).map_err(e)?;
    let mut rng = Rng::new(r.seed ^ 0x5107);
    let qe = shape.q_elems();
    let qd = DevBuf::alloc(qe * nb * 4).map_err(e)?;
    let (o1, o2) = (
        DevBuf::alloc(qe * nb * 4).map_err(e)?,
        DevBuf::alloc(qe * nb * 4).map_err(e)?,
    );
    let (mut ws1, mut ws2) = (DecodeWorkspace::new(), DecodeWorkspace::new());
    let (mut max_abs, mut bitdiff, mut hits, mut misses, mut nan) =
        (0f32, 0usize, 0u64, 0u64, false);
    let (mut sel_diff, mut est_hits, mut est_misses, mut est_bytes, mut admitted) =
        (0usize, 0u64, 0u64, 0u64, 0u64);
    let (mut unlogged, mut rebuilds, mut verified, mut verify_err) =
        (0u64, 0u32, 0usize, None::<String>);
    let d = shape.head_dim;
    for step in 0..r.steps {
        let pins: Vec<Vec<Range<usize>>> = kv
            .lens
            .iter()
            .map(|&l| vec![0..cfg.sink.min(l), l.saturating_sub(cfg.window)..l])
            .collect();
        let q: Vec<f32> = ws_.iter().flat_map(|w| w.query(&mut rng)).collect();
        qd.write(&q).map_err(e)?;
        let from1 = dec.select(gpu, &kv, qd.ptr, true).map_err(e)?;
        let mt = dec.max_tokens;
        dispatch::decode(
            gpu,
            &mut ws1,
            &shape,
            &kv,
            qd.ptr,
            dec.selection(gpu).map_err(e)?,
            mt,
            None,
            o1.ptr,
        )
        .map_err(e)?;
        let sels = dec.selection_host(gpu).map_err(e)?;
        o2.fill_bytes(0xff).map_err(e)?;
        let mut add_est = |st: infinitehip::backend::cuda::est_cache::EstStep| {
            est_hits += st.cache.hits;
            est_misses += st.cache.misses;
            est_bytes += st.host_bytes_read;
            admitted += st.rows_admitted;
            unlogged += st.misses_unlogged;
            rebuilds += st.prof.rebuilds;
        };
        let (dsel, mt2, psels, from) = match est.as_mut() {
            Some(est) => {
                // Mutation: prefetch before stage 0 refreshes (its chunks
                // are the previous refresh's), stage 0 waiting for it.
                let stale = r.stale_prefetch && step > 0 && dec2.refresh_from() == 0;
                if stale {
                    pre_ev.record(&gpu.stream).map_err(e)?;
                    off.prefetch_superset(gpu, &pins, &pre_ev).map_err(e)?;
                    off.wait_prefetch(gpu).map_err(e)?;
                }
                let from = est
                    .select(gpu, &mut dec2, &off.host, qd.ptr, true)
                    .map_err(e)?;
                if prefetch && from == 0 && !stale {
                    off.prefetch_superset(gpu, &pins, dec2.stage0_event().unwrap())
                        .map_err(e)?;
                }
                if !late {
                    add_est(est.finish(gpu).map_err(e)?);
                }
                let mt2 = dec2.max_tokens;
                let s2 = dec2.selection_host(gpu).map_err(e)?;
                sel_diff += s2.iter().zip(&sels).filter(|(a, b)| a != b).count();
                sel_diff += (mt2 != mt) as usize;
                (dec2.selection(gpu).map_err(e)?, mt2, s2, from)
            }
            None => (dec.selection(gpu).map_err(e)?, mt, sels, from1),
        };
        // The offloaded side resolves the pages of its own selection (the
        // device policy straight from the device selection).
        let st = if device {
            let tail_only = reuse && (from >= cfg.stages.len() || (prefetch && from >= 1));
            off.prepare_device_step(gpu, dsel, &pins, tail_only)
                .map_err(e)?
        } else {
            off.prepare(gpu, &psels, &pins).map_err(e)?
        };
        hits += st.cache.hits;
        misses += st.cache.misses;
        off.decode(gpu, &mut ws2, &shape, qd.ptr, dsel, mt2, None, o2.ptr)
            .map_err(e)?;
        if late {
            if let Some(est) = est.as_mut() {
                add_est(est.finish(gpu).map_err(e)?);
            }
        }
        gpu.synchronize().map_err(e)?;
        let a: Vec<f32> = o1.read(qe * nb).map_err(e)?;
        let b: Vec<f32> = o2.read(qe * nb).map_err(e)?;
        for (x, y) in a.iter().zip(&b) {
            nan |= x.is_nan() || y.is_nan();
            bitdiff += (x.to_bits() != y.to_bits()) as usize;
            max_abs = max_abs.max((x - y).abs());
        }
        // The device table and arena against the host tier, now and then.
        if let Some(x) = est.as_ref() {
            if verify_err.is_none() && (step % 8 == 7 || step + 1 == r.steps) {
                match x.verify(&off.host) {
                    Ok(n) => verified += n,
                    Err(err) => verify_err = Some(err.to_string()),
                }
            }
        }
        if r.appends {
            for b in 0..nb {
                let t = kv.lens[b];
                let (mut kr, mut vr) = (Vec::new(), Vec::new());
                for h in 0..8 {
                    let o = full.row(b, t, h) * d;
                    kr.extend_from_slice(&full.k.as_u16()[o..o + d]);
                    vr.extend_from_slice(&full.v.as_u16()[o..o + d]);
                }
                off.append(b, &kr, &vr).map_err(e)?;
                kv.lens[b] = t + 1;
            }
            // Pages the appends completed join the pinned region.
            if let Some(x) = est.as_mut() {
                x.pin_sync(&off.host).map_err(e)?;
            }
        }
    }
    // Counters the device had not reported yet.
    let rest = off.take_stats().map_err(e)?;
    hits += rest.hits;
    misses += rest.misses;
    if let Some(x) = est.as_mut() {
        let st = x.sync_stats().map_err(e)?;
        est_hits += st.cache.hits;
        est_misses += st.cache.misses;
        est_bytes += st.host_bytes_read;
        admitted += st.rows_admitted;
        unlogged += st.misses_unlogged;
        rebuilds += st.prof.rebuilds;
    }
    let est_ok = r.est_frac.is_none()
        || if r.admit_limit == Some(0) {
            // Nothing admitted: every read a miss, still the same selections.
            sel_diff == 0
                && est_hits == 0
                && admitted == 0
                && est_misses > 0
                && verify_err.is_none()
        } else {
            sel_diff == 0 && est_hits > 0 && admitted > 0 && verify_err.is_none() && verified > 0
        };
    let exact = !nan && max_abs <= 1e-6 && bitdiff == 0;
    let reused = off.steps_reused;
    let prefetched = off.steps_prefetched;
    let pinned_pages = est.as_ref().map_or(0, |x| x.pinned_pages());
    let ok = if r.reuse_unsound || r.pin_unsound {
        // Wrong scores must be seen in the selections.
        sel_diff > 0
    } else if r.unsound {
        // The mutation must be seen: some step reused across a new page
        // and read a block the walk never mapped.
        reused > 0 && !exact
    } else if r.stale_prefetch {
        // Some step used a stale prefetch and read blocks it never mapped.
        prefetched > 0 && !exact
    } else {
        exact
            && misses > 0
            && est_ok
            && (!reuse || reused > 0)
            && (!prefetch || prefetched > 0)
            && (r.pin_levels == 0 || pinned_pages > 0)
    };
    let est_txt = match (&est, r.est_frac) {
        (Some(x), Some(f)) => format!(
            "; estimation over host keys ({:?} admission), row cache {} rows ({:.2}% of {total_rows}): selections differing {sel_diff}, row hits {:.1}% ({est_misses} misses, {unlogged} past the miss list), {:.2} MiB read from host, {admitted} rows admitted, {rebuilds} table rebuilds, table check: {} ({verified} mapped rows checked bit for bit), {:.1} MiB device",
            x.admission,
            x.capacity(),
            f * 100.0,
            100.0 * est_hits as f64 / (est_hits + est_misses).max(1) as f64,
            est_bytes as f64 / (1 << 20) as f64,
            verify_err.as_deref().unwrap_or("ok"),
            x.device_bytes() as f64 / (1 << 20) as f64
        ),
        _ => String::new(),
    };
    Ok((
        ok,
        format!(
            "{:?} pages{}{}{}{}{}, {} hip steps{}, lens {:?}, cache {n_slots}/{total_blocks} head blocks ({:.0}%): {reused} steps reused the last walk, {prefetched} stage-0 refreshes served by the copy stream's prefetch, hit {:.1}% ({misses} misses), outputs differing in bits {bitdiff}, max |diff| {max_abs:.1e}, NaN {nan}{est_txt}",
            r.pages,
            if reuse { if r.unsound { " (UNSOUND reuse across new pages: must differ)" } else { " + walk reuse" } } else { "" },
            if late { " + late admission" } else { "" },
            if r.preload && r.est_frac.is_some() { " + row preload" } else { "" },
            if r.stale_prefetch { " + STALE page prefetch (must differ)" } else if prefetch { " + page prefetch" } else { "" },
            format!(
                "{}{}{}",
                if r.admit_all { " + admit-all rows" } else { "" },
                if r.reuse_right { " + right-probe reuse" } else { "" },
                if r.reuse_unsound { " + UNSOUND reuse at every level (selections must differ)" } else { "" }
            ) + &if r.pin_levels > 0 {
                format!(
                    " + pinned search levels 1-{} ({pinned_pages} host pages){}",
                    r.pin_levels,
                    if r.pin_unsound { ", UNSOUND rows from the next offset (selections must differ)" } else { "" }
                )
            } else {
                String::new()
            },
            r.steps,
            if r.appends { " appending a token each" } else { "" },
            r.lens,
            r.frac * 100.0,
            100.0 * hits as f64 / (hits + misses).max(1) as f64
        ),
    ))
}

pub fn test(a: &GpuTestOffloadArgs) -> R<()> {
    let seed = a.seed;
    let gpu = GpuContext::new(0).map_err(e)?;
    println!("device {} ({} SMs, {})", gpu.name, gpu.sm_count, gpu.arch);
    let mut failed = 0;
    // Each check runs when its turn comes and prints at once (a run cut
    // short by a time limit still shows the checks that finished).
    type Check<'a> = Box<dyn Fn() -> R<(bool, String)> + 'a>;
    let checks: Vec<(String, Check)> = vec![
        (
            "host->slot round trip, random access + eviction storms, device policy == CPU twin"
                .into(),
            Box::new(|| roundtrip(&gpu, seed, PagePolicy::Device)),
        ),
        (
            "decode 5% cache == all on device (batch 2, small hip)".into(),
            Box::new(|| decode_equal(
                &gpu,
                &EqRun {
                    lens: &[150_000, 61_000],
                    stage: false,
                    preload: false,
                    prefetch: false,
                    seed,
                    ..Default::default()
                },
            )),
        ),
        (
            "estimation over host keys (5% rows, direct reads) + 5% cache == all on device".into(),
            Box::new(|| decode_equal(
                &gpu,
                &EqRun {
                    lens: &[150_000, 61_000],
                    est_frac: Some(0.05),
                    stage: false,
                    preload: false,
                    seed: seed + 1,
                    ..Default::default()
                },
            )),
        ),
        (
            "estimation over host keys (5% rows, staged misses) + 5% cache == all on device".into(),
            Box::new(|| decode_equal(
                &gpu,
                &EqRun {
                    lens: &[150_000, 61_000],
                    est_frac: Some(0.05),
                    seed: seed + 1,
                    ..Default::default()
                },
            )),
        ),
        (
            "appends + host estimation (1% rows) + 5% cache == all on device".into(),
            Box::new(|| decode_equal(
                &gpu,
                &EqRun {
                    lens: &[100_000, 33_000],
                    steps: 70,
                    est_frac: Some(0.01),
                    appends: true,
                    seed: seed + 2,
                    ..Default::default()
                },
            )),
        ),
        (
            "mutation: a page prefetch of the previous refresh's stage-0 chunks (stale) is detected".into(),
            Box::new(|| decode_equal(
                &gpu,
                &EqRun {
                    lens: &[100_000, 33_000],
                    steps: 48,
                    est_frac: Some(0.01),
                    appends: true,
                    stale_prefetch: true,
                    seed: seed + 5,
                    ..Default::default()
                },
            )),
        ),
        (
            "walk reuse on idle steps only, no page prefetch (run 7's path) 1% rows + appends == all on device".into(),
            Box::new(|| decode_equal(
                &gpu,
                &EqRun {
                    lens: &[100_000, 33_000],
                    steps: 70,
                    est_frac: Some(0.01),
                    appends: true,
                    prefetch: false,
                    seed: seed + 2,
                    ..Default::default()
                },
            )),
        ),
        (
            "mutation: reusing the walk across a new page (dropped block) is detected".into(),
            Box::new(|| decode_equal(
                &gpu,
                &EqRun {
                    lens: &[100_000, 33_000],
                    steps: 40,
                    est_frac: Some(0.01),
                    appends: true,
                    unsound: true,
                    prefetch: false,
                    seed: seed + 2,
                    ..Default::default()
                },
            )),
        ),
        (
            "per-thread miss staging, every step walks, admission before the page step (run 6's path) 1% rows + appends == all on device".into(),
            Box::new(|| decode_equal(
                &gpu,
                &EqRun {
                    lens: &[100_000, 33_000],
                    steps: 70,
                    est_frac: Some(0.01),
                    appends: true,
                    fetch_warp: false,
                    reuse: false,
                    late: false,
                    preload: false,
                    prefetch: false,
                    seed: seed + 2,
                    ..Default::default()
                },
            )),
        ),
        (
            "appends + host estimation (0.3% rows, storms), default hip, 30% cache".into(),
            Box::new(|| decode_equal(
                &gpu,
                &EqRun {
                    lens: &[40_000],
                    frac: 0.3,
                    steps: 40,
                    est_frac: Some(0.003),
                    appends: true,
                    small: false,
                    prefetch: false,
                    seed: seed + 3,
                    ..Default::default()
                },
            )),
        ),
        (
            "nothing admitted (limit 0): every estimation read a miss, == all on device".into(),
            Box::new(|| decode_equal(
                &gpu,
                &EqRun {
                    lens: &[40_000],
                    frac: 0.3,
                    steps: 24,
                    est_frac: Some(0.01),
                    appends: true,
                    small: false,
                    admit_limit: Some(0),
                    prefetch: false,
                    seed: seed + 4,
                    ..Default::default()
                },
            )),
        ),
        (
            "right-probe reuse + admit-all rows (5% rows, staged) + 5% cache == all on device".into(),
            Box::new(|| decode_equal(
                &gpu,
                &EqRun {
                    lens: &[150_000, 61_000],
                    est_frac: Some(0.05),
                    admit_all: true,
                    reuse_right: true,
                    seed: seed + 1,
                    ..Default::default()
                },
            )),
        ),
        (
            "right-probe reuse + admit-all rows, appends + 1% rows + 5% cache == all on device".into(),
            Box::new(|| decode_equal(
                &gpu,
                &EqRun {
                    lens: &[100_000, 33_000],
                    steps: 70,
                    est_frac: Some(0.01),
                    appends: true,
                    admit_all: true,
                    reuse_right: true,
                    seed: seed + 2,
                    ..Default::default()
                },
            )),
        ),
        (
            "admit-all rows, appends + host estimation (0.3% rows, storms), default hip, 30% cache".into(),
            Box::new(|| decode_equal(
                &gpu,
                &EqRun {
                    lens: &[40_000],
                    frac: 0.3,
                    steps: 40,
                    est_frac: Some(0.003),
                    appends: true,
                    small: false,
                    prefetch: false,
                    admit_all: true,
                    reuse_right: true,
                    seed: seed + 3,
                    ..Default::default()
                },
            )),
        ),
        (
            "pinned search levels 1-2 + reuse + admit-all, appends + 1% rows + 5% cache == all on device".into(),
            Box::new(|| decode_equal(
                &gpu,
                &EqRun {
                    lens: &[100_000, 33_000],
                    steps: 70,
                    est_frac: Some(0.01),
                    appends: true,
                    admit_all: true,
                    reuse_right: true,
                    pin_levels: 2,
                    seed: seed + 2,
                    ..Default::default()
                },
            )),
        ),
        (
            "mutation: pinned rows copied from the wrong page offset are detected".into(),
            Box::new(|| decode_equal(
                &gpu,
                &EqRun {
                    lens: &[150_000, 61_000],
                    steps: 16,
                    est_frac: Some(0.05),
                    pin_levels: 2,
                    pin_unsound: true,
                    seed: seed + 1,
                    ..Default::default()
                },
            )),
        ),
        (
            "mutation: reusing the previous level's score at every level is detected".into(),
            Box::new(|| decode_equal(
                &gpu,
                &EqRun {
                    lens: &[150_000, 61_000],
                    steps: 16,
                    est_frac: Some(0.05),
                    reuse_right: true,
                    reuse_unsound: true,
                    seed: seed + 1,
                    ..Default::default()
                },
            )),
        ),
        (
            "host->slot round trip, host LRU policy (earlier path)".into(),
            Box::new(|| roundtrip(&gpu, seed, PagePolicy::Host)),
        ),
        (
            "run-4 path (host LRU pages, host dedup + CLOCK, default) 1% rows + appends == all on device"
                .into(),
            Box::new(|| decode_equal(
                &gpu,
                &EqRun {
                    lens: &[100_000, 33_000],
                    steps: 40,
                    est_frac: Some(0.01),
                    appends: true,
                    admission: Admission::Device,
                    pages: PagePolicy::Host,
                    prefetch: false,
                    seed: seed + 2,
                    ..Default::default()
                },
            )),
        ),
        (
            "host-side admission (earlier path) 1% rows + appends == all on device".into(),
            Box::new(|| decode_equal(
                &gpu,
                &EqRun {
                    lens: &[100_000, 33_000],
                    steps: 40,
                    est_frac: Some(0.01),
                    appends: true,
                    admission: Admission::Host,
                    pages: PagePolicy::Host,
                    preload: false,
                    prefetch: false,
                    seed: seed + 2,
                    ..Default::default()
                },
            )),
        ),
    ];
    for (name, run) in checks {
        let t = Instant::now();
        let (ok, detail) = run().unwrap_or_else(|x| (false, format!("error: {x}")));
        println!(
            "{} {:<60} {} [{:.1} s]",
            if ok { "PASS" } else { "FAIL" },
            name,
            detail,
            t.elapsed().as_secs_f64()
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

/// What each `--admission` value runs: `full-device` (the new path, nothing
/// read back), `device` (run 4's: device table, host dedup + CLOCK, host
/// page policy), `host` (run 3's host admission).
fn admission_mode(m: &str) -> R<(Admission, PagePolicy)> {
    match m {
        "full-device" => Ok((Admission::FullDevice, PagePolicy::Device)),
        "device" => Ok((Admission::Device, PagePolicy::Host)),
        "host" => Ok((Admission::Host, PagePolicy::Host)),
        x => Err(format!(
            "--admission: `{x}` is not full-device, device or host"
        )),
    }
}

pub fn bench(a: &BenchGpuOffloadArgs) -> R<()> {
    a.check()?;
    // Missed estimation rows scored straight from host memory instead of
    // staged whole in device memory first.
    let direct = a.est_direct;
    // `device` (default), `host` (the earlier host-side admission), or both
    // (`device,host`: each configuration runs once per mode, same host tier).
    let modes: Vec<(Admission, PagePolicy)> = a
        .admission
        .iter()
        .map(|m| admission_mode(m))
        .collect::<R<_>>()?;
    let (tokens, fractions, est_list) = (a.tokens.clone(), a.cache.clone(), a.est_rows.clone());
    let (steps, warm, seed) = (a.steps, a.warmup, a.seed);
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
    let mut rows_bus = serde_json::Value::Null;
    let tev = |gpu: &GpuContext| -> R<CudaEvent> {
        gpu.ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(e)
    };
    for &t in &tokens {
        let t0 = Instant::now();
        let mut host = HostKv::alloc(lay, DType::Bf16, &[t]).map_err(e)?;
        let dirs = fill_synthetic(&mut host, seed + t as u64);
        let kv = host.to_device().map_err(e)?;
        let resident_bytes = kv.k.bytes + kv.v.bytes + kv.table.bytes;
        let total_blocks = host.n_pages * 8;
        let total_rows = total_blocks * lay.page_size;
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
        #[allow(clippy::type_complexity)]
        let mut combos: Vec<(
            f64,
            f64,
            (Admission, PagePolicy),
            bool,
            bool,
            bool,
            bool,
            bool,
            (bool, bool, usize),
        )> = Vec::new();
        for &f in &fractions {
            for &x in &est_list {
                for &m in &modes {
                    for w in &a.est_fetch {
                        for pl in &a.est_preload {
                            for late in &a.late_admission {
                                for reuse in &a.page_reuse {
                                    for pf in &a.page_prefetch {
                                        for ad in &a.est_admit {
                                            for rr in &a.est_reuse {
                                                for &pin in &a.est_pin {
                                                    combos.push((
                                                        f,
                                                        x,
                                                        m,
                                                        w == "warp",
                                                        reuse == "on",
                                                        late == "on",
                                                        pl == "on",
                                                        pf == "on",
                                                        (ad == "all", rr == "on", pin),
                                                    ));
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        if a.bus && rows.is_empty() {
            rows_bus = bus_probe(&gpu, &host, seed).map_err(e)?;
        }
        for (
            f,
            est_frac,
            (mode, pages),
            fetch_warp,
            reuse,
            late,
            preload,
            prefetch,
            (admit_all, reuse_right, pin),
        ) in combos
        {
            let n_slots = ((total_blocks as f64 * f).ceil() as usize).max(1);
            let mut off = OffloadKv::with_policy(&gpu, host, n_slots, pages).map_err(e)?;
            let est_rows = (total_rows as f64 * est_frac).ceil() as usize;
            // A pinned region takes its rows from the same budget: the
            // CLOCK arena gets the rest.
            let pin_mask = infinitehip::est_sim::pin_page_mask(
                pin,
                cfg.stages[0].chunk_size,
                cfg.sink,
                lay.page_size,
            )
            .ok_or("--est-pin needs stage-0 chunks of one page")?;
            let pinned_rows = HostEstimation::pinned_rows(&off.host, pin_mask);
            if pinned_rows + 16 > est_rows {
                eprintln!("{t} tokens, {est_frac} rows: the pinned levels 1-{pin} ({pinned_rows} rows) do not fit; skipped");
                host = off.into_host();
                continue;
            }
            let clock_rows = est_rows - pinned_rows;
            let mut est = if admit_all {
                HostEstimation::with_admit_all(&gpu, &off.host, clock_rows.max(16), !direct, mode)
            } else {
                HostEstimation::with_admission(&gpu, &off.host, clock_rows.max(16), !direct, mode)
            }
            .map_err(e)?;
            est.set_pinned(&off.host, pin_mask).map_err(e)?;
            est.set_fetch_warp(fetch_warp).map_err(e)?;
            est.set_reuse_right(reuse_right).map_err(e)?;
            est.set_row_preload(preload);
            let mut dec = HipGpuDecoder::new(cfg.clone(), &shape, 1).map_err(e)?;
            let mut dec2 = HipGpuDecoder::new(cfg.clone(), &shape, 1).map_err(e)?;
            // The resident step again without the sync between estimation
            // and attention (its own decoder: same refresh schedule).
            let mut dec3 = HipGpuDecoder::new(cfg.clone(), &shape, 1).map_err(e)?;
            let mut ws3 = DecodeWorkspace::new();
            let mut res_one = vec![];
            let device = pages == PagePolicy::Device;
            // Full-device options (the host paths sync inside).
            let (reuse, late) = (reuse && device, late && device);
            // Page prefetch: walks cover stage 0's kept chunks, a stage-0
            // refresh walks them on the copy stream while stages 1.. score.
            let prefetch = prefetch && device && reuse;
            if prefetch {
                dec2.set_stage0_event(Some(gpu.ctx.new_event(None).map_err(e)?));
                let (rg, cn, cap) = dec2.stage0_chunks();
                off.set_superset(rg, cn, cap, cfg.stages[0].chunk_size)
                    .map_err(e)?;
            }
            let n_stages = cfg.stages.len();
            let (mut ws1, mut ws2) = (DecodeWorkspace::new(), DecodeWorkspace::new());
            let mut rng = Rng::new(seed ^ 0xbe);
            let (mut est_r, mut res, mut est_o, mut prep, mut dec_o, mut tot_o) =
                (vec![], vec![], vec![], vec![], vec![], vec![]);
            let (mut est_o_refresh0, mut est_kernel, mut est_admit) = (vec![], vec![], vec![]);
            let (mut p_read, mut p_ref, mut p_clock, mut p_launch, mut sel_read) =
                (vec![], vec![], vec![], vec![], vec![]);
            let (mut unlogged, mut rebuilds) = (0u64, 0u32);
            let ev: Vec<CudaEvent> = (0..5).map(|_| tev(&gpu)).collect::<R<_>>()?;
            let mut classes: [StepClass; 4] = Default::default();
            let mut adm_of: Option<usize> = None;
            let (mut pr_res, mut pr_wait, mut pr_launch) = (vec![], vec![], vec![]);
            let (mut hits, mut misses, mut bytes, mut needed, mut max_abs) =
                (0u64, 0u64, 0u64, 0usize, 0f32);
            let (mut eh, mut em, mut e_host, mut e_adm, mut sel_diff) =
                (0u64, 0u64, 0u64, 0u64, 0usize);
            for s in 0..warm + steps {
                qd.write(&query(&mut rng, &shape, &dirs)).map_err(e)?;
                gpu.synchronize().map_err(e)?;
                // All on the device.
                let ta = Instant::now();
                dec.select(&gpu, &kv, qd.ptr, true).map_err(e)?;
                gpu.synchronize().map_err(e)?;
                let tb = Instant::now();
                let mt = dec.max_tokens;
                dispatch::decode(
                    &gpu,
                    &mut ws1,
                    &shape,
                    &kv,
                    qd.ptr,
                    dec.selection(&gpu).map_err(e)?,
                    mt,
                    None,
                    o1.ptr,
                )
                .map_err(e)?;
                gpu.synchronize().map_err(e)?;
                let tc = Instant::now();
                let sel1 = dec.selection_host(&gpu).map_err(e)?;
                let td = Instant::now();
                dec3.select(&gpu, &kv, qd.ptr, true).map_err(e)?;
                let mt3 = dec3.max_tokens;
                dispatch::decode(
                    &gpu,
                    &mut ws3,
                    &shape,
                    &kv,
                    qd.ptr,
                    dec3.selection(&gpu).map_err(e)?,
                    mt3,
                    None,
                    o1.ptr,
                )
                .map_err(e)?;
                gpu.synchronize().map_err(e)?;
                let te = Instant::now();
                // Offloaded: estimation over host keys, page cache, decode.
                // The device path has no sync until the end: its phase times
                // are host (launch) times; the host paths sync inside.
                // The last step's admission (side stream), when it launched
                // one: its device time, outside the timed region (--profile
                // measures it inside its step instead).
                if let Some(c) = adm_of.take() {
                    let ms = est.last_admission_ms().map_err(e)?.unwrap_or(f32::NAN) as f64;
                    let cl: &mut StepClass = &mut classes[c];
                    cl.adm_ms += ms;
                }
                let pev = a.phase_events != "off";
                let rec = |i: usize| -> R<()> {
                    if pev {
                        ev[i].record(&gpu.stream).map_err(e)?;
                    }
                    Ok(())
                };
                let t1 = Instant::now();
                rec(0)?;
                // Late admission: a step that scores no key need not wait.
                if !late || HostEstimation::scores(&dec2) {
                    est.wait_admission(&gpu).map_err(e)?;
                }
                rec(1)?;
                let from = est
                    .select(&gpu, &mut dec2, &off.host, qd.ptr, true)
                    .map_err(e)?;
                if prefetch && from == 0 {
                    off.prefetch_superset(&gpu, &pins, dec2.stage0_event().unwrap())
                        .map_err(e)?;
                }
                rec(2)?;
                if !device {
                    gpu.synchronize().map_err(e)?;
                }
                let t15 = Instant::now();
                let mut es = if late {
                    Default::default()
                } else {
                    est.finish(&gpu).map_err(e)?
                };
                let mt2 = dec2.max_tokens;
                let t2 = Instant::now();
                let sels = if device {
                    Vec::new()
                } else {
                    dec2.selection_host(&gpu).map_err(e)?
                };
                let t25 = Instant::now();
                let st = if device {
                    let tail_only = reuse && (from >= n_stages || (prefetch && from >= 1));
                    off.prepare_device_step(
                        &gpu,
                        dec2.selection(&gpu).map_err(e)?,
                        &pins,
                        tail_only,
                    )
                    .map_err(e)?
                } else {
                    off.prepare(&gpu, &sels, &pins).map_err(e)?
                };
                let t3 = Instant::now();
                rec(3)?;
                off.decode(
                    &gpu,
                    &mut ws2,
                    &shape,
                    qd.ptr,
                    dec2.selection(&gpu).map_err(e)?,
                    mt2,
                    None,
                    o2.ptr,
                )
                .map_err(e)?;
                rec(4)?;
                if late {
                    // After the attention's launch: the admission's side
                    // stream starts after it, the host launches it while
                    // the GPU runs the step.
                    es = est.finish(&gpu).map_err(e)?;
                }
                gpu.synchronize().map_err(e)?;
                let t4 = Instant::now();
                // Device times of the phases (main stream): waiting for the
                // previous admission, estimation kernels, page step
                // (+ admission launches), attention.
                let dev_ms: [f64; 4] = if pev {
                    [
                        ev[0].elapsed_ms(&ev[1]).map_err(e)? as f64,
                        ev[1].elapsed_ms(&ev[2]).map_err(e)? as f64,
                        ev[2].elapsed_ms(&ev[3]).map_err(e)? as f64,
                        ev[3].elapsed_ms(&ev[4]).map_err(e)? as f64,
                    ]
                } else {
                    [f64::NAN; 4]
                };
                // --profile: this step's counters exactly (waits for its
                // admission), else they arrive a step late.
                let (mut prof_adm, mut prof_page, mut prof_est) = (f64::NAN, 0u64, 0u64);
                if a.profile && device {
                    prof_adm = est.last_admission_ms().map_err(e)?.unwrap_or(f32::NAN) as f64;
                    let ps = off.take_stats().map_err(e)?;
                    let es2 = est.sync_stats().map_err(e)?;
                    prof_page = ps.bytes_copied;
                    prof_est = es2.host_bytes_read;
                    if s >= warm {
                        hits += ps.hits;
                        misses += ps.misses;
                        bytes += ps.bytes_copied;
                        eh += es2.cache.hits;
                        em += es2.cache.misses;
                        e_host += es2.host_bytes_read;
                        e_adm += es2.cache.bytes_copied;
                    }
                }
                let sels = if device {
                    dec2.selection_host(&gpu).map_err(e)?
                } else {
                    sels
                };
                // The resident decode again (o1 was overwritten by dec3's).
                dispatch::decode(
                    &gpu,
                    &mut ws1,
                    &shape,
                    &kv,
                    qd.ptr,
                    dec.selection(&gpu).map_err(e)?,
                    mt,
                    None,
                    o1.ptr,
                )
                .map_err(e)?;
                gpu.synchronize().map_err(e)?;
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
                    let c = &mut classes[from.min(3)];
                    c.n += 1;
                    c.host_ms += (t4 - t1).as_secs_f64() * 1e3;
                    c.res_ms += (te - td).as_secs_f64() * 1e3;
                    for (k, v) in dev_ms.iter().enumerate() {
                        c.dev[k] += v;
                    }
                    if a.profile {
                        c.adm_ms += prof_adm;
                    } else if device && from < n_stages {
                        // Measured at the next step's start.
                        adm_of = Some(from.min(3));
                    }
                    c.page_b += prof_page;
                    c.est_b += prof_est;
                    sel_diff += (sels != sel1) as usize;
                    est_r.push((tb - ta).as_secs_f64() * 1e3);
                    res.push((tc - tb).as_secs_f64() * 1e3);
                    res_one.push((te - td).as_secs_f64() * 1e3);
                    est_o.push((t2 - t1).as_secs_f64() * 1e3);
                    if from == 0 {
                        est_o_refresh0.push((t2 - t1).as_secs_f64() * 1e3);
                    }
                    est_kernel.push((t15 - t1).as_secs_f64() * 1e3);
                    est_admit.push((t2 - t15).as_secs_f64() * 1e3);
                    p_read.push(es.prof.readback);
                    p_ref.push(es.prof.refbits);
                    p_clock.push(es.prof.clock);
                    p_launch.push(es.prof.launch);
                    sel_read.push((t25 - t2).as_secs_f64() * 1e3);
                    pr_res.push(st.host_resolve_ms);
                    pr_wait.push(st.host_wait_ms);
                    pr_launch.push(st.host_launch_ms);
                    unlogged += es.misses_unlogged;
                    rebuilds += es.prof.rebuilds;
                    prep.push((t3 - t2).as_secs_f64() * 1e3);
                    dec_o.push((t4 - t3).as_secs_f64() * 1e3);
                    tot_o.push((t4 - t1).as_secs_f64() * 1e3);
                    hits += st.cache.hits;
                    misses += st.cache.misses;
                    bytes += st.cache.bytes_copied;
                    needed += st.blocks_needed;
                    eh += es.cache.hits;
                    em += es.cache.misses;
                    e_host += es.host_bytes_read;
                    e_adm += es.cache.bytes_copied;
                }
            }
            let mean = |v: &[f64]| {
                if v.is_empty() {
                    f64::NAN
                } else {
                    v.iter().sum::<f64>() / v.len() as f64
                }
            };
            let n = steps as f64;
            let mib = (1u64 << 20) as f64;
            let dev_off = off.device_bytes() + est.device_bytes();
            // Counters the device had not reported yet.
            let rest = off.take_stats().map_err(e)?;
            hits += rest.hits;
            misses += rest.misses;
            bytes += rest.bytes_copied;
            let es = est.sync_stats().map_err(e)?;
            eh += es.cache.hits;
            em += es.cache.misses;
            e_host += es.host_bytes_read;
            e_adm += es.cache.bytes_copied;
            let res_total = mean(&est_r) + mean(&res);
            let res_one_ms = mean(&res_one);
            let row = json!({
                "tokens": t, "cache_fraction": f, "cache_blocks": n_slots, "kv_blocks": total_blocks,
                "est_rows": est_rows, "est_rows_fraction": est_frac, "est_max_admit_per_step": est.max_admit_per_step, "est_staged_misses": !direct, "key_rows": total_rows,
                "host_kv_mib": kv_mib,
                "device_page_cache_mib": off.device_bytes() as f64 / mib,
                "device_est_cache_mib": est.device_bytes() as f64 / mib,
                "device_offload_mib": dev_off as f64 / mib,
                "device_resident_kv_mib": resident_bytes as f64 / mib,
                "resident_estimation_ms": mean(&est_r), "resident_decode_ms": mean(&res),
                "resident_step_ms": res_total,
                "resident_step_one_sync_ms": res_one_ms,
                "offload_over_resident": mean(&tot_o) / res_one_ms,
                "page_policy": format!("{pages:?}").to_lowercase(),
                "offload_estimation_ms": mean(&est_o),
                "offload_estimation_stage0_refresh_ms": mean(&est_o_refresh0),
                "offload_estimation_kernels_ms": mean(&est_kernel),
                "offload_estimation_admission_host_ms": mean(&est_admit),
                "offload_prepare_ms": mean(&prep), "offload_decode_ms": mean(&dec_o),
                "offload_step_ms": mean(&tot_o),
                "page_hit_ratio": hits as f64 / (hits + misses).max(1) as f64,
                "est_row_hit_ratio": eh as f64 / (eh + em).max(1) as f64,
                "blocks_needed_per_step": needed as f64 / n,
                "page_copied_mib_per_step": bytes as f64 / n / mib,
                "est_host_read_mib_per_step": e_host as f64 / n / mib,
                "est_admitted_mib_per_step": e_adm as f64 / n / mib,
                // Staged admission copies device -> device: not bus bytes.
                "bus_mib_per_step": (bytes + e_host + if direct { e_adm } else { 0 }) as f64 / n / mib,
                "selection_mismatch_steps": sel_diff,
                "max_abs_diff": max_abs,
                "x32_resident_ms": 32.0 * res_total, "x32_offload_ms": 32.0 * mean(&tot_o),
                "x32_host_gib": 32.0 * kv_mib / 1024.0,
                "x32_device_offload_gib": 32.0 * dev_off as f64 / (1u64 << 30) as f64,
                "x32_device_resident_gib": 32.0 * resident_bytes as f64 / (1u64 << 30) as f64,
            });
            let mut row = row;
            let extra = json!({
                "admission": format!("{mode:?}").to_lowercase(),
                "offload_admission_readback_ms": mean(&p_read),
                "offload_admission_refbits_ms": mean(&p_ref),
                "offload_admission_clock_ms": mean(&p_clock),
                "offload_admission_launch_ms": mean(&p_launch),
                "est_misses_unlogged": unlogged, "est_table_rebuilds": rebuilds,
                "offload_selection_readback_ms": mean(&sel_read),
                "offload_prepare_resolve_ms": mean(&pr_res),
                "offload_prepare_wait_ms": mean(&pr_wait),
                "offload_prepare_launch_ms": mean(&pr_launch),
                "est_fetch": if fetch_warp { "warp" } else { "thread" },
                "est_admit_all": admit_all, "est_reuse_right": reuse_right,
                "est_pin_levels": pin, "est_pinned_rows": pinned_rows, "est_clock_rows": clock_rows,
                "page_reuse": reuse, "late_admission": late, "est_preload": preload, "phase_events": a.phase_events != "off",
                "page_steps_reused": off.steps_reused,
                "page_prefetch": prefetch,
                "page_steps_prefetched": off.steps_prefetched,
                "profiled": a.profile && device,
                "by_refresh_class": classes.iter().enumerate().filter(|(_, c)| c.n > 0).map(|(k, c)| {
                    let n = c.n as f64;
                    let mib = (1u64 << 20) as f64;
                    json!({
                        "refresh_from_stage": k, "steps": c.n,
                        "resident_one_sync_ms": c.res_ms / n, "offload_host_ms": c.host_ms / n,
                        "dev_wait_admission_ms": c.dev[0] / n, "dev_estimation_ms": c.dev[1] / n,
                        "dev_page_step_ms": c.dev[2] / n, "dev_attention_ms": c.dev[3] / n,
                        "dev_admission_side_ms": c.adm_ms / n,
                        "page_mib": c.page_b as f64 / n / mib, "est_host_mib": c.est_b as f64 / n / mib,
                        "est_host_gbps": c.est_b as f64 / (c.dev[1] * 1e-3) / 1e9,
                        "page_gbps": c.page_b as f64 / (c.dev[2] * 1e-3) / 1e9,
                    })
                }).collect::<Vec<_>>(),
            });
            if let (Some(o), Some(x)) = (row.as_object_mut(), extra.as_object()) {
                o.extend(x.clone());
            }
            eprintln!("{row}");
            rows.push(row);
            host = off.into_host();
        }
    }
    let g = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    println!("\n| tokens | page cache | est rows | path | page reuse (steps) | page prefetch (steps) | late admission | row preload | est admit / step | right-probe reuse | pinned levels | row hit % | est MiB/step | resident ms/step (one sync) | offload ms/step | offload / resident | sel mismatches / max abs diff |");
    println!("|---:|---:|---:|---|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---|");
    for r in &rows {
        println!(
            "| {} | {:.1}% | {:.1}% | {} pages, {} admission, {} fetch | {} ({}) | {} ({}) | {} | {} | {} | {} | {} | {:.1} | {:.2} | {:.3} | {:.3} | **{:.2}x** | {} / {:.1e} |",
            r["tokens"],
            100.0 * g(r, "cache_fraction"),
            100.0 * g(r, "est_rows_fraction"),
            r["page_policy"].as_str().unwrap_or("?"),
            r["admission"].as_str().unwrap_or("?"),
            r["est_fetch"].as_str().unwrap_or("?"),
            if r["page_reuse"].as_bool() == Some(true) { "on" } else { "off" },
            r["page_steps_reused"],
            if r["page_prefetch"].as_bool() == Some(true) { "on" } else { "off" },
            r["page_steps_prefetched"],
            if r["late_admission"].as_bool() == Some(true) { "on" } else { "off" },
            if r["est_preload"].as_bool() == Some(true) { "on" } else { "off" },
            if r["est_admit_all"].as_bool() == Some(true) { "all" } else { "half" },
            if r["est_reuse_right"].as_bool() == Some(true) { "on" } else { "off" },
            match r["est_pin_levels"].as_u64() {
                Some(0) | None => "none".to_string(),
                Some(p) => format!("1-{p} ({} rows)", r["est_pinned_rows"]),
            },
            100.0 * g(r, "est_row_hit_ratio"),
            g(r, "est_host_read_mib_per_step"),
            g(r, "resident_step_one_sync_ms"),
            g(r, "offload_step_ms"),
            g(r, "offload_over_resident"),
            r["selection_mismatch_steps"],
            g(r, "max_abs_diff"),
        );
    }
    println!("\n| tokens | page cache | est rows | admission | resident ms/step (est + attn) | offload ms/step | of it: est (kernels + admission; stage-0 refresh steps) | prepare | attn | page hit % | row hit % | bus MiB/step (pages + est read [+ est admit if direct]) | device MiB offload / resident | sel mismatches | max abs diff |");
    println!("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.1}% | {:.1}% | {} | {:.3} ({:.3} + {:.3}) | {:.3} | {:.3} ({:.3} + {:.3}; {:.1}) | {:.3} | {:.3} | {:.1} | {:.1} | {:.2} ({:.2} + {:.2} [+ {:.2}]) | {:.0} / {:.0} | {} | {:.1e} |",
            r["tokens"], 100.0 * g(r, "cache_fraction"), 100.0 * g(r, "est_rows_fraction"), r["admission"].as_str().unwrap_or("?"),
            g(r, "resident_step_ms"), g(r, "resident_estimation_ms"), g(r, "resident_decode_ms"),
            g(r, "offload_step_ms"), g(r, "offload_estimation_ms"), g(r, "offload_estimation_kernels_ms"),
            g(r, "offload_estimation_admission_host_ms"), g(r, "offload_estimation_stage0_refresh_ms"),
            g(r, "offload_prepare_ms"), g(r, "offload_decode_ms"),
            100.0 * g(r, "page_hit_ratio"), 100.0 * g(r, "est_row_hit_ratio"),
            g(r, "bus_mib_per_step"), g(r, "page_copied_mib_per_step"), g(r, "est_host_read_mib_per_step"), g(r, "est_admitted_mib_per_step"),
            g(r, "device_offload_mib"), g(r, "device_resident_kv_mib"),
            r["selection_mismatch_steps"], g(r, "max_abs_diff"),
        );
    }
    println!(
        "\nWhere the offloaded step's host time goes (ms/step, means over the timed steps):\n"
    );
    println!("| tokens | est rows | admission | est kernels (+ sync) | admission total | of it: counters + miss list read | reference bits | dedup + CLOCK | launch | rebuilds | misses past the list | prepare (of it: selection read back; page policy + lists; wait for previous copy; staging + launch) |");
    println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.1}% | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {:.3} ({:.3}; {:.3}; {:.3}; {:.3}) |",
            r["tokens"], 100.0 * g(r, "est_rows_fraction"), r["admission"].as_str().unwrap_or("?"),
            g(r, "offload_estimation_kernels_ms"), g(r, "offload_estimation_admission_host_ms"),
            g(r, "offload_admission_readback_ms"), g(r, "offload_admission_refbits_ms"),
            g(r, "offload_admission_clock_ms"), g(r, "offload_admission_launch_ms"),
            r["est_table_rebuilds"], r["est_misses_unlogged"],
            g(r, "offload_prepare_ms"), g(r, "offload_selection_readback_ms"),
            g(r, "offload_prepare_resolve_ms"), g(r, "offload_prepare_wait_ms"), g(r, "offload_prepare_launch_ms"),
        );
    }
    println!("\nBy refresh class (device times from events on the main stream, ms/step; MiB and GB/s only with --profile):\n");
    println!("| tokens | est rows | admission | fetch, page reuse, late admission, row preload, page prefetch, est admit all, right-probe reuse, pinned levels | refresh from stage | steps | resident (one sync) | offload (host clock) | dev: wait admission | estimation | page step | attention | admission (side) | page MiB | est host MiB | est GB/s |");
    println!("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        for c in r["by_refresh_class"].as_array().into_iter().flatten() {
            println!(
                "| {} | {:.1}% | {} | {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2} | {:.1} |",
                r["tokens"], 100.0 * g(r, "est_rows_fraction"), r["admission"].as_str().unwrap_or("?"),
                format!("{}, {}, {}, {}, {}, {}, {}, {}", r["est_fetch"].as_str().unwrap_or("?"), r["page_reuse"], r["late_admission"], r["est_preload"], r["page_prefetch"], r["est_admit_all"], r["est_reuse_right"], r["est_pin_levels"]),
                c["refresh_from_stage"], c["steps"],
                g(c, "resident_one_sync_ms"), g(c, "offload_host_ms"), g(c, "dev_wait_admission_ms"),
                g(c, "dev_estimation_ms"), g(c, "dev_page_step_ms"), g(c, "dev_attention_ms"),
                g(c, "dev_admission_side_ms"), g(c, "page_mib"), g(c, "est_host_mib"), g(c, "est_host_gbps"),
            );
        }
    }
    if !rows_bus.is_null() {
        println!("\nBus (host -> device over the same pinned host tier; GB/s = bytes / device time, median of 5):\n");
        println!("| what | bytes | DMA cuMemcpyHtoDAsync GB/s | kernel GB/s (today's pattern) | kernel GB/s (new pattern) |");
        println!("|---|---:|---:|---:|---:|");
        for b in rows_bus.as_array().into_iter().flatten() {
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.1} |",
                b["what"].as_str().unwrap_or("?"),
                b["bytes"],
                g(b, "dma_gbps"),
                g(b, "old_gbps"),
                g(b, "new_gbps")
            );
        }
    }
    if let Some(p) = &a.json {
        let doc = json!({"machine": machine, "bus": rows_bus, "shape": {"q_heads": 32, "kv_heads": 8, "head_dim": 128, "page_size": 64, "dtype": "bf16"}, "policy": "hip default", "steps": steps, "warmup_steps": warm, "results": rows});
        std::fs::write(p, serde_json::to_string_pretty(&doc).unwrap())
            .map_err(|x| format!("{p}: {x}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod admission_tests {
    use super::*;

    /// Every value the flag accepts runs a path (the parser and the mapping
    /// once disagreed: `full-device` parsed, then was refused).
    #[test]
    fn every_accepted_admission_value_maps_to_a_path() {
        let cmd = <crate::cli::Cli as clap::CommandFactory>::command();
        let sub = cmd.find_subcommand("bench-gpu-offload").unwrap();
        let arg = sub
            .get_arguments()
            .find(|a| a.get_id() == "admission")
            .unwrap();
        let values: Vec<String> = arg
            .get_possible_values()
            .iter()
            .map(|v| v.get_name().to_string())
            .collect();
        assert_eq!(values, ["full-device", "device", "host"]);
        for v in &values {
            admission_mode(v).unwrap();
        }
        assert!(matches!(
            admission_mode("full-device").unwrap(),
            (Admission::FullDevice, PagePolicy::Device)
        ));
        assert!(matches!(
            admission_mode("device").unwrap(),
            (Admission::Device, PagePolicy::Host)
        ));
    }
}

/// Per refresh class (the first stage a step refreshes; 3: none) sums.
#[derive(Default)]
struct StepClass {
    n: usize,
    host_ms: f64,
    res_ms: f64,
    /// Device ms: wait for admission, estimation, page step, attention.
    dev: [f64; 4],
    adm_ms: f64,
    page_b: u64,
    est_b: u64,
}

/// `--bus`: host -> device bandwidth over `host`'s pinned tier. DMA
/// (cuMemcpyHtoDAsync of contiguous bytes) vs the copy kernels' patterns on
/// the same byte counts: scattered key rows (estimation misses: one thread
/// per row vs a warp per 32 rows) and head blocks (page misses: the plain
/// loop vs the unrolled one). Device time by events, median of 5 after one
/// warm-up.
fn bus_probe(gpu: &GpuContext, host: &HostKv, seed: u64) -> infinitehip::Result<serde_json::Value> {
    use infinitehip::backend::cuda::cudarc::driver::result as cu;
    let lay = host.layout;
    let row_bytes = lay.head_dim * 2;
    let block_bytes = lay.page_size * row_bytes;
    let total_rows = host.n_pages * lay.n_kv_heads * lay.page_size;
    let total_blocks = host.n_pages * lay.n_kv_heads;
    let cap = (host.k.bytes).min(512 << 20);
    let dst = DevBuf::alloc(cap)?;
    let dst2 = DevBuf::alloc(cap)?;
    let ev0 = gpu
        .ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(|x| infinitehip::Error::Invalid(x.to_string()))?;
    let ev1 = gpu
        .ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(|x| infinitehip::Error::Invalid(x.to_string()))?;
    let gerr = |x: infinitehip::backend::cuda::cudarc::driver::DriverError| {
        infinitehip::Error::Invalid(format!("bus probe: {x}"))
    };
    let time = |f: &mut dyn FnMut() -> infinitehip::Result<()>| -> infinitehip::Result<f64> {
        f()?;
        let mut v = Vec::new();
        for _ in 0..5 {
            ev0.record(&gpu.stream).map_err(gerr)?;
            f()?;
            ev1.record(&gpu.stream).map_err(gerr)?;
            v.push(ev0.elapsed_ms(&ev1).map_err(gerr)? as f64);
        }
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        Ok(v[2])
    };
    let src = host.k.as_u16();
    let mut out = Vec::new();
    let mut rng = Rng::new(seed ^ 0xb05);
    let rows_fn = gpu.func("offload", "bus_rows")?;
    let blocks_fn = gpu.func("offload", "bus_blocks")?;
    let sms = gpu.sm_count as u32;
    let gb = |bytes: usize, ms: f64| bytes as f64 / (ms * 1e-3) / 1e9;
    for &n in &[4096usize, 32768, 262144, 1 << 20] {
        let bytes = n * row_bytes;
        if bytes > cap {
            continue;
        }
        let ids: Vec<u32> = (0..n).map(|_| rng.below(total_rows) as u32).collect();
        let idb = DevBuf::from_slice(&ids)?;
        let dma = time(&mut || {
            unsafe { cu::memcpy_htod_async(dst2.ptr, &src[..bytes / 2], gpu.stream.cu_stream()) }
                .map_err(gerr)
        })?;
        let kern = |warp: i32| -> infinitehip::Result<f64> {
            let (ni, rv) = (n as i32, (row_bytes / 16) as i32);
            time(&mut || {
                let mut l = gpu.stream.launch_builder(&rows_fn);
                l.arg(&host.k.dev)
                    .arg(&dst.ptr)
                    .arg(&idb.ptr)
                    .arg(&ni)
                    .arg(&rv)
                    .arg(&warp);
                let threads = if warp != 0 { n.div_ceil(32) * 32 } else { n };
                unsafe {
                    l.launch(LaunchConfig {
                        grid_dim: (
                            threads.div_ceil(128).clamp(1, 64 * sms as usize) as u32,
                            1,
                            1,
                        ),
                        block_dim: (128, 1, 1),
                        shared_mem_bytes: 0,
                    })
                }
                .map(|_| ())
                .map_err(gerr)
            })
        };
        let (old, new) = (kern(0)?, kern(1)?);
        // Same rows either way.
        gpu.synchronize()?;
        out.push(
            json!({"what": format!("{n} key rows of {row_bytes} B, random"), "bytes": bytes,
            "dma_gbps": gb(bytes, dma), "old_gbps": gb(bytes, old), "new_gbps": gb(bytes, new),
            "dma_ms": dma, "old_ms": old, "new_ms": new}),
        );
    }
    for &n in &[64usize, 512, 4096] {
        let bytes = n * block_bytes * 2;
        if bytes > cap {
            continue;
        }
        let ids: Vec<i32> = (0..n).map(|_| rng.below(total_blocks) as i32).collect();
        let idb = DevBuf::from_slice(&ids)?;
        let half = cap / 2;
        let dma = time(&mut || {
            unsafe { cu::memcpy_htod_async(dst2.ptr, &src[..bytes / 2], gpu.stream.cu_stream()) }
                .map_err(gerr)
        })?;
        let kern = |unrolled: i32| -> infinitehip::Result<f64> {
            let (ni, bv) = (n as i32, (block_bytes / 16) as i32);
            let sv = dst.ptr + half as u64;
            time(&mut || {
                let mut l = gpu.stream.launch_builder(&blocks_fn);
                l.arg(&host.k.dev)
                    .arg(&host.v.dev)
                    .arg(&dst.ptr)
                    .arg(&sv)
                    .arg(&idb.ptr)
                    .arg(&ni)
                    .arg(&bv)
                    .arg(&unrolled);
                unsafe {
                    l.launch(LaunchConfig {
                        grid_dim: (sms.min(n as u32), 1, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    })
                }
                .map(|_| ())
                .map_err(gerr)
            })
        };
        let (old, new) = (kern(0)?, kern(1)?);
        out.push(json!({"what": format!("{n} head blocks (K+V) of {block_bytes} B each, random; {} CTAs", sms.min(n as u32)), "bytes": bytes,
            "dma_gbps": gb(bytes, dma), "old_gbps": gb(bytes, old), "new_gbps": gb(bytes, new),
            "dma_ms": dma, "old_ms": old, "new_ms": new}));
    }
    // Peak DMA.
    let dma = time(&mut || {
        unsafe { cu::memcpy_htod_async(dst2.ptr, &src[..cap / 2], gpu.stream.cu_stream()) }
            .map_err(gerr)
    })?;
    out.push(json!({"what": "contiguous, DMA only", "bytes": cap, "dma_gbps": gb(cap, dma), "old_gbps": f64::NAN, "new_gbps": f64::NAN, "dma_ms": dma}));
    Ok(serde_json::Value::Array(out))
}
