//! `eir:plugin/llm`, the plugins' generation interface, on the model's engine.
//!
//! A plugin opens only models granted to it (the same `models` grant as wasi-nn); its
//! generations join the model's continuous batch, are charged to the calling tenant, stop at
//! the call's deadline (a waiting `next` returns then: epoch interruption cannot reach a guest
//! blocked in a host call) and are cancelled when the guest drops them, when the call's caller
//! goes away, or when the call ends.

use std::sync::Arc;

use wasmtime::component::Resource;

use super::engine::{Event, Finish, GenerateRequest, Generation};
use super::{LlmError, Message, Sampling};
use crate::nn::Model;
use crate::plugin::bindings::eir::plugin::llm as wit;
use crate::plugin::store::StoreState;

/// A model opened by a guest.
pub struct ModelHandle {
    model: Arc<dyn Model>,
}

/// A generation started by a guest; dropping it cancels the generation.
pub struct GenerationHandle {
    generation: Generation,
    finished: Option<wit::Finished>,
}

fn error(code: wit::ErrorCode, message: impl Into<String>) -> wit::Error {
    wit::Error { code, message: message.into() }
}

impl From<LlmError> for wit::Error {
    fn from(e: LlmError) -> Self {
        let code = match &e {
            LlmError::BadParameter(_) => wit::ErrorCode::InvalidArgument,
            LlmError::PromptTooLong(_) => wit::ErrorCode::PromptTooLong,
            LlmError::Busy(_) => wit::ErrorCode::Busy,
            LlmError::Template(_) | LlmError::Compute(_) => wit::ErrorCode::Runtime,
        };
        error(code, e.to_string())
    }
}

fn reason(f: Finish) -> wit::FinishReason {
    match f {
        Finish::Stop => wit::FinishReason::Stop,
        Finish::Length => wit::FinishReason::Length,
        Finish::Cancelled => wit::FinishReason::Cancelled,
        Finish::Deadline => wit::FinishReason::Deadline,
        Finish::ContextFull => wit::FinishReason::ContextFull,
        Finish::Error => wit::FinishReason::Error,
    }
}

/// Most tokens a guest may hand over as a prompt (beyond any model's context anyway).
const MAX_PROMPT_TOKENS: usize = 1 << 20;

impl StoreState {
    fn llm_of(&mut self, model: &Resource<ModelHandle>) -> wasmtime::Result<&crate::llm::Llm> {
        let (_, table) = self.llm_view();
        let handle = table.get(model)?;
        handle.model.llm().ok_or_else(|| wasmtime::Error::msg("an opened model that is not a language model"))
    }

    /// Counts one more resource against the plugin's cap.
    fn take_resource(&mut self) -> Result<(), wit::Error> {
        let (nn, _) = self.llm_view();
        if nn.resources >= nn.grants.max_resources {
            return Err(error(
                wit::ErrorCode::Busy,
                format!("this call holds {} host resources already (max_resources)", nn.resources),
            ));
        }
        nn.resources += 1;
        Ok(())
    }

    fn give_resource(&mut self) {
        let (nn, _) = self.llm_view();
        nn.resources = nn.resources.saturating_sub(1);
    }
}

impl wit::Host for StoreState {}

impl wit::HostModel for StoreState {
    async fn open(&mut self, name: String) -> wasmtime::Result<Result<Resource<ModelHandle>, wit::Error>> {
        let (nn, _) = self.llm_view();
        if !nn.grants.allows(&name) {
            return Ok(Err(error(wit::ErrorCode::Denied, format!("model `{name}` is not granted to this plugin"))));
        }
        let registry = nn.registry.clone();
        let model = match registry.get(&name).await {
            Ok(m) => m,
            Err(e) => return Ok(Err(error(wit::ErrorCode::NotFound, e.message))),
        };
        if model.llm().is_none() {
            return Ok(Err(error(
                wit::ErrorCode::NotFound,
                format!("model `{name}` is a `{}` model, not a language model", model.family()),
            )));
        }
        if let Err(e) = self.take_resource() {
            return Ok(Err(e));
        }
        let (_, table) = self.llm_view();
        Ok(Ok(table.push(ModelHandle { model })?))
    }

    async fn chat_prompt(
        &mut self,
        model: Resource<ModelHandle>,
        messages: Vec<wit::Message>,
    ) -> wasmtime::Result<Result<Vec<u32>, wit::Error>> {
        let messages: Vec<Message> =
            messages.into_iter().map(|m| Message { role: m.role, content: m.content }).collect();
        Ok(self.llm_of(&model)?.chat_prompt(&messages).map_err(Into::into))
    }

    async fn tokenize(
        &mut self,
        model: Resource<ModelHandle>,
        text: String,
    ) -> wasmtime::Result<Result<Vec<u32>, wit::Error>> {
        let llm = self.llm_of(&model)?;
        Ok(llm.gguf().tokenizer.encode(&text, false).map_err(|e| error(wit::ErrorCode::InvalidArgument, e.message)))
    }

    async fn detokenize(&mut self, model: Resource<ModelHandle>, tokens: Vec<u32>) -> wasmtime::Result<String> {
        Ok(self.llm_of(&model)?.gguf().tokenizer.decode(&tokens))
    }

    async fn context_length(&mut self, model: Resource<ModelHandle>) -> wasmtime::Result<u32> {
        Ok(u32::try_from(self.llm_of(&model)?.engine().context()).unwrap_or(u32::MAX))
    }

    async fn generate(
        &mut self,
        model: Resource<ModelHandle>,
        prompt: Vec<u32>,
        options: wit::Options,
    ) -> wasmtime::Result<Result<Resource<GenerationHandle>, wit::Error>> {
        if prompt.len() > MAX_PROMPT_TOKENS {
            return Ok(Err(error(wit::ErrorCode::PromptTooLong, format!("{} prompt tokens", prompt.len()))));
        }
        let vocab = self.llm_of(&model)?.gguf().llama.config.vocab;
        if let Some(t) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Ok(Err(error(
                wit::ErrorCode::InvalidArgument,
                format!("token {t} is outside the vocabulary of {vocab}"),
            )));
        }
        let s = options.sampling;
        let sampling = Sampling {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            repeat_penalty: s.repeat_penalty,
            seed: s.seed,
            ..Sampling::default()
        };
        let (nn, _) = self.llm_view();
        let req = GenerateRequest {
            prompt,
            sampling,
            max_tokens: options.max_tokens as usize,
            stop: options.stop,
            tenant: nn.tenant.clone(),
            deadline: Some(nn.deadline),
        };
        let generation = match self.llm_of(&model)?.generate(req) {
            Ok(g) => g,
            Err(e) => return Ok(Err(e.into())),
        };
        if let Err(e) = self.take_resource() {
            return Ok(Err(e));
        }
        let (nn, table) = self.llm_view();
        nn.own_generation(generation.cancel_token());
        Ok(Ok(table.push(GenerationHandle { generation, finished: None })?))
    }

    async fn drop(&mut self, model: Resource<ModelHandle>) -> wasmtime::Result<()> {
        let (_, table) = self.llm_view();
        table.delete(model)?;
        self.give_resource();
        Ok(())
    }
}

impl wit::HostGeneration for StoreState {
    async fn next(&mut self, generation: Resource<GenerationHandle>) -> wasmtime::Result<Option<wit::Chunk>> {
        let (nn, table) = self.llm_view();
        let (deadline, abandoned) = (nn.deadline, nn.abandoned.clone());
        let (tenant, turn) = (nn.tenant.clone(), nn.turn.clone());
        let none = wit::Usage { prompt_tokens: 0, completion_tokens: 0 };
        let handle = table.get_mut(&generation)?;
        if handle.finished.is_some() {
            return Ok(None);
        }
        let stop = async {
            tokio::select! {
                () = tokio::time::sleep_until(deadline.into()) => wit::FinishReason::Deadline,
                // The caller went away (the gateway's client hung up).
                () = abandoned.cancelled() => wit::FinishReason::Cancelled,
            }
        };
        let event = match handle.generation.next_or(&tenant, &turn, stop).await {
            Ok(event) => event,
            Err(reason) => {
                handle.generation.cancel();
                handle.finished = Some(wit::Finished { reason, usage: none });
                return Ok(None);
            }
        };
        Ok(match event {
            Some(Event::Chunk { text, tokens }) => Some(wit::Chunk { text, tokens }),
            Some(Event::Done { finish, usage, .. }) => {
                handle.finished = Some(wit::Finished {
                    reason: reason(finish),
                    usage: wit::Usage {
                        prompt_tokens: usage.prompt_tokens as u32,
                        completion_tokens: usage.completion_tokens as u32,
                    },
                });
                None
            }
            None => {
                handle.finished.get_or_insert(wit::Finished { reason: wit::FinishReason::Error, usage: none });
                None
            }
        })
    }

    async fn finished(&mut self, generation: Resource<GenerationHandle>) -> wasmtime::Result<Option<wit::Finished>> {
        let (_, table) = self.llm_view();
        Ok(table.get(&generation)?.finished)
    }

    async fn drop(&mut self, generation: Resource<GenerationHandle>) -> wasmtime::Result<()> {
        let (_, table) = self.llm_view();
        // Dropping the engine's handle cancels the generation.
        table.delete(generation)?;
        self.give_resource();
        Ok(())
    }
}
