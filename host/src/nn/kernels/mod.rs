//! EIR's own CPU kernels, shared by the backends: the f32 GEMM with its fused epilogue
//! ([`sgemm`]), fused attention ([`attention`]), vectorised activations ([`act`]) and the run-time choice of vector instructions ([`simd`]). Every kernel keeps a
//! portable path and is tested against a plain reference on ragged shapes.

pub(crate) mod act;
pub(crate) mod attention;
pub(crate) mod quant;
pub(crate) mod sgemm;
pub(crate) mod simd;
