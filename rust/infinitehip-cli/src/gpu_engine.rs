//! `gpu-test` checks of the engine-facing GPU path: K/V borrowed from a
//! caller's token-major pool (SGLang's `[slots][kv_heads][D]` with a
//! shuffled `req_to_token`), the caller's stream, bf16 q/out, and
//! `engine_attn::GpuAttention` against the plugin-owned path
//! (`HipGpuDecoder`, `dispatch::decode`) and the f64 reference.

use half::bf16;
use infinitehip::attention::{rel_error, AttnShape};
use infinitehip::backend::cuda::dispatch::{
    self, AttnOut, DecodeWorkspace, DeviceKv, DeviceSelection, HipGpuDecoder,
};
use infinitehip::backend::cuda::engine_attn::{EngineKv, GpuAttention, QArg};
use infinitehip::backend::cuda::{DevBuf, GpuContext};
use infinitehip::config::{HipConfig, LayerPolicy, ModelShape, PolicyConfig};
use infinitehip::kv::{KvLayout, KvPool};
use infinitehip::policy::Selection;
use infinitehip::rng::Rng;
use infinitehip::DType;

use crate::gpu::{e, random_pool, ref_f64, small_hip, time_ms, Check, R};

/// A caller-style token-major pool: slot `s` holds one token's K (or V) for
/// every KV head at `s * slot_stride + h * head_dim`; slot 0 is padding;
/// `table[b * table_stride + t]` is token t's slot (shuffled).
pub(crate) struct TokenPool {
    pub k: DevBuf,
    pub v: DevBuf,
    pub table: DevBuf,
    pub table_stride: usize,
    pub slot_stride: usize,
    pub head_dim: usize,
}

impl TokenPool {
    pub fn from_pool(pool: &KvPool<bf16>, lens: &[usize], rng: &mut Rng) -> R<Self> {
        let lay = pool.layout();
        let (hkv, d) = (lay.n_kv_heads, lay.head_dim);
        // Padded slot stride (proves the stride is honoured).
        let slot_stride = hkv * d + 8;
        let total: usize = lens.iter().sum();
        let n_slots = total + 1 + 7;
        let mut perm: Vec<usize> = (1..n_slots).collect();
        for i in (1..perm.len()).rev() {
            let j = rng.below(i + 1);
            perm.swap(i, j);
        }
        let table_stride = lens.iter().max().copied().unwrap_or(1) + 3;
        let mut table = vec![0i32; lens.len() * table_stride];
        let mut kh = vec![bf16::from_f32(f32::NAN); n_slots * slot_stride];
        let mut vh = kh.clone();
        let mut next = 0;
        for (b, &len) in lens.iter().enumerate() {
            let (k, v) = pool.read(b as u64, 0, len).map_err(e)?;
            for t in 0..len {
                let s = perm[next];
                next += 1;
                table[b * table_stride + t] = s as i32;
                let src = t * hkv * d;
                kh[s * slot_stride..s * slot_stride + hkv * d]
                    .copy_from_slice(&k[src..src + hkv * d]);
                vh[s * slot_stride..s * slot_stride + hkv * d]
                    .copy_from_slice(&v[src..src + hkv * d]);
            }
        }
        Ok(TokenPool {
            k: DevBuf::from_slice(&kh).map_err(e)?,
            v: DevBuf::from_slice(&vh).map_err(e)?,
            table: DevBuf::from_slice(&table).map_err(e)?,
            table_stride,
            slot_stride,
            head_dim: d,
        })
    }

    pub fn engine_kv(&self) -> EngineKv {
        EngineKv {
            k: self.k.ptr,
            v: self.v.ptr,
            dtype: DType::Bf16,
            table: self.table.ptr,
            table_stride: self.table_stride,
            page_size: 1,
            page_stride: self.slot_stride,
            head_stride: self.head_dim,
        }
    }

    pub fn device_kv(&self, hkv: usize, lens: Vec<usize>) -> R<DeviceKv> {
        DeviceKv::borrowed(
            self.k.ptr,
            self.v.ptr,
            DType::Bf16,
            self.table.ptr,
            self.table_stride,
            1,
            self.slot_stride,
            self.head_dim,
            hkv,
            self.head_dim,
            lens,
        )
        .map_err(e)
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Borrowed token-major K/V (shuffled slots, padded stride) gives the
/// same bits as the uploaded plugin-layout K/V, on the context's stream and
/// on a second (caller) stream.
fn borrowed_case(gpu: &GpuContext, shape: AttnShape, seed: u64) -> R<Check> {
    let mut rng = Rng::new(seed);
    let lens = [1usize, 300, 4099, 7000];
    let lay = KvLayout {
        n_kv_heads: shape.n_kv_heads,
        head_dim: shape.head_dim,
        page_size: 64,
    };
    let pool = random_pool::<bf16>(lay, &lens, &mut rng)?;
    let seqs: Vec<(&KvPool<bf16>, u64)> = (0..lens.len()).map(|i| (&pool, i as u64)).collect();
    let owned = DeviceKv::upload(&seqs).map_err(e)?;
    let tp = TokenPool::from_pool(&pool, &lens, &mut rng)?;
    let borrowed = tp.device_kv(shape.n_kv_heads, lens.to_vec())?;
    let sels: Vec<Selection> = lens
        .iter()
        .map(|&l| Selection::full(shape.n_kv_heads, l))
        .collect();
    let dsel = DeviceSelection::for_kv(&owned, &sels).map_err(e)?;
    let q = rng.normal_vec(lens.len() * shape.q_elems(), 1.0);
    let qd = DevBuf::from_slice(&q).map_err(e)?;
    let run = |g: &GpuContext, kv: &DeviceKv| -> R<Vec<f32>> {
        let out = DevBuf::alloc(q.len() * 4).map_err(e)?;
        out.fill_bytes(0xff).map_err(e)?;
        let mut ws = DecodeWorkspace::new();
        dispatch::decode(
            g,
            &mut ws,
            &shape,
            kv,
            qd.ptr,
            &dsel,
            dsel.max_tokens,
            Some(512),
            out.ptr,
        )
        .map_err(e)?;
        g.synchronize().map_err(e)?;
        out.read(q.len()).map_err(e)
    };
    let a = run(gpu, &owned)?;
    let b = run(gpu, &borrowed)?;
    let side = gpu.ctx.new_stream().map_err(e)?;
    let g2 = unsafe { gpu.on_stream(side.cu_stream() as u64) };
    let c = run(&g2, &borrowed)?;
    let same = bits(&a) == bits(&b) && bits(&a) == bits(&c);
    let finite = a.iter().all(|x| x.is_finite());
    // And both against the f64 reference.
    let qe = shape.q_elems();
    let mut worst = 0f64;
    for (i, sel) in sels.iter().enumerate() {
        let view = pool.view(i as u64).map_err(e)?;
        let r = ref_f64(&shape, &q[i * qe..(i + 1) * qe], &view, Some(sel));
        worst = worst.max(rel_error(&b[i * qe..(i + 1) * qe], &r));
    }
    Ok(Check {
        name: format!(
            "borrowed token-major KV == owned KV (bits), caller stream, d{} g{}",
            shape.head_dim,
            shape.group()
        ),
        ok: same && finite && worst <= 1e-2,
        detail: format!("bit-identical {same}, finite {finite}, rel_err vs f64 {worst:.2e}"),
    })
}

pub(crate) fn model_cfg(shape: &AttnShape, layers: Vec<LayerPolicy>) -> PolicyConfig {
    let mut c = PolicyConfig {
        model: ModelShape {
            n_layers: layers.len(),
            n_q_heads: shape.n_q_heads,
            n_kv_heads: shape.n_kv_heads,
            head_dim: shape.head_dim,
            ..ModelShape::default()
        },
        dense_layers: 0,
        ..PolicyConfig::default()
    };
    c.default = LayerPolicy::Dense;
    c.overrides = layers
        .into_iter()
        .enumerate()
        .map(|(i, p)| infinitehip::config::LayerOverride {
            layers: vec![i],
            policy: p,
        })
        .collect();
    c
}

fn bf16_bits(x: &[f32]) -> Vec<u16> {
    x.iter().map(|&v| bf16::from_f32(v).to_bits()).collect()
}

/// GpuAttention (bf16 q in, f32 and bf16 out, caller stream, token-major
/// borrowed pool): layer 0 dense vs the f64 reference; layer 1 hip, a
/// batch whose requests join at different steps, each compared bit for bit
/// with its own batch-1 `HipGpuDecoder` over the uploaded pool; layer 2 hip
/// with a covering budget vs the dense f64 reference; bf16 out == f32 out
/// rounded.
fn engine_case(gpu: &GpuContext, seed: u64) -> R<Vec<Check>> {
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let hip = small_hip();
    let mut cover = HipConfig {
        sink: 16,
        window: 64,
        ..small_hip()
    };
    for st in &mut cover.stages {
        st.keep_tokens = 1 << 16;
    }
    let cfg = model_cfg(
        &shape,
        vec![
            LayerPolicy::Dense,
            LayerPolicy::Hip(hip.clone()),
            LayerPolicy::Hip(cover),
        ],
    );
    let mut rng = Rng::new(seed);
    let steps = 12usize;
    let lens0 = [9000usize, 3001, 20000];
    let join = [0usize, 3, 5]; // step at which each request starts decoding
    let full: Vec<usize> = lens0.iter().map(|&l| l + steps).collect();
    let lay = KvLayout {
        n_kv_heads: 8,
        head_dim: 128,
        page_size: 64,
    };
    let pool = random_pool::<bf16>(lay, &full, &mut rng)?;
    let tp = TokenPool::from_pool(&pool, &full, &mut rng)?;
    let seqs: Vec<(&KvPool<bf16>, u64)> = (0..full.len()).map(|i| (&pool, i as u64)).collect();
    let mut owned: Vec<DeviceKv> = (0..full.len())
        .map(|i| DeviceKv::upload(&seqs[i..i + 1]))
        .collect::<Result<_, _>>()
        .map_err(e)?;
    let mut ga = GpuAttention::new(gpu, &cfg).map_err(e)?;
    let mut decs: Vec<HipGpuDecoder> = (0..full.len())
        .map(|_| HipGpuDecoder::new(hip.clone(), &shape, 1))
        .collect::<Result<_, _>>()
        .map_err(e)?;
    let side = gpu.ctx.new_stream().map_err(e)?;
    let raw = side.cu_stream() as u64;
    let g2 = unsafe { gpu.on_stream(raw) };
    let qe = shape.q_elems();
    let ekv = tp.engine_kv();
    let (mut hip_same, mut hip_steps, mut bf_same) = (true, 0usize, true);
    // bf16-out diagnostics: mismatching elements (of how many), the first
    // few (step, index, f32 value, its relaunch, bf16 got, want), and
    // whether a second f32 launch is bit-equal to the first.
    let (mut bf_bad, mut bf_total, mut f32_rerun_diff) = (0usize, 0usize, 0usize);
    let mut bf_first: Vec<String> = Vec::new();
    let (mut dense_err, mut cover_err, mut hip_diff) = (0f64, 0f64, 0f64);
    let mut all_finite = true;
    for step in 0..steps {
        let active: Vec<usize> = (0..full.len()).filter(|&b| step >= join[b]).collect();
        let lens: Vec<usize> = active.iter().map(|&b| lens0[b] + step - join[b]).collect();
        let ids: Vec<u64> = active.iter().map(|&b| 100 + b as u64).collect();
        let nb = active.len();
        let q: Vec<f32> = rng.normal_vec(nb * qe, 1.0);
        // The engine hands bf16 q; the reference paths get the same values.
        let qb: Vec<bf16> = q.iter().map(|&x| bf16::from_f32(x)).collect();
        let qf: Vec<f32> = qb.iter().map(|x| x.to_f32()).collect();
        let qd = DevBuf::from_slice(&qb).map_err(e)?;
        let out32 = DevBuf::alloc(nb * qe * 4).map_err(e)?;
        let out16 = DevBuf::alloc(nb * qe * 2).map_err(e)?;
        for layer in 0..3 {
            out32.fill_bytes(0xff).map_err(e)?;
            out16.fill_bytes(0xff).map_err(e)?;
            let qa = QArg {
                ptr: qd.ptr,
                dtype: DType::Bf16,
                row_stride: qe,
            };
            unsafe {
                ga.decode(
                    raw,
                    layer,
                    &ekv,
                    &ids,
                    &active,
                    &lens,
                    &qa,
                    &AttnOut {
                        ptr: out32.ptr,
                        dtype: DType::F32,
                        row_stride: qe,
                    },
                    None,
                )
                .map_err(e)?;
            }
            g2.synchronize().map_err(e)?;
            let got: Vec<f32> = out32.read(nb * qe).map_err(e)?;
            all_finite &= got.iter().all(|x| x.is_finite());
            let esel = if layer == 1 {
                ga.last_selection().map_err(e)?
            } else {
                Vec::new()
            };
            if layer == 0 {
                // The same f32 call again: relaunches must be bit-equal.
                let out32b = DevBuf::alloc(nb * qe * 4).map_err(e)?;
                out32b.fill_bytes(0xff).map_err(e)?;
                unsafe {
                    ga.decode(
                        raw,
                        0,
                        &ekv,
                        &ids,
                        &active,
                        &lens,
                        &qa,
                        &AttnOut {
                            ptr: out32b.ptr,
                            dtype: DType::F32,
                            row_stride: qe,
                        },
                        None,
                    )
                    .map_err(e)?;
                }
                g2.synchronize().map_err(e)?;
                let got2: Vec<f32> = out32b.read(nb * qe).map_err(e)?;
                f32_rerun_diff += got
                    .iter()
                    .zip(&got2)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                // Dense with bf16 out too (stateless: same call again).
                unsafe {
                    ga.decode(
                        raw,
                        0,
                        &ekv,
                        &ids,
                        &active,
                        &lens,
                        &qa,
                        &AttnOut {
                            ptr: out16.ptr,
                            dtype: DType::Bf16,
                            row_stride: qe,
                        },
                        None,
                    )
                    .map_err(e)?;
                }
                g2.synchronize().map_err(e)?;
                let g16: Vec<u16> = out16.read(nb * qe).map_err(e)?;
                let want16 = bf16_bits(&got);
                bf_same &= g16 == want16;
                bf_total += g16.len();
                for (i, (&g, &w)) in g16.iter().zip(&want16).enumerate() {
                    if g != w {
                        bf_bad += 1;
                        if bf_first.len() < 4 {
                            bf_first.push(format!(
                                "step {step} [{i}] f32 {:e} (relaunch {:e}) bf16 got {g:04x} want {w:04x}",
                                got[i], got2[i]
                            ));
                        }
                    }
                }
            }
            for (i, &b) in active.iter().enumerate() {
                let gq = &got[i * qe..(i + 1) * qe];
                match layer {
                    0 | 2 => {
                        if step % 4 != 0 {
                            continue; // the f64 reference is slow; sample
                        }
                        let view = pool.view(b as u64).map_err(e)?;
                        let sel = Selection::full(8, lens[i]);
                        let r = ref_f64(&shape, &qf[i * qe..(i + 1) * qe], &view, Some(&sel));
                        let err = rel_error(gq, &r);
                        let w = if layer == 0 {
                            &mut dense_err
                        } else {
                            &mut cover_err
                        };
                        *w = if err.is_nan() { f64::NAN } else { w.max(err) };
                    }
                    _ => {
                        owned[b].lens = vec![lens[i]];
                        let q1 = DevBuf::from_slice(&qf[i * qe..(i + 1) * qe]).map_err(e)?;
                        let o1 = DevBuf::alloc(qe * 4).map_err(e)?;
                        decs[b]
                            .step(gpu, &shape, &owned[b], q1.ptr, o1.ptr, true)
                            .map_err(e)?;
                        gpu.synchronize().map_err(e)?;
                        let want: Vec<f32> = o1.read(qe).map_err(e)?;
                        let dsel = decs[b].selection_host(gpu).map_err(e)?;
                        // Same selection; the split-K partition depends on
                        // the batch, so outputs agree to f32 rounding.
                        hip_same &= dsel[0] == esel[i];
                        let want64: Vec<f64> = want.iter().map(|&x| x as f64).collect();
                        let d = rel_error(gq, &want64);
                        hip_diff = if d.is_nan() {
                            f64::NAN
                        } else {
                            hip_diff.max(d)
                        };
                        hip_steps += 1;
                    }
                }
            }
        }
    }
    // End of request: the state is dropped; a new request recycles the slot
    // and must start fresh in every hip layer (here: layer 2 first, then
    // layer 1), on other data (sequence 1's), so stale masks would show.
    ga.end_request(100);
    let left = ga.n_requests();
    let mut recycled_same = true;
    {
        let b = 1usize;
        let mut fresh = HipGpuDecoder::new(hip.clone(), &shape, 1).map_err(e)?;
        for st in 0..3 {
            let len = lens0[b] + st;
            let q: Vec<f32> = rng.normal_vec(qe, 1.0);
            let qb: Vec<bf16> = q.iter().map(|&x| bf16::from_f32(x)).collect();
            let qf: Vec<f32> = qb.iter().map(|x| x.to_f32()).collect();
            let qd = DevBuf::from_slice(&qb).map_err(e)?;
            let o = DevBuf::alloc(qe * 4).map_err(e)?;
            let mut esel = Vec::new();
            for layer in [2usize, 1] {
                unsafe {
                    ga.decode(
                        raw,
                        layer,
                        &ekv,
                        &[300],
                        &[b],
                        &[len],
                        &QArg {
                            ptr: qd.ptr,
                            dtype: DType::Bf16,
                            row_stride: qe,
                        },
                        &AttnOut {
                            ptr: o.ptr,
                            dtype: DType::F32,
                            row_stride: qe,
                        },
                        None,
                    )
                    .map_err(e)?;
                }
                if layer == 1 {
                    esel = ga.last_selection().map_err(e)?;
                }
            }
            owned[b].lens = vec![len];
            let q1 = DevBuf::from_slice(&qf).map_err(e)?;
            let o1 = DevBuf::alloc(qe * 4).map_err(e)?;
            fresh
                .step(gpu, &shape, &owned[b], q1.ptr, o1.ptr, true)
                .map_err(e)?;
            gpu.synchronize().map_err(e)?;
            recycled_same &= fresh.selection_host(gpu).map_err(e)?[0] == esel[0];
        }
    }
    Ok(vec![
        Check {
            name: "engine GpuAttention dense layer (bf16 q, token-major pool) vs f64".into(),
            ok: dense_err <= 1e-2 && all_finite,
            detail: format!("rel_err {dense_err:.2e} (bound 1e-2), finite {all_finite}"),
        },
        Check {
            name: "engine GpuAttention bf16 out == f32 out rounded (RNE)".into(),
            ok: bf_same,
            detail: format!(
                "bit-identical {bf_same}: {bf_bad} of {bf_total} differ; f32 relaunch bit-equal {} ({f32_rerun_diff} differ); {}",
                f32_rerun_diff == 0,
                bf_first.join("; ")
            ),
        },
        Check {
            name: "engine GpuAttention hip, requests joining at steps 0/3/5 == per-request HipGpuDecoder".into(),
            ok: hip_same && hip_steps > 0 && hip_diff <= 1e-5 && left == 2 && recycled_same,
            detail: format!("same selections {hip_same} over {hip_steps} request-steps, output rel diff {hip_diff:.2e} (bound 1e-5); {left} requests left after end_request (want 2); a new request in the recycled slot (other data, layers called 2 then 1) == fresh decoder: {recycled_same}"),
        },
        Check {
            name: "engine GpuAttention hip covering budget == dense (f64)".into(),
            ok: cover_err <= 1e-2 && all_finite,
            detail: format!("rel_err {cover_err:.2e} (bound 1e-2)"),
        },
    ])
}

/// Engine prefill (dense causal, bf16 q/out) vs the f64 reference.
fn prefill_case(gpu: &GpuContext, seed: u64) -> R<Check> {
    let shape = AttnShape::new(16, 2, 256).map_err(e)?;
    let cfg = model_cfg(&shape, vec![LayerPolicy::Dense]);
    let mut rng = Rng::new(seed);
    let lens = [700usize, 130];
    let n_new = [300usize, 130];
    let lay = KvLayout {
        n_kv_heads: 2,
        head_dim: 256,
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
            &[1, 2],
            &[0, 1],
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
    let got: Vec<bf16> = out.read(total * qe).map_err(e)?;
    let got: Vec<f32> = got.iter().map(|x| x.to_f32()).collect();
    let mut worst = 0f64;
    let mut row = 0;
    for b in 0..2 {
        let view = pool.view(b as u64).map_err(e)?;
        for j in 0..n_new[b] {
            let pos = lens[b] - n_new[b] + j;
            if j % 37 == 0 || j + 1 == n_new[b] {
                let qf: Vec<f32> = q[row * qe..(row + 1) * qe]
                    .iter()
                    .map(|x| x.to_f32())
                    .collect();
                let sel = Selection::full(2, pos + 1);
                let r = ref_f64(&shape, &qf, &view, Some(&sel));
                worst = worst.max(rel_error(&got[row * qe..(row + 1) * qe], &r));
            }
            row += 1;
        }
    }
    let finite = got.iter().all(|x| x.is_finite());
    Ok(Check {
        name: "engine GpuAttention prefill (dense causal, bf16 q/out, d256 g8)".into(),
        ok: finite && worst <= 1e-2,
        detail: format!("rel_err {worst:.2e} (bound 1e-2, bf16 out), finite {finite}"),
    })
}

/// The engine decode case alone (`gpu-test --engine-decode-only`), with the
/// seed `checks` gives it.
pub(crate) fn decode_checks(gpu: &GpuContext, seed: u64) -> R<Vec<Check>> {
    engine_case(gpu, seed + 600)
}

pub(crate) fn checks(gpu: &GpuContext, seed: u64) -> R<Vec<Check>> {
    let mut v = Vec::new();
    for (i, &(hq, hkv, d)) in [(32, 8, 128), (16, 2, 256), (8, 8, 64)].iter().enumerate() {
        let shape = AttnShape::new(hq, hkv, d).map_err(e)?;
        v.push(borrowed_case(gpu, shape, seed + 500 + i as u64)?);
    }
    v.extend(engine_case(gpu, seed + 600)?);
    v.push(prefill_case(gpu, seed + 700)?);
    Ok(v)
}

/// Timing at `len` tokens, batch 1, Llama-3.1-8B shape: engine hip decode
/// (bf16 q/out, token-major borrowed pool, caller stream) vs the plugin path
/// (`HipGpuDecoder::step`, f32 q/out, plugin-layout pool), averaged over a
/// full refresh cycle; plus the q conversion alone.
pub(crate) fn timing(gpu: &GpuContext, len: usize) -> R<()> {
    let shape = AttnShape::new(32, 8, 128).map_err(e)?;
    let hip = HipConfig::default();
    let cfg = model_cfg(&shape, vec![LayerPolicy::Hip(hip.clone())]);
    let (hkv, d) = (8usize, 128usize);
    // Token-major pool with the identity slot table (values: a constant
    // pattern; timing does not depend on them).
    let slot = hkv * d;
    let k = DevBuf::alloc((len + 1) * slot * 2).map_err(e)?;
    let v = DevBuf::alloc((len + 1) * slot * 2).map_err(e)?;
    k.fill_bytes(0x3c).map_err(e)?;
    v.fill_bytes(0x3c).map_err(e)?;
    let table: Vec<i32> = (1..=len as i32).collect();
    let table = DevBuf::from_slice(&table).map_err(e)?;
    let ekv = EngineKv {
        k: k.ptr,
        v: v.ptr,
        dtype: DType::Bf16,
        table: table.ptr,
        table_stride: len,
        page_size: 1,
        page_stride: slot,
        head_stride: d,
    };
    let qe = shape.q_elems();
    let mut rng = Rng::new(5);
    let qv: Vec<bf16> = rng
        .normal_vec(qe, 1.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let qd = DevBuf::from_slice(&qv).map_err(e)?;
    let out = DevBuf::alloc(qe * 2).map_err(e)?;
    let mut ga = GpuAttention::new(gpu, &cfg).map_err(e)?;
    let raw = gpu.raw_stream();
    let cycle = hip.stages[0].refresh_interval;
    let t_engine = time_ms(gpu, 5, || {
        for _ in 0..cycle {
            unsafe {
                ga.decode(
                    raw,
                    0,
                    &ekv,
                    &[1],
                    &[0],
                    &[len],
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
        }
        Ok(())
    })? / cycle as f64;
    // Plugin path on a plugin-layout pool (page 64) of the same length.
    let pages = len.div_ceil(64);
    let pk = DevBuf::alloc(pages * 64 * slot * 2).map_err(e)?;
    let pv = DevBuf::alloc(pages * 64 * slot * 2).map_err(e)?;
    pk.fill_bytes(0x3c).map_err(e)?;
    pv.fill_bytes(0x3c).map_err(e)?;
    let ptab: Vec<i32> = (0..pages as i32).collect();
    let ptab = DevBuf::from_slice(&ptab).map_err(e)?;
    let pkv = DeviceKv {
        k: pk,
        v: pv,
        table: ptab,
        table_stride: pages,
        page_size: 64,
        page_stride: 64 * slot,
        head_stride: 64 * d,
        n_kv_heads: hkv,
        head_dim: d,
        dtype: DType::Bf16,
        lens: vec![len],
        capacity: vec![pages * 64],
    };
    let qf: Vec<f32> = qv.iter().map(|x| x.to_f32()).collect();
    let qfd = DevBuf::from_slice(&qf).map_err(e)?;
    let of = DevBuf::alloc(qe * 4).map_err(e)?;
    let mut dec = HipGpuDecoder::new(hip.clone(), &shape, 1).map_err(e)?;
    let t_plugin = time_ms(gpu, 5, || {
        for _ in 0..cycle {
            dec.step(gpu, &shape, &pkv, qfd.ptr, of.ptr, true)
                .map_err(e)?;
        }
        Ok(())
    })? / cycle as f64;
    println!(
        "engine-timing len {len} batch 1 (Llama-3.1-8B shape, hip default, mean over a {cycle}-step refresh cycle): \
         engine GpuAttention bf16 q/out token-major {t_engine:.4} ms/step; plugin HipGpuDecoder f32 paged {t_plugin:.4} ms/step; ratio {:.3}",
        t_engine / t_plugin
    );
    Ok(())
}
