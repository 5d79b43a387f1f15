//! ONNX graphs on candle, compiled once at load (see [`graph`]): the `onnx` graph encoding.
//!
//! Loading parses the protobuf, checks the opset, converts every initializer to a candle
//! tensor once, folds constants, fuses Conv+BatchNormalization and zero-Pad+Conv, and reports
//! every unsupported operator by name. A compute only walks the compiled steps. Inputs and
//! outputs keep the graph's names.

mod graph;
mod ops;
#[allow(clippy::all, missing_docs)]
mod proto;
mod tensor;
#[cfg(test)]
mod tests;

use std::time::Instant;

use candle_core::{DType, Device};
use prost::Message;

use crate::nn::backend::{BatchSpec, Model, Named, load_budget};
use crate::nn::error::NnError;
use crate::nn::meter::Meter;
use crate::nn::tensor::{HostTensor, type_of};

/// Default-domain opsets EIR implements.
pub const OPSETS: std::ops::RangeInclusive<i64> = 7..=22;

/// A compiled ONNX model.
pub struct Onnx {
    program: graph::Program,
    name: String,
}

impl Onnx {
    /// Parses and compiles a serialized `ModelProto` under the default load budget for its size.
    pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<Self, NnError> {
        Self::from_bytes_with(
            bytes,
            device,
            &Meter::for_load(load_budget(bytes.len() as u64), Default::default(), None),
        )
    }

    /// Parses and compiles a serialized `ModelProto`: everything the compiler keeps or folds is
    /// charged to `meter` (the load budget), and it stops when the meter's caller cancels.
    pub fn from_bytes_with(bytes: &[u8], device: &Device, meter: &Meter) -> Result<Self, NnError> {
        if !device.is_cpu() {
            return Err(NnError::unsupported("ONNX graphs run on the cpu target only"));
        }
        let started = Instant::now();
        let model = proto::ModelProto::decode(bytes)
            .map_err(|e| NnError::invalid_encoding(format!("not an ONNX model (protobuf: {e})")))?;
        let opset = model
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
            .ok_or_else(|| NnError::invalid_encoding("the model imports no default-domain opset"))?;
        if !OPSETS.contains(&opset) {
            return Err(NnError::unsupported(format!(
                "opset {opset} is outside the supported {}..={}",
                OPSETS.start(),
                OPSETS.end()
            )));
        }
        let graph = model.graph.as_ref().ok_or_else(|| NnError::invalid_encoding("the model has no graph"))?;
        let program = graph::Program::compile(graph, opset, meter)?;
        tracing::debug!(
            graph = %graph.name,
            opset,
            steps = program.steps(),
            constants = program.constants(),
            elapsed = ?started.elapsed(),
            "compiled ONNX graph"
        );
        Ok(Self { program, name: graph.name.clone() })
    }

    /// The graph's name.
    pub fn graph_name(&self) -> &str {
        &self.name
    }

    /// Each input's name, element type and a concrete shape for it (symbolic dimensions 2;
    /// `[2]` where no rank is declared).
    pub fn input_types(&self) -> Vec<(String, DType, Vec<usize>)> {
        self.program
            .inputs
            .iter()
            .map(|i| {
                let dims = match &i.shape {
                    Some(s) => s.iter().map(|d| d.unwrap_or(2)).collect(),
                    None => vec![2],
                };
                (i.name.clone(), i.dtype, dims)
            })
            .collect()
    }
}

impl Model for Onnx {
    fn family(&self) -> &'static str {
        "onnx"
    }

    fn input_names(&self) -> Vec<String> {
        self.program.inputs.iter().map(|i| i.name.clone()).collect()
    }

    /// A graph batches when every input and every output declares a symbolic first
    /// dimension (the free batch dimension of an export such as `[N, 224, 224, 3]`).
    fn batching(&self) -> Option<BatchSpec> {
        let free = |shape: &Option<Vec<Option<usize>>>| shape.as_ref().is_some_and(|s| s.first() == Some(&None));
        let batchable = !self.program.inputs.is_empty()
            && self.program.inputs.iter().all(|i| free(&i.shape))
            && self.program.output_shapes.iter().all(free);
        batchable.then(|| BatchSpec {
            inputs: self.program.inputs.iter().map(|i| (i.name.clone(), false)).collect(),
            mask: None,
            outputs: self.program.outputs.iter().map(|(name, _)| (name.clone(), false)).collect(),
        })
    }

    fn compute_with(&self, inputs: Named, meter: &Meter) -> Result<Named, NnError> {
        let mut by_name: Vec<Option<HostTensor>> = vec![None; self.program.inputs.len()];
        for (name, t) in inputs {
            let k = self.program.inputs.iter().position(|i| i.name == name).ok_or_else(|| {
                NnError::invalid_argument(format!(
                    "unknown input `{name}` (the graph takes {})",
                    self.input_names().join(", ")
                ))
            })?;
            by_name[k] = Some(t);
        }
        let mut values = Vec::with_capacity(by_name.len());
        for (spec, t) in self.program.inputs.iter().zip(by_name) {
            let t = t.ok_or_else(|| NnError::invalid_argument(format!("missing input `{}`", spec.name)))?;
            let value = t.to_candle(&Device::Cpu)?;
            if let Some(shape) = &spec.shape {
                let fits = shape.len() == value.rank()
                    && shape.iter().zip(value.dims()).all(|(want, &got)| want.is_none_or(|w| w == got));
                if !fits {
                    return Err(NnError::invalid_argument(format!(
                        "input `{}` must have shape {:?} (None = any), got {:?}",
                        spec.name,
                        shape,
                        value.dims()
                    )));
                }
            }
            let value = if value.dtype() == spec.dtype {
                value
            } else if value.dtype().is_float() == spec.dtype.is_float() || spec.dtype == DType::U8 {
                value.to_dtype(spec.dtype)?
            } else {
                return Err(NnError::invalid_argument(format!(
                    "input `{}` must be {:?}, got {:?}",
                    spec.name,
                    spec.dtype,
                    value.dtype()
                )));
            };
            values.push(value);
        }
        // A big input (an image batch) runs the whole plan on a rayon worker: each operator's
        // parallel pass then starts inside the pool (the worker takes its share, the others
        // steal) instead of handing off from this thread and sleeping, twice per operator. A small
        // one (a 32 ms audio chunk) stays here: its one hand-off would cost more than it saves.
        let elements: usize = values.iter().map(candle_core::Tensor::elem_count).sum();
        let outputs = if elements >= 1 << 14 {
            rayon::scope(|_| self.program.run(values, meter))?
        } else {
            self.program.run(values, meter)?
        };
        self.program
            .outputs
            .iter()
            .zip(outputs)
            .map(|((name, _), t)| {
                // wasi-nn has no I16/U32: widen to I64 (floats to F32 likewise).
                let t = if type_of(t.dtype()).is_some() {
                    t
                } else if t.dtype().is_float() {
                    t.to_dtype(DType::F32)?
                } else {
                    t.to_dtype(DType::I64)?
                };
                Ok((name.clone(), HostTensor::from_candle(&t)?))
            })
            .collect()
    }
}
