//! GPU checks of the tensor-core prefill kernel (kernels/prefill_tc.cu)
//! against its CUDA-core twin (kernels/decode.cu, one query row at a time)
//! and the f64 reference, on fresh random inputs: block selections shared
//! by query blocks (hip prefill), per-row prefix selections (the engine's
//! dense prefill), caller token-major K/V through `GpuAttention`.

use half::{bf16, f16};
use infinitehip::attention::{rel_error, AttnShape};
use infinitehip::backend::cuda::dispatch::{
    self, AttnKernel, AttnOut, DecodeWorkspace, DeviceKv, DeviceSelection,
};
use infinitehip::backend::cuda::engine_attn::{GpuAttention, QArg};
use infinitehip::backend::cuda::{DevBuf, GpuContext};
use infinitehip::config::{LayerPolicy, ModelShape, PolicyConfig};
use infinitehip::kv::{KvLayout, KvPool};
use infinitehip::policy::Selection;
use infinitehip::rng::Rng;
use infinitehip::{DType, Element};

use crate::gpu::{e, random_pool, ref_f64_lim, Check, R, ROUNDING_KERNEL_BOUND};
use crate::gpu_engine::TokenPool;

/// Sorted disjoint random ranges below `len` (a third single tokens); head
/// `empty` (if any) gets none.
fn rand_sel(rng: &mut Rng, hkv: usize, len: usize, empty: Option<usize>) -> Selection {
    let heads = (0..hkv)
        .map(|h| {
            let mut v = Vec::new();
            if Some(h) == empty {
                return v;
            }
            let mut t = rng.below(8);
            while t < len {
                let l = if rng.below(3) == 0 {
                    1
                } else {
                    1 + rng.below(40)
                };
                v.push(t..(t + l).min(len));
                t += l + 1 + rng.below(120);
            }
            v
        })
        .collect();
    Selection::from_ranges(heads)
}

/// Worst relative error (NaN sticks).
fn worse(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// The CUDA-core twin, then the tensor-core kernel forced to one and to two
/// m16 tiles per warp.
const KERNELS: [(AttnKernel, Option<usize>); 3] = [
    (AttnKernel::CudaCore, None),
    (AttnKernel::TensorCore, Some(1)),
    (AttnKernel::TensorCore, Some(2)),
];

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// Random ranges per query block (some heads empty, single tokens).
    Random,
    /// Every block selects the whole context: must equal dense causal.
    Covering,
}

/// Query rows `q_start..q_start + n` of one sequence of `len` tokens in
/// blocks of `q_block` sharing a selection, causal by position: tensor core
/// vs CUDA core (all rows) and vs f64 (sampled rows).
#[allow(clippy::too_many_arguments)]
fn block_case<T: Element>(
    gpu: &GpuContext,
    shape: AttnShape,
    ps: usize,
    len: usize,
    q_start: usize,
    n: usize,
    q_block: usize,
    kind: Kind,
    seed: u64,
) -> R<Check> {
    let mut rng = Rng::new(seed);
    let hkv = shape.n_kv_heads;
    let lay = KvLayout {
        n_kv_heads: hkv,
        head_dim: shape.head_dim,
        page_size: ps,
    };
    let pool = random_pool::<T>(lay, &[len], &mut rng)?;
    let mut kv = DeviceKv::upload(&[(&pool, 0)]).map_err(e)?;
    kv.lens = vec![q_start + n];
    let nb = n.div_ceil(q_block);
    let sels: Vec<Selection> = (0..nb)
        .map(|b| {
            let end = q_start + ((b + 1) * q_block).min(n);
            match kind {
                Kind::Random => rand_sel(&mut rng, hkv, end, (b % 3 == 1).then_some(b % hkv)),
                Kind::Covering => Selection::full(hkv, q_start + n),
            }
        })
        .collect();
    let dsel = DeviceSelection::from_host(&sels).map_err(e)?;
    let qe = shape.q_elems();
    let q = rng.normal_vec(n * qe, 1.0);
    let qd = DevBuf::from_slice(&q).map_err(e)?;
    let pos: Vec<i32> = (0..n).map(|i| (q_start + i) as i32).collect();
    let q_pos = DevBuf::from_slice(&pos).map_err(e)?;
    let q_seq = DevBuf::from_slice(&vec![0i32; n]).map_err(e)?;
    let mut outs = Vec::new();
    let mut ws = DecodeWorkspace::new();
    // The CUDA-core twin, then the tensor-core kernel with one and two m16
    // tiles per warp.
    for (k, mt) in KERNELS {
        dispatch::force_tc_tiles_per_warp(mt);
        let out = DevBuf::alloc(n * qe * 4).map_err(e)?;
        out.fill_bytes(0xff).map_err(e)?; // NaN poison: every element must be written
        dispatch::attend_with(
            gpu,
            &mut ws,
            &shape,
            &kv,
            qd.ptr,
            n,
            &dsel,
            dsel.max_tokens.max(1),
            None,
            out.ptr,
            q_block,
            q_seq.ptr,
            q_pos.ptr,
            k,
        )
        .map_err(e)?;
        gpu.synchronize().map_err(e)?;
        outs.push(out.read::<f32>(n * qe).map_err(e)?);
    }
    dispatch::force_tc_tiles_per_warp(None);
    let cc = &outs[0];
    let finite = outs.iter().flatten().all(|x| x.is_finite());
    let cc64: Vec<f64> = cc.iter().map(|&x| x as f64).collect();
    let twin = worse(rel_error(&outs[1], &cc64), rel_error(&outs[2], &cc64));
    let view = pool.view(0).map_err(e)?;
    let (mut tc_ref, mut cc_ref) = (0f64, 0f64);
    let rows: Vec<usize> = (0..n).step_by(13).chain([n - 1]).collect();
    for &i in &rows {
        let s = match kind {
            Kind::Random => Some(&sels[i / q_block]),
            Kind::Covering => None, // dense causal
        };
        let r = ref_f64_lim(&shape, &q[i * qe..(i + 1) * qe], &view, s, q_start + i + 1);
        for tc in &outs[1..] {
            tc_ref = worse(tc_ref, rel_error(&tc[i * qe..(i + 1) * qe], &r));
        }
        cc_ref = worse(cc_ref, rel_error(&cc[i * qe..(i + 1) * qe], &r));
    }
    let ok = finite && tc_ref <= ROUNDING_KERNEL_BOUND && twin <= ROUNDING_KERNEL_BOUND;
    Ok(Check {
        name: format!(
            "prefill_tc {} {} d{} g{} ps{} q_block {q_block}, rows {q_start}..{} of {len}",
            if kind == Kind::Random {
                "sparse"
            } else {
                "covering==dense"
            },
            T::DTYPE,
            shape.head_dim,
            shape.group(),
            ps,
            q_start + n
        ),
        ok,
        detail: format!(
            "tc (1 and 2 m-tiles/warp) vs f64 {tc_ref:.2e} (bound 1e-2, {} rows), tc vs cuda-core {twin:.2e} (all rows), cuda-core vs f64 {cc_ref:.2e}; all written+finite {finite}",
            rows.len()
        ),
    })
}

/// Per-row prefix selections (the engine's dense prefill) over several
/// sequences whose rows share tiles: tensor core vs CUDA core vs f64.
fn rows_case<T: Element>(
    gpu: &GpuContext,
    shape: AttnShape,
    out_dtype: DType,
    seed: u64,
) -> R<Check> {
    let mut rng = Rng::new(seed);
    let hkv = shape.n_kv_heads;
    let lens = [700usize, 130, 1, 69, 1000];
    let n_new = [300usize, 130, 1, 37, 0];
    let lay = KvLayout {
        n_kv_heads: hkv,
        head_dim: shape.head_dim,
        page_size: 16,
    };
    let pool = random_pool::<T>(lay, &lens, &mut rng)?;
    let seqs: Vec<(&KvPool<T>, u64)> = (0..lens.len()).map(|i| (&pool, i as u64)).collect();
    let kv = DeviceKv::upload(&seqs).map_err(e)?;
    let total: usize = n_new.iter().sum();
    let mut sels = Vec::new();
    let mut seq_of = Vec::new();
    let mut pos_of = Vec::new();
    for b in 0..lens.len() {
        for j in 0..n_new[b] {
            let end = lens[b] - n_new[b] + j + 1;
            sels.push(Selection::full(hkv, end));
            seq_of.push(b as i32);
            pos_of.push(end - 1);
        }
    }
    let dsel = DeviceSelection::from_host(&sels).map_err(e)?;
    let q_seq = DevBuf::from_slice(&seq_of).map_err(e)?;
    let qe = shape.q_elems();
    let q = rng.normal_vec(total * qe, 1.0);
    let qd = DevBuf::from_slice(&q).map_err(e)?;
    let esz = if out_dtype == DType::F32 { 4 } else { 2 };
    let mut outs: Vec<Vec<f32>> = Vec::new();
    let mut ws = DecodeWorkspace::new();
    for (k, mt) in KERNELS {
        dispatch::force_tc_tiles_per_warp(mt);
        let out = DevBuf::alloc(total * qe * esz).map_err(e)?;
        out.fill_bytes(0xff).map_err(e)?;
        let ao = AttnOut {
            ptr: out.ptr,
            dtype: out_dtype,
            row_stride: qe,
        };
        dispatch::attend_rows(
            gpu, &mut ws, &shape, &kv, qd.ptr, total, &dsel, q_seq.ptr, ao, k,
        )
        .map_err(e)?;
        gpu.synchronize().map_err(e)?;
        outs.push(match out_dtype {
            DType::F32 => out.read::<f32>(total * qe).map_err(e)?,
            DType::Bf16 => out
                .read::<bf16>(total * qe)
                .map_err(e)?
                .iter()
                .map(|x| x.to_f32())
                .collect(),
            DType::F16 => out
                .read::<f16>(total * qe)
                .map_err(e)?
                .iter()
                .map(|x| x.to_f32())
                .collect(),
        });
    }
    dispatch::force_tc_tiles_per_warp(None);
    let cc = &outs[0];
    let finite = outs.iter().flatten().all(|x| x.is_finite());
    let cc64: Vec<f64> = cc.iter().map(|&x| x as f64).collect();
    let twin = worse(rel_error(&outs[1], &cc64), rel_error(&outs[2], &cc64));
    let mut tc_ref = 0f64;
    let mut checked = 0;
    for i in 0..total {
        if i % 11 != 0 && i + 1 != total && seq_of[i] != 2 {
            continue;
        }
        let view = pool.view(seq_of[i] as u64).map_err(e)?;
        let r = ref_f64_lim(&shape, &q[i * qe..(i + 1) * qe], &view, None, pos_of[i] + 1);
        for tc in &outs[1..] {
            tc_ref = worse(tc_ref, rel_error(&tc[i * qe..(i + 1) * qe], &r));
        }
        checked += 1;
    }
    Ok(Check {
        name: format!(
            "prefill_tc prefix rows (engine dense) {} d{} g{} out {out_dtype}, new {n_new:?} of {lens:?}",
            T::DTYPE,
            shape.head_dim,
            shape.group()
        ),
        ok: finite && tc_ref <= ROUNDING_KERNEL_BOUND && twin <= ROUNDING_KERNEL_BOUND,
        detail: format!("tc (1 and 2 m-tiles/warp) vs f64 {tc_ref:.2e} ({checked} rows, bound 1e-2), tc vs cuda-core {twin:.2e}; all written+finite {finite}"),
    })
}

/// The engine entry (`GpuAttention::prefill`, dense layer) at a tensor-core
/// shape over caller token-major K/V with a padded slot stride (NaN in the
/// padding and unused slots), bf16 q/out: vs f64.
fn engine_case(gpu: &GpuContext, seed: u64) -> R<Check> {
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let mut cfg = PolicyConfig {
        model: ModelShape {
            n_layers: 1,
            n_q_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            ..ModelShape::default()
        },
        dense_layers: 0,
        ..PolicyConfig::default()
    };
    cfg.default = LayerPolicy::Dense;
    let mut rng = Rng::new(seed);
    let lens = [900usize, 77, 200];
    let n_new = [500usize, 77, 3];
    let lay = KvLayout {
        n_kv_heads: 8,
        head_dim: 128,
        page_size: 16,
    };
    let pool = random_pool::<bf16>(lay, &lens, &mut rng)?;
    let tp = TokenPool::from_pool(&pool, &lens, &mut rng)?;
    let mut ga = GpuAttention::new(gpu, &cfg).map_err(e)?;
    let qe = shape.q_elems();
    let total: usize = n_new.iter().sum();
    let q: Vec<bf16> = rng
        .normal_vec(total * qe, 1.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let qd = DevBuf::from_slice(&q).map_err(e)?;
    let out = DevBuf::alloc(total * qe * 2).map_err(e)?;
    out.fill_bytes(0xff).map_err(e)?;
    unsafe {
        ga.prefill(
            0,
            0,
            &tp.engine_kv(),
            &[1, 2, 3],
            &[0, 1, 2],
            &lens,
            &n_new,
            &QArg {
                ptr: qd.ptr,
                dtype: DType::Bf16,
                row_stride: qe,
            },
            &AttnOut {
                ptr: out.ptr,
                dtype: DType::Bf16,
                row_stride: qe,
            },
            None,
        )
        .map_err(e)?;
    }
    gpu.synchronize().map_err(e)?;
    let got: Vec<f32> = out
        .read::<bf16>(total * qe)
        .map_err(e)?
        .iter()
        .map(|x| x.to_f32())
        .collect();
    let mut worst = 0f64;
    let mut row = 0;
    for b in 0..lens.len() {
        let view = pool.view(b as u64).map_err(e)?;
        for j in 0..n_new[b] {
            let pos = lens[b] - n_new[b] + j;
            if j % 23 == 0 || j + 1 == n_new[b] {
                let qf: Vec<f32> = q[row * qe..(row + 1) * qe]
                    .iter()
                    .map(|x| x.to_f32())
                    .collect();
                let r = ref_f64_lim(&shape, &qf, &view, None, pos + 1);
                worst = worse(worst, rel_error(&got[row * qe..(row + 1) * qe], &r));
            }
            row += 1;
        }
    }
    let finite = got.iter().all(|x| x.is_finite());
    Ok(Check {
        name: "engine GpuAttention prefill on tensor cores (d128 g4, token-major caller K/V, bf16 q/out)".into(),
        ok: finite && worst <= ROUNDING_KERNEL_BOUND, // bf16 P (tensor cores), bf16 out
        detail: format!("rel_err vs f64 {worst:.2e} (bound 1e-2), finite {finite}"),
    })
}

/// Asking for the tensor-core kernel where it does not apply is an error.
fn refuse_case(gpu: &GpuContext) -> R<Check> {
    let shape = AttnShape::new(16, 2, 256).map_err(e)?;
    let mut rng = Rng::new(1);
    let lay = KvLayout {
        n_kv_heads: 2,
        head_dim: 256,
        page_size: 16,
    };
    let pool = random_pool::<bf16>(lay, &[40], &mut rng)?;
    let kv = DeviceKv::upload(&[(&pool, 0)]).map_err(e)?;
    let sel = DeviceSelection::from_host(&[Selection::full(2, 40)]).map_err(e)?;
    let q = DevBuf::alloc(64 * shape.q_elems() * 4).map_err(e)?;
    let out = DevBuf::alloc(64 * shape.q_elems() * 4).map_err(e)?;
    let zeros = DevBuf::from_slice(&[0i32; 64]).map_err(e)?;
    let r = dispatch::attend_with(
        gpu,
        &mut DecodeWorkspace::new(),
        &shape,
        &kv,
        q.ptr,
        40,
        &sel,
        40,
        None,
        out.ptr,
        64,
        zeros.ptr,
        zeros.ptr,
        AttnKernel::TensorCore,
    );
    let msg = r.err().map(|x| x.to_string()).unwrap_or_default();
    Ok(Check {
        name: "prefill_tc refuses head_dim 256 with an error".into(),
        ok: msg.contains("head_dim 256"),
        detail: format!("error: {msg}"),
    })
}

pub(crate) fn checks(gpu: &GpuContext, seed: u64) -> R<Vec<Check>> {
    let s = seed + 900;
    let sh = |hq, hkv, d| AttnShape::new(hq, hkv, d).map_err(e);
    use Kind::*;
    Ok(vec![
        block_case::<bf16>(gpu, sh(32, 8, 128)?, 64, 3000, 1000, 1500, 64, Random, s)?,
        block_case::<f16>(
            gpu,
            sh(32, 8, 128)?,
            64,
            3000,
            1000,
            1500,
            64,
            Random,
            s + 1,
        )?,
        block_case::<bf16>(gpu, sh(8, 8, 64)?, 16, 2000, 0, 2000, 64, Random, s + 2)?,
        block_case::<f16>(gpu, sh(16, 2, 128)?, 16, 1500, 333, 1167, 64, Random, s + 3)?,
        block_case::<bf16>(gpu, sh(16, 2, 64)?, 64, 1100, 50, 1001, 128, Random, s + 4)?,
        block_case::<bf16>(gpu, sh(8, 4, 128)?, 16, 900, 11, 700, 32, Random, s + 5)?,
        // q_block 1: every row its own selection (tiles split into segments).
        block_case::<bf16>(gpu, sh(32, 8, 128)?, 16, 600, 500, 70, 1, Random, s + 6)?,
        block_case::<bf16>(gpu, sh(16, 4, 64)?, 64, 2100, 0, 2100, 64, Covering, s + 7)?,
        block_case::<f16>(
            gpu,
            sh(32, 8, 128)?,
            16,
            4000,
            2000,
            2000,
            64,
            Covering,
            s + 8,
        )?,
        rows_case::<bf16>(gpu, sh(32, 8, 128)?, DType::Bf16, s + 9)?,
        rows_case::<f16>(gpu, sh(8, 8, 64)?, DType::F32, s + 10)?,
        rows_case::<bf16>(gpu, sh(16, 2, 128)?, DType::F16, s + 11)?,
        engine_case(gpu, s + 12)?,
        refuse_case(gpu)?,
    ])
}
