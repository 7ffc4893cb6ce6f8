//! LazyLLM layers of `GpuAttention` (the CPU policy is `policy::lazy`; its
//! module doc is the specification): one state per request slot shared by
//! every lazy layer, as `LazyShared` is on the CPU.
//!
//! The host keeps only counts (`LzSlot`): the step (a new KV length), the
//! next pruning point, how many prompt tokens are active. The token sets
//! live on the device: before the step's first pruning point the set is
//! every token (`Set::Full`, no list); a pruning point computes the keep
//! set from the step's last query on the GPU (`launch_lazy_importance` +
//! `launch_lazy_topk`: top `keep_count(keep, n_prompt)` active prompt
//! tokens, the step's last token forced, ties to the later token, plus
//! every generated token) into the slot's other list buffer; the host knows
//! its length in advance, so nothing waits for the device. Selections are
//! the runs of the list (`ep_token_ranges`), the same for every KV head;
//! prefill queries are clipped causally by the kernel (`q_pos`).
//!
//! Prompt tokens: those of prefill calls (plus, on first contact, the
//! tokens before the first call's queries), as on the CPU; generated
//! tokens: those of decode calls. A prefill after a decode starts a new
//! request (SGLang reuses `req_to_token` rows; the CPU policy would count
//! the new tokens as prompt tokens of the same sequence).
//!
//! A non-finite importance (NaN query or keys) cannot be reported without
//! a host sync: the request's selections in that step become the full
//! range (so the NaN reaches its output) and `GpuAttention::lazy_bad` reads
//! the flag back (tests, debugging). Importance is summed in f32 on the GPU
//! and f64 on the CPU: tokens within rounding of the k-th value can be
//! decided differently (lazy_topk.rs).

use cudarc::driver::result as cu;
use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::super::dispatch::{DeviceKv, DeviceSelection};
use super::super::policies::lazy_topk::launch_lazy_topk;
use super::super::policies::{launch_lazy_importance, LazyWorkspace};
use super::super::{gpu_err, DevBuf, GpuContext};
use super::{i32_of, EngineKv};
use crate::attention::AttnShape;
use crate::config::LazyConfig;
use crate::error::{Error, Result};
use crate::policy::lazy::keep_count;
use crate::policy::Phase;

/// An active token set of one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Set {
    /// Every token `0..len`.
    #[default]
    Full,
    /// `n` ascending tokens in list buffer `buf`, `np` of them prompt
    /// tokens.
    List { buf: usize, n: usize, np: usize },
}

/// A pruning point to run: keep set of `input` into list buffer `out_buf`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Prune {
    pub input: Set,
    pub out_buf: usize,
    /// Candidates kept (the kernel clamps to the active prompt tokens).
    pub k: usize,
    /// Tokens the output holds.
    pub n_out: usize,
    pub force: u32,
    /// Prompt tokens of the sequence (`0..n_prompt`).
    pub n_prompt: usize,
}

/// What one lazy layer attends to for one request, and the pruning it runs
/// after planning it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Planned {
    pub attend: Set,
    pub prune: Option<Prune>,
    /// A new step started here (reset the slot's bad flag).
    pub new_step: bool,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct LzSlot {
    /// Tokens the state knows (the CPU plan's length).
    known: usize,
    /// Prompt tokens: `0..n_prompt`.
    n_prompt: usize,
    decoded: bool,
    step_len: usize,
    next_point: usize,
    last_layer: Option<usize>,
    attend: Set,
    active: Set,
}

impl LzSlot {
    pub fn decoded(&self) -> bool {
        self.decoded
    }
}

/// The host bookkeeping of every slot (no CUDA: unit-tested against the CPU
/// policy's keep-set sizes).
pub(crate) struct LazyPlanner {
    pub cfg: LazyConfig,
    pub slots: Vec<LzSlot>,
}

impl LazyPlanner {
    pub fn new(cfg: LazyConfig) -> Self {
        LazyPlanner {
            cfg,
            slots: Vec::new(),
        }
    }

    pub fn reset(&mut self, s: usize) {
        if s < self.slots.len() {
            self.slots[s] = LzSlot::default();
        }
    }

    pub fn slot(&mut self, s: usize) -> &mut LzSlot {
        if self.slots.len() <= s {
            self.slots.resize_with(s + 1, LzSlot::default);
        }
        &mut self.slots[s]
    }

    /// Plan lazy layer `layer` of request slot `s` (request `id`, for
    /// errors) whose KV holds `len` tokens, `n` of them this call's queries
    /// (the CPU `LazyPolicy::select`, minus the device work).
    pub fn plan(
        &mut self,
        s: usize,
        id: u64,
        layer: usize,
        len: usize,
        n: usize,
        phase: Phase,
    ) -> Result<Planned> {
        let points = self.cfg.points.clone();
        let st = self.slot(s);
        if n == 0 || n > len {
            return Err(Error::Invalid(format!(
                "lazy layer {layer} on the GPU: request {id} has {n} queries for {len} tokens"
            )));
        }
        let mut new_step = false;
        if len != st.step_len {
            if len < st.known {
                return Err(Error::Invalid(format!(
                    "lazy layer {layer}: request {id} holds {len} tokens but the policy saw {} (sequences must not shrink)",
                    st.known
                )));
            }
            if st.known == 0 && len > n {
                // Tokens this state never saw: prompt tokens (CPU:
                // register_computed(len - n, true)).
                st.known = len - n;
                st.n_prompt = len - n;
            }
            let n_new = len - st.known;
            if n_new == 0 {
                return Err(Error::Invalid(format!(
                    "lazy layer {layer}: request {id} has no new tokens for this step"
                )));
            }
            if phase == Phase::Prefill {
                if st.decoded || st.n_prompt != st.known {
                    return Err(Error::Invalid(format!(
                        "lazy layer {layer} on the GPU: request {id} gets prompt tokens after generated ones (a prefill after decode must start a new request)"
                    )));
                }
                st.n_prompt += n_new;
            } else {
                st.decoded = true;
            }
            st.known = len;
            st.step_len = len;
            st.next_point = 0;
            st.last_layer = None;
            st.active = Set::Full;
            st.attend = Set::Full;
            new_step = true;
        } else if let Some(ll) = st.last_layer {
            if layer == ll {
                return Ok(Planned {
                    attend: st.attend,
                    prune: None,
                    new_step: false,
                });
            }
            if layer < ll {
                return Err(Error::Invalid(format!(
                    "lazy layer {layer}: layers out of order in a step of request {id} (already at layer {ll})"
                )));
            }
        }
        if let Some(p) = points[st.next_point..].iter().find(|p| p.layer < layer) {
            return Err(Error::Invalid(format!(
                "lazy layer {layer}, request {id}: skips pruning point at layer {} (every pruning layer must be attended, in layer order, each step)",
                p.layer
            )));
        }
        let attend = st.active;
        let mut prune = None;
        if let Some(p) = points.get(st.next_point).filter(|p| p.layer == layer) {
            let (n_act, np_act, buf) = match attend {
                Set::Full => (len, st.n_prompt, usize::MAX),
                Set::List { buf, n, np } => (n, np, buf),
            };
            let k = keep_count(p.keep, st.n_prompt).min(np_act);
            let out_buf = if buf == 0 { 1 } else { 0 };
            let n_out = k + (n_act - np_act);
            prune = Some(Prune {
                input: attend,
                out_buf,
                k,
                n_out,
                force: (len - 1) as u32,
                n_prompt: st.n_prompt,
            });
            st.active = Set::List {
                buf: out_buf,
                n: n_out,
                np: k,
            };
            st.next_point += 1;
        }
        st.attend = attend;
        st.last_layer = Some(layer);
        Ok(Planned {
            attend,
            prune,
            new_step,
        })
    }
}

/// One request of a lazy layer's call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LazyReq {
    pub slot: usize,
    /// Its page-table row.
    pub row: usize,
    pub len: usize,
    /// Its queries in this call.
    pub n: usize,
    /// Its step's last query row in the f32 queries.
    pub last_row: usize,
}

/// Device side of the lazy layers (module doc).
pub(crate) struct LazyGpu {
    pub plan: LazyPlanner,
    /// Per slot: two token lists and their capacity.
    bufs: Vec<Option<([DevBuf; 2], usize)>>,
    /// `0..cap` (i32) and the prompt mask `[cap ones][cap zeros]` (u8).
    iota: DevBuf,
    mask: DevBuf,
    cap: usize,
    /// Per slot: 1 after a bad keep set in the current step.
    pub bad: DevBuf,
    bad_n: usize,
    ws: LazyWorkspace,
    imp: DevBuf,
    misc: DevBuf,
    up: DevBuf,
}

fn grow(buf: &mut DevBuf, bytes: usize) -> Result<()> {
    if buf.bytes < bytes || !buf.is_owned() {
        *buf = DevBuf::alloc(bytes.next_power_of_two())?;
    }
    Ok(())
}

impl LazyGpu {
    pub fn new(cfg: LazyConfig) -> Self {
        LazyGpu {
            plan: LazyPlanner::new(cfg),
            bufs: Vec::new(),
            iota: DevBuf::null(),
            mask: DevBuf::null(),
            cap: 0,
            bad: DevBuf::null(),
            bad_n: 0,
            ws: LazyWorkspace::default(),
            imp: DevBuf::null(),
            misc: DevBuf::null(),
            up: DevBuf::null(),
        }
    }

    pub fn reset(&mut self, s: usize) {
        self.plan.reset(s);
    }

    /// Ranges per selection row the planned sets need.
    pub fn cap_for(planned: &[Planned]) -> usize {
        planned
            .iter()
            .map(|p| match p.attend {
                Set::Full => 1,
                Set::List { n, .. } => n,
            })
            .max()
            .unwrap_or(1)
            .max(1)
    }

    fn list_ptr(&self, slot: usize, buf: usize) -> u64 {
        self.bufs[slot]
            .as_ref()
            .expect("allocated at the step start")
            .0[buf]
            .ptr
    }

    /// The device work of one lazy layer call: the planned pruning points,
    /// then the selection rows `[request][kv head]` into `sel` (its cap from
    /// `cap_for`). All on `gpu.stream`, no host sync.
    #[allow(clippy::too_many_arguments)]
    pub fn launch(
        &mut self,
        gpu: &GpuContext,
        shape: &AttnShape,
        kv: &EngineKv,
        reqs: &[LazyReq],
        planned: &[Planned],
        qf: u64,
        sel: &DeviceSelection,
    ) -> Result<()> {
        let stream = gpu.stream.clone();
        let b = reqs.len();
        let max_len = reqs.iter().map(|r| r.len).max().unwrap_or(0);
        if max_len > self.cap {
            let cap = max_len.next_power_of_two();
            i32_of("lazy token capacity", 2 * cap)?;
            let iota: Vec<i32> = (0..cap as i32).collect();
            self.iota = DevBuf::alloc(cap * 4)?;
            self.iota.write_async(&stream, &iota)?;
            let mut m = vec![1u8; cap];
            m.resize(2 * cap, 0);
            self.mask = DevBuf::alloc(2 * cap)?;
            self.mask.write_async(&stream, &m)?;
            self.cap = cap;
        }
        let max_slot = reqs.iter().map(|r| r.slot).max().unwrap_or(0);
        if max_slot >= self.bad_n {
            let n = (max_slot + 1).next_power_of_two();
            let nb = DevBuf::alloc(n * 4)?;
            unsafe { cu::memset_d8_async(nb.ptr, 0, n * 4, stream.cu_stream()) }
                .map_err(|e| gpu_err("lazy: clear flags", e))?;
            if self.bad_n > 0 {
                unsafe {
                    cu::memcpy_dtod_async(nb.ptr, self.bad.ptr, self.bad_n * 4, stream.cu_stream())
                }
                .map_err(|e| gpu_err("lazy: copy flags", e))?;
            }
            self.bad = nb;
            self.bad_n = n;
        }
        if self.bufs.len() <= max_slot {
            self.bufs.resize_with(max_slot + 1, || None);
        }
        for (r, p) in reqs.iter().zip(planned) {
            if p.new_step {
                // Lists are empty at a step start: grow without copying.
                if self.bufs[r.slot].as_ref().is_none_or(|(_, c)| *c < r.len) {
                    let c = r.len.next_power_of_two();
                    self.bufs[r.slot] = Some(([DevBuf::alloc(c * 4)?, DevBuf::alloc(c * 4)?], c));
                }
                let at = self.bad.ptr + (r.slot * 4) as u64;
                unsafe { cu::memset_d8_async(at, 0, 4, stream.cu_stream()) }
                    .map_err(|e| gpu_err("lazy: clear flag", e))?;
            }
        }
        // Pruning points: params [off 0, n, k, force, mask_off], then
        // counts and status.
        let prunes: Vec<(usize, Prune)> = planned
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.prune.map(|x| (i, x)))
            .collect();
        if !prunes.is_empty() {
            let np = prunes.len();
            let mut params = Vec::with_capacity(np * 5);
            let mut max_in = 0;
            for &(i, pr) in &prunes {
                let n_in = match pr.input {
                    Set::Full => reqs[i].len,
                    Set::List { n, .. } => n,
                };
                max_in = max_in.max(n_in);
                params.extend_from_slice(&[
                    0,
                    i32_of("lazy tokens", n_in)?,
                    i32_of("lazy keep", pr.k.min(n_in))?,
                    pr.force as i32,
                    i32_of("lazy mask offset", self.cap - pr.n_prompt)?,
                ]);
            }
            grow(&mut self.misc, np * 7 * 4)?;
            self.misc.write_async(&stream, &params)?;
            grow(&mut self.imp, max_in * 4)?;
            let (counts, status) = (
                self.misc.ptr + (np * 5 * 4) as u64,
                self.misc.ptr + (np * 6 * 4) as u64,
            );
            for (j, &(i, pr)) in prunes.iter().enumerate() {
                let r = reqs[i];
                let (tokens, n_in) = match pr.input {
                    Set::Full => (self.iota.ptr, r.len),
                    Set::List { buf, n, .. } => (self.list_ptr(r.slot, buf), n),
                };
                let one = DeviceKv {
                    k: DevBuf::borrowed(kv.k, 0),
                    v: DevBuf::borrowed(kv.v, 0),
                    table: DevBuf::borrowed(kv.table + (r.row * kv.table_stride * 4) as u64, 0),
                    table_stride: kv.table_stride,
                    page_size: kv.page_size,
                    page_stride: kv.page_stride,
                    head_stride: kv.head_stride,
                    n_kv_heads: shape.n_kv_heads,
                    head_dim: shape.head_dim,
                    dtype: kv.dtype,
                    lens: vec![r.len],
                    capacity: vec![kv.table_stride * kv.page_size],
                };
                let q = qf + (r.last_row * shape.q_elems() * 4) as u64;
                launch_lazy_importance(
                    gpu,
                    &stream,
                    shape,
                    &one,
                    0,
                    q,
                    tokens,
                    n_in,
                    &mut self.ws,
                    self.imp.ptr,
                )?;
                let out = self.list_ptr(r.slot, pr.out_buf);
                let (cj, sj) = (counts + (j * 4) as u64, status + (j * 4) as u64);
                launch_lazy_topk(
                    gpu,
                    &stream,
                    tokens,
                    self.imp.ptr,
                    Some(self.mask.ptr),
                    self.misc.ptr + (j * 5 * 4) as u64,
                    1,
                    true,
                    out,
                    cj,
                    sj,
                )?;
                let f = gpu.func("engine_policy", "ep_lazy_fix")?;
                let n_out = pr.n_out as i32;
                let bad = self.bad.ptr + (r.slot * 4) as u64;
                let mut l = stream.launch_builder(&f);
                l.arg(&sj).arg(&out).arg(&n_out).arg(&bad);
                unsafe {
                    l.launch(LaunchConfig {
                        grid_dim: (1, 1, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    })
                }
                .map_err(|e| gpu_err("launch ep_lazy_fix", e))?;
            }
        }
        // Selection rows from the attend sets.
        let mut toks: Vec<i64> = Vec::with_capacity(b);
        let mut ints: Vec<i32> = Vec::with_capacity(3 * b);
        for (r, p) in reqs.iter().zip(planned) {
            match p.attend {
                Set::Full => {
                    toks.push(0);
                }
                Set::List { buf, .. } => toks.push(self.list_ptr(r.slot, buf) as i64),
            }
        }
        for p in planned {
            ints.push(match p.attend {
                Set::Full => -1,
                Set::List { n, .. } => i32_of("lazy set", n)?,
            });
        }
        for r in reqs {
            ints.push(i32_of("lazy length", r.len)?);
        }
        for r in reqs {
            ints.push(r.slot as i32);
        }
        grow(&mut self.up, b * 8 + ints.len() * 4)?;
        self.up.write_async(&stream, &toks)?;
        DevBuf::borrowed(self.up.ptr + (b * 8) as u64, ints.len() * 4)
            .write_async(&stream, &ints)?;
        let base = self.up.ptr;
        let (pn, pl, ps) = (
            base + (b * 8) as u64,
            base + (b * 12) as u64,
            base + (b * 16) as u64,
        );
        launch_token_ranges(
            gpu,
            shape.n_kv_heads,
            b,
            base,
            pn,
            pl,
            ps,
            self.bad.ptr,
            sel,
        )
    }

    /// Per slot: whether its current step saw a non-finite importance
    /// (synchronous read; tests, debugging).
    pub fn bad_flag(&self, gpu: &GpuContext, slot: usize) -> Result<bool> {
        if slot >= self.bad_n {
            return Ok(false);
        }
        cudarc::driver::result::ctx::synchronize()
            .map_err(|e| gpu_err("context synchronize", e))?;
        gpu.synchronize()?;
        let v: Vec<i32> = DevBuf::borrowed(self.bad.ptr + (slot * 4) as u64, 4).read(1)?;
        Ok(v[0] != 0)
    }
}

/// `ep_token_ranges` over `b` requests (device arrays: `toks` i64 list
/// pointers, `ns`, `lens`, `slots` i32; `bad` per slot or 0) into `sel`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_token_ranges(
    gpu: &GpuContext,
    hkv: usize,
    b: usize,
    toks: u64,
    ns: u64,
    lens: u64,
    slots: u64,
    bad: u64,
    sel: &DeviceSelection,
) -> Result<()> {
    let f = gpu.func("engine_policy", "ep_token_ranges")?;
    let (h, cap) = (hkv as i32, sel.cap as i32);
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(&toks)
        .arg(&ns)
        .arg(&lens)
        .arg(&slots)
        .arg(&bad)
        .arg(&h)
        .arg(&cap)
        .arg(&sel.ranges.ptr)
        .arg(&sel.cum.ptr)
        .arg(&sel.cnt.ptr)
        .arg(&sel.tot.ptr);
    unsafe {
        l.launch(LaunchConfig {
            grid_dim: (b as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map(|_| ())
    .map_err(|e| gpu_err("launch ep_token_ranges", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LazyPoint, ModelShape};
    use crate::kv::SeqView;
    use crate::policy::lazy::{LazyPolicy, LazyShared};
    use crate::policy::{Policy, SelectRequest};
    use crate::rng::Rng;

    fn set_len(s: Set, len: usize) -> usize {
        match s {
            Set::Full => len,
            Set::List { n, .. } => n,
        }
    }

    /// The planner's set sizes per (step, layer) equal the CPU policy's
    /// selections (the keep-set contents are the GPU's; sizes and the
    /// step / prompt bookkeeping are the host's).
    #[test]
    fn planner_sizes_follow_the_cpu_policy() {
        let n_layers = 6;
        let cfg = LazyConfig {
            points: vec![
                LazyPoint {
                    layer: 1,
                    keep: 0.7,
                },
                LazyPoint {
                    layer: 3,
                    keep: 0.4,
                },
            ],
        };
        let model = ModelShape {
            n_layers,
            n_q_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            ..ModelShape::default()
        };
        let shape = AttnShape::new(4, 2, 8).unwrap();
        let shared = LazyShared::new(cfg.clone(), &model).unwrap();
        let mut pols: Vec<LazyPolicy> = (0..n_layers)
            .map(|l| LazyPolicy::new(shared.clone(), l))
            .collect();
        let mut pl = LazyPlanner::new(cfg);
        let mut rng = Rng::new(3);
        let total = 90;
        let k = rng.normal_vec(2 * total * 8, 1.0);
        // Steps: prefill of 40 at length 60 (20 unseen prompt tokens),
        // prefill of 10, then 5 decode tokens; layers 0..6, layer 2 twice.
        let mut steps = vec![(60usize, 40usize, Phase::Prefill), (70, 10, Phase::Prefill)];
        for t in 71..76 {
            steps.push((t, 1, Phase::Decode));
        }
        for (len, n, phase) in steps {
            let kk: Vec<f32> = (0..2)
                .flat_map(|h| k[h * total * 8..h * total * 8 + len * 8].iter().copied())
                .collect();
            let view = SeqView::from_contiguous(2, 8, len, &kk, &kk);
            let q = rng.normal_vec(n * shape.q_elems(), 1.0);
            for layer in [0, 1, 2, 2, 3, 4, 5] {
                let sel = pols[layer]
                    .select(&SelectRequest {
                        seq: 9,
                        shape,
                        phase,
                        queries: &q,
                        q_start: len - n,
                        kv: &view,
                    })
                    .unwrap();
                let cpu_n: usize = sel.blocks[0].heads[0].iter().map(|r| r.len()).sum();
                let p = pl.plan(0, 9, layer, len, n, phase).unwrap();
                assert_eq!(set_len(p.attend, len), cpu_n, "len {len} layer {layer}");
                if let Some(pr) = p.prune {
                    let keep = shared.keep_set(9, layer + 1).unwrap();
                    assert_eq!(pr.k, keep.len(), "len {len} point {layer}");
                    assert_eq!(pr.n_out, keep.len() + (len - pr.n_prompt));
                }
            }
        }
        // Out of order and skipped points are errors, as on the CPU.
        // The same layer again in a step: the same set; an earlier one: error.
        let again = pl.plan(0, 9, 5, 75, 1, Phase::Decode).unwrap();
        assert!(again.prune.is_none() && !again.new_step);
        let e = pl.plan(0, 9, 4, 75, 1, Phase::Decode).unwrap_err();
        assert!(e.to_string().contains("out of order"), "{e}");
        let e = pl.plan(0, 9, 2, 77, 1, Phase::Decode).unwrap_err();
        assert!(
            e.to_string().contains("skips pruning point at layer 1"),
            "{e}"
        );
        // A prefill after decode is refused (GpuAttention resets first).
        let e = pl.plan(0, 9, 0, 90, 3, Phase::Prefill).unwrap_err();
        assert!(
            e.to_string().contains("prompt tokens after generated"),
            "{e}"
        );
        pl.reset(0);
        assert!(pl.plan(0, 9, 0, 90, 3, Phase::Prefill).is_ok());
    }
}
