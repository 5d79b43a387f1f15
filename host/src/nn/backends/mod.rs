//! One module per model family.

pub mod bert;
pub mod gguf;
pub mod onnx;
