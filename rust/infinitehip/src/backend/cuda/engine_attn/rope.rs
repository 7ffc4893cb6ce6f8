//! InfiniteHiP's RoPE modes on `GpuAttention`'s hip layers (issue 12): the
//! host-side rules of which call runs them and which refuses them, with an
//! error naming what is missing. The device work is the GPU decoder's
//! (`rope_gpu::RopeGpu`, one per RoPE-mode hip layer, built from the
//! config's `model`: `rope_theta`, `max_position`, as `HipPolicy::new`
//! takes them on the CPU).
//!
//! - decode (`GpuAttention::decode`, host metadata): `chunk_indexed` /
//!   `relative` scoring (per request, the stage queries moved and every
//!   probed key rotated: `hip_score_rope_*`) and `streaming` attention (the
//!   gather of each row's selected keys re-rotated into a compact buffer,
//!   then the sparse v2 kernel over it). Needs the sparse v2 attention
//!   (not split-combine) for streaming.
//! - prefill (`prefill_mode`): a RoPE-mode hip layer prefills densely
//!   (causal, at the model's own positions) while every query position is
//!   below `model.max_position`, as SGLang's host path caps
//!   `prefill_dense_below` at the trained length (unless
//!   `GpuAttention::rope_prefill_sparse`: llama.cpp's CUDA route, whose host
//!   already chose the sparse prefill for this ubatch, runs the RoPE-mode
//!   sparse prefill there too, as the plugin's CPU route); a call reaching past it
//!   runs the hip sparse prefill with the layer's modes (`HipGpuPrefill`
//!   with `set_rope`: rotated per-block scoring, streaming attention per
//!   query; compiled, not run on a GPU), or is refused when the sparse
//!   prefill is off (`prefill_estimator` None).
//! - layout: halves (NEOX) at `model.rope_theta` unless the host calls
//!   `GpuAttention::set_rope_layout` (llama.cpp's CUDA route: its NORM
//!   layout, pairs (2i, 2i+1), its freq_base and linear freq_scale), which
//!   every RoPE kernel of the layer (scorer, query shift, streaming gather,
//!   prefill gather and queries) then rotates with (compiled, not yet run
//!   on a GPU); rotated scoring must keep the CPU policy's frequencies
//!   (`RopeGpu::set_layout`). The fast mask estimator with rotated scoring
//!   is refused as the CPU policy refuses it (`rope_gpu::modes`).
//! - refused: CUDA-graph decode (`prepare_graph`: the modes upload per-step
//!   shifts from the host) and host-tier decode (`kv.device_cache_pages`:
//!   the rotated scorers and the gather read device keys).
//!
//! Status: compiled, NOT yet run on a GPU (`gpu-test --rope-only` checks it
//! against the CPU `HipPolicy`).

use super::super::dispatch::{HipAttention, HipGpuDecoder};
use super::super::rope_gpu;
use crate::config::{HipConfig, RopeMode};
use crate::error::{Error, Result};

/// What a hip layer's RoPE modes are, after the decoder's validation:
/// None at original positions, else (scoring mode, streaming attention).
pub(super) fn layer_modes(layer: usize, cfg: &HipConfig) -> Result<Option<(RopeMode, bool)>> {
    HipGpuDecoder::validate_decoder(cfg)?;
    if cfg.decode_stage0 == crate::config::DecodeStage0::MeanKey {
        return Err(Error::config(
            format!("layer {layer} hip.decode_stage0"),
            "mean_key runs in the CPU policy and the GPU decoder (HipGpuDecoder) only; the engines' GPU route (GpuAttention) does not run it yet: use search",
        ));
    }
    if cfg.async_refresh != crate::config::AsyncRefresh::Off {
        return Err(Error::config(
            format!("layer {layer} hip.async_refresh"),
            "runs in the CPU policy and the GPU decoder's host steps (HipGpuDecoder) only; the engines' GPU route (GpuAttention) does not run it yet: use off",
        ));
    }
    rope_gpu::modes(cfg).map_err(|e| Error::Invalid(format!("layer {layer}: {e}")))
}

/// A decode of a RoPE-mode layer with the hip attention `attn`.
pub(super) fn check_decode(layer: usize, streaming: bool, attn: HipAttention) -> Result<()> {
    if streaming && attn != HipAttention::SparseV2 {
        return Err(Error::config(
            format!("layer {layer} hip.rope.attention"),
            "streaming attention on the GPU runs on the sparse v2 kernel only (set_hip_attention / INFINITEHIP_HIP_ATTENTION split-combine is refused)",
        ));
    }
    Ok(())
}

/// How `GpuAttention::prefill` runs a RoPE-mode hip layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RopePrefill {
    /// Every query below `model.max_position`: dense causal attention at
    /// the model's own positions (as SGLang's host path caps
    /// `prefill_dense_below` at the trained length).
    Dense,
    /// Some request reaches past `max_position`: the whole call runs the
    /// hip sparse prefill with the layer's RoPE modes (`HipGpuPrefill` +
    /// `set_rope`: rotated per-block scoring, streaming attention), as the
    /// CPU `HipPolicy` prefills (per request, chunks of `prefill_chunk`).
    Sparse,
}

/// A prefill of a RoPE-mode layer: requests of `lens[i]` tokens, the last
/// `n_new[i]` of them new; `sparse_on`: the hip sparse prefill is enabled
/// (`GpuAttention::prefill_estimator` is Some); `sparse_within`: the host
/// wants the RoPE-mode sparse prefill within the trained length too
/// (`GpuAttention::rope_prefill_sparse`: llama.cpp's CUDA route, whose
/// `prefill_dense_below` decides per ubatch as its CPU route does).
pub(super) fn prefill_mode(
    layer: usize,
    lens: &[usize],
    n_new: &[usize],
    max_position: usize,
    sparse_on: bool,
    sparse_within: bool,
) -> Result<RopePrefill> {
    let past = lens
        .iter()
        .zip(n_new)
        .position(|(&len, &n)| n > 0 && len > max_position);
    match past {
        None if sparse_within && sparse_on && n_new.iter().any(|&n| n > 0) => {
            Ok(RopePrefill::Sparse)
        }
        None => Ok(RopePrefill::Dense),
        Some(_) if sparse_on => Ok(RopePrefill::Sparse),
        Some(i) => Err(Error::config(
            format!("layer {layer} hip.rope"),
            format!(
                "GPU prefill of request {i} reaches position {} past the trained length \
                 model.max_position {max_position} with the hip sparse prefill off \
                 (GpuAttention::prefill_estimator None): a dense prefill there would attend at \
                 untrained positions; enable the sparse prefill (it runs the RoPE modes) or keep \
                 prompts within {max_position} tokens",
                lens[i] - 1
            ),
        )),
    }
}

/// CUDA-graph decode with RoPE-mode layers (`layers`: their indices).
pub(super) fn check_graph(layers: &[usize]) -> Result<()> {
    match layers.first() {
        None => Ok(()),
        Some(&l) => Err(Error::config(
            format!("layer {l} hip.rope"),
            format!(
                "CUDA-graph decode (prepare_graph / decode_graph) has no RoPE modes: they upload \
                 per-step query shifts and run the streaming gather from host metadata; RoPE-mode \
                 hip layers {layers:?} decode through GpuAttention::decode (run without CUDA graphs)"
            ),
        )),
    }
}

/// Host-tier (offloaded) decode of a RoPE-mode layer.
pub(super) fn host_tier_refused(layer: usize) -> Error {
    Error::config(
        format!("layer {layer} hip.rope"),
        "host-tier decode (kv.device_cache_pages) has no RoPE modes: the rotated scorers and the \
         streaming gather read keys in device memory; use original positions with host offload",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RopeConfig;

    fn hip(scoring: RopeMode, attention: RopeMode) -> HipConfig {
        HipConfig {
            rope: RopeConfig { scoring, attention },
            ..HipConfig::default()
        }
    }

    #[test]
    fn rope_layer_modes_validate_as_the_cpu_policy() {
        use RopeMode::*;
        assert_eq!(layer_modes(0, &hip(Original, Original)).unwrap(), None);
        assert_eq!(
            layer_modes(0, &hip(ChunkIndexed, Streaming)).unwrap(),
            Some((ChunkIndexed, true))
        );
        assert_eq!(
            layer_modes(0, &hip(Relative, Original)).unwrap(),
            Some((Relative, false))
        );
        assert_eq!(
            layer_modes(0, &hip(Original, Streaming)).unwrap(),
            Some((Original, true))
        );
        let e = layer_modes(3, &hip(Streaming, Original))
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer 3") && e.contains("attention only"), "{e}");
        let e = layer_modes(1, &hip(Original, Relative))
            .unwrap_err()
            .to_string();
        assert!(e.contains("original or streaming"), "{e}");
        // The decoder's own rules still apply (CPU-only fields).
        let mut c = hip(ChunkIndexed, Streaming);
        c.successors = 4;
        assert!(layer_modes(0, &c)
            .unwrap_err()
            .to_string()
            .contains("successors"));
        // The CPU policy refuses the same combinations.
        let model = crate::config::ModelShape::default();
        for (s, a) in [
            (Streaming, Original),
            (Original, Relative),
            (Relative, ChunkIndexed),
        ] {
            assert!(crate::policy::hip::HipPolicy::new(hip(s, a), &model).is_err());
            assert!(layer_modes(0, &hip(s, a)).is_err());
        }
    }

    #[test]
    fn rope_decode_needs_sparse_v2_for_streaming() {
        assert!(check_decode(0, true, HipAttention::SparseV2).is_ok());
        assert!(check_decode(0, false, HipAttention::SplitCombine).is_ok());
        let e = check_decode(2, true, HipAttention::SplitCombine)
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer 2") && e.contains("sparse v2"), "{e}");
    }

    #[test]
    fn rope_prefill_dense_within_the_trained_length_sparse_past_it() {
        use RopePrefill::*;
        // Positions up to max_position - 1: dense at the model's positions.
        assert_eq!(
            prefill_mode(0, &[8192, 100], &[8192, 100], 8192, true, false).unwrap(),
            Dense
        );
        // A request with nothing new is not prefilled.
        assert_eq!(
            prefill_mode(0, &[20000, 100], &[0, 100], 8192, false, false).unwrap(),
            Dense
        );
        // One query at position 8192 (the 8193rd token) is past it: the
        // RoPE-mode sparse prefill, for the whole call.
        assert_eq!(
            prefill_mode(5, &[100, 8193], &[100, 1], 8192, true, false).unwrap(),
            Sparse
        );
        // ... refused when the sparse prefill is off.
        let e = prefill_mode(5, &[100, 8193], &[100, 1], 8192, false, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("layer 5")
                && e.contains("request 1")
                && e.contains("position 8192")
                && e.contains("prefill_estimator"),
            "{e}"
        );
    }

    /// llama.cpp's CUDA route (`rope_prefill_sparse`): within the trained
    /// length the RoPE-mode sparse prefill runs too (as the plugin's CPU
    /// route plans every ubatch at or above prefill_dense_below), dense when
    /// the sparse prefill is off; past it, as before.
    #[test]
    fn rope_prefill_sparse_within_the_trained_length_when_asked() {
        use RopePrefill::*;
        assert_eq!(
            prefill_mode(0, &[4096], &[512], 8192, true, true).unwrap(),
            Sparse
        );
        assert_eq!(
            prefill_mode(0, &[4096], &[512], 8192, true, false).unwrap(),
            Dense
        );
        assert_eq!(
            prefill_mode(0, &[4096], &[512], 8192, false, true).unwrap(),
            Dense
        );
        assert_eq!(
            prefill_mode(0, &[4096], &[0], 8192, true, true).unwrap(),
            Dense
        );
        assert_eq!(
            prefill_mode(0, &[9000], &[512], 8192, true, true).unwrap(),
            Sparse
        );
    }

    #[test]
    fn rope_graph_and_host_tier_refuse_with_the_layer() {
        assert!(check_graph(&[]).is_ok());
        let e = check_graph(&[4, 7]).unwrap_err().to_string();
        assert!(
            e.contains("layer 4") && e.contains("[4, 7]") && e.contains("without CUDA graphs"),
            "{e}"
        );
        let e = host_tier_refused(9).to_string();
        assert!(
            e.contains("layer 9") && e.contains("device_cache_pages"),
            "{e}"
        );
    }
}
