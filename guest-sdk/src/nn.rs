//! Running models through the standard wasi-nn interface (`wasi:nn@0.2.0-rc-2024-10-28`),
//! with the plugin's own [`Tensor`] type on both sides: no raw byte buffers.
//!
//! ```ignore
//! let model = eir_guest::nn::Graph::load_by_name("minilm")?;
//! let session = model.session()?;
//! let outputs = session.compute(&[&input_ids, &attention_mask, &token_type_ids])?;
//! let hidden = eir_guest::nn::output(&outputs, "last_hidden_state")?;
//! ```

use crate::bindings::wasi::nn::{errors, graph, inference, tensor as nn};
use crate::{Error, ErrorCode, Result, Tensor, TensorData};

pub use graph::{ExecutionTarget, GraphEncoding};
pub use nn::TensorType;

/// A model loaded by the host, shared by all instances that load the same name.
pub struct Graph {
    inner: graph::Graph,
}

impl Graph {
    /// Loads a model the host registered under `name` (and granted to this plugin).
    pub fn load_by_name(name: &str) -> Result<Self> {
        graph::load_by_name(name)
            .map(|inner| Self { inner })
            .map_err(|e| nn_error(&format!("loading model `{name}`"), e))
    }

    /// Loads a model from bytes (needs the host's load-from-bytes grant). `parts` is usually
    /// one buffer (an ONNX file, say).
    pub fn load(parts: &[Vec<u8>], encoding: GraphEncoding, target: ExecutionTarget) -> Result<Self> {
        graph::load(parts, encoding, target).map(|inner| Self { inner }).map_err(|e| nn_error("loading a model", e))
    }

    /// A new execution context. Contexts are cheap; use one per request.
    pub fn session(&self) -> Result<Session> {
        self.inner
            .init_execution_context()
            .map(|ctx| Session { ctx })
            .map_err(|e| nn_error("creating an execution context", e))
    }
}

/// An execution context on a [`Graph`].
pub struct Session {
    ctx: inference::GraphExecutionContext,
}

impl Session {
    /// Runs the model on `inputs` (matched to the graph's inputs by tensor name) and returns
    /// every output, named as the graph names them.
    pub fn compute(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
        let named = inputs.iter().map(|t| Ok((t.name.clone(), to_nn(t)?))).collect::<Result<Vec<_>>>()?;
        let outputs = self.ctx.compute(named).map_err(|e| nn_error("running the model", e))?;
        outputs.into_iter().map(|(name, t)| from_nn(name, &t)).collect()
    }

    /// [`compute`](Self::compute), but `Ok(None)` when the host refuses the computation as
    /// over its memory budget (wasi-nn `too-large`): the caller can then send a smaller batch.
    pub fn compute_if_fits(&self, inputs: &[&Tensor]) -> Result<Option<Vec<Tensor>>> {
        let named = inputs.iter().map(|t| Ok((t.name.clone(), to_nn(t)?))).collect::<Result<Vec<_>>>()?;
        match self.ctx.compute(named) {
            Ok(outputs) => outputs.into_iter().map(|(name, t)| from_nn(name, &t)).collect::<Result<_>>().map(Some),
            Err(e) if e.code() == errors::ErrorCode::TooLarge => Ok(None),
            Err(e) => Err(nn_error("running the model", e)),
        }
    }
}

/// Picks the output called `name` from a [`Session::compute`] result.
pub fn output<'a>(outputs: &'a [Tensor], name: &str) -> Result<&'a Tensor> {
    outputs
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| Error::model(format!("the model returned no output `{name}`")))
}

fn nn_error(doing: &str, e: errors::Error) -> Error {
    let code = match e.code() {
        errors::ErrorCode::NotFound => ErrorCode::NotFound,
        // Over the host's budget for this request: the request is too big (400), not a broken model.
        errors::ErrorCode::TooLarge => ErrorCode::InvalidInput,
        _ => ErrorCode::ModelError,
    };
    Error::new(code, format!("{doing}: wasi-nn {:?}: {}", e.code(), e.data()))
}

fn le_bytes<T: Copy, const N: usize>(values: &[T], to: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * N);
    for &v in values {
        out.extend_from_slice(&to(v));
    }
    out
}

fn from_le<T, const N: usize>(bytes: &[u8], from: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            from(a)
        })
        .collect()
}

/// Converts to a wasi-nn tensor; wasi-nn has no 8/16-bit integers, unsigned wide integers or
/// strings, so those are refused.
fn to_nn(t: &Tensor) -> Result<nn::Tensor> {
    let dims = t
        .shape
        .iter()
        .map(|&d| {
            u32::try_from(d)
                .map_err(|_| Error::invalid_input(format!("tensor `{}`: dimension {d} is too large", t.name)))
        })
        .collect::<Result<Vec<u32>>>()?;
    let (ty, data) = match &t.data {
        TensorData::Fp32(v) => (TensorType::Fp32, le_bytes(v, f32::to_le_bytes)),
        TensorData::Fp64(v) => (TensorType::Fp64, le_bytes(v, f64::to_le_bytes)),
        TensorData::Fp16(v) => (TensorType::Fp16, le_bytes(v, u16::to_le_bytes)),
        TensorData::Uint8(v) => (TensorType::U8, v.clone()),
        TensorData::Bool(v) => (TensorType::U8, v.iter().map(|&b| u8::from(b)).collect()),
        TensorData::Int32(v) => (TensorType::I32, le_bytes(v, i32::to_le_bytes)),
        TensorData::Int64(v) => (TensorType::I64, le_bytes(v, i64::to_le_bytes)),
        other => {
            return Err(Error::unsupported(format!(
                "tensor `{}`: wasi-nn has no {:?} tensors",
                t.name,
                other.datatype()
            )));
        }
    };
    Ok(nn::Tensor::new(&dims, ty, &data))
}

/// Converts a wasi-nn tensor; BF16 is widened to FP32 (the plugin protocol has no BF16).
fn from_nn(name: String, t: &nn::Tensor) -> Result<Tensor> {
    let shape: Vec<u64> = t.dimensions().into_iter().map(u64::from).collect();
    let bytes = t.data();
    let data = match t.ty() {
        TensorType::Fp32 => TensorData::Fp32(from_le(&bytes, f32::from_le_bytes)),
        TensorType::Fp64 => TensorData::Fp64(from_le(&bytes, f64::from_le_bytes)),
        TensorType::Fp16 => TensorData::Fp16(from_le(&bytes, u16::from_le_bytes)),
        TensorType::Bf16 => {
            TensorData::Fp32(from_le(&bytes, |b: [u8; 2]| f32::from_bits(u32::from(u16::from_le_bytes(b)) << 16)))
        }
        TensorType::U8 => TensorData::Uint8(bytes),
        TensorType::I32 => TensorData::Int32(from_le(&bytes, i32::from_le_bytes)),
        TensorType::I64 => TensorData::Int64(from_le(&bytes, i64::from_le_bytes)),
    };
    let tensor = Tensor { name, shape, data };
    let expected = tensor.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    if expected != Some(tensor.data.len() as u64) {
        return Err(Error::model(format!(
            "output `{}`: shape {:?} does not match its {} elements",
            tensor.name,
            tensor.shape,
            tensor.data.len()
        )));
    }
    Ok(tensor)
}
