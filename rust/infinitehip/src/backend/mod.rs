//! Compute backends beside the CPU kernels in `attention` and `policy`.
//! `cuda` (feature `cuda`): NVRTC-compiled kernels driven through cudarc.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod launch_grid;
