//! hip stage scoring: the warp kernel (`hip_scorew*`, default) against the
//! per-thread kernel (`hip_score*`, the reference the CPU policy check
//! covers) and a host reference of the same arithmetic, key for key (bit
//! equality of the order-preserving score keys, 0 for invalid slots).

use half::{bf16, f16};
use infinitehip::backend::cuda::dispatch::{self, DeviceKv, ScoreKernel};
use infinitehip::backend::cuda::{DevBuf, GpuContext};
use infinitehip::rng::Rng;
use infinitehip::DType;

use crate::gpu::{e, Check, R};

/// The CPU's order-preserving key of a score (kernels/hip_mask.cu score_key).
fn score_key(f: f32) -> u32 {
    let f = if f.is_nan() { f32::NEG_INFINITY } else { f };
    let u = f.to_bits();
    if u & 0x8000_0000 != 0 {
        !u
    } else {
        u | 0x8000_0000
    }
}

/// One scoring case: a random K pool and random candidate ranges.
struct Case {
    dtype: DType,
    d: usize,
    hkv: usize,
    /// Queries per sequence row (its length is the batch).
    nq: Vec<i32>,
    nq_max: usize,
    nq_tpl: usize,
    lanes: usize,
    page_size: usize,
    tokens: usize,
    c: usize,
    cap_in: usize,
    e: usize,
    /// Ranges: `None`: one range (sink .. tokens - window) per row, as
    /// stage 0; `Some(max_len)`: `cap_in` random disjoint ranges of 1 to
    /// `max_len` tokens (some rows with fewer valid, one with none).
    max_len: Option<usize>,
}

struct Pool {
    kv: DeviceKv,
    host: Vec<u16>,
    table: Vec<i32>,
}

fn to_bits(dt: DType, x: f32) -> u16 {
    match dt {
        DType::F16 => f16::from_f32(x).to_bits(),
        _ => bf16::from_f32(x).to_bits(),
    }
}

fn from_bits(dt: DType, b: u16) -> f32 {
    match dt {
        DType::F16 => f16::from_bits(b).to_f32(),
        _ => bf16::from_bits(b).to_f32(),
    }
}

/// Random keys; page-major `[page][hkv][ps][d]` (ps > 1) or a token-major
/// pool with padded slot stride (ps = 1); pages / slots shuffled.
fn pool(c: &Case, rng: &mut Rng) -> R<Pool> {
    let b = c.nq.len();
    let (d, hkv, ps) = (c.d, c.hkv, c.page_size);
    let pages_per = c.tokens.div_ceil(ps);
    let n_pages = b * pages_per + 3;
    let (page_stride, head_stride) = if ps == 1 {
        (hkv * d + 8, d)
    } else {
        (hkv * ps * d, ps * d)
    };
    let n = n_pages * page_stride;
    let host: Vec<u16> = (0..n).map(|_| to_bits(c.dtype, rng.normal())).collect();
    // A shuffled page order (a permutation of 0..n_pages).
    let mut perm: Vec<i32> = (0..n_pages as i32).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, rng.below(i + 1));
    }
    let table: Vec<i32> = perm[..b * pages_per].to_vec();
    let kv = DeviceKv {
        k: DevBuf::from_slice(&host).map_err(e)?,
        v: DevBuf::alloc(16).map_err(e)?,
        table: DevBuf::from_slice(&table).map_err(e)?,
        table_stride: pages_per,
        page_size: ps,
        page_stride,
        head_stride,
        n_kv_heads: hkv,
        head_dim: d,
        dtype: c.dtype,
        lens: vec![c.tokens; b],
        capacity: vec![c.tokens; b],
    };
    Ok(Pool { kv, host, table })
}

/// Rows' candidate ranges and counts.
fn ranges(c: &Case, rng: &mut Rng) -> (Vec<[i32; 2]>, Vec<i32>) {
    let rows = c.nq.len() * c.hkv;
    let mut rg = vec![[0i32, 0i32]; rows * c.cap_in];
    let mut cnt = vec![0i32; rows];
    for r in 0..rows {
        match c.max_len {
            None => {
                rg[r * c.cap_in] = [128, (c.tokens - 1024) as i32];
                cnt[r] = 1;
            }
            Some(max_len) => {
                // Row 1 has none; every third row fewer than cap_in.
                let n = match r {
                    1 => 0,
                    _ if r % 3 == 2 => c.cap_in - 1 - rng.below(c.cap_in.min(5)),
                    _ => c.cap_in,
                };
                let span = c.tokens / n.max(1);
                for i in 0..n {
                    let base = i * span;
                    let len = 1 + rng.below(max_len.min(span));
                    let start = base + rng.below(span - len + 1);
                    rg[r * c.cap_in + i] = [start as i32, (start + len) as i32];
                }
                cnt[r] = n as i32;
                // Stale data past the count (must be ignored).
                for i in n..c.cap_in {
                    rg[r * c.cap_in + i] = [0, c.tokens as i32];
                }
            }
        }
    }
    (rg, cnt)
}

/// Host reference of one probe: max over the row's queries of the dot in
/// the kernel's order (8 partial sums over 8-element chunks, then summed
/// left to right, no fused multiply-add).
fn probe(c: &Case, p: &Pool, q: &[f32], rb: usize, h: usize, t: usize, nq: usize) -> f32 {
    let ps = c.page_size;
    let page = p.table[rb * p.kv.table_stride + t / ps] as usize;
    let off = page * p.kv.page_stride + h * p.kv.head_stride + (t % ps) * c.d;
    let k: Vec<f32> = p.host[off..off + c.d]
        .iter()
        .map(|&b| from_bits(c.dtype, b))
        .collect();
    let mut best = f32::NEG_INFINITY;
    for qj in q.chunks(c.d).take(nq) {
        let mut a = [0f32; 8];
        for ch in 0..c.d / 8 {
            for i in 0..8 {
                a[i] += qj[ch * 8 + i] * k[ch * 8 + i];
            }
        }
        let mut s = a[0];
        for x in &a[1..] {
            s += *x;
        }
        best = best.max(s);
    }
    best
}

/// The hierarchical search of one sub-chunk `l..rr` (kernels/hip_mask.cu
/// hip_score): its score and the token that gave it.
#[allow(clippy::too_many_arguments)]
fn search(
    c: &Case,
    p: &Pool,
    qr: &[f32],
    rb: usize,
    h: usize,
    mut l: usize,
    mut rr: usize,
    nq: usize,
) -> (f32, usize) {
    if rr - l == 1 {
        return (probe(c, p, qr, rb, h, l, nq), l);
    }
    let mut best = (f32::NEG_INFINITY, l);
    while rr - l > 1 {
        let m = (l + rr) / 2;
        let (tl, tr) = ((l + m) / 2, (m + rr) / 2);
        let sl = probe(c, p, qr, rb, h, tl, nq);
        let sr = probe(c, p, qr, rb, h, tr, nq);
        if sl >= sr {
            rr = m;
            best = (sl, tl);
        } else {
            l = m;
            best = (sr, tr);
        }
    }
    best
}

/// Host reference keys (kernels/hip_mask.cu hip_score).
fn reference(c: &Case, p: &Pool, q: &[f32], rg: &[[i32; 2]], cnt: &[i32]) -> Vec<u32> {
    let rows = c.nq.len() * c.hkv;
    let n_sub = c.cap_in * c.e;
    let mut keys = vec![0u32; rows * n_sub];
    for r in 0..rows {
        let (rb, h) = (r / c.hkv, r % c.hkv);
        let nq = c.nq[rb] as usize;
        let qr = &q[r * c.nq_max * c.d..(r + 1) * c.nq_max * c.d];
        for j in 0..n_sub {
            let (ri, ee) = (j / c.e, j % c.e);
            if ri as i32 >= cnt[r] {
                continue;
            }
            let [x, y] = rg[r * c.cap_in + ri];
            let l = x as usize + ee * c.c;
            if l >= y as usize {
                continue;
            }
            let rr = (l + c.c).min(y as usize);
            keys[r * n_sub + j] = score_key(search(c, p, qr, rb, h, l, rr, nq).0);
        }
    }
    keys
}

fn run(gpu: &GpuContext, c: &Case, seed: u64) -> R<(usize, usize, usize, usize, String)> {
    let mut rng = Rng::new(seed);
    let mut p = pool(c, &mut rng)?;
    let (rg, cnt) = ranges(c, &mut rng);
    let rows = c.nq.len() * c.hkv;
    let q = rng.normal_vec(rows * c.nq_max * c.d, 1.0);
    let go = |kv: &DeviceKv, want: ScoreKernel| {
        dispatch::score_slots(
            gpu, kv, &q, &c.nq, c.nq_max, c.nq_tpl, c.lanes, &rg, &cnt, c.cap_in, c.e, c.c, want,
        )
        .map_err(e)
    };
    let (warp, kw) = go(&p.kv, ScoreKernel::Warp)?;
    let (thread, kt) = go(&p.kv, ScoreKernel::PerThread)?;
    // The pipelined warp kernel where it applies (one lane), else the warp kernel.
    let (pipe, kp) = go(&p.kv, ScoreKernel::WarpPipe)?;
    let want_p = if c.lanes == 1 {
        ScoreKernel::WarpPipe
    } else {
        ScoreKernel::Warp
    };
    // The all-rows kernel where it applies (sub-chunks <= 32, <= 8 queries), else as pipelined.
    let (allr, ka) = go(&p.kv, ScoreKernel::AllRows)?;
    let want_a = if c.c <= 32 && c.nq_max <= 8 {
        ScoreKernel::AllRows
    } else {
        want_p
    };
    if kw != ScoreKernel::Warp || kt != ScoreKernel::PerThread || kp != want_p || ka != want_a {
        return Err(format!("score_slots ran {kw:?} / {kt:?} / {kp:?} / {ka:?}"));
    }
    let host = reference(c, &p, &q, &rg, &cnt);
    let diff = |a: &[u32], b: &[u32]| a.iter().zip(b).filter(|(x, y)| x != y).count();
    let valid = host.iter().filter(|&&k| k != 0).count();
    let (d_wt, d_wh) = (
        diff(&warp, &thread) + diff(&pipe, &thread) + diff(&allr, &thread),
        diff(&warp, &host) + diff(&pipe, &host) + diff(&allr, &host),
    );
    // Sensitivity: raise the row that gave the first valid slot's score
    // (the last level's winner) to a copy of the row's first query x 8: the
    // search path is unchanged and that score grows, so the warp kernel's
    // key must change.
    let j0 = host.iter().position(|&k| k != 0).unwrap_or(0);
    let (r0, s0) = (j0 / (c.cap_in * c.e), j0 % (c.cap_in * c.e));
    let [x, y] = rg[r0 * c.cap_in + s0 / c.e];
    let l = x as usize + (s0 % c.e) * c.c;
    let rr = (l + c.c).min(y as usize);
    let (rb, h) = (r0 / c.hkv, r0 % c.hkv);
    let qr0 = &q[r0 * c.nq_max * c.d..(r0 + 1) * c.nq_max * c.d];
    let t = search(c, &p, qr0, rb, h, l, rr, c.nq[rb] as usize).1;
    let page = p.table[rb * p.kv.table_stride + t / c.page_size] as usize;
    let off = page * p.kv.page_stride + h * p.kv.head_stride + (t % c.page_size) * c.d;
    let q0 = &qr0[..c.d];
    for (k, &x) in p.host[off..off + c.d].iter_mut().zip(q0) {
        *k = to_bits(c.dtype, x * 8.0);
    }
    p.kv.k.write(&p.host).map_err(e)?;
    let (warp2, _) = go(&p.kv, ScoreKernel::Warp)?;
    let (pipe2, _) = go(&p.kv, ScoreKernel::WarpPipe)?;
    let (allr2, _) = go(&p.kv, ScoreKernel::AllRows)?;
    let host2 = reference(c, &p, &q, &rg, &cnt);
    let moved =
        usize::from(warp2[j0] != warp[j0] && pipe2[j0] != pipe[j0] && allr2[j0] != allr[j0]);
    let d_after = diff(&warp2, &host2) + diff(&pipe2, &host2) + diff(&allr2, &host2);
    let first = (0..warp.len())
        .find(|&i| {
            warp[i] != thread[i] || warp[i] != host[i] || pipe[i] != host[i] || allr[i] != host[i]
        })
        .map(|i| {
            format!(
                " first diff slot {i}: warp {:08x} pipelined {:08x} all-rows {:08x} thread {:08x} host {:08x}",
                warp[i], pipe[i], allr[i], thread[i], host[i]
            )
        })
        .unwrap_or_default();
    Ok((d_wt, d_wh + d_after, valid, moved, first))
}

pub(crate) fn checks(gpu: &GpuContext, seed: u64) -> R<Vec<Check>> {
    let base = |dtype, d, hkv, nq: Vec<i32>, nq_max, nq_tpl, lanes| Case {
        dtype,
        d,
        hkv,
        nq,
        nq_max,
        nq_tpl,
        lanes,
        page_size: 64,
        tokens: 0,
        c: 64,
        cap_in: 1,
        e: 1,
        max_len: None,
    };
    let stage0 = |lanes, tokens| Case {
        tokens,
        e: (tokens - 1152).div_ceil(64),
        ..base(DType::Bf16, 128, 8, vec![4], 4, 4, lanes)
    };
    let later =
        |dtype, d, hkv, nq: Vec<i32>, nq_max, nq_tpl, lanes, ps, c, cap_in, e, max_len| Case {
            page_size: ps,
            tokens: 20_000,
            c,
            cap_in,
            e,
            max_len: Some(max_len),
            ..base(dtype, d, hkv, nq, nq_max, nq_tpl, lanes)
        };
    let cases: Vec<(&str, Case)> = vec![
        ("stage 0, 1 lane, q4, 70001 tok", stage0(1, 70_001)),
        ("stage 0, 4 lanes, q1, 40000 tok", stage0(4, 40_000)),
        (
            "stage 1 (c16), 4 lanes",
            later(DType::Bf16, 128, 8, vec![4], 4, 4, 4, 64, 16, 128, 4, 64),
        ),
        (
            "stage 2 (c8), 1 lane, batch 2",
            later(DType::Bf16, 128, 8, vec![4, 3], 4, 4, 1, 64, 8, 256, 2, 16),
        ),
        (
            "f16 d64 c2 token-major, nq 5/8, 1 lane q8",
            later(DType::F16, 64, 3, vec![5, 8], 8, 8, 1, 1, 2, 96, 4, 7),
        ),
        (
            "f16 d64 c2 token-major, nq 5/8, 4 lanes q2",
            later(DType::F16, 64, 3, vec![5, 8], 8, 8, 4, 1, 2, 96, 4, 7),
        ),
        (
            "bf16 d256 ps16 c64, nq 1, ranges cut at e",
            later(DType::Bf16, 256, 2, vec![1], 1, 1, 1, 16, 64, 40, 3, 250),
        ),
        (
            "f16 d128 g8 c16, 4 lanes q2",
            later(DType::F16, 128, 4, vec![8], 8, 8, 4, 64, 16, 64, 4, 64),
        ),
        (
            "f16 d128 g8 c16, 1 lane q8, nq 6",
            later(DType::F16, 128, 4, vec![6], 8, 8, 1, 64, 16, 64, 4, 64),
        ),
        (
            "bf16 d128 c12 (all-rows CP 16), nq 3, batch 2",
            later(DType::Bf16, 128, 8, vec![3, 2], 3, 4, 1, 16, 12, 100, 3, 40),
        ),
        (
            "bf16 d256 ps16 c32, nq 2",
            later(DType::Bf16, 256, 2, vec![2], 2, 2, 1, 16, 32, 60, 2, 64),
        ),
    ];
    let (mut d_wt, mut d_wh, mut valid, mut moved) = (0, 0, 0, 0);
    let mut first = String::new();
    for (i, (name, c)) in cases.iter().enumerate() {
        let (a, b, v, m, f) = run(gpu, c, seed + 100 + i as u64)?;
        if (a > 0 || b > 0 || m == 0) && first.is_empty() {
            first = format!(" (first failing case: {name}: warp!=thread {a}, !=host {b}, probe row change seen {m};{f})");
        }
        d_wt += a;
        d_wh += b;
        valid += v;
        moved += m;
    }
    Ok(vec![Check {
        name: format!(
            "hip_scorew keys == hip_scorewp (pipelined, 1-lane cases) == hip_scorea (all rows, c <= 32) \
             == hip_score keys == host reference ({} cases)",
            cases.len()
        ),
        ok: d_wt == 0 && d_wh == 0 && valid > 0 && moved == cases.len(),
        detail: format!(
            "slots differing warp / pipelined vs per-thread {d_wt}, vs host reference {d_wh} ({valid} valid slots); \
             a changed probe row moved the key in {moved} of {} cases{first}",
            cases.len()
        ),
    }])
}
