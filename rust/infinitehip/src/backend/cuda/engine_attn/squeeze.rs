//! Squeezed Attention layers of `GpuAttention` (the CPU policy is
//! `policy::squeeze`; its module doc is the specification).
//!
//! Per (request slot, squeeze layer):
//! - **Prefill** (prompt, possibly in chunks) is dense causal, as the CPU
//!   policy attends the prefix's own queries. The f32 queries of the last
//!   `observation_window` (W) positions are copied, on the device and on the
//!   caller's stream, into a W-row ring (one row per position, `pos % W`):
//!   the calibration queries. Memory: W x n_q x head_dim x 4 bytes per
//!   (request, layer) until the prefix is sealed.
//! - **Seal** at the request's first decode (the CPU policy seals at the
//!   append that ends the prompt and looks up from the first query past it:
//!   the same point). The prefix is every token the prefills gave (or, for a
//!   request never prefilled here, all but the decoded token). This is the
//!   one place the engine path waits for the device: the clustered keys are
//!   gathered once from the engine's K through the page table
//!   (`ep_gather_keys_*`) and clustered on the GPU (`squeeze_kmeans`, every
//!   KV head at once, bit-identical to the CPU policy's `kmeans.rs`; the
//!   coarse level per head), only the sink keys and the clusters are read
//!   back, the host calibrates over the recorded queries and the index is
//!   uploaded (`SqueezeIndexGpu`). With `INFINITEHIP_SQUEEZE_KMEANS=host`
//!   (or a head dim the kernels lack) the whole prefix's keys are read back
//!   and the host runs the CPU policy's own `build_prefix`. Cost per
//!   (request, layer): timed, `Sealed::seal_ms` / `kmeans_ms` (README).
//! - **Decode** past the seal: the centroid lookup and the key ranges on the
//!   GPU (`SqueezeIndexGpu::launch_select`, one or two levels, the CPU's
//!   thresholds), no host sync. Within f32 rounding of a threshold a cluster
//!   may be decided differently from the CPU (squeeze2.rs says how).
//! - A prefill for a request that already sealed (SGLang reuses a
//!   `req_to_token` row for a new request) starts a new prompt: the state is
//!   dropped. The CPU policy would look up the sealed index for such a
//!   prefill; the engine path has no prefill lookup.

use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};

use super::super::dispatch::DeviceSelection;
use super::super::policies::squeeze2::{SqueezeIndexGpu, SqueezeWorkspace};
use super::super::policies::squeeze_kmeans;
use super::super::{gpu_err, kernels, DevBuf, GpuContext};
use crate::attention::AttnShape;
use crate::config::{ModelShape, SqueezeConfig};
use crate::error::{Error, Result};
use crate::kmeans::KMeans;
use crate::kv::{KvRead, SeqView};
use crate::policy::squeeze::{build_head_from, fine_params, HeadIndex, SqueezePolicy, Thresholds};
use crate::policy::{Phase, Policy, SelectRequest};

/// A sealed prefix of one (request, layer).
pub(crate) struct Sealed {
    pub prefix_len: usize,
    /// None: nothing clustered (the prompt fits the observation window):
    /// the request attends densely, as on the CPU.
    pub index: Option<(SqueezeIndexGpu, SqueezeWorkspace, Thresholds)>,
    /// Host time of the seal (key gather, k-means, calibration, upload).
    pub seal_ms: f64,
    /// Of which the clustering (and, on the host path, the calibration).
    pub kmeans_ms: f64,
    /// Whether the k-means ran on the GPU.
    pub kmeans_on_gpu: bool,
}

#[derive(Default)]
pub(crate) struct SqSlot {
    /// Calibration queries, f32 `[W][n_q * d]`, row `pos % W`.
    ring: Option<DevBuf>,
    /// Position held by each ring row (usize::MAX: none).
    rec: Vec<usize>,
    /// The request's length after its last prefill (0: none seen).
    prompt_len: usize,
    pub sealed: Option<Sealed>,
}

pub(crate) struct SqueezeLayer {
    pub cfg: SqueezeConfig,
    host: SqueezePolicy,
    pub slots: Vec<SqSlot>,
    /// Cluster on the device (default); `INFINITEHIP_SQUEEZE_KMEANS=host`
    /// keeps the host k-means (the CPU reference).
    pub kmeans_on_gpu: bool,
}

/// A KV view that has a length and shape but no keys: calibration reads
/// only the queries.
struct ShapeOnlyKv {
    len: usize,
    hkv: usize,
    d: usize,
}

impl KvRead for ShapeOnlyKv {
    fn len(&self) -> usize {
        self.len
    }
    fn n_kv_heads(&self) -> usize {
        self.hkv
    }
    fn head_dim(&self) -> usize {
        self.d
    }
    fn dot_key(&self, _: usize, _: usize, _: &[f32]) -> f32 {
        unreachable!("squeeze calibration reads no keys")
    }
    fn read_key(&self, _: usize, _: usize, _: &mut [f32]) {
        unreachable!("squeeze calibration reads no keys")
    }
    fn read_value(&self, _: usize, _: usize, _: &mut [f32]) {
        unreachable!("squeeze calibration reads no values")
    }
}

/// `INFINITEHIP_SQUEEZE_KMEANS`: `host` clusters on the CPU, anything else
/// (or unset) on the GPU.
pub(crate) fn kmeans_on_gpu_from_env() -> bool {
    std::env::var("INFINITEHIP_SQUEEZE_KMEANS").map_or(true, |v| v != "host")
}

impl SqueezeLayer {
    pub fn new(cfg: SqueezeConfig, model: &ModelShape) -> Result<Self> {
        Ok(SqueezeLayer {
            host: SqueezePolicy::new(cfg.clone(), model)?,
            cfg,
            slots: Vec::new(),
            kmeans_on_gpu: kmeans_on_gpu_from_env(),
        })
    }

    pub fn reset(&mut self, s: usize) {
        if s < self.slots.len() {
            self.slots[s] = SqSlot::default();
        }
    }

    fn ensure(&mut self, s: usize) {
        if self.slots.len() <= s {
            self.slots.resize_with(s + 1, SqSlot::default);
        }
    }

    /// Ring rows `(row, pos)` that receive the prefill queries at positions
    /// `start..len` (the last W of them), as at most two contiguous copies
    /// `(first ring row, first position, count)`.
    pub fn ring_copies(w: usize, start: usize, len: usize) -> Vec<(usize, usize, usize)> {
        if w == 0 || start >= len {
            return Vec::new();
        }
        let from = start.max(len.saturating_sub(w));
        let mut out = Vec::new();
        let mut p = from;
        while p < len {
            let row = p % w;
            let n = (w - row).min(len - p);
            out.push((row, p, n));
            p += n;
        }
        out
    }

    /// Record the prefill queries of slot `s` at positions `len - n..len`,
    /// f32 rows at `q` (device), on `stream`. A sealed slot starts over.
    pub fn record(
        &mut self,
        stream: &CudaStream,
        s: usize,
        qe: usize,
        q: u64,
        len: usize,
        n: usize,
    ) -> Result<()> {
        self.ensure(s);
        let w = self.cfg.observation_window;
        let slot = &mut self.slots[s];
        if slot.sealed.is_some() {
            *slot = SqSlot::default();
        }
        slot.prompt_len = len;
        if w == 0 {
            return Ok(());
        }
        if slot.ring.is_none() {
            slot.ring = Some(DevBuf::alloc(w * qe * 4)?);
            slot.rec = vec![usize::MAX; w];
        }
        let ring = slot.ring.as_ref().expect("allocated").ptr;
        let start = len - n;
        for (row, pos, cnt) in Self::ring_copies(w, start, len) {
            let src = q + ((pos - start) * qe * 4) as u64;
            let dst = ring + (row * qe * 4) as u64;
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    dst,
                    src,
                    cnt * qe * 4,
                    stream.cu_stream(),
                )
            }
            .map_err(|e| gpu_err("squeeze: copy calibration queries", e))?;
            for i in 0..cnt {
                slot.rec[row + i] = pos + i;
            }
        }
        Ok(())
    }

    /// Seal slot `s` (request `id`) at its first decode of length `len`
    /// (module doc). Waits for the device. `table_row`: device pointer to
    /// the request's page-table row; `kv`: (k ptr, dtype tag, page size,
    /// page stride, head stride).
    #[allow(clippy::too_many_arguments)]
    pub fn seal(
        &mut self,
        gpu: &GpuContext,
        shape: &AttnShape,
        s: usize,
        id: u64,
        len: usize,
        table_row: u64,
        kv: (u64, crate::DType, usize, usize, usize),
    ) -> Result<()> {
        self.ensure(s);
        let t0 = std::time::Instant::now();
        let (hkv, d, qe) = (shape.n_kv_heads, shape.head_dim, shape.q_elems());
        let prompt = self.slots[s].prompt_len;
        let prefix_len = if prompt == 0 { len - 1 } else { prompt };
        if prefix_len >= len {
            return Err(Error::OutOfRange(format!(
                "squeeze on the GPU: request {id} decodes at length {len}, not past its prompt of {prefix_len} tokens"
            )));
        }
        let w = self.cfg.observation_window;
        let ws0 = prefix_len.saturating_sub(w);
        // Clustering on the device needs a dimension the kernels are built
        // for; otherwise (or when INFINITEHIP_SQUEEZE_KMEANS=host) the host.
        let on_gpu = self.kmeans_on_gpu && kernels::HEAD_DIMS.contains(&d);
        // Keys 0..n, head-major f32: the clustered ones (device k-means) or
        // the whole prefix (read back for the host policy).
        let n = if on_gpu { ws0 } else { prefix_len };
        let keys_dev = if n == 0 {
            None
        } else {
            let out = DevBuf::alloc(hkv * n * d * 4)?;
            let tag = kernels::dtype_tag(kv.1).ok_or_else(|| {
                Error::Invalid(format!(
                    "squeeze on the GPU: K dtype {} (bf16 or f16)",
                    kv.1
                ))
            })?;
            let f = gpu.func("engine_policy", &format!("ep_gather_keys_{tag}"))?;
            let (ps, pst, hst) = (kv.2 as i32, kv.3 as i64, kv.4 as i64);
            let (di, ni) = (d as i32, super::i32_of("squeeze prefix", n)?);
            let mut l = gpu.stream.launch_builder(&f);
            l.arg(&kv.0)
                .arg(&table_row)
                .arg(&ps)
                .arg(&pst)
                .arg(&hst)
                .arg(&di)
                .arg(&ni)
                .arg(&out.ptr);
            let blocks = (n * d).div_ceil(256).min(4096) as u32;
            unsafe {
                l.launch(LaunchConfig {
                    grid_dim: (blocks, hkv as u32, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(|e| gpu_err("launch ep_gather_keys", e))?;
            Some(out)
        };
        // The ring was written on the caller's stream.
        gpu.synchronize()?;
        // Calibration queries of the window, grouped in runs of positions.
        let slot = &self.slots[s];
        let mut have: Vec<(usize, usize)> = slot
            .rec
            .iter()
            .enumerate()
            .filter(|(_, &p)| (ws0..prefix_len).contains(&p))
            .map(|(row, &p)| (p, row))
            .collect();
        have.sort_unstable();
        let ring: Vec<f32> = match (&slot.ring, have.is_empty()) {
            (Some(r), false) => r.read(w * qe)?,
            _ => Vec::new(),
        };
        let kmeans_ms;
        let built = if on_gpu {
            let shape_only = ShapeOnlyKv {
                len: prefix_len,
                hkv,
                d,
            };
            let t1 = std::time::Instant::now();
            let heads = match &keys_dev {
                Some(k) => self.heads_on_gpu(gpu, k.ptr, hkv, ws0, d),
                None => Ok(Vec::new()),
            };
            kmeans_ms = t1.elapsed().as_secs_f64() * 1e3;
            heads.and_then(|heads| {
                self.calibrate(shape, id, &have, &ring, &shape_only)?;
                self.host.seal_prefix(id, shape, prefix_len, heads)
            })
        } else {
            let keys: Vec<f32> = match &keys_dev {
                Some(k) => k.read(hkv * prefix_len * d)?,
                None => Vec::new(),
            };
            let view = SeqView::from_contiguous(hkv, d, prefix_len, &keys, &keys);
            let t1 = std::time::Instant::now();
            let r = self
                .calibrate(shape, id, &have, &ring, &view)
                .and_then(|_| self.host.build_prefix(id, shape, &view));
            kmeans_ms = t1.elapsed().as_secs_f64() * 1e3;
            r
        };
        drop(keys_dev);
        let p = self.host.prefix(id);
        // The host policy's state was scratch: the Arc is all we keep.
        self.host.end_sequence(id);
        built?;
        let p = p.expect("sealed");
        let index = if p.window_start == 0 {
            None
        } else {
            let thr = p.thresholds_for(&self.cfg, shape, id)?;
            let idx = SqueezeIndexGpu::upload(&p)?;
            let ws = idx.workspace(1)?;
            Some((idx, ws, thr))
        };
        let seal_ms = t0.elapsed().as_secs_f64() * 1e3;
        tracing::debug!(
            id,
            prefix_len,
            calibration_queries = have.len(),
            seal_ms,
            kmeans_ms,
            kmeans_on_gpu = on_gpu,
            "squeeze (GPU engine path): prefix sealed"
        );
        self.slots[s] = SqSlot {
            sealed: Some(Sealed {
                prefix_len,
                index,
                seal_ms,
                kmeans_ms,
                kmeans_on_gpu: on_gpu,
            }),
            ..SqSlot::default()
        };
        Ok(())
    }

    /// Per-KV-head indexes of keys `0..ws` (device f32 `[hkv][ws][d]` at
    /// `keys`): the sink keys read back, the rest clustered on the GPU
    /// (`squeeze_kmeans`, every head at once; the coarse level per head).
    fn heads_on_gpu(
        &self,
        gpu: &GpuContext,
        keys: u64,
        hkv: usize,
        ws: usize,
        d: usize,
    ) -> Result<Vec<HeadIndex>> {
        let cfg = &self.cfg;
        let s = cfg.sink.min(ws);
        let kms: Vec<Option<KMeans>> = if ws > s {
            let p = fine_params(cfg, ws - s);
            let (v, _) = squeeze_kmeans::kmeans_heads(
                gpu,
                keys + (s * d * 4) as u64,
                ws * d,
                hkv,
                ws - s,
                d,
                &p,
            )
            .map_err(|e| Error::Invalid(format!("squeeze: GPU clustering: {e}")))?;
            v.into_iter().map(Some).collect()
        } else {
            (0..hkv).map(|_| None).collect()
        };
        kms.into_iter()
            .enumerate()
            .map(|(h, km)| {
                let sink: Vec<f32> = if s > 0 {
                    DevBuf::borrowed(keys + (h * ws * d * 4) as u64, s * d * 4).read(s * d)?
                } else {
                    Vec::new()
                };
                build_head_from(&sink, d, km, h, cfg, &mut |p, d, q| {
                    squeeze_kmeans::kmeans_host(gpu, p, d, q)
                })
            })
            .collect()
    }

    /// The CPU policy's calibration: a prefill `select` over each run of
    /// recorded window positions (only the queries are read).
    fn calibrate(
        &mut self,
        shape: &AttnShape,
        id: u64,
        have: &[(usize, usize)],
        ring: &[f32],
        view: &dyn KvRead,
    ) -> Result<()> {
        let qe = shape.q_elems();
        let mut i = 0;
        while i < have.len() {
            let mut j = i + 1;
            while j < have.len() && have[j].0 == have[j - 1].0 + 1 {
                j += 1;
            }
            let qs: Vec<f32> = have[i..j]
                .iter()
                .flat_map(|&(_, row)| ring[row * qe..(row + 1) * qe].iter().copied())
                .collect();
            self.host.select(&SelectRequest {
                seq: id,
                shape: *shape,
                phase: Phase::Prefill,
                queries: &qs,
                q_start: have[i].0,
                kv: view,
            })?;
            i = j;
        }
        Ok(())
    }

    pub fn sealed(&self, s: usize) -> Option<&Sealed> {
        self.slots.get(s).and_then(|x| x.sealed.as_ref())
    }

    /// Ranges per selection row a sealed slot needs (1: dense).
    pub fn cap(&self, s: usize) -> usize {
        match self.sealed(s).and_then(|x| x.index.as_ref()) {
            Some((idx, _, _)) => super::super::policies::squeeze2::ranges_cap(idx.window_start),
            None => 1,
        }
    }

    /// Overwrite the `hkv` selection rows of request `i` (already filled
    /// with the full range) with the lookup of its query (f32 at `q`), for a
    /// sealed slot with an index. `lens_i`: device i32 of its length.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_lookup(
        &self,
        gpu: &GpuContext,
        shape: &AttnShape,
        s: usize,
        q: u64,
        lens_i: u64,
        sel: &DeviceSelection,
        i: usize,
    ) -> Result<()> {
        let Some((idx, ws, thr)) = self.sealed(s).and_then(|x| x.index.as_ref()) else {
            return Ok(());
        };
        let hkv = shape.n_kv_heads;
        let view = super::sel_rows(sel, i * hkv, hkv);
        idx.launch_select(gpu, &gpu.stream, shape, q, 1, lens_i, *thr, ws, &view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_copies_take_the_last_window_positions() {
        // Whole prompt in one prefill of 250 tokens, W 100: positions
        // 150..250, rows 50..100 then 0..50.
        assert_eq!(
            SqueezeLayer::ring_copies(100, 0, 250),
            vec![(50, 150, 50), (0, 200, 50)]
        );
        // A chunk shorter than W.
        assert_eq!(
            SqueezeLayer::ring_copies(100, 240, 250),
            vec![(40, 240, 10)]
        );
        assert_eq!(
            SqueezeLayer::ring_copies(8, 5, 13),
            vec![(5, 5, 3), (0, 8, 5)]
        );
        assert!(SqueezeLayer::ring_copies(0, 0, 10).is_empty());
        assert!(SqueezeLayer::ring_copies(4, 10, 10).is_empty());
        // Every recorded position lands in row pos % W, each once.
        for (w, st, len) in [(7usize, 0usize, 30usize), (5, 3, 9), (100, 1, 2)] {
            let mut seen = Vec::new();
            for (row, p, n) in SqueezeLayer::ring_copies(w, st, len) {
                for k in 0..n {
                    assert_eq!((row + k), (p + k) % w);
                    seen.push(p + k);
                }
            }
            let want: Vec<usize> = (st.max(len.saturating_sub(w))..len).collect();
            assert_eq!(seen, want);
        }
    }
}
