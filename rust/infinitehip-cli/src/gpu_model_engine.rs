//! `bench-gpu-model --engine-graph`: the hip layers of the whole-model step
//! through the engines' capturable decode (`GpuAttention::decode_graph`,
//! what SGLang's decode CUDA graph replays with `--attention-backend
//! infinitehip`), on the same K/V and queries as the bench's own rows.
//!
//! SGLang advances `seq_lens` every step and the graph path reads it on the
//! device: a row whose length is not its last one + 1 starts afresh. So the
//! cycle is captured as one graph per step, step i reading lengths
//! `start + i` from its own device array (no copy inside the timed window),
//! and each timed cycle starts with the rows reset (`reset_graph_rows`, as
//! after a prefill), so step 0 refreshes every stage as in the other rows.

use infinitehip::attention::AttnShape;
use infinitehip::backend::cuda::dispatch::{AttnOut, DeviceKv};
use infinitehip::backend::cuda::engine_attn::{DevIndex, EngineKv, GpuAttention, QArg};
use infinitehip::backend::cuda::{hip_step, DevBuf, GpuContext};
use infinitehip::config::{HipConfig, LayerPolicy, PolicyConfig};
use infinitehip::DType;
use serde_json::json;

use crate::gpu::{e, R};
use crate::gpu_step::cycle_times;

/// Per-step ms of the hip layers `n_dense..n_layers` through
/// `decode_graph` (search stage 0), as JSON; `kvs[l % kvs.len()]` is layer
/// l's K/V (every sequence at its capacity), `qs[l]` its f32 queries.
#[allow(clippy::too_many_arguments)]
pub fn engine_graph(
    gpu: &GpuContext,
    cfg: &HipConfig,
    shape: &AttnShape,
    kvs: &[DeviceKv],
    qs: &[DevBuf],
    b: usize,
    n_layers: usize,
    n_dense: usize,
    cycle: usize,
    reps: usize,
) -> R<serde_json::Value> {
    let mut hip = cfg.clone();
    hip.decode_stage0 = infinitehip::config::DecodeStage0::Search;
    let mut pc = PolicyConfig {
        dense_layers: n_dense,
        default: LayerPolicy::Hip(hip),
        // Every step decodes sparsely, as the other rows (the engine route
        // would attend short contexts densely).
        decode_dense_below: 0,
        ..PolicyConfig::default()
    };
    pc.model.n_layers = n_layers;
    pc.model.n_q_heads = shape.n_q_heads;
    pc.model.n_kv_heads = shape.n_kv_heads;
    pc.model.head_dim = shape.head_dim;
    let mut att = GpuAttention::new(gpu, &pc).map_err(e)?;
    let kv0 = &kvs[0];
    att.prepare_graph(b, b, kv0.table_stride, kv0.page_size)
        .map_err(e)?;
    let cap = kv0.capacity.iter().copied().min().unwrap_or(0);
    if cap < cycle + 2 {
        return Err(format!(
            "engine graph: sequences of {cap} tokens, need > {cycle}"
        ));
    }
    let start = cap - cycle - 1;
    let rows = DevBuf::from_slice(&(0..b as i32).collect::<Vec<_>>()).map_err(e)?;
    let lens: Vec<DevBuf> = (0..cycle)
        .map(|i| DevBuf::from_slice(&vec![(start + 1 + i) as i32; b]))
        .collect::<infinitehip::Result<_>>()
        .map_err(e)?;
    let ekv = |kv: &DeviceKv| EngineKv {
        k: kv.k.ptr,
        v: kv.v.ptr,
        dtype: kv.dtype,
        table: kv.table.ptr,
        table_stride: kv.table_stride,
        page_size: kv.page_size,
        page_stride: kv.page_stride,
        head_stride: kv.head_stride,
    };
    let out = DevBuf::alloc(b * shape.q_elems() * 4).map_err(e)?;
    let stream = gpu.raw_stream();
    let idx = |ptr: u64| DevIndex { ptr, elem_bytes: 4 };
    let step = |att: &mut GpuAttention, i: usize| -> R<()> {
        for l in n_dense..n_layers {
            let q = QArg {
                ptr: qs[l].ptr,
                dtype: DType::F32,
                row_stride: shape.q_elems(),
            };
            // SAFETY: rows / lens hold b i32 on the device, the K/V and its
            // table are kvs[..]'s (b rows of `cap` tokens, lengths <= cap),
            // q and out hold b rows of the shape's f32 queries.
            unsafe {
                att.decode_graph(
                    stream,
                    l,
                    &ekv(&kvs[l % kvs.len()]),
                    b,
                    idx(rows.ptr),
                    idx(lens[i].ptr),
                    &q,
                    &AttnOut::f32_rows(out.ptr, shape),
                    None,
                )
            }
            .map_err(e)?;
        }
        Ok(())
    };
    let all_rows: Vec<usize> = (0..b).collect();
    // Eager once per step (kernels loaded before capture), then one graph
    // per step of the cycle.
    att.reset_graph_rows(gpu, &all_rows).map_err(e)?;
    for i in 0..cycle {
        step(&mut att, i)?;
    }
    gpu.synchronize().map_err(e)?;
    let graphs = (0..cycle)
        .map(|i| {
            hip_step::capture(gpu, || {
                step(&mut att, i).map_err(infinitehip::Error::Invalid)
            })
            .map_err(e)
        })
        .collect::<R<Vec<_>>>()?;
    let t = cycle_times(gpu, cycle, reps, &mut |i| match i {
        None => att.reset_graph_rows(gpu, &all_rows).map_err(e),
        Some(i) => graphs[i].launch().map_err(e),
    })?;
    let n_hip = (n_layers - n_dense).max(1) as f64;
    let per_layer_us: Vec<f64> = t.iter().map(|ms| ms * 1e3 / n_hip).collect();
    let amort = per_layer_us.iter().sum::<f64>() / per_layer_us.len() as f64;
    Ok(json!({
        "path": "GpuAttention::decode_graph, one CUDA graph per step",
        "decode_stage0": "search",
        "hip_step_ms_by_cycle": t,
        "hip_layer_us_by_cycle": per_layer_us,
        "hip_layer_amortised_us": amort,
    }))
}
