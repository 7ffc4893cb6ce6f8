//! Kernel sources (embedded) and the names of their entry points. Each
//! module is `common.cuh` followed by one `.cu` file; NVRTC compiles it with
//! no CUDA headers.
//! The sources live in the repository's top-level `kernels/` folder.

pub const COMMON: &str = include_str!("../../../../../kernels/common.cuh");

/// (module name, source).
pub const MODULES: &[(&str, &str)] = &[
    ("decode", include_str!("../../../../../kernels/decode.cu")),
    // Dense split-K decode on tensor cores (decode.cu is its reference twin).
    (
        "decode_dense",
        include_str!("../../../../../kernels/decode_dense.cu"),
    ),
    // A candidate rewrite of decode_dense.cu, timed beside it
    // (dense_decode::force_v2).
    (
        "decode_dense_v2",
        include_str!("../../../../../kernels/decode_dense_v2.cu"),
    ),
    (
        "hip_mask",
        include_str!("../../../../../kernels/hip_mask.cu"),
    ),
    // hip decode attention through the dense v2 kernel (a position table +
    // tail per row); loaded on first use (`LAZY_MODULES`).
    (
        "hip_sparse",
        concat!(
            "#define DD_SPARSE_ONLY 1\n",
            include_str!("../../../../../kernels/decode_dense_v2.cu")
        ),
    ),
    // The same with per-CTA timestamps (diagnostics:
    // `dense_decode::set_sparse_trace`, `bench-gpu-sparse --probe`).
    (
        "hip_sparse_trace",
        concat!(
            "#define DD_SPARSE_ONLY 1\n#define DD_TRACE 1\n",
            include_str!("../../../../../kernels/decode_dense_v2.cu")
        ),
    ),
    (
        "locret_score",
        include_str!("../../../../../kernels/locret_score.cu"),
    ),
    (
        "squeeze_lookup",
        include_str!("../../../../../kernels/squeeze_lookup.cu"),
    ),
    (
        "squeeze_kmeans",
        include_str!("../../../../../kernels/squeeze_kmeans.cu"),
    ),
    (
        "lazy_importance",
        include_str!("../../../../../kernels/lazy_importance.cu"),
    ),
    (
        "lazy_topk",
        include_str!("../../../../../kernels/lazy_topk.cu"),
    ),
    (
        "engine_policy",
        include_str!("../../../../../kernels/engine_policy.cu"),
    ),
    // decode.cu reading K/V through a per-(page, kv head) slot table.
    (
        "decode_slot",
        concat!(
            "#define DEC_SLOT 1\n",
            include_str!("../../../../../kernels/decode.cu")
        ),
    ),
    ("offload", include_str!("../../../../../kernels/offload.cu")),
    // Device metadata of the graph-capturable engine decode (engine_attn/graph.rs).
    (
        "graph_step",
        include_str!("../../../../../kernels/graph_step.cu"),
    ),
    // Tensor-core block-sparse prefill (decode.cu is its CUDA-core twin).
    (
        "prefill_tc",
        include_str!("../../../../../kernels/prefill_tc.cu"),
    ),
    // Fast hip prefill mask estimation on tensor cores (hip_mask.cu's
    // f32 scoring is its reference twin).
    (
        "hip_fast",
        include_str!("../../../../../kernels/hip_fast.cu"),
    ),
    // hip_mask.cu scoring keys in the host tier through a device row cache.
    // RoPE modes of the hip decode (rope.scoring chunk_indexed/relative,
    // rope.attention streaming); loaded on first use.
    (
        "hip_rope",
        include_str!("../../../../../kernels/hip_rope.cu"),
    ),
    (
        "hip_mask_host",
        concat!(
            "#define HIP_EST_HOST 1\n",
            include_str!("../../../../../kernels/hip_est_host.cuh"),
            include_str!("../../../../../kernels/hip_mask.cu")
        ),
    ),
    // The same with each probed row's loads all in flight before its use
    // (`HostEstimation::set_row_preload`; same bits).
    (
        "hip_mask_host_pl",
        concat!(
            "#define HIP_EST_HOST 1\n#define HIP_EST_PRELOAD 1\n",
            include_str!("../../../../../kernels/hip_est_host.cuh"),
            include_str!("../../../../../kernels/hip_mask.cu")
        ),
    ),
];

/// Full source of a module as NVRTC sees it.
pub fn full_source(module: &str) -> Option<String> {
    MODULES
        .iter()
        .find(|(n, _)| *n == module)
        .map(|(_, s)| format!("{COMMON}\n#line 1 \"{module}.cu\"\n{s}"))
}

pub fn dtype_tag(dt: crate::DType) -> Option<&'static str> {
    match dt {
        crate::DType::Bf16 => Some("bf16"),
        crate::DType::F16 => Some("f16"),
        crate::DType::F32 => None,
    }
}

/// Modules `GpuContext` loads on first use, not at creation (the driver
/// JIT-compiles each loaded module's PTX: on a cold machine that costs
/// seconds per MB). A lazy module's first use must not be inside a CUDA
/// graph capture: callers run one eager step first.
pub const LAZY_MODULES: &[&str] = &[
    "hip_sparse",
    "hip_sparse_trace",
    "hip_mask_host_pl",
    "hip_rope",
];

pub const HEAD_DIMS: &[usize] = &[64, 128, 256];
/// Entry points of kernels/squeeze_kmeans.cu besides `km_assign_d{D}`.
const KMEANS_ENTRY_POINTS: &[&str] = &[
    "km_fill_u32",
    "km_normalize",
    "km_pp_init",
    "km_pp_cc",
    "km_pp_update",
    "km_pp_pick",
    "km_gather_rows",
    "km_cnorm",
    "km_seg_count",
    "km_seg_base",
    "km_offsets",
    "km_seg_scatter",
    "km_means",
];
pub const GROUPS: &[usize] = &[1, 2, 4, 8];
/// Head dims of the tensor-core prefill kernel (kernels/prefill_tc.cu).
pub const TC_HEAD_DIMS: &[usize] = &[64, 128];

/// 16-token chunks per warp iteration of kernels/decode_dense.cu built for
/// head_dim `d` (the first is the default).
pub fn dense_chunks(d: usize) -> &'static [usize] {
    if d >= 256 {
        &[1]
    } else {
        &[1, 2]
    }
}

/// Every entry point each module must export (checked after compilation).
pub fn entry_points(module: &str) -> Vec<String> {
    if module == "decode_slot" {
        return entry_points("decode")
            .into_iter()
            .filter(|n| n != "q_to_f32")
            .map(|n| format!("slot_{n}"))
            .collect();
    }
    if module == "offload" {
        return vec![
            "offload_gather".into(),
            "offload_rows".into(),
            "est_admit".into(),
            "est_admit_dev".into(),
            "est_map_clear".into(),
            "est_map_rebuild".into(),
            "est_ref_pack".into(),
            "pc_walk".into(),
            "pc_clock".into(),
            "pc_rows".into(),
            "ea_mark".into(),
            "ea_count".into(),
            "ea_scatter".into(),
            "ea_take".into(),
            "ea_admit".into(),
            "ea_clear".into(),
            "ea_rebuild".into(),
            "bus_rows".into(),
            "bus_blocks".into(),
        ];
    }
    if module == "hip_mask_host" || module == "hip_mask_host_pl" {
        // The warp scoring kernels are not built over the host tier.
        return entry_points("hip_mask")
            .into_iter()
            .filter(|n| {
                !n.starts_with("hip_scorew")
                    && !n.starts_with("hip_score_mean")
                    && !n.starts_with("hip_scorea")
            })
            .collect();
    }
    if module == "decode_dense_v2" {
        return entry_points("decode_dense");
    }
    if module == "hip_rope" {
        let mut v = vec!["hip_rope_q".to_string(), "hip_pf_stream_q".to_string()];
        for dt in ["bf16", "f16"] {
            for d in HEAD_DIMS {
                v.push(format!("hip_score_rope_{dt}_d{d}"));
                v.push(format!("hip_stream_gather_{dt}_d{d}"));
                v.push(format!("hip_pf_stream_gather_{dt}_d{d}"));
            }
        }
        return v;
    }
    if module == "hip_sparse_trace" {
        return [1, 2]
            .iter()
            .flat_map(|u| {
                GROUPS
                    .iter()
                    .map(move |g| format!("hip_sparse_bf16_d128_g{g}_u{u}"))
            })
            .collect();
    }
    if module == "hip_sparse" {
        let mut v = Vec::new();
        for dt in ["bf16", "f16"] {
            for d in HEAD_DIMS {
                for u in dense_chunks(*d) {
                    for g in GROUPS {
                        v.push(format!("hip_sparse_{dt}_d{d}_g{g}_u{u}"));
                    }
                }
            }
        }
        return v;
    }
    let mut v = Vec::new();
    for dt in ["bf16", "f16"] {
        for d in HEAD_DIMS {
            match module {
                "decode" => {
                    for g in GROUPS {
                        v.push(format!("decode_{dt}_d{d}_g{g}"));
                    }
                }
                "decode_dense" => {
                    for u in dense_chunks(*d) {
                        for g in GROUPS {
                            v.push(format!("dense_{dt}_d{d}_g{g}_u{u}"));
                        }
                    }
                }
                "hip_mask" => {
                    for g in GROUPS {
                        v.push(format!("hip_score_{dt}_d{d}_q{g}"));
                    }
                    for q in [1, 2] {
                        v.push(format!("hip_score4_{dt}_d{d}_q{q}"));
                        v.push(format!("hip_scorew4_{dt}_d{d}_q{q}"));
                    }
                    for g in GROUPS {
                        v.push(format!("hip_scorew_{dt}_d{d}_q{g}"));
                        v.push(format!("hip_scorewp_{dt}_d{d}_q{g}"));
                        v.push(format!("hip_scorea_{dt}_d{d}_q{g}"));
                        v.push(format!("hip_score_mean_{dt}_d{d}_q{g}"));
                        v.push(format!("hip_score_meanw_{dt}_d{d}_q{g}"));
                    }
                }
                "hip_fast" => {
                    v.push(format!("hipf_score_rep_{dt}_d{d}"));
                    v.push(format!("hipf_score_tok_{dt}_d{d}"));
                    v.push(format!("hipf_reps_{dt}_d{d}"));
                }
                "prefill_tc" if TC_HEAD_DIMS.contains(d) => {
                    for g in GROUPS {
                        v.push(format!("prefill_tc_{dt}_d{d}_g{g}"));
                        v.push(format!("prefill_tc2_{dt}_d{d}_g{g}"));
                    }
                }
                _ => {}
            }
        }
    }
    match module {
        "decode" => {
            HEAD_DIMS
                .iter()
                .for_each(|d| v.push(format!("combine_d{d}")));
            v.push("q_to_f32".into());
        }
        "hip_mask" => {
            v.push("hip_topk".into());
            v.push("hip_topk_mc".into());
            v.push("hip_assemble".into());
            v.push("hip_topk_asm".into());
            v.push("hip_gather_q".into());
            v.push("hip_step_meta".into());
        }
        "hip_fast" => {
            for n in ["hipf_stage0_keys", "hipf_subkeys", "hipf_gather_q"] {
                v.push(n.into());
            }
        }
        "locret_score" => {
            v.push("locret_fc1".into());
            v.push("locret_fc2".into());
        }
        "squeeze_lookup" => {
            for n in ["squeeze_lookup", "squeeze_lookup2", "squeeze_ranges"] {
                v.push(n.into());
            }
        }
        "squeeze_kmeans" => {
            for n in KMEANS_ENTRY_POINTS {
                v.push((*n).into());
            }
            HEAD_DIMS
                .iter()
                .for_each(|d| v.push(format!("km_assign_d{d}")));
        }
        "lazy_topk" => v.push("lazy_topk".into()),
        "graph_step" => {
            for n in [
                "gs_meta",
                "gs_stage_copy",
                "gs_store_stages",
                "gs_reset_rows",
            ] {
                v.push(n.into());
            }
        }
        "decode_dense" => v.push("dense_fill_random".into()),
        "engine_policy" => {
            for n in [
                "ep_gather_keys_bf16",
                "ep_gather_keys_f16",
                "ep_token_ranges",
                "ep_lazy_fix",
            ] {
                v.push(n.into());
            }
        }
        "lazy_importance" => {
            for dt in ["bf16", "f16"] {
                v.push(format!("lazy_logits_{dt}"));
            }
            v.push("lazy_softmax".into());
            v.push("lazy_mean".into());
        }
        _ => {}
    }
    v
}
