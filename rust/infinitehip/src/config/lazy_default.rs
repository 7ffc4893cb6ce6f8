//! LazyLLM's default pruning points by model depth: a lazy policy whose JSON
//! names no `points` prunes after 30%, 60% and 90% of the layers (the shape
//! of the paper's fig. 4: 30% of the layers, prune, 30%, prune, 30%, prune,
//! 10%), keeping `LAZY_DEFAULT_KEEP` of the prompt after each. The paper
//! (arXiv 2407.14057) gives no exact pruning layers or percentiles; the keep
//! fractions were picked by measurement on the quality suite's 30-layer
//! model in llama.cpp's CPU build: the strongest of the fig.-4-shaped
//! schedules tried that stays within 3% of stock's continuation perplexity
//! at 4K and 8K (+2.5% / +0.8%), at 1.62x / 1.68x stock's time to first
//! token (2 threads); the suite's decode-scored rows lose more (+3.3% / +5.9%), where
//! 0.9/0.7/0.5 stays within 3% (BENCHMARKS.md, "LazyLLM's depth-aware default
//! schedule").
//!
//! Fixed layer numbers (the earlier default: after layers 8/16/24/28) fit
//! one depth only: on a 30-layer model they pruned late and little (87% of
//! the (token, layer) rows kept, 1.18x TTFT at 4K), on an 80-layer model they
//! would stop pruning at 35% of the depth.

use serde_json::Value;

use super::{LayerPolicy, LazyConfig, LazyPoint, PolicyConfig};

/// Pruning depths in percent of the model's layers: the point after the
/// first `ceil(p * n_layers / 100)` layers.
pub const LAZY_DEFAULT_DEPTH_PERCENT: [usize; 3] = [30, 60, 90];

/// Keep fraction of the prompt after each default point.
pub const LAZY_DEFAULT_KEEP: [f32; 3] = [0.8, 0.5, 0.3];

/// The default points for a model of `n_layers` layers: after layer
/// `ceil(p * n_layers / 100) - 1` for each depth p, keeping
/// `LAZY_DEFAULT_KEEP`. Points at or past the last layer are dropped (they
/// would prune nothing); two depths that land on one layer keep the later
/// (smaller) fraction. 30 layers: after layers 8, 17, 26; 32: 9, 19, 28;
/// 80: 23, 47, 71.
pub fn lazy_default_points(n_layers: usize) -> Vec<LazyPoint> {
    let mut out: Vec<LazyPoint> = Vec::new();
    for (&p, &keep) in LAZY_DEFAULT_DEPTH_PERCENT.iter().zip(&LAZY_DEFAULT_KEEP) {
        let Some(layer) = (p * n_layers).div_ceil(100).checked_sub(1) else {
            continue;
        };
        if layer + 1 >= n_layers {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.layer == layer => last.keep = keep,
            _ => out.push(LazyPoint { layer, keep }),
        }
    }
    out
}

/// Give every lazy policy of `c` whose JSON (`raw`) names no `points` the
/// default points for `c.model.n_layers`, less those at layers that do not
/// run lazy (`dense_layers`, overrides): a pruning layer's attention gives
/// the importance, and a user who named no points asked for none there.
pub(super) fn resolve(c: &mut PolicyConfig, raw: &Value) {
    let unnamed = |p: Option<&Value>| p.and_then(|p| p.get("points")).is_none();
    let raw_over = raw.get("overrides").and_then(Value::as_array);
    let mut targets = vec![];
    if unnamed(raw.get("default")) && matches!(c.default, LayerPolicy::Lazy(_)) {
        targets.push(None);
    }
    for (i, o) in c.overrides.iter().enumerate() {
        let p = raw_over
            .and_then(|r| r.get(i))
            .and_then(|o| o.get("policy"));
        if unnamed(p) && matches!(o.policy, LayerPolicy::Lazy(_)) {
            targets.push(Some(i));
        }
    }
    if targets.is_empty() {
        return;
    }
    // Which layers run lazy does not depend on the points (the targets are
    // lazy already).
    let points: Vec<LazyPoint> = lazy_default_points(c.model.n_layers)
        .into_iter()
        .filter(|p| c.layer_policy(p.layer).method() == "lazy")
        .collect();
    for t in targets {
        *policy_at(c, t) = LayerPolicy::Lazy(LazyConfig {
            points: points.clone(),
        });
    }
}

fn policy_at(c: &mut PolicyConfig, at: Option<usize>) -> &mut LayerPolicy {
    match at {
        None => &mut c.default,
        Some(i) => &mut c.overrides[i].policy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(n: usize) -> Vec<usize> {
        lazy_default_points(n).iter().map(|p| p.layer).collect()
    }

    #[test]
    fn points_at_30_60_90_percent_of_the_depth() {
        assert_eq!(layers(30), [8, 17, 26]);
        assert_eq!(layers(32), [9, 19, 28]);
        assert_eq!(layers(80), [23, 47, 71]);
        assert_eq!(layers(10), [2, 5, 8]);
        // Shallow models: points past the last layer go, collisions keep the
        // later fraction.
        assert_eq!(layers(4), [1, 2]);
        assert_eq!(layers(2), [0]);
        assert!(layers(1).is_empty());
        let p = lazy_default_points(30);
        let keeps: Vec<f32> = p.iter().map(|p| p.keep).collect();
        assert_eq!(keeps, LAZY_DEFAULT_KEEP);
        // Every depth validates.
        for n in 1..=128 {
            let json = format!(
                r#"{{"model": {{"n_layers": {n}}}, "dense_layers": 0, "default": {{"method": "lazy"}}}}"#
            );
            let c = PolicyConfig::from_json(&json).unwrap();
            let LayerPolicy::Lazy(z) = &c.default else {
                panic!()
            };
            assert_eq!(z.points, lazy_default_points(n), "n_layers {n}");
        }
    }

    fn points(c: &PolicyConfig, at: Option<usize>) -> Vec<(usize, f32)> {
        let p = match at {
            None => &c.default,
            Some(i) => &c.overrides[i].policy,
        };
        let LayerPolicy::Lazy(z) = p else {
            panic!("not lazy")
        };
        z.points.iter().map(|p| (p.layer, p.keep)).collect()
    }

    #[test]
    fn unnamed_points_follow_the_model_depth_named_points_stay() {
        let k = LAZY_DEFAULT_KEEP;
        let c = PolicyConfig::from_json(
            r#"{"model": {"n_layers": 30, "n_q_heads": 9, "n_kv_heads": 3, "head_dim": 64},
                "dense_layers": 0, "default": {"method": "lazy"}}"#,
        )
        .unwrap();
        assert_eq!(points(&c, None), [(8, k[0]), (17, k[1]), (26, k[2])]);
        // The default model shape (32 layers) without a `model` section.
        let c = PolicyConfig::from_json(r#"{"default": {"method": "lazy"}}"#).unwrap();
        assert_eq!(points(&c, None), [(9, k[0]), (19, k[1]), (28, k[2])]);
        assert_eq!(
            c,
            PolicyConfig {
                default: LayerPolicy::Lazy(LazyConfig::default()),
                ..Default::default()
            }
        );
        // Named points are kept as they are (backward compatible).
        let c = PolicyConfig::from_json(
            r#"{"model": {"n_layers": 30}, "dense_layers": 0,
                "default": {"method": "lazy", "points": [{"layer": 8, "keep": 0.9}, {"layer": 16, "keep": 0.8}]}}"#,
        )
        .unwrap();
        assert_eq!(points(&c, None), [(8, 0.9), (16, 0.8)]);
        // An empty list is named too: no pruning.
        let c = PolicyConfig::from_json(
            r#"{"model": {"n_layers": 30}, "default": {"method": "lazy", "points": []}}"#,
        )
        .unwrap();
        assert!(points(&c, None).is_empty());
        // Overrides without points get the same default (all lazy layers
        // share one config).
        let c = PolicyConfig::from_json(
            r#"{"model": {"n_layers": 30}, "dense_layers": 0, "default": {"method": "dense"},
                "overrides": [{"layers": [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29],
                               "policy": {"method": "lazy"}}]}"#,
        )
        .unwrap();
        assert_eq!(points(&c, Some(0)), [(8, k[0]), (17, k[1]), (26, k[2])]);
    }

    #[test]
    fn default_points_skip_layers_that_do_not_run_lazy() {
        let k = LAZY_DEFAULT_KEEP;
        // 10 layers, dense_layers 3 (the default): the 30% point (layer 2)
        // is dense, so it goes; the rest stay.
        let c = PolicyConfig::from_json(
            r#"{"model": {"n_layers": 10, "n_q_heads": 4, "n_kv_heads": 2, "head_dim": 64},
                "default": {"method": "lazy"}}"#,
        )
        .unwrap();
        assert_eq!(points(&c, None), [(5, k[1]), (8, k[2])]);
        // An override that makes a default pruning layer dense drops it.
        let c = PolicyConfig::from_json(
            r#"{"model": {"n_layers": 30}, "dense_layers": 0, "default": {"method": "lazy"},
                "overrides": [{"layers": [17], "policy": {"method": "dense"}}]}"#,
        )
        .unwrap();
        assert_eq!(points(&c, None), [(8, k[0]), (26, k[2])]);
    }
}
