//! `gpu-test --rope-only`, engine path: hip's RoPE modes in
//! `GpuAttention::decode` (the route of SGLang on CUDA and llama.cpp's CUDA
//! route; engine_attn/rope.rs) vs the CPU `HipPolicy`, with the checks of
//! `gpu_rope::rope_case` (selections equal; streaming output within
//! `STORED_KV_BOUND` of the stored-rotation f64 reference; one dropped
//! token must miss it; NaN-poisoned outputs; a covering budget equals the
//! CPU's dense streaming attention). K/V live in a caller-style token-major
//! pool (`gpu_engine::TokenPool`: shuffled slots, padded stride) whose
//! table rows are in reverse batch order, so a gather or scorer that reads
//! table row b instead of the request's row fails. Then the refusals: a
//! prefill past `model.max_position`, CUDA-graph preparation, streaming with
//! split-combine attention. `timing`: the mean `GpuAttention::decode` step
//! of original positions vs each mode (with `--rope-timing`).

use half::bf16;
use infinitehip::attention::AttnShape;
use infinitehip::backend::cuda::dispatch::{AttnOut, HipAttention};
use infinitehip::backend::cuda::engine_attn::{GpuAttention, QArg};
use infinitehip::backend::cuda::{DevBuf, GpuContext};
use infinitehip::config::{
    HipConfig, HipStage, LayerOverride, LayerPolicy, ModelShape, PolicyConfig, RopeConfig, RopeMode,
};
use infinitehip::kv::{KvLayout, KvPool};
use infinitehip::policy::Selection;
use infinitehip::rng::Rng;
use infinitehip::rope::RopeLayout;
use infinitehip::workload::NeedleSeq;
use infinitehip::DType;

use crate::gpu::{e, Check, R};
use crate::gpu_engine::TokenPool;
use crate::gpu_rope::{cfg, rope_case, MakeRoute, Progress, RopeRoute};

/// One hip layer with `hip`, every layer hip (`dense_layers` 0), the
/// model's RoPE in `model`.
fn engine_cfg(model: &ModelShape, hip: &HipConfig) -> PolicyConfig {
    PolicyConfig {
        model: ModelShape {
            n_layers: 1,
            ..*model
        },
        dense_layers: 0,
        default: LayerPolicy::Hip(hip.clone()),
        ..PolicyConfig::default()
    }
}

struct EngineRoute {
    ga: GpuAttention,
    tp: TokenPool,
    /// Request b's table row (reverse order).
    rows: Vec<usize>,
    ids: Vec<u64>,
    stream: u64,
    /// llama.cpp's NORM layout: the pool's keys are stored interleaved, and
    /// each step's queries are permuted the same way into `qi` first.
    interleaved: Option<DevBuf>,
    /// The engines' flow (`engine_flow_route`): before the first decode a
    /// chunked prefill of every request's last tokens on every layer, and
    /// each step decodes layer 0 (the other scoring mode, output dropped)
    /// before the checked layer 1.
    flow: Option<Flow>,
}

struct Flow {
    prefill_pending: bool,
    scratch: DevBuf,
}

/// One head from the halves layout (the CPU policy's, i with i + d/2) to
/// the interleaved one (llama.cpp's NORM, 2i with 2i + 1). Dot products
/// are unchanged, so selections must equal the CPU policy's exactly.
pub(crate) fn halves_to_interleaved<T: Copy>(x: &[T], d: usize) -> Vec<T> {
    let half = d / 2;
    x.chunks(d)
        .flat_map(|h| {
            (0..d).map(move |j| {
                if j % 2 == 0 {
                    h[j / 2]
                } else {
                    h[half + j / 2]
                }
            })
        })
        .collect()
}

impl RopeRoute for EngineRoute {
    fn label(&self) -> &'static str {
        match (self.interleaved.is_some(), self.flow.is_some()) {
            (true, false) => "GpuAttention (llama.cpp NORM layout: keys and queries interleaved)",
            (true, true) => "GpuAttention (llama.cpp NORM layout; engine flow: prefill first, layer 1 after layer 0 of the other scoring)",
            (false, false) => "GpuAttention",
            (false, true) => "GpuAttention (engine flow: prefill first, layer 1 after layer 0 of the other scoring)",
        }
    }
    fn step(
        &mut self,
        gpu: &GpuContext,
        shape: &AttnShape,
        lens: &[usize],
        qd: &DevBuf,
        out: &DevBuf,
    ) -> R<Vec<Selection>> {
        let qe = shape.q_elems();
        let qptr = match &self.interleaved {
            None => qd.ptr,
            Some(qi) => {
                let q: Vec<f32> = qd.read(lens.len() * qe).map_err(e)?;
                qi.write(&halves_to_interleaved(&q, shape.head_dim))
                    .map_err(e)?;
                qi.ptr
            }
        };
        let layer = match &mut self.flow {
            None => 0,
            Some(f) => {
                if f.prefill_pending {
                    f.prefill_pending = false;
                    engine_prefill(
                        gpu,
                        &mut self.ga,
                        &self.tp,
                        &self.ids,
                        &self.rows,
                        lens,
                        shape,
                    )?;
                }
                // SAFETY: as below; the scratch holds `lens.len()` rows.
                unsafe {
                    self.ga.decode(
                        self.stream,
                        0,
                        &self.tp.engine_kv(),
                        &self.ids,
                        &self.rows,
                        lens,
                        &QArg {
                            ptr: qptr,
                            dtype: DType::F32,
                            row_stride: qe,
                        },
                        &AttnOut {
                            ptr: f.scratch.ptr,
                            dtype: DType::F32,
                            row_stride: qe,
                        },
                        None,
                    )
                }
                .map_err(e)?;
                1
            }
        };
        // SAFETY: q, out and the pool are device buffers of this context,
        // sized for `lens.len()` rows and the pool's sequences.
        unsafe {
            self.ga.decode(
                self.stream,
                layer,
                &self.tp.engine_kv(),
                &self.ids,
                &self.rows,
                lens,
                &QArg {
                    ptr: qptr,
                    dtype: DType::F32,
                    row_stride: qe,
                },
                &AttnOut {
                    ptr: out.ptr,
                    dtype: DType::F32,
                    row_stride: qe,
                },
                None,
            )
        }
        .map_err(e)?;
        gpu.synchronize().map_err(e)?;
        self.ga.last_selection().map_err(e)
    }
}

/// The engines' prefill before their first decode: per request the last
/// min(512, len - 1) tokens before the first decode position, as one
/// chunk, on both layers (random queries; outputs dropped). Past
/// `model.max_position` this runs the RoPE-mode sparse prefill and resets
/// the requests' hip state, as SGLang's extend and llama.cpp's ubatches do.
fn engine_prefill(
    gpu: &GpuContext,
    ga: &mut GpuAttention,
    tp: &TokenPool,
    ids: &[u64],
    rows: &[usize],
    lens: &[usize],
    shape: &AttnShape,
) -> R<()> {
    let qe = shape.q_elems();
    let plens: Vec<usize> = lens.iter().map(|&l| l - 1).collect();
    let n_new: Vec<usize> = plens.iter().map(|&l| l.min(512)).collect();
    let rows_n: usize = n_new.iter().sum();
    let mut rng = Rng::new(0xf10e);
    let q = DevBuf::from_slice(&rng.normal_vec(rows_n * qe, 1.0)).map_err(e)?;
    let o = DevBuf::alloc(rows_n * qe * 4).map_err(e)?;
    for layer in 0..2 {
        // SAFETY: q/o hold the rows of every request's chunk; the pool
        // holds each request's `lens` tokens.
        unsafe {
            ga.prefill(
                gpu.raw_stream(),
                layer,
                &tp.engine_kv(),
                ids,
                rows,
                &plens,
                &n_new,
                &QArg {
                    ptr: q.ptr,
                    dtype: DType::F32,
                    row_stride: qe,
                },
                &AttnOut {
                    ptr: o.ptr,
                    dtype: DType::F32,
                    row_stride: qe,
                },
                None,
            )
        }
        .map_err(e)?;
    }
    gpu.synchronize().map_err(e)
}

/// The sequences in a token-major pool, sequence b at table row n - 1 - b.
fn engine_route(
    gpu: &GpuContext,
    full: &[NeedleSeq<bf16>],
    shape: &AttnShape,
    hip: &HipConfig,
    model: &ModelShape,
) -> R<Box<dyn RopeRoute>> {
    engine_route_with(gpu, full, shape, hip, model, false, false)
}

/// `engine_route` in the engines' flow (`Flow`): two layers, a prefill
/// first. The gpu-test cases above start decode cold on one layer; SGLang's
/// and llama.cpp's RoPE-mode GPU routes disagreed with their CPU routes in
/// decode (2026-12-05) while those passed.
fn engine_flow_route(
    gpu: &GpuContext,
    full: &[NeedleSeq<bf16>],
    shape: &AttnShape,
    hip: &HipConfig,
    model: &ModelShape,
) -> R<Box<dyn RopeRoute>> {
    engine_route_with(gpu, full, shape, hip, model, false, true)
}

/// `engine_flow_route` in llama.cpp's NORM layout.
fn engine_flow_route_interleaved(
    gpu: &GpuContext,
    full: &[NeedleSeq<bf16>],
    shape: &AttnShape,
    hip: &HipConfig,
    model: &ModelShape,
) -> R<Box<dyn RopeRoute>> {
    engine_route_with(gpu, full, shape, hip, model, true, true)
}

/// `engine_route` with the keys and queries in llama.cpp's NORM layout
/// (`GpuAttention::set_rope_layout`, as its CUDA route sets it).
fn engine_route_interleaved(
    gpu: &GpuContext,
    full: &[NeedleSeq<bf16>],
    shape: &AttnShape,
    hip: &HipConfig,
    model: &ModelShape,
) -> R<Box<dyn RopeRoute>> {
    engine_route_with(gpu, full, shape, hip, model, true, false)
}

fn engine_route_with(
    gpu: &GpuContext,
    full: &[NeedleSeq<bf16>],
    shape: &AttnShape,
    hip: &HipConfig,
    model: &ModelShape,
    interleaved: bool,
    flow: bool,
) -> R<Box<dyn RopeRoute>> {
    let n = full.len();
    let lay = KvLayout {
        n_kv_heads: shape.n_kv_heads,
        head_dim: shape.head_dim,
        page_size: 64,
    };
    let mut pool = KvPool::<bf16>::new(lay, None).map_err(e)?;
    let mut lens = Vec::with_capacity(n);
    for j in 0..n {
        let src = &full[n - 1 - j];
        let len = src.pool.seq_len(src.seq).map_err(e)?;
        let (k, v) = src.pool.read(src.seq, 0, len).map_err(e)?;
        let k = if interleaved {
            halves_to_interleaved(&k, shape.head_dim)
        } else {
            k
        };
        pool.add_sequence(j as u64).map_err(e)?;
        pool.append(j as u64, &k, &v).map_err(e)?;
        lens.push(len);
    }
    let mut rng = Rng::new(0x5eed ^ n as u64);
    let tp = TokenPool::from_pool(&pool, &lens, &mut rng)?;
    let pc = if flow {
        two_layer_cfg(model, hip)
    } else {
        engine_cfg(model, hip)
    };
    let mut ga = GpuAttention::new(gpu, &pc).map_err(e)?;
    let qi = if interleaved {
        ga.set_rope_layout(RopeLayout {
            interleaved: true,
            freq_base: model.rope_theta,
            freq_scale: 1.0,
        })
        .map_err(e)?;
        Some(DevBuf::alloc(n * shape.q_elems() * 4).map_err(e)?)
    } else {
        None
    };
    Ok(Box::new(EngineRoute {
        ga,
        tp,
        rows: (0..n).map(|b| n - 1 - b).collect(),
        ids: (0..n).map(|b| 700 + b as u64).collect(),
        stream: gpu.raw_stream(),
        interleaved: qi,
        flow: if flow {
            Some(Flow {
                prefill_pending: true,
                scratch: DevBuf::alloc(n * shape.q_elems() * 4).map_err(e)?,
            })
        } else {
            None
        },
    }))
}

/// Layer 1 `hip`, layer 0 the same with the other scoring mode (SGLang's
/// RoPE test model: chunk_indexed then relative).
fn two_layer_cfg(model: &ModelShape, hip: &HipConfig) -> PolicyConfig {
    use RopeMode::*;
    let mut other = hip.clone();
    other.rope.scoring = match hip.rope.scoring {
        ChunkIndexed => Relative,
        _ => ChunkIndexed,
    };
    PolicyConfig {
        model: ModelShape {
            n_layers: 2,
            ..*model
        },
        overrides: vec![LayerOverride {
            layers: vec![0],
            policy: LayerPolicy::Hip(other),
        }],
        ..engine_cfg(model, hip)
    }
}

/// A hip config of the engines' tests: `stages` as (chunk, keep, refresh).
fn engine_test_hip(
    sink: usize,
    window: usize,
    stages: &[(usize, usize, usize)],
    scoring: RopeMode,
) -> HipConfig {
    HipConfig {
        sink,
        window,
        stages: stages
            .iter()
            .map(|&(chunk_size, keep_tokens, refresh_interval)| HipStage {
                chunk_size,
                keep_tokens,
                refresh_interval,
            })
            .collect(),
        rope: RopeConfig {
            scoring,
            attention: RopeMode::Streaming,
        },
        ..HipConfig::default()
    }
}

/// The engine path's refusals, each must name what is missing.
fn refusals(gpu: &GpuContext) -> R<Vec<Check>> {
    let shape = AttnShape::new(8, 2, 64).map_err(e)?;
    let model = ModelShape {
        n_layers: 1,
        n_q_heads: 8,
        n_kv_heads: 2,
        head_dim: 64,
        rope_theta: 10000.0,
        max_position: 1024,
    };
    let hip = cfg(
        RopeMode::ChunkIndexed,
        RopeMode::Streaming,
        [1024, 512, 256],
    );
    let mut out = Vec::new();
    let lens = [3000usize];
    let mut rng = Rng::new(17);
    let lay = KvLayout {
        n_kv_heads: 2,
        head_dim: 64,
        page_size: 64,
    };
    let pool = crate::gpu::random_pool::<bf16>(lay, &lens, &mut rng)?;
    let tp = TokenPool::from_pool(&pool, &lens, &mut rng)?;
    let qe = shape.q_elems();
    let q = DevBuf::from_slice(&rng.normal_vec(lens[0] * qe, 1.0)).map_err(e)?;
    let o = DevBuf::alloc(lens[0] * qe * 4).map_err(e)?;
    let qa = QArg {
        ptr: q.ptr,
        dtype: DType::F32,
        row_stride: qe,
    };
    let oa = AttnOut {
        ptr: o.ptr,
        dtype: DType::F32,
        row_stride: qe,
    };
    let mut ga = GpuAttention::new(gpu, &engine_cfg(&model, &hip)).map_err(e)?;
    let raw = gpu.raw_stream();
    let prefill = |ga: &mut GpuAttention, len: usize, n: usize| -> String {
        // SAFETY: q/o hold lens[0] rows; the pool holds lens[0] tokens.
        unsafe {
            ga.prefill(
                raw,
                0,
                &tp.engine_kv(),
                &[1],
                &[0],
                &[len],
                &[n],
                &qa,
                &oa,
                None,
            )
        }
        .err()
        .map(|x| x.to_string())
        .unwrap_or_default()
    };
    // Within the trained length: dense prefill runs; past it: the
    // RoPE-mode sparse prefill runs (gpu_rope_prefill checks its output).
    let ok_in = prefill(&mut ga, 1024, 1024);
    let past = prefill(&mut ga, 3000, 512);
    out.push(Check {
        name: "GpuAttention RoPE modes: prefill runs within model.max_position (dense) and past it (RoPE-mode sparse prefill)"
            .into(),
        ok: ok_in.is_empty() && past.is_empty(),
        detail: format!("within: {ok_in:?}; past: {past:?}"),
    });
    let g = ga
        .prepare_graph(4, 4, 4096, 1)
        .err()
        .map(|x| x.to_string())
        .unwrap_or_default();
    out.push(Check {
        name: "GpuAttention RoPE modes: CUDA-graph decode refused".into(),
        ok: g.contains("CUDA-graph") && g.contains("layer 0"),
        detail: g,
    });
    ga.set_hip_attention(Some(HipAttention::SplitCombine));
    // SAFETY: as above, one decode row.
    let sc = unsafe {
        ga.decode(
            raw,
            0,
            &tp.engine_kv(),
            &[1],
            &[0],
            &[lens[0]],
            &qa,
            &oa,
            None,
        )
    }
    .err()
    .map(|x| x.to_string())
    .unwrap_or_default();
    out.push(Check {
        name: "GpuAttention RoPE modes: streaming with split-combine attention refused".into(),
        ok: sc.contains("sparse v2"),
        detail: sc,
    });
    Ok(out)
}

/// The engine-path checks, each reported as it finishes (`c`).
pub(crate) fn checks(gpu: &GpuContext, seed: u64, c: &mut Progress) -> R<()> {
    use RopeMode::*;
    c.extend(refusals(gpu)?);
    let llama = AttnShape::new(32, 8, 128).map_err(e)?;
    let small = AttnShape::new(8, 2, 64).map_err(e)?;
    let keep = [1024, 512, 256];
    c.push(rope_case::<bf16>(
        gpu,
        engine_route,
        llama,
        cfg(ChunkIndexed, Streaming, keep),
        8192,
        &[20000, 7001, 3000],
        17,
        false,
        seed + 1,
    )?);
    c.push(rope_case::<bf16>(
        gpu,
        engine_route,
        small,
        cfg(Relative, Streaming, keep),
        8192,
        &[20000, 9000, 5000],
        17,
        false,
        seed + 2,
    )?);
    c.push(rope_case::<bf16>(
        gpu,
        engine_route,
        small,
        cfg(Relative, Original, keep),
        4096,
        &[12000, 3000],
        9,
        false,
        seed + 3,
    )?);
    // llama.cpp's NORM layout (its CUDA route): keys and queries
    // interleaved, GpuAttention::set_rope_layout; the CPU policy reads the
    // same keys in halves, so selections must match exactly.
    c.push(rope_case::<bf16>(
        gpu,
        engine_route_interleaved,
        llama,
        cfg(ChunkIndexed, Streaming, keep),
        8192,
        &[20000, 7001, 3000],
        17,
        false,
        seed + 21,
    )?);
    c.push(rope_case::<bf16>(
        gpu,
        engine_route_interleaved,
        small,
        cfg(Relative, Streaming, keep),
        4096,
        &[16000, 5000],
        17,
        false,
        seed + 22,
    )?);
    c.push(rope_case::<bf16>(
        gpu,
        engine_route_interleaved,
        small,
        cfg(ChunkIndexed, Original, keep),
        4096,
        &[9000, 3000],
        9,
        false,
        seed + 23,
    )?);
    c.push(rope_case::<bf16>(
        gpu,
        engine_route_interleaved,
        llama,
        cfg(ChunkIndexed, Streaming, [8192, 8192, 8192]),
        1024,
        &[3000, 1500],
        5,
        true,
        seed + 24,
    )?);
    // The engines' RoPE tests' configs (d64, 8 q / 2 kv heads, trained
    // length 256), cold one-layer decode and the engines' flow (two
    // layers, prefill first): llama.cpp's gpu_test.py section 12 (NORM
    // layout) and SGLang's test_backend_rope (halves). Issue 12's
    // 2026-12-05 run: both engines' GPU routes left their CPU routes in
    // decode; these bisect config from flow.
    let llama_stages = [(32, 512, 8), (8, 128, 4)];
    let sgl_stages = [(16, 128, 4), (4, 64, 1)];
    for (make, s0) in [
        (engine_route_interleaved as MakeRoute<bf16>, 40u64),
        (engine_flow_route_interleaved, 50),
    ] {
        for (j, sc) in [ChunkIndexed, Relative].into_iter().enumerate() {
            c.push(rope_case::<bf16>(
                gpu,
                make,
                small,
                engine_test_hip(16, 128, &llama_stages, sc),
                256,
                &[2048, 1200],
                48,
                false,
                seed + s0 + j as u64,
            )?);
        }
    }
    for (make, s) in [
        (engine_route as MakeRoute<bf16>, 60u64),
        (engine_flow_route, 61),
    ] {
        c.push(rope_case::<bf16>(
            gpu,
            make,
            small,
            engine_test_hip(16, 64, &sgl_stages, ChunkIndexed),
            256,
            &[1300, 1030, 200],
            16,
            false,
            seed + s,
        )?);
    }
    // Covering budget: every token selected; equals dense streaming.
    c.push(rope_case::<bf16>(
        gpu,
        engine_route,
        llama,
        cfg(ChunkIndexed, Streaming, [8192, 8192, 8192]),
        1024,
        &[3000, 1500],
        5,
        true,
        seed + 6,
    )?);
    Ok(())
}

/// Mean `GpuAttention::decode` call (one hip layer, batch 1, 64 calls after
/// 16 warm-up: every refresh phase) of original positions vs the RoPE
/// modes, Llama-3.1-8B heads, paper stages, device-random paged K/V; the
/// engine-path twin of `gpu_rope::timing`.
pub(crate) fn timing(gpu: &GpuContext, lens: &[usize]) -> R<()> {
    use RopeMode::*;
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let qe = shape.q_elems();
    println!("rope engine timing: mean GpuAttention::decode call (64 after 16 warm-up), batch 1, 32 q / 8 kv heads, d128, bf16, paper stages; max_position 32768");
    println!(
        "{:>9} {:>26} {:>12} {:>10}",
        "tokens", "modes", "us/call", "vs orig"
    );
    let model = ModelShape {
        n_layers: 1,
        n_q_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        rope_theta: 500000.0,
        max_position: 32768,
    };
    for &len in lens {
        let kv = infinitehip::backend::cuda::dense_decode::random_device_kv(
            gpu,
            1,
            len + 80,
            8,
            128,
            DType::Bf16,
            64,
            7,
        )
        .map_err(e)?;
        let ekv = infinitehip::backend::cuda::engine_attn::EngineKv {
            k: kv.k.ptr,
            v: kv.v.ptr,
            dtype: kv.dtype,
            table: kv.table.ptr,
            table_stride: kv.table_stride,
            page_size: kv.page_size,
            page_stride: kv.page_stride,
            head_stride: kv.head_stride,
        };
        let mut rng = Rng::new(11);
        let qd = DevBuf::from_slice(&rng.normal_vec(qe, 1.0)).map_err(e)?;
        let out = DevBuf::alloc(qe * 4).map_err(e)?;
        let mut base = 0f64;
        for (sc, at) in [
            (Original, Original),
            (ChunkIndexed, Original),
            (Relative, Original),
            (Original, Streaming),
            (ChunkIndexed, Streaming),
            (Relative, Streaming),
        ] {
            let hip = HipConfig {
                rope: infinitehip::config::RopeConfig {
                    scoring: sc,
                    attention: at,
                },
                ..HipConfig::default()
            };
            let mut ga = GpuAttention::new(gpu, &engine_cfg(&model, &hip)).map_err(e)?;
            let mut t = 0f64;
            for i in 0..80 {
                if i == 16 {
                    gpu.synchronize().map_err(e)?;
                }
                let t0 = std::time::Instant::now();
                // SAFETY: q/out hold one row; the K/V one sequence of len + 80 tokens.
                unsafe {
                    ga.decode(
                        gpu.raw_stream(),
                        0,
                        &ekv,
                        &[1],
                        &[0],
                        &[len + i],
                        &QArg {
                            ptr: qd.ptr,
                            dtype: DType::F32,
                            row_stride: qe,
                        },
                        &AttnOut {
                            ptr: out.ptr,
                            dtype: DType::F32,
                            row_stride: qe,
                        },
                        None,
                    )
                }
                .map_err(e)?;
                if i >= 16 {
                    gpu.synchronize().map_err(e)?;
                    t += t0.elapsed().as_secs_f64();
                }
            }
            let got: Vec<f32> = out.read(qe).map_err(e)?;
            if !got.iter().all(|x| x.is_finite()) {
                return Err(format!(
                    "rope engine timing {len} {sc:?}/{at:?}: non-finite output"
                ));
            }
            let us = t / 64.0 * 1e6;
            if sc == Original && at == Original {
                base = us;
            }
            println!(
                "{len:>9} {:>26} {us:>12.1} {:>9.2}x",
                format!("{sc:?}/{at:?}"),
                us / base
            );
        }
    }
    Ok(())
}
