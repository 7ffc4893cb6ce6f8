//! One eviction score per held token from its per-(layer, KV head)
//! retaining-head scores (`TokenScore`). llama.cpp's cells are shared by
//! every layer and head, so Locret there evicts whole tokens and needs one
//! number per token; the heads regress raw attention logits whose scale
//! differs per layer, so a raw max lets the layer with the largest scale
//! decide alone (BENCHMARKS.md: layer 7 of SmolLM2-135M for 87% of tokens).

use infinitehip::config::TokenScore;

/// Token scores of `n` held tokens from `rows` (`n x width`, token-major:
/// the token's raw score for each (layer, KV head)). A token whose first
/// column is not finite is unscored (decoded or unscored tokens are +inf
/// rows) and scores +inf. `ZMax` standardises each column over the scored
/// tokens (a constant column gives 0) and takes the token's largest z-score;
/// `RankMax` ranks the scored tokens within each column (ties share their
/// mean rank), scales ranks to [0, 1] and takes the token's largest;
/// `RawMax` takes the largest raw score.
pub fn token_scores(rule: TokenScore, rows: &[f32], width: usize) -> Vec<f32> {
    assert!(
        width > 0 && rows.len().is_multiple_of(width),
        "rows {} not a multiple of width {width}",
        rows.len()
    );
    let n = rows.len() / width;
    let scored: Vec<usize> = (0..n).filter(|&t| rows[t * width].is_finite()).collect();
    let mut out = vec![f32::INFINITY; n];
    match rule {
        TokenScore::RawMax => {
            for &t in &scored {
                out[t] = rows[t * width..(t + 1) * width]
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
            }
        }
        TokenScore::ZMax => {
            for &t in &scored {
                out[t] = f32::NEG_INFINITY;
            }
            let m = scored.len() as f64;
            for c in 0..width {
                let at = |t: usize| rows[t * width + c] as f64;
                let mean = scored.iter().map(|&t| at(t)).sum::<f64>() / m;
                let var = scored.iter().map(|&t| (at(t) - mean).powi(2)).sum::<f64>() / m;
                let inv = if var > 0.0 { 1.0 / var.sqrt() } else { 0.0 };
                for &t in &scored {
                    out[t] = out[t].max(((at(t) - mean) * inv) as f32);
                }
            }
        }
        TokenScore::SoftMax | TokenScore::SoftSum => {
            let sum = rule == TokenScore::SoftSum;
            let mut acc = vec![if sum { 0f64 } else { f64::NEG_INFINITY }; n];
            let mut e = vec![0f64; scored.len()];
            for c in 0..width {
                let at = |t: usize| rows[t * width + c] as f64;
                let mx = scored
                    .iter()
                    .map(|&t| at(t))
                    .fold(f64::NEG_INFINITY, f64::max);
                for (ei, &t) in e.iter_mut().zip(&scored) {
                    *ei = (at(t) - mx).exp();
                }
                let z: f64 = e.iter().sum();
                for (ei, &t) in e.iter().zip(&scored) {
                    let p = ei / z;
                    acc[t] = if sum { acc[t] + p } else { acc[t].max(p) };
                }
            }
            for &t in &scored {
                out[t] = acc[t] as f32;
            }
        }
        TokenScore::RankMax => {
            for &t in &scored {
                out[t] = f32::NEG_INFINITY;
            }
            let m = scored.len();
            let scale = if m > 1 { 1.0 / (m - 1) as f64 } else { 0.0 };
            let mut order = scored.clone();
            for c in 0..width {
                let at = |t: usize| rows[t * width + c];
                order.sort_unstable_by(|&a, &b| at(a).total_cmp(&at(b)));
                let mut i = 0;
                while i < m {
                    let mut j = i + 1;
                    while j < m && at(order[j]) == at(order[i]) {
                        j += 1;
                    }
                    // Ranks i..j tie: each gets their mean.
                    let r = ((i + j - 1) as f64 * 0.5 * scale) as f32;
                    for &t in &order[i..j] {
                        out[t] = out[t].max(r);
                    }
                    i = j;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_max_is_scale_free_and_raw_max_is_not() {
        // Column 0 is 100x larger: raw max follows it alone.
        let rows = [
            100.0,
            0.3, //
            200.0,
            0.1, //
            300.0,
            0.2, //
            f32::INFINITY,
            f32::INFINITY, // decoded
        ];
        let raw = token_scores(TokenScore::RawMax, &rows, 2);
        assert_eq!(raw, vec![100.0, 200.0, 300.0, f32::INFINITY]);
        // Ranks: column 0 -> 0, 0.5, 1; column 1 -> 1, 0, 0.5.
        let rank = token_scores(TokenScore::RankMax, &rows, 2);
        assert_eq!(rank, vec![1.0, 0.5, 1.0, f32::INFINITY]);
        // z-scores (population std): column 0 -> -1.2247, 0, 1.2247;
        // column 1 -> 1.2247, -1.2247, 0.
        let z = token_scores(TokenScore::ZMax, &rows, 2);
        let k = 1.5f32.sqrt();
        for (got, want) in z.iter().zip([k, 0.0, k]) {
            assert!((got - want).abs() < 1e-6, "{z:?}");
        }
        assert_eq!(z[3], f32::INFINITY);
    }

    #[test]
    fn soft_shares_against_a_plain_reference() {
        // Three tokens, two columns, one decoded token (+inf row).
        let rows = [
            1.0f32,
            -2.0,
            3.0,
            0.5,
            2.0,
            4.0,
            f32::INFINITY,
            f32::INFINITY,
        ];
        let share = |c: usize, t: usize| {
            let z: f64 = (0..3).map(|u| (rows[u * 2 + c] as f64).exp()).sum();
            (rows[t * 2 + c] as f64).exp() / z
        };
        let sm = token_scores(TokenScore::SoftMax, &rows, 2);
        let ss = token_scores(TokenScore::SoftSum, &rows, 2);
        for t in 0..3 {
            let (a, b) = (share(0, t), share(1, t));
            assert!((sm[t] as f64 - a.max(b)).abs() < 1e-6, "{sm:?}");
            assert!((ss[t] as f64 - (a + b)).abs() < 1e-6, "{ss:?}");
        }
        assert_eq!(sm[3], f32::INFINITY);
        assert_eq!(ss[3], f32::INFINITY);
        // Shares of the scored tokens sum to the number of columns; a shift
        // of one column changes nothing, and huge logits do not overflow.
        assert!((ss[..3].iter().sum::<f32>() - 2.0).abs() < 1e-5);
        let shifted: Vec<f32> = rows
            .iter()
            .enumerate()
            .map(|(i, &x)| if i % 2 == 0 { x + 1000.0 } else { x })
            .collect();
        assert_eq!(token_scores(TokenScore::SoftSum, &shifted, 2)[..3], ss[..3]);
    }

    #[test]
    fn constant_column_scores_zero() {
        let z = token_scores(TokenScore::ZMax, &[2.0, 2.0, 2.0], 1);
        assert_eq!(z, vec![0.0, 0.0, 0.0]);
    }

    #[test]
    fn ties_share_their_mean_rank() {
        let rows = [1.0, 1.0, 1.0, 0.0];
        assert_eq!(
            token_scores(TokenScore::RankMax, &rows, 1),
            vec![2.0 / 3.0, 2.0 / 3.0, 2.0 / 3.0, 0.0]
        );
        assert_eq!(token_scores(TokenScore::RankMax, &[5.0], 1), vec![0.0]);
    }
}
