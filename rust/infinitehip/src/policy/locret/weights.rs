//! Locret retaining heads: one small MLP per layer that scores every new KV
//! unit once, from the token's pre-RoPE projections.
//!
//! Upstream (`huangyuxiang03/Locret` @ 28995c5, `models/llama/modeling_llama.py`
//! `LlamaSdpaAttention.forward`, `models/phi3/modeling_phi3.py`):
//!
//! ```text
//! x     = cat(q_proj(h), k_proj(h), v_proj(h))        per token, before RoPE
//!         = [q head 0 .. q head n_q-1 | k head 0 .. n_kv-1 | v head 0 .. n_kv-1],
//!           each head `head_dim` values (the projections' natural order;
//!           Phi-3's fused qkv_proj has the same [q | k | v] order)
//! score = fc2(silu(fc1(x)))                           fc1: in -> hidden, fc2: hidden -> n_kv
//! ```
//!
//! Both linears have no bias; the activation is `ACT2FN[config.hidden_act]`,
//! SiLU for Llama-3.1 and Phi-3 (fixed here). The output is one raw score per
//! KV head (the regression target was the max pre-softmax logit pooled over
//! the KV head's query group), never softmaxed.
//!
//! Weight file (safetensors), tensor names as in upstream's state dict, so a
//! converted upstream checkpoint loads as is; layout is PyTorch's `[out, in]`:
//!
//! | tensor                                  | shape                                   |
//! |-----------------------------------------|-----------------------------------------|
//! | `model.layers.{l}.self_attn.fc1.weight` | `[hidden, (n_q_heads + 2 n_kv_heads) head_dim]` |
//! | `model.layers.{l}.self_attn.fc2.weight` | `[n_kv_heads, hidden]`                  |
//!
//! dtype F32, F16 or BF16 (converted to f32 at load). Only the layers that
//! use `locret` need their two tensors. Tensors that are not retaining-head
//! tensors are ignored (a whole upstream checkpoint loads), but a head tensor
//! the model cannot use is an error: a layer beyond the model's, or a bias
//! (upstream's heads have none, and a scorer that silently dropped one would
//! score differently from the one trained).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use half::{bf16, f16};

use crate::config::ModelShape;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::parallel::par_map;
use crate::rng::Rng;

/// Name of layer `layer`'s first linear (`[hidden, in]`).
pub fn fc1_name(layer: usize) -> String {
    format!("model.layers.{layer}.self_attn.fc1.weight")
}

/// Name of layer `layer`'s second linear (`[n_kv_heads, hidden]`).
pub fn fc2_name(layer: usize) -> String {
    format!("model.layers.{layer}.self_attn.fc2.weight")
}

/// One layer's retaining head, weights in f32.
#[derive(Clone, Debug)]
pub struct RetainingHead {
    n_q_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    hidden: usize,
    /// fc1 `[hidden][in]`.
    w1: Vec<f32>,
    /// fc2 `[n_kv_heads][hidden]`.
    w2: Vec<f32>,
}

#[inline]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Tokens sharing each load of an fc1 row in the micro-kernel.
const TOK_BLOCK: usize = 4;
/// Tokens per work item: fc1 is read from memory once per this many tokens.
const GEMM_TOKENS: usize = 64;
/// Input-width slice: a block's inputs for one slice (64 x 512 f32) stay in L2.
const GEMM_K: usize = 512;

/// `[dot(row, x0), .., dot(row, x3)]` with 8 lanes per token so the compiler
/// vectorises it and every row element is loaded once for four tokens.
#[inline]
fn dot4(row: &[f32], x: [&[f32]; TOK_BLOCK]) -> [f32; TOK_BLOCK] {
    let mut acc = [[0f32; 8]; TOK_BLOCK];
    let n8 = row.len() / 8 * 8;
    let rc = row[..n8].chunks_exact(8);
    let xc: [std::slice::ChunksExact<'_, f32>; TOK_BLOCK] =
        [0, 1, 2, 3].map(|t| x[t][..n8].chunks_exact(8));
    let [mut x0, mut x1, mut x2, mut x3] = xc;
    for r in rc {
        let (a, b, c, d) = (
            x0.next().unwrap(),
            x1.next().unwrap(),
            x2.next().unwrap(),
            x3.next().unwrap(),
        );
        for l in 0..8 {
            acc[0][l] += r[l] * a[l];
            acc[1][l] += r[l] * b[l];
            acc[2][l] += r[l] * c[l];
            acc[3][l] += r[l] * d[l];
        }
    }
    let mut out = [0f32; TOK_BLOCK];
    for t in 0..TOK_BLOCK {
        let mut s: f32 = acc[t].iter().sum();
        for i in n8..row.len() {
            s += row[i] * x[t][i];
        }
        out[t] = s;
    }
    out
}

impl RetainingHead {
    /// A head from f32 weights `w1` `[hidden][in]`, `w2` `[n_kv_heads][hidden]`.
    pub fn new(shape: &ModelShape, hidden: usize, w1: Vec<f32>, w2: Vec<f32>) -> Result<Self> {
        let input = (shape.n_q_heads + 2 * shape.n_kv_heads) * shape.head_dim;
        if hidden == 0 || w1.len() != hidden * input {
            return Err(Error::shape(
                "retaining head fc1",
                format!("{hidden} x {input}"),
                format!("{} elements", w1.len()),
            ));
        }
        if w2.len() != shape.n_kv_heads * hidden {
            return Err(Error::shape(
                "retaining head fc2",
                format!("{} x {hidden}", shape.n_kv_heads),
                format!("{} elements", w2.len()),
            ));
        }
        Ok(RetainingHead {
            n_q_heads: shape.n_q_heads,
            n_kv_heads: shape.n_kv_heads,
            head_dim: shape.head_dim,
            hidden,
            w1,
            w2,
        })
    }

    /// Random weights (normal, scaled by 1/sqrt(fan_in) like PyTorch's init),
    /// for tests and benchmarks without trained heads.
    pub fn random(shape: &ModelShape, hidden: usize, seed: u64) -> Result<Self> {
        let input = (shape.n_q_heads + 2 * shape.n_kv_heads) * shape.head_dim;
        let mut rng = Rng::new(seed);
        let w1 = rng.normal_vec(hidden * input, 1.0 / (input as f32).sqrt());
        let w2 = rng.normal_vec(
            shape.n_kv_heads * hidden,
            1.0 / (hidden.max(1) as f32).sqrt(),
        );
        Self::new(shape, hidden, w1, w2)
    }

    /// Layer `layer`'s head from a safetensors file, checked against `shape`
    /// and `hidden`. Reads only the header and the two tensors.
    pub fn load(path: &Path, shape: &ModelShape, hidden: usize, layer: usize) -> Result<Self> {
        let input = (shape.n_q_heads + 2 * shape.n_kv_heads) * shape.head_dim;
        let mut f = StFile::open(path)?;
        f.check_head_tensors(shape)?;
        if let Some(m) = f.tensors.get(&fc1_name(layer)) {
            if m.shape.len() == 2 && m.shape[1] == input && m.shape[0] != hidden {
                return Err(f.err(format!(
                    "tensor `{}` has shape {:?}, expected [{hidden}, {input}]: the file's heads \
                     have hidden width {}, set locret.hidden to {}",
                    fc1_name(layer),
                    m.shape,
                    m.shape[0],
                    m.shape[0]
                )));
            }
        }
        let w1 = f.read_f32(
            &fc1_name(layer),
            &[hidden, input],
            "[hidden, (n_q_heads + 2 n_kv_heads) * head_dim]",
        )?;
        let w2 = f.read_f32(
            &fc2_name(layer),
            &[shape.n_kv_heads, hidden],
            "[n_kv_heads, hidden]",
        )?;
        Self::new(shape, hidden, w1, w2)
    }

    /// Input width `(n_q_heads + 2 n_kv_heads) * head_dim`.
    pub fn input_dim(&self) -> usize {
        (self.n_q_heads + 2 * self.n_kv_heads) * self.head_dim
    }
    pub fn hidden(&self) -> usize {
        self.hidden
    }
    pub fn n_kv_heads(&self) -> usize {
        self.n_kv_heads
    }
    pub fn fc1(&self) -> &[f32] {
        &self.w1
    }
    pub fn fc2(&self) -> &[f32] {
        &self.w2
    }

    /// Number of tokens in (q, k, v), or a shape error.
    fn tokens(&self, q: &[f32], k: &[f32], v: &[f32]) -> Result<usize> {
        let (qd, kd) = (
            self.n_q_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        );
        let n = q.len() / qd;
        if n * qd != q.len() || k.len() != n * kd || v.len() != n * kd {
            return Err(Error::shape(
                "retaining head input (q, k, v)",
                format!("n x ({qd}, {kd}, {kd})"),
                format!("({}, {}, {})", q.len(), k.len(), v.len()),
            ));
        }
        Ok(n)
    }

    /// Copy token `t`'s `[q | k | v]` into `x`.
    fn gather(&self, q: &[f32], k: &[f32], v: &[f32], t: usize, x: &mut [f32]) {
        let (qd, kd) = (
            self.n_q_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        );
        x[..qd].copy_from_slice(&q[t * qd..(t + 1) * qd]);
        x[qd..qd + kd].copy_from_slice(&k[t * kd..(t + 1) * kd]);
        x[qd + kd..].copy_from_slice(&v[t * kd..(t + 1) * kd]);
    }

    /// Scores `[n][n_kv_heads]` for n tokens of pre-RoPE projections q
    /// `[n][n_q_heads][d]`, k and v `[n][n_kv_heads][d]`. f32, blocked like a
    /// small GEMM: tokens in blocks of `GEMM_TOKENS` (fc1 streams from memory
    /// once per block), the input width in slices of `GEMM_K` (the block's
    /// inputs stay in cache), four tokens per row load; work items (token
    /// block, range of hidden rows) spread over all cores.
    pub fn scores(&self, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        self.scores_on(q, k, v, crate::parallel::num_threads())
    }

    /// As `scores`, on the calling thread only: for callers that run inside
    /// a thread pool of their own (llama.cpp's ggml custom ops).
    pub fn scores_serial(&self, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        self.scores_on(q, k, v, 1)
    }

    fn scores_on(&self, q: &[f32], k: &[f32], v: &[f32], threads: usize) -> Result<Vec<f32>> {
        let n = self.tokens(q, k, v)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let (input, hidden, nkv) = (self.input_dim(), self.hidden, self.n_kv_heads);
        let blocks = n.div_ceil(GEMM_TOKENS);
        // Split hidden rows too when there are fewer token blocks than threads.
        let groups = threads.div_ceil(blocks).clamp(1, hidden.div_ceil(64));
        let rows = |g: usize| g * hidden / groups..(g + 1) * hidden / groups;
        let item = |it: usize| {
            let (b, g) = (it / groups, it % groups);
            let t0 = b * GEMM_TOKENS;
            let tb = GEMM_TOKENS.min(n - t0);
            let tp = tb.div_ceil(TOK_BLOCK) * TOK_BLOCK;
            let mut x = vec![0f32; tp * input];
            for (i, xt) in x.chunks_exact_mut(input).enumerate() {
                // Padding tokens repeat the block's last token (dropped).
                self.gather(q, k, v, t0 + i.min(tb - 1), xt);
            }
            let r = rows(g);
            let nr = r.len();
            // Pre-activation sums [token][row of this group].
            let mut acc = vec![0f32; tp * nr];
            for k0 in (0..input).step_by(GEMM_K) {
                let k1 = (k0 + GEMM_K).min(input);
                for (jr, j) in r.clone().enumerate() {
                    let row = &self.w1[j * input + k0..j * input + k1];
                    for t4 in (0..tp).step_by(TOK_BLOCK) {
                        let xs: [&[f32]; TOK_BLOCK] =
                            [0, 1, 2, 3].map(|i| &x[(t4 + i) * input + k0..(t4 + i) * input + k1]);
                        let d = dot4(row, xs);
                        for i in 0..TOK_BLOCK {
                            acc[(t4 + i) * nr + jr] += d[i];
                        }
                    }
                }
            }
            acc.truncate(tb * nr);
            acc.iter_mut().for_each(|a| *a = silu(*a));
            acc
        };
        let parts = if threads <= 1 {
            (0..blocks * groups).map(item).collect::<Vec<_>>()
        } else {
            par_map(blocks * groups, item)
        };
        // fc2 over each token's full hidden vector (cheap: hidden * n_kv).
        let mut h = vec![0f32; hidden];
        let mut out = Vec::with_capacity(n * nkv);
        for t in 0..n {
            let (b, tt) = (t / GEMM_TOKENS, t % GEMM_TOKENS);
            for g in 0..groups {
                let r = rows(g);
                let nr = r.len();
                h[r].copy_from_slice(&parts[b * groups + g][tt * nr..(tt + 1) * nr]);
            }
            for row in self.w2.chunks_exact(hidden) {
                out.push(crate::dtype::dot_f32(row, &h));
            }
        }
        Ok(out)
    }

    /// The same scores in f64, one token at a time: the reference twin of
    /// `scores` for tests.
    pub fn scores_f64_reference(&self, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f64>> {
        let n = self.tokens(q, k, v)?;
        let input = self.input_dim();
        let mut x = vec![0f32; input];
        let mut out = Vec::with_capacity(n * self.n_kv_heads);
        for t in 0..n {
            self.gather(q, k, v, t, &mut x);
            let h: Vec<f64> = self
                .w1
                .chunks_exact(input)
                .map(|row| {
                    let s: f64 = row.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
                    s / (1.0 + (-s).exp())
                })
                .collect();
            for row in self.w2.chunks_exact(self.hidden) {
                out.push(row.iter().zip(&h).map(|(&a, &b)| a as f64 * b).sum());
            }
        }
        Ok(out)
    }
}

/// Write random retaining heads for every layer of `shape` to a safetensors
/// file in `dtype` (tensor names above), so benchmarks and tests can run
/// Locret without trained weights.
pub fn write_random_weights(
    path: &Path,
    shape: &ModelShape,
    hidden: usize,
    dtype: DType,
    seed: u64,
) -> Result<()> {
    let heads = (0..shape.n_layers)
        .map(|l| RetainingHead::random(shape, hidden, seed.wrapping_add(l as u64 * 7919)))
        .collect::<Result<Vec<_>>>()?;
    write_weights(path, &heads, dtype)
}

/// Write one retaining head per layer (`heads[l]` for layer l) to a
/// safetensors file in `dtype`, under the tensor names above.
pub fn write_weights(path: &Path, heads: &[RetainingHead], dtype: DType) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let werr = |reason: String| Error::weights(path.display().to_string(), reason);
    let encode = |x: &[f32]| -> Vec<u8> {
        match dtype {
            DType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::F16 => x
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            DType::Bf16 => x
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
        }
    };
    let st_dtype = match dtype {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::Bf16 => Dtype::BF16,
    };
    let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (l, head) in heads.iter().enumerate() {
        let (hidden, input) = (head.hidden(), head.input_dim());
        bufs.push((fc1_name(l), vec![hidden, input], encode(head.fc1())));
        bufs.push((
            fc2_name(l),
            vec![head.n_kv_heads(), hidden],
            encode(head.fc2()),
        ));
    }
    let views = bufs
        .iter()
        .map(|(name, shp, data)| {
            TensorView::new(st_dtype, shp.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| werr(format!("building tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize_to_file(views, &None, path)
        .map_err(|e| werr(format!("writing: {e}")))
}

/// Metadata of one tensor in a safetensors header.
struct TensorMeta {
    dtype: String,
    shape: Vec<usize>,
    /// Byte range relative to the data section.
    start: u64,
    end: u64,
}

/// A safetensors file whose header was read; tensors are read on demand.
struct StFile {
    path: String,
    file: File,
    data_start: u64,
    tensors: HashMap<String, TensorMeta>,
}

impl StFile {
    fn err(&self, reason: impl Into<String>) -> Error {
        Error::weights(self.path.clone(), reason)
    }

    fn open(path: &Path) -> Result<Self> {
        let p = path.display().to_string();
        let werr = |reason: String| Error::weights(p.clone(), reason);
        let mut file = File::open(path).map_err(|e| werr(format!("cannot open: {e}")))?;
        let file_len = file
            .metadata()
            .map_err(|e| werr(format!("cannot stat: {e}")))?
            .len();
        let mut n8 = [0u8; 8];
        file.read_exact(&mut n8).map_err(|e| {
            werr(format!(
                "not a safetensors file (no 8-byte header length): {e}"
            ))
        })?;
        let n = u64::from_le_bytes(n8);
        if n > 100 << 20 || 8 + n > file_len {
            return Err(werr(format!(
                "not a safetensors file: header length {n} does not fit the file's {file_len} bytes"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .map_err(|e| werr(format!("reading the header: {e}")))?;
        let json: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| werr(format!("header is not valid safetensors JSON: {e}")))?;
        let data_len = file_len - 8 - n;
        let mut tensors = HashMap::new();
        for (name, v) in json {
            if name == "__metadata__" {
                continue;
            }
            let bad =
                |what: &str| werr(format!("tensor `{name}`: malformed header entry ({what})"));
            let dtype = v["dtype"].as_str().ok_or_else(|| bad("dtype"))?.to_string();
            let shape = v["shape"]
                .as_array()
                .ok_or_else(|| bad("shape"))?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("shape"))?;
            let off = v["data_offsets"]
                .as_array()
                .ok_or_else(|| bad("data_offsets"))?;
            let (start, end) = match (off.first().and_then(|x| x.as_u64()), off.get(1).and_then(|x| x.as_u64())) {
                (Some(s), Some(e)) if off.len() == 2 && s <= e && e <= data_len => (s, e),
                _ => {
                    return Err(werr(format!(
                        "tensor `{name}`: data_offsets {off:?} outside the data section of {data_len} bytes"
                    )))
                }
            };
            tensors.insert(
                name,
                TensorMeta {
                    dtype,
                    shape,
                    start,
                    end,
                },
            );
        }
        Ok(StFile {
            path: p,
            file,
            data_start: 8 + n,
            tensors,
        })
    }

    /// Every retaining-head tensor (`model.layers.{l}.self_attn.fc{1,2}.*`)
    /// must be a weight of a layer the model has.
    fn check_head_tensors(&self, shape: &ModelShape) -> Result<()> {
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        for name in names {
            let Some(rest) = name.strip_prefix("model.layers.") else {
                continue;
            };
            let Some((layer, tail)) = rest.split_once('.') else {
                continue;
            };
            let Some(part) = tail
                .strip_prefix("self_attn.fc1.")
                .or_else(|| tail.strip_prefix("self_attn.fc2."))
            else {
                continue;
            };
            if part != "weight" {
                return Err(self.err(format!(
                    "unexpected tensor `{name}`: retaining heads are fc1/fc2 weights without \
                     bias (upstream's Linear(bias=False)); this scorer would ignore it"
                )));
            }
            match layer.parse::<usize>() {
                Ok(l) if l < shape.n_layers => {}
                _ => {
                    return Err(self.err(format!(
                        "tensor `{name}` is for layer {layer}, but the model has {} layers \
                         (0..{}): heads trained for another model?",
                        shape.n_layers,
                        shape.n_layers.saturating_sub(1)
                    )))
                }
            }
        }
        Ok(())
    }

    /// Read tensor `name` as f32, checking its shape and dtype.
    fn read_f32(&mut self, name: &str, expected: &[usize], layout: &str) -> Result<Vec<f32>> {
        let Some(m) = self.tensors.get(name) else {
            let mut names: Vec<&String> = self.tensors.keys().collect();
            names.sort();
            names.truncate(4);
            return Err(self.err(format!(
                "tensor `{name}` is missing (expected shape {expected:?} = {layout}; the file has {} tensors, e.g. {names:?})",
                self.tensors.len()
            )));
        };
        let size = match m.dtype.as_str() {
            "F32" => 4,
            "F16" | "BF16" => 2,
            other => {
                return Err(self.err(format!(
                    "tensor `{name}` has dtype {other}; expected F32, F16 or BF16"
                )))
            }
        };
        if m.shape != expected {
            return Err(self.err(format!(
                "tensor `{name}` has shape {:?}, expected {expected:?} = {layout}",
                m.shape
            )));
        }
        let count: usize = expected.iter().product();
        if m.end - m.start != (count * size) as u64 {
            return Err(self.err(format!(
                "tensor `{name}`: {} data bytes for shape {expected:?} in {} (expected {})",
                m.end - m.start,
                m.dtype,
                count * size
            )));
        }
        let mut bytes = vec![0u8; count * size];
        let (start, dtype) = (self.data_start + m.start, m.dtype.clone());
        self.file
            .seek(SeekFrom::Start(start))
            .and_then(|_| self.file.read_exact(&mut bytes))
            .map_err(|e| self.err(format!("reading tensor `{name}`: {e}")))?;
        let out: Vec<f32> = match dtype.as_str() {
            "F32" => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            "F16" => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            _ => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        };
        if let Some(i) = out.iter().position(|x| !x.is_finite()) {
            return Err(self.err(format!(
                "tensor `{name}` holds a non-finite value ({}) at flat index {i}",
                out[i]
            )));
        }
        Ok(out)
    }
}
