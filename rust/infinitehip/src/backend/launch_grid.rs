//! Kernel grid dimensions, checked against the device's limits before a
//! launch: an over-limit dimension is an error naming the launch and the
//! count, never a silent `as u32` truncation or an opaque launch failure.
//! Plain integer logic (no CUDA), so it is tested on any machine.

use crate::error::{Error, Result};

/// Largest grid per dimension (`CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_{X,Y,Z}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GridLimits {
    pub x: u64,
    pub y: u64,
    pub z: u64,
}

impl GridLimits {
    /// Every CUDA device since compute capability 3.0.
    pub const CUDA: GridLimits = GridLimits {
        x: (1 << 31) - 1,
        y: 65_535,
        z: 65_535,
    };
}

/// `(x, y, z)` as a launch's grid, each in 1..=limit.
pub fn grid(
    limits: GridLimits,
    what: &str,
    (x, y, z): (usize, usize, usize),
) -> Result<(u32, u32, u32)> {
    let dim = |name: &str, v: usize, max: u64| -> Result<u32> {
        if v == 0 || v as u64 > max {
            return Err(Error::Invalid(format!(
                "{what}: grid {name} = {v} is outside 1..={max} (the device's limit); split the work into smaller calls"
            )));
        }
        Ok(v as u32)
    };
    Ok((
        dim("x", x, limits.x)?,
        dim("y", y, limits.y)?,
        dim("z", z, limits.z)?,
    ))
}

/// Attention partials: one CTA per (query row, split) along x, row-major
/// (`blockIdx.x = row * n_splits + split`), KV heads along y. x holds up to
/// 2^31 - 1 CTAs where y and z hold 65,535, so long prefills (one row per
/// query) fit.
pub fn row_split_grid(
    limits: GridLimits,
    rows: usize,
    n_splits: usize,
    kv_heads: usize,
) -> Result<(u32, u32, u32)> {
    let x = rows.checked_mul(n_splits).ok_or_else(|| {
        Error::Invalid(format!(
            "attention: {rows} rows x {n_splits} splits overflows"
        ))
    })?;
    grid(limits, "attention", (x, kv_heads, 1))
}

/// Which (row, split) CTA `bx` of `row_split_grid` computes (the kernel's
/// own arithmetic, kept here so the test pins it).
pub fn row_split_of(bx: u64, n_splits: u64) -> (u64, u64) {
    (bx / n_splits, bx % n_splits)
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: GridLimits = GridLimits::CUDA;

    #[test]
    fn rows_beyond_65535_fit_along_x() {
        // 70K prefill rows, one split, 8 KV heads: z would have failed.
        assert_eq!(row_split_grid(L, 70_000, 1, 8).unwrap(), (70_000, 8, 1));
        assert_eq!(row_split_grid(L, 1 << 20, 4, 8).unwrap(), (1 << 22, 8, 1));
        // Every (row, split) is covered exactly once.
        let (rows, ns) = (5u64, 3u64);
        let mut seen = vec![false; (rows * ns) as usize];
        for bx in 0..rows * ns {
            let (r, s) = row_split_of(bx, ns);
            assert!(r < rows && s < ns);
            let i = (r * ns + s) as usize;
            assert!(!seen[i]);
            seen[i] = true;
        }
        assert!(seen.iter().all(|&x| x));
    }

    #[test]
    fn over_limit_or_empty_grids_are_errors() {
        let e = row_split_grid(L, 1 << 30, 4, 8).unwrap_err().to_string();
        assert!(e.contains("grid x = 4294967296"), "{e}");
        let e = row_split_grid(L, 10, 1, 70_000).unwrap_err().to_string();
        assert!(e.contains("grid y = 70000"), "{e}");
        assert!(grid(L, "k", (1, 1, 65_536)).is_err());
        assert!(grid(L, "k", (0, 1, 1)).is_err());
        assert!(row_split_grid(L, usize::MAX, 2, 1).is_err());
        assert_eq!(
            grid(L, "k", (1, 65_535, 65_535)).unwrap(),
            (1, 65_535, 65_535)
        );
    }
}
