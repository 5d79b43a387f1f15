//! The `wasi:nn` interfaces, implemented over [`NnCtx`] and the store's resource table.
//!
//! Validation happens here, before anything reaches a backend: grants, byte caps, resource
//! counts, tensor sizes. Failures a guest can handle come back as `wasi:nn/errors.error`
//! resources with the spec's codes; a malformed tensor constructor (which cannot return an
//! error in the WIT) traps with a message instead.
//!
//! # Language models (GGUF) through the standard WIT
//!
//! A context on a language model (loaded by name) takes and gives UTF-8 text as `u8` tensors
//! of shape `[bytes]`:
//! - inputs: `prompt` (the whole prompt in the model's chat format; control tokens such as
//!   `<|im_start|>` are parsed) starts a new generation; `options` (JSON, the keys of
//!   WasmEdge's GGML backend: `n-predict`, `ctx-size`, `temp`, `top-p`, `top-k`, `min-p`,
//!   `repeat-penalty`, `seed`, `reverse-prompt`, plus `stream`) sets options;
//! - outputs: `text` and `metadata` (JSON: `input_tokens`, `output_tokens`, and `finish`:
//!   `null` while it runs, then `stop`, `length` or `context-full`);
//! - without `stream`, one `compute` returns the whole answer; with `"stream": true` each
//!   `compute` (the first with the prompt, the next with no inputs) returns the next piece, and
//!   the one after the last returns an empty `text` with `finish` set. A prompt that does not
//!   fit the context is `too-large`.

use wasmtime::component::{HasData, Resource, ResourceTable};

use super::NnCtx;
use super::backend::Target;
use super::bindings::{errors, graph, inference, tensor};
use super::core::Encoding;
use super::error::NnError;
use super::graph::{HostContext, HostGraph};
use super::tensor::HostTensor;
use crate::limits::HostLimitExceeded;

/// The [`HasData`] marker the linker uses to reach [`NnView`].
pub struct Nn;

impl HasData for Nn {
    type Data<'a> = NnView<'a>;
}

/// What the wasi-nn host functions see of a store.
pub struct NnView<'a> {
    /// The call's wasi-nn state.
    pub ctx: &'a mut NnCtx,
    /// The store's resource table.
    pub table: &'a mut ResourceTable,
}

type Answer<T> = wasmtime::Result<Result<Resource<T>, Resource<NnError>>>;

impl NnView<'_> {
    /// Hands an error to the guest as a resource.
    fn fail<T>(&mut self, err: NnError) -> wasmtime::Result<Result<T, Resource<NnError>>> {
        tracing::debug!(error = %err, "wasi-nn call failed");
        self.count_resource()?;
        Ok(Err(self.table.push(err)?))
    }

    fn count_resource(&mut self) -> wasmtime::Result<()> {
        if self.ctx.resources >= self.ctx.grants.max_resources {
            return Err(wasmtime::Error::new(HostLimitExceeded {
                what: "live wasi-nn resources",
                requested: u64::from(self.ctx.resources) + 1,
                limit: u64::from(self.ctx.grants.max_resources),
            }));
        }
        self.ctx.resources += 1;
        Ok(())
    }

    fn release_resource(&mut self) {
        self.ctx.resources = self.ctx.resources.saturating_sub(1);
    }

    fn push_tensor(&mut self, t: HostTensor) -> wasmtime::Result<Resource<HostTensor>> {
        self.ctx.hold_tensor_bytes(t.byte_len() as u64).map_err(wasmtime::Error::new)?;
        self.count_resource()?;
        Ok(self.table.push(t)?)
    }

    fn take_tensor(&mut self, r: Resource<HostTensor>) -> wasmtime::Result<HostTensor> {
        let t = self.table.delete(r)?;
        self.ctx.release_tensor_bytes(t.byte_len() as u64);
        self.release_resource();
        Ok(t)
    }

    fn push_graph(&mut self, g: HostGraph) -> Answer<HostGraph> {
        self.count_resource()?;
        Ok(Ok(self.table.push(g)?))
    }
}

impl tensor::Host for NnView<'_> {}

impl tensor::HostTensor for NnView<'_> {
    async fn new(
        &mut self,
        dimensions: tensor::TensorDimensions,
        ty: tensor::TensorType,
        data: tensor::TensorData,
    ) -> wasmtime::Result<Resource<HostTensor>> {
        let t = HostTensor::new(dimensions, ty, data).map_err(|e| wasmtime::format_err!("wasi-nn tensor: {e}"))?;
        self.push_tensor(t)
    }

    async fn dimensions(&mut self, t: Resource<HostTensor>) -> wasmtime::Result<tensor::TensorDimensions> {
        Ok(self.table.get(&t)?.dims().to_vec())
    }

    async fn ty(&mut self, t: Resource<HostTensor>) -> wasmtime::Result<tensor::TensorType> {
        Ok(self.table.get(&t)?.ty())
    }

    async fn data(&mut self, t: Resource<HostTensor>) -> wasmtime::Result<tensor::TensorData> {
        Ok(self.table.get(&t)?.data().to_vec())
    }

    async fn drop(&mut self, t: Resource<HostTensor>) -> wasmtime::Result<()> {
        self.take_tensor(t).map(|_| ())
    }
}

impl graph::Host for NnView<'_> {
    async fn load(
        &mut self,
        builder: Vec<graph::GraphBuilder>,
        encoding: graph::GraphEncoding,
        target: graph::ExecutionTarget,
    ) -> Answer<HostGraph> {
        // The bytes are already lifted here; the core checks the grant and the cap.
        use graph::GraphEncoding as E;
        let encoding = match encoding {
            E::Autodetect => Encoding::Autodetect,
            E::Onnx => Encoding::Onnx,
            E::Ggml => Encoding::Ggml,
            E::Openvino => Encoding::Other("OpenVINO"),
            E::Tensorflow => Encoding::Other("TensorFlow"),
            E::Pytorch => Encoding::Other("PyTorch"),
            E::Tensorflowlite => Encoding::Other("TensorFlow Lite"),
        };
        let target = match target {
            graph::ExecutionTarget::Cpu => Target::Cpu,
            graph::ExecutionTarget::Gpu => Target::Gpu,
            graph::ExecutionTarget::Tpu => Target::Tpu,
        };
        match self.ctx.load_bytes(builder, encoding, target).await {
            Ok(g) => self.push_graph(g),
            Err(e) => self.fail(e),
        }
    }

    async fn load_by_name(&mut self, name: String) -> Answer<HostGraph> {
        match self.ctx.load_by_name(&name).await {
            Ok(g) => self.push_graph(g),
            Err(e) => self.fail(e),
        }
    }
}

impl graph::HostGraph for NnView<'_> {
    async fn init_execution_context(&mut self, g: Resource<HostGraph>) -> Answer<HostContext> {
        let graph = self.table.get(&g)?.clone();
        self.count_resource()?;
        let session =
            graph.model.llm().is_some().then(|| {
                Box::new(super::generate::Session::new(graph.model.clone(), super::generate::Options::default()))
            });
        Ok(Ok(self.table.push(HostContext { graph, session })?))
    }

    async fn drop(&mut self, g: Resource<HostGraph>) -> wasmtime::Result<()> {
        self.table.delete(g)?;
        self.release_resource();
        Ok(())
    }
}

impl inference::Host for NnView<'_> {}

type Outputs = Vec<(String, HostTensor)>;
type Computed = wasmtime::Result<Result<Vec<(String, Resource<HostTensor>)>, Resource<NnError>>>;

impl NnView<'_> {
    /// Hands the outputs to the guest, or none of them if they do not fit its tensor budget.
    fn push_outputs(&mut self, outputs: Outputs) -> Computed {
        let mut out = Vec::with_capacity(outputs.len());
        for (name, t) in outputs {
            match self.push_tensor(t) {
                Ok(r) => out.push((name, r)),
                Err(e) => {
                    for (_, r) in out {
                        self.take_tensor(r)?;
                    }
                    return self.fail(NnError::too_large(e.to_string()));
                }
            }
        }
        Ok(Ok(out))
    }

    /// One `compute` on a language model (see the module documentation).
    async fn generate(
        &mut self,
        ctx: &Resource<HostContext>,
        inputs: Outputs,
    ) -> wasmtime::Result<Result<Outputs, NnError>> {
        use super::generate::{Call, Failure};
        let call = Call::of(self.ctx);
        let context = self.table.get_mut(ctx)?;
        let Some(session) = context.session.as_deref_mut() else {
            return Ok(Err(NnError::unsupported("not a language model")));
        };
        let mut fresh = false;
        for (name, t) in inputs {
            let index = match name.as_str() {
                "options" => 1,
                "prompt" => {
                    fresh = true;
                    0
                }
                other => {
                    return Ok(Err(NnError::invalid_argument(format!(
                        "a language model takes `prompt` and `options` (UTF-8 u8 tensors), not `{other}`"
                    ))));
                }
            };
            if t.data().len() > super::generate::MAX_PROMPT_BYTES {
                return Ok(Err(NnError::too_large("a prompt or options over 4 MiB")));
            }
            // The prompt the session keeps counts against the call's tensor budget.
            let (old, new) = if index == 0 { (session.prompt_bytes(), t.data().len() as u64) } else { (0, 0) };
            if let Err(e) = self.ctx.hold_tensor_bytes(new) {
                return Ok(Err(NnError::too_large(e.to_string())));
            }
            let set = session.set_input(index, t.data().to_vec());
            self.ctx.release_tensor_bytes(if set.is_ok() { old } else { new });
            if let Err(e) = set {
                return Ok(Err(e));
            }
        }
        let streaming = session.streaming();
        let outcome = if !streaming {
            session.compute(&call).await
        } else if !fresh && !session.running() && session.finish().is_some() {
            // Asked again after the last piece: the end, again.
            Ok(())
        } else {
            let result = session.compute_single(&call, true).await;
            if let Some(token) = session.running_token() {
                self.ctx.own_generation(token);
            }
            result
        };
        match outcome {
            Ok(()) | Err(Failure::EndOfSequence | Failure::ContextFull) => {}
            Err(Failure::PromptTooLong) => {
                return Ok(Err(NnError::too_large("the prompt does not fit the model's context")));
            }
            Err(Failure::Nn(e)) => return Ok(Err(e)),
        }
        // Streamed, the end comes as an empty piece.
        let text = match (streaming, session.finish()) {
            (true, Some(_)) => Vec::new(),
            (single, _) => session.output(0, single).map(|t| t.into_owned()).unwrap_or_default(),
        };
        let metadata = session.metadata(true);
        let tensor = |bytes: Vec<u8>| HostTensor::new(vec![bytes.len() as u32], tensor::TensorType::U8, bytes);
        Ok(match (tensor(text), tensor(metadata)) {
            (Ok(text), Ok(metadata)) => Ok(vec![("text".into(), text), ("metadata".into(), metadata)]),
            (Err(e), _) | (_, Err(e)) => Err(e),
        })
    }
}

impl inference::HostGraphExecutionContext for NnView<'_> {
    async fn compute(
        &mut self,
        ctx: Resource<HostContext>,
        inputs: Vec<(String, Resource<HostTensor>)>,
    ) -> wasmtime::Result<Result<Vec<(String, Resource<HostTensor>)>, Resource<NnError>>> {
        let graph = self.table.get(&ctx)?.graph.clone();
        // The inputs are owned handles: move the tensors out of the table, no copy.
        let mut named = Vec::with_capacity(inputs.len());
        for (name, t) in inputs {
            named.push((name, self.take_tensor(t)?));
        }
        if self.table.get(&ctx)?.session.is_some() {
            return match self.generate(&ctx, named).await? {
                Ok(outputs) => self.push_outputs(outputs),
                Err(e) => self.fail(e),
            };
        }
        let outputs = match self.ctx.compute(&graph, named).await {
            Ok(outputs) => outputs,
            Err(e) => return self.fail(e),
        };
        self.push_outputs(outputs)
    }

    async fn drop(&mut self, ctx: Resource<HostContext>) -> wasmtime::Result<()> {
        let context = self.table.delete(ctx)?;
        if let Some(session) = context.session {
            self.ctx.release_tensor_bytes(session.prompt_bytes());
        }
        self.release_resource();
        Ok(())
    }
}

impl errors::Host for NnView<'_> {}

impl errors::HostError for NnView<'_> {
    async fn code(&mut self, e: Resource<NnError>) -> wasmtime::Result<errors::ErrorCode> {
        Ok(self.table.get(&e)?.code)
    }

    async fn data(&mut self, e: Resource<NnError>) -> wasmtime::Result<String> {
        Ok(self.table.get(&e)?.message.clone())
    }

    async fn drop(&mut self, e: Resource<NnError>) -> wasmtime::Result<()> {
        self.table.delete(e)?;
        self.release_resource();
        Ok(())
    }
}
