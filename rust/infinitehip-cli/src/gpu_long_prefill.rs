//! `gpu-test` check: a dense prefill of 70,000 rows at head_dim 256 (the
//! CUDA-core path, which also serves lazy/locret prefill). Its grid held the
//! row count in `gridDim.z` (limit 65,535), so such a prefill failed to
//! launch; rows now run along x (`backend::launch_grid`). Rows past 65,535
//! are compared with the f64 reference.

use half::bf16;
use infinitehip::attention::{rel_error, AttnShape};
use infinitehip::backend::cuda::dispatch::AttnOut;
use infinitehip::backend::cuda::engine_attn::{GpuAttention, QArg};
use infinitehip::backend::cuda::{DevBuf, GpuContext};
use infinitehip::config::LayerPolicy;
use infinitehip::kv::KvLayout;
use infinitehip::rng::Rng;
use infinitehip::DType;

use crate::gpu::{e, random_pool, ref_f64_lim, Check, R, STORED_KV_BOUND};
use crate::gpu_engine::{model_cfg, TokenPool};

const ROWS: usize = 70_000;

pub(crate) fn check(gpu: &GpuContext, seed: u64) -> Check {
    let name = format!(
        "engine GpuAttention dense prefill of {ROWS} rows (> 65,535), d256 g2 (CUDA-core path), f32 out"
    );
    match run(gpu, seed) {
        Ok((worst, finite, n)) => Check {
            name,
            ok: finite && worst <= STORED_KV_BOUND,
            detail: format!(
                "rel_err vs f64 {worst:.2e} over {n} rows (most past row 65,535; bound {STORED_KV_BOUND:.0e}: the reference reads the same stored K/V), all finite {finite}"
            ),
        },
        Err(msg) => Check {
            name,
            ok: false,
            detail: format!("error: {msg}"),
        },
    }
}

fn run(gpu: &GpuContext, seed: u64) -> R<(f64, bool, usize)> {
    let shape = AttnShape::new(4, 2, 256).map_err(e)?;
    let cfg = model_cfg(&shape, vec![LayerPolicy::Dense]);
    let mut rng = Rng::new(seed);
    let lay = KvLayout {
        n_kv_heads: 2,
        head_dim: 256,
        page_size: 64,
    };
    let pool = random_pool::<bf16>(lay, &[ROWS], &mut rng)?;
    let tp = TokenPool::from_pool(&pool, &[ROWS], &mut rng)?;
    let mut ga = GpuAttention::new(gpu, &cfg).map_err(e)?;
    let qe = shape.q_elems();
    let q: Vec<bf16> = rng
        .normal_vec(ROWS * qe, 1.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let qd = DevBuf::from_slice(&q).map_err(e)?;
    let out = DevBuf::alloc(ROWS * qe * 4).map_err(e)?;
    out.fill_bytes(0xff).map_err(e)?; // NaN poison: unwritten rows fail
                                      // SAFETY: every pointer is a live allocation of this context sized for
                                      // ROWS rows (q, out) and ROWS tokens (K/V, table); stream 0 is the
                                      // legacy default stream, synchronised below before any read.
    unsafe {
        ga.prefill(
            0,
            0,
            &tp.engine_kv(),
            &[1],
            &[0],
            &[ROWS],
            &[ROWS],
            &QArg {
                ptr: qd.ptr,
                dtype: DType::Bf16,
                row_stride: qe,
            },
            &AttnOut {
                ptr: out.ptr,
                dtype: DType::F32,
                row_stride: qe,
            },
            None,
        )
        .map_err(e)?;
    }
    gpu.synchronize().map_err(e)?;
    let got: Vec<f32> = out.read(ROWS * qe).map_err(e)?;
    let finite = got.iter().all(|x| x.is_finite());
    let view = pool.view(0).map_err(e)?;
    let rows: Vec<usize> = [0, 1, 4_999, 65_534, 65_535, 65_536, 65_537]
        .into_iter()
        .chain((65_600..ROWS).step_by(211))
        .chain([ROWS - 1])
        .collect();
    let mut worst = 0f64;
    for &r in &rows {
        let qf: Vec<f32> = q[r * qe..(r + 1) * qe].iter().map(|x| x.to_f32()).collect();
        let want = ref_f64_lim(&shape, &qf, &view, None, r + 1);
        let err = rel_error(&got[r * qe..(r + 1) * qe], &want);
        worst = if err.is_nan() || worst.is_nan() {
            f64::NAN
        } else {
            worst.max(err)
        };
    }
    Ok((worst, finite, rows.len()))
}
