//! What every model family implements, and how a model's files or bytes find their family.
//!
//! A family is one module under `backends/`. Loading produces a [`Model`]: immutable weights
//! behind an `Arc`, shared by every execution context of every plugin that loads the same name.

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::backends;
use super::error::NnError;
use super::meter::Meter;
use super::tensor::HostTensor;

/// Named tensors in and out of a model.
pub type Named = Vec<(String, HostTensor)>;

/// Intermediate values one compute may hold at once unless its plugin's limits say otherwise
/// (`max_compute_memory`).
pub const DEFAULT_COMPUTE_BUDGET: u64 = 1 << 30;

/// What a model load may allocate beyond the model's own bytes (converted and folded
/// constants, packed weights): this much plus [`LOAD_OVERHEAD_FACTOR`] times the model's size.
pub const LOAD_OVERHEAD: u64 = 256 << 20;
/// See [`LOAD_OVERHEAD`].
pub const LOAD_OVERHEAD_FACTOR: u64 = 4;

/// The load budget for a model of `bytes`.
pub fn load_budget(bytes: u64) -> u64 {
    bytes.saturating_mul(LOAD_OVERHEAD_FACTOR).saturating_add(LOAD_OVERHEAD)
}

/// A loaded model. `compute` is blocking and runs on the compute pool; several calls may run
/// at once on the same model.
pub trait Model: Send + Sync + 'static {
    /// The family, e.g. `"bert"`.
    fn family(&self) -> &'static str;

    /// Names of the inputs the model accepts.
    fn input_names(&self) -> Vec<String>;

    /// Runs one forward pass under `meter`: every intermediate value is reserved on it before
    /// it is allocated (over budget: `too-large`), and the pass stops at the next operator or
    /// layer once the meter's deadline passes or its caller cancels (`timeout`).
    fn compute_with(&self, inputs: Named, meter: &Meter) -> Result<Named, NnError>;

    /// How several callers' inputs combine into one pass, if they can (the scheduler's
    /// dynamic batching); `None` runs every compute alone.
    fn batching(&self) -> Option<BatchSpec> {
        None
    }

    /// The most bytes one pass over `rows` rows of `seq` tokens holds (`seq` is 0 for models
    /// without sequence inputs), if the family can tell before running; the scheduler admits
    /// batches by it. Without it the scheduler learns the figure from the passes it runs.
    fn pass_bytes(&self, _rows: usize, _seq: usize) -> Option<u64> {
        None
    }

    /// The language model behind this one, for families that generate text (`gguf`).
    fn llm(&self) -> Option<&crate::llm::Llm> {
        None
    }

    /// [`compute_with`](Self::compute_with) under [`DEFAULT_COMPUTE_BUDGET`], no deadline.
    fn compute(&self, inputs: Named) -> Result<Named, NnError> {
        self.compute_with(inputs, &Meter::with_budget(DEFAULT_COMPUTE_BUDGET))
    }
}

/// How a model's inputs and outputs carry a batch: the scheduler stacks several callers'
/// rows along dimension 0, pads sequence inputs to the longest row (with zeros), and cuts each
/// caller's rows (and sequence length) back out of the outputs. It never looks further inside.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchSpec {
    /// Inputs that carry rows along dimension 0; `true` where dimension 1 is a sequence
    /// that may be padded.
    pub inputs: Vec<(String, bool)>,
    /// The attention-mask input that tells padding from tokens: where a caller did not send
    /// one and its rows are padded, the scheduler writes ones over its tokens.
    pub mask: Option<String>,
    /// Outputs that carry rows along dimension 0; `true` where dimension 1 follows the input
    /// sequence (cut back to each caller's length).
    pub outputs: Vec<(String, bool)>,
}

/// Where a model runs (the spec's `execution-target`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The host CPU.
    #[default]
    Cpu,
    /// A CUDA GPU (builds with the `cuda` feature only).
    Gpu,
    /// Not offered by EIR.
    Tpu,
}

impl Target {
    /// The candle device for this target, or why there is none.
    pub fn device(self) -> Result<Device, NnError> {
        match self {
            Target::Cpu => Ok(Device::Cpu),
            #[cfg(feature = "cuda")]
            Target::Gpu => Device::new_cuda(0).map_err(|e| NnError::unsupported(format!("no usable CUDA GPU: {e}"))),
            #[cfg(not(feature = "cuda"))]
            Target::Gpu => Err(NnError::unsupported(
                "this build of EIR has no GPU support; rebuild it with `--features cuda` or use the cpu target",
            )),
            Target::Tpu => Err(NnError::unsupported("EIR has no TPU backend; use the cpu target")),
        }
    }
}

/// The on-disk or in-memory form of a model.
pub enum Source<'a> {
    /// A directory (e.g. `config.json` + `model.safetensors`) or a single model file.
    Path(&'a Path),
    /// Buffers handed over by a guest (`wasi:nn/graph.load`), in any order.
    Bytes(&'a [Vec<u8>]),
}

/// Loads a model, choosing the family from what the source contains, under the default load
/// budget for its size ([`load_budget`]).
pub fn load(source: Source<'_>, target: Target) -> Result<Arc<dyn Model>, NnError> {
    let size = match &source {
        Source::Bytes(parts) => parts.iter().map(|p| p.len() as u64).sum(),
        Source::Path(p) => dir_size(p),
    };
    load_with(source, target, &Meter::for_load(load_budget(size), Default::default(), None))
}

/// Bytes of a model file, or of the files directly inside a model directory.
fn dir_size(path: &Path) -> u64 {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => std::fs::read_dir(path)
            .map(|entries| entries.filter_map(Result::ok).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

/// The files directly inside `dir` whose extension is `ext` (a model directory holds one).
pub fn files_with_extension(dir: &Path, ext: &str) -> Result<Vec<std::path::PathBuf>, NnError> {
    Ok(std::fs::read_dir(dir)
        .map_err(|e| NnError::not_found(format!("{}: {e}", dir.display())))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect())
}

/// [`load`] under `meter` (a load budget, the caller's deadline and cancellation).
pub fn load_with(source: Source<'_>, target: Target, meter: &Meter) -> Result<Arc<dyn Model>, NnError> {
    let device = target.device()?;
    match source {
        Source::Path(path) if path.is_dir() && !path.join("config.json").exists() => {
            // A directory holding one ONNX graph (and its assets: labels, tokenizers).
            let onnx = files_with_extension(path, "onnx")?;
            match onnx.as_slice() {
                [one] => load_with(Source::Path(one), target, meter),
                [] => Err(NnError::not_found(format!(
                    "{}: a model directory needs config.json (safetensors models) or one .onnx file",
                    path.display()
                ))),
                _ => Err(NnError::invalid_argument(format!(
                    "{}: several .onnx files; declare the model by its file instead",
                    path.display()
                ))),
            }
        }
        Source::Path(path) if path.is_dir() => {
            let config = path.join("config.json");
            let text = std::fs::read_to_string(&config).map_err(|e| {
                NnError::not_found(format!("{}: {e} (a model directory needs config.json)", config.display()))
            })?;
            let family = model_type(&text)?;
            match family.as_str() {
                "bert" => Ok(Arc::new(backends::bert::Bert::from_dir(path, &text, &device, meter)?)),
                other => Err(NnError::unsupported(format!(
                    "{}: model_type `{other}` has no backend (supported: bert)",
                    path.display()
                ))),
            }
        }
        Source::Path(path) => {
            let bytes = std::fs::read(path).map_err(|e| NnError::not_found(format!("{}: {e}", path.display())))?;
            match sniff_file(&bytes) {
                "onnx" => Ok(Arc::new(
                    backends::onnx::Onnx::from_bytes_with(&bytes, &device, meter)
                        .map_err(|e| NnError { message: format!("{}: {}", path.display(), e.message), ..e })?,
                )),
                other => Err(NnError::unsupported(format!(
                    "{}: a single {other} file has no backend in this build (supported: ONNX files, BERT directories)",
                    path.display()
                ))),
            }
        }
        Source::Bytes([one]) if sniff_file(one) == "onnx" => {
            Ok(Arc::new(backends::onnx::Onnx::from_bytes_with(one, &device, meter)?))
        }
        Source::Bytes(parts) => {
            let config = parts.iter().find(|p| p.first() == Some(&b'{'));
            let weights = parts.iter().find(|p| sniff_file(p) == "safetensors");
            match (config, weights, parts.len()) {
                (Some(config), Some(weights), 2) => {
                    let text = std::str::from_utf8(config)
                        .map_err(|_| NnError::invalid_encoding("config.json is not UTF-8"))?;
                    match model_type(text)?.as_str() {
                        "bert" => Ok(Arc::new(backends::bert::Bert::from_bytes(text, weights, &device, meter)?)),
                        other => {
                            Err(NnError::unsupported(format!("model_type `{other}` has no backend (supported: bert)")))
                        }
                    }
                }
                _ => Err(NnError::invalid_encoding(format!(
                    "cannot tell the model's format from {} buffer(s) ({}); give one ONNX file or [config.json, model.safetensors]",
                    parts.len(),
                    parts.iter().map(|p| sniff_file(p)).collect::<Vec<_>>().join(", ")
                ))),
            }
        }
    }
}

fn model_type(config: &str) -> Result<String, NnError> {
    let json: serde_json::Value =
        serde_json::from_str(config).map_err(|e| NnError::invalid_encoding(format!("config.json: {e}")))?;
    json.get("model_type")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| NnError::invalid_encoding("config.json has no `model_type`"))
}

/// Names a model file's format from its first bytes.
pub fn sniff_file(head: &[u8]) -> &'static str {
    if head.starts_with(b"GGUF") {
        "gguf"
    } else if head.len() >= 9 && head[8] == b'{' && u64::from_le_bytes(head[..8].try_into().unwrap_or_default()) > 1 {
        "safetensors"
    } else if head.first() == Some(&b'{') {
        "json"
    } else if head.first() == Some(&0x08) {
        // ONNX ModelProto starts with field 1 (ir_version, varint): tag 0x08.
        "onnx"
    } else {
        "unknown"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_formats() {
        assert_eq!(sniff_file(b"GGUF\x03\0\0\0"), "gguf");
        let mut st = 42u64.to_le_bytes().to_vec();
        st.extend_from_slice(b"{\"a\":1}");
        assert_eq!(sniff_file(&st), "safetensors");
        assert_eq!(sniff_file(b"{\"model_type\":\"bert\"}"), "json");
        assert_eq!(sniff_file(&[0x08, 0x07, 0x12]), "onnx");
        assert_eq!(sniff_file(b"hello"), "unknown");
    }

    #[test]
    fn unsupported_targets_and_bad_bytes_are_clear_errors() {
        #[cfg(not(feature = "cuda"))]
        assert!(Target::Gpu.device().unwrap_err().message.contains("--features cuda"));
        assert!(Target::Tpu.device().is_err());
        let err = load(Source::Bytes(&[b"garbage".to_vec()]), Target::Cpu).err().unwrap();
        assert_eq!(err.code, super::super::bindings::errors::ErrorCode::InvalidEncoding);
        let err = load(
            Source::Bytes(&[b"{\"model_type\":\"gpt9\"}".to_vec(), {
                let mut st = 2u64.to_le_bytes().to_vec();
                st.extend_from_slice(b"{}");
                st
            }]),
            Target::Cpu,
        )
        .err()
        .unwrap();
        assert!(err.message.contains("gpt9"), "{err}");
    }
}
