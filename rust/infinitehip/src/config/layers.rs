//! Which method each layer runs: the one rule every path (CPU engine,
//! llama.cpp plugin, GPU engine, llama.cpp CUDA route) reads through
//! `PolicyConfig::resolve_layer`, and the plain-words summary `config-check`
//! prints.

use std::path::Path;

use super::{LayerPolicy, PolicyConfig};
use crate::error::{Error, Result};
use crate::policy::locret::RetainingHead;

/// Where a layer's policy comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerSource {
    /// `overrides[i]` (the last entry naming the layer).
    Override(usize),
    /// Below `dense_layers`, not overridden.
    DenseLayers,
    /// `default`.
    Default,
}

impl LayerSource {
    /// JSON path of the policy object (or field) that decided.
    pub fn path(self) -> String {
        match self {
            LayerSource::Override(i) => format!("overrides[{i}].policy"),
            LayerSource::DenseLayers => "dense_layers".into(),
            LayerSource::Default => "default".into(),
        }
    }
}

impl PolicyConfig {
    /// The policy `layer` runs and where it comes from. The rule:
    /// `overrides` (the last entry naming the layer) win, then layers below
    /// `dense_layers` are dense, then `default`.
    pub fn resolve_layer(&self, layer: usize) -> (&LayerPolicy, LayerSource) {
        if let Some(i) = self
            .overrides
            .iter()
            .rposition(|o| o.layers.contains(&layer))
        {
            return (&self.overrides[i].policy, LayerSource::Override(i));
        }
        if layer < self.dense_layers {
            return (&LayerPolicy::Dense, LayerSource::DenseLayers);
        }
        (&self.default, LayerSource::Default)
    }

    /// The policy that applies to `layer` (`resolve_layer`'s rule).
    pub fn layer_policy(&self, layer: usize) -> &LayerPolicy {
        self.resolve_layer(layer).0
    }

    /// One line per run of consecutive layers with the same method and
    /// source, e.g. `layers 1-2: dense (dense_layers)`.
    pub fn describe_layers(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut l = 0;
        while l < self.model.n_layers {
            let (p, src) = self.resolve_layer(l);
            let mut end = l + 1;
            while end < self.model.n_layers && self.resolve_layer(end) == (p, src) {
                end += 1;
            }
            let span = if end - l == 1 {
                format!("layer {l}")
            } else {
                format!("layers {l}-{}", end - 1)
            };
            out.push(format!("{span}: {} ({})", p.method(), src.path()));
            l = end;
        }
        out
    }

    /// Checks what `validate` cannot see from the JSON alone: every locret
    /// layer's retaining-head weights file exists and holds that layer's
    /// tensors in the model's shape.
    pub fn check_files(&self) -> Result<()> {
        for l in 0..self.model.n_layers {
            let (LayerPolicy::Locret(c), src) = self.resolve_layer(l) else {
                continue;
            };
            let field = format!("{}.weights", src.path());
            let Some(w) = &c.weights else {
                return Err(Error::config(field, "locret needs a weights file"));
            };
            if !Path::new(w).is_file() {
                return Err(Error::config(field, format!("file `{w}` not found")));
            }
            RetainingHead::load(Path::new(w), &self.model, c.hidden, l)
                .map_err(|e| Error::config(field, format!("layer {l}: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> PolicyConfig {
        PolicyConfig::from_json(json).unwrap()
    }

    #[test]
    fn overrides_win_over_dense_layers() {
        let c = cfg(r#"{"model": {"n_layers": 6}, "dense_layers": 3,
            "default": {"method": "hip"},
            "overrides": [{"layers": [1], "policy": {"method": "hip", "sink": 16}},
                          {"layers": [4], "policy": {"method": "dense"}}]}"#);
        let methods: Vec<_> = (0..6).map(|l| c.layer_policy(l).method()).collect();
        assert_eq!(methods, ["dense", "hip", "dense", "hip", "dense", "hip"]);
        assert_eq!(c.resolve_layer(1).1, LayerSource::Override(0));
        assert_eq!(c.resolve_layer(2).1, LayerSource::DenseLayers);
        assert_eq!(c.resolve_layer(5).1, LayerSource::Default);
        assert_eq!(
            c.describe_layers(),
            [
                "layer 0: dense (dense_layers)",
                "layer 1: hip (overrides[0].policy)",
                "layer 2: dense (dense_layers)",
                "layer 3: hip (default)",
                "layer 4: dense (overrides[1].policy)",
                "layer 5: hip (default)",
            ]
        );
    }

    #[test]
    fn later_override_wins() {
        let c = cfg(r#"{"model": {"n_layers": 4}, "dense_layers": 0,
            "overrides": [{"layers": [0, 1], "policy": {"method": "dense"}},
                          {"layers": [1], "policy": {"method": "hip"}}]}"#);
        assert_eq!(c.describe_layers()[1], "layer 1: hip (overrides[1].policy)");
        assert_eq!(c.describe_layers()[2], "layers 2-3: hip (default)");
    }

    #[test]
    fn check_files_fails_on_a_missing_weights_file() {
        let c = cfg(r#"{"model": {"n_layers": 2}, "dense_layers": 1,
            "default": {"method": "locret", "weights": "/nonexistent/locret.safetensors"}}"#);
        let e = c.check_files().unwrap_err().to_string();
        assert!(
            e.contains("default.weights") && e.contains("not found"),
            "{e}"
        );
        // No locret layer: nothing to check.
        cfg(r#"{"dense_layers": 0}"#).check_files().unwrap();
    }
}
