//! Launch code for the policies' own GPU work (issue 3): the Locret
//! retaining-head MLP (`kernels/locret_score.cu`), the Squeezed Attention
//! one-level centroid lookup (`kernels/squeeze_lookup.cu`) and the LazyLLM
//! token importance (`kernels/lazy_importance.cu`; the keep set from it in
//! `lazy_topk`, on the device).
//!
//! Each has a device-pointer entry (`launch_*`, stream chosen by the
//! caller: `gpu.stream`, or an engine's stream wrapped with
//! `CudaContext::wrap_borrowed_stream`) and a host convenience that uploads,
//! launches on `gpu.stream`, waits and reads back. The caller orders the
//! launches with any work on other streams (uploads through `DevBuf` are
//! synchronous copies on the legacy default stream).
//!
//! Submodules: [`squeeze2`] (Squeeze lookup with one or two levels straight
//! to the selected key ranges, in `DeviceSelection` form) and [`lazy_topk`]
//! (the LazyLLM keep set: importance, top-k and sorted keep indices on the
//! device, for a batch of sequences).

use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};

/// Launch kernel `$name` of module `$module` on `$stream` with 256-thread
/// blocks; `grid` is (x, y, z) in usize, `smem` bytes of dynamic shared
/// memory. Arguments must be places (locals or fields), not temporaries.
macro_rules! launch {
    ($gpu:expr, $stream:expr, $module:expr, $name:expr, grid: $grid:expr, smem: $smem:expr,
     args: [$($a:expr),* $(,)?]) => {{
        let name: &str = &$name;
        let f = $gpu.func($module, name)?;
        let mut l = $stream.launch_builder(&f);
        $( l.arg(&$a); )*
        let grid_dim = $crate::backend::launch_grid::grid($gpu.grid_limits, name, $grid)?;
        let cfg = LaunchConfig {
            grid_dim,
            block_dim: (256, 1, 1),
            shared_mem_bytes: $smem as u32,
        };
        // SAFETY: the arguments pushed above follow the kernel's parameter list in kernels/*.cu
        // (same order and C types); every pointer is a device allocation of this context sized for
        // this grid by the code above.
        unsafe { l.launch(cfg) }
            .map(|_| ())
            .map_err(|e| gpu_err(&format!("launch {name}"), e))
    }};
}

pub mod lazy_topk;
pub mod squeeze2;
pub mod squeeze_kmeans;

use super::dispatch::DeviceKv;
use super::{gpu_err, kernels, DevBuf, GpuContext};
use crate::attention::AttnShape;
use crate::error::{Error, Result};
use crate::policy::locret::RetainingHead;
use crate::policy::squeeze::{HeadIndex, Level};

fn i32_of(what: &str, x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::OutOfRange(format!("{what} = {x} exceeds i32")))
}

/// One layer's retaining head on the device (f32 weights).
pub struct LocretGpu {
    w1: DevBuf,
    w2: DevBuf,
    qd: usize,
    kd: usize,
    hidden: usize,
    n_kv: usize,
}

impl LocretGpu {
    /// Upload `head`'s weights; `shape` gives the q/k widths (checked
    /// against the head's input width).
    pub fn new(head: &RetainingHead, shape: &AttnShape) -> Result<Self> {
        let qd = shape.n_q_heads * shape.head_dim;
        let kd = shape.n_kv_heads * shape.head_dim;
        if qd + 2 * kd != head.input_dim() || shape.n_kv_heads != head.n_kv_heads() {
            return Err(Error::shape(
                "LocretGpu: retaining head input (n_q + 2 n_kv) * head_dim, n_kv",
                format!("{}, {}", qd + 2 * kd, shape.n_kv_heads),
                format!("{}, {}", head.input_dim(), head.n_kv_heads()),
            ));
        }
        Ok(LocretGpu {
            w1: DevBuf::from_slice(head.fc1())?,
            w2: DevBuf::from_slice(head.fc2())?,
            qd,
            kd,
            hidden: head.hidden(),
            n_kv: head.n_kv_heads(),
        })
    }

    /// Bytes of f32 workspace (`hidden` activations per token) for n tokens.
    pub fn workspace_bytes(&self, n: usize) -> usize {
        n * self.hidden * 4
    }

    /// Scores `[n][n_kv]` f32 into `out` from device f32 q `[n][n_q][d]`,
    /// k, v `[n][n_kv][d]`; `ws` holds `workspace_bytes(n)`.
    #[allow(clippy::too_many_arguments)]
    pub fn launch(
        &self,
        gpu: &GpuContext,
        stream: &CudaStream,
        q: u64,
        k: u64,
        v: u64,
        n: usize,
        ws: &DevBuf,
        out: u64,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        if ws.bytes < self.workspace_bytes(n) {
            return Err(Error::shape(
                "LocretGpu workspace bytes",
                self.workspace_bytes(n),
                ws.bytes,
            ));
        }
        let (ni, qd, kd, hid, nkv) = (
            i32_of("locret tokens", n)?,
            self.qd as i32,
            self.kd as i32,
            self.hidden as i32,
            self.n_kv as i32,
        );
        launch!(gpu, stream, "locret_score", "locret_fc1",
            grid: (n.div_ceil(64), self.hidden.div_ceil(64), 1), smem: 0,
            args: [q, k, v, ni, qd, kd, self.w1.ptr, hid, ws.ptr])?;
        launch!(gpu, stream, "locret_score", "locret_fc2",
            grid: ((n * self.n_kv).div_ceil(8), 1, 1), smem: 0,
            args: [ws.ptr, ni, hid, self.w2.ptr, nkv, out])?;
        Ok(())
    }

    /// Host in, host out (as `RetainingHead::scores`).
    pub fn scores(&self, gpu: &GpuContext, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        let n = q.len() / self.qd.max(1);
        if n * self.qd != q.len() || k.len() != n * self.kd || v.len() != n * self.kd {
            return Err(Error::shape(
                "LocretGpu input (q, k, v)",
                format!("n x ({}, {}, {})", self.qd, self.kd, self.kd),
                format!("({}, {}, {})", q.len(), k.len(), v.len()),
            ));
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let (dq, dk, dv) = (
            DevBuf::from_slice(q)?,
            DevBuf::from_slice(k)?,
            DevBuf::from_slice(v)?,
        );
        let ws = DevBuf::alloc(self.workspace_bytes(n))?;
        let out = DevBuf::alloc(n * self.n_kv * 4)?;
        self.launch(gpu, &gpu.stream, dq.ptr, dk.ptr, dv.ptr, n, &ws, out.ptr)?;
        gpu.synchronize()?;
        out.read(n * self.n_kv)
    }
}

/// One clustering level of every KV head on the device: centroids
/// `[n_kv][k][dim]` f32, sizes `[n_kv][k]` u32.
pub(crate) struct LevelGpu {
    pub cent: DevBuf,
    pub sizes: DevBuf,
    pub k: usize,
    pub dim: usize,
}

impl LevelGpu {
    /// Upload `levels[h]` for every KV head h; all must have the same
    /// cluster count and dimension (errors name `what` and the head).
    pub fn upload(what: &str, levels: &[&Level]) -> Result<Self> {
        let (k, dim) = level_dims(what, levels)?;
        let mut cent = Vec::with_capacity(levels.len() * k * dim);
        let mut sizes = Vec::with_capacity(levels.len() * k);
        for lv in levels {
            cent.extend_from_slice(&lv.centroids);
            sizes.extend_from_slice(&lv.sizes);
        }
        Ok(LevelGpu {
            cent: DevBuf::from_slice(&cent)?,
            sizes: DevBuf::from_slice(&sizes)?,
            k,
            dim,
        })
    }
}

/// (clusters, dim) shared by every level, or an error naming the head that
/// differs (checked before any CUDA call).
pub(crate) fn level_dims(what: &str, levels: &[&Level]) -> Result<(usize, usize)> {
    let first = levels
        .first()
        .ok_or_else(|| Error::Invalid(format!("{what}::upload: no heads")))?;
    let (k, dim) = (first.k(), first.dim);
    for (h, lv) in levels.iter().enumerate() {
        if lv.k() != k || lv.dim != dim || lv.centroids.len() != k * dim {
            return Err(Error::shape(
                format!("{what} head {h} centroids (clusters x dim)"),
                format!("{k} x {dim}"),
                format!("{} x {} ({} values)", lv.k(), lv.dim, lv.centroids.len()),
            ));
        }
    }
    i32_of(&format!("{what} clusters"), k)?;
    Ok((k, dim))
}

/// One layer's one-level Squeeze index (fine centroids of every KV head) on
/// the device.
pub struct SqueezeGpu {
    cent: DevBuf,
    sizes: DevBuf,
    /// Clusters per head (the same for every head).
    pub k: usize,
    pub dim: usize,
    pub n_kv: usize,
}

impl SqueezeGpu {
    /// Upload the fine level of each KV head's index (`heads[h]`). Every
    /// head must have the same cluster count and dimension.
    pub fn upload(heads: &[HeadIndex]) -> Result<Self> {
        let fine: Vec<&Level> = heads.iter().map(|h| &h.fine).collect();
        let lv = LevelGpu::upload("SqueezeGpu", &fine)?;
        Ok(SqueezeGpu {
            k: lv.k,
            dim: lv.dim,
            n_kv: heads.len(),
            cent: lv.cent,
            sizes: lv.sizes,
        })
    }

    /// Per query row r (device f32 `[rows][n_q][d]`) and KV head h:
    /// pooled estimated probability of every cluster into `probs`
    /// `[rows][n_kv][k]` f32 and keep flags (`p >= thr`, never an empty
    /// cluster) into `keep` `[rows][n_kv][k]` u8.
    #[allow(clippy::too_many_arguments)]
    pub fn launch(
        &self,
        gpu: &GpuContext,
        stream: &CudaStream,
        shape: &AttnShape,
        queries: u64,
        rows: usize,
        thr: f32,
        probs: u64,
        keep: u64,
    ) -> Result<()> {
        if shape.n_kv_heads != self.n_kv || shape.head_dim != self.dim {
            return Err(Error::shape(
                "SqueezeGpu lookup shape (n_kv heads x head_dim)",
                format!("{} x {}", self.n_kv, self.dim),
                format!("{} x {}", shape.n_kv_heads, shape.head_dim),
            ));
        }
        shape.validate()?;
        if rows == 0 || self.k == 0 {
            return Ok(());
        }
        let g = shape.group();
        let smem = (g * self.dim + 2 * g + 16) * 4;
        if smem > 48 * 1024 {
            return Err(Error::Invalid(format!(
                "SqueezeGpu: group {g} x head_dim {} needs {smem} bytes of shared memory (> 48 KiB)",
                self.dim
            )));
        }
        let (ki, di, nq, hk) = (
            self.k as i32,
            self.dim as i32,
            shape.n_q_heads as i32,
            self.n_kv as i32,
        );
        launch!(gpu, stream, "squeeze_lookup", "squeeze_lookup",
            grid: (self.n_kv, rows, 1), smem: smem,
            args: [self.cent.ptr, self.sizes.ptr, ki, di, queries, nq, hk, shape.scale, thr,
                   probs, keep])?;
        Ok(())
    }

    /// Host in, host out: (probs, keep flags), each `[rows][n_kv][k]`.
    pub fn lookup(
        &self,
        gpu: &GpuContext,
        shape: &AttnShape,
        queries: &[f32],
        thr: f32,
    ) -> Result<(Vec<f32>, Vec<u8>)> {
        let qe = shape.q_elems();
        let rows = queries.len() / qe.max(1);
        if rows * qe != queries.len() {
            return Err(Error::shape(
                "SqueezeGpu queries (rows x n_q x d)",
                format!("multiple of {qe}"),
                queries.len(),
            ));
        }
        let n = rows * self.n_kv * self.k;
        let dq = DevBuf::from_slice(queries)?;
        let probs = DevBuf::alloc(n * 4)?;
        let keep = DevBuf::alloc(n)?;
        self.launch(
            gpu,
            &gpu.stream,
            shape,
            dq.ptr,
            rows,
            thr,
            probs.ptr,
            keep.ptr,
        )?;
        gpu.synchronize()?;
        Ok((probs.read(n)?, keep.read(n)?))
    }
}

/// Buffers for `lazy_importance` (grown on demand).
#[derive(Default)]
pub struct LazyWorkspace {
    logits: Option<DevBuf>,
}

/// LazyLLM importance of `n` tokens (device i32 ids into sequence `seq` of
/// `kv`) for the query `q` (device f32 `[n_q][d]`), into `out` (device f32
/// `[n]`), on `stream`. Token ids are trusted here: `lazy_importance`
/// checks them.
#[allow(clippy::too_many_arguments)]
pub fn launch_lazy_importance(
    gpu: &GpuContext,
    stream: &CudaStream,
    shape: &AttnShape,
    kv: &DeviceKv,
    seq: usize,
    q: u64,
    tokens: u64,
    n: usize,
    ws: &mut LazyWorkspace,
    out: u64,
) -> Result<()> {
    shape.validate()?;
    if kv.n_kv_heads != shape.n_kv_heads || kv.head_dim != shape.head_dim {
        return Err(Error::shape(
            "lazy importance KV (heads x dim)",
            format!("{} x {}", shape.n_kv_heads, shape.head_dim),
            format!("{} x {}", kv.n_kv_heads, kv.head_dim),
        ));
    }
    if seq >= kv.batch() {
        return Err(Error::OutOfRange(format!(
            "lazy importance sequence {seq} of a DeviceKv holding {}",
            kv.batch()
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let need = shape.n_q_heads * n * 4;
    if ws.logits.as_ref().is_none_or(|b| b.bytes < need) {
        ws.logits = Some(DevBuf::alloc(need)?);
    }
    let logits = ws.logits.as_ref().unwrap().ptr;
    let tag = kernels::dtype_tag(kv.dtype)
        .ok_or_else(|| Error::Invalid(format!("lazy importance: K/V dtype {}", kv.dtype)))?;
    let (ps, hk, d, ni, nq) = (
        kv.page_size as i32,
        kv.n_kv_heads as i32,
        kv.head_dim as i32,
        i32_of("lazy tokens", n)?,
        shape.n_q_heads as i32,
    );
    let table_row = kv.table.ptr + (seq * kv.table_stride * 4) as u64;
    let (pst, hst) = (kv.page_stride as i64, kv.head_stride as i64);
    launch!(gpu, stream, "lazy_importance", format!("lazy_logits_{tag}"),
        grid: (n.div_ceil(8), kv.n_kv_heads, 1), smem: 0,
        args: [kv.k.ptr, table_row, ps, hk, pst, hst, d, tokens, ni, q, nq, shape.scale, logits])?;
    launch!(gpu, stream, "lazy_importance", "lazy_softmax",
        grid: (shape.n_q_heads, 1, 1), smem: 0, args: [logits, ni])?;
    launch!(gpu, stream, "lazy_importance", "lazy_mean",
        grid: (n.div_ceil(256), 1, 1), smem: 0, args: [logits, ni, nq, out])?;
    Ok(())
}

/// Host in, host out (as `policy::lazy::importance`): errors on a token
/// beyond the sequence or a non-finite result.
pub fn lazy_importance(
    gpu: &GpuContext,
    shape: &AttnShape,
    kv: &DeviceKv,
    seq: usize,
    q: &[f32],
    tokens: &[u32],
) -> Result<Vec<f32>> {
    if q.len() != shape.q_elems() {
        return Err(Error::shape(
            "lazy importance query",
            shape.q_elems(),
            q.len(),
        ));
    }
    let len = *kv.lens.get(seq).ok_or_else(|| {
        Error::OutOfRange(format!(
            "lazy importance sequence {seq} of a DeviceKv holding {}",
            kv.batch()
        ))
    })?;
    if let Some(&t) = tokens.iter().find(|&&t| t as usize >= len) {
        return Err(Error::OutOfRange(format!(
            "lazy importance token {t} of a KV holding {len}"
        )));
    }
    let n = tokens.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    let (dq, dt) = (DevBuf::from_slice(q)?, DevBuf::from_slice(&ids)?);
    let out = DevBuf::alloc(n * 4)?;
    let mut ws = LazyWorkspace::default();
    launch_lazy_importance(
        gpu,
        &gpu.stream,
        shape,
        kv,
        seq,
        dq.ptr,
        dt.ptr,
        n,
        &mut ws,
        out.ptr,
    )?;
    gpu.synchronize()?;
    let imp: Vec<f32> = out.read(n)?;
    if let Some(i) = imp.iter().position(|x| !x.is_finite()) {
        return Err(Error::Invalid(format!(
            "lazy importance of token {} is {} (non-finite query or keys)",
            tokens[i], imp[i]
        )));
    }
    Ok(imp)
}

/// The LazyLLM keep set, importance and top-k both on the GPU
/// (`lazy_topk::lazy_keep_batch` with one sequence): the `k` most important
/// of `tokens` (ascending; `force` always kept; ties keep the later token),
/// as `policy::lazy::top_k` on the same importance.
#[allow(clippy::too_many_arguments)]
pub fn lazy_keep(
    gpu: &GpuContext,
    shape: &AttnShape,
    kv: &DeviceKv,
    seq: usize,
    q: &[f32],
    tokens: &[u32],
    k: usize,
    force: Option<u32>,
) -> Result<Vec<u32>> {
    let req = lazy_topk::LazyKeepRequest {
        seq,
        q,
        tokens,
        prompt: None,
        k,
        force,
    };
    let mut v = lazy_topk::lazy_keep_batch(gpu, shape, kv, &[req], false)?;
    Ok(v.pop().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelShape;

    #[test]
    fn new_kernels_are_registered() {
        for m in [
            "locret_score",
            "squeeze_lookup",
            "lazy_importance",
            "lazy_topk",
        ] {
            let src = kernels::full_source(m).expect(m);
            for ep in kernels::entry_points(m) {
                // lazy_logits_<dt> come from the LAZY_LOGITS(<dt>, ..) macro.
                let needle = match ep.strip_prefix("lazy_logits_") {
                    Some(dt) => format!("LAZY_LOGITS({dt},"),
                    None => ep.clone(),
                };
                assert!(src.contains(&needle), "{m} lacks {ep}");
            }
        }
        assert_eq!(kernels::entry_points("lazy_importance").len(), 4);
    }

    #[test]
    fn shape_errors_come_before_any_cuda_call() {
        let ms = ModelShape {
            n_layers: 1,
            n_q_heads: 8,
            n_kv_heads: 2,
            head_dim: 64,
            ..ModelShape::default()
        };
        let head = RetainingHead::random(&ms, 16, 1).unwrap();
        let wrong = AttnShape::new(8, 4, 64).unwrap();
        let e = LocretGpu::new(&head, &wrong).err().unwrap();
        assert!(e.to_string().contains("LocretGpu"), "{e}");
        let lvl = |k: usize| HeadIndex {
            fine: Level {
                dim: 4,
                centroids: vec![0.0; k * 4],
                sizes: vec![1; k],
                nonempty: (0..k as u32).collect(),
            },
            labels: Vec::new(),
            coarse: None,
        };
        let e = SqueezeGpu::upload(&[lvl(3), lvl(5)]).err().unwrap();
        assert!(e.to_string().contains("SqueezeGpu head 1"), "{e}");
        assert!(SqueezeGpu::upload(&[]).is_err());
    }
}
