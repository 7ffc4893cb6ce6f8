//! llama.cpp attention through our policies, over llama.cpp's own KV buffers.
//!
//! llama.cpp keeps K/V per layer in slots ("cells") and passes positions to
//! attention only through `kq_mask` (0 = visible, -inf = hidden). For each
//! stream the plugin reads the mask rows of the ubatch's queries: when they
//! form one causal chain — every query sees a prefix of one ordered cell
//! list `L`, growing by one cell per query, with no bias — `L` is the
//! sequence in cell order (= position order for append-only generation) and
//! the layer's policy selects token ranges over it exactly as the engine
//! would; attention then reads only the selected cells. Anything else
//! (several sequences in one stream, a biased mask) is attended exactly over
//! each query's visible cells ("masked" path: correct, not sparse).
//!
//! The split into `plan` (selection, one thread) and `attend` (any number of
//! threads over disjoint work items) matches ggml's custom-op threading: two
//! graph nodes, the second depending on the first.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use half::f16;
use infinitehip::attention::AttnShape;
use infinitehip::config::{LayerPolicy, PolicyConfig, RopeMode};
use infinitehip::dtype::{axpy_f32, dot_f32, Element};
use infinitehip::engine::build_policy;
use infinitehip::kv::KvRead;
use infinitehip::policy::lazy::LazyShared;
use infinitehip::policy::{InsertInfo, Phase, Policy, SelectRequest, Selection};
use infinitehip::team::Team;
use infinitehip::{Error, Result};

use crate::ffi::{ModelInfo, RopeInfo, TensorDesc};
use crate::llama_attend::{
    attend_reference, attend_run_moved, attend_run_partial, merge_partials, use_reference, HeadKv,
    KeyMove, Partial, Rows,
};
use crate::llama_lazy::LazyRows;
use crate::llama_locret::{view, LocretLlama};
use crate::llama_profile::{Count, Profile, Slot};
use crate::llama_rope::{streaming_shift, Layout, LlamaRope};
use crate::{stats_unavailable, Poison};

/// `ggml_type` ids we read.
pub const GGML_TYPE_F32: u32 = 0;
pub const GGML_TYPE_F16: u32 = 1;

/// Methods that run over llama.cpp's cache unchanged: their selection needs
/// queries and keys, plus the `after_append` hook at the end of the prompt
/// (squeeze clusters its prefix then) and state shared across layers (lazy's
/// keep sets), both driven from `plan`. Locret evicts tokens from llama.cpp's
/// KV cells instead (`llama_locret`): its layers keep llama.cpp's attention.
const SUPPORTED_METHODS: &[&str] = &["dense", "hip", "lazy", "squeeze", "locret"];

#[derive(Clone, Copy)]
enum Data<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

/// A strided ggml view with element strides, bounds checked once.
#[derive(Clone, Copy)]
pub struct View<'a> {
    data: Data<'a>,
    pub(crate) ne: [usize; 4],
    pub(crate) st: [usize; 4],
}

impl<'a> View<'a> {
    pub fn new(bytes: &'a [u8], d: &TensorDesc, what: &str) -> Result<Self> {
        let es = match d.dtype {
            GGML_TYPE_F32 => 4,
            GGML_TYPE_F16 => 2,
            t => {
                return Err(Error::Dtype {
                    what: what.into(),
                    got: format!("ggml_type {t}"),
                    supported: "F32 (0), F16 (1)".into(),
                })
            }
        };
        let ne = [d.ne0, d.ne1, d.ne2, d.ne3];
        let nb = [d.nb0, d.nb1, d.nb2, d.nb3];
        if ne.iter().any(|&n| n <= 0) {
            return Err(Error::shape(what, "all ne > 0", format!("{ne:?}")));
        }
        if nb.iter().any(|&b| !b.is_multiple_of(es as u64))
            || !(bytes.as_ptr() as usize).is_multiple_of(es)
        {
            return Err(Error::shape(
                what,
                format!("strides and address aligned to {es} bytes"),
                format!("nb {nb:?}"),
            ));
        }
        let ne = ne.map(|n| n as usize);
        let st = nb.map(|b| b as usize / es);
        let span = (0..4).map(|i| (ne[i] - 1) * st[i]).sum::<usize>() + 1;
        let n = bytes.len() / es;
        if span > n {
            return Err(Error::shape(
                format!("{what} buffer"),
                format!(">= {} bytes for ne {ne:?} nb {nb:?}", span * es),
                format!("{} bytes", bytes.len()),
            ));
        }
        // SAFETY: alignment checked above; f16 is repr(transparent) over u16.
        let data = unsafe {
            match d.dtype {
                GGML_TYPE_F32 => {
                    Data::F32(std::slice::from_raw_parts(bytes.as_ptr() as *const f32, n))
                }
                _ => Data::F16(std::slice::from_raw_parts(bytes.as_ptr() as *const f16, n)),
            }
        };
        Ok(View { data, ne, st })
    }

    #[inline]
    pub(crate) fn idx(&self, i0: usize, i1: usize, i2: usize, i3: usize) -> usize {
        i0 * self.st[0] + i1 * self.st[1] + i2 * self.st[2] + i3 * self.st[3]
    }

    #[inline]
    pub(crate) fn get(&self, i: usize) -> f32 {
        match self.data {
            Data::F32(s) => s[i],
            Data::F16(s) => s[i].to_f32(),
        }
    }
}

/// The geometry of one attention call, checked against the layer's config.
#[derive(Clone, Copy, Debug)]
struct Geom {
    d: usize,
    n_head: usize,
    n_kv_heads: usize,
    n_tokens: usize,
    n_stream: usize,
    n_kv: usize,
}

struct Inputs<'a> {
    q: View<'a>,
    k: View<'a>,
    v: View<'a>,
    v_trans: bool,
    mask: View<'a>,
    g: Geom,
}

impl<'a> Inputs<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        q: &'a [u8],
        qd: &TensorDesc,
        k: &'a [u8],
        kd: &TensorDesc,
        v: &'a [u8],
        vd: &TensorDesc,
        v_trans: bool,
        mask: &'a [u8],
        md: &TensorDesc,
    ) -> Result<Self> {
        let q = View::new(q, qd, "q")?;
        let k = View::new(k, kd, "k")?;
        let v = View::new(v, vd, "v")?;
        let mask = View::new(mask, md, "kq_mask")?;
        if !matches!(q.data, Data::F32(_)) {
            return Err(Error::Dtype {
                what: "q".into(),
                got: "F16".into(),
                supported: "F32".into(),
            });
        }
        let [d, n_head, n_tokens, n_stream] = q.ne;
        let [kd0, n_kv_heads, n_kv, ks] = k.ne;
        let g = Geom {
            d,
            n_head,
            n_kv_heads,
            n_tokens,
            n_stream,
            n_kv,
        };
        if kd0 != d || ks != n_stream || q.st[0] != 1 || k.st[0] != 1 {
            return Err(Error::shape(
                "k",
                format!("[{d}, n_kv_heads, n_kv, {n_stream}] with contiguous rows (q and k)"),
                format!("{:?} (q {:?})", k.ne, q.ne),
            ));
        }
        if n_head % n_kv_heads != 0 {
            return Err(Error::shape(
                "q heads",
                format!("a multiple of n_kv_heads {n_kv_heads}"),
                n_head,
            ));
        }
        let want_v = if v_trans {
            [n_kv, n_kv_heads, d, n_stream]
        } else {
            [d, n_kv_heads, n_kv, n_stream]
        };
        if v.ne != want_v {
            return Err(Error::shape(
                if v_trans { "v (transposed)" } else { "v" },
                format!("{want_v:?}"),
                format!("{:?}", v.ne),
            ));
        }
        if mask.ne[0] != n_kv
            || mask.ne[1] < n_tokens
            || !(mask.ne[3] == n_stream || mask.ne[3] == 1)
        {
            return Err(Error::shape(
                "kq_mask",
                format!("[{n_kv}, >= {n_tokens}, *, {n_stream} or 1]"),
                format!("{:?}", mask.ne),
            ));
        }
        Ok(Inputs {
            q,
            k,
            v,
            v_trans,
            mask,
            g,
        })
    }

    fn mask_at(&self, cell: usize, row: usize, s: usize) -> f32 {
        let s = if self.mask.ne[3] == 1 { 0 } else { s };
        self.mask.get(self.mask.idx(cell, row, 0, s))
    }

    /// Query heads `h0..h0+n` of token `t` in stream `s`, as `[n][d]` f32.
    fn query(&self, t: usize, s: usize, h0: usize, n: usize, out: &mut Vec<f32>) {
        out.clear();
        let Data::F32(q) = self.q.data else {
            unreachable!("checked in new")
        };
        for h in h0..h0 + n {
            let o = self.q.idx(0, h, t, s);
            out.extend_from_slice(&q[o..o + self.g.d]);
        }
    }
}

/// The cell list of one stream when the ubatch is one causal chain:
/// `(cells, q_pos)` with `q_pos[t]` the logical position of query t.
/// None when the rows do not form one chain or carry a bias.
fn causal_chain(inp: &Inputs<'_>, s: usize) -> Option<(Vec<u32>, Vec<usize>)> {
    let (n, n_kv) = (inp.g.n_tokens, inp.g.n_kv);
    let last = n - 1;
    let rows = (inp.mask.st[0] == 1)
        .then(|| mask_rows(inp, s, n))
        .flatten();
    // The last row's visible cells: on contiguous rows a scan of the raw
    // bits (every layer of every step reads a whole row: at 16K the
    // per-element read cost 40 us a layer), else element by element.
    let cells = match &rows {
        Some(RowBits::F32(r)) => visible_cells(r[last], f32::NEG_INFINITY.to_bits())?,
        Some(RowBits::F16(r)) => visible_cells(r[last], f16::NEG_INFINITY.to_bits())?,
        None => {
            let mut cells = Vec::new();
            for c in 0..n_kv {
                let m = inp.mask_at(c, last, s);
                if m == 0.0 {
                    cells.push(c as u32);
                } else if m != f32::NEG_INFINITY {
                    return None;
                }
            }
            cells
        }
    };
    let len = cells.len();
    if len < n {
        return None;
    }
    let first_len = len - last;
    // Row t must show exactly cells[..want]. Below cells[want] it equals the
    // (fully checked) last row bit for bit; from cells[want] on it is -inf.
    for t in 0..last {
        let want = first_len + t;
        let b = cells[want] as usize;
        let ok = match &rows {
            Some(RowBits::F32(r)) => {
                r[t][..b] == r[last][..b]
                    && r[t][b..].iter().all(|&x| x == f32::NEG_INFINITY.to_bits())
            }
            Some(RowBits::F16(r)) => {
                r[t][..b] == r[last][..b]
                    && r[t][b..].iter().all(|&x| x == f16::NEG_INFINITY.to_bits())
            }
            None => {
                let mut cnt = 0;
                let mut ok = true;
                for c in 0..n_kv {
                    let m = inp.mask_at(c, t, s);
                    if m == 0.0 {
                        if cnt >= want || cells[cnt] != c as u32 {
                            ok = false;
                            break;
                        }
                        cnt += 1;
                    } else if m != f32::NEG_INFINITY {
                        ok = false;
                        break;
                    }
                }
                ok && cnt == want
            }
        };
        if !ok {
            return None;
        }
    }
    Some((cells, (0..n).map(|t| first_len - 1 + t).collect()))
}

/// Raw mask bits (f32 as u32, f16 as u16) for `visible_cells`.
trait MaskBits: Copy + Eq + Into<u32> {
    /// The sign bit: +0.0 and -0.0 both mean "visible".
    const SIGN: u32;
}
impl MaskBits for u32 {
    const SIGN: u32 = 0x8000_0000;
}
impl MaskBits for u16 {
    const SIGN: u32 = 0x8000;
}

/// The cells a mask row shows (0.0, either sign) when every other entry is
/// `neg_inf`; None when an entry is anything else (a bias, NaN). Blocks of
/// 32 entries that are all `neg_inf` or all +0.0 (the common case) are taken
/// whole; the branch-free folds vectorise.
fn visible_cells<B: MaskBits>(row: &[B], neg_inf: B) -> Option<Vec<u32>> {
    const BLOCK: usize = 32;
    let mut cells = Vec::new();
    let one = |c: usize, b: B, cells: &mut Vec<u32>| {
        if b.into() & !B::SIGN == 0 {
            cells.push(c as u32);
            true
        } else {
            b == neg_inf
        }
    };
    let mut c0 = 0;
    for blk in row.chunks(BLOCK) {
        if blk.iter().fold(true, |a, &b| a & (b == neg_inf)) {
        } else if blk.iter().fold(true, |a, &b| a & (b.into() == 0)) {
            cells.extend(c0 as u32..(c0 + blk.len()) as u32);
        } else {
            for (j, &b) in blk.iter().enumerate() {
                if !one(c0 + j, b, &mut cells) {
                    return None;
                }
            }
        }
        c0 += blk.len();
    }
    Some(cells)
}

/// Mask rows `0..n` of stream `s` as raw bits (rows contiguous in cells).
enum RowBits<'a> {
    F32(Vec<&'a [u32]>),
    F16(Vec<&'a [u16]>),
}

fn mask_rows<'a>(inp: &Inputs<'a>, s: usize, n: usize) -> Option<RowBits<'a>> {
    let m = &inp.mask;
    let s = if m.ne[3] == 1 { 0 } else { s };
    let n_kv = m.ne[0];
    let offs = (0..n).map(|t| m.idx(0, t, 0, s));
    Some(match m.data {
        Data::F32(d) => {
            // SAFETY: f32 and u32 have the same size and alignment.
            let bits = unsafe { std::slice::from_raw_parts(d.as_ptr() as *const u32, d.len()) };
            RowBits::F32(offs.map(|o| &bits[o..o + n_kv]).collect())
        }
        Data::F16(d) => {
            // SAFETY: f16 is repr(transparent) over u16.
            let bits = unsafe { std::slice::from_raw_parts(d.as_ptr() as *const u16, d.len()) };
            RowBits::F16(offs.map(|o| &bits[o..o + n_kv]).collect())
        }
    })
}

/// A stream's sequence (cell order) as the engine's `KvRead`.
struct LlamaKv<'a> {
    inp: &'a Inputs<'a>,
    s: usize,
    cells: &'a [u32],
}

impl KvRead for LlamaKv<'_> {
    fn len(&self) -> usize {
        self.cells.len()
    }
    fn n_kv_heads(&self) -> usize {
        self.inp.g.n_kv_heads
    }
    fn head_dim(&self) -> usize {
        self.inp.g.d
    }
    fn dot_key(&self, head: usize, tok: usize, q: &[f32]) -> f32 {
        let o = self.inp.k.idx(0, head, self.cells[tok] as usize, self.s);
        let d = self.inp.g.d;
        match self.inp.k.data {
            Data::F32(k) => dot_f32(q, &k[o..o + d]),
            Data::F16(k) => dot_f32(q, &k[o..o + d]),
        }
    }
    fn read_key(&self, head: usize, tok: usize, out: &mut [f32]) {
        let o = self.inp.k.idx(0, head, self.cells[tok] as usize, self.s);
        // rows are contiguous (checked in `Inputs::new`): one slice conversion
        match self.inp.k.data {
            Data::F32(k) => out.copy_from_slice(&k[o..o + out.len()]),
            Data::F16(k) => {
                use half::slice::HalfFloatSliceExt;
                k[o..o + out.len()].convert_to_f32_slice(out)
            }
        }
    }
    fn prefetch_key(&self, head: usize, tok: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let o = self.inp.k.idx(0, head, self.cells[tok] as usize, self.s);
            let d = self.inp.g.d;
            let (base, bytes) = match self.inp.k.data {
                Data::F32(k) => (k[o..o + d].as_ptr() as *const i8, 4 * d),
                Data::F16(k) => (k[o..o + d].as_ptr() as *const i8, 2 * d),
            };
            for off in (0..bytes).step_by(64) {
                // SAFETY: prefetch is a hint; the address lies inside the row.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        base.add(off),
                    )
                };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (head, tok);
    }
    fn read_value(&self, head: usize, tok: usize, out: &mut [f32]) {
        let c = self.cells[tok] as usize;
        for (j, x) in out.iter_mut().enumerate() {
            let i = if self.inp.v_trans {
                self.inp.v.idx(c, head, j, self.s)
            } else {
                self.inp.v.idx(j, head, c, self.s)
            };
            *x = self.inp.v.get(i);
        }
    }
}

/// A stream's keys permuted to the halves RoPE layout, for the core's
/// scoring modes (which rotate keys with `infinitehip::rope::Rope`).
struct HalvesKv<'a> {
    kv: &'a LlamaKv<'a>,
    rope: &'a LlamaRope,
}

impl KvRead for HalvesKv<'_> {
    fn len(&self) -> usize {
        self.kv.len()
    }
    fn n_kv_heads(&self) -> usize {
        self.kv.n_kv_heads()
    }
    fn head_dim(&self) -> usize {
        self.kv.head_dim()
    }
    fn dot_key(&self, head: usize, tok: usize, q: &[f32]) -> f32 {
        let mut k = [0f32; 512];
        let k = &mut k[..self.head_dim()];
        self.read_key(head, tok, k);
        dot_f32(q, k)
    }
    fn prefetch_key(&self, head: usize, tok: usize) {
        self.kv.prefetch_key(head, tok)
    }
    fn read_key(&self, head: usize, tok: usize, out: &mut [f32]) {
        let inp = self.kv.inp;
        let o = inp.k.idx(0, head, self.kv.cells[tok] as usize, self.kv.s);
        match inp.k.data {
            // f16 (llama.cpp's default K type): convert and permute in one
            // pass (bit-identical to convert, then `to_halves`).
            Data::F16(k) => self.rope.to_halves_f16(&k[o..o + out.len()], out),
            Data::F32(k) => self.rope.to_halves(&k[o..o + out.len()], out),
        }
    }
    fn read_value(&self, head: usize, tok: usize, out: &mut [f32]) {
        self.kv.read_value(head, tok, out)
    }
}

/// What `plan` decided for one stream.
pub(crate) enum StreamPlan {
    /// One causal chain: query t attends `sels[sel_of[t]]` over `cells`,
    /// clipped to logical positions `<= q_pos[t]`.
    Sparse {
        cells: Vec<u32>,
        q_pos: Vec<usize>,
        sel_of: Vec<u32>,
        sels: Vec<Selection>,
    },
    /// Exact attention over each query's visible cells (mask as bias).
    Masked,
}

pub(crate) struct Plan {
    geom: (usize, usize, usize, usize, usize),
    pub(crate) streams: Vec<StreamPlan>,
}

struct LayerState {
    policy: Box<dyn Policy>,
    /// Per stream: (first cell, chain length) at the last plan, to notice a
    /// sequence that was cleared or rewritten and restart the policy state.
    seen: HashMap<usize, (u32, usize)>,
    plan: Option<Arc<Plan>>,
    warned_masked: bool,
    /// Per stream: the prompt length when the prompt was declared done
    /// (`after_append` with `prompt_done`), see `plan`.
    sealed: HashMap<usize, usize>,
}

struct Layer {
    method: &'static str,
    state: Option<Mutex<LayerState>>,
    /// hip.rope.scoring is not `original`: the policy sees halves-layout
    /// keys and queries (llama.cpp's may be interleaved).
    score_halves: bool,
    /// hip.rope.attention is `streaming`.
    streaming: bool,
}

#[derive(Default)]
struct Counters {
    plans: AtomicU64,
    sparse_streams: AtomicU64,
    masked_streams: AtomicU64,
    attended_tokens: AtomicU64,
    context_tokens: AtomicU64,
    /// Streams whose prompt end was detected (`after_append` with
    /// `prompt_done`), summed over sparse layers.
    prompts_done: AtomicU64,
    /// Attend ops whose items' cells were split across threads (`attend_team`).
    split_attends: AtomicU64,
}

/// The plugin of one llama.cpp context: per layer, the method and (for
/// non-dense layers) the policy with its per-stream state.
pub struct LlamaPlugin {
    cfg: PolicyConfig,
    layers: Vec<Layer>,
    counters: Counters,
    /// LazyLLM state shared by the lazy layers (None when none is lazy).
    lazy: Option<LazyShared>,
    /// Per stream: (first cell, chain length) of the lazy step in progress.
    /// Every lazy layer sees the same step; only the first one to see a
    /// chain that does not continue the last restarts the shared state.
    lazy_steps: Mutex<HashMap<usize, (u32, usize)>>,
    /// Locret's token eviction over llama.cpp's cells (None when no layer
    /// runs locret).
    locret: Option<LocretLlama>,
    /// llama.cpp's RoPE, when some hip layer uses a RoPE mode.
    rope: Option<LlamaRope>,
    /// What llama.cpp told us about its RoPE (patch 0006), if anything.
    rope_info: Option<RopeInfo>,
    /// LazyLLM row dropping (patch 0007), when some layer runs `lazy`.
    pub(crate) lazy_rows: Option<LazyRows>,
    /// Set by a caught panic (`guarded`).
    pub poison: Poison,
    /// `LLAMA_INFINITEHIP_PROFILE=1` timings.
    profile: Profile,
    /// ggml's threads during a plan op (`plan_team`).
    team: Team,
    /// ggml's threads during an attend op (`attend_team`).
    attend_team: Team,
}

/// Fill `model` from the host's geometry when absent; check it when present.
fn resolve_config(config_json: &str, m: &ModelInfo) -> Result<PolicyConfig> {
    let mut v: serde_json::Value = serde_json::from_str(config_json)?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| Error::config("(root)", "must be a JSON object"))?;
    let host = serde_json::json!({
        "n_layers": m.n_layers,
        "n_q_heads": m.n_q_heads,
        "n_kv_heads": m.n_kv_heads,
        "head_dim": m.head_dim,
        "rope_theta": m.rope_theta,
        "max_position": m.n_ctx_train.max(1),
    });
    match obj.get_mut("model") {
        None => {
            obj.insert("model".into(), host);
        }
        Some(given) => {
            let g = given
                .as_object_mut()
                .ok_or_else(|| Error::config("model", "must be an object"))?;
            for key in ["n_layers", "n_q_heads", "n_kv_heads", "head_dim"] {
                match g.get(key) {
                    None => {
                        g.insert(key.into(), host[key].clone());
                    }
                    Some(x) if *x != host[key] => {
                        return Err(Error::config(
                            format!("model.{key}"),
                            format!("{x} but the llama.cpp model has {}", host[key]),
                        ))
                    }
                    Some(_) => {}
                }
            }
            for key in ["rope_theta", "max_position"] {
                if !g.contains_key(key) {
                    g.insert(key.into(), host[key].clone());
                }
            }
        }
    }
    PolicyConfig::from_json(&v.to_string())
}

/// The layer's RoPE handling: (score_halves, streaming), checked against
/// what llama.cpp told us about its RoPE (`rope`: None without patch 0006).
fn layer_rope(
    l: usize,
    p: &LayerPolicy,
    cfg: &PolicyConfig,
    rope: Option<&RopeInfo>,
    built: &mut Option<LlamaRope>,
) -> Result<(bool, bool)> {
    let LayerPolicy::Hip(h) = p else {
        return Ok((false, false));
    };
    let (scoring, streaming) = (
        h.rope.scoring != RopeMode::Original,
        h.rope.attention == RopeMode::Streaming,
    );
    if !scoring && !streaming {
        return Ok((false, false));
    }
    let at = format!("layer {l} hip.rope");
    let r = rope.ok_or_else(|| {
        Error::config(
            &at,
            "RoPE modes need llama.cpp's rope parameters: rebuild llama.cpp with \
             patches/llama.cpp/0006-infinitehip-rope-modes.patch (or use \"original\")",
        )
    })?;
    if r.yarn {
        return Err(Error::config(
            &at,
            "the model uses YaRN RoPE scaling; the RoPE modes support plain and linear RoPE",
        ));
    }
    if built.is_none() {
        *built = Some(LlamaRope::new(
            r.rope_type,
            cfg.model.head_dim,
            r.n_rot as usize,
            r.freq_base,
            r.freq_scale,
        )?);
    }
    let lr = built.as_ref().expect("built above");
    if scoring && !(lr.core_compatible(r.freq_scale) && cfg.model.rope_theta == r.freq_base) {
        return Err(Error::config(
            format!("{at}.scoring"),
            format!(
                "chunk_indexed/relative scoring rotates whole heads at model.rope_theta; llama.cpp \
                 rotates {} of {} dims at base {} scale {} (model.rope_theta {}): use \"original\" scoring",
                r.n_rot, cfg.model.head_dim, r.freq_base, r.freq_scale, cfg.model.rope_theta
            ),
        ));
    }
    Ok((scoring && lr.layout() == Layout::Interleaved, streaming))
}

impl LlamaPlugin {
    /// Plugin without llama.cpp's RoPE parameters: hip's RoPE modes are
    /// refused (see `new_with_rope`).
    pub fn new(config_json: &str, model: &ModelInfo) -> Result<Self> {
        Self::new_with_rope(config_json, model, None)
    }

    /// `rope`: llama.cpp's RoPE (patch 0006), which hip's RoPE modes need
    /// to move keys and queries (`llama_rope`).
    pub fn new_with_rope(
        config_json: &str,
        model: &ModelInfo,
        rope: Option<&RopeInfo>,
    ) -> Result<Self> {
        let cfg = resolve_config(config_json, model)?;
        let mut llama_rope = None;
        // One LazyLLM state for every lazy layer (keep sets cross layers), as
        // `Engine::new` builds it.
        let lazy = (0..cfg.model.n_layers)
            .find_map(|l| match cfg.layer_policy(l) {
                LayerPolicy::Lazy(z) => Some(z.clone()),
                _ => None,
            })
            .map(|z| LazyShared::new(z, &cfg.model))
            .transpose()?;
        let mut layers = Vec::with_capacity(cfg.model.n_layers);
        for l in 0..cfg.model.n_layers {
            let p = cfg.layer_policy(l);
            let method = p.method();
            if !SUPPORTED_METHODS.contains(&method) {
                return Err(Error::config(
                    format!("layer {l} method"),
                    format!(
                        "`{method}` is not supported by the llama.cpp integration (supported: {})",
                        SUPPORTED_METHODS.join(", ")
                    ),
                ));
            }
            let (score_halves, streaming) = layer_rope(l, p, &cfg, rope, &mut llama_rope)?;
            // Locret layers attend with llama.cpp's own attention.
            let state = if method == "dense" || method == "locret" {
                None
            } else {
                Some(Mutex::new(LayerState {
                    policy: build_policy(p, &cfg, l, lazy.as_ref())?,
                    seen: HashMap::new(),
                    sealed: HashMap::new(),
                    plan: None,
                    warned_masked: false,
                }))
            };
            layers.push(Layer {
                method,
                state,
                score_halves,
                streaming,
            });
        }
        let locret = LocretLlama::new(&cfg)?;
        let lazy_rows = match &lazy {
            Some(z) => Some(LazyRows::new(cfg.model.n_layers, z.config().points)?),
            None => None,
        };
        Ok(LlamaPlugin {
            cfg,
            layers,
            counters: Counters::default(),
            lazy,
            lazy_steps: Mutex::new(HashMap::new()),
            locret,
            rope: llama_rope,
            rope_info: rope.copied(),
            lazy_rows,
            poison: Poison::default(),
            profile: Profile::from_env(),
            team: Team::new(),
            attend_team: Team::new(),
        })
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// Routes that keep one mask per KV head (the CUDA routes: llama.cpp's
    /// sparse mask sized per KV head, our GPU decoders) refuse hip's
    /// `per_q_head` (CPU route only) with this error.
    pub(crate) fn refuse_per_q_head(&self, route: &str) -> Result<()> {
        for l in 0..self.cfg.model.n_layers {
            if let LayerPolicy::Hip(h) = self.cfg.layer_policy(l) {
                if h.per_q_head {
                    return Err(Error::config(
                        format!("layer {l} hip.per_q_head"),
                        format!(
                            "{route}: per-q-head decode selection runs on the CPU route only; \
                             use false on a GPU KV cache"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// llama.cpp's RoPE parameters (patch 0006), if it passed them.
    pub(crate) fn rope_info(&self) -> Option<&RopeInfo> {
        self.rope_info.as_ref()
    }

    /// Whether some hip layer runs a RoPE mode (scoring or attention).
    /// (`rope` is built exactly then: `layer_rope`.)
    pub(crate) fn has_rope_modes(&self) -> bool {
        self.rope.is_some()
    }

    /// The routes that do not run hip's RoPE modes refuse them with this
    /// error, `why` naming what the route lacks.
    pub(crate) fn refuse_rope_modes(&self, route: &str, why: &str) -> Result<()> {
        for l in 0..self.cfg.model.n_layers {
            if let LayerPolicy::Hip(h) = self.cfg.layer_policy(l) {
                if h.rope.scoring != RopeMode::Original || h.rope.attention != RopeMode::Original {
                    return Err(Error::config(
                        format!("layer {l} hip.rope"),
                        format!(
                            "{route}: RoPE modes (chunk_indexed/relative scoring, streaming attention) \
                             run on the CPU route only ({why}); use \"original\" on a GPU KV cache"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The LazyLLM state the lazy layers share (keep sets, rows a hook would
    /// compute), when some layer runs `lazy`. Streams are its sequence ids.
    pub fn lazy(&self) -> Option<&LazyShared> {
        self.lazy.as_ref()
    }

    fn layer(&self, layer: u32) -> Result<&Layer> {
        self.layers
            .get(layer as usize)
            .ok_or_else(|| Error::OutOfRange(format!("layer {layer} of {}", self.layers.len())))
    }

    fn sparse_state(&self, layer: u32) -> Result<&Mutex<LayerState>> {
        let l = self.layer(layer)?;
        l.state.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "layer {layer} is dense: llama.cpp's own attention runs it"
            ))
        })
    }

    fn check_geom(&self, g: &Geom) -> Result<AttnShape> {
        let m = &self.cfg.model;
        if (g.n_head, g.n_kv_heads, g.d) != (m.n_q_heads, m.n_kv_heads, m.head_dim) {
            return Err(Error::shape(
                "attention heads (q heads, kv heads, head_dim)",
                format!("({}, {}, {})", m.n_q_heads, m.n_kv_heads, m.head_dim),
                format!("({}, {}, {})", g.n_head, g.n_kv_heads, g.d),
            ));
        }
        AttnShape::new(g.n_head, g.n_kv_heads, g.d)
    }

    pub fn layer_method(&self, layer: u32) -> std::result::Result<String, String> {
        self.poison
            .guard(|| Ok(self.layer(layer)?.method.to_string()))
    }

    /// A ubatch of `n_tokens` tokens per stream over `n_kv` cells (llama.cpp's
    /// visible span: the context, padded to 256 cells) attends densely
    /// through llama.cpp below the config's thresholds.
    /// With hip's RoPE modes, llama.cpp's own attention attends at its
    /// positions, wrong past the trained length: there (`n_kv` above
    /// `model.max_position`) nothing is dense-below, as the SGLang backend
    /// caps its thresholds at the trained context; below it, unchanged.
    pub fn dense_below(&self, n_tokens: u32, n_kv: u64) -> bool {
        if self.rope_modes_past_trained(n_kv) {
            return false;
        }
        self.cfg.dense_below(n_tokens as usize, n_kv as usize)
    }

    /// Some hip layer runs a RoPE mode and a context of `n_kv` cells
    /// reaches past the trained length (`model.max_position`).
    pub fn rope_modes_past_trained(&self, n_kv: u64) -> bool {
        n_kv > self.cfg.model.max_position as u64 && self.has_rope_modes()
    }

    pub fn summary(&self) -> String {
        self.poison
            .guard_or("summary", "(unavailable)".into(), || self.summary_impl())
    }

    fn summary_impl(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        let mut start = 0;
        for i in 1..=self.layers.len() {
            if i == self.layers.len() || self.layers[i].method != self.layers[start].method {
                let m = self.layers[start].method;
                let who = match m {
                    "dense" => "dense (llama.cpp attention)",
                    "locret" => "locret (llama.cpp attention, token eviction)",
                    m => m,
                };
                if i - start == 1 {
                    parts.push(format!("layer {start}: {who}"));
                } else {
                    parts.push(format!("layers {}-{}: {who}", start, i - 1));
                }
                start = i;
            }
        }
        parts.join(", ")
    }

    #[allow(clippy::too_many_arguments)]
    pub fn plan(
        &self,
        layer: u32,
        scale: f32,
        q: &[u8],
        qd: &TensorDesc,
        k: &[u8],
        kd: &TensorDesc,
        v: &[u8],
        vd: &TensorDesc,
        v_trans: bool,
        mask: &[u8],
        md: &TensorDesc,
    ) -> std::result::Result<(), String> {
        let t_plan = self.profile.start();
        let r = self.poison.guard(|| {
            let inp = Inputs::new(q, qd, k, kd, v, vd, v_trans, mask, md)?;
            let mut shape = self.check_geom(&inp.g)?;
            shape.scale = checked_scale(scale)?;
            let lay = self.layer(layer)?;
            let halves = self.rope.as_ref().filter(|_| lay.score_halves);
            let mut st = self
                .sparse_state(layer)?
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            st.plan = None;
            let is_lazy = st.policy.name() == "lazy";
            let g = inp.g;
            let mut streams = Vec::with_capacity(g.n_stream);
            let mut qbuf = Vec::new();
            for s in 0..g.n_stream {
                let t_chain = self.profile.start();
                let chain = causal_chain(&inp, s);
                self.profile.stop(Slot::Chain, t_chain);
                let Some((cells, q_pos)) = chain else {
                    if !st.warned_masked {
                        tracing::warn!(layer, "infinitehip: ubatch is not one causal chain per stream; exact masked attention for it");
                        st.warned_masked = true;
                    }
                    st.seen.remove(&s);
                    st.sealed.remove(&s);
                    st.policy.end_sequence(s as u64);
                    if is_lazy {
                        self.lazy_steps
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&s);
                    }
                    self.counters.masked_streams.fetch_add(1, Ordering::Relaxed);
                    streams.push(StreamPlan::Masked);
                    continue;
                };
                let n = g.n_tokens;
                let len = cells.len();
                if is_lazy {
                    // The shared state restarts once per step, not per layer.
                    let mut steps = self.lazy_steps.lock().unwrap_or_else(|e| e.into_inner());
                    let now = (cells[0], len);
                    match steps.get(&s) {
                        Some(&p) if p == now => {}
                        Some(&p) if p == (cells[0], len - n) => {}
                        _ => st.policy.end_sequence(s as u64),
                    }
                    steps.insert(s, now);
                    if st.seen.get(&s) != Some(&(cells[0], len - n)) {
                        st.sealed.remove(&s);
                    }
                } else if st.seen.get(&s) != Some(&(cells[0], len - n)) {
                    st.policy.end_sequence(s as u64);
                    st.sealed.remove(&s);
                }
                let kv = LlamaKv {
                    inp: &inp,
                    s,
                    cells: &cells,
                };
                // The end of the prompt. llama.cpp does not tell the graph
                // which ubatch ends the prompt; the first single-token ubatch
                // (decode) after a longer chain does: every cell before it is
                // the prompt. The engine's caller would have appended those
                // with `prompt_done`; the policy sees the same hook with the
                // same KV (squeeze clusters and calibrates its prefix there).
                // No projections: llama.cpp's graph has only post-RoPE K.
                if n == 1 && len >= 2 && !st.sealed.contains_key(&s) {
                    let prompt = LlamaKv {
                        inp: &inp,
                        s,
                        cells: &cells[..len - 1],
                    };
                    let info = InsertInfo {
                        seq: s as u64,
                        shape,
                        phase: Phase::Prefill,
                        start: st.seen.get(&s).map_or(0, |&(_, l)| l.min(len - 1)),
                        q: &[],
                        k: &[],
                        v: &[],
                        kv: &prompt,
                        prompt_done: true,
                    };
                    let t_done = self.profile.start();
                    let evicts = st.policy.after_append(&info)?.is_some();
                    self.profile.stop(Slot::PromptDone, t_done);
                    if evicts {
                        return Err(Error::Invalid(format!(
                            "layer {layer}: policy {} evicts tokens, which the llama.cpp integration cannot do",
                            st.policy.name()
                        )));
                    }
                    st.sealed.insert(s, len - 1);
                    self.counters.prompts_done.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        layer,
                        stream = s,
                        prompt_len = len - 1,
                        "infinitehip: prompt done"
                    );
                }
                let qe = shape.q_elems();
                let mut all_q = Vec::with_capacity(n * qe);
                for t in 0..n {
                    inp.query(t, s, 0, g.n_head, &mut qbuf);
                    all_q.extend_from_slice(&qbuf);
                }
                if s == 0 {
                    dump_qkv(layer, &all_q, &kv, len - n..len, g.n_kv_heads, g.d);
                }
                // Scoring RoPE modes: the policy sees halves-layout vectors.
                let hkv;
                let kv: &dyn KvRead = match halves {
                    Some(rope) => {
                        let mut hq = vec![0f32; g.d];
                        for x in all_q.chunks_exact_mut(g.d) {
                            rope.to_halves(x, &mut hq);
                            x.copy_from_slice(&hq);
                        }
                        hkv = HalvesKv { kv: &kv, rope };
                        &hkv
                    }
                    None => &kv,
                };
                if lay.streaming {
                    if let Some(r) = &self.rope {
                        r.reserve(len + 1);
                    }
                }
                let mut sels = Vec::new();
                let mut sel_of = vec![0u32; n];
                if n == 1 {
                    let req = SelectRequest {
                        seq: s as u64,
                        shape,
                        phase: Phase::Decode,
                        queries: &all_q,
                        q_start: q_pos[0],
                        kv,
                    };
                    let t_sel = self.profile.start();
                    let mut out = st.policy.select(&req)?;
                    self.profile.count(Count::DecodePlans);
                    if st.policy.last_decode_refreshed().unwrap_or(true) {
                        self.profile.count(Count::RefreshSteps);
                        self.profile.stop(Slot::SelectRefresh, t_sel);
                    } else {
                        self.profile.stop(Slot::SelectCached, t_sel);
                    }
                    if out.blocks.is_empty() {
                        return Err(Error::Invalid(format!(
                            "layer {layer}: policy returned no selection"
                        )));
                    }
                    sels.push(out.blocks.swap_remove(0));
                } else {
                    let chunk = st.policy.prefill_chunk().unwrap_or(n).max(1);
                    for c0 in (0..n).step_by(chunk) {
                        let c1 = (c0 + chunk).min(n);
                        let req = SelectRequest {
                            seq: s as u64,
                            shape,
                            phase: Phase::Prefill,
                            queries: &all_q[c0 * qe..c1 * qe],
                            q_start: q_pos[c0],
                            kv,
                        };
                        let t_sel = self.profile.start();
                        let out = st.policy.select(&req)?;
                        self.profile.stop(Slot::SelectPrefill, t_sel);
                        self.profile.count(Count::PrefillPlans);
                        let base = sels.len();
                        let qb = out.q_block.max(1);
                        let nb = out.blocks.len();
                        for (i, so) in sel_of[c0..c1].iter_mut().enumerate() {
                            let b = i / qb;
                            if b >= nb {
                                return Err(Error::Invalid(format!("layer {layer}: policy returned {nb} blocks of {qb} for {} queries", c1 - c0)));
                            }
                            *so = (base + b) as u32;
                        }
                        sels.extend(out.blocks);
                    }
                }
                for sel in &sels {
                    // One range list per KV head, or (hip `per_q_head`)
                    // one per q head: `attend` handles both.
                    if sel.heads.len() != g.n_kv_heads && sel.heads.len() != g.n_head {
                        return Err(Error::shape(
                            "policy selection heads (per KV head or per q head)",
                            format!("{} or {}", g.n_kv_heads, g.n_head),
                            sel.heads.len(),
                        ));
                    }
                }
                st.seen.insert(s, (cells[0], len));
                self.counters.sparse_streams.fetch_add(1, Ordering::Relaxed);
                streams.push(StreamPlan::Sparse {
                    cells,
                    q_pos,
                    sel_of,
                    sels,
                });
            }
            st.plan = Some(Arc::new(Plan {
                geom: (g.d, g.n_head, g.n_kv_heads, g.n_tokens, g.n_stream),
                streams,
            }));
            self.counters.plans.fetch_add(1, Ordering::Relaxed);
            Ok(())
        });
        self.profile.stop(Slot::Plan, t_plan);
        r
    }

    /// `plan` on all `nth` threads of one ggml op (see the ffi doc).
    #[allow(clippy::too_many_arguments)]
    pub fn plan_team(
        &self,
        layer: u32,
        ith: i32,
        nth: i32,
        scale: f32,
        q: &[u8],
        qd: &TensorDesc,
        k: &[u8],
        kd: &TensorDesc,
        v: &[u8],
        vd: &TensorDesc,
        v_trans: bool,
        mask: &[u8],
        md: &TensorDesc,
    ) -> std::result::Result<(), String> {
        if ith > 0 {
            self.team.serve(ith as usize - 1);
            return Ok(());
        }
        let helpers = (nth.max(1) - 1) as usize;
        self.team.lead(helpers, || {
            self.plan(layer, scale, q, qd, k, kd, v, vd, v_trans, mask, md)
        })
    }

    /// `attend` run by all `nth` threads of a ggml op: thread 0 leads and
    /// `out` (its own) holds every item's output; the others (`ith` > 0)
    /// work on its parts and return when it is done (their arguments are not
    /// read). At decode (one token per stream) with fewer than two items
    /// (KV heads x streams) per thread, each item's selected cells are split
    /// into parts across threads and merged (`merge_partials`): with 3 KV
    /// heads on 2 threads, or 8 on 16, whole items leave threads idle.
    /// Otherwise the threads take item ranges as `attend` does.
    /// `LLAMA_INFINITEHIP_ATTEND_SPLIT=0` turns the split off.
    #[allow(clippy::too_many_arguments)]
    pub fn attend_team(
        &self,
        layer: u32,
        ith: i32,
        nth: i32,
        scale: f32,
        q: &[u8],
        qd: &TensorDesc,
        k: &[u8],
        kd: &TensorDesc,
        v: &[u8],
        vd: &TensorDesc,
        v_trans: bool,
        mask: &[u8],
        md: &TensorDesc,
        out: &mut [f32],
    ) -> std::result::Result<(), String> {
        if ith > 0 {
            self.attend_team.serve(ith as usize - 1);
            return Ok(());
        }
        let threads = nth.max(1) as usize;
        self.attend_team.lead(threads - 1, || {
            let a = OpTensors {
                layer,
                scale,
                q,
                qd,
                k,
                kd,
                v,
                vd,
                v_trans,
                mask,
                md,
            };
            match self.split_parts(&a, threads) {
                Ok(Some(parts)) => self.attend_split(&a, parts, out),
                Ok(None) => self.attend_ranges(&a, threads, out),
                Err(e) => Err(e),
            }
        })
    }

    /// Parts per item when the split applies to this call, else None.
    fn split_parts(
        &self,
        a: &OpTensors<'_>,
        threads: usize,
    ) -> std::result::Result<Option<usize>, String> {
        if threads < 2 || use_reference() || !split_on() {
            return Ok(None);
        }
        self.poison.guard(|| {
            let inp = Inputs::new(a.q, a.qd, a.k, a.kd, a.v, a.vd, a.v_trans, a.mask, a.md)?;
            let g = inp.g;
            let n_items = g.n_stream * g.n_tokens * g.n_kv_heads;
            if g.n_tokens != 1 || n_items == 0 || n_items >= 2 * threads {
                return Ok(None);
            }
            let plan = self.last_plan(a.layer)?;
            if plan
                .streams
                .iter()
                .any(|s| !matches!(s, StreamPlan::Sparse { .. }))
            {
                return Ok(None);
            }
            Ok(Some((2 * threads).div_ceil(n_items)))
        })
    }

    /// The threads of the installed team take contiguous item ranges.
    fn attend_ranges(
        &self,
        a: &OpTensors<'_>,
        threads: usize,
        out: &mut [f32],
    ) -> std::result::Result<(), String> {
        let n = out.len();
        // item ranges in floats: the split points of `attend`'s item ranges
        let per = self.poison.guard(|| {
            let inp = Inputs::new(a.q, a.qd, a.k, a.kd, a.v, a.vd, a.v_trans, a.mask, a.md)?;
            let g = inp.g;
            let n_items = g.n_stream * g.n_tokens * g.n_kv_heads;
            Ok((n_items, if n_items == 0 { 0 } else { n / n_items }))
        })?;
        let (n_items, per) = per;
        let mut chunks: Vec<Mutex<(usize, usize, &mut [f32])>> = Vec::new();
        let mut rest = out;
        for t in 0..threads {
            let (i0, i1) = (n_items * t / threads, n_items * (t + 1) / threads);
            let (head, tail) = std::mem::take(&mut rest).split_at_mut((i1 - i0) * per);
            rest = tail;
            if i1 > i0 {
                chunks.push(Mutex::new((i0, i1, head)));
            }
        }
        let err: Mutex<Option<String>> = Mutex::new(None);
        infinitehip::parallel::par_for(chunks.len(), |c| {
            let mut ch = chunks[c].lock().unwrap_or_else(|e| e.into_inner());
            let (i0, i1) = (ch.0, ch.1);
            let r = self.attend(
                a.layer, i0, i1, a.scale, a.q, a.qd, a.k, a.kd, a.v, a.vd, a.v_trans, a.mask, a.md,
                ch.2,
            );
            if let Err(e) = r {
                err.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(e);
            }
        });
        match err.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Decode with each item's cells in `parts` parts (`attend_team`).
    fn attend_split(
        &self,
        a: &OpTensors<'_>,
        parts: usize,
        out: &mut [f32],
    ) -> std::result::Result<(), String> {
        let t_att = self.profile.start();
        self.profile.count(Count::AttendCalls);
        let r = self.poison.guard(|| {
            let inp = Inputs::new(a.q, a.qd, a.k, a.kd, a.v, a.vd, a.v_trans, a.mask, a.md)?;
            let mut shape = self.check_geom(&inp.g)?;
            shape.scale = checked_scale(a.scale)?;
            let g = inp.g;
            let plan = self.last_plan(a.layer)?;
            check_plan_geom(&plan, &g)?;
            let (nkh, grp, d) = (g.n_kv_heads, shape.group(), g.d);
            let n_items = g.n_stream * nkh;
            let per = grp * d;
            if out.len() != n_items * per {
                return Err(Error::shape(
                    "attend out",
                    format!("all {n_items} items x {per}"),
                    format!("{}", out.len()),
                ));
            }
            let streaming = self
                .layer(a.layer)?
                .streaming
                .then(|| self.rope.as_ref().map(|r| (r, r.table())))
                .flatten();
            // per (item, part): max, sum and unnormalised output of its grp rows
            let slots: Vec<Mutex<(Vec<f32>, Vec<f32>, Vec<f32>)>> = (0..n_items * parts)
                .map(|_| Mutex::new((vec![0f32; grp], vec![0f32; grp], vec![0f32; per])))
                .collect();
            let (attended, context) = (AtomicU64::new(0), AtomicU64::new(0));
            infinitehip::parallel::par_for(n_items * parts, |u| {
                let (item, p) = (u / parts, u % parts);
                let (s, h) = (item / nkh, item % nkh);
                let StreamPlan::Sparse {
                    cells,
                    q_pos,
                    sel_of,
                    sels,
                } = &plan.streams[s]
                else {
                    unreachable!("split_parts admits sparse streams only")
                };
                let sel = &sels[sel_of[0] as usize];
                let (n_lists, nq) = lists_of(sel, nkh, grp);
                let kv = head_kv(&inp, s, h);
                let mut run = RunBufs::default();
                let mut slot = slots[u].lock().unwrap_or_else(|e| e.into_inner());
                let (m, l, o) = &mut *slot;
                for li in 0..n_lists {
                    let j0 = li * nq;
                    run.gather(
                        &inp,
                        s,
                        h * grp + j0,
                        nq,
                        0..1,
                        q_pos,
                        cells,
                        &sel.heads[h * n_lists + li],
                        streaming.as_ref().map(|(r, tb)| (*r, &tb[..])),
                    );
                    let n = run.visible[0];
                    let (c0, c1) = (n * p / parts, n * (p + 1) / parts);
                    let mv = streaming.as_ref().map(|(rope, table)| KeyMove {
                        rope,
                        table,
                        shift: &run.kshift[c0..c1],
                    });
                    attend_run_partial(
                        &kv,
                        &run.q,
                        nq,
                        &run.cells[c0..c1],
                        &[c1 - c0],
                        shape.scale,
                        mv.as_ref(),
                        &mut o[j0 * d..(j0 + nq) * d],
                        &mut m[j0..j0 + nq],
                        &mut l[j0..j0 + nq],
                    );
                    if p == 0 {
                        attended.fetch_add((n * nq) as u64, Ordering::Relaxed);
                        context.fetch_add(((q_pos[0] + 1) * nq) as u64, Ordering::Relaxed);
                    }
                }
            });
            let st: Vec<_> = slots
                .into_iter()
                .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
                .collect();
            for (item, o) in out.chunks_exact_mut(per).enumerate() {
                let ps: Vec<Partial<'_>> = st[item * parts..(item + 1) * parts]
                    .iter()
                    .map(|(m, l, o)| Partial { m, l, o })
                    .collect();
                merge_partials(d, &ps, o);
            }
            self.counters.split_attends.fetch_add(1, Ordering::Relaxed);
            self.counters
                .attended_tokens
                .fetch_add(attended.into_inner(), Ordering::Relaxed);
            self.counters
                .context_tokens
                .fetch_add(context.into_inner(), Ordering::Relaxed);
            Ok(())
        });
        self.profile.stop(Slot::Attend, t_att);
        r
    }

    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        layer: u32,
        item0: usize,
        item1: usize,
        scale: f32,
        q: &[u8],
        qd: &TensorDesc,
        k: &[u8],
        kd: &TensorDesc,
        v: &[u8],
        vd: &TensorDesc,
        v_trans: bool,
        mask: &[u8],
        md: &TensorDesc,
        out: &mut [f32],
    ) -> std::result::Result<(), String> {
        let t_att = self.profile.start();
        self.profile.count(Count::AttendCalls);
        let r = self.poison.guard(|| {
            let inp = Inputs::new(q, qd, k, kd, v, vd, v_trans, mask, md)?;
            let mut shape = self.check_geom(&inp.g)?;
            shape.scale = checked_scale(scale)?;
            let g = inp.g;
            let plan = self
                .sparse_state(layer)?
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .plan
                .clone()
                .ok_or_else(|| Error::Invalid(format!("layer {layer}: attend before plan")))?;
            check_plan_geom(&plan, &g)?;
            let n_items = g.n_stream * g.n_tokens * g.n_kv_heads;
            let grp = shape.group();
            let per = grp * g.d;
            if item0 > item1 || item1 > n_items || out.len() != (item1 - item0) * per {
                return Err(Error::shape(
                    "attend items/out",
                    format!("items within 0..{n_items} and out = items x {per}"),
                    format!("items {item0}..{item1}, out {}", out.len()),
                ));
            }
            let streaming = self
                .layer(layer)?
                .streaming
                .then(|| self.rope.as_ref().map(|r| (r, r.table())))
                .flatten();
            let mut qg = Vec::with_capacity(per);
            let mut qruns: Vec<f32> = Vec::new();
            let mut runs: Vec<usize> = Vec::new();
            let mut toks: Vec<(u32, f32)> = Vec::new();
            // Counted per (query token, q head), so one list per KV head and
            // one per q head (hip `per_q_head`) weigh the same.
            let (mut attended, mut context) = (0u64, 0u64);
            let nkh = g.n_kv_heads;
            let reference = use_reference();
            let mut run = RunBufs::default();
            if !reference {
                // Head-major over this thread's items, so the tokens of one hip
                // query block run together through the tiled kernel.
                for h in 0..nkh {
                    // tokens u (= s * n_tokens + t) with item u * nkh + h in item0..item1
                    let u_lo = item0.saturating_sub(h).div_ceil(nkh);
                    let u_hi = item1.saturating_sub(h).div_ceil(nkh);
                    let mut u = u_lo;
                    while u < u_hi {
                        let (s, t) = (u / g.n_tokens, u % g.n_tokens);
                        let kv = head_kv(&inp, s, h);
                        match &plan.streams[s] {
                            StreamPlan::Sparse {
                                cells,
                                q_pos,
                                sel_of,
                                sels,
                            } => {
                                // the run: same stream and selection, at most MAX_RUN tokens
                                let sel = sel_of[t];
                                let mut t_end = t + 1;
                                while t_end < g.n_tokens
                                    && (s * g.n_tokens + t_end) < u_hi
                                    && sel_of[t_end] == sel
                                    && t_end - t < MAX_RUN
                                {
                                    t_end += 1;
                                }
                                // One list for the group, or one per q head.
                                let (n_lists, nq) = lists_of(&sels[sel as usize], nkh, grp);
                                for li in 0..n_lists {
                                    let ranges = &sels[sel as usize].heads[h * n_lists + li];
                                    let j0 = li * nq;
                                    run.gather(
                                        &inp,
                                        s,
                                        h * grp + j0,
                                        nq,
                                        t..t_end,
                                        q_pos,
                                        cells,
                                        ranges,
                                        streaming.as_ref().map(|(r, tb)| (*r, &tb[..])),
                                    );
                                    let mv = streaming.as_ref().map(|(rope, table)| KeyMove {
                                        rope,
                                        table,
                                        shift: &run.kshift,
                                    });
                                    attend_run_moved(
                                        &kv,
                                        &run.q,
                                        nq,
                                        &run.cells,
                                        &run.visible,
                                        shape.scale,
                                        mv.as_ref(),
                                        &mut run.out,
                                    );
                                    let w = nq * g.d;
                                    for (i, tt) in (t..t_end).enumerate() {
                                        let item = (s * g.n_tokens + tt) * nkh + h;
                                        let o = (item - item0) * per + j0 * g.d;
                                        out[o..o + w].copy_from_slice(&run.out[i * w..(i + 1) * w]);
                                        attended += (run.visible[i] * nq) as u64;
                                        context += ((q_pos[tt] + 1) * nq) as u64;
                                    }
                                }
                                u += t_end - t;
                            }
                            StreamPlan::Masked => {
                                toks.clear();
                                for c in 0..g.n_kv {
                                    let m = inp.mask_at(c, t, s);
                                    if m != f32::NEG_INFINITY {
                                        toks.push((c as u32, m));
                                    }
                                }
                                context += (toks.len() * grp) as u64;
                                attended += (toks.len() * grp) as u64;
                                inp.query(t, s, h * grp, grp, &mut qg);
                                let item = u * nkh + h;
                                let o = &mut out[(item - item0) * per..(item - item0 + 1) * per];
                                attend_reference(&kv, &qg, &toks, shape.scale, o);
                                u += 1;
                            }
                        }
                    }
                }
            }
            for (item, o) in (item0..item1).zip(out.chunks_exact_mut(per)) {
                if !reference {
                    break;
                }
                let h = item % g.n_kv_heads;
                let t = (item / g.n_kv_heads) % g.n_tokens;
                let s = item / (g.n_kv_heads * g.n_tokens);
                match &plan.streams[s] {
                    StreamPlan::Sparse {
                        cells,
                        q_pos,
                        sel_of,
                        sels,
                    } => {
                        let end = q_pos[t] + 1;
                        let sel = &sels[sel_of[t] as usize];
                        let (n_lists, nq) = lists_of(sel, nkh, grp);
                        for li in 0..n_lists {
                            let ranges = &sel.heads[h * n_lists + li];
                            let j0 = li * nq;
                            inp.query(t, s, h * grp + j0, nq, &mut qg);
                            toks.clear();
                            runs.clear();
                            qruns.clear();
                            for r in ranges {
                                let r: Range<usize> = r.start.min(end)..r.end.min(end);
                                toks.extend(cells[r].iter().map(|&c| (c, 0.0)));
                            }
                            context += (end * nq) as u64;
                            if let Some((rope, table)) = &streaming {
                                // Streaming positions: the query's visible selected
                                // tokens take ranks 0..n, the query n - 1; one
                                // query rotation per run of consecutive tokens.
                                let n_vis = toks.len();
                                let mut rank = 0;
                                for r in ranges {
                                    let r: Range<usize> = r.start.min(end)..r.end.min(end);
                                    if r.is_empty() {
                                        continue;
                                    }
                                    let at = qruns.len();
                                    qruns.extend_from_slice(&qg);
                                    let shift = streaming_shift(n_vis, q_pos[t], rank, r.start);
                                    rope.rotate_heads(table, &mut qruns[at..], shift);
                                    rank += r.len();
                                    runs.push(rank);
                                }
                            }
                            attended += (toks.len() * nq) as u64;
                            let o = &mut o[j0 * g.d..(j0 + nq) * g.d];
                            if qruns.is_empty() {
                                attend_cells(&inp, s, h, &qg, &[toks.len()], &toks, shape.scale, o);
                            } else {
                                attend_cells(&inp, s, h, &qruns, &runs, &toks, shape.scale, o);
                            }
                        }
                    }
                    StreamPlan::Masked => {
                        inp.query(t, s, h * grp, grp, &mut qg);
                        toks.clear();
                        for c in 0..g.n_kv {
                            let m = inp.mask_at(c, t, s);
                            if m != f32::NEG_INFINITY {
                                toks.push((c as u32, m));
                            }
                        }
                        context += (toks.len() * grp) as u64;
                        attended += (toks.len() * grp) as u64;
                        attend_cells(&inp, s, h, &qg, &[toks.len()], &toks, shape.scale, o);
                    }
                }
            }
            self.counters
                .attended_tokens
                .fetch_add(attended, Ordering::Relaxed);
            self.counters
                .context_tokens
                .fetch_add(context, Ordering::Relaxed);
            Ok(())
        });
        self.profile.stop(Slot::Attend, t_att);
        r
    }

    /// The last plan of a sparse layer (the GPU route turns it into cell indices).
    pub(crate) fn last_plan(&self, layer: u32) -> Result<Arc<Plan>> {
        self.sparse_state(layer)?
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .plan
            .clone()
            .ok_or_else(|| Error::Invalid(format!("layer {layer}: no plan")))
    }

    pub fn stats_json(&self) -> String {
        self.poison
            .guard_or("stats_json", stats_unavailable("plugin stats"), || {
                self.stats_json_impl()
            })
    }

    fn stats_json_impl(&self) -> String {
        let c = &self.counters;
        let (a, t) = (
            c.attended_tokens.load(Ordering::Relaxed),
            c.context_tokens.load(Ordering::Relaxed),
        );
        serde_json::json!({
            "plans": c.plans.load(Ordering::Relaxed),
            "sparse_streams": c.sparse_streams.load(Ordering::Relaxed),
            "masked_streams": c.masked_streams.load(Ordering::Relaxed),
            "attended_tokens": a,
            "context_tokens": t,
            "prompts_done": c.prompts_done.load(Ordering::Relaxed),
            "split_attends": c.split_attends.load(Ordering::Relaxed),
            "attended_fraction": if t == 0 { 1.0 } else { a as f64 / t as f64 },
            "layers": self.layers.iter().map(|l| l.method).collect::<Vec<_>>(),
            "locret": self.locret.as_ref().map(|l| l.stats()),
            "lazy_rows": self.lazy_rows.as_ref().map(|l| l.stats()),
            "prefill_dense_below": self.cfg.prefill_dense_below,
            "decode_dense_below": self.cfg.decode_dense_below,
            "profile": self.profile.json(),
        })
        .to_string()
    }

    /// Locret's state (None when no layer runs locret).
    pub fn locret(&self) -> Option<&LocretLlama> {
        self.locret.as_ref()
    }

    /// Whether some layer runs locret.
    pub fn locret_on(&self) -> bool {
        self.poison
            .guard_or("locret_on", false, || self.locret.is_some())
    }

    /// Whether layer `layer` runs locret (gets a scoring op).
    pub fn locret_layer(&self, layer: u32) -> bool {
        self.poison.guard_or("locret_layer", false, || {
            self.locret
                .as_ref()
                .is_some_and(|l| l.is_locret_layer(layer))
        })
    }

    /// Tell the scoring that llama.cpp's q/k rows are in interleaved-RoPE
    /// order (`LLAMA_ROPE_TYPE_NORM`: the GGUF converter permuted Llama's
    /// q/k rows; retaining heads read HF's order).
    pub fn locret_set_qk_interleaved(&self, on: bool) {
        self.poison.guard_or("locret_set_qk_interleaved", (), || {
            if let Some(l) = &self.locret {
                l.set_qk_interleaved(on);
            }
        })
    }

    fn locret_state(&self) -> Result<&LocretLlama> {
        self.locret
            .as_ref()
            .ok_or_else(|| Error::Invalid("no layer runs locret".into()))
    }

    /// The scoring op of locret layer `layer`, ggml thread `ith` of `nth`:
    /// pre-RoPE q `[d, n_q_heads, n_tokens]`, k and v `[d, n_kv_heads,
    /// n_tokens]` (F32/F16 views), llama.cpp's mask (counts live cells).
    #[allow(clippy::too_many_arguments)]
    pub fn locret_score(
        &self,
        layer: u32,
        q: &[u8],
        qd: &TensorDesc,
        k: &[u8],
        kd: &TensorDesc,
        v: &[u8],
        vd: &TensorDesc,
        mask: &[u8],
        md: &TensorDesc,
        ith: u32,
        nth: u32,
    ) -> std::result::Result<(), String> {
        self.poison.guard(|| {
            let l = self.locret_state()?;
            let q = view(q, qd, "locret q (pre-RoPE)")?;
            let k = view(k, kd, "locret k (pre-RoPE)")?;
            let v = view(v, vd, "locret v")?;
            let m = if mask.is_empty() {
                None
            } else {
                Some(view(mask, md, "kq_mask")?)
            };
            l.score_op(layer, &q, &k, &v, m.as_ref(), ith as usize, nth as usize)
        })
    }

    /// fc1 of locret layer `layer` for the scoring graph (see
    /// `LocretLlama::graph_fc1`).
    pub fn locret_graph_fc1(
        &self,
        layer: u32,
        qk_interleaved: bool,
    ) -> std::result::Result<Vec<f32>, String> {
        self.poison
            .guard(|| self.locret_state()?.graph_fc1(layer, qk_interleaved))
    }

    /// fc2 of locret layer `layer` for the scoring graph.
    pub fn locret_graph_fc2(&self, layer: u32) -> std::result::Result<Vec<f32>, String> {
        self.poison.guard(|| self.locret_state()?.graph_fc2(layer))
    }

    /// Drop the f32 retaining heads once the ggml graph holds them.
    pub fn locret_release_heads(&self) {
        self.poison.guard_or("locret_release_heads", (), || {
            if let Some(l) = &self.locret {
                l.release_heads();
            }
        })
    }

    /// Whether the ubatch in flight holds only decoded tokens.
    pub fn locret_ubatch_decoded(&self) -> bool {
        // Fallback false: the ubatch is scored (the safe side).
        self.poison.guard_or("locret_ubatch_decoded", false, || {
            self.locret.as_ref().is_some_and(|l| l.ubatch_decoded())
        })
    }

    /// The scoring graph's scores of layer `layer` (`[n_kv_heads,
    /// n_tokens]` F32/F16) join the ubatch in flight; `mask` counts cells
    /// (empty `s`: only that).
    pub fn locret_record(
        &self,
        layer: u32,
        s: &[u8],
        sd: &TensorDesc,
        mask: &[u8],
        md: &TensorDesc,
    ) -> std::result::Result<(), String> {
        self.poison.guard(|| {
            let l = self.locret_state()?;
            let s = if s.is_empty() {
                None
            } else {
                Some(view(s, sd, "locret graph scores")?)
            };
            let m = if mask.is_empty() {
                None
            } else {
                Some(view(mask, md, "kq_mask")?)
            };
            l.record_op(layer, s.as_ref(), m.as_ref())
        })
    }

    /// Check mode: the graph's scores against the core's f64 reference.
    #[allow(clippy::too_many_arguments)]
    pub fn locret_check(
        &self,
        layer: u32,
        s: &[u8],
        sd: &TensorDesc,
        q: &[u8],
        qd: &TensorDesc,
        k: &[u8],
        kd: &TensorDesc,
        v: &[u8],
        vd: &TensorDesc,
    ) -> std::result::Result<(), String> {
        self.poison.guard(|| {
            let l = self.locret_state()?;
            let s = view(s, sd, "locret graph scores")?;
            let q = view(q, qd, "locret q (pre-RoPE)")?;
            let k = view(k, kd, "locret k (pre-RoPE)")?;
            let v = view(v, vd, "locret v")?;
            l.check_op(layer, &s, &q, &k, &v)
        })
    }

    /// Before each ubatch (llama.cpp's decode loop): returns the cells to
    /// remove as flat `(seq, p0, p1)` triples (see `LocretLlama::begin`).
    pub fn locret_begin(
        &self,
        pos: &[i32],
        n_seq: &[u32],
        seq_ids: &[i32],
    ) -> std::result::Result<Vec<i32>, String> {
        self.poison
            .guard(|| self.locret_state()?.begin(pos, n_seq, seq_ids))
    }
}

/// Diagnostics only (issue 12 selection replays): with
/// `INFINITEHIP_DUMP_QKV=DIR`, every planned ubatch of stream 0 appends its
/// queries to `DIR/L{layer}.q.f32` (`[t][n_q_heads][d]`) and the keys and
/// values of its new cells to `L{layer}.k.f32` / `L{layer}.v.f32`
/// (`[t][n_kv_heads][d]`), little-endian f32: the input of
/// `rust/infinitehip/examples/selq_replay.rs` and `tests/quality/selq/`.
/// Use a covering config with `dense_layers: 0` so every layer is planned and
/// the dumped q/k/v are the dense model's. Off (one env lookup) otherwise.
fn dump_qkv(
    layer: u32,
    q: &[f32],
    kv: &dyn KvRead,
    new: std::ops::Range<usize>,
    nkh: usize,
    d: usize,
) {
    use std::io::Write;
    static DIR: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let Some(dir) = DIR.get_or_init(|| std::env::var("INFINITEHIP_DUMP_QKV").ok()) else {
        return;
    };
    let append = |name: &str, x: &[f32]| {
        let path = format!("{dir}/L{layer}.{name}.f32");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let b: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        f.write_all(&b).unwrap_or_else(|e| panic!("{path}: {e}"));
    };
    append("q", q);
    let (mut k, mut v) = (Vec::new(), Vec::new());
    let mut row = vec![0f32; d];
    for t in new {
        for h in 0..nkh {
            kv.read_key(h, t, &mut row);
            k.extend_from_slice(&row);
            kv.read_value(h, t, &mut row);
            v.extend_from_slice(&row);
        }
    }
    append("k", &k);
    append("v", &v);
}

/// How a plan's selection splits a KV head's group: (range lists per KV
/// head, q heads per list). One list shared by the `grp` q heads, or (hip
/// `per_q_head`, checked in `plan`: `heads.len()` is n_q_heads) one list per
/// q head, q head `h * grp + li` reading list `h * grp + li`.
/// The tensors of one attend op, as `attend_team` received them.
struct OpTensors<'a> {
    layer: u32,
    scale: f32,
    q: &'a [u8],
    qd: &'a TensorDesc,
    k: &'a [u8],
    kd: &'a TensorDesc,
    v: &'a [u8],
    vd: &'a TensorDesc,
    v_trans: bool,
    mask: &'a [u8],
    md: &'a TensorDesc,
}

/// Whether `attend_team` may split items' cells across threads
/// (`LLAMA_INFINITEHIP_ATTEND_SPLIT=0`: no).
fn split_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LLAMA_INFINITEHIP_ATTEND_SPLIT").map_or(true, |v| v != "0"))
}

fn check_plan_geom(plan: &Plan, g: &Geom) -> Result<()> {
    if plan.geom != (g.d, g.n_head, g.n_kv_heads, g.n_tokens, g.n_stream) {
        return Err(Error::shape(
            "attend inputs vs the last plan (d, heads, kv heads, tokens, streams)",
            format!("{:?}", plan.geom),
            format!(
                "{:?}",
                (g.d, g.n_head, g.n_kv_heads, g.n_tokens, g.n_stream)
            ),
        ));
    }
    Ok(())
}

fn lists_of(sel: &Selection, n_kv_heads: usize, grp: usize) -> (usize, usize) {
    if sel.heads.len() == n_kv_heads {
        (1, grp)
    } else {
        (grp, 1)
    }
}

fn checked_scale(scale: f32) -> Result<f32> {
    if scale.is_finite() && scale > 0.0 {
        Ok(scale)
    } else {
        Err(Error::Invalid(format!(
            "kq_scale {scale} must be finite and > 0"
        )))
    }
}

/// Longest run of query tokens the tiled kernel takes at once (one hip
/// query block is at most this in the usual configs; longer blocks split).
const MAX_RUN: usize = 64;

/// K/V of stream `s`, KV head `h` for the kernels.
fn head_kv<'a>(inp: &Inputs<'a>, s: usize, h: usize) -> HeadKv<'a> {
    let rows = |d: Data<'a>| match d {
        Data::F32(x) => Rows::F32(x),
        Data::F16(x) => Rows::F16(x),
    };
    let (v_cell, v_dim) = if inp.v_trans {
        (inp.v.st[0], inp.v.st[2])
    } else {
        (inp.v.st[2], inp.v.st[0])
    };
    HeadKv {
        k: rows(inp.k.data),
        v: rows(inp.v.data),
        d: inp.g.d,
        k0: inp.k.idx(0, h, 0, s),
        k_cell: inp.k.st[2],
        v0: inp.v.idx(0, h, 0, s),
        v_cell,
        v_dim,
    }
}

/// Buffers of one tiled run, reused across runs of an attend call.
#[derive(Default)]
struct RunBufs {
    q: Vec<f32>,
    cells: Vec<u32>,
    visible: Vec<usize>,
    out: Vec<f32>,
    qbuf: Vec<f32>,
    /// Streaming attention: per cell of `cells`, its rank minus its chain
    /// index (the key's move).
    kshift: Vec<i64>,
}

impl RunBufs {
    /// Queries of tokens `ts` (stream `s`, q heads `q0..q0 + nq`: a KV
    /// head's group, or one q head of it), the selection's cells up to the
    /// last token's position, and how many of them each token sees (its
    /// causal clip: a prefix, ranges being sorted).
    #[allow(clippy::too_many_arguments)]
    fn gather(
        &mut self,
        inp: &Inputs<'_>,
        s: usize,
        q0: usize,
        nq: usize,
        ts: Range<usize>,
        q_pos: &[usize],
        cells: &[u32],
        ranges: &[Range<usize>],
        streaming: Option<(&LlamaRope, &[(f32, f32)])>,
    ) {
        let end = q_pos[ts.end - 1] + 1;
        self.q.clear();
        self.cells.clear();
        self.visible.clear();
        self.kshift.clear();
        for r in ranges {
            let r = r.start.min(end)..r.end.min(end);
            if streaming.is_some() {
                // Sorted ranges: a visible key's rank is the same for every
                // token of the run (the selected tokens before it).
                let rank0 = self.cells.len() as i64;
                self.kshift
                    .extend(std::iter::repeat_n(rank0 - r.start as i64, r.len()));
            }
            self.cells.extend_from_slice(&cells[r]);
        }
        for t in ts.clone() {
            let e = q_pos[t] + 1;
            let vis: usize = ranges.iter().map(|r| r.end.min(e) - r.start.min(e)).sum();
            self.visible.push(vis);
            inp.query(t, s, q0, nq, &mut self.qbuf);
            if let Some((rope, table)) = streaming {
                // Streaming: the query sits at rank vis - 1 (the keys at
                // their ranks, `kshift`); the product depends only on the
                // difference, as in `streaming_shift`.
                rope.rotate_heads(table, &mut self.qbuf, vis as i64 - 1 - q_pos[t] as i64);
            }
            self.q.extend_from_slice(&self.qbuf);
        }
        self.out.resize(self.q.len(), 0.0);
    }
}

/// Attention of the `grp` query heads of KV head `h` over `toks` (cell,
/// additive bias), f32 accumulation; `out` `[grp][d]`. The tokens come in
/// runs (`run_ends`: exclusive ends in `toks`), run i scored with queries
/// `qs[i]` (`[runs][grp][d]`: streaming positions rotate them per run).
/// A query with nothing visible gets zeros.
#[allow(clippy::too_many_arguments)]
fn attend_cells(
    inp: &Inputs<'_>,
    s: usize,
    h: usize,
    qs: &[f32],
    run_ends: &[usize],
    toks: &[(u32, f32)],
    scale: f32,
    out: &mut [f32],
) {
    let a = (inp, s, h, qs, run_ends, toks, scale);
    match (inp.k.data, inp.v.data) {
        (Data::F32(k), Data::F32(v)) => attend_typed(a, k, v, out),
        (Data::F32(k), Data::F16(v)) => attend_typed(a, k, v, out),
        (Data::F16(k), Data::F32(v)) => attend_typed(a, k, v, out),
        (Data::F16(k), Data::F16(v)) => attend_typed(a, k, v, out),
    }
}

type AttendArgs<'a, 'b> = (
    &'a Inputs<'b>,
    usize,
    usize,
    &'a [f32],
    &'a [usize],
    &'a [(u32, f32)],
    f32,
);

fn attend_typed<K: Element, V: Element>(
    (inp, s, h, qs, run_ends, toks, scale): AttendArgs<'_, '_>,
    k: &[K],
    v: &[V],
    out: &mut [f32],
) {
    let d = inp.g.d;
    let grp = out.len() / d;
    let n = toks.len();
    out.fill(0.0);
    if n == 0 {
        return;
    }
    debug_assert_eq!(qs.len(), run_ends.len() * grp * d);
    debug_assert_eq!(run_ends.last(), Some(&n));
    // scores[gi * n + i]
    let mut p = vec![0f32; grp * n];
    let mut run = 0;
    for (i, &(c, b)) in toks.iter().enumerate() {
        while run_ends[run] <= i {
            run += 1;
        }
        let qg = &qs[run * grp * d..(run + 1) * grp * d];
        let o = inp.k.idx(0, h, c as usize, s);
        let krow = &k[o..o + d];
        for gi in 0..grp {
            p[gi * n + i] = dot_f32(&qg[gi * d..(gi + 1) * d], krow) * scale + b;
        }
    }
    let mut inv = vec![0f32; grp];
    for gi in 0..grp {
        let row = &mut p[gi * n..(gi + 1) * n];
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        if !m.is_finite() {
            row.fill(0.0);
            continue;
        }
        let mut l = 0f32;
        for x in row.iter_mut() {
            *x = (*x - m).exp();
            l += *x;
        }
        inv[gi] = 1.0 / l;
    }
    let v_view = &inp.v;
    if !inp.v_trans {
        for (i, &(c, _)) in toks.iter().enumerate() {
            let o = v_view.idx(0, h, c as usize, s);
            let vrow = &v[o..o + d];
            for gi in 0..grp {
                axpy_f32(&mut out[gi * d..(gi + 1) * d], p[gi * n + i], vrow);
            }
        }
    } else {
        // V stored [cell][head][dim] transposed: cells are contiguous per dim.
        let (vc, vd) = (v_view.st[0], v_view.st[2]);
        let base = v_view.idx(0, h, 0, s);
        let mut acc = vec![0f32; grp];
        for j in 0..d {
            acc.fill(0.0);
            let bj = base + j * vd;
            for (i, &(c, _)) in toks.iter().enumerate() {
                let x = v[bj + c as usize * vc].to_f32();
                for gi in 0..grp {
                    acc[gi] += p[gi * n + i] * x;
                }
            }
            for gi in 0..grp {
                out[gi * d + j] = acc[gi];
            }
        }
    }
    for gi in 0..grp {
        out[gi * d..(gi + 1) * d]
            .iter_mut()
            .for_each(|x| *x *= inv[gi]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infinitehip::rng::Rng;

    /// The element-by-element rule `visible_cells` replaces.
    fn reference(row: &[f32]) -> Option<Vec<u32>> {
        let mut cells = Vec::new();
        for (c, &m) in row.iter().enumerate() {
            if m == 0.0 {
                cells.push(c as u32);
            } else if m != f32::NEG_INFINITY {
                return None;
            }
        }
        Some(cells)
    }

    #[test]
    fn visible_cells_equals_element_rule() {
        let mut rng = Rng::new(0x5eed_c0de);
        let odd = [-0.0f32, -1.5, 0.25, f32::NAN, f32::INFINITY];
        let mut n_none = 0;
        for case in 0..400 {
            let n = 1 + (rng.next_u64() % 300) as usize;
            // Runs of visible / masked cells, sometimes one odd entry.
            let mut row = Vec::with_capacity(n);
            while row.len() < n {
                let run = 1 + (rng.next_u64() % 70) as usize;
                let v = if rng.next_u64() % 2 == 0 {
                    0.0
                } else {
                    f32::NEG_INFINITY
                };
                row.extend(std::iter::repeat_n(v, run.min(n - row.len())));
            }
            if case % 3 == 0 {
                let at = (rng.next_u64() % n as u64) as usize;
                row[at] = odd[(rng.next_u64() % odd.len() as u64) as usize];
            }
            let want = reference(&row);
            n_none += want.is_none() as usize;
            let bits32: Vec<u32> = row.iter().map(|x| x.to_bits()).collect();
            assert_eq!(
                visible_cells(&bits32, f32::NEG_INFINITY.to_bits()),
                want,
                "f32 case {case}"
            );
            let bits16: Vec<u16> = row.iter().map(|&x| f16::from_f32(x).to_bits()).collect();
            let want16 = reference(
                &row.iter()
                    .map(|&x| f16::from_f32(x).to_f32())
                    .collect::<Vec<_>>(),
            );
            assert_eq!(
                visible_cells(&bits16, f16::NEG_INFINITY.to_bits()),
                want16,
                "f16 case {case}"
            );
        }
        // The odd entries that are not -0.0 must have been refused.
        assert!(n_none > 50, "only {n_none} rows refused");
    }
}
