//! The legacy witx ABI, `wasi_ephemeral_nn`, for core-module guests (the `wasi-nn` 0.6 crate
//! built for `wasm32-wasip1`): a thin adapter over the same core (`super::core`) as the
//! component interface, so grants, caps, budgets and deadlines are the same.
//!
//! The witx API addresses tensors by index and writes outputs into guest buffers: input `i`
//! is the model's `i`-th input name, output `i` its `i`-th output. On a language model the
//! contexts speak WasmEdge's GGML dialect instead ([`super::generate`]).

use super::generate as ggml;

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
    /// `None` once unloaded.
    graphs: Vec<Option<Graph>>,
    contexts: Vec<Context>,
}

/// A loaded graph, with the options it was loaded with (language models).
#[derive(Clone)]
struct Graph {
    graph: HostGraph,
    options: ggml::Options,
}

enum Context {
    Tensors(TensorContext),
    Llm(ggml::Session),
}

struct TensorContext {
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

/// A GGML call's failure as its errno (WasmEdge's 100-102 as they are).
fn fail_ggml(f: ggml::Failure) -> Error {
    match f {
        ggml::Failure::Nn(e) => fail(e),
        ggml::Failure::EndOfSequence => NnErrno::EndOfSequence.into(),
        ggml::Failure::ContextFull => NnErrno::ContextFull.into(),
        ggml::Failure::PromptTooLong => NnErrno::PromptTooLong.into(),
    }
}

fn guest(e: wiggle::GuestError) -> Error {
    Error::trap(wasmtime::Error::msg(format!("wasi_ephemeral_nn: bad guest pointer: {e}")))
}

impl NnCtx {
    fn graph(&self, handle: types::Graph) -> Result<Graph, Error> {
        let i = u32::from(handle) as usize;
        self.legacy
            .graphs
            .get(i)
            .cloned()
            .flatten()
            .ok_or_else(|| fail(NnError::invalid_argument(format!("no graph {i}"))))
    }

    fn context(&mut self, handle: types::GraphExecutionContext) -> Result<&mut Context, Error> {
        let i = u32::from(handle) as usize;
        self.legacy.contexts.get_mut(i).ok_or_else(|| fail(NnError::invalid_argument(format!("no context {i}"))))
    }

    fn tensor_context(&mut self, handle: types::GraphExecutionContext) -> Result<&mut TensorContext, Error> {
        match self.context(handle)? {
            Context::Tensors(c) => Ok(c),
            Context::Llm(_) => Err(fail(NnError::invalid_argument("this context is on a language model"))),
        }
    }

    /// The session of a language-model context, and the call it runs in.
    fn session(&mut self, handle: types::GraphExecutionContext) -> Result<(&mut ggml::Session, ggml::Call), Error> {
        let call = ggml::Call::of(self);
        match self.context(handle)? {
            Context::Llm(session) => Ok((session, call)),
            Context::Tensors(_) => Err(fail(NnError::unsupported(
                "compute_single, get_output_single and fini_single need a language model (GGUF) context",
            ))),
        }
    }

    fn add_graph(&mut self, graph: HostGraph, options: ggml::Options) -> Result<types::Graph, Error> {
        if self.legacy.graphs.len() >= MAX_HANDLES {
            return Err(fail(NnError::too_large("too many graphs")));
        }
        self.legacy.graphs.push(Some(Graph { graph, options }));
        Ok(types::Graph::from((self.legacy.graphs.len() - 1) as u32))
    }

    /// Writes `data` into the guest's buffer of `max` bytes: `too-large` if it does not fit.
    fn write_output(memory: &mut GuestMemory<'_>, data: &[u8], out: GuestPtr<u8>, max: u32) -> Result<u32, Error> {
        let len = u32::try_from(data.len()).map_err(|_| fail(NnError::too_large("output over 4 GiB")))?;
        if len > max {
            return Err(fail(NnError::too_large(format!("output needs {len} bytes, the buffer holds {max}"))));
        }
        memory.copy_from_slice(data, out.as_array(len)).map_err(guest)?;
        Ok(len)
    }

    async fn load_named(&mut self, name: &str, config: Option<&str>) -> Result<types::Graph, Error> {
        let mut options = ggml::Options::default();
        if let Some(config) = config {
            options.apply(config.as_bytes()).map_err(fail)?;
        }
        // As WasmEdge answers for a name that was never preloaded: 8, not found.
        if !self.grants.allows(name) {
            tracing::info!(model = name, "wasi_ephemeral_nn: model not granted");
            return Err(NnErrno::NotFound.into());
        }
        let graph = match NnCtx::load_by_name(self, name).await {
            Ok(g) => g,
            // WasmEdge's 103: the name is known but its model file is missing.
            Err(e) if e.code == ErrorCode::NotFound && self.registry.decl(name).is_some() => {
                tracing::info!(error = %e, "wasi_ephemeral_nn: model file not found");
                return Err(NnErrno::ModelNotFound.into());
            }
            Err(e) => return Err(fail(e)),
        };
        self.add_graph(graph, options)
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
            types::GraphEncoding::Ggml => Encoding::Ggml,
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
        self.add_graph(graph, ggml::Options::default())
    }

    async fn load_by_name(&mut self, memory: &mut GuestMemory<'_>, name: GuestPtr<str>) -> Result<types::Graph, Error> {
        let name = memory.as_cow_str(name).map_err(guest)?.into_owned();
        self.load_named(&name, None).await
    }

    async fn load_by_name_with_config(
        &mut self,
        memory: &mut GuestMemory<'_>,
        name: GuestPtr<str>,
        config: GuestPtr<str>,
    ) -> Result<types::Graph, Error> {
        let name = memory.as_cow_str(name).map_err(guest)?.into_owned();
        if config.len() as usize > ggml::MAX_OPTIONS {
            return Err(fail(NnError::too_large("the config is over 64 KiB")));
        }
        let config = memory.as_cow_str(config).map_err(guest)?.into_owned();
        self.load_named(&name, Some(&config)).await
    }

    async fn unload(&mut self, _memory: &mut GuestMemory<'_>, graph: types::Graph) -> Result<(), Error> {
        let i = u32::from(graph) as usize;
        match self.legacy.graphs.get_mut(i) {
            Some(g @ Some(_)) => {
                // Contexts made from it keep their own handle on the model.
                *g = None;
                Ok(())
            }
            _ => Err(fail(NnError::invalid_argument(format!("no graph {i}")))),
        }
    }

    async fn init_execution_context(
        &mut self,
        _memory: &mut GuestMemory<'_>,
        graph: types::Graph,
    ) -> Result<types::GraphExecutionContext, Error> {
        let Graph { graph, options } = self.graph(graph)?;
        if self.legacy.contexts.len() >= MAX_HANDLES {
            return Err(fail(NnError::too_large("too many execution contexts")));
        }
        let context = if graph.model.llm().is_some() {
            Context::Llm(ggml::Session::new(graph.model.clone(), options))
        } else {
            let inputs = vec![None; graph.model.input_names().len()];
            Context::Tensors(TensorContext { graph, inputs, outputs: Vec::new() })
        };
        self.legacy.contexts.push(context);
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
        if let Context::Llm(session) = self.context(context)? {
            // The prompt or options: text, whatever the declared type and shape.
            if tensor.data.len() as usize > ggml::MAX_PROMPT_BYTES {
                return Err(fail(NnError::too_large("a prompt over 4 MiB")));
            }
            let old = if index == 1 { 0 } else { session.prompt_bytes() };
            let data = memory.to_vec(tensor.data).map_err(guest)?;
            // A prompt held in the host counts against the call's tensor budget.
            let new = if index == 1 { 0 } else { data.len() as u64 };
            self.hold_tensor_bytes(new).map_err(|e| fail(NnError::too_large(e.to_string())))?;
            let (session, _) = self.session(context)?;
            let set = session.set_input(index, data);
            self.release_tensor_bytes(if set.is_ok() { old } else { new });
            return set.map_err(fail);
        }
        let dims = memory.to_vec(tensor.dimensions).map_err(guest)?;
        let bytes = u64::from(tensor.data.len());
        let slots = self.tensor_context(context)?.inputs.len();
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
        let old = self.tensor_context(context)?.inputs[index as usize].replace(t).map_or(0, |t| t.byte_len() as u64);
        self.release_tensor_bytes(old);
        Ok(())
    }

    async fn compute(
        &mut self,
        _memory: &mut GuestMemory<'_>,
        context: types::GraphExecutionContext,
    ) -> Result<(), Error> {
        if let Context::Llm(_) = self.context(context)? {
            let (session, call) = self.session(context)?;
            return session.compute(&call).await.map_err(fail_ggml);
        }
        let ctx = self.tensor_context(context)?;
        let graph = ctx.graph.clone();
        let names = graph.model.input_names();
        let named: Vec<(String, HostTensor)> =
            names.into_iter().zip(ctx.inputs.iter()).filter_map(|(n, t)| t.clone().map(|t| (n, t))).collect();
        let outputs = NnCtx::compute(self, &graph, named).await.map_err(fail)?;
        // Outputs are held in the host until read, like the component path's tensors.
        let bytes: u64 = outputs.iter().map(|(_, t)| t.byte_len() as u64).sum();
        let ctx = self.tensor_context(context)?;
        let old: u64 = ctx.outputs.drain(..).map(|t| t.byte_len() as u64).sum();
        self.release_tensor_bytes(old);
        self.hold_tensor_bytes(bytes).map_err(|e| fail(NnError::too_large(e.to_string())))?;
        self.tensor_context(context)?.outputs = outputs.into_iter().map(|(_, t)| t).collect();
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
        let t = match self.context(context)? {
            Context::Llm(session) => {
                let data = session.output(index, false).map_err(fail)?;
                return Self::write_output(memory, &data, out_buffer, out_buffer_max_size);
            }
            Context::Tensors(ctx) => {
                let count = ctx.outputs.len();
                ctx.outputs.get(index as usize).ok_or_else(|| {
                    fail(NnError::invalid_argument(format!(
                        "output index {index} out of range ({count} outputs; compute first)"
                    )))
                })?
            }
        };
        Self::write_output(memory, t.data(), out_buffer, out_buffer_max_size)
    }

    async fn get_output_single(
        &mut self,
        memory: &mut GuestMemory<'_>,
        context: types::GraphExecutionContext,
        index: u32,
        out_buffer: GuestPtr<u8>,
        out_buffer_max_size: u32,
    ) -> Result<u32, Error> {
        let (session, _) = self.session(context)?;
        let data = session.output(index, true).map_err(fail)?;
        Self::write_output(memory, &data, out_buffer, out_buffer_max_size)
    }

    async fn compute_single(
        &mut self,
        _memory: &mut GuestMemory<'_>,
        context: types::GraphExecutionContext,
    ) -> Result<(), Error> {
        let (session, call) = self.session(context)?;
        let result = session.compute_single(&call, false).await;
        if let Some(token) = session.running_token() {
            self.own_generation(token);
        }
        result.map_err(fail_ggml)
    }

    async fn fini_single(
        &mut self,
        _memory: &mut GuestMemory<'_>,
        context: types::GraphExecutionContext,
    ) -> Result<(), Error> {
        let (session, _) = self.session(context)?;
        session.fini_single();
        Ok(())
    }
}
