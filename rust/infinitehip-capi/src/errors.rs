//! Error codes a caller can act on, and which core error maps to which.
//!
//! Values are stable: codes are only ever added (the header and the Python
//! shim repeat them).

use std::ffi::c_int;

pub const IHIP_OK: c_int = 0;
/// Invalid argument: NULL pointer, shape, dtype code, alignment, size
/// overflow, an index (layer, table row, length) out of range. Fix the call.
pub const IHIP_ERR_ARG: c_int = -1;
/// The engine refused the call in its current state or for its config
/// (unknown or duplicate sequence, bad config field, weights file).
pub const IHIP_ERR_ENGINE: c_int = -2;
/// A Rust panic was caught (a bug): the handle is poisoned; free it.
pub const IHIP_ERR_PANIC: c_int = -3;
/// GPU entry point unavailable: built without the `cuda` feature, no
/// driver, or the device could not be opened.
pub const IHIP_ERR_NO_GPU: c_int = -4;
/// A well-formed request this build, route or kernel set does not run
/// (a dtype, head_dim / GQA group, or method the GPU route lacks).
pub const IHIP_ERR_UNSUPPORTED: c_int = -5;
/// Out of memory: the KV pool has no free page, or a device allocation
/// failed. Free sequences or memory and retry.
pub const IHIP_ERR_OOM: c_int = -6;
/// The device reported a fault (a CUDA driver error other than
/// out-of-memory: launch failure, illegal address, ...). The context may
/// be unusable.
pub const IHIP_ERR_DEVICE: c_int = -7;

/// The code of a core error.
pub(crate) fn code_of(e: &ihip::Error) -> c_int {
    use ihip::Error as E;
    match e {
        E::OutOfPages { .. } => IHIP_ERR_OOM,
        E::Dtype { .. } => IHIP_ERR_UNSUPPORTED,
        E::Shape { .. } | E::OutOfRange(_) => IHIP_ERR_ARG,
        // The CUDA backend reports driver errors as `Invalid("CUDA: ...")`
        // (`backend::cuda::gpu_err`) with the driver's error name.
        E::Invalid(m) if m.starts_with("CUDA: ") => {
            if m.contains("OUT_OF_MEMORY") {
                IHIP_ERR_OOM
            } else if m.contains("not found") {
                IHIP_ERR_NO_GPU
            } else {
                IHIP_ERR_DEVICE
            }
        }
        // "kernels support head_dim ...", "runs dense and hip layers only".
        E::Invalid(m) if m.contains("support") || m.contains(" only") => IHIP_ERR_UNSUPPORTED,
        E::Invalid(_) => IHIP_ERR_ARG,
        _ => IHIP_ERR_ENGINE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ihip::Error as E;

    #[test]
    fn each_kind_of_failure_has_its_own_code() {
        let oom_pool = E::OutOfPages {
            capacity: 4,
            needed: 1,
        };
        let cases = [
            (oom_pool, IHIP_ERR_OOM),
            (
                E::Invalid("CUDA: cuMemAlloc of 8 bytes: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into()),
                IHIP_ERR_OOM,
            ),
            (
                E::Invalid("CUDA: launch: DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access\")".into()),
                IHIP_ERR_DEVICE,
            ),
            (
                E::Invalid("CUDA: libcuda not found: no NVIDIA driver on this machine".into()),
                IHIP_ERR_NO_GPU,
            ),
            (
                E::Invalid("GPU attention: kernels support head_dim 64/128/256 and GQA groups 1/2/4/8, got head_dim 96 group 1".into()),
                IHIP_ERR_UNSUPPORTED,
            ),
            (
                E::Dtype {
                    what: "k".into(),
                    got: "f64".into(),
                    supported: "f32".into(),
                },
                IHIP_ERR_UNSUPPORTED,
            ),
            (E::shape("q", 4, 5), IHIP_ERR_ARG),
            (E::OutOfRange("layer 9 of 2".into()), IHIP_ERR_ARG),
            (E::Invalid("GPU attention: empty batch".into()), IHIP_ERR_ARG),
            (E::UnknownSequence(3), IHIP_ERR_ENGINE),
            (E::config("dense_layers", "too large"), IHIP_ERR_ENGINE),
        ];
        for (e, want) in cases {
            assert_eq!(code_of(&e), want, "{e}");
        }
        let codes = [
            IHIP_OK,
            IHIP_ERR_ARG,
            IHIP_ERR_ENGINE,
            IHIP_ERR_PANIC,
            IHIP_ERR_NO_GPU,
            IHIP_ERR_UNSUPPORTED,
            IHIP_ERR_OOM,
            IHIP_ERR_DEVICE,
        ];
        // Stable values: 0, -1 .. -7 in this order.
        assert_eq!(codes, [0, -1, -2, -3, -4, -5, -6, -7]);
    }
}
