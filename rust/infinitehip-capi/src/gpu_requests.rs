//! Host-side checks of the caller indices of `ihip_gpu_decode` /
//! `ihip_gpu_prefill*`, done before any kernel (or the device) sees them:
//! a bad index is `IHIP_ERR_ARG`, never a device fault. The kernels index
//! with 32-bit ints (`int table_stride`, i32 lengths), hence the i32 bounds.
//! Page ids stored *in* the device table are not checked here (that needs a
//! device read).

use super::*;

/// The checked per-request host arrays of one call.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct Requests<'a> {
    pub ids: &'a [u64],
    pub rows: Vec<usize>,
    pub lens: Vec<usize>,
    /// Prefill only (empty for decode).
    pub n_new: Vec<usize>,
}

fn in_i32(x: i64, name: &str, min: i64) -> Result<usize, Fail> {
    if x < min || x > i32::MAX as i64 {
        return Err(arg(format!("{name} = {x} is outside {min}..={}", i32::MAX)));
    }
    Ok(x as usize)
}

/// Check `batch` requests against a table of `table_n_rows` rows of
/// `table_stride` page ids of `page_size` tokens each.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_requests<'a>(
    batch: usize,
    req_ids: *const u64,
    table_rows: *const i64,
    lens: *const i64,
    n_new: Option<*const i64>,
    table_n_rows: i64,
    table_stride: i64,
    page_size: i64,
) -> Result<Requests<'a>, Fail> {
    if batch == 0 {
        return Err(arg("batch is 0"));
    }
    in_i32(batch as i64, "batch", 1)?;
    let n_rows = in_i32(table_n_rows, "table_n_rows", 1)?;
    let stride = in_i32(table_stride, "table_stride", 1)?;
    let ps = in_i32(page_size, "page_size", 1)?;
    // Tokens one table row addresses.
    let row_tokens = stride.saturating_mul(ps);
    let ids = slice(req_ids, batch, "req_ids")?;
    let tr = slice(table_rows, batch, "table_rows")?;
    let ls = slice(lens, batch, "lens")?;
    let nn = match n_new {
        Some(p) => slice(p, batch, "n_new")?,
        None => &[],
    };
    let mut out = Requests {
        ids,
        rows: Vec::with_capacity(batch),
        lens: Vec::with_capacity(batch),
        n_new: Vec::with_capacity(nn.len()),
    };
    for b in 0..batch {
        let row = tr[b];
        if row < 0 || row >= table_n_rows {
            return Err(arg(format!(
                "table_rows[{b}] = {row} is not a row of the {n_rows}-row table"
            )));
        }
        let len = in_i32(ls[b], &format!("lens[{b}]"), 1)?;
        if len > row_tokens {
            return Err(arg(format!(
                "lens[{b}] = {len} exceeds the {row_tokens} tokens a table row holds \
                 (table_stride {stride} x page_size {ps})"
            )));
        }
        if let Some(&n) = nn.get(b) {
            if n < 0 || n > ls[b] {
                return Err(arg(format!(
                    "n_new[{b}] = {n} is outside 0..=lens[{b}] ({len})"
                )));
            }
            out.n_new.push(n as usize);
        }
        out.rows.push(row as usize);
        out.lens.push(len);
    }
    Ok(out)
}
