//! Stage shapes by head dimension: a hip policy that names no `stages` gets
//! the paper's shapes (chunks 64 -> 16 -> 8) unless the model's head_dim is
//! at most `SMALL_HEAD_DIM`, where it gets small chunks and a token-level
//! last stage refreshed every decode step.
//!
//! Why (BENCHMARKS.md, issue 12): on SmolLM2's head_dim-64 keys the
//! representative search of a 32-token chunk finds a key far below the
//! chunk's true maximum (replayed attention mass kept 0.712 at 8x, vs 0.830
//! with exact chunk maxima); chunks of 4 then a token-level top-k keep 0.904
//! (exact group top-k: 0.931). A chunk of 4 costs its search 4 key reads,
//! so stage 1 reads every middle key once per refresh; a chunk of 2 costs
//! the same reads and its search is the exact chunk maximum (both keys are
//! probed), which keeps 0.919 (chunk 4's search picks a half first and can
//! miss the chunk's best key).

use serde_json::Value;

use super::{HipConfig, HipStage, LayerPolicy, PolicyConfig};

/// Largest head_dim that gets `small_head_dim_stages` by default.
pub const SMALL_HEAD_DIM: usize = 64;

/// Stage-1 chunk of the small-head-dim stages: 2, whose search reads both
/// keys (the exact chunk max) at the per-token cost of chunk 4.
pub const SMALL_STAGE1_CHUNK: usize = 2;

/// The default stages for head_dim <= `SMALL_HEAD_DIM`, with the same
/// budgets as `HipConfig::default()`'s first and last stage.
pub fn small_head_dim_stages() -> Vec<HipStage> {
    let paper = HipConfig::default().stages;
    vec![
        HipStage {
            chunk_size: SMALL_STAGE1_CHUNK,
            keep_tokens: paper[0].keep_tokens,
            refresh_interval: 8,
        },
        HipStage {
            chunk_size: 1,
            keep_tokens: paper[paper.len() - 1].keep_tokens,
            refresh_interval: 1,
        },
    ]
}

/// Give every hip policy of `c` whose JSON (`raw`) names no `stages` the
/// small-head-dim stages when the model's head_dim calls for them.
pub(super) fn resolve(c: &mut PolicyConfig, raw: &Value) {
    if c.model.head_dim > SMALL_HEAD_DIM {
        return;
    }
    let unnamed = |p: Option<&Value>| p.and_then(|p| p.get("stages")).is_none();
    if unnamed(raw.get("default")) {
        set(&mut c.default);
    }
    let raw_over = raw.get("overrides").and_then(Value::as_array);
    for (i, o) in c.overrides.iter_mut().enumerate() {
        if unnamed(
            raw_over
                .and_then(|r| r.get(i))
                .and_then(|o| o.get("policy")),
        ) {
            set(&mut o.policy);
        }
    }
}

fn set(p: &mut LayerPolicy) {
    if let LayerPolicy::Hip(h) = p {
        h.stages = small_head_dim_stages();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stages(json: &str) -> Vec<HipStage> {
        match PolicyConfig::from_json(json).unwrap().default {
            LayerPolicy::Hip(h) => h.stages,
            _ => panic!("not hip"),
        }
    }

    #[test]
    fn head_dim_64_without_stages_gets_small_chunks() {
        let m = |d: usize| {
            format!(
                r#""model": {{"n_layers": 4, "n_q_heads": 4, "n_kv_heads": 2, "head_dim": {d}}}"#
            )
        };
        let small = small_head_dim_stages();
        assert_eq!(
            stages(&format!(r#"{{{}, "default": {{"method": "hip"}}}}"#, m(64))),
            small
        );
        assert_eq!(stages(&format!(r#"{{{}}}"#, m(32))), small);
        let paper = HipConfig::default().stages;
        assert_eq!(
            stages(&format!(
                r#"{{{}, "default": {{"method": "hip"}}}}"#,
                m(128)
            )),
            paper
        );
        // Stages a user names are kept.
        let named = format!(
            r#"{{{}, "default": {{"method": "hip", "window": 64, "sink": 8, "stages": [{{"chunk_size": 32, "keep_tokens": 256, "refresh_interval": 8}}]}},
               "overrides": [{{"layers": [1], "policy": {{"method": "hip"}}}}]}}"#,
            m(64)
        );
        let c = PolicyConfig::from_json(&named).unwrap();
        let LayerPolicy::Hip(h) = &c.default else {
            panic!()
        };
        assert_eq!(h.stages[0].chunk_size, 32);
        let LayerPolicy::Hip(o) = &c.overrides[0].policy else {
            panic!()
        };
        assert_eq!(o.stages, small);
    }
}
