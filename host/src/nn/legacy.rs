//! The legacy witx ABI, `wasi_ephemeral_nn`, for core-module guests (the `wasi-nn` 0.6 crate
//! built for `wasm32-wasip1`): a thin adapter over the same core (`super::core`) as the
//! component interface, so grants, caps, budgets and deadlines are the same.
//!
//! The witx API addresses tensors by index and writes outputs into guest buffers: input `i`
//! is the model's `i`-th input name, output `i` its `i`-th output.

use wiggle::{GuestMemory, GuestPtr};

use super::NnCtx;
use super::backend::Target;
use super::bindings::errors::ErrorCode;
use super::bindings::tensor::TensorType;
use super::core::Encoding;
use super::error::NnError;
use super::graph::HostGraph;
use super::tensor::HostTensor;

wiggle::from_witx!({
    witx: ["../wit/legacy/wasi-nn.witx"],
    async: *,
    errors: { nn_errno => trappable Error },
});

use self::types::{Error, NnErrno};
pub use self::wasi_ephemeral_nn::add_to_linker;

impl wiggle::GuestErrorType for NnErrno {
    fn success() -> Self {
        Self::Success
    }
}

/// Graphs and contexts a core module holds, by handle.
#[derive(Default)]
pub struct LegacyState {
    graphs: Vec<HostGraph>,
    contexts: Vec<Context>,
}

struct Context {
    graph: HostGraph,
    inputs: Vec<Option<HostTensor>>,
    outputs: Vec<HostTensor>,
}

/// Most graphs or contexts a module may create (handles are never reused).
const MAX_HANDLES: usize = 4096;

fn errno(e: &NnError) -> NnErrno {
    match e.code {
        ErrorCode::InvalidArgument | ErrorCode::Security => NnErrno::InvalidArgument,
        ErrorCode::InvalidEncoding => NnErrno::InvalidEncoding,
        ErrorCode::Timeout => NnErrno::Busy,
        ErrorCode::UnsupportedOperation => NnErrno::UnsupportedOperation,
        ErrorCode::TooLarge => NnErrno::TooLarge,
        ErrorCode::NotFound => NnErrno::NotFound,
        ErrorCode::RuntimeError | ErrorCode::Unknown => NnErrno::RuntimeError,
    }
}

/// Logs the message (the witx ABI has no room for one) and returns the errno.
fn fail(e: NnError) -> Error {
    tracing::info!(error = %e, "wasi_ephemeral_nn call failed");
    errno(&e).into()
}

fn guest(e: wiggle::GuestError) -> Error {
    Error::trap(wasmtime::Error::msg(format!("wasi_ephemeral_nn: bad guest pointer: {e}")))
}

impl NnCtx {
    fn graph(&self, handle: types::Graph) -> Result<HostGraph, Error> {
        let i = u32::from(handle) as usize;
        self.legacy.graphs.get(i).cloned().ok_or_else(|| fail(NnError::invalid_argument(format!("no graph {i}"))))
    }

    fn context(&mut self, handle: types::GraphExecutionContext) -> Result<&mut Context, Error> {
        let i = u32::from(handle) as usize;
        self.legacy.contexts.get_mut(i).ok_or_else(|| fail(NnError::invalid_argument(format!("no context {i}"))))
    }

    fn add_graph(&mut self, graph: HostGraph) -> Result<types::Graph, Error> {
        if self.legacy.graphs.len() >= MAX_HANDLES {
            return Err(fail(NnError::too_large("too many graphs")));
        }
        self.legacy.graphs.push(graph);
        Ok(types::Graph::from((self.legacy.graphs.len() - 1) as u32))
    }
}

impl wasi_ephemeral_nn::WasiEphemeralNn for NnCtx {
    async fn load(
        &mut self,
        memory: &mut GuestMemory<'_>,
        builders: types::GraphBuilderArray,
        encoding: types::GraphEncoding,
        target: types::ExecutionTarget,
    ) -> Result<types::Graph, Error> {
        let mut parts = Vec::new();
        let mut size = 0u64;
        for builder in builders.iter() {
            let builder = memory.read(builder.map_err(guest)?).map_err(guest)?;
            size += u64::from(builder.len());
            // Checked before each copy, so an over-cap model is never copied whole.
            self.check_load_size(size).map_err(fail)?;
            parts.push(memory.to_vec(builder).map_err(guest)?);
        }
        let encoding = match encoding {
            types::GraphEncoding::Autodetect => Encoding::Autodetect,
            types::GraphEncoding::Onnx => Encoding::Onnx,
            types::GraphEncoding::Openvino => Encoding::Other("OpenVINO"),
            types::GraphEncoding::Tensorflow => Encoding::Other("TensorFlow"),
            types::GraphEncoding::Pytorch => Encoding::Other("PyTorch"),
            types::GraphEncoding::Tensorflowlite => Encoding::Other("TensorFlow Lite"),
        };
        let target = match target {
            types::ExecutionTarget::Cpu => Target::Cpu,
            types::ExecutionTarget::Gpu => Target::Gpu,
            types::ExecutionTarget::Tpu => Target::Tpu,
        };
        let graph = self.load_bytes(parts, encoding, target).await.map_err(fail)?;
        self.add_graph(graph)
    }

    async fn load_by_name(&mut self, memory: &mut GuestMemory<'_>, name: GuestPtr<str>) -> Result<types::Graph, Error> {
        let name = memory.as_cow_str(name).map_err(guest)?.into_owned();
        let graph = NnCtx::load_by_name(self, &name).await.map_err(fail)?;
        self.add_graph(graph)
    }

    async fn init_execution_context(
        &mut self,
        _memory: &mut GuestMemory<'_>,
        graph: types::Graph,
    ) -> Result<types::GraphExecutionContext, Error> {
        let graph = self.graph(graph)?;
        if self.legacy.contexts.len() >= MAX_HANDLES {
            return Err(fail(NnError::too_large("too many execution contexts")));
        }
        let inputs = vec![None; graph.model.input_names().len()];
        self.legacy.contexts.push(Context { graph, inputs, outputs: Vec::new() });
        Ok(types::GraphExecutionContext::from((self.legacy.contexts.len() - 1) as u32))
    }

    async fn set_input(
        &mut self,
        memory: &mut GuestMemory<'_>,
        context: types::GraphExecutionContext,
        index: u32,
        tensor: &types::Tensor,
    ) -> Result<(), Error> {
        let ty = match tensor.type_ {
            types::TensorType::F16 => TensorType::Fp16,
            types::TensorType::F32 => TensorType::Fp32,
            types::TensorType::F64 => TensorType::Fp64,
            types::TensorType::U8 => TensorType::U8,
            types::TensorType::I32 => TensorType::I32,
            types::TensorType::I64 => TensorType::I64,
        };
        let dims = memory.to_vec(tensor.dimensions).map_err(guest)?;
        let bytes = u64::from(tensor.data.len());
        let slots = self.context(context)?.inputs.len();
        if index as usize >= slots {
            return Err(fail(NnError::invalid_argument(format!(
                "input index {index} out of range (the model has {slots})"
            ))));
        }
        self.hold_tensor_bytes(bytes).map_err(|e| fail(NnError::too_large(e.to_string())))?;
        let t =
            memory.to_vec(tensor.data).map_err(guest).and_then(|data| HostTensor::new(dims, ty, data).map_err(fail));
        let t = match t {
            Ok(t) => t,
            Err(e) => {
                self.release_tensor_bytes(bytes);
                return Err(e);
            }
        };
        let old = self.context(context)?.inputs[index as usize].replace(t).map_or(0, |t| t.byte_len() as u64);
        self.release_tensor_bytes(old);
        Ok(())
    }

    async fn compute(
        &mut self,
        _memory: &mut GuestMemory<'_>,
        context: types::GraphExecutionContext,
    ) -> Result<(), Error> {
        let ctx = self.context(context)?;
        let graph = ctx.graph.clone();
        let names = graph.model.input_names();
        let named: Vec<(String, HostTensor)> =
            names.into_iter().zip(ctx.inputs.iter()).filter_map(|(n, t)| t.clone().map(|t| (n, t))).collect();
        let outputs = NnCtx::compute(self, &graph, named).await.map_err(fail)?;
        // Outputs are held in the host until read, like the component path's tensors.
        let bytes: u64 = outputs.iter().map(|(_, t)| t.byte_len() as u64).sum();
        let ctx = self.context(context)?;
        let old: u64 = ctx.outputs.drain(..).map(|t| t.byte_len() as u64).sum();
        self.release_tensor_bytes(old);
        self.hold_tensor_bytes(bytes).map_err(|e| fail(NnError::too_large(e.to_string())))?;
        self.context(context)?.outputs = outputs.into_iter().map(|(_, t)| t).collect();
        Ok(())
    }

    async fn get_output(
        &mut self,
        memory: &mut GuestMemory<'_>,
        context: types::GraphExecutionContext,
        index: u32,
        out_buffer: GuestPtr<u8>,
        out_buffer_max_size: u32,
    ) -> Result<u32, Error> {
        let ctx = self.context(context)?;
        let count = ctx.outputs.len();
        let t = ctx.outputs.get(index as usize).ok_or_else(|| {
            fail(NnError::invalid_argument(format!(
                "output index {index} out of range ({count} outputs; compute first)"
            )))
        })?;
        let len = u32::try_from(t.byte_len()).map_err(|_| fail(NnError::too_large("output over 4 GiB")))?;
        if len > out_buffer_max_size {
            return Err(fail(NnError::too_large(format!(
                "output needs {len} bytes, the buffer holds {out_buffer_max_size}"
            ))));
        }
        memory.copy_from_slice(t.data(), out_buffer.as_array(len)).map_err(guest)?;
        Ok(len)
    }
}
