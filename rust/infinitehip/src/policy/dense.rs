//! Every token, causally: the baseline every sparse policy is compared with.

use super::{Policy, SelectOutput, SelectRequest, Selection};
use crate::error::Result;

#[derive(Default)]
pub struct DensePolicy;

impl Policy for DensePolicy {
    fn name(&self) -> &'static str {
        "dense"
    }
    fn select(&mut self, req: &SelectRequest<'_>) -> Result<SelectOutput> {
        // The attention kernel applies the causal limit per query.
        Ok(SelectOutput {
            q_block: req.n_queries().max(1),
            blocks: vec![Selection::full(req.shape.n_kv_heads, req.kv.len())],
        })
    }
}
