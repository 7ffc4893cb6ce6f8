//! LazyLLM keep indices fully on the GPU: importance (`lazy_importance.cu`,
//! per sequence) then top-k and compaction (`kernels/lazy_topk.cu`, one
//! block per sequence), for a batch of sequences of different lengths, all
//! on one stream with no copy back to the host in between.
//!
//! Same keep set as `LazyPlan::prune_top` (`policy::lazy::top_k`): of the
//! candidates (the active prompt tokens), the `k` with the highest
//! importance, the step's last token forced in when it is a candidate,
//! ties (equal importance) going to the later token, output ascending.
//! With `emit_always` the non-candidates (generated tokens, which LazyLLM
//! never prunes) are written too, in token order: the set the layers after
//! the pruning point attend to, and the token list of the next point.
//! The host knows every output's length in advance (`keep_len`), so a
//! later pruning point can be launched on this one's output directly.
//!
//! Given the same importance values the GPU keep set equals `top_k`'s bit
//! for bit (the key order is the same total order). The GPU importance
//! itself differs from the CPU's in rounding (f32 vs f64 sums), so against
//! the CPU policy end to end only tokens within rounding of the k-th value
//! can differ (the GPU test counts them separately).

use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};

use super::{i32_of, launch_lazy_importance, LazyWorkspace};
use crate::attention::AttnShape;
use crate::backend::cuda::dispatch::DeviceKv;
use crate::backend::cuda::{gpu_err, DevBuf, GpuContext};
use crate::error::{Error, Result};

/// One sequence's part of a batched keep computation: tokens
/// `off..off + n` of the batch's token list (ascending ids into DeviceKv
/// sequence `seq`), keep the best `k` candidates (clamped to the candidate
/// count), `force` always kept when it is a candidate. Candidates: token t
/// with `prompt[mask_off + t] != 0` in the batch's prompt-flag array (one
/// flag per token id of the sequence), or every token when `mask_off` is
/// None.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LazySegment {
    pub seq: usize,
    pub off: usize,
    pub n: usize,
    pub k: usize,
    pub force: Option<u32>,
    pub mask_off: Option<usize>,
}

/// The `lazy_topk` parameter rows `[seg][off, n, k, force, mask_off]` (i32,
/// -1 for None). Segments must lie inside `total` tokens, in order, without
/// overlap.
pub fn topk_params(segs: &[LazySegment], total: usize) -> Result<Vec<i32>> {
    let mut end = 0;
    let mut out = Vec::with_capacity(segs.len() * 4);
    for (i, s) in segs.iter().enumerate() {
        if s.off < end || s.off + s.n > total {
            return Err(Error::OutOfRange(format!(
                "lazy top-k segment {i} (tokens {}..{}) overlaps the previous one (ends at {end}) or exceeds the {total} tokens",
                s.off,
                s.off + s.n
            )));
        }
        end = s.off + s.n;
        let opt = |what: &str, x: Option<usize>| x.map_or(Ok(-1), |v| i32_of(what, v));
        out.extend_from_slice(&[
            i32_of("lazy segment offset", s.off)?,
            i32_of("lazy segment tokens", s.n)?,
            i32_of("lazy keep count", s.k.min(s.n))?,
            opt("lazy forced token", s.force.map(|f| f as usize))?,
            opt("lazy prompt-mask offset", s.mask_off)?,
        ]);
    }
    Ok(out)
}

/// Tokens a segment's output holds: min(k, candidates), plus the
/// non-candidates with `emit_always`.
pub fn keep_len(k: usize, candidates: usize, n: usize, emit_always: bool) -> usize {
    k.min(candidates) + if emit_always { n - candidates } else { 0 }
}

/// Turn the kernel's per-segment status into an error naming the segment.
pub fn check_status(status: &[i32]) -> Result<()> {
    for (s, &st) in status.iter().enumerate() {
        match st {
            0 => {}
            1 => {
                return Err(Error::Invalid(format!(
                    "lazy top-k segment {s}: non-finite importance (NaN query or keys)"
                )))
            }
            2 => {
                return Err(Error::Invalid(format!(
                    "lazy top-k segment {s}: tokens not strictly ascending or negative"
                )))
            }
            x => {
                return Err(Error::Invalid(format!(
                    "lazy top-k segment {s}: status {x} (kernel did not run)"
                )))
            }
        }
    }
    Ok(())
}

/// Top-k over device `tokens` (i32) / `imp` (f32) / `prompt` (u8 flags by
/// token id, see `LazySegment`; None when no segment has a mask) for `nseg`
/// segments described by device `params` (`topk_params`), into `keep` (i32, same offsets as the tokens),
/// `counts` and `status` (i32 `[nseg]`), on `stream`.
#[allow(clippy::too_many_arguments)]
pub fn launch_lazy_topk(
    gpu: &GpuContext,
    stream: &CudaStream,
    tokens: u64,
    imp: u64,
    prompt: Option<u64>,
    params: u64,
    nseg: usize,
    emit_always: bool,
    keep: u64,
    counts: u64,
    status: u64,
) -> Result<()> {
    if nseg == 0 {
        return Ok(());
    }
    let (prompt, emit) = (prompt.unwrap_or(0), emit_always as i32);
    launch!(gpu, stream, "lazy_topk", "lazy_topk",
        grid: (nseg, 1, 1), smem: 0,
        args: [tokens, imp, prompt, params, emit, keep, counts, status])
}

/// Importance of each segment's tokens for its sequence's query (device
/// f32 `[nseg][n_q][d]`, row i for `segs[i]`) into `imp`, then the top-k
/// into `keep` / `counts` / `status`, all on `stream`. `params` is the
/// device copy of `topk_params(segs, ..)`. Token ids are trusted (ascending
/// is checked by the kernel, the bound against the sequence length is not:
/// `lazy_keep_batch` checks it).
#[allow(clippy::too_many_arguments)]
pub fn launch_lazy_keep(
    gpu: &GpuContext,
    stream: &CudaStream,
    shape: &AttnShape,
    kv: &DeviceKv,
    segs: &[LazySegment],
    queries: u64,
    tokens: u64,
    prompt: Option<u64>,
    params: u64,
    emit_always: bool,
    ws: &mut LazyWorkspace,
    imp: u64,
    keep: u64,
    counts: u64,
    status: u64,
) -> Result<()> {
    let qb = (shape.q_elems() * 4) as u64;
    for (i, s) in segs.iter().enumerate() {
        let o = (s.off * 4) as u64;
        launch_lazy_importance(
            gpu,
            stream,
            shape,
            kv,
            s.seq,
            queries + i as u64 * qb,
            tokens + o,
            s.n,
            ws,
            imp + o,
        )?;
    }
    launch_lazy_topk(
        gpu,
        stream,
        tokens,
        imp,
        prompt,
        params,
        segs.len(),
        emit_always,
        keep,
        counts,
        status,
    )
}

/// One sequence of `lazy_keep_batch`.
pub struct LazyKeepRequest<'a> {
    /// DeviceKv sequence.
    pub seq: usize,
    /// The last token's query `[n_q][d]`.
    pub q: &'a [f32],
    /// Active tokens, ascending.
    pub tokens: &'a [u32],
    /// Prompt flag of every token id of the sequence (`LazyPlan::
    /// is_prompt`): the candidates. None = every token a candidate.
    pub prompt: Option<&'a [bool]>,
    pub k: usize,
    pub force: Option<u32>,
}

/// Host in, host out: the keep set of each request (importance, top-k and
/// compaction on the GPU, one synchronisation at the end).
pub fn lazy_keep_batch(
    gpu: &GpuContext,
    shape: &AttnShape,
    kv: &DeviceKv,
    reqs: &[LazyKeepRequest<'_>],
    emit_always: bool,
) -> Result<Vec<Vec<u32>>> {
    let qe = shape.q_elems();
    let (mut segs, mut toks, mut qs) = (Vec::new(), Vec::new(), Vec::new());
    let mut mask: Vec<u8> = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        if r.q.len() != qe {
            return Err(Error::shape(
                format!("lazy keep request {i} query"),
                qe,
                r.q.len(),
            ));
        }
        let len = *kv.lens.get(r.seq).ok_or_else(|| {
            Error::OutOfRange(format!(
                "lazy keep request {i}: sequence {} of a DeviceKv holding {}",
                r.seq,
                kv.batch()
            ))
        })?;
        if let Some(&t) = r.tokens.iter().find(|&&t| t as usize >= len) {
            return Err(Error::OutOfRange(format!(
                "lazy keep request {i}: token {t} of a KV holding {len}"
            )));
        }
        let mask_off = match r.prompt {
            Some(p) if p.len() < len => {
                return Err(Error::shape(
                    format!("lazy keep request {i} prompt flags (one per token id)"),
                    len,
                    p.len(),
                ))
            }
            Some(p) => {
                mask.extend(p[..len].iter().map(|&b| b as u8));
                Some(mask.len() - len)
            }
            None => None,
        };
        segs.push(LazySegment {
            seq: r.seq,
            off: toks.len(),
            n: r.tokens.len(),
            k: r.k,
            force: r.force,
            mask_off,
        });
        toks.extend(r.tokens.iter().map(|&t| t as i32));
        qs.extend_from_slice(r.q);
    }
    let params = topk_params(&segs, toks.len())?;
    if segs.is_empty() {
        return Ok(Vec::new());
    }
    let n = toks.len();
    let (dq, dt, dp) = (
        DevBuf::from_slice(&qs)?,
        DevBuf::from_slice(&toks)?,
        DevBuf::from_slice(&params)?,
    );
    let dm = if mask.is_empty() {
        None
    } else {
        Some(DevBuf::from_slice(&mask)?)
    };
    let (imp, keep) = (DevBuf::alloc(n * 4)?, DevBuf::alloc(n * 4)?);
    let (counts, status) = (
        DevBuf::alloc(segs.len() * 4)?,
        DevBuf::alloc(segs.len() * 4)?,
    );
    status.fill_bytes(0xff)?;
    let mut ws = LazyWorkspace::default();
    launch_lazy_keep(
        gpu,
        &gpu.stream,
        shape,
        kv,
        &segs,
        dq.ptr,
        dt.ptr,
        dm.as_ref().map(|c| c.ptr),
        dp.ptr,
        emit_always,
        &mut ws,
        imp.ptr,
        keep.ptr,
        counts.ptr,
        status.ptr,
    )?;
    gpu.synchronize()?;
    check_status(&status.read::<i32>(segs.len())?)?;
    let counts: Vec<i32> = counts.read(segs.len())?;
    let keep: Vec<i32> = keep.read(n)?;
    Ok(segs
        .iter()
        .zip(&counts)
        .map(|(s, &c)| {
            keep[s.off..s.off + c as usize]
                .iter()
                .map(|&t| t as u32)
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(off: usize, n: usize, k: usize) -> LazySegment {
        LazySegment {
            seq: 0,
            off,
            n,
            k,
            force: None,
            mask_off: None,
        }
    }

    #[test]
    fn params_rows_and_overlap_errors() {
        let mut a = seg(0, 5, 9);
        a.force = Some(4);
        a.mask_off = Some(7);
        let p = topk_params(&[a, seg(5, 3, 1), seg(9, 0, 0)], 9).unwrap();
        // k is clamped to the segment's tokens; -1 for None.
        assert_eq!(p, vec![0, 5, 5, 4, 7, 5, 3, 1, -1, -1, 9, 0, 0, -1, -1]);
        let e = topk_params(&[seg(0, 5, 1), seg(4, 2, 1)], 9).unwrap_err();
        assert!(e.to_string().contains("segment 1"), "{e}");
        let e = topk_params(&[seg(0, 5, 1), seg(5, 5, 1)], 9).unwrap_err();
        assert!(e.to_string().contains("exceeds the 9 tokens"), "{e}");
        let mut b = seg(0, 1, 1);
        b.force = Some(u32::MAX);
        assert!(topk_params(&[b], 1).is_err());
    }

    #[test]
    fn keep_lengths_and_status() {
        assert_eq!(keep_len(3, 10, 12, false), 3);
        assert_eq!(keep_len(3, 10, 12, true), 5);
        assert_eq!(keep_len(30, 10, 12, true), 12);
        assert_eq!(keep_len(0, 0, 4, true), 4);
        assert!(check_status(&[0, 0]).is_ok());
        let e = check_status(&[0, 1]).unwrap_err();
        assert!(e.to_string().contains("segment 1: non-finite"), "{e}");
        let e = check_status(&[2]).unwrap_err();
        assert!(e.to_string().contains("not strictly ascending"), "{e}");
        let e = check_status(&[0, 0, -1]).unwrap_err();
        assert!(e.to_string().contains("did not run"), "{e}");
    }
}
